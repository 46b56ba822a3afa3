"""gemport's ONNX export against onnxruntime-genai's model builder, side by side on one model, one table.

Each row is one exported folder (model.onnx + model.onnx.data + genai_config.json + tokenizer):

    gemport-fp32            gemport convert MODEL OUT --to onnx --dtype f32
    builder-fp32            python -m onnxruntime_genai.models.builder -i MODEL -o OUT -p fp32 -e cpu
    gemport-int4            gemport convert ... --to onnx --quant int4 --block-size B                  (RTN)
    builder-int4            builder -p int4 -e cpu --extra_options block_size=B accuracy_level=4 is_symmetric=true
    gemport-int4-awq        gemport convert ... --to onnx --quant int4-awq --block-size C
    gemport-int4-gptq       gemport convert ... --to onnx --quant int4-gptq --block-size C
  not run unless named in --rows:
    builder-int4-f32embed   builder int4 with the tied embedding / LM head left in float32
                            (nodes_to_exclude; gemport's counterpart: --gemport-args '--head-bits 0')
    builder-fp32-exact      builder fp32 without its departures from the reference (patch_builder(exact=True))
    builder-int4-exact      the same for int4
    gemport-int4-h4l8       gemport int4 with the LM head / tied lookup stored explicitly (the head-layout
    gemport-int4-h8         candidates, issue 19): h4l8 = --head-bits 4 --lookup-bits 8 (int4 head, its own
    gemport-int4-h4l4       int8 lookup table), h8 = --head-bits 8 (one int8 table for both), h4l4 =
    gemport-int4-h0         --head-bits 4 --lookup-bits 4 (one int4 table), h0 = --head-bits 0 (float)

Every setting of a row is in its command line, printed under the table; the block and accuracy level
columns and the embed / head columns are read back from the exported graph.

Columns: export wall time and peak RSS of the export process tree (sampled every 50 ms, as in
bench/gguf.py), folder size (bytes of all its files), ppl / delta-ppl / KLD / top-1 from gemport's
validation (``validation.validate.validate`` against MODEL in transformers fp32, windows of --ctx
tokens), and prefill / decode tokens per second in onnxruntime-genai on the CPU (og.Model +
og.Generator: a prompt of --prompt-tokens tokens from the evaluation text appended at once, then
--decode-tokens greedy steps of one token; decode also per CPU second of the decoding process, which
with --threads 1 other jobs on the machine change far less than the wall clock). Speed is measured after
every row is built and scored, in --repeats rounds; each round times every row once, each in a fresh
process (``bench/onnx.py --run-speed``: load, one warm-up, one timed run), in the row order on even
rounds and reversed on odd ones, and the median over the rounds is reported. Timing several models in
one process, or always in the same order, favours whichever runs second (up to 8 % here on decode) and
swamped the differences being measured. Decode ratios of each gemport row to the builder row of the same
weights are printed under the table, and of each head-layout row to the first one named (per round, then
the median).

The builder runs in a child process of this script (``bench/onnx.py --run-builder [--exact] -- ARGS``)
that patches the builder in memory before running its ``__main__``: onnxruntime-genai 0.18's builder
cannot read a Gemma 3 config under transformers 5 (see ``patch_builder``). Nothing is downloaded
(HF_HUB_OFFLINE=1); the model is given as a local folder with ``-i``. The builder's rows are built with
``windowed_kv_cache=false`` unless ``--builder-kv windowed``: gemport's validation feeds each window as one
prefill with empty past tensors, which a windowed-cache graph refuses (its sliding layers need a past
buffer of at least the window). Given a zero past buffer of the window's size for those layers, the
windowed graph computes the same logits as the full one.

    nice -n 10 .venv/bin/python bench/onnx.py                        # all default rows, 4 windows
    nice -n 10 .venv/bin/python bench/onnx.py --rows builder-fp32 builder-int4 --windows 16
    nice -n 10 .venv/bin/python bench/onnx.py --reuse --keep-going --out build/bench/onnx.json

Folders go to ``build/bench/onnx/<model>/<row>/`` (logs beside them in ``logs/``) and are remade unless
``--reuse`` (a complete folder made by the same command is then kept and marked reused). Results:
``--out`` (default ``build/bench/onnx-<model>.json``), rewritten after every row, and the same table as
markdown next to it (``.md``). ``--windows 0`` skips the quality columns, ``--no-speed`` the onnxruntime-genai timing.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# This script is named onnx.py: its folder must not shadow the onnx package (imported by onnx_ir,
# onnxruntime.quantization and the builder, also in the builder child process).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import runpy  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402

import onnx  # noqa: E402,F401  (the package, in sys.modules before bench/ goes back on the path below)

REPO_ROOT = _HERE.parent
BENCH_DIR = REPO_ROOT / "build" / "bench"
GEMPORT = Path(sys.executable).with_name("gemport")
BUILDER_MODULE = "onnxruntime_genai.models.builder"


def _bench_helpers():
    """bench/gguf.py's measure() and offgrid_order's BenchError (loaded as bench/quantize.py does)."""
    spec = importlib.util.spec_from_file_location("bench_gguf", _HERE / "gguf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # puts bench/ first on sys.path for its own imports
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    return module.measure, sys.modules["offgrid_order"].BenchError


# --- the builder, patched, in a child process ------------------------------------------------


def patch_builder(exact: bool) -> None:
    """Make onnxruntime-genai 0.18's model builder export Gemma 3 under transformers 5 (this process only).

    Always (without it the builder cannot run): transformers 5 reads a Gemma 3 config.json, in either
    style (4.x's ``rope_theta`` + ``rope_local_base_freq`` are converted on load), into
    ``config.rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}`` and drops the
    4.x attributes. The builder reads ``config.rope_parameters["rope_type"]``
    (onnxruntime_genai/models/builders/base.py:670, ``Model.make_rope_init``: KeyError 'rope_type') and
    ``config.rope_local_base_freq`` (builders/gemma.py:126, ``Gemma3Model.__init__``). A copy of the
    folder with a 4.x-style config.json does not help (transformers 5 normalizes it back), so the
    config object is flattened to the 4.x form just before ``Gemma3Model.__init__``:
    ``rope_parameters`` = the full-attention entry, ``rope_theta`` from it, ``rope_local_base_freq``
    from the sliding-attention entry. The exported graph is then what the builder makes of a 4.x config.

    ``exact`` (the *-exact rows only) also removes the builder's two departures from the reference:
    builders/base.py:6185 loads the checkpoint with ``from_pretrained()`` and no dtype, which under
    transformers 5 keeps the checkpoint's bf16 (4.x loaded float32), so the Gemma norm offset
    ``weight + 1`` (base.py:3163, 3787, 3838) is rounded to bf16 (spacing 2^-7 in [1, 2), coarser above) before the cast
    to float32: the loaded model is cast to float32 (exact for bf16 weights). And builders/gemma.py:22
    rounds the embedding scale sqrt(hidden_size) to two decimals (25.3 for 640, not 25.2982): the
    exact value is set. And builders/gemma.py:134-147 (``make_rotary_embedding_multi_cache``) makes the
    sliding layers' cos/sin tables with the global layers' RoPE scaling (a linear factor, as Gemma 3
    4B-27B have; none on 270M and 1B), where the reference's sliding layers use unscaled RoPE: the
    local tables are made with factor 1.
    """
    import numpy as np
    import onnxruntime_genai.models  # noqa: F401  (appends the builder's folder to sys.path: `builders`, ...)
    from builders import gemma  # the module object builder.py itself imports

    init = gemma.Gemma3Model.__init__

    def patched_init(self, config, *args, **kwargs):
        rope = getattr(config, "rope_parameters", None)
        if isinstance(rope, dict) and "full_attention" in rope and "sliding_attention" in rope:
            config.rope_theta = rope["full_attention"]["rope_theta"]
            config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
            config.rope_parameters = dict(rope["full_attention"])
        init(self, config, *args, **kwargs)
        if exact:
            self.embed_attrs["scale"] = float(np.sqrt(self.hidden_size))

    gemma.Gemma3Model.__init__ = patched_init
    if exact:
        load = gemma.Gemma3Model.load_weights
        gemma.Gemma3Model.load_weights = lambda self, path: load(self, path).float()
        caches = gemma.Model.make_rotary_embedding_caches

        def local_caches_unscaled(self, **kwargs):
            if kwargs.get("cos_cache_name") == "cos_cache_local" and self.rope_attrs["create_caches"]:
                saved = self.rope_attrs["rescale_factors"]
                self.rope_attrs["rescale_factors"] = 1
                try:
                    return caches(self, **kwargs)
                finally:
                    self.rope_attrs["rescale_factors"] = saved
            return caches(self, **kwargs)

        gemma.Model.make_rotary_embedding_caches = local_caches_unscaled


def run_builder(argv: list[str]) -> int:
    """``bench/onnx.py --run-builder [--exact] -- BUILDER-ARGS``: the builder's command line, patched."""
    exact = bool(argv) and argv[0] == "--exact"
    argv = argv[1:] if exact else argv
    argv = argv[1:] if argv[:1] == ["--"] else argv
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    patch_builder(exact)
    sys.argv = [BUILDER_MODULE, *argv]
    runpy.run_module(BUILDER_MODULE, run_name="__main__", alter_sys=True)
    return 0


