"""Structure-aware mutators for the fuzz targets.

libFuzzer's byte mutations rarely keep a JSON header parseable or a GGUF count consistent with
what follows it, so most of its inputs would stop at the first parse error. These mutators take
an input apart (JSON value, safetensors header, GGUF header, ONNX protobuf, torch zip, or a bundle
of named files), change one thing the way a hostile or damaged file would (a count that lies, a
huge or negative size, a wrong type, a missing or duplicated entry, a truncation) and put it back
together. Each also falls back to libFuzzer's own byte mutation (``atheris.Mutate``) some of the
time, so inputs that no parser accepts are still tried.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
import struct
from collections.abc import Callable
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[2]

INTERESTING_INTS = (
    0, 1, -1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 255, 256, 511, 512, 1023, 1024, 4096, 65535, 65536,
    2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
    -(2**31), -(2**63), 10**9, 10**12, 10**18,
)  # fmt: skip
INTERESTING_FLOATS = (0.0, -0.0, 0.5, 1.0, -1.0, 1e-6, 1e-300, 1e300, 1e308, -1e308, math.nan, math.inf, -math.inf)
INTERESTING_VALUES: tuple = (
    None, True, False, "", "a", "0", "-1", "NaN", [], {}, [0], [1, 2], [-1], [None], {"": None},
    "gemma", "gemma2", "gemma3", "full_attention", "sliding_attention", "linear", "yarn", "dynamic", "default",
)  # fmt: skip


def _words_of(*files: str) -> list[str]:
    """Quoted identifiers in gemport's readers: the keys and values they look for (a dictionary)."""
    words: set[str] = set()
    for f in files:
        text = (ROOT / f).read_text(encoding="utf-8")
        words.update(re.findall(r"""["']([A-Za-z_][A-Za-z0-9_.\-/]{1,60})["']""", text))
    return sorted(words)


WORDS = _words_of(
    "gemport/spec.py",
    "converters/hf.py",
    "converters/compressed_tensors.py",
    "converters/onnx.py",
    "converters/jax.py",
    "converters/presets.py",
    "converters/gguf.py",
)


def raw(data: bytes, max_size: int, rng: random.Random) -> bytes:
    """libFuzzer's own byte-level mutation."""
    return atheris.Mutate(data, max(max_size, len(data)))


# --- JSON --------------------------------------------------------------------------------------
def _paths(value, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:64]):
            out += _paths(v, (*prefix, i))
    return out


def _get(value, path):
    for p in path:
        value = value[p]
    return value


