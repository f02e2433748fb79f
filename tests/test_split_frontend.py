"""The relay-cost bench's split arm (benchmarks/split_frontend.py): whole frontends in several
processes on one port. It must really be several frontends, or the bench's figure for a second
process measures one; and each keeps its own routing state and metrics, which is why it is a bench
arm and not a way to run the frontend."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from benchmarks.split_frontend import wait_each_serving
from harness.cluster import Cluster
from harness.engines.launcher import EngineProcess, free_port
from harness.engines.metrics import Metrics
from harness.engines.profiles import LaunchSpec

REQUESTS = 40


@pytest.fixture
def split(tmp_path, tiny_model, fake_engines):
    """Two frontend processes on one port, over a fake prefill and decode: the URL."""
    with Cluster(tmp_path / "cluster", tiny_model, "tiny", block_size=32, lease_s=10, timeout_s=10) as cluster:
        cluster.serve(fake_engines("prefill"), fake_engines("decode"))
        port = free_port()
        command = [sys.executable, "-m", "benchmarks.split_frontend", "--processes", "2", "--store",
                   str(cluster.workdir / "discovery"), "--cache-root", str(tmp_path / "mdc"), "--port", str(port)]
        proc = EngineProcess(LaunchSpec("split-frontend", "frontend", command, {}, port), tmp_path).start()
        try:
            proc.wait_healthy(60)
            wait_each_serving(proc.url, "tiny")
            yield proc.url
        finally:
            proc.stop(grace_s=5)


def requests_counted(client: httpx.Client, url: str) -> float:
    """What the process behind this client's connection has counted (its own /metrics)."""
    families = Metrics.parse(client.get(f"{url}/metrics").text).families
    return sum(v for name, _, v in families.get("disagg_frontend_requests", []) if name.endswith("_total"))


def test_each_process_is_a_whole_frontend_that_counts_only_the_requests_it_served(split):
    with httpx.Client() as one:  # one kept-alive connection: always the same process
        before = requests_counted(one, split)
        for _ in range(REQUESTS):  # a connection each, as the kernel spreads connections, not requests
            resp = httpx.post(f"{split}/v1/completions", json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 2})
            assert resp.status_code == 200 and resp.headers["x-disagg-mode"] == "disaggregated"
        counted = requests_counted(one, split) - before
    # All 40 on one process, or none: 2 * 2**-40, or the port has one process behind it.
    assert 0 < counted < REQUESTS, f"one process counted {counted:g} of {REQUESTS} requests served on the port"


def test_a_port_the_processes_cannot_share_is_refused_by_name(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.split_frontend", "--store", str(tmp_path / "store"),
                          "--cache-root", str(tmp_path / "mdc"), "--port", "0"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "--port must be a fixed port" in out.stderr
    assert not (tmp_path / "mdc").exists() and not (tmp_path / "store").exists(), "nothing is started or written"
