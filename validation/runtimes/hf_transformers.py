"""The reference runtime, also the parity runtime for HF artifacts: transformers, eager attention, CPU.

The reference runs in float32. A candidate runs in the dtype its config.json names (``dtype``, or
``torch_dtype`` as transformers 4.x wrote it), as ``from_pretrained(path, dtype="auto")`` and
pipelines load it: an fp16 folder computes in fp16, so one that overflows scores NaN and fails.

Named hf_transformers so that nothing here can shadow the ``transformers`` package.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from gemport.errors import CheckpointError
from validation.runtimes import PARITY

log = logging.getLogger(__name__)


_TORCH_DTYPES = ("float32", "float16", "bfloat16")


class TransformersRuntime:
    name = "transformers (fp32, CPU)"
    kind = PARITY

    def __init__(self, path: Path, dtype: str = "float32"):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # gemport draws its own; keep stderr to one line on errors
        self.dtype = dtype
        if dtype != "float32":
            self.name = f"transformers ({dtype}, CPU)"
        options = self._compressed_tensors(path)
        log.info("loading %s with %s", path, self.name)
        try:
            # eager: the attention path that applies Gemma 2's attention softcap exactly as written.
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, dtype), attn_implementation="eager", **options
            )
        except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
            raise CheckpointError(f"transformers cannot load it: {exc}", path) from None
        self.model = model.eval()
        self.vocab_size = int(model.config.vocab_size)

    def _compressed_tensors(self, path: Path) -> dict:
        """Loading options for a compressed-tensors folder (and the runtime's name says what loads it).

        transformers decompresses a symmetric pack-quantized model on its first forward pass. An
        asymmetric one it loads only with ``dequantize=True``: compressed-tensors 0.20.0 lays out
        the model's zero points unpacked on the meta device (compressors/pack_quantized/base.py,
        ``compress`` meta branch) while checkpoints store them packed, so the default load stops
        at a size mismatch (vllm-project/llm-compressor#1618).
        """
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        quant = config.get("quantization_config") or {}
        if quant.get("quant_method") != "compressed-tensors":
            return {}
        from importlib.metadata import PackageNotFoundError, version

        try:
            ct_version = version("compressed-tensors")
        except PackageNotFoundError:
            raise CheckpointError(
                "a compressed-tensors checkpoint needs the compressed-tensors package", path
            ) from None
        groups = quant.get("config_groups", {}).values()
        asymmetric = any(not (g.get("weights") or {}).get("symmetric", True) for g in groups)
        how = "dequantized at load" if asymmetric else "decompressed on first forward"
        precision = "fp32" if self.dtype == "float32" else self.dtype
        self.name = f"transformers + compressed-tensors {ct_version} ({precision}, CPU, {how})"
        if not asymmetric:
            return {}
        from transformers import CompressedTensorsConfig

        return {"quantization_config": CompressedTensorsConfig(dequantize=True)}

    def logprobs(self, tokens: list[int]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            ids = torch.tensor([tokens], dtype=torch.long)
            # The model applies Gemma 2's final logit softcap itself; log-softmax is taken in fp32.
            logits = self.model(input_ids=ids, use_cache=False).logits[0]
            return torch.log_softmax(logits.float(), dim=-1).numpy()

    def scored_logits(self, tokens: list[int], first: int, count: int) -> np.ndarray:
        """float32 logits [count, vocab] of positions first .. first + count - 1 (softcapped where the model
        caps): the LM head runs on the positions from ``first`` on only (transformers' ``logits_to_keep``,
        which keeps the last positions), as llama-perplexity asks llama.cpp for the second half only."""
        import torch

        with torch.inference_mode():
            ids = torch.tensor([tokens], dtype=torch.long)
            logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=len(tokens) - first).logits[0]
            return logits[:count].float().numpy()


def config_dtype(path: Path) -> str:
    """The dtype config.json names (``dtype``, or 4.x's ``torch_dtype``); float32 when it names none.
    ref: transformers modeling_utils ``_get_dtype``, dtype="auto" reads ``config.dtype``."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable config.json: {exc}", path / "config.json") from None
    if not isinstance(config, dict):
        raise CheckpointError("config.json is not a JSON object", path / "config.json")
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    if dtype not in _TORCH_DTYPES:
        raise CheckpointError(f"config.json dtype {dtype!r} is not one of {', '.join(_TORCH_DTYPES)}", path)
    return dtype


def as_loaded(path: Path) -> TransformersRuntime:
    """A candidate HF folder in the precision its users load it in (its config's dtype)."""
    return TransformersRuntime(path, config_dtype(path))
