"""The LLM stand-in's scenario format, its error messages, request matching and token counting."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from fleetward.llmstandin import ScenarioError, StandinServer, load_scenarios, parse_scenario
from fleetward.llmstandin.matching import BadRequest, ChatRequest, RuleBook
from fleetward.llmstandin.protocol import ScenarioMismatch, build_answer, prompt_tokens
from fleetward.llmstandin.scenario import TextMatch

# --- loading ----------------------------------------------------------------------------------------------


def test_yaml_json_and_folders_load_in_order(tmp_path: Path) -> None:
    folder = tmp_path / "scenarios"
    folder.mkdir()
    (folder / "b.json").write_text(
        json.dumps({"models": ["m2"], "rules": [{"name": "b", "respond": {"content": "B"}}]})
    )
    (folder / "a.yaml").write_text("models: [m1]\nrules:\n  - name: a\n    respond: {content: A}\n")
    (folder / "notes.txt").write_text("ignored")
    single = tmp_path / "first.yml"
    single.write_text("- name: first\n  match: {model: m0}\n  respond: {content: zero}\n")  # a bare list of rules

    scenario = load_scenarios([single, folder])
    assert [r.name for r in scenario.rules] == ["first", "a", "b"]
    assert scenario.model_names() == ["m1", "m2", "m0"]


def test_bad_rule_in_a_file_names_file_rule_index_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("""
rules:
  - respond: {content: fine}
  - name: refund
    match: {lastUser: refund}
    respond:
      toolCalls:
        - name: refund
          arguments: 5
