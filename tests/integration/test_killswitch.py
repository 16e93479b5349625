"""The kill switch against the real cluster, the operator `helm install` put there, its
admission webhook (called by the API server for real) and the three client-certificate
users: alice engages; her own approval is refused; bob alone cannot release; a spoofed
approval is refused; bob and carol release. Credentials are revoked where they are
verified (a watching fleetward.toolkit verifier refuses the agent's token), Secrets are
deleted, the runtime drains and is scaled to zero, and release issues a fresh key."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import pytest
from cryptography.hazmat.primitives import serialization
from kubernetes import client

from fleetward.devcluster.kube import apply_manifest
from fleetward.devcluster.process import wait_for
from fleetward.toolkit import TokenRefused, ToolTokenVerifier, TrustBundle, mint_tool_token
from tests.support.agents import agent, condition, get_agent, model_secret, sop, wait_agent, wait_ready
from tests.support.argocd import evaluate, health_script
from tests.support.dashboards import board, panel_metrics, wait_for_data_in_every_panel

GROUP, VERSION = "fleetward.dev", "v1alpha1"


def fleetward_cli(kubeconfig, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "fleetward.cli.main", *args, "--kubeconfig", str(kubeconfig)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"fleetward {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc


def switch(objs: client.CustomObjectsApi, name: str) -> dict:
    return objs.get_cluster_custom_object(GROUP, VERSION, "killswitches", name)


def signing_key(core: client.CoreV1Api, ns: str, name: str):
    data = core.read_namespaced_secret(f"fw-{name}-credentials", ns).data
    pem = base64.b64decode(data["signing-key.pem"])
    kid = base64.b64decode(data["key-id"]).decode()
    return serialization.load_pem_private_key(pem, password=None), kid


def engage_as_admin(objs: client.CustomObjectsApi, name: str, namespace: str, reason: str, **spec) -> None:
    """Create an engaged KillSwitch covering one namespace (the admin's identity is stamped)."""
    body = {"engaged": True, "reason": reason, "scope": {"namespaces": [namespace]}, **spec}
    objs.create_cluster_custom_object(
        GROUP,
        VERSION,
        "killswitches",
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "KillSwitch", "metadata": {"name": name}, "spec": body},
    )


def secret_exists(core: client.CoreV1Api, ns: str, name: str) -> bool:
    try:
        core.read_namespaced_secret(name, ns)
        return True
    except client.exceptions.ApiException as e:
        if e.status == 404:
            return False
        raise


def release_as_two(user_kubeconfigs, name: str) -> None:
    fleetward_cli(user_kubeconfigs["bob"], "approve", name)
    fleetward_cli(user_kubeconfigs["carol"], "approve", name)
    fleetward_cli(user_kubeconfigs["bob"], "release", name, "--wait", "--timeout", "120")


@pytest.fixture
def objs(api) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


