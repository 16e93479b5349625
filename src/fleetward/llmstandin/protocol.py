"""OpenAI Chat Completions wire shapes: completions, stream chunks, errors, token counts.

Turning a rule's `respond` into an answer also checks it against the request (JSON schema of the
response_format, offered tools and their parameter schemas, tool_choice), so a scenario mistake
shows up as a clear error rather than as a confusing parse failure in the client.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import jsonschema

from fleetward.llmstandin.matching import ChatRequest, message_text
from fleetward.llmstandin.scenario import Respond

SYSTEM_FINGERPRINT = "fleetward-standin"
STREAM_PIECE_CHARS = 16  # small pieces, so clients really have to join deltas

# Token counts are an approximation: tiktoken would need to download its encodings, which this
# stand-in must not do. One token per 4 characters (rounded up) is the usual rule of thumb for
# English; every message adds 4 tokens of framing. Deterministic, so tests can assert exact numbers.
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4


class ScenarioMismatch(ValueError):
    """A rule's answer does not fit the request (schema, tools); the message says how."""


def count_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def prompt_tokens(request: ChatRequest) -> int:
    total = 0
    for message in request.messages:
        total += TOKENS_PER_MESSAGE + count_tokens(message_text(message))
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            function = function if isinstance(function, dict) else {}
            total += count_tokens(str(function.get("name", "")) + str(function.get("arguments", "")))
    for key in ("tools", "response_format"):
        if request.body.get(key):
            total += count_tokens(json.dumps(request.body[key], separators=(",", ":"), sort_keys=True))
    return total


@dataclass(frozen=True)
class Answer:
    model: str
    content: str | None
    tool_calls: list[dict[str, Any]]
    finish_reason: str
    usage: dict[str, int]


def build_answer(respond: Respond, request: ChatRequest, call_id_prefix: str, rule_label: str) -> Answer:
    """The assistant answer a rule scripts for this request; raises ScenarioMismatch if it cannot fit."""
    content = respond.content
    if respond.has_json:
        content = json.dumps(respond.json_value, ensure_ascii=False)
    tool_calls = [
        {
            "id": call.id or f"{call_id_prefix}_{i}",
            "type": "function",
            "function": {
                "name": call.name,
                "arguments": call.arguments
                if isinstance(call.arguments, str)
                else json.dumps(call.arguments, ensure_ascii=False),
            },
        }
        for i, call in enumerate(respond.tool_calls)
    ]
    if not respond.allow_mismatch:
        problems = _check_json(respond, request) + _check_tool_calls(respond, request)
        if problems:
            raise ScenarioMismatch(
                f"fleetward LLM stand-in: scenario rule {rule_label} does not fit this request: "
                + "; ".join(problems)
                + " (set respond.allowMismatch: true to send it anyway)"
            )
    completion = count_tokens(content or "") + sum(
        count_tokens(c["function"]["name"] + c["function"]["arguments"]) for c in tool_calls
    )
    prompt = prompt_tokens(request)
    if respond.usage is not None:
        prompt = respond.usage.prompt_tokens if respond.usage.prompt_tokens is not None else prompt
        completion = respond.usage.completion_tokens if respond.usage.completion_tokens is not None else completion
    finish_reason = respond.finish_reason or ("tool_calls" if tool_calls else "stop")
    return Answer(
        model=respond.model or request.model,
        content=content,
        tool_calls=tool_calls,
        finish_reason=finish_reason,
        usage={"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    )


def _check_json(respond: Respond, request: ChatRequest) -> list[str]:
    name, schema = request.response_schema
    if not respond.has_json or schema is None:
        return []
    try:
        validator_class = jsonschema.validators.validator_for(schema)
        validator_class.check_schema(schema)
    except jsonschema.SchemaError:
        return []  # the client's schema is not one we can check against; the answer goes out unchecked
    errors = sorted(validator_class(schema).iter_errors(respond.json_value), key=lambda e: list(e.path))
    return [
        f"respond.json does not match response_format schema {name!r} at "
        f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message}"
        for e in errors[:3]
    ]


def _forces_a_tool_call(choice: Any) -> bool:
    """`required`, a named function or custom tool, or allowed_tools in mode `required`;
    `allowed_tools` in mode `auto` only narrows the choice (the model may still answer)."""
    if choice == "required":
        return True
    if not isinstance(choice, dict):
        return False
    if choice.get("type") == "allowed_tools":
        allowed = choice.get("allowed_tools")
        return isinstance(allowed, dict) and allowed.get("mode") == "required"
    return True


def _check_tool_calls(respond: Respond, request: ChatRequest) -> list[str]:
    offered = request.offered_tools
    choice = request.body.get("tool_choice")
    problems = []
    if not respond.tool_calls:
        if _forces_a_tool_call(choice):
            problems.append(f"the request's tool_choice {json.dumps(choice)} demands a tool call, the rule gives none")
        return problems
    if choice == "none":
        problems.append("the request's tool_choice is 'none' but the rule calls tools")
    for i, call in enumerate(respond.tool_calls):
        if call.name not in offered:
            problems.append(
                f"respond.toolCalls[{i}] calls {call.name!r}, but the request offers "
                f"{sorted(offered) if offered else 'no tools'}"
            )
            continue
        if isinstance(choice, dict) and (choice.get("function") or {}).get("name") not in (None, call.name):
            problems.append(
                f"respond.toolCalls[{i}] calls {call.name!r}, but tool_choice forces {choice['function']['name']!r}"
            )
        parameters = offered[call.name].get("parameters")
        if isinstance(call.arguments, dict) and isinstance(parameters, dict):
            try:
                jsonschema.validators.validator_for(parameters).check_schema(parameters)
            except jsonschema.SchemaError:
                continue
            for error in jsonschema.validators.validator_for(parameters)(parameters).iter_errors(call.arguments):
                problems.append(
                    f"respond.toolCalls[{i}].arguments do not match the parameters of {call.name!r} "
                    f"at {'/'.join(map(str, error.path)) or '(root)'}: {error.message}"
                )
                break
    return problems


def completion_body(answer: Answer, completion_id: str, created: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": answer.content, "refusal": None}
    if answer.tool_calls:
        message["tool_calls"] = answer.tool_calls
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": answer.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": answer.finish_reason}],
        "usage": answer.usage,
    }


def stream_chunks(answer: Answer, completion_id: str, created: int, include_usage: bool) -> list[dict[str, Any]]:
    """The chunks of a streamed answer: role, content pieces, tool calls (name first, arguments in
    pieces), the finish reason, and with stream_options.include_usage a last chunk with usage only."""
    base = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": answer.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        body = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if include_usage:
            body["usage"] = None
        return body

    chunks = [chunk({"role": "assistant", "content": "", "refusal": None})]
    chunks += [chunk({"content": piece}) for piece in _pieces(answer.content or "")]
    for index, call in enumerate(answer.tool_calls):
        chunks.append(
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": call["id"],
                            "type": "function",
                            "function": {"name": call["function"]["name"], "arguments": ""},
                        }
                    ]
                }
            )
        )
        chunks += [
            chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
            for piece in _pieces(call["function"]["arguments"])
        ]
    chunks.append(chunk({}, answer.finish_reason))
    if include_usage:
        chunks.append({**base, "choices": [], "usage": answer.usage})
    return chunks


def _pieces(text: str) -> list[str]:
    return [text[i : i + STREAM_PIECE_CHARS] for i in range(0, len(text), STREAM_PIECE_CHARS)]


def error_body(message: str, error_type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def now() -> int:
    return int(time.time())
