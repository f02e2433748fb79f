"""The interposed engine: it passes everything through, records what the router sent, and breaks
on command exactly as a broken worker would. Shown here against the fake engine; the suites use
it in front of real vLLM engines."""

from __future__ import annotations

import json

import httpx
import pytest
import requests

from fixtures.fake_engine import FakeEngine
from harness.interposer import Fault, InterposedEngine, Interposer, InterposerError, handle

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]


@pytest.fixture
def engine():
    with FakeEngine("decode", name="fake-decode") as e:
        yield e


@pytest.fixture
def relay(engine):
    with Interposer("decode", engine.url) as interposer:
        yield handle(interposer)


def stream_lines(url: str, max_tokens: int = 12, **extra) -> tuple[list[str], Exception | None]:
    lines, error = [], None
    try:
        with httpx.stream("POST", f"{url}/v1/completions", timeout=10, headers={"X-Request-Id": "r1"},
                          json={"model": "m", "prompt": PROMPT, "max_tokens": max_tokens, "stream": True, **extra}) as r:
            for line in r.iter_lines():
                lines.append(line)
    except httpx.HTTPError as exc:
        error = exc
    return [x for x in lines if x], error


def test_a_streamed_request_passes_through_unchanged_and_is_recorded(relay, engine):
    direct, _ = stream_lines(engine.url)
    relayed, error = stream_lines(relay.url)
    assert error is None and relayed == direct and relayed[-1] == "data: [DONE]"
    ex = relay.exchanges()[-1]
    assert (ex.path, ex.body["max_tokens"], ex.body["stream"], ex.events, ex.done) == ("/v1/completions", 12, True,
                                                                                    13, True)


def test_the_request_id_headers_and_a_prefills_kv_transfer_params_are_recorded(engine):
    with Interposer("prefill", engine.url) as interposer:
        relay = handle(interposer)
        body = {"model": "m", "prompt": PROMPT, "max_tokens": 1, "stream": False,
                "kv_transfer_params": {"do_remote_decode": True}}
        resp = requests.post(f"{relay.url}/v1/completions", json=body, headers={"X-Request-Id": "abc"}, timeout=10)
        ex = relay.exchanges()[-1]
    assert resp.status_code == 200
    assert ex.request_id == "abc" and ex.body == body
    assert ex.response["kv_transfer_params"] == resp.json()["kv_transfer_params"] != None  # noqa: E711


def test_health_and_metrics_pass_through_but_are_not_generation_requests(relay):
    assert requests.get(f"{relay.url}/health", timeout=5).status_code == 200
    assert "vllm:num_requests_running" in requests.get(f"{relay.url}/metrics", timeout=5).text
    assert relay.exchanges() == []
    assert [e.path for e in relay.exchanges(generation_only=False)] == ["/health", "/metrics"]


def test_a_refusing_worker_refuses_connections_and_comes_back(relay):
    with relay.fault("refuse"):
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{relay.url}/health", timeout=5)
    assert requests.get(f"{relay.url}/health", timeout=5).status_code == 200


def test_a_refusing_worker_also_resets_a_connection_the_router_kept_open(relay):
    with httpx.Client(timeout=5) as client:  # one pooled keep-alive connection
        assert client.get(f"{relay.url}/health").status_code == 200
        with relay.fault("refuse"):
            with pytest.raises(httpx.TransportError):
                client.post(f"{relay.url}/v1/completions", json={"model": "m", "prompt": PROMPT, "max_tokens": 2})


def test_a_failing_worker_answers_the_status_in_vllms_error_shape_and_never_reaches_the_engine(relay, engine):
    with relay.fault("http_error", status=503):
        resp = requests.post(f"{relay.url}/v1/completions", json={"model": "m", "prompt": PROMPT}, timeout=5)
        assert requests.get(f"{relay.url}/health", timeout=5).status_code == 200
    assert resp.status_code == 503 and "503" in resp.json()["error"]["message"]
    assert engine.state.bodies == [] and relay.exchanges()[-1].fault == "http_error"


def test_a_prefill_can_be_made_to_answer_without_kv_transfer_params(engine):
    with Interposer("prefill", engine.url) as interposer:
        relay = handle(interposer)
        body = {"model": "m", "prompt": PROMPT, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
        with relay.fault("strip_kv_transfer_params"):
            resp = requests.post(f"{relay.url}/v1/completions", json=body, timeout=10)
        ex = relay.exchanges()[-1]
    assert resp.status_code == 200 and resp.json()["kv_transfer_params"] is None and resp.json()["choices"]
    assert ex.response["kv_transfer_params"] is not None, "the record keeps what the engine answered"


def test_a_cut_stream_resets_the_connection_after_n_events(relay, engine):
    with relay.fault("cut_stream", after_events=3):
        lines, error = stream_lines(relay.url, max_tokens=50)
    assert len(lines) == 3 and isinstance(error, httpx.TransportError), (lines, error)
    assert relay.exchanges()[-1].events == 3


def test_an_ended_stream_ends_cleanly_after_n_events_without_done(relay):
    with relay.fault("end_stream", after_events=4):
        lines, error = stream_lines(relay.url, max_tokens=50)
    assert error is None and len(lines) == 4 and "data: [DONE]" not in lines


def test_a_stalled_worker_holds_the_request_until_the_fault_is_cleared(relay):
    relay.set_fault("stall")
    try:
        with pytest.raises(requests.Timeout):
            requests.post(f"{relay.url}/v1/completions", json={"model": "m", "prompt": PROMPT}, timeout=1)
    finally:
        relay.set_fault(None)
    assert requests.post(f"{relay.url}/v1/completions", json={"model": "m", "prompt": PROMPT},
                         timeout=5).status_code == 200


def test_a_router_that_leaves_mid_stream_is_recorded_and_the_engine_request_is_closed(engine):
    engine.state.token_delay_s = 0.05
    with Interposer("decode", engine.url) as interposer:
        relay = handle(interposer)
        with httpx.stream("POST", f"{relay.url}/v1/completions", timeout=10,
                          json={"model": "m", "prompt": PROMPT, "max_tokens": 200, "stream": True}) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n >= 4:
                    break
        import time
        deadline = time.monotonic() + 5
        while not relay.exchanges()[-1].router_left and time.monotonic() < deadline:
            time.sleep(0.05)
        assert relay.exchanges()[-1].router_left
        while engine.state.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.state.running == 0 and engine.state.counters["aborted"] == 1


@pytest.mark.parametrize("fault, message", [
    ({"kind": "explode"}, "unknown fault 'explode'"),
    ({"kind": "http_error", "status": 42}, "must be an HTTP status"),
    ({"kind": "cut_stream", "after": 3}, r"fault fields \['after'\] are unknown"),
    ([1, 2], "a fault is a JSON object"),
])
def test_a_bad_fault_is_a_400_naming_what_was_wrong_and_changes_nothing(relay, fault, message):
    resp = requests.put(f"{relay.control_url}/fault", data=json.dumps(fault), timeout=5)
    assert resp.status_code == 400
    assert pytest.raises(InterposerError, Fault.from_json, fault).match(message)
    assert requests.get(f"{relay.control_url}/", timeout=5).json()["fault"] is None


def test_a_control_url_that_is_no_interposer_is_an_error_naming_it(engine):
    with pytest.raises(InterposerError, match=f"{engine.url} is not an interposer's control URL"):
        InterposedEngine(engine.url).connect()
