"""Validation against llama-perplexity's KL-divergence mode, side by side in one run (issue 20).

Part 1, the off-grid demo model (Gemma 3 270M), its GGUF Q4_K_M, 4 windows of 512 from the evaluation
split of the default corpus (written to OUT/evaluation.txt for llama-perplexity, which tokenizes it
itself; its chunks are gemport's windows: BOS first, scored from position 256):

- llama.cpp, cold: ``llama-perplexity -m F16 --kl-divergence-base OUT/base.dat`` (its base: the F16
  GGUF's logits, the peer's reference), then warm: ``llama-perplexity -m Q4_K_M --kl-divergence-base
  OUT/base.dat --kl-divergence``;
- gemport, cold: ``gemport validate Q4_K_M --reference REF --reference-cache EMPTY`` (the layer-streamed
  fp32 reference computed into the cache), then warm: the same command again (the cache reused);
- gemport with the whole-model reference run in step (``--no-reference-cache``, the validation as it
  was before the cache): the cached metrics must equal its to 1e-6 relative (KLD) and the printed digits.

Targets: warm wall time at most 1.5x llama-perplexity's warm run, warm peak RSS at most 1.2x its.

Part 2, the synthetic Gemma 1 7B (bf16, from ``bench/scale.py``; random weights, so its scores mean
nothing), 4 windows of 512:

- ``python -m validation.refcache`` on it: the layer-streamed fp32 reference (target: peak RSS < 4 GB);
- ``gemport validate`` of its Q4_K_M GGUF (and Q8_0 when that file exists) with that cache, against
  ``llama-perplexity -m THE_GGUF`` (plain perplexity, the same 4 chunks): target peak RSS at most
  llama.cpp's own plus 1 GB.

Every command runs alone (one at a time), 2 threads for llama.cpp (``-t 2``, the machine's cores);
wall time and peak RSS (the child's ru_maxrss, from wait4) per command.

    make demo-model
    .venv/bin/python bench/llamacpp_tools.py          # llama-perplexity
    .venv/bin/python bench/validate.py [--out build/bench/validate] [--skip-7b]

The 7B files come from ``.venv/bin/python bench/scale.py --steps q4_k_m`` (kept with ``--keep``) or
``gemport convert build/scale/gemma-7b build/scale/g7.q4_k_m.gguf --quant q4_k_m``.
Results: ``OUT/bench.json`` and a Markdown table on stdout (bench/RESULTS.md, "Validation speed").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.llamacpp_tools import SAFE_CPU_ARGS, ensure_tools  # noqa: E402

REFERENCE = ROOT / "build" / "models" / "gemma-3-270m-offgrid"
MODEL_7B = ROOT / "build" / "scale" / "gemma-7b"
GGUF_7B = {"Q4_K_M": ROOT / "build" / "scale" / "g7.q4_k_m.gguf", "Q8_0": ROOT / "build" / "scale" / "g7.q8_0.gguf"}
WINDOWS, N_CTX, THREADS = 4, 512, 2
MB = 1 << 20


def run(argv: list[str], log: Path) -> dict:
    """Run ``argv`` alone (output to ``log``): its wall time (s) and peak RSS (MB, ru_maxrss by wait4)."""
    start = time.monotonic()
    with open(log, "wb") as out:
        out.write(("$ " + " ".join(map(str, argv)) + "\n").encode())
        out.flush()
        proc = subprocess.Popen([str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    rc = os.waitstatus_to_exitcode(status)
    if rc not in (0, 1):
        sys.exit(f"{' '.join(map(str, argv))} failed (exit {rc}); see {log}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss * 1024 / MB, 1), "log": str(log)}


def gemport(*args) -> list:
    return [sys.executable, "-m", "gemport.cli", *args]


def perplexity(tool: Path, model: Path, text: Path, *extra) -> list:
    return [tool, "-m", model, "-f", text, "-c", N_CTX, "--chunks", WINDOWS, "-t", THREADS, *SAFE_CPU_ARGS, *extra]


def llama_kld(log: Path) -> float | None:
    """The mean KLD llama-perplexity printed (ref: tools/perplexity/perplexity.cpp, kl_divergence():
    ``Mean    KLD: %10.6f ± %10.6f``)."""
    m = re.search(r"Mean\s+KLD:\s+(-?[\d.]+)", log.read_text(errors="replace"))
    return float(m.group(1)) if m else None


def ensure_gguf(out: Path, name: str, args: list[str]) -> Path:
    path = out / name
    if not path.is_file():
        run(gemport("convert", REFERENCE, path, *args), out / f"{name}.log")
    return path


def demo(out: Path, tool: Path) -> dict:
    from validation.corpus import load_text, split_text

    text = out / "evaluation.txt"
    text.write_text(split_text(load_text(None))[0], encoding="utf-8")
    f16 = ensure_gguf(out, "demo.f16.gguf", ["--to", "gguf", "--dtype", "f16"])
    q4 = ensure_gguf(out, "demo.q4_k_m.gguf", ["--to", "gguf", "--quant", "q4_k_m"])
    base, cache = out / "base.dat", out / "cache-demo"
    base.unlink(missing_ok=True)
    shutil.rmtree(cache, ignore_errors=True)
    logs = out / "logs"
    r: dict = {"llama_cold": run(perplexity(tool, f16, text, "--kl-divergence-base", base), logs / "llama-base.log")}
    kld_args = ("--kl-divergence-base", base, "--kl-divergence")
    r["llama_warm"] = run(perplexity(tool, q4, text, *kld_args), logs / "llama-kld.log")
    r["llama_kld"] = llama_kld(logs / "llama-kld.log")
    common = ["validate", q4, "--reference", REFERENCE, "--windows", WINDOWS, "--ctx", N_CTX]
    for step, extra in (("gemport_cold", ["--reference-cache", cache]), ("gemport_warm", ["--reference-cache", cache])):
        r[step] = run(gemport(*common, *extra, "--json", logs / f"{step}.json"), logs / f"{step}.log")
    r["gemport_live"] = run(gemport(*common, "--no-reference-cache", "--json", logs / "live.json"), logs / "live.log")
    warm, live = (json.loads((logs / f"{n}.json").read_text())["metrics"] for n in ("gemport_warm", "live"))
    r.update(
        kld_warm=warm["kld"],
        kld_live=live["kld"],
        kld_rel_diff=abs(warm["kld"] - live["kld"]) / abs(live["kld"]),
        ppl_equal=warm["ppl_cand"] == live["ppl_cand"] and warm["ppl_ref"] == live["ppl_ref"],
        top1_equal=warm["top1_pct"] == live["top1_pct"],
        cache_bytes=sum(p.stat().st_size for p in cache.iterdir()),
        time_ratio=r["gemport_warm"]["wall_s"] / r["llama_warm"]["wall_s"],
        rss_ratio=r["gemport_warm"]["peak_rss_mb"] / r["llama_warm"]["peak_rss_mb"],
        cold_time_ratio=r["gemport_cold"]["wall_s"] / (r["llama_cold"]["wall_s"] + r["llama_warm"]["wall_s"]),
    )
    return r


def seven_b(out: Path, tool: Path) -> dict:
    text, cache, logs = out / "evaluation.txt", out / "cache-7b", out / "logs"
    shutil.rmtree(cache, ignore_errors=True)
    refcache = [sys.executable, "-m", "validation.refcache", "--reference", MODEL_7B, "--cache", cache]
    r: dict = {"reference": run([*refcache, "--windows", WINDOWS, "--ctx", N_CTX], logs / "7b-reference.log")}
    for quant, path in GGUF_7B.items():
        if not path.is_file():
            r[quant] = {"skipped": f"{path} missing"}
            continue
        common = ["validate", path, "--reference", MODEL_7B, "--windows", WINDOWS, "--ctx", N_CTX]
        ours = run(gemport(*common, "--reference-cache", cache, "--no-default-gates"), logs / f"7b-{quant}.log")
        theirs = run(perplexity(tool, path, text), logs / f"7b-{quant}-llama.log")
        r[quant] = {"gemport": ours, "llama": theirs, "rss_over_llama_mb": ours["peak_rss_mb"] - theirs["peak_rss_mb"]}
    return r


def row(label: str, m: dict) -> str:
    return f"| {label} | {m['wall_s']:.1f} | {m['peak_rss_mb']:.0f} |"


def table(r: dict) -> str:
    d = r["demo"]
    rows = [
        "| 270M off-grid, GGUF Q4_K_M, 4 x 512 | wall s | peak RSS MB |",
        "|---|---:|---:|",
        row("llama-perplexity, base from F16 (cold)", d["llama_cold"]),
        row("llama-perplexity --kl-divergence (warm)", d["llama_warm"]),
        row("gemport validate, cache computed (cold)", d["gemport_cold"]),
        row("gemport validate, cache reused (warm)", d["gemport_warm"]),
        row("gemport validate --no-reference-cache", d["gemport_live"]),
        "",
        f"warm: time {d['time_ratio']:.2f}x llama.cpp's (target <= 1.5), peak RSS {d['rss_ratio']:.2f}x "
        f"(target <= 1.2); cold: {d['cold_time_ratio']:.2f}x llama.cpp's base + KLD runs",
        f"KLD cached {d['kld_warm']:.9g}, whole-model reference {d['kld_live']:.9g} (relative difference "
        f"{d['kld_rel_diff']:.2g}; ppl equal: {d['ppl_equal']}, top-1 equal: {d['top1_equal']}); llama.cpp's KLD "
        f"against its F16 base {d['llama_kld']}",
    ]
    if "7b" in r:
        s = r["7b"]
        rows += [
            "",
            "| synthetic Gemma 1 7B, 4 x 512 | wall s | peak RSS MB |",
            "|---|---:|---:|",
            row("layer-streamed fp32 reference into the cache", s["reference"]),
        ]
        for quant in GGUF_7B:
            if "skipped" in s[quant]:
                rows.append(f"| {quant}: skipped ({s[quant]['skipped']}) | | |")
                continue
            rows.append(row(f"{quant}: gemport validate (cached reference)", s[quant]["gemport"]))
            rows.append(row(f"{quant}: llama-perplexity", s[quant]["llama"]))
            over = s[quant]["rss_over_llama_mb"]
            rows.append(f"| {quant}: gemport's peak RSS over llama.cpp's (target <= 1024 MB) | | {over:+.0f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "build" / "bench" / "validate")
    p.add_argument("--skip-7b", action="store_true", help="part 1 only")
    p.add_argument("--only-7b", action="store_true", help="part 2 only (part 1's results kept from OUT/bench.json)")
    args = p.parse_args()
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    tool = ensure_tools().perplexity
    path = args.out / "bench.json"
    result = json.loads(path.read_text()) if args.only_7b and path.is_file() else {}
    if not args.only_7b:
        result["demo"] = demo(args.out, tool)
    if not args.skip_7b:
        result["7b"] = seven_b(args.out, tool)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