def test_engage_revoke_drain_and_two_person_release(
    api, core, objs, fleetward, namespace, user_kubeconfigs, kubectl, postgres_dsn
):
    ns, name, ks = namespace, "billing", f"ks-{namespace}"[:60]
    apply_manifest(api, json.dumps(model_secret(ns)), ns)
    apply_manifest(api, json.dumps(sop(ns, "refunds", {"domain": "billing"})), ns)
    apply_manifest(api, json.dumps(agent(ns, name)), ns)
    wait_ready(api, ns, name)

    key, kid = signing_key(core, ns, name)
    bundle = TrustBundle.from_configmap(fleetward, api_client=api).start()
    try:
        assert bundle.wait_ready(10), bundle.status()
        verifier = ToolTokenVerifier(bundle)
        token = mint_tool_token(key, kid, f"{ns}/{name}", "issue_refund", "run-1", "idem-1")
        assert verifier.verify(token, "issue_refund").agent == f"{ns}/{name}"

        # alice engages with the CLI; the webhook stamps her identity, not a typed one.
        engaged = fleetward_cli(
            user_kubeconfigs["alice"], "kill", ks, "--reason", "runaway refunds", "--namespace", ns, "--wait"
        )
        assert "Drained" in engaged.stdout, engaged.stdout
        st = switch(objs, ks)["status"]
        assert st["engagedBy"] == "alice" and st["phase"] == "Drained" and st["affectedAgents"] == 1
        assert st["credentialsRevokedAt"] and st["revocationSeconds"] is not None and st["drainSeconds"] is not None
        [result] = st["agents"]
        assert (result["namespace"], result["name"], result["credentialsRevoked"]) == (ns, name, True)
        health, _ = evaluate(health_script("KillSwitch"), switch(objs, ks))  # as Argo CD shows it
        assert health["status"] == "Suspended" and "alice" in health["message"], health
        print(f"revocation {st['revocationSeconds']} s, drain {st['drainSeconds']} s (from the webhook's stamp)")

        # Revoked where verified: the watching verifier refuses the unexpired token.
        def refused() -> bool:
            try:
                verifier.verify(
                    mint_tool_token(key, kid, f"{ns}/{name}", "issue_refund", "run-1", "idem-2"), "issue_refund"
                )
            except TokenRefused:
                return True
            return False

        assert refused()
        # ...and where stored: the key and model-credential Secrets are gone.
        assert not secret_exists(core, ns, f"fw-{name}-credentials")
        assert not secret_exists(core, ns, f"fw-{name}-model")

        halted = wait_agent(
            api, ns, name, lambda a: (a.get("status") or {}).get("phase") == "Halted", 60, "phase Halted"
        )
        assert condition(halted, "Halted")["status"] == "True"
        assert condition(halted, "Halted")["reason"] == "KillSwitchEngaged"
        assert evaluate(health_script("Agent"), halted)[0]["status"] == "Suspended"
        assert ks in condition(halted, "Ready")["message"]
        wait_for(
            lambda: client.AppsV1Api(api).read_namespaced_deployment(f"fw-{name}", ns).spec.replicas == 0,
            30,
            "the runtime scaled to zero",
        )

        # alice cannot approve her own switch; bob alone cannot release it.
        own = fleetward_cli(user_kubeconfigs["alice"], "approve", ks, check=False)
        assert own.returncode != 0 and "cannot approve its release" in own.stderr, own.stderr
        fleetward_cli(user_kubeconfigs["bob"], "approve", ks)
        early = fleetward_cli(user_kubeconfigs["bob"], "release", ks, check=False)
        assert early.returncode != 0 and "two distinct" in early.stderr, early.stderr

        # carol cannot approve in someone else's name.
        def add_approval(value: dict, **kw):
            """Append to spec.approvals as carol, with kubectl and nothing else."""
            op = [{"op": "add", "path": "/spec/approvals/-", "value": value}]
            return kubectl("patch", "killswitch", ks, "--type=json", "-p", json.dumps(op), as_user="carol", **kw)

        spoof = add_approval({"user": "dave"}, check=False)
        assert spoof.returncode != 0 and "'carol'" in spoof.stderr and "'dave'" in spoof.stderr, spoof.stderr

        # An approval written without a user is stamped with the authenticated one (SPEC §2).
        add_approval({"comment": "root cause fixed"})
        stamped = [(a["user"], a.get("comment")) for a in switch(objs, ks)["spec"]["approvals"]]
        assert stamped == [("bob", None), ("carol", "root cause fixed")], stamped
        fleetward_cli(user_kubeconfigs["bob"], "release", ks, "--wait")
        st = switch(objs, ks)["status"]
        assert st["phase"] == "Released" and st["releasedBy"] == ["bob", "carol"]
        assert evaluate(health_script("KillSwitch"), switch(objs, ks))[0]["status"] == "Healthy"

        # Fresh credentials: a new key id; the revoked one never comes back.
        wait_ready(api, ns, name, timeout=120)
        _, new_kid = signing_key(core, ns, name)
        assert new_kid != kid
        assert refused()
        approvals = switch(objs, ks)["spec"]["approvals"]
        assert {a["user"] for a in approvals} == {"bob", "carol"} and all(a.get("approvedAt") for a in approvals)

        # The audit chain (the operator's, in the cluster's PostgreSQL) holds who did what.
        from fleetward.audit import AuditLog

        with AuditLog.open(postgres_dsn, create=False) as audit:
            mine = [r for r in audit.records() if r["target"] == f"killswitch/{ks}"]
            assert [(r["action"], r["actor"]) for r in mine] == [
                ("killswitch.engage", "alice"),
                ("killswitch.approve", "bob"),
                ("killswitch.approve", "carol"),
                ("killswitch.release", "bob,carol"),
            ], mine
            assert mine[0]["details"]["reason"] == "runaway refunds"
            assert audit.verify().ok
    finally:
        bundle.stop()
        objs.delete_cluster_custom_object(GROUP, VERSION, "killswitches", ks)


