//! The after-runner (SPEC §5): after a `resolved` event, wait `data.verify.delaySeconds` (else
//! `--verify-default-delay-seconds`), GET `data.verify.url` (else `--verify-default-url`), and
//! when it does not answer 2xx in time, produce a `verification_failed` alert to the alerts
//! topic: the fix did not hold.
//!
//! Unlike session delivery, each `resolved` event must be verified once, not once per replica:
//! this consumer joins a consumer group (`--verify-group-id`) so the replicas split the
//! partitions between them. Offsets are committed when the check is scheduled, so a replica
//! that dies during the delay loses that check (at most once; documented). Redirects are not
//! followed and, with `--verify-allowed-url-prefixes`, only matching URLs are called (the URL
//! comes from an event an agent produced).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;

use crate::config::VerifySettings;
use crate::kafka::{GwContext, Kafka};
use crate::metrics::Metrics;
use crate::protocol::{EventType, SessionEvent, verification_alert};
use crate::shutdown::Shutdown;

/// See `Verifier::session`: fetches of the verify consumer wait for this much data...
const FETCH_MIN_BYTES: &str = "1048576";
/// ...or this long, whichever comes first.
const FETCH_WAIT_MAX_MS: &str = "500";

pub struct Verifier {
    pub kafka: Arc<Kafka>,
    pub settings: VerifySettings,
    pub alerts_topic: String,
    pub metrics: Arc<Metrics>,
    http: reqwest::Client,
    pending: AtomicUsize,
}

/// A health check to run: where, after how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub url: String,
    pub delay: Duration,
}

impl Verifier {
    pub fn new(kafka: Arc<Kafka>, settings: VerifySettings, alerts_topic: String, metrics: Arc<Metrics>) -> Verifier {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("HTTP client");
        Verifier {
            kafka,
            settings,
            alerts_topic,
            metrics,
            http,
            pending: AtomicUsize::new(0),
        }
    }

