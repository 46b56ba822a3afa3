"""Hugging Face safetensors checkpoints: read and write, single-file and sharded.

Canonical names are HF names, so the name table is the identity. The writer streams:
safetensors' ``save_file`` needs every tensor in memory at once, so the file is laid out
here (header from the lazy shapes, then each tensor's bytes in turn) following the format
spec: 8-byte little-endian header length, JSON header padded to 8 bytes, raw data.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

from converters import compressed_tensors as ct
from gemport.checkpoint import (
    CHUNK_VALUES,
    DTYPE_BYTES,
    DTYPES,
    Checkpoint,
    LazyTensor,
    RowLoader,
    all_finite,
    expected_shapes,
    row_chunks,
    torch_dtype,
)
from gemport.errors import CheckpointError, InputError
from gemport.output import atomic_output
from gemport.progress import log_tensor, progress, stage
from gemport.spec import GemmaSpec
from quantizers import fp16_range

log = logging.getLogger(__name__)

CONFIG, INDEX, SINGLE = "config.json", "model.safetensors.index.json", "model.safetensors"
GENERATION_CONFIG = "generation_config.json"
MANIFEST = "gemport.json"  # how a quantized artifact was made
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)
_ST_DTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
# The integer tensors of compressed-tensors' packed format (converters/compressed_tensors.py).
_ST_INTEGERS = {"I8": "i8", "I32": "i32", "I64": "i64"}
_ST_NAMES = {v: k for k, v in (_ST_DTYPES | _ST_INTEGERS).items()}


def sniff(path: Path) -> bool:
    # a TensorRT-LLM checkpoint folder has a config.json too, and rank files instead of model weights;
    # a keras-hub preset has one too (converters/keras.py sniffs it)
    from converters import keras

    return (
        path.is_dir()
        and (path / CONFIG).is_file()
        and not (path / "rank0.safetensors").is_file()
        and not keras.sniff(path)
    )


def read_json(path: Path) -> dict:
    """A JSON file holding an object (every JSON file of an HF folder does); InputError naming it otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"not valid JSON: {exc}", path) from None
    if not isinstance(data, dict):
        raise InputError(f"a JSON {type(data).__name__}, not an object", path)
    return data


def read(path: str | Path) -> Checkpoint:
    """Open an HF checkpoint folder lazily: only headers are read here."""
    path = Path(path)
    if not sniff(path):
        raise InputError(f"not a Hugging Face checkpoint folder (no {CONFIG})", path)
    config = read_json(path / CONFIG)
    quantization = config.get("quantization_config")
    if quantization is not None:
        ct.check_readable(quantization, path)
    spec = GemmaSpec.from_hf_config(config, path / CONFIG)
    found: dict[str, tuple[LazyTensor, Path]] = {}
    for file in _weight_files(path):
        for tensor in _read_header(file, integers=quantization is not None):
            if tensor.name in found:
                raise InputError(f"tensor {tensor.name} is stored twice", file)
            found[tensor.name] = (tensor, file)
    if (path / INDEX).is_file():
        _check_index_names(path / INDEX, found)
    tensors = {name: tensor for name, (tensor, _) in found.items()}
    if quantization is not None:
        tensors = ct.records_of(tensors, quantization, spec, path)
    if spec.tie_embeddings and "lm_head.weight" in tensors:
        log.info("%s: dropping lm_head.weight, the config ties it to the embedding", path)
        del tensors["lm_head.weight"]
    gen = path / GENERATION_CONFIG
    extra = {}
    if quantization is not None and (path / MANIFEST).is_file():  # how gemport made it, for the next writer
        extra["quantization"] = read_json(path / MANIFEST).get("quantization")
        if not isinstance(extra["quantization"], dict | None):
            raise InputError("quantization is not an object", path / MANIFEST)
    ckpt = Checkpoint(
        spec=spec,
        tensors=tensors,
        tokenizer_files={n: (path / n).read_bytes() for n in TOKENIZER_FILES if (path / n).is_file()},
        generation_config=_generation_config_of(gen) if gen.is_file() else None,
        source=str(path),
        extra=extra,
    )
    ckpt.check(quantized_ok=True)
    return ckpt


