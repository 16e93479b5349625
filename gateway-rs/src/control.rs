//! Kill switch, gateway side (SPEC §7): the control topic is read by every replica without a
//! consumer group. `halt` marks agents halted (empty list = every agent): new sessions of them
//! are refused with 403, connected ones get `{"control":"halted",...}` and close 4009;
//! `resume` lifts the halt; `rotate_keys` reloads the JWKS and re-lists the trust bundle at once. Each halt/resume is acked
//! on the control-acks topic (component "gateway", counts {"sessionsClosed"}).
//!
//! At start the topic is read from its beginning to rebuild which kill switches are engaged
//! (without acting or acking: those messages were handled by earlier instances), so a
//! restarted replica does not accept sessions of a halted agent; from the end offsets seen at
//! start on, messages are acted on and acked. `/readyz` stays false until that catch-up is
//! done. Per kill switch only the newest generation counts; at equal generations a `resume`
//! wins over a `halt` (a release always follows its engage). A lower generation sent later
//! than the last order is not stale: the switch was deleted and created again under the same
//! name, and its generations started at 1 again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::auth::Authenticator;
use crate::envelopes::{ControlScope, order_covers};
use crate::hub::{CloseReason, Hub, close_code};
use crate::kafka::{GwContext, Kafka};
use crate::metrics::Metrics;
use crate::protocol::{AckType, ControlAck, ControlMessage, ControlType, halted_frame};
use crate::shutdown::Shutdown;

#[derive(Debug, Clone)]
struct Switch {
    generation: u64,
    halted: bool,
    agents: Vec<String>,
    scope: Option<ControlScope>,
    sent_at: Option<chrono::DateTime<chrono::FixedOffset>>,
}

/// Which kill switches currently halt which agents.
pub struct HaltState {
    switches: RwLock<HashMap<String, Switch>>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The state changed (or was confirmed): act and ack.
    Current,
    /// Older than what is known for this kill switch: ignored.
    Stale,
}

impl HaltState {
    pub fn new(metrics: Arc<Metrics>) -> HaltState {
        HaltState {
            switches: RwLock::new(HashMap::new()),
            metrics,
        }
    }

    /// The kill switch (name, generation) halting `agent`, if any.
    pub fn halted_by(&self, agent: &str) -> Option<(String, u64)> {
        let s = self.switches.read().expect("halt lock");
        s.iter()
            .find(|(_, sw)| sw.halted && order_covers(&sw.agents, sw.scope.as_ref(), agent))
            .map(|(name, sw)| (name.clone(), sw.generation))
    }

    pub fn apply(&self, msg: &ControlMessage) -> Applied {
        let halt = match msg.kind {
            ControlType::Halt => true,
            ControlType::Resume => false,
            ControlType::RotateKeys => return Applied::Current,
        };
        let sent_at = chrono::DateTime::parse_from_rfc3339(&msg.timestamp).ok();
        let mut s = self.switches.write().expect("halt lock");
        if let Some(cur) = s.get(&msg.kill_switch) {
            let newer = msg.generation > cur.generation;
            let same_gen_release = msg.generation == cur.generation && (!halt || cur.halted);
            let recreated = msg.generation < cur.generation
                && matches!((sent_at, cur.sent_at), (Some(new), Some(old)) if new > old);
            if !newer && !same_gen_release && !recreated {
                return Applied::Stale;
            }
        }
        s.insert(
            msg.kill_switch.clone(),
            Switch {
                generation: msg.generation,
                halted: halt,
                agents: msg.agents.clone(),
                scope: msg.scope.clone(),
                sent_at,
            },
        );
        self.metrics
            .halted_scopes
            .set(s.values().filter(|sw| sw.halted).count() as i64);
        Applied::Current
    }
}

/// Everything the control loop acts on.
pub struct Control {
    pub kafka: Arc<Kafka>,
    pub hub: Arc<Hub>,
    pub halts: Arc<HaltState>,
    pub auth: Arc<Authenticator>,
    pub metrics: Arc<Metrics>,
    pub topic: String,
    pub acks_topic: String,
    pub instance_id: String,
}