def _new_value(rng: random.Random, old):
    r = rng.random()
    if isinstance(old, bool) or old is None:
        return rng.choice(INTERESTING_VALUES + (not old, 0, 1))
    if isinstance(old, int) and r < 0.6:
        return rng.choice((old + 1, old - 1, -old, old * 2, old * 1000, old // 2, rng.choice(INTERESTING_INTS)))
    if isinstance(old, float) and r < 0.6:
        return rng.choice((old * 2, -old, old + 1, int(old) if math.isfinite(old) else 0, *INTERESTING_FLOATS))
    if isinstance(old, str) and r < 0.5:
        if rng.random() < 0.5:
            return rng.choice(WORDS)
        return atheris.Mutate(old.encode(), len(old) + 8).decode("utf-8", "replace")
    if isinstance(old, list) and r < 0.5 and old:
        return old * rng.choice((2, 8, 100)) if rng.random() < 0.3 else old[: rng.randrange(len(old))]
    return rng.choice(
        (
            rng.choice(INTERESTING_INTS),
            rng.choice(INTERESTING_FLOATS),
            rng.choice(INTERESTING_VALUES),
            rng.choice(WORDS),
            [old],
            {rng.choice(WORDS): old},
        )
    )


def mutate_value(value, rng: random.Random, steps: int = 0):
    """One structural change to a parsed JSON value (returns the new value)."""
    paths = _paths(value)
    path = rng.choice(paths)
    op = rng.random()
    if not path:
        return _new_value(rng, value) if op < 0.1 else value
    parent, key = _get(value, path[:-1]), path[-1]
    if op < 0.45:
        parent[key] = _new_value(rng, parent[key])
    elif op < 0.6:
        del parent[key]
    elif op < 0.75 and isinstance(parent, dict):
        parent[rng.choice(WORDS)] = _new_value(rng, parent[key]) if rng.random() < 0.5 else parent[key]
    elif op < 0.85 and isinstance(parent, list):
        parent.insert(rng.randrange(len(parent) + 1), parent[key])
    elif op < 0.92 and isinstance(parent, dict):  # a key renamed: what a config of another version says
        parent[rng.choice(WORDS)] = parent.pop(key)
    else:  # the same value grafted elsewhere
        other = _get(value, rng.choice(paths))
        parent[key] = json.loads(json.dumps(other, allow_nan=True))
    return value


def mutate_json_text(data: bytes, max_size: int, rng: random.Random) -> bytes:
    if rng.random() < 0.1:
        return raw(data, max_size, rng)
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return raw(data, max_size, rng)
    for _ in range(1 + (rng.random() < 0.3) + (rng.random() < 0.1)):
        value = mutate_value(value, rng)
    try:
        return json.dumps(value, allow_nan=True).encode()
    except (ValueError, RecursionError):
        return data


# --- safetensors ---------------------------------------------------------------------------
def mutate_safetensors(data: bytes, max_size: int, rng: random.Random) -> bytes:
    """The JSON header mutated as JSON (length prefix kept right, or made to lie), the data
    truncated, or raw bytes."""
    r = rng.random()
    if r < 0.15 or len(data) < 8:
        return raw(data, max_size, rng)
    (n,) = struct.unpack("<Q", data[:8])
    header, body = data[8 : 8 + n], data[8 + n :]
    if r < 0.25:
        return data[: rng.randrange(len(data))]
    if r < 0.3:
        return struct.pack("<Q", rng.choice(INTERESTING_INTS) % 2**64) + data[8:]
    new = mutate_json_text(header, max_size, rng)
    new += b" " * (-len(new) % 8)
    return struct.pack("<Q", len(new)) + new + body


# --- GGUF ----------------------------------------------------------------------------------
# ref: ggml docs/gguf.md (value types 0..12, header: magic, version, n_tensors, n_kv).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("short")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> bytes:
        return self.take(self.unpack("<Q"))


def _gguf_value(r: _Reader, vtype: int) -> bytes:
    """The encoded bytes of one value of ``vtype`` (kept opaque)."""
    start = r.pos
    if vtype in _SCALARS:
        r.take(struct.calcsize(_SCALARS[vtype]))
    elif vtype == 8:
        r.string()
    elif vtype == 9:
        etype, count = r.unpack("<I"), r.unpack("<Q")
        if count > 10**6:
            raise ValueError("long")
        for _ in range(count):
            _gguf_value(r, etype)
    else:
        raise ValueError("type")
    return r.data[start : r.pos]


def parse_gguf(data: bytes):
    r = _Reader(data)
    if r.take(4) != b"GGUF":
        raise ValueError("magic")
    version, n_tensors, n_kv = r.unpack("<I"), r.unpack("<Q"), r.unpack("<Q")
    if n_tensors > 10**5 or n_kv > 10**5:
        raise ValueError("counts")
    kvs = []
    for _ in range(n_kv):
        key, vtype = r.string(), r.unpack("<I")
        kvs.append([key, vtype, _gguf_value(r, vtype)])
    tensors = []
    for _ in range(n_tensors):
        name, n_dims = r.string(), r.unpack("<I")
        if n_dims > 16:
            raise ValueError("dims")
        dims = [r.unpack("<Q") for _ in range(n_dims)]
        tensors.append([name, dims, r.unpack("<I"), r.unpack("<Q")])
    align = 32
    for key, vtype, value in kvs:
        if key == b"general.alignment" and vtype == 4:
            align = struct.unpack("<I", value)[0] or 32
    start = r.pos + (-r.pos % align)
    return version, kvs, tensors, data[start:], align


def _str(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def build_gguf(version, kvs, tensors, body: bytes, align: int, counts=None) -> bytes:
    n_tensors, n_kv = counts or (len(tensors), len(kvs))
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, n_tensors % 2**64, n_kv % 2**64))
    for key, vtype, value in kvs:
        out += _str(key) + struct.pack("<I", vtype % 2**32) + value
    for name, dims, ttype, offset in tensors:
        out += _str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d % 2**64) for d in dims)
        out += struct.pack("<IQ", ttype % 2**32, offset % 2**64)
    out += b"\0" * (-len(out) % max(align, 1))
    return bytes(out) + body


