"""The reference frontend's `/metrics` (prometheus_client), what users expect of a frontend.

The under-load checks read it (SPEC §8: after an abort storm the frontend's own in-flight counts
are back to 0), and so can a user's dashboards. Names are the frontend's own, `disagg_frontend_*`;
the suite reads other routers' equivalents by meaning (harness/engines/metrics.py):

- `disagg_frontend_requests_in_flight{model}`: requests this frontend is answering now, from the
  request to the last byte of its answer;
- `disagg_frontend_worker_requests_in_flight{model,worker,role}`: what it has open on each worker,
  a prefill request or a decode (or aggregated) stream; read from the router at scrape time, so
  the hot path pays nothing for it;
- `disagg_frontend_requests_total{model,mode}`: requests routed, disaggregated or aggregated;
- `disagg_frontend_errors_total{model,kind}`: requests that ended in an error, by kind (the
  `ERROR_KINDS` below);
- `disagg_frontend_kv_routed_blocks_total{model,worker}` and
  `disagg_frontend_kv_overlap_blocks_total{model,worker}`: with KV-aware selection, the prompt
  blocks sent to each worker and, of those, the leading blocks it was predicted to hold (their
  ratio is the selection's overlap).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:  # the manager imports the router, which takes a FrontendMetrics
    from harness.frontend.models import ModelManager

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

ERROR_KINDS = {
    "no_workers": "no decode or aggregated worker serves the model",
    "prefill_failed": "the prefill failed or returned no usable kv_transfer_params",
    "decode_failed": "the decode worker refused or failed before its stream opened",
    "prompt_mismatch": "an engine ran another prompt than the one the frontend routed on",
    "stream_failed": "the worker's stream broke or ended before [DONE]",
    "client_left": "the client went away before the answer ended",
}


class FrontendMetrics:
    """One frontend's registry (several frontends may share a process: the suites start many)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.in_flight = Gauge("disagg_frontend_requests_in_flight", "Requests this frontend is answering now",
                               ["model"], registry=r)
        self.requests = Counter("disagg_frontend_requests", "Requests routed, by routing mode", ["model", "mode"],
                                registry=r)
        self.errors = Counter("disagg_frontend_errors", "Requests that ended in an error, by kind",
                              ["model", "kind"], registry=r)
        self.kv_routed = Counter("disagg_frontend_kv_routed_blocks", "Prompt blocks routed by KV-aware selection",
                                 ["model", "worker"], registry=r)
        self.kv_overlap = Counter("disagg_frontend_kv_overlap_blocks", "Of the routed blocks, the leading ones the "
                                  "chosen worker was predicted to hold", ["model", "worker"], registry=r)
        self._children: dict[tuple, Gauge | Counter] = {}  # (metric, labels) -> its labelled child

    def child(self, metric: Gauge | Counter, *labels: str) -> Gauge | Counter:
        """The metric's child for these labels, kept: every request moves a few of them, and
        `labels()` looks one up under a lock each time."""
        if (found := self._children.get((metric, labels))) is None:
            found = self._children[metric, labels] = metric.labels(*labels)
        return found

    def in_flight_of(self, model: str) -> Gauge:
        return self.child(self.in_flight, model)

    def error(self, model: str, kind: str) -> None:
        assert kind in ERROR_KINDS, kind
        self.child(self.errors, model, kind).inc()

    def routed(self, model: str, mode: str) -> None:
        self.child(self.requests, model, mode).inc()

    def kv_selected(self, model: str, worker: str, blocks: int, overlap: int) -> None:
        self.child(self.kv_routed, model, worker).inc(blocks)
        self.child(self.kv_overlap, model, worker).inc(overlap)

    def watch(self, manager: "ModelManager") -> None:
        """Report what the manager's routers have open on each worker, read at scrape time."""
        self.registry.register(WorkerInFlight(manager))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class WorkerInFlight(Collector):
    def __init__(self, manager: "ModelManager"):
        self.manager = manager

    def collect(self):
        family = GaugeMetricFamily("disagg_frontend_worker_requests_in_flight",
                                   "Requests this frontend has open on each worker (a prefill request, a decode "
                                   "or aggregated stream)", labels=["model", "worker", "role"])
        for name, model in self.manager.served():
            for key, role, count in model.engine.in_flight():
                family.add_metric([name, key, role], count)
        yield family
