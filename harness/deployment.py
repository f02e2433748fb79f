"""What the suites test: one deployment, built by the harness or described by a user's options.

A `Deployment` holds whatever the deployment under test has: a metadata cache and its cards, a
frontend URL and the served model, engines by role. Each check names the evidence it needs
(`harness.evidence`); `lacks()` says, for a deployment that cannot give it, exactly what is
missing and which option would supply it. The suites never ask which kind of deployment it is.

Embedded deployments are started here, as library code: `start_embedded()` launches real engines
from a profile behind the reference frontend (`python -m harness up` does it for a person).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

import harness
from harness import evidence as ev
from harness.card import ModelCard, hash_file
from harness.card_sources import CardRecord, serving_mode, source_dir, unique_labels
from harness.engines.launcher import Progress, stderr_progress
from harness.engines.metrics import Metrics
from harness.engines.profiles import ROLES, EngineProfile
from harness.interposer import InterposedEngine, Interposer, handle
from harness.kv_geometry import model_kv_block_bytes
from harness.openai_client import MODE_HEADER, OpenAIEndpoint
from harness.warm_up import warm_up

EMBEDDED = "embedded"
FOREIGN = "foreign"
SERVED_NAME = "tiny-llama"  # the embedded engines' served name, the card's display_name


@dataclass
class CardUnderTest:
    """A card as its worker published it, and the source dir it came from when known."""

    label: str
    card: ModelCard
    source_dir: Path | None = None
    mode: str = "unknown"  # shared-storage | self-host | hf-cache | unknown
    origin: str | None = None  # the file or discovery key it was read from


def cards_from_records(records: list[CardRecord]) -> list[CardUnderTest]:
    return [CardUnderTest(label, r.card, source_dir(r.card), serving_mode(r.card), r.origin)
            for label, r in zip(unique_labels(records), records)]


def holds_card_files(directory: Path, card: ModelCard) -> bool:
    """Every checked file of `card` is in `directory` under its name, as a link to the blob named by
    its checksum (the cache layout, SPEC §1.5) or as a file with that content."""
    for _, file in card.checked_files():
        entry = directory / file.name
        if entry.is_symlink() and Path(os.readlink(entry)).name == file.checksum.hex:
            continue
        if not entry.is_file() or hash_file(entry) != file.checksum.hex:
            return False
    return True


def frontend_local_dir(card: ModelCard, cache_root: Path) -> tuple[Path, bool]:
    """Where the frontend keeps `card`'s files: its SPEC §1.4 local_dir when that exists; else the one
    dir beside it (same slug) that holds every checked file of this card, so that a frontend whose checksum
    differs from the spec's is still checked on what it wrote (the naming check reports the
    difference). The flag says whether the spec's path was the one found."""
    spec_dir = card.local_dir(cache_root)
    if spec_dir.is_dir() or not spec_dir.parent.is_dir():
        return spec_dir, True
    found = [d for d in sorted(spec_dir.parent.iterdir()) if d.is_dir() and holds_card_files(d, card)]
    return (found[0], False) if len(found) == 1 else (spec_dir, True)


def engine_version(url: str) -> str | None:
    try:
        return requests.get(f"{url.rstrip('/')}/version", timeout=5).json().get("version")
    except (requests.RequestException, ValueError, AttributeError):
        return None


INTERPOSED_ROLES = ("prefill", "decode")


@dataclass
class InterposedWorker:
    """An engine as its router sees it: the interposer's URL, the engine's name and role. The
    embedded frontend is given these, so the suite sees what it sends each engine as it would
    for any router."""

    engine: Any
    interposer: Interposer

    name = property(lambda self: self.engine.name)
    role = property(lambda self: self.engine.role)
    url = property(lambda self: self.interposer.url)


