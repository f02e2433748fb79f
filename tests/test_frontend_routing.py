"""The reference frontend's routed engine, against fake engines (fast, with fault injection).

The same behaviours are checked against real vLLM in suites/test_disagg_*.py.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import httpx
import pytest
import requests

from fixtures.planted_router import planted
from harness.engines.metrics import Metrics
from harness.frontend.router import PREFILL_KV_TRANSFER_PARAMS
from suites.disagg_checks import assert_aborted, read_data_events, sse_error_message

PROMPT = "Hello, how are you today? The quick brown fox jumps over the lazy dog. " * 3


def complete(cluster, **body) -> requests.Response:
    return requests.post(f"{cluster.url}/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 8,
                                                                 **body}, timeout=30)


def test_with_no_prefill_worker_the_request_goes_to_decode_unchanged(cluster, fake_engines):
    decode = fake_engines("decode")
    cluster.serve(decode)
    resp = complete(cluster)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-disagg-mode"] == "aggregated"
    (body,) = decode.state.bodies
    assert "kv_transfer_params" not in body
    assert decode.state.counters["local_compute"] > 0 and decode.state.counters["external_kv_transfer"] == 0


def test_the_prefill_gets_a_one_token_non_streaming_copy_with_remote_decode_params(cluster, fake_engines):
    prefill, decode = fake_engines("prefill"), fake_engines("decode")
    cluster.serve(prefill, decode)
    resp = requests.post(
        f"{cluster.url}/v1/completions", headers={"X-Request-Id": "req-42"}, timeout=30,
        json={"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "min_tokens": 4, "stream": True,
              "stream_options": {"include_usage": True}})
    assert resp.status_code == 200 and resp.headers["x-disagg-mode"] == "disaggregated"
    (p,), (d,) = prefill.state.bodies, decode.state.bodies
    assert p["kv_transfer_params"] == PREFILL_KV_TRANSFER_PARAMS
    assert p["stream"] is False and p["max_tokens"] == 1
    assert "stream_options" not in p and "min_tokens" not in p
    assert d["min_tokens"] == 4 and d["max_tokens"] == 8, "decode gets the original request back"
    assert d["kv_transfer_params"]["remote_engine_id"] == prefill.state.engine_id
    assert prefill.state.request_ids == decode.state.request_ids == ["req-42"]
    assert decode.state.counters["external_kv_transfer"] > 0 and decode.state.counters["local_compute"] == 0


def test_final_usage_reports_the_prefills_prompt_tokens_details(cluster, fake_engines):
    prefill, decode = fake_engines("prefill"), fake_engines("decode")
    cluster.serve(prefill, decode)
    complete(cluster)
    usage = complete(cluster).json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 32, "the prefill's prefix hit must reach the client"


def test_a_worker_registered_as_aggregated_runs_its_requests_whole_even_beside_a_prefill_pool(cluster, fake_engines):
    """It has no KV connector to pull a prefill's blocks: a prefill for it would only pin them until their lease ends."""
    prefill, decode, aggregated = fake_engines("prefill"), fake_engines("decode"), fake_engines("aggregated")
    cluster.serve(prefill, decode, aggregated)
    modes = {}
    for _ in range(4):
        resp = complete(cluster)
        assert resp.status_code == 200, resp.text
        modes.setdefault(resp.headers["x-disagg-decode-worker"], set()).add(resp.headers["x-disagg-mode"])
    assert sorted(map(sorted, modes.values())) == [["aggregated"], ["disaggregated"]], modes
    assert len(prefill.state.bodies) == len(decode.state.bodies) == len(aggregated.state.bodies) == 2
    assert not any("kv_transfer_params" in b for b in aggregated.state.bodies)
    assert all(b["kv_transfer_params"]["do_remote_prefill"] for b in decode.state.bodies)


def test_a_decode_stream_that_goes_quiet_for_the_timeout_ends_with_an_error_naming_it(make_cluster, fake_engines):
    """A hung engine mid-stream: the client gets an error event within about the timeout, not a hang."""
    cluster = make_cluster(timeout_s=1.0)
    cluster.serve(fake_engines("prefill"), fake_engines("decode", token_delay_s=3.0))
    started = time.monotonic()
    resp = complete(cluster, stream=True, max_tokens=2)
    took = time.monotonic() - started
    assert resp.status_code == 200
    assert "event: error" in resp.text and "sent nothing for 1 s" in resp.text, resp.text
    assert took < 2.9, f"the stream ended after {took:.1f} s, not at the 1 s timeout"


