"""GGUF writing for arch gemma, gemma2 and gemma3, the way llama.cpp's own tools write them.

Metadata keys, tensor names and the ``1 + w`` norm storage follow convert_hf_to_gguf.py
(conversion/gemma.py GemmaModel, Gemma2Model, Gemma3Model); per-tensor types of a mixed
file follow llama-quantize (quantizers/gguf_mix.py); block encodings are ggml's
(quantizers/gguf_blocks.py). The file is streamed: tensor infos are laid out from the lazy
shapes first, then each tensor is loaded, encoded and written in turn, so peak memory stays
near the largest tensor. A tensor read from a GGUF whose type is kept is copied as stored,
never re-quantized.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import re
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from converters import rope
from converters.gguf import (
    LAYER_NAMES,
    OFFSET_NORMS,
    TOP_NAMES,
    llamacpp_layer_types,
    llamacpp_query_scalar,
    split_paths,
)
from gemport.checkpoint import Checkpoint, LazyTensor, all_finite, row_chunks
from gemport.errors import CheckpointError, InputError, UnsupportedError
from gemport.output import atomic_files
from gemport.progress import log_tensor, progress, stage
from gemport.spec import SLIDING, TANH_GELU, GemmaSpec
from quantizers import fp16_range, gguf_mix

if TYPE_CHECKING:
    import gguf

log = logging.getLogger(__name__)

_LAYER_PREFIX = re.compile(r"^blk\.\d+\.")
# SentencePiece piece types, the numbers tokenizer.ggml.token_type uses (ref: gguf-py TokenType).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def write(
    ckpt: Checkpoint,
    dst: str | Path,
    quant: str | None = None,
    dtype: str | None = None,
    imatrix: dict[str, np.ndarray] | None = None,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    pure: bool = False,
    imatrix_source: str | None = None,
    jobs: int | None = None,
    allow_fp16_overflow: bool = False,
) -> Path:
    """Write ``ckpt`` as a GGUF file at ``dst`` (atomically); split into shards of at most
    ``max_shard_bytes`` when given (``dst`` then names the shards' common stem).

    ``quant`` is a whole-file type (f32, f16, bf16, q8_0, q4_0, ..., q4_k_m, q6_k); the default
    is ``dtype``, else the source's own: each tensor of a GGUF source keeps its stored type, a
    float checkpoint keeps its dtype (as convert_hf_to_gguf.py --outtype auto). ``imatrix`` holds
    the mean squared activation per input column by GGUF tensor name (``imatrix_source`` names
    where it came from, for errors). ``jobs`` worker processes quantize (default: one per CPU).
    """
    ckpt.check()
    ckpt = drop_vocab_padding(ckpt)
    probe = None
    if _ftype(ckpt, quant or dtype) == "f16":  # asked, or an f16 source kept: refused if fp16 parts overflow
        ckpt, probe = fp16_range.checked_gguf_f16(ckpt, allow_fp16_overflow)
    dst = Path(dst)
    arch = ckpt.spec.family
    if arch in ("gemma", "gemma2") and not ckpt.spec.tie_embeddings:
        # ref: llama.cpp src/models/gemma.cpp, gemma2.cpp: the output layer is always token_embd
        # (convert_hf_to_gguf.py drops lm_head.weight without a word, changing the model).
        raise UnsupportedError(
            f"{arch} in llama.cpp always uses the token embedding as output layer; this checkpoint has its own "
            "lm_head.weight (untied embeddings), which a GGUF cannot carry",
            _source(ckpt),
        )
    names = _gguf_names(ckpt, arch)
    shapes = _ne_shapes(ckpt, names)
    ftype = _ftype(ckpt, quant or dtype)
    if ftype is None:
        plans = [_keep_plan(g, ckpt.tensors[names[g]]) for g, _ in shapes]
        file_type = ckpt.extra.get("gguf.file_type")
        file_type = _file_type_of(plans) if file_type is None else int(file_type)
    else:
        plans = _plan(ckpt, shapes, ftype, pure, bool(imatrix))
        file_type = gguf_mix.FTYPES[ftype][0]
    _log_plan(plans)
    imatrix = _check_imatrix(imatrix or {}, dict(shapes), imatrix_source)
    writer = _new_writer(dst, arch, max_shard_bytes)
    add_metadata(writer, ckpt, file_type)
    add_tokenizer(writer, ckpt)
    for plan, (_, ne) in zip(plans, shapes, strict=True):
        shape = tuple(reversed(ne))  # gguf-py takes numpy order and writes ne order
        writer.add_tensor_info(plan.name, shape, np.dtype(np.float32), _nbytes(ne, plan.qtype), _qtype(plan.qtype))
    return _write_files(writer, dst, overwrite, ckpt, names, plans, imatrix, jobs or os.cpu_count() or 1, probe)


# --- names, types -----------------------------------------------------------------------------


def tensor_plans(
    ckpt: Checkpoint, quant: str, pure: bool = False, has_imatrix: bool = False
) -> dict[str, gguf_mix.TensorPlan]:
    """Canonical name -> the GGUF name and GGML type ``write(ckpt, quant=quant, ...)`` gives that tensor."""
    names = _gguf_names(ckpt, ckpt.spec.family)
    ftype = _ftype(ckpt, quant)
    return {names[p.name]: p for p in _plan(ckpt, _ne_shapes(ckpt, names), ftype, pure, has_imatrix)}


def _ne_shapes(ckpt: Checkpoint, names: dict[str, str]) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, shape in ne order: row length first) in llama.cpp's tensor order."""
    order = gguf_mix.llamacpp_order(list(names))
    return [(g, tuple(reversed(ckpt.tensors[names[g]].shape))) for g in order]


def _plan(
    ckpt: Checkpoint, shapes: list[tuple[str, tuple[int, ...]]], ftype: str, pure: bool, has_imatrix: bool
) -> list[gguf_mix.TensorPlan]:
    n_gqa = ckpt.spec.num_heads // ckpt.spec.num_kv_heads
    return gguf_mix.plan_types(shapes, ftype, ckpt.spec.num_layers, n_gqa, pure, has_imatrix)


def _gguf_names(ckpt: Checkpoint, arch: str) -> dict[str, str]:
    """GGUF name -> canonical name, for every tensor written (no output.weight when tied)."""
    table = {hf: g for g, hf in TOP_NAMES.items()}
    layer = {hf: g for g, hf in LAYER_NAMES[arch].items()}
    out = {}
    for name in ckpt.tensors:
        if name in table:
            out[table[name]] = name
            continue
        _, _, i, rest = name.split(".", 3)  # model.layers.{i}.{rest}
        out[f"blk.{i}.{layer[rest]}"] = name
    return out


def _ftype(ckpt: Checkpoint, quant: str | None) -> str | None:
    if quant is not None:
        try:
            return gguf_mix.ftype_of(quant)
        except ValueError as exc:
            raise UnsupportedError(str(exc)) from None
    if any(t.raw is not None for t in ckpt):
        return None  # a GGUF source: keep every tensor's stored type
    dtypes = {t.dtype for t in ckpt if len(t.shape) == 2}
    return "f32" if "f32" in dtypes else ("f16" if "f16" in dtypes else "bf16")


def _keep_plan(gguf_name: str, t: LazyTensor) -> gguf_mix.TensorPlan:
    qtype = t.raw[0] if t.raw is not None else {"f32": "F32", "f16": "F16", "bf16": "BF16"}[t.dtype]
    if len(t.shape) == 1:
        qtype = "F32"  # ggml's norms are F32 (ref: convert_hf_to_gguf.py: 1-D tensors stay F32)
    return gguf_mix.TensorPlan(gguf_name, qtype, qtype)


def _file_type_of(plans: list[gguf_mix.TensorPlan]) -> int:
    """general.file_type of a file whose tensors keep their types: that of its commonest 2-D type."""
    from collections import Counter

    counts = Counter(p.qtype for p in plans if p.qtype != "F32") or Counter(["F32"])
    main = counts.most_common(1)[0][0]
    return next(n for n, t in gguf_mix.FTYPES.values() if t == main)


def _qtype(name: str) -> gguf.GGMLQuantizationType:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name]


