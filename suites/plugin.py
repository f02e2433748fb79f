"""The suite's pytest plugin: command-line options, the deployment description, the report.

Under pytest-xdist the controller receives every worker's reports (with their user_properties),
so the report is assembled once, in the controller, and is complete under `-n auto`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.deployment import embedded_frontend
from harness.report import build_report, write_report

SPEC_KEY = "spec"
DEPLOYMENT_KEY = "deployment"
ENGINE_DEPLOYMENT_KEY = "engine_deployment"
NOT_PROPERTIES = (SPEC_KEY, DEPLOYMENT_KEY, ENGINE_DEPLOYMENT_KEY)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("conformance", "disaggregated-serving conformance")
    group.addoption("--cache-root", metavar="DIR", default=None,
                    help="metadata cache root. With --card: a foreign frontend's cache to check "
                         "(e.g. ~/.cache/dynamo/mdc). Alone: where the embedded resolver writes.")
    group.addoption("--card", metavar="JSON", action="append", default=[],
                    help="a card JSON that the foreign frontend resolved (repeatable); needs --cache-root")
    group.addoption("--profile", metavar="NAMES", default="cpu,gpu-vllm,gpu-sglang",
                    help="engine launch profiles to run, comma-separated (see harness/engines/profiles.py); "
                         "GPU profiles are marked `gpu` and skip with a reason on a host without one")
    group.addoption("--frontend-url", metavar="URL", default=None,
                    help="check this running frontend instead of starting the harness's own")
    group.addoption("--engine-url", metavar="ROLE=URL", action="append", default=[],
                    help="an engine behind --frontend-url, for its /metrics (repeatable): prefill=..., "
                         "decode=..., and aggregated=... as the reference for output equality")
    group.addoption("--launcher", choices=["auto", "subprocess", "docker"], default="auto",
                    help="how engines start: auto = docker for profiles with an image when a daemon answers, "
                         "else subprocesses")
    group.addoption("--engine-python", metavar="PATH", default=None,
                    help="the interpreter that runs engine servers (default: $DISAGG_ENGINE_PYTHON or this one)")
    group.addoption("--report-dir", metavar="DIR", default=None,
                    help="where conformance.json/.md are written (default: <rootdir>/reports)")
    group.addoption("--no-report", action="store_true", help="do not write the conformance report")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("card") and not config.getoption("cache_root"):
        raise pytest.UsageError("--card needs --cache-root: the cache that frontend wrote")
    if config.getoption("engine_url") and not config.getoption("frontend_url"):
        raise pytest.UsageError("--engine-url needs --frontend-url: the frontend those engines serve")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub is reachable; fail fast instead of retrying
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    config.pluginmanager.register(ConformanceReporter(config), "conformance-reporter")


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
    kind = "foreign" if config.getoption("card") or config.getoption("frontend_url") else "embedded"
    frontend = embedded_frontend() if kind == "embedded" else {"name": "foreign", "url": None}
    return {"kind": kind, "frontend": frontend, "engines": [], "cache_root": config.getoption("cache_root")}


class ConformanceReporter:
    """Collects every conformance check's outcome and writes the report at session end."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.checks: dict[str, dict] = {}
        self.deployment: dict | None = None
        self.engine_deployment: dict | None = None
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
        self.deployment = props.get(DEPLOYMENT_KEY, self.deployment)
        self.engine_deployment = props.get(ENGINE_DEPLOYMENT_KEY, self.engine_deployment)
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
        """The metadata side (cache) and the serving side (frontend, engines) in one description."""
        deployment = dict(self.deployment or fallback_deployment(self.config))
        if self.engine_deployment:
            engines = self.engine_deployment
            deployment.update(frontend=engines["frontend"], engines=engines["engines"], profile=engines["profile"])
            deployment["frontend_cache_root"] = engines.get("cache_root")
            if not self.deployment:
                deployment["kind"] = engines["kind"]
        return deployment

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
