//! Logs (JSON or text, `RUST_LOG`-style filter in `FLEETWARD_GATEWAY_LOG`) and OpenTelemetry
//! spans. Spans always get W3C trace context (so a delivery continues the trace of the
//! Kafka `traceparent` header and produced commands carry one); they are exported over
//! OTLP/HTTP only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set. The
//! per-event delivery span is only made then (`deliver_span`).
//!
//! Kept separate from `main.rs` because both the binary and the tests set it up.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Holds the tracer provider; `shutdown` flushes pending spans.
pub struct Telemetry {
    provider: SdkTracerProvider,
    pub exporting: bool,
}

impl Telemetry {
    pub fn shutdown(self) {
        let _ = self.provider.shutdown();
    }
}

/// Whether spans leave the process (an OTLP endpoint is set); see `deliver_span`.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Install the global subscriber. Must run outside the Tokio runtime: the OTLP exporter
/// uses reqwest's blocking client, which owns a runtime of its own.
pub fn init(format: LogFormat) -> Result<Telemetry, String> {
    let endpoint_set = ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|s| !s.is_empty()));
    let mut builder = SdkTracerProvider::builder();
    if endpoint_set {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| format!("OTLP exporter: {e}"))?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("fleetward-gateway")
                .build(),
        )
        .build();
    let tracer = provider.tracer("fleetward-gateway");
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let filter = EnvFilter::try_from_env("FLEETWARD_GATEWAY_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn,h2=warn,hyper=warn,reqwest=warn"));
    let otel = tracing_opentelemetry::layer().with_tracer(tracer);
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let res = match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false),
            )
            .try_init(),
        LogFormat::Text => registry.with(tracing_subscriber::fmt::layer()).try_init(),
    };
    res.map_err(|e| format!("log subscriber: {e}"))?;
    EXPORTING.store(endpoint_set, Ordering::Relaxed);
    Ok(Telemetry {
        provider,
        exporting: endpoint_set,
    })
}

struct HeaderExtractor<'a>(&'a [(String, String)]);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

#[derive(Default)]
struct HeaderInjector(Vec<(String, String)>);

impl Injector for HeaderInjector {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_string(), value));
    }
}

/// Make `span` a child of the trace in `traceparent` (a Kafka header), when valid.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(tp) = traceparent else { return };
    let headers = [("traceparent".to_string(), tp.to_string())];
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(&headers));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The span around one event's delivery, continuing the trace of the record's `traceparent`
/// header; `traceparent` is only called when the span is made.
///
/// Made only when spans are exported: otherwise nothing can observe it (no event is logged
/// inside it, and the JSON logs carry no span), yet making one per event (ids, attributes,
/// the OpenTelemetry context taken from the header) was a good part of the gateway's CPU per
/// event. `Span::none()` costs nothing to enter.
pub fn deliver_span(
    session: &str,
    event_type: &'static str,
    partition: i32,
    offset: i64,
    traceparent: impl FnOnce() -> Option<String>,
) -> tracing::Span {
    if !EXPORTING.load(Ordering::Relaxed) {
        return tracing::Span::none();
    }
    let span = tracing::info_span!("gateway.deliver", session = %session, event_type, partition, offset);
    continue_trace(&span, traceparent().as_deref());
    span
}

/// The `traceparent` of `span` and its trace id (32 hex), for outgoing Kafka messages.
pub fn traceparent_of(span: &tracing::Span) -> Option<(String, String)> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return None;
    }
    let mut inj = HeaderInjector::default();
    TraceContextPropagator::new().inject_context(&cx, &mut inj);
    let tp = inj.0.into_iter().find(|(k, _)| k == "traceparent")?.1;
    Some((tp, sc.trace_id().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_continues_the_kafka_trace() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            let span = tracing::info_span!("gateway.deliver");
            continue_trace(&span, Some(parent));
            let (tp, trace_id) = traceparent_of(&span).expect("a valid span context");
            assert_eq!(trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
            assert!(tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
            assert!(!tp.contains("00f067aa0ba902b7"), "a child span of its own");

            // Garbage in the header starts a new trace instead.
            let other = tracing::info_span!("gateway.deliver");
            continue_trace(&other, Some("not-a-traceparent"));
            let (_, fresh) = traceparent_of(&other).unwrap();
            assert_ne!(fresh, "4bf92f3577b34da6a3ce929d0e0e4736");
        });
    }

    #[test]
    fn a_delivery_span_continues_the_kafka_trace_when_spans_are_exported() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let parent = || Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string());
            // The only test that sets it; `init` is never called in tests.
            EXPORTING.store(true, Ordering::Relaxed);
            let span = deliver_span("s-1", "message", 0, 7, parent);
            EXPORTING.store(false, Ordering::Relaxed);
            let (_, trace_id) = traceparent_of(&span).expect("a valid span context");
            assert_eq!(trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");

            let mut asked = false;
            let none = deliver_span("s-1", "message", 0, 8, || {
                asked = true;
                parent()
            });
            assert!(none.is_none() && !asked, "no span, and the header is not even read");
        });
    }
}
