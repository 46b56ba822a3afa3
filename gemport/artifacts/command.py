"""The `gemport build` and `gemport report` commands (argument parsing lives in gemport/cli.py)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from gemport.artifacts.builder import Interrupted
from gemport.errors import GateFailed, InputError, OutputError

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
        print(json.dumps({"include": [{"name": n} for n in names if not args.only or n in args.only]}))
        return 0
    out = args.out or Path("build") / "artifacts" / recipe.name
    if out.exists() and not out.is_dir():
        raise OutputError("is a file; --out takes a folder", out)
    todo = recipe.closure(args.only) if args.only else list(recipe.artifacts)
    with progress(f"building {recipe.name}", total=len(todo), unit="artifacts") as advance:

        def done(name: str, record: dict) -> None:
            advance(1)
            print(f"gemport: {name}: {_status_line(record)}", file=sys.stderr)

        build = Build(recipe, out, args.only, args.jobs, args.force, stage=stage, done=done)
        try:
            if args.executor == "ray":
                from gemport.artifacts.ray_executor import run_on_ray

                manifest = run_on_ray(build)
            else:
                manifest = build.run()
        except Interrupted:
            raise KeyboardInterrupt from None
    return _finish(manifest, out, [a.name for a in todo])


def _status_line(record: dict) -> str:
    """One line per finished artifact: 'built in 8 s, validated in 34 s: passed'."""
    steps = []
    for what, key in (("built", "build"), ("validated", "validation")):
        step = record.get(key) or {}
        if step:
            steps.append(f"{what} before (unchanged)" if step.get("reused") else f"{what} in {step['wall_s']:.0f} s")
    return ", ".join(steps) + f": {record['status']}" + (f" ({record['error']})" if record.get("error") else "")


def cmd_report(args) -> int:
    from gemport.artifacts.builder import MANIFEST, load_manifest
    from gemport.artifacts.report import merge
    from gemport.output import atomic_output

    if args.out.exists() and not args.out.is_dir():
        raise OutputError("is a file; --out takes a folder", args.out)
    manifests = [load_manifest(d) for d in args.dirs]
    for folder, manifest in zip(args.dirs, manifests, strict=True):
        base = folder if folder.is_dir() else folder.parent
        for record in manifest["artifacts"].values():  # the merged manifest points at each artifact's files
            record["path"] = os.path.relpath(base.resolve() / record["path"], args.out.resolve())
    merged = merge(manifests, paths=[d / MANIFEST if d.is_dir() else d for d in args.dirs])
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out / MANIFEST, overwrite=True) as tmp:
        tmp.write_text(json.dumps(merged, indent=2) + "\n")
    planned = [n for m in manifests for n in m.get("planned", [])]
    missing = [n for n in dict.fromkeys(planned) if n not in merged["artifacts"]]
    code = _finish(merged, args.out, list(merged["artifacts"]))
    if missing:
        raise GateFailed(f"not built in any of the folders: {', '.join(missing)}", args.out)
    return code


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
