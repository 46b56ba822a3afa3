"""The TensorRT-LLM layout matmul kernel (quantizers/kernels/trtllm_matmul.py) and the GPU validation runtime
(validation/runtimes/triton_kernels.py, ``gemport validate --device cuda``), on the CPU through Triton's
interpreter: against their CPU references and against the runtimes that load the artifacts without the
kernels (transformers + compressed-tensors, the TensorRT-LLM layout runtime)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kernel_helpers import interpreted

with interpreted():  # the kernels run through Triton's interpreter in this process
    import torch

    from converters import hf, trtllm
    from gemport.cli import main
    from gemport.errors import UnsupportedError
    from quantizers import kernels
    from quantizers.kernels import trtllm_matmul
    from quantizers.record import QuantFormat
    from quantizers.rtn import RTNConfig, quantize, quantize_weight
    from validation.runtimes import KERNELS, check_supported
    from validation.runtimes.hf_transformers import as_loaded
    from validation.runtimes.triton_kernels import CompressedTensorsKernelRuntime, TrtllmKernelRuntime
    from validation.runtimes.trtllm_layout import TrtllmLayoutRuntime
    from validation.validate import validate


def test_the_kernels_run_interpreted():
    assert kernels.INTERPRET and kernels.device() == "cpu"


def _trtllm_weight(n: int, k: int, bits: int, group: int | None, dtype=torch.bfloat16):
    """(stored int8 weight, scales [n, groups] in ``dtype``) of a random weight, as a TensorRT-LLM checkpoint
    holds it: symmetric records, int4 rows packed in nibble pairs."""
    fmt = QuantFormat(bits=bits, group_size=group, symmetric=True, scale_dtype="bf16")
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(4)) * 0.05
    r = quantize_weight(w, fmt)
    return trtllm_matmul.stored_weight(r.codes, bits), r.scales.to(dtype)


# (bits, group, pre-quant scale): W4A16_AWQ (int4 groups, with and without a pre-quant scale), W4A16 and
# W8A16 (per channel, as trtllm-build quantizes them)
TRT_MATMULS = [(4, 32, True), (4, 128, False), (4, None, False), (8, None, False)]


@pytest.mark.parametrize("bits,group,prequant", TRT_MATMULS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [3, 20], ids=lambda m: f"M{m}")
def test_trtllm_matmul_matches_the_dequantized_reference(bits, group, prequant, dtype, rows):
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


# ---------------------------------------------------------------------------------------------
# the GPU validation runtime (validate --device cuda), end to end through the interpreter

ROOT = Path(__file__).resolve().parents[1]
CTX, WINDOWS = 32, 2  # tiny: every window is one kernel call per projection (GEMM: 32 rows)
UNSCALED = {  # TensorRT-LLM takes no Gemma 3 rope scaling of the global layers only (tests/test_trtllm.py)
    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
}


def _gemport(*argv: str, interpret: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "gemport.cli", *argv], capture_output=True, text=True, env=env, cwd=ROOT
    )


@pytest.fixture(scope="module")
def int4_g32(tiny_models, tmp_path_factory) -> Path:
    """The tiny Gemma 3 quantized by the CLI: RTN int4 groups of 32, compressed-tensors pack-quantized."""
    dst = tmp_path_factory.mktemp("kernels") / "int4-g32"
    argv = ["quantize", str(tiny_models["gemma3"]), str(dst), "--method", "rtn", "--bits", "4", "--group-size", "32"]
    assert main(argv) == 0
    return dst


def test_device_cuda_scores_compressed_tensors_as_transformers_does(tiny_models, int4_g32, tmp_path):
    """Acceptance: gemport validate --device cuda through the interpreter, the Triton W4A16 kernel in every
    projection, gives transformers + compressed-tensors' perplexity within 0.1 %."""
    src, scores = tiny_models["gemma3"], {}
    for device, interpret in (("cpu", False), ("cuda", True)):
        out = tmp_path / f"{device}.json"
        argv = ["validate", str(int4_g32), "--reference", str(src), "--ctx", str(CTX), "--windows", str(WINDOWS)]
        start = time.monotonic()
        done = _gemport(*argv, "--device", device, "--no-reference-cache", "--json", str(out), interpret=interpret)
        assert done.returncode == 0, done.stderr[-2000:]
        scores[device] = json.loads(out.read_text())
        print(f"{device}: {time.monotonic() - start:.1f} s, {scores[device]['runtime']['name']}")
    cpu, cuda = (scores[d]["metrics"] for d in ("cpu", "cuda"))
    rel = abs(cuda["ppl_cand"] / cpu["ppl_cand"] - 1)
    print(f"ppl transformers + compressed-tensors {cpu['ppl_cand']:.6f}, Triton kernels {cuda['ppl_cand']:.6f}, "
          f"relative difference {rel:.2e}; KLD {cpu['kld']:.6g} / {cuda['kld']:.6g}")  # fmt: skip
    assert cpu["tokens"] == cuda["tokens"] == WINDOWS * (CTX // 2 - 1)
    assert rel < 1e-3
    assert abs(cuda["kld"] - cpu["kld"]) < 1e-3 * cpu["kld"]
    runtime = scores["cuda"]["runtime"]
    assert runtime["kind"] == KERNELS and scores["cpu"]["runtime"]["name"].startswith("transformers + compressed")
    assert runtime["name"].startswith(
        "Triton W4A16 kernels (GEMM x56) on the compressed-tensors layout: int4 g32 sym (f32 scales) in 28"
    )
    assert "in 28 projections" in runtime["name"] and "Triton's interpreter (TRITON_INTERPRET=1)" in runtime["name"]


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")  # transformers, asymmetric
@pytest.mark.parametrize(
    "variant,config",
    [
        ("gemma3", RTNConfig(bits=4, group_size=32, symmetric=False)),
        ("gemma3", RTNConfig(bits=8)),
        ("gemma-mqa", RTNConfig(bits=4, group_size=64)),  # an untied LM head, loaded as a dense tensor
        ("gemma2", RTNConfig(bits=8, symmetric=False)),  # attention softcap, eager
    ],
    ids=["gemma3-int4-g32-asym", "gemma3-int8", "gemma-mqa-int4-g64", "gemma2-int8-asym"],
)
def test_kernel_runtime_logits_equal_transformers_compressed_tensors(tiny_models, tmp_path, variant, config):
    """The other schemes gemport quantize writes (asymmetric groups, int8 per channel) and the other families:
    the logits of a window."""
    out = hf.write(quantize(hf.read(tiny_models[variant]), config), tmp_path / "q")
    tokens = [2, *range(10, 10 + CTX - 1)]
    want = as_loaded(out).scored_logits(tokens, 16, 15)
    got = CompressedTensorsKernelRuntime(out).scored_logits(tokens, 16, 15)
    assert got.shape == want.shape
    err = abs(got - want).max() / abs(want).max()
    assert err < 1e-5, err  # float32 sums in another order


@pytest.fixture(scope="module")
def gemma3_unscaled(tmp_path_factory) -> Path:
    from tests.tiny import make_tiny

    return make_tiny("gemma3", tmp_path_factory.mktemp("kernels") / "gemma3", rope_parameters=UNSCALED)


def _awq_with_prequant(src: Path, dst: Path) -> Path:
    """A W4A16_AWQ checkpoint whose pre-quant scales are not 1 (as ModelOpt exports AWQ): both runtimes read
    the same tensors, the layout runtime folding the scale into the weight, the kernel scaling the input."""
    from safetensors.torch import load_file, save_file

    out = trtllm.write(quantize(hf.read(src), RTNConfig(bits=4, group_size=32, scale_dtype="bf16")), dst)
    tensors = load_file(out / "rank0.safetensors")
    g = torch.Generator().manual_seed(6)
    for name in [n for n in tensors if n.endswith("prequant_scaling_factor")]:
        tensors[name] = (torch.rand(tensors[name].shape, generator=g) + 0.5).to(tensors[name].dtype)
    save_file(tensors, out / "rank0.safetensors", metadata={"format": "pt"})
    return out


def test_kernel_runtime_on_trtllm_awq_reads_the_stored_int4_and_matches_the_layout_runtime(gemma3_unscaled, tmp_path):
    from safetensors.torch import load_file

    out = _awq_with_prequant(gemma3_unscaled, tmp_path / "awq")
    tokens = [2, *range(10, 10 + CTX - 1)]
    layout = TrtllmLayoutRuntime(out)
    want = layout.logprobs(tokens)
    exact = TrtllmKernelRuntime(out, act_dtype="float32")
    stored = load_file(out / "rank0.safetensors")
    weight, scales, pre, bits = exact.weights["transformer.layers.1.mlp.proj.weight"]
    assert bits == 4 and torch.equal(weight, stored["transformer.layers.1.mlp.proj.weight"])  # the stored bytes
    assert torch.equal(pre, stored["transformer.layers.1.mlp.proj.prequant_scaling_factor"]) and not bool(
        (pre == 1).all()
    )
    err = abs(exact.logprobs(tokens) - want).max()
    assert err < 1e-4, err  # fp32 activations: (x * s) @ W.T against x @ (W * s).T, float32 roundings only
    served = TrtllmKernelRuntime(out)  # bf16 activations, as TensorRT-LLM's weight-only GEMMs take them
    err16 = abs(served.logprobs(tokens) - want).max()
    print(f"max |log-prob| difference to the layout runtime: fp32 activations {err:.2e}, bf16 {err16:.2e}")
    assert 1e-4 < err16 < 0.05  # bf16 activations (2**-9 relative) through four layers: felt, and small
    assert served.kind == KERNELS and "W4A16_AWQ kernels (GEMM x20)" in served.name, served.name


@pytest.mark.parametrize("quant", ["W8A16", "W4A16"])
def test_kernel_runtime_on_trtllm_weight_only_matches_the_layout_runtime(gemma3_unscaled, tmp_path, quant):
    """W8A16 / W4A16 checkpoints (float weights trtllm-build quantizes per channel), tp 2: the records joined."""
    out = trtllm.write(hf.read(gemma3_unscaled), tmp_path / "q", dtype="bf16", tp_size=2, quant=quant)
    tokens = [2, *range(10, 10 + CTX - 1)]
    want = TrtllmLayoutRuntime(out).logprobs(tokens)
    got = TrtllmKernelRuntime(out, act_dtype="float32")
    err = abs(got.logprobs(tokens) - want).max()
    assert err < 1e-4, err
    assert f"{quant} kernels (GEMM x20)" in got.name and "per-channel" in got.name, got.name
    short = tokens[:8]  # fewer than 16 rows: the GEMV path
    assert abs(got.logprobs(short) - TrtllmLayoutRuntime(out).logprobs(short)).max() < 1e-4
    assert f"{quant} kernels (GEMM x20 and GEMV x20)" in got.name, got.name


def test_device_cuda_scores_trtllm_awq_as_the_layout_runtime_does(gemma3_unscaled, tmp_path):
    """validate --device cuda on a W4A16_AWQ checkpoint against validate's layout runtime: perplexity within
    0.5 % (the kernels take bf16 activations, the layout runtime float32)."""
    out = _awq_with_prequant(gemma3_unscaled, tmp_path / "awq")
    layout = validate(out, gemma3_unscaled, n_ctx=CTX, n_windows=WINDOWS, default_gates=False)
    kernels_ = validate(out, gemma3_unscaled, n_ctx=CTX, n_windows=WINDOWS, default_gates=False, device="cuda")
    a, b = layout.metrics.ppl_cand, kernels_.metrics.ppl_cand
    print(f"ppl layout runtime {a:.6f}, Triton kernels {b:.6f}, relative difference {abs(b / a - 1):.2e}")
    assert abs(b / a - 1) < 5e-3
    assert kernels_.runtime_kind == KERNELS and "Triton W4A16_AWQ kernels (GEMM x40)" in kernels_.runtime
    assert "Triton W4A16_AWQ" in kernels_.table()


def test_device_cuda_without_cuda_or_interpreter_is_one_line(int4_g32, tiny_models):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the kernels would run")
    done = _gemport("validate", str(int4_g32), "--reference", str(tiny_models["gemma3"]), "--device", "cuda",
                    interpret=False)  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0] == (
        f"gemport: error: {int4_g32}: --device cuda: no CUDA device: the Triton kernels run on a GPU, or on the "
        "CPU with TRITON_INTERPRET=1"
    )


