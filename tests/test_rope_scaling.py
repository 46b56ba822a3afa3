"""Rope scaling that transformers applies to Gemma, in every runtime that can state it.

YaRN is written to GGUF (rope.scaling.type yarn, factor, original_context_length, attn_factor) where
llama.cpp computes what transformers does, and into ONNX's cos/sin tables from transformers' own rotary
embedding; both are scored by their runtime against transformers. original_max_position_embeddings is
set below the window so YaRN's blend and attention factor change the output (the unscaled model scores
far past the bound). Dynamic (NTK) rope, which follows the sequence length, and YaRN settings llama.cpp
cannot state are refused in one line naming config.json and the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemport.cli import main
from tests.test_bad_input import assert_nothing_left, assert_one_line_error
from tests.tiny import make_tiny
from validation.validate import validate

N_CTX, WINDOWS = 64, 2
# Lossless float32 conversions measure KLD ~1e-8 (llama.cpp) and ~1e-13 (onnxruntime) here; the same
# model without its YaRN scores ~1e-2 against the reference, without its attention factor ~1e-3.
MAX_KLD = 1e-5
SLIDING_DEFAULT = {"rope_type": "default", "rope_theta": 100.0}
VARIANTS = {"gemma": "gemma-mha", "gemma2": "gemma2", "gemma3": "gemma3"}


def yarn(**extra) -> dict:
    return {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 16} | extra


def make_scaled(root: Path, family: str, scaling: dict, style: str = "5") -> Path:
    """A tiny ``family`` model whose (global) rope is ``scaling``, stated in the 5.x (rope_parameters)
    or 4.x (rope_scaling) style of config.json."""
    path = make_tiny(VARIANTS[family], root)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("rope_theta", None)
    if family == "gemma2":  # the scalar llama.cpp derives (GGUF cannot state another; see test_family_semantics)
        config["query_pre_attn_scalar"] = 16
    if style == "4":
        config.pop("rope_parameters", None)
        config.update(
            rope_theta=scaling["rope_theta"], rope_scaling={k: v for k, v in scaling.items() if k != "rope_theta"}
        )
        if family == "gemma3":
            config["rope_local_base_freq"] = SLIDING_DEFAULT["rope_theta"]
    elif family == "gemma3":
        config["rope_parameters"] = {"full_attention": scaling, "sliding_attention": SLIDING_DEFAULT}
    else:
        config["rope_parameters"] = scaling
    config_file.write_text(json.dumps(config))
    return path


def destination(tmp_path: Path, writer: str) -> Path:
    return tmp_path / ("model.gguf" if writer == "gguf" else f"out-{writer}")


# With head_dim 16, base 1e4 and 16 original positions, llama.cpp's fixed betas 32 / 1 put YaRN's correction
# range at dims 0 .. 1; these betas at 1 .. 4 (a different blend). With base 100 and 64 original positions
# the range is 0 .. 4.03, which llama.cpp always truncates to 0 .. 5 (ref: ggml.c ggml_rope_yarn_corr_dims):
# inv_freq of dims 1-4 differ by 4-36 %.
OTHER_BETAS = {"beta_fast": 0.5, "beta_slow": 0.05}
UNTRUNCATED = {"truncate": False, "rope_theta": 100.0, "original_max_position_embeddings": 64}

# (family, writer, yarn parameters besides the defaults of yarn())
PARITY = [
    ("gemma3", "gguf", {}),
    ("gemma3", "onnx", {}),
    ("gemma2", "gguf", {}),
    ("gemma2", "onnx", {}),
    ("gemma", "gguf", {}),
    # an explicit attention factor: rope.scaling.attn_factor in GGUF (Gemma 1/2 scale every layer)
    ("gemma2", "gguf", {"attention_factor": 1.5}),
    ("gemma", "onnx", {"attention_factor": 1.5}),
    # what llama.cpp cannot state, ONNX can: other betas, an untruncated correction range
    ("gemma3", "onnx", OTHER_BETAS),
    ("gemma2", "onnx", UNTRUNCATED),
]


@pytest.mark.parametrize("family,writer,params", PARITY)
def test_yarn_matches_transformers_in_the_runtime(family, writer, params, corpus, tmp_path, capsys):
    reference = make_scaled(tmp_path / "ref", family, yarn(**params))
    out = destination(tmp_path, writer)
    assert main(["convert", str(reference), str(out), "--to", writer]) == 0, capsys.readouterr().err
    report = validate(out, reference, corpus, n_ctx=N_CTX, n_windows=WINDOWS, max_kld=MAX_KLD)
    assert report.metrics.kld < MAX_KLD and report.metrics.top1_pct == 100.0, report.metrics


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_the_model_without_its_yarn_fails_the_bound(family, corpus, tmp_path):
    """The parity above can fail: the same weights with YaRN dropped (default rope) or with transformers'
    attention factor lost (attention_factor 1) score far past MAX_KLD against the YaRN reference."""
    reference = make_scaled(tmp_path / "ref", family, yarn())
    plain = {"rope_type": "default", "rope_theta": 10000.0}
    for name, scaling in (("plain", plain), ("no-attention-factor", yarn(attention_factor=1.0))):
        other = make_scaled(tmp_path / name, family, scaling)
        report = validate(other, reference, corpus, n_ctx=N_CTX, n_windows=WINDOWS)
        assert report.metrics.kld > 10 * MAX_KLD, (name, report.metrics)


def test_yarn_gguf_states_what_llamacpp_reads(tmp_path, capsys):
    from converters.gguf_header import Metadata, read_header

    reference = make_scaled(tmp_path / "ref", "gemma2", yarn(attention_factor=1.5))
    out = tmp_path / "model.gguf"
    assert main(["convert", str(reference), str(out), "--to", "gguf"]) == 0, capsys.readouterr().err
    meta = Metadata(read_header(out))
    assert meta.text("gemma2.rope.scaling.type") == "yarn"
    assert meta.number("gemma2.rope.scaling.factor") == 4.0
    assert meta.integer("gemma2.rope.scaling.original_context_length") == 16
    # llama.cpp multiplies it by get_mscale(4) = 1 + 0.1 ln 4 (llama-context.cpp, ggml rope_yarn)
    assert meta.number("gemma2.rope.scaling.attn_factor") == pytest.approx(1.5 / 1.1386294, rel=1e-6)


# (family, writer, scaling, config style, the key named, words of the reason)
REFUSED = [
    (
        "gemma3",
        "gguf",
        {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
        "5",
        "rope_parameters.full_attention.rope_type = 'dynamic'",
        "no dynamic rope scaling",
    ),
    (
        "gemma3",
        "onnx",
        {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
        "5",
        "rope_parameters.full_attention.rope_type = 'dynamic'",
        "cos/sin tables cannot follow",
    ),
    (
        "gemma2",
        "gguf",
        {"type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
        "4",
        "rope_scaling.type = 'dynamic'",
        "no dynamic rope scaling",
    ),
    (
        "gemma",
        "onnx",
        {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
        "5",
        "rope_parameters.rope_type = 'dynamic'",
        "cos/sin tables cannot follow",
    ),
    ("gemma3", "gguf", yarn(**OTHER_BETAS), "5", "rope_parameters.full_attention.rope_type = 'yarn'", "beta_fast"),
    ("gemma2", "gguf", yarn(**UNTRUNCATED), "5", "rope_parameters.rope_type = 'yarn'", "truncates"),
    # llama.cpp's rope.scaling.attn_factor scales Gemma 3's sliding layers too
    ("gemma3", "gguf", yarn(attention_factor=1.5), "4", "rope_scaling.rope_type = 'yarn'", "sliding layers"),
]


@pytest.mark.parametrize("family,writer,scaling,style,key,words", REFUSED)
def test_what_the_runtime_cannot_express_is_refused(family, writer, scaling, style, key, words, tmp_path, capsys):
    reference = make_scaled(tmp_path / "ref", family, scaling, style)
    out = destination(tmp_path, writer)
    capsys.readouterr()  # make_tiny's progress bars
    code = main(["convert", str(reference), str(out), "--to", writer])
    assert_one_line_error(code, capsys.readouterr().err, f"{reference / 'config.json'}: {key}", words)
    assert_nothing_left(out)


def test_yarn_reads_back_from_gguf(tmp_path, capsys):
    """GGUF -> GemmaSpec: the YaRN llama.cpp reads, as transformers' parameters."""
    from converters import gguf as gguf_conv

    reference = make_scaled(tmp_path / "ref", "gemma2", yarn(attention_factor=1.5))
    out = tmp_path / "model.gguf"
    assert main(["convert", str(reference), str(out), "--to", "gguf"]) == 0, capsys.readouterr().err
    scaling = gguf_conv.read(out).spec.rope_scaling
    params = dict(scaling.params)
    assert (scaling.rope_type, scaling.factor, params["original_max_position_embeddings"]) == ("yarn", 4.0, 16)
    assert params["attention_factor"] == pytest.approx(1.5, rel=1e-6)


@pytest.mark.parametrize(
    "family,params", [("gemma3", OTHER_BETAS), ("gemma2", UNTRUNCATED), ("gemma3", {"attention_factor": 1.5})]
)
def test_a_refused_yarn_would_run_differently_in_llamacpp(family, params, corpus, tmp_path, monkeypatch, capsys):
    """The refusals above are needed: the same GGUF written anyway (the check skipped, attn_factor as for
    Gemma 1/2) scores past MAX_KLD in llama.cpp."""
    import math

    from converters import rope

    def unchecked(spec, source):
        attention = rope.reference_rope(spec, spec.layer_types.index("full_attention") if family == "gemma3" else 0)[1]
        return attention / (0.1 * math.log(spec.rope_scaling.factor) + 1.0)

    monkeypatch.setattr(rope, "gguf_yarn_attn_factor", unchecked)
    reference = make_scaled(tmp_path / "ref", family, yarn(**params))
    out = tmp_path / "model.gguf"
    assert main(["convert", str(reference), str(out), "--to", "gguf"]) == 0, capsys.readouterr().err
    report = validate(out, reference, corpus, n_ctx=N_CTX, n_windows=WINDOWS)
    assert report.metrics.kld > 10 * MAX_KLD, report.metrics
