"""Scale: a synthetic Gemma 1 7B through every writer and quantizer, side by side with llama.cpp (issue 15).

Source: ``gemport synth gemma-7b`` (bf16, about 17 GB, made once and reused; its weights mean nothing, so
only size, speed and memory are measured here, never quality). Each step is one child process:

    lcpp-f16, lcpp-q8_0   llama.cpp's convert_hf_to_gguf.py --outtype f16 | q8_0 (bench/llamacpp_tools.py)
    lcpp-bf16             the same with --outtype bf16: llama-quantize's input (see --q4-from)
    lcpp-q4_k_m           llama-quantize <lcpp-bf16's file> OUT Q4_K_M (brings its input step along)
    f16, q8_0, q4_k_m     gemport convert SRC OUT.gguf --to gguf --quant TYPE (f16: --allow-fp16-overflow)
    hf-f32                gemport convert SRC OUT --to hf --dtype f32
    onnx-int4             gemport convert SRC OUT --to onnx --quant int4 --block-size 32
    jax-f32               gemport convert SRC OUT --to jax --dtype f32
    rtn                   gemport quantize SRC OUT --method rtn --bits 4 (compressed-tensors, group 128)
    gptq                  gemport quantize SRC-2L OUT --method gptq --bits 4 --group-size 128, on a 2-layer
                          7B-wide model (calibration: quantize's defaults, 4096 tokens in windows of 512)
    cat                   cat of the source's safetensors to /dev/null: the disk's (or page cache's) own limit

Per step: wall time; peak RSS of the whole process tree (the sum over the process and its descendants,
sampled every 0.1 s) and of the main process alone (its VmHWM); bytes read and written by the whole tree
(the kernel's per-process I/O accounting, which adds a reaped child's counts to its parent's: here the
counts this process gained from its reaped children, so exact for every descendant that its parent
waited for); rchar/wchar are bytes passed to read/write calls (page-cache hits included, mmap
faults not), read_bytes/write_bytes what reached the block layer (so cached reads count zero); the
output's size. GGUF steps also record every tensor's name, type, shape and sha256, so the tensor bytes
of gemport's F16/Q8_0/Q4_K_M files are compared with llama.cpp's even across separate runs. The page
cache is not dropped (it cannot be here): read_bytes says how much of the source came from the disk.

The peer's Q4_K_M is quantized from a bf16 GGUF by default (--q4-from bf16), as bench/gguf.py does:
bf16 -> bf16 is lossless, while bf16 -> f16 rounds the source's values below f16's normal range
(6.1e-5) to subnormals, and llama-quantize then rounds a few blocks differently from a quantizer that
reads the bf16 source (measured on a 2-layer synthetic Gemma 3 1B: 2 of 28 tensors differ from an f16
input, none from a bf16 one). --q4-from f16 times the f16 pipeline instead.

Outputs go under ``--out`` and each is deleted once measured and hashed (unless --keep), in an order
that keeps at most one 34 GB f32 folder (or one 17 GB 16-bit GGUF plus its Q4_K_M) on disk.

    .venv/bin/python bench/scale.py                                   # every step, an hour or more
    .venv/bin/python bench/scale.py --steps lcpp-q4_k_m q4_k_m         # lcpp-bf16 comes along
    .venv/bin/python bench/scale.py --table                           # the table from the JSON only
    .venv/bin/python bench/scale.py --model /tmp/small --synth gemma3-1b --steps cat f16

Results: ``build/bench/scale/<model>.json`` (each step's record written as it finishes; a run with
--steps merges into it) and ``<model>.md`` (the table, the targets of issue 15 and the 27B projection).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

_HERE = Path(__file__).resolve().parent
# bench/gguf.py shadows the gguf package: import the package before this folder goes on sys.path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import gguf  # noqa: E402

sys.path.insert(0, str(_HERE))
from llamacpp_tools import LlamaCppTools, ToolError, ensure_tools  # noqa: E402

ROOT = _HERE.parent
sys.path.insert(1, str(ROOT))
PY = str(Path(sys.executable))
GEMPORT = str(Path(sys.executable).with_name("gemport"))
SAMPLE_S = 0.1
CHUNK = 16 << 20
MB = 1e6

# Canonical order: the peer's F16 file lives until its Q4_K_M is made; each output is deleted once
# measured, so the largest set on disk at once is one f32 folder (34 GB) or F16 + Q4_K_M (22 GB).
STEPS = (
    "lcpp-f16",
    "lcpp-bf16",
    "lcpp-q4_k_m",
    "lcpp-q8_0",
    "f16",
    "q8_0",
    "q4_k_m",
    "onnx-int4",
    "rtn",
    "gptq",
    "hf-f32",
    "jax-f32",
    "cat",
)
# gemport's steps: (output name, command, options). F16 passes --allow-fp16-overflow: the synthetic
# weights overflow fp16 (they mean nothing), and with it the GGUF writer skips its fp16 range probe (a
# float32 forward of the model on calibration text), as llama.cpp's converter has none; the default run
# with the probe is timed separately (bench/RESULTS.md, Scale).
GEMPORT_STEPS = {
    "f16": ("gemport-f16.gguf", "convert", ["--to", "gguf", "--quant", "f16", "--allow-fp16-overflow"]),
    "q8_0": ("gemport-q8_0.gguf", "convert", ["--to", "gguf", "--quant", "q8_0"]),
    "q4_k_m": ("gemport-q4_k_m.gguf", "convert", ["--to", "gguf", "--quant", "q4_k_m"]),
    "hf-f32": ("gemport-hf-f32", "convert", ["--to", "hf", "--dtype", "f32"]),
    "onnx-int4": ("gemport-onnx-int4", "convert", ["--to", "onnx", "--quant", "int4", "--block-size", "32"]),
    "jax-f32": ("gemport-jax-f32", "convert", ["--to", "jax", "--dtype", "f32"]),
    "rtn": ("gemport-rtn-int4", "quantize", ["--method", "rtn", "--bits", "4"]),
    "gptq": ("gemport-gptq-int4", "quantize", ["--method", "gptq", "--bits", "4", "--group-size", "128"]),
}
PEERS = {"f16": "lcpp-f16", "q8_0": "lcpp-q8_0", "q4_k_m": "lcpp-q4_k_m"}
CONVERTS = ("lcpp-f16", "lcpp-bf16", "lcpp-q8_0")  # convert_hf_to_gguf.py steps
PROJECT_TO = ("gemma2-27b", "gemma3-27b")
GB = 1000.0  # MB per GB in the targets (the 2.5 GB = 2500 MB)


class BenchError(RuntimeError):
    """A step failed or could not run; the message says which and where its log is."""


# --- measurement ---------------------------------------------------------------------------------


def _read_io(path: str) -> dict[str, int]:
    out = {}
    with open(path) as fh:
        for line in fh:
            key, _, value = line.partition(":")
            out[key] = int(value)
    return out


IO_KEYS = ("rchar", "wchar", "read_bytes", "write_bytes")


def reaped_children_io() -> dict[str, int]:
    """I/O counts this process holds for its reaped children (and theirs): the process total minus its
    live threads' own. ref: linux fs/proc/base.c do_io_accounting (whole = signal->ioac + each thread's
    ioac) and kernel/exit.c wait_task_zombie (a reaped child's ioac and its signal->ioac are added to
    the parent's signal->ioac)."""
    total = _read_io("/proc/self/io")
    for tid in os.listdir("/proc/self/task"):
        try:
            own = _read_io(f"/proc/self/task/{tid}/io")
        except (OSError, ValueError):
            continue
        for key in IO_KEYS:
            total[key] -= own[key]
    return {k: total[k] for k in IO_KEYS}


def _vm_hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def measure(argv: list[str], log: Path, env: dict[str, str] | None = None) -> dict:
    """Run ``argv`` (output to ``log``); its wall time, peak RSS and the tree's I/O. BenchError on failure."""
    before = reaped_children_io()
    start = time.perf_counter()
    peak_tree = peak_main = 0
    hwm: dict[int, int] = {}
    with open(log, "w") as out:
        out.write("$ " + " ".join(argv) + "\n")
        out.flush()
        proc = psutil.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            try:
                tree = [proc, *proc.children(recursive=True)]
            except psutil.Error:
                tree = [proc]
            total = 0
            for p in tree:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                if p.pid == proc.pid:
                    peak_main = max(peak_main, rss)
                hwm[p.pid] = max(hwm.get(p.pid, 0), _vm_hwm_kb(p.pid) * 1024)
            peak_tree = max(peak_tree, total)
            time.sleep(SAMPLE_S)
    wall = time.perf_counter() - start
    after = reaped_children_io()
    if proc.returncode:
        raise BenchError(f"{Path(argv[1] if argv[0] == PY else argv[0]).name} exited {proc.returncode}; see {log}")
    main_hwm = hwm.get(proc.pid, 0)
    return {
        "argv": argv,
        "wall_s": round(wall, 2),
        "peak_rss_tree_mb": round(max(peak_tree, main_hwm) / MB, 1),  # the tree holds at least the main's peak
        "peak_rss_main_mb": round(max(peak_main, main_hwm) / MB, 1),
        "hwm_sum_mb": round(sum(hwm.values()) / MB, 1),  # upper bound: each process's own peak, summed
        "processes": len(hwm),
        "io": {k: after[k] - before[k] for k in IO_KEYS},
    }


def size_of(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def gguf_tensors(path: Path) -> dict[str, list]:
    """name -> [type name, shape, sha256 of its bytes], read in chunks by offset (the mmap left untouched)."""
    reader = gguf.GGUFReader(path)
    out = {}
    with open(path, "rb") as fh:
        for t in reader.tensors:
            h = hashlib.sha256()
            fh.seek(int(t.data_offset))
            left = int(t.n_bytes)
            while left:
                buf = fh.read(min(CHUNK, left))
                if not buf:
                    raise BenchError(f"{path}: tensor {t.name} ends past the end of the file")
                h.update(buf)
                left -= len(buf)
            out[t.name] = [t.tensor_type.name, [int(d) for d in t.shape], h.hexdigest()]
    return out


def same_tensors(ours: dict[str, list], theirs: dict[str, list]) -> dict:
    """Whether two files' tensors agree in names, types, shapes and bytes; the first differences."""
    names = set(ours) | set(theirs)
    diff = sorted(n for n in names if ours.get(n) != theirs.get(n))
    kinds = {
        "missing_in_ours": [n for n in diff if n not in ours],
        "missing_in_theirs": [n for n in diff if n not in theirs],
    }
    kinds["type_or_shape"] = [n for n in diff if n in ours and n in theirs and ours[n][:2] != theirs[n][:2]]
    kinds["bytes"] = [n for n in diff if n in ours and n in theirs and ours[n][:2] == theirs[n][:2]]
    return {
        "identical": not diff,
        "tensors": len(names),
        "differ": len(diff),
        **{k: v[:5] for k, v in kinds.items() if v},
    }


# --- models --------------------------------------------------------------------------------------


def param_counts(model: Path) -> dict[str, int]:
    """Weights of an HF folder from its safetensors headers: all, and those of the decoder layers."""
    from safetensors import safe_open

    total = layers = largest = 0
    for shard in sorted(model.glob("*.safetensors")):
        with safe_open(shard, framework="numpy") as f:
            for name in f.keys():
                n = 1
                for d in f.get_slice(name).get_shape():
                    n *= d
                total += n
                largest = max(largest, n)
                layers += n if ".layers." in name else 0
    return {"params": total, "layer_params": layers, "largest_tensor": largest}


def preset_counts(name: str) -> dict[str, int]:
    """The same counts for an official size, from the shapes gemport synth would write."""
    from gemport.checkpoint import expected_shapes
    from gemport.synth import synth_spec

    total = layers = largest = 0
    for tensor, shape in expected_shapes(synth_spec(name)).items():
        n = 1
        for d in shape:
            n *= d
        total += n
        largest = max(largest, n)
        layers += n if ".layers." in tensor else 0
    return {"params": total, "layer_params": layers, "largest_tensor": largest}


def ensure_model(path: Path, preset: str, layers: int | None, log: Path) -> None:
    """Make the synthetic model with gemport synth unless ``path`` already holds one (config.json)."""
    if (path / "config.json").is_file():
        return
    argv = [GEMPORT, "synth", preset, str(path), *(["--layers", str(layers)] if layers else [])]
    print(f"making {path} ({preset}{f', {layers} layers' if layers else ''}) ...", flush=True)
    with open(log, "w") as out:
        rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc:
        raise BenchError(f"gemport synth exited {rc}; see {log}")


# --- steps ---------------------------------------------------------------------------------------


def step_command(step: str, args: argparse.Namespace, tools: LlamaCppTools | None) -> tuple[list[str], Path]:
    """(argv, output path) of one step."""
    src, out = args.model, args.out
    if step in CONVERTS:
        dst = out / f"{step}.gguf"
        return tools.convert_command(src, dst, step.removeprefix("lcpp-")), dst
    if step == "lcpp-q4_k_m":
        dst = out / "lcpp-q4_k_m.gguf"
        return [str(tools.quantize), str(out / f"lcpp-{args.q4_from}.gguf"), str(dst), "Q4_K_M"], dst
    if step in GEMPORT_STEPS:
        name, verb, options = GEMPORT_STEPS[step]
        source = args.gptq_model if step == "gptq" else src
        dst = out / name
        return [GEMPORT, verb, str(source), str(dst), *options, "--overwrite"], dst
    if step == "cat":
        shards = sorted(str(p) for p in src.glob("*.safetensors"))
        return ["sh", "-c", 'exec cat "$@" > /dev/null', "cat", *shards], Path(os.devnull)
    raise BenchError(f"unknown step {step}")


def git_commit() -> str | None:
    proc = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or None


def run_step(step: str, args: argparse.Namespace, tools: LlamaCppTools | None) -> dict:
    argv, dst = step_command(step, args, tools)
    if dst != Path(os.devnull):
        remove(dst)
    env = tools.convert_env() if step in CONVERTS else None
    print(f"{step:12} {' '.join(argv[:6])} ...", flush=True)
    try:
        rec = measure(argv, args.out / f"{step}.log", env)
    except BenchError:
        if dst != Path(os.devnull):
            remove(dst)  # a failed peer may leave a partial file
        raise
    source = args.gptq_model if step == "gptq" else args.model
    rec |= {"step": step, "source": str(source), "finished": datetime.now(UTC).isoformat(timespec="seconds")}
    rec |= {
        "commit": git_commit(),
        "cpus": os.cpu_count(),
        "mem_total_gb": round(psutil.virtual_memory().total / 1e9, 1),
    }
    rec |= param_counts(source)
    if step == "cat":
        rec["output_bytes"] = 0
        rec["input_bytes"] = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    else:
        rec["output_bytes"] = size_of(dst)
    if step == "lcpp-q4_k_m":
        rec["input"] = f"lcpp-{args.q4_from}"
    if step in PEERS or step in PEERS.values():
        rec["tensors"] = gguf_tensors(dst)
    if not args.keep and step != f"lcpp-{args.q4_from}" and dst != Path(os.devnull):
        remove(dst)
    return rec


def plan(selected: list[str], q4_from: str) -> list[str]:
    """The selected steps in canonical order; lcpp-q4_k_m brings its input's step along."""
    chosen = set(selected)
    if "lcpp-q4_k_m" in chosen:
        chosen.add(f"lcpp-{q4_from}")
    return [s for s in STEPS if s in chosen]


# --- results -------------------------------------------------------------------------------------


def load(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"steps": {}}


def save(path: Path, results: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


def run(args: argparse.Namespace, results_path: Path) -> dict:
    steps = plan(args.steps, args.q4_from)
    intermediate = args.out / f"lcpp-{args.q4_from}.gguf"
    args.out.mkdir(parents=True, exist_ok=True)
    ensure_model(args.model, args.synth, None, args.out / "synth.log")
    if "gptq" in steps:
        ensure_model(args.gptq_model, args.synth, 2, args.out / "synth-2l.log")
    tools = ensure_tools() if any(s.startswith("lcpp-") for s in steps) else None
    results = load(results_path)
    results.update(model=str(args.model), gptq_model=str(args.gptq_model), synth=args.synth)
    results.setdefault("steps", {})
    failed: set[str] = set()
    # the intermediate GGUF lives until llama-quantize has read it, and no longer
    last_use = "lcpp-q4_k_m" if "lcpp-q4_k_m" in steps else f"lcpp-{args.q4_from}"
    try:
        for step in steps:
            if step == "lcpp-q4_k_m" and f"lcpp-{args.q4_from}" in failed:
                print(f"{step:12} skipped: its input step lcpp-{args.q4_from} failed", flush=True)
                continue
            try:
                rec = run_step(step, args, tools)
            except BenchError as exc:
                failed.add(step)
                print(f"{step:12} FAILED: {exc}", file=sys.stderr, flush=True)
                rec = {"step": step, "error": str(exc)}
            else:
                print(f"{step:12} {rec['wall_s']:8.1f} s  peak RSS tree {rec['peak_rss_tree_mb']:8.0f} MB", flush=True)
            results["steps"][step] = rec
            save(results_path, results)
            if step == last_use and not args.keep:
                remove(intermediate)
    finally:
        if not args.keep:
            remove(intermediate)
    return results


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def ratios(steps: dict) -> list[tuple[str, float | None, str, bool | None]]:
    """(what, value, target, pass) for each of issue 15's side-by-side and absolute targets."""

    def get(name: str, key: str) -> float | None:
        rec = steps.get(name) or {}
        return rec.get(key)

    rows = []
    peer_wall = None
    base = (steps.get("lcpp-q4_k_m") or {}).get("input", "lcpp-bf16")
    if get(base, "wall_s") is not None and get("lcpp-q4_k_m", "wall_s") is not None:
        peer_wall = get(base, "wall_s") + get("lcpp-q4_k_m", "wall_s")
    peer_rss = [v for v in (get(base, "peak_rss_tree_mb"), get("lcpp-q4_k_m", "peak_rss_tree_mb")) if v]
    q4_rss = get("q4_k_m", "peak_rss_tree_mb")
    r = _ratio(get("q4_k_m", "wall_s"), peer_wall)
    what = f"Q4_K_M wall / (convert {base.removeprefix('lcpp-')} + llama-quantize)"
    rows.append((what, r, "<= 1.0", None if r is None else r <= 1.0))
    r = _ratio(q4_rss, max(peer_rss) if len(peer_rss) == 2 else None)
    rows.append(("Q4_K_M peak RSS / max(theirs)", r, "<= 0.5", None if r is None else r <= 0.5))
    rows.append(("Q4_K_M peak RSS (GB)", _gb(q4_rss), "< 2.5", None if q4_rss is None else q4_rss < 2.5 * GB))
    r = _ratio(get("f16", "wall_s"), get("lcpp-f16", "wall_s"))
    rows.append(("F16 wall / convert --outtype f16", r, "<= 0.7", None if r is None else r <= 0.7))
    r = _ratio(get("f16", "peak_rss_tree_mb"), get("lcpp-f16", "peak_rss_tree_mb"))
    rows.append(("F16 peak RSS / theirs", r, "-", None))
    r = _ratio(get("q8_0", "wall_s"), get("lcpp-q8_0", "wall_s"))
    rows.append(("Q8_0 wall / convert --outtype q8_0", r, "-", None))
    r = _ratio(get("q8_0", "peak_rss_tree_mb"), get("lcpp-q8_0", "peak_rss_tree_mb"))
    rows.append(("Q8_0 peak RSS / theirs", r, "-", None))
    for step in ("hf-f32", "onnx-int4", "jax-f32", "rtn"):
        v = get(step, "peak_rss_tree_mb")
        rows.append((f"{step} peak RSS (GB)", _gb(v), "< 2.5", None if v is None else v < 2.5 * GB))
    v = get("gptq", "peak_rss_tree_mb")
    rows.append(("gptq (2 layers) peak RSS (GB)", _gb(v), "< 6", None if v is None else v < 6 * GB))
    v = get("gptq", "wall_s")
    rows.append(("gptq (2 layers) wall (min)", None if v is None else v / 60, "< 10", None if v is None else v < 600))
    for ours, theirs in PEERS.items():
        a, b = (steps.get(ours) or {}).get("tensors"), (steps.get(theirs) or {}).get("tensors")
        same = None if a is None or b is None else same_tensors(a, b)["identical"]
        rows.append((f"{ours.upper()} tensor bytes equal llama.cpp's", None, "equal", same))
    return rows


def _gb(mb: float | None) -> float | None:
    return None if mb is None else mb / GB


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def table(results: dict) -> str:
    steps = results.get("steps", {})
    lines = [
        f"Model: `{results.get('model')}` (GPTQ: `{results.get('gptq_model')}`). Sizes and I/O in GB (1e9 bytes), "
        "RSS in MB; read/written: rchar / read_bytes and wchar / write_bytes of the whole process tree "
        "(read_bytes: from the disk, page-cache hits excluded).",
        "",
        "| step | wall s | peak RSS tree MB | peak RSS main MB | read GB (calls / disk) | written GB (calls / disk) "
        "| output GB | s / Bparam | tensors = llama.cpp |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in STEPS:
        rec = steps.get(name)
        if rec is None:
            continue
        if "error" in rec:
            lines.append(f"| {name} | failed: {rec['error']} |||||||| ")
            continue
        io = rec["io"]
        same = "-"
        if name in PEERS and "tensors" in (steps.get(PEERS[name]) or {}):
            cmp = same_tensors(rec["tensors"], steps[PEERS[name]]["tensors"])
            same = "yes" if cmp["identical"] else f"no ({cmp['differ']}/{cmp['tensors']} differ)"
        lines.append(
            f"| {name} | {rec['wall_s']:.1f} | {rec['peak_rss_tree_mb']:.0f} | {rec['peak_rss_main_mb']:.0f} "
            f"| {_bytes(io['rchar'])} / {_bytes(io['read_bytes'])} "
            f"| {_bytes(io['wchar'])} / {_bytes(io['write_bytes'])} "
            f"| {_bytes(rec['output_bytes'])} | {per_bparam(rec):.1f} | {same} |"
        )
    lines += ["", "| target (issue 15) | value | target | pass |", "|---|---:|---:|---|"]
    for what, value, target, ok in ratios(steps):
        mark = "-" if ok is None else ("pass" if ok else "FAIL")
        lines.append(f"| {what} | {_fmt(value)} | {target} | {mark} |")
    lines += ["", *projection(steps)]
    return "\n".join(lines) + "\n"


def per_bparam(rec: dict) -> float:
    """Seconds per billion weights: of the whole model, or of the decoder layers for GPTQ, whose cost is
    per projection (its 2-layer model is mostly embedding)."""
    basis = rec["layer_params"] if rec["step"] == "gptq" else rec["params"]
    return rec["wall_s"] / (basis / 1e9)


def project(rec: dict, target: dict[str, int]) -> float:
    """Wall seconds of ``rec``'s step on a model with ``target``'s counts, linear in weights (the basis of
    per_bparam), as every step streams tensor by tensor."""
    basis = target["layer_params"] if rec["step"] == "gptq" else target["params"]
    return per_bparam(rec) * basis / 1e9


def projection(steps: dict) -> list[str]:
    done = [steps[s] for s in STEPS if s in steps and "error" not in steps[s]]
    if not done:
        return []
    targets = {name: preset_counts(name) for name in PROJECT_TO}
    src = next((r for r in done if r["step"] != "gptq"), done[0])
    sizes = ", ".join(
        f"{n} {c['params'] / 1e9:.2f} B weights ({c['layer_params'] / 1e9:.2f} B in the layers, largest tensor "
        f"{c['largest_tensor'] / max(src['largest_tensor'], 1):.2f}x the measured model's)"
        for n, c in targets.items()
    )
    lines = [
        "Projection to 27B, linear in weights (s / Bparam x the model's weights; GPTQ per decoder-layer weight, "
        f"its calibration tokens fixed): {sizes}; measured on {src['params'] / 1e9:.2f} B weights. "
        "A streaming step's peak RSS follows its largest tensor (the embedding), not the weight count.",
        "",
        "| step | s / Bparam | measured peak RSS MB | " + " | ".join(f"{n} min" for n in PROJECT_TO) + " |",
        "|---|---:|---:|" + "---:|" * len(PROJECT_TO),
    ]
    for rec in done:
        cols = " | ".join(f"{project(rec, targets[n]) / 60:.1f}" for n in PROJECT_TO)
        lines.append(f"| {rec['step']} | {per_bparam(rec):.1f} | {rec['peak_rss_tree_mb']:.0f} | {cols} |")
    return lines


def write_table(results: dict, results_path: Path) -> None:
    text = table(results)
    results_path.with_suffix(".md").write_text(text)
    print()
    print(text, end="")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "build/scale/gemma-7b", help="HF source (made if missing)")
    ap.add_argument("--gptq-model", type=Path, help="2-layer source for gptq (default: MODEL-2l, made if missing)")
    ap.add_argument("--synth", default="gemma-7b", help="gemport synth NAME for a missing model (default gemma-7b)")
    ap.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS, metavar="STEP", help=", ".join(STEPS))
    ap.add_argument("--out", type=Path, default=ROOT / "build/scale/out", help="folder of the outputs and logs")
    ap.add_argument("--results", type=Path, default=ROOT / "build/bench/scale", help="folder of the JSON and table")
    ap.add_argument(
        "--q4-from",
        choices=("bf16", "f16"),
        default="bf16",
        help="llama-quantize's input: the converter's bf16 (default, lossless) or f16 file",
    )
    ap.add_argument("--keep", action="store_true", help="keep the outputs (needs several times the disk)")
    ap.add_argument("--table", action="store_true", help="print and write the table from the JSON; run nothing")
    args = ap.parse_args(argv)
    args.model = args.model.resolve()
    args.gptq_model = (args.gptq_model or args.model.with_name(args.model.name + "-2l")).resolve()
    args.results.mkdir(parents=True, exist_ok=True)
    results_path = args.results / f"{args.model.name}.json"
    if args.table:
        if not results_path.is_file():
            print(f"error: {results_path}: no results yet", file=sys.stderr)
            return 2
        write_table(load(results_path), results_path)
        return 0
    try:
        results = run(args, results_path)
    except (BenchError, ToolError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_table(results, results_path)
    return 1 if any("error" in results["steps"].get(s, {}) for s in plan(args.steps, args.q4_from)) else 0


if __name__ == "__main__":
    sys.exit(main())
