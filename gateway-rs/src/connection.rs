//! One WebSocket connection: the resume, then a loop that writes queued events and control
//! frames, pings, and closes for the documented reasons (SPEC §5.1): 1001 shutdown,
//! 1009 message too big, 4001 token expired, 4003 the token's trust-bundle key was revoked,
//! 4008 slow consumer, 4009 halted; 1000 for idle
//! and heartbeat timeouts. Client frames are read by a separate task, which validates them
//! and produces commands; its replies (error frames) reach the writer through a small queue.
//!
//! Every write can be cut short by a close request or by shutdown, so a client that stopped
//! reading is closed (4008 by the hub when its queue fills) without anyone waiting on it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::Instrument;

use crate::auth::Identity;
use crate::history::{Entry, Position, ResumePlan};
use crate::hub::{Client, CloseReason, Queued, close_code};
use crate::kafka::ProduceError;
use crate::protocol::{self, AgentCommand, ClientFrame, CommandInput, CommandUser};
use crate::server::AppState;
use crate::telemetry;

/// Longest a single write may take before the client is treated as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// While a resume reads Kafka, up to this many times `--outbound-queue` live events are held
/// for the client (a burst must not close it with 4008 before it got anything).
const RESUME_HOLD_FACTOR: usize = 16;
/// Time allowed for the close handshake.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A slow client's socket is full: its close frame (4008) waits this long for the client to
/// read its way to it, so the client learns why and can resume.
const SLOW_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Params {
    pub session_id: String,
    pub identity: Identity,
    pub since: Option<Position>,
    /// A `since` that is not a position (kept to answer with `recovery_failed`).
    pub bad_since: Option<Box<str>>,
    /// The connection's place under `--max-connections`, released when it ends.
    pub permit: OwnedSemaphorePermit,
    /// Keeps the graceful shutdown waiting until the connection has ended.
    pub tracked: TaskTrackerToken,
}

