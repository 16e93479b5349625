//! The after-runner (SPEC §5): after a `resolved` event, wait `data.verify.delaySeconds` (else
//! `--verify-default-delay-seconds`), GET `data.verify.url` (else `--verify-default-url`), and
//! when it does not answer 2xx in time, produce a `verification_failed` alert to the alerts
//! topic: the fix did not hold.
//!
//! Unlike session delivery, each `resolved` event must be verified once, not once per replica:
//! this consumer joins a consumer group (`--verify-group-id`) so the replicas split the
//! partitions between them. A partition's committed offset never passes a check that has not
//! finished (`Progress`), so when a replica dies or stops during the delay, the replica that
//! takes the partition over reads the `resolved` event again and runs the check, at the time
//! it was due (the delay counts from the event's Kafka timestamp). At least once: a check that
//! finished just before its partition moved may run twice (a second alert at worst, never a
//! lost one). Redirects are not followed and, with `--verify-allowed-url-prefixes`, only
//! matching URLs are called (the URL comes from an event an agent produced).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::config::VerifySettings;
use crate::kafka::{GwContext, Kafka};
use crate::metrics::Metrics;
use crate::protocol::{EventType, SessionEvent, verification_alert};
use crate::shutdown::Shutdown;

/// See `Verifier::session`: fetches of the verify consumer wait for this much data...
const FETCH_MIN_BYTES: &str = "1048576";
/// ...or this long, whichever comes first.
const FETCH_WAIT_MAX_MS: &str = "500";
/// How soon the group notices a replica that died (SIGKILL, node loss) and hands its partitions,
/// and so its unfinished checks, to the others. librdkafka's default is 45 s.
const SESSION_TIMEOUT_MS: &str = "10000";
/// How often the read position of ordinary events is stored for the next automatic commit.
/// Positions that matter (a check finished) are stored and committed at once.
const STORE_INTERVAL: Duration = Duration::from_secs(1);

/// Per partition of the events topic: the checks this process has not finished, and the next
/// offset to read. The position to commit is the oldest unfinished check (read again after a
/// takeover), or the next offset when none is open. Pure bookkeeping, so it is unit-tested alone.
#[derive(Debug, Default)]
pub struct Progress {
    partitions: HashMap<i32, PartitionProgress>,
}

#[derive(Debug, Default)]
struct PartitionProgress {
    open: BTreeSet<i64>,
    next: i64,
    stored: Option<i64>,
}

impl PartitionProgress {
    fn position(&self) -> i64 {
        self.open.first().copied().unwrap_or(self.next)
    }
}

impl Progress {
    /// Record a read of `offset`. With `opens_check`, a check starts for it, unless one is already
    /// open for that offset (the partition was read again after a consumer rebuild): then false.
    pub fn read(&mut self, partition: i32, offset: i64, opens_check: bool) -> bool {
        let p = self.partitions.entry(partition).or_default();
        p.next = p.next.max(offset + 1);
        opens_check && p.open.insert(offset)
    }

    /// Whether a check is open for this offset (read again while it waits: not a new check).
    pub fn is_open(&self, partition: i32, offset: i64) -> bool {
        self.partitions
            .get(&partition)
            .is_some_and(|p| p.open.contains(&offset))
    }

    /// The check of `offset` finished (or was abandoned at shutdown: then it is not called).
    pub fn finish(&mut self, partition: i32, offset: i64) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.open.remove(&offset);
        }
    }

    /// Positions that changed since they were last taken, to store for the next commit.
    pub fn take_changed(&mut self) -> Vec<(i32, i64)> {
        let mut out = Vec::new();
        for (&partition, p) in self.partitions.iter_mut() {
            let pos = p.position();
            if p.stored != Some(pos) {
                p.stored = Some(pos);
                out.push((partition, pos));
            }
        }
        out.sort_unstable();
        out
    }
}

