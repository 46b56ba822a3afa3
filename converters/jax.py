"""JAX/Orbax checkpoints of google-deepmind's ``gemma`` library: read and write.

The parameter tree is the one ``gm.ckpts.load_params`` loads (ref: google-deepmind/gemma
gemma/gm/ckpts/_checkpoint.py), in either of its two stored structures:

- flat, as the checkpoints were released: top-level keys ``transformer/layer_{i}/attn/q_einsum``
  holding ``{"w": array}``, ``transformer/embedder`` holding ``{"input_embedding": array}``, ...
  (``_CheckpointType.FLAT``; ref: gemma/gm/ckpts/_compat.py flatten_and_remap_params);
- nested, as ``model.init()`` makes it and ``gm.ckpts.save_params`` saves it:
  ``{"layer_0": {"attn": {"q_einsum": {"w": ...}}, "mlp": {"gating_einsum": ...}}}``; the MLP
  weights are bare arrays there, ``{"w": ...}`` in the flat structure (ref: _compat.py
  param_remapper).

Layouts (ref: gemma/gm/nn/_modules.py Attention.setup, FeedForward, Block; _layers.py RMSNorm):

- ``attn/qkv_einsum/w`` [3, N, D, H] when num_heads == num_kv_heads, else ``attn/q_einsum/w``
  [N, D, H] and ``attn/kv_einsum/w`` [2, K, D, H]; ``attn/attn_vec_einsum/w`` [N, H, D];
- ``mlp/gating_einsum`` [2, F, D] (``transpose_gating_einsum=True``: Gemma 2 9B/27B and every
  Gemma 3) or [2, D, F] (Gemma 1, Gemma 2 2B; ref: gemma/gm/nn/_gemma.py presets); index 0 is
  the gate (the GELU input), 1 the up projection; ``mlp/linear`` [F, D];
- RMSNorm ``scale`` multiplies by ``1 + scale``: stored as the raw ``w``, as in HF;
- ``embedder/input_embedding`` [vocab, D], also the output head (Gemma ties them). Gemma 1 and 2
  pad it to 256128 rows for a 256000-piece tokenizer (ref: _gemma.py ``num_embed=256128``).

Canonical (HF) names follow transformers' converter (ref: transformers
models/gemma3/convert_gemma3_weights.py convert_transformer_weights): q/k/v are
``w.transpose(0, 2, 1).reshape(heads * H, D)``, o_proj ``w.transpose(2, 0, 1).reshape(D, N * H)``,
gate/up the two halves of ``gating_einsum`` [2, F, D], down ``linear.T``.

The tree holds no config. gemport writes ``gemport.json`` (the GemmaSpec, generation config and
how the tree was written) and the tokenizer beside the tree; a tree without it (as released) gets
its spec from its shapes plus the official model of that size (``PRESETS``), or the ``preset``
named by the caller. ``tokenizer.model`` is looked for in the checkpoint folder and its parent
(Kaggle's layout puts it beside the checkpoint folder).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import mmap
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from converters import rope
from converters.presets import PRESETS, find_preset, spec_from_preset, tokenizer_pieces
from gemport import __version__
from gemport.checkpoint import CHUNK_VALUES, DTYPES, Checkpoint, LazyTensor, all_finite, expected_shapes, row_chunks
from gemport.errors import CheckpointError, InputError, UnsupportedError
from gemport.output import atomic_output, library_write_error
from gemport.progress import log_tensor, progress
from gemport.spec import TANH_GELU, GemmaSpec
from quantizers import fp16_range

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MANIFEST = "gemport.json"
TOKENIZER = "tokenizer.model"
FLAT_PREFIX = "transformer/"
LAYOUTS = ("flat", "nested")
# Orbax writes one of these at the top of every checkpoint folder (ref: orbax-checkpoint
# PyTreeCheckpointHandler: _METADATA with the tree, _CHECKPOINT_METADATA from the Checkpointer).
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt")
# Gemma 1 and 2 store 128 unused rows after the 256000 pieces of their tokenizer.
PADDED_ROWS = {256000: 256128}

# --- name table -------------------------------------------------------------------------------
# JAX parameter (nested structure, under layer_{i}) -> (canonical names under
# model.layers.{i}., layout kind). Layout kinds are the functions in _TO_CANONICAL/_FROM_CANONICAL.
_LAYER_COMMON = {
    "attn/q_einsum/w": (("self_attn.q_proj.weight",), "heads"),
    "attn/kv_einsum/w": (("self_attn.k_proj.weight", "self_attn.v_proj.weight"), "stacked_heads"),
    "attn/qkv_einsum/w": (
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "stacked_heads",
    ),
    "attn/attn_vec_einsum/w": (("self_attn.o_proj.weight",), "attn_out"),
    "mlp/gating_einsum": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gating"),
    "mlp/linear": (("mlp.down_proj.weight",), "transpose"),
    "pre_attention_norm/scale": (("input_layernorm.weight",), "copy"),
}
LAYER_TABLE = {
    # Gemma 1 has one norm before the MLP; HF calls it post_attention_layernorm.
    "gemma": _LAYER_COMMON | {"pre_ffw_norm/scale": (("post_attention_layernorm.weight",), "copy")},
    "gemma2": _LAYER_COMMON
    | {
        "post_attention_norm/scale": (("post_attention_layernorm.weight",), "copy"),
        "pre_ffw_norm/scale": (("pre_feedforward_layernorm.weight",), "copy"),
        "post_ffw_norm/scale": (("post_feedforward_layernorm.weight",), "copy"),
    },
}
LAYER_TABLE["gemma3"] = LAYER_TABLE["gemma2"] | {
    "attn/_query_norm/scale": (("self_attn.q_norm.weight",), "copy"),
    "attn/_key_norm/scale": (("self_attn.k_norm.weight",), "copy"),
}
TOP_TABLE = {
    "embedder/input_embedding": (("model.embed_tokens.weight",), "embedding"),
    "final_norm/scale": (("model.norm.weight",), "copy"),
}
# Parameters of the multimodal Gemma 3 models that a text model does not use; dropped on read
# (ref: _checkpoint.py _remove_mm_params; flat trees keep the vision tower under SigLiPFromPatches_0/).
_MULTIMODAL = re.compile(r"(vision_encoder|SigLiPFromPatches_0)/.*|embedder/mm_.*")
_LAYER_RE = re.compile(r"layer_(\d+)/(.+)")
_DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


# --- layouts ----------------------------------------------------------------------------------
def _heads_to_canonical(w: np.ndarray) -> np.ndarray:
    """[n, D, H] -> [n * H, D]"""
    n, d, h = w.shape
    return w.transpose(0, 2, 1).reshape(n * h, d)


def _heads_from_canonical(w: np.ndarray, head_dim: int) -> np.ndarray:
    """[n * H, D] -> [n, D, H]"""
    return w.reshape(-1, head_dim, w.shape[1]).transpose(0, 2, 1)


def to_canonical(kind: str, leaf: np.ndarray, part: int, shape: tuple[int, ...]) -> np.ndarray:
    """Canonical tensor number ``part`` of a JAX leaf, of canonical ``shape``."""
    if kind == "heads":
        return _heads_to_canonical(leaf)
    if kind == "stacked_heads":
        return _heads_to_canonical(leaf[part])
    if kind == "attn_out":  # [N, H, D] -> [D, N * H]
        return leaf.reshape(-1, leaf.shape[2]).T
    if kind == "gating":  # [2, F, D] as is, [2, D, F] transposed
        half = leaf[part]
        return half if half.shape == shape else half.T
    if kind == "transpose":
        return leaf.T
    if kind == "embedding":  # padded rows dropped
        return leaf if leaf.shape[0] == shape[0] else leaf[: shape[0]]
    return leaf


def from_canonical(kind: str, parts: list[np.ndarray], spec: GemmaSpec, leaf_shape: tuple[int, ...]) -> np.ndarray:
    """The JAX leaf of ``leaf_shape`` made of its canonical tensors ``parts``."""
    if kind == "heads":
        return _heads_from_canonical(parts[0], spec.head_dim)
    if kind == "stacked_heads":
        return np.stack([_heads_from_canonical(p, spec.head_dim) for p in parts])
    if kind == "attn_out":
        return parts[0].T.reshape(spec.num_heads, spec.head_dim, spec.hidden_size)
    if kind == "gating":
        halves = parts if leaf_shape[1] == spec.intermediate_size else [p.T for p in parts]
        return np.stack(halves)
    if kind == "transpose":
        return parts[0].T
    if kind == "embedding" and leaf_shape[0] > parts[0].shape[0]:
        pad = np.zeros((leaf_shape[0] - parts[0].shape[0], leaf_shape[1]), dtype=parts[0].dtype)
        return np.concatenate([parts[0], pad])
    return parts[0]


def leaf_shapes(spec: GemmaSpec, embedding_rows: int, transposed_gating: bool) -> dict[str, tuple[int, ...]]:
    """Every JAX parameter (nested names) of ``spec`` and its shape (ref: _modules.py)."""
    d, f, h = spec.hidden_size, spec.intermediate_size, spec.head_dim
    n, k = spec.num_heads, spec.num_kv_heads
    out: dict[str, tuple[int, ...]] = {"embedder/input_embedding": (embedding_rows, d)}
    for i in range(spec.num_layers):
        p = f"layer_{i}/"
        if n == k:  # ref: Attention.use_qkv_einsum
            out[p + "attn/qkv_einsum/w"] = (3, n, d, h)
        else:
            out[p + "attn/q_einsum/w"] = (n, d, h)
            out[p + "attn/kv_einsum/w"] = (2, k, d, h)
        out[p + "attn/attn_vec_einsum/w"] = (n, h, d)
        if spec.qk_norm:
            out[p + "attn/_query_norm/scale"] = (h,)
            out[p + "attn/_key_norm/scale"] = (h,)
        out[p + "mlp/gating_einsum"] = (2, f, d) if transposed_gating else (2, d, f)
        out[p + "mlp/linear"] = (f, d)
        out[p + "pre_attention_norm/scale"] = (d,)
        out[p + "pre_ffw_norm/scale"] = (d,)
        if spec.post_norms:
            out[p + "post_attention_norm/scale"] = (d,)
            out[p + "post_ffw_norm/scale"] = (d,)
    out["final_norm/scale"] = (d,)
    return out


def official_gating_transposed(spec: GemmaSpec) -> bool:
    """[2, F, D] as the official model of this family and size stores it (ref: _gemma.py:
    ``transpose_gating_einsum=True`` for Gemma 2 9B/27B and every Gemma 3; Gemma 1 and Gemma 2
    2B use [2, D, F]). Sizes with no official model follow the newer orientation for Gemma 2/3."""
    if spec.family == "gemma":
        return False
    return not (spec.family == "gemma2" and spec.hidden_size == PRESETS["gemma2-2b"].hidden_size)


def _rule(family: str, name: str) -> tuple[str, tuple[str, ...], str]:
    """(canonical prefix, canonical names, layout kind) of a nested JAX parameter name."""
    if name in TOP_TABLE:
        names, kind = TOP_TABLE[name]
        return "", names, kind
    m = _LAYER_RE.fullmatch(name)
    names, kind = LAYER_TABLE[family][m.group(2)]
    return f"model.layers.{int(m.group(1))}.", names, kind


def _known(name: str) -> bool:
    if name in TOP_TABLE:
        return True
    m = _LAYER_RE.fullmatch(name)
    return bool(m) and m.group(2) in LAYER_TABLE["gemma3"]


# --- the stored tree ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Leaf:
    """One stored array: its key path in the Orbax tree, its nested parameter name, shape, dtype."""

    key: tuple[str, ...]
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def stored_name(self) -> str:
        return "/".join(self.key)


def nested_name(key: tuple[str, ...], flat: bool) -> str:
    """The nested parameter name of a stored key path (ref: _compat.py param_remapper: a flat
    ``.../mlp/linear`` holds ``{"w": ...}``, which the nested structure stores bare)."""
    if not flat:
        return "/".join(key)
    name = "/".join(key).removeprefix(FLAT_PREFIX)
    return name.removesuffix("/w") if re.fullmatch(r"layer_\d+/mlp/(gating_einsum|linear)/w", name) else name


def stored_key(name: str, flat: bool) -> tuple[str, ...]:
    """Inverse of nested_name (ref: _compat.py flatten_and_remap_params)."""
    if not flat:
        return tuple(name.split("/"))
    if re.fullmatch(r"layer_\d+/mlp/(gating_einsum|linear)", name):
        name += "/w"
    group, leaf = name.rsplit("/", 1)
    return (FLAT_PREFIX + group, leaf)


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise UnsupportedError("JAX checkpoints need orbax-checkpoint (pip install orbax-checkpoint)") from None
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax logs every save and restore through absl
    return ocp


def _orbax_tree(path: Path) -> Any:
    """The metadata tree of an Orbax checkpoint: nested dicts whose leaves have shape and dtype."""
    ocp = _orbax()
    try:
        meta = ocp.PyTreeCheckpointer().metadata(path.resolve())
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001
        # Orbax parses _METADATA and the OCDBT manifest of an untrusted folder; a damaged one raises
        # whatever the value at fault leads to (KeyError, TypeError, AttributeError, ValueError from
        # tensorstore, ...), each this one-line input error.
        raise InputError(f"not a readable Orbax checkpoint: {type(exc).__name__}: {exc}", path) from None
    return getattr(getattr(meta, "item_metadata", meta), "tree", None) or meta


def _tree_leaves(path: Path) -> tuple[list[Leaf], bool]:
    """The arrays an Orbax checkpoint holds, from its metadata (no data is read)."""
    return _leaves_of(_orbax_tree(path), path)


def _leaves_of(tree: Any, path: Path) -> tuple[list[Leaf], bool]:
    """The arrays an Orbax metadata tree describes."""
    if not isinstance(tree, dict) or not tree:
        raise InputError("no readable parameter tree (Orbax metadata missing or damaged)", path)
    if set(tree) == {"collections", "opt_state", "params", "step"}:  # ref: _checkpoint.py _is_kauldron_layout
        raise UnsupportedError("a Kauldron training state, not a parameter tree (load its params and save them)", path)
    flat = all(str(k).startswith((FLAT_PREFIX, "SigLiPFromPatches_0/")) for k in tree)
    if any(str(k).startswith("transformer/stacked_layers") for k in tree):
        raise UnsupportedError("stacked-layers Orbax trees are not supported (only flat and nested)", path)
    leaves = []
    for key, value in _walk(tree, ()):
        dtype = str(getattr(value, "dtype", ""))
        stored = "/".join(key)
        if dtype not in _DTYPES:
            raise UnsupportedError(f"parameter {stored} has unsupported dtype {dtype or type(value).__name__}", path)
        leaves.append(Leaf(key, nested_name(key, flat), tuple(int(d) for d in value.shape), _DTYPES[dtype]))
    return leaves, flat


def _walk(tree: Any, key: tuple[str, ...]):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _walk(v, (*key, str(k)))
    else:
        yield key, tree


class _LeafReader:
    """Restores one stored array at a time (Orbax partial restore), keeping the last one, so the
    q/k/v or gate/up parts of one leaf read it once."""

    def __init__(self, path: Path):
        self.path = path.resolve()
        self._last: tuple[tuple[str, ...], np.ndarray] | None = None

    def get(self, key: tuple[str, ...]) -> np.ndarray:
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        ocp = _orbax()
        item: Any = 0  # a placeholder leaf: None would mark an empty subtree
        restore: Any = ocp.RestoreArgs(restore_type=np.ndarray)
        for k in reversed(key):
            item, restore = {k: item}, {k: restore}
        try:
            tree = ocp.PyTreeCheckpointer().restore(
                self.path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore, partial_restore=True)
            )
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001  (as in _orbax_tree: Orbax and tensorstore on a damaged folder)
            raise InputError(f"cannot read parameter {'/'.join(key)}: {type(exc).__name__}: {exc}", self.path) from None
        for k in key:
            tree = tree[k]
        self._last = (key, np.asarray(tree))
        return self._last[1]


# --- reading ----------------------------------------------------------------------------------------
def sniff(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in _ORBAX_MARKERS)


def read(path: str | Path, preset: str | None = None, keep_padded_vocab: bool = False) -> Checkpoint:
    """Open an Orbax Gemma checkpoint lazily: metadata now, each array when a tensor is loaded.

    ``preset`` names the official model (``PRESETS``) when the tree has no gemport.json and its
    shapes match no official size, or to override the match. ``keep_padded_vocab`` keeps the unused
    embedding rows after the tokenizer's pieces (256128 rows for Gemma 1 and 2) as vocabulary.
    """
    path = Path(path)
    if not sniff(path):
        raise InputError("not an Orbax checkpoint folder (no _METADATA)", path)
    return read_tree(_orbax_tree(path), path, _LeafReader(path), preset, keep_padded_vocab)


def read_tree(
    tree: Any, path: Path, reader: _LeafReader, preset: str | None = None, keep_padded_vocab: bool = False
) -> Checkpoint:
    """``read`` of the folder ``path`` whose Orbax metadata tree is ``tree``; ``reader.get(key)``
    returns the stored array at a key path when a tensor is loaded."""
    leaves, flat = _leaves_of(tree, path)
    leaves = _text_leaves(leaves, path)
    _check_ranks(leaves, path)
    family = _family(leaves)
    tokenizer = _find_tokenizer(path)
    manifest = _read_manifest(path)
    by_name = {leaf.name: leaf for leaf in leaves}
    rows = by_name["embedder/input_embedding"].shape[0] if "embedder/input_embedding" in by_name else 0
    if manifest:
        spec = GemmaSpec.from_json(manifest["spec"])
    else:
        vocab = rows if keep_padded_vocab else _vocab_size(rows, tokenizer, path)
        spec = _infer_spec(by_name, family, vocab, preset, path)
    if keep_padded_vocab and manifest and rows > spec.vocab_size:
        spec = GemmaSpec.from_json(spec.to_json() | {"vocab_size": rows})
    _check_tree(by_name, spec, path)
    tensors = _lazy_tensors(by_name, spec, reader)
    files = manifest.get("tokenizer_files", []) if manifest else []
    tokenizer_files = {n: (path / n).read_bytes() for n in files if (path / n).is_file()}
    if tokenizer is not None:
        tokenizer_files[TOKENIZER] = tokenizer.read_bytes()
    if TOKENIZER in tokenizer_files and "tokenizer_config.json" not in tokenizer_files:
        config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False}
        tokenizer_files["tokenizer_config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    ckpt = Checkpoint(
        spec=spec,
        tensors=tensors,
        tokenizer_files=tokenizer_files,
        generation_config=manifest.get("generation_config") if manifest else None,
        source=str(path),
        extra={"jax.layout": "flat" if flat else "nested"},
    )
    ckpt.check()
    return ckpt


def _text_leaves(leaves: list[Leaf], path: Path) -> list[Leaf]:
    """The text model's arrays; multimodal ones are dropped (logged), unknown names refused."""
    text, dropped = [], 0
    for leaf in leaves:
        if _MULTIMODAL.fullmatch(leaf.name):
            dropped += 1
        elif _known(leaf.name):
            text.append(leaf)
        else:
            raise CheckpointError(f"unknown parameter {leaf.stored_name}", path)
    if dropped:
        log.info("%s: dropped %d multimodal parameters (vision encoder and projection)", path, dropped)
    return text


