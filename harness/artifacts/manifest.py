"""What an artifact is (SPEC §6): a tar of named cache roots, chunked, each chunk and file checksummed.

The artifact id is sha256 over the manifest's canonical JSON, so the id names the exact bytes: a
target that fetched the manifest by id can check it before it trusts a single chunk.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

FORMAT = 1
DEFAULT_CHUNK = 64 * 1024 * 1024


class ArtifactError(HarnessError):
    """An artifact was refused or failed to install; nothing was extracted into a cache root."""


class ArtifactIdMismatch(ArtifactError):
    pass


class ChunkMismatch(ArtifactError):
    pass


class UnsafeMember(ArtifactError):
    pass


class IdentityMismatch(ArtifactError):
    """The artifact was built for another model, engine or machine; reusing it would be wrong."""

    def __init__(self, artifact_id: str, differences: dict[str, tuple[Any, Any]]):
        self.differences = differences
        what = "; ".join(f"{k}: artifact {a!r}, here {b!r}" for k, (a, b) in sorted(differences.items()))
        super().__init__(f"artifact {artifact_id[:16]} does not match this host, so it is not installed: {what}")


class PreviousInstallFailed(ArtifactError):
    pass


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def artifact_id(manifest: dict) -> str:
    return hashlib.sha256(canonical(manifest)).hexdigest()


def sha256_file(path: Path, offset: int = 0, size: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = size
        while left is None or left > 0:
            block = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
    return h.hexdigest()


def chunks_of(tar_path: Path, chunk_size: int) -> list[dict]:
    size = tar_path.stat().st_size
    return [{"index": i, "offset": off, "size": min(chunk_size, size - off),
             "sha256": sha256_file(tar_path, off, min(chunk_size, size - off))}
            for i, off in enumerate(range(0, size, chunk_size))]


@dataclass(frozen=True)
class Artifact:
    id: str
    manifest: dict
    tar_path: Path

    @property
    def manifest_path(self) -> Path:
        return self.tar_path.with_suffix(".json")


def identity_differences(theirs: dict, ours: dict) -> dict[str, tuple[Any, Any]]:
    """Every identity key either side states, where the two disagree."""
    return {k: (theirs.get(k), ours.get(k)) for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)}
