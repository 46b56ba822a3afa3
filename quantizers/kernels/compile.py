"""Compile every kernel for the GPUs gemport targets, without a GPU: PTX and cubin via triton.compile
(the ptxas the triton wheel ships), registers and shared memory from the cubin.

``python -m quantizers.kernels.compile [--arch 80 90] [--json]`` prints one line per kernel variant and
arch; tests/test_kernels.py runs it (in a process of its own: kernels defined under the interpreter
cannot be compiled), so a kernel that stops compiling fails CI. Registers and
static shared memory are read from the cubin by ``cuobjdump --dump-resource-usage`` (the wheel ships it
beside ptxas); Triton's own ``metadata.shared`` is the shared memory it allocates at launch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from quantizers.kernels import FP_OPTIONS, dequant_matmul, gguf_legacy, gptq_block, group_quant, trtllm_matmul

ARCHS = (80, 90)  # A100 (sm_80), H100/H200 (sm_90a)
WARP = 32


@dataclass(frozen=True)
class Variant:
    """One specialisation of a kernel: its argument types (Triton signature strings) and constexprs."""

    name: str
    fn: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    exact: bool = True  # a bit-exact kernel: no FMA may appear in it (a matmul's dot products are FMAs)


@dataclass(frozen=True)
class Compiled:
    variant: str
    exact: bool
    arch: int
    cubin: bytes
    ptx: str
    registers: int
    static_shared: int  # bytes, from the cubin
    triton_shared: int  # bytes, allocated by Triton at launch
    num_warps: int


def _variant(name: str, fn, sig: dict[str, str], consts: dict[str, object], exact: bool = True) -> Variant:
    return Variant(name, fn, sig | dict.fromkeys(consts, "constexpr"), consts, exact)


def _range(dtype: str) -> Variant:
    sig = {"w_ptr": f"*{dtype}", "lo_ptr": "*fp32", "hi_ptr": "*fp32", "cols": "i32", "groups": "i32"}
    consts = {"GROUP": 128, "BLOCK": 128}
    return _variant(f"group_range[{dtype}, g128]", group_quant._group_range, sig, consts)


def _codes(dtype: str, zero: bool, group: int) -> Variant:
    sig = {"w_ptr": f"*{dtype}", "scale_ptr": "*fp32", "zero_ptr": "*i8" if zero else "*fp32", "codes_ptr": "*i8"}
    sig |= {"cols": "i32", "groups": "i32", "qmin": "fp32", "qmax": "fp32"}
    consts = {"GROUP": group, "HAS_ZERO": zero, "BLOCK": min(1024, triton.next_power_of_2(group))}
    name = f"group_codes[{dtype}, g{group}, {'asym' if zero else 'sym'}]"
    return _variant(name, group_quant._group_codes, sig, consts)


def _pack(bits: int) -> Variant:
    sig = {"codes_ptr": "*i8", "out_ptr": "*i32", "cols": "i32", "words": "i32"}
    consts = {"BITS": bits, "PER_WORD": 32 // bits, "BLOCK": 256}
    return _variant(f"pack_int32[{bits} bits]", group_quant._pack_int32, sig, consts)


def _gguf(name: str, fn) -> Variant:
    sig = {"x_ptr": "*fp32", "d_ptr": "*fp32", "q_ptr": "*i8", "blocks": "i32"}
    consts = {"NB": gguf_legacy.NB, "QK": gguf_legacy.QK}
    return _variant(name, fn, sig, consts)


def _matmul(kind: str, act: str, bits: int, group: int, zero: bool, k: int = 2048) -> Variant:
    sig = {"x_ptr": f"*{act}", "w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*i32", "y_ptr": f"*{act}"}
    consts = {"K": k, "GROUP": group, "BITS": bits, "HAS_ZERO": bool(zero), "BN": 64, "BK": 64}
    if kind == "gemm":
        sig |= {"M": "i32", "N": "i32"}
        consts |= {"PRECISION": "ieee" if act == "fp32" else "tf32", "DOT_F32": False, "BM": 32}
        fn = dequant_matmul._gemm
    else:
        sig |= {"N": "i32"}
        fn = dequant_matmul._gemv
    name = f"{kind}_w{bits}a16[{act}, {'per-channel' if group == k else f'g{group}'}, {'asym' if zero else 'sym'}]"
    return _variant(name, fn, sig, consts, exact=False)


def _trtllm_matmul(kind: str, act: str, bits: int, group: int, prequant: bool, k: int = 2048) -> Variant:
    """A TensorRT-LLM layout matmul: W4A16_AWQ (int4 groups, pre-quant scale), W4A16 / W8A16 (per channel)."""
    sig = {"x_ptr": f"*{act}", "w_ptr": "*i8", "s_ptr": "*bf16", "p_ptr": "*bf16", "y_ptr": f"*{act}"}
    consts = {"K": k, "GROUP": group, "BITS": bits, "HAS_PREQUANT": prequant, "BN": 64, "BK": 64}
    if kind == "gemm":
        sig |= {"M": "i32", "N": "i32"}
        consts |= {"PRECISION": "ieee" if act == "fp32" else "tf32", "DOT_F32": False, "BM": 32}
        fn = trtllm_matmul._gemm
    else:
        sig |= {"N": "i32"}
        fn = trtllm_matmul._gemv
    algo = "W4A16_AWQ" if prequant else f"W{bits}A16"
    name = f"trtllm_{kind}_{algo}[{act}, {'per-channel' if group == k else f'g{group}'}]"
    return _variant(name, fn, sig, consts, exact=False)


def _gptq(cols: int, block: int = 128) -> Variant:
    """GPTQ's column step: a segment of ``cols`` columns (a whole block, or one group fitted on the fly)."""
    sig = {"work_ptr": "*fp32", "u_ptr": "*fp32", "scale_ptr": "*fp32", "zero_ptr": "*fp32", "group_ptr": "*i32"}
    sig |= {"col_ptr": "*i32", "levels_ptr": "*i8", "values_ptr": "*fp32", "err_ptr": "*fp32", "rows": "i32"}
    sig |= {"n": "i32", "i1": "i32", "width": "i32", "start": "i32", "qmin": "fp32", "qmax": "fp32"}
    consts = {"COLS": cols, "BB": block, "BR": gptq_block.ROWS_PER_PROGRAM}
    return _variant(f"gptq_columns[{cols} of a {block}-column block]", gptq_block._gptq_columns, sig, consts)


