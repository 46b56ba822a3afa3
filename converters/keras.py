"""Keras 3 presets of keras-hub (formerly keras-nlp) for Gemma 1, 2 and 3: read and write, with h5py.

A preset folder, as ``Backbone.save_to_preset`` / ``CausalLM.save_to_preset`` writes it (ref: keras-hub
keras_hub/src/utils/preset_utils.py KerasPresetSaver; file names CONFIG_FILE, METADATA_FILE,
MODEL_WEIGHTS_FILE, TASK_CONFIG_FILE, PREPROCESSOR_CONFIG_FILE, TOKENIZER_CONFIG_FILE,
TOKENIZER_ASSET_DIR):

- ``config.json``: the backbone, ``keras.saving.serialize_keras_object`` of ``GemmaBackbone`` (Gemma 1
  and 2) or ``Gemma3Backbone``; ``metadata.json``: versions, parameter count, tasks;
- ``model.weights.h5``: the backbone's weights as Keras 3 saves them (ref: keras
  keras/src/saving/saving_lib.py H5IOStore, _save_container_state): one group per layer, named after its
  class in snake case and made unique by a counter in order (``layers/gemma_decoder_block``,
  ``layers/gemma_decoder_block_1``, ...; _get_unique_name), each layer's variables as datasets
  ``vars/0, vars/1, ...`` and its Keras name in the ``vars`` group's ``name`` attribute; bfloat16 as
  2-byte opaque data with the attribute ``dtype = "bfloat16"`` (H5IOStore.__setitem__);
- a CausalLM adds ``task.json``, ``preprocessor.json``, ``tokenizer.json`` and the SentencePiece model
  as ``assets/tokenizer/vocabulary.spm`` (ref: keras_hub/src/tokenizers/sentence_piece_tokenizer.py
  VOCAB_FILENAME, save_assets).

Layouts (ref: keras_hub/src/utils/transformers/convert_gemma.py and convert_gemma3.py convert_weights,
the inverse of what this module does; keras_hub/src/models/gemma/gemma_attention.py,
gemma_decoder_block.py, rms_normalization.py; gemma3/gemma3_attention.py, gemma3_decoder_block.py):
q/k/v kernels [heads, hidden, head_dim] (EinsumDense "btd,ndh->btnh"), the output kernel
[heads, head_dim, hidden] ("btnh,nhd->btd"), MLP kernels [in, out] ("btd,df->btf"), RMSNorm ``scale``
multiplying by ``1 + scale`` (the raw ``w``, as canonical), the embedding [vocab, hidden], tied to the
output head (ReversibleEmbedding(tie_weights=True)). GemmaBackbone's ``intermediate_dim`` is twice the
MLP width (its gating layers output ``intermediate_dim // 2``; convert_gemma.py writes
``intermediate_size * 2``); Gemma3Backbone's is the width (gate_dim_reduction=1).

What keras-hub fixes and gemport therefore checks (refusing anything else with one line): the decoder
blocks' RMSNorm epsilon 1e-6 (the backbones pass ``layer_norm_epsilon`` to the final norm only);
tanh-GELU; rope bases 10000 (Gemma 1/2), 10000 local and 1e6 global (Gemma 3); sliding layers every
even layer (Gemma 2, ``i % 2 == 0``) or five of six (Gemma 3, ``i % 6 < 5``); the query scale
1/sqrt(head_dim), whatever ``query_head_dim_normalize`` says (see the note above KERAS_RMS_EPS); linear
rope scaling only.

gemport also writes ``gemport.json`` (the spec and generation config) beside the preset,
which keras-hub ignores; a preset without it (keras-hub's own) gets its spec from config.json.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from converters.hf import read_json
from converters.presets import tokenizer_pieces
from gemport import __version__
from gemport.checkpoint import (
    CHUNK_VALUES,
    DTYPES,
    Checkpoint,
    LazyTensor,
    RowLoader,
    all_finite,
    expected_shapes,
    row_chunks,
)
from gemport.errors import CheckpointError, InputError, UnsupportedError
from gemport.output import atomic_output
from gemport.progress import log_tensor, progress, stage
from gemport.spec import BOUNDS, FULL, SLIDING, TANH_GELU, GemmaSpec, RopeScaling
from quantizers import fp16_range

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CONFIG, METADATA, WEIGHTS = "config.json", "metadata.json", "model.weights.h5"
TASK, PREPROCESSOR, TOKENIZER_CONFIG = "task.json", "preprocessor.json", "tokenizer.json"
VOCABULARY = "assets/tokenizer/vocabulary.spm"
SHARDED_WEIGHTS = "model.weights.json"  # ref: preset_utils.py SHARDED_MODEL_WEIGHTS_CONFIG_FILE
MANIFEST = "gemport.json"
TOKENIZER = "tokenizer.model"
# The versions whose preset layout this module writes (and whose runtime validates it: make keras-venv).
KERAS_VERSION, KERAS_HUB_VERSION = "3.15.1", "0.32.0"
# keras-hub 0.32.0 stores query_head_dim_normalize in the backbone config and passes it to the decoder blocks,
# which build their attention with query_head_dim_normalize=True regardless (ref: gemma_decoder_block.py and
# gemma3_decoder_block.py __init__): queries are always scaled by 1/sqrt(head_dim); measured on tiny models,
# a preset saying false scores as the HF model with query_pre_attn_scalar = head_dim (KLD 1.6e-13).
KERAS_RMS_EPS = 1e-6  # ref: gemma_decoder_block.py / gemma3_decoder_block.py layer_norm_epsilon=1e-6, not passed

# --- per-family facts, as data --------------------------------------------------------------------
# backbone class -> (module, decoder block group name, CausalLM class, its module, tokenizer class and
# module, preprocessor class and module); ref: keras_hub/src/models/gemma/*.py, gemma3/*.py.
BACKBONES: dict[str, dict[str, str]] = {
    "GemmaBackbone": {
        "module": "keras_hub.src.models.gemma.gemma_backbone",
        "name": "gemma_backbone",
        "block": "gemma_decoder_block",
        "task": "GemmaCausalLM",
        "task_module": "keras_hub.src.models.gemma.gemma_causal_lm",
        "task_name": "gemma_causal_lm",
        "tokenizer": "GemmaTokenizer",
        "tokenizer_module": "keras_hub.src.models.gemma.gemma_tokenizer",
        "tokenizer_name": "gemma_tokenizer",
        "preprocessor": "GemmaCausalLMPreprocessor",
        "preprocessor_module": "keras_hub.src.models.gemma.gemma_causal_lm_preprocessor",
        "preprocessor_name": "gemma_causal_lm_preprocessor",
    },
    "Gemma3Backbone": {
        "module": "keras_hub.src.models.gemma3.gemma3_backbone",
        "name": "gemma3_backbone",
        "block": "gemma3_decoder_block",
        "task": "Gemma3CausalLM",
        "task_module": "keras_hub.src.models.gemma3.gemma3_causal_lm",
        "task_name": "gemma3_causal_lm",
        "tokenizer": "Gemma3Tokenizer",
        "tokenizer_module": "keras_hub.src.models.gemma3.gemma3_tokenizer",
        "tokenizer_name": "gemma3_tokenizer",
        "preprocessor": "Gemma3CausalLMPreprocessor",
        "preprocessor_module": "keras_hub.src.models.gemma3.gemma3_causal_lm_preprocessor",
        "preprocessor_name": "gemma3_causal_lm_preprocessor",
    },
}
BACKBONE_OF_FAMILY = {"gemma": "GemmaBackbone", "gemma2": "GemmaBackbone", "gemma3": "Gemma3Backbone"}

# Decoder block sub-layer (h5 group under the block) -> (canonical name under model.layers.{i}., layout
# kind, the layer's Keras name). ref: convert_gemma.py / convert_gemma3.py convert_weights (port_weight
# of each HF key into each variable, with its hook_fn), gemma_decoder_block.py / gemma3_decoder_block.py
# (names), gemma_attention.py / gemma3_attention.py (names).
_BLOCK_COMMON: dict[str, tuple[str, str, str]] = {
    "attention/query_dense": ("self_attn.q_proj.weight", "heads_in", "query"),
    "attention/key_dense": ("self_attn.k_proj.weight", "heads_in", "key"),
    "attention/value_dense": ("self_attn.v_proj.weight", "heads_in", "value"),
    "attention/output_dense": ("self_attn.o_proj.weight", "heads_out", "attention_output"),
    "gating_ffw": ("mlp.gate_proj.weight", "transpose", "ffw_gating"),  # the GELU input
    "gating_ffw_2": ("mlp.up_proj.weight", "transpose", "ffw_gating_2"),
    "ffw_linear": ("mlp.down_proj.weight", "transpose", "ffw_linear"),
    "pre_attention_norm": ("input_layernorm.weight", "copy", "pre_attention_norm"),
}
BLOCK_TABLE: dict[str, dict[str, tuple[str, str, str]]] = {
    # Gemma 1 has one norm before the MLP; HF calls it post_attention_layernorm (convert_gemma.py).
    "gemma": _BLOCK_COMMON | {"pre_ffw_norm": ("post_attention_layernorm.weight", "copy", "pre_ffw_norm")},
    "gemma2": _BLOCK_COMMON
    | {
        "post_attention_norm": ("post_attention_layernorm.weight", "copy", "post_attention_norm"),
        "pre_ffw_norm": ("pre_feedforward_layernorm.weight", "copy", "pre_ffw_norm"),
        "post_ffw_norm": ("post_feedforward_layernorm.weight", "copy", "post_ffw_norm"),
    },
}
BLOCK_TABLE["gemma3"] = BLOCK_TABLE["gemma2"] | {
    "attention/query_norm": ("self_attn.q_norm.weight", "copy", "query_norm"),
    "attention/key_norm": ("self_attn.k_norm.weight", "copy", "key_norm"),
}
# Sub-layers without variables, whose groups Keras still writes (a ``vars`` group with the name):
# attention's dropout, rotary embedding and softmax (ref: gemma_attention.py build).
_EMPTY_ATTENTION = {"attention/dropout_layer": "dropout", "attention/rope_layer": "rotary_embedding"}
_EMPTY_ATTENTION |= {"attention/softmax": "softmax"}
# Backbone-level layers: group -> (canonical name or None, Keras name); ref: gemma_backbone.py /
# gemma3_backbone.py __init__ (token_embedding, final_normalization, the two keras.Input layers).
TOP_TABLE: dict[str, tuple[str | None, str]] = {
    "layers/input_layer": (None, "token_ids"),
    "layers/input_layer_1": (None, "padding_mask"),
    "layers/reversible_embedding": ("model.embed_tokens.weight", "token_embedding"),
    "layers/rms_normalization": ("model.norm.weight", "final_normalization"),
}
# A multimodal Gemma3Backbone holds its vision tower's weights in one group (Keras's object path of the
# backbone's vision_encoder; ref: gemma3_backbone.py __init__, gemma3_vision_encoder.py Gemma3VisionEncoder):
# the text model is read without them (dropped, logged), as transformers' Gemma3ForCausalLM loads the text
# part of a Gemma3ForConditionalGeneration checkpoint.
VISION_ENCODER = "Gemma3VisionEncoder"
VISION_GROUP = "layers/gemma3_vision_encoder/"
# h5 dataset dtypes -> gemport dtype names; bfloat16 is 2-byte opaque data tagged by an attribute.
_H5_DTYPES = {np.dtype("float32"): "f32", np.dtype("float16"): "f16"}
_KERAS_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
# Gemma 3's vision tokens: Gemma3Tokenizer requires them unless has_vision_tokens is false
# (ref: gemma3_tokenizer.py Gemma3Tokenizer.__init__).
_VISION_PIECES = ("<img>", "<start_of_image>", "<end_of_image>")
# ref: gemma_tokenizer.py / gemma3_tokenizer.py __init__: _add_special_token("<bos>", ...), "<eos>", "<pad>"
_SPECIAL_PIECES = ("<bos>", "<eos>", "<pad>")


def block_group(family: str, layer: int) -> str:
    """The h5 group of decoder block ``layer``: its class name in snake case, then _1, _2, ... (ref:
    keras saving_lib.py _get_unique_name: the first of a class has no suffix)."""
    base = BACKBONES[BACKBONE_OF_FAMILY[family]]["block"]
    return f"layers/{base}" if layer == 0 else f"layers/{base}_{layer}"


def weight_table(spec: GemmaSpec) -> dict[str, tuple[str, str]]:
    """Every dataset of the preset's h5 for ``spec`` -> (canonical name, layout kind)."""
    out = {}
    top = {g: n for g, (n, _) in TOP_TABLE.items() if n is not None}
    out["layers/reversible_embedding/vars/0"] = (top["layers/reversible_embedding"], "copy")
    for i in range(spec.num_layers):
        group = block_group(spec.family, i)
        for sub, (name, kind, _) in BLOCK_TABLE[spec.family].items():
            out[f"{group}/{sub}/vars/0"] = (f"model.layers.{i}.{name}", kind)
    out["layers/rms_normalization/vars/0"] = (top["layers/rms_normalization"], "copy")
    return out


