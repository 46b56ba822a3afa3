"""Perplexity, delta-ppl, KL divergence and top-1 agreement, llama-perplexity style, streamed window by window.

Protocol (ref: llama.cpp tools/perplexity/perplexity.cpp, perplexity() and kl_divergence()):
``first = n_ctx / 2``; the logits of positions first .. n_ctx - 2 are scored against tokens
first + 1 .. n_ctx - 1, so each window scores ``n_ctx - 1 - n_ctx // 2`` tokens.
Standard errors follow its ``mean_and_uncertainty``: sqrt((E[x^2] - E[x]^2) / (n - 1)).

Differences from llama.cpp, both towards exactness: the KL sum runs over the full vocabulary
(llama.cpp skips base log-probs below -16), and the reference's NLL, negentropy and argmax are exact
float64 statistics (``RefStats``), live or from validation/refcache.py; KL(ref || cand) is scored as
``negentropy - sum_v p_v * lc_v``, so a cached reference distribution (16-bit codes for its tail, where
llama.cpp stores all of it in 16 bits) enters only that cross term.

Inputs are log-probabilities (any float dtype); they are renormalized here in float64, so raw
logits work too, and identical inputs give a KL divergence of exactly 0.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

ROWS_PER_CHUNK_ELEMENTS = 1 << 24  # float64 work arrays of at most 128 MiB each


def scored_span(n_ctx: int) -> tuple[int, int]:
    """(first scored position, tokens scored) of one window of ``n_ctx`` tokens."""
    first = n_ctx // 2
    return first, n_ctx - 1 - first


@dataclass(frozen=True)
class Metrics:
    tokens: int
    ppl_ref: float
    ppl_ref_se: float
    ppl_cand: float
    ppl_cand_se: float
    delta_ppl_pct: float  # 100 * (ppl_cand / ppl_ref - 1)
    delta_ppl_pct_se: float
    kld: float  # mean KL(reference || candidate), nats
    kld_se: float
    top1_pct: float  # % of scored positions where both argmaxes agree
    top1_pct_se: float

    def to_json(self) -> dict:
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in asdict(self).items()}


class _Sums:
    """Streaming sum and sum of squares in float64."""

    def __init__(self) -> None:
        self.n, self.s, self.s2 = 0, 0.0, 0.0

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        self.n += x.size
        self.s += float(x.sum())
        self.s2 += float(np.square(x).sum())

    def mean(self) -> float:
        return self.s / self.n if self.n else math.nan

    def se(self) -> float:
        """Standard error of the mean; nan below 2 values."""
        if self.n < 2:
            return math.nan
        m = self.mean()
        return math.sqrt(max(self.s2 / self.n - m * m, 0.0) / (self.n - 1))


_scratch = threading.local()


def work_buffer(name: str, rows: int, cols: int) -> torch.Tensor:
    """A float64 [rows, cols] work tensor kept per thread under ``name`` and reused chunk after chunk
    (at most ROWS_PER_CHUNK_ELEMENTS values in the scoring): a fresh 128 MiB tensor per chunk costs
    more in page faults than the arithmetic done in it."""
    import torch

    buf = getattr(_scratch, name, None)
    if buf is None or buf.numel() < rows * cols:
        buf = torch.empty(rows * cols, dtype=torch.float64)
        setattr(_scratch, name, buf)
    return buf[: rows * cols].view(rows, cols)


def _f64(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    """float64 rows of a numpy array or a tensor, copied into the work buffer ``name``; a float64 tensor as it
    is, not copied (score_rows uses it up in place, the others only read it)."""
    import torch

    if isinstance(x, torch.Tensor) and x.dtype == torch.float64:
        return x
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return work_buffer(name, *t.shape).copy_(t)


def _exp_rows(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max, exp(x - max), its sum) per row of float64 rows, the exp in the work buffer ``name``."""
    import torch

    m = x.amax(dim=1, keepdim=True)
    e = torch.sub(x, m, out=work_buffer(name, *x.shape)).exp_()
    return m[:, 0], e, e.sum(dim=1)


def _log_norm(x: torch.Tensor) -> torch.Tensor:
    """[rows] float64 log-normaliser ``max + log(sum(exp(x - max)))`` of float64 rows (torch.logsumexp's
    formula, its exp computed in a reused buffer)."""
    m, _, s = _exp_rows(x, "exp")
    return m + s.log_()


def _cross(p: torch.Tensor, x: torch.Tensor, log_norm: torch.Tensor) -> np.ndarray:
    """Per row sum_v p_v * (x_v - log_norm) in float64, as dot(p, x) - log_norm * sum(p): one BLAS dot per
    row, no [rows, vocab] temporary. Where p has no mass the term is 0 (0 * log 0) whatever x says: a row
    the dot makes NaN (0 * -inf) is summed again with x masked there (a NaN of x where p > 0 stays)."""
    import torch

    dot = torch.bmm(p[:, None, :], x[:, :, None])[:, 0, 0]
    bad = torch.isnan(dot)
    if bad.any():
        dot[bad] = torch.bmm(p[bad][:, None, :], x[bad].masked_fill(p[bad] == 0, 0.0)[:, :, None])[:, 0, 0]
    return (dot - log_norm * p.sum(dim=1)).numpy()