/// How long a connection may stay open on a token expiring at `exp`: until `exp` + leeway
/// (zero when that has passed).
fn token_expires_in(exp: SystemTime, leeway_secs: u64, now: SystemTime) -> Duration {
    (exp + Duration::from_secs(leeway_secs))
        .duration_since(now)
        .unwrap_or(Duration::ZERO)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Why the writer stopped.
enum Stop {
    /// Send this close frame.
    Close(CloseReason),
    /// The peer is gone or closed first: nothing more to send.
    Gone,
}

/// The close for connections whose token's trust-bundle key was removed (SPEC §7 revocation).
pub fn revoked_close() -> CloseReason {
    CloseReason {
        code: close_code::FORBIDDEN,
        reason: "signing key revoked",
        frame: None,
    }
}

fn close(code: u16, reason: &'static str) -> Stop {
    Stop::Close(CloseReason {
        code,
        reason,
        frame: None,
    })
}

struct Writer {
    sink: SplitSink<WebSocket, Message>,
    /// Highest offset sent per partition: nothing at or below it is sent again.
    last_sent: HashMap<i32, i64>,
    st: AppState,
    last_activity: Instant,
}

impl Writer {
    /// Write one message unless a close request or shutdown comes first.
    async fn send(&mut self, msg: Message, close_rx: &mut watch::Receiver<Option<CloseReason>>) -> Result<(), Stop> {
        // Per frame, so kept cheap. The write goes first: it mostly completes at once, and the
        // other two are then never polled (polling one registers a waiter, the shutdown one
        // under a mutex all connections share). The shutdown token is borrowed, not cloned: a
        // clone and its drop lock that mutex too.
        tokio::select! {
            biased;
            r = tokio::time::timeout(WRITE_TIMEOUT, self.sink.send(msg)) => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(Stop::Gone),
                Err(_) => Err(close(close_code::SLOW_CONSUMER, "slow consumer: write timed out")),
            },
            _ = self.st.shutdown.wait() => Err(close(close_code::GOING_AWAY, "gateway shutting down")),
            _ = close_rx.changed() => Err(match close_rx.borrow().clone() {
                Some(r) => Stop::Close(r),
                None => Stop::Gone,
            }),
        }
    }

    async fn send_text(
        &mut self,
        text: String,
        close_rx: &mut watch::Receiver<Option<CloseReason>>,
    ) -> Result<(), Stop> {
        self.send(Message::Text(text.into()), close_rx).await
    }

    async fn send_entry(&mut self, e: &Entry, close_rx: &mut watch::Receiver<Option<CloseReason>>) -> Result<(), Stop> {
        let last = self.last_sent.get(&e.position.partition).copied().unwrap_or(-1);
        if e.position.offset <= last {
            return Ok(());
        }
        self.send(Message::Text(e.frame.clone()), close_rx).await?;
        self.last_sent.insert(e.position.partition, e.position.offset);
        self.last_activity = Instant::now();
        let m = &self.st.metrics;
        m.deliveries.inc();
        if let Some(produced) = e.produced_ms {
            m.delivery_latency.observe((now_ms() - produced).max(0) as f64 / 1000.0);
        }
        Ok(())
    }

    /// Deliver what the client missed (SPEC §5.1 resume). Live events arriving meanwhile (a
    /// burst, e.g. the backlog a Kafka restart releases, can arrive while the missed events
    /// are read and written) are moved from the bounded queue to `Held` and sent after them,
    /// rather than left to fill the queue and close this client with 4008 before it caught up.
    async fn resume(
        &mut self,
        plan: Option<ResumePlan>,
        params: &Params,
        live_rx: &mut mpsc::Receiver<Queued>,
        close_rx: &mut watch::Receiver<Option<CloseReason>>,
    ) -> Result<(), Stop> {
        let m = self.st.metrics.clone();
        let Some(since) = params.since else {
            if let Some(raw) = &params.bad_since {
                // Not refused at the handshake: SPEC §5.1 answers a resume that cannot be
                // served with `recovery_failed`, then live events.
                m.resumes.with_label_values(&["recovery_failed"]).inc();
                let reason = "not a position: expected <partition>:<offset>, two non-negative integers";
                self.send_text(protocol::recovery_failed_frame(raw, reason), close_rx)
                    .await?;
            }
            return Ok(());
        };
        let mut held = Held::new(
            self.st
                .settings
                .limits
                .outbound_queue
                .saturating_mul(RESUME_HOLD_FACTOR),
        );
        let failed = |reason: &str| protocol::recovery_failed_frame(&since.to_string(), reason);
        let missed: Vec<Entry> = match plan {
            None => Vec::new(),
            Some(ResumePlan::History(entries)) => {
                m.resumes.with_label_values(&["history"]).inc();
                entries
            }
            Some(ResumePlan::UnknownPartition) => {
                m.resumes.with_label_values(&["recovery_failed"]).inc();
                self.send_text(failed("unknown partition"), close_rx).await?;
                Vec::new()
            }
            Some(ResumePlan::Ahead {
                partition,
                offset,
                then,
            }) => match self.st.kafka.end_offset(partition).await {
                Ok(end) if offset >= end => {
                    // Never handed out: what the gateway holds and live events follow (the
                    // live ones would otherwise be taken as already delivered).
                    m.resumes.with_label_values(&["recovery_failed"]).inc();
                    self.last_sent.remove(&partition);
                    let reason = format!("past the end of partition {partition} (its next offset is {end})");
                    self.send_text(failed(&reason), close_rx).await?;
                    then
                }
                Ok(_) => {
                    // This replica is behind the one the client came from: the events
                    // after `since` reach it live.
                    m.resumes.with_label_values(&["history"]).inc();
                    then
                }
                Err(reason) => {
                    // Unknown whether the position exists: keeping it as delivered could skip
                    // live events before it, so the client is told and gets what follows.
                    tracing::warn!(session = %params.session_id, %since, reason = %reason,
                        "resume: position past this replica's cursor, and Kafka could not say whether it exists");
                    m.resumes.with_label_values(&["recovery_failed"]).inc();
                    self.last_sent.remove(&partition);
                    let reason = format!("cannot check position {since} now (Kafka: {reason})");
                    self.send_text(failed(&reason), close_rx).await?;
                    then
                }
            },
            Some(ResumePlan::Kafka {
                partition,
                from,
                until,
                then,
            }) => {
                let shutdown = self.st.shutdown.clone();
                let kafka = self.st.kafka.clone();
                let fetched = {
                    let replay = kafka.replay(&params.session_id, partition, from, until);
                    tokio::pin!(replay);
                    loop {
                        tokio::select! {
                            r = &mut replay => break r,
                            _ = shutdown.wait() => return Err(close(close_code::GOING_AWAY, "gateway shutting down")),
                            _ = close_rx.changed() => return Err(close_rx.borrow().clone().map_or(Stop::Gone, Stop::Close)),
                            Some(e) = live_rx.recv(), if held.has_room() => held.entries.push_back(e),
                        }
                    }
                };
                match fetched {
                    Ok(mut entries) => {
                        m.resumes.with_label_values(&["kafka"]).inc();
                        entries.extend(then);
                        entries
                    }
                    Err(reason) => {
                        m.resumes.with_label_values(&["recovery_failed"]).inc();
                        tracing::info!(session = %params.session_id, %since, reason = %reason, "resume: recovery failed");
                        self.send_text(failed(&reason), close_rx).await?;
                        then
                    }
                }
            }
        };
        for e in &missed {
            held.take_from(live_rx);
            self.send_entry(e, close_rx).await?;
        }
        loop {
            held.take_from(live_rx);
            let Some(e) = held.entries.pop_front() else {
                return Ok(());
            };
            self.send_entry(&e, close_rx).await?;
        }
    }
}

