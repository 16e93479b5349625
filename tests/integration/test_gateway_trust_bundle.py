"""The gateway's trust-bundle key source against the local cluster's real API server (SPEC §7,
the kill switch's prerequisite): the gateway watches the trust-bundle ConfigMap with a
ServiceAccount token whose Role allows only get/list/watch of that one ConfigMap. A token
signed by an agent's key is accepted for that agent only; once the key leaves the bundle, the
same unexpired token is refused (401) at the next handshake and the connection it opened is
closed with 4003. The latency from the ConfigMap write to both is printed (measured here)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kubernetes import client
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fleetward.devcluster.services import Kafka
from fleetward.toolkit.bundle import DEFAULT_CONFIGMAP, JWKS_KEY
from fleetward.toolkit.jwks import jwks_document, public_jwk
from tests.gateway_support import GatewayProcess, KafkaWriter, Topics, event, mint_agent

SECRET = "trust-bundle-test-secret-0123456789-abcdef"
ROUTER = "support/router"
BILLING = "support/billing"
SERVICE_ACCOUNT = "gateway"
# Bounds of the waits below (not the measured values, which are printed).
REFUSAL_WAIT = 10.0


class Bundle:
    """Agent keys and the trust-bundle ConfigMap that publishes a chosen set of them."""

    def __init__(self, core: client.CoreV1Api, namespace: str) -> None:
        self.core, self.namespace = core, namespace
        self.keys: dict[str, tuple[Ed25519PrivateKey, str]] = {}
        self.minted: list[str] = []  # every token handed out, to look for in the logs
        self.labels: dict[str, dict[str, str]] = {}
        self.router = self.new_key(ROUTER)
        self.billing = self.new_key(BILLING)

    def new_key(self, agent: str, labels: dict[str, str] | None = None) -> str:
        """A fresh key for `agent`, with a kid in the operator's form `<ns>.<agent>.<random>`."""
        kid = f"{agent.replace('/', '.')}.{secrets.token_hex(8)}"
        self.keys[kid] = (Ed25519PrivateKey.generate(), agent)
        self.labels[kid] = labels or {}
        return kid

    def _data(self, kids: list[str]) -> dict[str, str]:
        entries = [public_jwk(self.keys[k][0].public_key(), k, self.keys[k][1], self.labels[k]) for k in kids]
        return {JWKS_KEY: jwks_document(entries)}

    def create(self, kids: list[str]) -> None:
        body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=DEFAULT_CONFIGMAP), data=self._data(kids))
        self.core.create_namespaced_config_map(self.namespace, body)

    def publish(self, kids: list[str]) -> float:
        """Replace the published keys; the monotonic time the API write returned."""
        self.core.patch_namespaced_config_map(DEFAULT_CONFIGMAP, self.namespace, {"data": self._data(kids)})
        return time.monotonic()

    def token(self, kid: str, session: str, **kw) -> str:
        key, agent = self.keys[kid]
        token = mint_agent(key, kid, session, agent=kw.pop("agent", agent), **kw)
        self.minted.append(token)
        return token


def gateway_identity(
    api: client.ApiClient, core: client.CoreV1Api, namespace: str, directory: Path, *, kill_switches: bool = False
) -> list[str]:
    """A ServiceAccount allowed only get/list/watch of the bundle ConfigMap (and, with
    `kill_switches`, of KillSwitches, as the Helm chart grants the gateway), and the gateway
    flags that use its token instead of a kubeconfig."""
    rbac = client.RbacAuthorizationV1Api(api)
    if kill_switches:
        name = f"{namespace}-gateway-kill-switches"
        rbac.create_cluster_role(
            {
                "metadata": {"name": name},
                "rules": [
                    {"apiGroups": ["fleetward.dev"], "resources": ["killswitches"], "verbs": ["get", "list", "watch"]}
                ],
            }
        )
        rbac.create_cluster_role_binding(
            {
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": namespace}],
            }
        )
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=SERVICE_ACCOUNT))
    )
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "gateway-trust-bundle"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["configmaps"],
                    "resourceNames": [DEFAULT_CONFIGMAP],
                    "verbs": ["get", "list", "watch"],
                }
            ],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "gateway-trust-bundle"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "gateway-trust-bundle"},
            "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": namespace}],
        },
    )
    token = core.create_namespaced_service_account_token(
        SERVICE_ACCOUNT, namespace, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
    ).status.token
    token_file = directory / "sa-token"
    token_file.write_text(token)
    cfg = api.configuration
    return [
        f"--trust-bundle-configmap={DEFAULT_CONFIGMAP}",
        f"--trust-bundle-namespace={namespace}",
        f"--kube-api-url={cfg.host}",
        f"--kube-token-file={token_file}",
        f"--kube-ca-file={cfg.ssl_ca_cert}",
    ]


