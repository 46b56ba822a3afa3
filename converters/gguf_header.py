"""A bounded GGUF header reader: metadata and tensor infos, with every count and length checked
against the bytes left in the file before anything is allocated or iterated.

Why gemport reads the header itself rather than with gguf-py's GGUFReader: GGUFReader trusts
every count it reads (ref: gguf-py gguf/gguf_reader.py GGUFReader._get_field_parts loops
``for idx in range(alen[0])`` over an array length taken from the file; _build_fields and
_build_tensor_info loop over the kv and tensor counts the same way), so a 179-byte file whose
array claims 2^40 elements grows memory until the process dies. It also builds one numpy object
per array element: measured here, 12.5 s and 730 MB for a 1 MB file holding a 1M-element uint8
array, 5.8 s and 385 MB for a 262144-piece token list (Gemma 3's). This reader walks the layout of
the GGUF spec (ref: ggml docs/gguf.md "File Structure"; gguf-py constants.py GGUFValueType) with
the checks llama.cpp's own loader makes (ref: ggml/src/gguf.cpp gguf_init_from_file_impl: version,
duplicate keys, at most GGML_MAX_DIMS dims, names shorter than GGML_MAX_NAME, known ggml types,
rows a whole number of blocks, general.alignment a uint32 power of two, tensor data laid out back
to back from the aligned data section), plus bounds of its own on what a hostile file can make it
build: string lengths, array nesting depth, and the total number of strings and nested arrays.
Scalar arrays are read as one numpy copy each (bounded by the file's own bytes), not per element.
Tensor data is never read here: ``TensorInfo.array`` maps it on demand.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gemport.errors import InputError, UnsupportedError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # ref: gguf-py gguf_reader.py READER_SUPPORTED_VERSIONS; gguf.cpp refuses v1 and > 3
DEFAULT_ALIGNMENT = 32  # ref: gguf-py constants.py GGUF_DEFAULT_ALIGNMENT
MAX_DIMS = 4  # ref: ggml.h GGML_MAX_DIMS
MAX_NAME = 64  # ref: ggml.h GGML_MAX_NAME; gguf.cpp refuses tensor names of this length or more
# Bounds of gemport's own (llama.cpp has none): far above any real Gemma GGUF (about 40 keys,
# 800 tensors, a 262144-piece vocabulary of short strings, chat templates of a few kB).
MAX_KEY_BYTES = 1 << 16
MAX_STRING_BYTES = 1 << 26
MAX_DEPTH = 4  # nested arrays: gguf-py reads them (flattened), llama.cpp refuses any nesting
MAX_ITEMS = 1 << 22  # keys + tensors + strings and arrays inside arrays, in one file
MAX_HEADER_BYTES = 1 << 28  # metadata and tensor infos: what the reader may copy into memory

# GGUFValueType number -> (name, numpy dtype, struct format, bytes); STRING (8) and ARRAY (9) apart.
# ref: ggml docs/gguf.md "enum gguf_metadata_value_type", gguf-py constants.py GGUFValueType
STRING, ARRAY = 8, 9
SCALARS: dict[int, tuple[str, str, str, int]] = {
    0: ("uint8", "<u1", "<B", 1),
    1: ("int8", "<i1", "<b", 1),
    2: ("uint16", "<u2", "<H", 2),
    3: ("int16", "<i2", "<h", 2),
    4: ("uint32", "<u4", "<I", 4),
    5: ("int32", "<i4", "<i", 4),
    6: ("float32", "<f4", "<f", 4),
    7: ("bool", "<u1", "<B", 1),
    10: ("uint64", "<u8", "<Q", 8),
    11: ("int64", "<i8", "<q", 8),
    12: ("float64", "<f8", "<d", 8),
}
BOOL, UINT32 = 7, 4
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a non-empty key, type, the smallest value
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


def _corrupt(message: str, path: Path) -> InputError:
    return InputError(f"truncated or corrupt GGUF file: {message}", path)


def type_name(vtype: int) -> str:
    return {STRING: "string", ARRAY: "array"}.get(vtype) or SCALARS[vtype][0]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: ``ne`` in GGUF order (row length first), data at ``offset`` in the file."""

    name: str
    ne: tuple[int, ...]
    qtype: int  # a gguf.GGMLQuantizationType
    offset: int
    nbytes: int
    path: Path = field(compare=False)

    def array(self) -> np.ndarray:
        """The stored data, memory-mapped, in the shape and dtype gguf-py's GGUFReader gives it
        (ref: gguf_reader.py GGUFReader._build_tensors): float and integer types as such in numpy
        order, block-quantized types as uint8 rows of blocks."""
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import quant_shape_to_byte_shape

        plain = {Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64, Q.I8: np.int8}
        plain |= {Q.I16: np.int16, Q.I32: np.int32, Q.I64: np.int64}
        shape = tuple(reversed(self.ne))
        dtype = plain.get(self.qtype)
        if dtype is None:
            dtype, shape = np.uint8, quant_shape_to_byte_shape(shape, Q(self.qtype))
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.offset, shape=shape)


