"""HTTP tool calls (SPEC §6): the runtime POSTs the arguments as JSON to the tool's
endpoint with `Authorization: Bearer <per-invocation token>`, `Idempotency-Key` (mutating
tools) and `traceparent`.

The LangChain tools built here only carry the name, description and JSON Schema the model
sees, and the HTTP call. The credentials come from `middleware/tool_credentials.py`, which
mints them for each invocation and hands them over in `CURRENT_INVOCATION` (a context
variable: it travels with the awaited call, never through the model-visible arguments).
A tool invoked without them refuses to run: no call leaves the runtime unauthenticated.
Likewise, when the invocation carries an audit recorder, the call (arguments redacted) is
appended to the audit log before the request is sent, and refused if it cannot be.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from langchain_core.tools import BaseTool, ToolException

from fleetward.api.agent import Tool as ToolSpec

MAX_RESULT_CHARS = 20_000
"""What a tool result may put into the conversation (the rest is cut, with a note)."""


def idempotency_key(run_id: str, tool_call_id: str) -> str:
    """Deterministic per (run, tool call): a call replayed after a crash reuses it, so the tool
    service applies a mutating call once. The tool-call id comes from the checkpointed model
    message, so a replay sees the same id."""
    digest = hashlib.sha256(f"{run_id}\x00{tool_call_id}".encode()).hexdigest()
    return f"fw1-{digest[:40]}"


class ToolAudit(Protocol):
    """Records a tool call in the audit log before it is sent (runtime/audit.py)."""

    async def tool_call(self, spec: ToolSpec, arguments: dict[str, Any], invocation: Invocation) -> None: ...


@dataclass(frozen=True)
class Invocation:
    """Credentials and context of one tool call, minted by the tool-credentials middleware."""

    tool: str
    call_id: str
    run_id: str
    token: str
    idempotency_key: str
    traceparent: str | None
    audit: ToolAudit | None = None
    """None only where no audit log is configured (never in a running runtime)."""


CURRENT_INVOCATION: contextvars.ContextVar[Invocation | None] = contextvars.ContextVar(
    "fleetward_tool_invocation", default=None
)


@dataclass
class ToolOutcome:
    ok: bool
    status: int | None
    body: Any
    error: str | None
    duration_ms: int
    replayed: bool = False


class ToolHttpClient:
    """One shared HTTP client (connection pooling) for every tool of the agent."""

    def __init__(self) -> None:
        self._client = httpx.AsyncClient(follow_redirects=False)

    async def close(self) -> None:
        await self._client.aclose()

    async def call(self, spec: ToolSpec, arguments: dict[str, Any], invocation: Invocation) -> ToolOutcome:
        headers = {"Authorization": f"Bearer {invocation.token}", "Content-Type": "application/json"}
        if spec.mutating:
            headers["Idempotency-Key"] = invocation.idempotency_key
        if invocation.traceparent:
            headers["traceparent"] = invocation.traceparent
        started = time.monotonic()
        try:
            response = await self._client.post(
                spec.endpoint, content=json.dumps(arguments), headers=headers, timeout=spec.timeout_seconds
            )
        except httpx.TimeoutException:
            return ToolOutcome(False, None, None, f"timed out after {spec.timeout_seconds} s", _ms(started))
        except httpx.HTTPError as e:
            return ToolOutcome(False, None, None, f"could not reach the tool service: {type(e).__name__}", _ms(started))
        duration = _ms(started)
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text[:2000]
        if response.is_success:
            replayed = response.headers.get("Idempotent-Replayed", "").lower() == "true"
            return ToolOutcome(True, response.status_code, body, None, duration, replayed)
        return ToolOutcome(False, response.status_code, body, _error_text(response.status_code, body), duration)


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _error_text(status: int, body: Any) -> str:
    if isinstance(body, dict):
        code = body.get("error") or body.get("reason")
        message = body.get("message")
        if code or message:
            return f"HTTP {status}: {code or 'error'}: {message or ''}".rstrip(": ")
    return f"HTTP {status}"


def result_text(outcome: ToolOutcome) -> str:
    """What the model reads for a tool call."""
    if outcome.ok:
        text = outcome.body if isinstance(outcome.body, str) else json.dumps(outcome.body, ensure_ascii=False)
    else:
        text = f"Tool call failed: {outcome.error}"
    if len(text) > MAX_RESULT_CHARS:
        text = text[:MAX_RESULT_CHARS] + f"... [cut: {len(text) - MAX_RESULT_CHARS} more characters]"
    return text


class HttpTool(BaseTool):
    """A tool of the Agent's allow-list, called over HTTP."""

    spec: ToolSpec
    client: ToolHttpClient
    last_outcomes: dict[str, ToolOutcome]
    """Outcome per call id, read by the middleware right after the call (then dropped)."""

    def __init__(self, spec: ToolSpec, client: ToolHttpClient) -> None:
        super().__init__(
            name=spec.name,
            description=spec.description or spec.name,
            args_schema=spec.input_schema,
            spec=spec,
            client=client,
            last_outcomes={},
            # A failed call becomes an error ToolMessage the model can read, not a failed run.
            handle_tool_error=True,
        )

    def _run(self, *args: Any, **kwargs: Any) -> str:
        raise NotImplementedError("tools are called asynchronously")

    async def _arun(self, **arguments: Any) -> str:
        invocation = CURRENT_INVOCATION.get()
        if invocation is None or invocation.tool != self.name:
            # Fail closed: only the credentials middleware may start a call.
            raise ToolException(f"{self.name}: no credentials were issued for this call; refused")
        arguments.pop("run_manager", None)
        if invocation.audit is not None:
            try:
                await invocation.audit.tool_call(self.spec, arguments, invocation)
            except Exception as e:  # fail closed: no tool call without its audit record
                raise ToolException(
                    f"{self.name}: the call could not be recorded in the audit log ({e}); not sent"
                ) from None
        outcome = await self.client.call(self.spec, arguments, invocation)
        self.last_outcomes[invocation.call_id] = outcome
        if not outcome.ok:
            raise ToolException(result_text(outcome))
        return result_text(outcome)


def build_tools(specs: list[ToolSpec] | None, client: ToolHttpClient) -> list[HttpTool]:
    return [HttpTool(spec, client) for spec in specs or []]
