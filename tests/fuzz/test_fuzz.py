"""CI's short fuzz runs: every target for FUZZ_CI_SECONDS (default 15) from its seeds; any finding
(an exception that is not a gemport error, a run over the time limit, memory past the bound) fails.
`make fuzz` runs the long ones (bench/RESULTS.md, Fuzzing)."""

from __future__ import annotations

import os

import pytest

from tests.fuzz.run import ALL, ensure_corpus, run_target

SECONDS = int(os.environ.get("FUZZ_CI_SECONDS", "15"))


@pytest.fixture(scope="module")
def corpus() -> None:
    ensure_corpus()


@pytest.mark.parametrize("target", ALL)
def test_fuzz_target_finds_nothing(corpus, target):
    r = run_target(target, SECONDS, None, timeout=5)
    assert r["exit"] == 0 and not r["findings"], f"fuzz target {target}: {r} (log: {r['log']})"
    assert r["executions"], f"fuzz target {target} ran no input: {r}"
