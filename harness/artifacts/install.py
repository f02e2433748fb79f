"""Install an artifact into fresh cache roots, once per host (SPEC §6, regressions 8-10).

Order, so that a bad artifact leaves every cache root as it was:
1. under a file lock: done already (an `.installed` marker) -> nothing to do; an earlier attempt
   left an `.attempt` marker without finishing -> refuse, do not retry (every rank retrying a
   broken transfer in turn is regression 9);
2. fetch the manifest, check its sha256 against the id, check the source identity;
3. write the attempt marker, then fetch every chunk into a temp file outside the roots, checking
   each chunk's sha256 as it lands;
4. check every tar member: under a known label, relative, no `..`, a plain file or dir, sizes as
   the manifest says (regression 10: a tar that extracts outside its root);
5. extract into a staging dir beside each root, check every file's sha256, then move the files in;
6. write the installed marker.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import httpx
from filelock import FileLock

from harness.artifacts.manifest import (ArtifactError, ArtifactIdMismatch, ChunkMismatch, IdentityMismatch,
                                        PreviousInstallFailed, UnsafeMember, artifact_id, identity_differences,
                                        sha256_file)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Installed:
    artifact_id: str
    status: str  # "installed" | "already installed"
    files: int
    bytes: int


def markers(state_dir: Path, aid: str) -> tuple[Path, Path, Path]:
    return state_dir / f"{aid}.lock", state_dir / f"{aid}.attempt", state_dir / f"{aid}.installed"


def install(source: str, aid: str, targets: dict[str, Path], identity: dict | None, state_dir: Path,
            progress: Progress = lambda _: None, timeout_s: float = 300.0) -> Installed:
    """Install artifact `aid` from the artifact server at `source` into `targets` (label -> dir).
    `identity` is this host's; None accepts any artifact (the caller checked it some other way)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    lock, attempt, installed = markers(state_dir, aid)
    with FileLock(str(lock)):
        if installed.exists():
            done = json.loads(installed.read_text())
            return Installed(aid, "already installed", done["files"], done["bytes"])
        if attempt.exists():
            raise PreviousInstallFailed(
                f"an earlier install of artifact {aid[:16]} did not finish ({attempt}: "
                f"{attempt.read_text().strip()}); not retried, so that every rank does not repeat a failing "
                f"transfer. Remove the marker to try again")
        with httpx.Client(base_url=source.rstrip("/"), timeout=timeout_s) as client:
            manifest = fetch_manifest(client, aid)
            differences = identity_differences(manifest.get("identity") or {}, identity) if identity is not None else {}
            if differences:
                raise IdentityMismatch(aid, differences)
            unknown = sorted(set(manifest["roots"]) - set(targets))
            if unknown:
                raise ArtifactError(f"artifact {aid[:16]} carries roots {unknown} with no target given "
                                    f"(targets: {sorted(targets)})")
            attempt.write_text(json.dumps({"pid": os.getpid(), "started": time.time(), "source": source}) + "\n")
            with tempfile.TemporaryDirectory(prefix=f".{aid[:16]}-", dir=state_dir) as scratch:
                tar_path = Path(scratch) / "artifact.tar"
                fetch_chunks(client, aid, manifest, tar_path, progress)
                result = extract(aid, manifest, tar_path, targets)
        installed.write_text(json.dumps({"files": result.files, "bytes": result.bytes, "source": source}) + "\n")
        attempt.unlink()
        return result


def fetch_manifest(client: httpx.Client, aid: str) -> dict:
    resp = client.get(f"/v1/artifacts/{aid}/manifest")
    if resp.status_code != 200:
        raise ArtifactError(f"artifact {aid[:16]}: the source answered HTTP {resp.status_code} for its manifest: "
                            f"{resp.text[:200]}")
    try:
        manifest = json.loads(resp.content)
    except ValueError:
        raise ArtifactError(f"artifact {aid[:16]}: the manifest is not JSON") from None
    if artifact_id(manifest) != aid:
        raise ArtifactIdMismatch(f"artifact {aid[:16]}: the manifest's sha256 is {artifact_id(manifest)[:16]}, not "
                                 f"the id asked for; refusing it")
    return manifest


