"""Seed corpora for the fuzz targets: real files of tiny models, written by gemport's own writers.

``python -m tests.fuzz.corpus`` (or ``build_corpus()``) writes, under ``build/fuzz/``:

- ``models/``: micro checkpoints (tests/tiny.py make_tiny with small sizes, so that mutations land
  in headers rather than tensor bytes) and what gemport converts them to (GGUF, JAX, ONNX,
  compressed-tensors, gemma_pytorch .ckpt);
- ``seeds/TARGET/``: one file per seed in the input encoding of that target (targets.py).

Nothing here is committed; it is rebuilt when missing (a stamp file marks a complete build).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "build" / "fuzz"
MODELS, SEEDS = FUZZ / "models", FUZZ / "seeds"
STAMP = FUZZ / ".corpus-v5"

log = logging.getLogger(__name__)

# Small enough that a seed is a few KB of tensors, large enough for GGUF's 32-wide blocks and
# ONNX's 16-wide MatMulNBits blocks. The tokenizer keeps tiny.py's 512 pieces.
MICRO = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, head_dim=16, num_hidden_layers=2)
LAYER_TYPES = ["sliding_attention", "full_attention"]
ONE_LAYER = {
    "gemma-mha": dict(num_hidden_layers=1, num_key_value_heads=2),
    "gemma2": dict(num_hidden_layers=1, num_key_value_heads=1, query_pre_attn_scalar=16, layer_types=LAYER_TYPES[:1]),
    "gemma3": dict(num_hidden_layers=1, num_key_value_heads=1, layer_types=LAYER_TYPES[:1]),
}
VARIANTS = {
    "gemma-mha": dict(num_key_value_heads=2),
    "gemma-mqa": dict(num_key_value_heads=1),
    "gemma2": dict(num_key_value_heads=1, query_pre_attn_scalar=16, layer_types=LAYER_TYPES),
    "gemma3": dict(num_key_value_heads=1, layer_types=LAYER_TYPES),
}


def _gemport(*argv: str) -> None:
    from gemport.cli import main

    code = main([str(a) for a in argv])
    if code != 0:
        raise RuntimeError(f"gemport {' '.join(map(str, argv))} exited {code}")


def build_models() -> dict[str, Path]:
    """Micro HF checkpoints and their conversions; name -> path."""
    from tests.tiny import make_tiny

    out: dict[str, Path] = {}
    for variant, overrides in VARIANTS.items():
        src = MODELS / variant
        make_tiny(variant, src, dtype="bfloat16", **MICRO, **overrides)
        out[f"hf-{variant}"] = src
    g3_micro = MICRO | VARIANTS["gemma3"]
    sharded = MODELS / "gemma3-sharded"
    out["hf-gemma3-sharded"] = make_tiny("gemma3", sharded, dtype="bfloat16", shard="16KB", **g3_micro)
    g3 = out["hf-gemma3"]
    f32 = MODELS / "gemma3-f32"
    _gemport("convert", g3, f32, "--to", "hf", "--dtype", "f32")
    out["hf-gemma3-f32"] = f32
    for name, args in {
        "ct-int4": ("--bits", "4", "--group-size", "32"),
        "ct-int8": ("--bits", "8"),
    }.items():
        _gemport("quantize", f32, MODELS / name, "--to", "hf", *args)
        out[name] = MODELS / name
    # GGUF seeds carry a 48-piece tokenizer: the reader rebuilds tokenizer files from the metadata,
    # whose cost grows with the pieces (10x fewer runs a second with tiny.py's 512).
    for variant in ("gemma-mha", "gemma2", "gemma3"):  # gemma-mqa's head is untied: GGUF gemma cannot carry it
        src = _small_vocab(variant, MODELS / f"{variant}-vocab48")
        _gemport("convert", src, MODELS / f"{variant}.gguf", "--to", "gguf", "--dtype", "f32")
        out[f"gguf-{variant}"] = MODELS / f"{variant}.gguf"
    small = MODELS / "gemma3-vocab48"
    for quant in ("q8_0", "q4_0", "f16"):
        _gemport("convert", small, MODELS / f"gemma3.{quant}.gguf", "--to", "gguf", "--quant", quant)
        out[f"gguf-gemma3-{quant}"] = MODELS / f"gemma3.{quant}.gguf"
    for variant in ("gemma-mha", "gemma2", "gemma3"):
        _gemport("convert", out[f"hf-{variant}"], MODELS / f"{variant}-jax", "--to", "jax")
        out[f"jax-{variant}"] = MODELS / f"{variant}-jax"
    from converters import hf, jax

    jax.write(hf.read(g3), MODELS / "gemma3-jax-nested", layout="nested")
    out["jax-gemma3-nested"] = MODELS / "gemma3-jax-nested"
    for variant in ("gemma-mqa", "gemma3"):
        _gemport("convert", out[f"hf-{variant}"], MODELS / f"{variant}-onnx", "--to", "onnx", "--dtype", "f32")
        out[f"onnx-{variant}"] = MODELS / f"{variant}-onnx"
    _gemport("convert", f32, MODELS / "gemma3-onnx-int4", "--to", "onnx", "--quant", "int4")
    out["onnx-gemma3-int4"] = MODELS / "gemma3-onnx-int4"
    # gemma_pytorch seeds of one layer: torch's weights-only unpickler is pure Python, its time per
    # tensor the most of a run.
    from tests.tiny import make_tiny

    for variant in ("gemma-mha", "gemma2", "gemma3"):  # gemma_pytorch ties the head
        one = make_tiny(variant, MODELS / f"{variant}-1layer", dtype="bfloat16", **(MICRO | ONE_LAYER[variant]))
        out[f"hf-{variant}-1layer"] = one
        for int8 in (False, True):
            name = f"pt-{variant}{'-int8' if int8 else ''}"
            out[name] = _save_gemma_pytorch(one, MODELS / f"{name}.ckpt", int8, legacy=False)
    # the legacy (pre-zip) format, which the reader refuses
    out["pt-legacy"] = _save_gemma_pytorch(out["hf-gemma3"], MODELS / "pt-legacy.ckpt", False, legacy=True)
    return out


def _small_vocab(variant: str, path: Path) -> Path:
    """A micro model of ``variant`` with a 48-piece SentencePiece BPE tokenizer (Gemma's special ids)."""
    import io

    import sentencepiece as spm
    from transformers import AutoTokenizer

    from tests.tiny import SPECIAL_PIECES, make_tiny

    make_tiny(variant, path, vocab_size=48, **MICRO, **VARIANTS[variant])
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["the cat sat on the mat", "a dog ran to the tree", "gemma reads text"] * 50),
        model_writer=buf,
        vocab_size=48,
        model_type="bpe",
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        **SPECIAL_PIECES,
    )
    (path / "tokenizer.model").write_bytes(buf.getvalue())
    (path / "tokenizer.json").unlink()
    AutoTokenizer.from_pretrained(path).save_pretrained(path)
    return path


