"""gemma_pytorch checkpoints (google/gemma_pytorch ``.ckpt`` files): reading.

A checkpoint is a ``torch.save`` of ``{"model_state_dict": state}`` (ref: gemma_pytorch
gemma/model.py GemmaForCausalLM.load_weights, which reads ``torch.load(path, mmap=True,
weights_only=True)["model_state_dict"]``). It is opened here the same way and only that way:
``weights_only=True`` refuses any pickled object that is not a tensor or a plain container, so
reading a checkpoint never runs code from it. Only torch's zip format is read (what torch >= 1.6
saves); the legacy raw-pickle format allocates storages at sizes its pickle states, before any check.

Names (ref: gemma/model.py GemmaForCausalLM, GemmaModel, GemmaDecoderLayer, Gemma2DecoderLayer,
GemmaAttention, GemmaMLP):

- ``embedder.weight`` [vocab, D] (``text_token_embedder.weight`` in the multimodal Gemma 3,
  ref: gemma/gemma3_model.py), also the output head: the Sampler multiplies by it;
- ``model.layers.{i}.self_attn.qkv_proj.weight`` [(N + 2K) * H, D]: q, k and v stacked by rows,
  split as ``qkv.split([q_size, kv_size, kv_size])`` (GemmaAttention.forward);
- ``self_attn.o_proj``, ``mlp.gate_proj`` / ``up_proj`` / ``down_proj``: [out, in] as in HF;
- RMSNorm weights ``input_layernorm``, ``post_attention_layernorm`` and, for Gemma 2/3,
  ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm``, Gemma 3's ``self_attn.query_norm``
  / ``key_norm``, and ``model.norm``: the raw ``w`` of ``(1 + w)`` (RMSNorm add_unit_offset), as
  in HF. Gemma 1's ``post_attention_layernorm`` is its pre-MLP norm, as in HF;
- int8 checkpoints (``quant=True``): every Linear and the Embedding store an int8 ``weight`` and
  a float ``weight_scaler`` [out]; the weight used is ``weight * weight_scaler.unsqueeze(-1)``
  (Linear.forward, Embedding.forward), computed here the same way;
- the rotary tables ``freqs_cis`` / ``local_freqs_cis`` / ``global_freqs_cis`` are buffers, not
  weights, and are skipped; so are the vision tower and projection of multimodal Gemma 3.

The file holds no config: the spec comes from an HF ``config.json`` beside the checkpoint when
there is one, else from the official model whose sizes the tensors have (``converters.presets``),
or the ``preset`` named by the caller. ``tokenizer.model`` is taken from beside the checkpoint.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from converters.presets import find_preset, spec_from_preset, tokenizer_pieces
from gemport.checkpoint import Checkpoint, LazyTensor, dtype_name, expected_shapes
from gemport.errors import CheckpointError, InputError, UnsupportedError
from gemport.spec import GemmaSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SUFFIXES = (".ckpt", ".pt", ".pth")
CONFIG, TOKENIZER = "config.json", "tokenizer.model"
SCALER = "weight_scaler"
_ZIP_MAGIC, _PICKLE_PROTO = b"PK\x03\x04", 0x80  # torch.save's zip container, or a legacy raw pickle

# gemma_pytorch name -> (canonical names, how). "split_qkv" splits rows into q, k, v.
TOP_NAMES = {
    "embedder.weight": (("model.embed_tokens.weight",), "copy"),
    "text_token_embedder.weight": (("model.embed_tokens.weight",), "copy"),
    "model.norm.weight": (("model.norm.weight",), "copy"),
}
_LAYER_COMMON = {
    "self_attn.qkv_proj.weight": (
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "split_qkv",
    ),
    "self_attn.o_proj.weight": (("self_attn.o_proj.weight",), "copy"),
    "mlp.gate_proj.weight": (("mlp.gate_proj.weight",), "copy"),
    "mlp.up_proj.weight": (("mlp.up_proj.weight",), "copy"),
    "mlp.down_proj.weight": (("mlp.down_proj.weight",), "copy"),
    "input_layernorm.weight": (("input_layernorm.weight",), "copy"),
    "post_attention_layernorm.weight": (("post_attention_layernorm.weight",), "copy"),
}
LAYER_NAMES = {
    "gemma": _LAYER_COMMON,
    "gemma2": _LAYER_COMMON
    | {
        "pre_feedforward_layernorm.weight": (("pre_feedforward_layernorm.weight",), "copy"),
        "post_feedforward_layernorm.weight": (("post_feedforward_layernorm.weight",), "copy"),
    },
}
LAYER_NAMES["gemma3"] = LAYER_NAMES["gemma2"] | {
    "self_attn.query_norm.weight": (("self_attn.q_norm.weight",), "copy"),
    "self_attn.key_norm.weight": (("self_attn.k_norm.weight",), "copy"),
}
# Buffers and the multimodal Gemma 3's vision parts (ref: gemma/gemma3_model.py Gemma3ForMultimodalLM).
_SKIPPED = re.compile(
    r"(local_|global_)?freqs_cis|(siglip_vision_model|mm_soft_embedding_norm|mm_input_projection)\..*"
)
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def sniff(path: Path) -> bool:
    if not (path.is_file() and path.suffix in SUFFIXES):
        return False
    with open(path, "rb") as f:
        head = f.read(4)
    return head == _ZIP_MAGIC or (len(head) > 0 and head[0] == _PICKLE_PROTO)


def read(path: str | Path, preset: str | None = None, keep_padded_vocab: bool = False) -> Checkpoint:
    """Open a gemma_pytorch checkpoint (memory-mapped where torch.load can); tensors are sliced,
    split and dequantized when loaded. ``keep_padded_vocab`` keeps embedding rows past the
    tokenizer's pieces."""
    path = Path(path)
    state = _state_dict(_load(path), path)
    weights, scalers = _weights(state, path)
    family = _family(weights)
    tokenizer = path.parent / TOKENIZER
    spec = _spec(weights, family, path, preset, None if keep_padded_vocab else tokenizer)
    tensors = _lazy_tensors(weights, scalers, spec, path)
    files = {}
    if tokenizer.is_file():
        files[TOKENIZER] = tokenizer.read_bytes()
        config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False}
        files["tokenizer_config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    ckpt = Checkpoint(spec=spec, tensors=tensors, tokenizer_files=files, source=str(path))
    ckpt.check()
    return ckpt


def _load(path: Path) -> Any:
    import torch

    if not path.is_file():
        raise InputError("not a file", path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _ZIP_MAGIC and head[:1] != bytes([_PICKLE_PROTO]):
        raise InputError(f"not a torch checkpoint (starts with {head!r}, not a zip or pickle header)", path)
    if head != _ZIP_MAGIC:
        # The legacy (torch < 1.6) format allocates each storage at the size its pickle states
        # before reading its bytes (ref: torch/serialization.py _legacy_load persistent_load,
        # ``torch.UntypedStorage(nbytes)``), so a hostile file asks for any amount of memory. The zip
        # format maps storages that are records of the file (mmap=True), bounded by its size.
        raise UnsupportedError(
            "a legacy (non-zip) torch file: only the zip format of torch >= 1.6 is read, as gemma_pytorch "
            "saves it (load it in torch and save it again with torch.save)",
            path,
        )
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(
            "torch.load(weights_only=True) refuses it: it pickles objects other than tensors, and "
            f"gemport never unpickles code ({_refusal_reason(str(exc))})",
            path,
        ) from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001
        # torch.load parses the zip container and the pickle opcodes of an untrusted file; a damaged
        # one raises whatever the byte at fault leads to (RuntimeError, EOFError, IndexError,
        # KeyError, TypeError, AttributeError, struct.error, UnicodeDecodeError, ...), none of it
        # a fault of the caller: each is this one-line input error.
        raise InputError(f"not a readable torch checkpoint: {_first_line(exc)}", path) from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _refusal_reason(message: str) -> str:
    """The line of torch's weights_only message that names the refused object (torch 2.6+ puts it
    after a paragraph of advice: "WeightsUnpickler error: Unsupported global: GLOBAL argparse.Namespace
    was not an allowed global by default. Please use ...")."""
    for line in message.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(". Please", 1)[0].strip()
    return message.strip().splitlines()[0] if message.strip() else "UnpicklingError"


def _state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    import torch

    state = obj.get("model_state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state:
        raise InputError("no model_state_dict in the checkpoint", path)
    for name, value in state.items():
        if not isinstance(name, str):
            raise InputError(f"model_state_dict has a key {name!r:.40} that is not a tensor name", path)
        if not isinstance(value, torch.Tensor):
            raise InputError(f"model_state_dict entry {name} is a {type(value).__name__}, not a tensor", path)
        if value.layout != torch.strided or value.is_quantized or value.is_nested:
            raise InputError(f"model_state_dict entry {name} is not a dense tensor ({value.layout})", path)
    return state


# The dtypes gemma_pytorch stores weights in: float, or int8 with a float weight_scaler
# (ref: gemma/model.py Linear/Embedding, quant=True).
_FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def _check_weight(name: str, w: torch.Tensor, path: Path) -> None:
    """A weight is a float or int8 matrix, a norm weight a float vector (ref: gemma/model.py RMSNorm)."""
    dtype = str(w.dtype).removeprefix("torch.")
    ndim = 1 if name.endswith("norm.weight") else 2
    if dtype not in (_FLOAT_DTYPES if ndim == 1 else (*_FLOAT_DTYPES, "int8")) or w.ndim != ndim:
        raise CheckpointError(f"tensor {name} is {w.ndim}-D {dtype}, expected a {ndim}-D float or int8 tensor", path)


def _check_scaler(name: str, scaler: torch.Tensor, w: torch.Tensor, path: Path) -> None:
    dtype = str(scaler.dtype).removeprefix("torch.")
    if dtype not in _FLOAT_DTYPES or tuple(scaler.shape) != tuple(w.shape[:1]):
        raise CheckpointError(
            f"tensor {name.removesuffix('weight')}{SCALER} is {list(scaler.shape)} {dtype}, expected a float "
            f"vector of {w.shape[0]} (one scale per row of the weight)",
            path,
        )


def _weights(state: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights, int8 scalers by weight name); skipped names logged, unknown ones refused."""
    weights, scalers, skipped = {}, {}, 0
    for name, value in state.items():
        if _SKIPPED.fullmatch(name):
            skipped += 1
        elif name.endswith("." + SCALER):
            scalers[name.removesuffix(SCALER) + "weight"] = value
        elif name in TOP_NAMES or ((m := _LAYER_RE.fullmatch(name)) and m.group(2) in LAYER_NAMES["gemma3"]):
            weights[name] = value
        else:
            raise CheckpointError(f"unexpected tensor {name}", path)
    if skipped:
        log.info("%s: skipped %d rotary buffers and vision tensors", path, skipped)
    for name in scalers:
        if name not in weights:
            raise CheckpointError(f"{name.removesuffix('weight')}{SCALER} scales no weight", path)
    for name, w in weights.items():
        _check_weight(name, w, path)
        if name in scalers:
            _check_scaler(name, scalers[name], w, path)
        if (w.dtype == _int8()) != (name in scalers):
            problem = "an int8 weight without a weight_scaler" if name not in scalers else "a scaler for a float weight"
            raise CheckpointError(f"tensor {name}: {problem}", path)
    return weights, scalers


def _int8():
    import torch

    return torch.int8


def _family(weights: dict[str, torch.Tensor]) -> str:
    """gemma3 has query/key norms, gemma2 pre/post-feedforward norms (ref: model.py Gemma2DecoderLayer)."""
    if "model.layers.0.self_attn.query_norm.weight" in weights:
        return "gemma3"
    if "model.layers.0.pre_feedforward_layernorm.weight" in weights:
        return "gemma2"
    return "gemma"


def _embedding(weights: dict[str, torch.Tensor], path: Path) -> torch.Tensor:
    found = [n for n in ("embedder.weight", "text_token_embedder.weight") if n in weights]
    if len(found) != 1:
        raise CheckpointError("missing tensor embedder.weight" if not found else "two embeddings", path)
    return weights[found[0]]


def _spec(
    weights: dict[str, torch.Tensor], family: str, path: Path, preset: str | None, tokenizer: Path | None
) -> GemmaSpec:
    rows = _embedding(weights, path).shape[0]
    config = path.parent / CONFIG
    if config.is_file() and preset is None:
        from converters.hf import read_json

        spec = GemmaSpec.from_hf_config(read_json(config), config)
        if not spec.tie_embeddings:
            raise UnsupportedError("config.json unties the head, but gemma_pytorch ties it to the embedding", config)
        return spec
    layers = {int(m.group(1)) for n in weights if (m := _LAYER_RE.fullmatch(n))}
    if "model.layers.0.mlp.down_proj.weight" not in weights:
        raise CheckpointError("missing tensor model.layers.0.mlp.down_proj.weight", path)
    hidden, intermediate = weights["model.layers.0.mlp.down_proj.weight"].shape
    dims = {"num_layers": max(layers) + 1, "hidden_size": hidden, "intermediate_size": intermediate}
    if family == "gemma3":
        dims["head_dim"] = weights["model.layers.0.self_attn.query_norm.weight"].shape[0]
    found = find_preset(family, dims, preset, path, f"no {CONFIG} beside it")
    return spec_from_preset(found, _vocab_size(rows, tokenizer, path))


def _vocab_size(rows: int, tokenizer: Path | None, path: Path) -> int:
    if tokenizer is None or not tokenizer.is_file():
        return rows
    return tokenizer_pieces(tokenizer, rows, path)


def _lazy_tensors(
    weights: dict[str, torch.Tensor], scalers: dict[str, torch.Tensor], spec: GemmaSpec, path: Path
) -> dict[str, LazyTensor]:
    shapes = expected_shapes(spec)
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    tensors: dict[str, LazyTensor] = {}
    for name, weight in weights.items():
        m = _LAYER_RE.fullmatch(name)
        if m:
            if m.group(2) not in LAYER_NAMES[spec.family]:
                raise CheckpointError(f"unexpected tensor {name} for a {spec.family} model", path)
            prefix, (names, kind) = f"model.layers.{m.group(1)}.", LAYER_NAMES[spec.family][m.group(2)]
        else:
            prefix, (names, kind) = "", TOP_NAMES[name]
        scaler = scalers.get(name)
        dtype = dtype_name(scaler.dtype if scaler is not None else weight.dtype)
        if kind == "split_qkv" and weight.shape[0] != q + 2 * kv:
            raise CheckpointError(
                f"tensor {name} has {weight.shape[0]} rows, expected {q + 2 * kv} (q {q} + k {kv} + v {kv})", path
            )
        bounds = [(0, q), (q, q + kv), (q + kv, q + 2 * kv)] if kind == "split_qkv" else [(0, weight.shape[0])]
        for canonical, (start, end) in zip(names, bounds, strict=True):
            full = prefix + canonical
            if full == "model.embed_tokens.weight":
                end = min(end, spec.vocab_size)  # rows past the vocabulary are padding
            shape = (end - start, *weight.shape[1:])
            load = _loader(weight, scaler, start, end)
            tensors[full] = LazyTensor(full, shape, dtype, load=load)
    return {n: tensors[n] for n in shapes if n in tensors} | {n: t for n, t in tensors.items() if n not in shapes}


def _loader(weight: torch.Tensor, scaler: torch.Tensor | None, start: int, end: int):
    def load() -> torch.Tensor:
        rows = weight[start:end]
        if scaler is None:
            return rows.clone()
        # ref: gemma/model.py Linear.forward / Embedding.forward: weight * weight_scaler.unsqueeze(-1)
        return rows * scaler[start:end].unsqueeze(-1)

    return load
