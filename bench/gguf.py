"""gemport's GGUF writer against llama.cpp's own pipeline, side by side in one run.

Peer: llama.cpp's ``convert_hf_to_gguf.py`` (HF -> BF16 GGUF) followed by ``llama-quantize``, both
from the pinned llama-cpp-python sdist (built by ``bench/llamacpp_tools.py``). Ours: one
``gemport convert HF OUT.gguf --to gguf --quant TYPE``. For each type the bench prints wall time and
peak RSS (summed over the process tree, sampled every 50 ms), file size, whether the tensor bytes
are identical, and the quality of both files scored in llama.cpp by ``gemport validate`` against
the HF reference (default protocol). The imatrix rows use one importance matrix made by
``gemport imatrix`` (calibration split) for both sides.

    .venv/bin/python bench/gguf.py [--model build/models/gemma-3-270m-offgrid] [--windows 16]
    .venv/bin/python bench/gguf.py --types q4_k_m --no-imatrix --windows 4     # a quick look

Results go to ``build/bench/gguf-<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

_HERE = Path(__file__).resolve().parent
# This script is named gguf.py: import the gguf package before its folder goes on sys.path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import gguf  # noqa: E402

sys.path.insert(0, str(_HERE))
from llamacpp_tools import ensure_tools  # noqa: E402
from offgrid_order import BenchError, Row, conversion_source, gemport_validate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GEMPORT = Path(sys.executable).with_name("gemport")
TYPES = ("q8_0", "q6_k", "q4_0", "q4_k_m")
IMATRIX_TYPES = ("q4_0", "q4_k_m")


def measure(argv: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB of the process and all its children) of one command."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = psutil.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        peak = 0
        while proc.poll() is None:
            try:
                tree = [proc, *proc.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)
    if proc.returncode:
        raise BenchError(f"{argv[0]} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start, peak / 1e6


def tensor_bytes(path: Path) -> dict[str, bytes]:
    import numpy as np

    return {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(path).tensors}


def scored(path: Path, model: Path, windows: int, work: Path, label: str) -> dict:
    row = Row(label, str(path), path.stat().st_size, 0.0, {}, 0, None)
    gemport_validate(path, model, windows, row, work)
    return {"ppl": row.ppl, "delta_ppl_pct": row.delta_ppl_pct, "kld": row.kld, "top1_pct": row.top1_pct}


def run(args: argparse.Namespace) -> dict:
    tools = ensure_tools()
    model, work = args.model, ROOT / "build" / "bench" / "gguf" / args.model.name
    work.mkdir(parents=True, exist_ok=True)
    source, _ = conversion_source(model, work, fix_tokenizer=True)
    base = work / "peer.bf16.gguf"
    base.unlink(missing_ok=True)
    convert_s, convert_mb = measure([*tools.convert_command(source, base, "bf16")], work / "convert.log")
    imatrix = work / "calibration.imatrix.gguf"
    jobs = [(t, None) for t in args.types]
    if not args.no_imatrix:
        measure([str(GEMPORT), "imatrix", str(model), str(imatrix), "--overwrite"], work / "imatrix.log")
        jobs += [(t, imatrix) for t in IMATRIX_TYPES if t in args.types]
    rows = []
    for qtype, imat in jobs:
        tag = qtype + ("-imatrix" if imat else "")
        ours, theirs = work / f"gemport.{tag}.gguf", work / f"peer.{tag}.gguf"
        extra = ["--imatrix", str(imat)] if imat else []
        ours_s, ours_mb = measure(
            [str(GEMPORT), "convert", str(model), str(ours), "--to", "gguf", "--quant", qtype, "--overwrite", *extra],
            work / f"gemport-{tag}.log",
        )
        theirs.unlink(missing_ok=True)
        peer_extra = ["--imatrix", str(imat)] if imat else []
        quant_s, quant_mb = measure(
            [str(tools.quantize), *peer_extra, str(base), str(theirs), qtype.upper()], work / f"quantize-{tag}.log"
        )
        row = {
            "type": tag,
            "gemport": {"seconds": ours_s, "peak_rss_mb": ours_mb, "bytes": ours.stat().st_size},
            "peer": {
                "seconds": convert_s + quant_s,
                "convert_seconds": convert_s,
                "quantize_seconds": quant_s,
                "peak_rss_mb": max(convert_mb, quant_mb),
                "bytes": theirs.stat().st_size,
            },
            "identical_tensor_bytes": tensor_bytes(ours) == tensor_bytes(theirs),
        }
        if args.windows:
            row["gemport"] |= scored(ours, model, args.windows, work, f"gemport-{tag}")
            row["peer"] |= scored(theirs, model, args.windows, work, f"peer-{tag}")
        rows.append(row)
        print_row(row)
    return {"model": str(model), "windows": args.windows, "rows": rows}


def print_row(r: dict) -> None:
    g, p = r["gemport"], r["peer"]
    line = (
        f"{r['type']:15} time {g['seconds']:6.1f}s vs {p['seconds']:6.1f}s ({g['seconds'] / p['seconds']:.2f}x)  "
        f"peak RSS {g['peak_rss_mb']:6.0f} vs {p['peak_rss_mb']:6.0f} MB ({g['peak_rss_mb'] / p['peak_rss_mb']:.2f}x)  "
        f"bytes {g['bytes']} vs {p['bytes']}  identical tensors: {r['identical_tensor_bytes']}"
    )
    if "kld" in g:
        line += (
            f"\n{'':15} KLD {g['kld']:.5f} vs {p['kld']:.5f} ({g['kld'] / p['kld']:.3f}x)  "
            f"dppl {g['delta_ppl_pct']:+.2f}% vs {p['delta_ppl_pct']:+.2f}%  "
            f"top-1 {g['top1_pct']:.1f} vs {p['top1_pct']:.1f}"
        )
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "build/models/gemma-3-270m-offgrid")
    ap.add_argument("--windows", type=int, default=16, help="validation windows (0: no quality scores)")
    ap.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    ap.add_argument("--no-imatrix", action="store_true", help="skip the importance-matrix rows")
    args = ap.parse_args(argv)
    print("gemport (one step) vs convert_hf_to_gguf.py + llama-quantize; ratios are gemport / peer")
    try:
        result = run(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = ROOT / "build" / "bench" / f"gguf-{args.model.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
