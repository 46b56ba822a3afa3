"""The result of one validation: what was compared, how, the numbers, and the gates."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gemport.errors import GateFailed
from validation.metrics import Metrics, scored_span


@dataclass(frozen=True)
class Gate:
    """One pass/fail check. ``limit`` is None for the always-on ``finite`` gate; ``source`` says where
    the limit comes from: "--max-kld" (the user), "default for 4-bit artifacts", "always"."""

    name: str  # "max-kld", "max-ppl-delta" (CLI option names) or "finite"
    value: float
    limit: float | None
    passed: bool
    source: str = "always"

    def describe(self) -> str:
        if self.name == "max-kld":
            return f"KLD {self.value:.6g} {'<=' if self.passed else '>'} {self.limit:g} ({self.source})"
        if self.name == "max-ppl-delta":
            return f"|delta-ppl| {self.value:.4g} % {'<=' if self.passed else '>'} {self.limit:g} % ({self.source})"
        if self.passed:
            return "candidate ppl and KLD are finite"
        return f"candidate output is not finite (KLD {self.value})"


def _at_most(value: float, limit: float) -> bool:
    """value <= limit, False for NaN (an infinite or NaN metric never passes)."""
    return math.isfinite(value) and value <= limit


def make_gates(
    m: Metrics,
    max_ppl_delta: float | None = None,
    max_kld: float | None = None,
    default_kld: tuple[float, str] | None = None,
) -> list[Gate]:
    """The gates: ``finite`` always (NaN or infinite candidate scores fail), --max-ppl-delta when given,
    and --max-kld, or else ``default_kld`` (bound, why) when the caller has a default for the artifact."""
    finite = all(math.isfinite(v) for v in (m.ppl_cand, m.delta_ppl_pct, m.kld))
    gates = [Gate("finite", m.kld, None, finite)]
    if max_ppl_delta is not None:
        value = abs(m.delta_ppl_pct)
        gates.append(Gate("max-ppl-delta", value, max_ppl_delta, _at_most(value, max_ppl_delta), "--max-ppl-delta"))
    if max_kld is not None:
        gates.append(Gate("max-kld", m.kld, max_kld, _at_most(m.kld, max_kld), "--max-kld"))
    elif default_kld is not None:
        limit, why = default_kld
        gates.append(Gate("max-kld", m.kld, limit, _at_most(m.kld, limit), why))
    return gates


def plural(n: int, word: str) -> str:
    """'1 window', '4 windows'."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _fmt(value: float, fmt: str) -> str:
    """``value`` in ``fmt``, or in scientific notation when fmt would print it as zeros (KLD 1.3e-06, not
    0.000001) or as more than 12 digits (the ppl of a random model, 3.1e+120)."""
    if value != 0 and math.isfinite(value) and (abs(value) < 1e-3 or abs(value) >= 1e12):
        return f"{value:{'+' if fmt.startswith('+') else ''}.3e}"
    return f"{value:{fmt}}"


def _pm(value: float, se: float, fmt: str, unit: str = "") -> str:
    text = f"{_fmt(value, fmt)}{unit}"
    return text if math.isnan(se) else f"{text} +/- {_fmt(se, fmt.lstrip('+'))}{unit}"


