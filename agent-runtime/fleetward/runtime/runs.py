"""Executing one command: dedupe, start or resume the run's graph from its checkpoint, and
record where it came to rest (SPEC §4).

Every run is one LangGraph thread (thread id = run id) checkpointed after every step with
durability "sync": the next step starts only once the previous one is durable. That is
what makes a replay after SIGKILL exact: a tool-call step re-executed after a crash sees
the same checkpointed model message (same tool-call ids, hence the same Idempotency-Keys),
so a mutating tool applies its effect once.

A command's outcome tells intake whether its offset may be committed: everything but
`STOPPED` (stopped at a step boundary, request to be redelivered) is final.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fleetward.runtime.audit import record_guardrail_block
from fleetward.runtime.context import DEFAULT_HUMAN_QUEUE, RunContext, RunStopped, Services, StepGate
from fleetward.runtime.middleware.guardrails import finding_summary, redact_value, scan
from fleetward.runtime.middleware.sop_gate import SOP_INTERRUPT
from fleetward.runtime.persistence import (
    DONE,
    RUN_ACTIVE,
    RUN_BUDGET_STOPPED,
    RUN_COMPLETED,
    RUN_FAILED,
    RUN_HALTED,
    RUN_WAITING,
    RunRecord,
    halt_of,
)
from fleetward.runtime.resilience import FailureKind, classify_model_error
from fleetward.runtime.review import APPROVAL_INTERRUPT, TIMEOUT_REVIEWER, BadAnswer, resume_answer
from fleetward.runtime.telemetry import RUN_DURATION, RUNS_IN_FLIGHT, context_from_traceparent, trace_id_hex, tracer
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langgraph.types import Command
from opentelemetry import trace

from fleetward.api.envelopes import AgentCommand, HandoffData, ProvideSopData, ResumeData, UserMessageData

log = logging.getLogger("fleetward.runtime.runs")


class Outcome(enum.Enum):
    COMPLETED = "completed"
    BUDGET_STOPPED = "budget_stopped"
    """Completed at a budget cap with a partial result (`budget_exceeded`): final, not failed."""
    WAITING = "waiting"
    FAILED = "failed"
    DUPLICATE = "duplicate"
    STOPPED = "stopped"

    @property
    def final(self) -> bool:
        return self is not Outcome.STOPPED


CRASH_LIMIT = 3
"""How many deliveries of one command may end with the runtime process gone (an OOM kill, a
crash in native code, SIGKILL) before its next delivery fails the run and dead-letters the
command instead of running it again. A poison command must not crash-loop the pod and hold
its partition for ever; one or two crashes (a node lost mid-run) still resume the run from
its checkpoint. Clean stops (SIGTERM, a lost partition, a halt) do not count."""


class RepeatedCrash(Exception):
    """The runtime died `CRASH_LIMIT` times while serving this command."""

    def __init__(self, crashes: int) -> None:
        super().__init__(
            f"The runtime stopped without finishing this request {crashes} times in a row (a crash or a kill "
            "each time); it is not tried again."
        )


class Rejected(Exception):
    """The command is well-formed but cannot be served (wrong agent, unknown run, no
    matching interrupt): it goes to the dead-letter topic with this reason."""


@dataclass(frozen=True)
class Delivery:
    command: AgentCommand
    traceparent: str | None = None
    partition: int | None = None
    source: Any = None
    """The Kafka record the command came in (intake's), for a dead-letter record."""


DeadLetterSink = Callable[[Delivery, str, dict[str, Any]], Awaitable[None]]
"""Sends a command whose run failed for good to the dead-letter topic: (delivery, reason,
the run's history). Intake provides it (`Intake.dead_letter_failed_run`)."""

DEGRADED_REPLY = (
    "Sorry, I can't answer your request right now because of a technical problem on our side. "
    "Your request has been passed on to our support team, who will follow up with you."
)
"""The graceful degradation message (a `message` event, before `failed`) of a run that
failed for good: in plain words, no error codes; the details go to the dead-letter topic."""

HISTORY_MESSAGES = 50
HISTORY_TEXT_CHARS = 2000


class RunRegistry:
    """Runs executing in this process and the halt state, shared with control.py."""

    def __init__(self) -> None:
        self.active: dict[str, RunContext] = {}
        self.halted = False

    def new_gate(self) -> StepGate:
        gate = StepGate()
        if self.halted:
            gate.halt()
        return gate

    def halt(self) -> None:
        self.halted = True
        for ctx in self.active.values():
            ctx.gate.halt()

    def resume(self) -> None:
        self.halted = False
        for ctx in self.active.values():
            ctx.gate.resume()

    def stop_all(self) -> None:
        for ctx in self.active.values():
            ctx.gate.stop.set()


def _thread(run_id: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": run_id}}


def _pending_interrupts(snapshot: Any) -> list[tuple[str, dict[str, Any]]]:
    """(interrupt id, value) of every interrupt the run waits on, oldest first."""
    return [(intr.id, intr.value) for intr in getattr(snapshot, "interrupts", ()) or () if isinstance(intr.value, dict)]


def _pending_interrupt(snapshot: Any) -> dict[str, Any] | None:
    pending = _pending_interrupts(snapshot)
    return pending[0][1] if pending else None


class RunExecutor:
    def __init__(
        self, services: Services, graph: Any, registry: RunRegistry, *, dead_letter: DeadLetterSink | None = None
    ) -> None:
        self.services = services
        self.graph = graph
        self.registry = registry
        self.dead_letter = dead_letter
        """Where a run that failed for good is sent; `Intake` sets it to its dead-letter
        topic when none is given. None: the failure is only reported in the session."""
        self._serving: set[str] = set()
        """Idempotency keys of the commands this process started and has not settled: a
        second delivery of one of them (a run aborted by a kill switch and redone, a halted
        run resumed) is not a crash."""

    @property
    def agent(self) -> str:
        return self.services.agent

    async def handle(self, delivery: Delivery) -> Outcome:
        cmd = delivery.command
        if cmd.agent != self.agent:
            raise Rejected(f"agent: the command is for {cmd.agent}, this runtime serves {self.agent}")
        if isinstance(cmd.data, UserMessageData | HandoffData):
            return await self._new_request(delivery, cmd.data.text)
        if isinstance(cmd.data, ProvideSopData):
            return await self._answer(delivery, cmd.data.run_id, SOP_INTERRUPT, lambda: self._sop_answer(cmd))
        if isinstance(cmd.data, ResumeData):
            return await self._review_decision(delivery, cmd.data)
        raise Rejected(f"type: {cmd.type} is not served by a {self.services.config.spec.role}")

    def _sop_answer(self, cmd: AgentCommand) -> dict[str, Any]:
        """The procedure a human provided, with its PII redacted by the input guardrails
        like any text that goes to the model. Only the redaction is taken: a procedure may
        well name what users must not get ("never offer a workaround"), which a policy or
        injection rule meant for users' requests would flag. Refused (dead-lettered, the run
        keeps waiting) only when a guardrail withholds the text altogether (a `block`)."""
        data = cmd.data
        assert isinstance(data, ProvideSopData)
        guarded: dict[str, str | None] = {}
        for field, text in (("instructions", data.instructions), ("title", data.title)):
            if text is None:
                guarded[field] = None
                continue
            g = scan(self.services.guardrails, text, "input", self.agent)
            if g.text is None:
                raise Rejected(
                    f"data.{field}: the input guardrails withhold the provided procedure ({g.verdict}: "
                    f"{finding_summary(g.findings)}); the run still waits for one"
                )
            guarded[field] = g.text
        return {
            "instructions": guarded["instructions"],
            "title": guarded["title"],
            "providedBy": cmd.user.sub if cmd.user else None,
        }

    # -- a new request -------------------------------------------------------------------------

    async def _new_request(self, delivery: Delivery, text: str) -> Outcome:
        cmd = delivery.command
        ledger = self.services.ledger
        request = await ledger.begin_request(
            self.agent, cmd.idempotency_key, cmd.session_id, cmd.type, f"run-{uuid.uuid4().hex}"
        )
        if request.status == DONE:
            log.info(
                "duplicate request %s: already served by run %s",
                cmd.idempotency_key,
                request.run_id,
                extra={"fw": {"sessionId": cmd.session_id, "runId": request.run_id}},
            )
            return Outcome.DUPLICATE
        run_id = request.run_id
        with self._span(delivery, run_id) as span:
            # A request this delivery recorded has no run yet: create it without looking first.
            run = (None if request.new else await ledger.get_run(run_id)) or await ledger.create_run(
                run_id, self.agent, cmd.session_id, trace_id_hex(span)
            )
            ctx = self._context(run, span, cmd, delivery.partition)
            # A new request's run id was minted just now: its thread has no checkpoint to read.
            if not request.new and (await self.graph.aget_state(_thread(run_id))).values:
                graph_input: Any = None  # a redelivery after a crash: continue from the checkpoint
            else:
                guarded = scan(self.services.guardrails, text, "input", self.agent)
                if not guarded.allowed:
                    return await self._input_refused(ctx, cmd, guarded.verdict, finding_summary(guarded.findings))
                await ctx.emit("start", "status", {"state": "Active", "step": "intake", "detail": "request accepted"})
                graph_input = {"messages": [HumanMessage(content=guarded.text or "", id=f"{run_id}-input")]}
                if cmd.user is not None:
                    graph_input["requester"] = cmd.user.to_wire()
                if isinstance(cmd.data, HandoffData):
                    graph_input["handoff"] = {
                        "from": cmd.data.from_agent,
                        "parentRunId": cmd.data.parent_run_id,
                        "topic": cmd.data.topic,
                        "analysis": cmd.data.analysis.to_wire(),
                    }
            outcome = await self._drive(ctx, graph_input, delivery, redelivered=request.redelivered)
        if outcome.final:
            await ledger.finish_request(self.agent, cmd.idempotency_key)
        return outcome

    async def _input_refused(self, ctx: RunContext, cmd: AgentCommand, verdict: str, why: str) -> Outcome:
        reason = f"The request was refused by a guardrail ({why}); it was not passed to the model."
        await record_guardrail_block(ctx, "input", verdict, why)
        if verdict == "escalate":
            await ctx.emit("input-escalated", "escalated", {"queue": DEFAULT_HUMAN_QUEUE, "reason": reason})
        else:
            await ctx.emit("input-refused", "failed", {"reason": reason})
        await self.services.ledger.set_run_status(ctx.run_id, RUN_FAILED)
        await self.services.ledger.finish_request(self.agent, cmd.idempotency_key)
        return Outcome.FAILED

    # -- an answer to a waiting run (provide_sop, resume) --------------------------------------

    async def _answer(
        self, delivery: Delivery, run_id: str, kind: str, answer: dict[str, Any] | Callable[[], dict[str, Any]]
    ) -> Outcome:
        """Resume the run waiting for `kind` with `answer` (made only when it is used, so a
        duplicate or a run that moved on never evaluates it)."""
        cmd = delivery.command
        ledger = self.services.ledger
        run = await self._run_of(cmd, run_id)
        request = await ledger.begin_request(self.agent, cmd.idempotency_key, cmd.session_id, cmd.type, run_id)
        if request.status == DONE:
            return Outcome.DUPLICATE
        snapshot = await self.graph.aget_state(_thread(run_id))
        pending = _pending_interrupt(snapshot)
        if pending is not None and pending.get("kind") == kind:
            try:
                value = answer() if callable(answer) else answer
            except Rejected:
                await ledger.finish_request(self.agent, cmd.idempotency_key)
                raise
            graph_input: Any = Command(resume=value)
        elif pending is None and snapshot.next:
            graph_input = None  # answered before a crash; the run goes on from its checkpoint
        elif pending is None:
            await ledger.finish_request(self.agent, cmd.idempotency_key)
            return Outcome.DUPLICATE  # the run already finished
        else:
            await ledger.finish_request(self.agent, cmd.idempotency_key)
            raise Rejected(f"data.runId: run {run_id} is waiting for {pending.get('kind')}, not for {kind}")
        with self._span(delivery, run_id) as span:
            ctx = self._context(run, span, cmd, delivery.partition)
            outcome = await self._drive(ctx, graph_input, delivery, redelivered=request.redelivered)
        if outcome.final:
            await ledger.finish_request(self.agent, cmd.idempotency_key)
        return outcome

    # -- a reviewer's decision (resume) ---------------------------------------------------------

    async def _review_decision(self, delivery: Delivery, data: ResumeData) -> Outcome:
        """A `resume` command answers the oldest review the run waits for (review.py): the
        decision is checked against it, recorded in the audit log and the session
        (`approval_decision`), the review is closed, and the run goes on from its checkpoint.
        A timeout command (`TIMEOUT_REVIEWER`) counts only once the review's deadline passed."""
        cmd = delivery.command
        ledger = self.services.ledger
        run = await self._run_of(cmd, data.run_id)
        snapshot = await self.graph.aget_state(_thread(run.run_id))
        reviews = [(i, v) for i, v in _pending_interrupts(snapshot) if v.get("kind") == APPROVAL_INTERRUPT]
        if not reviews:
            # Nothing to review any more (answered, timed out, or the run ended): drop any
            # review row left behind, so the timer does not keep asking.
            await ledger.close_reviews_of_run(run.run_id)
            return await self._answer(delivery, run.run_id, APPROVAL_INTERRUPT, {})
        interrupt_id, review = reviews[0]
        review_id = str(review.get("reviewId"))
        # The review a command answers is recorded with it: a command redelivered after a
        # crash that came after its decision was checkpointed must not answer the next review.
        request = await ledger.begin_request(
            self.agent, cmd.idempotency_key, cmd.session_id, f"resume:{review_id}", run.run_id
        )
        if request.status == DONE:
            return Outcome.DUPLICATE
        answered = request.command_type.partition(":")[2]
        if request.redelivered and answered and answered != review_id:
            with self._span(delivery, run.run_id) as span:
                ctx = self._context(run, span, cmd, delivery.partition)
                outcome = await self._drive(ctx, None, delivery, redelivered=True)
            if outcome.final:
                await ledger.finish_request(self.agent, cmd.idempotency_key)
            return outcome
        timed_out = data.reviewer == TIMEOUT_REVIEWER and cmd.user is not None and cmd.user.sub == TIMEOUT_REVIEWER
        policy = self.services.config.spec.human_review
        try:
            if cmd.user is not None and data.reviewer != cmd.user.sub:
                # The decision is recorded (events, audit) under data.reviewer: it must be
                # the verified identity that sent it, as the gateway and the CLI write it.
                raise BadAnswer(
                    f"data.reviewer {data.reviewer!r} is not the command's verified user {cmd.user.sub!r} "
                    "(user.sub): a decision is recorded under the identity that sent it"
                )
            if timed_out:
                record = await ledger.review(run.run_id, review_id)
                if record is None:  # the timer produced it from a row that is gone: answered since
                    raise BadAnswer(f"data.reviewer: review {review_id} of run {run.run_id} has no open deadline")
                if record.deadline > datetime.now(UTC):
                    raise BadAnswer(
                        f"data.reviewer: review {review_id} of run {run.run_id} is due at "
                        f"{record.deadline.isoformat()}; a timeout before then is refused"
                    )
            answer = resume_answer(
                review, data.decision, data.reviewer, data.edit, timed_out=timed_out, on_timeout=policy.on_timeout
            )
        except BadAnswer as e:
            await ledger.finish_request(self.agent, cmd.idempotency_key)
            raise Rejected(str(e)) from e
        with self._span(delivery, run.run_id) as span:
            ctx = self._context(run, span, cmd, delivery.partition)
            if self.services.audit is not None:
                await self.services.audit.review_decision(
                    ctx, review, answer["decision"], data.reviewer, timed_out=timed_out
                )
            if not timed_out:
                decided: dict[str, Any] = {"decision": data.decision, "reviewer": data.reviewer}
                if data.edit is not None:  # shown to the session like any text: guardrails apply
                    decided["edit"] = redact_value(self.services.guardrails, data.edit, "output", self.agent)
                await ctx.emit(f"approval_decision/{review_id}", "approval_decision", decided)
                await ctx.emit(
                    f"review-decided/{review_id}",
                    "status",
                    {"state": "Active", "step": "review", "detail": f"{data.decision} by {data.reviewer}"},
                )
            await ledger.close_review(run.run_id, review_id)
            outcome = await self._drive(
                ctx, Command(resume={interrupt_id: answer}), delivery, redelivered=request.redelivered
            )
        if outcome.final:
            await ledger.finish_request(self.agent, cmd.idempotency_key)
        return outcome

    async def _run_of(self, cmd: AgentCommand, run_id: str) -> RunRecord:
        run = await self.services.ledger.get_run(run_id)
        if run is None or run.agent != self.agent:
            raise Rejected(f"data.runId: no run {run_id} of agent {self.agent}")
        if run.session_id != cmd.session_id:
            raise Rejected(f"sessionId: run {run_id} belongs to another session")
        return run

    # -- driving the graph ---------------------------------------------------------------------------

    def _span(self, delivery: Delivery, run_id: str) -> Any:
        cmd = delivery.command
        parent = context_from_traceparent(delivery.traceparent, cmd.trace_id)
        return tracer().start_as_current_span(
            "agent run",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "fleetward.agent": self.agent,
                "fleetward.run_id": run_id,
                "fleetward.session_id": cmd.session_id,
                "fleetward.command": cmd.type,
            },
        )

    def _context(self, run: RunRecord, span: Any, cmd: AgentCommand, partition: int | None) -> RunContext:
        from fleetward.runtime.telemetry import traceparent_of

        return RunContext(
            run_id=run.run_id,
            session_id=run.session_id,
            trace_id=run.trace_id,
            services=self.services,
            gate=self.registry.new_gate(),
            traceparent=traceparent_of(span),
            user=cmd.user.sub if cmd.user else None,
            partition=partition,
            halted_by=run.waiting_for if run.status == RUN_HALTED else None,
        )

    @staticmethod
    async def _resumed_after_release(ctx: RunContext) -> None:
        """A run a kill switch halted, continued by a process that did not halt it (that
        one was scaled away): the session hears `resumed` first, as it does when the halted
        process itself resumes (control.py; same event key, so it is one event either way)."""
        halt = halt_of(ctx.halted_by)
        if halt is not None:
            kill_switch, generation = halt
            await ctx.emit(f"resumed/{kill_switch}/{generation}", "resumed", {"killSwitch": kill_switch})
        await ctx.services.ledger.set_run_status(ctx.run_id, RUN_ACTIVE)
        ctx.halted_by = None

    async def _drive(self, ctx: RunContext, graph_input: Any, delivery: Delivery, *, redelivered: bool) -> Outcome:
        """`redelivered`: the command was recorded by an earlier delivery (see `CRASH_LIMIT`)."""
        if ctx.halted_by is not None:
            # Before the run starts: a Kafka or database error here is intake's to retry
            # (like the `start` event's), not the run's failure.
            await self._resumed_after_release(ctx)
        ledger = self.services.ledger
        key = delivery.command.idempotency_key
        started = time.monotonic()
        ctx.task = asyncio.current_task()
        self.registry.active[ctx.run_id] = ctx
        RUNS_IN_FLIGHT.labels(self.agent).inc()
        outcome = Outcome.FAILED
        ended = False  # the run is over (completed or failed), not parked, stopped or cancelled
        settled = False  # the command is done with (final outcome), not stopped or cancelled
        try:
            if redelivered and key not in self._serving:
                crashes = await ledger.count_redelivery(self.agent, key)
                if crashes >= CRASH_LIMIT:
                    raise RepeatedCrash(crashes)
                if crashes:
                    log.warning(
                        "command %s delivered again after the runtime died serving it (%d of %d allowed)",
                        key,
                        crashes,
                        CRASH_LIMIT - 1,
                        extra={"fw": {"runId": ctx.run_id, "sessionId": ctx.session_id}},
                    )
            self._serving.add(key)
            async for _ in self.graph.astream(
                graph_input, _thread(ctx.run_id), context=ctx, durability="sync", stream_mode="updates"
            ):
                pass
            snapshot = await self.graph.aget_state(_thread(ctx.run_id))
            pending = _pending_interrupt(snapshot)
            if pending is not None:
                await ledger.set_run_status(ctx.run_id, RUN_WAITING, pending.get("kind"))
                outcome = Outcome.WAITING
            elif (snapshot.values or {}).get("budget_stop"):
                await ledger.set_run_status(ctx.run_id, RUN_BUDGET_STOPPED)
                outcome = Outcome.BUDGET_STOPPED
                ended = True
            else:
                await ledger.set_run_status(ctx.run_id, RUN_COMPLETED)
                outcome = Outcome.COMPLETED
                ended = True
            settled = True
            return outcome
        except RunStopped as e:
            log.info("run %s stopped at a step boundary: %s", ctx.run_id, e, extra={"fw": {"runId": ctx.run_id}})
            outcome = Outcome.STOPPED
            await ledger.record_clean_stop(self.agent, key)
            return outcome
        except Exception as e:
            fields = {"fw": {"runId": ctx.run_id, "sessionId": ctx.session_id}}
            if isinstance(e, RepeatedCrash):
                log.error("run %s: %s", ctx.run_id, e, extra=fields)
            else:
                log.exception("run %s failed", ctx.run_id, extra=fields)
            trace.get_current_span().set_status(trace.Status(trace.StatusCode.ERROR, type(e).__name__))
            await self._failed(ctx, delivery, e)
            ended = settled = True
            return outcome
        finally:
            self.registry.active.pop(ctx.run_id, None)
            RUNS_IN_FLIGHT.labels(self.agent).dec()
            RUN_DURATION.labels(self.agent, outcome.value).observe(time.monotonic() - started)
            if ended and self.services.retry_budgets is not None:
                self.services.retry_budgets.release(ctx.run_id)
            if settled:
                self._serving.discard(key)
                if redelivered:
                    await ledger.forget_redeliveries(self.agent, key)

    async def _failed(self, ctx: RunContext, delivery: Delivery, error: Exception) -> None:
        """A run that failed for good (the model chain exhausted, or an unexpected error):
        the user gets a plain-words `message` and `failed`, instead of silence; the command
        goes to the dead-letter topic with the run's history; the run is marked failed.

        The dead letter goes out before the command is marked done (by the caller) and its
        offset committed: a crash in between redelivers the command, which continues the
        run from its checkpoint (retrying the call that failed) and, failing again, sends
        the dead letter again. At least once, like everything on Kafka here; the session
        events are sent once (deterministic keys)."""
        reason = failure_reason(error, ctx.failures, dead_lettered=self.dead_letter is not None)
        await ctx.emit("degraded", "message", {"role": "assistant", "text": DEGRADED_REPLY})
        await ctx.emit("failed", "failed", {"reason": reason, "error": type(error).__name__})
        if self.dead_letter is not None:
            history = await self._history(ctx, error)
            await self.dead_letter(delivery, reason, history)
        await self.services.ledger.set_run_status(ctx.run_id, RUN_FAILED)

    async def _history(self, ctx: RunContext, error: Exception) -> dict[str, Any]:
        """What the dead-letter record carries besides the command: the run's ids, where and
        how it failed, the failed attempts (kinds and statuses) and the conversation as
        checkpointed (after the input and tool-result guardrails, so redacted as the model
        saw it), cut to the last `HISTORY_MESSAGES` messages of at most `HISTORY_TEXT_CHARS`."""
        failure = classify_model_error(error)
        messages: list[dict[str, Any]] = []
        sop: dict[str, Any] | None = None
        try:
            snapshot = await self.graph.aget_state(_thread(ctx.run_id))
            values = snapshot.values or {}
            messages = [message_record(m) for m in (values.get("messages") or [])[-HISTORY_MESSAGES:]]
            raw_sop = values.get("sop")
            if isinstance(raw_sop, dict):
                sop = {k: raw_sop.get(k) for k in ("name", "version") if raw_sop.get(k) is not None}
        except Exception as e:  # the history is best effort: the dead letter must still go out
            log.warning("run %s: its checkpoint could not be read for the dead letter: %r", ctx.run_id, e)
        return {
            "runId": ctx.run_id,
            "sessionId": ctx.session_id,
            "traceId": ctx.trace_id,
            "step": ctx.current_step,
            "error": {
                "type": type(error).__name__,
                "kind": failure.kind.value,
                **({"status": failure.status} if failure.status is not None else {}),
            },
            "attempts": list(ctx.failures),
            "sop": sop,
            "messages": messages,
        }


def failure_reason(error: Exception, failures: list[dict[str, Any]], *, dead_lettered: bool = True) -> str:
    """The `failed` event's reason: what failed, for people; names, kinds and statuses only
    (never an error message, which may quote the conversation)."""
    if isinstance(error, RepeatedCrash):  # our own words: no conversation in them
        return f"{error}{' The request was passed on to the dead-letter topic.' if dead_lettered else ''}"[:4000]
    failure = classify_model_error(error)
    models = list(dict.fromkeys(str(f["model"]) for f in failures if f.get("call") == "model" and f.get("model")))
    if failure.kind is not FailureKind.OTHER and models:
        reason = f"No model could answer: {', '.join(models)} failed (last error: {failure.describe()})."
    else:
        reason = f"The run failed with an unexpected error ({type(error).__name__})."
    if dead_lettered:
        reason += " The request was passed on to the dead-letter topic."
    return reason[:4000]


def message_record(message: Any) -> dict[str, Any]:
    """One checkpointed message for the dead-letter history."""
    content = getattr(message, "content", "")
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False, default=str)
    if len(text) > HISTORY_TEXT_CHARS:
        text = text[:HISTORY_TEXT_CHARS] + f"... [cut: {len(text) - HISTORY_TEXT_CHARS} more characters]"
    out: dict[str, Any] = {"role": getattr(message, "type", type(message).__name__), "text": text}
    if isinstance(message, AIMessage) and message.tool_calls:
        out["toolCalls"] = [{"id": c.get("id"), "name": c["name"]} for c in message.tool_calls]
    if isinstance(message, ToolMessage):
        out.update(toolCallId=message.tool_call_id, name=message.name, status=message.status)
    return out
