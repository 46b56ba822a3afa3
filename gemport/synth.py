"""Synthetic Gemma checkpoints of the official sizes: real shapes, random weights, for tests and benchmarks.

``gemport synth gemma-7b DST`` writes an HF folder shaped as the released model (converters/presets.py,
from the gemma library's presets and the published HF configs) with weights drawn at random, so that
conversions, quantizers and memory can be measured at the sizes people convert without downloading
them. Never use one for a quality figure: its weights mean nothing.

Weights are drawn per tensor from a heavy-tailed distribution (``draw``: trained weights have outliers,
and a quantizer's scales should meet them) with the mean and standard deviation of the same tensor kind
in the demo model (Gemma 3 270M, ``SCALES``); a matrix's standard deviation is
scaled by ``sqrt(fan_in of the demo's / fan_in)`` for the wider models. Each tensor has its own seeded
generator (the seed and the tensor's name), is drawn in row chunks and written as it is made
(converters/hf.py streams shard by shard), so the peak memory is about one tensor, never the model.

The tokenizer is the demo model's SentencePiece model (Gemma 3's 262144 pieces), cut to the first
256000 pieces for Gemma 1 and 2, whose vocabularies have 256000 entries.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from dataclasses import replace
from pathlib import Path

from gemport.errors import UnsupportedError

log = logging.getLogger(__name__)

# Embedding rows of the released models (ref: the HF config.json of google/gemma-7b and gemma-2-9b:
# vocab_size 256000; gemma-3-270m / gemma-3-1b-it: 262144; gemma-3-4b-it and larger, text_config: 262208,
# the tokenizer's 262144 pieces plus padding rows).
MANIFEST = "gemport.json"
SYNTHETIC_KEY = "synthetic"  # gemport.json of a synth folder: what it was drawn from
FILE_SUFFIXES = (".gguf", ".onnx", ".safetensors", ".bin", ".pt", ".pth", ".keras")
VOCAB = {"gemma": 256000, "gemma2": 256000, "gemma3": 262144}
VOCAB_GEMMA3_LARGE = 262208

# (mean, standard deviation, fan-in) of each tensor kind in the demo model, Gemma 3 270M (hidden 640,
# 4 heads of 256, intermediate 2048): the median standard deviation over its layers, measured from
# build/models/gemma-3-270m. Norm weights are the w of (1 + w).
SCALES = {
    "embed_tokens": (0.0, 0.0408, None),
    "q_proj": (0.0, 0.0395, 640),
    "k_proj": (0.0, 0.0395, 640),
    "v_proj": (0.0, 0.0395, 640),
    "o_proj": (0.0, 0.0306, 1024),
    "gate_proj": (0.0, 0.0395, 640),
    "up_proj": (0.0, 0.0395, 640),
    "down_proj": (0.0, 0.0161, 2048),
    "q_norm": (0.81, 1.03, None),
    "k_norm": (1.27, 1.63, None),
    "input_layernorm": (18.2, 16.6, None),
    "post_attention_layernorm": (60.7, 26.7, None),
    "pre_feedforward_layernorm": (8.0, 5.3, None),
    "post_feedforward_layernorm": (93.5, 33.0, None),
    "norm": (25.3, 47.3, None),
    "lm_head": (0.0, 0.0408, None),
}
TAIL = 0.5
ROWS_PER_CHUNK = 4096


def synth_spec(name: str, layers: int | None = None):
    """The GemmaSpec of the official model ``name`` (a key of converters.presets.PRESETS), with ``layers``
    decoder layers instead of its own when given (the full widths kept; the layer types follow its pattern)."""
    from converters.presets import PRESETS, spec_from_preset

    if name not in PRESETS:
        raise UnsupportedError(f"unknown model {name!r} (known: {', '.join(PRESETS)})")
    preset = PRESETS[name]
    if layers is not None:
        if layers < 1 or layers > preset.num_layers:
            raise UnsupportedError(f"--layers must be 1..{preset.num_layers} for {name}, got {layers}")
        preset = replace(preset, num_layers=layers)
    large = preset.family == "gemma3" and preset.rope_scaling is not None  # 4B, 12B, 27B
    return spec_from_preset(preset, VOCAB_GEMMA3_LARGE if large else VOCAB[preset.family])


def _kind(name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'q_proj'; 'model.norm.weight' -> 'norm'."""
    return name.removesuffix(".weight").rsplit(".", 1)[-1]


