"""The worker's self-host route (SPEC §2.5): raw bytes, `Not found`, and 500 on a read error."""

from __future__ import annotations

import blake3
import pytest
import requests

from fixtures.text_model import make_text_model
from harness.worker.card_builder import metadata_url, Endpoint
from harness.worker.metadata_server import MetadataServer

pytestmark = pytest.mark.spec("2.5")


@pytest.fixture
def worker():
    with MetadataServer() as server:
        yield server


@pytest.mark.harness_code
def test_every_card_path_is_a_metadata_url_that_serves_the_raw_bytes(worker, tmp_path):
    model = make_text_model(tmp_path / "m")
    card = worker.publish(model, "acme/Tiny-Llama", endpoint="ns/backend/generate")
    for _, f in card.checked_files():
        assert f.path == f"{worker.url}/v1/metadata/ns/backend/generate/acme_tiny-llama/_base/{f.name}"
        resp = requests.get(f.path, timeout=10)
        assert resp.status_code == 200 and resp.content == (model / f.name).read_bytes()


@pytest.mark.harness_code
def test_an_unregistered_file_is_404_not_found(worker, tmp_path):
    worker.publish(make_text_model(tmp_path / "m"), "acme/Tiny-Llama")
    url = metadata_url(worker.url, Endpoint("dynamo", "backend", "generate"), "acme_tiny-llama", "secrets.txt")
    resp = requests.get(url, timeout=10)
    assert (resp.status_code, resp.text) == (404, "Not found")


@pytest.mark.harness_code
def test_a_read_error_is_500(worker, tmp_path):
    model = make_text_model(tmp_path / "m")
    card = worker.publish(model, "acme/Tiny-Llama")
    (model / "LICENSE").unlink()
    resp = requests.get(next(f.path for f in card.extra_files if f.name == "LICENSE"), timeout=10)
    assert resp.status_code == 500


@pytest.mark.harness_code
def test_a_lora_suffix_is_a_separate_namespace(worker, tmp_path):
    model = make_text_model(tmp_path / "m")
    worker.publish(model, "acme/Tiny-Llama")
    base = metadata_url(worker.url, Endpoint("dynamo", "backend", "generate"), "acme_tiny-llama", "config.json")
    assert requests.get(base, timeout=10).status_code == 200
    assert requests.get(base.replace("/_base/", "/my-lora/"), timeout=10).status_code == 404


def test_a_self_host_worker_serves_every_card_file_with_its_checksum(card_under_test):
    """Against any deployment: each URL a self-host card names answers 200 with the checksummed bytes,
    and a name the worker never registered is 404 `Not found`."""
    if card_under_test.mode != "self-host":
        pytest.skip(f"{card_under_test.label} is a {card_under_test.mode} card; this checks self-host workers")
    files = list(card_under_test.card.checked_files())
    for _, f in files:
        try:
            resp = requests.get(f.path, timeout=10)
        except requests.ConnectionError as exc:
            pytest.skip(f"needs the worker that published {card_under_test.label} to be running: {f.path}: {exc}")
        assert resp.status_code == 200, f"GET {f.path}: HTTP {resp.status_code}"
        assert blake3.blake3(resp.content).hexdigest() == f.checksum.hex, f"GET {f.path}: bytes do not match the card"
    unregistered = files[0][1].path.rsplit("/", 1)[0] + "/never-registered.bin"
    resp = requests.get(unregistered, timeout=10)
    assert (resp.status_code, resp.text) == (404, "Not found"), f"GET {unregistered}: {resp.status_code} {resp.text!r}"