# --- rows -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    name: str
    tool: str  # "gemport" or "builder"
    weights: str  # what the table says
    quant: str | None = None  # gemport --quant / builder -p int4 when set
    calibrated: bool = False  # AWQ/GPTQ: --calib-block-size, --corpus
    f32_embed: bool = False  # builder: tied embedding / LM head not quantized
    exact: bool = False  # builder: patch_builder(exact=True)
    extra: tuple[str, ...] = ()  # gemport: more convert options (the head-layout rows)


HEAD_4_LOOKUP_8 = ("--head-bits", "4", "--lookup-bits", "8")
HEAD_4_LOOKUP_4 = ("--head-bits", "4", "--lookup-bits", "4")
ROWS = [
    Spec("gemport-fp32", "gemport", "fp32"),
    Spec("builder-fp32", "builder", "fp32"),
    Spec("gemport-int4", "gemport", "int4 RTN", "int4"),
    Spec("builder-int4", "builder", "int4 RTN", "int4"),
    Spec("gemport-int4-awq", "gemport", "int4 AWQ", "int4-awq", calibrated=True),
    Spec("gemport-int4-gptq", "gemport", "int4 GPTQ", "int4-gptq", calibrated=True),
    Spec("builder-int4-f32embed", "builder", "int4 RTN, f32 embed", "int4", f32_embed=True),
    Spec("builder-fp32-exact", "builder", "fp32, exact", exact=True),
    Spec("builder-int4-exact", "builder", "int4 RTN, exact", "int4", exact=True),
    Spec("gemport-int4-h4l8", "gemport", "int4 RTN, head 4, lookup 8", "int4", extra=HEAD_4_LOOKUP_8),
    Spec("gemport-int4-h8", "gemport", "int4 RTN, head 8 shared", "int4", extra=("--head-bits", "8")),
    Spec("gemport-int4-h4l4", "gemport", "int4 RTN, head 4 shared", "int4", extra=HEAD_4_LOOKUP_4),
    Spec("gemport-int4-h0", "gemport", "int4 RTN, float head", "int4", extra=("--head-bits", "0")),
]
HEAD_ROWS = [s.name for s in ROWS if s.extra]
DEFAULT_ROWS = [s.name for s in ROWS[:6]]
COLUMNS = (
    "row|weights|block|acc|embed|head|export s|peak RSS MB|folder bytes"
    "|ppl|Δppl %|KLD|top-1 %|prefill tok/s|decode tok/s"
).split("|")


