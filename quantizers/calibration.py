"""Layer-streamed calibration: token windows from the corpus calibration split, run one decoder layer at a time.

Calibration-based quantizers (AWQ, GPTQ) need each decoder layer's inputs on real text. Instead of
loading the whole model, the windows are embedded once and pushed through the decoder one layer
at a time: a layer is built from the Checkpoint's tensors, run, handed to the caller and dropped,
so only one layer's weights, inputs and outputs are in memory at once (the pattern of AutoAWQ's
``AwqQuantizer.quantize`` loop and llm-compressor's sequential pipeline; ref:
casper-hansen/AutoAWQ awq/quantize/quantizer.py, vllm-project/llm-compressor
pipelines/sequential/pipeline.py).

The layers are transformers' own decoder-layer modules (``GemmaDecoderLayer``,
``Gemma2DecoderLayer``, ``Gemma3DecoderLayer``) with eager attention in float32, fed the rotary
embeddings and causal / sliding-window masks that transformers' model classes build
(ref: transformers 5.x models/gemma*/modeling_gemma*.py, ``Gemma*Model.forward``), so the hidden
states equal the reference runtime's (tests/test_calibration.py checks this on every tiny family).

Windows follow llama-perplexity's convention as the evaluation does: ``n_ctx`` tokens, the first
set to BOS (validation.corpus.windows); they come from the calibration split only.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gemport.checkpoint import CHUNK_VALUES, Checkpoint, row_chunks
from gemport.errors import CheckpointError, InputError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MIN_CTX = 2
# transformers modules per family (ref: transformers models/gemma*/modeling_gemma*.py).
_MODULES = {
    "gemma": ("transformers.models.gemma.modeling_gemma", "GemmaDecoderLayer", "GemmaRotaryEmbedding"),
    "gemma2": ("transformers.models.gemma2.modeling_gemma2", "Gemma2DecoderLayer", "Gemma2RotaryEmbedding"),
    "gemma3": ("transformers.models.gemma3.modeling_gemma3", "Gemma3DecoderLayer", "Gemma3RotaryEmbedding"),
}


@dataclass(frozen=True)
class CalibrationConfig:
    """``tokens`` calibration tokens in windows of ``n_ctx`` (rounded up to whole windows), taken
    from the calibration split of ``corpus`` (a UTF-8 file; None: the default pydoc text);
    ``batch`` windows per forward call."""

    tokens: int = 16384
    n_ctx: int = 512
    corpus: str | None = None
    batch: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.n_ctx, int) or self.n_ctx < MIN_CTX:
            raise ValueError(f"calibration context must be at least {MIN_CTX} tokens, got {self.n_ctx!r}")
        if not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f"calibration tokens must be a positive integer, got {self.tokens!r}")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"calibration batch must be a positive integer, got {self.batch!r}")

    @property
    def n_windows(self) -> int:
        return math.ceil(self.tokens / self.n_ctx)


def load_tokenizer(ckpt: Checkpoint):
    """The checkpoint's HF tokenizer, loaded from its tokenizer files."""
    from transformers import AutoTokenizer

    if not ckpt.tokenizer_files:
        raise CheckpointError("the checkpoint has no tokenizer files to tokenize calibration text", ckpt.source)
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in ckpt.tokenizer_files.items():
            (Path(tmp) / name).write_bytes(data)
        try:
            return AutoTokenizer.from_pretrained(tmp)
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"cannot load the tokenizer: {exc}", ckpt.source) from None