pub struct Verifier {
    pub kafka: Arc<Kafka>,
    pub settings: VerifySettings,
    pub alerts_topic: String,
    pub metrics: Arc<Metrics>,
    http: reqwest::Client,
    pending: AtomicUsize,
    progress: Mutex<Progress>,
    /// The group consumer of the current session, for storing and committing positions when a
    /// check finishes (the checks outlive the message that started them).
    consumer: Mutex<Option<Arc<StreamConsumer<GwContext>>>>,
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
            progress: Mutex::new(Progress::default()),
            consumer: Mutex::new(None),
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

    /// A `resolved` event read at `partition`/`offset`, `age` after it was produced: start its
    /// check, unless it needs none, one is already waiting for it, or too many are.
    fn on_resolved(
        self: &Arc<Self>,
        ev: SessionEvent,
        partition: i32,
        offset: i64,
        age: Duration,
        shutdown: &Shutdown,
    ) {
        let check = match self.check_for(&ev) {
            Ok(c) => c,
            Err(why) => {
                self.progress().read(partition, offset, false);
                self.metrics.verifications.with_label_values(&["skipped"]).inc();
                tracing::debug!(session = %ev.session_id, why, "verify: no check");
                return;
            }
        };
        if self.progress().is_open(partition, offset) {
            return; // read again after a consumer rebuild; its check is still waiting here
        }
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.settings.max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.progress().read(partition, offset, false);
            self.metrics.verifications.with_label_values(&["dropped"]).inc();
            tracing::warn!(session = %ev.session_id, "verify: too many pending checks; dropped");
            return;
        }
        self.progress().read(partition, offset, true);
        self.metrics.verify_pending.inc();
        // Committed now, not at the next automatic commit: a group that has never committed on
        // this partition would otherwise start a successor at the end, past this event.
        self.store_positions(true);
        let me = self.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                // Left open: the committed position stays before it, so the replica that reads
                // this partition next runs the check.
                _ = shutdown.wait() => { me.pending.fetch_sub(1, Ordering::AcqRel); me.metrics.verify_pending.dec(); return; }
                _ = tokio::time::sleep(check.delay.saturating_sub(age)) => {}
            }
            me.run_check(&ev, &check).await;
            me.pending.fetch_sub(1, Ordering::AcqRel);
            me.metrics.verify_pending.dec();
            me.progress().finish(partition, offset);
            me.store_positions(true);
        });
    }

    /// Probe the URL; when the fix did not hold, produce the alert (retried a few times).
    async fn run_check(&self, ev: &SessionEvent, check: &Check) {
        match self.probe(&check.url).await {
            Ok(()) => {
                self.metrics.verifications.with_label_values(&["healthy"]).inc();
                tracing::info!(session = %ev.session_id, run = %ev.run_id, url = %check.url, "verify: the fix held");
            }
            Err((status, error)) => {
                self.metrics.verifications.with_label_values(&["unhealthy"]).inc();
                tracing::warn!(session = %ev.session_id, run = %ev.run_id, url = %check.url, ?status, ?error,
                    "verify: the fix did not hold; alerting");
                let alert = verification_alert(ev, &check.url, check.delay.as_secs(), status, error.as_deref());
                let payload = serde_json::to_vec(&alert).expect("alert serializes");
                for attempt in 0..5u32 {
                    match self
                        .kafka
                        .produce(&self.alerts_topic, &ev.session_id, &payload, None)
                        .await
                    {
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
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Store the positions that moved for the consumer's next commit; with `commit`, commit now.
    /// A partition this replica no longer owns is refused by librdkafka and left to its owner.
    fn store_positions(&self, commit: bool) {
        let changed = self.progress().take_changed();
        let consumer = self.consumer.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(consumer) = consumer else { return };
        if !changed.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (partition, position) in changed {
                let _ = tpl.add_partition_offset(&self.kafka.events_topic, partition, Offset::Offset(position));
            }
            if let Err(e) = consumer.store_offsets(&tpl) {
                tracing::debug!(error = %e, "verify: positions not stored (partitions moved?)");
            }
        }
        if commit && let Err(e) = consumer.commit_consumer_state(CommitMode::Async) {
            tracing::debug!(error = %e, "verify: commit not sent");
        }
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
            // librdkafka commits what `store_positions` stored, every 5 s and when partitions
            // move or the consumer closes; a finished check commits at once.
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "latest")
            .set("session.timeout.ms", SESSION_TIMEOUT_MS)
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
        let consumer: Arc<StreamConsumer<GwContext>> = Arc::new(
            cfg.create_with_context(self.kafka.context("verify"))
                .map_err(|e| format!("create consumer: {e}"))?,
        );
        consumer
            .subscribe(&[self.kafka.events_topic.as_str()])
            .map_err(|e| format!("subscribe: {e}"))?;
        *self.consumer.lock().unwrap_or_else(|e| e.into_inner()) = Some(consumer.clone());
        let outcome = self.read(&consumer, shutdown).await;
        // Hand over what was read for the final commit, which librdkafka makes when the
        // consumer closes (dropped with the last reference, here).
        self.store_positions(false);
        *self.consumer.lock().unwrap_or_else(|e| e.into_inner()) = None;
        outcome
    }

    async fn read(self: &Arc<Self>, consumer: &StreamConsumer<GwContext>, shutdown: &Shutdown) -> Result<(), String> {
        let mut store = tokio::time::interval(STORE_INTERVAL);
        store.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One stream and one shutdown future for the session, not new ones per message.
        let mut messages = consumer.stream();
        let stop = shutdown.wait();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = store.tick() => self.store_positions(false),
                // The stream of a StreamConsumer never ends.
                Some(m) = messages.next() => match m {
                    Ok(msg) => {
                        let (partition, offset) = (msg.partition(), msg.offset());
                        // Cheap pre-filter before parsing: most events are not `resolved`.
                        let resolved = msg
                            .payload()
                            .filter(|p| mentions_resolved(p))
                            .and_then(|p| SessionEvent::parse(p).ok())
                            .filter(|ev| ev.kind == EventType::Resolved);
                        match resolved {
                            Some(ev) => self.on_resolved(ev, partition, offset, age(msg.timestamp().to_millis()), shutdown),
                            None => { self.progress().read(partition, offset, false); }
                        }
                    }
                    Err(KafkaError::MessageConsumptionFatal(code)) => return Err(format!("fatal: {code}")),
                    Err(e) => tracing::debug!(error = %e, "verify consumer: transient error"),
                },
            }
        }
    }
}

