"""The reference frontend's /metrics: what it has in flight, per worker, by mode, errors by kind, KV overlap.

Against fake engines; the under-load suite reads the same metrics of the frontend in front of real
vLLM engines (suites/test_under_load.py).
"""

from __future__ import annotations

import time

import httpx
import requests

from fixtures.planted_router import planted
from harness.engines.metrics import Metrics

PROMPT = list(range(1, 200))  # token ids: 6 blocks of 32 and a partial one


def scrape(cluster) -> Metrics:
    return Metrics.scrape(cluster.url)


def sample(metrics: Metrics, family: str, **labels) -> float | None:
    """The one sample of `family` with these labels (a counter's _total), or None."""
    found = [v for name, got, v in metrics.families.get(family, []) if not name.endswith("_created")
             and all(got.get(k) == str(v) for k, v in labels.items())]
    return sum(found) if found else None


def stream_open(cluster, prompt=PROMPT, max_tokens: int = 200):
    client = httpx.Client(timeout=30)
    ctx = client.stream("POST", f"{cluster.url}/v1/completions",
                        json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "stream": True})
    lines = ctx.__enter__().iter_lines()  # kept: a dropped line iterator closes the stream
    while not next(lines).startswith("data: {"):  # until the first token is out
        pass
    return client, ctx, lines


def wait_for(condition, what: str, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (got := condition()):
            return got
        time.sleep(0.05)
    raise AssertionError(f"waited {timeout_s} s for {what}")


def test_metrics_is_prometheus_text_naming_the_frontend(cluster, fake_engines):
    cluster.serve(fake_engines("prefill"), fake_engines("decode"))
    resp = requests.get(f"{cluster.url}/metrics", timeout=10)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    metrics = Metrics.parse(resp.text)
    assert "harness" in metrics.engines
    assert metrics.get("frontend_requests_in_flight") == 0, "no request yet: 0, exported (not absent)"


def test_requests_are_counted_by_routing_mode(make_cluster, fake_engines):
    disagg = make_cluster()
    disagg.serve(fake_engines("prefill"), fake_engines("decode"))
    aggregated = make_cluster()
    aggregated.serve(fake_engines("decode"))
    for cluster in (disagg, aggregated):
        for _ in range(2):
            resp = requests.post(f"{cluster.url}/v1/completions", json={"model": "tiny", "prompt": PROMPT,
                                                                        "max_tokens": 4}, timeout=30)
            assert resp.ok, resp.text
    assert sample(scrape(disagg), "disagg_frontend_requests", model="tiny", mode="disaggregated") == 2
    assert sample(scrape(disagg), "disagg_frontend_requests", mode="aggregated") is None
    assert sample(scrape(aggregated), "disagg_frontend_requests", model="tiny", mode="aggregated") == 2


def test_an_open_stream_is_in_flight_on_the_frontend_and_its_decode_worker_until_it_ends(cluster, fake_engines):
    prefill, decode = fake_engines("prefill"), fake_engines("decode", token_delay_s=0.02)
    cluster.serve(prefill, decode)
    decode_key = next(i.key for i in cluster.frontend.manager.models["tiny"].engine.instances("decode"))
    client, ctx, lines = stream_open(cluster)
    try:
        during = scrape(cluster)
        assert during.get("frontend_requests_in_flight") == 1
        assert sample(during, "disagg_frontend_worker_requests_in_flight", worker=decode_key, role="decode") == 1
        assert during.get("frontend_worker_requests_in_flight") == 1, "the prefill answered: nothing open there"
        for _ in lines:
            pass
    finally:
        ctx.__exit__(None, None, None)
        client.close()
    after = scrape(cluster)
    assert after.get("frontend_requests_in_flight") == 0 and after.get("frontend_worker_requests_in_flight") == 0


def test_a_client_that_leaves_mid_stream_is_no_longer_in_flight_and_is_counted_as_left(cluster, fake_engines):
    cluster.serve(fake_engines("prefill"), fake_engines("decode", token_delay_s=0.05))
    client, ctx, _ = stream_open(cluster)
    ctx.__exit__(None, None, None)  # the client leaves after its first token
    client.close()
    metrics = wait_for(lambda: (m := scrape(cluster)).get("frontend_worker_requests_in_flight") == 0 and m,
                       "the decode stream to be closed")
    assert metrics.get("frontend_requests_in_flight") == 0
    assert sample(metrics, "disagg_frontend_errors", model="tiny", kind="client_left") == 1


def test_errors_are_counted_by_kind(make_cluster, fake_engines):
    failing_prefill = make_cluster()
    failing_prefill.serve(fake_engines("prefill", fail_status=500), fake_engines("decode"))
    assert requests.post(f"{failing_prefill.url}/v1/completions", json={"model": "tiny", "prompt": PROMPT,
                                                                        "max_tokens": 4}, timeout=30).status_code == 502
    assert sample(scrape(failing_prefill), "disagg_frontend_errors", kind="prefill_failed") == 1

    dying_decode = make_cluster()
    dying_decode.serve(fake_engines("prefill"), fake_engines("decode", die_after_tokens=2))
    resp = requests.post(f"{dying_decode.url}/v1/completions", json={"model": "tiny", "prompt": PROMPT,
                                                                     "max_tokens": 8}, timeout=30)
    assert resp.status_code == 502
    metrics = scrape(dying_decode)
    assert sample(metrics, "disagg_frontend_errors", kind="stream_failed") == 1
    assert sample(metrics, "disagg_frontend_errors", kind="prefill_failed") is None
    assert metrics.get("frontend_requests_in_flight") == 0 and metrics.get("frontend_worker_requests_in_flight") == 0


def test_kv_aware_selection_counts_the_blocks_it_routed_and_those_the_worker_held(make_cluster, fake_engines):
    cluster = make_cluster(selection="kv")
    cluster.serve(fake_engines("prefill"), fake_engines("decode"))
    for _ in range(2):
        assert requests.post(f"{cluster.url}/v1/completions", json={"model": "tiny", "prompt": PROMPT,
                                                                    "max_tokens": 2}, timeout=30).ok
    metrics = scrape(cluster)
    routed = sample(metrics, "disagg_frontend_kv_routed_blocks", model="tiny")
    overlap = sample(metrics, "disagg_frontend_kv_overlap_blocks", model="tiny")
    assert routed == 2 * 6, "two prompts of 6 full blocks (the partial seventh is not hashed)"
    assert overlap == 6, "the repeat went where its 6 blocks were; the first held none"


def test_the_planted_leak_keeps_an_aborted_stream_in_flight(make_cluster, fake_engines):
    """The planted frontend the abort storm must catch: it closes the stream but keeps counting it."""
    cluster = make_cluster(router=planted("leak_in_flight_on_aborted_streams"))
    cluster.serve(fake_engines("prefill"), fake_engines("decode", token_delay_s=0.05))
    client, ctx, _ = stream_open(cluster)
    ctx.__exit__(None, None, None)
    client.close()
    metrics = wait_for(lambda: (m := scrape(cluster)).get("frontend_requests_in_flight") == 0 and m,
                       "the request to end")
    time.sleep(0.5)
    assert scrape(cluster).get("frontend_worker_requests_in_flight") == 1