def calibration_ids(ckpt: Checkpoint, config: CalibrationConfig) -> torch.Tensor:
    """``[n_windows, n_ctx]`` token ids from the calibration split; InputError if it is too short."""
    import torch

    from validation.corpus import load_text, split_text, tokenize, windows

    calibration = split_text(load_text(config.corpus))[1]  # [0], the evaluation part, is never read
    tokenizer = load_tokenizer(ckpt)
    if tokenizer.bos_token_id is None:
        raise CheckpointError("the tokenizer has no BOS token", ckpt.source)
    tokens = tokenize(tokenizer, calibration)
    wanted = config.n_windows * config.n_ctx
    if len(tokens) < wanted:
        raise InputError(
            f"the calibration split holds {len(tokens)} tokens, fewer than the {wanted} asked "
            f"({config.n_windows} windows of {config.n_ctx}); use a longer corpus or fewer calibration tokens",
            config.corpus or "pydoc_data.topics",
        )
    ids = torch.tensor(windows(tokens, config.n_ctx, config.n_windows, tokenizer.bos_token_id), dtype=torch.long)
    if int(ids.max()) >= ckpt.spec.vocab_size:
        raise CheckpointError(f"the tokenizer yields ids beyond the vocab of {ckpt.spec.vocab_size}", ckpt.source)
    return ids


def hf_config(ckpt: Checkpoint):
    """The transformers config of ``ckpt.spec``, eager attention (Gemma 2's softcap path)."""
    from transformers import AutoConfig

    cfg = ckpt.spec.to_hf_config()
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config._attn_implementation = "eager"
    return config


def _module(family: str, index: int) -> Any:
    import importlib

    module, *names = _MODULES[family]
    return getattr(importlib.import_module(module), names[index])


def embed(ckpt: Checkpoint, ids: torch.Tensor) -> torch.Tensor:
    """Scaled token embeddings in float32: ``E[ids] * sqrt(hidden)`` (ref: transformers
    ``Gemma*ScaledWordEmbedding``/``GemmaModel``: the scale as a tensor of the weight's dtype)."""
    import torch

    t = ckpt.tensors["model.embed_tokens.weight"]
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < t.shape[0]:
        raise CheckpointError(f"token ids reach {int(ids.max())}; the embedding has {t.shape[0]} rows", ckpt.source)
    out = torch.zeros((*ids.shape, t.shape[1]), dtype=torch.float32)
    start = 0
    for rows in row_chunks(t, CHUNK_VALUES):  # the table a block of rows at a time, never whole in float32
        stop = start + rows.shape[0]
        hit = (ids >= start) & (ids < stop)
        if hit.any():
            out[hit] = rows[ids[hit] - start].to(torch.float32)
        start = stop
    return out * torch.tensor(ckpt.spec.embed_scale, dtype=torch.float32)


def final_norm(ckpt: Checkpoint, hidden: torch.Tensor) -> torch.Tensor:
    """Gemma's final RMSNorm ``x * rsqrt(mean(x^2) + eps) * (1 + w)`` over the last axis, in float32
    (ref: transformers GemmaRMSNorm.forward, which computes in float32)."""
    import torch

    w = ckpt.tensors["model.norm.weight"].load().to(torch.float32)
    x = hidden.to(torch.float32)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ckpt.spec.rms_eps) * (1.0 + w)


def layer_kwargs(ckpt: Checkpoint, config, n_ctx: int) -> list[dict[str, Any]]:
    """Per layer: the rotary embeddings, mask and positions transformers' model passes to it
    (ref: ``Gemma*Model.forward``); batch dimension 1, broadcast over windows."""
    import torch
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    family = ckpt.spec.family
    dummy = torch.zeros(1, n_ctx, ckpt.spec.hidden_size, dtype=torch.float32)
    positions = torch.arange(n_ctx).unsqueeze(0)
    mask_args = {"config": config, "inputs_embeds": dummy, "attention_mask": None, "past_key_values": None}
    mask_args["position_ids"] = positions
    rotary = _module(family, 1)(config)
    if family == "gemma":
        return [
            {"attention_mask": create_causal_mask(**mask_args), "position_ids": positions}
            | {"position_embeddings": rotary(dummy, positions)}
        ] * ckpt.spec.num_layers
    masks = {
        "full_attention": create_causal_mask(**mask_args),
        "sliding_attention": create_sliding_window_causal_mask(**mask_args),
    }
    out = []
    for layer_type in config.layer_types:
        rope = rotary(dummy, positions, layer_type) if family == "gemma3" else rotary(dummy, positions)
        out.append({"attention_mask": masks[layer_type], "position_ids": positions, "position_embeddings": rope})
    return out


