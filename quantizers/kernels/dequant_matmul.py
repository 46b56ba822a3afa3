"""W4A16 / W8A16 matmul in Triton on compressed-tensors' packed weights: ``y = x @ W.T``, the weight
dequantized tile by tile in registers, never as a whole float matrix.

The weight is a compressed-tensors pack-quantized record as stored (ref: compressed_tensors/compressors/
pack_quantized/helpers.py, pack_to_int32; tests/test_compressed_tensors.py reads such folders):

- ``packed`` int32 [N, K * bits / 32]: codes along K, 32 / bits per word, the first in the lowest bits,
  each stored as ``code + 2**(bits-1)``;
- ``scales`` [N, K / group] (bf16/f16/f32), one per group of ``group`` input columns (``group`` = K: per
  output channel, the W8A16 of compressed-tensors);
- ``zeros`` int32 [ceil(N * bits / 32), K / group] or None: asymmetric zero points, packed the same way
  along N.

``W[n, k] = (code - zero) * scale`` is computed in float32 (exact: a small integer times a 16-bit
scale), rounded to the activation dtype (as a serving stack that dequantizes into it holds the weight),
and multiplied with the activations, accumulated in float32; y is rounded to x's dtype. Activations
fp16, bf16 or fp32 (fp32 products in IEEE precision, not TF32). Roundings to bf16 are done in integer
arithmetic, so they are the GPU's round-to-nearest-even under Triton's CPU interpreter too (which
truncates float32 -> bf16 and fp16 conversions); fp16 ones use the conversion, so CI checks fp16
activations by compiling them only, and the GPU script by running them. Two paths:

- ``_gemm``: a BM x BN tile of y per program, tl.dot over BK-wide slices of K (prefill and validation
  batches, M >= 16);
- ``_gemv``: BN outputs of one row of x per program, a multiply and a row sum per BK slice (decode,
  M < 16, where tl.dot's minimum tile of 16 rows would be mostly padding).

``reference`` is the pure-torch CPU reference: compressed-tensors' own unpack_from_int32, the same
dequantization, a float32 matmul.
"""

from __future__ import annotations

import triton
import triton.language as tl

from quantizers.kernels import FP_OPTIONS, INTERPRET, check_available, on_device

GEMV_MAX_ROWS = 16  # below this many rows of x, the GEMV path


