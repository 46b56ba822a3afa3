"""The reference's logits without the whole model in memory: decoder layers streamed, the LM head in row chunks.

The fp32 reference forward pass of a whole transformers model holds every weight in float32 (about
34 GB for a 7B). Here the windows go through the model one decoder layer at a time, as calibration
does (quantizers.calibration.stream_layers: transformers' own decoder-layer modules, eager attention,
float32, the masks and rotary embeddings its model classes build), so one layer's weights and the
hidden states of every window ([windows, n_ctx, hidden] float32) are in memory at once. Then, per
window, the final norm runs on the scored positions and the LM head a block of vocabulary rows at a
time, read from the checkpoint's (tied) embedding in its own dtype and cast to float32 block by
block; Gemma 2's final softcap is applied as transformers applies it (ref: transformers
models/gemma2/modeling_gemma2.py, Gemma2ForCausalLM.forward: ``tanh(logits / cap) * cap``).

The result equals TransformersRuntime.scored_logits (the whole model, fp32, eager) up to the order
of float32 sums in the matrix products (windows are batched, the LM head is blocked):
tests/test_streamed.py bounds the difference of the log-probs on every tiny family and the demo model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gemport.checkpoint import CHUNK_VALUES, row_chunks
from gemport.errors import CheckpointError
from gemport.progress import progress, stage

log = logging.getLogger(__name__)

NAME = "transformers decoder layers, streamed (fp32, CPU)"
BATCH = 8  # windows per decoder-layer call (fewer where the MLP activations would be large)


class StreamedReference:
    """An HF checkpoint folder opened for streaming: ``vocab_size`` rows of logits, ``name`` of the runtime.

    Errors: CheckpointError (or InputError) for a folder hf.read refuses, or token ids past the vocab."""

    name = NAME

    def __init__(self, path: Path):
        from converters import hf

        self.path = Path(path)
        ckpt = hf.read(self.path)
        if ckpt.quantized():  # a compressed-tensors reference, dequantized as the fp32 runtime loads it
            ckpt = dataclasses.replace(ckpt, tensors={n: t.dequantized("f32") for n, t in ckpt.tensors.items()})
        self.ckpt = ckpt
        self.vocab_size = int(ckpt.spec.vocab_size)

    def scored_logits(self, windows: list[list[int]], first: int, count: int) -> Iterator[np.ndarray]:
        """Per window, float32 logits [count, vocab] of positions first .. first + count - 1 (softcapped
        where the model caps), as TransformersRuntime.scored_logits gives them one window at a time.
        The decoder layers run once over all windows before the first window is yielded."""
        import torch

        from quantizers.calibration import CalibrationConfig, final_norm, stream_layers

        ids = torch.tensor(windows, dtype=torch.long)
        if ids.numel() and int(ids.max()) >= self.vocab_size:
            raise CheckpointError(f"token id {int(ids.max())} is beyond the vocab of {self.vocab_size}", self.path)
        spec = self.ckpt.spec
        config = CalibrationConfig(tokens=ids.numel(), n_ctx=ids.shape[1], batch=BATCH)
        final: list[torch.Tensor] = []
        label = f"reference {self.path.name}, {len(windows)} window{'s' if len(windows) != 1 else ''}:"
        with progress(label, total=spec.num_layers, unit="layers") as advance:
            for _ in stream_layers(self.ckpt, config, ids=ids, final=final.append):
                advance()
        hidden = final_norm(self.ckpt, final.pop()[:, first : first + count])
        head = self.ckpt.tensors.get("lm_head.weight", self.ckpt.tensors["model.embed_tokens.weight"])
        for h in hidden:
            with stage(f"LM head over {self.vocab_size} rows"):
                logits = self._head(h, head, spec.final_softcap).numpy()
            yield logits

    def _head(self, h, head, softcap: float | None):
        """[rows, vocab] float32 logits ``h @ head.T``, a block of ``head`` rows (CHUNK_VALUES values) at a time."""
        import torch

        out = torch.empty((h.shape[0], self.vocab_size), dtype=torch.float32)
        start = 0
        with torch.inference_mode():
            for rows in row_chunks(head, CHUNK_VALUES):
                stop = start + rows.shape[0]
                out[:, start:stop] = h @ rows.to(torch.float32).T
                start = stop
            if softcap is not None:
                out.div_(softcap).tanh_().mul_(softcap)
        return out
