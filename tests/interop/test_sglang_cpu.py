"""The suites against a real SGLang: sglang 0.5.23 on CPU (`.ci/install-sglang`, profile
`cpu-sglang`), one aggregated server behind the reference frontend, checked as a foreign
deployment. Run by `tox -e interop`.

What the fake engine says about SGLang is our reading of it; this is SGLang itself: its OpenAI
API through the frontend, its `cached_tokens`, and the metric names the suites read.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from fixtures.tiny_llama import cached_tiny_llama
from harness.cluster import Cluster
from harness.engines.launcher import EngineProcess, free_port
from harness.engines.metrics import Metrics
from harness.engines.profiles import PROFILES, ROLES
from suites.suite_runs import (HONEST_SKIPS, assert_truthful_verdict, keep_for_the_matrix, outcomes, run_suites,
                               vague_skips)

SGLANG_PYTHON = os.environ.get("DISAGG_SGLANG_PYTHON")
pytestmark = pytest.mark.skipif(not SGLANG_PYTHON, reason="needs SGLang 0.5.23 for CPU: run `tox -e interop`, or set "
                                                          "DISAGG_SGLANG_PYTHON to the python of a venv made by "
                                                          "`.ci/install-sglang DIR`")
PROFILE = PROFILES["cpu-sglang"]
ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Real SGLang servers on CPU, started at once: a prefill and a decode (bootstrap over
    mooncake_tcp) and an aggregated one. About 3 GB each."""
    root = tmp_path_factory.mktemp("sglang")
    engines = {role: EngineProcess(PROFILE.launch_spec(role, cached_tiny_llama(), MODEL, free_port(), free_port(), root,
                                                        python=SGLANG_PYTHON), root / "logs").start()
               for role in ("prefill", "decode", "aggregated")}
    try:
        for engine in engines.values():
            engine.wait_healthy(PROFILE.startup_timeout_s, print)
        yield root, engines
    finally:
        for engine in engines.values():
            engine.stop(grace_s=10)


def frontend_for(root: Path, name: str) -> Cluster:
    return Cluster(root / name, cached_tiny_llama(), MODEL, block_size=PROFILE.block_size, protocol=PROFILE.protocol,
                   timeout_s=PROFILE.request_timeout_s)


@pytest.fixture(scope="module")
def sglang(servers):
    """The aggregated server alone behind the reference frontend."""
    root, engines = servers
    with frontend_for(root, "aggregated-cluster") as cluster:
        cluster.register(engines["aggregated"])
        cluster.wait_for_roles({"aggregated"})
        yield cluster, engines["aggregated"]


def test_sglang_on_cpu_gets_a_truthful_verdict_through_the_reference_frontend(sglang, tmp_path):
    cluster, engine = sglang
    options = [f"--frontend-url={cluster.url}", f"--model={MODEL}", f"--engine-url=aggregated={engine.url}",
               f"--discovery={cluster.store.url}",
               f"--cache-root={cluster.cache_root}"]
    report, out = run_suites(options, tmp_path / "report")
    keep_for_the_matrix(tmp_path / "report" / "conformance.json", "sglang-cpu")
    checks = outcomes(report)
    wrong = {k: c["message"] for k, c in checks.items() if c["outcome"] in ("failed", "error")}
    assert not wrong, f"false failures against SGLang: {json.dumps(wrong, indent=1)}\n{out}"
    assert not vague_skips(checks, HONEST_SKIPS)
    # What real SGLang showed: its cache and cards pass, and a repeated prompt's cached_tokens are
    # its own prefix hits (whole pages); the disaggregation checks skip: there is no prefill.
    for check in ("test_a_repeated_prompt_reports_the_prefills_prefix_hits_as_cached_tokens[foreign]",
                  "test_the_tokenizer_loads_from_every_local_dir[tiny-llama-aggregated]",
                  "test_a_self_host_worker_serves_every_card_file_with_its_checksum[tiny-llama-aggregated]"):
        assert checks[check]["outcome"] == "passed", (check, checks[check])
    greedy = checks["test_greedy_output_through_disagg_equals_aggregated[foreign-several-blocks]"]
    assert greedy["outcome"] == "skipped" and "a prefill worker" in greedy["message"], greedy


