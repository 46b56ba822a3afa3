"""The parity runtime for JAX/Orbax artifacts: google-deepmind's ``gemma`` library (Flax), fp32, CPU.

The library pins a JAX older than gemport's and drags in TensorFlow through kauldron (ref: kauldron
typing/array_types.py imports tensorflow), so it lives in its own environment, ``build/gemma-venv``
(``make gemma-venv``; pins in requirements/gemma-runtime.txt), and runs there as a worker process
(validation/runtimes/gemma_worker.py). This module reads the checkpoint's spec with gemport's own JAX
reader (which also refuses a malformed tree with a typed error), checks that the library can express
it, starts the worker and exchanges token windows and log-probabilities with it over pipes.

``GEMPORT_GEMMA_PYTHON`` names another interpreter with the library installed.
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
from gemport.spec import GemmaSpec
from validation.runtimes import PARITY

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
VENV_PYTHON = ROOT / "build" / "gemma-venv" / "bin" / "python"
WORKER = Path(__file__).with_name("gemma_worker.py")
PYTHON_ENV = "GEMPORT_GEMMA_PYTHON"
MAKE_TARGET = "make gemma-venv"
# The library's FeedForward calls flax's nn.gelu, approximate by default (ref: gemma/gm/nn/_modules.py
# FeedForward.__call__): GemmaSpec's TANH_GELU; its EXACT_GELU ("gelu" of a Gemma 2/3 config) is not that.
TANH_GELU = ("gelu_pytorch_tanh",)
# The library's RMSNorm has its epsilon written in (ref: gemma/gm/nn/_layers.py RMSNorm: var + 1e-06).
LIBRARY_RMS_EPS = 1e-6


def gemma_python() -> Path:
    """The interpreter of the gemma library's environment; UnsupportedError naming the make target if absent."""
    python = Path(os.environ.get(PYTHON_ENV) or VENV_PYTHON)
    if not (python.is_file() and os.access(python, os.X_OK)):
        raise UnsupportedError(
            f"validating JAX checkpoints needs the gemma library's environment, and {python} does not exist: "
            f"run `{MAKE_TARGET}` in {ROOT} (builds {VENV_PYTHON.parent.parent}, about 2.4 GB on disk and a few "
            f"minutes, from PyPI), or set {PYTHON_ENV} to another Python with the gemma library"
        )
    return python


def check_expressible(spec: GemmaSpec, path: Path) -> None:
    """UnsupportedError for a spec the gemma library's Transformer cannot run as transformers would."""
    if spec.rms_eps != LIBRARY_RMS_EPS:
        raise UnsupportedError(f"rms_norm_eps {spec.rms_eps}: the gemma library fixes it at 1e-6", path)
    if spec.activation not in TANH_GELU:
        raise UnsupportedError(f"activation {spec.activation!r}: the gemma library has tanh-GELU only", path)
    if not spec.tie_embeddings:
        # Embedder.decode multiplies by the input embedding (ref: gemma/gm/nn/_modules.py Embedder.decode).
        raise UnsupportedError("an untied output head: the gemma library decodes with the embedding", path)
    if spec.embed_scale_rule != "sqrt_hidden_in_dtype":
        raise UnsupportedError(f"embedding scale rule {spec.embed_scale_rule!r}", path)


def _transpose_gating(path: Path) -> bool:
    """How the writer stored gating_einsum, for the one case its shape cannot tell (F == D).

    Without gemport.json the JAX reader assumes [2, F, D] then (converters/jax.py _check_tree)."""
    manifest = path / "gemport.json"
    if manifest.is_file():
        return json.loads(manifest.read_text(encoding="utf-8")).get("gating_einsum") != "[2, D, F]"
    return True


class GemmaLibraryRuntime:
    """A JAX/Orbax checkpoint loaded with ``gm.ckpts.load_params`` and run by the gemma library's Transformer."""

    kind = PARITY

    def __init__(self, path: Path):
        from converters import jax as jax_format

        self.path = Path(path)
        python = gemma_python()
        spec = jax_format.read(self.path).spec
        check_expressible(spec, self.path)
        self.vocab_size = spec.vocab_size
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        log.info("loading %s with the gemma library (%s)", self.path, python)
        env = os.environ | {"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
        # -I: isolated mode, so this folder (holding this jax.py) is not on the worker's sys.path and
        # gemport's PYTHONPATH and user site stay out of the library's environment.
        self._proc = subprocess.Popen(
            [str(python), "-I", str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )
        setup = {
            "checkpoint": str(self.path.resolve()),
            "spec": spec.to_json(),
            "transpose_gating": _transpose_gating(self.path),
        }
        # The worker loads while the caller goes on (validate loads the reference meanwhile); its reply
        # is read when the runtime is first used.
        self._send(setup)
        self._ready: dict | None = None

    def _wait_ready(self) -> dict:
        if self._ready is None:
            ready = self._reply("load it")
            if "error" in ready:
                self.close()
                raise CheckpointError(f"the gemma library cannot load it: {ready['error']}", self.path)
            self._ready = ready
            log.info("%s: %s", self.path, self.name)
        return self._ready

    @property
    def name(self) -> str:
        """e.g. "gemma library 3.3.0 (preset gm.nn.Gemma3_270M; Flax, JAX 0.7.2, fp32, CPU)"."""
        ready = self._wait_ready()
        versions = ready["versions"]
        return f"gemma library {versions['gemma']} ({ready['model']}; Flax, JAX {versions['jax']}, fp32, CPU)"

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
                f"the gemma library's worker exited ({self._proc.returncode}) trying to {doing}: {self._last_error()}",
                self.path,
            )
        return json.loads(line)

    def _last_error(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode("utf-8", errors="replace")
        log.debug("gemma worker stderr:\n%s", text)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else "no message"

    def logprobs(self, tokens: list[int]) -> np.ndarray:
        """float32 log-softmax [len(tokens), vocab_size] of one window; row i predicts token i + 1."""
        self._wait_ready()
        self._send({"tokens": [int(t) for t in tokens]})
        reply = self._reply(f"score a window of {len(tokens)} tokens")
        if "error" in reply:
            raise CheckpointError(
                f"the gemma library failed on a window of {len(tokens)} tokens: {reply['error']}", self.path
            )
        out = np.empty((reply["rows"], reply["cols"]), dtype="<f4")
        view, done = memoryview(out).cast("B"), 0
        while done < len(view):
            n = self._proc.stdout.readinto(view[done:])
            if not n:
                raise CheckpointError(f"the gemma library's worker stopped mid-window: {self._last_error()}", self.path)
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
