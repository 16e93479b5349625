"""One graph step per middleware hook kind (`one_step_per_hook`).

Why. LangChain's `create_agent` makes every middleware hook (before_agent, before_model,
after_model, after_agent) a graph node of its own, and the runtime checkpoints every node
before the next starts (durability "sync", runs.py). A plain request of a specialist with
memory and a PII Guardrail walked nine nodes, ten checkpoints; each checkpointed step costs
~2 ms of CPU on this kind of machine (bench/runtime_floor.py: ~0.6 ms LangGraph, ~1.5 ms the
SQLite saver), most of it for hooks that change nothing. LangChain has no option to merge
them, so this module does, without touching the middleware themselves:

- every hook of one kind runs in one node (`RunSteps.<kind>`), in the order create_agent
  would run them (before_* in list order, after_* last-listed first);
- each member sees the state as the members before it left it (`messages` merged with
  LangGraph's `add_messages`, the other keys replaced, as the graph's channels would; a
  key with another reducer would need it here too, and no state key of the runtime has
  one), and the node returns the members' updates combined;
- a member that jumps (`jump_to`) ends the node there, as its own node's jump would have
  skipped the rest; the node may jump wherever any member may;
- the members stay in the middleware list, their hook of that kind removed (a copy of the
  instance whose class lacks it), so their state schemas, tools, model/tool-call wrappers
  and stream transformers are as before.

What changes is only where the durable boundaries are: within one node, the members' updates
are checkpointed together. A member that raises (an `interrupt`, a halt, an error) loses the
updates of the members before it in the node, which run again when the node is retried or
resumed. So a member must be safe to run again on the same state, which the runtime's hooks
are (pure functions of the state, reads, or side effects keyed to be written once: events by
key, reviews and memory items by id). The hooks that interrupt (SOP retrieval, draft review)
run first in their nodes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from langchain.agents.middleware import AgentMiddleware
from langchain_core.messages import convert_to_messages
from langgraph.graph.message import add_messages

HOOKS = ("before_agent", "before_model", "after_model", "after_agent")


def _has_hook(middleware: AgentMiddleware, hook: str) -> bool:
    return _overrides(type(middleware), hook) or _overrides(type(middleware), f"a{hook}")


def _can_jump_to(middleware: AgentMiddleware, hook: str) -> list[str]:
    for name in (hook, f"a{hook}"):
        method = getattr(type(middleware), name)
        if method is not getattr(AgentMiddleware, name) and hasattr(method, "__can_jump_to__"):
            return list(method.__can_jump_to__)
    return []


def _overrides(cls: type, name: str) -> bool:
    return getattr(cls, name) is not getattr(AgentMiddleware, name)


class _Combined:
    """The state as each member sees it, and the members' updates combined."""

    def __init__(self, state: Any) -> None:
        self.state = dict(state)
        self.update: dict[str, Any] = {}

    def add(self, update: dict[str, Any] | None) -> bool:
        """Merge one member's update; True when it jumps (the rest of the node is skipped)."""
        for key, value in (update or {}).items():
            if key == "messages":
                # Message objects, so that add_messages gives the new ones their ids in
                # place: the combined update then carries the ids the later members saw.
                added = convert_to_messages(value if isinstance(value, list | tuple) else [value])
                self.state["messages"] = add_messages(self.state.get("messages") or [], added)
                self.update["messages"] = [*self.update.get("messages", []), *added]
            else:
                self.state[key] = value
                self.update[key] = value
        return bool(update and update.get("jump_to"))


def _without(middleware: AgentMiddleware, hooks: set[str]) -> AgentMiddleware:
    """A copy of `middleware` whose class lacks `hooks` (same name, everything else kept)."""
    cls = type(middleware)
    body: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
    for hook in hooks:
        body[hook] = getattr(AgentMiddleware, hook)
        body[f"a{hook}"] = getattr(AgentMiddleware, f"a{hook}")
    stripped = copy.copy(middleware)
    stripped.__class__ = type(cls.__name__, (cls,), body)
    return stripped


class RunSteps(AgentMiddleware):
    """The node of each hook kind that two or more middleware have (see the module
    docstring). Built by `one_step_per_hook`; its hook methods are set per instance's class."""

    def __init__(self, members: dict[str, list[AgentMiddleware]]) -> None:
        super().__init__()
        self.members = members


def _group_hooks(hook: str, members: list[AgentMiddleware], can_jump_to: list[str]) -> dict[str, Any]:
    """The group's `a<hook>` (each member's async hook, else its sync one, called on the
    original instance) and, when every member has a sync hook, its `<hook>` for synchronous
    runs (a member without one would make a synchronous run fail, as its own node would)."""

    async def run_async(self: RunSteps, state: Any, runtime: Any) -> Any:
        combined = _Combined(state)
        for middleware in self.members[hook]:
            if _overrides(type(middleware), f"a{hook}"):
                update = await getattr(middleware, f"a{hook}")(combined.state, runtime)
            else:
                update = getattr(middleware, hook)(combined.state, runtime)
            if combined.add(update):
                break
        return combined.update or None

    def run_sync(self: RunSteps, state: Any, runtime: Any) -> Any:
        combined = _Combined(state)
        for middleware in self.members[hook]:
            if combined.add(getattr(middleware, hook)(combined.state, runtime)):
                break
        return combined.update or None

    hooks: dict[str, Any] = {f"a{hook}": run_async}
    if all(_overrides(type(m), hook) for m in members):
        hooks[hook] = run_sync
    for name, fn in hooks.items():
        fn.__name__ = name
        if can_jump_to:
            fn.__can_jump_to__ = can_jump_to  # type: ignore[attr-defined]  # read by create_agent, like hook_config
    return hooks


def one_step_per_hook(middleware: Sequence[AgentMiddleware]) -> list[AgentMiddleware]:
    """`middleware` (create_agent's order) with each hook kind that two or more of them have
    run as one graph step (a `RunSteps` node) instead of one step per middleware."""
    grouped: dict[str, list[int]] = {}
    for hook in HOOKS:
        having = [i for i, m in enumerate(middleware) if _has_hook(m, hook)]
        if len(having) >= 2:
            grouped[hook] = having if hook.startswith("before") else having[::-1]
    if not grouped:
        return list(middleware)
    out = list(middleware)
    for i, m in enumerate(middleware):
        hooks = {hook for hook, indices in grouped.items() if i in indices}
        if hooks:
            out[i] = _without(m, hooks)
    # The grouped hooks run on the original instances: a hook may call another of its own
    # (PIIMiddleware's abefore_model calls self.before_model), which the copy lacks. The copy
    # shares the original's attributes (a shallow copy), so both see the same configuration.
    members = {hook: [middleware[i] for i in indices] for hook, indices in grouped.items()}
    body: dict[str, Any] = {}
    for hook, indices in grouped.items():
        jumps = sorted({j for i in indices for j in _can_jump_to(middleware[i], hook)})
        body.update(_group_hooks(hook, members[hook], jumps))
    return [*out, type("RunSteps", (RunSteps,), body)(members)]
