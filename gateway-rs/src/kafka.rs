//! Kafka: the events consumer (every partition, assigned, no consumer group), the Kafka-side
//! resume read, the producer of commands/acks/alerts, and the circuit breaker around them.
//!
//! Why no consumer group for events: a group splits partitions between replicas, and a
//! replica would then miss the sessions whose partitions went elsewhere. Each replica
//! assigns itself every partition, starting at the end (the history fills from then on; older
//! positions are read back on demand by `replay`), and re-checks the partition count every
//! `--partition-refresh-seconds` (new partitions are read from their beginning). Offsets are
//! never committed: the position lives in the hub's cursors, and a rebuilt consumer resumes
//! from them, so a Kafka restart loses nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use futures_util::StreamExt;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::config::Settings;
use crate::history::{Entry, Position};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::protocol::{self, SessionEvent};
use crate::shutdown::Shutdown;
use crate::telemetry;

const METADATA_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a produced message may wait for the brokers before the client gets an error.
const PRODUCE_TIMEOUT_MS: &str = "10000";

// -- circuit breaker ------------------------------------------------------------------------

/// Consecutive failures open the breaker for an exponentially growing time (capped); while
/// open, callers fail fast (inbound frames get an error at once instead of waiting on a dead
/// cluster) and the consumer waits before rebuilding. After the open time one attempt is let
/// through (half-open); a success closes it.
pub struct CircuitBreaker {
    state: Mutex<BreakerState>,
    threshold: u32,
    base: Duration,
    max: Duration,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct BreakerState {
    failures: u32,
    open_until: Option<Instant>,
}

impl CircuitBreaker {
    pub fn new(threshold: u32, base: Duration, max: Duration, metrics: Arc<Metrics>) -> CircuitBreaker {
        CircuitBreaker {
            state: Mutex::new(BreakerState::default()),
            threshold,
            base,
            max,
            metrics,
        }
    }

    /// Whether a call may go ahead now.
    pub fn allow(&self) -> bool {
        self.state
            .lock()
            .expect("breaker lock")
            .open_until
            .is_none_or(|t| Instant::now() >= t)
    }

    pub fn is_open(&self) -> bool {
        !self.allow()
    }

    /// Time until the breaker lets a call through.
    pub fn remaining(&self) -> Duration {
        let s = self.state.lock().expect("breaker lock");
        s.open_until
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(Instant::now()))
    }

    pub fn success(&self) {
        let mut s = self.state.lock().expect("breaker lock");
        s.failures = 0;
        s.open_until = None;
        self.metrics.kafka_circuit_open.set(0);
    }

    /// Record a failure; returns the backoff before the next attempt.
    pub fn failure(&self) -> Duration {
        let mut s = self.state.lock().expect("breaker lock");
        s.failures = s.failures.saturating_add(1);
        let exp = s.failures.saturating_sub(1).min(16);
        let backoff = self.base.saturating_mul(1u32 << exp).min(self.max);
        if s.failures >= self.threshold {
            s.open_until = Some(Instant::now() + backoff);
            self.metrics.kafka_circuit_open.set(1);
        }
        backoff
    }
}

// -- health ---------------------------------------------------------------------------------

/// What `/readyz` needs from Kafka.
#[derive(Default)]
pub struct Health {
    pub events_assigned: AtomicBool,
    pub brokers_ok: AtomicBool,
    pub control_caught_up: AtomicBool,
    /// Reading back `--history-backfill` events at start; not ready until done, so resumes
    /// find them in memory.
    pub backfilling: AtomicBool,
}

impl Health {
    pub fn ready(&self) -> bool {
        self.events_assigned.load(Ordering::Acquire)
            && self.brokers_ok.load(Ordering::Acquire)
            && self.control_caught_up.load(Ordering::Acquire)
            && !self.backfilling.load(Ordering::Acquire)
    }

