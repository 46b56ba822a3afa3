"""The README's promise for every error: exit 2, ONE line on stderr naming the file at fault (when a
file is at fault) and the problem, nothing at the destination. Drives the real command line in a
subprocess over bad inputs of every format and command: missing files, folders with the wrong
contents, damaged files, unwritable or existing destinations, bad options."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from gemport import cli

ROOT = Path(__file__).resolve().parents[1]
PROGRESS_LINE = re.compile(r"gemport: (?!error: ).*, \d+ s( \(\d+ s in all\))?")


@dataclass
class Case:
    argv: list[str]
    fault: Path | None  # the path the line must name; None for a bad option (no file at fault)
    dst: Path | None = None  # must not appear (or stay as it was)
    needle: str = ""  # a word of the problem the line must hold


@pytest.fixture(scope="module")
def good(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The tiny Gemma 3 as HF (f32), GGUF and ONNX, made once."""
    root = tmp_path_factory.mktemp("good")
    hf = tiny_models["gemma3"]
    out = {"hf": hf, "sharded": tiny_models["gemma3-sharded-bf16"]}
    for fmt, name in (("gguf", "m.gguf"), ("onnx", "onnx")):
        assert cli.main(["convert", str(hf), str(root / name), "--to", fmt]) == 0
        out[fmt] = root / name
    return out


def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    return dst


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _truncated(src: Path, dst: Path, keep: int) -> Path:
    return _write(dst, src.read_bytes()[:keep])


def _hf_with(good, t: Path, edit: Callable[[Path], Path]) -> tuple[Path, Path]:
    """A copy of the tiny HF model with ``edit`` applied; returns (folder, the file at fault)."""
    src = _copy(good["hf"], t / "src")
    return src, edit(src)


