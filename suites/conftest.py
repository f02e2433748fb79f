"""Fixtures every suite shares: the deployment under test and its resolved cards."""

from __future__ import annotations

from pathlib import Path

import pytest
from filelock import FileLock

from harness.deployment import Deployment, foreign_cache
from harness.worker.metadata_server import MetadataServer
from suites.embedded import EMBEDDED_LABELS, build_embedded, make_models


def is_foreign(config: pytest.Config) -> bool:
    return bool(config.getoption("card"))


def shared_dir(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """A directory all xdist workers of this run share (the xdist-documented recipe)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if worker_id != "master" else base


@pytest.fixture(scope="session")
def fixture_models(tmp_path_factory, worker_id) -> dict[str, Path]:
    root = shared_dir(tmp_path_factory, worker_id) / "fixture-models"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        return make_models(root)


@pytest.fixture(scope="session")
def deployment(request, tmp_path_factory, worker_id) -> Deployment:
    config = request.config
    if is_foreign(config):
        return foreign_cache(Path(config.getoption("cache_root")), [Path(p) for p in config.getoption("card")])
    models = request.getfixturevalue("fixture_models")
    cache_root = Path(config.getoption("cache_root") or shared_dir(tmp_path_factory, worker_id) / "mdc")
    server = MetadataServer().start()
    request.addfinalizer(server.stop)
    # xdist workers resolve the same cards into one cache at once: SPEC §2.3 concurrency, for free.
    return build_embedded(models, cache_root, server)


@pytest.fixture(autouse=True)
def _report_deployment(request):
    """Tell the report which deployment a check ran against (it travels through xdist)."""
    if "deployment" in request.fixturenames:
        request.node.user_properties.append(("deployment", request.getfixturevalue("deployment").describe()))


@pytest.fixture(autouse=True)
def _embedded_only(request):
    if request.node.get_closest_marker("embedded_only") and is_foreign(request.config):
        pytest.skip("checks the harness's own resolver (fault injection); the deployment under test is foreign")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every conformance check must say which SPEC section it covers, or the report cannot."""
    here = Path(__file__).parent
    unmarked = [i.nodeid for i in items if i.path.is_relative_to(here) and not i.get_closest_marker("spec")]
    if unmarked:
        raise pytest.UsageError(f"conformance checks without @pytest.mark.spec: {unmarked}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "card_label" in metafunc.fixturenames:
        config = metafunc.config
        labels = [Path(p).stem for p in config.getoption("card")] if is_foreign(config) else list(EMBEDDED_LABELS)
        metafunc.parametrize("card_label", labels)


@pytest.fixture
def card_under_test(deployment: Deployment, card_label: str):
    return deployment.card(card_label)

