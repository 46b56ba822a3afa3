"""converters.gguf.read.

Tiny GGUFs are written here with gguf-py the way llama.cpp's convert_hf_to_gguf.py writes a
Gemma: gguf-py's own HF -> GGUF name map, norms stored as 1 + w, the same metadata keys, and
F32/F16/BF16/Q8_0 tensors. They are read back and compared with the tensors they were made
from (every arch) and with transformers' GGUF loader (gemma2, gemma3: transformers has no
GGUF loader for arch gemma, it raises "GGUF model with architecture gemma is not supported").
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from converters import gguf as reader
from gemport.checkpoint import expected_shapes, torch_dtype
from gemport.cli import main
from gemport.spec import FULL, SLIDING, GemmaSpec, RopeScaling

Q = gguf.GGMLQuantizationType
ARCH_ENUM = {"gemma": gguf.MODEL_ARCH.GEMMA, "gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3": gguf.MODEL_ARCH.GEMMA3}
# Untied lm_head only for gemma3: gguf-py maps no lm_head for gemma/gemma2 (llama.cpp skips it).
LAYERS, TIED = {"gemma": 2, "gemma2": 2, "gemma3": 6}, {"gemma": True, "gemma2": True, "gemma3": False}
# GGUF leaf name -> storage type; everything else (all 1-D norms included) is F32, as llama.cpp does.
TYPES = {
    "token_embd": Q.Q8_0,
    "output": Q.F16,
    "attn_q": Q.F16,
    "attn_k": Q.BF16,
    "attn_output": Q.Q8_0,
    "ffn_down": Q.Q8_0,
}


def tiny_spec(arch: str) -> GemmaSpec:
    return GemmaSpec(arch, 512, 64, 128, LAYERS[arch], 4, 1 if arch == "gemma" else 2, 16, tie_embeddings=TIED[arch])


def _sp_proto():
    from sentencepiece import sentencepiece_model_pb2 as pb

    from tests.tiny import tokenizer_model

    proto = pb.ModelProto()
    proto.ParseFromString(tokenizer_model())
    return proto


def _encode(x: torch.Tensor, qtype: Q) -> np.ndarray:
    try:
        return gguf.quants.quantize(x.numpy(), qtype)
    except NotImplementedError:  # a type gguf-py cannot write: zero blocks of the right size
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        return np.zeros((*x.shape[:-1], x.shape[-1] // block * size), dtype=np.uint8)


def write_tiny_gguf(
    path: Path, arch: str, arch_name: str | None = None, types: dict | None = None, drop: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """Write a seeded random ``arch`` GGUF at ``path``; return the canonical tensors it should read as."""
    spec, types = tiny_spec(arch), TYPES | (types or {})
    torch.manual_seed(0)
    names = gguf.get_tensor_name_map(ARCH_ENUM[arch], spec.num_layers)
    w = gguf.GGUFWriter(path, arch_name or arch)
    _add_metadata(w, arch, spec)
    _add_tokenizer(w)
    expected = {}
    for name, shape in expected_shapes(spec).items():
        x = torch.randn(shape) * (0.3 if len(shape) == 1 else 0.08)
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        if gguf_name in drop:
            continue
        offset = 1.0 if name.endswith("norm.weight") else 0.0  # convert_hf_to_gguf: data_torch + 1
        qtype = types.get(re.fullmatch(r"(?:blk\.\d+\.)?(\w+)\.weight", gguf_name).group(1), Q.F32)
        data = _encode(x + offset, qtype)
        w.add_tensor(gguf_name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        if qtype != Q.Q8_1:  # written as zero blocks, never read back
            expected[name] = torch.from_numpy(gguf.quants.dequantize(data, qtype).copy()).reshape(shape) - offset
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _add_metadata(w: gguf.GGUFWriter, arch: str, spec: GemmaSpec) -> None:
    """The keys convert_hf_to_gguf.py's GemmaModel / Gemma2Model / Gemma3Model write."""
    w.add_context_length(spec.max_position)
    w.add_embedding_length(spec.hidden_size)
    w.add_block_count(spec.num_layers)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_head_count(spec.num_heads)
    w.add_head_count_kv(spec.num_kv_heads)
    w.add_layer_norm_rms_eps(spec.rms_eps)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(50.0)
        w.add_final_logit_softcapping(30.0)
        w.add_sliding_window(16)
    if arch == "gemma3":
        w.add_rope_freq_base(1e6)
        w.add_sliding_window(16)
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(8.0)


