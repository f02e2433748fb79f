"""The router under test, started by the suite itself (`--frontend-cmd TEMPLATE`).

Most P/D routers take their engines' URLs on the command line, so the suite fills them in: the
relays it put in front of the engines (`harness.interposer`), a free loopback port for the
router, and another for a metrics server it may run (`{metrics_port}`). The command is split
like a shell would (shlex) but not run through one; wrap it in `sh -c '...'` to need one. It runs in a session of its own, is waited on until it serves, and is
stopped by its process group, never by name.
"""

from __future__ import annotations

import re
import shlex
import urllib.parse
from pathlib import Path

import requests

from harness.engines.launcher import EngineProcess, EngineStartError, Progress, free_port, stderr_progress
from harness.engines.profiles import LaunchSpec
from harness.errors import HarnessError

FIELDS = ("host", "port", "metrics_port", "prefill_url", "decode_url", "prefill_host", "prefill_port", "decode_host",
          "decode_port")
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class FrontendCommandError(HarnessError):
    pass


def fill_template(template: str, port: int, engines: dict[str, str], host: str = "127.0.0.1",
                  metrics_port: int | None = None) -> list[str]:
    """The command for `template` with its placeholders filled; an unknown one is an error naming it."""
    values = {"host": host, "port": str(port), "metrics_port": str(metrics_port or free_port())}
    for role, url in engines.items():
        parts = urllib.parse.urlsplit(url)
        values |= {f"{role}_url": url, f"{role}_host": parts.hostname or "", f"{role}_port": str(parts.port or "")}
    unknown = sorted({m for m in PLACEHOLDER.findall(template) if m not in FIELDS})
    if unknown:
        raise FrontendCommandError(f"--frontend-cmd: unknown placeholder(s) {unknown}; known: "
                                   f"{', '.join('{' + f + '}' for f in FIELDS)}")
    missing = sorted({m for m in PLACEHOLDER.findall(template) if m not in values})
    if missing:
        raise FrontendCommandError(f"--frontend-cmd uses {missing}, but the suite has no such engine to give it")
    if "{port}" not in template:
        raise FrontendCommandError("--frontend-cmd must contain {port}: the suite picks the router's port")
    try:
        command = shlex.split(PLACEHOLDER.sub(lambda m: values[m.group(1)], template))
    except ValueError as exc:
        raise FrontendCommandError(f"--frontend-cmd {template!r} does not parse: {exc}") from None
    if not command:
        raise FrontendCommandError("--frontend-cmd is empty")
    return command


def serves(url: str, timeout: float = 2.0) -> bool:
    """A router serves once its /health, or else its /v1/models, answers 200, and its /v1/models
    does not answer 503. A router may be up before its workers are: sglang-router 0.3.2 answers
    /health 200 at once and /v1/models 503 ("No models available") until it has registered its
    workers in the background, about 1 s later (measured); a request meanwhile gets 503 "No
    prefill workers available"."""
    try:
        health = requests.get(f"{url}/health", timeout=timeout).status_code
        models = requests.get(f"{url}/v1/models", timeout=timeout).status_code
    except requests.RequestException:
        return False  # not listening yet
    return (health == 200 or models == 200) and models != 503


class RouterProcess(EngineProcess):
    """The router under test, in its own process group, logging to `log_dir/frontend-under-test.log`."""

    def __init__(self, template: str, engines: dict[str, str], log_dir: Path, env: dict[str, str] | None = None):
        port, metrics_port = free_port(), free_port()
        self.command = fill_template(template, port, engines, metrics_port=metrics_port)
        # A router that runs its metrics server where the suite said ({metrics_port}) is scraped there.
        self.metrics_url = f"http://127.0.0.1:{metrics_port}" if "{metrics_port}" in template else None
        super().__init__(LaunchSpec("frontend-under-test", "frontend", self.command, env or {}, port), log_dir)

    def healthy(self, timeout: float = 2.0) -> bool:
        return serves(self.url, timeout)

    def start(self) -> "RouterProcess":
        try:
            return super().start()
        except OSError as exc:
            raise FrontendCommandError(f"--frontend-cmd: cannot run {self.command[0]!r}: {exc}") from None

    def wait_serving(self, timeout_s: float, progress: Progress = stderr_progress) -> float:
        try:
            return self.wait_healthy(timeout_s, progress)
        except EngineStartError as exc:
            raise FrontendCommandError(str(exc).replace("engine frontend-under-test", "the router under test")) from None


def started(template: str, engines: dict[str, str], log_dir: Path, timeout_s: float = 120.0,
            progress: Progress = stderr_progress) -> RouterProcess:
    router = RouterProcess(template, engines, log_dir).start()
    progress(f"[frontend-cmd] {' '.join(router.command)}")
    try:
        router.wait_serving(timeout_s, progress)
    except BaseException:
        router.stop(grace_s=5)
        raise
    return router
