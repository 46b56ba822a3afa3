"""Quantized records as compressed-tensors ``pack-quantized`` tensors in an HF safetensors folder.

What llm-compressor saves for a weight-only int scheme, and what transformers (with the
compressed-tensors package) and vLLM load (ref: compressed-tensors 0.20.0
compressors/pack_quantized/base.py ``PackedQuantizationCompressor.compress``,
compressors/model_compressors/model_compressor.py ``update_config``):

- ``{module}.weight_packed``: int32 ``[out, ceil(in * bits / 32)]``, codes packed along the input
  dimension by compressed-tensors' own ``pack_to_int32`` (offset by ``2**(bits-1)``);
- ``{module}.weight_scale``: ``[out, groups]`` (``[out, 1]`` per channel) in the scale dtype;
- ``{module}.weight_zero_point``: asymmetric only, int32 packed along the output dimension
  (``pack_to_int32(zero_point, bits, packed_dim=0)``);
- ``{module}.weight_shape``: int64 ``[2]``, the unpacked ``[out, in]``;
- config.json ``quantization_config``: one config group targeting ``Linear`` with the weights'
  QuantizationArgs (strategy ``channel`` or ``group``), format ``pack-quantized``, status
  ``compressed``, and an ``ignore`` list naming every Linear module left unquantized (``lm_head``).

The compressed-tensors package builds the config and packs the bits, so the output follows the
pinned version exactly. Only the decoder projections may be records here: a quantized embedding
is refused, since its tied LM head would need its own scheme.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

from gemport.checkpoint import Checkpoint, LazyTensor
from gemport.errors import CheckpointError, InputError, UnsupportedError
from quantizers.record import SCALE_DTYPES, QuantFormat, QuantizedTensor
from quantizers.rtn import PROJECTIONS, projection_names

SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def check_writable(ckpt: Checkpoint) -> QuantFormat:
    """The one format every record shares; UnsupportedError for what this writer cannot express."""
    quantized = ckpt.quantized()
    projections = set(projection_names(ckpt.spec.num_layers))
    other = [n for n in quantized if n not in projections]
    if other:
        raise UnsupportedError(
            f"compressed-tensors output takes quantized decoder projections only, not {other[0]} "
            "(keep the embedding in the source dtype)",
            ckpt.source,
        )
    formats = {t.quant for t in quantized.values()}
    if len(formats) > 1:
        listed = ", ".join(sorted(f.describe() for f in formats))
        raise UnsupportedError(f"compressed-tensors output takes one scheme per model, got {listed}", ckpt.source)
    return formats.pop()


def wire_tensors(ckpt: Checkpoint, order: list[str]) -> list[LazyTensor]:
    """The tensors as stored, in ``order``: dense ones as they are, each record as its packed set."""
    out: list[LazyTensor] = []
    for name in order:
        t = ckpt.tensors[name]
        out.extend(_packed(t) if t.quant is not None else [t])
    return out


def _packed(t: LazyTensor) -> list[LazyTensor]:
    """The stored tensors of one record; they share one load of the record."""
    module = t.name.removesuffix(".weight")
    fmt, (rows, cols) = t.quant, t.shape
    groups = fmt.groups(cols)
    record = _OneRecord(t)
    shapes = {
        "weight_packed": ((rows, math.ceil(cols * fmt.bits / 32)), "i32"),
        "weight_scale": ((rows, groups), fmt.scale_dtype),
        "weight_zero_point": ((math.ceil(rows * fmt.bits / 32), groups), "i32"),
        "weight_shape": ((2,), "i64"),
    }
    if fmt.symmetric:
        del shapes["weight_zero_point"]
    return [
        LazyTensor(f"{module}.{suffix}", shape, dtype, load=lambda s=suffix: _stored(record.get(), s))
        for suffix, (shape, dtype) in shapes.items()
    ]


class _OneRecord:
    """Loads a record once for all its stored tensors, and lets go of it after the last."""

    def __init__(self, t: LazyTensor):
        self.t, self.record, self.uses = t, None, 0

    def get(self) -> QuantizedTensor:
        if self.record is None:
            self.record = self.t.load()
        record = self.record
        self.uses += 1
        if self.uses == (3 if self.t.quant.symmetric else 4):
            self.record, self.uses = None, 0
        return record


def _stored(record: QuantizedTensor, suffix: str):
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    bits = record.format.bits
    if suffix == "weight_packed":
        return pack_to_int32(record.codes, bits)
    if suffix == "weight_scale":
        return record.scales.contiguous()
    if suffix == "weight_zero_point":
        return pack_to_int32(record.zero_points, bits, packed_dim=0)
    return torch.tensor(record.shape, dtype=torch.int64)


def ignored_modules(ckpt: Checkpoint) -> list[str]:
    """Every Linear module of the HF model whose weight is not a record (the LM head, tied or not)."""
    dense = [
        f"model.layers.{i}.{p}"
        for i in range(ckpt.spec.num_layers)
        for p in PROJECTIONS
        if ckpt.tensors[f"model.layers.{i}.{p}.weight"].quant is None
    ]
    return [*dense, "lm_head"]


def quantization_args(fmt: QuantFormat):
    """compressed-tensors QuantizationArgs of a record format (weight-only INT, static)."""
    from compressed_tensors.quantization import QuantizationArgs

    strategy = "channel" if fmt.group_size is None else "group"
    return QuantizationArgs(
        num_bits=fmt.bits,
        type="int",
        strategy=strategy,
        group_size=fmt.group_size,
        symmetric=fmt.symmetric,
        dynamic=False,
    )


def add_quantization_config(ckpt: Checkpoint, fmt: QuantFormat, folder: Path) -> None:
    """Add ``quantization_config`` to ``folder``/config.json with compressed-tensors' own writer."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus

    packed = CompressionFormat.pack_quantized.value
    scheme = QuantizationScheme(targets=["Linear"], weights=quantization_args(fmt), format=packed)
    config = QuantizationConfig(
        config_groups={"group_0": scheme},
        format=packed,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignored_modules(ckpt),
    )
    ModelCompressor(quantization_config=config).update_config(str(folder))


