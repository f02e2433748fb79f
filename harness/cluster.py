"""The embedded deployment: engines, the worker side of each, discovery, and the frontend.

It is the data path of the README in one object: each engine (launched by any launcher, or a
fake) gets a worker registration that self-hosts its card; the frontend watches the store,
resolves the cards into its cache and routes requests to the engines.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from harness.discovery import FileStore, open_store
from harness.frontend.router import RoutedEngine
from harness.frontend.server import Frontend
from harness.worker.metadata_server import MetadataServer
from harness.worker.registration import WorkerRegistration

log = logging.getLogger(__name__)


class Cluster:
    def __init__(self, workdir: str | Path, model_dir: str | Path, served_name: str, *, block_size: int,
                 selection: str = "round_robin", protocol: str = "vllm", timeout_s: float = 120.0,
                 router: type[RoutedEngine] = RoutedEngine, lease_s: float = 10.0, allow_remote_media: bool = False,
                 store: str | None = None):
        self.workdir = Path(workdir)
        self.model_dir, self.served_name, self.block_size, self.lease_s = Path(model_dir), served_name, block_size, lease_s
        # The file store in the workdir by default; `store="etcd://HOST:PORT[/prefix]"` for etcd.
        self.store = open_store(store) if store else FileStore(self.workdir / "discovery")
        self.cache_root = self.workdir / "mdc"
        self.metadata = MetadataServer()
        self.frontend = Frontend(self.store, self.cache_root, selection=selection, protocol=protocol,
                                 timeout_s=timeout_s, router=router, allow_remote_media=allow_remote_media,
                                 stale_after_s=lease_s)
        self.registrations: dict[str, WorkerRegistration] = {}

    def start(self) -> "Cluster":
        self.metadata.start()
        self.frontend.start()
        return self

    def stop(self) -> None:
        for name in list(self.registrations):
            self.deregister(name)
        self.frontend.stop()
        self.metadata.stop()

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self.frontend.url

    def register(self, engine: Any, role: str | None = None) -> WorkerRegistration:
        """Act as `engine`'s worker side: publish its card and keep its lease while it is healthy.
        `role` overrides the engine's own, for an engine that can play several (NIXL kv_both)."""
        spec = getattr(engine, "spec", None)
        registration = WorkerRegistration(self.store, self.metadata, engine_url=engine.url, model_dir=self.model_dir,
                                          name=self.served_name, role=role or engine.role, block_size=self.block_size,
                                          lease_s=self.lease_s, bootstrap_port=getattr(spec, "bootstrap_port", None))
        registration.start()
        self.registrations[engine.name] = registration
        return registration

    def deregister(self, name: str) -> None:
        registration = self.registrations.pop(name, None)
        if registration:
            registration.stop()

    def roles_served(self) -> set[str]:
        model = self.frontend.manager.models.get(self.served_name)
        return {i.role for i in model.engine.instances()} if model else set()

    def wait_until(self, predicate: Callable[["Cluster"], bool], what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate(self):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not reached within {timeout_s:.0f} s (serving {self.roles_served()})")
            time.sleep(0.05)

    def wait_for_roles(self, roles: set[str], timeout_s: float = 60.0) -> None:
        self.wait_until(lambda c: c.roles_served() == roles, f"frontend serving exactly {sorted(roles)}", timeout_s)

    def serve(self, *engines: Any) -> None:
        """Register each engine and wait until the frontend serves exactly their roles."""
        for engine in engines:
            self.register(engine)
        self.wait_for_roles({e.role for e in engines})
