"""GPTQ: Hessian-based error compensation, column by column, onto any quantization grid.

Algorithm (ref: Frantar et al., "GPTQ", ICLR 2023, Algorithm 1; IST-DASLab/gptq gptq.py
``GPTQ.fasterquant``; AutoGPTQ auto_gptq/quantization/gptq.py for ``static_groups``), for one
linear weight ``W [rows, n]`` whose inputs ``x`` were seen on calibration text:

1. ``H = 2 / N * sum_t x_t x_t^T`` over the N calibration tokens. Columns never active
   (``H[j, j] == 0``) get ``H[j, j] = 1`` and ``W[:, j] = 0``.
2. Act-order: columns are processed by decreasing ``H[j, j]``. Their quantization parameters
   are then fitted before the pass, on the unmodified weights of each group of columns in
   natural order ("static groups"), so every group keeps one set of parameters whatever order
   its columns are rounded in and the checkpoint needs no column permutation. Without
   act-order the parameters of a group are fitted when its first column is reached, on the
   weights as already updated by the earlier columns (the paper's lazy grouping).
3. Dampening: ``H += damp * mean(diag H) * I``; ``U`` = upper Cholesky factor of ``H^-1``.
4. Columns in lazy blocks of ``block_size``: column ``j`` is rounded to its grid,
   ``e = (w_j - q_j) / U[j, j]``, the block's later columns get ``-= e U[j, later]``, and the
   columns after the block get the block's errors at once (``W[:, end:] -= E U[block, end:]``).

The grid is pluggable (``fit(x) -> grid``, ``grid.round(column, k) -> (levels, values)``):
compressed-tensors' min-max math of quantizers.rtn per group (records for the HF writer), or
llama.cpp's block grids of quantizers.gguf_grid (bytes for the GGUF writer, the grid fitted
with ``diag H`` as the importance matrix, as llama-quantize uses an imatrix).

The layer loop (ref: AutoGPTQ ``true_sequential``; IST-DASLab/gptq llama.py
``llama_sequential``): within each decoder layer the projections are quantized in four stages
(q/k/v, o, gate/up, down); each stage's Hessian comes from its inputs with the earlier stages
already quantized, and the next layer's calibration inputs are this layer's outputs after
quantization. Only one layer, its inputs and one stage's Hessian are in memory at a time.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from gemport.checkpoint import Checkpoint, LazyTensor, torch_dtype
from gemport.errors import UnsupportedError
from gemport.progress import progress
from quantizers.calibration import CalibrationConfig, LayerInputs, stream_layers
from quantizers.record import BITS, SCALE_DTYPES, QuantFormat, QuantizedTensor
from quantizers.rtn import GROUP_SIZES, quantize_weight

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Projections that share an input, in the order a layer computes them (ref: AutoGPTQ
# auto_gptq/modeling/gemma.py inside_layer_modules).
STAGES = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
MAX_DAMP_RETRIES = 4  # each retry multiplies damp by 10 (ref: GPTQModel's damp_auto_increment)


@dataclass(frozen=True)
class GPTQConfig:
    """bits 4 or 8; group_size None for one scale per output channel, else 32, 64 or 128;
    symmetric or not; ``damp`` times mean(diag H) added to the diagonal; ``block_size`` columns
    per lazy update; ``act_order`` processes columns by decreasing Hessian diagonal (with
    static groups); scale_dtype None for each weight's own dtype."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    scale_dtype: str | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self) -> None:
        if self.group_size == -1:
            object.__setattr__(self, "group_size", None)
        if self.bits not in BITS:
            raise ValueError(f"bits must be 4 or 8, got {self.bits!r}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be None/-1 (per output channel), 32, 64 or 128, got {self.group_size!r}")
        if not isinstance(self.symmetric, bool) or not isinstance(self.act_order, bool):
            raise ValueError("symmetric and act_order must be True or False")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if self.scale_dtype not in (None, *SCALE_DTYPES):
            raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES} or None, got {self.scale_dtype!r}")

    def format_for(self, source_dtype: str) -> QuantFormat:
        return QuantFormat(self.bits, self.group_size, self.symmetric, self.scale_dtype or source_dtype)


# ---------------------------------------------------------------------------------------------
# grids