def _nbytes(shape: tuple[int, ...], qtype: str) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[_qtype(qtype)]
    return int(np.prod(shape)) // block * size


def _check_imatrix(
    imatrix: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], source: str | None
) -> dict[str, np.ndarray]:
    """The entries that fit this model; one whose length is not the row length is an error."""
    for name, values in imatrix.items():
        if name in shapes and len(values) != shapes[name][0]:
            rows = shapes[name][0]
            message = f"importance matrix entry {name} has {len(values)} values, the tensor's rows {rows}"
            raise InputError(message, source)
    unused = sorted(set(imatrix) - set(shapes))
    if unused:
        log.warning("importance matrix entries for tensors this model lacks, ignored: %s", ", ".join(unused[:5]))
    # token_embd is a row lookup: no activation ever multiplies it, so no imatrix has it (llama-imatrix
    # collects matmul inputs only; ref: tools/imatrix/imatrix.cpp IMatrixCollector::collect_imatrix)
    missing = [n for n, s in shapes.items() if len(s) == 2 and n not in imatrix and n != "token_embd.weight"]
    if imatrix and missing:
        log.warning("%d tensors have no importance matrix entry (unweighted), e.g. %s", len(missing), missing[0])
    return {n: v for n, v in imatrix.items() if n in shapes}


