"""GGUF (llama.cpp) checkpoints of arch gemma, gemma2 and gemma3: reading.

The header is read by converters/gguf_header.py, which checks every count, length and offset
against the bytes in the file before using it (gguf-py's GGUFReader trusts them; the module says
why and how), and the metadata is checked against itself and the tensors present by
converters/gguf_checks.py before anything is sized from it. Each tensor is memory-mapped and
dequantized (``gguf.quants.dequantize``) only when it is loaded, so a conversion streams tensor by
tensor. Quantized and F32 tensors load as f32, F16/BF16 ones in their own dtype.

The spec is rebuilt from the ``{arch}.*`` metadata, with llama.cpp's own defaults where the
file is silent (ref: llama.cpp src/llama-model.cpp, llama_model::load_hparams). The tokenizer
is rebuilt from ``tokenizer.ggml.*`` as a SentencePiece ``tokenizer.model``, plus the
``tokenizer.json`` and ``tokenizer_config.json`` transformers makes of it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from converters.gguf_checks import MAX_CONTEXT, check_layers, check_sizes, check_tokenizer
from converters.gguf_header import MAGIC, Header, Metadata, TensorInfo, read_header
from converters.tokenizer_files import hf_tokenizer_files as _hf_tokenizer_files
from converters.tokenizer_files import sentencepiece_matching_specials
from gemport.checkpoint import Checkpoint, LazyTensor
from gemport.errors import CheckpointError, InputError, UnsupportedError
from gemport.spec import FULL, SLIDING, GemmaSpec, RopeScaling

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ARCHS = ("gemma", "gemma2", "gemma3")

# GGUF tensor name -> canonical (HF) name. GGUF names are gguf-py's TENSOR_NAMES; the pairs
# are what llama.cpp convert_hf_to_gguf.py writes for each arch (via gguf-py tensor_mapping.py),
# and what transformers' GGUF loader maps back (modeling_gguf_pytorch_utils.get_gguf_hf_weights_map).
TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when tied (llama.cpp never writes it for gemma/gemma2)
}
_LAYER_NAMES_COMMON = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Gemma 2/3 have four norms per layer. gguf-py maps HF post_attention_layernorm to
# post_attention_norm for these archs, and pre_feedforward_layernorm to ffn_norm.
_LAYER_NAMES_GEMMA2 = _LAYER_NAMES_COMMON | {
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
LAYER_NAMES = {
    # Gemma 1's HF post_attention_layernorm is the pre-FFN norm: llama-style, GGUF ffn_norm.
    "gemma": _LAYER_NAMES_COMMON | {"ffn_norm.weight": "post_attention_layernorm.weight"},
    "gemma2": _LAYER_NAMES_GEMMA2,
    "gemma3": _LAYER_NAMES_GEMMA2
    | {"attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight"},
}
# Every Gemma RMSNorm weight is stored as 1 + w: llama.cpp GemmaModel/Gemma2Model/Gemma3Model
# .modify_tensors add 1 to every tensor named "*norm.weight" (q/k norms included), since ggml's
# rms_norm multiplies by the weight as is; transformers' Gemma2TensorProcessor subtracts it again.
OFFSET_NORMS = frozenset(
    {
        "output_norm.weight",
        "attn_norm.weight",
        "ffn_norm.weight",
        "post_attention_norm.weight",
        "post_ffw_norm.weight",
        "attn_q_norm.weight",
        "attn_k_norm.weight",
    }
)
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")

# SentencePiece piece types; llama.cpp's tokenizer.ggml.token_type uses the same numbers
# (ref: gguf-py constants.py TokenType, sentencepiece_model.proto ModelProto.SentencePiece.Type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def write(ckpt: Checkpoint, dst: str | Path, **options) -> Path:
    """Write a GGUF file; see converters.gguf_writer.write for the options."""
    from converters.gguf_writer import write as write_gguf

    return write_gguf(ckpt, dst, **options)


def sniff(path: Path) -> bool:
    """A file with GGUF's magic, or named ``*.gguf`` (so that one without the magic is told so by
    read_header, not refused as an unknown format)."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


