"""Failure modes (SPEC §2.3): each ends in a clear error, and the cache is left as it was.

Every test first fills the cache with an unrelated good card, takes a picture of the whole tree,
makes the resolve fail, and compares the picture: no temp file, no wrong blob, no dangling link.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures.cache_state import tree_state
from fixtures.fault_server import FaultServer
from fixtures.multimodal import make_multimodal_model
from fixtures.text_model import make_text_model
from harness.card import CheckedFile, Checksum, ModelCard, hash_file
from harness.errors import (CardError, ChecksumMismatch, FileTooLarge, HttpStatusError, MissingCustomTemplate,
                            UnsupportedScheme)
from harness.resolve import Resolver
from harness.resolve.blobs import PARTIAL_PREFIX
from harness.resolve.rungs import MAX_FILE_BYTES
from harness.worker.card_builder import build_card
from harness.worker.metadata_server import MetadataServer

pytestmark = [pytest.mark.spec("2.3"), pytest.mark.harness_code]
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path) -> Path:
    """A cache that already holds a good, unrelated card."""
    root = tmp_path / "mdc"
    Resolver(root).resolve(build_card(make_multimodal_model(tmp_path / "other"), "other/model"))
    return root


@pytest.fixture
def model(tmp_path) -> Path:
    return make_text_model(tmp_path / "model")


def single_file_card(name: str, path: str, body: bytes | None = None, size: int | None = None, hexd=None):
    checksum = Checksum("blake3", hexd or hash_file_bytes(body or b""))
    return ModelCard.new("acme/one-file", extra_files=(CheckedFile(path, checksum, size),))


def hash_file_bytes(data: bytes) -> str:
    import blake3

    return blake3.blake3(data).hexdigest()


def assert_fails_cleanly(cache: Path, card: ModelCard, error: type, match: str, **resolver_kw):
    before = tree_state(cache)
    with pytest.raises(error, match=match) as info:
        Resolver(cache, **resolver_kw).resolve(card)
    assert tree_state(cache) == before, "the failed resolve changed the cache"
    return info.value


@pytest.mark.spec("2.2")
def test_a_checksum_mismatch_names_the_uri_and_both_hashes_and_publishes_nothing(cache, model):
    card = build_card(model, "acme/Tiny-Llama")
    slot = card.slot("prompt_formatter")  # the third file: the first two were already staged
    wrong = "0" * 64
    card = dataclasses.replace(card, slots=tuple(
        dataclasses.replace(s, file=dataclasses.replace(s.file, checksum=Checksum("blake3", wrong)))
        if s is slot else s for s in card.slots))
    err = assert_fails_cleanly(cache, card, ChecksumMismatch, "checksum mismatch")
    assert "tokenizer_config.json" in str(err) and wrong in str(err)
    assert hash_file(model / "tokenizer_config.json") in str(err)


def test_a_file_larger_than_its_declared_size_fails_before_reading(cache, model):
    path = model / "config.json"
    card = single_file_card("config.json", str(path), path.read_bytes(), size=10)
    assert_fails_cleanly(cache, card, FileTooLarge, r"too large \(on disk\).*cap of 10 bytes")


def test_a_file_over_one_gib_is_refused_whatever_it_declares(cache, tmp_path):
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:  # sparse: costs no disk
        f.truncate(MAX_FILE_BYTES + 1)
    card = single_file_card("huge.json", str(huge), hexd="a" * 64, size=None)
    assert_fails_cleanly(cache, card, FileTooLarge, f"cap of {MAX_FILE_BYTES} bytes")


@pytest.fixture
def fault_server():
    with FaultServer() as server:
        yield server


BODY = b'{"hello": "world"}\n' * 50


def test_a_content_length_over_the_cap_fails_before_reading(cache, fault_server):
    fault_server.files["big.json"] = BODY
    card = single_file_card("big.json", f"{fault_server.url}/claims/{10**12}/big.json", BODY, size=len(BODY))
    assert_fails_cleanly(cache, card, FileTooLarge, "Content-Length, before reading")


def test_a_body_that_streams_past_the_cap_fails_as_it_streams(cache, fault_server):
    fault_server.files["big.json"] = BODY
    card = single_file_card("big.json", f"{fault_server.url}/chunked/big.json", BODY, size=len(BODY) // 2)
    assert_fails_cleanly(cache, card, FileTooLarge, "streamed past the cap")


def test_a_content_length_that_understates_the_body_is_caught_by_the_checksum(cache, fault_server):
    fault_server.files["big.json"] = BODY
    card = single_file_card("big.json", f"{fault_server.url}/claims/10/big.json", BODY, size=len(BODY))
    assert_fails_cleanly(cache, card, ChecksumMismatch, "big.json")


@pytest.mark.spec("2.5")
def test_http_404_from_the_worker_names_the_status(cache, model):
    with MetadataServer() as worker:
        card = worker.publish(model, "acme/Tiny-Llama")
        worker.registry._files.clear()  # the worker forgot its files
        err = assert_fails_cleanly(cache, card, HttpStatusError, "HTTP 404")
    assert err.status == 404


@pytest.mark.spec("2.5")
def test_http_500_from_the_worker_names_the_status(cache, model):
    with MetadataServer() as worker:
        card = worker.publish(model, "acme/Tiny-Llama")
        (model / "config.json").unlink()
        (model / "config.json").mkdir()  # reading it now fails on the worker: 500
        err = assert_fails_cleanly(cache, card, HttpStatusError, "HTTP 500")
    assert err.status == 500


@pytest.mark.parametrize("uri", ["s3://bucket/config.json", "ftp://host/config.json", "gs://b/config.json"])
def test_an_unsupported_scheme_is_an_error_naming_it(cache, uri):
    card = single_file_card("config.json", uri, b"x")
    assert_fails_cleanly(cache, card, UnsupportedScheme, f"unsupported URI scheme '{uri.split(':')[0]}'")


@pytest.mark.parametrize("path", ["http://127.0.0.1:9/a/..", "http://127.0.0.1:9/a/..%2F..%2Fetc%2Fpasswd",
                                  "/tmp/x/..", "http://127.0.0.1:9/a%2Fb"])
def test_a_file_name_that_escapes_local_dir_is_rejected_before_anything_is_written(cache, path):
    card = single_file_card("x", path, b"x")
    assert_fails_cleanly(cache, card, CardError, "unsafe file name")


def test_a_failed_first_resolve_leaves_no_cache_directory_behind(tmp_path, model):
    card = build_card(model, "acme/Tiny-Llama")
    (model / "config.json").write_text("{}")  # no longer matches its checksum
    with pytest.raises(ChecksumMismatch):
        Resolver(tmp_path / "fresh-mdc").resolve(card)
    assert not (tmp_path / "fresh-mdc").exists()


def test_a_card_whose_slug_has_forbidden_characters_is_rejected(tmp_path):
    data = ModelCard.new("acme/model").to_json() | {"slug": "../../etc"}
    with pytest.raises(CardError, match="outside"):
        ModelCard.from_json(data)


@pytest.mark.spec("2.1")
def test_a_missing_custom_chat_template_names_the_path_and_both_fixes(cache, model, tmp_path):
    template = tmp_path / "custom.jinja"
    template.write_text("{{ messages }}")
    card = build_card(model, "acme/Tiny-Llama", custom_template=template)
    template.unlink()
    err = assert_fails_cleanly(cache, card, MissingCustomTemplate, "does not exist on this host")
    assert str(template) in str(err) and "shared mount" in str(err) and "model path" in str(err)


@pytest.mark.spec("2.2")
def test_a_corrupt_cached_blob_is_fetched_again_with_a_warning(tmp_path, model, caplog):
    resolver = Resolver(tmp_path / "mdc")
    card = build_card(model, "acme/Tiny-Llama")
    hexd = card.slot("model_info").file.checksum.hex
    resolver.resolve(card)
    blob = resolver.blobs.path(hexd)
    blob.write_bytes(b"bit rot")
    with caplog.at_level(logging.WARNING, logger="harness"):
        again = resolver.resolve(card)
    assert "no longer verifies" in caplog.text
    assert "config.json" in again.fetched
    assert hash_file(blob) == hexd


@pytest.mark.spec("2.2")
def test_a_corrupt_blob_whose_refetch_fails_is_removed_with_its_link(tmp_path, model):
    resolver = Resolver(tmp_path / "mdc")
    card = build_card(model, "acme/Tiny-Llama")
    hexd = card.slot("model_info").file.checksum.hex
    local_dir = resolver.resolve(card).local_dir
    resolver.blobs.path(hexd).write_bytes(b"bit rot")
    (model / "config.json").write_text("{}")  # the source changed too: the re-fetch cannot verify
    with pytest.raises(ChecksumMismatch):
        resolver.resolve(card)
    assert not resolver.blobs.path(hexd).exists(), "a wrong blob survived"
    assert not (local_dir / "config.json").is_symlink(), "a link to the removed blob dangles"


def run_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness", *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.spec("2.2")
def test_eight_processes_resolving_one_card_all_succeed_with_one_consistent_local_dir(tmp_path, model):
    cache_root = tmp_path / "mdc"
    with MetadataServer() as worker:
        card = worker.publish(model, "acme/Tiny-Llama")
        card_json = tmp_path / "card.json"
        card_json.write_text(card.dumps())
        procs = [run_cli("resolve", str(card_json), "--cache-root", str(cache_root)) for _ in range(8)]
        results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [err for _, err in results]
    assert {out.strip() for out, _ in results} == {str(card.local_dir(cache_root))}
    local_dir = card.local_dir(cache_root)
    for _, f in card.checked_files():
        assert os.readlink(local_dir / f.name) == str(cache_root / "blobs" / f.checksum.hex)
    for blob in (cache_root / "blobs").iterdir():
        assert not blob.name.startswith(PARTIAL_PREFIX), f"temp file {blob.name} left behind"
        assert hash_file(blob) == blob.name
    assert all(p.is_symlink() for p in local_dir.iterdir())


def test_a_resolver_killed_mid_fetch_leaves_nothing_visible_and_a_rerun_succeeds(tmp_path, fault_server):
    body = os.urandom(4 << 20)
    fault_server.files["weights-index.json"] = body
    card = single_file_card("weights-index.json", f"{fault_server.url}/stall/weights-index.json", body, len(body))
    card_json = tmp_path / "card.json"
    card_json.write_text(card.dumps())
    cache_root = tmp_path / "mdc"
    proc = run_cli("resolve", str(card_json), "--cache-root", str(cache_root))
    deadline = time.monotonic() + 60
    partial = []
    while not partial and time.monotonic() < deadline and proc.poll() is None:
        blobs = cache_root / "blobs"
        partial = [p for p in blobs.iterdir() if p.stat().st_size > 0] if blobs.is_dir() else []
        time.sleep(0.05)
    assert partial, "the resolver never started writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)  # reaps it and closes its pipes

    hexd = card.extra_files[0].checksum.hex
    assert not (cache_root / "blobs" / hexd).exists(), "a partial blob became visible under its hash"
    assert all(p.name.startswith(PARTIAL_PREFIX) for p in (cache_root / "blobs").iterdir())
    assert not card.local_dir(cache_root).exists(), "a local_dir appeared for an unfinished resolve"

    fault_server.released.set()
    resolved = Resolver(cache_root).resolve(card)
    assert hash_file(resolved.local_dir / "weights-index.json") == hexd
    assert [p.name for p in (cache_root / "blobs").iterdir()] == [hexd], "the orphaned temp was not swept"
