"""A decode worker lost with many streams open (SPEC §8, §4.4), on the embedded deployment.

16 clients stream long greedy completions at once. For the length of the check the deployment's
aggregated engine is registered behind the frontend as a second worker (an aggregated one: it runs
its requests whole, with no prefill), so about half the streams run on the decode engine. Once at
least 4 are open on the decode (or, on a fast host, once one has ended with others still open), by
its relay (the engine has sent tokens and no `[DONE]`: the clients read more slowly than it generates, so
their own counts say little; each stream's X-Request-Id ties it to its relay exchange), the
decode engine's process group is killed (SIGKILL: a crash, not a stop). Then:
- no client hangs; every stream open on the decode at the kill ends within a bound with a clear
  error naming the decode worker, and none of them ends looking complete (a finish_reason or
  `[DONE]`);
- every other stream completes, or (routed to the dead worker before the frontend noticed) fails
  with an error naming it;
- once the frontend has dropped the dead worker, new requests all go to the one that remains;
- the decode is restarted, registers again, and is used again.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import threading
import time
from dataclasses import asdict, dataclass

import httpx
import requests

from harness.deployment import Deployment
from suites.disagg_checks import fresh_prompt

STREAMS = 16
MAX_TOKENS = 120  # ~1 s of decode on CPU; every token passes relay, frontend and client in this process
OPEN_ON_DECODE_AT_KILL = 4
ENDED_WITHIN_S = 20.0  # from the kill to the last broken stream's end
NEW_REQUESTS = 4
DECODE_HEADER = "x-disagg-decode-worker"


@dataclass
class OpenStream:
    n: int
    request_id: str
    status: int | None = None
    decode_worker: str | None = None
    tokens: int = 0
    error_event: bool = False
    error: str | None = None  # the error event's message, an HTTP error's body, or what the client met
    finish_reason: str | None = None
    done: bool = False
    ended_after_kill_s: float | None = None

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.done and bool(self.finish_reason) and not (self.error or self.error_event)

    @property
    def looks_complete(self) -> bool:
        return self.status == 200 and (self.done or bool(self.finish_reason))


def hold_stream(deployment: Deployment, stream: OpenStream, killed: threading.Event, killed_at: list[float]
                ) -> OpenStream:
    endpoint = deployment.endpoint()
    try:
        request = endpoint.stream_request(fresh_prompt(30), MAX_TOKENS, ignore_eos=True)
        with httpx.stream(**request, headers={"X-Request-Id": stream.request_id}) as resp:
            stream.status, stream.decode_worker = resp.status_code, resp.headers.get(DECODE_HEADER)
            if resp.status_code != 200:
                stream.error = resp.read().decode(errors="replace")[:300]
            else:
                for line in resp.iter_lines():
                    if line == "event: error":
                        stream.error_event = True
                    elif line == "data: [DONE]":
                        stream.done = True
                    elif line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if "error" in chunk and not chunk.get("choices"):
                            error = chunk["error"]
                            stream.error = str(error.get("message") if isinstance(error, dict) else error)[:300]
                        for choice in chunk.get("choices") or []:
                            stream.tokens += 1
                            stream.finish_reason = choice.get("finish_reason") or stream.finish_reason
    except httpx.HTTPError as exc:
        stream.error = stream.error or f"{type(exc).__name__}: {exc}"[:300]
    if killed.is_set():
        stream.ended_after_kill_s = round(time.monotonic() - killed_at[0], 2)
    return stream


def ask_once(deployment: Deployment) -> dict:
    endpoint = deployment.endpoint()
    resp = requests.post(f"{endpoint.url}/v1/completions", timeout=60,
                         json={"model": endpoint.model, "prompt": fresh_prompt(20), "max_tokens": 4,
                               "temperature": 0.0, **endpoint.dialect})
    return {"status": resp.status_code, "decode_worker": resp.headers.get(DECODE_HEADER),
            "mode": resp.headers.get("x-disagg-mode"), "error": None if resp.ok else resp.text[:200]}


def worker_key(deployment: Deployment, engine_name: str) -> str:
    return deployment.cluster.registrations[engine_name].entry.key


def kill_the_decode_with_streams_open(deployment: Deployment) -> dict:
    """The whole check; returns the numbers, raises AssertionError naming what did not hold."""
    t0 = time.monotonic()
    cluster = deployment.cluster
    aggregated = deployment.engines["aggregated"]
    cluster.register(aggregated)  # the worker that remains
    cluster.wait_for_roles({"prefill", "decode", "aggregated"}, timeout_s=60)
    remaining = worker_key(deployment, aggregated.name)
    numbers: dict = {"streams": STREAMS}
    phases = numbers["phases"] = {}  # where the time goes: seconds from the start to each step's end

    def phase(name: str) -> None:
        phases[name] = round(time.monotonic() - t0, 1)

    phase("aggregated_joined_s")
    relay = deployment.interposed["decode"]
    try:
        since = relay.mark()
        killed, killed_at = threading.Event(), [0.0]
        nonce = os.urandom(4).hex()
        streams = [OpenStream(n, f"kill-{nonce}-{n}") for n in range(STREAMS)]
        with concurrent.futures.ThreadPoolExecutor(STREAMS) as pool:
            futures = [pool.submit(hold_stream, deployment, s, killed, killed_at) for s in streams]
            deadline, open_on_decode = time.monotonic() + 120, []
            while time.monotonic() < deadline and not all(f.done() for f in futures):
                seen = relay.exchanges(since)
                open_on_decode = [e for e in seen if e.events and not e.done and e.ended is None]
                ending = any(e.ended is not None for e in seen)  # more waiting means fewer open, not more
                if len(open_on_decode) >= OPEN_ON_DECODE_AT_KILL or (open_on_decode and ending):
                    break
                time.sleep(0.05)
            phase("to_kill_s")
            numbers["open_on_decode_at_kill"] = len(open_on_decode)
            open_ids = {e.request_id for e in open_on_decode}
            doomed_key = worker_key(deployment, deployment.engines["decode"].name)
            killed_at[0] = time.monotonic()
            deployment.kill_role("decode")
            killed.set()
            done, hanging = concurrent.futures.wait(futures, timeout=ENDED_WITHIN_S + 120)
        phase("streams_ended_s")
        numbers["hanging"] = len(hanging)
        assert not hanging, f"{len(hanging)} of {STREAMS} streams never ended after their decode was killed"
        assert numbers["open_on_decode_at_kill"] >= 1, (
            f"no stream was open on the decode when it was killed, by its relay: the check saw nothing to break "
            f"{[asdict(s) for s in streams][:3]}")
        cut = [s for s in streams if s.request_id in open_ids]
        others = [s for s in streams if s.request_id not in open_ids]
        numbers |= {"cut_by_the_kill": len(cut), "others_completed": sum(s.complete for s in others),
                    "others_failed": sorted({(s.status, (s.error or "")[:60]) for s in others if not s.complete}),
                    "last_cut_end_after_kill_s": max((s.ended_after_kill_s or 0) for s in cut) if cut else None}
        looking_complete = [asdict(s) for s in cut if s.looks_complete]
        assert not looking_complete, (f"{len(looking_complete)} of the {len(cut)} streams open on the decode when it "
                                      f"was killed ended looking complete (a finish_reason or [DONE]): "
                                      f"{looking_complete[:3]}")
        unclear = [asdict(s) for s in cut if not s.error or "decode" not in s.error.lower()]
        assert not unclear, f"streams the kill cut ended without an error naming the decode worker: {unclear[:3]}"
        late = [asdict(s) for s in cut if (s.ended_after_kill_s or 0) > ENDED_WITHIN_S]
        assert not late, f"{len(late)} streams the kill cut took more than {ENDED_WITHIN_S:.0f} s to end: {late[:3]}"
        silent = [asdict(s) for s in others if not s.complete and not (s.error and "decode" in s.error.lower())]
        assert not silent, f"streams neither complete nor failed with an error naming the decode worker: {silent[:3]}"

        # New requests: once the frontend has noticed, every one goes to the worker that remains.
        cluster.wait_until(lambda c: "decode" not in c.roles_served(), "the dead decode's entry to go",
                           timeout_s=3 * cluster.lease_s + 10)
        phase("dead_entry_gone_s")
        new = [ask_once(deployment) for _ in range(NEW_REQUESTS)]
        phase("new_requests_answered_s")
        numbers["new_requests"] = {"answered": sum(r["status"] == 200 for r in new),
                                   "by_worker": sorted({r["decode_worker"] or "?" for r in new})}
        assert all(r["status"] == 200 for r in new), f"new requests with the decode dead failed: {new}"
        assert {r["decode_worker"] for r in new} == {remaining}, (
            f"new requests with the decode dead went to {numbers['new_requests']['by_worker']}, not only to the "
            f"remaining worker {remaining}")

        restart_started = time.monotonic()
        deployment.restart_role("decode")
        numbers["restart_s"] = round(time.monotonic() - restart_started, 1)
        phase("restarted_s")
        reborn = worker_key(deployment, deployment.engines["decode"].name)
        after = [ask_once(deployment) for _ in range(2)]  # round robin: one of them to the restarted decode
        phase("used_again_s")
        numbers["after_restart"] = sorted({r["decode_worker"] or "?" for r in after})
        assert reborn in {r["decode_worker"] for r in after}, (
            f"the restarted decode ({reborn}) got neither of 2 requests: {after}")
        numbers["doomed_worker"] = doomed_key
    finally:
        cluster.deregister(aggregated.name)
        if "decode" not in deployment.engines or not deployment.engines["decode"].healthy():
            deployment.restart_role("decode")
        cluster.wait_for_roles({"prefill", "decode"}, timeout_s=60)
        phase("restored_s")
    return numbers
