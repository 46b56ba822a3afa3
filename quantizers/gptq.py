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
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from gemport.checkpoint import Checkpoint, LazyTensor, torch_dtype
from gemport.errors import UnsupportedError
from gemport.progress import progress
from quantizers.calibration import CalibrationConfig, LayerInputs, final_norm, stream_layers
from quantizers.record import SCALE_DTYPES, QuantFormat, QuantizedTensor
from quantizers.rtn import check_bits_and_group, quantize_weight

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
        object.__setattr__(self, "group_size", check_bits_and_group(self.bits, self.group_size))
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
    def fit(cls, x: torch.Tensor, start: int, fmt: QuantFormat) -> MinMaxGrid:
        import torch

        record = quantize_weight(x, replace(fmt, group_size=None))
        zero = record.zero_points
        zero = torch.zeros(x.shape[0], device=x.device) if zero is None else zero[:, 0].to(torch.float32)
        return cls(record.scales[:, 0].to(torch.float32), zero, *fmt.code_range())

    def round(self, column: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        levels = torch.round(torch.clamp(column / self.scale + self.zero, self.qmin, self.qmax))
        return levels, (levels - self.zero) * self.scale


def gptq_weight(
    w: torch.Tensor,
    h: torch.Tensor,
    fit: Callable[[torch.Tensor, int], Grid],
    width: int,
    config: GPTQConfig,
    consume: bool = False,
    out: torch.Tensor | None = None,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, list[Grid]]:
    """GPTQ of ``w [rows, n]`` with Hessian ``h [n, n]`` on groups of ``width`` columns fitted by
    ``fit(columns, first column index)``: (levels [rows, n] int8, values [rows, n] float32, one
    grid per group in column order), columns in natural order.

    With ``consume`` a float32 ``h`` is worked on in place (its contents are then garbage): the only
    n x n matrix in memory, 2.4 GB for a 24576-wide down_proj. ``out`` (float32 [rows, n]; it may
    be ``w`` itself, read before it is written) receives the values instead of a new tensor. Beside
    ``h`` the pass holds one float32 working copy of ``w`` and the int8 levels.

    ``device="cuda"`` runs the whole pass on the Triton kernels' device (quantizers.kernels.device():
    the GPU, or the CPU under TRITON_INTERPRET=1), see ``_gptq_weight_kernels``; it takes min-max
    grids only (``MinMaxGrid.fit``) and returns its results on ``w``'s device.
    """
    import torch

    if device != "cpu":
        kernel_device(device)
        return _gptq_weight_kernels(w, h, fit, width, config, out, consume)
    h = h.to(torch.float32).contiguous() if consume else h.to(torch.float32, copy=True).contiguous()
    with _one_thread():
        return _gptq_weight(w, h, fit, width, config, out)


@contextmanager
def _one_thread():
    """The column loop is thousands of small ops: a second thread only adds hand-off latency
    (measured 4-7x slower with two threads on two cores while another process runs)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _gptq_weight(w, h, fit, width, config, out):
    import torch

    rows, n = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    static = config.act_order or width >= n
    grids: list[Grid | None] = [None] * (n // width)
    if static:
        grids = [fit(_zeroed(w[:, g : g + width], dead[g : g + width]), g) for g in range(0, n, width)]
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if config.act_order else torch.arange(n)
    # the working copy, columns in processing order (indexing copies; the caller's w is not touched)
    work = w[:, perm].to(torch.float32)
    work[:, dead[perm]] = 0
    if config.act_order:
        _permute_symmetric(h.numpy(), perm.numpy())  # h[perm][:, perm], in place
    u = _inverse_cholesky(h, config.damp)
    levels = torch.zeros(rows, n, dtype=torch.int8)
    values = torch.zeros(rows, n) if out is None else out
    block = _block_size(config, static, width)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        err = _quantize_block(work, u, perm, i1, i2, grids, fit, width, static, levels, values)
        work[:, i2:].addmm_(err, u[i1:i2, i2:], alpha=-1)  # in place: no [rows, n] temporary
    return levels, values, grids


def _block_size(config: GPTQConfig, static: bool, width: int) -> int:
    """Columns per lazy block: ``block_size``, or with groups fitted on the fly whole groups."""
    return config.block_size if static else max(config.block_size, width) // width * width


def _quantize_block(work, u, perm, i1, i2, grids, fit, width, static, levels, values):
    """Columns ``[i1, i2)`` of ``work`` (processing order) rounded one by one, each one's error spread
    over the block's later columns; levels and values written at the natural columns (``perm``), the
    grids of groups starting in the block fitted when reached (unless ``static``). Returns the errors
    [rows, i2 - i1]. The CPU reference of the Triton kernel quantizers/kernels/gptq_block.py."""
    import torch

    w1, err = work[:, i1:i2].clone(), torch.zeros(work.shape[0], i2 - i1)
    u1 = u[i1:i2, i1:i2]
    for i in range(i2 - i1):
        col = int(perm[i1 + i])
        if col % width == 0 and not static:
            # blocks hold whole groups: the group's columns as updated so far, all in w1
            grids[col // width] = fit(w1[:, i : i + width], col)
        lv, q = grids[col // width].round(w1[:, i], col % width)
        # written at the natural column: no permuted copy to undo at the end
        levels[:, col], values[:, col] = lv, q
        e = (w1[:, i] - q) / u1[i, i]
        w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
        err[:, i] = e
    return err


DEVICES = ("cpu", "cuda")
MAX_KERNEL_BLOCK = 256  # the kernel holds a [rows, block] tile in registers


def kernel_device(device: str) -> str:
    """The torch device GPTQ runs on for ``device`` ("cpu", or "cuda": the Triton kernels' device, the
    CPU under TRITON_INTERPRET=1); UnsupportedError where the kernels cannot run."""
    if device not in DEVICES:
        raise UnsupportedError(f"GPTQ runs on {' or '.join(DEVICES)}, not {device!r}")
    if device == "cpu":
        return "cpu"
    from quantizers import kernels

    try:
        kernels.check_available()
    except RuntimeError as exc:
        raise UnsupportedError(f"GPTQ on cuda: {exc}") from None
    return kernels.device()


def _gptq_weight_kernels(w, h, fit, width, config, out, consume=False):
    """``_gptq_weight`` on the kernels' device: the same steps, the Hessian's inverse Cholesky factor
    by torch.linalg (``_inverse_cholesky_torch``), each block's columns by the Triton kernel
    (quantizers/kernels/gptq_block.py), the update of the later columns by a (cuBLAS) matmul.
    Grids must be MinMaxGrid (fitted in torch on the device); results on ``w``'s device. With
    ``consume`` a float32 ``h`` already on the device is worked on in place."""
    import torch

    from quantizers import kernels

    dev = kernels.device()
    home = w.device
    rows, n = w.shape
    h = h.to(dev, torch.float32, copy=not consume)
    wd = w.to(dev)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    static = config.act_order or width >= n
    grids: list[Grid | None] = [None] * (n // width)
    if static:
        grids = [fit(_zeroed(wd[:, g : g + width], dead[g : g + width]), g) for g in range(0, n, width)]
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if config.act_order else torch.arange(n)
    perm = perm.to(dev)
    work = wd[:, perm].to(torch.float32).contiguous()
    work[:, dead[perm]] = 0
    del wd
    if config.act_order:
        h = h[perm][:, perm]
    u = _inverse_cholesky_torch(h, config.damp)
    del h
    levels, values = _kernel_blocks(work, u, perm, grids, fit, width, static, _block_size(config, static, width))
    grids = [_grid_on(g, home) for g in grids]
    if out is not None:
        out.copy_(values)
        values = out
    return levels.to(home), values.to(home), grids


def _kernel_blocks(work, u, perm, grids, fit, width, static, block):
    """The block loop of ``_gptq_weight`` with ``_quantize_block`` done by the Triton kernel: ``work``
    (float32 [rows, n], processing order; overwritten) and ``u`` on the kernels' device, ``grids`` the
    static MinMaxGrids (filled in here otherwise). Returns (levels int8, values float32) [rows, n]."""
    import torch

    from quantizers.kernels import gptq_block

    if block > MAX_KERNEL_BLOCK:
        raise UnsupportedError(f"GPTQ on cuda takes lazy blocks of at most {MAX_KERNEL_BLOCK} columns, not {block}")
    rows, n = work.shape
    dev = work.device
    scale = torch.zeros(n // width, rows, device=dev)
    zero = torch.zeros(n // width, rows, device=dev)
    qmin = qmax = None

    def table(g: int, grid: Grid) -> None:
        nonlocal qmin, qmax
        if not isinstance(grid, MinMaxGrid):
            raise UnsupportedError("GPTQ on cuda rounds onto min-max grids only (not GGUF block grids)")
        scale[g], zero[g], qmin, qmax = grid.scale, grid.zero, grid.qmin, grid.qmax

    if static:
        for g, grid in enumerate(grids):
            table(g, grid)
    cols = perm.to(torch.int32).contiguous()
    groups = (perm // width).to(torch.int32).contiguous()
    levels = torch.zeros(rows, n, dtype=torch.int8, device=dev)
    values = torch.zeros(rows, n, device=dev)
    u = u.contiguous()
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        err = torch.empty(rows, i2 - i1, device=dev)
        segments = [(0, i2 - i1)] if static else [(s, s + width) for s in range(0, i2 - i1, width)]
        for start, stop in segments:
            if not static:  # natural order: position i1 + start is column i1 + start, a group's first
                g = (i1 + start) // width
                grids[g] = fit(work[:, i1 + start : i1 + stop], i1 + start)
                table(g, grids[g])
            gptq_block.quantize_columns(
                work, u, scale, zero, groups, cols, levels, values, err, i1, start, stop, qmin, qmax
            )
        work[:, i2:].addmm_(err, u[i1:i2, i2:], alpha=-1)
    return levels, values


def _grid_on(grid: MinMaxGrid, device) -> MinMaxGrid:
    return replace(grid, scale=grid.scale.to(device), zero=grid.zero.to(device))


def _inverse_cholesky_torch(h: torch.Tensor, damp: float) -> torch.Tensor:
    """``_inverse_cholesky`` in torch.linalg on ``h``'s device (a new matrix; ``h`` is not changed):
    with J the index reversal, ``J A J = L L^T`` and ``U = J L^-1 J``, damp raised tenfold while A is
    not positive definite."""
    import torch

    n = h.shape[0]
    diag = torch.diagonal(h).clone()
    mean = diag.double().mean().to(torch.float32)
    eye = torch.eye(n, device=h.device)
    for attempt in range(MAX_DAMP_RETRIES + 1):
        d = damp * 10**attempt
        a = h.flip(0, 1)
        a.diagonal().copy_(diag.flip(0) + torch.tensor(d, dtype=torch.float32) * mean)
        lower, info = torch.linalg.cholesky_ex(a)
        del a
        if int(info) == 0:
            inverse = torch.linalg.solve_triangular(lower, eye, upper=False)
            if bool(torch.isfinite(inverse).all()):
                if attempt:
                    log.warning("GPTQ: Hessian needed damp %.3g to be positive definite", d)
                return inverse.flip(0, 1)
    raise UnsupportedError(f"GPTQ: the Hessian is not positive definite even with damp {d:g}")


def _zeroed(x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """``x`` with its ``dead`` columns zeroed (a copy only where there are any)."""
    if not bool(dead.any()):
        return x
    x = x.clone()
    x[:, dead] = 0
    return x


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` (``U^T U = A^-1``) of ``A = H + damp * mean(diag H) * I``, made in
    ``h``'s own memory (float32 [n, n], contiguous, symmetric; returned as ``U``), raising damp
    tenfold when A is not positive definite.

    With J the index reversal, ``J A J = L L^T`` (lower Cholesky) gives ``A = K K^T`` for the upper
    ``K = J L J``, so ``A^-1 = K^-T K^-1`` and ``U = K^-1 = J L^-1 J``: one factorization and one
    triangular inverse (2/3 n^3 flops, half of inverting A and factoring the inverse), each done by
    LAPACK in place (scipy's spotrf/strtri with overwrite on the Fortran view of the symmetric
    buffer; torch's linalg functions would allocate a new n x n matrix for each result).
    """
    import numpy as np
    from scipy.linalg import lapack

    a = h.numpy()
    n = a.shape[0]
    diag = np.diagonal(a).copy()
    mean = np.float32(diag.mean(dtype=np.float64))
    _reverse(a.reshape(-1))  # J H J
    diag = diag[::-1].copy()
    for attempt in range(MAX_DAMP_RETRIES + 1):
        d = damp * 10**attempt
        a.reshape(-1)[:: n + 1] = diag + np.float32(d) * mean
        # the Fortran view of a is a (symmetric): its upper triangle, a's lower, becomes U0 with
        # J A J = U0^T U0, i.e. a's lower triangle L = U0^T; a's strict upper triangle is untouched
        factor, info = lapack.spotrf(a.T, lower=0, clean=0, overwrite_a=1)
        if info == 0:
            inverse, info = lapack.strtri(factor, lower=0, unitdiag=0, overwrite_c=1)  # a's lower: L^-1
            if info == 0 and np.shares_memory(inverse, a):
                if attempt:
                    log.warning("GPTQ: Hessian needed damp %.3g to be positive definite", d)
                for r in range(n - 1):
                    a[r, r + 1 :] = 0
                _reverse(a.reshape(-1))  # J L^-1 J, upper
                return h
            if info == 0:
                raise RuntimeError("LAPACK did not work in place")  # a scipy build that copies
        for r in range(1, n):  # restore the lower triangle from the untouched upper one
            a[r, :r] = a[:r, r]
    raise UnsupportedError(f"GPTQ: the Hessian is not positive definite even with damp {d:g}")


def _reverse(flat) -> None:
    """Reverse a 1-D numpy array in place, a chunk at a time (``flat[:] = flat[::-1]`` would copy it)."""
    i, j, chunk = 0, flat.size, 1 << 22
    while j - i >= 2:
        k = min(chunk, (j - i) // 2)
        low = flat[i : i + k].copy()
        flat[i : i + k] = flat[j - k : j][::-1]
        flat[j - k : j] = low[::-1]
        i, j = i + k, j - k


def _permute_symmetric(a, perm) -> None:
    """``a[perm][:, perm]`` of a symmetric square numpy array, in place: rows permuted (P A), the
    result transposed (A P^T, A being symmetric), rows permuted again (P A P^T)."""
    _permute_rows(a, perm)
    _transpose(a)
    _permute_rows(a, perm)


def _permute_rows(a, perm) -> None:
    """``a[:] = a[perm]`` in place, cycle by cycle with one spare row."""
    import numpy as np

    done = np.zeros(len(perm), dtype=bool)
    for start in range(len(perm)):
        if done[start] or perm[start] == start:
            continue
        spare, i = a[start].copy(), start
        while True:
            done[i] = True
            j = int(perm[i])
            if j == start:
                a[i] = spare
                break
            a[i] = a[j]
            i = j


def _transpose(a, block: int = 1024) -> None:
    """Transpose a square numpy array in place, block by block."""
    n = a.shape[0]
    for i in range(0, n, block):
        a[i : i + block, i : i + block] = a[i : i + block, i : i + block].T.copy()
        for j in range(i + block, n, block):
            upper = a[i : i + block, j : j + block].copy()
            a[i : i + block, j : j + block] = a[j : j + block, i : i + block].T
            a[j : j + block, i : i + block] = upper.T


def record_from(levels: torch.Tensor, grids: list[MinMaxGrid], fmt: QuantFormat) -> QuantizedTensor:
    """The QuantizedTensor of GPTQ's levels on min-max grids (one grid per group, in order)."""
    import torch

    sdt = torch_dtype(fmt.scale_dtype)
    scales = torch.stack([g.scale for g in grids], dim=1).to(sdt)
    zero = None if fmt.symmetric else torch.stack([g.zero for g in grids], dim=1).to(torch.int8)
    return QuantizedTensor(levels.to(torch.int8), scales, zero, fmt)


# ---------------------------------------------------------------------------------------------
# the layer loop


class _StopForward(Exception):
    pass


def stage_hessian(item: LayerInputs, name: str) -> torch.Tensor:
    """``2 / N * X^T X`` of the inputs of projection ``name`` over all calibration tokens."""
    import torch

    module = item.layer.get_submodule(name)
    n = module.weight.shape[1]
    acc = {"h": torch.zeros(n, n, device=module.weight.device), "tokens": 0}

    def hook(_module, args):
        x = args[0].detach().reshape(-1, n).to(torch.float32)
        acc["h"].addmm_(x.T, x)
        acc["tokens"] += x.shape[0]
        raise _StopForward  # the rest of the layer is not needed for this input

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.inference_mode():
            for h in item.hidden.split(item.batch):
                try:
                    item.layer(h, **item.kwargs)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return acc["h"].mul_(2 / acc["tokens"])  # in place: a second n x n matrix would double the peak


QuantizeOne = Callable[[str, "torch.Tensor", "torch.Tensor"], tuple[Any, "torch.Tensor"]]


def quantize_layer(item: LayerInputs, quantize_one: QuantizeOne) -> dict[str, Any]:
    """Quantize one layer's projections stage by stage, in place: the layer's weights become the
    quantized values. ``quantize_one(proj, w, h) -> (result, values)``, where ``w`` is the layer's own
    float32 weight, which quantize_one may overwrite with the values (and return it); returns the
    results by projection."""
    import torch

    results = {}
    for stage in STAGES:
        h = stage_hessian(item, stage[0])
        for proj in stage:
            weight = item.layer.get_submodule(proj).weight
            # quantize_one works on h in place: the stage's last projection gets it, the others a copy
            mine = h if proj == stage[-1] else h.clone()
            results[proj], values = quantize_one(proj, weight.detach(), mine)
            del mine
            if values.data_ptr() != weight.data_ptr():
                with torch.no_grad():
                    weight.copy_(values)  # the next stages and layers see the quantized weight
        del h
    return results


def quantize(ckpt: Checkpoint, config: GPTQConfig, device: str = "cpu") -> Checkpoint:
    """``ckpt`` with every decoder projection as a GPTQ record (compressed-tensors' grid).

    ``extra["quantization"]`` records the method, the config and every tensor left unquantized.
    ``device="cuda"``: the calibration forward passes, Hessians and GPTQ passes on the GPU (the Triton
    kernels' device; the CPU under TRITON_INTERPRET=1); the records are moved to the CPU.
    """
    kernel_device(device)

    def one(prefix: str, proj: str, w: torch.Tensor, h: torch.Tensor) -> tuple[QuantizedTensor, torch.Tensor]:
        dtype = ckpt.tensors[f"{prefix}{proj}.weight"].dtype
        fmt = config.format_for(dtype)
        width = fmt.group_size or w.shape[1]
        _round_in_place(w, dtype)
        fit = functools.partial(MinMaxGrid.fit, fmt=fmt)
        levels, values, grids = gptq_weight(w, h, fit, width, config, consume=True, out=w, device=device)
        record = record_from(levels.cpu(), [_grid_on(g, "cpu") for g in grids], fmt)
        return record, values  # values == record.dequantize("f32") (tested)

    def attach(t: LazyTensor, record: QuantizedTensor) -> LazyTensor:
        return replace(t, quant=record.format, raw=None, load=functools.partial(_same, record))

    manifest: dict[str, Any] = {"method": "gptq", "config": asdict(config)}
    if device != "cpu":  # where it ran: the Triton kernel on the GPU, or on the CPU through the interpreter
        interpreted = kernel_device(device) == "cpu"
        manifest["device"] = "cuda: Triton gptq_columns" + (" (interpreted on the CPU)" if interpreted else "")
    return run(ckpt, config, one, attach, manifest, device=device)


def quantize_gguf(
    ckpt: Checkpoint, config: GPTQConfig, quant: str, pure: bool = False, device: str = "cpu"
) -> Checkpoint:
    """``ckpt`` with every decoder projection as GPTQ-optimised blocks of the GGML type that
    converters.gguf_writer gives it for whole-file type ``quant`` (e.g. q4_k_m: Q4_K, Q6_K, and the
    32-block fallbacks Q5_0/Q8_0 where rows are not a multiple of 256), fitted with ``diag H / 2``
    (the mean squared input, llama-imatrix's statistic) as the importance. Each such tensor carries
    its blocks as ``raw`` (the writer copies them) and loads as their float values.

    ``config``'s bits, group size, symmetry and scale dtype do not apply: the type decides them.
    Projections of a type without a grid here (F16, ...) are left to the writer. The importance of
    every projection's input, and of the tied LM head's (the final norm's output, which
    llama-imatrix cannot record), is returned by GGUF name in ``extra["gguf.imatrix"]`` for the
    writer to quantize the remaining tensors with (token_embd).

    Only ``device="cpu"``: llama.cpp's block grids (quantizers.gguf_grid) round in numpy, and the GPU
    kernel rounds onto min-max grids (UnsupportedError otherwise).
    """
    import numpy as np
    import torch

    from converters.gguf_writer import tensor_plans
    from quantizers import gguf_grid

    if device != "cpu":
        raise UnsupportedError(
            f"GPTQ to GGUF block types runs on the CPU only (llama.cpp's block grids), not on {device}"
        )
    plans = tensor_plans(ckpt, quant, pure, has_imatrix=True)
    found: dict[str, np.ndarray] = {}

    def one(prefix: str, proj: str, w: torch.Tensor, h: torch.Tensor) -> tuple[Any, torch.Tensor]:
        name = f"{prefix}{proj}.weight"
        qtype = plans[name].qtype
        importance = (torch.diag(h) / 2).numpy()
        found[plans[name].name] = importance
        if qtype not in gguf_grid.GRID_TYPES:
            return None, w
        _round_in_place(w, ckpt.tensors[name].dtype)
        sigma2 = gguf_grid.row_sigma2(w.numpy())

        def fit(x: torch.Tensor, start: int) -> _BlockGrid:
            width = x.shape[1]
            return _BlockGrid(gguf_grid.fit(x.numpy(), qtype, importance[start : start + width], sigma2))

        levels, values, grids = gptq_weight(w, h, fit, gguf_grid.group_width(qtype), config, consume=True, out=w)
        blocks = gguf_grid.pack([g.grid for g in grids], levels.numpy())
        # kept until the writer runs: in the model dtype, not the layer's float32
        return (qtype, blocks, values.to(torch_dtype(ckpt.tensors[name].dtype))), values

    def attach(t: LazyTensor, result: Any) -> LazyTensor:
        if result is None:
            return t
        qtype, blocks, data = result
        return replace(t, raw=(qtype, functools.partial(_same, blocks)), load=functools.partial(_same, data))

    def final(hidden: torch.Tensor) -> None:
        found["token_embd.weight"] = _final_norm_mean_square(ckpt, hidden)

    manifest = {"method": "gptq", "config": asdict(config), "gguf_type": quant}
    out = run(ckpt, config, one, attach, manifest, final=final if ckpt.spec.tie_embeddings else None)
    return replace(out, extra={**out.extra, "gguf.imatrix": found})


def _round_in_place(w: torch.Tensor, dtype: str) -> None:
    """GPTQ works on the weight as stored: ``w`` (float32) rounded to the source dtype, as RTN sees
    it, in its own memory (a layer's float32 weight is about to be overwritten by the values anyway)."""
    target = torch_dtype(dtype)
    if w.dtype != target:
        w.copy_(w.to(target))


def _final_norm_mean_square(ckpt: Checkpoint, hidden: torch.Tensor):
    """Mean over tokens of the squared final-norm output per column: the LM head's input statistic
    (Gemma RMSNorm in float32, ref: transformers ``GemmaRMSNorm.forward``)."""
    import torch

    acc = torch.zeros(hidden.shape[-1], dtype=torch.float64)
    for h in hidden.split(1):
        acc += final_norm(ckpt, h.reshape(-1, h.shape[-1])).double().square().sum(0)
    return (acc / (hidden.shape[0] * hidden.shape[1])).to(torch.float32).numpy()


@dataclass(frozen=True)
class _BlockGrid:
    """quantizers.gguf_grid's numpy grid seen from torch."""

    grid: Any

    def round(self, column: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        levels, values = self.grid.round(column.numpy(), k)
        return torch.from_numpy(levels).to(torch.float32), torch.from_numpy(values)


def run(
    ckpt: Checkpoint,
    config: GPTQConfig,
    one: Callable[[str, str, torch.Tensor, torch.Tensor], tuple[Any, torch.Tensor]],
    attach: Callable[[LazyTensor, Any], LazyTensor],
    manifest: dict[str, Any],
    final: Callable[[torch.Tensor], None] | None = None,
    device: str = "cpu",
) -> Checkpoint:
    """The layer loop shared by the record and GGUF outputs: ``one(prefix, proj, w, h)`` quantizes a
    weight, ``attach(tensor, result)`` makes its LazyTensor; ``final`` gets the last layer's outputs.
    The layers run on ``device``'s torch device (``kernel_device``)."""
    if ckpt.quantized():
        raise UnsupportedError("the checkpoint is already quantized", ckpt.source)
    if "gguf_type" not in manifest:
        _check_shapes(ckpt, config)
    tensors = dict(ckpt.tensors)
    layers = stream_layers(ckpt, config.calibration, quantized_outputs=True, final=final, device=kernel_device(device))
    with progress(f"GPTQ {ckpt.source or 'model'}", ckpt.spec.num_layers, unit="layers") as advance:
        for item in layers:
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
