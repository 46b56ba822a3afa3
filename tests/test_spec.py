from __future__ import annotations

import json

import pytest
from transformers import Gemma2Config, Gemma3TextConfig, GemmaConfig

from gemport.errors import InputError, UnsupportedError
from gemport.spec import FULL, SLIDING, GemmaSpec, RopeScaling

# The config.json of google/gemma-3-1b-pt as published (transformers 4.x style).
GEMMA3_1B_4X = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "attention_bias": False,
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152,
    "intermediate_size": 6912,
    "max_position_embeddings": 32768,
    "num_attention_heads": 4,
    "num_hidden_layers": 26,
    "num_key_value_heads": 1,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "vocab_size": 262144,
}
CLASSES = {"gemma": GemmaConfig, "gemma2": Gemma2Config, "gemma3": Gemma3TextConfig}


def test_gemma3_4x_config_reads_like_transformers():
    spec = GemmaSpec.from_hf_config(GEMMA3_1B_4X)
    hf = Gemma3TextConfig(**{k: v for k, v in GEMMA3_1B_4X.items() if k != "model_type"})
    assert spec.layer_types == tuple(hf.layer_types)
    assert spec.layer_types[5] == FULL and spec.layer_types[0] == SLIDING
    assert spec.rope_theta == hf.rope_parameters[FULL]["rope_theta"] == 1e6
    assert spec.rope_local_theta == hf.rope_parameters[SLIDING]["rope_theta"] == 1e4
    assert (spec.num_kv_heads, spec.head_dim, spec.sliding_window, spec.qk_norm) == (1, 256, 512, True)
    assert GemmaSpec.from_hf_config(hf.to_dict()) == spec  # the 5.x form of the same config


@pytest.mark.parametrize("style", ["4", "5"])
@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_written_config_loads_in_transformers_and_reads_back(family, style):
    n = 6
    spec = GemmaSpec(
        family=family,
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=96,
        num_layers=n,
        num_heads=4,
        num_kv_heads=1 if family == "gemma" else 2,
        head_dim=32,
        layer_types=(FULL,) * n
        if family == "gemma"
        else tuple(FULL if (i + 1) % (2 if family == "gemma2" else 3) == 0 else SLIDING for i in range(n)),
        sliding_window=None if family == "gemma" else 128,
        rope_theta=1e6 if family == "gemma3" else 1e4,
        rope_local_theta=1e4 if family == "gemma3" else None,
        rope_scaling=RopeScaling("linear", 8.0) if family == "gemma3" else None,
        query_pre_attn_scalar=None if family == "gemma" else 48,
        attn_softcap=50.0 if family == "gemma2" else None,
        final_softcap=30.0 if family == "gemma2" else None,
        tie_embeddings=family != "gemma2",
    )
    cfg = spec.to_hf_config(style)
    hf = CLASSES[family](**{k: v for k, v in cfg.items() if k != "model_type"})
    assert GemmaSpec.from_hf_config(cfg) == spec
    assert GemmaSpec.from_hf_config(hf.to_dict()) == spec
    if family != "gemma":
        assert tuple(hf.layer_types) == spec.layer_types


def test_other_architectures_are_refused():
    with pytest.raises(UnsupportedError, match="model_type='llama'"):
        GemmaSpec.from_hf_config({"model_type": "llama", "hidden_size": 8}, "config.json")
    with pytest.raises(UnsupportedError, match="multimodal"):
        GemmaSpec.from_hf_config({"model_type": "gemma3", "text_config": {}})


def test_missing_field_is_named():
    cfg = dict(GEMMA3_1B_4X)
    del cfg["hidden_size"]
    with pytest.raises(InputError, match="config.json: config is missing required field.*hidden_size"):
        GemmaSpec.from_hf_config(cfg, "config.json")


def test_invalid_values_are_refused():
    with pytest.raises(ValueError, match="num_kv_heads"):
        GemmaSpec(
            family="gemma",
            vocab_size=8,
            hidden_size=8,
            intermediate_size=8,
            num_layers=1,
            num_heads=3,
            num_kv_heads=2,
            head_dim=4,
        )
    with pytest.raises(ValueError, match="sliding_window"):
        GemmaSpec(
            family="gemma2",
            vocab_size=8,
            hidden_size=8,
            intermediate_size=8,
            num_layers=1,
            num_heads=1,
            num_kv_heads=1,
            head_dim=4,
            layer_types=(SLIDING,),
        )


