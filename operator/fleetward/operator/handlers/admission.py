"""Admission webhooks served by the operator (Kopf's webhook server, TLS from the chart's
certificate). The chart owns the webhook configurations (caBundle included), so Kopf's
"managed" mode stays off; every replica serves, which is safe: the decisions are pure
functions of the request (fleetward.operator.webhooks)."""

from __future__ import annotations

from typing import Any

import kopf
from fleetward.operator.handlers.indexes import GROUP, VERSION
from fleetward.operator.handlers.killswitch import involves
from fleetward.operator.settings import OperatorSettings
from fleetward.operator.webhooks import Refused, Requester, admit, check

# Paths the chart's webhook configurations call: Kopf serves each handler at /<id>.
MUTATE_ID = "killswitch-stamp"
VALIDATE_ID = "killswitch-check"


def _plain(body: Any) -> dict[str, Any] | None:
    return None if body is None else {k: body.get(k) for k in ("metadata", "spec", "status")}


def with_finalizer(
    settings: OperatorSettings, old: dict[str, Any] | None, new: dict[str, Any] | None, indexes: dict[str, Any]
) -> list[str] | None:
    """The switch's finalizers with this installation's added, when it is created or engaged
    and this installation will handle it; None when nothing changes. Kopf would add the
    finalizer itself before running the engage handler, but that is one more write and
    watch round trip (~0.5 s on a busy API server) before any credential is revoked."""
    if new is None or not ((new.get("spec") or {}).get("engaged") or old is None):
        return None
    current = list((new.get("metadata") or {}).get("finalizers") or [])
    if "agents_by_namespace" not in indexes:
        return None  # indexes not served yet: Kopf adds the finalizer itself
    if settings.finalizer in current or not involves(settings, new, indexes):
        return None
    return [*current, settings.finalizer]


def register(settings: OperatorSettings) -> None:
    if not settings.webhook.enabled:
        return

    @kopf.on.startup(id="webhook_server")
    async def webhook_server(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        hook = memo.settings.webhook
        settings.admission.server = kopf.WebhookServer(
            addr=hook.listen_address, port=hook.port, certfile=hook.cert_file, pkeyfile=hook.key_file
        )
        settings.admission.managed = None

    @kopf.on.mutate(GROUP, VERSION, "killswitches", id=MUTATE_ID, operations=["CREATE", "UPDATE"])
    def killswitch_stamp(
        old: Any, new: Any, operation: str, userinfo: dict[str, Any], patch: kopf.Patch, **kwargs: Any
    ) -> None:
        try:
            changes = admit(operation, _plain(old), _plain(new), Requester.of(userinfo))
        except Refused as e:
            raise kopf.AdmissionError(str(e), code=403) from None
        for key, value in changes.items():
            patch[key] = value
        finalizers = with_finalizer(settings, _plain(old), _plain(new), kwargs)
        if finalizers is not None:
            patch.setdefault("metadata", {})["finalizers"] = finalizers

    @kopf.on.validate(GROUP, VERSION, "killswitches", id=VALIDATE_ID, operations=["CREATE", "UPDATE", "DELETE"])
    def killswitch_check(old: Any, new: Any, operation: str, userinfo: dict[str, Any], **_: Any) -> None:
        try:
            check(operation, _plain(old), _plain(new), Requester.of(userinfo))
        except Refused as e:
            raise kopf.AdmissionError(str(e), code=403) from None
