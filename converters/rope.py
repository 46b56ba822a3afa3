"""Rope as the reference computes it, and whether a target runtime can state it.

The reference is transformers: its Gemma rotary embeddings (``GemmaRotaryEmbedding``,
``Gemma2RotaryEmbedding``, ``Gemma3RotaryEmbedding``) build ``inv_freq`` and the cos/sin factor
(``attention_scaling``) with ``ROPE_INIT_FUNCTIONS`` (modeling_rope_utils.py); the ONNX tables are taken
from those classes themselves, so every quirk of theirs (YaRN's blend, its attention factor, which layers
are scaled) is followed rather than re-derived. llama.cpp's YaRN is re-derived here from its sources
(ggml ops.cpp rope_yarn, ggml.c ggml_rope_yarn_corr_dims, llama-context.cpp llama_context) only to
check, for one spec, that it computes what transformers does before a GGUF says "yarn".
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from gemport.errors import UnsupportedError
from gemport.spec import FULL, SLIDING, GemmaSpec

# ref: llama-hparams.h: yarn_beta_fast = 32, yarn_beta_slow = 1; llama-model.cpp load_hparams reads no
# rope.scaling.yarn_beta_* key (only llama-model-saver.cpp writes them), so GGUF cannot state others.
LLAMACPP_BETA_FAST, LLAMACPP_BETA_SLOW = 32.0, 1.0
# llama.cpp's float32 YaRN against transformers' (float32 inv_freq, float64 attention factor).
RTOL = 1e-5


def rotary_tables(spec: GemmaSpec, layer: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [rows, head_dim / 2] of ``layer``, float32, attention factor applied, computed by the
    family's transformers rotary embedding for positions 0 .. rows - 1 (ref: modeling_gemma3.py
    Gemma3RotaryEmbedding.forward: cat(freqs, freqs).cos() * attention_scaling; the halves are equal)."""
    import torch

    rotary, layer_type = _rotary(spec), _layer_type(spec, layer)
    x = torch.zeros(1, 1, spec.head_dim, dtype=torch.float32)
    positions = torch.arange(rows, dtype=torch.int64)[None, :]
    with torch.no_grad():
        cos, sin = rotary(x, positions, layer_type) if layer_type else rotary(x, positions)
    half = spec.head_dim // 2
    return cos[0, :, :half].numpy().copy(), sin[0, :, :half].numpy().copy()


def reference_rope(spec: GemmaSpec, layer: int) -> tuple[np.ndarray, float]:
    """(inv_freq [head_dim / 2] float32, attention factor) of ``layer`` as transformers sets them up."""
    rotary, layer_type = _rotary(spec), _layer_type(spec, layer)
    prefix = f"{layer_type}_" if layer_type else ""
    inv_freq = getattr(rotary, f"{prefix}inv_freq")
    return inv_freq.numpy().astype(np.float32), float(getattr(rotary, f"{prefix}attention_scaling"))


def _layer_type(spec: GemmaSpec, layer: int) -> str | None:
    """Gemma 3 keeps one rope per layer type; Gemma 1 and 2 one rope for every layer."""
    if spec.family != "gemma3":
        return None
    return FULL if spec.layer_types[layer] != SLIDING else SLIDING


@lru_cache(maxsize=4)
def _rotary(spec: GemmaSpec):
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    # Its advice on the config (e.g. a yarn factor unlike max / original positions) is the reference's to
    # give when a user loads the model, not a converter's.
    hf_logging.set_verbosity_error()
    try:
        return _rotary_of(spec)
    finally:
        hf_logging.set_verbosity(verbosity)


def _rotary_of(spec: GemmaSpec):
    from transformers import AutoConfig

    cfg = spec.to_hf_config("5")
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    if spec.family == "gemma3":
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding as Rotary
    elif spec.family == "gemma2":
        from transformers.models.gemma2.modeling_gemma2 import Gemma2RotaryEmbedding as Rotary
    else:
        from transformers.models.gemma.modeling_gemma import GemmaRotaryEmbedding as Rotary
    return Rotary(config)


# --- llama.cpp -------------------------------------------------------------------------------


