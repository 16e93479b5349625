"""Runtimes in embedded SQLite mode (no `runtime.databaseSecret`, the chart's default) keep
their state on a PersistentVolumeClaim (`runtime.stateVolume`), so it outlives the pod:
a run drained by a kill switch, whose pod is scaled to zero and replaced after the release
by one with a fresh key, continues from its checkpoint with the same run id, and its
mutating tool call is applied exactly once (the dedupe ledger survived too). The claim is
provisioned and bound on the local cluster, and goes with the Agent."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

from kubernetes import client

from fleetward.devcluster.kube import apply_manifest
from fleetward.devcluster.process import wait_for
from fleetward.llmstandin import StandinServer
from tests.integration.test_killswitch import GROUP, VERSION, engage_as_admin, release_as_two, switch
from tests.integration.test_runtime_operator import SCRIPT, manifests
from tests.support.agents import agent, model_secret, sop, wait_ready
from tests.support.runtime import EventReader, GitHouseTools, HoldingProxy, ensure_topics, produce, user_message

CLAIM = "fw-billing-state"


def runtime_pods(core: client.CoreV1Api, namespace: str) -> list[client.V1Pod]:
    return [
        p
        for p in core.list_namespaced_pod(namespace, label_selector="fleetward.dev/agent=billing").items
        if p.metadata.deletion_timestamp is None
    ]


def bound_volume(core: client.CoreV1Api, namespace: str) -> tuple[client.V1PersistentVolumeClaim, Path]:
    """The Agent's claim once Bound, and the folder of its volume."""
    read = lambda: core.read_namespaced_persistent_volume_claim(CLAIM, namespace)  # noqa: E731
    wait_for(lambda: read().status.phase == "Bound", 60, f"claim {CLAIM} Bound")
    claim = read()
    pv = core.read_persistent_volume(claim.spec.volume_name)
    assert pv.status.phase == "Bound" and pv.spec.claim_ref.uid == claim.metadata.uid
    return claim, Path(pv.spec.host_path.path)


def gone(read) -> bool:
    try:
        read()
        return False
    except client.exceptions.ApiException as e:
        if e.status == 404:
            return True
        raise


def reapply_claim(kubeconfig: Path, claim: client.V1PersistentVolumeClaim, size: str, storage_class: str) -> dict:
    """Apply the claim the way the operator does (its client, its field manager), with a
    size and class other than the live ones, as after a change of the settings."""
    from fleetward.operator.desired.agent import labels
    from fleetward.operator.kube import Kube

    [owner] = claim.metadata.owner_references
    body = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": claim.metadata.name,
            "namespace": claim.metadata.namespace,
            "labels": labels("billing"),
            "ownerReferences": [
                {
                    "apiVersion": owner.api_version,
                    "kind": owner.kind,
                    "name": owner.name,
                    "uid": owner.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": size}},
            "storageClassName": storage_class,
        },
    }

    async def apply() -> dict:
        kube = await Kube.connect(str(kubeconfig))
        try:
            return await kube.apply(body)
        finally:
            await kube.close()

    return asyncio.run(apply())


def test_the_state_claim_is_bound_mounted_and_deleted_with_the_agent(cluster, api, core, fleetward, namespace):
    ns = namespace
    for doc in (model_secret(ns), sop(ns, "refunds", {"domain": "billing"}), agent(ns, "billing")):
        apply_manifest(api, json.dumps(doc), ns)
    wait_ready(api, ns, "billing", timeout=180)

    claim, folder = bound_volume(core, ns)
    assert claim.spec.access_modes == ["ReadWriteOnce"]
    assert claim.spec.storage_class_name == "fleetward-local"  # the cluster's default class
    [owner] = claim.metadata.owner_references
    assert (owner.kind, owner.name) == ("Agent", "billing")
    dep = client.AppsV1Api(api).read_namespaced_deployment("fw-billing", ns)
    assert dep.spec.strategy.type == "Recreate"
    state = next(v for v in dep.spec.template.spec.volumes if v.name == "state")
    assert state.persistent_volume_claim.claim_name == CLAIM
    # The runtime's SQLite file is on the volume, not in the pod.
    wait_for(lambda: (folder / "state.db").exists(), 30, f"state.db in {folder}")
    # A size or class changed in the settings later: the apply is not refused, the claim
    # (and the state on it) stays as it was created.
    for size, storage_class in (("5Gi", "fleetward-local"), ("512Mi", "fleetward-local"), ("1Gi", "other")):
        applied = reapply_claim(cluster.kubeconfig, claim, size, storage_class)
        assert applied["spec"]["resources"]["requests"]["storage"] == "1Gi"
        assert applied["spec"]["storageClassName"] == "fleetward-local"
        assert applied["metadata"]["uid"] == claim.metadata.uid

    client.CustomObjectsApi(api).delete_namespaced_custom_object(GROUP, VERSION, ns, "agents", "billing")
    wait_for(lambda: gone(lambda: core.read_namespaced_persistent_volume_claim(CLAIM, ns)), 90, "the claim deleted")
    wait_for(lambda: gone(lambda: core.read_persistent_volume(claim.spec.volume_name)), 60, "its volume deleted")
    assert not folder.exists()