def _at(x: torch.Tensor, targets: np.ndarray) -> torch.Tensor:
    """Per row ``x[row, targets[row]]``."""
    import torch

    index = torch.from_numpy(np.asarray(targets, dtype=np.int64))
    return x.gather(1, index[:, None])[:, 0]


@dataclass(frozen=True)
class RefStats:
    """What scoring needs of reference rows besides their distribution, exact in float64: computed from the
    float64 log-softmax ``lr = raw - log_norm`` of the raw rows, as ``token_scores`` always did."""

    nll: np.ndarray  # [rows] -lr[target]
    negentropy: np.ndarray  # [rows] sum_v p_v * lr_v (a cache's: p of its decoded rows; metrics.decoded_stats)
    top: np.ndarray  # [rows] argmax of the raw rows
    log_norm: np.ndarray  # [rows] the float64 log-normaliser of the raw rows

    def rows(self, start: int, stop: int) -> RefStats:
        return RefStats(*(a[start:stop] for a in (self.nll, self.negentropy, self.top, self.log_norm)))


def _stats_and_p(ref: np.ndarray | torch.Tensor, targets: np.ndarray) -> tuple[RefStats, torch.Tensor]:
    import torch

    x = _f64(ref, "ref")
    m, p, total = _exp_rows(x, "p")
    log_norm = m + torch.log(total)
    p.div_(total[:, None])  # exp(x - max) / sum = exp(x - log_norm): one exp per entry, not two
    nll = (log_norm - _at(x, targets)).numpy()
    # argmax: the first maximum (numpy's rule too); float64 keeps float32's order and ties
    return RefStats(nll, _cross(p, x, log_norm), x.argmax(dim=1).numpy(), log_norm.numpy()), p


def reference_stats(ref: np.ndarray | torch.Tensor, targets: np.ndarray) -> RefStats:
    """The exact statistics of [rows, vocab] reference log-probs (or logits) against ``targets`` [rows]."""
    return _stats_and_p(ref, targets)[0]


def _score(stats: RefStats, p: torch.Tensor, cand: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, ...]:
    """KL(ref || cand) = negentropy - sum_v p_v * lc_v: only the cross term reads the reference's distribution."""
    c = _f64(cand, "cand")
    log_norm = _log_norm(c)
    kld = stats.negentropy - _cross(p, c, log_norm)
    return stats.nll, (log_norm - _at(c, targets)).numpy(), kld, stats.top == c.argmax(dim=1).numpy()


def score_rows(
    stats: RefStats, ref: np.ndarray | torch.Tensor, cand: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, ...]:
    """Per row: (reference NLL, candidate NLL, KL(ref || cand), argmaxes equal), from the reference's exact
    ``stats`` and its raw rows ``ref`` [rows, vocab] (live, or decoded from a cache; a float64 tensor is
    used up in place), which give only p = exp(ref - log_norm) for the cross term."""
    import torch

    x = _f64(ref, "ref")
    p = x.sub_(torch.from_numpy(np.array(stats.log_norm, dtype=np.float64))[:, None]).exp_()
    return _score(stats, p, cand, targets)


def decoded_stats(decoded: torch.Tensor, exact: torch.Tensor, exact_log_norm: np.ndarray) -> tuple[np.ndarray, ...]:
    """(sum_v p_v * lr_v, log_norm) per row, with p the distribution of float64 rows ``decoded`` computed
    exactly as score_rows computes it from a stored log_norm, ``exp(decoded - log_norm)``, and lr the exact
    log-probs ``exact - exact_log_norm`` (float64 rows of the raw reference, and their log-normaliser). A
    cache stores these, so that the KL a candidate is scored with is sum_v p_v (lr_v - lc_v): 0 to the last
    bit for a candidate whose rows are the reference's, whatever the codes rounded (refcache docstring).
    Both tensors are only read."""
    import torch

    log_norm = _log_norm(decoded)
    p = torch.sub(decoded, log_norm[:, None], out=work_buffer("p", *decoded.shape)).exp_()
    lr_norm = torch.from_numpy(np.asarray(exact_log_norm, dtype=np.float64))
    return _cross(p, exact, lr_norm), log_norm.numpy()


