"""The burst's account of an expired KV lease, from the relays' records (suites/load_checks.py):
which part of the lease's path the relays saw go wrong, the router's or the decode's."""

from __future__ import annotations

import time
from types import SimpleNamespace

from harness.interposer import Exchange
from suites.load_checks import handoffs, where_the_lease_went

LEASE_S = 30.0


class Relay:
    def __init__(self, exchanges: list[Exchange]):
        self._exchanges = exchanges

    def exchanges(self, since: int = 0) -> list[Exchange]:
        return self._exchanges[since:]


def prefill(seq: int, rid: str, ended: float) -> Exchange:
    return Exchange(seq, "prefill", "POST", "/v1/completions", {}, {}, started=ended - 0.1, status=200, ended=ended,
                    response={"kv_transfer_params": {"remote_request_id": rid, "remote_block_ids": [[1]]}})


def decode(seq: int, rid: str, started: float, first_token_after: float) -> Exchange:
    return Exchange(seq, "decode", "POST", "/v1/completions", {}, {"kv_transfer_params": {"remote_request_id": rid}},
                    started=started, status=200, events=5, done=True, first_event=started + first_token_after,
                    ended=started + first_token_after + 1)


def deployment(prefills: list[Exchange], decodes: list[Exchange]):
    return SimpleNamespace(interposed={"prefill": Relay(prefills), "decode": Relay(decodes)})


def test_a_prefill_no_decode_asked_for_is_named_as_the_routers():
    d = deployment([prefill(0, "a", 100.0), prefill(1, "a-retried", 101.0)], [decode(0, "a-retried", 101.01, 0.05)])
    account = handoffs(d, {"prefill": 0, "decode": 0}, LEASE_S)
    assert account["prefill_requests"] == 2 and account["unread_prefill_count"] == 1
    assert account["unread_prefills"] == ["a"]
    said = where_the_lease_went(account, requests=1)
    assert "the router sent 2 prefills for 1 requests" in said and "late" not in said


def test_a_decode_that_pulls_after_the_lease_is_named_as_the_decodes():
    d = deployment([prefill(0, "a", 100.0)], [decode(0, "a", 100.01, LEASE_S + 2)])
    account = handoffs(d, {"prefill": 0, "decode": 0}, LEASE_S)
    assert account["unread_prefill_count"] == 0 and account["decode_first_token_after_a_lease"] == 1
    assert "pulled late" in where_the_lease_went(account, requests=1)


def test_when_neither_explains_an_expiry_the_account_says_so():
    d = deployment([prefill(0, "a", 100.0)], [decode(0, "a", 100.2, 0.05)])
    account = handoffs(d, {"prefill": 0, "decode": 0}, LEASE_S)
    assert account["max_s"] == 0.2
    assert "neither the router's handoff nor a late pull explains it" in where_the_lease_went(account, requests=1)


def test_kv_a_prefill_answered_and_no_decode_asked_for_is_handed_to_the_decode_engine(fake_engines):
    """What a planted router strands on the prefill is pulled at once, not left pinned for a lease."""
    from suites.interposed_checks import release_stranded_kv

    engine = fake_engines("decode")
    now = time.time()
    stranded, taken, expired = prefill(0, "stranded", now), prefill(1, "taken", now), prefill(2, "expired", now - LEASE_S)
    for ex in (stranded, taken, expired):
        ex.body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 1, "stream": False}
        ex.response["kv_transfer_params"] |= {"do_remote_prefill": True}
    d = deployment([stranded, taken, expired], [decode(0, "taken", now + 0.01, 0.05)])
    d.engines, d.url, d.profile = {"decode": engine}, lambda role: engine.url, SimpleNamespace(kv_lease_s=LEASE_S)
    assert release_stranded_kv(d, {"prefill": 0, "decode": 0}) == 1, "blocks past their lease are the prefill's"
    (body,) = engine.state.bodies
    assert body["kv_transfer_params"]["remote_request_id"] == "stranded" and body["max_tokens"] == 1
