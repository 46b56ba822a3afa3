"""The report of an artifact build: one table (report.md), its rows as JSON (report.json) and one plot
(report.png) of every artifact in a build manifest (gemport/artifacts/builder.py writes it), and the
merge of the manifests of partial builds of one recipe (a CI matrix of `gemport build --only NAME`).

A pure function of the manifests: nothing is loaded, built or validated again. Bits per weight are
not reported: the manifest holds no parameter count, and a file size over a guessed count would not
be honest (a folder's tokenizer and config files count in its size).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

from gemport.artifacts.builder import FORMAT
from gemport.errors import InputError
from gemport.output import atomic_output
from validation.metrics import scored_span
from validation.report import Gate, _fmt, _pm, plural

log = logging.getLogger(__name__)

OK = ("passed", "not-validated")  # the statuses that do not fail a build (gemport/artifacts/command.py)
METRICS = (
    "tokens",
    "ppl_ref",
    "ppl_ref_se",
    "ppl_cand",
    "ppl_cand_se",
    "delta_ppl_pct",
    "delta_ppl_pct_se",
    "kld",
    "kld_se",
    "top1_pct",
    "top1_pct_se",
)
NUMBER = (int, float)
NON_NEGATIVE = ("bytes", "wall_s", "peak_rss_mb", "ctx", "windows", "tokens")
NOT_MEASURED = {
    "build-failed": "build failed",
    "validation-failed": "validation error",
    "not-validated": "not validated",
}
HEADER = (
    "artifact",
    "format",
    "runtime",
    "size MB",
    "ppl",
    "delta-ppl %",
    "KLD",
    "top-1 %",
    "gates",
    "build s",
    "validation s",
    "peak RSS MB",
)


# ---------------------------------------------------------------------- the manifest's shape


def _need(value: Any, kind: type | tuple[type, ...], field: str, where: str | Path) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # JSON true is no number
        expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise InputError(f"not a gemport build manifest: {field} is {type(value).__name__}, not {expected}", where)
    if isinstance(value, float) and not math.isfinite(value):  # Metrics.to_json writes null for these
        raise InputError(f"not a gemport build manifest: {field} is {value} (non-finite numbers are null)", where)
    if isinstance(value, NUMBER) and value < 0 and field.endswith(NON_NEGATIVE):
        raise InputError(f"not a gemport build manifest: {field} is negative ({value})", where)
    return value


def check(manifest: Any, where: str | Path = "manifest.json") -> dict[str, Any]:
    """``manifest`` if it has the fields render() and merge() read, of the right types; else an
    InputError naming ``where`` and the field."""
    _need(manifest, dict, "the top level", where)
    if manifest.get("format") != FORMAT:
        raise InputError(f"not a gemport build manifest (format {FORMAT!r}, found {manifest.get('format')!r})", where)
    for key in ("recipe", "source", "reference", "protocol", "artifacts"):
        _need(manifest.get(key), dict, key, where)
    _need(manifest["recipe"].get("name"), str, "recipe.name", where)
    for key in ("recipe", "source", "reference"):
        _need(manifest[key].get("sha256"), str, f"{key}.sha256", where)
    protocol = manifest["protocol"]
    _need(protocol.get("corpus"), (str, type(None)), "protocol.corpus", where)
    for key in ("ctx", "windows"):
        _need(protocol.get(key), int, f"protocol.{key}", where)
    for name, art in manifest["artifacts"].items():
        _check_artifact(art, f"artifacts.{name}", where)
    return manifest


def _check_artifact(art: Any, field: str, where: str | Path) -> None:
    _need(art, dict, field, where)
    _need(art.get("status"), str, f"{field}.status", where)
    entry = _need(art.get("entry", {}), dict, f"{field}.entry", where)
    _need(entry.get("format"), (str, type(None)), f"{field}.entry.format", where)
    _need(art.get("bytes"), (*NUMBER, type(None)), f"{field}.bytes", where)
    for step in ("build", "validation"):
        record = _need(art.get(step), (dict, type(None)), f"{field}.{step}", where) or {}
        for key in ("wall_s", "peak_rss_mb"):
            _need(record.get(key), (*NUMBER, type(None)), f"{field}.{step}.{key}", where)
    report = _need((art.get("validation") or {}).get("report"), (dict, type(None)), f"{field}.report", where)
    if report is None:
        return
    metrics = _need(report.get("metrics"), dict, f"{field}.report.metrics", where)
    for key in METRICS:
        _need(metrics.get(key), (*NUMBER, type(None)), f"{field}.report.metrics.{key}", where)
    _need(report.get("runtime"), dict, f"{field}.report.runtime", where)
    for i, gate in enumerate(_need(report.get("gates"), list, f"{field}.report.gates", where)):
        _need(gate, dict, f"{field}.report.gates[{i}]", where)
        _need(gate.get("name"), str, f"{field}.report.gates[{i}].name", where)
        _need(gate.get("passed"), bool, f"{field}.report.gates[{i}].passed", where)
        for key in ("value", "limit"):
            _need(gate.get(key), (*NUMBER, type(None)), f"{field}.report.gates[{i}].{key}", where)


# ---------------------------------------------------------------------- merge


def merge(manifests: list[dict], paths: list[str | Path] | None = None) -> dict[str, Any]:
    """One manifest of the artifacts of ``manifests``, partial builds of one recipe (``paths``: where each
    was read, for the errors). They must agree on the recipe, source and reference (sha256) and the
    protocol; an artifact in several must have the same ``inputs``, and the validated record is kept.
    Artifacts come in the order of the first manifest that lists each."""
    if not manifests:
        raise InputError("no build manifest to merge")
    names = (
        [str(p) for p in paths] if paths else [f"manifest {i + 1} of {len(manifests)}" for i in range(len(manifests))]
    )
    first = check(manifests[0], names[0])
    artifacts: dict[str, dict] = {}
    owner: dict[str, str] = {}
    for manifest, where in zip(manifests, names, strict=True):
        check(manifest, where)
        for field, value, expected in _header_fields(manifest, first):
            if value != expected:
                raise InputError(f"{field} differs from {names[0]}'s ({value!r} != {expected!r})", where)
        for name, record in manifest["artifacts"].items():
            old = artifacts.get(name)
            if old is not None and old.get("inputs") != record.get("inputs"):
                raise InputError(f"artifact {name!r} was built from other inputs than in {owner[name]}", where)
            if old is None or _rank(record) > _rank(old):
                artifacts[name], owner[name] = record, where
    return copy.deepcopy({**first, "artifacts": artifacts})


def _header_fields(manifest: dict, first: dict) -> list[tuple[str, Any, Any]]:
    return [
        ("recipe sha256", manifest["recipe"]["sha256"], first["recipe"]["sha256"]),
        ("source sha256", manifest["source"]["sha256"], first["source"]["sha256"]),
        ("reference sha256", manifest["reference"]["sha256"], first["reference"]["sha256"]),
        ("protocol", manifest["protocol"], first["protocol"]),
    ]


def _rank(record: dict) -> int:
    """Which of two records of one artifact to keep: a validation's report, then a validation, then a build."""
    validation = record.get("validation") or {}
    return 3 if validation.get("report") else 2 if validation else 1 if record.get("status") != "build-failed" else 0