@pytest.fixture
def topics(kafka: Kafka) -> Topics:
    t = Topics()
    t.create(kafka.bootstrap, [ROUTER, BILLING])
    return t


@pytest.fixture
def bundle(core: client.CoreV1Api, namespace: str) -> Bundle:
    return Bundle(core, namespace)


@pytest.fixture
def gateway(api, core, namespace, kafka: Kafka, topics: Topics, bundle: Bundle, tmp_path) -> Iterator[GatewayProcess]:
    bundle.create([bundle.router, bundle.billing])
    flags = gateway_identity(api, core, namespace, tmp_path)
    gw = GatewayProcess(kafka.bootstrap, topics, SECRET, tmp_path / "gw.log", *flags, instance="gw-bundle")
    gw.start()  # ready means: the trust bundle was listed through the API with that token
    try:
        yield gw
    finally:
        gw.stop()


async def closed_at(ws) -> tuple[int, float]:
    """The close code the server sent on `ws` and when it arrived (monotonic)."""
    try:
        async with asyncio.timeout(REFUSAL_WAIT):
            while True:
                await ws.recv()
    except ConnectionClosed as e:
        return (e.rcvd.code if e.rcvd else 1006), time.monotonic()


def handshake_status(gw: GatewayProcess, session: str, token: str) -> tuple[int, str]:
    """(101, "") when the upgrade succeeds, else (HTTP status, the body's `error`)."""

    async def go() -> tuple[int, str]:
        try:
            async with websockets.connect(
                gw.url(session), additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10
            ):
                return 101, ""
        except InvalidStatus as e:
            return e.response.status_code, json.loads(e.response.body or b"{}").get("error", "")

    return asyncio.run(go())


