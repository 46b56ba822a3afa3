"""The off-grid demo model: every quantized weight of the demo GGUF re-drawn inside its own bin.

The faithful demo model is the dequantized Q4_K_M file, so each weight sits exactly on the
grid of its tensor's original type; re-quantizing onto the same grid is then almost free and
quality comparisons reward matching the old grid. Here each such weight is replaced by a value
drawn uniformly inside its quantization bin: the interval of width one step centred on the
dequantized value, the step taken from that block's own scales. Given the code, the original
weight lay somewhere in that bin, so the draw keeps the model's statistics without the grid.

Each weight is decoded as ``value = scale * code + offset`` (float32, as ggml dequantizes), the
draw is stored in bf16, and a draw that bf16 rounding pushes out of its bin is pulled back
towards the centre until ``rint((x - offset) / scale) == code`` holds again with a margin.
F32 tensors (the norms) are kept. Seeded per tensor, so the result is bit-reproducible.
"""

from __future__ import annotations

import functools
import logging
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gemport.checkpoint import Checkpoint, LazyTensor
from gemport.errors import UnsupportedError

if TYPE_CHECKING:
    import torch
    from gguf import ReaderTensor

log = logging.getLogger(__name__)

SEED = 0
ROWS_PER_CHUNK = 8192
# A redrawn value keeps |x - centre| <= MARGIN * step, so any float32 re-quantization of it
# (ggml multiplies by 1/d, we divide) lands on the same code.
MARGIN = 0.4995
SHRINK_STEPS = 12


def grid(blocks: np.ndarray, qtype: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale, offset, code) per weight of raw GGUF blocks [n_blocks, block_bytes].

    Each is [n_blocks, weights_per_block]; ``scale * code + offset`` is the dequantized value,
    computed in float32 in the order ggml's dequantize_row_* does.
    """
    return _decoder(qtype)(np.ascontiguousarray(blocks))


def _decoder(qtype: int):
    from gguf import GGMLQuantizationType as Q

    name = Q(qtype).name
    if name not in _DECODERS:
        raise UnsupportedError(f"off-grid redraw has no decoder for tensor type {name} (has: {', '.join(_DECODERS)})")
    return _DECODERS[name]


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes -> [n, 32] codes: low nibbles are weights 0..15, high ones 16..31
    (ref: ggml-quants.c dequantize_row_q4_0)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int32)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """The 32 fifth bits of a Q5_0/Q5_1 block, bit j for weight j (ref: ggml-quants.c dequantize_row_q5_0)."""
    bits = np.ascontiguousarray(qh).view(np.uint32)
    return ((bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32)


def _per_weight(per_block: np.ndarray, n: int) -> np.ndarray:
    return np.broadcast_to(per_block.reshape(-1, 1), (per_block.shape[0], n))


def _q8_0(b: np.ndarray):  # d f16, qs int8[32]; y = d * q
    d = _f16(b[:, :2])
    code = b[:, 2:].view(np.int8).astype(np.int32)
    return _per_weight(d, 32), np.zeros_like(code, np.float32), code


def _q4_0(b: np.ndarray):  # d f16, qs[16]; y = d * (q - 8)
    return _per_weight(_f16(b[:, :2]), 32), np.zeros((len(b), 32), np.float32), _nibbles(b[:, 2:]) - 8


def _q4_1(b: np.ndarray):  # d f16, m f16, qs[16]; y = d * q + m
    return _per_weight(_f16(b[:, :2]), 32), _per_weight(_f16(b[:, 2:4]), 32), _nibbles(b[:, 4:])


def _q5_0(b: np.ndarray):  # d f16, qh u32, qs[16]; y = d * (q - 16)
    code = _nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4)
    return _per_weight(_f16(b[:, :2]), 32), np.zeros((len(b), 32), np.float32), code - 16


def _q5_1(b: np.ndarray):  # d f16, m f16, qh u32, qs[16]; y = d * q + m
    code = _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4)
    return _per_weight(_f16(b[:, :2]), 32), _per_weight(_f16(b[:, 2:4]), 32), code


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """6-bit scale and min of the 8 sub-blocks of a Q4_K/Q5_K block (ref: ggml-quants.c get_scale_min_k4)."""
    s = scales.astype(np.int32)
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mn


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-weight step d * sc and offset -(dmin * m) of a Q4_K/Q5_K block (sub-blocks of 32)."""
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    step = d * sc.astype(np.float32)
    offset = -(dmin * mn.astype(np.float32))
    return np.repeat(step, 32, axis=1), np.repeat(offset, 32, axis=1)


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 128] -> [n, 256]: each 32 bytes hold sub-block 2c in low and 2c+1 in high nibbles
    (ref: ggml-quants.c dequantize_row_q4_K)."""
    q = qs.reshape(len(qs), 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(len(qs), 256).astype(np.int32)


def _q4_k(b: np.ndarray):  # d, dmin f16, scales[12], qs[128]; y = d*sc*q - dmin*m
    step, offset = _k_scales(b)
    return step, offset, _k_low_nibbles(b[:, 16:])


def _q5_k(b: np.ndarray):  # d, dmin f16, scales[12], qh[32], qs[128] (ref: dequantize_row_q5_K)
    step, offset = _k_scales(b)
    high = b[:, 16:48].reshape(len(b), 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    return step, offset, _k_low_nibbles(b[:, 48:]) | ((high & 1).reshape(len(b), 256).astype(np.int32) << 4)


def _q6_k(b: np.ndarray):  # ql[128], qh[64], scales int8[16], d f16; y = d*sc*(q - 32) (ref: dequantize_row_q6_K)
    n = len(b)
    ql = b[:, :128].reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(n, 2, 4, 32)  # per half: ql[l], ql[l+32], ql[l]>>4, ql[l+32]>>4
    qh = b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    code = (ql.astype(np.int32) | ((qh & 3).astype(np.int32) << 4)).reshape(n, 256) - 32
    d = _f16(b[:, 208:210])
    step = np.repeat(d * b[:, 192:208].view(np.int8).astype(np.float32), 16, axis=1)
    return step, np.zeros((n, 256), np.float32), code


_DECODERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1}
_DECODERS |= {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


# --- the redraw -----------------------------------------------------------------------------


def redraw(blocks: np.ndarray, qtype: int, rng: np.random.Generator) -> torch.Tensor:
    """bf16 weights [n_blocks * block] drawn uniformly inside each weight's bin, clipped to it."""
    import torch

    step, offset, code = grid(blocks, qtype)
    centre = step * code.astype(np.float32) + offset
    u = rng.random(centre.shape, dtype=np.float32) - np.float32(0.5)
    x = _bf16(centre + u * step)
    for _ in range(SHRINK_STEPS):  # bf16 rounding may leave the bin: move those draws towards the centre
        bad = ~in_bin(_f32(x), step, offset, code)
        if not bad.any():
            break
        u = np.where(bad, u * np.float32(0.5), u)
        x = torch.where(torch.from_numpy(bad), _bf16(centre + u * step), x)
    else:
        bad = ~in_bin(_f32(x), step, offset, code)
        x = torch.where(torch.from_numpy(bad), _bf16(centre), x)
    return x.reshape(-1)


