"""The GPU check and benchmark of quantizers/kernels (issue 17): one script, bounded in time, on one GPU.

On a CUDA machine (torch with CUDA, triton 3.6):

1. correctness, at Gemma 1 7B widths: group_quant.quantize_weight (int4 g128 sym/asym, int8 per channel)
   equals quantizers/rtn.py's record computed on the CPU bit for bit, and its packing compressed-tensors'
   pack_to_int32; gguf_legacy Q8_0/Q4_0 equal gguf_blocks' bytes; dequant_matmul GEMM (M = 512) and GEMV
   (M = 1) with bf16 and fp16 activations against the dequantized weight multiplied in float32 (max error
   relative to the largest output below 2**-8 bf16, 2**-10 fp16: half an ulp of the output plus
   accumulation order);
2. speed: W4A16 (int4 g128 sym, compressed-tensors' packing) and W8A16 (int8 per channel) ``x @ W.T``
   at the shapes of the q, k/v, o, gate/up and down projections of Gemma 2B, 7B and 27B (gemma-2b,
   gemma-7b, gemma2-27b of converters/presets.py), batch 1, 4, 16, 64, beside
   (a) torch's bf16 matmul on the dequantized weight (cuBLAS: what a stack that dequantizes first gets),
   (b) torch's own int4 path, ``torch._weight_int4pack_mm`` (tinygemm) on the same codes, and its int8
       ``torch._weight_int8pack_mm``, where this torch has them on this device,
   (c) the TensorRT-LLM-layout kernel (quantizers/kernels/trtllm_matmul.py) where it exists;
   each case's error against the float32 product of the dequantized weight, its time (CUDA events, the
   median of ``--reps`` after ``--warmup`` calls, L2 flushed before each), the bytes it moves (weight
   codes, scales and zero points + activations + output) as GB/s and 2*M*N*K as TFLOP/s, each as a
   fraction of the peak (``--peak-gbps``, ``--peak-tflops``; default the H200 SXM's datasheet figures:
   HBM3e 4.8 TB/s, dense bf16 989 TFLOP/s);
3. GPTQ on the GPU (``quantizers.gptq.gptq_weight(..., device="cuda")``) of one Gemma 7B decoder layer
   (q, k, v, o, gate, up, down with one random Hessian per stage; int4 g128 sym, act-order): seconds
   per projection and in all, and on a small weight its Hessian-weighted error against the CPU pass.
   Reported as missing, not a crash, where that API is not there.

    python bench/kernels.py [--out DIR] [--budget-s S]   # on the GPU machine (bench/gpu_check.sh runs it)
    TRITON_INTERPRET=1 python bench/kernels.py --small   # every code path on tiny shapes, on the CPU
    python bench/kernels.py --list                       # the shapes, without running anything

Writes DIR/kernels.json and DIR/kernels.md (default $OUT or build/bench/gpu), rewritten after each part
so a run stopped at its time limit leaves what it measured, and prints the Markdown; exit 1 if any check
fails. Timings start only while ``--budget-s`` seconds have not passed since the start (the rest are
listed as not run). Needs torch and triton; the bit-exact checks also need numpy, gguf and
compressed-tensors (the CPU references): where one is missing, those checks are reported as skipped
and the timings still run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not bench/: its gguf.py would hide the gguf package

from converters.presets import PRESETS  # noqa: E402

# ref: NVIDIA H200 Tensor Core GPU datasheet (SXM): 4.8 TB/s HBM3e; dense BF16 tensor core 989 TFLOP/s
# (1979 with 2:4 sparsity). Measured here (/work/.library/device/KINDS.md): ~4.3 TB/s device copy,
# ~790 TFLOP/s for an 8192^3 bf16 matmul.
PEAK_GBPS = 4800.0
PEAK_TFLOPS = 989.0
MODELS = {"gemma-7b": "gemma-7b", "gemma-2b": "gemma-2b", "gemma-27b": "gemma2-27b"}  # 7B first: the targets
BATCHES = (1, 4, 16, 64)
SMALL_SHAPES = {"tiny": {"q_proj": (96, 256), "down_proj": (64, 384)}}
SMALL_BATCHES = (1, 16)  # one GEMV, one GEMM
CHECK_SHAPES = {"quant": (4096, 3072), "gguf": (512, 3072), "gemm": (512, 24576, 3072), "gemv": (1, 24576, 3072)}
SMALL_CHECK_SHAPES = {"quant": (8, 256), "gguf": (8, 256), "gemm": (20, 96, 256), "gemv": (1, 96, 256)}
GPTQ_LAYER = "gemma-7b"
SMALL_GPTQ = {"q_proj": (16, 256), "down_proj": (16, 384)}
GPTQ_TARGET_S = 2.0
FLUSH_BYTES = 512 << 20  # written before each timed call: several times the H200's 60 MB L2


def projections(preset_name: str) -> dict[str, tuple[int, int]]:
    """[out, in] of each projection of one decoder layer (k and v share a shape: "kv_proj")."""
    p = PRESETS[preset_name]
    q, kv = p.num_heads * p.head_dim, p.num_kv_heads * p.head_dim
    return {
        "q_proj": (q, p.hidden_size),
        "kv_proj": (kv, p.hidden_size),
        "o_proj": (p.hidden_size, q),
        "gate_up_proj": (p.intermediate_size, p.hidden_size),
        "down_proj": (p.hidden_size, p.intermediate_size),
    }


def plan(small: bool) -> tuple[dict[str, dict[str, tuple[int, int]]], tuple[int, ...]]:
    if small:
        return SMALL_SHAPES, SMALL_BATCHES
    return {m: projections(p) for m, p in MODELS.items()}, BATCHES


def gptq_plan(small: bool) -> dict[str, tuple[int, int]]:
    """The projections of one 7B decoder layer, [rows, columns] (k, v, gate, up each their own weight)."""
    if small:
        return SMALL_GPTQ
    s = projections(MODELS[GPTQ_LAYER])
    return {"q_proj": s["q_proj"], "k_proj": s["kv_proj"], "v_proj": s["kv_proj"], "o_proj": s["o_proj"],
            "gate_proj": s["gate_up_proj"], "up_proj": s["gate_up_proj"], "down_proj": s["down_proj"]}  # fmt: skip


def list_plan(small: bool) -> str:
    shapes, batches = plan(small)
    lines = [f"matmul batches (rows of x): {', '.join(map(str, batches))}; weights: W4A16 int4 g128 sym, "
             "W8A16 int8 per channel; peers: torch bf16 matmul, torch._weight_int4pack_mm, "
             "torch._weight_int8pack_mm, the TensorRT-LLM-layout kernel"]  # fmt: skip
    for model, projs in shapes.items():
        for name, (n, k) in projs.items():
            lines.append(f"matmul {model} {name}: N={n} K={k}")
    for name, (rows, cols) in gptq_plan(small).items():
        lines.append(f"gptq {'tiny' if small else GPTQ_LAYER} {name}: rows={rows} columns={cols}")
    checks = SMALL_CHECK_SHAPES if small else CHECK_SHAPES
    lines += [f"check {k}: {list(v)}" for k, v in checks.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# timing


@dataclass
class Timer:
    """Median milliseconds of a call: CUDA events around each call, the L2 flushed before it (on the CPU,
    under the interpreter: wall clock, no flush)."""

    cuda: bool
    reps: int
    warmup: int

    def __post_init__(self) -> None:
        import torch

        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda") if self.cuda else None

    def ms(self, fn) -> float:
        import torch

        for _ in range(self.warmup):
            fn()
        if not self.cuda:
            times = []
            for _ in range(self.reps):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(self.reps)]
        for start, end in pairs:
            self.flush.zero_()  # queued ahead: the GPU is busy with it while the call is launched
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in pairs)


def wall(fn, cuda: bool) -> tuple[object, float]:
    """(result, seconds) of one call, CUDA work synchronised around it."""
    import torch

    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# correctness (bit-exact quantizers, GGUF bytes, matmul tolerances)

FORMATS = {  # name -> QuantFormat arguments
    "int4 g128 sym": (4, 128, True),
    "int4 g128 asym": (4, 128, False),
    "int8 per-channel": (8, None, True),
}


def fmt_of(name: str):
    from quantizers.record import QuantFormat

    bits, group, sym = FORMATS[name]
    return QuantFormat(bits=bits, group_size=group, symmetric=sym, scale_dtype="bf16")


def weight(rows: int, cols: int, seed: int = 0, device: str = "cpu"):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(rows, cols, generator=g, device=device) * 0.02).to(torch.bfloat16)


def missing(*modules: str) -> str | None:
    """Why the checks that need ``modules`` are skipped (the first that does not import), else None."""
    for m in modules:
        try:
            __import__(m)
        except ImportError as exc:
            return f"skipped: {exc} (the CPU reference needs it; bench/gpu_check.sh says how to carry it)"
    return None


def check_quant(shape: tuple[int, int], cuda: bool) -> list[dict]:
    import torch

    from quantizers import rtn
    from quantizers.kernels import group_quant

    why = missing("compressed_tensors")
    w = weight(*shape)
    rows = []
    for name in FORMATS:
        fmt = fmt_of(name)
        got, t_gpu = wall(lambda fmt=fmt: group_quant.quantize_weight(w, fmt), cuda)
        want, t_cpu = wall(lambda fmt=fmt: rtn.quantize_weight(w, fmt), False)
        same = torch.equal(got.codes.cpu(), want.codes) and torch.equal(got.scales.cpu(), want.scales)
        if not fmt.symmetric:
            same = same and torch.equal(got.zero_points.cpu(), want.zero_points)
        rows.append({"check": f"quantize {name} {list(shape)}", "pass": same, "kernel_ms": t_gpu * 1e3,
                     "reference_ms": t_cpu * 1e3})  # fmt: skip
        if why:
            rows.append({"check": f"pack {name} {list(shape)}", "pass": None, "note": why})
            continue
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        ours, t_pack = wall(lambda got=got, b=fmt.bits: group_quant.pack_int32(got.codes, b), cuda)
        same = torch.equal(ours.cpu(), pack_to_int32(want.codes, fmt.bits))
        rows.append({"check": f"pack {name} {list(shape)}", "pass": same, "kernel_ms": t_pack * 1e3})
    return rows


def check_gguf(shape: tuple[int, int], cuda: bool) -> list[dict]:
    why = missing("numpy", "gguf")
    if why:
        return [{"check": f"gguf {t} {list(shape)}", "pass": None, "note": why} for t in ("Q8_0", "Q4_0")]
    import numpy as np

    from quantizers import gguf_blocks
    from quantizers.kernels import gguf_legacy

    x = weight(*shape, seed=1).float()
    rows = []
    for qtype in gguf_legacy.SUPPORTED_TYPES:
        got, t_gpu = wall(lambda q=qtype: gguf_legacy.quantize(x, q), cuda)
        want, t_cpu = wall(lambda q=qtype: gguf_blocks.quantize(x.numpy(), q), False)
        rows.append({"check": f"gguf {qtype.name} {list(shape)}", "pass": bool(np.array_equal(got, want)),
                     "kernel_ms": t_gpu * 1e3, "reference_ms": t_cpu * 1e3})  # fmt: skip
    return rows


def check_matmul(shape: tuple[int, int, int], paths: dict[str, int], cuda: bool, interpret: bool) -> list[dict]:
    """dequant_matmul against the float32 product of the weight dequantized by compressed-tensors' own
    unpacking (dequant_matmul.dequantized), for each format, activation dtype and path (its row count)."""
    why = missing("compressed_tensors")
    if why:
        return [{"check": f"matmul {list(shape)}", "pass": None, "note": why}]
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from quantizers import rtn
    from quantizers.kernels import dequant_matmul, device

    _, n, k = shape
    rows = []
    for name in FORMATS:
        fmt = fmt_of(name)
        rec = rtn.quantize_weight(weight(n, k, seed=2), fmt)
        packed = pack_to_int32(rec.codes, fmt.bits)
        zeros = None if fmt.symmetric else pack_to_int32(rec.zero_points, fmt.bits, packed_dim=0)
        dev = [t.to(device()) if t is not None else None for t in (packed, rec.scales, zeros)]
        for act, bound in ((torch.bfloat16, 2**-8), (torch.float16, 2**-10)):
            if interpret and act == torch.float16:
                continue  # the interpreter truncates float32 -> fp16: checked on the GPU only
            w = dequant_matmul.dequantized(packed, rec.scales, zeros, fmt.bits, act).to(device())
            for path, m in paths.items():
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(3)).to(act).to(device())
                want = x.float() @ w.float().T
                got, t_kernel = wall(lambda x=x, p=path, d=dev, b=fmt.bits: dequant_matmul.matmul(x, *d, b, p), cuda)
                err = float((got.float() - want).abs().max() / want.abs().max())
                rows.append({"check": f"{path} {name} {str(act).removeprefix('torch.')} {[m, n, k]}",
                             "pass": err < bound, "error": err, "kernel_ms": t_kernel * 1e3})  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------
# speed


def bytes_moved(m: int, n: int, k: int, weight_bytes: int) -> int:
    return weight_bytes + m * k * 2 + m * n * 2  # bf16 activations in, bf16 outputs out


def rate(ms: float, nbytes: int, flops: int, peaks: tuple[float, float]) -> dict:
    gbps = nbytes / ms / 1e6
    tflops = flops / ms / 1e9
    return {"gbps": gbps, "bw_frac": gbps / peaks[0], "tflops": tflops, "flop_frac": tflops / peaks[1]}


@dataclass
class Weights:
    """One random bf16 weight [n, k] quantized both ways on the device, in every peer's layout."""

    w4: object  # QuantizedTensor, int4 g128 sym
    packed4: object
    w8: object  # QuantizedTensor, int8 per channel
    packed8: object
    dense4: object  # bf16 dequantized weights
    dense8: object


