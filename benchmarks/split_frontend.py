"""N reference frontends on one port, one process each: what a multi-process frontend would gain.

Each process is a whole frontend (its own discovery watcher, routing state and metrics), bound
with SO_REUSEPORT, so the kernel spreads the clients' connections over them. The relay-cost bench
runs it as an arm beside the one-process frontend. It is not a way to run the frontend: each
process keeps its own round-robin turns, load counts, KV index and `/metrics`, which the suites'
routing, KV-selection and in-flight checks read as one frontend's (docs/benchmarks.md has what
it gained and what it split, measured).

    python -m benchmarks.split_frontend --processes 2 --store DIR --cache-root DIR --port N
"""

from __future__ import annotations

import argparse
import gc
import signal
import subprocess
import sys
import threading
import time

import httpx


def serve_one(store: str, cache_root: str, port: int) -> None:
    """One of the processes: a frontend sharing the port, until SIGTERM."""
    from harness.discovery import open_store
    from harness.frontend.__main__ import serve_until_signalled
    from harness.frontend.server import Frontend

    serve_until_signalled(Frontend(open_store(store), cache_root, port=port, reuse_port=True, after_load=gc.freeze))


def wait_each_serving(url: str, model: str, timeout_s: float = 60, in_a_row: int = 20) -> None:
    """Until `in_a_row` requests in a row, a connection each (the kernel spreads connections over
    the processes), are served disaggregated: every process has found both workers."""
    deadline, served = time.monotonic() + timeout_s, 0
    while served < in_a_row:
        resp = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": [1, 2, 3], "max_tokens": 2},
                          timeout=10)
        ok = resp.status_code == 200 and resp.headers.get("x-disagg-mode") == "disaggregated"
        served = served + 1 if ok else 0
        assert time.monotonic() < deadline, f"not every frontend process serves {model!r}: {resp.text[:300]}"
        time.sleep(0 if served else 0.2)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.split_frontend", description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--store", required=True, help="where workers register (a directory or etcd://HOST:PORT)")
    p.add_argument("--cache-root", required=True, help="metadata cache root; process i resolves into <it>/process-<i>")
    p.add_argument("--port", type=int, required=True, help="the shared port (not 0: each would get its own)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: serve one frontend
    args = p.parse_args()
    if args.one:
        return serve_one(args.store, args.cache_root, args.port)
    if args.processes < 1:
        p.error(f"--processes must be at least 1, got {args.processes}")
    if args.port <= 0:
        p.error(f"--port must be a fixed port: with {args.port} each process would bind a port of its own")
    # Children in this process group: whoever stops this one by its group stops them all.
    children = [subprocess.Popen([sys.executable, "-m", "benchmarks.split_frontend", "--one", "--store", args.store,
                                  "--cache-root", f"{args.cache_root}/process-{i}", "--port", str(args.port)])
                for i in range(args.processes)]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(0.5):
        if any(c.poll() is not None for c in children):  # one died: the arm is no longer what it says
            break
    for c in children:
        if c.poll() is None:
            c.terminate()
    codes = [c.wait() for c in children]
    sys.exit(0 if stop.is_set() else next((code for code in codes if code), 1))


if __name__ == "__main__":
    main()
