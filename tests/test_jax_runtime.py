"""validation.runtimes.jax: JAX checkpoints scored by Google's gemma library against the transformers reference.

Every tiny model goes HF -> JAX (f32) through gemport, then ``validate`` runs it in the library's own
Transformer (a worker in build/gemma-venv, ``make gemma-venv``) and the HF original in transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from converters import hf
from converters import jax as cj
from gemport.cli import main
from tests.test_bad_input import assert_one_line_error
from tests.tiny import make_tiny

VARIANTS = ("gemma-mha", "gemma-mqa-tied", "gemma2", "gemma3")
N_CTX, WINDOWS = 64, 4  # 64-token windows: four times the tiny sliding window (16), so SWA matters
SCORED = WINDOWS * 31  # scored_span(64) = (32, 31)
# The acceptance gates (KLD, delta-ppl %). Measured on the four tiny models, 4 and 16 windows (gemma 3.3.0,
# jax 0.7.2, x86-64 AVX-512): KLD 4.9e-14 .. 1.1e-13, |delta-ppl| <= 7.4e-6 %, top-1 100 %: float32
# rounding. TIGHT_KLD also holds the tiny models to that level, with 1000x room for other CPUs' summation
# orders.
MAX_KLD, MAX_PPL_DELTA = 1e-4, 0.05
TIGHT_KLD = 1e-10


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """variant -> (HF reference, its f32 JAX conversion). The library ties the output head to the
    embedding, so the MQA model is made tied (converters/jax.py refuses an untied one)."""
    root = tmp_path_factory.mktemp("gemma-library")
    refs = dict(tiny_models)
    refs["gemma-mqa-tied"] = make_tiny("gemma-mqa", root / "gemma-mqa-tied-hf", tie_word_embeddings=True)
    return {v: (refs[v], cj.write(hf.read(refs[v]), root / f"{v}-jax", dtype="f32")) for v in VARIANTS}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The default corpus's first 50k characters: its evaluation split (the first 40 %) holds 20k
    characters, enough windows for these tests, within the default evaluation split (so apart from the
    tiny tokenizer's training text) and quick to tokenize."""
    from validation.corpus import default_text

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(default_text()[:50000], encoding="utf-8")
    return path


def _windows(reference: Path, count: int = 2) -> list[list[int]]:
    from transformers import AutoTokenizer

    from validation.corpus import default_text, split_text, tokenize, windows

    tokenizer = AutoTokenizer.from_pretrained(reference)
    return windows(tokenize(tokenizer, split_text(default_text())[0][:20000]), N_CTX, count, tokenizer.bos_token_id)


@pytest.mark.parametrize("variant", VARIANTS)
def test_f32_jax_in_the_gemma_library_matches_transformers(variant, checkpoints):
    from validation.validate import validate

    reference, jax_dir = checkpoints[variant]
    report = validate(jax_dir, reference, n_ctx=N_CTX, n_windows=WINDOWS, max_kld=MAX_KLD, max_ppl_delta=MAX_PPL_DELTA)
    m = report.metrics
    assert report.passed and m.tokens == SCORED and m.top1_pct >= 99.0, report.table()
    assert m.kld < TIGHT_KLD, report.table()
    assert (report.candidate_format, report.runtime_kind) == ("jax", "parity")
    # No preset of the library has a tiny model's sizes: the config is built from the spec.
    assert report.runtime.startswith("gemma library ") and "config from the spec" in report.runtime


def test_runtime_scores_windows_independently_and_token_0_as_a_token(checkpoints):
    """One worker, several windows: normalized rows, no state between windows, causal from position 0,
    and pad id 0 inside a window scored as transformers scores it (the library's default masks it)."""
    from validation.runtimes import PARITY, runtime_for
    from validation.runtimes.hf_transformers import TransformersRuntime
    from validation.runtimes.jax import GemmaLibraryRuntime

    reference, jax_dir = checkpoints["gemma3"]
    rt = runtime_for(jax_dir, "jax")
    try:
        assert isinstance(rt, GemmaLibraryRuntime) and (rt.kind, rt.vocab_size) == (PARITY, 512)
        a, b = _windows(reference)
        first = rt.logprobs(a)
        assert first.shape == (N_CTX, 512) and first.dtype == np.float32
        np.testing.assert_allclose(np.log(np.exp(first.astype(np.float64)).sum(axis=1)), 0.0, atol=1e-6)
        rt.logprobs(b)
        np.testing.assert_array_equal(rt.logprobs(a), first)
        np.testing.assert_allclose(rt.logprobs(a[:40]), first[:40], atol=1e-5)
        with_pad = a[:20] + [0] + a[21:]
        expected = TransformersRuntime(reference).logprobs(with_pad)
        got = rt.logprobs(with_pad)
        assert not np.allclose(got[25:], first[25:], atol=1e-3)  # the 0 changed what follows it ...
        np.testing.assert_allclose(got, expected, atol=1e-4)  # ... exactly as in transformers
    finally:
        rt.close()


