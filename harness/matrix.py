"""The conformance matrix: several conformance reports side by side, a row per check, a column
per deployment, so that one can see which deployment fails or skips what the others pass.

Rows. A check's id names the deployment it ran on in its parameters: the embedded deployment's
`suites/test_disagg_routing.py::test_x[cpu]`, `[cpu-etcd]`, `[cpu-several-blocks]`,
`[cpu/kv-aggregated]`, a foreign one's `[foreign]`, `[foreign-several-blocks]`. The row key is
`<module>::<function>[<rest>]`: the leading profile part of the parameters is dropped, with the
`-`/`/` after it. A profile part is `foreign` or a profile name (harness/engines/profiles.py, the
report's own, and those its skips name), the longest that fits, optionally followed by the store
label of suites/conftest.py (`-etcd`, `-etcd-url`). So `[cpu-several-blocks]` and
`[foreign-several-blocks]` are one row, `test_x[several-blocks]`; `[cpu]` and `[foreign]` are
`test_x`. What is left (a prompt's name, a card's label, a topology) keeps rows apart: the
embedded cache checks' `[text-self-host]` and a foreign card's `[vendor-model]` are different rows.

Columns. One per (report, profile part): a report that ran `cpu` and `cpu-etcd` gives two
columns. Checks without a profile part (the cache checks) belong to the whole report and show in
each of its columns. A column is labelled by `--name LABEL=REPORT.json`, else by the report's
deployment (kind, frontend name or URL); the profile part is added when it is not the only one
or (unnamed) when it is not `foreign`.

Cells: `passed`, `failed: <first line of the message>`, `skipped: <what was missing>` (one line,
about 80 characters), empty where the deployment did not run the check. A profile the host could
not run (no GPU, its engine not installed: harness.report.profile_unavailable) gives no column and
no rows: one line under the table says so.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.report import OUTCOMES, profile_unavailable, skip_reason

STORE_LABELS = ("etcd-url", "etcd")  # suites/conftest.py store_label(); the file store adds none
CELL_WIDTH = 80


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """A conformance report, checked enough to tabulate; else an error naming the file and the fault."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise HarnessError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    try:
        report = json.loads(text)
    except ValueError as exc:
        raise HarnessError(f"{path}: not JSON: {exc}") from None
    if not isinstance(report, dict) or not isinstance(report.get("checks"), list):
        raise HarnessError(f"{path}: not a conformance report: it has no 'checks' list")
    for i, check in enumerate(report["checks"]):
        if not isinstance(check, dict) or not isinstance(check.get("id"), str) or check.get("outcome") not in OUTCOMES:
            raise HarnessError(f"{path}: checks[{i}] is not a check: it needs an 'id' and an 'outcome' "
                               f"(one of {', '.join(OUTCOMES)})")
    return report


def named_sources(paths: list[str], names: list[str]) -> list[tuple[str | None, str]]:
    """(label or None, path) per report: the positional paths in order, labelled by a `--name LABEL=PATH`
    for the same file; a --name for another file adds that report."""
    labels: dict[str, str] = {}
    for value in names:
        label, sep, path = value.partition("=")
        if not sep or not label or not path:
            raise HarnessError(f"--name {value!r} must be LABEL=REPORT.json")
        labels[os.path.realpath(path)] = label
        if os.path.realpath(path) not in map(os.path.realpath, paths):
            paths = [*paths, path]
    if not paths:
        raise HarnessError("give at least one REPORT.json")
    return [(labels.get(os.path.realpath(p)), p) for p in paths]


def split_profile(params: str, profiles: set[str]) -> tuple[str | None, str]:
    """(profile part, the rest) of a check's parameter id; (None, params) when it has none."""
    for name in sorted(profiles, key=len, reverse=True):
        for token in [f"{name}-{s}" for s in STORE_LABELS] + [name]:
            if params == token or params.startswith((token + "-", token + "/")):
                return token, params[len(token) + 1:]
    return None, params


def _profile_order(part: str) -> tuple[str, int]:
    """A profile before its store variants: cpu, cpu-etcd, cpu-etcd-url, cpu-shared-storage."""
    for store in STORE_LABELS:  # etcd-url before etcd: the longer suffix first
        if part.endswith(f"-{store}"):
            return part.removesuffix(f"-{store}"), 1 + ("etcd", "etcd-url").index(store)
    return part, 0


def row_key(check_id: str, profiles: set[str]) -> tuple[str | None, str]:
    """(profile part, row key) of a check id."""
    file, _, test = check_id.partition("::")
    func, bracket, params = test.partition("[")
    profile, rest = split_profile(params[:-1], profiles) if bracket else (None, "")
    return profile, f"{Path(file).stem}::{func}" + (f"[{rest}]" if rest else "")


def row_name(key: str) -> str:
    module, _, test = key.partition("::")
    func, bracket, params = test.partition("[")
    return f"{module.removeprefix('test_')}: {func.removeprefix('test_').replace('_', ' ')}" + (
        f" [{params}" if bracket else "")


def one_line(text: str | None, width: int = CELL_WIDTH) -> str:
    line = next((ln.strip() for ln in str(text or "").splitlines() if ln.strip()), "")
    line = re.sub(r"\s+", " ", line.removeprefix("AssertionError: "))
    return line if len(line) <= width else line[:width - 1].rstrip() + "…"


def cell(check: dict[str, Any]) -> str:
    outcome = check["outcome"]
    if outcome in ("failed", "error"):
        return f"{outcome}: {one_line(check.get('message'))}"
    if outcome == "skipped":
        return f"skipped: {one_line(skip_reason(check.get('message')))}"
    return outcome


