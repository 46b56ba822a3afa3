"""W4A16 / W8A16 matmul in Triton on TensorRT-LLM's weight-only layouts: ``y = (x * prequant) @ W.T``, the
weight dequantized tile by tile in registers, never as a whole float matrix.

The weight is what a TensorRT-LLM checkpoint stores (converters/trtllm.py, the weight-only section):

- ``weight`` int8: for 4 bits [N / 2, K], signed int4 codes of rows 2j and 2j + 1 in the low and high
  nibble of byte [j, k] (ref: converters/trtllm.py ``pack_int4_rows``, ModelOpt's INT4_AWQ export); for 8
  bits [N, K], one signed code per byte. W4A16_AWQ stores the 4-bit form; W4A16 / W8A16 checkpoints hold
  float weights that trtllm-build quantizes per output channel (``weight_only_record``), whose codes take
  the same two forms here (per channel: ``group`` = K);
- ``scales`` [N, K / group] (``weights_scaling_factor``), in the checkpoint dtype (TensorRT-LLM casts
  ModelOpt's float32 ones to it at load: the caller does so);
- ``prequant`` [K] or None (``prequant_scaling_factor``): multiplied into the activations, rounded to their
  dtype, before the product (ref: TensorRT-LLM's WeightOnlyGroupwiseQuantMatmul plugin applies
  pre_quant_scale to the fp16/bf16 input first).

``W[n, k] = code * scale`` in float32 (exact), rounded to the activation dtype, products accumulated in
float32, y rounded to x's dtype: the arithmetic and the two paths (``_gemm`` for 16 rows and more,
``_gemv`` below) of dequant_matmul.py, whose ``_to`` rounding this reuses.

``reference`` is the pure-torch CPU reference: the codes unpacked by converters/trtllm.py's
``unpack_int4_rows``, dequantized as its QuantizedTensor records are, a float32 matmul.
"""

from __future__ import annotations

import triton
import triton.language as tl

from quantizers.kernels import check_available, on_device
from quantizers.kernels.dequant_matmul import _dot, _to, launch