def _log_plan(plans: list[gguf_mix.TensorPlan]) -> None:
    from collections import Counter

    for p in plans:
        if p.qtype != p.wanted:
            log.info("%s: rows do not fit %s, falling back to %s", p.name, p.wanted, p.qtype)
    log.info("tensor types: %s", dict(Counter(p.qtype for p in plans)))


# --- metadata ---------------------------------------------------------------------------------


QUANTIZATION_KEY = "gemport.quantization"
VOCAB_PADDING_KEY = "gemport.vocab_padding"  # rows dropped past the tokenizer: see drop_vocab_padding


def add_metadata(w: gguf.GGUFWriter, ckpt: Checkpoint, file_type: int) -> None:
    """Every key llama.cpp reads for the arch (ref: convert_hf_to_gguf.py conversion/gemma.py
    set_gguf_parameters; llama-model.cpp load_hparams for what each means)."""
    import gguf

    s = ckpt.spec
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(_model_name(ckpt))
    w.add_context_length(s.max_position)
    w.add_embedding_length(s.hidden_size)
    w.add_block_count(s.num_layers)
    w.add_feed_forward_length(s.intermediate_size)
    w.add_head_count(s.num_heads)
    w.add_head_count_kv(s.num_kv_heads)
    w.add_layer_norm_rms_eps(s.rms_eps)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    if s.family != "gemma":
        _check_attention_scale(s, _source(ckpt))
        if s.layer_types != llamacpp_layer_types(s.family, s.num_layers, SLIDING in s.layer_types):
            # llama.cpp reads a per-layer pattern here; without it, it assumes its default one.
            w.add_sliding_window_pattern([t == SLIDING for t in s.layer_types])
    _check_llamacpp_semantics(s, ckpt.source)
    # ref: llama-model.cpp load_hparams: rope.freq_base (default 10000) and a linear rope.scaling.factor
    # for every arch; gemma2.cpp applies both to its sliding layers too (as transformers' one rope does),
    # gemma3.cpp its sliding layers use rope.freq_base_swa unscaled (as Gemma 3's sliding rope_parameters).
    w.add_rope_freq_base(s.rope_theta)
    _write_rope_scaling(w, s, ckpt.source)
    if s.family == "gemma2":
        w.add_attn_logit_softcapping(s.attn_softcap)
        w.add_final_logit_softcapping(s.final_softcap)
        w.add_sliding_window(s.sliding_window)
    if s.family == "gemma3":
        w.add_rope_freq_base_swa(s.rope_local_theta or s.rope_theta)
        if s.final_softcap:
            w.add_final_logit_softcapping(s.final_softcap)
        if SLIDING in s.layer_types:
            w.add_sliding_window(s.sliding_window)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if ckpt.extra.get(VOCAB_PADDING_KEY):
        w.add_string(VOCAB_PADDING_KEY, json.dumps(ckpt.extra[VOCAB_PADDING_KEY], separators=(",", ":")))
    if ckpt.extra.get("quantization"):
        # How the weights were made (gemport quantize: method, config, how many tensors were kept,
        # compact: the file should not outgrow llama-quantize's); llama.cpp ignores unknown keys.
        w.add_string(QUANTIZATION_KEY, _made_summary(ckpt.extra["quantization"]))


