"""Hostile and inconsistent GGUF files: every one is refused with one line on stderr naming the
file, exit 2, fast and in bounded memory (converters/gguf_header.py, converters/gguf_checks.py).
Plus Gemma 3's padded vocabulary: written as llama.cpp writes it and proven in llama.cpp.

Header cases are crafted byte by byte here (layout: ggml docs/gguf.md); each huge-count case runs
the CLI in a subprocess under a 2 GB address-space limit, so a reader that believed the count
would die there instead of passing. Truncation and metadata cases edit a real tiny GGUF written
by gemport's own writer, and run in-process under tracemalloc.
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest

from converters.gguf_header import MAX_DEPTH, read_header
from gemport.cli import main
from gemport.errors import InputError
from tests.tiny import make_tiny

ROOT = Path(__file__).resolve().parents[1]
T = gguf.GGUFValueType
U8, U32, I32, F32, BOOL, STR, ARR, U64 = 0, 4, 5, 6, 7, 8, 9, 10
GB = 1 << 30
PEAK_BYTES = 64 << 20  # Python-side allocations of one in-process refusal


# --- crafting GGUF bytes --------------------------------------------------------------------


def _s(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def _kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _arr(itype: int, n: int, payload: bytes = b"") -> bytes:
    return struct.pack("<IQ", itype, n) + payload


def _tensor(
    name: str | bytes, ne: tuple[int, ...], qtype: int = 0, offset: int = 0, n_dims: int | None = None
) -> bytes:
    dims = b"".join(struct.pack("<Q", d) for d in ne)
    return (
        _s(name) + struct.pack("<I", len(ne) if n_dims is None else n_dims) + dims + struct.pack("<IQ", qtype, offset)
    )


ARCH = _kv("general.architecture", STR, _s("gemma3"))


def _gguf(kvs=(ARCH,), tensors=(), version=3, n_kv=None, n_tensors=None, tail=b"\0" * 64) -> bytes:
    n_t = len(tensors) if n_tensors is None else n_tensors
    head = b"GGUF" + struct.pack("<IQQ", version, n_t, len(kvs) if n_kv is None else n_kv)
    return head + b"".join(kvs) + b"".join(tensors) + tail


def _nested(depth: int) -> bytes:
    """An array of arrays ``depth`` levels deep, holding one uint8 at the bottom."""
    inner = _arr(U8, 1, b"\x07")
    for _ in range(depth - 1):
        inner = _arr(ARR, 1, inner)
    return inner


HUGE = 1 << 40
CRAFTED: dict[str, tuple[bytes, str]] = {
    # counts and lengths far past the bytes in the file, in every position
    "kv-count": (_gguf(n_kv=HUGE), "metadata count claims 1099511627776 entries"),
    "kv-count-max": (_gguf(n_kv=(1 << 64) - 1), "metadata count claims"),
    "tensor-count": (_gguf(n_tensors=HUGE), "tensor count claims"),
    "key-length": (_gguf([struct.pack("<Q", HUGE) + b"k"]), "metadata key 0 claims 1099511627776 bytes"),
    "key-past-end": (_gguf([struct.pack("<Q", 1000) + b"k"]), "metadata key 0 needs 1000 bytes"),
    "string-length": (_gguf([ARCH, _kv("general.name", STR, struct.pack("<Q", HUGE))]), "metadata general.name"),
    "u8-array": (_gguf([ARCH, _kv("tokenizer.ggml.scores", ARR, _arr(U8, HUGE))]), "needs 1099511627776 bytes"),
    "f32-array": (_gguf([ARCH, _kv("tokenizer.ggml.scores", ARR, _arr(F32, 17))]), "scores needs 68 bytes"),
    "string-array": (_gguf([ARCH, _kv("tokenizer.ggml.tokens", ARR, _arr(STR, HUGE))]), "tokenizer.ggml.tokens"),
    "string-in-array": (
        _gguf([ARCH, _kv("tokenizer.ggml.tokens", ARR, _arr(STR, 2, _s("a") + struct.pack("<Q", HUGE)))]),
        "element 1 of metadata tokenizer.ggml.tokens",
    ),
    "array-of-arrays": (_gguf([ARCH, _kv("x.nested", ARR, _arr(ARR, HUGE))]), "metadata x.nested claims"),
    "nested-too-deep": (_gguf([ARCH, _kv("x.nested", ARR, _nested(MAX_DEPTH + 1))]), "nests arrays more than"),
    "tensor-name-length": (_gguf(tensors=[struct.pack("<Q", HUGE)]), "name of tensor 0 claims"),
    "tensor-n-dims": (_gguf(tensors=[_tensor("t", (4,), n_dims=0xFFFFFFFF)]), "more than ggml's 4"),
    "tensor-dims-product": (_gguf(tensors=[_tensor("t", (HUGE, HUGE))]), "ends past the end of the file"),
    "tensor-negative-dim": (_gguf(tensors=[_tensor("t", (1 << 63,))]), "negative dimension"),
    "tensor-offset": (_gguf(tensors=[_tensor("t", (4,), offset=HUGE)]), "has data offset 1099511627776, expected 0"),
    # wrong types, names and values in the structure
    "magic": (b"GGUX" + _gguf()[4:], "not a GGUF file"),
    "version-1": (_gguf(version=1), "GGUF version 1 is not supported"),
    "version-4": (_gguf(version=4), "GGUF version 4 is not supported"),
    "big-endian": (_gguf(version=3 << 24), "big-endian GGUF"),
    "short": (b"GGUF\x03\0\0\0", "a GGUF header needs at least 24"),
    "empty": (b"", "a GGUF header needs at least 24"),
    "empty-key": (_gguf([_kv("", U8, b"\0")]), "metadata key 0 is empty"),
    "duplicate-key": (_gguf([ARCH, ARCH]), "general.architecture appears twice"),
    "key-not-utf8": (_gguf([_kv(b"\xff\xfe", U8, b"\0")]), "is not UTF-8"),
    "value-type": (_gguf([_kv("x.y", 13, b"\0" * 8)]), "metadata x.y has unknown value type 13"),
    "array-type": (_gguf([_kv("x.y", ARR, _arr(200, 1, b"\0"))]), "array of unknown value type 200"),
    "alignment-type": (_gguf([ARCH, _kv("general.alignment", STR, _s("32"))]), "general.alignment is a string"),
    "alignment-zero": (_gguf([ARCH, _kv("general.alignment", U32, struct.pack("<I", 0))]), "not a power of two"),
    "alignment-odd": (_gguf([ARCH, _kv("general.alignment", U32, struct.pack("<I", 24))]), "not a power of two"),
    "tensor-type": (_gguf(tensors=[_tensor("t", (4,), qtype=99)]), "unknown ggml type 99"),
    "tensor-blocks": (_gguf(tensors=[_tensor("t", (33,), qtype=8)]), "not a whole number of Q8_0 blocks"),
    "tensor-name-long": (_gguf(tensors=[_tensor("t" * 64, (4,))]), "claims 64 bytes"),
    "tensor-twice": (_gguf(tensors=[_tensor("t", (8,)), _tensor("t", (8,), offset=32)]), "tensor t is stored twice"),
    # structurally sound, but not a Gemma GGUF gemport can use
    "arch-int": (_gguf([_kv("general.architecture", U32, struct.pack("<I", 3))]), "expected a string"),
    "no-tokens": (_gguf(), "GGUF metadata has no tokenizer.ggml.tokens"),
    "empty-tokens": (_gguf([ARCH, _kv("tokenizer.ggml.tokens", ARR, _arr(STR, 0))]), "tokens is empty"),
}


@pytest.fixture(scope="module")
def crafted_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crafted")
    for name, (data, _) in CRAFTED.items():
        (root / f"{name}.gguf").write_bytes(data)
    return root


def _run_capped(path: Path, *command: str) -> tuple[int, str, float]:
    """``gemport COMMAND PATH`` in a subprocess limited to 2 GB of address space."""
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30)); "
        "from gemport.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    start = time.monotonic()
    cmd = [sys.executable, "-c", code, *(command or ("inspect", "--from", "gguf")), str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    return done.returncode, done.stderr, time.monotonic() - start


def _one_line(err: str, path: Path) -> None:
    assert err.count("\n") == 1 and err.startswith("gemport: error: ") and str(path) in err, err


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_header_refused_in_bounded_memory(crafted_dir, name):
    path = crafted_dir / f"{name}.gguf"
    rc, err, seconds = _run_capped(path)
    assert rc == 2, err
    _one_line(err, path)
    assert CRAFTED[name][1] in err
    assert seconds < 10, f"{seconds:.1f} s"  # well under a second of work; the rest is interpreter start


def test_case_script_file_refused_at_once(tmp_path):
    """The 179-byte file of ../shared/cases/gguf-huge-array.sh: gguf-py's reader grows to 2 GB on it."""
    kv_arr = _kv("tokenizer.ggml.scores", ARR, _arr(U8, 1 << 40))
    path = tmp_path / "huge_array.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + ARCH + kv_arr + b"\0" * 64)
    assert path.stat().st_size == 179
    start = time.monotonic()
    with pytest.raises(InputError) as info:
        read_header(path)
    assert time.monotonic() - start < 0.5
    assert "needs 1099511627776 bytes" in str(info.value) and str(path) in str(info.value)


