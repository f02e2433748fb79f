"""Fixtures for the harness's own tests: the tiny model, and clusters of fake engines."""

from __future__ import annotations

import pytest

from fixtures.fake_engine import FakeEngine
from fixtures.tiny_llama import cached_tiny_llama
from harness.cluster import Cluster


@pytest.fixture(scope="session")
def tiny_model():
    return cached_tiny_llama()


@pytest.fixture
def fake_engines():
    """Start fake engines on demand; all are stopped after the test."""
    started: list[FakeEngine] = []

    def start(role: str, name: str | None = None, **kw) -> FakeEngine:
        engine = FakeEngine(role, name=name, **kw).start()
        started.append(engine)
        return engine

    yield start
    for engine in started:
        engine.stop()


@pytest.fixture
def cluster(tmp_path, tiny_model):
    """A frontend with discovery and a worker side, and no engines yet."""
    with Cluster(tmp_path / "cluster", tiny_model, "tiny", block_size=32, lease_s=3.0, timeout_s=10) as c:
        yield c


@pytest.fixture
def make_cluster(tmp_path, tiny_model):
    made: list[Cluster] = []

    def make(**kw) -> Cluster:
        c = Cluster(tmp_path / f"cluster{len(made)}", tiny_model, "tiny", block_size=32, lease_s=3.0, timeout_s=10, **kw)
        made.append(c.start())
        return c

    yield make
    for c in made:
        c.stop()
