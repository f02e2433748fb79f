"""Pack cache roots into an artifact: an uncompressed tar plus its manifest (SPEC §6).

Each root is carried under its label (`vllm/torch_compile_cache/...`, `inductor/...`), so one
artifact holds the whole reuse set of a profile and the target maps labels to its own paths.
A symlink, device or socket in a root is refused: the target could not take it safely, and a
cache that needs one is not a cache this tool can move.
"""

from __future__ import annotations

import os
import stat
import tarfile
import tempfile
from pathlib import Path

from harness.artifacts.manifest import (DEFAULT_CHUNK, FORMAT, Artifact, ArtifactError, artifact_id, canonical,
                                        chunks_of, sha256_file)


def walk(label: str, root: Path) -> list[tuple[str, Path, os.stat_result]]:
    """(member name, path, lstat) of every dir and file under root, sorted; refuses anything else."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            path = Path(dirpath) / name
            st = path.lstat()
            if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                raise ArtifactError(f"cannot pack {path}: it is {kind}; an artifact carries only files and dirs")
            out.append((f"{label}/{path.relative_to(root).as_posix()}", path, st))
    return sorted(out, key=lambda t: t[0])


def pack(roots: dict[str, Path], out_dir: Path, identity: dict, chunk_size: int = DEFAULT_CHUNK) -> Artifact:
    """Tar every root under its label, chunk it, write `<id>.tar` and `<id>.json` into out_dir."""
    for label, root in roots.items():
        if not label or "/" in label or label in (".", ".."):
            raise ArtifactError(f"root label {label!r} must be a plain name")
        if not Path(root).is_dir():
            raise ArtifactError(f"cannot pack root {label}={root}: not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".packing-", suffix=".tar", dir=out_dir)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        files = []
        with tarfile.open(tmp_path, "w", format=tarfile.PAX_FORMAT) as tar:
            for label, root in sorted(roots.items()):
                tar.addfile(_info(label, os.stat(root), directory=True))
                for member, path, st in walk(label, Path(root)):
                    if stat.S_ISDIR(st.st_mode):
                        tar.addfile(_info(member, st, directory=True))
                        continue
                    with open(path, "rb") as f:
                        tar.addfile(_info(member, st), f)
                    files.append({"path": member, "size": st.st_size, "sha256": sha256_file(path)})
        manifest = {"format": FORMAT, "identity": identity, "roots": sorted(roots), "chunk_size": chunk_size,
                    "tar_size": tmp_path.stat().st_size, "files": files, "chunks": chunks_of(tmp_path, chunk_size)}
        aid = artifact_id(manifest)
        tar_path = out_dir / f"{aid}.tar"
        os.replace(tmp_path, tar_path)
        artifact = Artifact(aid, manifest, tar_path)
        artifact.manifest_path.write_bytes(canonical(manifest))
        return artifact
    finally:
        tmp_path.unlink(missing_ok=True)


def _info(name: str, st: os.stat_result, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else (st.st_mode & 0o777)
    info.size = 0 if directory else st.st_size
    info.mtime = int(st.st_mtime)  # kept: some caches compare them
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info
