"""The assertions behind the disaggregation suites, shared so that planted bugs can be shown caught.

Each returns the numbers it looked at, for the report. Engine counters come through the metrics
adapter: a quantity the engine does not export makes the check skip (`need_metrics`), never count
as 0.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import requests

from harness import evidence as ev
from harness.engines.metrics import KV_SOURCE_QUANTITIES, Metrics, kv_sources
from harness.kv_geometry import blocks_for

WORDS = ("river mountain lantern copper violet harbor meadow falcon orchard compass ember glacier "
         "thunder willow saffron quartz pebble marble beacon canyon").split()


def fresh_prompt(n_words: int, seed: bytes | None = None) -> str:
    """A prompt no engine has seen before, so no prefix cache can hide a missing transfer."""
    raw = seed or os.urandom(16)
    words = [WORDS[b % len(WORDS)] for b in raw * (n_words // len(raw) + 1)][:n_words]
    return f"Request {raw.hex()[:12]}: " + " ".join(words) + "."


def post_directly(engine_url: str, path: str, body: dict) -> requests.Response:
    """A request to an engine's own OpenAI server, bypassing the frontend, and its answer. Skips
    when the URL serves no OpenAI API (it may be a metrics port)."""
    try:
        resp = requests.post(f"{engine_url}{path}", json=body, timeout=180)
    except requests.RequestException as exc:
        pytest.skip(ev.ENGINE_OPENAI.lacking(f"{engine_url}{path}: {type(exc).__name__}"))
    if resp.status_code in (404, 405):
        pytest.skip(ev.ENGINE_OPENAI.lacking(f"{engine_url}{path} answered HTTP {resp.status_code} {resp.text[:60]!r}"))
    return resp


def assert_warmed(engine_url: str, path: str, resp: requests.Response) -> None:
    assert resp.status_code == 200, f"warming {engine_url}{path} directly: HTTP {resp.status_code}: {resp.text[:300]}"


def warm_directly(engine_url: str, path: str, body: dict) -> None:
    """`post_directly`, so that the engine's prefix cache holds the prompt."""
    assert_warmed(engine_url, path, post_directly(engine_url, path, body))


def need_metrics(metrics: Metrics, *quantities: str) -> None:
    """Skip, naming the engine and the metric names looked for, when a quantity is not exported."""
    missing = metrics.missing(*quantities)
    if missing:
        pytest.skip(f"needs engine evidence: {missing}")


def need_kv_sources(metrics: Metrics) -> None:
    need_metrics(metrics, *KV_SOURCE_QUANTITIES)


def assert_kv_moved(before: Metrics, after: Metrics, prompt_tokens: int, recompute_allowed: int = 0,
                    block: tuple[int, int] | None = None) -> dict:
    """The decode engine got the prompt over the KV transfer and computed none of it (or, for a
    connector that moves full blocks only, no more than the partial last block). With `block`,
    (block size, bytes a block of this model's KV takes), the bytes the engine says it moved are
    exactly the transferred tokens' blocks: the KV that moved is the KV the model has (SPEC §4.1)."""
    sources = kv_sources(after, before)
    numbers = {"prompt_tokens": prompt_tokens, **sources}
    if (moved := after.delta(before, "kv_transfer_bytes")) is not None:
        numbers["transfer_bytes"] = moved
        if block is not None and sources["external_kv_transfer"] > 0:
            block_size, block_bytes = block
            blocks = blocks_for(sources["external_kv_transfer"], block_size)
            numbers |= {"blocks_transferred": blocks, "kv_block_bytes": block_bytes}
            assert moved == blocks * block_bytes, (
                f"NIXL moved {moved:.0f} bytes for {sources['external_kv_transfer']:.0f} transferred tokens: "
                f"{blocks} blocks of this model's KV take {blocks * block_bytes} ({block_bytes} a block); "
                f"{'fewer is a partial transfer' if moved < blocks * block_bytes else 'more is a wrong layout or a bad metric'}"
                f" (SPEC §4.1) {numbers}")
    assert sources["local_compute"] <= recompute_allowed, (
        f"decode recomputed {sources['local_compute']:.0f} of {prompt_tokens} prompt tokens: the KV did not "
        f"move (kv_transfer_params dropped?) {numbers}")
    assert sum(sources.values()) == prompt_tokens, (
        f"decode accounted {sources} for {prompt_tokens} prompt tokens")
    if prompt_tokens > recompute_allowed:  # a full-block connector has nothing to move for a short prompt
        assert sources["external_kv_transfer"] > 0, f"nothing came over the KV transfer: {numbers}"
    return numbers


