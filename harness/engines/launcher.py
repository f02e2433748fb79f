"""Start engine servers as subprocesses on 127.0.0.1, wait for /health, tear down by process group.

Like vLLM's RemoteOpenAIServer: a free port, a bounded /health wait with a visible progress line,
the log tail when the server dies early, and a kill of the whole process tree by its own group
id on exit. Never by name: other engines on the machine are none of our business.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable

from harness.engines.health import is_healthy
from harness.engines.profiles import LaunchSpec
from harness.errors import HarnessError

Progress = Callable[[str], None]


class EngineStartError(HarnessError):
    """The engine exited during start-up, or never answered /health in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stderr_progress(line: str) -> None:
    """Progress goes to the real stderr, past pytest's capture, so a long start-up is visible."""
    print(line, file=sys.__stderr__, flush=True)


def log_end(path: Path) -> int:
    """Where a log ends now (0 where there is none yet): `log_since` reads what comes after it."""
    return path.stat().st_size if path.exists() else 0


def log_since(path: Path, offset: int) -> str:
    """What was written to a log after `offset` (a `log_end`)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError:
        return "(no log)"


class EngineProcess:
    """One engine server in its own session (process group)."""

    def __init__(self, spec: LaunchSpec, log_dir: Path):
        self.spec = spec
        self.log_path = Path(log_dir) / f"{spec.name}.log"
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None
        self.healthy_after_s: float | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def role(self) -> str:
        return self.spec.role

    @property
    def url(self) -> str:
        return self.spec.url

    def start(self) -> "EngineProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cores = self.spec.cores

        def pin() -> None:  # runs in the child before exec: every process it spawns inherits it
            if cores:
                os.sched_setaffinity(0, cores)

        log = open(self.log_path, "ab")
        log.write(f"\n=== {time.strftime('%H:%M:%S')} starting: {' '.join(self.spec.command)}\n".encode())
        log.flush()
        self.started_at = time.monotonic()
        try:
            self.proc = subprocess.Popen(self.spec.command, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env={**os.environ, **self.spec.env},
                                         start_new_session=True, preexec_fn=pin)
        finally:
            log.close()  # the child holds its own copy
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, timeout: float = 2.0) -> bool:
        return is_healthy(self.url, timeout)

    def wait_healthy(self, timeout_s: float, progress: Progress = stderr_progress, every_s: float = 10.0) -> float:
        """Block until /health is 200; raise with the log tail if the server exits or times out."""
        assert self.proc is not None and self.started_at is not None, "start() first"
        next_report = time.monotonic() + every_s
        progress(f"[engine {self.name}] starting on {self.url} (pid {self.proc.pid}); log: {self.log_path}")
        while True:
            elapsed = time.monotonic() - self.started_at
            if self.proc.poll() is not None:
                raise EngineStartError(f"engine {self.name} exited with code {self.proc.returncode} after "
                                       f"{elapsed:.0f} s during start-up; last lines of {self.log_path}:\n"
                                       f"{log_tail(self.log_path)}")
            if self.healthy():
                self.healthy_after_s = elapsed
                progress(f"[engine {self.name}] healthy after {elapsed:.1f} s")
                return elapsed
            if elapsed > timeout_s:
                self.stop()
                raise EngineStartError(f"engine {self.name} did not answer /health within {timeout_s:.0f} s; "
                                       f"last lines of {self.log_path}:\n{log_tail(self.log_path)}")
            if time.monotonic() >= next_report:
                progress(f"[engine {self.name}] waiting for /health: {elapsed:.0f} s of at most {timeout_s:.0f} s")
                next_report += every_s
            time.sleep(0.5)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the session leader's pid is the group id
        except ProcessLookupError:
            pass

    def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM the process group, then SIGKILL it after `grace_s`. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)  # stragglers in the group (engine core, workers)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole group at once: a crash, for fault injection."""
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(timeout=30)