def test_spec_json_round_trip():
    spec = GemmaSpec.from_hf_config(GEMMA3_1B_4X)
    assert GemmaSpec.from_json(spec.to_json()) == spec


def _spec(family: str, **fields) -> GemmaSpec:
    base = dict(family=family, vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2)
    base |= dict(num_kv_heads=1, head_dim=16)
    if family != "gemma":
        base |= dict(layer_types=(SLIDING, FULL), sliding_window=8)
    return GemmaSpec(**(base | fields))


def test_spec_carries_only_what_the_family_uses():
    """Built by any reader (a GGUF, a JAX manifest), a spec drops what transformers' model of its family
    ignores, so that no writer can apply it."""
    g3 = _spec("gemma3", attn_softcap=50.0, final_softcap=30.0, query_pre_attn_scalar=24)
    assert (g3.attn_softcap, g3.final_softcap, g3.query_pre_attn_scalar) == (None, 30.0, 24)
    g1 = _spec("gemma", attn_softcap=50.0, final_softcap=30.0, query_pre_attn_scalar=7, sliding_window=4)
    assert (g1.attn_softcap, g1.final_softcap, g1.query_pre_attn_scalar, g1.sliding_window) == (None,) * 4
    assert g1.attn_scale == 16**-0.5
    g2 = _spec("gemma2", attn_softcap=50.0, rope_local_theta=10000.0)  # one rope base: the global one
    assert (g2.attn_softcap, g2.rope_local_theta) == (50.0, None)
    with pytest.raises(ValueError, match="one rope base"):
        _spec("gemma2", rope_local_theta=99.0)
    assert _spec("gemma", activation="gelu").activation == "gelu_pytorch_tanh"
    assert _spec("gemma2", activation="gelu_new").activation == "gelu_pytorch_tanh"
    assert _spec("gemma2", activation="gelu").activation == "gelu"


def test_rope_scaling_layers_per_family():
    scaling = RopeScaling("linear", 8.0)
    assert [_spec("gemma3", rope_scaling=scaling).layer_rope_scaling(i) for i in (0, 1)] == [None, scaling]
    assert [_spec("gemma2", rope_scaling=scaling).layer_rope_scaling(i) for i in (0, 1)] == [scaling, scaling]
    assert [_spec("gemma", rope_scaling=scaling).layer_rope_scaling(i) for i in (0, 1)] == [scaling, scaling]


@pytest.mark.parametrize(
    "fields,words",
    [
        ({"num_layers": 10**9}, "num_layers must be an integer in 1..1024"),
        ({"vocab_size": 1 << 30}, "vocab_size"),
        ({"head_dim": 16.0}, "head_dim"),
        ({"num_heads": True}, "num_heads"),
        ({"rms_eps": float("nan")}, "rms_eps"),
        ({"rope_theta": 0}, "rope_theta"),
        ({"final_softcap": -1.0}, "final_softcap"),
        ({"activation": "relu"}, "activation"),
        ({"bos_token_id": 64}, "bos_token_id"),
        ({"eos_token_id": (1, -1)}, "eos_token_id"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"layer_types": "full"}, "layer_types"),
        ({"rope_scaling": {"factor": 2}}, "rope_scaling"),
    ],
)
def test_spec_values_are_checked(fields, words):
    with pytest.raises(ValueError, match=words):
        _spec("gemma3", **fields)


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"family": "gemma"},
        {"rope_scaling": 5},
        {"rope_scaling": {"rope_type": "yarn", "factor": 2, "params": [["x", 1]]}},
    ],
)
def test_spec_from_json_refuses_what_is_not_a_spec(data):
    good = _spec("gemma3").to_json()
    with pytest.raises(ValueError):
        GemmaSpec.from_json(data if isinstance(data, list) or "family" in data else good | data)


def test_rope_scaling_round_trips_with_its_parameters():
    scaling = RopeScaling("yarn", 4.0, (("original_max_position_embeddings", 8192), ("beta_fast", 16.0)))
    spec = _spec("gemma3", rope_scaling=scaling)
    assert GemmaSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert spec.to_hf_config()["rope_parameters"][FULL] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "beta_fast": 16.0,
        "original_max_position_embeddings": 8192,
        "rope_theta": 10000.0,
    }
