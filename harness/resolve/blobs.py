"""The content-addressed blob store: `blobs/<hex>`, written only by atomic rename (SPEC §2.2)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from harness.card import hash_file

log = logging.getLogger(__name__)

PARTIAL_PREFIX = ".partial-"  # temp names are hidden, and carry the writer's pid for sweeping


@dataclass
class Staged:
    """A fully fetched and verified file waiting to be renamed into `blobs/<hex>`."""

    hex: str
    tmp: Path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BlobStore:
    def __init__(self, cache_root: Path):
        self.dir = Path(cache_root) / "blobs"

    def path(self, hexd: str) -> Path:
        return self.dir / hexd

    def verifies(self, hexd: str) -> bool | None:
        """None when absent, else whether the blob's bytes still hash to its name."""
        path = self.path(hexd)
        if not path.is_file():
            return None
        return hash_file(path) == hexd

    def temp_for(self, hexd: str) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        return self.dir / f"{PARTIAL_PREFIX}{hexd}.{os.getpid()}.{os.urandom(6).hex()}"

    def commit(self, staged: Staged) -> Path:
        final = self.path(staged.hex)
        os.replace(staged.tmp, final)  # atomic: readers see the old blob or the new one
        return final

    def sweep_orphans(self) -> list[Path]:
        """Delete temp files left by resolvers that died (SIGKILL mid-fetch)."""
        removed = []
        if not self.dir.is_dir():
            return removed
        for entry in self.dir.iterdir():
            if not entry.name.startswith(PARTIAL_PREFIX):
                continue
            try:
                pid = int(entry.name.split(".")[-2])
            except (ValueError, IndexError):
                continue
            if not pid_alive(pid):
                log.warning("removing %s left by a resolver (pid %d) that died mid-fetch", entry.name, pid)
                entry.unlink(missing_ok=True)
                removed.append(entry)
        return removed
