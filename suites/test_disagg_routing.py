"""Disaggregated routing (SPEC §4.1): same output as aggregated, and the KV really moved.

Runs with the `cpu` profile (vLLM CPU + NixlConnector) in CI, the GPU profiles with -m gpu, and
against a foreign frontend given by URL. Every check records the decode engine's prompt-token
counts by source in the report, and how outputs were compared.
"""

from __future__ import annotations

import dataclasses

import pytest
import requests

from harness import evidence as ev
from harness.cluster import Cluster
from harness.engines.metrics import Metrics, kv_sources
from harness.openai_client import comparable_by, output, routing_mode
from suites.disagg_checks import (assert_computed_locally, assert_kv_moved, assert_warmed, fresh_prompt,
                                  need_kv_sources, need_metrics, post_directly)
from suites.interposed_checks import disaggregated_decode, eos_ignored, marks, seen
from suites.planted_frontends import start_planted

pytestmark = [pytest.mark.spec("4.1"), pytest.mark.engines, pytest.mark.xdist_group("engines"),
              pytest.mark.needs(ev.FRONTEND)]
DECODE_METRICS = ev.engine_metrics("decode")

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
    assert response.status_code == 200, f"HTTP {response.status_code}: {response.text[:300]}"
    usage = response.json().get("usage")
    assert usage and "prompt_tokens" in usage, f"the response has no usage.prompt_tokens: {response.text[:300]}"
    return usage["prompt_tokens"]


def recompute_allowed(disagg) -> int:
    """What the decode may recompute itself: nothing, or the last block for full-block connectors."""
    profile = disagg.profile
    return 0 if profile is None or profile.moves_partial_block else profile.block_size


def scrape_decode(disagg) -> Metrics | None:
    return Metrics.scrape(disagg.url("decode")) if disagg.has("decode") else None


@pytest.mark.needs(ev.AGGREGATED_REFERENCE, ev.PREFILL_WORKER)
@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_output_through_disagg_equals_aggregated(disagg, name, record_property):
    frontend, reference_engine = disagg.endpoint(), disagg.engine_endpoint("aggregated")
    by = comparable_by(frontend, reference_engine)
    reference = output(reference_engine.complete(PROMPTS[name]), by)
    before = scrape_decode(disagg)
    relays = marks(disagg) if disagg.interposed else None
    resp = frontend.complete(PROMPTS[name])
    after = scrape_decode(disagg)
    record_property("compared_by", by)
    mode = routing_mode(resp)
    if mode == "unknown" and relays is not None:  # no routing header: the relays saw what the router did
        got = seen(disagg, relays)
        mode = "disaggregated" if got["prefill"] and any(disaggregated_decode(e) for e in got["decode"]) else \
            "aggregated" if got["decode"] else "unknown"
    assert mode != "aggregated", "the frontend served the request aggregated: nothing disaggregated was compared"
    if mode == "unknown":  # no routing evidence: the decode engine's own counters must show the transfer
        if before is None or before.missing("prompt_tokens_external_kv_transfer"):
            pytest.skip(f"cannot tell whether the request was disaggregated: {ev.ROUTING_HEADERS.lacking()}, "
                        f"or {DECODE_METRICS.lacking()} with KV-source counters")
    assert output(resp, by) == reference, f"{name}: disaggregated output diverged from aggregated (by {by})"
    if before is None or before.missing("prompt_tokens_external_kv_transfer"):
        return
    if name == "shares-a-prefix":  # the decode may hold the shared blocks from the earlier transfer
        numbers = {"prompt_tokens": prompt_tokens(resp), **kv_sources(after, before)}
        assert numbers["local_compute"] <= recompute_allowed(disagg), f"decode recomputed a transferred prompt: {numbers}"
    else:
        numbers = assert_kv_moved(before, after, prompt_tokens(resp), recompute_allowed(disagg), disagg.kv_block())
    record_property("kv", numbers)


@pytest.mark.needs(DECODE_METRICS)
def test_the_kv_of_a_fresh_prompt_really_moves_to_decode(disagg, record_property):
    before = Metrics.scrape(disagg.url("decode"))
    need_kv_sources(before)
    resp = disagg.endpoint().complete(fresh_prompt(60))
    numbers = assert_kv_moved(before, Metrics.scrape(disagg.url("decode")), prompt_tokens(resp),
                              recompute_allowed(disagg), disagg.kv_block())
    record_property("kv", numbers)
    if disagg.profile and disagg.profile.connector == "NixlConnector":
        assert numbers["transfer_bytes"] > 0, "NIXL reported no bytes transferred"


