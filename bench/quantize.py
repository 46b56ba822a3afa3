"""gemport's quantizers (RTN, AWQ, GPTQ) and llama.cpp's llama-quantize on one model, one table.

Every artifact is made by its own command and scored by ``gemport validate ARTIFACT --reference
MODEL`` in the runtime that loads it (transformers + compressed-tensors for the HF folders,
llama.cpp for the GGUF files). The peer side is llama.cpp's pipeline as in ``bench/gguf.py``:
``convert_hf_to_gguf.py`` (HF -> BF16 or F32 GGUF, the model's own dtype) then ``llama-quantize``
Q4_0 and Q4_K_M, with and without the importance matrix of ``gemport imatrix`` (calibration split).

    .venv/bin/python bench/quantize.py [--model build/models/gemma-3-270m-offgrid] [--windows 16]
    .venv/bin/python bench/quantize.py --rows rtn-int8 peer-q4_0 --windows 4      # a quick look

Artifacts go to ``build/bench/quantize/<model>/`` and are remade on every run unless ``--reuse``
(the table then says which rows were reused); results to ``build/bench/quantize-<model>.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import struct
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
from llamacpp_tools import REPO_ROOT, LlamaCppTools, ToolError, ensure_tools  # noqa: E402
from offgrid_order import BenchError, conversion_source  # noqa: E402

# bench/gguf.py shares its name with the gguf package: load it under another name, for its measure().
_spec = importlib.util.spec_from_file_location("bench_gguf", _HERE / "gguf.py")
_bench_gguf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench_gguf)
measure = _bench_gguf.measure  # (wall seconds, peak RSS MB of the process tree); BenchError on failure
import gguf  # noqa: E402  (the package: bench/gguf.py has put it in sys.modules)

GEMPORT = Path(sys.executable).with_name("gemport")
BENCH_DIR = REPO_ROOT / "build" / "bench"
# The projections gemport quantizes, in HF names and in GGUF names (ref: gguf-py constants.py MODEL_TENSOR).
HF_PROJ = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")
GGUF_PROJ = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")
GGUF_OUTTYPE = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}


@dataclass(frozen=True)
class Spec:
    name: str
    method: str
    bits: int
    group: str
    args: str  # gemport quantize options, or the llama-quantize type for the peer
    peer: bool = False
    imatrix: bool = False

    @property
    def artifact(self) -> str:
        return self.name + (".gguf" if self.peer or "--to" in self.args.split() else "")

    @property
    def calibrated(self) -> bool:  # takes --corpus/--calib-tokens/--calib-ctx
        return not self.peer and self.args.split()[1] in ("awq", "gptq")


ROWS = [
    Spec("rtn-int8", "RTN int8 per channel", 8, "channel", "--method rtn --bits 8"),
    *[
        Spec(f"{m}-int4-g{g}", f"{m.upper()} int4", 4, str(g), f"--method {m} --bits 4 --group-size {g}")
        for m in ("rtn", "awq", "gptq")
        for g in (32, 128)
    ],
    Spec("gptq-gguf-q4_k_m", "GPTQ GGUF Q4_K_M", 4, "mixed", "--method gptq --bits 4 --to gguf --quant q4_k_m"),
    Spec("peer-q4_0", "llama-quantize Q4_0", 4, "32", "Q4_0", peer=True),
    Spec("peer-q4_k_m", "llama-quantize Q4_K_M", 4, "mixed", "Q4_K_M", peer=True),
    Spec("peer-q4_0-imatrix", "llama-quantize Q4_0 + imatrix", 4, "32", "Q4_0", peer=True, imatrix=True),
    Spec("peer-q4_k_m-imatrix", "llama-quantize Q4_K_M + imatrix", 4, "mixed", "Q4_K_M", peer=True, imatrix=True),
]
COLUMNS = "row|method|bits|group|size MB|bpw proj|bpw file|ppl|Δppl %|KLD|top-1 %|quantize s|peak RSS MB".split("|")


@dataclass
class Result:
    row: str
    method: str
    bits: int
    group: str
    artifact: str
    reused: bool = False
    seconds: float | None = None  # wall time of the quantize step (llama-quantize alone for the peer)
    peak_rss_mb: float | None = None
    weight_bytes: int = 0  # files holding tensors: model*.safetensors of a folder, the whole .gguf
    bpw_proj: float = math.nan  # 8 * bytes of the quantized projections (codes, scales, zeros) / their weights
    bpw_file: float = math.nan  # 8 * weight_bytes / all weights of the model
    ppl: float = math.nan
    delta_ppl_pct: float = math.nan
    kld: float = math.nan
    top1_pct: float = math.nan
    tokens: int = 0
    runtime: str = ""
    calib_tokens: int | None = None  # from the folder's gemport.json (a GGUF does not record it)
    error: str = ""


def safetensors_sizes(folder: Path) -> dict[str, tuple[list[int], int]]:
    """name -> (shape, data bytes) of every tensor in the folder's *.safetensors, from their headers."""
    sizes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))  # ref: safetensors format spec
        for name, info in header.items():
            if name != "__metadata__":
                sizes[name] = (info["shape"], info["data_offsets"][1] - info["data_offsets"][0])
    if not sizes:
        raise BenchError(f"{folder}: no *.safetensors files")
    return sizes


