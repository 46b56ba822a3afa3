"""Layer-streamed calibration: the streamed layers reproduce the full transformers model exactly enough.

Each streamed layer's output is compared with the output of the same layer inside the whole
transformers model (fp32, eager) on the same windows, for every tiny family.
"""

from __future__ import annotations

import pytest
import torch

from converters import hf
from gemport.errors import InputError
from quantizers.calibration import CalibrationConfig, calibration_ids, stream_layers
from validation.runtimes.hf_transformers import TransformersRuntime

# fp32 with the same modules and kernels: only batch-size-dependent matmul blocking can differ.
ATOL = 1e-5


def _reference_layer_outputs(src, ids: torch.Tensor) -> list[torch.Tensor]:
    model = TransformersRuntime(src).model
    outputs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
        for layer in model.model.layers
    ]
    try:
        with torch.inference_mode():
            model.model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return outputs


@pytest.mark.parametrize("variant", ["gemma-mha", "gemma-mqa", "gemma2", "gemma3"])
def test_streamed_layers_match_transformers(tiny_models, variant):
    ckpt = hf.read(tiny_models[variant])
    config = CalibrationConfig(tokens=96, n_ctx=48, batch=1)  # n_ctx > the sliding window of 16
    ids = calibration_ids(ckpt, config)
    assert ids.shape == (2, 48) and bool((ids[:, 0] == ckpt.spec.bos_token_id).all())
    want = _reference_layer_outputs(tiny_models[variant], ids)
    streamed = list(stream_layers(ckpt, config, ids))
    assert [s.index for s in streamed] == list(range(ckpt.spec.num_layers))
    for item, ref_in, ref_out in zip(streamed[1:], want, want[1:], strict=False):
        torch.testing.assert_close(item.hidden, ref_in, rtol=0, atol=ATOL)
        with torch.inference_mode():
            got = item.layer(item.hidden, **item.kwargs)
        torch.testing.assert_close(got, ref_out, rtol=0, atol=ATOL)


def test_calibration_text_too_short(tiny_models, tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_text("A short text.\n\nIt has two paragraphs and not many tokens at all.\n", encoding="utf-8")
    ckpt = hf.read(tiny_models["gemma3"])
    with pytest.raises(InputError, match=r"fewer than the 512 asked \(2 windows of 256\)"):
        calibration_ids(ckpt, CalibrationConfig(tokens=512, n_ctx=256, corpus=str(corpus)))


@pytest.mark.parametrize("bad", [{"n_ctx": 1}, {"tokens": 0}, {"batch": 0}])
def test_calibration_config_rejects(bad):
    with pytest.raises(ValueError, match="calibration"):
        CalibrationConfig(**bad)
