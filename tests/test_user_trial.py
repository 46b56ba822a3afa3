"""Faults a new user met: Ctrl-C while GGUF blocks are quantized in worker processes, and GGUF files
that are not models (an importance matrix, a later shard of a split model, a file named .gguf without
the magic), each of which must say in one line what it is."""

from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from converters import gguf_writer
from gemport.cli import main
from quantizers import gguf_mix
from quantizers.imatrix import Imatrix, load_imatrix, save_imatrix, summary
from tests.tiny import make_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny("gemma3", tmp_path_factory.mktemp("trial") / "gemma3")


# --- Ctrl-C during parallel quantization ------------------------------------------------------------

# gemport convert with every quantized tensor sent to the worker pool (the tiny model's are all below
# the size that would be), each tensor logged then held 0.3 s, so that a SIGINT sent after the first
# layer tensor's log line finds the workers started and the conversion still going.
SLOW_PARALLEL_CONVERT = r"""
import sys, time
import converters.gguf_writer as w
w.PARALLEL_MIN_VALUES = 0
logged = w.log_tensor
def log_then_wait(*args, **kwargs):
    logged(*args, **kwargs)
    time.sleep(0.3)
w.log_tensor = log_then_wait
from gemport import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ctrl_c_during_parallel_quantization_prints_one_line_and_leaves_nothing(tiny, tmp_path):
    dst = tmp_path / "out" / "model.gguf"
    dst.parent.mkdir()
    argv = ["convert", str(tiny), str(dst), "--quant", "q8_0", "--jobs", "2", "-v"]
    # A session of its own, signalled as a group: what a terminal's Ctrl-C (or `timeout -s INT`) does,
    # so the workers and the fork server get the SIGINT too.
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_PARALLEL_CONVERT, *argv],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    seen = []
    for line in proc.stderr:
        seen.append(line.rstrip("\n"))
        if line.startswith("INFO tensor blk."):
            os.killpg(proc.pid, signal.SIGINT)
            break
    seen += proc.stderr.read().splitlines()
    code = proc.wait(timeout=120)
    assert any(s.startswith("INFO tensor blk.") for s in seen), seen
    progress = [s for s in seen if s.startswith("gemport: ") and "interrupted" not in s]
    others = [s for s in seen if not s.startswith("INFO ") and s not in progress]
    assert code == 130 and others == ["gemport: interrupted"], "\n".join(seen)
    assert list(dst.parent.iterdir()) == []


def _ignores_sigint(pid: int) -> bool:
    """Bit SIGINT - 1 of the process's ignored-signal mask (ref: proc(5), /proc/PID/status SigIgn)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGINT - 1) & 1)
    raise AssertionError(f"no SigIgn in /proc/{pid}/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/PID/status")
def test_every_process_of_the_pool_ignores_sigint_and_the_caller_keeps_its_handler():
    from multiprocessing import forkserver

    before = signal.getsignal(signal.SIGINT)
    plans = [gguf_mix.TensorPlan("blk.0.attn_q.weight", "Q8_0", "Q8_0")]
    with gguf_writer._pool(2, plans) as pool:
        workers = {f.result() for f in [pool.submit(os.getpid) for _ in range(8)]}
        server = forkserver._forkserver._forkserver_pid
        assert workers and all(_ignores_sigint(pid) for pid in workers)
        assert server is not None and _ignores_sigint(server)
    assert signal.getsignal(signal.SIGINT) is before and not _ignores_sigint(os.getpid())


def test_an_interrupted_pool_drops_its_queued_work():
    plans = [gguf_mix.TensorPlan("blk.0.attn_q.weight", "Q8_0", "Q8_0")]
    with pytest.raises(KeyboardInterrupt), gguf_writer._pool(2, plans) as pool:
        futures = [pool.submit(sum, [i]) for i in range(200)]
        raise KeyboardInterrupt
    assert any(f.cancelled() for f in futures)


def test_parallel_quantization_writes_the_same_bytes(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gguf_writer, "PARALLEL_MIN_VALUES", 0)
    for jobs in ("1", "2"):
        assert main(["convert", str(tiny), str(tmp_path / f"j{jobs}.gguf"), "--quant", "q4_k_m", "--jobs", jobs]) == 0
    assert filecmp.cmp(tmp_path / "j1.gguf", tmp_path / "j2.gguf", shallow=False)


# --- GGUF files that are not models -----------------------------------------------------------------