# Rank of the stored array for each layout kind (ref: _modules.py; see the module docstring).
_RANKS = {"heads": 3, "stacked_heads": 4, "attn_out": 3, "gating": 3, "transpose": 2, "embedding": 2, "copy": 1}


def _check_ranks(leaves: list[Leaf], path: Path) -> None:
    """Each known parameter has the rank its layout gives it, before any size is read off it."""
    for leaf in leaves:
        _, _, kind = _rule("gemma3", leaf.name)
        if len(leaf.shape) != _RANKS[kind] or min(leaf.shape, default=1) < 1:
            raise CheckpointError(
                f"parameter {leaf.stored_name} has shape {list(leaf.shape)}, expected {_RANKS[kind]} dimensions of "
                "at least 1",
                path,
            )


def _family(leaves: list[Leaf]) -> str:
    """gemma3 has query/key norms, gemma2 post-norms, gemma neither (ref: _modules.py Block)."""
    names = {leaf.name.split("/", 1)[-1] for leaf in leaves if leaf.name.startswith("layer_")}
    if "attn/_query_norm/scale" in names:
        return "gemma3"
    if "post_attention_norm/scale" in names:
        return "gemma2"
    return "gemma"


def _find_tokenizer(path: Path) -> Path | None:
    for folder in (path, path.parent):
        if (folder / TOKENIZER).is_file():
            return folder / TOKENIZER
    return None


