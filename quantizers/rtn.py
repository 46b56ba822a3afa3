"""Round-to-nearest (RTN) weight quantization: int8 per output channel, int4 group-wise.

The scale and zero-point math is compressed-tensors' min-max rule, so that a record written in
its pack-quantized format decompresses to exactly ``record.dequantize()``
(ref: compressed-tensors 0.20.0 quantization/utils/helpers.py ``calculate_qparams``,
quantization/lifecycle/forward_helpers.py ``_quantize``; llm-compressor observers/min_max.py):

- per group (or per output row), ``lo = min(min(w), 0)`` and ``hi = max(max(w), 0)``: zero is
  always representable;
- symmetric: ``scale = max(|lo|, hi) / ((qmax - qmin) / 2)``, e.g. ``amax / 7.5`` for int4,
  ``amax / 127.5`` for int8, zero point 0; asymmetric: ``scale = (hi - lo) / (qmax - qmin)`` and
  ``zero_point = round(clamp(qmin - lo / scale, qmin, qmax))``;
- the scale is rounded to the scale dtype (by default the weight's own dtype, as llm-compressor
  stores it) and a zero scale becomes that dtype's epsilon;
- ``code = round(clamp(w / scale + zero_point, qmin, qmax))``, rounding half to even (torch.round).

``full_range`` (symmetric only) uses the whole signed range instead: ``scale = m / qmin`` where
``m`` is the group's value of largest magnitude with its sign, so ``m`` is exactly ``qmin`` and
the step is ``amax / 8`` rather than ``amax / 7.5`` for int4 (ref: ggml-quants.c
``quantize_row_q4_0_ref``, ``d = max / -8``; onnxruntime's MLAS blockwise quantizer does the
same). The scale may be negative; ``codes * scale`` is still the weight. About 20 % less weight
error on the demo model; compressed-tensors' own quantizer does not make such records.

Arithmetic is float32; every weight is loaded, quantized and dropped one tensor at a time.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass, replace

from gemport.checkpoint import CHUNK_VALUES, Checkpoint, LazyTensor, RowLoader, torch_dtype
from gemport.errors import UnsupportedError
from quantizers.record import BITS, SCALE_DTYPES, QuantFormat, QuantizedTensor

log = logging.getLogger(__name__)

GROUP_SIZES = (None, 32, 64, 128)
PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class RTNConfig:
    """bits 8 or 4; group_size None (or -1) for one scale per output channel, else 32, 64 or 128;
    symmetric or not; scale_dtype None for each weight's own dtype; embedding_bits None keeps the
    embedding (and an untied LM head) in the source dtype, 8 or 4 quantizes it with the same grouping."""

    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    scale_dtype: str | None = None
    embedding_bits: int | None = None
    full_range: bool = False  # symmetric only: scale = signed amax / qmin (see the module docstring)

    def __post_init__(self) -> None:
        object.__setattr__(self, "group_size", check_bits_and_group(self.bits, self.group_size))
        if self.full_range and not self.symmetric:
            raise ValueError("full_range applies to symmetric quantization only")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be True or False, got {self.symmetric!r}")
        if self.scale_dtype not in (None, *SCALE_DTYPES):
            raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES} or None, got {self.scale_dtype!r}")
        if self.embedding_bits not in (None, *BITS):
            raise ValueError(f"embedding_bits must be None, 4 or 8, got {self.embedding_bits!r}")

    def format_for(self, bits: int, source_dtype: str) -> QuantFormat:
        return QuantFormat(bits, self.group_size, self.symmetric, self.scale_dtype or source_dtype)


def check_bits_and_group(bits: int, group_size: int | None) -> int | None:
    """ValueError unless bits is 4 or 8 and group_size one of GROUP_SIZES (-1 meaning None); the group size."""
    group_size = None if group_size == -1 else group_size
    if bits not in BITS:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be None/-1 (per output channel), 32, 64 or 128, got {group_size!r}")
    return group_size


def projection_names(num_layers: int) -> list[str]:
    """Every linear projection weight of the decoder layers, by canonical name."""
    return [f"model.layers.{i}.{p}.weight" for i in range(num_layers) for p in PROJECTIONS]


def quantize(ckpt: Checkpoint, config: RTNConfig) -> Checkpoint:
    """``ckpt`` with every decoder projection (and, by option, the embedding) as lazy RTN records.

    Nothing is computed here beyond shape checks: each record is made when its tensor is loaded.
    ``extra["quantization"]`` records the method, the config and every tensor left unquantized.
    """
    if ckpt.quantized():
        raise UnsupportedError("the checkpoint is already quantized", ckpt.source)
    targets = {n: config.bits for n in projection_names(ckpt.spec.num_layers)}
    if config.embedding_bits is not None:
        targets |= {n: config.embedding_bits for n in EMBEDDINGS if n in ckpt.tensors}
    tensors = {}
    for name, t in ckpt.tensors.items():
        if name in targets:
            fmt = config.format_for(targets[name], t.dtype)
            _check_groups(t, fmt, ckpt.source)
            load = functools.partial(_load_quantized, t, fmt, config.full_range)
            if isinstance(t.load, RowLoader):  # rows are quantized independently: a writer may stream them
                load = RowLoader(functools.partial(_rows_quantized, t.load, fmt, config.full_range), t.load.n)
            t = replace(t, quant=fmt, raw=None, load=load)
        tensors[name] = t
    kept = [n for n in ckpt.tensors if n not in targets]
    log.info("RTN: %d tensors quantized, %d kept in their source dtype", len(targets), len(kept))
    manifest = {"method": "rtn", "config": asdict(config), "quantized": len(targets), "kept": kept}
    return replace(ckpt, tensors=tensors, extra={**ckpt.extra, "quantization": manifest})


def _check_groups(t: LazyTensor, fmt: QuantFormat, source: str) -> None:
    if len(t.shape) != 2:
        raise UnsupportedError(f"tensor {t.name} is {len(t.shape)}-D; only 2-D weights are quantized", source)
    if fmt.group_size is not None and t.shape[1] % fmt.group_size:
        raise UnsupportedError(
            f"group size {fmt.group_size} does not divide the row length {t.shape[1]} of tensor {t.name}", source
        )


def _load_quantized(t: LazyTensor, fmt: QuantFormat, full_range: bool = False) -> QuantizedTensor:
    return quantize_weight(t.load(), fmt, full_range)


def _rows_quantized(rows: RowLoader, fmt: QuantFormat, full_range: bool, a: int, b: int) -> QuantizedTensor:
    return quantize_weight(rows.rows(a, b), fmt, full_range)


def quantize_weight(w, fmt: QuantFormat, full_range: bool = False) -> QuantizedTensor:
    """RTN record of one weight ``w [out, in]`` in format ``fmt`` (math in the module docstring),
    made a block of rows at a time: rows are independent, and the float32 temporaries of a whole
    24576 x 3072 projection would be several times its size."""
    import torch

    step = max(1, CHUNK_VALUES // max(w.shape[1], 1))
    if w.shape[0] <= step:
        return _quantize_rows(w, fmt, full_range)
    parts = [_quantize_rows(w[a : a + step], fmt, full_range) for a in range(0, w.shape[0], step)]
    zero_points = None if fmt.symmetric else torch.cat([p.zero_points for p in parts])
    return QuantizedTensor(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), zero_points, fmt)


def _quantize_rows(w, fmt: QuantFormat, full_range: bool = False) -> QuantizedTensor:
    import torch

    rows, cols = w.shape
    qmin, qmax = fmt.code_range()
    x = w.to(torch.float32).reshape(rows, fmt.groups(cols), -1)
    scale, zero_points = group_params(x.amin(dim=-1).clamp(max=0), x.amax(dim=-1).clamp(min=0), fmt, full_range)
    levels = x / scale.to(torch.float32).unsqueeze(-1)
    if zero_points is not None:
        levels = levels + zero_points.to(torch.float32).unsqueeze(-1)
    codes = torch.round(torch.clamp(levels, qmin, qmax)).to(torch.int8).reshape(rows, cols)
    return QuantizedTensor(codes, scale, zero_points, fmt)


def group_params(lo, hi, fmt: QuantFormat, full_range: bool = False):
    """(scales in the scale dtype, int8 zero points or None) of groups whose float32 minimum ``lo`` is
    clamped to <= 0 and maximum ``hi`` to >= 0, any shape; the per-group half of RTN, shared with the
    Triton quantizer (quantizers/kernels/group_quant.py)."""
    import torch

    qmin, qmax = fmt.code_range()
    span = float(qmax - qmin)
    raw = torch.maximum(-lo, hi) / (span / 2) if fmt.symmetric else (hi - lo) / span
    if full_range:  # the signed value of largest magnitude lands exactly on qmin
        raw = torch.where(hi > -lo, hi, lo) / qmin
    sdt = torch_dtype(fmt.scale_dtype)
    scale = raw.to(sdt)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(sdt).eps, dtype=sdt, device=scale.device), scale)
    if fmt.symmetric:
        return scale, None
    # compressed-tensors takes the zero point from the unrounded scale; an all-zero group
    # (raw scale 0, where it would divide 0 by 0) takes the epsilon scale and so code qmin.
    divisor = torch.where(raw == 0, scale.to(torch.float32), raw)
    return scale, torch.round(torch.clamp(qmin - lo / divisor, qmin, qmax)).to(torch.int8)
