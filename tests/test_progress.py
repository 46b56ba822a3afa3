"""Progress off a terminal (plain lines, heartbeat), silenced dependency bars, ``-v`` tensor by tensor."""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gemport import progress

ROOT = Path(__file__).resolve().parents[1]
BAR_MARKS = ("%|", "it/s]", "Loading weights", "Compressing model", "Decompressing model", "Dispatching model")


@pytest.fixture
def plain(monkeypatch):
    """stderr is not a terminal (pytest captures it), whatever the environment forces."""
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.setattr(progress, "_stderr_is_terminal", lambda: False)


def test_plain_lines_at_most_every_interval(plain, monkeypatch, capsys):
    now = [100.0]
    monkeypatch.setattr(progress, "clock", lambda: now[0])
    monkeypatch.setattr(progress, "INTERVAL", 5.0)
    monkeypatch.setattr(progress, "HEARTBEAT", 1e9)  # only advance() prints here
    progress.configure()
    with progress.progress("validating m.gguf", 16, "windows") as advance:
        for t in (101, 104, 106, 108, 110.9, 111.5):
            now[0] = t
            advance()
    lines = capsys.readouterr().err.splitlines()
    # 106: 6 s after configure(); 111.5: 5.5 s after that line; the others too soon after one
    assert lines == ["gemport: validating m.gguf 3/16 windows, 6 s", "gemport: validating m.gguf 6/16 windows, 12 s"]


def test_short_work_prints_nothing(plain, monkeypatch, capsys):
    monkeypatch.setattr(progress, "INTERVAL", 5.0)
    monkeypatch.setattr(progress, "HEARTBEAT", 8.0)
    progress.configure()
    with progress.stage("loading"), progress.progress("writing x", 3) as advance:
        for _ in range(3):
            advance()
    assert capsys.readouterr().err == ""


def test_heartbeat_during_one_long_step(plain, monkeypatch, capsys):
    monkeypatch.setattr(progress, "HEARTBEAT", 0.2)
    progress.configure()
    with progress.progress("GPTQ m", 4, "layers") as advance:
        advance()
        with progress.stage("loading the reference m"):
            time.sleep(0.75)  # one long step: no advance at all
    after = capsys.readouterr().err.splitlines()
    assert len(after) >= 2 and all(line.startswith("gemport: loading the reference m, ") for line in after), after
    time.sleep(0.5)  # no task runs: the heartbeat stops
    assert capsys.readouterr().err == "" and not progress._reporter.beating


class _BrokenStderr:
    def write(self, _text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_log_does_not_stop_the_work(plain, monkeypatch):
    monkeypatch.setattr(progress, "INTERVAL", 0.0)
    monkeypatch.setattr(progress, "HEARTBEAT", 0.05)
    monkeypatch.setattr(sys, "stderr", _BrokenStderr())
    done = []
    with progress.progress("writing x", 3) as advance:
        time.sleep(0.2)  # heartbeats meet the broken pipe too
        for i in range(3):
            advance()
            done.append(i)
    assert done == [0, 1, 2]
    time.sleep(0.1)
    assert not progress._reporter.beating


def test_terminal_draws_nested_bars_and_no_plain_lines(monkeypatch, capsys):
    monkeypatch.setattr(progress, "_stderr_is_terminal", lambda: True)
    monkeypatch.setattr(progress, "HEARTBEAT", 0.05)
    progress.configure()
    with progress.stage("loading"), progress.progress("validating x", 2) as advance:
        time.sleep(0.2)
        advance(2)
        assert len(progress._reporter.bar.tasks) == 2
    assert progress._reporter.bar is None
    assert "gemport: " not in capsys.readouterr().err


def test_tqdm_bars_are_silenced_even_when_asked_for(capfd):
    progress.configure()
    from tqdm import tqdm
    from tqdm.auto import tqdm as auto_tqdm

    for bar in (tqdm(range(3), desc="Dispatching model", disable=False), auto_tqdm(range(3), desc="Loading weights")):
        assert list(bar) == [0, 1, 2]
    assert capfd.readouterr().err == ""


def test_cli_in_a_ci_log_shows_no_dependency_bars(tiny_models, tmp_path):
    """A compressed-tensors candidate, loaded by transformers: compressed-tensors draws tqdm bars
    ("Applying quantization config", "Dispatching model") with an explicit ``disable=``."""
    from converters import hf
    from quantizers.rtn import RTNConfig, quantize

    src = tiny_models["gemma3"]
    folder = hf.write(quantize(hf.read(src), RTNConfig(bits=4, group_size=32)), tmp_path / "int4")
    err = tmp_path / "stderr.log"
    argv = [sys.executable, "-m", "gemport.cli", "validate", str(folder), "--reference", str(src)]
    argv += ["--ctx", "32", "--windows", "1", "--no-default-gates"]
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    with open(err, "w") as f:
        rc = subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f, env=env, timeout=300).returncode
    text = err.read_text()
    assert rc == 0, text
    assert not any(mark in text for mark in BAR_MARKS), text