# ---------------------------------------------------------------------------------------------
# reading: pack-quantized folders (gemport's own, llm-compressor's weight-only int schemes)


def check_readable(quantization: dict, path: Path) -> None:
    """UnsupportedError unless ``quantization`` is a compressed-tensors pack-quantized weight-only
    int scheme with one config group, what this module writes; InputError naming config.json
    for a value of the wrong JSON type."""
    _scheme(quantization, path)


def _config_file(path: Path) -> Path:
    return path / "config.json" if path.is_dir() else path


def _shown(value) -> str:
    """A config value as JSON, cut short (it may be anything a hostile file holds)."""
    return json.dumps(value)[:40]


def _object(value, what: str, path: Path) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"quantization_config: {what} is {_shown(value)}, not an object", _config_file(path))
    return value


def _scheme(quantization, path: Path) -> tuple[int, int | None, bool]:
    """(bits, group size or None per channel, symmetric) of a readable quantization_config.

    The QuantizationArgs fields and their defaults are compressed-tensors' (ref: compressed-tensors
    0.20.0 quantization/quant_args.py QuantizationArgs: symmetric True, strategy per tensor unless
    given; this module reads the two strategies it writes, channel and group)."""
    config = _config_file(path)
    quantization = _object(quantization, "the value", path)
    method, fmt = quantization.get("quant_method"), quantization.get("format")
    if method != "compressed-tensors" or fmt != "pack-quantized":
        raise UnsupportedError(
            f"reading quantized HF checkpoints is supported for compressed-tensors pack-quantized only, "
            f"not {_shown(method)} {_shown(fmt)}",
            config,
        )
    groups = _object(quantization.get("config_groups") or {}, "config_groups", path)
    if len(groups) != 1:
        raise UnsupportedError(f"compressed-tensors folders with {len(groups)} config groups are not supported", config)
    scheme = _object(next(iter(groups.values())), "the config group", path)
    weights = _object(scheme.get("weights") or {}, "weights", path)
    bits = weights.get("num_bits")
    if scheme.get("input_activations") or weights.get("type") != "int" or type(bits) is not int or bits not in (4, 8):
        raise UnsupportedError("only weight-only int4/int8 compressed-tensors schemes are read", config)
    strategy, symmetric = weights.get("strategy"), weights.get("symmetric", True)
    if strategy not in ("channel", "group"):
        raise UnsupportedError(f"compressed-tensors strategy {_shown(strategy)} is not read (channel, group)", config)
    if type(symmetric) is not bool:
        raise InputError(f"quantization_config: symmetric is {_shown(symmetric)}, not true or false", config)
    group_size = weights.get("group_size")
    if strategy == "channel":
        return bits, None, symmetric
    if type(group_size) is not int or group_size <= 0:
        raise InputError(f"quantization_config: group_size {_shown(group_size)} is not a positive integer", config)
    return bits, group_size, symmetric


