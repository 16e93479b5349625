"""Budgets in the specialist run (SPEC §4 "Budgets"): the per-run caps (steps, tool calls,
tokens), the daily token budget through the ledger, the partial result, `budget_exceeded`,
the audit record, the alerts and the run's final status.

Real pieces: the specialist's middleware chain as the runtime builds it, LangChain's agent
graph, the executor with its SQLite persistence and checkpoints, the daily ledger on SQLite.
Stand-ins: a scripted chat model (usage reported like a provider's), a local tool, and
recorders for events, audit and alerts."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx2
import openai
from fleetward.runtime.alerts import ALERT_SCHEMA, BUDGET_THRESHOLD, budget_threshold_alert
from fleetward.runtime.budget import DailyBudget, ThresholdCrossing, open_daily_token_ledger
from fleetward.runtime.context import RunContext, Services, StepGate
from fleetward.runtime.graphs.specialist import specialist_middleware
from fleetward.runtime.middleware.budgets import (
    BUDGET_STOP,
    OUTPUT_ALLOWANCE,
    DailyTokenBudgetMiddleware,
    RunTokenBudgetMiddleware,
    StepBudgetMiddleware,
    ToolCallBudgetMiddleware,
    best_answer,
    partial_result,
    response_tokens,
)
from fleetward.runtime.middleware.sop_gate import SpecialistState
from fleetward.runtime.persistence import RUN_BUDGET_STOPPED, RUN_COMPLETED, open_persistence
from fleetward.runtime.resilience import RetryBudgets
from fleetward.runtime.runs import Delivery, Outcome, RunExecutor, RunRegistry
from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import tool
from pydantic import Field

from fleetward.api.envelopes import AgentCommand, BudgetExceededData
from fleetward.api.runtimeconfig import ResolvedSOP, RuntimeConfig
from fleetward.api.sop import SOPSpec

AGENT = "ns/billing"


def config(budget: dict[str, Any] | None = None, max_retries: int = 0) -> RuntimeConfig:
    return RuntimeConfig.model_validate(
        {
            "installation": {"namespace": "fleetward-system", "trustBundle": {"namespace": "fleetward-system"}},
            "agent": {"namespace": "ns", "name": "billing"},
            "spec": {
                "role": "specialist",
                "model": {"name": "scripted", "baseURL": "http://127.0.0.1:1/v1", "maxRetries": max_retries},
                "tools": [
                    {
                        "name": "lookup",
                        "description": "Look up an invoice.",
                        "inputSchema": {"type": "object"},
                        "endpoint": "http://127.0.0.1:9/lookup",
                    }
                ],
                "budget": budget or {},
            },
            "topics": {"request": "fleetward.requests.ns.billing"},
            "kafka": {"bootstrapServers": "127.0.0.1:9092", "consumerGroup": "g"},
            "credentials": {"signingKeyFile": "/k", "keyId": "kid"},
        }
    )


SOP = ResolvedSOP(
    name="invoices",
    version="1.0.0",
    spec=SOPSpec.model_validate(
        {
            "domain": "billing",
            "title": "Answer invoice questions",
            "version": "1.0.0",
            "instructions": "Look the invoice up, then answer.",
            "steps": [{"id": "look-up", "instruction": "Look it up.", "tool": "lookup"}],
        }
    ),
)


class Retriever:
    def retrieve(self, _text: str) -> Any:
        return SimpleNamespace(sop=SOP, detail="invoices@1.0.0", method="keyword")


class RecordingEvents:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict[str, Any]]] = []

    async def emit(self, key: str, type: str, *, data: Any, **_: Any) -> None:
        self.sent.append((key.split("/", 1)[1], type, dict(data)))

    def types(self) -> list[str]:
        return [t for _, t, _ in self.sent]

    def of(self, type_: str) -> list[dict[str, Any]]:
        return [d for _, t, d in self.sent if t == type_]


class RecordingAudit:
    def __init__(self) -> None:
        self.stops: list[dict[str, Any]] = []

    async def budget_stop(self, ctx: RunContext, stop: dict[str, Any]) -> None:
        self.stops.append({"runId": ctx.run_id, **{k: stop[k] for k in ("budget", "scope", "limit", "used")}})


class RecordingAlerts:
    def __init__(self) -> None:
        self.crossings: list[tuple[float, str | None]] = []

    async def budget_thresholds(self, crossings: Any, **ids: Any) -> None:
        self.crossings += [(c.threshold, ids.get("run_id")) for c in crossings]


def status_error(status: int) -> openai.APIStatusError:
    response = httpx2.Response(status, request=httpx2.Request("POST", "http://127.0.0.1:1/v1/chat/completions"))
    return openai.RateLimitError(f"Error code: {status}", response=response, body=None)


class Scripted(BaseChatModel):
    """Answers from `replies` in order (the last one repeats); an exception in the list is
    raised instead. Reports usage as a provider does (usage_metadata)."""

    replies: list[Any] = Field(default_factory=list)
    calls: int = 0

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Any, **kwargs: Any) -> Scripted:
        return self

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> ChatResult:
        reply = self.replies[min(self.calls, len(self.replies) - 1)]
        self.calls += 1
        if isinstance(reply, Exception):
            raise reply
        return ChatResult(generations=[ChatGeneration(message=reply.model_copy(update={"id": None}))])


def calls_lookup(tokens: int = 100, text: str = "") -> AIMessage:
    return AIMessage(
        content=text,
        tool_calls=[{"name": "lookup", "args": {"invoice": "inv_1"}, "id": f"call_{uuid.uuid4().hex[:8]}"}],
        usage_metadata={"input_tokens": tokens - 10, "output_tokens": 10, "total_tokens": tokens},
    )


def answer(text: str = "Invoice inv_1 is paid.", tokens: int = 100) -> AIMessage:
    return AIMessage(
        content=text, usage_metadata={"input_tokens": tokens - 10, "output_tokens": 10, "total_tokens": tokens}
    )


class Rig:
    def __init__(self, tmp: Path, budget: dict[str, Any], replies: list[Any], *, max_retries: int = 0) -> None:
        self.tmp = tmp
        self.cfg = config(budget, max_retries)
        self.model = Scripted(replies=replies)
        self.events = RecordingEvents()
        self.audit = RecordingAudit()
        self.alerts = RecordingAlerts()
        self.tool_runs = 0
        self.on_tool: Any = None

        @tool
        def lookup(invoice: str) -> str:
            """Look up an invoice."""
            self.tool_runs += 1
            if self.on_tool is not None:
                self.on_tool()
            return f'{{"invoice": "{invoice}", "status": "paid"}}'

        self.tools = [lookup]

    def build(self, persistence: Any, ledger: Any = None) -> None:
        self.services = Services(
            config=self.cfg,
            events=self.events,  # type: ignore[arg-type]
            ledger=persistence.ledger,
            signing_key=None,  # type: ignore[arg-type]
            guardrails=None,
            retriever=Retriever(),  # type: ignore[arg-type]
            prices={},
            audit=self.audit,  # type: ignore[arg-type]
            retry_budgets=RetryBudgets(),
            token_ledger=ledger,
            alerts=self.alerts,  # type: ignore[arg-type]
        )
        self.graph = create_agent(
            self.model,
            self.tools,
            middleware=specialist_middleware(self.services, self.model, self.tools),
            state_schema=SpecialistState,
            context_schema=RunContext,
            checkpointer=persistence.checkpointer,
        )
        self.executor = RunExecutor(self.services, self.graph, RunRegistry())

    async def run(self, text: str = "Is invoice inv_1 paid?", *, ledger: Any = None, persistence: Any = None) -> Any:
        self.build(persistence, ledger)
        return await self.executor.handle(Delivery(command(text)))


def command(text: str = "Is invoice inv_1 paid?", key: str | None = None) -> AgentCommand:
    return AgentCommand.new(
        "user_message",
        session_id=f"s-{uuid.uuid4().hex[:8]}",
        agent=AGENT,
        idempotency_key=key or f"idem-{uuid.uuid4().hex}",
        user={"sub": "jdoe@example.test", "role": "user"},
        data={"text": text},
    )


async def with_persistence(tmp: Path, body: Any) -> Any:
    async with open_persistence(None, str(tmp / "state.db")) as persistence:
        return await body(persistence)


# --- pure parts --------------------------------------------------------------------------------


def test_usage_is_summed_from_the_providers_report_and_absent_usage_is_none():
    assert response_tokens([answer(tokens=120), calls_lookup(tokens=30)]) == 150
    assert response_tokens([AIMessage("no usage")]) is None
    assert (
        response_tokens([AIMessage("x", usage_metadata={"input_tokens": 3, "output_tokens": 4, "total_tokens": 0})])
        == 7
    )


def test_the_partial_result_quotes_the_best_answer_so_far_and_says_which_limit_in_plain_words():
    messages = [
        HumanMessage("Is inv_1 paid?"),
        calls_lookup(text="Let me check invoice inv_1."),
        ToolMessage("paid", tool_call_id="c1", name="lookup"),
    ]
    text = partial_result("toolCalls", 3, messages)
    assert text.startswith("Let me check invoice inv_1.")
    assert "the limit of 3 tool calls for one request" in text and "Completed so far: lookup." in text
    bare = partial_result("dailyTokens", 5000, [HumanMessage("hi")])
    assert bare.startswith("I'm sorry, I could not finish your request")
    assert "daily allowance of 5000 model tokens" in bare and "Completed so far" not in bare
    # A withheld answer (guardrail) and an earlier partial result are never quoted.
    withheld = AIMessage("", response_metadata={"fleetward_guardrail": {"verdict": "block", "findings": "x"}})
    marked = AIMessage("I had to stop", additional_kwargs={BUDGET_STOP: "steps"})
    assert best_answer([withheld, marked]) == ""
    BudgetExceededData.model_validate({"budget": "steps", "limit": 2, "used": 2, "partial": text})


def test_a_threshold_alert_has_the_alert_envelope_and_an_id_per_agent_day_and_threshold():
    crossing = ThresholdCrossing(AGENT, "2026-12-06", 0.8, 820, 1000)
    alert = budget_threshold_alert(crossing, session_id="s-1", run_id="run-1", trace_id="a" * 32)
    assert alert["schema"] == ALERT_SCHEMA and alert["type"] == BUDGET_THRESHOLD and alert["agent"] == AGENT
    assert alert["data"] == {
        "budget": "dailyTokens",
        "day": "2026-12-06",
        "threshold": 0.8,
        "used": 820,
        "limit": 1000,
        "utilization": 0.82,
    }
    assert alert["runId"] == "run-1" and alert["timestamp"].endswith("Z")
    again = budget_threshold_alert(ThresholdCrossing(AGENT, "2026-12-06", 0.8, 900, 1000))
    other = budget_threshold_alert(ThresholdCrossing(AGENT, "2026-12-07", 0.8, 820, 1000))
    assert again["id"] == alert["id"] != other["id"]


def test_the_budget_middleware_is_composed_only_for_the_caps_that_are_set_and_in_order():
    def names(budget: dict[str, Any], ledger: Any = None) -> list[str]:
        services = Services(
            config=config(budget),
            events=None,  # type: ignore[arg-type]
            ledger=None,  # type: ignore[arg-type]
            signing_key=None,  # type: ignore[arg-type]
            guardrails=None,
            retriever=None,  # type: ignore[arg-type]
            prices={},
            token_ledger=ledger,
        )
        return [type(m).__name__ for m in specialist_middleware(services, Scripted(), [])]

    plain = names({})
    assert not [n for n in plain if "Budget" in n]
    full = names({"maxStepsPerRun": 5, "maxToolCallsPerRun": 4, "maxTokensPerRun": 1000}, ledger=object())
    assert full[:6] == [
        "SopRetrievalMiddleware",
        "StepBudgetMiddleware",
        "ToolCallBudgetMiddleware",
        "RunTokenBudgetMiddleware",
        "ResilientModelRetryMiddleware",
        "DailyTokenBudgetMiddleware",
    ]
    assert full[6] == "ModelCallMiddleware"
    assert ToolCallBudgetMiddleware(3).thread_limit == 3
    assert StepBudgetMiddleware(2).thread_limit == 2 and RunTokenBudgetMiddleware(9).limit == 9
    assert DailyTokenBudgetMiddleware().allowance == OUTPUT_ALLOWANCE


# --- per-run caps through the executor ----------------------------------------------------------


async def _run_and_state(rig: Rig, p: Any, **kw: Any) -> tuple[Outcome, str, dict[str, Any]]:
    outcome = await rig.run(persistence=p, **kw)
    runs = await p.ledger.db.fetchall("SELECT run_id, status FROM fw_runs ORDER BY created_at")
    run_id = runs[-1]["run_id"]
    snapshot = await rig.graph.aget_state({"configurable": {"thread_id": run_id}})
    return outcome, runs[-1]["status"], dict(snapshot.values)


def drive(tmp: Path, rig: Rig, **kw: Any) -> tuple[Outcome, str, dict[str, Any]]:
    return asyncio.run(with_persistence(tmp, lambda p: _run_and_state(rig, p, **kw)))


def assert_budget_stop(rig: Rig, budget: str, limit: int, used: int) -> dict[str, Any]:
    types = rig.events.types()
    assert types[-2:] == ["message", "budget_exceeded"] and "resolved" not in types and "failed" not in types
    data = rig.events.of("budget_exceeded")[0]
    assert (data["budget"], data["limit"], data["used"]) == (budget, limit, used)
    assert rig.events.of("message")[-1]["text"] == data["partial"]
    assert rig.audit.stops == [
        {
            "runId": rig.audit.stops[0]["runId"],
            "budget": budget,
            "scope": "day" if budget == "dailyTokens" else "run",
            "limit": limit,
            "used": used,
        }
    ]
    return data


def test_the_tool_call_cap_stops_the_run_before_the_call_over_it_with_a_partial_result(tmp_path: Path):
    rig = Rig(tmp_path, {"maxToolCallsPerRun": 1}, [calls_lookup(text="Checking inv_1."), calls_lookup(), answer()])
    outcome, status, values = drive(tmp_path, rig)
    assert outcome is Outcome.BUDGET_STOPPED and status == RUN_BUDGET_STOPPED
    assert rig.tool_runs == 1 and rig.model.calls == 2
    data = assert_budget_stop(rig, "toolCalls", 1, 1)
    assert data["partial"].startswith("Checking inv_1.") and "Completed so far: lookup." in data["partial"]
    assert values["budget_stop"]["budget"] == "toolCalls"
    last = values["messages"][-1]
    assert isinstance(last, AIMessage) and last.text == data["partial"]
    # The call that was not run has a result, so the conversation stays valid.
    pending = values["messages"][-2]
    assert isinstance(pending, ToolMessage) and pending.status == "error"


def test_the_step_cap_allows_that_many_model_calls(tmp_path: Path):
    rig = Rig(tmp_path, {"maxStepsPerRun": 2}, [calls_lookup(), calls_lookup(), answer()])
    outcome, status, _ = drive(tmp_path, rig)
    assert outcome is Outcome.BUDGET_STOPPED and status == RUN_BUDGET_STOPPED
    assert rig.model.calls == 2 and rig.tool_runs == 2
    data = assert_budget_stop(rig, "steps", 2, 2)
    assert data["partial"].startswith("I'm sorry, I could not finish your request")


def test_the_token_cap_stops_after_the_call_that_reaches_it_without_running_its_tools(tmp_path: Path):
    rig = Rig(tmp_path, {"maxTokensPerRun": 150}, [calls_lookup(100), calls_lookup(100), answer()])
    outcome, status, values = drive(tmp_path, rig)
    assert outcome is Outcome.BUDGET_STOPPED and status == RUN_BUDGET_STOPPED
    assert rig.model.calls == 2 and rig.tool_runs == 1
    assert_budget_stop(rig, "tokens", 150, 200)
    assert values["run_tokens"] == 200


def test_an_answer_within_the_caps_is_delivered_as_usual(tmp_path: Path):
    budget = {"maxTokensPerRun": 1000, "maxToolCallsPerRun": 3, "maxStepsPerRun": 3}
    rig = Rig(tmp_path, budget, [calls_lookup(100), answer(tokens=100)])
    outcome, status, values = drive(tmp_path, rig)
    assert outcome is Outcome.COMPLETED and status == RUN_COMPLETED
    assert rig.events.types()[-2:] == ["message", "resolved"] and rig.audit.stops == []
    assert values["run_tokens"] == 200 and not values.get("budget_stop")


def test_the_token_count_lives_in_the_checkpoint_and_survives_a_run_continued_after_a_stop(tmp_path: Path):
    rig = Rig(tmp_path, {"maxTokensPerRun": 250}, [calls_lookup(100), calls_lookup(100), calls_lookup(100), answer()])

    async def body(p: Any) -> None:
        rig.build(p)
        stopped: dict[str, str] = {}

        def stop_after_first_tool() -> None:
            for ctx in rig.executor.registry.active.values():
                ctx.gate.stop.set()  # SIGTERM: the run stops at its next step boundary
                stopped["run"] = ctx.run_id

        rig.on_tool = stop_after_first_tool
        cmd = command(key="idem-restart")
        assert await rig.executor.handle(Delivery(cmd)) is Outcome.STOPPED
        state = await rig.graph.aget_state({"configurable": {"thread_id": stopped["run"]}})
        assert state.values["run_tokens"] == 100 and rig.model.calls == 1
        # A new process: a fresh executor on the same checkpoints; the command is redelivered.
        rig.on_tool = None
        fresh = RunExecutor(rig.services, rig.graph, RunRegistry())
        assert await fresh.handle(Delivery(cmd)) is Outcome.BUDGET_STOPPED
        assert rig.model.calls == 3  # 100 + 100 + 100 >= 250: the third call's tool is not run
        assert rig.tool_runs == 2
        assert rig.events.of("budget_exceeded")[0]["used"] == 300

    asyncio.run(with_persistence(tmp_path, body))


# --- the daily budget ------------------------------------------------------------------------------


def test_the_daily_budget_refuses_the_next_run_once_used_up_and_alerts_each_threshold_once(tmp_path: Path):
    async def body(p: Any) -> None:
        budget = DailyBudget(AGENT, 2500, (0.5, 0.8, 0.95))
        async with open_daily_token_ledger(None, str(tmp_path / "ledger.db"), budget) as ledger:
            first = Rig(tmp_path, {"dailyTokenBudget": 2500}, [calls_lookup(600), answer(tokens=700)])
            assert await first.run(persistence=p, ledger=ledger) is Outcome.COMPLETED
            assert (await ledger.usage(AGENT)).used == 1300  # settled with the reported usage
            assert first.model.calls == 2 and first.events.types()[-1] == "resolved"
            assert [t for t, _ in first.alerts.crossings] == [0.5]  # the 2nd reservation reached 50 %
            second = Rig(tmp_path, {"dailyTokenBudget": 2500}, [answer(tokens=900)])
            second.alerts = first.alerts
            assert await second.run(persistence=p, ledger=ledger) is Outcome.COMPLETED
            assert (await ledger.usage(AGENT)).used == 2200
            third = Rig(tmp_path, {"dailyTokenBudget": 2500}, [answer()])
            third.alerts = first.alerts
            assert await third.run(persistence=p, ledger=ledger) is Outcome.BUDGET_STOPPED
            assert third.model.calls == 0  # the call was never made
            data = assert_budget_stop(third, "dailyTokens", 2500, 2200)
            assert "daily allowance of 2500 model tokens" in data["partial"]
            assert (await ledger.usage(AGENT)).used == 2200  # the refusal took nothing
            # Each threshold once, across runs. A reservation is a charge: the second run's
            # (1300 + its estimate) reached 80 % and 95 % although it settled at 88 %.
            assert [t for t, _ in first.alerts.crossings] == [0.5, 0.8, 0.95]

    asyncio.run(with_persistence(tmp_path, body))


def test_a_retried_call_is_charged_once_and_the_failed_attempt_is_refunded(tmp_path: Path):
    async def body(p: Any) -> None:
        budget = DailyBudget(AGENT, 100_000, (0.5,))
        async with open_daily_token_ledger(None, str(tmp_path / "ledger.db"), budget) as ledger:
            rig = Rig(
                tmp_path,
                {"dailyTokenBudget": 100_000, "maxTokensPerRun": 10_000, "maxStepsPerRun": 3},
                [status_error(429), answer(tokens=300)],
                max_retries=1,
            )
            assert await rig.run(persistence=p, ledger=ledger) is Outcome.COMPLETED
            assert rig.model.calls == 2
            assert (await ledger.usage(AGENT)).used == 300
            runs = await p.ledger.db.fetchall("SELECT run_id FROM fw_runs")
            state = await rig.graph.aget_state({"configurable": {"thread_id": runs[-1]["run_id"]}})
            assert state.values["run_tokens"] == 300 and state.values["thread_model_call_count"] == 1

    asyncio.run(with_persistence(tmp_path, body))


def test_a_halted_run_holds_no_reservation_while_parked(tmp_path: Path):
    async def body(p: Any) -> None:
        budget = DailyBudget(AGENT, 100_000)
        async with open_daily_token_ledger(None, str(tmp_path / "ledger.db"), budget) as ledger:
            rig = Rig(tmp_path, {"dailyTokenBudget": 100_000}, [calls_lookup(500), answer(tokens=400)])
            registry_gate: dict[str, StepGate] = {}

            def halt_after_tool() -> None:
                for ctx in rig.executor.registry.active.values():
                    ctx.gate.halt()
                    registry_gate["gate"] = ctx.gate

            rig.on_tool = halt_after_tool
            rig.build(p, ledger)
            task = asyncio.create_task(rig.executor.handle(Delivery(command())))
            ctx = None
            for _ in range(250):
                await asyncio.sleep(0.02)
                ctx = next(iter(rig.executor.registry.active.values()), None)
                if ctx is not None and ctx.parked:
                    break
            assert ctx is not None and ctx.parked
            assert (await ledger.usage(AGENT)).used == 500  # the first call, settled; nothing reserved while parked
            registry_gate["gate"].resume()
            assert await task is Outcome.COMPLETED
            assert (await ledger.usage(AGENT)).used == 900

    asyncio.run(with_persistence(tmp_path, body))


def test_a_stop_while_waiting_refunds_nothing_because_nothing_was_reserved(tmp_path: Path):
    # A run stopped at the step gate raises before the middleware reserves.
    async def body(p: Any) -> None:
        async with open_daily_token_ledger(None, str(tmp_path / "ledger.db"), DailyBudget(AGENT, 10_000)) as ledger:
            rig = Rig(tmp_path, {"dailyTokenBudget": 10_000}, [calls_lookup(500), answer()])

            def stop() -> None:
                for ctx in rig.executor.registry.active.values():
                    ctx.gate.stop.set()

            rig.on_tool = stop
            assert await rig.run(persistence=p, ledger=ledger) is Outcome.STOPPED
            assert (await ledger.usage(AGENT)).used == 500

    asyncio.run(with_persistence(tmp_path, body))