/// Live events held back while a resume delivers what the client missed, at most `cap`.
struct Held {
    entries: VecDeque<Queued>,
    cap: usize,
}

impl Held {
    fn new(cap: usize) -> Held {
        Held {
            entries: VecDeque::new(),
            cap,
        }
    }

    fn has_room(&self) -> bool {
        self.entries.len() < self.cap
    }

    /// Move what is queued now (without waiting) while there is room.
    fn take_from(&mut self, live_rx: &mut mpsc::Receiver<Queued>) {
        while self.has_room() {
            match live_rx.try_recv() {
                Ok(e) => self.entries.push_back(e),
                Err(_) => return,
            }
        }
    }
}

/// A reply frame from the reader task to the writer. Boxed to one pointer (a `String` is
/// three words): the channel allocates a block of 32 slots when it is created, for every
/// connection whether it ever replies or not, and idle connections are the many.
#[allow(clippy::box_collection)]
type Reply = Box<String>;

/// Run one connection to its end.
///
/// Not an `async fn`: the socket is split before the future is made, so the future holds the
/// two small halves and not also the socket it was called with (an `async fn` keeps room for
/// its arguments for as long as it runs, here the whole life of the connection).
pub fn run(socket: WebSocket, st: AppState, params: Params) -> impl Future<Output = ()> + Send + 'static {
    let (sink, stream) = socket.split();
    serve(sink, stream, st, params)
}