def test_an_agent_created_under_a_switch_never_runs(api, core, objs, fleetward, namespace, user_kubeconfigs):
    ns, ks = namespace, f"ks-{namespace}"[:60]
    engaged = fleetward_cli(user_kubeconfigs["alice"], "kill", ks, "--reason", "freeze", "--namespace", ns, "--wait")
    # The on-call engineer is told the scope matches nothing yet (a typo would look the same).
    assert f"KillSwitch {ks} covers no Agent now" in engaged.stderr, engaged.stderr
    try:
        apply_manifest(api, json.dumps(model_secret(ns)), ns)
        apply_manifest(api, json.dumps(agent(ns, "late")), ns)
        late = wait_agent(api, ns, "late", lambda a: (a.get("status") or {}).get("phase") == "Halted", 60, "Halted")
        assert condition(late, "CredentialsIssued")["reason"] == "WithheldByKillSwitch"
        assert not secret_exists(core, ns, "fw-late-credentials")
        with pytest.raises(client.exceptions.ApiException) as err:
            client.AppsV1Api(api).read_namespaced_deployment("fw-late", ns)
        assert err.value.status == 404

        # Deleting an engaged switch would release it without approvals: refused.
        with pytest.raises(client.exceptions.ApiException) as err:
            objs.delete_cluster_custom_object(GROUP, VERSION, "killswitches", ks)
        assert "is engaged" in err.value.body

        release_as_two(user_kubeconfigs, ks)
        assert wait_ready(api, ns, "late", timeout=120)["status"]["phase"] == "Ready"
        assert get_agent(api, ns, "late")["status"]["phase"] == "Ready"
    finally:
        objs.delete_cluster_custom_object(GROUP, VERSION, "killswitches", ks)


# Panels of the kill switch dashboard no event of the test below feeds, and why; their
# metrics must still be known to Prometheus from a scrape.
KILL_SWITCH_PANELS_WITHOUT_DATA = {
    "Halted runtime pods": "the switch scales the runtime to zero as soon as it acked the halt",
    "Runs halted and resumed": "no run is in flight when the switch engages",
}


def kill_switch_dashboard_metrics_are_scraped(prometheus) -> None:
    """The metrics of the panels this test cannot feed are exposed by the scraped pods
    (checked while the runtime still runs: a scaled-down runtime is no longer scraped)."""
    names = panel_metrics(board("Fleetward / Kill switch and debug"), KILL_SWITCH_PANELS_WITHOUT_DATA)
    wait_for(lambda: all(prometheus.knows_metric(n) for n in names), 60, f"{sorted(names)} scraped by Prometheus")


def check_kill_switch_dashboard(prometheus, name: str) -> None:
    """SPEC §8: the kill switch dashboard's queries against the dev cluster's Prometheus,
    which scraped the operator, the gateways and the runtime while the switch was engaged."""
    dashboard = board("Fleetward / Kill switch and debug")
    wait_for_data_in_every_panel(prometheus, dashboard, except_=KILL_SWITCH_PANELS_WITHOUT_DATA, timeout=60)
    (engaged,) = [p for p in dashboard["panels"] if p["title"] == "Engaged"]

    def shown() -> dict[str, str]:
        return {r["metric"]["kill_switch"]: r["value"][1] for r in prometheus.query(engaged["targets"][0]["expr"])}

    try:  # the next scrape of the operator after the engage
        wait_for(lambda: shown().get(name) == "1", 30, f"the Engaged panel showing {name}")
    except Exception:
        raise AssertionError(f"the Engaged panel shows {shown()}") from None


