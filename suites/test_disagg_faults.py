"""Faults on the disaggregated path against real engines (SPEC §4.1, §4.4): clear errors, no hangs.

Checks that break an engine restore it before they end, so the order of checks does not matter.
"""

from __future__ import annotations

import httpx
import pytest

from fixtures.fake_engine import FakeEngine
from harness.cluster import Cluster
from harness.engines.metrics import PROMPT_TOKENS, REQUESTS_RUNNING, Metrics
from suites.disagg_checks import complete, fresh_prompt, read_data_events, sse_error_message, wait_for_metric

pytestmark = [pytest.mark.spec("4.4"), pytest.mark.engines, pytest.mark.xdist_group("engines")]


def stream_request(base_url: str, model: str, max_tokens: int) -> dict:
    return {"method": "POST", "url": f"{base_url}/v1/completions", "timeout": httpx.Timeout(120, connect=5),
            "json": {"model": model, "prompt": fresh_prompt(40), "max_tokens": max_tokens, "temperature": 0.0,
                     "ignore_eos": True, "stream": True}}


@pytest.mark.spec("R6")
def test_a_client_disconnect_aborts_the_decode_request(disagg, record_property):
    decode = disagg.url("decode")
    before = Metrics.scrape(decode)
    with httpx.stream(**stream_request(disagg.frontend_url, disagg.model, max_tokens=900)) as resp:
        assert resp.status_code == 200
        read_data_events(resp.iter_lines(), 5)
        assert Metrics.scrape(decode).value(REQUESTS_RUNNING) >= 1, "the decode request is not running"
    running = wait_for_metric(decode, REQUESTS_RUNNING, lambda v: v == 0, timeout_s=60)
    after = Metrics.scrape(decode)
    generated = after.delta(before, "vllm:generation_tokens_total")
    record_property("after_disconnect", {"running": running, "generated_tokens": generated})
    assert running == 0, "the decode engine still runs the request of a client that left"
    assert generated < 900, "the request ran to completion instead of being aborted"


@pytest.mark.spec("4.1")
@pytest.mark.embedded_only
def test_a_prefill_error_is_reported_and_not_retried_on_decode(disagg):
    with FakeEngine("prefill", name="failing-prefill", fail_status=500) as prefill:
        cluster = Cluster(disagg.workdir / "failing-prefill", disagg.cluster.model_dir, disagg.model,
                          block_size=disagg.profile.block_size, timeout_s=disagg.profile.request_timeout_s).start()
        try:
            cluster.register(prefill)
            cluster.register(disagg.engines["decode"])
            cluster.wait_for_roles({"prefill", "decode"})
            before = Metrics.scrape(disagg.url("decode"))
            resp = complete(cluster.url, disagg.model, fresh_prompt(40))
            after = Metrics.scrape(disagg.url("decode"))
        finally:
            cluster.stop()
    assert resp.status_code == 502
    message = resp.json()["error"]["message"]
    assert "prefill worker" in message and "HTTP 500" in message, message
    assert after.delta(before, PROMPT_TOKENS) == 0, "the decode engine re-ran the failed prefill"


@pytest.mark.spec("4.4")
@pytest.mark.embedded_only
def test_a_decode_worker_killed_mid_stream_gives_the_client_a_clear_error(disagg):
    try:
        with httpx.stream(**stream_request(disagg.frontend_url, disagg.model, max_tokens=900)) as resp:
            assert resp.status_code == 200
            stream = resp.iter_lines()
            lines = read_data_events(stream, 5)
            disagg.kill_role("decode")
            lines += list(stream)
    finally:
        disagg.restart_role("decode")
    error = sse_error_message(lines)
    assert "decode worker" in error, error
    assert "data: [DONE]" not in lines
