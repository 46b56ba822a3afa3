"""Tiny random Gemma 1 (MHA, MQA), Gemma 2 and Gemma 3 checkpoints, made by transformers.

Seeded and written with ``save_pretrained``, so they are reference HF checkpoints that do
not come from gemport's own writer. The tokenizer is a 512-piece SentencePiece BPE trained
on the calibration half of the default corpus, with Gemma's special-token names.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

VARIANTS = ("gemma-mha", "gemma-mqa", "gemma2", "gemma3")
VOCAB = 512

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
)


# Gemma's special pieces and ids, for every SentencePiece model the tests train.
SPECIAL_PIECES = dict(
    pad_id=0,
    eos_id=1,
    bos_id=2,
    unk_id=3,
    pad_piece="<pad>",
    eos_piece="<eos>",
    bos_piece="<bos>",
    unk_piece="<unk>",
    user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
    minloglevel=2,
)


def _config(variant: str, **overrides):
    config = _base_config(variant)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _base_config(variant: str):
    from transformers import Gemma2Config, Gemma3TextConfig, GemmaConfig

    if variant == "gemma-mha":
        return GemmaConfig(**_COMMON, num_hidden_layers=2, num_key_value_heads=4)
    if variant == "gemma-mqa":
        return GemmaConfig(**_COMMON, num_hidden_layers=2, num_key_value_heads=1, tie_word_embeddings=False)
    if variant == "gemma2":
        return Gemma2Config(
            **_COMMON,
            num_hidden_layers=4,
            num_key_value_heads=2,
            sliding_window=16,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        )
    if variant == "gemma3":
        return Gemma3TextConfig(
            **_COMMON,
            num_hidden_layers=4,
            num_key_value_heads=2,
            sliding_window=16,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"] * 2,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        )
    raise ValueError(f"unknown tiny variant {variant!r}")


def tokenizer_model() -> bytes:
    """A SentencePiece BPE model proto laid out like Gemma's (ids 0-3 pad/eos/bos/unk)."""
    import sentencepiece as spm

    from validation.corpus import default_text, split_text

    _, calibration = split_text(default_text())
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(calibration.splitlines()),
        model_writer=buf,
        vocab_size=VOCAB,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        **SPECIAL_PIECES,
    )
    return buf.getvalue()


def make_tiny(
    variant: str, path: Path, seed: int = 0, dtype: str = "float32", shard: str | None = None, **overrides
) -> Path:
    """Write a seeded random ``variant`` checkpoint (weights, config, tokenizer) to ``path``;
    ``overrides`` replace config fields."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(variant, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            # Norm weights default to zeros; random values make (1 + w) mistakes visible.
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 0.08))
    model = model.to(getattr(torch, dtype))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, max_shard_size=shard or "10GB")
    (path / "tokenizer.model").write_bytes(tokenizer_model())
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False})
    )
    AutoTokenizer.from_pretrained(path).save_pretrained(path)
    return path