def _one_line_error(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.fixture(scope="module")
def split_model(tiny, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("split")
    assert main(["convert", str(tiny), str(folder / "sp.gguf"), "--max-shard-size", "200K"]) == 0
    shards = sorted(folder.iterdir())
    assert len(shards) >= 3, shards
    return shards


def _small_imatrix() -> Imatrix:
    names = [f"blk.{i}.{n}" for i in range(3) for n in ("attn_q.weight", "ffn_down.weight")]
    return Imatrix(
        sums={n: np.ones(8, np.float32) for n in names},
        counts=dict.fromkeys(names, 256),
        chunks=4,
        chunk_size=64,
        datasets=["corpus.txt (calibration split)"],
    )


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_an_imatrix_is_named_and_pointed_at_convert_imatrix(tmp_path, capsys, command):
    path = save_imatrix(_small_imatrix(), tmp_path / "im.gguf")
    argv = [command, str(path)] + ([str(tmp_path / "out.gguf")] if command == "convert" else [])
    assert _one_line_error(argv, capsys) == (
        f"gemport: error: {path}: an importance matrix (general.type imatrix), not a model; "
        "give it to `gemport convert --imatrix`"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["im.gguf"]


def test_an_adapter_is_named(tmp_path, capsys):
    path = tmp_path / "lora.gguf"
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_type("adapter")  # ref: convert_lora_to_gguf.py: general.type adapter, adapter.type lora
    writer.add_string("adapter.type", "lora")
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((2, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "a LoRA adapter (general.type adapter), not a model" in _one_line_error(["inspect", str(path)], capsys)


@pytest.mark.parametrize("command", ["inspect", "convert", "validate"])
def test_a_later_shard_names_its_place_and_the_first_file(split_model, tiny, tmp_path, capsys, command):
    count = len(split_model)
    first = f"sp-00001-of-{count:05d}.gguf"
    for number, shard in enumerate(split_model[1:], start=2):
        argv = [command, str(shard)]
        argv += {"convert": [str(tmp_path / "out.gguf")], "validate": ["--reference", str(tiny)]}.get(command, [])
        line = _one_line_error(argv, capsys)
        assert line == f"gemport: error: {shard}: shard {number} of {count} of a split model: open {first}"
    assert list(tmp_path.iterdir()) == []


def test_a_renamed_later_shard_still_says_which_it_is(split_model, tmp_path, capsys):
    renamed = tmp_path / "part.gguf"
    renamed.write_bytes(split_model[2].read_bytes())
    line = _one_line_error(["inspect", str(renamed)], capsys)
    assert line.endswith(
        f"shard 3 of {len(split_model)} of a split model: open NAME-00001-of-{len(split_model):05d}.gguf"
    )


def test_the_first_shard_still_reads(split_model, capsys):
    assert main(["inspect", str(split_model[0])]) == 0
    assert "gemma3" in capsys.readouterr().out


NOT_GGUF = {
    "text.gguf": b"hello, this is text\n" * 4,
    "short.gguf": b"hi\n",
    "upper.GGUF": b"\x89PNG\r\n\x1a\n" + bytes(64),
    "safetensors-inside.gguf": b"\x10\0\0\0\0\0\0\0{}" + bytes(40),
}


@pytest.mark.parametrize("name", list(NOT_GGUF))
def test_a_gguf_named_file_without_the_magic_says_so(tmp_path, capsys, name):
    path = tmp_path / name
    path.write_bytes(NOT_GGUF[name])
    line = _one_line_error(["inspect", str(path)], capsys)
    assert line == f"gemport: error: {path}: not a GGUF file (no GGUF magic)"


def test_an_empty_gguf_is_truncated_not_foreign(tmp_path, capsys):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    assert "truncated GGUF file: 0 bytes" in _one_line_error(["inspect", str(path)], capsys)


@pytest.mark.parametrize("make", ["text", "shard"])
def test_imatrix_option_given_something_else_named_gguf(split_model, tiny, tmp_path, capsys, make):
    if make == "text":
        path, message = tmp_path / "im.gguf", "not a GGUF file (no GGUF magic)"
        path.write_text("hello\n" * 10)
    else:
        path, message = split_model[1], "a shard of a split GGUF model, not an imatrix"
    argv = ["convert", str(tiny), str(tmp_path / "out.gguf"), "--quant", "q4_k_m", "--imatrix", str(path)]
    assert _one_line_error(argv, capsys) == f"gemport: error: {path}: {message}"
    assert not (tmp_path / "out.gguf").exists()


# --- what `gemport imatrix` can end with --------------------------------------------------------------


def test_imatrix_summary_counts_entries_layers_chunks_and_tokens(tmp_path):
    line = summary(load_imatrix(save_imatrix(_small_imatrix(), tmp_path / "im.gguf")))
    assert line == (
        "imatrix  6 entries (3 layers), 4 chunks of 64 tokens, 256 tokens, from corpus.txt (calibration split)"
    )


def test_imatrix_summary_of_a_legacy_file_leaves_out_the_unknown_tokens():
    legacy = Imatrix(sums={"blk.0.attn_q.weight": np.ones(4, np.float32)}, counts={"blk.0.attn_q.weight": 3}, chunks=3)
    assert summary(legacy) == "imatrix  1 entry (1 layer), 3 chunks"