def _add_tokenizer(w: gguf.GGUFWriter) -> None:
    """The tiny SentencePiece vocabulary, as convert_hf_to_gguf.py _set_vocab_sentencepiece writes it."""
    pieces = _sp_proto().pieces
    # llama.cpp writes user-defined pieces with "▁" turned into spaces
    w.add_tokenizer_model("llama")
    w.add_token_list([p.piece.replace("\u2581", " ") if p.type == 4 else p.piece for p in pieces])
    w.add_token_scores([p.score for p in pieces])
    w.add_token_types([p.type for p in pieces])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)


@pytest.fixture(scope="module", params=["gemma", "gemma2", "gemma3"])
def tiny(request, tmp_path_factory) -> tuple[str, Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp(request.param) / f"{request.param}.gguf"
    return request.param, path, write_tiny_gguf(path, request.param)


def test_tensors_are_the_written_ones(tiny):
    arch, path, expected = tiny
    ckpt = reader.read(path)
    assert set(ckpt.tensors) == set(expected)
    for name, t in ckpt.tensors.items():
        data = t.load()
        assert tuple(data.shape) == t.shape and data.dtype == torch_dtype(t.dtype), name
        assert torch.equal(data.float(), expected[name]), name
    layer = "model.layers.1."
    assert ckpt.tensors[layer + "self_attn.q_proj.weight"].dtype == "f16"
    assert ckpt.tensors[layer + "self_attn.k_proj.weight"].dtype == "bf16"
    assert ckpt.tensors[layer + "mlp.down_proj.weight"].dtype == "f32"  # Q8_0 dequantizes to f32
    assert ckpt.tensors[layer + "input_layernorm.weight"].dtype == "f32"


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_tensors_equal_transformers_loader(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, arch)
    ckpt = reader.read(path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    ref = model.state_dict()
    assert set(ref) - set(ckpt.tensors) == ({"lm_head.weight"} if TIED[arch] else set())
    assert set(ckpt.tensors) <= set(ref)
    for name, t in ckpt.tensors.items():
        assert torch.equal(t.load().float(), ref[name]), name


def test_spec_from_metadata(tiny):
    arch, path, _ = tiny
    spec = reader.read(path).spec
    shape = (spec.vocab_size, spec.hidden_size, spec.intermediate_size, spec.num_layers, spec.num_heads, spec.head_dim)
    assert shape == (512, 64, 128, LAYERS[arch], 4, 16)
    assert (spec.num_kv_heads, spec.tie_embeddings, spec.max_position) == (
        1 if arch == "gemma" else 2,
        TIED[arch],
        8192,
    )
    assert (spec.bos_token_id, spec.eos_token_id, spec.pad_token_id) == (2, 1, 0)
    if arch == "gemma":  # no rope key in the file: llama.cpp's default base
        assert spec.layer_types == (FULL, FULL) and spec.rope_theta == 10000.0
        assert spec.query_pre_attn_scalar is None and spec.attn_softcap is None and spec.final_softcap is None
    if arch == "gemma2":  # llama.cpp: sliding on even layers, scale 1/sqrt(head_dim) unless 27B
        assert spec.layer_types == (SLIDING, FULL) and spec.sliding_window == 16
        assert (spec.query_pre_attn_scalar, spec.attn_softcap, spec.final_softcap) == (16, 50.0, 30.0)
    if arch == "gemma3":  # llama.cpp: every 6th layer global, local rope 10000, scaling on global only
        assert spec.layer_types == (SLIDING,) * 5 + (FULL,) and spec.sliding_window == 16
        assert (spec.rope_theta, spec.rope_local_theta, spec.rope_scaling) == (1e6, 1e4, RopeScaling("linear", 8.0))
        assert (spec.query_pre_attn_scalar, spec.attn_softcap, spec.final_softcap) == (16, None, None)


def test_hf_folder_written_from_gguf_loads_in_transformers(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from converters import hf

    arch, path, expected = tiny
    out = hf.write(reader.read(path), tmp_path / "hf")
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    state = model.state_dict()
    for name, data in expected.items():
        assert torch.equal(state[name], data), name


def test_hf_tokenizer_config_lists_added_tokens(tiny, tmp_path):
    """llama.cpp's converter takes user-defined/control tokens only from added_tokens_decoder."""
    import json

    arch, path, _ = tiny
    config = json.loads(reader.read(path).tokenizer_files["tokenizer_config.json"])
    added = {v["content"]: v["special"] for v in config["added_tokens_decoder"].values()}
    assert added["<bos>"] is True and added["<start_of_turn>"] is False


def test_tokenizer_rebuilt_from_metadata(tmp_path):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import AutoTokenizer

    from validation.corpus import default_text

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "gemma3")
    ckpt = reader.read(path)
    rebuilt, original = pb.ModelProto(), _sp_proto()
    rebuilt.ParseFromString(ckpt.tokenizer_files["tokenizer.model"])
    assert [(p.piece, p.score, p.type) for p in rebuilt.pieces] == [(p.piece, p.score, p.type) for p in original.pieces]
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    for name, data in ckpt.tokenizer_files.items():
        (hf_dir / name).write_bytes(data)
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= set(ckpt.tokenizer_files)
    text = default_text()[:30000] + "\n<start_of_turn>user\n  two  spaces\t\ttabs 漢字 🤗<end_of_turn>"
    ours = AutoTokenizer.from_pretrained(hf_dir)(text)["input_ids"]
    assert ours == AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)(text)["input_ids"]
    for model in (original.SerializeToString(), ckpt.tokenizer_files["tokenizer.model"]):
        assert ours == [2] + spm.SentencePieceProcessor(model_proto=model).encode(text)
    assert ckpt.generation_config == {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}


def test_tensors_load_lazily(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "gemma")

    def no_load(*args):
        raise AssertionError("tensor data read")

    monkeypatch.setattr(reader, "_load", no_load)
    ckpt = reader.read(path)  # reads only metadata
    with pytest.raises(AssertionError, match="tensor data read"):
        ckpt.tensors["model.embed_tokens.weight"].load()


# --- errors, through the CLI ----------------------------------------------------------------


def _convert(src: Path, capsys, *extra: str) -> tuple[int, str, Path]:
    dst = src.parent / "out"
    rc = main(["convert", str(src), str(dst), "--to", "hf", *extra])
    err = capsys.readouterr().err
    assert not dst.exists() and sorted(p.name for p in src.parent.iterdir()) == [src.name]
    assert err.count("\n") == 1 and str(src) in err, err
    return rc, err, dst


def _bad_file(tmp_path: Path, kind: str) -> Path:
    good = tmp_path / "src" / "good.gguf"
    good.parent.mkdir()
    write_tiny_gguf(good, "gemma")
    data = good.read_bytes()
    good.unlink()
    bad = good.with_name(f"{kind}.gguf")
    bad.write_bytes({"magic": b"GGUX" + data[4:], "header": data[:200], "data": data[:-1000]}[kind])
    return bad


@pytest.mark.parametrize(
    "kind,message",
    [("magic", "not a GGUF file"), ("header", "truncated or corrupt GGUF"), ("data", "truncated or corrupt GGUF")],
)
def test_unreadable_file(tmp_path, capsys, kind, message):
    rc, err, _ = _convert(_bad_file(tmp_path, kind), capsys, "--from", "gguf")
    assert rc == 2 and message in err


def _patched(tmp_path: Path, kind: str) -> Path:
    """A tiny GGUF with one header field overwritten: a huge array count, a huge tensor dimension,
    an unknown tensor type id, or a tensor data offset far past the end of the file."""
    import struct

    good = tmp_path / "src" / "good.gguf"
    good.parent.mkdir()
    write_tiny_gguf(good, "gemma")
    r = gguf.GGUFReader(good)
    tokens = r.fields["tokenizer.ggml.tokens"]
    count_at = tokens.offset + 8 + len("tokenizer.ggml.tokens") + 4 + 4  # key length, key, type, item type
    t = r.tensors[1]
    dims_at = t.field.offset + 8 + len(t.name) + 4  # name length, name, n_dims
    type_at = dims_at + 8 * len(t.shape)
    at, value = {
        "array": (count_at, struct.pack("<Q", 2**50)),
        "dims": (dims_at + 8, struct.pack("<Q", 2**40)),
        "type": (type_at, struct.pack("<I", 99)),
        "offset": (type_at + 4, struct.pack("<Q", 2**45)),
    }[kind]
    data = bytearray(good.read_bytes())
    data[at : at + len(value)] = value
    del r
    good.unlink()
    bad = good.with_name(f"{kind}.gguf")
    bad.write_bytes(bytes(data))
    return bad


@pytest.mark.parametrize("kind", ["array", "dims", "type", "offset"])
def test_header_claims_beyond_the_file(tmp_path, capsys, kind):
    """Claims of 2**50 array items or a 2**40-row tensor fail at once: the reader maps the file and
    never allocates what the header claims (this test would exhaust memory otherwise)."""
    rc, err, _ = _convert(_patched(tmp_path, kind), capsys)
    assert rc == 2 and "truncated or corrupt GGUF file" in err


@pytest.mark.parametrize(
    "options,message",
    [
        ({"arch_name": "llama"}, "unsupported GGUF architecture 'llama' (supported: gemma, gemma2, gemma3)"),
        ({"types": {"attn_v": Q.Q8_1}}, "tensor blk.0.attn_v.weight has type Q8_1, which the gguf package cannot"),
        ({"drop": ("blk.1.ffn_up.weight",)}, "missing tensor model.layers.1.mlp.up_proj.weight"),
    ],
)
def test_unsupported_or_incomplete_file(tmp_path, capsys, options, message):
    src = tmp_path / "src" / "tiny.gguf"
    src.parent.mkdir()
    write_tiny_gguf(src, "gemma", **options)
    rc, err, _ = _convert(src, capsys)
    assert rc == 2 and message in err


# --- the real Gemma 3 270M Q4_K_M GGUF --------------------------------------------------------


@pytest.fixture(scope="session")
def real_gguf(tmp_path_factory) -> Path:
    from gemport.demo import demo_gguf

    return demo_gguf(tmp_path_factory.mktemp("real"))


@pytest.mark.realmodel
def test_real_model_equals_transformers_loader(real_gguf):
    from transformers import AutoModelForCausalLM

    ckpt = reader.read(real_gguf)
    model = AutoModelForCausalLM.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name, dtype=torch.float32)
    ref = model.state_dict()
    assert set(ref) - set(ckpt.tensors) == {"lm_head.weight"} and set(ckpt.tensors) <= set(ref)
    for name, t in ckpt.tensors.items():
        assert torch.equal(t.load().float(), ref[name]), name
    ours, theirs = ckpt.spec.to_hf_config(), model.config.to_dict()
    for key in ("layer_types", "sliding_window", "query_pre_attn_scalar", "rope_parameters", "head_dim", "vocab_size"):
        assert ours[key] == theirs[key], key
    assert ckpt.spec.rope_local_theta == 10000.0 and ckpt.spec.query_pre_attn_scalar == 256


@pytest.mark.realmodel
def test_real_demo_model_tokenizes_as_transformers(real_gguf):
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemport.demo import build_demo_model
    from validation.corpus import default_text

    out = build_demo_model(real_gguf.parent / "gemma-3-270m")
    assert sorted(p.name for p in real_gguf.parent.iterdir()) == sorted([real_gguf.name, out.name])  # GGUF reused
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert build_demo_model(out) == out and (out / "model.safetensors").stat().st_mtime_ns == stamp
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()) and model.config.dtype == torch.bfloat16, info
    del model
    text = default_text()
    ours = AutoTokenizer.from_pretrained(out)
    theirs = AutoTokenizer.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name)
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    # SentencePiece (and llama.cpp) match user-defined pieces greedily, so a run of 32+ spaces is
    # 31 + rest there but a BPE merge result in transformers: those lines alone may differ.
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    lines = text.split("\n")
    differ = [i for i, (a, b) in enumerate(zip(ours(lines)["input_ids"], sp.encode(lines), strict=True)) if a[1:] != b]
    assert differ and all(re.search(" {32}", lines[i]) for i in differ)