def make_weights(n: int, k: int, dev: str) -> Weights:
    import torch

    from quantizers.kernels import group_quant

    w = weight(n, k, seed=4, device=dev)
    w4 = group_quant.quantize_weight(w, fmt_of("int4 g128 sym"))
    w8 = group_quant.quantize_weight(w, fmt_of("int8 per-channel"))
    return Weights(w4, group_quant.pack_int32(w4.codes, 4), w8, group_quant.pack_int32(w8.codes, 8),
                   dequantize(w4, torch.bfloat16), dequantize(w8, torch.bfloat16))  # fmt: skip


def dequantize(rec, dtype):
    """``(codes - zero) * scale`` in float32, rounded to ``dtype``: the weight the kernels use."""
    group = rec.codes.shape[1] // rec.scales.shape[1]
    w = rec.codes.float()
    if rec.zero_points is not None:
        w = w - rec.zero_points.float().repeat_interleave(group, dim=1)
    return (w * rec.scales.float().repeat_interleave(group, dim=1)).to(dtype)


def _inner_k_tiles(k: int) -> int | None:
    # ref: aten/src/ATen/native/cuda/int4mm.cu _convert_weight_to_int4pack_cuda: K % (innerKTiles * 16) == 0
    return next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)


def torch_int4(rec, cuda: bool):
    """(callable x -> y, weight bytes) for torch's tinygemm int4 path on the record's codes, or (None, why).
    Its weight is ``(q - 8) * scale + zero`` with q = code + 8 in [0, 15] (ref: pytorch-labs/gpt-fast
    quantize.py group_quantize_tensor / pack_scales_and_zeros), so a symmetric record maps with zero = 0."""
    import torch

    n, k = rec.codes.shape
    group = k // rec.scales.shape[1]
    tiles = _inner_k_tiles(k)
    if tiles is None or group not in (32, 64, 128, 256) or rec.zero_points is not None:
        return None, f"not for K={k}, group {group}"
    q = rec.codes.to(torch.int32) + 8
    zeros = torch.zeros_like(rec.scales)
    sz = torch.stack([rec.scales.T, zeros.T], dim=-1).to(torch.bfloat16).contiguous()  # [K / group, N, 2]
    try:
        if cuda:  # CUDA takes two codes a byte, the even column in the high nibble (ref: gpt-fast quantize.py)
            packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), tiles)
            mm = torch._weight_int4pack_mm
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(q, tiles)
            mm = torch._weight_int4pack_mm_for_cpu
        fn = lambda x: mm(x, packed, group, sz)  # noqa: E731
        fn(torch.zeros(1, k, dtype=torch.bfloat16, device=q.device))
    except (AttributeError, RuntimeError, NotImplementedError) as exc:
        return None, f"unavailable: {str(exc).splitlines()[0][:120]}"
    return fn, n * k // 2 + sz.numel() * 2


