"""GPTQ on the GPU path (quantizers/kernels/gptq_block.py, gptq_weight(device="cuda"), quantize
--device cuda), run on the CPU through Triton's interpreter, against the CPU GPTQ.

Tolerances: given the same inverse-Cholesky factor U the kernel path is the CPU loop's arithmetic
operation by operation (no FMA, IEEE division, half-to-even), so levels, values and grids are equal
bit for bit. With its own U (torch.linalg instead of LAPACK in place; measured 1.5e-6 relative apart at
n = 640) a rounding tie can flip a level and the error fed forward then moves its row: measured 100 %
equal levels on every case here; asserted >= 99.9 % equal levels, values within one grid step, and
the output error within 1 % of the CPU's. End to end on the tiny Gemma 3 (4 layers, int4 g32 asym,
act-order) measured 100 % equal codes (147456) and the same perplexity to 7 digits; asserted >= 99.9 %
codes and perplexity within 0.5 %. (Natural order, grids fitted on the fly, measured 99.81 % equal codes
and +0.14 % perplexity: a flipped level changes the next layers' calibration inputs; not a CI case.)
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest

from tests.kernel_helpers import interpreted

with interpreted():  # the kernels run through Triton's interpreter in this process
    import torch
    from safetensors.torch import load_file

    from gemport.cli import main
    from gemport.errors import UnsupportedError
    from quantizers import gptq, kernels
    from quantizers.calibration import CalibrationConfig
    from quantizers.kernels import gptq_block  # noqa: F401  (defined under the interpreter)
    from quantizers.record import QuantFormat
    from validation.validate import validate

pytestmark = pytest.mark.usefixtures("one_thread")

# (rows, n, format, act_order): rows not a multiple of the GPU's 16-row tile, n = 640 (five blocks),
# n = 200 (a last block of 72 columns), groups of 32 and 128 and per channel, sym and asym, act-order
# (static groups, one launch per block) and natural order (grids fitted per group between launches).
CASES = [
    (37, 640, QuantFormat(4, 32, False, "bf16"), False),
    (37, 640, QuantFormat(4, 128, True, "f32"), True),
    (33, 256, QuantFormat(4, 32, True, "f32"), True),
    (21, 640, QuantFormat(4, 128, False, "f16"), False),
    (9, 200, QuantFormat(8, None, False, "f32"), False),
    (20, 256, QuantFormat(8, None, True, "bf16"), True),
]


def _ids(case) -> str:
    rows, n, fmt, act_order = case
    return f"{rows}x{n}-{fmt.describe()}-{'act' if act_order else 'natural'}"


def _problem(rows: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight, correlated inputs with some loud channels and a dead one, their Hessian."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, n, generator=gen)
    mix = torch.randn(n, n, generator=gen) / n**0.5 + torch.eye(n)
    x = (torch.randn(2 * n, n, generator=gen) @ mix) * torch.exp(torch.randn(n, generator=gen))
    x[:, 3] = 0
    return w, x, 2 * x.T @ x / x.shape[0]


def _run(w, h, fmt, act_order, device):
    config = gptq.GPTQConfig(bits=fmt.bits, group_size=fmt.group_size, symmetric=fmt.symmetric, act_order=act_order)
    fit = functools.partial(gptq.MinMaxGrid.fit, fmt=fmt)
    return gptq.gptq_weight(w, h, fit, fmt.group_size or w.shape[1], config, device=device)


def test_the_kernels_run_interpreted():
    assert kernels.INTERPRET and kernels.device() == "cpu"
    assert gptq.kernel_device("cuda") == "cpu" and gptq.kernel_device("cpu") == "cpu"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_kernel_path_equals_the_cpu_loop_bit_for_bit_given_the_same_factor(case, monkeypatch):
    rows, n, fmt, act_order = case
    w, _, h = _problem(rows, n, seed=n + rows)
    monkeypatch.setattr(gptq, "_inverse_cholesky_torch", lambda a, damp: gptq._inverse_cholesky(a.clone(), damp))
    want_levels, want_values, want_grids = _run(w, h, fmt, act_order, "cpu")
    levels, values, grids = _run(w, h, fmt, act_order, "cuda")
    assert levels.dtype == torch.int8 and torch.equal(levels, want_levels)
    assert torch.equal(values, want_values)
    assert all(
        torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero) for a, b in zip(grids, want_grids, strict=True)
    )
    assert torch.equal(values[:, 3], torch.zeros(rows))  # the dead column


@pytest.mark.parametrize("case", CASES[:4], ids=_ids)
def test_kernel_path_with_its_own_factor_agrees_with_the_cpu(case):
    rows, n, fmt, act_order = case
    w, x, h = _problem(rows, n, seed=n + rows)
    want_levels, want_values, want_grids = _run(w, h, fmt, act_order, "cpu")
    levels, values, grids = _run(w, h, fmt, act_order, "cuda")
    same = float((levels == want_levels).to(torch.float64).mean())
    assert same >= 0.999, same
    width = fmt.group_size or n
    step = torch.stack([g.scale for g in want_grids], dim=1).repeat_interleave(width, dim=1)
    assert float(((values - want_values).abs() / step).max()) <= 1.0
    errors = [float((x @ (w - q).T).square().mean()) for q in (values, want_values)]
    assert abs(errors[0] - errors[1]) <= 0.01 * errors[1], errors


@pytest.mark.parametrize("n", [7, 300])
def test_torch_inverse_cholesky_equals_lapacks(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(4 * n + 3, n, generator=gen)
    h = x.T @ x / x.shape[0]
    before = h.clone()
    got = gptq._inverse_cholesky_torch(h, 0.01)
    assert torch.equal(h, before)  # not worked on in place
    want = gptq._inverse_cholesky(h.clone(), 0.01)
    assert torch.equal(got, torch.triu(got))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_torch_inverse_cholesky_raises_damp_then_gives_up(caplog):
    h = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 0.999]])  # eigenvalue -5e-4
    got = gptq._inverse_cholesky_torch(h, 1e-6)
    assert "needed damp 0.001" in caplog.text
    assert torch.allclose(got, gptq._inverse_cholesky(h.clone(), 1e-6), rtol=1e-4)
    with pytest.raises(UnsupportedError, match="not positive definite even with damp"):
        gptq._inverse_cholesky_torch(torch.tensor([[1.0, 0.0], [0.0, -1e6]]), 1e-6)


def test_kernel_path_refuses_other_grids_and_devices():
    w, _, h = _problem(8, 64, seed=0)
    config = gptq.GPTQConfig(group_size=32)

    def fit(x, start):
        return gptq._BlockGrid(None)

    with pytest.raises(UnsupportedError, match="min-max grids only"):
        gptq.gptq_weight(w, h, fit, 32, config, device="cuda")
    with pytest.raises(UnsupportedError, match="runs on cpu or cuda, not 'tpu'"):
        gptq.gptq_weight(w, h, fit, 32, config, device="tpu")
    with pytest.raises(UnsupportedError, match="lazy blocks of at most 256"):
        _run_config(w, h, gptq.GPTQConfig(group_size=32, block_size=512))


def _run_config(w, h, config):
    fmt = config.format_for("f32")
    fit = functools.partial(gptq.MinMaxGrid.fit, fmt=fmt)
    return gptq.gptq_weight(w, h, fit, 32, config, device="cuda")


def test_quantize_gguf_on_cuda_is_refused(tiny_models):
    from converters import hf

    ckpt = hf.read(tiny_models["gemma3"])
    with pytest.raises(UnsupportedError, match="runs on the CPU only"):
        gptq.quantize_gguf(ckpt, gptq.GPTQConfig(calibration=CalibrationConfig(tokens=64, n_ctx=64)), "q4_k_m",
                           device="cuda")  # fmt: skip


def _codes(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(path)
    return tensors


def _unpacked(packed: torch.Tensor) -> torch.Tensor:
    """int4 codes of compressed-tensors' int32 words, 8 per word, the first in the lowest bits."""
    shifts = torch.arange(8, dtype=torch.int32) * 4
    return ((packed.unsqueeze(-1) >> shifts) & 15).reshape(packed.shape[0], -1)


