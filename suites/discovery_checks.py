"""The assertions behind the discovery-store fault checks (SPEC §3), shared so that a planted
frontend can be shown caught.

While its discovery store is down, a frontend cannot see a worker die: the dead worker's lease
cannot expire where nobody can read it. So a frontend may serve from its last view for at most one
lease after the store stops answering; then it must refuse (any non-200, e.g. 503), and when the
store is back its models must come back.
"""

from __future__ import annotations

import time
from typing import Callable

import requests

# Seconds past one lease a frontend may still serve: its last confirmation came a little before the
# store stopped (an idle re-list), and the probe requests themselves take time.
STALE_VIEW_SLACK_S = 2.0


def ask(frontend_url: str, model: str) -> requests.Response:
    return requests.post(f"{frontend_url}/v1/completions", timeout=60,
                         json={"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0.0})


def check_a_stopped_store_bounds_the_stale_view(frontend_url: str, model: str, *, lease_s: float,
                                                stop_store: Callable[[], None], start_store: Callable[[], None],
                                                back_within_s: float = 60.0) -> dict:
    """Stop the store under a serving frontend: it serves for at most one lease more, then refuses;
    start the store again: it serves again. Returns the timings for the report."""
    first = ask(frontend_url, model)
    assert first.status_code == 200, f"the frontend does not serve {model!r} to begin with: HTTP {first.status_code}"
    give_up = lease_s + STALE_VIEW_SLACK_S + 5
    stopped = time.monotonic()  # before the stop: a store may stop answering at once, then take a while to exit
    stop_store()
    last_served, refusal = 0.0, None
    try:
        while time.monotonic() - stopped < give_up:
            resp = ask(frontend_url, model)
            if resp.status_code != 200:
                refusal = resp
                break
            last_served = time.monotonic() - stopped
            time.sleep(0.2)
    finally:
        start_store()
    restarted = time.monotonic()
    numbers = {"lease_s": lease_s, "served_after_store_stopped_s": round(last_served, 2),
               "refused_with": refusal.status_code if refusal is not None else None,
               "refusal": refusal.text[:300] if refusal is not None else None}
    assert refusal is not None, (
        f"the frontend kept serving from its last view {give_up:.0f} s after the discovery store stopped "
        f"(lease {lease_s:.0f} s): a worker that died meanwhile would still get requests {numbers}")
    assert last_served <= lease_s + STALE_VIEW_SLACK_S, (
        f"the frontend served from a stale view {last_served:.1f} s after the store stopped, longer than one lease "
        f"({lease_s:.0f} s) {numbers}")
    while (resp := ask(frontend_url, model)).status_code != 200:
        assert time.monotonic() - restarted < back_within_s, (
            f"the store is back but the frontend still refuses after {back_within_s:.0f} s: HTTP {resp.status_code} "
            f"{resp.text[:200]} {numbers}")
        time.sleep(0.2)
    numbers["served_again_after_restart_s"] = round(time.monotonic() - restarted, 2)
    return numbers
