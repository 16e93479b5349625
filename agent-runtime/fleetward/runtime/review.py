"""Human review as durable interrupts (SPEC §4; Agent `spec.humanReview`, tools'
`requiresApproval`, SOP steps' `approval: human`).

A run that needs a human decision stops at a LangGraph `interrupt`: its state is in the
checkpoint, the command that got it there is committed, and nothing in the process holds
it, so a pod can die and another serve the decision. What asks:

- a tool call (`ReviewedToolsMiddleware`): a tool with `requiresApproval`, or the tool of a
  step of the run's SOP with `approval: human`. Composed from LangChain's
  HumanInTheLoopMiddleware in its `per_call` mode (one interrupt per gated call, raised as
  the call starts, inside the SOP gate so a call the gate refuses never reaches a reviewer),
  reusing its configuration, edit and rejection handling. Ours on top: the
  `approval_required` event and the review's deadline before the interrupt, and answers in
  the shape of the wire's `resume` command (one decision per command, see below) instead of
  LangChain's decision objects.
- the draft answer (`DraftReviewMiddleware`, after the agent loop, before the reply is
  sent): `draftApproval: always`; `riskAbove` when `draft_risk` scores the run above
  `riskThreshold`; and whenever the run's SOP has a step with `approval: human` and no tool
  (nothing else in code can gate such a step). LangChain has no draft review; ours.

The decision comes back as a `resume` command (runs.py turns it into the interrupt's
answer, emits `approval_decision` and writes the audit record). The wire protocol carries
one decision per command and no review id: when a run waits for several reviews (the model
asked for two gated calls at once), each decision answers the oldest open one.

Timeouts (`reviewTimeoutSeconds`, `onTimeout`): every open review is a row in the ledger
(`fw_reviews`) with its deadline, written before the interrupt, so the deadline survives
restarts. `ReviewTimer`, in every replica, finds reviews past their deadline and produces
a `resume` command from `TIMEOUT_REVIEWER` to the agent's own request topic (idempotency
key per review, so replicas racing produce one effective command). It goes through intake
like a reviewer's decision: served by the partition's owner, in order with the session's
other commands, never concurrently with them. runs.py honours it only once the deadline
has passed (a copy of the identity typed by someone else changes nothing early). Then
`reject` rejects the draft (the session's status becomes `TimedOut`, the run's end) or the
tool call (not executed; the model is told and the run goes on, status `Active` with the
reason), and `escalate` hands the session to the human queue (status `TimedOut`).

`fleetward_human_review_queue_depth{agent}` is the number of open reviews of the agent, read
from the ledger by the timer (with PostgreSQL every replica reports the agent's whole
count: aggregate with max, not sum).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NotRequired

from fleetward.runtime.context import DEFAULT_HUMAN_QUEUE, RunContext
from fleetward.runtime.middleware.guardrails import GUARDRAIL_METADATA, redact_value, scan
from fleetward.runtime.middleware.sop_gate import SpecialistState, check_tool_call, succeeded_tools
from fleetward.runtime.telemetry import HUMAN_REVIEW_QUEUE_DEPTH
from langchain.agents.middleware import AgentMiddleware, HumanInTheLoopMiddleware, hook_config
from langchain.agents.middleware.human_in_the_loop import InterruptOnConfig, _answer_message
from langchain_core.messages import AIMessage, ToolMessage
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.runtime import Runtime
from langgraph.types import Command, interrupt

from fleetward.api.agent import AgentSpec
from fleetward.api.envelopes import AgentCommand

log = logging.getLogger("fleetward.runtime.review")

APPROVAL_INTERRUPT = "approval"
"""The `kind` of every review interrupt; `resume` commands answer it."""
TIMEOUT_REVIEWER = "fleetward:review-timeout"
"""The reviewer identity of the resume command that enforces a review's deadline."""
DRAFT_REVIEW_ID = "draft"


class ReviewState(SpecialistState):
    review: NotRequired[dict[str, Any] | None]
    """The draft's review once decided: {decision, reviewer, text?, timedOut?, onTimeout?}."""
    review_escalation: NotRequired[dict[str, Any] | None]
    """Set when a tool review timed out with onTimeout escalate: {queue, reason}; the run
    then ends without an answer and the respond step escalates the session."""
    handoff: NotRequired[dict[str, Any] | None]
    """The router's analysis when the request came as a handoff (runs.py)."""
    requester: NotRequired[dict[str, Any] | None]
    """The verified user of the request (runs.py)."""


