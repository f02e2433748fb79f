"""Start an engine server in a container through the docker SDK, where a daemon exists.

`container_spec` is pure, so it is tested without a daemon; `DockerEngine` runs it.
"""

from __future__ import annotations

import time

from harness.engines.health import is_healthy
from harness.engines.launcher import EngineStartError, Progress, stderr_progress
from harness.engines.profiles import LaunchSpec

CONTAINER_PORT = 8000
MODEL_MOUNT = "/model"


def container_spec(spec: LaunchSpec, model_dir: str) -> dict:
    """Keyword arguments for `docker.from_env().containers.run(**spec)`."""
    import docker.types

    command = list(spec.command[1:])  # drop the host interpreter: the image has its own
    command = [MODEL_MOUNT if part == model_dir else part for part in command]
    if "--port" in command:
        command[command.index("--port") + 1] = str(CONTAINER_PORT)
    if "--host" in command:
        command[command.index("--host") + 1] = "0.0.0.0"
    device_requests = []
    if spec.gpus:
        device_requests.append(docker.types.DeviceRequest(device_ids=[str(g) for g in spec.gpus],
                                                          capabilities=[["gpu"]]))
    return {
        "image": spec.image,
        "entrypoint": ["python3"],
        "command": command,
        "environment": {k: v for k, v in spec.env.items() if k != "CUDA_VISIBLE_DEVICES"},
        "ports": {f"{CONTAINER_PORT}/tcp": ("127.0.0.1", spec.port)},
        "volumes": {model_dir: {"bind": MODEL_MOUNT, "mode": "ro"}},
        "device_requests": device_requests,
        "ipc_mode": "host",
        "detach": True,
        "auto_remove": False,
        "name": f"disagg-{spec.name}-{spec.port}",
        "labels": {"disagg-conformance.role": spec.role},
    }


def docker_available() -> bool:
    try:
        import docker

        docker.from_env().ping()
        return True
    except Exception:  # no SDK, no socket, no daemon: all mean "not here"
        return False


class DockerEngine:
    """The same interface as EngineProcess, for a container; torn down by its own container id."""

    def __init__(self, spec: LaunchSpec, model_dir: str, log_dir=None):
        self.spec, self.model_dir = spec, model_dir
        self.container = None
        self.healthy_after_s: float | None = None
        self.log_path = None

    name = property(lambda self: self.spec.name)
    role = property(lambda self: self.spec.role)
    url = property(lambda self: self.spec.url)

    def alive(self) -> bool:
        if self.container is None:
            return False
        self.container.reload()
        return self.container.status == "running"

    def healthy(self, timeout: float = 2.0) -> bool:
        return is_healthy(self.url, timeout)

    def kill(self) -> None:
        if self.container is not None:
            self.container.kill()

    def start(self) -> "DockerEngine":
        import docker

        self.container = docker.from_env().containers.run(**container_spec(self.spec, self.model_dir))
        return self

    def wait_healthy(self, timeout_s: float, progress: Progress = stderr_progress, every_s: float = 10.0) -> float:
        start, next_report = time.monotonic(), time.monotonic() + every_s
        progress(f"[engine {self.name}] container {self.container.short_id} starting on {self.url}")
        while time.monotonic() - start < timeout_s:
            if time.monotonic() >= next_report:
                progress(f"[engine {self.name}] waiting for /health: {time.monotonic() - start:.0f} s")
                next_report += every_s
            self.container.reload()
            if self.container.status == "exited":
                tail = self.container.logs(tail=40).decode(errors="replace")
                raise EngineStartError(f"container {self.spec.name} exited during start-up:\n{tail}")
            if self.healthy():
                self.healthy_after_s = time.monotonic() - start
                progress(f"[engine {self.name}] healthy after {self.healthy_after_s:.1f} s")
                return self.healthy_after_s
            time.sleep(1)
        raise EngineStartError(f"container {self.spec.name} did not answer /health within {timeout_s:.0f} s")

    def stop(self, grace_s: float = 20.0) -> None:
        if self.container is not None:  # by its own id, never by name
            self.container.stop(timeout=int(grace_s))
            self.container.remove(force=True)


def choose_launcher(requested: str, spec: LaunchSpec, daemon: bool | None = None) -> str:
    """`auto` runs a profile with an image in docker when a daemon answers, else as a subprocess."""
    if requested not in ("auto", "subprocess", "docker"):
        raise ValueError(f"launcher {requested!r} must be auto, subprocess or docker")
    if requested != "auto":
        return requested
    if spec.image is None:
        return "subprocess"
    return "docker" if (docker_available() if daemon is None else daemon) else "subprocess"
