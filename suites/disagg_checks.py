"""The assertions behind the disaggregation suites, shared so that planted bugs can be shown caught.

Each returns the numbers it looked at, for the report.
"""

from __future__ import annotations

import json
import os
import time

import requests

from harness.engines.metrics import NIXL_BYTES, Metrics, kv_sources

WORDS = ("river mountain lantern copper violet harbor meadow falcon orchard compass ember glacier "
         "thunder willow saffron quartz pebble marble beacon canyon").split()


def fresh_prompt(n_words: int, seed: bytes | None = None) -> str:
    """A prompt no engine has seen before, so no prefix cache can hide a missing transfer."""
    raw = seed or os.urandom(16)
    words = [WORDS[b % len(WORDS)] for b in raw * (n_words // len(raw) + 1)][:n_words]
    return f"Request {raw.hex()[:12]}: " + " ".join(words) + "."


def complete(base_url: str, model: str, prompt, *, max_tokens: int = 16, timeout: float = 120.0,
             headers: dict | None = None, **extra) -> requests.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "return_token_ids": True, **extra}
    return requests.post(f"{base_url}/v1/completions", json=body, headers=headers or {}, timeout=timeout)


def token_ids(response: requests.Response) -> list[int]:
    assert response.status_code == 200, f"HTTP {response.status_code}: {response.text[:300]}"
    choice = response.json()["choices"][0]
    assert choice.get("token_ids"), f"no token_ids in {choice}"
    return choice["token_ids"]


def assert_kv_moved(before: Metrics, after: Metrics, prompt_tokens: int, recompute_allowed: int = 0) -> dict:
    """The decode engine got the prompt over the KV transfer and computed none of it (or, for a
    connector that moves full blocks only, no more than the partial last block)."""
    sources = kv_sources(after, before)
    numbers = {"prompt_tokens": prompt_tokens, **sources, "transfer_bytes": after.delta(before, NIXL_BYTES)}
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


def read_data_events(line_iter, n: int) -> list[str]:
    """Read a stream's lines (one `iter_lines()` iterator, which can be read on afterwards) until
    `n` SSE data events have arrived; returns every line read."""
    lines: list[str] = []
    for line in line_iter:
        lines.append(line)
        if sum(x.startswith("data: ") for x in lines) >= n:
            break
    return lines


def sse_error_message(lines: list[str]) -> str:
    """The message of the `event: error` in a stream's lines (fails if there is none)."""
    assert "event: error" in lines, f"no error event; the stream ended with {lines[-3:]}"
    return json.loads(lines[lines.index("event: error") + 1][len("data: "):])["error"]["message"]


def wait_for_metric(url: str, name: str, predicate, timeout_s: float = 60.0) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        value = Metrics.scrape(url).value(name)
        if predicate(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.2)
