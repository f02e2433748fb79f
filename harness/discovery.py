"""Worker registration and discovery (SPEC §3): a store of model entries, with leases, and a watcher.

The embedded store is a directory of JSON files, one per entry, written by atomic rename. Each
entry carries a lease deadline; a live worker renews it, and a dead one stops renewing, so its
entry expires. `Store` is the interface; an etcd store (keys with etcd leases, watch on a prefix)
plugs in behind it without the frontend noticing.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness.card import ModelCard, slugify

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 10.0

# Dynamo's model types: a prefill worker registers as `Prefill` and has no OpenAI surface of its own.
MODEL_TYPE_FOR_ROLE = {"prefill": "Prefill", "decode": "Chat|Completions", "aggregated": "Chat|Completions",
                       None: "Chat|Completions"}


@dataclass
class ModelEntry:
    """What a worker registers: `{name, endpoint, model_type, card}`, plus how to reach its engine."""

    name: str
    endpoint: str  # namespace/component/endpoint
    model_type: str
    card: dict[str, Any]
    instance_id: str  # hex
    url: str  # the engine's OpenAI-compatible base URL
    role: str | None = None  # prefill | decode | aggregated
    lease_expires_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The slug of `namespace.component.endpoint-<instance hex>` (SPEC §3)."""
        return slugify(f"{self.endpoint.replace('/', '.')}-{self.instance_id}")

    def model_card(self) -> ModelCard:
        return ModelCard.from_json(self.card)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ModelEntry":
        return cls(**obj)


class Store(abc.ABC):
    """Where workers put their entries and the frontend watches them."""

    @abc.abstractmethod
    def put(self, entry: ModelEntry, lease_s: float = DEFAULT_LEASE_S) -> None: ...

    @abc.abstractmethod
    def renew(self, key: str, lease_s: float = DEFAULT_LEASE_S) -> bool:
        """Extend a lease; False when the entry is gone (it expired or was deleted)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None: ...

    @abc.abstractmethod
    def entries(self) -> dict[str, ModelEntry]:
        """Live entries by key; expired leases are not live."""


class FileStore(Store):
    """The embedded default: `<dir>/<key>.json`, atomically replaced; expiry checked on read."""

    def __init__(self, directory: str | os.PathLike, clock: Callable[[], float] = time.time):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.clock = clock

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def _write(self, entry: ModelEntry) -> None:
        tmp = self.dir / f".{entry.key}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_text(json.dumps(entry.to_json()))
        os.replace(tmp, self._path(entry.key))

    def put(self, entry: ModelEntry, lease_s: float = DEFAULT_LEASE_S) -> None:
        entry.lease_expires_at = self.clock() + lease_s
        self._write(entry)

    def renew(self, key: str, lease_s: float = DEFAULT_LEASE_S) -> bool:
        entry = self._read(self._path(key))
        if entry is None or entry.lease_expires_at < self.clock():
            return False
        entry.lease_expires_at = self.clock() + lease_s
        self._write(entry)
        return True

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    @staticmethod
    def _read(path: Path) -> ModelEntry | None:
        try:
            return ModelEntry.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            log.debug("skipping unreadable entry %s: %s", path, exc)
            return None

    def entries(self) -> dict[str, ModelEntry]:
        now, live = self.clock(), {}
        for path in sorted(self.dir.glob("*.json")):
            entry = self._read(path)
            if entry is None:
                continue
            if entry.lease_expires_at < now:
                log.info("lease of %s expired; removing it", entry.key)
                path.unlink(missing_ok=True)  # lease expiry is a delete, as in etcd
                continue
            live[entry.key] = entry
        return live


@dataclass
class Event:
    kind: str  # "put" | "delete"
    key: str
    entry: ModelEntry


class Watcher:
    """Polls a store and calls back with put and delete events, in a background thread."""

    def __init__(self, store: Store, on_event: Callable[[Event], None], interval_s: float = 0.1):
        self.store, self.on_event, self.interval_s = store, on_event, interval_s
        self._known: dict[str, ModelEntry] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="discovery-watcher", daemon=True)

    def poll_once(self) -> list[Event]:
        current = self.store.entries()
        events = [Event("delete", k, e) for k, e in self._known.items() if k not in current]
        events += [Event("put", k, e) for k, e in current.items()
                   if k not in self._known or self._known[k].card != e.card or self._known[k].url != e.url]
        self._known = current
        for event in events:
            try:
                self.on_event(event)
            except Exception:  # one bad entry must not stop discovery of the others
                log.exception("handling %s of %s failed", event.kind, event.key)
        return events

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll_once()

    def start(self) -> "Watcher":
        self.poll_once()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

