"""The frontend's model table, kept in step with discovery (SPEC §3).

On put: resolve the card into local_dir, load the preprocessor from there, add the instance to
the model's routed engine. On delete (stop, or lease expiry): remove the instance, and the model
once no instance is left. Two workers of one role with different mdcsums are incompatible: the
first stays, the second is rejected with a message saying why.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from harness.discovery import Event, ModelEntry
from harness.frontend.metrics import FrontendMetrics
from harness.frontend.preprocessor import Preprocessor
from harness.frontend.router import Instance, RoutedEngine
from harness.resolve import Resolver

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    name: str
    engine: RoutedEngine
    preprocessor: Preprocessor
    mdcsum_by_role: dict[str, str] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)  # instance key -> role

    @property
    def listed(self) -> bool:
        """A model with only prefill workers has no OpenAI surface (SPEC §1.4)."""
        return bool(self.engine.instances("decode", "aggregated"))


class ModelManager:
    def __init__(self, cache_root: str | Path, *, selection: str = "round_robin", protocol: str = "vllm",
                 timeout_s: float = 120.0, router: type[RoutedEngine] = RoutedEngine,
                 after_load: Callable[[], None] | None = None, metrics: FrontendMetrics | None = None):
        self.metrics = metrics or FrontendMetrics()
        self.resolver = Resolver(cache_root)
        self.after_load = after_load  # called once a new model's preprocessor is loaded
        self.selection, self.protocol, self.timeout_s, self.router = selection, protocol, timeout_s, router
        self.models: dict[str, ServedModel] = {}
        self.rejections: list[str] = []
        self._lock = threading.Lock()

    def on_event(self, event: Event) -> None:
        if event.kind == "put":
            self.add(event.entry)
        else:
            self.remove(event.key)

    def add(self, entry: ModelEntry) -> None:
        card = entry.model_card()
        role = entry.role or "aggregated"
        with self._lock:
            model = self.models.get(entry.name)
            known = model.mdcsum_by_role.get(role) if model else None
        if known and known != card.mdcsum() and not (model and entry.key in model.roles):
            message = (f"rejected worker {entry.key}: it serves {entry.name!r} as {role} with mdcsum "
                       f"{card.mdcsum()[:12]}, but the frontend already serves it with {known[:12]}; "
                       f"the model files, name, block size or role config differ")
            log.error(message)
            self.rejections.append(message)
            return
        resolved = self.resolver.resolve(card)  # outside the lock: may fetch from the worker
        with self._lock:
            model = self.models.get(entry.name)
            if model is None:
                engine = self.router(entry.name, selection=self.selection, protocol=self.protocol,
                                     timeout_s=self.timeout_s, metrics=self.metrics)
                model = ServedModel(entry.name, engine, Preprocessor.load(resolved.card, self.resolver.cache_root))
                self.models[entry.name] = model
                if self.after_load:
                    self.after_load()
            model.mdcsum_by_role.setdefault(role, card.mdcsum())
            model.roles[entry.key] = role
            model.engine.add(Instance(entry.key, entry.url, role, card.kv_cache_block_size or 16,
                                      entry.extra.get("bootstrap_port")))
        log.info("serving %s: %s worker %s at %s", entry.name, role, entry.key, entry.url)

    def remove(self, key: str) -> None:
        with self._lock:
            for name, model in list(self.models.items()):
                if key in model.roles:
                    role = model.roles.pop(key)
                    model.engine.remove(key)
                    if role not in model.roles.values():
                        model.mdcsum_by_role.pop(role, None)  # a new worker of this role may differ
                    log.info("worker %s of %s is gone", key, name)
                    if not model.roles:
                        del self.models[name]
                        log.info("model %s has no worker left; removed", name)

    def get(self, name: str) -> ServedModel | None:
        with self._lock:
            model = self.models.get(name)
            return model if model and model.listed else None

    def served(self) -> list[tuple[str, ServedModel]]:
        """Every model with a worker, listed or not (a prefill alone still has requests open)."""
        with self._lock:
            return sorted(self.models.items())

    def listed(self) -> list[str]:
        with self._lock:
            return sorted(n for n, m in self.models.items() if m.listed)
