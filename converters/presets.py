"""The official Gemma sizes: the facts of each released model that its weights do not hold.

Checkpoints of Google's own formats (the gemma library's Orbax trees, gemma_pytorch ``.ckpt``
files) carry no config; their readers match a tree's shapes against these sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemport.errors import CheckpointError, InputError, UnsupportedError
from gemport.spec import FULL, SLIDING, GemmaSpec, RopeScaling


@dataclass(frozen=True)
class Preset:
    """The facts of an official model that its tree does not hold (ref: gemma/gm/nn/_gemma.py
    and gemma/transformer.py TransformerConfig presets; HF configs of the same models)."""

    family: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int = 8192
    sliding_window: int | None = None
    query_pre_attn_scalar: int | None = None
    rope_scaling: float | None = None


PRESETS = {
    "gemma-2b": Preset("gemma", 18, 2048, 16384, 8, 1, 256),
    "gemma-7b": Preset("gemma", 28, 3072, 24576, 16, 16, 256),
    "gemma2-2b": Preset("gemma2", 26, 2304, 9216, 8, 4, 256, sliding_window=4096, query_pre_attn_scalar=256),
    "gemma2-9b": Preset("gemma2", 42, 3584, 14336, 16, 8, 256, sliding_window=4096, query_pre_attn_scalar=256),
    # BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS: 4608 // 32 = 144
    "gemma2-27b": Preset("gemma2", 46, 4608, 36864, 32, 16, 128, sliding_window=4096, query_pre_attn_scalar=144),
    "gemma3-270m": Preset("gemma3", 18, 640, 2048, 4, 1, 256, 32768, 512, 256),
    "gemma3-1b": Preset("gemma3", 26, 1152, 6912, 4, 1, 256, 32768, 512, 256),
    "gemma3-4b": Preset("gemma3", 34, 2560, 10240, 8, 4, 256, 131072, 1024, 256, 8.0),
    "gemma3-12b": Preset("gemma3", 48, 3840, 15360, 16, 8, 256, 131072, 1024, 256, 8.0),
    # 5376 // 32 = 168
    "gemma3-27b": Preset("gemma3", 62, 5376, 21504, 32, 16, 128, 131072, 1024, 168, 8.0),
}


def spec_from_preset(preset: Preset, vocab_size: int) -> GemmaSpec:
    """The GemmaSpec of an official model (ref: gemma/gm/nn/_gemma.py: Gemma 2 alternates
    LOCAL_SLIDING, GLOBAL with softcaps 50/30; Gemma 3 repeats 5 sliding + 1 global, rope bases
    10k local / 1M global, linear x8 on global layers from 4B up)."""
    n = preset.num_layers
    facts: dict[str, Any] = {}
    if preset.family == "gemma2":
        facts = {
            "layer_types": tuple(SLIDING if i % 2 == 0 else FULL for i in range(n)),
            "attn_softcap": 50.0,
            "final_softcap": 30.0,
        }
    elif preset.family == "gemma3":
        facts = {
            "layer_types": tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n)),
            "rope_theta": 1_000_000.0,
            "rope_local_theta": 10_000.0,
            "rope_scaling": RopeScaling("linear", preset.rope_scaling) if preset.rope_scaling else None,
        }
    return GemmaSpec(
        family=preset.family,
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_layers=n,
        num_heads=preset.num_heads,
        num_kv_heads=preset.num_kv_heads,
        head_dim=preset.head_dim,
        max_position=preset.max_position,
        sliding_window=preset.sliding_window,
        query_pre_attn_scalar=preset.query_pre_attn_scalar,
        **facts,
    )


def find_preset(family: str, dims: dict[str, int], name: str | None, path: Path, why: str) -> Preset:
    """The official model of ``family`` whose sizes are ``dims`` (a subset of Preset's fields),
    or the one ``name``d, checked against them. ``why`` says what the file lacks if none matches."""

    def fits(p: Preset) -> bool:
        return p.family == family and all(getattr(p, k) == v for k, v in dims.items())

    described = ", ".join(f"{k} {v}" for k, v in dims.items())
    if name is not None:
        if name not in PRESETS:
            raise UnsupportedError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
        if not fits(PRESETS[name]):
            raise CheckpointError(f"it is not a {name}: {family} with {described}", path)
        return PRESETS[name]
    matches = [p for p in PRESETS.values() if fits(p)]
    if not matches:
        raise UnsupportedError(
            f"a {family} model of no official size ({described}) and {why} (known sizes: {', '.join(PRESETS)})",
            path,
        )
    return matches[0]


def tokenizer_pieces(tokenizer: Path, rows: int, path: Path) -> int:
    """The piece count of the SentencePiece ``tokenizer`` beside ``path``, whose embedding has ``rows`` rows."""
    import sentencepiece as spm

    try:
        pieces = spm.SentencePieceProcessor(model_proto=tokenizer.read_bytes()).get_piece_size()
    except (RuntimeError, OSError, ValueError) as exc:  # ValueError: UnicodeDecodeError on a damaged proto
        raise InputError(f"not a SentencePiece model: {exc}", tokenizer) from None
    if pieces > rows:
        raise CheckpointError(f"the tokenizer has {pieces} pieces but the embedding only {rows} rows", path)
    return pieces
