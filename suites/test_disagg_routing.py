"""Disaggregated routing against real engines (SPEC §4.1): same tokens, KV really moved.

Runs with the `cpu` profile (vLLM CPU + NixlConnector) in CI and the GPU profiles with -m gpu.
Every check records the decode engine's prompt-token counts by source in the report.
"""

from __future__ import annotations

import pytest
import requests

from harness.engines.metrics import Metrics, kv_sources
from harness.frontend.router import FAULT_DROP_KV_TRANSFER_PARAMS, FAULT_SPLIT_REQUEST_ID
from harness.cluster import Cluster
from suites.disagg_checks import (assert_computed_locally, assert_kv_moved, complete, fresh_prompt,
                                  token_ids)

pytestmark = [pytest.mark.spec("4.1"), pytest.mark.engines, pytest.mark.xdist_group("engines")]

LONG = ("Disaggregated serving splits prefill and decode across different workers. The key value cache "
        "stores attention keys and values for each block of tokens. The server receives a request, runs the "
        "prefill, and then decodes new tokens. Scientists measure temperature, pressure, humidity and wind "
        "speed every hour, while farmers plant wheat, corn, barley and potatoes when spring arrives.")
PROMPTS = {
    "shorter-than-a-block": "Hello, how are you today?",
    "just-over-one-block": "Once upon a time there was a small robot who liked to count numbers. "
                           "She opened the window and looked at the rain falling on the quiet street again.",
    "several-blocks": LONG,
    "shares-a-prefix": LONG + " Musicians practice guitar, piano and violin each evening.",
}


def prompt_tokens(response: requests.Response) -> int:
    return response.json()["usage"]["prompt_tokens"]


def recompute_allowed(disagg) -> int:
    """What the decode may recompute itself: nothing, or the last block for full-block connectors."""
    profile = disagg.profile
    return 0 if profile is None or profile.moves_partial_block else profile.block_size


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_output_through_disagg_equals_aggregated_token_for_token(disagg, name, record_property):
    if not disagg.has("aggregated"):
        pytest.skip("no aggregated engine to compare against (give --engine-url aggregated=URL)")
    reference = token_ids(complete(disagg.url("aggregated"), disagg.model, PROMPTS[name]))
    before = Metrics.scrape(disagg.url("decode"))
    resp = complete(disagg.frontend_url, disagg.model, PROMPTS[name])
    after = Metrics.scrape(disagg.url("decode"))
    assert resp.headers.get("x-disagg-mode", "disaggregated") == "disaggregated", "the frontend served aggregated"
    assert token_ids(resp) == reference, f"{name}: disaggregated output diverged from aggregated"
    if name == "shares-a-prefix":  # the decode may hold the shared blocks from the earlier transfer
        numbers = {"prompt_tokens": prompt_tokens(resp), **kv_sources(after, before)}
        assert numbers["local_compute"] <= recompute_allowed(disagg), f"decode recomputed a transferred prompt: {numbers}"
    else:
        numbers = assert_kv_moved(before, after, prompt_tokens(resp), recompute_allowed(disagg))
    record_property("kv", numbers)


def test_the_kv_of_a_fresh_prompt_really_moves_to_decode(disagg, record_property):
    before = Metrics.scrape(disagg.url("decode"))
    resp = complete(disagg.frontend_url, disagg.model, fresh_prompt(60))
    assert resp.status_code == 200, resp.text
    numbers = assert_kv_moved(before, Metrics.scrape(disagg.url("decode")), prompt_tokens(resp),
                              recompute_allowed(disagg))
    record_property("kv", numbers)
    if disagg.profile and disagg.profile.connector == "NixlConnector":
        assert numbers["transfer_bytes"] > 0, "NIXL reported no bytes transferred"


@pytest.mark.spec("4.1", "5")
def test_a_repeated_prompt_reports_the_prefills_prefix_hits_as_cached_tokens(disagg, record_property):
    prompt = fresh_prompt(80)  # several full blocks
    first = complete(disagg.frontend_url, disagg.model, prompt)
    second = complete(disagg.frontend_url, disagg.model, prompt)
    details = [(r.json()["usage"] or {}).get("prompt_tokens_details") for r in (first, second)]
    record_property("prompt_tokens_details", details)
    assert details[1] is not None, "usage has no prompt_tokens_details (engine started without them?)"
    assert details[1]["cached_tokens"] >= (disagg.profile.block_size if disagg.profile else 1), (
        f"the repeat was not served from the prefill's prefix cache: {details}")