QUANTIZATION_KEY = "gemport.quantization"  # what gemport's writer records of the quantizer (gguf_writer.py)


def read(path: str | Path, tokenizer: bool = True) -> Checkpoint:
    """Open a Gemma GGUF lazily: metadata and tokenizer now, tensors when loaded. A split model
    (``NAME-00001-of-0000N.gguf``, as llama-gguf-split and gguf-py write) is read whole from its
    first shard. ``tokenizer=False`` checks the tokenizer metadata without rebuilding the tokenizer files
    (through transformers: most of the time a read takes; ``gemport inspect`` needs no files). Each
    tensor's ``raw`` holds its stored ggml type name; ``extra["gguf.files"]`` the files read."""
    path = Path(path)
    header = read_header(path)
    meta = Metadata(header)
    check_is_model(meta)
    arch = meta.text("general.architecture")
    if arch not in ARCHS:
        raise UnsupportedError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(ARCHS)})", path)
    headers = [header] + [read_header(p) for p in _other_shards(path, meta)]
    infos = _tensor_infos(headers, meta)
    check_tokenizer(meta)
    n_layers = check_layers(meta, arch, infos)
    check_sizes(meta, arch, infos)
    spec = _spec(meta, arch, n_layers, has_output="output.weight" in infos)
    tensors: dict[str, LazyTensor] = {}
    for t in infos.values():
        name, offset = canonical_name(t.name, arch, t.path)
        if name in tensors:
            raise InputError(f"tensor {t.name} is stored twice", t.path)
        tensors[name] = _lazy(t, name, offset)
    if not tokenizer:
        check_tokenizer_metadata(meta)
    ckpt = Checkpoint(
        spec=spec,
        tensors=tensors,
        tokenizer_files=_tokenizer_files(meta) if tokenizer else {},
        generation_config=_generation_config(meta),
        source=str(path),
        extra={
            "gguf.file_type": meta.integer("general.file_type", None),
            "gguf.files": [h.path for h in headers],
            "gguf.quantization": meta.raw(QUANTIZATION_KEY),
        },
    )
    ckpt.check()
    return ckpt


# general.type of GGUF files that are not models, and what to do with each instead
# (ref: gguf-py constants.py GGUFType; llama.cpp imatrix.cpp save_imatrix, llama-adapter.cpp).
NOT_MODELS = {
    "imatrix": "an importance matrix (general.type imatrix), not a model; give it to `gemport convert --imatrix`",
    "adapter": "a LoRA adapter (general.type adapter), not a model; gemport reads whole models only",
    "mmproj": "a multimodal projector (general.type mmproj), not a language model",
}


def check_is_model(meta: Metadata) -> None:
    """One line naming what the file is when it is a GGUF but not (the start of) a model: an
    importance matrix, an adapter, or a shard after the first of a split model (those hold only the
    split keys; ref: gguf-split.cpp split_strategy, gguf-py GGUFWriter: split.no counts from 0)."""
    kind = meta.raw("general.type")
    if isinstance(kind, str) and kind in NOT_MODELS:
        raise InputError(NOT_MODELS[kind], meta.path)
    count = meta.integer("split.count", 1, lo=0, hi=MAX_SHARDS)
    number = meta.integer("split.no", 0, hi=MAX_SHARDS)
    if count > 1 and number >= count:
        raise InputError(f"metadata split.no is {number}, split.count {count}: no such shard", meta.path)
    if count > 1 and number > 0:
        m = _SHARD_RE.fullmatch(meta.path.name)
        first = SHARD_NAME.format(m.group(1) if m else "NAME", 1, count)
        raise InputError(f"shard {number + 1} of {count} of a split model: open {first}", meta.path)


SHARD_NAME = "{}-{:05d}-of-{:05d}.gguf"  # ref: gguf-py constants.py SHARD_NAME_FORMAT, llama_split_path
_SHARD_RE = re.compile(r"(.+)-(\d{5})-of-(\d{5})\.gguf")