# ---------------------------------------------------------------------- rows


def rows(manifest: dict) -> list[dict[str, Any]]:
    """One machine-readable row per artifact, in manifest order."""
    return [_row(name, art) for name, art in manifest["artifacts"].items()]


def _row(name: str, art: dict) -> dict[str, Any]:
    entry = art.get("entry") or {}
    build = art.get("build") or {}
    validation = art.get("validation") or {}
    report = validation.get("report") or {}
    metrics = report.get("metrics") or {}
    peaks = [s["peak_rss_mb"] for s in (build, validation) if s.get("peak_rss_mb") is not None]
    size = art.get("bytes")
    return {
        "name": name,
        "status": art["status"],
        "format": entry.get("format"),
        "variant": _variant(entry),
        "from": entry.get("from"),
        "runtime": (report.get("runtime") or {}).get("name"),
        "runtime_kind": (report.get("runtime") or {}).get("kind"),
        "bytes": size,
        "size_mb": None if size is None else size / 1e6,
        "measured": bool(metrics),
        **{key: metrics.get(key) for key in METRICS},
        "gates": [
            {k: g.get(k) for k in ("name", "passed", "value", "limit", "source")} for g in report.get("gates", [])
        ],
        "build_s": build.get("wall_s"),
        "build_reused": bool(build.get("reused")),
        "validation_s": validation.get("wall_s"),
        "validation_reused": bool(validation.get("reused")),
        "peak_rss_mb": max(peaks) if peaks else None,
        "why": _why(art, report),
    }


