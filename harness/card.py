"""The model deployment card (SPEC §1): checked files, typed slots, slug, mdcsum, local_dir.

Pure data and path computation. The only I/O here is hashing a file's bytes.
"""

from __future__ import annotations

import enum
import json
import os
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote, urlsplit

import blake3

from harness.errors import CardError

CHECKSUM_ALGO = "blake3"
MULTITHREAD_HASH_THRESHOLD = 128 * 1024  # SPEC §1.2: files over 128 KiB hash on all cores
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SLUG_CHARS = re.compile(r"[a-z0-9_-]*")
URL_SCHEMES = ("file", "hf", "http", "https")

DEFAULT_CACHE_ROOT = Path("~/.cache/dynamo/mdc")


def default_cache_root() -> Path:
    """`$HOME/.cache/dynamo/mdc`, the layout Dynamo's frontend reads and writes (SPEC §1.5)."""
    return Path(os.path.expanduser(str(DEFAULT_CACHE_ROOT)))


# --------------------------------------------------------------------------- hashing


def blake3_hasher(expected_size: int | None = None) -> "blake3.blake3":
    threads = blake3.blake3.AUTO if (expected_size or 0) > MULTITHREAD_HASH_THRESHOLD else 1
    return blake3.blake3(max_threads=threads)


def hash_file(path: str | os.PathLike) -> str:
    """blake3 hex of a file's contents; large files are hashed with every core."""
    size = os.path.getsize(path)
    hasher = blake3_hasher(size)
    if size > MULTITHREAD_HASH_THRESHOLD:
        hasher.update_mmap(path)
    else:
        with open(path, "rb") as f:
            hasher.update(f.read())
    return hasher.hexdigest()


# --------------------------------------------------------------------------- checked file


@dataclass(frozen=True)
class Checksum:
    algo: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> "Checksum":
        """Exactly `blake3:<64 lowercase hex>`; the hex names a blob file, so nothing else passes."""
        if not isinstance(text, str) or text.count(":") != 1:
            raise CardError(f"checksum {text!r} is not of the form 'blake3:<hex>'")
        algo, hexpart = text.split(":")
        if algo != CHECKSUM_ALGO:
            raise CardError(f"checksum {text!r} uses algorithm {algo!r}; only 'blake3' is accepted")
        if not _HEX64.fullmatch(hexpart):
            raise CardError(f"checksum {text!r} must have exactly 64 lowercase hex digits")
        return cls(algo, hexpart)

    def __str__(self) -> str:
        return f"{self.algo}:{self.hex}"


def is_url(path: str) -> bool:
    """A path is a URL when it parses with one of the schemes a card may use (SPEC §1.2)."""
    scheme = urlsplit(path).scheme
    return scheme in URL_SCHEMES or (len(scheme) > 1 and "://" in path)


def entry_name(path: str) -> str:
    """The name an entry gets in local_dir: the last non-empty segment of its URI (SPEC §2.3).

    Rejects names that could write outside local_dir: empty, '.', '..', a separator or NUL.
    """
    raw = urlsplit(path).path if is_url(path) else path
    segments = [s for s in raw.split("/") if s]
    name = unquote(segments[-1]) if segments else ""
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise CardError(f"unsafe file name {name!r} in card path {path!r}: it would escape local_dir")
    return name


@dataclass(frozen=True)
class CheckedFile:
    """`{"path": P, "checksum": "blake3:<hex>", "size": N}` (SPEC §1.2)."""

    path: str
    checksum: Checksum
    size: int | None = None

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "CheckedFile":
        if not isinstance(obj, dict) or "path" not in obj or "checksum" not in obj:
            raise CardError(f"checked file {obj!r} needs 'path' and 'checksum'")
        size = obj.get("size")
        if size is not None and (not isinstance(size, int) or size < 0):
            raise CardError(f"checked file {obj['path']!r} has an invalid size {size!r}")
        return cls(str(obj["path"]), Checksum.parse(obj["checksum"]), size)

    @classmethod
    def of_local_file(cls, path: str | os.PathLike) -> "CheckedFile":
        return cls(str(path), Checksum(CHECKSUM_ALGO, hash_file(path)), os.path.getsize(path))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "checksum": str(self.checksum)}
        if self.size is not None:
            out["size"] = self.size
        return out

    @property
    def name(self) -> str:
        return entry_name(self.path)


# --------------------------------------------------------------------------- typed slots


