"""`python -m harness`: build a card, compute its local_dir, resolve it.

    python -m harness card MODEL_DIR --name NAME [--worker-type T] [--block-size N] [--self-host-url BASE]
    python -m harness local-dir CARD_JSON [--cache-root DIR]
    python -m harness resolve CARD_JSON [--cache-root DIR] [--model-path DIR]
    python -m harness up [--profile cpu] [--model-dir DIR] [--log-dir DIR] [--store etcd://HOST:PORT[/prefix]]
    python -m harness interpose --engine prefill=URL --engine decode=URL [--port-base N]
    python -m harness matrix REPORT.json... [--name LABEL=REPORT.json] [--out-dir DIR]

Errors print one line naming what was wrong and exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from harness.card import ModelCard, WorkerType, default_cache_root
from harness.errors import HarnessError


def _card(args: argparse.Namespace) -> int:
    from harness.worker.card_builder import build_card

    card = build_card(args.model_dir, args.name, worker_type=args.worker_type, block_size=args.block_size,
                      context_length=args.context_length, self_host_url=args.self_host_url,
                      endpoint=args.endpoint)
    print(card.dumps())
    return 0


def _local_dir(args: argparse.Namespace) -> int:
    print(ModelCard.load(args.card_json).local_dir(args.cache_root or default_cache_root()))
    return 0


def _resolve(args: argparse.Namespace) -> int:
    from harness.resolve import Resolver

    resolved = Resolver(args.cache_root, args.model_path).resolve(ModelCard.load(args.card_json))
    print(resolved.local_dir)
    return 0


def _up(args: argparse.Namespace) -> int:
    """Start the embedded deployment, print where everything is, stop it all on Ctrl-C or SIGTERM."""
    from harness.deployment import start_embedded
    from harness.engines.launcher import stderr_progress
    from harness.engines.profiles import PROFILES

    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:  # the random-weight tiny Llama the suites use, generated locally once
        from fixtures.tiny_llama import cached_tiny_llama
        model_dir = cached_tiny_llama()
    deployment = start_embedded(PROFILES[args.profile], model_dir, Path(args.log_dir), sys.executable,
                                progress=stderr_progress, launcher=args.launcher, store=args.store)
    stop = threading.Event()
    # Both set explicitly: a shell starts background jobs with SIGINT ignored, and Ctrl-C must still work.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        print(f"frontend:   {deployment.frontend_url}  (model {deployment.model!r})")
        for role, engine in deployment.engines.items():
            print(f"{role + ':':<11} {engine.url}  (/metrics; log {getattr(engine, 'log_path', '-')})")
        print(f"discovery:  {deployment.discovery}")
        print(f"cache root: {deployment.cache_root}")
        engines = " ".join(f"--engine-url {r}={e.url}" for r, e in deployment.engines.items())
        print(f"check it as a foreign deployment:\n  pytest suites --frontend-url {deployment.frontend_url} "
              f"--model {deployment.model} {engines} --discovery {deployment.discovery} "
              f"--cache-root {deployment.cache_root}")
        print("Ctrl-C stops everything.", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        print("stopping the deployment", file=sys.stderr)
        deployment.stop()
    return 0


def _interpose(args: argparse.Namespace) -> int:
    """Relays in front of a router's engines, for a router started elsewhere; until Ctrl-C or SIGTERM."""
    from harness.engines.external import role_url
    from harness.interposer import Interposer

    relays = []
    for value in args.engine:
        role, url = role_url(value, "--engine", ("prefill", "decode"))
        relays.append(Interposer(role, url, port=args.port_base + 2 * len(relays) if args.port_base else 0,
                                 control_port=args.port_base + 2 * len(relays) + 1 if args.port_base else 0))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        for relay in relays:
            relay.start()
            print(f"{relay.role}: give the router {relay.url}  (relays to {relay.upstream}; control "
                  f"{relay.control_url})")
        options = " ".join(f"--interposed {r.role}={r.control_url} --engine-url {r.role}={r.upstream}" for r in relays)
        print(f"then check the router with:\n  pytest suites --frontend-url ROUTER_URL --model MODEL {options}")
        print("Ctrl-C stops the relays.", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        for relay in relays:
            relay.stop()
    return 0


def _roots(values: list[str]) -> dict[str, Path]:
    roots = {}
    for value in values:
        label, sep, path = value.partition("=")
        if not sep or not label or not path:
            raise HarnessError(f"--root {value!r} must be LABEL=DIR, e.g. vllm=$VLLM_CACHE_ROOT")
        roots[label] = Path(path).expanduser()
    return roots


def _identity(path: str | None) -> dict | None:
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise HarnessError(f"--identity {path}: cannot read a JSON object from it: {exc}") from None


def _artifact(args: argparse.Namespace) -> int:
    from harness.artifacts.install import install
    from harness.artifacts.manifest import IdentityMismatch
    from harness.artifacts.pack import pack
    from harness.artifacts.server import ArtifactServer
    from harness.engines.launcher import stderr_progress

    if args.action == "pack":
        artifact = pack(_roots(args.root), Path(args.out), _identity(args.identity) or {},
                        chunk_size=args.chunk_mib << 20)
        print(artifact.id)
        return 0
    if args.action == "serve":
        server = ArtifactServer(args.dir, port=args.port).start()
        print(f"serving {args.dir} on {server.url}", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
        server.stop()
        return 0
    try:
        done = install(args.source, args.id, _roots(args.root), _identity(args.identity), Path(args.state_dir),
                       progress=stderr_progress)
    except IdentityMismatch as exc:  # not an error: this host starts cold, as it would without the artifact
        print(f"skipped: {exc}")
        return 0
    print(f"{done.status}: {done.files} files, {done.bytes} bytes")
    return 0


def _matrix(args: argparse.Namespace) -> int:
    """Several conformance reports as one table: a row per check, a column per deployment."""
    from harness.matrix import named_sources, write_matrix

    for path in write_matrix(named_sources(args.reports, args.name), args.out_dir):
        print(path)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("card", help="print the card JSON a worker publishes for MODEL_DIR")
    c.add_argument("model_dir")
    c.add_argument("--name", required=True, help="the served model name (display_name)")
    c.add_argument("--worker-type", choices=[w.value for w in WorkerType], default=None)
    c.add_argument("--block-size", type=int, default=16, help="kv_cache_block_size (default 16)")
    c.add_argument("--context-length", type=int, default=None, help="runtime context length")
    c.add_argument("--self-host-url", default=None, help="serve metadata from this base URL (self-host mode)")
    c.add_argument("--endpoint", default="dynamo/backend/generate", help="namespace/component/endpoint")
    c.set_defaults(func=_card)

    cache_help = "metadata cache root (default: $HOME/.cache/dynamo/mdc)"
    ld = sub.add_parser("local-dir", help="print a card's local_dir; touches nothing")
    ld.add_argument("card_json")
    ld.add_argument("--cache-root", default=None, help=cache_help)
    ld.set_defaults(func=_local_dir)

    r = sub.add_parser("resolve", help="resolve a card into the cache and print its local_dir")
    r.add_argument("card_json")
    r.add_argument("--cache-root", default=None, help=cache_help)
    r.add_argument("--model-path", default=None, help="the frontend's own copy of the model (rung 3)")
    r.set_defaults(func=_resolve)

    from harness.engines.profiles import PROFILES

    u = sub.add_parser("up", help="start the embedded deployment (engines, worker side, frontend) until Ctrl-C")
    u.add_argument("--profile", choices=sorted(PROFILES), default="cpu", help="engine launch profile (default cpu)")
    u.add_argument("--model-dir", default=None, help="the model to serve (default: the suites' tiny random Llama)")
    u.add_argument("--log-dir", default="reports/logs", help="engine logs (default reports/logs)")
    u.add_argument("--launcher", choices=["auto", "subprocess", "docker"], default="auto")
    u.add_argument("--store", default=None, metavar="etcd://HOST:PORT[/prefix]",
                   help="register the workers in this etcd (default: a file store in the deployment's workdir)")
    u.set_defaults(func=_up)

    i = sub.add_parser("interpose", help="relays of the suite's own in front of a router's engines: prints the URLs to "
                                         "give the router and the options to give the suites; until Ctrl-C")
    i.add_argument("--engine", action="append", required=True, metavar="ROLE=URL",
                   help="an engine the router sends requests to: prefill=URL or decode=URL (repeatable)")
    i.add_argument("--port-base", type=int, default=0,
                   help="fixed ports from here (relay, control, next relay, ...); default: free ports")
    i.set_defaults(func=_interpose)

    a = sub.add_parser("artifact", help="compile-cache artifacts: pack cache roots, serve them, install them")
    act = a.add_subparsers(dest="action", required=True)
    ap = act.add_parser("pack", help="tar LABEL=DIR roots with a chunked manifest; prints the artifact id")
    ap.add_argument("--root", action="append", required=True, metavar="LABEL=DIR")
    ap.add_argument("--out", required=True, help="directory for <id>.tar and <id>.json")
    ap.add_argument("--identity", default=None, help="JSON file: what must match for reuse (model, engine, ...)")
    ap.add_argument("--chunk-mib", type=int, default=64)
    asv = act.add_parser("serve", help="serve a directory of artifacts over HTTP until Ctrl-C")
    asv.add_argument("--dir", required=True)
    asv.add_argument("--port", type=int, default=0)
    ai = act.add_parser("install", help="install an artifact once per host into LABEL=DIR roots")
    ai.add_argument("--source", required=True, help="the artifact server's URL")
    ai.add_argument("--id", required=True)
    ai.add_argument("--root", action="append", required=True, metavar="LABEL=DIR")
    ai.add_argument("--identity", default=None, help="JSON file: this host's identity (default: accept any)")
    ai.add_argument("--state-dir", required=True, help="where the per-host lock and markers live")
    a.set_defaults(func=_artifact)

    m = sub.add_parser("matrix", help="conformance reports side by side: a row per check, a column per deployment "
                                      "-> DIR/matrix.json and DIR/matrix.md")
    m.add_argument("reports", nargs="*", metavar="REPORT.json", help="conformance.json files (build_report's)")
    m.add_argument("--name", action="append", default=[], metavar="LABEL=REPORT.json",
                   help="label a report's column(s) (repeatable); a report not given positionally is added")
    m.add_argument("--out-dir", default="reports", help="where matrix.json/.md are written (default reports)")
    m.set_defaults(func=_matrix)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (HarnessError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
