"""kwok at scale, fast: 200 Deployments on simulated nodes settle quickly and stay Ready.

The slow 1000-Deployment run is bench/kwok_floor.py (docs/bench/kwok-floor.md); this
guards the two things that broke it: kwok must heartbeat its nodes through Leases (or the
node controller marks them NotReady after its 50 s grace period), and the controller
manager must not be held to its default 20 QPS."""

from __future__ import annotations

import datetime
import importlib.util
import sys
from collections.abc import Iterator

import pytest
from kubernetes import client

from fleetward.devcluster.layout import REPO
from fleetward.devcluster.process import wait_for

_spec = importlib.util.spec_from_file_location("kwok_floor", REPO / "bench" / "kwok_floor.py")
assert _spec and _spec.loader
kwok_floor = importlib.util.module_from_spec(_spec)
sys.modules["kwok_floor"] = kwok_floor  # its dataclasses look their module up there
_spec.loader.exec_module(kwok_floor)

DEPLOYMENTS = 200
NODES = 3  # 330 pods of room
# ~8 s here with the controller manager's QPS raised; ~50 s at its default 20 QPS.
SETTLE_SECONDS = 30
STAY_SECONDS = 30


def _renewals(coordination: client.CoordinationV1Api, nodes: list[str]) -> dict[str, datetime.datetime]:
    out = {}
    for name in nodes:
        lease = coordination.read_namespaced_lease(name, "kube-node-lease")
        assert lease.spec.holder_identity, f"Lease {name} is held by nobody"  # kwok holds it under its own id
        assert lease.spec.lease_duration_seconds == 40
        out[name] = lease.spec.renew_time
    return out


@pytest.fixture
def scale_nodes(cluster, core) -> Iterator[list[str]]:
    """kwok nodes of this test only: removed afterwards, so that other tests' pods with
    `nodeSelector: {type: kwok}` do not land on them (their leftover pods are deleted
    with the test's namespace, and by the pod garbage collector once the node is gone)."""
    nodes = cluster.add_kwok_nodes(NODES, prefix="scale-node")
    try:
        yield nodes
    finally:
        for name in nodes:
            core.delete_node(name)


def test_200_deployments_settle_and_stay_ready_with_nodes_heartbeating(scale_nodes, api, namespace):
    nodes = scale_nodes
    coordination = client.CoordinationV1Api(api)
    # kwok keeps a Lease per node, like a kubelet (it manages a node only while holding its Lease)
    wait_for(lambda: _renewals(coordination, nodes), 30, "a kwok-held Lease for every node")

    result = kwok_floor.apply_and_wait_deployments(api, DEPLOYMENTS, namespace, timeout=SETTLE_SECONDS, progress=None)
    assert result.ready_seconds < SETTLE_SECONDS

    before = _renewals(coordination, nodes)
    stay = kwok_floor.watch_stays_ready(api, namespace, STAY_SECONDS, interval=3, progress=None)
    assert stay.stable, stay
    assert stay.nodes >= NODES and stay.samples >= 5

    # The heartbeat is alive, not a leftover of node registration: every Lease was renewed
    # during the window and recently (kwok renews every 40/4 = 10 s).
    after = _renewals(coordination, nodes)
    now = datetime.datetime.now(datetime.UTC)
    for name in nodes:
        assert after[name] > before[name], f"Lease of {name} not renewed in {STAY_SECONDS} s"
        assert (now - after[name]).total_seconds() < 20, f"Lease of {name} last renewed at {after[name]}"
    core = client.CoreV1Api(api)
    for name in nodes:
        ready = next(c for c in core.read_node(name).status.conditions if c.type == "Ready")
        assert ready.status == "True", f"{name}: {ready.reason} {ready.message}"