def _write_rope_scaling(w: gguf.GGUFWriter, s: GemmaSpec, source: str | None) -> None:
    """ref: llama-model.cpp load_hparams: rope.scaling.type, rope.scaling.factor (freq_scale = 1 / factor),
    rope.scaling.original_context_length (n_ctx_orig_yarn) and rope.scaling.attn_factor (multiplies the
    YaRN magnitude); linear and yarn only (_check_llamacpp_semantics refused the rest). Gemma 3's sliding
    layers stay unscaled in llama.cpp (rope_freq_scale_train_swa 1) as in transformers."""
    import gguf

    scaling = s.rope_scaling
    if not scaling:
        return
    if scaling.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling.factor)
        return
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(scaling.factor)
    w.add_rope_scaling_orig_ctx_len(int(dict(scaling.params)["original_max_position_embeddings"]))
    attn_factor = rope.gguf_yarn_attn_factor(s, source)
    if not math.isclose(attn_factor, 1.0, rel_tol=1e-7):  # an explicit attention_factor (or mscale pair)
        w.add_rope_scaling_attn_factors(attn_factor)


def _made_summary(manifest: dict) -> str:
    """The quantization manifest's method and scalar settings as compact JSON (a hundred bytes or so:
    the file should not outgrow llama-quantize's of the same type)."""
    config = dict(manifest.get("config", {}))
    config |= {f"calib_{k}": v for k, v in config.pop("calibration", {}).items() if k in ("tokens", "n_ctx")}
    if "gguf_type" in manifest:  # the type sets bits, grouping and scales; the config's do not apply
        config = {"gguf_type": manifest["gguf_type"]} | {k: v for k, v in config.items() if k not in _RECORD_KEYS}
    made = {"method": manifest.get("method")} | {k: v for k, v in config.items() if v is not None}
    return json.dumps(made, separators=(",", ":"))


_RECORD_KEYS = ("bits", "group_size", "symmetric", "scale_dtype", "block_size")


def _check_llamacpp_semantics(s: GemmaSpec, source: str) -> None:
    """Refuse a spec llama.cpp would run differently from transformers, since GGUF cannot state it."""
    if s.rope_scaling and s.rope_scaling.rope_type not in ("linear", "yarn"):
        # ref: llama-model.cpp LLAMA_ROPE_SCALING_TYPES: none, linear, yarn, longrope; no dynamic NTK
        # (transformers' dynamic rope recomputes inv_freq once a sequence passes original_max_position_embeddings).
        raise rope.refusal(
            s, source, "not written to GGUF: llama.cpp has no dynamic rope scaling that follows the sequence length"
        )
    if s.rope_scaling and s.rope_scaling.rope_type == "yarn":
        rope.gguf_yarn_attn_factor(s, source)  # refuses what llama.cpp's YaRN would run differently
    if s.activation != TANH_GELU:
        # ref: models/gemma*.cpp build_ffn(..., LLM_FFN_GELU): ggml_gelu, the tanh approximation
        raise UnsupportedError(
            f"hidden_activation {s.activation!r}: llama.cpp runs Gemma with the tanh GELU only", source
        )
    if s.family == "gemma2" and (s.attn_softcap is None or s.final_softcap is None):
        # ref: models/gemma2.cpp: attn_soft_cap is always on and the final softcap always applied
        missing = "attn_logit_softcapping" if s.attn_softcap is None else "final_logit_softcapping"
        raise UnsupportedError(f"{missing} null: llama.cpp applies both softcaps to every Gemma 2", source)


