"""Worker registration and discovery (SPEC §3): a store of model entries, with leases, and a watcher.

The embedded store is a directory of JSON files, one per entry, written by atomic rename. Each
entry carries a lease deadline; a live worker renews it, and a dead one stops renewing, so its
entry expires. `Store` is the interface; `EtcdStore` (keys under etcd leases, followed by etcd
watches on the prefix) plugs in behind it without the frontend noticing.
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
WATCH_IDLE_S = 5.0  # an etcd watch that sends nothing for this long is renewed (re-list, then watch again)

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

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """Where the store is, as `--store` and `--discovery` take it."""


class FileStore(Store):
    """The embedded default: `<dir>/<key>.json`, atomically replaced; expiry checked on read."""

    def __init__(self, directory: str | os.PathLike, clock: Callable[[], float] = time.time):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self._parsed: dict[str, tuple[tuple[int, int, int], ModelEntry]] = {}  # file name -> (stamp, entry)

    @property
    def url(self) -> str:
        return self.dir.as_uri()

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
        """Live entries. A file is parsed again only when it changed (every write replaces it, so
        its inode changes): the frontend polls this 10 times a second, in the process and under the
        GIL that relays every token, and parsing every card each time was 4% of its profile at C=64."""
        now, live, seen = self.clock(), {}, {}
        for path in sorted(self.dir.glob("*.json")):
            try:
                st = path.stat()
            except OSError:
                continue
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self._parsed.get(path.name)
            entry = cached[1] if cached is not None and cached[0] == stamp else self._read(path)
            if entry is None:
                continue
            seen[path.name] = (stamp, entry)
            if entry.lease_expires_at < now:
                log.info("lease of %s expired; removing it", entry.key)
                path.unlink(missing_ok=True)  # lease expiry is a delete, as in etcd
                seen.pop(path.name, None)
                continue
            live[entry.key] = entry
        self._parsed = seen
        return live


class EtcdStore(Store):
    """Entries in etcd, each under its own etcd lease (SPEC §3), through etcd's JSON gateway.

    `etcd://HOST:PORT[/prefix]`. A worker's entry is put under a lease of its own and kept alive by
    renewing it; a clean stop revokes it; a dead worker's lease expires in etcd, which deletes the
    key. `changes()` streams etcd's watch on the prefix, so a watcher re-lists on each change
    instead of polling.
    """

    def __init__(self, url: str):
        import urllib.parse

        import etcd3gw

        parsed = urllib.parse.urlparse(url)
        if parsed.scheme != "etcd" or not parsed.hostname or not parsed.port:
            raise ValueError(f"etcd store {url!r} must be etcd://HOST:PORT[/prefix]")
        self._url = url
        self.prefix = (parsed.path.strip("/") or "disagg") + "/v1/entries/"
        self.client = etcd3gw.client(host=parsed.hostname, port=parsed.port, timeout=5)
        self._leases: dict[str, Any] = {}

    @property
    def url(self) -> str:
        return self._url

    def listing(self, prefix: str) -> list[tuple[str, bytes]]:
        """Every live (key, value) under `prefix`, keys as text, in key order."""
        found = [(meta["key"].decode() if isinstance(meta["key"], bytes) else meta["key"], value)
                 for value, meta in self.client.get_prefix(prefix)]
        return sorted(found)

    def put(self, entry: ModelEntry, lease_s: float = DEFAULT_LEASE_S) -> None:
        lease = self.client.lease(ttl=max(2, int(round(lease_s))))
        self.client.put(self.prefix + entry.key, json.dumps(entry.to_json()), lease=lease)
        self._leases[entry.key] = lease

    def renew(self, key: str, lease_s: float = DEFAULT_LEASE_S) -> bool:
        lease = self._leases.get(key)
        return lease is not None and lease.refresh() > 0 and bool(self.client.get(self.prefix + key))

    def delete(self, key: str) -> None:
        import etcd3gw.exceptions

        lease = self._leases.pop(key, None)
        self.client.delete(self.prefix + key)
        if lease is not None:
            try:
                lease.revoke()
            except etcd3gw.exceptions.Etcd3Exception:  # it expired already: etcd deleted the key itself
                pass

    def entries(self) -> dict[str, ModelEntry]:
        live = {}
        for key, value in self.listing(self.prefix):
            try:
                live[key[len(self.prefix):]] = ModelEntry.from_json(json.loads(value))
            except (ValueError, TypeError) as exc:
                log.warning("skipping unreadable etcd entry %s: %s", key, exc)
        return live

    def changes(self, stop: threading.Event, idle_s: float = WATCH_IDLE_S):
        """Yield once when the watch is created (a change made after the caller's last list and
        before the watch existed is seen by the re-list this triggers), then once per watch event
        on the prefix. Return when the stream ends (etcd gone, the watch cancelled or compacted) or
        raise after `idle_s` without a byte, so the caller re-lists and watches again."""
        import base64

        import requests

        def b64(raw: bytes) -> str:
            return base64.b64encode(raw).decode()

        start = self.prefix.encode()
        end = start[:-1] + bytes([start[-1] + 1])
        # A read timeout: a watch opened while etcd was still starting can hang without ever
        # answering, and a stalled stream looks like a quiet one. After `idle_s` without a byte
        # the caller re-lists and watches again, which bounds how stale a view can get.
        resp = requests.post(self.client.get_url("/watch"), stream=True, timeout=(5, idle_s),
                             json={"create_request": {"key": b64(start), "range_end": b64(end)}})
        self._watch_response = resp
        try:
            for line in resp.iter_lines():
                if stop.is_set():
                    return
                if not line.strip():
                    continue
                result = json.loads(line).get("result") or {}
                if result.get("canceled") or result.get("compact_revision"):
                    return
                if result.get("created"):
                    yield 0  # the watch is live: re-list, for whatever changed between the last list and now
                elif result.get("events"):
                    yield len(result["events"])
        finally:
            resp.close()

    def close_watch(self) -> None:
        """End a watch blocked in another thread: shut its socket down (closing the response from
        here would wait for the reader's lock), so the reader sees the stream end."""
        import socket

        resp = getattr(self, "_watch_response", None)
        if resp is None:
            return
        try:
            sock = socket.fromfd(resp.raw._fp.fileno(), socket.AF_INET, socket.SOCK_STREAM)
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        except (OSError, AttributeError, ValueError):
            pass  # already closed


def open_store(url_or_dir: str | os.PathLike) -> Store:
    """`etcd://HOST:PORT[/prefix]` or a directory (the file store)."""
    if str(url_or_dir).startswith("etcd://"):
        return EtcdStore(str(url_or_dir))
    return FileStore(url_or_dir)


@dataclass
class Event:
    kind: str  # "put" | "delete"
    key: str
    entry: ModelEntry


class Watcher:
    """Follows a store and calls back with put and delete events, in a background thread: by etcd
    watch where the store has one, else by polling every `interval_s`.

    A view the store has failed to confirm for `stale_after_s` (one lease) is dropped: every entry
    gets a delete event and `unreachable()` says why. A worker may have died while the store was away,
    and its lease cannot expire where nobody can see it, so serving from that view would route to
    the dead. When the store answers again, the entries come back as puts.
    """

    def __init__(self, store: Store, on_event: Callable[[Event], None], interval_s: float = 0.1,
                 stale_after_s: float | None = None):
        self.store, self.on_event, self.interval_s = store, on_event, interval_s
        self.stale_after_s = stale_after_s
        # Re-list often enough that a quiet, healthy store confirms the view well within the bound.
        self.watch_idle_s = min(WATCH_IDLE_S, stale_after_s / 3) if stale_after_s else WATCH_IDLE_S
        self.max_backoff_s = min(2.0, stale_after_s / 4) if stale_after_s else 2.0
        self.confirmed_at = time.monotonic()
        self._failure: str | None = None  # the store's last error since it last answered
        self._known: dict[str, ModelEntry] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="discovery-watcher", daemon=True)

    def unreachable(self) -> str | None:
        """Why the view must not be served (the store, for how long, its last error), or None.

        Checked at request time as well as by the thread, so a view goes stale on time even while
        the thread waits on a store that does not answer. Only after the store has failed: a thread
        that was merely slow to run on a loaded host does not make the view stale."""
        age = time.monotonic() - self.confirmed_at
        if self._failure is None or self.stale_after_s is None or age <= self.stale_after_s:
            return None
        return (f"discovery store {self.store.url} has not answered for {age:.0f} s, longer than one lease "
                f"({self.stale_after_s:.0f} s; last error {self._failure}): its workers are not served until it does")

    def poll_once(self) -> list[Event]:
        current = self.store.entries()
        self.confirmed_at, self._failure = time.monotonic(), None
        return self._apply(current)

    def _apply(self, current: dict[str, ModelEntry]) -> list[Event]:
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

    def _store_failed(self, exc: Exception) -> None:
        """Keep the last view while it is younger than one lease; past that, drop it."""
        log.debug("discovery store %s failed: %s", self.store.url, exc)
        self._failure = f"{type(exc).__name__}: {str(exc)[:200]}"
        if self._known and (why := self.unreachable()):
            log.error("%s; dropping %d entries", why, len(self._known))
            self._apply({})

    def _run(self) -> None:
        if hasattr(self.store, "changes"):
            return self._run_watching()
        while not self._stop.wait(self.interval_s):
            try:
                self.poll_once()
            except Exception as exc:  # an unreadable store directory: same bound as an unreachable etcd
                self._store_failed(exc)

    def _run_watching(self) -> None:
        """Re-list on every watch event. When the watch ends (idle, etcd restarted, compaction),
        re-list and watch again; while the store does not answer, retry with backoff."""
        backoff = 0.2
        while not self._stop.is_set():
            try:
                for _ in self.store.changes(self._stop, idle_s=self.watch_idle_s):
                    self.poll_once()
            except Exception as exc:  # the watch timed out idle, or etcd is unreachable
                log.debug("discovery watch on %s ended: %s", self.store.url, exc)
                if self._stop.wait(0.05):  # no hot loop when watching fails at once but listing works
                    return
            while not self._stop.is_set():
                try:
                    self.poll_once()  # whatever changed while the watch was down
                    backoff = 0.2
                    break
                except Exception as exc:
                    self._store_failed(exc)
                    if self._stop.wait(backoff):
                        return
                    backoff = min(backoff * 2, self.max_backoff_s)

    def start(self) -> "Watcher":
        self.poll_once()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if hasattr(self.store, "close_watch"):
            self.store.close_watch()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
