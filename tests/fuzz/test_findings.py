"""What the fuzz targets found in the readers, one test per kind, each on several inputs of that kind:
a damaged or hostile file is one typed gemport error naming the file, never another exception."""

from __future__ import annotations

import io
import json
import shutil
import time
import zipfile
from pathlib import Path

import pytest
import torch

from converters import gemma_pytorch, hf, jax, onnx
from gemport.errors import CheckpointError, GemportError, InputError, UnsupportedError
from tests.fuzz import targets
from tests.fuzz.corpus import STAMP, build_corpus


@pytest.fixture(scope="module")
def models() -> dict[str, Path]:
    build_corpus()
    return {k: Path(v) for k, v in json.loads(STAMP.read_text()).items()}


def _copy(src: Path, dst: Path) -> Path:
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


# --- compressed-tensors: quantization_config values of the wrong type or meaning ---------------
@pytest.mark.parametrize(
    "change",
    [
        lambda q: "compressed-tensors",
        lambda q: q | {"config_groups": ["group_0"]},
        lambda q: q | {"config_groups": {"group_0": 7}},
        lambda q: _weights(q, num_bits="4"),
        lambda q: _weights(q, num_bits=True),
        lambda q: _weights(q, strategy="tensor"),
        lambda q: _weights(q, symmetric="yes"),
        lambda q: _weights(q, group_size=0),
        lambda q: _weights(q, group_size=None),
        lambda q: _weights(q, group_size=48),  # does not divide the 32 input columns
        lambda q: _weights(q, symmetric=False),  # no zero points stored
    ],
)
def test_compressed_tensors_config_values_are_checked(models, tmp_path, change):
    folder = _copy(models["ct-int4"], tmp_path / "ct")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = change(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(GemportError, match=str(folder)):
        targets.load_all(hf.read(folder))


def _weights(q: dict, **values) -> dict:
    q = json.loads(json.dumps(q))
    q["config_groups"]["group_0"]["weights"].update(values)
    return q


# --- gemma_pytorch: whatever torch.load raises, the legacy format, tensors of the wrong kind ------
def _ckpt(models, tmp_path: Path, name: str = "pt-gemma3") -> Path:
    folder = tmp_path / "pt"
    folder.mkdir()
    shutil.copy(models["hf-gemma3-1layer"] / "config.json", folder / "config.json")
    return _copy(models[name], folder / "model.ckpt")


@pytest.mark.parametrize("cut", [0, 1, 30, 200, -200, -30])
def test_damaged_torch_checkpoint_is_one_input_error(models, tmp_path, cut):
    path = _ckpt(models, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(InputError, match=str(path)):
        gemma_pytorch.read(path)


def test_damaged_pickle_inside_a_valid_zip_is_one_input_error(models, tmp_path):
    path = _ckpt(models, tmp_path)
    z = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    records = {i.filename.split("/", 1)[1]: z.read(i) for i in z.infolist()}
    for bad in (b"", b"\x80\x02X\xff\xff\xff\x7f", records["data.pkl"][:-7], records["data.pkl"].replace(b"q", b"Q")):
        from tests.fuzz.mutators import _torch_zip

        path.write_bytes(_torch_zip(records | {"data.pkl": bad}))
        with pytest.raises(InputError, match=str(path)):
            gemma_pytorch.read(path)


def test_legacy_torch_format_is_refused(models, tmp_path):
    path = _ckpt(models, tmp_path, "pt-legacy")
    with pytest.raises(UnsupportedError, match="legacy"):
        gemma_pytorch.read(path)


@pytest.mark.parametrize(
    "change",
    [
        {"model.norm.weight": torch.zeros(2, 32)},
        {"model.layers.0.mlp.down_proj.weight": torch.zeros(32, 64, 1)},
        {"model.layers.0.mlp.down_proj.weight": torch.zeros(32, 64, dtype=torch.int32)},
        {"model.layers.0.mlp.down_proj.weight_scaler": torch.ones(3)},
        {"embedder.weight": torch.zeros(48, 32, dtype=torch.complex64)},
        {"embedder.weight": torch.zeros(48, 32).to_sparse()},
    ],
)
def test_tensors_of_the_wrong_kind_are_refused(models, tmp_path, change):
    path = _ckpt(models, tmp_path, "pt-gemma3-int8" if "weight_scaler" in next(iter(change)) else "pt-gemma3")
    state = torch.load(path, weights_only=True)["model_state_dict"]
    if "weight_scaler" in next(iter(change)):
        state["model.layers.0.mlp.down_proj.weight"] = torch.zeros(32, 64, dtype=torch.int8)
    torch.save({"model_state_dict": state | change}, path)
    with pytest.raises(GemportError, match=str(path)):
        targets.load_all(gemma_pytorch.read(path))


# --- ONNX: metadata, layout entries, external data references, MatMulNBits sizes ----------------
def _edit_onnx(folder: Path, edit) -> None:
    import onnx as onnx_lib

    model = onnx_lib.load(str(folder / "model.onnx"), load_external_data=False)
    edit(model)
    onnx_lib.save(model, str(folder / "model.onnx"))


def _prop(model, key: str, change) -> None:
    for p in model.metadata_props:
        if p.key == key:
            p.value = change(p.value)


def _external(model, key: str, value: str) -> None:
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == key:
                e.value = value


def _layout(change):
    def edit(value: str) -> str:
        layout = json.loads(value)
        first = next(iter(layout))
        layout[first] = change(layout[first])
        return json.dumps(layout)

    return lambda m: _prop(m, onnx.LAYOUT_KEY, edit)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: _prop(m, onnx.SPEC_KEY, lambda v: v[:-3]),
        lambda m: _prop(m, onnx.SPEC_KEY, lambda v: "[1, 2]"),
        lambda m: _prop(m, onnx.LAYOUT_KEY, lambda v: "[]"),
        _layout(lambda e: e | {"kind": ["float"]}),
        _layout(lambda e: e | {"kind": "gather"}),
        _layout(lambda e: {k: v for k, v in e.items() if k != "name"}),
        _layout(lambda e: e | {"rows": [5, 2]}),
        _layout(lambda e: e | {"transform": "flip"}),
        _layout(lambda e: e | {"scale": 2}),
        lambda m: _external(m, "location", "../model.onnx.data"),
        lambda m: _external(m, "location", "/etc/hostname"),
        lambda m: _external(m, "offset", "-5"),
        lambda m: _external(m, "length", "twelve"),
    ],
)
def test_onnx_metadata_and_references_are_checked(models, tmp_path, edit):
    folder = _copy(models["onnx-gemma3-int4"], tmp_path / "onnx")
    _edit_onnx(folder, edit)
    with pytest.raises(GemportError, match=str(folder)):
        targets.load_all(onnx.read(folder))