def _check_attention_scale(s: GemmaSpec, source: str | None) -> None:
    """GGUF has no key for the attention scale: llama.cpp derives it (ref: models/gemma2.cpp,
    gemma3.cpp load_arch_hparams). Refuse a spec that differs rather than write a file that
    llama.cpp would run differently."""
    scalar = llamacpp_query_scalar(s.family, s.num_layers, s.hidden_size // s.num_heads, s.head_dim)
    if (s.query_pre_attn_scalar or s.head_dim) != scalar:
        raise UnsupportedError(
            f"query_pre_attn_scalar {s.query_pre_attn_scalar} differs from the {scalar} llama.cpp assumes for a "
            f"{s.num_layers}-layer {s.family} and GGUF cannot state it; llama.cpp would run this model differently",
            source,
        )


def _model_name(ckpt: Checkpoint) -> str:
    source = Path(ckpt.source.split(" (")[0]) if ckpt.source else None
    return source.stem if source and source.suffix == ".gguf" else (source.name if source else "gemma")


def add_tokenizer(w: gguf.GGUFWriter, ckpt: Checkpoint) -> None:
    """tokenizer.ggml.* from tokenizer.model and tokenizer_config.json, as convert_hf_to_gguf.py
    writes a SentencePiece vocabulary (ref: conversion/base.py _create_vocab_sentencepiece,
    gguf-py vocab.py SpecialVocab)."""
    tokens, scores, types = sentencepiece_vocab(ckpt)
    config = _json(ckpt, "tokenizer_config.json")
    s = ckpt.spec
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(s.bos_token_id)
    eos = s.eos_token_id if isinstance(s.eos_token_id, int) else s.eos_token_id[0]
    w.add_eos_token_id(eos)
    if isinstance(s.eos_token_id, tuple) and len(s.eos_token_id) > 1:
        w.add_eot_token_id(s.eos_token_id[1])  # llama.cpp stops on EOS or EOT (llama-vocab.cpp)
    unk = _special_id(config, "unk_token", tokens)
    if unk is not None:
        w.add_unk_token_id(unk)
    w.add_pad_token_id(s.pad_token_id)
    w.add_add_bos_token(bool(config.get("add_bos_token", True)))
    w.add_add_eos_token(bool(config.get("add_eos_token", False)))
    w.add_add_space_prefix(False)  # ref: GemmaModel.set_vocab
    template = _chat_template(ckpt, config)
    if template:
        w.add_chat_template(template)


def sentencepiece_vocab(ckpt: Checkpoint) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types of the SentencePiece model, with the tokens that
    tokenizer_config.json lists as added marked CONTROL (special) or USER_DEFINED, score -1000."""

    proto = _tokenizer_proto(ckpt)
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    added = _json(ckpt, "tokenizer_config.json").get("added_tokens_decoder", {})
    for key, entry in added.items():
        i = int(key)
        if i >= len(tokens):
            continue
        # The special flag alone decides, not llama.cpp's converter's look-alike test (any "<...>"
        # is CONTROL there, ref: conversion/base.py does_token_look_special): transformers matches a
        # non-special added token such as "<table>" in plain text, and only a USER_DEFINED token is
        # matched so by llama.cpp, as in the GGUF Google's release was converted to.
        if entry.get("special"):
            types[i], tokens[i] = _CONTROL, entry["content"]
        else:
            types[i], tokens[i] = _USER_DEFINED, entry["content"]
        scores[i] = -1000.0
    # llama.cpp matches user-defined tokens against the raw text, so their "▁" are spaces there
    # (ref: conversion/base.py _create_vocab_sentencepiece, "pre-normalize user-defined spaces").
    tokens = [t.replace("\u2581", " ") if k == _USER_DEFINED else t for t, k in zip(tokens, types, strict=True)]
    if len(tokens) != ckpt.spec.vocab_size:
        vocab = ckpt.spec.vocab_size
        why = " (llama.cpp drops padding rows past the tokenizer for gemma3 only)" if len(tokens) < vocab else ""
        message = f"tokenizer.model holds {len(tokens)} pieces, the model's vocab is {vocab}{why}"
        raise CheckpointError(message, _source(ckpt))
    return tokens, scores, types


def _source(ckpt: Checkpoint) -> str | None:
    """The checkpoint's file or folder, for errors (``source`` may carry a note in parentheses)."""
    return ckpt.source.split(" (")[0] if ckpt.source else None


def _tokenizer_proto(ckpt: Checkpoint):
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as pb

    data = ckpt.tokenizer_files.get("tokenizer.model")
    if data is None:
        raise UnsupportedError(
            "writing GGUF needs a SentencePiece tokenizer.model; the checkpoint has none", _source(ckpt)
        )
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError as exc:
        raise InputError(f"tokenizer.model is not a SentencePiece model ({exc})", _source(ckpt)) from None
    return proto


def drop_vocab_padding(ckpt: Checkpoint) -> Checkpoint:
    """A Gemma 3 checkpoint with more embedding rows than tokenizer pieces (4B/12B/27B: 262208 rows,
    262144 pieces) without the rows past the tokenizer, as llama.cpp writes it (ref: convert_hf_to_gguf.py
    conversion/gemma.py Gemma3Model.modify_tensors, "remove OOV rows in token_embd": data_torch[:n_vocab_real]
    with n_vocab_real the tokenizer.model's pieces; that is the published Gemma 3 GGUFs, whose config.json
    states no vocab_size. Where it does, _create_vocab_sentencepiece pads the token list with [PAD{id}]
    pieces and keeps every row instead). The rows must be padding: the BOS, EOS and PAD ids may not lie
    in them; added tokens there (Gemma 3's <image_soft_token>, 262144) are left out with a warning, as
    _create_vocab_sentencepiece does ("ignore token ...: id is out of range"). The drop is logged and
    recorded in the file (gemport.vocab_padding). Any other checkpoint is returned as it is."""
    rows, family = ckpt.spec.vocab_size, ckpt.spec.family
    pieces = len(_tokenizer_proto(ckpt).pieces) if "tokenizer.model" in ckpt.tokenizer_files else rows
    if family != "gemma3" or pieces >= rows:
        return ckpt  # a mismatch left is refused by sentencepiece_vocab
    needed = _ids_in_padding(ckpt, pieces)
    if needed:
        raise CheckpointError(
            f"{needed} lies in rows {pieces}..{rows - 1}, past the tokenizer.model's {pieces} pieces; "
            "those rows are not padding and cannot be dropped as llama.cpp does",
            _source(ckpt),
        )
    added = _json(ckpt, "tokenizer_config.json").get("added_tokens_decoder", {})
    ignored = sorted(int(k) for k in added if int(k) >= pieces)
    if ignored:
        log.warning("added tokens past the tokenizer.model's pieces left out, as llama.cpp does: ids %s", ignored[:8])
    tensors = dict(ckpt.tensors)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in tensors:
            tensors[name] = _first_rows(tensors[name], pieces)
    log.warning(
        "%s: %d embedding rows for %d tokenizer pieces: the %d padding rows past the tokenizer are dropped, "
        "as llama.cpp's convert_hf_to_gguf.py does for Gemma 3",
        _source(ckpt) or "checkpoint",
        rows,
        pieces,
        rows - pieces,
    )
    record = {"rows": rows, "pieces": pieces, "dropped": rows - pieces}
    return replace(
        ckpt,
        spec=replace(ckpt.spec, vocab_size=pieces),
        tensors=tensors,
        extra=ckpt.extra | {VOCAB_PADDING_KEY: record},
    )


def _ids_in_padding(ckpt: Checkpoint, pieces: int) -> str | None:
    """The first BOS, EOS or PAD id at or past ``pieces``, described; None if none."""
    s = ckpt.spec
    eos = s.eos_token_id if isinstance(s.eos_token_id, tuple) else (s.eos_token_id,)
    ids = {"bos_token_id": (s.bos_token_id,), "eos_token_id": eos, "pad_token_id": (s.pad_token_id,)}
    for what, values in ids.items():
        for i in values:
            if i >= pieces:
                return f"{what} {i}"
    return None


def _first_rows(t: LazyTensor, n: int) -> LazyTensor:
    return LazyTensor(t.name, (n, *t.shape[1:]), t.dtype, load=lambda: t.load()[:n].contiguous(), quant=t.quant)


def _special_id(config: dict, key: str, tokens: list[str]) -> int | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return tokens.index(value) if isinstance(value, str) and value in tokens else None


def _chat_template(ckpt: Checkpoint, config: dict) -> str | None:
    if "chat_template.jinja" in ckpt.tokenizer_files:
        return ckpt.tokenizer_files["chat_template.jinja"].decode()
    template = config.get("chat_template")
    return template if isinstance(template, str) else None


def _json(ckpt: Checkpoint, name: str) -> dict:
    data = ckpt.tokenizer_files.get(name)
    return json.loads(data) if data else {}


# --- tensors ----------------------------------------------------------------------------------


def _new_writer(dst: Path, arch: str, max_shard_bytes: int | None) -> gguf.GGUFWriter:
    import gguf

    logging.getLogger("gguf").setLevel(logging.WARNING)  # gguf-py logs its plan at INFO
    return gguf.GGUFWriter(None, arch, split_max_size=max_shard_bytes or 0)


@contextmanager
def _pool(jobs: int, plans: list[gguf_mix.TensorPlan]) -> Iterator[Executor | None]:
    """Worker processes for block quantization, when there is some and more than one CPU to use.
    forkserver: the workers start clean (numpy only), not as copies of a process holding torch.
    Ctrl-C is the parent's alone: the workers ignore SIGINT (else each prints a KeyboardInterrupt
    traceback), and the parent, interrupted, drops the queued chunks and shuts the pool down."""
    if jobs <= 1 or all(p.qtype in gguf_mix.UNQUANTIZED or p.qtype == "F32" for p in plans):
        yield None
        return
    _start_forkserver_deaf_to_sigint()
    context = multiprocessing.get_context("forkserver")
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_ignore_sigint)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _ignore_sigint() -> None:
    """Pool initializer: a worker leaves Ctrl-C to the parent, which tears the pool down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start_forkserver_deaf_to_sigint() -> None:
    """Start the fork server (if not running) with SIGINT ignored. An ignored signal stays ignored
    across exec, and Python then installs no KeyboardInterrupt handler, so neither the server (while
    it imports) nor the workers it forks (which get its handlers) print a traceback on Ctrl-C; the
    initializer covers a server someone else started. ref: multiprocessing/forkserver.py main
    (old_handlers), Python's signal module init (default_int_handler only over SIG_DFL)."""
    from multiprocessing import forkserver

    previous = signal.getsignal(signal.SIGINT)
    # signal.signal works only in the main thread, and cannot put back a handler installed from C
    # (None); in those cases the initializer alone applies.
    if threading.current_thread() is not threading.main_thread() or previous is None:
        forkserver.ensure_running()
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