@pytest.mark.spec("4.1", "5")
def test_a_repeated_prompt_reports_the_prefills_prefix_hits_as_cached_tokens(disagg, record_property):
    prompt = fresh_prompt(80)  # several full blocks
    first, second = disagg.endpoint().complete(prompt), disagg.endpoint().complete(prompt)
    usages = [r.json().get("usage") or {} for r in (first, second)]
    details = [u.get("prompt_tokens_details", "absent") for u in usages]
    record_property("prompt_tokens_details", details)
    assert details[1] != "absent" and details[1] is not None, (
        f"usage has no prompt_tokens_details (reported distinctly from an explicit 0): {usages[1]}")
    assert details[1]["cached_tokens"] >= (disagg.profile.block_size if disagg.profile else 1), (
        f"the repeat was not served from the prefill's prefix cache: {details}")


@pytest.fixture
def planted_cluster(disagg):
    """A second harness frontend, with a planted bug, in front of the same engines."""
    made = []

    def make(fault: str) -> Cluster:
        made.append(start_planted(disagg, fault, [disagg.engines["prefill"], disagg.engines["decode"]]))
        return made[-1]

    yield make
    for cluster in made:
        cluster.stop()


@pytest.mark.spec("R7")
@pytest.mark.needs(ev.PLANTED_ROUTER)
def test_a_router_that_drops_kv_transfer_params_is_caught(disagg, planted_cluster, record_property):
    if not disagg.profile.proves_protocol:
        pytest.skip(f"profile {disagg.profile.name}: {disagg.profile.connector} ignores kv_transfer_params, "
                    f"so dropping them changes nothing it can see")
    cluster = planted_cluster("drop_kv_transfer_params")
    before = Metrics.scrape(disagg.url("decode"))
    resp = requests.post(f"{cluster.url}/v1/completions", timeout=120, json={
        "model": disagg.model, "prompt": fresh_prompt(60), "max_tokens": 16, "temperature": 0.0})
    after = Metrics.scrape(disagg.url("decode"))
    with pytest.raises(AssertionError, match="recomputed"):
        assert_kv_moved(before, after, prompt_tokens(resp))
    record_property("kv_with_planted_bug", assert_computed_locally(before, after, prompt_tokens(resp)))


def engine_request_ids(resp: requests.Response) -> dict[str, str | None]:
    return {role: resp.headers.get(f"x-disagg-{role}-engine-request-id") for role in ("prefill", "decode")}


@pytest.mark.spec("R6")
@pytest.mark.needs(ev.ENGINE_REQUEST_IDS, ev.PREFILL_WORKER)
def test_prefill_and_decode_run_under_the_clients_request_id(disagg):
    rid = fresh_prompt(1).split()[1].rstrip(":")
    # ignore_eos where taken: a prompt whose greedy first token is EOS ends on the prefill, with no decode
    resp = disagg.endpoint().complete(fresh_prompt(40), headers={"X-Request-Id": rid},
                                      **eos_ignored(disagg.endpoint()))
    assert resp.status_code == 200
    assert engine_request_ids(resp) == {"prefill": f"cmpl-{rid}", "decode": f"cmpl-{rid}"}


@pytest.mark.spec("R6")
@pytest.mark.needs(ev.PLANTED_ROUTER)
def test_a_router_that_splits_the_request_id_is_caught(disagg, planted_cluster):
    planted_frontend = planted_cluster("split_request_id")
    rid = fresh_prompt(1).split()[1].rstrip(":")
    resp = requests.post(f"{planted_frontend.url}/v1/completions", headers={"X-Request-Id": rid}, timeout=120,
                         json={"model": disagg.model, "prompt": fresh_prompt(40), "max_tokens": 4})
    with pytest.raises(AssertionError):
        assert engine_request_ids(resp) == {"prefill": f"cmpl-{rid}", "decode": f"cmpl-{rid}"}


