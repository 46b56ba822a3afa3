"""AWQ: folding leaves the function unchanged, the search beats RTN, the CLI writes a loadable folder.

Tolerances: the fold test compares fp32 logits of transformers (eager, CPU) before and after
folding random scales; 1e-4 max abs is the issue's bound, and only rounding of the folded
weights (one multiply and divide per weight) separates the two.
"""

from __future__ import annotations

import json

import pytest
import torch

from converters import hf
from gemport.cli import main
from quantizers import awq, rtn
from quantizers.calibration import CalibrationConfig
from validation.runtimes.hf_transformers import TransformersRuntime
from validation.validate import validate

FOLD_ATOL = 1e-4  # issue 5: "reference logits within 1e-4 (max abs, fp32)"
IDS = [2, 17, 99, 5, 300, 42, 7, 256, 3, 88, 120, 61, 400, 9, 33, 250, 77, 18, 501, 64, 11, 140, 2, 90]


pytestmark = pytest.mark.usefixtures("one_thread")


def _layer_tensors(ckpt, index: int) -> dict:
    prefix = f"model.layers.{index}."
    return {n.removeprefix(prefix): t for n, t in ckpt.tensors.items() if n.startswith(prefix)}


def _random_scales(ckpt, seed: int) -> dict[int, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    scales = {}
    for i in range(ckpt.spec.num_layers):
        tensors = _layer_tensors(ckpt, i)
        width = {
            g.prev: tensors[f"{g.linears[0]}.weight"].shape[1] for g in awq.layer_groups(ckpt.spec.family, tensors)
        }
        scales[i] = {prev: torch.exp(0.5 * torch.randn(n, generator=gen)) for prev, n in width.items()}
    return scales


def _logits(path) -> torch.Tensor:
    with torch.inference_mode():
        return TransformersRuntime(path).model(input_ids=torch.tensor([IDS])).logits[0]


@pytest.mark.parametrize("variant", ["gemma-mha", "gemma-mqa", "gemma2", "gemma3"])
def test_fold_keeps_logits_and_naive_norm_fold_does_not(tiny_models, tmp_path, monkeypatch, variant):
    src = tiny_models[variant]
    ckpt = hf.read(src)
    scales = _random_scales(ckpt, seed=1)
    groups = {g.prev for g in awq.layer_groups(ckpt.spec.family, _layer_tensors(ckpt, 0))}
    assert ("self_attn.v_proj" in groups) == (variant == "gemma-mha")  # v -> o only for MHA
    want = _logits(src)
    folded = awq.fold_checkpoint(ckpt, scales)
    name = "model.layers.0.input_layernorm.weight"
    assert float((folded.tensors[name].load() - ckpt.tensors[name].load()).abs().max()) > 0.1  # it did change
    got = _logits(hf.write(folded, tmp_path / "folded"))
    assert float((got - want).abs().max()) < FOLD_ATOL
    # AutoAWQ's scale_ln_fcs fold (w / s) is right for Llama's x * w norm, wrong for Gemma's x * (1 + w).
    monkeypatch.setattr(awq, "fold_norm", lambda w, s: w / s)
    naive = _logits(hf.write(awq.fold_checkpoint(ckpt, scales), tmp_path / "naive"))
    assert float((naive - want).abs().max()) > 100 * FOLD_ATOL


def test_awq_beats_rtn_kld(tiny_models, tmp_path, corpus):
    src = tiny_models["gemma3"]
    ckpt = hf.read(src)
    calibration = CalibrationConfig(tokens=1024, n_ctx=128, corpus=str(corpus))
    quantized = awq.quantize(ckpt, awq.AWQConfig(group_size=32, calibration=calibration))
    manifest = quantized.extra["quantization"]
    assert manifest["method"] == "awq" and manifest["quantized"] == 7 * ckpt.spec.num_layers
    out_awq = hf.write(quantized, tmp_path / "awq")
    out_rtn = hf.write(rtn.quantize(ckpt, rtn.RTNConfig(bits=4, group_size=32)), tmp_path / "rtn")
    got = {
        name: validate(out, src, corpus=corpus, n_ctx=128, n_windows=16).to_json()["metrics"]
        for name, out in (("awq", out_awq), ("rtn", out_rtn))
    }
    assert got["awq"]["tokens"] == got["rtn"]["tokens"] > 500
    # Lower by more than two standard errors of the RTN estimate.
    assert got["awq"]["kld"] < got["rtn"]["kld"] - 2 * got["rtn"]["kld_se"], got


def test_cli_awq_writes_a_folder_transformers_loads(tiny_models, tmp_path, corpus):
    src, dst = tiny_models["gemma2"], tmp_path / "awq"
    argv = ["quantize", str(src), str(dst), "--method", "awq", "--bits", "4", "--group-size", "32"]
    assert main([*argv, "--corpus", str(corpus), "--calib-tokens", "256", "--calib-ctx", "64", "--grid", "4"]) == 0
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] == 32
    manifest = json.loads((dst / "gemport.json").read_text())["quantization"]
    assert manifest["method"] == "awq" and manifest["config"]["calibration"]["tokens"] == 256
    got, want = _logits(dst), _logits(src)
    assert bool(torch.isfinite(got).all())
    assert 0 < float((got - want).abs().max()) < 0.5 * float(want.abs().max())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--bits", "8"], "AWQ quantizes to 4 bits"),
        (["--bits", "4", "--group-size", "channel"], "AWQ --group-size must be 32, 64 or 128"),
        (["--bits", "4", "--calib-tokens", "0"], "--calib-tokens: 0 is not a positive integer"),
        (["--bits", "4", "--calib-ctx", "1"], "--calib-ctx must be at least 2"),
        (["--bits", "4", "--grid", "0"], "--grid: 0 is not a positive integer"),
        (["--bits", "4", "--embedding-bits", "8"], "--embedding-bits applies to --method rtn"),
        (["--bits", "4"], "group size 128 does not divide the row length 64"),
        (["--bits", "4", "--group-size", "32", "--calib-tokens", "100000000"], "fewer than the 100000256 asked"),
    ],
)
def test_cli_awq_bad_options(tiny_models, tmp_path, capsys, extra, message):
    argv = ["quantize", str(tiny_models["gemma3"]), str(tmp_path / "out"), "--method", "awq", *extra]
    try:
        code = main(argv)
    except SystemExit as exc:  # refused by the option parser
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("gemport") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_cli_rtn_refuses_awq_options(tiny_models, tmp_path, capsys):
    argv = ["quantize", str(tiny_models["gemma3"]), str(tmp_path / "out"), "--bits", "4", "--no-clip"]
    assert main(argv) == 2
    assert "--no-clip applies to --method awq, not rtn" in capsys.readouterr().err
