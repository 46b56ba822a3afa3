from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from gemport import cli
from gemport.errors import CheckpointError, GateFailed, UnsupportedError
from validation.metrics import Accumulator, scored_span, token_scores
from validation.runtimes import runtime_for
from validation.validate import check_same_tokenizer, validate

LN2, LN3 = math.log(2), math.log(3)


# --- metrics, against numbers worked out by hand ---


def test_scored_span_follows_llama_perplexity():
    # first = n_ctx / 2; logits first .. n_ctx - 2 predict tokens first + 1 .. n_ctx - 1
    assert scored_span(512) == (256, 255)
    assert scored_span(64) == (32, 31)
    assert scored_span(65) == (32, 32)
    assert scored_span(3) == (1, 1)


def test_token_scores_by_hand():
    ref = np.log(np.array([[0.5, 0.5], [0.25, 0.75]]))
    cand = np.log(np.array([[0.25, 0.75], [0.25, 0.75]]))
    nll_r, nll_c, kld, same = token_scores(ref, cand, np.array([0, 1]))
    np.testing.assert_allclose(nll_r, [LN2, math.log(4 / 3)], rtol=1e-12)
    np.testing.assert_allclose(nll_c, [2 * LN2, math.log(4 / 3)], rtol=1e-12)
    # KL([.5, .5] || [.25, .75]) = .5 ln 2 + .5 ln(2/3); the second row is identical
    np.testing.assert_allclose(kld, [0.5 * LN2 + 0.5 * math.log(2 / 3), 0.0], atol=1e-15)
    assert same.tolist() == [False, True]  # argmax of [.5, .5] is the first


def test_token_scores_take_logits_and_ignore_zero_mass():
    logits = np.array([[1.0, 2.0, 3.0]])
    _, _, kld, _ = token_scores(logits, logits + 7.0, np.array([2]))  # a shift is the same distribution
    assert abs(kld[0]) < 1e-15
    ref = np.array([[0.0, -np.inf]])  # p = [1, 0]: the candidate's view of token 1 does not count
    _, _, kld, _ = token_scores(ref, np.log(np.array([[0.5, 0.5]])), np.array([0]))
    np.testing.assert_allclose(kld, [LN2], rtol=1e-12)


def test_kld_of_identical_distributions_is_exactly_zero():
    rng = np.random.default_rng(0)
    lp = rng.normal(size=(5, 300)).astype(np.float32) * 4
    lp -= np.log(np.exp(lp.astype(np.float64)).sum(1, keepdims=True)).astype(np.float32)
    acc = Accumulator()
    acc.add(lp, lp.copy(), rng.integers(0, 300, size=5))
    m = acc.result()
    assert (m.kld, m.kld_se, m.delta_ppl_pct, m.delta_ppl_pct_se, m.top1_pct) == (0.0, 0.0, 0.0, 0.0, 100.0)
    assert m.ppl_ref == m.ppl_cand


def test_accumulator_by_hand():
    # Two tokens, vocab 2, targets 0 then 1. Reference: p(target) = 1/2, 1/4; candidate: 1/4, 1/4.
    ref = np.log(np.array([[0.5, 0.5], [0.75, 0.25]]))
    cand = np.log(np.array([[0.25, 0.75], [0.75, 0.25]]))
    acc = Accumulator()
    acc.add(ref[:1], cand[:1], np.array([0]))  # streamed in two pieces
    acc.add(ref[1:], cand[1:], np.array([1]))
    m = acc.result()
    nll_r, nll_c = [LN2, 2 * LN2], [2 * LN2, 2 * LN2]
    assert m.tokens == 2
    assert m.ppl_ref == pytest.approx(math.exp(1.5 * LN2), rel=1e-12)  # 2^1.5
    assert m.ppl_cand == pytest.approx(4.0, rel=1e-12)
    assert m.delta_ppl_pct == pytest.approx(100 * (4 / 2**1.5 - 1), rel=1e-12)
    # se = sqrt((E[x^2] - E[x]^2) / (n - 1)): nll_r has E = 1.5 ln2, var = 0.25 ln2^2
    assert m.ppl_ref_se == pytest.approx(m.ppl_ref * 0.5 * LN2, rel=1e-12)
    assert m.ppl_cand_se == pytest.approx(0.0, abs=1e-12)
    diff = np.subtract(nll_c, nll_r)  # [ln2, 0]: mean ln2 / 2, se ln2 / 2
    assert m.delta_ppl_pct_se == pytest.approx(100 * math.exp(diff.mean()) * LN2 / 2, rel=1e-12)
    kld0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert m.kld == pytest.approx(kld0 / 2, rel=1e-12)
    assert m.kld_se == pytest.approx(kld0 / 2, rel=1e-12)
    assert m.top1_pct == 50.0  # argmax 0 vs 1, then 0 vs 0
    assert m.top1_pct_se == pytest.approx(50.0, rel=1e-12)  # sqrt(p (1 - p) / (n - 1))


