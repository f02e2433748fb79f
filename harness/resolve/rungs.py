"""The URI ladder (SPEC §2.1): where the frontend fetches each checked file from."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from harness.card import Checksum, CheckedFile, ModelCard, is_url
from harness.errors import CardError, MissingCustomTemplate, UnsupportedScheme

MAX_FILE_BYTES = 1 << 30  # SPEC §2.3: the cap is min(declared size, 1 GiB)


@dataclass(frozen=True)
class PlannedFile:
    """One file of a card with everything decided before any byte is written."""

    key: str  # the slot key, or "extra_files"
    name: str  # its entry name in local_dir
    uri: str
    expected: Checksum
    cap: int

    @property
    def scheme(self) -> str:
        return urlsplit(self.uri).scheme


def file_url_path(uri: str) -> Path:
    return Path(unquote(urlsplit(uri).path))


def hf_parts(uri: str) -> tuple[str, str | None, str]:
    """`hf://org/name[@rev]/file` -> (repo, revision, filename)."""
    rest = uri[len("hf://"):]
    repo_rev, _, filename = rest.rstrip("/").rpartition("/")
    repo, _, rev = repo_rev.partition("@")
    return repo, (rev or None), unquote(filename)


def size_cap(declared: int | None) -> int:
    return MAX_FILE_BYTES if declared is None else min(declared, MAX_FILE_BYTES)


def rung_uri(file: CheckedFile, card: ModelCard, model_path: Path | None, is_custom_template: bool) -> str:
    """Rungs 1-4 for one file. Raises for an unsupported scheme or a missing custom template."""
    path = file.path
    if is_url(path):
        scheme = urlsplit(path).scheme
        if scheme in ("http", "https", "hf"):
            return path  # rung 1: remote URLs pass through unchanged
        if scheme != "file":
            raise UnsupportedScheme(path, scheme)
        uri = path
    else:
        uri = Path(os.path.abspath(path)).as_uri()  # rung 1: a plain path becomes file://
    if file_url_path(uri).is_file():
        return uri  # rung 2: the file exists on this host
    overlay = model_path / file.name if model_path else None
    if overlay is not None and overlay.is_file():
        return overlay.absolute().as_uri()  # rung 3: the frontend's model path
    if is_custom_template:
        raise MissingCustomTemplate(str(file_url_path(uri)))  # rung 4: no hub copy of a custom file
    repo = card.source_path or card.display_name
    return f"hf://{repo}/{file.name}"  # rung 4: the hub, i.e. the local HF cache when offline


def plan(card: ModelCard, model_path: Path | None) -> list[PlannedFile]:
    """Pass 1: every URI and entry name, validated before anything touches the disk."""
    card.local_dir("/")  # validates the slug
    planned: list[PlannedFile] = []
    seen: dict[str, str] = {}
    for key, file in card.checked_files():
        custom = key == "chat_template_file" and any(s.key == key and s.is_custom for s in card.slots)
        name = file.name  # raises CardError for '..', '/', NUL, empty
        if name in seen and seen[name] != file.checksum.hex:
            raise CardError(f"card {card.display_name!r} lists two different files named {name!r}")
        seen[name] = file.checksum.hex
        uri = rung_uri(file, card, model_path, custom)
        planned.append(PlannedFile(key, name, uri, file.checksum, size_cap(file.size)))
    return planned