/// How long ago a record with this Kafka timestamp (ms since the epoch) was produced; zero when
/// it has none or it lies in the future (clock skew).
fn age(timestamp_ms: Option<i64>) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64;
    timestamp_ms.map_or(Duration::ZERO, |t| {
        Duration::from_millis(now.saturating_sub(t).max(0) as u64)
    })
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
    fn the_position_never_passes_an_unfinished_check() {
        let mut p = Progress::default();
        assert!(!p.read(0, 10, false));
        assert_eq!(p.take_changed(), vec![(0, 11)]);
        assert!(p.read(0, 11, true), "a resolved event opens a check");
        assert!(!p.read(0, 11, true), "read again while it waits: not a second check");
        assert!(p.is_open(0, 11));
        p.read(0, 12, false);
        assert!(p.read(0, 13, true));
        p.read(1, 5, false);
        p.read(0, 20, false);
        // Partition 0 stays at its oldest open check (11, as stored before); partition 1 moves on.
        assert_eq!(p.take_changed(), vec![(1, 6)]);
        assert_eq!(p.take_changed(), vec![], "nothing moved since");
        p.finish(0, 13);
        assert_eq!(p.take_changed(), vec![], "an older check is still open");
        p.finish(0, 11);
        assert_eq!(p.take_changed(), vec![(0, 21)]);
        assert!(!p.is_open(0, 11));
        // Read again from an older committed offset (after a rebuild): the position does not go back.
        p.read(0, 15, false);
        assert_eq!(p.take_changed(), vec![]);
    }

    #[test]
    fn age_counts_from_the_record_timestamp() {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
        assert!(age(Some(now - 3_000)) >= Duration::from_millis(2_900));
        assert_eq!(age(Some(now + 60_000)), Duration::ZERO, "clock skew: no negative age");
        assert_eq!(age(None), Duration::ZERO);
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
