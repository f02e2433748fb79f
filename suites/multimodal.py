"""The multimodal deployment the cached_tokens suite checks (SPEC §5), embedded or foreign.

Embedded: two vLLM engines serve the tiny VLM, each with NIXL as `kv_both` and pinned to a core
of its own, behind two reference frontends on the same engines: one with both as aggregated
workers under KV selection, one with the first as prefill and the second as decode. Two engines
(about 6 GB) serve both topologies; the text deployment is stopped before they start, so the two
never hold the machine's memory together.

Foreign: `--frontend-url` with `--mm-model`; the engines whose prefix cache computes a prompt are
the `--engine-url` prefill engines if any, else the aggregated ones; the image span comes from the
multimodal card's local_dir in `--cache-root`.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import requests

from harness import evidence as ev
from harness.cluster import Cluster
from harness.deployment import Deployment
from harness.engines.launcher import EngineProcess, Progress, free_port, stderr_progress
from harness.engines.metrics import Metrics
from harness.engines.profiles import EngineProfile
from harness.frontend.media import decode
from harness.frontend.preprocessor import MediaSpan, Preprocessor
from harness.openai_client import OpenAIEndpoint

SERVED_VLM = "tiny-vlm"
PREDICTED_HEADER = "x-disagg-predicted-cached-blocks"

PREDICTED_BLOCKS = ev.Evidence(
    "predicted_blocks", "the router's predicted cached blocks per response (x-disagg-predicted-cached-blocks "
    "and x-disagg-block-size headers)", "only a frontend that reports its KV-routing prediction gives it "
    "(the harness frontend with --selection kv)")
PREFIX_ENGINE_METRICS = ev.Evidence(
    "prefix_engine_metrics", "the /metrics of every engine whose prefix cache computes the prompt (the prefill "
    "engines, or every aggregated worker)", "give --engine-url prefill=URL (or aggregated=URL for each worker)")
IMAGE_SPAN = ev.Evidence(
    "image_span", "where the image's placeholder tokens sit in the prompt, from the multimodal model's processor",
    "give --cache-root and --discovery (or --card) with the multimodal model's card")
PREFILL_ACCESS = ev.Evidence(
    "prefill_access", "a prefill engine's own OpenAI server and /metrics, to warm its prefix cache directly",
    "give --engine-url prefill=URL")


@dataclass
class MultimodalTarget:
    """One frontend serving a VLM, and the engines behind it that the checks may read."""

    name: str
    frontend_url: str | None
    model: str | None
    topology: str  # "kv-aggregated" | "disaggregated" | "unknown"
    prefix_engines: list[str] = field(default_factory=list)  # URLs whose prefix cache computes prompts
    decode_engine: str | None = None
    reference_engine: str | None = None  # an aggregated engine for output equality
    processor_dir: Path | None = None
    block_size: int | None = None
    deployment: Deployment | None = None
    planted: Callable[[str], str] | None = None  # fault -> URL of a frontend with it, on the same engines
    _processor: Preprocessor | None = field(default=None, repr=False)
    _endpoint: OpenAIEndpoint | None = field(default=None, repr=False)

    def at(self, frontend_url: str) -> "MultimodalTarget":
        """The same target behind another frontend (a planted one), with nothing cached from this one."""
        return dataclasses.replace(self, frontend_url=frontend_url, _processor=None, _endpoint=None)

    def lacks(self, need: ev.Evidence) -> str | None:
        if need is ev.FRONTEND:
            return None if self.frontend_url and self.model else ev.FRONTEND.lacking(
                "and --mm-model NAME for the multimodal model")
        if need is PREFIX_ENGINE_METRICS:
            return None if self.prefix_engines else need.lacking()
        if need is PREFILL_ACCESS:
            return None if self.topology == "disaggregated" and self.prefix_engines else need.lacking()
        if need is IMAGE_SPAN:
            return None if self.processor_dir else need.lacking()
        if need is ev.AGGREGATED_REFERENCE:
            return None if self.reference_engine else need.lacking()
        if need is ev.PLANTED_ROUTER:
            return None if self.planted else need.lacking()
        if need.key.startswith("metrics:decode"):
            if self.topology == "kv-aggregated":
                return f"{self.name} serves aggregated: there is no decode engine; this checks a prefill -> decode path"
            return None if self.decode_engine else need.lacking()
        return None

    def describe(self) -> dict[str, Any]:
        base = self.deployment.describe() if self.deployment else {}
        return {**base, "multimodal": {"target": self.name, "topology": self.topology, "model": self.model,
                                       "frontend": self.frontend_url, "prefix_engines": self.prefix_engines,
                                       "decode_engine": self.decode_engine, "block_size": self.block_size}}

    # ---- what the checks send and read

    def chat(self, image: bytes, text: str, max_tokens: int = 4, **extra: Any) -> requests.Response:
        """A greedy chat request in the frontend's probed dialect, so that a Dynamo frontend names its
        worker (nvext.worker_id) and nothing it would reject is sent."""
        if self._endpoint is None:
            self._endpoint = OpenAIEndpoint(self.frontend_url, self.model, timeout_s=180)
        return self._endpoint.chat(messages(image, text), max_tokens=max_tokens, **extra)

    def expanded(self, image: bytes, text: str) -> tuple[MediaSpan, int] | None:
        """The span the model's processor gives this image in this prompt, and the prompt's length
        with the image expanded into its placeholders (None: no processor here)."""
        if self.processor_dir is None:
            return None
        if self._processor is None:
            self._processor = Preprocessor.from_dir(self.model or "multimodal", self.processor_dir)
        msgs = messages(image, text)
        prompt = self._processor.prepare_chat(msgs, [decode("image", image)])
        return prompt.media[0], len(prompt.token_ids)

    def prefix_hits(self) -> float | None:
        """Prompt tokens the prefix engines found in their caches so far (None: not exported)."""
        total = 0.0
        for url in self.prefix_engines:
            value = Metrics.scrape(url).get("prompt_tokens_local_cache_hit")
            if value is None:
                return None
            total += value
        return total


def messages(image: bytes, text: str) -> list[dict]:
    """One user turn: the image first, then the text, so the image span starts within the first
    block and a different image leaves nothing after it to share."""
    import base64

    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def cached_tokens(response: requests.Response) -> int | str:
    """usage.prompt_tokens_details.cached_tokens, or "missing" when the frontend reported no
    prompt_tokens_details: SPEC §5 counts that as 0, but the report must tell it from an explicit 0."""
    details = (response.json().get("usage") or {}).get("prompt_tokens_details")
    if not isinstance(details, dict) or details.get("cached_tokens") is None:
        return "missing"
    return int(details["cached_tokens"])


def as_count(cached: int | str) -> int:
    return 0 if cached == "missing" else int(cached)


class EmbeddedMultimodal:
    """Two kv_both VLM engines and the frontends in front of them; `stop()` ends all of it."""

    def __init__(self, profile: EngineProfile, model_dir: Path, log_dir: Path, python: str, store: str | None = None):
        """`store`: an etcd URL with a prefix; each frontend registers under a prefix of its own
        below it. None: a file store per frontend."""
        self.profile, self.model_dir, self.log_dir, self.python = profile, Path(model_dir), Path(log_dir), python
        self.store = store
        self.workdir = Path(tempfile.mkdtemp(prefix="disagg-mm-"))  # short: vLLM's ZMQ socket paths are capped
        self.engines: list[EngineProcess] = []
        self.clusters: dict[str, Cluster] = {}
        self.planted_clusters: list[Cluster] = []
        self.stopped = False

    def start(self, progress: Progress = stderr_progress) -> "EmbeddedMultimodal":
        (self.workdir / "tmp").mkdir()
        env = {"VLLM_CACHE_ROOT": str(self.workdir / "vllm-cache"), "TMPDIR": str(self.workdir / "tmp"),
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        # One engine where the profile puts its prefill, the other where it puts its decode.
        cores = [self.profile.cores.get("prefill"), self.profile.cores.get("decode")]
        gpus = [self.profile.gpus.get("prefill"), self.profile.gpus.get("decode")]
        progress(f"[multimodal {self.profile.name}] starting 2 VLM engines (logs: {self.log_dir})")
        try:
            for i in range(2):
                spec = self.profile.launch_spec("aggregated", self.model_dir, SERVED_VLM, free_port(), free_port(),
                                                self.workdir, self.python, images_per_prompt=1, kv_both=True,
                                                name=f"{self.profile.name}-vlm-{i}", cores=cores[i], gpus=gpus[i])
                self.engines.append(EngineProcess(dataclasses.replace(spec, env={**spec.env, **env}),
                                                  self.log_dir).start())
            for engine in self.engines:
                engine.wait_healthy(self.profile.startup_timeout_s, progress)
            self.clusters["kv-aggregated"] = self.frontend("kv-aggregated", selection="kv")
            self.clusters["disaggregated"] = self.frontend("disaggregated")
        except BaseException:
            self.stop()
            raise
        return self

    def frontend(self, topology: str, selection: str = "round_robin", **kw: Any) -> Cluster:
        """A reference frontend on these engines: both aggregated under KV selection, or prefill + decode."""
        n = len(self.clusters) + len(self.planted_clusters)
        cluster = Cluster(self.workdir / f"frontend-{n}-{topology}", self.model_dir, SERVED_VLM,
                          block_size=self.profile.block_size, selection=selection, protocol=self.profile.protocol,
                          timeout_s=self.profile.request_timeout_s,
                          store=f"{self.store}-{n}-{topology}" if self.store else None, **kw).start()
        if topology == "kv-aggregated":
            for engine in self.engines:
                cluster.register(engine, role="aggregated")
            cluster.wait_until(lambda c: len(c.frontend.manager.models.get(SERVED_VLM).engine.instances()) == 2
                               if c.frontend.manager.models.get(SERVED_VLM) else False, "both VLM workers served")
        else:
            cluster.register(self.engines[0], role="prefill")
            cluster.register(self.engines[1], role="decode")
            cluster.wait_for_roles({"prefill", "decode"})
        return cluster

    def target(self, topology: str) -> MultimodalTarget:
        cluster = self.clusters[topology]
        urls = [e.url for e in self.engines]
        local_dir = next(iter(cluster.frontend.manager.models.values())).preprocessor.local_dir
        deployment = Deployment("embedded", cache_root=cluster.cache_root, frontend_url=cluster.url, model=SERVED_VLM,
                                profile=self.profile,
                                engines=self.roles(topology), discovery=cluster.store.url)
        return MultimodalTarget(
            f"{self.profile.name}/{topology}", cluster.url, SERVED_VLM, topology,
            prefix_engines=urls if topology == "kv-aggregated" else urls[:1],
            decode_engine=urls[1] if topology == "disaggregated" else None,
            reference_engine=urls[1], processor_dir=local_dir, block_size=self.profile.block_size,
            deployment=deployment, planted=lambda fault: self.planted(topology, fault))

    def roles(self, topology: str) -> dict[str, EngineProcess]:
        """The engines by the role each plays in `topology` (several of one role: `role:n`)."""
        if topology == "disaggregated":
            return {"prefill": self.engines[0], "decode": self.engines[1]}
        return {"aggregated" if n == 0 else f"aggregated:{n + 1}": e for n, e in enumerate(self.engines)}

    def planted(self, topology: str, fault: str) -> str:
        """The URL of a frontend with a planted fault, in front of the same engines."""
        from fixtures.planted_router import planted

        selection = "kv" if topology == "kv-aggregated" else "round_robin"
        if fault == "round_robin":  # KV routing off: the workers take turns, wherever the blocks are
            cluster = self.frontend(topology, "round_robin")
            self.planted_clusters.append(cluster)
            return cluster.url
        if fault == "drop_preprocessor_config":
            cluster = self.frontend(topology, selection)
            self.planted_clusters.append(cluster)
            drop_preprocessor_config(cluster)
            return cluster.url
        cluster = self.frontend(topology, selection, router=planted(fault))
        self.planted_clusters.append(cluster)
        return cluster.url

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        try:
            for cluster in self.planted_clusters + list(self.clusters.values()):
                cluster.stop()
        finally:  # whatever a frontend's stop did, the engines (3 GB each, spinning) must not outlive the run
            for engine in self.engines:
                engine.stop()
            shutil.rmtree(self.workdir, ignore_errors=True)


def drop_preprocessor_config(cluster: Cluster) -> None:
    """R1: the frontend's local_dir loses preprocessor_config.json (only typed files kept), and the
    frontend loads the model from it as it is."""
    model = cluster.frontend.manager.models[SERVED_VLM]
    local_dir = model.preprocessor.local_dir
    for name in ("preprocessor_config.json", "processor_config.json"):  # neither is a typed slot
        (local_dir / name).unlink(missing_ok=True)
    model.preprocessor = Preprocessor.from_dir(SERVED_VLM, local_dir)


def image_bytes(seed: int) -> bytes:
    from fixtures.tiny_vlm import image_png

    return image_png(seed)
