"""`python -m harness`: build a card, compute its local_dir, resolve it.

    python -m harness card MODEL_DIR --name NAME [--worker-type T] [--block-size N] [--self-host-url BASE]
    python -m harness local-dir CARD_JSON [--cache-root DIR]
    python -m harness resolve CARD_JSON [--cache-root DIR] [--model-path DIR]

Errors print one line naming what was wrong and exit with status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys

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
