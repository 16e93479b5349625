"""The GitHouse tool service as an aiohttp application.

    POST /tools/<name>   JSON arguments; Authorization: Bearer <tool token>;
                         Idempotency-Key for mutating tools (must equal the token's claim)
    GET  /tools          the served tools and whether each is mutating
    GET  /healthz        200 when the trust bundle is usable, 503 with the reason otherwise
    GET  /metrics        Prometheus
    GET  /_effects       every applied change, in order (demo/test aid: it exposes the
                         argument values, so keep the service on loopback)

Status codes: 401 token refused, 403 token for another tool / Idempotency-Key mismatch,
503 trust bundle unavailable, 400 body is not JSON, 404 unknown tool or object, 409
domain conflict or Idempotency-Key reused with other arguments, 422 invalid arguments.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError

from fleetward.toolkit.bundle import TrustBundle
from fleetward.toolkit.errors import TokenRefused
from fleetward.toolkit.examples.githouse.backend import TOOLS, Caller, GitHouseBackend, ToolError, ToolSpec
from fleetward.toolkit.idempotency import IdempotencyConflict, IdempotencyStore, fingerprint
from fleetward.toolkit.verify import ToolTokenVerifier
from fleetward.toolkit.web import refusal_response, verify_request

log = logging.getLogger("githouse.tools")

MAX_BODY_BYTES = 64 * 1024


class Metrics:
    def __init__(self, registry: CollectorRegistry, bundle: TrustBundle) -> None:
        self.registry = registry
        self.calls = Counter(
            "githouse_tool_calls_total", "Tool calls by tool and outcome", ["tool", "outcome"], registry=registry
        )
        self.refusals = Counter(
            "githouse_tool_token_refusals_total",
            "Refused tool tokens by tool and reason",
            ["tool", "reason"],
            registry=registry,
        )
        self.duration = Histogram(
            "githouse_tool_duration_seconds",
            "Tool call handling time",
            ["tool"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
        )
        keys = Gauge("githouse_trust_bundle_keys", "Agent keys currently trusted", registry=registry)
        keys.set_function(lambda: len(bundle.trusted_keys()))
        ready = Gauge("githouse_trust_bundle_ready", "1 when the trust bundle is usable", registry=registry)
        ready.set_function(lambda: 1.0 if bundle.ready() else 0.0)


@dataclass
class Service:
    bundle: TrustBundle
    verifier: ToolTokenVerifier
    backend: GitHouseBackend
    idempotency: IdempotencyStore
    metrics: Metrics


SERVICE = web.AppKey("service", Service)


def _error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": code, "message": message, **extra}, status=status)


def _trace_id(request: web.Request) -> str:
    parts = request.headers.get("traceparent", "").split("-")
    return parts[1] if len(parts) == 4 else "-"


async def call_tool(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    name = request.match_info["tool"]
    spec = TOOLS.get(name)
    if spec is None:
        return _error(404, "unknown_tool", f"no tool {name!r}; see GET /tools")
    started = time.perf_counter()
    response, outcome, who = await _handle(request, service, spec)
    service.metrics.calls.labels(name, outcome).inc()
    service.metrics.duration.labels(name).observe(time.perf_counter() - started)
    # Never the token: only who (from verified claims), what and how it ended.
    log.info("tool=%s outcome=%s status=%d %s trace=%s", name, outcome, response.status, who, _trace_id(request))
    return response


async def _handle(request: web.Request, service: Service, spec: ToolSpec) -> tuple[web.Response, str, str]:
    try:
        call = verify_request(request, service.verifier, spec.name)
    except TokenRefused as refused:
        service.metrics.refusals.labels(spec.name, refused.reason.value).inc()
        return refusal_response(refused), "refused", f"reason={refused.reason.value} detail={refused.detail!r}"
    who = f"agent={call.agent} run={call.run_id}"
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError:
        return _error(400, "invalid_json", "the request body must be a JSON object of arguments"), "bad_request", who
    if not isinstance(body, dict):
        return _error(400, "invalid_json", "the request body must be a JSON object of arguments"), "bad_request", who

    scope = (call.agent, spec.name)
    body_fingerprint = fingerprint(body)
    if spec.mutating:
        try:
            stored = service.idempotency.lookup(scope, call.idempotency_key, body_fingerprint)
        except IdempotencyConflict as e:
            return _error(409, "idempotency_key_reused", str(e)), "idempotency_conflict", who
        if stored is not None:
            response = web.json_response(stored.body, status=stored.status, headers={"Idempotent-Replayed": "true"})
            return response, "idempotent_replay", who

    try:
        args = spec.arguments.model_validate(body)
    except ValidationError as e:
        details = [
            {"field": ".".join(str(p) for p in err["loc"]) or "(arguments)", "message": err["msg"]}
            for err in e.errors()
        ]
        return (
            _error(422, "invalid_arguments", f"arguments of {spec.name} are invalid", details=details),
            "invalid_arguments",
            who,
        )

    caller = Caller(agent=call.agent, run_id=call.run_id, idempotency_key=call.idempotency_key)
    # No await between the idempotency lookup above and the store below: on the one event
    # loop, two calls with one key cannot both apply the effect.
    try:
        result = spec.handler(service.backend, caller, args)
    except ToolError as e:
        return _error(e.status, e.code, e.message), "rejected", who
    if spec.mutating:
        service.idempotency.store(scope, call.idempotency_key, body_fingerprint, 200, result)
    return web.json_response(result), "ok", who


async def list_tools(request: web.Request) -> web.Response:
    return web.json_response({"tools": [{"name": s.name, "mutating": s.mutating} for s in TOOLS.values()]})


async def healthz(request: web.Request) -> web.Response:
    status = request.app[SERVICE].bundle.status()
    return web.json_response(status, status=200 if status["ready"] else 503)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[SERVICE].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def effects(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE].backend.effects)


def create_app(
    bundle: TrustBundle,
    verifier: ToolTokenVerifier,
    *,
    backend: GitHouseBackend | None = None,
    idempotency: IdempotencyStore | None = None,
) -> web.Application:
    """The service for an already started bundle (the caller owns its lifecycle)."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[SERVICE] = Service(
        bundle=bundle,
        verifier=verifier,
        backend=backend or GitHouseBackend(),
        idempotency=idempotency or IdempotencyStore(),
        metrics=Metrics(CollectorRegistry(), bundle),
    )
    app.router.add_post("/tools/{tool}", call_tool)
    app.router.add_get("/tools", list_tools)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/_effects", effects)
    return app