def weight_counts(model: Path) -> tuple[int, int]:
    """(all weights, weights of the quantizable projections) of the reference model."""
    shapes = {name: math.prod(shape) for name, (shape, _) in safetensors_sizes(model).items()}
    return sum(shapes.values()), sum(n for name, n in shapes.items() if HF_PROJ.fullmatch(name))


def artifact_bytes(path: Path) -> tuple[int, int]:
    """(bytes of the files holding tensors, bytes of the projections' tensors) of a folder or a GGUF file."""
    if path.is_file():
        tensors = gguf.GGUFReader(path).tensors
        return path.stat().st_size, sum(int(t.n_bytes) for t in tensors if GGUF_PROJ.fullmatch(t.name))
    files = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    # compressed-tensors stores projection M as M.weight_packed, M.weight_scale, M.weight_zero_point, M.weight_shape
    sizes = safetensors_sizes(path).items()
    return files, sum(b for name, (_, b) in sizes if HF_PROJ.fullmatch(name.rsplit(".", 1)[0] + ".weight"))


def opt(flag: str, value: object) -> list[str]:
    return [] if value is None else [flag, str(value)]


def step(path: Path, argv: list[str], log: Path, reuse: bool) -> dict:
    """Make ``path`` with ``argv`` (timed), or keep the existing one when reusing."""
    if reuse and path.exists():
        print(f"reusing {path}", flush=True)
        return {"reused": True}
    if path.is_file():
        path.unlink()
    seconds, rss_mb = measure(argv, log)
    return {"reused": False, "seconds": seconds, "peak_rss_mb": rss_mb}


@dataclass
class Peer:
    tools: LlamaCppTools
    base: Path  # the model's BF16/F32 GGUF by convert_hf_to_gguf.py
    imatrix: Path  # gemport imatrix on the calibration split, as in bench/gguf.py
    steps: dict[str, dict]  # timing of convert and imatrix