# --- the policy --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReviewPolicy:
    draft_approval: str
    risk_threshold: int | None
    timeout_seconds: int
    on_timeout: str
    approval_tools: frozenset[str]
    mutating_tools: frozenset[str]

    @classmethod
    def of(cls, spec: AgentSpec) -> ReviewPolicy:
        hr = spec.human_review
        tools = spec.tools or []
        return cls(
            draft_approval=hr.draft_approval,
            risk_threshold=hr.risk_threshold,
            timeout_seconds=hr.review_timeout_seconds,
            on_timeout=hr.on_timeout,
            approval_tools=frozenset(t.name for t in tools if t.requires_approval),
            mutating_tools=frozenset(t.name for t in tools if t.mutating),
        )


# Risk of sending a draft without a human (draftApproval riskAbove): a fixed rubric over
# facts of the run, so a reviewer reads in the request why it was asked (no model scores
# its own answer). Weights add up and are capped at 100.
RISK_WEIGHTS = {
    "mutating_tool": 40,  # the run changed something (a refund, a revoked token)
    "sensitive": 25,  # the router classified the request as sensitive
    "urgency_high": 10,
    "urgency_critical": 20,
    "human_sop": 15,  # the procedure was typed in by a human, not a reviewed SOP
    "refused_call": 10,  # the runtime refused a call the model wanted (per call, at most 2)
    "no_sop": 10,  # answered without any SOP
}


def draft_risk(state: Mapping[str, Any], policy: ReviewPolicy) -> tuple[int, list[str]]:
    """(score 0-100, the factors that contributed) for the run's draft."""
    factors: list[str] = []
    score = 0
    messages = state.get("messages") or []
    changed = sorted(succeeded_tools(messages) & policy.mutating_tools)
    if changed:
        score += RISK_WEIGHTS["mutating_tool"]
        factors.append(f"changed state with {', '.join(changed)}")
    analysis = (state.get("handoff") or {}).get("analysis") or {}
    if analysis.get("isSensitive"):
        score += RISK_WEIGHTS["sensitive"]
        factors.append("classified sensitive")
    urgency = analysis.get("urgency")
    if urgency in ("high", "critical"):
        score += RISK_WEIGHTS[f"urgency_{urgency}"]
        factors.append(f"urgency {urgency}")
    sop = state.get("sop")
    if not sop:
        score += RISK_WEIGHTS["no_sop"]
        factors.append("no SOP")
    elif sop.get("provided"):
        score += RISK_WEIGHTS["human_sop"]
        factors.append("procedure provided by a human")
    refused = sum(
        1 for m in messages if isinstance(m, ToolMessage) and isinstance(m.artifact, dict) and m.artifact.get("refused")
    )
    if refused:
        score += RISK_WEIGHTS["refused_call"] * min(refused, 2)
        factors.append(f"{refused} refused tool call(s)")
    return min(score, 100), factors


def step_approvals(sop: Mapping[str, Any] | None) -> tuple[dict[str, str], list[str]]:
    """From the run's SOP: {tool: step id} of tool steps with `approval: human`, and the ids
    of such steps without a tool (their outcome is in the draft, so the draft is reviewed)."""
    tools: dict[str, str] = {}
    toolless: list[str] = []
    for st in (sop or {}).get("steps") or []:
        if st.get("approval") != "human":
            continue
        if st.get("tool"):
            tools.setdefault(st["tool"], st["id"])
        else:
            toolless.append(st["id"])
    return tools, toolless


def draft_review_reason(state: Mapping[str, Any], policy: ReviewPolicy) -> str | None:
    """Why the draft needs a human, or None when it may be sent."""
    _, toolless = step_approvals(state.get("sop"))
    if toolless:
        sop = state.get("sop") or {}
        return f"SOP {sop.get('name')} step(s) {', '.join(toolless)} require human approval"
    if policy.draft_approval == "always":
        return "humanReview.draftApproval is always: every draft is reviewed"
    if policy.draft_approval == "riskAbove":
        score, factors = draft_risk(state, policy)
        threshold = policy.risk_threshold if policy.risk_threshold is not None else 100
        if score > threshold:
            return f"risk {score} is above the threshold {threshold} ({'; '.join(factors)})"
    return None


