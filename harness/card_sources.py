"""Cards of a running deployment, read the way its frontend reads them.

A card reaches the suite as a file (`--card FILE`: a plain card, or a discovery record that wraps
it in `card_json`) or from the deployment's discovery store (`--discovery URL`). Dynamo 1.6.1's
file backend keeps each model record as a file under `<store>/v1/mdc/`, named by the
percent-encoded `{namespace}/{component}/{endpoint}/{instance hex}`; its content is
`{"type": "Model", "namespace", "component", "endpoint", "instance_id", "card_json": {...}}`.
A backend is a `RecordSource`; etcd plugs in beside the file one.

The serving mode is read off the card itself: self-host cards point at the worker's
`/v1/metadata/...` URLs and carry `extra_files`; hub cards use `hf://`; shared-storage cards hold
local paths.
"""

from __future__ import annotations

import abc
import json
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.card import ModelCard, is_url
from harness.errors import CardError

MDC_PREFIX = ("v1", "mdc")
MODES = ("self-host", "shared-storage", "hf-cache", "unknown")


@dataclass(frozen=True)
class CardRecord:
    """One card as the deployment published it, and where it was read from."""

    origin: str  # the file, or the store key, it came from
    card: ModelCard
    namespace: str | None = None
    component: str | None = None
    endpoint: str | None = None
    instance_id: str | None = None

    @property
    def instance_hex(self) -> str | None:
        if self.instance_id is None:
            return None
        return format(self.instance_id, "x") if isinstance(self.instance_id, int) else str(self.instance_id)


def card_from_json(obj: Any, origin: str) -> CardRecord:
    """A plain card, or a discovery record whose `card_json` is the card. Errors name the origin."""
    if isinstance(obj, dict) and "card_json" in obj:
        if not isinstance(obj["card_json"], dict):
            raise CardError(f"{origin}: a discovery record's 'card_json' must be a JSON object, "
                            f"got {type(obj['card_json']).__name__}")
        try:
            card = ModelCard.from_json(obj["card_json"])
        except CardError as exc:
            raise CardError(f"{origin}: its 'card_json' is not a card: {exc}") from None
        return CardRecord(origin, card, obj.get("namespace"), obj.get("component"), obj.get("endpoint"),
                          obj.get("instance_id"))
    try:
        return CardRecord(origin, ModelCard.from_json(obj))
    except CardError as exc:
        raise CardError(f"{origin}: expected a model card (an object with a string 'display_name') or a "
                        f"discovery record (an object with 'card_json'): {exc}") from None


