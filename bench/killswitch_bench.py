"""Benchmark: the kill switch at fleet scale (issue goals: every credential refused within
1 s at p99, drain within 5 s; the seed's targets were 5 s and 30 s).

    .venv/bin/python bench/killswitch_bench.py                      # make bench: 1000 Agents, 50 runtimes, 3 runs
    .venv/bin/python bench/killswitch_bench.py --agents 200 --runs 2 --runtimes 10 --no-write

Everything is real: the local cluster (API server, etcd, controller manager, scheduler,
kwok, the podlet), Kafka, the operator and its admission webhook installed with Helm, the
gateway the operator deploys, and a `fleetward.toolkit` tool service (the GitHouse service,
its own process) that watches the trust bundle through the API server. Two parts:

1. Revocation. N Agents whose runtime pods run on kwok nodes. Per run, a KillSwitch covering
   all of them is created. Before it, every agent's credentials are accepted by both
   verifiers. From the moment the API server accepted the switch (the admission webhook's
   stamp), three clocks:
   - the verifiers' own view: each one's trusted-key gauge (/metrics, polled every 20 ms)
     until it trusts N keys fewer; from then on it refuses every covered credential;
   - a sample of agents probed in a tight loop, a freshly signed token per probe (a tool
     token for the tool service, which refuses a replayed token id; a session token for
     the gateway handshake) until each is refused (tool service: 401 `unknown_key` or
     `revoked`; gateway: 401); per agent, the time its first refusal was received;
   - then one sweep over every agent and both verifiers confirming that all 2N credentials
     are refused (its time is bounded by the probes' own rate on this machine).
   Then two other people release the switch, the operator issues fresh keys and scales
   back, and the next run starts once that rollout is over (every Agent Ready, every
   Deployment rolled out, no pod terminating): each engage meets a settled fleet. The
   kwok pods never answer the halt order, so each drain ends by its timeout
   (`drainTimeoutSeconds`, set short here) and force-deletes them: that drain is not the
   drain measurement.
2. Drain. M Agents with real runtimes (processes on the podlet), each in the middle of a run:
   its model call is in flight, held by a proxy in front of the LLM stand-in, when the
   switch is accepted; the held calls complete `--step-seconds` later (the model still
   answering). Drain time is the switch's `drainSeconds` (from the webhook's stamp to the
   last runtime's ack on control-acks), and how each run ended.

Results: docs/bench/killswitch.json (appended) and the table in docs/bench/killswitch.md.
The cluster runs in .fleetward/ksbench (or $FLEETWARD_STATE) and is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import aiohttp  # noqa: E402
import jwt  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from fleetward.operator.killswitch.scope import ENGAGED_AT  # noqa: E402
from kubernetes import client, config  # noqa: E402
from kwok_floor import ensure_namespace, machine  # noqa: E402
from operator_scale import KWOK_PLACEMENT, count_ready  # noqa: E402
from results import record  # noqa: E402

from fleetward.devcluster.cluster import DevCluster  # noqa: E402
from fleetward.devcluster.install import NAMESPACE, helm_install, local_values, wait_operator_ready  # noqa: E402
from fleetward.devcluster.kube import install_crds  # noqa: E402
from fleetward.devcluster.process import free_port, wait_for  # noqa: E402
from fleetward.llmstandin import StandinServer  # noqa: E402
from fleetward.toolkit.tokens import mint_tool_token  # noqa: E402
from tests.support.runtime import (  # noqa: E402
    REFUND_SOP,
    HoldingProxy,
    billing_tools,
    ensure_topics,
    produce,
    user_message,
)

RESULTS = REPO / "docs" / "bench" / "killswitch.json"
GROUP, VERSION = "fleetward.dev", "v1alpha1"
GATEWAY = "fleetward-gateway"
PROBE_TOOL = "platform_status"  # read-only: a probe that is accepted changes nothing
REFUSED_REASONS = {"unknown_key", "revoked"}
VERIFIERS = ("tools", "gateway")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def stamp_seconds(value: str) -> float:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


# --- the fleet -------------------------------------------------------------------------------


def agent_manifest(namespace: str, name: str, base_url: str, extra: dict[str, Any]) -> dict:
    spec: dict[str, Any] = {
        "role": "specialist",
        "model": {
            "name": "bench",
            "baseURL": base_url,
            "timeoutSeconds": 120,
            "maxRetries": 0,
            "credentialsSecretRef": {"name": "llm", "key": "api-key"},
        },
    }
    spec.update(extra)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Agent",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def create_agents(api: client.ApiClient, namespace: str, names: list[str], base_url: str, extra: dict) -> None:
    from concurrent.futures import ThreadPoolExecutor

    custom = client.CustomObjectsApi(api)
    core = client.CoreV1Api(api)
    ensure_namespace(api, namespace)
    core.create_namespaced_secret(
        namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="llm"), string_data={"api-key": "sk-bench"})
    )

    def create(name: str) -> None:
        custom.create_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            "agents",
            agent_manifest(namespace, name, base_url, extra),
            _preload_content=False,
        ).drain_conn()

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(create, names))


def wait_all_ready(api: client.ApiClient, namespace: str, count: int, timeout: float, what: str) -> float:
    start, last = time.monotonic(), -10.0

    def done() -> bool:
        nonlocal last
        ready = count_ready(api, namespace)
        now = time.monotonic() - start
        if now - last >= 10 or ready == count:
            say(f"  {what}: Ready {ready}/{count} at {now:.0f} s")
            last = now
        return ready == count

    wait_for(done, timeout, f"{count} Agents Ready in {namespace}", interval=1.0)
    return time.monotonic() - start


def wait_rollout_over(api: client.ApiClient, namespace: str, timeout: float) -> float:
    """After a release every runtime Deployment rolls (its config names the fresh key):
    Agents are Ready once the new pods are, while the old pods are still terminating and
    the operator is still writing statuses. The next engage is measured on a settled fleet:
    every Deployment fully rolled out and no pod terminating."""
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    start = time.monotonic()

    def settled() -> bool:
        for d in apps.list_namespaced_deployment(namespace).items:
            st, want = d.status, d.spec.replicas or 0
            if (st.observed_generation or 0) < d.metadata.generation or (st.replicas or 0) != want:
                return False
            if (st.updated_replicas or 0) != want or (st.available_replicas or 0) != want:
                return False
        return not any(p.metadata.deletion_timestamp for p in core.list_namespaced_pod(namespace).items)

    wait_for(settled, timeout, f"the rollout in {namespace} over", interval=2.0)
    return time.monotonic() - start


# --- the switch ------------------------------------------------------------------------------


def engage(objs: client.CustomObjectsApi, name: str, namespace: str, drain_timeout: int) -> dict:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "KillSwitch",
        "metadata": {"name": name},
        "spec": {
            "engaged": True,
            "reason": "kill switch benchmark",
            "scope": {"namespaces": [namespace]},
            "drainTimeoutSeconds": drain_timeout,
        },
    }
    return objs.create_cluster_custom_object(GROUP, VERSION, "killswitches", body)


def get_switch(objs: client.CustomObjectsApi, name: str) -> dict:
    return objs.get_cluster_custom_object(GROUP, VERSION, "killswitches", name)


def release(user_kubeconfigs: dict[str, Path], name: str) -> None:
    """Two people other than the engager approve, one of them releases (their own
    credentials: the webhook takes identities from the request)."""
    for user in ("bob", "carol"):
        as_user = client.CustomObjectsApi(config.new_client_from_config(str(user_kubeconfigs[user])))
        current = as_user.get_cluster_custom_object(GROUP, VERSION, "killswitches", name)
        approvals = [*(current["spec"].get("approvals") or []), {"user": user}]
        as_user.patch_cluster_custom_object(GROUP, VERSION, "killswitches", name, {"spec": {"approvals": approvals}})
    as_bob = client.CustomObjectsApi(config.new_client_from_config(str(user_kubeconfigs["bob"])))
    as_bob.patch_cluster_custom_object(GROUP, VERSION, "killswitches", name, {"spec": {"engaged": False}})


def wait_phase(objs: client.CustomObjectsApi, name: str, phase: str, timeout: float) -> dict:
    seen: list[dict] = []

    def reached() -> bool:
        seen[:] = [get_switch(objs, name)]
        return (seen[0].get("status") or {}).get("phase") == phase

    wait_for(reached, timeout, f"KillSwitch {name} {phase}", interval=0.2)
    return seen[0]


# --- revocation probes -----------------------------------------------------------------------


class Keys:
    """Every agent's signing key, read from the credentials Secrets of one namespace."""

    def __init__(self, core: client.CoreV1Api, namespace: str) -> None:
        self.by_agent: dict[str, tuple[Any, str]] = {}
        for secret in core.list_namespaced_secret(namespace).items:
            name = secret.metadata.name
            if not (name.startswith("fw-") and name.endswith("-credentials")):
                continue
            data = secret.data or {}
            pem = base64.b64decode(data["signing-key.pem"])
            kid = base64.b64decode(data["key-id"]).decode()
            agent = f"{namespace}/{name.removeprefix('fw-').removesuffix('-credentials')}"
            self.by_agent[agent] = (serialization.load_pem_private_key(pem, password=None), kid)


