"""vLLM's own P/D router, `vllm-router` 0.1.17 (PyPI, Rust), checked by the suites as any user's router.

A second pytest starts it with `--frontend-cmd` in front of this run's real vLLM CPU prefill and
decode engines (NIXL), through relays of its own, and runs the routing and fault suites against
it. The verdict must be truthful: every check passes, skips naming its evidence, or fails for a
difference from SPEC found by running it (KNOWN_DIFFERENCES, each with the message that shows it).
The report lands in `<report dir>/vllm-router/` for the conformance matrix.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from harness import evidence as ev
from suites.suite_runs import assert_truthful_verdict, run_suites

pytestmark = [pytest.mark.spec("4.1", "4.4"), pytest.mark.engines, pytest.mark.xdist_group("engines"),
              pytest.mark.harness_code, pytest.mark.needs(ev.PLANTED_ROUTER)]
ROOT = Path(__file__).resolve().parents[1]
SUITES = ("test_routed_requests.py", "test_worker_faults.py", "test_disagg_routing.py", "test_disagg_faults.py",
          "test_under_load.py")
COMMAND = ("vllm-router --vllm-pd-disaggregation --prefill {prefill_url} --decode {decode_url} --host {host} "
           "--port {port} --prometheus-host 127.0.0.1 --prometheus-port {metrics_port} --policy round_robin")
# What vllm-router 0.1.17 does differently from SPEC, as the suites found it by running it here
# (docs/routers.md has the rest of what running it showed). Check -> a fragment of its failure.
KNOWN_DIFFERENCES: dict[str, str] = {
    # Both engines get one id of its own, `___prefill_addr_H:P___decode_addr_H:P_<uuid>`; the
    # client's X-Request-Id only comes back in the response header.
    "test_prefill_and_decode_requests_carry_the_clients_request_id": "the client's id does not trace the request",
    # A decode whose response ends cleanly without [DONE] is passed on as a clean end (a reset one
    # is passed on as a cut chunked transfer, which the client sees).
    "test_a_decode_dying_mid_stream_gives_the_client_an_error_never_a_complete_looking_stream":
        "the client's stream just ended, with no error event and no broken transfer",
    # No aggregated fallback: a refused prefill is a 500 per request; after 3 failed health checks
    # (60 s apart by default) a 503 "No available workers: 0 prefill, 1 decode"; the decode gets nothing.
    "test_with_its_prefill_worker_dead_the_model_is_served_aggregated_then_disaggregated_again":
        "never served the model aggregated",
    # A prefill that answers 200 with kv_transfer_params null: the decode is sent them as null, the
    # client gets a normal 200 (vllm-project/router PR 2's kind of bug, still there for this case).
    "test_a_prefill_that_returns_no_kv_transfer_params_is_an_error_not_a_silent_recompute":
        "the decode recomputed the prompt silently",
}
# The checks that read the relays: against a router behind them, none may skip.
INTERPOSED_CHECKS = ("test_prefill_and_decode_requests_share_one_request_id",
                     "test_prefill_and_decode_requests_carry_the_clients_request_id",
                     "test_the_prefill_is_asked_for_one_token_and_the_decode_gets_its_kv_transfer_params",
                     "test_with_its_prefill_worker_dead_the_model_is_served_aggregated_then_disaggregated_again",
                     "test_a_prefill_that_answers_500_is_reported_and_not_retried_on_decode",
                     "test_a_prefill_that_returns_no_kv_transfer_params_is_an_error_not_a_silent_recompute",
                     "test_a_decode_dying_mid_stream_gives_the_client_an_error_never_a_complete_looking_stream",
                     "test_a_client_that_leaves_during_prefill_leaves_nothing_running")


def test_vllm_router_gets_a_truthful_verdict(disagg, request, record_property):
    if disagg.on_etcd:
        pytest.skip("vllm-router takes its engines' URLs, not a discovery store: it runs once, on the file-store run")
    router = shutil.which("vllm-router", path=str(Path(sys.executable).parent)) or shutil.which("vllm-router")
    if router is None:
        pytest.skip("needs vllm-router on PATH (pip install vllm-router==0.1.17; tox -e py installs it)")
    report_dir = Path(request.config.getoption("report_dir") or ROOT / "reports") / "vllm-router"
    engines = [f"--engine-url={role}={disagg.url(role)}" for role in ("prefill", "decode", "aggregated")]
    command = COMMAND.replace("vllm-router", router, 1)
    report, out = run_suites([f"--frontend-cmd={command}", f"--model={disagg.model}", *engines], report_dir,
                             *[str(ROOT / "suites" / s) for s in SUITES])
    record_property("verdict", report["summary"])
    checks, failed = assert_truthful_verdict(report, out, "vllm-router", KNOWN_DIFFERENCES)
    skipped = [k for k, c in checks.items() if c["outcome"] == "skipped" and k.split("[")[0] in INTERPOSED_CHECKS]
    assert not skipped, f"checks on the relays skipped against vllm-router: {skipped}"
    record_property("differences", {k.split("[")[0]: m[:160] for k, m in failed.items()})