async fn serve(sink: SplitSink<WebSocket, Message>, stream: SplitStream<WebSocket>, st: AppState, params: Params) {
    let m = st.metrics.clone();
    m.connections.inc();
    m.connections_total.inc();
    let limits = st.settings.limits.clone();
    let id = st.hub.next_client_id();
    let (mut client, mut live_rx, mut close_rx) = Client::new(id, &params.identity.agent, limits.outbound_queue);
    client.bundle_kid = params.identity.bundle_kid.as_deref().map(Arc::from);
    let handle = client.clone();
    let plan = st.hub.register(&params.session_id, client, params.since);
    // A halt applied between the handshake check and the registration above.
    if let Some((ks, generation)) = st.halts.halted_by(&params.identity.agent) {
        handle.close(CloseReason {
            code: close_code::HALTED,
            reason: "halted by a kill switch",
            frame: Some(protocol::halted_frame(&ks, generation, &params.identity.agent, None)),
        });
    }
    // Likewise a trust-bundle key removed meanwhile: the removal sweep runs after the key
    // set changed, so either it saw this client or this check sees the new key set.
    if !st.auth.still_trusted(&params.identity) {
        handle.close(revoked_close());
    }

    // Any frame from the client (pongs too) proves it is alive; only its own frames (and
    // deliveries) count as activity for the idle TTL.
    let last_heard = Arc::new(AtomicI64::new(now_ms()));
    let last_frame = Arc::new(AtomicI64::new(now_ms()));
    let (ctrl_tx, mut ctrl_rx) = mpsc::channel::<Reply>(16);
    let inbound = Inbound {
        st: st.clone(),
        session_id: params.session_id.clone(),
        identity: params.identity.clone(),
    };
    let mut reader = tokio::spawn(read_loop(
        stream,
        inbound,
        ctrl_tx,
        last_heard.clone(),
        last_frame.clone(),
        limits.max_message_bytes,
    ));

    let mut w = Writer {
        sink,
        last_sent: HashMap::new(),
        st: st.clone(),
        last_activity: Instant::now(),
    };
    if let Some(since) = params.since {
        w.last_sent.insert(since.partition, since.offset);
    }
    // `exp` may be fractional (RFC 7519 NumericDate): close at exp + leeway to the millisecond.
    let expires_in = token_expires_in(params.identity.exp, st.auth.leeway(), SystemTime::now());
    let expiry = tokio::time::sleep(expires_in);
    tokio::pin!(expiry);
    let mut ping = tokio::time::interval(limits.ping_interval);
    ping.tick().await;

    // Boxed: a resume's state (the Kafka replay) is large and needed only at the start; kept
    // inline, it would enlarge every idle connection's task for its whole life.
    let outcome: Stop = match Box::pin(w.resume(plan, &params, &mut live_rx, &mut close_rx)).await {
        Err(stop) => stop,
        Ok(()) => loop {
            let step: Result<(), Stop> = tokio::select! {
                biased;
                _ = st.shutdown.wait() => Err(close(close_code::GOING_AWAY, "gateway shutting down")),
                _ = close_rx.changed() => Err(close_rx.borrow().clone().map_or(Stop::Gone, Stop::Close)),
                end = &mut reader => Err(match end {
                    Ok(ReaderEnd::TooBig) => close(close_code::TOO_BIG, "message too big"),
                    Ok(ReaderEnd::InvalidUtf8) => close(close_code::INVALID_PAYLOAD, "text frame is not UTF-8"),
                    Ok(ReaderEnd::ProtocolError) => close(close_code::PROTOCOL_ERROR, "WebSocket protocol error"),
                    _ => Stop::Gone,
                }),
                _ = &mut expiry => Err(close(close_code::TOKEN_EXPIRED, "token expired")),
                Some(text) = ctrl_rx.recv() => w.send_text(*text, &mut close_rx).await,
                Some(entry) = live_rx.recv() => w.send_entry(&entry, &mut close_rx).await,
                _ = ping.tick() => {
                    let silent = Duration::from_millis((now_ms() - last_heard.load(Ordering::Relaxed)).max(0) as u64);
                    let since_frame = Duration::from_millis((now_ms() - last_frame.load(Ordering::Relaxed)).max(0) as u64);
                    let last_frame_at = Instant::now().checked_sub(since_frame).unwrap_or_else(Instant::now);
                    if silent > limits.ping_interval * 2 {
                        Err(close(close_code::NORMAL, "heartbeat timeout"))
                    } else if limits.idle_ttl.is_some_and(|ttl| w.last_activity.max(last_frame_at).elapsed() > ttl) {
                        Err(close(close_code::NORMAL, "idle timeout"))
                    } else {
                        w.send(Message::Ping(Default::default()), &mut close_rx).await
                    }
                }
            };
            if let Err(stop) = step {
                break stop;
            }
        },
    };

    st.hub.unregister(&params.session_id, id);
    let code = match outcome {
        Stop::Close(reason) => {
            let code = reason.code;
            if let Some(frame) = reason.frame {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, w.sink.send(Message::Text(frame.into()))).await;
            }
            let cf = CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason.reason),
            };
            let wait = if code == close_code::SLOW_CONSUMER {
                SLOW_CLOSE_TIMEOUT
            } else {
                CLOSE_TIMEOUT
            };
            let _ = tokio::time::timeout(wait, w.sink.send(Message::Close(Some(cf)))).await;
            // Give the peer a moment to answer the close before dropping the socket.
            if !reader.is_finished() {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, &mut reader).await;
            }
            tracing::info!(session = %params.session_id, code, reason = reason.reason, "connection closed");
            code.to_string()
        }
        Stop::Gone => {
            tracing::info!(session = %params.session_id, "connection closed by the client");
            "client".to_string()
        }
    };
    reader.abort();
    m.closes.with_label_values(&[&code]).inc();
    m.connections.dec();
}

