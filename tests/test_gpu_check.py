"""The prepared GPU check on this CPU machine: bench/gpu_check.sh --dry-run, and bench/kernels.py --small
through Triton's interpreter (every code path of the GPU run, on tiny shapes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    return env | {"PYTHON": sys.executable} | extra


def test_gpu_check_dry_run_prints_the_shapes_and_the_commands():
    out = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    # the shapes: Gemma 2B / 7B / 27B projections (converters/presets.py) and the 7B GPTQ layer
    for line in ("matmul gemma-7b gate_up_proj: N=24576 K=3072", "matmul gemma-2b kv_proj: N=256 K=2048",
                 "matmul gemma-27b down_proj: N=4608 K=36864", "gptq gemma-7b down_proj: rows=3072 columns=24576",
                 "batches (rows of x): 1, 4, 16, 64"):  # fmt: skip
        assert line in text, line
    # the commands, each under its time limit, and the deps checked first
    assert "-m pytest -q -ra -p no:cacheprovider -m gpu tests/test_gpu.py" in text
    assert "bench/kernels.py --out build/bench/gpu --budget-s" in text
    assert "-m gpu tests/test_kernel_runtime.py" in text  # in a process of its own
    assert "timeout 120 " in text and "timeout 90 " in text and "timeout 250 " in text  # 460 s: under 8 minutes
    assert "ok torch" in text and "MISSING cuda" in text  # no GPU here: said, not fatal in a dry run


def test_gpu_check_refuses_unknown_options_and_a_machine_without_a_gpu(tmp_path):
    bad = subprocess.run(["bash", "bench/gpu_check.sh", "--fast"], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --fast" in bad.stderr
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the real check would run (make bench-gpu)")
    run = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=_env(OUT=str(tmp_path)), capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode == 3, run.stdout + run.stderr
    assert "MISSING cuda" in run.stdout and "nothing run" in run.stderr
    assert not (tmp_path / "kernels.json").exists()


@pytest.mark.filterwarnings("ignore")
def test_kernels_bench_small_runs_every_path_through_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    out = subprocess.run([sys.executable, "bench/kernels.py", "--small", "--out", str(tmp_path)], cwd=ROOT,
                         env=_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    result = json.loads((tmp_path / "kernels.json").read_text())
    checks = {r["check"]: r["pass"] for r in result["checks"]}
    assert checks and all(checks.values()), checks
    # the bit-exact quantizers, the GGUF bytes and both matmul paths were checked, not skipped
    for prefix in ("quantize int4 g128 sym", "pack int8 per-channel", "gguf Q4_0", "gemm int4 g128 asym",
                   "gemv int8 per-channel", "timed cases: W4A16", "timed cases: bf16"):  # fmt: skip
        assert any(c.startswith(prefix) for c in checks), prefix
    timed = result["timings"]
    impls = {r["impl"] for r in timed if "ms" in r}
    assert {"W4A16", "W8A16", "bf16", "torch int4"} <= impls, impls
    assert {r["path"] for r in timed if "path" in r} == {"gemv", "gemm"}
    for r in timed:
        if "ms" in r:
            assert r["ms"] > 0 and r["gbps"] > 0 and 0 < r["bw_frac"] and r["error"] < 2**-7, r
    # GPTQ: run through the agreed API, or reported as missing, never a crash
    gptq = result["gptq"]
    assert gptq and (any("gptq" in r for r in gptq) or "missing" in gptq[0]["note"]), gptq
    md = (tmp_path / "kernels.md").read_text()
    assert "| tiny | q_proj | 96 x 256 | 1 |" in md and "Targets (issue 17" in md
