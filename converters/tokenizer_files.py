"""Tokenizer files: the Hugging Face files transformers makes of a SentencePiece model, and the
files an ONNX folder holds so that onnxruntime-genai's own tokenizer reads them as transformers does.

onnxruntime-genai tokenizes with onnxruntime-extensions, which reads ``tokenizer.json`` (the
vocabulary, merges and added tokens) and ``tokenizer_config.json`` (``tokenizer_class``,
``bos_token``/``eos_token``, ``add_bos_token``/``add_eos_token``, ``added_tokens_decoder``,
``chat_template``) but not the ``post_processor`` that makes transformers add BOS (ref:
onnxruntime-extensions operators/tokenizer/tokenizer_jsconfig.hpp TokenJsonConfig::Load and
ParseTokensFromConfig; bpe_kernels.cc JsonFastTokenizer::UpdateTokenizer, SpmTokenize). Three
things differ from transformers on the files transformers 5 saves for Gemma:

- transformers 5 no longer writes ``add_bos_token``; extensions versions differ in what they
  assume then (newer ones guess from the post_processor). Written explicitly, as transformers
  applies it, every version adds BOS exactly when transformers does.
- onnxruntime-genai creates its tokenizer with ``add_special_tokens`` false, for every model
  (ref: onnxruntime-genai src/models/model.cpp ``Tokenizer::Tokenizer``), so ``encode`` adds no
  BOS whatever the files say; ``tokenizer.update_options(add_special_tokens="true")`` turns it on,
  and a chat template's own ``<bos>`` is encoded as the special token. No file can change that.
- extensions decodes an added token as its text (ref: bpe_streaming.hpp
  ``BpeStreamingDecoder::SpmId2Token``), so Gemma's whitespace-run pieces ("▁▁" ... , listed as
  added tokens because SentencePiece marks them user-defined) come out as "▁▁" instead of two
  spaces. They are vocabulary pieces with merges, which both tokenizers reach by BPE, so the ONNX
  folder leaves them out of the added-token lists; the files are checked to encode the same.
  Only text holding a literal "▁" beside spaces encodes differently there (the listed pieces
  are matched before BPE; unlisted, "a ▁▁ b" becomes "a", "▁▁▁▁", "b" as SentencePiece has it).

``sentencepiece_matching_specials`` is for the SentencePiece model rebuilt from a GGUF.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from gemport.errors import InputError

log = logging.getLogger(__name__)

JSON, CONFIG, MODEL = "tokenizer.json", "tokenizer_config.json", "tokenizer.model"
SPECIAL_MAP = "special_tokens_map.json"
SPACE = "\u2581"  # SentencePiece's escaped space
# Space runs between words, at line starts and ends: what the whitespace pieces encode.
_PROBES = tuple(f"a{' ' * n}b" for n in range(1, 40)) + ("  x", "x  ", "\n    y\n\t  z", "def f():\n        return")


def hf_tokenizer_files(model: bytes, config: dict) -> dict[str, bytes]:
    """tokenizer.json and tokenizer_config.json (and special_tokens_map.json where written), as
    transformers makes them from the SentencePiece ``model`` and ``config``."""
    from transformers import AutoTokenizer

    keep = (JSON, CONFIG, "special_tokens_map.json")
    with tempfile.TemporaryDirectory(prefix="gemport-tok-") as tmp:
        src, dst = Path(tmp, "src"), Path(tmp, "dst")
        src.mkdir()
        (src / MODEL).write_bytes(model)
        (src / CONFIG).write_text(json.dumps(config))
        AutoTokenizer.from_pretrained(src).save_pretrained(dst)
        files = {name: (dst / name).read_bytes() for name in keep if (dst / name).is_file()}
    # save_pretrained echoes where it loaded from (the temporary folder); drop those keys.
    saved = json.loads(files[CONFIG])
    for key in ("vocab_file", "is_local", "local_files_only"):
        saved.pop(key, None)
    # transformers 5 no longer writes add_bos_token/add_eos_token; llama.cpp's convert_hf_to_gguf.py
    # (gguf-py SpecialVocab) and onnxruntime-extensions read them from this file.
    for key in ("add_bos_token", "add_eos_token"):
        if key in config:
            saved[key] = bool(config[key])
    # transformers 5 no longer writes added_tokens_decoder, but llama.cpp's convert_hf_to_gguf.py
    # takes its user-defined and control tokens (Gemma's whitespace runs among them) from that list
    # alone (ref: conversion/base.py _create_vocab_sentencepiece); without it they become NORMAL and
    # llama.cpp tokenizes runs of spaces differently. Rebuilt from tokenizer.json's added_tokens.
    if not saved.get("added_tokens_decoder"):
        keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
        added = json.loads(files[JSON]).get("added_tokens", [])
        saved["added_tokens_decoder"] = {str(t["id"]): {k: t[k] for k in keys if k in t} for t in added}
    files[CONFIG] = _dump(saved)
    return files


def sentencepiece_matching_specials(model: bytes) -> bytes:
    """The SentencePiece ``model`` with its CONTROL pieces other than BOS, EOS and padding made
    USER_DEFINED, so that SentencePiece matches them in text as transformers and llama.cpp (with
    special-token parsing) do. A GGUF marks CONTROL every token Hugging Face lists as special
    (ref: llama.cpp conversion/base.py _create_vocab_sentencepiece), among them Gemma's
    <start_of_turn>/<end_of_turn>; a SentencePiece CONTROL piece is never matched in text, and
    Google's gemma library encodes its chat turns as text with SentencePiece (ref: gemma
    gm/text/_template.py PROMPT, _tokenizer.py Tokenizer.encode), so they must be user-defined."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model)
    spec = proto.trainer_spec
    keep = {spec.bos_id, spec.eos_id, spec.pad_id}
    control, user = pb.ModelProto.SentencePiece.CONTROL, pb.ModelProto.SentencePiece.USER_DEFINED
    changed = False
    for i, piece in enumerate(proto.pieces):
        if piece.type == control and i not in keep:
            piece.type, changed = user, True
    return proto.SerializeToString() if changed else model


