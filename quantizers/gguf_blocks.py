"""GGUF block quantizers in vectorized numpy, bit-faithful to libggml.

``quantize(x, qtype, imatrix)`` returns the bytes libggml's ``ggml_quantize_chunk`` writes for
float32 rows: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, with
or without an importance matrix. Each function re-expresses one routine of ggml-quants.c
(llama.cpp as vendored by llama-cpp-python 0.3.36) over many blocks at once and names it in a
``# ref:`` comment.

Numeric assumptions; they are what makes the output bit-identical:

* All arithmetic is IEEE float32 in the order the C code evaluates it (``w*x[i]*l`` is
  ``(w*x)*l``, ``w*l*x[i]`` is ``(w*l)*x``), with no fused multiply-add. That is how gcc
  compiles libggml-base for x86-64: no ``-ffast-math`` and no FMA in the baseline ISA. A
  build that contracts ``a*b + c`` into an FMA (e.g. aarch64) can differ in the last bit of a
  sum and hence, rarely, in a chosen scale.
* C sums run left to right; numpy's pairwise summation does not, so every sum over a group
  goes through ``_seq_sum``.
* ``nearest_int`` (ggml-quants.c) adds 1.5 * 2**23 in float32 and reads the mantissa: round
  half to even for |v| < 2**22, wrapped garbage beyond. ``_nearest_int`` reproduces the trick
  bit for bit. The hot search loops use the cheaper ``np.rint`` where the argument is below
  2**22: by construction in make_qx_quants, by a per-step bound check in make_qkx*_quants.
* float32 -> fp16 is round-to-nearest-even with subnormals in both numpy's cast and
  ggml_compute_fp32_to_fp16 (ggml-impl.h).
* C's ``(int8_t)f`` / ``(uint8_t)f`` truncate toward zero; ``roundf`` rounds half away from zero.

Layout: the searches work element-major. A group of n values (a 16- or 32-value (sub-)block)
is one column of an [n, N] float32 array, so each per-element step is one numpy operation over
N groups and each sum over a group runs down axis 0, in order. Rows are processed in chunks of
about ``_CHUNK_ELEMENTS`` values, so memory stays bounded whatever the tensor size.

Speed (numpy's per-call cost dominates at these sizes, so the searches are written to issue
few, large, mostly in-place operations): per-group values broadcast against a [4, g/4*N] view
of the same memory (``_Wide``), which numpy runs much faster than g short loops; the searches
keep the (iscale, min) of their best trial and compute its levels once at the end rather than
copying levels at every accepted step; per-group state is merged with a bitwise select
(``_blend``) instead of np.where; np.where never mixes int32 and float32 (that makes a float64
copy). None of this changes an operation's operands or order, so the bytes are the same.

The encoders of Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K are split into a half that
chooses the block parameters (``_fit_*``, with ``_q45_k_steps`` / ``_q6_k_steps`` for the stored
sub-block steps) and one that writes the bytes from parameters and levels (``_pack_*``);
quantizers/gguf_grid.py reuses both to put GPTQ's levels on the same grids.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from gemport.errors import UnsupportedError

__all__ = ["SUPPORTED_TYPES", "quantize"]

_F32 = np.float32
_MAGIC = _F32(12582912.0)  # 1.5 * 2**23, ref: ggml-quants.c nearest_int
_GROUP_MAX_EPS = _F32(1e-15)  # ref: ggml-quants.c GROUP_MAX_EPS
_RINT_SAFE = _F32(4.0e6)  # below 2**22 - 1 with margin: np.rint equals nearest_int under this bound
_FLT_MIN = _F32(2.0**-126)  # smallest normal float32
_QK_K = 256
_CHUNK_ELEMENTS = 1 << 16  # values per chunk: working arrays of 256 KiB stay in L2

_Encoder = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]


# ---------------------------------------------------------------------------------------------
# numeric primitives
# ---------------------------------------------------------------------------------------------


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 strictly left to right in float32, like C's ``for (i) s += a[i]``.

    numpy reduces the outer axis of a C-contiguous 2-D array row by row (pairwise summation only
    runs along the contiguous axis), which is the C order; with a single column it would sum
    pairwise, so that case, and anything not 2-D contiguous, takes the explicit loop.
    tests/test_gguf_blocks.py guards the numpy behaviour.
    """
    if a.ndim == 2 and a.shape[1] >= 2 and a.flags.c_contiguous:
        return np.add.reduce(a, axis=0)
    acc = a[0].copy()
    for row in a[1:]:
        acc += row
    return acc


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ref: ggml-quants.c nearest_int, bit for bit (including its wrap-around beyond 2**22)."""
    t = np.asarray(v, dtype=_F32) + _MAGIC
    return (t.view(np.int32) & 0x007FFFFF) - 0x00400000


def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf: half away from zero (v - trunc(v) is exact in float32)."""
    t = np.trunc(v)
    return t + np.where(np.abs(v - t) >= _F32(0.5), np.sign(v), _F32(0))


def _fp16(v: np.ndarray) -> np.ndarray:
    """float32 -> fp16 bits as little-endian uint16; ref: ggml-impl.h ggml_compute_fp32_to_fp16."""
    return np.asarray(v, dtype=_F32).astype("<f2").view("<u2")


def _fp16_value(bits: np.ndarray) -> np.ndarray:
    """fp16 bits -> float32, i.e. GGML_FP16_TO_FP32 of what was stored."""
    return bits.view("<f2").astype(_F32)