@dataclass
class Deployment:
    kind: str  # embedded | foreign
    cache_root: Path | None = None
    cards: list[CardUnderTest] = field(default_factory=list)
    frontend_url: str | None = None
    frontend_metrics_url: str | None = None  # its Prometheus /metrics, where not at frontend_url
    model: str | None = None  # the served model name the serving checks use
    # role -> EngineProcess | DockerEngine | ExternalEngine; several engines of one role: "role:n"
    engines: dict[str, Any] = field(default_factory=dict)
    discovery: str | None = None  # where the cards were read from, for the report
    profile: EngineProfile | None = None
    # embedded serving only: what stops, kills and restarts engines
    cluster: Any = None  # harness.cluster.Cluster
    workdir: Path | None = None
    log_dir: Path | None = None
    python: str | None = None
    launcher: str = "auto"
    extra_env: dict[str, str] = field(default_factory=dict)
    store_server: Any = None  # an etcd this run started for the embedded deployment: what stops and restarts it
    interposed: dict[str, InterposedEngine] = field(default_factory=dict)  # role -> the relay in front of it
    frontend_command: list[str] | None = None  # --frontend-cmd, as started
    model_dir: Path | None = None  # the served model's dir, where this run knows it (its KV geometry)
    # embedded only: the first disaggregated request's failed tries (harness/warm_up.py), for the report
    warm_up_failures: list[dict] = field(default_factory=list)
    _interposers: dict[str, Interposer] = field(default_factory=dict, repr=False)  # the relays this run started
    _endpoints: dict[str, OpenAIEndpoint] = field(default_factory=dict, repr=False)
    _versions: dict[str, str | None] = field(default_factory=dict, repr=False)

    @property
    def embedded(self) -> bool:
        return self.kind == EMBEDDED

    @property
    def on_etcd(self) -> bool:
        """Its workers register in etcd (an etcd this run started, or one given by URL)."""
        return (self.discovery or "").startswith("etcd")

    # ---- cards

    def local_dir(self, c: CardUnderTest) -> Path:
        """The dir the frontend keeps this card's files in (see frontend_local_dir)."""
        return frontend_local_dir(c.card, self.cache_root)[0]

    def card(self, label: str) -> CardUnderTest:
        for c in self.cards:
            if c.label == label:
                return c
        raise KeyError(f"no card labelled {label!r} in this deployment; it has {[c.label for c in self.cards]}")

    # ---- serving

    def url(self, role: str) -> str:
        return self.engines[role].url

    def kv_block(self) -> tuple[int, int] | None:
        """(block size, bytes one KV block of the served model takes), where this run knows the model
        and the engines' cache dtype (a profile it launched: vLLM's cache dtype is the model dtype)."""
        if self.profile is None or self.model_dir is None:
            return None
        return self.profile.block_size, model_kv_block_bytes(self.model_dir, self.profile.dtype, self.profile.block_size)

    def has(self, role: str) -> bool:
        return role in self.engines

    def endpoint(self) -> OpenAIEndpoint:
        """The frontend, probed once for what it accepts."""
        if "frontend" not in self._endpoints:
            timeout = self.profile.request_timeout_s if self.profile else 120.0
            self._endpoints["frontend"] = OpenAIEndpoint(self.frontend_url, self.model, timeout).probe()
        return self._endpoints["frontend"]

    def engine_endpoint(self, role: str) -> OpenAIEndpoint:
        """An engine's own OpenAI server (the aggregated reference), probed once."""
        if role not in self._endpoints:
            self._endpoints[role] = OpenAIEndpoint(self.url(role), self.model).probe()
        return self._endpoints[role]

    # ---- evidence

    def lacks(self, need: ev.Evidence) -> str | None:
        """None when this deployment can give `need`; else the reason a check needing it skips."""
        if need is ev.CACHE:
            return None if self.cache_root and self.cards else need.lacking()
        if need is ev.SOURCE_DIR:
            return need.lacking()  # asked per card: see lacks_source
        if need is ev.FRONTEND:
            return None if self.frontend_url else need.lacking()
        if need is ev.HARNESS_CODE:
            return None if self.embedded else need.lacking()
        if need in (ev.ENGINE_CONTROL, ev.PLANTED_ROUTER):
            return None if self.cluster is not None else need.lacking()
        if need is ev.STORE_CONTROL:
            return None if self.cluster is not None and self.store_server is not None else need.lacking(
                f"this one registers in {self.discovery}")
        if need is ev.INTERPOSED:
            missing = [r for r in INTERPOSED_ROLES if r not in self.interposed]
            return None if not missing else need.lacking(f"no relay in front of the {' and '.join(missing)} engine")
        if need is ev.AGGREGATED_REFERENCE:
            return None if self.has("aggregated") else need.lacking()
        if need is ev.PREFILL_WORKER:
            # Known absent only where the run sees the workers (engine URLs or the cards in
            # discovery) and none is a prefill; where it cannot tell, the check runs and the
            # router's own routing report decides.
            roles = {r.split(":")[0] for r in self.engines} | {c.card.role for c in self.cards}
            seen = bool(self.engines) or bool(self.cards)
            return need.lacking(f"it shows {sorted(roles)}") if seen and "prefill" not in roles else None
        if need is ev.FRONTEND_METRICS:
            if (missing := self.lacks(ev.FRONTEND)) is not None:
                return missing
            try:
                metrics = self.frontend_metrics()
            except Exception as exc:  # no /metrics there, or not Prometheus text
                return need.lacking(f"{self.metrics_url_of_frontend()}/metrics: {type(exc).__name__}: {exc}"[:300])
            if metrics.source("frontend_worker_requests_in_flight") is None and \
                    metrics.source("frontend_requests_in_flight") is None:
                return need.lacking(metrics.missing("frontend_requests_in_flight", "frontend_worker_requests_in_flight"))
            return None
        if need.key.startswith("metrics:"):
            return None if self.has(need.key.split(":", 1)[1]) else need.lacking()
        if (missing := self.lacks(ev.FRONTEND)) is not None:
            return missing
        endpoint = self.endpoint()
        if need is ev.TOKEN_IDS:
            return None if endpoint.returns_token_ids else need.lacking(endpoint.probe_note or "")
        if need is ev.ROUTING_HEADERS:
            return None if endpoint.reports_routing else need.lacking(
                f"{self.frontend_url} sent neither an {MODE_HEADER} header nor nvext.worker_id")
        if need is ev.ENGINE_REQUEST_IDS:
            return None if "x-disagg-decode-engine-request-id" in endpoint.probe_headers else need.lacking()
        raise ValueError(f"unknown evidence {need.key}")

    def metrics_url_of_frontend(self) -> str | None:
        return self.frontend_metrics_url or self.frontend_url

    def frontend_metrics(self) -> Metrics:
        """One scrape of the frontend's own /metrics."""
        return Metrics.scrape(self.metrics_url_of_frontend())

    def describe(self) -> dict[str, Any]:
        for e in self.engines.values():  # asked once per engine: describe() runs for every check
            if e.url not in self._versions:
                self._versions[e.url] = engine_version(e.url)
        engines = [{"name": e.name, "role": role.split(":")[0], "url": e.url, "version": self._versions[e.url],
                    "engine": self.profile.engine if self.profile else None,
                    "healthy_after_s": getattr(e, "healthy_after_s", None),
                    "log": str(getattr(e, "log_path", "")) or None, "behind_frontend": role != "aggregated"}
                   for role, e in self.engines.items()]
        if self.embedded:
            frontend = {"name": "harness", "version": harness.__version__, "url": self.frontend_url,
                        "role": "reference frontend" if self.frontend_url else "reference resolver (embedded)"}
        else:
            frontend = {"name": "foreign", "version": None, "role": "user-supplied frontend", "url": self.frontend_url,
                        "command": " ".join(self.frontend_command) if self.frontend_command else None}
        probed = self._endpoints.get("frontend")
        return {
            "kind": self.kind, "profile": self.profile.name if self.profile else None, "frontend": frontend,
            "model": self.model, "engines": engines, "discovery": self.discovery,
            "cache_root": str(self.cache_root) if self.cache_root else None,
            "interposed": {role: {"url": i.url, "upstream": i.upstream, "control_url": i.control_url}
                           for role, i in self.interposed.items()},
            "warm_up_failures": self.warm_up_failures,
            "frontend_returns_token_ids": probed.returns_token_ids if probed else None,
            "frontend_dialect": probed.dialect if probed else None,
            "cards": [{"label": c.label, "display_name": c.card.display_name, "mode": c.mode,
                       "worker_type": c.card.worker_type.value if c.card.worker_type else None,
                       "origin": c.origin, "local_dir": str(c.card.local_dir(self.cache_root))}
                      for c in self.cards if self.cache_root],
        }

    # ---- embedded only: what fault and fallback checks do to the engines

    def _control(self) -> None:
        if self.cluster is None:
            raise RuntimeError(ev.ENGINE_CONTROL.lacking())

    def _spec(self, role: str):
        from harness.engines.launcher import free_port

        spec = self.profile.launch_spec(role, self.cluster.model_dir, self.model, free_port(), free_port(),
                                        self.workdir, python=self.python)
        return dataclasses.replace(spec, env={**spec.env, **self.extra_env})

    def _engine(self, spec):
        from harness.engines.docker_launcher import DockerEngine, choose_launcher
        from harness.engines.launcher import EngineProcess

        if choose_launcher(self.launcher, spec) == "docker":
            return DockerEngine(spec, str(self.cluster.model_dir))
        return EngineProcess(spec, self.log_dir)

    def launch(self, roles: tuple[str, ...], progress: Progress = stderr_progress) -> None:
        """Start these roles' engines at once, wait for all, register prefill/decode with the frontend."""
        self._control()
        started = {role: self._engine(self._spec(role)).start() for role in roles}
        self.engines.update(started)
        for engine in started.values():
            engine.wait_healthy(self.profile.startup_timeout_s, progress)
        for role, engine in started.items():
            if role in INTERPOSED_ROLES:
                self.cluster.register(InterposedWorker(engine, self.interpose(role, engine.url)))
            elif role != "aggregated":
                self.cluster.register(engine)
        wanted = {r for r in started if r != "aggregated"}  # served by the frontend (others may be too)
        self.cluster.wait_until(lambda c: wanted <= c.roles_served(), f"frontend serving {sorted(wanted)}", timeout_s=60)

    def interpose(self, role: str, engine_url: str) -> Interposer:
        """A relay of this run's in front of `role`'s engine (the one before it, if any, is stopped)."""
        if (old := self._interposers.pop(role, None)) is not None:
            old.stop()
        self._interposers[role] = Interposer(role, engine_url).start()
        self.interposed[role] = handle(self._interposers[role])
        return self._interposers[role]

    def stop_interposers(self) -> None:
        for role in list(self._interposers):
            self._interposers.pop(role).stop()
            self.interposed.pop(role, None)

    def stop_role(self, role: str) -> None:
        """A clean stop: the worker deregisters, then its engine's process group is stopped."""
        self._control()
        engine = self.engines.pop(role)
        self.cluster.deregister(engine.name)
        engine.stop()

    def kill_role(self, role: str) -> None:
        """A crash: SIGKILL the engine's process group; its lease expires on its own."""
        self._control()
        self.engines[role].kill()

    def restart_role(self, role: str, progress: Progress = stderr_progress) -> None:
        self._control()
        old = self.engines.pop(role, None)
        if old is not None:
            self.cluster.deregister(old.name)
            old.stop()
        self.launch((role,), progress)

    def stop_store(self) -> None:
        """The discovery store goes down (etcd stopped, its data kept); engines and frontend run on."""
        if self.store_server is None:
            raise RuntimeError(ev.STORE_CONTROL.lacking())
        self.store_server.stop()

    def start_store(self) -> None:
        if self.store_server is None:
            raise RuntimeError(ev.STORE_CONTROL.lacking())
        self.store_server.start()

    def stop(self) -> None:
        """Stop what this deployment started; a foreign deployment's parts are not ours to stop (its
        relays in front of them are)."""
        if not self.embedded:
            self.stop_interposers()
            return
        for role in list(self.engines):
            self.engines.pop(role).stop()
        if self.cluster:
            self.cluster.stop()
            self.cluster = None  # stopped once: a second stop() (the multimodal checks' and the fixture's) is a no-op
        self.stop_interposers()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return 0
    return len([line for line in out.stdout.splitlines() if line.startswith("GPU ")])