    /// The check a `resolved` event asks for, or why there is none.
    pub fn check_for(&self, ev: &SessionEvent) -> Result<Check, &'static str> {
        let req = ev.verify_spec();
        let url = req
            .and_then(|r| r.url.clone())
            .or_else(|| self.settings.default_url.clone())
            .ok_or("no verify URL in the event and no default")?;
        match reqwest::Url::parse(&url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => return Err("verify URL is not http(s)"),
        }
        if !self.settings.allowed_url_prefixes.is_empty()
            && !self
                .settings
                .allowed_url_prefixes
                .iter()
                .any(|p| url.starts_with(p.as_str()))
        {
            return Err("verify URL not allowed by --verify-allowed-url-prefixes");
        }
        let delay = req
            .and_then(|r| r.delay_seconds)
            .map(Duration::from_secs)
            .unwrap_or(self.settings.default_delay);
        Ok(Check { url, delay })
    }

    /// GET the URL: Ok(()) when healthy (2xx), else the HTTP status and/or error.
    pub async fn probe(&self, url: &str) -> Result<(), (Option<u16>, Option<String>)> {
        match self.http.get(url).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err((Some(r.status().as_u16()), None)),
            Err(e) => Err((None, Some(e.to_string()))),
        }
    }

    fn schedule(self: &Arc<Self>, ev: SessionEvent, shutdown: &Shutdown) {
        let check = match self.check_for(&ev) {
            Ok(c) => c,
            Err(why) => {
                self.metrics.verifications.with_label_values(&["skipped"]).inc();
                tracing::debug!(session = %ev.session_id, why, "verify: no check");
                return;
            }
        };
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.settings.max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.metrics.verifications.with_label_values(&["dropped"]).inc();
            tracing::warn!(session = %ev.session_id, "verify: too many pending checks; dropped");
            return;
        }
        let me = self.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.wait() => { me.pending.fetch_sub(1, Ordering::AcqRel); return; }
                _ = tokio::time::sleep(check.delay) => {}
            }
            let outcome = me.probe(&check.url).await;
            me.pending.fetch_sub(1, Ordering::AcqRel);
            match outcome {
                Ok(()) => {
                    me.metrics.verifications.with_label_values(&["healthy"]).inc();
                    tracing::info!(session = %ev.session_id, run = %ev.run_id, url = %check.url, "verify: the fix held");
                }
                Err((status, error)) => {
                    me.metrics.verifications.with_label_values(&["unhealthy"]).inc();
                    tracing::warn!(session = %ev.session_id, run = %ev.run_id, url = %check.url, ?status, ?error,
                        "verify: the fix did not hold; alerting");
                    let alert = verification_alert(&ev, &check.url, check.delay.as_secs(), status, error.as_deref());
                    let payload = serde_json::to_vec(&alert).expect("alert serializes");
                    for attempt in 0..5u32 {
                        match me.kafka.produce(&me.alerts_topic, &ev.session_id, &payload, None).await {
                            Ok(()) => return,
                            Err(e) => {
                                tracing::warn!(error = ?e, attempt, "verify: alert not produced yet");
                                tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                            }
                        }
                    }
                    tracing::error!(session = %ev.session_id, "verify: gave up producing the alert");
                }
            }
        });
    }

    /// Consume `resolved` events (consumer group) until shutdown.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        loop {
            if shutdown.is_triggered() {
                return;
            }
            match self.session(&shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    let backoff = self.kafka.breaker.failure();
                    tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "verify consumer: rebuilding");
                    tokio::select! {
                        _ = shutdown.wait() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                }
            }
        }
    }

    async fn session(self: &Arc<Self>, shutdown: &Shutdown) -> Result<(), String> {
        let mut cfg = self.kafka.consumer_config("verify");
        cfg.set("group.id", &self.settings.group_id)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "true")
            .set("auto.offset.reset", "latest")
            // This consumer reads the whole events topic to act on its few `resolved` events,
            // whose checks wait `delaySeconds` (60 s by default) anyway. Librdkafka's defaults
            // (a fetch answered as soon as 1 byte is there) suit the live path, not this one:
            // under load they make a small fetch, a wakeup and a poll for every few records.
            // Asking the broker to gather up to FETCH_MIN_BYTES first makes fewer, larger
            // fetches; `fetch.wait.max.ms` (librdkafka's default, set here for clarity) bounds
            // the extra delay of a check when traffic is low. The group, the partitions each
            // replica owns, the offsets and when they are committed are unchanged.
            .set("fetch.min.bytes", FETCH_MIN_BYTES)
            .set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS);
        let consumer: StreamConsumer<GwContext> = cfg
            .create_with_context(self.kafka.context("verify"))
            .map_err(|e| format!("create consumer: {e}"))?;
        consumer
            .subscribe(&[self.kafka.events_topic.as_str()])
            .map_err(|e| format!("subscribe: {e}"))?;
        // One stream and one shutdown future for the session, not new ones per message.
        let mut messages = consumer.stream();
        let stop = shutdown.wait();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return Ok(()),
                // The stream of a StreamConsumer never ends.
                Some(m) = messages.next() => match m {
                    Ok(msg) => {
                        // Cheap pre-filter before parsing: most events are not `resolved`.
                        let Some(payload) = msg.payload() else { continue };
                        if !mentions_resolved(payload) {
                            continue;
                        }
                        if let Ok(ev) = SessionEvent::parse(payload)
                            && ev.kind == EventType::Resolved
                        {
                            self.schedule(ev, shutdown);
                        }
                    }
                    Err(KafkaError::MessageConsumptionFatal(code)) => return Err(format!("fatal: {code}")),
                    Err(e) => tracing::debug!(error = %e, "verify consumer: transient error"),
                },
            }
        }
    }
}

