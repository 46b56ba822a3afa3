"""Do llama.cpp's own quantizations of the demo model rank as they should? KLD order, scored by gemport validate.

The peer is llama.cpp itself (built by ``bench/llamacpp_tools.py``): its ``convert_hf_to_gguf.py``
turns the HF bf16 model into a BF16 GGUF, ``llama-quantize`` makes Q8_0, Q6_K, Q5_K_M, Q4_K_M and
Q4_0 of it, and ``gemport validate FILE.gguf --reference MODEL`` scores every file in llama.cpp (the
GGUF parity runtime) against the reference in transformers. On a model whose weights are not already
on a quantization grid, KLD must rise strictly in the order Q8_0 < Q6_K < Q5_K_M < Q4_K_M < Q4_0; the
bench exits 1 when it does not. The off-grid demo model (``gemport demo-model --offgrid``) is the
default; ``--model build/models/gemma-3-270m`` runs the faithful demo model (dequantized Q4_K_M,
so re-quantizing to Q4_K_M is nearly free) to show the difference.

    .venv/bin/python bench/offgrid_order.py [--model build/models/gemma-3-270m-offgrid] [--windows 16]
    .venv/bin/python bench/offgrid_order.py --model build/models/gemma-3-270m --no-order-gate
    .venv/bin/python bench/offgrid_order.py --llama-perplexity   # also llama-perplexity's own KLD

Artifacts go to ``build/bench/llamacpp/<model>/`` and are reused while the model and the tools are
unchanged (``--fresh`` remakes them); the results to ``build/bench/offgrid_order-<model>.json``.
With ``--llama-perplexity`` each quant is also scored by ``llama-perplexity --kl-divergence`` against
the BF16 GGUF (same text, windows and scored half, f32 KV cache), a cross-check by llama.cpp's own tool.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llamacpp_tools import REPO_ROOT, SAFE_CPU_ARGS, LlamaCppTools, ToolError, ensure_tools  # noqa: E402

log = logging.getLogger("bench.offgrid_order")

ORDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")  # expected: KLD strictly increasing along this tuple
BASE_TYPE = "BF16"
DEFAULT_MODEL = REPO_ROOT / "build" / "models" / "gemma-3-270m-offgrid"
BENCH_DIR = REPO_ROOT / "build" / "bench"
STAMP = "stamp.json"


class BenchError(RuntimeError):
    """A step of the bench failed; the message names the step, the file and the tool's last output lines."""


@dataclass
class Row:
    type: str
    file: str
    file_bytes: int
    bits_per_weight: float  # 8 * tensor data bytes / weights, as llama.cpp reports it
    tensor_types: dict[str, int]  # ggml type -> tensor count
    fallbacks: int  # tensors llama-quantize gave another type (rows not a multiple of the block size)
    make_seconds: float | None  # convert (BF16) or llama-quantize wall time; None when reused
    validate_seconds: float = 0.0
    ppl_ref: float = math.nan
    ppl: float = math.nan
    delta_ppl_pct: float = math.nan
    kld: float = math.nan
    kld_se: float = math.nan
    top1_pct: float = math.nan
    tokens: int = 0
    runtime: str = ""
    llama_perplexity: dict[str, float] = field(default_factory=dict)


# --- running tools ---------------------------------------------------------------------------------


def run_tool(argv: list[str], what: str, logfile: Path, env: dict[str, str] | None = None) -> str:
    """Run ``argv``, keep its output in ``logfile``; BenchError with the tail of it on failure."""
    log.debug("%s: %s", what, " ".join(argv))
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    output = proc.stdout + proc.stderr
    logfile.write_text(f"$ {' '.join(argv)}\n{output}")
    if proc.returncode:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise BenchError(f"{what} failed (exit {proc.returncode}); full output in {logfile}:\n{tail}")
    return output


def model_fingerprint(model: Path) -> dict[str, object]:
    """Sizes and mtimes of the model's files: artifacts made from another version are not reused."""
    if not (model / "config.json").is_file():
        raise BenchError(f"{model}: not an HF model folder (no config.json); make it with `make demo-model`")
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(model.iterdir()) if p.is_file()}


def prepare_workdir(work: Path, stamp: dict[str, object], fresh: bool) -> None:
    """Empty ``work`` unless its stamp says its artifacts were made from the same inputs."""
    old = None
    if (work / STAMP).is_file():
        try:
            old = json.loads((work / STAMP).read_text())
        except ValueError:
            old = None
    if fresh or old != stamp:
        if work.exists():
            log.info("removing stale artifacts in %s", work)
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")


# --- the tokenizer_config.json that convert_hf_to_gguf.py needs ------------------------------------


