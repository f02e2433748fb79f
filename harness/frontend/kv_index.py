"""KV-aware worker selection (SPEC §4.3): chained block hashes and leading-block overlap.

Only full blocks are hashed, as engines cache only full blocks. A block that holds an image's
placeholder tokens mixes in the image's content hash, so the same image gives the same blocks
and a different image behind the same text does not.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterable, Sequence

import blake3


def block_hashes(token_ids: Sequence[int], block_size: int,
                 media: Iterable[tuple[int, int, bytes]] = ()) -> list[str]:
    """Hash each full block chained with its parent. `media` is (start, end, content hash) spans."""
    spans = list(media)
    hashes: list[str] = []
    parent = b""
    for start in range(0, len(token_ids) - len(token_ids) % block_size, block_size):
        end = start + block_size
        h = blake3.blake3(parent)
        h.update(b"".join(int(t).to_bytes(4, "little", signed=False) for t in token_ids[start:end]))
        for span_start, span_end, content in spans:
            if span_start < end and span_end > start:  # the block holds some of this image's placeholders
                h.update(b"\x00media\x00" + content)
        digest = h.digest()
        hashes.append(digest.hex())
        parent = digest
    return hashes


class KvIndex:
    """Which blocks each worker has seen (bounded per worker), to score prefix overlap."""

    def __init__(self, max_blocks_per_worker: int = 65536):
        self._seen: dict[str, OrderedDict[str, None]] = {}
        self._max = max_blocks_per_worker
        self._lock = threading.Lock()

    def overlap(self, worker: str, hashes: Sequence[str]) -> int:
        """How many leading blocks of `hashes` the worker already holds."""
        with self._lock:
            seen = self._seen.get(worker, {})
            count = 0
            for h in hashes:
                if h not in seen:
                    break
                count += 1
            return count

    def record(self, worker: str, hashes: Sequence[str]) -> None:
        with self._lock:
            seen = self._seen.setdefault(worker, OrderedDict())
            for h in hashes:
                seen[h] = None
                seen.move_to_end(h)
            while len(seen) > self._max:
                seen.popitem(last=False)

    def forget(self, worker: str) -> None:
        with self._lock:
            self._seen.pop(worker, None)

    def held(self, worker: str) -> int:
        with self._lock:
            return len(self._seen.get(worker, ()))

    def best(self, workers: Sequence[str], hashes: Sequence[str], load: dict[str, int]) -> str:
        """Most leading blocks first; then the least loaded; then the one holding fewest blocks (so
        new prefixes spread over the workers, as a KV router weighs cache usage); then the order given."""
        return max(workers, key=lambda w: (self.overlap(w, hashes), -load.get(w, 0), -self.held(w), -workers.index(w)))