def test_header_size_is_bounded(tiny_gguf, monkeypatch):
    """A header may not make the reader copy more than MAX_HEADER_BYTES (256 MiB), however large the file."""
    from converters import gguf_header

    monkeypatch.setattr(gguf_header, "MAX_HEADER_BYTES", 4096)
    with pytest.raises(InputError, match="ends past the first 4096 bytes, gemport's bound on a header"):
        read_header(tiny_gguf)


def test_nesting_within_the_bound_is_read(tmp_path):
    path = tmp_path / "nested.gguf"
    path.write_bytes(_gguf([ARCH, _kv("x.nested", ARR, _nested(MAX_DEPTH))]))
    value = read_header(path).values["x.nested"]
    for _ in range(MAX_DEPTH - 1):
        value = value[0]
    assert value.tolist() == [7]


# --- a real tiny GGUF, truncated and edited ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return make_tiny("gemma3", tmp_path_factory.mktemp("hf") / "g3")


@pytest.fixture(scope="module")
def tiny_gguf(tiny_hf, tmp_path_factory) -> Path:
    from converters import gguf_writer, hf

    return gguf_writer.write(hf.read(tiny_hf), tmp_path_factory.mktemp("gguf") / "g3.gguf")


def _inspect(path: Path, capsys) -> tuple[int, str, int]:
    """rc, stderr and the peak of Python allocations of ``gemport inspect PATH`` run in-process."""
    capsys.readouterr()
    tracemalloc.start()
    try:
        rc = main(["inspect", "--from", "gguf", str(path)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return rc, capsys.readouterr().err, peak


def test_header_reader_agrees_with_gguf_py(tiny_gguf):
    """On a sound file the bounded reader reads what gguf-py's GGUFReader reads: every value, every
    tensor's name, shape, type, data offset and bytes."""
    ours, theirs = read_header(tiny_gguf), gguf.GGUFReader(tiny_gguf)
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.values) == list(fields)
    for key, field in fields.items():
        value = ours.values[key]
        got = value.tolist() if isinstance(value, np.ndarray) else value
        assert got == pytest.approx(field.contents()) if isinstance(got, (float, list)) else got == field.contents()
    assert ours.data_offset == theirs.data_offset
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.ne, a.qtype, a.offset) == (
            b.name,
            tuple(int(d) for d in b.shape),
            b.tensor_type,
            b.data_offset,
        )
        assert np.array_equal(a.array(), b.data)