def test_gateways_close_halted_sessions_with_4009_and_refuse_new_ones(
    api, core, objs, kafka, fleetward, namespace, user_kubeconfigs, prometheus
):
    import asyncio
    import base64

    import websockets
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    from fleetward.devcluster.process import wait_for
    from tests.gateway_support import mint

    ns, ks = namespace, f"ks-{namespace}"[:60]
    apply_manifest(api, json.dumps(model_secret(ns)), ns)
    apply_manifest(api, json.dumps(agent(ns, "billing")), ns)
    wait_ready(api, ns, "billing")
    gateway = "fleetward-gateway"

    def ready_pods() -> list:
        pods = core.list_namespaced_pod(
            fleetward, label_selector=f"app.kubernetes.io/instance={gateway},app.kubernetes.io/component=gateway"
        ).items
        return [p for p in pods if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]

    wait_for(lambda: len(ready_pods()) >= 1, 120, "a gateway pod Ready")
    kill_switch_dashboard_metrics_are_scraped(prometheus)
    pod_ip = ready_pods()[0].status.pod_ip
    key = base64.b64decode(core.read_namespaced_secret(f"{gateway}-auth", fleetward).data["hs256"]).decode()

    def url(session: str) -> str:
        return f"ws://{pod_ip}:8080/v1/sessions/{session}/ws"

    def headers(session: str) -> dict:
        token = mint(key, session, aud="fleetward-gateway", iss="fleetward", agent=f"{ns}/billing")
        return {"Authorization": f"Bearer {token}"}

    async def connect(session: str):
        return await websockets.connect(url(session), additional_headers=headers(session), open_timeout=10)

    # A token signed with the agent's own key (kid in the trust bundle), as a service acting
    # for the agent would hold: accepted now, refused once the switch revokes the key.
    from tests.gateway_support import mint_agent

    agent_key, kid = signing_key(core, ns, "billing")
    agent_token = mint_agent(agent_key, kid, "halt-a1", agent=f"{ns}/billing", aud="fleetward-gateway", iss="fleetward")

    async def connect_as_agent():
        return await websockets.connect(
            url("halt-a1"), additional_headers={"Authorization": f"Bearer {agent_token}"}, open_timeout=10
        )

    async def main() -> None:
        await (await connect_as_agent()).close()
        ws = await connect("halt-s1")
        try:
            engaged = asyncio.create_task(
                asyncio.to_thread(
                    fleetward_cli, user_kubeconfigs["alice"], "kill", ks, "--reason", "gateway test", "--namespace", ns
                )
            )
            frames = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    frames.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            await engaged
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4009
            assert any(f.get("control") == "halted" for f in frames), frames
            with pytest.raises(InvalidStatus) as refused:
                await connect("halt-s2")
            assert refused.value.response.status_code == 403
            with pytest.raises(InvalidStatus) as revoked:
                await connect_as_agent()
            assert revoked.value.response.status_code == 401  # its key left the trust bundle
        finally:
            await ws.close()

    try:
        asyncio.run(main())
        check_kill_switch_dashboard(prometheus, ks)
        release_as_two(user_kubeconfigs, ks)

        async def after() -> None:
            deadline = asyncio.get_running_loop().time() + 30
            while True:  # the resume order reaches the gateway through Kafka
                try:
                    ws = await connect("halt-s3")
                    await ws.close()
                    return
                except InvalidStatus:
                    assert asyncio.get_running_loop().time() < deadline, "sessions still refused after release"
                    await asyncio.sleep(0.2)

        asyncio.run(after())
    finally:
        objs.delete_cluster_custom_object(GROUP, VERSION, "killswitches", ks)


