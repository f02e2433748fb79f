"""Discovery store faults (SPEC §3), with real engines behind the frontend.

While its store is down a frontend cannot see a worker die, so it may serve from its last view for
at most one lease; when the store is back, its models come back. This needs the power to stop the
deployment's store: the embedded deployment on an etcd this run started (--embedded-store=etcd).
"""

from __future__ import annotations

import pytest

from harness import evidence as ev
from harness.cluster import Cluster
from suites.discovery_checks import check_a_stopped_store_bounds_the_stale_view

pytestmark = [pytest.mark.spec("3"), pytest.mark.engines, pytest.mark.xdist_group("engines"),
              pytest.mark.needs(ev.FRONTEND, ev.STORE_CONTROL)]


def check_on(disagg, frontend_url: str, lease_s: float) -> dict:
    try:
        return check_a_stopped_store_bounds_the_stale_view(frontend_url, disagg.model, lease_s=lease_s,
                                                           stop_store=disagg.stop_store, start_store=disagg.start_store)
    finally:  # whatever the verdict, the deployment's own frontend serves both roles again before the next check
        disagg.cluster.wait_for_roles({"prefill", "decode"}, timeout_s=60)


def test_a_stopped_store_stops_the_frontend_within_one_lease_and_its_return_brings_the_model_back(
        disagg, record_property):
    record_property("numbers", check_on(disagg, disagg.frontend_url, disagg.cluster.lease_s))


@pytest.mark.needs(ev.PLANTED_ROUTER)
def test_a_frontend_that_serves_its_last_view_while_the_store_is_down_is_caught(disagg, record_property):
    planted = Cluster(disagg.workdir / "planted-stale-view", disagg.cluster.model_dir, disagg.model,
                      block_size=disagg.profile.block_size, timeout_s=disagg.profile.request_timeout_s,
                      protocol=disagg.profile.protocol, store=f"{disagg.discovery}-planted-stale-view")
    planted.frontend.watcher.stale_after_s = None  # planted: it never stops serving its last view
    with planted:
        planted.register(disagg.engines["prefill"])
        planted.register(disagg.engines["decode"])
        planted.wait_for_roles({"prefill", "decode"})
        with pytest.raises(AssertionError, match="kept serving from its last view") as caught:
            check_on(disagg, planted.url, planted.lease_s)
    record_property("caught", str(caught.value).splitlines()[0])