def _generation_config_of(file: Path) -> dict:
    return read_json(file)


def _weight_files(path: Path) -> list[Path]:
    if (path / INDEX).is_file():
        return [path / f for f in _index_shards(path / INDEX)]
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    raise InputError(f"no {SINGLE} or {INDEX} (only safetensors weights are read)", path)


def _index_shards(index_file: Path) -> list[str]:
    """The shard files a sharded folder's index names, each checked: a plain file name beside the
    index, ending in .safetensors, present (ref: transformers modeling_utils, the index's weight_map
    of tensor name -> shard file; metadata.total_size optional)."""
    index = read_json(index_file)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError("index has no weight_map (an object of tensor name -> shard file)", index_file)
    metadata = index.get("metadata", {})
    if metadata is not None and not isinstance(metadata, dict):
        raise InputError(f"index metadata is a JSON {type(metadata).__name__}, not an object", index_file)
    files = set()
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file.endswith(".safetensors") or Path(file).name != file:
            raise InputError(
                f"weight_map[{name!r}] = {file!r} is not a .safetensors file name in the folder", index_file
            )
        files.add(file)
    for f in sorted(files):
        if not (index_file.parent / f).is_file():
            raise InputError(f"shard {f} named by the index is missing", index_file)
    return sorted(files)


def _check_index_names(index_file: Path, tensors: dict[str, tuple[LazyTensor, Path]]) -> None:
    """Every tensor the index names is in a shard; one in another shard than the index says is a stale
    index, which loaders that read every shard (transformers) still load: logged."""
    weight_map = read_json(index_file)["weight_map"]
    stale = 0
    for name, file in weight_map.items():
        if name not in tensors:
            raise InputError(f"the index puts tensor {name} in {file}, and no shard holds it", index_file)
        stale += tensors[name][1].name != file
    if stale:
        log.warning("%s: %d tensors are in other shards than the index says (stale index)", index_file, stale)


# ref: safetensors tensor.rs MAX_HEADER_SIZE (100_000_000), SafeTensors::read_metadata: a longer header is refused.
MAX_HEADER_BYTES = 100_000_000
# dtype name -> bytes per element, every dtype of the format (ref: safetensors tensor.rs Dtype, Dtype::size).
_ST_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def _read_header(file: Path, integers: bool = False) -> list[LazyTensor]:
    """Parse a safetensors header, validated as a whole before use as the safetensors library does
    (ref: safetensors tensor.rs SafeTensors::read_metadata, Metadata::validate); ``integers`` also
    accepts the integer tensors of a compressed-tensors folder."""
    n, header, size = _header_json(file)
    entries = _header_entries(file, header)
    data_size = size - 8 - n
    end = 0
    for name, dtype, shape, start, stop in sorted(entries, key=lambda e: (e[3], e[4])):
        # ref: Metadata::validate: sorted by offsets, each tensor starts where the previous ends
        if start != end:
            why = "overlaps the previous tensor" if start < end else f"leaves a gap of {start - end} bytes before it"
            raise InputError(f"tensor {name}: data_offsets [{start}, {stop}] {why}", file)
        count = 1
        for d in shape:
            count *= d
        if count * _ST_SIZES[dtype] != stop - start:
            raise InputError(
                f"tensor {name}: shape {shape} of {dtype} is {count * _ST_SIZES[dtype]} bytes, data_offsets span "
                f"{stop - start}",
                file,
            )
        end = stop
    if end != data_size:  # ref: read_metadata, MetadataIncompleteBuffer: the last offset is the end of the file
        word = "truncated safetensors file" if end > data_size else "safetensors file longer than its tensors"
        raise InputError(f"{word}: the header's tensors need {end} bytes of data, the file holds {data_size}", file)
    readable = _ST_DTYPES | (_ST_INTEGERS if integers else {})
    out = []
    for name, dtype, shape, start, _ in entries:
        if dtype not in readable:
            raise InputError(f"tensor {name} has unsupported dtype {dtype}", file)
        out.append(
            LazyTensor(
                name,
                tuple(shape),
                readable[dtype],
                load=_loader(file, 8 + n + start, tuple(shape), readable[dtype]),
            )
        )
    return out