def genai_tokenizer_files(files: dict[str, bytes], source: str | None = None) -> dict[str, bytes]:
    """The tokenizer files for an ONNX folder: ``files`` (a checkpoint's) with what
    onnxruntime-extensions needs to tokenize and decode as transformers does (module docstring).
    A SentencePiece model without tokenizer.json gets the one transformers makes of it; without
    either, the files are returned as they are (the ONNX writer warns)."""
    files = dict(files)
    if JSON not in files:
        if MODEL not in files:
            return files
        config = _config(files, source)
        config.setdefault("tokenizer_class", "GemmaTokenizer")
        try:
            files |= hf_tokenizer_files(files[MODEL], config)
        except Exception as exc:  # sentencepiece, transformers or tokenizers refusing the file
            raise InputError(f"{MODEL}: transformers cannot build a tokenizer from it ({exc})", source) from None
    reference = _load(files, source)
    files = _with_explicit_flags(files, reference, source)
    return _without_whitespace_added_tokens(files, reference, source)


def _with_explicit_flags(files: dict[str, bytes], reference, source: str | None) -> dict[str, bytes]:
    """add_bos_token/add_eos_token written as transformers applies them to these files."""
    config = _config(files, source)
    plain = reference("x", add_special_tokens=False).input_ids
    full = reference("x").input_ids
    bos = reference.bos_token_id is not None and full[:1] == [reference.bos_token_id] != plain[:1]
    eos = reference.eos_token_id is not None and full[-1:] == [reference.eos_token_id] != plain[-1:]
    if config.get("add_bos_token") is bos and config.get("add_eos_token") is eos:
        return files
    return files | {CONFIG: _dump(config | {"add_bos_token": bos, "add_eos_token": eos})}


def _without_whitespace_added_tokens(files: dict[str, bytes], reference, source: str | None) -> dict[str, bytes]:
    """``files`` with the non-special added tokens made only of "▁" left out of tokenizer.json's
    added_tokens and tokenizer_config.json's added_tokens_decoder and extra/additional special
    tokens, where transformers then encodes and decodes the probes the same (else unchanged)."""
    tokenizer, config = json.loads(files[JSON]), _config(files, source)
    runs = {t["content"] for t in tokenizer.get("added_tokens", []) if _whitespace_run(t)}
    if not runs:
        return files
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] not in runs]
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        config["added_tokens_decoder"] = {k: v for k, v in decoder.items() if v.get("content") not in runs}
    changed = files | {JSON: _dump(tokenizer, indent=None), CONFIG: _dump(_without_listed(config, runs))}
    if SPECIAL_MAP in files:
        try:
            special = json.loads(files[SPECIAL_MAP])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{SPECIAL_MAP} is not JSON ({exc})", source) from None
        if isinstance(special, dict):
            changed[SPECIAL_MAP] = _dump(_without_listed(special, runs))
    # the tokenizers library transformers runs (loading it alone is twice as fast)
    before, after = reference.backend_tokenizer, _backend(changed[JSON], source)
    for text in _PROBES:
        ids = before.encode(text).ids
        if after.encode(text).ids != ids or after.decode(ids) != before.decode(ids):
            log.warning(
                "%s: whitespace pieces are listed as added tokens and cannot be left out (%r encodes "
                "differently); onnxruntime-genai decodes them as %r",
                source,
                text,
                SPACE,
            )
            return files
    log.debug("%s: %d whitespace pieces left out of the added tokens for onnxruntime-genai", source, len(runs))
    return changed


def _without_listed(config: dict, runs: set[str]) -> dict:
    """``config`` with ``runs`` left out of its lists of extra (transformers 5) and additional special tokens."""
    for key in ("extra_special_tokens", "additional_special_tokens"):
        if isinstance(config.get(key), list):
            config[key] = [t for t in config[key] if (t.get("content") if isinstance(t, dict) else t) not in runs]
    return config


def _whitespace_run(token: dict) -> bool:
    content = token.get("content")
    return not token.get("special") and isinstance(content, str) and content and not content.strip(SPACE)


def _config(files: dict[str, bytes], source: str | None) -> dict:
    if CONFIG not in files:
        return {}
    try:
        config = json.loads(files[CONFIG])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{CONFIG} is not JSON ({exc})", source) from None
    if not isinstance(config, dict):
        raise InputError(f"{CONFIG} does not hold an object", source)
    return config


def _load(files: dict[str, bytes], source: str | None):
    """transformers' tokenizer for ``files``."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="gemport-tok-") as tmp:
        for name, data in files.items():
            Path(tmp, name).write_bytes(data)
        try:
            return AutoTokenizer.from_pretrained(tmp)
        except Exception as exc:  # transformers, and tokenizers' own Exception, on a malformed file
            raise InputError(f"transformers cannot load the tokenizer files ({exc})", source) from None


def _backend(data: bytes, source: str | None):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(data.decode())
    except Exception as exc:  # tokenizers raises its own Exception subclass
        raise InputError(f"{JSON}: the tokenizers library cannot load it ({exc})", source) from None


def _dump(data: dict, indent: int | None = 2) -> bytes:
    return (json.dumps(data, indent=indent, ensure_ascii=False) + "\n").encode()
