"""Benchmarks report ratios against a baseline measured in the same run, on the same machine.

Each bench records `{name, target_s, baseline_s, ratio, limit}`; at session end they are written
to reports/bench.json, bench.md and bench.png (a bar chart of the ratios against their limits).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable

import pytest

from harness.report import commit_info, machine_info

RESULTS: list[dict] = []


def median_seconds(fn: Callable[[], object], rounds: int, setup: Callable[[], object] | None = None) -> float:
    """The baseline's median over `rounds` runs, each after an untimed `setup`."""
    times = []
    for _ in range(rounds):
        if setup:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.fixture
def record_ratio(benchmark):
    def record(name: str, baseline_s: float, limit: float, target_s: float | None = None, **info) -> float:
        """ratio = target / baseline; the target defaults to the benchmark's median."""
        target_s = benchmark.stats.stats.median if target_s is None else target_s
        ratio = target_s / baseline_s
        entry = {"name": name, "target_s": target_s, "baseline_s": baseline_s, "ratio": ratio, "limit": limit, **info}
        benchmark.extra_info.update(entry)
        RESULTS.append(entry)
        shown = "reported only" if limit == float("inf") else f"limit {limit}"
        print(f"\n{name}: {target_s * 1e3:.2f} ms vs baseline {baseline_s * 1e3:.2f} ms -> ratio {ratio:.2f} ({shown})")
        return ratio

    return record


def write_bench_report(results: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {"machine": machine_info(), "commit": commit_info(out.parent),
            "results": [{**r, "limit": None if r["limit"] == float("inf") else r["limit"]} for r in results]}
    (out / "bench.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = ["# Benchmarks", "", f"Machine: {data['machine']['node']}, {data['machine']['cpu_count']} cores; "
             f"commit `{(data['commit'].get('id') or '?')[:12]}`", "",
             "| bench | target (ms) | baseline (ms) | ratio | limit |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['name']} | {r['target_s'] * 1e3:.2f} | {r['baseline_s'] * 1e3:.2f} | {r['ratio']:.2f} "
              f"| {r['limit'] if r['limit'] != float('inf') else 'reported only'} |" for r in results]
    lines += ["", "![ratios](bench.png)", ""]
    (out / "bench.md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.7 * len(results)))
    names = [r["name"] for r in results]
    ax.barh(names, [r["ratio"] for r in results], color="tab:blue", label="measured ratio")
    limited = [r for r in results if r["limit"] != float("inf")]
    ax.scatter([r["limit"] for r in limited], [r["name"] for r in limited], color="tab:red", marker="|", s=400,
               label="limit")
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("time / baseline time (lower is better; 1.0 = as fast as the baseline)")
    for y, r in enumerate(results):
        ax.annotate(f"{r['ratio']:.2f}", (r["ratio"], y), xytext=(4, 0), textcoords="offset points", va="center")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if RESULTS and not hasattr(session.config, "workerinput"):
        out = Path(session.config.getoption("report_dir") or session.config.rootpath / "reports")
        write_bench_report(RESULTS, out)