def draw(name: str, shape: tuple[int, ...], dtype: str, seed: int):
    """The tensor ``name`` of ``shape``: ``z * exp(TAIL * u)`` (z, u standard normal: a Gaussian scale
    mixture, heavy-tailed, kurtosis 3 e^(4 TAIL^2) = 8.2) scaled to its kind's mean and standard deviation,
    in ``dtype``, drawn in row chunks (float32 working memory of one chunk), the same for the same seed
    and name."""
    import torch

    from gemport.checkpoint import torch_dtype

    mean, std, fan_in = SCALES[_kind(name)]
    if fan_in is not None:
        std *= math.sqrt(fan_in / shape[1])
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    unit = math.exp(TAIL * TAIL)  # the mixture's standard deviation: E[exp(2 TAIL u)] = exp(2 TAIL^2)
    out = torch.empty(shape, dtype=torch_dtype(dtype))
    flat = out.view(shape[0], -1) if len(shape) > 1 else out.view(1, -1)
    for start in range(0, flat.shape[0], ROWS_PER_CHUNK):
        rows = flat[start : start + ROWS_PER_CHUNK]
        z = torch.randn(rows.shape, generator=gen)
        z.mul_(torch.randn(rows.shape, generator=gen).mul_(TAIL).exp_())
        rows.copy_(z.mul_(std / unit).add_(mean))
    return out


def synth_checkpoint(name: str, dtype: str = "bf16", seed: int = 0, layers: int | None = None):
    """A Checkpoint of the official model ``name`` whose tensors are drawn when loaded (nothing here is drawn)."""
    import functools

    from gemport.checkpoint import Checkpoint, LazyTensor, expected_shapes

    spec = synth_spec(name, layers)
    tensors = {
        n: LazyTensor(n, shape, dtype, load=functools.partial(draw, n, shape, dtype, seed))
        for n, shape in expected_shapes(spec).items()
    }
    return Checkpoint(spec, tensors, tokenizer_files=_tokenizer_files(spec.family), source=f"synth:{name}")


def _tokenizer_files(family: str) -> dict[str, bytes]:
    """The demo model's tokenizer files; for Gemma 1 and 2 its SentencePiece model cut to 256000 pieces
    and the HF files transformers makes of that."""
    from converters.tokenizer_files import hf_tokenizer_files
    from gemport.demo import DEFAULT_OUT, build_demo_model

    demo = build_demo_model(DEFAULT_OUT)
    names = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")
    files = {n: (demo / n).read_bytes() for n in names}
    if family == "gemma3":
        return files
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(files["tokenizer.model"])
    del model.pieces[VOCAB[family] :]
    config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False}
    return {"tokenizer.model": model.SerializeToString(), **hf_tokenizer_files(model.SerializeToString(), config)}


def write_synth(
    name: str,
    dst: Path,
    dtype: str = "bf16",
    seed: int = 0,
    layers: int | None = None,
    max_shard_bytes: int | None = 5_000_000_000,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic ``name`` to ``dst`` as an HF folder (safetensors shards of at most
    ``max_shard_bytes``, 5 GB by default as the released models are sharded), streaming tensor by tensor.
    UnsupportedError for an unknown name, a layer count out of range or a dtype other than bf16/f32."""
    from converters import hf

    if dtype not in ("bf16", "f32"):
        raise UnsupportedError(f"synthetic checkpoints are bf16 or f32, not {dtype}")
    dst = Path(dst)
    if dst.suffix.lower() in FILE_SUFFIXES:
        raise UnsupportedError(
            f"synth writes an HF folder, and {dst.name} names a {dst.suffix} file; write the folder, then "
            f"gemport convert it to {dst.name}",
            dst,
        )
    if dst.is_file():
        raise UnsupportedError("is a file; synth writes an HF folder and does not replace a file with one", dst)
    ckpt = synth_checkpoint(name, dtype, seed, layers)
    out = hf.write(ckpt, dst, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
    record = {"model": name, "dtype": dtype, "seed": seed, "layers": layers or ckpt.spec.num_layers}
    (out / MANIFEST).write_text(json.dumps({SYNTHETIC_KEY: record}, indent=2) + "\n", encoding="utf-8")
    return out


def synthetic_record(folder: Path) -> dict | None:
    """What ``gemport synth`` wrote ``folder`` from (its gemport.json), or None for any other folder."""
    try:
        record = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8")).get(SYNTHETIC_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return record if isinstance(record, dict) else None
