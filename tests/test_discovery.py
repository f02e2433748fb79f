"""Discovery (SPEC §3): /v1/models follows the store through put, delete and lease expiry."""

from __future__ import annotations

import dataclasses
import logging
import time

import requests

from harness.discovery import FileStore, ModelEntry, Watcher
from harness.worker.registration import WorkerRegistration


def listed(cluster) -> list[str]:
    return [m["id"] for m in requests.get(f"{cluster.url}/v1/models", timeout=10).json()["data"]]


def test_a_model_appears_when_its_worker_registers_and_goes_when_it_stops(cluster, fake_engines):
    assert listed(cluster) == []
    decode = fake_engines("decode")
    cluster.register(decode)
    cluster.wait_for_roles({"decode"})
    assert listed(cluster) == ["tiny"]
    cluster.deregister(decode.name)
    cluster.wait_for_roles(set())
    assert listed(cluster) == []


def test_a_dead_workers_lease_expires_and_its_model_is_removed(make_cluster, fake_engines):
    cluster = make_cluster(lease_s=3.0)
    decode = fake_engines("decode")
    cluster.register(decode)
    cluster.wait_for_roles({"decode"})
    decode.stop()  # the engine dies; its worker stops renewing; the lease (3 s) runs out
    cluster.wait_for_roles(set(), timeout_s=15)
    assert listed(cluster) == []
    assert not cluster.store.entries(), "an expired lease must leave no entry behind"


def missing_from_the_store(cluster, key: str, seconds: float) -> list[float]:
    """Watch the store for `seconds`; when `key` was missing, as seconds before the end."""
    deadline, gaps = time.monotonic() + seconds, []
    while time.monotonic() < deadline:
        if key not in cluster.store.entries():
            gaps.append(round(deadline - time.monotonic(), 1))
        time.sleep(0.1)
    return gaps


def test_a_health_check_that_times_out_on_a_loaded_host_does_not_let_the_lease_lapse(make_cluster, fake_engines,
                                                                                     caplog):
    """Lease 4 s: every other /health answers too late (2 s, past its 1 s timeout), the next one
    after 0.2 s. The renewal after it lands 2.2 s into the lease. (Waiting a third of a lease after
    each check, as the keepalive once did, it landed at 4.2 s: the lease had lapsed.)"""
    cluster = make_cluster(lease_s=4.0)
    decode = fake_engines("decode", health_delays_s=(2.0, 0.2))
    key = cluster.register(decode).entry.key
    with caplog.at_level(logging.WARNING, logger="harness.worker.registration"):
        gaps = missing_from_the_store(cluster, key, 8)
    assert not gaps, f"the entry was missing from the store {len(gaps)} times (seconds before the end: {gaps})"
    assert "had lapsed" not in caplog.text


def test_an_engine_slower_to_answer_health_than_a_renewal_period_keeps_its_lease(make_cluster, fake_engines,
                                                                                   caplog):
    """Lease 4 s, a renewal every 1 s: every /health answers after 1.6 s, as vLLM's did on a
    2-core CI host under a burst of 16 streams. Slow is alive; the entry stays. (With each probe
    cut off after one renewal period, every renewal was skipped and the lease lapsed, taking the
    model off the frontend mid-burst: 503 'no decode or aggregated worker'.)"""
    cluster = make_cluster(lease_s=4.0)
    decode = fake_engines("decode", health_delays_s=(1.6,))
    key = cluster.register(decode).entry.key
    with caplog.at_level(logging.WARNING, logger="harness.worker.registration"):
        gaps = missing_from_the_store(cluster, key, 10)
    assert not gaps, f"the entry was missing from the store {len(gaps)} times (seconds before the end: {gaps})"
    assert "had lapsed" not in caplog.text and "not renewing" not in caplog.text


def test_an_engine_that_stops_answering_health_loses_its_entry_within_two_leases(make_cluster, fake_engines):
    """A hung engine (its port open, no answer) is not alive: lease 3 s, gone within 6 s and a margin."""
    cluster = make_cluster(lease_s=3.0)
    decode = fake_engines("decode")
    key = cluster.register(decode).entry.key
    cluster.wait_for_roles({"decode"})
    decode.state.health_delays_s = (8.0,)
    hung_at = time.monotonic()
    cluster.wait_for_roles(set(), timeout_s=12)
    assert key not in cluster.store.entries()
    assert time.monotonic() - hung_at <= 2 * 3.0 + 2.5, "a hung engine kept its entry past two leases"


def test_a_prefill_worker_alone_exposes_no_model(cluster, fake_engines):
    cluster.register(fake_engines("prefill"))
    cluster.wait_for_roles({"prefill"})
    assert listed(cluster) == []
    resp = requests.post(f"{cluster.url}/v1/completions", json={"model": "tiny", "prompt": "hi"}, timeout=10)
    assert resp.status_code == 404


def test_the_entry_key_is_the_slug_of_the_endpoint_and_instance(cluster, fake_engines):
    registration = cluster.register(fake_engines("decode"))
    key = registration.entry.key
    assert key == f"dynamo_backend_generate-{registration.entry.instance_id}"
    assert key in cluster.store.entries()
    if isinstance(cluster.store, FileStore):
        assert (cluster.store.dir / f"{key}.json").is_file()


def test_a_second_worker_of_one_role_with_another_mdcsum_is_rejected_with_a_reason(cluster, fake_engines):
    cluster.register(fake_engines("decode", name="decode-a"))
    cluster.wait_for_roles({"decode"})
    other = WorkerRegistration(cluster.store, cluster.metadata, engine_url=fake_engines("decode", name="b").url,
                               model_dir=cluster.model_dir, name="tiny", role="decode", block_size=64)
    other.start()
    try:
        cluster.wait_until(lambda c: c.frontend.manager.rejections, "a rejection", timeout_s=10)
        (message,) = cluster.frontend.manager.rejections
        assert "'tiny' as decode" in message and "already serves it" in message
        assert len(cluster.frontend.manager.models["tiny"].engine.instances()) == 1, "the first worker stays"
    finally:
        other.stop()


def test_an_unreadable_entry_does_not_stop_discovery_of_the_others(tmp_path):
    store = FileStore(tmp_path)
    (tmp_path / "garbage.json").write_text("{not json")
    entry = ModelEntry(name="m", endpoint="ns/c/e", model_type="Chat|Completions", card={"display_name": "m"},
                       instance_id="ab", url="http://127.0.0.1:1", role="decode")
    store.put(entry)
    seen = []
    Watcher(store, seen.append).poll_once()
    assert [(e.kind, e.key) for e in seen] == [("put", "ns_c_e-ab")]


def test_a_renewed_lease_outlives_its_first_deadline(tmp_path):
    now = [1000.0]
    store = FileStore(tmp_path, clock=lambda: now[0])
    entry = ModelEntry(name="m", endpoint="ns/c/e", model_type="x", card={"display_name": "m"}, instance_id="ab",
                       url="http://127.0.0.1:1")
    store.put(dataclasses.replace(entry), lease_s=10)
    now[0] += 8
    assert store.renew(entry.key, lease_s=10)
    now[0] += 8
    assert entry.key in store.entries()
    now[0] += 11
    assert store.entries() == {} and not store.renew(entry.key)
