"""What an interposed engine adds: a relay of the suite's between a load generator and a decode.

Every check through `--frontend-cmd` puts a relay (`harness.interposer`) between the router and
each engine, so its cost must be small beside what it relays. A zero-latency fake decode streams
64 tokens; the relay runs as `python -m harness interpose`, in a process of its own; the load
generator (`benchmarks/load_gen.py`) in its own. Direct and relayed arms alternate over rounds.
Reported: added TTFT p50 per request and added time per token at C=1, and tokens/s at C=16 as a
ratio to direct -> reports/interposer_cost.{json,md}.

Target, as a ratio from the same run: at C=16 the relayed arm keeps at least half of direct's
tokens/s (the relay is one more process on 2 shared cores).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.test_frontend_concurrency import load, start
from harness.engines.launcher import free_port
from harness.report import commit_info, machine_info

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 3
REQUESTS = {1: 200, 16: 400}
TOKENS = 64


@pytest.fixture(scope="module")
def arms(tmp_path_factory):
    root = tmp_path_factory.mktemp("interposer-cost")
    port = free_port()
    decode = start("bench-fake-decode", "decode", [sys.executable, "-m", "fixtures.fake_engine", "--role", "decode",
                                                   "--port", str(port)], port, root)
    base = free_port()
    relay = start("bench-interposer", "relay", [sys.executable, "-m", "harness", "interpose", "--engine",
                                                f"decode={decode.url}", "--port-base", str(base)], base, root)
    try:
        yield {"direct": decode.url, "relayed": relay.url}
    finally:
        relay.stop()
        decode.stop()


def test_an_interposed_engine_adds_little_per_request_and_per_token(arms, request):
    runs: dict[int, dict[str, list[dict]]] = {c: {"direct": [], "relayed": []} for c in REQUESTS}
    for concurrency, n in REQUESTS.items():
        for r in range(ROUNDS):
            for arm in (("direct", "relayed") if r % 2 == 0 else ("relayed", "direct")):
                runs[concurrency][arm].append(load(arms[arm], "direct", concurrency, n))
    summary = {}
    for concurrency, by_arm in runs.items():
        row = {}
        for arm, results in by_arm.items():
            ttfts = [t for res in results for t in res["ttfts_s"]]
            row[arm] = {"ttft_p50_ms": statistics.median(ttfts) * 1e3,
                        "request_ms": statistics.median(res["wall_s"] / res["requests"] for res in results) * 1e3,
                        "tokens_per_s": statistics.median(res["tokens"] / res["wall_s"] for res in results)}
        summary[concurrency] = row
    one = summary[1]
    added_ttft = one["relayed"]["ttft_p50_ms"] - one["direct"]["ttft_p50_ms"]
    added_per_token_us = ((one["relayed"]["request_ms"] - one["direct"]["request_ms"]) - added_ttft) / TOKENS * 1e3
    ratio = summary[16]["relayed"]["tokens_per_s"] / summary[16]["direct"]["tokens_per_s"]
    report = {"machine": machine_info(), "commit": commit_info(ROOT), "rounds": ROUNDS, "tokens": TOKENS,
              "by_concurrency": summary, "c1_added_ttft_p50_ms": added_ttft,
              "c1_added_per_token_us": added_per_token_us, "c16_tokens_per_s_ratio": ratio}
    out = Path(request.config.getoption("report_dir") or ROOT / "reports")
    out.mkdir(parents=True, exist_ok=True)
    (out / "interposer_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# What an interposed engine adds", "",
             f"Fake decode, {TOKENS} tokens a request, {ROUNDS} rounds alternating; commit "
             f"`{(report['commit'].get('id') or '?')[:12]}`, {report['machine']['cpu_count']} cores.", "",
             "| C | arm | TTFT p50 (ms) | ms / request | tokens/s |", "|---:|---|---:|---:|---:|"]
    for concurrency, row in summary.items():
        lines += [f"| {concurrency} | {arm} | {v['ttft_p50_ms']:.2f} | {v['request_ms']:.2f} | {v['tokens_per_s']:.0f} |"
                  for arm, v in row.items()]
    lines += ["", f"- C=1: the relay adds {added_ttft:.2f} ms to TTFT p50 and {added_per_token_us:.1f} µs per token.",
              f"- C=16: relayed tokens/s = {ratio:.2f}x direct (target >= 0.5x)."]
    (out / "interposer_cost.md").write_text("\n".join(lines) + "\n")
    assert ratio >= 0.5, f"the relay keeps only {ratio:.2f}x of direct tokens/s at C=16"
