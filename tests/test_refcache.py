"""The reference log-probability cache (validation/refcache.py): cached and live validation agree, a cache
is reused without loading the reference, and a cache for anything else, or damaged, is recomputed."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gemport.cli import main as gemport_main
from validation import refcache, streamed
from validation.corpus import load_text, split_text
from validation.metrics import Accumulator, RefStats, decoded_stats, reference_stats, scored_span
from validation.runtimes import hf_transformers
from validation.validate import validate

N_CTX, WINDOWS = 32, 2


# --- the window codec, on a large peaked vocabulary -------------------------------------------------


def _peaked_logprobs(rows: int, vocab: int, seed: int = 0, peak: float = 22) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((rows, vocab)) * 3
    logits[:, :20] += peak  # a few probable tokens, a long tail below 1e-6
    logits[1, 7] = -np.inf  # no mass at all
    x = logits - logits.max(axis=1, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=1, keepdims=True))).astype(np.float32)


def test_window_codec_keeps_probable_entries_and_stats_exact():
    rows, vocab = 12, 40000
    lp = _peaked_logprobs(rows, vocab)
    targets = np.arange(rows) * 3001 % vocab
    block = refcache._encode_window(lp, targets, [vocab, vocab - 100])
    arrays = refcache._decode_window(block, rows, vocab, 2)
    raw = refcache.decode_rows(arrays).numpy()
    exact = np.zeros(lp.shape, dtype=bool)
    exact[np.repeat(np.arange(rows), arrays["counts"]), arrays["index"]] = True
    p = np.exp(lp.astype(np.float64))
    assert (exact == (p >= refcache.EXACT_MIN_P)).all()  # exactly the probable ones (each row has < cap)
    assert (raw[exact] == lp[exact]).all()
    finite = np.isfinite(lp) & ~exact
    half_step = arrays["lo_scale"][1][:, None] / 2
    err = np.abs(raw[finite] - lp[finite])
    assert err.max() <= (half_step * (1 + 1e-3) + 4e-6).max()  # half a code step, plus float32 rounding
    assert np.isneginf(raw[1, 7])
    for c, cut in enumerate((vocab, vocab - 100)):
        want = reference_stats(lp[:, :cut], targets)
        got = arrays["stats"][c]
        assert (got[0] == want.nll).all() and (got[1] == want.negentropy).all() and (got[2] == want.log_norm).all()
        assert (arrays["top"][c] == want.top).all()
        exact64 = torch.from_numpy(lp[:, :cut].astype(np.float64))
        cross, log_norm = decoded_stats(torch.from_numpy(raw[:, :cut]), exact64, want.log_norm)  # the KL's term
        assert (got[3] == cross).all() and (got[4] == log_norm).all()
        assert np.allclose(cross, want.negentropy, rtol=1e-6, atol=0)  # sum_tail (p_decoded - p) lr


def test_exact_entries_are_capped_to_the_most_probable(monkeypatch):
    monkeypatch.setattr(refcache, "EXACT_CAP", 5)
    lp = _peaked_logprobs(3, 5000)
    arrays = refcache._decode_window(refcache._encode_window(lp, np.zeros(3, dtype=np.int64), [5000]), 3, 5000, 1)
    assert arrays["counts"].tolist() == [5, 5, 5]
    for r, index in enumerate(np.split(arrays["index"], 3)):
        assert sorted(index) == sorted(np.argsort(-lp[r])[:5])


def test_cached_distribution_changes_the_kld_by_far_less_than_printed():
    rows, vocab = 16, 40000
    ref = _peaked_logprobs(rows, vocab, seed=1)
    cand = (ref + np.random.default_rng(2).normal(0, 0.05, ref.shape)).astype(np.float32)
    targets = np.arange(rows)
    live, cached = Accumulator(), Accumulator()
    live.add(ref, cand, targets)
    arrays = refcache._decode_window(refcache._encode_window(ref, targets, [vocab]), rows, vocab, 1)
    nll, _, _, negentropy, log_norm = arrays["stats"][0]
    stats = RefStats(nll, negentropy, arrays["top"][0], log_norm)
    cached.add_stats(stats, lambda i, j: refcache.decode_rows(arrays, i, j), cand, targets)
    a, b = live.result(), cached.result()
    assert abs(a.kld - b.kld) <= 1e-6 * a.kld
    assert (a.ppl_ref, a.ppl_cand, a.top1_pct) == (b.ppl_ref, b.ppl_cand, b.top1_pct)


@pytest.mark.parametrize("noise", [0.0, 1e-6, 1e-4])
def test_a_candidate_equal_or_next_to_the_reference_scores_as_live(noise):
    # 16-bit codes round the tail by up to half a step (about 5e-4 nats): scored against the decoded
    # distribution alone, an identical candidate would score KL(decoded || reference), about 1e-11 on a
    # real vocabulary, which is the whole KLD of a float32 conversion. The cache pairs the decoded p with
    # the exact log-probs: 0 for the reference itself, and live's figure within 0.1 % next to it (noise of
    # 1e-6 nats: KLD 3.5e-13, off by 8e-4 of it; 1e-4 nats: 3.4e-9, off by 2e-5).
    rows, vocab = 16, 40000
    ref = _peaked_logprobs(rows, vocab, seed=1, peak=12)  # 0.3 % of the mass below 1e-6, as Gemma 3 270M's
    cand = (ref + np.random.default_rng(2).normal(0, noise, ref.shape)).astype(np.float32) if noise else ref.copy()
    targets = np.arange(rows)
    live, cached = Accumulator(), Accumulator()
    live.add(ref, cand, targets)
    arrays = refcache._decode_window(refcache._encode_window(ref, targets, [vocab]), rows, vocab, 1)
    tail = float((np.exp(ref.astype(np.float64)) * (np.exp(ref.astype(np.float64)) < refcache.EXACT_MIN_P)).sum())
    assert tail > 1e-3  # a tail whose codes matter
    nll, _, _, cross, log_norm = arrays["stats"][0]
    stats = RefStats(nll, cross, arrays["top"][0], log_norm)
    cached.add_stats(stats, lambda i, j: refcache.decode_rows(arrays, i, j), cand, targets)
    a, b = live.result(), cached.result()
    if noise == 0:
        assert a.kld == 0.0 and b.kld == 0.0
    else:
        assert 0 < a.kld and abs(a.kld - b.kld) <= 1e-3 * a.kld, (a.kld, b.kld)


# --- end to end on tiny models ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_models) -> Path:
    return tiny_models["gemma3"]


@pytest.fixture(scope="module")
def perturbed(tiny, tmp_path_factory) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("refcache") / "perturbed"
    shutil.copytree(tiny, out)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    torch.manual_seed(3)
    with torch.no_grad():
        w = model.model.layers[0].mlp.up_proj.weight
        w.add_(torch.randn_like(w) * 0.05)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("refcache-gguf") / "tiny.q8_0.gguf"
    assert gemport_main(["convert", str(tiny), str(out), "--to", "gguf", "--quant", "q8_0"]) == 0
    return out


def _same_printed(a, b) -> None:
    assert abs(a.kld - b.kld) <= 1e-6 * abs(a.kld), (a.kld, b.kld)
    for name, fmt in (("ppl_ref", ".4f"), ("ppl_cand", ".4f"), ("delta_ppl_pct", "+.4f"), ("top1_pct", ".2f")):
        assert format(getattr(a, name), fmt) == format(getattr(b, name), fmt), name
    assert a.tokens == b.tokens


class _NoReference(hf_transformers.TransformersRuntime):
    """Fails the test if the reference (fp32, the one the cache replaces) is loaded."""

    reference: Path

    def __init__(self, path, dtype="float32"):
        if Path(path) == self.reference:
            raise AssertionError("the reference model was loaded")
        super().__init__(path, dtype)


def _forbid_reference(monkeypatch, reference: Path) -> None:
    import validation.validate as v

    guard = type("Guard", (_NoReference,), {"reference": reference})
    monkeypatch.setattr(hf_transformers, "TransformersRuntime", guard)
    monkeypatch.setattr(v, "TransformersRuntime", guard)

    def no_windows(*args, **kwargs):
        raise AssertionError("the corpus was tokenized")

    def no_stream(*args, **kwargs):
        raise AssertionError("the reference was streamed")

    monkeypatch.setattr(streamed, "StreamedReference", no_stream)

    monkeypatch.setattr(refcache, "windows", no_windows)
    monkeypatch.setattr(v, "windows", no_windows)


@pytest.mark.parametrize("which", ["perturbed", "tiny_gguf"])
def test_cached_equals_live_and_is_reused(which, tiny, corpus, tmp_path, monkeypatch, request):
    candidate = request.getfixturevalue(which)
    live = validate(candidate, tiny, corpus, n_ctx=N_CTX, n_windows=WINDOWS, default_gates=False)
    first = validate(candidate, tiny, corpus, N_CTX, WINDOWS, default_gates=False, reference_cache=tmp_path)
    assert live.reference_cache is None and "reference log-probs" not in live.table()
    assert first.reference_cache_computed and Path(first.reference_cache).parent == tmp_path
    _same_printed(live.metrics, first.metrics)
    assert live.metrics.kld > 0 and live.reference_runtime == hf_transformers.TransformersRuntime.name
    assert first.reference_runtime == streamed.NAME  # the cache is computed layer by layer

    _forbid_reference(monkeypatch, tiny)
    again = validate(candidate, tiny, corpus, N_CTX, WINDOWS, default_gates=False, reference_cache=tmp_path)
    assert not again.reference_cache_computed and again.reference_cache == first.reference_cache
    assert again.metrics == first.metrics
    assert f"reference log-probs  cached in {again.reference_cache} (reused)" in again.table()
    assert json.loads(json.dumps(again.to_json()))["reference_cache"] == {
        "file": again.reference_cache,
        "state": "reused",
    }
    assert [p.name for p in tmp_path.iterdir()] == [Path(first.reference_cache).name]


def test_reference_against_its_own_cache_is_exact(tiny, corpus, tmp_path):
    report = validate(tiny, tiny, corpus, N_CTX, WINDOWS, max_kld=0.0, max_ppl_delta=0.0, reference_cache=tmp_path)
    assert report.passed and report.metrics.top1_pct == 100.0 and report.metrics.delta_ppl_pct == 0.0


def test_a_cache_inside_the_reference_folder_is_reused(tiny, perturbed, corpus, tmp_path):
    reference = tmp_path / "reference"
    shutil.copytree(tiny, reference)
    runs = [validate(perturbed, reference, corpus, N_CTX, 1, reference_cache=reference / "cache") for _ in range(2)]
    assert [r.reference_cache_computed for r in runs] == [True, False]
    (reference / "config.json").touch()  # the reference changed: not reused
    assert validate(
        perturbed, reference, corpus, N_CTX, 1, reference_cache=reference / "cache"
    ).reference_cache_computed


def test_another_corpus_ctx_or_windows_count_is_not_reused(tiny, perturbed, corpus, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text(encoding="utf-8")[:30000] + "\n\nAnother ending.", encoding="utf-8")
    cache = tmp_path / "cache"
    runs = [(corpus, N_CTX, WINDOWS), (other, N_CTX, WINDOWS), (corpus, 48, WINDOWS), (corpus, N_CTX, 1)]
    files = set()
    for text, n_ctx, n_windows in runs:
        report = validate(perturbed, tiny, text, n_ctx, n_windows, default_gates=False, reference_cache=cache)
        assert report.reference_cache_computed, (text, n_ctx, n_windows)
        assert report.metrics.tokens == report.windows * scored_span(n_ctx)[1]
        files.add(report.reference_cache)
    assert len(files) == len(runs) == len(list(cache.iterdir()))


def test_a_file_made_for_another_key_is_recomputed(tiny, perturbed, corpus, tmp_path, caplog):
    a = validate(perturbed, tiny, corpus, N_CTX, WINDOWS, default_gates=False, reference_cache=tmp_path / "a")
    b_dir = tmp_path / "b"
    b = validate(perturbed, tiny, corpus, N_CTX, 1, default_gates=False, reference_cache=b_dir)
    shutil.copyfile(a.reference_cache, b.reference_cache)  # the 2-window file under the 1-window name
    with caplog.at_level(logging.WARNING):
        again = validate(perturbed, tiny, corpus, N_CTX, 1, default_gates=False, reference_cache=b_dir)
    assert again.reference_cache_computed and again.metrics == b.metrics
    assert "made for another n_windows" in caplog.text


@pytest.mark.parametrize("damage", ["truncate", "body-byte", "header-byte", "garbage"])
def test_a_damaged_file_is_detected_and_recomputed(damage, tiny, perturbed, corpus, tmp_path, caplog):
    first = validate(perturbed, tiny, corpus, N_CTX, WINDOWS, default_gates=False, reference_cache=tmp_path)
    path = Path(first.reference_cache)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "body-byte":
        data[-5] ^= 0x01
    elif damage == "header-byte":
        at = data.index(b'"windows":[[') + 12  # a token id: still valid JSON, caught by the header crc
        data[at] = ord("9") if data[at] != ord("9") else ord("8")
    else:
        data = bytearray(b"not a cache\n" * 10)
    path.write_bytes(bytes(data))
    why = {"truncate": "truncated", "body-byte": "crc32 mismatch", "header-byte": "header crc32", "garbage": "magic"}
    with caplog.at_level(logging.WARNING):
        again = validate(perturbed, tiny, corpus, N_CTX, WINDOWS, default_gates=False, reference_cache=tmp_path)
    assert again.reference_cache_computed and again.metrics == first.metrics
    assert "reference cache not used" in caplog.text and why[damage] in caplog.text
    evaluation = split_text(load_text(corpus))[0]
    refcache.open_cache(path, refcache.cache_key(tiny, evaluation, N_CTX, WINDOWS))  # whole again
    assert len(list(tmp_path.iterdir())) == 1


def test_no_partial_file_when_the_computation_fails(tiny, corpus, tmp_path, monkeypatch):
    calls = []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 2:  # the second window's LM head: the first window is written by then
            raise RuntimeError("forward pass failed")
        return original(self, *args)

    original = streamed.StreamedReference._head
    monkeypatch.setattr(streamed.StreamedReference, "_head", failing)
    with pytest.raises(RuntimeError, match="forward pass failed"):
        refcache.ensure_cache(tiny, corpus, N_CTX, WINDOWS, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_nan_reference_is_refused_and_nothing_written(tiny, corpus, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(streamed.StreamedReference, "_head", lambda self, h, *args: torch.full((len(h), 512), np.nan))
    from gemport.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not finite"):
        refcache.ensure_cache(tiny, corpus, N_CTX, WINDOWS, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_module_entry(tiny, corpus, tmp_path, capsys):
    args = ["--reference", str(tiny), "--cache", str(tmp_path), "--corpus", str(corpus), "--ctx", "32"]
    assert refcache.main([*args, "--windows", "1"]) == 0
    assert capsys.readouterr().out.strip().endswith("(computed now)")
    assert refcache.main([*args, "--windows", "1"]) == 0
    assert capsys.readouterr().out.strip().endswith("(reused)")
    assert refcache.main(["--reference", str(tmp_path / "none"), "--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gemport: error: ") and err.count("\n") == 1
    assert refcache.main([*args, "--windows", "0"]) == 2
    assert "windows must be at least 1" in capsys.readouterr().err


# --- the real Gemma 3 270M ----------------------------------------------------------------------------


@pytest.mark.realmodel
def test_demo_q8_0_gguf_cached_equals_live(offgrid_model, tmp_path, monkeypatch):
    gguf = tmp_path / "offgrid.q8_0.gguf"
    assert gemport_main(["convert", str(offgrid_model), str(gguf), "--to", "gguf", "--quant", "q8_0"]) == 0
    live = validate(gguf, offgrid_model, n_ctx=512, n_windows=2, default_gates=False)
    cached = validate(gguf, offgrid_model, None, 512, 2, default_gates=False, reference_cache=tmp_path / "c")
    _same_printed(live.metrics, cached.metrics)
    assert math.isfinite(live.metrics.kld) and live.metrics.kld > 0
    _forbid_reference(monkeypatch, offgrid_model)
    again = validate(gguf, offgrid_model, None, 512, 2, default_gates=False, reference_cache=tmp_path / "c")
    assert not again.reference_cache_computed and again.metrics == cached.metrics


def test_a_header_with_a_valid_crc_but_bad_fields_is_recomputed(tiny, perturbed, corpus, tmp_path, caplog):
    import struct
    import zlib

    first = validate(perturbed, tiny, corpus, N_CTX, 1, default_gates=False, reference_cache=tmp_path)
    path = Path(first.reference_cache)
    data = bytearray(path.read_bytes())
    header_len = struct.unpack_from("<Q", data, 8)[0]
    header = bytes(data[20 : 20 + header_len])
    name = json.dumps(first.reference_runtime).encode()
    forged = header.replace(b'"reference_runtime":' + name, b'"reference_runtime":' + b"1" * len(name))
    assert forged != header and len(forged) == len(header)
    table = bytes(data[20 + header_len : 20 + header_len + 20])
    data[20 : 20 + header_len] = forged
    struct.pack_into("<I", data, 16, zlib.crc32(table, zlib.crc32(forged)))  # a writer's own crc: only fields catch it
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        again = validate(perturbed, tiny, corpus, N_CTX, 1, default_gates=False, reference_cache=tmp_path)
    assert again.reference_cache_computed and "no reference runtime name" in caplog.text
    assert again.reference_runtime == first.reference_runtime


def test_a_row_range_decodes_as_the_same_rows_of_the_whole_window():
    import torch

    lp = _peaked_logprobs(9, 3000, seed=3)
    arrays = refcache._decode_window(refcache._encode_window(lp, np.zeros(9, dtype=np.int64), [3000]), 9, 3000, 1)
    whole = refcache.decode_rows(arrays)
    assert whole.dtype == torch.float64 and whole.shape == (9, 3000)
    for start, stop in ((0, 4), (4, 9), (3, 3), (8, 9)):
        assert torch.equal(refcache.decode_rows(arrays, start, stop), whole[start:stop])


def test_cli_caches_by_default_and_says_so(tiny, perturbed, corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GEMPORT_CACHE_DIR", str(tmp_path / "home-cache"))
    args = ["validate", str(perturbed), "--reference", str(tiny), "--corpus", str(corpus), "--ctx", str(N_CTX)]
    args += ["--windows", str(WINDOWS), "--no-default-gates"]
    assert gemport_main(args) == 0
    first = capsys.readouterr().out
    files = list((tmp_path / "home-cache" / "reference").iterdir())
    assert len(files) == 1 and f"cached in {files[0]} (computed now)" in first
    assert gemport_main(args) == 0
    assert f"cached in {files[0]} (reused)" in capsys.readouterr().out
    assert gemport_main([*args, "--no-reference-cache"]) == 0
    live = capsys.readouterr().out
    assert "reference log-probs" not in live and "transformers (fp32, CPU)" in live
    assert list((tmp_path / "home-cache" / "reference").iterdir()) == files
    for label in ("KLD", "delta-ppl", "ppl candidate"):  # the printed figures, cached or not
        assert _printed(live, label) == _printed(first, label)


def _printed(table: str, label: str) -> str:
    return next(x for x in table.splitlines() if x.startswith(label + " "))[len(label) :].strip()


def test_cli_refuses_a_cache_folder_and_no_cache_together(tiny, tmp_path):
    with pytest.raises(SystemExit) as exc:
        gemport_main(
            [
                "validate",
                str(tiny),
                "--reference",
                str(tiny),
                "--reference-cache",
                str(tmp_path),
                "--no-reference-cache",
            ]
        )
    assert exc.value.code == 2


def test_a_cache_folder_under_a_file_is_one_error_naming_that_file(tiny, perturbed, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("GEMPORT_CACHE_DIR", str(blocker))
    assert gemport_main(["validate", str(perturbed), "--reference", str(tiny), "--windows", "1", "--ctx", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"gemport: error: {blocker}: is not a folder"), err
    assert blocker.read_text() == "x"
