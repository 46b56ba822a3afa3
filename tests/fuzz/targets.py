"""The fuzz targets: one per reader, each an input encoding, its seeds, a mutator and a run.

A run reads the input with gemport's reader and loads every tensor (readers are lazy, so the
data paths run too). The oracle (harness.py): a gemport error (``GemportError``) is the right
answer to a bad input; any other exception, an allocation over the bound or an input taking
longer than the time limit is a finding. A loaded tensor whose shape is not the one the reader
announced is a finding too.

Inputs whose first byte is a selector pick a fixture folder (the config.json beside the fuzzed
file); bundles hold several named files (mutators.pack_bundle).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fuzz import mutators as mut


class NotRepresentable(Exception):
    """An input the harness cannot stand for (e.g. a fake JAX leaf of more than ``MAX_FAKE`` elements:
    its real data would be larger than the inputs fuzzed); not a finding."""


@dataclass
class Target:
    name: str
    reader: str  # the module whose reader this fuzzes (the report groups by it)
    seeds: Callable[[dict[str, Path]], list[bytes]]
    setup: Callable[[dict[str, Path], Path], Any]
    run: Callable[[bytes, Any], None]
    mutate: Callable[[bytes, int, random.Random], bytes]
    # Modules instrumented for coverage beyond gemport's own (gemport, converters, quantizers).
    instrument: tuple[str, ...] = field(default=())


def load_all(ckpt) -> None:
    """Load every tensor (records dequantized), checking each against the shape announced."""
    for t in ckpt.tensors.values():
        data = t.load()
        if t.quant is not None:
            data = data.dequantize("f32")
        if tuple(data.shape) != tuple(t.shape):
            raise AssertionError(f"{t.name} loaded as {list(data.shape)}, announced {list(t.shape)}")


def _write(path: Path, data: bytes | None) -> None:
    if data is None:
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(data)


def _pick(data: bytes, folders: list[Path]) -> tuple[Path, bytes]:
    return folders[(data[0] if data else 0) % len(folders)], data[1:]


def _fixture_folders(models: dict[str, Path], names: list[str], scratch: Path, keep: tuple[str, ...]) -> list[Path]:
    """One scratch folder per fixture with the files ``keep`` copied from the model folder."""
    out = []
    for i, name in enumerate(names):
        folder = scratch / f"{i}-{name}"
        folder.mkdir(parents=True)
        for f in keep:
            if (Path(models[name]) / f).is_file():
                shutil.copy(Path(models[name]) / f, folder / f)
        out.append(folder)
    return out


# --- GGUF --------------------------------------------------------------------------------------
GGUF_MODELS = [
    "gguf-gemma-mha",
    "gguf-gemma2",
    "gguf-gemma3",
    "gguf-gemma3-q8_0",
    "gguf-gemma3-q4_0",
    "gguf-gemma3-f16",
]


def _gguf_seeds(models):
    return [Path(models[n]).read_bytes() for n in GGUF_MODELS]


def _gguf_setup(models, scratch):
    return scratch / "model.gguf"


def _gguf_run(data, file):
    from converters import gguf

    file.write_bytes(data)
    load_all(gguf.read(file))


# --- safetensors (hf reader, the fuzzed file beside a fixed config.json) ---------------------
HF_MODELS = ["hf-gemma-mha", "hf-gemma-mqa", "hf-gemma2", "hf-gemma3", "hf-gemma3-f32", "ct-int4", "ct-int8"]


def _st_seeds(models):
    return [bytes([i]) + (Path(models[n]) / "model.safetensors").read_bytes() for i, n in enumerate(HF_MODELS)]


def _st_setup(models, scratch):
    return _fixture_folders(models, HF_MODELS, scratch, ("config.json", "gemport.json"))


def _hf_run(folder: Path) -> None:
    from converters import hf

    load_all(hf.read(folder))


def _st_run(data, folders):
    folder, body = _pick(data, folders)
    (folder / "model.safetensors").write_bytes(body)
    _hf_run(folder)


# --- a whole HF folder: the sharded index, shards, gemport.json, generation_config.json ------
HF_FOLDERS = ["hf-gemma3-sharded", "ct-int4", "hf-gemma-mqa"]


def _folder_seeds(models):
    files = [sorted(f for f in Path(models[n]).iterdir() if f.suffix in (".json", ".safetensors")) for n in HF_FOLDERS]
    return [mut.pack_bundle({f.name: f.read_bytes() for f in folder}) for folder in files]


def _folder_setup(models, scratch):
    folder = scratch / "hf"
    folder.mkdir()
    return folder


def _folder_run(data, folder):
    for f in folder.iterdir():
        f.unlink()
    for name, body in mut.unpack_bundle(data).items():
        if name in (".", "..") or "/" in name or "\0" in name or not name:
            continue  # the folder's own files only
        try:
            (folder / name).write_bytes(body)
        except OSError:  # a name the file system refuses (too long): no such file in a real folder
            continue
    _hf_run(folder)


# --- config.json (GemmaSpec.from_hf_config, then the hf reader with fixed weights) -----------
def _config_seeds(models):
    return [bytes([i]) + (Path(models[n]) / "config.json").read_bytes() for i, n in enumerate(HF_MODELS)]


def _config_setup(models, scratch):
    return _fixture_folders(models, HF_MODELS, scratch, ("model.safetensors", "gemport.json"))


def _config_run(data, folders):
    from gemport.spec import GemmaSpec

    folder, body = _pick(data, folders)
    try:
        config = json.loads(body)
    except (ValueError, RecursionError):
        config = None
    if isinstance(config, dict):
        GemmaSpec.from_hf_config(config, folder / "config.json")
    (folder / "config.json").write_bytes(body)
    _hf_run(folder)


# --- compressed-tensors (config.json's quantization_config and the packed tensors) ------------
# gemport.json (the hf reader's manifest) stays as written: the compressed-tensors reader is config.json's
# quantization_config and the packed tensors.
CT_FILES = ("config.json", "model.safetensors")


def _ct_seeds(models):
    return [mut.pack_bundle({f: (Path(models[n]) / f).read_bytes() for f in CT_FILES}) for n in ("ct-int4", "ct-int8")]


def _ct_setup(models, scratch):
    folder = scratch / "ct"
    folder.mkdir()
    shutil.copy(Path(models["ct-int4"]) / "gemport.json", folder / "gemport.json")
    return folder


def _ct_run(data, folder):
    files = mut.unpack_bundle(data)
    for f in CT_FILES:
        _write(folder / f, files.get(f))
    _hf_run(folder)


# --- JAX: gemport's reading of the Orbax metadata tree, in process ---------------------------
# Orbax's own metadata parse takes about 25 ms (asyncio, tensorstore), too slow for 200,000 runs;
# "jax" fuzzes everything jax.read does with the tree orbax returns (jax.read_tree) plus the
# gemport.json manifest, with leaves loaded as arrays of the announced shape; "jax-orbax" fuzzes
# the real folder files through orbax, at a few runs a second.
JAX_MODELS = ["jax-gemma-mha", "jax-gemma2", "jax-gemma3", "jax-gemma3-nested"]
MAX_FAKE = 1 << 20


@dataclass(frozen=True)
class _FakeLeaf:
    shape: tuple
    dtype: str


def _tree_json(tree) -> Any:
    if isinstance(tree, dict):
        return {str(k): _tree_json(v) for k, v in tree.items()}
    return [list(tree.shape), str(tree.dtype)]


def _fake_tree(value) -> Any:
    if isinstance(value, dict):
        return {k: _fake_tree(v) for k, v in value.items()}
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], list) and isinstance(value[1], str):
        if all(type(d) is int and d >= 0 for d in value[0]):  # tensorstore's shapes are counts
            return _FakeLeaf(tuple(value[0]), value[1])
    return value


class _FakeReader:
    """Arrays of the shape and dtype the tree announces, as orbax's restore returns them."""

    def __init__(self, tree):
        self.tree = tree

    def get(self, key):
        import ml_dtypes
        import numpy as np

        leaf = self.tree
        for k in key:
            leaf = leaf[k]
        n = 1
        for d in leaf.shape:
            n *= d
        if n > MAX_FAKE:
            raise NotRepresentable(f"{key}: {n} elements")
        dtype = ml_dtypes.bfloat16 if leaf.dtype == "bfloat16" else np.dtype(leaf.dtype)
        return np.zeros(leaf.shape, dtype=dtype)


