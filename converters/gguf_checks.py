"""Consistency of a Gemma GGUF's metadata, with itself and with the tensors the file holds, checked
before anything is sized from the metadata (a per-layer list from block_count, a tokenizer from the
token arrays). Key names are gguf-py's (ref: gguf-py constants.py Keys.LLM, Keys.Attention,
Keys.Tokenizer); llama.cpp reads them in src/llama-model.cpp load_hparams and src/llama-vocab.cpp load.
"""

from __future__ import annotations

import logging
import re

import numpy as np

from converters.gguf_header import Metadata, TensorInfo
from gemport.errors import InputError

log = logging.getLogger(__name__)

MAX_CONTEXT = 1 << 24  # context_length and sliding_window; Gemma 3's is 131072
_LAYER_RE = re.compile(r"blk\.(\d+)\.")
# tokenizer.ggml.{name}_token_id keys (ref: gguf-py constants.py Keys.Tokenizer *_ID)
SPECIAL_IDS = ("bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "mask", "fim_pre", "fim_suf", "fim_mid")
SPECIAL_IDS += ("fim_pad", "fim_rep", "fim_sep", "prefix", "suffix", "middle")
USED_IDS = ("bos", "eos", "eot", "unknown", "padding")  # the ids gemport reads (converters/gguf.py)
TOKEN_TYPES = range(1, 7)  # NORMAL .. BYTE (ref: gguf-py constants.py TokenType; 0 is UNDEFINED)


def check_layers(meta: Metadata, arch: str, tensors: dict[str, TensorInfo]) -> int:
    """``{arch}.block_count``, once it agrees with the ``blk.N.`` tensors present."""
    key = f"{arch}.block_count"
    n_layers = meta.integer(key, lo=1)
    present = {int(m.group(1)) for name in tensors if (m := _LAYER_RE.match(name))}
    top = max(present, default=-1) + 1
    if n_layers != top:
        held = f"layers blk.0 to blk.{top - 1}" if top else "no layer tensors"
        raise InputError(f"metadata {key} is {n_layers}, but the file's tensors hold {held}", meta.path)
    return n_layers


def check_sizes(meta: Metadata, arch: str, tensors: dict[str, TensorInfo]) -> None:
    """The sizes in the metadata against the shapes of the tensors they describe (``ne`` order,
    row length first), so that a wrong size is named by its key, not found later as a tensor."""
    a = f"{arch}."
    hidden = meta.integer(a + "embedding_length", lo=1)
    n_heads = meta.integer(a + "attention.head_count", lo=1)
    n_kv = meta.integer(a + "attention.head_count_kv", n_heads, lo=1)
    # ref: llama-model.cpp load_hparams: n_embd_head_k defaults to n_embd / n_head
    head_dim = meta.integer(a + "attention.key_length", hidden // n_heads, lo=1)
    if head_dim < 1:
        raise InputError(
            f"metadata {a}embedding_length {hidden} is less than attention.head_count {n_heads}", meta.path
        )
    meta.integer(a + "context_length", lo=1, hi=MAX_CONTEXT)
    ff = meta.integer(a + "feed_forward_length", lo=1)
    n_vocab = len(meta.strings("tokenizer.ggml.tokens"))
    shapes = {
        "token_embd.weight": ((hidden, n_vocab), "embedding_length and the token count"),
        "output.weight": ((hidden, n_vocab), "embedding_length and the token count"),
        "blk.0.attn_q.weight": ((hidden, n_heads * head_dim), "embedding_length, head_count and key_length"),
        "blk.0.attn_k.weight": ((hidden, n_kv * head_dim), "embedding_length, head_count_kv and key_length"),
        "blk.0.ffn_gate.weight": ((hidden, ff), "embedding_length and feed_forward_length"),
        "blk.0.attn_q_norm.weight": ((head_dim,), "key_length"),
    }
    for name, (want, keys) in shapes.items():
        t = tensors.get(name)
        if t is not None and tuple(t.ne) != want:
            raise InputError(
                f"tensor {name} has shape {list(t.ne)} (ne order), but the metadata ({keys}) make it {list(want)}",
                meta.path,
            )


def check_tokenizer(meta: Metadata) -> None:
    """Parallel token arrays of one length, piece types known, special token ids inside the vocabulary."""
    tokens = meta.strings("tokenizer.ggml.tokens")
    n = len(tokens)
    if n == 0:
        raise InputError("metadata tokenizer.ggml.tokens is empty", meta.path)
    for name, integer in (("scores", False), ("token_type", True)):
        key = f"tokenizer.ggml.{name}"
        values = meta.numbers(key, None, integer=integer)
        if values is None:
            continue
        if len(values) != n:
            raise InputError(f"metadata {key} has {len(values)} entries, tokenizer.ggml.tokens has {n}", meta.path)
        if not integer and not np.isfinite(values).all():
            raise InputError(f"metadata {key} holds NaN or infinite values", meta.path)
        if integer and len(values) and not (values.min() >= TOKEN_TYPES[0] and values.max() <= TOKEN_TYPES[-1]):
            bad = int(values[(values < TOKEN_TYPES[0]) | (values > TOKEN_TYPES[-1])][0])
            raise InputError(f"metadata {key} holds token type {bad}, not one of 1..6", meta.path)
    meta.strings("tokenizer.ggml.merges", None)
    for name in SPECIAL_IDS:
        key = f"tokenizer.ggml.{name}_token_id"
        token_id = meta.integer(key, None, lo=-(1 << 63))
        if token_id is None or 0 <= token_id < n:
            continue
        if name in USED_IDS:
            raise InputError(f"metadata {key} is {token_id}, outside the vocabulary of {n} tokens", meta.path)
        # ref: llama-vocab.cpp llama_vocab::impl::load: "bad special token ... using default id": llama.cpp
        # loads the file without that id; gemport does not use it either
        log.warning("%s: metadata %s is %d, outside the vocabulary of %d tokens; ignored", meta.path, key, token_id, n)
