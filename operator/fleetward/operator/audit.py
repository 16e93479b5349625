"""The operator's audit records (SPEC §8): kill switch engage / approve / release with the
identities the admission webhook stamped, and Agent configuration changes. One chain in
the installation's database (shared with the runtimes when they use the same PostgreSQL),
mirrored to the audit topic by fleetward.audit.

Records are written at most once per fact, even though Kopf handlers re-run: each carries
the engagement it belongs to (`engagedAt`), and what is already recorded is read back from
the log once and remembered."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from fleetward.operator.settings import OperatorSettings

from fleetward.audit import (
    CONFIG_CHANGE,
    KILL_SWITCH_APPROVE,
    KILL_SWITCH_ENGAGE,
    KILL_SWITCH_RELEASE,
    AuditError,
    AuditLog,
)

log = logging.getLogger("fleetward.operator.audit")
OPERATOR_ACTOR = "fleetward-operator"


REOPEN_SECONDS = 5.0
"""How often a record attempt may try again to open a log that could not be opened."""


class OperatorAudit:
    def __init__(self, audit_log: AuditLog | None, opener: Callable[[], AuditLog] | None = None):
        self.log = audit_log
        self._opener = opener
        self._reopen_at = 0.0
        self._lock = asyncio.Lock()
        self._seen: set[tuple[str, ...]] | None = None

    @classmethod
    def open(cls, settings: OperatorSettings) -> OperatorAudit:
        dsn = os.environ.get(settings.audit.dsn_env) or f"sqlite:///{settings.audit.sqlite_path}"
        try:
            kafka = settings.kafka.admin_config()
        except ValueError:
            kafka = None

        def opener() -> AuditLog:
            return AuditLog.open(dsn, kafka=kafka, topic=settings.topics.audit)

        try:
            return cls(opener(), opener)
        except (AuditError, OSError) as e:
            # The operator keeps working without its audit log rather than stop the fleet's
            # control loop; the error is loud, and the next record tries to open it again
            # (a database that starts beside the operator, like the chart's own, is not up
            # yet when the operator starts).
            log.error("the audit log at %s could not be opened yet: %s", dsn.split("@")[-1], e)
            return cls(None, opener)

    async def _usable(self) -> bool:
        """Whether there is a log to write to, opening it first if that failed before."""
        if self.log is None and self._opener is not None and time.monotonic() >= self._reopen_at:
            try:
                self.log = await asyncio.to_thread(self._opener)
                log.info("the audit log is open")
            except (AuditError, OSError) as e:
                self._reopen_at = time.monotonic() + REOPEN_SECONDS
                log.error("the audit log still cannot be opened: %s", e)
        return self.log is not None

    def close(self) -> None:
        if self.log is not None:
            self.log.close()

    @staticmethod
    def _key(record: dict[str, Any]) -> tuple[str, ...]:
        details = record.get("details") or {}
        return (record["action"], record["target"], str(details.get("engagedAt")), record["actor"])

    async def _append(self, action: str, actor: str, target: str, details: dict[str, Any]) -> None:
        async with self._lock:
            if not await self._usable():
                log.error("audit log unavailable: %s by %s on %s not recorded", action, actor, target)
                return
            assert self.log is not None
            if self._seen is None:  # what earlier operator processes recorded already
                self._seen = set()
                for act in (KILL_SWITCH_ENGAGE, KILL_SWITCH_APPROVE, KILL_SWITCH_RELEASE):
                    records = await asyncio.to_thread(lambda a=act: list(self.log.records(action=a)))
                    self._seen.update(self._key(r) for r in records)
            key = (action, target, str(details.get("engagedAt")), actor)
            if action != CONFIG_CHANGE and key in self._seen:
                return
            try:
                await asyncio.to_thread(self.log.append, action, actor, target, details)
            except Exception as e:  # stopping harm comes first: a failed record never blocks the switch
                log.error("audit record %s by %s on %s failed: %s", action, actor, target, e)
                return
            self._seen.add(key)

    async def engaged(self, switch: dict[str, Any], agents: list[str]) -> None:
        spec, st = switch.get("spec") or {}, switch.get("status") or {}
        await self._append(
            KILL_SWITCH_ENGAGE,
            st.get("engagedBy") or "unknown",
            f"killswitch/{switch['metadata']['name']}",
            {
                "engagedAt": st.get("engagedAt"),
                "reason": spec.get("reason"),
                "scope": spec.get("scope") or {},
                "mode": spec.get("mode", "drain"),
                "generation": switch["metadata"].get("generation"),
                "agents": len(agents),
                "revocationSeconds": st.get("revocationSeconds"),
            },
        )

    async def approvals(self, switch: dict[str, Any]) -> None:
        st = switch.get("status") or {}
        for a in (switch.get("spec") or {}).get("approvals") or []:
            if not a.get("approvedAt"):
                continue  # not stamped by the webhook: not an authenticated approval
            await self._append(
                KILL_SWITCH_APPROVE,
                a["user"],
                f"killswitch/{switch['metadata']['name']}",
                {"engagedAt": st.get("engagedAt"), "approvedAt": a["approvedAt"], "comment": a.get("comment")},
            )

    async def released(self, switch: dict[str, Any], approvers: list[str], agents: list[str]) -> None:
        st = switch.get("status") or {}
        await self._append(
            KILL_SWITCH_RELEASE,
            ",".join(approvers) or "unknown",
            f"killswitch/{switch['metadata']['name']}",
            {
                "engagedAt": st.get("engagedAt"),
                "approvers": approvers,
                "engagedBy": st.get("engagedBy"),
                "agents": len(agents),
            },
        )

    async def config_changed(self, agent: str, generation: int | None, old_hash: str | None, new_hash: str) -> None:
        await self._append(
            CONFIG_CHANGE,
            OPERATOR_ACTOR,
            f"agent/{agent}",
            {"generation": generation, "previousConfigHash": old_hash, "configHash": new_hash},
        )