def test_a_prefill_error_is_reported_and_not_retried_on_decode(cluster, fake_engines):
    prefill, decode = fake_engines("prefill", fail_status=500), fake_engines("decode")
    cluster.serve(prefill, decode)
    resp = complete(cluster)
    assert resp.status_code == 502
    assert "prefill worker" in resp.json()["error"]["message"] and "HTTP 500" in resp.json()["error"]["message"]
    assert decode.state.bodies == [], "the decode worker must not re-run the prefill"


def test_a_prefill_without_kv_transfer_params_is_an_error(cluster, fake_engines):
    prefill, decode = fake_engines("prefill", omit_kv_transfer_params=True), fake_engines("decode")
    cluster.serve(prefill, decode)
    resp = complete(cluster)
    assert resp.status_code == 502 and "no usable kv_transfer_params" in resp.json()["error"]["message"]
    assert decode.state.bodies == []


def test_a_decode_worker_that_dies_mid_stream_gives_the_client_an_error_event(cluster, fake_engines):
    decode = fake_engines("decode", die_after_tokens=3)
    cluster.serve(decode)
    with httpx.stream("POST", f"{cluster.url}/v1/completions", timeout=20,
                      json={"model": "tiny", "prompt": PROMPT, "max_tokens": 50, "stream": True}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    message = sse_error_message(lines)
    assert "decode worker" in message and "mid-stream" in message or "before [DONE]" in message
    assert "data: [DONE]" not in lines


def test_a_non_streaming_request_to_a_dying_decode_is_a_502(cluster, fake_engines):
    decode = fake_engines("decode", die_after_tokens=3)
    cluster.serve(decode)
    resp = complete(cluster, max_tokens=50)
    assert resp.status_code == 502 and "decode worker" in resp.json()["error"]["message"]


def leave_mid_stream(cluster, decode, max_tokens: int = 200) -> tuple[Metrics, Metrics]:
    """Read 3 events of a long stream, drop the connection, wait until the decode is idle."""
    before = Metrics.scrape(decode.url)
    with httpx.stream("POST", f"{cluster.url}/v1/completions", timeout=20,
                      json={"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "stream": True}) as resp:
        assert resp.status_code == 200
        read_data_events(resp.iter_lines(), 3)
    deadline = time.monotonic() + 15
    while decode.state.running and time.monotonic() < deadline:
        time.sleep(0.05)
    return before, Metrics.scrape(decode.url)


def test_a_client_disconnect_aborts_the_decode_request(cluster, fake_engines):
    decode = fake_engines("decode", token_delay_s=0.02)
    cluster.serve(decode)
    before, after = leave_mid_stream(cluster, decode)
    assert decode.state.running == 0, "the decode request kept running after the client left"
    assert decode.state.counters["aborted"] == 1 and decode.state.counters["generated"] < 200
    assert assert_aborted(before, after, 200, 3)["evidence"].startswith("generated tokens")


def test_a_frontend_that_keeps_reading_the_decode_stream_fails_the_abort_check(make_cluster, fake_engines):
    """The planted keep-alive (R6): the decode generates on for nobody, and both kinds of evidence see it."""
    cluster = make_cluster(router=planted("keep_decode_alive"))
    decode = fake_engines("decode", token_delay_s=0.002)
    cluster.serve(decode)
    before, after = leave_mid_stream(cluster, decode)
    assert after.delta(before, "generation_tokens") == 200, "the planted frontend did not keep the stream alive"
    with pytest.raises(AssertionError, match="was not aborted"):
        assert_aborted(before, after, 200, 3)
    # Where the engine counts cancellations (Dynamo's workers), that counter is the evidence instead.
    cancellations = "# TYPE dynamo_component_cancellation_total counter\ndynamo_component_cancellation_total {}\n"
    with pytest.raises(AssertionError, match="ran on after the client left"):
        assert_aborted(Metrics.parse(cancellations.format(0)), Metrics.parse(cancellations.format(0)), 200, 3)
    assert assert_aborted(Metrics.parse(cancellations.format(0)), Metrics.parse(cancellations.format(1)), 200, 3)[
        "evidence"] == "engine abort counter"


def test_a_decode_stream_that_ends_without_done_gives_the_client_an_error_event(cluster, fake_engines):
    decode = fake_engines("decode", end_without_done=True)
    cluster.serve(decode)
    with httpx.stream("POST", f"{cluster.url}/v1/completions", timeout=20,
                      json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "stream": True}) as resp:
        lines = list(resp.iter_lines())
    assert "closed the stream before [DONE]" in sse_error_message(lines)
    assert "data: [DONE]" not in lines
    non_streamed = complete(cluster)
    assert non_streamed.status_code == 502 and "before [DONE]" in non_streamed.json()["error"]["message"]


def test_the_planted_kv_drop_makes_decode_recompute(make_cluster, fake_engines):
    """The planted bug behind SPEC §7 R7: the checks in suites/ must see local_compute rise."""
    cluster = make_cluster(router=planted("drop_kv_transfer_params"))
    prefill, decode = fake_engines("prefill"), fake_engines("decode")
    cluster.serve(prefill, decode)
    assert complete(cluster).status_code == 200
    assert decode.state.counters["local_compute"] > 0 and decode.state.counters["external_kv_transfer"] == 0


def test_chat_completions_are_templated_from_local_dir_and_shaped_as_chat(cluster, fake_engines):
    decode = fake_engines("decode")
    cluster.serve(decode)
    resp = requests.post(f"{cluster.url}/v1/chat/completions", timeout=30, json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hi there"}], "max_completion_tokens": 5})
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["object"] == "chat.completion" and data["choices"][0]["message"]["role"] == "assistant"
    (body,) = decode.state.bodies
    pre = cluster.frontend.manager.models["tiny"].preprocessor
    assert body["prompt"] == pre.encode("<s><|user|>\nHi there</s>\n<|assistant|>\n") and body["max_tokens"] == 5


def test_kv_aware_selection_sends_a_repeated_prefix_to_the_same_worker(make_cluster, fake_engines):
    cluster = make_cluster(selection="kv")
    a, b = fake_engines("decode", name="decode-a"), fake_engines("decode", name="decode-b")
    cluster.register(a)
    cluster.register(b)
    cluster.wait_until(lambda c: len(c.frontend.manager.models.get("tiny").engine.instances()) == 2
                       if c.frontend.manager.models.get("tiny") else False, "two decode workers")
    first = complete(cluster).headers["x-disagg-decode-worker"]
    again = [complete(cluster).headers["x-disagg-decode-worker"] for _ in range(3)]
    assert again == [first] * 3
    other = complete(cluster, prompt="A completely different prompt about trains and buses " * 3)
    assert other.status_code == 200


def test_sglang_protocol_sends_prefill_and_decode_at_once_with_one_bootstrap_room(make_cluster, fake_engines):
    cluster = make_cluster(protocol="sglang")
    prefill, decode = fake_engines("prefill"), fake_engines("decode")
    # A launched SGLang prefill's spec names its bootstrap port; its registration publishes it.
    prefill.spec = SimpleNamespace(bootstrap_port=18998)
    cluster.serve(prefill, decode)
    assert complete(cluster).status_code == 200
    deadline = time.monotonic() + 10
    while not prefill.state.bodies and time.monotonic() < deadline:
        time.sleep(0.05)  # the prefill runs in the background
    (p,), (d,) = prefill.state.bodies, decode.state.bodies
    assert p["bootstrap_room"] == d["bootstrap_room"] and 0 <= p["bootstrap_room"] < 2**63
    assert p["bootstrap_host"] == d["bootstrap_host"] == "127.0.0.1"
    assert p["bootstrap_port"] == d["bootstrap_port"] == 18998, "the decode was not told where to pull the KV from"
    assert "kv_transfer_params" not in d


@pytest.mark.parametrize("stream", [False, True])
def test_an_sglang_prefill_that_fails_ends_the_request_with_its_error_and_aborts_the_decode(make_cluster, fake_engines,
                                                                                              stream):
    """Real SGLang's decode waits for the KV of a prefill that failed, and the client with it
    (sglang-router 0.3.2 in front of sglang 0.5.23: no answer in 30 s). The fake decode streams
    anyway, so without the frontend's check the client would get a complete-looking answer."""
    cluster = make_cluster(protocol="sglang")
    prefill = fake_engines("prefill", fail_status=500)
    prefill.spec = SimpleNamespace(bootstrap_port=18998)
    decode = fake_engines("decode", token_delay_s=0.02)
    cluster.serve(prefill, decode)
    resp = complete(cluster, stream=stream, max_tokens=64)
    if resp.status_code == 200:  # the decode had answered first: the stream ends on the prefill's error
        assert stream and "event: error" in resp.text and "data: [DONE]" not in resp.text, resp.text[-300:]
        assert "prefill worker" in resp.text and "HTTP 500" in resp.text, resp.text[-300:]
    else:
        assert resp.status_code == 502 and "prefill worker" in resp.json()["error"]["message"], resp.text
    time.sleep(64 * 0.02 + 0.5)  # a decode left running would have finished its 64 tokens by now
    assert decode.state.counters["success"] == 0 and decode.state.running == 0, (
        f"the decode request was left running: {dict(decode.state.counters)}")
    assert decode.state.counters["generated"] < 64


@pytest.mark.parametrize("protocol", ["vllm", "sglang"])
def test_a_decode_that_refuses_the_request_leaves_no_load_behind(make_cluster, fake_engines, protocol):
    cluster = make_cluster(protocol=protocol)
    cluster.serve(fake_engines("prefill"), fake_engines("decode", fail_status=503))
    resp = complete(cluster, stream=True)
    assert resp.status_code == 502 and "decode worker" in resp.json()["error"]["message"]
    engine = cluster.frontend.manager.models["tiny"].engine
    decode_key = engine.instances("decode")[0].key
    assert engine.load.get(decode_key, 0) == 0, "a failed open must not count as an open stream"


@pytest.mark.parametrize("raw, message", [
    (b"not json", "the request body is not JSON"),
    (b'{"model": "tiny", "prompt": "Hi",', "the request body is not JSON"),
    (b'["a", "list"]', "the request body must be a JSON object"),
])
def test_a_body_that_is_not_a_json_object_is_a_400_that_says_so_and_reaches_no_engine(cluster, fake_engines, raw,
                                                                                        message):
    decode = fake_engines("decode")
    cluster.serve(decode)
    resp = requests.post(f"{cluster.url}/v1/completions", data=raw, headers={"Content-Type": "application/json"},
                         timeout=10)
    assert resp.status_code == 400 and message in resp.json()["error"]["message"], resp.text
    assert decode.state.bodies == []


def test_round_robin_spreads_decodes_over_every_decoder_with_one_prefill(cluster, fake_engines):
    """Each pool has its own turn: a shared one gave the prefill and the decode every other turn, so
    with one prefill and two decoders every decode went to the same one."""
    cluster.serve(fake_engines("prefill"), fake_engines("decode", name="decode-a"))
    cluster.register(fake_engines("decode", name="decode-b"))
    cluster.wait_until(lambda c: len(c.frontend.manager.models["tiny"].engine.instances("decode")) == 2,
                       "two decoders")
    workers = [complete(cluster).headers["x-disagg-decode-worker"] for _ in range(4)]
    assert len(set(workers)) == 2 and workers[0] != workers[1] and workers[:2] == workers[2:], workers


def test_a_decode_that_never_answers_gets_the_client_a_502_naming_it_within_the_timeout(make_cluster, fake_engines):
    """A decode that takes the request and sends nothing, not even its headers: the client waits
    the frontend's timeout, not forever, and is told which worker did not answer."""
    cluster = make_cluster(timeout_s=1.0)
    decode = fake_engines("decode", answer_delay_s=30.0)
    cluster.serve(fake_engines("prefill"), decode)
    started = time.monotonic()
    resp = complete(cluster, stream=True, max_tokens=2)
    took = time.monotonic() - started
    assert resp.status_code == 502, resp.text
    assert decode.url in resp.json()["error"]["message"] and "1 s" in resp.json()["error"]["message"], resp.text
    assert took < 2.9, f"the client waited {took:.1f} s, not the 1 s timeout"