@dataclass
class Result:
    row: str
    tool: str
    weights: str
    folder: str
    command: list[str] = field(default_factory=list)
    reused: bool = False
    export_s: float | None = None
    peak_rss_mb: float | None = None
    folder_bytes: int = 0
    files: dict[str, int] = field(default_factory=dict)
    graph: dict = field(default_factory=dict)
    ppl: float = math.nan
    ppl_ref: float = math.nan
    delta_ppl_pct: float = math.nan
    kld: float = math.nan
    top1_pct: float = math.nan
    tokens: int = 0
    runtime: str = ""
    speed: dict = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # step (export, graph, quality, speed) -> message


def block_of(spec: Spec, args: argparse.Namespace) -> int | None:
    if spec.quant is None:
        return None
    return (args.calib_block_size or args.block_size) if spec.calibrated else args.block_size


def export_argv(spec: Spec, args: argparse.Namespace, out: Path, work: Path) -> list[str]:
    model = str(args.model)
    if spec.tool == "gemport":
        argv = [str(GEMPORT), "convert", model, str(out), "--to", "onnx", "--overwrite", *args.gemport_args]
        if spec.quant is None:
            return argv + ["--dtype", "f32"]
        argv += ["--quant", spec.quant, "--block-size", str(block_of(spec, args)), *spec.extra]
        if args.accuracy_level is not None:
            argv += ["--accuracy-level", str(args.accuracy_level)]
        if spec.calibrated and args.corpus:
            argv += ["--corpus", str(args.corpus)]
        return argv
    argv = [sys.executable, str(Path(__file__).resolve()), "--run-builder", *(["--exact"] if spec.exact else [])]
    argv += ["--", "-i", model, "-o", str(out), "-p", spec.quant or "fp32", "-e", "cpu"]
    argv += ["-c", str(work / "builder-cache")]
    options = []
    if spec.quant:
        # The builder's own defaults for int4 on the CPU (quantization/quant_config.py
        # QuantConfig.from_extra_options: block_size 32, accuracy_level 4 for cpu/webgpu, symmetric),
        # written out so that the command records them.
        options += [f"block_size={block_of(spec, args)}", f"accuracy_level={args.builder_accuracy_level}"]
        options += ["is_symmetric=true"]
    if spec.f32_embed:
        options += ["nodes_to_exclude=/lm_head/MatMul,/model/embed_tokens/Gather"]
    if args.builder_kv == "full":
        options += ["windowed_kv_cache=false"]
    return argv + (["--extra_options", *options] if options else [])


def complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("model.onnx", "genai_config.json"))


def folder_files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def graph_info(folder: Path) -> dict:
    """Op counts, inputs, MatMulNBits settings, how the embedding and the LM head are stored (no weights loaded)."""
    from onnx import helper

    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    nodes = proto.graph.node
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    nbits = sorted(
        {
            (a.get("bits", 4), a.get("block_size"), a.get("accuracy_level", 0))
            for n, a in zip(nodes, attrs, strict=True)
            if n.op_type == "MatMulNBits"
        }
    )
    gathers = [a for n, a in zip(nodes, attrs, strict=True) if n.op_type == "GatherBlockQuantized"]
    windowed = any(
        a.get("sliding_window_cache") for n, a in zip(nodes, attrs, strict=True) if n.op_type == "GroupQueryAttention"
    )
    # The LM head: the product whose output width is the vocabulary (the logits' last dimension).
    logits = next(o for o in proto.graph.output if o.name == "logits").type.tensor_type.shape.dim[-1].dim_value
    shapes = {t.name: list(t.dims) for t in proto.graph.initializer}
    head = "?"
    for n, a in zip(nodes, attrs, strict=True):
        if n.op_type == "MatMulNBits" and a.get("N") == logits:
            head = f"int{a.get('bits', 4)} b{a.get('block_size')}"
        elif n.op_type in ("MatMul", "Gemm", "FusedMatMul") and any(logits in shapes.get(i, ()) for i in n.input):
            head = "float"
    return {
        "ops": dict(Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in nodes).most_common()),
        "inputs": [i.name for i in proto.graph.input if not i.name.startswith("past_key_values.")],
        "past_inputs": sum(i.name.startswith("past_key_values.") for i in proto.graph.input),
        "matmulnbits": [{"bits": b, "block_size": s, "accuracy_level": acc} for b, s, acc in nbits],
        "embedding": (f"int{gathers[0].get('bits', 4)} b{gathers[0].get('block_size')}" if gathers else "float"),
        "lm_head": head,
        "windowed_kv_cache": windowed,
    }


# --- quality and speed ------------------------------------------------------------------------


def quality(folder: Path, args: argparse.Namespace, res: Result) -> None:
    """gemport's validation of the folder against the model (runtime picked by the folder's format)."""
    from validation.validate import validate

    report = validate(folder, args.model, corpus=args.corpus, n_ctx=args.ctx, n_windows=args.windows)
    m = report.metrics
    res.ppl, res.ppl_ref, res.delta_ppl_pct, res.kld = m.ppl_cand, m.ppl_ref, m.delta_ppl_pct, m.kld
    res.top1_pct, res.tokens, res.runtime = m.top1_pct, m.tokens, report.runtime


