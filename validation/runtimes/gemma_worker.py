"""Worker of validation.runtimes.jax: Google's ``gemma`` library scoring token windows, fp32, CPU.

Runs in the library's own environment (``make gemma-venv``, pins in requirements/gemma-runtime.txt),
never in gemport's: it imports nothing from gemport, only the standard library, numpy and the gemma
library. Started as ``python -I gemma_worker.py``: ``-I`` keeps this folder (which holds
validation/runtimes/jax.py) off sys.path, so ``import jax`` finds JAX, and keeps PYTHONPATH out.

Protocol (one JSON object per line; the first reply line is the only text gemport reads before data):

- stdin line 1: ``{"checkpoint": PATH, "spec": GemmaSpec.to_json(), "transpose_gating": bool}``;
  reply ``{"ok": true, "model": ..., "versions": {...}, "vocab_size": V}`` or ``{"error": MESSAGE}``.
- then one line per window: ``{"tokens": [ids]}``; reply ``{"rows": n, "cols": V}`` followed by n * V
  little-endian float32 log-probabilities (row i predicts token i + 1), or ``{"error": MESSAGE}``.
- end of stdin: the worker exits.

The checkpoint is loaded as a user of the library loads it, with ``gm.ckpts.load_params``, and run by the
library's own ``Transformer``: a preset class of ``gm.nn`` (e.g. ``Gemma3_270M``) when the spec is exactly
one, else a ``TransformerConfig`` built from the spec (Gemma 1 and tiny models have no preset here).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from importlib import metadata

import numpy as np

ROWS_PER_CHUNK_ELEMENTS = 1 << 24  # float64 work arrays of at most 128 MiB in log_softmax
MAX_MESSAGE = 240  # characters of an error sent back (TensorStore's run to kilobytes)


def make_config(spec: dict, rows: int, transpose_gating: bool):
    """The library's TransformerConfig for ``spec``; ``rows`` is the stored embedding's row count."""
    from gemma.gm.nn import _config, _modules

    sliding = _modules.AttentionType.LOCAL_SLIDING
    types = tuple(sliding if t == "sliding_attention" else _modules.AttentionType.GLOBAL for t in spec["layer_types"])
    scaling = spec.get("rope_scaling") or {}
    fields = dict(
        num_embed=rows,
        embed_dim=spec["hidden_size"],
        hidden_dim=spec["intermediate_size"],
        num_heads=spec["num_heads"],
        head_dim=spec["head_dim"],
        num_kv_heads=spec["num_kv_heads"],
        final_logit_softcap=spec["final_softcap"],
        # Gemma 2 and 3 blocks have post-norms, Gemma 3 query/key norms (ref: gemma/gm/nn/_modules.py Block,
        # Attention.setup)
        use_post_attn_norm=spec["family"] != "gemma",
        use_post_ffw_norm=spec["family"] != "gemma",
        use_qk_norm=spec["family"] == "gemma3",
        attention_types=types,
        attn_logits_soft_cap=spec["attn_softcap"],
        sliding_window_size=spec["sliding_window"] if sliding in types else None,
        transpose_gating_einsum=transpose_gating,
        local_base_frequency=_number(spec["rope_local_theta"] or spec["rope_theta"]),
        global_base_frequency=_number(spec["rope_theta"]),
        # apply_rope divides positions by scale_factor: linear interpolation (ref: gemma/gm/math/
        # _positional_embeddings.py apply_rope; _transformer.py: local_/global_scale_factor by layer type).
        # Gemma 3 scales its global layers only, Gemma 1 and 2 every layer (GemmaSpec.layer_rope_scaling).
        global_scale_factor=float(scaling.get("factor", 1.0)),
        local_scale_factor=float(scaling.get("factor", 1.0)) if spec["family"] != "gemma3" else 1.0,
        vision_encoder=None,
    )
    scalar = spec["query_pre_attn_scalar"] or spec["head_dim"]  # HF scales queries by scalar ** -0.5
    # The library states the query scale as one of three rules, two of them 1/sqrt(x) (ref: gemma/gm/nn/
    # _config.py QueryPreAttentionNormalisation, TransformerConfig.query_pre_attn_scalar; the third,
    # BY_EMBED_DIM_DIV_NUM_HEADS, returns embed_dim // num_heads itself and no preset uses it).
    rules = _config.QueryPreAttentionNormalisation
    if scalar == spec["head_dim"]:
        return _config.TransformerConfig(**fields, query_pre_attn_norm=rules.BY_ONE_OVER_SQRT_HEAD_DIM)
    if scalar == spec["hidden_size"] // spec["num_heads"]:
        return _config.TransformerConfig(**fields, query_pre_attn_norm=rules.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS)
    return _stated_scalar_config(_config.TransformerConfig)(**fields, stated_query_scalar=float(scalar) ** -0.5)


def _stated_scalar_config(base):
    """A TransformerConfig whose query scale is a number: for a model (tiny Gemma 2) whose
    query_pre_attn_scalar is neither head_dim nor hidden / heads, which no rule of the library states.
    Transformer.setup reads only ``config.query_pre_attn_scalar()`` (ref: gemma/gm/nn/_transformer.py)."""

    @dataclasses.dataclass(frozen=True)
    class StatedScalarConfig(base):
        stated_query_scalar: float = 1.0

        def query_pre_attn_scalar(self) -> float:
            return self.stated_query_scalar

    return StatedScalarConfig


def _number(x: float) -> int | float:
    """Rope bases as the presets write them (ints), so that a config equals its preset."""
    return int(x) if float(x).is_integer() else x


def find_preset(config) -> tuple[str, type] | None:
    """The ``gm.nn`` model class whose config is ``config`` (its vision encoder set aside), if any."""
    from gemma import gm
    from gemma.gm.nn import _config, _transformer

    for name in sorted(dir(gm.nn)):
        cls = getattr(gm.nn, name)
        preset = getattr(cls, "config", None)
        if not (isinstance(cls, type) and issubclass(cls, _transformer.Transformer)):
            continue
        if type(preset) is _config.TransformerConfig and dataclasses.replace(preset, vision_encoder=None) == config:
            return name, cls
    return None


def build_model(config):
    """(model, description): the preset's class when there is one, else Transformer(config)."""
    import jax.numpy as jnp
    from gemma.gm.nn import _gemma, _transformer

    found = find_preset(config)
    if found is None:
        return _transformer.Transformer(config=config, dtype=jnp.float32), "config from the spec"
    name, cls = found
    # Gemma 3 4B+ presets carry a vision encoder; text_only drops it (ref: _gemma.py _Gemma3Base).
    extra = {"text_only": True} if issubclass(cls, _gemma._Gemma3Base) else {}
    return cls(dtype=jnp.float32, **extra), f"preset gm.nn.{name}"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-softmax of [rows, vocab] logits, computed in float64 a chunk of rows at a time."""
    out = np.empty(logits.shape, dtype=np.float32)
    step = max(1, ROWS_PER_CHUNK_ELEMENTS // max(1, logits.shape[1]))
    for i in range(0, logits.shape[0], step):
        x = logits[i : i + step].astype(np.float64)
        x -= x.max(axis=1, keepdims=True)
        x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
        out[i : i + step] = x
    return out


class Scorer:
    def __init__(self, setup: dict):
        import jax
        import jax.numpy as jnp
        from gemma import gm

        spec = setup["spec"]
        self.vocab = spec["vocab_size"]
        # Restored as jax arrays in their stored dtype (ref: gemma/gm/ckpts/_checkpoint.py load_params);
        # a bf16 checkpoint is widened here so that the model runs in fp32.
        params = gm.ckpts.load_params(setup["checkpoint"])
        self.params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
        rows, hidden = self.params["embedder"]["input_embedding"].shape
        gating = self.params["layer_0"]["mlp"]["gating_einsum"].shape
        # [2, F, D] is transposed; when F == D the shape cannot tell and the caller's reading stands.
        transpose = setup["transpose_gating"] if gating[1] == gating[2] else gating[2] == hidden
        self.config = make_config(spec, rows, transpose)
        self.model, self.description = build_model(self.config)

    def logprobs(self, tokens: list[int]) -> np.ndarray:
        import jax.numpy as jnp

        n = len(tokens)
        # Positions and the causal mask are given explicitly: by default the library derives both from
        # ``tokens != 0``, treating id 0 as padding (ref: gemma/gm/utils/_types.py Input.inputs_mask,
        # attention_mask, positions), which would mask a real token 0 of a window.
        out = self.model.apply(
            {"params": self.params},
            jnp.asarray([tokens], dtype=jnp.int32),
            positions=jnp.arange(n, dtype=jnp.int32)[None],
            attention_mask=jnp.tril(jnp.ones((n, n), dtype=bool))[None],
            return_last_only=False,
        )
        # Rows beyond the tokenizer (Gemma 1/2 pad the embedding to 256128) are no vocabulary: the
        # reference's softmax runs over vocab_size columns, and so does this one.
        return log_softmax(np.asarray(out.logits[0, :, : self.vocab], dtype=np.float32))


def _versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in ("gemma", "jax", "flax", "orbax-checkpoint")}


def _reply(channel, message: dict) -> None:
    channel.write((json.dumps(message) + "\n").encode())
    channel.flush()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0] if text else ''}"
    return line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 3] + "..."


def serve(make_scorer, versions) -> int:
    """The worker's loop (module docstring): ``make_scorer(setup)`` loads, its ``logprobs(tokens)`` scores a
    window, ``versions()`` names the packages. Shared with keras_worker.py."""
    # The replies get their own copy of stdout; fd 1 then points at stderr, so that whatever the
    # libraries print cannot corrupt the protocol.
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    line = sys.stdin.readline()
    if not line:
        return 0
    try:
        scorer = make_scorer(json.loads(line))
    except Exception as exc:  # reported to gemport, which raises a typed error naming the checkpoint
        _reply(channel, {"error": _one_line(exc)})
        return 1
    _reply(channel, {"ok": True, "model": scorer.description, "versions": versions(), "vocab_size": scorer.vocab})
    for line in sys.stdin:
        try:
            logprobs = scorer.logprobs(json.loads(line)["tokens"])
        except Exception as exc:
            _reply(channel, {"error": _one_line(exc)})
            return 1
        _reply(channel, {"rows": logprobs.shape[0], "cols": logprobs.shape[1]})
        channel.write(np.ascontiguousarray(logprobs, dtype="<f4").tobytes())
        channel.flush()
    return 0


def main() -> int:
    return serve(Scorer, _versions)


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # Skip the interpreter's teardown of TensorFlow and JAX (over a second); nothing is left to write.
    os._exit(code)