def _header_json(file: Path) -> tuple[int, dict, int]:
    """(header length, header object, file size); InputError unless the header is a JSON object."""
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise InputError("truncated safetensors file (no header)", file)
            (n,) = struct.unpack("<Q", raw)
            size = file.stat().st_size
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise InputError("not a safetensors file (bad header length; wrong magic or truncated)", file)
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise InputError("not a safetensors file (header is not JSON)", file) from None
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", file) from None
    if not isinstance(header, dict):
        raise InputError(f"not a safetensors file (header is a JSON {type(header).__name__}, not an object)", file)
    return n, header, size


def _header_entries(file: Path, header: dict) -> list[tuple[str, str, list[int], int, int]]:
    """(name, dtype, shape, start, end) of every entry, each checked for type and range
    (ref: safetensors tensor.rs TensorInfo: dtype, shape, data_offsets; __metadata__ a map of str -> str)."""
    metadata = header.get("__metadata__", {})
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise InputError("__metadata__ is not an object of strings", file)
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise InputError(f"tensor {name}: header entry is a JSON {type(info).__name__}, not an object", file)
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ST_SIZES:
            raise InputError(f"tensor {name}: unknown dtype {dtype!r}", file)
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_index(d) for d in shape):
            raise InputError(f"tensor {name}: shape {shape!r} is not a list of non-negative integers", file)
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_index(o) for o in offsets):
            raise InputError(f"tensor {name}: data_offsets {offsets!r} is not [start, end]", file)
        if offsets[0] > offsets[1]:
            raise InputError(f"tensor {name}: data_offsets {offsets} end before they start", file)
        out.append((name, dtype, shape, offsets[0], offsets[1]))
    return out


