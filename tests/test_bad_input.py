"""Bad input: one-line error naming the file and the problem, exit code 2, nothing at DST."""

from __future__ import annotations

import errno
import json
import shutil
import struct
from pathlib import Path

import pytest

from gemport.cli import main


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def rewrite_safetensors(file: Path, edit) -> None:
    """Apply ``edit(header)`` to a safetensors header, keeping the data."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    data, parts = raw[8 + n :], []  # re-laid contiguously, as the format requires (dropped tensors' bytes go)
    for info in sorted((v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"]):
        start, end = info["data_offsets"]
        info["data_offsets"] = [sum(map(len, parts)), sum(map(len, parts)) + end - start]
        parts.append(data[start:end])
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    file.write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(parts))


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def wrong_magic(file: Path) -> None:
    file.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" + bytes(64))


def drop_tensor(header: dict) -> None:
    del header["model.layers.1.mlp.up_proj.weight"]


def reshape_tensor(header: dict) -> None:
    info = header["model.layers.0.self_attn.k_proj.weight"]
    info["shape"] = [info["shape"][1], info["shape"][0]]


CASES = {
    "truncated safetensors": (lambda m: truncate(m / "model.safetensors"), "model.safetensors", "truncated"),
    "wrong magic": (lambda m: wrong_magic(m / "model.safetensors"), "model.safetensors", "not a safetensors file"),
    "config missing a field": (lambda m: edit_config(m, hidden_size=None), "config.json", "hidden_size"),
    "llama config": (
        lambda m: edit_config(m, model_type="llama", architectures=["LlamaForCausalLM"]),
        "config.json",
        "unsupported architecture model_type='llama'",
    ),
    "missing tensor": (
        lambda m: rewrite_safetensors(m / "model.safetensors", drop_tensor),
        "",
        "missing tensor model.layers.1.mlp.up_proj.weight",
    ),
    "wrong shape": (
        lambda m: rewrite_safetensors(m / "model.safetensors", reshape_tensor),
        "",
        "model.layers.0.self_attn.k_proj.weight has shape [64, 32], expected [32, 64]",
    ),
}


def run_convert(src: Path, dst: Path, capsys, *extra: str) -> tuple[int, str]:
    code = main(["convert", str(src), str(dst), "--to", "hf", *extra])
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gemport: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def assert_nothing_left(dst: Path) -> None:
    assert not dst.exists()
    assert not list(dst.parent.glob(f".{dst.name}.partial-*"))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_source(tiny_models, tmp_path, capsys, case):
    damage, file_name, message = CASES[case]
    src = copy_model(tiny_models["gemma2"], tmp_path / "src")
    damage(src)
    dst = tmp_path / "dst"
    code, err = run_convert(src, dst, capsys)
    assert_one_line_error(code, err, str(src / file_name) if file_name else str(src), message)
    assert_nothing_left(dst)


def test_nan_weights(tiny_models, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    src = copy_model(tiny_models["gemma3"], tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.2.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    assert torch.isnan(load_file(src / "model.safetensors")["model.layers.2.mlp.down_proj.weight"]).any()
    dst = tmp_path / "dst"
    code, err = run_convert(src, dst, capsys)
    assert_one_line_error(code, err, str(src), "model.layers.2.mlp.down_proj.weight has NaN")
    assert_nothing_left(dst)


def test_unwritable_destination(tiny_models, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    dst = blocker / "out"
    code, err = run_convert(tiny_models["gemma2"], dst, capsys)
    assert_one_line_error(code, err, str(dst), "is a file")
    assert blocker.read_text() == "not a folder"


def test_disk_full_leaves_nothing(tiny_models, tmp_path, capsys, monkeypatch):
    from converters import hf

    real = hf._write_safetensors

    def fill_disk(path, tensors, advance, source):
        real(path, tensors[:2], advance, source)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hf, "_write_safetensors", fill_disk)
    dst = tmp_path / "dst"
    code, err = run_convert(tiny_models["gemma2"], dst, capsys)
    assert_one_line_error(code, err, str(dst), "disk full")
    assert_nothing_left(dst)


def test_missing_source(tmp_path, capsys):
    code, err = run_convert(tmp_path / "nope", tmp_path / "dst", capsys)
    assert_one_line_error(code, err, str(tmp_path / "nope"), "no such file or directory")


def test_unknown_folder(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    code, err = run_convert(tmp_path / "src", tmp_path / "dst", capsys)
    assert_one_line_error(code, err, str(tmp_path / "src"), "not a checkpoint gemport can read")


def test_cli_subprocess_exit_code(tiny_models, tmp_path):
    """The installed entry point: exit 2, one stderr line, no traceback."""
    import subprocess
    import sys

    src = copy_model(tiny_models["gemma-mha"], tmp_path / "src")
    truncate(src / "model.safetensors")
    proc = subprocess.run(
        [sys.executable, "-m", "gemport.cli", "convert", str(src), str(tmp_path / "dst"), "--to", "hf"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert_one_line_error(proc.returncode, proc.stderr, "truncated")
    assert_nothing_left(tmp_path / "dst")


@pytest.mark.parametrize("value", [[1, 2], 5, "text", None])
@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "model.safetensors.index.json"])
def test_json_file_that_is_not_an_object(tiny_models, tmp_path, capsys, name, value):
    """Every JSON file of an HF folder holds an object; anything else is one line naming that file."""
    src = copy_model(tiny_models["gemma2"], tmp_path / "src")
    if name.endswith("index.json"):  # a sharded folder: the index beside its one shard
        (src / "model.safetensors").rename(src / "model-00001-of-00001.safetensors")
    (src / name).write_text(json.dumps(value))
    dst = tmp_path / "dst"
    code, err = run_convert(src, dst, capsys)
    assert_one_line_error(code, err, str(src / name), "not an object")
    assert_nothing_left(dst)


@pytest.mark.parametrize("manifest", [[1], "x", {"quantization": [1]}, {"quantization": 3}])
def test_quantized_manifest_that_is_not_an_object(tiny_models, tmp_path, capsys, manifest):
    src = tmp_path / "int8"
    assert main(["quantize", str(tiny_models["gemma2"]), str(src), "--method", "rtn", "--bits", "8"]) == 0
    capsys.readouterr()
    (src / "gemport.json").write_text(json.dumps(manifest))
    code, err = run_convert(src, tmp_path / "dst", capsys, "--dtype", "f32")
    assert_one_line_error(code, err, str(src / "gemport.json"), "not an object")
    assert_nothing_left(tmp_path / "dst")
