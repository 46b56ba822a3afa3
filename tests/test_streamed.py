"""The layer-streamed reference (validation/streamed.py) against the whole transformers model (fp32, eager)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from validation.corpus import load_text, split_text, tokenize, windows
from validation.metrics import scored_span
from validation.runtimes.hf_transformers import TransformersRuntime
from validation.streamed import StreamedReference
from validation.validate import load_tokenizer

# fp32 with the same modules: only the order of float32 sums in batched / blocked matmuls differs, by
# an amount that depends on the machine's GEMM kernels (their blocking of the vocabulary and of the
# hidden axis). Bound: this many float32 spacings (ulps) at the largest logit of the whole model; one
# machine measured 2.3e-5 on the demo model, 12 spacings at its largest logit of 31.8.
MAX_ULPS = 64


def _windows(path, n_ctx: int, n: int) -> list[list[int]]:
    tokenizer = load_tokenizer(path, "reference")
    text = split_text(load_text(None))[0]
    return windows(tokenize(tokenizer, text[:200_000]), n_ctx, n, tokenizer.bos_token_id)


def _check_logprob_diff(path, chunks: list[list[int]]) -> None:
    """The streamed log-probs within MAX_ULPS float32 spacings (at the largest logit) of the whole model's."""
    first, count = scored_span(len(chunks[0]))
    whole = TransformersRuntime(path)
    streamed = StreamedReference(path)
    assert streamed.vocab_size == whole.vocab_size
    worst, largest = 0.0, 0.0
    for chunk, got in zip(chunks, streamed.scored_logits(chunks, first, count), strict=True):
        want = whole.scored_logits(chunk, first, count)
        assert got.shape == want.shape == (count, whole.vocab_size) and got.dtype == np.float32
        diff = torch.log_softmax(torch.from_numpy(got), -1) - torch.log_softmax(torch.from_numpy(want), -1)
        worst, largest = max(worst, float(diff.abs().max())), max(largest, float(np.abs(want).max()))
    bound = MAX_ULPS * float(np.spacing(np.float32(largest)))
    assert worst < bound, f"max |log-prob difference| {worst:.3g} >= {bound:.3g} ({MAX_ULPS} ulps at {largest:.4g})"


@pytest.mark.parametrize("variant", ["gemma-mha", "gemma-mqa", "gemma2", "gemma3", "gemma3-sharded-bf16"])
def test_streamed_reference_matches_the_whole_model(tiny_models, variant):
    chunks = _windows(tiny_models[variant], 48, 3)  # n_ctx > the tiny models' sliding window of 16
    assert len(chunks) == 3
    _check_logprob_diff(tiny_models[variant], chunks)


def test_streamed_reference_applies_the_final_softcap(tiny_models):
    ref = StreamedReference(tiny_models["gemma2"])
    assert ref.ckpt.spec.final_softcap  # the tiny Gemma 2 caps; the comparison above then covers the cap
    first, count = scored_span(48)
    logits = next(ref.scored_logits(_windows(tiny_models["gemma2"], 48, 1), first, count))
    assert np.abs(logits).max() <= ref.ckpt.spec.final_softcap


def test_streamed_reference_on_the_demo_model(demo_model):
    _check_logprob_diff(demo_model, _windows(demo_model, 512, 2))