def load_card_file(path: str | Path) -> CardRecord:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise CardError(f"--card {path}: cannot read it: {exc.strerror or exc}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CardError(f"--card {path}: not JSON ({exc})") from None
    return card_from_json(obj, str(path))


class RecordSource(abc.ABC):
    """A discovery store's model records."""

    url: str

    @abc.abstractmethod
    def records(self, namespace: str | None = None) -> list[CardRecord]:
        """Every model record (in `namespace`, when given), in a stable order."""


class FileRecords(RecordSource):
    """Dynamo's file discovery backend (`--discovery-backend file`, `DYN_FILE_KV=<dir>`)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.url = self.dir.as_uri()

    def records(self, namespace: str | None = None) -> list[CardRecord]:
        mdc = self.dir.joinpath(*MDC_PREFIX)
        if not mdc.is_dir():
            raise CardError(f"discovery store {self.url} has no {'/'.join(MDC_PREFIX)}/ directory: is it the "
                            f"DYN_FILE_KV directory of a running Dynamo deployment?")
        out = []
        for path in sorted(p for p in mdc.rglob("*") if p.is_file() and not p.name.startswith(".")):
            key = urllib.parse.unquote(path.relative_to(mdc).as_posix())
            try:
                obj = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise CardError(f"discovery record {path} (key {key}) is not JSON: {exc}") from None
            if isinstance(obj, dict) and obj.get("type") not in (None, "Model"):
                continue
            record = card_from_json(obj, f"{self.url} key {key}")
            record_ns = record.namespace or key.split("/", 1)[0]
            if namespace is None or record_ns == namespace:
                out.append(record)
        return out


class HarnessFileRecords(RecordSource):
    """The reference harness's own file store (`<dir>/<key>.json` entries, SPEC §3), read only:
    an expired entry is skipped here, never deleted (that is the frontend's business)."""

    def __init__(self, directory: str | Path, clock=time.time):
        self.dir, self.clock = Path(directory), clock
        self.url = self.dir.as_uri()

    def records(self, namespace: str | None = None) -> list[CardRecord]:
        out = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                obj = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise CardError(f"discovery entry {path} is not JSON: {exc}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("card"), dict):
                raise CardError(f"discovery entry {path} has no 'card' object: not a harness store entry")
            if obj.get("lease_expires_at", float("inf")) < self.clock():
                continue
            if namespace is None or str(obj.get("endpoint", "")).split("/", 1)[0] == namespace:
                out.append(card_from_json(obj["card"], f"{self.url} key {path.stem}"))
        return out


class EtcdRecords(RecordSource):
    """A running cluster's etcd, read only: Dynamo's `v1/mdc/{ns}/{comp}/{ep}/{instance hex}` records,
    and the harness's own entries (`<prefix>/v1/entries/`), as the frontend would see them."""

    def __init__(self, url: str):
        from harness.discovery import EtcdStore

        self.url = url
        self.store = EtcdStore(url)

    def records(self, namespace: str | None = None) -> list[CardRecord]:
        out = []
        mdc = "/".join(MDC_PREFIX) + "/"
        try:
            found = self.store.listing(mdc)
            harness_entries = self.store.entries()
        except Exception as exc:  # etcd3gw raises its own and requests' errors
            raise CardError(f"--discovery {self.url}: cannot read etcd: {type(exc).__name__}: {exc}") from None
        for key, value in found:
            try:
                obj = json.loads(value)
            except json.JSONDecodeError as exc:
                raise CardError(f"discovery record {key} in {self.url} is not JSON: {exc}") from None
            if isinstance(obj, dict) and obj.get("type") not in (None, "Model"):
                continue
            record = card_from_json(obj, f"{self.url} key {key}")
            if namespace is None or (record.namespace or key[len(mdc):].split("/", 1)[0]) == namespace:
                out.append(record)
        for key, entry in sorted(harness_entries.items()):
            if namespace is None or entry.endpoint.split("/", 1)[0] == namespace:
                out.append(card_from_json(entry.card, f"{self.url} key {self.store.prefix}{key}"))
        return out


def open_records(url: str) -> RecordSource:
    """Dynamo's file backend (a `v1/mdc/` tree), the harness's own store (`*.json` entries), or etcd."""
    if url.startswith("etcd://"):
        return EtcdRecords(url)
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        directory = Path(urllib.parse.unquote(parsed.path))
        if not directory.joinpath(*MDC_PREFIX).is_dir() and any(directory.glob("*.json")):
            return HarnessFileRecords(directory)
        return FileRecords(directory)
    raise CardError(f"--discovery {url}: unsupported store; use file://DIR (Dynamo's file backend, the "
                    f"DYN_FILE_KV directory, or the harness's own store) or etcd://HOST:PORT[/prefix]")


def serving_mode(card: ModelCard) -> str:
    """self-host, shared-storage or hf-cache, from the card's own paths (SPEC §2.5)."""
    paths = [f.path for _, f in card.checked_files()]
    if not paths:
        return "unknown"
    if all(is_url(p) and urllib.parse.urlparse(p).scheme in ("http", "https") and "/v1/metadata/" in p
           for p in paths):
        return "self-host"
    if all(p.startswith("hf://") for p in paths):
        return "hf-cache"
    if all(not is_url(p) or p.startswith("file://") for p in paths):
        return "shared-storage"
    return "unknown"


def source_dir(card: ModelCard) -> Path | None:
    """The model dir the card was built from, when it is visible from here."""
    if card.source_path and Path(card.source_path).is_dir():
        return Path(card.source_path)
    return None


def unique_labels(records: list[CardRecord]) -> list[str]:
    """A label per record, distinct even when two records share a name and role."""
    def base(r: CardRecord) -> str:
        if r.origin.endswith(".json") and r.namespace is None:
            return Path(r.origin).stem
        return f"{r.card.slug or 'unnamed'}-{r.card.role}"

    labels, seen = [], {}
    for r in records:
        label = base(r)
        seen[label] = seen.get(label, 0) + 1
        labels.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
    return labels
