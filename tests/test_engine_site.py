"""The engine site: what the launcher puts on a CPU engine's PYTHONPATH (NIXL's progress thread).

Without it NIXL's UCX progress thread polls with a 0 ms timeout in a loop, a core per engine;
with it the same thread blocks in poll() with the profile's delay as its fallback wake-up.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from harness.engines.profiles import ENGINE_SITE, PROFILES, nixl_progress_delay_env

# The child makes a NIXL agent with vLLM's own config, then reads what each of its threads is
# blocked in (/proc/self/task/*/syscall: number, then arguments); poll() is 7 on x86-64 and its
# third argument the timeout in ms. The progress thread is the one in poll() on the UCX
# workers' fds and its control pipe; the other pollers (zmq, UCX's async thread) wait without a
# timeout or in epoll.
POLL_TIMEOUTS_OF_A_NIXL_AGENT = textwrap.dedent("""
    import json, os, time
    from nixl._api import nixl_agent, nixl_agent_config
    agent = nixl_agent("engine-site-check", nixl_agent_config(num_threads=4, capture_telemetry=True))
    seen = set()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        for tid in os.listdir("/proc/self/task"):
            try:
                fields = open(f"/proc/self/task/{tid}/syscall").read().split()
            except OSError:
                continue
            if fields[0] == "7" and int(fields[3], 16) < 2**31:
                seen.add(int(fields[3], 16))
        time.sleep(0.01)
    print(json.dumps(sorted(seen)), flush=True)
    os._exit(0)  # not NIXL's teardown at interpreter exit: with its progress thread live it may crash (seen: SIGSEGV)
""")

needs_nixl = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import nixl._api"], capture_output=True).returncode != 0,
    reason="needs NIXL in this interpreter (tox -e py installs nixl 1.5.1)")
needs_x86_proc = pytest.mark.skipif(platform.machine() != "x86_64" or not os.path.exists("/proc/self/syscall"),
                                    reason="reads poll()'s timeout from /proc/<tid>/syscall, as numbered on x86-64")


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


def nixl_poll_timeouts(env: dict[str, str]) -> list[int]:
    env = {"UCX_TLS": "self,sm,tcp", "UCX_NET_DEVICES": "lo", **env}
    done = run_python(POLL_TIMEOUTS_OF_A_NIXL_AGENT, env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_nixl
@needs_x86_proc
def test_under_the_engine_site_nixls_progress_thread_waits_in_poll_with_the_delay():
    assert 1 in nixl_poll_timeouts(nixl_progress_delay_env(1000)), "no thread blocked in poll() with a 1 ms timeout"


@needs_nixl
@needs_x86_proc
def test_without_the_engine_site_nixls_progress_thread_never_waits_with_a_timeout():
    """The check above failing without the site: NIXL left alone busy-polls (its thread is seen
    running, never blocked with a timeout)."""
    env = {k: v for k, v in nixl_progress_delay_env(1000).items() if k != "PYTHONPATH"}
    assert 1 not in nixl_poll_timeouts(env)


def test_a_delay_that_is_not_a_number_is_named_and_the_interpreter_still_starts():
    done = run_python("print('started')", {**nixl_progress_delay_env(1000), "DISAGG_NIXL_PROGRESS_DELAY_US": "1ms"})
    assert done.returncode == 0 and done.stdout.strip() == "started"
    assert "DISAGG_NIXL_PROGRESS_DELAY_US='1ms' is not a whole number" in done.stderr


def test_a_sitecustomize_the_engine_site_shadows_still_runs(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import builtins; builtins.THEIRS = 'ran'\n")
    env = nixl_progress_delay_env(1000)
    env["PYTHONPATH"] = os.pathsep.join([str(ENGINE_SITE), str(tmp_path)])
    done = run_python("import builtins; print(getattr(builtins, 'THEIRS', 'not run'))", env)
    assert done.stdout.strip() == "ran", done.stderr


def test_the_cpu_profiles_nixl_engines_get_the_engine_site_and_gpu_profiles_keep_nixls_own(tmp_path):
    def env_of(profile: str, role: str) -> dict[str, str]:
        return PROFILES[profile].launch_spec(role, tmp_path, "m", 1, 2, tmp_path).env

    for role in ("prefill", "decode"):
        env = env_of("cpu", role)
        assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ENGINE_SITE)
        assert env["DISAGG_NIXL_PROGRESS_DELAY_US"] == "1000"
        assert "DISAGG_NIXL_PROGRESS_DELAY_US" not in env_of("gpu-vllm", role)
    assert "DISAGG_NIXL_PROGRESS_DELAY_US" not in env_of("cpu", "aggregated"), "an aggregated engine has no NIXL"
    assert "DISAGG_NIXL_PROGRESS_DELAY_US" not in env_of("cpu-shared-storage", "prefill"), "no NIXL there either"
