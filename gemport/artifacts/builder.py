"""`gemport build`: every artifact of a recipe built, validated and recorded in OUT/manifest.json.

Each build and each validation is a `gemport convert|quantize|validate` child process, so that the
manifest holds the exact command line a user can rerun, and the wall time and peak RSS of each
(``os.wait4``: the largest process of the child's tree). The reference's log-probabilities are
computed once into OUT/.reference-cache (validation/refcache.py) before the first validation, and
every validation reads them from there.

Resuming: an artifact is rebuilt only when its inputs changed: the hash of the source's files, its
recipe entry, the gemport version and, for one built from another artifact, that artifact's inputs
(``inputs`` in the manifest); a validation is rerun only when the artifact, the reference or the
protocol changed. Writers never leave a partial artifact (gemport/output.py): a build killed in the
middle leaves nothing under the artifact's name, and no manifest record, so the next run builds it.
The manifest is rewritten (atomically) after every step.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from gemport import __version__
from gemport.artifacts.recipe import Artifact, Recipe
from gemport.errors import InputError, OutputError
from gemport.output import atomic_output, clean_stale_temporaries

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "gemport-build/1"
CACHE = ".reference-cache"
LOGS = ".logs"
# the runtime package behind each format's validation (validation/runtimes), for the manifest
RUNTIME_PACKAGES = {
    "hf": ("transformers", "torch"),
    "gguf": ("llama-cpp-python",),
    "onnx": ("onnxruntime", "onnxruntime-genai"),
    "jax": (),  # Google's gemma library, in its own venv (build/gemma-venv)
    "trtllm": ("torch",),  # the layout runtime is gemport's own forward pass in torch
}


@dataclass(frozen=True)
class Step:
    """One child process: what a user would type, and what it cost."""

    command: list[str]
    wall_s: float
    peak_rss_mb: float
    exit_code: int
    log: Path

    def record(self, reused: bool = False) -> dict[str, Any]:
        return {
            "command": self.command,
            "wall_s": round(self.wall_s, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "exit_code": self.exit_code,
            "reused": reused,
        }

    def last_error(self) -> str:
        """The child's error line (gemport prints one), or its last line."""
        try:
            lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return f"exit {self.exit_code}"
        errors = [ln for ln in lines if "error:" in ln]
        return (errors or lines or [f"exit {self.exit_code}"])[-1].strip()


class Interrupted(Exception):
    """The build was stopped (Ctrl-C): the step did not finish and is not recorded."""


def _die_with_parent() -> None:
    """In the child: SIGKILL when the thread that started it dies, so that a killed build leaves no
    child writing on (ref: prctl(2) PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def _run(
    argv: list[str], shown: list[str], log_path: Path, running: set | None = None, lock=None, stopped=None
) -> Step:
    """Run ``argv`` with its output in ``log_path``; ``running`` holds the child while it runs. A child
    registered once ``stopped()`` is true (a stop that came while it was being started) is killed at once."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "wb") as out:
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        if running is not None:
            with lock:
                running.add(child)
                if stopped is not None and stopped():  # stop() ran between the caller's check and here
                    child.kill()
        try:
            _, status, usage = os.wait4(child.pid, 0)
        except BaseException:
            child.kill()
            raise
        finally:
            if running is not None:
                with lock:
                    running.discard(child)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    # ru_maxrss is in KiB on Linux
    return Step(shown, time.monotonic() - start, usage.ru_maxrss * 1024 / 1e6, child.returncode, log_path)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_records(root: Path, paths: list[Path], known: dict[str, dict] | None = None) -> list[dict]:
    """path (relative to ``root``), bytes, mtime_ns and sha256 of each file; a hash in ``known`` (by
    path) is reused when size and mtime are unchanged."""
    records = []
    for p in sorted(paths):
        st = p.stat()
        rel = str(p.relative_to(root))
        old = (known or {}).get(rel)
        same = old and old.get("bytes") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns
        digest = old["sha256"] if same else sha256_file(p)
        records.append({"path": rel, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest})
    return records


