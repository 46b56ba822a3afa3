"""Score a candidate artifact against the reference HF checkpoint, window by window, in lockstep."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gemport import registry
from gemport.errors import CheckpointError, GemportError, InputError, UnsupportedError
from gemport.progress import progress, stage
from validation.corpus import load_text, split_text, tokenize, windows
from validation.gates import ArtifactKind, artifact_kind
from validation.metrics import Accumulator, padding_note, scored_span, scored_vocab
from validation.report import Report, make_gates
from validation.runtimes import check_supported, runtime_for
from validation.runtimes.hf_transformers import TransformersRuntime

log = logging.getLogger(__name__)

TOKENIZER_CHECK_CHARS = 2000


def load_tokenizer(path: Path, role: str):
    from transformers import AutoTokenizer

    from converters.hf import TOKENIZER_FILES

    if path.is_dir() and not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        # transformers would otherwise fall back to some tokenizer of its own (e.g. a byte-level one)
        names = ", ".join(n for n in TOKENIZER_FILES if n.startswith("tokenizer."))
        raise CheckpointError(f"the {role} folder has no tokenizer ({names})", path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot load the {role}'s tokenizer: {exc}", path) from None


def same_tokenizer_files(candidate: Path, reference: Path) -> bool:
    """True when both folders hold the same tokenizer files (converters.hf.TOKENIZER_FILES), at least
    tokenizer.json or tokenizer.model among them, with the same bytes."""
    from converters.hf import TOKENIZER_FILES

    def files(folder: Path) -> dict[str, Path]:
        return {n: folder / n for n in TOKENIZER_FILES if (folder / n).is_file()}

    cand, ref = files(candidate), files(reference)
    if cand.keys() != ref.keys() or not {"tokenizer.json", "tokenizer.model"} & cand.keys():
        return False
    for name, path in cand.items():
        if path.stat().st_size != ref[name].stat().st_size or path.read_bytes() != ref[name].read_bytes():
            return False
    return True


def check_same_tokenizer(reference, candidate, text: str, path: Path) -> None:
    """CheckpointError unless ``candidate`` tokenizes ``text`` (and BOS) exactly as ``reference`` does."""
    if candidate.bos_token_id != reference.bos_token_id:
        raise CheckpointError(f"BOS id {candidate.bos_token_id}, reference has {reference.bos_token_id}", path)
    check_same_ids(tokenize(reference, text), tokenize(candidate, text), path)


def check_same_ids(ref_ids: list[int], cand_ids: list[int], path: Path) -> None:
    """CheckpointError naming the first token where the candidate's ids differ from the reference's."""
    if ref_ids == cand_ids:
        return
    pairs = zip(ref_ids, cand_ids, strict=False)
    i = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(ref_ids), len(cand_ids)))
    got = cand_ids[i] if i < len(cand_ids) else "end"
    want = ref_ids[i] if i < len(ref_ids) else "end"
    raise CheckpointError(f"tokenizer differs from the reference's: token {i} is {got}, reference has {want}", path)


def _check_options(n_ctx: int, n_windows: int, bounds: dict[str, float | None]) -> None:
    for name, bound in bounds.items():
        if bound is not None and not bound >= 0:  # NaN fails this too: a gate it bounds could never pass
            raise UnsupportedError(f"{name} must be a number >= 0, got {bound}")
    if scored_span(n_ctx)[1] < 1:
        raise UnsupportedError(f"a window of {n_ctx} tokens scores nothing; use at least 3")
    if n_windows < 1:
        raise UnsupportedError(f"windows must be at least 1, got {n_windows}")


def validate(candidate: str | Path, reference: str | Path, *options, **named) -> Report:
    """Perplexity, delta-ppl %, KLD and top-1 of ``candidate`` (run by its format's runtime) vs ``reference``:
    ``validate_each`` of one candidate, with the same options (corpus, n_ctx, n_windows, max_ppl_delta,
    max_kld, default_gates, reference_cache, device), its error raised.

    Errors: GemportError (exit code 2) for a bad candidate, reference, cache or option."""
    ((_, result),) = validate_each([candidate], reference, *options, **named)
    if isinstance(result, GemportError):
        raise result
    return result


def validate_each(
    candidates: list[str | Path],
    reference: str | Path,
    corpus: str | Path | None = None,
    n_ctx: int = 512,
    n_windows: int = 16,
    max_ppl_delta: float | None = None,
    max_kld: float | None = None,
    default_gates: bool = True,
    reference_cache: str | Path | None = None,
    device: str = "cpu",
) -> Iterator[tuple[Path, Report | GemportError]]:
    """Perplexity, delta-ppl %, KLD and top-1 of each candidate (run by its format's runtime) vs ``reference``.

    Gates: NaN or infinite scores always fail; ``max_kld`` and ``max_ppl_delta`` when given; without
    ``max_kld``, the default KLD bound of the candidate's kind (validation/gates.py) unless
    ``default_gates`` is False.

    With ``reference_cache`` (a folder), the reference's log-probs come from its cache file
    (validation/refcache.py), computed first (and the reference freed) when missing or invalid: the
    candidates are then scored without loading the reference or tokenizing the corpus.

    ``device`` "cuda" scores the candidates with gemport's Triton kernels in every projection
    (validation/runtimes/triton_kernels.py); UnsupportedError before anything runs when its format has no
    kernel runtime or the kernels cannot run here.

    The reference's side is prepared once for all: with ``reference_cache`` the cache file made (or checked)
    and opened once; without it, the corpus tokenized and the fp32 reference model loaded once (it still
    runs once per candidate). Every candidate is read (format, kind, tokenizer) before the reference is
    prepared, so one whose files are unreadable costs no reference work; one that its runtime refuses is
    found when it is loaded, in its turn.

    Yields (candidate, its Report or the GemportError that stopped it), in the order given; one
    candidate's error does not stop the others. Raised at once instead: a bad option, or an error of the
    reference or its cache (every candidate would meet it)."""
    candidates, reference = [Path(c) for c in candidates], Path(reference)
    _check_options(n_ctx, n_windows, {"--max-kld": max_kld, "--max-ppl-delta": max_ppl_delta})
    if registry.detect(reference) != "hf":
        raise InputError("the reference must be a Hugging Face checkpoint folder", reference)
    read: list[_Candidate | GemportError] = []
    for candidate in candidates:
        try:
            read.append(_read_candidate(candidate, reference, device))
        except GemportError as exc:
            read.append(exc)
    ref = None
    if any(isinstance(c, _Candidate) for c in read):
        if reference_cache is not None:
            ref = _CachedReference(reference, corpus, n_ctx, n_windows, Path(reference_cache))
        else:
            ref = _LiveReference(reference, corpus, n_ctx, n_windows)
    gates = (max_ppl_delta, max_kld, default_gates)
    for candidate, cand in zip(candidates, read, strict=True):
        if isinstance(cand, GemportError):
            yield candidate, cand
            continue
        try:
            yield candidate, _validate_one(cand, ref, corpus, n_windows, device, gates)
        except GemportError as exc:
            yield candidate, exc


@dataclass
class _Candidate:
    """What is read of a candidate before the reference runs: its format, kind and (an HF folder with
    tokenizer files of its own) tokenizer."""

    path: Path
    fmt: str
    kind: ArtifactKind
    same_files: bool  # its tokenizer files are the reference's, byte for byte
    tokenizer: Any


def _read_candidate(candidate: Path, reference: Path, device: str) -> _Candidate:
    with stage(f"reading {candidate.name}"):
        fmt = registry.detect(candidate)
        check_supported(fmt, candidate, device)
        kind = artifact_kind(candidate, fmt)
        log.info("candidate kind %s: %s", kind.name, kind.evidence)
        # a candidate folder's tokenizer is loaded before the reference is run (or its cache computed),
        # unless its files are the reference's own: the same bytes tokenize the same way
        same_files = fmt == "hf" and same_tokenizer_files(candidate, reference)
        if same_files:
            log.info("the candidate's tokenizer files are the reference's, byte for byte: not loaded again")
        tokenizer = load_tokenizer(candidate, "candidate") if fmt == "hf" and not same_files else None
    return _Candidate(candidate, fmt, kind, same_files, tokenizer)


def _validate_one(cand: _Candidate, ref, corpus, n_windows: int, device: str, gates: tuple) -> Report:
    candidate, fmt = cand.path, cand.fmt
    sample = ref.evaluation[:TOKENIZER_CHECK_CHARS]
    if cand.tokenizer is not None:
        if cand.tokenizer.bos_token_id != ref.bos:
            raise CheckpointError(f"BOS id {cand.tokenizer.bos_token_id}, reference has {ref.bos}", candidate)
        check_same_ids(ref.sample_ids, tokenize(cand.tokenizer, sample), candidate)
    elif not cand.same_files:
        log.info("candidate is %s: token ids come from the reference tokenizer", fmt)
    chunks = ref.windows
    warnings = []
    if len(chunks) < n_windows:
        held = f"{len(chunks)} window{'s' if len(chunks) != 1 else ''}"
        warnings.append(f"the corpus holds {held} of {ref.n_ctx} tokens, fewer than the {n_windows} asked")
        log.warning("%s", warnings[-1])

    with stage(f"loading {candidate.name}"):
        cand_rt = runtime_for(candidate, fmt, device)
    try:
        for note in getattr(cand_rt, "notes", ()):  # where the candidate's runtime departs from the reference's
            warnings.append(note)
            log.warning("%s", note)
        if hasattr(cand_rt, "tokenize"):  # a runtime with its own tokenizer (llama.cpp) must agree with the reference
            check_same_ids(ref.sample_ids, cand_rt.tokenize(sample), candidate)
        ref.load()
        vocab = scored_vocab(cand_rt.vocab_size, ref.vocab_size, ref.pieces)
        if vocab is None:
            raise CheckpointError(f"vocab size {cand_rt.vocab_size}, reference has {ref.vocab_size}", candidate)
        if vocab < ref.vocab_size:
            warnings.append(padding_note(ref.vocab_size, vocab))
            log.warning("%s", warnings[-1])
        top = max(max(c) for c in chunks)
        if top >= vocab:
            raise CheckpointError(f"the tokenizer yields id {top}, beyond the vocab of {vocab}", ref.path)
        metrics = _score_windows(candidate, cand_rt, ref, vocab).result()
    finally:
        if hasattr(cand_rt, "close"):  # the next candidate's runtime does not wait for the garbage collector
            cand_rt.close()
    log.info("%d tokens scored: KLD %.6g, delta-ppl %+.4f %%", metrics.tokens, metrics.kld, metrics.delta_ppl_pct)
    max_ppl_delta, max_kld, default_gates = gates
    return Report(
        reference=str(ref.path),
        candidate=str(candidate),
        candidate_format=fmt,
        runtime=cand_rt.name,
        runtime_kind=cand_rt.kind,
        reference_runtime=ref.runtime_name,
        corpus=str(corpus) if corpus is not None else "pydoc topics (default)",
        n_ctx=ref.n_ctx,
        windows=len(chunks),
        windows_requested=n_windows,
        metrics=metrics,
        gates=make_gates(metrics, max_ppl_delta, max_kld, _default_kld(cand.kind) if default_gates else None),
        warnings=warnings,
        kind=cand.kind.name,
        kind_evidence=cand.kind.evidence,
        reference_cache=getattr(ref, "cache_file", None),
        reference_cache_computed=getattr(ref, "computed", False),
    )


def _score_windows(candidate: Path, cand_rt, ref, vocab: int) -> Accumulator:
    """Every window of ``ref`` scored; once more from the start if a cached reference finds a damaged
    window (it recomputes its file first: nothing from the damaged one is kept)."""
    from validation.refcache import InvalidCache

    try:
        return _score_once(candidate, cand_rt, ref, vocab)
    except InvalidCache as exc:  # only _CachedReference raises it
        ref.recompute(exc)
    try:
        return _score_once(candidate, cand_rt, ref, vocab)
    except InvalidCache as exc:
        raise InputError(f"reference cache damaged again after recomputing it: {exc}", ref.cache_file) from None


def _score_once(candidate: Path, cand_rt, ref, vocab: int) -> Accumulator:
    acc = Accumulator()
    with progress(f"validating {candidate.name}", total=len(ref.windows), unit="windows") as advance:
        for i, chunk in enumerate(ref.windows):
            ref.score(acc, i, chunk, scored_rows(cand_rt, chunk), vocab)
            advance()
    return acc


def scored_rows(runtime, tokens: list[int]) -> np.ndarray:
    """The candidate's [scored, vocab] rows of one window (positions first .. n - 2, which predict the
    scored tokens): log-probs or raw logits (the scoring renormalises both). A runtime with
    ``scored_logits`` computes only those rows, as llama-perplexity asks llama.cpp for the logits of
    the second half only (ref: tools/perplexity/perplexity.cpp, perplexity(): batch.logits set from
    ``first``); the others return every row and the scored ones are kept."""
    first, count = scored_span(len(tokens))
    if hasattr(runtime, "scored_logits"):
        rows = runtime.scored_logits(tokens, first, count)
    else:
        rows = runtime.logprobs(tokens)
        if rows.ndim != 2 or rows.shape[0] != len(tokens):
            raise ValueError(f"candidate log-probs have shape {list(rows.shape)}, expected [{len(tokens)}, vocab]")
        rows = rows[first : first + count]
    if rows.ndim != 2 or rows.shape[0] != count:
        raise ValueError(f"candidate rows have shape {list(rows.shape)}, expected [{count}, vocab]")
    return rows


class _LiveReference:
    """The reference run in lockstep with the candidate: tokenizes the evaluation text now, loads the model
    after the candidate (``load``)."""

    def __init__(self, reference: Path, corpus, n_ctx: int, n_windows: int):
        self.path, self.n_ctx, self.rt = reference, n_ctx, None
        with stage("reading the evaluation text"):
            self.evaluation = split_text(load_text(corpus))[0]
            tokenizer = load_tokenizer(reference, "reference")
            if tokenizer.bos_token_id is None:
                raise CheckpointError("the reference tokenizer has no BOS token", reference)
            self.bos, self.pieces = tokenizer.bos_token_id, tokenizer.vocab_size
            self.sample_ids = tokenize(tokenizer, self.evaluation[:TOKENIZER_CHECK_CHARS])
            self.windows = windows(tokenize(tokenizer, self.evaluation), n_ctx, n_windows, self.bos)

    def load(self) -> None:
        """The model, loaded once (after the first candidate's runtime: a bad candidate costs nothing)."""
        if self.rt is not None:
            return
        with stage(f"loading the reference {self.path.name}"):
            self.rt = TransformersRuntime(self.path)
        self.vocab_size, self.runtime_name = self.rt.vocab_size, self.rt.name

    def score(self, acc: Accumulator, i: int, chunk: list[int], cand: np.ndarray, vocab: int) -> None:
        first, count = scored_span(len(chunk))
        targets = np.asarray(chunk[first + 1 :], dtype=np.int64)
        acc.add(self.rt.scored_logits(chunk, first, count)[:, :vocab], cand, targets)


class _CachedReference:
    """The reference's log-probs from its cache file (validation/refcache.py), computed first when needed."""

    def __init__(self, reference: Path, corpus, n_ctx: int, n_windows: int, cache_dir: Path):
        from validation import refcache

        # the windows' crc32s are checked as they are read (RefCache.window), not in a pass of their own
        path, self.computed, self.key, self.evaluation = refcache.prepare_cache(
            reference, corpus, n_ctx, n_windows, cache_dir, verify=False
        )
        self.path, self.n_ctx, self.cache_path = reference, n_ctx, path
        self._open()
        self.cache_file = str(path)

    def _open(self) -> None:
        from validation import refcache

        try:
            self.cache = refcache.open_cache(self.cache_path, self.key, verify=False)
        except refcache.InvalidCache as exc:
            raise InputError(f"reference cache changed while in use: {exc}", self.cache_path) from None
        h = self.cache.header
        self.bos, self.pieces, self.vocab_size = h["bos"], h["pieces"], h["vocab"]
        self.sample_ids, self.windows, self.runtime_name = h["sample_ids"], h["windows"], h["reference_runtime"]

    def load(self) -> None:
        pass

    def recompute(self, why) -> None:
        """The cache file written again (``why`` it could not be used is logged) and opened anew."""
        from validation import refcache

        refcache.recompute(self.cache_path, self.key, self.path, self.evaluation, why)
        self.computed = True
        self._open()

    def score(self, acc: Accumulator, i: int, chunk: list[int], cand: np.ndarray, vocab: int) -> None:
        if vocab not in self.cache.cuts:
            raise UnsupportedError(
                f"the reference cache holds statistics over {self.cache.cuts} vocab rows, not the candidate's"
                f" {vocab}; validate without a reference cache",
                self.cache_file,
            )
        stats, ref_rows, rows = self.cache.window(i, vocab)
        first, count = scored_span(len(chunk))
        if rows != count or len(stats.nll) != count:
            raise InputError(f"the reference cache holds {rows} rows for window {i}, not {count}", self.cache_file)
        acc.add_stats(stats, ref_rows, cand, np.asarray(chunk[first + 1 :], dtype=np.int64))


def _default_kld(kind: ArtifactKind) -> tuple[float, str]:
    return kind.default_max_kld, f"default for {kind.name} artifacts"
