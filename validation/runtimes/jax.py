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
from pathlib import Path

from gemport.errors import UnsupportedError
from gemport.spec import GemmaSpec
from validation.runtimes.worker import WorkerRuntime, venv_python

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
    return venv_python(
        PYTHON_ENV, VENV_PYTHON, "JAX checkpoints needs the gemma library", MAKE_TARGET, "about 2.4 GB, a few minutes"
    )


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


class GemmaLibraryRuntime(WorkerRuntime):
    """A JAX/Orbax checkpoint loaded with ``gm.ckpts.load_params`` and run by the gemma library's Transformer."""

    who = "the gemma library"

    def __init__(self, path: Path):
        from converters import jax as jax_format

        self.path = Path(path)
        python = gemma_python()
        spec = jax_format.read(self.path).spec
        check_expressible(spec, self.path)
        self.vocab_size = spec.vocab_size
        log.info("loading %s with the gemma library (%s)", self.path, python)
        setup = {
            "checkpoint": str(self.path.resolve()),
            "spec": spec.to_json(),
            "transpose_gating": _transpose_gating(self.path),
        }
        # The worker loads while the caller goes on (validate loads the reference meanwhile).
        env = {"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
        self._start(python, WORKER, env, setup)

    @property
    def name(self) -> str:
        """e.g. "gemma library 3.3.0 (preset gm.nn.Gemma3_270M; Flax, JAX 0.7.2, fp32, CPU)"."""
        ready = self._wait_ready()
        versions = ready["versions"]
        return f"gemma library {versions['gemma']} ({ready['model']}; Flax, JAX {versions['jax']}, fp32, CPU)"
