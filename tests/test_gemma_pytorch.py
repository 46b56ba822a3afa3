"""gemma_pytorch checkpoints: made from the tiny HF models (float and int8), converted back to HF."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch

from converters import gemma_pytorch as gp
from converters import hf
from gemport.cli import main
from tests.test_bad_input import assert_nothing_left, assert_one_line_error
from tests.tiny import make_tiny

VARIANTS = ("gemma-mha", "gemma-mqa-tied", "gemma2", "gemma3")


@pytest.fixture(scope="module")
def sources(tiny_models, tmp_path_factory) -> dict[str, Path]:
    out = dict(tiny_models)
    out["gemma-mqa-tied"] = make_tiny("gemma-mqa", tmp_path_factory.mktemp("mqa") / "m", tie_word_embeddings=True)
    return out


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row, the storage of gemma_pytorch's quant=True Linear/Embedding."""
    scale = w.float().abs().amax(dim=1) / 127
    return torch.round(w.float() / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8), scale


def gemma_pytorch_state(src: Path, int8: bool = False) -> dict[str, torch.Tensor]:
    """The model_state_dict gemma_pytorch's GemmaForCausalLM has for the HF model ``src``
    (ref: gemma_pytorch gemma/model.py: fused qkv_proj, embedder, query_norm/key_norm, freqs_cis buffers)."""
    ckpt = hf.read(src)
    spec, w = ckpt.spec, {n: t.load() for n, t in ckpt.tensors.items()}
    state = {"embedder.weight": w["model.embed_tokens.weight"], "model.norm.weight": w["model.norm.weight"]}
    names = {
        "self_attn.o_proj.weight": "self_attn.o_proj.weight",
        "mlp.gate_proj.weight": "mlp.gate_proj.weight",
        "mlp.up_proj.weight": "mlp.up_proj.weight",
        "mlp.down_proj.weight": "mlp.down_proj.weight",
        "input_layernorm.weight": "input_layernorm.weight",
        "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    }
    if spec.family != "gemma":
        names["pre_feedforward_layernorm.weight"] = "pre_feedforward_layernorm.weight"
        names["post_feedforward_layernorm.weight"] = "post_feedforward_layernorm.weight"
    if spec.family == "gemma3":
        names["self_attn.query_norm.weight"] = "self_attn.q_norm.weight"
        names["self_attn.key_norm.weight"] = "self_attn.k_norm.weight"
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        qkv = [w[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]
        state[p + "self_attn.qkv_proj.weight"] = torch.cat(qkv)
        for theirs, ours in names.items():
            state[p + theirs] = w[p + ours]
    rotary = torch.polar(torch.ones(64, spec.head_dim // 2), torch.rand(64, spec.head_dim // 2))
    if spec.family == "gemma3":
        state["local_freqs_cis"], state["global_freqs_cis"] = rotary, rotary.clone()
    else:
        state["freqs_cis"] = rotary
    if int8:
        for name in [n for n, t in state.items() if t.ndim == 2 and not t.is_complex()]:
            state[name], state[name.removesuffix("weight") + "weight_scaler"] = quantize_rows(state[name])
    return state


def save_gemma_pytorch(src: Path, folder: Path, int8: bool = False, config: bool = True, **extra) -> Path:
    folder.mkdir(parents=True)
    path = folder / "model.ckpt"
    torch.save({"model_state_dict": gemma_pytorch_state(src, int8)} | extra, path)
    shutil.copy(src / "tokenizer.model", folder / "tokenizer.model")
    if config:
        shutil.copy(src / "config.json", folder / "config.json")
    return path


def dequantized(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """ref: gemma/model.py Linear.forward: weight * weight_scaler.unsqueeze(-1)"""
    return state[name] * state[name.removesuffix("weight") + "weight_scaler"].unsqueeze(-1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_float_checkpoint_converts_to_the_same_hf_model(sources, tmp_path, variant):
    src = sources[variant]
    ckpt = save_gemma_pytorch(src, tmp_path / "gp")
    assert main(["convert", str(ckpt), str(tmp_path / "hf"), "--to", "hf"]) == 0
    got, want = hf.read(tmp_path / "hf"), hf.read(src)
    assert got.spec == want.spec
    assert set(got.tensors) == set(want.tensors)
    for name, t in want.tensors.items():
        assert torch.equal(got.tensors[name].load(), t.load()), name
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()


@pytest.mark.parametrize("variant", VARIANTS)
def test_int8_checkpoint_converts_to_its_dequantized_weights(sources, tmp_path, variant):
    src = sources[variant]
    ckpt = save_gemma_pytorch(src, tmp_path / "gp", int8=True)
    state = torch.load(ckpt, weights_only=True)["model_state_dict"]
    assert main(["convert", str(ckpt), str(tmp_path / "hf"), "--to", "hf", "--from", "gemma-pytorch"]) == 0
    got, want = hf.read(tmp_path / "hf"), hf.read(src)
    assert got.spec == want.spec
    q, kv = want.spec.num_heads * want.spec.head_dim, want.spec.num_kv_heads * want.spec.head_dim
    for i in range(want.spec.num_layers):
        p = f"model.layers.{i}."
        qkv = dequantized(state, p + "self_attn.qkv_proj.weight")
        for part, rows in zip("qkv", qkv.split([q, kv, kv]), strict=True):
            assert torch.equal(got.tensors[p + f"self_attn.{part}_proj.weight"].load(), rows), (i, part)
        for name in ("self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"):
            assert torch.equal(got.tensors[p + name].load(), dequantized(state, p + name)), (i, name)
        assert torch.equal(got.tensors[p + "input_layernorm.weight"].load(), state[p + "input_layernorm.weight"])
    embed = got.tensors["model.embed_tokens.weight"].load()
    assert torch.equal(embed, dequantized(state, "embedder.weight"))
    # int8 rounding: every weight within half a step of its row's scale of the original
    original = want.tensors["model.embed_tokens.weight"].load()
    step = state["embedder.weight_scaler"].unsqueeze(-1)
    assert bool(((embed - original).abs() <= step / 2 * (1 + 1e-6)).all())
    assert not torch.equal(embed, original)


def test_pickle_only_checkpoint_is_refused(sources, tmp_path, capsys):
    """A checkpoint that pickles an object torch.load(weights_only=True) does not allow."""
    src = sources["gemma2"]
    ckpt = save_gemma_pytorch(src, tmp_path / "gp", args=argparse.Namespace(lr=1e-4))
    assert torch.load(ckpt, weights_only=False)["args"].lr == 1e-4  # the file itself is whole
    dst = tmp_path / "hf"
    code = main(["convert", str(ckpt), str(dst), "--to", "hf"])
    assert_one_line_error(code, capsys.readouterr().err, str(ckpt), "weights_only=True", "Namespace")
    assert_nothing_left(dst)


def test_unknown_tensor_is_refused(sources, tmp_path, capsys):
    folder = tmp_path / "gp"
    folder.mkdir()
    state = gemma_pytorch_state(sources["gemma3"])
    state["model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save({"model_state_dict": state}, folder / "model.ckpt")
    shutil.copy(sources["gemma3"] / "config.json", folder / "config.json")
    code = main(["convert", str(folder / "model.ckpt"), str(tmp_path / "hf"), "--to", "hf"])
    assert_one_line_error(code, capsys.readouterr().err, "unexpected tensor model.layers.1.self_attn.rotary_emb")
    assert_nothing_left(tmp_path / "hf")


def test_checkpoint_of_no_official_size_needs_a_config(sources, tmp_path, capsys):
    ckpt = save_gemma_pytorch(sources["gemma2"], tmp_path / "gp", config=False)
    code = main(["convert", str(ckpt), str(tmp_path / "hf"), "--to", "hf"])
    assert_one_line_error(code, capsys.readouterr().err, str(ckpt), "no official size", "no config.json")
    code = main(["convert", str(ckpt), str(tmp_path / "hf"), "--to", "hf", "--preset", "gemma2-2b"])
    assert_one_line_error(code, capsys.readouterr().err, str(ckpt), "not a gemma2-2b")
    assert_nothing_left(tmp_path / "hf")


def test_truncated_checkpoint(sources, tmp_path, capsys):
    ckpt = save_gemma_pytorch(sources["gemma-mha"], tmp_path / "gp")
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    code = main(["convert", str(ckpt), str(tmp_path / "hf"), "--to", "hf", "--from", "gemma-pytorch"])
    assert_one_line_error(code, capsys.readouterr().err, str(ckpt), "not a readable torch checkpoint")


def test_sniff_needs_a_torch_file(tmp_path):
    (tmp_path / "a.ckpt").write_bytes(b"GGUF" + bytes(16))
    assert not gp.sniff(tmp_path / "a.ckpt")
    torch.save({"model_state_dict": {}}, tmp_path / "b.ckpt")
    assert gp.sniff(tmp_path / "b.ckpt")


@pytest.mark.realmodel
def test_demo_model_without_config_is_recognized(demo_model, tmp_path):
    """Gemma 3 270M as a gemma_pytorch checkpoint with only its tokenizer beside it: the spec comes
    from the official size its tensors have, and every tensor comes back bit-identical."""
    ckpt = save_gemma_pytorch(demo_model, tmp_path / "gp", config=False)
    got, want = gp.read(ckpt), hf.read(demo_model)
    for field in (
        "family vocab_size hidden_size intermediate_size num_layers num_heads num_kv_heads head_dim "
        "layer_types sliding_window rope_theta rope_local_theta rope_scaling attn_softcap final_softcap"
    ).split():
        assert getattr(got.spec, field) == getattr(want.spec, field), field
    for name, t in want.tensors.items():
        assert torch.equal(got.tensors[name].load(), t.load()), name
