"""Format registry: format name -> converter module, imported on first use.

Nothing here imports a converter, so ``gemport --help`` stays fast and never pulls in
heavy runtimes. CLI choices come from this table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from gemport.errors import InputError, UnsupportedError


@dataclass(frozen=True)
class Format:
    name: str
    module: str
    reads: bool
    writes: bool
    description: str

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("hf", "converters.hf", True, True, "Hugging Face safetensors folder (config.json, tokenizer)"),
        Format("gguf", "converters.gguf", True, True, "GGUF file (llama.cpp) of arch gemma/gemma2/gemma3"),
        Format("jax", "converters.jax", True, True, "Orbax checkpoint folder of Google's gemma library (JAX/Flax)"),
        Format(
            "onnx",
            "converters.onnx",
            True,
            True,
            "ONNX decoder folder (model.onnx + external data, genai_config.json) for onnxruntime(-genai)",
        ),
        Format(
            "trtllm",
            "converters.trtllm",
            True,
            True,
            "TensorRT-LLM checkpoint folder (config.json, rank{N}.safetensors) for trtllm-build",
        ),
        Format(
            "keras",
            "converters.keras",
            True,
            True,
            "keras-hub preset folder (config.json, model.weights.h5; Keras 3 GemmaCausalLM / Gemma3CausalLM)",
        ),
        Format("gemma-pytorch", "converters.gemma_pytorch", True, False, "gemma_pytorch .ckpt (float or int8)"),
    )
}


def get(name: str) -> Format:
    if name not in FORMATS:
        raise UnsupportedError(f"unknown format {name!r} (known: {', '.join(FORMATS)})")
    return FORMATS[name]


def readers() -> list[str]:
    return [f.name for f in FORMATS.values() if f.reads]


def writers() -> list[str]:
    return [f.name for f in FORMATS.values() if f.writes]


def detect(path: str | Path) -> str:
    """The format of ``path``: asks each reader's ``sniff(path)``; one-line error if none."""
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or directory", path)
    for name in readers():
        if get(name).load().sniff(path):
            return name
    raise InputError(f"not a checkpoint gemport can read (formats: {', '.join(readers())})", path)