#[derive(Debug, PartialEq, Eq)]
enum ReaderEnd {
    Closed,
    TooBig,
    /// A text frame that is not UTF-8 (RFC 6455 §8.1: close with 1007).
    InvalidUtf8,
    /// A frame that breaks the WebSocket protocol (close with 1002).
    ProtocolError,
}

/// What a read error means for the close code. axum hides tungstenite's error type, so its
/// message (tungstenite's `Display`) is what there is to go by.
fn reader_end(e: &axum::Error) -> ReaderEnd {
    let s = e.to_string();
    if s.contains("Space limit exceeded") || s.contains("too long") || s.contains("too big") {
        ReaderEnd::TooBig
    } else if s.contains("UTF-8") {
        ReaderEnd::InvalidUtf8
    } else if s.contains("protocol error") {
        ReaderEnd::ProtocolError
    } else {
        ReaderEnd::Closed
    }
}

async fn read_loop(
    mut stream: SplitStream<WebSocket>,
    inbound: Inbound,
    ctrl: mpsc::Sender<Reply>,
    last_heard: Arc<AtomicI64>,
    last_frame: Arc<AtomicI64>,
    max_bytes: usize,
) -> ReaderEnd {
    while let Some(msg) = stream.next().await {
        let msg = match msg {
            Ok(m) => m,
            Err(e) => return reader_end(&e),
        };
        last_heard.store(now_ms(), Ordering::Relaxed);
        if matches!(msg, Message::Text(_) | Message::Binary(_)) {
            last_frame.store(now_ms(), Ordering::Relaxed);
        }
        let reply = match msg {
            Message::Text(t) if t.len() > max_bytes => return ReaderEnd::TooBig,
            Message::Binary(b) if b.len() > max_bytes => return ReaderEnd::TooBig,
            // Boxed: handling a frame (parse, span, Kafka produce) takes far more state than
            // waiting for one, and an idle connection only ever waits.
            Message::Text(t) => Box::pin(inbound.handle(t.as_str())).await,
            Message::Binary(_) => {
                inbound.count("binary", "invalid");
                Some(protocol::error_frame(
                    "unsupported",
                    "binary frames are not supported; send JSON text frames",
                ))
            }
            Message::Ping(_) | Message::Pong(_) => None,
            // Read on: the next read sends tungstenite's reply to the client's close, then
            // ends the stream (returning now left the client waiting for that reply).
            Message::Close(_) => None,
        };
        if let Some(r) = reply
            && ctrl.send(Box::new(r)).await.is_err()
        {
            return ReaderEnd::Closed;
        }
    }
    ReaderEnd::Closed
}

/// Client frames -> agent commands.
struct Inbound {
    st: AppState,
    session_id: String,
    identity: Identity,
}

impl Inbound {
    fn count(&self, kind: &str, outcome: &str) {
        self.st.metrics.inbound_frames.with_label_values(&[kind, outcome]).inc();
    }