def _mutate_gguf_value(vtype: int, value: bytes, rng: random.Random) -> tuple[int, bytes]:
    if vtype in _SCALARS:
        fmt = _SCALARS[vtype]
        if fmt in ("<f", "<d"):
            v = rng.choice(INTERESTING_FLOATS)
            return vtype, struct.pack(fmt, v if fmt == "<d" or not math.isfinite(v) or abs(v) < 3e38 else math.inf)
        bits = struct.calcsize(fmt) * 8
        v = rng.choice(INTERESTING_INTS) % 2**bits
        return vtype, struct.pack(fmt.upper() if fmt != "<?" else "<B", v) if fmt != "<?" else bytes([v & 0xFF])
    if vtype == 8:
        s = value[8:]
        choice = rng.random()
        if choice < 0.3:  # the length lies
            return vtype, struct.pack("<Q", rng.choice(INTERESTING_INTS) % 2**64) + s
        if choice < 0.6:
            return vtype, _str(rng.choice(WORDS).encode())
        return vtype, _str(atheris.Mutate(s, len(s) + 16))
    if vtype == 9 and len(value) >= 12:
        etype, count = struct.unpack("<IQ", value[:12])
        items = value[12:]
        choice = rng.random()
        if choice < 0.35:  # the count lies
            return vtype, struct.pack("<IQ", etype, rng.choice(INTERESTING_INTS) % 2**64) + items
        if choice < 0.5:  # the element type lies
            return vtype, struct.pack("<IQ", rng.randrange(14), count) + items
        if choice < 0.7 and etype in _SCALARS and count:  # fewer elements, count kept right
            size = struct.calcsize(_SCALARS[etype])
            keep = rng.randrange(count)
            return vtype, struct.pack("<IQ", etype, keep) + items[: keep * size]
        if choice < 0.85 and etype in _SCALARS and count:  # one element changed
            size = struct.calcsize(_SCALARS[etype])
            i = rng.randrange(count)
            _, new = _mutate_gguf_value(etype, items[i * size : (i + 1) * size], rng)
            return vtype, value[: 12 + i * size] + new + value[12 + (i + 1) * size :]
        return vtype, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", etype, count) + items  # nested
    return vtype, value


def mutate_gguf(data: bytes, max_size: int, rng: random.Random) -> bytes:
    if rng.random() < 0.15:
        return raw(data, max_size, rng)
    try:
        version, kvs, tensors, body, align = parse_gguf(data)
    except (ValueError, struct.error):
        return raw(data, max_size, rng)
    counts = None
    r = rng.random()
    if r < 0.05:
        return data[: rng.randrange(len(data))]
    if r < 0.1:
        counts = (
            rng.choice((len(tensors), rng.choice(INTERESTING_INTS))),
            rng.choice((len(kvs), rng.choice(INTERESTING_INTS))),
        )
    elif r < 0.55 and kvs:
        kv = rng.choice(kvs)
        sub = rng.random()
        if sub < 0.75:
            kv[1], kv[2] = _mutate_gguf_value(kv[1], kv[2], rng)
        elif sub < 0.85:
            kv[1] = rng.choice((rng.randrange(14), rng.choice(INTERESTING_INTS)))
        elif sub < 0.92:
            kvs.remove(kv)
        else:
            kvs.append(list(kv))
    elif r < 0.62:  # a key of another arch or a known key, with a copied value
        kv = list(rng.choice(kvs)) if kvs else [b"", 4, b"\0\0\0\0"]
        kv[0] = rng.choice(WORDS).encode() if rng.random() < 0.5 else atheris.Mutate(kv[0], len(kv[0]) + 8)
        kvs.append(kv)
    elif tensors:
        t = rng.choice(tensors)
        sub = rng.random()
        if sub < 0.4 and t[1]:
            t[1][rng.randrange(len(t[1]))] = rng.choice(INTERESTING_INTS)
        elif sub < 0.5:
            t[1] = t[1] + [rng.choice((1, 2, 4096))] if rng.random() < 0.5 else t[1][:-1]
        elif sub < 0.65:
            t[2] = rng.choice((rng.randrange(42), rng.choice(INTERESTING_INTS)))
        elif sub < 0.8:
            t[3] = rng.choice((t[3] + 1, t[3] + 32, len(body), rng.choice(INTERESTING_INTS)))
        elif sub < 0.9:
            t[0] = atheris.Mutate(t[0], len(t[0]) + 8)
        else:
            tensors.remove(t) if rng.random() < 0.5 else tensors.append(list(t))
    else:
        return raw(data, max_size, rng)
    return build_gguf(version, kvs, tensors, body, align, counts)


# External-data locations: empty, outside the folder, absolute, missing, the model itself.
LOCATIONS = ("", "/", "..", "../model.onnx.data", "/etc/hostname", "missing.data", "model.onnx")


# --- ONNX ----------------------------------------------------------------------------------
def mutate_onnx(data: bytes, max_size: int, rng: random.Random) -> bytes:
    import onnx

    if rng.random() < 0.15:
        return raw(data, max_size, rng)
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:  # protobuf's DecodeError and others
        return raw(data, max_size, rng)
    r = rng.random()
    inits = model.graph.initializer
    if r < 0.5 and model.metadata_props:
        prop = rng.choice(model.metadata_props)
        value = prop.value if isinstance(prop.value, bytes) else prop.value.encode()
        prop.value = mutate_json_text(value, max_size, rng).decode("utf-8", "replace")
    elif r < 0.85 and len(inits):
        t = inits[rng.randrange(len(inits))]
        sub = rng.random()
        if sub < 0.3 and len(t.dims):
            t.dims[rng.randrange(len(t.dims))] = rng.choice(INTERESTING_INTS) % 2**63
        elif sub < 0.4:
            t.dims.append(rng.choice((1, 2, 16))) if rng.random() < 0.5 and len(t.dims) < 8 else t.ClearField("dims")
        elif sub < 0.5:
            t.data_type = rng.randrange(26)
        elif sub < 0.75 and len(t.external_data):
            e = t.external_data[rng.randrange(len(t.external_data))]
            if e.key == "location":
                e.value = rng.choice(LOCATIONS)
            else:
                e.value = str(rng.choice(INTERESTING_INTS))
        elif sub < 0.85 and t.raw_data:
            t.raw_data = t.raw_data[: rng.randrange(len(t.raw_data))]
        elif sub < 0.92:
            t.name = rng.choice([i.name for i in inits]) if rng.random() < 0.5 else t.name + "x"
        else:
            del inits[rng.randrange(len(inits))]
    else:
        return raw(data, max_size, rng)
    return model.SerializeToString()


