"""The weight filter, the frontend's sibling harvest, and the worker's extra files (SPEC §2.4, §2.5).

Both sides use the same `is_weight_file`: a narrower worker-side filter once let `.pt` and `.gguf`
blobs ride into the metadata cache (SPEC §7, regression 2).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

# Extension exactly one of these (case-sensitive, last suffix only).
WEIGHT_EXTENSIONS = frozenset({"safetensors", "bin", "gguf", "onnx", "tflite", "h5", "pt", "pth", "msgpack"})

# Files the worker never lists as extra files (they are documentation, not metadata).
WORKER_EXCLUDED_NAMES = frozenset({"README.md"})


def is_weight_file(name: str) -> bool:
    """True for `model.safetensors`, `x.bin`, ...; False for `model.safetensors.index.json`."""
    _, dot, ext = name.rpartition(".")
    return bool(dot) and ext in WEIGHT_EXTENSIONS


def top_level_files(directory: Path) -> list[Path]:
    """Entries directly in `directory` (no recursion) that resolve to regular files, links followed."""
    try:
        entries = sorted(directory.iterdir())
    except FileNotFoundError:
        return []
    return [p for p in entries if p.is_file()]


def harvestable(directory: Path, protected: Iterable[str]) -> list[Path]:
    """What the frontend links from a snapshot dir: non-weight files whose names are not protected."""
    protected = set(protected)
    return [p for p in top_level_files(directory) if not is_weight_file(p.name) and p.name not in protected]


def worker_extra_files(model_dir: Path, typed_names: Iterable[str]) -> list[Path]:
    """Extra files a self-hosting worker publishes: non-weight, non-typed, no dotfiles, no README.md."""
    return [
        p
        for p in harvestable(model_dir, typed_names)
        if not p.name.startswith(".") and p.name not in WORKER_EXCLUDED_NAMES
    ]


def replace_symlink(link: Path, target: str | os.PathLike) -> None:
    """Atomically (re)point `link` at an absolute `target`: a temp symlink, then a rename.

    A link that already points there is left alone: same result, no write.
    """
    target = os.path.abspath(target)
    try:
        if os.readlink(link) == target:
            return
    except OSError:
        pass  # missing, or not a link: write it
    tmp = link.parent / f".{link.name}.{os.getpid()}.{os.urandom(4).hex()}.lnk"
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def harvest(snapshot_dirs: Iterable[Path], local_dir: Path, protected: Iterable[str]) -> list[str]:
    """Link every kept sibling of each snapshot dir into local_dir, at its canonical target.

    Re-links every time, so a snapshot whose content changed under the same mdcsum is picked up,
    and removes harvested links whose source is gone (SPEC §7, regression 3). Typed slots and
    extra files (`protected`) are never overwritten (regression 4). A missing dir is not an error.
    """
    protected = set(protected)
    linked: dict[str, Path] = {}
    for directory in snapshot_dirs:
        if not directory.is_dir():
            log.debug("harvest: snapshot dir %s is missing; nothing to harvest there", directory)
            continue
        for path in harvestable(directory, protected):
            linked.setdefault(path.name, path.resolve())
    for name, target in linked.items():
        replace_symlink(local_dir / name, target)
    for entry in local_dir.iterdir():
        in_flight = entry.name.startswith(".") and entry.name.endswith(".lnk")  # another resolver's temp link
        if entry.name in protected or entry.name in linked or in_flight:
            continue
        if entry.is_symlink():
            log.info("harvest: removing stale sibling %s (no longer in any snapshot)", entry)
            entry.unlink(missing_ok=True)
    return sorted(linked)
