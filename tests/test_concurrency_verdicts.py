"""The relay-cost bench's verdicts against vllm-router (benchmarks/test_frontend_concurrency.py):
judged round by round, each arm against the others of its own round, so that the host's drift
between rounds cannot make a slower frontend pass nor a faster one fail."""

from __future__ import annotations

from benchmarks.test_frontend_concurrency import ARMS, SPLIT, against_the_peer


def table(c: int, rounds: list[dict[str, float]], what: str) -> dict:
    """A bench table at concurrency c from each round's figures: tokens/s, or TTFT p50 in ms."""
    def figures(value: float) -> dict:
        return {"tokens_per_s": value, "ttft_p50_s": None} if what == "tps" else {"ttft_p50_s": value / 1e3}
    return {c: {arm: {"per_round": [figures(r[arm]) for r in rounds]} for arm in ARMS if arm in rounds[0]}}


def test_a_frontend_behind_vllm_router_in_most_rounds_misses_though_its_median_over_rounds_is_higher():
    # The host's speed drifts from round to round: on their own medians the frontend's 80 beats
    # vllm-router's 61, yet beside it, in its own round, the frontend is behind in two of three.
    rounds = [{"direct": 100, "floor": 62, "vllm-router": 61, "frontend": 60},
              {"direct": 160, "floor": 102, "vllm-router": 101, "frontend": 100},
              {"direct": 130, "floor": 82, "vllm-router": 59, "frontend": 80}]
    verdict = against_the_peer(table(16, rounds, "tps"), 16, "tps")
    assert verdict["frontend"] > verdict["vllm-router"]
    assert verdict["verdict"] == "missed" and verdict["rounds_met"] == "1 of 3"
    assert verdict["frontend_vs_peer"] == 100 / 101, "the median of each round's ratio"


def test_a_frontend_ahead_in_most_rounds_meets_the_throughput_target_and_says_in_how_many():
    rounds = [{"direct": 100, "floor": 60, "vllm-router": 58, "frontend": 59},
              {"direct": 100, "floor": 60, "vllm-router": 58, "frontend": 57},
              {"direct": 100, "floor": 60, "vllm-router": 58, "frontend": 60}]
    verdict = against_the_peer(table(64, rounds, "tps"), 64, "tps")
    assert verdict["verdict"] == "met" and verdict["rounds_met"] == "2 of 3"


def test_at_c1_a_frontend_within_the_slack_of_a_floor_that_misses_vllm_router_too_meets_it():
    rounds = [{"direct": 0.3, "floor": 1.5, "vllm-router": 1.0, "frontend": 1.65} for _ in range(3)]
    verdict = against_the_peer(table(1, rounds, "ttft"), 1, "ttft_added")
    assert verdict["verdict"] == "met within the floor's slack"
    assert abs(verdict["frontend"] - 1.35) < 1e-9 and abs(verdict["frontend_vs_peer"] - 0.65) < 1e-9


def test_at_c1_a_frontend_more_than_the_slack_over_the_floor_misses():
    rounds = [{"direct": 0.3, "floor": 1.5, "vllm-router": 1.0, "frontend": 1.75} for _ in range(3)]
    verdict = against_the_peer(table(1, rounds, "ttft"), 1, "ttft_added")
    assert verdict["verdict"].startswith("missed: more than 0.2 ms over the floor")
    assert verdict["rounds_met"] == "0 of 3"


def test_at_c1_the_slack_is_no_excuse_where_the_floor_beats_vllm_router():
    rounds = [{"direct": 0.3, "floor": 0.9, "vllm-router": 1.0, "frontend": 1.05} for _ in range(3)]
    assert against_the_peer(table(1, rounds, "ttft"), 1, "ttft_added")["verdict"] == "missed"


def test_at_c1_added_latency_is_taken_over_the_same_rounds_direct():
    # The host slows down in round 2 for every arm: the frontend still adds less than vllm-router.
    rounds = [{"direct": 0.3, "floor": 1.5, "vllm-router": 1.0, "frontend": 0.9},
              {"direct": 0.6, "floor": 3.0, "vllm-router": 2.0, "frontend": 1.8},
              {"direct": 0.3, "floor": 1.5, "vllm-router": 1.0, "frontend": 0.9}]
    verdict = against_the_peer(table(1, rounds, "ttft"), 1, "ttft_added")
    assert verdict["verdict"] == "met" and verdict["rounds_met"] == "3 of 3"


def test_the_split_frontend_is_set_against_the_one_process_frontend_and_never_decides_the_verdict():
    # Two frontend processes far ahead of vllm-router cannot make the one-process frontend pass.
    rounds = [{"direct": 100, "floor": 60, "vllm-router": 58, "frontend": 57, SPLIT: 90},
              {"direct": 100, "floor": 60, "vllm-router": 58, "frontend": 50, SPLIT: 55},
              {"direct": 100, "floor": 60, "vllm-router": 58, "frontend": 60, SPLIT: 57}]
    verdict = against_the_peer(table(16, rounds, "tps"), 16, "tps")
    assert verdict["verdict"] == "missed" and verdict["frontend_vs_peer"] == 57 / 58
    assert verdict["split_vs_frontend"] == 1.1, "the median of each round's ratio: 90/57, 55/50, 57/60"
    assert verdict[SPLIT] == 57


def test_at_c1_the_split_frontend_gain_is_its_added_ttft_less_the_frontends_in_the_same_round():
    rounds = [{"direct": 0.3, "floor": 1.5, "vllm-router": 1.0, "frontend": 0.9, SPLIT: 1.1},
              {"direct": 0.6, "floor": 3.0, "vllm-router": 2.0, "frontend": 1.8, SPLIT: 2.2}]
    verdict = against_the_peer(table(1, rounds, "ttft"), 1, "ttft_added")
    assert verdict["verdict"] == "met"
    assert abs(verdict["split_vs_frontend"] - 0.3) < 1e-9, "(0.2 + 0.4) / 2 ms"
