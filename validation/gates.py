"""Default quality gates: the kind of an artifact, read from the artifact itself, and its KLD bound.

The kind is the lowest precision among the artifact's weight matrices (tensors of two or more
dimensions; norms and other vectors are left out): the GGUF tensor types, the quantization records
of an HF (compressed-tensors) folder, the ``bits`` of an ONNX graph's MatMulNBits and
GatherBlockQuantized nodes, else the float dtype of the stored matrices. A file of mixed types
(Q4_K_M holds Q4_K, Q6_K and Q8_0 tensors) is of its lowest type's kind.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from gemport import registry
from gemport.errors import CheckpointError

# Kinds from the least to the most precise. A quantized kind is named by its code bits.
QUANT_KINDS = {8: "8-bit", 6: "6-bit", 5: "5-bit", 4: "4-bit", 3: "3-bit", 2: "2-bit"}
FLOAT_KINDS = ("f16", "bf16", "f32")
KINDS = (*reversed(QUANT_KINDS.values()), *FLOAT_KINDS)

# Default --max-kld by kind (mean KL divergence to the reference, nats per token), chosen from
# measurements on the demo model, Gemma 3 270M (README, "Default gates": `gemport validate CANDIDATE
# --reference REF --ctx 512 --windows 4`): float artifacts against the model they were converted
# from, quantized ones made from the off-grid model against it (the faithful model sits on its old
# grids, so re-quantizing it costs almost nothing). The float bound is 15x the worst lossless
# conversion measured (llama.cpp's BF16 matmuls round activations: 6.5e-5) and 6x below a float
# artifact that applied one config field differently (Gemma 2's attention softcap on a Gemma 3:
# 0.006). A quantized bound sits over the worst legitimate artifact of its kind measured on this,
# the smallest Gemma (larger ones lose less): 8-bit 0.0043 (Q8_0), 6-bit 0.012 (Q6_K), 5-bit 0.050
# (Q5_K_M), 4-bit 0.66 (compressed-tensors RTN int4 g128; Q4_K_M 0.086, ONNX int4 0.45), 3-bit 0.21
# (Q3_K_M), 2-bit 0.52 (Q2_K). Those bounds catch a broken artifact, not a small loss of quality:
# --max-kld states a quality target.
DEFAULT_MAX_KLD = {
    "f32": 1e-3,
    # An HF bf16 folder is computed in bf16 by transformers, as validate loads it: the demo model
    # so scores 8.2e-4 against itself in fp32, which no bf16 artifact can beat; 3.7x that, still 2x
    # below the misapplied-field artifact.
    "bf16": 3e-3,
    "f16": 1e-3,
    "8-bit": 0.02,
    "6-bit": 0.05,
    "5-bit": 0.3,
    "4-bit": 1.0,
    "3-bit": 1.5,
    "2-bit": 3.0,
}

# ref: ggml.h ggml_type names: Q{bits}_{variant}, IQ{bits}_{size}, TQ{bits}_0, MXFP4 / NVFP4.
_GGML_BITS = re.compile(r"(?:I?Q|TQ)(\d)_.*|(?:MX|NV)FP(\d)")
_GGML_FLOATS = {"F32": "f32", "F16": "f16", "BF16": "bf16", "F64": "f32"}

# ref: onnx.proto TensorProto.DataType
_ONNX_FLOATS = {1: "f32", 10: "f16", 16: "bf16", 11: "f32"}
_ONNX_NBITS_OPS = ("MatMulNBits", "GatherBlockQuantized")  # com.microsoft, attribute bits (default 4)


@dataclass(frozen=True)
class ArtifactKind:
    name: str  # one of KINDS
    evidence: str  # what in the artifact says so, e.g. "GGUF types Q4_K 60, Q6_K 12"

    @property
    def default_max_kld(self) -> float:
        return DEFAULT_MAX_KLD[self.name]


def quant_kind(bits: int) -> str:
    """The quantized kind of ``bits`` code bits: the nearest class at or below (1-bit types are 2-bit's)."""
    return next((kind for b, kind in QUANT_KINDS.items() if bits >= b), QUANT_KINDS[2])


def _lowest(labels: Counter, describe: str, path: Path) -> ArtifactKind:
    if not labels:
        raise CheckpointError("no weight matrix found to tell the artifact's precision", path)
    kinds = {label: kind for label, kind in labels}
    lowest = min(kinds.values(), key=KINDS.index)
    counts = Counter()
    for (label, _), n in labels.items():
        counts[label] += n
    return ArtifactKind(lowest, f"{describe} {counts_text(counts)}")


def counts_text(counts: Counter) -> str:
    """'Q5_0 81, Q4_K 27, F32 10': every label with its count, most first, in the words ``gemport
    inspect`` and the convert summary use for stored types (gemport/describe.py _types_line); every
    label, so the lowest one, which sets the kind, is always among them."""
    return ", ".join(f"{label} {n}" for label, n in counts.most_common())


def _ggml_kind(type_name: str) -> str:
    if type_name in _GGML_FLOATS:
        return _GGML_FLOATS[type_name]
    m = _GGML_BITS.fullmatch(type_name)
    if m:
        return quant_kind(int(m.group(1) or m.group(2)))
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return quant_kind(math.floor(size * 8 / block))


def checkpoint_kind(ckpt, fmt: str) -> ArtifactKind:
    """The kind of a Checkpoint as its reader returned it (lazy: nothing is loaded)."""
    labels: Counter = Counter()
    for t in ckpt:
        if len(t.shape) < 2:
            continue
        if t.quant is not None:
            labels[(f"int{t.quant.bits}", quant_kind(t.quant.bits))] += 1
        elif t.raw is not None:  # a GGUF tensor: its stored type
            labels[(t.raw[0], _ggml_kind(t.raw[0]))] += 1
        elif t.dtype in FLOAT_KINDS:  # integer tensors (token tables and the like) are no weights' precision
            labels[(t.dtype.upper(), t.dtype)] += 1  # named as inspect names a dtype: BF16
    return _lowest(labels, "GGUF types" if fmt == "gguf" else "weight matrices", Path(ckpt.source))


def onnx_kind(path: Path) -> ArtifactKind:
    """The kind of an ONNX decoder graph, any tool's: the bits of its quantized nodes, the float type of
    its matrix initializers. The external data is not read."""
    import onnx

    from converters.onnx import model_file

    model = onnx.load(str(model_file(path)), load_external_data=False)
    labels: Counter = Counter()
    for node in model.graph.node:
        if node.op_type in _ONNX_NBITS_OPS:
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            labels[(f"{node.op_type} int{bits}", quant_kind(bits))] += 1  # as inspect names it
    for init in model.graph.initializer:
        if len(init.dims) >= 2 and init.data_type in _ONNX_FLOATS:
            kind = _ONNX_FLOATS[init.data_type]
            labels[(kind.upper(), kind)] += 1
    return _lowest(labels, "ONNX", path)


def artifact_kind(path: str | Path, fmt: str) -> ArtifactKind:
    """What ``path`` (of format ``fmt``) stores, from its own tensors and quantization records."""
    path = Path(path)
    if fmt == "onnx":
        return onnx_kind(path)
    reader = registry.get(fmt).load()
    # the GGUF reader's tokenizer rebuild (about 10 s for Gemma 3's 262144 pieces) says nothing of the kind
    ckpt = reader.read(path, tokenizer=False) if fmt == "gguf" else reader.read(path)
    built = ckpt.extra.get("trtllm.quant_algo")  # float weights trtllm-build quantizes per channel
    if built:
        bits = 8 if built == "W8A16" else 4
        return ArtifactKind(quant_kind(bits), f"quant_algo {built}: trtllm-build stores the projections as int{bits}")
    kind = checkpoint_kind(ckpt, fmt)
    if fmt == "hf" and kind.name in FLOAT_KINDS:  # transformers computes an HF folder in its config's dtype
        from validation.runtimes.hf_transformers import config_dtype

        compute = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[config_dtype(path)]
        if KINDS.index(compute) < KINDS.index(kind.name):
            kind = ArtifactKind(compute, f"{kind.evidence}, computed in {compute} (config.json dtype)")
    return kind
