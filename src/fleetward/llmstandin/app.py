"""The HTTP side of the LLM stand-in (aiohttp): the OpenAI routes and the /_standin control routes.

aiohttp rather than the standard library's http.server: it is already installed (kopf and the
kubernetes client need it), streams SSE without a thread per connection, and with
`handler_cancellation` it tells us when a client gives up on a held request, which is what
tests of aborts assert.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from fleetward.llmstandin.gates import Gates
from fleetward.llmstandin.matching import BadRequest, ChatRequest, RuleBook
from fleetward.llmstandin.protocol import (
    Answer,
    ScenarioMismatch,
    build_answer,
    completion_body,
    error_body,
    now,
    stream_chunks,
)
from fleetward.llmstandin.recorder import Recorder
from fleetward.llmstandin.scenario import ErrorReply, Rule, ScenarioError, parse_scenario

SERVER_HEADER = "fleetward-llm-standin/1 (scripted stand-in, not a language model)"
OWNED_BY = "fleetward-standin"
DEFAULT_MODEL = "fleetward-standin"

log = logging.getLogger("fleetward.llmstandin")

RULEBOOK = web.AppKey("rulebook", RuleBook)
RECORDER = web.AppKey("recorder", Recorder)
STOPPING = web.AppKey("stopping", asyncio.Event)
GATES = web.AppKey("gates", Gates)


def build_app(rulebook: RuleBook, recorder: Recorder, gates: Gates | None = None) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[RULEBOOK] = rulebook
    app[RECORDER] = recorder
    app[GATES] = gates if gates is not None else Gates()
    app[STOPPING] = asyncio.Event()
    app.on_response_prepare.append(_label_response)
    app.on_shutdown.append(_mark_stopping)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_route("*", "/v1/{rest:.*}", unsupported)
    app.router.add_get("/_standin", info)
    app.router.add_get("/_standin/requests", list_requests)
    app.router.add_delete("/_standin/requests", clear_requests)
    app.router.add_get("/_standin/scenario", get_scenario)
    app.router.add_post("/_standin/scenario", set_scenario)
    app.router.add_get("/_standin/gates", list_gates)
    app.router.add_post("/_standin/gates/{name}", open_gate)
    app.router.add_delete("/_standin/gates/{name}", close_gate)
    return app


async def _label_response(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_HEADER


async def _mark_stopping(app: web.Application) -> None:
    app[STOPPING].set()


def _error(
    status: int,
    message: str,
    error_type: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.json_response(error_body(message, error_type, code, param), status=status, headers=headers)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    recorder = request.app[RECORDER]
    raw = await request.read()
    record = recorder.begin(request.method, request.path, request.headers, raw)
    outcome = "server_error"  # kept only if _answer fails unexpectedly (aiohttp then answers 500)
    response: web.StreamResponse | None = None
    response_body: Any = None
    try:
        response, response_body, outcome = await _answer(request, raw, record)
        return response
    except asyncio.CancelledError:
        # With handler_cancellation, aiohttp cancels us when the client disconnects (or at shutdown).
        outcome = "server_stopped" if request.app[STOPPING].is_set() else "client_aborted"
        raise
    except ConnectionError as e:  # the client went away while we were streaming
        log.info("stand-in: client went away during request %s: %s", record["seq"], e)
        outcome = "client_aborted"
        return web.Response(status=499)
    finally:
        status = response.status if response is not None and outcome not in ("client_aborted", "timeout") else None
        status = 500 if outcome == "server_error" else status
        recorder.finish(record, status, outcome, response_body)


async def _answer(request: web.Request, raw: bytes, record: dict[str, Any]) -> tuple[web.StreamResponse, Any, str]:
    """The response, its body for the record, and the outcome."""
    try:
        chat = ChatRequest(_json_object(raw), request.headers)
    except BadRequest as e:
        body = error_body(str(e), "invalid_request_error", "invalid_request", e.param)
        return web.json_response(body, status=400), body, "bad_request"

    picked = request.app[RULEBOOK].pick(chat)
    if picked is None:
        message = (
            f"fleetward LLM stand-in: no scenario rule matches request #{record['seq']} ({chat.summary()}). "
            "Add a rule for it to the scenario; the stand-in never invents an answer."
        )
        log.warning("%s", message)
        body = error_body(message, "standin_no_matching_rule", "no_matching_rule")
        return web.json_response(body, status=404), body, "no_match"
    index, rule = picked
    request.app[RECORDER].note_rule(record, index, rule.name)

    if rule.delay_seconds:
        await asyncio.sleep(rule.delay_seconds)
    if rule.wait_for_gate is not None:
        await request.app[GATES].wait(rule.wait_for_gate)
    if rule.timeout is not None:
        await asyncio.sleep(rule.timeout)
        if request.transport is not None:
            request.transport.close()  # no status line at all: the client sees the connection drop
        return web.Response(status=204), None, "timeout"
    if rule.error is not None:
        if rule.hold_seconds:
            await asyncio.sleep(rule.hold_seconds)
        response, body = _scripted_error(rule.error, rule, index)
        return response, body, "error"

    assert rule.respond is not None  # a rule has exactly one of respond, error, timeout
    seq = record["seq"]
    try:
        answer = build_answer(rule.respond, chat, f"call_standin_{seq}", rule.label(index))
    except ScenarioMismatch as e:
        log.warning("%s", e)
        body = error_body(str(e), "standin_scenario_mismatch", "scenario_mismatch")
        # 422: not retried by OpenAI clients, so the mistake surfaces at once instead of after retries.
        return web.json_response(body, status=422), body, "scenario_mismatch"
    completion_id = f"chatcmpl-standin-{seq}"
    created = now()
    body = completion_body(answer, completion_id, created)
    if chat.stream:
        response = await _stream(
            request, answer, completion_id, created, chat.include_usage_in_stream, rule.hold_seconds
        )
        return response, body, "answered"
    if rule.hold_seconds:
        await asyncio.sleep(rule.hold_seconds)
    return web.json_response(body), body, "answered"


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise BadRequest(f"request body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(data).__name__}")
    return data


def _scripted_error(error: ErrorReply, rule: Rule, index: int) -> tuple[web.Response, Any]:
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = f"{error.retry_after:g}"
        headers["retry-after-ms"] = str(round(error.retry_after * 1000))
    if isinstance(error.body, str):
        return web.Response(status=error.status, text=error.body, headers=headers), error.body
    body = (
        error.body
        if error.body is not None
        else error_body(
            error.message or f"fleetward LLM stand-in: scripted HTTP {error.status} from {rule.label(index)}",
            _ERROR_TYPES.get(error.status, "api_error"),
            str(error.status),
        )
    )
    return web.json_response(body, status=error.status, headers=headers), body


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


async def _stream(
    request: web.Request, answer: Answer, completion_id: str, created: int, include_usage: bool, hold_seconds: float
) -> web.StreamResponse:
    """Server-sent events, ending with `data: [DONE]`. With holdSeconds the first chunk (the role) goes
    out at once and the rest after the hold: a generation that is visibly under way, for abort tests."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for i, chunk in enumerate(stream_chunks(answer, completion_id, created, include_usage)):
        await response.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
        if i == 0 and hold_seconds:
            await asyncio.sleep(hold_seconds)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def list_models(request: web.Request) -> web.Response:
    names = request.app[RULEBOOK].scenario.model_names() or [DEFAULT_MODEL]
    return web.json_response({"object": "list", "data": [_model_entry(name) for name in names]})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    if name not in (request.app[RULEBOOK].scenario.model_names() or [DEFAULT_MODEL]):
        return _error(
            404,
            f"fleetward LLM stand-in: model {name!r} is not named in the scenario",
            "invalid_request_error",
            "model_not_found",
            "model",
        )
    return web.json_response(_model_entry(name))


