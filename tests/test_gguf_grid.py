"""quantizers.gguf_grid: llama.cpp's block grids with fixed parameters (fit / round / pack).

What the tests prove, on weights_like matrices (gaussian rows of differing scale with outliers,
all-zero blocks and super-blocks, one huge value, super-blocks whose fp16 scales go subnormal,
one-signed blocks) plus student-t rows:

* Encoder identity: fitting every group of x, rounding every column of x itself and packing
  gives gguf_blocks.quantize's bytes (which tests/test_gguf_blocks.py holds to libggml's) byte
  for byte: every type without an imatrix; with one, the K-types (their encoder re-rounds with
  the stored scales, as ``round`` does) and Q8_0 (which ignores it).
* Q4_0/Q4_1/Q5_0/Q5_1 with an imatrix write the levels of their search (make_qx_quants /
  make_qkx3_quants, fitted to the unrounded scale), so no identity holds for the levels: the
  header bytes (fp16 d, m) are identical, and per element our value is never farther from x
  than the encoder's beyond the gap between the unrounded and the fp16 grid (``_grid_gap``).
* The values ``round`` and ``dequantize`` return equal gguf-py's and libggml's dequantization of
  the packed bytes exactly (tolerance 0; +0 and -0 compare equal), for x's own levels and for
  random levels over the whole range.
* ``round`` picks the nearest level of the stored grid for perturbed columns, values far off
  the range included (brute force over all levels): exactly, up to float32 evaluation, for the
  K-types; up to ``_grid_gap`` for the legacy types, which round like their encoder with the
  unrounded 1/d.
* Where ggml's nearest_int wraps around (|(x + dm)/d| >= 2**22, a zero-importance value far off
  its sub-block), the encoder writes an arbitrary level and ``round`` saturates; that is the only
  difference.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from gemport.errors import UnsupportedError
from quantizers import gguf_blocks
from quantizers.gguf_grid import GRID_TYPES, BlockGrid, fit, group_width, pack, row_sigma2
from tests.test_gguf_blocks import imatrix_like, weights_like

SHAPES = ((64, 256), (24, 512))
K_TYPES = ("Q4_K", "Q5_K", "Q6_K")
SEARCH_LEVEL_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1")  # imatrix encoders write the search's levels
HEADER_BYTES = {"Q4_0": 2, "Q5_0": 2, "Q4_1": 4, "Q5_1": 4}  # fp16 d (and m) open each block


def matrix(seed: int, rows: int, n: int) -> np.ndarray:
    x = weights_like(seed, rows, n)
    rng = np.random.default_rng(seed + 31)
    x[-4:] = rng.standard_t(2, (4, n)).astype(np.float32) * np.float32(0.02)  # heavy-tailed rows
    return x


def encode(x: np.ndarray, qtype: str, qw: np.ndarray | None):
    """(grids, levels, values, bytes) of fit every group / round every column of x / pack."""
    width = group_width(qtype)
    s2 = row_sigma2(x)
    grids = [
        fit(x[:, g : g + width], qtype, None if qw is None else qw[g : g + width], s2)
        for g in range(0, x.shape[1], width)
    ]
    levels = np.empty(x.shape, np.int32)
    values = np.empty(x.shape, np.float32)
    for c in range(x.shape[1]):
        levels[:, c], values[:, c] = grids[c // width].round(x[:, c], c % width)
    return grids, levels, values, pack(grids, levels)


def grid_values(grids: list[BlockGrid], levels: np.ndarray) -> np.ndarray:
    width = grids[0].width
    return np.stack([grids[c // width].dequantize(levels[:, c], c % width) for c in range(levels.shape[1])], axis=1)


def blocks_of(data: np.ndarray, qtype: str) -> np.ndarray:
    return data.reshape(-1, GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][1])


def _fp16_gap(v: np.ndarray) -> np.ndarray:
    """Bound on |fp16(v) - v| given the stored fp16 value: half an ulp, 2**-25 when subnormal."""
    return np.maximum(np.abs(v).astype(np.float64) * 2.0**-11, 2.0**-25)


def _grid_gap(grid: BlockGrid, k: int, levels: np.ndarray) -> np.ndarray:
    """Legacy types round on the grid of the unrounded d (and min); it lies within
    |q - zero| * gap(d) + gap(m) of the stored grid at level q. K-types round on the stored grid."""
    if grid.qtype in K_TYPES:
        return np.zeros(levels.shape)
    gap = np.abs(levels - grid.zero) * _fp16_gap(grid.step[:, k])
    return gap if grid.center is None else gap + _fp16_gap(grid.offset[:, k])


def _float_slack(grid: BlockGrid, k: int, x: np.ndarray) -> np.ndarray:
    """float32 evaluation of the rounding argument and of the values: a few ulps of the range."""
    span = np.abs(grid.step[:, k]).astype(np.float64) * (grid.hi - grid.lo + 1)
    return 2.0**-20 * (span + np.abs(grid.offset[:, k]) + np.abs(x))


# ---------------------------------------------------------------------------------------------
# identity with the encoder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", GRID_TYPES)
def test_fit_round_pack_is_the_encoder_without_imatrix(qtype: str) -> None:
    for seed, (rows, n) in enumerate(SHAPES):
        x = matrix(seed, rows, n)
        *_, data = encode(x, qtype, None)
        assert np.array_equal(data, gguf_blocks.quantize(x, GGMLQuantizationType[qtype])), (qtype, rows, n)


@pytest.mark.parametrize("qtype", ("Q8_0", *K_TYPES))
def test_fit_round_pack_is_the_encoder_with_imatrix(qtype: str) -> None:
    for seed, (rows, n) in enumerate(SHAPES):
        x, qw = matrix(10 + seed, rows, n), imatrix_like(seed, n)
        *_, data = encode(x, qtype, qw)
        assert np.array_equal(data, gguf_blocks.quantize(x, GGMLQuantizationType[qtype], qw)), (qtype, rows, n)


@pytest.mark.parametrize("qtype", SEARCH_LEVEL_TYPES)
def test_imatrix_search_types_share_the_parameters_and_round_no_farther(qtype: str) -> None:
    differing = 0
    for seed, (rows, n) in enumerate(SHAPES):
        x, qw = matrix(20 + seed, rows, n), imatrix_like(seed, n)
        grids, levels, values, data = encode(x, qtype, qw)
        theirs = gguf_blocks.quantize(x, GGMLQuantizationType[qtype], qw)
        h = HEADER_BYTES[qtype]
        assert np.array_equal(blocks_of(data, qtype)[:, :h], blocks_of(theirs, qtype)[:, :h]), qtype
        their_values = dequantize(theirs, GGMLQuantizationType[qtype]).astype(np.float64)
        ours_err = np.abs(x - values.astype(np.float64))
        their_err = np.abs(x - their_values)
        # their level, recovered from their value on our (identical) grid
        gap = np.empty(x.shape)
        for c in range(n):
            g, k = grids[c // 32], c % 32
            live_step = np.where(g.step[:, k] != 0, g.step[:, k], 1)
            their_levels = np.rint((their_values[:, c] + g.offset[:, k]) / live_step) + g.zero
            gap[:, c] = _grid_gap(g, k, levels[:, c]) + _grid_gap(g, k, their_levels) + _float_slack(g, k, x[:, c])
        excess = ours_err - their_err - gap
        assert excess.max() <= 0, f"{qtype}: a level {excess.max():.3g} farther from x than the encoder's"
        differing += int((values != their_values).sum())
    assert differing > 0  # the statement is not an identity in disguise


def test_saturates_where_ggml_nearest_int_wraps_around() -> None:
    """Zero importance on huge values (the rows of test_gguf_blocks' degenerate case): the Q4_K
    search ignores them and their (x + dm)/d can pass 2**22, where ggml's nearest_int returns
    an arbitrary level; ``round`` gives the nearest end level. Nothing else differs."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((8, 512)) * 0.01).astype(np.float32)
    x[:, 40] = [-6.5e3, -3e4, -1e5, 6.5e3, 3e4, 1e5, -2e4, 8e3]
    qw = imatrix_like(0, 512)
    qw[40] = 0
    grids, levels, _, data = encode(x, "Q4_K", qw)
    theirs = gguf_blocks.quantize(x, GGMLQuantizationType.Q4_K, qw)
    g = grids[0]
    t = (x[:, 40].astype(np.float64) + g.offset[:, 40]) / g.step[:, 40]
    wraps = np.abs(t) >= 2**22
    assert np.array_equal(levels[wraps, 40], np.where(t[wraps] > 0, 15, 0))
    ours_b, theirs_b = blocks_of(data, "Q4_K").reshape(8, 2, -1), blocks_of(theirs, "Q4_K").reshape(8, 2, -1)
    assert np.array_equal(ours_b[:, 1], theirs_b[:, 1])  # the second super-block holds no such value
    differs = (ours_b[:, 0] != theirs_b[:, 0]).any(axis=1)
    assert differs.any() and not (differs & ~wraps).any()
    # only column 40's level differs; it is the high nibble of qs[8], block byte 4 + 12 + 8
    # (ref: quantize_row_q4_K_ref: qs[32c + l] = L[64c + l] | L[64c + l + 32] << 4, c = 0, l = 8)
    a, b = ours_b[:, 0].copy(), theirs_b[:, 0].copy()
    a[:, 24] &= 0x0F
    b[:, 24] &= 0x0F
    assert np.array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# the grid is the one llama.cpp reads
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", GRID_TYPES)
def test_values_are_gguf_py_dequantization(qtype: str, with_imatrix: bool) -> None:
    rows, n = SHAPES[1]
    x = matrix(30, rows, n)
    qw = imatrix_like(30, n) if with_imatrix else None
    grids, levels, values, data = encode(x, qtype, qw)
    gtype = GGMLQuantizationType[qtype]
    np.testing.assert_array_equal(values, dequantize(data, gtype))
    rng = np.random.default_rng(5)
    random_levels = rng.integers(grids[0].lo, grids[0].hi + 1, x.shape)
    np.testing.assert_array_equal(grid_values(grids, random_levels), dequantize(pack(grids, random_levels), gtype))


@pytest.fixture(scope="session")
def ggml_dequantize():
    """libggml's dequantize_row_<type>(const void *x, float *y, int64_t k), through ctypes."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (libggml, the oracle) is not installed")
    from tests.ggml_oracle import load_oracle

    lib = ctypes.CDLL(str(load_oracle().path))

    def run(data: np.ndarray, qtype: str) -> np.ndarray:
        fn = getattr(lib, f"dequantize_row_{qtype[0].lower()}{qtype[1:]}")
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
        data = np.ascontiguousarray(data)
        rows = data.shape[0]
        n = data.shape[1] // GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][1] * group_width(qtype)
        out = np.empty((rows, n), np.float32)
        fn(data.ctypes.data, out.ctypes.data, rows * n)
        return out

    return run


@pytest.mark.parametrize("qtype", GRID_TYPES)
def test_values_are_libggml_dequantization(ggml_dequantize, qtype: str) -> None:
    rows, n = SHAPES[1]
    x = matrix(40, rows, n)
    grids, _, _, _ = encode(x, qtype, imatrix_like(40, n))
    random_levels = np.random.default_rng(6).integers(grids[0].lo, grids[0].hi + 1, x.shape)
    np.testing.assert_array_equal(grid_values(grids, random_levels), ggml_dequantize(pack(grids, random_levels), qtype))


@pytest.mark.parametrize("qtype", GRID_TYPES)
def test_round_picks_the_nearest_level(qtype: str) -> None:
    rows, n = 16, group_width(qtype)
    x = matrix(50, rows, 256)[:, :n]
    qw = imatrix_like(50, n)
    rng = np.random.default_rng(7)
    for grid in (fit(x, qtype), fit(x, qtype, qw)):
        all_levels = np.arange(grid.lo, grid.hi + 1)
        for k in rng.choice(n, 12, replace=False):
            # GPTQ's updates: a few steps off, and some values far outside the group's range
            step = np.abs(grid.step[:, k]) + np.float32(1e-3)
            column = x[:, k] + (rng.standard_normal(rows) * 3 * step).astype(np.float32)
            column[:2] *= np.float32(50)
            levels, values = grid.round(column, k)
            assert levels.dtype == np.int32 and values.dtype == np.float32
            assert ((levels >= grid.lo) & (levels <= grid.hi)).all()
            every = np.stack([grid.dequantize(np.full(rows, q), k) for q in all_levels], axis=1)
            err = np.abs(column[:, None].astype(np.float64) - every)
            best = all_levels[err.argmin(axis=1)]
            ours = np.abs(column.astype(np.float64) - values)
            tol = _grid_gap(grid, k, levels) + _grid_gap(grid, k, best) + _float_slack(grid, k, column)
            assert (ours <= err.min(axis=1) + tol).all(), (qtype, int(k))


# ---------------------------------------------------------------------------------------------
# API details
# ---------------------------------------------------------------------------------------------


def test_group_widths() -> None:
    assert [group_width(t) for t in GRID_TYPES] == [32, 32, 32, 32, 32, 256, 256, 256]
    assert group_width(GGMLQuantizationType.Q6_K) == 256


def test_row_chunks_do_not_change_the_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    x = matrix(60, 40, 256)
    qw = imatrix_like(60, 256)
    whole = {t: fit(x[:, : group_width(t)], t, qw[: group_width(t)]) for t in ("Q4_1", "Q4_K", "Q6_K")}
    monkeypatch.setattr(gguf_blocks, "_CHUNK_ELEMENTS", 1000)  # 3 rows (K) or 31 rows (legacy) a chunk
    for qtype, expected in whole.items():
        got = fit(x[:, : group_width(qtype)], qtype, qw[: group_width(qtype)])
        for name in ("step", "offset", "inverse", "center", "fallback"):
            a, b = getattr(got, name), getattr(expected, name)
            assert (a is None and b is None) or np.array_equal(a, b), (qtype, name)
        assert all(np.array_equal(a, b) for a, b in zip(got.header, expected.header, strict=True)), qtype


def test_empty_rows() -> None:
    for qtype in GRID_TYPES:
        width = group_width(qtype)
        grid = fit(np.zeros((0, width), np.float32), qtype)
        expected = gguf_blocks.quantize(np.zeros((0, width), np.float32), GGMLQuantizationType[qtype])
        assert pack([grid], np.zeros((0, width), np.int32)).shape == expected.shape


def test_bad_input() -> None:
    x = np.zeros((4, 32), np.float32)
    with pytest.raises(UnsupportedError, match="Q2_K"):
        fit(x, "Q2_K")
    with pytest.raises(ValueError, match=r"\[rows, 256\]"):
        fit(x, "Q4_K")
    with pytest.raises(ValueError, match="imatrix"):
        fit(x, "Q4_0", np.ones(31, np.float32))
    bad = x.copy()
    bad[2, 3] = np.inf
    with pytest.raises(ValueError, match="row 2"):
        fit(bad, "Q8_0")
    grid = fit(x, "Q4_0")
    with pytest.raises(ValueError, match="column index"):
        grid.round(x[:, 0], 32)
    with pytest.raises(ValueError, match="non-finite"):
        grid.round(bad[:, 3], 3)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack([grid], np.full((4, 32), 16))
    with pytest.raises(ValueError, match="integers"):
        pack([grid], np.full((4, 32), 1.5))
    with pytest.raises(ValueError, match="shape"):
        pack([grid, grid], np.zeros((4, 32), np.int32))
    # float levels holding integers are accepted (GPTQ keeps levels in float tensors)
    assert np.array_equal(pack([grid], np.full((4, 32), 8.0)), pack([grid], np.full((4, 32), 8)))