@dataclass
class Report:
    reference: str
    candidate: str
    candidate_format: str
    runtime: str  # the runtime that loaded the candidate
    runtime_kind: str  # "parity" or "round-trip"
    reference_runtime: str
    corpus: str
    n_ctx: int
    windows: int
    windows_requested: int
    metrics: Metrics
    gates: list[Gate]
    warnings: list[str] = field(default_factory=list)
    kind: str | None = None  # the artifact's kind (validation/gates.py), e.g. "4-bit"
    kind_evidence: str = ""  # what in the artifact says so
    reference_cache: str | None = None  # the reference log-probs' cache file (validation/refcache.py), if used
    reference_cache_computed: bool = False  # True when this run computed it, False when it reused it

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    @property
    def failed_gates(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed]

    @property
    def _cache_state(self) -> str:
        return "computed now" if self.reference_cache_computed else "reused"

    def table(self) -> str:
        """Plain text, one fact per line; reads the same on a terminal, in a pipe or in a log."""
        m = self.metrics
        first, count = scored_span(self.n_ctx)
        rows = [
            ("candidate", f"{self.candidate} ({self.candidate_format}, {self.runtime}, {self.runtime_kind})"),
            ("reference", f"{self.reference} ({self.reference_runtime})"),
            *(
                [("reference log-probs", f"cached in {self.reference_cache} ({self._cache_state})")]
                if self.reference_cache
                else []
            ),
            *([("artifact kind", f"{self.kind} ({self.kind_evidence})")] if self.kind else []),
            ("corpus", f"{self.corpus}, evaluation split"),
            (
                "protocol",
                f"{plural(self.windows, 'window')} x {self.n_ctx} tokens, BOS first, scored from position {first}",
            ),
            ("tokens scored", f"{m.tokens} ({count} per window)"),
            ("ppl reference", _pm(m.ppl_ref, m.ppl_ref_se, ".4f")),
            ("ppl candidate", _pm(m.ppl_cand, m.ppl_cand_se, ".4f")),
            ("delta-ppl", _pm(m.delta_ppl_pct, m.delta_ppl_pct_se, "+.4f", " %")),
            ("KLD", _pm(m.kld, m.kld_se, ".6f")),
            ("top-1 agree", _pm(m.top1_pct, m.top1_pct_se, ".2f", " %")),
        ]
        rows += [(f"gate {g.name}", f"{'PASS' if g.passed else 'FAIL'}  {g.describe()}") for g in self.gates]
        rows += [("warning", w) for w in self.warnings]
        rows.append(("result", "PASS" if self.passed else "FAIL"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

    def to_json(self) -> dict:
        first, count = scored_span(self.n_ctx)
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "candidate_format": self.candidate_format,
            "runtime": {"name": self.runtime, "kind": self.runtime_kind},
            "reference_runtime": self.reference_runtime,
            "reference_cache": (
                {"file": self.reference_cache, "state": self._cache_state} if self.reference_cache else None
            ),
            "artifact_kind": {"kind": self.kind, "evidence": self.kind_evidence} if self.kind else None,
            "protocol": {
                "corpus": self.corpus,
                "split": "evaluation",
                "n_ctx": self.n_ctx,
                "windows": self.windows,
                "windows_requested": self.windows_requested,
                "first_scored_position": first,
                "tokens_per_window": count,
            },
            "metrics": self.metrics.to_json(),
            "gates": [
                {
                    "name": g.name,
                    "value": _finite_or_none(g.value),
                    "limit": g.limit,
                    "source": g.source,
                    "passed": g.passed,
                }
                for g in self.gates
            ],
            "warnings": list(self.warnings),
            "passed": self.passed,
        }

    def gate_failure(self) -> str:
        """What failed, in one line: every failed gate and the figures (empty when every gate passed)."""
        failed = self.failed_gates
        if not failed:
            return ""
        m = self.metrics
        return (
            f"{self.candidate}: validation failed: "
            + "; ".join(f"gate {g.name}: {g.describe()}" for g in failed)
            + f" (ppl {_fmt(m.ppl_cand, '.4f')} vs reference {_fmt(m.ppl_ref, '.4f')}, KLD {m.kld:.6g},"
            f" top-1 {m.top1_pct:.2f} %,"
            f" {m.tokens} tokens in {plural(self.windows, 'window')} of {self.n_ctx})"
        )

    def raise_if_failed(self) -> None:
        if self.failed_gates:
            raise GateFailed(self.gate_failure().removeprefix(f"{self.candidate}: "), self.candidate)


def summary(results: list[tuple[object, Report | Exception]], total: int | None = None) -> str:
    """A title line (how many candidates passed, failed a gate, or could not be validated; "N of ``total``,
    interrupted" when fewer than ``total`` were done), then one line per candidate of a several-candidate
    validation (plain text, aligned columns): its format and runtime kind, ppl, delta-ppl, KLD and top-1 as
    each table prints them, and PASS, FAIL with the failed gates, or ERROR with the error's message."""
    head = ("candidate", "format", "runtime", "ppl", "delta-ppl", "KLD", "top-1", "result")
    lines, counts = [head], {"PASS": 0, "FAIL": 0, "ERROR": 0}
    for candidate, r in results:
        if not isinstance(r, Report):
            counts["ERROR"] += 1
            lines.append((str(candidate), "", "", "", "", "", "", f"ERROR: {r}"))
            continue
        counts["PASS" if r.passed else "FAIL"] += 1
        m = r.metrics
        lines.append(
            (
                r.candidate,
                r.candidate_format,
                r.runtime_kind,
                _fmt(m.ppl_cand, ".4f"),
                _pm(m.delta_ppl_pct, m.delta_ppl_pct_se, "+.4f", " %"),
                _pm(m.kld, m.kld_se, ".6f"),
                _pm(m.top1_pct, m.top1_pct_se, ".2f", " %"),
                "PASS" if r.passed else "FAIL " + ", ".join(g.name for g in r.failed_gates),
            )
        )
    done = len(results)
    title = f"{done} of {total} candidates (interrupted)" if (total or 0) > done else f"{done} candidates"
    title = f"summary, {title}: " + ", ".join(f"{n} {word}" for word, n in counts.items())
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    rows = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in lines]
    return "\n".join([title, *rows])