def _variant(entry: dict) -> str:
    """What the entry makes of its format: ``gptq q4_k_m``, ``gptq int4 g128``, ``f32``."""
    parts = [entry.get("method"), entry.get("quant"), entry.get("dtype")]
    if entry.get("bits") is not None and not entry.get("quant"):
        parts.append(f"int{entry['bits']}")
    if entry.get("group_size") is not None:
        parts.append(f"g{entry['group_size']}")
    return " ".join(str(p) for p in parts if p)


def _why(art: dict, report: dict) -> str | None:
    """Why the artifact failed, one line; None when it did not."""
    status = art["status"]
    if status in OK:
        return None
    if status == "gate-failed":
        return "gate failed: " + "; ".join(_gate_text(g) for g in report.get("gates", []) if not g["passed"])
    step = art.get("build" if status == "build-failed" else "validation") or {}
    code = f" (exit {step['exit_code']})" if step.get("exit_code") is not None else ""
    error = art.get("error") or "no error recorded"
    return f"{status.replace('-', ' ')}{code}: {error}"


def _gate_text(g: dict) -> str:
    value = math.nan if g.get("value") is None else g["value"]
    if g["name"] == "finite" or (g["name"] in ("max-kld", "max-ppl-delta") and g.get("limit") is not None):
        return Gate(g["name"], value, g.get("limit"), g["passed"], g.get("source") or "always").describe()
    if g["name"] == "min-top1":  # the builder's gate (gemport/artifacts/builder.py _add_top1_gate)
        return f"top-1 {_fmt(value, '.2f')} % {'>=' if g['passed'] else '<'} {g.get('limit')} % ({g.get('source')})"
    return f"{g['name']} {_fmt(value, '.6g')}, limit {g.get('limit')} ({g.get('source')})"


# ---------------------------------------------------------------------- report.md


def _cells(row: dict) -> list[str]:
    fmt = " ".join(p for p in (row["format"] or "?", row["variant"]) if p)
    fmt += f" (from {row['from']})" if row["from"] else ""
    # the runtime's name without its details in parentheses (report.json has them)
    runtime = f"{str(row['runtime']).split(' (')[0]} ({row['runtime_kind']})" if row["runtime"] else "-"
    size = "-" if row["size_mb"] is None else f"{row['size_mb']:.1f}"
    if not row["measured"]:
        metrics = ["-"] * 4
        gates = NOT_MEASURED.get(row["status"], row["status"])
    else:
        metrics = [
            _metric(row, "ppl_cand", ".4f"),
            _metric(row, "delta_ppl_pct", "+.4f"),
            _metric(row, "kld", ".6f"),
            _metric(row, "top1_pct", ".2f"),
        ]
        gates = _gates_cell(row["gates"])
    peak = "-" if row["peak_rss_mb"] is None else f"{row['peak_rss_mb']:.0f}"
    times = [_seconds(row["build_s"], row["build_reused"]), _seconds(row["validation_s"], row["validation_reused"])]
    return [row["name"], fmt, runtime, size, *metrics, gates, *times, peak]


def _metric(row: dict, key: str, fmt: str) -> str:
    if row[key] is None:
        return "not finite"
    se = row.get(f"{key}_se")
    return _pm(row[key], math.nan if se is None else se, fmt)


def _gates_cell(gates: list[dict]) -> str:
    failed = [g for g in gates if not g["passed"]]
    shown = ", ".join(g["name"] + ("" if g["limit"] is None else f" {g['limit']:g}") for g in failed or gates)
    return f"{'FAIL' if failed else 'PASS'} ({shown})" if shown else "PASS"