impl Control {
    /// Read the control topic until shutdown, rebuilding the consumer after errors.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        // Per partition: the next offset to read, and the first offset to act on.
        let mut next: HashMap<i32, i64> = HashMap::new();
        let mut live_from: HashMap<i32, i64> = HashMap::new();
        loop {
            if shutdown.is_triggered() {
                return;
            }
            match self.session(&shutdown, &mut next, &mut live_from).await {
                Ok(()) => return,
                Err(e) => {
                    let backoff = self.kafka.breaker.failure();
                    tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "control consumer: rebuilding");
                    tokio::select! {
                        _ = shutdown.wait() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                }
            }
        }
    }

    async fn session(
        &self,
        shutdown: &Shutdown,
        next: &mut HashMap<i32, i64>,
        live_from: &mut HashMap<i32, i64>,
    ) -> Result<(), String> {
        let consumer: Arc<StreamConsumer<GwContext>> = Arc::new(
            self.kafka
                .consumer_config("control")
                .create_with_context(self.kafka.context("control"))
                .map_err(|e| format!("create consumer: {e}"))?,
        );
        let (partitions, marks) = {
            let c = consumer.clone();
            let topic = self.topic.clone();
            tokio::task::spawn_blocking(move || -> Result<(i32, Vec<(i64, i64)>), String> {
                let md = c
                    .fetch_metadata(Some(&topic), Duration::from_secs(5))
                    .map_err(|e| format!("metadata: {e}"))?;
                let t = md
                    .topics()
                    .iter()
                    .find(|t| t.name() == topic)
                    .ok_or(format!("topic {topic} not found"))?;
                if t.error().is_some() || t.partitions().is_empty() {
                    return Err(format!("topic {topic} is not available (does it exist?)"));
                }
                let n = t.partitions().len() as i32;
                let mut marks = Vec::new();
                for p in 0..n {
                    marks.push(
                        c.fetch_watermarks(&topic, p, Duration::from_secs(5))
                            .map_err(|e| format!("watermarks: {e}"))?,
                    );
                }
                Ok((n, marks))
            })
            .await
            .map_err(|e| e.to_string())??
        };
        let mut tpl = TopicPartitionList::new();
        let mut pending: HashSet<i32> = HashSet::new();
        for p in 0..partitions {
            let (low, high) = marks[p as usize];
            let live = *live_from.entry(p).or_insert(high);
            let start = *next.get(&p).unwrap_or(&low);
            if start < live {
                pending.insert(p);
            }
            tpl.add_partition_offset(&self.topic, p, Offset::Offset(start))
                .map_err(|e| e.to_string())?;
        }
        consumer.assign(&tpl).map_err(|e| format!("assign: {e}"))?;
        self.mark_caught_up(&pending);
        tracing::info!(topic = %self.topic, partitions, catching_up = pending.len(), "control consumer assigned");
        loop {
            tokio::select! {
                _ = shutdown.wait() => return Ok(()),
                m = consumer.recv() => match m {
                    Ok(msg) => {
                        let (p, o) = (msg.partition(), msg.offset());
                        let live = o >= *live_from.get(&p).unwrap_or(&0);
                        self.handle(&msg, live);
                        next.insert(p, o + 1);
                        if !live && o + 1 >= *live_from.get(&p).unwrap_or(&0) {
                            pending.remove(&p);
                            self.mark_caught_up(&pending);
                        }
                    }
                    Err(KafkaError::MessageConsumptionFatal(code)) => return Err(format!("fatal: {code}")),
                    Err(e) => tracing::debug!(error = %e, "control consumer: transient error"),
                },
            }
        }
    }

    fn mark_caught_up(&self, pending: &HashSet<i32>) {
        if pending.is_empty() && !self.kafka.health.control_caught_up.swap(true, Ordering::AcqRel) {
            tracing::info!("control topic read up to its end: kill switch state rebuilt");
        }
    }

    fn handle(&self, msg: &BorrowedMessage<'_>, live: bool) {
        let parsed = ControlMessage::parse(msg.payload().unwrap_or_default());
        let msg = match parsed {
            Ok(m) => m,
            Err(inv) => {
                self.metrics
                    .control_messages
                    .with_label_values(&["invalid", "invalid"])
                    .inc();
                tracing::warn!(error = %inv, "control: not a valid control message; ignored");
                return;
            }
        };
        let kind = match msg.kind {
            ControlType::Halt => "halt",
            ControlType::Resume => "resume",
            ControlType::RotateKeys => "rotate_keys",
        };
        let applied = self.halts.apply(&msg);
        if !live {
            self.metrics
                .control_messages
                .with_label_values(&[kind, "replayed"])
                .inc();
            return;
        }
        if applied == Applied::Stale {
            self.metrics.control_messages.with_label_values(&[kind, "stale"]).inc();
            tracing::info!(kill_switch = %msg.kill_switch, generation = msg.generation, kind, "control: older generation; ignored");
            return;
        }
        self.metrics
            .control_messages
            .with_label_values(&[kind, "applied"])
            .inc();
        match msg.kind {
            ControlType::Halt => {
                // actions.closeSessions: false keeps connected sessions open (they still get
                // the runs' `halted` events from the runtimes); new ones are refused either way.
                let closed = if !msg.closes_sessions() {
                    0
                } else {
                    self.hub.close_where(
                        |agent| msg.covers(agent),
                        |agent| CloseReason {
                            code: close_code::HALTED,
                            reason: "halted by a kill switch",
                            frame: Some(halted_frame(
                                &msg.kill_switch,
                                msg.generation,
                                agent,
                                msg.reason.as_deref(),
                            )),
                        },
                    )
                };
                tracing::info!(kill_switch = %msg.kill_switch, generation = msg.generation, agents = ?msg.agents,
                    sessions_closed = closed, "control: halt applied");
                self.ack(&msg, AckType::Halted, closed);
            }
            ControlType::Resume => {
                tracing::info!(kill_switch = %msg.kill_switch, generation = msg.generation, "control: resume applied");
                self.ack(&msg, AckType::Resumed, 0);
            }
            ControlType::RotateKeys => {
                if let Some(bundle) = self.auth.trust_bundle() {
                    tracing::info!("control: rotate_keys, trust bundle listed again");
                    bundle.request_relist();
                }
                if let Some(jwks) = self.auth.jwks() {
                    tokio::spawn(async move {
                        match jwks.load().await {
                            Ok(n) => {
                                tracing::info!(keys = n, "control: rotate_keys, JWKS reloaded")
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "control: rotate_keys, JWKS reload failed")
                            }
                        }
                    });
                }
            }
        }
    }

    /// Produce the ack in the background, retrying a few times: the operator counts acks.
    fn ack(&self, msg: &ControlMessage, kind: AckType, sessions_closed: u64) {
        let ack = ControlAck::gateway(msg, kind, &self.instance_id, sessions_closed);
        let payload = serde_json::to_vec(&ack).expect("ack serializes");
        let kafka = self.kafka.clone();
        let topic = self.acks_topic.clone();
        let key = msg.kill_switch.clone();
        tokio::spawn(async move {
            for attempt in 0..5u32 {
                match kafka.produce(&topic, &key, &payload, None).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(error = ?e, attempt, "control: ack not produced yet");
                        tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                    }
                }
            }
            tracing::error!(kill_switch = %key, "control: gave up producing the ack");
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(kind: &str, ks: &str, generation: u64, agents: &[&str]) -> ControlMessage {
        msg_at(kind, ks, generation, agents, "2026-01-02T03:04:05Z")
    }

    fn msg_at(kind: &str, ks: &str, generation: u64, agents: &[&str], at: &str) -> ControlMessage {
        ControlMessage::from_json(
            json!({"schema": "fleetward.control.v1", "id": uuid::Uuid::new_v4().to_string(),
            "type": kind, "killSwitch": ks, "generation": generation, "agents": agents, "mode": "drain",
            "drainTimeoutSeconds": 30, "timestamp": at}),
        )
        .unwrap()
    }

    #[test]
    fn a_switch_created_again_under_its_name_is_obeyed() {
        let h = HaltState::new(Arc::new(Metrics::new()));
        h.apply(&msg_at("halt", "ks", 1, &["ns/a"], "2026-01-02T03:04:05Z"));
        h.apply(&msg_at("resume", "ks", 4, &["ns/a"], "2026-01-02T03:05:00.5Z"));
        assert_eq!(h.halted_by("ns/a"), None);
        // Deleted and created again: generation 1, sent later (fractional seconds compared as time).
        let again = msg_at("halt", "ks", 1, &["ns/a"], "2026-01-02T03:05:01Z");
        assert_eq!(h.apply(&again), Applied::Current);
        assert_eq!(h.halted_by("ns/a"), Some(("ks".into(), 1)));
        // A lower generation sent earlier than the last order is still stale.
        let old = msg_at("resume", "ks", 0, &["ns/a"], "2026-01-02T03:04:06Z");
        assert_eq!(h.apply(&old), Applied::Stale);
        assert!(h.halted_by("ns/a").is_some());
    }

    #[test]
    fn halt_and_resume_by_scope_and_generation() {
        let h = HaltState::new(Arc::new(Metrics::new()));
        assert_eq!(h.apply(&msg("halt", "ks-a", 1, &["ns/a"])), Applied::Current);
        assert_eq!(h.halted_by("ns/a"), Some(("ks-a".into(), 1)));
        assert_eq!(h.halted_by("ns/b"), None);
        // A second switch covering everything.
        h.apply(&msg("halt", "ks-all", 4, &[]));
        assert!(h.halted_by("ns/b").is_some());
        h.apply(&msg("resume", "ks-all", 4, &[]));
        assert_eq!(h.halted_by("ns/b"), None);
        assert!(h.halted_by("ns/a").is_some(), "ks-a still engaged");
        // Stale halt of an older generation, and a halt at the released generation, are ignored.
        assert_eq!(h.apply(&msg("halt", "ks-all", 3, &[])), Applied::Stale);
        assert_eq!(h.apply(&msg("halt", "ks-all", 4, &[])), Applied::Stale);
        assert_eq!(h.halted_by("ns/b"), None);
        // A newer engage applies again; a duplicate of it is current (re-acked).
        assert_eq!(h.apply(&msg("halt", "ks-all", 5, &[])), Applied::Current);
        assert_eq!(h.apply(&msg("halt", "ks-all", 5, &[])), Applied::Current);
        assert!(h.halted_by("ns/b").is_some());
        h.apply(&msg("resume", "ks-a", 2, &["ns/a"]));
        h.apply(&msg("resume", "ks-all", 6, &[]));
        assert_eq!(h.halted_by("ns/a"), None);
    }

    #[test]
    fn an_order_without_agents_covers_only_what_its_scope_says_without_labels() {
        let with_scope = |scope: serde_json::Value| {
            ControlMessage::from_json(json!({"schema": "fleetward.control.v1",
                "id": uuid::Uuid::new_v4().to_string(), "type": "halt", "killSwitch": "ks",
                "generation": 1, "agents": [], "scope": scope, "mode": "drain",
                "drainTimeoutSeconds": 30, "timestamp": "2026-01-02T03:04:05Z"}))
            .unwrap()
        };
        let everything = with_scope(json!({}));
        assert!(everything.covers("ns/a") && everything.covers("other/b"));
        // Hand-written: no agents, a namespace scope. It used to halt every agent.
        let by_namespace = with_scope(json!({"namespaces": ["ns"]}));
        assert!(by_namespace.covers("ns/a") && !by_namespace.covers("other/b"));
        // By label without the resolved agents: nothing an instance can check, so nothing.
        let by_label = with_scope(json!({"agentSelector": {"matchLabels": {"tier": "gold"}}}));
        assert!(!by_label.covers("ns/a"));
        let h = HaltState::new(Arc::new(Metrics::new()));
        h.apply(&by_namespace);
        assert!(h.halted_by("ns/a").is_some());
        assert_eq!(h.halted_by("other/b"), None);
    }
}