/// Whether `payload` has `"resolved"` in it: every `resolved` event does. Run on every event of
/// the topic, so it uses `str::contains` (a fast substring search; comparing every window of
/// the bytes took ~7x longer on a 550-byte event). A payload that is not UTF-8 is not JSON.
fn mentions_resolved(payload: &[u8]) -> bool {
    std::str::from_utf8(payload).is_ok_and(|s| s.contains("\"resolved\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Args, Settings};
    use crate::envelopes::samples::event_json;
    use clap::Parser;
    use serde_json::json;

    fn verifier(extra: &[&str]) -> Arc<Verifier> {
        let mut argv = vec![
            "gw",
            "--kafka-bootstrap",
            "127.0.0.1:1",
            "--jwt-hs256-secret",
            "0123456789abcdef0123456789abcdef",
            "--jwt-audience",
            "a",
            "--jwt-issuer",
            "i",
        ];
        argv.extend_from_slice(extra);
        let s = Settings::from_args(Args::try_parse_from(argv).unwrap()).unwrap();
        let metrics = Arc::new(Metrics::new());
        // Creating the producer does not connect: no broker is needed here.
        let kafka = Kafka::new(&s, metrics.clone()).unwrap();
        Arc::new(Verifier::new(kafka, s.verify.clone(), s.topics.alerts.clone(), metrics))
    }

    fn resolved(verify: Option<serde_json::Value>) -> SessionEvent {
        let mut v = event_json("resolved", "s-1", "r-1", "ns/agent");
        if let Some(spec) = verify {
            v["data"]["verify"] = spec;
        }
        SessionEvent::from_json(v).unwrap()
    }

    #[test]
    fn check_uses_the_event_then_the_defaults() {
        let v = verifier(&["--verify-default-delay-seconds", "7"]);
        assert!(v.check_for(&resolved(None)).is_err(), "no URL anywhere: no check");
        let c = v
            .check_for(&resolved(Some(json!({"url": "http://svc/healthz", "delaySeconds": 3}))))
            .unwrap();
        assert_eq!(
            c,
            Check {
                url: "http://svc/healthz".into(),
                delay: Duration::from_secs(3)
            }
        );
        let c = v
            .check_for(&resolved(Some(json!({"url": "http://svc/healthz"}))))
            .unwrap();
        assert_eq!(c.delay, Duration::from_secs(7));
        let v = verifier(&["--verify-default-url", "http://default/health"]);
        assert_eq!(v.check_for(&resolved(None)).unwrap().url, "http://default/health");
    }

    #[test]
    fn the_pre_filter_keeps_every_resolved_event() {
        let ev = |kind: &str| serde_json::to_vec(&event_json(kind, "s-1", "r-1", "ns/agent")).unwrap();
        assert!(mentions_resolved(&ev("resolved")));
        let spaced = String::from_utf8(ev("resolved")).unwrap().replace(":", ": ");
        assert!(mentions_resolved(spaced.as_bytes()));
        assert!(!mentions_resolved(&ev("message")) && !mentions_resolved(&ev("failed")));
        assert!(!mentions_resolved(b"\xff\"resolved\""), "not UTF-8, not JSON");
    }

    #[test]
    fn allowlist_limits_urls() {
        let v = verifier(&[
            "--verify-allowed-url-prefixes",
            "http://tools.internal/,https://ok.example/",
        ]);
        assert!(
            v.check_for(&resolved(Some(json!({"url": "http://tools.internal/healthz"}))))
                .is_ok()
        );
        assert!(
            v.check_for(&resolved(Some(json!({"url": "http://169.254.169.254/latest"}))))
                .is_err()
        );
    }

    #[tokio::test]
    async fn probe_tells_healthy_from_unhealthy() {
        use axum::http::StatusCode;
        let app = axum::Router::new()
            .route("/ok", axum::routing::get(|| async { "ok" }))
            .route(
                "/down",
                axum::routing::get(|| async { StatusCode::SERVICE_UNAVAILABLE }),
            )
            .route(
                "/redirect",
                axum::routing::get(|| async { (StatusCode::FOUND, [("location", "/ok")]) }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let v = verifier(&[]);
        assert!(v.probe(&format!("http://{addr}/ok")).await.is_ok());
        assert_eq!(v.probe(&format!("http://{addr}/down")).await.unwrap_err().0, Some(503));
        // Redirects are not followed: a 302 is not healthy.
        assert_eq!(
            v.probe(&format!("http://{addr}/redirect")).await.unwrap_err().0,
            Some(302)
        );
        let (status, err) = v.probe("http://127.0.0.1:1/nothing").await.unwrap_err();
        assert!(status.is_none() && err.is_some());
        server.abort();
    }
}
