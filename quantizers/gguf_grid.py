"""llama.cpp's GGUF block grids with fixed parameters: fit a group of columns, round one column
at a time, pack the levels into GGUF blocks. This is what GPTQ (quantizers/gptq.py) needs to
emit codes on llama.cpp's grids while it feeds each column's rounding error forward.

A *group* is a run of ``group_width(qtype)`` consecutive columns of a weight matrix
W [rows, n] whose blocks share parameters: one 32-value block per row for Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1, one 256-value super-block per row for Q4_K, Q5_K, Q6_K.

API:

* ``GRID_TYPES``: the type names handled here.
* ``group_width(qtype) -> int``: columns per group (32 or 256).
* ``row_sigma2(w) -> [rows]``: llama.cpp's per-row ``sigma2 = sum x^2 / n_per_row`` over whole
  rows; the importance-weighted legacy encoders (Q4_0/Q4_1/Q5_0/Q5_1 with an imatrix) weigh
  each value by ``qw * sqrt(sigma2 + x^2)`` with it (ref: ggml-quants.c quantize_row_q4_0_impl).
* ``fit(x, qtype, imatrix=None, sigma2=None) -> BlockGrid``: the block parameters of one group
  ``x [rows, width]``, chosen exactly as ``quantizers.gguf_blocks.quantize`` (i.e. libggml's
  ggml_quantize_chunk) chooses them, stored values included (fp16 d/dmin, 6-bit K sub-block
  scales and mins, Q6_K int8 sub-scales). ``imatrix`` holds the group's columns' importances
  ``[width]``, with the semantics of ``quantize``; ``sigma2`` (legacy types with an imatrix
  only) is ``row_sigma2`` of the full rows, computed from ``x`` alone when None.
* ``BlockGrid.round(column, k) -> (levels, values)``: column ``k`` of the group (all rows) to
  the nearest level: int32 levels in ``[lo, hi]`` and their float32 values as llama.cpp
  dequantizes them.
* ``BlockGrid.dequantize(levels, k) -> values``: float32 values of any levels of column ``k``.
* ``pack(grids, levels) -> uint8 [rows, bytes_per_row]``: the GGUF blocks of levels
  ``[rows, n]`` (integers in ``[lo, hi]``) on the grids of the groups, in column order.

The grid of an element is ``value = step * (level - zero) - offset`` in float32, the very
expression gguf-py's and libggml's dequantizers evaluate: Q8_0 ``d*q`` (q in -127..127),
Q4_0/Q5_0 ``d*(q - 8|16)``, Q4_1/Q5_1 ``d*q + m`` (offset ``-m``), Q4_K/Q5_K
``(d*sc)*q - dmin*m``, Q6_K ``(d*sc)*(q - 32)``.

Rounding uses the arithmetic of the encoder's final levels pass, so that fitting every group of
a matrix, rounding each of its own columns and packing gives ``gguf_blocks.quantize``'s bytes
wherever the encoder derives the levels from the parameters:

* Q8_0: ``roundf(x * id)``; Q4_0/Q5_0: ``floor(x*id + 8.5|16.5)``; Q4_1/Q5_1:
  ``floor((x - min)*id + 0.5)``, where ``id = 1/d`` and ``min`` are the float32 values before
  the fp16 store (ref: quantize_row_q4_0_ref ..., whose ``(int8_t)`` truncation is ``floor``
  on the non-negative arguments the encoder meets). The chosen level is therefore the nearest
  on the grid of the unrounded ``d``, which is the stored grid's nearest except within about
  2**-11 of a step from a tie (or where the fp16 ``d`` is subnormal).
* K-types: ``nearest_int((x + dmin*m) / (d*sc))`` on the stored scales (ref:
  quantize_row_q4_K_ref second pass), the exact nearest level. Sub-blocks whose stored step is
  0 keep the levels of the search, as the encoder writes them (every level has the same value).
* Out-of-range arguments saturate at ``lo``/``hi`` (GPTQ's error feedback moves values off the
  group's range); the encoder never meets them, except one case: where ``|(x + dm)/d|`` reaches
  2**22 (a value with zero importance far outside its sub-block's range) ggml's nearest_int
  wraps around and writes an arbitrary level; here it saturates.

Where the encoder takes the levels straight from its search (Q4_0, Q4_1, Q5_0, Q5_1 with an
imatrix: quantize_row_q4_0_impl ... write make_qx_quants'/make_qkx3_quants' levels, fitted to
the unrounded scale), ``fit`` gives the same parameters and ``round`` the nearest level on them
as above, which can differ from the encoder's level but is never farther from ``x`` by more than
the gap between the unrounded and the stored grid.

Inputs may be any array-likes numpy reads (CPU torch tensors included); results are numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from gemport.errors import UnsupportedError
from quantizers import gguf_blocks as gb

__all__ = ["GRID_TYPES", "BlockGrid", "fit", "group_width", "pack", "row_sigma2"]

GRID_TYPES: tuple[str, ...] = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

_F32 = np.float32
# (lo, hi, zero): level range and the level whose value is -offset (ref: ggml-common.h blocks)
_RANGE = {
    "Q8_0": (-127, 127, 0),  # the encoder's range; -128 would fit the int8 but ggml never writes it
    "Q4_0": (0, 15, 8),
    "Q5_0": (0, 31, 16),
    "Q4_1": (0, 15, 0),
    "Q5_1": (0, 31, 0),
    "Q4_K": (0, 15, 0),
    "Q5_K": (0, 31, 0),
    "Q6_K": (0, 63, 32),
}
_K_TYPES = ("Q4_K", "Q5_K", "Q6_K")


def _type_name(qtype: str | GGMLQuantizationType) -> str:
    name = qtype.name if isinstance(qtype, GGMLQuantizationType) else str(qtype).upper()
    if name not in GRID_TYPES:
        raise UnsupportedError(f"no GGUF block grid for type {qtype!r}; supported: {', '.join(GRID_TYPES)}")
    return name


def group_width(qtype: str | GGMLQuantizationType) -> int:
    """Columns that share block parameters: 32 (legacy types) or 256 (K-types)."""
    return GGML_QUANT_SIZES[GGMLQuantizationType[_type_name(qtype)]][0]


def row_sigma2(w: np.ndarray) -> np.ndarray:
    """``sum x^2 / n_per_row`` of each whole row of ``w [rows, n]`` (float32, summed left to right).
    ref: ggml-quants.c quantize_row_q4_0_impl (also q4_1/q5_0/q5_1_impl)."""
    w = np.asarray(w, dtype=_F32)
    if w.ndim != 2 or w.shape[1] == 0:
        raise ValueError(f"expected a [rows, n_per_row] matrix, got shape {w.shape}")
    return gb._row_sigma2(w)


@dataclass(frozen=True, eq=False)
class BlockGrid:
    """The fitted parameters of one group of columns, for all rows.

    ``value = step * (level - zero) - offset`` with levels in ``[lo, hi]``. ``header`` holds the
    stored per-row fields in pack's order; ``inverse`` and ``center`` (legacy types) the
    encoder's float32 ``1/d`` and min for rounding; ``fallback`` (K-types) the levels written
    where ``step`` is 0.
    """

    qtype: str
    lo: int
    hi: int
    zero: int
    step: np.ndarray  # [rows, width] float32
    offset: np.ndarray  # [rows, width] float32
    header: tuple[np.ndarray, ...]
    inverse: np.ndarray | None = None  # [rows] float32, legacy types
    center: np.ndarray | None = None  # [rows] float32, Q4_1 / Q5_1
    fallback: np.ndarray | None = None  # [rows, width] uint8, K-types

    def __post_init__(self) -> None:
        # round and dequantize read one column at a time: keep columns contiguous
        for name in ("step", "offset", "fallback"):
            v = getattr(self, name)
            if v is not None and not v.flags.f_contiguous:
                object.__setattr__(self, name, np.asfortranarray(v))

    @property
    def rows(self) -> int:
        return self.step.shape[0]

    @property
    def width(self) -> int:
        return self.step.shape[1]

    def _column(self, column: np.ndarray, k: int) -> np.ndarray:
        if not 0 <= k < self.width:
            raise ValueError(f"column index {k} outside the {self.qtype} group of {self.width} columns")
        x = np.asarray(column, dtype=_F32).reshape(-1)
        if x.shape[0] != self.rows:
            raise ValueError(f"expected a column of {self.rows} values, got {x.shape[0]}")
        return x

    def round(self, column: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Column ``k`` of the group rounded to the nearest level (see the module docstring for
        the exact arithmetic): (int32 levels [rows], float32 values [rows])."""
        x = self._column(column, k)
        if not np.isfinite(np.add.reduce(x, dtype=np.float64)):  # no float32 sum can overflow float64
            raise ValueError(f"column {k} of the {self.qtype} group has non-finite values")
        with np.errstate(all="ignore"):  # masked-out lanes divide by zero or overflow
            levels = self._round_k(x, k) if self.qtype in _K_TYPES else self._round_legacy(x)
        return levels, self.dequantize(levels, k)

    def _round_legacy(self, x: np.ndarray) -> np.ndarray:
        if self.qtype == "Q8_0":
            t = gb._roundf(x * self.inverse)  # ref: quantize_row_q8_0_ref: roundf(x*id)
        else:
            # ref: quantize_row_q4_0_ref / q5_0_ref: (int8_t)(x*id + 8.5f | 16.5f);
            # quantize_row_q4_1_ref / q5_1_ref: (int8_t)((x - min)*id + 0.5f)
            t = x * self.inverse if self.center is None else (x - self.center) * self.inverse
            t += _F32(self.zero + 0.5)
            np.floor(t, out=t)
        return _clamp(t, self.lo, self.hi).astype(np.int32)

    def _round_k(self, x: np.ndarray, k: int) -> np.ndarray:
        # ref: ggml-quants.c quantize_row_q4_K_ref / q5_K_ref / q6_K_ref second pass:
        # l = nearest_int((x + dm)/d) clamped, kept from the search where d == 0. Clamping the
        # argument before rounding is the same as after for integer bounds, and keeps it where
        # np.rint is nearest_int (no wrap-around).
        step = self.step[:, k]
        all_live = bool(step.all())
        t = x + self.offset[:, k]
        t /= step if all_live else np.where(step != 0, step, _F32(1))
        np.rint(_clamp(t, self.lo - self.zero, self.hi - self.zero), out=t)
        levels = t.astype(np.int32)
        levels += self.zero
        return levels if all_live else np.where(step != 0, levels, self.fallback[:, k]).astype(np.int32)

    def dequantize(self, levels: np.ndarray, k: int) -> np.ndarray:
        """float32 values of ``levels [rows]`` in column ``k``: ``step*(level - zero) - offset``."""
        q = (np.asarray(levels).astype(np.int32) - self.zero).astype(_F32)
        return self.step[:, k] * q - self.offset[:, k]