    pub fn problems(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if !self.events_assigned.load(Ordering::Acquire) {
            v.push("events consumer not assigned");
        }
        if !self.brokers_ok.load(Ordering::Acquire) {
            v.push("Kafka brokers unreachable");
        }
        if !self.control_caught_up.load(Ordering::Acquire) {
            v.push("control topic not read yet");
        }
        if self.backfilling.load(Ordering::Acquire) {
            v.push("reading recent events back into the resume history");
        }
        v
    }
}

// -- librdkafka context ---------------------------------------------------------------------

/// Routes librdkafka's logs and errors to tracing (rate-limited: a down cluster makes it
/// repeat itself), marks brokers down, and collects high watermarks for the lag gauge.
pub struct GwContext {
    purpose: &'static str,
    health: Arc<Health>,
    high_watermarks: Option<Arc<Mutex<HashMap<i32, i64>>>>,
    events_topic: String,
    last_log: Mutex<Option<Instant>>,
    /// Partitions assigned by the group (the verify consumer only).
    group_partitions: Option<prometheus::IntGauge>,
}

impl GwContext {
    fn should_log(&self) -> bool {
        let mut l = self.last_log.lock().expect("log lock");
        if l.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            *l = Some(Instant::now());
            true
        } else {
            false
        }
    }
}

