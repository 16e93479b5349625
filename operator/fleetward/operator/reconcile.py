"""Reconciling one Agent, level-based: whatever woke us, compute what should exist from
the spec and the resolved references, apply it, and write the status.

The handlers (handlers/) only decide WHEN this runs; `desired/` decides WHAT should
exist; this module does the I/O in between and turns failures into conditions.
Nothing already applied is taken down because a reference went missing: the agent
keeps running its last good config until the problem is fixed (a runtime without its
Guardrail would be worse than a stale one).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from fleetward.operator import conditions as c
from fleetward.operator.conditions import Cond, Reason
from fleetward.operator.context import OperatorContext
from fleetward.operator.credentials import AgentCredentials, ensure_credentials, revoke_credentials
from fleetward.operator.desired.agent import (
    AgentInputs,
    AgentRef,
    base_name,
    copies_database,
    desired_agent,
    kafka_principal,
    model_secret_name,
)
from fleetward.operator.kafka import AgentAccess, KafkaUnavailable
from fleetward.operator.killswitch.scope import Halt, halts_for
from fleetward.operator.kube import KubeError
from fleetward.operator.metrics import RECONCILE_ERRORS, RECONCILE_SECONDS
from fleetward.operator.resolve import resolve
from fleetward.operator.settings import SecretRef
from pydantic import ValidationError

from fleetward.api.agent import AgentSpec

log = logging.getLogger("fleetward.operator.reconcile")
TOPIC_READY = "TopicReady"


@dataclass
class References:
    """What an Agent may refer to, in its namespace (from the operator's indexes)."""

    sops: list[dict[str, Any]] = field(default_factory=list)
    guardrails: dict[str, dict[str, Any]] = field(default_factory=dict)
    agents: set[str] = field(default_factory=set)
    switches: list[dict[str, Any]] = field(default_factory=list)
    """Every KillSwitch (cluster-scoped); the reconciler picks those that cover the Agent."""


@dataclass
class AgentState:
    """What the last reconcile found, kept so that a Deployment event can update
    availability alone."""

    parts: dict[str, Cond]
    paused: bool
    status: dict[str, Any]
    expected_replicas: int | None
    halted_by: str | None = None
    deployment: tuple[str, int] | None = None
    """(uid, generation) of the runtime Deployment as the reconcile applied or read it: a
    Deployment event carrying an older generation of it is stale and changes nothing."""


def deployment_version(dep: dict[str, Any] | None) -> tuple[str, int] | None:
    meta = (dep or {}).get("metadata") or {}
    if not meta.get("uid"):
        return None
    return str(meta["uid"]), int(meta.get("generation") or 0)


@dataclass
class Outcome:
    status: dict[str, Any]
    retry_after: float | None = None
    """Seconds until a retry, when something transient failed."""
    problem: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase of the work (reads, kafka, bundle, apply, deployment, status), for
    the log: where a slow reconcile's time went."""


def availability(dep: dict[str, Any] | None, *, scaled_down: bool, why_down: str) -> tuple[Cond, int, int]:
    """Available condition, replicas, readyReplicas from the runtime Deployment."""
    if dep is None:
        return Cond(c.AVAILABLE, False, Reason.NOT_DEPLOYED, "The runtime Deployment does not exist yet."), 0, 0
    st = dep.get("status") or {}
    replicas, ready = st.get("replicas", 0), st.get("readyReplicas", 0)
    want = (dep.get("spec") or {}).get("replicas", 1)
    if scaled_down:
        return Cond(c.AVAILABLE, False, Reason.PAUSED, why_down), replicas, ready
    current = st.get("observedGeneration", 0) >= dep["metadata"].get("generation", 0)
    rolled = st.get("updatedReplicas", 0) >= want and replicas <= want
    dep_available = any(x["type"] == "Available" and x["status"] == "True" for x in st.get("conditions") or [])
    if current and rolled and dep_available and ready >= want:
        return (
            Cond(c.AVAILABLE, True, Reason.DEPLOYMENT_AVAILABLE, f"{ready}/{want} runtime pods ready."),
            replicas,
            ready,
        )
    reason = Reason.DEPLOYMENT_PROGRESSING
    for x in st.get("conditions") or []:
        if x["type"] == "Progressing" and x["status"] == "False":
            reason = Reason.DEPLOYMENT_NOT_AVAILABLE
    return (
        Cond(
            c.AVAILABLE,
            False,
            reason,
            f"{ready}/{want} runtime pods ready ({st.get('updatedReplicas', 0)} on the current config).",
        ),
        replicas,
        ready,
    )


async def _model_keys(ctx: OperatorContext, ns: str, spec: AgentSpec) -> tuple[dict[int, bytes], list[Cond]]:
    import base64

    keys: dict[int, bytes] = {}
    problems: list[Cond] = []
    cache: dict[str, dict[str, Any] | None] = {}
    endpoints = [spec.model, *(spec.model.fallbacks or [])]
    for i, endpoint in enumerate(endpoints):
        ref = endpoint.credentials_secret_ref
        if ref is None:
            continue
        where = "spec.model.credentialsSecretRef" if i == 0 else f"spec.model.fallbacks[{i - 1}].credentialsSecretRef"
        if ref.name not in cache:
            cache[ref.name] = await ctx.kube.get("Secret", ns, ref.name)
        secret = cache[ref.name]
        if secret is None:
            problems.append(
                Cond(
                    c.CREDENTIALS_ISSUED,
                    False,
                    Reason.SECRET_NOT_FOUND,
                    f"Secret {ns}/{ref.name} named by {where} does not exist; create it and the "
                    "agent proceeds on its own.",
                )
            )
            continue
        value = (secret.get("data") or {}).get(ref.key)
        if value is None:
            problems.append(
                Cond(
                    c.CREDENTIALS_ISSUED,
                    False,
                    Reason.SECRET_KEY_NOT_FOUND,
                    f"Secret {ns}/{ref.name} has no key {ref.key!r} (named by {where}); "
                    f"it has: {', '.join(sorted(secret.get('data') or {})) or 'no keys'}.",
                )
            )
            continue
        keys[i] = base64.b64decode(value)
    return keys, problems


INSTALLATION_SECRET_TTL_SECONDS = 5.0


async def _installation_secret(ctx: OperatorContext, name: str) -> dict[str, Any] | None:
    """A Secret of the installation namespace, read at most once per TTL whatever the number
    of reconciles asking (they share the read in flight); a failed read is not kept."""
    now = time.monotonic()
    cached = ctx.installation_secrets.get(name)
    if cached is None or now - cached[0] > INSTALLATION_SECRET_TTL_SECONDS:
        read = asyncio.ensure_future(ctx.kube.get("Secret", ctx.settings.namespace, name))
        cached = ctx.installation_secrets[name] = (now, read)
    try:
        return await asyncio.shield(cached[1])
    except KubeError:
        if ctx.installation_secrets.get(name) is cached:
            del ctx.installation_secrets[name]
        raise


async def _installation_value(ctx: OperatorContext, source: SecretRef, what: str) -> tuple[bytes | None, Cond | None]:
    """The value of `source` (a Secret of the installation namespace) to copy into the Agent's
    namespace, or why it cannot be had yet (the Agent waits for it: CredentialsIssued False)."""
    import base64

    ns = ctx.settings.namespace
    secret = await _installation_secret(ctx, source.name)
    if secret is None:
        return None, Cond(
            c.CREDENTIALS_ISSUED,
            False,
            Reason.SECRET_NOT_FOUND,
            f"Secret {ns}/{source.name} with {what} does not exist yet; the agent proceeds once it does.",
        )
    value = (secret.get("data") or {}).get(source.key)
    if value is None:
        return None, Cond(
            c.CREDENTIALS_ISSUED,
            False,
            Reason.SECRET_KEY_NOT_FOUND,
            f"Secret {ns}/{source.name} has no key {source.key!r} with {what}.",
        )
    return base64.b64decode(value), None


async def _database_dsn(ctx: OperatorContext) -> tuple[bytes | None, Cond | None]:
    """The installation's PostgreSQL DSN (runtime.databaseSource) to copy into the Agent's
    namespace: (None, None) when the installation has none to copy."""
    if not copies_database(ctx.settings):
        return None, None
    source = ctx.settings.runtime.database_source
    assert source is not None
    return await _installation_value(ctx, source, "the installation's PostgreSQL DSN (runtime.databaseSource)")


async def _pii_hash_key(ctx: OperatorContext) -> tuple[bytes | None, Cond | None]:
    """The installation's PII hash key (runtime.piiHashKeySource): (None, None) without one."""
    source = ctx.settings.runtime.pii_hash_key_source
    if source is None:
        return None, None
    return await _installation_value(ctx, source, "the installation's PII hash key (runtime.piiHashKeySource)")


def _access(ctx: OperatorContext, ns: str, name: str, spec: AgentSpec) -> AgentAccess:
    topics = ctx.settings.topics
    routed = {topics.request_topic(ns, agent) for agent in (spec.routes or {}).values()}
    if spec.fallback and spec.fallback.agent:
        routed.add(topics.request_topic(ns, spec.fallback.agent))
    return AgentAccess(
        principal=kafka_principal(ns, name),
        read_topics=(topics.request_topic(ns, name), topics.control),
        write_topics=tuple(
            sorted({topics.events, topics.dlq, topics.alerts, topics.audit, topics.control_acks, *routed})
        ),
        group_prefix=f"fleetward.{ns}.{name}",
    )


def reporting_access(ctx: OperatorContext, ns: str, name: str) -> AgentAccess:
    """A halted Agent's Kafka access until its drain is over (AgentAccess.reporting)."""
    topics = ctx.settings.topics
    return AgentAccess.reporting(
        kafka_principal(ns, name),
        f"fleetward.{ns}.{name}",
        control=topics.control,
        events=topics.events,
        acks=topics.control_acks,
    )


def _config_condition(spec: AgentSpec, res, ns: str) -> Cond:
    if res.missing_guardrails:
        return Cond(
            c.CONFIG_RESOLVED,
            False,
            Reason.GUARDRAIL_NOT_FOUND,
            f"Guardrail(s) {', '.join(res.missing_guardrails)} named in spec.guardrailRefs do not exist in "
            f"namespace {ns}. The agent keeps its last applied config until they do.",
        )
    parts = [
        f"{len(res.sops)} SOP(s)"
        + (
            f" ({', '.join(f'{s.name}@{s.version}' for s in res.sops)})"
            if res.sops
            else (" (spec.sopSelector matches no SOP)" if spec.sop_selector else "")
        ),
        f"{len(res.guardrails)} Guardrail(s)",
    ]
    msg = "Resolved " + " and ".join(parts) + "."
    if res.missing_route_agents:
        msg += (
            f" Routes name Agents that do not exist ({', '.join(sorted(set(res.missing_route_agents)))}); "
            "their requests go to the fallback."
        )
    return Cond(c.CONFIG_RESOLVED, True, Reason.RESOLVED, msg)


def is_older_body(newest: tuple[str, int] | None, ref: AgentRef) -> bool:
    """Whether `ref` is an older generation of the same Agent (same uid) than the newest one
    reconciled. A re-created Agent (new uid) starts again at generation 1."""
    return newest is not None and newest[0] == ref.uid and (ref.generation or 0) < newest[1]


async def reconcile_agent(
    ctx: OperatorContext, body: dict[str, Any], refs: References, *, skip_unchanged: bool = False
) -> Outcome:
    """`skip_unchanged`: when this process applied exactly these objects for this Agent
    already, write nothing but the status (Agent create/update handlers; see
    OperatorContext.applied)."""
    started = time.monotonic()
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    ref = AgentRef(ns, name, meta["uid"], meta.get("generation"))
    # The Agent's lock first, then a slot: several wake-ups of one Agent must not hold
    # slots other Agents need while they wait for each other.
    async with ctx.locks[(ns, name)], ctx.reconcile_slots:
        waited = time.monotonic() - started
        if meta["uid"] in ctx.deleted or meta.get("deletionTimestamp"):
            # Being deleted: a reconcile that queued up before the delete handler must not
            # publish the key, topic or Kafka user the cleanup just removed.
            return Outcome(dict(body.get("status") or {}), problem="being deleted")
        if is_older_body(ctx.reconciled_generation.get((ns, name)), ref):
            current = await ctx.kube.get("Agent", ns, name)
            if current is None or current["metadata"]["uid"] != ref.uid or current["metadata"].get("deletionTimestamp"):
                return Outcome(dict(body.get("status") or {}), problem="being deleted")
            body, meta = current, current["metadata"]
            ref = AgentRef(ns, name, meta["uid"], meta.get("generation"))
        ctx.reconciled_generation[(ns, name)] = (ref.uid, ref.generation or 0)
        try:
            outcome = await _reconcile(ctx, ref, body, refs, skip_unchanged=skip_unchanged)
        except Exception:
            RECONCILE_SECONDS.labels("Agent", "error").observe(time.monotonic() - started)
            RECONCILE_ERRORS.labels("Agent", "Exception").inc()
            raise
    result = "retry" if outcome.retry_after else "ok"
    elapsed = time.monotonic() - started
    RECONCILE_SECONDS.labels("Agent", result).observe(elapsed)
    log.info(
        "reconciled Agent %s/%s in %.4f s (waited %.4f s for a slot): %s%s; %s",
        ns,
        name,
        elapsed - waited,
        waited,
        outcome.status.get("phase"),
        f" (retrying: {outcome.problem})" if outcome.problem else "",
        " ".join(f"{k}={v}" for k, v in outcome.timings.items()),
    )
    return outcome


async def _timed(timings: dict[str, float], phase: str, aw: Any) -> Any:
    started = time.monotonic()
    try:
        return await aw
    finally:
        timings[phase] = round(time.monotonic() - started, 3)


async def _all(*aws) -> list:
    """gather that lets every call finish before raising the first error, so nothing of a
    failed reconcile is still running when the next one (or the cleanup) starts."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


async def _nothing() -> None:
    return None


class _KeyNotPublished(Exception):
    """The trust-bundle write of the agent's key failed (its CredentialsIssued says so)."""


class Applied(NamedTuple):
    config_hash: str | None
    problem: str
    """What failed ("" when nothing did)."""
    deployment: dict[str, Any] | None
    """The Deployment as applied; None when nothing was applied this time."""
    key_published: bool = True
    """False when the problem is the trust-bundle write of the agent's key."""


async def _keep(old_status: dict[str, Any]) -> Applied:
    """Nothing is applied (a reference or credential is missing): the last good config stays."""
    return Applied(old_status.get("configHash"), "", None)


async def _ensure_principal(ctx: OperatorContext, spec: AgentSpec, ref: AgentRef, creds: AgentCredentials) -> str:
    """SCRAM mode: the agent's Kafka user and ACLs. Returns a problem, or "" when done."""
    if not ctx.settings.kafka.principals_managed:
        return ""
    try:
        await ctx.kafka.ensure_principal(creds.kafka_username, creds.kafka_password)
        await ctx.kafka.set_acls(_access(ctx, ref.namespace, ref.name, spec))
    except KafkaUnavailable as e:
        return f"Could not create the agent's Kafka user and ACLs: {e}. Retrying with backoff."
    return ""


async def _ensure_topic(ctx: OperatorContext, topic: str) -> str:
    try:
        await ctx.kafka.ensure_topics([topic], ctx.settings.kafka.request_topic_partitions)
    except KafkaUnavailable as e:
        return f"Could not create request topic {topic}: {e}. Retrying with backoff."
    return ""


async def _publish_key(ctx: OperatorContext, ref: AgentRef, creds: AgentCredentials) -> None:
    try:
        await ctx.bundle.publish(f"{ref.namespace}/{ref.name}", creds.jwk)
    except Exception as e:  # whatever the bundle thread raised: the key is not trusted yet
        raise _KeyNotPublished(str(e)) from e


async def _apply(
    ctx,
    ref: AgentRef,
    spec: AgentSpec,
    res,
    creds: AgentCredentials,
    model_keys: dict[int, bytes],
    database_dsn: bytes | None,
    *,
    pii_hash_key: bytes | None = None,
    applied_before: bool,
    skip_unchanged: bool,
    timings: dict[str, float],
) -> Applied:
    """Apply the desired objects; returns (config hash, problem or "", the applied Deployment).

    Objects the spec no longer wants (an HPA, a state claim) are deleted only for an Agent
    reconciled before (it has a status): a new one has none, and at 1000 new Agents those
    deletes are a thousand API calls that find nothing."""
    inputs = AgentInputs(
        ref=ref,
        spec=spec,
        settings=ctx.settings,
        sops=res.sops,
        guardrails=res.guardrails,
        key_id=creds.key_id,
        kafka_username=creds.kafka_username,
        model_keys=model_keys,
        database_dsn=database_dsn,
        pii_hash_key=pii_hash_key,
    )
    desired = desired_agent(inputs)
    key = (ref.namespace, ref.name)
    fingerprint = hashlib.sha256(
        json.dumps([desired.objects, desired.absent, creds.jwk], sort_keys=True).encode()
    ).hexdigest()
    if skip_unchanged and ctx.applied.get(key) == (ref.uid, fingerprint):
        timings["unchanged"] = 0.0
        return Applied(desired.config.config_hash, "", None)
    ctx.applied.pop(key, None)
    *supporting, deployment = [o for o in desired.objects if o["kind"] != "HorizontalPodAutoscaler"]
    hpa = [o for o in desired.objects if o["kind"] == "HorizontalPodAutoscaler"]
    try:
        # The key is trusted before any pod can mint a token with it, and what the pods
        # mount exists before the Deployment that mounts it.
        await _all(
            _timed(timings, "bundle", _publish_key(ctx, ref, creds)),
            *(_timed(timings, o["kind"], ctx.kube.apply(o)) for o in supporting),
        )
        applied = await _timed(timings, "deployment", ctx.kube.apply(deployment))
        absent = desired.absent if applied_before else []
        await _all(*(ctx.kube.apply(o) for o in hpa), *(ctx.kube.delete(k, ref.namespace, n) for k, n in absent))
    except _KeyNotPublished as e:
        why = f"Publishing signing key {creds.key_id} in the trust bundle failed: {e}. Retrying with backoff."
        return Applied(None, why, None, key_published=False)
    except KubeError as e:
        return Applied(None, f"Applying the agent's objects failed: {e}. Retrying with backoff.", None)
    ctx.applied[key] = (ref.uid, fingerprint)
    return Applied(desired.config.config_hash, "", applied)


async def _reconcile(
    ctx: OperatorContext, ref: AgentRef, body: dict[str, Any], refs: References, *, skip_unchanged: bool
) -> Outcome:
    ns, name = ref.namespace, ref.name
    # What this process last wrote, unless another replica may have written since (then
    # the body's: the cache would bring back what that replica had changed).
    previous = ctx.statuses.get((ns, name)) if (ns, name) not in ctx.unconfirmed else None
    old_status = previous.status if previous else dict(body.get("status") or {})
    try:
        spec = AgentSpec.model_validate(body["spec"])
    except ValidationError as e:  # the API server validates; this guards against a stale CRD
        cond = Cond(c.READY, False, "InvalidSpec", f"spec does not match the Fleetward API: {e.errors()[0]}")
        status = {
            "phase": "Degraded",
            "observedGeneration": ref.generation,
            "conditions": c.merge(old_status.get("conditions"), [cond], ref.generation),
        }
        await _write_status(ctx, ref, status, old_status)
        ctx.statuses.pop((ns, name), None)  # nothing to build on until a valid spec
        return Outcome(status, problem=cond.message)

    halts = halts_for(refs.switches, ns, (body["metadata"].get("labels") or {}))
    if halts:
        ctx.bundle.block(f"{ns}/{name}")
        return await _reconcile_halted(ctx, ref, spec, halts, old_status)
    ctx.bundle.unblock(f"{ns}/{name}")

    parts: dict[str, Cond] = {}
    transient: list[str] = []
    timings: dict[str, float] = {}
    res = resolve(spec, refs.sops, refs.guardrails, refs.agents)
    parts[c.CONFIG_RESOLVED] = _config_condition(spec, res, ns)
    if res.missing_guardrails:
        transient.append("missing guardrails")

    # Reads first (model keys, the signing key), then everything that only waits on
    # other systems (Kafka principal and topic, the trust bundle, the applies) at once:
    # a reconcile's time is its slowest call, not the sum of them.
    (model_keys, key_problems), (database_dsn, database_problem), (hash_key, hash_key_problem), creds = await _timed(
        timings,
        "reads",
        asyncio.gather(
            _model_keys(ctx, ns, spec),
            _database_dsn(ctx),
            _pii_hash_key(ctx),
            ensure_credentials(ctx.kube, ref, probably_new=not old_status.get("observedGeneration")),
        ),
    )
    key_problems += [p for p in (database_problem, hash_key_problem) if p]
    # The Agent's labels ride with its key, so that a verifier watching KillSwitches can
    # apply an agentSelector itself (fleetward.toolkit.killswitches); a relabelled Agent
    # republishes its entry.
    creds = dataclasses.replace(creds, jwk={**creds.jwk, "labels": dict(body["metadata"].get("labels") or {})})
    if key_problems:
        parts[c.CREDENTIALS_ISSUED] = key_problems[0]
        transient.append("model credentials")
    else:
        parts[c.CREDENTIALS_ISSUED] = Cond(
            c.CREDENTIALS_ISSUED,
            True,
            Reason.ISSUED,
            f"Signing key {creds.key_id} is in the trust bundle; model credentials copied to Secret fw-{name}-model.",
        )
    topic = ctx.settings.topics.request_topic(ns, name)
    deployable = bool(parts[c.CONFIG_RESOLVED].ok and parts[c.CREDENTIALS_ISSUED].ok)
    principal_task = _ensure_principal(ctx, spec, ref, creds) if deployable else _nothing()
    applied_before = bool(old_status.get("observedGeneration"))
    principal_problem, topic_problem, (config_hash, apply_problem, dep, key_published) = await asyncio.gather(
        _timed(timings, "principal", principal_task),
        _timed(timings, "topic", _ensure_topic(ctx, topic)),
        _apply(
            ctx,
            ref,
            spec,
            res,
            creds,
            model_keys,
            database_dsn,
            pii_hash_key=hash_key,
            applied_before=applied_before,
            skip_unchanged=skip_unchanged,
            timings=timings,
        )
        if deployable
        else _keep(old_status),
    )
    if principal_problem:
        parts[c.CREDENTIALS_ISSUED] = Cond(c.CREDENTIALS_ISSUED, False, Reason.KAFKA_UNAVAILABLE, principal_problem)
        transient.append("kafka principal")
    if topic_problem:
        parts[TOPIC_READY] = Cond(TOPIC_READY, False, Reason.KAFKA_UNAVAILABLE, topic_problem)
        transient.append("kafka topic")
    else:
        parts[TOPIC_READY] = Cond(TOPIC_READY, True, "TopicExists", f"Request topic {topic} exists.")
    if apply_problem:
        transient.append("apply")
        if not key_published:  # not "is in the trust bundle": verifiers would refuse its tokens
            parts[c.CREDENTIALS_ISSUED] = Cond(c.CREDENTIALS_ISSUED, False, Reason.KEY_NOT_PUBLISHED, apply_problem)

    if dep is None:  # nothing applied this time: look at what runs
        dep = await ctx.kube.get("Deployment", ns, base_name(name))
    if dep is not None and spec.autoscaling and not spec.paused and (dep.get("spec") or {}).get("replicas") == 0:
        # The applied object leaves replicas to the HPA, which never scales up from zero:
        # after a kill switch release (or an unpause) start it at its minimum.
        try:
            dep = await ctx.kube.scale("Deployment", ns, base_name(name), spec.autoscaling.min_replicas)
        except KubeError as e:
            transient.append("scale up")
            log.warning("scaling %s/%s up from zero failed: %s", ns, name, e)
    parts[c.AVAILABLE], replicas, ready = availability(
        dep, scaled_down=spec.paused, why_down="spec.paused is true: the runtime Deployment is scaled to zero."
    )
    ready_cond, phase = c.summarize_agent({**parts, c.AVAILABLE: parts[c.AVAILABLE]}, paused=spec.paused)
    if apply_problem:
        ready_cond, phase = Cond(c.READY, False, Reason.APPLY_FAILED, apply_problem), "Degraded"
    elif parts[TOPIC_READY].ok is False and ready_cond.ok:
        ready_cond, phase = Cond(c.READY, False, Reason.KAFKA_UNAVAILABLE, parts[TOPIC_READY].message), "Degraded"

    not_halted = Cond(c.HALTED, False, Reason.NOT_HALTED, "No engaged KillSwitch covers this agent.")
    status = {
        "observedGeneration": ref.generation,
        "phase": phase,
        "conditions": c.merge(old_status.get("conditions"), [ready_cond, *parts.values(), not_halted], ref.generation),
        "replicas": replicas,
        "readyReplicas": ready,
        "resolvedSOPs": [f"{s.name}@{s.version}" for s in res.sops],
        "resolvedGuardrails": [g.name for g in res.guardrails],
        "requestTopic": topic,
    }
    if config_hash and config_hash != old_status.get("configHash"):
        audit = ctx.audit.config_changed(f"{ns}/{name}", ref.generation, old_status.get("configHash"), config_hash)
        await _timed(timings, "audit", audit)
    config_hash = config_hash or old_status.get("configHash")
    if config_hash:
        status["configHash"] = config_hash
    await _timed(timings, "status", _write_status(ctx, ref, status, old_status))
    expected = None if spec.autoscaling else (0 if spec.paused else (spec.replicas if spec.replicas is not None else 1))
    ctx.statuses[(ns, name)] = AgentState(
        parts=parts, paused=spec.paused, status=status, expected_replicas=expected, deployment=deployment_version(dep)
    )
    retry = None
    if transient:
        for reason in transient:
            RECONCILE_ERRORS.labels("Agent", reason.replace(" ", "_")).inc()
        retry = 1.0
    return Outcome(status, retry_after=retry, problem=", ".join(transient), timings=timings)


async def _withdraw_kafka_access(ctx: OperatorContext, ref: AgentRef, *, drained: bool) -> str:
    """SCRAM mode, under a kill switch: the agent's user is deleted (no new logins) and its
    ACLs shrink to hearing the halt and reporting (`reporting_access`) until the drain is
    over, then to nothing. Returns a problem, or "" when done."""
    if not ctx.settings.kafka.principals_managed:
        return ""
    principal = kafka_principal(ref.namespace, ref.name)
    try:
        if drained:
            await ctx.kafka.delete_principal(principal)
        else:
            await ctx.kafka.delete_user(principal)
            await ctx.kafka.set_acls(reporting_access(ctx, ref.namespace, ref.name))
    except KafkaUnavailable as e:
        return f"Could not remove the agent's Kafka user and ACLs: {e}. Retrying with backoff."
    return ""


async def _reconcile_halted(
    ctx: OperatorContext, ref: AgentRef, spec: AgentSpec, halts: list[Halt], old_status: dict[str, Any]
) -> Outcome:
    """A kill switch covers the Agent (SPEC §7): nothing is issued or deployed; what was
    issued is revoked where it is verified (trust bundle, Kafka) and where it is stored
    (Secrets); once the switch's drain is over, the runtime is scaled to zero."""
    ns, name = ref.namespace, ref.name
    ctx.applied.pop((ns, name), None)  # what was applied is being taken back
    names = ", ".join(h.switch for h in halts)
    revoke = any(h.revoke_credentials for h in halts)
    drained = all(h.drained for h in halts)
    scale = any(h.scale_to_zero and h.drained for h in halts)
    problems: list[str] = []
    if revoke:
        try:
            await _all(
                ctx.bundle.withdraw(f"{ns}/{name}"),
                revoke_credentials(ctx.kube, ref),
                ctx.kube.delete("Secret", ns, model_secret_name(name)),
            )
        except KubeError as e:
            problems.append(f"Revoking the agent's credentials failed: {e}. Retrying with backoff.")
        kafka_problem = await _withdraw_kafka_access(ctx, ref, drained=drained)
        if kafka_problem:
            problems.append(kafka_problem)
    dep = await ctx.kube.get("Deployment", ns, base_name(name))
    if scale and dep is not None and (dep.get("spec") or {}).get("replicas") != 0:
        try:
            dep = await ctx.kube.scale("Deployment", ns, base_name(name), 0)
        except KubeError as e:
            problems.append(f"Scaling the runtime to zero failed: {e}. Retrying with backoff.")
    first = halts[0]
    why = f"KillSwitch {first.switch} (engaged by {first.engaged_by}: {first.reason})"
    if len(halts) > 1:
        why = f"KillSwitches {names} (first: {first.switch}, engaged by {first.engaged_by}: {first.reason})"
    done = []
    if revoke:
        done.append("credentials revoked")
    done.append("scaled to zero" if scale else ("draining" if not drained else "runtime left running"))
    halted = Cond(c.HALTED, True, Reason.KILL_SWITCH_ENGAGED, f"{why} covers this agent: {', '.join(done)}.")
    withheld = Cond(
        c.CREDENTIALS_ISSUED,
        False,
        Reason.WITHHELD_BY_KILL_SWITCH,
        f"No credentials are issued while {why} is engaged; releasing it issues fresh ones (never the old key).",
    )
    avail, replicas, ready = availability(dep, scaled_down=scale, why_down=f"Scaled to zero by {why}." if scale else "")
    if dep is None:
        avail = Cond(c.AVAILABLE, False, Reason.NOT_DEPLOYED, f"Nothing is deployed while {why} is engaged.")
    parts = {c.CREDENTIALS_ISSUED: withheld, c.AVAILABLE: avail}
    ready_cond, phase = c.summarize_agent(parts, paused=spec.paused, halted_by=names)
    status = {
        "observedGeneration": ref.generation,
        "phase": phase,
        "conditions": c.merge(old_status.get("conditions"), [ready_cond, withheld, avail, halted], ref.generation),
        "replicas": replicas,
        "readyReplicas": ready,
        "requestTopic": ctx.settings.topics.request_topic(ns, name),
    }
    for key in ("configHash", "resolvedSOPs", "resolvedGuardrails"):
        if old_status.get(key) is not None:
            status[key] = old_status[key]
    await _write_status(ctx, ref, status, old_status)
    ctx.statuses[(ns, name)] = AgentState(
        parts={**parts}, paused=spec.paused, status=status, expected_replicas=0 if scale else None, halted_by=names
    )
    if problems:
        RECONCILE_ERRORS.labels("Agent", "halt").inc()
        return Outcome(status, retry_after=1.0, problem="; ".join(problems))
    return Outcome(status)


def _essence(status: dict[str, Any]) -> dict[str, Any]:
    """Status without timestamps, to tell whether a write would change anything."""
    conds = [{k: v for k, v in x.items() if k != "lastTransitionTime"} for x in status.get("conditions") or []]
    return {**status, "conditions": conds}


async def _write_status(ctx: OperatorContext, ref: AgentRef, status: dict[str, Any], old: dict[str, Any]) -> None:
    key = (ref.namespace, ref.name)
    if key not in ctx.unconfirmed and _essence(status) == _essence({k: old.get(k) for k in status}):
        return
    try:
        await ctx.kube.patch_status("Agent", ref.namespace, ref.name, status)
    except KubeError as e:
        if e.status == 404:  # deleted meanwhile
            ctx.unconfirmed.discard(key)
            return
        raise
    ctx.unconfirmed.discard(key)
    _post_transition_event(ref, old, status)


def _post_transition_event(ref: AgentRef, old: dict[str, Any], new: dict[str, Any]) -> None:
    import kopf

    before, after = c.get(old.get("conditions"), c.READY), c.get(new.get("conditions"), c.READY)
    if after is None or (
        before is not None and before["status"] == after["status"] and before["reason"] == after["reason"]
    ):
        return
    if before is None and after["reason"] == Reason.NOT_READY:
        # A new Agent whose pods are on their way: its status says so, and the Event that
        # matters follows when it becomes Ready (or fails). A thousand Agents applied at
        # once would otherwise post a thousand Events that only say "starting".
        return
    target = {
        "apiVersion": "fleetward.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": ref.name, "namespace": ref.namespace, "uid": ref.uid},
    }
    kopf.event(
        target,
        type="Normal" if after["status"] == "True" else "Warning",
        reason=after["reason"],
        message=f"{new.get('phase')}: {after['message']}",
    )