def _jax_seeds(models):
    from converters import jax

    seeds = []
    for n in JAX_MODELS:
        folder = Path(models[n])
        tree = json.dumps(_tree_json(jax._orbax_tree(folder))).encode()
        seeds.append(mut.pack_bundle({"tree.json": tree, "gemport.json": (folder / "gemport.json").read_bytes()}))
        seeds.append(mut.pack_bundle({"tree.json": tree, "tokenizer.model": (folder / "tokenizer.model").read_bytes()}))
    return seeds


def _jax_setup(models, scratch):
    folder = scratch / "jax"
    folder.mkdir()
    (folder / "_METADATA").write_text("{}")  # sniff() looks for it; the tree comes from the input
    return folder


def _jax_run(data, folder):
    from converters import jax

    files = mut.unpack_bundle(data)
    try:
        tree = _fake_tree(json.loads(files.get("tree.json", b"")))
    except (ValueError, RecursionError):
        return  # orbax would refuse a _METADATA that is not JSON; the jax-orbax target covers that
    for f in ("gemport.json", "tokenizer.model"):
        _write(folder / f, files.get(f))
    try:
        load_all(jax.read_tree(tree, folder, _FakeReader(tree)))
    except NotRepresentable:
        pass


JAX_ORBAX_FILES = ("_METADATA", "_CHECKPOINT_METADATA", "gemport.json")


