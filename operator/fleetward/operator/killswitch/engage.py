"""Engaging a KillSwitch (SPEC §7), in the order that stops harm soonest:

1. revoke where credentials are verified: every covered key leaves the trust bundle in one
   write (tool services and gateways watch it), and the covered Kafka principals lose
   their SCRAM logins and every ACL except hearing the halt and reporting (their `halted`
   events and drain acks) in one admin request each;
2. publish `halt` on the control topic (runtimes stop taking work, gateways close sessions);
3. reconcile every covered Agent in halted mode (credential Secrets deleted, nothing
   re-issued while the switch covers it);
4. wait for the runtimes' `drained` acks, up to drainTimeoutSeconds; pods that did not ack
   are deleted without grace and named in the status;
5. scale to zero (the Agents' halted reconcile, now that the drain is over).

Each step is idempotent and the status records progress, so an operator killed midway
is replaced by one that finishes the job; revocation is level-based anyway (a covered
Agent never gets a key, whatever woke the reconciler)."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from fleetward.operator import conditions as c
from fleetward.operator.conditions import Cond
from fleetward.operator.context import OperatorContext
from fleetward.operator.desired.agent import AGENT_LABEL
from fleetward.operator.kafka import KafkaUnavailable
from fleetward.operator.killswitch.control import AckBook, new_order, order_agents
from fleetward.operator.killswitch.scope import ENGAGED_AT, ENGAGED_BY, agent_id
from fleetward.operator.kube import KubeError
from fleetward.operator.metrics import KILL_SWITCH_DRAIN_SECONDS, KILL_SWITCH_REVOCATION_SECONDS
from fleetward.operator.reconcile import reporting_access

from fleetward.api.killswitch import DEFAULT_DRAIN_TIMEOUT_SECONDS

log = logging.getLogger("fleetward.operator.killswitch")

DRAINED = "Drained"
CREDENTIALS_REVOKED = "CredentialsRevoked"
ACK_READ_GRACE_SECONDS = 2.0
"""Read past the drain deadline for this long: an ack sent just before it, or (for an
operator that gets there late) every ack already sent, through a consumer that starts cold."""

# Status fields that describe one engagement (cleared when the switch is engaged again).
PER_ENGAGEMENT = (
    "credentialsRevokedAt",
    "revocationSeconds",
    "drainedAt",
    "drainSeconds",
    "agents",
    "releasedBy",
    "releasedAt",
)


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def accepted_at(switch: dict[str, Any]) -> float:
    """When the API server accepted the engage: the webhook's stamp (microseconds), else
    the object's creation time (whole seconds), else now."""
    meta = switch["metadata"]
    return (
        parse_time((meta.get("annotations") or {}).get(ENGAGED_AT))
        or parse_time(meta.get("creationTimestamp"))
        or time.time()
    )


def same_engagement(switch: dict[str, Any]) -> bool:
    """Whether the status records the switch's current engagement (not one released and
    engaged again since, while this operator was not looking: the webhook stamped a new
    time then)."""
    status = switch.get("status") or {}
    recorded = parse_time(status.get("engagedAt"))
    if recorded is None or status.get("phase") not in ("Engaging", "Engaged", "Drained"):
        return False
    stamp = parse_time((switch["metadata"].get("annotations") or {}).get(ENGAGED_AT))
    if stamp is None:
        # Without the webhook's stamp (webhook.enabled: false) a release and a new engage
        # cannot be told from an edit: a changed spec counts as a new engagement.
        return status.get("observedGeneration") == int(switch["metadata"].get("generation") or 1)
    return abs(recorded - stamp) < 0.001


def drain_timeout(switch: dict[str, Any]) -> float:
    return float((switch.get("spec") or {}).get("drainTimeoutSeconds", DEFAULT_DRAIN_TIMEOUT_SECONDS))


def drain_deadline(switch: dict[str, Any]) -> float | None:
    """When the drain must be over (epoch seconds): drainTimeoutSeconds after the engage was
    accepted (SPEC §7: never more than drainTimeoutSeconds). None without the webhook's
    stamp: the creation time would be the only one known, long past for a switch staged
    and engaged later, so the drain is timed from now instead."""
    stamp = parse_time(((switch.get("metadata") or {}).get("annotations") or {}).get(ENGAGED_AT))
    return None if stamp is None else stamp + drain_timeout(switch)