    /// Handle one text frame; returns the error frame to send back, if any.
    async fn handle(&self, text: &str) -> Option<String> {
        let frame = match ClientFrame::parse(text) {
            Ok(f) => f,
            Err(inv) => {
                self.count("unknown", "invalid");
                return Some(protocol::error_frame("invalid_frame", &inv.to_string()));
            }
        };
        let user = CommandUser {
            sub: self.identity.sub.clone(),
            role: self.identity.role,
        };
        match frame {
            ClientFrame::UserMessage {
                text,
                client_message_id,
            } => {
                let span =
                    tracing::info_span!("gateway.inbound", session = %self.session_id, frame_type = "user_message");
                let tp = telemetry::traceparent_of(&span);
                let input = CommandInput {
                    session_id: &self.session_id,
                    agent: &self.identity.agent,
                    user,
                    trace_id: tp.as_ref().map(|t| t.1.clone()),
                    // A client retrying the same message after a reconnect keeps its key.
                    idempotency_key: client_message_id.map(|id| format!("{}:{id}", self.session_id)),
                };
                let cmd = AgentCommand::user_message(input, &text);
                let target = self.identity.agent.clone();
                self.produce("user_message", &target, cmd, tp.map(|t| t.0))
                    .instrument(span)
                    .await
            }
            ClientFrame::ApprovalDecision { run_id, decision, edit } => {
                if !self.identity.role.may_decide() {
                    self.count("approval_decision", "forbidden");
                    return Some(protocol::error_frame(
                        "forbidden",
                        &format!(
                            "approval decisions need the role reviewer or operator; this token's role is {}",
                            self.identity.role.as_str()
                        ),
                    ));
                }
                // The agent that raised the approval, else the session's agent.
                let target = self
                    .st
                    .hub
                    .approval_agent(&self.session_id, &run_id)
                    .unwrap_or_else(|| self.identity.agent.clone());
                let span = tracing::info_span!("gateway.inbound", session = %self.session_id, frame_type = "approval_decision");
                let tp = telemetry::traceparent_of(&span);
                let input = CommandInput {
                    session_id: &self.session_id,
                    agent: &target,
                    user,
                    trace_id: tp.as_ref().map(|t| t.1.clone()),
                    // A run may raise several approvals: each decision is its own command.
                    idempotency_key: None,
                };
                let cmd = AgentCommand::resume(input, &run_id, decision, edit.as_deref());
                self.produce("approval_decision", &target, cmd, tp.map(|t| t.0))
                    .instrument(span)
                    .await
            }
        }
    }

    async fn produce(
        &self,
        kind: &str,
        target: &str,
        cmd: AgentCommand,
        traceparent: Option<String>,
    ) -> Option<String> {
        let topic = self.st.settings.topics.requests_for(target);
        let payload = serde_json::to_vec(&cmd).expect("command serializes");
        match self
            .st
            .kafka
            .produce(&topic, &self.session_id, &payload, traceparent.as_deref())
            .await
        {
            Ok(()) => {
                self.count(kind, "produced");
                tracing::info!(session = %self.session_id, command = %cmd.id, kind, topic = %topic, "command produced");
                None
            }
            Err(ProduceError::Unavailable(msg)) => {
                self.count(kind, "unavailable");
                Some(protocol::error_frame("unavailable", &msg))
            }
            Err(ProduceError::Refused(msg)) => {
                self.count(kind, "refused");
                tracing::warn!(session = %self.session_id, topic = %topic, error = %msg, "command refused by Kafka");
                Some(protocol::error_frame("refused", &msg))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_expiry_close_counts_fractional_exp() {
        let at = |s: f64| UNIX_EPOCH + Duration::from_secs_f64(s);
        // exp 1000.5, leeway 5: the close is due at 1005.5.
        assert_eq!(token_expires_in(at(1000.5), 5, at(1000.0)), Duration::from_millis(5500));
        assert_eq!(token_expires_in(at(1000.5), 0, at(1000.25)), Duration::from_millis(250));
        // Past exp + leeway: close now.
        assert_eq!(token_expires_in(at(1000.5), 0, at(1000.7)), Duration::ZERO);
        assert_eq!(token_expires_in(at(1000.5), 5, at(2000.0)), Duration::ZERO);
        // Whole seconds as before.
        assert_eq!(token_expires_in(at(1000.0), 5, at(990.0)), Duration::from_secs(15));
    }
}