def _logged_tensors(caplog) -> list[tuple[str, ...]]:
    found = (re.fullmatch(r"tensor (\S+) (\[[\d, ]*\]) (\S+)", r.getMessage()) for r in caplog.records)
    return [m.groups() for m in found if m]


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def test_verbose_logs_every_tensor_a_writer_stores(tiny_models, tmp_path, caplog):
    import onnx
    from gguf import GGUFReader

    from gemport.cli import main

    caplog.set_level(logging.INFO)
    src = str(tiny_models["gemma3"])
    assert main(["-v", "convert", src, str(tmp_path / "m.gguf"), "--to", "gguf", "--quant", "q8_0"]) == 0
    logged = {name: (shape, stored) for name, shape, stored in _logged_tensors(caplog)}
    stored = GGUFReader(tmp_path / "m.gguf").tensors
    assert len(logged) == len(stored) > 10
    for t in stored:  # GGUF lists shapes innermost first
        assert logged[t.name] == (str(list(reversed(t.shape.tolist()))), t.tensor_type.name), t.name

    caplog.clear()
    assert main(["-v", "convert", src, str(tmp_path / "hf"), "--to", "hf", "--dtype", "bf16"]) == 0
    logged = {name: (shape, stored) for name, shape, stored in _logged_tensors(caplog)}
    header = _safetensors_header(tmp_path / "hf" / "model.safetensors")
    assert logged == {n: (str(h["shape"]), h["dtype"]) for n, h in header.items()}

    caplog.clear()
    onnx_args = ["--to", "onnx", "--quant", "int4", "--block-size", "32"]
    assert main(["-v", "convert", src, str(tmp_path / "onnx"), *onnx_args]) == 0

    graph = onnx.load(tmp_path / "onnx" / "model.onnx", load_external_data=False).graph
    logged = {name: shape for name, shape, _ in _logged_tensors(caplog)}
    assert logged == {i.name: str(list(i.dims)) for i in graph.initializer}


# --- what a line counts, and for how long -----------------------------------------------------------


def test_lines_give_the_whole_commands_time_too(plain, monkeypatch, capsys):
    """A stage that starts 88 s into the command: its own seconds, then the command's."""
    now = [10.0]
    monkeypatch.setattr(progress, "clock", lambda: now[0])
    monkeypatch.setattr(progress, "INTERVAL", 5.0)
    monkeypatch.setattr(progress, "HEARTBEAT", 1e9)
    progress.configure()
    now[0] = 98.0
    with progress.progress("writing x", 272, "initializers") as advance:
        now[0] = 98.4
        advance()
        now[0] = 104.0
        advance()
    assert capsys.readouterr().err.splitlines() == [
        "gemport: writing x 1/272 initializers, 0 s (88 s in all)",
        "gemport: writing x 2/272 initializers, 6 s (94 s in all)",
    ]


@pytest.fixture
def counted(monkeypatch) -> list:
    """Every progress task of a command with a count: [description, total, unit, done at its end]."""
    seen: list = []
    enter, leave = progress._Reporter.enter, progress._Reporter.leave

    def record_enter(self, task):
        if task.total is not None:
            seen.append(task)
        enter(self, task)

    monkeypatch.setattr(progress._Reporter, "enter", record_enter)
    monkeypatch.setattr(progress._Reporter, "leave", leave)
    return seen


WRITES = {
    "hf-int4": ["quantize", "{src}", "{dst}", "--bits", "4", "--group-size", "32"],
    "hf-int4-asym-sharded": ["quantize", "{src}", "{dst}", "--bits", "4", "--group-size", "32", "--asym"],
    "hf-bf16": ["convert", "{src}", "{dst}", "--to", "hf", "--dtype", "bf16"],
    "gguf-q8_0": ["convert", "{src}", "{dst}.gguf", "--to", "gguf", "--quant", "q8_0"],
    "jax": ["convert", "{src}", "{dst}", "--to", "jax"],
}


@pytest.mark.parametrize("name", sorted(WRITES))
def test_writer_counts_what_the_summary_counts(tiny_models, tmp_path, counted, name):
    """A writer's progress in "tensors" ends at the count the end-of-command summary prints."""
    from gemport.cli import main
    from gemport.describe import describe

    src = tiny_models["gemma3-sharded-bf16" if "sharded" in name else "gemma3"]
    argv = [a.format(src=src, dst=tmp_path / "out") for a in WRITES[name]]
    if name == "jax":
        pytest.importorskip("orbax.checkpoint")
    assert main(argv) == 0
    tasks = [t for t in counted if t.unit == "tensors"]
    assert len(tasks) == 1, [(t.description, t.unit) for t in counted]
    info = describe(argv[2])
    assert tasks[0].done == tasks[0].total == info["tensors"]


def test_onnx_writer_counts_initializers_and_says_so(tiny_models, tmp_path, counted):
    import onnx

    from gemport.cli import main

    out = tmp_path / "onnx"
    assert main(["convert", str(tiny_models["gemma3"]), str(out), "--to", "onnx", "--quant", "int4"]) == 0
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    (task,) = [t for t in counted if t.description.startswith("writing")]
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert 0 < len(external) < len(graph.initializer)  # the small ones stay in model.onnx
    assert task.unit == "initializers into model.onnx.data" and task.done == task.total == len(external)
