"""The engine-backed deployment the disaggregation suites run against.

Embedded: real engine servers from a launch profile (prefill, decode, and an aggregated reference
that is not behind the frontend), each prefill/decode registered by the harness's worker side,
and the harness frontend routing between them. Foreign: a user's frontend and engines, by URL.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

import harness
from harness.cluster import Cluster
from harness.engines.docker_launcher import DockerEngine, choose_launcher
from harness.engines.external import ExternalEngine
from harness.engines.launcher import EngineProcess, Progress, free_port, stderr_progress
from harness.engines.profiles import ROLES, EngineProfile

MODEL = "tiny-llama"  # the served name, the card's display_name


def engine_version(url: str) -> str | None:
    try:
        return requests.get(f"{url.rstrip('/')}/version", timeout=5).json().get("version")
    except (requests.RequestException, ValueError, AttributeError):
        return None


def module_available(python: str, module: str) -> bool:
    """Whether `python` can import `module`, asked cheaply (find_spec, no import)."""
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0


def gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return 0
    return len([line for line in out.stdout.splitlines() if line.startswith("GPU ")])


@dataclass
class EngineDeployment:
    kind: str  # embedded | foreign
    frontend_url: str
    engines: dict[str, Any]  # role -> EngineProcess | ExternalEngine
    model: str = MODEL
    profile: EngineProfile | None = None
    cluster: Cluster | None = None
    workdir: Path | None = None
    log_dir: Path | None = None
    python: str | None = None
    launcher: str = "auto"  # auto | subprocess | docker
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def embedded(self) -> bool:
        return self.kind == "embedded"

    def url(self, role: str) -> str:
        return self.engines[role].url

    def has(self, role: str) -> bool:
        return role in self.engines

    def describe(self) -> dict:
        engines = []
        for role, e in self.engines.items():
            engines.append({"name": e.name, "role": role, "url": e.url, "version": engine_version(e.url),
                            "engine": self.profile.engine if self.profile else None,
                            "healthy_after_s": getattr(e, "healthy_after_s", None),
                            "log": str(getattr(e, "log_path", "")) or None,
                            "behind_frontend": role != "aggregated"})
        frontend = ({"name": "harness", "version": harness.__version__, "role": "reference frontend",
                     "url": self.frontend_url} if self.embedded else
                    {"name": "foreign", "version": None, "role": "user-supplied frontend", "url": self.frontend_url})
        return {"kind": self.kind, "profile": self.profile.name if self.profile else None, "frontend": frontend,
                "engines": engines, "cache_root": str(self.cluster.cache_root) if self.cluster else None}

    # ---- embedded only: what fault and fallback checks do to the engines

    def _spec(self, role: str):
        spec = self.profile.launch_spec(role, self.cluster.model_dir, self.model, free_port(), free_port(),
                                        self.workdir, python=self.python)
        return dataclasses.replace(spec, env={**spec.env, **self.extra_env})

    def _engine(self, spec):
        if choose_launcher(self.launcher, spec) == "docker":
            return DockerEngine(spec, str(self.cluster.model_dir))
        return EngineProcess(spec, self.log_dir)

    def launch(self, roles: tuple[str, ...], progress: Progress = stderr_progress) -> None:
        """Start these roles' engines at once, wait for all, register prefill/decode with the frontend."""
        started = {role: self._engine(self._spec(role)).start() for role in roles}
        self.engines.update(started)
        for engine in started.values():
            engine.wait_healthy(self.profile.startup_timeout_s, progress)
        for role, engine in started.items():
            if role != "aggregated":
                self.cluster.register(engine)
        behind = {r for r in self.engines if r != "aggregated"}
        self.cluster.wait_for_roles(behind, timeout_s=60)

    def stop_role(self, role: str) -> None:
        """A clean stop: the worker deregisters, then its engine's process group is stopped."""
        engine = self.engines.pop(role)
        self.cluster.deregister(engine.name)
        engine.stop()

    def kill_role(self, role: str) -> None:
        """A crash: SIGKILL the engine's process group; its lease expires on its own."""
        self.engines[role].kill()

    def restart_role(self, role: str, progress: Progress = stderr_progress) -> None:
        old = self.engines.pop(role, None)
        if old is not None:
            self.cluster.deregister(old.name)
            old.stop()
        self.launch((role,), progress)

    def stop(self) -> None:
        for role in list(self.engines):
            self.engines[role].stop()
        if self.cluster:
            self.cluster.stop()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def start_embedded(profile: EngineProfile, model_dir: Path, log_dir: Path, python: str,
                   progress: Progress = stderr_progress, launcher: str = "auto") -> EngineDeployment:
    # A short scratch path: vLLM puts ZMQ unix sockets under TMPDIR, and those paths are length-capped.
    workdir = Path(tempfile.mkdtemp(prefix="disagg-"))
    env = {"VLLM_CACHE_ROOT": str(workdir / "vllm-cache"), "TMPDIR": str(workdir / "tmp"),
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    (workdir / "tmp").mkdir()
    cluster = Cluster(workdir / "cluster", model_dir, MODEL, block_size=profile.block_size, protocol=profile.protocol,
                      timeout_s=profile.request_timeout_s).start()
    deployment = EngineDeployment("embedded", cluster.url, {}, profile=profile, cluster=cluster, workdir=workdir,
                                  log_dir=log_dir, python=python, launcher=launcher, extra_env=env)
    progress(f"[deployment {profile.name}] starting {', '.join(ROLES)} engines (logs: {log_dir})")
    try:
        deployment.launch(ROLES, progress)
    except BaseException:
        deployment.stop()
        raise
    return deployment


def foreign(frontend_url: str, engines: list[ExternalEngine]) -> EngineDeployment:
    return EngineDeployment("foreign", frontend_url.rstrip("/"), {e.role: e for e in engines})
