"""Importance matrices (quantizers/imatrix.py): llama-imatrix's statistic, file format and loader.

The statistic is checked against an independent computation on the tiny models: each
projection's input is rebuilt from other points of the forward pass (the layer input through
input_layernorm, the MLP's own input, the attention output solved back through o_proj), not
from hooks on the projections themselves. The GGUF layout is pinned to what llama.cpp
tools/imatrix/imatrix.cpp save_imatrix writes; legacy .dat files are built here byte by byte
after save_imatrix_legacy. None of this needs a llama.cpp build.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import pytest

from gemport.errors import InputError, OutputError, UnsupportedError
from quantizers import imatrix as imx
from quantizers.imatrix import Imatrix, compute_imatrix, load_imatrix, save_imatrix
from validation.corpus import default_text, split_text, tokenize, windows

N_CTX, N_CHUNKS = 32, 2
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _paragraph(text: str) -> str:
    """``text`` without paragraph breaks, same length ("\\n\\n" -> "\\n ")."""
    return text.replace("\n\n", "\n ")


def _corpus(path: Path, evaluation: str, calibration: str) -> Path:
    # The evaluation part is one paragraph longer than 40 % of the text, so split_text cuts
    # exactly at the "\n\n" between the two parts.
    path.write_text(evaluation + "\n\n" + calibration, encoding="utf-8")
    assert split_text(path.read_text(encoding="utf-8")) == (evaluation, calibration)
    return path


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    """Corpus 'a'; 'b' differs from it only in the evaluation part, 'c' only in the calibration part."""
    text, root = default_text(), tmp_path_factory.mktemp("corpus")
    eval_a, eval_b = _paragraph(text[:3000]), _paragraph(text[3000:6000])
    calib, calib_c = _paragraph(text[10000:12000]).strip(), _paragraph(text[20000:22000]).strip()
    return {
        "a": _corpus(root / "a.txt", eval_a, calib),
        "b": _corpus(root / "b.txt", eval_b, calib),
        "c": _corpus(root / "c.txt", eval_a, calib_c),
    }


@pytest.fixture(scope="module")
def computed(tiny_models, corpora) -> Callable[[str], Imatrix]:
    cache: dict[str, Imatrix] = {}

    def get(variant: str) -> Imatrix:
        if variant not in cache:
            cache[variant] = compute_imatrix(tiny_models[variant], corpora["a"], n_ctx=N_CTX, n_chunks=N_CHUNKS)
        return cache[variant]

    return get


def _config(model_dir: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


# ---------------------------------------------------------------------------------------------
# compute


@pytest.mark.parametrize("variant", ["gemma-mha", "gemma-mqa", "gemma2", "gemma3"])
def test_every_linear_of_every_layer(tiny_models, corpora, computed, variant):
    im, cfg = computed(variant), _config(tiny_models[variant])
    in_dims = {
        "attn_q": cfg.hidden_size,
        "attn_k": cfg.hidden_size,
        "attn_v": cfg.hidden_size,
        "attn_output": cfg.num_attention_heads * cfg.head_dim,
        "ffn_gate": cfg.hidden_size,
        "ffn_up": cfg.hidden_size,
        "ffn_down": cfg.intermediate_size,
    }
    expected = {f"blk.{i}.{t}.weight": in_dims[t] for i in range(cfg.num_hidden_layers) for t in LINEARS}
    assert {name: len(s) for name, s in im.sums.items()} == expected
    assert all(s.dtype == np.float32 and (s > 0).all() for s in im.sums.values())
    assert set(im.counts.values()) == {N_CHUNKS * N_CTX}
    assert (im.chunks, im.chunk_size) == (N_CHUNKS, N_CTX)
    assert im.datasets == [f"{corpora['a']} (calibration split)"]


def _reference_sums(model_dir: Path, chunks: list[list[int]]) -> dict[str, np.ndarray]:
    """Sums of x^2 per projection input, each input derived without hooking that projection."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    layers = model.model.layers
    mlp_in: dict[int, torch.Tensor] = {}
    attn_out: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.register_forward_pre_hook(lambda m, a, i=i: mlp_in.__setitem__(i, a[0])))
        handles.append(layer.self_attn.register_forward_hook(lambda m, a, out, i=i: attn_out.__setitem__(i, out[0])))
    sums: dict[str, torch.Tensor] = {}

    def add(name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        sums[name] = sums.get(name, 0) + (x * x).sum(0)

    with torch.no_grad():
        for chunk in chunks:
            out = model(input_ids=torch.tensor([chunk]), output_hidden_states=True, use_cache=False)
            for i, layer in enumerate(layers):
                x_attn = layer.input_layernorm(out.hidden_states[i])  # hidden_states[i]: the input of layer i
                for t in ("attn_q", "attn_k", "attn_v"):
                    add(f"blk.{i}.{t}.weight", x_attn)
                w_o = layer.self_attn.o_proj.weight.double()  # square here: heads * head_dim == hidden
                add(f"blk.{i}.attn_output.weight", torch.linalg.solve(w_o, attn_out[i][0].double().T).T)
                x = mlp_in[i]
                add(f"blk.{i}.ffn_gate.weight", x)
                add(f"blk.{i}.ffn_up.weight", x)
                add(f"blk.{i}.ffn_down.weight", layer.mlp.act_fn(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x))
    for h in handles:
        h.remove()
    return {name: s.numpy() for name, s in sums.items()}


def _calibration_windows(model_dir: Path, corpus: Path, n_chunks: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    calibration = split_text(corpus.read_text(encoding="utf-8"))[1]
    return windows(tokenize(tok, calibration), N_CTX, n_chunks, tok.bos_token_id)


@pytest.mark.parametrize("variant", ["gemma-mha", "gemma-mqa", "gemma2", "gemma3"])
def test_values_equal_a_direct_computation(tiny_models, corpora, computed, variant):
    chunks = _calibration_windows(tiny_models[variant], corpora["a"], N_CHUNKS)
    assert all(c[0] == 2 for c in chunks)  # each window starts with BOS
    ref, im = _reference_sums(tiny_models[variant], chunks), computed(variant)
    assert set(ref) == set(im.sums)
    for name, want in ref.items():
        # Same fp32 ops as the hooks see, summed in fp64 on both sides; o_proj's input goes
        # through a linear solve, hence its looser bound.
        rtol = 1e-3 if ".attn_output." in name else 1e-5
        np.testing.assert_allclose(im.sums[name], want, rtol=rtol, err_msg=name)


def test_only_the_calibration_split_is_read(tiny_models, corpora, computed):
    model = tiny_models["gemma3"]
    a = computed("gemma3")
    b = compute_imatrix(model, corpora["b"], n_ctx=N_CTX, n_chunks=N_CHUNKS)  # other evaluation text
    c = compute_imatrix(model, corpora["c"], n_ctx=N_CTX, n_chunks=N_CHUNKS)  # other calibration text
    assert all(np.array_equal(a.sums[n], b.sums[n]) for n in a.sums)
    assert not any(np.allclose(a.sums[n], c.sums[n]) for n in a.sums)


def test_all_windows_by_default(tiny_models, corpora):
    model = tiny_models["gemma-mha"]
    n_windows = len(_calibration_windows(model, corpora["a"], 10**9))
    steps: list[int] = []

    @contextmanager
    def fake_progress(description: str, total: int | None, unit: str = "") -> Iterator[Callable[[int], None]]:
        steps.append(total or 0)
        yield steps.append

    im = compute_imatrix(model, corpora["a"], n_ctx=N_CTX, progress=fake_progress)
    # n_windows counts the calibration split's tokens only; the whole corpus holds over twice as many.
    assert im.chunks == n_windows > N_CHUNKS
    assert set(im.counts.values()) == {n_windows * N_CTX}
    assert steps == [n_windows] + [1] * n_windows


def test_output_entry_only_for_an_untied_head(tiny_models, corpora, computed):
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = tiny_models["gemma-mqa"]  # untied: lm_head is its own matrix, GGUF output.weight
    im = compute_imatrix(model_dir, corpora["a"], n_ctx=N_CTX, n_chunks=N_CHUNKS, process_output=True)
    assert set(im.sums) == set(computed("gemma-mqa").sums) | {"output.weight"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    normed = []
    model.model.norm.register_forward_hook(lambda m, a, out: normed.append(out))
    with torch.no_grad():
        for chunk in _calibration_windows(model_dir, corpora["a"], N_CHUNKS):
            model(input_ids=torch.tensor([chunk]), use_cache=False)
    want = sum((x[0].double() ** 2).sum(0) for x in normed).numpy()
    np.testing.assert_allclose(im.sums["output.weight"], want, rtol=1e-5)
    assert im.counts["output.weight"] == N_CHUNKS * N_CTX

    # Tied: the output matmul multiplies by token_embd.weight, which llama-imatrix never records.
    tied = compute_imatrix(tiny_models["gemma3"], corpora["a"], n_ctx=N_CTX, n_chunks=N_CHUNKS, process_output=True)
    assert set(tied.sums) == set(computed("gemma3").sums)


@pytest.mark.parametrize(("n_ctx", "n_chunks"), [(15, None), (32, 0)])
def test_bad_options(tiny_models, n_ctx, n_chunks):
    with pytest.raises(UnsupportedError):
        compute_imatrix(tiny_models["gemma3"], n_ctx=n_ctx, n_chunks=n_chunks)


# ---------------------------------------------------------------------------------------------
# file format


def _small() -> Imatrix:
    rng = np.random.default_rng(0)
    sums = {
        f"blk.{i}.{t}.weight": rng.random(n).astype(np.float32) * 100
        for i in (0, 1, 10)
        for t, n in [("attn_q", 64), ("ffn_down", 128)]
    }
    return Imatrix(sums=sums, counts=dict.fromkeys(sums, 1536), chunks=3, chunk_size=512, datasets=["calib.txt"])


def _assert_same(a: Imatrix, b: Imatrix) -> None:
    assert sorted(a.sums) == sorted(b.sums)
    assert all(np.array_equal(a.sums[n], b.sums[n]) for n in a.sums)
    assert (a.counts, a.chunks, a.chunk_size, a.datasets) == (b.counts, b.chunks, b.chunk_size, b.datasets)


def test_round_trip(computed, tmp_path):
    im = computed("gemma3")
    _assert_same(load_imatrix(save_imatrix(im, tmp_path / "m.imatrix.gguf")), im)


def test_gguf_layout_is_llama_imatrix_s(tmp_path):
    """ref: llama.cpp tools/imatrix/imatrix.cpp save_imatrix."""
    im = _small()
    reader = gguf.GGUFReader(save_imatrix(im, tmp_path / "m.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields == {
        "general.type": "imatrix",
        "imatrix.datasets": ["calib.txt"],
        "imatrix.chunk_count": 3,
        "imatrix.chunk_size": 512,
    }  # and no general.architecture
    assert reader.fields["imatrix.chunk_count"].types == [gguf.GGUFValueType.UINT32]
    assert reader.fields["imatrix.chunk_size"].types == [gguf.GGUFValueType.UINT32]
    names = sorted(im.sums)
    assert [t.name for t in reader.tensors] == [n + s for n in names for s in (".in_sum2", ".counts")]
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        name, kind = t.name.rsplit(".", 1)
        if kind == "in_sum2":
            assert t.shape.tolist() == [len(im.sums[name])]  # ggml_n_dims: ne [n, 1] is stored 1-D
            assert np.array_equal(t.data, im.sums[name])
        else:
            assert t.shape.tolist() == [1] and t.data.tolist() == [1536.0]


def test_mean_squares_follow_llama_quantize():
    """ref: tools/quantize/quantize.cpp load_imatrix: sums / count in float, ones for a zero count."""
    sums = np.array([3.0, 1.0, 0.5], dtype=np.float32)
    im = Imatrix(sums={"a": sums, "b": sums}, counts={"a": 3, "b": 0})
    ms = im.mean_squares()
    assert ms["a"].dtype == np.float32 and np.array_equal(ms["a"], sums / np.float32(3))
    assert ms["b"].tolist() == [1.0, 1.0, 1.0]


def test_empty_dataset_list_round_trips(tmp_path):
    im = _small()
    im.datasets = []
    path = save_imatrix(im, tmp_path / "m.gguf")
    assert gguf.GGUFReader(path).fields["imatrix.datasets"].contents() == []
    _assert_same(load_imatrix(path), im)


def _legacy_bytes(entries: dict[str, tuple[int, np.ndarray]], trailer: tuple[int, str] | None) -> bytes:
    """ref: imatrix.cpp save_imatrix_legacy: int32 n; (int32 len, name, int32 ncall, int32 nval, f32[nval])*;
    then int32 chunk count, int32 len, dataset name."""
    out = struct.pack("<i", len(entries))
    for name, (ncall, values) in entries.items():
        raw = name.encode()
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, len(values))
        out += values.astype("<f4").tobytes()
    if trailer is not None:
        raw = trailer[1].encode()
        out += struct.pack("<ii", trailer[0], len(raw)) + raw
    return out


@pytest.mark.parametrize("trailer", [(7, "wiki.train.raw"), None], ids=["trailer", "no-trailer"])
def test_reads_legacy_dat(tmp_path, trailer):
    means = np.array([0.25, 2.0, 8.0], dtype=np.float32)
    ncall = 7
    path = tmp_path / "imatrix.dat"
    path.write_bytes(_legacy_bytes({"blk.0.attn_q.weight": (ncall, means * ncall)}, trailer))
    im = load_imatrix(path)
    np.testing.assert_allclose(im.mean_squares()["blk.0.attn_q.weight"], means, rtol=1e-7)
    assert im.chunk_size == 0  # ref: common_imatrix_load_legacy
    assert (im.chunks, im.datasets) == ((7, ["wiki.train.raw"]) if trailer else (0, []))


def test_save_refuses_to_overwrite_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    dst = tmp_path / "m.gguf"
    dst.write_bytes(b"keep")
    with pytest.raises(OutputError):
        save_imatrix(_small(), dst)
    assert dst.read_bytes() == b"keep"

    def fail(self, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(imx.ImatrixWriter, "write_tensors_to_file", fail)
    with pytest.raises(RuntimeError):
        save_imatrix(_small(), dst, overwrite=True)
    assert dst.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def _gguf_file(path: Path, arch: str | None, kv: dict[str, str], tensors: dict[str, np.ndarray]) -> Path:
    w = gguf.GGUFWriter(path, arch) if arch else imx.ImatrixWriter(path, arch="")
    for key, value in kv.items():
        w.add_string(key, value)
    for name, data in tensors.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


BAD_FILES: dict[str, tuple[Callable[[Path], object], str]] = {
    "missing": (lambda p: None, "not found"),
    "empty": (lambda p: p.write_bytes(b""), "neither a GGUF imatrix nor a legacy imatrix.dat"),
    "text": (lambda p: p.write_text("hello, this is no imatrix\n" * 4), "neither a GGUF imatrix nor a legacy"),
    "truncated legacy": (
        lambda p: p.write_bytes(_legacy_bytes({"blk.0.attn_q.weight": (1, _f32(1, 2, 3))}, None)[:-5]),
        "legacy imatrix truncated",
    ),
    "truncated gguf": (
        lambda p: p.write_bytes(save_imatrix(_small(), p.with_suffix(".full")).read_bytes()[:300]),
        "truncated or corrupt GGUF file",
    ),
    "huge metadata array": (  # a count checked against the bytes left before anything is allocated
        lambda p: p.write_bytes(
            b"GGUF"
            + struct.pack("<IQQ", 3, 0, 1)
            + struct.pack("<Q", 21)
            + b"imatrix.datasets_list"
            + struct.pack("<IIQ", 9, 8, 1 << 40)
            + bytes(64)
        ),
        "claims 1099511627776 entries",
    ),
    "gguf model": (
        lambda p: _gguf_file(p, "gemma3", {}, {"token_embd.weight": np.zeros((4, 8), np.float32)}),
        "a GGUF model, not an imatrix",
    ),
    "other general.type": (
        lambda p: _gguf_file(p, None, {"general.type": "model"}, {"x.in_sum2": _f32(1), "x.counts": _f32(1)}),
        "general.type 'model'",
    ),
    "sums without counts": (
        lambda p: _gguf_file(p, None, {"general.type": "imatrix"}, {"blk.0.attn_q.weight.in_sum2": _f32(1, 2)}),
        "entry blk.0.attn_q.weight has no blk.0.attn_q.weight.counts",
    ),
    "f16 sums": (
        lambda p: _gguf_file(
            p, None, {"general.type": "imatrix"}, {"a.in_sum2": np.ones(4, np.float16), "a.counts": _f32(1)}
        ),
        "must be F32",
    ),
    "string chunk count": (
        lambda p: _gguf_file(p, None, {"imatrix.chunk_count": "many"}, {"a.in_sum2": _f32(1), "a.counts": _f32(1)}),
        "imatrix.chunk_count is 'many', not a count",
    ),
    "nan sums": (
        lambda p: _gguf_file(
            p, None, {"general.type": "imatrix"}, {"a.in_sum2": _f32(1, math.nan), "a.counts": _f32(2)}
        ),
        "entry a has non-finite values",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_a_one_line_input_error(tmp_path, case):
    make, message = BAD_FILES[case]
    path = tmp_path / "bad.imatrix"
    make(path)
    with pytest.raises(InputError) as info:
        load_imatrix(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text


def test_expert_entries_are_unsupported(tmp_path):
    path = _gguf_file(
        tmp_path / "moe.gguf",
        None,
        {"general.type": "imatrix"},
        {"a.in_sum2": _f32(1, 2, 3, 4), "a.counts": _f32(1, 1)},
    )
    with pytest.raises(UnsupportedError, match="2 matrices"):
        load_imatrix(path)
