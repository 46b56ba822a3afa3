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
from pathlib import Path

from gemport.errors import CheckpointError, UnsupportedError
from validation.runtimes.worker import WorkerRuntime, venv_python

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
VENV_PYTHON = ROOT / "build" / "keras-venv" / "bin" / "python"
WORKER = Path(__file__).with_name("keras_worker.py")
PYTHON_ENV = "GEMPORT_KERAS_PYTHON"
MAKE_TARGET = "make keras-venv"


def keras_python() -> Path:
    """The interpreter of keras-hub's environment; UnsupportedError naming the make target if absent."""
    return venv_python(
        PYTHON_ENV, VENV_PYTHON, "Keras presets needs keras-hub", MAKE_TARGET, "about 0.7 GB, half a minute"
    )


class KerasHubRuntime(WorkerRuntime):
    """A keras-hub preset loaded with ``from_preset`` and run by keras-hub's Gemma backbone (fp32, CPU)."""

    who = "keras-hub"

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
        log.info("loading %s with keras-hub (%s)", self.path, python)
        env = {"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
        self._start(python, WORKER, env, {"preset": str(self.path.resolve())})

    def _check_ready(self, ready: dict) -> None:
        if ready["vocab_size"] != self.vocab_size:
            self.close()
            raise CheckpointError(
                f"keras-hub loaded {ready['vocab_size']} vocabulary rows, the preset says {self.vocab_size}", self.path
            )

    @property
    def name(self) -> str:
        """e.g. "keras-hub 0.32.0 (Gemma3CausalLM.from_preset, Gemma3Tokenizer; Keras 3.15.1, JAX 0.10.2, ...)"."""
        ready = self._wait_ready()
        v = ready["versions"]
        return f"keras-hub {v['keras-hub']} ({ready['model']}; Keras {v['keras']}, JAX {v['jax']}, fp32, CPU)"