""")
    with pytest.raises(ScenarioError) as caught:
        load_scenarios([path])
    assert str(caught.value) == (
        f"{path}: rules[1] ('refund'): field respond.toolCalls[0].arguments: "
        "Input should be a valid dictionary (got 5) or Input should be a valid string (got 5)"
    )


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (
            {"respond": {"content": "x"}, "delaySecond": 1},
            "rules[0]: field delaySecond: Extra inputs are not permitted; allowed here: name, match, respond, error, "
            "timeout, delaySeconds, holdSeconds, waitForGate, times",
        ),
        (
            {"match": {"model": "m"}},
            "rules[0]: field (the rule itself): a rule needs exactly one of respond, error, timeout (got none)",
        ),
        (
            {"respond": {"content": "x"}, "error": {"status": 500}},
            "rules[0]: field (the rule itself): a rule needs exactly one of respond, error, timeout "
            "(got ['respond', 'error'])",
        ),
        (
            {"match": {"lastUser": {"regex": "("}}, "respond": {"content": "x"}},
            "rules[0]: field match.lastUser.regex: not a valid Python regular expression",
        ),
        (
            {"match": {"toolsOffered": "yes"}, "respond": {"content": "x"}},
            "rules[0]: field match.toolsOffered: Input should be a valid boolean (got 'yes')",
        ),
        (
            {"match": {"headers": {"X-Tenant": {"equal": "a"}}}, "respond": {"content": "x"}},
            "rules[0]: field match.headers['X-Tenant'].equal: Extra inputs are not permitted; allowed here: equals, "
            "contains, regex, ignoreCase",
        ),
        (
            {"match": {"priorTurns": "2"}, "respond": {"content": "x"}},
            "rules[0]: field match.priorTurns: expected a whole number or a mapping of min, max (got '2')",
        ),
        (
            {"error": {"status": 200}},
            "rules[0]: field error.status: Input should be greater than or equal to 400 (got 200)",
        ),
        (
            {"respond": {"content": "x"}, "times": 0},
            "rules[0]: field times: Input should be greater than or equal to 1",
        ),
        (
            {"respond": {"content": "x", "json": {}}},
            "rules[0]: field respond: give content (verbatim text) or json (checked against the schema), not both",
        ),
        (
            {"respond": {"content": "x", "finishReason": "done"}},
            "rules[0]: field respond.finishReason: Input should be 'stop', 'length', 'tool_calls' or 'content_filter'",
        ),
        ({"timeout": 1, "holdSeconds": 1}, "rules[0]: field (the rule itself): holdSeconds cannot be combined"),
    ],
)
def test_rule_errors_name_the_field_and_what_is_allowed(rule: dict, expected: str) -> None:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario({"rules": [rule]}, "inline")
    assert str(caught.value).startswith(f"inline: {expected}")


def test_file_level_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("rules: [\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ScenarioError, match=r"broken.yaml: not valid YAML"):
        load_scenarios([broken])
    with pytest.raises(ScenarioError, match=r"empty.yaml: file is empty"):
        load_scenarios([empty])
    with pytest.raises(ScenarioError, match=r"missing.yaml: no such scenario file or folder"):
        load_scenarios([tmp_path / "missing.yaml"])
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ScenarioError, match=r"nothing: folder holds no scenario file"):
        load_scenarios([tmp_path / "nothing"])
    with pytest.raises(ScenarioError, match=r"field rulez: Extra inputs are not permitted; allowed here: name, models"):
        parse_scenario({"rulez": []}, "inline")
    with pytest.raises(ScenarioError, match=r"a scenario is a mapping with a 'rules' list"):
        parse_scenario("rules", "inline")


def test_set_scenario_rejects_a_bad_scenario_and_keeps_the_old_one() -> None:
    with StandinServer([{"respond": {"content": "kept"}}]) as server:
        with pytest.raises(ScenarioError, match=r"rules\[0\]: field respond.toolCalls\[0\].name"):
            server.set_scenario([{"respond": {"toolCalls": [{"name": ""}]}}])
        assert server.rulebook.scenario.rules[0].respond.content == "kept"  # type: ignore[union-attr]


# --- matching -------------------------------------------------------------------------------------------------


def test_text_match_semantics_and_shorthands() -> None:
    assert TextMatch(contains="Refund", ignore_case=True).test("please REFUND me")
    assert not TextMatch(contains="Refund").test("please refund me")
    assert TextMatch(regex=r"order \d+").test("where is order 42?")
    assert TextMatch(equals="a", contains="a").test("a")
    assert not TextMatch(equals="a").test(None)
    match = parse_scenario([{"match": {"model": "gpt", "lastUser": "gpt"}, "respond": {"content": "x"}}], "s")
    assert match.rules[0].match.model == TextMatch(equals="gpt")  # names: exact
    assert match.rules[0].match.last_user == TextMatch(contains="gpt")  # message texts: substring


def request(messages: list[dict], headers: dict[str, str] | None = None, **body: object) -> ChatRequest:
    return ChatRequest({"model": "m", "messages": messages, **body}, headers or {})


def test_chat_request_facts() -> None:
    chat = request(
        [
            {"role": "system", "content": "You are the router."},
            {"role": "user", "content": [{"type": "text", "text": "where is "}, {"type": "text", "text": "order 42"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "shipped"},
        ],
        {"Authorization": "Bearer sk-1"},
        tools=[{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
        response_format={"type": "json_schema", "json_schema": {"name": "S", "schema": {"type": "object"}}},
    )
    assert chat.last_text("user") == "where is order 42"
    assert chat.last_text("tool") == "shipped"
    assert chat.system_text == "You are the router."
    assert chat.tool_results_for == {"lookup"}
    assert set(chat.offered_tools) == {"lookup"}
    assert chat.response_schema == ("S", {"type": "object"})
    assert chat.prior_turns == 1
    assert chat.api_key == "sk-1"


USER = {"role": "user", "content": "x"}
CALLS = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "a", "arguments": "{}"}},
        {"id": "c2", "type": "function", "function": {"name": "b", "arguments": "{}"}},
    ],
}
ANSWER_1 = {"role": "tool", "tool_call_id": "c1", "content": "r1"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m", "messages": "hi"}, "messages"),
        ({"model": "m", "messages": [{"content": "no role"}]}, "messages[0]"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": {}}, "tools"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}, "tool_choice"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        # as OpenAI answers 400: tool calls left unanswered, a result for no call, a result without its id
        ({"model": "m", "messages": [USER, CALLS, USER]}, "messages[1]"),
        ({"model": "m", "messages": [USER, CALLS, ANSWER_1]}, "messages[1]"),
        ({"model": "m", "messages": [USER, ANSWER_1]}, "messages[1]"),
        ({"model": "m", "messages": [USER, CALLS, ANSWER_1, {"role": "tool", "content": "x"}]}, "messages[3]"),
    ],
)
def test_malformed_requests_name_the_parameter(body: dict, param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        ChatRequest(body, {})
    assert caught.value.param == param


def test_a_tool_round_trip_in_any_order_is_accepted() -> None:
    answer_2 = {"role": "tool", "tool_call_id": "c2", "content": "r2"}
    request = ChatRequest({"model": "m", "messages": [USER, CALLS, answer_2, ANSWER_1, USER]}, {})
    assert len(request.messages) == 5


def test_rulebook_times_fall_through_and_replacement_resets_counts() -> None:
    scenario = parse_scenario(
        [{"name": "twice", "times": 2, "respond": {"content": "a"}}, {"name": "after", "respond": {"content": "b"}}],
        "s",
    )
    book = RuleBook(scenario)
    chat = request([{"role": "user", "content": "x"}])
    assert [book.pick(chat)[0] for _ in range(4)] == [0, 0, 1, 1]  # type: ignore[index]
    assert book.uses() == [2, 2]
    book.replace(scenario)
    assert book.pick(chat)[0] == 0  # type: ignore[index]


def test_tools_offered_and_tool_result_conditions() -> None:
    scenario = parse_scenario(
        [
            {"name": "no-tools", "match": {"toolsOffered": False}, "respond": {"content": "plain"}},
            {"name": "after", "match": {"toolResultFor": "lookup", "lastRole": "tool"}, "respond": {"content": "done"}},
            {"name": "needs-both", "match": {"toolsOffered": ["lookup", "refund"]}, "respond": {"content": "both"}},
            {"name": "any-tools", "match": {"toolsOffered": True}, "respond": {"content": "some"}},
        ],
        "s",
    )
    book = RuleBook(scenario)
    tools = [{"type": "function", "function": {"name": "lookup"}}]
    assert book.pick(request([{"role": "user", "content": "x"}]))[1].name == "no-tools"  # type: ignore[index]
    assert book.pick(request([{"role": "user", "content": "x"}], tools=tools))[1].name == "any-tools"  # type: ignore[index]
    both = [*tools, {"type": "function", "function": {"name": "refund"}}]
    assert book.pick(request([{"role": "user", "content": "x"}], tools=both))[1].name == "needs-both"  # type: ignore[index]
    after = [
        {"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "lookup", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "1", "content": "r"},
    ]
    assert book.pick(request(after, tools=tools))[1].name == "after"  # type: ignore[index]


# --- answers and token counts ----------------------------------------------------------------------------------


def test_prompt_tokens_are_a_documented_approximation() -> None:
    chat = request([{"role": "system", "content": "12345678"}, {"role": "user", "content": "123"}])
    assert prompt_tokens(chat) == (4 + 2) + (4 + 1)
    tools = [{"type": "function", "function": {"name": "t"}}]
    with_tools = request([{"role": "user", "content": "123"}], tools=tools)
    tools_json = json.dumps(tools, separators=(",", ":"), sort_keys=True)
    assert prompt_tokens(with_tools) == 5 + -(-len(tools_json) // 4)


def test_allow_mismatch_sends_a_schema_breaking_answer_anyway() -> None:
    chat = request(
        [{"role": "user", "content": "x"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "S", "schema": {"type": "object", "required": ["a"]}},
        },
    )
    strict = parse_scenario([{"respond": {"json": {"b": 1}}}], "s").rules[0].respond
    lenient = parse_scenario([{"respond": {"json": {"b": 1}, "allowMismatch": True}}], "s").rules[0].respond
    with pytest.raises(ScenarioMismatch, match="'a' is a required property"):
        build_answer(strict, chat, "call", "rules[0]")  # type: ignore[arg-type]
    assert build_answer(lenient, chat, "call", "rules[0]").content == '{"b": 1}'  # type: ignore[arg-type]


def test_a_busy_port_is_an_error_at_start() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            StandinServer(port=taken.getsockname()[1]).start()


def test_the_documented_example_scenario_is_valid() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "llm-standin.md").read_text()
    example = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    scenario = parse_scenario(yaml.safe_load(example), "docs/llm-standin.md")
    assert [r.name for r in scenario.rules] == ["classify", "rate-limited-twice", "look-up-first", "answer-with-result"]
    assert scenario.rules[2].match.last_user.test("where is order 42?")  # type: ignore[union-attr]
    # The tool-call round trip it describes: the call, then (the result in the conversation,
    # the user's message still there) the answer, not the same call again.
    book = RuleBook(scenario)
    tool = {"type": "function", "function": {"name": "lookup_order", "parameters": {"type": "object"}}}
    ask = [{"role": "user", "content": "where is order 42?"}]
    first = book.pick(ChatRequest({"model": "m", "messages": ask, "tools": [tool]}, {}))
    assert first is not None and first[1].name == "look-up-first"
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup_order", "arguments": '{"order_id": "42"}'}}
    after = [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped"}'},
    ]
    second = book.pick(ChatRequest({"model": "m", "messages": after, "tools": [tool]}, {}))
    assert second is not None and second[1].name == "answer-with-result"
