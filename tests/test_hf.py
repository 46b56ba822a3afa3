from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from converters import hf
from gemport.cli import main


def assert_bit_identical(a_path, b_path):
    a, b = hf.read(a_path), hf.read(b_path)
    assert a.spec == b.spec
    assert list(a.tensors) == list(b.tensors) or set(a.tensors) == set(b.tensors)
    for name, t in a.tensors.items():
        x, y = t.load(), b.tensors[name].load()
        assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8)), name
    assert a.tokenizer_files == b.tokenizer_files


@pytest.mark.parametrize("variant", ["gemma-mha", "gemma-mqa", "gemma2", "gemma3", "gemma3-sharded-bf16"])
@pytest.mark.parametrize("shard", [None, 40_000])
def test_round_trip_is_bit_identical_and_loads_in_transformers(tiny_models, tmp_path, variant, shard):
    src = tiny_models[variant]
    out = hf.write(hf.read(src), tmp_path / "out", max_shard_bytes=shard)
    assert (out / "model.safetensors.index.json").is_file() == bool(shard)
    assert_bit_identical(src, out)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ref = AutoModelForCausalLM.from_pretrained(src)
    ids = torch.tensor([[2, 17, 99, 5, 300, 42, 7]])
    with torch.inference_mode():
        assert torch.equal(ref(ids).logits, model(ids).logits)
    text = "def f(x):\n    return x ** 2  # square"
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == AutoTokenizer.from_pretrained(src)(text).input_ids


@pytest.mark.parametrize(
    "dtype,torch_dtype", [("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)]
)
def test_convert_casts_dtype(tiny_models, tmp_path, dtype, torch_dtype):
    src = tiny_models["gemma3"]
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "hf", "--dtype", dtype]) == 0
    out = hf.read(tmp_path / "out")
    ref = hf.read(src)
    for name, t in out.tensors.items():
        assert torch.equal(t.load(), ref.tensors[name].load().to(torch_dtype)), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == str(torch_dtype).removeprefix("torch.")
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["bos_token_id"] == 2


def test_untied_lm_head_is_kept(tiny_models, tmp_path):
    ck = hf.read(tiny_models["gemma-mqa"])
    assert not ck.spec.tie_embeddings and "lm_head.weight" in ck.tensors
    tied = hf.read(tiny_models["gemma3"])
    assert "lm_head.weight" not in tied.tensors


def test_convert_refuses_existing_destination(tiny_models, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    assert main(["convert", str(tiny_models["gemma2"]), str(tmp_path / "out"), "--to", "hf"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"
    assert main(["convert", str(tiny_models["gemma2"]), str(tmp_path / "out"), "--to", "hf", "--overwrite"]) == 0
    assert not (tmp_path / "out" / "keep.txt").exists()


@pytest.mark.realmodel
@pytest.mark.parametrize("shard", [None, 200_000_000])
def test_demo_model_round_trip_is_bit_identical(demo_model, tmp_path, shard):
    out = hf.write(hf.read(demo_model), tmp_path / "out", max_shard_bytes=shard)
    assert len(list(out.glob("*.safetensors"))) == (1 if shard is None else 3)
    assert_bit_identical(demo_model, out)


@pytest.mark.realmodel
def test_demo_model_to_f32_passes_the_parity_gates(demo_model, tmp_path):
    """`make demo` in small: the f32 conversion of the demo model scores as the reference in transformers."""
    from validation.validate import validate

    out = tmp_path / "f32"
    assert main(["convert", str(demo_model), str(out), "--to", "hf", "--dtype", "f32"]) == 0
    report = validate(out, demo_model, n_windows=2, max_kld=1e-5, max_ppl_delta=0.01)
    assert report.metrics.tokens == 2 * 255
    assert report.passed, report.table()
