"""onnxruntime-genai's own text path on gemport's ONNX folders: og.Tokenizer's ids and text equal
transformers' on the same folder (plain text, special tokens, the chat template), and og generates
from a text prompt what transformers generates from it.

og creates its tokenizer with ``add_special_tokens`` false (ref: onnxruntime-genai
src/models/model.cpp Tokenizer::Tokenizer), so plain-text ``encode`` equals transformers'
``add_special_tokens=False`` and ``update_options(add_special_tokens="true")`` equals its default;
a chat template's own ``<bos>`` is encoded as the special token either way.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from converters import gguf, hf
from converters import onnx as onnx_conv
from converters.tokenizer_files import genai_tokenizer_files
from gemport.cli import main
from tests.test_onnx import genai_greedy

og = pytest.importorskip("onnxruntime_genai")

STRINGS = (
    "The capital of France is",
    "  two  spaces\n\n\tand tabs   ",
    "def f(x):\n        return x ** 2",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<bos>already a bos",
    "a<eos>b",
    "héllo wörld 🤗 漢字 1234567",
)
TURN_MARKERS = ("<start_of_turn>", "<end_of_turn>")
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is  the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]
# Gemma 3's chat template (text models), as in google/gemma-3-270m-it tokenizer_config.json.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def og_tokenizer(folder, special: bool):
    tokenizer = og.Tokenizer(og.Model(str(folder)))
    if special:
        tokenizer.update_options(add_special_tokens="true")
    return tokenizer


def og_generate(folder, text: str, n: int) -> tuple[list[int], str]:
    """og's text path: encode (BOS as transformers adds it), greedy, decode."""
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    tokenizer.update_options(add_special_tokens="true")
    ids = tokenizer.encode(text)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out, tokenizer.decode(out)