@triton.jit
def _weight_tile(w_ptr, s_ptr, rn, rk, N, K: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
                 DTYPE: tl.constexpr):  # fmt: skip
    """The dequantized weight W[rn, rk] as a [BN, BK] tile in DTYPE."""
    GROUPS: tl.constexpr = K // GROUP
    inside = (rn < N)[:, None] & (rk < K)[None, :]
    if BITS == 4:
        byte = tl.load(w_ptr + (rn // 2).to(tl.int64)[:, None] * K + rk[None, :], mask=inside, other=0)
        # the row's nibble to the top of an int32, then an arithmetic shift: the signed code
        code = (byte.to(tl.int32) << (28 - (rn % 2) * 4)[:, None]) >> 28
    else:
        code = tl.load(w_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :], mask=inside, other=0).to(tl.int32)
    scale = tl.load(s_ptr + rn.to(tl.int64)[:, None] * GROUPS + (rk // GROUP)[None, :], mask=inside, other=0.0)
    return _to(code.to(tl.float32) * scale.to(tl.float32), DTYPE)


@triton.jit
def _activations(x_ptr, p_ptr, rows, rk, row_mask, K: tl.constexpr, HAS_PREQUANT: tl.constexpr):
    """x[rows, rk] (a [BM, BK] tile, or a [BK] row when ``rows`` is a scalar), times the pre-quant scale
    rounded back to x's dtype."""
    x = tl.load(x_ptr + rows * K + rk, mask=row_mask & (rk < K), other=0.0)
    if HAS_PREQUANT:
        p = tl.load(p_ptr + rk, mask=rk < K, other=0.0)
        x = _to(x.to(tl.float32) * p.to(tl.float32), x_ptr.dtype.element_ty)
    return x


@triton.jit
def _gemm(x_ptr, w_ptr, s_ptr, p_ptr, y_ptr, M, N, K: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
          HAS_PREQUANT: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BM: tl.constexpr,
          BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = _activations(x_ptr, p_ptr, rm.to(tl.int64)[:, None], rk[None, :], (rm < M)[:, None], K, HAS_PREQUANT)
        w = _weight_tile(w_ptr, s_ptr, rn, rk, N, K, GROUP, BITS, x.dtype)
        acc = _dot(x, w, acc, PRECISION, DOT_F32)
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], _to(acc, y_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])  # fmt: skip


@triton.jit
def _gemv(x_ptr, w_ptr, s_ptr, p_ptr, y_ptr, N, K: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
          HAS_PREQUANT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    m = tl.program_id(0)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BN,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = _activations(x_ptr, p_ptr, m.to(tl.int64), rk, True, K, HAS_PREQUANT)
        w = _weight_tile(w_ptr, s_ptr, rn, rk, N, K, GROUP, BITS, x.dtype)
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    tl.store(y_ptr + m.to(tl.int64) * N + rn, _to(acc, y_ptr.dtype.element_ty), mask=rn < N)


def _check(x, weight, scales, prequant, bits: int) -> tuple[int, int, int, int]:
    import torch

    if bits not in (4, 8):
        raise ValueError(f"W{bits}A16 is not one of W4A16, W8A16")
    if weight.dtype != torch.int8:
        raise ValueError(f"the weight is {weight.dtype}, TensorRT-LLM stores int8")
    M, K = x.shape
    N = scales.shape[0]
    want = [N // 2 if bits == 4 else N, K]
    if list(weight.shape) != want or (bits == 4 and N % 2):
        raise ValueError(f"weight of shape {list(weight.shape)} does not fit {N} rows of {K} columns at {bits} bits")
    if scales.ndim != 2 or K % scales.shape[1]:
        raise ValueError(f"scales of shape {list(scales.shape)} do not fit a [{N}, {K}] weight")
    if prequant is not None and list(prequant.shape) != [K]:
        raise ValueError(f"pre-quant scale of shape {list(prequant.shape)} does not fit {K} input columns")
    return M, N, K, K // scales.shape[1]


def matmul(x, weight, scales, prequant=None, bits: int = 4, path: str | None = None):
    """``(x * prequant) [M, K] @ W.T`` -> [M, N] in x's dtype (fp16/bf16/fp32), W the TensorRT-LLM weight
    (module docstring). ``path`` "gemm" or "gemv" forces one (default: GEMV below 16 rows). ValueError for
    shapes that do not fit; RuntimeError where no kernel can run."""
    check_available()
    M, N, K, group = _check(x, weight, scales, prequant, bits)
    x, weight, scales = on_device(x), on_device(weight), on_device(scales)
    p = on_device(prequant) if prequant is not None else scales  # unread without HAS_PREQUANT
    meta = {"K": K, "GROUP": group, "BITS": bits, "HAS_PREQUANT": prequant is not None}
    return launch(_gemm, _gemv, x, (weight, scales, p), N, meta, path)


def stored_weight(codes, bits: int):
    """The int8 weight a checkpoint stores for int4/int8 codes [N, K]: rows packed in nibble pairs for 4 bits
    (converters/trtllm.py ``pack_int4_rows``), the codes themselves for 8."""
    from converters.trtllm import pack_int4_rows

    return pack_int4_rows(codes).contiguous() if bits == 4 else codes.contiguous()


def dequantized(weight, scales, bits: int = 4, dtype=None):
    """The float weight [N, K] of the stored tensors, in ``dtype`` (default the scales'), by
    converters/trtllm.py's own rules (``unpack_int4_rows``, a QuantizedTensor's ``code * scale``)."""

    from converters.trtllm import unpack_int4_rows
    from quantizers.record import QuantFormat, QuantizedTensor

    codes = unpack_int4_rows(weight.cpu()) if bits == 4 else weight.cpu()
    K = codes.shape[1]
    group = K // scales.shape[1]
    fmt = QuantFormat(bits, None if group == K else group, True, "f32")
    w = QuantizedTensor(codes, scales.cpu().float(), None, fmt).dequantize("f32")  # exact in float32
    return w.to(dtype or scales.dtype)


def reference(x, weight, scales, prequant=None, bits: int = 4):
    """float32 [M, N]: x times the pre-quant scale (rounded to x's dtype) times the dequantized weight
    (rounded to x's dtype), on the CPU."""
    x = x.cpu()
    if prequant is not None:
        x = (x.float() * prequant.cpu().float()).to(x.dtype)
    w = dequantized(weight, scales, bits, x.dtype)
    return x.float() @ w.float().T
