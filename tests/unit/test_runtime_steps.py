"""One graph step per middleware hook kind (middleware/steps.py), in a real LangChain agent
with a real LangGraph checkpointer; the chat model is a scripted fake."""

from __future__ import annotations

import asyncio
from typing import Any, NotRequired

from fleetward.runtime.middleware.steps import one_step_per_hook
from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware, AgentState, hook_config
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command, interrupt


class TraceState(AgentState):
    trace: NotRequired[list[str]]


def traced(state: Any, name: str) -> dict[str, Any]:
    return {"trace": [*(state.get("trace") or []), name]}


class Recorder(AgentMiddleware[TraceState, Any]):
    """Appends its name to `trace` in every hook (so each sees what the ones before left)."""

    state_schema = TraceState

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    async def abefore_agent(self, state: Any, runtime: Any) -> dict[str, Any]:
        return traced(state, f"{self._name}.before_agent")

    async def abefore_model(self, state: Any, runtime: Any) -> dict[str, Any]:
        return traced(state, f"{self._name}.before_model")

    async def aafter_model(self, state: Any, runtime: Any) -> dict[str, Any]:
        return traced(state, f"{self._name}.after_model")

    async def aafter_agent(self, state: Any, runtime: Any) -> dict[str, Any]:
        return traced(state, f"{self._name}.after_agent")


class Stopper(AgentMiddleware[TraceState, Any]):
    """Ends the run before the model when the request says "stop"."""

    state_schema = TraceState

    @hook_config(can_jump_to=["end"])
    async def abefore_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        if state["messages"][-1].text == "stop":
            return {**traced(state, "Stopper.before_model"), "jump_to": "end"}
        return None


class Reviewer(AgentMiddleware[TraceState, Any]):
    """Waits for a human after the agent (an interrupt), then appends the decision."""

    state_schema = TraceState

    async def aafter_agent(self, state: Any, runtime: Any) -> dict[str, Any]:
        decision = interrupt({"kind": "review"})
        return {**traced(state, f"Reviewer:{decision}"), "messages": [AIMessage(f"reviewed: {decision}")]}


def model(*replies: str) -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter([AIMessage(r) for r in replies]))


def nodes(agent: Any) -> set[str]:
    return set(agent.get_graph().nodes) - {"__start__", "__end__"}


def test_each_hook_kind_is_one_step_and_the_members_run_in_create_agents_order():
    middleware = [Recorder("a"), Recorder("b"), Recorder("c")]
    listed = create_agent(model("hi"), middleware=middleware)
    grouped = create_agent(model("hi"), middleware=one_step_per_hook(middleware))
    assert len(nodes(listed)) == 1 + 4 * 3
    assert nodes(grouped) == {
        "model",
        "RunSteps.before_agent",
        "RunSteps.before_model",
        "RunSteps.after_model",
        "RunSteps.after_agent",
    }
    trace = asyncio.run(grouped.ainvoke({"messages": [HumanMessage("hello")]}))["trace"]
    assert trace == asyncio.run(listed.ainvoke({"messages": [HumanMessage("hello")]}))["trace"]
    assert trace == [
        "a.before_agent",
        "b.before_agent",
        "c.before_agent",
        "a.before_model",
        "b.before_model",
        "c.before_model",
        "c.after_model",
        "b.after_model",
        "a.after_model",
        "c.after_agent",
        "b.after_agent",
        "a.after_agent",
    ]


def test_a_single_hook_of_a_kind_keeps_its_own_node_and_the_input_list_is_not_changed():
    middleware = [Recorder("a"), Stopper()]
    grouped = one_step_per_hook(middleware)
    assert [type(m) for m in middleware] == [Recorder, Stopper]  # copies were changed, not these
    assert nodes(create_agent(model("hi"), middleware=grouped)) == {
        "model",
        "a.before_agent",
        "RunSteps.before_model",
        "a.after_model",
        "a.after_agent",
    }
    assert one_step_per_hook([Recorder("a")])[0].name == "a"


def test_a_jump_ends_the_step_and_skips_the_model_as_its_own_node_would():
    middleware = [Stopper(), Recorder("after_stopper")]
    listed = asyncio.run(create_agent(model("x"), middleware=middleware).ainvoke({"messages": [HumanMessage("stop")]}))
    agent = create_agent(model("never sent"), middleware=one_step_per_hook(middleware))
    result = asyncio.run(agent.ainvoke({"messages": [HumanMessage("stop")]}))
    # "end" leaves the agent loop: the later before_model member, the model and the
    # after_model hooks are skipped; the after_agent hooks still run
    assert (
        result["trace"]
        == listed["trace"]
        == [
            "after_stopper.before_agent",
            "Stopper.before_model",
            "after_stopper.after_agent",
        ]
    )
    assert [m.type for m in result["messages"]] == ["human"]
    go_on = asyncio.run(agent.ainvoke({"messages": [HumanMessage("go on")]}))
    assert go_on["messages"][-1].text == "never sent"  # the same model answers when nobody jumps


def test_an_interrupt_in_a_step_resumes_into_the_same_step_with_the_members_before_it_run_again():
    # after_agent runs last-listed first: the Reviewer waits, then the Recorder records.
    agent = create_agent(
        model("draft"),
        middleware=one_step_per_hook([Recorder("memory"), Reviewer()]),
        checkpointer=InMemorySaver(),
    )
    thread = {"configurable": {"thread_id": "t1"}}
    waiting = asyncio.run(agent.ainvoke({"messages": [HumanMessage("hello")]}, thread))
    assert [i.value for i in waiting["__interrupt__"]] == [{"kind": "review"}]
    assert "memory.after_agent" not in waiting["trace"]  # nothing after the interrupt ran
    done = asyncio.run(agent.ainvoke(Command(resume="approved"), thread))
    assert done["trace"][-2:] == ["Reviewer:approved", "memory.after_agent"]
    assert [m.text for m in done["messages"]] == ["hello", "draft", "reviewed: approved"]
