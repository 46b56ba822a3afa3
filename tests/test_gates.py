"""validate's default gates: the artifact's kind read from its own tensors, a KLD bound per kind,
shown in the report, overridden by --max-kld, switched off only by --no-default-gates; NaN always fails."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from gemport import cli
from validation.gates import DEFAULT_MAX_KLD, KINDS, _ggml_kind, artifact_kind, quant_kind
from validation.metrics import Metrics
from validation.report import make_gates

N_CTX, WINDOWS = 64, 2


def _metrics(kld: float, ppl_cand: float = 10.0) -> Metrics:
    return Metrics(
        tokens=62,
        ppl_ref=10.0,
        ppl_ref_se=0.1,
        ppl_cand=ppl_cand,
        ppl_cand_se=0.1,
        delta_ppl_pct=100 * (ppl_cand / 10.0 - 1),
        delta_ppl_pct_se=0.1,
        kld=kld,
        kld_se=0.0,
        top1_pct=99.0,
        top1_pct_se=0.1,
    )


# --- kinds ---


def test_every_kind_has_a_bound_and_coarser_kinds_never_get_tighter_ones():
    assert set(DEFAULT_MAX_KLD) == set(KINDS)
    quantized = [DEFAULT_MAX_KLD[k] for k in KINDS if k.endswith("-bit")]  # 2-bit .. 8-bit
    assert quantized == sorted(quantized, reverse=True)
    assert max(DEFAULT_MAX_KLD[k] for k in ("f32", "bf16", "f16")) < DEFAULT_MAX_KLD["8-bit"]
    # a broken float artifact of the demo model (Gemma 3 given Gemma 2's attention softcap) measures 0.006
    assert DEFAULT_MAX_KLD["f32"] < 0.006


@pytest.mark.parametrize(
    "bits, kind", [(8, "8-bit"), (16, "8-bit"), (7, "6-bit"), (6, "6-bit"), (5, "5-bit"), (4, "4-bit"), (1, "2-bit")]
)
def test_quant_kind_is_the_class_at_or_below(bits, kind):
    assert quant_kind(bits) == kind


@pytest.mark.parametrize(
    "ggml, kind",
    [
        ("F32", "f32"),
        ("F16", "f16"),
        ("BF16", "bf16"),
        ("Q8_0", "8-bit"),
        ("Q6_K", "6-bit"),
        ("Q5_1", "5-bit"),  # 6.0 bits per weight with its scales and mins: still 5-bit codes
        ("Q4_1", "4-bit"),
        ("Q4_K", "4-bit"),
        ("IQ4_XS", "4-bit"),
        ("MXFP4", "4-bit"),
        ("Q3_K", "3-bit"),
        ("IQ3_XXS", "3-bit"),
        ("Q2_K", "2-bit"),
        ("IQ1_S", "2-bit"),
        ("TQ1_0", "2-bit"),
    ],
)
def test_ggml_types_by_their_code_bits(ggml, kind):
    assert _ggml_kind(ggml) == kind


def test_every_ggml_type_has_a_kind():
    from gguf import GGML_QUANT_SIZES

    for qtype in GGML_QUANT_SIZES:
        assert _ggml_kind(qtype.name) in KINDS


@pytest.fixture(scope="module")
def src(tiny_models) -> Path:
    return tiny_models["gemma3"]  # f32


@pytest.mark.parametrize(
    "argv, fmt, kind, evidence",
    [
        (["convert", "--to", "hf"], "hf", "f32", "weight matrices F32 "),
        (["convert", "--to", "hf", "--dtype", "bf16"], "hf", "bf16", "weight matrices BF16 "),
        (["convert", "--to", "gguf", "--quant", "f16"], "gguf", "f16", "GGUF types F16 "),
        (["convert", "--to", "gguf", "--quant", "q8_0"], "gguf", "8-bit", "GGUF types Q8_0 "),
        (["convert", "--to", "gguf", "--quant", "q4_0", "--pure"], "gguf", "4-bit", "GGUF types Q4_0 "),
        (["quantize", "--bits", "8"], "hf", "8-bit", "weight matrices int8 "),
        (["quantize", "--bits", "4", "--group-size", "32"], "hf", "4-bit", "weight matrices int4 "),
        (["convert", "--to", "onnx"], "onnx", "f32", "ONNX F32 "),
        (["convert", "--to", "onnx", "--dtype", "f16"], "onnx", "f16", "ONNX F16 "),
        (["convert", "--to", "onnx", "--quant", "int4", "--head-bits", "8"], "onnx", "4-bit", "MatMulNBits int4 "),
        (["convert", "--to", "onnx", "--quant", "int8"], "onnx", "8-bit", "MatMulNBits int8 "),
    ],
)
def test_kind_comes_from_the_artifacts_tensors(src, tmp_path, capsys, argv, fmt, kind, evidence):
    dst = tmp_path / ("out.gguf" if fmt == "gguf" else "out")
    assert cli.main([argv[0], str(src), str(dst), *argv[1:]]) == 0, capsys.readouterr().err
    found = artifact_kind(dst, fmt)
    assert found.name == kind and evidence in found.evidence, found


def test_a_mixed_gguf_is_of_its_lowest_type(demo_model):
    q4_k_m = demo_model.parent / "gemma-3-270m-q4_k_m.gguf"  # the file the demo model comes from
    if not q4_k_m.is_file():
        pytest.skip("the demo GGUF is built with the demo model")
    found = artifact_kind(q4_k_m, "gguf")
    assert found.name == "4-bit" and "Q4_K" in found.evidence and "Q6_K" in found.evidence, found


# --- gates ---


def test_default_bound_applies_without_max_kld():
    gates = make_gates(_metrics(0.05), default_kld=(0.2, "default for 4-bit artifacts"))
    kld = [g for g in gates if g.name == "max-kld"]
    assert len(kld) == 1 and kld[0].passed and kld[0].limit == 0.2
    assert "(default for 4-bit artifacts)" in kld[0].describe()
    gates = make_gates(_metrics(0.05), default_kld=(1e-3, "default for f32 artifacts"))
    assert not all(g.passed for g in gates)


def test_user_bound_replaces_the_default():
    gates = make_gates(_metrics(0.05), max_kld=0.1, default_kld=(1e-3, "default for f32 artifacts"))
    kld = [g for g in gates if g.name == "max-kld"]
    assert len(kld) == 1 and kld[0].limit == 0.1 and kld[0].source == "--max-kld" and kld[0].passed


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_fails_every_gate_even_without_defaults(bad):
    gates = make_gates(_metrics(bad, ppl_cand=bad), max_ppl_delta=1e9, max_kld=1e9)
    assert [g.passed for g in gates] == [False, False, False]
    assert [g.passed for g in make_gates(_metrics(bad, ppl_cand=bad))] == [False]


# --- end to end ---


@pytest.fixture(scope="module")
def noisy(src, tmp_path_factory) -> Path:
    """The tiny model with noise on one layer's MLP, saved by transformers: a float artifact that is
    a different model (as a config field applied differently makes one)."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("gates") / "noisy"
    shutil.copytree(src, out)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        w = model.model.layers[1].mlp.down_proj.weight
        w.add_(torch.randn_like(w) * 0.5)
    model.save_pretrained(out)
    return out


