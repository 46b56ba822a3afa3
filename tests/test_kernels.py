"""The Triton kernels (quantizers/kernels/) on the CPU through Triton's interpreter, against their CPU
references bit for bit, and compiled for sm_80 and sm_90 without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.kernel_helpers import edge_weights, interpreted

with interpreted():  # the kernels run through Triton's interpreter in this process
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from gguf import GGMLQuantizationType

    from quantizers import gguf_blocks, kernels, rtn
    from quantizers.kernels import compile as kcompile
    from quantizers.kernels import dequant_matmul, gguf_legacy, group_quant
    from quantizers.record import QuantFormat


def test_the_kernels_run_interpreted():
    assert kernels.INTERPRET and kernels.device() == "cpu"  # imported first here, under the interpreter


def _weights(dtype: torch.dtype, rows: int = 12, cols: int = 384) -> torch.Tensor:
    return edge_weights(rows, cols, dtype)


FORMATS = [
    QuantFormat(bits=4, group_size=32, symmetric=True, scale_dtype="bf16"),
    QuantFormat(bits=4, group_size=64, symmetric=False, scale_dtype="bf16"),
    QuantFormat(bits=4, group_size=128, symmetric=True, scale_dtype="f16"),
    QuantFormat(bits=4, group_size=128, symmetric=False, scale_dtype="f32"),
    QuantFormat(bits=8, group_size=None, symmetric=True, scale_dtype="bf16"),
    QuantFormat(bits=8, group_size=128, symmetric=False, scale_dtype="f16"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("full_range", [False, True], ids=["", "full-range"])
def test_group_quant_equals_rtn_and_packs_as_compressed_tensors(dtype, fmt, full_range):
    w = _weights(dtype)
    got = group_quant.quantize_weight(w, fmt, full_range)
    want = rtn.quantize_weight(w, fmt, full_range)
    assert got.codes.dtype == torch.int8 and torch.equal(got.codes, want.codes)
    assert got.scales.dtype == want.scales.dtype and torch.equal(got.scales, want.scales)
    if fmt.symmetric:
        assert got.zero_points is None and want.zero_points is None
    else:
        assert torch.equal(got.zero_points, want.zero_points)
    assert torch.equal(group_quant.pack_int32(got.codes, fmt.bits), pack_to_int32(want.codes, fmt.bits))


def test_group_quant_refuses_a_group_that_does_not_divide_the_row():
    fmt = QuantFormat(bits=4, group_size=128, symmetric=True, scale_dtype="bf16")
    with pytest.raises(ValueError, match="does not divide"):
        group_quant.quantize_weight(torch.zeros(2, 96), fmt)
    with pytest.raises(ValueError, match="4 and 8 bits"):
        group_quant.pack_int32(torch.zeros(2, 32, dtype=torch.int8), 3)


def _gguf_rows() -> np.ndarray:
    g = np.random.default_rng(1)
    x = (g.standard_normal((10, 256)) * 0.1).astype(np.float32)
    x[0, :32] = 0.0
    x[0, 32:64] = -0.0
    x[1, :32] = 0.0
    x[1, 3], x[1, 7] = 0.5, -0.5  # a tie, + first
    x[1, 32:64] = 0.0
    x[1, 40], x[1, 50] = -0.25, 0.25  # a tie, - first
    x[2, :32] = np.arange(32, dtype=np.float32) * np.float32(127 / 62)  # halves after scaling
    x[3] *= 1e4
    x[4, :32] = -np.arange(32, dtype=np.float32)
    return x


@pytest.mark.parametrize("qtype", gguf_legacy.SUPPORTED_TYPES, ids=lambda t: t.name)
def test_gguf_blocks_equal_libggml_bytes(qtype):
    x = _gguf_rows()
    got = gguf_legacy.quantize(torch.from_numpy(x), qtype)
    assert got.dtype == np.uint8 and np.array_equal(got, gguf_blocks.quantize(x, qtype))
    bf16 = torch.from_numpy(x).to(torch.bfloat16)  # a bf16 source, cast to float32 in the kernel
    assert np.array_equal(gguf_legacy.quantize(bf16, qtype), gguf_blocks.quantize(bf16.float().numpy(), qtype))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the kernel's 1/d, before the
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # fallback to the CPU encoder
def test_gguf_block_with_a_subnormal_scale_goes_to_the_cpu_encoder():
    x = np.full((1, 64), 1e-40, dtype=np.float32)
    for qtype in gguf_legacy.SUPPORTED_TYPES:
        assert np.array_equal(gguf_legacy.quantize(torch.from_numpy(x), qtype), gguf_blocks.quantize(x, qtype))
    with pytest.raises(ValueError, match="no Triton kernel for Q4_K"):
        gguf_legacy.quantize(torch.zeros(1, 256), GGMLQuantizationType.Q4_K)


def test_every_kernel_compiles_to_a_cubin_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    out = subprocess.run(
        [sys.executable, "-m", "quantizers.kernels.compile", "--json"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    results = [json.loads(line) for line in out.stdout.splitlines()]
    want = {(v.name, arch) for v in kcompile.VARIANTS for arch in kcompile.ARCHS}
    assert {(r["variant"], r["arch"]) for r in results} == want
    for r in results:
        assert r["elf"] and r["cubin_bytes"] > 0, r
        assert r["target"] == ("sm_90a" if r["arch"] == 90 else f"sm_{r['arch']}"), r
        assert 0 < r["registers"] <= 255 and r["static_shared"] >= 0 and r["triton_shared"] >= 0, r
        if r["exact"]:  # the floating-point contract of the bit-exact kernels: nothing contracted into an FMA
            assert r["fma_f32"] == 0, r


def _record(n: int, k: int, bits: int, group: int | None, symmetric: bool, dtype=torch.bfloat16):
    """A compressed-tensors record as stored (packed codes, scales, packed zero points) of a random weight."""
    fmt = QuantFormat(bits=bits, group_size=group, symmetric=symmetric, scale_dtype="bf16")
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(2)) * 0.05
    r = rtn.quantize_weight(w.to(dtype), fmt)
    zeros = None if symmetric else pack_to_int32(r.zero_points, bits, packed_dim=0)
    return pack_to_int32(r.codes, bits), r.scales, zeros


MATMULS = [(4, 128, True), (4, 64, False), (4, 32, True), (8, None, True), (8, 128, False)]


@pytest.mark.parametrize("bits,group,symmetric", MATMULS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 3, 20], ids=lambda m: f"M{m}")
def test_dequant_matmul_matches_the_dequantized_reference(bits, group, symmetric, dtype, rows):
    n, k = 96, 256  # N not a multiple of the 64-wide tile: the masked edge runs too
    packed, scales, zeros = _record(n, k, bits, group, symmetric)
    x = (torch.randn(rows, k, generator=torch.Generator().manual_seed(3))).to(dtype)
    want = dequant_matmul.reference(x, packed, scales, zeros, bits)
    for path in ("gemv", "gemm"):
        got = dequant_matmul.matmul(x, packed, scales, zeros, bits, path=path)
        assert got.shape == (rows, n) and got.dtype == dtype
        err = (got.float() - want).abs().max() / want.abs().max()
        # fp32: float32 sums in another order; bf16: the output rounded to bf16 (2**-8 relative)
        assert err < (1e-5 if dtype == torch.float32 else 2**-8), (path, float(err))


def test_dequant_matmul_dequantizes_as_compressed_tensors_decompresses():
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    packed, scales, zeros = _record(16, 128, 4, 64, symmetric=False, dtype=torch.float32)
    codes = unpack_from_int32(packed, 4, torch.Size([16, 128]))
    zero = unpack_from_int32(zeros, 4, torch.Size([16, 2]), packed_dim=0)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=64)
    theirs = dequantize(codes, scales, zero, args=args, dtype=torch.bfloat16)
    assert torch.equal(dequant_matmul.dequantized(packed, scales, zeros, 4, torch.bfloat16), theirs)


def test_dequant_matmul_refuses_shapes_that_do_not_fit():
    packed, scales, zeros = _record(16, 128, 4, 64, symmetric=True)
    with pytest.raises(ValueError, match="holds 128 columns, x has 64"):
        dequant_matmul.matmul(torch.zeros(2, 64), packed, scales, None, 4)
    with pytest.raises(ValueError, match="not one of W4A16, W8A16"):
        dequant_matmul.matmul(torch.zeros(2, 128), packed, scales, None, 3)