def _nan_weight(src: Path) -> Path:
    from safetensors.torch import load_file, save_file

    file = src / "model.safetensors"
    tensors = load_file(file)
    name = next(n for n in tensors if n.endswith("mlp.down_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def _no_tokenizer(folder: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    return folder


def _validate(candidate: Path, reference: Path, *extra: str) -> list[str]:
    return ["validate", str(candidate), "--reference", str(reference), "--ctx", "64", "--windows", "1", *extra]


def _cases(good: dict[str, Path], t: Path) -> dict[str, Case]:
    """Every case builds its inputs under ``t`` (only the one case asked for is built)."""
    hf, dst = good["hf"], t / "out"
    return {
        # --- sources that are not there or not checkpoints ---
        "missing-source": lambda: Case(["convert", str(t / "nope"), str(dst), "--to", "hf"], t / "nope", dst),
        "empty-folder": lambda: Case(["convert", str(_mk(t / "empty")), str(dst), "--to", "gguf"], t / "empty", dst),
        "folder-of-other-files": lambda: Case(
            ["convert", str(_write(t / "f" / "notes.txt", "hi").parent), str(dst), "--to", "hf"], t / "f", dst
        ),
        "text-named-gguf": lambda: Case(
            ["convert", str(_write(t / "m.gguf", "not gguf")), str(dst), "--to", "hf"], t / "m.gguf", dst
        ),
        # --- damaged HF folders ---
        "config-not-json": lambda: Case(
            [
                "convert",
                str(_hf_with(good, t, lambda s: _write(s / "config.json", "{oops"))[0]),
                str(dst),
                "--to",
                "hf",
            ],
            t / "src" / "config.json",
            dst,
        ),
        "config-a-list": lambda: Case(
            [
                "convert",
                str(_hf_with(good, t, lambda s: _write(s / "config.json", "[1]"))[0]),
                str(dst),
                "--to",
                "gguf",
            ],
            t / "src" / "config.json",
            dst,
        ),
        "no-weights": lambda: Case(
            [
                "convert",
                str(_hf_with(good, t, lambda s: (s / "model.safetensors").unlink() or s)[0]),
                str(dst),
                "--to",
                "hf",
            ],
            t / "src",
            dst,
        ),
        "truncated-safetensors": lambda: Case(
            [
                "convert",
                str(_hf_with(good, t, lambda s: _truncated(s / "model.safetensors", s / "model.safetensors", 5000))[0]),
                str(dst),
                "--to",
                "gguf",
            ],
            t / "src" / "model.safetensors",
            dst,
        ),
        "safetensors-header-garbage": lambda: Case(
            [
                "convert",
                str(_hf_with(good, t, lambda s: _write(s / "model.safetensors", b"\xff" * 8 + b"{}"))[0]),
                str(dst),
                "--to",
                "hf",
            ],
            t / "src" / "model.safetensors",
            dst,
        ),
        "sharded-missing-shard": lambda: Case(
            ["convert", str(_sharded_missing(good, t)), str(dst), "--to", "hf"], t / "sharded", dst
        ),
        "nan-weight-to-hf": lambda: Case(
            ["convert", str(_hf_with(good, t, _nan_weight)[0]), str(dst), "--to", "hf"], t / "src", dst, "finite"
        ),
        "nan-weight-to-gguf": lambda: Case(
            ["convert", str(_hf_with(good, t, _nan_weight)[0]), str(t / "o.gguf"), "--to", "gguf"],
            t / "src",
            t / "o.gguf",
        ),
        "gguf-needs-tokenizer-model": lambda: Case(
            [
                "convert",
                str(_hf_with(good, t, lambda s: (s / "tokenizer.model").unlink() or s)[0]),
                str(t / "o.gguf"),
                "--to",
                "gguf",
            ],
            t / "src",
            t / "o.gguf",
            "tokenizer.model",
        ),
        # --- damaged GGUF, ONNX, gemma_pytorch ---
        "truncated-gguf": lambda: Case(
            ["convert", str(_truncated(good["gguf"], t / "t.gguf", 200)), str(dst), "--to", "hf"], t / "t.gguf", dst
        ),
        "gguf-garbage-after-magic": lambda: Case(
            ["inspect", str(_write(t / "g.gguf", b"GGUF" + b"\xff" * 60))], t / "g.gguf"
        ),
        "onnx-garbage-model": lambda: Case(
            ["convert", str(_write(t / "onnx" / "model.onnx", b"\x01garbage").parent), str(dst), "--to", "hf"],
            t / "onnx",
            dst,
        ),
        "onnx-missing-data": lambda: Case(
            ["convert", str(_onnx_without_data(good, t)), str(dst), "--to", "hf"], t / "onnx" / "model.onnx", dst
        ),
        "gemma-pytorch-garbage": lambda: Case(
            ["convert", str(_write(t / "model.ckpt", b"PK\x03\x04garbage")), str(dst), "--to", "hf"],
            t / "model.ckpt",
            dst,
        ),
        # --- destinations ---
        "destination-exists": lambda: Case(["convert", str(hf), str(_mk(dst)), "--to", "hf"], dst, dst, "exists"),
        "gguf-destination-exists": lambda: Case(
            ["convert", str(hf), str(_write(t / "o.gguf", "old")), "--to", "gguf"], t / "o.gguf", t / "o.gguf"
        ),
        "split-shard-exists": lambda: _split_shard_exists(hf, t),
        "destination-under-a-file": lambda: Case(
            ["convert", str(hf), str(_write(t / "file", "x") / "out"), "--to", "hf"], t / "file" / "out", t / "file"
        ),
        "destination-not-writable": lambda: Case(
            ["convert", str(hf), "/sys/gemport-out", "--to", "hf"], Path("/sys/gemport-out"), None
        ),
        "imatrix-out-exists": lambda: Case(
            ["imatrix", str(hf), str(_write(t / "i.gguf", "old"))], t / "i.gguf", t / "i.gguf", "exists"
        ),
        # --- options ---
        "argparse-choice": lambda: Case(["convert", str(hf), str(dst), "--to", "nope"], None, dst, "invalid choice"),
        "argparse-missing": lambda: Case(["quantize", str(hf), str(dst)], None, dst, "--bits"),
        "onnx-gguf-quant": lambda: Case(["convert", str(hf), str(dst), "--to", "onnx", "--quant", "q4_k"], None, dst),
        "hf-gguf-quant": lambda: Case(["convert", str(hf), str(dst), "--to", "hf", "--quant", "q8_0"], None, dst),
        "bad-gguf-quant": lambda: Case(
            ["convert", str(hf), str(t / "o.gguf"), "--to", "gguf", "--quant", "q9"], None, t / "o.gguf", "q9"
        ),
        "option-of-another-method": lambda: Case(
            ["quantize", str(hf), str(dst), "--bits", "4", "--grid", "5"], None, dst, "--grid"
        ),
        "bad-group-size": lambda: Case(["quantize", str(hf), str(dst), "--bits", "4", "--group-size", "48"], None, dst),
        "preset-on-hf": lambda: Case(
            ["convert", str(hf), str(dst), "--to", "hf", "--preset", "gemma-2b"], hf, dst, "--preset"
        ),
        "missing-imatrix": lambda: Case(
            ["convert", str(hf), str(t / "o.gguf"), "--to", "gguf", "--quant", "q4_0", "--imatrix", str(t / "no.dat")],
            t / "no.dat",
            t / "o.gguf",
        ),
        "inspect-missing": lambda: Case(["inspect", str(t / "nope")], t / "nope"),
        # --- validate ---
        "validate-window-too-short": lambda: Case([*_validate(hf, hf)[:-4], "--ctx", "2"], None),
        "validate-no-windows": lambda: Case([*_validate(hf, hf)[:-2], "--windows", "0"], None),
        "validate-missing-candidate": lambda: Case(_validate(t / "nope", hf), t / "nope"),
        "validate-missing-reference": lambda: Case(_validate(hf, t / "nope"), t / "nope"),
        "validate-reference-not-hf": lambda: Case(_validate(hf, good["gguf"]), good["gguf"], None, "Hugging Face"),
        "validate-candidate-without-tokenizer": lambda: Case(
            _validate(_no_tokenizer(_copy(hf, t / "cand")), hf), t / "cand", None, "candidate folder has no tokenizer"
        ),
        "validate-reference-without-tokenizer": lambda: Case(
            _validate(hf, _no_tokenizer(_copy(hf, t / "ref"))), t / "ref", None, "reference folder has no tokenizer"
        ),
        "validate-json-is-a-folder": lambda: Case(_validate(hf, hf, "--json", str(_mk(t / "j"))), t / "j"),
        "validate-missing-corpus": lambda: Case(_validate(hf, hf, "--corpus", str(t / "c.txt")), t / "c.txt"),
        "validate-no-runtime": lambda: Case(
            _validate(_write(t / "model.ckpt", b"PK\x03\x04garbage"), hf), t / "model.ckpt"
        ),
        "validate-onnx-missing-data": lambda: Case(_validate(_onnx_without_data(good, t), hf), t / "onnx"),
    }


def _split_shard_exists(hf: Path, t: Path) -> Case:
    """The second shard's name is taken: refused before anything is written, naming that shard."""
    taken = _write(t / "s-00002-of-00015.gguf", "old")
    argv = ["convert", str(hf), str(t / "s.gguf"), "--to", "gguf", "--split-max-size", "60KB"]
    return Case(argv, taken, t / "s-00001-of-00015.gguf", "exists")


def _mk(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _sharded_missing(good, t: Path) -> Path:
    src = _copy(good["sharded"], t / "sharded")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    next(src / f for f in sorted(set(index["weight_map"].values()))).unlink()
    return src


def _onnx_without_data(good, t: Path) -> Path:
    src = _copy(good["onnx"], t / "onnx")
    (src / "model.onnx.data").unlink()
    return src


CASE_NAMES = list(_cases({"hf": Path(), "gguf": Path(), "onnx": Path(), "sharded": Path()}, Path()))


def _entries(folder: Path) -> dict[str, bytes | None]:
    return {p.name: (p.read_bytes() if p.is_file() else None) for p in folder.iterdir()} if folder.is_dir() else {}


@pytest.mark.parametrize("name", CASE_NAMES)
def test_error_is_one_line_naming_the_file(good, tmp_path, name):
    t = tmp_path / "case"
    t.mkdir()
    case = _cases(good, t)[name]()
    watch = case.dst.parent if case.dst is not None else None
    before = _entries(watch) if watch else {}
    proc = subprocess.run(
        [sys.executable, "-m", "gemport.cli", *case.argv], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    # a step that ran long before the error (the reference's forward pass on a slow machine) may have
    # printed progress lines (gemport/progress.py: "gemport: LABEL, N s"); the error is one line after them
    lines = [line for line in proc.stderr.splitlines() if not PROGRESS_LINE.fullmatch(line)]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and proc.stderr.splitlines()[-1] == lines[0], proc.stderr
    assert lines[0].startswith("gemport") and "error: " in lines[0] and "Traceback" not in proc.stderr
    if case.fault is not None:
        assert str(case.fault) in lines[0], lines[0]
    assert case.needle in lines[0], lines[0]
    if watch is not None:  # nothing new beside the destination, and what was there is unchanged
        assert _entries(watch) == before, (sorted(_entries(watch)), sorted(before))
