"""The suite's own plugin, tested the way pytest tests itself: with pytester, in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

# pytester restores sys.modules after each test; extension modules (numpy's core, tokenizers) cannot be
# loaded twice in one process, so they are imported here, before any snapshot is taken.
import numpy  # noqa: F401
import tokenizers  # noqa: F401
import transformers  # noqa: F401

from harness.resolve import Resolver
from harness.worker.card_builder import build_card
from fixtures.text_model import make_text_model

REPO_ROOT = Path(__file__).resolve().parents[1]
LAYOUT = str(REPO_ROOT / "suites" / "test_path_layout.py")


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("--rootdir", str(REPO_ROOT), "-c", str(REPO_ROOT / "pyproject.toml"),
                                         "-p", "suites.plugin", "-p", "no:cacheprovider",
                                         "--report-dir", str(pytester.path / "reports"), *args, timeout=300)


def report(pytester: pytest.Pytester) -> dict:
    return json.loads((pytester.path / "reports" / "conformance.json").read_text())


def test_the_report_lists_every_check_with_outcome_duration_and_spec(pytester):
    result = run(pytester, LAYOUT)
    result.assert_outcomes(passed=32)
    data = report(pytester)
    assert data["deployment"]["kind"] == "embedded" and data["deployment"]["cache_root"]
    assert data["deployment"]["frontend"]["name"] == "harness"
    assert data["summary"] == {"passed": 32, "total": 32}
    for check in data["checks"]:
        assert check["outcome"] == "passed" and check["duration_s"] >= 0 and "1.5" in check["spec"]
    md = (pytester.path / "reports" / "conformance.md").read_text()
    assert "| passed | path_layout: no weight file reaches local dir [text-self-host] |" in md


def test_the_report_is_complete_under_xdist(pytester):
    run(pytester, LAYOUT, "-n", "2").assert_outcomes(passed=32)
    data = report(pytester)
    assert len(data["checks"]) == 32 and data["deployment"]["kind"] == "embedded"


def test_a_failing_check_is_reported_with_its_message(pytester):
    pytester.makepyfile(test_planted="""
        import pytest
        @pytest.mark.spec("9.9")
        def test_a_planted_failure():
            assert 1 == 2, "planted"
        def test_without_spec_is_not_a_conformance_check():
            pass
    """)
    run(pytester, str(pytester.path / "test_planted.py")).assert_outcomes(passed=1, failed=1)
    (check,) = report(pytester)["checks"]
    assert check["outcome"] == "failed" and "planted" in check["message"] and check["spec"] == ["9.9"]


def test_card_without_cache_root_is_a_usage_error(pytester):
    result = run(pytester, LAYOUT, "--card", "x.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--card and --discovery need --cache-root*"])


def test_cache_root_without_cards_is_a_usage_error_and_writes_nothing(pytester, tmp_path):
    """A user's real cache is checked, never filled with the harness's fixture models."""
    theirs = tmp_path / "their-mdc"
    theirs.mkdir()
    result = run(pytester, LAYOUT, "--cache-root", str(theirs))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--cache-root names a foreign frontend's cache to check, read only*"])
    assert list(theirs.iterdir()) == []


@pytest.mark.parametrize("stores, message", [
    ("consul://127.0.0.1:8500", "*--embedded-store 'consul://127.0.0.1:8500': expected files, etcd or etcd://HOST:PORT*"),
    ("etcd://127.0.0.1", "*--embedded-store 'etcd://127.0.0.1': expected files, etcd or etcd://HOST:PORT*"),
    ("etcd,etcd", "*--embedded-store 'etcd,etcd': name each store once*"),
])
def test_an_embedded_store_that_is_not_files_or_etcd_is_a_usage_error(pytester, stores, message):
    result = run(pytester, LAYOUT, f"--embedded-store={stores}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_an_embedded_store_with_a_foreign_frontend_is_a_usage_error(pytester):
    result = run(pytester, LAYOUT, "--embedded-store=etcd", "--frontend-url=http://127.0.0.1:9")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--embedded-store sets up the embedded deployment*--discovery etcd://HOST:PORT*"])


@pytest.fixture
def foreign(tmp_path) -> tuple[Path, Path]:
    """A cache written by 'another frontend' (here the harness, run apart), and its card."""
    model = make_text_model(tmp_path / "model")
    card = build_card(model, "vendor/Model-7B")
    Resolver(tmp_path / "their-mdc").resolve(card)
    card_json = tmp_path / "vendor-model.json"
    card_json.write_text(card.dumps())
    return tmp_path / "their-mdc", card_json


def test_the_layout_suite_checks_a_foreign_cache_when_given_one(pytester, foreign):
    cache_root, card_json = foreign
    result = run(pytester, LAYOUT, "--cache-root", str(cache_root), "--card", str(card_json))
    result.assert_outcomes(passed=6, skipped=1)  # one card: no prefill/decode pair to compare
    data = report(pytester)
    assert data["deployment"]["kind"] == "foreign" and data["deployment"]["cache_root"] == str(cache_root)
    assert all("[vendor-model]" in c["id"] or "[" not in c["id"] for c in data["checks"])


def test_the_layout_suite_fails_a_foreign_cache_with_a_relative_link(pytester, foreign):
    cache_root, card_json = foreign
    local_dir = next((cache_root / "by-slug" / "vendor_model-7b").iterdir())
    target = os.readlink(local_dir / "config.json")
    (local_dir / "config.json").unlink()
    (local_dir / "config.json").symlink_to(os.path.relpath(target, local_dir))
    result = run(pytester, LAYOUT, "--cache-root", str(cache_root), "--card", str(card_json))
    result.assert_outcomes(passed=4, failed=2, skipped=1)  # the link check and the blob check both catch it
    result.stdout.fnmatch_lines(["*is not an absolute target*"])


def test_the_layout_suite_fails_a_foreign_cache_with_a_blob_misnamed(pytester, foreign):
    cache_root, card_json = foreign
    blob = next((cache_root / "blobs").iterdir())
    shutil.copy(blob, cache_root / "blobs" / ("f" * 64))
    result = run(pytester, LAYOUT, "--cache-root", str(cache_root), "--card", str(card_json))
    result.assert_outcomes(passed=5, failed=1, skipped=1)
    result.stdout.fnmatch_lines(["*does not hash to its name*"])


def test_tests_of_the_harness_code_are_not_collected_against_a_foreign_deployment(pytester, foreign):
    """Fault injection into the harness's resolver says nothing about someone else's cache: no pass in its report."""
    cache_root, card_json = foreign
    result = run(pytester, str(REPO_ROOT / "suites" / "test_failure_modes.py"),
                 "--cache-root", str(cache_root), "--card", str(card_json))
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    assert result.parseoutcomes().get("deselected", 0) > 0 and "passed" not in result.parseoutcomes()


def test_xdist_group_suffixes_are_not_part_of_a_check_id():
    from suites.plugin import strip_group

    assert strip_group("suites/test_x.py::test_a[cpu]@engines") == "suites/test_x.py::test_a[cpu]"
    assert strip_group("suites/test_x.py::test_a[user@host]") == "suites/test_x.py::test_a[user@host]"


def test_the_suites_run_without_pytest_xdist(pytester):
    run(pytester, LAYOUT, "-p", "no:xdist").assert_outcomes(passed=32)
