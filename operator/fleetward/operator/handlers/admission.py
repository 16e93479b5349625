"""Admission webhooks served by the operator (Kopf's webhook server, TLS from the chart's
certificate). The chart owns the webhook configurations (caBundle included), so Kopf's
"managed" mode stays off; every replica serves, which is safe: the decisions are pure
functions of the request (fleetward.operator.webhooks)."""

from __future__ import annotations

from typing import Any

import kopf
from fleetward.operator.handlers.indexes import GROUP, VERSION
from fleetward.operator.settings import OperatorSettings
from fleetward.operator.webhooks import Refused, Requester, admit, check

# Paths the chart's webhook configurations call: Kopf serves each handler at /<id>.
MUTATE_ID = "killswitch-stamp"
VALIDATE_ID = "killswitch-check"


def _plain(body: Any) -> dict[str, Any] | None:
    return None if body is None else {k: body.get(k) for k in ("metadata", "spec", "status")}


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
        old: Any, new: Any, operation: str, userinfo: dict[str, Any], patch: kopf.Patch, **_: Any
    ) -> None:
        try:
            changes = admit(operation, _plain(old), _plain(new), Requester.of(userinfo))
        except Refused as e:
            raise kopf.AdmissionError(str(e), code=403) from None
        for key, value in changes.items():
            patch[key] = value

    @kopf.on.validate(GROUP, VERSION, "killswitches", id=VALIDATE_ID, operations=["CREATE", "UPDATE", "DELETE"])
    def killswitch_check(old: Any, new: Any, operation: str, userinfo: dict[str, Any], **_: Any) -> None:
        try:
            check(operation, _plain(old), _plain(new), Requester.of(userinfo))
        except Refused as e:
            raise kopf.AdmissionError(str(e), code=403) from None
