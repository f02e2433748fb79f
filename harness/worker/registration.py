"""Register one engine as a worker (SPEC §3): self-hosted card, a model entry, a renewed lease.

The lease is renewed only while the engine answers `/health`, so an engine that dies takes its
entry with it when the lease runs out, the same way an etcd lease expires with its worker.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from harness.discovery import DEFAULT_LEASE_S, MODEL_TYPE_FOR_ROLE, ModelEntry, Store
from harness.engines.health import is_healthy
from harness.worker.card_builder import DEFAULT_ENDPOINT
from harness.worker.metadata_server import MetadataServer

log = logging.getLogger(__name__)


class WorkerRegistration:
    def __init__(self, store: Store, metadata: MetadataServer, *, engine_url: str, model_dir: str | Path,
                 name: str, role: str | None, block_size: int, endpoint: str = DEFAULT_ENDPOINT,
                 lease_s: float = DEFAULT_LEASE_S, context_length: int | None = None,
                 bootstrap_port: int | None = None):
        self.store, self.metadata, self.engine_url = store, metadata, engine_url.rstrip("/")
        self.model_dir, self.name, self.role, self.block_size = Path(model_dir), name, role, block_size
        self.endpoint, self.lease_s, self.context_length = endpoint, lease_s, context_length
        self.bootstrap_port = bootstrap_port  # an SGLang prefill's: where a decode pulls its KV from (SPEC §4.2)
        self.entry: ModelEntry | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # The lease is renewed on a fixed schedule, RENEWALS_PER_LEASE times per lease, by what the
    # engine's /health last said. A probe runs beside the schedule and may take up to a whole
    # lease: on a loaded host (a burst of 16 streams on 2 cores) vLLM's /health can take longer
    # than a renewal period, and a slow answer is an engine that is alive. The lease is kept while
    # the last probe that ended said 200 and one did within the last lease. So:
    # - an engine that refuses or errs (dead, stopping) loses its entry within one lease;
    # - an engine that stops answering at all (hung) loses it within two;
    # - a slow one keeps it. (Dynamo keeps its etcd lease from the worker process whatever the
    #   engine does; renewing on health is this reference's choice, so a dead engine leaves.)
    RENEWALS_PER_LEASE = 4

    @property
    def period_s(self) -> float:
        return self.lease_s / self.RENEWALS_PER_LEASE

    def engine_healthy(self) -> bool:
        return is_healthy(self.engine_url, timeout=self.lease_s)

    def start(self) -> ModelEntry:
        card = self.metadata.publish(self.model_dir, self.name, worker_type=self.role, block_size=self.block_size,
                                     endpoint=self.endpoint, context_length=self.context_length)
        self.entry = ModelEntry(name=self.name, endpoint=self.endpoint, model_type=MODEL_TYPE_FOR_ROLE[self.role],
                                card=card.to_json(), instance_id=os.urandom(8).hex(), url=self.engine_url,
                                role=self.role,
                                extra={"bootstrap_port": self.bootstrap_port} if self.bootstrap_port else {})
        self.store.put(self.entry, self.lease_s)
        self._stop.clear()
        self._thread = threading.Thread(target=self._keepalive, name=f"lease:{self.entry.key}", daemon=True)
        self._thread.start()
        log.info("registered %s (%s) as %s", self.name, self.role, self.entry.key)
        return self.entry

    def _keepalive(self) -> None:
        """Renew while the engine is alive by its last probe; skip renewals while not, so a dead
        engine's lease lapses; register again when it answers. Ticks keep to the schedule whatever
        a probe takes (a late tick is not made up twice)."""
        probe: _Probe | None = None
        last_ok_at, last_ok, failing = time.monotonic(), True, False
        next_tick = time.monotonic()
        while not self._stop.wait(max(0.0, next_tick - time.monotonic())):
            next_tick = max(next_tick + self.period_s, time.monotonic())
            if probe is not None and probe.ended.is_set():
                last_ok = probe.ok
                last_ok_at = time.monotonic() if last_ok else last_ok_at
                probe = None
            if probe is None:
                probe = _Probe(self.engine_healthy, f"health:{self.entry.key}")
            alive = last_ok and time.monotonic() - last_ok_at < self.lease_s
            if not alive:
                if not failing:
                    log.warning("engine %s is not answering /health (%s); not renewing the lease of %s",
                                self.engine_url, "it refused or erred" if not last_ok else
                                f"no answer for {time.monotonic() - last_ok_at:.1f} s", self.entry.key)
                failing = True
                continue
            failing = False
            try:
                if not self.store.renew(self.entry.key, self.lease_s):
                    log.warning("lease of %s had lapsed; registering again", self.entry.key)
                    self.store.put(self.entry, self.lease_s)
            except Exception as exc:  # the store itself is down (etcd restarting): try at the next renewal
                log.warning("renewing %s failed: %s", self.entry.key, exc)

    def stop(self) -> None:
        """A clean stop deletes the entry at once; the frontend need not wait for the lease."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self.entry:
            try:
                self.store.delete(self.entry.key)
            except Exception as exc:  # the store is down: the entry goes when its lease runs out
                log.warning("could not delete %s (%s); it expires with its lease (%.0f s)", self.entry.key, exc,
                            self.lease_s)


class _Probe:
    """One health probe on a daemon thread, so a hung engine holds up neither the schedule nor exit."""

    def __init__(self, check, name: str):
        self.ok, self.ended = False, threading.Event()

        def run() -> None:
            try:
                self.ok = bool(check())
            finally:
                self.ended.set()

        threading.Thread(target=run, name=name, daemon=True).start()
