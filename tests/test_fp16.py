"""fp16 artifacts of Gemma 2/3: every writer that offers f16 makes the artifact safe or refuses it,
and validate scores an HF candidate in the dtype its users load it in.

The overflowing models are tiny Gemma 2/3 whose norm weights (``1 + w``) push activations past
fp16's 65504, as the residual stream of the real Gemma 3 270M does (1e5, layer 14)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from converters import hf
from converters import onnx as onnx_conv
from gemport.cli import main
from quantizers import fp16_range
from tests.tiny import make_tiny
from validation.runtimes import runtime_for
from validation.validate import validate


def scaled(src: Path, dst: Path, suffix: str, value: float, first: bool = False) -> Path:
    """A copy of the tiny checkpoint ``src`` with every tensor ending in ``suffix`` set to ``value``
    (only its first element when ``first``)."""
    make = dst / "model.safetensors"
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    sd = load_file(src / "model.safetensors")
    for k in sd:
        if k.endswith(suffix):
            if first:
                sd[k].view(-1)[0] = value
            else:
                sd[k] = torch.full_like(sd[k], value)
    save_file(sd, make, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp16")
    out = {}
    for variant in ("gemma2", "gemma3"):
        plain = make_tiny(variant, root / variant)
        out[variant] = plain
        # post-feedforward norm output ~ 3e4 * rms-normalized values: the residual stream passes 65504
        out[f"{variant}-residual"] = scaled(
            plain, root / f"{variant}-residual", "post_feedforward_layernorm.weight", 3e4
        )
    # input norm output (a matmul input) past 65504: no writer can keep it in fp16
    out["gemma3-matmul-input"] = scaled(out["gemma3"], root / "gemma3-matmul-input", "input_layernorm.weight", 3e4)
    # the PAD row of the (tied) embedding: never looked up, so only the weight check can see it
    out["gemma3-weight"] = scaled(out["gemma3"], root / "gemma3-weight", "embed_tokens.weight", 1e5, first=True)
    return out


def convert(src: Path, dst: Path, to: str, *extra: str) -> int:
    return main(["convert", str(src), str(dst), "--to", to, "--dtype", "f16", *extra])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_probe_finds_the_overflowing_point(models):
    peaks = fp16_range.activation_peaks(hf.read(models["gemma3-residual"]))
    layer, point, value = fp16_range.worst(peaks, fp16_range.ALL)
    assert point.startswith("residual") and value > fp16_range.FP16_MAX
    # what onnxruntime-genai's layout keeps in fp16 stays far below the limit
    assert fp16_range.worst(peaks, fp16_range.FP32_RESIDUAL)[2] < 1000
    plain = fp16_range.activation_peaks(hf.read(models["gemma3"]))
    assert fp16_range.worst(plain, fp16_range.ALL)[2] < 1000


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("variant", ["gemma2-residual", "gemma3-residual", "gemma3"])
def test_onnx_f16_keeps_the_residual_stream_in_float32_and_validates(models, corpus, tmp_path, variant, fused):
    src = models[variant]
    out = onnx_conv.write(hf.read(src), tmp_path / "onnx", dtype="f16", fused=fused)
    manifest = json.loads((out / "gemport.json").read_text())["fp16_check"]
    assert manifest["fp16_peak"]["value"] < fp16_range.FP16_MAX
    report = validate(out, src, corpus=corpus, n_ctx=64, n_windows=2)
    assert report.runtime_kind == "parity" and report.passed
    assert np.isfinite(report.metrics.kld) and report.metrics.kld < 1e-3, report.metrics
    # the stored norm weights are float32 (the residual side), the projections fp16
    import onnx

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    types = {i.name: i.data_type for i in graph.initializer}
    assert types["model.layers.0.post_feedforward_layernorm.weight"] == onnx.TensorProto.FLOAT
    assert types["model.norm.weight"] == onnx.TensorProto.FLOAT
    assert onnx.TensorProto.FLOAT16 in {types[n] for n in types if "proj" in n}


@pytest.mark.parametrize("to", ["hf", "onnx", "gguf"])
def test_matmul_input_overflow_is_refused_in_one_line(models, tmp_path, capsys, to):
    src = models["gemma3-matmul-input"]
    assert convert(src, tmp_path / "out", to) == 2
    err = one_line_error(capsys)
    assert str(src) in err and "input norm output" in err and "65504" in err and re.search(r"layer \d+ ", err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("variant", ["gemma2-residual", "gemma3-residual"])
def test_hf_f16_refuses_residual_overflow_and_validate_fails_when_forced(models, corpus, tmp_path, capsys, variant):
    src = models[variant]
    assert convert(src, tmp_path / "out", "hf") == 2
    err = one_line_error(capsys)
    assert str(src) in err and "residual stream" in err and "65504" in err and "--allow-fp16-overflow" in err
    assert not (tmp_path / "out").exists()
    # forced: written, and validate scores it in fp16 (as transformers loads it), so it cannot pass
    assert convert(src, tmp_path / "out", "hf", "--allow-fp16-overflow") == 0
    report = validate(tmp_path / "out", src, corpus=corpus, n_ctx=64, n_windows=2)
    assert "float16" in report.runtime and not report.passed
    assert not np.isfinite(report.metrics.kld) or not np.isfinite(report.metrics.ppl_cand)
    # that f16 folder as a source, its dtype kept: refused the same way
    assert main(["convert", str(tmp_path / "out"), str(tmp_path / "again"), "--to", "hf"]) == 2
    assert "the source's dtype" in one_line_error(capsys) and not (tmp_path / "again").exists()


def test_gguf_f16_computes_the_residual_in_float32_so_a_residual_overflow_converts(models, tmp_path):
    # llama.cpp keeps the residual stream and norm outputs in float32: nothing to refuse
    assert convert(models["gemma3-residual"], tmp_path / "m.gguf", "gguf") == 0


@pytest.mark.parametrize("to", ["hf", "onnx", "gguf", "jax"])
def test_a_weight_beyond_fp16_is_refused_naming_the_tensor(models, tmp_path, capsys, to):
    assert convert(models["gemma3-weight"], tmp_path / "out", to) == 2
    err = one_line_error(capsys)
    assert "model.embed_tokens.weight" in err and "1e+05" in err and "65504" in err
    assert not (tmp_path / "out").exists()


def test_hf_f16_candidate_is_scored_in_fp16(models, corpus, tmp_path):
    src = models["gemma3"]
    assert convert(src, tmp_path / "out", "hf") == 0
    runtime = runtime_for(tmp_path / "out", "hf")
    assert runtime.name == "transformers (float16, sdpa attention, CPU)" and runtime.model.dtype == torch.float16
    report = validate(tmp_path / "out", src, corpus=corpus, n_ctx=64, n_windows=2)
    assert report.reference_runtime == "transformers (fp32, CPU)"
    assert report.passed and 0 < report.metrics.kld < 1e-3, report.metrics


@pytest.mark.parametrize(
    "variant,dtype,attention",
    [
        ("gemma3", "float32", "eager"),  # as the reference computes: a lossless copy scores KLD 0
        ("gemma3", "bfloat16", "sdpa"),  # transformers' default, as from_pretrained gives it
        ("gemma-mqa", "float16", "sdpa"),
        ("gemma2", "bfloat16", "eager"),  # attention softcap: transformers' Gemma 2 has no sdpa
    ],
)
def test_candidate_attention(tmp_path, variant, dtype, attention):
    runtime = runtime_for(make_tiny(variant, tmp_path / "m", dtype=dtype), "hf")
    assert runtime.model.config._attn_implementation == attention
    assert ("sdpa attention" in runtime.name) == (attention == "sdpa")


def test_gemma3_attention_softcap_is_not_applied_with_sdpa_either(tmp_path):
    # transformers' Gemma 3 never passes attn_logit_softcapping to its attention (the reference's
    # semantics, which every writer follows): sdpa loses nothing by having no softcap
    tokens = [2, *range(10, 40)]
    plain, capped = (
        runtime_for(make_tiny("gemma3", tmp_path / name, dtype="bfloat16", **cap), "hf")
        for name, cap in (("plain", {}), ("capped", {"attn_logit_softcapping": 1.0}))
    )
    assert capped.model.config._attn_implementation == "sdpa"
    np.testing.assert_array_equal(capped.scored_logits(tokens, 16, 15), plain.scored_logits(tokens, 16, 15))


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_non_overflowing_model_through_every_f16_writer(models, tmp_path, variant):
    # llama.cpp assumes query_pre_attn_scalar from the size for gemma2: the tiny one has no GGUF
    for to in ("hf", "onnx", "gguf", "jax") if variant == "gemma3" else ("hf", "onnx"):
        assert convert(models[variant], tmp_path / to, to) == 0, to


def test_onnx_without_tokenizer_files_warns_naming_the_source(models, tmp_path, caplog):
    import dataclasses

    ckpt = dataclasses.replace(hf.read(models["gemma3"]), tokenizer_files={})
    with caplog.at_level(logging.WARNING, logger="converters.onnx"):
        onnx_conv.write(ckpt, tmp_path / "out")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(models["gemma3"]) in warnings[0] and "tokenizer" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="converters.onnx"):
        onnx_conv.write(hf.read(models["gemma3"]), tmp_path / "with")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.realmodel
def test_demo_model_residual_outgrows_fp16_but_onnxs_fp16_parts_do_not(demo_model):
    """The Gemma 3 270M: its residual stream passes 65504 (so HF f16 is refused), while what the ONNX
    f16 graph and llama.cpp's F16 matmuls hold in fp16 stays far below (measured 452 and 294; the
    demo's ONNX f16 validates at KLD 1e-6 on 4 windows of 512)."""
    peaks = fp16_range.activation_peaks(hf.read(demo_model))
    layer, point, value = fp16_range.worst(peaks, fp16_range.ALL)
    assert point.startswith("residual") and value > fp16_range.FP16_MAX
    assert fp16_range.worst(peaks, fp16_range.FP32_RESIDUAL)[2] * 10 < fp16_range.FP16_MAX
    assert fp16_range.worst(peaks, fp16_range.MATMUL_INPUTS)[2] * 10 < fp16_range.FP16_MAX


def test_gguf_of_an_f16_source_kept_as_f16_is_checked_too(models, tmp_path, capsys):
    assert convert(models["gemma3-matmul-input"], tmp_path / "f16", "hf", "--allow-fp16-overflow") == 0
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "f16"), str(tmp_path / "m.gguf"), "--to", "gguf"]) == 2
    assert "input norm output" in one_line_error(capsys) and not (tmp_path / "m.gguf").exists()


def test_gguf_f16_with_the_flag_skips_the_probe_and_says_so(models, tmp_path, caplog, monkeypatch):
    """--allow-fp16-overflow writes the GGUF without running the probe (a 7B's probe costs as much as
    the write), and the warning says the activations were not checked."""

    def no_probe(*args, **kwargs):
        raise AssertionError("the probe ran")

    monkeypatch.setattr(fp16_range, "check_fp16", no_probe)
    out = tmp_path / "m.gguf"
    assert convert(models["gemma3-matmul-input"], out, "gguf", "--allow-fp16-overflow") == 0
    assert out.is_file() and "fp16 activations not checked" in caplog.text
