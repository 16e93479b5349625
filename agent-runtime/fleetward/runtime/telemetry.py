"""Observability of runs (SPEC §8): Prometheus metrics, OpenTelemetry spans and JSON logs.

- Metrics live in the process-wide default registry that /metrics serves.
- Spans: one tracer provider per process. Spans are always created (they give every run a
  W3C trace id for events, logs and tool calls); they are exported over OTLP/HTTP only when
  OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) is set, as the OTel spec prescribes.
- Logs: one JSON object per line with the trace and span id of the current span.

Nothing here records text from a session: span attributes and log fields carry names,
ids, counts and outcomes only, so PII cannot reach them (SPEC §4).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span, SpanContext
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import Counter, Gauge, Histogram

# --- Metrics (names from SPEC §8) -----------------------------------------------------------

RUN_DURATION = Histogram(
    "fleetward_agent_run_duration_seconds",
    "Wall time of one agent run segment (from intake or resume to its end or interrupt).",
    ["agent", "outcome"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
)
TOKENS = Counter("fleetward_agent_tokens_total", "Model tokens used.", ["agent", "model", "kind"])
COST = Counter(
    "fleetward_agent_cost_usd_total", "Model cost in USD (from the configured price table).", ["agent", "model"]
)
MODEL_CALLS = Counter("fleetward_agent_model_calls_total", "Model calls.", ["agent", "model", "outcome"])
TOOL_DURATION = Histogram(
    "fleetward_tool_duration_seconds",
    "Duration of one tool call as the runtime saw it.",
    ["agent", "tool", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TOOL_ERRORS = Counter(
    "fleetward_tool_errors_total", "Tool calls that failed or were refused.", ["agent", "tool", "reason"]
)
GUARDRAIL_VIOLATIONS = Counter(
    "fleetward_guardrail_violations_total",
    "Guardrail findings that changed what happened (block, escalate, SOP or allow-list refusal).",
    ["agent", "stage", "kind", "action"],
)
PII_DETECTIONS = Counter(
    "fleetward_pii_detections_total", "PII values detected (and redacted or blocked).", ["agent", "stage", "type"]
)
REQUESTS = Counter("fleetward_runtime_requests_total", "Commands taken from the request topic.", ["agent", "outcome"])
RUNS_IN_FLIGHT = Gauge("fleetward_runtime_runs_in_flight", "Runs being executed by this process.", ["agent"])
HUMAN_REVIEW_QUEUE_DEPTH = Gauge(
    "fleetward_human_review_queue_depth",
    "Human reviews the agent's runs wait for (from the shared ledger: with PostgreSQL every replica "
    "reports the agent's whole count; aggregate with max).",
    ["agent"],
)
ROUTER_HANDOFFS = Counter(
    "fleetward_router_handoffs_total",
    "Parts of requests a router handed on, by route topic and where they went (specialist, fallback_agent, human).",
    ["agent", "topic", "target"],
)
HALTED = Gauge("fleetward_runtime_halted", "1 while a kill switch halts this runtime.", ["agent"])
EVENTS_PUBLISHED = Counter("fleetward_runtime_events_total", "Session events published.", ["agent", "type"])
# SPEC §8 names no circuit-breaker metric; this name and its values are Fleetward's choice:
# 0 closed, 1 half-open, 2 open (ordered by severity, so max() over replicas is meaningful).
TOOL_CIRCUIT_STATE = Gauge(
    "fleetward_tool_circuit_state",
    "Circuit breaker state per tool: 0 closed, 1 half-open, 2 open.",
    ["agent", "tool"],
)


# --- Tracing -----------------------------------------------------------------------------------

_PROPAGATOR = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None
_tracer: trace.Tracer | None = None


def setup_tracing(service_instance: str, agent: str) -> TracerProvider:
    """The process's tracer provider; OTLP export only when an endpoint is configured."""
    global _provider
    if _provider is not None:
        return _provider
    resource = Resource.create(
        {"service.name": "fleetward-runtime", "service.instance.id": service_instance, "fleetward.agent": agent}
    )
    provider = TracerProvider(resource=resource)
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _provider = provider
    return provider


def shutdown_tracing() -> None:
    global _provider, _tracer
    if _provider is not None:
        _provider.shutdown()
        _provider = None
        _tracer = None


def tracer() -> trace.Tracer:
    # One tracer per provider: get_tracer builds a new Tracer (and scope) on every call,
    # which showed in the per-request profile (bench/runtime_overhead.py).
    global _tracer
    if _tracer is None:
        provider = _provider or setup_tracing(os.environ.get("POD_NAME", "local"), "unknown")
        _tracer = provider.get_tracer("fleetward.runtime")
    return _tracer


def context_from_traceparent(traceparent: str | None, trace_id: str | None = None) -> otel_context.Context:
    """The parent context of a run: the Kafka `traceparent` header, else the command's
    traceId (as a remote parent with a fresh span id), else none (a new trace)."""
    if traceparent:
        ctx = _PROPAGATOR.extract({"traceparent": traceparent})
        if trace.get_current_span(ctx).get_span_context().is_valid:
            return ctx
    if trace_id:
        import secrets

        parent = SpanContext(
            trace_id=int(trace_id, 16),
            span_id=int.from_bytes(secrets.token_bytes(8), "big") or 1,
            is_remote=True,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
        )
        return trace.set_span_in_context(trace.NonRecordingSpan(parent))
    return otel_context.Context()


def traceparent_of(span: Span | None = None) -> str | None:
    carrier: dict[str, str] = {}
    ctx = trace.set_span_in_context(span) if span is not None else None
    _PROPAGATOR.inject(carrier, context=ctx)
    return carrier.get("traceparent")


def trace_id_hex(span: Span) -> str:
    return format(span.get_span_context().trace_id, "032x")


class TracedGuardrails:
    """The guardrail engine with a `guardrail decision` span around every scan (SPEC §4, §8).

    Wraps the engine (same `scan(text, stage)`) rather than changing it, so the detection
    code stays free of telemetry. The span carries the stage, the verdict and the kinds and
    types of the findings with their count, never the text or a matched value."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def scan(self, text: str, stage: str) -> Any:
        with tracer().start_as_current_span(
            "guardrail decision", attributes={"fleetward.guardrail.stage": stage}
        ) as span:
            result = self.engine.scan(text, stage)
            span.set_attribute("fleetward.guardrail.verdict", result.verdict)
            span.set_attribute("fleetward.guardrail.findings", len(result.findings))
            if result.findings:
                span.set_attribute(
                    "fleetward.guardrail.finding_types", sorted({f"{f.kind}:{f.type}" for f in result.findings})
                )
            return result

    def __getattr__(self, name: str) -> Any:
        if name == "engine":  # not set yet (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.engine, name)


# --- JSON logs -----------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the current trace/span ids and `extra={"fw": {...}}` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            out["traceId"] = format(span_context.trace_id, "032x")
            out["spanId"] = format(span_context.span_id, "016x")
        fields = getattr(record, "fw", None)
        if isinstance(fields, Mapping):
            out.update(fields)
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Client libraries log request bodies or URLs with query strings at DEBUG; keep them quiet.
    for noisy in ("httpx", "httpx2", "httpcore", "openai", "aiosqlite", "psycopg"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
