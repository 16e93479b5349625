"""Alerts on the alerts topic (`fleetward.alerts`, SPEC §6), from the runtime: here, a daily
token budget threshold (`spec.budget.alertThresholds`) reached for the first time on a UTC day.

The envelope is the shared `fleetward.alert.v1` (`fleetward.api.envelopes.Alert`, type
`budget_threshold`), key = the agent (`namespace/name`): a budget alert is about the agent;
the session, run and trace are those of the model call whose charge crossed the threshold.
The id is derived from (agent, day, threshold): the ledger reports each threshold to exactly
one charge per day across all replicas, and should the producer repeat a record, a consumer
can drop it by id.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fleetward.api.envelopes import ALERT_SCHEMA, Alert

if TYPE_CHECKING:
    from fleetward.runtime.budget import ThresholdCrossing
    from fleetward.runtime.kafka import AsyncProducer

log = logging.getLogger("fleetward.runtime.alerts")

BUDGET_THRESHOLD = "budget_threshold"
_ALERT_NAMESPACE = uuid.UUID("2a4f7c1e-9d3b-4e6a-8f05-7b1c3d9e2f64")


def budget_threshold_alert(
    crossing: ThresholdCrossing,
    *,
    session_id: str | None = None,
    run_id: str | None = None,
    trace_id: str | None = None,
    timestamp: datetime | None = None,
) -> dict[str, Any]:
    """The alert envelope of one threshold crossing."""
    body: dict[str, Any] = {
        "schema": ALERT_SCHEMA,
        "id": str(uuid.uuid5(_ALERT_NAMESPACE, f"{crossing.agent}/{crossing.day}/{crossing.threshold!r}")),
        "type": BUDGET_THRESHOLD,
        "agent": crossing.agent,
        "timestamp": (timestamp or datetime.now(UTC)).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "data": {
            "budget": "dailyTokens",
            "day": crossing.day,
            "threshold": crossing.threshold,
            "used": crossing.used,
            "limit": crossing.limit,
            "utilization": round(crossing.used / crossing.limit, 6),
        },
    }
    for key, value in (("sessionId", session_id), ("runId", run_id), ("traceId", trace_id)):
        if value:
            body[key] = value
    Alert.parse(body)  # the shared contract; a drift here is a bug, raised in the tests
    return body


class AlertPublisher:
    """Publishes the runtime's alerts on the alerts topic."""

    def __init__(self, producer: AsyncProducer, topic: str, agent: str) -> None:
        self.producer = producer
        self.topic = topic
        self.agent = agent

    async def budget_thresholds(
        self, crossings: tuple[ThresholdCrossing, ...] | list[ThresholdCrossing], **ids: Any
    ) -> None:
        """One alert per crossing. A failure to publish is logged, never raised: the model call
        that crossed the threshold has been charged and goes on (the gauge still shows it)."""
        for crossing in crossings:
            alert = budget_threshold_alert(crossing, **ids)
            try:
                await self.producer.send(
                    self.topic,
                    json.dumps(alert, separators=(",", ":")),
                    key=crossing.agent,
                    headers={"fleetward-alert-type": BUDGET_THRESHOLD},
                )
            except Exception as e:
                log.error(
                    "could not publish the daily token budget alert (threshold %s) of %s: %s",
                    crossing.threshold,
                    crossing.agent,
                    e,
                )
                continue
            log.warning(
                "daily token budget of %s reached %.0f%% (%d of %d tokens on %s)",
                crossing.agent,
                crossing.threshold * 100,
                crossing.used,
                crossing.limit,
                crossing.day,
                extra={"fw": {"runId": ids.get("run_id"), "threshold": crossing.threshold}},
            )
