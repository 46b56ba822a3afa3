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
# TensorRT-LLM scales the sliding layers' rope too, so the Gemma 3 TensorRT-LLM can compute has no rope scaling
# (the scaled tiny Gemma 3: test_rope_scaling_of_gemma3_is_a_stated_choice).
UNSCALED = {
    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
}


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The tiny variants, Gemma 3 without rope scaling."""
    from tests.tiny import make_tiny

    gemma3 = make_tiny("gemma3", tmp_path_factory.mktemp("trtllm") / "gemma3", rope_parameters=UNSCALED)
    return {**tiny_models, "gemma3": gemma3}


# (tp, pp): the tiny models have 4 heads and 1, 2 or 4 KV heads; pp 2 puts one or two layers per stage.
MAPPINGS = ((1, 1), (2, 1), (4, 1), (2, 2))
TORCH = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _write(src: Path, dst: Path, dtype: str = "f32", tp: int = 1, pp: int = 1) -> Path:
    return trtllm.write(hf.read(src), dst, dtype=dtype, tp_size=tp, pp_size=pp)


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("tp,pp", MAPPINGS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_is_exact(models, tmp_path, variant, tp, pp, dtype):
    src = hf.read(models[variant])
    back = trtllm.read(_write(models[variant], tmp_path / "out", dtype, tp, pp))
    assert back.spec == src.spec  # a tied model at pp > 1 (its head stored on the last stage) reads back tied
    assert set(back.tensors) == set(src.tensors)
    for name, t in src.tensors.items():
        got = back.tensors[name].load()
        if t.shape == (src.spec.hidden_size,) or name.endswith("_norm.weight"):  # stored as 1 + w
            got, want = (got + 1).to(TORCH[dtype]), (t.load().to(TORCH[dtype]).float() + 1).to(TORCH[dtype])
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
        embed = rank["transformer.vocab_embedding.weight"]  # use_parallel_embedding: tp_size > 1 for Gemma
        assert torch.equal(embed, w["model.embed_tokens.weight"][r * 256 : (r + 1) * 256])
        assert torch.equal(rank["lm_head.weight"], w["lm_head.weight"][r * 256 : (r + 1) * 256])


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_states_every_field_the_model_reads(models, tmp_path, variant):
    src = hf.read(models[variant])
    spec = src.spec
    cfg = json.loads((_write(models[variant], tmp_path / "out", "bf16", tp=2) / "config.json").read_text())
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
        assert cfg["rotary_base"] == 1e6 and cfg["rotary_scaling"] is None and cfg["sliding_window"] == 16
    assert cfg["share_embedding_table"] == spec.tie_embeddings and cfg["use_parallel_embedding"] is True


@pytest.mark.parametrize("tp,pp", MAPPINGS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_layout_runtime_matches_transformers(models, corpus, tmp_path, variant, tp, pp):
    out = _write(models[variant], tmp_path / "out", "f32", tp, pp)
    report = validate(out, models[variant], corpus, n_ctx=64, n_windows=2)
    assert report.runtime_kind == "layout" and "not TensorRT-LLM" in report.runtime
    assert any("eps 1e-5" in w for w in report.warnings) == (variant == "gemma3")  # a departure is said
    assert abs(report.metrics.kld) < 1e-6 and report.metrics.top1_pct == 100.0, report.metrics


def test_the_layout_runtime_can_fail(models, corpus, tmp_path):
    """A checkpoint whose config.json misstates one field the model reads scores far from the reference."""
    out = _write(models["gemma3"], tmp_path / "out", "f32", tp=2)
    cfg = json.loads((out / "config.json").read_text())
    cfg["rope_local_base_freq"] = cfg["rotary_base"]
    (out / "config.json").write_text(json.dumps(cfg))
    report = validate(out, models["gemma3"], corpus, n_ctx=64, n_windows=2, default_gates=False)
    assert report.metrics.kld > 1e-4, report.metrics


def test_build_script_builds_the_folder_it_sits_in(models, tmp_path, monkeypatch):
    """build-engine.sh from any working folder: trtllm-build gets its own folder (a stand-in on PATH)."""
    import os
    import subprocess

    out = trtllm.write(hf.read(models["gemma2"]), tmp_path / "ckpt", tp_size=2)
    fake = tmp_path / "bin" / "trtllm-build"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    done = subprocess.run(["sh", str(out / trtllm.BUILD_SCRIPT)], cwd="/", env=env, capture_output=True, text=True)
    assert done.stdout.split() == ["--checkpoint_dir", str(out.resolve()), "--output_dir", f"{out.resolve()}-engine"]
    made = json.loads((out / "gemport.json").read_text())
    assert (
        made["run_command"].startswith("mpirun -n 2 ")
        and "--max_attention_window_size 16 512 16 512" in made["run_command"]
    )
    assert f"--vocab_file {out.resolve()}/tokenizer.model" in made["run_command"]


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


def _damaged(models, tmp_path, damage) -> Path:
    folder = _write(models["gemma3"], tmp_path / "ckpt", "bf16", tp=2)
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


def _nan_weight(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "rank1.safetensors")
    tensors["transformer.layers.0.mlp.fc.weight"][3, 5] = float("nan")
    save_file(tensors, folder / "rank1.safetensors")


BAD = {
    "rank file missing": (lambda f: (f / "rank1.safetensors").unlink(), "", "rank1.safetensors is missing"),
    "more ranks than files": (
        _edit_config(mapping={"world_size": 4, "tp_size": 4, "pp_size": 1}),
        "",
        "rank2.safetensors is missing",
    ),
    "world size lies": (_edit_config(mapping={"world_size": 3}), "config.json", "world_size 3"),
    "truncated rank file": (_truncate, "rank1.safetensors", "truncated"),
    "rank file of another mapping": (
        _swap_ranks,
        "rank0.safetensors",
        "transformer.vocab_embedding.weight is bf16 [512, 64]",
    ),
    "not a gemma": (_edit_config(architecture="LlamaForCausalLM"), "config.json", "LlamaForCausalLM"),
    "bad field": (_edit_config(num_hidden_layers="4"), "config.json", "num_hidden_layers"),
    "bad dtype": (_edit_config(dtype="int8"), "config.json", "dtype"),
    "unknown quant algo": (_edit_config(quantization={"quant_algo": "FP8"}), "config.json", "FP8"),
    "gptq layout": (_edit_config(quantization={"quant_algo": "W4A16_GPTQ"}), "config.json", "one GPU architecture"),
    "absurd layer count": (_edit_config(num_hidden_layers=10**9), "config.json", "num_hidden_layers"),
    "absurd tp size": (_edit_config(mapping={"world_size": 2**40, "tp_size": 2**40}), "config.json", "tp_size"),
    "mapping not an object": (_edit_config(mapping=[2, 1]), "config.json", "mapping is [2, 1]"),
    "group size zero": (
        _edit_config(quantization={"quant_algo": "W4A16_AWQ", "group_size": 0}),
        "config.json",
        "group_size is 0",
    ),
    "config not json": (lambda f: (f / "config.json").write_text("{"), "config.json", "not valid JSON"),
    "nan weight": (_nan_weight, "", "NaN"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_is_one_line(models, tmp_path, capsys, case):
    damage, file_name, words = BAD[case]
    folder = _damaged(models, tmp_path, damage)
    dst = tmp_path / "dst"
    code = main(["convert", str(folder), str(dst), "--to", "hf"])
    assert_one_line_error(code, capsys.readouterr().err, str(folder / file_name) if file_name else str(folder), words)
    assert_nothing_left(dst)


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--to", "hf", "--tp-size", "2"], "--tp-size, --pp-size and --trtllm-rope-scaling apply to --to trtllm"),
        (["--to", "trtllm", "--quant", "int4"], "--to trtllm takes --quant w8a16"),
        (["--to", "trtllm", "--quant", "w4a16", "--group-size", "64"], "takes no --group-size"),
        (["--to", "trtllm", "--quant", "w8a16", "--dtype", "f32"], "compute in 16 bits"),
        (["--to", "onnx", "--trtllm-rope-scaling", "all"], "apply to --to trtllm"),
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


# ---------------------------------------------------------------------------------------------
# quantization


def test_int4_packing_is_modelopts_and_inverts():
    """Rows 2j, 2j + 1 in the low and high nibble, two's complement (ModelOpt's to_quantized_weight)."""
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(2, 1).T.contiguous()  # [16, 2]: every value
    packed = trtllm.pack_int4_rows(codes)
    assert packed.dtype == torch.int8 and packed.shape == (8, 2)
    assert int(packed[0, 0]) == ((-8 & 0xF) | ((-7 & 0xF) << 4)) - 256  # 0x98 as int8
    assert torch.equal(trtllm.unpack_int4_rows(packed), codes)


def test_weight_only_record_is_trtllms_rule():
    """amax / 128 (int8) or amax / 8 (int4) per output row, halves rounded away from zero, clamped."""
    w = torch.tensor([[1.0, -0.5, 0.25, 0.0], [2.0, 2.0, -2.0, 0.0625]])
    r8 = trtllm.weight_only_record(w, 8, "f32")
    assert torch.equal(r8.scales, torch.tensor([[1 / 128], [2 / 128]]))
    assert r8.codes.tolist() == [[127, -64, 32, 0], [127, 127, -128, 4]]
    r4 = trtllm.weight_only_record(torch.tensor([[0.5, -0.75, 0.25, 8.0]]), 4, "bf16")
    assert r4.codes.tolist() == [[1, -1, 0, 7]] and r4.scales.dtype == torch.bfloat16  # 0.5 -> 1, -0.75 -> -1


@pytest.mark.parametrize("tp", [1, 2])  # hidden 64 at tp 4: 16 columns of dense per rank, less than a group
@pytest.mark.parametrize("variant", VARIANTS)
def test_int4_records_round_trip_exactly(models, tmp_path, variant, tp):
    from quantizers.rtn import RTNConfig, quantize

    records = quantize(hf.read(models[variant]), RTNConfig(bits=4, group_size=32, scale_dtype="bf16"))
    out = trtllm.write(records, tmp_path / "out", tp_size=tp)
    cfg = json.loads((out / "config.json").read_text())["quantization"]
    assert cfg == {
        "quant_algo": "W4A16_AWQ",
        "kv_cache_quant_algo": None,
        "group_size": 32,
        "has_zero_point": False,
        "pre_quant_scale": True,
        "exclude_modules": ["lm_head"],
    }
    back = trtllm.read(out)
    for name, t in records.quantized().items():
        got, want = back.tensors[name].load(), t.load()
        assert back.tensors[name].quant == t.quant, name
        assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales), name


@pytest.mark.parametrize("quant", ["W8A16", "W4A16"])
def test_weight_only_checkpoint_holds_floats_that_trtllm_build_quantizes(models, corpus, tmp_path, quant):
    src = hf.read(models["gemma-mqa"])
    out = trtllm.write(src, tmp_path / "out", dtype="bf16", tp_size=2, quant=quant)
    assert json.loads((out / "config.json").read_text())["quantization"]["quant_algo"] == quant
    back = trtllm.read(out)  # the float weights as stored, the algorithm recorded
    name = "model.layers.1.mlp.down_proj.weight"
    assert back.extra["trtllm.quant_algo"] == quant and back.tensors[name].quant is None
    assert torch.equal(back.tensors[name].load(), src.tensors[name].load().to(torch.bfloat16))
    cfg, spec, mapping = trtllm.read_config(out)
    built = trtllm.joined_tensors(out, spec, mapping, cfg)["transformer.layers.1.mlp.proj.weight"]
    bits = 8 if quant == "W8A16" else 4
    want = trtllm.weight_only_record(src.tensors[name].load().to(torch.bfloat16), bits, "bf16")
    got = built.load()
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
    again = trtllm.write(back, tmp_path / "again")  # kept W8A16 / W4A16 unless re-typed
    assert json.loads((again / "config.json").read_text())["quantization"]["quant_algo"] == quant
    report = validate(out, models["gemma-mqa"], corpus, n_ctx=64, n_windows=2, default_gates=False)
    assert report.kind == f"{bits}-bit" and report.metrics.kld > 0


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_awq_and_gptq_records_round_trip_in_the_awq_layout(models, tmp_path, method):
    """quantize --to trtllm writes the records the quantizer makes (scales made in bf16, the checkpoint's
    dtype for a float32 source), and they read back exactly; the same records as --to hf writes them."""
    calib = ["--calib-tokens", "256", "--calib-ctx", "64"]
    argv = ["quantize", str(models["gemma2"]), "--method", method, "--bits", "4", "--group-size", "32", *calib]
    dst, ct = tmp_path / "trtllm", tmp_path / "ct"
    assert main([argv[0], argv[1], str(dst), *argv[2:], "--to", "trtllm", "--tp-size", "2"]) == 0
    assert main([argv[0], argv[1], str(ct), *argv[2:], "--to", "hf", "--scale-dtype", "bf16"]) == 0
    manifest = json.loads((dst / "gemport.json").read_text())
    assert manifest["quant_algo"] == "W4A16_AWQ" and manifest["quantization"]["method"] == method
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"  # f32 source, 16-bit kernels
    back, want = trtllm.read(dst), hf.read(ct)
    for name, t in want.quantized().items():
        got, ref = back.tensors[name].load(), t.load()
        assert torch.equal(got.codes, ref.codes) and torch.equal(got.scales, ref.scales), name


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--bits", "8"], "int8 per-channel sym (bf16 scales) records"),
        (["--bits", "4", "--group-size", "32", "--asym"], "int4 g32 asym"),
        (["--bits", "4", "--group-size", "64", "--tp-size", "2"], "are not whole groups of 64; use --group-size 32"),
        (["--bits", "4", "--group-size", "32", "--dtype", "f32"], "compute in 16 bits"),
        (["--bits", "4", "--group-size", "32", "--embedding-bits", "8"], "not model.embed_tokens.weight"),
        (["--bits", "4", "--group-size", "32", "--tp-size", "3"], "tp_size 3 does not divide the 4 attention heads"),
    ],
)
def test_records_trtllm_cannot_hold_are_refused(models, tmp_path, capsys, argv, words):
    dst = tmp_path / "out"
    code = main(["quantize", str(models["gemma-mha"]), str(dst), "--to", "trtllm", *argv])
    assert_one_line_error(code, capsys.readouterr().err, words)
    assert_nothing_left(dst)


@pytest.mark.parametrize("choice", ["all", "none"])
def test_rope_scaling_of_gemma3_is_a_stated_choice(tiny_models, corpus, tmp_path, capsys, choice):
    """TensorRT-LLM cannot scale the global layers' rope alone: the scaled tiny Gemma 3 is refused (test_family_
    semantics), written on request, and the layout runtime, which scales as TensorRT-LLM does, shows the cost."""
    dst = tmp_path / "out"
    argv = ["convert", str(tiny_models["gemma3"]), str(dst), "--to", "trtllm", "--trtllm-rope-scaling", choice]
    assert main(argv) == 0
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["rotary_scaling"] == ({"type": "linear", "factor": 2.0} if choice == "all" else None)
    report = validate(dst, tiny_models["gemma3"], corpus, n_ctx=64, n_windows=2, default_gates=False)
    assert report.metrics.kld > 1e-4, report.metrics


def test_inspect_counts_what_the_rank_files_store(models, tmp_path):
    """Rows by stored type: bytes of every rank file's tensors (copies included), each model parameter once."""
    import math

    from safetensors import safe_open

    from gemport.describe import describe
    from quantizers.rtn import RTNConfig, quantize

    src = hf.read(models["gemma-mqa"])
    records = quantize(src, RTNConfig(bits=4, group_size=32, scale_dtype="bf16"))
    for ckpt, want in ((src, {"BF16"}), (records, {"W4A16_AWQ int4 g32", "BF16"})):
        out = trtllm.write(ckpt, tmp_path / f"out-{len(want)}", dtype="bf16", tp_size=2)
        info = describe(out)
        assert set(info["types"]) == want
        stored = 0
        for rank in (0, 1):
            with safe_open(out / f"rank{rank}.safetensors", "pt") as f:
                stored += sum(
                    f.get_slice(k).get_shape()
                    and math.prod(f.get_slice(k).get_shape()) * (1 if f.get_slice(k).get_dtype() == "I8" else 2)
                    for k in f.keys()
                )
        assert info["weight_bytes"] == stored
        assert info["parameters"] == sum(math.prod(t.shape) for t in src)
        assert sum(r["parameters"] for r in info["types"].values()) == info["parameters"]


