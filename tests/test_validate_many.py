"""`gemport validate A B C --reference R`: several candidates in one process, the reference prepared once.

Each candidate's figures are those of its own `gemport validate` call; a bad candidate is reported in one
line and the others go on; the exit code is the worst of them (2 an error, 1 a failed gate)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gemport.cli import main
from tests.test_refcache import N_CTX, _forbid_reference
from validation import refcache
from validation.runtimes import hf_transformers
from validation.validate import validate


@pytest.fixture(scope="module")
def tiny(tiny_models) -> Path:
    return tiny_models["gemma3"]


@pytest.fixture(scope="module")
def candidates(tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("many")
    out = {"q8": root / "tiny.q8_0.gguf", "q4": root / "tiny.q4_k_m.gguf"}
    for quant, path in (("q8_0", out["q8"]), ("q4_k_m", out["q4"])):
        assert main(["convert", str(tiny), str(path), "--to", "gguf", "--quant", quant]) == 0
    bogus = root / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 20)
    out["bogus"] = bogus
    return out


def _args(paths: list[Path], reference: Path, corpus: Path, *extra: str) -> list[str]:
    return ["validate", *map(str, paths), "--reference", str(reference), "--corpus", str(corpus)] + [
        "--ctx",
        str(N_CTX),
        "--windows",
        "2",
        *extra,
    ]


def test_several_candidates_equal_their_own_calls(tiny, candidates, corpus, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    order = [candidates["q8"], candidates["bogus"], candidates["q4"]]
    out = tmp_path / "all.json"
    computed = []
    real_write = refcache.write_cache
    monkeypatch.setattr(refcache, "write_cache", lambda *a, **k: computed.append(1) or real_write(*a, **k))
    code = main(_args(order, tiny, corpus, "--reference-cache", str(cache), "--json", str(out)))
    captured = capsys.readouterr()
    assert code == 2  # the bogus one; the two others were still scored
    assert computed == [1]  # the reference's log-probs made once for both
    errors = [line for line in captured.err.splitlines() if line.startswith("gemport: error:")]
    assert len(errors) == 1 and str(candidates["bogus"]) in errors[0]
    records = json.loads(out.read_text())
    assert [r["candidate"] for r in records] == [str(p) for p in order]
    assert records[1]["exit_code"] == 2 and str(candidates["bogus"]) in records[1]["error"]
    summary = captured.out.splitlines()[-5:]
    assert summary[0] == "summary, 3 candidates: 2 PASS, 0 FAIL, 1 ERROR"
    assert summary[1].split()[:3] == ["candidate", "format", "runtime"]
    assert summary[2].endswith("PASS") and summary[4].endswith("PASS")
    assert f"ERROR: {records[1]['error']}" in summary[3]  # the message, as its error line gave it

    _forbid_reference(monkeypatch, tiny)  # each alone: the same cache, the same figures
    for record, path in ((records[0], order[0]), (records[2], order[2])):
        alone = validate(path, tiny, corpus, N_CTX, 2, reference_cache=cache)
        assert record["metrics"] == alone.metrics.to_json()
        assert not alone.reference_cache_computed


def test_live_reference_is_loaded_once(tiny, candidates, corpus, tmp_path, capsys, monkeypatch):
    loads = []
    real = hf_transformers.TransformersRuntime

    class Counting(real):
        def __init__(self, path, dtype="float32"):
            loads.append(Path(path))
            super().__init__(path, dtype)

    import validation.validate as v

    monkeypatch.setattr(v, "TransformersRuntime", Counting)
    out = tmp_path / "live.json"
    args = _args([candidates["q8"], candidates["q4"]], tiny, corpus, "--no-reference-cache", "--json", str(out))
    assert main(args) == 0
    assert loads == [tiny]
    monkeypatch.setattr(v, "TransformersRuntime", real)
    records = json.loads(out.read_text())
    for record, path in zip(records, (candidates["q8"], candidates["q4"]), strict=True):
        assert record["metrics"] == validate(path, tiny, corpus, N_CTX, 2).metrics.to_json()


def test_a_failed_gate_is_exit_1_and_the_others_pass(tiny, candidates, corpus, tmp_path, capsys):
    q8 = validate(candidates["q8"], tiny, corpus, N_CTX, 2, reference_cache=tmp_path)
    q4 = validate(candidates["q4"], tiny, corpus, N_CTX, 2, reference_cache=tmp_path)
    bound = (q8.metrics.kld + q4.metrics.kld) / 2  # between the two: q8 passes, q4 fails
    args = _args([candidates["q8"], candidates["q4"]], tiny, corpus, "--reference-cache", str(tmp_path))
    assert main([*args, "--max-kld", repr(bound)]) == 1
    captured = capsys.readouterr()
    failed = [line for line in captured.err.splitlines() if line.startswith("gemport: error:")]
    assert len(failed) == 1 and str(candidates["q4"]) in failed[0] and "gate max-kld" in failed[0]
    last = captured.out.splitlines()[-2:]
    assert last[0].endswith("PASS") and last[1].endswith("FAIL max-kld")


def test_a_bad_reference_stops_at_once(candidates, corpus, tmp_path, capsys):
    missing = tmp_path / "no-such-reference"
    assert main(_args([candidates["q8"], candidates["q4"]], missing, corpus)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0]


def test_a_candidate_given_twice_is_scored_once(tiny, candidates, corpus, tmp_path, caplog):
    out = tmp_path / "twice.json"
    again = candidates["q8"].parent / ".." / candidates["q8"].parent.name / candidates["q8"].name
    args = _args([candidates["q8"], candidates["q4"], again], tiny, corpus, "--reference-cache", str(tmp_path))
    assert main([*args, "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["candidate"] for r in records] == [str(candidates["q8"]), str(candidates["q4"])]
    said = [r.getMessage() for r in caplog.records if "scored once" in r.getMessage()]
    assert said == [f"{again} is the same as {candidates['q8']}: scored once"]


def test_an_interrupted_run_keeps_what_was_scored(tiny, candidates, corpus, tmp_path, capsys, monkeypatch):
    import validation.validate as v

    real, calls = v._validate_one, []

    def interrupted_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(v, "_validate_one", interrupted_second)
    out = tmp_path / "partial.json"
    order = [candidates["q8"], candidates["q4"], tmp_path / "never.gguf"]
    order[2].write_bytes(candidates["q8"].read_bytes())
    args = _args(order, tiny, corpus, "--reference-cache", str(tmp_path), "--json", str(out))
    assert main(args) == 130
    captured = capsys.readouterr()
    assert captured.err.strip().endswith("gemport: interrupted")
    assert "summary, 1 of 3 candidates (interrupted): 1 PASS, 0 FAIL, 0 ERROR" in captured.out
    records = json.loads(out.read_text())
    assert [r["candidate"] for r in records] == [str(candidates["q8"])]


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_keeps_what_was_scored(tiny, candidates, corpus, tmp_path, signum, code):
    # a real signal, not a raised KeyboardInterrupt: the JSON is written although the signal is recorded,
    # and replaces an older file of the same name
    copies = []
    for i in range(12):
        copies.append(tmp_path / f"c{i}.gguf")
        copies[-1].write_bytes(candidates["q8"].read_bytes())
    out = tmp_path / "signalled.json"
    out.write_text("old")
    argv = _args(copies, tiny, corpus, "--reference-cache", str(tmp_path / "cache"), "--json", str(out))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "gemport.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    for line in child.stdout:  # the first candidate's table is complete
        if line.startswith("result"):
            break
    child.send_signal(signum)
    rest, err = child.communicate(timeout=120)
    assert child.returncode == code, err
    title = next(line for line in rest.splitlines() if line.startswith("summary, "))
    done = int(title.split()[1])
    assert 1 <= done < len(copies) and f"{done} of {len(copies)} candidates (interrupted)" in title
    records = json.loads(out.read_text())
    assert [r["candidate"] for r in records] == [str(c) for c in copies[:done]]