def test_agent_tokens_are_bound_to_their_agent_and_refused_once_the_key_leaves_the_bundle(
    gateway: GatewayProcess, bundle: Bundle, topics: Topics, kafka: Kafka
):
    gw, router, billing = gateway, bundle.router, bundle.billing
    session = "tb-s1"
    # An agent's key speaks for its own agent, as a user; not for another agent or as a reviewer.
    assert handshake_status(gw, session, bundle.token(router, session)) == (101, "")
    assert handshake_status(gw, session, bundle.token(router, session, agent=BILLING)) == (403, "agent_mismatch")
    assert handshake_status(gw, session, bundle.token(router, session, role="reviewer")) == (403, "agent_role")
    # The HS256 key source still works beside the trust bundle.
    assert handshake_status(gw, session, gw.token(session)) == (101, "")
    assert gw.metric("fleetward_gateway_trust_bundle_keys") == 2

    writer = KafkaWriter(kafka.bootstrap)

    async def main() -> tuple[float, float, int]:
        headers = {"Authorization": f"Bearer {bundle.token(router, session)}"}
        async with (
            websockets.connect(gw.url(session), additional_headers=headers, open_timeout=10) as agent_ws,
            websockets.connect(
                gw.url(session), additional_headers={"Authorization": f"Bearer {gw.token(session)}"}, open_timeout=10
            ) as user_ws,
            websockets.connect(
                gw.url("tb-s2"),
                additional_headers={"Authorization": f"Bearer {bundle.token(billing, 'tb-s2')}"},
                open_timeout=10,
            ) as billing_ws,
        ):
            # The connections work: an event of the session reaches both of its clients.
            await asyncio.to_thread(writer.send, topics.events, session, event(session, 0, agent=ROUTER))
            for ws in (agent_ws, user_ws):
                frame = json.loads(await asyncio.wait_for(ws.recv(), 20))
                assert frame["event"]["sequence"] == 0

            watcher = asyncio.create_task(closed_at(agent_ws))
            # Revoke the router's key: the same, unexpired token must stop working.
            token = bundle.token(router, session)
            written = await asyncio.to_thread(bundle.publish, [billing])
            code, closed = await watcher
            assert code == 4003, f"the revoked key's connection closed with {code}"
            close_latency = closed - written

            refused = None
            deadline = written + REFUSAL_WAIT
            while refused is None and time.monotonic() < deadline:
                status = await asyncio.to_thread(handshake_status, gw, session, token)
                if status[0] != 101:
                    refused = status, time.monotonic() - written
            assert refused is not None, f"the revoked key was still accepted {REFUSAL_WAIT} s after the write"
            (status, refuse_latency) = refused
            assert status == (401, "unknown_key"), status

            # Nobody else is affected: the user's and the other agent's connections stay open.
            await asyncio.to_thread(writer.send, topics.events, session, event(session, 1, agent=ROUTER))
            assert json.loads(await asyncio.wait_for(user_ws.recv(), 20))["event"]["sequence"] == 1
            pong = await billing_ws.ping()
            await asyncio.wait_for(pong, 5)
            return close_latency, refuse_latency, code

    close_latency, refuse_latency, _ = asyncio.run(main())
    print(
        f"\nrevocation after the ConfigMap write returned: open connection closed (4003) in "
        f"{close_latency * 1000:.1f} ms; new handshake refused (401) within {refuse_latency * 1000:.1f} ms"
    )
    assert gw.metric("fleetward_gateway_revoked_closes_total") == 1
    assert gw.metric("fleetward_gateway_closes_total", code="4003") == 1
    assert gw.metric("fleetward_gateway_trust_bundle_keys") == 1
    assert handshake_status(gw, "tb-s2", bundle.token(billing, "tb-s2")) == (101, "")

    # Fresh credentials (a new kid, as on a kill switch's release) are accepted as they appear.
    renewed = bundle.new_key(ROUTER)
    written = bundle.publish([billing, renewed])
    deadline = written + REFUSAL_WAIT
    while handshake_status(gw, session, bundle.token(renewed, session))[0] != 101:
        assert time.monotonic() < deadline, "the new key was not accepted"
    assert gw.proc is not None and gw.proc.poll() is None


def test_a_deleted_bundle_trusts_no_agent_key_and_the_watch_survives_it(
    gateway: GatewayProcess, bundle: Bundle, core: client.CoreV1Api, namespace: str
):
    gw, billing = gateway, bundle.billing
    session = "tb-del"
    assert handshake_status(gw, session, bundle.token(billing, session)) == (101, "")
    core.delete_namespaced_config_map(DEFAULT_CONFIGMAP, namespace)
    deadline = time.monotonic() + REFUSAL_WAIT
    while handshake_status(gw, session, bundle.token(billing, session)) != (401, "unknown_key"):
        assert time.monotonic() < deadline, "keys of a deleted bundle still accepted"
    # Users are not affected, and the gateway stays ready.
    assert handshake_status(gw, session, gw.token(session)) == (101, "")
    assert gw.ready()
    # Re-created: the same watch picks it up.
    bundle.create([billing])
    deadline = time.monotonic() + REFUSAL_WAIT
    while handshake_status(gw, session, bundle.token(billing, session)) != (101, ""):
        assert time.monotonic() < deadline, "the re-created bundle was not picked up"
    logs = gw.logs()
    assert "the ConfigMap does not exist" in logs
    # No token, nor any part of one, in the logs.
    assert not [t for t in bundle.minted if t.split(".")[2] in logs or t.split(".")[1] in logs]