def _write_files(
    writer: gguf.GGUFWriter,
    dst: Path,
    overwrite: bool,
    ckpt: Checkpoint,
    names: dict[str, str],
    plans: list[gguf_mix.TensorPlan],
    imatrix: dict[str, np.ndarray],
    jobs: int,
    probe: fp16_range.Background | None = None,
) -> Path:
    """Stream every tensor into the file(s) in a temporary folder, then move them to ``dst`` once
    ``probe`` (the fp16 range probe running beside the writer) has passed."""
    finals = split_paths(dst, len(writer.tensors))
    with atomic_files(finals, overwrite) as tmp:
        writer.write_header_to_file(tmp / dst.name)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        try:
            with _pool(jobs, plans) as pool, progress(f"writing {dst.name}", len(plans), "tensors") as advance:
                for plan in plans:
                    t = ckpt.tensors[names[plan.name]]
                    writer.write_tensor_data(_Streamed(t, plan, imatrix.get(plan.name), pool, jobs, _source(ckpt)))
                    log_tensor(log, plan.name, t.shape, plan.qtype)
                    advance()
                    if probe is not None:
                        probe.check()  # a refusal ends the write at once
        finally:
            writer.close()
        if probe is not None:
            with stage("checking fp16 activations"):
                probe.join()
    return finals[0]