def test_cli_quantize_gptq_on_cuda_matches_the_cpu_run(tiny_models, tmp_path, corpus):
    src = tiny_models["gemma3"]
    argv = ["quantize", str(src), "--method", "gptq", "--bits", "4", "--group-size", "32", "--asym"]
    argv += ["--corpus", str(corpus), "--calib-tokens", "512", "--calib-ctx", "128"]
    out = {}
    for device in ("cpu", "cuda"):
        dst = tmp_path / device
        assert main([argv[0], argv[1], str(dst), *argv[2:], "--device", device]) == 0
        out[device] = dst
    made = {device: json.loads((folder / "gemport.json").read_text())["quantization"] for device, folder in out.items()}
    assert (
        "device" not in made["cpu"] and made["cuda"]["device"] == "cuda: Triton gptq_columns (interpreted on the CPU)"
    )
    got, want = _codes(out["cuda"]), _codes(out["cpu"])
    assert got.keys() == want.keys()
    packed = [k for k in want if k.endswith("weight_packed")]
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    assert len(packed) == 7 * layers  # every projection
    same = total = 0
    for name, tensor in want.items():
        if name in packed:
            a, b = _unpacked(got[name]), _unpacked(tensor)
            same, total = same + int((a == b).sum()), total + a.numel()
        else:  # scales, zero points, shapes and the float tensors
            assert torch.equal(got[name], tensor), name
    assert same >= 0.999 * total, (same, total)
    ppl = {
        device: validate(folder, src, corpus=corpus, n_ctx=64, n_windows=4).to_json()["metrics"]["ppl_cand"]
        for device, folder in out.items()
    }
    assert abs(ppl["cuda"] / ppl["cpu"] - 1) < 0.005, ppl


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "rtn"], "--device applies to --method gptq, not rtn"),
        (["--method", "awq"], "--device applies to --method gptq, not awq"),
        (["--method", "gptq", "--to", "gguf"], "--device cuda applies to compressed-tensors' grids, not --to gguf"),
    ],
)
def test_cli_device_cuda_refused_outside_gptq_records(tiny_models, tmp_path, capsys, extra, message):
    dst = tmp_path / "out"
    code = main(["quantize", str(tiny_models["gemma3"]), str(dst), "--bits", "4", *extra, "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("gemport") and err.count("\n") == 1 and message in err, err
    assert not dst.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: --device cuda runs")
def test_cli_device_cuda_without_cuda_or_interpreter_is_one_line(tiny_models, tmp_path):
    dst = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import sys; from gemport.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = ["quantize", str(tiny_models["gemma3"]), str(dst), "--method", "gptq", "--bits", "4", "--device", "cuda"]
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "no CUDA device" in done.stderr and "Traceback" not in done.stderr
    assert not dst.exists()