class Prober:
    """Probes both verifiers for every agent with freshly signed tokens (the tool service
    refuses a replayed token id, so every probe mints its own)."""

    def __init__(self, keys: Keys, tools_url: str, gateway_url: str, concurrency: int) -> None:
        self.keys = keys
        self.tools_url = tools_url
        self.gateway_url = gateway_url
        self.concurrency = concurrency
        self.rounds = 0

    def tool_token(self, agent: str) -> str:
        key, kid = self.keys.by_agent[agent]
        return mint_tool_token(key, kid, agent, PROBE_TOOL, f"probe-{uuid.uuid4().hex}", uuid.uuid4().hex, ttl=30)

    def gateway_token(self, agent: str, session: str) -> str:
        key, kid = self.keys.by_agent[agent]
        now = int(time.time())
        claims = {
            "sub": "bench",
            "sid": session,
            "role": "user",
            "agent": agent,
            "exp": now + 60,
            "iat": now,
            "aud": "fleetward-gateway",
            "iss": "fleetward",
        }
        return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid})

    async def probe_tool(self, http: aiohttp.ClientSession, agent: str) -> bool:
        """True: refused for its key. False: accepted (any answer past the token check)."""
        headers = {"Authorization": f"Bearer {self.tool_token(agent)}"}
        async with http.post(f"{self.tools_url}/tools/{PROBE_TOOL}", json={}, headers=headers) as resp:
            if resp.status == 401:
                body = await resp.json()
                if body.get("reason") in REFUSED_REASONS:
                    return True
                raise RuntimeError(f"tool service refused {agent} for another reason: {body}")
            if resp.status >= 500:
                raise RuntimeError(f"tool service answered {resp.status}: {await resp.text()}")
            return False

    async def probe_gateway(self, http: aiohttp.ClientSession, agent: str) -> bool:
        session = f"probe-{uuid.uuid4().hex[:16]}"
        headers = {"Authorization": f"Bearer {self.gateway_token(agent, session)}"}
        try:
            ws = await http.ws_connect(f"{self.gateway_url}/v1/sessions/{session}/ws", headers=headers)
        except aiohttp.WSServerHandshakeError as e:
            if e.status == 401:
                return True
            if e.status == 403:
                return False  # halted (the halt order), but the key itself was accepted
            raise RuntimeError(f"gateway refused {agent} with {e.status}: {e.message}") from e
        await ws.close()
        return False

    async def baseline(self, agents: list[str]) -> None:
        """Before the switch: every token of every agent is accepted by both verifiers."""
        refused = await self.round([(v, a) for a in agents for v in VERIFIERS], lambda *_: None, time.time())
        if refused:
            raise RuntimeError(f"{len(refused)} credentials refused before the switch, e.g. {sorted(refused)[:3]}")

    async def round(self, probes: list[tuple[str, str]], on_refused, t0: float) -> set[tuple[str, str]]:
        """One probe per (verifier, agent), `concurrency` at a time; `on_refused(verifier,
        agent, seconds since t0)` as each refusal arrives."""
        limit = asyncio.Semaphore(self.concurrency)
        refused: set[tuple[str, str]] = set()

        async def one(http: aiohttp.ClientSession, verifier: str, agent: str) -> None:
            async with limit:
                probe = self.probe_tool if verifier == "tools" else self.probe_gateway
                if await probe(http, agent):
                    refused.add((verifier, agent))
                    on_refused(verifier, agent, time.time() - t0)

        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as http:
            await asyncio.gather(*(one(http, v, a) for v, a in probes))
        return refused

    async def until_refused(self, agents: list[str], accepted_at: float, timeout: float) -> dict[str, dict[str, float]]:
        """Seconds from `accepted_at` (epoch) to each agent's first refusal, per verifier."""
        first: dict[str, dict[str, float]] = {v: {} for v in VERIFIERS}
        pending = [(v, a) for a in agents for v in VERIFIERS]
        self.rounds = 0
        self.round_seconds: list[float] = []
        while pending:
            self.rounds += 1
            started = time.monotonic()
            if time.time() - accepted_at > timeout:
                raise RuntimeError(f"{len(pending)} credentials still accepted {timeout:.0f} s after the switch")
            await self.round(pending, lambda v, a, s: first[v].setdefault(a, s), accepted_at)
            self.round_seconds.append(round(time.monotonic() - started, 3))
            pending = [(v, a) for v, a in pending if a not in first[v]]
        return first