def torch_int8(rec):
    """(callable, weight bytes) for torch._weight_int8pack_mm (int8 codes, one scale per row), or (None, why)."""
    import torch

    n, k = rec.codes.shape
    codes, scales = rec.codes.contiguous(), rec.scales[:, 0].to(torch.bfloat16).contiguous()
    try:
        fn = lambda x: torch._weight_int8pack_mm(x, codes, scales)  # noqa: E731
        fn(torch.zeros(1, k, dtype=torch.bfloat16, device=codes.device))
    except (AttributeError, RuntimeError, NotImplementedError) as exc:
        return None, f"unavailable: {str(exc).splitlines()[0][:120]}"
    return fn, n * k + n * 2


def trtllm_w4(rec):
    """(callable, weight bytes) for the TensorRT-LLM-layout W4A16 kernel, or (None, why) where it is not there."""
    try:
        from quantizers.kernels import trtllm_matmul

        stored = trtllm_matmul.stored_weight(rec.codes, 4)
        scales = rec.scales
        fn = lambda x: trtllm_matmul.matmul(x, stored, scales, None, 4)  # noqa: E731
    except (ImportError, AttributeError) as exc:
        return None, f"not there: {exc}"
    return fn, stored.numel() + scales.numel() * 2


def time_shape(model: str, proj: str, n: int, k: int, batches, timer: Timer, peaks, dev: str) -> list[dict]:
    """One row per (batch, implementation): ms, error vs the float32 product of the dequantized weight."""
    import torch

    from quantizers.kernels import dequant_matmul

    ws = make_weights(n, k, dev)
    impls = {
        "W4A16": (lambda x: dequant_matmul.matmul(x, ws.packed4, ws.w4.scales, None, 4),
                  ws.packed4.numel() * 4 + ws.w4.scales.numel() * 2, ws.dense4),
        "W8A16": (lambda x: dequant_matmul.matmul(x, ws.packed8, ws.w8.scales, None, 8),
                  ws.packed8.numel() * 4 + ws.w8.scales.numel() * 2, ws.dense8),
        "bf16": (lambda x: x @ ws.dense4.T, n * k * 2, ws.dense4),
    }  # fmt: skip
    notes = {}
    for name, (fn, nbytes), dense in (
        ("torch int4", torch_int4(ws.w4, timer.cuda), ws.dense4),
        ("torch int8", torch_int8(ws.w8), ws.dense8),
        ("trtllm W4A16", trtllm_w4(ws.w4), ws.dense4),
    ):
        if fn is None:
            notes[name] = nbytes
        else:
            impls[name] = (fn, nbytes, dense)
    rows = []
    for m in batches:
        x = torch.randn(m, k, generator=torch.Generator(device=dev).manual_seed(m), device=dev).to(torch.bfloat16)
        base = {"model": model, "proj": proj, "N": n, "K": k, "M": m}
        wants = {id(d): x.float() @ d.float().T for d in (ws.dense4, ws.dense8)}
        for name, (fn, wbytes, dense) in impls.items():
            want = wants[id(dense)]
            err = float((fn(x).float() - want).abs().max() / want.abs().max())
            ms = timer.ms(lambda fn=fn, x=x: fn(x))
            row = base | {"impl": name, "ms": ms, "error": err}
            row |= rate(ms, bytes_moved(m, n, k, wbytes), 2 * m * n * k, peaks)
            if name in ("W4A16", "W8A16"):
                row["path"] = "gemv" if m < dequant_matmul.GEMV_MAX_ROWS else "gemm"
            rows.append(row)
        rows += [base | {"impl": name, "note": why} for name, why in notes.items()]
    return rows