def _with_spec(jax_dir: Path, dst: Path, **changes) -> Path:
    """A copy of a JAX checkpoint whose gemport.json states a different spec (the arrays unchanged)."""
    shutil.copytree(jax_dir, dst)
    manifest = json.loads((dst / cj.MANIFEST).read_text())
    manifest["spec"].update(changes)
    (dst / cj.MANIFEST).write_text(json.dumps(manifest))
    return dst


# A checkpoint whose spec misstates one feature fails the gate by orders of magnitude, so the parity above
# holds because the runtime configures the library from the spec, not because the feature is inert.
SEEN = {
    "gemma2 query_pre_attn_scalar 16 (is 24)": ("gemma2", {"query_pre_attn_scalar": 16}),
    "gemma3 no sliding window": ("gemma3", {"sliding_window": 4096}),
}


@pytest.mark.parametrize("case", list(SEEN))
def test_a_misstated_feature_fails_the_gate(case, checkpoints, corpus, tmp_path):
    from validation.validate import validate

    variant, changes = SEEN[case]
    reference, jax_dir = checkpoints[variant]
    candidate = _with_spec(jax_dir, tmp_path / "candidate", **changes)
    report = validate(candidate, reference, corpus, n_ctx=N_CTX, n_windows=2, max_kld=MAX_KLD)
    assert not report.passed and report.metrics.kld > MAX_KLD, report.table()


def _validate_cli(jax_dir: Path, reference: Path, corpus: Path) -> list[str]:
    return ["validate", str(jax_dir), "--reference", str(reference), "--corpus", str(corpus), "--ctx", str(N_CTX)]


def test_missing_gemma_venv_is_one_line_naming_the_make_target(checkpoints, corpus, tmp_path, monkeypatch, capsys):
    reference, jax_dir = checkpoints["gemma3"]
    monkeypatch.setenv("GEMPORT_GEMMA_PYTHON", str(tmp_path / "no-venv" / "bin" / "python"))
    code = main(_validate_cli(jax_dir, reference, corpus))
    assert_one_line_error(code, capsys.readouterr().err, "no-venv/bin/python does not exist", "make gemma-venv")


def test_spec_the_library_cannot_express_is_refused(checkpoints, corpus, tmp_path, capsys):
    reference, jax_dir = checkpoints["gemma3"]
    candidate = _with_spec(jax_dir, tmp_path / "eps", rms_eps=1e-5)
    code = main(_validate_cli(candidate, reference, corpus))
    assert_one_line_error(code, capsys.readouterr().err, str(candidate), "the gemma library fixes it at 1e-6")


def test_checkpoint_the_library_cannot_load_is_one_line(checkpoints, corpus, tmp_path, capsys):
    """gemport's reader reads only the tree's metadata; with the array chunks zeroed, load_params fails."""
    reference, jax_dir = checkpoints["gemma-mha"]
    broken = shutil.copytree(jax_dir, tmp_path / "broken")
    chunks = list((broken / "ocdbt.process_0" / "d").iterdir())
    assert chunks
    for chunk in chunks:
        chunk.write_bytes(bytes(chunk.stat().st_size))
    code = main(_validate_cli(broken, reference, corpus))
    assert_one_line_error(code, capsys.readouterr().err, str(broken), "the gemma library cannot load it: ")


# The acceptance gates on 2 windows of 512 (510 tokens). The default protocol's 16 windows on this model:
# KLD 1.7e-11, delta-ppl -2.5e-6 %, top-1 100 % (bench/RESULTS.md).
@pytest.mark.realmodel
def test_demo_model_in_the_gemma_library_matches_transformers(demo_model, tmp_path):
    from validation.validate import validate

    jax_dir = cj.write(hf.read(demo_model), tmp_path / "gemma-3-270m-jax", dtype="f32")
    report = validate(jax_dir, demo_model, n_ctx=512, n_windows=2, max_kld=MAX_KLD, max_ppl_delta=MAX_PPL_DELTA)
    assert report.passed and report.metrics.tokens == 2 * 255, report.table()
    assert report.runtime_kind == "parity" and "preset gm.nn.Gemma3_270M" in report.runtime, report.runtime