def _validate(candidate: Path, reference: Path) -> list[str]:
    return ["validate", str(candidate), "--reference", str(reference), "--ctx", str(N_CTX), "--windows", str(WINDOWS)]


def test_a_different_float_model_fails_by_default(src, noisy, tmp_path, capsys):
    out = tmp_path / "v.json"
    assert cli.main([*_validate(noisy, src), "--json", str(out)]) == 1
    captured = capsys.readouterr()
    assert "artifact kind" in captured.out and "f32 (weight matrices F32 " in captured.out
    assert "default for f32 artifacts" in captured.out and "result" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "gate max-kld" in err[0] and str(noisy) in err[0], err
    data = json.loads(out.read_text())
    assert data["artifact_kind"]["kind"] == "f32" and data["passed"] is False
    gate = next(g for g in data["gates"] if g["name"] == "max-kld")
    assert gate["limit"] == DEFAULT_MAX_KLD["f32"] and gate["source"] == "default for f32 artifacts"
    assert data["metrics"]["kld"] > DEFAULT_MAX_KLD["f32"]
    # the user's bound overrides the default; --no-default-gates leaves only the finite gate
    assert cli.main([*_validate(noisy, src), "--max-kld", "10"]) == 0
    assert cli.main([*_validate(noisy, src), "--no-default-gates", "--json", str(out)]) == 0
    assert [g["name"] for g in json.loads(out.read_text())["gates"]] == ["finite"]


def test_lossless_conversions_pass_by_default(src, tmp_path, capsys):
    for fmt, dst in (("hf", tmp_path / "hf"), ("gguf", tmp_path / "m.gguf"), ("onnx", tmp_path / "onnx")):
        assert cli.main(["convert", str(src), str(dst), "--to", fmt]) == 0
        assert cli.main(_validate(dst, src)) == 0, capsys.readouterr()
        assert "PASS  KLD" in capsys.readouterr().out


def test_a_quantized_artifact_gets_its_bits_bound(src, tmp_path, capsys):
    dst = tmp_path / "q8.gguf"
    assert cli.main(["convert", str(src), str(dst), "--to", "gguf", "--quant", "q8_0"]) == 0
    assert cli.main(_validate(dst, src)) == 0
    out = capsys.readouterr().out
    assert "8-bit (GGUF types Q8_0" in out and f"<= {DEFAULT_MAX_KLD['8-bit']:g} (default for 8-bit artifacts)" in out


@pytest.mark.parametrize("flag,value", [("--max-kld", "-1"), ("--max-kld", "nan"), ("--max-ppl-delta", "-5")])
def test_a_bound_no_score_can_meet_is_refused_before_the_work(src, capsys, flag, value):
    assert cli.main([*_validate(src, src), flag, value]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert captured.out == "" and len(err) == 1 and f"{flag} must be a number >= 0" in err[0], err


def test_an_hf_folder_is_of_the_dtype_it_is_computed_in(src, tmp_path):
    """f32 tensors under a config naming bfloat16: transformers computes them in bf16, the bf16 bound applies."""
    dst = shutil.copytree(src, tmp_path / "f32-weights-bf16-config")
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config | {"dtype": "bfloat16"}))
    found = artifact_kind(dst, "hf")
    assert found.name == "bf16" and "computed in bf16 (config.json dtype)" in found.evidence, found
    (dst / "config.json").write_text(json.dumps(config | {"dtype": "float32"}))
    assert artifact_kind(dst, "hf").name == "f32"
