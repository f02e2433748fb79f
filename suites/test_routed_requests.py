"""What the router sent each engine (SPEC §4.1, R6, R7), read off the suite's relays in front of them.

Any router that takes its engines' URLs is checked this way (`--frontend-cmd`, or `--interposed`
with `python -m harness interpose`); the embedded frontend is given its engines through relays
too. Each check is shown failing on a planted router that breaks it.
"""

from __future__ import annotations

import pytest

from harness import evidence as ev
from suites import interposed_checks as checks

pytestmark = [pytest.mark.engines, pytest.mark.xdist_group("engines"), pytest.mark.needs(ev.FRONTEND, ev.INTERPOSED)]


@pytest.mark.spec("4.1", "R6")
def test_prefill_and_decode_requests_share_one_request_id(disagg, record_property):
    record_property("request_ids", checks.check_prefill_and_decode_share_one_request_id(disagg))


@pytest.mark.spec("4.1", "R6")
def test_prefill_and_decode_requests_carry_the_clients_request_id(disagg, record_property):
    record_property("request_ids", checks.check_prefill_and_decode_carry_the_clients_request_id(disagg))


@pytest.mark.spec("4.1", "R7")
@pytest.mark.parametrize("stream", [False, True], ids=["unstreamed", "streamed"])
def test_the_prefill_is_asked_for_one_token_and_the_decode_gets_its_kv_transfer_params(disagg, stream,
                                                                                      record_property):
    record_property("sent", checks.check_the_prefill_protocol(disagg, stream))


# ---- each check fails on a router that breaks it


@pytest.mark.spec("R6")
@pytest.mark.needs(ev.PLANTED_ROUTER)
def test_a_router_that_gives_the_decode_another_request_id_is_caught(disagg, planted_router, record_property):
    checks.caught(record_property, "the prefill ran under X-Request-Id",
                  checks.check_prefill_and_decode_share_one_request_id, planted_router("split_request_id"))


@pytest.mark.spec("4.1")
@pytest.mark.needs(ev.PLANTED_ROUTER)
def test_a_router_that_makes_its_own_request_id_is_caught(disagg, planted_router, record_property):
    planted = planted_router("own_request_id")
    checks.check_prefill_and_decode_share_one_request_id(planted)  # it does share one: its own
    checks.caught(record_property, "the client's id does not trace the request",
                  checks.check_prefill_and_decode_carry_the_clients_request_id, planted)


@pytest.mark.spec("4.1")
@pytest.mark.needs(ev.PLANTED_ROUTER)
def test_a_router_that_sends_the_prefill_the_whole_request_is_caught(disagg, planted_router, record_property):
    checks.caught(record_property, r"the prefill request had max_tokens 12 .*not 1.*do_remote_decode",
                  checks.check_the_prefill_protocol, planted_router("prefill_whole_answer"), stream=False)


@pytest.mark.spec("R7")
@pytest.mark.needs(ev.PLANTED_ROUTER)
@pytest.mark.parametrize("fault, keys", [("drop_kv_transfer_params", "do_remote_prefill"),
                                         ("report_decode_usage", "remote_prefill_cached_tokens")])
def test_a_router_that_changes_the_kv_transfer_params_on_the_way_to_decode_is_caught(disagg, planted_router, fault,
                                                                                   keys, record_property):
    checks.caught(record_property, f"not exactly the prefill's .*{keys}",
                  checks.check_the_prefill_protocol, planted_router(fault), stream=False)