ERROR_BOUND = {"bf16": 2**-8, "W4A16": 2**-8, "W8A16": 2**-8, "trtllm W4A16": 2**-8, "torch int4": 2**-7,
               "torch int8": 2**-7}  # fmt: skip


def timing_checks(rows: list[dict]) -> list[dict]:
    """One check per implementation: its largest error over every timed case below its bound (the output
    rounded to bf16: 2**-9 relative to the largest output, plus accumulation order; tinygemm rounds its
    dequantized weight and partial sums in bf16, hence 2**-7)."""
    out = []
    for impl, bound in ERROR_BOUND.items():
        errs = [r["error"] for r in rows if r.get("impl") == impl and "error" in r]
        if errs:
            out.append({"check": f"timed cases: {impl} error vs float32 ({len(errs)} cases)",
                        "pass": max(errs) < bound, "error": max(errs)})  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# GPTQ


def gptq_api():
    """(quantizers.gptq, None) if its gptq_weight takes ``device`` (GPTQ on the GPU), else (None, why)."""
    import inspect

    try:
        from quantizers import gptq
    except ImportError as exc:
        return None, f"missing: quantizers.gptq does not import ({exc})"
    if "device" not in inspect.signature(gptq.gptq_weight).parameters:
        return None, "missing: quantizers.gptq.gptq_weight has no device parameter (GPTQ on the GPU not built yet)"
    return gptq, None