# Rows of a tensor encoded at a time: its float32 copy and its encoding exist one chunk at a time (a
# 256000 x 3072 embedding is 3.1 GB in float32; a chunk of 16M values is 64 MB).
CHUNK_VALUES = 1 << 24


class _Streamed:
    """A tensor's bytes in its planned type, for ``GGUFWriter.write_tensor_data``, which uses only
    ``nbytes`` and ``tofile`` of the array it is given (ref: gguf-py gguf/gguf_writer.py
    GGUFWriter.write_tensor_data; little-endian files, so no byteswap): ``tofile`` encodes and writes the
    rows chunk by chunk. The stored blocks are copied when the tensor is already of that type."""

    def __init__(self, t, plan, imatrix, pool, jobs, source):
        self.t, self.plan, self.imatrix, self.pool, self.jobs, self.source = t, plan, imatrix, pool, jobs, source
        self.nbytes = _nbytes(t.shape, plan.qtype)

    def tofile(self, f) -> None:
        written = 0
        for chunk in self.chunks():
            for part in chunk:
                part.tofile(f)
                written += part.nbytes
        if written != self.nbytes:
            raise CheckpointError(f"tensor {self.t.name}: encoded {written} bytes, expected {self.nbytes}", self.source)

    def chunks(self) -> Iterator[list[np.ndarray]]:
        """The encoded rows, chunk by chunk, each as consecutive parts. With a pool, the next chunk is
        read and handed to the workers before the current one is awaited, so reading overlaps the
        encoding."""
        t, plan = self.t, self.plan
        if t.raw is not None and t.raw[0] == plan.qtype:
            yield [t.raw[1]()]
            return
        import torch

        pending: deque[Callable[[], list[np.ndarray]]] = deque()
        for rows in row_chunks(t, CHUNK_VALUES):
            if not all_finite(rows):
                raise CheckpointError(f"tensor {t.name} has NaN or infinite values", self.source)
            if plan.qtype == "F16" and _LAYER_PREFIX.sub("", plan.name) not in OFFSET_NORMS:
                # torch casts rows straight to fp16, multithreaded: the bytes of numpy's float32 -> float16
                # (both round to nearest even, subnormals kept; bf16 -> f32 is exact)
                pending.append(_done(rows.to(torch.float16).numpy()))
            elif plan.qtype not in ("F32", "BF16") and rows.dtype == torch.bfloat16:
                # bf16 rows go to the quantizing workers as their bits: half the bytes, converted there
                bits = rows.contiguous().view(torch.int16).numpy().view(np.uint16)
                pending.append(_quantize_rows(bits, _qtype(plan.qtype), self.imatrix, self.pool, self.jobs))
            else:
                pending.append(self.encode(rows.float().numpy()))
            if len(pending) > 1:
                yield pending.popleft()()
        while pending:
            yield pending.popleft()()

    def encode(self, x: np.ndarray) -> Callable[[], list[np.ndarray]]:
        """Rows ``x`` (float32) in the planned type, as a call that returns them (pooled work may
        still be running until it is called)."""
        if _LAYER_PREFIX.sub("", self.plan.name) in OFFSET_NORMS:
            x = x + np.float32(1.0)  # ref: GemmaModel.modify_tensors: norms are stored as 1 + w, in f32
        qtype = self.plan.qtype
        if qtype == "F32":
            return _done(np.ascontiguousarray(x, dtype=np.float32))
        if qtype == "F16":
            return _done(x.astype(np.float16))
        from gguf.quants import quantize

        if qtype == "BF16":
            return _done(quantize(x, _qtype("BF16")))  # round to nearest even, as convert_hf_to_gguf.py
        return _quantize_rows(x, _qtype(qtype), self.imatrix, self.pool, self.jobs)


