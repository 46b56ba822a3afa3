"""gemport/artifacts/report.py: report.md / report.json / report.png of a build manifest, and merge()."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest

from gemport.artifacts.report import merge, render
from gemport.errors import InputError

PPL_REF = 21.5


def _report(runtime: str, kind: str, kld: float | None, top1: float, dppl: float, max_kld: float | None) -> dict:
    """validation.report.Report.to_json() of one artifact, the fields the report reads."""
    metrics = {
        "tokens": 1020,
        "ppl_ref": PPL_REF,
        "ppl_ref_se": 0.75,
        "ppl_cand": PPL_REF * (1 + dppl / 100),
        "ppl_cand_se": 0.77,
        "delta_ppl_pct": dppl,
        "delta_ppl_pct_se": 0.05,
        "kld": kld,
        "kld_se": None if kld == 0 else 0.0004,
        "top1_pct": top1,
        "top1_pct_se": 0.3,
    }
    gates = [{"name": "finite", "value": kld, "limit": None, "source": "always", "passed": kld is not None}]
    if max_kld is not None:
        passed = kld is not None and kld <= max_kld
        gates.append({"name": "max-kld", "value": kld, "limit": max_kld, "source": "recipe", "passed": passed})
    return {
        "reference": "ref",
        "candidate": "cand",
        "runtime": {"name": runtime, "kind": kind},
        "reference_runtime": "transformers",
        "metrics": metrics,
        "gates": gates,
        "warnings": [],
        "passed": all(g["passed"] for g in gates),
    }


def _artifact(name: str, entry: dict, mb: float, *, measured: tuple | None = None, status: str = "passed") -> dict:
    """A manifest record: ``measured`` is (runtime, kind, kld, top1, delta-ppl %, max_kld) when validated."""
    path = f"{name}.gguf" if entry["format"] == "gguf" else name
    record = {
        "name": name,
        "entry": {"name": name, **entry},
        "path": path,
        "files": [{"path": path, "bytes": int(mb * 1e6), "sha256": "0" * 64}],
        "bytes": int(mb * 1e6),
        "inputs": f"inputs-of-{name}",
        "versions": {"gemport": "0.1.0"},
        "build": {"command": ["gemport", "convert"], "wall_s": 10.25, "peak_rss_mb": 800.0, "exit_code": 0},
        "validation": None,
        "status": status,
    }
    if status == "build-failed":
        record.update(build={**record["build"], "exit_code": 2}, error="error: disk full", bytes=None, files=[])
    elif measured is not None:
        report = _report(*measured)
        record["validation"] = {
            "command": ["gemport", "validate"],
            "wall_s": 30.5,
            "peak_rss_mb": 2100.0,
            "exit_code": 0 if report["passed"] else 1,
            "reused": False,
            "report": report,
        }
        record["status"] = "passed" if report["passed"] else "gate-failed"
    return record


def manifest() -> dict:
    """A realistic build: 12 artifacts, 100 to 1100 MB, KLD 0 to 0.3, one of each failure."""
    arts = [
        _artifact(
            "gguf-f16",
            {"format": "gguf", "quant": "f16"},
            543.0,
            measured=("llama.cpp", "parity", 2e-5, 99.8, 0.01, None),
        ),
        _artifact(
            "gguf-q8_0",
            {"format": "gguf", "quant": "q8_0"},
            291.5,
            measured=("llama.cpp", "parity", 4e-4, 99.1, 0.1, 0.01),
        ),
        _artifact(
            "gguf-q4_k_m",
            {"format": "gguf", "quant": "q4_k_m"},
            253.0,
            measured=("llama.cpp (llama-cpp-python 0.3.36, CPU)", "parity", 0.31, 81.0, 9.5, 0.05),
        ),
        _artifact(
            "gguf-gptq-q4_k_m",
            {"format": "gguf", "method": "gptq", "bits": 4, "quant": "q4_k_m"},
            253.1,
            measured=("llama.cpp", "parity", 0.04, 92.5, 2.1, 0.05),
        ),
        _artifact(
            "hf-int8",
            {"format": "hf", "quant": "int8"},
            440.0,
            measured=("transformers", "parity", 6e-4, 98.9, 0.2, None),
        ),
        _artifact(
            "hf-gptq-int4",
            {"format": "hf", "method": "gptq", "bits": 4, "group_size": 128},
            380.0,
            measured=("transformers", "parity", 0.035, 93.0, 1.9, None),
        ),
        _artifact(
            "onnx-f32",
            {"format": "onnx", "dtype": "f32"},
            1100.0,
            measured=("onnxruntime", "parity", 0.0, 100.0, 0.0, None),
        ),
        _artifact("onnx-int4", {"format": "onnx", "quant": "int4"}, 310.0, status="build-failed"),
        _artifact("onnx-gptq-int4", {"format": "onnx", "from": "hf-gptq-int4"}, 305.0, status="not-validated"),
        _artifact(
            "jax-f32", {"format": "jax", "dtype": "f32"}, 1072.0, measured=("gemma", "parity", 1.5e-9, 100.0, 0.0, None)
        ),
        _artifact(
            "trtllm-bf16-tp2",
            {"format": "trtllm", "dtype": "bf16", "tp_size": 2},
            545.0,
            measured=("gemport layout", "layout", 1.2e-4, 99.5, 0.03, None),
        ),
        _artifact(
            "trtllm-w4a16-awq",
            {"format": "trtllm", "quant": "w4a16-awq"},
            110.0,
            measured=("gemport layout", "layout", 0.028, 94.2, 1.6, None),
        ),
    ]
    return {
        "format": "gemport-build/1",
        "gemport": "0.1.0",
        "recipe": {"path": "recipes/gemma-3-270m.toml", "sha256": "a" * 64, "name": "gemma-3-270m"},
        "source": {"path": "build/models/gemma-3-270m-offgrid", "sha256": "b" * 64},
        "reference": {"path": "build/models/gemma-3-270m-offgrid", "sha256": "b" * 64},
        "protocol": {"corpus": None, "ctx": 512, "windows": 4},
        "artifacts": {a["name"]: a for a in arts},
    }


def _table(md: str) -> list[list[str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[2:]]  # without header, rule


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    render(manifest(), out)
    return out


def test_files_and_nothing_else(rendered):
    assert sorted(p.name for p in rendered.iterdir()) == ["report.json", "report.md", "report.png"]


def test_markdown_table(rendered):
    md = (rendered / "report.md").read_text()
    m = manifest()
    assert md.startswith("# gemma-3-270m")
    assert "sha256 bbbbbbbbbbbb" in md and "ppl 21.5000 +/- 0.7500" in md
    assert "4 windows x 512 tokens" in md and "scored from position 256" in md
    rows = {r[0]: r for r in _table(md)}
    assert list(rows) == list(m["artifacts"])
    q4 = rows["gguf-q4_k_m"]
    assert q4[1:4] == ["gguf q4_k_m", "llama.cpp (parity)", "253.0"]
    assert q4[4:8] == [
        f"{PPL_REF * 1.095:.4f} +/- 0.7700",
        "+9.5000 +/- 0.0500",
        "0.310000 +/- 4.000e-04",
        "81.00 +/- 0.30",
    ]
    assert q4[8:] == ["FAIL (max-kld 0.05)", "10.2", "30.5", "2100"]
    assert rows["gguf-q8_0"][8] == "PASS (finite, max-kld 0.01)"
    assert rows["onnx-f32"][6] == "0.000000"  # no se: KLD exactly 0
    assert rows["jax-f32"][6] == "1.500e-09 +/- 4.000e-04"
    assert rows["hf-gptq-int4"][1] == "hf gptq int4 g128"
    assert rows["onnx-gptq-int4"][1] == "onnx (from hf-gptq-int4)"
    assert rows["onnx-int4"][3:] == ["-", "-", "-", "-", "-", "build failed", "10.2", "-", "800"]
    assert rows["onnx-gptq-int4"][8] == "not validated"
    why = [ln for ln in md.splitlines() if ln.startswith("- **")]
    assert why == [
        "- **gguf-q4_k_m**: gate failed: KLD 0.31 > 0.05 (recipe)",
        "- **onnx-int4**: build failed (exit 2): error: disk full",
    ]
    assert md.rstrip().endswith("![report](report.png)")


def test_json_rows(rendered):
    data = json.loads((rendered / "report.json").read_text())
    assert set(data) == {"recipe", "source", "reference", "protocol", "rows", "passed"}
    assert data["passed"] is False
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == list(manifest()["artifacts"])
    q4 = rows["gguf-q4_k_m"]
    assert (q4["status"], q4["format"], q4["variant"], q4["runtime_kind"]) == (
        "gate-failed",
        "gguf",
        "q4_k_m",
        "parity",
    )
    assert q4["runtime"] == "llama.cpp (llama-cpp-python 0.3.36, CPU)"
    assert (q4["kld"], q4["kld_se"], q4["top1_pct"], q4["size_mb"]) == (0.31, 0.0004, 81.0, 253.0)
    assert [(g["name"], g["passed"]) for g in q4["gates"]] == [("finite", True), ("max-kld", False)]
    assert (q4["build_s"], q4["validation_s"], q4["peak_rss_mb"]) == (10.25, 30.5, 2100.0)
    assert rows["onnx-int4"]["measured"] is False and rows["onnx-int4"]["kld"] is None
    assert rows["onnx-int4"]["why"] == "build failed (exit 2): error: disk full"
    assert rows["onnx-gptq-int4"]["why"] is None and rows["gguf-f16"]["why"] is None


def test_png(rendered):
    from matplotlib.image import imread

    image = imread(rendered / "report.png")
    height, width = image.shape[:2]
    assert (width, height) == (1540, 715)  # 14 x 6.5 inches at 110 dpi
    assert image[..., :3].std() > 0.05  # drawn, not blank


def test_passed_when_only_passed_and_intermediates(tmp_path):
    m = manifest()
    m["artifacts"] = {k: v for k, v in m["artifacts"].items() if v["status"] in ("passed", "not-validated")}
    render(m, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["passed"] is True
    assert "- **" not in (tmp_path / "report.md").read_text()


def test_non_finite_metric_is_said_not_drawn(tmp_path):
    m = manifest()
    report = m["artifacts"]["gguf-q8_0"]["validation"]["report"]
    report["metrics"].update(kld=None, ppl_cand=None, delta_ppl_pct=None)
    render(m, tmp_path)
    row = {r[0]: r for r in _table((tmp_path / "report.md").read_text())}["gguf-q8_0"]
    assert row[4:7] == ["not finite"] * 3


def _halves(whole: dict) -> tuple[dict, dict]:
    """Two --only builds: the second also built hf-gptq-int4 as onnx-gptq-int4's source, unvalidated."""
    names = list(whole["artifacts"])
    a, b = copy.deepcopy(whole), copy.deepcopy(whole)
    a["artifacts"] = {n: whole["artifacts"][n] for n in names[:6]}
    source = {**whole["artifacts"]["hf-gptq-int4"], "validation": None, "status": "not-validated"}
    b["artifacts"] = {"hf-gptq-int4": source, **{n: whole["artifacts"][n] for n in names[6:]}}
    b["reference"]["cache"] = {"path": ".reference-cache", "wall_s": 3.0}  # per-job, not compared
    return a, b


