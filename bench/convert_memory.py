"""Peak resident memory of `gemport convert` on the demo model, next to transformers' load + save.

Each run is a fresh child process that reports its own ru_maxrss, so the figures are the
true high-water marks. Budget (issue: foundation): 1.5 x the largest tensor in the larger of
the source and target dtypes + 400 MB.

    .venv/bin/python bench/convert_memory.py [--model build/models/gemma-3-270m]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1e6

GEMPORT = """
import resource, sys
from gemport.cli import main
code = main(sys.argv[1:])
print("RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
sys.exit(code)
"""

TRANSFORMERS = """
import resource, sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
m.save_pretrained(sys.argv[2])
print("RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def run(script: str, *args: str) -> tuple[float, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"bench run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    rss = next(float(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("RSS "))
    return rss, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("build/models/gemma-3-270m"))
    args = ap.parse_args()
    from converters import hf

    ckpt = hf.read(args.model)
    largest = max(ckpt, key=lambda t: t.nbytes)
    rows = []
    with tempfile.TemporaryDirectory(dir="build") as tmp:
        for dtype in ("f32", "bf16"):
            src_bytes = largest.nbytes
            dst_bytes = largest.nbytes * {"f32": 4, "bf16": 2}[dtype] // {"f32": 4, "bf16": 2}[largest.dtype]
            budget = 1.5 * max(src_bytes, dst_bytes) + 400 * MB
            rss, wall = run(GEMPORT, "convert", str(args.model), f"{tmp}/g-{dtype}", "--to", "hf", "--dtype", dtype)
            rows.append(
                {
                    "tool": "gemport convert",
                    "to": dtype,
                    "peak_rss_mb": rss / MB,
                    "wall_s": wall,
                    "budget_mb": budget / MB,
                    "within_budget": rss <= budget,
                }
            )
        rss, wall = run(TRANSFORMERS, str(args.model), f"{tmp}/t-f32")
        rows.append(
            {
                "tool": "transformers from_pretrained+save_pretrained",
                "to": "f32",
                "peak_rss_mb": rss / MB,
                "wall_s": wall,
                "budget_mb": None,
                "within_budget": None,
            }
        )
    print(f"model {args.model}: largest tensor {largest.name} {list(largest.shape)} {largest.dtype}")
    print(f"{'tool':48} {'to':5} {'peak RSS MB':>12} {'budget MB':>10} {'wall s':>7}")
    for r in rows:
        budget = f"{r['budget_mb']:.0f}" if r["budget_mb"] else "-"
        print(f"{r['tool']:48} {r['to']:5} {r['peak_rss_mb']:12.0f} {budget:>10} {r['wall_s']:7.1f}")
    peer = rows[-1]["peak_rss_mb"]
    print(f"peak RSS ratio gemport/transformers (to f32): {rows[0]['peak_rss_mb'] / peer:.2f}")
    print(json.dumps(rows))
    if not all(r["within_budget"] for r in rows[:2]):
        sys.exit("peak RSS over budget")


if __name__ == "__main__":
    main()
