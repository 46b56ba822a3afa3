"""TensorRT-LLM checkpoints: layout and sharding, round trips, the layout runtime against transformers,
bad input. The ModelOpt oracle is tests/test_trtllm_modelopt.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from converters import hf, trtllm
from gemport.cli import main
from tests.test_bad_input import assert_nothing_left, assert_one_line_error
from validation.validate import validate

VARIANTS = ("gemma-mha", "gemma-mqa", "gemma2", "gemma3")
# (tp, pp): the tiny models have 4 heads and 1, 2 or 4 KV heads; pp 2 puts one or two layers per stage.
MAPPINGS = ((1, 1), (2, 1), (4, 1), (2, 2))
TORCH = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _write(src: Path, dst: Path, dtype: str = "f32", tp: int = 1, pp: int = 1) -> Path:
    return trtllm.write(hf.read(src), dst, dtype=dtype, tp_size=tp, pp_size=pp)


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("tp,pp", MAPPINGS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_is_exact(tiny_models, tmp_path, variant, tp, pp, dtype):
    src = hf.read(tiny_models[variant])
    back = trtllm.read(_write(tiny_models[variant], tmp_path / "out", dtype, tp, pp))
    assert back.spec == src.spec
    assert set(back.tensors) == set(src.tensors)
    for name, t in src.tensors.items():
        got = back.tensors[name].load()
        if t.shape == (src.spec.hidden_size,) or name.endswith("_norm.weight"):  # stored as 1 + w
            got, want = (got + 1).to(TORCH[dtype]), (t.load().float() + 1).to(TORCH[dtype])
        else:
            want = t.load().to(TORCH[dtype])
        assert torch.equal(got, want), name


def test_rank_files_follow_the_sharding_rules(tiny_models, tmp_path):
    """MQA at tp 2: q split by heads, the one KV head on both ranks, fc/gate by rows, dense/proj by
    columns, norms and embedding whole, the LM head by vocabulary rows, norms as 1 + w."""
    from safetensors.torch import load_file

    src = hf.read(tiny_models["gemma-mqa"])
    out = _write(tiny_models["gemma-mqa"], tmp_path / "out", "f32", tp=2)
    w = {n: t.load() for n, t in src.tensors.items()}
    ranks = [load_file(out / f"rank{r}.safetensors") for r in range(2)]
    p, d = "model.layers.1.", 16
    for r, rank in enumerate(ranks):
        qkv = rank["transformer.layers.1.attention.qkv.weight"]
        q = w[p + "self_attn.q_proj.weight"][r * 2 * d : (r + 1) * 2 * d]
        assert torch.equal(qkv, torch.cat([q, w[p + "self_attn.k_proj.weight"], w[p + "self_attn.v_proj.weight"]]))
        assert torch.equal(
            rank["transformer.layers.1.mlp.fc.weight"], w[p + "mlp.gate_proj.weight"][r * 64 : (r + 1) * 64]
        )
        assert torch.equal(
            rank["transformer.layers.1.mlp.gate.weight"], w[p + "mlp.up_proj.weight"][r * 64 : (r + 1) * 64]
        )
        assert torch.equal(
            rank["transformer.layers.1.mlp.proj.weight"], w[p + "mlp.down_proj.weight"][:, r * 64 : (r + 1) * 64]
        )
        assert torch.equal(
            rank["transformer.layers.1.attention.dense.weight"],
            w[p + "self_attn.o_proj.weight"][:, r * 32 : (r + 1) * 32],
        )
        assert torch.equal(
            rank["transformer.layers.1.post_layernorm.weight"], w[p + "post_attention_layernorm.weight"] + 1
        )
        assert torch.equal(rank["transformer.vocab_embedding.weight"], w["model.embed_tokens.weight"])
        assert torch.equal(rank["lm_head.weight"], w["lm_head.weight"][r * 256 : (r + 1) * 256])


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_states_every_field_the_model_reads(tiny_models, tmp_path, variant):
    src = hf.read(tiny_models[variant])
    spec = src.spec
    cfg = json.loads((_write(tiny_models[variant], tmp_path / "out", "bf16", tp=2) / "config.json").read_text())
    assert cfg["architecture"] == trtllm.ARCHITECTURES[spec.family]
    assert cfg["dtype"] == "bfloat16" and cfg["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_size"]) == (4, spec.num_kv_heads, 16)
    assert cfg["rotary_base"] == spec.rope_theta and cfg["norm_epsilon"] == spec.rms_eps
    if spec.family == "gemma":
        assert "query_pre_attn_scalar" not in cfg and "sliding_window" not in cfg
    if spec.family == "gemma2":
        assert (cfg["query_pre_attn_scalar"], cfg["attn_logit_softcapping"], cfg["final_logit_softcapping"]) == (
            24,
            50.0,
            30.0,
        )
    if spec.family == "gemma3":
        assert cfg["rope_local_base_freq"] == 1e4 and cfg["_sliding_window_pattern"] == 2
        assert cfg["rotary_scaling"] == {"type": "linear", "factor": 2.0} and cfg["sliding_window"] == 16


@pytest.mark.parametrize("tp,pp", MAPPINGS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_layout_runtime_matches_transformers(tiny_models, corpus, tmp_path, variant, tp, pp):
    out = _write(tiny_models[variant], tmp_path / "out", "f32", tp, pp)
    report = validate(out, tiny_models[variant], corpus, n_ctx=64, n_windows=2)
    assert report.runtime_kind == "layout" and "not TensorRT-LLM" in report.runtime
    assert abs(report.metrics.kld) < 1e-6 and report.metrics.top1_pct == 100.0, report.metrics


def test_the_layout_runtime_can_fail(tiny_models, corpus, tmp_path):
    """A checkpoint whose config.json misstates one field the model reads scores far from the reference."""
    out = _write(tiny_models["gemma3"], tmp_path / "out", "f32", tp=2)
    cfg = json.loads((out / "config.json").read_text())
    cfg["rope_local_base_freq"] = cfg["rotary_base"]
    (out / "config.json").write_text(json.dumps(cfg))
    report = validate(out, tiny_models["gemma3"], corpus, n_ctx=64, n_windows=2, default_gates=False)
    assert report.metrics.kld > 1e-4, report.metrics


def test_convert_writes_the_build_script_and_says_so(tiny_models, tmp_path, capsys):
    dst = tmp_path / "out"
    assert main(["convert", str(tiny_models["gemma2"]), str(dst), "--to", "trtllm", "--tp-size", "2"]) == 0
    printed = capsys.readouterr().out
    script = (dst / trtllm.BUILD_SCRIPT).read_text()
    assert "trtllm-build --checkpoint_dir" in script and "trtllm-build --checkpoint_dir" in printed
    assert {p.name for p in dst.iterdir()} >= {
        "config.json",
        "rank0.safetensors",
        "rank1.safetensors",
        "tokenizer.model",
    }


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "variant,tp,words",
    [
        ("gemma-mha", 3, "tp_size 3 does not divide the 4 attention heads"),
        ("gemma-mha", 8, "tp_size 8 does not divide the 4 attention heads"),
        ("gemma2", 4, None),  # 2 KV heads at tp 4: each copied to 2 ranks, allowed
    ],
)
def test_tp_that_does_not_divide_the_heads_is_refused(tiny_models, tmp_path, capsys, variant, tp, words):
    dst = tmp_path / "out"
    code = main(["convert", str(tiny_models[variant]), str(dst), "--to", "trtllm", "--tp-size", str(tp)])
    if words is None:
        assert code == 0
        return
    assert_one_line_error(code, capsys.readouterr().err, str(tiny_models[variant]), words)
    assert_nothing_left(dst)


def _damaged(tiny_models, tmp_path, damage) -> Path:
    folder = _write(tiny_models["gemma3"], tmp_path / "ckpt", "bf16", tp=2)
    damage(folder)
    return folder


def _edit_config(**changes):
    def damage(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if isinstance(value, dict):
                cfg[key] = cfg.get(key, {}) | value
            else:
                cfg[key] = value
        (folder / "config.json").write_text(json.dumps(cfg))

    return damage


def _truncate(folder: Path) -> None:
    data = (folder / "rank1.safetensors").read_bytes()
    (folder / "rank1.safetensors").write_bytes(data[: len(data) // 2])


def _swap_ranks(folder: Path) -> None:  # rank files of another mapping: tp 1 written as if tp 2
    other = _write(Path(json.loads((folder / "gemport.json").read_text())["source"]), folder.parent / "tp1", "bf16")
    shutil.copy(other / "rank0.safetensors", folder / "rank0.safetensors")


BAD = {
    "rank file missing": (lambda f: (f / "rank1.safetensors").unlink(), "", "rank1.safetensors is missing"),
    "more ranks than files": (
        _edit_config(mapping={"world_size": 4, "tp_size": 4, "pp_size": 1}),
        "",
        "rank2.safetensors is missing",
    ),
    "world size lies": (_edit_config(mapping={"world_size": 3}), "config.json", "world_size 3"),
    "truncated rank file": (_truncate, "rank1.safetensors", "truncated"),
    "rank file of another mapping": (_swap_ranks, "rank0.safetensors", "transformer.layers.0.attention.qkv.weight"),
    "not a gemma": (_edit_config(architecture="LlamaForCausalLM"), "config.json", "LlamaForCausalLM"),
    "bad field": (_edit_config(num_hidden_layers="4"), "config.json", "num_hidden_layers"),
    "bad dtype": (_edit_config(dtype="int8"), "config.json", "dtype"),
    "unknown quant algo": (_edit_config(quantization={"quant_algo": "FP8"}), "config.json", "FP8"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_is_one_line(tiny_models, tmp_path, capsys, case):
    damage, file_name, words = BAD[case]
    folder = _damaged(tiny_models, tmp_path, damage)
    dst = tmp_path / "dst"
    code = main(["convert", str(folder), str(dst), "--to", "hf"])
    assert_one_line_error(code, capsys.readouterr().err, str(folder / file_name) if file_name else str(folder), words)
    assert_nothing_left(dst)


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--to", "hf", "--tp-size", "2"], "--tp-size and --pp-size apply to --to trtllm"),
        (["--to", "trtllm", "--quant", "int4"], "--to trtllm takes --quant w8a16"),
        (["--to", "trtllm", "--quant", "w4a16", "--group-size", "64"], "takes no --group-size"),
        (["--to", "hf", "--quant", "w4a16-awq"], "is for --to trtllm"),
        (["--to", "trtllm", "--max-shard-size", "1M"], "--max-shard-size does not apply to --to trtllm"),
        (["--to", "gguf", "--group-size", "64"], "--group-size applies to --to trtllm"),
    ],
)
def test_options_of_other_targets_are_refused(tiny_models, tmp_path, capsys, argv, words):
    dst = tmp_path / "out"
    code = main(["convert", str(tiny_models["gemma-mha"]), str(dst), *argv])
    assert_one_line_error(code, capsys.readouterr().err, words)
    assert_nothing_left(dst)