def _save_gemma_pytorch(src: Path, dst: Path, int8: bool, legacy: bool) -> Path:
    """A gemma_pytorch checkpoint of the HF model ``src`` (names and int8 storage as gemma_pytorch's;
    the state dict is the one tests/test_gemma_pytorch.py builds)."""
    import torch

    from tests.test_gemma_pytorch import gemma_pytorch_state

    state = gemma_pytorch_state(src, int8)
    torch.save({"model_state_dict": state}, dst, _use_new_zipfile_serialization=not legacy)
    return dst


def _write_seed(target: str, data: bytes) -> None:
    folder = SEEDS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / hashlib.sha1(data).hexdigest()).write_bytes(data)


def build_corpus(force: bool = False) -> Path:
    """Build models and seeds unless the stamp says they are there; returns the seeds folder.
    One build at a time (a lock file): CI's test and `make fuzz` may start together."""
    import fcntl

    FUZZ.mkdir(parents=True, exist_ok=True)
    with open(FUZZ / ".corpus.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if STAMP.is_file() and not force:
            _missing_seeds()
            return SEEDS
        return _build()


def _missing_seeds() -> None:
    """Seeds of the targets whose seed folder is missing or empty (added since the stamp's build),
    from the models the stamp lists."""
    from tests.fuzz import targets

    models = {k: Path(v) for k, v in json.loads(STAMP.read_text()).items()}
    for name, target in targets.TARGETS.items():
        folder = SEEDS / name
        if not folder.is_dir() or not any(folder.iterdir()):
            for data in target.seeds(models):
                _write_seed(name, data)


def _build() -> Path:
    from tests.fuzz import targets

    shutil.rmtree(FUZZ / "models", ignore_errors=True)
    shutil.rmtree(SEEDS, ignore_errors=True)
    MODELS.mkdir(parents=True)
    models = build_models()
    for name, target in targets.TARGETS.items():
        seeds = target.seeds(models)
        if not seeds:
            raise RuntimeError(f"no seeds for fuzz target {name}")
        for data in seeds:
            _write_seed(name, data)
    STAMP.write_text(json.dumps({n: str(p) for n, p in models.items()}, indent=1))
    return SEEDS


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    build_corpus(force="--force" in sys.argv)
    print(SEEDS)
