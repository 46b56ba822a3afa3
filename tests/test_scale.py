"""Scale: a 7B-wide Gemma converts in bounded memory. The model is Gemma 1 7B with 2 layers (the full
256000 x 3072 embedding, 1.5 GB in bf16, and 24576-wide MLPs); each conversion runs in a child process
that reports its own peak RSS (VmHWM). The full 7B, side by side with llama.cpp, is bench/scale.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

LIMIT = 1.5e9  # bytes of peak RSS for a conversion (issue: scale)

# VmHWM is the peak of this process's own memory map; ru_maxrss would also count the pytest process
# forked from (Linux keeps that maximum across exec).
CHILD = (
    "import re, sys; from gemport.cli import main; rc = main(sys.argv[1:]); "
    "status = open('/proc/self/status').read(); "
    "print('RSS', int(re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1)) * 1024); sys.exit(rc)"
)


def run_measured(*args: str) -> int:
    """Run ``gemport ARGS`` in a child process; its peak RSS in bytes."""
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(re.search(r"^RSS (\d+)$", done.stdout, re.M).group(1))


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    dst = tmp_path_factory.mktemp("scale") / "gemma-7b-2l"
    done = subprocess.run(
        [sys.executable, "-m", "gemport.cli", "synth", "gemma-7b", str(dst), "--layers", "2"],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.loads((dst / "config.json").read_text())
    assert (config["vocab_size"], config["hidden_size"], config["intermediate_size"]) == (256000, 3072, 24576)
    return dst


def test_gguf_q4_k_m_of_a_7b_wide_model_stays_under_the_limit(wide, tmp_path):
    """The main process holds a chunk of rows at a time (the quantizing workers hold their parts of it)."""
    import gguf

    out = tmp_path / "q4.gguf"
    rss = run_measured("convert", str(wide), str(out), "--quant", "q4_k_m")
    assert rss < LIMIT, f"peak RSS {rss / 1e9:.2f} GB"
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    embd = tensors["token_embd.weight"]
    assert (list(embd.shape), embd.tensor_type.name) == ([3072, 256000], "Q6_K")
    assert tensors["blk.1.ffn_up.weight"].tensor_type.name == "Q4_K"


def test_onnx_int4_of_a_7b_wide_model_stays_under_the_limit(wide, tmp_path):
    """The int8 head shared with the lookup (256000 rows) and the joined gate/up projection are quantized,
    packed and written a block of rows at a time."""
    import onnx

    out = tmp_path / "onnx"
    rss = run_measured("convert", str(wide), str(out), "--to", "onnx", "--quant", "int4")
    assert rss < LIMIT, f"peak RSS {rss / 1e9:.2f} GB"
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    assert shapes["model.embed_tokens.weight.qweight"] == [256000, 96, 32]
    assert shapes["model.layers.1.mlp.gate_up_proj.weight.qweight"] == [49152, 96, 16]
    ends = []
    for t in model.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        if info:
            ends.append(int(info["offset"]) + int(info["length"]))
    assert max(ends) == (out / "model.onnx.data").stat().st_size