@pytest.fixture
def planted_cluster(disagg):
    """A second harness frontend, with a planted bug, in front of the same engines."""
    made = []

    def make(fault: str) -> Cluster:
        cluster = Cluster(disagg.workdir / f"planted-{fault}", disagg.cluster.model_dir, disagg.model,
                          block_size=disagg.profile.block_size, timeout_s=disagg.profile.request_timeout_s,
                          protocol=disagg.profile.protocol, faults=frozenset({fault})).start()
        made.append(cluster)
        cluster.register(disagg.engines["prefill"])
        cluster.register(disagg.engines["decode"])
        cluster.wait_for_roles({"prefill", "decode"})
        return cluster

    yield make
    for cluster in made:
        cluster.stop()


@pytest.mark.spec("R7")
@pytest.mark.embedded_only
def test_a_router_that_drops_kv_transfer_params_is_caught(disagg, planted_cluster, record_property):
    if not disagg.profile.proves_protocol:
        pytest.skip(f"profile {disagg.profile.name}: {disagg.profile.connector} ignores kv_transfer_params, "
                    f"so dropping them changes nothing it can see")
    cluster = planted_cluster(FAULT_DROP_KV_TRANSFER_PARAMS)
    before = Metrics.scrape(disagg.url("decode"))
    resp = complete(cluster.url, disagg.model, fresh_prompt(60))
    after = Metrics.scrape(disagg.url("decode"))
    assert resp.status_code == 200
    with pytest.raises(AssertionError, match="recomputed"):
        assert_kv_moved(before, after, prompt_tokens(resp))
    record_property("kv_with_planted_bug", assert_computed_locally(before, after, prompt_tokens(resp)))


@pytest.mark.spec("R6")
@pytest.mark.embedded_only
def test_prefill_and_decode_run_under_the_clients_request_id(disagg, planted_cluster):
    rid = fresh_prompt(1).split()[1].rstrip(":")
    resp = complete(disagg.frontend_url, disagg.model, fresh_prompt(40), headers={"X-Request-Id": rid})
    assert resp.status_code == 200
    ids = {role: resp.headers.get(f"x-disagg-{role}-engine-request-id") for role in ("prefill", "decode")}
    assert ids == {"prefill": f"cmpl-{rid}", "decode": f"cmpl-{rid}"}, ids

    planted = planted_cluster(FAULT_SPLIT_REQUEST_ID)
    resp = complete(planted.url, disagg.model, fresh_prompt(40), headers={"X-Request-Id": rid + "x"})
    split = {role: resp.headers.get(f"x-disagg-{role}-engine-request-id") for role in ("prefill", "decode")}
    assert split["prefill"] != split["decode"], "the planted split went unnoticed"


@pytest.mark.spec("4.1", "3")
@pytest.mark.embedded_only
def test_without_a_prefill_worker_the_model_serves_aggregated_and_returns_to_disagg(disagg, record_property):
    prompt = fresh_prompt(50)
    reference = token_ids(complete(disagg.url("aggregated"), disagg.model, prompt))
    disagg.stop_role("prefill")
    try:
        disagg.cluster.wait_for_roles({"decode"}, timeout_s=30)
        before = Metrics.scrape(disagg.url("decode"))
        resp = complete(disagg.frontend_url, disagg.model, prompt)
        after = Metrics.scrape(disagg.url("decode"))
        assert resp.headers["x-disagg-mode"] == "aggregated"
        assert token_ids(resp) == reference
        record_property("kv_aggregated", assert_computed_locally(before, after, prompt_tokens(resp)))
    finally:
        disagg.launch(("prefill",))
    before = Metrics.scrape(disagg.url("decode"))
    resp = complete(disagg.frontend_url, disagg.model, fresh_prompt(50))
    assert resp.headers["x-disagg-mode"] == "disaggregated"
    record_property("kv_back_to_disagg", assert_kv_moved(before, Metrics.scrape(disagg.url("decode")),
                                                          prompt_tokens(resp), recompute_allowed(disagg)))
