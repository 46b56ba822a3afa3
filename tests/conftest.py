from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import VARIANTS, make_tiny

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "build" / "models" / "gemma-3-270m"
OFFGRID = ROOT / "build" / "models" / "gemma-3-270m-offgrid"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Every tiny variant, single-file f32, plus a sharded bf16 Gemma 3."""
    root = tmp_path_factory.mktemp("tiny")
    models = {v: make_tiny(v, root / v) for v in VARIANTS}
    models["gemma3-sharded-bf16"] = make_tiny("gemma3", root / "gemma3-sharded-bf16", dtype="bfloat16", shard="60KB")
    return models


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The real Gemma 3 270M as HF bf16 (built by `make demo-model`; built here if missing)."""
    if not (DEMO / "config.json").is_file():
        from gemport.demo import build_demo_model

        build_demo_model(DEMO)
    return DEMO


@pytest.fixture(scope="session")
def offgrid_model(demo_model) -> Path:
    """The off-grid demo model (built by `make demo-model`; built here if missing)."""
    if not (OFFGRID / "config.json").is_file():
        from gemport.demo import build_demo_model

        build_demo_model(OFFGRID, offgrid=True)
    return OFFGRID


@pytest.fixture
def one_thread():
    """Tiny matrices: a second thread only adds hand-off latency on a loaded machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small corpus: its calibration split calibrates, its evaluation split scores."""
    from validation.corpus import default_text

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(default_text()[:60000], encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _own_cache_dir(monkeypatch, tmp_path_factory):
    """Each test's `gemport validate` calls (in-process or child processes) keep their reference caches
    in a folder of their own, never in the user's cache: a test sees no other test's cache."""
    monkeypatch.setenv("GEMPORT_CACHE_DIR", str(tmp_path_factory.mktemp("gemport-cache")))


@pytest.fixture(autouse=True)
def _no_progress_lines(monkeypatch):
    """No plain progress lines in-process, so that stderr assertions hold on a slow machine;
    tests/test_progress.py sets the intervals it tests."""
    from gemport import progress

    monkeypatch.setattr(progress, "INTERVAL", float("inf"))
    monkeypatch.setattr(progress, "HEARTBEAT", float("inf"))
