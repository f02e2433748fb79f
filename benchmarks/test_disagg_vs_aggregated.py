"""Disaggregated vs aggregated serving through the reference frontend, real vLLM CPU engines.

The embedded CPU deployment: a prefill and a decode engine (NIXL over loopback, one core each)
behind one harness frontend, and an aggregated engine (both cores) behind a second. Each arm is
loaded closed-loop by `benchmarks/load_gen.py` in a process of its own, every prompt fresh (no
prefix-cache hits), at C=1, 4 and 16, in rounds alternating the arms' order. Reported per arm:
TTFT p50/p99, inter-token latency p50 (mean gap after the first token, per request), tokens/s,
and disaggregated/aggregated ratios from the same run -> reports/disagg_vs_aggregated.{json,md,png}.

Nothing is asserted about which is faster: on 2 shared cores, where the aggregated engine has
both, disaggregation has no spare hardware to win with. The bench is here
so a user sees the cost of the P/D hop on their host, and so a regression in it shows as a ratio.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fixtures.tiny_llama import cached_tiny_llama
from harness.cluster import Cluster
from harness.deployment import SERVED_NAME, start_embedded
from harness.engines.launcher import stderr_progress
from harness.engines.profiles import PROFILES
from harness.report import commit_info, machine_info

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = tuple(int(c) for c in os.environ.get("DISAGG_BENCH_PD_CONCURRENCY", "1,4,16").split(","))
ROUNDS = int(os.environ.get("DISAGG_BENCH_PD_ROUNDS", "2"))
REQUESTS = {1: 8, 4: 16, 16: 48}  # per arm and round
TOKENS = 32
PROMPT = "Disaggregated serving splits prefill and decode across different workers, and moves the KV. " * 3
ARMS = ("aggregated", "disaggregated")


def progress(msg: str) -> None:
    stderr_progress(f"[bench disagg vs aggregated] {msg}")


@pytest.fixture(scope="module")
def arms(tmp_path_factory):
    """The embedded deployment (disaggregated) and a second frontend over its aggregated engine."""
    python = os.environ.get("DISAGG_ENGINE_PYTHON", sys.executable)
    deployment = start_embedded(PROFILES["cpu"], cached_tiny_llama(), ROOT / "reports" / "logs", python,
                                progress=progress)
    aggregated = Cluster(tmp_path_factory.mktemp("aggregated-arm"), deployment.model_dir, SERVED_NAME,
                         block_size=deployment.profile.block_size, timeout_s=120).start()
    try:
        engine = deployment.engines["aggregated"]
        aggregated.register(SimpleNamespace(name="bench-aggregated", role="aggregated", url=engine.url))
        aggregated.wait_for_roles({"aggregated"})
        yield {"disaggregated": deployment.frontend_url, "aggregated": aggregated.url}
    finally:
        aggregated.stop()
        deployment.stop()


def load(url: str, concurrency: int, requests: int) -> dict:
    body = {"model": SERVED_NAME, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0.0, "ignore_eos": True}
    out = subprocess.run([sys.executable, "-m", "benchmarks.load_gen", "--url", url, "--concurrency",
                          str(concurrency), "--requests", str(requests), "--body", json.dumps(body),
                          "--unique-prompts"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"load generator against {url} failed: {out.stderr[-2000:]}"
    return json.loads(out.stdout)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(runs: list[dict]) -> dict:
    ttfts = [t for r in runs for t in r["ttfts_s"]]
    itls = [t for r in runs for t in r["itls_s"]]
    return {"ttft_p50_ms": statistics.median(ttfts) * 1e3, "ttft_p99_ms": percentile(ttfts, 0.99) * 1e3,
            "itl_p50_ms": statistics.median(itls) * 1e3 if itls else None,
            "tokens_per_s": sum(r["tokens"] for r in runs) / sum(r["wall_s"] for r in runs),
            "requests": sum(r["requests"] for r in runs), "rounds": len(runs)}


def write_report(table: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ratios = {c: {"ttft_p50": a["disaggregated"]["ttft_p50_ms"] / a["aggregated"]["ttft_p50_ms"],
                  "itl_p50": (a["disaggregated"]["itl_p50_ms"] / a["aggregated"]["itl_p50_ms"]
                              if a["disaggregated"]["itl_p50_ms"] and a["aggregated"]["itl_p50_ms"] else None),
                  "tokens_per_s": a["disaggregated"]["tokens_per_s"] / a["aggregated"]["tokens_per_s"]}
              for c, a in table.items()}
    report = {"machine": machine_info(), "commit": commit_info(ROOT), "rounds": ROUNDS, "tokens": TOKENS,
              "by_concurrency": {str(c): a for c, a in table.items()},
              "disaggregated_over_aggregated": {str(c): r for c, r in ratios.items()}}
    (out / "disagg_vs_aggregated.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Disaggregated vs aggregated, real vLLM CPU engines", "",
             f"Through the reference frontend; {TOKENS} tokens a request, fresh prompts, {ROUNDS} rounds per arm "
             f"alternating; commit `{(report['commit'].get('id') or '?')[:12]}`, {report['machine']['cpu_count']} cores.",
             "", "| C | arm | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | tokens/s |", "|---:|---|---:|---:|---:|---:|"]
    for c, a in table.items():
        for arm in ARMS:
            m = a[arm]
            itl = "" if m["itl_p50_ms"] is None else f"{m['itl_p50_ms']:.1f}"
            lines.append(f"| {c} | {arm} | {m['ttft_p50_ms']:.1f} | {m['ttft_p99_ms']:.1f} | {itl} | "
                         f"{m['tokens_per_s']:.0f} |")
    lines += ["", "| C | TTFT p50 disagg/agg | ITL p50 disagg/agg | tokens/s disagg/agg |", "|---:|---:|---:|---:|"]
    for c, r in ratios.items():
        itl = "" if r["itl_p50"] is None else f"{r['itl_p50']:.2f}x"
        lines.append(f"| {c} | {r['ttft_p50']:.2f}x | {itl} | {r['tokens_per_s']:.2f}x |")
    lines += ["", "![disaggregated vs aggregated](disagg_vs_aggregated.png)", ""]
    (out / "disagg_vs_aggregated.md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    xs = list(range(len(table)))
    for i, arm in enumerate(ARMS):
        for ax, key in zip(axes, ("ttft_p50_ms", "itl_p50_ms", "tokens_per_s")):
            ax.bar([x + (i - 0.5) * 0.4 for x in xs], [table[c][arm][key] or 0 for c in table], 0.4, label=arm)
    for ax, title in zip(axes, ("TTFT p50 (ms, lower is better)", "ITL p50 (ms, lower is better)",
                                "tokens/s (higher is better)")):
        ax.set_xticks(xs, [f"C={c}" for c in table])
        ax.set_title(title, fontsize=10)
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(out / "disagg_vs_aggregated.png", dpi=120)
    plt.close(fig)


def test_disaggregated_and_aggregated_serving_side_by_side(arms, request):
    table: dict[int, dict[str, dict]] = {}
    for c in CONCURRENCY:
        runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
        for r in range(ROUNDS):
            for arm in (ARMS if r % 2 == 0 else tuple(reversed(ARMS))):
                progress(f"C={c} round {r + 1}/{ROUNDS}: {arm}, {REQUESTS.get(c, 16)} requests")
                runs[arm].append(load(arms[arm], c, REQUESTS.get(c, 16)))
        table[c] = {arm: summarize(runs[arm]) for arm in ARMS}
    out = Path(request.config.getoption("report_dir") or ROOT / "reports")
    write_report(table, out)
    progress(f"wrote {out / 'disagg_vs_aggregated.md'}")
    for c, a in table.items():
        for arm, m in a.items():
            assert m["requests"] == ROUNDS * REQUESTS.get(c, 16), f"C={c} {arm}: not every request was answered"
