"""The GPU check of quantizers/kernels: one script, under 8 minutes on one GPU (issue 17).

On a CUDA machine (torch with CUDA, triton 3.6), with shapes of Gemma 1 7B's projections:

1. group_quant.quantize_weight (int4 g128 sym/asym, int8 per channel; bf16 weights) equals
   quantizers/rtn.py's record computed on the CPU, bit for bit; its time beside the CPU's;
2. gguf_legacy Q8_0 and Q4_0 equal gguf_blocks' bytes; time beside the CPU encoder;
3. dequant_matmul: GEMM (M = 512) and GEMV (M = 1) with bf16 and fp16 activations against the
   dequantized weight multiplied by torch in float32 on the GPU (max error relative to the largest
   output: target below half an ulp of the output dtype plus accumulation, 2**-8 bf16, 2**-10 fp16);
   time beside torch.matmul on the dequantized bf16/fp16 weight (cuBLAS), the speed a serving stack
   that dequantizes first would get.

    python bench/kernels_gpu.py [--out DIR]            # on the GPU machine
    TRITON_INTERPRET=1 python bench/kernels_gpu.py --small   # the same checks on tiny shapes, on the CPU

Writes DIR/kernels_gpu.json (default $OUT or build/bench/kernels) and prints a table; exit 1 if any
check fails. Besides torch and triton it imports numpy, gguf and compressed-tensors (the CPU
references); a GPU machine without them needs them carried in (pure-Python wheels, but
compressed-tensors pulls transformers and pydantic): check with one `python -c "import gguf,
compressed_tensors"` before the timed run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not bench/: its gguf.py would hide the gguf package

import numpy as np  # noqa: E402
import torch  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402
from gguf import GGMLQuantizationType  # noqa: E402

from quantizers import gguf_blocks, rtn  # noqa: E402
from quantizers.kernels import INTERPRET, dequant_matmul, device, gguf_legacy, group_quant  # noqa: E402
from quantizers.record import QuantFormat  # noqa: E402

FULL = {"quant": (4096, 3072), "gguf": (512, 3072), "gemm": (512, 24576, 3072), "gemv": (1, 24576, 3072)}
SMALL = {"quant": (64, 256), "gguf": (8, 256), "gemm": (20, 96, 256), "gemv": (1, 96, 256)}
FORMATS = {
    "int4 g128 sym": QuantFormat(bits=4, group_size=128, symmetric=True, scale_dtype="bf16"),
    "int4 g128 asym": QuantFormat(bits=4, group_size=128, symmetric=False, scale_dtype="bf16"),
    "int8 per-channel": QuantFormat(bits=8, group_size=None, symmetric=True, scale_dtype="bf16"),
}


def timed(fn, repeat: int = 5) -> tuple[object, float]:
    """(result, median seconds) of ``fn()``; CUDA work synchronised around each call."""
    out, times = None, []
    for _ in range(repeat):
        if not INTERPRET:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if not INTERPRET:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return out, float(np.median(times))


def weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02).to(torch.bfloat16)


def check_quant(shape: tuple[int, int], repeat: int) -> list[dict]:
    w = weight(*shape)
    rows = []
    for name, fmt in FORMATS.items():
        got, t_gpu = timed(lambda fmt=fmt: group_quant.quantize_weight(w, fmt), repeat)
        want, t_cpu = timed(lambda fmt=fmt: rtn.quantize_weight(w, fmt), 1)
        same = torch.equal(got.codes.cpu(), want.codes) and torch.equal(got.scales.cpu(), want.scales)
        if not fmt.symmetric:
            same = same and torch.equal(got.zero_points.cpu(), want.zero_points)
        ours = group_quant.pack_int32(got.codes, fmt.bits).cpu()
        packed_same = torch.equal(ours, pack_to_int32(want.codes, fmt.bits))
        rows.append({"check": f"quantize {name} {list(shape)}", "pass": same and packed_same, "kernel_s": t_gpu,
                     "cpu_s": t_cpu})  # fmt: skip
    return rows


def check_gguf(shape: tuple[int, int], repeat: int) -> list[dict]:
    x = weight(*shape, seed=1).float()
    rows = []
    for qtype in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0):
        got, t_gpu = timed(lambda q=qtype: gguf_legacy.quantize(x, q), repeat)
        want, t_cpu = timed(lambda q=qtype: gguf_blocks.quantize(x.numpy(), q), 1)
        rows.append({"check": f"gguf {qtype.name} {list(shape)}", "pass": bool(np.array_equal(got, want)),
                     "kernel_s": t_gpu, "cpu_s": t_cpu})  # fmt: skip
    return rows


def check_matmul(shape: tuple[int, int, int], path: str, repeat: int) -> list[dict]:
    m, n, k = shape
    rows = []
    for name, fmt in FORMATS.items():
        rec = rtn.quantize_weight(weight(n, k, seed=2), fmt)
        packed = pack_to_int32(rec.codes, fmt.bits)
        zeros = None if fmt.symmetric else pack_to_int32(rec.zero_points, fmt.bits, packed_dim=0)
        for act, bound in ((torch.bfloat16, 2**-8), (torch.float16, 2**-10)):
            if INTERPRET and act == torch.float16:
                continue  # the interpreter truncates float32 -> fp16: checked on the GPU only
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(3)).to(act)
            w = dequant_matmul.dequantized(packed, rec.scales, zeros, fmt.bits, act)
            want = x.to(device()).float() @ w.to(device()).float().T
            args = (x, packed, rec.scales, zeros, fmt.bits, path)
            got, t_kernel = timed(lambda args=args: dequant_matmul.matmul(*args), repeat)
            wd, xd = w.to(device()), x.to(device())
            _, t_dense = timed(lambda wd=wd, xd=xd: xd @ wd.T, repeat)
            err = float((got.float() - want).abs().max() / want.abs().max())
            rows.append({"check": f"{path} {name} {str(act).removeprefix('torch.')} {list(shape)}",
                         "pass": err < bound, "error": err, "kernel_s": t_kernel, "dense_s": t_dense})  # fmt: skip
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "build" / "bench" / "kernels")))
    p.add_argument("--small", action="store_true", help="tiny shapes (the interpreter's dry run)")
    args = p.parse_args()
    shapes, repeat = (SMALL, 1) if args.small else (FULL, 5)
    info = {"device": "cpu (interpreter)" if INTERPRET else torch.cuda.get_device_name(0)}
    info |= {"torch": torch.__version__, "triton": __import__("triton").__version__}
    start = time.perf_counter()
    rows = check_quant(shapes["quant"], repeat) + check_gguf(shapes["gguf"], repeat)
    rows += check_matmul(shapes["gemm"], "gemm", repeat) + check_matmul(shapes["gemv"], "gemv", repeat)
    info["wall_s"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels_gpu.json").write_text(json.dumps({"info": info, "checks": rows}, indent=2) + "\n")
    print(json.dumps(info))
    print("| check | pass | error | kernel ms | reference ms |\n|---|---|---:|---:|---:|")
    for r in rows:
        ref = r.get("dense_s", r.get("cpu_s"))
        err = f"{r['error']:.2e}" if "error" in r else ""
        print(f"| {r['check']} | {r['pass']} | {err} | {r['kernel_s'] * 1e3:.2f} | {ref * 1e3:.2f} |")
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