def split_paths(path: Path, n: int) -> list[Path]:
    """The file names of a model written as ``n`` shards at ``path`` (just ``path`` if one)."""
    return [path] if n == 1 else [path.with_name(SHARD_NAME.format(path.stem, i, n)) for i in range(1, n + 1)]


MAX_SHARDS = 99999  # five digits in the shard names (ref: gguf-py constants.py SHARD_NAME_FORMAT)


def _other_shards(path: Path, meta: Metadata) -> list[Path]:
    count = meta.integer("split.count", 1, lo=1, hi=MAX_SHARDS)
    if count <= 1:
        return []
    m = _SHARD_RE.fullmatch(path.name)
    if not m or int(m.group(2)) != 1 or int(m.group(3)) != count:
        first = f"NAME-00001-of-{count:05d}.gguf"
        raise InputError(f"shard of a {count}-file split model: pass its first file, {first}", path)
    shards = split_paths(path.with_name(m.group(1) + ".gguf"), count)[1:]
    for shard in shards:
        if not shard.is_file():
            raise InputError(f"split model is missing its shard {shard.name}", path)
    return shards


def _tensor_infos(headers: list[Header], meta: Metadata) -> dict[str, TensorInfo]:
    """Every shard's tensors by name; each shard must say it is shard i of the same split
    (ref: gguf-py constants.py Keys.Split: split.no counts from 0, split.tensors.count is the total)."""
    infos: dict[str, TensorInfo] = {}
    count = len(headers)
    for i, header in enumerate(headers):
        if count > 1:
            shard = Metadata(header)
            if shard.integer("split.count", 1) != count or shard.integer("split.no", i) != i:
                raise InputError(
                    f"metadata split.no/split.count do not make this shard {i + 1} of {count}", header.path
                )
        for t in header.tensors:
            if t.name in infos:
                raise InputError(f"tensor {t.name} is stored twice", header.path)
            infos[t.name] = t
    total = meta.integer("split.tensors.count", len(infos))
    if total != len(infos):
        raise InputError(f"metadata split.tensors.count is {total}, the shards hold {len(infos)} tensors", meta.path)
    return infos


# --- spec ---------------------------------------------------------------------------------


def _spec(meta: Metadata, arch: str, n_layers: int, has_output: bool) -> GemmaSpec:
    """The spec, from metadata that check_layers and check_sizes have found consistent with the tensors."""
    a = f"{arch}."
    hidden = meta.integer(a + "embedding_length", lo=1)
    n_heads = meta.integer(a + "attention.head_count", lo=1)
    # ref: llama-model.cpp load_hparams: n_head_kv defaults to n_head, n_embd_head_k to n_embd / n_head
    head_dim = meta.integer(a + "attention.key_length", hidden // n_heads, lo=1)
    if meta.integer(a + "attention.value_length", head_dim) != head_dim:
        raise UnsupportedError("attention.value_length differs from key_length", meta.path)
    if meta.integer(a + "rope.dimension_count", head_dim) != head_dim:
        raise UnsupportedError("partial rotary embedding (rope.dimension_count != head_dim)", meta.path)
    tokens = meta.strings("tokenizer.ggml.tokens")
    eos = _eos_ids(meta)
    try:
        return GemmaSpec(
            family=arch,
            vocab_size=len(tokens),
            hidden_size=hidden,
            intermediate_size=meta.integer(a + "feed_forward_length", lo=1),
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=meta.integer(a + "attention.head_count_kv", n_heads, lo=1),
            head_dim=head_dim,
            rms_eps=_f32(meta.number(a + "attention.layer_norm_rms_epsilon", lo=1e-12, hi=1.0)),
            max_position=meta.integer(a + "context_length", lo=1, hi=MAX_CONTEXT),
            rope_theta=_f32(meta.number(a + "rope.freq_base", 10000.0, lo=1.0)),  # llama.cpp default
            rope_scaling=_rope_scaling(meta, arch),
            tie_embeddings=not has_output,
            bos_token_id=meta.integer("tokenizer.ggml.bos_token_id", 2),
            eos_token_id=eos[0] if len(eos) == 1 else eos,
            pad_token_id=meta.integer("tokenizer.ggml.padding_token_id", 0),
            **_ARCH_FACTS[arch](meta, a, n_layers, hidden // n_heads, head_dim),
        )
    except ValueError as exc:
        raise InputError(f"inconsistent GGUF metadata: {exc}", meta.path) from None


def _eos_ids(meta: Metadata) -> tuple[int, ...]:
    """EOS, then EOT if the file names another: llama.cpp ends generation on either (llama-vocab.cpp)."""
    ids = [meta.integer("tokenizer.ggml.eos_token_id", 1)]
    eot = meta.integer("tokenizer.ggml.eot_token_id", None)
    if eot is not None and eot not in ids:
        ids.append(eot)
    return tuple(ids)


def llamacpp_layer_types(arch: str, n_layers: int, windowed: bool) -> tuple[str, ...]:
    """The sliding/global pattern llama.cpp assumes; GGUF has no key for it (ref: llama-model.cpp
    load_hparams: LLM_ARCH_GEMMA2 set_swa_pattern(2), even layers sliding; LLM_ARCH_GEMMA3 with a
    sliding window set_swa_pattern(6), every 6th layer global; Gemma 1 all global)."""
    if arch == "gemma2":
        return tuple(SLIDING if i % 2 == 0 else FULL for i in range(n_layers))
    if arch == "gemma3" and windowed:
        return tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n_layers))
    return (FULL,) * n_layers