def _is_index(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _loader(file: Path, start: int, shape: tuple[int, ...], dtype: str) -> RowLoader:
    """The tensor at byte ``start`` of ``file``, whole or a range of rows (RowLoader)."""
    if not shape:
        return RowLoader(lambda a, b: _load(file, start, shape, dtype), 1)
    row_bytes = DTYPE_BYTES[dtype]
    for d in shape[1:]:
        row_bytes *= d
    return RowLoader(lambda a, b: _load(file, start + a * row_bytes, (b - a, *shape[1:]), dtype), shape[0])


def _load(file: Path, start: int, shape: tuple[int, ...], dtype: str):
    """Read ``shape`` of ``dtype`` from byte ``start`` straight into a fresh tensor.

    Plain reads rather than safetensors' mmap, which offers no other way to read part of a
    tensor: pages of the mapping would stay resident (and count in RSS) while the file is open,
    and the copy out of it would double the peak for each tensor.
    """
    import torch

    out = torch.empty(shape, dtype=torch_dtype(dtype))
    view = memoryview(out.view(torch.uint8).numpy()).cast("B")
    with open(file, "rb") as f:
        f.seek(start)
        if f.readinto(view) != len(view):
            raise InputError("truncated safetensors file", file)
    return out


def write(
    ckpt: Checkpoint,
    dst: str | Path,
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    config_style: str = "5",
    allow_fp16_overflow: bool = False,
) -> Path:
    """Write ``ckpt`` as an HF folder at ``dst`` (atomically), optionally cast to ``dtype``.

    An f16 folder (``dtype="f16"``, or an f16 source kept as it is): transformers loads it in fp16
    (config.json ``dtype``) and computes in fp16 throughout, so the model is run in float32 on
    calibration text first and the write refused when an activation outgrows fp16
    (quantizers.fp16_range, every point), unless ``allow_fp16_overflow``; a weight beyond fp16's
    range is refused as it is loaded.

    Quantized records are written in compressed-tensors' pack-quantized format (with
    ``quantization_config`` in config.json and the quantization manifest in gemport.json);
    ``dtype`` then casts only the tensors left unquantized.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    ckpt.check(quantized_ok=True)
    quant = ct.check_writable(ckpt) if ckpt.quantized() else None
    stored = dtype or ckpt.tensors["model.embed_tokens.weight"].dtype  # what config.json's dtype will say
    if stored == "f16":  # given, or kept from an f16 source: either way transformers computes in fp16
        label = "--dtype f16" if dtype else "f16 (the source's dtype, kept)"
        with stage("probing fp16 activations on calibration text"):
            fp16_range.check_fp16(ckpt, fp16_range.ALL, "hf", allow_fp16_overflow, label=label)
        ckpt = fp16_range.guard_weights(ckpt)
    if dtype:
        ckpt = ckpt.cast(dtype)
    order = [n for n in expected_shapes(ckpt.spec)]
    stored, steps = [], []  # steps: the progress counts model tensors, as the summary does
    for name in order:
        parts = ct.wire_tensors(ckpt, [name]) if quant else [ckpt.tensors[name]]
        stored += parts
        steps += [0] * (len(parts) - 1) + [1]  # a record's packed set is one tensor, done at its last part
    shards = _plan_shards(stored, max_shard_bytes)
    verb = f"quantizing ({quant.describe()}) and writing" if quant else "writing"
    with atomic_output(dst, overwrite) as tmp:
        tmp.mkdir()
        with progress(f"{verb} {Path(dst).name}", total=len(order), unit="tensors") as advance:
            step = iter(steps)  # shards keep the stored order
            for file_name, tensors in shards.items():
                _write_safetensors(tmp / file_name, tensors, lambda: advance(next(step)), ckpt.source)
        if len(shards) > 1:
            weight_map = {t.name: f for f, ts in shards.items() for t in ts}
            total = sum(t.nbytes for ts in shards.values() for t in ts)
            _write_json(tmp / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        config = ckpt.spec.to_hf_config(config_style)
        config["dtype"] = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[ckpt.tensors[order[0]].dtype]
        _write_json(tmp / CONFIG, config)
        if quant:
            ct.add_quantization_config(ckpt, quant, tmp)
            _write_json(tmp / MANIFEST, {"quantization": ckpt.extra.get("quantization")})
        _write_json(tmp / GENERATION_CONFIG, ckpt.generation_config or _generation_config(ckpt.spec))
        for name, data in ckpt.tokenizer_files.items():
            (tmp / name).write_bytes(data)
    return Path(dst)


def _generation_config(spec: GemmaSpec) -> dict:
    eos = list(spec.eos_token_id) if isinstance(spec.eos_token_id, tuple) else spec.eos_token_id
    return {"bos_token_id": spec.bos_token_id, "eos_token_id": eos, "pad_token_id": spec.pad_token_id}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _plan_shards(tensors: list[LazyTensor], max_bytes: int | None) -> dict[str, list[LazyTensor]]:
    groups: list[list[LazyTensor]] = [[]]
    size = 0
    for t in tensors:
        if max_bytes and groups[-1] and size + t.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    if len(groups) == 1:
        return {SINGLE: groups[0]}
    n = len(groups)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


def _write_safetensors(path: Path, tensors: list[LazyTensor], advance, source: str) -> None:
    import torch

    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": _ST_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # ref: safetensors format, header padded to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            written = 0
            for data in row_chunks(t, CHUNK_VALUES):  # a large tensor is never whole in memory
                if data.dtype != torch_dtype(t.dtype):
                    raise CheckpointError(f"tensor {t.name} loaded as {data.dtype}, expected {t.dtype}", source)
                if not all_finite(data):
                    raise CheckpointError(f"tensor {t.name} has NaN or infinite values", source)
                # flatten first: torch calls an [n, 1] tensor with stride(-1) != 1 contiguous and will not
                # view it as bytes (an asymmetric per-channel zero point is one)
                written += f.write(memoryview(data.flatten().contiguous().view(torch.uint8).numpy()))
                del data
            if written != t.nbytes:
                raise CheckpointError(f"tensor {t.name} loaded as {written} bytes, expected {t.nbytes}", source)
            log_tensor(log, t.name, t.shape, _ST_NAMES[t.dtype])
            advance()