def llamacpp_yarn(spec: GemmaSpec, rope_attn_factor: float) -> dict[str, tuple[np.ndarray, float]]:
    """{"scaled" | "unscaled": (inv_freq, cos/sin factor)} that llama.cpp uses for a GGUF of ``spec`` with
    rope.scaling.type yarn, its factor, original_context_length and rope.scaling.attn_factor
    ``rope_attn_factor``; "unscaled" is Gemma 3's sliding layers (freq_scale_swa 1, ref: gemma3.cpp).

    ref: llama-context.cpp llama_context: ext_factor 1 for yarn; yarn_attn_factor = get_mscale(factor) /
    (1 + 0.1 ln factor) * rope.scaling.attn_factor; ggml ops.cpp rope_yarn: theta = interp (1 - ramp) +
    extrap ramp, ramp = 1 - clamp((i - low) / max(0.001, high - low)), mscale = yarn_attn_factor *
    (1 + 0.1 ln (1 / freq_scale)); ggml.c ggml_rope_yarn_corr_dims: floor / ceil of the correction dims."""
    scaling = spec.rope_scaling
    params = dict(scaling.params)
    f32 = np.float32
    factor = float(f32(scaling.factor))  # rope.scaling.factor is a float32 key
    freq_scale = f32(1.0) / f32(factor)
    n_ctx_orig = int(params["original_max_position_embeddings"])
    n_dims = spec.head_dim

    def mscale_of(scale: float) -> float:
        return 1.0 if scale <= 1.0 else 0.1 * math.log(scale) + 1.0

    attn = f32(mscale_of(factor) / (1.0 + 0.1 * math.log(factor)) * rope_attn_factor)
    out = {}
    for kind, base, scale in (
        ("scaled", spec.rope_theta, freq_scale),
        ("unscaled", spec.rope_local_theta or spec.rope_theta, f32(1.0)),
    ):
        low, high = _corr_dims(n_dims, n_ctx_orig, float(f32(base)))
        i = np.arange(n_dims // 2, dtype=f32)
        extrap = (f32(base) ** (-2.0 * i.astype(np.float64) / n_dims)).astype(f32)
        ramp = 1 - np.clip((i - f32(low)) / max(f32(0.001), f32(high - low)), 0, 1)
        inv_freq = (scale * extrap * (1 - ramp) + extrap * ramp).astype(f32)
        out[kind] = (inv_freq, float(attn * f32(1.0 + 0.1 * math.log(1.0 / float(scale)))))
    return out


def _corr_dims(n_dims: int, n_ctx_orig: int, base: float) -> tuple[float, float]:
    def corr_dim(n_rot: float) -> float:
        return n_dims * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = math.floor(corr_dim(LLAMACPP_BETA_FAST))
    high = math.ceil(corr_dim(LLAMACPP_BETA_SLOW))
    return max(0.0, low), min(n_dims - 1.0, high)


def gguf_yarn_attn_factor(spec: GemmaSpec, source: str | None) -> float:
    """rope.scaling.attn_factor that makes llama.cpp's YaRN of ``spec`` transformers' in every layer;
    refused in one line (naming config.json and the key) where no value does."""
    factor = spec.rope_scaling.factor
    global_layer = next((i for i, t in enumerate(spec.layer_types) if t != SLIDING), 0)
    inv_freq, attention = reference_rope(spec, global_layer)
    # ggml multiplies cos/sin by yarn_attn_factor * (1 + 0.1 ln factor) = rope.scaling.attn_factor *
    # get_mscale(factor) in scaled layers (see llamacpp_yarn): solve for the key.
    rope_attn = attention / (1.0 if factor <= 1.0 else 0.1 * math.log(factor) + 1.0)
    ours = llamacpp_yarn(spec, rope_attn)
    want = {"scaled": (inv_freq, attention)}
    if spec.family == "gemma3" and SLIDING in spec.layer_types:
        sliding = spec.layer_types.index(SLIDING)
        want["unscaled"] = reference_rope(spec, sliding)
    for kind, (ref_freq, ref_attn) in want.items():
        got_freq, got_attn = ours[kind]
        if not np.allclose(got_freq, ref_freq, rtol=RTOL, atol=0) or not math.isclose(got_attn, ref_attn, rel_tol=RTOL):
            why = _yarn_mismatch(spec, kind)
            raise refusal(spec, source, f"not written to GGUF: {why}")
    return rope_attn


def _yarn_mismatch(spec: GemmaSpec, kind: str) -> str:
    params = dict(spec.rope_scaling.params)
    if kind == "unscaled":
        return (
            "llama.cpp applies YaRN's attention factor to Gemma 3's sliding layers too, transformers to the "
            "full-attention layers only (ref: llama-context.cpp yarn_attn_factor, gemma3.cpp)"
        )
    if params.get("beta_fast") not in (None, 0, LLAMACPP_BETA_FAST) or params.get("beta_slow") not in (
        None,
        0,
        LLAMACPP_BETA_SLOW,
    ):
        return "llama.cpp reads no YaRN beta_fast / beta_slow from a GGUF (ref: llama-model.cpp load_hparams: 32 and 1)"
    if params.get("truncate") is False:
        return "llama.cpp always truncates YaRN's correction range (ref: ggml.c ggml_rope_yarn_corr_dims)"
    return "llama.cpp's YaRN (ref: ggml ops.cpp rope_yarn) computes different frequencies from transformers'"


# --- refusals --------------------------------------------------------------------------------


def refusal(spec: GemmaSpec, source: str | None, why: str) -> UnsupportedError:
    """One line naming the file and the key that states the rope scaling: ``<source>/config.json`` and
    the key as the config spells it when the source is a Hugging Face folder, else the source."""
    rope_type = spec.rope_scaling.rope_type
    config = Path(source) / "config.json" if source else None
    if config is not None and config.is_file():
        return UnsupportedError(f"{_config_key(config, spec)} = {rope_type!r}: {why}", config)
    return UnsupportedError(f"rope scaling type {rope_type!r}: {why}", source)


def _config_key(config: Path, spec: GemmaSpec) -> str:
    """Where config.json states the rope type, read as GemmaSpec reads it (rope_scaling over
    rope_parameters; Gemma 3's nested under full_attention); only to name it in a message."""
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError):
        cfg = {}
    cfg = cfg if isinstance(cfg, dict) else {}
    for where, params in (("rope_scaling", cfg.get("rope_scaling")), *_rope_parameters(cfg, spec)):
        if isinstance(params, dict) and params.get("rope_type", params.get("type")) == spec.rope_scaling.rope_type:
            return f"{where}.{'rope_type' if 'rope_type' in params else 'type'}"
    return f"rope_parameters.{FULL}.rope_type" if spec.family == "gemma3" else "rope_parameters.rope_type"


def _rope_parameters(cfg: dict, spec: GemmaSpec) -> list[tuple[str, object]]:
    params = cfg.get("rope_parameters")
    if not isinstance(params, dict):
        return []
    if spec.family == "gemma3" and FULL in params:
        return [(f"rope_parameters.{FULL}", params[FULL])]
    return [("rope_parameters", params)]
