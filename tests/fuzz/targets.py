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
    )
}
