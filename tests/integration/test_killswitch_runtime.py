"""The kill switch against a real runtime the operator deployed: in abort mode, a model
call the LLM stand-in holds open for a minute is cut at once (the stand-in sees the client
go away), the run is reported `aborted` with its session and step in the switch's status,
and the session gets a `halted` event."""

from __future__ import annotations

import json
import uuid
from datetime import datetime

from kubernetes import client

from fleetward.devcluster.kube import apply_manifest
from fleetward.devcluster.process import wait_for
from fleetward.llmstandin import StandinServer
from tests.integration.test_killswitch import GROUP, VERSION, engage_as_admin, fleetward_cli, release_as_two, switch
from tests.support.agents import model_secret, wait_ready
from tests.support.runtime import REFUND_SOP, EventReader, billing_tools, ensure_topics, produce, user_message

HOLD = [{"name": "hold", "match": {"lastRole": "user"}, "holdSeconds": 60, "respond": {"content": "too late"}}]


def _time(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def test_abort_cuts_a_held_model_call_at_once(api, core, kafka, fleetward, namespace, user_kubeconfigs):
    ns, ks = namespace, f"ks-{namespace}"[:60]
    ensure_topics(kafka.bootstrap, ["fleetward.events"])
    events = EventReader(kafka.bootstrap)
    objs = client.CustomObjectsApi(api)
    with StandinServer(HOLD) as llm:
        apply_manifest(api, json.dumps(model_secret(ns)), ns)
        for doc in (
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "SOP",
                "metadata": {"name": "refunds", "namespace": ns, "labels": {"domain": "billing"}},
                "spec": REFUND_SOP,
            },
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "Agent",
                "metadata": {"name": "billing", "namespace": ns},
                "spec": {
                    "role": "specialist",
                    "model": {
                        "name": "scripted",
                        "baseURL": llm.url,
                        "timeoutSeconds": 120,
                        "maxRetries": 0,
                        "credentialsSecretRef": {"name": "llm", "key": "api-key"},
                    },
                    "tools": billing_tools(9),  # never reached: the model call is held
                    "sopSelector": {"matchLabels": {"domain": "billing"}},
                },
            },
        ):
            apply_manifest(api, json.dumps(doc), ns)
        agent = wait_ready(api, ns, "billing", timeout=180)
        session = f"s-{uuid.uuid4().hex[:12]}"
        produce(
            kafka.bootstrap,
            agent["status"]["requestTopic"],
            user_message(f"{ns}/billing", session, "I was charged twice: refund txn_1002").to_json(),
            session,
        )
        try:
            wait_for(lambda: llm.requests(rule="hold"), 120, "the model call reaching the stand-in")
            fleetward_cli(
                user_kubeconfigs["alice"],
                "kill",
                ks,
                "--reason",
                "runaway agent",
                "--namespace",
                ns,
                "--mode",
                "abort",
                "--wait",
            )
            st = switch(objs, ks)["status"]
            wait_for(lambda: llm.requests(rule="hold", outcome="client_aborted"), 10, "the held call cut")
            [held] = llm.requests(rule="hold")
            cut_at = _time(held["receivedAt"]) + held["durationMs"] / 1000
            print(f"held model call cut {cut_at - _time(st['engagedAt']):.3f} s after the engage was accepted")
            [result] = st["agents"]
            aborted = [r for r in result["runs"] if r["sessionId"] == session]
            assert [r["outcome"] for r in aborted] == ["aborted"], result
            assert aborted[0]["step"], aborted
            stream = events.wait_for(session, "halted", 30)
            assert stream[-1].data.to_wire()["killSwitch"] == ks
            release_as_two(user_kubeconfigs, ks)
        finally:
            events.close()
            try:
                objs.delete_cluster_custom_object(GROUP, VERSION, "killswitches", ks)
            except client.exceptions.ApiException as e:
                print(f"cleanup: {e.status} {e.reason}")


def test_a_drained_run_finishes_after_release_with_its_tool_effect_once(
    cluster, api, core, kafka, fleetward, postgres_dsn, user_kubeconfigs
):
    """An installation whose runtimes keep their checkpoints in PostgreSQL (pods come and
    go across a kill switch): a run in the middle of a tool call when the switch engages
    finishes that step, is drained and reported; its pod is scaled to zero; after the
    release the fresh pod (new key) continues the run from its checkpoint and the mutating
    refund is applied exactly once."""
    from fleetward.devcluster.install import helm_install, helm_uninstall, local_values, wait_operator_ready
    from tests.integration.test_runtime_operator import SCRIPT, manifests
    from tests.support.runtime import GitHouseTools, HoldingProxy

    release_name, system, ns = "fw-pg", "scoped-pg-system", "scoped-pg"
    ks = "scoped-pg-stop"
    for name in (system, ns):
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    core.create_namespaced_secret(
        ns, client.V1Secret(metadata=client.V1ObjectMeta(name="fleetward-db"), string_data={"dsn": postgres_dsn})
    )
    values = local_values(
        kafka.bootstrap,
        watchNamespaces=[ns],
        runtime={"databaseSecret": "fleetward-db"},
        gateway={"enabled": False},
    )
    objs = client.CustomObjectsApi(api)
    ensure_topics(kafka.bootstrap, ["fleetward.events"])
    events = EventReader(kafka.bootstrap)

    try:
        helm_install(cluster.bins.helm, cluster.kubeconfig, values, release=release_name, namespace=system)
        wait_operator_ready(api, release=release_name, namespace=system, log_dir=cluster.state / "podlet" / "logs")
        # Ports are picked now, not before the installation started its own processes.
        tools = GitHouseTools(None, configmap=(system, api))  # watches the live trust bundle
        proxy = HoldingProxy(tools.port, hold_path="/tools/verify_transaction")
        with StandinServer(SCRIPT) as llm, proxy.start():
            for doc in manifests(ns, llm.url, proxy.port):
                apply_manifest(api, json.dumps(doc), ns)
            agent = wait_ready(api, ns, "billing", timeout=180)
            with tools:
                session = f"s-{uuid.uuid4().hex[:12]}"
                proxy.hold.set()
                produce(
                    kafka.bootstrap,
                    agent["status"]["requestTopic"],
                    user_message(f"{ns}/billing", session, "I was charged twice: refund txn_1002").to_json(),
                    session,
                )
                assert proxy.held.wait(120), "the verify call never reached the tool service"
                engage_as_admin(objs, ks, ns, "drain drill")
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

                release_as_two(user_kubeconfigs, ks)
                wait_ready(api, ns, "billing", timeout=180)
                stream = events.wait_for(session, "resolved", 180)
                run_id = stream[0].run_id
                assert {e.run_id for e in stream} == {run_id}
                # The pod that halted the run is gone; the one continuing it says so first.
                types = [e.type for e in stream]
                assert types.count("resumed") == 1, types
                assert types.index("halted") < types.index("resumed") < len(types) - 1, types
                refunds = [e for e in tools.effects() if e["tool"] == "issue_refund" and e["runId"] == run_id]
                assert len(refunds) == 1, tools.effects()
    finally:
        events.close()
        try:
            objs.delete_cluster_custom_object(GROUP, VERSION, "killswitches", ks)
        except client.exceptions.ApiException as e:
            print(f"cleanup: {e.status} {e.reason}")
        helm_uninstall(cluster.bins.helm, cluster.kubeconfig, release=release_name, namespace=system)
        for name in (ns, system):
            core.delete_namespace(name)