def _clamp(t: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """In-place clamp of a float32 array to [lo, hi] (cheaper than np.clip on short columns)."""
    np.maximum(t, _F32(lo), out=t)
    return np.minimum(t, _F32(hi), out=t)


# ---------------------------------------------------------------------------------------------
# fit: one function per family, on a chunk of rows of one group
# ---------------------------------------------------------------------------------------------


def _per_element(v: np.ndarray, rows: int, nsub: int) -> np.ndarray:
    """Per sub-block values of super-blocks [rows*nsub] -> per element [rows, 256]."""
    return np.repeat(v.reshape(rows, nsub), gb._QK_K // nsub, axis=1)


def _fit_legacy(x: np.ndarray, qtype: str, qw: np.ndarray | None, sigma2: np.ndarray | None) -> BlockGrid:
    lo, hi, zero = _RANGE[qtype]
    rows, width = x.shape
    if qtype == "Q8_0":  # ref: quantize_q8_0 ignores quant_weights
        xs = gb._groups(x, width)
        d, m = gb._fit_q8_0(xs), None
    else:
        xs, w = (gb._groups(x, width), None) if qw is None else gb._row_weights(x, qw, sigma2)
        if zero:
            d, _ = gb._fit_symmetric_32(xs, w, zero)
            m = None
        else:
            d, m, _ = gb._fit_asymmetric_32(xs, w, hi)
    d_bits = gb._fp16(d)
    header = (d_bits,) if m is None else (d_bits, gb._fp16(m))
    step = np.repeat(gb._fp16_value(d_bits)[:, None], width, axis=1)
    # Q4_1/Q5_1: value = d*q + m, i.e. offset -m (a - (-b) is a + b exactly)
    offset = np.zeros_like(step) if m is None else np.repeat(-gb._fp16_value(header[1])[:, None], width, axis=1)
    return BlockGrid(qtype, lo, hi, zero, step, offset, header, gb._inverse_or_zero(d), m)


def _fit_k(x: np.ndarray, qtype: str, qw: np.ndarray | None) -> BlockGrid:
    lo, hi, zero = _RANGE[qtype]
    rows = x.shape[0]
    if qtype == "Q6_K":
        _, search, sc, d = gb._fit_q6_k(x, qw)
        step = _per_element(gb._q6_k_steps(sc, d), rows, 16)  # 16 sub-blocks of 16
        offset = np.zeros_like(step)
        header: tuple[np.ndarray, ...] = (sc, d)
    else:
        _, search, packed, d, dmin = gb._fit_q45_k(x, qw, hi)
        dsub, msub = gb._q45_k_steps(packed, d, dmin)
        step, offset = _per_element(dsub, rows, 8), _per_element(msub, rows, 8)  # 8 sub-blocks of 32
        header = (d, dmin, packed)
    return BlockGrid(qtype, lo, hi, zero, step, offset, header, fallback=gb._levels_aos(search, gb._QK_K))


def _concat(parts: list[BlockGrid]) -> BlockGrid:
    """One grid from grids of consecutive row chunks."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    merged = {}
    for f in fields(BlockGrid):
        v = getattr(first, f.name)
        if isinstance(v, np.ndarray):
            v = np.concatenate([getattr(p, f.name) for p in parts])
        elif isinstance(v, tuple):
            v = tuple(np.concatenate(a) for a in zip(*(p.header for p in parts), strict=True))
        merged[f.name] = v
    return BlockGrid(**merged)


def _check_vector(v: np.ndarray | None, n: int, what: str) -> np.ndarray | None:
    if v is None:
        return None
    a = np.ascontiguousarray(v, dtype=_F32)
    if a.shape != (n,):
        raise ValueError(f"{what} must have shape ({n},), got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} has non-finite values")
    return a


def fit(
    x: np.ndarray,
    qtype: str | GGMLQuantizationType,
    imatrix: np.ndarray | None = None,
    sigma2: np.ndarray | None = None,
) -> BlockGrid:
    """Block parameters of one group ``x [rows, group_width(qtype)]``, as llama.cpp chooses them
    (``imatrix``: the group's columns' importances; ``sigma2``: ``row_sigma2`` of the full rows,
    used by the legacy types' importance weighting only)."""
    name = _type_name(qtype)
    width = group_width(name)
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != width:
        raise ValueError(f"{name} groups are [rows, {width}] matrices, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=_F32)
    if not np.isfinite(x).all():
        raise ValueError(f"row {int(np.argmin(np.isfinite(x).all(axis=1)))} has non-finite values")
    qw = _check_vector(imatrix, width, "imatrix")
    s2 = _check_vector(sigma2, x.shape[0], "sigma2")
    chunk_rows = max(1, gb._CHUNK_ELEMENTS // width)  # row chunks keep the working arrays in cache
    parts = []
    with np.errstate(all="ignore"):  # masked-out lanes divide by zero; results never use them
        for r0 in range(0, max(x.shape[0], 1), chunk_rows):
            chunk = x[r0 : r0 + chunk_rows]
            if name in _K_TYPES:
                parts.append(_fit_k(chunk, name, qw))
            else:
                parts.append(_fit_legacy(chunk, name, qw, None if s2 is None else s2[r0 : r0 + chunk_rows]))
    return _concat(parts)


# ---------------------------------------------------------------------------------------------
# pack
# ---------------------------------------------------------------------------------------------

_PACKERS = {
    "Q8_0": gb._pack_q8_0,
    "Q4_0": gb._pack_q4_0,
    "Q5_0": gb._pack_q5_0,
    "Q4_1": gb._pack_q4_1,
    "Q5_1": gb._pack_q5_1,
    "Q4_K": gb._pack_q4_k,
    "Q5_K": gb._pack_q5_k,
    "Q6_K": gb._pack_q6_k,
}


def _integer_levels(levels: np.ndarray) -> np.ndarray:
    a = np.asarray(levels)
    if a.dtype.kind in "iu":
        return a.astype(np.int32)
    if a.dtype.kind != "f" or not np.isfinite(a).all() or not (a == np.round(a)).all():
        raise ValueError("levels must be integers")
    return a.astype(np.int32)


def pack(grids: list[BlockGrid], levels: np.ndarray) -> np.ndarray:
    """GGUF blocks uint8 ``[rows, bytes_per_row]`` of ``levels [rows, n]`` on ``grids``, one per
    group in column order; the layout of ``gguf_blocks.quantize``'s output."""
    if not grids:
        raise ValueError("pack needs at least one grid")
    first = grids[0]
    if any(g.qtype != first.qtype or g.rows != first.rows for g in grids):
        raise ValueError("all grids must share one type and one row count")
    q = _integer_levels(levels)
    n = first.width * len(grids)
    if q.shape != (first.rows, n):
        raise ValueError(f"levels must have shape ({first.rows}, {n}) for {len(grids)} groups, got {q.shape}")
    if q.size and (q.min() < first.lo or q.max() > first.hi):
        raise ValueError(f"{first.qtype} levels must lie in [{first.lo}, {first.hi}], got [{q.min()}, {q.max()}]")
    if first.rows == 0:
        type_size = GGML_QUANT_SIZES[GGMLQuantizationType[first.qtype]][1]
        return np.zeros((0, len(grids) * type_size), np.uint8)
    # blocks in row-major order: block r*G + g is group g of row r
    header = [
        np.stack(f, axis=1).reshape(first.rows * len(grids), *f[0].shape[1:])
        for f in zip(*(g.header for g in grids), strict=True)
    ]
    return _PACKERS[first.qtype](first.rows, *header, q.reshape(-1, first.width))
