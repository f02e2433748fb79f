"""What holds for one request holds for many at once, exactly, by the engines' own counters (SPEC §8).

A burst: a closed loop of C clients sends N greedy requests (fresh prompts shorter than a block to
several blocks, repeats of one shared prefix; completions and chat; streamed and not) through the
frontend under test. Then, from the engines' counters over the burst:
- every response is complete (a finish_reason; `[DONE]` when streamed), none is an error;
- the decode's prompt tokens by source sum to the disaggregated requests' prompt tokens, and
  none are `local_compute`: a router that drops `kv_transfer_params` now and then is seen here,
  where a single-request check sees it one time in five;
- the `cached_tokens` the clients were told sum to the prefill's prefix hits;
- the bytes NIXL moved are exactly the transferred blocks of this model's KV;
- afterwards, within a bound, no engine runs a request, KV usage is back to its value before the
  burst, and no KV transfer failed or expired.
The burst starts once the engines are idle (bounded), so what an earlier check left pending is
not counted as the burst's.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
from dataclasses import asdict, dataclass

import httpx
import pytest

from harness.deployment import Deployment
from harness.engines.metrics import Metrics, kv_sources
from harness.kv_geometry import blocks_for
from harness.openai_client import OpenAIEndpoint, routing_mode, token_ids_of
from suites.disagg_checks import fresh_prompt
from suites.interposed_checks import eos_ignored, kv_handed_over, kv_lease_s, marks, pulls_kv_from_a_prefill

CONCURRENCY = 16
REQUESTS = 64
MAX_TOKENS = 8
# KV held for a decode that never came is freed when the prefill's lease ends, so "idle again"
# is waited for a lease and a margin: the run's profile's lease, or vLLM's default (30 s).
SETTLE_MARGIN_S = 10.0
SHARED_PREFIX = ("A shared system preamble that every repeat of the burst starts with, long enough to fill "
                 "several blocks of the prefix cache: the river, the mountain, the lantern and the harbor. ") * 2


@dataclass
class Answer:
    """One request of the burst, as the client saw it."""

    n: int
    kind: str  # prompt shape / api / streamed
    status: int | None = None
    mode: str = "unknown"
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # None: the usage had no prompt_tokens_details
    finish_reason: str | None = None
    done: bool | None = None  # streamed: [DONE] seen
    error: str | None = None
    prompt: str = ""
    chat: bool = False
    token_ids: list[int] | None = None  # the output's, where the frontend returns them


def prompt_for(n: int) -> str:
    shape = n % 4
    if shape == 3:
        return SHARED_PREFIX + f"Variant {n} {os.urandom(4).hex()}."
    return fresh_prompt((3, 20, 60)[shape])


def ask(deployment: Deployment, n: int, timeout_s: float = 120.0, extra: dict | None = None) -> Answer:
    endpoint = deployment.endpoint()
    chat, stream = n % 3 == 0, n % 2 == 1
    prompt = prompt_for(n)
    answer = Answer(n, f"{('short', 'one-block', 'several-blocks', 'shared-prefix')[n % 4]}/"
                       f"{'chat' if chat else 'completion'}/{'stream' if stream else 'whole'}", prompt=prompt,
                    chat=chat)
    body = {"model": endpoint.model, "max_tokens": MAX_TOKENS, "temperature": 0.0, **endpoint.dialect, **(extra or {})}
    body |= {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    url = f"{endpoint.url}/v1/{'chat/completions' if chat else 'completions'}"
    try:
        if stream:
            with httpx.stream("POST", url, json=body, timeout=httpx.Timeout(timeout_s, connect=10)) as resp:
                # a stream's routing is read from its headers alone: its body is not read yet
                answer.status, answer.mode = resp.status_code, resp.headers.get("x-disagg-mode", "unknown")
                usage = None
                for line in resp.iter_lines():
                    if line == "data: [DONE]":
                        answer.done = True
                    elif line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if "error" in chunk and not chunk.get("choices"):
                            answer.error = str(chunk["error"])[:200]
                        usage = chunk.get("usage") or usage
                        for choice in chunk.get("choices") or []:
                            answer.finish_reason = choice.get("finish_reason") or answer.finish_reason
                            if isinstance(choice.get("token_ids"), list):
                                answer.token_ids = (answer.token_ids or []) + choice["token_ids"]
                answer.done = bool(answer.done)
        else:
            resp = httpx.post(url, json=body, timeout=httpx.Timeout(timeout_s, connect=10))
            answer.status, answer.mode = resp.status_code, routing_mode(resp)
            data = resp.json() if resp.status_code == 200 else {}
            if resp.status_code != 200:
                answer.error = resp.text[:200]
            usage = data.get("usage")
            answer.finish_reason = ((data.get("choices") or [{}])[0] or {}).get("finish_reason")
            answer.token_ids = token_ids_of(data) if data else None
    except (httpx.HTTPError, ValueError) as exc:
        answer.error = f"{type(exc).__name__}: {exc}"
        return answer
    if usage:
        answer.prompt_tokens = usage.get("prompt_tokens")
        details = usage.get("prompt_tokens_details")
        answer.cached_tokens = details.get("cached_tokens") if isinstance(details, dict) else None
    return answer


def scrape(deployment: Deployment) -> dict[str, Metrics]:
    return {role: Metrics.scrape(deployment.url(role)) for role in ("prefill", "decode")}


def delta(after: dict[str, Metrics], before: dict[str, Metrics], role: str, quantity: str) -> float | None:
    return after[role].delta(before[role], quantity)


def settle_within_s(deployment: Deployment) -> float:
    return kv_lease_s(deployment) + SETTLE_MARGIN_S


def settle(deployment: Deployment, kv_usage_at_most: dict[str, float | None]) -> dict:
    """Wait (bounded) until no engine runs a request and each engine's KV usage is at most the given value."""
    started, within_s = time.monotonic(), settle_within_s(deployment)
    while True:
        now = scrape(deployment)
        state = {role: {"running": now[role].get("requests_running"), "kv_usage": now[role].get("kv_cache_usage"),
                        "kv_usage_before": kv_usage_at_most.get(role)} for role in now}
        quiet = all((s["running"] in (0, None)) and (s["kv_usage"] is None or s["kv_usage_before"] is None
                                                      or s["kv_usage"] <= s["kv_usage_before"] + 1e-9)
                    for s in state.values())
        if quiet or time.monotonic() - started > within_s:
            return {"settled_after_s": round(time.monotonic() - started, 1), "quiet": quiet, "engines": state,
                    "metrics": now}
        time.sleep(0.25)