class KeyGauges(threading.Thread):
    """Polls both verifiers' trusted-key gauges (/metrics) every `interval` seconds and
    notes when each first trusts `drop` keys fewer than at the start: when the verifier
    itself stopped trusting every revoked key, apart from any probe's round trip."""

    def __init__(self, urls: dict[str, str], drop: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True, name="key-gauges")
        self.urls, self.drop, self.interval = urls, drop, interval
        self.metrics = {"tools": "githouse_trust_bundle_keys", "gateway": "fleetward_gateway_trust_bundle_keys"}
        self.start_keys = {v: self.read(v) for v in urls}
        self.dropped_at: dict[str, float] = {}
        self.stop = threading.Event()

    def read(self, verifier: str) -> float:
        import urllib.request

        with urllib.request.urlopen(self.urls[verifier], timeout=2) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(self.metrics[verifier] + " "):
                    return float(line.split()[1])
        raise RuntimeError(f"{self.urls[verifier]} has no {self.metrics[verifier]}")

    def run(self) -> None:
        while not self.stop.is_set() and len(self.dropped_at) < len(self.urls):
            for v in self.urls:
                if v not in self.dropped_at and self.read(v) <= self.start_keys[v] - self.drop:
                    self.dropped_at[v] = time.time()
            time.sleep(self.interval)