def test_matmul_nbits_sizes_are_checked_before_dequantizing(models, tmp_path):
    folder = _copy(models["onnx-gemma3-int4"], tmp_path / "onnx")
    props = onnx.load_proto(folder / "model.onnx").metadata_props
    layout = json.loads(next(p.value for p in props if p.key == onnx.LAYOUT_KEY))
    name, entry = next((n, e) for n, e in layout.items() if e["kind"] == "matmul_nbits")
    _edit_onnx(folder, _layout_entry(name, entry | {"block_size": 16 if entry["block_size"] != 16 else 32}))
    with pytest.raises(CheckpointError, match="MatMulNBits initializers"):
        onnx.read(folder).tensors[name].load()
    _edit_onnx(folder, _layout_entry("model.norm.weight", entry))  # a matrix layout on a norm vector
    with pytest.raises(UnsupportedError, match="model.norm.weight"):
        onnx.read(folder)


def _layout_entry(name: str, entry: dict):
    def edit(value: str) -> str:
        return json.dumps(json.loads(value) | {name: entry})

    return lambda m: _prop(m, onnx.LAYOUT_KEY, edit)


# --- JAX: manifest file names, layer counts and ranks against the tree -------------------------
def _jax(models, tmp_path) -> tuple[Path, dict]:
    folder = _copy(models["jax-gemma3"], tmp_path / "jax")
    return folder, targets._tree_json(jax._orbax_tree(folder))


def _read_tree(folder: Path, tree: dict):
    fake = targets._fake_tree(tree)
    return targets.load_all(jax.read_tree(fake, folder, targets._FakeReader(fake)))


@pytest.mark.parametrize("names", [["../../etc/hostname"], ["/etc/hostname"], "tokenizer.model", [7]])
def test_jax_manifest_names_only_files_of_the_folder(models, tmp_path, names):
    folder, tree = _jax(models, tmp_path)
    manifest = json.loads((folder / "gemport.json").read_text())
    (folder / "gemport.json").write_text(json.dumps(manifest | {"tokenizer_files": names}))
    with pytest.raises(InputError, match="tokenizer_files"):
        jax.read(folder)


