"""The Triton kernels (quantizers/kernels/) compiled and run on a CUDA GPU against their CPU references:
bit for bit for the quantizers, within GPU tolerances for the matmuls (stated per test). Marked ``gpu``;
skipped, with the reason, where no GPU is visible. ``make test-gpu`` runs this file alone, and
bench/gpu_check.sh runs it on the GPU machine.

The kernels are compiled or interpreted as chosen when quantizers.kernels is first imported
(TRITON_INTERPRET): tests/test_kernels.py imports them interpreted, so in a run of the whole suite on
a GPU machine these tests skip (saying so) rather than run interpreted kernels on CUDA tensors.
Besides torch and triton these tests need numpy and, for the GGUF bytes, gguf (skipped without it).
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

from tests.kernel_helpers import edge_weights


def _not_runnable() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device visible (torch.cuda.is_available() is False): the GPU tests run on a GPU (make test-gpu)"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set: these tests run the kernels compiled for the GPU"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton==3.6.0)"
    return None


WHY_NOT = _not_runnable()
DEV = "cuda"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")]


@pytest.fixture(scope="module")
def kernels():
    from quantizers import kernels

    if kernels.INTERPRET:
        pytest.skip("quantizers.kernels was imported under TRITON_INTERPRET=1 in this process (tests/test_kernels.py): "
                    "run tests/test_gpu.py on its own (make test-gpu)")  # fmt: skip
    assert kernels.device() == DEV
    return kernels


def _fmt(bits: int, group: int | None, symmetric: bool, scale_dtype: str = "bf16"):
    from quantizers.record import QuantFormat

    return QuantFormat(bits=bits, group_size=group, symmetric=symmetric, scale_dtype=scale_dtype)


FORMATS = [(4, 32, True, "bf16"), (4, 64, False, "bf16"), (4, 128, True, "f16"), (4, 128, False, "f32"),
           (8, None, True, "bf16"), (8, 128, False, "f16")]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("spec", FORMATS, ids=str)
@pytest.mark.parametrize("shape", [(37, 640), (256, 3072)], ids=str)  # odd rows, Gemma 3 270M's K; 7B's K
def test_group_quant_on_the_gpu_equals_rtn_on_the_cpu(kernels, dtype, spec, shape):
    from quantizers import rtn
    from quantizers.kernels import group_quant

    fmt = _fmt(*spec)
    w = edge_weights(*shape, dtype)
    got = group_quant.quantize_weight(w, fmt)
    want = rtn.quantize_weight(w, fmt)  # on the CPU
    assert got.codes.device.type == DEV
    assert torch.equal(got.codes.cpu(), want.codes) and torch.equal(got.scales.cpu(), want.scales)
    if fmt.symmetric:
        assert got.zero_points is None
    else:
        assert torch.equal(got.zero_points.cpu(), want.zero_points)
    words = group_quant.pack_int32(got.codes, fmt.bits).cpu()
    assert torch.equal(words, _pack_reference(want.codes, fmt.bits))


def _pack_reference(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' pack_to_int32 in plain torch (ref: compressed_tensors/compressors/pack_quantized/
    helpers.py: codes + 2**(bits-1), 32 / bits a word, the first in the lowest bits); with the package
    installed, the package itself."""
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        return pack_to_int32(codes, bits)
    except ImportError:
        per = 32 // bits
        u = (codes.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
        words = (u.reshape(codes.shape[0], -1, per) << (torch.arange(per) * bits)).sum(-1)
        return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def test_gguf_blocks_on_the_gpu_equal_libggml_bytes(kernels):
    pytest.importorskip("gguf", reason="gguf (the GGUF tables of the CPU encoder) is not installed")
    import numpy as np

    from quantizers import gguf_blocks
    from quantizers.kernels import gguf_legacy

    x = (np.random.default_rng(1).standard_normal((67, 3072)) * 0.1).astype(np.float32)
    x[0, :32] = 0.0
    x[1, :32] = 0.0
    x[1, 3], x[1, 7] = 0.5, -0.5  # a tie, + first
    x[2, :32] = np.arange(32, dtype=np.float32) * np.float32(127 / 62)  # halves after scaling
    x[3] *= 1e4
    for qtype in gguf_legacy.SUPPORTED_TYPES:
        got = gguf_legacy.quantize(torch.from_numpy(x), qtype)
        assert np.array_equal(got, gguf_blocks.quantize(x, qtype)), qtype.name


def _record(n: int, k: int, bits: int, group: int | None, symmetric: bool):
    """(packed codes, scales, packed zero points or None, float32 dequantized weight) of a random weight,
    packed as compressed-tensors stores them (zero points along N), all on the GPU."""
    from quantizers import rtn
    from quantizers.kernels import group_quant

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(2)) * 0.05
    rec = rtn.quantize_weight(w.to(torch.bfloat16), _fmt(bits, group, symmetric))
    g = k // rec.scales.shape[1]
    zero = 0 if symmetric else rec.zero_points.float().repeat_interleave(g, dim=1)
    dense = (rec.codes.float() - zero) * rec.scales.float().repeat_interleave(g, dim=1)
    packed = group_quant.pack_int32(rec.codes, bits)
    zeros = None if symmetric else group_quant.pack_int32(rec.zero_points.T.contiguous(), bits).T.contiguous()
    return packed, rec.scales.to(DEV), zeros, dense