def tree_files(path: Path) -> list[Path]:
    """A folder's files (hidden ones too, symlinks not followed), or the file itself."""
    if path.is_file():
        return [path]
    return [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def versions(fmt: str) -> dict[str, str]:
    found = {"gemport": __version__, "python": sys.version.split()[0]}
    for package in RUNTIME_PACKAGES.get(fmt, ()):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return found


@dataclass
class Build:
    """One run of a recipe into ``out``; ``names`` None for every artifact."""

    recipe: Recipe
    out: Path
    names: list[str] | None = None
    jobs: int = 1
    force: bool = False
    # progress: ``stage(text)`` around each child process, ``done(name, record)`` after each artifact
    stage: Callable[[str], AbstractContextManager] = lambda text: nullcontext()
    done: Callable[[str, dict], None] = lambda name, record: None

    def __post_init__(self) -> None:
        self.out = self.out.resolve()  # the child processes (and Ray's workers) may run elsewhere
        self.lock = threading.Lock()
        self.children: set[subprocess.Popen] = set()
        self.stopping = False
        self.manifest: dict[str, Any] = {}
        self.previous: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Sent to Ray's workers: no lock, no progress callbacks (they belong to the driver)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("lock", "stage", "done", "children")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()
        self.children = set()
        self.stage = lambda text: nullcontext()
        self.done = lambda name, record: None

    # ------------------------------------------------------------------ the manifest

    def _load_previous(self) -> None:
        path = self.out / MANIFEST
        if not path.is_file():
            return
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            log.warning("%s is not readable JSON: every artifact is rebuilt", path)
            return
        if isinstance(old, dict) and old.get("format") == FORMAT and isinstance(old.get("artifacts"), dict):
            self.previous = old

    def _save(self) -> None:
        with self.lock, atomic_output(self.out / MANIFEST, overwrite=True) as tmp:
            tmp.write_text(json.dumps(self.manifest, indent=2) + "\n")

    def _set(self, name: str, record: dict | None) -> None:
        with self.lock:
            artifacts = self.manifest["artifacts"]
            if record is None:
                artifacts.pop(name, None)
            else:
                artifacts[name] = record
                order = [a.name for a in self.recipe.artifacts]  # manifest in recipe order
                self.manifest["artifacts"] = dict(sorted(artifacts.items(), key=lambda kv: order.index(kv[0])))
        self._save()

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        """Build, validate and record; returns the manifest."""
        self.out.mkdir(parents=True, exist_ok=True)
        with _exclusive(self.out):
            self.start()
            self._save()
            self._run_all(self.todo())
            self._save()
        return self.manifest

    def start(self) -> None:
        """The manifest's header, and the records of a previous run kept for reuse."""
        clean_stale_temporaries(self.out)
        self._load_previous()
        r = self.recipe
        names = {a.name for a in r.artifacts}
        source = self._fingerprint(r.source, "source")
        self.manifest = {
            "format": FORMAT,
            "gemport": __version__,
            "recipe": {"path": str(r.path), "sha256": sha256_file(r.path), "name": r.name},
            "source": source,
            # the reference is most often the source itself: its files are hashed once
            "reference": source if r.reference == r.source else self._fingerprint(r.reference, "reference"),
            "protocol": {"corpus": str(r.corpus) if r.corpus else None, "ctx": r.ctx, "windows": r.windows},
            "planned": [a.name for a in r.artifacts],  # every artifact of the recipe, built here or not
            # the recipe's artifacts not built this time keep their records (a partial --only run)
            "artifacts": {n: a for n, a in self.previous.get("artifacts", {}).items() if n in names},
        }

    def todo(self) -> list[Artifact]:
        return self.recipe.closure(self.names) if self.names else list(self.recipe.artifacts)

    def _fingerprint(self, path: Path, role: str) -> dict[str, Any]:
        old = {f["path"]: f for f in self.previous.get(role, {}).get("files", [])}
        files = file_records(path if path.is_dir() else path.parent, tree_files(path), old)
        return {"path": str(path), "sha256": digest([(f["path"], f["sha256"]) for f in files]), "files": files}

    def _run_all(self, todo: list[Artifact]) -> None:
        validating = [a for a in todo if self.wanted(a)]
        pool = ThreadPoolExecutor(max_workers=max(1, self.jobs))
        try:
            cache: Future | None = pool.submit(self._reference_cache) if validating else None
            done: dict[str, Future] = {}
            for art in todo:  # recipe order: an artifact's source is submitted before it
                dep = done.get(art.source) if art.source else None
                done[art.name] = pool.submit(self._one, art, dep, cache)
            for future in done.values():
                future.result()
        except BaseException:  # Ctrl-C, or an error: start nothing more, stop what runs
            self.stop()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def stop(self) -> None:
        """No step starts from now on, and the running children are killed (their steps are not recorded)."""
        with self.lock:
            self.stopping = True
            for child in self.children:
                child.kill()

    def _step(self, argv: list[str], shown: list[str], log_path: Path) -> Step:
        """A child process of this build, killed if the build stops (or dies: PR_SET_PDEATHSIG)."""
        with self.lock:
            if self.stopping:
                raise Interrupted
        step = _run(argv, shown, log_path, self.children, self.lock, lambda: self.stopping)
        if step.exit_code in (130, -signal.SIGINT):  # the child got the Ctrl-C of its terminal
            self.stop()
        if self.stopping:
            raise Interrupted
        return step

    def _reference_cache(self) -> dict[str, Any]:
        r = self.recipe
        args = ["--reference", str(r.reference), "--cache", str(self.out / CACHE), "--ctx", str(r.ctx)]
        args += ["--windows", str(r.windows)] + (["--corpus", str(r.corpus)] if r.corpus else [])
        with self.stage("reference log-probs"):
            argv = ["-m", "validation.refcache", *args]
            step = self._step([sys.executable, *argv], ["python", *argv], self.out / LOGS / "reference-cache.log")
        with self.lock:
            self.manifest["reference"]["cache"] = {"path": CACHE, **step.record()}
        if step.exit_code:
            raise OutputError(f"the reference log-probs could not be computed: {step.last_error()}", self.out / CACHE)
        return self.manifest["reference"]["cache"]

    def _gemport(self, args: list[str], log_path: Path) -> Step:
        """``gemport ARGS`` (this interpreter's gemport) as a step of this build."""
        return self._step([sys.executable, "-m", "gemport.cli", *args], ["gemport", *args], log_path)

    def _one(self, art: Artifact, dep: Future | None, cache: Future | None) -> dict[str, Any]:
        record = self.process(art, dep.result() if dep is not None else None, cache.result if cache else None)
        self._set(art.name, record)
        self.done(art.name, record)
        return record

    def wanted(self, art: Artifact) -> bool:
        """Validated in this run: an artifact built only as another's source in an --only run is not."""
        return art.validate and (self.names is None or art.name in self.names)

    def process(self, art: Artifact, dep: dict | None, wait_cache: Callable[[], Any] | None) -> dict[str, Any]:
        """Build (or reuse) and validate ``art``; ``dep`` is the record of the artifact it is built from;
        ``wait_cache`` returns once the reference cache is ready. Returns its manifest record."""
        record = self._build(art, dep)
        if record["status"] == "built" and self.wanted(art):
            if wait_cache is not None:
                wait_cache()
            self._validate(art, record)
        elif record["status"] == "built":
            record["status"], record["validation"] = "not-validated", None
        return record

    def inputs_of(self, art: Artifact) -> str:
        """What ``art`` is made from: the source's hash (or the inputs of the artifact it is built from),
        its recipe entry and gemport's version."""
        src = (
            self.manifest["source"]["sha256"]
            if art.source is None
            else self.inputs_of(self.recipe.artifact(art.source))
        )
        return digest({"source": src, "entry": art.entry, "gemport": __version__})

    def _build(self, art: Artifact, dep: dict | None) -> dict[str, Any]:
        src = self.recipe.source if art.source is None else self.out / self.recipe.artifact(art.source).filename
        inputs = self.inputs_of(art)
        dst = self.out / art.filename
        old = self.previous.get("artifacts", {}).get(art.name) or {}
        record = {
            "name": art.name,
            "entry": art.entry,
            "path": art.filename,
            "inputs": inputs,
            "versions": versions(art.format),
        }
        if art.source and (dep is None or dep.get("status") == "build-failed"):
            return {**record, "status": "build-failed", "error": f"its source artifact {art.source!r} was not built"}
        files = self._reusable(old, inputs, dst) if not self.force else None
        if files is not None:
            return {
                **old,
                **record,
                "files": files,
                "bytes": sum(f["bytes"] for f in files),
                "build": {**old["build"], "reused": True},
                "status": "built",
            }
        with self.stage(f"{art.name}: building"):
            step = self._gemport([*art.cli_args(src, dst), "--overwrite"], self.out / LOGS / f"{art.name}.build.log")
        record["build"] = step.record()
        if step.exit_code:
            return {**record, "status": "build-failed", "error": step.last_error()}
        files = file_records(self.out, _artifact_files(dst))
        return {**record, "files": files, "bytes": sum(f["bytes"] for f in files), "status": "built"}

    def _reusable(self, old: dict, inputs: str, dst: Path) -> list[dict] | None:
        """The artifact's file records if it is the one recorded for these inputs: the same files, each
        of the recorded size and sha256 (hashed again: a file changed in place is caught); else None."""
        if old.get("inputs") != inputs or old.get("status") in (None, "build-failed") or not old.get("files"):
            return None
        paths = _artifact_files(dst)
        if {str(p.relative_to(self.out)) for p in paths} != {f["path"] for f in old["files"]}:
            return None
        if any((self.out / f["path"]).stat().st_size != f["bytes"] for f in old["files"]):
            return None
        with self.stage(f"{dst.name}: checking its files"):
            files = file_records(self.out, paths)
        same = {f["path"]: f["sha256"] for f in files} == {f["path"]: f["sha256"] for f in old["files"]}
        return files if same else None

    def _validate(self, art: Artifact, record: dict[str, Any]) -> None:
        r = self.recipe
        dst = self.out / art.filename
        inputs = digest(
            {
                "artifact": record["inputs"],
                "reference": self.manifest["reference"]["sha256"],
                "protocol": self.manifest["protocol"],
                "gates": art.gates,
            }
        )
        old = self.previous.get("artifacts", {}).get(art.name) or {}
        old_val = old.get("validation") or {}
        if (
            not self.force
            and record["build"].get("reused")
            and old_val.get("inputs") == inputs
            and old_val.get("report") is not None
        ):
            record["validation"] = {**old_val, "reused": True}
            record["status"] = old["status"]
            return
        report_path = self.out / LOGS / f"{art.name}.validation.json"
        report_path.unlink(missing_ok=True)
        args = ["validate", str(_candidate(dst)), "--reference", str(r.reference), "--ctx", str(r.ctx)]
        args += ["--windows", str(r.windows), "--reference-cache", str(self.out / CACHE), "--json", str(report_path)]
        args += ["--corpus", str(r.corpus)] if r.corpus else []
        args += ["--max-kld", str(art.gates["max_kld"])] if "max_kld" in art.gates else []
        args += ["--max-ppl-delta", str(art.gates["max_ppl_delta"])] if "max_ppl_delta" in art.gates else []
        with self.stage(f"{art.name}: validating"):
            step = self._gemport(args, self.out / LOGS / f"{art.name}.validation.log")
        report = json.loads(report_path.read_text()) if step.exit_code in (0, 1) and report_path.is_file() else None
        record["validation"] = {**step.record(), "inputs": inputs, "report": report}
        if report is None:
            record["status"], record["error"] = "validation-failed", step.last_error()
            return
        if "min_top1" in art.gates:
            _add_top1_gate(report, art.gates["min_top1"])
        record["status"] = "passed" if report["passed"] else "gate-failed"


def _add_top1_gate(report: dict, limit: float) -> None:
    top1 = report["metrics"].get("top1_pct")
    passed = top1 is not None and top1 >= limit
    report["gates"].append({"name": "min-top1", "value": top1, "limit": limit, "source": "recipe", "passed": passed})
    report["passed"] = report["passed"] and passed


def _artifact_files(dst: Path) -> list[Path]:
    """The artifact's files: a folder's, a GGUF file, or the shards of a split GGUF (NAME-00001-of-N.gguf)."""
    if dst.exists():
        return tree_files(dst)
    return sorted(dst.parent.glob(f"{dst.stem}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].gguf"))


def _candidate(dst: Path) -> Path:
    """What `gemport validate` loads: the artifact, or the first shard of a split GGUF."""
    return dst if dst.exists() else (_artifact_files(dst) or [dst])[0]


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One `gemport build` per output folder at a time."""
    fd = os.open(out / ".gemport-build.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError("another gemport build is writing this folder", out) from None
        yield
    finally:
        os.close(fd)


def load_manifest(folder: Path) -> dict[str, Any]:
    """OUT/manifest.json of a build; InputError naming the file if missing or not a build manifest."""
    path = folder / MANIFEST if folder.is_dir() else folder
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"no build manifest here ({exc.strerror})", path) from None
    except ValueError as exc:
        raise InputError(f"not a JSON build manifest: {exc}", path) from None
    from gemport.artifacts.report import check

    return check(data, path)  # the fields the report and merge read, of the right types