def records_of(tensors: dict[str, LazyTensor], quantization: dict, spec, path: Path) -> dict[str, LazyTensor]:
    """``tensors`` as read from the safetensors files, with each module's packed set replaced by
    one lazy record ``{module}.weight`` (dtype: the scale dtype, the weight's own as llm-compressor
    stores it)."""
    bits, group_size, symmetric = _scheme(quantization, path)
    out = {n: t for n, t in tensors.items() if not n.endswith(SUFFIXES)}
    modules = sorted({n.rsplit(".", 1)[0] for n in tensors if n.endswith(".weight_packed")})
    for module in modules:
        parts = {s: tensors.get(f"{module}.{s}") for s in SUFFIXES}
        missing = [s for s in SUFFIXES if parts[s] is None and not (symmetric and s == "weight_zero_point")]
        if missing:
            raise CheckpointError(f"{module}: {', '.join(missing)} missing", path)
        shape = _weight_shape(module, parts["weight_shape"], path)
        scale = parts["weight_scale"]
        if scale.dtype not in SCALE_DTYPES:
            raise CheckpointError(f"{module}: weight_scale is {scale.dtype}, not a float type", path)
        fmt = QuantFormat(bits, group_size, symmetric, scale.dtype)
        _check_parts(module, parts, shape, fmt, path)
        load = functools.partial(_unpacked_record, parts, shape, fmt)
        out[f"{module}.weight"] = LazyTensor(f"{module}.weight", shape, scale.dtype, load=load, quant=fmt)
    if spec.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _weight_shape(module: str, t: LazyTensor, path: Path) -> tuple[int, int]:
    """The unpacked [out, in] a module's int ``weight_shape`` [2] states, each at least 1."""
    if t.dtype not in ("i32", "i64") or tuple(t.shape) != (2,):
        raise CheckpointError(f"{module}: weight_shape is {t.dtype} {list(t.shape)}, not an int [2]", path)
    shape = tuple(int(v) for v in t.load().tolist())
    if min(shape) < 1:
        raise CheckpointError(f"{module}: weight_shape {list(shape)} is not a matrix shape", path)
    return shape


def _check_parts(module: str, parts: dict[str, LazyTensor | None], shape: tuple[int, int], fmt: QuantFormat, path):
    """Each stored tensor of a record has the dtype and shape the pack-quantized layout gives it."""
    rows, cols = shape
    if fmt.group_size is not None and cols % fmt.group_size:
        raise CheckpointError(f"{module}: {cols} input columns do not split into groups of {fmt.group_size}", path)
    groups = fmt.groups(cols)
    want = {
        "weight_packed": ("i32", (rows, math.ceil(cols * fmt.bits / 32))),
        "weight_scale": (fmt.scale_dtype, (rows, groups)),
        "weight_zero_point": ("i32", (math.ceil(rows * fmt.bits / 32), groups)),
    }
    for suffix, (dtype, stored) in want.items():
        t = parts[suffix]
        if t is None:  # a symmetric scheme's zero point
            continue
        if fmt.symmetric and suffix == "weight_zero_point":
            raise CheckpointError(f"{module}: a weight_zero_point in a symmetric scheme", path)
        if t.dtype != dtype or tuple(t.shape) != stored:
            raise CheckpointError(
                f"{module}: {suffix} is {t.dtype} {list(t.shape)}, expected {dtype} {list(stored)} "
                f"for weight_shape {[rows, cols]} at {fmt.describe()}",
                path,
            )


def _unpacked_record(parts: dict[str, LazyTensor], shape: tuple[int, int], fmt: QuantFormat) -> QuantizedTensor:
    rows, cols = shape
    codes = unpack_int32(parts["weight_packed"].load(), fmt.bits, cols)
    zero = None
    if not fmt.symmetric:
        zero = unpack_int32(parts["weight_zero_point"].load().T.contiguous(), fmt.bits, rows).T.contiguous()
    return QuantizedTensor(codes, parts["weight_scale"].load(), zero, fmt)


def unpack_int32(packed, bits: int, count: int):
    """int8 ``[rows, count]`` from compressed-tensors' dense int32 packing along dim 1: element i at
    bit i * bits counted from the least significant bit of word 0, stored with an offset of
    ``2**(bits-1)`` (ref: compressed-tensors 0.20.0 compressors/pack_quantized/helpers.py
    ``pack_to_int32``/``unpack_from_int32``). Bits 4 and 8 never straddle two words; safetensors
    is little-endian, so the words' bytes hold the elements in order."""
    import numpy as np
    import torch

    data = np.ascontiguousarray(packed.numpy()).astype("<i4", copy=False).view(np.uint8).reshape(packed.shape[0], -1)
    if bits == 4:
        data = np.stack([data & 0x0F, data >> 4], axis=-1).reshape(data.shape[0], -1)
    values = data[:, :count].astype(np.int16) - (1 << (bits - 1))
    return torch.from_numpy(values.astype(np.int8))