def _seconds(value: float | None, reused: bool) -> str:
    return "-" if value is None else f"{value:.1f}" + ("*" if reused else "")


def _short(part: dict) -> str:
    return f"`{part.get('path')}` (sha256 {part['sha256'][:12]})"


def protocol_text(protocol: dict) -> str:
    first, count = scored_span(protocol["ctx"])
    corpus = protocol["corpus"] or "pydoc topics (default)"
    return (
        f"{corpus}, {plural(protocol['windows'], 'window')} x {protocol['ctx']} tokens, BOS first, "
        f"scored from position {first} ({count} tokens per window)"
    )


def _reference_line(manifest: dict, table: list[dict]) -> str:
    line = f"- reference: {_short(manifest['reference'])}"
    scored = next((r for r in table if r["ppl_ref"] is not None), None)
    if scored is not None:
        se = math.nan if scored["ppl_ref_se"] is None else scored["ppl_ref_se"]
        line += f", ppl {_pm(scored['ppl_ref'], se, '.4f')}"
    return line


def markdown(manifest: dict, table: list[dict]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [
        f"# {manifest['recipe']['name']}: artifact build report",
        "",
        f"- recipe: {_short(manifest['recipe'])}, gemport {manifest.get('gemport', '?')}",
        f"- source: {_short(manifest['source'])}",
        _reference_line(manifest, table),
        f"- protocol: {protocol_text(manifest['protocol'])}",
        "",
        line(list(HEADER)),
        line(["---"] * len(HEADER)),
        *(line(_cells(row)) for row in table),
        "",
    ]
    if any(r["build_reused"] or r["validation_reused"] for r in table):
        lines += ["\\* reused from an earlier run: the time and memory of that run.", ""]
    failed = [r for r in table if r["why"]]
    lines += [f"- **{r['name']}**: {r['why']}" for r in failed] + ([""] if failed else [])
    lines += ["![report](report.png)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------- report.png

COLOURS = {"gguf": "tab:blue", "hf": "tab:orange", "onnx": "tab:green", "jax": "tab:red", "trtllm": "tab:purple"}
OTHER_COLOURS = ("tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
KLD_FLOOR_MIN = 1e-6  # a KLD below it (an f16 copy: 1e-9) would stretch the axis over empty decades
# label positions tried around a point, in points, nearest first (the first free one is taken)
OFFSETS = [(6, 5), (6, -5), (-6, 5), (-6, -5), (0, 12), (0, -12)]
OFFSETS += [
    (dx * k, dy * k) for k in (2, 3, 4) for dx, dy in ((8, 10), (8, -10), (-8, 10), (-8, -10), (14, 0), (-14, 0))
]


def plot(manifest: dict, table: list[dict], dst: Path) -> None:
    """Two panels, size (MB, log) against mean KLD (log) and against top-1 agreement; one colour per format.
    Artifacts without a number are listed under the plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no display, no pyplot state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 6.5), dpi=110)
    FigureCanvasAgg(fig)
    missing = _not_drawn(table)
    fig.subplots_adjust(left=0.06, right=0.985, top=0.8, bottom=0.13 + 0.025 * len(missing), wspace=0.16)
    left, right = fig.subplots(1, 2)
    colours = _colours(table)
    floor = _draw_kld(left, table, colours)
    _draw_top1(right, table, colours)
    fig.suptitle(f"{manifest['recipe']['name']}: artifact size against agreement with the reference", fontsize=13)
    fig.text(0.5, 0.905, protocol_text(manifest["protocol"]), ha="center", fontsize=9, color="dimgray")
    failed = any(r["status"] == "gate-failed" and r["measured"] for r in table)
    _legend(fig, colours, floor if any(_at_floor(r, floor) for r in table) else None, failed)
    for i, text in enumerate(missing):
        fig.text(0.06, 0.02 + 0.025 * (len(missing) - 1 - i), text, fontsize=8.5, color="dimgray")
    fig.savefig(dst, format="png")


def _colours(table: list[dict]) -> dict[str, str]:
    formats = list(dict.fromkeys(r["format"] or "?" for r in table if r["measured"]))
    others = iter(OTHER_COLOURS * len(formats))
    return {f: COLOURS.get(f) or next(others) for f in formats}


def _not_drawn(table: list[dict]) -> list[str]:
    """One line per kind of absence: no metrics (and why), a KLD or top-1 that is not finite."""
    lines = []
    absent = [f"{r['name']} ({NOT_MEASURED.get(r['status'], r['status'])})" for r in table if not r["measured"]]
    if absent:
        lines.append("Not drawn, no metrics: " + ", ".join(absent))
    for key, what in (("kld", "KLD"), ("top1_pct", "top-1")):
        bad = [r["name"] for r in table if r["measured"] and r[key] is None]
        if bad:
            lines.append(f"Not drawn, {what} not finite: " + ", ".join(bad))
    return lines


def _kld_floor(table: list[dict]) -> float:
    """The KLD axis' floor: the decade below the smallest positive KLD, at least KLD_FLOOR_MIN."""
    positive = [r["kld"] for r in table if r["measured"] and r["kld"] is not None and r["kld"] > 0]
    if not positive:
        return 1e-3
    return max(KLD_FLOOR_MIN, 10 ** math.floor(math.log10(min(positive))))


def _at_floor(row: dict, floor: float) -> bool:
    return row["measured"] and row["kld"] is not None and row["kld"] < floor


def _draw_kld(ax, table: list[dict], colours: dict[str, str]) -> float:
    floor = _kld_floor(table)
    drawn = [r for r in table if r["measured"] and r["kld"] is not None and r["size_mb"]]
    points = [(r["size_mb"], max(r["kld"], floor)) for r in drawn]
    for r, (x, y) in zip(drawn, points, strict=True):
        _point(ax, x, y, r, colours, "v" if _at_floor(r, floor) else "o")
    top = max([y for _, y in points] + [floor * 10])
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, top * 3)
    if any(_at_floor(r, floor) for r in drawn):
        ax.axhline(floor, color="gray", linestyle=":", linewidth=1)
    ax.set_ylabel("mean KL divergence to the reference (nats, log scale)")
    ax.set_title("size against KLD (lower is better)", fontsize=11)
    _size_axis(ax, [x for x, _ in points])
    _label(ax, points, drawn)
    return floor


def _draw_top1(ax, table: list[dict], colours: dict[str, str]) -> None:
    drawn = [r for r in table if r["measured"] and r["top1_pct"] is not None and r["size_mb"]]
    points = [(r["size_mb"], r["top1_pct"]) for r in drawn]
    for r, (x, y) in zip(drawn, points, strict=True):
        _point(ax, x, y, r, colours, "o")
    low = min([y for _, y in points] + [99.0])
    ax.set_ylim(low - (100.5 - low) * 0.15, 100.5 + (100.5 - low) * 0.1)
    ax.axhline(100, color="gray", linestyle=":", linewidth=1)
    ax.set_ylabel("top-1 agreement with the reference (%)")
    ax.set_title("size against top-1 agreement (higher is better)", fontsize=11)
    _size_axis(ax, [x for x, _ in points])
    _label(ax, points, drawn)


def _point(ax, x: float, y: float, row: dict, colours: dict[str, str], marker: str) -> None:
    """One artifact's point: its format's colour, a red rim when a gate failed."""
    failed = row["status"] == "gate-failed"
    edge, width = ("firebrick", 2.2) if failed else ("black", 0.8)
    ax.scatter(
        [x], [y], s=60, marker=marker, color=colours[row["format"] or "?"], edgecolor=edge, linewidth=width, zorder=3
    )


def _size_axis(ax, sizes: list[float]) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")

    low, high = (min(sizes), max(sizes)) if sizes else (1.0, 10.0)
    ax.set_xscale("log")
    ax.set_xlim(low / 1.35, high * 1.35)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(plain)
    # within a decade 1-2-5 leaves one or two labels: then the minor ticks (3, 4, 6, ...) are labelled too
    ax.xaxis.set_minor_formatter(plain if high / low < 8 else NullFormatter())
    ax.set_xlabel(r"artifact size (MB = $10^6$ bytes, log scale)")
    ax.grid(True, which="major", alpha=0.3)


def _legend(fig, colours: dict[str, str], floor: float | None, failed: bool) -> None:
    from matplotlib.lines import Line2D

    def handle(marker: str, colour: str, label: str, edge: str = "black", width: float = 0.8) -> Line2D:
        style = {"markeredgecolor": edge, "markeredgewidth": width, "linestyle": "", "markersize": 8}
        return Line2D([], [], marker=marker, color=colour, label=label, **style)

    handles = [handle("o", c, f) for f, c in colours.items()]
    if floor is not None:
        handles.append(handle("v", "white", f"KLD 0 or below {floor:g}, drawn at the floor"))
    if failed:
        handles.append(handle("o", "white", "a gate failed (red)", "firebrick", 2.2))
    if handles:
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.89), ncol=len(handles), frameon=False)