def test_a_drained_run_continues_from_its_sqlite_checkpoint_after_release_with_its_tool_effect_once(
    api, core, kafka, fleetward, namespace, user_kubeconfigs
):
    """As tests/integration/test_killswitch_runtime.py's PostgreSQL case, with the runtime's
    checkpoints and dedupe ledger in SQLite on the Agent's claim."""
    ns, ks = namespace, f"ks-{namespace}"[:60]
    objs = client.CustomObjectsApi(api)
    ensure_topics(kafka.bootstrap, ["fleetward.events"])
    events = EventReader(kafka.bootstrap)
    try:
        tools = GitHouseTools(None, configmap=(fleetward, api))  # watches the live trust bundle
        proxy = HoldingProxy(tools.port, hold_path="/tools/verify_transaction")
        with StandinServer(SCRIPT) as llm, proxy.start():
            for doc in manifests(ns, llm.url, proxy.port):
                apply_manifest(api, json.dumps(doc), ns)
            agent_obj = wait_ready(api, ns, "billing", timeout=180)
            claim, folder = bound_volume(core, ns)
            [first_pod] = runtime_pods(core, ns)
            with tools:
                session = f"s-{uuid.uuid4().hex[:12]}"
                proxy.hold.set()
                produce(
                    kafka.bootstrap,
                    agent_obj["status"]["requestTopic"],
                    user_message(f"{ns}/billing", session, "I was charged twice: refund txn_1002").to_json(),
                    session,
                )
                assert proxy.held.wait(120), "the verify call never reached the tool service"
                engage_as_admin(objs, ks, ns, "drain drill (SQLite state)")
                try:
                    wait_for(lambda: (switch(objs, ks).get("status") or {}).get("phase") == "Engaged", 30, "Engaged")
                except TimeoutError:
                    raise AssertionError(f"not Engaged: {switch(objs, ks)}") from None
                proxy.hold.clear()
                proxy.release.set()  # the step in flight finishes; the run parks before the refund
                wait_for(lambda: switch(objs, ks)["status"].get("phase") == "Drained", 90, "Drained")
                [result] = switch(objs, ks)["status"]["agents"]
                mine = [r for r in result["runs"] if r["sessionId"] == session]
                assert [r["outcome"] for r in mine] == ["drained"], result
                assert events.wait_for(session, "halted", 30)
                assert not [e for e in tools.effects() if e["tool"] == "issue_refund"]
                # Scaled to zero: the pod is gone, its state stays on the claim.
                wait_for(lambda: not runtime_pods(core, ns), 90, "the runtime pod gone")
                assert (folder / "state.db").exists()

                release_as_two(user_kubeconfigs, ks)
                wait_ready(api, ns, "billing", timeout=180)
                stream = events.wait_for(session, "resolved", 180)
                run_id = stream[0].run_id
                assert {e.run_id for e in stream} == {run_id}, "the run continued, no new run started"
                refunds = [e for e in tools.effects() if e["tool"] == "issue_refund" and e["runId"] == run_id]
                assert len(refunds) == 1, tools.effects()
                assert len([e for e in tools.effects() if e["tool"] == "issue_refund"]) == 1, tools.effects()
            [second_pod] = runtime_pods(core, ns)
            assert second_pod.metadata.uid != first_pod.metadata.uid
            after = core.read_namespaced_persistent_volume_claim(CLAIM, ns)
            assert after.metadata.uid == claim.metadata.uid and after.spec.volume_name == claim.spec.volume_name
    finally:
        events.close()
        try:
            objs.delete_cluster_custom_object(GROUP, VERSION, "killswitches", ks)
        except client.exceptions.ApiException as e:
            print(f"cleanup: {e.status} {e.reason}")
