"""The `gemport build` and `gemport report` commands (argument parsing lives in gemport/cli.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from gemport.errors import GateFailed, InputError

log = logging.getLogger(__name__)

# statuses that fail a build (exit 1): "passed" and "not-validated" (an intermediate) do not
FAILED = ("gate-failed", "build-failed", "validation-failed")


def cmd_build(args) -> int:
    from gemport.artifacts.builder import Build
    from gemport.artifacts.recipe import load
    from gemport.progress import progress, stage

    recipe = load(args.recipe)
    names = [a.name for a in recipe.artifacts]
    for name in args.only or ():
        if name not in names:
            raise InputError(f"--only {name}: no such artifact (artifacts: {', '.join(names)})", args.recipe)
    if args.plan:
        print(json.dumps({"include": [{"name": n} for n in names]}))
        return 0
    out = args.out or Path("build") / "artifacts" / recipe.name
    todo = recipe.closure(args.only) if args.only else list(recipe.artifacts)
    with progress(f"building {recipe.name}", total=len(todo), unit="artifacts") as advance:
        build = Build(recipe, out, args.only, args.jobs, args.force, stage=stage, done=lambda name, rec: advance(1))
        if args.executor == "ray":
            from gemport.artifacts.ray_executor import run_on_ray

            manifest = run_on_ray(build)
        else:
            manifest = build.run()
    return _finish(manifest, out, [a.name for a in todo])


def cmd_report(args) -> int:
    from gemport.artifacts.builder import MANIFEST, load_manifest
    from gemport.artifacts.report import merge
    from gemport.output import atomic_output

    manifests = [load_manifest(d) for d in args.dirs]
    merged = merge(manifests, paths=[d / MANIFEST if d.is_dir() else d for d in args.dirs])
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out / "manifest.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(merged, indent=2) + "\n")
    return _finish(merged, args.out, list(merged["artifacts"]))


def _finish(manifest: dict, out: Path, names: list[str]) -> int:
    """Write the report, print its table, exit 1 (GateFailed) if any of ``names`` failed."""
    from gemport.artifacts.report import render

    render(manifest, out, where=out / "manifest.json")
    table = (out / "report.md").read_text().split("![")[0].rstrip()
    print(table)
    print(f"\nreport: {out / 'report.md'}, {out / 'report.png'}; manifest: {out / 'manifest.json'}")
    records = manifest["artifacts"]
    failed = [n for n in names if records.get(n, {}).get("status") in FAILED]
    if failed:
        why = "; ".join(f"{n}: {_why(records[n])}" for n in failed)
        raise GateFailed(f"{len(failed)} of {len(names)} artifacts failed: {why}", out)
    return 0


def _why(record: dict) -> str:
    status = record["status"]
    if status == "gate-failed":
        gates = (record.get("validation") or {}).get("report", {}).get("gates", [])
        return "gate " + ", ".join(g["name"] for g in gates if not g["passed"])
    return f"{status.replace('-', ' ')}: {record.get('error', '')}".rstrip(": ")
