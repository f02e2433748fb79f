"""Run the reference frontend as a process: `python -m harness.frontend --store DIR --port N`.

It watches the store (a directory or etcd) for worker entries, resolves their cards into --cache-root, and serves
the OpenAI API on 127.0.0.1 until interrupted.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import threading

from harness.card import default_cache_root
from harness.discovery import DEFAULT_LEASE_S, open_store
from harness.frontend.server import Frontend


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m harness.frontend", description=__doc__.split("\n")[0])
    p.add_argument("--store", required=True,
                   help="where workers register: a directory (the file store) or etcd://HOST:PORT[/prefix]")
    p.add_argument("--cache-root", default=None, help="metadata cache root (default: $HOME/.cache/dynamo/mdc)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--selection", choices=["round_robin", "kv"], default="round_robin")
    p.add_argument("--protocol", choices=["vllm", "sglang", "shared-storage"], default="vllm")
    p.add_argument("--timeout", type=float, default=120.0, help="engine request timeout, seconds")
    p.add_argument("--allow-remote-media", action="store_true",
                   help="fetch http(s) image URLs in chat requests (off: only data: URLs are read)")
    p.add_argument("--stale-after", type=float, default=DEFAULT_LEASE_S, metavar="SECONDS",
                   help="stop serving the discovered workers when the store has failed to answer for this long "
                        "(default: one worker lease, %(default)s s): a worker may have died unseen meanwhile")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve_until_signalled(Frontend(open_store(args.store), args.cache_root or default_cache_root(), port=args.port,
                                   selection=args.selection, protocol=args.protocol, timeout_s=args.timeout,
                                   allow_remote_media=args.allow_remote_media, stale_after_s=args.stale_after,
                                   after_load=gc.freeze))


def serve_until_signalled(frontend: Frontend) -> None:
    """Start the frontend and serve until SIGTERM or SIGINT. What is loaded at start and with
    each model (transformers, tokenizers, templates; pass `after_load=gc.freeze`) lives as long as
    the process: frozen out of the garbage collector, whose full passes over it paused every
    stream for 90-190 ms at a time (issue 10's bench, C=16 TTFT p99)."""
    frontend.start()
    gc.freeze()
    print(f"frontend listening on {frontend.url}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    frontend.stop()


if __name__ == "__main__":
    main()