def _read_manifest(path: Path) -> dict | None:
    file = path / MANIFEST
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        GemmaSpec.from_json(data["spec"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as exc:
        raise InputError(f"invalid gemport manifest: {exc}", file) from None
    names = data.get("tokenizer_files", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and _plain_name(n) for n in names):
        raise InputError("invalid gemport manifest: tokenizer_files is not a list of file names in the folder", file)
    if not isinstance(data.get("generation_config"), dict | None):
        raise InputError("invalid gemport manifest: generation_config is not an object", file)
    return data


def _plain_name(name: str) -> bool:
    """A file name of the checkpoint folder itself: no folder part, nothing outside it."""
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def _vocab_size(rows: int, tokenizer: Path | None, path: Path) -> int:
    """The tokenizer's piece count (the rows after it are padding); without a tokenizer, the
    known padding of Gemma 1/2 is dropped."""
    if tokenizer is None:
        log.info("%s: no %s beside the checkpoint", path, TOKENIZER)
        return next((v for v, padded in PADDED_ROWS.items() if padded == rows), rows)
    return tokenizer_pieces(tokenizer, rows, path)


def _tree_dims(by_name: dict[str, Leaf], path: Path) -> dict[str, int]:
    """Sizes read off the shapes of the embedding, layer 0 and the layer count."""
    layers = {int(m.group(1)) for n in by_name if (m := _LAYER_RE.fullmatch(n))}
    for n in ("embedder/input_embedding", "layer_0/mlp/linear", "layer_0/attn/attn_vec_einsum/w"):
        if n not in by_name:
            raise CheckpointError(f"missing parameter {stored_key(n, True)[0]}", path)
    heads, head_dim, hidden = by_name["layer_0/attn/attn_vec_einsum/w"].shape
    if "layer_0/attn/qkv_einsum/w" in by_name:
        kv_heads = heads
    elif "layer_0/attn/kv_einsum/w" in by_name:
        kv_heads = by_name["layer_0/attn/kv_einsum/w"].shape[1]
    else:
        raise CheckpointError(f"missing parameter {FLAT_PREFIX}layer_0/attn/kv_einsum", path)
    return {
        "num_layers": max(layers) + 1 if layers else 0,
        "hidden_size": hidden,
        "intermediate_size": by_name["layer_0/mlp/linear"].shape[0],
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
    }


def _infer_spec(by_name: dict[str, Leaf], family: str, vocab: int, preset: str | None, path: Path) -> GemmaSpec:
    dims = _tree_dims(by_name, path)
    missing = f"no {MANIFEST}: its sliding window, rope and attention scale are unknown"
    return spec_from_preset(find_preset(family, dims, preset, path, missing), vocab)


def _check_tree(by_name: dict[str, Leaf], spec: GemmaSpec, path: Path) -> None:
    """Names and shapes exactly as the spec's official tree, one error naming the first fault."""
    rows = by_name["embedder/input_embedding"].shape[0] if "embedder/input_embedding" in by_name else spec.vocab_size
    if rows < spec.vocab_size:
        raise CheckpointError(f"the embedding has {rows} rows, the vocabulary {spec.vocab_size}", path)
    gating = by_name.get("layer_0/mlp/gating_einsum")
    transposed = gating is None or gating.shape[1] == spec.intermediate_size
    # Layers against the spec's count first, in one pass: the count may be anything a manifest says.
    layers = {int(m.group(1)) for n in by_name if (m := _LAYER_RE.fullmatch(n))}
    extra = sorted(i for i in layers if i >= spec.num_layers)
    if extra:
        raise CheckpointError(f"parameters of layer_{extra[0]}, but the spec has {spec.num_layers} layers", path)
    if len(layers) < spec.num_layers:
        first = min(set(range(len(layers) + 1)) - layers)
        raise CheckpointError(f"missing layer layer_{first} (no {FLAT_PREFIX}layer_{first}/* parameters)", path)
    expected = leaf_shapes(spec, rows, transposed)
    missing = [n for n in expected if n not in by_name]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing parameter {'/'.join(stored_key(missing[0], True))}{more}", path)
    for name, leaf in by_name.items():
        if name not in expected:
            raise CheckpointError(f"unexpected parameter {leaf.stored_name} for a {spec.family} model", path)
        if leaf.shape != expected[name]:
            raise CheckpointError(
                f"parameter {leaf.stored_name} has shape {list(leaf.shape)}, expected {list(expected[name])}", path
            )


def _lazy_tensors(by_name: dict[str, Leaf], spec: GemmaSpec, reader: _LeafReader) -> dict[str, LazyTensor]:
    shapes = expected_shapes(spec)
    tensors: dict[str, LazyTensor] = {}
    for name, leaf in by_name.items():
        prefix, names, kind = _rule(spec.family, name)
        for part, canonical in enumerate(names):
            full = prefix + canonical
            load = _loader(reader, leaf.key, kind, part, shapes[full])
            tensors[full] = LazyTensor(full, shapes[full], leaf.dtype, load=load)
    return {n: tensors[n] for n in shapes if n in tensors}


def _loader(reader: _LeafReader, key: tuple[str, ...], kind: str, part: int, shape: tuple[int, ...]) -> Callable:
    def load() -> torch.Tensor:
        return _to_torch(np.ascontiguousarray(to_canonical(kind, reader.get(key), part, shape)))

    return load


def _to_torch(array: np.ndarray) -> torch.Tensor:
    import ml_dtypes
    import torch

    if not array.flags.owndata:  # a view of the restored leaf, which the reader keeps for the next part
        array = array.copy()
    if array.dtype == ml_dtypes.bfloat16:  # numpy has no bfloat16 of its own: move the bits
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    import ml_dtypes
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.contiguous().numpy()


# --- writing ------------------------------------------------------------------------------------
def write(
    ckpt: Checkpoint,
    dst: str | Path,
    dtype: str | None = None,
    overwrite: bool = False,
    layout: str = "flat",
    pad_vocab: bool = True,
    transposed_gating: bool | None = None,
    **_ignored: Any,
) -> Path:
    """Write ``ckpt`` as an Orbax checkpoint folder at ``dst`` that ``gm.ckpts.load_params(dst)``
    loads, with ``tokenizer.model`` and gemport.json beside the tree.

    ``layout`` 'flat' (as released) or 'nested' (as ``gm.ckpts.save_params``); ``pad_vocab`` pads
    a 256000-row Gemma 1/2 embedding to the official 256128 rows; ``transposed_gating`` picks
    [2, F, D] over [2, D, F] (default: as the official model of that family and size).

    Each array is converted and spilled to a scratch file beside ``dst`` in turn, then Orbax writes
    the tree from memory maps of those files one array at a time, so peak memory stays near the
    largest array (plus Orbax's write buffers), not the model.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    unused = [k for k, v in _ignored.items() if v]
    if unused:
        raise UnsupportedError(f"option(s) {', '.join(unused)} do not apply to JAX output")
    ckpt.check()
    spec = ckpt.spec
    _check_library_semantics(spec, ckpt.source)
    if not spec.tie_embeddings:
        raise UnsupportedError(
            "the gemma library ties the output head to the embedding; this checkpoint has a separate lm_head",
            ckpt.source,
        )
    if dtype == "f16":  # weights only: the gemma library computes in its module dtype (float32 or bf16)
        ckpt = fp16_range.guard_weights(ckpt)
    if dtype:
        ckpt = ckpt.cast(dtype)
    if transposed_gating is None:
        transposed_gating = official_gating_transposed(spec)
    rows = PADDED_ROWS.get(spec.vocab_size, spec.vocab_size) if pad_vocab and spec.family != "gemma3" else None
    shapes = leaf_shapes(spec, rows or spec.vocab_size, transposed_gating)
    dst = Path(dst)
    with atomic_output(dst, overwrite) as tmp:
        with tempfile.TemporaryDirectory(prefix=f".{dst.name}.spill-", dir=dst.parent) as scratch:
            tree, fills = _spill(ckpt, shapes, Path(scratch), layout == "flat")
            total = sum(count for _, _, count in fills.values())  # in model tensors, as the summary counts
            with progress(f"writing {dst.name} with orbax", total=total, unit="tensors") as advance:
                _save_tree(tree, tmp, fills, advance, final=dst)
            del tree
        _write_extras(ckpt, tmp, layout, transposed_gating, shapes["embedder/input_embedding"][0])
    return dst


def _check_library_semantics(spec: GemmaSpec, source: str) -> None:
    """Refuse a spec the gemma library's Transformer would run differently from transformers."""
    if spec.activation != TANH_GELU:  # ref: gemma/gm/nn/_modules.py FeedForward: nn.gelu, tanh-approximate
        raise UnsupportedError(f"hidden_activation {spec.activation!r}: the gemma library has tanh-GELU only", source)
    if spec.rms_eps != 1e-6:  # ref: gemma/gm/nn/_layers.py RMSNorm: var + 1e-06, fixed
        raise UnsupportedError(f"rms_norm_eps {spec.rms_eps}: the gemma library fixes it at 1e-6", source)
    # ref: gemma/gm/math/_positional_embeddings.py apply_rope: positions / scale_factor, linear only
    if spec.rope_scaling and spec.rope_scaling.rope_type != "linear":
        raise rope.refusal(spec, source, "the gemma library has linear rope scaling only")


def _spill(ckpt: Checkpoint, shapes: dict[str, tuple[int, ...]], scratch: Path, flat: bool) -> tuple[dict, dict]:
    """A tree of read-only maps of scratch files, one per leaf, and for each map (by its data
    address) the call that fills its file with the leaf, converted from the canonical tensors, the
    file and the number of canonical tensors it holds.
    The files start sparse (no disk used) and are filled one at a time as Orbax writes them, then
    emptied (_save_tree): the scratch never holds more than one leaf, not a second copy of the model."""
    tree: dict = {}
    fills: dict[int, tuple[Callable[[], None], Path, int]] = {}
    for i, (name, shape) in enumerate(shapes.items()):
        prefix, names, _ = _rule(ckpt.spec.family, name)
        file = scratch / f"{i}.bin"
        dtype = np.dtype(_NUMPY_DTYPES[ckpt.tensors[prefix + names[0]].dtype]())
        with open(file, "wb") as f:
            f.truncate(math.prod(shape) * dtype.itemsize)
        leaf = np.memmap(file, dtype=dtype, mode="r", shape=shape)
        fill = functools.partial(_fill, ckpt, name, shape, dtype, file)
        fills[leaf.__array_interface__["data"][0]] = (fill, file, len(names))  # counted in model tensors
        node = tree
        *groups, last = stored_key(name, flat)
        for g in groups:
            node = node.setdefault(g, {})
        node[last] = leaf
    return tree, fills


def _bfloat16() -> type:
    import ml_dtypes

    return ml_dtypes.bfloat16


_NUMPY_DTYPES = {"f32": lambda: np.float32, "f16": lambda: np.float16, "bf16": _bfloat16}


def _fill(ckpt: Checkpoint, name: str, shape: tuple[int, ...], dtype: np.dtype, file: Path) -> None:
    """Write leaf ``name`` of ``shape`` to ``file``, converted from its canonical tensors."""
    prefix, names, kind = _rule(ckpt.spec.family, name)
    if kind in ("embedding", "copy"):  # the leaf is the tensor's rows (then zero padding): streamed
        written = _spill_rows(ckpt, prefix + names[0], shape, file)
    elif kind == "gating":  # [2, F, D] or [2, D, F]: each half made and written alone
        written = _spill_halves(ckpt, [prefix + n for n in names], shape, file)
    else:
        parts = [_load_checked(ckpt, prefix + n) for n in names]
        leaf = np.ascontiguousarray(from_canonical(kind, parts, ckpt.spec, shape))
        del parts
        if leaf.shape != shape:
            raise CheckpointError(f"JAX parameter {name} came out {list(leaf.shape)}, expected {list(shape)}")
        written = leaf.dtype
        with open(file, "r+b") as f:
            f.write(leaf.reshape(-1).view(np.uint8))
        del leaf
    if written != dtype:
        raise CheckpointError(f"JAX parameter {name} came out {written}, expected {dtype}", ckpt.source)
    log_tensor(log, name, shape, str(dtype))


def _spill_rows(ckpt: Checkpoint, name: str, shape: tuple[int, ...], file: Path) -> np.dtype:
    """Write tensor ``name``'s rows, then zero rows up to ``shape[0]``, to ``file`` a chunk at a time
    (plain writes: the pages of a writable map would count as resident); the dtype written."""
    t = ckpt.tensors[name]
    if t.shape[1:] != shape[1:] or t.shape[0] > shape[0]:
        raise CheckpointError(f"tensor {name} has shape {list(t.shape)}, expected {list(shape)}", ckpt.source)
    dtype = None
    with open(file, "r+b") as f:  # pre-sized: padding rows past the tensor's stay zero
        for rows in row_chunks(t, CHUNK_VALUES):
            if not all_finite(rows):
                raise CheckpointError(f"tensor {name} has NaN or infinite values", ckpt.source)
            data = _to_numpy(rows)
            dtype = data.dtype
            f.write(data.reshape(-1).view(np.uint8))
    return dtype


def _spill_halves(ckpt: Checkpoint, names: list[str], shape: tuple[int, ...], file: Path) -> np.dtype:
    """The gating leaf ``stack(halves)`` written half by half to ``file``; the dtype written."""
    with open(file, "r+b") as f:
        for name in names:
            half = np.ascontiguousarray(from_canonical("gating", [_load_checked(ckpt, name)], ckpt.spec, shape)[0])
            if half.shape != shape[1:]:
                raise CheckpointError(f"tensor {name} came out {list(half.shape)}, expected {list(shape[1:])}")
            f.write(half.reshape(-1).view(np.uint8))
            dtype = half.dtype
            del half
    return dtype


def _load_checked(ckpt: Checkpoint, name: str) -> np.ndarray:
    t = ckpt.tensors[name]
    data = t.load()
    if tuple(data.shape) != t.shape:
        raise CheckpointError(f"tensor {name} loaded as {list(data.shape)}, expected {list(t.shape)}", ckpt.source)
    if not all_finite(data):
        raise CheckpointError(f"tensor {name} has NaN or infinite values", ckpt.source)
    return _to_numpy(data)


# Largest zarr chunk Orbax may make of an array (SaveArgs.chunk_byte_size): tensorstore encodes a chunk
# whole in memory, and by default Orbax chunks only arrays above its 2 GB OCDBT data-file target.
SAVE_CHUNK_BYTES = 64 << 20


def _save_tree(
    tree: dict,
    dst: Path,
    fills: dict | None = None,
    advance: Callable[[int], None] | None = None,
    final: Path | None = None,
) -> None:
    """Orbax's PyTree save, host arrays written one at a time, in chunks of at most SAVE_CHUNK_BYTES, a
    slab of whole chunks at a time, and not copied first: memory stays near one slab whatever the
    array's size. ``fills`` (from _spill): a leaf's scratch file is filled just before it is written
    and emptied after; ``advance(n)`` counts the canonical tensors written. A write error with an OS
    code (disk full) becomes an OutputError naming ``final`` (default ``dst``)."""
    fills = fills or {}
    ocp = _orbax()
    import jax
    import tensorstore as ts

    class SequentialNumpyHandler(ocp.type_handlers.NumpyHandler):
        # NumpyHandler starts every array's tensorstore write at once (asyncio.gather in
        # _background_serialize), which holds all of them in flight, and writes each whole
        # (_open_and_write). Private hook of the pinned orbax-checkpoint version, re-expressed here:
        # one array at a time, row slabs aligned to its write chunks.
        _lock: asyncio.Lock | None = None

        async def _open_and_write(self, value, tspec, ts_context):
            self._lock = self._lock or asyncio.Lock()
            async with self._lock:
                fill, file, count = fills.get(value.__array_interface__["data"][0], (None, None, 0))
                if fill is not None:
                    fill()
                t = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
                for a, b in _slabs(value.shape, t.chunk_layout.write_chunk.shape):
                    await t[a:b].write(value[a:b], can_reference_source_data_indefinitely=True)
                    _drop_pages(value)
                if file is not None:
                    os.truncate(file, 0)  # written: its disk space back (the map is not read again)
                if advance is not None and count:
                    advance(count)

    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, SequentialNumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()),
    )
    save_args = jax.tree_util.tree_map(lambda _: ocp.SaveArgs(chunk_byte_size=SAVE_CHUNK_BYTES), tree)
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))
    try:
        checkpointer.save(dst.resolve(), args=ocp.args.PyTreeSave(tree, save_args=save_args))
    except (ValueError, RuntimeError, OSError) as exc:  # tensorstore reports OS errors as ValueError text
        error = library_write_error(str(exc), final or dst)
        if error is None:
            raise
        raise error from None
    finally:
        checkpointer.close()


