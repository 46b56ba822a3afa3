"""JAX/Orbax checkpoints of Google's gemma library: round trips, the official tree, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from converters import hf
from converters import jax as cj
from converters.presets import PRESETS, Preset
from gemport.cli import main
from gemport.errors import CheckpointError, UnsupportedError
from tests.test_bad_input import assert_nothing_left, assert_one_line_error
from tests.test_hf import assert_bit_identical
from tests.tiny import make_tiny

VARIANTS = ("gemma-mha", "gemma-mqa-tied", "gemma2", "gemma3")


@pytest.fixture(scope="module")
def sources(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The tiny models; the gemma library ties the head to the embedding, so the MQA model is
    also made tied (the untied one is refused, see test_untied_head_is_refused)."""
    out = dict(tiny_models)
    out["gemma-mqa-tied"] = make_tiny("gemma-mqa", tmp_path_factory.mktemp("mqa") / "m", tie_word_embeddings=True)
    return out


def load_like_gemma_library(path: Path) -> dict:
    """The stored tree, restored as gm.ckpts.load_params restores it: the metadata tree turned
    into ShapeDtypeStructs with a sharding, then StandardCheckpointer.restore
    (ref: gemma/gm/ckpts/_checkpoint.py load_params, _get_metadata_and_path, _as_shape_dtype_struct)."""
    import jax
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    meta = checkpointer.metadata(path.resolve()).item_metadata.tree
    sharding = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta)
    return jax.tree.map(np.asarray, checkpointer.restore(path.resolve(), target))


