"""Under load (SPEC §8): a burst of requests at once is accounted for exactly by the engines' own
counters, and the engines are idle again afterwards. Checks in suites/load_checks.py; each is
shown failing on a planted router whose bug only shows now and then."""

from __future__ import annotations

import pytest

from harness import evidence as ev
from suites import interposed_checks as checks
from suites import load_checks

pytestmark = [pytest.mark.engines, pytest.mark.xdist_group("engines"),
              pytest.mark.needs(ev.FRONTEND, ev.engine_metrics("prefill"), ev.engine_metrics("decode"))]


@pytest.mark.spec("8", "4.1", "R7")
def test_a_burst_of_64_requests_at_16_at_once_is_accounted_for_exactly_and_leaves_the_engines_idle(disagg,
                                                                                                  record_property):
    numbers = load_checks.check_a_burst_is_accounted_for_exactly(disagg)
    record_property("burst", {k: v for k, v in numbers.items() if k != "answers"})


@pytest.mark.spec("8", "R7")
@pytest.mark.needs(ev.PLANTED_ROUTER)
def test_a_router_that_drops_kv_transfer_params_on_every_fifth_request_is_caught(disagg, planted_router,
                                                                                record_property):
    checks.caught(record_property, "the decode computed .* prompt tokens itself",
                  load_checks.check_a_burst_is_accounted_for_exactly,
                  planted_router("drop_kv_transfer_params_now_and_then"))


@pytest.mark.spec("8")
@pytest.mark.needs(ev.PLANTED_ROUTER)
def test_a_frontend_that_reports_the_decodes_usage_on_every_third_request_is_caught(disagg, planted_router,
                                                                                   record_property):
    checks.caught(record_property, "some usage is not the prefill's", load_checks.check_a_burst_is_accounted_for_exactly,
                  planted_router("report_decode_usage_now_and_then"))