def _label(ax, points: list[tuple[float, float]], drawn: list[dict]) -> None:
    """Each point's name, at the first offset around it where the text overlaps no other label or point
    and stays inside the axes (else the offset with the least overlap), joined to it by a thin line."""
    renderer = ax.figure.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    marks = [_box(*ax.transData.transform(p), 5) for p in points]
    taken: list[tuple[float, float, float, float]] = []
    for i in sorted(range(len(points)), key=lambda j: points[j]):
        row = drawn[i]
        best = None
        for dx, dy in OFFSETS:
            text = _annotate(ax, points[i], (dx, dy), row)
            b = text.get_window_extent(renderer)
            box = (b.x0, b.y0, b.x1, b.y1)
            cost = sum(_overlap(box, t) for t in taken + marks) + _outside(box, inside)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, text, box)
            else:
                text.remove()
            if cost == 0:
                break
        taken.append(best[2])


def _annotate(ax, point: tuple[float, float], offset: tuple[float, float], row: dict):
    dx, dy = offset
    failed = row["status"] == "gate-failed"
    return ax.annotate(
        row["name"],
        point,
        xytext=offset,
        textcoords="offset points",
        ha="left" if dx > 0 else "right" if dx < 0 else "center",
        va="bottom" if dy > 0 else "top" if dy < 0 else "center",
        fontsize=8,
        color="firebrick" if failed else "black",
        arrowprops={"arrowstyle": "-", "color": "gray", "linewidth": 0.6, "shrinkA": 1, "shrinkB": 4},
        zorder=4,
    )


