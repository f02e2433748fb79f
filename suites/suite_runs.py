"""The suites run again in a process of their own, as a user's CI runs them against a deployment
it does not own; the tests of the suite that check a real peer (vllm-router, Dynamo) read the
verdict off its report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A skip against a foreign deployment names missing evidence, or says the check is for other cards.
HONEST_SKIPS = ("needs ", "this checks self-host", "is not a multimodal model")


def run_suites(options: list[str], report_dir: Path, *selection: str, timeout_s: float = 900) -> tuple[dict, str]:
    """pytest over `selection` (default: every suite) with `options`; the report and the output's tail.
    Exit 0 or 1 is a verdict; anything else is the suites crashing, which fails here."""
    proc = subprocess.run([sys.executable, "-m", "pytest", *(selection or ["suites"]), "-p", "no:xdist",
                           "-p", "no:cacheprovider", "-q", "-rs", f"--report-dir={report_dir}", *options],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    out = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode in (0, 1), f"the suites crashed (exit {proc.returncode}):\n{out}"
    return json.loads((Path(report_dir) / "conformance.json").read_text()), out


def outcomes(report: dict) -> dict[str, dict]:
    """The report's checks by test id (without the file)."""
    return {c["id"].split("::", 1)[1]: c for c in report["checks"]}


def vague_skips(checks: dict[str, dict], honest: tuple[str, ...] = ("needs ",)) -> dict[str, str]:
    """Skips whose message names no missing evidence (none of the `honest` phrases)."""
    return {k: c["message"] for k, c in checks.items()
            if c["outcome"] == "skipped" and not any(s in c["message"] for s in honest)}


def assert_truthful_verdict(report: dict, out: str, peer: str, known_differences: dict[str, str],
                            honest: tuple[str, ...] = ("needs ",)) -> tuple[dict[str, dict], dict[str, str]]:
    """A real peer's verdict is truthful: no check crashed, every failure is a difference from SPEC
    found by running it (`known_differences`: check -> a fragment of its failure), every skip names
    its evidence. The checks, and the failures by check."""
    checks = outcomes(report)
    errors = {k: c["message"] for k, c in checks.items() if c["outcome"] == "error"}
    assert not errors, f"checks that crashed against {peer}: {errors}\n{out}"
    failed = {k: c["message"] for k, c in checks.items() if c["outcome"] == "failed"}
    unexplained = {k: m for k, m in failed.items() if known_differences.get(k.split("[")[0], "\0") not in m}
    assert not unexplained, (f"failures against {peer} that no known difference explains:\n"
                             f"{json.dumps(unexplained, indent=1)}\n{out}")
    vague = vague_skips(checks, honest)
    assert not vague, f"skips that do not name the missing evidence: {vague}"
    return checks, failed


def keep_for_the_matrix(report: Path, label: str) -> None:
    """A copy at reports/interop/<label>/, for `python -m harness matrix` (.ci/run builds it)."""
    target = ROOT / "reports" / "interop" / label
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(report, target / "conformance.json")