def prompt_tokens(args: argparse.Namespace) -> list[int]:
    """The first --prompt-tokens tokens of the evaluation text, BOS first (the reference tokenizer)."""
    from transformers import AutoTokenizer

    from validation.corpus import load_text, split_text, tokenize

    text = split_text(load_text(args.corpus))[0]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenize(tokenizer, text[: 16 * args.prompt_tokens])
    if len(ids) < args.prompt_tokens:
        raise ValueError(f"the evaluation text has only {len(ids)} tokens, fewer than --prompt-tokens")
    return ids[: args.prompt_tokens]


def og_speed(folder: Path, prompt: list[int], args: argparse.Namespace) -> dict:
    """Prefill and decode tokens/s of the folder in onnxruntime-genai on the CPU (greedy): one timed run
    after a warm-up, in this process (the child of speed_rounds)."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()  # the CPU
    if args.threads is not None:  # the same threads for every folder, whatever its genai_config says
        options = {"intra_op_num_threads": args.threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    start = time.perf_counter()
    model = og.Model(config)
    load_s = time.perf_counter() - start
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    # A windowed KV cache needs room for the whole window (the builder's GQA with sliding_window_cache=1
    # refuses a smaller buffer), whatever the length generated.
    window = int(decoder.get("sliding_window", {}).get("window_size", 0))

    def once(tokens: list[int], steps: int) -> tuple[float, float, list[int]]:
        length = len(tokens) + 1 + steps
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=max(length, window), min_length=length)
        generator = og.Generator(model, params)
        t0 = time.perf_counter()
        generator.append_tokens(tokens)  # the prefill: one run over the prompt, logits of its last token
        t1 = time.perf_counter()
        generator.generate_next_token()  # picks the first new token from those logits (no model run)
        t2, c2 = time.perf_counter(), time.process_time()
        for _ in range(steps):  # one model run on the last token each, then the pick
            generator.generate_next_token()
        t3, c3 = time.perf_counter(), time.process_time()
        new = list(generator.get_sequence(0))[len(tokens) :]
        if len(new) != steps + 1:
            raise RuntimeError(f"generated {len(new)} tokens, expected {steps + 1}")
        return t1 - t0, t3 - t2, c3 - c2, new

    once(prompt[:32], 4)  # warm-up: allocations, first-run kernel choices
    prefill_s, decode_s, decode_cpu_s, new = once(prompt, args.decode_tokens)
    return {
        "load_s": load_s,
        "prefill_tok_s": len(prompt) / prefill_s,
        "decode_tok_s": args.decode_tokens / decode_s,
        # per CPU second of this process: with --threads 1, what other processes on the machine do
        # changes it far less than the wall clock (they take cores, not this process's work)
        "decode_cpu_tok_s": args.decode_tokens / decode_cpu_s,
        "generated": [int(t) for t in new[:16]],
    }


# --- the run ----------------------------------------------------------------------------------


def run(args: argparse.Namespace, measure, bench_error: type[Exception]) -> dict:
    work = BENCH_DIR / "onnx" / args.model.name
    (work / "logs").mkdir(parents=True, exist_ok=True)
    specs = [s for s in ROWS if s.name in args.rows]
    result = {"model": str(args.model), "versions": versions(), "settings": settings(args), "rows": []}
    prompt = prompt_tokens(args) if not args.no_speed else []

    def step(res: Result, what: str, fn) -> bool:
        try:
            fn()
            return True
        except Exception as exc:  # one failed step of one row: reported, or fatal without --keep-going
            if not args.keep_going:
                raise
            res.errors[what] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            (work / "logs" / f"{res.row}-{what}.error").write_text(traceback.format_exc())
            return False

    results: list[Result] = []
    built: list[Result] = []  # rows whose folder is there, timed at the end
    for spec in specs:
        out = work / spec.name
        res = Result(spec.name, spec.tool, spec.weights, str(out), export_argv(spec, args, out, work))

        def export(spec=spec, out=out, res=res) -> None:
            stamp = work / "logs" / f"{spec.name}.command.json"  # the command that made the folder
            made_by = json.loads(stamp.read_text()) if stamp.is_file() else None
            if args.reuse and complete(out) and made_by == res.command:
                print(f"reusing {out}", flush=True)
                res.reused = True
                return
            if args.reuse and complete(out):
                print(f"not reusing {out}: made by another command", flush=True)
            stamp.unlink(missing_ok=True)
            if out.exists() and spec.tool == "builder":  # the builder writes into OUT, over whatever is there
                shutil.rmtree(out)
            print(f"{spec.name}: {' '.join(res.command)}", flush=True)
            res.export_s, res.peak_rss_mb = measure(res.command, work / "logs" / f"{spec.name}.log")
            if not complete(out):
                raise bench_error(f"{out}: no model.onnx / genai_config.json after the export")
            stamp.write_text(json.dumps(res.command) + "\n")

        if step(res, "export", export):
            res.files = folder_files(out)
            res.folder_bytes = sum(res.files.values())
            step(res, "graph", lambda out=out, res=res: res.graph.update(graph_info(out)))
            if args.windows:
                step(res, "quality", lambda out=out, res=res: quality(out, args, res))
            gc.collect()  # the row's onnxruntime sessions, before the next row loads its own
            built.append(res)
        results.append(res)
        result["rows"] = [asdict(r) for r in results]
        print(" | ".join(cells(res)), flush=True)
        write_outputs(result, args.out)  # after every row: a long run keeps what it has
    if not args.no_speed and built:
        speed_rounds(built, prompt, args, work, step)
        result["rows"] = [asdict(r) for r in results]
        write_outputs(result, args.out)
    return result


def speed_rounds(rows: list[Result], prompt: list[int], args: argparse.Namespace, work: Path, step) -> None:
    """--repeats rounds of one timed run per row, each in a fresh process; the order alternates between
    rounds so that no row always runs first or second. Fills each row's speed with the medians."""
    prompt_file = work / "logs" / "speed-prompt.json"
    prompt_file.write_text(json.dumps(prompt))
    runs: dict[str, list[dict]] = {r.row: [] for r in rows}
    for k in range(args.repeats):
        for res in rows if k % 2 == 0 else rows[::-1]:
            if "speed" in res.errors:
                continue
            argv = [sys.executable, str(Path(__file__).resolve()), "--run-speed", res.folder, str(prompt_file)]
            argv += ["--decode-tokens", str(args.decode_tokens)]
            argv += ["--threads", str(args.threads)] if args.threads is not None else []

            def once(res=res, argv=argv) -> None:
                done = subprocess.run(argv, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                    raise RuntimeError(f"--run-speed exited with {done.returncode}: {tail}")
                runs[res.row].append(json.loads(done.stdout.strip().splitlines()[-1]))

            print(f"speed round {k + 1}/{args.repeats}: {res.row}", flush=True)
            step(res, "speed", once)
    for res in rows:
        done = runs[res.row]
        if not done:
            continue
        prefill = [r["prefill_tok_s"] for r in done]
        decode = [r["decode_tok_s"] for r in done]
        decode_cpu = [r["decode_cpu_tok_s"] for r in done]
        res.speed = {
            "load_s": statistics.median(r["load_s"] for r in done),
            "prompt_tokens": len(prompt),
            "decode_tokens": args.decode_tokens,
            "repeats": len(done),
            "prefill_tok_s": statistics.median(prefill),
            "decode_tok_s": statistics.median(decode),
            "prefill_tok_s_runs": prefill,
            "decode_tok_s_runs": decode,
            "decode_cpu_tok_s": statistics.median(decode_cpu),
            "decode_cpu_tok_s_runs": decode_cpu,
            "generated": done[0]["generated"],
        }


def run_speed(argv: list[str]) -> int:
    """The child of speed_rounds: ``--run-speed FOLDER PROMPT_JSON [--decode-tokens N] [--threads N]``;
    prints og_speed's result (one timed run) as one JSON line."""
    ap = argparse.ArgumentParser(prog="bench/onnx.py --run-speed")
    ap.add_argument("folder", type=Path)
    ap.add_argument("prompt", type=Path)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    print(json.dumps(og_speed(args.folder, json.loads(args.prompt.read_text()), args)))
    return 0


def decode_ratios(rows: list[Result]) -> list[str]:
    """gemport's decode tokens/s over the builder's, for each pair of rows with the same weights; each
    head-layout row's over the first head-layout row's (per round, then the median: the rows of one
    round ran back to back, so the ratio cancels the load other processes put on the machine)."""
    speed = {r.row: r.speed.get("decode_tok_s") for r in rows if r.speed.get("decode_tok_s")}
    lines = []
    for row, tok_s in speed.items():
        peer = row.replace("gemport-", "builder-", 1)
        if row.startswith("gemport-") and speed.get(peer):
            lines.append(f"decode {row} / {peer}: {tok_s / speed[peer]:.3f}")
    heads = [r for r in rows if r.row in HEAD_ROWS and r.speed.get("decode_tok_s_runs")]
    for r in heads[1:]:
        for what, key in (("decode", "decode_tok_s_runs"), ("decode per CPU second", "decode_cpu_tok_s_runs")):
            ratios = [a / b for a, b in zip(r.speed.get(key, []), heads[0].speed.get(key, []), strict=False)]
            if ratios:
                spread = f"rounds {min(ratios):.3f}-{max(ratios):.3f}"
                lines.append(f"{what} {r.row} / {heads[0].row}: {statistics.median(ratios):.3f} ({spread})")
    return lines


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("onnxruntime", "onnxruntime-genai", "onnx", "onnx-ir", "transformers", "torch")}