impl ClientContext for GwContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                if self.should_log() {
                    tracing::warn!(client = self.purpose, facility = fac, "librdkafka: {message}");
                }
            }
            RDKafkaLogLevel::Warning | RDKafkaLogLevel::Notice => {
                tracing::debug!(client = self.purpose, facility = fac, "librdkafka: {message}")
            }
            _ => tracing::trace!(client = self.purpose, facility = fac, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::AllBrokersDown)) {
            self.health.brokers_ok.store(false, Ordering::Release);
        }
        if self.should_log() {
            tracing::warn!(client = self.purpose, error = %error, "kafka: {reason}");
        }
    }

    fn stats(&self, stats: Statistics) {
        let Some(hw) = &self.high_watermarks else {
            return;
        };
        if let Some(t) = stats.topics.get(&self.events_topic) {
            let mut hw = hw.lock().expect("watermark lock");
            for (p, part) in &t.partitions {
                if *p >= 0 && part.hi_offset >= 0 {
                    hw.insert(*p, part.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for GwContext {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Some(g) = &self.group_partitions {
            let n = consumer.assignment().map(|a| a.count()).unwrap_or(0);
            g.set(n as i64);
            tracing::info!(client = self.purpose, partitions = n, rebalance = ?rebalance, "consumer group rebalanced");
        }
    }
}

// -- the Kafka handle -----------------------------------------------------------------------

pub struct Kafka {
    base: ClientConfig,
    instance_id: String,
    pub events_topic: String,
    producer: FutureProducer<GwContext>,
    pub breaker: CircuitBreaker,
    pub health: Arc<Health>,
    metrics: Arc<Metrics>,
    high_watermarks: Arc<Mutex<HashMap<i32, i64>>>,
    replay_slots: tokio::sync::Semaphore,
    resume_timeout: Duration,
    resume_max_scan: u64,
    partition_refresh: Duration,
    history_backfill: i64,
    backfill: Mutex<Backfill>,
}

/// Until when each partition is read back at start (its last offset then), and since when.
#[derive(Default)]
struct Backfill {
    targets: Vec<(i32, i64)>,
    started: Option<std::time::Instant>,
}

/// A read-back that has not finished by then (e.g. the records at the end were deleted) is
/// abandoned: the gateway serves without it; resumes of older positions read Kafka as before.
const BACKFILL_LIMIT: Duration = Duration::from_secs(60);

/// Why a produce failed, worded for the client's error frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProduceError {
    /// The cluster is unreachable (or the breaker is open): retry later.
    Unavailable(String),
    /// The message was refused (unknown topic, not authorized, too large...).
    Refused(String),
}

impl Kafka {
    pub fn new(settings: &Settings, metrics: Arc<Metrics>) -> Result<Arc<Kafka>, String> {
        let mut base = ClientConfig::new();
        base.set("bootstrap.servers", &settings.kafka.bootstrap)
            .set("security.protocol", settings.kafka.security_protocol.as_librdkafka())
            .set("socket.keepalive.enable", "true")
            .set("reconnect.backoff.ms", "100")
            .set("reconnect.backoff.max.ms", "10000")
            .set_log_level(RDKafkaLogLevel::Warning);
        if let Some((mech, user, pass)) = &settings.kafka.sasl {
            base.set("sasl.mechanism", mech.as_librdkafka())
                .set("sasl.username", user)
                .set("sasl.password", pass);
        }
        let health = Arc::new(Health::default());
        let high_watermarks = Arc::new(Mutex::new(HashMap::new()));
        let mut pc = base.clone();
        pc.set(
            "client.id",
            format!("fleetward-gateway-{}-producer", settings.instance_id),
        )
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("message.timeout.ms", PRODUCE_TIMEOUT_MS)
        // A message for a topic that does not exist (an agent never deployed) fails at once
        // as unknown, a refusal, instead of waiting out the 10 s timeout, which counted as
        // Kafka being down and could open the breaker for every client. Never create topics.
        .set("topic.metadata.propagation.max.ms", "1000")
        .set("allow.auto.create.topics", "false");
        let ctx = GwContext {
            purpose: "producer",
            health: health.clone(),
            high_watermarks: None,
            events_topic: settings.topics.events.clone(),
            last_log: Mutex::new(None),
            group_partitions: None,
        };
        let producer: FutureProducer<GwContext> = pc
            .create_with_context(ctx)
            .map_err(|e| format!("Kafka producer: {e}"))?;
        Ok(Arc::new(Kafka {
            base,
            instance_id: settings.instance_id.clone(),
            events_topic: settings.topics.events.clone(),
            producer,
            breaker: CircuitBreaker::new(3, Duration::from_millis(500), Duration::from_secs(30), metrics.clone()),
            health,
            metrics,
            high_watermarks,
            replay_slots: tokio::sync::Semaphore::new(settings.limits.resume_concurrency),
            resume_timeout: settings.limits.resume_timeout,
            resume_max_scan: settings.limits.resume_max_scan,
            partition_refresh: settings.limits.partition_refresh,
            history_backfill: settings.limits.history_backfill.min(i64::MAX as u64) as i64,
            backfill: Mutex::new(Backfill::default()),
        }))
    }

    /// Settings for a consumer that is assigned partitions (no group membership, nothing
    /// committed). librdkafka's assign() still wants a group.id; it is unique per instance
    /// and purpose and never joined (no subscribe), so it never splits partitions.
    pub fn consumer_config(&self, purpose: &str) -> ClientConfig {
        let mut c = self.base.clone();
        c.set("client.id", format!("fleetward-gateway-{}-{purpose}", self.instance_id))
            .set(
                "group.id",
                format!("fleetward-gateway-assign-{}-{purpose}", self.instance_id),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest");
        c
    }

    pub fn context(&self, purpose: &'static str) -> GwContext {
        GwContext {
            purpose,
            health: self.health.clone(),
            high_watermarks: (purpose == "events").then(|| self.high_watermarks.clone()),
            events_topic: self.events_topic.clone(),
            last_log: Mutex::new(None),
            group_partitions: (purpose == "verify").then(|| self.metrics.verify_partitions.clone()),
        }
    }

    // -- produce ------------------------------------------------------------------------------

    /// Produce one message and wait for the brokers' ack.
    pub async fn produce(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        traceparent: Option<&str>,
    ) -> Result<(), ProduceError> {
        if !self.breaker.allow() {
            return Err(ProduceError::Unavailable(format!(
                "Kafka is unavailable; retry in {} s",
                self.breaker.remaining().as_secs().max(1)
            )));
        }
        let mut record = FutureRecord::to(topic).key(key).payload(payload);
        if let Some(tp) = traceparent {
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: "traceparent",
                value: Some(tp),
            }));
        }
        match self.producer.send(record, Duration::from_secs(2)).await {
            Ok(_) => {
                self.breaker.success();
                Ok(())
            }
            Err((e, _)) => {
                let code = e.rdkafka_error_code();
                let unavailable = matches!(
                    code,
                    Some(
                        RDKafkaErrorCode::MessageTimedOut
                            | RDKafkaErrorCode::AllBrokersDown
                            | RDKafkaErrorCode::BrokerTransportFailure
                            | RDKafkaErrorCode::QueueFull
                            | RDKafkaErrorCode::RequestTimedOut
                            | RDKafkaErrorCode::NetworkException
                            | RDKafkaErrorCode::NotEnoughReplicas
                            | RDKafkaErrorCode::LeaderNotAvailable
                    )
                );
                if unavailable {
                    self.breaker.failure();
                    Err(ProduceError::Unavailable(format!(
                        "Kafka did not accept the message in time ({e})"
                    )))
                } else {
                    Err(ProduceError::Refused(format!(
                        "Kafka refused the message for {topic}: {e}"
                    )))
                }
            }
        }
    }

    /// Wait (bounded) for queued messages to reach the brokers; used at shutdown.
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "kafka: producer flush at shutdown");
        }
    }

    // -- the events consumer ------------------------------------------------------------------

    /// Read every partition of the events topic into the hub until shutdown; rebuild the
    /// consumer (from the hub's cursors) after fatal errors, behind the circuit breaker.
    pub async fn run_events(self: Arc<Self>, hub: Arc<Hub>, shutdown: Shutdown) {
        let mut first_start = true;
        loop {
            if shutdown.is_triggered() {
                return;
            }
            match self.events_session(&hub, &shutdown, &mut first_start).await {
                Ok(()) => return,
                Err(e) => {
                    self.health.events_assigned.store(false, Ordering::Release);
                    self.metrics.kafka_up.set(0);
                    self.metrics.kafka_reconnects.inc();
                    let backoff = self.breaker.failure();
                    tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "events consumer: rebuilding");
                    tokio::select! {
                        _ = shutdown.wait() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                }
            }
        }
    }

    async fn events_session(&self, hub: &Hub, shutdown: &Shutdown, first_start: &mut bool) -> Result<(), String> {
        let mut cfg = self.consumer_config("events");
        cfg.set("statistics.interval.ms", "10000");
        let consumer: Arc<StreamConsumer<GwContext>> = Arc::new(
            cfg.create_with_context(self.context("events"))
                .map_err(|e| format!("create consumer: {e}"))?,
        );
        let topic = self.events_topic.clone();
        let n = partition_count(consumer.clone(), &topic).await?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..n {
            let start = match hub.cursor(p) {
                Some(c) => c + 1,
                None => {
                    let (low, high) = watermarks(consumer.clone(), &topic, p).await?;
                    // At process start: the last `history_backfill` events, read back into the
                    // resume history before the gateway is ready (clients reconnecting after a
                    // restart find what they missed in memory), then live. A partition seen
                    // later is new: from its beginning.
                    let start = if *first_start {
                        low.max(high.saturating_sub(self.history_backfill))
                    } else {
                        low
                    };
                    if *first_start && start < high {
                        self.backfill.lock().expect("backfill lock").targets.push((p, high - 1));
                    }
                    hub.init_partition(p, start);
                    start
                }
            };
            tpl.add_partition_offset(&topic, p, Offset::Offset(start))
                .map_err(|e| e.to_string())?;
        }
        consumer.assign(&tpl).map_err(|e| format!("assign: {e}"))?;
        if *first_start {
            let mut b = self.backfill.lock().expect("backfill lock");
            if !b.targets.is_empty() {
                b.started = Some(std::time::Instant::now());
                self.health.backfilling.store(true, Ordering::Release);
                let events: i64 = b
                    .targets
                    .iter()
                    .map(|(p, last)| last + 1 - hub.cursor(*p).map_or(0, |c| c + 1))
                    .sum();
                tracing::info!(
                    events,
                    "events consumer: reading recent events back into the resume history"
                );
            }
        }
        *first_start = false;
        let mut known = n;
        self.metrics.partitions.set(n as i64);
        self.health.events_assigned.store(true, Ordering::Release);
        self.health.brokers_ok.store(true, Ordering::Release);
        self.metrics.kafka_up.set(1);
        self.breaker.success();
        tracing::info!(topic = %topic, partitions = n, "events consumer assigned every partition");

        let mut tick = tokio::time::interval(self.partition_refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        // One stream and one shutdown future for the whole session rather than new ones per
        // message (`recv()` makes a stream each time, registering a waker under a lock).
        let mut messages = consumer.stream();
        let stop = shutdown.wait();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return Ok(()),
                // The stream of a StreamConsumer never ends.
                Some(m) = messages.next() => match m {
                    Ok(msg) => {
                        if !self.health.brokers_ok.load(Ordering::Relaxed) {
                            self.health.brokers_ok.store(true, Ordering::Release);
                            self.metrics.kafka_up.set(1);
                        }
                        self.handle_event(hub, &msg);
                    }
                    Err(KafkaError::MessageConsumptionFatal(code)) => return Err(format!("fatal consumer error: {code}")),
                    Err(e) => {
                        // Transient (broker restart, network): librdkafka reconnects and keeps its positions.
                        tracing::debug!(error = %e, "events consumer: transient error");
                    }
                },
                _ = tick.tick() => {
                    match partition_count(consumer.clone(), &topic).await {
                        Ok(now) => {
                            self.health.brokers_ok.store(true, Ordering::Release);
                            self.metrics.kafka_up.set(1);
                            self.breaker.success();
                            if now > known {
                                let mut add = TopicPartitionList::new();
                                for p in known..now {
                                    let start = match hub.cursor(p) {
                                        Some(c) => c + 1,
                                        None => {
                                            let (low, _) = watermarks(consumer.clone(), &topic, p).await?;
                                            hub.init_partition(p, low);
                                            low
                                        }
                                    };
                                    add.add_partition_offset(&topic, p, Offset::Offset(start)).map_err(|e| e.to_string())?;
                                }
                                consumer.incremental_assign(&add).map_err(|e| format!("assign new partitions: {e}"))?;
                                tracing::info!(topic = %topic, from = known, to = now, "events topic grew; reading the new partitions");
                                known = now;
                                self.metrics.partitions.set(now as i64);
                            }
                        }
                        Err(e) => {
                            self.health.brokers_ok.store(false, Ordering::Release);
                            self.metrics.kafka_up.set(0);
                            self.breaker.failure();
                            tracing::warn!(error = %e, "events consumer: metadata refresh failed");
                        }
                    }
                    self.update_lag(hub);
                    if self.health.backfilling.load(Ordering::Relaxed) {
                        self.check_backfill(hub);
                    }
                }
            }
        }
    }

    fn handle_event(&self, hub: &Hub, msg: &BorrowedMessage<'_>) {
        let (p, o) = (msg.partition(), msg.offset());
        self.metrics.events_consumed.inc();
        let payload = msg.payload().unwrap_or_default();
        match SessionEvent::parse(payload) {
            Err(inv) => {
                self.metrics.events_invalid.inc();
                tracing::warn!(partition = p, offset = o, error = %inv, "events: not a valid session event; not delivered");
            }
            Ok(ev) => {
                if msg.key() != Some(ev.session_id.as_bytes()) {
                    // Resume reads filter by key: an event keyed otherwise is delivered live only.
                    tracing::warn!(partition = p, offset = o, session = %ev.session_id, "events: message key is not the sessionId");
                }
                let span = telemetry::deliver_span(&ev.session_id, ev.kind.as_str(), p, o, || traceparent(msg));
                let _g = span.enter();
                let position = Position {
                    partition: p,
                    offset: o,
                };
                let produced_ms = protocol::parse_rfc3339(&ev.timestamp)
                    .map(|t| t.timestamp_millis())
                    .or_else(|| msg.timestamp().to_millis());
                let entry = Entry {
                    position,
                    frame: Utf8Bytes::from(protocol::event_frame(position, payload)),
                    produced_ms,
                };
                hub.dispatch(&ev, entry);
            }
        }
        hub.set_cursor(p, o);
        if self.health.backfilling.load(Ordering::Relaxed) {
            self.check_backfill(hub);
        }
    }

    /// Whether the read-back at start reached its targets (or ran out of time): then ready.
    fn check_backfill(&self, hub: &Hub) {
        let mut b = self.backfill.lock().expect("backfill lock");
        b.targets.retain(|&(p, last)| hub.cursor(p).is_none_or(|c| c < last));
        let elapsed = b.started.map_or(Duration::ZERO, |t| t.elapsed());
        if b.targets.is_empty() {
            tracing::info!(
                seconds = elapsed.as_secs_f64(),
                "events consumer: resume history read back; live from here"
            );
        } else if elapsed >= BACKFILL_LIMIT {
            tracing::warn!(partitions = ?b.targets, "events consumer: read-back not finished in time; serving without it");
            b.targets.clear();
        } else {
            return;
        }
        self.health.backfilling.store(false, Ordering::Release);
    }

    fn update_lag(&self, hub: &Hub) {
        let hw = self.high_watermarks.lock().expect("watermark lock").clone();
        for (p, cursor) in hub.cursors() {
            if let Some(high) = hw.get(&p) {
                let lag = (*high - (cursor + 1)).max(0);
                self.metrics.kafka_lag.with_label_values(&[&p.to_string()]).set(lag);
            }
        }
    }

    // -- resume from Kafka --------------------------------------------------------------------

    /// The offset the next message of `partition` of the events topic will get (its high
    /// watermark), asked of the brokers now: a resume position at or past it was never
    /// handed out. Through the producer's client, which is connected anyway.
    pub async fn end_offset(&self, partition: i32) -> Result<i64, String> {
        if !self.breaker.allow() {
            return Err("Kafka is unavailable".into());
        }
        let producer = self.producer.clone();
        let topic = self.events_topic.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_watermarks(&topic, partition, METADATA_TIMEOUT)
                .map(|(_, high)| high)
                .map_err(|e| format!("watermarks of {topic}[{partition}]: {e}"))
        })
        .await
        .map_err(|e| format!("watermarks task: {e}"))?
    }

    /// The session's events in `partition` at offsets `from..until`, read by a short-lived
    /// consumer assigned to that partition and filtered by key. Errors are the reason given
    /// to the client in `recovery_failed`.
    pub async fn replay(&self, session_id: &str, partition: i32, from: i64, until: i64) -> Result<Vec<Entry>, String> {
        let _slot = self
            .replay_slots
            .acquire()
            .await
            .map_err(|_| "shutting down".to_string())?;
        if !self.breaker.allow() {
            return Err("Kafka is unavailable".into());
        }
        if (until - from) as u64 > self.resume_max_scan {
            return Err(format!(
                "too far behind: {} messages to scan (limit {})",
                until - from,
                self.resume_max_scan
            ));
        }
        let cfg = self.consumer_config("resume");
        let ctx = self.context("resume");
        let topic = self.events_topic.clone();
        let session = session_id.to_string();
        let timeout = self.resume_timeout;
        tokio::task::spawn_blocking(move || {
            replay_blocking(cfg, ctx, &topic, &session, partition, from, until, timeout)
        })
        .await
        .map_err(|e| format!("resume task: {e}"))?
    }
}