def _jax_orbax_seeds(models):
    return [
        bytes([i]) + mut.pack_bundle({f: (Path(models[n]) / f).read_bytes() for f in JAX_ORBAX_FILES})
        for i, n in enumerate(JAX_MODELS)
    ]


def _jax_orbax_setup(models, scratch):
    folders = []
    for i, n in enumerate(JAX_MODELS):
        folder = scratch / f"{i}-{n}"
        shutil.copytree(models[n], folder)
        folders.append(folder)
    return folders


def _jax_orbax_run(data, folders):
    from converters import jax

    folder, body = _pick(data, folders)
    files = mut.unpack_bundle(body)
    for f in JAX_ORBAX_FILES:
        _write(folder / f, files.get(f))
    load_all(jax.read(folder))


# --- gemma_pytorch (.ckpt through torch.load(weights_only=True)) ------------------------------
PT_CONFIGS = {"gemma-mha": "hf-gemma-mha-1layer", "gemma2": "hf-gemma2-1layer", "gemma3": "hf-gemma3-1layer"}


def _pt_seeds(models):
    seeds = []
    for i, variant in enumerate(PT_CONFIGS):
        for suffix in ("", "-int8"):
            seeds.append(bytes([i]) + Path(models[f"pt-{variant}{suffix}"]).read_bytes())
    seeds.append(bytes([2]) + Path(models["pt-legacy"]).read_bytes())
    seeds.append(bytes([len(PT_CONFIGS)]) + Path(models["pt-gemma3"]).read_bytes())  # no config.json beside it
    return seeds


def _pt_setup(models, scratch):
    folders = _fixture_folders(models, list(PT_CONFIGS.values()), scratch, ("config.json",))
    bare = scratch / "no-config"
    bare.mkdir()
    return [*folders, bare]


def _pt_run(data, folders):
    from converters import gemma_pytorch

    folder, body = _pick(data, folders)
    (folder / "model.ckpt").write_bytes(body)
    load_all(gemma_pytorch.read(folder / "model.ckpt"))


# --- ONNX folders ----------------------------------------------------------------------------
ONNX_MODELS = ["onnx-gemma-mqa", "onnx-gemma3", "onnx-gemma3-int4"]
ONNX_FILES = ("model.onnx", "model.onnx.data", "genai_config.json", "gemport.json")


def _onnx_seeds(models):
    return [
        mut.pack_bundle({f: (Path(models[n]) / f).read_bytes() for f in ONNX_FILES if (Path(models[n]) / f).is_file()})
        for n in ONNX_MODELS
    ]


def _onnx_setup(models, scratch):
    folder = scratch / "onnx"
    folder.mkdir()
    return folder


def _onnx_run(data, folder):
    from converters import onnx

    files = mut.unpack_bundle(data)
    for f in ONNX_FILES:
        _write(folder / f, files.get(f))
    load_all(onnx.read(folder))