def _inverse_or_zero(d: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f``."""
    return np.where(d != 0, _F32(1) / np.where(d != 0, d, _F32(1)), _F32(0))


def _scan_min(x: np.ndarray) -> np.ndarray:
    """Minimum over axis 0 as C's ``if (x[i] < min) min = x[i]`` finds it: of equal values the
    first wins, which decides the sign when the minimum is +-0.0 (it can reach an fp16 field)."""
    m = x.min(axis=0)
    zero = m == 0
    if zero.any():
        sub = x[:, zero]
        m[zero] = sub[np.argmax(sub == 0, axis=0), np.arange(sub.shape[1])]
    return m


def _signed_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(amax, max): largest |x| over axis 0 and the signed value holding it, first one on ties.

    ref: ggml-quants.c quantize_row_q4_0_ref / make_qx_quants scan with ``amax < fabsf(v)`` from
    amax = max = 0.0f, so an all-zero group keeps max = +0.0 whatever the sign of its zeros.
    The largest and the smallest value decide it, unless they are +a and -a: then the first
    of them wins, found by a scan of those (rare) groups only.
    """
    hi = x.max(axis=0)
    lo = x.min(axis=0)
    neg = -lo
    mx = np.where(neg > hi, lo, hi)
    tie = (hi == neg) & (hi > 0)
    if tie.any():
        sub = x[:, tie]
        mx[tie] = sub[np.argmax(np.abs(sub) == hi[tie], axis=0), np.arange(sub.shape[1])]
    amax = np.abs(mx)
    mx[amax == 0] = 0  # +0.0
    nan = np.isnan(mx)
    if nan.any():  # overflowed inputs (x*x beyond float32): numpy's argmax takes the first NaN
        sub = x[:, nan]
        ax = np.abs(sub)
        idx = ax.argmax(axis=0)
        cols = np.arange(sub.shape[1])
        amax[nan] = ax[idx, cols]
        mx[nan] = np.where(amax[nan] > 0, sub[idx, cols], _F32(0))
    return amax, mx


# ---------------------------------------------------------------------------------------------
# layout helpers
# ---------------------------------------------------------------------------------------------


def _groups(a: np.ndarray, g: int) -> np.ndarray:
    """[rows, n] -> [g, rows*n/g]; column c holds the c-th run of g consecutive values."""
    return np.ascontiguousarray(a.reshape(-1, g).T)


def _tiled_weights(qw: np.ndarray, g: int, rows: int) -> np.ndarray:
    """Per-column importance [n] laid out like ``_groups`` of a [rows, n] chunk."""
    return np.ascontiguousarray(np.tile(qw.reshape(-1, g).T, (1, rows)))


def _superblock_sum_x2(x: np.ndarray) -> np.ndarray:
    """Sequential ``sum x[l]*x[l]`` over each 256-value super-block, one value per super-block."""
    sb = _groups(x, _QK_K)
    return _seq_sum(sb * sb)


def _to_rows(rows: int, *fields: np.ndarray) -> np.ndarray:
    """Concatenate per-block byte fields ([blocks, k] uint8 each) into [rows, bytes_per_row]."""
    blocks = np.concatenate([f.reshape(f.shape[0], -1).view(np.uint8) for f in fields], axis=1)
    return blocks.reshape(rows, -1)


def _levels_aos(levels: np.ndarray, block: int) -> np.ndarray:
    """Element-major levels [g, N] back to one uint8 row per block: [blocks, block]."""
    return np.ascontiguousarray(levels.astype(np.uint8).T).reshape(-1, block)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[N, 32] 4-bit values -> [N, 16]: byte j = q[j] | q[j+16] << 4 (legacy block layout)."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _high_bits32(q: np.ndarray) -> np.ndarray:
    """[N, 32] 5-bit values -> [N, 4] little-endian uint32 of bit 4; ref: quantize_row_q5_0_ref qh."""
    return np.packbits((q >> 4) & 1, axis=1, bitorder="little")


def _crumbs(levels: np.ndarray) -> np.ndarray:
    """[S, 256] 2-bit values -> [S, 64]: byte 32h+l = L[128h+l] | L[+32]<<2 | L[+64]<<4 | L[+96]<<6.

    ref: ggml-quants.c quantize_row_q2_K_ref / q3_K (the qs loop).
    """
    q = levels.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


# ---------------------------------------------------------------------------------------------
# group searches (ref: ggml-quants.c helper functions), element-major [n, N]
# ---------------------------------------------------------------------------------------------


class _Wide:
    """Per-group broadcasting for element-major [g, N] arrays, done on a [4, g/4 * N] view.

    numpy runs ``a [g, N] op v [N]`` as g inner loops of length N; a wide view of the same
    memory with ``v`` repeated g/4 times runs 4 longer loops, which is markedly faster for the
    N (a few thousand) of a chunk. Elementwise results are the same either way.
    """

    def __init__(self, g: int, n: int):
        self.reps = g // 4 if g % 4 == 0 else 1
        self.shape = (g // self.reps, self.reps * n)
        self._tiles = [np.empty((self.reps, n), _F32) for _ in range(4)]

    def view(self, a: np.ndarray) -> np.ndarray:
        """The wide view of a C-contiguous [g, N] array."""
        return a.reshape(self.shape)

    def tile(self, v: np.ndarray, slot: int) -> np.ndarray:
        """Per-group values [N] laid out to broadcast against a wide view (buffer ``slot`` 0-3)."""
        t = self._tiles[slot]
        t[...] = v
        return t.reshape(-1)


def _make_qx_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ref: ggml-quants.c make_qx_quants with rmse_type = 1 and weights ``w`` (x*x when qw is NULL).

    Symmetric levels in [0, 2*nmax) (0 for an all-zero group) and the scale. As in C, only the
    iscale of the best trial is kept; its levels are computed once at the end.
    """
    x = np.ascontiguousarray(x)
    amax, mx = _signed_absmax(x)
    zero = amax < _GROUP_MAX_EPS
    mx = np.where(zero, _F32(1), mx)  # those groups return early in C; keep their arithmetic finite
    wx = w * x
    lo, hi = _F32(-nmax), _F32(nmax - 1)
    lf = np.empty_like(x)
    buf = np.empty_like(x)
    wide = _Wide(*x.shape)
    xv, lv = wide.view(x), wide.view(lf)
    # per-group state, one row each: 0 iscale of the best trial, 1 its scale, 2 its ``best``;
    # ``cand`` holds the same for the step's trial
    state = np.empty((3, x.shape[1]), _F32)
    cand = np.empty_like(state)
    scratch = np.empty(state.shape, np.int32)

    def levels(iscale: np.ndarray) -> np.ndarray:
        # |iscale*x| <= nmax + 0.9 since max is the value of largest magnitude, so np.rint is
        # nearest_int exactly here.
        np.multiply(xv, wide.tile(iscale, 0), out=lv)
        return np.clip(np.rint(lf, out=lf), lo, hi, out=lf)

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # sumlx += (w*x)*l, suml2 += (w*l)*l; the levels are not needed afterwards
        levels(iscale)
        np.multiply(w, lf, out=buf)
        suml2 = _seq_sum(np.multiply(buf, lf, out=buf))
        return _seq_sum(np.multiply(wx, lf, out=lf)), suml2

    np.divide(_F32(-nmax), mx, out=state[0])
    sumlx, suml2 = trial(state[0])
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, _F32(1)), _F32(0))
    state[1] = scale
    state[2] = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        iscale = np.divide(-(_F32(nmax) + _F32(0.1) * _F32(step)), mx, out=cand[0])
        sumlx, suml2 = trial(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > state[2] * suml2)
        if better.any():
            np.divide(sumlx, suml2, out=cand[1])
            np.multiply(cand[1], sumlx, out=cand[2])
            _blend(state, cand, better, scratch)
    out = levels(state[0]).astype(np.int32)
    out += nmax
    out[:, zero] = 0
    scale = state[1].copy()
    scale[zero] = 0
    return out, scale


def _blend(dst: np.ndarray, src: np.ndarray, take: np.ndarray, scratch: np.ndarray) -> None:
    """``dst = where(take, src, dst)`` for float32 [k, N] rows and a per-column mask [N], as a
    bitwise select on the int32 views (bit-exact, and several times faster than np.where)."""
    mask = np.negative(take.view(np.int8), dtype=np.int32)  # 0 or all ones
    d = dst.view(np.int32)
    np.bitwise_xor(d, src.view(np.int32), out=scratch)
    np.bitwise_and(scratch, mask, out=scratch)
    np.bitwise_xor(d, scratch, out=d)


def _asymmetric_levels(
    xv: np.ndarray, iscale_t: np.ndarray, mn_t: np.ndarray, nmax: int, exact: bool, out: np.ndarray
) -> np.ndarray:
    """clamp(nearest_int(iscale*(x - min)), 0, nmax) as float32 into ``out`` (all wide views,
    per-group values tiled; see _Wide).

    With ``exact`` False np.rint stands in for nearest_int, which is only valid while
    |iscale*(x - min)| < 2**22; the caller checks that bound.
    """
    np.subtract(xv, mn_t, out=out)
    out *= iscale_t
    if exact:
        out[...] = _nearest_int(out)
    else:
        np.rint(out, out=out)
    return np.clip(out, _F32(0), _F32(nmax), out=out)


def _rint_reach(xmin: np.ndarray, mn: np.ndarray, span: np.ndarray) -> float:
    """A bound on |x - min| / |max - min| over the groups: times |iscale * (max - min)| it bounds
    the argument of nearest_int in make_qkx2_quants. x - min is monotonic in x, so the ratio is 1
    unless min has moved above the group's smallest value; then it is |xmin - min| / |span|.
    Flat groups (span 0, xmin == min; their min never changes) give NaN, which fmax skips."""
    ratio = np.abs(xmin - mn)
    ratio /= np.abs(span)
    return max(1.0, float(np.fmax.reduce(ratio))) if ratio.size else 1.0


def _make_qkx_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ref: ggml-quants.c make_qkx2_quants / make_qkx3_quants (the same once weights are given:
    qkx3's ``max <= min`` equals qkx2's ``max == min`` because min is clamped to <= 0 <= max
    first). Asymmetric levels in [0, nmax] (float32), the scale and ``the_min`` (= -min >= 0).

    Note the C quirk kept here: after an accepted step, later steps use the new ``min`` both in
    ``iscale = (...)/(max - min)`` and in ``x[i] - min``. The levels of the best trial are not
    copied per step: its (iscale, min) pair is kept and the levels recomputed once at the end,
    which gives the same values.

    np.rint is nearest_int while |iscale*(x - min)| < 2**22. That usually holds, but once a
    fitted min has been accepted, an element with (near) zero weight can lie far outside the new
    [min, max] range, and C then rounds with the trick's wrap-around. The argument is monotonic
    in x, so a bound per group is cheap (``_rint_reach``), and the exact emulation runs only
    when the bound (with the 5 % margin of _RINT_SAFE for float rounding) is exceeded.
    """
    x = np.ascontiguousarray(x)
    wide = _Wide(*x.shape)
    xmin = _scan_min(x)
    mx = x.max(axis=0)
    # per-group state, one row each: 0 iscale and 1 min of the best trial (its levels), 2 its
    # error, 3 its scale, 4 the current min. ``cand`` holds the same for the step's trial.
    state = np.empty((5, x.shape[1]), _F32)
    cand = np.empty_like(state)
    scratch = np.empty(state.shape, np.int32)
    mn = state[4]
    np.copyto(mn, np.where(xmin > 0, _F32(0), xmin))
    flat = mx == mn
    flat_idx = np.flatnonzero(flat)
    mn_flat = mn.copy()
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    fnmax = _F32(nmax)
    trial = np.empty_like(x)
    wl = np.empty_like(x)
    buf = np.empty_like(x)
    xv, tv = wide.view(x), wide.view(trial)

    def error(scale: np.ndarray, mn: np.ndarray) -> np.ndarray:
        # ref: make_qkx2_quants error loops: w * f(scale*L + min - x), f = |.| or square. It
        # overwrites the trial levels, which are not needed any more (see above).
        np.multiply(tv, wide.tile(scale, 2), out=tv)
        np.add(tv, wide.tile(mn, 3), out=tv)
        np.subtract(trial, x, out=trial)
        if use_mad:
            np.abs(trial, out=trial)
        else:
            np.multiply(trial, trial, out=trial)
        return _seq_sum(np.multiply(trial, w, out=trial))

    span = mx - mn
    reach = _rint_reach(xmin, mn, span)
    mn_t = wide.tile(mn, 0)
    np.divide(fnmax, span, out=state[0])
    state[1] = mn
    state[3] = _F32(1) / state[0]
    _asymmetric_levels(xv, wide.tile(state[0], 1), mn_t, nmax, float(fnmax) * reach >= _RINT_SAFE, tv)
    state[2] = error(state[3], mn)
    for step in range(nstep + 1):
        factor = _F32(rmin) + _F32(rdelta) * _F32(step) + fnmax
        iscale = np.divide(factor, span, out=cand[0])
        _asymmetric_levels(xv, wide.tile(iscale, 1), mn_t, nmax, abs(float(factor)) * reach >= _RINT_SAFE, tv)
        np.multiply(w, trial, out=wl)
        sum_l = _seq_sum(wl)
        sum_l2 = _seq_sum(np.multiply(wl, trial, out=buf))
        sum_xl = _seq_sum(np.multiply(wl, x, out=wl))
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = np.divide(sum_w * sum_xl - sum_x * sum_l, det, out=cand[3])
        this_min = np.divide(sum_l2 * sum_x - sum_l * sum_xl, det, out=cand[4])
        clamp = this_min > 0
        np.putmask(this_min, clamp, _F32(0))
        np.putmask(this_scale, clamp, sum_xl / sum_l2)
        cand[2] = error(this_scale, this_min)
        better = (det > 0) & (cand[2] < state[2])
        if better.any():
            cand[1] = mn
            _blend(state, cand, better, scratch)
            span = mx - mn
            reach = _rint_reach(xmin, mn, span)
            mn_t = wide.tile(mn, 0)
    best_iscale, best_mn = state[0], state[1]
    best_reach = np.abs(best_iscale) * np.maximum(np.abs(mx - best_mn), np.abs(xmin - best_mn))
    best_reach[flat_idx] = 0
    exact = bool(np.any(best_reach >= _RINT_SAFE))
    _asymmetric_levels(xv, wide.tile(best_iscale, 1), wide.tile(best_mn, 0), nmax, exact, tv)
    levels = trial
    levels[:, flat] = 0
    scale = np.where(flat, _F32(0), state[3])
    return levels, scale, -np.where(flat, mn_flat, mn)


def _make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ref: ggml-quants.c make_q3_quants with do_rmse = true (weights x*x).

    Levels in [0, 2*nmax) (0 for an all-zero group) and the scale. The coordinate descent visits
    the elements of every group in order; a pass that changes nothing leaves the state as it
    was, so running the remaining passes (as done here for groups that already stopped) is
    the same as C's per-group ``break``.
    """
    amax, mx = _signed_absmax(x)
    zero = amax < _GROUP_MAX_EPS
    mx = np.where(zero, _F32(1), mx)
    levels = np.clip(_nearest_int((_F32(-nmax) / mx) * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    lf = levels.astype(_F32)
    sumlx = _seq_sum(wx * lf)
    suml2 = _seq_sum((w * lf) * lf)
    for _ in range(5):
        changed = False
        for i in range(x.shape[0]):
            li = levels[i].astype(_F32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - (w[i] * li) * li
            new_l = np.clip(_nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1)
            new_f = new_l.astype(_F32)
            slx_new = slx + wx[i] * new_f
            sl2_new = sl2 + (w[i] * new_f) * new_f
            take = (
                (slx > 0)
                & (new_l != levels[i])
                & (sl2_new > 0)
                & ((slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new)
            )
            if take.any():
                changed = True
                levels[i] = np.where(take, new_l, levels[i])
                sumlx = np.where(take, slx_new, sumlx)
                suml2 = np.where(take, sl2_new, suml2)
        if not changed:
            break
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, _F32(1)), _F32(0))
    levels = levels + nmax
    levels[:, zero] = 0
    return levels, np.where(zero, _F32(0), scale)


def _make_qp_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ref: ggml-quants.c make_qp_quants: non-negative levels (stored as uint8, so a negative
    nearest_int wraps, as in C) for the sub-block scales of a super-block, and their scale."""
    mx = np.maximum(x.max(axis=0), _F32(0))
    zero = mx < _GROUP_MAX_EPS
    mx = np.where(zero, _F32(1), mx)
    fnmax = _F32(nmax)
    iscale = fnmax / mx
    stored = (_nearest_int(iscale * x) & 0xFF).astype(_F32)
    scale = _F32(1) / iscale
    diff = x - scale * stored
    best_mse = _seq_sum((w * diff) * diff)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_is = (_F32(0.1) * _F32(step) + fnmax) / mx
        scale_is = _F32(1) / iscale_is
        lf = np.minimum(_nearest_int(iscale_is * x), nmax).astype(_F32)
        diff = x - scale_is * lf
        mse = _seq_sum((w * diff) * diff)
        better = mse < best_mse
        best_mse = np.where(better, mse, best_mse)
        iscale = np.where(better, iscale_is, iscale)
    lvals = np.minimum(_nearest_int(iscale * x), nmax)
    levels = lvals & 0xFF
    wx = w * x
    lf = lvals.astype(_F32)
    sumlx = _seq_sum(wx * lf)
    suml2 = _seq_sum((w * lf) * lf)
    for _ in range(5):
        changed = False
        for i in range(x.shape[0]):
            li = levels[i].astype(_F32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - (w[i] * li) * li
            ok = (slx > 0) & (sl2 > 0)
            new_l = np.minimum(_nearest_int(x[i] * sl2 / slx), nmax)
            new_f = new_l.astype(_F32)
            slx_new = slx + wx[i] * new_f
            sl2_new = sl2 + (w[i] * new_f) * new_f
            take = ok & (new_l != levels[i]) & ((slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new)
            if take.any():
                changed = True
                levels[i] = np.where(take, new_l & 0xFF, levels[i])
                sumlx = np.where(take, slx_new, sumlx)
                suml2 = np.where(take, sl2_new, suml2)
        if not changed:
            break
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, _F32(1)), _F32(0))
    levels[:, zero] = 0
    return levels, np.where(zero, _F32(0), scale)


# ---------------------------------------------------------------------------------------------
# legacy 32-value blocks
# ---------------------------------------------------------------------------------------------


def _row_weights(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of 32 and their weights ``qw[j] * sqrtf(sigma2 + x[j]*x[j])``, sigma2 = mean x^2
    of the whole row (``_row_sigma2``; pass it when ``x`` holds only part of the rows).
    ref: ggml-quants.c quantize_row_q4_0_impl (same in q4_1/q5_0/q5_1)."""
    rows, n = x.shape
    if sigma2 is None:
        sigma2 = _row_sigma2(x)
    xs = _groups(x, 32)
    sigma2 = np.repeat(sigma2, n // 32)
    return xs, _tiled_weights(qw, 32, rows) * np.sqrt(sigma2 + xs * xs)


def _row_sigma2(x: np.ndarray) -> np.ndarray:
    """``sum_x2 / n_per_row`` of each row [rows, n], summed left to right.
    ref: ggml-quants.c quantize_row_q4_0_impl (sigma2)."""
    xt = np.ascontiguousarray(x.T)
    return _seq_sum(xt * xt) / _F32(x.shape[1])


def _fit_symmetric_32(xs: np.ndarray, w: np.ndarray | None, nmax: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Q4_0 (nmax 8) / Q5_0 (nmax 16) block scale d (float32, before the fp16 store) and, with
    weights, the levels of the search (the encoder writes them as they are, no second pass).

    ref: quantize_row_q4_0_ref / q5_0_ref: d = max / -nmax; quantize_row_q4_0_impl / q5_0_impl:
    make_qx_quants(32, nmax, ..., weight).
    """
    if w is None:
        _, mx = _signed_absmax(xs)
        return mx / _F32(-nmax), None
    levels, d = _make_qx_quants(xs, nmax, w)
    return d, levels


def _fit_asymmetric_32(
    xs: np.ndarray, w: np.ndarray | None, nmax: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Q4_1 (nmax 15) / Q5_1 (nmax 31) block scale d and min m (float32, before the fp16 store;
    value = d*q + m) and, with weights, the levels of the search (written as they are).

    ref: quantize_row_q4_1_ref / q5_1_ref: m = min, d = (max - min) / nmax;
    quantize_row_q4_1_impl / q5_1_impl: make_qkx3_quants(32, nmax, ..., -0.9f, 0.05f, 36), m = -the_min.
    """
    if w is None:
        mn, d, _ = _min_max_ref(xs, nmax)
        return d, mn, None
    levels, d, the_min = _make_qkx_quants(xs, w, nmax, -0.9, 0.05, 36, False)
    return d, -the_min, levels


def _pack_q8_0(rows: int, d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """fp16 bits d [B] and int8 levels [B, 32] -> block_q8_0 rows."""
    return _to_rows(rows, d, q.astype(np.int8))


def _pack_q4_0(rows: int, d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """fp16 bits d [B] and levels 0..15 [B, 32] -> block_q4_0 rows."""
    return _to_rows(rows, d, _nibbles(q.astype(np.uint8)))


def _pack_q5_0(rows: int, d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """fp16 bits d [B] and levels 0..31 [B, 32] -> block_q5_0 rows."""
    q = q.astype(np.uint8)
    return _to_rows(rows, d, _high_bits32(q), _nibbles(q))


def _pack_q4_1(rows: int, d: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
    """fp16 bits d, m [B] and levels 0..15 [B, 32] -> block_q4_1 rows."""
    return _to_rows(rows, d, m, _nibbles(q.astype(np.uint8)))


def _pack_q5_1(rows: int, d: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
    """fp16 bits d, m [B] and levels 0..31 [B, 32] -> block_q5_1 rows."""
    q = q.astype(np.uint8)
    return _to_rows(rows, d, m, _high_bits32(q), _nibbles(q))


def _legacy_blocks(x: np.ndarray, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Element-major blocks of 32 and, with an importance vector, their weights."""
    return (_groups(x, 32), None) if qw is None else _row_weights(x, qw)


def _fit_q8_0(xs: np.ndarray) -> np.ndarray:
    """Q8_0 block scale d (float32, before the fp16 store). ref: quantize_row_q8_0_ref: d = amax / 127."""
    return np.abs(xs).max(axis=0) / _F32(127)


def _q8_0(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    # ref: quantize_q8_0 ignores quant_weights and calls quantize_row_q8_0_ref:
    # y.qs[j] = roundf(x[j]*id), id = d ? 1/d : 0, d = amax/127.
    xs = _groups(x, 32)
    d = _fit_q8_0(xs)
    idv = _inverse_or_zero(d)
    if not np.all((d == 0) | (d >= _FLT_MIN)):
        # a subnormal d: 1/d loses precision or overflows, |x*id| is not bounded by 128
        q = _roundf(xs * idv)
        return _pack_q8_0(x.shape[0], _fp16(d), np.ascontiguousarray(q.T).astype(np.int8))
    wide = _Wide(*xs.shape)
    v = wide.view(xs)
    v *= wide.tile(idv, 0)  # xs is this function's own copy
    # roundf for |v| < 2**22 (here |v| <= 127 + a few ulp): with t = trunc(v), v + (v - t) is exact
    # (2v - t, a multiple of v's ulp below 2**23) and truncates to t + (|v - t| >= 0.5 ? sign : 0).
    t = np.trunc(xs)
    np.subtract(xs, t, out=t)
    np.add(xs, t, out=t)
    blocks = np.empty((xs.shape[1], 34), np.uint8)
    blocks[:, :2] = _fp16(d).view(np.uint8).reshape(-1, 2)
    blocks[:, 2:] = t.astype(np.int8).view(np.uint8).T  # float -> int8 truncates, as C's (int8_t)
    return blocks.reshape(x.shape[0], -1)


def _q4_0(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    xs, w = _legacy_blocks(x, qw)
    d, levels = _fit_symmetric_32(xs, w, 8)
    if levels is None:
        # ref: quantize_row_q4_0_ref: q = MIN(15, (int8_t)(x*id + 8.5f)).
        levels = np.minimum(np.trunc(xs * _inverse_or_zero(d) + _F32(8.5)), _F32(15))
    return _pack_q4_0(x.shape[0], _fp16(d), _levels_aos(levels, 32))


def _q5_0(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    xs, w = _legacy_blocks(x, qw)
    d, levels = _fit_symmetric_32(xs, w, 16)
    if levels is None:
        # ref: quantize_row_q5_0_ref: q = MIN(31, (int8_t)(x*id + 16.5f)).
        levels = np.minimum(np.trunc(xs * _inverse_or_zero(d) + _F32(16.5)), _F32(31))
    return _pack_q5_0(x.shape[0], _fp16(d), _levels_aos(levels, 32))


def _min_max_ref(xs: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(min, d, 1/d) of quantize_row_q4_1_ref / q5_1_ref: d = (max - min) / nmax."""
    mn = _scan_min(xs)
    mx = xs.max(axis=0)
    span = np.where(mx == mn, _F32(0), mx - mn)  # C's max - min of one and the same value: +0.0
    d = span / _F32(nmax)
    return mn, d, _inverse_or_zero(d)


def _q4_1(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    xs, w = _legacy_blocks(x, qw)
    d, m, levels = _fit_asymmetric_32(xs, w, 15)
    if levels is None:
        # ref: quantize_row_q4_1_ref: q = MIN(15, (int8_t)((x - min)*id + 0.5f)).
        levels = np.minimum(np.trunc((xs - m) * _inverse_or_zero(d) + _F32(0.5)), _F32(15))
    return _pack_q4_1(x.shape[0], _fp16(d), _fp16(m), _levels_aos(levels, 32))


def _q5_1(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    xs, w = _legacy_blocks(x, qw)
    d, m, levels = _fit_asymmetric_32(xs, w, 31)
    if levels is None:
        # ref: quantize_row_q5_1_ref: q = (uint8_t)((x - min)*id + 0.5f), no clamp.
        levels = np.trunc((xs - m) * _inverse_or_zero(d) + _F32(0.5))
    return _pack_q5_1(x.shape[0], _fp16(d), _fp16(m), _levels_aos(levels, 32))


# ---------------------------------------------------------------------------------------------
# K-quants: 256-value super-blocks
# ---------------------------------------------------------------------------------------------


def _superblock_weights(x: np.ndarray, qw: np.ndarray, g: int, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Sub-blocks of g values and weights ``qw[l] * sqrtf(sigma2 + x[l]*x[l])`` with
    sigma2 = factor * sum(x^2) / 256 over the super-block.

    ref: ggml-quants.c quantize_row_q2_K_impl (factor 1), q3_K/q4_K/q5_K_impl (factor 2).
    """
    sigma2 = (_F32(factor) * _superblock_sum_x2(x)) / _F32(_QK_K)  # 1*s == s exactly
    xs = _groups(x, g)
    sigma2 = np.repeat(sigma2, _QK_K // g)
    return xs, _tiled_weights(qw, g, x.shape[0]) * np.sqrt(sigma2 + xs * xs)


def _per_superblock(v: np.ndarray, nsub: int) -> np.ndarray:
    """[S*nsub] per-sub-block values -> [nsub, S], element-major for the super-block searches."""
    return np.ascontiguousarray(v.reshape(-1, nsub).T)


def _requantize(
    xs: np.ndarray, levels: np.ndarray, d: np.ndarray, offset: np.ndarray | None, lo: int, hi: int, bias: int
) -> np.ndarray:
    """Second pass of every K-quant: with the stored (fp16, integer) scales, levels become
    clamp(nearest_int((x + offset)/d)) + bias; sub-blocks whose d is 0 keep their search levels.

    ``d`` and ``offset`` are per sub-block ([N]); ``offset`` is None for symmetric types.
    Returns int32 levels [g, N].
    """
    wide = _Wide(*xs.shape)
    nonzero = d != 0
    num = np.empty(xs.shape, _F32)
    nv = wide.view(num)
    if offset is None:
        np.copyto(num, xs)
    else:
        np.add(wide.view(xs), wide.tile(offset, 0), out=nv)
    nv /= wide.tile(np.where(nonzero, d, _F32(1)), 1)
    # nearest_int in place (see _nearest_int)
    num += _MAGIC
    q = num.view(np.int32)
    q &= 0x007FFFFF
    q -= 0x00400000
    np.clip(q, lo, hi, out=q)
    q += bias
    if not nonzero.all():
        q[:, ~nonzero] = levels[:, ~nonzero]
    return q


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """[S, 8] 6-bit scales and mins -> the 12-byte K_SCALE_SIZE field (uint8 arithmetic wraps as C
    stores into uint8). ref: ggml-quants.c quantize_row_q4_K_ref."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    out = np.empty((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return out


def _unpack_scale_min_k4(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ref: ggml-quants.c get_scale_min_k4, for all 8 sub-blocks: ([S, 8] scales, [S, 8] mins)."""
    sc = np.empty((q.shape[0], 8), np.uint8)
    m = np.empty_like(sc)
    sc[:, :4] = q[:, 0:4] & 63
    m[:, :4] = q[:, 4:8] & 63
    sc[:, 4:] = (q[:, 8:12] & 0x0F) | ((q[:, 0:4] >> 6) << 4)
    m[:, 4:] = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return sc, m


def _pack_scales_q3(l6: np.ndarray) -> np.ndarray:
    """[S, 16] 6-bit scales (0..63) -> the 12-byte q3_K scales field. ref: quantize_row_q3_K_ref."""
    l6 = l6.astype(np.uint8)
    out = np.empty((l6.shape[0], 12), np.uint8)
    out[:, :8] = (l6[:, :8] & 0x0F) | ((l6[:, 8:] & 0x0F) << 4)
    hi = l6 >> 4
    out[:, 8:] = hi[:, 0:4] | (hi[:, 4:8] << 2) | (hi[:, 8:12] << 4) | (hi[:, 12:16] << 6)
    return out


def _q2_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    if qw is None:
        xs = _groups(x, 16)
        # ref: quantize_row_q2_K_ref: make_qkx2_quants(16, 3, x, |x|, ..., -0.5f, 0.1f, 15, true).
        levels, scales, mins = _make_qkx_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
        sc_bytes, d, dmin = _q2_k_scales_ref(scales.reshape(-1, 16), mins.reshape(-1, 16))
    else:
        # ref: quantize_row_q2_K_impl: make_qkx3_quants(16, 3, ..., -0.9f, 0.05f, 36, false), then
        # make_qp_quants(16, 15, ...) for the scales and for the mins.
        xs, w = _superblock_weights(x, qw, 16, 1.0)
        levels, scales, mins = _make_qkx_quants(xs, w, 3, -0.9, 0.05, 36, False)
        sw = _per_superblock(_seq_sum(w), 16)
        ls, dm = _make_qp_quants(_per_superblock(scales, 16), 15, sw)
        lm, mm = _make_qp_quants(_per_superblock(mins, 16), 15, sw)
        sc_bytes = ((ls.T | (lm.T << 4)) & 0xFF).astype(np.uint8)
        d, dmin = _fp16(dm), _fp16(mm)
    dsub = (_fp16_value(d)[:, None] * (sc_bytes & 0x0F)).reshape(-1)
    msub = (_fp16_value(dmin)[:, None] * (sc_bytes >> 4)).reshape(-1)
    levels = _requantize(xs, levels, dsub, msub, 0, 3, 0)
    return _to_rows(x.shape[0], sc_bytes, _crumbs(_levels_aos(levels, _QK_K)), d, dmin)


def _q2_k_scales_ref(scales: np.ndarray, mins: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ref: quantize_row_q2_K_ref: 4-bit scales and mins against their maxima (q4scale = 15)."""
    max_scale = np.maximum(scales.max(axis=1), _F32(0))
    max_min = np.maximum(mins.max(axis=1), _F32(0))
    has_s, has_m = max_scale > 0, max_min > 0
    fifteen = _F32(15)
    ls = np.where(has_s[:, None], _nearest_int((fifteen / max_scale)[:, None] * scales), 0)
    lm = np.where(has_m[:, None], _nearest_int((fifteen / max_min)[:, None] * mins), 0)
    sc_bytes = ((ls & 0xFF) | (lm << 4)) & 0xFF
    d = np.where(has_s, max_scale / fifteen, _F32(0))
    dmin = np.where(has_m, max_min / fifteen, _F32(0))
    return sc_bytes.astype(np.uint8), _fp16(d), _fp16(dmin)


def _q3_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    if qw is None:
        xs = _groups(x, 16)
        # ref: quantize_row_q3_K_ref: make_q3_quants(16, 4, x, L, true), 6-bit scales against the
        # scale of largest magnitude (iscale = -32/max_scale).
        levels, scales = _make_q3_quants(xs, 4)
        l6, d = _q3_k_scales_ref(scales.reshape(-1, 16))
    else:
        # ref: quantize_row_q3_K_impl: make_qx_quants(16, 4, ..., weight), then
        # make_qx_quants(16, 32, scales, Ls, 1, sw) for the scales.
        xs, w = _superblock_weights(x, qw, 16, 2.0)
        levels, scales = _make_qx_quants(xs, 4, w)
        ls, d_block = _make_qx_quants(_per_superblock(scales, 16), 32, _per_superblock(_seq_sum(w), 16))
        l6, d = np.ascontiguousarray(ls.T), _fp16(d_block)
    dsub = (_fp16_value(d)[:, None] * (l6.astype(np.int32) - 32).astype(_F32)).reshape(-1)
    levels = _requantize(xs, levels, dsub, None, -4, 3, 4)
    q = _levels_aos(levels, _QK_K)
    high = (q > 3).astype(np.uint8).reshape(-1, 8, 32)
    hmask = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
    return _to_rows(x.shape[0], hmask, _crumbs(q & 3), _pack_scales_q3(l6), d)


def _q3_k_scales_ref(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ref: quantize_row_q3_K_ref: ([S, 16] 6-bit scales 0..63, fp16 d); all zero when max_scale is 0."""
    _, max_scale = _signed_absmax(np.ascontiguousarray(scales.T))
    has = max_scale != 0
    iscale = _F32(-32) / np.where(has, max_scale, _F32(1))
    l6 = np.clip(_nearest_int(iscale[:, None] * scales).astype(np.int8), -32, 31).astype(np.int32) + 32
    l6 = np.where(has[:, None], l6, 0)
    # with max_scale == 0 the scales field stays zeroed: sc = -32 and d = 0, so nothing is requantized
    d = _fp16(np.where(has, _F32(1) / iscale, _F32(0)))
    return l6, d


def _fit_q45_k(
    x: np.ndarray, qw: np.ndarray | None, nmax: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Parameters of Q4_K (nmax 15) / Q5_K (nmax 31) super-blocks: (sub-blocks of 32 values
    element-major [32, S*8], search levels of the same layout, packed 6-bit scales/mins [S, 12],
    fp16 bits d [S], fp16 bits dmin [S])."""
    if qw is None:
        xs = _groups(x, 32)
        # ref: quantize_row_q4_K_ref / q5_K_ref: (rmin, rdelta, nstep) = (-1, 0.1, 20) / (-0.5, 0.1, 15)
        ref_search = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
        # ref: quantize_row_q4_K_ref / q5_K_ref: weights av_x + |x| with av_x = sqrtf(sum x^2 / 32),
        # then make_qkx2_quants(32, nmax, x, weights, ..., rmin, rdelta, nstep, false).
        av_x = np.sqrt(_seq_sum(xs * xs) / _F32(32))
        levels, scales, mins = _make_qkx_quants(xs, av_x + np.abs(xs), nmax, *ref_search, False)
        packed, d, dmin = _q45_k_scales_ref(scales.reshape(-1, 8), mins.reshape(-1, 8))
        return xs, levels, packed, d, dmin
    # ref: quantize_row_q4_K_impl / q5_K_impl: make_qkx3_quants(32, nmax, ..., -0.9f, 0.05f, 36),
    # then make_qp_quants(8, 63, ...) for scales and mins; Q5_K clamps them with MIN(63, .).
    xs, w = _superblock_weights(x, qw, 32, 2.0)
    levels, scales, mins = _make_qkx_quants(xs, w, nmax, -0.9, 0.05, 36, False)
    sw = _per_superblock(_seq_sum(w), 8)
    ls, d_block = _make_qp_quants(_per_superblock(scales, 8), 63, sw)
    lm, m_block = _make_qp_quants(_per_superblock(mins, 8), 63, sw)
    if nmax == 31:
        ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    return xs, levels, _pack_scale_min_k4(ls.T, lm.T), _fp16(d_block), _fp16(m_block)


def _q45_k_steps(packed: np.ndarray, d: np.ndarray, dmin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block step d*sc and offset dmin*m as stored ([S*8] float32 each; value = step*q - offset).
    ref: ggml-quants.c quantize_row_q4_K_ref second pass / dequantize_row_q4_K."""
    sc, m = _unpack_scale_min_k4(packed)
    return (_fp16_value(d)[:, None] * sc).reshape(-1), (_fp16_value(dmin)[:, None] * m).reshape(-1)


def _q45_k(x: np.ndarray, qw: np.ndarray | None, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shared body of Q4_K (nmax 15) and Q5_K (nmax 31): (levels [S, 256], packed scales [S, 12],
    d, dmin)."""
    xs, levels, packed, d, dmin = _fit_q45_k(x, qw, nmax)
    dsub, msub = _q45_k_steps(packed, d, dmin)
    levels = _requantize(xs, levels, dsub, msub, 0, nmax, 0)
    return _levels_aos(levels, _QK_K), packed, d, dmin


def _q45_k_scales_ref(scales: np.ndarray, mins: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ref: quantize_row_q4_K_ref: 6-bit scales/mins = MIN(63, (uint8_t)nearest_int(63/max * v))."""
    max_scale = np.maximum(scales.max(axis=1), _F32(0))
    max_min = np.maximum(mins.max(axis=1), _F32(0))
    f63 = _F32(63)
    inv_scale = np.where(max_scale > 0, f63 / np.where(max_scale > 0, max_scale, _F32(1)), _F32(0))
    inv_min = np.where(max_min > 0, f63 / np.where(max_min > 0, max_min, _F32(1)), _F32(0))
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
    return _pack_scale_min_k4(ls, lm), _fp16(max_scale / f63), _fp16(max_min / f63)


def _pack_q4_k(rows: int, d: np.ndarray, dmin: np.ndarray, packed: np.ndarray, q: np.ndarray) -> np.ndarray:
    """fp16 bits d, dmin [S], scales [S, 12] and levels 0..15 [S, 256] -> block_q4_K rows."""
    # ref: quantize_row_q4_K_ref: qs[32c + l] = L[64c + l] | L[64c + l + 32] << 4
    q = q.astype(np.uint8).reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return _to_rows(rows, d, dmin, packed, qs)


def _pack_q5_k(rows: int, d: np.ndarray, dmin: np.ndarray, packed: np.ndarray, q: np.ndarray) -> np.ndarray:
    """fp16 bits d, dmin [S], scales [S, 12] and levels 0..31 [S, 256] -> block_q5_K rows."""
    # ref: quantize_row_q5_K_ref: low nibbles as Q4_K; bit 4 of L[64c + j] / L[64c + j + 32] goes to
    # bit 2c / 2c+1 of qh[j].
    q = q.astype(np.uint8).reshape(-1, 4, 2, 32)
    qs = ((q[:, :, 0] & 0x0F) | ((q[:, :, 1] & 0x0F) << 4)).reshape(-1, 128)
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, :, None, None] + np.arange(2, dtype=np.uint8)[None, None, :, None]
    qh = np.bitwise_or.reduce(((q >> 4) & 1) << shifts, axis=(1, 2))
    return _to_rows(rows, d, dmin, packed, qh, qs)


def _q4_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    q, packed, d, dmin = _q45_k(x, qw, 15)
    return _pack_q4_k(x.shape[0], d, dmin, packed, q)


def _q5_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    q, packed, d, dmin = _q45_k(x, qw, 31)
    return _pack_q5_k(x.shape[0], d, dmin, packed, q)


def _fit_q6_k(x: np.ndarray, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Parameters of Q6_K super-blocks: (sub-blocks of 16 values element-major [16, S*16], search
    levels 0..63 of the same layout, int8 sub-block scales [S, 16], fp16 bits d [S]).

    Super-blocks whose largest sub-block scale is below GROUP_MAX_EPS come back as the encoder
    writes them (ref: quantize_row_q6_K_ref memset): d = 0, scales 0, levels 0.
    """
    xs = _groups(x, 16)
    # ref: quantize_row_q6_K_ref: make_qx_quants(16, 32, x, L, 1, NULL) (weights x*x);
    # quantize_row_q6_K_impl passes the raw quant_weights instead.
    w = xs * xs if qw is None else _tiled_weights(qw, 16, x.shape[0])
    levels, scales = _make_qx_quants(xs, 32, w)
    _, max_scale = _signed_absmax(_per_superblock(scales, 16))
    zero = np.abs(max_scale) < _GROUP_MAX_EPS
    iscale = _F32(-128) / np.where(zero, _F32(1), max_scale)
    d = _fp16(_F32(1) / iscale)
    sc = np.minimum(_nearest_int(iscale[:, None] * scales.reshape(-1, 16)), 127).astype(np.int8)
    if zero.any():
        # ref: quantize_row_q6_K_ref: memset(&y[i], 0, ...) when max_abs_scale < GROUP_MAX_EPS
        d[zero] = 0
        sc[zero] = 0
        levels[:, np.repeat(zero, 16)] = 0
    return xs, levels, sc, d


def _q6_k_steps(sc: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Per sub-block step d*sc as stored ([S*16] float32; value = step*(q - 32))."""
    return (_fp16_value(d)[:, None] * sc.astype(_F32)).reshape(-1)


def _pack_q6_k(rows: int, sc: np.ndarray, d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """int8 scales [S, 16], fp16 bits d [S] and levels 0..63 [S, 256] -> block_q6_K rows."""
    # ref: quantize_row_q6_K_ref packing: per 128-value half h, ql[64h + l] = L[l] | L[l + 64] << 4,
    # ql[64h + l + 32] = L[l + 32] | L[l + 96] << 4, qh[32h + l] = 2-bit high parts of the four.
    q = q.astype(np.uint8).reshape(-1, 2, 4, 32)
    lo = q & 0x0F
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
    hi = q >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return _to_rows(rows, ql.reshape(-1, 128), qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8), d)


def _q6_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    xs, levels, sc, d = _fit_q6_k(x, qw)
    q = _levels_aos(_requantize(xs, levels, _q6_k_steps(sc, d), None, -32, 31, 32), _QK_K)
    return _pack_q6_k(x.shape[0], sc, d, q)


_ENCODERS: dict[GGMLQuantizationType, _Encoder] = {
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q5_0: _q5_0,
    GGMLQuantizationType.Q5_1: _q5_1,
    GGMLQuantizationType.Q2_K: _q2_k,
    GGMLQuantizationType.Q3_K: _q3_k,
    GGMLQuantizationType.Q4_K: _q4_k,
    GGMLQuantizationType.Q5_K: _q5_k,
    GGMLQuantizationType.Q6_K: _q6_k,
}

SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = tuple(_ENCODERS)


# ---------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------


def _importance(imatrix: np.ndarray | None, n_per_row: int) -> np.ndarray | None:
    if imatrix is None:
        return None
    qw = np.ascontiguousarray(imatrix, dtype=_F32)
    if qw.shape != (n_per_row,):
        raise ValueError(f"imatrix must hold one importance per column, shape ({n_per_row},), got {qw.shape}")
    if not np.isfinite(qw).all():
        raise ValueError("imatrix has non-finite values")
    return qw


def _float_chunk(x: np.ndarray, r0: int, rows: int, qtype: GGMLQuantizationType) -> np.ndarray:
    chunk = np.ascontiguousarray(x[r0 : r0 + rows], dtype=_F32)
    finite = np.isfinite(chunk).all(axis=1)
    if not finite.all():
        bad = r0 + int(np.argmin(finite))
        raise ValueError(f"row {bad} has non-finite values; cannot quantize to {qtype.name}")
    return chunk


def quantize(x: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Encode float rows [rows, n_per_row] into GGUF blocks: uint8 [rows, bytes_per_row].

    The bytes are those of ``ggml_quantize_chunk(qtype, x, dst, 0, rows, n_per_row, imatrix)``:
    with ``imatrix`` None the reference routines (quantize_row_*_ref), with a per-column
    importance vector (as llama-imatrix writes it) the importance-weighted ones
    (quantize_row_*_impl); Q8_0 ignores the importance. ``x`` is cast to float32 chunk by chunk.
    n_per_row must be a multiple of the block size (32, or 256 for K-types). Non-finite values
    are refused (ValueError): ggml would encode them into meaningless blocks.
    """
    try:
        qtype = GGMLQuantizationType(qtype)
        encode = _ENCODERS[qtype]
    except (KeyError, ValueError) as exc:
        names = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise UnsupportedError(f"no block quantizer for GGML type {qtype!r}; supported: {names}") from exc
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a [rows, n_per_row] matrix, got shape {x.shape}")
    rows, n_per_row = x.shape
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if n_per_row % block_size:
        raise ValueError(
            f"{qtype.name} needs rows of a multiple of {block_size} values, got {n_per_row} "
            "(llama.cpp falls back to a 32-value block type for such tensors)"
        )
    qw = _importance(imatrix, n_per_row)
    out = np.empty((rows, n_per_row // block_size * type_size), np.uint8)
    step = max(1, _CHUNK_ELEMENTS // max(n_per_row, 1))
    with np.errstate(all="ignore"):  # masked-out lanes divide by zero; results never use them
        for r0 in range(0, rows, step):
            out[r0 : r0 + step] = encode(_float_chunk(x, r0, step, qtype), qw)
    return out


def quantize_bf16(bits: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """``quantize`` of bfloat16 rows given as their bits (uint16 [rows, n_per_row]): bf16 -> float32 is
    exact (the bits are the float32's upper half), so the bytes are those of the float32 rows. Half
    the data of float32 crosses a process boundary."""
    x = (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return quantize(x, qtype, imatrix)