def hessian(n: int, dev: str, seed: int):
    """2/T X^T X of T random tokens whose columns have log-normal scales (so act-order matters)."""
    import torch

    g = torch.Generator(device=dev).manual_seed(seed)
    tokens = min(2048, 4 * n)
    x = torch.randn(tokens, n, generator=g, device=dev) * torch.randn(n, generator=g, device=dev).exp()
    return (x.T @ x) * (2 / tokens)


def gptq_one(gptq, w, h, device: str):
    """GPTQ int4 g128 sym, act-order, min-max grids, through the agreed API."""
    config = gptq.GPTQConfig(bits=4, group_size=128, symmetric=True, act_order=True)
    fmt = config.format_for("bf16")
    fit = lambda x, start: gptq.MinMaxGrid.fit(x, start, fmt)  # noqa: E731
    return gptq.gptq_weight(w, h, fit, 128, config, device=device)


def proxy_loss(w, values, h) -> float:
    """tr((W - Q) H (W - Q)^T): the error GPTQ minimises."""
    d = w.float() - values.float().to(w.device)
    return float(((d @ h) * d).sum())


def run_gptq(small: bool, cuda: bool, dev: str) -> list[dict]:
    """GPTQ of the projections of one decoder layer on the GPU, and the GPU pass against the CPU one on a
    small weight. Projections of one stage share its Hessian, as in the layer loop."""
    gptq, why = gptq_api()
    if gptq is None:
        return [{"check": "gptq", "pass": None, "note": why}]
    rows = []
    rows_, cols_ = (16, 256) if small else (64, 256)
    w, h = weight(rows_, cols_, seed=5).float(), hessian(cols_, "cpu", 5)
    (_, cpu_values, _), _ = wall(lambda: gptq_one(gptq, w, h, "cpu"), False)
    (levels, values, _), t_first = wall(lambda: gptq_one(gptq, w.to(dev), h.to(dev), "cuda"), cuda)
    cpu_loss, gpu_loss = proxy_loss(w, cpu_values, h), proxy_loss(w, values.cpu(), h)
    rows.append({"check": f"gptq cuda vs cpu {[rows_, cols_]}: Hessian-weighted error within 5 %",
                 "pass": gpu_loss <= cpu_loss * 1.05 and int(levels.abs().max()) <= 8,
                 "error": gpu_loss / cpu_loss - 1, "kernel_ms": t_first * 1e3})  # fmt: skip
    hessians = {}
    total = 0.0
    for name, (r, c) in gptq_plan(small).items():
        if c not in hessians:
            hessians.clear()  # one stage's Hessian at a time
            hessians[c] = hessian(c, dev, c)
        w = weight(r, c, seed=r + c, device=dev)
        _, secs = wall(lambda w=w, h=hessians[c]: gptq_one(gptq, w, h, "cuda"), cuda)
        total += secs
        rows.append({"gptq": name, "rows": r, "columns": c, "s": secs})
    if small:
        rows.append({"gptq": "tiny layer", "s": total})
    else:
        rows.append({"gptq": f"{GPTQ_LAYER} layer (7 projections)", "s": total, "target_s": GPTQ_TARGET_S})
    return rows