# --- keras-hub presets: config.json, metadata.json, model.weights.h5, the vocabulary ------------------
# Seeds are presets gemport writes of micro models (2 layers; Gemma 3's both sliding, keras-hub's
# pattern): CausalLM presets with the tokenizer in bf16, f32 and f16, a backbone preset, one without
# gemport.json (as keras-hub saves it). The h5 is mutated through h5py (_mutate_h5).
KERAS_FILES = ("config.json", "metadata.json", "model.weights.h5", "gemport.json", "assets/tokenizer/vocabulary.spm")
KERAS_PRESETS = {  # name -> (variant, make_tiny overrides, dtype, CausalLM, keep gemport.json)
    "gemma-mha": ("gemma-mha", dict(num_key_value_heads=2), "bf16", True, True),
    "gemma2": (
        "gemma2",
        dict(num_key_value_heads=1, query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"]),
        "f32",
        True,
        True,
    ),
    "gemma3": ("gemma3", dict(num_key_value_heads=1, layer_types=["sliding_attention"] * 2), "bf16", True, False),
    "gemma3-backbone": (
        "gemma3",
        dict(num_key_value_heads=1, layer_types=["sliding_attention"] * 2),
        "f16",
        False,
        True,
    ),
}


def _keras_seeds(models):
    import tempfile

    from converters import hf, keras
    from tests.fuzz.corpus import MICRO
    from tests.tiny import make_tiny

    seeds = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (variant, overrides, dtype, task, manifest) in KERAS_PRESETS.items():
            src = make_tiny(variant, Path(tmp) / f"{name}-hf", dtype="bfloat16", **(MICRO | overrides))
            dst = keras.write(hf.read(src), Path(tmp) / name, dtype=dtype, task=task)
            files = {f: (dst / f).read_bytes() for f in KERAS_FILES if (dst / f).is_file()}
            if not manifest:
                files.pop("gemport.json", None)
            seeds.append(mut.pack_bundle(files))
    return seeds


def _keras_setup(models, scratch):
    folder = scratch / "keras"
    (folder / "assets" / "tokenizer").mkdir(parents=True)
    return folder


def _keras_run(data, folder):
    from converters import keras

    files = mut.unpack_bundle(data)
    for f in KERAS_FILES:
        _write(folder / f, files.get(f))
    load_all(keras.read(folder))


def _h5_items(h5) -> tuple[list[str], list[str]]:
    datasets, groups = [], []
    h5.visititems(lambda n, o: (datasets if hasattr(o, "shape") else groups).append(n))
    return datasets, groups


def _new_shape(rng: random.Random, shape: tuple) -> tuple:
    r = rng.random()
    if r < 0.2 or not shape:
        return (*shape, rng.choice((1, 2, 3)))
    if r < 0.35:
        return shape[:-1]
    if r < 0.5:
        return tuple(reversed(shape))
    i = rng.randrange(len(shape))
    d = rng.choice((0, 1, shape[i] + 1, shape[i] - 1, shape[i] * 2, shape[i] // 2, 1 << 20, 1 << 31))
    return (*shape[:i], max(d, 0), *shape[i + 1 :])


_H5_DTYPES = ("float32", "float16", "float64", ">f4", "int16", "int8", "uint16", "V2", "V4", "complex64", "S2", "bool")


def _values(dataset):
    """A dataset's values; zeros of its shape for a virtual one: HDF5 crashes the process (SIGSEGV) reading
    a virtual dataset of a damaged file (the reader refuses virtual datasets before reading any)."""
    import numpy as np

    if dataset.is_virtual:
        return np.zeros(dataset.shape or (), dataset.dtype)
    return dataset[()]


class _Recreate:
    """The h5 file with create_dataset replaced (attributes carried over)."""

    def __init__(self, h5, create_dataset):
        self._h5, self.create_dataset = h5, create_dataset

    def __getattr__(self, name):
        return getattr(self._h5, name)

    def __getitem__(self, key):
        return self._h5[key]

    def __setitem__(self, key, value):
        self._h5[key] = value

    def __delitem__(self, key):
        del self._h5[key]

    def __contains__(self, key):
        return key in self._h5


def _mutate_h5_structure(h5, rng: random.Random) -> None:
    """One change the way a damaged or hostile weights file would differ: a dataset of another shape,
    dtype, storage (chunked, compressed, external, virtual, huge and unallocated), attributes changed,
    a layer missing or doubled, links (soft, external, dangling)."""
    import numpy as np

    datasets, groups = _h5_items(h5)
    if not datasets:
        h5.create_dataset(rng.choice(("layers/rms_normalization/vars/0", "x")), data=np.zeros(4, "float32"))
        return
    key = rng.choice(datasets)
    old = h5[key]
    shape, dtype = old.shape, old.dtype
    attrs = dict(old.attrs)
    create = h5.create_dataset

    def create_dataset(name, *args, **kwargs):  # a dataset made again keeps its attributes (bfloat16's tag)
        made = create(name, *args, **kwargs)
        if rng.random() < 0.9:
            for k, v in attrs.items():
                made.attrs[k] = v
        return made

    h5 = _Recreate(h5, create_dataset)
    op = rng.randrange(14)
    if op == 0:  # another shape, data present
        new = _new_shape(rng, shape)
        if np.prod(new, dtype=np.float64) > 1 << 16:
            del h5[key]
            h5.create_dataset(key, shape=new, dtype=dtype, chunks=True)  # huge, nothing stored
        else:
            del h5[key]
            h5.create_dataset(key, data=np.zeros(new, dtype))
    elif op == 1:  # another dtype
        data = _values(old)
        new_dtype = np.dtype(rng.choice(_H5_DTYPES))
        del h5[key]
        try:
            h5.create_dataset(
                key,
                data=data.view(np.uint8).view(new_dtype)
                if data.nbytes % new_dtype.itemsize == 0 and data.ndim
                else np.zeros(shape, new_dtype),
            )
        except (TypeError, ValueError):
            h5.create_dataset(key, data=np.zeros(shape, new_dtype))
    elif op == 2:  # attributes: the bfloat16 tag dropped, added, of another type
        target = old if rng.random() < 0.7 else h5[rng.choice(groups)] if groups else old
        choice = rng.randrange(6)
        if choice == 0 and "dtype" in target.attrs:
            del target.attrs["dtype"]
        elif choice == 1:
            target.attrs["dtype"] = rng.choice(("bfloat16", "float32", "", "float8_e4m3fn"))
        elif choice == 2:
            target.attrs["dtype"] = np.array([1, 2, 3])
        elif choice == 3:
            target.attrs["dtype"] = np.array(["bfloat16", "bfloat16"], dtype="S")
        elif choice == 4:
            target.attrs["name"] = rng.choice((7, "", "x" * 1000, np.zeros(3)))
        else:
            target.attrs.create("dtype", h5.ref if hasattr(h5, "ref") else 0)
    elif op == 3:  # removed, or its layer removed
        del h5[key if rng.random() < 0.5 else key.rsplit("/vars/", 1)[0]]
    elif op == 4:  # doubled under another name
        other = rng.choice(("vars/1", "vars/00", "extra"))
        parent = key.rsplit("/", 1)[0]
        if f"{parent}/{other}" not in h5:
            h5.copy(old, f"{parent}/{other}")
    elif op == 5:  # chunked, compressed, shuffled
        data = _values(old)
        del h5[key]
        kw = rng.choice(
            (
                {"chunks": True},
                {"compression": "gzip"},
                {"compression": "lzf"},
                {"shuffle": True, "compression": "gzip"},
                {"fletcher32": True},
                {"scaleoffset": 0} if dtype.kind == "i" else {"chunks": True},
            )
        )
        h5.create_dataset(key, data=data, **kw) if data.ndim else h5.create_dataset(key, data=data)
    elif op == 6:  # storage in an external raw file
        del h5[key]
        name = rng.choice(("/etc/hostname", "../x.bin", "model.weights.h5", "missing.bin", "/proc/self/mem"))
        h5.create_dataset(
            key, shape=shape, dtype=dtype, external=[(name, 0, max(int(np.prod(shape)) * dtype.itemsize, 1))]
        )
        for k, v in attrs.items():
            h5[key].attrs[k] = v
    elif op == 7:  # a virtual dataset
        import h5py

        layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
        layout[...] = h5py.VirtualSource(
            rng.choice((".", "/etc/hostname", "other.h5")), rng.choice(datasets), shape=shape
        )
        del h5[key]
        h5.create_virtual_dataset(key, layout, fillvalue=0)
        for k, v in attrs.items():
            h5[key].attrs[k] = v
    elif op == 8:  # a soft, external or dangling link where the dataset was
        import h5py

        del h5[key]
        link = rng.randrange(3)
        if link == 0:
            h5[key] = h5py.SoftLink("/" + rng.choice(datasets))
        elif link == 1:
            h5[key] = h5py.ExternalLink(
                rng.choice(("/etc/hostname", "model.weights.h5", "../a.h5")), "/" + rng.choice(datasets)
            )
        else:
            h5[key] = h5py.SoftLink("/nowhere")
    elif op == 9:  # a group where a dataset was, or a dataset where a group was
        if rng.random() < 0.5 or not groups:
            del h5[key]
            h5.create_group(key)
        else:
            group = rng.choice(groups)
            del h5[group]
            h5.create_dataset(group, data=np.zeros(3, "float32"))
    elif op == 10:  # a scalar or empty dataset
        del h5[key]
        h5.create_dataset(key, data=np.float32(1)) if rng.random() < 0.5 else h5.create_dataset(
            key, shape=None, dtype=dtype
        )
    elif op == 11:  # values: NaN, inf, huge
        data = np.array(_values(old))
        if data.size and data.dtype.kind == "f" and not old.is_virtual:
            data.flat[rng.randrange(data.size)] = rng.choice((np.nan, np.inf, -np.inf, 1e38))
            old[...] = data
    elif op == 12:  # a hard link: one dataset at two paths, or a cycle of groups
        other = rng.choice(datasets)
        if other != key:
            del h5[key]
            h5[key] = h5[other]
        elif groups:
            g = rng.choice(groups)
            if f"{g}/loop" not in h5:
                h5[f"{g}/loop"] = h5[g]
    else:  # resizable with a maxshape
        data = _values(old)
        if data.ndim:
            del h5[key]
            h5.create_dataset(key, data=data, maxshape=tuple(None for _ in shape))


def _mutate_h5(data: bytes, max_size: int, rng: random.Random) -> bytes:
    """model.weights.h5 changed through h5py (one or two structural changes), truncated, or byte-mutated.
    The file goes through a path (TMPDIR, tmpfs under run.py), not a file object: h5py's file-object driver
    crashes the process (SIGSEGV) reading a dataset whose data lies past the end of a damaged file, where
    the path's driver (the one the reader uses) raises an error."""
    import os
    import tempfile

    import h5py

    r = rng.random()
    if r < 0.08:
        return data[: rng.randrange(len(data) + 1)]
    if r < 0.2:
        return mut.raw(data, max_size, rng)
    fd, name = tempfile.mkstemp(suffix=".h5")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        with h5py.File(name, "r+") as h5:
            for _ in range(1 + (rng.random() < 0.25)):
                _mutate_h5_structure(h5, rng)
        return Path(name).read_bytes()
    except Exception:  # noqa: BLE001  (an input h5py cannot rewrite: a byte mutation instead)
        return mut.raw(data, max_size, rng)
    finally:
        os.unlink(name)


def _mutate_keras(data: bytes, max_size: int, rng: random.Random) -> bytes:
    """mutators.mutate_bundle with model.weights.h5 mutated as HDF5 most of the time."""
    files = mut.unpack_bundle(data)
    if "model.weights.h5" not in files or rng.random() < 0.4:
        return mut.mutate_bundle(data, max_size, rng)
    files["model.weights.h5"] = _mutate_h5(files["model.weights.h5"], max_size, rng)
    return mut.pack_bundle(files)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("gguf", "gguf", _gguf_seeds, _gguf_setup, _gguf_run, mut.mutate_gguf, ("gguf.gguf_reader",)),
        Target("safetensors", "hf", _st_seeds, _st_setup, _st_run, mut.with_selector(mut.mutate_safetensors)),
        Target("hf-folder", "hf", _folder_seeds, _folder_setup, _folder_run, mut.mutate_bundle),
        Target("config", "spec", _config_seeds, _config_setup, _config_run, mut.with_selector(mut.mutate_json_text)),
        Target("compressed-tensors", "compressed_tensors", _ct_seeds, _ct_setup, _ct_run, mut.mutate_bundle),
        Target("jax", "jax", _jax_seeds, _jax_setup, _jax_run, mut.mutate_bundle),
        Target(
            "jax-orbax", "jax", _jax_orbax_seeds, _jax_orbax_setup, _jax_orbax_run, mut.with_selector(mut.mutate_bundle)
        ),
        Target(
            "gemma-pytorch",
            "gemma_pytorch",
            _pt_seeds,
            _pt_setup,
            _pt_run,
            mut.with_selector(mut.mutate_torch),
            ("torch._weights_only_unpickler",),
        ),
        Target("onnx", "onnx", _onnx_seeds, _onnx_setup, _onnx_run, mut.mutate_bundle),
        Target("keras", "keras", _keras_seeds, _keras_setup, _keras_run, _mutate_keras, ("converters.keras",)),
    )
}
