"""Every writer follows the reference's (transformers') semantics of each config field, per family.

A tiny Gemma 1, 2 and 3 gets every optional config field set to a value that changes the output if
wrongly applied: fields the family's transformers model ignores (a Gemma 3 attention softcap of 1.0,
Gemma 2 fields on a Gemma 1, a Gemma 3 ``rope_local_base_freq`` on a Gemma 2) and fields it uses, set
far from their defaults (softcaps, ``query_pre_attn_scalar`` != head_dim, rope bases, linear rope
scaling, a sliding window of 4 in 64-token windows). Each is converted to every format and scored by
that format's runtime against transformers with a KLD bound that a misapplied field breaks by orders
of magnitude (a Gemma 3 attention softcap of 1.0 applied: KLD ~2e-2). Where a runtime cannot express
a field the reference uses, the writer refuses with one line naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemport.cli import main
from tests.test_bad_input import assert_nothing_left, assert_one_line_error
from tests.tiny import make_tiny
from validation.runtimes.jax import VENV_PYTHON
from validation.validate import validate

N_CTX, WINDOWS = 64, 2
# Lossless float32 conversions measure KLD ~1e-9 (llama.cpp, onnxruntime) or below (transformers, the
# gemma library); each misapplied field tried here costs 1e-3 .. 1e-1.
MAX_KLD = 1e-5

# variant of tests/tiny.py, and the config.json keys set on it (a key None is removed).
FAMILIES: dict[str, tuple[str, dict]] = {
    "gemma": (
        "gemma-mha",
        {  # ignored by GemmaForCausalLM: scale head_dim ** -0.5, no softcaps, no sliding window, one rope
            "query_pre_attn_scalar": 7,
            "attn_logit_softcapping": 1.0,
            "final_logit_softcapping": 1.0,
            "sliding_window": 4,
            "rope_local_base_freq": 50.0,
            # used: one rope for every layer, linearly scaled
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
        },
    ),
    "gemma2": (
        "gemma2",
        {  # used: both softcaps, the query scalar, the window, one rope for every layer (scaled too)
            "attn_logit_softcapping": 1.0,
            "final_logit_softcapping": 2.0,
            "query_pre_attn_scalar": 24,
            "sliding_window": 4,
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
            "rope_local_base_freq": 50.0,  # ignored by Gemma2ForCausalLM
        },
    ),
    "gemma3": (
        "gemma3",
        {
            "attn_logit_softcapping": 1.0,  # ignored by Gemma3ForCausalLM
            "final_logit_softcapping": 2.0,
            "query_pre_attn_scalar": 7,
            "sliding_window": 4,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
        },
    ),
}
# GGUF cannot state the attention scale: llama.cpp derives it from head_dim (ref: models/gemma2.cpp,
# gemma3.cpp load_arch_hparams), so the GGUF parity case uses that scalar and the refusal test the other.
GGUF_EXPRESSIBLE = {"gemma2": {"query_pre_attn_scalar": 16}, "gemma3": {"query_pre_attn_scalar": 16}}
# TensorRT-LLM scales the sliding layers' rope too (converters/trtllm.py ``_rope_for_trtllm``): its parity case
# has a Gemma 3 with no rope scaling, and the refusal test the scaled one.
TRTLLM_EXPRESSIBLE = {
    "gemma3": {
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        }
    }
}
EXPRESSIBLE = {"gguf": GGUF_EXPRESSIBLE, "trtllm": TRTLLM_EXPRESSIBLE}
WRITERS = ("hf", "gguf", "onnx", "jax", "trtllm")


def make_reference(root: Path, family: str, **extra) -> Path:
    variant, edits = FAMILIES[family]
    path = make_tiny(variant, root)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    for key, value in (edits | extra).items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    if "rope_parameters" in edits:  # a 4.x rope_theta would only be a default under rope_parameters
        config.pop("rope_theta", None)
    config_file.write_text(json.dumps(config))
    return path


def destination(tmp_path: Path, writer: str) -> Path:
    return tmp_path / ("model.gguf" if writer == "gguf" else f"out-{writer}")


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_writer_follows_the_reference(family, writer, corpus, tmp_path, capsys):
    if writer == "jax" and not VENV_PYTHON.is_file():
        pytest.skip("the gemma library's environment (build/gemma-venv, `make gemma-venv`) is absent")
    extra = EXPRESSIBLE.get(writer, {}).get(family, {})
    reference = make_reference(tmp_path / "ref", family, **extra)
    out = destination(tmp_path, writer)
    assert main(["convert", str(reference), str(out), "--to", writer]) == 0, capsys.readouterr().err
    report = validate(out, reference, corpus, n_ctx=N_CTX, n_windows=WINDOWS, max_kld=MAX_KLD)
    metrics = report.metrics
    assert metrics.kld < MAX_KLD and metrics.top1_pct == 100.0, (family, writer, metrics)


# (family, spec field, wrong value): a field the reference ignores applied, or one it uses dropped.
MISAPPLIED = [
    ("gemma3", "attn_softcap", 1.0),  # the fault of field case softcap-gemma3-onnx
    ("gemma2", "attn_softcap", None),
    ("gemma", "query_pre_attn_scalar", 7.0),
    ("gemma3", "rope_local_theta", 10000.0),
]


@pytest.mark.parametrize("family,name,value", MISAPPLIED)
def test_a_misapplied_field_fails_the_bound(family, name, value, corpus, tmp_path):
    """The test above can fail: the ONNX writer given a spec with one field as a wrong reading of the
    config would have it scores far past MAX_KLD."""
    from converters import hf
    from converters import onnx as onnx_conv

    reference = make_reference(tmp_path / "ref", family)
    ckpt = hf.read(reference)
    object.__setattr__(ckpt.spec, name, value)  # past GemmaSpec's checks, as a wrong reader would
    out = onnx_conv.write(ckpt, tmp_path / "wrong-onnx")
    report = validate(out, reference, corpus, n_ctx=N_CTX, n_windows=WINDOWS)
    assert report.metrics.kld > 10 * MAX_KLD, report.metrics


# (family, writer, config keys set, words of the one-line refusal): a field the reference uses that the
# target runtime cannot express.
REFUSED = [
    ("gemma2", "gguf", {"query_pre_attn_scalar": 24}, "query_pre_attn_scalar"),
    ("gemma3", "gguf", {"query_pre_attn_scalar": 7}, "query_pre_attn_scalar"),
    ("gemma2", "gguf", {"hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
    ("gemma3", "jax", {"hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
    (
        "gemma2",
        "gguf",
        {"final_logit_softcapping": None, "_null": "final_logit_softcapping"},
        "final_logit_softcapping",
    ),
    # yarn to GGUF and ONNX, and more rope refusals: tests/test_rope_scaling.py
    ("gemma3", "jax", {"_rope": "yarn"}, "config.json: rope_parameters.full_attention.rope_type = 'yarn'"),
    ("gemma", "gguf", {"_rope": "dynamic"}, "config.json: rope_parameters.rope_type = 'dynamic'"),
    ("gemma2", "onnx", {"_rope": "dynamic"}, "config.json: rope_parameters.rope_type = 'dynamic'"),
    ("gemma3", "trtllm", {}, "TensorRT-LLM applies rotary_scaling to the sliding layers too"),
    ("gemma", "trtllm", {"_rope": "dynamic"}, "TensorRT-LLM writer takes linear rope scaling"),
]


@pytest.mark.parametrize("family,writer,keys,words", REFUSED)
def test_what_the_runtime_cannot_express_is_refused(family, writer, keys, words, tmp_path, capsys):
    keys = (GGUF_EXPRESSIBLE.get(family, {}) if writer == "gguf" else {}) | keys
    null, rope = keys.pop("_null", None), keys.pop("_rope", None)
    reference = make_reference(tmp_path / "ref", family, **keys)
    config_file = reference / "config.json"
    config = json.loads(config_file.read_text())
    if null:
        config[null] = None
    if rope:
        scaled = {"rope_type": rope, "factor": 2.0, "rope_theta": 10000.0}
        if family == "gemma3":
            config["rope_parameters"]["full_attention"] = scaled
        else:
            config["rope_parameters"] = scaled
    config_file.write_text(json.dumps(config))
    out = destination(tmp_path, writer)
    capsys.readouterr()  # make_tiny's progress bars
    code = main(["convert", str(reference), str(out), "--to", writer])
    assert_one_line_error(code, capsys.readouterr().err, str(reference), words)
    assert_nothing_left(out)