def test_merge_of_halves_is_the_whole(tmp_path):
    whole = manifest()
    a, b = _halves(whole)
    merged = merge([a, b])
    assert list(merged["artifacts"]) == list(whole["artifacts"])
    assert merged["artifacts"] == whole["artifacts"]
    # the unvalidated copy listed first is replaced by the validated one
    merged_ba = merge([b, a])
    assert merged_ba["artifacts"]["hf-gptq-int4"]["status"] == "passed"
    render(whole, tmp_path / "whole")
    render(merged, tmp_path / "merged")
    for name in ("report.md", "report.json", "report.png"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "merged" / name).read_bytes(), name


@pytest.mark.parametrize(
    ("part", "key", "value", "field"),
    [
        ("protocol", "ctx", 1024, "protocol"),
        ("recipe", "sha256", "c" * 64, "recipe sha256"),
        ("source", "sha256", "c" * 64, "source sha256"),
        ("reference", "sha256", "c" * 64, "reference sha256"),
    ],
)
def test_merge_mismatch_names_the_file(part, key, value, field):
    a, b = _halves(manifest())
    b[part][key] = value
    with pytest.raises(InputError, match=re.escape(f"ci/job-2/manifest.json: {field} differs from ci/job-1")):
        merge([a, b], paths=["ci/job-1/manifest.json", "ci/job-2/manifest.json"])