# ---------------------------------------------------------------------------------------------
# report


def num(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    info, checks, timings, gptq = result["info"], result["checks"], result["timings"], result["gptq"]
    out = [f"Device: {info['device']}; torch {info['torch']}, triton {info['triton']}; "
           f"peaks used: {info['peak_gbps']:.0f} GB/s, {info['peak_tflops']:.0f} TFLOP/s dense bf16 "
           f"({info['peak_source']}); median of {info['reps']} after {info['warmup']} warm-up calls; "
           f"{info.get('wall_s', 0):.0f} s.", ""]  # fmt: skip
    out += ["| check | pass | error | kernel ms | reference ms | note |", "|---|---|---:|---:|---:|---|"]
    for r in checks:
        out.append(f"| {r['check']} | {r['pass']} | {num(r.get('error'), '.2e')} | {num(r.get('kernel_ms'), '.2f')} "
                   f"| {num(r.get('reference_ms'), '.2f')} | {r.get('note', '')} |")  # fmt: skip
    out += ["", *timing_table(timings), "", *target_lines(timings, gptq), ""]
    out += ["| GPTQ | rows | columns | s |", "|---|---:|---:|---:|"]
    for r in gptq:
        if "gptq" in r:
            out.append(f"| {r['gptq']} | {r.get('rows', '')} | {r.get('columns', '')} | {r['s']:.2f} |")
        else:
            out.append(f"| {r.get('note', '')} | | | |")
    return "\n".join(out) + "\n"


IMPLS = ("W4A16", "torch int4", "trtllm W4A16", "W8A16", "torch int8", "bf16")


def timing_table(timings: list[dict]) -> list[str]:
    head = ["model", "proj", "N x K", "M"]
    for i in IMPLS:
        head += ["bf16 us", "bf16 TFLOP/s (% peak)"] if i == "bf16" else [f"{i} us", f"{i} GB/s (% peak)"]
        if i == "W4A16":
            head.append("W4A16 TFLOP/s (% peak)")
    head.append("W4A16 vs bf16")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (len(head) - 4)]
    cases: dict[tuple, dict[str, dict]] = {}
    for r in timings:
        cases.setdefault((r["model"], r["proj"], r["N"], r["K"], r["M"]), {})[r["impl"]] = r
    for (model, proj, n, k, m), by in cases.items():
        cells = [model, proj, f"{n} x {k}"]
        if "all" in by:  # not run
            lines.append("| " + " | ".join(cells + [by["all"]["note"]] + [""] * (len(head) - 4)) + " |")
            continue
        cells.append(str(m))
        for i in IMPLS:
            r = by.get(i, {})
            if "ms" not in r:
                cells += [r.get("note", "-")[:40], ""] + ([""] if i == "W4A16" else [])
                continue
            cells.append(f"{r['ms'] * 1e3:.1f}")
            if i == "bf16":
                cells.append(f"{r['tflops']:.1f} ({r['flop_frac']:.1%})")
            else:
                cells.append(f"{r['gbps']:.0f} ({r['bw_frac']:.0%})")
            if i == "W4A16":
                cells.append(f"{r['tflops']:.1f} ({r['flop_frac']:.1%})")
        w4, bf = by.get("W4A16", {}), by.get("bf16", {})
        cells.append(f"{bf['ms'] / w4['ms']:.2f}x" if "ms" in w4 and "ms" in bf else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def target_lines(timings: list[dict], gptq: list[dict]) -> list[str]:
    """The issue's targets (not CI gates), read off the measurements."""
    timed = [r for r in timings if r["model"] == "gemma-7b" and "ms" in r]
    gemv = [r for r in timed if r["impl"] == "W4A16" and r["M"] == 1]
    lines = ["Targets (issue 17; not gates):", ""]
    if gemv:
        worst, best = min(gemv, key=lambda r: r["bw_frac"]), max(r["bw_frac"] for r in gemv)
        lines.append(f"- W4A16 GEMV, batch 1, 7B shapes, at least 70 % of peak bandwidth: lowest "
                     f"{worst['bw_frac']:.0%} ({worst['proj']}), highest {best:.0%}")  # fmt: skip
    else:
        lines.append("- W4A16 GEMV, batch 1, 7B shapes, at least 70 % of peak bandwidth: not measured")
    dense = {r["proj"]: r["ms"] for r in timed if r["impl"] == "bf16" and r["M"] == 16}
    pairs = [f"{r['proj']} {dense[r['proj']] / r['ms']:.2f}x" for r in timed
             if r["impl"] == "W4A16" and r["M"] == 16 and r["proj"] in dense]  # fmt: skip
    lines.append(f"- W4A16 GEMM, batch 16, faster than torch bf16 (7B; bf16 time / W4A16 time): "
                 f"{', '.join(pairs) or 'not measured'}")  # fmt: skip
    layer = next((r for r in gptq if "target_s" in r), None)
    got = f"{layer['s']:.2f} s" if layer else "not measured"
    lines.append(f"- GPTQ of a 7B-shaped layer under {GPTQ_TARGET_S:.0f} s: {got}")
    return lines


def guarded(part: str, fn, *args) -> list[dict]:
    """``fn(*args)``'s rows, or one failed check naming the exception: one broken part (a kernel that does not
    compile for some K, an out-of-memory) must not cost the rest of a GPU run that may not come again."""
    try:
        return fn(*args)
    except Exception as exc:  # reported as a failed check, its traceback in the log
        traceback.print_exc()
        return [{"check": part, "pass": False, "note": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}]


def write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("kernels.json", json.dumps(result, indent=2) + "\n"), ("kernels.md", markdown(result))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "build" / "bench" / "gpu"))
    p.add_argument("--small", action="store_true", help="tiny shapes (the interpreter's dry run)")
    p.add_argument("--list", action="store_true", help="print the shapes and exit")
    p.add_argument("--budget-s", type=float, default=180.0, help="start no timing after this many seconds")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-gbps", type=float, default=PEAK_GBPS)
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS)
    p.add_argument("--skip-checks", action="store_true", help="timings and GPTQ only")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if args.list:
        print(list_plan(args.small))
        return 0
    import torch
    import triton

    from quantizers.kernels import INTERPRET, check_available, device

    try:
        check_available()
    except RuntimeError as exc:
        print(f"kernels.py: {exc}", file=sys.stderr)
        return 2
    cuda = not INTERPRET
    start = time.perf_counter()
    reps, warmup = (1, 0) if args.small else (args.reps, args.warmup)
    peaks = (args.peak_gbps, args.peak_tflops)
    info = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (interpreter)", "torch": torch.__version__,
            "triton": triton.__version__, "peak_gbps": peaks[0], "peak_tflops": peaks[1], "small": args.small,
            "peak_source": "NVIDIA H200 SXM datasheet" if peaks == (PEAK_GBPS, PEAK_TFLOPS) else "--peak-*",
            "reps": reps, "warmup": warmup}  # fmt: skip
    result = {"info": info, "checks": [], "timings": [], "gptq": []}

    def save() -> None:
        info["wall_s"] = time.perf_counter() - start
        write(args.out, result)

    if not args.skip_checks:
        shapes = SMALL_CHECK_SHAPES if args.small else CHECK_SHAPES
        paths = {"gemm": shapes["gemm"][0], "gemv": shapes["gemv"][0]}
        result["checks"] += guarded("quantize", lambda: check_quant(shapes["quant"], cuda))
        result["checks"] += guarded("gguf", lambda: check_gguf(shapes["gguf"], cuda))
        result["checks"] += guarded("matmul", lambda: check_matmul(shapes["gemm"], paths, cuda, INTERPRET))
        save()
    timer = Timer(cuda, reps, warmup)
    models, batches = plan(args.small)
    for model, projs in models.items():
        for proj, (n, k) in projs.items():
            if time.perf_counter() - start > args.budget_s:
                result["timings"].append({"model": model, "proj": proj, "N": n, "K": k, "M": 0, "impl": "all",
                                          "note": "not run: time budget"})  # fmt: skip
                continue
            args_ = (model, proj, n, k, batches, timer, peaks, device())
            rows = guarded(f"timing {model} {proj}", time_shape, *args_)
            if rows and "check" in rows[0]:  # it failed: the error is a failed check, the case a note
                result["checks"] += rows
                rows = [{"model": model, "proj": proj, "N": n, "K": k, "M": 0, "impl": "all", "note": "error"}]
            result["timings"] += rows
            save()
    timer.flush = None
    result["checks"] += timing_checks(result["timings"])
    save()
    gptq_rows = guarded("gptq", lambda: run_gptq(args.small, cuda, device()))
    result["checks"] += [r for r in gptq_rows if r.get("pass") is not None]
    result["gptq"] = [r for r in gptq_rows if r.get("pass") is None]
    save()
    print(markdown(result))
    failed = [r["check"] for r in result["checks"] if r.get("pass") is False]
    if failed:
        print(f"kernels.py: {len(failed)} checks failed: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