def _box(x: float, y: float, r: float) -> tuple[float, float, float, float]:
    return (x - r, y - r, x + r, y + r)


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def _outside(box: tuple[float, ...], inside) -> float:
    area = (box[2] - box[0]) * (box[3] - box[1])
    return 10 * (area - _overlap(box, (inside.x0, inside.y0, inside.x1, inside.y1)))


# ---------------------------------------------------------------------- render


def render(manifest: dict, out_dir: Path, where: str | Path = "manifest.json") -> None:
    """report.md, report.json and report.png of ``manifest`` into ``out_dir``, each written atomically
    (gemport/output.py). ``where`` names the manifest in the InputError of a malformed one."""
    check(manifest, where)
    table = rows(manifest)
    summary = {
        "recipe": manifest["recipe"],
        "source": {k: manifest["source"].get(k) for k in ("path", "sha256")},
        "reference": {k: manifest["reference"].get(k) for k in ("path", "sha256")},
        "protocol": manifest["protocol"],
        "rows": table,
        "passed": all(r["status"] in OK for r in table),
    }
    out_dir = Path(out_dir)
    with atomic_output(out_dir / "report.md", overwrite=True) as tmp:
        tmp.write_text(markdown(manifest, table), encoding="utf-8")
    with atomic_output(out_dir / "report.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    with atomic_output(out_dir / "report.png", overwrite=True) as tmp:
        plot(manifest, table, tmp)
    log.info("wrote %s, %s and %s", out_dir / "report.md", out_dir / "report.json", out_dir / "report.png")