def _done(x: np.ndarray) -> Callable[[], list[np.ndarray]]:
    return lambda: [x]


PARALLEL_MIN_VALUES = 1 << 20  # below this a tensor is quantized in-process: a pool round trip costs more


def _quantize_rows(
    x: np.ndarray, qtype: gguf.GGMLQuantizationType, imatrix: np.ndarray | None, pool: Executor | None, jobs: int
) -> Callable[[], list[np.ndarray]]:
    """ggml blocks of ``x`` [rows, n] (float32, or bfloat16 bits as uint16), as a call that returns
    them in consecutive parts; rows are independent, so large tensors are cut into row chunks that
    the pool's worker processes quantize in parallel (the output is the same bytes) while the caller
    goes on."""
    from quantizers import gguf_blocks

    encode = gguf_blocks.quantize_bf16 if x.dtype == np.uint16 else gguf_blocks.quantize
    if pool is None or x.size < PARALLEL_MIN_VALUES:
        return _done(encode(x, qtype, imatrix))
    n_chunks = 4 * jobs  # a few chunks per worker keeps them all busy to the end
    bounds = np.linspace(0, len(x), n_chunks + 1).astype(int)
    spans = [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    parts = [pool.submit(encode, x[a:b], qtype, imatrix) for a, b in spans]
    return lambda: [p.result() for p in parts]
