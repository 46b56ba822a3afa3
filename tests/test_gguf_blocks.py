"""quantizers.gguf_blocks against libggml's own ggml_quantize_chunk.

Tier 1 (bit-exact, needs llama-cpp-python's libggml-base.so): legacy types byte-identical to
libggml, with and without an importance matrix; K-types byte-identical on >= 99.9 % of
super-blocks and never a larger (weighted) squared error per tensor. Tier 2 (tolerances, no
libggml needed): dequantizing with gguf-py gives back the input within a relative RMS error
per type, and the numeric primitives behave like their C counterparts.

The data look like transformer weights: gaussian rows of differing scale with 0.2 % outliers,
plus all-zero blocks and super-blocks, blocks holding one huge value, super-blocks of tiny
values and one-signed blocks. The importance vectors look like llama-imatrix output: positive,
heavy-tailed, with a few exact zeros.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from gemport.errors import UnsupportedError
from quantizers import gguf_blocks
from quantizers.gguf_blocks import SUPPORTED_TYPES, quantize

Q = GGMLQuantizationType
LEGACY = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
K_TYPES = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
# rows x n_per_row; 640 is Gemma 3 270M's hidden size (not a multiple of 256, so legacy only).
LEGACY_SHAPES = ((512, 256), (256, 640), (128, 1024), (64, 2048))
K_SHAPES = ((1024, 256), (256, 1024), (128, 2048), (64, 1536))  # 3456 super-blocks in all
MIN_IDENTICAL = 0.999
# relative RMS error of dequantize(quantize(x)) on gaussian data; measured values are ~60-75 % of these
MAX_REL_RMS = {
    Q.Q8_0: 0.01,
    Q.Q6_K: 0.03,
    Q.Q5_0: 0.06,
    Q.Q5_1: 0.06,
    Q.Q5_K: 0.06,
    Q.Q4_0: 0.12,
    Q.Q4_1: 0.12,
    Q.Q4_K: 0.12,
    Q.Q3_K: 0.22,
    Q.Q2_K: 0.45,
}


def weights_like(seed: int, rows: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n), dtype=np.float32) * rng.uniform(0.005, 0.05, (rows, 1)).astype(np.float32)
    outliers = rng.random((rows, n)) < 0.002
    x[outliers] *= rng.uniform(10, 50, int(outliers.sum())).astype(np.float32)
    picked = rng.permutation(rows)
    k = max(1, rows // 16)
    for i in picked[:k]:  # an all-zero 32-block
        b = 32 * rng.integers(n // 32)
        x[i, b : b + 32] = 0
    for i in picked[k : 2 * k]:  # one huge value
        x[i, rng.integers(n)] = rng.choice([-1.0, 1.0]) * rng.uniform(1e2, 1e4)
    for i in picked[2 * k : 3 * k]:  # an all-zero super-block
        s = 256 * rng.integers(n // 256)
        x[i, s : s + 256] = 0
    for i in picked[3 * k : 4 * k]:  # a super-block of tiny values (fp16 scales go subnormal)
        s = 256 * rng.integers(n // 256)
        x[i, s : s + 256] *= 1e-6
    for i in picked[4 * k : 5 * k]:  # a one-signed 32-block
        b = 32 * rng.integers(n // 32)
        x[i, b : b + 32] = np.abs(x[i, b : b + 32]) * rng.choice([-1.0, 1.0])
    return x


def imatrix_like(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 7919)
    qw = (rng.gamma(0.5, 2.0, n) ** 2).astype(np.float32)
    qw[rng.random(n) < 0.01] = 0
    return qw


def squared_error(x: np.ndarray, blocks: np.ndarray, qtype: Q, qw: np.ndarray | None) -> float:
    err = (dequantize(blocks, qtype).astype(np.float64) - x) ** 2
    return float((err if qw is None else err * qw).sum())


@pytest.fixture(scope="session")
def ggml():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (libggml, the oracle) is not installed")
    from tests.ggml_oracle import load_oracle

    return load_oracle()


# ---------------------------------------------------------------------------------------------
# tier 1: bit-exact against libggml
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_legacy_types_are_byte_identical_to_libggml(ggml, qtype: Q, with_imatrix: bool) -> None:
    for seed, (rows, n) in enumerate(LEGACY_SHAPES):
        x = weights_like(seed, rows, n)
        qw = imatrix_like(seed, n) if with_imatrix else None
        ours, theirs = quantize(x, qtype, qw), ggml.quantize(x, qtype, qw)
        assert ours.shape == theirs.shape
        type_size = GGML_QUANT_SIZES[qtype][1]
        differing = int((ours.reshape(-1, type_size) != theirs.reshape(-1, type_size)).any(axis=1).sum())
        assert differing == 0, f"{qtype.name} {rows}x{n}: {differing} blocks differ from libggml"


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_k_types_match_libggml(ggml, qtype: Q, with_imatrix: bool) -> None:
    type_size = GGML_QUANT_SIZES[qtype][1]
    identical = total = 0
    for seed, (rows, n) in enumerate(K_SHAPES):
        x = weights_like(100 + seed, rows, n)
        qw = imatrix_like(seed, n) if with_imatrix else None
        ours, theirs = quantize(x, qtype, qw), ggml.quantize(x, qtype, qw)
        assert ours.shape == theirs.shape
        same = (ours.reshape(-1, type_size) == theirs.reshape(-1, type_size)).all(axis=1)
        identical += int(same.sum())
        total += same.size
        sse_ours, sse_ggml = squared_error(x, ours, qtype, qw), squared_error(x, theirs, qtype, qw)
        assert sse_ours <= sse_ggml, f"{qtype.name} {rows}x{n}: squared error {sse_ours:.6g} > libggml's {sse_ggml:.6g}"
    assert identical / total >= MIN_IDENTICAL, f"{qtype.name}: {identical}/{total} super-blocks identical"


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_degenerate_rows_match_libggml(ggml, qtype: Q) -> None:
    """Rows of zeros, of one repeated value, of signed zeros, of values whose fp16 scales
    underflow, and gaussian rows with one huge value, once where the importance is 0 (ggml's
    nearest_int then wraps around beyond 2**22, which must be reproduced)."""
    n = 512
    rng = np.random.default_rng(11)
    rows = np.zeros((14, n), np.float32)
    rows[1] = 0.37
    rows[2] = -0.37
    rows[3, ::2] = -0.0
    rows[4, 5] = 3e4
    rows[5] = np.where(np.arange(n) % 3 == 0, -0.0, 1e-9).astype(np.float32)
    rows[6:] = rng.standard_normal((8, n)) * 0.01
    rows[6:, 40] = [-6.5e3, -3e4, -1e5, 6.5e3, 3e4, 1e5, -2e4, 8e3]
    rows[13, 300] = 8e3
    importance = imatrix_like(0, n)
    importance[40] = 0
    for qw in (None, importance):
        assert np.array_equal(quantize(rows, qtype, qw), ggml.quantize(rows, qtype, qw)), qtype.name


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.Q6_K], ids=lambda t: t.name)
def test_heavy_tailed_matrix_is_byte_identical_to_libggml(ggml, qtype: Q, with_imatrix: bool) -> None:
    """The types of Q4_K_M / Q8_0 conversions on student-t weights with outliers, several chunks:
    every byte as libggml writes it (the searches' fast paths must not change a single choice)."""
    rng = np.random.default_rng(2024)
    x = (rng.standard_t(3, size=(96, 4096)) * 0.02).astype(np.float32)
    x[rng.random(x.shape) < 1e-4] *= 100
    assert x.size >= 4 * gguf_blocks._CHUNK_ELEMENTS  # several chunks
    qw = imatrix_like(9, x.shape[1]) if with_imatrix else None
    assert np.array_equal(quantize(x, qtype, qw), ggml.quantize(x, qtype, qw))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda t: t.name)
