from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from converters import hf
from converters import onnx as onnx_conv
from gemport.cli import main
from gemport.errors import InputError, UnsupportedError
from quantizers import rtn
from validation.runtimes.onnxruntime import OnnxRuntime

VARIANTS = ("gemma-mha", "gemma-mqa", "gemma2", "gemma3")


def session(folder):
    import onnxruntime as ort

    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


def run(sess, spec, tokens, past=None, start=0):
    """One call with a past of ``start`` positions; returns (log-probs [seq, vocab], presents)."""
    feeds = {
        "input_ids": np.asarray([tokens], np.int64),
        "attention_mask": np.ones((1, start + len(tokens)), np.int64),
        "position_ids": np.arange(start, start + len(tokens), dtype=np.int64)[None],
    }
    for i in range(spec.num_layers):
        for j, kind in enumerate(("key", "value")):
            kv_dtype = np.float16 if sess.get_inputs()[3].type == "tensor(float16)" else np.float32
            empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), kv_dtype)
            feeds[f"past_key_values.{i}.{kind}"] = past[i][j] if past else empty
    outs = sess.run(None, feeds)
    presents = [(outs[1 + 2 * i], outs[2 + 2 * i]) for i in range(spec.num_layers)]
    return torch.log_softmax(torch.from_numpy(outs[0][0]).float(), -1).numpy(), presents


def kld(p_log, q_log) -> float:
    return float((np.exp(p_log) * (p_log - q_log)).sum(-1).mean())


def reference_logprobs(path, tokens):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([tokens])).logits[0], -1).numpy()


