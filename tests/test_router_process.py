"""--frontend-cmd: the router under test is started from a template the suite fills in, waited on
until it serves, and stopped by its process group. Bad templates are errors naming what was wrong."""

from __future__ import annotations

import os
import sys

import pytest
import requests

from fixtures.fake_engine import FakeEngine
from harness.router_process import FrontendCommandError, fill_template, started

ENGINES = {"prefill": "http://127.0.0.1:8100", "decode": "http://127.0.0.1:8200"}


def test_every_placeholder_is_filled_with_the_relays_and_free_ports():
    command = fill_template("router --p {prefill_url} --d {decode_host}:{decode_port} --h {host} --port {port} "
                            "--m {metrics_port} --ph {prefill_host} --pp {prefill_port} --du {decode_url}", 9000,
                            ENGINES)
    assert command[:9] == ["router", "--p", "http://127.0.0.1:8100", "--d", "127.0.0.1:8200", "--h", "127.0.0.1",
                           "--port", "9000"]
    assert command[10].isdigit() and command[10] != "9000"
    assert command[11:] == ["--ph", "127.0.0.1", "--pp", "8100", "--du", "http://127.0.0.1:8200"]


@pytest.mark.parametrize("template, message", [
    ("router --port {port} --x {prefil_url}", r"unknown placeholder\(s\) \['prefil_url'\]; known: \{host\}"),
    ("router --prefill {prefill_url}", r"must contain \{port\}"),
    ("router --port {port} 'unclosed", "does not parse"),
])
def test_a_bad_template_is_an_error_naming_what_was_wrong(template, message):
    with pytest.raises(FrontendCommandError, match=message):
        fill_template(template, 9000, ENGINES)


def test_a_template_is_not_run_through_a_shell():
    assert fill_template("router --port {port} --name '$HOME; rm -rf /'", 9000, ENGINES)[-1] == "$HOME; rm -rf /"


def test_a_command_that_does_not_exist_is_an_error_naming_it(tmp_path):
    with pytest.raises(FrontendCommandError, match="cannot run 'no-such-router-here'"):
        started("no-such-router-here --port {port}", ENGINES, tmp_path, timeout_s=5)


def test_a_router_that_exits_at_start_is_an_error_with_its_log(tmp_path):
    with pytest.raises(FrontendCommandError, match=r"(?s)the router under test exited with code 3.*bad flag"):
        started(f"{sys.executable} -c \"import sys; print('bad flag {{port}}'); sys.exit(3)\" {{port}}", ENGINES,
                tmp_path, timeout_s=20)


def test_the_router_is_waited_on_until_it_serves_and_stopped_by_its_process_group(tmp_path):
    with FakeEngine("prefill") as prefill, FakeEngine("decode") as decode:
        router = started(f"{sys.executable} -m benchmarks.floor_relay --prefill {{prefill_url}} --decode {{decode_url}} "
                         f"--port {{port}}", {"prefill": prefill.url, "decode": decode.url}, tmp_path, timeout_s=60)
        try:
            assert requests.get(f"{router.url}/health", timeout=5).status_code == 200
            resp = requests.post(f"{router.url}/v1/completions", json={"model": "m", "prompt": [1, 2, 3], "max_tokens": 2},
                                 timeout=10)
            assert resp.status_code == 200 and decode.state.bodies[-1]["kv_transfer_params"]["do_remote_prefill"]
        finally:
            router.stop(grace_s=5)
        assert not router.alive()
        with pytest.raises(ProcessLookupError):
            os.killpg(router.proc.pid, 0)


# A router that is up before its workers are, as sglang-router 0.3.2 is: /health 200 at once,
# /v1/models 503 until its workers are registered.
WORKERS_LATE = """
import sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
ready_at = time.monotonic() + float(sys.argv[2])
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        status = 200 if self.path == "/health" or time.monotonic() >= ready_at else 503
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_a_router_whose_models_answer_503_is_not_serving_until_they_do(tmp_path):
    script = tmp_path / "workers_late.py"
    script.write_text(WORKERS_LATE)
    router = started(f"{sys.executable} {script} {{port}} 2.0", ENGINES, tmp_path, timeout_s=30)
    try:
        assert requests.get(f"{router.url}/v1/models", timeout=5).status_code == 200, (
            "taken as serving while it said it had no models")
    finally:
        router.stop(grace_s=5)