def test_extreme_magnitudes_match_libggml(ggml, qtype: Q) -> None:
    """Subnormal scales (1/d overflows or loses precision) and values whose squares overflow to
    inf (NaN sums in the searches) take the slow exact paths, still byte-identical."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((8, 512)) * 0.01).astype(np.float32)
    x[0] *= np.float32(1e-37)
    x[1] *= np.float32(1e-38)
    x[2, :64] = np.float32(3e-45)
    x[3] *= np.float32(3e-41)
    x[4] = np.float32(3.0e38) * np.sign(x[4])
    x[5, ::7] = np.float32(-1e-44)
    x[6] = -0.0
    x[7, 100] = np.float32(1e-30)
    for qw in (None, imatrix_like(3, 512)):
        with np.errstate(all="ignore"):
            assert np.array_equal(quantize(x, qtype, qw), ggml.quantize(x, qtype, qw)), qw is not None


# ---------------------------------------------------------------------------------------------
# tier 2: tolerances and primitives (no libggml needed)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_dequantizes_close_to_input(qtype: Q, with_imatrix: bool) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 1024), dtype=np.float32) * np.float32(0.02)
    qw = imatrix_like(3, 1024) if with_imatrix else None
    blocks = quantize(x, qtype, qw)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    assert blocks.dtype == np.uint8 and blocks.shape == (64, 1024 // block_size * type_size)
    y = dequantize(blocks, qtype)
    rel_rms = float(np.sqrt(np.mean((y - x) ** 2) / np.mean(x**2)))
    assert rel_rms < MAX_REL_RMS[qtype], f"{qtype.name}: relative RMS error {rel_rms:.4f}"


def test_chunking_does_not_change_the_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    x = weights_like(5, 40, 512)
    qw = imatrix_like(5, 512)
    whole = {t: quantize(x, t, qw) for t in (Q.Q4_0, Q.Q4_K)}
    monkeypatch.setattr(gguf_blocks, "_CHUNK_ELEMENTS", 1000)  # one row (and one column of groups) per chunk
    for qtype, expected in whole.items():
        assert np.array_equal(quantize(x, qtype, qw), expected), qtype.name


@pytest.mark.parametrize("columns", [1, 2, 3, 64, 4097])
def test_seq_sum_adds_left_to_right(columns: int) -> None:
    """The bit-exactness rests on sums in C order; numpy's pairwise summation would differ."""
    rng = np.random.default_rng(columns)
    for n in (8, 16, 32, 256, 640):
        a = (rng.standard_normal((n, columns)) * np.exp(rng.standard_normal((n, columns)) * 6)).astype(np.float32)
        expected = a[0].copy()
        for row in a[1:]:
            expected += row
        assert np.array_equal(gguf_blocks._seq_sum(a), expected), (n, columns)