def test_add_window_scores_only_the_second_half():
    n_ctx, vocab = 10, 7
    rng = np.random.default_rng(1)
    tokens = [2, *rng.integers(0, vocab, size=n_ctx - 1).tolist()]
    ref = np.log(rng.dirichlet(np.ones(vocab), size=n_ctx))
    cand = np.log(rng.dirichlet(np.ones(vocab), size=n_ctx))
    first, count = scored_span(n_ctx)
    ref[:first] = cand[:first] = np.nan  # the first half must not be read
    ref[-1] = cand[-1] = np.nan  # nor the last row, which predicts past the window
    acc = Accumulator()
    acc.add_window(tokens, ref, cand)
    m = acc.result()
    assert m.tokens == count == 4
    nll = -ref[np.arange(first, n_ctx - 1), tokens[first + 1 :]]
    assert m.ppl_ref == pytest.approx(math.exp(nll.mean()), rel=1e-12)


# --- end to end on a tiny Gemma 3 ---

N_CTX, WINDOWS = 64, 3


@pytest.fixture(scope="module")
def tiny(tiny_models) -> Path:
    return tiny_models["gemma3"]  # never written to: the perturbed copy goes elsewhere


@pytest.fixture(scope="module")
def perturbed(tiny, tmp_path_factory) -> Path:
    """The tiny model with noise on one MLP weight, saved by transformers with the same tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("validation") / "perturbed"
    shutil.copytree(tiny, out)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        w = model.model.layers[1].mlp.down_proj.weight
        w.add_(torch.randn_like(w) * 0.05)
    model.save_pretrained(out)
    return out


def test_validate_against_itself_is_exact(tiny):
    report = validate(tiny, tiny, n_ctx=N_CTX, n_windows=WINDOWS, max_ppl_delta=0.0, max_kld=0.0)
    m = report.metrics
    assert (m.kld, m.delta_ppl_pct, m.top1_pct) == (0.0, 0.0, 100.0)
    assert m.tokens == WINDOWS * scored_span(N_CTX)[1] == WINDOWS * 31
    assert report.passed and report.windows == WINDOWS and not report.warnings
    assert (report.candidate_format, report.runtime_kind) == ("hf", "parity")
    report.raise_if_failed()
    assert "result" in report.table() and "\x1b" not in report.table()
    assert json.loads(json.dumps(report.to_json()))["passed"] is True


def test_perturbed_copy_fails_a_tight_gate_with_exit_1(tiny, perturbed, tmp_path, capsys):
    out = tmp_path / "v.json"
    argv = [str(perturbed), "--reference", str(tiny), "--ctx", str(N_CTX), "--windows", str(WINDOWS)]
    assert cli.main(["validate", *argv, "--max-kld", "1e-6", "--json", str(out)]) == GateFailed.exit_code == 1
    assert "max-kld" in capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["passed"] is False and data["metrics"]["kld"] > 1e-6
    assert [g["name"] for g in data["gates"] if not g["passed"]] == ["max-kld"]
    assert data["metrics"]["tokens"] == WINDOWS * 31
    # a loose gate passes
    assert cli.main(["validate", *argv, "--max-kld", "10", "--max-ppl-delta", "1000"]) == 0


def test_fewer_windows_than_asked_is_a_warning(tiny, tmp_path):
    from transformers import AutoTokenizer

    text = " ".join(f"item {i} of the list." for i in range(40))
    corpus = tmp_path / "short.txt"
    corpus.write_text(text)
    n_tokens = len(AutoTokenizer.from_pretrained(tiny)(text[: int(len(text) * 0.4)])["input_ids"])
    report = validate(tiny, tiny, corpus=corpus, n_ctx=N_CTX, n_windows=10)
    assert 1 <= report.windows < 10 and report.windows <= n_tokens // N_CTX
    assert report.warnings and "fewer than the 10 asked" in report.table()
    assert report.to_json()["protocol"]["windows_requested"] == 10


def test_bad_inputs_are_typed_errors(tiny):
    with pytest.raises(UnsupportedError, match="runtimes exist for: hf, gguf"):
        runtime_for(tiny, "gemma-pytorch")
    with pytest.raises(UnsupportedError):
        validate(tiny, tiny, n_ctx=2)


class _Tok:
    bos_token_id = 2

    def __init__(self, shift: int = 0):
        self.shift = shift

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) + (self.shift if i == 3 else 0) for i, c in enumerate(text)]}


def test_tokenizer_mismatch_is_a_checkpoint_error(tmp_path):
    check_same_tokenizer(_Tok(), _Tok(), "hello", tmp_path)
    with pytest.raises(CheckpointError, match="token 4 is 109, reference has 108"):
        check_same_tokenizer(_Tok(), _Tok(shift=1), "hello", tmp_path)


# --- report text ---


def test_one_window_is_singular(tiny, perturbed):
    report = validate(perturbed, tiny, n_ctx=N_CTX, n_windows=1, max_kld=1e-9)
    protocol = next(line for line in report.table().splitlines() if line.startswith("protocol"))
    assert protocol.split(None, 1)[1].startswith(f"1 window x {N_CTX} tokens,")
    with pytest.raises(GateFailed, match=f"tokens in 1 window of {N_CTX}\\)"):
        report.raise_if_failed()


def test_kind_evidence_counts_types_as_inspect_does(tiny, tmp_path):
    """`validate` names an artifact's types with their counts as `inspect` and `convert` print them
    ("Q4_K 28, Q6_K 3"), every type, the lowest among them."""
    import re

    from gemport.describe import describe
    from validation.gates import artifact_kind

    out = tmp_path / "m.gguf"
    assert cli.main(["convert", str(tiny), str(out), "--to", "gguf", "--quant", "q4_k_m"]) == 0
    evidence = artifact_kind(out, "gguf").evidence
    assert re.fullmatch(r"GGUF types \S+ \d+(, \S+ \d+)*", evidence), evidence
    shown = dict(item.rsplit(" ", 1) for item in evidence.removeprefix("GGUF types ").split(", "))
    types = describe(out)["types"]
    quantized = {name: str(r["tensors"]) for name, r in types.items() if name.startswith("Q")}
    assert len(quantized) >= 2 and {k: v for k, v in shown.items() if k in quantized} == quantized
    assert " x " not in evidence


def test_a_candidate_with_the_reference_tokenizer_files_is_not_loaded_again(tiny_models, tmp_path, monkeypatch):
    import shutil

    import validation.validate as v

    reference = tiny_models["gemma3"]
    candidate = tmp_path / "candidate"
    shutil.copytree(reference, candidate)
    real, loaded = v.load_tokenizer, []
    monkeypatch.setattr(v, "load_tokenizer", lambda path, role: loaded.append(role) or real(path, role))
    report = v.validate(candidate, reference, n_ctx=32, n_windows=1, default_gates=False)
    assert loaded == ["reference"] and report.metrics.kld == 0.0
    config = candidate / "tokenizer_config.json"
    config.write_text(config.read_text(encoding="utf-8") + " ", encoding="utf-8")  # one byte more
    v.validate(candidate, reference, n_ctx=32, n_windows=1, default_gates=False)
    assert loaded == ["reference", "candidate", "reference"]
