"""A cache of the reference's log-probabilities, computed once per (reference, corpus, protocol).

Many artifacts are validated against one reference; the fp32 reference forward pass (layer-streamed,
validation/streamed.py: one decoder layer in memory at a time) and the tokenization of the corpus are
then done once and kept in ``DIR/ref-<16 hex>.gpref``, where the hex
is the start of the sha256 of the cache key (``cache_key``): the reference folder's files (name, size,
mtime_ns) and config.json's sha256, the sha256 of the evaluation text actually used, n_ctx, the
windows asked, the reference runtime's name, the torch and transformers versions and this format's
version and encoding constants.

The format follows llama-perplexity's KL-divergence base file (ref: llama.cpp
tools/perplexity/perplexity.cpp, kl_divergence() and log_softmax(): per token a float scale and min and
the log-probs as uint16 codes), but exact where the scores need it. For every scored token (positions
n_ctx//2 .. n_ctx-2 of each window, validation.metrics.scored_span):

- exact float64 statistics of the float64 log-softmax (validation.metrics.RefStats): the target's NLL,
  the negentropy sum_v p_v lr_v, the argmax and the log-normaliser. They are stored once per "cut" of
  the vocabulary: the full one, and the tokenizer's pieces when the model has padding rows past them
  (a llama.cpp GGUF drops those; validation.metrics.scored_vocab).
- the distribution: the raw float32 log-probs of every entry with p >= EXACT_MIN_P (at most
  EXACT_CAP, the most probable), and all others as uint16 codes between a per-token float32 min and
  scale (codes over the tail's own range, at most TAIL_RANGE nats deep; lower values are coded as the
  min, and code 65535 means no mass, -inf).
- sum_v p_v lr_v with p the decoded rows' distribution (decoded in float64 as ``code * scale + min`` and
  renormalised, exactly as the scorer reads them: ``decode_rows``) and lr the exact log-probs, and the
  decoded rows' log-normaliser (validation.metrics.decoded_stats).

Error analysis. ppl, delta-ppl and top-1 use only the exact NLL and argmax: identical to a live run.
The KL is scored as sum_v p_v lr_v - sum_v p_v lc_v with the stored first term
(validation.metrics.score_rows): sum_v p_v (lr_v - lc_v) with p decoded. Tail codes are off by d_v,
|d_v| <= step/2, step = tail range / 65534 (5e-4 to 7e-4 nats on the demo model), which moves p_v by
about p_v d_v; the error is sum_tail p_v d_v (lr_v - lc_v), weighted by the small log-ratio of the two
models, and exactly 0 for a candidate whose rows are the reference's. Format 3 stored the negentropy of
the decoded rows instead, which adds KL(decoded || reference) to every candidate's figure: about 1e-11
per token on the demo model, small beside a quantized artifact's KLD but the whole of a float32
conversion's, and 1.4e-11 for a bit-identical copy. Pairing the decoded cross term with the EXACT
negentropy would leave sum_tail p_v d_v lc_v, with lc_v about -25: far worse. Measured on the demo
model (gemma-3-270m-offgrid, 4 windows of 512, 1020 tokens; the tail, p < 1e-6, holds 0.25 % of the mass
per token on average, at most 1.3 %; about 2500 exact entries per token, the cap of 4096 reached on
some), cached against live (whole-model reference):

  candidate                      live KLD     format 4     format 3
  HF f32 copy of the reference   0            0            1.4e-11
  ONNX f32                       8.104e-12    8.097e-12    3.292e-11
  GGUF F16, Q8_0, Q4_K_M         every printed digit the same in both formats (1.392e-06, 0.004086, 0.087198)

File layout (little-endian): MAGIC, uint64 header length, uint32 crc32 of header and window table, the
JSON header, the window table (per window: uint64 offset, uint64 length, uint32 crc32), then each
window's block (``_encode_window``). A file is written under a temporary name, fsynced and renamed
(gemport.output.atomic_output), window by window. A file whose header, key, length or any window's
crc32 is wrong is logged as a warning saying why and recomputed, never used.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from gemport.errors import CheckpointError, GemportError, InputError, OutputError
from gemport.output import atomic_output
from gemport.progress import progress, stage
from validation.corpus import load_text, split_text, tokenize, windows
from validation.metrics import (
    ROWS_PER_CHUNK_ELEMENTS,
    RefStats,
    decoded_stats,
    reference_stats,
    scored_span,
    work_buffer,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MAGIC = b"GPREF\x00\x00\x01"
VERSION = 4
EXACT_MIN_P = 1e-6  # entries at least this probable are stored as their float32 values
EXACT_CAP = 4096  # at most this many per token (the most probable)
TAIL_RANGE = 64.0  # nats below the tail's largest value that the codes reach; e^-64 of 1e-6 is nothing
NO_MASS = 65535  # the code of -inf (p = 0)
_PREFIX = struct.Struct("<8sQI")
_TABLE_ENTRY = struct.Struct("<QQI")
_MAX_HEADER = 1 << 30
_VERIFY_BLOCK = 1 << 24


# --- the key ------------------------------------------------------------------------------------------


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def reference_fingerprint(reference: Path, cache_dir: Path | None = None) -> dict:
    """Every file of the reference folder (relative name, size, mtime_ns) and config.json's sha256; files
    under ``cache_dir`` do not count (a cache kept inside the reference folder)."""
    skip = cache_dir.resolve() if cache_dir is not None else None
    files = []
    for path in sorted(p for p in reference.rglob("*") if p.is_file()):
        if skip is not None and path.resolve().is_relative_to(skip):
            continue
        st = path.stat()
        files.append([path.relative_to(reference).as_posix(), st.st_size, st.st_mtime_ns])
    try:
        config = hashlib.sha256((reference / "config.json").read_bytes()).hexdigest()
    except OSError as exc:
        raise CheckpointError(f"cannot read config.json: {exc.strerror}", reference) from None
    return {"files": files, "config_sha256": config}


def cache_key(reference: Path, evaluation: str, n_ctx: int, n_windows: int, cache_dir: Path | None = None) -> dict:
    from validation import streamed

    return {
        "format": VERSION,
        "encoding": {"exact_min_p": EXACT_MIN_P, "exact_cap": EXACT_CAP, "tail_range": TAIL_RANGE},
        "reference": reference_fingerprint(reference, cache_dir),
        "corpus_sha256": hashlib.sha256(evaluation.encode("utf-8")).hexdigest(),
        "n_ctx": n_ctx,
        "n_windows": n_windows,
        "runtime": streamed.NAME,
        "torch": _package_version("torch"),
        "transformers": _package_version("transformers"),
    }


def default_dir() -> Path:
    """Where ``gemport validate`` keeps reference caches unless told: $GEMPORT_CACHE_DIR/reference, else
    $XDG_CACHE_HOME/gemport/reference, else ~/.cache/gemport/reference (the XDG base directory rule)."""
    if os.environ.get("GEMPORT_CACHE_DIR"):
        return Path(os.environ["GEMPORT_CACHE_DIR"]) / "reference"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gemport" / "reference"


def cache_path(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return Path(cache_dir) / f"ref-{digest[:16]}.gpref"


# --- one window's block -------------------------------------------------------------------------------


def _layout(rows: int, vocab: int, cuts: int) -> list[tuple[str, type, tuple[int, ...]]]:
    """The fixed-size arrays of a window's block, in order: (name, dtype, shape); then the exact entries'
    int32 indices and float32 values, ``counts.sum()`` of each."""
    return [
        # per cut: exact nll, negentropy, log_norm; then sum p lr (p of the decoded rows, lr exact) and the
        # decoded rows' log_norm (metrics.decoded_stats)
        ("stats", np.float64, (cuts, 5, rows)),
        ("top", np.int32, (cuts, rows)),
        ("counts", np.int32, (rows,)),  # exact entries per row
        ("lo_scale", np.float32, (2, rows)),
        ("codes", np.uint16, (rows, vocab)),
    ]


def _exact_mask(x: torch.Tensor, log_norm: np.ndarray) -> torch.Tensor:
    """[rows, vocab] bool: per row the entries with p >= EXACT_MIN_P, the EXACT_CAP most probable of them.

    ``x - log_norm >= log(EXACT_MIN_P)`` is tested in float32 against the smallest float32 at or above
    ``log_norm + log(EXACT_MIN_P)`` (the same entries, give or take one at a float64 rounding of the
    boundary), and the rows over the cap keep their EXACT_CAP largest in one batched topk."""
    import torch

    bound = np.asarray(log_norm, dtype=np.float64) + np.log(EXACT_MIN_P)
    bound32 = bound.astype(np.float32)
    bound32 = np.where(bound32 < bound, np.nextafter(bound32, np.float32(np.inf)), bound32)
    probable = x >= torch.from_numpy(bound32)[:, None]
    over = torch.nonzero(probable.sum(dim=1) > EXACT_CAP)[:, 0]
    if len(over):
        keep = torch.topk(x[over].masked_fill_(~probable[over], -np.inf), EXACT_CAP, dim=1).indices
        probable[over] = torch.zeros((len(over), x.shape[1]), dtype=torch.bool).scatter_(1, keep, True)
    return probable


def _encode_rows(raw: np.ndarray, log_norm: np.ndarray) -> tuple[np.ndarray, ...]:
    """(counts, lo_scale, codes, index, value) of raw float32 log-prob rows (log_norm: their float64
    log-normaliser): the probable entries exactly, the tail as codes of the tail's own range. float32
    arithmetic throughout, as numpy would do it element by element."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
    exact = _exact_mask(x, log_norm)
    rows, index = exact.nonzero(as_tuple=True)  # row-major: each row's indices sorted
    tail = x.masked_fill(exact, -np.inf)  # the exact entries are no part of the tail's range
    hi = tail.amax(dim=1)
    lo = tail.masked_fill_(torch.isneginf(tail), np.inf).amin(dim=1)
    del tail
    hi = torch.where(torch.isfinite(hi), hi, 0.0)  # no tail: any range will do
    lo = torch.maximum(torch.where(torch.isfinite(lo), lo, hi), hi - TAIL_RANGE)
    scale = (hi - lo) / (NO_MASS - 1)
    step = torch.where(scale > 0, scale, 1.0)[:, None]
    codes = x.clamp(lo[:, None], hi[:, None]).sub_(lo[:, None]).div_(step).round_().clamp_(0, NO_MASS - 1)
    codes.masked_fill_(torch.isneginf(x), NO_MASS).masked_fill_(exact, 0)  # exact ones: overwritten on decoding
    return (
        torch.bincount(rows, minlength=len(x)).to(torch.int32).numpy(),  # a bool row sum is slower
        torch.stack([lo, scale]).numpy(),
        codes.numpy().astype(np.uint16),  # whole numbers 0 .. NO_MASS in float32: exact
        index.to(torch.int32).numpy(),
        x[rows, index].numpy(),
    )