@pytest.mark.spec("4.1", "3")
@pytest.mark.needs(ev.ENGINE_CONTROL, ev.AGGREGATED_REFERENCE, ev.ROUTING_HEADERS, DECODE_METRICS)
def test_without_a_prefill_worker_the_model_serves_aggregated_and_returns_to_disagg(disagg, record_property):
    prompt = fresh_prompt(50)
    frontend, reference_engine = disagg.endpoint(), disagg.engine_endpoint("aggregated")
    by = comparable_by(frontend, reference_engine)
    reference = output(reference_engine.complete(prompt), by)
    disagg.stop_role("prefill")
    try:
        disagg.cluster.wait_for_roles({"decode"}, timeout_s=30)
        before = Metrics.scrape(disagg.url("decode"))
        resp = frontend.complete(prompt)
        after = Metrics.scrape(disagg.url("decode"))
        assert routing_mode(resp) == "aggregated"
        assert output(resp, by) == reference
        record_property("kv_aggregated", assert_computed_locally(before, after, prompt_tokens(resp)))
    finally:
        disagg.launch(("prefill",))
    before = Metrics.scrape(disagg.url("decode"))
    resp = frontend.complete(fresh_prompt(50))
    assert routing_mode(resp) == "disaggregated"
    record_property("kv_back_to_disagg", assert_kv_moved(before, Metrics.scrape(disagg.url("decode")),
                                                          prompt_tokens(resp), recompute_allowed(disagg)))


def warm_prefill(disagg, prompt: str) -> str:
    """The prompt into the prefill's prefix cache: directly, so the decode does not hold it too. An
    SGLang prefill takes only bootstrap requests (sglang 0.5.23: HTTP 400 "Disaggregated request
    received without bootstrap room id"), so it is warmed through the deployment, twice (SGLang
    exports its cache-hit counter from its first hit on); its decode keeps no prefix cache in
    disaggregation, so what the decode reports cannot stand in for the prefill's hits."""
    body = {"model": disagg.model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0}
    direct = post_directly(disagg.url("prefill"), "/v1/completions", body)  # skips where it serves no OpenAI API
    if direct.status_code == 400 and "bootstrap room" in direct.text:
        for _ in range(2):
            resp = disagg.endpoint().complete(prompt, max_tokens=1)
            assert resp.status_code == 200, f"warming through the deployment: HTTP {resp.status_code} {resp.text[:200]}"
        return "through the deployment: the prefill takes only bootstrap requests"
    assert_warmed(disagg.url("prefill"), "/v1/completions", direct)
    return "directly"


def check_cached_tokens_are_the_prefills(disagg) -> dict:
    """The client's cached_tokens are the prefill's own prefix hits for that request. The prefill is
    warmed directly first, so it holds the blocks and the decode does not: a frontend that passes on
    the decode's usage reports what the decode saw instead."""
    prompt = fresh_prompt(80)
    warmed = warm_prefill(disagg, prompt)
    before = Metrics.scrape(disagg.url("prefill"))
    need_metrics(before, "prompt_tokens_local_cache_hit")
    resp = disagg.endpoint().complete(prompt)
    hits = kv_sources(Metrics.scrape(disagg.url("prefill")), before)["local_cache_hit"]
    details = (resp.json().get("usage") or {}).get("prompt_tokens_details")
    numbers = {"client_cached_tokens": (details or {}).get("cached_tokens", "missing"), "prefill_prefix_hits": hits,
               "prompt_tokens": prompt_tokens(resp), "routing": routing_mode(resp), "prefill_warmed": warmed}
    assert numbers["routing"] != "aggregated", (
        f"the frontend served the request aggregated, so the prefill never saw it: {numbers}")
    assert hits > 0, f"the warmed prefill found nothing in its cache: {numbers}"
    assert numbers["client_cached_tokens"] == hits, (
        f"the client was told {numbers['client_cached_tokens']} cached tokens, the prefill counted {hits:.0f} "
        f"prefix hits: the usage is not the prefill's {numbers}")
    return numbers


@pytest.mark.spec("4.1", "5")
@pytest.mark.needs(ev.engine_metrics("prefill"))
def test_cached_tokens_are_the_prefills_own_prefix_hits(disagg, record_property):
    record_property("numbers", check_cached_tokens_are_the_prefills(disagg))


@pytest.mark.spec("4.1", "5")
@pytest.mark.needs(ev.PLANTED_ROUTER, ev.engine_metrics("prefill"))
def test_a_frontend_that_reports_the_decodes_usage_is_caught(disagg, planted_cluster, record_property):
    cluster = planted_cluster("report_decode_usage")
    planted = dataclasses.replace(disagg, frontend_url=cluster.url, _endpoints={})
    with pytest.raises(AssertionError, match="not the prefill's") as caught:
        check_cached_tokens_are_the_prefills(planted)
    record_property("caught", str(caught.value).splitlines()[0])
