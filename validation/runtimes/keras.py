"""The parity runtime for Keras presets: keras-hub itself (Keras 3 on JAX), fp32, CPU.

keras-hub pins its own Keras and JAX and declares tensorflow-text (TensorFlow), so it lives in its own
environment, ``build/keras-venv`` (``make keras-venv``; pins in requirements/keras-runtime.txt, without
TensorFlow), and runs there as a worker process (validation/runtimes/keras_worker.py) that loads the
preset with keras-hub's ``from_preset``. This module reads the preset with gemport's own reader first
(which refuses a malformed preset with a typed error naming the file), starts the worker and exchanges
token windows and log-probabilities with it over pipes, as validation/runtimes/jax.py does.

``GEMPORT_KERAS_PYTHON`` names another interpreter with keras-hub installed.
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

ROOT = Path(__file__).resolve().parents[2]
VENV_PYTHON = ROOT / "build" / "keras-venv" / "bin" / "python"
WORKER = Path(__file__).with_name("keras_worker.py")
PYTHON_ENV = "GEMPORT_KERAS_PYTHON"
MAKE_TARGET = "make keras-venv"


def keras_python() -> Path:
    """The interpreter of keras-hub's environment; UnsupportedError naming the make target if absent."""
    python = Path(os.environ.get(PYTHON_ENV) or VENV_PYTHON)
    if not (python.is_file() and os.access(python, os.X_OK)):
        raise UnsupportedError(
            f"validating Keras presets needs keras-hub's environment, and {python} does not exist: run "
            f"`{MAKE_TARGET}` in {ROOT} (builds {VENV_PYTHON.parent.parent}, about 0.7 GB on disk and half a "
            f"minute, from PyPI), or set {PYTHON_ENV} to another Python with keras-hub and the JAX backend"
        )
    return python


class KerasHubRuntime:
    """A keras-hub preset loaded with ``from_preset`` and run by keras-hub's Gemma backbone (fp32, CPU)."""

    kind = PARITY

    def __init__(self, path: Path):
        from converters import keras as keras_format

        self.path = Path(path)
        python = keras_python()
        spec = keras_format.read(self.path).spec
        keras_format.check_expressible(spec, self.path)
        if json.loads((self.path / keras_format.CONFIG).read_text())["config"].get("vision_encoder") is not None:
            raise UnsupportedError(
                "a multimodal preset: keras-hub's Gemma 3 runs it with images; validate its text model converted to "
                "another format (e.g. --to hf)",
                self.path,
            )
        self.vocab_size = spec.vocab_size
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        log.info("loading %s with keras-hub (%s)", self.path, python)
        env = os.environ | {
            "KERAS_BACKEND": "jax",
            "JAX_PLATFORMS": "cpu",
            "CUDA_VISIBLE_DEVICES": "",
            "TF_CPP_MIN_LOG_LEVEL": "3",
        }
        # -I: isolated mode, so this folder (holding this keras.py) is not on the worker's sys.path.
        self._proc = subprocess.Popen(
            [str(python), "-I", str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )
        self._send({"preset": str(self.path.resolve())})
        self._ready: dict | None = None  # read when first used: the caller loads the reference meanwhile

    def _wait_ready(self) -> dict:
        if self._ready is None:
            ready = self._reply("load it")
            if "error" in ready:
                self.close()
                raise CheckpointError(f"keras-hub cannot load it: {ready['error']}", self.path)
            if ready["vocab_size"] != self.vocab_size:
                self.close()
                raise CheckpointError(
                    f"keras-hub loaded {ready['vocab_size']} vocabulary rows, the preset says {self.vocab_size}",
                    self.path,
                )
            self._ready = ready
            log.info("%s: %s", self.path, self.name)
        return self._ready

    @property
    def name(self) -> str:
        """e.g. "keras-hub 0.32.0 (Gemma3CausalLM.from_preset, Gemma3Tokenizer; Keras 3.15.1, JAX 0.10.2, ...)"."""
        ready = self._wait_ready()
        v = ready["versions"]
        return f"keras-hub {v['keras-hub']} ({ready['model']}; Keras {v['keras']}, JAX {v['jax']}, fp32, CPU)"

    def _send(self, message: dict) -> None:
        try:
            self._proc.stdin.write((json.dumps(message) + "\n").encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the worker is gone; _reply says why

    def _reply(self, doing: str) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
            raise CheckpointError(
                f"keras-hub's worker exited ({self._proc.returncode}) trying to {doing}: {self._last_error()}",
                self.path,
            )
        return json.loads(line)

    def _last_error(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode("utf-8", errors="replace")
        log.debug("keras worker stderr:\n%s", text)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else "no message"

    def logprobs(self, tokens: list[int]) -> np.ndarray:
        """float32 log-softmax [len(tokens), vocab_size] of one window; row i predicts token i + 1."""
        self._wait_ready()
        self._send({"tokens": [int(t) for t in tokens]})
        reply = self._reply(f"score a window of {len(tokens)} tokens")
        if "error" in reply:
            raise CheckpointError(f"keras-hub failed on a window of {len(tokens)} tokens: {reply['error']}", self.path)
        out = np.empty((reply["rows"], reply["cols"]), dtype="<f4")
        view, done = memoryview(out).cast("B"), 0
        while done < len(view):
            n = self._proc.stdout.readinto(view[done:])
            if not n:
                raise CheckpointError(f"keras-hub's worker stopped mid-window: {self._last_error()}", self.path)
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