def _encode_window(raw: np.ndarray, targets: np.ndarray, cuts: list[int]) -> bytes:
    """The block of one window from the reference's raw float32 log-probs [scored, vocab] of its scored
    rows, a chunk of rows at a time (float64 work arrays of at most 128 MiB)."""
    import torch

    rows, vocab = raw.shape
    step = max(1, ROWS_PER_CHUNK_ELEMENTS // vocab)
    stats, tops, encoded = [], [], []
    for i in range(0, rows, step):
        chunk, t = raw[i : i + step], targets[i : i + step]
        exact = [reference_stats(chunk[:, :cut], t) for cut in cuts]
        parts = _encode_rows(chunk, exact[0].log_norm)
        arrays = dict(zip(("counts", "lo_scale", "codes", "index", "value"), parts, strict=True))
        decoded = decode_rows(arrays, out=work_buffer("decoded", len(chunk), vocab))
        raw64 = work_buffer("raw", len(chunk), vocab).copy_(torch.from_numpy(np.ascontiguousarray(chunk)))
        pairs = zip(cuts, exact, strict=True)
        of_decoded = [decoded_stats(decoded[:, :cut], raw64[:, :cut], e.log_norm) for cut, e in pairs]  # the KL's
        pairs = zip(exact, of_decoded, strict=True)
        stats.append([[e.nll, e.negentropy, e.log_norm, *d] for e, d in pairs])
        tops.append([e.top for e in exact])
        encoded.append(parts)
    arrays = {
        "stats": np.concatenate(stats, axis=2),
        "top": np.concatenate(tops, axis=1),
        "counts": np.concatenate([e[0] for e in encoded]),
        "lo_scale": np.concatenate([e[1] for e in encoded], axis=1),
        "codes": np.concatenate([e[2] for e in encoded]),
    }
    fixed = [np.ascontiguousarray(arrays[name], dtype=dt).tobytes() for name, dt, _ in _layout(rows, vocab, len(cuts))]
    index = np.concatenate([e[3] for e in encoded]).astype(np.int32)
    value = np.concatenate([e[4] for e in encoded]).astype(np.float32)
    return b"".join([*fixed, index.tobytes(), value.tobytes()])


def _decode_window(block: bytes, rows: int, vocab: int, cuts: int) -> dict[str, np.ndarray]:
    """The arrays of a block; ValueError when its size or counts disagree with the layout."""
    out, pos = {}, 0
    for name, dt, shape in _layout(rows, vocab, cuts):
        n = int(np.prod(shape))
        if len(block) < pos + n * np.dtype(dt).itemsize:
            raise ValueError(f"block of {len(block)} bytes ends inside its {name}")
        out[name] = np.frombuffer(block, dtype=dt, count=n, offset=pos).reshape(shape)
        pos += n * np.dtype(dt).itemsize
    counts = out["counts"]
    if counts.min(initial=0) < 0 or counts.max(initial=0) > min(EXACT_CAP, vocab):
        raise ValueError("exact-entry counts out of range")
    exact = int(counts.sum())
    if len(block) != pos + exact * 8:
        raise ValueError(f"block of {len(block)} bytes, its layout needs {pos + exact * 8}")
    out["index"] = np.frombuffer(block, dtype=np.int32, count=exact, offset=pos)
    out["value"] = np.frombuffer(block, dtype=np.float32, count=exact, offset=pos + exact * 4)
    if exact and (out["index"].min() < 0 or out["index"].max() >= vocab):
        raise ValueError("exact-entry index out of range")
    return out


def decode_rows(
    arrays: dict[str, np.ndarray], start: int = 0, stop: int | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """float64 [stop - start, vocab] raw log-probs of rows start .. stop - 1: codes decoded in float64,
    ``code * scale + min`` (what the statistics of the decoded rows are computed from), -inf for NO_MASS,
    the exact float32 entries written over them; into ``out`` (a float64 tensor of that shape) if given."""
    import torch

    counts = np.asarray(arrays["counts"], dtype=np.int64)
    stop = len(counts) if stop is None else stop
    lo, scale = (torch.from_numpy(np.array(a[start:stop], dtype=np.float64))[:, None] for a in arrays["lo_scale"])
    codes = torch.from_numpy(np.require(arrays["codes"][start:stop], requirements=["C", "W"]))  # read-only: copied
    raw = (torch.empty(codes.shape, dtype=torch.float64) if out is None else out).copy_(codes).mul_(scale).add_(lo)
    empty = codes == NO_MASS
    if empty.any():
        raw.masked_fill_(empty, -np.inf)
    first, last = int(counts[:start].sum()), int(counts[:stop].sum())
    rows = torch.from_numpy(np.repeat(np.arange(stop - start), counts[start:stop]))
    index = torch.from_numpy(np.asarray(arrays["index"][first:last], dtype=np.int64))
    raw[rows, index] = torch.from_numpy(np.array(arrays["value"][first:last], dtype=np.float64))
    return raw


# --- the file -----------------------------------------------------------------------------------------


class InvalidCache(Exception):
    """The file cannot be used; the message says why."""


@dataclass
class RefCache:
    """An opened, checked cache file: its header and window table."""

    path: Path
    header: dict
    table: list[tuple[int, int, int]]

    @property
    def windows(self) -> list[list[int]]:
        return self.header["windows"]

    @property
    def cuts(self) -> list[int]:
        return self.header["cuts"]

    def window(self, i: int, vocab: int) -> tuple[RefStats, Callable[[int, int], torch.Tensor], int]:
        """Window ``i`` over the first ``vocab`` rows (one of ``cuts``): its exact statistics, a function
        giving its float64 raw log-probs of rows start .. stop - 1 (``decode_rows``), and its row count.
        InvalidCache when the window's crc32 or layout is wrong (checked here on every read)."""
        offset, length, crc = self.table[i]
        block = bytearray(length)  # writable, so the arrays over it can be handed to torch as they are
        with open(self.path, "rb") as f:
            f.seek(offset)
            got = f.readinto(block)
        if got != length or zlib.crc32(block) != crc:
            raise InvalidCache(f"window {i} crc32 mismatch")
        rows = scored_span(self.header["key"]["n_ctx"])[1]
        try:
            arrays = _decode_window(block, rows, self.header["vocab"], len(self.cuts))
        except ValueError as exc:
            raise InvalidCache(f"window {i} is malformed: {exc}") from None
        c = self.cuts.index(vocab)
        nll, _, _, negentropy, log_norm = arrays["stats"][c]  # the KL from the decoded rows (module docstring)
        stats = RefStats(nll, negentropy, arrays["top"][c].astype(np.int64), log_norm)
        width = self.header["vocab"]

        def rows(start: int, stop: int) -> torch.Tensor:  # decoded into a reused buffer, consumed at once
            return decode_rows(arrays, start, stop, work_buffer("ref", stop - start, width))[:, :vocab]

        return stats, rows, len(arrays["counts"])


def open_cache(path: Path, key: dict, verify: bool = True) -> RefCache:
    """The cache at ``path`` once its header, key, length and (``verify``) every window's crc32 check out;
    InvalidCache saying why not."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size:
                raise InvalidCache(f"truncated: {size} bytes")
            magic, header_len, header_crc = _PREFIX.unpack(prefix)
            if magic != MAGIC:
                raise InvalidCache("not a gemport reference cache (wrong magic)")
            if header_len > min(size, _MAX_HEADER):
                raise InvalidCache(f"truncated: header of {header_len} bytes in a file of {size}")
            raw_header = f.read(header_len)
            header = _parse_header(raw_header, key)
            raw_table = f.read(_TABLE_ENTRY.size * len(header["windows"]))
            if zlib.crc32(raw_table, zlib.crc32(raw_header)) != header_crc:
                raise InvalidCache("header crc32 mismatch")
            table = [e for e in _TABLE_ENTRY.iter_unpack(raw_table)]
            _check_table(table, f.tell(), size)
            if verify:
                for i, (offset, length, crc) in enumerate(table):
                    if _crc_of(f, offset, length) != crc:
                        raise InvalidCache(f"window {i} crc32 mismatch")
    except OSError as exc:
        raise InvalidCache(f"unreadable: {exc.strerror}") from None
    return RefCache(path, header, table)


def _parse_header(raw: bytes, key: dict) -> dict:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise InvalidCache("header is not JSON") from None
    if not isinstance(header, dict) or header.get("version") != VERSION:
        raise InvalidCache(f"format version {header.get('version') if isinstance(header, dict) else None}")
    if header.get("key") != key:
        stored = header.get("key") if isinstance(header.get("key"), dict) else {}
        differ = sorted(k for k in set(key) | set(stored) if key.get(k) != stored.get(k))
        raise InvalidCache(f"made for another {', '.join(differ) or 'key'}")
    _check_fields(header, key["n_ctx"])
    return header


def _is_ids(x, length: int | None = None) -> bool:
    ok = isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in x)
    return ok and (length is None or len(x) == length)


def _check_fields(header: dict, n_ctx: int) -> None:
    """InvalidCache unless the header's fields have the types and sizes the reader relies on."""
    vocab, cuts, wins = header.get("vocab"), header.get("cuts"), header.get("windows")
    if not (isinstance(vocab, int) and vocab > 0 and _is_ids(cuts) and cuts and cuts[0] == vocab):
        raise InvalidCache("header: bad vocab or cuts")
    if not (isinstance(wins, list) and wins and all(_is_ids(w, n_ctx) for w in wins)):
        raise InvalidCache(f"header: windows are not lists of {n_ctx} token ids")
    if not (_is_ids(header.get("sample_ids")) and _is_ids([header.get("bos"), header.get("pieces")])):
        raise InvalidCache("header: bad sample ids, BOS or pieces")
    if not isinstance(header.get("reference_runtime"), str):
        raise InvalidCache("header: no reference runtime name")


def _check_table(table: list[tuple[int, int, int]], start: int, size: int) -> None:
    for i, (offset, length, _) in enumerate(table):
        if offset != start:
            raise InvalidCache(f"window {i} at byte {offset}, expected {start}")
        start += length
    if start != size:
        raise InvalidCache(f"truncated: {size} bytes, its window table needs {start}" if size < start else "too long")


def _crc_of(f, offset: int, length: int) -> int:
    f.seek(offset)
    crc = 0
    while length > 0:
        data = f.read(min(length, _VERIFY_BLOCK))
        if not data:
            break
        crc, length = zlib.crc32(data, crc), length - len(data)
    return crc


def write_cache(path: Path, key: dict, reference: Path, evaluation: str, n_ctx: int, n_windows: int) -> None:
    """Tokenize, run the reference over every window (layer-streamed: validation/streamed.py) and write the
    cache, window by window."""
    from validation.streamed import StreamedReference
    from validation.validate import TOKENIZER_CHECK_CHARS, load_tokenizer

    with stage(f"tokenizing the evaluation text with {reference.name}'s tokenizer"):
        tokenizer = load_tokenizer(reference, "reference")
        if tokenizer.bos_token_id is None:
            raise CheckpointError("the reference tokenizer has no BOS token", reference)
        chunks = windows(tokenize(tokenizer, evaluation), n_ctx, n_windows, tokenizer.bos_token_id)
        sample_ids = tokenize(tokenizer, evaluation[:TOKENIZER_CHECK_CHARS])
    with stage(f"opening the reference {reference.name}"):
        rt = StreamedReference(reference)
    pieces = int(tokenizer.vocab_size)
    top = max(max(c) for c in chunks)
    if top >= rt.vocab_size:
        raise CheckpointError(f"the tokenizer yields id {top}, beyond the vocab of {rt.vocab_size}", reference)
    header = {
        "magic": "gemport reference log-probs",
        "version": VERSION,
        "key": key,
        "vocab": rt.vocab_size,
        "pieces": pieces,
        # stats over the pieces too when the model has padding rows past them (validation.metrics.scored_vocab)
        "cuts": [rt.vocab_size] + ([pieces] if top < pieces < rt.vocab_size else []),
        "bos": tokenizer.bos_token_id,
        "reference_runtime": rt.name,
        "windows": chunks,
        "sample_ids": sample_ids,
    }
    raw_header = json.dumps(header, separators=(",", ":")).encode("utf-8")
    first, count = scored_span(n_ctx)
    table = []
    with atomic_output(path, overwrite=True) as tmp, open(tmp, "wb") as f:
        f.write(_PREFIX.pack(MAGIC, len(raw_header), 0) + raw_header + b"\0" * (_TABLE_ENTRY.size * len(chunks)))
        with progress(f"reference log-probs of {reference.name}", total=len(chunks), unit="windows") as advance:
            for chunk, raw in zip(chunks, rt.scored_logits(chunks, first, count), strict=True):
                if not float(raw.max()) < np.inf:  # NaN or +inf (numpy's max propagates NaN)
                    raise CheckpointError("the reference's log-probs are not finite (NaN or +inf)", reference)
                block = _encode_window(raw, np.asarray(chunk[first + 1 :], dtype=np.int64), header["cuts"])
                table.append((f.tell(), len(block), zlib.crc32(block)))
                f.write(block)
                del raw, block
                advance()
        raw_table = b"".join(_TABLE_ENTRY.pack(*e) for e in table)
        f.seek(_PREFIX.size + len(raw_header))
        f.write(raw_table)
        f.seek(0)
        f.write(_PREFIX.pack(MAGIC, len(raw_header), zlib.crc32(raw_table, zlib.crc32(raw_header))))
    del rt
    gc.collect()


class PreparedCache(NamedTuple):
    path: Path
    computed: bool  # computed now (missing or invalid before)
    key: dict  # cache_key's value
    evaluation: str  # the evaluation text it holds the windows of


def prepare_cache(
    reference: str | Path,
    corpus: str | Path | None,
    n_ctx: int,
    n_windows: int,
    cache_dir: str | Path,
    verify: bool = True,
) -> PreparedCache:
    """The cache file (and whether it was computed now, its key and the evaluation text it was made from):
    an existing valid file is reused; a missing one is
    computed; an invalid one is logged as a warning and recomputed. Without ``verify`` the windows' crc32s
    are left to ``RefCache.window``, which checks each window as it reads it (validate reads the file once
    instead of twice, and recomputes it when a window turns out damaged: ``recompute``)."""
    reference = Path(reference)
    for folder in (Path(cache_dir), *Path(cache_dir).parents):  # the first one that exists must be a folder
        if folder.exists():
            if not folder.is_dir():
                raise OutputError(f"is not a folder, so the reference cache {cache_dir} cannot be made", folder)
            break
    evaluation = split_text(load_text(corpus))[0]
    key = cache_key(reference, evaluation, n_ctx, n_windows, Path(cache_dir))
    path = cache_path(Path(cache_dir), key)
    if path.is_file():
        try:
            open_cache(path, key, verify)
            log.info("reference log-probs reused from %s", path)
            return PreparedCache(path, False, key, evaluation)
        except InvalidCache as exc:
            recompute(path, key, reference, evaluation, exc)
            return PreparedCache(path, True, key, evaluation)
    elif path.exists():
        raise InputError("the reference cache path exists and is not a file", path)
    write_cache(path, key, reference, evaluation, n_ctx, n_windows)
    return PreparedCache(path, True, key, evaluation)


def recompute(path: Path, key: dict, reference: Path, evaluation: str, why: InvalidCache) -> None:
    """Write the cache at ``path`` again, after a warning saying why the file there cannot be used."""
    log.warning("%s: reference cache not used, recomputing: %s", path, why)
    write_cache(path, key, reference, evaluation, key["n_ctx"], key["n_windows"])


def ensure_cache(
    reference: str | Path, corpus: str | Path | None, n_ctx: int, n_windows: int, cache_dir: str | Path
) -> Path:
    """The cache file of a reference, corpus, ctx and window count in a cache folder, computed when missing
    or invalid: the reference streamed one decoder layer at a time, every window written."""
    return prepare_cache(reference, corpus, n_ctx, n_windows, cache_dir).path


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m validation.refcache", description=ensure_cache.__doc__)
    parser.add_argument("--reference", required=True, type=Path, help="the reference HF checkpoint folder")
    parser.add_argument("--cache", required=True, type=Path, help="the cache folder")
    parser.add_argument("--corpus", type=Path, help="a UTF-8 text file (default: pydoc topics)")
    parser.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--windows", type=int, default=16, help="windows (default 16)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        from validation.validate import _check_options

        _check_options(args.ctx, args.windows, {})
        path, computed, _, _ = prepare_cache(args.reference, args.corpus, args.ctx, args.windows, args.cache)
    except GemportError as exc:
        print(f"gemport: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"{path} ({'computed now' if computed else 'reused'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