# --- layouts ----------------------------------------------------------------------------------------
def to_canonical(kind: str, data: np.ndarray) -> np.ndarray:
    """A Keras variable in the canonical (HF) layout."""
    if kind == "heads_in":  # [n, D, H] -> [n * H, D]
        n, d, h = data.shape
        return data.transpose(0, 2, 1).reshape(n * h, d)
    if kind == "heads_out":  # [n, H, D] -> [D, n * H]
        return data.reshape(-1, data.shape[2]).T
    if kind == "transpose":
        return data.T
    return data


def from_canonical(kind: str, data: np.ndarray, spec: GemmaSpec) -> np.ndarray:
    """The Keras variable of a canonical tensor; inverse of to_canonical."""
    if kind == "heads_in":  # [n * H, D] -> [n, D, H]
        return data.reshape(-1, spec.head_dim, data.shape[1]).transpose(0, 2, 1)
    if kind == "heads_out":  # [D, n * H] -> [n, H, D]
        return data.T.reshape(spec.num_heads, spec.head_dim, spec.hidden_size)
    if kind == "transpose":
        return data.T
    return data


def keras_shape(kind: str, shape: tuple[int, ...], spec: GemmaSpec) -> tuple[int, ...]:
    """The Keras variable's shape for a canonical tensor of ``shape``."""
    if kind == "heads_in":
        return (shape[0] // spec.head_dim, shape[1], spec.head_dim)
    if kind == "heads_out":
        return (spec.num_heads, spec.head_dim, spec.hidden_size)
    if kind == "transpose":
        return (shape[1], shape[0])
    return shape


# --- spec <-> backbone config ------------------------------------------------------------------------
def _sliding_pattern(family: str, n: int) -> tuple[str, ...]:
    """keras-hub's sliding layers (ref: gemma_backbone.py ``i % 2 == 0``; gemma3_backbone.py ``i % 6 < 5``)."""
    if family == "gemma3":
        return tuple(SLIDING if i % 6 < 5 else FULL for i in range(n))
    return tuple(SLIDING if i % 2 == 0 else FULL for i in range(n))


def check_expressible(spec: GemmaSpec, source: str | Path) -> None:
    """UnsupportedError, one line, for a spec that a keras-hub backbone would run differently."""
    if not spec.tie_embeddings:
        raise UnsupportedError("keras-hub ties the output head to the embedding; this model has an lm_head", source)
    if spec.activation != TANH_GELU:  # ref: gemma_decoder_block.py: gelu(x1, approximate=True)
        raise UnsupportedError(f"hidden_activation {spec.activation!r}: keras-hub's Gemma has tanh-GELU only", source)
    if spec.rms_eps != KERAS_RMS_EPS:
        raise UnsupportedError(f"rms_norm_eps {spec.rms_eps}: keras-hub's decoder blocks fix it at 1e-6", source)
    if spec.embed_scale_rule != "sqrt_hidden_in_dtype":  # ref: gemma_backbone.py x * cast(sqrt(hidden_dim))
        raise UnsupportedError(f"embedding scale rule {spec.embed_scale_rule!r}", source)
    scalar = spec.query_pre_attn_scalar or spec.head_dim
    if scalar != spec.head_dim:
        raise UnsupportedError(
            f"query_pre_attn_scalar {scalar:g}: keras-hub {KERAS_HUB_VERSION} scales queries by 1/sqrt(head_dim = "
            f"{spec.head_dim}) whatever its config says (its decoder blocks build the attention with "
            "query_head_dim_normalize=True)",
            source,
        )
    sliding = SLIDING in spec.layer_types
    if sliding and spec.layer_types != _sliding_pattern(spec.family, spec.num_layers):
        every = "five of every six layers" if spec.family == "gemma3" else "every even layer"
        raise UnsupportedError(f"sliding layers other than keras-hub's pattern ({every})", source)
    scaling = spec.rope_scaling
    if spec.family == "gemma3":
        local = spec.rope_local_theta if spec.rope_local_theta is not None else spec.rope_theta
        # ref: gemma3_backbone.py: rope_wavelength = 10_000.0 if sliding_window else 1_000_000.0
        if spec.rope_theta != 1e6 or (sliding and local != 1e4):
            raise UnsupportedError(
                f"rope bases {spec.rope_theta:g} / {local:g}: keras-hub's Gemma 3 fixes 1e6 global, 1e4 local", source
            )
        if scaling is not None and (scaling.rope_type != "linear" or scaling.params):
            # ref: keras_hub/src/layers/modeling/rotary_embedding.py: positions / scaling_factor
            raise UnsupportedError(f"rope scaling {scaling.rope_type!r}: keras-hub has linear scaling only", source)
    else:
        if spec.rope_theta != 1e4:  # ref: gemma_attention.py RotaryEmbedding(max_wavelength=10_000.0)
            raise UnsupportedError(f"rope_theta {spec.rope_theta:g}: keras-hub's Gemma fixes 10000", source)
        if scaling is not None:
            raise UnsupportedError("rope scaling: keras-hub's Gemma 1/2 have none", source)


def backbone_config(spec: GemmaSpec, dtype: str) -> dict:
    """config.json of the backbone for ``spec`` (``serialize_keras_object`` of it; ref:
    gemma_backbone.py / gemma3_backbone.py get_config, keys in their order)."""
    cls = BACKBONE_OF_FAMILY[spec.family]
    sliding = SLIDING in spec.layer_types
    head_norm = True  # the only scale keras-hub computes (check_expressible; the note above KERAS_RMS_EPS)
    policy = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": _KERAS_DTYPES[dtype]}}
    policy["registered_name"] = None
    config: dict[str, Any] = {"name": BACKBONES[cls]["name"], "trainable": True, "dtype": policy}
    common = {
        "vocabulary_size": spec.vocab_size,
        "num_layers": spec.num_layers,
        "num_query_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "hidden_dim": spec.hidden_size,
    }
    if spec.family == "gemma3":
        factor = spec.rope_scaling.factor if spec.rope_scaling else 1.0
        config |= {"vocabulary_size": spec.vocab_size, "image_size": None}
        config |= common | {"intermediate_dim": spec.intermediate_size, "head_dim": spec.head_dim}
        config |= {
            "query_head_dim_normalize": head_norm,
            "use_query_key_norm": True,
            "use_post_ffw_norm": True,
            "use_post_attention_norm": True,
            "attention_logit_soft_cap": None,
            "final_logit_soft_cap": spec.final_softcap,
            "use_sliding_window_attention": sliding,
            "sliding_window_size": spec.sliding_window if sliding else 1024,
            "local_rope_scaling_factor": 1.0,
            "global_rope_scaling_factor": float(factor),
            "vision_encoder": None,
            "use_bidirectional_attention": False,
            "layer_norm_epsilon": spec.rms_eps,
            "dropout": 0,
            "is_embedding_model": False,
            "pooling_intermediate_dim": None,
            "embedding_dim": None,
        }
    else:
        gemma2 = spec.family == "gemma2"
        config |= common | {"intermediate_dim": 2 * spec.intermediate_size, "head_dim": spec.head_dim}
        config |= {
            "layer_norm_epsilon": spec.rms_eps,
            "dropout": 0,
            "query_head_dim_normalize": head_norm,
            "use_post_ffw_norm": gemma2,
            "use_post_attention_norm": gemma2,
            "final_logit_soft_cap": spec.final_softcap,
            "attention_logit_soft_cap": spec.attn_softcap,
            "sliding_window_size": spec.sliding_window if sliding else 4096,
            "use_sliding_window_attention": sliding,
        }
    return _object(BACKBONES[cls]["module"], cls, config)


def _field(config: dict, key: str, kinds: type | tuple[type, ...], path: Path, default: Any = ...) -> Any:
    """config[key], checked to be of ``kinds``; InputError naming config.json and the key otherwise."""
    if key not in config:
        if default is ...:
            raise InputError(f"config has no {key!r}", path)
        return default
    value = config[key]
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise InputError(f"config {key!r} is {value!r}, expected a number", path)
    if not isinstance(value, kinds):
        raise InputError(f"config {key!r} is {value!r} ({type(value).__name__})", path)
    return value


def _count(value: int, key: str, bound: int, path: Path) -> int:
    if not 0 < value <= bound:
        raise InputError(f"config {key!r} is {value}, expected 1..{bound}", path)
    return value


def spec_from_config(data: dict, path: Path) -> GemmaSpec:
    """The GemmaSpec of a backbone config.json; InputError, one line, for a value the spec refuses."""
    try:
        return _spec_from_config(data, path)
    except (ValueError, OverflowError) as exc:  # GemmaSpec's and RopeScaling's checks of the values
        raise InputError(f"invalid backbone config: {exc}", path) from None


def _spec_from_config(data: dict, path: Path) -> GemmaSpec:
    """The GemmaSpec of a backbone config.json (``serialize_keras_object`` of GemmaBackbone or
    Gemma3Backbone); UnsupportedError for another class or what keras-hub's model does that HF's cannot."""
    cls = data.get("class_name")
    if not isinstance(cls, str) or cls not in BACKBONES:
        raise UnsupportedError(
            f"backbone class {cls!r} is not a Gemma text backbone (read: {', '.join(BACKBONES)})", path
        )
    config = data.get("config")
    if not isinstance(config, dict):
        raise InputError("config.json has no backbone config object", path)
    num, flag = (int, float), bool
    get = lambda key, kinds=int, default=...: _field(config, key, kinds, path, default)  # noqa: E731
    # Counts within gemport's bounds before anything per layer is built (spec.BOUNDS).
    dim = lambda key, bound: _count(get(key), key, bound, path)  # noqa: E731
    dims = {
        "vocab_size": dim("vocabulary_size", BOUNDS["vocab_size"]),
        "hidden_size": dim("hidden_dim", BOUNDS["hidden_size"]),
        "num_layers": dim("num_layers", BOUNDS["num_layers"]),
        "num_heads": dim("num_query_heads", BOUNDS["num_heads"]),
        "num_kv_heads": dim("num_key_value_heads", BOUNDS["num_kv_heads"]),
        "head_dim": dim("head_dim", BOUNDS["head_dim"]),
    }
    intermediate = dim("intermediate_dim", 2 * BOUNDS["intermediate_size"])
    eps = get("layer_norm_epsilon", num, KERAS_RMS_EPS)
    if eps != KERAS_RMS_EPS:
        raise UnsupportedError(f"layer_norm_epsilon {eps}: keras-hub's decoder blocks use 1e-6 whatever it says", path)
    head_norm = get("query_head_dim_normalize", flag, True)
    sliding = get("use_sliding_window_attention", flag, False)
    window = get("sliding_window_size", int, None) if sliding else None
    final_cap = get("final_logit_soft_cap", (*num, type(None)), None)
    attn_cap = get("attention_logit_soft_cap", (*num, type(None)), None)
    post_ffw, post_attn = get("use_post_ffw_norm", flag, False), get("use_post_attention_norm", flag, False)
    hidden, heads = dims["hidden_size"], dims["num_heads"]
    if not (isinstance(heads, int) and heads > 0 and isinstance(hidden, int)):
        raise InputError(f"config num_query_heads {heads!r}", path)
    if not head_norm and hidden // heads != dims["head_dim"]:
        raise UnsupportedError(
            "query_head_dim_normalize false: the preset asks for 1/sqrt(hidden / heads) query scaling, and keras-hub "
            f"{KERAS_HUB_VERSION} computes 1/sqrt(head_dim) whatever it says (its decoder blocks build the attention "
            "with query_head_dim_normalize=True): which model is meant is unknown",
            path,
        )
    scalar = dims["head_dim"]
    extra: dict[str, Any] = {}
    if cls == "Gemma3Backbone":
        for key, want in (
            ("use_query_key_norm", True),
            ("use_post_ffw_norm", True),
            ("use_post_attention_norm", True),
            ("use_bidirectional_attention", False),
            ("is_embedding_model", False),
        ):
            if config.get(key, want) != want:
                raise UnsupportedError(f"{key} = {config.get(key)!r}: gemport reads Gemma 3 text models only", path)
        vision = config.get("vision_encoder")
        if vision is not None and (not isinstance(vision, dict) or vision.get("class_name") != VISION_ENCODER):
            raise UnsupportedError(f"vision_encoder {str(vision)[:60]!r}: not keras-hub's {VISION_ENCODER}", path)
        if attn_cap is not None:
            raise UnsupportedError("attention_logit_soft_cap: transformers' Gemma 3 has none", path)
        if get("local_rope_scaling_factor", num, 1.0) != 1.0:
            raise UnsupportedError("local_rope_scaling_factor other than 1: transformers' Gemma 3 has none", path)
        factor = get("global_rope_scaling_factor", num, 1.0)
        family = "gemma3"
        extra = {
            "rope_theta": 1e6,
            "rope_local_theta": 1e4,
            "rope_scaling": RopeScaling("linear", float(factor)) if factor != 1.0 else None,
            "query_pre_attn_scalar": scalar,
            "final_softcap": final_cap,
        }
        extra["max_position"] = 131072
    elif post_ffw and post_attn:
        family = "gemma2"
        extra = {"query_pre_attn_scalar": scalar, "final_softcap": final_cap, "attn_softcap": attn_cap}
        extra["max_position"] = 8192
    elif post_ffw or post_attn or sliding or final_cap is not None or attn_cap is not None:
        raise UnsupportedError(
            "a GemmaBackbone with only some of Gemma 2's settings (post norms, sliding window, soft caps, query "
            "scale): transformers has no such model",
            path,
        )
    else:
        family = "gemma"
    if not isinstance(intermediate, int) or intermediate < 1 or (family != "gemma3" and intermediate % 2):
        raise InputError(f"config intermediate_dim {intermediate!r} (GemmaBackbone's is twice the MLP width)", path)
    width = intermediate if family == "gemma3" else intermediate // 2  # ref: gemma_decoder_block.py // 2
    layers = dims["num_layers"]
    layer_types = _sliding_pattern(family, layers) if sliding and isinstance(layers, int) and layers > 0 else ()
    return GemmaSpec(
        family=family,
        **dims,
        intermediate_size=width,
        rms_eps=KERAS_RMS_EPS,
        layer_types=layer_types,
        sliding_window=window,
        **extra,
    )


# --- reading ------------------------------------------------------------------------------------------
def sniff(path: Path) -> bool:
    """A preset folder: config.json beside model.weights.h5 (or model.weights.json), or beside a metadata.json
    of keras-hub."""
    if not (path.is_dir() and (path / CONFIG).is_file()):
        return False
    if (path / WEIGHTS).is_file() or (path / SHARDED_WEIGHTS).is_file():
        return True
    try:
        return "keras_hub_version" in json.loads((path / METADATA).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, RecursionError):
        return False


def _h5py():
    try:
        import h5py
    except ImportError:
        raise UnsupportedError("Keras presets need h5py (pip install h5py)") from None
    return h5py


def _open_h5(file: Path):
    """The weights file opened read-only; InputError naming it if it is not a readable HDF5 file."""
    h5py = _h5py()
    if not file.is_file():
        raise InputError("file not found (a preset's weights)", file)
    try:
        return h5py.File(file, "r")
    except (OSError, ValueError) as exc:
        raise InputError(f"not a readable HDF5 file: {exc}", file) from None


def _stored_dtype(dataset) -> str | None:
    """gemport's name of an h5 dataset's float dtype (ref: saving_lib.py H5IOStore.__getitem__: an
    opaque dataset with attribute dtype "bfloat16" is bfloat16), or None."""
    if dataset.dtype.kind == "V" and dataset.dtype.itemsize == 2:
        return "bf16" if _bfloat16_tag(dataset) else None
    return _H5_DTYPES.get(dataset.dtype)


def _bfloat16_tag(dataset) -> bool:
    """Whether the dataset has Keras's scalar string attribute dtype = "bfloat16". Its type and shape are
    checked before its value is read: only a scalar string is converted (HDF5 has crashed the process
    converting an attribute of a damaged file; fuzzing found it)."""
    h5py = _h5py()
    try:
        if "dtype" not in dataset.attrs:
            return False
        attr = h5py.h5a.open(dataset.id, b"dtype")
        if attr.get_type().get_class() != h5py.h5t.STRING or attr.shape != () or attr.get_storage_size() > 64:
            return False
        tag = dataset.attrs["dtype"]
    except (OSError, TypeError, ValueError, KeyError):  # an attribute h5py cannot read: not Keras's tag
        return False
    return isinstance(tag, str) and tag == "bfloat16"


def read(path: str | Path) -> Checkpoint:
    """Open a keras-hub Gemma preset lazily: configs and the h5's structure now, each weight when loaded."""
    path = Path(path)
    if not sniff(path):
        missing = [n for n in (CONFIG, WEIGHTS) if not (path / n).is_file()] if path.is_dir() else []
        why = f"no {' and no '.join(missing)}" if missing else f"{CONFIG} is not a keras-hub preset's"
        raise InputError(f"not a keras-hub preset folder ({why})", path)
    spec = spec_from_config(read_json(path / CONFIG), path / CONFIG)
    manifest, stated = _read_manifest(path, spec)
    if stated is not None:  # the fields as the manifest's parsed spec has them (defaults for absent ones)
        spec = GemmaSpec.from_json(spec.to_json() | {k: stated[k] for k in _MANIFEST_FIELDS})
    sharded = (path / SHARDED_WEIGHTS).is_file() and not (path / WEIGHTS).is_file()
    files = _shard_files(path / SHARDED_WEIGHTS) if sharded else [path / WEIGHTS]
    tensors = _lazy_tensors(files, spec, path / SHARDED_WEIGHTS if sharded else path / WEIGHTS)
    tokenizer_files = {}
    if (path / VOCABULARY).is_file():
        tokenizer_pieces(path / VOCABULARY, spec.vocab_size, path)  # a SentencePiece model that fits the embedding
        tokenizer_files[TOKENIZER] = (path / VOCABULARY).read_bytes()
        config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False}
        tokenizer_files["tokenizer_config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    else:
        log.info("%s: no %s (a backbone preset): no tokenizer", path, VOCABULARY)
    ckpt = Checkpoint(
        spec=spec,
        tensors=tensors,
        tokenizer_files=tokenizer_files,
        generation_config=manifest.get("generation_config") if manifest else None,
        source=str(path),
    )
    ckpt.check()
    return ckpt


# What gemport.json adds to the spec config.json gives: facts a keras-hub config does not state.
_MANIFEST_FIELDS = ("max_position", "bos_token_id", "eos_token_id", "pad_token_id")


def _read_manifest(path: Path, spec: GemmaSpec) -> tuple[dict | None, dict | None]:
    """gemport.json and its spec (``to_json`` of the parsed one), used only when that spec is config.json's
    but for _MANIFEST_FIELDS (a preset fine-tuned and saved again by keras-hub keeps no gemport.json; a
    stale one is ignored); (None, None) without one."""
    file = path / MANIFEST
    if not file.is_file():
        return None, None
    data = read_json(file)
    try:
        stated = GemmaSpec.from_json(data.get("spec"))
    except ValueError as exc:
        raise InputError(f"invalid gemport manifest: {exc}", file) from None
    if not isinstance(data.get("generation_config"), dict | None):
        raise InputError("invalid gemport manifest: generation_config is not an object", file)
    fields = stated.to_json()
    same = {k: v for k, v in fields.items() if k not in _MANIFEST_FIELDS}
    if same != {k: v for k, v in spec.to_json().items() if k not in _MANIFEST_FIELDS}:
        log.warning("%s: its spec disagrees with %s; ignored", file, CONFIG)
        return None, None
    return data, fields


def _shard_files(index: Path) -> list[Path]:
    """The weight files a sharded preset's model.weights.json names: its ``weight_map`` of group path ->
    file name or list of them (ref: keras saving_lib.py ShardedH5IOStore: ``sharding_config``), each a plain
    file name ending in .weights.h5 beside it."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError("no weight_map (an object of variable path -> shard files)", index)
    names: set[str] = set()
    for key, value in weight_map.items():
        listed = value if isinstance(value, list) else [value]
        for name in listed:
            if not isinstance(name, str) or Path(name).name != name or not name.endswith(".weights.h5"):
                raise InputError(f"weight_map[{key!r}] = {value!r} is not a .weights.h5 file name in the folder", index)
            names.add(name)
    for name in sorted(names):
        if not (index.parent / name).is_file():
            raise InputError(f"shard {name} named by the weight map is missing", index)
    return [index.parent / name for name in sorted(names)]


def _lazy_tensors(files: list[Path], spec: GemmaSpec, named: Path) -> dict[str, LazyTensor]:
    """Every weight of the h5 files, checked against the spec's names and shapes before any data is read;
    ``named`` is the file errors name (model.weights.h5, or a sharded preset's model.weights.json)."""
    table = weight_table(spec)
    shapes = expected_shapes(spec)
    tensors: dict[str, LazyTensor] = {}
    found: dict[str, tuple[tuple[int, ...], str, Path]] = {}
    for file in files:
        with _open_h5(file) as h5:
            for key, (shape, dtype) in _datasets(h5, file).items():
                if key in found:
                    raise CheckpointError(f"weight {key} is stored twice ({found[key][2].name}, {file.name})", named)
                found[key] = (shape, dtype, file)
    for key, (name, kind) in table.items():
        if key not in found:
            raise CheckpointError(f"missing weight {key} ({name})", named)
        shape, dtype, file = found.pop(key)
        want = keras_shape(kind, shapes[name], spec)
        if shape != want:
            raise CheckpointError(f"weight {key} has shape {list(shape)}, expected {list(want)}", file)
        tensors[name] = LazyTensor(name, shapes[name], dtype, load=_loader(file, key, kind, shapes[name]))
    vision = [key for key in found if spec.family == "gemma3" and key.startswith(VISION_GROUP)]
    if vision:
        log.info("%s: dropped the %d weights of the vision encoder (the text model is read)", named, len(vision))
        for key in vision:
            del found[key]
    if found:
        key = next(iter(found))
        raise CheckpointError(f"unexpected weight {key} for a {spec.family} backbone", found[key][2])
    return {n: tensors[n] for n in shapes if n in tensors}


def _datasets(h5, file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every dataset of the file: path -> (shape, dtype); CheckpointError for a dtype not read."""
    found: dict[str, tuple[tuple[int, ...], str]] = {}

    def visit(name: str, obj) -> None:
        if hasattr(obj, "shape") and hasattr(obj, "dtype"):
            found[name] = (_dataset_shape(obj, name, file), _checked_dtype(obj, name, file))

    try:
        h5.visititems(visit)
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise InputError(f"damaged HDF5 file: {exc}", file) from None
    return found


def _dataset_shape(dataset, name: str, file: Path) -> tuple[int, ...]:
    """The dataset's shape, once its data is known to sit in the file itself, in full, as Keras writes it
    (ref: saving_lib.py H5IOStore.__setitem__: ``create_dataset(key, data=value)``, contiguous, no
    filters): CheckpointError for data elsewhere (an external raw file, a virtual dataset's sources, which
    could name any file), filtered (compressed: a small file announcing any size), or chunks not stored
    (read as fill values), and for a stored size that is not the shape's (a lie about the shape): what is
    loaded is never more than the file's size."""
    if dataset.shape is None:
        raise CheckpointError(f"weight {name} has no shape (an empty dataspace)", file)
    plist = dataset.id.get_create_plist()
    if dataset.is_virtual or plist.get_external_count() > 0:
        where = "a virtual dataset" if dataset.is_virtual else "in an external file"
        raise CheckpointError(f"weight {name} is {where}; Keras stores weights in the h5 itself", file)
    if plist.get_nfilters() > 0:
        raise CheckpointError(f"weight {name} is stored filtered (compressed); Keras stores plain data", file)
    shape = tuple(int(d) for d in dataset.shape)
    needed = math.prod(shape) * dataset.dtype.itemsize
    size = file.stat().st_size
    if needed > size:  # a header that announces more data than the file holds: refused before any allocation
        raise CheckpointError(f"weight {name} announces {needed} bytes, more than the file's {size}", file)
    stored = dataset.id.get_storage_size()
    if dataset.chunks is not None:  # chunked, unfiltered: every chunk stored, none read as fill values
        chunks = math.prod(-(-d // c) for d, c in zip(shape, dataset.chunks, strict=True))
        if dataset.id.get_num_chunks() != chunks:
            raise CheckpointError(f"weight {name} stores {dataset.id.get_num_chunks()} of its {chunks} chunks", file)
    elif stored != needed:
        raise CheckpointError(f"weight {name} stores {stored} bytes, its shape {list(shape)} needs {needed}", file)
    return shape


def _checked_dtype(dataset, name: str, file: Path) -> str:
    dtype = _stored_dtype(dataset)
    if dtype is None:
        raise CheckpointError(f"weight {name} has dtype {dataset.dtype} (read: float32, float16, bfloat16)", file)
    return dtype


def _loader(file: Path, key: str, kind: str, shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
    """The tensor's load(); for a 2-D tensor stored as it is (the embedding), a RowLoader, so that a writer
    streams it a chunk of rows at a time (h5py reads a row range alone)."""

    def rows(a: int, b: int) -> torch.Tensor:
        with _open_h5(file) as h5:
            try:
                dataset = h5[key]
                bf16 = _stored_dtype(dataset) == "bf16"
                raw = dataset[a:b] if len(shape) == 2 and kind == "copy" else dataset[()]
            except (OSError, RuntimeError, KeyError, ValueError) as exc:
                raise InputError(f"cannot read weight {key}: {exc}", file) from None
        data = np.ascontiguousarray(to_canonical(kind, raw.view(np.int16) if bf16 else raw))
        want = (b - a, *shape[1:]) if len(shape) == 2 and kind == "copy" else shape
        if data.shape != want:
            raise CheckpointError(f"weight {key} came out {list(data.shape)}, expected {list(want)}", file)
        return _to_torch(data, bf16)

    if len(shape) == 2 and kind == "copy":
        return RowLoader(rows, shape[0])
    return lambda: rows(0, shape[0] if shape else 0)


def _to_torch(data: np.ndarray, bf16: bool) -> torch.Tensor:
    import torch

    tensor = torch.from_numpy(data.copy() if not data.flags.owndata else data)
    return tensor.view(torch.bfloat16) if bf16 else tensor


# --- writing ------------------------------------------------------------------------------------------
def write(
    ckpt: Checkpoint,
    dst: str | Path,
    dtype: str | None = None,
    overwrite: bool = False,
    task: bool | None = None,
    allow_fp16_overflow: bool = False,
    **_ignored: Any,
) -> Path:
    """Write ``ckpt`` as a keras-hub preset folder at ``dst`` that ``GemmaCausalLM.from_preset(dst)`` (or
    ``Gemma3CausalLM``) loads: a CausalLM preset with its tokenizer when the checkpoint has
    tokenizer.model (``task`` None or True), else a backbone preset. ``dtype`` f32/bf16/f16 (default: the
    embedding's); it is also the preset's dtype policy, the dtype keras-hub computes in by default, so an
    f16 preset is refused when an activation outgrows fp16 on calibration text (quantizers.fp16_range), as
    the HF writer refuses one, unless ``allow_fp16_overflow``."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    unused = [k for k, v in _ignored.items() if v]
    if unused:
        raise UnsupportedError(f"option(s) {', '.join(unused)} do not apply to Keras output")
    ckpt.check()
    spec = ckpt.spec
    check_expressible(spec, ckpt.source)
    has_tokenizer = TOKENIZER in ckpt.tokenizer_files
    if task and not has_tokenizer:
        raise UnsupportedError("a CausalLM preset needs the tokenizer (tokenizer.model), and the source has none")
    task = has_tokenizer if task is None else task
    if task and not _has_pieces(ckpt.tokenizer_files[TOKENIZER], _SPECIAL_PIECES):
        raise UnsupportedError(
            f"the tokenizer lacks one of {', '.join(_SPECIAL_PIECES)}, which keras-hub's Gemma tokenizers require",
            ckpt.source,
        )
    stored = dtype or ckpt.tensors["model.embed_tokens.weight"].dtype  # also the preset's dtype policy
    if stored == "f16":  # keras-hub computes in the policy's dtype by default: every activation in fp16
        label = "--dtype f16" if dtype else "f16 (the source's dtype, kept)"
        with stage("probing fp16 activations on calibration text"):
            fp16_range.check_fp16(ckpt, fp16_range.ALL, "keras", allow_fp16_overflow, label=label)
        ckpt = fp16_range.guard_weights(ckpt)
    if dtype:
        ckpt = ckpt.cast(dtype)
    dst = Path(dst)
    with atomic_output(dst, overwrite) as tmp:
        tmp.mkdir()
        _write_weights(ckpt, tmp / WEIGHTS, dst)
        _write_configs(ckpt, tmp, stored, task)
    return dst


def _write_weights(ckpt: Checkpoint, file: Path, dst: Path) -> None:
    """model.weights.h5 in the group structure Keras writes for the backbone (see the module docstring),
    one tensor at a time."""
    h5py = _h5py()
    spec = ckpt.spec
    table = weight_table(spec)
    with h5py.File(file, "w") as h5, progress(f"writing {dst.name}", total=len(table), unit="tensors") as advance:
        for group, (_, name) in TOP_TABLE.items():
            h5.create_group(f"{group}/vars").attrs["name"] = name
        for i in range(spec.num_layers):
            block = block_group(spec.family, i)
            h5.create_group(f"{block}/vars").attrs["name"] = f"decoder_block_{i}"
            h5.create_group(f"{block}/attention/vars").attrs["name"] = "attention"
            for sub, base in _EMPTY_ATTENTION.items():
                # Keras's automatic names, numbered across the model (not read back by Keras)
                h5.create_group(f"{block}/{sub}/vars").attrs["name"] = base if i == 0 else f"{base}_{i}"
            for sub, (_, _, name) in BLOCK_TABLE[spec.family].items():
                h5.create_group(f"{block}/{sub}/vars").attrs["name"] = name
        h5.create_group("vars").attrs["name"] = BACKBONES[BACKBONE_OF_FAMILY[spec.family]]["name"]
        for key, (name, kind) in table.items():
            t = ckpt.tensors[name]
            if kind == "copy" and len(t.shape) == 2:  # the embedding: a chunk of rows at a time
                _write_rows(h5, key, ckpt, t)
            else:
                _store(h5.create_dataset(key, shape=keras_shape(kind, t.shape, spec), dtype=_h5_dtype(t.dtype)))
                h5[key][...] = _h5_view(_keras_array(ckpt, name, kind))
            log_tensor(log, key, keras_shape(kind, t.shape, spec), t.dtype)
            advance(1)


def _h5_dtype(dtype: str) -> np.dtype:
    """bfloat16 as opaque 2-byte data, as Keras stores it (ref: saving_lib.py H5IOStore.__setitem__)."""
    return {"f32": np.dtype("float32"), "f16": np.dtype("float16"), "bf16": np.dtype("V2")}[dtype]


def _h5_view(data: np.ndarray) -> np.ndarray:
    return data.view(np.dtype("V2")) if data.dtype == np.int16 else data  # bfloat16 bits


def _store(dataset) -> None:
    if dataset.dtype == np.dtype("V2"):
        dataset.attrs["dtype"] = "bfloat16"  # the tag Keras reads back as bfloat16


def _write_rows(h5, key: str, ckpt: Checkpoint, t: LazyTensor) -> None:
    import torch

    dataset = h5.create_dataset(key, shape=t.shape, dtype=_h5_dtype(t.dtype))
    _store(dataset)
    done = 0
    for rows in row_chunks(t, CHUNK_VALUES):
        if not all_finite(rows):
            raise CheckpointError(f"tensor {t.name} has NaN or infinite values", ckpt.source)
        rows = rows.contiguous()
        array = rows.view(torch.int16).numpy() if rows.dtype == torch.bfloat16 else rows.numpy()
        dataset[done : done + len(array)] = _h5_view(array)
        done += len(array)
    if done != t.shape[0]:
        raise CheckpointError(f"tensor {t.name} gave {done} rows, expected {t.shape[0]}", ckpt.source)


def _keras_array(ckpt: Checkpoint, name: str, kind: str) -> np.ndarray:
    """The Keras variable of canonical tensor ``name`` (bfloat16 as its int16 bits)."""
    import torch

    t = ckpt.tensors[name]
    data = t.load()
    if tuple(data.shape) != t.shape:
        raise CheckpointError(f"tensor {name} loaded as {list(data.shape)}, expected {list(t.shape)}", ckpt.source)
    if not all_finite(data):
        raise CheckpointError(f"tensor {name} has NaN or infinite values", ckpt.source)
    data = data.contiguous()
    array = data.view(torch.int16).numpy() if data.dtype == torch.bfloat16 else data.numpy()
    return np.ascontiguousarray(from_canonical(kind, array, ckpt.spec))


def _has_pieces(model: bytes, pieces: tuple[str, ...]) -> bool:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model)
    return all(sp.PieceToId(p) != sp.unk_id() for p in pieces)


def _write_configs(ckpt: Checkpoint, tmp: Path, stored: str, task: bool) -> None:
    """config.json, metadata.json, gemport.json and, for a CausalLM, the task, preprocessor and tokenizer
    configs and the vocabulary (ref: preset_utils.py KerasPresetSaver save_backbone, save_tokenizer,
    save_task, save_preprocessor; layer configs as keras.saving.serialize_keras_object writes them)."""
    spec = ckpt.spec
    names = BACKBONES[BACKBONE_OF_FAMILY[spec.family]]
    backbone = backbone_config(spec, stored)
    _dump(tmp / CONFIG, backbone)
    metadata = {
        "keras_version": KERAS_VERSION,
        "keras_hub_version": KERAS_HUB_VERSION,
        "parameter_count": sum(math.prod(t.shape) for t in ckpt),
        "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
        "tasks": ["CausalLM"],
    }
    _dump(tmp / METADATA, metadata)
    if task:
        int32 = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "int32"}, "registered_name": None}
        tok_config = {"name": names["tokenizer_name"], "trainable": True, "dtype": int32}
        tok_config |= {"config_file": TOKENIZER_CONFIG}
        tok_config |= {"proto": None, "sequence_length": None, "add_bos": False, "add_eos": False}
        model = ckpt.tokenizer_files[TOKENIZER]
        if spec.family == "gemma3":  # ref: gemma3_tokenizer.py get_config
            tok_config["has_vision_tokens"] = _has_pieces(model, _VISION_PIECES)
        tokenizer = _object(names["tokenizer_module"], names["tokenizer"], tok_config)
        f32 = copy.deepcopy(backbone["config"]["dtype"]) | {"config": {"name": "float32"}}
        pre_config = {"name": names["preprocessor_name"], "trainable": True, "dtype": f32, "tokenizer": tokenizer}
        pre_config |= {"config_file": PREPROCESSOR, "sequence_length": 1024}
        pre_config |= {"add_start_token": True, "add_end_token": True}
        if spec.family == "gemma3":  # ref: gemma3_causal_lm_preprocessor.py get_config, __init__ defaults
            pre_config |= {"num_vision_tokens_per_image": 256, "max_images_per_prompt": 2}
        preprocessor = _object(names["preprocessor_module"], names["preprocessor"], pre_config)
        task_config = {"backbone": backbone, "preprocessor": preprocessor, "name": names["task_name"]}
        _dump(tmp / TASK, _object(names["task_module"], names["task"], task_config))
        _dump(tmp / PREPROCESSOR, preprocessor)
        _dump(tmp / TOKENIZER_CONFIG, tokenizer)
        (tmp / VOCABULARY).parent.mkdir(parents=True)
        (tmp / VOCABULARY).write_bytes(model)
    manifest = {
        "format": "keras-hub-preset",
        "written_by": f"gemport {__version__}",
        "spec": spec.to_json(),
        "generation_config": ckpt.generation_config,
        "source": ckpt.source,
    }
    # HF's tokenizer files stay out: the preset's tokenizer.json is keras-hub's tokenizer config, and
    # the SentencePiece model (assets/tokenizer/vocabulary.spm) is the whole tokenizer.
    _dump(tmp / MANIFEST, manifest)


def _object(module: str, cls: str, config: dict) -> dict:
    return {"module": module, "class_name": cls, "config": config, "registered_name": f"keras_hub>{cls}"}


def _dump(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=4), encoding="utf-8")
