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
from gemport.checkpoint import DTYPES, Checkpoint, LazyTensor, all_finite, expected_shapes, torch_dtype
from gemport.errors import CheckpointError, InputError
from gemport.output import atomic_output
from gemport.progress import progress
from gemport.spec import GemmaSpec

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
    return path.is_dir() and (path / CONFIG).is_file()


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"not valid JSON: {exc}", path) from None


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
    tensors: dict[str, LazyTensor] = {}
    for file in _weight_files(path):
        for tensor in _read_header(file, integers=quantization is not None):
            if tensor.name in tensors:
                raise InputError(f"tensor {tensor.name} is stored twice", file)
            tensors[tensor.name] = tensor
    if quantization is not None:
        tensors = ct.records_of(tensors, quantization, spec, path)
    if spec.tie_embeddings and "lm_head.weight" in tensors:
        log.info("%s: dropping lm_head.weight, the config ties it to the embedding", path)
        del tensors["lm_head.weight"]
    gen = path / GENERATION_CONFIG
    extra = {}
    if quantization is not None and (path / MANIFEST).is_file():  # how gemport made it, for the next writer
        extra["quantization"] = read_json(path / MANIFEST).get("quantization")
    ckpt = Checkpoint(
        spec=spec,
        tensors=tensors,
        tokenizer_files={n: (path / n).read_bytes() for n in TOKENIZER_FILES if (path / n).is_file()},
        generation_config=read_json(gen) if gen.is_file() else None,
        source=str(path),
        extra=extra,
    )
    ckpt.check(quantized_ok=True)
    return ckpt


def _weight_files(path: Path) -> list[Path]:
    if (path / INDEX).is_file():
        index = read_json(path / INDEX)
        if not isinstance(index.get("weight_map"), dict):
            raise InputError("index has no weight_map", path / INDEX)
        files = sorted(set(index["weight_map"].values()))
        for f in files:
            if not (path / f).is_file():
                raise InputError(f"shard {f} named by the index is missing", path / INDEX)
        return [path / f for f in files]
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    raise InputError(f"no {SINGLE} or {INDEX} (only safetensors weights are read)", path)


def _read_header(file: Path, integers: bool = False) -> list[LazyTensor]:
    """Parse a safetensors header and check that the data it names is all there; ``integers``
    also accepts the integer tensors of a compressed-tensors folder."""
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise InputError("truncated safetensors file (no header)", file)
            (n,) = struct.unpack("<Q", raw)
            size = file.stat().st_size
            if n > size - 8 or n > 100_000_000:
                raise InputError("not a safetensors file (bad header length; wrong magic or truncated)", file)
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError("not a safetensors file (header is not JSON)", file) from None
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", file) from None
    header.pop("__metadata__", None)
    data_end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + data_end > size:
        raise InputError(f"truncated safetensors file: data ends at byte {size}, header needs {8 + n + data_end}", file)
    out = []
    readable = _ST_DTYPES | (_ST_INTEGERS if integers else {})
    for name, info in header.items():
        if info.get("dtype") not in readable:
            raise InputError(f"tensor {name} has unsupported dtype {info.get('dtype')}", file)
        shape, dtype = tuple(info["shape"]), readable[info["dtype"]]
        start, end = info["data_offsets"]
        tensor = LazyTensor(
            name, shape, dtype, load=lambda f=file, s=8 + n + start, sh=shape, d=dtype: _load(f, s, sh, d)
        )
        if end - start != tensor.nbytes:
            raise InputError(f"tensor {name}: header shape {list(shape)} does not match its {end - start} bytes", file)
        out.append(tensor)
    return out


def _load(file: Path, start: int, shape: tuple[int, ...], dtype: str):
    """Read one tensor's bytes straight into a fresh tensor.

    Plain reads rather than safetensors' mmap: pages of the mapping would stay resident
    while the file is open, and the copy out of it would double the peak for each tensor.
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
) -> Path:
    """Write ``ckpt`` as an HF folder at ``dst`` (atomically), optionally cast to ``dtype``.

    Quantized records are written in compressed-tensors' pack-quantized format (with
    ``quantization_config`` in config.json and the quantization manifest in gemport.json);
    ``dtype`` then casts only the tensors left unquantized.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    ckpt.check(quantized_ok=True)
    quant = ct.check_writable(ckpt) if ckpt.quantized() else None
    if dtype:
        ckpt = ckpt.cast(dtype)
    order = [n for n in expected_shapes(ckpt.spec)]
    stored = ct.wire_tensors(ckpt, order) if quant else [ckpt.tensors[n] for n in order]
    shards = _plan_shards(stored, max_shard_bytes)
    verb = f"quantizing ({quant.describe()}) and writing" if quant else "writing"
    with atomic_output(dst, overwrite) as tmp:
        tmp.mkdir()
        with progress(f"{verb} {Path(dst).name}", total=len(stored)) as advance:
            for file_name, tensors in shards.items():
                _write_safetensors(tmp / file_name, tensors, advance, ckpt.source)
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
            data = t.load()
            if tuple(data.shape) != t.shape or data.dtype != torch_dtype(t.dtype):
                raise CheckpointError(
                    f"tensor {t.name} loaded as {list(data.shape)} {data.dtype}, expected {list(t.shape)} {t.dtype}",
                    source,
                )
            if not all_finite(data):
                raise CheckpointError(f"tensor {t.name} has NaN or infinite values", source)
            f.write(memoryview(data.contiguous().view(torch.uint8).numpy()))
            del data
            advance()