def token_scores(ref: np.ndarray, cand: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per row: (reference NLL, candidate NLL, KL(ref || cand), argmaxes equal), for [rows, vocab] inputs."""
    stats, p = _stats_and_p(ref, targets)
    return _score(stats, p, cand, targets)


def _check_window(n_ctx: int, ref_shape: tuple[int, ...], cand_logprobs: np.ndarray) -> None:
    for name, shape in (("reference", ref_shape), ("candidate", cand_logprobs.shape)):
        if len(shape) != 2 or shape[0] != n_ctx:
            raise ValueError(f"{name} log-probs have shape {list(shape)}, expected [{n_ctx}, vocab]")
    if ref_shape[1] != cand_logprobs.shape[1]:
        raise ValueError(f"vocab sizes differ: reference {ref_shape[1]}, candidate {cand_logprobs.shape[1]}")


class Accumulator:
    """Feed windows in turn (``add_window``; or the scored rows with ``add``, or ``add_stats`` from cached
    reference statistics), then read ``result()``; holds only running sums."""

    def __init__(self) -> None:
        self.nll_ref, self.nll_cand, self.nll_diff, self.kld, self.top1 = (_Sums() for _ in range(5))

    def add_window(self, tokens: list[int], ref_logprobs: np.ndarray, cand_logprobs: np.ndarray) -> None:
        """Score one window: ``tokens`` [n_ctx] and both runtimes' [n_ctx, vocab] outputs."""
        n_ctx = len(tokens)
        _check_window(n_ctx, ref_logprobs.shape, cand_logprobs)
        first, count = scored_span(n_ctx)
        targets = np.asarray(tokens[first + 1 :], dtype=np.int64)
        self.add(ref_logprobs[first : first + count], cand_logprobs[first : first + count], targets)

    def add(self, ref: np.ndarray, cand: np.ndarray, targets: np.ndarray) -> None:
        """Score rows of [rows, vocab] log-probs against ``targets`` [rows], in memory-bounded chunks."""
        for i, j in _chunks(len(targets), ref.shape[1]):
            self._add(*token_scores(ref[i:j], cand[i:j], targets[i:j]))

    def add_stats(self, stats: RefStats, ref_rows, cand: np.ndarray, targets: np.ndarray) -> None:
        """As ``add``, with the reference's statistics given (``score_rows``) and its rows made a chunk at a
        time by ``ref_rows(start, stop)`` (a float64 tensor, e.g. decoded from a cache)."""
        for i, j in _chunks(len(targets), cand.shape[1]):
            self._add(*score_rows(stats.rows(i, j), ref_rows(i, j), cand[i:j], targets[i:j]))

    def _add(self, nll_r: np.ndarray, nll_c: np.ndarray, kld: np.ndarray, same: np.ndarray) -> None:
        self.nll_ref.add(nll_r)
        self.nll_cand.add(nll_c)
        self.nll_diff.add(nll_c - nll_r)
        self.kld.add(kld)
        self.top1.add(same)

    def result(self) -> Metrics:
        ppl_ref, ppl_cand = math.exp(self.nll_ref.mean()), math.exp(self.nll_cand.mean())
        # ppl_cand / ppl_ref = exp(mean(nll_cand - nll_ref)); its error from the paired differences,
        # which is llama.cpp's sqrt(se_q^2 + se_base^2 - 2 cov).
        ratio = math.exp(self.nll_diff.mean())
        return Metrics(
            tokens=self.kld.n,
            ppl_ref=ppl_ref,
            ppl_ref_se=ppl_ref * self.nll_ref.se(),
            ppl_cand=ppl_cand,
            ppl_cand_se=ppl_cand * self.nll_cand.se(),
            delta_ppl_pct=100.0 * (ratio - 1.0),
            delta_ppl_pct_se=100.0 * ratio * self.nll_diff.se(),
            kld=self.kld.mean(),
            kld_se=self.kld.se(),
            top1_pct=100.0 * self.top1.mean(),
            top1_pct_se=100.0 * self.top1.se(),
        )


def _chunks(rows: int, vocab: int):
    step = max(1, ROWS_PER_CHUNK_ELEMENTS // max(1, vocab))
    return ((i, min(i + step, rows)) for i in range(0, rows, step))


def scored_vocab(cand_vocab: int, ref_vocab: int, pieces: int) -> int | None:
    """The vocabulary both runtimes are scored over: the reference's when the candidate has it too;
    the candidate's when that is smaller but still holds every tokenizer piece (``pieces``), i.e. the
    candidate dropped padding rows past the tokenizer, as llama.cpp's converter does for Gemma 3
    (262208 rows, 262144 pieces; ref: convert_hf_to_gguf.py Gemma3Model.modify_tensors). The
    reference's log-probs are then renormalised over the kept rows (Accumulator renormalises every
    input), which changes them only by the mass the reference puts on the padding rows. None when
    the two cannot be compared."""
    if cand_vocab == ref_vocab:
        return ref_vocab
    if pieces <= cand_vocab < ref_vocab:
        return cand_vocab
    return None


def padding_note(ref_vocab: int, vocab: int) -> str:
    return (
        f"the candidate has {vocab} of the reference's {ref_vocab} vocabulary rows (padding past the tokenizer's "
        f"pieces dropped): reference log-probs renormalised over the {vocab} kept rows"
    )
