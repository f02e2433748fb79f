"""Fetchers: copy one URI's bytes into an open temp file, enforcing the size cap as they go."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import requests
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from harness.card import blake3_hasher, hash_file
from harness.errors import FetchError, FileTooLarge, HttpStatusError, NotInHfCache
from harness.resolve.rungs import PlannedFile, file_url_path, hf_parts

HTTP_CHUNK = 256 << 10  # network reads: small, so the cap is enforced while the body streams
HTTP_TIMEOUT = (5.0, 60.0)  # (connect, read) seconds: bounded, SPEC §2.3

Sink = Callable[[bytes], None]


def hf_cache_dir() -> Path:
    """The hub cache as huggingface_hub resolves it, read at call time (tests move HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(hf_home) / "hub"


def locate_hf_snapshot(repo: str, revision: str | None, cache_dir: Path | None = None) -> Path:
    """The snapshot dir of an hf:// repo in the local cache, through huggingface_hub, offline."""
    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir or hf_cache_dir(),
                                      local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError) as exc:
        raise NotInHfCache(repo, revision, type(exc).__name__) from None


def source_path(item: PlannedFile, hf_snapshots: dict[tuple[str, str | None], Path]) -> Path | None:
    """The local file behind a file:// or hf:// URI; None for http(s)."""
    if item.scheme == "file":
        return file_url_path(item.uri)
    if item.scheme == "hf":
        repo, rev, filename = hf_parts(item.uri)
        path = hf_snapshots[(repo, rev)] / filename
        if not path.is_file():
            raise NotInHfCache(repo, rev, f"{filename} is not in the cached snapshot {path.parent}")
        return path
    return None


def copy_local(path: Path, dest: Path, uri: str, cap: int) -> int:
    """Copy a local file in the kernel (sendfile/copy_file_range); the caller hashes the copy.

    Hashing the copy, not the source, verifies exactly the bytes that will be published.
    """
    try:
        size = path.stat().st_size
        if size > cap:
            raise FileTooLarge(uri, size, cap, "on disk")
        shutil.copyfile(path, dest)
        copied = dest.stat().st_size
    except OSError as exc:
        raise FetchError(f"cannot read {uri}: {exc}") from None
    if copied > cap:
        raise FileTooLarge(uri, copied, cap, "grew while it was copied")
    return copied


def copy_http(uri: str, cap: int, sink: Sink, session: requests.Session | None = None) -> int:
    http = session or requests
    try:
        with http.get(uri, stream=True, timeout=HTTP_TIMEOUT) as resp:
            if not 200 <= resp.status_code < 300:
                raise HttpStatusError(uri, resp.status_code)
            declared = resp.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > cap:
                raise FileTooLarge(uri, int(declared), cap, "Content-Length, before reading")
            total = 0
            for chunk in resp.iter_content(HTTP_CHUNK):
                total += len(chunk)
                if total > cap:
                    raise FileTooLarge(uri, None, cap, "the body streamed past the cap")
                sink(chunk)
            return total
    except requests.RequestException as exc:
        raise FetchError(f"fetching {uri} failed: {type(exc).__name__}: {exc}") from None


def fetch_into(item: PlannedFile, dest: Path, hf_snapshots) -> str:
    """Write `item`'s bytes to the new file `dest` and return their blake3 hex.

    Raises before reading, or as soon as the cap is passed, for anything too large.
    """
    local = source_path(item, hf_snapshots)
    if local is not None:
        copy_local(local, dest, item.uri, item.cap)
        return hash_file(dest)
    hasher = blake3_hasher(item.cap)
    with open(dest, "xb") as out:

        def sink(chunk: bytes) -> None:
            out.write(chunk)
            hasher.update(chunk)

        copy_http(item.uri, item.cap, sink)
    return hasher.hexdigest()