async def refresh_availability(ctx: OperatorContext, dep: dict[str, Any]) -> bool:
    """A runtime Deployment changed: update the owning Agent's Available/Ready alone.
    False when that cannot be done from this replica's cache: the Agent is to be
    reconciled instead (another replica acted since this one last wrote its status)."""
    meta = dep["metadata"]
    ns, name = meta["namespace"], (meta.get("labels") or {}).get("fleetward.dev/agent")
    owner = next((o for o in meta.get("ownerReferences") or [] if o.get("kind") == "Agent"), None)
    if not name or owner is None:
        return True
    # Wait for a reconcile in flight first: an event that arrives while the Agent's first
    # reconcile runs must not be dropped, or a Deployment that became available in that
    # window would leave the Agent Pending until the next resync.
    async with ctx.locks[(ns, name)]:
        state = ctx.statuses.get((ns, name))
        if state is None:
            return True  # never reconciled here: its first reconcile reads the Deployment itself
        if (ns, name) in ctx.unconfirmed:
            # Another replica acted since: a status built on this cache would undo its
            # writes. A reconcile reads the live status and Deployment; waiting for the next
            # one left the Agent Pending until the drift timer after a takeover.
            return False
        seen = deployment_version(dep)
        if state.deployment and seen and seen[0] == state.deployment[0] and seen[1] < state.deployment[1]:
            return True  # an event older than the Deployment the last reconcile applied
        state.deployment = seen or state.deployment
        if state.halted_by:
            scaled = state.expected_replicas == 0
            avail, replicas, ready = availability(
                dep, scaled_down=scaled, why_down=f"Scaled to zero by KillSwitch {state.halted_by}."
            )
        else:
            avail, replicas, ready = availability(
                dep, scaled_down=state.paused, why_down="spec.paused is true: the runtime Deployment is scaled to zero."
            )
        parts = {**state.parts, c.AVAILABLE: avail}
        ready_cond, phase = c.summarize_agent(parts, paused=state.paused, halted_by=state.halted_by)
        old = state.status
        prior_ready = c.get(old.get("conditions"), c.READY)
        if prior_ready and prior_ready["reason"] in (Reason.APPLY_FAILED, Reason.KAFKA_UNAVAILABLE):
            ready_cond, phase = Cond(c.READY, False, prior_ready["reason"], prior_ready["message"]), old["phase"]
        gen = old.get("observedGeneration")
        status = {
            **old,
            "phase": phase,
            "replicas": replicas,
            "readyReplicas": ready,
            "conditions": c.merge(old.get("conditions"), [ready_cond, avail], gen),
        }
        ref = AgentRef(ns, name, owner["uid"], gen)
        await _write_status(ctx, ref, status, old)
        state.parts, state.status = parts, status
        return True


async def cleanup_agent(ctx: OperatorContext, ns: str, name: str, uid: str) -> None:
    """An Agent is being deleted: its objects go by garbage collection (owner references);
    what lives outside Kubernetes objects goes here."""
    ctx.deleted.add(uid)  # before the lock: reconciles queued behind it see it
    async with ctx.locks[(ns, name)]:
        await ctx.bundle.withdraw(f"{ns}/{name}")
        if ctx.settings.kafka.delete_topics_with_agent:
            await ctx.kafka.delete_topic(ctx.settings.topics.request_topic(ns, name))
        if ctx.settings.kafka.principals_managed:
            await ctx.kafka.delete_principal(kafka_principal(ns, name))
        ctx.statuses.pop((ns, name), None)
        ctx.applied.pop((ns, name), None)
        ctx.reconciled_generation.pop((ns, name), None)
        ctx.unconfirmed.discard((ns, name))