@dataclass(frozen=True)
class Slot:
    """One typed slot: its card key, its tag, and the checked file behind it."""

    key: str
    tag: str
    file: CheckedFile
    is_custom: bool = False  # only for the `hf_chat_template` tag

    def to_json(self) -> dict[str, Any]:
        if self.tag == "hf_chat_template":
            return {self.tag: {"is_custom": self.is_custom, "file": self.file.to_json()}}
        return {self.tag: self.file.to_json()}

    @classmethod
    def from_json(cls, key: str, obj: dict[str, Any]) -> "Slot":
        if not isinstance(obj, dict) or len(obj) != 1:
            raise CardError(f"slot {key!r} must be an object with exactly one tag, got {obj!r}")
        (tag, body), = obj.items()
        if tag not in SLOT_TAGS[key]:
            raise CardError(f"slot {key!r} has unknown tag {tag!r} (expected one of {SLOT_TAGS[key]})")
        if tag == "hf_chat_template":
            return cls(key, tag, CheckedFile.from_json(body.get("file")), bool(body.get("is_custom", False)))
        return cls(key, tag, CheckedFile.from_json(body))

    def with_path(self, path: str) -> "Slot":
        return replace(self, file=replace(self.file, path=path))


# Canonical order (SPEC §1.1): it fixes both mdcsum and iteration everywhere else.
SLOT_TAGS: dict[str, tuple[str, ...]] = {
    "model_info": ("hf_config_json",),
    "tokenizer": ("hf_tokenizer_json", "tik_token_model"),
    "prompt_formatter": ("hf_tokenizer_config_json",),
    "chat_template_file": ("hf_chat_template", "hf_chat_template_json"),
    "gen_config": ("hf_generation_config_json",),
}
SLOT_KEYS = tuple(SLOT_TAGS)


