"""Pure parts of the podlet and the process supervisor."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace as NS

import pytest

from fleetward.devcluster.podlet.env import expand, field_value
from fleetward.devcluster.podlet.node import IPPool
from fleetward.devcluster.podlet.probes import ProbeState
from fleetward.devcluster.podlet.volumes import write_atomic
from fleetward.devcluster.process import ComponentFailed, ManagedProcess


def test_atomic_writer_swaps_versions_and_removes_stale_names(tmp_path):
    vol = tmp_path / "vol"
    assert write_atomic(vol, {"a": b"1", "dir/b": b"2"}, {"a": 0o600}) is True
    assert (vol / "a").read_bytes() == b"1" and (vol / "dir" / "b").read_bytes() == b"2"
    assert os.readlink(vol / "a") == "..data/a" and (vol / "a").stat().st_mode & 0o777 == 0o600
    first = os.readlink(vol / "..data")
    assert write_atomic(vol, {"a": b"1", "dir/b": b"2"}, {"a": 0o600}) is False  # unchanged: no new version
    assert write_atomic(vol, {"a": b"changed"}, {}) is True
    assert (vol / "a").read_bytes() == b"changed"
    assert not (vol / "dir").exists(), "names gone from the source disappear"
    assert not (vol / first).exists(), "the previous version folder is removed"
    assert sorted(p.name for p in vol.iterdir()) == sorted(["..data", "a", os.readlink(vol / "..data")])


def test_var_expansion_follows_kubernetes_rules():
    env = {"A": "x", "B": "y"}
    assert expand("$(A)-$(B)", env) == "x-y"
    assert expand("$$(A)", env) == "$(A)"  # escaped
    assert expand("$(MISSING)", env) == "$(MISSING)"  # unknown references stay as written


def test_downward_api_fields():
    pod = NS(
        metadata=NS(name="p", namespace="ns", uid="u1", labels={"app": "web"}, annotations={}),
        spec=NS(node_name="podlet", service_account_name="sa"),
        status=NS(pod_ip="127.0.1.9", host_ip="127.0.0.1", pod_ips=[NS(ip="127.0.1.9")]),
    )
    assert field_value(pod, "metadata.name") == "p"
    assert field_value(pod, "status.podIP") == "127.0.1.9"
    assert field_value(pod, "metadata.labels['app']") == "web"
    assert field_value(pod, "spec.nodeName") == "podlet"
    with pytest.raises(Exception, match="unsupported fieldRef"):
        field_value(pod, "spec.nope")


def test_probe_thresholds():
    probe = NS(initial_delay_seconds=0, period_seconds=1, success_threshold=2, failure_threshold=3)
    state = ProbeState(probe)
    assert state.record(True, "", 0) is None  # one success is not enough
    assert state.record(True, "", 1) is True
    assert state.record(False, "", 2) is True  # failures below the threshold do not flip it
    assert state.record(False, "", 3) is True
    assert state.record(False, "", 4) is False


def test_ip_pool_gives_distinct_loopback_addresses_and_reuses_released_ones():
    pool = IPPool()
    a, b = pool.allocate("a"), pool.allocate("b")
    assert a != b and a.startswith("127.0.") and not a.startswith("127.0.0.")
    assert pool.allocate("a") == a

    small = IPPool("127.0.9.0/30")  # two addresses
    x, _ = small.allocate("x"), small.allocate("y")
    with pytest.raises(RuntimeError, match="no pod IPs left"):
        small.allocate("z")
    small.release("x")
    assert small.allocate("z") == x  # released addresses return to the pool (at its end)


def test_a_crashing_component_is_reported_with_its_log_tail(tmp_path):
    proc = ManagedProcess(
        "flaky",
        [sys.executable, "-c", "print('about to fail: bad flag --x'); raise SystemExit(3)"],
        tmp_path / "flaky.log",
    ).start()
    with pytest.raises(ComponentFailed) as err:
        proc.wait_ready(lambda: False, timeout=20)
    assert "flaky exited with code 3" in str(err.value)
    assert "about to fail: bad flag --x" in str(err.value)


def test_a_component_that_never_gets_ready_times_out_with_its_log(tmp_path):
    proc = ManagedProcess(
        "slow",
        [sys.executable, "-c", "import time; print('waiting', flush=True); time.sleep(60)"],
        tmp_path / "slow.log",
    ).start()
    try:
        with pytest.raises(ComponentFailed, match=r"was not ready within 1 s(.|\n)*waiting"):
            proc.wait_ready(lambda: False, timeout=1)
    finally:
        proc.stop()
    assert not proc.alive()


def test_a_second_cluster_with_the_same_name_is_refused(tmp_path, monkeypatch):
    from fleetward.devcluster import cluster as cluster_mod

    monkeypatch.setenv("FLEETWARD_STATE", str(tmp_path))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "marker").write_text("state of the running cluster")
    fd = cluster_mod._lock(tmp_path / "busy.lock", "busy")  # as if another `dev up` held it
    try:
        with pytest.raises(cluster_mod.ClusterInUse, match=rf"'busy' is already running \(pid {os.getpid()}\)"):
            cluster_mod.DevCluster.create("busy")
        assert (tmp_path / "busy" / "marker").exists(), "the running cluster's state was not touched"
    finally:
        os.close(fd)


def test_kafka_cluster_ids_never_look_like_options():
    import base64

    from fleetward.devcluster.services import kafka_cluster_id

    ids = [kafka_cluster_id() for _ in range(5000)]  # about 1 in 64 raw ids starts with '-'
    assert not any(i.startswith("-") for i in ids)
    assert all(len(i) == 22 and len(base64.urlsafe_b64decode(i + "==")) == 16 for i in ids)
    assert len(set(ids)) == len(ids)
