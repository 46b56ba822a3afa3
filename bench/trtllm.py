"""TensorRT-LLM checkpoints of the demo model: export cost next to `convert --to hf`, and quality by the layout runtime.

No TensorRT-LLM runs here (no GPU, no NVIDIA wheels): quality is scored by gemport's layout runtime
(validation/runtimes/trtllm_layout.py, TensorRT-LLM's Gemma forward pass in plain torch), and the
quantized checkpoints against the same records in a compressed-tensors folder scored by transformers.

    .venv/bin/python bench/trtllm.py [--windows 16] [--rows export bf16-tp2 awq gptq]

Rows:
    export     gemport convert MODEL --to hf (bf16) and --to trtllm (bf16, tp 1), each in a fresh process
               (wall time, peak RSS of the process tree sampled every 50 ms), three runs each, medians
    bf16-tp2   convert MODEL --to trtllm --tp-size 2 (bf16, and f32 to separate the layout's own rounding),
               validated against MODEL (delta-ppl, KLD); beside them MODEL as an HF bf16 folder, which
               transformers computes in bf16
    awq, gptq  quantize OFFGRID --method awq|gptq --bits 4 to --to hf (compressed-tensors, transformers) and
               --to trtllm (W4A16_AWQ layout, layout runtime): the same records (the quantizers are
               deterministic), both validated against OFFGRID; the relative KLD difference

Results: build/bench/trtllm.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_gguf", _HERE / "gguf.py")
_bench_gguf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench_gguf)
measure = _bench_gguf.measure  # (wall seconds, peak RSS MB of the process tree); BenchError on failure

GEMPORT = str(Path(sys.executable).with_name("gemport"))
ROWS = ("export", "bf16-tp2", "awq", "gptq")


def validated(path: Path, reference: Path, windows: int, work: Path) -> dict:
    out = work / f"{path.name}.validate.json"
    argv = [GEMPORT, "validate", str(path), "--reference", str(reference), "--windows", str(windows)]
    wall, rss = measure([*argv, "--no-default-gates", "--json", str(out)], work / f"{path.name}.validate.log")
    report = json.loads(out.read_text())
    m = report["metrics"]
    return {
        "runtime": report["runtime"]["name"],
        "ppl": m["ppl_cand"],
        "delta_ppl_pct": m["delta_ppl_pct"],
        "kld": m["kld"],
        "top1_pct": m["top1_pct"],
        "tokens": m["tokens"],
        "validate_s": wall,
        "validate_rss_mb": rss,
    }


def export_row(model: Path, work: Path, runs: int) -> dict:
    times: dict[str, list[tuple[float, float]]] = {"hf": [], "trtllm": []}
    for i in range(runs):
        for target in ("hf", "trtllm") if i % 2 == 0 else ("trtllm", "hf"):
            out = work / f"export-{target}"
            shutil.rmtree(out, ignore_errors=True)
            argv = [GEMPORT, "convert", str(model), str(out), "--to", target, "--dtype", "bf16"]
            times[target].append(measure(argv, work / f"export-{target}.log"))
    row = {
        t: {"wall_s": statistics.median(w for w, _ in v), "peak_rss_mb": max(r for _, r in v)} for t, v in times.items()
    }
    row["time_ratio"] = row["trtllm"]["wall_s"] / row["hf"]["wall_s"]
    return row


def quant_row(method: str, offgrid: Path, work: Path, windows: int) -> dict:
    row = {}
    for target in ("hf", "trtllm"):
        out = work / f"{method}-{target}"
        shutil.rmtree(out, ignore_errors=True)
        argv = [GEMPORT, "quantize", str(offgrid), str(out), "--method", method, "--bits", "4", "--to", target]
        wall, rss = measure(argv, work / f"{method}-{target}.log")
        row[target] = {"quantize_s": wall, "quantize_rss_mb": rss, **validated(out, offgrid, windows, work)}
    row["kld_rel_diff"] = abs(row["trtllm"]["kld"] - row["hf"]["kld"]) / row["hf"]["kld"]
    return row


def markdown(result: dict) -> str:
    lines = []
    if "export" in result:
        e = result["export"]
        lines += [
            "| export (demo, bf16) | wall s | peak RSS MB |",
            "|---|---|---|",
            f"| gemport convert --to hf | {e['hf']['wall_s']:.2f} | {e['hf']['peak_rss_mb']:.0f} |",
            f"| gemport convert --to trtllm (tp 1) | {e['trtllm']['wall_s']:.2f} | {e['trtllm']['peak_rss_mb']:.0f} |",
            f"| ratio trtllm / hf | {e['time_ratio']:.2f} | |",
            "",
        ]
    head = "| artifact | runtime | ppl | delta-ppl % | KLD | top-1 % | tokens |"
    rows = []
    for key, name in (
        ("bf16-tp2", "trtllm bf16 tp 2 (demo)"),
        ("f32-tp2", "trtllm f32 tp 2 (demo)"),
        ("hf-bf16", "hf bf16, computed in bf16 (demo)"),
    ):
        if key in result:
            rows.append((name, result[key]))
    for method in ("awq", "gptq"):
        if method in result:
            rows += [(f"{method} int4 g128 compressed-tensors", result[method]["hf"])]
            rows += [(f"{method} int4 g128 trtllm W4A16_AWQ layout", result[method]["trtllm"])]
    if rows:
        lines += [head, "|---|---|---|---|---|---|---|"]
        for name, r in rows:
            lines.append(
                f"| {name} | {r['runtime']} | {r['ppl']:.4f} | {r['delta_ppl_pct']:+.4f} | {r['kld']:.6f} | "
                f"{r['top1_pct']:.2f} | {r['tokens']} |"
            )
        for method in ("awq", "gptq"):
            if method in result:
                lines.append(
                    f"\n{method}: KLD trtllm vs compressed-tensors differs by {result[method]['kld_rel_diff']:.2%}"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("build/models/gemma-3-270m"))
    ap.add_argument("--offgrid", type=Path, default=Path("build/models/gemma-3-270m-offgrid"))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3, help="export runs per target (default 3)")
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    args = ap.parse_args(argv)
    work = Path("build/bench/trtllm")
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"model": str(args.model), "offgrid": str(args.offgrid), "windows": args.windows}
    if "export" in args.rows:
        result["export"] = export_row(args.model, work, args.runs)
    if "bf16-tp2" in args.rows:
        for name, argv in (
            ("bf16-tp2", ["--to", "trtllm", "--tp-size", "2", "--dtype", "bf16"]),
            ("f32-tp2", ["--to", "trtllm", "--tp-size", "2", "--dtype", "f32"]),
            ("hf-bf16", ["--to", "hf", "--dtype", "bf16"]),
        ):
            out = work / name
            shutil.rmtree(out, ignore_errors=True)
            measure([GEMPORT, "convert", str(args.model), str(out), *argv], work / f"{name}.log")
            result[name] = validated(out, args.model, args.windows, work)
    for method in ("awq", "gptq"):
        if method in args.rows:
            result[method] = quant_row(method, args.offgrid, work, args.windows)
    Path("build/bench/trtllm.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