def in_bin(x: np.ndarray, step: np.ndarray, offset: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Whether ``x`` re-quantizes to ``code`` with the block's own scales, with MARGIN to spare.

    A zero step (an all-zero block) admits only the centre itself.
    """
    x64, step64 = x.astype(np.float64), step.astype(np.float64)
    pos = (x64 - offset) / np.where(step64 == 0, 1.0, step64) - code
    return np.where(step64 == 0, x64 == offset, np.abs(pos) <= MARGIN)


def _bf16(x: np.ndarray) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16)


def _f32(x: torch.Tensor) -> np.ndarray:
    import torch

    return x.to(torch.float32).numpy()


def tensor_rng(name: str, seed: int = SEED) -> np.random.Generator:
    """One generator per tensor, keyed by its canonical name, so tensors can be drawn in any order."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _load_offgrid(t: ReaderTensor, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    import torch
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[t.tensor_type]
    rows = np.asarray(t.data).reshape(-1, t.data.shape[-1])
    rng = tensor_rng(name, seed)
    parts = []
    for start in range(0, len(rows), ROWS_PER_CHUNK):
        chunk = np.asarray(rows[start : start + ROWS_PER_CHUNK]).reshape(-1, size)
        parts.append(redraw(chunk, t.tensor_type, rng))
    return torch.cat(parts).reshape(shape)


def offgrid_checkpoint(gguf_path: str | Path, seed: int = SEED) -> Checkpoint:
    """The GGUF at ``gguf_path`` read as a Checkpoint whose quantized tensors are redrawn (bf16)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader

    from converters import gguf

    ckpt = gguf.read(gguf_path)
    reader = GGUFReader(gguf_path)
    plain = (Q.F32, Q.F16, Q.BF16)
    tensors = dict(ckpt.tensors)
    redrawn = 0
    for t in reader.tensors:
        if t.tensor_type in plain:
            continue
        name, _ = gguf.canonical_name(t.name, ckpt.spec.family, Path(gguf_path))
        _decoder(t.tensor_type)  # refuse a type with no decoder before anything is written
        shape = tensors[name].shape
        tensors[name] = LazyTensor(name, shape, "bf16", functools.partial(_load_offgrid, t, name, shape, seed))
        redrawn += 1
    log.info("%d quantized tensors redrawn inside their bins, %d kept", redrawn, len(tensors) - redrawn)
    return Checkpoint(
        spec=ckpt.spec,
        tensors=tensors,
        tokenizer_files=ckpt.tokenizer_files,
        generation_config=ckpt.generation_config,
        source=f"{gguf_path} (off-grid, seed {seed})",
    )
