"""The last step of a specialist run (after_agent, a graph node): send the answer and
`resolved`, or — when the output guardrail withheld the answer — never send it and report
`failed` (block) or `escalated` (escalate), or — when the run stopped at a budget cap
(middleware/budgets.py) — send the partial result as `message`, then `budget_exceeded`, and
record the stop in the audit log.

After a human review of the draft (review.py, state `review`): approved, the draft is sent;
edited, the reviewer's text (output guardrails applied) is sent instead; rejected, nothing is
sent and the run ends `failed`; timed out, the session's status becomes `TimedOut` and, with
`onTimeout: escalate`, it goes to the human queue (`escalated`). A tool review that timed
out with escalate (state `review_escalation`) escalates the same way, without an answer."""

from __future__ import annotations

from typing import Any

from fleetward.runtime.audit import record_budget_stop
from fleetward.runtime.context import DEFAULT_HUMAN_QUEUE, RunContext
from fleetward.runtime.middleware.guardrails import GUARDRAIL_METADATA
from fleetward.runtime.review import ReviewState
from langchain.agents.middleware import AgentMiddleware
from langchain_core.messages import AIMessage, ToolMessage
from langgraph.runtime import Runtime

NO_ANSWER = "I could not produce an answer for this request."


def _summary(state: ReviewState) -> str:
    sop = state.get("sop") or {}
    done = [m.name for m in state["messages"] if isinstance(m, ToolMessage) and m.status != "error" and m.name]
    tools = f"; tools: {', '.join(done)}" if done else "; no tool calls"
    return f"Answered under SOP {sop.get('name', '-')}@{sop.get('version', '-')}{tools}."


class RespondMiddleware(AgentMiddleware[ReviewState, RunContext]):
    state_schema = ReviewState

    async def aafter_agent(self, state: ReviewState, runtime: Runtime[RunContext]) -> dict[str, Any] | None:
        ctx = runtime.context
        await ctx.before_step("respond")
        stop = state.get("budget_stop")
        if stop:
            # Audited first: a crash after it replays this step, which records the stop
            # again (at least once) but sends each event once (deterministic keys).
            await record_budget_stop(ctx, stop)
            await ctx.emit("reply", "message", {"role": "assistant", "text": stop["partial"]})
            await ctx.emit(
                "budget_exceeded",
                "budget_exceeded",
                {"budget": stop["budget"], "limit": stop["limit"], "used": stop["used"], "partial": stop["partial"]},
            )
            return None
        escalation = state.get("review_escalation")
        if escalation:
            await ctx.emit("escalated", "escalated", {"queue": escalation["queue"], "reason": escalation["reason"]})
            return None
        review = state.get("review") or {}
        if review.get("timedOut"):
            what = f"draft answer within {review.get('timeoutSeconds')} s"
            detail = f"no reviewer decided on the {what}; it was not sent (onTimeout: {review.get('onTimeout')})"
            await ctx.emit("review-timeout/draft", "status", {"state": "TimedOut", "step": "review", "detail": detail})
            if review.get("onTimeout") == "escalate":
                sop = state.get("sop") or {}
                queue = sop.get("escalationQueue") or DEFAULT_HUMAN_QUEUE
                await ctx.emit(
                    "escalated", "escalated", {"queue": queue, "reason": f"No reviewer decided on the {what}."}
                )
            return None
        if review.get("decision") == "reject":
            who = review.get("reviewer") or "a reviewer"
            await ctx.emit("failed", "failed", {"reason": f"The draft answer was rejected by {who}; it was not sent."})
            return None
        if review.get("decision") == "edit" and not review.get("text"):
            reason = f"The reviewer's edited answer was withheld by a guardrail ({review.get('withheld')})."
            await ctx.emit("failed", "failed", {"reason": reason})
            return None
        last = state["messages"][-1] if state["messages"] else None
        verdict = (last.response_metadata or {}).get(GUARDRAIL_METADATA) if isinstance(last, AIMessage) else None
        if verdict:
            reason = f"The answer was withheld by a guardrail ({verdict['findings']})."
            if verdict["verdict"] == "escalate":
                sop = state.get("sop") or {}
                queue = sop.get("escalationQueue") or DEFAULT_HUMAN_QUEUE
                await ctx.emit("escalated", "escalated", {"queue": queue, "reason": reason})
            else:
                await ctx.emit("failed", "failed", {"reason": reason})
            return None
        text = last.text if isinstance(last, AIMessage) and last.text else NO_ANSWER
        summary = _summary(state)
        if review.get("decision") == "edit":
            text = review["text"]
            summary += f" Answer edited by {review.get('reviewer') or 'a reviewer'}."
        elif review.get("decision") == "approve":
            summary += f" Answer approved by {review.get('reviewer') or 'a reviewer'}."
        await ctx.emit("reply", "message", {"role": "assistant", "text": text})
        await ctx.emit("resolved", "resolved", {"summary": summary})
        return None