def settings(args: argparse.Namespace) -> dict:
    return {
        "windows": args.windows,
        "ctx": args.ctx,
        "corpus": str(args.corpus) if args.corpus else None,
        "block_size": args.block_size,
        "calib_block_size": args.calib_block_size or args.block_size,
        "gemport_accuracy_level": args.accuracy_level,
        "gemport_args": args.gemport_args,
        "builder_accuracy_level": args.builder_accuracy_level,
        "builder_kv": args.builder_kv,
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
        "threads": args.threads,
        "speed": not args.no_speed,
        "cpus": os.cpu_count(),
    }


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def cells(r: Result) -> list[str]:
    nbits = r.graph.get("matmulnbits") or []
    block = ",".join(sorted({str(q["block_size"]) for q in nbits})) or "-"
    acc = ",".join(sorted({str(q["accuracy_level"]) for q in nbits})) or "-"
    made = "reused" if r.reused else _num(r.export_s, ".1f")
    scores = [_num(r.ppl, ".4f"), _num(r.delta_ppl_pct, "+.2f"), _num(r.kld, ".5f"), _num(r.top1_pct, ".2f")]
    if not r.tokens:
        scores = ["-"] * 4
    speed = [_num(r.speed.get("prefill_tok_s"), ".1f"), _num(r.speed.get("decode_tok_s"), ".1f")]
    size = str(r.folder_bytes) if r.folder_bytes else "-"
    rss = _num(r.peak_rss_mb, ".0f")
    stored = [r.graph.get("embedding", "-"), r.graph.get("lm_head", "-")]
    return [r.row, r.weights, block, acc, *stored, made, rss, size, *scores, *speed]


