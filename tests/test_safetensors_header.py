"""The safetensors header and the sharded index are validated as a whole before use.

Generated variants of each kind of damage (beyond field case safetensors-header-shapes.sh): the header
not a JSON object, __metadata__ not a map of strings, entries of the wrong type, unknown dtypes, bad
shapes, data_offsets missing, malformed, reversed, overlapping, with gaps, outside the file, or not
matching shape x dtype, and a header length past the file or the safetensors library's 100 MB cap.
Each is one line on stderr naming the file, exit 2, nothing at the destination; the structural ones
are refused by the safetensors library too (its reader is the reference for what a valid file is).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from gemport.cli import main
from tests.test_bad_input import assert_nothing_left, assert_one_line_error

CONFIG = {
    "model_type": "gemma3_text",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "sliding_window": 16,
}
GOOD = {
    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    "b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [8, 16]},
}


def safetensors_bytes(header, data: bytes = bytes(16), pad: bool = True) -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


def folder_with(root: Path, raw: bytes) -> Path:
    root.mkdir()
    (root / "config.json").write_text(json.dumps(CONFIG))
    (root / "model.safetensors").write_bytes(raw)
    return root


def edited(**entries) -> dict:
    """GOOD with entries replaced (None removes one)."""
    out = {k: dict(v) for k, v in GOOD.items()}
    for name, value in entries.items():
        if value is None:
            out.pop(name)
        else:
            out[name] = value
    return out


def with_a(**fields) -> dict:
    """GOOD with fields of tensor ``a`` replaced (the value REMOVE drops the field)."""
    a = dict(GOOD["a"])
    for k, v in fields.items():
        if v is REMOVE:
            a.pop(k)
        else:
            a[k] = v
    return edited(a=a)


REMOVE = object()

# name -> (file bytes, words of the one-line error)
STRUCTURE = {
    "header is a list": (safetensors_bytes(b"[1,2,3]"), "JSON list"),
    "header is a number": (safetensors_bytes(b"5"), "JSON int"),
    "header is a string": (safetensors_bytes(b'"x"'), "JSON str"),
    "header is null": (safetensors_bytes(b"null"), "JSON NoneType"),
    "header is not JSON": (safetensors_bytes(b"{not json"), "not JSON"),
    "header is not UTF-8": (safetensors_bytes(b'{"\xff": 1}'), "not JSON"),
    "header deeply nested": (safetensors_bytes(b"[" * 100000 + b"]" * 100000), "not"),
    "header length past the file": (struct.pack("<Q", 1 << 40) + b"{}", "bad header length"),
    "file shorter than 8 bytes": (b"\x02\x00", "no header"),
    "entry is a number": (safetensors_bytes(edited(a=5)), "tensor a: header entry is a JSON int"),
    "entry is a list": (safetensors_bytes(edited(a=[1])), "tensor a: header entry is a JSON list"),
    "entry is null": (safetensors_bytes(edited(a=None) | {"a": None}), "tensor a: header entry is a JSON NoneType"),
    "no dtype": (safetensors_bytes(with_a(dtype=REMOVE)), "tensor a: unknown dtype None"),
    "unknown dtype": (safetensors_bytes(with_a(dtype="F33")), "tensor a: unknown dtype 'F33'"),
    "dtype a number": (safetensors_bytes(with_a(dtype=4)), "tensor a: unknown dtype 4"),
    "no shape": (safetensors_bytes(with_a(shape=REMOVE)), "tensor a: shape None"),
    "shape a string": (safetensors_bytes(with_a(shape="2")), "tensor a: shape '2'"),
    "shape negative": (safetensors_bytes(with_a(shape=[-2])), "tensor a: shape [-2]"),
    "shape float": (safetensors_bytes(with_a(shape=[2.0])), "tensor a: shape [2.0]"),
    "shape bool": (safetensors_bytes(with_a(shape=[True, True])), "tensor a: shape [True, True]"),
    "shape nested": (safetensors_bytes(with_a(shape=[[2]])), "tensor a: shape [[2]]"),
    "no data_offsets": (safetensors_bytes(with_a(data_offsets=REMOVE)), "tensor a: data_offsets None"),
    "data_offsets one number": (safetensors_bytes(with_a(data_offsets=[8])), "tensor a: data_offsets [8]"),
    "data_offsets three numbers": (safetensors_bytes(with_a(data_offsets=[0, 4, 8])), "data_offsets [0, 4, 8]"),
    "data_offsets strings": (safetensors_bytes(with_a(data_offsets=["0", "8"])), "data_offsets ['0', '8']"),
    "data_offsets negative": (safetensors_bytes(with_a(data_offsets=[-8, 0])), "data_offsets [-8, 0]"),
    "data_offsets an object": (safetensors_bytes(with_a(data_offsets={"0": 8})), "data_offsets {'0': 8}"),
    "data_offsets reversed": (safetensors_bytes(with_a(data_offsets=[8, 0])), "end before they start"),
    "tensors overlap": (
        safetensors_bytes(edited(b={"dtype": "BF16", "shape": [2, 2], "data_offsets": [4, 12]}), bytes(12)),
        "overlaps the previous tensor",
    ),
    "gap between tensors": (
        safetensors_bytes(edited(b={"dtype": "BF16", "shape": [2, 2], "data_offsets": [12, 20]}), bytes(20)),
        "gap of 4 bytes",
    ),
    "first tensor not at 0": (
        safetensors_bytes(edited(a={"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}, b=None), bytes(24)),
        "gap of 16 bytes",
    ),
    "span shorter than shape": (
        safetensors_bytes(with_a(shape=[3])),
        "shape [3] of F32 is 12 bytes, data_offsets span 8",
    ),
    "shape of a huge tensor": (safetensors_bytes(with_a(shape=[1 << 40, 1 << 40])), "data_offsets span 8"),
    "data past the file": (safetensors_bytes(GOOD, bytes(12)), "truncated safetensors file"),
    "data shorter than the offsets, offsets huge": (
        safetensors_bytes(edited(b={"dtype": "U8", "shape": [1 << 50], "data_offsets": [8, 8 + (1 << 50)]})),
        "truncated safetensors file",
    ),
    "bytes after the data": (safetensors_bytes(GOOD, bytes(24)), "longer than its tensors"),
    "metadata a list": (safetensors_bytes(GOOD | {"__metadata__": ["pt"]}), "__metadata__"),
    "metadata of numbers": (safetensors_bytes(GOOD | {"__metadata__": {"format": 1}}), "__metadata__"),
}
# Valid files of dtypes the HF reader does not take (its tensors are floats; integers only in a
# compressed-tensors folder): the safetensors library reads them, gemport names the dtype.
UNSUPPORTED = {
    "F64 tensor": (safetensors_bytes(with_a(dtype="F64", shape=[1])), "tensor a has unsupported dtype F64"),
    "U8 tensor": (safetensors_bytes(with_a(dtype="U8", shape=[8])), "tensor a has unsupported dtype U8"),
}


def convert_refused(folder: Path, tmp_path: Path, capsys, file: Path, *words: str) -> None:
    dst = tmp_path / "dst"
    code = main(["convert", str(folder), str(dst), "--to", "hf"])
    assert_one_line_error(code, capsys.readouterr().err, str(file), *words)
    assert_nothing_left(dst)


@pytest.mark.parametrize("case", list(STRUCTURE))
def test_malformed_header_is_one_line(case, tmp_path, capsys):
    raw, words = STRUCTURE[case]
    folder = folder_with(tmp_path / "src", raw)
    convert_refused(folder, tmp_path, capsys, folder / "model.safetensors", words)


@pytest.mark.parametrize("case", [c for c in STRUCTURE if c != "header deeply nested"])
def test_the_safetensors_library_refuses_them_too(case, tmp_path):
    from safetensors import SafetensorError, safe_open

    raw, _ = STRUCTURE[case]
    file = tmp_path / "x.safetensors"
    file.write_bytes(raw)
    with pytest.raises((SafetensorError, OSError, ValueError)):
        with safe_open(file, framework="np") as f:
            for name in f.keys():
                f.get_slice(name)


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_valid_header_of_a_dtype_not_read(case, tmp_path, capsys):
    from safetensors import safe_open

    raw, words = UNSUPPORTED[case]
    folder = folder_with(tmp_path / "src", raw)
    with safe_open(folder / "model.safetensors", framework="np") as f:  # a valid file
        assert sorted(f.keys()) == ["a", "b"]
    convert_refused(folder, tmp_path, capsys, folder / "model.safetensors", words)


def test_header_over_the_100_mb_cap(tmp_path, capsys):
    """A header length past the safetensors library's cap is refused before anything is read (a sparse
    file, so the file really is long enough)."""
    folder = folder_with(tmp_path / "src", b"")
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", 100_000_001) + b"{")
        f.truncate(200_000_000)
    convert_refused(folder, tmp_path, capsys, folder / "model.safetensors", "bad header length")


# --- the sharded index --------------------------------------------------------------------------


@pytest.fixture
def sharded(tiny_models, tmp_path) -> Path:
    folder = tmp_path / "src"
    shutil.copytree(tiny_models["gemma3-sharded-bf16"], folder)
    return folder


def edit_index(folder: Path, edit) -> Path:
    file = folder / "model.safetensors.index.json"
    index = json.loads(file.read_text())
    index = edit(index)
    file.write_text(index if isinstance(index, str) else json.dumps(index))
    return file


def _first(index: dict) -> str:
    return next(iter(index["weight_map"]))


INDEX_CASES = {
    "index is a list": (lambda i: [i], "JSON list"),
    "index is not JSON": (lambda i: "{", "not valid JSON"),
    "no weight_map": (lambda i: {"metadata": i["metadata"]}, "no weight_map"),
    "weight_map a list": (lambda i: i | {"weight_map": list(i["weight_map"])}, "no weight_map"),
    "weight_map empty": (lambda i: i | {"weight_map": {}}, "no weight_map"),
    "metadata a list": (lambda i: i | {"metadata": [1]}, "metadata is a JSON list"),
    "shard a number": (
        lambda i: i | {"weight_map": i["weight_map"] | {_first(i): 3}},
        "is not a .safetensors file name",
    ),
    "shard outside the folder": (
        lambda i: i | {"weight_map": i["weight_map"] | {_first(i): "../model.safetensors"}},
        "'../model.safetensors' is not a .safetensors file name",
    ),
    "shard in a subfolder": (
        lambda i: i | {"weight_map": i["weight_map"] | {_first(i): "sub/x.safetensors"}},
        "'sub/x.safetensors' is not",
    ),
    "shard not safetensors": (
        lambda i: i | {"weight_map": i["weight_map"] | {_first(i): "pytorch_model.bin"}},
        "'pytorch_model.bin' is not",
    ),
    "shard missing": (
        lambda i: i | {"weight_map": i["weight_map"] | {_first(i): "model-00009-of-00009.safetensors"}},
        "shard model-00009-of-00009.safetensors named by the index is missing",
    ),
    "tensor in no shard": (
        lambda i: (
            i | {"weight_map": i["weight_map"] | {"model.layers.9.mlp.up_proj.weight": i["weight_map"][_first(i)]}}
        ),
        "the index puts tensor model.layers.9.mlp.up_proj.weight in",
    ),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_malformed_index_is_one_line(case, sharded, tmp_path, capsys):
    edit, words = INDEX_CASES[case]
    file = edit_index(sharded, edit)
    convert_refused(sharded, tmp_path, capsys, file, words)


def test_stale_index_still_reads(sharded, tmp_path, caplog):
    """A tensor the index places in another shard than the one holding it (a stale index): every shard
    is read, as transformers does; logged, and the conversion succeeds."""

    def swap(index: dict) -> dict:
        names = list(index["weight_map"])
        first, last = names[0], names[-1]
        files = index["weight_map"]
        assert files[first] != files[last]
        files[first], files[last] = files[last], files[first]
        return index

    edit_index(sharded, swap)
    assert main(["convert", str(sharded), str(tmp_path / "dst"), "--to", "hf"]) == 0
    assert "stale index" in caplog.text