def llamacpp_query_scalar(arch: str, n_layers: int, embd_per_head: int, head_dim: int) -> int:
    """The attention scale llama.cpp uses, as HF's query_pre_attn_scalar (ref: llama-model.cpp:
    1/sqrt(n_embd / n_head) for the 27B Gemma 2 (46 layers) and Gemma 3 (62 layers), else
    1/sqrt(head_dim); from gemma_pytorch config.py)."""
    big = {"gemma2": 46, "gemma3": 62}.get(arch)
    return embd_per_head if n_layers == big else head_dim


def _stated_layer_types(meta: Metadata, a: str, n_layers: int, default: tuple[str, ...]) -> tuple[str, ...]:
    """``attention.sliding_window_pattern``: one bool per layer (true = sliding), or every n-th
    layer global; absent, llama.cpp's default (ref: llama-model.cpp load_swa_pattern,
    llama-hparams.cpp set_swa_pattern)."""
    key = a + "attention.sliding_window_pattern"
    value = meta.raw(key)
    if value is None:
        return default
    if isinstance(value, np.ndarray) and value.dtype == bool:
        if len(value) != n_layers:
            raise InputError(f"metadata {key} has {len(value)} entries, not {n_layers}", meta.path)
        return tuple(SLIDING if v else FULL for v in value.tolist())
    n = meta.integer(key)  # ref: llama-hparams.cpp set_swa_pattern: any n (n > layers: all sliding)
    return tuple(SLIDING if n == 0 or i % n < n - 1 else FULL for i in range(n_layers))


def _gemma_facts(meta: Metadata, a: str, n_layers: int, embd_per_head: int, head_dim: int) -> dict:
    return {"layer_types": llamacpp_layer_types("gemma", n_layers, False)}


def _gemma2_facts(meta: Metadata, a: str, n_layers: int, embd_per_head: int, head_dim: int) -> dict:
    # ref: llama-model.cpp LLM_ARCH_GEMMA2: n_swa defaults to 4096 and the softcaps to
    # llama-hparams.h's 50.0 / 30.0
    return {
        "layer_types": _stated_layer_types(meta, a, n_layers, llamacpp_layer_types("gemma2", n_layers, True)),
        "sliding_window": meta.integer(a + "attention.sliding_window", 4096, lo=1, hi=MAX_CONTEXT),
        "query_pre_attn_scalar": llamacpp_query_scalar("gemma2", n_layers, embd_per_head, head_dim),
        "attn_softcap": _softcap(meta.number(a + "attn_logit_softcapping", 50.0, lo=0.0)),
        "final_softcap": _softcap(meta.number(a + "final_logit_softcapping", 30.0, lo=0.0)),
    }