def markdown(result: dict) -> str:
    rows = [Result(**r) for r in result["rows"]]
    s, v = result["settings"], result["versions"]
    scored = next((r for r in rows if r.tokens), None)
    ref = f"reference ppl {scored.ppl_ref:.4f}, {scored.tokens} tokens scored" if scored else "no quality scores"
    threads = "each folder's genai_config.json" if s["threads"] is None else s["threads"]
    lines = [
        f"Model `{result['model']}`; onnxruntime {v['onnxruntime']}, onnxruntime-genai {v['onnxruntime-genai']},"
        f" transformers {v['transformers']}, {s['cpus']} CPUs. Quality: gemport validate, {s['windows']} windows of"
        f" {s['ctx']} ({ref}). Speed: onnxruntime-genai on the CPU, prompt {s['prompt_tokens']} tokens, then"
        f" {s['decode_tokens']} greedy decode steps, median of {s['repeats']} rounds (a fresh process per row and"
        " round, the order alternating)"
        f" (intra-op threads: {threads}). Export: wall time and peak RSS of the export process tree;"
        " folder bytes: all files of the folder (tokenizer included). block / acc: MatMulNBits block size and"
        " accuracy_level; embed / head: how the embedding and the LM head are stored. Builder rows patched to run under"
        f" transformers 5 (bench/onnx.py patch_builder), KV cache: {s['builder_kv']}.",
        "",
        f"| {' | '.join(COLUMNS)} |",
        "|" + " --- |" * len(COLUMNS),
        *[f"| {' | '.join(cells(r))} |" for r in rows],
        "",
        *[f"- `{r.row}`: `{' '.join(r.command)}`" for r in rows],
        *[f"- {line}" for line in decode_ratios(rows)],
    ]
    for r in rows:
        lines += [f"\nFAILED {r.row} {what}: {msg}" for what, msg in r.errors.items()]
    return "\n".join(lines) + "\n"


