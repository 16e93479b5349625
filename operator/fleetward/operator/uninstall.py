"""`fleetward operator uninstall`: remove what the operator made for the installation itself,
run by the chart's pre-delete hook before Helm deletes the release.

Helm deletes only what its templates rendered. The gateway (Deployment, Service, HPA) and
the trust bundle are the operator's own objects in the installation namespace, so without
this step `helm uninstall` left a gateway running with nobody to manage it. Owning them by
a chart object for the garbage collector was tried and dropped: a chart object deleted and
created again (`helm upgrade --force`, Argo CD's Replace) would have taken the trust bundle
with it while Agents still ran.

Order matters: the operator re-applies the gateway every resync and the revoker rewrites
the trust bundle, so the operator is scaled to zero first and its pods are waited out. When
something then fails, the operator is scaled back and the hook fails, so a failed
uninstall leaves a working installation rather than a stopped one.

Agents (and so their runtimes, keys and topics) are the users' resources and stay; their
finalizers need the operator, so they should be deleted before uninstalling. The trust
bundle goes only when no Agent of the installation is left: tool services of Agents left
running still verify their tokens against it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetward.operator.kube import Kube, KubeError
from fleetward.operator.settings import OperatorSettings

log = logging.getLogger("fleetward.operator.uninstall")

MANAGED_BY = ("app.kubernetes.io/managed-by", "fleetward")
GATEWAY_KINDS = ("HorizontalPodAutoscaler", "Service", "Deployment")


@dataclass
class UninstallReport:
    deleted: list[str] = field(default_factory=list)
    """`Kind/name` of every object removed."""
    kept: list[str] = field(default_factory=list)
    """What was left on purpose, each with why (for the hook's log)."""
    agents_left: list[str] = field(default_factory=list)
    """`namespace/name` of the Agents still in the installation's scope."""


class UninstallFailed(RuntimeError):
    pass


async def remaining_agents(kube: Kube, settings: OperatorSettings) -> list[str]:
    """Agents this installation reconciles (its namespaces, minus the excluded ones)."""
    namespaces: list[str | None] = list(settings.watch_namespaces) or [None]
    found: list[str] = []
    for ns in namespaces:
        async for page in kube.list_pages("Agent", ns):
            for agent in page:
                meta = agent.get("metadata") or {}
                if settings.owns_namespace(meta.get("namespace")):
                    found.append(f"{meta.get('namespace')}/{meta.get('name')}")
    return sorted(found)


async def _stop_operator(kube: Kube, namespace: str, deployment: str, timeout: float) -> int | None:
    """Scale the operator to zero and wait until none of its pods is left; returns the
    replicas it had (None when there is no such Deployment)."""
    live = await kube.get("Deployment", namespace, deployment)
    if live is None:
        return None
    replicas = int((live.get("spec") or {}).get("replicas") or 0)
    await kube.scale("Deployment", namespace, deployment, 0)
    deadline = time.monotonic() + timeout
    while True:
        live = await kube.get("Deployment", namespace, deployment)
        status = (live or {}).get("status") or {}
        # The ReplicaSet controller counts terminating pods out of status.replicas only once
        # they are gone, so 0 here means no operator process is left to re-apply anything.
        if live is None or not status.get("replicas"):
            return replicas
        if time.monotonic() > deadline:
            raise UninstallFailed(
                f"the operator Deployment {namespace}/{deployment} still has {status.get('replicas')} pod(s) "
                f"{timeout:.0f} s after it was scaled to zero"
            )
        await asyncio.sleep(0.5)


async def _delete_if_ours(kube: Kube, kind: str, namespace: str, name: str, report: UninstallReport) -> None:
    live = await kube.get(kind, namespace, name)
    if live is None:
        return
    labels = (live.get("metadata") or {}).get("labels") or {}
    if labels.get(MANAGED_BY[0]) != MANAGED_BY[1]:
        # A same-named object someone else made (e.g. their own gateway): not ours to delete.
        report.kept.append(f"{kind}/{name}: not labelled {MANAGED_BY[0]}={MANAGED_BY[1]}")
        return
    if await kube.delete(kind, namespace, name):
        report.deleted.append(f"{kind}/{name}")


async def uninstall(
    kube: Kube,
    settings: OperatorSettings,
    *,
    operator_deployment: str | None,
    timeout: float = 90.0,
    say: Callable[[str], None] = log.info,
) -> UninstallReport:
    """Remove the installation's gateway and, with no Agent left, its trust bundle."""
    ns = settings.namespace
    report = UninstallReport()
    replicas = None
    if operator_deployment:
        say(f"scaling the operator {ns}/{operator_deployment} to zero")
        replicas = await _stop_operator(kube, ns, operator_deployment, timeout)
    try:
        for kind in GATEWAY_KINDS:
            await _delete_if_ours(kube, kind, ns, settings.gateway.name, report)
        report.agents_left = await remaining_agents(kube, settings)
        if report.agents_left:
            report.kept.append(
                f"ConfigMap/{settings.trust_bundle_name}: {len(report.agents_left)} Agent(s) still run and their "
                "tool services verify tokens against it"
            )
        else:
            await _delete_if_ours(kube, "ConfigMap", ns, settings.trust_bundle_name, report)
    except KubeError as e:
        if replicas:
            say(f"restoring the operator to {replicas} replica(s)")
            try:
                await kube.scale("Deployment", ns, operator_deployment or "", replicas)
            except KubeError as again:
                say(f"could not restore the operator's replicas: {again}")
        raise UninstallFailed(f"removing the installation's objects failed: {e}") from e
    return report