def _gemma3_facts(meta: Metadata, a: str, n_layers: int, embd_per_head: int, head_dim: int) -> dict:
    # ref: llama-model.cpp LLM_ARCH_GEMMA3: local rope base 10000 unscaled unless the file states
    # rope.freq_base_swa; no attention softcap; final softcap only if stated.
    window = meta.integer(a + "attention.sliding_window", 0, hi=MAX_CONTEXT)
    facts: dict = {
        "query_pre_attn_scalar": llamacpp_query_scalar("gemma3", n_layers, embd_per_head, head_dim),
        "final_softcap": _softcap(meta.number(a + "final_logit_softcapping", None, lo=0.0)),
    }
    if window > 0:
        facts["layer_types"] = _stated_layer_types(meta, a, n_layers, llamacpp_layer_types("gemma3", n_layers, True))
        facts["sliding_window"] = window
        facts["rope_local_theta"] = _f32(meta.number(a + "rope.freq_base_swa", 10000.0, lo=1.0))
    return facts


_ARCH_FACTS: dict[str, Callable[..., dict]] = {"gemma": _gemma_facts, "gemma2": _gemma2_facts, "gemma3": _gemma3_facts}


def _softcap(value: float | None) -> float | None:
    return _f32(value) if value else None


def _f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that reads back as it (1e-06, not
    9.99999997e-07), which is what the config it came from said."""
    return float(str(np.float32(value)))


def _rope_scaling(meta: Metadata, arch: str) -> RopeScaling | None:
    """ref: llama-model.cpp load_hparams: type defaults to linear; factor from rope.scaling.factor,
    else the older rope.scale_linear; 0 (absent) means none."""
    a = f"{arch}.rope."
    kind = meta.text(a + "scaling.type", "linear")
    factor = _f32(meta.number(a + "scaling.factor", meta.number(a + "scale_linear", 0.0, lo=0.0), lo=0.0))
    if kind == "none" or factor in (0.0, 1.0):
        return None
    if kind == "yarn":
        return _yarn_scaling(meta, a, factor)
    if kind != "linear":
        raise UnsupportedError(f"rope scaling type {kind!r} is not supported (linear and yarn only)", meta.path)
    # gemma2.cpp scales the sliding layers too (freq_scale_swa = freq_scale), as transformers' one Gemma 2
    # rope does (GemmaSpec.layer_rope_scaling); gemma3.cpp only the global ones, as Gemma 3's rope_parameters.
    return RopeScaling("linear", factor)


def _yarn_scaling(meta: Metadata, a: str, factor: float) -> RopeScaling:
    """transformers' yarn parameters of a GGUF's YaRN. ref: llama-model.cpp load_hparams:
    rope.scaling.original_context_length (default the context length) and rope.scaling.attn_factor
    (default 1), which multiplies the magnitude get_mscale(factor) llama.cpp applies (llama-context.cpp);
    beta_fast / beta_slow are always 32 / 1 there, transformers' defaults."""
    arch_prefix = a[: -len("rope.")]
    n_ctx_train = meta.integer(arch_prefix + "context_length", lo=1, hi=MAX_CONTEXT)
    orig = meta.integer(a + "scaling.original_context_length", n_ctx_train, lo=1, hi=MAX_CONTEXT)
    params: dict = {"original_max_position_embeddings": orig}
    attn = meta.number(a + "scaling.attn_factor", 1.0, lo=0.0)
    if _f32(attn) != 1.0:
        params["attention_factor"] = float(_f32(attn)) * (1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0)
    return RopeScaling("yarn", factor, tuple(params.items()))


# --- tensors ------------------------------------------------------------------------------


