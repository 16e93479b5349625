"""A component of the local cluster that dies is reported by name, with its log tail."""

from __future__ import annotations

import os
import signal

import pytest

from fleetward.devcluster.cluster import ClusterInUse, DevCluster
from fleetward.devcluster.process import ComponentFailed, wait_for


def test_a_killed_component_is_named_with_the_tail_of_its_log():
    cluster = DevCluster.create("crash")
    try:
        cluster.start()
        cluster.check()  # all healthy
        with pytest.raises(ClusterInUse):
            DevCluster.create("crash")  # the running cluster's state is protected
        scheduler = next(p for p in cluster.control_plane.processes if p.name == "kube-scheduler")
        os.kill(scheduler.pid, signal.SIGKILL)
        wait_for(lambda: not scheduler.alive(), 10, "scheduler gone")
        with pytest.raises(ComponentFailed) as err:
            cluster.check()
        message = str(err.value)
        assert message.startswith("kube-scheduler exited with code")
        log = cluster.state / "logs" / "kube-scheduler.log"
        assert str(log) in message
        last_line = log.read_text().strip().splitlines()[-1]
        assert message.rstrip().endswith(last_line), "the tail of the component's log follows"
    finally:
        cluster.stop()