def load_layer(ckpt: Checkpoint, config, index: int) -> torch.nn.Module:
    """transformers' decoder layer ``index`` with the Checkpoint's tensors, float32, eval mode."""
    import torch

    prefix = f"model.layers.{index}."
    with torch.device("meta"):
        layer = _module(ckpt.spec.family, 0)(config, index)
    state = {
        name.removeprefix(prefix): t.load().to(torch.float32, copy=True)
        for name, t in ckpt.tensors.items()
        if name.startswith(prefix)
    }
    layer.load_state_dict(state, strict=True, assign=True)
    return layer.eval()


# Values of one MLP activation ([batch, n_ctx, intermediate]) a forward call may make: a layer holds a
# few at once (gate, up, their product), 1.6 GB at a 7B's width with 8 windows of 512.
ACTIVATION_VALUES = 1 << 24


def forward_batch(batch: int, n_ctx: int, intermediate: int) -> int:
    """Windows per forward call: ``batch``, fewer where the MLP activations would pass
    ACTIVATION_VALUES (windows are independent: the same results up to the last bit of a matrix product)."""
    return max(1, min(batch, ACTIVATION_VALUES // max(1, n_ctx * intermediate)))


def run_layer(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], batch: int) -> torch.Tensor:
    """``layer(hidden)`` over ``[n_windows, n_ctx, hidden]``, ``batch`` windows per call."""
    import torch

    with torch.inference_mode():
        return torch.cat([layer(h, **kwargs) for h in hidden.split(batch)])


def _to_device(value: Any, device: str) -> Any:
    """``value`` with every tensor in it (nested tuples, lists, dicts) on ``device``."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


@dataclass
class LayerInputs:
    """Decoder layer ``index`` (float32 transformers module), its input hidden states
    ``[n_windows, n_ctx, hidden]``, its keyword arguments and the forward batch size."""

    index: int
    layer: torch.nn.Module
    hidden: torch.Tensor
    kwargs: dict[str, Any]
    batch: int


def stream_layers(
    ckpt: Checkpoint,
    config: CalibrationConfig,
    ids: torch.Tensor | None = None,
    quantized_outputs: bool = False,
    final: Callable[[torch.Tensor], None] | None = None,
    device: str = "cpu",
) -> Iterator[LayerInputs]:
    """Yield each decoder layer with its calibration inputs, in order. The next layer's inputs are
    this layer's outputs as loaded (computed before yielding, so a caller may change the layer in
    place, as AutoAWQ propagates the unquantized layer's outputs; ref: AutoAWQ quantizer.py
    ``_get_input_feat``), or with ``quantized_outputs`` its outputs after the caller changed it (as
    GPTQ propagates the quantized layer's; ref: IST-DASLab/gptq llama.py ``llama_sequential``).
    ``final`` receives the last layer's outputs (the final norm's input), on the CPU. ``device``: the
    torch device the layers, their inputs and keyword arguments are moved to (e.g. "cuda")."""
    if ids is None:
        ids = calibration_ids(ckpt, config)
    hf = hf_config(ckpt)
    per_layer = [_to_device(kwargs, device) for kwargs in layer_kwargs(ckpt, hf, ids.shape[1])]
    hidden = embed(ckpt, ids).to(device)
    batch = forward_batch(config.batch, ids.shape[1], ckpt.spec.intermediate_size)
    for index in range(ckpt.spec.num_layers):
        layer = load_layer(ckpt, hf, index).to(device)
        if not quantized_outputs:
            output = run_layer(layer, hidden, per_layer[index], batch)
        yield LayerInputs(index, layer, hidden, per_layer[index], batch)
        if quantized_outputs:
            output = run_layer(layer, hidden, per_layer[index], batch)
        hidden = output
        del layer
    if final is not None:
        final(hidden.cpu())
    log.info("calibration: %d windows of %d tokens through %d layers", ids.shape[0], ids.shape[1], index + 1)