def canonical_name(gguf_name: str, arch: str, path: Path) -> tuple[str, bool]:
    """(canonical name, stored as 1 + w) of a GGUF tensor."""
    if gguf_name in TOP_NAMES:
        return TOP_NAMES[gguf_name], gguf_name in OFFSET_NORMS
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in LAYER_NAMES[arch]:
        return f"model.layers.{int(m.group(1))}.{LAYER_NAMES[arch][m.group(2)]}", m.group(2) in OFFSET_NORMS
    raise CheckpointError(f"unexpected tensor {gguf_name} for arch {arch}", path)


def _lazy(t: TensorInfo, name: str, offset: bool) -> LazyTensor:
    from gguf import GGMLQuantizationType as Q

    qtype = Q(t.qtype)
    if not _can_dequantize(qtype):
        raise UnsupportedError(
            f"tensor {t.name} has type {qtype.name}, which the gguf package cannot dequantize", t.path
        )
    shape = tuple(reversed(t.ne))  # GGUF lists dims in ne order, innermost first
    dtype = {Q.F16: "f16", Q.BF16: "bf16"}.get(qtype, "f32")
    if offset:
        dtype = "f32"  # w = (1 + w) - 1 is exact in f32 for any stored float
    return LazyTensor(name, shape, dtype, load=functools.partial(_load, t, shape, offset), raw=(qtype.name, t.array))