def _finite(value):
    """The results with NaN (a value not measured) as null, for strict JSON readers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_outputs(result: dict, out: Path) -> None:
    out.write_text(json.dumps(_finite(result), indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--run-builder"]:
        return run_builder(argv[1:])
    if argv[:1] == ["--run-speed"]:
        return run_speed(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO_ROOT / "build/models/gemma-3-270m-offgrid")
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=[s.name for s in ROWS], metavar="ROW")
    ap.add_argument("--windows", type=int, default=4, help="validation windows (default 4; 0: no quality)")
    ap.add_argument("--ctx", type=int, default=512, help="validation tokens per window (default 512)")
    ap.add_argument("--corpus", type=Path, help="text for validation, the prompt and AWQ/GPTQ calibration")
    ap.add_argument("--block-size", type=int, default=32, choices=(32, 64, 128), help="int4 RTN rows (default 32)")
    ap.add_argument("--calib-block-size", type=int, choices=(32, 64, 128), help="AWQ/GPTQ (default: --block-size)")
    ap.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), help="gemport's int4 (default: its own)")
    ap.add_argument(
        "--gemport-args",
        type=shlex.split,
        default=[],
        metavar="'ARGS'",
        help="more options for every gemport convert, one quoted string (e.g. '--head-bits 0')",
    )
    ap.add_argument(
        "--builder-accuracy-level",
        type=int,
        default=4,
        choices=(0, 1, 2, 3, 4),
        help="the builder's (default 4, its CPU default)",
    )
    ap.add_argument(
        "--builder-kv",
        choices=("full", "windowed"),
        default="full",
        help="builder KV cache of the sliding layers: full (windowed_kv_cache=false, default) or its "
        "own default, windowed",
    )
    ap.add_argument("--prompt-tokens", type=int, default=256, help="speed: prompt length (default 256)")
    ap.add_argument("--decode-tokens", type=int, default=64, help="speed: greedy decode steps (default 64)")
    ap.add_argument("--repeats", type=int, default=4, help="speed: rounds, a fresh process per row in each (default 4)")
    ap.add_argument(
        "--threads",
        type=int,
        help="speed: intra-op threads for every folder (0: onnxruntime's default, a thread per physical core);"
        " default: each folder's own genai_config.json (onnxruntime-genai runs one thread unless it says)",
    )
    ap.add_argument("--no-speed", action="store_true", help="skip the onnxruntime-genai timing")
    ap.add_argument("--out", type=Path, help="results JSON (default build/bench/onnx-<model>.json; markdown: .md)")
    ap.add_argument("--reuse", action="store_true", help="keep complete folders of a previous run (marked reused)")
    ap.add_argument("--keep-going", action="store_true", help="a failed step is reported in the table, not fatal")
    args = ap.parse_args(argv)
    args.model = args.model.resolve()
    if args.windows < 0 or args.prompt_tokens < 33 or args.decode_tokens < 1 or args.repeats < 1:
        ap.error("--windows >= 0, --prompt-tokens > 32, --decode-tokens >= 1 and --repeats >= 1")
    args.out = (args.out or BENCH_DIR / f"onnx-{args.model.name}.json").resolve()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_OFFLINE"] = "1"  # local folders only, in this process and the exports it starts
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    sys.path.insert(0, str(REPO_ROOT))  # validation/, converters/ (after the onnx package is imported)
    measure, bench_error = _bench_helpers()
    try:
        result = run(args, measure, bench_error)
    except bench_error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\nresults: {args.out} (+ .md)\n\n{markdown(result)}")
    return 1 if any(r["errors"] for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
