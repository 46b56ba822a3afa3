"""RTN records written as compressed-tensors pack-quantized HF folders, loaded by transformers.

Parity: transformers (with the compressed-tensors package) must decompress exactly what we
quantized, i.e. give the same logits as an HF model whose projections are ``record.dequantize()``.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from converters import hf
from gemport.cli import main
from gemport.errors import UnsupportedError
from quantizers.rtn import RTNConfig, quantize
from validation.runtimes import hf_transformers
from validation.runtimes.hf_transformers import TransformersRuntime

CONFIGS = {
    "int8": RTNConfig(bits=8),
    "int4-g32": RTNConfig(bits=4, group_size=32),
    "int4-g32-asym": RTNConfig(bits=4, group_size=32, symmetric=False),
    "int8-asym": RTNConfig(bits=8, symmetric=False),  # per channel: [n, 1] zero points
}
IDS = [2, 17, 99, 5, 300, 42, 7, 256, 3, 88]


def _dequantized_reference(src, quantized):
    """The source model in transformers with every quantized projection replaced by dequantize()."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in quantized.quantized().items():
            params[name].copy_(t.load().dequantize("f32"))
    return model


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("variant", ["gemma-mha", "gemma-mqa", "gemma2", "gemma3"])
def test_transformers_decompresses_exactly_our_records(tiny_models, tmp_path, variant, config):
    src = tiny_models[variant]
    quantized = quantize(hf.read(src), CONFIGS[config])
    out = hf.write(quantized, tmp_path / "out")
    runtime = TransformersRuntime(out)
    assert runtime.name.startswith("transformers + compressed-tensors 0.20.0")
    from transformers import AutoModelForCausalLM

    options = hf_transformers._compressed_tensors(out, hf.read_json(out / "config.json"))[0]
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, **options)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reference = _dequantized_reference(src, quantized)
    with torch.inference_mode():
        want = torch.log_softmax(reference(input_ids=torch.tensor([IDS])).logits[0], dim=-1)
    got = torch.from_numpy(runtime.logprobs(IDS))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    original = TransformersRuntime(src).logprobs(IDS)
    assert float(abs(original - got.numpy()).max()) > 1e-4  # the weights did change


@pytest.mark.parametrize("config", list(CONFIGS))
def test_stored_tensors_unpack_to_the_records(tiny_models, tmp_path, config):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    quantized = quantize(hf.read(tiny_models["gemma3"]), CONFIGS[config])
    out = hf.write(quantized, tmp_path / "out")
    stored = load_file(out / "model.safetensors")
    bits = CONFIGS[config].bits
    for name, t in quantized.quantized().items():
        module, record = name.removesuffix(".weight"), t.load()
        assert name not in stored
        assert stored[f"{module}.weight_packed"].dtype == torch.int32
        assert torch.equal(unpack_from_int32(stored[f"{module}.weight_packed"], bits, record.shape), record.codes)
        assert torch.equal(stored[f"{module}.weight_scale"], record.scales)
        assert stored[f"{module}.weight_shape"].tolist() == list(record.shape)
        zp = stored.get(f"{module}.weight_zero_point")
        if record.zero_points is None:
            assert zp is None
        else:
            unpacked = unpack_from_int32(zp, bits, record.zero_points.shape, packed_dim=0)
            assert torch.equal(unpacked, record.zero_points)
    for name in quantized.extra["quantization"]["kept"]:
        assert torch.equal(stored[name], quantized.tensors[name].load()), name


def test_config_and_manifest(tiny_models, tmp_path):
    quantized = quantize(hf.read(tiny_models["gemma-mqa"]), CONFIGS["int4-g32-asym"])
    out = hf.write(quantized, tmp_path / "out")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert (weights["num_bits"], weights["strategy"], weights["group_size"], weights["symmetric"]) == (
        4,
        "group",
        32,
        False,
    )
    manifest = json.loads((out / "gemport.json").read_text())["quantization"]
    assert manifest["method"] == "rtn" and manifest["config"]["group_size"] == 32
    assert "lm_head.weight" in manifest["kept"] and manifest["quantized"] == 7 * 2


def test_validate_scores_it_in_transformers(tiny_models, tmp_path):
    from validation.validate import validate

    src = tiny_models["gemma3"]
    reports = {}
    for config in ("int8", "int4-g32"):
        out = hf.write(quantize(hf.read(src), CONFIGS[config]), tmp_path / config)
        reports[config] = validate(out, src, n_ctx=64, n_windows=4)
    for report in reports.values():
        assert report.runtime.startswith("transformers + compressed-tensors") and report.runtime_kind == "parity"
        assert report.metrics.tokens > 0 and report.metrics.kld > 0
    assert "compressed-tensors" in reports["int8"].table()
    assert reports["int8"].metrics.kld < reports["int4-g32"].metrics.kld