def hf_generate(folder, text: str, n: int) -> tuple[list[int], str]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer(text, return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = model.generate(prompt, max_new_tokens=n, do_sample=False)[0, prompt.shape[1] :].tolist()
    return out, tokenizer.decode(out, skip_special_tokens=True)


def assert_same_text_path(folder, reference) -> None:
    """og on ``folder`` against transformers on ``reference`` (a folder with the same vocabulary)."""
    want = AutoTokenizer.from_pretrained(reference)
    plain, special = og_tokenizer(folder, False), og_tokenizer(folder, True)
    for text in STRINGS:
        ids = want(text).input_ids
        assert [int(i) for i in special.encode(text)] == ids, text
        assert [int(i) for i in plain.encode(text)] == want(text, add_special_tokens=False).input_ids, text
        assert special.decode(ids) == want.decode(ids, skip_special_tokens=True), text
        stream = special.create_stream()  # og's streaming decode, token by token
        assert "".join(stream.decode(i) for i in ids) == want.decode(ids, skip_special_tokens=True), text


def gemma_like_tokenizer(files: dict[str, bytes]) -> dict[str, bytes]:
    """``files``' SentencePiece model with its whitespace-run pieces user-defined, as in Gemma's
    tokenizer.model (so transformers lists them as added tokens), and Gemma 3's chat template."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from converters.tokenizer_files import hf_tokenizer_files

    proto = pb.ModelProto()
    proto.ParseFromString(files["tokenizer.model"])
    runs = [p for p in proto.pieces if len(p.piece) > 1 and not p.piece.strip("\u2581")]
    assert len(runs) >= 3  # the tiny vocabulary learned several
    for piece in runs:
        piece.type = pb.ModelProto.SentencePiece.USER_DEFINED
    model = proto.SerializeToString()
    config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False}
    out = {"tokenizer.model": model} | hf_tokenizer_files(model, config)
    # Google's files list the turn markers as special (a GGUF then marks them CONTROL)
    tokenizer = json.loads(out["tokenizer.json"])
    for token in tokenizer["added_tokens"]:
        token["special"] = token["special"] or token["content"] in TURN_MARKERS
    saved = json.loads(out["tokenizer_config.json"]) | {"chat_template": GEMMA_TEMPLATE}
    for token in saved["added_tokens_decoder"].values():
        token["special"] = token["special"] or token["content"] in TURN_MARKERS
    out["tokenizer.json"], out["tokenizer_config.json"] = json.dumps(tokenizer).encode(), json.dumps(saved).encode()
    return out


@pytest.fixture(scope="module")
def tiny_pair(tiny_models, tmp_path_factory):
    """A tiny Gemma 3 with a Gemma-like tokenizer, as an HF folder (the reference) and an ONNX folder."""
    root = tmp_path_factory.mktemp("og-tiny")
    ckpt = hf.read(tiny_models["gemma3"])
    ckpt = dataclasses.replace(ckpt, tokenizer_files=gemma_like_tokenizer(ckpt.tokenizer_files))
    return hf.write(ckpt, root / "hf"), onnx_conv.write(ckpt, root / "onnx")


def test_og_encodes_and_decodes_as_transformers(tiny_pair):
    ref, folder = tiny_pair
    added = {t["content"] for t in json.loads((ref / "tokenizer.json").read_text())["added_tokens"]}
    assert "\u2581\u2581" in added  # the case onnxruntime-extensions decodes as "▁▁"
    assert_same_text_path(folder, ref)
    # every piece alone, between words: the whitespace pieces come out as spaces
    want, tokenizer = AutoTokenizer.from_pretrained(ref), og_tokenizer(folder, False)
    word = want("The", add_special_tokens=False).input_ids
    for i in range(len(want)):
        ids = word + [i] + word
        text = want.decode(ids, skip_special_tokens=True)
        if "\ufffd" not in text and "\x00" not in text:  # a lone byte piece: no text to compare
            assert tokenizer.decode(ids) == text, i
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is False


def test_og_chat_template_equals_transformers(tiny_pair):
    ref, folder = tiny_pair
    want = AutoTokenizer.from_pretrained(ref)
    tokenizer = og_tokenizer(folder, False)
    text = tokenizer.apply_chat_template(json.dumps(MESSAGES), add_generation_prompt=True)
    assert text == want.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = want.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids[:2] == [2, want.convert_tokens_to_ids("<start_of_turn>")]
    assert [int(i) for i in tokenizer.encode(text)] == list(ids)


def test_og_generates_from_text_as_transformers(tiny_pair):
    ref, folder = tiny_pair
    for text in ("def f(x):\n    return", "The capital of France is"):
        (got, got_text), (want, want_text) = og_generate(folder, text, 12), hf_generate(ref, text, 12)
        assert got == want, text
        if "\ufffd" not in want_text:  # random weights pick lone byte pieces, which og drops
            assert got_text == want_text, text


def test_flags_follow_what_transformers_does(tiny_models):
    """add_bos_token/add_eos_token written as the files make transformers behave (transformers 5
    leaves them out of tokenizer_config.json; onnxruntime-extensions reads them there)."""
    from converters.tokenizer_files import hf_tokenizer_files

    model = hf.read(tiny_models["gemma3"]).tokenizer_files["tokenizer.model"]
    for bos, eos in ((False, False), (True, True)):
        files = hf_tokenizer_files(
            model, {"tokenizer_class": "GemmaTokenizer", "add_bos_token": bos, "add_eos_token": eos}
        )
        config = json.loads(files["tokenizer_config.json"])
        assert (config["add_bos_token"], config["add_eos_token"]) == (bos, eos)
        config.pop("add_bos_token"), config.pop("add_eos_token")
        files["tokenizer_config.json"] = json.dumps(config).encode()
        config = json.loads(genai_tokenizer_files(files)["tokenizer_config.json"])
        assert (config["add_bos_token"], config["add_eos_token"]) == (bos, eos)


def test_sentencepiece_only_source_gets_a_tokenizer_og_loads(tiny_models, tmp_path):
    """A checkpoint with only tokenizer.model (as the JAX reader gives) gets the tokenizer.json
    transformers makes of it: og cannot tokenize without one."""
    src = tiny_models["gemma3"]
    ckpt = hf.read(src)
    config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False}
    files = {
        "tokenizer.model": ckpt.tokenizer_files["tokenizer.model"],
        "tokenizer_config.json": json.dumps(config).encode(),
    }
    folder = onnx_conv.write(dataclasses.replace(ckpt, tokenizer_files=files), tmp_path / "onnx")
    assert (folder / "tokenizer.json").is_file()
    assert_same_text_path(folder, src)


def test_gguf_keeps_chat_template_and_special_tokens_match_in_text(tiny_pair, tmp_path):
    """A GGUF written by gemport: llama.cpp's own tokenizer gives transformers' ids; read back, the
    chat template is kept where transformers and og read it, and the SentencePiece model (the JAX
    folder's vocabulary, which the gemma library encodes chat turns with) matches the turn
    markers in text, which the GGUF marks CONTROL."""
    import sentencepiece as spm

    from validation.runtimes.llamacpp import _library

    ref, _ = tiny_pair
    path = tmp_path / "m.gguf"
    assert main(["convert", str(ref), str(path), "--to", "gguf"]) == 0
    want = AutoTokenizer.from_pretrained(ref)
    lib = _library()
    params = lib.llama_model_default_params()
    params.vocab_only = True
    model = lib.llama_model_load_from_file(str(path).encode(), params)
    try:
        vocab = lib.llama_model_get_vocab(model)
        for text in STRINGS:
            data = text.encode()
            out = (lib.llama_token * (len(data) + 8))()
            n = lib.llama_tokenize(vocab, data, len(data), out, len(data) + 8, True, True)  # parse special
            assert list(out[:n]) == want(text).input_ids, text
    finally:
        lib.llama_model_free(model)
    files = gguf.read(path).tokenizer_files
    assert json.loads(files["tokenizer_config.json"])["chat_template"] == GEMMA_TEMPLATE
    sp = spm.SentencePieceProcessor(model_proto=files["tokenizer.model"])
    for text in STRINGS[:4]:
        assert [sp.bos_id()] + sp.encode(text) == want(text).input_ids, text
    chat = want.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert sp.encode(chat.removeprefix("<bos>"))[:1] == [want.convert_tokens_to_ids("<start_of_turn>")]


# --- the demo model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_onnx(demo_model, tmp_path_factory):
    """The demo model's fp32 and int4 ONNX folders, written once for this module."""
    root = tmp_path_factory.mktemp("og-demo")
    out = {"f32": root / "f32", "int4": root / "int4"}
    assert main(["convert", str(demo_model), str(out["f32"]), "--to", "onnx", "--dtype", "f32"]) == 0
    assert main(["convert", str(demo_model), str(out["int4"]), "--to", "onnx", "--quant", "int4"]) == 0
    return out


@pytest.mark.realmodel
def test_demo_og_text_path(demo_model, demo_onnx):
    """The issue's case: og's ids start with BOS as transformers' do ([2, 818, ...]), the text
    round-trips, and og generates from the text what transformers does (fp32) and what the int4
    folder generates from transformers' ids (int4)."""
    folder = demo_onnx["f32"]
    text = "The capital of France is"
    assert [int(i) for i in og_tokenizer(folder, True).encode(text)][:2] == [2, 818]
    assert AutoTokenizer.from_pretrained(folder)(text).input_ids[:2] == [2, 818]
    assert_same_text_path(folder, demo_model)
    got = og_generate(folder, text, 8)
    assert got == hf_generate(demo_model, text, 8)
    ids = AutoTokenizer.from_pretrained(demo_model)(text).input_ids
    int4 = og_generate(demo_onnx["int4"], text, 8)
    assert int4[0] == genai_greedy(demo_onnx["int4"], ids, 8)


def test_malformed_tokenizer_json_is_one_line_and_nothing_written(tiny_models, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_models["gemma3"], src)
    (src / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 5}}')
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--to", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(src) in err and "tokenizer" in err, err
    assert not out.exists()
