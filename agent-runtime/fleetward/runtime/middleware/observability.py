"""Model calls: a span each, token and cost metrics, and the step gate (halt/stop) before
every call. Token counts come from the provider's usage report (`usage_metadata`); cost
from the config's `modelPrices` by model name."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fleetward.runtime.context import RunContext
from fleetward.runtime.telemetry import COST, MODEL_CALLS, TOKENS, tracer
from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain_core.messages import AIMessage
from opentelemetry import trace


class ModelCallMiddleware(AgentMiddleware[Any, RunContext]):
    def __init__(self, model_name: str) -> None:
        super().__init__()
        self.model_name = model_name
        """The primary model's name: the label when the request's model names none."""

    def _name(self, request: ModelRequest) -> str:
        # The fallback middleware (outside this one) swaps the request's model: label and
        # price each call by the model that actually served it.
        return getattr(request.model, "model_name", None) or self.model_name

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> ModelResponse:
        ctx: RunContext = request.runtime.context
        await ctx.before_step("model")
        agent = ctx.services.agent
        name = self._name(request)
        with tracer().start_as_current_span(
            "model call",
            kind=trace.SpanKind.CLIENT,
            attributes={"gen_ai.request.model": name, "fleetward.run_id": ctx.run_id},
        ) as span:
            try:
                response = await handler(request)
            except Exception as e:
                MODEL_CALLS.labels(agent, name, "error").inc()
                span.set_status(trace.Status(trace.StatusCode.ERROR, type(e).__name__))
                raise
            MODEL_CALLS.labels(agent, name, "ok").inc()
            prompt = completion = 0
            for message in response.result:
                usage = message.usage_metadata if isinstance(message, AIMessage) else None
                if usage:
                    prompt += usage.get("input_tokens", 0)
                    completion += usage.get("output_tokens", 0)
            TOKENS.labels(agent, name, "prompt").inc(prompt)
            TOKENS.labels(agent, name, "completion").inc(completion)
            span.set_attribute("gen_ai.usage.input_tokens", prompt)
            span.set_attribute("gen_ai.usage.output_tokens", completion)
            price = ctx.services.prices.get(name)
            if price is not None:
                cost = price.cost(prompt, completion)
                COST.labels(agent, name).inc(cost)
                span.set_attribute("fleetward.cost_usd", cost)
            return response