@dataclass
class Header:
    """Metadata values by key and tensor infos in file order. Values: int, float, bool, str; an
    array of numbers or bools is a 1-D numpy array, an array of strings or arrays a list."""

    path: Path
    version: int
    values: dict[str, Any]
    types: dict[str, int]
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int
    size: int


def read_header(path: str | Path) -> Header:
    """The header of the GGUF at ``path``; InputError or UnsupportedError, naming the file, for any
    count, length, type or offset the file cannot back."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # Before the size: a short text file is not a truncated GGUF; an empty one may be.
            if not MAGIC.startswith(f.read(4)):
                raise InputError("not a GGUF file (no GGUF magic)", path)
            size = f.seek(0, 2)
            if size < 24:
                raise InputError(f"truncated GGUF file: {size} bytes, a GGUF header needs at least 24", path)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf, path, size)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path) from None


class _Cursor:
    """Reads little-endian fields from ``buf``, refusing any read past its end."""

    def __init__(self, buf: mmap.mmap, path: Path, size: int):
        self.buf, self.path, self.pos, self.end = buf, path, 0, size
        self.items = 0

    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> int:
        if self.pos + n > MAX_HEADER_BYTES and n <= self.end - self.pos:
            message = f"{what} ends past the first {MAX_HEADER_BYTES} bytes, gemport's bound on a header"
            raise _corrupt(message, self.path)
        if n > self.end - self.pos:
            raise _corrupt(
                f"{what} needs {n} bytes at offset {self.pos}, the file has {self.left()} left",
                self.path,
            )
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str, n: int, what: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(n, what))[0]

    def u32(self, what: str) -> int:
        return self.unpack("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", 8, what)

    def string(self, what: str, limit: int) -> str:
        n = self.u64(f"the length of {what}")
        if n > limit:
            raise _corrupt(f"{what} claims {n} bytes, more than the {limit} gemport accepts", self.path)
        start = self.take(n, what)
        try:
            return self.buf[start : start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise _corrupt(f"{what} at offset {start} is not UTF-8", self.path) from None

    def count(self, n: int, min_bytes: int, what: str) -> None:
        """Refuse ``n`` items of at least ``min_bytes`` each that the bytes left cannot hold, or
        that would take the file past MAX_ITEMS; before any of them is read."""
        if n * min_bytes > self.left():
            raise _corrupt(
                f"{what} claims {n} entries of at least {min_bytes} bytes each; "
                f"the {self.left()} bytes left in the file hold at most {self.left() // min_bytes}",
                self.path,
            )
        self.items += n
        if self.items > MAX_ITEMS:
            raise _corrupt(f"{what}: more than {MAX_ITEMS} keys, tensors and strings in one file", self.path)


def _parse(buf: mmap.mmap, path: Path, size: int) -> Header:
    cur = _Cursor(buf, path, size)
    cur.pos = 4  # the magic, checked by read_header
    version = cur.u32("the version")
    if version & 0xFFFF == 0:  # ref: gguf.cpp: the version of a file of the other byte order
        raise UnsupportedError(f"big-endian GGUF (version field {version:#x}) is not supported", path)
    if version not in VERSIONS:
        raise UnsupportedError(f"GGUF version {version} is not supported (only {VERSIONS})", path)
    n_tensors, n_kv = cur.u64("the tensor count"), cur.u64("the metadata count")
    cur.count(n_kv, _MIN_KV_BYTES, "the metadata count")
    cur.count(n_tensors, _MIN_TENSOR_BYTES, "the tensor count")
    values, types = {}, {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}", MAX_KEY_BYTES)
        if not key:
            raise _corrupt(f"metadata key {i} is empty", path)
        if key in values:
            raise _corrupt(f"metadata key {key} appears twice", path)
        types[key] = cur.u32(f"the type of metadata {key}")
        values[key] = _value(cur, types[key], key, 0)
    alignment = _alignment(values, types, path)
    tensors = [_tensor_info(cur, i) for i in range(n_tensors)]
    data_offset = -(-cur.pos // alignment) * alignment
    _check_layout(tensors, data_offset, alignment, size, path)
    tensors = [_placed(t, data_offset) for t in tensors]
    return Header(path, version, values, types, tensors, alignment, data_offset, size)


def _value(cur: _Cursor, vtype: int, key: str, depth: int) -> Any:
    if vtype in SCALARS:
        _, _, fmt, n = SCALARS[vtype]
        value = cur.unpack(fmt, n, f"metadata {key}")
        return bool(value) if vtype == BOOL else value
    if vtype == STRING:
        return cur.string(f"metadata {key}", MAX_STRING_BYTES)
    if vtype != ARRAY:
        raise _corrupt(f"metadata {key} has unknown value type {vtype}", cur.path)
    if depth >= MAX_DEPTH:
        raise _corrupt(f"metadata {key} nests arrays more than {MAX_DEPTH} deep", cur.path)
    itype = cur.u32(f"the element type of metadata {key}")
    n = cur.u64(f"the length of metadata {key}")
    if itype in SCALARS:
        _, fmt, _, size = SCALARS[itype]
        # numbers are one numpy copy, not n objects: only the bytes left bound them (take checks them)
        start = cur.take(n * size, f"metadata {key}")
        data = np.frombuffer(cur.buf[start : start + n * size], dtype=np.dtype(fmt))  # a copy: bytes, not the map
        return data != 0 if itype == BOOL else data
    if itype == STRING:
        cur.count(n, 8, f"metadata {key}")
        return _strings(cur, n, key)
    if itype == ARRAY:
        cur.count(n, 12, f"metadata {key}")  # each inner array: element type and length
        return [_value(cur, ARRAY, key, depth + 1) for _ in range(n)]
    raise _corrupt(f"metadata {key} is an array of unknown value type {itype}", cur.path)


_LENGTH = struct.Struct("<Q").unpack_from


def _strings(cur: _Cursor, n: int, key: str) -> list[str]:
    """``n`` strings of an array in one tight loop (Gemma 3's 262144 pieces in a fraction of a second,
    which ``inspect`` needs); at the first string that any bound or the file's end refuses, the rest
    is read by ``_Cursor.string``, which raises the error naming it."""
    buf, pos, out = cur.buf, cur.pos, []
    end, limit = min(cur.end, MAX_HEADER_BYTES), MAX_STRING_BYTES
    append = out.append
    start = pos
    try:
        for _ in range(n):
            start = pos
            (size,) = _LENGTH(buf, pos)
            pos += 8 + size
            if size > limit or pos > end:
                raise ValueError
            append(buf[start + 8 : pos].decode("utf-8"))
    except (ValueError, struct.error):  # UnicodeDecodeError is a ValueError
        cur.pos = start
        return out + [cur.string(f"element {j} of metadata {key}", limit) for j in range(len(out), n)]
    cur.pos = pos
    return out


def _alignment(values: dict[str, Any], types: dict[str, int], path: Path) -> int:
    """ref: gguf.cpp: general.alignment must be a uint32 power of two; 32 when absent."""
    if "general.alignment" not in values:
        return DEFAULT_ALIGNMENT
    value = values["general.alignment"]
    if types["general.alignment"] != UINT32:
        raise _corrupt(f"general.alignment is a {type_name(types['general.alignment'])}, not a uint32", path)
    if value == 0 or value & (value - 1):
        raise _corrupt(f"general.alignment {value} is not a power of two", path)
    return value


def _tensor_info(cur: _Cursor, i: int) -> TensorInfo:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    name = cur.string(f"the name of tensor {i}", MAX_NAME - 1)
    n_dims = cur.u32(f"the dimension count of tensor {name}")
    if n_dims > MAX_DIMS:
        raise _corrupt(f"tensor {name} has {n_dims} dimensions, more than ggml's {MAX_DIMS}", cur.path)
    ne = tuple(cur.u64(f"dimension {j} of tensor {name}") for j in range(n_dims))
    raw_type = cur.u32(f"the type of tensor {name}")
    offset = cur.u64(f"the data offset of tensor {name}")
    try:
        qtype = GGMLQuantizationType(raw_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise _corrupt(f"tensor {name} has unknown ggml type {raw_type}", cur.path) from None
    if any(d >= 1 << 63 for d in ne):  # ref: gguf.cpp: ne are int64 and must be >= 0
        raise _corrupt(f"tensor {name} has a negative dimension {list(ne)}", cur.path)
    row = ne[0] if ne else 1  # ref: gguf.cpp: a missing dimension is 1
    if row % block:
        raise _corrupt(f"tensor {name} rows of {row} are not a whole number of {qtype.name} blocks", cur.path)
    n = 1
    for d in ne:
        n *= d
    return TensorInfo(name, ne, int(qtype), offset, n // block * type_size, cur.path)


def _check_layout(tensors: list[TensorInfo], data_offset: int, alignment: int, size: int, path: Path) -> None:
    """Unique names; each tensor's data where llama.cpp expects it (right after the previous one,
    padded to the alignment: ref gguf.cpp "tensor '%s' has offset %d, expected %zu") and inside the file."""
    seen: set[str] = set()
    expected = 0
    for t in tensors:
        if t.name in seen:
            raise _corrupt(f"tensor {t.name} is stored twice", path)
        seen.add(t.name)
        if t.offset != expected:
            raise _corrupt(f"tensor {t.name} has data offset {t.offset}, expected {expected}", path)
        end = data_offset + t.offset + t.nbytes
        if end > size:
            raise _corrupt(
                f"tensor {t.name} ({t.nbytes} bytes at offset {data_offset + t.offset}) "
                f"ends past the end of the file ({size} bytes)",
                path,
            )
        expected = t.offset + -(-t.nbytes // alignment) * alignment


def _placed(t: TensorInfo, data_offset: int) -> TensorInfo:
    return TensorInfo(t.name, t.ne, t.qtype, data_offset + t.offset, t.nbytes, t.path)


_MISSING: Any = object()
MAX_INT = (1 << 63) - 1


def _bounds(lo: float, hi: float, top: float) -> str:
    return f"must be at least {lo}" if hi == top else f"must be in [{lo}, {hi}]"


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"a bool ({value})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value})"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    if isinstance(value, np.ndarray):
        return f"an array of {len(value)} {value.dtype}"
    return f"an array of {len(value)} strings or arrays"


class Metadata:
    """Typed access to a header's values: each getter names the key and the file when the value is
    missing (and has no default), of another type than the key's, or out of its bounds."""

    def __init__(self, header: Header):
        self.values, self.path = header.values, header.path

    def has(self, key: str) -> bool:
        return key in self.values

    def raw(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def _value(self, key: str, default: Any) -> tuple[bool, Any]:
        """(found, value): the default when absent, an error when absent without one."""
        if key in self.values:
            return True, self.values[key]
        if default is _MISSING:
            raise InputError(f"GGUF metadata has no {key}", self.path)
        return False, default

    def _wrong(self, key: str, value: Any, expected: str) -> InputError:
        return InputError(f"metadata {key} is {_describe(value)}, expected {expected}", self.path)

    def integer(self, key: str, default: Any = _MISSING, lo: int = 0, hi: int = MAX_INT) -> int:
        found, value = self._value(key, default)
        if not found:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(key, value, "an integer")
        if not lo <= value <= hi:
            raise InputError(f"metadata {key} is {value}, {_bounds(lo, hi, MAX_INT)}", self.path)
        return value

    def number(self, key: str, default: Any = _MISSING, lo: float = -np.inf, hi: float = np.inf) -> float:
        found, value = self._value(key, default)
        if not found:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._wrong(key, value, "a number")
        if not (np.isfinite(value) and lo <= value <= hi):
            raise InputError(f"metadata {key} is {value}, {_bounds(lo, hi, np.inf)}", self.path)
        return float(value)

    def text(self, key: str, default: Any = _MISSING) -> str:
        found, value = self._value(key, default)
        if found and not isinstance(value, str):
            raise self._wrong(key, value, "a string")
        return value

    def flag(self, key: str, default: Any = _MISSING) -> bool:
        found, value = self._value(key, default)
        if found and not isinstance(value, bool):
            raise self._wrong(key, value, "a bool")
        return value

    def strings(self, key: str, default: Any = _MISSING) -> list[str]:
        found, value = self._value(key, default)
        # set(map(type, ...)): the 262144 pieces of Gemma 3 in a few ms (a generator takes ten times longer)
        if found and not (isinstance(value, list) and set(map(type, value)) <= {str}):
            raise self._wrong(key, value, "an array of strings")
        return value

    def numbers(self, key: str, default: Any = _MISSING, integer: bool = False) -> np.ndarray:
        found, value = self._value(key, default)
        kinds = "iu" if integer else "iuf"
        if found and not (isinstance(value, np.ndarray) and value.dtype.kind in kinds):
            raise self._wrong(key, value, "an array of integers" if integer else "an array of numbers")
        return value