class WorkerType(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    ENCODE = "encode"
    AGGREGATED = "aggregated"

    @property
    def code(self) -> int:
        return _WORKER_CODES[self]


_WORKER_CODES = {WorkerType.PREFILL: 1, WorkerType.DECODE: 2, WorkerType.ENCODE: 3, WorkerType.AGGREGATED: 4}


def worker_type_code(wt: WorkerType | None) -> int:
    return 0 if wt is None else wt.code


# --------------------------------------------------------------------------- slug


def slugify(name: str) -> str:
    """SPEC §1.3: lowercase, map outside [a-z0-9_-] to '_', strip leading '_'. No hash, no collapsing."""
    lowered = name.lower()
    mapped = "".join(c if (c.isascii() and (c.isalnum() or c in "-_")) else "_" for c in lowered)
    return mapped.lstrip("_")


def parse_slug(text: str) -> str:
    if not isinstance(text, str) or not _SLUG_CHARS.fullmatch(text):
        raise CardError(f"slug {text!r} holds characters outside [a-z0-9_-]")
    return text


# --------------------------------------------------------------------------- card


@dataclass(frozen=True)
class ModelCard:
    display_name: str
    slug: str = ""
    source_path: str | None = None
    slots: tuple[Slot, ...] = ()
    extra_files: tuple[CheckedFile, ...] = ()
    context_length: int = 0  # the effective context length (runtime, else architectural max, else 0)
    kv_cache_block_size: int = 0
    worker_type: WorkerType | None = None
    needs: tuple[tuple[WorkerType, ...], ...] = ()
    router_config: Any = None
    aliases: tuple[str, ...] = ()

    @classmethod
    def new(cls, display_name: str, **kw: Any) -> "ModelCard":
        """A card whose slug is derived from its name."""
        return cls(display_name=display_name, slug=slugify(display_name), **kw)

    # ---- access

    @property
    def role(self) -> str:
        """The worker's role as the card states it; a card without one is an aggregated worker's."""
        return self.worker_type.value if self.worker_type else "aggregated"

    def slot(self, key: str) -> Slot | None:
        return next((s for s in self.slots if s.key == key), None)

    def checked_files(self) -> Iterator[tuple[str, CheckedFile]]:
        """Every checked file in canonical order: typed slots, then extra files."""
        by_key = {s.key: s for s in self.slots}
        for key in SLOT_KEYS:
            if key in by_key:
                yield key, by_key[key].file
        for extra in self.extra_files:
            yield "extra_files", extra

    def typed_names(self) -> set[str]:
        return {s.file.name for s in self.slots}

    # ---- identity

    def mdcsum(self) -> str:
        """blake3 over the hashed fields in SPEC §1.4 order; equal to Dynamo's for the same card."""
        h = blake3.blake3()
        h.update(self.display_name.encode())
        if self.source_path is not None:
            h.update(self.source_path.encode())
        by_key = {s.key: s for s in self.slots}
        for key in SLOT_KEYS:
            if key in by_key:
                h.update(str(by_key[key].file.checksum).encode())
        for name, hexd in sorted((e.name, e.checksum.hex) for e in self.extra_files):
            h.update(name.encode() + b"\x00" + hexd.encode())
        h.update(struct.pack(">I", self.context_length))
        h.update(struct.pack(">I", self.kv_cache_block_size))
        h.update(bytes([worker_type_code(self.worker_type)]))
        h.update(struct.pack(">I", len(self.needs)))
        for alternative in self.needs:
            h.update(struct.pack(">I", len(alternative)))
            h.update(bytes(worker_type_code(w) for w in alternative))
        if self.router_config is not None:
            # serde_json's compact form: no spaces, keys in the order given
            router_json = json.dumps(self.router_config, separators=(",", ":"))
            h.update(blake3.blake3(router_json.encode()).digest())
        if self.aliases:
            h.update(struct.pack(">I", len(self.aliases)))
            for alias in self.aliases:
                h.update(struct.pack(">I", len(alias.encode())) + alias.encode())
        return h.hexdigest()

    def local_dir(self, cache_root: str | os.PathLike) -> Path:
        """`<root>/by-slug/<slug>/<mdcsum>/`. Pure path computation: creates nothing (SPEC §1.5)."""
        parse_slug(self.slug)
        root = Path(cache_root)
        if self.slug:
            return root / "by-slug" / self.slug / self.mdcsum()
        return root / "by-slug" / self.mdcsum()  # an empty name collapses the slug level

    # ---- JSON

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"display_name": self.display_name, "slug": self.slug}
        if self.source_path is not None:
            out["source_path"] = self.source_path
        by_key = {s.key: s for s in self.slots}
        for key in SLOT_KEYS:
            if key in by_key:
                out[key] = by_key[key].to_json()
        out["extra_files"] = [e.to_json() for e in self.extra_files]
        out["context_length"] = self.context_length
        out["kv_cache_block_size"] = self.kv_cache_block_size
        out["worker_type"] = self.worker_type.value if self.worker_type else None
        out["needs"] = [[w.value for w in alt] for alt in self.needs]
        if self.router_config is not None:
            out["router_config"] = self.router_config
        if self.aliases:
            out["aliases"] = list(self.aliases)
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ModelCard":
        if not isinstance(obj, dict) or not isinstance(obj.get("display_name"), str):
            raise CardError("a card must be a JSON object with a string 'display_name'")
        try:
            worker_type = WorkerType(obj["worker_type"]) if obj.get("worker_type") else None
            needs = tuple(tuple(WorkerType(w) for w in alt) for alt in obj.get("needs") or ())
        except ValueError as exc:
            raise CardError(f"card {obj['display_name']!r}: {exc}") from None
        slots = tuple(Slot.from_json(key, obj[key]) for key in SLOT_KEYS if obj.get(key) is not None)
        return cls(
            display_name=obj["display_name"],
            slug=parse_slug(obj.get("slug", slugify(obj["display_name"]))),
            source_path=obj.get("source_path"),
            slots=slots,
            extra_files=tuple(CheckedFile.from_json(e) for e in obj.get("extra_files") or ()),
            context_length=int(obj.get("context_length") or 0),
            kv_cache_block_size=int(obj.get("kv_cache_block_size") or 0),
            worker_type=worker_type,
            needs=needs,
            router_config=obj.get("router_config"),
            aliases=tuple(obj.get("aliases") or ()),
        )

    @classmethod
    def loads(cls, text: str) -> "ModelCard":
        try:
            return cls.from_json(json.loads(text))
        except json.JSONDecodeError as exc:
            raise CardError(f"card is not valid JSON: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelCard":
        return cls.loads(Path(path).read_text())

    def with_paths(self, path_of: "dict[str, str]") -> "ModelCard":
        """A copy whose checked files point at `path_of[name]` (used to rewrite into local_dir)."""
        return replace(
            self,
            slots=tuple(s.with_path(path_of[s.file.name]) for s in self.slots),
            extra_files=tuple(replace(e, path=path_of[e.name]) for e in self.extra_files),
        )


__all__ = [
    "Checksum", "CheckedFile", "Slot", "SLOT_KEYS", "SLOT_TAGS", "WorkerType", "ModelCard",
    "slugify", "parse_slug", "entry_name", "is_url", "hash_file", "default_cache_root",
]