def _model_entry(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": OWNED_BY}


async def unsupported(request: web.Request) -> web.Response:
    return _error(
        404,
        f"fleetward LLM stand-in: {request.method} {request.path} is not served; the stand-in "
        "speaks only POST /v1/chat/completions and GET /v1/models",
        "invalid_request_error",
        "unsupported_endpoint",
    )


async def info(request: web.Request) -> web.Response:
    rulebook = request.app[RULEBOOK]
    return web.json_response(
        {
            "standin": True,
            "server": SERVER_HEADER,
            "scenario": rulebook.scenario.name,
            "rules": len(rulebook.scenario.rules),
            "uses": rulebook.uses(),
            "requests": len(request.app[RECORDER].list()),
        }
    )


async def list_gates(request: web.Request) -> web.Response:
    return web.json_response(request.app[GATES].states())


async def open_gate(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    request.app[GATES].open(name)
    log.info("stand-in: gate %r opened", name)
    return web.json_response({"gate": name, "open": True})


async def close_gate(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    request.app[GATES].close(name)
    log.info("stand-in: gate %r closed", name)
    return web.json_response({"gate": name, "open": False})


async def list_requests(request: web.Request) -> web.Response:
    query = request.query
    return web.json_response(
        # an empty value (`?model=`) filters nothing, as if the parameter were absent
        request.app[RECORDER].list(
            model=query.get("model") or None, rule=query.get("rule") or None, outcome=query.get("outcome") or None
        )
    )


async def clear_requests(request: web.Request) -> web.Response:
    return web.json_response({"deleted": request.app[RECORDER].clear()})


async def get_scenario(request: web.Request) -> web.Response:
    rulebook = request.app[RULEBOOK]
    # `scenario` can be POSTed back as it is; `uses` counts the answers of each rule so far.
    return web.json_response(
        {
            "scenario": rulebook.scenario.model_dump(mode="json", by_alias=True, exclude_defaults=True),
            "uses": rulebook.uses(),
        }
    )


async def set_scenario(request: web.Request) -> web.Response:
    try:
        data = await request.json()
    except ValueError as e:
        return _error(400, f"scenario body is not JSON: {e}", "invalid_request_error", "invalid_scenario")
    try:
        scenario = parse_scenario(data, "POST /_standin/scenario")
    except ScenarioError as e:
        return _error(400, str(e), "invalid_request_error", "invalid_scenario")
    request.app[RULEBOOK].replace(scenario)
    log.info("stand-in: scenario replaced (%d rules)", len(scenario.rules))
    return web.json_response({"rules": len(scenario.rules), "name": scenario.name})
