"""A user's own frontend, given by URL (--frontend-url, --engine-url), gets the same disagg checks.

Here the "foreign" frontend is the harness's own, already running, driven by a second pytest
that knows only its URL and the engines' URLs, as a user's CI would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness import evidence as ev

pytestmark = [pytest.mark.spec("4.1", "3"), pytest.mark.engines, pytest.mark.xdist_group("engines"),
              pytest.mark.harness_code, pytest.mark.needs(ev.PLANTED_ROUTER)]
ROOT = Path(__file__).resolve().parents[1]


def test_the_disagg_suite_runs_against_a_frontend_given_by_url(disagg, tmp_path):
    engines = [f"--engine-url={role}={disagg.url(role)}" for role in ("prefill", "decode", "aggregated")]
    proc = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "suites" / "test_disagg_routing.py"), "-q",
                           "-rs", "-p", "no:xdist", "-p", "no:cacheprovider", f"--frontend-url={disagg.frontend_url}",
                           f"--model={disagg.model}", *engines, f"--report-dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "conformance.json").read_text())
    assert report["deployment"]["kind"] == "foreign"
    assert report["deployment"]["frontend"]["url"] == disagg.frontend_url
    outcomes = {c["id"].split("::")[1]: c["outcome"] for c in report["checks"]}
    assert all(outcome == "passed" for name, outcome in outcomes.items() if "equals_aggregated" in name)
    assert outcomes["test_the_kv_of_a_fresh_prompt_really_moves_to_decode[foreign]"] == "passed"
    assert outcomes["test_prefill_and_decode_run_under_the_clients_request_id[foreign]"] == "passed"
    assert outcomes["test_cached_tokens_are_the_prefills_own_prefix_hits[foreign]"] == "passed"
    assert report["deployment"]["frontend_returns_token_ids"] is True
    skipped = {c["id"].split("::")[1]: c["message"] for c in report["checks"] if c["outcome"] == "skipped"}
    assert not skipped, skipped
    # What only the embedded deployment can give (a planted router, breaking its engines) is not collected.
    assert not any("is_caught" in name or "without_a_prefill_worker" in name for name in outcomes), sorted(outcomes)