# --- torch zip (gemma_pytorch .ckpt) -------------------------------------------------------
def mutate_torch(data: bytes, max_size: int, rng: random.Random) -> bytes:
    """A torch.save zip: one record mutated (the pickle mostly) and the archive rebuilt by
    torch's own writer, so the zip stays valid; a legacy (raw pickle) file mutated as bytes."""
    import zipfile

    if data[:4] != b"PK\x03\x04" or rng.random() < 0.2:
        return raw(data, max_size, rng)
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        records = {i.filename.split("/", 1)[-1]: z.read(i) for i in z.infolist()}
    except Exception:  # zipfile raises BadZipFile, ValueError, EOFError, ... on damaged archives
        return raw(data, max_size, rng)
    names = [n for n in records if n not in ("version", ".data/version", ".data/serialization_id")]
    if not names:
        return raw(data, max_size, rng)
    r = rng.random()
    if r < 0.6 and "data.pkl" in records:
        name = "data.pkl"
    else:
        name = rng.choice(names)
    value = records[name]
    if r > 0.9 and value:
        records[name] = value[: rng.randrange(len(value))]
    else:
        records[name] = atheris.Mutate(value, len(value) + 64)
    return _torch_zip(records)


def _torch_zip(records: dict[str, bytes]) -> bytes:
    import torch

    out = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(out)
    for name, value in records.items():
        if name in ("version", ".data/version", ".data/serialization_id"):
            continue
        writer.write_record(name, value, len(value))
    writer.write_end_of_file()
    return out.getvalue()


# --- bundles: several named files in one input ----------------------------------------------
def pack_bundle(files: dict[str, bytes]) -> bytes:
    out = bytearray()
    for name, data in files.items():
        n = name.encode()[:255]
        out += bytes([len(n)]) + n + struct.pack("<I", len(data)) + data
    return bytes(out)


def unpack_bundle(data: bytes) -> dict[str, bytes]:
    """The files of a bundle; a damaged tail is dropped (a missing file)."""
    files, pos = {}, 0
    while pos < len(data):
        n = data[pos]
        name = data[pos + 1 : pos + 1 + n]
        if len(name) < n or pos + 5 + n > len(data):
            break
        (size,) = struct.unpack("<I", data[pos + 1 + n : pos + 5 + n])
        files[name.decode("utf-8", "replace")] = data[pos + 5 + n : pos + 5 + n + size]
        pos += 5 + n + size
    return files


def mutator_for(name: str) -> Callable[[bytes, int, random.Random], bytes]:
    if name.endswith(".json") or name in ("_METADATA", "_CHECKPOINT_METADATA"):
        return mutate_json_text
    if name.endswith(".safetensors"):
        return mutate_safetensors
    if name.endswith(".onnx"):
        return mutate_onnx
    if name.endswith(".gguf"):
        return mutate_gguf
    if name.endswith((".ckpt", ".pt")):
        return mutate_torch
    return raw


def mutate_bundle(data: bytes, max_size: int, rng: random.Random) -> bytes:
    files = unpack_bundle(data)
    if not files or rng.random() < 0.03:
        return raw(data, max_size, rng)
    name = rng.choice(sorted(files))
    r = rng.random()
    if r < 0.04:
        del files[name]
    elif r < 0.08 and files[name]:
        files[name] = files[name][: rng.randrange(len(files[name]))]
    else:
        files[name] = mutator_for(name)(files[name], max_size, rng)
    return pack_bundle(files)


def with_selector(mutate: Callable[[bytes, int, random.Random], bytes]):
    """For inputs whose first byte picks a fixture (which config.json sits beside the file)."""

    def mutator(data: bytes, max_size: int, rng: random.Random) -> bytes:
        if not data:
            return bytes([rng.randrange(256)])
        if rng.random() < 0.03:
            return bytes([rng.randrange(256)]) + data[1:]
        return data[:1] + mutate(data[1:], max_size, rng)

    return mutator
