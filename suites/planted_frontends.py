"""Planted frontends: a second harness frontend with a planted bug in front of the deployment's
engines or its relays, so that a test of the suite can show a check failing on the bug it names."""

from __future__ import annotations

import os
from typing import Any

from harness.deployment import Deployment


def start_planted(disagg: Deployment, fault: str, workers: list) -> Any:
    """A second harness frontend, with the planted bug `fault`, in front of `workers` (objects with
    name, role and url): the embedded engines, or the relays in front of them."""
    from fixtures.planted_router import planted
    from harness.cluster import Cluster

    cluster = Cluster(disagg.workdir / f"planted-{fault}-{os.urandom(3).hex()}", disagg.cluster.model_dir, disagg.model,
                      block_size=disagg.profile.block_size, timeout_s=disagg.profile.request_timeout_s,
                      protocol=disagg.profile.protocol, router=planted(fault)).start()
    try:
        for worker in workers:
            cluster.register(worker)
        cluster.wait_for_roles({w.role for w in workers})
    except BaseException:
        cluster.stop()
        raise
    return cluster