def test_sglangs_own_metrics_count_a_request_through_the_frontend_under_the_names_the_suites_read(sglang):
    """The metric table's SGLang names (harness/engines/metrics.py) against SGLang's scrape: each
    resolves to an `sglang:` family, and the counters move by what the response's usage says."""
    cluster, engine = sglang
    def twice(prompt: str) -> list[dict]:
        usages = []
        for _ in range(2):
            resp = httpx.post(f"{cluster.url}/v1/completions", timeout=60,
                              json={"model": MODEL, "prompt": prompt, "max_tokens": 5, "temperature": 0})
            assert resp.status_code == 200, resp.text
            usages.append(resp.json()["usage"])
        return usages

    prompt = ("A prompt that fills more than one page of the prefix cache, the river, the lantern and the "
              "harbor, the meadow and the falcon, said twice so the second time is served from cache.")
    # SGLang exports its cached-token counter only from its first cache hit on: one first.
    twice(f"Warm-up: {prompt}")
    before = Metrics.scrape(engine.url)
    assert before.engines == ["sglang"]
    for quantity in ("requests_running", "prompt_tokens", "generation_tokens", "kv_cache_usage",
                     "prompt_tokens_local_cache_hit"):
        assert before.source(quantity) is not None and before.source(quantity).family.startswith("sglang:"), quantity
    usages = twice(prompt)
    after = Metrics.scrape(engine.url)
    assert after.delta(before, "prompt_tokens") == sum(u["prompt_tokens"] for u in usages)
    assert after.delta(before, "generation_tokens") == sum(u["completion_tokens"] for u in usages)
    cached = usages[1]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= PROFILE.block_size and cached % PROFILE.block_size == 0, usages  # whole pages, from the first
    assert after.delta(before, "prompt_tokens_local_cache_hit") == cached
    assert after.get("requests_running") == 0


# Each SGLang profile's command line as SGLang's own parser reads it (ServerArgs.add_cli_args, in
# the SGLang venv): a flag renamed upstream fails here, not first on a user's GPU host.
READ_BY_SGLANG = """
import argparse, json, sys
from sglang.srt.server_args import ServerArgs
parser = argparse.ArgumentParser(exit_on_error=False)
ServerArgs.add_cli_args(parser)
out = {}
for key, argv in json.loads(sys.argv[1]).items():
    try:
        ns = parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as exc:
        out[key] = {"refused": str(exc)}
        continue
    out[key] = {k: getattr(ns, k, None) for k in json.loads(sys.argv[2])}
print(json.dumps(out))
"""
FIELDS = ["port", "served_model_name", "page_size", "device", "attention_backend", "disaggregation_mode",
          "disaggregation_transfer_backend", "disaggregation_bootstrap_port", "mem_fraction_static",
          "max_total_tokens", "enable_cache_report", "enable_metrics"]


