"""AWQ: activation-aware per-input-channel scales, then weight clipping, then RTN records.

Algorithm (ref: Lin et al., "AWQ", MLSys 2024; casper-hansen/AutoAWQ awq/quantize/quantizer.py
``_search_best_scale``, ``_compute_best_scale``, ``_search_best_clip``, ``_compute_best_clip``;
vllm-project/llm-compressor modifiers/awq/base.py ``AWQModifier``), one decoder layer at a time
on the calibration inputs of quantizers.calibration:

1. Scale search, per group of linears that read the same input ``x`` (``scaling_groups``): for
   ``alpha = i / n_grid``, ``i = 0 .. n_grid - 1``, ``s = mean_t |x[t, j]| ** alpha`` per input
   channel ``j`` (with ``duo_scaling``, divided by ``w_mean ** (1 - alpha)``, AutoAWQ's and
   llm-compressor's default), normalised by ``sqrt(max(s) * min(s))``; every linear of the
   group becomes ``Q(W * s) / s`` and the loss is the mean squared error of the group's output
   module (the attention block, the MLP, or the single linear) against the unquantized output over
   the first ``search_tokens`` calibration tokens (whole windows; default 2048, half the default
   calibration set, which halves the search time; None: all, as AutoAWQ). The ``s`` of least loss
   is kept.
2. All scales of the layer are folded (``apply_scales``): ``W <- W * s`` for the group's linears,
   and ``x <- x / s`` moved into the op before them: the rows of the preceding linear (v_proj for
   o_proj, up_proj for down_proj), or the preceding RMSNorm. Gemma's RMSNorm multiplies by
   ``(1 + w)`` (ref: transformers ``GemmaRMSNorm``: ``output * (1.0 + self.weight.float())``),
   so the fold is ``w <- (1 + w) / s - 1`` (``fold_norm``). AutoAWQ's ``scale_ln_fcs``
   (awq/quantize/scale.py) divides ``w`` itself, which is right for Llama's ``x * w`` norm and
   wrong for Gemma's; this is the fold that gives gibberish on Gemma in llm-compressor
   (vllm-project/llm-compressor modifiers/awq/base.py ``_apply_smoothing`` divides the norm
   weight too).
3. Clipping search (step 2's inputs, scaled): per output row and group, the clamp
   ``|w| <= (1 - i / n_grid) * max|w|``, ``i = 0 .. n_grid / 2 - 1``, of least output MSE over
   512 evenly spaced calibration tokens; q_proj and k_proj are not clipped (ref: AutoAWQ
   ``_search_best_clip``: "due to qk bmm, it is hard to clip precisely").
4. Each linear is quantized with quantizers.rtn's min-max math (compressed-tensors' own), so the
   records are the same kind as RTN's and the compressed-tensors writer takes them unchanged.

Groups per layer (ref: AutoAWQ awq/models/gemma.py ``get_layers_for_scaling``; Gemma 2/3 have a
pre-MLP norm of their own, ``pre_feedforward_layernorm``, and ``post_attention_layernorm`` acts
on the attention output, so it is not the MLP's input op there): input_layernorm -> q/k/v;
v_proj -> o_proj only when the two weights have the same shape (MHA; with GQA/MQA one v row feeds
several o columns, ref: llm-awq PR 67 cited by AutoAWQ); the pre-MLP norm -> gate/up;
up_proj -> down_proj.

The next layer's calibration inputs are the unquantized layer's outputs (as AutoAWQ). The int8
codes of all layers are held until the checkpoint is written (a quarter of the fp32 decoder).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from gemport.checkpoint import Checkpoint, LazyTensor, torch_dtype
from gemport.errors import UnsupportedError
from gemport.progress import progress
from quantizers.calibration import CalibrationConfig, LayerInputs, stream_layers
from quantizers.record import SCALE_DTYPES, QuantFormat, QuantizedTensor
from quantizers.rtn import PROJECTIONS, quantize_weight

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

GROUP_SIZES = (32, 64, 128)
CLIP_TOKENS = 512  # ref: AutoAWQ _compute_best_clip n_sample_token=512
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")  # ref: AutoAWQ _search_best_clip avoid_clipping


@dataclass(frozen=True)
class AWQConfig:
    """bits 4; group_size 32, 64 or 128; symmetric or not; ``n_grid`` scale-search points
    (alpha = i / n_grid in [0, 1)); ``clip`` runs the clipping search; ``duo_scaling`` divides the
    activation term by the weight term; scale_dtype None for each weight's own dtype;
    ``search_tokens`` calibration tokens (whole windows) for the scale search's loss, None for all
    of them (the mean |x| always uses all)."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    n_grid: int = 20
    clip: bool = True
    duo_scaling: bool = False
    scale_dtype: str | None = None
    search_tokens: int | None = 2048
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self) -> None:
        if self.search_tokens is not None and (not isinstance(self.search_tokens, int) or self.search_tokens < 1):
            raise ValueError(f"search_tokens must be a positive integer or None, got {self.search_tokens!r}")
        if self.bits != 4:
            raise ValueError(f"AWQ quantizes to 4 bits, got bits={self.bits!r} (use --method rtn for int8)")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"AWQ group_size must be 32, 64 or 128, got {self.group_size!r}")
        if not isinstance(self.symmetric, bool) or not isinstance(self.clip, bool):
            raise ValueError("symmetric and clip must be True or False")
        if not isinstance(self.n_grid, int) or not 1 <= self.n_grid <= 100:
            raise ValueError(f"n_grid must be an integer in [1, 100], got {self.n_grid!r}")
        if self.scale_dtype not in (None, *SCALE_DTYPES):
            raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES} or None, got {self.scale_dtype!r}")

    def format_for(self, source_dtype: str) -> QuantFormat:
        return QuantFormat(self.bits, self.group_size, self.symmetric, self.scale_dtype or source_dtype)


