"""The conformance report: one JSON for machines and one Markdown page for people.

It says where the numbers came from (deployment, machine, commit) and, for every check, its
outcome, duration and the SPEC sections it covers.

A profile this host cannot run (no GPU, its engine not installed) skips every one of its checks
with the same reason. The JSON keeps each of those checks and lists the profiles under
`unavailable_profiles`; the Markdown page gives each such profile one row, so the checks that
did run are not lost among dozens of identical skips.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")

# The skips of suites/conftest.py's `disagg` and `mm` fixtures when a profile cannot run here.
_UNAVAILABLE = re.compile(r"profile (?P<profile>[\w.-]+)(?: needs a GPU host|: .*?"
                          r"\b(?:is not installed|needs? (?:vllm|sglang) for)\b)")


def skip_reason(message: str | None) -> str:
    """A skip's message without the `Skipped: ` pytest puts in front of it."""
    return (message or "").removeprefix("Skipped: ").strip()


def profile_unavailable(check: dict[str, Any]) -> tuple[str, str] | None:
    """(profile, reason) when the check skipped because its profile cannot run on this host."""
    if check.get("outcome") != "skipped":
        return None
    reason = skip_reason(check.get("message"))
    match = _UNAVAILABLE.match(reason)
    return (match["profile"], reason) if match else None


