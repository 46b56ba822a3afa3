"""The reference runtime, also the parity runtime for HF artifacts: transformers, CPU.

The reference runs in float32 with eager attention. A candidate runs in the dtype its config.json names
(``dtype``, or ``torch_dtype`` as transformers 4.x wrote it), as ``from_pretrained(path, dtype="auto")``
and pipelines load it: an fp16 folder computes in fp16, so one that overflows scores NaN and fails.

Attention: eager for the reference and for float32 candidates, so that a lossless fp32 copy computes
exactly what the reference computes (KLD 0). A bf16 or fp16 candidate gets the attention transformers
picks when none is named (``attn_implementation=None``), as ``from_pretrained`` gives it to its users:
sdpa for Gemma 1 and 3, eager for Gemma 2, whose attention softcap sdpa cannot apply (ref: transformers
models/gemma2/modeling_gemma2.py, ``Gemma2PreTrainedModel._supports_sdpa = False``; Gemma 3 never passes
``attn_logit_softcapping`` to its attention, modeling_gemma3.py ``Gemma3Attention.forward``). On a CPU
without bf16 units the half-precision batched matmuls of eager attention cost more than the whole rest
of a candidate's forward pass (33 s of 85 s for 4 windows of the demo model on an AVX2 machine).

Named hf_transformers so that nothing here can shadow the ``transformers`` package.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from converters.hf import read_json
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
        config = read_json(path / "config.json")
        options, loader, how = _compressed_tensors(path, config)
        attention = attention_for(dtype)
        log.info("loading %s with transformers (%s)", path, dtype)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, dtype), attn_implementation=attention, **options
            )
        except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
            raise CheckpointError(f"transformers cannot load it: {exc}", path) from None
        self.model = model.eval()
        self.vocab_size = int(model.config.vocab_size)
        used = model.config._attn_implementation
        details = ["fp32" if dtype == "float32" else dtype]
        details += [f"{used} attention"] if used != "eager" else []
        self.name = f"{loader} ({', '.join(details + ['CPU'] + how)})"

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


def _compressed_tensors(path: Path, config: dict) -> tuple[dict, str, list[str]]:
    """(loading options, what loads it, how) for a compressed-tensors folder; ({}, "transformers", [])
    for any other.

    transformers decompresses a symmetric pack-quantized model on its first forward pass. An
    asymmetric one it loads only with ``dequantize=True``: compressed-tensors 0.20.0 lays out
    the model's zero points unpacked on the meta device (compressors/pack_quantized/base.py,
    ``compress`` meta branch) while checkpoints store them packed, so the default load stops
    at a size mismatch (vllm-project/llm-compressor#1618).
    """
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != "compressed-tensors":
        return {}, "transformers", []
    from importlib.metadata import PackageNotFoundError, version

    try:
        ct_version = version("compressed-tensors")
    except PackageNotFoundError:
        raise CheckpointError("a compressed-tensors checkpoint needs the compressed-tensors package", path) from None
    groups = quant.get("config_groups", {}).values()
    asymmetric = any(not (g.get("weights") or {}).get("symmetric", True) for g in groups)
    loader = f"transformers + compressed-tensors {ct_version}"
    if not asymmetric:
        return {}, loader, ["decompressed on first forward"]
    from transformers import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}, loader, ["dequantized at load"]


def attention_for(dtype: str) -> str | None:
    """``attn_implementation`` for a model computed in ``dtype``: "eager" in float32, else None
    (transformers' own choice; module docstring)."""
    return "eager" if dtype == "float32" else None


def config_dtype(path: Path) -> str:
    """The dtype config.json names (``dtype``, or 4.x's ``torch_dtype``); float32 when it names none.
    ref: transformers modeling_utils ``_get_dtype``, dtype="auto" reads ``config.dtype``."""
    config = read_json(path / "config.json")
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    if dtype not in _TORCH_DTYPES:
        raise CheckpointError(f"config.json dtype {dtype!r} is not one of {', '.join(_TORCH_DTYPES)}", path)
    return dtype


def as_loaded(path: Path) -> TransformersRuntime:
    """A candidate HF folder in the precision its users load it in (its config's dtype)."""
    return TransformersRuntime(path, config_dtype(path))