def test_operator_killed_mid_drain_is_replaced_and_a_silent_runtime_is_stopped_by_force(
    api, core, objs, fleetward, namespace, user_kubeconfigs
):
    """The runtime is frozen (SIGSTOP), so it never acks the drain; while the operator waits
    for it, the operator is SIGKILLed. Its restart finishes the engage: the same engagement
    (engagedAt kept), the frozen pod deleted without grace and named as forced."""
    import os
    import signal

    from fleetward.devcluster.install import NAMESPACE
    from fleetward.devcluster.process import wait_for

    ns, ks = namespace, f"ks-{namespace}"[:60]
    apply_manifest(api, json.dumps(model_secret(ns)), ns)
    apply_manifest(api, json.dumps(agent(ns, "billing")), ns)
    wait_ready(api, ns, "billing")

    def pid(pod) -> int:
        return int(pod.status.container_statuses[0].container_id.removeprefix("podlet://"))

    (runtime,) = [
        p
        for p in core.list_namespaced_pod(ns, label_selector="fleetward.dev/agent=billing").items
        if p.metadata.deletion_timestamp is None
    ]
    operator = core.list_namespaced_pod(
        NAMESPACE, label_selector="app.kubernetes.io/instance=fleetward,app.kubernetes.io/component=operator"
    ).items[0]
    restarts = operator.status.container_statuses[0].restart_count
    os.kill(pid(runtime), signal.SIGSTOP)
    try:
        engage_as_admin(objs, ks, ns, "operator crash drill", drainTimeoutSeconds=15)
        wait_for(lambda: (switch(objs, ks).get("status") or {}).get("phase") == "Engaged", 60, "phase Engaged")
        engaged_at = switch(objs, ks)["status"]["engagedAt"]
        os.kill(pid(operator), signal.SIGKILL)
        wait_for(
            lambda: (switch(objs, ks).get("status") or {}).get("phase") == "Drained", 120, "phase Drained after restart"
        )
        restarted = core.read_namespaced_pod(operator.metadata.name, NAMESPACE)
        assert restarted.status.container_statuses[0].restart_count > restarts
        st = switch(objs, ks)["status"]
        assert st["engagedAt"] == engaged_at and st["engagedBy"]
        [result] = st["agents"]
        assert result["forcedInstances"] == [runtime.metadata.name] and result["drained"] is False
        assert any(r["outcome"] == "forced" and r["instance"] == runtime.metadata.name for r in result["runs"])
        drained = next(c for c in st["conditions"] if c["type"] == "Drained")
        assert drained["reason"] == "Forced" and runtime.metadata.name in drained["message"]
        # Scaled to zero right after the switch reports Drained (that is the order).
        wait_for(
            lambda: client.AppsV1Api(api).read_namespaced_deployment("fw-billing", ns).spec.replicas == 0,
            30,
            "the runtime scaled to zero",
        )
        release_as_two(user_kubeconfigs, ks)
        wait_ready(api, ns, "billing", timeout=120)
    finally:
        try:
            os.kill(pid(runtime), signal.SIGCONT)
        except (ProcessLookupError, ValueError):
            pass
        try:
            objs.delete_cluster_custom_object(GROUP, VERSION, "killswitches", ks)
        except client.exceptions.ApiException as e:
            print(f"cleanup: {e.status} {e.reason}")


