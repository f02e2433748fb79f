"""Multimodal cached_tokens (SPEC §5, §4.3, §7 R1): a repeated image is served from the prefix
cache on every repeat, a different image never rides on its blocks, and the numbers the client
sees are the serving engine's own.

Embedded: real vLLM engines serving a tiny VLM, behind the reference frontend, once as two
aggregated workers under KV selection and once as prefill -> decode over NIXL. Foreign: the
frontend at --frontend-url serving --mm-model. Each check records, per request, cached_tokens,
prompt tokens, the image span, the worker chosen and the router's prediction.
"""

from __future__ import annotations

import os

import pytest
import requests

from fixtures.tiny_llama import BASE_SENTENCES
from harness import evidence as ev
from harness.engines.metrics import Metrics, kv_sources
from harness.openai_client import serving_worker
from suites.disagg_checks import assert_kv_moved, need_kv_sources, warm_directly
from suites.multimodal import (IMAGE_SPAN, PREDICTED_BLOCKS, PREDICTED_HEADER, PREFILL_ACCESS, PREFIX_ENGINE_METRICS,
                               MultimodalTarget, as_count, cached_tokens, image_bytes, messages)

pytestmark = [pytest.mark.spec("5"), pytest.mark.engines, pytest.mark.xdist_group("engines"),
              pytest.mark.needs(ev.FRONTEND)]

REPEATS = 4
TEXT = " ".join(BASE_SENTENCES[:20])  # about 300 tokens after the image: the span sits inside the prompt


def fresh_image() -> bytes:
    """An image no engine has seen: the engines are shared, and their prefix caches live on."""
    return image_bytes(int.from_bytes(os.urandom(4), "little"))


def served(resp: requests.Response) -> requests.Response:
    assert resp.status_code == 200, f"HTTP {resp.status_code}: {resp.text[:400]}"
    return resp


def row(mm: MultimodalTarget, resp: requests.Response, image: bytes) -> dict:
    """What the report shows of one request."""
    usage = resp.json().get("usage") or {}
    span, expanded = mm.expanded(image, TEXT) or (None, None)
    predicted = resp.headers.get(PREDICTED_HEADER)
    return {"cached_tokens": cached_tokens(resp), "prompt_tokens": usage.get("prompt_tokens"),
            "expanded_prompt_tokens": expanded,
            "image_span": {"start": span.start, "length": span.end - span.start} if span else None,
            "worker": serving_worker(resp),
            "predicted_cached_blocks": int(predicted) if predicted is not None else None,
            "block_size": int(resp.headers["x-disagg-block-size"]) if "x-disagg-block-size" in resp.headers else None}


def assert_the_image_reached_the_engine(rows: list[dict]) -> None:
    """The engine ran the image's placeholders: its prompt is as long as the model's processor makes
    the request. A prompt short by about the span is one the image never entered (a frontend that
    rendered the image part as nothing); its cached tokens are the text's, and say nothing about
    the image. Half a span of slack leaves room for a template that differs by a few tokens."""
    for r in rows:
        span, expanded, ran = r["image_span"], r["expanded_prompt_tokens"], r["prompt_tokens"]
        if span is None or expanded is None or ran is None:
            continue
        assert expanded - ran < span["length"] / 2, (
            f"the engine ran a {ran}-token prompt where the model's processor makes this request {expanded} tokens, "
            f"{span['length']} of them the image's placeholders: the image did not reach the engine as an image, so "
            f"its cached tokens say nothing about the image {rows}")


# ---- the checks, as functions: the planted-fault tests below run them against broken frontends


def check_the_image_reaches_the_engine(mm: MultimodalTarget) -> list[dict]:
    image = fresh_image()
    rows = [row(mm, served(mm.chat(image, TEXT)), image)]
    if rows[0]["prompt_tokens"] is None:
        pytest.skip(f"needs usage.prompt_tokens in the response: {mm.frontend_url} reported none")
    assert_the_image_reached_the_engine(rows)
    return rows


def check_every_repeat_hits(mm: MultimodalTarget) -> list[dict]:
    """Three images in turn, REPEATS rounds: every request after an image's first must hit, past the
    image span. Three images over two workers: a router that ignores where the blocks are (round
    robin) sends some repeat to the other worker."""
    images = [fresh_image() for _ in range(3)]
    rows = []
    for round_ in range(REPEATS):
        for n, image in enumerate(images):
            rows.append({"image": n, "round": round_ + 1, **row(mm, served(mm.chat(image, TEXT)), image)})
    assert_the_image_reached_the_engine(rows)
    repeats = [r for r in rows if r["round"] > 1]
    misses = [(r["image"], r["round"]) for r in repeats if as_count(r["cached_tokens"]) < 1]
    assert not misses, (f"repeats (image, round) {misses} were not served from the prefix cache "
                        f"(workers {sorted({str(r['worker']) for r in rows})}): {rows}")
    span = rows[0]["image_span"]
    if span:
        end = span["start"] + span["length"]
        short = [(r["image"], r["round"]) for r in repeats if as_count(r["cached_tokens"]) < end]
        assert not short, f"repeats {short} were cached short of the image span's end (token {end}): {rows}"
    return rows