async def _revoke_kafka(ctx: OperatorContext, agents: list[dict[str, Any]]) -> None:
    """SCRAM mode: all covered principals at once (one request per kind of change)."""
    if not ctx.settings.kafka.principals_managed or not agents:
        return
    await ctx.kafka.withdraw_access(
        [reporting_access(ctx, a["metadata"]["namespace"], a["metadata"]["name"]) for a in agents]
    )


async def _running_instances(ctx: OperatorContext, agents: list[dict[str, Any]]) -> dict[str, str]:
    """Runtime pods that may have work in flight: pod name -> namespace/agent."""
    by_ns: dict[str, set[str]] = {}
    for a in agents:
        by_ns.setdefault(a["metadata"]["namespace"], set()).add(a["metadata"]["name"])
    out: dict[str, str] = {}
    for ns, names in by_ns.items():
        pods = await ctx.kube.list(
            "Pod", ns, "app.kubernetes.io/component=runtime,app.kubernetes.io/managed-by=fleetward"
        )
        for pod in pods:
            agent = (pod["metadata"].get("labels") or {}).get(AGENT_LABEL)
            running = (pod.get("status") or {}).get("phase") in ("Running", "Pending")
            if agent in names and running and not pod["metadata"].get("deletionTimestamp"):
                out[pod["metadata"]["name"]] = f"{ns}/{agent}"
    return out


def agent_results(
    agents: list[dict[str, Any]], book: AckBook, instances: dict[str, str], forced: set[str], *, revoked: bool
) -> list[dict[str, Any]]:
    """Per-agent results for the status: runs from the drain acks, forced pods."""
    out = []
    acked = book.of("drained")
    for a in agents:
        ident = agent_id(a)
        runs = []
        for ack in acked:
            if ident in ack.agents or not ack.agents:
                runs += [
                    {
                        "sessionId": r.session_id,
                        "runId": r.run_id,
                        "step": r.step,
                        "outcome": r.outcome,
                        "instance": ack.instance,
                    }
                    for r in ack.runs
                ]
        mine = sorted(i for i, who in instances.items() if who == ident)
        forced_here = sorted(i for i in mine if i in forced)
        for pod in forced_here:
            runs.append({"sessionId": "-", "runId": "-", "step": None, "outcome": "forced", "instance": pod})
        entry: dict[str, Any] = {
            "namespace": a["metadata"]["namespace"],
            "name": a["metadata"]["name"],
            "credentialsRevoked": revoked,
            "drained": not forced_here,
            "runs": runs[:1000],
        }
        if forced_here:
            entry["forcedInstances"] = forced_here
            entry["message"] = (
                f"{len(forced_here)} runtime pod(s) did not ack the drain in time and were stopped by force."
            )
        else:
            entry["message"] = f"{len(mine)} runtime pod(s) drained; {len(runs)} run(s) were in flight."
        out.append(entry)
    return out


async def drain(
    ctx: OperatorContext, switch: dict[str, Any], agents: list[dict[str, Any]], instances: dict[str, str], since: float
) -> tuple[AckBook, set[str], float]:
    """Wait for a `drained` ack from every instance until the drain deadline
    (drainTimeoutSeconds after the engage was accepted); returns the acks, the pods that
    had to be stopped by force, and when the drain was over: the last ack's time; with a
    silent pod, the deadline, or when this operator got to it if that was later (a restart
    mid-drain): the silent pods are deleted right after."""
    meta = switch["metadata"]
    book = AckBook(meta["name"], int(meta.get("generation") or 1))
    deadline = drain_deadline(switch) or time.time() + drain_timeout(switch)
    late = time.time() > deadline
    if instances:
        want = set(instances)
        # The runtimes force their runs in time to ack by the deadline (ControlMessage.
        # drain_wait); the grace reads what was sent up to it.
        wait = max(deadline - time.time(), 0.0) + ACK_READ_GRACE_SECONDS
        await ctx.control.collect_acks(
            book, since=since - 5, done=lambda b: want <= b.instances("drained"), timeout=wait
        )
    forced = set(instances) - book.instances("drained")
    if forced:
        over = time.time() if late else deadline
    else:
        acked = [a.timestamp.timestamp() for a in book.of("drained") if a.instance in instances]
        over = min(time.time(), max([since, *acked]) if acked else deadline)
    for pod in sorted(forced):
        ns = instances[pod].split("/", 1)[0]
        log.warning("runtime pod %s/%s did not ack the drain of %s in time: stopping it", ns, pod, meta["name"])
        try:
            await ctx.kube.delete("Pod", ns, pod, grace_seconds=0)
        except KubeError as e:
            log.warning("deleting pod %s/%s failed: %s", ns, pod, e)
    return book, forced, over


