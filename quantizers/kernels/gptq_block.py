"""GPTQ's inner step in Triton: the columns of one lazy block rounded on their min-max grids, each
column's error spread over the block's later columns (ref: Frantar et al., "GPTQ", Algorithm 1; the CPU
reference is ``quantizers.gptq._quantize_block``, the inner loop of ``quantizers.gptq._gptq_weight``).

For block columns ``[i1, i2)`` of the working weight ``work [rows, n]`` (columns in processing order)
and the upper inverse-Cholesky factor ``u [n, n]``, ``quantize_columns`` processes the block positions
``[start, stop)`` in order; for position ``i`` (natural column ``cols[i1 + i]``, group
``groups[i1 + i]``) and every row:

    levels = round_half_even(clamp(w[:, i] / scale + zero, qmin, qmax))
    values = (levels - zero) * scale                  -> levels, values [rows, n] at the natural column
    e      = (w[:, i] - values) / u[i, i]             -> err [rows, i2 - i1] at position i
    w[:, j] -= e * u[i, j]   for j in (i, i2)         (the block's later columns, in ``work`` itself)

``scale``/``zero`` are the group's float32 per-row grid (``MinMaxGrid``: the scale as stored, rounded
to the scale dtype; zero 0 when symmetric), taken from ``[groups, rows]`` tables. The grids are fitted
outside the kernel, in torch (``MinMaxGrid.fit`` on the device): all at once before the pass for
static groups (act-order, or one group per row), or at each group's first column from the block's
columns as updated so far (the lazy grouping without act-order), in which case the caller launches
one segment ``[start, stop)`` per group. The update of the columns after the block
(``work[:, i2:] -= err @ u[i1:i2, i2:]``) is a cuBLAS matmul in torch.

Each program owns BR rows (rows are independent in this step): it holds their [BR, block] slice of
``work`` and of ``err`` in registers for the whole segment, reading one row of ``u`` per column.
Every operation is the CPU loop's, element by element, in the same order, with the floating-point
contract of quantizers/kernels/__init__.py (no FMA contraction, div_rn, half-to-even by 1.5 * 2**23):
given the same ``work`` and ``u``, the kernel's levels, values, errors and updated columns are the CPU
loop's bit for bit (tests/test_gptq_kernel.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from quantizers.kernels import FP_OPTIONS, INTERPRET, check_available

MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (v + MAGIC) - MAGIC rounds a float32 |v| < 2**22 half to even
ROWS_PER_PROGRAM = 16  # on a GPU: 2 x 16 x 128 float32 tiles in registers, rows / 16 programs per launch


@triton.jit
def _gptq_columns(
    work_ptr, u_ptr, scale_ptr, zero_ptr, group_ptr, col_ptr, levels_ptr, values_ptr, err_ptr,
    rows, n, i1, width, start, qmin, qmax,
    COLS: tl.constexpr, BB: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    """Program r: rows [r*BR, (r+1)*BR), block positions start .. start + COLS - 1 (block of ``width``
    columns from ``i1``; BB >= width, a power of two)."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = r < rows
    r64 = r.to(tl.int64)
    c = tl.arange(0, BB)
    cmask = c < width
    tile_mask = rmask[:, None] & cmask[None, :]
    w = tl.load(work_ptr + r64[:, None] * n + i1 + c[None, :], mask=tile_mask, other=0.0)
    err = tl.zeros((BR, BB), dtype=tl.float32)
    for p in range(0, COLS):
        i = start + p
        here = c == i
        x = tl.sum(tl.where(here[None, :], w, 0.0), axis=1)  # column i: one value per row, the rest +0
        g = tl.load(group_ptr + i1 + i)
        col = tl.load(col_ptr + i1 + i).to(tl.int64)
        scale = tl.load(scale_ptr + g.to(tl.int64) * rows + r, mask=rmask, other=1.0)
        zero = tl.load(zero_ptr + g.to(tl.int64) * rows + r, mask=rmask, other=0.0)
        v = tl.math.div_rn(x, scale) + zero
        v = tl.minimum(tl.maximum(v, qmin), qmax)
        level = (v + MAGIC) - MAGIC
        q = (level - zero) * scale
        tl.store(levels_ptr + r64 * n + col, level.to(tl.int8), mask=rmask)
        tl.store(values_ptr + r64 * n + col, q, mask=rmask)
        row_u = u_ptr + (i1 + i).to(tl.int64) * n + i1
        d = tl.load(row_u + i)
        e = tl.math.div_rn(x - q, d)
        later = tl.load(row_u + c, mask=(c > i) & cmask, other=0.0)
        w = w - e[:, None] * later[None, :]  # w - e * 0 = w at and before column i
        err = tl.where(here[None, :], e[:, None], err)
    tl.store(work_ptr + r64[:, None] * n + i1 + c[None, :], w, mask=tile_mask)
    seg = (c >= start) & (c < start + COLS)
    tl.store(err_ptr + r64[:, None] * width + c[None, :], err, mask=rmask[:, None] & seg[None, :])


def block_width(width: int) -> int:
    """The register tile's column count for a block of ``width`` columns (a power of two)."""
    return triton.next_power_of_2(width)


def rows_per_program(rows: int) -> int:
    """ROWS_PER_PROGRAM on a GPU; under the interpreter, which runs programs one after another, all rows
    in as few programs as a 256-row tile allows (rows are independent: the results are the same)."""
    if INTERPRET:
        return min(256, triton.next_power_of_2(rows))
    return ROWS_PER_PROGRAM


def quantize_columns(work, u, scale, zero, groups, cols, levels, values, err, i1, start, stop, qmin, qmax) -> None:
    """Positions ``[start, stop)`` of the block ``[i1, i1 + err.shape[1])`` of ``work`` (float32
    [rows, n], updated in place), with ``u`` (float32 [n, n]), grids ``scale``/``zero`` (float32
    [groups, rows]), ``groups``/``cols`` (int32 [n]: group and natural column of each processing
    position); writes ``levels`` (int8 [rows, n]) and ``values`` (float32 [rows, n]) at the natural
    columns and ``err`` (float32 [rows, block]) at the positions. All tensors contiguous, on the
    kernels' device."""
    check_available()
    rows, n = work.shape
    width = err.shape[1]
    br = rows_per_program(rows)
    _gptq_columns[(triton.cdiv(rows, br),)](
        work, u, scale, zero, groups, cols, levels, values, err,
        rows, n, i1, width, start, float(qmin), float(qmax),
        COLS=stop - start, BB=block_width(width), BR=br, **FP_OPTIONS,
    )  # fmt: skip
