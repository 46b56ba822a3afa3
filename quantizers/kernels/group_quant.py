"""Group-wise int4/int8 quantize-and-pack in Triton: the records of quantizers/rtn.py, bit for bit.

``quantize_weight(w, fmt)`` returns the QuantizedTensor ``quantizers.rtn.quantize_weight`` makes (the
CPU reference): int8 codes [out, in], scales [out, groups] in the format's scale dtype, int8 zero points
[out, groups] when asymmetric; ``fmt.group_size`` 32/64/128 or None (one group per output row, the
per-channel int8 of compressed-tensors' W8A16). Two kernels per weight:

1. ``_group_range``: per (row, group) the float32 minimum clamped to <= 0 and maximum clamped to >= 0;
2. ``_group_codes``: ``round(clamp(x / scale + zero, qmin, qmax))`` per element, half to even.

Between them the per-group scalars (the scale rounded to its dtype, the epsilon for an all-zero group,
the zero point from the unrounded scale) are computed by ``quantizers.rtn.group_params`` itself on the
[out, groups] tensors, so that half is shared code, not a copy.

``pack_int32(codes, bits)`` packs int8 codes as compressed-tensors stores them (``weight_packed``; ref:
compressed_tensors/compressors/pack_quantized/helpers.py, pack_to_int32: codes offset by 2**(bits-1),
32 / bits codes per int32 word, the first in the lowest bits), for bits 4 and 8 and rows of a multiple
of 32 / bits codes.
"""

from __future__ import annotations

import triton
import triton.language as tl

from quantizers.kernels import FP_OPTIONS, check_available, on_device
from quantizers.record import QuantFormat, QuantizedTensor

MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (v + MAGIC) - MAGIC rounds a float32 |v| < 2**22 half to even


@triton.jit
def _group_range(w_ptr, lo_ptr, hi_ptr, cols, groups, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, g): min(0, min x) and max(0, max x) over x = w[row, g*GROUP : (g+1)*GROUP] in float32."""
    row = tl.program_id(0)
    g = tl.program_id(1)
    base = row.to(tl.int64) * cols + g * GROUP
    lo = tl.zeros((BLOCK,), dtype=tl.float32)
    hi = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, GROUP, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(w_ptr + base + offs, mask=offs < GROUP, other=0.0).to(tl.float32)  # 0 never moves either
        lo = tl.minimum(lo, x)
        hi = tl.maximum(hi, x)
    tl.store(lo_ptr + row * groups + g, tl.min(lo, axis=0))
    tl.store(hi_ptr + row * groups + g, tl.max(hi, axis=0))


@triton.jit
def _group_codes(
    w_ptr, scale_ptr, zero_ptr, codes_ptr, cols, groups, qmin, qmax,
    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program (row, g): codes = round_half_even(clamp(x / scale (+ zero), qmin, qmax)) as int8."""
    row = tl.program_id(0)
    g = tl.program_id(1)
    base = row.to(tl.int64) * cols + g * GROUP
    scale = tl.load(scale_ptr + row * groups + g)
    if HAS_ZERO:
        zero = tl.load(zero_ptr + row * groups + g).to(tl.float32)
    for start in range(0, GROUP, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < GROUP
        x = tl.load(w_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.math.div_rn(x, scale)
        if HAS_ZERO:
            v = v + zero
        v = tl.minimum(tl.maximum(v, qmin), qmax)
        v = (v + MAGIC) - MAGIC
        tl.store(codes_ptr + base + offs, v.to(tl.int8), mask=mask)


@triton.jit
def _pack_int32(codes_ptr, out_ptr, cols, words, BITS: tl.constexpr, PER_WORD: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, block of words): word j = OR_i ((code[j*PER_WORD + i] + 2**(BITS-1)) << (i*BITS))."""
    row = tl.program_id(0)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < words
    word = tl.zeros((BLOCK,), dtype=tl.int32)
    for i in tl.static_range(PER_WORD):
        c = tl.load(codes_ptr + row.to(tl.int64) * cols + j * PER_WORD + i, mask=mask, other=0).to(tl.int32)
        word = word | (((c + (1 << (BITS - 1))) & ((1 << BITS) - 1)) << (i * BITS))
    tl.store(out_ptr + row.to(tl.int64) * words + j, word, mask=mask)


def _block(group: int) -> int:
    return min(1024, triton.next_power_of_2(group))


def quantize_weight(w, fmt: QuantFormat, full_range: bool = False) -> QuantizedTensor:
    """The RTN record of ``w [out, in]`` (float32/bf16/f16) computed by the kernels on the kernels' device
    (tensors returned there). ValueError if the group size does not divide ``in``; RuntimeError where no
    kernel can run (quantizers.kernels.check_available)."""
    import torch

    from quantizers.rtn import group_params

    check_available()
    rows, cols = w.shape
    group = cols if fmt.group_size is None else fmt.group_size
    if cols % group:
        raise ValueError(f"group size {group} does not divide the row length {cols}")
    groups = cols // group
    w = on_device(w)
    lo = torch.empty((rows, groups), dtype=torch.float32, device=w.device)
    hi = torch.empty_like(lo)
    grid = (rows, groups)
    _group_range[grid](w, lo, hi, cols, groups, GROUP=group, BLOCK=_block(group), **FP_OPTIONS)
    scale, zero = group_params(lo, hi, fmt, full_range)
    qmin, qmax = fmt.code_range()
    codes = torch.empty((rows, cols), dtype=torch.int8, device=w.device)
    scale32 = scale.to(torch.float32).contiguous()
    zero_arg = zero.contiguous() if zero is not None else scale32  # unread when HAS_ZERO is False
    _group_codes[grid](
        w, scale32, zero_arg, codes, cols, groups, float(qmin), float(qmax),
        GROUP=group, HAS_ZERO=zero is not None, BLOCK=_block(group), **FP_OPTIONS,
    )  # fmt: skip
    return QuantizedTensor(codes, scale, zero, fmt)


def pack_int32(codes, bits: int):
    """int32 [out, ceil(in * bits / 32)] words of int8 ``codes [out, in]``, as compressed-tensors'
    pack_to_int32 makes them; bits 4 or 8, ``in`` a multiple of 32 / bits (ValueError otherwise)."""
    import torch

    check_available()
    if bits not in (4, 8):
        raise ValueError(f"packing is written for 4 and 8 bits, not {bits}")
    per_word = 32 // bits
    rows, cols = codes.shape
    if cols % per_word:
        raise ValueError(f"rows of {cols} codes do not fill whole int32 words of {per_word}")
    codes = on_device(codes)
    words = cols // per_word
    out = torch.empty((rows, words), dtype=torch.int32, device=codes.device)
    block = min(256, triton.next_power_of_2(words))
    _pack_int32[(rows, triton.cdiv(words, block))](codes, out, cols, words, BITS=bits, PER_WORD=per_word, BLOCK=block)
    return out