def _slabs(shape: tuple[int, ...], chunk: tuple[int, ...]) -> list[tuple[int | None, int | None]]:
    """Row ranges [a, b) of an array of ``shape`` stored in write chunks of ``chunk``: whole chunk rows,
    about CHUNK_VALUES values each; one range (None, None) for a scalar or a single chunk row."""
    if not shape or chunk[0] >= shape[0]:
        return [(None, None)]
    per_chunk_row = chunk[0] * math.prod(shape[1:])
    step = chunk[0] * max(1, CHUNK_VALUES // max(per_chunk_row, 1))
    return [(a, min(a + step, shape[0])) for a in range(0, shape[0], step)]


def _drop_pages(value: np.ndarray) -> None:
    """A spilled leaf's pages, once written, leave this process (they stay in the page cache); read
    again on demand if a later slab needs them."""
    if isinstance(getattr(value, "_mmap", None), mmap.mmap):
        value._mmap.madvise(mmap.MADV_DONTNEED)


def _write_extras(ckpt: Checkpoint, tmp: Path, layout: str, transposed_gating: bool, rows: int) -> None:
    manifest = {
        "format": "gemma-orbax",
        "written_by": f"gemport {__version__}",
        "layout": layout,
        "gating_einsum": "[2, F, D]" if transposed_gating else "[2, D, F]",
        "embedding_rows": rows,
        "dtype": ckpt.tensors["model.embed_tokens.weight"].dtype,
        "spec": ckpt.spec.to_json(),
        "generation_config": ckpt.generation_config,
        "tokenizer_files": sorted(ckpt.tokenizer_files),
        "source": ckpt.source,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    for name, data in ckpt.tokenizer_files.items():
        (tmp / name).write_bytes(data)