def module_available(python: str, module: str) -> bool:
    """Whether `python` can import `module`, asked cheaply (find_spec, no import)."""
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0


def start_embedded(profile: EngineProfile, model_dir: Path, log_dir: Path, python: str,
                   progress: Progress = stderr_progress, launcher: str = "auto", store: str | None = None,
                   store_server: Any = None) -> Deployment:
    """Real engines from `profile` (prefill, decode, and an aggregated reference not behind the
    frontend), each prefill/decode registered by the harness's worker side, behind the reference
    frontend. Workers register in `store` (etcd://HOST:PORT/prefix) or, by default, a file store in
    the workdir; `store_server` is the etcd behind `store` when this run may stop it. Stop it all
    with `.stop()`."""
    from harness.cluster import Cluster

    # A short scratch path: vLLM puts ZMQ unix sockets under TMPDIR, and those paths are length-capped.
    workdir = Path(tempfile.mkdtemp(prefix="disagg-"))
    env = {"VLLM_CACHE_ROOT": str(workdir / "vllm-cache"), "TMPDIR": str(workdir / "tmp"),
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    (workdir / "tmp").mkdir()
    cluster = Cluster(workdir / "cluster", model_dir, SERVED_NAME, block_size=profile.block_size,
                      protocol=profile.protocol, timeout_s=profile.request_timeout_s, store=store).start()
    deployment = Deployment(EMBEDDED, cache_root=cluster.cache_root, frontend_url=cluster.url, model=SERVED_NAME,
                            profile=profile, cluster=cluster, model_dir=Path(model_dir), workdir=workdir,
                            log_dir=Path(log_dir), python=python,
                            launcher=launcher, extra_env=env, discovery=cluster.store.url, store_server=store_server)
    progress(f"[deployment {profile.name}] starting {', '.join(ROLES)} engines (logs: {log_dir}; "
             f"discovery: {deployment.discovery})")
    try:
        deployment.launch(ROLES, progress)
        deployment.warm_up_failures = warm_up(cluster.url, SERVED_NAME, deployment.engines,
                                              profile.request_timeout_s, progress)
        deployment.cards = cards_from_records([CardRecord(f"{deployment.discovery} key {key}", entry.model_card())
                                               for key, entry in cluster.store.entries().items()])
    except BaseException:
        deployment.stop()
        raise
    return deployment
