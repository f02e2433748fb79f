"""`python -m harness matrix`: conformance reports side by side, a row per check, a column per deployment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.matrix import build_matrix, load_report, named_sources, render_markdown, row_key

REPO_ROOT = Path(__file__).resolve().parents[1]
ROUTING = "suites/test_disagg_routing.py::"
GREEDY = ROUTING + "test_greedy_output_through_disagg_equals_aggregated"
KV = ROUTING + "test_the_kv_of_a_fresh_prompt_really_moves_to_decode"
LAYOUT = "suites/test_path_layout.py::test_no_weight_file_reaches_local_dir"
NO_GPU = "Skipped: profile gpu-vllm needs a GPU host with 2 GPU(s); nvidia-smi found 0 here"
PROFILES = {"cpu", "cpu-shared-storage", "gpu-vllm", "gpu-vllm-1gpu", "foreign"}


def check(id: str, outcome: str = "passed", message: str | None = None, spec: tuple = ("4.1",)) -> dict:
    return {"id": id, "name": id, "spec": list(spec), "outcome": outcome, "duration_s": 0.5, "message": message,
            "properties": {}}


def report(kind: str, checks: list[dict], commit: str = "a1b2c3d4e5f6a7b8c9d0", url: str | None = None) -> dict:
    frontend = {"name": "foreign", "url": url} if kind == "foreign" else {"name": "harness", "url": url}
    return {"schema": 1, "generated_at": "2025-12-01T09:00:00+00:00", "commit": {"id": commit, "dirty": False},
            "deployment": {"kind": kind, "frontend": frontend, "profile": None}, "checks": checks}


EMBEDDED = report("embedded", [
    check(GREEDY + "[cpu-several-blocks]"), check(GREEDY + "[cpu-etcd-several-blocks]"),
    check(KV + "[cpu]"),
    check(KV + "[cpu-etcd]", "failed", "AssertionError: decode computed 32 tokens\nassert 32 == 0"),
    check(LAYOUT + "[text-self-host]", spec=("1.5",)),
    check(KV + "[gpu-vllm]", "skipped", NO_GPU), check(GREEDY + "[gpu-vllm-several-blocks]", "skipped", NO_GPU),
])
FOREIGN = report("foreign", [
    check(GREEDY + "[foreign-several-blocks]", "skipped",
          "Skipped: needs an aggregated engine serving the same model as the reference for output equality: "
          "give --engine-url aggregated=URL"),
    check(KV + "[foreign]"),
], commit="0123456789abcdef0123", url="http://10.0.0.5:8000")


def matrix(*reports: dict, names: tuple = ()) -> dict:
    names = names or (None,) * len(reports)
    return build_matrix([(n, f"r{i}.json", r) for i, (n, r) in enumerate(zip(names, reports))])


def cells(m: dict) -> dict[str, list]:
    return {r["key"]: r["cells"] for r in m["rows"]}


def labels(m: dict) -> list[str]:
    return [c["label"] for c in m["columns"]]


@pytest.mark.parametrize("check_id, profile, key", [
    (KV + "[cpu]", "cpu", "test_disagg_routing::test_the_kv_of_a_fresh_prompt_really_moves_to_decode"),
    (KV + "[foreign]", "foreign", "test_disagg_routing::test_the_kv_of_a_fresh_prompt_really_moves_to_decode"),
    (KV + "[cpu-etcd]", "cpu-etcd", "test_disagg_routing::test_the_kv_of_a_fresh_prompt_really_moves_to_decode"),
    (GREEDY + "[cpu-several-blocks]", "cpu",
     "test_disagg_routing::test_greedy_output_through_disagg_equals_aggregated[several-blocks]"),
    (GREEDY + "[foreign-several-blocks]", "foreign",
     "test_disagg_routing::test_greedy_output_through_disagg_equals_aggregated[several-blocks]"),
    (GREEDY + "[cpu-shared-storage-several-blocks]", "cpu-shared-storage",
     "test_disagg_routing::test_greedy_output_through_disagg_equals_aggregated[several-blocks]"),
    (GREEDY + "[cpu-etcd-url-one-block]", "cpu-etcd-url",
     "test_disagg_routing::test_greedy_output_through_disagg_equals_aggregated[one-block]"),
    ("suites/test_mm.py::test_x[cpu/kv-aggregated]", "cpu", "test_mm::test_x[kv-aggregated]"),
    (LAYOUT + "[text-self-host]", None, "test_path_layout::test_no_weight_file_reaches_local_dir[text-self-host]"),
    ("suites/test_card.py::test_slug", None, "test_card::test_slug"),
])
def test_a_row_is_the_check_with_its_leading_profile_parameter_dropped(check_id, profile, key):
    assert row_key(check_id, PROFILES) == (profile, key)


def test_the_same_check_lines_up_across_an_embedded_and_a_foreign_deployment():
    rows = cells(matrix(EMBEDDED, FOREIGN))
    assert rows["test_disagg_routing::test_the_kv_of_a_fresh_prompt_really_moves_to_decode"] == [
        "passed", "failed: decode computed 32 tokens", "passed"]
    greedy = rows["test_disagg_routing::test_greedy_output_through_disagg_equals_aggregated[several-blocks]"]
    assert greedy[:2] == ["passed", "passed"] and greedy[2].startswith("skipped: needs an aggregated engine")


def test_each_profile_a_report_ran_is_a_column_and_its_profile_free_checks_show_in_each():
    m = matrix(EMBEDDED, FOREIGN)
    assert labels(m) == ["embedded harness cpu", "embedded harness cpu-etcd", "foreign http://10.0.0.5:8000"]
    assert [c["profile"] for c in m["columns"]] == ["cpu", "cpu-etcd", "foreign"]
    assert cells(m)["test_path_layout::test_no_weight_file_reaches_local_dir[text-self-host]"] == [
        "passed", "passed", None]


def test_a_cell_is_empty_where_the_deployment_did_not_run_the_check():
    only_embedded = report("embedded", [check(ROUTING + "test_only_here[cpu]")])
    assert cells(matrix(only_embedded, FOREIGN))["test_disagg_routing::test_only_here"] == ["passed", None]


def test_a_skip_or_failure_cell_is_one_line_of_about_eighty_characters():
    long = report("foreign", [check(KV + "[foreign]", "skipped", "Skipped: " + "x" * 200 + "\nsecond line"),
                              check(GREEDY + "[foreign-one]", "error", "RuntimeError: boom\n  at line 3")])
    rows = cells(matrix(long))
    skipped = rows["test_disagg_routing::test_the_kv_of_a_fresh_prompt_really_moves_to_decode"][0]
    assert skipped.startswith("skipped: xxx") and skipped.endswith("…") and len(skipped) <= len("skipped: ") + 80
    assert rows["test_disagg_routing::test_greedy_output_through_disagg_equals_aggregated[one]"] == [
        "error: RuntimeError: boom"]


def test_checks_of_a_profile_the_host_has_no_gpu_for_are_no_rows_and_no_column_but_one_line_under_the_table():
    m = matrix(EMBEDDED, FOREIGN)
    assert not any("gpu" in c["label"] for c in m["columns"])
    assert all(len([v for v in r["cells"] if v and "GPU host" in v]) == 0 for r in m["rows"])
    assert m["profiles_not_run"] == [{"profile": "gpu-vllm", "checks": {"embedded harness": 2},
                                      "reason": NO_GPU.removeprefix("Skipped: ")}]
    md = render_markdown(m)
    assert md.count("gpu-vllm") == 2  # the one line: its name, and the reason naming it
    assert md.rstrip().splitlines()[-1] == ("- Profile `gpu-vllm` did not run in embedded harness (2 checks): "
                                             + NO_GPU.removeprefix("Skipped: "))


def test_a_column_is_labelled_by_its_name_else_by_the_deployment():
    m = matrix(EMBEDDED, FOREIGN, names=("ours", "dynamo"))
    assert labels(m) == ["ours cpu", "ours cpu-etcd", "dynamo"]
    m = matrix(FOREIGN, FOREIGN)
    assert labels(m) == ["foreign http://10.0.0.5:8000", "foreign http://10.0.0.5:8000 #2"]


def test_the_markdown_has_each_columns_commit_and_generation_time_and_a_summary_row():
    md = render_markdown(matrix(EMBEDDED, FOREIGN, names=("ours", "dynamo")))
    assert "| check | SPEC | ours cpu | ours cpu-etcd | dynamo |" in md
    assert "| _commit_ | | `a1b2c3d4e5f6` | `a1b2c3d4e5f6` | `0123456789ab` |" in md
    assert "| _generated_ | | 2025-12-01T09:00:00+00:00 | 2025-12-01T09:00:00+00:00 | 2025-12-01T09:00:00+00:00 |" in md
    assert "| **summary** | | **3 passed** | **2 passed, 1 failed** | **1 passed, 1 skipped** |" in md
    assert ("| disagg_routing: the kv of a fresh prompt really moves to decode | 4.1 | passed "
            "| failed: decode computed 32 tokens | passed |") in md


def test_a_name_labels_a_positional_report_or_adds_one():
    assert named_sources(["a.json", "b.json"], ["B=b.json", "C=c.json"]) == [
        (None, "a.json"), ("B", "b.json"), ("C", "c.json")]
    with pytest.raises(HarnessError, match="--name 'b.json' must be LABEL=REPORT.json"):
        named_sources(["a.json"], ["b.json"])
    with pytest.raises(HarnessError, match="at least one REPORT.json"):
        named_sources([], [])


def harness(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)


def test_the_command_writes_matrix_json_and_md_into_the_out_dir(tmp_path):
    (tmp_path / "embedded.json").write_text(json.dumps(EMBEDDED))
    (tmp_path / "dynamo.json").write_text(json.dumps(FOREIGN))
    out = harness("matrix", str(tmp_path / "embedded.json"), "--name", f"dynamo={tmp_path / 'dynamo.json'}",
                  "--out-dir", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(tmp_path / "out" / "matrix.json"), str(tmp_path / "out" / "matrix.md")]
    data = json.loads((tmp_path / "out" / "matrix.json").read_text())
    assert [c["label"] for c in data["columns"]] == ["embedded harness cpu", "embedded harness cpu-etcd", "dynamo"]
    assert "| disagg_routing: greedy output through disagg equals aggregated [several-blocks] |" in (
        tmp_path / "out" / "matrix.md").read_text()


@pytest.mark.parametrize("content, says", [
    (None, "cannot read it: No such file or directory"),
    ("{not json", "not JSON: "),
    (json.dumps({"deployment": {}}), "not a conformance report: it has no 'checks' list"),
    (json.dumps([1, 2]), "not a conformance report: it has no 'checks' list"),
    (json.dumps({"checks": [{"id": "x"}]}), "checks[0] is not a check: it needs an 'id' and an 'outcome'"),
])
def test_bad_input_is_an_error_naming_the_file_and_what_was_wrong_and_writes_nothing(tmp_path, content, says):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(EMBEDDED))
    if content is not None:
        bad.write_text(content)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "matrix.md").write_text("an earlier matrix")
    out = harness("matrix", str(good), str(bad), "--out-dir", str(out_dir))
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith(f"error: {bad}: {says}") and len(out.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in out_dir.iterdir()) == ["matrix.md"]
    assert (out_dir / "matrix.md").read_text() == "an earlier matrix"
    with pytest.raises(HarnessError, match=str(bad)):
        load_report(bad)