def test_cli_quantize(tiny_models, tmp_path, capsys):
    src = tiny_models["gemma2"]
    dst = tmp_path / "q"
    assert main(["quantize", str(src), str(dst), "--bits", "4", "--group-size", "32", "--asym"]) == 0
    assert "28 tensors quantized" in capsys.readouterr().out  # 7 projections in each of 4 layers
    weights = json.loads((dst / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert weights["weights"]["symmetric"] is False and weights["weights"]["group_size"] == 32
    assert main(["quantize", str(src), str(dst), "--bits", "8"]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--bits", "4"], "group size 128 does not divide the row length 64"),
        (["--bits", "4", "--group-size", "64", "--asym", "--full-range"], "--full-range applies to symmetric"),
        (["--bits", "8", "--method", "gptq", "--grid", "4"], "--grid applies to --method awq, not gptq"),
        (["--bits", "8", "--embedding-bits", "8"], "decoder projections only"),
    ],
)
def test_cli_bad_options(tiny_models, tmp_path, capsys, args, message):
    dst = tmp_path / "q"
    assert main(["quantize", str(tiny_models["gemma2"]), str(dst), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not dst.exists() and not list(tmp_path.iterdir())


def test_cli_group_size_is_refused_by_the_parser(tiny_models, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(tiny_models["gemma2"]), str(tmp_path / "q"), "--bits", "4", "--group-size", "48"])
    assert exc.value.code == 2 and "'48' is not a group size: 32, 64, 128 or channel" in capsys.readouterr().err


def test_cli_bits_must_be_4_or_8(tiny_models, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(tiny_models["gemma2"]), str(tmp_path / "q"), "--bits", "5"])
    assert exc.value.code == 2 and "invalid choice: 5" in capsys.readouterr().err


def test_convert_quant_is_the_one_step_quantize(tiny_models, tmp_path, capsys):
    src = tiny_models["gemma2"]
    assert main(["convert", str(src), str(tmp_path / "a"), "--to", "hf", "--quant", "int4"]) == 2  # g128, 64-wide rows
    assert "group size 128 does not divide the row length 64" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "c"), "--to", "hf", "--quant", "int8"]) == 0
    assert main(["quantize", str(src), str(tmp_path / "d"), "--bits", "8"]) == 0
    for name in ("model.safetensors", "config.json", "gemport.json"):
        assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "d" / name).read_bytes(), name
    assert main(["convert", str(src), str(tmp_path / "e"), "--to", "hf", "--quant", "int8", "--dtype", "f16"]) == 2
    assert "takes no --dtype" in capsys.readouterr().err


@pytest.mark.parametrize("config", list(CONFIGS))
def test_read_back_gives_the_same_records_and_bytes(tiny_models, tmp_path, config):
    """Round trip (our reader): every record reads back equal, and writing it again gives the same
    files. The unpacking is ours; compressed-tensors' pack_to_int32 packed the bits."""
    src = tiny_models["gemma3"]
    quantized = quantize(hf.read(src), CONFIGS[config])
    out = hf.write(quantized, tmp_path / "a")
    back = hf.read(out)
    assert set(back.quantized()) == set(quantized.quantized())
    for name, t in quantized.quantized().items():
        want, got = t.load(), back.tensors[name].load()
        assert got.format == want.format and torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
        assert (got.zero_points is None) == (want.zero_points is None)
        if want.zero_points is not None:
            assert torch.equal(got.zero_points, want.zero_points)
    again = hf.write(back, tmp_path / "b")
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert main(["convert", str(out), str(tmp_path / "f32"), "--to", "hf", "--dtype", "f32"]) == 0
    name = "model.layers.1.mlp.down_proj.weight"
    dense = hf.read(tmp_path / "f32").tensors[name].load()
    assert torch.equal(dense, quantized.tensors[name].load().dequantize("f32"))


def test_reader_refuses_other_quantized_folders(tiny_models, tmp_path):
    out = hf.write(quantize(hf.read(tiny_models["gemma3"]), CONFIGS["int8"]), tmp_path / "a")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format"] = "float-quantized"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match="pack-quantized only"):
        hf.read(out)