def _dict(report: dict[str, Any], key: str) -> dict[str, Any]:
    return report[key] if isinstance(report.get(key), dict) else {}


def _known_profiles(report: dict[str, Any]) -> set[str]:
    from harness.engines.profiles import PROFILES

    d = _dict(report, "deployment")
    served = [s.get("profile") for s in d.get("deployments") or [] if isinstance(s, dict)]
    names = {"foreign", *PROFILES, d.get("profile"), *served}
    names |= {hit[0] for c in report["checks"] if (hit := profile_unavailable(c))}
    return {n for n in names if isinstance(n, str) and n}


def _deployment_label(report: dict[str, Any]) -> str:
    d = _dict(report, "deployment")
    frontend = _dict(d, "frontend")
    who = frontend.get("url") if d.get("kind") == "foreign" and frontend.get("url") else frontend.get("name")
    return " ".join(str(p) for p in (d.get("kind") or "?", who) if p)


def build_matrix(sources: list[tuple[str | None, str, dict[str, Any]]]) -> dict[str, Any]:
    """The matrix of these (label or None, path, report): columns, rows, and the profiles not run."""
    columns, rows, not_run = [], {}, {}
    names = _unique([name or _deployment_label(report) for name, _, report in sources])
    for (given, path, report), name in zip(sources, names):
        profiles = _known_profiles(report)
        ran: dict[str | None, dict[str, dict]] = {}
        for check in sorted(report["checks"], key=lambda c: c["id"]):
            if (hit := profile_unavailable(check)) is not None:
                entry = not_run.setdefault(hit[0], {"profile": hit[0], "reasons": [], "checks": {}})
                entry["checks"][name] = entry["checks"].get(name, 0) + 1
                if hit[1] not in entry["reasons"]:
                    entry["reasons"].append(hit[1])
                continue
            profile, key = row_key(check["id"], profiles)
            ran.setdefault(profile, {})[key] = check
            row = rows.setdefault(key, {"key": key, "name": row_name(key), "spec": []})
            row["spec"] = sorted({*row["spec"], *check.get("spec", [])})
        shared = ran.pop(None, {})  # checks of no profile: in each of the report's columns
        parts = sorted(ran, key=_profile_order) or [None]
        for profile in parts:
            plain = profile is None or (len(parts) == 1 and (given or profile == "foreign"))
            label = name if plain else f"{name} {profile}"
            checks = {**shared, **ran.get(profile, {})}
            columns.append({"label": label, "report": str(path), "profile": profile, "checks": checks,
                            "commit": _dict(report, "commit"), "generated_at": report.get("generated_at"),
                            "deployment": {k: _dict(report, "deployment").get(k) for k in
                                           ("kind", "frontend", "profile", "model")}})
    ordered = sorted(rows.values(), key=lambda r: r["key"])
    for row in ordered:
        row["cells"] = [cell(c["checks"][row["key"]]) if row["key"] in c["checks"] else None for c in columns]
    for c in columns:
        counts = {o: 0 for o in OUTCOMES}
        for check in c.pop("checks").values():
            counts[check["outcome"]] += 1
        c["summary"] = {o: n for o, n in counts.items() if n}
    return {"schema": 1, "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "columns": columns, "rows": ordered,
            "profiles_not_run": [{"profile": e["profile"], "reason": "; ".join(e["reasons"]),
                                  "checks": e["checks"]} for e in not_run.values()]}


def _unique(labels: list[str]) -> list[str]:
    """The reports' labels, a repeated one numbered (`embedded harness #2`)."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(matrix: dict[str, Any]) -> str:
    cols = matrix["columns"]
    lines = ["# Conformance matrix", "", f"Generated {matrix['generated_at']} from {len(cols)} column(s):", ""]
    lines += [f"- **{_md(c['label'])}**: `{c['report']}`" for c in cols]
    commit = [f"`{(c['commit'].get('id') or '?')[:12]}`" + (" (dirty)" if c["commit"].get("dirty") else "")
              for c in cols]
    summary = [", ".join(f"{n} {o}" for o, n in c["summary"].items()) for c in cols]
    lines += ["", "| check | SPEC | " + " | ".join(_md(c["label"]) for c in cols) + " |",
              "|---|---|" + "---|" * len(cols),
              "| _commit_ | | " + " | ".join(commit) + " |",
              "| _generated_ | | " + " | ".join(str(c["generated_at"] or "?") for c in cols) + " |",
              "| **summary** | | " + " | ".join(f"**{s}**" if s else "" for s in summary) + " |"]
    lines += [f"| {_md(r['name'])} | {', '.join(r['spec'])} | " + " | ".join(_md(v or "") for v in r["cells"]) + " |"
              for r in matrix["rows"]]
    if matrix["profiles_not_run"]:
        lines.append("")
    for p in matrix["profiles_not_run"]:
        where = ", ".join(f"{_md(label)} ({n} checks)" for label, n in p["checks"].items())
        lines.append(f"- Profile `{p['profile']}` did not run in {where}: {_md(p['reason'])}")
    return "\n".join(lines) + "\n"


def write_matrix(sources: list[tuple[str | None, str]], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Read every report first: a bad one is an error and nothing is written."""
    matrix = build_matrix([(label, path, load_report(path)) for label, path in sources])
    text_json, text_md = json.dumps(matrix, indent=2, default=str) + "\n", render_markdown(matrix)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "matrix.json").write_text(text_json)
    (out / "matrix.md").write_text(text_md)
    return out / "matrix.json", out / "matrix.md"
