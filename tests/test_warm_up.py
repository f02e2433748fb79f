"""The embedded deployment's first disaggregated request (harness/warm_up.py): sent by the harness
before any check, retried a few times, every failed try kept for the report; a deployment that
fails every try is refused with what its engines logged."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from harness.report import render_markdown
from harness.warm_up import WarmUpFailed, logged_since, log_offsets, warm_up
from suites.plugin import _serving_summary

MESSAGES: list[str] = []


def test_a_decode_that_fails_its_first_kv_load_is_warmed_on_the_second_try(cluster, fake_engines):
    prefill, decode = fake_engines("prefill"), fake_engines("decode", fail_first=1)
    cluster.serve(prefill, decode)
    failures = warm_up(cluster.url, "tiny", {}, timeout_s=10, progress=MESSAGES.append)
    assert [f["try"] for f in failures] == [1]
    assert "HTTP 502" in failures[0]["answer"] and "Internal server error" in failures[0]["answer"]
    assert len(decode.state.bodies) == 2, "one failed request and one that succeeded reached the decode"
    assert decode.state.bodies[-1]["kv_transfer_params"]["remote_engine_id"] == prefill.state.engine_id, \
        "the warm-up request pulls the prefill's KV"
    assert decode.state.bodies[-1]["ignore_eos"] is True, "an EOS first token would end it on the prefill"


def test_a_healthy_deployment_is_warmed_with_one_request_and_reports_no_failure(cluster, fake_engines):
    prefill, decode = fake_engines("prefill"), fake_engines("decode")
    cluster.serve(prefill, decode)
    assert warm_up(cluster.url, "tiny", {}, timeout_s=10, progress=MESSAGES.append) == []
    assert len(prefill.state.bodies) == len(decode.state.bodies) == 1


def test_a_deployment_that_fails_every_try_is_refused_naming_each_answer(cluster, fake_engines):
    prefill, decode = fake_engines("prefill"), fake_engines("decode", fail_first=10)
    cluster.serve(prefill, decode)
    with pytest.raises(WarmUpFailed) as raised:
        warm_up(cluster.url, "tiny", {}, timeout_s=10, progress=MESSAGES.append, tries=2)
    message = str(raised.value)
    assert "failed 2 times" in message and "try 1: HTTP 502" in message and "try 2: HTTP 502" in message
    assert decode.state.fail_first == 8, "no more than the tries asked for"


def test_the_engine_log_lines_of_a_failed_try_are_the_ones_logged_since_it_began(tmp_path):
    log = tmp_path / "cpu-decode.log"
    log.write_text("ERROR an old failure, before the try\n")
    engines = {"decode": SimpleNamespace(log_path=log), "docker": SimpleNamespace()}  # no log file: left out
    offsets = log_offsets(engines)
    with log.open("a") as f:
        f.write("INFO 200 OK\n(Worker pid=1) ERROR NIXL transfer failure: handshake_failed | Context: {}\n")
    assert logged_since(engines, offsets) == [
        "decode: (Worker pid=1) ERROR NIXL transfer failure: handshake_failed | Context: {}"]


def test_the_report_says_when_a_deployment_needed_more_than_one_try():
    described = {"kind": "embedded", "profile": "cpu", "frontend": {"url": "http://127.0.0.1:8000"},
                 "warm_up_failures": [{"try": 1, "answer": "HTTP 502: decode worker x: Internal server error",
                                       "engine_log": []}]}
    report = {"deployment": {"kind": "embedded", "deployments": [_serving_summary(described)]}, "checks": [],
              "summary": {}, "generated_at": "now", "machine": {"node": "n", "cpu_count": 2}, "commit": {},
              "unavailable_profiles": []}
    assert "- Warm-up of cpu: the first request failed 1 time(s) before one succeeded: HTTP 502" in \
        render_markdown(report)
