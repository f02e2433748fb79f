"""A user's own multimodal frontend, given by URL (--frontend-url, --mm-model, --engine-url, and
its cache and discovery store for the processor), gets the same multimodal verdict.

Here the "foreign" frontend is the harness's own, already running in front of the VLM engines,
driven by a second pytest that knows only URLs and directories, as a user's CI would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness import evidence as ev

pytestmark = [pytest.mark.spec("5"), pytest.mark.engines, pytest.mark.xdist_group("engines"),
              pytest.mark.harness_code, pytest.mark.needs(ev.PLANTED_ROUTER)]
ROOT = Path(__file__).resolve().parents[1]
MUST_PASS = {
    "kv-aggregated": ["test_the_engine_runs_the_images_placeholders",
                      "test_the_same_image_is_served_from_the_prefix_cache_on_every_repeat",
                      "test_a_different_image_behind_the_same_text_does_not_ride_on_the_first_images_blocks",
                      "test_the_routers_predicted_cached_blocks_agree_with_the_engines_cached_tokens",
                      "test_cached_tokens_are_the_serving_engines_own_prefix_hits"],
    "disaggregated": ["test_the_engine_runs_the_images_placeholders",
                      "test_the_same_image_is_served_from_the_prefix_cache_on_every_repeat",
                      "test_a_different_image_behind_the_same_text_does_not_ride_on_the_first_images_blocks",
                      "test_cached_tokens_are_the_serving_engines_own_prefix_hits",
                      "test_an_image_request_through_disagg_moves_its_kv_and_matches_aggregated"],
}


def test_the_multimodal_suite_runs_against_a_frontend_given_by_url(mm, tmp_path):
    if mm.topology == "kv-aggregated":
        engines = [f"--engine-url=aggregated={url}" for url in mm.prefix_engines]
    else:
        engines = [f"--engine-url=prefill={mm.prefix_engines[0]}", f"--engine-url=decode={mm.decode_engine}",
                   f"--engine-url=aggregated={mm.reference_engine}"]
    proc = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "suites" / "test_multimodal_cached_tokens.py"),
                           "-q", "-rs", "-p", "no:xdist", "-p", "no:cacheprovider", f"--frontend-url={mm.frontend_url}",
                           f"--mm-model={mm.model}", *engines, f"--cache-root={mm.deployment.cache_root}",
                           f"--discovery={mm.deployment.discovery}", f"--report-dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "conformance.json").read_text())
    assert report["deployment"]["kind"] == "foreign"
    outcomes = {c["id"].split("::")[1]: c for c in report["checks"]}
    for name in MUST_PASS[mm.topology]:
        assert outcomes[f"{name}[foreign]"]["outcome"] == "passed", (name, outcomes[f"{name}[foreign]"]["message"])
    skipped = {k: c["message"] for k, c in outcomes.items() if c["outcome"] == "skipped"}
    assert all("needs " in m for m in skipped.values()), skipped
    spans = [r["image_span"] for r in outcomes["test_the_same_image_is_served_from_the_prefix_cache_on_every_repeat"
                                                "[foreign]"]["properties"]["requests"]]
    assert all(s and s["length"] > 1 for s in spans), "the image span came from the card's local_dir processor"