async def write_status(ctx: OperatorContext, switch: dict[str, Any], status: dict[str, Any]) -> None:
    name = switch["metadata"]["name"]
    try:
        await ctx.kube.patch_status("KillSwitch", None, name, status)
    except KubeError as e:
        if e.status != 404:
            raise
    switch["status"] = {**(switch.get("status") or {}), **status}


async def engage(
    ctx: OperatorContext,
    switch: dict[str, Any],
    agents: list[dict[str, Any]],
    reconcile_agents,
) -> dict[str, Any]:
    """Carry out an engaged switch; returns the final status. `reconcile_agents(switch)`
    re-reconciles the covered Agents against the switch as given (status included)."""
    meta, spec = switch["metadata"], switch.get("spec") or {}
    name, gen = meta["name"], int(meta.get("generation") or 1)
    old = dict(switch.get("status") or {})
    same_run = same_engagement(switch)
    t0 = accepted_at(switch)
    actions = spec.get("actions") or {}
    revoke = actions.get("revokeCredentials", True)
    ids = [agent_id(a) for a in agents]
    engaged_by = (meta.get("annotations") or {}).get(ENGAGED_BY) or "unknown"
    base: dict[str, Any] = {
        "engagedBy": engaged_by,
        "engagedAt": old.get("engagedAt") if same_run else rfc3339(t0),
        "affectedAgents": len(agents),
    }
    conds = old.get("conditions")

    # 1. Revoke where verified: one trust-bundle write, one Kafka request per change kind.
    # First of all, before any status write: every round trip before it is time a revoked
    # credential still works.
    status: dict[str, Any] = dict(base)
    kafka_problem = ""
    if revoke:
        await ctx.bundle.revoke(ids)
        # The revoker's thread has usually withdrawn the keys before this handler ran.
        stamp = (meta.get("annotations") or {}).get(ENGAGED_AT) or meta.get("creationTimestamp") or ""
        bundle_done = min(time.time(), ctx.bundle.revoked_for(name, stamp, ids) or float("inf"))
        try:
            await _revoke_kafka(ctx, agents)
        except KafkaUnavailable as e:
            kafka_problem = f"Kafka did not answer ({e}); the agents' Kafka access is withdrawn when it does."
        if not (same_run and old.get("credentialsRevokedAt")):
            # Kafka access is withdrawn here, after the keys: with SCRAM, revoked means both.
            done = time.time() if ctx.settings.kafka.principals_managed else bundle_done
            status["credentialsRevokedAt"] = rfc3339(done)
            status["revocationSeconds"] = round(done - t0, 3)
            KILL_SWITCH_REVOCATION_SECONDS.labels(name).set(done - t0)
            log.info(
                "kill switch %s: credentials of %d agent(s) revoked %.3f s after the engage (trust bundle %.3f s)",
                name,
                len(ids),
                done - t0,
                bundle_done - t0,
            )
    if not same_run:
        conds = c.merge(
            conds,
            [
                Cond(
                    c.READY,
                    False,
                    "Engaging",
                    f"Credentials of {len(agents)} agent(s) revoked; halting them."
                    if revoke
                    else f"Halting {len(agents)} agent(s); their credentials stay (revokeCredentials: false).",
                ),
                Cond(DRAINED, False, "Draining", "The halt is being sent; the runtimes have not drained yet."),
            ],
            gen,
        )
        # A switch engaged again after a release: nothing of the last engagement may pass
        # for this one's (a merge patch keeps what it does not name; None removes it).
        stale = {k: None for k in PER_ENGAGEMENT if k not in status}
        await write_status(ctx, switch, {**stale, **status, "phase": "Engaging", "conditions": conds})
    # 2. Halt order.
    try:
        targets = order_agents(switch, ids)
        if targets is not None:
            await ctx.control.publish(new_order("halt", switch, targets, drain_deadline=drain_deadline(switch)))
    except KafkaUnavailable as e:
        kafka_problem = kafka_problem or f"the halt order could not be published ({e})"
    # 3. Covered Agents in halted mode (Secrets deleted; not scaled yet: the drain comes first).
    await reconcile_agents(switch)
    revoked_msg = (
        f"Keys of {len(ids)} agent(s) withdrawn from the trust bundle"
        + (" and their Kafka access removed" if ctx.settings.kafka.principals_managed else "")
        + f" in {status.get('revocationSeconds', old.get('revocationSeconds'))} s; credential Secrets deleted."
        if revoke
        else "spec.actions.revokeCredentials is false: credentials were left in place."
    )
    conds = c.merge(
        conds,
        [
            Cond(c.READY, False, "Engaged", f"Engaged by {engaged_by}: draining {len(ids)} agent(s)."),
            Cond(CREDENTIALS_REVOKED, bool(revoke), "Revoked" if revoke else "NotRequested", revoked_msg),
        ],
        gen,
    )
    await write_status(ctx, switch, {**status, "phase": "Engaged", "conditions": conds})
    await ctx.audit.engaged(switch, ids)
    if kafka_problem:
        conds = c.merge(
            conds,
            [
                Cond(
                    DRAINED,
                    False,
                    "KafkaUnavailable",
                    f"Credentials are revoked, but {kafka_problem}. The drain starts when Kafka is back; retrying.",
                )
            ],
            gen,
        )
        await write_status(ctx, switch, {"conditions": conds})
        raise KafkaUnavailable(kafka_problem)

    # 4. Drain.
    instances = await _running_instances(ctx, agents) if actions.get("drainQueues", True) else {}
    book, forced, drained_at = await drain(ctx, switch, agents, instances, since=t0)
    drain_seconds = round(drained_at - t0, 3)
    KILL_SWITCH_DRAIN_SECONDS.labels(name).set(drain_seconds)
    results = agent_results(agents, book, instances, forced, revoked=bool(revoke))
    n_runs = sum(len(r["runs"]) for r in results)
    msg = (
        f"{len(instances)} runtime pod(s) of {len(ids)} agent(s) drained in {drain_seconds} s; "
        f"{n_runs} in-flight run(s) halted."
    )
    if forced:
        msg += f" Stopped by force after drainTimeoutSeconds: {', '.join(sorted(forced))}."
    final = {
        "phase": "Drained",
        "observedGeneration": gen,
        "drainedAt": rfc3339(drained_at),
        "drainSeconds": drain_seconds,
        "agents": results,
        "conditions": c.merge(
            conds,
            [
                Cond(c.READY, True, "Engaged", f"Engaged by {engaged_by}: {len(ids)} agent(s) halted. {msg}"),
                Cond(DRAINED, True, "Forced" if forced else "Drained", msg),
            ],
            gen,
        ),
    }
    await write_status(ctx, switch, final)
    # 5. Scale to zero, now that the switch says Drained.
    await reconcile_agents(switch)
    return switch["status"]


async def acknowledge_edit(ctx: OperatorContext, switch: dict[str, Any]) -> None:
    """An edit of a drained, still engaged switch: the webhook and the schema let only its
    reason, approvals, mode and drain timeout change then, none of which has anything left
    to do (the drain is over). The status says the generation was seen and keeps the
    engagement's record (times, per-agent results) as it was."""
    gen = int(switch["metadata"].get("generation") or 1)
    conds = [{**cond, "observedGeneration": gen} for cond in (switch.get("status") or {}).get("conditions") or []]
    await write_status(ctx, switch, {"observedGeneration": gen, "conditions": conds})
