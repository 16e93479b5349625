"""Agent handlers: create, update, resume (operator start) and a drift timer all run the
same level-based reconcile; deletion cleans up what garbage collection cannot reach."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import kopf
from fleetward.operator.handlers.indexes import GROUP, VERSION, references
from fleetward.operator.reconcile import cleanup_agent, reconcile_agent
from fleetward.operator.settings import OperatorSettings


def _backoff(retry: int) -> float:
    return min(30.0, 1.0 * 2 ** min(retry, 5))


def register(settings: OperatorSettings) -> None:
    def owned(namespace: str | None, **_: Any) -> bool:
        return settings.owns_namespace(namespace)

    @kopf.on.resume(GROUP, VERSION, "agents", when=owned, backoff=5, id="agent_changed")
    @kopf.on.create(GROUP, VERSION, "agents", when=owned, backoff=5, id="agent_changed")
    @kopf.on.update(GROUP, VERSION, "agents", when=owned, backoff=5, id="agent_changed")
    async def agent_changed(
        body: kopf.Body,
        namespace: str,
        memo: kopf.Memo,
        retry: int,
        **indexes: Any,
    ) -> None:
        refs = references(namespace, indexes)
        outcome = await reconcile_agent(memo.ctx, dict(body), refs, skip_unchanged=True)
        if outcome.retry_after is not None:
            raise kopf.TemporaryError(f"not ready yet: {outcome.problem}", delay=_backoff(retry))

    dephased: set[str] = set()

    @kopf.timer(
        GROUP,
        VERSION,
        "agents",
        when=owned,
        interval=settings.resync_seconds,
        initial_delay=settings.resync_seconds,
        id="agent_drift",
    )
    async def agent_drift(
        body: kopf.Body,
        namespace: str,
        uid: str,
        memo: kopf.Memo,
        **indexes: Any,
    ) -> None:
        if uid not in dephased:
            # Agents seen at once (an operator start, a mass apply) would otherwise all be
            # re-checked at once every interval, for ever: bursts of reconciles that delay
            # whatever else the operator does then (a kill switch). One random pause before
            # the first check spreads them over the interval for good.
            dephased.add(uid)
            await asyncio.sleep(random.uniform(0, settings.resync_seconds))
        refs = references(namespace, indexes)
        await reconcile_agent(memo.ctx, dict(body), refs)

    @kopf.on.delete(GROUP, VERSION, "agents", when=owned, retries=30, backoff=10, id="agent_deleted")
    async def agent_deleted(namespace: str, name: str, uid: str, memo: kopf.Memo, **_: Any) -> None:
        dephased.discard(uid)
        await cleanup_agent(memo.ctx, namespace, name, uid)
