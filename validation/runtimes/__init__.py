"""Runtimes that score a window of tokens: the interface, and the table of which runtime loads which format.

A runtime loads an artifact the way a user would and returns log-probabilities. ``kind`` says what
a match proves: "parity" when the format's real target runtime loads the artifact (transformers for
HF, llama.cpp for GGUF, ...), "round-trip" when only gemport's own reader does, "layout" when an
independent forward pass reads the artifact as the real runtime's model does (TensorRT-LLM, whose
engines cannot be built without a GPU), "kernels" when gemport's Triton kernels compute every projection
from the stored int4/int8 tensors (``--device cuda``, triton_kernels.py).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

import numpy as np

from gemport.errors import UnsupportedError

PARITY = "parity"
ROUND_TRIP = "round-trip"
LAYOUT = "layout"  # an independent forward pass over the format's layout, not the format's real runtime
KERNELS = "kernels"  # the stored quantized tensors run through gemport's GPU kernels (validate --device cuda)

# format name -> "module:factory"; the factory takes the artifact's path and returns a Runtime.
# Modules are imported only when their format is validated.
RUNTIMES: dict[str, str] = {
    "hf": "validation.runtimes.hf_transformers:as_loaded",  # in its config's dtype, as users load it
    "gguf": "validation.runtimes.llamacpp:LlamaCppRuntime",
    "jax": "validation.runtimes.jax:GemmaLibraryRuntime",
    "onnx": "validation.runtimes.onnxruntime:OnnxRuntime",
    "keras": "validation.runtimes.keras:KerasHubRuntime",  # keras-hub in build/keras-venv (make keras-venv)
    # no TensorRT-LLM runs here: an independent forward pass over the checkpoint as its Gemma model reads it
    "trtllm": "validation.runtimes.trtllm_layout:TrtllmLayoutRuntime",
}


class Runtime(Protocol):
    name: str  # e.g. "transformers (fp32, CPU)"
    kind: str  # PARITY or ROUND_TRIP
    vocab_size: int  # columns of logprobs()

    def logprobs(self, tokens: list[int]) -> np.ndarray:
        """float32 log-softmax [len(tokens), vocab_size] of one window; row i predicts token i + 1."""
        ...


def check_supported(fmt: str, path: str | Path | None = None, device: str = "cpu") -> None:
    """UnsupportedError, listing the formats that have one, unless a runtime validates ``fmt`` on ``device``
    ("cuda": the Triton kernel runtime, which also says whether its kernels can run here)."""
    if device == "cuda":
        from validation.runtimes.triton_kernels import check_supported as check_kernels

        check_kernels(fmt, Path(path) if path is not None else None)
        return
    if device != "cpu":
        raise UnsupportedError(f"device {device!r} is not one of cpu, cuda", path)
    if fmt not in RUNTIMES:
        known = ", ".join(RUNTIMES)
        raise UnsupportedError(f"no runtime validates format {fmt!r} yet (runtimes exist for: {known})", path)


def runtime_for(path: str | Path, fmt: str, device: str = "cpu") -> Runtime:
    """Load ``path`` (of format ``fmt``) with the runtime that validates that format (on ``device``)."""
    check_supported(fmt, path, device)
    if device == "cuda":
        from validation.runtimes.triton_kernels import kernel_runtime

        return kernel_runtime(Path(path), fmt)
    module, _, factory = RUNTIMES[fmt].partition(":")
    return getattr(importlib.import_module(module), factory)(Path(path))
