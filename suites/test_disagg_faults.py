"""Faults on the disaggregated path (SPEC §4.1, §4.4): clear errors, no hangs, no work for nobody.

Checks that break an engine restore it before they end, so the order of checks does not matter.
"""

from __future__ import annotations

import httpx
import pytest
import requests

from fixtures.fake_engine import FakeEngine
from fixtures.planted_router import planted
from harness import evidence as ev
from harness.cluster import Cluster
from harness.engines.metrics import Metrics
from harness.interposer import InterposedEngine
from harness.openai_client import OpenAIEndpoint
from suites.disagg_checks import (assert_aborted, finish_reasons, fresh_prompt, read_data_events,
                                  sse_error_message, wait_for_quantity)
from suites.load_checks import eos_ignored

pytestmark = [pytest.mark.spec("4.4"), pytest.mark.engines, pytest.mark.xdist_group("engines")]
DECODE_METRICS = ev.engine_metrics("decode")
MAX_TOKENS = 900
EVENTS_BEFORE_LEAVING = 5


def disconnect_mid_stream(endpoint: OpenAIEndpoint, decode_url: str, relay: InterposedEngine | None = None
                          ) -> tuple[Metrics, Metrics, dict]:
    """Stream a long greedy completion, read a few events, drop the connection; scrape around it.

    Evidence needed: the engine's abort counter, or else its generated tokens together with proof
    that the request ran there at all: its running-requests gauge, or the relay in front of it
    (`relay`), which passed the stream's events on. SGLang 0.5.23 updates its running gauge with
    its periodic decode stats: through sglang-router the gauge showed the open stream in one run of
    four, so the relay is the steadier witness.
    """
    # ignore_eos keeps a random-weight model from stopping early; sent only where it is accepted.
    extra = eos_ignored(endpoint)
    mark = relay.mark() if relay is not None else None
    before = Metrics.scrape(decode_url)
    counts_aborts = before.get("aborted_requests") is not None
    if not counts_aborts and before.missing("generation_tokens", "requests_running"):
        pytest.skip(f"needs engine evidence of an abort: {before.missing('aborted_requests')}, or else "
                    f"{before.missing('generation_tokens', 'requests_running')}")
    with httpx.stream(**endpoint.stream_request(fresh_prompt(40), MAX_TOKENS, **extra)) as resp:
        assert resp.status_code == 200, resp.read()[:300]
        lines = read_data_events(resp.iter_lines(), EVENTS_BEFORE_LEAVING)
        if finish_reasons(lines) or "data: [DONE]" in lines:
            why = ("a stream that outlasts a few events" if extra else
                   f"ignore_eos, which {endpoint.url} did not accept, to keep a random model from stopping early")
            pytest.skip(f"needs {why}: the request finished ({finish_reasons(lines)}) before the client left")
        # Dynamo 1.6.1's mocker stops counting in-flight requests after its first cancellation
        # (measured), so the gauge is a precondition only where it is the only evidence.
        running = wait_for_quantity(decode_url, "requests_running", lambda v: v >= 1, timeout_s=3)
        relayed = [e for e in relay.exchanges(mark) if e.first_event] if relay is not None else []
        if not counts_aborts and running < 1 and not relayed:
            pytest.skip(f"needs the decode engine's metrics to show the request running: {decode_url} reported "
                        f"none in flight while the stream was open (is --engine-url decode= the engine that decodes?)")
    running_after = wait_for_quantity(decode_url, "requests_running", lambda v: v == 0, timeout_s=60)
    after = Metrics.scrape(decode_url)
    return before, after, {"running_during": running, "running_after": running_after,
                           "relayed_decode_streams": len(relayed)}


@pytest.mark.spec("R6")
@pytest.mark.needs(ev.FRONTEND, DECODE_METRICS)
def test_a_client_disconnect_aborts_the_decode_request(disagg, record_property):
    before, after, seen = disconnect_mid_stream(disagg.endpoint(), disagg.url("decode"),
                                                disagg.interposed.get("decode"))
    numbers = {**seen, **assert_aborted(before, after, MAX_TOKENS, EVENTS_BEFORE_LEAVING)}
    record_property("after_disconnect", numbers)
    assert seen["running_after"] in (0, None), "the decode engine still runs the request of a client that left"


@pytest.mark.spec("R6")
@pytest.mark.needs(ev.PLANTED_ROUTER)
def test_a_frontend_that_keeps_the_decode_stream_alive_is_caught(disagg, record_property):
    cluster = Cluster(disagg.workdir / "keeps-decode-alive", disagg.cluster.model_dir, disagg.model,
                      block_size=disagg.profile.block_size, timeout_s=disagg.profile.request_timeout_s,
                      protocol=disagg.profile.protocol, router=planted("keep_decode_alive")).start()
    try:
        cluster.register(disagg.engines["prefill"])
        cluster.register(disagg.engines["decode"])
        cluster.wait_for_roles({"prefill", "decode"})
        endpoint = OpenAIEndpoint(cluster.url, disagg.model, disagg.profile.request_timeout_s)
        before, after, seen = disconnect_mid_stream(endpoint, disagg.url("decode"))
    finally:
        cluster.stop()
    with pytest.raises(AssertionError, match="ran on after the client left|was not aborted"):
        assert_aborted(before, after, MAX_TOKENS, EVENTS_BEFORE_LEAVING)
    record_property("planted_keep_alive", {"generated_tokens": after.delta(before, "generation_tokens"),
                                           "aborted_requests": after.delta(before, "aborted_requests")})


@pytest.mark.spec("4.1")
@pytest.mark.needs(ev.PLANTED_ROUTER)
def test_a_prefill_error_is_reported_and_not_retried_on_decode(disagg):
    with FakeEngine("prefill", name="failing-prefill", fail_status=500) as prefill:
        cluster = Cluster(disagg.workdir / "failing-prefill", disagg.cluster.model_dir, disagg.model,
                          block_size=disagg.profile.block_size, timeout_s=disagg.profile.request_timeout_s).start()
        try:
            cluster.register(prefill)
            cluster.register(disagg.engines["decode"])
            cluster.wait_for_roles({"prefill", "decode"})
            before = Metrics.scrape(disagg.url("decode"))
            resp = requests.post(f"{cluster.url}/v1/completions", timeout=120, json={
                "model": disagg.model, "prompt": fresh_prompt(40), "max_tokens": 8})
            after = Metrics.scrape(disagg.url("decode"))
        finally:
            cluster.stop()
    assert resp.status_code == 502
    message = resp.json()["error"]["message"]
    assert "prefill worker" in message and "HTTP 500" in message, message
    assert after.delta(before, "prompt_tokens") == 0, "the decode engine re-ran the failed prefill"


@pytest.mark.spec("4.4")
@pytest.mark.needs(ev.ENGINE_CONTROL)
def test_a_decode_worker_killed_mid_stream_gives_the_client_a_clear_error(disagg):
    try:
        with httpx.stream(**disagg.endpoint().stream_request(fresh_prompt(40), MAX_TOKENS, ignore_eos=True)) as resp:
            assert resp.status_code == 200
            stream = resp.iter_lines()
            lines = read_data_events(stream, EVENTS_BEFORE_LEAVING)
            disagg.kill_role("decode")
            lines += list(stream)
    finally:
        disagg.restart_role("decode")
    error = sse_error_message(lines)
    assert "decode worker" in error, error
    assert "data: [DONE]" not in lines