def read_by_sglang(argvs: dict[str, list[str]]) -> dict[str, dict]:
    done = subprocess.run([SGLANG_PYTHON, "-c", READ_BY_SGLANG, json.dumps(argvs), json.dumps(FIELDS)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "SGLANG_USE_CPU_ENGINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def sglang_argv(profile, role: str, tmp_path: Path) -> list[str]:
    command = profile.launch_spec(role, tmp_path, "served", 8000, 8001, tmp_path, python="python").command
    return command[command.index("sglang.launch_server") + 1:]


def test_every_sglang_profiles_command_line_is_read_by_sglangs_parser_as_meant(tmp_path):
    profiles = {name: p for name, p in PROFILES.items() if p.engine == "sglang"}
    argvs = {f"{name}/{role}": sglang_argv(p, role, tmp_path) for name, p in profiles.items() for role in ROLES}
    argvs["planted/renamed-flag"] = [a.replace("--disaggregation-mode", "--disagg-mode")
                                     for a in argvs["gpu-sglang/prefill"]]
    read = read_by_sglang(argvs)
    assert "refused" in read.pop("planted/renamed-flag"), "a renamed flag went through SGLang's parser unseen"
    for key, args in read.items():
        name, role = key.split("/")
        profile = profiles[name]
        assert "refused" not in args, (key, args)
        assert (args["port"], args["served_model_name"], args["page_size"]) == (8000, "served", profile.block_size), key
        assert args["disaggregation_mode"] == (role if role in ("prefill", "decode") else "null"), key
        if role in ("prefill", "decode"):
            assert args["disaggregation_transfer_backend"] == profile.sglang_transfer_backend, key
        if role == "prefill":
            assert args["disaggregation_bootstrap_port"] == 8001, key
        assert args["mem_fraction_static"] == profile.gpu_memory_fraction, key
        if not profile.gpu:
            assert (args["device"], args["attention_backend"], args["enable_cache_report"], args["enable_metrics"]) == \
                ("cpu", "torch_native", True, True), key


@pytest.fixture(scope="module")
def sglang_pd(servers):
    """SGLang's bootstrap disaggregation: the prefill and decode behind the reference frontend
    (protocol sglang); the aggregated server is the reference."""
    root, engines = servers
    with frontend_for(root, "pd-cluster") as cluster:
        cluster.register(engines["prefill"])
        cluster.register(engines["decode"])
        cluster.wait_for_roles({"prefill", "decode"})
        yield cluster, engines


def complete(url: str, prompt: str, max_tokens: int = 8) -> httpx.Response:
    resp = httpx.post(f"{url}/v1/completions", timeout=120,
                      json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert resp.status_code == 200, resp.text
    return resp


def test_sglang_bootstrap_disaggregation_on_cpu_moves_the_kv_and_matches_aggregated(sglang_pd):
    """Output through prefill+decode equals the aggregated server's, and each request's KV left the
    prefill: SGLang's own count of KV transfers (`sglang:kv_transfer_total_mb`, a histogram on the
    prefill, one observation per transfer) moves by one per request."""
    cluster, engines = sglang_pd
    prompts = [f"Prompt {n}: the harbor, the river and the lantern; the meadow, the falcon and the glacier; "
               f"{'one two three four five six seven eight nine ten ' * (n + 1)}" for n in range(3)]
    before = Metrics.scrape(engines["prefill"].url)
    for prompt in prompts:
        resp = complete(cluster.url, prompt)
        assert resp.headers.get("x-disagg-mode") == "disaggregated", dict(resp.headers)
        reference = complete(engines["aggregated"].url, prompt)
        assert resp.json()["choices"][0]["text"] == reference.json()["choices"][0]["text"], prompt
    after = Metrics.scrape(engines["prefill"].url)
    assert transfers(after) - transfers(before) == len(prompts), (transfers(before), transfers(after))


def transfers(scrape: Metrics) -> float:
    """How many KV transfers the prefill has observed (its kv_transfer_total_mb histogram's count)."""
    return sum(v for name, _, v in scrape.families.get("sglang:kv_transfer_total_mb", [])
               if name == "sglang:kv_transfer_total_mb_count")


def test_through_sglang_disaggregation_cached_tokens_are_the_prefills_prefix_hits(sglang_pd):
    """SPEC §4: the client's cached_tokens are the prefill's (the decode's radix cache is off in
    SGLang's disaggregated decode)."""
    cluster, engines = sglang_pd
    prompt = "Cached twice: " + "the lantern, the harbor and the meadow; " * 8
    for _ in range(2):  # SGLang exports its cached-token counter from its first hit on
        complete(cluster.url, f"Warm-up: {prompt}")
    complete(cluster.url, prompt)
    before = Metrics.scrape(engines["prefill"].url)
    usage = complete(cluster.url, prompt).json()["usage"]
    after = Metrics.scrape(engines["prefill"].url)
    hits = after.delta(before, "prompt_tokens_local_cache_hit")
    assert hits and hits >= PROFILE.block_size, f"the prefill served no prefix from cache: {hits}"
    assert usage["prompt_tokens_details"]["cached_tokens"] == hits, usage


# SGLang's own P/D router, sglang-router 0.3.2 (PyPI, Rust; `smg launch`), in front of the real
# SGLang prefill and decode, through the suite's relays. Its defaults bind 0.0.0.0: both its
# listener and its metrics are given 127.0.0.1. The prefill's bootstrap port is the engine's own
# (a literal in the template: the relay carries HTTP only, the decode reaches the prefill's
# bootstrap server directly).
SGLANG_ROUTER = ("{smg} launch --pd-disaggregation --prefill {{prefill_url}} {bootstrap_port} --decode {{decode_url}} "
                 "--host {{host}} --port {{port}} --prometheus-host 127.0.0.1 --prometheus-port {{metrics_port}} "
                 "--policy round_robin")
# The worker faults last: against sglang-router they leave decode requests waiting for KV, and a
# decode busy with those shows the next check's request as not running.
ROUTER_SUITES = ("test_routed_requests.py", "test_disagg_routing.py", "test_disagg_faults.py", "test_worker_faults.py")
# What sglang-router 0.3.2 does differently from SPEC, as the suites found it by running it here
# (docs/routers.md has the rest). Check -> a fragment of its failure.
SGLANG_ROUTER_DIFFERENCES: dict[str, str] = {
    # A decode whose response ends cleanly without [DONE] is passed on as a clean end (a reset one
    # is passed on as a cut transfer, which the client sees), as vllm-router 0.1.17 does.
    "test_a_decode_dying_mid_stream_gives_the_client_an_error_never_a_complete_looking_stream":
        "the client's stream just ended, with no error event and no broken transfer",
    # It sends the decode beside the prefill (SPEC §4.2); when the prefill answers 500 it neither
    # answers the client nor aborts the decode, which waits for KV that never comes.
    "test_a_prefill_that_answers_500_is_reported_and_not_retried_on_decode": "the client had no answer within",
    # With the prefill refusing connections, the same: no answer, and no aggregated fallback.
    "test_with_its_prefill_worker_dead_the_model_is_served_aggregated_then_disaggregated_again":
        "the router gave the client no answer within",
}


def test_sglang_router_in_front_of_sglang_pd_gets_a_truthful_verdict(servers, tmp_path, record_property):
    root, engines = servers
    smg = shutil.which("smg", path=str(Path(sys.executable).parent)) or shutil.which("smg")
    if smg is None:
        pytest.skip("needs sglang-router 0.3.2's `smg` on PATH (pip install sglang-router==0.3.2; tox -e interop "
                    "installs it)")
    command = SGLANG_ROUTER.format(smg=smg, bootstrap_port=engines["prefill"].spec.bootstrap_port)
    options = [f"--frontend-cmd={command}", f"--model={MODEL}",
               *[f"--engine-url={role}={engine.url}" for role, engine in engines.items()]]
    report, out = run_suites(options, tmp_path / "report", *[str(ROOT / "suites" / s) for s in ROUTER_SUITES])
    keep_for_the_matrix(tmp_path / "report" / "conformance.json", "sglang-router")
    record_property("verdict", report["summary"])
    _, failed = assert_truthful_verdict(report, out, "sglang-router", SGLANG_ROUTER_DIFFERENCES, HONEST_SKIPS)
    record_property("differences", {k.split("[")[0]: m[:160] for k, m in failed.items()})
