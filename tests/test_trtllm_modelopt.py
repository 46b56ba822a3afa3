"""gemport's TensorRT-LLM checkpoints against NVIDIA ModelOpt's exporter, the real producer (oracle).

ModelOpt 0.37.0 runs in its own pinned environment (``make modelopt-venv``, requirements/
modelopt-runtime.txt) through tests/modelopt_export.py, which imports no gemport code. It exports Gemma 1
only (Gemma 2 and 3 need TensorRT-LLM itself, which cannot be installed without NVIDIA's index).

- bf16 at tp 1 and 2, MHA and MQA: the same rank files, tensor names, shapes, dtypes and bytes, and the
  same config.json values where both write a field; the differences that remain are listed in
  CONFIG_DIFFERENCES.
- W4A16_AWQ: ModelOpt's AWQ checkpoint read by gemport's reader: the codes are exactly ModelOpt's rule,
  round(W' / s) clamped, and the dequantized weights equal ModelOpt's own fake-quantized ones but at
  exact rounding ties (ModelOpt's fake quant rounds x * (7 / amax), its export x / (amax / 7)), where they
  are one step apart; the reader's float view, pre-quant scales multiplied in, is what the kernel computes.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from converters import hf, trtllm
from tests.conftest import ROOT

VENV_PYTHON = ROOT / "build" / "modelopt-venv" / "bin" / "python"
SCRIPT = ROOT / "tests" / "modelopt_export.py"

pytestmark = pytest.mark.skipif(
    not VENV_PYTHON.is_file(), reason="ModelOpt's environment (build/modelopt-venv, `make modelopt-venv`) is absent"
)

# config.json fields both write with different values, and why:
CONFIG_DIFFERENCES = {
    # ModelOpt writes float16 logits for a bfloat16 model (model_config_export.py); TensorRT-LLM's own
    # default, and gemport's, is float32: the logits of a model with a 256k vocabulary lose nothing then.
    "logits_dtype",
}
# Fields only ModelOpt writes: its producer stamp, the writing rank, and defaults TensorRT-LLM's
# PretrainedConfig already has (residual_mlp, rotary_pct, rmsnorm, lm_head_bias, decoder).
MODELOPT_ONLY = {"producer", "rank", "decoder", "residual_mlp", "rotary_pct", "rmsnorm", "lm_head_bias"}


def modelopt_export(src: Path, out: Path, tp: int, *extra: str) -> Path:
    argv = [str(VENV_PYTHON), str(SCRIPT), str(src), str(out), "--dtype", "bf16", "--tp", str(tp), *extra]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def rank_bytes(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    from safetensors import safe_open

    out = {}
    with safe_open(path, "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            out[name] = (str(t.dtype), list(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("variant", ["gemma-mha", "gemma-mqa"])
def test_bf16_checkpoint_equals_modelopts(tiny_models, tmp_path, variant, tp):
    theirs = modelopt_export(tiny_models[variant], tmp_path / "modelopt", tp)
    ours = trtllm.write(hf.read(tiny_models[variant]), tmp_path / "gemport", dtype="bf16", tp_size=tp)
    for rank in range(tp):
        a, b = rank_bytes(ours / f"rank{rank}.safetensors"), rank_bytes(theirs / f"rank{rank}.safetensors")
        assert sorted(a) == sorted(b)
        for name in a:
            assert a[name][:2] == b[name][:2], name
            assert a[name][2] == b[name][2], f"{name}: bytes differ"
    ours_cfg = json.loads((ours / "config.json").read_text())
    theirs_cfg = json.loads((theirs / "config.json").read_text())
    common = (set(ours_cfg) & set(theirs_cfg)) - CONFIG_DIFFERENCES
    assert {k: ours_cfg[k] for k in common} == {k: theirs_cfg[k] for k in common}
    assert set(theirs_cfg) - set(ours_cfg) == MODELOPT_ONLY
    assert {k for k in CONFIG_DIFFERENCES if ours_cfg[k] != theirs_cfg[k]} == CONFIG_DIFFERENCES


@pytest.fixture(scope="module")
def awq_exports(tiny_models, tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("modelopt-awq")
    return {
        tp: modelopt_export(tiny_models["gemma-mha"], root / f"tp{tp}", tp, "--awq", "--group-size", "32")
        for tp in (1, 2)
    }


HF_MODULES = {  # TensorRT-LLM module -> the HF modules it holds, in its row order
    "attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.dense": ("self_attn.o_proj",),
    "mlp.fc": ("mlp.gate_proj",),
    "mlp.gate": ("mlp.up_proj",),
    "mlp.proj": ("mlp.down_proj",),
}


@pytest.mark.parametrize("tp", [1, 2])
def test_modelopt_awq_read_and_dequantized_equals_its_fake_quant(awq_exports, tp):
    from safetensors.torch import load_file

    path = awq_exports[tp]
    fake = load_file(path / "fake_quant.safetensors")
    cfg, spec, mapping = trtllm.read_config(path)
    joined = trtllm.joined_tensors(path, spec, mapping, cfg)
    ties = total = 0
    for i in range(spec.num_layers):
        for module, hf_modules in HF_MODULES.items():
            record = joined[f"transformer.layers.{i}.{module}.weight"].load()
            names = [f"model.layers.{i}.{m}" for m in hf_modules]
            w = torch.cat([fake[f"{n}.weight"] for n in names]).float()  # W', the weight as exported
            scale = record.scales.float().repeat_interleave(32, 1)
            assert record.scales.dtype == torch.float32  # ModelOpt keeps float32 scales
            assert torch.equal(record.codes, torch.round(w / scale).clamp(-8, 7).to(torch.int8)), module
            fake_w = torch.cat([fake[f"{n}.fake_weight"] for n in names])  # in the model dtype
            diff = (record.dequantize("f32").to(fake_w.dtype).float() - fake_w.float()).abs()
            off = diff > 0
            tie = ((w / scale).abs() % 1 - 0.5).abs() < 1e-5
            assert bool((off <= tie).all()), f"{module}: a difference that is no rounding tie"
            step = diff[off] / scale[off]  # one step, give or take the bf16 rounding of both weights
            assert bool(((step > 0.9) & (step < 1.1)).all()), "a tie is one step apart"
            ties, total = ties + int(off.sum()), total + off.numel()
            pre = joined[f"transformer.layers.{i}.{module}.prequant_scaling_factor"].load()
            assert torch.equal(pre, fake[f"{names[0]}.pre_quant_scale"])  # q/k/v share one
    assert ties < total * 1e-3, (ties, total)


def test_modelopt_awq_checkpoint_reads_as_what_the_kernel_computes(awq_exports):
    """The canonical reader folds the pre-quant scales into float weights: y = x @ (W * s).T."""
    path = awq_exports[2]
    cfg, spec, mapping = trtllm.read_config(path)
    joined = trtllm.joined_tensors(path, spec, mapping, cfg)
    ckpt = trtllm.read(path)
    for module, name in (("mlp.proj", "mlp.down_proj"), ("attention.dense", "self_attn.o_proj")):
        t = ckpt.tensors[f"model.layers.1.{name}.weight"]
        assert t.quant is None and t.dtype == "f32"
        record = joined[f"transformer.layers.1.{module}.weight"].load()
        pre = joined[f"transformer.layers.1.{module}.prequant_scaling_factor"].load()
        assert not bool((pre == 1).all())
        assert torch.equal(t.load(), record.dequantize("f32") * pre.float())


def test_gemports_awq_records_in_modelopts_layout(awq_exports, tiny_models, tmp_path):
    """gemport's own int4 records written in the layout ModelOpt exports: the same names, shapes and
    config block (scales in the checkpoint dtype where ModelOpt keeps float32; TensorRT-LLM casts them to
    the checkpoint dtype at load)."""
    from quantizers.rtn import RTNConfig, quantize

    records = quantize(hf.read(tiny_models["gemma-mha"]), RTNConfig(bits=4, group_size=32, scale_dtype="bf16"))
    ours = trtllm.write(records, tmp_path / "ours", dtype="bf16", tp_size=2)
    theirs = awq_exports[2]
    for rank in (0, 1):
        a, b = rank_bytes(ours / f"rank{rank}.safetensors"), rank_bytes(theirs / f"rank{rank}.safetensors")
        assert sorted(a) == sorted(b)
        for name in a:
            scale = name.endswith("weights_scaling_factor")
            assert a[name][1] == b[name][1] and (a[name][0] == b[name][0] or scale), name
    q = lambda p: json.loads((p / "config.json").read_text())["quantization"]  # noqa: E731
    assert q(ours) == q(theirs)