TOKENS = [2] + torch.randint(3, 512, (39,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_graph_matches_reference_with_and_without_cache(tiny_models, tmp_path, variant, fused):
    """40 tokens, window 16 on the sliding layers: the whole sequence at once, and 20 tokens then
    one token per call with past_key_values, decoding across the sliding-window boundary."""
    src = tiny_models[variant]
    ckpt = hf.read(src)
    out = onnx_conv.write(ckpt, tmp_path / "out", fused=fused)
    graph = __import__("onnx").load(str(out / "model.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    fused_ops = {"GroupQueryAttention", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}
    assert fused_ops <= ops if fused else not ops & fused_ops and {n.domain for n in graph.node} == {""}
    want = reference_logprobs(src, TOKENS)
    sess = session(out)
    whole, _ = run(sess, ckpt.spec, TOKENS)
    assert kld(want, whole) < 1e-4 and np.abs(whole - want).max() < 1e-4
    rows, past = run(sess, ckpt.spec, TOKENS[:20])
    steps = [rows]
    for t in range(20, len(TOKENS)):
        row, past = run(sess, ckpt.spec, TOKENS[t : t + 1], past, start=t)
        steps.append(row)
    assert past[0][0].shape == (1, ckpt.spec.num_kv_heads, len(TOKENS), ckpt.spec.head_dim)
    incremental = np.concatenate(steps)
    assert kld(want, incremental) < 1e-4 and np.abs(incremental - want).max() < 1e-4


def test_fp16_graph_is_close(tiny_models, tmp_path):
    src = tiny_models["gemma3"]
    out = onnx_conv.write(hf.read(src), tmp_path / "out", dtype="f16")
    got, _ = run(session(out), hf.read(src).spec, TOKENS)
    assert kld(reference_logprobs(src, TOKENS), got) < 1e-3


def test_float_graph_reads_back_bit_identical(tiny_models, tmp_path):
    src = hf.read(tiny_models["gemma-mqa"])  # untied LM head, f32
    back = onnx_conv.read(onnx_conv.write(src, tmp_path / "out"))
    assert back.spec == src.spec and set(back.tensors) == set(src.tensors)
    for name, t in src.tensors.items():
        assert torch.equal(back.tensors[name].load(), t.load()), name
    assert back.tokenizer_files["tokenizer.json"] == src.tokenizer_files["tokenizer.json"]


@pytest.mark.parametrize(
    "config",
    [
        rtn.RTNConfig(bits=4, group_size=32),
        rtn.RTNConfig(bits=4, group_size=64, symmetric=False),
        rtn.RTNConfig(bits=8, group_size=None),  # per channel: the scale repeated per 64-block
        rtn.RTNConfig(bits=8, group_size=32, symmetric=False, embedding_bits=8),
        rtn.RTNConfig(bits=4, group_size=32, embedding_bits=4),
    ],
    ids=["int4-g32", "int4-g64-asym", "int8-channel", "int8-g32-asym-emb8", "int4-g32-emb4"],
)
def test_matmul_nbits_computes_the_records_weights(tiny_models, tmp_path, config):
    """MatMulNBits (and GatherBlockQuantized) in onnxruntime give the logits of a float graph of the
    records' dequantized weights; the reader dequantizes to those exact weights."""
    src = hf.read(tiny_models["gemma3"])
    quantized = rtn.quantize(src, config)
    packed = onnx_conv.write(quantized, tmp_path / "packed")
    dense = dataclasses.replace(quantized, tensors={n: t.dequantized("f32") for n, t in quantized.tensors.items()})
    plain = onnx_conv.write(dense, tmp_path / "dense")
    got, _ = run(session(packed), src.spec, TOKENS)
    want, _ = run(session(plain), src.spec, TOKENS)
    assert np.abs(got - want).max() < 1e-4
    ops = {n.op_type for n in __import__("onnx").load(str(packed / "model.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and ("GatherBlockQuantized" in ops) == bool(config.embedding_bits)
    back = onnx_conv.read(packed)
    for name, t in dense.tensors.items():
        assert torch.equal(back.tensors[name].load(), t.load()), name


@pytest.mark.parametrize("fused", [True, False], ids=["fused-shared-kv-buffer", "plain"])
def test_genai_loads_the_folder_and_generates_the_reference_greedy_tokens(tiny_models, tmp_path, fused):
    og = pytest.importorskip("onnxruntime_genai")
    src = tiny_models["gemma2"]  # sliding window 16: 32 new tokens cross it
    out = onnx_conv.write(hf.read(src), tmp_path / "out", fused=fused)
    config = json.loads((out / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is fused
    # onnxruntime's default threads (one per physical core), which og.Model below parses and applies
    assert config["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 0
    tokenizer = AutoTokenizer.from_pretrained(src)
    prompt = tokenizer("def f(x):\n    return", return_tensors="pt").input_ids
    got = genai_greedy(out, prompt[0].tolist(), 32)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    want = ref.generate(prompt, max_new_tokens=32, do_sample=False)[0, prompt.shape[1] :].tolist()
    assert len(got) == 32 and got == want
    text = "def f(x):\n    return x ** 2"
    assert list(og.Tokenizer(og.Model(str(out))).encode(text)) == tokenizer(text, add_special_tokens=False).input_ids


def test_runtime_scores_the_builders_sliding_window_cache_graph(tiny_models, tmp_path):
    """onnxruntime-genai's own model builder, its default windowed KV cache on Gemma 2's sliding layers
    (a past input of the window's length): the onnxruntime runtime feeds those layers a zero cache of
    the window, and windows four times longer than the sliding window score as the reference does."""
    pytest.importorskip("onnxruntime_genai")
    src, out = tiny_models["gemma2"], tmp_path / "builder"
    argv = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out)]
    argv += ["-p", "fp32", "-e", "cpu", "-c", str(tmp_path / "cache")]
    subprocess.run(argv, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    sliding = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["sliding_window"]
    graph = __import__("onnx").load(str(out / "model.onnx"), load_external_data=False).graph
    lengths = {
        d.dim_param
        for i in graph.input
        if i.name.startswith("past_key_values.0.")
        for d in i.type.tensor_type.shape.dim
    }
    assert sliding["window_size"] == 16 and "past_sliding_length" in lengths
    report = tmp_path / "report.json"
    args = ["validate", str(out), "--reference", str(src), "--windows", "2", "--ctx", "64", "--json", str(report)]
    assert main(args) == 0
    metrics = json.loads(report.read_text())["metrics"]
    assert metrics["kld"] < 1e-6 and metrics["top1_pct"] == 100.0


def test_cli_convert_quantized_and_validate(tiny_models, tmp_path, capsys):
    src, out = tiny_models["gemma2"], tmp_path / "int4"
    assert main(["convert", str(src), str(out), "--to", "onnx", "--quant", "int4", "--block-size", "64"]) == 0
    manifest = json.loads((out / "gemport.json").read_text())
    assert manifest["quantization"]["config"]["group_size"] == 64 and manifest["onnx"]["fused"] is True
    # defaults with --quant: int8 activations as onnxruntime-genai's builder on CPU, one int8 head table (measured)
    assert manifest["onnx"]["accuracy_level"] == 4 and manifest["onnx"]["head_bits"] == 8
    assert manifest["quantization"]["config"]["full_range"] is True
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"] == 4
    report = tmp_path / "report.json"
    args = ["validate", str(out), "--reference", str(src), "--windows", "2", "--ctx", "64", "--json", str(report)]
    assert main([*args, "--max-kld", "0.05"]) == 0
    result = json.loads(report.read_text())
    assert result["runtime"]["name"].startswith("onnxruntime") and result["runtime"]["kind"] == "parity"
    assert 0 < result["metrics"]["kld"] < 0.05


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--quant", "q4_k_m"], "--to onnx takes --quant"),
        (["--quant", "int4", "--max-shard-size", "1GB"], "takes no"),
        (["--pure"], "do not apply to --to onnx"),
    ],
)
def test_cli_refuses_options_that_do_not_apply(tiny_models, tmp_path, capsys, argv, message):
    dst = tmp_path / "out"
    assert main(["convert", str(tiny_models["gemma3"]), str(dst), "--to", "onnx", *argv]) == 2
    assert message in capsys.readouterr().err and not dst.exists()
    assert main(["convert", str(tiny_models["gemma3"]), str(dst), "--to", "hf", "--plain-ops"]) == 2
    assert "apply to --to onnx" in capsys.readouterr().err


def test_foreign_onnx_and_missing_external_data_are_named(tiny_models, tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), str(foreign / "model.onnx"))
    with pytest.raises(UnsupportedError, match="not written by gemport"):
        onnx_conv.read(foreign)
    assert main(["inspect", str(foreign)]) == 2
    assert "not written by gemport" in capsys.readouterr().err

    out = onnx_conv.write(hf.read(tiny_models["gemma3"]), tmp_path / "out")
    data = out / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(InputError, match="model.onnx.data is truncated"):
        OnnxRuntime(out)
    data.unlink()
    with pytest.raises(InputError, match="external data file model.onnx.data is missing"):
        onnx_conv.read(out)
    assert main(["validate", str(out), "--reference", str(tiny_models["gemma3"]), "--windows", "1"]) == 2
    assert "model.onnx.data is missing" in capsys.readouterr().err
    (out / "model.onnx").write_bytes(b"not an onnx file at all")
    with pytest.raises(InputError, match="not a readable ONNX model"):
        onnx_conv.read(out)


def test_nan_weight_leaves_no_artifact(tiny_models, tmp_path):
    ckpt = hf.read(tiny_models["gemma3"])
    name = "model.layers.1.mlp.up_proj.weight"
    t = ckpt.tensors[name]
    bad = dataclasses.replace(t, load=lambda: torch.full(t.shape, float("nan")))
    ckpt = dataclasses.replace(ckpt, tensors={**ckpt.tensors, name: bad})
    from gemport.errors import CheckpointError

    with pytest.raises(CheckpointError, match=f"{name} has NaN"):
        onnx_conv.write(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("variant", ["gemma3", "gemma-mqa"])  # tied head, and a separate lm_head
def test_head_bits_quantizes_the_head(tiny_models, tmp_path, variant):
    """--head-bits 8: the head is a MatMulNBits; a tied embedding reads the same bytes through
    GatherBlockQuantized, an untied one stays float. Every other weight reads back exactly."""
    src = hf.read(tiny_models[variant])
    out = onnx_conv.write(src, tmp_path / "out", head_bits=8)
    graph = __import__("onnx").load(str(out / "model.onnx"), load_external_data=False).graph
    head = "model.embed_tokens.weight" if src.spec.tie_embeddings else "lm_head.weight"
    assert [n.input[1] for n in graph.node if n.op_type == "MatMulNBits"] == [f"{head}.qweight"]
    assert any(n.op_type == "GatherBlockQuantized" for n in graph.node) == src.spec.tie_embeddings
    assert not any(i.name == head for i in graph.initializer)  # no float copy kept
    got, _ = run(session(out), src.spec, TOKENS)
    want = reference_logprobs(tiny_models[variant], TOKENS)
    assert 0 < kld(want, got) < 1e-3  # int8: close, not exact
    back = onnx_conv.read(out)
    for name, t in src.tensors.items():
        if name == head:
            assert (back.tensors[name].load() - t.load()).abs().max() < 0.01
        else:
            assert torch.equal(back.tensors[name].load(), t.load()), name


def genai_greedy(folder, prompt_ids: list[int], n: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + n, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(prompt_ids, np.int32))
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


@pytest.mark.realmodel
def test_demo_model_fp32_graph_in_onnxruntime_and_genai(demo_model, tmp_path):
    from validation.validate import validate

    out = tmp_path / "onnx"
    assert main(["convert", str(demo_model), str(out), "--to", "onnx", "--dtype", "f32"]) == 0
    metrics = validate(out, demo_model, n_windows=2).metrics
    assert metrics.tokens == 510 and abs(metrics.delta_ppl_pct) < 0.05 and metrics.kld < 1e-4
    prompt = "The Python language reference describes the syntax and core semantics of"
    ids = AutoTokenizer.from_pretrained(demo_model)(prompt, return_tensors="pt").input_ids
    ref = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()
    want = ref.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1] :].tolist()
    assert genai_greedy(out, ids[0].tolist(), 32) == want


def test_compressed_tensors_folder_feeds_matmul_nbits(tiny_models, tmp_path):
    """A quantized HF folder (compressed-tensors) converts to ONNX with its own records: onnxruntime
    gives the logits transformers + compressed-tensors give for that folder, and the manifest follows."""
    from validation.runtimes.hf_transformers import TransformersRuntime

    folder = tmp_path / "ct"
    argv = ["quantize", str(tiny_models["gemma3"]), str(folder), "--method", "rtn", "--bits", "4", "--asym"]
    assert main([*argv, "--group-size", "32"]) == 0
    # the folder's own float head and float activations (a quantized source's export defaults, as with --quant:
    # an int8 head and accuracy level 4)
    exact = ["--head-bits", "0", "--accuracy-level", "0"]
    assert main(["convert", str(folder), str(tmp_path / "onnx"), "--to", "onnx", *exact]) == 0
    manifest = json.loads((tmp_path / "onnx" / "gemport.json").read_text())
    assert manifest["quantization"]["method"] == "rtn" and manifest["quantization"]["config"]["symmetric"] is False
    got = OnnxRuntime(tmp_path / "onnx").logprobs(TOKENS)
    want = TransformersRuntime(folder).logprobs(TOKENS)
    assert np.abs(got - want).max() < 1e-4


def test_lookup_bits_keep_a_finer_table_beside_a_4_bit_head(tiny_models, tmp_path):
    """--head-bits 4 --lookup-bits 8: the head reads its int4 copy, the lookup an int8 table of its own,
    which is much closer to the reference than one shared int4 table; the reader takes the finer one."""
    src = hf.read(tiny_models["gemma3"])
    shared = onnx_conv.write(src, tmp_path / "shared", head_bits=4)
    split = onnx_conv.write(src, tmp_path / "split", head_bits=4, lookup_bits=8)
    graph = __import__("onnx").load(str(split / "model.onnx"), load_external_data=False).graph
    (head,) = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert head.input[1] == "lm_head.weight.qweight" and dict((a.name, a.i) for a in head.attribute)["bits"] == 4
    (lookup,) = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert dict((a.name, a.i) for a in lookup.attribute)["bits"] == 8
    want = reference_logprobs(tiny_models["gemma3"], TOKENS)
    kld_shared = kld(want, run(session(shared), src.spec, TOKENS)[0])
    kld_split = kld(want, run(session(split), src.spec, TOKENS)[0])
    assert kld_split < 0.5 * kld_shared
    embed = src.tensors["model.embed_tokens.weight"].load()
    err = (onnx_conv.read(split).tensors["model.embed_tokens.weight"].load() - embed).abs().max()
    assert err < 0.5 * (onnx_conv.read(shared).tensors["model.embed_tokens.weight"].load() - embed).abs().max()
    with pytest.raises(UnsupportedError, match="lookup bits apply to a quantized head"):
        onnx_conv.write(src, tmp_path / "bad", lookup_bits=8)


@pytest.mark.parametrize(
    "head_bits,lookup_bits,head,lookup,line",
    [
        (4, 8, (4, 32), (8, 32), "head int4 b32, lookup int8 b32"),
        (8, None, (8, 32), (8, 32), "head and lookup int8 b32 (one table)"),
        (4, 4, (4, 32), (4, 32), "head and lookup int4 b32 (one table)"),
        (None, None, None, None, "head and lookup f32 (one table)"),
    ],
)
def test_manifest_lists_the_head_and_lookup_tables_as_quantized(
    tiny_models, tmp_path, head_bits, lookup_bits, head, lookup, line
):
    """gemport.json says what the graph stores: the head and lookup tables the writer quantized are
    listed with their bits and block (not as kept), and the summary line counts them."""
    src = hf.read(tiny_models["gemma3"])
    q = rtn.quantize(src, rtn.RTNConfig(bits=4, group_size=32, full_range=True))
    out = onnx_conv.write(q, tmp_path / "out", head_bits=head_bits, lookup_bits=lookup_bits)
    manifest = json.loads((out / "gemport.json").read_text())
    stored, quantization = manifest["stored"], manifest["quantization"]
    projections = 7 * src.spec.num_layers
    assert stored["projections"] == [{"bits": 4, "block_size": 32, "count": projections}]
    embed = "model.embed_tokens.weight"
    floats = [n for n in src.tensors if n.endswith("norm.weight")] + ([embed] if head is None else [])
    assert sorted(stored["kept"]) == sorted(floats) and sorted(quantization["kept"]) == sorted(floats)
    assert quantization["quantized"] == projections
    for role, want in (("head", head), ("lookup", lookup)):
        got = stored[role]
        if want is None:
            assert got["dtype"] == "f32" and role not in quantization
        else:
            assert (got["bits"], got["block_size"], got["by"]) == (*want, "writer") and quantization[role] == got
    assert onnx_conv.summary(out) == f"{projections} projections int4 b32, {line}, {len(floats)} kept"
    # the table says what the graph holds: the lookup's GatherBlockQuantized bits, the head's MatMulNBits bits
    graph = __import__("onnx").load(str(out / "model.onnx"), load_external_data=False).graph
    gathers = [dict((a.name, a.i) for a in n.attribute) for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert [g["bits"] for g in gathers] == ([lookup[0]] if lookup else [])
    vocab = src.spec.vocab_size
    heads = [
        n for n in graph.node if n.op_type == "MatMulNBits" and dict((a.name, a.i) for a in n.attribute)["N"] == vocab
    ]
    assert [dict((a.name, a.i) for a in n.attribute)["bits"] for n in heads] == ([head[0]] if head else [])


def test_manifest_of_a_float_model_with_a_quantized_head(tiny_models, tmp_path):
    """No quantizer ran (convert --to onnx --head-bits 8): the manifest still says the writer quantized
    the head (untied here: the lookup stays float)."""
    src = hf.read(tiny_models["gemma-mqa"])
    out = onnx_conv.write(src, tmp_path / "out", head_bits=8)
    manifest = json.loads((out / "gemport.json").read_text())
    assert manifest["stored"]["head"] == {
        "bits": 8,
        "block_size": 32,
        "by": "writer",
        "method": onnx_conv.HEAD_QUANTIZER,
    }
    assert manifest["stored"]["lookup"] == {"dtype": "f32"}
    assert "lm_head.weight" not in manifest["quantization"]["kept"]
    assert manifest["quantization"]["head"]["bits"] == 8 and manifest["quantization"]["quantized"] == 0
    kept = len(src.tensors) - 1
    assert onnx_conv.summary(out) == f"head int8 b32, lookup f32, {kept} kept"


def test_default_head_layout_is_one_int8_table_for_head_and_lookup(tiny_models, tmp_path):
    """The defaults the CLI takes (head_options): with quantized projections an int8 head whose bytes
    the tied lookup reads (one table, no float copy, no second table); given bits kept as they are."""
    assert onnx_conv.head_options(4) == {"head_bits": 8, "lookup_bits": None}
    assert onnx_conv.head_options(None) == {"head_bits": None, "lookup_bits": None}
    assert onnx_conv.head_options(4, 0) == {"head_bits": None, "lookup_bits": None}
    assert onnx_conv.head_options(4, 4, 8) == {"head_bits": 4, "lookup_bits": 8}
    src = hf.read(tiny_models["gemma3"])
    q = rtn.quantize(src, rtn.RTNConfig(bits=4, group_size=32, full_range=True))
    out = onnx_conv.write(q, tmp_path / "out", **onnx_conv.head_options(4))
    stored = json.loads((out / "gemport.json").read_text())["stored"]
    assert (stored["head"]["bits"], stored["lookup"]["bits"], stored["head"]["shared_with_lookup"]) == (8, 8, True)
    graph = __import__("onnx").load(str(out / "model.onnx"), load_external_data=False).graph
    names = {i.name for i in graph.initializer}
    assert "model.embed_tokens.weight.qweight" in names and "model.embed_tokens.weight" not in names
    assert not any(n.startswith("lm_head.weight") for n in names)
    (lookup,) = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert lookup.input[0].startswith("Reshape") and dict((a.name, a.i) for a in lookup.attribute)["bits"] == 8
    want = reference_logprobs(tiny_models["gemma3"], TOKENS)
    float_head = onnx_conv.write(q, tmp_path / "float")
    kld_float = kld(want, run(session(float_head), src.spec, TOKENS)[0])
    assert kld(want, run(session(out), src.spec, TOKENS)[0]) < 1.1 * kld_float  # as good as a float head
