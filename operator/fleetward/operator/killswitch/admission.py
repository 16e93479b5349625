"""The KillSwitch admission webhook's HTTP side: AdmissionReview v1 in, a decision (and
for the mutating pass a JSON Patch) out. The decisions themselves are the pure functions
of fleetward.operator.webhooks; the server runs on the revoker's thread (see revoker.py).

Why not Kopf's webhook server: it answers from Kopf's one event loop, which after a mass
change works through hundreds of reconciles; an engage's two webhook calls then waited
behind them — time in which the credentials still worked, and with failurePolicy Fail a
late answer (over the API server's 10 s) refuses the engage itself. Served here, on a loop
of its own, an engage is admitted whatever the reconcilers are doing.

Paths are the ones the chart's webhook configurations call (/killswitch-stamp,
/killswitch-check, /guardrail-check for Guardrails' regular expressions, and
/guardrail-normalize, which writes an unquoted `injection.mode: off` as the string). Every replica
serves: the decisions depend on the request only, plus the Agents this installation serves
for its own finalizer (and, for Guardrails, its watched and excluded namespaces)."""

from __future__ import annotations

import base64
import json
import logging
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web
from fleetward.operator.killswitch.scope import involves
from fleetward.operator.settings import OperatorSettings
from fleetward.operator.webhooks import (
    Refused,
    Requester,
    admit,
    check,
    check_guardrail,
    normalize_guardrail,
    serves_namespace,
    well_formed,
)

log = logging.getLogger("fleetward.operator.admission")

MUTATE_PATH = "/killswitch-stamp"
VALIDATE_PATH = "/killswitch-check"
GUARDRAIL_PATH = "/guardrail-check"
GUARDRAIL_NORMALIZE_PATH = "/guardrail-normalize"