def check_different_image_misses(mm: MultimodalTarget) -> list[dict]:
    first, second = fresh_image(), fresh_image()
    rows = [row(mm, served(mm.chat(first, TEXT)), first), row(mm, served(mm.chat(first, TEXT)), first)]
    rows.append(row(mm, served(mm.chat(second, TEXT)), second))
    span, cached = rows[2]["image_span"], rows[2]["cached_tokens"]
    assert cached != "missing", f"the frontend reported no prompt_tokens_details: {rows}"
    assert_the_image_reached_the_engine(rows)
    if span:
        assert cached <= span["start"], (
            f"a different image behind the same text got {cached} cached tokens, reaching into its image span "
            f"at token {span['start']}: it rode on the first image's blocks {rows}")
    else:  # no processor here: the repeat of the first image is the yardstick
        assert cached < as_count(rows[1]["cached_tokens"]), f"the different image hit like the same one: {rows}"
    return rows


def check_prediction_holds(mm: MultimodalTarget) -> list[dict]:
    """The router predicted what the engine then found: predicted blocks, bounded by what an engine
    can hit (full blocks, and never the prompt's last token), equal cached_tokens."""
    first, second = fresh_image(), fresh_image()
    rows = [row(mm, served(mm.chat(image, TEXT)), image) for image in (first, first, second)]
    if rows[0]["predicted_cached_blocks"] is None:
        pytest.skip(PREDICTED_BLOCKS.lacking(f"{mm.frontend_url} sent no {PREDICTED_HEADER} header"))
    for r in rows:
        bs = r["block_size"]
        r["engine_can_hit"] = min(r["predicted_cached_blocks"] * bs, (r["prompt_tokens"] - 1) // bs * bs)
    wrong = [i for i, r in enumerate(rows, 1) if r["cached_tokens"] != r["engine_can_hit"]]
    assert not wrong, f"requests {wrong}: the router's predicted cached blocks disagree with the engine's cached_tokens {rows}"
    return rows


def check_cached_tokens_are_the_engines(mm: MultimodalTarget) -> dict:
    """The client's cached_tokens equal the prefix hits the serving engines counted for that request.
    Disaggregated, the prefill is warmed directly first, so that it holds the blocks and the decode
    does not: a frontend passing on the decode's usage then reports what the decode saw."""
    image = fresh_image()
    if mm.topology == "disaggregated":
        warm_directly(mm.prefix_engines[0], "/v1/chat/completions", {
            "model": mm.model, "messages": messages(image, TEXT), "max_tokens": 1, "temperature": 0.0})
    else:
        served(mm.chat(image, TEXT))
    before = mm.prefix_hits()
    if before is None:
        pytest.skip(PREFIX_ENGINE_METRICS.lacking("the engines export no prompt tokens by source (local_cache_hit)"))
    resp = served(mm.chat(image, TEXT))
    numbers = {"client_cached_tokens": cached_tokens(resp), "engine_prefix_hits": mm.prefix_hits() - before,
               **row(mm, resp, image)}
    assert numbers["client_cached_tokens"] != "missing", f"no prompt_tokens_details in the response: {numbers}"
    if mm.topology == "unknown" and numbers["engine_prefix_hits"] == 0:  # the serving worker may not be among them
        pytest.skip(PREFIX_ENGINE_METRICS.lacking(f"none of the engines given ({mm.prefix_engines}) counted a hit "
                                                  f"for this request: give every worker behind the frontend"))
    assert numbers["engine_prefix_hits"] > 0, f"the serving engines found nothing in their caches: {numbers}"
    assert numbers["client_cached_tokens"] == numbers["engine_prefix_hits"], (
        f"the client was told {numbers['client_cached_tokens']} cached tokens, the serving engine counted "
        f"{numbers['engine_prefix_hits']:.0f} prefix hits: the usage is not the serving engine's {numbers}")
    return numbers


# ---- the suite


@pytest.mark.spec("5", "2.6", "R1")
@pytest.mark.needs(IMAGE_SPAN)
def test_the_engine_runs_the_images_placeholders(mm, record_property):
    record_property("requests", check_the_image_reaches_the_engine(mm))


def test_the_same_image_is_served_from_the_prefix_cache_on_every_repeat(mm, record_property):
    record_property("requests", check_every_repeat_hits(mm))


def test_a_different_image_behind_the_same_text_does_not_ride_on_the_first_images_blocks(mm, record_property):
    record_property("requests", check_different_image_misses(mm))


def test_the_routers_predicted_cached_blocks_agree_with_the_engines_cached_tokens(mm, record_property):
    record_property("requests", check_prediction_holds(mm))


@pytest.mark.spec("5", "4.1")
@pytest.mark.needs(PREFIX_ENGINE_METRICS)
def test_cached_tokens_are_the_serving_engines_own_prefix_hits(mm, record_property):
    record_property("numbers", check_cached_tokens_are_the_engines(mm))


@pytest.mark.spec("5", "4.1")
@pytest.mark.needs(ev.AGGREGATED_REFERENCE, ev.engine_metrics("decode"))
def test_an_image_request_through_disagg_moves_its_kv_and_matches_aggregated(mm, record_property):
    if mm.topology == "kv-aggregated":
        pytest.skip(f"{mm.name} serves aggregated; this checks a prefill -> decode path")
    if mm.topology != "disaggregated":
        pytest.skip(PREFILL_ACCESS.lacking("without a prefill engine the request's path is unknown"))
    image = fresh_image()
    before = Metrics.scrape(mm.decode_engine)
    need_kv_sources(before)
    resp = served(mm.chat(image, TEXT, max_tokens=12, return_token_ids=True))
    after = Metrics.scrape(mm.decode_engine)
    reference = served(requests.post(f"{mm.reference_engine}/v1/chat/completions", timeout=180, json={
        "model": mm.model, "messages": messages(image, TEXT), "max_tokens": 12, "temperature": 0.0,
        "return_token_ids": True}))
    ours, theirs = (r.json()["choices"][0].get("token_ids") for r in (resp, reference))
    record_property("numbers", {"kv": kv_sources(after, before), **row(mm, resp, image), "output": ours})
    assert ours and ours == theirs, f"disaggregated output {ours} differs from aggregated {theirs}"
    assert_kv_moved(before, after, resp.json()["usage"]["prompt_tokens"])


# ---- planted regressions: each must make a check above fail


def caught(mm: MultimodalTarget, topology: str, fault: str, check, match: str) -> str:
    """Run `check` against a frontend with `fault` planted, on the same engines; it must fail."""
    if mm.topology != topology:
        pytest.skip(f"shown on the {topology} topology")
    broken = mm.at(mm.planted(fault))
    with pytest.raises(AssertionError, match=match) as failure:
        check(broken)
    return str(failure.value).splitlines()[0]


@pytest.mark.spec("R1")
@pytest.mark.needs(ev.PLANTED_ROUTER)
def test_a_local_dir_without_preprocessor_config_json_is_caught(mm, record_property):
    record_property("caught", caught(mm, "kv-aggregated", "drop_preprocessor_config", check_every_repeat_hits,
                                     "preprocessor_config.json"))


@pytest.mark.spec("R1")
@pytest.mark.needs(ev.PLANTED_ROUTER)
def test_a_frontend_that_drops_the_image_is_caught_even_where_repeats_hit(mm, record_property):
    """Its repeats hit on the text alone, so only the prompt's length gives it away."""
    if mm.topology != "kv-aggregated":
        pytest.skip("shown on the kv-aggregated topology")
    broken = mm.at(mm.planted("drop_image"))
    caught = {}
    for check in (check_the_image_reaches_the_engine, check_every_repeat_hits, check_different_image_misses):
        with pytest.raises(AssertionError, match="did not reach the engine as an image") as failure:
            check(broken)
        caught[check.__name__] = str(failure.value)[:200]
    record_property("caught", caught)


@pytest.mark.spec("4.3")
@pytest.mark.needs(ev.PLANTED_ROUTER)
def test_a_router_that_ignores_where_the_blocks_are_is_caught(mm, record_property):
    record_property("caught", caught(mm, "kv-aggregated", "round_robin", check_every_repeat_hits,
                                     "were not served from the prefix cache"))


@pytest.mark.spec("R1", "4.3")
@pytest.mark.needs(ev.PLANTED_ROUTER)
def test_a_router_whose_block_hashes_ignore_the_image_is_caught(mm, record_property):
    record_property("caught", caught(mm, "kv-aggregated", "hash_text_only", check_prediction_holds,
                                     "predicted cached blocks disagree"))


@pytest.mark.spec("5", "4.1")
@pytest.mark.needs(ev.PLANTED_ROUTER)
def test_a_frontend_that_reports_the_decodes_usage_is_caught(mm, record_property):
    record_property("caught", caught(mm, "disaggregated", "report_decode_usage", check_cached_tokens_are_the_engines,
                                     "not the serving engine's"))
