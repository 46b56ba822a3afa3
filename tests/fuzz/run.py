"""Run fuzz targets and report what they did.

``python -m tests.fuzz.run [TARGET ...] [--seconds S | --runs N] [--timeout T]``

Each target runs in its own process (worker.py) for ``--seconds`` or ``--runs`` executions,
starting from its seeds (build/fuzz/seeds/TARGET, built on first use) and the inputs earlier runs
kept (build/fuzz/corpus/TARGET). A crash, a timeout or a memory-limit hit is saved under
tests/fuzz/findings/ and makes the exit status 1. One line per target goes to stdout and
build/fuzz/results/TARGET.json: executions, seconds, executions per second, findings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.fuzz.corpus import FUZZ, ROOT, SEEDS, STAMP

FINDINGS = Path(__file__).resolve().parent / "findings"
RESULTS = FUZZ / "results"
LOGS = FUZZ / "logs"
ALL = (
    "gguf",
    "safetensors",
    "hf-folder",
    "config",
    "compressed-tensors",
    "jax",
    "jax-orbax",
    "gemma-pytorch",
    "onnx",
    "keras",
)
# Kept files of a finding, as libFuzzer names them after -artifact_prefix.
_ARTIFACT = re.compile(r"(crash|timeout|oom|leak|slow-unit)-[0-9a-f]+")


def ensure_corpus() -> None:
    """Build seeds in a separate process: the worker must import gemport under instrumentation."""
    if not STAMP.is_file() or not all((SEEDS / t).is_dir() and any((SEEDS / t).iterdir()) for t in ALL):
        subprocess.run([sys.executable, "-m", "tests.fuzz.corpus"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def run_target(name: str, seconds: int | None, runs: int | None, timeout: int) -> dict:
    corpus = FUZZ / "corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    FINDINGS.mkdir(exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    before = set(FINDINGS.iterdir())
    flags = [f"-timeout={timeout}", f"-artifact_prefix={FINDINGS}/{name}-", "-print_final_stats=1"]
    flags += [f"-max_total_time={seconds}"] if seconds else [f"-runs={runs}"]
    shm = Path("/dev/shm")
    scratch = tempfile.mkdtemp(prefix=f"gemport-fuzz-{name}-", dir=shm if shm.is_dir() else None)
    # TMPDIR in the scratch folder (tmpfs where there is one): readers that make temporary folders
    # (the GGUF tokenizer rebuild) would otherwise spend most of a run in rmdir on a slow disk.
    tmp = Path(scratch) / "tmp"
    tmp.mkdir()
    env = os.environ | {"FUZZ_SCRATCH": scratch, "FUZZ_FINDINGS": str(FINDINGS), "TMPDIR": str(tmp)}
    env["PYTHONHASHSEED"] = "0"
    cmd = [sys.executable, "-m", "tests.fuzz.worker", name, *flags, str(corpus), str(SEEDS / name)]
    log = LOGS / f"{name}.{os.getpid()}.log"  # runs of one target may overlap (CI and make fuzz)
    start = time.monotonic()
    try:
        with open(log, "w", encoding="utf-8") as out:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    wall = time.monotonic() - start
    text = log.read_text(encoding="utf-8", errors="replace")
    found = sorted(str(p.relative_to(ROOT)) for p in set(FINDINGS.iterdir()) - before if _ARTIFACT.search(p.name))
    result = {
        "target": name,
        "executions": _stat(text, "number_of_executed_units"),
        "exec_per_s": _stat(text, "average_exec_per_sec"),
        "seconds": round(wall, 1),
        "peak_rss_mb": _stat(text, "peak_rss_mb"),
        "coverage": _last_cov(text),
        "exit": code,
        "findings": found,
        "log": str(log.relative_to(ROOT)),
    }
    if code != 0:
        result["error"] = _error_summary(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _stat(text: str, key: str) -> int | None:
    found = re.findall(rf"stat::{key}:\s+(\d+)", text)  # the last: a log may hold an earlier run's lines
    return int(found[-1]) if found else None


def _last_cov(text: str) -> int | None:
    found = re.findall(r"cov: (\d+)", text)
    return int(found[-1]) if found else None


def _error_summary(text: str) -> str:
    """The exception line of a Python traceback, or libFuzzer's reason (timeout, out-of-memory)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "Uncaught Python exception" in line:
            tail = [x for x in lines[i + 1 :] if x and not x.startswith((" ", "Traceback"))]
            where = [x.strip() for x in lines[i + 1 :] if x.strip().startswith("File ")]
            return (tail[0] if tail else line) + (f" at {where[-1]}" if where else "")
    for line in lines:
        if "ERROR: libFuzzer" in line or "ALARM" in line:
            return line.strip()
    return lines[-1] if lines else "no output"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("targets", nargs="*", default=list(ALL), help=f"targets (default: all: {', '.join(ALL)})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--seconds", type=int, help="time budget per target")
    g.add_argument("--runs", type=int, help="executions per target")
    p.add_argument("--timeout", type=int, default=5, help="seconds one input may take (default 5)")
    args = p.parse_args(argv)
    unknown = [t for t in args.targets if t not in ALL]
    if unknown:
        p.error(f"unknown target {unknown[0]} (known: {', '.join(ALL)})")
    if not args.seconds and not args.runs:
        args.seconds = 30
    ensure_corpus()
    failed = 0
    for name in args.targets:
        r = run_target(name, args.seconds, args.runs, args.timeout)
        print(json.dumps(r), flush=True)
        failed += r["exit"] != 0 or bool(r["findings"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