def test_device_cuda_refuses_what_has_no_kernel(tiny_models, int4_g32):
    with pytest.raises(UnsupportedError, match="no quantized projections"):
        check_supported("hf", tiny_models["gemma3"], "cuda")  # a float folder
    with pytest.raises(UnsupportedError, match="not gguf"):
        check_supported("gguf", int4_g32, "cuda")
    check_supported("hf", int4_g32, "cuda")  # the interpreter runs the kernels here
    with pytest.raises(UnsupportedError, match="'tpu' is not one of cpu, cuda"):
        check_supported("hf", int4_g32, "tpu")


def test_device_cuda_names_a_missing_tensor(int4_g32, gemma3_unscaled, tmp_path):
    """Bad input reaches the kernel runtime as the CPU runtimes get it: the folder and the tensor named."""
    import shutil

    from safetensors.torch import load_file, save_file

    from gemport.errors import CheckpointError
    from validation.runtimes.triton_kernels import kernel_runtime

    bad = shutil.copytree(int4_g32, tmp_path / "ct")
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.2.mlp.down_proj.weight_scale"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.2.mlp.down_proj: weight_scale missing"):
        kernel_runtime(bad, "hf")
    out = trtllm.write(hf.read(gemma3_unscaled), tmp_path / "w8", dtype="bf16", quant="W8A16")
    tensors = load_file(out / "rank0.safetensors")
    del tensors["transformer.layers.1.mlp.fc.weight"]
    save_file(tensors, out / "rank0.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="tensor transformer.layers.1.mlp.fc.weight is missing"):
        kernel_runtime(out, "trtllm")


def _validate_json(candidate: Path, reference: Path, out: Path, device: str, interpret: bool) -> dict:
    argv = ["validate", str(candidate), "--reference", str(reference), "--ctx", str(CTX), "--windows", str(WINDOWS)]
    done = _gemport(*argv, "--device", device, "--no-reference-cache", "--no-default-gates", "--json", str(out),
                    interpret=interpret)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible: the compiled kernels cannot run")
def test_device_cuda_on_a_gpu(tiny_models, int4_g32, gemma3_unscaled, tmp_path):
    """On a CUDA GPU, compiled (no interpreter): the compressed-tensors folder's perplexity within 0.1 % of
    transformers + compressed-tensors', a W4A16_AWQ checkpoint's within 0.5 % of the layout runtime's."""
    awq = _awq_with_prequant(gemma3_unscaled, tmp_path / "awq")
    for candidate, reference, bound in ((int4_g32, tiny_models["gemma3"], 1e-3), (awq, gemma3_unscaled, 5e-3)):
        cpu = _validate_json(candidate, reference, tmp_path / "cpu.json", "cpu", interpret=False)
        gpu = _validate_json(candidate, reference, tmp_path / "gpu.json", "cuda", interpret=False)
        a, b = cpu["metrics"]["ppl_cand"], gpu["metrics"]["ppl_cand"]
        print(f"{candidate.name}: ppl {cpu['runtime']['name'][:40]} {a:.6f}, Triton on CUDA {b:.6f}, {b / a - 1:+.2e}")
        assert abs(b / a - 1) < bound
        assert gpu["runtime"]["kind"] == KERNELS and "on CUDA (" in gpu["runtime"]["name"], gpu["runtime"]["name"]


def test_a_projection_stored_in_float_runs_as_a_torch_matmul_and_is_said(tiny_models, tmp_path):
    src = hf.read(tiny_models["gemma3"])
    q = quantize(src, RTNConfig(bits=4, group_size=32))
    name = "model.layers.1.mlp.down_proj.weight"
    q.tensors[name] = src.tensors[name]  # left unquantized: compressed-tensors' ignore list names it
    out = hf.write(q, tmp_path / "q")
    tokens = [2, *range(10, 10 + CTX - 1)]
    want = as_loaded(out).scored_logits(tokens, 16, 15)
    rt = CompressedTensorsKernelRuntime(out)
    assert abs(rt.scored_logits(tokens, 16, 15) - want).max() / abs(want).max() < 1e-5
    assert "in 27 projections, 1 stored in float as torch matmuls" in rt.name, rt.name
    assert rt.notes == ["stored in float, run as torch matmuls, not kernels: model.layers.1.mlp.down_proj"]
