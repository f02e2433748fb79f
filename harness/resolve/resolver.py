"""Resolve a card into its local_dir (SPEC §2.2), leaving no partial state on any failure (§2.3).

Two phases keep failures clean: every file is fetched and verified into a hidden temp first; only
when all of them verify are they renamed into `blobs/` and linked from local_dir.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from harness.card import ModelCard, default_cache_root
from harness.errors import ChecksumMismatch
from harness.harvest import harvest, replace_symlink
from harness.resolve.blobs import BlobStore, Staged
from harness.resolve.fetch import fetch_into, hf_cache_dir, locate_hf_snapshot
from harness.resolve.rungs import PlannedFile, file_url_path, hf_parts, plan

log = logging.getLogger(__name__)


@dataclass
class Resolved:
    card: ModelCard  # with every checked file's path rewritten to local_dir/<name>
    local_dir: Path
    harvested: list[str] = field(default_factory=list)
    fetched: list[str] = field(default_factory=list)  # names whose blob was (re)written this time
    reused: list[str] = field(default_factory=list)


class Resolver:
    """The frontend side: the only writer of the metadata cache."""

    def __init__(self, cache_root: str | os.PathLike | None = None, model_path: str | os.PathLike | None = None,
                 hf_cache: str | os.PathLike | None = None):
        self.cache_root = Path(cache_root) if cache_root else default_cache_root()
        self.model_path = Path(model_path).absolute() if model_path else None
        self.hf_cache = Path(hf_cache) if hf_cache else None
        self.blobs = BlobStore(self.cache_root)

    def local_dir(self, card: ModelCard) -> Path:
        return card.local_dir(self.cache_root)

    def resolve(self, card: ModelCard) -> Resolved:
        items = plan(card, self.model_path)  # pass 1: any error aborts before a byte is written
        local_dir = self.local_dir(card)
        hf_snapshots = self._locate_hf_repos(items)  # pass 2
        self.blobs.sweep_orphans()
        result = Resolved(card, local_dir)
        self._store_blobs(items, hf_snapshots, result, local_dir)  # pass 3a: fetch + verify, then commit
        local_dir.mkdir(parents=True, exist_ok=True)
        for item in items:  # pass 3b: atomically (re)point each entry at its blob
            replace_symlink(local_dir / item.name, self.blobs.path(item.expected.hex))
        protected = {item.name for item in items}
        result.harvested = harvest(self._snapshot_dirs(items, hf_snapshots), local_dir, protected)  # pass 4
        result.card = card.with_paths({item.name: str(local_dir / item.name) for item in items})  # pass 5
        return result

    # ---- passes

    def _locate_hf_repos(self, items: list[PlannedFile]) -> dict[tuple[str, str | None], Path]:
        repos = {hf_parts(i.uri)[:2] for i in items if i.scheme == "hf"}
        cache = self.hf_cache or hf_cache_dir()
        return {(repo, rev): locate_hf_snapshot(repo, rev, cache) for repo, rev in sorted(repos, key=str)}

    def _store_blobs(self, items: list[PlannedFile], hf_snapshots, result: Resolved, local_dir: Path) -> None:
        staged: list[Staged] = []
        corrupt: list[str] = []
        created = [d for d in (self.cache_root, self.blobs.dir) if not d.exists()]
        try:
            for item in {i.expected.hex: i for i in items}.values():
                state = self.blobs.verifies(item.expected.hex)
                if state:
                    result.reused.append(item.name)
                    continue
                if state is False:
                    log.warning("cached blob %s no longer verifies; fetching %s again",
                                self.blobs.path(item.expected.hex), item.uri)
                    corrupt.append(item.expected.hex)
                staged.append(self._stage(item, hf_snapshots))
                result.fetched.append(item.name)
        except BaseException:
            for s in staged:
                s.tmp.unlink(missing_ok=True)
            for hexd in corrupt:  # a wrong blob must not survive a failed re-fetch, nor a link to it
                self.blobs.path(hexd).unlink(missing_ok=True)
                for item in items:
                    link = local_dir / item.name
                    if item.expected.hex == hexd and link.is_symlink():
                        link.unlink()
            for directory in reversed(created):  # a first resolve that fails leaves no empty cache behind
                try:
                    directory.rmdir()
                except OSError:
                    pass  # another resolver is using it
            raise
        for s in staged:
            self.blobs.commit(s)

    def _stage(self, item: PlannedFile, hf_snapshots) -> Staged:
        tmp = self.blobs.temp_for(item.expected.hex)
        try:
            # No fsync: a blob torn by a power cut fails re-verification on the next resolve
            # and is fetched again, so durability would cost time and buy nothing.
            actual = fetch_into(item, tmp, hf_snapshots)
            if actual != item.expected.hex:
                raise ChecksumMismatch(item.uri, item.expected.hex, actual)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return Staged(item.expected.hex, tmp)

    @staticmethod
    def _snapshot_dirs(items: list[PlannedFile], hf_snapshots) -> list[Path]:
        dirs: list[Path] = []
        for item in items:
            if item.scheme == "file":
                dirs.append(file_url_path(item.uri).parent)
            elif item.scheme == "hf":
                dirs.append(hf_snapshots[hf_parts(item.uri)[:2]])
        return list(dict.fromkeys(dirs))


def resolve_card(card: ModelCard, cache_root=None, model_path=None) -> Resolved:
    return Resolver(cache_root, model_path).resolve(card)

