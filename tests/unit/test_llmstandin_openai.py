"""The LLM stand-in driven by the real langchain-openai ChatOpenAI client (sync, async, streaming)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import openai
import pytest
from langchain_core.messages import AIMessageChunk, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from fleetward.llmstandin import StandinServer, fingerprint
from fleetward.llmstandin.protocol import count_tokens

API_KEY = "sk-standin-test-0123456789"
MODEL = "standin-model"


class QueryAnalysis(BaseModel):
    intent: str
    urgency: Literal["low", "medium", "high", "critical"]
    is_sensitive: bool


@tool
def lookup_order(order_id: str) -> str:
    """Look up an order by id."""
    return f"order {order_id}: shipped"


@tool
def refund(order_id: str, amount: float) -> str:
    """Refund an order."""
    return "refunded"


@pytest.fixture
def llm() -> Iterator[StandinServer]:
    with StandinServer() as server:
        yield server


def chat(server: StandinServer, **kwargs: Any) -> ChatOpenAI:
    settings: dict[str, Any] = {
        "base_url": server.url,
        "api_key": API_KEY,
        "model": MODEL,
        "max_retries": 0,
        "timeout": 10,
    }
    return ChatOpenAI(**{**settings, **kwargs})


def join(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    total = chunks[0]
    for c in chunks[1:]:
        total = total + c
    return total


def wait_for(predicate: Any, seconds: float = 5.0) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {seconds}s")


# --- plain content, usage ---------------------------------------------------------------------------------


def test_plain_content_sync_and_async_with_usage_counts(llm: StandinServer) -> None:
    llm.set_scenario([{"match": {"lastUser": "hello"}, "respond": {"content": "Hello from the stand-in."}}])
    model = chat(llm)

    answer = model.invoke("hello there")
    assert answer.content == "Hello from the stand-in."
    # 1 message: 4 framing tokens + ceil(11 chars / 4) = 7; answer: ceil(24 / 4) = 6
    assert answer.usage_metadata is not None
    assert (answer.usage_metadata["input_tokens"], answer.usage_metadata["output_tokens"]) == (7, 6)
    assert answer.usage_metadata["total_tokens"] == 13
    assert answer.response_metadata["finish_reason"] == "stop"

    async_answer = asyncio.run(model.ainvoke("hello again"))
    assert async_answer.content == "Hello from the stand-in."
    assert [r["outcome"] for r in llm.requests()] == ["answered", "answered"]


def test_usage_override_from_the_scenario(llm: StandinServer) -> None:
    llm.set_scenario([{"respond": {"content": "ok", "usage": {"promptTokens": 1000, "completionTokens": 50}}}])
    usage = chat(llm).invoke("anything").usage_metadata
    assert usage is not None
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (1000, 50, 1050)


def test_streaming_content_in_pieces_with_usage_and_done(llm: StandinServer) -> None:
    text = "A streamed answer that is long enough to come in several pieces."
    llm.set_scenario([{"respond": {"content": text}}])
    chunks = list(chat(llm, stream_usage=True).stream("stream please"))
    assert sum(1 for c in chunks if c.content) >= 4
    total = join(chunks)
    assert total.content == text
    assert total.usage_metadata is not None
    assert total.usage_metadata["output_tokens"] == count_tokens(text)
    assert llm.requests()[0]["stream"] is True

    # The raw wire: SSE lines, the usage chunk last, then [DONE].
    with httpx.stream(
        "POST",
        f"{llm.url}/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2].removeprefix("data: "))
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == count_tokens(text)


def test_async_streaming(llm: StandinServer) -> None:
    llm.set_scenario([{"respond": {"content": "async streamed text, in pieces"}}])

    async def collect() -> list[AIMessageChunk]:
        return [c async for c in chat(llm).astream("hi")]

    assert join(asyncio.run(collect())).content == "async streamed text, in pieces"


# --- tool calls -------------------------------------------------------------------------------------------

TOOL_SCENARIO = [
    {
        "name": "answer-after-lookup",
        "match": {"toolResultFor": "lookup_order"},
        "respond": {"content": "Order 42 has shipped."},
    },
    {
        "name": "call-lookup",
        "match": {"toolsOffered": ["lookup_order"], "lastUser": "order 42"},
        "respond": {"toolCalls": [{"name": "lookup_order", "arguments": {"order_id": "42"}}]},
    },
]


def test_tool_call_round_trip_with_bind_tools(llm: StandinServer) -> None:
    llm.set_scenario(TOOL_SCENARIO)
    model = chat(llm).bind_tools([lookup_order, refund])

    first = model.invoke("where is order 42?")
    assert first.response_metadata["finish_reason"] == "tool_calls"
    assert [(c["name"], c["args"]) for c in first.tool_calls] == [("lookup_order", {"order_id": "42"})]
    call_id = first.tool_calls[0]["id"]
    assert call_id

    result = ToolMessage(content=lookup_order.invoke({"order_id": "42"}), tool_call_id=call_id)
    second = model.invoke([("user", "where is order 42?"), first, result])
    assert second.content == "Order 42 has shipped."

    sent = llm.requests()
    assert [r["rule"]["name"] for r in sent] == ["call-lookup", "answer-after-lookup"]
    assert {t["function"]["name"] for t in sent[0]["body"]["tools"]} == {"lookup_order", "refund"}
    # What reached the model on the second turn: the assistant's call and the tool's result, tied by id.
    messages = sent[1]["body"]["messages"]
    assert messages[1]["tool_calls"][0]["id"] == call_id
    assert messages[2] == {"role": "tool", "tool_call_id": call_id, "content": "order 42: shipped"}


def test_tool_calls_streamed_sync_and_async(llm: StandinServer) -> None:
    llm.set_scenario(
        [
            {
                "respond": {
                    "toolCalls": [
                        {"name": "refund", "arguments": {"order_id": "42", "amount": 12.5}, "id": "call_fixed"},
                        {"name": "lookup_order", "arguments": {"order_id": "43"}},
                    ]
                }
            }
        ]
    )
    model = chat(llm).bind_tools([lookup_order, refund])
    streamed = join(list(model.stream("refund 42, check 43")))
    assert [(c["id"], c["name"], c["args"]) for c in streamed.tool_calls] == [
        ("call_fixed", "refund", {"order_id": "42", "amount": 12.5}),
        (f"call_standin_{llm.requests()[0]['seq']}_1", "lookup_order", {"order_id": "43"}),
    ]

    async def collect() -> AIMessageChunk:
        return join([c async for c in model.astream("again")])

    assert [c["name"] for c in asyncio.run(collect()).tool_calls] == ["refund", "lookup_order"]


def test_tool_choice_forcing_a_tool_is_honoured_and_checked(llm: StandinServer) -> None:
    llm.set_scenario([{"respond": {"toolCalls": [{"name": "lookup_order", "arguments": {"order_id": "1"}}]}}])
    forced = chat(llm).bind_tools([lookup_order, refund], tool_choice="refund")
    with pytest.raises(openai.UnprocessableEntityError, match="tool_choice forces 'refund'"):
        forced.invoke("x")
    assert chat(llm).bind_tools([lookup_order], tool_choice="lookup_order").invoke("x").tool_calls[0]["args"] == {
        "order_id": "1"
    }


def test_allowed_tools_forces_a_call_only_in_mode_required(llm: StandinServer) -> None:
    llm.set_scenario([{"respond": {"content": "no tool needed"}}])
    client = openai.OpenAI(base_url=llm.url, api_key=API_KEY, max_retries=0)
    tool = {"type": "function", "function": {"name": "lookup_order", "parameters": {"type": "object"}}}

    def ask(mode: str) -> Any:
        choice = {"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": [tool]}}
        return client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], tools=[tool], tool_choice=choice
        )

    assert ask("auto").choices[0].message.content == "no tool needed"
    with pytest.raises(openai.UnprocessableEntityError, match="demands a tool call"):
        ask("required")


def test_tool_call_mistakes_are_reported_not_sent(llm: StandinServer) -> None:
    llm.set_scenario(
        [
            {
                "name": "wrong-args",
                "match": {"lastUser": "args"},
                "respond": {"toolCalls": [{"name": "lookup_order", "arguments": {"id": 42}}]},
            },
            {"name": "unknown-tool", "respond": {"toolCalls": [{"name": "delete_everything"}]}},
        ]
    )
    model = chat(llm).bind_tools([lookup_order])
    with pytest.raises(openai.UnprocessableEntityError, match=r"'order_id' is a required property"):
        model.invoke("bad args")
    with pytest.raises(
        openai.UnprocessableEntityError,
        match=r"rules\[1\] \('unknown-tool'\).*calls 'delete_everything', but the request offers "
        r"\['lookup_order'\]",
    ):
        model.invoke("other")
    assert [r["outcome"] for r in llm.requests()] == ["scenario_mismatch", "scenario_mismatch"]


def test_deliberately_broken_tool_arguments_go_out_verbatim(llm: StandinServer) -> None:
    llm.set_scenario([{"respond": {"toolCalls": [{"name": "lookup_order", "arguments": "{not json"}]}}])
    answer = chat(llm).bind_tools([lookup_order]).invoke("x")
    assert answer.tool_calls == []
    assert answer.invalid_tool_calls[0]["args"] == "{not json"


# --- structured output ------------------------------------------------------------------------------------

CLASSIFY = {
    "name": "classify",
    "match": {"schemaName": "QueryAnalysis"},
    "respond": {"json": {"intent": "refund request", "urgency": "high", "is_sensitive": False}},
}


def test_structured_output_json_schema_sync_async_and_streaming(llm: StandinServer) -> None:
    llm.set_scenario([CLASSIFY])
    classifier = chat(llm).with_structured_output(QueryAnalysis, method="json_schema", strict=True)
    expected = QueryAnalysis(intent="refund request", urgency="high", is_sensitive=False)

    assert classifier.invoke("I want my money back") == expected
    assert asyncio.run(classifier.ainvoke("I want my money back")) == expected
    assert list(classifier.stream("I want my money back"))[-1] == expected

    body = llm.requests()[0]["body"]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["name"] == "QueryAnalysis"
    assert body["response_format"]["json_schema"]["strict"] is True


def test_structured_output_that_breaks_the_schema_is_a_visible_scenario_error(llm: StandinServer) -> None:
    llm.set_scenario(
        [
            {
                "match": {"schemaName": "QueryAnalysis"},
                "respond": {"json": {"intent": "x", "urgency": "whenever", "is_sensitive": False}},
            }
        ]
    )
    classifier = chat(llm).with_structured_output(QueryAnalysis, method="json_schema")
    with pytest.raises(
        openai.UnprocessableEntityError,
        match=r"respond.json does not match response_format schema 'QueryAnalysis' at urgency",
    ):
        classifier.invoke("x")


def test_invalid_json_on_purpose_then_valid_for_retries(llm: StandinServer) -> None:
    llm.set_scenario(
        [{"match": {"schemaName": "QueryAnalysis"}, "times": 1, "respond": {"content": "{not json"}}, CLASSIFY]
    )
    classifier = chat(llm).with_structured_output(QueryAnalysis, method="json_schema")
    with pytest.raises(ValueError):  # pydantic's ValidationError of the client's parse, a ValueError
        classifier.invoke("x")
    assert classifier.invoke("x").urgency == "high"  # the `times: 1` rule is used up: the next rule answers
    assert [r["rule"]["index"] for r in llm.requests()] == [0, 1]


def test_function_calling_structured_output(llm: StandinServer) -> None:
    llm.set_scenario(
        [
            {
                "match": {"toolsOffered": ["QueryAnalysis"]},
                "respond": {
                    "toolCalls": [
                        {"name": "QueryAnalysis", "arguments": {"intent": "i", "urgency": "low", "is_sensitive": True}}
                    ]
                },
            }
        ]
    )
    result = chat(llm).with_structured_output(QueryAnalysis, method="function_calling").invoke("x")
    assert result == QueryAnalysis(intent="i", urgency="low", is_sensitive=True)


# --- errors, retries, times ---------------------------------------------------------------------------------


def test_429_twice_then_success_with_times_and_retry_after(llm: StandinServer) -> None:
    llm.set_scenario(
        [
            {"name": "busy", "times": 2, "error": {"status": 429, "retryAfter": 0.05}},
            {"name": "ok", "respond": {"content": "finally"}},
        ]
    )
    assert chat(llm, max_retries=2).invoke("x").content == "finally"
    sent = llm.requests()
    assert [(r["rule"]["name"], r["status"], r["outcome"]) for r in sent] == [
        ("busy", 429, "error"),
        ("busy", 429, "error"),
        ("ok", 200, "answered"),
    ]

    llm.set_scenario([{"times": 1, "error": {"status": 429, "retryAfter": 2}}, {"respond": {"content": "x"}}])
    response = httpx.post(
        f"{llm.url}/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    )
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert response.json()["error"]["type"] == "rate_limit_error"


def test_500_is_retried_by_the_client_and_then_raised(llm: StandinServer) -> None:
    llm.set_scenario([{"error": {"status": 500, "message": "scripted outage"}}])
    with pytest.raises(openai.InternalServerError, match="scripted outage"):
        chat(llm, max_retries=1).invoke("x")
    assert [r["status"] for r in llm.requests()] == [500, 500]


def test_503_with_a_custom_body(llm: StandinServer) -> None:
    llm.set_scenario([{"error": {"status": 503, "body": {"error": {"message": "overloaded", "type": "x"}}}}])
    with pytest.raises(openai.InternalServerError, match="overloaded"):
        chat(llm).invoke("x")


def test_400_and_401_are_not_retried(llm: StandinServer) -> None:
    llm.set_scenario(
        [
            {"match": {"apiKey": "sk-wrong"}, "error": {"status": 401}},
            {"error": {"status": 400, "message": "context too long"}},
        ]
    )
    with pytest.raises(openai.AuthenticationError):
        chat(llm, api_key="sk-wrong", max_retries=2).invoke("x")
    with pytest.raises(openai.BadRequestError, match="context too long"):
        chat(llm, max_retries=2).invoke("x")
    assert [r["status"] for r in llm.requests()] == [401, 400]


def test_no_matching_rule_is_a_clear_404_naming_the_request(llm: StandinServer) -> None:
    llm.set_scenario([{"match": {"model": "other-model"}, "respond": {"content": "x"}}])
    with pytest.raises(
        openai.NotFoundError,
        match=r"no scenario rule matches request #1 \(model='standin-model'.*lastUser='what now\?'",
    ):
        chat(llm).invoke("what now?")
    assert llm.requests()[0]["outcome"] == "no_match"


# --- timing: delay, hold, timeout ---------------------------------------------------------------------------


def test_delay_before_answering(llm: StandinServer) -> None:
    llm.set_scenario([{"delaySeconds": 0.4, "respond": {"content": "late"}}])
    started = time.monotonic()
    assert chat(llm).invoke("x").content == "late"
    assert time.monotonic() - started >= 0.4


def test_hold_is_seen_as_a_client_abort_when_the_client_gives_up(llm: StandinServer) -> None:
    llm.set_scenario([{"name": "slow", "holdSeconds": 30, "respond": {"content": "never seen"}}])
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        chat(llm, timeout=0.5).invoke("x")
    assert time.monotonic() - started < 5
    record = wait_for(lambda: next(iter(llm.requests(outcome="client_aborted")), None))
    assert record["rule"]["name"] == "slow" and record["status"] is None


def test_a_gated_rule_answers_only_after_its_gate_is_opened(llm: StandinServer) -> None:
    llm.set_scenario([{"name": "gated", "waitForGate": "go", "respond": {"content": "let through"}}])
    llm.close_gate("go")  # gates outlive scenarios: start this test from a known state
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        calls = [pool.submit(chat(llm).invoke, "x") for _ in range(2)]
        wait_for(lambda: len(llm.requests(outcome="pending")) == 2 or None)
        time.sleep(0.3)
        assert not any(c.done() for c in calls)  # held, however long the test waits
        assert httpx.get(f"{llm.root_url}/_standin/gates").json() == {"go": False}
        llm.open_gate("go")
        assert [c.result(timeout=5).content for c in calls] == ["let through", "let through"]
    assert chat(llm).invoke("x").content == "let through"  # an open gate stays open
    # Closed again over HTTP, a later request waits once more; opened over HTTP, it is answered.
    assert httpx.delete(f"{llm.root_url}/_standin/gates/go").json() == {"gate": "go", "open": False}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(chat(llm).invoke, "x")
        wait_for(lambda: llm.requests(outcome="pending") or None)
        assert not call.done()
        assert httpx.post(f"{llm.root_url}/_standin/gates/go").json() == {"gate": "go", "open": True}
        assert call.result(timeout=5).content == "let through"


def test_hold_in_a_stream_sends_the_first_chunk_then_waits(llm: StandinServer) -> None:
    llm.set_scenario([{"holdSeconds": 1.5, "respond": {"content": "after the hold"}}])
    started = time.monotonic()
    arrivals = [(time.monotonic() - started, c.content) for c in chat(llm).stream("x")]
    assert arrivals[0][0] < 1.0  # the role chunk, before the hold
    assert all(at >= 1.5 for at, content in arrivals if content)
    assert "".join(content for _, content in arrivals) == "after the hold"


def test_async_cancel_during_hold_is_recorded_as_abort(llm: StandinServer) -> None:
    llm.set_scenario([{"holdSeconds": 30, "respond": {"content": "x"}}])

    async def cancel_midway() -> None:
        call = asyncio.ensure_future(chat(llm).ainvoke("x"))
        while not llm.requests(outcome="pending"):
            await asyncio.sleep(0.02)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(asyncio.wait_for(cancel_midway(), 10))
    wait_for(lambda: llm.requests(outcome="client_aborted"))


def test_timeout_closes_the_connection_without_an_answer(llm: StandinServer) -> None:
    llm.set_scenario([{"timeout": 0.3}])
    started = time.monotonic()
    with pytest.raises(openai.APIConnectionError):
        chat(llm).invoke("x")
    assert 0.3 <= time.monotonic() - started < 5
    assert llm.requests()[0]["outcome"] == "timeout"


# --- matching on the request --------------------------------------------------------------------------------


def test_matching_on_model_system_headers_turns_and_stream(llm: StandinServer) -> None:
    llm.set_scenario(
        [
            {"name": "tenant", "match": {"headers": {"X-Tenant": "acme"}}, "respond": {"content": "acme"}},
            {
                "name": "router",
                "match": {"model": "router-model", "system": {"regex": "^You route"}},
                "respond": {"content": "routed"},
            },
            {"name": "second-turn", "match": {"priorTurns": {"min": 1}}, "respond": {"content": "again"}},
            {"name": "streamed", "match": {"stream": True}, "respond": {"content": "streamed"}},
            {"name": "fallback", "respond": {"content": "fallback"}},
        ]
    )
    assert chat(llm, default_headers={"X-Tenant": "acme"}).invoke("x").content == "acme"
    assert chat(llm, model="router-model").invoke([("system", "You route requests"), ("user", "x")]).content == "routed"
    assert chat(llm, model="router-model").invoke([("system", "You answer"), ("user", "x")]).content == "fallback"
    assert chat(llm).invoke([("user", "a"), ("assistant", "b"), ("user", "c")]).content == "again"
    assert join(list(chat(llm).stream("x"))).content == "streamed"
    assert [r["rule"]["name"] for r in llm.requests()] == ["tenant", "router", "fallback", "second-turn", "streamed"]
    assert [r["model"] for r in llm.requests(model="router-model")] == ["router-model", "router-model"]


# --- scenario replacement, recording, labelling ---------------------------------------------------------------


def test_scenario_replaced_at_run_time_over_http(llm: StandinServer) -> None:
    llm.set_scenario([{"respond": {"content": "first"}}])
    model = chat(llm)
    assert model.invoke("x").content == "first"

    replaced = httpx.post(
        f"{llm.root_url}/_standin/scenario", json={"name": "second", "rules": [{"respond": {"content": "second"}}]}
    )
    assert replaced.status_code == 200 and replaced.json() == {"rules": 1, "name": "second"}
    assert model.invoke("x").content == "second"

    bad = httpx.post(
        f"{llm.root_url}/_standin/scenario",
        json={"rules": [{"respond": {"content": "ok"}}, {"respond": {"contnet": "typo"}}]},
    )
    assert bad.status_code == 400
    message = bad.json()["error"]["message"]
    assert "rules[1]: field respond.contnet: Extra inputs are not permitted; allowed here: content," in message
    assert model.invoke("x").content == "second"  # a rejected scenario leaves the current one in place

    current = httpx.get(f"{llm.root_url}/_standin/scenario").json()
    assert current == {"scenario": {"name": "second", "rules": [{"respond": {"content": "second"}}]}, "uses": [2]}
    assert httpx.post(f"{llm.root_url}/_standin/scenario", json=current["scenario"]).status_code == 200
    assert httpx.get(f"{llm.root_url}/_standin/scenario").json()["uses"] == [0]


def test_requests_are_recorded_with_the_api_key_only_as_a_hash(llm: StandinServer, tmp_path: Any) -> None:
    llm.set_scenario([{"respond": {"content": "ok"}}])
    chat(llm).invoke("recorded question")
    chat(llm, model="other").invoke("second question")

    recorded = httpx.get(f"{llm.root_url}/_standin/requests").json()
    assert [r["seq"] for r in recorded] == [1, 2]
    first = recorded[0]
    assert first["method"] == "POST" and first["path"] == "/v1/chat/completions"
    assert first["body"]["messages"] == [{"role": "user", "content": "recorded question"}]
    assert first["headers"]["authorization"] == f"Bearer {fingerprint(API_KEY)}"
    assert first["response"]["choices"][0]["message"]["content"] == "ok"
    assert API_KEY not in json.dumps(recorded)

    only_other = httpx.get(f"{llm.root_url}/_standin/requests", params={"model": "other"}).json()
    assert [r["body"]["messages"][0]["content"] for r in only_other] == ["second question"]
    empty_filters = {"model": "", "rule": "", "outcome": ""}  # as the docs write the URL: no filter
    assert len(httpx.get(f"{llm.root_url}/_standin/requests", params=empty_filters).json()) == 2
    assert httpx.delete(f"{llm.root_url}/_standin/requests").json() == {"deleted": 2}
    assert httpx.get(f"{llm.root_url}/_standin/requests").json() == []


def test_record_file_gets_json_lines_without_the_key(tmp_path: Any) -> None:
    path = tmp_path / "requests.jsonl"
    with StandinServer([{"respond": {"content": "ok"}}], record=str(path)) as server:  # a str path works too
        chat(server).invoke("one")
        chat(server).invoke("two")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["body"]["messages"][0]["content"] for line in lines] == ["one", "two"]
    assert API_KEY not in path.read_text()


def test_labelled_as_a_stand_in(llm: StandinServer) -> None:
    llm.set_scenario(
        {"models": ["gpt-standin"], "rules": [{"match": {"model": "router-model"}, "respond": {"content": "x"}}]}
    )
    client = openai.OpenAI(base_url=llm.url, api_key=API_KEY)
    models = client.models.list()
    assert [(m.id, m.owned_by) for m in models.data] == [
        ("gpt-standin", "fleetward-standin"),
        ("router-model", "fleetward-standin"),
    ]
    response = httpx.get(f"{llm.url}/models")
    assert "stand-in" in response.headers["server"]
    assert httpx.get(f"{llm.root_url}/_standin").json()["standin"] is True
    unsupported = httpx.post(f"{llm.url}/responses", json={})
    assert unsupported.status_code == 404 and "only POST /v1/chat/completions" in unsupported.text


def test_bad_requests_get_openai_style_400s(llm: StandinServer) -> None:
    llm.set_scenario([{"respond": {"content": "x"}}])
    not_json = httpx.post(f"{llm.url}/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and "not JSON" in not_json.json()["error"]["message"]
    no_messages = httpx.post(f"{llm.url}/chat/completions", json={"model": MODEL, "messages": []})
    assert no_messages.status_code == 400 and no_messages.json()["error"]["param"] == "messages"
    assert [r["outcome"] for r in llm.requests()] == ["bad_request", "bad_request"]