def test_int4_records_of_a_compressed_tensors_source_stay_records(models, tmp_path):
    from quantizers.rtn import RTNConfig, quantize

    ct = hf.write(quantize(hf.read(models["gemma-mqa"]), RTNConfig(bits=4, group_size=32)), tmp_path / "ct")
    dst = tmp_path / "out"
    assert main(["convert", str(ct), str(dst), "--to", "trtllm", "--dtype", "bf16"]) == 0
    assert json.loads((dst / "config.json").read_text())["quantization"]["quant_algo"] == "W4A16_AWQ"


@pytest.mark.parametrize(
    "option,words",
    [
        ("--qformat", "--to trtllm --quant w4a16-awq"),
        ("--awq_block_size", "gemport takes --group-size"),
        ("--weight_only_precision", "--to trtllm --quant w8a16|w4a16"),
        ("--output_dir", "DST, the second argument"),
    ],
)
def test_the_peers_options_are_answered_with_gemports(models, tmp_path, capsys, option, words):
    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(models["gemma-mha"]), str(tmp_path / "out"), "--to", "trtllm", option, "x"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and words in err, err


def test_trtllm_and_modelopt_names_of_the_algorithms_are_taken(models, tmp_path):
    dst = tmp_path / "out"
    assert main(["convert", str(models["gemma-mqa"]), str(dst), "--to", "trtllm", "--quant", "int8_wo"]) == 0
    assert json.loads((dst / "config.json").read_text())["quantization"]["quant_algo"] == "W8A16"


def test_gemma2_checkpoint_of_trtllms_own_converter_needs_no_window(models, tmp_path):
    """TensorRT-LLM's Gemma 2 config has no sliding_window (a run-time setting): read as transformers' 4096."""
    out = _write(models["gemma2"], tmp_path / "out")
    _edit_config(sliding_window=None)(out)
    cfg = json.loads((out / "config.json").read_text())
    del cfg["sliding_window"]
    (out / "config.json").write_text(json.dumps(cfg))
    assert trtllm.read(out).spec.sliding_window == 4096