@pytest.mark.parametrize("layers", [10**9, 10**6, 3, 1])
def test_jax_layer_count_is_checked_against_the_tree_first(models, tmp_path, layers):
    folder, tree = _jax(models, tmp_path)
    manifest = json.loads((folder / "gemport.json").read_text())
    spec = manifest["spec"] | {"num_layers": layers}
    if "layer_types" in spec:
        spec["layer_types"] = (spec["layer_types"] * layers)[:layers] if layers < 100 else spec["layer_types"]
    (folder / "gemport.json").write_text(json.dumps(manifest | {"spec": spec}))
    start = time.monotonic()
    with pytest.raises(GemportError):
        _read_tree(folder, tree)
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("shape", [[], [48], [48, 32, 1], [0, 32]])
def test_jax_parameter_ranks_are_checked(models, tmp_path, shape):
    folder, tree = _jax(models, tmp_path)
    tree["transformer/embedder"]["input_embedding"][0] = shape
    with pytest.raises(CheckpointError, match="input_embedding"):
        _read_tree(folder, tree)


def _retype(name_part: str, data_type: int):
    """Store the first initializer whose name holds ``name_part`` as ``data_type`` with dims of 2**40."""

    def edit(model) -> None:
        t = next(t for t in model.graph.initializer if name_part in t.name)
        t.data_type = data_type
        del t.dims[:]
        t.dims.extend([1 << 20, 1 << 20])

    return edit


# onnx.TensorProto.DataType: UINT4 21, INT4 22, FLOAT4E2M1 23, INT8 3, DOUBLE 11, and one that does not exist
@pytest.mark.parametrize("data_type", [21, 22, 23, 3, 11, 999])
@pytest.mark.parametrize("which", ["input_layernorm.weight", ".qweight", ".scales"])
def test_onnx_initializer_of_another_stored_type_is_refused_before_it_is_read(models, tmp_path, data_type, which):
    folder = _copy(models["onnx-gemma3-int4"], tmp_path / "onnx")
    _edit_onnx(folder, _retype(which, data_type))
    with pytest.raises(CheckpointError, match=r"model\.onnx: initializer .* is stored as .*, expected"):
        targets.load_all(onnx.read(folder))


# --- Keras presets: config and manifest values, and the h5's datasets, of any kind -------------------
@pytest.fixture(scope="module")
def keras_preset(tmp_path_factory) -> Path:
    """A CausalLM preset of a micro Gemma 3 in bf16 (the keras fuzz target's seed of that name)."""
    from converters import keras
    from tests.fuzz.corpus import MICRO
    from tests.tiny import make_tiny

    variant, overrides, dtype, task, _ = targets.KERAS_PRESETS["gemma3"]
    tmp = tmp_path_factory.mktemp("keras")
    src = make_tiny(variant, tmp / "hf", dtype="bfloat16", **(MICRO | overrides))
    return keras.write(hf.read(src), tmp / "preset", dtype=dtype, task=task)


def _keras_json(folder: Path, name: str, change) -> None:
    data = json.loads((folder / name).read_text())
    (folder / name).write_text(json.dumps(change(data)))


@pytest.mark.parametrize("missing", ["eos_token_id", "bos_token_id", "max_position", "pad_token_id"])
def test_keras_manifest_without_optional_spec_fields_reads(keras_preset, tmp_path, missing):
    from converters import keras

    folder = _copy(keras_preset, tmp_path / "preset")
    _keras_json(folder, "gemport.json", lambda m: m | {"spec": {k: v for k, v in m["spec"].items() if k != missing}})
    targets.load_all(keras.read(folder))


@pytest.mark.parametrize(
    "change",
    [
        lambda c: c | {"class_name": {"a": 1}},
        lambda c: c | {"class_name": ["GemmaBackbone"]},
        lambda c: c | {"class_name": None},
        lambda c: c | {"config": c["config"] | {"global_rope_scaling_factor": -2.0}},
        lambda c: c | {"config": c["config"] | {"global_rope_scaling_factor": 0}},
        lambda c: c | {"config": c["config"] | {"global_rope_scaling_factor": float("nan")}},
        lambda c: c | {"config": c["config"] | {"global_rope_scaling_factor": float("inf")}},
        lambda c: c | {"config": c["config"] | {"head_dim": 0}},
        lambda c: c | {"config": c["config"] | {"num_layers": -1}},
    ],
)
def test_keras_config_values_of_any_type_are_one_error(keras_preset, tmp_path, change):
    from converters import keras

    folder = _copy(keras_preset, tmp_path / "preset")
    _keras_json(folder, "config.json", change)
    with pytest.raises(GemportError, match="config.json"):
        targets.load_all(keras.read(folder))