def start_tool_service(kubeconfig: Path, work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = (work / "tools.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetward.toolkit.examples.githouse",
            "--listen",
            f"127.0.0.1:{port}",
            "--trust-bundle-namespace",
            NAMESPACE,
            "--log-level",
            "WARNING",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"tool service exited: {(work / 'tools.log').read_text()[-2000:]}")
        try:
            import urllib.request

            with urllib.request.urlopen(f"{url}/healthz", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    wait_for(up, 60, "the tool service healthy", interval=0.2)
    return proc, url


def gateway_url(core: client.CoreV1Api) -> str:
    def ready_pod():
        pods = core.list_namespaced_pod(
            NAMESPACE, label_selector=f"app.kubernetes.io/instance={GATEWAY},app.kubernetes.io/component=gateway"
        ).items
        ready = [p for p in pods if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]
        return ready[0] if ready else None

    wait_for(lambda: ready_pod() is not None, 180, "a gateway pod Ready")
    pod = ready_pod()
    return f"ws://{pod.status.pod_ip}:8080"


def revocation_part(args, cluster: DevCluster, api, user_kubeconfigs) -> dict[str, Any]:
    core, objs = client.CoreV1Api(api), client.CustomObjectsApi(api)
    ns = "ks-fleet"
    names = [f"a-{i:05d}" for i in range(args.agents)]
    say(f"revocation: applying {len(names)} Agents (runtime pods on kwok nodes)")
    create_agents(api, ns, names, "http://127.0.0.1:9/v1", {"deployment": KWOK_PLACEMENT})
    setup_seconds = wait_all_ready(api, ns, len(names), args.timeout, "fleet")
    tools, tools_url = start_tool_service(cluster.kubeconfig, cluster.state)
    gw_url = gateway_url(core)
    runs = []
    try:
        for i in range(args.runs):
            keys = Keys(core, ns)
            if len(keys.by_agent) != len(names):
                raise RuntimeError(f"{len(keys.by_agent)} credentials Secrets for {len(names)} Agents")
            prober = Prober(keys, tools_url, gw_url, args.concurrency)
            agents = sorted(keys.by_agent)
            # Both verifiers learn new keys through their watches: wait until all are trusted.
            wait_for(
                lambda p=prober, a=agents: asyncio.run(_all_accepted(p, a)),
                120,
                "every fresh key trusted by both verifiers",
            )
            name = f"bench-revoke-{i + 1}"
            say(f"run {i + 1}/{args.runs}: engaging {name} over {len(agents)} agents")
            gauges = KeyGauges(
                {"tools": f"{tools_url}/metrics", "gateway": gw_url.replace("ws://", "http://") + "/metrics"},
                len(agents),
            )
            gauges.start()
            load_at_engage = os.getloadavg()[0]
            created = engage(objs, name, ns, args.drain_timeout)
            answered = time.time()
            accepted_at = stamp_seconds(created["metadata"]["annotations"][ENGAGED_AT])
            # A sample probed in a tight loop (a round of 2 x sample probes is short) times
            # the refusal per agent closely; then one sweep over every agent confirms that
            # every credential is refused (its time is bounded by the probes' own rate).
            sample = random.Random(i).sample(agents, min(args.sample, len(agents)))
            first = asyncio.run(prober.until_refused(sample, accepted_at, 60))
            sample_rounds = list(prober.round_seconds)
            swept = asyncio.run(prober.until_refused(agents, accepted_at, 60))
            gauges.join(10)
            gauges.stop.set()
            tool_s, gw_s = list(first["tools"].values()), list(first["gateway"].values())
            every = max(max(swept["tools"].values()), max(swept["gateway"].values()))
            st = wait_phase(objs, name, "Drained", args.drain_timeout + 300)["status"]
            run = {
                "agents": len(agents),
                "sample": len(sample),
                "sample_tool_service": _stats(tool_s),
                "sample_gateway": _stats(gw_s),
                "sample_probe_round_seconds": _stats(sample_rounds),
                "keys_dropped_s": {v: round(t - accepted_at, 3) for v, t in gauges.dropped_at.items()},
                # The API server's answer to the create, from the stamp: the second webhook
                # call (validating) and the write to etcd.
                "engage_answered_s": round(answered - accepted_at, 3),
                "every_credential_refused_by_sweep_s": round(every, 3),
                "sweep_rounds": prober.rounds,
                "sweep_round_seconds": prober.round_seconds,
                "status_revocation_seconds": st.get("revocationSeconds"),
                "status_drain_seconds_kwok": st.get("drainSeconds"),
                "forced_pods": sum(len(a.get("forcedInstances") or []) for a in st.get("agents") or []),
                "load_average_1m": round(load_at_engage, 2),
            }
            say(
                f"  sample of {len(sample)}: refused by the tool service p50 {run['sample_tool_service']['p50_s']} "
                f"p99 {run['sample_tool_service']['p99_s']} s, by the gateway p50 {run['sample_gateway']['p50_s']} "
                f"p99 {run['sample_gateway']['p99_s']} s; verifiers dropped all keys at {run['keys_dropped_s']}; "
                f"sweep: all {2 * len(agents)} credentials refused by {every:.3f} s; "
                f"status says revoked in {st.get('revocationSeconds')} s"
            )
            runs.append(run)
            release(user_kubeconfigs, name)
            wait_phase(objs, name, "Released", 300)
            if i + 1 < args.runs:  # the next run needs every Agent back, with its fresh key
                run["ready_again_s"] = round(wait_all_ready(api, ns, len(names), args.timeout, "after release"), 1)
                run["rollout_over_after_ready_s"] = round(wait_rollout_over(api, ns, args.timeout), 1)
                say(f"  rollout over {run['rollout_over_after_ready_s']} s after every Agent was Ready")
            objs.delete_cluster_custom_object(GROUP, VERSION, "killswitches", name)
    finally:
        tools.terminate()
        tools.wait(20)

    def over_runs(values: list[float]) -> dict[str, float]:
        return {"p50_s": round(statistics.median(values), 3), "p99_s": round(percentile(values, 0.99), 3)}

    return {
        "agents": args.agents,
        "kwok_nodes": args.nodes,
        "runs": runs,
        "fleet_ready_s": round(setup_seconds, 1),
        # Per run: the moment the last verifier stopped trusting the last covered key.
        "all_keys_dropped_by_verifiers": over_runs([max(r["keys_dropped_s"].values()) for r in runs]),
        # Every sampled agent's refusal, both verifiers, all runs pooled.
        "sample_refusal": over_runs(
            [x for r in runs for k in ("sample_tool_service", "sample_gateway") for x in r[k]["values"]]
        ),
        "every_credential_refused_by_sweep": over_runs([r["every_credential_refused_by_sweep_s"] for r in runs]),
    }


async def _all_accepted(prober: Prober, agents: list[str]) -> bool:
    try:
        await prober.baseline(agents)
        return True
    except RuntimeError as e:
        say(f"  not yet: {e}")
        return False


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "p50_s": round(statistics.median(values), 3),
        "p99_s": round(percentile(values, 0.99), 3),
        "max_s": round(max(values), 3),
        "values": [round(v, 3) for v in values],
    }


# --- drain -----------------------------------------------------------------------------------


def drain_part(args, cluster: DevCluster, api, kafka_bootstrap: str, user_kubeconfigs) -> dict[str, Any]:
    objs = client.CustomObjectsApi(api)
    ns = "ks-drain"
    rules = [{"name": "answer", "match": {"lastRole": "user"}, "respond": {"content": "Done."}}]
    with StandinServer({"rules": rules}) as llm:
        proxy = HoldingProxy(llm.port, hold_path="/chat/completions").start()
        try:
            names = [f"r-{i:03d}" for i in range(args.runtimes)]
            say(f"drain: applying {len(names)} Agents with real runtimes on the podlet")
            # A billing specialist under the refund SOP (tools never reached: the model call
            # is what is in flight), as in the kill switch tests.
            ensure_namespace(api, ns)
            objs.create_namespaced_custom_object(
                GROUP,
                VERSION,
                ns,
                "sops",
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "SOP",
                    "metadata": {"name": "refunds", "labels": {"domain": "billing"}},
                    "spec": REFUND_SOP,
                },
            )
            billing = {"tools": billing_tools(9), "sopSelector": {"matchLabels": {"domain": "billing"}}}
            create_agents(api, ns, names, f"http://127.0.0.1:{proxy.port}/v1", billing)
            ready_s = wait_all_ready(api, ns, len(names), args.timeout, "runtimes")
            ensure_topics(kafka_bootstrap, ["fleetward.events"])
            topics = {
                a["metadata"]["name"]: a["status"]["requestTopic"]
                for a in objs.list_namespaced_custom_object(GROUP, VERSION, ns, "agents")["items"]
            }
            proxy.hold.set()
            for name in names:
                session = f"drain-{name}-{uuid.uuid4().hex[:8]}"
                produce(
                    kafka_bootstrap,
                    topics[name],
                    user_message(f"{ns}/{name}", session, "I was charged twice: refund txn_1002").to_json(),
                    session,
                )
            wait_for(
                lambda: len(llm.requests()) >= len(names),  # answered, and the answers held by the proxy
                120,
                f"{len(names)} model calls in flight",
                interval=0.2,
            )
            say(f"  {len(names)} runs in the middle of their model call; engaging")
            name = "bench-drain"
            engage(objs, name, ns, 30)
            # The in-flight calls need --step-seconds more, as a model still answering would.
            threading.Timer(args.step_seconds, proxy.release.set).start()
            st = wait_phase(objs, name, "Drained", 120)["status"]
            outcomes: dict[str, int] = {}
            for agent in st.get("agents") or []:
                for r in agent.get("runs") or []:
                    outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
                if agent.get("forcedInstances"):
                    outcomes["forced_pods"] = outcomes.get("forced_pods", 0) + len(agent["forcedInstances"])
            say(f"  drained in {st.get('drainSeconds')} s (runs: {outcomes})")
            release(user_kubeconfigs, name)
            wait_phase(objs, name, "Released", 300)
            objs.delete_cluster_custom_object(GROUP, VERSION, "killswitches", name)
            return {
                "runtimes": len(names),
                "runtimes_ready_s": round(ready_s, 1),
                "step_seconds_after_accept": args.step_seconds,
                "drain_seconds": st.get("drainSeconds"),
                "revocation_seconds": st.get("revocationSeconds"),
                "run_outcomes": outcomes,
            }
        finally:
            proxy.stop()
            client.CoreV1Api(api).delete_namespace(ns)