def assert_computed_locally(before: Metrics, after: Metrics, prompt_tokens: int) -> dict:
    """Aggregated fallback: the decode engine computed the prompt itself, nothing was transferred."""
    sources = kv_sources(after, before)
    numbers = {"prompt_tokens": prompt_tokens, **sources}
    assert sources["external_kv_transfer"] == 0, f"KV was transferred in aggregated mode: {numbers}"
    assert sources["local_compute"] + sources["local_cache_hit"] == prompt_tokens, numbers
    return numbers


# A client that leaves must cost the decode engine at most this share of the tokens it asked for,
# when no abort counter says so directly (the stream is read for a few events, then dropped).
TOKENS_AFTER_DISCONNECT_SHARE = 0.25


def assert_aborted(before: Metrics, after: Metrics, max_tokens: int, read_events: int) -> dict:
    """The engine stopped the request when its client left.

    Evidence, in order of preference: the engine's own abort counter (vLLM: request_success with
    finished_reason=abort; Dynamo: dynamo_component_cancellation); else the tokens it generated,
    which must stay under a tight bound. The returned numbers say which was used.
    """
    numbers = {"max_tokens": max_tokens, "events_read": read_events,
               "generated_tokens": after.delta(before, "generation_tokens"),
               "aborted_requests": after.delta(before, "aborted_requests")}
    if numbers["aborted_requests"] is not None:
        numbers["evidence"] = "engine abort counter"
        assert numbers["aborted_requests"] >= 1, (
            f"the decode engine counted no aborted request: it ran on after the client left {numbers}")
        return numbers
    numbers["evidence"] = f"generated tokens <= {TOKENS_AFTER_DISCONNECT_SHARE:.0%} of max_tokens"
    bound = max_tokens * TOKENS_AFTER_DISCONNECT_SHARE
    assert numbers["generated_tokens"] <= bound, (
        f"the decode engine generated {numbers['generated_tokens']:.0f} tokens for a client that left after "
        f"{read_events} events (bound {bound:.0f}): it was not aborted {numbers}")
    return numbers


def read_data_events(line_iter, n: int) -> list[str]:
    """Read a stream's lines (one `iter_lines()` iterator, which can be read on afterwards) until
    `n` SSE data events have arrived; returns every line read."""
    lines: list[str] = []
    for line in line_iter:
        lines.append(line)
        if sum(x.startswith("data: ") for x in lines) >= n:
            break
    return lines


def finish_reasons(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        if line.startswith("data: {"):
            out += [c.get("finish_reason") for c in json.loads(line[6:]).get("choices") or [] if c.get("finish_reason")]
    return out


def sse_error_message(lines: list[str]) -> str:
    """The message of the `event: error` in a stream's lines (fails if there is none)."""
    assert "event: error" in lines, f"no error event; the stream ended with {lines[-3:]}"
    return json.loads(lines[lines.index("event: error") + 1][len("data: "):])["error"]["message"]


def wait_for_quantity(url: str, quantity: str, predicate, timeout_s: float = 60.0) -> float | None:
    deadline = time.monotonic() + timeout_s
    while True:
        value = Metrics.scrape(url).get(quantity)
        if value is None or predicate(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.2)