@dataclass(frozen=True)
class Group:
    """One AWQ scaling group: ``prev`` (norm or linear, layer-relative module path) feeds
    ``linears``; the loss is taken on the output of ``inspect``."""

    prev: str
    linears: tuple[str, ...]
    inspect: str


def scaling_groups(family: str, v_o_same_shape: bool) -> list[Group]:
    """The groups of one decoder layer (module docstring; AutoAWQ awq/models/gemma.py)."""
    pre_mlp = "post_attention_layernorm" if family == "gemma" else "pre_feedforward_layernorm"
    groups = [Group("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn")]
    if v_o_same_shape:
        groups.append(Group("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"))
    groups.append(Group(pre_mlp, ("mlp.gate_proj", "mlp.up_proj"), "mlp"))
    groups.append(Group("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"))
    return groups


def layer_groups(family: str, weights: dict[str, Any]) -> list[Group]:
    """``scaling_groups`` for a layer whose weights (tensors or LazyTensors) are ``weights``, by
    layer-relative name."""
    same = weights["self_attn.v_proj.weight"].shape == weights["self_attn.o_proj.weight"].shape
    return scaling_groups(family, same)


# ---------------------------------------------------------------------------------------------
# folding


def fold_norm(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Gemma RMSNorm weight whose output is the old output / ``s``: ``(1 + w) / s - 1``."""
    return (1 + w) / s - 1


def apply_scales(weights: dict[str, torch.Tensor], group: Group, s: torch.Tensor) -> None:
    """Fold ``s`` in place: ``linear.W *= s`` (columns), the preceding op's output ``/= s``."""
    prev = weights[f"{group.prev}.weight"]
    if prev.ndim == 1:
        prev.copy_(fold_norm(prev, s))
    else:
        prev.div_(s.view(-1, 1))  # ref: AutoAWQ scale.py scale_fc_fc: fc1.weight.div_(scales.view(-1, 1))
    for name in group.linears:
        weights[f"{name}.weight"].mul_(s.view(1, -1))


def fold_checkpoint(ckpt: Checkpoint, scales: dict[int, dict[str, torch.Tensor]]) -> Checkpoint:
    """``ckpt`` with ``scales[layer][group.prev]`` folded, nothing quantized: the same function."""
    import torch

    tensors = dict(ckpt.tensors)
    for index, per_group in scales.items():
        prefix = f"model.layers.{index}."
        names = [n for n in ckpt.tensors if n.startswith(prefix)]
        weights = {n.removeprefix(prefix): ckpt.tensors[n].load().to(torch.float32, copy=True) for n in names}
        for group in layer_groups(ckpt.spec.family, weights):
            if group.prev in per_group:
                apply_scales(weights, group, per_group[group.prev])
        for n in names:
            tensors[n] = _eager(ckpt.tensors[n], weights[n.removeprefix(prefix)])
    return replace(ckpt, tensors=tensors)


def _eager(t: LazyTensor, value: torch.Tensor) -> LazyTensor:
    data = value.to(torch_dtype(t.dtype))
    return replace(t, load=lambda: data, raw=None)


# ---------------------------------------------------------------------------------------------
# search


def fake_quantize(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """``dequantize(quantize(w))`` with the records' own math, float32."""
    return quantize_weight(w, fmt).dequantize("f32")


def collect_inputs(item: LayerInputs) -> dict[str, torch.Tensor]:
    """The input of every projection of the layer over all windows, ``[n_windows, n_ctx, in]``."""
    import torch

    found: dict[str, list[torch.Tensor]] = {p: [] for p in PROJECTIONS}
    hooks = [
        item.layer.get_submodule(p).register_forward_pre_hook(
            lambda _m, args, p=p: found[p].append(args[0].detach().clone())
        )
        for p in PROJECTIONS
    ]
    try:
        with torch.inference_mode():
            for h in item.hidden.split(item.batch):
                item.layer(h, **item.kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return {p: torch.cat(xs) for p, xs in found.items()}


def _inspect_forward(module: nn.Module, x: torch.Tensor, attention: bool, kwargs: dict[str, Any], batch: int):
    import torch

    with torch.inference_mode():
        if attention:
            return torch.cat([module(hidden_states=h, **kwargs)[0] for h in x.split(batch)])
        return torch.cat([module(h) for h in x.split(batch)])


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """``x_mean ** alpha`` (or over ``w_mean ** (1 - alpha)``), normalised by sqrt(max * min)
    (ref: AutoAWQ _compute_best_scale)."""
    import torch

    if w_mean is None:
        s = x_mean.pow(alpha).clamp(min=1e-4)
    else:
        s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def _weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Per input channel, the mean of |w| / max|w| of its group (ref: AutoAWQ _search_best_scale STEP 1)."""
    import torch

    w = torch.cat(weights)
    g = w.abs().reshape(-1, group_size)
    return (g / (g.amax(dim=1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)


def search_scale(item: LayerInputs, group: Group, x: torch.Tensor, config: AWQConfig) -> tuple[torch.Tensor, float]:
    """The scales of least output MSE for ``group`` on inputs ``x``, and their alpha."""
    import torch

    fmt = QuantFormat(config.bits, config.group_size, config.symmetric, "f32")
    linears = [item.layer.get_submodule(n) for n in group.linears]
    originals = [m.weight.detach().clone() for m in linears]
    inspect = item.layer.get_submodule(group.inspect)
    attention = group.inspect == "self_attn"
    x_mean = x.abs().reshape(-1, x.shape[-1]).mean(0)
    if config.search_tokens is not None:
        x = x[: max(1, -(-config.search_tokens // x.shape[1]))]  # the loss on the first whole windows
    want = _inspect_forward(inspect, x, attention, item.kwargs, item.batch)
    w_mean = _weight_mean(originals, config.group_size) if config.duo_scaling else None
    best = (float("inf"), None, 0.0)
    try:
        for i in range(config.n_grid):
            alpha = i / config.n_grid
            s = candidate_scales(x_mean, w_mean, alpha)
            with torch.no_grad():
                for m, w in zip(linears, originals, strict=True):
                    m.weight.copy_(fake_quantize(w * s, fmt) / s)
            loss = float((_inspect_forward(inspect, x, attention, item.kwargs, item.batch) - want).square().mean())
            if loss < best[0]:
                best = (loss, s, alpha)
    finally:
        with torch.no_grad():
            for m, w in zip(linears, originals, strict=True):
                m.weight.copy_(w)
    if best[1] is None:
        raise UnsupportedError(f"layer {item.index}: AWQ scale search for {group.prev} found no finite loss")
    return best[1], best[2]


def search_clip(w: torch.Tensor, x: torch.Tensor, config: AWQConfig) -> torch.Tensor:
    """Per row and group, the clamp bound of least output MSE over ``CLIP_TOKENS`` tokens
    (ref: AutoAWQ _compute_best_clip, n_grid 20, max_shrink 0.5); ``[rows, groups, 1]``."""
    import torch

    fmt = QuantFormat(config.bits, config.group_size, config.symmetric, "f32")
    rows, cols = w.shape
    gs = config.group_size
    x = x.reshape(-1, cols)
    x = x[:: max(1, x.shape[0] // CLIP_TOKENS)].reshape(-1, cols // gs, gs)  # [tokens, groups, gs]
    wg = w.reshape(rows, cols // gs, gs)
    want = torch.einsum("tgk,ogk->otg", x, wg)
    max_val = wg.abs().amax(dim=-1, keepdim=True)  # [rows, groups, 1]
    best_val, best_err = max_val.clone(), torch.full_like(max_val, float("inf"))
    for i in range(max(1, config.n_grid // 2)):
        bound = max_val * (1 - i / config.n_grid)
        q = fake_quantize(torch.clamp(wg, -bound, bound).reshape(rows, cols), fmt).reshape(rows, -1, gs)
        err = (torch.einsum("tgk,ogk->otg", x, q) - want).square().mean(dim=1).unsqueeze(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_val = torch.where(better, bound, best_val)
    return best_val


# ---------------------------------------------------------------------------------------------
# the layer loop


def quantize_layer(item: LayerInputs, family: str, config: AWQConfig, dtypes: dict[str, str], as_records: bool = True):
    """Search, fold, clip and quantize one layer in place: (records, folded norms, alphas); without
    ``as_records`` the scaled and clipped float weights in place of the records."""
    import torch

    inputs = collect_inputs(item)
    weights = {n: p.data for n, p in item.layer.named_parameters()}
    groups = layer_groups(family, weights)
    found = [(g, *search_scale(item, g, inputs[g.linears[0]], config)) for g in groups]
    with torch.no_grad():
        for group, s, _ in found:
            apply_scales(weights, group, s)
            for name in group.linears:
                inputs[name] = inputs[name] / s  # ref: AutoAWQ apply_scale, input_feat_dict
    records = {}
    for proj in PROJECTIONS:
        w = weights[f"{proj}.weight"]
        if config.clip and proj not in NO_CLIP:
            bound = search_clip(w, inputs[proj], config)
            rows, cols = w.shape
            w = torch.clamp(w.reshape(rows, cols // config.group_size, -1), -bound, bound).reshape(rows, cols)
        source = dtypes[f"{proj}.weight"]
        w = w.to(torch_dtype(source))
        records[proj] = quantize_weight(w, config.format_for(source)) if as_records else w
    norms = {g.prev: weights[f"{g.prev}.weight"].clone() for g, _, _ in found}
    norms = {name: w for name, w in norms.items() if w.ndim == 1}
    return records, norms, {g.prev: alpha for g, _, alpha in found}


def quantize(ckpt: Checkpoint, config: AWQConfig, as_records: bool = True) -> Checkpoint:
    """``ckpt`` with every decoder projection as an AWQ record and the scales folded into its norms.

    Without ``as_records`` the projections stay float, scaled and clipped: what a writer with its
    own quantizer (GGUF's block types) takes, as llama.cpp's AWQ recipe converts the scaled model.

    ``extra["quantization"]`` records the method, the config, the chosen alpha per group and
    every tensor left unquantized (the embedding / tied LM head and the norms).
    """
    if ckpt.quantized():
        raise UnsupportedError("the checkpoint is already quantized", ckpt.source)
    _check_shapes(ckpt, config)
    tensors = dict(ckpt.tensors)
    alphas = {}
    layers = ckpt.spec.num_layers
    with progress(f"AWQ {ckpt.source or 'model'}", layers, unit="layers") as advance:
        for item in stream_layers(ckpt, config.calibration):
            prefix = f"model.layers.{item.index}."
            dtypes = {n.removeprefix(prefix): t.dtype for n, t in ckpt.tensors.items() if n.startswith(prefix)}
            records, norms, alphas[item.index] = quantize_layer(item, ckpt.spec.family, config, dtypes, as_records)
            for proj, record in records.items():
                t = ckpt.tensors[f"{prefix}{proj}.weight"]
                if as_records:
                    tensors[t.name] = replace(t, quant=record.format, raw=None, load=functools.partial(_same, record))
                else:
                    tensors[t.name] = _eager(t, record)
            for norm, value in norms.items():
                tensors[f"{prefix}{norm}.weight"] = _eager(ckpt.tensors[f"{prefix}{norm}.weight"], value)
            advance(1)
    changed = [n for n, t in tensors.items() if t is not ckpt.tensors[n] and len(t.shape) == 2]
    quantized = [n for n, t in tensors.items() if t.quant is not None] if as_records else changed
    kept = [n for n in tensors if n not in quantized]
    log.info("AWQ: %d tensors quantized, %d kept in their source dtype", len(quantized), len(kept))
    config_json = asdict(config)
    manifest = {"method": "awq", "config": config_json, "quantized": len(quantized), "kept": kept}
    manifest["alphas"] = {str(i): a for i, a in alphas.items()}
    return replace(ckpt, tensors=tensors, extra={**ckpt.extra, "quantization": manifest})


def _same(record: QuantizedTensor) -> QuantizedTensor:
    return record


def _check_shapes(ckpt: Checkpoint, config: AWQConfig) -> None:
    for i in range(ckpt.spec.num_layers):
        for proj in PROJECTIONS:
            t = ckpt.tensors[f"model.layers.{i}.{proj}.weight"]
            if t.shape[1] % config.group_size:
                raise UnsupportedError(
                    f"group size {config.group_size} does not divide the row length {t.shape[1]} of tensor {t.name}",
                    ckpt.source,
                )