class Grid(Protocol):
    def round(self, column: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Column ``k`` of the group rounded to the nearest level: (integer levels, float32 values)."""


@dataclass(frozen=True)
class MinMaxGrid:
    """One group's per-row scale and zero point by compressed-tensors' min-max rule (quantizers.rtn)."""

    scale: torch.Tensor  # [rows] float32, the stored (scale-dtype rounded) scale
    zero: torch.Tensor  # [rows] float32, 0 when symmetric
    qmin: int
    qmax: int

    @classmethod
    def fit(cls, x: torch.Tensor, fmt: QuantFormat) -> MinMaxGrid:
        import torch

        record = quantize_weight(x, replace(fmt, group_size=None))
        zero = record.zero_points
        zero = torch.zeros(x.shape[0]) if zero is None else zero[:, 0].to(torch.float32)
        return cls(record.scales[:, 0].to(torch.float32), zero, *fmt.code_range())

    def round(self, column: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        levels = torch.round(torch.clamp(column / self.scale + self.zero, self.qmin, self.qmax))
        return levels, (levels - self.zero) * self.scale


def gptq_weight(
    w: torch.Tensor, h: torch.Tensor, fit: Callable[[torch.Tensor], Grid], width: int, config: GPTQConfig
) -> tuple[torch.Tensor, torch.Tensor, list[Grid]]:
    """GPTQ of ``w [rows, n]`` with Hessian ``h [n, n]`` on groups of ``width`` columns fitted by
    ``fit``: (levels [rows, n] float32, values [rows, n] float32, one grid per group in column order)."""
    import torch

    rows, n = w.shape
    w = w.to(torch.float32, copy=True)
    h = h.to(torch.float32, copy=True)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    static = config.act_order or width >= n
    grids: list[Grid | None] = [None] * (n // width)
    if static:
        grids = [fit(w[:, g : g + width]) for g in range(0, n, width)]
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if config.act_order else torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    u = _inverse_cholesky(h, config.damp)
    levels, values = torch.zeros_like(w), torch.zeros_like(w)
    block = config.block_size if static else max(config.block_size, width) // width * width
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, err = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            if col % width == 0 and not static:
                # blocks hold whole groups: the group's columns as updated so far, all in w1
                grids[col // width] = fit(w1[:, i : i + width])
            lv, q = grids[col // width].round(w1[:, i], col % width)
            levels[:, i1 + i], values[:, i1 + i] = lv, q
            e = (w1[:, i] - q) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    inverse = torch.argsort(perm)
    return levels[:, inverse], values[:, inverse], grids


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, raising damp tenfold on failure."""
    import torch

    mean = float(torch.diag(h).mean())
    for attempt in range(MAX_DAMP_RETRIES + 1):
        d = damp * 10**attempt
        hd = h + d * mean * torch.eye(h.shape[0])
        factor, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            inv = torch.cholesky_inverse(factor)
            u, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                if attempt:
                    log.warning("GPTQ: Hessian needed damp %.3g to be positive definite", d)
                return u
    raise UnsupportedError(f"GPTQ: the Hessian is not positive definite even with damp {d:g}")


def record_from(levels: torch.Tensor, grids: list[MinMaxGrid], fmt: QuantFormat, dtype: str) -> QuantizedTensor:
    """The QuantizedTensor of GPTQ's levels on min-max grids (one grid per group, in order)."""
    import torch

    sdt = torch_dtype(fmt.scale_dtype)
    scales = torch.stack([g.scale for g in grids], dim=1).to(sdt)
    zero = None if fmt.symmetric else torch.stack([g.zero for g in grids], dim=1).to(torch.int8)
    return QuantizedTensor(levels.to(torch.int8), scales, zero, fmt)


# ---------------------------------------------------------------------------------------------
# the layer loop


def stage_hessian(item: LayerInputs, name: str) -> torch.Tensor:
    """``2 / N * X^T X`` of the inputs of projection ``name`` over all calibration tokens."""
    import torch

    module = item.layer.get_submodule(name)
    n = module.weight.shape[1]
    acc = {"h": torch.zeros(n, n), "tokens": 0}

    def hook(_module, args):
        x = args[0].detach().reshape(-1, n).to(torch.float32)
        acc["h"].addmm_(x.T, x)
        acc["tokens"] += x.shape[0]

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.inference_mode():
            for h in item.hidden.split(item.batch):
                item.layer(h, **item.kwargs)
    finally:
        handle.remove()
    return acc["h"] * (2 / acc["tokens"])


QuantizeOne = Callable[[str, "torch.Tensor", "torch.Tensor"], tuple[Any, "torch.Tensor"]]


def quantize_layer(item: LayerInputs, quantize_one: QuantizeOne) -> dict[str, Any]:
    """Quantize one layer's projections stage by stage, in place: the layer's weights become the
    quantized values. ``quantize_one(proj, w, h) -> (result, values)``; returns the results by projection."""
    import torch

    results = {}
    for stage in STAGES:
        h = stage_hessian(item, stage[0])
        for proj in stage:
            weight = item.layer.get_submodule(proj).weight
            results[proj], values = quantize_one(proj, weight.detach(), h)
            with torch.no_grad():
                weight.copy_(values)
        del h
    return results


def quantize(ckpt: Checkpoint, config: GPTQConfig) -> Checkpoint:
    """``ckpt`` with every decoder projection as a GPTQ record (compressed-tensors' grid).

    ``extra["quantization"]`` records the method, the config and every tensor left unquantized.
    """

    def one(prefix: str, proj: str, w: torch.Tensor, h: torch.Tensor) -> tuple[QuantizedTensor, torch.Tensor]:
        dtype = ckpt.tensors[f"{prefix}{proj}.weight"].dtype
        fmt = config.format_for(dtype)
        width = fmt.group_size or w.shape[1]
        # GPTQ works on the weight as stored: rounded to the source dtype, as RTN sees it
        w = w.to(torch_dtype(dtype)).float()
        levels, _, grids = gptq_weight(w, h, functools.partial(MinMaxGrid.fit, fmt=fmt), width, config)
        record = record_from(levels, grids, fmt, dtype)
        return record, record.dequantize("f32")

    def attach(t: LazyTensor, record: QuantizedTensor) -> LazyTensor:
        return replace(t, quant=record.format, raw=None, load=functools.partial(_same, record))

    return run(ckpt, config, one, attach, {"method": "gptq", "config": asdict(config)})


def run(
    ckpt: Checkpoint,
    config: GPTQConfig,
    one: Callable[[str, str, torch.Tensor, torch.Tensor], tuple[Any, torch.Tensor]],
    attach: Callable[[LazyTensor, Any], LazyTensor],
    manifest: dict[str, Any],
) -> Checkpoint:
    """The layer loop shared by the record and GGUF outputs: ``one(prefix, proj, w, h)`` quantizes a
    weight, ``attach(tensor, result)`` makes its LazyTensor."""
    if ckpt.quantized():
        raise UnsupportedError("the checkpoint is already quantized", ckpt.source)
    _check_shapes(ckpt, config)
    tensors = dict(ckpt.tensors)
    with progress(f"GPTQ {ckpt.source or 'model'}", ckpt.spec.num_layers) as advance:
        for item in stream_layers(ckpt, config.calibration, quantized_outputs=True):
            prefix = f"model.layers.{item.index}."
            results = quantize_layer(item, functools.partial(one, prefix))
            for proj, result in results.items():
                name = f"{prefix}{proj}.weight"
                tensors[name] = attach(ckpt.tensors[name], result)
            log.info("GPTQ: layer %d done", item.index)
            advance(1)
    quantized = [n for n in tensors if n.startswith("model.layers.") and tensors[n] is not ckpt.tensors[n]]
    kept = [n for n in tensors if n not in quantized]
    log.info("GPTQ: %d tensors quantized, %d kept in their source dtype", len(quantized), len(kept))
    manifest = {**manifest, "quantized": len(quantized), "kept": kept}
    return replace(ckpt, tensors=tensors, extra={**ckpt.extra, "quantization": manifest})


def _same(value: Any) -> Any:
    return value


def _check_shapes(ckpt: Checkpoint, config: GPTQConfig) -> None:
    if config.group_size is None:
        return
    for i in range(ckpt.spec.num_layers):
        for stage in STAGES:
            for proj in stage:
                t = ckpt.tensors[f"model.layers.{i}.{proj}.weight"]
                if t.shape[1] % config.group_size:
                    raise UnsupportedError(
                        f"group size {config.group_size} does not divide the row length {t.shape[1]} "
                        f"of tensor {t.name}",
                        ckpt.source,
                    )
