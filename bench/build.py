"""Artifact builds: the reference cache against separate validations, and a resumed build (issue 16).

On the off-grid demo model, in one run:

1. ``gemport build recipes/gemma-3-270m.toml --out OUT`` from an empty OUT (wall time), then the same
   command again: the second run rebuilds and revalidates nothing, and its time is compared with the
   first's (target: under 10 %).
2. Eight artifacts of that build validated twice, side by side, 4 windows of 512 (each artifact's two
   validations back to back, after the cache is computed):
   - separate: ``gemport validate ART --reference REF --windows 4 --no-reference-cache`` for each, every
     call running the whole reference model itself (what a loop of validate calls cost before the cache);
   - cached: the reference's log-probs computed once into an empty cache folder
     (``python -m validation.refcache``), then ``gemport validate ART ... --reference-cache DIR`` for each;
   - the ratio of the totals (target: at most 0.6), and every artifact's KLD, delta-ppl and top-1 as the
     validation table prints them, which must be the same strings both ways.
3. The same eight in one ``gemport validate A1 .. A8 --reference REF --windows 4 --reference-cache DIR``
   call from an empty DIR: the reference's log-probs computed in that process, then each artifact scored
   in turn (one start and import for all); its time against the separate total, and its figures.
4. That call again, DIR now holding the cache: one start, the cache read, the eight candidates' own forward
   passes and scoring. Its ratio to the separate total is the floor of any reference cache, however cheap:
   what the candidates themselves cost, which the separate calls pay too.

    make demo-model gemma-venv
    .venv/bin/python bench/build.py [--out build/bench/build] [--skip-build]

Results: ``OUT/bench.json`` and a Markdown table on stdout (bench/RESULTS.md, "Artifact builds").
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from validation.report import _fmt, _pm  # noqa: E402  (the table's own formatting)

RECIPE = ROOT / "recipes" / "gemma-3-270m.toml"
REFERENCE = ROOT / "build" / "models" / "gemma-3-270m-offgrid"
EIGHT = (
    "gguf-f16",
    "gguf-q8_0",
    "gguf-q4_k_m",
    "gguf-gptq-q4_k_m",
    "hf-int8",
    "hf-gptq-int4",
    "onnx-int4",
    "trtllm-bf16-tp2",
)


def timed(args: list[str], log: Path) -> float:
    start = time.monotonic()
    with open(log, "wb") as out:
        rc = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc not in (0, 1):
        sys.exit(f"{' '.join(args)} failed (exit {rc}); see {log}")
    return time.monotonic() - start


def gemport(*args: str) -> list[str]:
    return [sys.executable, "-m", "gemport.cli", *args]


def printed(report: dict) -> dict[str, str]:
    """The metrics as the validation table prints them."""
    m = report["metrics"]
    return {
        "delta-ppl": _pm(m["delta_ppl_pct"], m["delta_ppl_pct_se"], "+.4f", " %"),
        "KLD": _pm(m["kld"], m["kld_se"], ".6f"),
        "top-1": _pm(m["top1_pct"], m["top1_pct_se"], ".2f", " %"),
        "ppl": _fmt(m["ppl_cand"], ".4f"),
    }


def validate_once(out: Path, manifest: dict, name: str, cache: Path | None, logs: Path) -> tuple[float, dict]:
    """(seconds, printed metrics) of one ``gemport validate`` of artifact ``name``; with ``cache`` the
    reference comes from it, else the call runs the whole reference itself (``--no-reference-cache``)."""
    path = out / manifest["artifacts"][name]["path"]
    report = logs / f"{name}.{'cached' if cache else 'separate'}.json"
    args = ["validate", str(path), "--reference", str(REFERENCE), "--windows", "4", "--json", str(report)]
    args += ["--reference-cache", str(cache)] if cache else ["--no-reference-cache"]
    seconds = timed(gemport(*args), report.with_suffix(".log"))
    return seconds, printed(json.loads(report.read_text()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "build" / "bench" / "build")
    p.add_argument("--skip-build", action="store_true", help="reuse OUT's build (step 1 not timed)")
    args = p.parse_args()
    out = args.out / "artifacts"
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    if not args.skip_build:
        shutil.rmtree(out, ignore_errors=True)
        result["first_build_s"] = timed(gemport("build", str(RECIPE), "--out", str(out)), logs / "build-1.log")
    result["second_build_s"] = timed(gemport("build", str(RECIPE), "--out", str(out)), logs / "build-2.log")
    manifest = json.loads((out / "manifest.json").read_text())
    result["rebuilt_on_second_run"] = [n for n, a in manifest["artifacts"].items() if not a["build"]["reused"]]

    cache = args.out / "reference-cache"
    shutil.rmtree(cache, ignore_errors=True)
    refcache = [sys.executable, "-m", "validation.refcache", "--reference", str(REFERENCE), "--cache", str(cache)]
    result["reference_cache_s"] = timed([*refcache, "--windows", "4"], logs / "refcache.log")
    # each artifact's two validations back to back, so that a slower stretch of the machine falls on both
    separate, cached, figures_separate, figures_cached = {}, {}, {}, {}
    for name in EIGHT:
        separate[name], figures_separate[name] = validate_once(out, manifest, name, None, logs)
        cached[name], figures_cached[name] = validate_once(out, manifest, name, cache, logs)
    shared = args.out / "reference-cache-one-call"
    shutil.rmtree(shared, ignore_errors=True)
    report = logs / "one-call.json"
    paths = [str(out / manifest["artifacts"][name]["path"]) for name in EIGHT]
    argv = ["validate", *paths, "--reference", str(REFERENCE), "--windows", "4", "--json", str(report)]
    result["one_call_s"] = timed(gemport(*argv, "--reference-cache", str(shared)), logs / "one-call.log")
    figures_one_call = {name: printed(r) for name, r in zip(EIGHT, json.loads(report.read_text()), strict=True)}
    result["one_call_warm_s"] = timed(gemport(*argv, "--reference-cache", str(shared)), logs / "one-call-warm.log")
    result.update(
        figures_one_call=figures_one_call,
        same_figures_one_call=figures_one_call == figures_separate,
        separate_s=separate,
        cached_s=cached,
        separate_total_s=sum(separate.values()),
        cached_total_s=result["reference_cache_s"] + sum(cached.values()),
        figures_separate=figures_separate,
        figures_cached=figures_cached,
        same_figures=figures_separate == figures_cached,
    )
    result["ratio"] = result["cached_total_s"] / result["separate_total_s"]
    result["one_call_ratio"] = result["one_call_s"] / result["separate_total_s"]
    result["one_call_warm_ratio"] = result["one_call_warm_s"] / result["separate_total_s"]
    (args.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def table(r: dict) -> str:
    rows = [
        "| artifact | separate validate s | with the cache s | KLD (separate) | KLD (cached) |",
        "|---|---:|---:|---|---|",
    ]
    for name in EIGHT:
        kld_s, kld_c = r["figures_separate"][name]["KLD"], r["figures_cached"][name]["KLD"]
        rows.append(f"| {name} | {r['separate_s'][name]:.1f} | {r['cached_s'][name]:.1f} | {kld_s} | {kld_c} |")
    rows.append(f"| reference log-probs, once | | {r['reference_cache_s']:.1f} | | |")
    rows.append(f"| **total** | {r['separate_total_s']:.1f} | {r['cached_total_s']:.1f} | | |")
    lines = [
        "\n".join(rows),
        "",
        f"cached / separate: {r['ratio']:.2f} (target <= 0.6); every printed figure the same: {r['same_figures']}",
        f"one `gemport validate` of all eight from an empty cache: {r['one_call_s']:.1f} s, "
        f"{r['one_call_ratio']:.2f} of the separate total; every printed figure the same: {r['same_figures_one_call']}",
        f"the same call with its cache present (the candidates' own share, the floor of any cache): "
        f"{r['one_call_warm_s']:.1f} s, {r['one_call_warm_ratio']:.2f} of the separate total",
    ]
    if "first_build_s" in r:
        share = r["second_build_s"] / r["first_build_s"]
        lines.append(
            f"build: first {r['first_build_s']:.0f} s, second {r['second_build_s']:.1f} s ({100 * share:.1f} %, "
            f"target < 10 %), rebuilt on the second run: {r['rebuilt_on_second_run'] or 'none'}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