def idle_baseline(deployment: Deployment) -> tuple[dict[str, Metrics], dict]:
    """The engines' counters once nothing an earlier check left is pending: a prefill holding the
    blocks of a decode that never came (a router that dropped kv_transfer_params) frees them only
    when their lease ends, and counts them as expired then, which is not the burst's doing."""
    waited = settle(deployment, {"prefill": 0.0, "decode": 0.0})
    return waited.pop("metrics"), waited


def handoffs(deployment: Deployment, since: dict[str, int], lease_s: float | None = None) -> dict | None:
    """Where a prefill's KV lease went, by the relays' clocks (the prefill's remote_request_id ties
    a prefill to its decode). The lease runs from the prefill's answer until the decode takes the
    request and pulls: KV expires unread when the router holds the answer past the lease (a long
    handoff), never sends a decode for it (an unread prefill: a retried or abandoned prefill), or
    the decode pulls late (its first token comes more than a lease after the request reached it)."""
    if not {"prefill", "decode"} <= set(deployment.interposed):
        return None
    prefill_requests, answered, decodes = kv_handed_over(deployment, since)
    gaps, asked, first_token_after = [], set(), []
    for rid, ex in decodes:
        if rid in answered:
            asked.add(rid)
            gaps.append(ex.started - answered[rid].ended)
            if ex.first_event is not None:
                first_token_after.append(ex.first_event - ex.started)
    if not gaps and not answered:
        return None
    gaps.sort()
    first_token_after.sort()
    out = {"prefill_requests": prefill_requests, "prefills_answered": len(answered), "handed_off": len(gaps),
           "unread_prefills": sorted(set(answered) - asked)[:5], "unread_prefill_count": len(set(answered) - asked),
           "p50_s": round(gaps[len(gaps) // 2], 3) if gaps else None, "max_s": round(gaps[-1], 3) if gaps else None,
           "decode_first_token_max_s": round(first_token_after[-1], 3) if first_token_after else None}
    if lease_s is not None:
        out["decode_first_token_after_a_lease"] = sum(t > lease_s for t in first_token_after)
    return out


def check_a_burst_is_accounted_for_exactly(deployment: Deployment, concurrency: int = CONCURRENCY,
                                           requests: int = REQUESTS, keep: dict | None = None) -> dict:
    """`keep`, where given, gets the burst's answers (`keep["answers"]`) whatever the check finds."""
    extra = eos_ignored(deployment.endpoint())
    before, waited = idle_baseline(deployment)
    relay_marks = marks(deployment)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(lambda n: ask(deployment, n, extra=extra), range(requests)))
    if keep is not None:
        keep["answers"], keep["extra"] = answers, extra
    numbers: dict = {"requests": requests, "concurrency": concurrency, "burst_s": round(time.monotonic() - started, 1)}
    # The counters that account for the burst are final once no engine runs a request; KV held for
    # a decode that never came is freed only when its lease ends. So the accounting is read and
    # checked first, and the wait for idle (up to a lease) comes after: a burst that fails its
    # accounting (a router dropping kv_transfer_params) says so without waiting a lease first.
    ran = settle(deployment, {})
    counted = ran.pop("metrics")
    numbers["idle_before_after_s"], numbers["requests_ended_after_s"] = waited["settled_after_s"], ran["settled_after_s"]
    numbers["prefill_to_decode_handoff"] = handoffs(deployment, relay_marks, kv_lease_s(deployment))
    broken = [asdict(a) for a in answers if a.status != 200 or a.error or not a.finish_reason or a.done is False]
    numbers["errors"] = len(broken)
    assert not broken, f"{len(broken)} of {requests} answers were errors or incomplete, e.g. {broken[:3]} {numbers}"
    modes = {a.mode for a in answers}
    numbers["modes"] = sorted(modes)
    if modes == {"unknown"} and "decode" in deployment.interposed:  # the relay saw what the frontend does not say
        pulled = [e for e in deployment.interposed["decode"].exchanges(relay_marks["decode"])
                  if pulls_kv_from_a_prefill(e)]
        numbers["decode_requests_with_kv_to_pull"] = len(pulled)
        modes = {"disaggregated"} if len(pulled) == requests else modes
    if modes != {"disaggregated"}:
        pytest.skip(f"needs every request of the burst disaggregated, as the frontend reports it per response "
                    f"(x-disagg-mode) or the decode's relay saw it: it reported {sorted(modes)}")
    missing = [a.n for a in answers if a.prompt_tokens is None]
    assert not missing, f"answers without usage.prompt_tokens: {missing[:10]}"
    decode = kv_sources(counted["decode"], before["decode"])
    prompt_total = sum(a.prompt_tokens for a in answers)
    told_cached = sum(a.cached_tokens or 0 for a in answers)
    prefill_hits = delta(counted, before, "prefill", "prompt_tokens_local_cache_hit")
    numbers["accounting"] = {"clients_prompt_tokens": prompt_total, **{f"decode_{k}": v for k, v in decode.items()},
                             "clients_cached_tokens": told_cached,
                             "answers_without_prompt_tokens_details": sum(a.cached_tokens is None for a in answers),
                             "prefill_local_cache_hit": prefill_hits}
    if None in decode.values() or prefill_hits is None:
        pytest.skip(f"needs engine evidence: prompt tokens by source on both engines {numbers['accounting']}")
    assert decode["local_compute"] == 0, (
        f"over the burst the decode computed {decode['local_compute']:.0f} prompt tokens itself: some requests' KV "
        f"did not move (kv_transfer_params dropped now and then?) {numbers['accounting']}")
    assert sum(decode.values()) == prompt_total, (
        f"the decode accounted {sum(decode.values()):.0f} prompt tokens by source for {prompt_total} the clients "
        f"were told {numbers['accounting']}")
    assert told_cached == prefill_hits, (
        f"the clients were told {told_cached} cached tokens in all, the prefill counted {prefill_hits:.0f} prefix "
        f"hits: some usage is not the prefill's {numbers['accounting']}")
    block = deployment.kv_block()
    moved = delta(counted, before, "decode", "kv_transfer_bytes")
    if block is not None and moved is not None:
        block_size, block_bytes = block
        decode_hit_blocks = decode["local_cache_hit"] / block_size
        blocks = sum(blocks_for(a.prompt_tokens, block_size) for a in answers) - decode_hit_blocks
        numbers["kv_bytes"] = {"moved": moved, "expected": blocks * block_bytes, "blocks": blocks,
                               "kv_block_bytes": block_bytes}
        assert moved == blocks * block_bytes, (
            f"NIXL moved {moved:.0f} bytes over the burst; its {blocks:.0f} transferred blocks of this model's KV take "
            f"{blocks * block_bytes:.0f} (SPEC §4.1) {numbers['kv_bytes']}")
    settled = settle(deployment, {role: m.get("kv_cache_usage") for role, m in before.items()})
    after = settled.pop("metrics")
    numbers["drain"] = settled
    assert settled["quiet"], (
        f"{settle_within_s(deployment):.0f} s after the burst the engines are not idle again: {settled['engines']}")
    for quantity in ("kv_transfers_failed", "kv_expired_requests"):
        for role in ("prefill", "decode"):
            value = delta(after, before, role, quantity)
            numbers.setdefault("kv_faults", {})[f"{role}_{quantity}"] = value
            assert value in (0, None), (f"the {role} counted {value:.0f} {quantity} over the burst {numbers['kv_faults']}"
                                        f"{where_the_lease_went(numbers['prefill_to_decode_handoff'], requests)}")
    numbers["answers"] = [asdict(a) for a in answers]
    return numbers


def where_the_lease_went(handoff: dict | None, requests: int) -> str:
    """The relays' account of an expiry: the router's doing, the decode's, or neither."""
    if handoff is None:
        return " (no relays in front of the engines: the suite cannot tell the router's part)"
    said = []
    if handoff["unread_prefill_count"]:
        said.append(f"the router sent {handoff['prefill_requests']} prefills for {requests} requests, and no decode "
                    f"request asked for the KV of {handoff['unread_prefill_count']} of them")
    if handoff.get("decode_first_token_after_a_lease"):
        said.append(f"{handoff['decode_first_token_after_a_lease']} decode requests got their first token more than a "
                    f"lease after they reached the decode (it pulled late)")
    if not said:
        said.append(f"every prefill was handed off (max {handoff['max_s']} s) and every decode's first token came "
                    f"within {handoff['decode_first_token_max_s']} s: neither the router's handoff nor a late pull "
                    f"explains it")
    return f"; by the relays: {'; '.join(said)} {handoff}"


REFERENCE_SAMPLE = 16


def check_outputs_equal_the_reference(deployment: Deployment, answers: list[Answer], extra: dict,
                                      sample: int = REFERENCE_SAMPLE) -> dict:
    """The burst's outputs are the aggregated engine's for the same prompts, where the engine is
    batch-invariant (SPEC §8). The aggregated engine answers `sample` of the burst's completion
    prompts alone, one after another, and then all at once: where its own two answers differ, the
    engine is not batch-invariant for that prompt and a batched output may differ from the
    reference for no fault of the frontend's, so only the prompts it answers the same both ways
    are held to equality. Greedy, same max_tokens (and ignore_eos where the burst sent it)."""
    picked = [a for a in answers if not a.chat and a.status == 200 and a.token_ids][:sample]
    if not picked:
        pytest.skip("needs the burst's output token ids: the frontend returned none (return_token_ids)")
    reference = deployment.engine_endpoint("aggregated")

    def ids(prompt: str) -> list[int] | None:
        resp = reference.complete(prompt, max_tokens=MAX_TOKENS, **extra)
        return token_ids_of(resp.json()) if resp.status_code == 200 else None

    alone = [ids(a.prompt) for a in picked]
    with concurrent.futures.ThreadPoolExecutor(len(picked)) as pool:
        batched = list(pool.map(lambda a: ids(a.prompt), picked))
    if None in alone or None in batched:
        pytest.skip("needs token ids from the aggregated reference (return_token_ids)")
    invariant = [i for i in range(len(picked)) if alone[i] == batched[i]]
    numbers = {"compared": len(picked), "engine_same_alone_and_batched": len(invariant),
               "engine_batch_invariant": len(invariant) == len(picked)}
    differ = [{"n": picked[i].n, "kind": picked[i].kind, "burst": picked[i].token_ids, "reference": alone[i]}
              for i in invariant if picked[i].token_ids != alone[i]]
    numbers["equal_to_the_reference"] = len(invariant) - len(differ)
    assert invariant, (f"the aggregated engine answered none of {len(picked)} prompts the same alone and batched: "
                       f"nothing to compare {numbers}")
    assert not differ, (f"{len(differ)} of {len(invariant)} outputs of the burst differ from the aggregated engine's "
                        f"for the same prompt (where the engine is batch-invariant): {differ[:2]} {numbers}")
    return numbers
