"""Clients that leave mid-request leave nothing behind (SPEC §8).

An abort storm: a closed loop of C clients sends N streamed and whole requests through the frontend
under test, and most leave at a random point. A quarter leave before any byte comes back (while
the frontend routes and the prefill runs: a disaggregated frontend answers nothing before its
prefill is done), half leave after a random number of tokens, and a quarter stay to the end.
Afterwards, within a bound:
- no engine runs a request, and each engine's KV usage is back to its value before the storm. A
  prefill whose client left keeps its blocks for a decode that never comes until its KV lease ends
  (NIXL's kv_lease_duration, the connector's abort timeout), so the bound is that lease and a
  margin;
- the frontend's own in-flight counts are back to 0 (its /metrics: the reference frontend's
  `disagg_frontend_*`, vllm-router's `vllm_router_pd_active_decode_requests`);
- those who stayed got complete answers.
One storm per deployment is run, and its outcome read by each check that needs it.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import time
from dataclasses import asdict, dataclass

import httpx

from harness import evidence as ev
from harness.deployment import Deployment
from suites.disagg_checks import fresh_prompt
from suites.load_checks import eos_ignored, idle_baseline, settle, settle_within_s
from suites.load_timeline import Timeline

CONCURRENCY = 16
REQUESTS = 48
MAX_TOKENS = 48
FRONTEND_SETTLE_S = 10.0  # the frontend's counts, once the engines are idle: it only has to notice


@dataclass
class Leaver:
    """One client of the storm and where it left."""

    n: int
    plan: str  # before_first_byte | after_tokens | stays
    stream: bool
    tokens_wanted: int = 0  # after_tokens: leave after this many
    status: int | None = None
    tokens_seen: int = 0
    left_after_s: float | None = None
    complete: bool | None = None  # stays: a finish_reason (and [DONE] when streamed)
    error: str | None = None


def plan_for(n: int, rng: random.Random, plans: tuple[str, ...]) -> Leaver:
    plan = plans[n % len(plans)]
    stream = plan == "after_tokens" or n % 2 == 1
    return Leaver(n, plan, stream, tokens_wanted=rng.randint(1, MAX_TOKENS // 2) if plan == "after_tokens" else 0)


def run_client(deployment: Deployment, who: Leaver, rng: random.Random, extra: dict) -> Leaver:
    endpoint = deployment.endpoint()
    # ignore_eos where taken (`extra`): every stayer runs its full length, every leaver has tokens left
    body = {"model": endpoint.model, "prompt": fresh_prompt((20, 60, 120)[who.n % 3]), "max_tokens": MAX_TOKENS,
            "temperature": 0.0, **endpoint.dialect, **extra}
    if who.stream:
        body |= {"stream": True}
    url = f"{endpoint.url}/v1/completions"
    # A client that leaves before any byte: its read timeout runs out while the frontend routes
    # and prefills (a random 20-200 ms), and httpx closes the connection.
    read_s = rng.uniform(0.02, 0.2) if who.plan == "before_first_byte" else 120.0
    started = time.monotonic()
    try:
        with httpx.stream("POST", url, json=body, timeout=httpx.Timeout(read_s, connect=10)) as resp:
            who.status = resp.status_code
            finished = done = False
            for line in resp.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: {") or (not who.stream and line.startswith("{")):
                    chunk = json.loads(line[6:] if line.startswith("data: ") else line)
                    for choice in chunk.get("choices") or []:
                        who.tokens_seen += 1 if who.stream else 0
                        finished = finished or bool(choice.get("finish_reason"))
                    if who.plan == "after_tokens" and who.tokens_seen >= who.tokens_wanted:
                        who.left_after_s = round(time.monotonic() - started, 3)
                        return who  # leaving the `with` closes the connection mid-stream
            who.complete = finished and (done or not who.stream)
    except httpx.ReadTimeout:
        if who.plan != "before_first_byte":
            who.error = f"ReadTimeout after {time.monotonic() - started:.1f} s"
        who.left_after_s = round(time.monotonic() - started, 3)
    except (httpx.HTTPError, ValueError) as exc:
        who.error = f"{type(exc).__name__}: {exc}"[:200]
    return who


def frontend_in_flight(deployment: Deployment) -> dict[str, float | None]:
    metrics = deployment.frontend_metrics()
    return {q: metrics.get(q) for q in ("frontend_requests_in_flight", "frontend_worker_requests_in_flight")}


def wait_frontend_idle(deployment: Deployment, within_s: float = FRONTEND_SETTLE_S) -> dict:
    started = time.monotonic()
    while True:
        counts = frontend_in_flight(deployment)
        idle = all(v in (0, None) for v in counts.values())
        if idle or time.monotonic() - started > within_s:
            return {"idle": idle, "after_s": round(time.monotonic() - started, 1), **counts}
        time.sleep(0.2)


def storm(deployment: Deployment, *, requests: int = REQUESTS, concurrency: int = CONCURRENCY,
          plans: tuple[str, ...] = ("before_first_byte", "after_tokens", "after_tokens", "stays"),
          seed: int = 16, timeline: Timeline | None = None) -> dict:
    """Run one storm; return what the clients did and the state of engines and frontend afterwards."""
    rng = random.Random(seed)
    who = [plan_for(n, rng, plans) for n in range(requests)]
    seeds = [rng.random() for _ in who]
    extra = eos_ignored(deployment.endpoint())
    before, waited = idle_baseline(deployment)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(lambda w, s: run_client(deployment, w, random.Random(s), extra), who, seeds))
    storm_s = round(time.monotonic() - started, 1)
    settled = settle(deployment, {role: m.get("kv_cache_usage") for role, m in before.items()})
    settled.pop("metrics")
    frontend = wait_frontend_idle(deployment) if deployment.lacks(ev.FRONTEND_METRICS) is None else None
    if timeline is not None:
        timeline.mark("idle")
    counts = {p: sum(1 for w in done if w.plan == p) for p in plans}
    return {"requests": requests, "concurrency": concurrency, "storm_s": storm_s, "plans": counts,
            "left_before_first_byte": sum(1 for w in done if w.plan == "before_first_byte" and w.status is None),
            "idle_before_s": waited["settled_after_s"], "engines": settled, "frontend": frontend,
            "settle_within_s": settle_within_s(deployment), "clients": [asdict(w) for w in done]}


def assert_nothing_left_running(outcome: dict) -> None:
    stayers = [w for w in outcome["clients"] if w["plan"] == "stays"]
    broken = [w for w in stayers if not w["complete"] or w["error"] or w["status"] != 200]
    assert not broken, f"{len(broken)} of the {len(stayers)} clients that stayed got no complete answer: {broken[:3]}"
    others = [w for w in outcome["clients"] if w["plan"] != "stays" and w["error"]]
    assert not others, f"clients that meant to leave met errors first: {others[:3]}"
    engines = outcome["engines"]
    assert engines["quiet"], (
        f"{outcome['settle_within_s']:.0f} s after an abort storm (the prefill's KV lease and a margin) an engine "
        f"still runs a request or holds more KV than before it: {engines['engines']} "
        f"({outcome['left_before_first_byte']} clients left before the first byte)")


def assert_frontend_idle(outcome: dict) -> None:
    frontend = outcome["frontend"]
    assert frontend["idle"], (
        f"{FRONTEND_SETTLE_S:.0f} s after the engines were idle again, the frontend still counts requests in "
        f"flight: {frontend}; every client of the storm had left or been answered (an in-flight count that leaks "
        f"on aborted streams)")