@triton.jit
def _weight_tile(w_ptr, s_ptr, z_ptr, rn, rk, N, K: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
                 HAS_ZERO: tl.constexpr, DTYPE: tl.constexpr):  # fmt: skip
    """The dequantized weight W[rn, rk] as a [BN, BK] tile in DTYPE."""
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    GROUPS: tl.constexpr = K // GROUP
    inside = (rn < N)[:, None] & (rk < K)[None, :]
    word = tl.load(w_ptr + rn.to(tl.int64)[:, None] * (K // PER) + (rk // PER)[None, :], mask=inside, other=0)
    code = (word >> ((rk % PER) * BITS)[None, :]) & MASK
    g = rk // GROUP
    scale = tl.load(s_ptr + rn.to(tl.int64)[:, None] * GROUPS + g[None, :], mask=inside, other=0.0)
    if HAS_ZERO:
        zword = tl.load(z_ptr + (rn // PER).to(tl.int64)[:, None] * GROUPS + g[None, :], mask=inside, other=0)
        zero = (zword >> ((rn % PER) * BITS)[:, None]) & MASK
    else:
        zero = 1 << (BITS - 1)
    return _to(((code - zero).to(tl.float32) * scale.to(tl.float32)), DTYPE)


@triton.jit
def _to(x, DTYPE: tl.constexpr):
    """float32 ``x`` rounded to DTYPE, to nearest even. bf16 by integer arithmetic (exact wherever it
    runs: Triton 3.6's interpreter truncates float32 -> bf16), fp16 by the conversion (round to nearest
    even on the GPU)."""
    if DTYPE == tl.bfloat16:
        b = x.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536  # finite inputs; the upper half is the bf16
        return b.to(tl.float32, bitcast=True).to(tl.bfloat16)  # exact: the low half is zero
    return x.to(DTYPE)


@triton.jit
def _dot(x, w, acc, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """``acc + x @ w.T`` for a [BM, BK] x and a [BN, BK] w tile, accumulated in float32."""
    if DOT_F32:  # the interpreter's dot mishandles bf16 (stored as uint16): the same products in fp32
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)


@triton.jit
def _gemm(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
          HAS_ZERO: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BM: tl.constexpr,
          BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :], mask=(rm < M)[:, None] & (rk < K)[None, :],
                    other=0.0)  # fmt: skip
        w = _weight_tile(w_ptr, s_ptr, z_ptr, rn, rk, N, K, GROUP, BITS, HAS_ZERO, x.dtype)
        acc = _dot(x, w, acc, PRECISION, DOT_F32)
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], _to(acc, y_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])  # fmt: skip


@triton.jit
def _gemv(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
          HAS_ZERO: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    m = tl.program_id(0)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BN,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + m.to(tl.int64) * K + rk, mask=rk < K, other=0.0)
        w = _weight_tile(w_ptr, s_ptr, z_ptr, rn, rk, N, K, GROUP, BITS, HAS_ZERO, x.dtype)
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    tl.store(y_ptr + m.to(tl.int64) * N + rn, _to(acc, y_ptr.dtype.element_ty), mask=rn < N)


def _check(x, packed, scales, zeros, bits: int) -> tuple[int, int, int, int]:
    if bits not in (4, 8):
        raise ValueError(f"W{bits}A16 is not one of W4A16, W8A16")
    M, K = x.shape
    N, words = packed.shape
    if words * 32 != K * bits:
        raise ValueError(f"packed weight of {words} int32 words per row holds {words * 32 // bits} columns, x has {K}")
    if scales.shape[0] != N or K % scales.shape[1]:
        raise ValueError(f"scales of shape {list(scales.shape)} do not fit a [{N}, {K}] weight")
    if zeros is not None and list(zeros.shape) != [-(-N * bits // 32), scales.shape[1]]:
        raise ValueError(f"zero points of shape {list(zeros.shape)} do not fit {N} rows of {scales.shape[1]} groups")
    return M, N, K, K // scales.shape[1]


def matmul(x, packed, scales, zeros=None, bits: int = 4, path: str | None = None):
    """``x [M, K] @ W.T`` -> [M, N] in x's dtype (fp16/bf16/fp32), W the compressed-tensors record
    (module docstring). ``path`` "gemm" or "gemv" forces one (default: GEMV below 16 rows). ValueError for
    shapes that do not fit; RuntimeError where no kernel can run."""
    check_available()
    M, N, K, group = _check(x, packed, scales, zeros, bits)
    x, packed, scales = on_device(x), on_device(packed), on_device(scales)
    zeros = on_device(zeros) if zeros is not None else packed  # unread without HAS_ZERO
    meta = {"K": K, "GROUP": group, "BITS": bits, "HAS_ZERO": zeros is not packed}
    return launch(_gemm, _gemv, x, (packed, scales, zeros), N, meta, path)


def launch(gemm, gemv, x, weight: tuple, N: int, meta: dict, path: str | None):
    """y [M, N] in x's dtype from ``gemm`` or ``gemv`` (their arguments: x, the ``weight`` tensors, y, then
    (M,) N; constexprs ``meta``): GEMV below GEMV_MAX_ROWS rows of x unless ``path`` says "gemm" or "gemv".
    Shared by the compressed-tensors and TensorRT-LLM kernels, whose tiles are the same."""
    import torch

    M = x.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if (path or ("gemv" if M < GEMV_MAX_ROWS else "gemm")) == "gemv":
        bn, bk = 64, 64
        gemv[(M, triton.cdiv(N, bn))](x, *weight, y, N, BN=bn, BK=bk, **meta, **FP_OPTIONS)
        return y
    bm, bn, bk = 32, 64, 64
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 only matters for fp32 inputs
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    gemm[grid](x, *weight, y, M, N, PRECISION=precision, DOT_F32=INTERPRET, BM=bm, BN=bn, BK=bk, **meta, **FP_OPTIONS)
    return y


def dequantized(packed, scales, zeros=None, bits: int = 4, dtype=None):
    """The float weight [N, K] of the record, in ``dtype`` (default the scales'), by compressed-tensors'
    own unpacking: the reference's half that the kernels do tile by tile."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    N, words = packed.shape
    K = words * 32 // bits
    codes = unpack_from_int32(packed.cpu(), bits, torch.Size([N, K])).to(torch.int32)
    group = K // scales.shape[1]
    if zeros is None:
        zero = torch.zeros((N, scales.shape[1]), dtype=torch.int32)
    else:
        zero = unpack_from_int32(zeros.cpu(), bits, torch.Size([N, scales.shape[1]]), packed_dim=0).to(torch.int32)
    w = (codes - zero.repeat_interleave(group, dim=1)).float() * scales.cpu().float().repeat_interleave(group, dim=1)
    return w.to(dtype or scales.dtype)


def reference(x, packed, scales, zeros=None, bits: int = 4):
    """float32 [M, N]: x (as float32) times the dequantized weight rounded to x's dtype, on the CPU."""
    w = dequantized(packed, scales, zeros, bits, x.dtype)
    return x.cpu().float() @ w.float().T