# --- asking ------------------------------------------------------------------------------------


async def open_review(
    ctx: RunContext, review_id: str, kind: str, policy: ReviewPolicy, event: dict[str, Any], step: str
) -> None:
    """Record the review and its deadline (kept on replay), then tell the session: the
    `approval_required` event and the WaitingForHuman status. Call right before `interrupt`."""
    deadline = datetime.now(UTC) + timedelta(seconds=policy.timeout_seconds)
    review = await ctx.services.ledger.open_review(
        ctx.run_id, review_id, ctx.services.agent, ctx.session_id, kind, deadline
    )
    left = max(1, int((review.deadline - datetime.now(UTC)).total_seconds()))
    await ctx.emit(
        f"approval_required/{review_id}",
        "approval_required",
        {**event, "reviewId": review_id, "timeoutSeconds": min(left, policy.timeout_seconds)},
    )
    await ctx.emit(
        f"review-waiting/{review_id}",
        "status",
        {"state": "WaitingForHuman", "step": step, "detail": f"waiting for a reviewer (review {review_id})"},
    )


def timed_out_status(policy_timeout: int, what: str, on_timeout: str) -> dict[str, Any]:
    return {
        "state": "TimedOut",
        "step": "review",
        "detail": f"no reviewer decided on the {what} within {policy_timeout} s (onTimeout: {on_timeout})",
    }


class ReviewedToolsMiddleware(HumanInTheLoopMiddleware):
    """Tool calls that need a reviewer's approval (module docstring). Answers are the
    runtime's (see `resume_answer`): approve, edit (`edit` is a JSON object of the tool's
    arguments), reject, or a timeout."""

    state_schema = ReviewState

    def __init__(self, policy: ReviewPolicy, allowed_tools: set[str], sops: list[Any]) -> None:
        interrupt_on: dict[str, bool | InterruptOnConfig] = {
            name: InterruptOnConfig(allowed_decisions=["approve", "edit", "reject"], when=self._needs_review)
            for name in allowed_tools
        }
        super().__init__(interrupt_on, interrupt_mode="per_call", description_prefix="Tool call needs approval")
        self.policy = policy
        self.allowed = allowed_tools
        self.sops = sops

    def _reason(self, request: ToolCallRequest) -> tuple[str, str | None] | None:
        """(why, SOP step id or None) when the call needs approval."""
        name = request.tool_call["name"]
        state = request.state if isinstance(request.state, dict) else {}
        by_step, _ = step_approvals(state.get("sop"))
        if name in by_step:
            sop = state.get("sop") or {}
            return f"SOP {sop.get('name')} step {by_step[name]!r} requires human approval", by_step[name]
        if name in self.policy.approval_tools:
            return f"tool {name} requires approval (requiresApproval)", None
        return None

    def _needs_review(self, request: ToolCallRequest) -> bool:
        if self._reason(request) is None:
            return False
        # A call the allow-list or the SOP gate refuses is refused without asking anyone.
        state = request.state if isinstance(request.state, dict) else {}
        refused = check_tool_call(
            request.tool_call["name"],
            self.allowed,
            state.get("sop"),
            self.sops,
            succeeded_tools(state.get("messages", [])),
        )
        return refused is None

    async def awrap_tool_call(
        self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], Awaitable[ToolMessage | Command]]
    ) -> ToolMessage | Command:
        reason = self._reason(request) if self._needs_review(request) else None
        if reason is None:
            return await handler(request)
        why, step = reason
        ctx: RunContext = request.runtime.context
        call = request.tool_call
        review_id = str(call["id"])
        arguments = redact_value(ctx.services.guardrails, call.get("args") or {}, "output", ctx.services.agent)
        event: dict[str, Any] = {"kind": "step" if step else "tool", "tool": call["name"], "arguments": arguments}
        if step:
            event["step"] = step
        await open_review(ctx, review_id, event["kind"], self.policy, {**event, "reason": why}, f"tool:{call['name']}")
        answer = interrupt(
            {
                "kind": APPROVAL_INTERRUPT,
                "review": event["kind"],
                "reviewId": review_id,
                "runId": ctx.run_id,
                "type": "tool_approval",  # LangChain's ToolApprovalRequest fields, for its clients
                "tool_call_id": review_id,
                "name": call["name"],
                "args": arguments,
                "description": why,
            }
        )
        # On resume this node ran again up to here (open_review re-recorded the review): close it.
        await ctx.services.ledger.close_review(ctx.run_id, review_id)
        decision = answer.get("decision")
        if answer.get("timedOut"):
            text = (
                f"No reviewer decided on this call of {call['name']} within {self.policy.timeout_seconds} s; "
                "it was not executed."
            )
            rejected = _answer_message(call, {"type": "reject", "message": text})
            if answer.get("onTimeout") == "escalate":
                await ctx.emit(
                    f"review-timeout/{review_id}",
                    "status",
                    timed_out_status(self.policy.timeout_seconds, f"call of {call['name']}", "escalate"),
                )
                escalation = {"queue": DEFAULT_HUMAN_QUEUE, "reason": text}
                return Command(update={"messages": [rejected], "review_escalation": escalation})
            await ctx.emit(
                f"review-timeout/{review_id}",
                "status",
                {"state": "Active", "step": f"tool:{call['name']}", "detail": text + " (onTimeout: reject)"},
            )
            return rejected
        if decision == "approve":
            return await handler(request)
        if decision == "edit":
            executed = {"name": call["name"], "args": json.loads(answer["edit"])}
            edited = self._apply_edit(request, executed)  # type: ignore[arg-type]
            return self._annotate_edited_result(await handler(edited), edited, executed)  # type: ignore[arg-type]
        who = answer.get("reviewer") or "a reviewer"
        return _answer_message(call, {"type": "reject", "message": f"rejected by {who}"})