VARIANTS = (
    *(_range(dt) for dt in ("fp32", "bf16", "fp16")),
    *(_codes(dt, zero, 128) for dt in ("bf16", "fp32") for zero in (False, True)),
    _codes("bf16", False, 3072),  # per-channel int8 of a 3072-wide row: the loop over the row
    *(_pack(bits) for bits in (4, 8)),
    _gguf("gguf_q8_0", gguf_legacy._q8_0),
    _gguf("gguf_q4_0", gguf_legacy._q4_0),
    *(
        _matmul(kind, act, 4, 128, zero)
        for kind in ("gemm", "gemv")
        for act in ("bf16", "fp16")
        for zero in (False, True)
    ),
    _matmul("gemm", "fp32", 4, 128, False),
    *(_matmul(kind, "bf16", 8, 2048, False) for kind in ("gemm", "gemv")),
    *(_trtllm_matmul(kind, "bf16", 4, 128, True) for kind in ("gemm", "gemv")),
    _trtllm_matmul("gemm", "fp16", 4, 128, True),
    _trtllm_matmul("gemv", "bf16", 4, 2048, False),
    *(_trtllm_matmul(kind, "bf16", 8, 2048, False) for kind in ("gemm", "gemv")),
    _gptq(128),  # act-order, per-channel or groups of 128: the whole block in one launch
    _gptq(32),  # natural order with groups of 32: a launch per group
)


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, static shared bytes) of the one function in ``cubin``; RuntimeError if
    cuobjdump cannot say."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True)
    m = re.search(r"REG:(\d+).*?SHARED:(\d+)", out.stdout)
    if out.returncode or not m:
        raise RuntimeError(f"cuobjdump could not read the cubin: {out.stderr.strip() or out.stdout.strip()}")
    return int(m.group(1)), int(m.group(2))


def compile_variant(v: Variant, arch: int) -> Compiled:
    """``v`` compiled for sm_``arch`` (sm_90a for 90) with gemport's launch options."""
    src = ASTSource(v.fn, signature=v.signature, constexprs=v.constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, WARP), options=dict(FP_OPTIONS))
    cubin = kernel.asm["cubin"]
    registers, shared = resource_usage(cubin)
    meta = kernel.metadata
    return Compiled(v.name, v.exact, arch, cubin, kernel.asm["ptx"], registers, shared, meta.shared, meta.num_warps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quantizers.kernels.compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (default 80 90)")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    args = p.parse_args(argv)
    for v in VARIANTS:
        for arch in args.arch:
            c = compile_variant(v, arch)
            if args.json:
                print(json.dumps(summary(c)))
                continue
            fma = "" if not c.exact else f", {c.ptx.count('fma.rn.f32')} FMA (bit-exact kernel: must be 0)"
            print(
                f"{summary(c)['target']} {c.variant}: {len(c.cubin)} B cubin, {c.registers} registers, "
                f"{c.static_shared} B static + {c.triton_shared} B Triton shared, {c.num_warps} warps{fma}"
            )
    return 0


def summary(c: Compiled) -> dict:
    """What a test checks of a compiled kernel: the cubin's size and ELF magic, the PTX target, the
    resources and the FMAs in the PTX (none: the floating-point contract)."""
    target = re.search(r"^\.target\s+(\S+)", c.ptx, re.M)
    return {
        "variant": c.variant,
        "exact": c.exact,
        "arch": c.arch,
        "cubin_bytes": len(c.cubin),
        "elf": c.cubin[:4] == b"\x7fELF",
        "target": target.group(1) if target else None,
        "registers": c.registers,
        "static_shared": c.static_shared,
        "triton_shared": c.triton_shared,
        "num_warps": c.num_warps,
        "fma_f32": c.ptx.count("fma.rn.f32"),
    }


if __name__ == "__main__":
    raise SystemExit(main())
