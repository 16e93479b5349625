//! Prometheus metrics (`/metrics`). Names carry the `fleetward_gateway_` prefix; label values
//! are small fixed sets (never session ids or user names) so cardinality stays bounded.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Delivery latency buckets, seconds: from a local hop (1 ms) to a badly lagging consumer (30 s).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub struct Metrics {
    registry: Registry,
    pub connections: IntGauge,
    pub connections_total: IntCounter,
    pub deliveries: IntCounter,
    pub drops: IntCounterVec,
    pub slow_client_closes: IntCounter,
    pub closes: IntCounterVec,
    pub resumes: IntCounterVec,
    pub auth_refusals: IntCounterVec,
    pub handshake_refusals: IntCounterVec,
    pub inbound_frames: IntCounterVec,
    pub events_consumed: IntCounter,
    pub events_invalid: IntCounter,
    pub kafka_lag: IntGaugeVec,
    pub kafka_up: IntGauge,
    pub kafka_circuit_open: IntGauge,
    pub kafka_reconnects: IntCounter,
    pub partitions: IntGauge,
    pub delivery_latency: Histogram,
    pub sessions: IntGaugeVec,
    pub halted_scopes: IntGauge,
    pub control_messages: IntCounterVec,
    pub verifications: IntCounterVec,
    pub verify_partitions: IntGauge,
    pub verify_pending: IntGauge,
    pub jwks_keys: IntGauge,
    pub jwks_refreshes: IntCounterVec,
    pub trust_bundle_keys: IntGauge,
    pub trust_bundle_updates: IntCounterVec,
    pub trust_bundle_source_up: IntGauge,
    pub trust_bundle_keys_covered: IntGauge,
    pub kill_switch_watch_up: IntGauge,
    pub revoked_closes: IntCounter,
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("metric definition");
    r.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric definition");
    r.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("metric definition");
    r.register(Box::new(g.clone())).expect("metric registered once");
    g
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric definition");
    r.register(Box::new(g.clone())).expect("metric registered once");
    g
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let delivery_latency = Histogram::with_opts(
            HistogramOpts::new(
                "fleetward_gateway_delivery_latency_seconds",
                "From the event's timestamp (else the Kafka message timestamp) to the frame written to the client",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("metric definition");
        r.register(Box::new(delivery_latency.clone()))
            .expect("metric registered once");
        Metrics {
            connections: gauge(&r, "fleetward_gateway_connections", "Open WebSocket connections"),
            connections_total: counter(
                &r,
                "fleetward_gateway_connections_total",
                "WebSocket connections accepted",
            ),
            deliveries: counter(
                &r,
                "fleetward_gateway_deliveries_total",
                "Event frames written to clients",
            ),
            drops: counter_vec(
                &r,
                "fleetward_gateway_drops_total",
                "Event frames not delivered, by reason (queue_full: the client was closed as slow)",
                &["reason"],
            ),
            slow_client_closes: counter(
                &r,
                "fleetward_gateway_slow_client_closes_total",
                "Connections closed with 4008 because their outbound queue was full",
            ),
            closes: counter_vec(
                &r,
                "fleetward_gateway_closes_total",
                "Connections closed, by close code",
                &["code"],
            ),
            resumes: counter_vec(
                &r,
                "fleetward_gateway_resumes_total",
                "Resume requests by outcome (history, kafka, recovery_failed)",
                &["outcome"],
            ),
            auth_refusals: counter_vec(
                &r,
                "fleetward_gateway_auth_refusals_total",
                "Handshakes refused by token checks, by reason",
                &["reason"],
            ),
            handshake_refusals: counter_vec(
                &r,
                "fleetward_gateway_handshake_refusals_total",
                "Handshakes refused, by HTTP status",
                &["status"],
            ),
            inbound_frames: counter_vec(
                &r,
                "fleetward_gateway_inbound_frames_total",
                "Client frames by type and outcome",
                &["type", "outcome"],
            ),
            events_consumed: counter(
                &r,
                "fleetward_gateway_events_consumed_total",
                "Events read from the events topic",
            ),
            events_invalid: counter(
                &r,
                "fleetward_gateway_events_invalid_total",
                "Messages on the events topic that are not valid session events (not delivered)",
            ),
            kafka_lag: gauge_vec(
                &r,
                "fleetward_gateway_kafka_lag",
                "Messages between the partition's high watermark and this gateway's position",
                &["partition"],
            ),
            kafka_up: gauge(
                &r,
                "fleetward_gateway_kafka_up",
                "1 when the events consumer is assigned and the brokers answer",
            ),
            kafka_circuit_open: gauge(
                &r,
                "fleetward_gateway_kafka_circuit_open",
                "1 while the Kafka circuit breaker is open",
            ),
            kafka_reconnects: counter(
                &r,
                "fleetward_gateway_kafka_reconnects_total",
                "Kafka consumer rebuilds after errors",
            ),
            partitions: gauge(
                &r,
                "fleetward_gateway_partitions",
                "Partitions of the events topic being read",
            ),
            delivery_latency,
            sessions: gauge_vec(
                &r,
                "fleetward_gateway_sessions",
                "Sessions known to this gateway, by lifecycle state",
                &["state"],
            ),
            halted_scopes: gauge(
                &r,
                "fleetward_gateway_halted_kill_switches",
                "Kill switches currently halting agents",
            ),
            control_messages: counter_vec(
                &r,
                "fleetward_gateway_control_messages_total",
                "Control messages by type and outcome",
                &["type", "outcome"],
            ),
            verifications: counter_vec(
                &r,
                "fleetward_gateway_verifications_total",
                "After-runner verifications by outcome (healthy, unhealthy, dropped, skipped)",
                &["outcome"],
            ),
            verify_partitions: gauge(
                &r,
                "fleetward_gateway_verify_partitions",
                "Events partitions this replica verifies `resolved` events of (consumer group share)",
            ),
            verify_pending: gauge(
                &r,
                "fleetward_gateway_verify_pending",
                "After-runner checks waiting for their delay or running on this replica",
            ),
            jwks_keys: gauge(
                &r,
                "fleetward_gateway_jwks_keys",
                "Verification keys loaded from the JWKS",
            ),
            jwks_refreshes: counter_vec(
                &r,
                "fleetward_gateway_jwks_refreshes_total",
                "JWKS loads by outcome",
                &["outcome"],
            ),
            trust_bundle_keys: gauge(
                &r,
                "fleetward_gateway_trust_bundle_keys",
                "Agent keys currently trusted from the trust bundle (bundle keys minus those covered by an engaged kill switch)",
            ),
            trust_bundle_updates: counter_vec(
                &r,
                "fleetward_gateway_trust_bundle_updates_total",
                "Trust bundle reads (list or watch event) by outcome (ok, missing, invalid, error)",
                &["outcome"],
            ),
            trust_bundle_source_up: gauge(
                &r,
                "fleetward_gateway_trust_bundle_source_up",
                "1 while the trust-bundle list/watch on the Kubernetes API works",
            ),
            trust_bundle_keys_covered: gauge(
                &r,
                "fleetward_gateway_trust_bundle_keys_covered_by_kill_switch",
                "Trust-bundle keys refused locally because an engaged KillSwitch (revokeCredentials) covers their agent",
            ),
            kill_switch_watch_up: gauge(
                &r,
                "fleetward_gateway_kill_switch_watch_up",
                "1 while the KillSwitch list/watch on the Kubernetes API works",
            ),
            revoked_closes: counter(
                &r,
                "fleetward_gateway_revoked_closes_total",
                "Connections closed (4003) because the trust-bundle key that signed their token was removed or covered by a kill switch",
            ),
            registry: r,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_histogram_with_explicit_buckets() {
        let m = Metrics::new();
        m.delivery_latency.observe(0.003);
        m.auth_refusals.with_label_values(&["expired"]).inc();
        let text = m.render();
        assert!(
            text.contains("fleetward_gateway_delivery_latency_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("fleetward_gateway_delivery_latency_seconds_bucket{le=\"0.0025\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("fleetward_gateway_auth_refusals_total{reason=\"expired\"} 1"),
            "{text}"
        );
    }
}
