"""reports/coldstart.*: the shape other tools read, and a chart that shows each second once."""

from __future__ import annotations

import json

from benchmarks.coldstart_report import bar_parts, summarize, write_coldstart_report


def run(mode: str, health: float, first: float, reused: bool = True, **phases: float) -> dict:
    return {"mode": mode, "health_s": health, "first_token_s": first, "phases": phases,
            "new_kernels": 0 if reused else 3, "reused": reused}


RUNS = [run("cold", 40.0, 40.1, engine_init=16.0), run("warm", 23.0, 23.1, engine_init=5.5),
        run("transferred", 23.5, 23.6, engine_init=5.4),
        run("cold", 41.0, 41.1, engine_init=16.6), run("warm", 23.6, 23.7, engine_init=5.6),
        run("transferred", 30.0, 30.1, reused=False, engine_init=15.0)]


def test_the_summary_keeps_the_documented_shape_and_same_run_ratios():
    summary = summarize(RUNS)
    for mode in ("cold", "warm", "transferred"):
        m = summary["modes"][mode]
        assert set(m["health_s"]) == set(m["first_token_s"]) == {"median", "min", "max"}
        assert len(m["runs"]) == 2
    assert summary["modes"]["cold"]["health_s"] == {"median": 40.5, "min": 40.0, "max": 41.0}
    assert [r["reused"] for r in summary["modes"]["transferred"]["runs"]] == [True, False]
    assert summary["ratios"] == {"transferred_over_warm_health": round(26.75 / 23.3, 3),
                                 "cold_over_transferred_health": round(40.5 / 26.75, 3)}


def test_a_mode_without_its_pair_has_no_ratio_rather_than_a_made_up_one():
    assert summarize([run("cold", 40.0, 40.1)])["ratios"] == {}


def test_the_bar_shows_compile_and_graph_capture_inside_engine_init_once():
    mode = summarize([run("cold", 60.0, 61.0, weight_load=3.0, compile=10.0, graph_capture=7.0,
                          engine_init=31.0)])["modes"]["cold"]
    parts = dict(bar_parts(mode))
    assert parts["engine_init"] == 31.0 - 10.0 - 7.0
    assert parts["rest"] == 60.0 - 3.0 - 31.0
    assert sum(parts.values()) == 61.0


def test_the_report_is_written_for_tools_and_people_and_names_a_transfer_that_was_not_reused(tmp_path):
    write_coldstart_report({"cpu": summarize(RUNS)}, tmp_path)
    data = json.loads((tmp_path / "coldstart.json").read_text())
    assert data["profiles"]["cpu"]["modes"]["warm"]["health_s"]["median"] == 23.3
    assert "| transferred | 2 |" in (md := (tmp_path / "coldstart.md").read_text())
    assert "yes, **no**" in md
    assert (tmp_path / "coldstart.png").read_bytes()[:4] == b"\x89PNG"