def test_signed_absmax_is_the_c_scan() -> None:
    """ref: make_qx_quants: ``if (amax < fabsf(x[i])) { amax = fabsf(x[i]); max = x[i]; }`` from
    0: the first value of largest magnitude, +0.0 for an all-zero group; with +a/-a ties."""
    rng = np.random.default_rng(4)
    x = np.round(rng.standard_normal((16, 3000)) * 4).astype(np.float32) / np.float32(4)
    x[:, :100] = 0
    x[rng.integers(16, size=50), 100 + np.arange(50)] = -0.0
    for c in range(150, 3000, 3):  # a +a/-a tie at the maximum, in either order
        i, j = rng.choice(16, 2, replace=False)
        x[i, c], x[j, c] = 20.0, -20.0
    amax, mx = gguf_blocks._signed_absmax(x)
    for c in range(x.shape[1]):
        a = m = np.float32(0)
        for v in x[:, c]:
            if a < abs(v):
                a, m = abs(v), v
        assert amax[c] == a and mx[c].tobytes() == np.float32(m).tobytes(), c


def test_blend_is_where_bit_for_bit() -> None:
    """The searches merge their per-group state with _blend; it must keep every bit (NaN
    payloads, -0.0, inf) exactly as np.where would."""
    rng = np.random.default_rng(6)
    bits = rng.integers(-(2**31), 2**31, size=(2, 5, 777), dtype=np.int64).astype(np.int32)
    dst, src = bits.view(np.float32)
    dst[0, :3] = [-0.0, np.inf, np.nan]
    src[0, 3:6] = [-0.0, -np.inf, np.nan]
    take = rng.random(777) < 0.4
    expected = np.where(take, src, dst).view(np.int32)
    gguf_blocks._blend(dst, src, take, np.empty(dst.shape, np.int32))
    assert np.array_equal(dst.view(np.int32), expected)


def test_nearest_int_is_ggml_trick() -> None:
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 2.4999998, 7.0, -3.5, 4194303.0], np.float32)
    assert gguf_blocks._nearest_int(v).tolist() == [0, 2, 2, 0, -2, 2, 7, -4, 4194303]
    # beyond 2**22 the C trick wraps: 5e6 + 1.5*2**23 = 17582912 = 2**24 * (1 + 402848/2**23),
    # so it returns 402848 - 2**22
    assert gguf_blocks._nearest_int(np.array([5e6], np.float32)).tolist() == [402848 - 4194304]


def test_roundf_rounds_half_away_from_zero() -> None:
    v = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -126.5], np.float32)
    assert gguf_blocks._roundf(v).tolist() == [1, 2, 3, -1, -3, 0, -127]


def test_rejects_bad_input() -> None:
    x = np.zeros((2, 512), np.float32)
    with pytest.raises(UnsupportedError, match="IQ2_XXS"):
        quantize(x, Q.IQ2_XXS)
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(np.zeros((2, 640), np.float32), Q.Q4_K)
    with pytest.raises(ValueError, match="rows, n_per_row"):
        quantize(np.zeros(512, np.float32), Q.Q8_0)
    with pytest.raises(ValueError, match="one importance per column"):
        quantize(x, Q.Q4_K, np.ones(256, np.float32))
    bad = x.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="row 1 has non-finite"):
        quantize(bad, Q.Q8_0)


def test_empty_input() -> None:
    assert quantize(np.zeros((0, 256), np.float32), Q.Q6_K).shape == (0, 210)