def official_flat_shapes(spec, rows: int, transposed: bool) -> dict[str, dict[str, tuple[int, ...]]]:
    """The released flat tree of a model, written out from the gemma library's modules
    (ref: gemma/gm/nn/_modules.py Embedder, Attention.setup, FeedForward, Block.setup; flat
    names from gemma/gm/ckpts/_compat.py flatten_and_remap_params)."""
    d, f, h, n, k = spec.hidden_size, spec.intermediate_size, spec.head_dim, spec.num_heads, spec.num_kv_heads
    tree = {"transformer/embedder": {"input_embedding": (rows, d)}, "transformer/final_norm": {"scale": (d,)}}
    for i in range(spec.num_layers):
        p = f"transformer/layer_{i}/"
        if n == k:
            tree[p + "attn/qkv_einsum"] = {"w": (3, n, d, h)}
        else:
            tree[p + "attn/q_einsum"] = {"w": (n, d, h)}
            tree[p + "attn/kv_einsum"] = {"w": (2, k, d, h)}
        tree[p + "attn/attn_vec_einsum"] = {"w": (n, h, d)}
        if spec.family == "gemma3":
            tree[p + "attn/_query_norm"] = {"scale": (h,)}
            tree[p + "attn/_key_norm"] = {"scale": (h,)}
        tree[p + "mlp/gating_einsum"] = {"w": (2, f, d) if transposed else (2, d, f)}
        tree[p + "mlp/linear"] = {"w": (f, d)}
        names = ["pre_attention_norm", "pre_ffw_norm"]
        if spec.family != "gemma":
            names += ["post_attention_norm", "post_ffw_norm"]
        for name in names:
            tree[p + name] = {"scale": (d,)}
    return tree


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_hf_jax_hf_is_bit_identical(sources, tmp_path, variant, layout):
    src = sources[variant]
    jax_dir = cj.write(hf.read(src), tmp_path / "jax", layout=layout)
    ckpt = cj.read(jax_dir)
    assert ckpt.extra["jax.layout"] == layout
    hf.write(ckpt, tmp_path / "hf")
    assert_bit_identical(src, tmp_path / "hf")


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float64 summation order; a wrong orientation or head order is off by O(1)."""
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_tree_is_the_official_one_and_computes_what_hf_computes(sources, tmp_path, variant):
    """Exactly the released names and shapes; and each einsum of the gemma library, applied to the
    stored arrays, gives what the HF linear layers give (so every orientation is right)."""
    ref = hf.read(sources[variant])
    spec = ref.spec
    transposed = variant != "gemma-mha" and variant != "gemma-mqa-tied"  # Gemma 1: [2, D, F]
    tree = load_like_gemma_library(cj.write(ref, tmp_path / "jax"))
    shapes = {group: {k: tuple(v.shape) for k, v in leaves.items()} for group, leaves in tree.items()}
    assert shapes == official_flat_shapes(spec, spec.vocab_size, transposed)

    w = {name: t.load().double().numpy() for name, t in ref.tensors.items()}
    x = np.random.default_rng(0).standard_normal((5, spec.hidden_size))
    n, k, h = spec.num_heads, spec.num_kv_heads, spec.head_dim
    for i in range(spec.num_layers):
        p, hp = f"transformer/layer_{i}/", f"model.layers.{i}."
        # ref: _modules.py Attention.__call__ einsum equations
        if n == k:
            q, key, value = np.einsum("TD,SNDH->STNH", x, tree[p + "attn/qkv_einsum"]["w"].astype(np.float64))
        else:
            q = np.einsum("TD,NDH->TNH", x, tree[p + "attn/q_einsum"]["w"].astype(np.float64))
            key, value = np.einsum("SD,CKDH->CSKH", x, tree[p + "attn/kv_einsum"]["w"].astype(np.float64))
        assert_same(q.reshape(5, n * h), x @ w[hp + "self_attn.q_proj.weight"].T)
        assert_same(key.reshape(5, k * h), x @ w[hp + "self_attn.k_proj.weight"].T)
        assert_same(value.reshape(5, k * h), x @ w[hp + "self_attn.v_proj.weight"].T)
        encoded = np.random.default_rng(i).standard_normal((5, n, h))
        out = np.einsum("TNH,NHD->TD", encoded, tree[p + "attn/attn_vec_einsum"]["w"].astype(np.float64))
        assert_same(out, encoded.reshape(5, n * h) @ w[hp + "self_attn.o_proj.weight"].T)
        # ref: _modules.py FeedForward: '...F,NHF->...NH' when transposed, else '...F,NFH->...NH'
        gating = tree[p + "mlp/gating_einsum"]["w"].astype(np.float64)
        both = np.einsum("TF,NHF->TNH" if transposed else "TF,NFH->TNH", x, gating)
        assert_same(both[:, 0], x @ w[hp + "mlp.gate_proj.weight"].T)
        assert_same(both[:, 1], x @ w[hp + "mlp.up_proj.weight"].T)
        act = both[:, 0] * both[:, 1]
        down = np.einsum("TH,HF->TF", act, tree[p + "mlp/linear"]["w"].astype(np.float64))
        assert_same(down, act @ w[hp + "mlp.down_proj.weight"].T)
        # RMSNorm scales are the raw w of (1 + w), as in HF (ref: _layers.py RMSNorm)
        norms = {"pre_attention_norm": "input_layernorm"}
        if spec.family == "gemma":
            norms["pre_ffw_norm"] = "post_attention_layernorm"
        else:
            norms |= {
                "post_attention_norm": "post_attention_layernorm",
                "pre_ffw_norm": "pre_feedforward_layernorm",
                "post_ffw_norm": "post_feedforward_layernorm",
            }
        if spec.family == "gemma3":
            norms |= {"attn/_query_norm": "self_attn.q_norm", "attn/_key_norm": "self_attn.k_norm"}
        for jax_name, hf_name in norms.items():
            assert np.array_equal(tree[p + jax_name]["scale"], w[hp + hf_name + ".weight"]), (i, jax_name)
    assert np.array_equal(tree["transformer/embedder"]["input_embedding"], w["model.embed_tokens.weight"])
    assert np.array_equal(tree["transformer/final_norm"]["scale"], w["model.norm.weight"])


def test_nested_layout_is_what_model_init_makes(sources, tmp_path):
    """The nested tree: MLP weights bare, everything else in {'w'}/{'scale'} (ref: _compat.py)."""
    ref = hf.read(sources["gemma2"])
    tree = load_like_gemma_library(cj.write(ref, tmp_path / "jax", layout="nested"))
    assert set(tree) == {"embedder", "final_norm"} | {f"layer_{i}" for i in range(ref.spec.num_layers)}
    layer = tree["layer_1"]
    assert set(layer["mlp"]) == {"gating_einsum", "linear"}
    assert isinstance(layer["mlp"]["linear"], np.ndarray)
    assert set(layer["attn"]) == {"q_einsum", "kv_einsum", "attn_vec_einsum"}
    assert set(layer["attn"]["kv_einsum"]) == {"w"}
    assert set(layer) == {"attn", "mlp", "pre_attention_norm", "pre_ffw_norm", "post_attention_norm", "post_ffw_norm"}


def test_gating_orientation_is_read_either_way(sources, tmp_path):
    src = sources["gemma3"]
    for transposed in (False, True):
        out = tmp_path / f"jax-{transposed}"
        cj.write(hf.read(src), out, transposed_gating=transposed)
        gating = cj._tree_leaves(out)[0]
        shape = next(leaf.shape for leaf in gating if leaf.name == "layer_0/mlp/gating_einsum")
        assert shape[1] == (128 if transposed else 64)
        hf.write(cj.read(out), tmp_path / f"hf-{transposed}")
        assert_bit_identical(src, tmp_path / f"hf-{transposed}")


def test_padded_vocabulary_is_trimmed_or_kept(sources, tmp_path, monkeypatch):
    """Gemma 1/2 pad 256000 rows to 256128; the same rule, scaled down to the tiny vocabulary."""
    src = sources["gemma2"]
    vocab = hf.read(src).spec.vocab_size
    monkeypatch.setitem(cj.PADDED_ROWS, vocab, vocab + 128)
    out = cj.write(hf.read(src), tmp_path / "jax")
    tree = load_like_gemma_library(out)
    table = tree["transformer/embedder"]["input_embedding"]
    assert table.shape[0] == vocab + 128 and not table[vocab:].any()
    hf.write(cj.read(out), tmp_path / "hf")
    assert_bit_identical(src, tmp_path / "hf")
    kept = cj.read(out, keep_padded_vocab=True)
    assert kept.spec.vocab_size == vocab + 128
    assert torch.equal(
        kept.tensors["model.embed_tokens.weight"].load()[:vocab],
        hf.read(src).tensors["model.embed_tokens.weight"].load(),
    )
    # Without gemport.json the tokenizer's piece count says where the padding starts.
    (out / cj.MANIFEST).unlink()
    monkeypatch.setitem(PRESETS, "tiny", _preset_of(hf.read(src).spec))
    assert cj.read(out).spec.vocab_size == vocab


def _preset_of(spec) -> Preset:
    return Preset(
        spec.family,
        spec.num_layers,
        spec.hidden_size,
        spec.intermediate_size,
        spec.num_heads,
        spec.num_kv_heads,
        spec.head_dim,
        sliding_window=spec.sliding_window,
        query_pre_attn_scalar=spec.query_pre_attn_scalar,
    )


@pytest.mark.parametrize(
    "config_name,preset",
    [("GemmaConfig", "gemma-7b"), ("Gemma2Config", "gemma2-2b")],
)
def test_spec_of_an_official_tree_matches_transformers_config(config_name, preset):
    """A tree without gemport.json gets the facts of the official model of its size; transformers'
    default GemmaConfig is Gemma 7B and Gemma2Config is Gemma 2 2B, an independent statement of them.
    Only shapes are needed: the tree is described by its metadata."""
    import transformers

    from gemport.spec import GemmaSpec

    config = getattr(transformers, config_name)().to_dict()
    want = GemmaSpec.from_hf_config(config)
    shapes = cj.leaf_shapes(want, cj.PADDED_ROWS[want.vocab_size], cj.official_gating_transposed(want))
    by_name = {n: cj.Leaf(cj.stored_key(n, True), n, s, "bf16") for n, s in shapes.items()}
    got = cj._infer_spec(by_name, cj._family(list(by_name.values())), want.vocab_size, None, Path("x"))
    fields = ("rms_eps", "layer_types", "sliding_window", "rope_theta", "rope_scaling", "attn_softcap", "final_softcap")
    for field in ("family", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
        assert getattr(got, field) == getattr(want, field), field
    for field in fields:
        assert getattr(got, field) == getattr(want, field), field
    assert (got.query_pre_attn_scalar or got.head_dim) == (want.query_pre_attn_scalar or want.head_dim)
    assert got == cj._infer_spec(by_name, want.family, want.vocab_size, preset, Path("x"))


def test_tree_of_no_official_size_needs_gemport_json(sources, tmp_path, capsys):
    out = cj.write(hf.read(sources["gemma3"]), tmp_path / "jax")
    (out / cj.MANIFEST).unlink()
    code = main(["convert", str(out), str(tmp_path / "hf"), "--to", "hf"])
    assert_one_line_error(code, capsys.readouterr().err, str(out), "no official size", "gemma3-270m")
    code = main(["convert", str(out), str(tmp_path / "hf"), "--to", "hf", "--preset", "gemma3-1b"])
    assert_one_line_error(code, capsys.readouterr().err, str(out), "not a gemma3-1b")
    assert_nothing_left(tmp_path / "hf")


def test_cli_convert_to_and_from_jax(sources, tmp_path, capsys):
    src = sources["gemma3"]
    assert main(["convert", str(src), str(tmp_path / "jax"), "--to", "jax", "--dtype", "bf16"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "jax"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "jax" and list(info["types"]) == ["BF16"]
    assert info["types"]["BF16"]["tensors"] == info["tensors"]
    assert main(["convert", str(tmp_path / "jax"), str(tmp_path / "hf"), "--from", "jax", "--to", "hf"]) == 0
    ref = hf.read(src)
    for name, t in hf.read(tmp_path / "hf").tensors.items():
        assert torch.equal(t.load(), ref.tensors[name].load().to(torch.bfloat16)), name


def test_untied_head_is_refused(tiny_models, tmp_path, capsys):
    code = main(["convert", str(tiny_models["gemma-mqa"]), str(tmp_path / "jax"), "--to", "jax"])
    assert_one_line_error(code, capsys.readouterr().err, str(tiny_models["gemma-mqa"]), "separate lm_head")
    assert_nothing_left(tmp_path / "jax")


# --- bad input --------------------------------------------------------------------------------------
def resave(src: Path, dst: Path, edit) -> Path:
    """A copy of the Orbax checkpoint ``src`` whose tree went through ``edit``, with its
    tokenizer and gemport.json."""
    import orbax.checkpoint as ocp

    tree = load_like_gemma_library(src)
    edit(tree)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(dst.resolve(), tree)
    checkpointer.wait_until_finished()
    for name in ("tokenizer.model", cj.MANIFEST):
        shutil.copy(src / name, dst / name)
    return dst


def drop_layer(tree: dict) -> None:
    for key in [k for k in tree if k.startswith("transformer/layer_1/")]:
        del tree[key]


def rename_parameter(tree: dict) -> None:
    tree["transformer/layer_0/attn/query_einsum"] = tree.pop("transformer/layer_0/attn/q_einsum")


def reshape_parameter(tree: dict) -> None:
    w = tree["transformer/layer_2/mlp/linear"]["w"]
    tree["transformer/layer_2/mlp/linear"]["w"] = np.ascontiguousarray(w.T)


BAD_TREES = {
    "missing layer": (drop_layer, "missing layer layer_1"),
    "unknown parameter": (rename_parameter, "unknown parameter transformer/layer_0/attn/query_einsum/w"),
    "wrong shape": (reshape_parameter, "parameter transformer/layer_2/mlp/linear/w has shape [64, 128], expected"),
}


@pytest.mark.parametrize("case", list(BAD_TREES))
def test_bad_tree(sources, tmp_path, capsys, case):
    edit, message = BAD_TREES[case]
    good = cj.write(hf.read(sources["gemma2"]), tmp_path / "good")
    bad = resave(good, tmp_path / "bad", edit)
    dst = tmp_path / "dst"
    code = main(["convert", str(bad), str(dst), "--to", "hf"])
    assert_one_line_error(code, capsys.readouterr().err, str(bad), message)
    assert_nothing_left(dst)


def test_preset_option_applies_to_jax_sources_only(sources, tmp_path, capsys):
    code = main(["convert", str(sources["gemma3"]), str(tmp_path / "o"), "--to", "hf", "--preset", "gemma3-1b"])
    assert_one_line_error(code, capsys.readouterr().err, "apply to a JAX or gemma_pytorch source")


def test_unknown_preset_lists_known_ones(sources, tmp_path):
    out = cj.write(hf.read(sources["gemma3"]), tmp_path / "jax")
    (out / cj.MANIFEST).unlink()
    with pytest.raises(UnsupportedError, match="known: gemma-2b"):
        cj.read(out, preset="gemma4-1b")
    with pytest.raises(CheckpointError, match="not a gemma3-270m"):
        cj.read(out, preset="gemma3-270m")


@pytest.mark.realmodel
def test_demo_model_round_trip_and_spec_from_the_tree_alone(demo_model, tmp_path):
    """Gemma 3 270M: HF -> JAX -> HF bit-identical; without gemport.json the tree's shapes and
    tokenizer give back the demo model's architecture."""
    out = cj.write(hf.read(demo_model), tmp_path / "jax")
    hf.write(cj.read(out), tmp_path / "hf")
    assert_bit_identical(demo_model, tmp_path / "hf")
    (out / cj.MANIFEST).unlink()
    got, want = cj.read(out).spec, hf.read(demo_model).spec
    for field in (
        "family vocab_size hidden_size intermediate_size num_layers num_heads num_kv_heads head_dim "
        "layer_types sliding_window rope_theta rope_local_theta rope_scaling attn_softcap final_softcap"
    ).split():
        assert getattr(got, field) == getattr(want, field), field
    assert (got.query_pre_attn_scalar or got.head_dim) == (want.query_pre_attn_scalar or want.head_dim)


def test_a_full_disk_during_the_orbax_save_is_one_line(sources, tmp_path, capsys, monkeypatch):
    """tensorstore reports ENOSPC as ValueError text with the OS code: one line naming the
    destination, exit 2, nothing left (the scratch and the partial folder removed)."""
    import orbax.checkpoint as ocp

    def full(*args, **kwargs):
        raise ValueError(
            'RESOURCE_EXHAUSTED: Error writing "transformer/layer_0/attn/q_einsum.w/0.0.0": Failed to write '
            "10047488 bytes to file 184: No space left on device [os_error_code='28']"
        )

    monkeypatch.setattr(ocp.Checkpointer, "save", full)
    dst = tmp_path / "jax"
    code = main(["convert", str(sources["gemma3"]), str(dst), "--to", "jax"])
    assert_one_line_error(code, capsys.readouterr().err, str(dst), "disk full")
    assert_nothing_left(dst)
    assert not list(tmp_path.glob(".jax.spill-*"))