def fetch_chunks(client: httpx.Client, aid: str, manifest: dict, tar_path: Path, progress: Progress) -> None:
    import hashlib

    total = manifest["tar_size"]
    with open(tar_path, "wb") as out:
        for chunk in manifest["chunks"]:
            resp = client.get(f"/v1/artifacts/{aid}/chunks/{chunk['index']}")
            if resp.status_code != 200:
                raise ArtifactError(f"artifact {aid[:16]}: chunk {chunk['index']} gave HTTP {resp.status_code}")
            digest = hashlib.sha256(resp.content).hexdigest()
            if digest != chunk["sha256"] or len(resp.content) != chunk["size"]:
                raise ChunkMismatch(f"artifact {aid[:16]}: chunk {chunk['index']} (offset {chunk['offset']}, "
                                    f"{len(resp.content)} bytes) has sha256 {digest[:16]}, the manifest says "
                                    f"{chunk['sha256'][:16]}; nothing was installed")
            out.write(resp.content)
            progress(f"[artifact {aid[:12]}] {out.tell()} of {total} bytes")


def check_member(member: tarfile.TarInfo, labels: set[str]) -> PurePosixPath:
    path = PurePosixPath(member.name)
    if path.is_absolute() or member.name.startswith(("/", "\\")):
        raise UnsafeMember(f"tar member {member.name!r} is an absolute path")
    if ".." in path.parts:
        raise UnsafeMember(f"tar member {member.name!r} contains '..'")
    if member.issym() or member.islnk():
        raise UnsafeMember(f"tar member {member.name!r} is a link (to {member.linkname!r})")
    if not (member.isreg() or member.isdir()):
        raise UnsafeMember(f"tar member {member.name!r} is a device, fifo or other special file")
    if not path.parts or path.parts[0] not in labels:
        raise UnsafeMember(f"tar member {member.name!r} is outside the artifact's roots {sorted(labels)}")
    return path


def extract(aid: str, manifest: dict, tar_path: Path, targets: dict[str, Path]) -> Installed:
    expected = {f["path"]: f for f in manifest["files"]}
    labels = set(manifest["roots"])
    with tarfile.open(tar_path, "r:") as tar:
        members = tar.getmembers()
        for member in members:
            check_member(member, labels)
        found = {m.name: m for m in members if m.isreg()}
        if set(found) != set(expected):
            raise ArtifactError(f"artifact {aid[:16]}: the tar's files differ from the manifest's "
                                f"(extra {sorted(set(found) - set(expected))[:5]}, "
                                f"missing {sorted(set(expected) - set(found))[:5]})")
        stages = {}
        try:
            for label in manifest["roots"]:
                parent = targets[label].parent
                parent.mkdir(parents=True, exist_ok=True)
                stages[label] = Path(tempfile.mkdtemp(prefix=f".{targets[label].name}.staging-", dir=parent))
            for member in members:
                path = PurePosixPath(member.name)
                dest = stages[path.parts[0]].joinpath(*path.parts[1:])
                if member.isdir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
                os.utime(dest, (member.mtime, member.mtime))
                os.chmod(dest, member.mode & 0o755 | 0o600)
                if sha256_file(dest) != expected[member.name]["sha256"]:
                    raise ArtifactError(f"artifact {aid[:16]}: {member.name} does not match its manifest checksum")
            for label, stage in stages.items():
                move_into(stage, targets[label])
        finally:
            for stage in stages.values():
                shutil.rmtree(stage, ignore_errors=True)
    return Installed(aid, "installed", len(expected), sum(f["size"] for f in expected.values()))


def move_into(stage: Path, target: Path) -> None:
    """Move a verified staging tree into the target root (created if absent), file by file."""
    if not target.exists():
        os.replace(stage, target)
        stage.mkdir()  # the caller removes the (now empty) stage
        return
    for dirpath, _, filenames in os.walk(stage):
        rel = Path(dirpath).relative_to(stage)
        (target / rel).mkdir(parents=True, exist_ok=True)
        for name in filenames:
            os.replace(Path(dirpath) / name, target / rel / name)
