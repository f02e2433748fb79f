"""Read an engine's Prometheus `/metrics` and compare two readings.

The disaggregation checks stand on these counters: on the decode engine, prompt tokens that came
over the KV transfer count as `source="external_kv_transfer"`, recomputed ones as `local_compute`.
"""

from __future__ import annotations

from dataclasses import dataclass

import requests
from prometheus_client.parser import text_string_to_metric_families

PROMPT_TOKENS_BY_SOURCE = "vllm:prompt_tokens_by_source_total"
REQUESTS_RUNNING = "vllm:num_requests_running"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
NIXL_BYTES = "vllm:nixl_bytes_transferred_sum"


@dataclass
class Metrics:
    samples: list[tuple[str, dict[str, str], float]]

    @classmethod
    def parse(cls, text: str) -> "Metrics":
        samples = []
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.append((s.name, dict(s.labels), float(s.value)))
        return cls(samples)

    @classmethod
    def scrape(cls, base_url: str, timeout: float = 10.0) -> "Metrics":
        resp = requests.get(f"{base_url.rstrip('/')}/metrics", timeout=timeout)
        resp.raise_for_status()
        return cls.parse(resp.text)

    def value(self, name: str, **labels: str) -> float:
        """Sum of every sample of `name` whose labels include `labels`."""
        return sum(v for n, lab, v in self.samples if n == name and all(lab.get(k) == x for k, x in labels.items()))

    def has(self, name: str) -> bool:
        return any(n == name for n, _, _ in self.samples)

    def delta(self, before: "Metrics", name: str, **labels: str) -> float:
        return self.value(name, **labels) - before.value(name, **labels)


def kv_sources(after: Metrics, before: Metrics) -> dict[str, float]:
    """Per-source prompt-token deltas between two readings of one engine."""
    return {src: after.delta(before, PROMPT_TOKENS_BY_SOURCE, source=src)
            for src in ("local_compute", "local_cache_hit", "external_kv_transfer")}
