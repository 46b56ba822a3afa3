"""`gemport build` on recipes/tiny.toml: every artifact built and validated in its runtime, the manifest,
resuming, a killed build, --plan/--only/report, the Ray executor, and bad recipes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tiny import make_tiny

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.toml"
DEMO = ROOT / "recipes" / "gemma-3-270m.toml"


def gemport(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gemport.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=1200
    )


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """recipes/tiny.toml in a folder laid out as the repository: its model at ../build/tiny/gemma2."""
    root = tmp_path_factory.mktemp("recipe")
    # query_pre_attn_scalar = head_dim: llama.cpp's Gemma 2 assumes it (gemport refuses other values for GGUF)
    make_tiny("gemma2", root / "build" / "tiny" / "gemma2", query_pre_attn_scalar=16)
    (root / "recipes").mkdir()
    shutil.copy(TINY, root / "recipes" / "tiny.toml")
    return root / "recipes" / "tiny.toml"


@pytest.fixture(scope="module")
def first(recipe, tmp_path_factory) -> tuple[Path, dict, float]:
    """One full build: (output folder, manifest, wall seconds)."""
    out = tmp_path_factory.mktemp("build") / "out"
    start = time.monotonic()
    run = gemport("build", str(recipe), "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    return out, json.loads((out / "manifest.json").read_text()), time.monotonic() - start


def metrics(manifest: dict) -> dict:
    return {
        n: (a["validation"] or {}).get("report", {}).get("metrics") if a.get("validation") else None
        for n, a in manifest["artifacts"].items()
    }


def test_every_artifact_is_built_validated_and_recorded(first, recipe):
    out, manifest, _ = first
    names = ["q8_0", "int8", "gptq-int4", "onnx-gptq-int4", "trtllm-bf16-tp2"]
    assert list(manifest["artifacts"]) == names
    runtimes = {}
    for name, a in manifest["artifacts"].items():
        assert a["status"] == "passed", (name, a.get("error"))
        assert a["build"]["exit_code"] == 0 and a["build"]["wall_s"] > 0 and a["build"]["peak_rss_mb"] > 50
        assert a["build"]["command"][0] == "gemport" and not a["build"]["reused"]
        assert a["bytes"] == sum(f["bytes"] for f in a["files"]) > 0
        for f in a["files"]:  # the sha256 of every file is the file's
            assert hashlib.sha256((out / f["path"]).read_bytes()).hexdigest() == f["sha256"]
        report = a["validation"]["report"]
        assert report["metrics"]["tokens"] == 2 * (64 - 1 - 32)  # 2 windows of 64, second half scored
        runtimes[name] = report["runtime"]["name"]
        assert a["versions"]["gemport"]
    # each artifact was scored by its own runtime
    assert "llama.cpp" in runtimes["q8_0"] and "onnxruntime" in runtimes["onnx-gptq-int4"]
    assert "transformers" in runtimes["int8"]
    # the ONNX artifact was made from the GPTQ folder, not by a second GPTQ pass
    onnx = manifest["artifacts"]["onnx-gptq-int4"]["build"]["command"]
    assert onnx[1] == "convert" and onnx[2] == str(out / "gptq-int4")
    # the gate of the recipe was applied
    gates = manifest["artifacts"]["q8_0"]["validation"]["report"]["gates"]
    assert any(g["name"] == "max-kld" and g["limit"] == 0.05 and g["source"] == "--max-kld" for g in gates)
    # the reference was computed once, into the cache every validation read
    assert manifest["reference"]["cache"]["exit_code"] == 0
    caches = list((out / ".reference-cache").iterdir())
    assert len([c for c in caches if c.is_file() and not c.name.startswith(".")]) == 1
    for name in names:
        assert "--reference-cache" in manifest["artifacts"][name]["validation"]["command"]
    for report in ("report.md", "report.json", "report.png"):
        assert (out / report).stat().st_size > 0
    table = (out / "report.md").read_text()
    assert all(name in table for name in names)


def test_a_second_build_rebuilds_nothing_and_a_deleted_artifact_is_rebuilt_alone(first, recipe, tmp_path):
    out, manifest, _ = first
    copy = tmp_path / "out"
    shutil.copytree(out, copy, symlinks=True)
    # the copy's records point at the copy's files (paths are relative to the output folder)
    shutil.rmtree(copy / ".logs")
    again = gemport("build", str(recipe), "--out", str(copy))
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((copy / "manifest.json").read_text())
    # copytree keeps mtimes (copy2), so nothing changed
    assert all(a["build"]["reused"] and a["validation"]["reused"] for a in second["artifacts"].values())
    assert not any((copy / ".logs").glob("*.build.log"))
    assert metrics(second) == metrics(manifest)

    shutil.rmtree(copy / "int8")
    third = gemport("build", str(recipe), "--out", str(copy))
    assert third.returncode == 0, third.stderr[-3000:]
    third = json.loads((copy / "manifest.json").read_text())
    rebuilt = [n for n, a in third["artifacts"].items() if not a["build"]["reused"]]
    assert rebuilt == ["int8"]
    assert metrics(third) == metrics(manifest)  # the same figures, the reference from the cache


def test_a_changed_entry_rebuilds_that_artifact_and_what_is_built_from_it(first, recipe, tmp_path):
    out, manifest, _ = first
    copy = tmp_path / "out"
    shutil.copytree(out, copy, symlinks=True)
    changed = tmp_path / "recipes" / "tiny.toml"
    changed.parent.mkdir()
    text = recipe.read_text().replace("group_size = 32", "group_size = 32\ndamp = 0.02")
    changed.write_text(text.replace("../build/tiny/gemma2", str(recipe.parent.parent / "build" / "tiny" / "gemma2")))
    run = gemport("build", str(changed), "--out", str(copy))
    assert run.returncode == 0, run.stderr[-3000:]
    after = json.loads((copy / "manifest.json").read_text())
    rebuilt = sorted(n for n, a in after["artifacts"].items() if not a["build"]["reused"])
    assert rebuilt == ["gptq-int4", "onnx-gptq-int4"]


def test_a_build_killed_in_an_artifact_leaves_no_partial_artifact_and_the_next_run_completes(recipe, tmp_path):
    out = tmp_path / "out"
    child = _start_build(recipe, out, "--only", "gptq-int4")
    # kill once the GPTQ child is at work (its progress reaches the log) and its temporary exists
    _wait_for(".gptq-int4.partial-*", out, child)
    assert (out / ".logs" / "gptq-int4.build.log").is_file()
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert not (out / "gptq-int4").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert "gptq-int4" not in manifest["artifacts"]

    run = gemport("build", str(recipe), "--out", str(out), "--only", "gptq-int4")
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["artifacts"]["gptq-int4"]["status"] == "passed"
    assert not list(out.glob(".gptq-int4.partial-*"))  # the killed run's temporary is gone


def test_plan_only_and_report_give_the_report_of_one_build(first, recipe, tmp_path):
    out, manifest, _ = first
    plan = gemport("build", str(recipe), "--plan")
    assert plan.returncode == 0, plan.stderr
    jobs = [job["name"] for job in json.loads(plan.stdout)["include"]]
    assert jobs == list(manifest["artifacts"])
    dirs = []
    for name in jobs:  # each a separate process, as a CI matrix runs them
        job = tmp_path / f"job-{name}"
        run = gemport("build", str(recipe), "--out", str(job), "--only", name)
        assert run.returncode == 0, run.stderr[-3000:]
        dirs.append(str(job))
    merged = tmp_path / "merged"
    run = gemport("report", *dirs, "--out", str(merged))
    assert run.returncode == 0, run.stderr[-3000:]
    together = json.loads((merged / "manifest.json").read_text())
    assert metrics(together) == metrics(manifest)
    assert {n: a["status"] for n, a in together["artifacts"].items()} == {n: "passed" for n in jobs}
    rows = json.loads((merged / "report.json").read_text())["rows"]
    assert [r["name"] for r in rows] == jobs


def test_ray_executor_gives_the_manifest_metrics_of_the_local_one(first, recipe, tmp_path):
    import ray  # noqa: F401  (the extra gemport[ray], which make test installs)

    out, manifest, _ = first
    run = gemport("build", str(recipe), "--out", str(tmp_path / "ray"), "--executor", "ray")
    assert run.returncode == 0, run.stderr[-3000:]
    on_ray = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert metrics(on_ray) == metrics(manifest)
    assert all(not a["build"]["reused"] for a in on_ray["artifacts"].values())


def test_a_failed_gate_exits_1_with_the_table(recipe, tmp_path):
    strict = tmp_path / "recipes" / "tiny.toml"
    strict.parent.mkdir()
    model = recipe.parent.parent / "build" / "tiny" / "gemma2"
    text = recipe.read_text().replace("../build/tiny/gemma2", str(model))
    strict.write_text(text.replace("max_kld = 0.05", "max_kld = 0.0, min_top1 = 100"))
    run = gemport("build", str(strict), "--out", str(tmp_path / "out"), "--only", "q8_0")
    assert run.returncode == 1
    assert "q8_0" in run.stdout and "FAIL" in run.stdout  # the table is printed anyway
    assert run.stderr.strip().splitlines()[-1].startswith("gemport: error:")
    record = json.loads((tmp_path / "out" / "manifest.json").read_text())["artifacts"]["q8_0"]
    assert record["status"] == "gate-failed"


BAD = [
    ('format = "onnx"', 'format = "tflite"', "unknown format 'tflite'", 'format = "tflite"'),
    ('quant = "int8"', 'qaunt = "int8"', "unknown option 'qaunt'", 'qaunt = "int8"'),
    ('quant = "q8_0"', 'quant = "q8_x"', "unknown GGUF type 'q8_x'", 'quant = "q8_x"'),
    ("max_kld = 0.05", "max_perplexity = 3", "no gate 'max_perplexity'", "gates = { max_perplexity = 3 }"),
    ('source = "../build/tiny/gemma2"', 'source = "../build/tiny/nope"', "does not exist", 'source = "../build'),
    ("ctx = 64", "ctx = 2", "ctx must be an integer >= 3", "ctx = 2"),
    ('from = "gptq-int4"', 'from = "gptq"', "from names 'gptq'", 'from = "gptq"'),
    ("bits = 4", "bits = 3", "argument --bits: invalid choice", "bits = 3"),
    ("tp_size = 2", "tp_size = 2\noverwrite = true", "overwrite is set by gemport build", "overwrite = true"),
    ('name = "int8"', 'name = "manifest.json"', "one of the build's own files", 'name = "manifest.json"'),
    ('name = "int8"', 'name = "q8_0.gguf"', "would be written to q8_0.gguf", 'name = "q8_0.gguf"'),
    ("bits = 4", 'bits = "4"', "option bits is a number", 'bits = "4"'),
    ("tp_size = 2", "tp_size = true", "option tp_size takes a value", "tp_size = true"),
    ("max_kld = 0.05", "min_top1 = 200", "at most 100", "gates = { min_top1 = 200 }"),
    ('"../build/tiny/gemma2"', '"../build/tiny/gemma2/config.json"', "not a checkpoint gemport reads", "source ="),
    ('format = "gguf"', 'formt = "gguf"', "every artifact needs a format", "[[artifact]]"),
]


@pytest.mark.parametrize(("old", "new", "message", "line"), BAD, ids=[b[2].split("'")[0][:24] for b in BAD])
def test_bad_recipe_is_one_line_naming_the_recipe_line_and_builds_nothing(recipe, tmp_path, old, new, message, line):
    bad = recipe.parent / f"bad-{os.getpid()}-{abs(hash(new))}.toml"
    text = recipe.read_text()
    assert old in text
    bad.write_text(text.replace(old, new, 1))
    try:
        run = gemport("build", str(bad), "--out", str(tmp_path / "out"))
    finally:
        text = bad.read_text()
        bad.unlink()
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert message in lines[0]
    number = next(i for i, ln in enumerate(text.splitlines(), start=1) if ln.startswith(line))
    assert lines[0].startswith(f"gemport: error: {bad}:{number}: "), (lines[0], number)
    assert not (tmp_path / "out").exists()


def test_the_shipped_recipe_loads(offgrid_model):
    from gemport.artifacts.recipe import load

    recipe = load(DEMO)
    formats = {a.format for a in recipe.artifacts}
    from gemport import registry

    assert formats == set(registry.writers())  # every writer gemport has
    assert recipe.ctx == 512 and recipe.windows == 4


def test_invalid_toml_names_its_line(recipe, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(recipe.read_text().replace("ctx = 64", "ctx = = 64"))
    run = gemport("build", str(bad), "--out", str(tmp_path / "out"))
    assert run.returncode == 2
    number = next(i for i, ln in enumerate(bad.read_text().splitlines(), start=1) if ln.startswith("ctx = = 64"))
    assert run.stderr.startswith(f"gemport: error: {bad}:{number}: not valid TOML"), run.stderr
    assert not (tmp_path / "out").exists()


def _start_build(recipe: Path, out: Path, *extra: str, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """`gemport build` in its own session, to be signalled by the test."""
    argv = [sys.executable, "-m", "gemport.cli", "build", str(recipe), "--out", str(out), *extra]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, text=True, start_new_session=True)


def _wait_for(path_glob, folder: Path, child: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not list(folder.glob(path_glob)):
        assert child.poll() is None, "the build ended before the signal"
        time.sleep(0.05)
    assert list(folder.glob(path_glob)), f"no {path_glob} in {folder}"


def test_ctrl_c_stops_the_build_at_once_and_records_nothing_half_done(recipe, tmp_path):
    out = tmp_path / "out"
    child = _start_build(recipe, out, stderr=subprocess.PIPE)
    _wait_for(".logs/int8.build.log", out, child)  # q8_0 is done, int8 is building
    os.kill(child.pid, signal.SIGINT)  # the parent only, as `timeout -s INT` does: it must stop its child
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "gemport: interrupted"
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["artifacts"]) == ["q8_0"]  # int8 not recorded, nothing after it started
    assert not (out / "int8").exists() and not (out / ".logs" / "gptq-int4.build.log").exists()


def test_a_killed_build_leaves_no_child_running(recipe, tmp_path):
    import psutil

    out = tmp_path / "out"
    child = _start_build(recipe, out, "--only", "int8")
    _wait_for(".logs/int8.build.log", out, child)
    deadline = time.monotonic() + 60  # the log is opened just before the worker is started
    while not (workers := psutil.Process(child.pid).children(recursive=True)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert workers
    child.kill()  # the parent only
    child.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, alive


def test_a_file_changed_in_place_is_rebuilt(first, recipe, tmp_path):
    out, manifest, _ = first
    copy = tmp_path / "out"
    shutil.copytree(out, copy, symlinks=True)
    gguf = copy / "q8_0.gguf"
    stat = gguf.stat()
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 0xFF  # same size, same mtime
    gguf.write_bytes(bytes(data))
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    run = gemport("build", str(recipe), "--out", str(copy), "--only", "q8_0")
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((copy / "manifest.json").read_text())["artifacts"]["q8_0"]
    assert not record["build"]["reused"]
    assert record["files"][0]["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()


def test_report_of_folders_missing_an_artifact_exits_1_and_a_file_as_out_exits_2(first, recipe, tmp_path):
    out, manifest, _ = first
    run = gemport("report", str(out), "--out", str(tmp_path / "merged"))
    assert run.returncode == 0, run.stderr
    partial = tmp_path / "partial"
    shutil.copytree(out, partial, symlinks=True)
    data = json.loads((partial / "manifest.json").read_text())
    del data["artifacts"]["int8"]
    (partial / "manifest.json").write_text(json.dumps(data))
    run = gemport("report", str(partial), "--out", str(tmp_path / "merged2"))
    assert run.returncode == 1 and "not built in any of the folders: int8" in run.stderr
    target = tmp_path / "file"
    target.write_text("")
    run = gemport("report", str(out), "--out", str(target))
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "is a file" in run.stderr
