"""The TensorRT-LLM layout matmul kernel (quantizers/kernels/trtllm_matmul.py) and the GPU validation runtime
(validation/runtimes/triton_kernels.py, ``gemport validate --device cuda``), on the CPU through Triton's
interpreter: against their CPU references and against the runtimes that load the artifacts without the
kernels (transformers + compressed-tensors, the TensorRT-LLM layout runtime)."""

from __future__ import annotations

import os

import pytest

# The interpreter is chosen when triton and the kernels are imported; set only for these imports, so
# that child processes of other tests are unaffected (as tests/test_kernels.py does).
_before = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton")
    import torch

    # Triton 3.6 imports gluon when it first mangles an 8-bit tensor argument, and gluon's import asserts
    # the interpreter is on: imported here, while it is.
    import triton.experimental.gluon  # noqa: F401

    from converters import trtllm
    from quantizers import kernels
    from quantizers.kernels import trtllm_matmul
    from quantizers.record import QuantFormat
    from quantizers.rtn import quantize_weight
finally:
    if _before is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _before


def test_the_kernels_run_interpreted():
    assert kernels.INTERPRET and kernels.device() == "cpu"


def _trtllm_weight(n: int, k: int, bits: int, group: int | None, dtype=torch.bfloat16):
    """(stored int8 weight, scales [n, groups] in ``dtype``) of a random weight, as a TensorRT-LLM checkpoint
    holds it: symmetric records, int4 rows packed in nibble pairs."""
    fmt = QuantFormat(bits=bits, group_size=group, symmetric=True, scale_dtype="bf16")
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(4)) * 0.05
    r = quantize_weight(w, fmt)
    return trtllm_matmul.stored_weight(r.codes, bits), r.scales.to(dtype)


TRT_MATMULS = [(4, 32), (4, 128), (4, None), (8, None)]


@pytest.mark.parametrize("bits,group", TRT_MATMULS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("prequant", [False, True], ids=["", "prequant"])
@pytest.mark.parametrize("rows", [3, 20], ids=lambda m: f"M{m}")
def test_trtllm_matmul_matches_the_dequantized_reference(bits, group, dtype, prequant, rows):
    n, k = 96, 256  # N not a multiple of the 64-wide tile: the masked edge runs too
    weight, scales = _trtllm_weight(n, k, bits, group)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(rows, k, generator=g).to(dtype)
    pre = (torch.rand(k, generator=g) + 0.5).to(torch.bfloat16) if prequant else None
    want = trtllm_matmul.reference(x, weight, scales, pre, bits)
    for path in ("gemv", "gemm"):
        got = trtllm_matmul.matmul(x, weight, scales, pre, bits, path=path)
        assert got.shape == (rows, n) and got.dtype == dtype
        err = (got.float() - want).abs().max() / want.abs().max()
        # fp32: float32 sums in another order; bf16: the output rounded to bf16 (2**-8 relative)
        assert err < (1e-5 if dtype == torch.float32 else 2**-8), (path, float(err))


def test_trtllm_reference_dequantizes_as_the_layout_runtime_reads_awq():
    """The reference's weight is converters/trtllm.py's record of the stored tensors: signed nibbles in row
    pairs (-8 and 7 at the ends), times the scale of the row's group."""
    codes = torch.tensor([[-8, 7, 0, 1], [7, -8, -1, 2], [3, -3, 5, -5], [0, 0, 6, -7]], dtype=torch.int8)
    scales = torch.tensor([[0.5, 2.0], [1.0, 0.25], [0.125, 1.0], [4.0, 1.0]], dtype=torch.bfloat16)
    weight = trtllm.pack_int4_rows(codes)
    assert weight.shape == (2, 4) and torch.equal(trtllm.unpack_int4_rows(weight), codes)
    want = codes.float() * scales.float().repeat_interleave(2, dim=1)
    assert torch.equal(trtllm_matmul.dequantized(weight, scales, 4, torch.float32), want)
    got = trtllm_matmul.matmul(torch.eye(4), weight, scales, None, 4, path="gemv")
    assert torch.equal(got, want.T)  # x = I: y = W.T, each weight dequantized exactly


def test_trtllm_matmul_refuses_shapes_that_do_not_fit():
    weight, scales = _trtllm_weight(16, 128, 4, 64)
    with pytest.raises(ValueError, match="does not fit 16 rows of 64 columns"):
        trtllm_matmul.matmul(torch.zeros(2, 64), weight, scales, None, 4)
    with pytest.raises(ValueError, match="pre-quant scale of shape \\[64\\]"):
        trtllm_matmul.matmul(torch.zeros(2, 128), weight, scales, torch.ones(64), 4)
    with pytest.raises(ValueError, match="not one of W4A16, W8A16"):
        trtllm_matmul.matmul(torch.zeros(2, 128), weight, scales, None, 3)
    with pytest.raises(ValueError, match="TensorRT-LLM stores int8"):
        trtllm_matmul.matmul(torch.zeros(2, 128), weight.to(torch.int32), scales, None, 4)