def _h5_replace(file: Path, key: str, **create) -> None:
    """Dataset ``key`` of the h5 made again with ``create_dataset``'s arguments (its attributes kept)."""
    import h5py

    with h5py.File(file, "r+") as h5:
        old = h5[key]
        data, attrs = old[()], dict(old.attrs)
        del h5[key]
        made = h5.create_dataset(key, **({"data": data} | create))
        for k, v in attrs.items():
            made.attrs[k] = v


EMBED, NORM = "layers/reversible_embedding/vars/0", "layers/rms_normalization/vars/0"


@pytest.mark.parametrize(
    ("key", "create", "message"),
    [
        (NORM, {"data": None, "shape": None, "dtype": "V2"}, "no shape"),  # an empty dataspace
        (EMBED, {"data": None, "shape": None, "dtype": "V2"}, "no shape"),
        (NORM, {"compression": "gzip"}, "filtered"),  # a small file announcing any size
        (EMBED, {"compression": "lzf"}, "filtered"),
        (NORM, {"data": None, "shape": (32,), "dtype": "V2", "chunks": (8,)}, "0 of its 4 chunks"),  # fill values
        (
            NORM,
            {"data": None, "shape": (32,), "dtype": "V2", "external": [("/etc/hostname", 0, 64)]},
            "is in an external file",
        ),
        (EMBED, {"data": None, "shape": (1 << 30, 32), "dtype": "V2", "chunks": (1, 32)}, "more than the file"),
    ],
)
def test_keras_h5_data_is_stored_in_full_in_the_file(keras_preset, tmp_path, key, create, message):
    from converters import keras

    folder = _copy(keras_preset, tmp_path / "preset")
    _h5_replace(folder / "model.weights.h5", key, **create)
    with pytest.raises(CheckpointError, match=message) as err:
        targets.load_all(keras.read(folder))
    assert "model.weights.h5" in str(err.value)


def test_keras_h5_virtual_dataset_is_refused(keras_preset, tmp_path):
    import h5py

    from converters import keras

    folder = _copy(keras_preset, tmp_path / "preset")
    (tmp_path / "other.h5").write_bytes((folder / "model.weights.h5").read_bytes())
    with h5py.File(folder / "model.weights.h5", "r+") as h5:
        del h5[NORM]
        layout = h5py.VirtualLayout(shape=(32,), dtype="float32")
        layout[...] = h5py.VirtualSource(str(tmp_path / "other.h5"), "x", shape=(32,), dtype="float32")
        h5.create_virtual_dataset(NORM, layout)
    with pytest.raises(CheckpointError, match="is a virtual dataset"):
        targets.load_all(keras.read(folder))


@pytest.mark.parametrize("tag", [[1, 2, 3], ["bfloat16", "bfloat16"], ["bfloat16"], b"bfloat16x", 7])
def test_keras_bfloat16_tag_of_another_type_is_not_bfloat16(keras_preset, tmp_path, tag):
    """Only Keras's scalar string attribute is read as the tag (its type and shape checked first)."""
    import h5py
    import numpy as np

    from converters import keras

    folder = _copy(keras_preset, tmp_path / "preset")
    with h5py.File(folder / "model.weights.h5", "r+") as h5:
        if isinstance(tag, list) and isinstance(tag[0], str):
            tag = np.array(tag, dtype=h5py.string_dtype() if len(tag) == 1 else "S")
        h5[NORM].attrs["dtype"] = tag
    with pytest.raises(CheckpointError, match=f"{NORM} has dtype"):
        targets.load_all(keras.read(folder))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_layers", 2**64 - 1),  # a sliding pattern of that many layers was built first: a hang
        ("num_layers", 10**9),
        ("num_layers", 1025),
        ("vocabulary_size", 2**40),
        ("intermediate_dim", 2**40),
        ("head_dim", 10**6),
        ("num_query_heads", 2**31),
        ("hidden_dim", 0),
    ],
)
def test_keras_config_counts_are_bounded_first(keras_preset, tmp_path, key, value):
    from converters import keras

    folder = _copy(keras_preset, tmp_path / "preset")
    _keras_json(folder, "config.json", lambda c: c | {"config": c["config"] | {key: value}})
    start = time.monotonic()
    with pytest.raises(InputError, match=f"config.json: config '{key}' is {value}, expected 1"):
        keras.read(folder)
    assert time.monotonic() - start < 2
