"""Evaluation and calibration text: pydoc_data.topics by default, or any UTF-8 file.

The text is cut at a paragraph boundary into an evaluation part (the first
``EVAL_FRACTION`` of characters) and a calibration part (the rest); the two never overlap,
so calibration-based quantizers are never scored on what they saw.
"""

from __future__ import annotations

from pathlib import Path

from gemport.errors import InputError

EVAL_FRACTION = 0.4


def default_text() -> str:
    """CPython's pydoc topics (~110k Gemma tokens of English documentation), in key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def load_text(path: str | Path | None) -> str:
    if path is None:
        return default_text()
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("corpus file not found", path) from None
    except UnicodeDecodeError as exc:
        raise InputError(f"corpus is not UTF-8 text (byte {exc.start})", path) from None
    except OSError as exc:
        raise InputError(f"cannot read corpus: {exc.strerror}", path) from None


def split_text(text: str, eval_fraction: float = EVAL_FRACTION) -> tuple[str, str]:
    """(evaluation, calibration): disjoint, cut at the paragraph break nearest the fraction."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    target = int(len(text) * eval_fraction)
    cut = text.find("\n\n", target)
    if cut < 0:
        cut = target
    return text[:cut], text[cut:].lstrip("\n")


def tokenize(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with BOS first, as llama-perplexity tokenizes (add_bos), via an HF tokenizer."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [tokenizer.bos_token_id, *ids]


def windows(tokens: list[int], n_ctx: int, n_windows: int, bos_id: int) -> list[list[int]]:
    """llama-perplexity's chunks: consecutive n_ctx slices, each with its first token set to BOS.

    ref: llama.cpp tools/perplexity (perplexity(): tokens[batch_start] = BOS).
    """
    available = len(tokens) // n_ctx
    if available < 1:
        raise InputError(f"corpus has {len(tokens)} tokens, fewer than one window of {n_ctx} (--ctx)")
    out = []
    for i in range(min(n_windows, available)):
        chunk = list(tokens[i * n_ctx : (i + 1) * n_ctx])
        chunk[0] = bos_id
        out.append(chunk)
    return out
