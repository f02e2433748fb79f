"""The frontend's card resolver (SPEC §2): rungs -> fetch -> blobs -> local_dir -> harvest."""

from harness.resolve.resolver import Resolved, Resolver, resolve_card

__all__ = ["Resolved", "Resolver", "resolve_card"]