fn traceparent(msg: &BorrowedMessage<'_>) -> Option<String> {
    let headers = msg.headers()?;
    headers
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case("traceparent"))
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_string)
}

async fn partition_count(consumer: Arc<StreamConsumer<GwContext>>, topic: &str) -> Result<i32, String> {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let md = consumer
            .fetch_metadata(Some(&topic), METADATA_TIMEOUT)
            .map_err(|e| format!("metadata: {e}"))?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(|| format!("topic {topic} not in metadata"))?;
        if let Some(err) = t.error() {
            return Err(format!("topic {topic}: {err:?}"));
        }
        let n = t.partitions().len() as i32;
        if n == 0 {
            return Err(format!("topic {topic} has no partitions (does it exist?)"));
        }
        Ok(n)
    })
    .await
    .map_err(|e| format!("metadata task: {e}"))?
}

async fn watermarks(consumer: Arc<StreamConsumer<GwContext>>, topic: &str, p: i32) -> Result<(i64, i64), String> {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        consumer
            .fetch_watermarks(&topic, p, METADATA_TIMEOUT)
            .map_err(|e| format!("watermarks of {topic}[{p}]: {e}"))
    })
    .await
    .map_err(|e| format!("watermarks task: {e}"))?
}

#[allow(clippy::too_many_arguments)]
fn replay_blocking(
    cfg: ClientConfig,
    ctx: GwContext,
    topic: &str,
    session: &str,
    partition: i32,
    from: i64,
    until: i64,
    timeout: Duration,
) -> Result<Vec<Entry>, String> {
    let deadline = Instant::now() + timeout;
    let consumer: BaseConsumer<GwContext> = cfg.create_with_context(ctx).map_err(|e| format!("Kafka: {e}"))?;
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, timeout.min(METADATA_TIMEOUT))
        .map_err(|e| format!("Kafka unavailable: {e}"))?;
    if from < low {
        return Err(format!(
            "events before offset {low} of partition {partition} are no longer retained"
        ));
    }
    let until = until.min(high);
    if from >= until {
        return Ok(Vec::new());
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(from))
        .map_err(|e| e.to_string())?;
    consumer.assign(&tpl).map_err(|e| format!("Kafka: {e}"))?;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "reading partition {partition} timed out after {} s",
                timeout.as_secs()
            ));
        }
        match consumer.poll(left.min(Duration::from_millis(500))) {
            Some(Ok(m)) => {
                if m.offset() >= until {
                    break;
                }
                if m.key() == Some(session.as_bytes())
                    && let Some(payload) = m.payload()
                    && let Ok(ev) = SessionEvent::parse(payload)
                    && ev.session_id == session
                {
                    let position = Position {
                        partition,
                        offset: m.offset(),
                    };
                    let produced_ms = protocol::parse_rfc3339(&ev.timestamp).map(|t| t.timestamp_millis());
                    out.push(Entry {
                        position,
                        frame: Utf8Bytes::from(protocol::event_frame(position, payload)),
                        produced_ms,
                    });
                }
                if m.offset() + 1 >= until {
                    break;
                }
            }
            Some(Err(e)) => return Err(format!("Kafka: {e}")),
            None => {
                // Gaps in offsets (compaction, transaction markers) leave nothing to poll: stop
                // once the consumer's position has passed the range.
                if let Ok(pos) = consumer.position()
                    && let Some(el) = pos.find_partition(topic, partition)
                    && let Offset::Offset(next) = el.offset()
                    && next >= until
                {
                    break;
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_threshold_and_closes_on_success() {
        let b = CircuitBreaker::new(
            3,
            Duration::from_millis(50),
            Duration::from_secs(1),
            Arc::new(Metrics::new()),
        );
        assert!(b.allow());
        assert_eq!(b.failure(), Duration::from_millis(50));
        assert_eq!(b.failure(), Duration::from_millis(100));
        assert!(b.allow(), "still closed below the threshold");
        assert_eq!(b.failure(), Duration::from_millis(200));
        assert!(b.is_open());
        assert!(b.remaining() > Duration::ZERO);
        std::thread::sleep(Duration::from_millis(220));
        assert!(b.allow(), "half-open after the backoff");
        b.success();
        assert!(b.allow() && b.remaining().is_zero());
        for _ in 0..40 {
            b.failure();
        }
        assert!(b.remaining() <= Duration::from_secs(1), "capped");
    }

    #[test]
    fn health_names_each_problem() {
        let h = Health::default();
        assert_eq!(h.problems().len(), 3);
        h.events_assigned.store(true, Ordering::Release);
        h.brokers_ok.store(true, Ordering::Release);
        h.control_caught_up.store(true, Ordering::Release);
        assert!(h.ready() && h.problems().is_empty());
    }
}