class DraftReviewMiddleware(AgentMiddleware[ReviewState, RunContext]):
    """The draft answer's review (module docstring). List it after RespondMiddleware:
    after_agent hooks run in reverse order, so it runs first."""

    state_schema = ReviewState

    def __init__(self, policy: ReviewPolicy) -> None:
        super().__init__()
        self.policy = policy

    async def aafter_agent(self, state: ReviewState, runtime: Runtime[RunContext]) -> dict[str, Any] | None:
        if state.get("review") or state.get("budget_stop") or state.get("review_escalation"):
            return None
        last = state["messages"][-1] if state["messages"] else None
        if not isinstance(last, AIMessage) or last.tool_calls or not last.text:
            return None
        if (last.response_metadata or {}).get(GUARDRAIL_METADATA):
            return None  # withheld by the output guardrail: nothing to approve
        reason = draft_review_reason(state, self.policy)
        if reason is None:
            return None
        ctx = runtime.context
        await ctx.before_step("review")
        await open_review(
            ctx,
            DRAFT_REVIEW_ID,
            "draft",
            self.policy,
            {"kind": "draft", "draft": last.text, "reason": reason},
            "review",
        )
        answer = interrupt(
            {
                "kind": APPROVAL_INTERRUPT,
                "review": "draft",
                "reviewId": DRAFT_REVIEW_ID,
                "runId": ctx.run_id,
                "draft": last.text,
                "reason": reason,
            }
        )
        await ctx.services.ledger.close_review(ctx.run_id, DRAFT_REVIEW_ID)  # see ReviewedToolsMiddleware
        review: dict[str, Any] = {"decision": answer.get("decision"), "reviewer": answer.get("reviewer")}
        if answer.get("timedOut"):
            review.update(timedOut=True, onTimeout=answer.get("onTimeout"), timeoutSeconds=self.policy.timeout_seconds)
        elif answer.get("decision") == "edit":
            # The reviewer's text goes to the user: the output guardrails apply to it too.
            guarded = scan(ctx.services.guardrails, answer["edit"], "output", ctx.services.agent)
            review["text"] = guarded.text if guarded.allowed else None
            review["withheld"] = None if guarded.allowed else guarded.verdict
        return {"review": review}


class ReviewEscalationMiddleware(AgentMiddleware[ReviewState, RunContext]):
    """Ends the agent loop once a tool review timed out with onTimeout escalate: no further
    model call, no answer; the respond step escalates. A before_model node of its own, added
    only for Agents that have reviewed tools (every node is a checkpoint write per model call)."""

    state_schema = ReviewState

    @hook_config(can_jump_to=["end"])
    async def abefore_model(self, state: ReviewState, runtime: Runtime[RunContext]) -> dict[str, Any] | None:
        if state.get("review_escalation"):
            return {"jump_to": "end"}
        return None


