"""Matching Chat Completions requests against scenario rules.

`ChatRequest` reads the facts rules test out of a request body once; `RuleBook` holds the current
scenario and the per-rule use counts behind `times`, shared by the server thread and the test thread.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fleetward.llmstandin.scenario import Match, Rule, Scenario


class BadRequest(ValueError):
    """A request the Chat Completions protocol rejects (HTTP 400), naming the parameter."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def message_text(message: Mapping[str, Any]) -> str:
    """The text of a message: a string content, or the text parts of a content list joined."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _check_conversation(messages: list[dict[str, Any]]) -> None:
    """What OpenAI refuses with 400, so a client (the agent runtime) that sends a broken
    conversation fails here as it would against the real API, not only in production: an
    unknown role, a tool message that answers no call of the assistant message before it, and
    an assistant message whose tool calls are not each answered by a tool message right after."""
    pending: dict[str, int] = {}  # tool_call ids still to be answered -> the assistant message
    for i, message in enumerate(messages):
        role = message["role"]
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}", f"messages[{i}].role")
        if pending and role != "tool":
            raise _unanswered(pending)
        if role == "assistant":
            for call in message.get("tool_calls") or []:
                if isinstance(call, dict) and isinstance(call.get("id"), str):
                    pending[call["id"]] = i
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise BadRequest(f"messages[{i}].tool_call_id is required for a tool message", f"messages[{i}]")
            if pending.pop(call_id, None) is None:
                raise BadRequest(
                    f"messages[{i}] answers tool_call_id {call_id!r}, which the assistant message before it did "
                    "not call: a tool message must respond to a preceding message with 'tool_calls'",
                    f"messages[{i}]",
                )
    if pending:
        raise _unanswered(pending)


def _unanswered(pending: dict[str, int]) -> BadRequest:
    asked = min(pending.values())
    return BadRequest(
        f"messages[{asked}]: an assistant message with 'tool_calls' must be followed by tool messages "
        f"answering each call; no answer for {', '.join(sorted(pending))}",
        f"messages[{asked}]",
    )


@dataclass(frozen=True)
class ChatRequest:
    body: dict[str, Any]
    headers: Mapping[str, str]  # case-insensitive (the server passes aiohttp's CIMultiDictProxy)
    messages: list[dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.body.get("model"), str) or not self.body["model"]:
            raise BadRequest("'model' is required and must be a non-empty string", "model")
        messages = self.body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' is required and must be a non-empty list", "messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise BadRequest(f"messages[{i}] must be an object with a 'role'", f"messages[{i}]")
        _check_conversation(messages)
        tools = self.body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise BadRequest("'tools' must be a list", "tools")
        if self.body.get("tool_choice") is not None and not tools:
            raise BadRequest("'tool_choice' is only allowed when 'tools' are given", "tool_choice")
        object.__setattr__(self, "messages", messages)

    @property
    def model(self) -> str:
        return self.body["model"]

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def include_usage_in_stream(self) -> bool:
        options = self.body.get("stream_options")
        return isinstance(options, dict) and bool(options.get("include_usage"))

    def last_text(self, role: str) -> str | None:
        for message in reversed(self.messages):
            if message["role"] == role:
                return message_text(message)
        return None

    @property
    def system_text(self) -> str | None:
        texts = [message_text(m) for m in self.messages if m["role"] in ("system", "developer")]
        return "\n".join(texts) if texts else None

    @property
    def offered_tools(self) -> dict[str, dict[str, Any]]:
        """Function tools offered, by name: {name: the `function` object}."""
        offered = {}
        for tool in self.body.get("tools") or []:
            function = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(function, dict) and isinstance(function.get("name"), str):
                offered[function["name"]] = function
        return offered

    @property
    def tool_results_for(self) -> set[str]:
        """Names of the tools whose results are in the conversation (tool messages are tied to the assistant's
        tool calls by tool_call_id; a legacy `name` on the tool message counts too)."""
        names_by_call_id = {}
        for message in self.messages:
            for call in message.get("tool_calls") or []:
                if isinstance(call, dict) and isinstance(call.get("function"), dict):
                    names_by_call_id[call.get("id")] = call["function"].get("name")
        found = set()
        for message in self.messages:
            if message["role"] == "tool":
                name = names_by_call_id.get(message.get("tool_call_id")) or message.get("name")
                if isinstance(name, str):
                    found.add(name)
        return found

    @property
    def response_schema(self) -> tuple[str | None, dict[str, Any] | None]:
        """(name, schema) of a `response_format: {type: json_schema}`; (None, None) without one."""
        response_format = self.body.get("response_format")
        if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
            return None, None
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema")
        return spec.get("name"), schema if isinstance(schema, dict) else None

    @property
    def prior_turns(self) -> int:
        """Assistant turns already in the conversation."""
        return sum(1 for m in self.messages if m["role"] == "assistant")

    @property
    def api_key(self) -> str | None:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None

    def summary(self) -> str:
        """A one-line description for the no-match error, so a scenario gap is easy to fill."""
        last_user = self.last_text("user")
        parts = [f"model={self.model!r}", f"lastRole={self.messages[-1]['role']!r}"]
        if last_user is not None:
            parts.append(f"lastUser={_clip(last_user)!r}")
        if self.offered_tools:
            parts.append(f"toolsOffered={sorted(self.offered_tools)}")
        if self.tool_results_for:
            parts.append(f"toolResultsFor={sorted(self.tool_results_for)}")
        name, _ = self.response_schema
        if name:
            parts.append(f"schemaName={name!r}")
        parts.append(f"priorTurns={self.prior_turns}")
        return ", ".join(parts)


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def matches(match: Match, request: ChatRequest) -> bool:
    checks = [
        match.model is None or match.model.test(request.model),
        match.system is None or match.system.test(request.system_text),
        match.last_user is None or match.last_user.test(request.last_text("user")),
        match.last_tool is None or match.last_tool.test(request.last_text("tool")),
        match.last_role is None or request.messages[-1]["role"] == match.last_role,
        match.tool_result_for is None or match.tool_result_for in request.tool_results_for,
        match.schema_name is None or request.response_schema[0] == match.schema_name,
        match.prior_turns is None or match.prior_turns.test(request.prior_turns),
        match.stream is None or request.stream == match.stream,
        match.api_key is None or request.api_key == match.api_key,
        _tools_match(match.tools_offered, request),
        all(test.test(request.headers.get(name)) for name, test in match.headers.items()),
    ]
    return all(checks)


def _tools_match(wanted: bool | list[str] | None, request: ChatRequest) -> bool:
    if wanted is None:
        return True
    if isinstance(wanted, bool):
        return bool(request.offered_tools) == wanted
    return set(wanted) <= set(request.offered_tools)


class RuleBook:
    """The current scenario and how often each rule has answered (for `times`)."""

    def __init__(self, scenario: Scenario):
        self._lock = threading.Lock()
        self._scenario = scenario
        self._uses = [0] * len(scenario.rules)

    @property
    def scenario(self) -> Scenario:
        return self._scenario

    def replace(self, scenario: Scenario) -> None:
        """Swap the scenario; use counts start again from zero."""
        with self._lock:
            self._scenario = scenario
            self._uses = [0] * len(scenario.rules)

    def pick(self, request: ChatRequest) -> tuple[int, Rule] | None:
        """The first rule that matches and is not used up; counts the use."""
        with self._lock:
            for index, rule in enumerate(self._scenario.rules):
                if rule.times is not None and self._uses[index] >= rule.times:
                    continue
                if matches(rule.match, request):
                    self._uses[index] += 1
                    return index, rule
        return None

    def uses(self) -> list[int]:
        with self._lock:
            return list(self._uses)
