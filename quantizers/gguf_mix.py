"""Which GGML type each tensor of a GGUF gets, for a whole-file type (llama.cpp's "ftype").

The rules are llama.cpp's, so that a file made here has the same per-tensor types as
llama-quantize makes (ref: llama.cpp src/llama-quant.cpp llama_tensor_get_type,
llama_tensor_get_type_impl, tensor_type_fallback, tensor_allows_quantization). Only the
parts that apply to dense Gemma models are kept: no experts, no fused QKV, no IQ types.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# ftype name -> (llama_ftype number written as general.file_type, default ggml type name).
# ref: llama.h enum llama_ftype; llama-quant.cpp llama_ftype_get_default_type.
FTYPES: dict[str, tuple[int, str]] = {
    "f32": (0, "F32"),
    "f16": (1, "F16"),
    "bf16": (32, "BF16"),
    "q8_0": (7, "Q8_0"),
    "q4_0": (2, "Q4_0"),
    "q4_1": (3, "Q4_1"),
    "q5_0": (8, "Q5_0"),
    "q5_1": (9, "Q5_1"),
    "q2_k": (10, "Q2_K"),
    "q3_k_s": (11, "Q3_K"),
    "q3_k_m": (12, "Q3_K"),
    "q3_k_l": (13, "Q3_K"),
    "q4_k_s": (14, "Q4_K"),
    "q4_k_m": (15, "Q4_K"),
    "q5_k_s": (16, "Q5_K"),
    "q5_k_m": (17, "Q5_K"),
    "q6_k": (18, "Q6_K"),
}
# llama-quantize's aliases (ref: tools/quantize/quantize.cpp QUANT_OPTIONS: "Q3_K" is Q3_K_M, ...)
ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}
UNQUANTIZED = ("F32", "F16", "BF16")
_BLOCK = {"Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32}  # K types: 256
# A 256-block type that does not fit a row falls back to a 32-block one (ref: tensor_type_fallback).
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_LAYER = re.compile(r"blk\.(\d+)\.")


def ftype_of(name: str) -> str:
    """The canonical ftype name of ``name`` (case-insensitive, aliases resolved); ValueError if unknown."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in FTYPES:
        raise ValueError(f"unknown GGUF type {name!r} (known: {', '.join(list(FTYPES) + list(ALIASES))})")
    return key


def block_size(qtype: str) -> int:
    return 1 if qtype in UNQUANTIZED else _BLOCK.get(qtype, 256)


@dataclass(frozen=True)
class TensorPlan:
    """The type chosen for one tensor, and the type llama.cpp's rules wanted before a row-length fallback."""

    name: str
    qtype: str
    wanted: str


def plan_types(
    tensors: list[tuple[str, tuple[int, ...]]],
    ftype: str,
    n_layers: int,
    n_gqa: int,
    pure: bool = False,
    has_imatrix: bool = False,
) -> list[TensorPlan]:
    """One TensorPlan per (GGUF name, shape in ne order) for whole-file type ``ftype``.

    ``tensors`` must be in llama.cpp's order (see ``llamacpp_order``): the attn_v and layer
    counters advance in that order. ``pure`` gives every quantizable tensor the default type,
    as llama-quantize --pure does.
    """
    ftype = ftype_of(ftype)
    default = FTYPES[ftype][1]
    tied = not any(name == "output.weight" for name, _ in tensors)
    n_attn_v = sum(1 for name, _ in tensors if name.endswith("attn_v.weight"))
    state = {"attn_v": 0, "ffn_down": 0, "has_imatrix": has_imatrix}
    plans = []
    for name, shape in tensors:
        if not _allows_quantization(name, shape) or default in UNQUANTIZED:
            qtype = default if _allows_quantization(name, shape) else "F32"
            plans.append(TensorPlan(name, qtype, qtype))
            continue
        wanted = default if pure else _mix_type(name, shape, ftype, default, tied, n_layers, n_gqa, n_attn_v, state)
        if pure:
            _count(name, state)
        plans.append(TensorPlan(name, _fallback(wanted, shape[0]), wanted))
    return plans


def llamacpp_order(names: list[str]) -> list[str]:
    """llama.cpp's tensor order: non-layer tensors first, then by layer, by name within each
    (ref: llama-model-loader.h weight_name_comparer)."""

    def key(name: str) -> tuple[int, str]:
        m = _LAYER.match(name)
        return (int(m.group(1)) if m else -1, name)

    return sorted(names, key=key)


def _allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    # ref: tensor_allows_quantization: 2-D+ tensors named *weight, never norms
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def _fallback(qtype: str, ncols: int) -> str:
    """ref: tensor_type_fallback: a type whose block does not divide the row length falls back
    to a 32-block type, and to F16 if even that does not fit."""
    if ncols % block_size(qtype) == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, qtype)
    return qtype if ncols % block_size(qtype) == 0 else "F16"


def _use_more_bits(i: int, n: int) -> bool:
    # ref: llama_tensor_get_type_impl use_more_bits
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _count(name: str, state: dict) -> None:
    for key in ("attn_v", "ffn_down"):
        if name.endswith(f"{key}.weight"):
            state[key] += 1


def _mix_type(
    name: str,
    shape: tuple[int, ...],
    ftype: str,
    qtype: str,
    tied: bool,
    n_layers: int,
    n_gqa: int,
    n_attn_v: int,
    state: dict,
) -> str:
    """ref: llama_tensor_get_type_impl, for dense models and the non-IQ ftypes."""
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        # The output (or the tied embedding that serves as it) gets Q6_K, or Q8_0 if its rows do not fit.
        if shape[0] % block_size(qtype) != 0:
            return "Q8_0"
        return qtype if qtype == "Q8_0" else "Q6_K"
    if name == "token_embd.weight":
        return qtype
    if name.endswith("attn_v.weight"):
        i = state["attn_v"]
        state["attn_v"] += 1
        if ftype == "q2_k":
            return "Q4_K" if n_gqa >= 4 else "Q3_K"
        if ftype == "q3_k_m":
            return "Q5_K" if i < 2 else "Q4_K"
        if ftype == "q3_k_l":
            return "Q5_K"
        if ftype in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n_attn_v):
            return "Q6_K"
        if ftype == "q4_k_s" and i < 4:
            return "Q5_K"
        return qtype
    if name.endswith("ffn_down.weight"):
        i, n = state["ffn_down"], n_layers
        state["ffn_down"] += 1
        if ftype == "q2_k":
            return "Q3_K"
        if ftype == "q3_k_m":
            return "Q5_K" if i < n // 16 else "Q4_K"
        if ftype == "q3_k_l":
            return "Q5_K"
        if ftype in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n):
            return "Q6_K"
        if ftype == "q4_k_s" and i < n // 8:
            return "Q5_K"
        if ftype in ("q4_0", "q5_0") and i < n // 8 and state.get("has_imatrix"):
            return "Q4_1" if ftype == "q4_0" else "Q5_1"
        return qtype
    if name.endswith("attn_output.weight"):
        return {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K"}.get(ftype, qtype)
    return qtype