MATMULS = [(4, 128, True), (4, 64, False), (4, 32, True), (8, None, True), (8, 128, False)]
# max |y - reference| / max |reference|: the output rounded to its dtype (half an ulp: 2**-9 bf16, 2**-11
# fp16) plus float32 sums in another order; fp32 activations: IEEE products (not TF32), order only
BOUNDS = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-10}


@pytest.mark.parametrize("bits,group,symmetric", MATMULS, ids=str)
@pytest.mark.parametrize("dtype", list(BOUNDS), ids=str)
@pytest.mark.parametrize("rows", [1, 5, 64], ids=lambda m: f"M{m}")  # Triton specialises 1 and 16k
def test_dequant_matmul_on_the_gpu_within_gpu_tolerances(kernels, bits, group, symmetric, dtype, rows):
    from quantizers.kernels import dequant_matmul

    n, k = 96, 640  # N not a multiple of the 64-wide tile; K = 5 groups of 128
    packed, scales, zeros, dense = _record(n, k, bits, group, symmetric)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(3)).to(dtype)
    want = x.double() @ dense.to(dtype).double().T  # the weight rounded to x's dtype, as the kernels hold it
    for path in ("gemv", "gemm"):
        got = dequant_matmul.matmul(x.to(DEV), packed, scales, zeros, bits, path=path)
        assert got.device.type == DEV and got.shape == (rows, n) and got.dtype == dtype
        err = float((got.double().cpu() - want).abs().max() / want.abs().max())
        assert err < BOUNDS[dtype], (path, err)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 32], ids=lambda m: f"M{m}")
def test_trtllm_matmul_on_the_gpu_within_gpu_tolerances(kernels, bits, rows):
    trt = pytest.importorskip("quantizers.kernels.trtllm_matmul", reason="the TensorRT-LLM-layout kernel is not there")
    from quantizers import rtn

    n, k = 96, 640
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(4)) * 0.05
    rec = rtn.quantize_weight(w.to(torch.bfloat16), _fmt(bits, 128 if bits == 4 else None, True))
    weight = trt.stored_weight(rec.codes, bits)
    prequant = (torch.rand(k, generator=torch.Generator().manual_seed(5)) + 0.5).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    want = trt.reference(x, weight, rec.scales, prequant, bits)
    got = trt.matmul(x.to(DEV), weight.to(DEV), rec.scales.to(DEV), prequant.to(DEV), bits)
    err = float((got.float().cpu() - want).abs().max() / want.abs().max())
    assert got.device.type == DEV and err < 2**-8, err


def test_gptq_on_the_gpu_as_good_as_on_the_cpu(kernels):
    from quantizers import gptq

    if "device" not in inspect.signature(gptq.gptq_weight).parameters:
        pytest.skip("quantizers.gptq.gptq_weight has no device parameter: GPTQ on the GPU is not there")
    g = torch.Generator().manual_seed(7)
    rows, n = 128, 512
    w = torch.randn(rows, n, generator=g) * 0.05
    x = torch.randn(2048, n, generator=g) * torch.randn(n, generator=g).exp()
    h = x.T @ x * (2 / 2048)
    config = gptq.GPTQConfig(bits=4, group_size=128, symmetric=True, act_order=True)
    fmt = config.format_for("f32")

    def fit(cols, start):
        return gptq.MinMaxGrid.fit(cols, start, fmt)

    def loss(values):
        d = w - values.float().cpu()
        return float(((d @ h) * d).sum())

    _, cpu_values, _ = gptq.gptq_weight(w, h, fit, 128, config)
    levels, values, _ = gptq.gptq_weight(w.to(DEV), h.to(DEV), fit, 128, config, device="cuda")
    assert int(levels.min()) >= -8 and int(levels.max()) <= 7
    # the same algorithm; the Hessian's inverse factor and sums in another order on the GPU, so a few
    # roundings differ: the error GPTQ minimises within 5 % of the CPU pass's
    assert loss(values) <= 1.05 * loss(cpu_values), (loss(values), loss(cpu_values))