def test_engaging_twice_releasing_twice_and_engaging_again_are_defined(
    api, core, objs, fleetward, namespace, user_kubeconfigs, cluster
):
    """docs/killswitch.md: a second engage (an edit while engaged) keeps the engager and
    times and stays drained; a second release changes nothing (no further fresh key); a
    released switch engaged again is a new engagement whose old approvals are dropped."""
    from kubernetes import config

    from fleetward.devcluster.controlplane import ONCALL_GROUP

    ns, name, ks = namespace, "billing", f"ks-{namespace}"[:60]
    as_alice = client.CustomObjectsApi(config.new_client_from_config(str(user_kubeconfigs["alice"])))
    apply_manifest(api, json.dumps(model_secret(ns)), ns)
    apply_manifest(api, json.dumps(agent(ns, name)), ns)
    wait_ready(api, ns, name)

    def settled(phase: str) -> dict:
        def done() -> bool:
            sw = switch(objs, ks)
            st = sw.get("status") or {}
            return st.get("phase") == phase and st.get("observedGeneration") == sw["metadata"]["generation"]

        wait_for(done, 90, f"{ks} {phase} at its latest generation")
        return switch(objs, ks)

    engaged = fleetward_cli(user_kubeconfigs["alice"], "kill", ks, "--reason", "first", "--namespace", ns, "--wait")
    assert "It covers 1 Agent(s) now." in engaged.stdout, engaged.stdout
    try:
        first = settled("Drained")["status"]

        # Engaging twice: an edit of the engaged switch (bob, a new reason) re-asserts it.
        as_bob = client.CustomObjectsApi(config.new_client_from_config(str(user_kubeconfigs["bob"])))
        as_bob.patch_cluster_custom_object(GROUP, VERSION, "killswitches", ks, {"spec": {"reason": "still bad"}})
        again = settled("Drained")["status"]
        assert (again["engagedBy"], again["engagedAt"]) == ("alice", first["engagedAt"]), again
        # The drain's record stays that of the drain (the edit engaged nothing again).
        for field in ("drainedAt", "drainSeconds", "credentialsRevokedAt", "revocationSeconds", "agents"):
            assert again.get(field) == first.get(field), field
        # ...but not its scope or actions: narrowing them would release agents without approvals.
        for change in ({"scope": {"namespaces": ["elsewhere"]}}, {"actions": {"scaleToZero": False}}):
            with pytest.raises(client.exceptions.ApiException) as refused:
                as_bob.patch_cluster_custom_object(GROUP, VERSION, "killswitches", ks, {"spec": change})
            assert refused.value.status in (400, 403, 422) and f"spec.{next(iter(change))}" in refused.value.body
        assert get_agent(api, ns, name)["status"]["phase"] == "Halted"
        assert not secret_exists(core, ns, f"fw-{name}-credentials")

        release_as_two(user_kubeconfigs, ks)
        wait_ready(api, ns, name, timeout=120)
        _, kid = signing_key(core, ns, name)
        released = settled("Released")

        # Releasing twice: nothing to undo, no further key.
        as_bob.patch_cluster_custom_object(GROUP, VERSION, "killswitches", ks, {"spec": {"engaged": False}})
        as_bob.patch_cluster_custom_object(GROUP, VERSION, "killswitches", ks, {"spec": {"reason": "done"}})
        twice = settled("Released")
        assert twice["metadata"]["generation"] > released["metadata"]["generation"]
        assert twice["status"]["releasedBy"] == released["status"]["releasedBy"] == ["bob", "carol"]
        assert signing_key(core, ns, name)[1] == kid
        assert get_agent(api, ns, name)["status"]["phase"] == "Ready"

        # Engaging again: a new engagement; the last release's approvals do not carry over.
        time.sleep(1.1)  # engagedAt has microseconds, but make "later" unmistakable
        as_alice.patch_cluster_custom_object(GROUP, VERSION, "killswitches", ks, {"spec": {"engaged": True}})
        third = settled("Drained")
        assert not third["spec"].get("approvals"), third["spec"]
        assert third["status"]["engagedAt"] > first["engagedAt"]
        assert third["status"]["drainedAt"] > released["status"]["releasedAt"]
        assert "releasedBy" not in third["status"] and "releasedAt" not in third["status"], third["status"]
        assert not secret_exists(core, ns, f"fw-{name}-credentials")
        early = fleetward_cli(user_kubeconfigs["bob"], "release", ks, check=False)
        assert early.returncode != 0 and "two distinct" in early.stderr, early.stderr
        # This time the admin approves as bob and carol (`--as`, `--as-group`, as kubectl
        # does; the group is what gives them RBAC on KillSwitches): the webhook records the
        # impersonated identities.
        admin = cluster.kubeconfig
        fleetward_cli(admin, "approve", ks, "--as", "bob", "--as-group", ONCALL_GROUP, "--as-group", "sre")
        alone = fleetward_cli(admin, "approve", ks, "--as", "carol", check=False)  # without the group
        assert alone.returncode != 0 and 'User "carol" cannot' in alone.stderr, alone.stderr
        fleetward_cli(admin, "approve", ks, "--as", "carol", "--as-group", ONCALL_GROUP)
        approvals = {a["user"]: a for a in switch(objs, ks)["spec"]["approvals"]}
        assert set(approvals) == {"bob", "carol"}, approvals
        assert {ONCALL_GROUP, "sre"} <= set(approvals["bob"]["groups"]), approvals
        fleetward_cli(admin, "release", ks, "--wait", "--timeout", "120")
        wait_ready(api, ns, name, timeout=120)
        assert signing_key(core, ns, name)[1] not in (kid,)
    finally:
        objs.delete_cluster_custom_object(GROUP, VERSION, "killswitches", ks)


def test_kubectl_fleetward_is_a_kubectl_plugin(cluster, objs, fleetward, user_kubeconfigs):
    """`kubectl fleetward ...` runs the same commands through kubectl's plugin lookup."""
    name = "plugin-staged"
    objs.create_cluster_custom_object(
        GROUP,
        VERSION,
        "killswitches",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "KillSwitch",
            "metadata": {"name": name},
            "spec": {"engaged": False},
        },
    )
    try:
        env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
        proc = subprocess.run(
            [str(cluster.bins.kubectl), "fleetward", "status"],  # kubectl passes no flags to plugins
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, "KUBECONFIG": str(user_kubeconfigs["carol"])},
        )
        assert proc.returncode == 0, proc.stderr
        assert name in proc.stdout and "ENGAGED" in proc.stdout.splitlines()[0]
        helped = subprocess.run(
            [str(cluster.bins.kubectl), "fleetward", "kill", "--help"], capture_output=True, text=True, env=env
        )
        assert "usage: kubectl fleetward kill" in helped.stdout, helped.stdout + helped.stderr
    finally:
        objs.delete_cluster_custom_object(GROUP, VERSION, "killswitches", name)