def peer_inputs(args: argparse.Namespace, work: Path, specs: list[Spec]) -> Peer:
    tools = ensure_tools()
    config = json.loads((args.model / "config.json").read_text())
    outtype = GGUF_OUTTYPE[config.get("dtype") or config.get("torch_dtype") or "bfloat16"]
    source, _ = conversion_source(args.model, work, fix_tokenizer=True)
    peer = Peer(tools, work / f"peer.{outtype}.gguf", work / "calibration.imatrix.gguf", {})
    argv = tools.convert_command(source, peer.base, outtype)
    peer.steps["convert_hf_to_gguf"] = step(peer.base, argv, work / "logs/convert.log", args.reuse)
    if any(s.imatrix for s in specs):
        chunks = None if args.calib_tokens is None else math.ceil(args.calib_tokens / (args.calib_ctx or 512))
        argv = [str(GEMPORT), "imatrix", str(args.model), str(peer.imatrix), "--overwrite"]
        argv += opt("--corpus", args.corpus) + opt("--ctx", args.calib_ctx) + opt("--chunks", chunks)
        peer.steps["gemport imatrix"] = step(peer.imatrix, argv, work / "logs/imatrix.log", args.reuse)
        fields = gguf.GGUFReader(peer.imatrix).fields  # ref: llama-imatrix's GGUF keys imatrix.chunk_*
        windows, size = (int(fields[f"imatrix.chunk_{k}"].contents()) for k in ("count", "size"))
        peer.steps["gemport imatrix"]["calib_tokens"] = windows * size
    return peer


def quantize_argv(spec: Spec, args: argparse.Namespace, out: Path, peer: Peer | None) -> list[str]:
    if spec.peer:
        imatrix = opt("--imatrix", peer.imatrix if spec.imatrix else None)
        return [str(peer.tools.quantize), *imatrix, str(peer.base), str(out), spec.args]
    argv = [str(GEMPORT), "quantize", str(args.model), str(out), *spec.args.split(), "--overwrite"]
    if spec.calibrated:
        argv += opt("--corpus", args.corpus) + opt("--calib-tokens", args.calib_tokens)
        argv += opt("--calib-ctx", args.calib_ctx)
    return argv


def score(path: Path, args: argparse.Namespace, res: Result, logs: Path) -> dict:
    """``gemport validate`` of one artifact against the model; fills res's metrics, returns the report."""
    out = logs / f"validate-{res.row}.json"
    argv = [str(GEMPORT), "validate", str(path), "--reference", str(args.model), "--windows", str(args.windows)]
    argv += [*opt("--corpus", args.corpus), *opt("--ctx", args.ctx), "--json", str(out)]
    measure(argv, out.with_suffix(".log"))
    report = json.loads(out.read_text())
    m = {k: math.nan if v is None else v for k, v in report["metrics"].items()}
    res.ppl, res.delta_ppl_pct, res.kld, res.top1_pct = m["ppl_cand"], m["delta_ppl_pct"], m["kld"], m["top1_pct"]
    res.tokens, res.runtime = int(m["tokens"]), report["runtime"]["name"]
    return report