def test_truncated_anywhere(tiny_gguf, tmp_path, capsys):
    """Cut at every 97th byte of the header and at 24 places in the tensor data: each is refused."""
    header = read_header(tiny_gguf)
    end = max(t.offset + t.nbytes for t in header.tensors)
    data = tiny_gguf.read_bytes()
    cuts = [*range(0, header.data_offset, 97), *range(header.data_offset, end, (end - header.data_offset) // 24 + 1)]
    cut = tmp_path / "cut.gguf"
    for n in cuts:
        cut.write_bytes(data[:n])
        rc, err, peak = _inspect(cut, capsys)
        assert rc == 2, (n, err)
        _one_line(err, cut)
        assert "truncated" in err and peak < PEAK_BYTES, (n, err, peak)
    assert len(cuts) > 100


def test_corrupted_header_bytes(tiny_gguf, tmp_path, capsys):
    """Seeded random byte changes in the header: read, or refused in one line; never a traceback."""
    header = read_header(tiny_gguf)
    data = bytearray(tiny_gguf.read_bytes())
    rng = random.Random(0)
    bad = tmp_path / "bad.gguf"
    refused = 0
    # positions in the fixed part, the first keys and the tensor infos (not the token strings,
    # whose changes leave a readable file whose tokenizer takes seconds to rebuild)
    infos_at = data.find(b"token_embd.weight") - 8
    positions = [*range(4, 400), *range(infos_at, header.data_offset)]
    for _ in range(150):
        mutated = bytearray(data)
        for at in rng.sample(positions, 3):
            mutated[at] = rng.choice((0, 0xFF, rng.randrange(256)))
        bad.write_bytes(bytes(mutated))
        rc, err, peak = _inspect(bad, capsys)
        assert rc in (0, 2) and peak < 4 * PEAK_BYTES, err
        if rc == 2:
            _one_line(err, bad)
            refused += 1
    assert refused > 100


def _edit(src: Path, dst: Path, over: dict) -> Path:
    """A copy of ``src`` written by gguf-py with metadata replaced: ``over`` maps a key to a value
    of the key's own type, to (value, GGUFValueType) or (list, ARRAY, item type), or to None (dropped)."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, "gemma3")
    keys = [k for k in r.fields if not k.startswith("GGUF.") and k != "general.architecture"]
    for key in keys + [k for k in over if k not in r.fields]:
        f = r.fields.get(key)
        v = over.get(key, f.contents() if f is not None else None)
        if v is None:
            continue
        if isinstance(v, tuple):
            w.add_key_value(key, v[0], v[1], sub_type=v[2] if len(v) > 2 else None)
        elif f.types[0] == T.ARRAY:
            w.add_key_value(key, v, T.ARRAY, sub_type=f.types[-1])
        else:
            w.add_key_value(key, v, f.types[0])
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


A = "gemma3."
INCONSISTENT: dict[str, tuple[dict, str]] = {
    "heads-0": ({A + "attention.head_count": 0, A + "attention.key_length": None}, "head_count is 0"),
    "kv-heads-0": ({A + "attention.head_count_kv": 0}, "head_count_kv is 0"),
    "heads-not-multiple": ({A + "attention.head_count": 3}, "attn_q.weight has shape"),
    "key-length-0": ({A + "attention.key_length": 0}, "key_length is 0"),
    "key-length-wrong": ({A + "attention.key_length": 24, A + "attention.value_length": 24}, "key_length"),
    "embedding-1e9": ({A + "embedding_length": 10**9}, "token_embd.weight has shape"),
    "ffn-wrong": ({A + "feed_forward_length": 999}, "feed_forward_length"),
    "layers-1e9": ({A + "block_count": 10**9}, "block_count is 1000000000, but the file's tensors hold layers"),
    "layers-0": ({A + "block_count": 0}, "block_count is 0"),
    "layers-fewer": ({A + "block_count": 5}, "block_count is 5"),
    "layers-more": ({A + "block_count": 7}, "block_count is 7"),
    "context-0": ({A + "context_length": 0}, "context_length is 0"),
    "context-huge": ({A + "context_length": (1 << 40, T.UINT64)}, "context_length is 1099511627776"),
    "window-huge": ({A + "attention.sliding_window": (1 << 40, T.UINT64)}, "sliding_window is"),
    "pattern-length": ({A + "attention.sliding_window_pattern": ([True] * 3, T.ARRAY, T.BOOL)}, "has 3 entries"),
    "eps-0": ({A + "attention.layer_norm_rms_epsilon": 0.0}, "layer_norm_rms_epsilon is 0.0"),
    "eps-nan": ({A + "attention.layer_norm_rms_epsilon": float("nan")}, "layer_norm_rms_epsilon is nan"),
    "rope-negative": ({A + "rope.freq_base": -1.0}, "rope.freq_base is -1.0"),
    "bos-past-vocab": ({"tokenizer.ggml.bos_token_id": 999999}, "bos_token_id is 999999, outside the vocabulary"),
    "eos-negative": ({"tokenizer.ggml.eos_token_id": (-1, T.INT32)}, "eos_token_id is -1"),
    "pad-at-vocab": ({"tokenizer.ggml.padding_token_id": 512}, "padding_token_id is 512"),
    "unk-past-vocab": ({"tokenizer.ggml.unknown_token_id": 10**6}, "unknown_token_id is 1000000"),
    "eot-past-vocab": ({"tokenizer.ggml.eot_token_id": (600, T.UINT32)}, "eot_token_id is 600"),
    "scores-short": ({"tokenizer.ggml.scores": [0.0, 1.0]}, "scores has 2 entries, tokenizer.ggml.tokens has 512"),
    "types-long": ({"tokenizer.ggml.token_type": [1] * 513}, "token_type has 513 entries"),
    "types-unknown": ({"tokenizer.ggml.token_type": [9] * 512}, "token type 9"),
    "scores-nan": ({"tokenizer.ggml.scores": [float("nan")] * 512}, "NaN"),
    "tokens-short": (
        {
            "tokenizer.ggml.tokens": ["a", "b", "c", "d"],
            "tokenizer.ggml.scores": None,
            "tokenizer.ggml.token_type": None,
        },
        "token_embd.weight has shape [64, 512] (ne order), but the metadata",
    ),
    "tokens-not-strings": ({"tokenizer.ggml.tokens": (list(range(512)), T.ARRAY, T.UINT32)}, "array of strings"),
    "layers-string": ({A + "block_count": ("6", T.STRING)}, "block_count is a string ('6'), expected an integer"),
    "embedding-float": ({A + "embedding_length": (64.0, T.FLOAT32)}, "embedding_length is a float"),
    "heads-array": ({A + "attention.head_count": ([4] * 6, T.ARRAY, T.UINT32)}, "head_count is an array"),
    "eps-string": ({A + "attention.layer_norm_rms_epsilon": ("1e-6", T.STRING)}, "expected a number"),
    "softcap-string": ({A + "final_logit_softcapping": ("30", T.STRING)}, "final_logit_softcapping is a string"),
    "tokenizer-model-int": ({"tokenizer.ggml.model": (1, T.UINT32)}, "tokenizer.ggml.model is an integer (1)"),
    "add-bos-string": ({"tokenizer.ggml.add_bos_token": ("yes", T.STRING)}, "expected a bool"),
    "split-count-huge": ({"split.count": (10**9, T.UINT32)}, "split.count is 1000000000"),
    "split-count-string": ({"split.count": ("2", T.STRING)}, "split.count is a string"),
    "no-tokens": ({"tokenizer.ggml.tokens": None}, "GGUF metadata has no tokenizer.ggml.tokens"),
}


@pytest.mark.parametrize("name", sorted(INCONSISTENT))
def test_inconsistent_metadata(tiny_gguf, tmp_path, capsys, name):
    over, message = INCONSISTENT[name]
    path = _edit(tiny_gguf, tmp_path / f"{name}.gguf", over)
    rc, err, peak = _inspect(path, capsys)
    assert rc == 2, err
    _one_line(err, path)
    assert message in err and peak < PEAK_BYTES * 4


def test_sound_edit_still_reads(tiny_gguf, tmp_path, capsys):
    """The editing itself leaves a readable file: the refusals above come from the values changed."""
    rc, err, _ = _inspect(_edit(tiny_gguf, tmp_path / "same.gguf", {}), capsys)
    assert rc == 0, err


def test_tokenizer_library_refusal_is_one_line(tiny_gguf, tmp_path, capsys, monkeypatch):
    """sentencepiece or transformers refusing the rebuilt tokenizer is this file's fault: one line.
    (convert rebuilds the tokenizer; inspect checks the pieces without it: tests/test_describe.py)"""
    from converters import gguf as gguf_format

    def refuse(model, config):
        raise RuntimeError("piece <x> is already defined")

    monkeypatch.setattr(gguf_format, "_hf_tokenizer_files", refuse)
    capsys.readouterr()
    rc = main(["convert", str(tiny_gguf), str(tmp_path / "hf"), "--to", "hf"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot rebuild the tokenizer from tokenizer.ggml.*: piece <x> is already defined" in err
    _one_line(err, tiny_gguf)


def test_layer_count_1e9_in_a_subprocess(tiny_gguf, tmp_path):
    path = _edit(tiny_gguf, tmp_path / "layers.gguf", {A + "block_count": 10**9})
    rc, err, seconds = _run_capped(path)
    assert rc == 2 and "block_count is 1000000000" in err and seconds < 10
    _one_line(err, path)


# --- split files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tiny_hf, tmp_path_factory) -> list[Path]:
    from converters import gguf_writer, hf

    out = tmp_path_factory.mktemp("split") / "g3.gguf"
    first = gguf_writer.write(hf.read(tiny_hf), out, max_shard_bytes=150_000)
    found = sorted(first.parent.glob("g3-*-of-*.gguf"))
    assert len(found) >= 3 and found[0] == first
    return found


def test_split_shard_truncated(shards, tmp_path, capsys):
    copies = []
    for shard in shards:
        copies.append(tmp_path / shard.name)
        copies[-1].write_bytes(shard.read_bytes())
    copies[1].write_bytes(shards[1].read_bytes()[:5000])
    rc, err, _ = _inspect(copies[0], capsys)
    assert rc == 2 and "truncated" in err
    _one_line(err, copies[1])


def test_split_shard_of_another_split(shards, tmp_path, capsys):
    """A shard whose split.no says it is another shard is refused, naming that shard."""
    copies = [tmp_path / s.name for s in shards]
    for src, dst in zip(shards, copies, strict=True):
        dst.write_bytes(src.read_bytes())
    copies[2].write_bytes(shards[1].read_bytes())
    rc, err, _ = _inspect(copies[0], capsys)
    assert rc == 2 and "do not make this shard 3" in err
    _one_line(err, copies[2])


# --- Gemma 3 padded vocabulary ----------------------------------------------------------------


@pytest.fixture(scope="module")
def padded_hf(tmp_path_factory) -> Path:
    """576 embedding rows for the tokenizer's 512 pieces, as Gemma 3 4B has 262208 for 262144."""
    return make_tiny("gemma3", tmp_path_factory.mktemp("padded") / "g3", vocab_size=576)


def test_padded_vocab_written_as_llamacpp_does(padded_hf, tmp_path, capsys, caplog):
    from converters import gguf as gguf_format
    from converters import hf

    out = tmp_path / "g3.gguf"
    assert main(["convert", str(padded_hf), str(out), "--to", "gguf"]) == 0
    assert "64 padding rows past the tokenizer are dropped" in caplog.text
    header = read_header(out)
    assert json.loads(header.values["gemport.vocab_padding"]) == {"rows": 576, "pieces": 512, "dropped": 64}
    assert len(header.values["tokenizer.ggml.tokens"]) == 512
    assert next(t.ne for t in header.tensors if t.name == "token_embd.weight") == (64, 512)
    back = gguf_format.read(out).tensors["model.embed_tokens.weight"].load()
    source = hf.read(padded_hf).tensors["model.embed_tokens.weight"].load()
    assert back.shape == (512, 64) and back.equal(source[:512])


def test_padded_vocab_parity_in_llamacpp(padded_hf, tmp_path, corpus, one_thread):
    """llama.cpp runs the GGUF; the reference's 576-way log-probs are renormalised over the 512 kept
    rows; the f32 GGUF must then agree to float rounding."""
    pytest.importorskip("llama_cpp")
    from validation.validate import validate

    out = tmp_path / "g3.gguf"
    assert main(["convert", str(padded_hf), str(out), "--to", "gguf"]) == 0
    report = validate(out, padded_hf, corpus=corpus, n_ctx=64, n_windows=4)
    assert report.runtime.startswith("llama.cpp") and report.metrics.tokens == 4 * 31
    assert report.metrics.kld < 1e-5 and abs(report.metrics.delta_ppl_pct) < 0.01
    assert any("renormalised over the 512 kept rows" in w for w in report.warnings)


def test_padded_vocab_refused_where_rows_are_used(tmp_path, capsys):
    """A BOS id inside the padding rows means they are not padding: refused, naming the source."""
    src = make_tiny("gemma3", tmp_path / "g3", vocab_size=576, bos_token_id=530)
    capsys.readouterr()  # transformers' save progress
    out = tmp_path / "g3.gguf"
    assert main(["convert", str(src), str(out), "--to", "gguf"]) == 2
    err = capsys.readouterr().err
    _one_line(err, src)
    assert "bos_token_id 530 lies in rows 512..575" in err and not out.exists()


def test_padded_vocab_of_gemma2_refused(tmp_path, capsys):
    """llama.cpp drops padding rows for Gemma 3 only; a padded Gemma 2 is refused in one line."""
    src = make_tiny("gemma2", tmp_path / "g2", vocab_size=576, query_pre_attn_scalar=16)
    capsys.readouterr()  # transformers' save progress
    out = tmp_path / "g2.gguf"
    assert main(["convert", str(src), str(out), "--to", "gguf"]) == 2
    err = capsys.readouterr().err
    _one_line(err, src)
    assert "tokenizer.model holds 512 pieces, the model's vocab is 576" in err and not out.exists()


# --- writer refusals name their file -----------------------------------------------------------


def test_missing_tokenizer_model_names_the_source(tiny_hf, tmp_path, capsys):
    import shutil

    src = tmp_path / "no-spm"
    shutil.copytree(tiny_hf, src)
    (src / "tokenizer.model").unlink()
    assert main(["convert", str(src), str(tmp_path / "o.gguf"), "--to", "gguf"]) == 2
    err = capsys.readouterr().err
    _one_line(err, src)
    assert "needs a SentencePiece tokenizer.model" in err


def test_nan_weight_names_the_source(tiny_hf, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "nan"
    shutil.copytree(tiny_hf, src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "o.gguf"
    assert main(["convert", str(src), str(out), "--to", "gguf"]) == 2
    err = capsys.readouterr().err
    _one_line(err, src)
    assert "NaN" in err and not out.exists()


@pytest.mark.parametrize(
    "over",
    [
        # a special id gemport does not use, outside the vocabulary: llama.cpp warns and loads the file
        {"tokenizer.ggml.mask_token_id": (999999, T.UINT32)},
        # a sliding-window pattern longer than the model: every layer sliding (llama.cpp set_swa_pattern)
        {A + "attention.sliding_window_pattern": (10**9, T.UINT32)},
        # a numeric array of more elements than the header's item cap (one numpy copy, bounded by its bytes)
        {"general.big": ([7] * 5_000_000, T.ARRAY, T.UINT8)},
    ],
    ids=["unused-special-id", "pattern-past-layers", "long-numeric-array"],
)
def test_what_llamacpp_loads_still_reads(tiny_gguf, tmp_path, capsys, over):
    rc, err, _ = _inspect(_edit(tiny_gguf, tmp_path / "ok.gguf", over), capsys)
    assert rc == 0, err


def test_zero_dim_quantized_tensor_is_refused(tmp_path, capsys):
    """gguf.cpp takes a missing dimension as 1: a Q8_0 tensor of no dims has rows of 1, not whole blocks."""
    path = tmp_path / "zero-dim.gguf"
    tensor = struct.pack("<Q", 1) + b"x" + struct.pack("<I", 0) + struct.pack("<I", 8) + struct.pack("<Q", 0)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + ARCH + tensor + bytes(64))
    rc, err, _ = _inspect(path, capsys)
    assert rc == 2 and "rows of 1 are not a whole number of Q8_0 blocks" in err, err