def unavailable_profiles(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each profile that could not run here: how many checks it skipped, and why (distinct reasons)."""
    found: dict[str, dict[str, Any]] = {}
    for check in checks:
        hit = profile_unavailable(check)
        if hit:
            entry = found.setdefault(hit[0], {"profile": hit[0], "checks": 0, "reasons": []})
            entry["checks"] += 1
            if hit[1] not in entry["reasons"]:
                entry["reasons"].append(hit[1])
    return [{"profile": e["profile"], "checks": e["checks"], "reason": "; ".join(e["reasons"])}
            for e in found.values()]


def machine_info() -> dict[str, Any]:
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"node": platform.node(), "system": platform.system(), "machine": platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "memory_bytes": mem}


def commit_info(cwd: str | os.PathLike = ".") -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain")
    return {"id": git("rev-parse", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(status) if status is not None else None}


def build_report(deployment: dict[str, Any], checks: list[dict[str, Any]], root: str | os.PathLike = ".") -> dict:
    summary = {o: sum(1 for c in checks if c["outcome"] == o) for o in OUTCOMES}
    ordered = sorted(checks, key=lambda c: c["id"])
    return {
        "schema": 1,
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "deployment": deployment,
        "machine": machine_info(),
        "commit": commit_info(root),
        "summary": {k: v for k, v in summary.items() if v} | {"total": len(checks)},
        "unavailable_profiles": unavailable_profiles(ordered),
        "checks": ordered,
    }


def _section_key(section: str) -> tuple:
    """SPEC sections in numeric order, then the regressions (R1, R2, ...)."""
    if section.startswith("R") and section[1:].isdigit():
        return (1, int(section[1:]))
    return (0, *[int(p) if p.isdigit() else 0 for p in section.split(".")])


def _properties_note(props: dict[str, Any]) -> str:
    """What a check measured, compactly: e.g. `kv: external_kv_transfer=70 local_compute=0`."""
    parts = []
    for key, value in props.items():
        if isinstance(value, dict):
            value = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
        parts.append(f"{key}: {value}")
    return "; ".join(parts)


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict[str, Any]) -> str:
    d = report["deployment"]
    lines = ["# Conformance report", "",
             f"- Deployment: **{d.get('kind')}**, frontend `{(d.get('frontend') or {}).get('name')}`"
             f" {(d.get('frontend') or {}).get('version') or ''}",
             f"- Cache root: `{d.get('cache_root')}`",
             *([f"- Serving deployments: {_md_escape(', '.join(s['label'] for s in d['deployments']))}"]
               if d.get("deployments") else []),
             f"- Generated: {report['generated_at']} on {report['machine']['node']}"
             f" ({report['machine']['cpu_count']} cores), commit `{(report['commit'].get('id') or '?')[:12]}`"
             f"{' (dirty)' if report['commit'].get('dirty') else ''}",
             "- Summary: " + ", ".join(f"{v} {k}" for k, v in report["summary"].items())]
    not_run = report.get("unavailable_profiles")
    if not_run is None:  # a report written before the field existed
        not_run = unavailable_profiles(report["checks"])
    if not_run:
        lines.append("- Profiles this host cannot run (their checks skipped, one row each below): "
                     + ", ".join(f"{u['profile']} ({u['checks']} checks)" for u in not_run))
    for s in d.get("deployments") or []:  # the harness's own first request, retried (harness/warm_up.py)
        if s.get("warm_up_failures"):
            lines.append(f"- Warm-up of {_md_escape(s['label'])}: the first request failed "
                         f"{len(s['warm_up_failures'])} time(s) before one succeeded: "
                         + _md_escape("; ".join(f["answer"][:160] for f in s["warm_up_failures"])))
    lines.append("")
    if d.get("engines"):
        lines += ["## Engines", "", "| name | role | deployment | url | version |", "|---|---|---|---|---|"]
        lines += [f"| {e['name']} | {e['role']} | {_md_escape(', '.join(e.get('deployments') or []))} "
                  f"| {e.get('url') or ''} | {e.get('version') or ''} |" for e in d["engines"]]
        lines.append("")
    lines += ["## By SPEC section", "", "| section | " + " | ".join(OUTCOMES) + " |",
              "|---|" + "---:|" * len(OUTCOMES)]
    sections = sorted({s for c in report["checks"] for s in c["spec"]}, key=_section_key)
    for section in sections:
        counts = [sum(1 for c in report["checks"] if section in c["spec"] and c["outcome"] == o) for o in OUTCOMES]
        lines.append(f"| {section} | " + " | ".join(str(n) if n else "" for n in counts) + " |")
    lines += ["", "## Checks", "", "| outcome | check | SPEC | seconds | note |", "|---|---|---|---:|---|"]
    lines += _check_rows(report["checks"], not_run)
    return "\n".join(lines + _under_load_tables(report["checks"]) + _request_tables(report["checks"])) + "\n"


def _check_rows(checks: list[dict[str, Any]], not_run: list[dict[str, Any]]) -> list[str]:
    """A row per check; the checks of a profile this host cannot run (`not_run`), one row for the
    profile, where its first check would stand."""
    profiles = [(profile_unavailable(c) or (None,))[0] for c in checks]
    groups: dict[str, list[dict[str, Any]]] = {}
    for profile, c in zip(profiles, checks):
        if profile is not None:
            groups.setdefault(profile, []).append(c)
    reasons = {u["profile"]: u["reason"] for u in not_run}
    rows = []
    for profile, c in zip(profiles, checks):
        if profile is None:
            note = c.get("message") or _properties_note(c.get("properties") or {})
            rows.append(f"| {c['outcome']} | {_md_escape(c['name'])} | {', '.join(c['spec'])} "
                        f"| {c['duration_s']:.3f} | {_md_escape(note)[:200]} |")
        elif c is groups[profile][0]:
            group = groups[profile]
            spec = sorted({s for g in group for s in g["spec"]}, key=_section_key)
            rows.append(f"| skipped | profile {profile}: {len(group)} checks | {', '.join(spec)} "
                        f"| {sum(g['duration_s'] for g in group):.3f} | {_md_escape(reasons[profile])[:300]} |")
    return rows


def _under_load_tables(checks: list[dict[str, Any]]) -> list[str]:
    """SPEC §8's numbers side by side: each burst's accounting, each storm's drain, each kill."""
    def n(value: Any) -> str:  # counts and bytes as whole numbers
        return f"{value:.0f}" if isinstance(value, (int, float)) else ("" if value is None else str(value))

    def plot(props: dict) -> str:
        path = (props.get("timeline") or {}).get("plot")
        return f"[plot](under-load/{Path(path).name})" if path else ""  # beside the report

    bursts = [(c, c["properties"]["burst"]) for c in checks if isinstance((c.get("properties") or {}).get("burst"), dict)]
    storms = [(c, c["properties"]["storm"]) for c in checks if isinstance((c.get("properties") or {}).get("storm"), dict)]
    kills = [(c, c["properties"]["kill"]) for c in checks if isinstance((c.get("properties") or {}).get("kill"), dict)]
    if not (bursts or storms or kills):
        return []
    lines = ["", "## Under load (SPEC §8)", ""]
    if bursts:
        lines += ["| burst | outcome | requests / errors | prompt tokens: clients = decode by source | cached: told = "
                  "prefill hits | KV bytes: moved = expected | drain | |", "|---|---|---|---|---|---|---:|---|"]
        for c, b in bursts:
            a, kv = b.get("accounting") or {}, b.get("kv_bytes") or {}
            sources = " + ".join(n(a.get('decode_' + s)) for s in ("local_compute", "local_cache_hit",
                                                                        "external_kv_transfer")
                                 if isinstance(a.get("decode_" + s), (int, float)))
            drain = (b.get("drain") or {}).get("settled_after_s")
            lines.append(f"| {_md_escape(c['name'])} | {c['outcome']} | {b.get('requests')} / {b.get('errors')} "
                         f"| {n(a.get('clients_prompt_tokens'))} = {sources} | {n(a.get('clients_cached_tokens'))} = "
                         f"{n(a.get('prefill_local_cache_hit'))} | {n(kv.get('moved'))} = {n(kv.get('expected'))} "
                         f"| {'' if drain is None else f'{drain} s'} | {plot(c.get('properties') or {})} |")
        lines.append("")
    if storms:
        lines += ["| abort storm | outcome | requests: left before a byte / after tokens / stayed | engines idle after "
                  "| frontend in flight after | |", "|---|---|---|---:|---|---|"]
        for c, st in storms:
            plans = st.get("plans") or {}
            frontend = st.get("frontend") or {}
            lines.append(f"| {_md_escape(c['name'])} | {c['outcome']} | {st.get('requests')}: "
                         f"{plans.get('before_first_byte', 0)} / {plans.get('after_tokens', 0)} / {plans.get('stays', 0)} "
                         f"| {(st.get('engines') or {}).get('settled_after_s', '')} s "
                         f"| {frontend.get('frontend_worker_requests_in_flight', frontend.get('frontend_requests_in_flight', 'not exported')) if frontend else 'not exported'} "
                         f"| {plot(st)} |")
        lines.append("")
    if kills:
        lines += ["| decode killed | outcome | streams: cut by the kill / others completed | last cut end after the kill | "
                  "new requests answered (by) | restart |", "|---|---|---|---:|---|---:|"]
        for c, k in kills:
            new = k.get("new_requests") or {}
            lines.append(f"| {_md_escape(c['name'])} | {c['outcome']} | {k.get('cut_by_the_kill')} / {k.get('others_completed')} "
                         f"| {k.get('last_cut_end_after_kill_s')} s | {new.get('answered')} ({_md_escape(', '.join(new.get('by_worker') or []))}) "
                         f"| {k.get('restart_s')} s |")
        lines.append("")
    return lines


def _request_tables(checks: list[dict[str, Any]]) -> list[str]:
    """Per-request numbers of the checks that record them (the multimodal cached_tokens suite)."""
    lines: list[str] = []
    for c in checks:
        rows = (c.get("properties") or {}).get("requests")
        if not isinstance(rows, list) or not rows:
            continue
        if not lines:
            lines = ["", "## Per request", "",
                     "cached_tokens \"missing\" means the response had no prompt_tokens_details (counted as 0).", ""]
        lines += [f"### {_md_escape(c['name'])} ({c['outcome']})", "",
                  "| # | image | cached_tokens | prompt tokens (engine / processor) | image span (start, length) | worker "
                  "| predicted blocks |", "|---:|---:|---:|---:|---|---|---:|"]
        for i, r in enumerate(rows, 1):
            span = r.get("image_span") or {}
            span_text = f"{span['start']}, {span['length']}" if span else ""
            predicted = r.get("predicted_cached_blocks")
            image = "" if r.get("image") is None else r["image"] + 1
            expanded = r.get("expanded_prompt_tokens")
            prompt = f"{r.get('prompt_tokens')}" + ("" if expanded is None else f" / {expanded}")
            lines.append(f"| {i} | {image} | {r.get('cached_tokens')} | {prompt} | {span_text} "
                         f"| {r.get('worker') or ''} | {'' if predicted is None else predicted} |")
        lines.append("")
    return lines


def write_report(report: dict[str, Any], report_dir: str | os.PathLike, stem: str = "conformance") -> tuple[Path, Path]:
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path
