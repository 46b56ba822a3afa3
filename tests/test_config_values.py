"""config.json values are checked where they are read.

Supported values work and read as transformers reads them (its config classes' defaults for missing
keys included); every other value (wrong type, out of range, null where a number is needed, unknown
enum, a size the tensors do not have) is one line on stderr naming config.json and the key, exit 2,
nothing at the destination. The cases are generated per kind, beyond field case config-values.sh.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import Gemma2Config, Gemma3TextConfig, GemmaConfig

from gemport.cli import main
from gemport.errors import InputError, UnsupportedError
from gemport.spec import EXACT_GELU, FULL, SLIDING, TANH_GELU, GemmaSpec, RopeScaling
from tests.test_bad_input import assert_nothing_left, assert_one_line_error

BAD_INTS = [0, -1, 1.5, "8", None, True, [4], 10**12]
INT_KEYS = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "sliding_window",
]
BAD_NUMBERS = [0, -1.0, "1e-6", None, float("nan"), float("inf"), [1.0], False]


def _set(config: dict, key: str, value) -> None:
    """Set ``key`` (a dotted path into nested objects) to ``value``."""
    *parents, last = key.split(".")
    for p in parents:
        config = config[p]
    config[last] = value


def refused(src: Path, tmp_path: Path, capsys, edit: dict, *words: str, remove: tuple[str, ...] = ()) -> None:
    """``edit`` applied to src's config.json (dotted keys), the conversion refused in one line naming
    config.json and ``words``, nothing written."""
    folder = tmp_path / "src"
    shutil.copytree(src, folder)
    config = json.loads((folder / "config.json").read_text())
    for key in remove:
        config.pop(key, None)
    for key, value in edit.items():
        _set(config, key, value)
    (folder / "config.json").write_text(json.dumps(config))
    dst = tmp_path / "dst"
    code = main(["convert", str(folder), str(dst), "--to", "hf"])
    assert_one_line_error(code, capsys.readouterr().err, str(folder / "config.json"), *words)
    assert_nothing_left(dst)


@pytest.mark.parametrize("value", BAD_INTS, ids=repr)
@pytest.mark.parametrize("key", INT_KEYS)
def test_bad_sizes_are_named(tiny_models, tmp_path, capsys, key, value):
    refused(tiny_models["gemma3"], tmp_path, capsys, {key: value}, f"{key} = ")


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=repr)
@pytest.mark.parametrize(
    "variant,key",
    [
        ("gemma3", "rms_norm_eps"),
        ("gemma3", "query_pre_attn_scalar"),
        ("gemma3", "rope_parameters.full_attention.rope_theta"),
        ("gemma3", "rope_parameters.sliding_attention.rope_theta"),
        ("gemma3", "rope_parameters.full_attention.factor"),
        ("gemma2", "rope_parameters.rope_theta"),
        ("gemma2", "query_pre_attn_scalar"),
    ],
)
def test_bad_numbers_are_named(tiny_models, tmp_path, capsys, variant, key, value):
    refused(tiny_models[variant], tmp_path, capsys, {key: value}, f"{key} = ")


@pytest.mark.parametrize("value", [0, -1.0, "50", float("nan"), [50.0], True], ids=repr)
@pytest.mark.parametrize(
    "variant,key",
    [
        ("gemma2", "attn_logit_softcapping"),
        ("gemma2", "final_logit_softcapping"),
        ("gemma3", "final_logit_softcapping"),
    ],
)
def test_bad_softcaps_are_named(tiny_models, tmp_path, capsys, variant, key, value):
    refused(tiny_models[variant], tmp_path, capsys, {key: value}, f"{key} = ")


@pytest.mark.parametrize(
    "variant,edit,remove,words",
    [
        # field case config-values.sh, each
        ("gemma3", {"rope_theta": None}, ("rope_parameters",), ("rope_theta = None",)),
        ("gemma3", {"rope_scaling": {"rope_type": "linear"}}, ("rope_parameters",), ("rope_scaling.factor", "factor")),
        ("gemma3", {"num_attention_heads": 0}, ("head_dim",), ("num_attention_heads = 0",)),
        # unknown or unsupported enum values
        ("gemma3", {"hidden_activation": "relu"}, (), ("hidden_activation", "'relu'")),
        ("gemma3", {"hidden_activation": 5}, (), ("hidden_activation = 5",)),
        ("gemma-mha", {"hidden_act": "silu"}, (), ("hidden_act", "'silu'")),
        # transformers runs a Gemma 1 "gelu_python" exact (only "gelu" is read as tanh)
        ("gemma-mha", {"hidden_act": "gelu_python"}, (), ("hidden_act", "'gelu_python'")),
        ("gemma3", {"rope_parameters.full_attention.rope_type": "longrope"}, (), ("rope_type", "'longrope'")),
        ("gemma3", {"rope_parameters.full_attention.rope_type": "llama3"}, (), ("rope_type", "'llama3'")),
        ("gemma3", {"rope_parameters.full_attention.rope_type": 3}, (), ("rope_parameters.full_attention.rope_type",)),
        ("gemma2", {"rope_parameters": {"rope_type": "no-such-type", "factor": 2.0}}, (), ("'no-such-type'",)),
        (
            "gemma3",
            {"rope_parameters.sliding_attention": {"rope_type": "linear", "factor": 2.0}},
            (),
            ("sliding_attention",),
        ),
        ("gemma3", {"rope_parameters": [1, 2]}, (), ("rope_parameters = [1, 2]",)),
        ("gemma3", {"rope_parameters.full_attention": 7}, (), ("rope_parameters.full_attention = 7",)),
        ("gemma2", {"rope_scaling": "linear"}, ("rope_parameters",), ("rope_scaling = 'linear'",)),
        (
            "gemma3",
            {"rope_parameters.full_attention.beta_fast": "x", "rope_parameters.full_attention.rope_type": "yarn"},
            (),
            ("beta_fast",),
        ),
        (
            "gemma3",
            {"layer_types": ["sliding_attention", "global", "sliding_attention", "full_attention"]},
            (),
            ("layer_types[1] = 'global'",),
        ),
        ("gemma3", {"layer_types": [FULL, SLIDING]}, (), ("layer_types", "4 layer types")),
        ("gemma3", {"layer_types": "full_attention"}, (), ("layer_types",)),
        ("gemma3", {"sliding_window_pattern": 0}, ("layer_types",), ("sliding_window_pattern = 0",)),
        ("gemma3", {"model_type": 5}, (), ("model_type=5",)),
        ("gemma3", {"model_type": "gemma4_text"}, (), ("model_type='gemma4_text'",)),
        # token ids
        ("gemma3", {"bos_token_id": 512}, (), ("bos_token_id = 512", "0..511")),
        ("gemma3", {"bos_token_id": None}, (), ("bos_token_id = None",)),
        ("gemma3", {"eos_token_id": [1, 999]}, (), ("eos_token_id",)),
        ("gemma3", {"eos_token_id": []}, (), ("eos_token_id",)),
        ("gemma3", {"pad_token_id": -1}, (), ("pad_token_id = -1",)),
        # switches transformers reads that gemport does not carry
        ("gemma3", {"tie_word_embeddings": "yes"}, (), ("tie_word_embeddings = 'yes'",)),
        ("gemma3", {"attention_bias": True}, (), ("attention_bias",)),
        ("gemma3", {"use_bidirectional_attention": True}, (), ("use_bidirectional_attention",)),
        # heads
        ("gemma3", {"num_key_value_heads": 0}, (), ("num_key_value_heads = 0",)),
        ("gemma3", {"num_key_value_heads": 3}, (), ("num_key_value_heads = 3", "divide")),
        ("gemma-mha", {"num_key_value_heads": None}, (), ("num_key_value_heads = None",)),
    ],
)
def test_bad_values_are_named(tiny_models, tmp_path, capsys, variant, edit, remove, words):
    refused(tiny_models[variant], tmp_path, capsys, edit, *words, remove=remove)


def test_a_config_that_is_not_an_object(tiny_models, tmp_path, capsys):
    folder = tmp_path / "src"
    shutil.copytree(tiny_models["gemma3"], folder)
    (folder / "config.json").write_text("[1, 2, 3]")
    code = main(["convert", str(folder), str(tmp_path / "dst"), "--to", "hf"])
    assert_one_line_error(code, capsys.readouterr().err, str(folder / "config.json"), "JSON list")
    assert_nothing_left(tmp_path / "dst")


@pytest.mark.parametrize(
    "edit,words",
    [
        ({"num_hidden_layers": 1000, "layer_types": None}, ("1000 layers", "hold 4")),
        ({"num_hidden_layers": 3, "layer_types": None}, ("3 layers", "hold 4")),
        ({"num_hidden_layers": 100}, ("layer_types", "list of 100 layer types")),
        ({"vocab_size": 1000}, ("model.embed_tokens.weight", "[512, 64]", "[1000, 64]")),
        ({"hidden_size": 128}, ("model.embed_tokens.weight", "[512, 64]", "[512, 128]")),
    ],
)
def test_sizes_are_checked_against_the_tensors(tiny_models, tmp_path, capsys, edit, words):
    """Sizes within the bounds that the tensors do not have: named before anything per layer is built."""
    folder = tmp_path / "src"
    shutil.copytree(tiny_models["gemma3"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update({k: v for k, v in edit.items() if v is not None})
    for key in (k for k, v in edit.items() if v is None):
        config.pop(key)
    (folder / "config.json").write_text(json.dumps(config))
    dst = tmp_path / "dst"
    code = main(["convert", str(folder), str(dst), "--to", "hf"])
    assert_one_line_error(code, capsys.readouterr().err, str(folder), *words)
    assert_nothing_left(dst)


def test_absurd_layer_count_is_refused_before_anything_is_built(tmp_path, capsys):
    """Field case absurd-layer-count.sh: 1e9 layers and an empty safetensors file; one line, at once."""
    import resource
    import struct

    folder = tmp_path / "cfg"
    folder.mkdir()
    config = {
        "model_type": "gemma3_text",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 10**9,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "sliding_window": 16,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 8) + b"{}      ")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code = main(["inspect", str(folder)])
    assert_one_line_error(code, capsys.readouterr().err, str(folder / "config.json"), "num_hidden_layers = 1000000000")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # kB: nothing per layer built
    config["num_hidden_layers"] = 4  # within the bounds: then checked against the (absent) tensors
    (folder / "config.json").write_text(json.dumps(config))
    code = main(["inspect", str(folder)])
    assert_one_line_error(code, capsys.readouterr().err, str(folder), "4 layers", "hold 0")


# --- supported values work, and read as transformers reads them -------------------------------

MINIMAL = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
}
CLASSES = {
    "gemma": (GemmaConfig, "gemma"),
    "gemma2": (Gemma2Config, "gemma2"),
    "gemma3": (Gemma3TextConfig, "gemma3_text"),
}


@pytest.mark.parametrize("family", list(CLASSES))
def test_missing_keys_take_transformers_defaults(family):
    cls, model_type = CLASSES[family]
    spec = GemmaSpec.from_hf_config({"model_type": model_type, **MINIMAL, "num_attention_heads": 16})
    hf = cls(**MINIMAL)
    assert (spec.num_kv_heads, spec.head_dim, spec.max_position) == (
        hf.num_key_value_heads,
        hf.head_dim,
        hf.max_position_embeddings,
    )
    assert spec.rms_eps == hf.rms_norm_eps and (spec.bos_token_id, spec.eos_token_id) == (
        hf.bos_token_id,
        hf.eos_token_id,
    )
    if family == "gemma":
        assert spec.rope_theta == hf.rope_parameters["rope_theta"]
        assert (spec.query_pre_attn_scalar, spec.attn_softcap, spec.final_softcap, spec.sliding_window) == (None,) * 4
        return
    assert spec.layer_types == tuple(hf.layer_types) and spec.sliding_window == hf.sliding_window
    assert spec.query_pre_attn_scalar == hf.query_pre_attn_scalar
    assert spec.final_softcap == hf.final_logit_softcapping
    if family == "gemma2":
        assert spec.attn_softcap == hf.attn_logit_softcapping and spec.rope_theta == hf.rope_parameters["rope_theta"]
    else:
        assert spec.attn_softcap is None  # kept in transformers' config, never applied
        assert spec.rope_theta == hf.rope_parameters[FULL]["rope_theta"]
        assert spec.rope_local_theta == hf.rope_parameters[SLIDING]["rope_theta"]


@pytest.mark.parametrize(
    "family,config,expected",
    [
        ("gemma3", {"hidden_activation": "gelu_new"}, {"activation": TANH_GELU}),
        ("gemma3", {"hidden_activation": "gelu"}, {"activation": EXACT_GELU}),
        ("gemma2", {"hidden_activation": "gelu_python"}, {"activation": EXACT_GELU}),
        ("gemma", {"hidden_act": "gelu"}, {"activation": TANH_GELU}),  # ref: GemmaConfig.__post_init__
        ("gemma2", {"attn_logit_softcapping": None}, {"attn_softcap": None}),
        ("gemma2", {"attn_logit_softcapping": 20}, {"attn_softcap": 20.0}),
        ("gemma3", {"attn_logit_softcapping": 50.0}, {"attn_softcap": None}),
        ("gemma", {"query_pre_attn_scalar": 7, "final_logit_softcapping": 3.0}, {"query_pre_attn_scalar": None}),
        (
            "gemma2",
            {"rope_theta": 1000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
            {"rope_scaling": RopeScaling("linear", 2.0)},
        ),
        ("gemma2", {"rope_local_base_freq": 5.0}, {"rope_local_theta": None}),
        (
            "gemma",
            {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}, "max_position_embeddings": 1024},
            {"rope_scaling": RopeScaling("dynamic", 4.0, (("original_max_position_embeddings", 1024),))},
        ),
        (  # transformers' dynamic_rope_update grows the frequencies past the stated original length
            "gemma2",
            {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 16}},
            {"rope_scaling": RopeScaling("dynamic", 4.0, (("original_max_position_embeddings", 16),))},
        ),
        (
            "gemma3",
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16}, "max_position_embeddings": 1024},
            {"rope_scaling": RopeScaling("yarn", 4.0, (("beta_fast", 16), ("original_max_position_embeddings", 1024)))},
        ),
        ("gemma3", {"pad_token_id": None, "eos_token_id": [1, 106]}, {"pad_token_id": 0, "eos_token_id": (1, 106)}),
        ("gemma3", {"query_pre_attn_scalar": 24.0}, {"query_pre_attn_scalar": 24}),
    ],
)
def test_supported_values_read(family, config, expected):
    _, model_type = CLASSES[family]
    spec = GemmaSpec.from_hf_config({"model_type": model_type, **MINIMAL, "num_key_value_heads": 4, **config})
    assert {k: getattr(spec, k) for k in expected} == expected


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn"])
@pytest.mark.parametrize("family", list(CLASSES))
def test_rope_scaling_passes_through_hf_and_loads_in_transformers(family, rope_type):
    cls, model_type = CLASSES[family]
    scaling = {"rope_type": rope_type, "factor": 4.0, "rope_theta": 10000.0}
    if family == "gemma3":
        rope = {FULL: scaling, SLIDING: {"rope_type": "default", "rope_theta": 100.0}}
    else:
        rope = scaling
    spec = GemmaSpec.from_hf_config(
        {"model_type": model_type, **MINIMAL, "num_key_value_heads": 4, "rope_parameters": rope}
    )
    for style in ("4", "5"):
        written = spec.to_hf_config(style)
        assert GemmaSpec.from_hf_config(written) == spec
        hf = cls(**{k: v for k, v in written.items() if k != "model_type"})
        full = hf.rope_parameters[FULL] if family == "gemma3" else hf.rope_parameters
        assert (full["rope_type"], full["factor"]) == (rope_type, 4.0)


def test_errors_name_the_file_and_key_in_the_library():
    with pytest.raises(InputError, match=r"^c\.json: num_key_value_heads = 0: must be an integer"):
        GemmaSpec.from_hf_config({"model_type": "gemma", **MINIMAL, "num_key_value_heads": 0}, "c.json")
    with pytest.raises(UnsupportedError, match=r"^c\.json: rope_scaling\.rope_type: rope type 'longrope'"):
        GemmaSpec.from_hf_config(
            {"model_type": "gemma", **MINIMAL, "rope_scaling": {"rope_type": "longrope"}}, "c.json"
        )