def test_merge_refuses_other_inputs_of_one_artifact():
    a, b = _halves(manifest())
    b["artifacts"]["hf-gptq-int4"]["inputs"] = "something else"
    with pytest.raises(InputError, match=r"job-2: artifact 'hf-gptq-int4' was built from other inputs than in job-1"):
        merge([a, b], paths=["job-1", "job-2"])


def _f16(m: dict) -> dict:
    return m["artifacts"]["gguf-f16"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format="other/1"), "not a gemport build manifest"),
        (lambda m: m["protocol"].update(ctx="512"), "protocol.ctx is str, not int"),
        (lambda m: _f16(m).update(bytes=True), "artifacts.gguf-f16.bytes is bool"),
        (lambda m: _f16(m).update(bytes=-5), "artifacts.gguf-f16.bytes is negative"),
        (lambda m: _f16(m).update(entry={"format": 3}), "entry.format is int, not str or null"),
        (lambda m: _f16(m)["validation"]["report"]["metrics"].update(kld="0.1"), "metrics.kld is str"),
        (lambda m: _f16(m)["validation"]["report"]["metrics"].update(kld=math.nan), "metrics.kld is nan"),
        (lambda m: _f16(m)["validation"]["report"].update(gates=[{}]), "gates[0].name is NoneType"),
    ],
)
def test_malformed_manifest_is_one_input_error(tmp_path, edit, message):
    m = manifest()
    edit(m)
    with pytest.raises(InputError, match=re.escape(message)):
        render(m, tmp_path, where="ci/manifest.json")
    with pytest.raises(InputError, match="^ci/x.json: "):
        merge([m], paths=["ci/x.json"])
    assert list(tmp_path.iterdir()) == []


def test_nothing_measured_still_renders(tmp_path):
    m = manifest()
    m["artifacts"] = {k: v for k, v in m["artifacts"].items() if v["status"] in ("build-failed", "not-validated")}
    render(m, tmp_path)
    assert len(_table((tmp_path / "report.md").read_text())) == 2
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gate_without_limit_is_described(tmp_path):
    m = manifest()
    gates = m["artifacts"]["gguf-q4_k_m"]["validation"]["report"]["gates"]
    gates[1]["limit"] = None
    gates.append({"name": "min-top1", "value": 81.0, "limit": 90.0, "source": "recipe", "passed": False})
    render(m, tmp_path)
    why = [ln for ln in (tmp_path / "report.md").read_text().splitlines() if ln.startswith("- **gguf-q4_k_m**")]
    assert why == ["- **gguf-q4_k_m**: gate failed: max-kld 0.31, limit None (recipe); top-1 81.00 % < 90.0 % (recipe)"]
