"""The gateway as the operator runs it: a two-replica Deployment in the installation
namespace, configured from the Helm values, where a client on each replica receives its
session's events from Kafka."""

from __future__ import annotations

import asyncio
import base64
import json

import websockets
from kubernetes import client

from fleetward.devcluster.process import wait_for
from tests.gateway_support import KafkaWriter, event, mint

GATEWAY = "fleetward-gateway"


def _ready_pods(core, ns) -> list:
    pods = core.list_namespaced_pod(
        ns, label_selector=f"app.kubernetes.io/instance={GATEWAY},app.kubernetes.io/component=gateway"
    ).items
    return [p for p in pods if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]


def test_operator_runs_two_gateway_replicas_that_each_serve_every_session(api, core, kafka, fleetward):
    apps = client.AppsV1Api(api)
    wait_for(
        lambda: apps.list_namespaced_deployment(fleetward, field_selector=f"metadata.name={GATEWAY}").items,
        60,
        "the operator applying the gateway Deployment",
    )
    dep = apps.read_namespaced_deployment(GATEWAY, fleetward)
    assert dep.spec.replicas == 2
    assert {o.manager for o in dep.metadata.managed_fields} >= {"fleetward"}
    env = {e.name: e.value for e in dep.spec.template.spec.containers[0].env if e.value}
    assert env["FLEETWARD_GATEWAY_EVENTS_TOPIC"] == "fleetward.events"
    assert env["FLEETWARD_GATEWAY_KAFKA_BOOTSTRAP"] == kafka.bootstrap
    wait_for(lambda: len(_ready_pods(core, fleetward)) == 2, 120, "two gateway pods Ready")
    pods = _ready_pods(core, fleetward)
    secret = core.read_namespaced_secret(f"{GATEWAY}-auth", fleetward)
    key = base64.b64decode(secret.data["hs256"]).decode()
    session = "deploy-s1"
    token = mint(key, session, aud="fleetward-gateway", iss="fleetward", agent="support/router")
    writer = KafkaWriter(kafka.bootstrap)

    async def main() -> None:
        clients = [
            await websockets.connect(
                f"ws://{p.status.pod_ip}:8080/v1/sessions/{session}/ws",
                additional_headers={"Authorization": f"Bearer {token}"},
                open_timeout=10,
            )
            for p in pods
        ]
        try:
            for seq in range(3):
                writer.send("fleetward.events", session, event(session, seq))
            for ws in clients:
                got = [json.loads(await asyncio.wait_for(ws.recv(), 20)) for _ in range(3)]
                assert [f["event"]["sequence"] for f in got] == [0, 1, 2]
                assert all(f["event"]["sessionId"] == session for f in got)
        finally:
            for ws in clients:
                await ws.close()

    asyncio.run(main())
