"""Runtimes that run in another Python environment, as a worker process spoken to over pipes.

Google's gemma library and keras-hub pin packages gemport's environment cannot hold, so each lives in its
own venv (``make gemma-venv``, ``make keras-venv``) and runs there as a worker script
(gemma_worker.py, keras_worker.py). The protocol: one JSON line of setup from gemport; one JSON line
back once loaded (``{"error": ...}`` or what was loaded); then per window one JSON line of tokens, and
back one JSON line (``rows``, ``cols`` or ``error``) followed by ``rows * cols`` little-endian float32
log-probs. The worker's stderr goes to a temporary file whose last line names the cause when it dies.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import IO

import numpy as np

from gemport.errors import CheckpointError, UnsupportedError
from validation.runtimes import PARITY

log = logging.getLogger(__name__)


def venv_python(env_var: str, default: Path, needs: str, make_target: str, size: str) -> Path:
    """The interpreter of a runtime's own environment: $``env_var``, else ``default``; UnsupportedError
    naming the make target that builds it (``size``: its disk and time, in words) if it is absent."""
    python = Path(os.environ.get(env_var) or default)
    if not (python.is_file() and os.access(python, os.X_OK)):
        root = Path(__file__).resolve().parents[2]
        raise UnsupportedError(
            f"validating {needs}'s environment, and {python} does not exist: run `{make_target}` in {root} "
            f"(builds {default.parent.parent}, {size}, from PyPI), or set {env_var} to another Python with it"
        )
    return python


class WorkerRuntime:
    """The worker side of a runtime: started by ``_start``, its load reply read when first used."""

    kind = PARITY
    who = "the worker"  # in messages: "the gemma library", "keras-hub"
    path: Path

    def _start(self, python: Path, worker: Path, env: dict[str, str], setup: dict) -> None:
        self._stderr: IO[bytes] | None = tempfile.TemporaryFile()
        # -I: isolated mode, so runtimes/ (which holds modules named like the worker's packages) is not on
        # the worker's sys.path and gemport's PYTHONPATH and user site stay out of its environment.
        self._proc = subprocess.Popen(
            [str(python), "-I", str(worker)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=os.environ | env,
        )
        self._ready: dict | None = None  # read when first used: the caller loads the reference meanwhile
        self._send(setup)

    def _check_ready(self, ready: dict) -> None:
        """CheckpointError if what the worker loaded disagrees with what gemport read (the worker is closed)."""

    def _wait_ready(self) -> dict:
        if self._ready is None:
            ready = self._reply("load it")
            if "error" in ready:
                self.close()
                raise CheckpointError(f"{self.who} cannot load it: {ready['error']}", self.path)
            self._check_ready(ready)
            self._ready = ready
            log.info("%s: %s", self.path, self.name)
        return self._ready

    @property
    def name(self) -> str:
        raise NotImplementedError

    def _send(self, message: dict) -> None:
        try:
            self._proc.stdin.write((json.dumps(message) + "\n").encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the worker is gone; _reply says why

    def _reply(self, doing: str) -> dict:
        """The worker's next reply line; CheckpointError with its last stderr line if it died."""
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
            raise CheckpointError(
                f"{self.who}'s worker exited ({self._proc.returncode}) trying to {doing}: {self._last_error()}",
                self.path,
            )
        return json.loads(line)

    def _last_error(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode("utf-8", errors="replace")
        log.debug("%s worker stderr:\n%s", self.who, text)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else "no message"

    def logprobs(self, tokens: list[int]) -> np.ndarray:
        """float32 log-softmax [len(tokens), vocab_size] of one window; row i predicts token i + 1."""
        self._wait_ready()
        self._send({"tokens": [int(t) for t in tokens]})
        reply = self._reply(f"score a window of {len(tokens)} tokens")
        if "error" in reply:
            raise CheckpointError(f"{self.who} failed on a window of {len(tokens)} tokens: {reply['error']}", self.path)
        out = np.empty((reply["rows"], reply["cols"]), dtype="<f4")
        view, done = memoryview(out).cast("B"), 0
        while done < len(view):
            n = self._proc.stdout.readinto(view[done:])
            if not n:
                raise CheckpointError(f"{self.who}'s worker stopped mid-window: {self._last_error()}", self.path)
            done += n
        return out

    def close(self) -> None:
        """Stop the worker (end of its input) and free its stderr file."""
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.close()
                proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        if proc is not None:
            proc.stdout.close()
        if getattr(self, "_stderr", None) is not None:
            self._stderr.close()
            self._stderr = None

    def __del__(self) -> None:
        self.close()
