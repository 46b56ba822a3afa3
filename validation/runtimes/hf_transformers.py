"""The reference runtime, also the parity runtime for HF artifacts: transformers, fp32, eager attention, CPU.

Named hf_transformers so that nothing here can shadow the ``transformers`` package.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from gemport.errors import CheckpointError
from validation.runtimes import PARITY

log = logging.getLogger(__name__)


class TransformersRuntime:
    name = "transformers (fp32, CPU)"
    kind = PARITY

    def __init__(self, path: Path):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # gemport draws its own; keep stderr to one line on errors
        log.info("loading %s with transformers (fp32, eager attention)", path)
        try:
            # eager: the attention path that applies Gemma 2's attention softcap exactly as written.
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"transformers cannot load it: {exc}", path) from None
        self.model = model.eval()
        self.vocab_size = int(model.config.vocab_size)

    def logprobs(self, tokens: list[int]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            ids = torch.tensor([tokens], dtype=torch.long)
            # The model applies Gemma 2's final logit softcap itself; log-softmax is taken in fp32.
            logits = self.model(input_ids=ids, use_cache=False).logits[0]
            return torch.log_softmax(logits.float(), dim=-1).numpy()
