"""A broken worker behind any router (SPEC §4.1, §4.4): the suite's relay stands in for it.

The prefill refuses connections (dead), answers HTTP 500 (failing), answers without
kv_transfer_params, or is slow; the decode dies
mid-stream, reset or ended without `[DONE]`. What the router does is read off the client's answer
and the relays; no router cooperation is needed. Each check is shown failing on a planted router.
"""

from __future__ import annotations

import pytest

from harness import evidence as ev
from suites import interposed_checks as checks

pytestmark = [pytest.mark.engines, pytest.mark.xdist_group("engines"), pytest.mark.needs(ev.FRONTEND, ev.INTERPOSED)]


@pytest.mark.spec("4.1")
def test_with_its_prefill_worker_dead_the_model_is_served_aggregated_then_disaggregated_again(disagg,
                                                                                             record_property):
    record_property("fallback", checks.check_without_its_prefill_the_model_is_served_aggregated(disagg))


@pytest.mark.spec("4.1")
def test_a_prefill_that_answers_500_is_reported_and_not_retried_on_decode(disagg, record_property):
    record_property("prefill_error", checks.check_a_prefill_error_is_reported_and_not_retried_on_decode(disagg))


@pytest.mark.spec("4.1", "R7")
def test_a_prefill_that_returns_no_kv_transfer_params_is_an_error_not_a_silent_recompute(disagg, record_property):
    record_property("no_kv_transfer_params",
                    checks.check_a_prefill_without_kv_transfer_params_is_an_error_not_a_recompute(disagg))


@pytest.mark.spec("4.4")
@pytest.mark.parametrize("how", ["cut_stream", "end_stream"], ids=["reset", "ended-without-done"])
def test_a_decode_dying_mid_stream_gives_the_client_an_error_never_a_complete_looking_stream(disagg, how,
                                                                                             record_property):
    record_property("decode_death", checks.check_a_decode_dying_mid_stream_gives_the_client_an_error(disagg, how))


@pytest.mark.spec("4.4", "R6")
def test_a_client_that_leaves_during_prefill_leaves_nothing_running(disagg, record_property):
    record_property("left_during_prefill", checks.check_a_client_leaving_during_prefill_leaves_nothing_running(disagg))


# ---- each check fails on a router that breaks it


@pytest.mark.spec("4.1")
@pytest.mark.needs(ev.PLANTED_ROUTER)
def test_a_router_without_aggregated_fallback_is_caught(disagg, planted_router, record_property):
    checks.caught(record_property, "never served the model aggregated",
                  checks.check_without_its_prefill_the_model_is_served_aggregated,
                  planted_router("no_aggregated_fallback"), failure=pytest.fail.Exception)


@pytest.mark.spec("4.1")
@pytest.mark.needs(ev.PLANTED_ROUTER)
def test_a_router_that_reruns_a_failed_prefill_on_decode_is_caught(disagg, planted_router, record_property):
    checks.caught(record_property, "sent the request to the decode anyway",
                  checks.check_a_prefill_error_is_reported_and_not_retried_on_decode,
                  planted_router("retry_prefill_on_decode"))


@pytest.mark.spec("R7")
@pytest.mark.needs(ev.PLANTED_ROUTER)
def test_a_router_that_decodes_without_kv_transfer_params_is_caught(disagg, planted_router, record_property):
    checks.caught(record_property, "the decode recomputed the prompt silently",
                  checks.check_a_prefill_without_kv_transfer_params_is_an_error_not_a_recompute,
                  planted_router("retry_prefill_on_decode"))


@pytest.mark.spec("4.4")
@pytest.mark.needs(ev.PLANTED_ROUTER)
def test_a_router_that_ends_the_stream_cleanly_when_its_decode_dies_is_caught(disagg, planted_router,
                                                                              record_property):
    checks.caught(record_property, "ends as if complete",
                  checks.check_a_decode_dying_mid_stream_gives_the_client_an_error,
                  planted_router("end_cleanly_on_decode_death"), "cut_stream")


@pytest.mark.spec("4.4")
@pytest.mark.needs(ev.PLANTED_ROUTER)
def test_a_router_that_decodes_for_a_client_that_left_is_caught(disagg, planted_router, record_property):
    checks.caught(record_property, "ran the decode for nobody",
                  checks.check_a_client_leaving_during_prefill_leaves_nothing_running,
                  planted_router("decode_for_nobody"))