def run(args: argparse.Namespace) -> dict:
    specs = [s for s in ROWS if s.name in args.rows]
    work = BENCH_DIR / "quantize" / args.model.name
    (work / "logs").mkdir(parents=True, exist_ok=True)
    n_all, n_proj = weight_counts(args.model)
    peer = peer_inputs(args, work, specs) if any(s.peer for s in specs) else None
    result = {"model": str(args.model), "windows": args.windows, "ctx": args.ctx or 512, "corpus": args.corpus}
    result |= {"weights": n_all, "projection_weights": n_proj, "peer_steps": peer.steps if peer else {}, "rows": []}
    for spec in specs:
        out = work / spec.artifact
        res = Result(spec.name, spec.method, spec.bits, spec.group, str(out))
        try:
            made = step(out, quantize_argv(spec, args, out, peer), work / f"logs/{spec.name}.log", args.reuse)
            res.reused, res.seconds, res.peak_rss_mb = made["reused"], made.get("seconds"), made.get("peak_rss_mb")
            res.weight_bytes, proj_bytes = artifact_bytes(out)
            res.bpw_file, res.bpw_proj = 8 * res.weight_bytes / n_all, 8 * proj_bytes / n_proj
            if out.is_dir():
                calib = json.loads((out / "gemport.json").read_text())["quantization"]["config"].get("calibration")
                res.calib_tokens = calib["tokens"] if calib else None
            result["ppl_ref"] = score(out, args, res, work / "logs")["metrics"]["ppl_ref"]
        except BenchError as exc:
            if not args.keep_going:
                raise
            res.error = str(exc).splitlines()[0]
        result["rows"].append(asdict(res))
        print(" | ".join(cells(res)), flush=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after every row: a long run keeps what it has
    return result


def cells(r: Result) -> list[str]:
    made = "reused" if r.reused else f"{r.seconds:.1f}" if r.seconds is not None else "-"
    rss = f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb is not None else "-"
    sizes = [f"{r.weight_bytes / 1e6:.2f}", f"{r.bpw_proj:.3f}", f"{r.bpw_file:.3f}"] if r.weight_bytes else ["-"] * 3
    scores = [f"{r.ppl:.4f}", f"{r.delta_ppl_pct:+.2f}", f"{r.kld:.5f}", f"{r.top1_pct:.2f}"] if r.tokens else ["-"] * 4
    return [r.row, r.method, str(r.bits), r.group, *sizes, *scores, made, rss]


def markdown(result: dict) -> str:
    rows = [Result(**r) for r in result["rows"]]
    scored = next((r for r in rows if r.tokens), None)
    lines = [
        f"Model `{result['model']}`: {result['weights']} weights, {result['projection_weights']} of them in the"
        f" quantized projections (q/k/v/o, gate/up/down). Reference ppl {result.get('ppl_ref', math.nan):.4f}"
        f" (transformers, fp32); {scored.tokens if scored else 0} tokens scored ({result['windows']} windows of"
        f" {result['ctx']}). Size: the files holding tensors (model*.safetensors of a folder; the whole .gguf,"
        " tokenizer included). bpw proj: 8 x bytes of the projections' tensors (codes, scales, zero points) /"
        " their weights; bpw file: 8 x size / all weights. Quantize time and peak RSS: `gemport quantize`, or"
        " `llama-quantize` alone for the peer rows.",
        "",
        f"| {' | '.join(COLUMNS)} |",
        "|" + " --- |" * len(COLUMNS),
        *[f"| {' | '.join(cells(r))} |" for r in rows],
    ]
    for what, info in result["peer_steps"].items():
        done = "reused" if info["reused"] else f"{info['seconds']:.1f} s, peak RSS {info['peak_rss_mb']:.0f} MB"
        calib = f", {info['calib_tokens']} calibration tokens" if "calib_tokens" in info else ""
        lines.append(f"\nPeer input, {what}: {done}{calib}")
    calibrated = sorted({r.calib_tokens for r in rows if r.calib_tokens})
    lines += [f"\nAWQ/GPTQ folders: {', '.join(map(str, calibrated))} calibration tokens"] if calibrated else []
    lines += [f"\nFAILED {r.row}: {r.error}" for r in rows if r.error]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO_ROOT / "build/models/gemma-3-270m-offgrid")
    ap.add_argument("--windows", type=int, default=16, help="validation windows (default 16)")
    ap.add_argument("--rows", nargs="+", default=[s.name for s in ROWS], choices=[s.name for s in ROWS])
    ap.add_argument("--out", type=Path, help="results JSON (default build/bench/quantize-<model>.json)")
    ap.add_argument("--reuse", action="store_true", help="keep artifacts of a previous run (marked 'reused')")
    ap.add_argument("--keep-going", action="store_true", help="a failed row is reported in the table, not fatal")
    ap.add_argument("--corpus", help="passed to gemport quantize/imatrix/validate (default: theirs)")
    ap.add_argument("--calib-tokens", type=int, help="awq/gptq calibration tokens (imatrix: as many windows)")
    ap.add_argument("--calib-ctx", type=int, help="awq/gptq/imatrix tokens per calibration window")
    ap.add_argument("--ctx", type=int, help="gemport validate tokens per window (default 512)")
    args = ap.parse_args(argv)
    args.model = args.model.resolve()
    args.out = args.out or BENCH_DIR / f"quantize-{args.model.name}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args)
    except (BenchError, ToolError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\nresults: {args.out}\n\n{markdown(result)}")
    return 1 if any(r["error"] for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