def test_an_engaged_kill_switch_closes_and_refuses_covered_keys_before_the_bundle_changes(
    api, core, namespace, kafka: Kafka, topics: Topics, bundle: Bundle, fleetward, user_kubeconfigs, tmp_path
):
    """The gateway watches KillSwitches itself (the kill switch's fast path): an engaged switch
    whose scope covers an agent (its namespace and labels, as published in the bundle) closes
    that agent's connection with 4003 and refuses its next handshake (401), while the bundle
    ConfigMap is never written; keys outside the scope keep working; after the two-person
    release the key works again. The latencies are printed (timed in bench/killswitch_bench.py)."""
    from tests.integration.test_killswitch import GROUP, VERSION, release_as_two

    agents_ns = f"{namespace}-agents"[:63]
    covered = bundle.new_key(f"{agents_ns}/billing", {"tier": "payments"})
    spared = bundle.new_key(f"{agents_ns}/triage", {"tier": "front"})
    bundle.create([covered, spared])
    flags = gateway_identity(api, core, namespace, tmp_path, kill_switches=True)
    gw = GatewayProcess(kafka.bootstrap, topics, SECRET, tmp_path / "gw.log", *flags, instance="gw-switch")
    gw.start()
    objs = client.CustomObjectsApi(api)
    name = f"gw-{namespace}"[:63]
    rbac = client.RbacAuthorizationV1Api(api)
    try:
        deadline = time.monotonic() + REFUSAL_WAIT
        while gw.metric("fleetward_gateway_kill_switch_watch_up") != 1:
            assert time.monotonic() < deadline, "the gateway never listed the KillSwitches"
            time.sleep(0.05)
        session = "ks-s1"
        assert handshake_status(gw, session, bundle.token(covered, session)) == (101, "")
        version = core.read_namespaced_config_map(DEFAULT_CONFIGMAP, namespace).metadata.resource_version

        async def main() -> tuple[int, float, float]:
            headers = {"Authorization": f"Bearer {bundle.token(covered, session)}"}
            async with websockets.connect(gw.url(session), additional_headers=headers, open_timeout=10) as ws:
                watcher = asyncio.create_task(closed_at(ws))
                spec = {
                    "engaged": True,
                    "reason": "gateway fast path test",
                    "scope": {"namespaces": [agents_ns], "agentSelector": {"matchLabels": {"tier": "payments"}}},
                }
                body = {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "KillSwitch",
                    "metadata": {"name": name},
                    "spec": spec,
                }
                await asyncio.to_thread(objs.create_cluster_custom_object, GROUP, VERSION, "killswitches", body)
                accepted = time.monotonic()
                code, closed = await watcher
                refused_at = None
                while refused_at is None and time.monotonic() < accepted + REFUSAL_WAIT:
                    status = await asyncio.to_thread(handshake_status, gw, session, bundle.token(covered, session))
                    if status != (101, ""):
                        assert status == (401, "unknown_key"), status
                        refused_at = time.monotonic()
                assert refused_at is not None, "the covered key was still accepted"
                return code, closed - accepted, refused_at - accepted

        code, close_latency, refuse_latency = asyncio.run(main())
        print(
            f"\nkill switch seen by the gateway: connection closed ({code}) {close_latency * 1000:.1f} ms and "
            f"handshake refused {refuse_latency * 1000:.1f} ms after the API server accepted the switch"
        )
        assert code == 4003
        assert handshake_status(gw, "ks-s2", bundle.token(spared, "ks-s2")) == (101, ""), "outside the agentSelector"
        assert core.read_namespaced_config_map(DEFAULT_CONFIGMAP, namespace).metadata.resource_version == version
        assert gw.metric("fleetward_gateway_trust_bundle_keys") == 1
        assert gw.metric("fleetward_gateway_trust_bundle_keys_covered_by_kill_switch") == 1

        release_as_two(user_kubeconfigs, name)
        deadline = time.monotonic() + REFUSAL_WAIT
        while handshake_status(gw, session, bundle.token(covered, session)) != (101, ""):
            assert time.monotonic() < deadline, "the key stayed refused after the release"
    finally:
        gw.stop()
        try:
            if objs.get_cluster_custom_object(GROUP, VERSION, "killswitches", name)["spec"].get("engaged"):
                release_as_two(user_kubeconfigs, name)
            objs.delete_cluster_custom_object(GROUP, VERSION, "killswitches", name)
        except client.exceptions.ApiException as e:
            if e.status != 404:
                raise
        rbac.delete_cluster_role_binding(f"{namespace}-gateway-kill-switches")
        rbac.delete_cluster_role(f"{namespace}-gateway-kill-switches")
