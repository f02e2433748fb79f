"""reports/coldstart.{json,md,png}: cold, warm and transferred starts per profile, for people and tools.

The JSON keeps this shape (other tools read it): `profiles.<profile>.modes.<mode>.health_s` and
`.first_token_s`, each `{median, min, max}` in seconds, `.runs[]` with each run's figures, phases
and (transferred) `reused`, and `profiles.<profile>.ratios` with `transferred_over_warm_health`
and `cold_over_transferred_health`.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from harness.report import commit_info, machine_info

MODES = ("cold", "warm", "transferred")
# vLLM's "init engine" time holds the compile and the graph capture (both run in its profile and
# warm-up), so a bar shows them as parts of it, and only the remainder as "engine init".
INSIDE_ENGINE_INIT = ("compile", "graph_capture")
LABELS = {"engine_init": "engine init, the rest (profile, KV cache; on CPU the compile warm-up)",
          "weight_load": "weight load", "compile": "compile", "graph_capture": "graph capture",
          "rest": "rest (imports, spawn, untimed)"}


def spread(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def summarize(runs: list[dict]) -> dict:
    """One profile's runs (StartRun.as_dict() with a mode each) -> modes and ratios."""
    modes = {}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        if mine:
            phases = sorted({p for r in mine for p in r["phases"]})
            modes[mode] = {"health_s": spread([r["health_s"] for r in mine]),
                           "first_token_s": spread([r["first_token_s"] for r in mine]),
                           "phases": {p: spread([r["phases"].get(p) for r in mine]) for p in phases},
                           "runs": mine}
    health = {m: modes[m]["health_s"]["median"] for m in modes}
    ratios = {}
    if "transferred" in health and "warm" in health:
        ratios["transferred_over_warm_health"] = round(health["transferred"] / health["warm"], 3)
    if "cold" in health and "transferred" in health:
        ratios["cold_over_transferred_health"] = round(health["cold"] / health["transferred"], 3)
    return {"modes": modes, "ratios": ratios}


def write_coldstart_report(profiles: dict[str, dict], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    data = {"schema": 1, "machine": machine_info(), "commit": commit_info(out.parent), "profiles": profiles}
    (out / "coldstart.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "coldstart.md").write_text(markdown(data))
    plot(data, out / "coldstart.png")
    return data


def markdown(data: dict) -> str:
    lines = ["# Cold start", "", f"Machine: {data['machine']['node']}, {data['machine']['cpu_count']} cores; commit "
             f"`{(data['commit'].get('id') or '?')[:12]}`. Process start -> `/health` 200 -> first token of a fixed "
             f"request, median (min-max) over the runs.", ""]
    for name, p in data["profiles"].items():
        lines += [f"## {name}", "", "| mode | runs | /health s | first token s | phases (median s) | reused |",
                  "|---|---:|---|---|---|---|"]
        for mode, m in p["modes"].items():
            h, t = m["health_s"], m["first_token_s"]
            phases = ", ".join(f"{k} {v['median']:g}" for k, v in m["phases"].items() if v)
            reused = ", ".join("yes" if r["reused"] else "**no**" for r in m["runs"]) if mode == "transferred" else ""
            lines.append(f"| {mode} | {len(m['runs'])} | {h['median']:.1f} ({h['min']:.1f}-{h['max']:.1f}) "
                         f"| {t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f}) | {phases} | {reused} |")
        lines += [""] + [f"- {k}: **{v}**" for k, v in p["ratios"].items()]
        if p.get("vllm_bench_startup"):
            v = p["vllm_bench_startup"]
            lines.append(f"- `vllm bench startup` (an `LLM` built in one process: no API server, no request): "
                         f"cold {v.get('cold_s') or float('nan'):.1f} s, warm {v.get('warm_s') or float('nan'):.1f} s")
        elif p.get("vllm_bench_startup_note"):
            lines.append(f"- `vllm bench startup`: {p['vllm_bench_startup_note']}")
        lines += ["", "![modes x phases](coldstart.png)", ""]
    return "\n".join(lines)


def bar_parts(mode: dict) -> list[tuple[str, float]]:
    """One mode's bar, left to right, in median seconds: each span once, adding up to the first token."""
    def median(phase: str) -> float:
        return (mode["phases"].get(phase) or {}).get("median") or 0.0

    health, first = mode["health_s"]["median"], mode["first_token_s"]["median"]
    inside = [(p, median(p)) for p in INSIDE_ENGINE_INIT]
    parts = [("weight_load", median("weight_load")), *inside,
             ("engine_init", max(0.0, median("engine_init") - sum(v for _, v in inside)))]
    parts.append(("rest", max(0.0, health - sum(v for _, v in parts))))
    parts.append(("first token", max(0.0, first - health)))
    return parts


def plot(data: dict, path: Path) -> None:
    """Stacked bars per profile and mode: the phases the log printed, the rest of the way to /health,
    and /health to the first token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{name}\n{mode}", m) for name, p in data["profiles"].items() for mode, m in p["modes"].items()]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.8 * len(bars)))
    colors = {"weight_load": "tab:green", "compile": "tab:red", "engine_init": "tab:orange",
              "graph_capture": "tab:purple", "rest": "tab:gray", "first token": "tab:blue"}
    used = set()
    for y, (label, m) in enumerate(bars):
        left = 0.0
        health = m["health_s"]["median"]
        for name, width in bar_parts(m):
            if width <= 0:
                continue
            ax.barh(y, width, left=left, color=colors[name], label=None if name in used else LABELS.get(name, name))
            used.add(name)
            left += width
        ax.annotate(f"{health:.1f} s to /health", (left, y), xytext=(4, 0), textcoords="offset points", va="center")
    ax.set_yticks(range(len(bars)), [b[0] for b in bars])
    ax.invert_yaxis()
    ax.set_xlabel("seconds from process start (medians); 'rest' is imports, spawn and what the log does not time")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=6, frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
