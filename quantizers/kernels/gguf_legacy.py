"""GGUF Q8_0 and Q4_0 blocks in Triton: the bytes of quantizers/gguf_blocks.py (without an importance
matrix), which are libggml's (ref: ggml-quants.c quantize_row_q8_0_ref, quantize_row_q4_0_ref).

A row of n values is n / 32 blocks; a kernel program takes NB blocks as an [NB, 32] tile and writes
each block's float32 scale d and its 32 levels; the host stores d as fp16 (round to nearest even, as
ggml_compute_fp32_to_fp16) and lays out the bytes with gguf_blocks' own packers (``_pack_q8_0``,
``_pack_q4_0``), so only the arithmetic is re-expressed here:

- Q8_0: d = amax / 127, id = d ? 1/d : 0, q = roundf(x * id) (half away from zero);
- Q4_0: max = the value of largest |x| (the first of them on a tie of +a and -a; +0.0 for an all-zero
  block), d = max / -8, id = d ? 1/d : 0, q = min(15, (int8_t)(x * id + 8.5)), truncated toward zero.

float32 throughout, no FMA (quantizers.kernels: the launch options), divisions IEEE-rounded. Inputs
must be finite (gguf_blocks refuses others); a tensor with a block whose scale is subnormal (all |x|
under about 1.5e-36) is encoded by gguf_blocks instead.
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl
from gguf import GGMLQuantizationType

from quantizers import gguf_blocks
from quantizers.kernels import FP_OPTIONS, check_available, on_device

QK = 32  # values per block, ref: ggml-common.h QK8_0 / QK4_0
NB = 16  # blocks per program


@triton.jit
def _inverse_or_zero(d):
    return tl.where(d != 0, tl.math.div_rn(1.0, tl.where(d != 0, d, 1.0)), 0.0)


@triton.jit
def _q8_0(x_ptr, d_ptr, q_ptr, blocks, NB: tl.constexpr, QK: tl.constexpr):
    b = tl.program_id(0) * NB + tl.arange(0, NB)
    offs = b.to(tl.int64)[:, None] * QK + tl.arange(0, QK)[None, :]
    mask = (b < blocks)[:, None]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.math.div_rn(tl.max(tl.abs(x), axis=1), 127.0)
    v = x * _inverse_or_zero(d)[:, None]
    t = v.to(tl.int32).to(tl.float32)  # trunc: |v| <= 127 and a few ulp
    sign = tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0))
    q = t + tl.where(tl.abs(v - t) >= 0.5, sign, 0.0)  # C roundf
    tl.store(d_ptr + b, d, mask=b < blocks)
    tl.store(q_ptr + offs, q.to(tl.int8), mask=mask)


@triton.jit
def _q4_0(x_ptr, d_ptr, q_ptr, blocks, NB: tl.constexpr, QK: tl.constexpr):
    b = tl.program_id(0) * NB + tl.arange(0, NB)
    lane = tl.arange(0, QK)
    offs = b.to(tl.int64)[:, None] * QK + lane[None, :]
    mask = (b < blocks)[:, None]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    hi = tl.max(x, axis=1)
    lo = tl.min(x, axis=1)
    mx = tl.where(-lo > hi, lo, hi)
    # +a and -a both present: the first of them, as the C scan ``if (amax < fabsf(v))`` keeps it
    first = tl.min(tl.where(tl.abs(x) == hi[:, None], lane[None, :], QK), axis=1)
    at_first = tl.sum(tl.where(lane[None, :] == first[:, None], x, 0.0), axis=1)
    mx = tl.where((hi == -lo) & (hi > 0), at_first, mx)
    mx = tl.where(tl.abs(mx) == 0, 0.0, mx)  # an all-zero block: +0.0 whatever its zeros' signs
    d = tl.math.div_rn(mx, -8.0)
    v = x * _inverse_or_zero(d)[:, None] + 8.5
    q = tl.minimum(v.to(tl.int32), 15)  # (int8_t) truncates toward zero
    tl.store(d_ptr + b, d, mask=b < blocks)
    tl.store(q_ptr + offs, q.to(tl.int8), mask=mask)


_KERNELS = {GGMLQuantizationType.Q8_0: _q8_0, GGMLQuantizationType.Q4_0: _q4_0}
SUPPORTED_TYPES = tuple(_KERNELS)


def block_params(x, qtype: GGMLQuantizationType):
    """(d float32 [blocks], levels int8 [blocks, 32]) of float rows ``x [rows, n]`` (n a multiple of 32),
    on the kernels' device; Q8_0 levels are signed, Q4_0's are 0..15."""
    import torch

    check_available()
    rows, n = x.shape
    if n % QK:
        raise ValueError(f"{GGMLQuantizationType(qtype).name} needs rows of a multiple of {QK} values, got {n}")
    blocks = rows * n // QK
    x = on_device(x)
    d = torch.empty(blocks, dtype=torch.float32, device=x.device)
    q = torch.empty((blocks, QK), dtype=torch.int8, device=x.device)
    _KERNELS[qtype][(triton.cdiv(blocks, NB),)](x, d, q, blocks, NB=NB, QK=QK, **FP_OPTIONS)
    return d, q


def quantize(x, qtype: GGMLQuantizationType) -> np.ndarray:
    """uint8 [rows, bytes_per_row]: the GGUF blocks of float rows ``x [rows, n]``, the bytes of
    ``gguf_blocks.quantize(x, qtype)`` (Q8_0 or Q4_0, no importance matrix)."""
    qtype = GGMLQuantizationType(qtype)
    if qtype not in _KERNELS:
        raise ValueError(f"no Triton kernel for {qtype.name}; these have one: Q8_0, Q4_0")
    d, q = block_params(x, qtype)
    d32 = d.cpu().numpy()
    if ((d32 != 0) & (np.abs(d32) < np.finfo(np.float32).tiny)).any():
        # a subnormal scale: 1/d overflows and C's float -> int8 casts of inf are undefined; libggml's
        # bytes for such a block are what gguf_blocks reproduces on the CPU, so the rows go there
        return gguf_blocks.quantize(np.asarray(x.cpu(), dtype=np.float32), qtype)
    d16 = gguf_blocks._fp16(d32)
    levels = q.cpu().numpy()
    if qtype == GGMLQuantizationType.Q8_0:
        return gguf_blocks._pack_q8_0(x.shape[0], d16, levels)
    return gguf_blocks._pack_q4_0(x.shape[0], d16, levels.view(np.uint8))