def has_reviewed_tools(policy: ReviewPolicy, sops: list[Any]) -> bool:
    """Whether any tool call of the Agent can need a reviewer: a tool with requiresApproval,
    or a tool step with `approval: human` in one of its SOPs (an SOP a human provides in a run
    has no steps). Without any, the reviewed-tools middleware is left out: its after_model
    hook would be a graph node, a checkpoint write per model call, that never does anything."""
    if policy.approval_tools:
        return True
    return any(st.approval == "human" and st.tool for sop in sops for st in sop.spec.steps or [])


# --- answers -----------------------------------------------------------------------------------


class BadAnswer(ValueError):
    """A resume command that cannot answer the pending review (names the field)."""


def resume_answer(
    pending: Mapping[str, Any], decision: str, reviewer: str, edit: str | None, *, timed_out: bool, on_timeout: str
) -> dict[str, Any]:
    """The interrupt's answer for a `resume` command; raises BadAnswer when it cannot apply."""
    if timed_out:
        return {"decision": "reject", "reviewer": reviewer, "timedOut": True, "onTimeout": on_timeout}
    answer: dict[str, Any] = {"decision": decision, "reviewer": reviewer}
    if decision == "edit":
        if pending.get("review") in ("tool", "step"):
            try:
                args = json.loads(edit or "")
            except ValueError as e:
                raise BadAnswer(
                    f"data.edit: a tool call's edit must be a JSON object of {pending.get('name')}'s arguments ({e})"
                ) from e
            if not isinstance(args, dict):
                raise BadAnswer(
                    f"data.edit: a tool call's edit must be a JSON object of {pending.get('name')}'s arguments, "
                    f"not {type(args).__name__}"
                )
        answer["edit"] = edit
    return answer


# --- timeouts and the queue depth --------------------------------------------------------------


def timeout_command(agent: str, review: Any, *, now: datetime | None = None) -> AgentCommand:
    """The resume command that enforces `review`'s deadline (see the module docstring)."""
    return AgentCommand.new(
        "resume",
        session_id=review.session_id,
        agent=agent,
        idempotency_key=f"review-timeout:{review.run_id}:{review.review_id}",
        user={"sub": TIMEOUT_REVIEWER, "role": "operator"},
        data={"runId": review.run_id, "decision": "reject", "reviewer": TIMEOUT_REVIEWER},
        timestamp=now,
    )


class ReviewTimer:
    """Every `interval` seconds: produce the timeout command of each review past its deadline
    (once per review per process) and refresh the queue depth gauge."""

    def __init__(
        self,
        services: Any,
        send: Callable[[str, str, str], Awaitable[Any]],
        request_topic: str,
        *,
        interval: float = 2.0,
    ) -> None:
        self.services = services
        self.send = send
        self.topic = request_topic
        self.interval = interval
        self._sent: dict[tuple[str, str], float] = {}

    async def tick(self) -> int:
        """One pass; returns the number of timeout commands produced."""
        ledger = self.services.ledger
        agent = self.services.agent
        HUMAN_REVIEW_QUEUE_DEPTH.labels(agent).set(await ledger.count_reviews(agent))
        loop = asyncio.get_running_loop()
        produced = 0
        for review in await ledger.expired_reviews(agent, datetime.now(UTC)):
            key = (review.run_id, review.review_id)
            if loop.time() - self._sent.get(key, -1e9) < 30:
                continue  # produced recently; intake has not served it yet
            command = timeout_command(agent, review)
            await self.send(self.topic, command.to_json(), review.session_id)
            self._sent[key] = loop.time()
            produced += 1
            log.info(
                "review %s of run %s timed out; timeout command produced",
                review.review_id,
                review.run_id,
                extra={"fw": {"runId": review.run_id, "sessionId": review.session_id}},
            )
        if len(self._sent) > 10_000:
            self._sent.clear()
        return produced

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await self.tick()
            except Exception as e:  # the database or Kafka is away: try again next time
                log.warning("review timeout check failed: %r", e)
            try:
                await asyncio.wait_for(stopping.wait(), self.interval)
            except TimeoutError:
                pass