def _plain(body: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if body is None else {k: body.get(k) for k in ("metadata", "spec", "status")}


def with_finalizer(
    settings: OperatorSettings, old: dict[str, Any] | None, new: dict[str, Any] | None, indexes: dict[str, Any]
) -> list[str] | None:
    """The switch's finalizers with this installation's added, when it is created or engaged
    and this installation will handle it; None when nothing changes. Kopf would add the
    finalizer itself before running the engage handler, but that is one more write and
    watch round trip (~0.5 s on a busy API server) before the engage handler starts.
    `indexes` holds `agents_by_namespace` (namespace -> Agents), as Kopf's index does."""
    if new is None or not well_formed(new) or not ((new.get("spec") or {}).get("engaged") or old is None):
        return None  # malformed: the schema refuses it, naming the field
    current = list((new.get("metadata") or {}).get("finalizers") or [])
    if "agents_by_namespace" not in indexes:
        return None  # Agents not known yet: Kopf adds the finalizer itself
    agents = [a for entries in indexes["agents_by_namespace"].values() for a in entries]
    if settings.finalizer in current or not involves(settings, new, agents):
        return None
    return [*current, settings.finalizer]


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def json_patch(obj: dict[str, Any], merge: dict[str, Any]) -> list[dict[str, Any]]:
    """The merge patch `admit` returns (annotations set or removed, finalizers, approvals
    replaced whole) as the JSON Patch an AdmissionResponse carries, against `obj`."""
    ops: list[dict[str, Any]] = []
    meta = obj.get("metadata") or {}
    meta_patch = merge.get("metadata") or {}
    if "annotations" in meta_patch:
        current = meta.get("annotations")
        if current is None:
            values = {k: v for k, v in meta_patch["annotations"].items() if v is not None}
            if values:
                ops.append({"op": "add", "path": "/metadata/annotations", "value": values})
        else:
            for key, value in meta_patch["annotations"].items():
                path = f"/metadata/annotations/{_escape(key)}"
                if value is None:
                    if key in current:
                        ops.append({"op": "remove", "path": path})
                else:
                    ops.append({"op": "add", "path": path, "value": value})  # add replaces a member
    if "finalizers" in meta_patch:
        ops.append({"op": "add", "path": "/metadata/finalizers", "value": meta_patch["finalizers"]})
    spec_patch = merge.get("spec") or {}
    if "approvals" in spec_patch:
        if obj.get("spec") is None:
            ops.append({"op": "add", "path": "/spec", "value": {}})
        ops.append({"op": "add", "path": "/spec/approvals", "value": spec_patch["approvals"]})
    return ops


def _add_patch(response: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    """An AdmissionResponse's JSON Patch, when there is anything to change."""
    if ops:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()


def review(
    path: str, body: dict[str, Any], settings: OperatorSettings, indexes: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """One AdmissionReview answered (pure but for `indexes`, the Agents known now)."""
    request = body.get("request") or {}
    uid = request.get("uid", "")
    operation = request.get("operation", "")
    new, old = request.get("object"), request.get("oldObject")
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    try:
        if path == GUARDRAIL_PATH:
            # Only Guardrails in this installation's namespaces (the chart's namespaceSelector
            # cannot express excludeNamespaces globs); others are another installation's.
            if serves_namespace(request.get("namespace"), settings.watch_namespaces, settings.exclude_namespaces):
                check_guardrail(operation, _plain(old), _plain(new))
            return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
        if path == GUARDRAIL_NORMALIZE_PATH:
            if serves_namespace(request.get("namespace"), settings.watch_namespaces, settings.exclude_namespaces):
                _add_patch(response, normalize_guardrail(new))
            return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
        requester = Requester.of(request.get("userInfo"))
        if path == MUTATE_PATH:
            changes = admit(operation, _plain(old), _plain(new), requester)
            finalizers = with_finalizer(settings, _plain(old), _plain(new), indexes()) if new else None
            if finalizers is not None:
                changes.setdefault("metadata", {})["finalizers"] = finalizers
            _add_patch(response, json_patch(new or {}, changes))
        else:
            check(operation, _plain(old), _plain(new), requester)
    except Refused as e:
        response = {"uid": uid, "allowed": False, "status": e.status()}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


def app(settings: OperatorSettings, indexes: Callable[[], dict[str, Any]]) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "the body is not an AdmissionReview (JSON)"}, status=400)
        if not isinstance(body, dict) or not isinstance(body.get("request"), dict):
            return web.json_response({"error": "the body is not an AdmissionReview (no request)"}, status=400)
        try:
            answer = review(request.path, body, settings, indexes)
        except Exception as e:  # answer, never hang: the API server applies failurePolicy
            log.exception("admission review failed")
            uid = body["request"].get("uid", "")
            msg = f"the Fleetward admission webhook failed: {type(e).__name__}: {e}"
            answer = {
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "response": {"uid": uid, "allowed": False, "status": {"code": 500, "message": msg}},
            }
        return web.json_response(answer)

    application = web.Application(client_max_size=3 * 1024 * 1024)
    application.router.add_post(MUTATE_PATH, handle)
    application.router.add_post(VALIDATE_PATH, handle)
    application.router.add_post(GUARDRAIL_PATH, handle)
    application.router.add_post(GUARDRAIL_NORMALIZE_PATH, handle)
    return application


async def serve(settings: OperatorSettings, indexes: Callable[[], dict[str, Any]]) -> web.AppRunner:
    """Start the HTTPS server (the chart's certificate); returns the runner to clean up."""
    hook = settings.webhook
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(hook.cert_file, hook.key_file)
    runner = web.AppRunner(app(settings, indexes), access_log=None)
    await runner.setup()
    # SO_REUSEPORT: on the local cluster (no Service networking) every operator replica
    # listens on the same loopback port the webhook configuration names.
    await web.TCPSite(runner, hook.listen_address, hook.port, ssl_context=tls, reuse_port=True).start()
    log.info("admission webhook serving on https://%s:%d", hook.listen_address, hook.port)
    return runner
