"""Requests in flight and KV usage over time, sampled from /metrics while a burst or a storm runs.

A sampler thread scrapes each engine (requests running, KV cache usage) and the frontend (its own
in-flight count, where it exports one) every `period_s`. The samples go into the check's report
properties, and a plot per run into reports/under-load/: the shape of a drain is seen at a glance
(a prefill holding KV for a lease after its clients left is a plateau, a leak a line that never
comes down).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from harness import evidence as ev
from harness.deployment import Deployment
from harness.engines.metrics import Metrics

ENGINE_ROLES = ("prefill", "decode")


class Timeline:
    def __init__(self, deployment: Deployment, period_s: float = 0.25):
        self.deployment, self.period_s = deployment, period_s
        self.samples: list[dict] = []
        self.marks: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()
        self.frontend = deployment.lacks(ev.FRONTEND_METRICS) is None

    def _sample(self) -> dict:
        row: dict = {"t": round(time.monotonic() - self._t0, 2)}
        for role in ENGINE_ROLES:
            try:
                m = Metrics.scrape(self.deployment.url(role), timeout=5)
                row[f"{role}_running"], row[f"{role}_kv_usage"] = m.get("requests_running"), m.get("kv_cache_usage")
            except Exception:  # a killed engine: a gap in its line, not a failed check
                row[f"{role}_running"] = row[f"{role}_kv_usage"] = None
        if self.frontend:
            try:
                m = self.deployment.frontend_metrics()
                row["frontend_in_flight"] = m.get("frontend_worker_requests_in_flight")
                if row["frontend_in_flight"] is None:
                    row["frontend_in_flight"] = m.get("frontend_requests_in_flight")
            except Exception:
                row["frontend_in_flight"] = None
        return row

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.samples.append(self._sample())
            self._stop.wait(max(0.0, self.period_s - (time.monotonic() - started)))

    def mark(self, label: str) -> None:
        self.marks.append((round(time.monotonic() - self._t0, 2), label))

    def __enter__(self) -> "Timeline":
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="load-timeline", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def summary(self) -> dict:
        """Peaks, for the report table."""
        out: dict = {"samples": len(self.samples)}
        for key in ("prefill_running", "decode_running", "prefill_kv_usage", "decode_kv_usage", "frontend_in_flight"):
            values = [s[key] for s in self.samples if s.get(key) is not None]
            if values:
                out[f"peak_{key}"] = round(max(values), 4)
        return out

    def plot(self, path: Path, title: str) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path.parent.mkdir(parents=True, exist_ok=True)
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
        t = [s["t"] for s in self.samples]
        for key, label in (("prefill_running", "prefill running"), ("decode_running", "decode running"),
                           ("frontend_in_flight", "frontend in flight")):
            if any(s.get(key) is not None for s in self.samples):
                top.step(t, [s.get(key) for s in self.samples], where="post", label=label)
        top.set_ylabel("requests")
        top.legend(loc="upper right", fontsize=8)
        for role in ENGINE_ROLES:
            values = [None if s.get(f"{role}_kv_usage") is None else 100 * s[f"{role}_kv_usage"] for s in self.samples]
            bottom.plot(t, values, label=f"{role} KV usage")
        bottom.set_ylabel("KV cache usage (%)")
        bottom.set_xlabel("seconds")
        bottom.legend(loc="upper right", fontsize=8)
        for at, label in self.marks:
            for ax in (top, bottom):
                ax.axvline(at, color="grey", linestyle=":", linewidth=1)
            top.annotate(label, (at, 1), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                         va="top", ha="right")
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
