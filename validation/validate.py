"""Score a candidate artifact against the reference HF checkpoint, window by window, in lockstep."""

from __future__ import annotations

import logging
from pathlib import Path

from gemport import registry
from gemport.errors import CheckpointError, InputError, UnsupportedError
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


def validate(
    candidate: str | Path,
    reference: str | Path,
    corpus: str | Path | None = None,
    n_ctx: int = 512,
    n_windows: int = 16,
    max_ppl_delta: float | None = None,
    max_kld: float | None = None,
    default_gates: bool = True,
) -> Report:
    """Perplexity, delta-ppl %, KLD and top-1 of ``candidate`` (run by its format's runtime) vs ``reference``.

    Gates: NaN or infinite scores always fail; ``max_kld`` and ``max_ppl_delta`` when given; without
    ``max_kld``, the default KLD bound of the candidate's kind (validation/gates.py) unless
    ``default_gates`` is False."""
    candidate, reference = Path(candidate), Path(reference)
    _check_options(n_ctx, n_windows, {"--max-kld": max_kld, "--max-ppl-delta": max_ppl_delta})
    with stage(f"reading {candidate.name} and the evaluation text"):
        fmt = registry.detect(candidate)
        check_supported(fmt, candidate)
        if registry.detect(reference) != "hf":
            raise InputError("the reference must be a Hugging Face checkpoint folder", reference)
        kind = artifact_kind(candidate, fmt)
        log.info("candidate kind %s: %s", kind.name, kind.evidence)

        evaluation = split_text(load_text(corpus))[0]
        tokenizer = load_tokenizer(reference, "reference")
        if fmt == "hf":
            cand_tokenizer = load_tokenizer(candidate, "candidate")
            check_same_tokenizer(tokenizer, cand_tokenizer, evaluation[:TOKENIZER_CHECK_CHARS], candidate)
        else:
            log.info("candidate is %s: token ids come from the reference tokenizer", fmt)
        if tokenizer.bos_token_id is None:
            raise CheckpointError("the reference tokenizer has no BOS token", reference)
        chunks = windows(tokenize(tokenizer, evaluation), n_ctx, n_windows, tokenizer.bos_token_id)
    warnings = []
    if len(chunks) < n_windows:
        held = f"{len(chunks)} window{'s' if len(chunks) != 1 else ''}"
        warnings.append(f"the corpus holds {held} of {n_ctx} tokens, fewer than the {n_windows} asked")
        log.warning("%s", warnings[-1])

    with stage(f"loading {candidate.name}"):
        cand_rt = runtime_for(candidate, fmt)
    for note in getattr(cand_rt, "notes", ()):  # where the candidate's runtime departs from the reference's
        warnings.append(note)
        log.warning("%s", note)
    if hasattr(cand_rt, "tokenize"):  # a runtime with its own tokenizer (llama.cpp) must agree with the reference
        sample = evaluation[:TOKENIZER_CHECK_CHARS]
        check_same_ids(tokenize(tokenizer, sample), cand_rt.tokenize(sample), candidate)
    with stage(f"loading the reference {reference.name}"):
        ref_rt = TransformersRuntime(reference)
    vocab = scored_vocab(cand_rt.vocab_size, ref_rt.vocab_size, tokenizer.vocab_size)
    if vocab is None:
        raise CheckpointError(f"vocab size {cand_rt.vocab_size}, reference has {ref_rt.vocab_size}", candidate)
    if vocab < ref_rt.vocab_size:
        warnings.append(padding_note(ref_rt.vocab_size, vocab))
        log.warning("%s", warnings[-1])
    top = max(max(c) for c in chunks)
    if top >= vocab:
        raise CheckpointError(f"the tokenizer yields id {top}, beyond the vocab of {vocab}", reference)

    acc = Accumulator()
    with progress(f"validating {candidate.name}", total=len(chunks), unit="windows") as advance:
        for chunk in chunks:
            acc.add_window(chunk, ref_rt.logprobs(chunk)[:, :vocab], cand_rt.logprobs(chunk))
            advance()
    metrics = acc.result()
    log.info("%d tokens scored: KLD %.6g, delta-ppl %+.4f %%", metrics.tokens, metrics.kld, metrics.delta_ppl_pct)
    return Report(
        reference=str(reference),
        candidate=str(candidate),
        candidate_format=fmt,
        runtime=cand_rt.name,
        runtime_kind=cand_rt.kind,
        reference_runtime=ref_rt.name,
        corpus=str(corpus) if corpus is not None else "pydoc topics (default)",
        n_ctx=n_ctx,
        windows=len(chunks),
        windows_requested=n_windows,
        metrics=metrics,
        gates=make_gates(metrics, max_ppl_delta, max_kld, _default_kld(kind) if default_gates else None),
        warnings=warnings,
        kind=kind.name,
        kind_evidence=kind.evidence,
    )


def _default_kld(kind: ArtifactKind) -> tuple[float, str]:
    return kind.default_max_kld, f"default for {kind.name} artifacts"