def run(args: argparse.Namespace) -> dict[str, Any]:
    cluster = DevCluster.create("ksbench")
    try:
        cluster.start()
        kafka = cluster.kafka("plain")
        api = cluster.api_client()
        nodes = cluster.add_kwok_nodes(args.nodes) if args.agents else []
        say(f"{len(nodes)} kwok nodes Ready")
        install_crds(api, REPO / "crds")
        # No state claims: the runtime pods run on kwok nodes (nothing to keep), and the
        # numbers stay comparable with the runs before claims existed.
        values = local_values(kafka.bootstrap, runtime={"stateVolume": {"enabled": False}})
        helm_install(cluster.bins.helm, cluster.kubeconfig, values)
        wait_operator_ready(api, log_dir=cluster.state / "podlet" / "logs")
        say("operator running")
        users = cluster.user_kubeconfigs()
        result: dict[str, Any] = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine(),
        }
        if args.runtimes:
            result["drain"] = drain_part(args, cluster, api, kafka.bootstrap, users)
        if args.agents:
            result["revocation"] = revocation_part(args, cluster, api, users)
        result["load_end"] = os.getloadavg()[0]
        return result
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=1000, help="Agents on kwok nodes for revocation (0: skip)")
    parser.add_argument("--nodes", type=int, default=12, help="kwok nodes (110 pods each)")
    parser.add_argument("--runs", type=int, default=3, help="revocation runs (engage, measure, release)")
    parser.add_argument("--runtimes", type=int, default=50, help="Agents with real runtimes for the drain (0: skip)")
    parser.add_argument(
        "--step-seconds", type=float, default=1.0, help="how long the in-flight model calls still take after the switch"
    )
    parser.add_argument("--drain-timeout", type=int, default=5, help="drainTimeoutSeconds of the revocation switches")
    parser.add_argument("--concurrency", type=int, default=64, help="probes in flight at once")
    parser.add_argument("--sample", type=int, default=50, help="agents probed in a tight loop for per-agent times")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for a fleet to be Ready")
    parser.add_argument("--no-write", action="store_true", help="print the result only")
    args = parser.parse_args(argv)
    # SIGTERM ends the run through the `finally` that stops the cluster, not around it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run(args)
    record(result, RESULTS, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