def added_tokens_decoder(model: Path) -> dict[str, dict[str, object]] | None:
    """tokenizer_config.json's ``added_tokens_decoder`` rebuilt from tokenizer.json, if the config lacks it.

    convert_hf_to_gguf.py (SentencePiece path, ref: conversion/base.py _create_vocab_sentencepiece) marks a
    piece USER_DEFINED only if tokenizer_config.json's added_tokens_decoder (or added_tokens.json) lists it;
    the piece types inside tokenizer.model are ignored. Without the list, Gemma 3's whitespace pieces
    ("▁▁", "▁▁▁", ...) become NORMAL and llama.cpp tokenizes runs of spaces differently from transformers.
    transformers 5's save_pretrained no longer writes the list; tokenizer.json's added_tokens still has it.
    """
    config_file, tokenizer_file = model / "tokenizer_config.json", model / "tokenizer.json"
    if not (config_file.is_file() and tokenizer_file.is_file()):
        return None
    if json.loads(config_file.read_text()).get("added_tokens_decoder"):
        return None
    tokenizer = json.loads(tokenizer_file.read_text())
    keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    decoder = {str(t["id"]): {k: t[k] for k in keys if k in t} for t in tokenizer.get("added_tokens", [])}
    return decoder or None


def conversion_source(model: Path, work: Path, fix_tokenizer: bool) -> tuple[Path, int]:
    """The folder to convert: ``model`` itself, or a copy of it (weights symlinked) with the added tokens listed."""
    decoder = added_tokens_decoder(model)
    if decoder is None or not fix_tokenizer:
        if decoder is not None:
            log.warning("%s/tokenizer_config.json has no added_tokens_decoder; converting as is", model)
        return model, 0
    log.warning(
        "%s/tokenizer_config.json has no added_tokens_decoder: convert_hf_to_gguf.py would mark its %d added"
        " tokens NORMAL (whitespace runs then tokenize differently in llama.cpp); converting a copy that lists them",
        model,
        len(decoder),
    )
    staged = work / "hf-source" / model.name  # the folder name becomes the GGUF's general.name
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    for src in model.iterdir():
        if src.is_file() and src.name != "tokenizer_config.json":
            (staged / src.name).symlink_to(src.resolve())
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = decoder
    (staged / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return staged, len(decoder)


# --- making the GGUFs --------------------------------------------------------------------------------


def gguf_stats(path: Path) -> tuple[float, dict[str, int]]:
    """(bits per weight over all tensors, tensor count per ggml type) of a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    n_weights = sum(int(t.n_elements) for t in reader.tensors)
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return 8 * n_bytes / n_weights, dict(sorted(types.items(), key=lambda kv: -kv[1]))


def make_base(tools: LlamaCppTools, source: Path, out: Path, logs: Path) -> float | None:
    """convert_hf_to_gguf.py source -> out (BF16); seconds taken, or None if out already exists."""
    if out.is_file():
        return None
    log.info("convert_hf_to_gguf.py %s -> %s", source, out.name)
    part = out.with_name(out.name + ".part")
    start = time.perf_counter()
    run_tool(
        tools.convert_command(source, part, "bf16"), "convert_hf_to_gguf.py", logs / "convert.log", tools.convert_env()
    )
    part.rename(out)
    return time.perf_counter() - start


def count_fallbacks(logfile: Path) -> int:
    """Tensors llama-quantize could not give the requested type, from its log (0 if there is no log).

    ref: src/llama-quant.cpp (tensor type fallback: "ncols ... not divisible by ... -> falling back to ...").
    Gemma 3 270M has hidden size 640, so every K-quant of a tensor with 640 columns falls back.
    """
    if not logfile.is_file():
        return 0
    return sum("falling back to" in line for line in logfile.read_text(errors="replace").splitlines())


def make_quant(tools: LlamaCppTools, base: Path, out: Path, qtype: str, logs: Path) -> float | None:
    """llama-quantize base -> out; seconds taken, or None if out already exists."""
    if out.is_file():
        return None
    log.info("llama-quantize %s -> %s", base.name, out.name)
    part = out.with_name(out.name + ".part")
    threads = str(os.cpu_count() or 1)
    start = time.perf_counter()
    run_tool(
        [str(tools.quantize), str(base), str(part), qtype, threads], f"llama-quantize {qtype}", logs / f"{qtype}.log"
    )
    part.rename(out)
    return time.perf_counter() - start


# --- scoring -------------------------------------------------------------------------------------------


def gemport_validate(gguf: Path, model: Path, windows: int, row: Row, logs: Path) -> None:
    """``gemport validate gguf --reference model`` in a child process; fills row's metrics from its JSON."""
    out = logs / f"validate-{row.type}.json"
    gemport = Path(sys.executable).with_name("gemport")
    argv = [str(gemport), "validate", str(gguf), "--reference", str(model), "--windows", str(windows)]
    log.info("gemport validate %s (%d windows)", gguf.name, windows)
    start = time.perf_counter()
    run_tool([*argv, "--json", str(out)], f"gemport validate {gguf.name}", logs / f"validate-{row.type}.log")
    row.validate_seconds = time.perf_counter() - start
    report = json.loads(out.read_text())
    m = report["metrics"]
    nan = math.nan
    row.ppl_ref = m["ppl_ref"] if m["ppl_ref"] is not None else nan
    row.ppl = m["ppl_cand"] if m["ppl_cand"] is not None else nan
    row.delta_ppl_pct = m["delta_ppl_pct"] if m["delta_ppl_pct"] is not None else nan
    row.kld = m["kld"] if m["kld"] is not None else nan
    row.kld_se = m["kld_se"] if m["kld_se"] is not None else nan
    row.top1_pct = m["top1_pct"] if m["top1_pct"] is not None else nan
    row.tokens = int(m["tokens"])
    row.runtime = f"{report['runtime']['name']} ({report['runtime']['kind']})"


LP_PATTERNS = {
    "ppl": r"Mean PPL\(Q\)\s*:\s*([-\d.]+)",
    "ppl_base": r"Mean PPL\(base\)\s*:\s*([-\d.]+)",
    "kld": r"Mean\s+KLD:\s*([-\d.]+)",
    "top1_pct": r"Same top p:\s*([-\d.]+)",
}


def llama_perplexity_args(tools: LlamaCppTools, text: Path, n_ctx: int, windows: int) -> list[str]:
    # -ctk/-ctv f32 and -fa off: the same settings as gemport's llama.cpp runtime, so the two differ
    # only in the reference (BF16 GGUF in llama.cpp here, the HF model in transformers there).
    argv = [str(tools.perplexity), "-f", str(text), "-c", str(n_ctx), "-b", str(n_ctx), "--chunks", str(windows)]
    return [*argv, "-ctk", "f32", "-ctv", "f32", "-fa", "off", "-t", str(os.cpu_count() or 1), *SAFE_CPU_ARGS]


def llama_perplexity_kld(
    tools: LlamaCppTools, base: Path, quants: dict[str, Path], rows: dict[str, Row], windows: int, work: Path
) -> None:
    """llama-perplexity --kl-divergence of each quant against the BF16 GGUF; fills row.llama_perplexity."""
    from validation.corpus import load_text, split_text

    text = work / "eval.txt"
    text.write_text(split_text(load_text(None))[0], encoding="utf-8")
    logits = work / "bf16.kld-base"
    common = llama_perplexity_args(tools, text, 512, windows)
    log.info("llama-perplexity: saving the BF16 GGUF's logits (%d chunks)", windows)
    try:
        out = run_tool(
            [*common, "-m", str(base), "--kl-divergence-base", str(logits)],
            "llama-perplexity base",
            work / "lp-base.log",
        )
        match = re.search(r"Final estimate: PPL = ([\d.]+)", out)
        rows[BASE_TYPE].llama_perplexity = {"ppl": float(match.group(1))} if match else {}
        for qtype, path in quants.items():
            log.info("llama-perplexity --kl-divergence %s", path.name)
            start = time.perf_counter()
            argv = [*common, "-m", str(path), "--kl-divergence-base", str(logits), "--kl-divergence"]
            out = run_tool(argv, f"llama-perplexity {qtype}", work / f"lp-{qtype}.log")
            found = {k: float(m.group(1)) for k, p in LP_PATTERNS.items() if (m := re.search(p, out))}
            if "kld" not in found:
                raise BenchError(f"llama-perplexity printed no 'Mean KLD' for {path}; see {work / f'lp-{qtype}.log'}")
            rows[qtype].llama_perplexity = {**found, "seconds": time.perf_counter() - start}
    finally:
        logits.unlink(missing_ok=True)  # ~0.5 MB per scored token


# --- report ------------------------------------------------------------------------------------------


def strictly_increasing(values: list[float]) -> bool:
    return all(a < b for a, b in zip(values, values[1:], strict=False)) and all(map(math.isfinite, values))


def print_table(console: Console, model: Path, rows: list[Row], order_ok: bool, with_lp: bool) -> None:
    table = Table(title=f"llama.cpp quantizations of {model.name}, scored by gemport validate (llama.cpp runtime)")
    for name in ("type", "file MB", "bpw", "ppl", "Δppl %", "KLD", "top-1 %", "tensor types"):
        table.add_column(name, justify="left" if name in ("type", "tensor types") else "right")
    if with_lp:
        table.add_column("llama-perplexity KLD vs BF16", justify="right")
    for r in rows:
        cells = [
            r.type,
            f"{r.file_bytes / 1e6:.1f}",
            f"{r.bits_per_weight:.2f}",
            f"{r.ppl:.4f}",
            f"{r.delta_ppl_pct:+.3f}",
            f"{r.kld:.6f}",
            f"{r.top1_pct:.2f}",
            " ".join(f"{k}:{v}" for k, v in r.tensor_types.items()),
        ]
        if with_lp:
            cells.append(f"{r.llama_perplexity['kld']:.6f}" if "kld" in r.llama_perplexity else "-")
        table.add_row(*cells)
    console.print(table)
    ref = rows[0].ppl_ref
    console.print(f"reference ppl (transformers, fp32) {ref:.4f}; {rows[0].tokens} tokens scored per file")
    verdict = "yes" if order_ok else "NO"
    console.print(f"KLD strictly increasing {' < '.join(ORDER)}: {verdict}")
    validate_s = sum(r.validate_seconds for r in rows) / len(rows)
    timing = f"wall time per file: gemport validate {validate_s:.0f} s (reference in transformers included)"
    lp_s = [r.llama_perplexity["seconds"] for r in rows if "seconds" in r.llama_perplexity]
    if lp_s:
        mean_lp = sum(lp_s) / len(lp_s)
        timing += f", llama-perplexity --kl-divergence {mean_lp:.0f} s (ratio {validate_s / mean_lp:.1f})"
    console.print(timing)


# --- main --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, console: Console) -> int:
    model = args.model.resolve()
    fingerprint = model_fingerprint(model)
    tools = ensure_tools()
    if not tools.convert_hf_to_gguf.is_file():
        raise BenchError(f"convert_hf_to_gguf.py not found at {tools.convert_hf_to_gguf}")
    work = BENCH_DIR / "llamacpp" / model.name
    stamp = {"model": str(model), "files": fingerprint, "tools": str(tools.source), "fix": args.fix_tokenizer}
    prepare_workdir(work, stamp, args.fresh)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)

    source, n_fixed = conversion_source(model, work, args.fix_tokenizer)
    base = work / f"{model.name}.bf16.gguf"
    made = {BASE_TYPE: make_base(tools, source, base, logs)}
    quants = {q: work / f"{model.name}.{q.lower()}.gguf" for q in ORDER}
    for qtype, path in quants.items():
        made[qtype] = make_quant(tools, base, path, qtype, logs)

    rows: dict[str, Row] = {}
    for qtype, path in {BASE_TYPE: base, **quants}.items():
        bpw, types = gguf_stats(path)
        fallbacks = count_fallbacks(logs / f"{qtype}.log")
        rows[qtype] = Row(qtype, str(path), path.stat().st_size, bpw, types, fallbacks, made[qtype])
        gemport_validate(path, model, args.windows, rows[qtype], logs)
    if args.llama_perplexity:
        llama_perplexity_kld(tools, base, quants, rows, args.windows, work)

    order_ok = strictly_increasing([rows[q].kld for q in ORDER])
    print_table(console, model, list(rows.values()), order_ok, args.llama_perplexity)
    result = {
        "model": str(model),
        "windows": args.windows,
        "n_ctx": 512,
        "tools": tools.as_dict(),
        "tokenizer_config_fixed": n_fixed,
        "order": list(ORDER),
        "kld_strictly_increasing": order_ok,
        "rows": [asdict(r) for r in rows.values()],
    }
    if args.llama_perplexity:
        lp = [rows[q].llama_perplexity.get("kld", math.nan) for q in ORDER]
        result["llama_perplexity_kld_strictly_increasing"] = strictly_increasing(lp)
    out = args.json or BENCH_DIR / f"offgrid_order-{model.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=lambda x: None) + "\n")
    console.print(f"results: {out}")
    if not order_ok and args.order_gate:
        console.print("[red]FAIL[/red]: KLD does not rise strictly in the expected order")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF bf16 model folder (default: off-grid demo)")
    ap.add_argument("--windows", type=int, default=16, help="windows of 512 tokens to score (default 16)")
    ap.add_argument("--json", type=Path, help="results file (default build/bench/offgrid_order-<model>.json)")
    ap.add_argument("--fresh", action="store_true", help="remake the GGUFs even if they are up to date")
    ap.add_argument(
        "--llama-perplexity", action="store_true", help="also score each quant with llama-perplexity --kl-divergence"
    )
    ap.add_argument(
        "--no-order-gate",
        dest="order_gate",
        action="store_false",
        help="exit 0 even if KLD is out of order (e.g. for the faithful demo model)",
    )
    ap.add_argument(
        "--no-tokenizer-fix",
        dest="fix_tokenizer",
        action="store_false",
        help="convert the model folder as is, even if its tokenizer_config.json lacks added_tokens_decoder",
    )
    args = ap.parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=200)  # a pipe or a log keeps whole table rows
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console)])
    if args.windows < 1:
        ap.error("--windows must be at least 1")
    try:
        return run(args, console)
    except (BenchError, ToolError) as exc:
        console.print(f"[red]error[/red]: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