@functools.cache
def _can_dequantize(qtype: int) -> bool:
    """Whether gguf.quants.dequantize handles this type: tried on one block of zeros."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(qtype)
    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _load(t: TensorInfo, shape: tuple[int, ...], offset: bool) -> torch.Tensor:
    import torch
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    data = t.array()
    if t.qtype == Q.F16:
        out = torch.from_numpy(np.array(data, dtype=np.float16))
    elif t.qtype == Q.BF16:  # mapped as raw bytes; numpy has no bfloat16
        out = torch.from_numpy(np.array(data).view(np.int16)).view(torch.bfloat16)
    else:
        out = torch.from_numpy(np.array(dequantize(data, Q(t.qtype)), dtype=np.float32))
    out = out.reshape(shape)
    if offset:
        # Undo llama.cpp's 1 + w in f32, as transformers' Gemma2TensorProcessor does (weights - 1
        # on the f32 array gguf.quants.dequantize returns).
        out = out.float() - 1.0
    return out


# --- tokenizer and generation config -------------------------------------------------------


def check_tokenizer_metadata(meta: Metadata) -> None:
    """The checks of the tokenizer metadata before the rebuild: its model kind, the types of its flags,
    scores, token types and chat template, the special ids it falls back on."""
    kind = meta.text("tokenizer.ggml.model", None)
    if kind != "llama":
        raise UnsupportedError(
            f"tokenizer.ggml.model {kind!r} is not supported (only 'llama', SentencePiece)", meta.path
        )
    for key, default in (("add_bos_token", True), ("add_eos_token", False), ("add_space_prefix", False)):
        meta.flag(f"tokenizer.ggml.{key}", default)
    tokens = meta.strings("tokenizer.ggml.tokens")
    meta.numbers("tokenizer.ggml.scores", None)
    meta.numbers("tokenizer.ggml.token_type", None, integer=True)
    for name, default in (("unknown", 3), ("bos", 2), ("eos", 1), ("padding", 0)):
        if meta.integer(f"tokenizer.ggml.{name}_token_id", default) >= len(tokens):
            raise InputError(
                f"no tokenizer.ggml.{name}_token_id, and the default {default} is past the vocabulary", meta.path
            )
    meta.text("tokenizer.chat_template", None)


def _tokenizer_files(meta: Metadata) -> dict[str, bytes]:
    check_tokenizer_metadata(meta)
    model = _sentencepiece_model(meta)
    config = {
        "tokenizer_class": "GemmaTokenizer",
        # transformers and llama.cpp add BOS to a SentencePiece vocabulary unless the file says not to
        "add_bos_token": meta.flag("tokenizer.ggml.add_bos_token", True),
        "add_eos_token": meta.flag("tokenizer.ggml.add_eos_token", False),
    }
    tokens = meta.strings("tokenizer.ggml.tokens")
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = meta.integer(f"tokenizer.ggml.{key}_token_id", None)  # inside the vocabulary: check_tokenizer
        if token_id is not None:
            config[f"{name}_token"] = tokens[token_id]
    try:
        files = {"tokenizer.model": sentencepiece_matching_specials(model)} | _hf_tokenizer_files(model, config)
    except (RuntimeError, ValueError, OSError, KeyError, IndexError, TypeError) as exc:
        # sentencepiece and transformers refuse some piece lists (a piece twice, an empty piece)
        # with their own exceptions; they are faults of this file's tokenizer metadata.
        raise InputError(f"cannot rebuild the tokenizer from tokenizer.ggml.*: {exc}", meta.path) from None
    template = meta.text("tokenizer.chat_template", None)
    if template:
        # the file's chat template, where transformers, llama.cpp's converter and
        # onnxruntime-genai read it (ref: transformers tokenization_utils_base save_pretrained)
        config = json.loads(files["tokenizer_config.json"])
        files["tokenizer_config.json"] = (
            json.dumps(config | {"chat_template": template}, indent=2, ensure_ascii=False) + "\n"
        ).encode()
    return files


def _sentencepiece_model(meta: Metadata) -> bytes:
    """A SentencePiece BPE ModelProto holding the file's pieces, scores and piece types."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    # lengths, types and ids checked by gguf_checks.check_tokenizer
    tokens = meta.strings("tokenizer.ggml.tokens")
    scores = meta.numbers("tokenizer.ggml.scores", None)
    scores = [0.0] * len(tokens) if scores is None else scores.tolist()
    types = meta.numbers("tokenizer.ggml.token_type", None, integer=True)
    types = [_NORMAL] * len(tokens) if types is None else types.tolist()
    specials = {}
    for name, key, default in (("unk", "unknown", 3), ("bos", "bos", 2), ("eos", "eos", 1), ("pad", "padding", 0)):
        specials[name] = meta.integer(f"tokenizer.ggml.{key}_token_id", default)
        if specials[name] >= len(tokens):  # only a default can be: check_tokenizer bounds stated ids
            raise InputError(
                f"no tokenizer.ggml.{key}_token_id, and the default {default} is past the vocabulary", meta.path
            )
    unk = specials["unk"]
    proto = pb.ModelProto()
    for i, (token, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
        piece = proto.pieces.add()
        # llama.cpp writes user-defined pieces with "▁" turned back into spaces ("pre-normalize
        # user-defined spaces", convert_hf_to_gguf.py _create_vocab_sentencepiece); SentencePiece
        # matches them after its normalizer has replaced spaces with "▁", so undo that.
        piece.piece = token.replace(" ", "\u2581") if kind == _USER_DEFINED else token
        piece.score = float(score)
        # llama.cpp marks the tokens HF lists as special (<unk> included) CONTROL; SentencePiece
        # needs exactly one UNKNOWN piece, at the file's unknown_token_id.
        piece.type = _UNKNOWN if i == unk else kind
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = True
    # Encoding options as in Gemma's own tokenizer.model (ref: transformers convert_slow_tokenizer
    # GemmaConverter docstring); only allow_whitespace_only_pieces changes how text is encoded.
    spec.split_digits = spec.allow_whitespace_only_pieces = True
    spec.treat_whitespace_as_suffix = False
    for name, token_id in specials.items():
        setattr(spec, f"{name}_id", token_id)
        setattr(spec, f"{name}_piece", proto.pieces[token_id].piece)
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = meta.flag("tokenizer.ggml.add_space_prefix", False)
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def _generation_config(meta: Metadata) -> dict:
    eos = _eos_ids(meta)
    out = {"eos_token_id": eos[0] if len(eos) == 1 else list(eos)}
    for name, key in (("bos_token_id", "bos_token_id"), ("pad_token_id", "padding_token_id")):
        if (value := meta.integer(f"tokenizer.ggml.{key}", None)) is not None:
            out[name] = value
    return out
