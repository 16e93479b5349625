//! The HTTP side: the axum router, the handshake checks in SPEC §5.1 order (ready, token with
//! its session claim and the halts, connection limit), the upgrade, the probes and `/metrics`;
//! and `run`, which starts every task and carries out the graceful shutdown.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::auth::{self, Authenticator, Refusal, SUBPROTOCOL};
use crate::config::Settings;
use crate::connection::{self, Params};
use crate::control::{Control, HaltState};
use crate::history::Position;
use crate::hub::Hub;
use crate::kafka::Kafka;
use crate::kill_switches;
use crate::kube::KubeClient;
use crate::metrics::Metrics;
use crate::protocol::is_session_id;
use crate::shutdown::{self, Shutdown};
use crate::trust_bundle::OnRemoved;
use crate::verify::Verifier;

/// Read buffer of a WebSocket connection, also the most read from the socket at once (a
/// larger frame grows the buffer to its size, then is read in pieces of this size). Clients
/// send little (pongs, replies, decisions), and every idle connection holds this much.
const READ_BUFFER_BYTES: usize = 512;

pub struct Inner {
    pub settings: Arc<Settings>,
    pub hub: Arc<Hub>,
    pub kafka: Arc<Kafka>,
    pub auth: Arc<Authenticator>,
    pub halts: Arc<HaltState>,
    pub metrics: Arc<Metrics>,
    pub permits: Arc<Semaphore>,
    pub shutdown: Shutdown,
    pub tracker: TaskTracker,
}

pub type AppState = Arc<Inner>;

impl Inner {
    pub fn ready(&self) -> bool {
        !self.shutdown.is_triggered() && self.kafka.health.ready() && self.auth.ready()
    }

    fn problems(&self) -> Vec<&'static str> {
        let mut p = self.kafka.health.problems();
        p.extend(self.auth.problems());
        if self.shutdown.is_triggered() {
            p.push("shutting down");
        }
        p
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/sessions/{session_id}/ws", get(ws_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(st): State<AppState>) -> Response {
    if st.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"ready": false, "problems": st.problems()})),
        )
            .into_response()
    }
}

async fn metrics(State(st): State<AppState>) -> Response {
    let mut r = st.metrics.render().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

fn refuse(st: &Inner, status: StatusCode, error: &str, detail: &str) -> Response {
    st.metrics
        .handshake_refusals
        .with_label_values(&[status.as_str()])
        .inc();
    let mut r = (status, axum::Json(json!({"error": error, "detail": detail}))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
    }
    r
}

/// `since` and `access_token` from the raw query (never logged: it may hold a token).
fn query_params(raw: Option<&str>) -> (Option<String>, Option<String>) {
    let mut since = None;
    let mut token = None;
    for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "since" => since = Some(v.into_owned()),
            "access_token" => token = Some(v.into_owned()),
            _ => {}
        }
    }
    (since, token)
}

/// At most `max` characters of `s` (a client's value echoed back in a frame).
fn truncated(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

async fn ws_handler(
    State(st): State<AppState>,
    session_path: Result<Path<String>, PathRejection>,
    RawQuery(raw_query): RawQuery,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if !st.ready() {
        return refuse(
            &st,
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            &st.problems().join("; "),
        );
    }
    // A path that does not decode (not UTF-8) is an invalid session id like any other: the
    // token is checked first, and the refusal has the usual JSON body.
    let session_id = session_path.map(|Path(id)| id).unwrap_or_default();
    let (since_raw, query_token) = query_params(raw_query.as_deref());
    let identity = match authenticate(&st, &headers, query_token.as_deref(), &session_id).await {
        Ok(id) => id,
        Err(refusal) => {
            st.metrics.auth_refusals.with_label_values(&[refusal.reason()]).inc();
            // Reason codes only: no token, nor any part of one, reaches the log.
            // The path is not validated yet: an id outside the session-id alphabet is not
            // written out (no control characters or forged log lines from a client's URL).
            let shown = if crate::envelopes::is_session_id(&session_id) {
                session_id.as_str()
            } else {
                "<invalid>"
            };
            tracing::info!(session = %shown, peer = %peer.ip(), status = refusal.status().as_u16(),
                reason = refusal.reason(), "handshake refused");
            return refuse(
                &st,
                refusal.status(),
                refusal.reason(),
                "see docs/gateway-protocol.md#handshake-refusals",
            );
        }
    };
    // After the token: without one the answer is 401, whatever else is wrong. A token's
    // `sid` is itself a valid session id and equals the path's, so this is a backstop.
    if !is_session_id(&session_id) {
        return refuse(
            &st,
            StatusCode::BAD_REQUEST,
            "bad_session_id",
            "a session id is 1-128 characters of [A-Za-z0-9._:-]",
        );
    }
    // A `since` that is not a position is answered on the connection with
    // `recovery_failed` (SPEC §5.1), like any other resume that cannot be served.
    let (since, bad_since) = match since_raw.as_deref().map(str::parse::<Position>) {
        None => (None, None),
        Some(Ok(p)) => (Some(p), None),
        Some(Err(_)) => (None, since_raw.map(|raw| truncated(&raw, 64).into())),
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            st.metrics.handshake_refusals.with_label_values(&["400"]).inc();
            return rejection.into_response();
        }
    };
    let Ok(permit) = st.permits.clone().try_acquire_owned() else {
        tracing::warn!(session = %session_id, limit = st.settings.limits.max_connections, "handshake refused: connection limit");
        return refuse(
            &st,
            StatusCode::SERVICE_UNAVAILABLE,
            "connection_limit",
            "the gateway is at its connection limit; retry",
        );
    };
    let max = st.settings.limits.max_message_bytes;
    // The library limit sits above ours so that a merely oversized message is read and
    // answered with 1009 by the connection; the library cuts off anything much larger.
    // The read buffer starts small and grows with the frames that need it: tungstenite's
    // default of 128 KiB per connection was most of an idle connection's memory (clients
    // send little: replies and decisions).
    let ws = ws
        .protocols([SUBPROTOCOL])
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(max.saturating_mul(2) + 1024)
        .max_frame_size(max.saturating_mul(2) + 1024);
    let tracked = st.tracker.token();
    let st2 = st.clone();
    tracing::info!(session = %session_id, sub = %identity.sub, role = identity.role.as_str(), agent = %identity.agent,
        resume = since.is_some(), "connection accepted");
    let params = Params {
        session_id,
        identity,
        since,
        bad_since,
        permit,
        tracked,
    };
    // `connection::run` itself is the upgrade's future (no wrapping async block, which would
    // keep its captures alongside `run`'s state for the whole connection).
    ws.on_upgrade(move |socket| connection::run(socket, st2, params))
}

async fn authenticate(
    st: &Inner,
    headers: &HeaderMap,
    query_token: Option<&str>,
    session_id: &str,
) -> Result<auth::Identity, Refusal> {
    let (token, _via) = auth::extract_token(headers, query_token, st.auth.allow_query_token)?;
    let id = st.auth.verify(&token, session_id).await?;
    if st.halts.halted_by(&id.agent).is_some() {
        return Err(Refusal::AgentHalted);
    }
    Ok(id)
}

/// Start everything, serve until SIGTERM/SIGINT, shut down gracefully.
pub async fn run(settings: Settings) -> ExitCode {
    let settings = Arc::new(settings);
    let metrics = Arc::new(Metrics::new());
    let kafka = match Kafka::new(&settings, metrics.clone()) {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(error = %e, "cannot create the Kafka clients");
            return ExitCode::from(1);
        }
    };
    let auth = Arc::new(Authenticator::new(&settings.auth, metrics.clone()));
    if let Some(jwks) = auth.jwks() {
        match jwks.load().await {
            Ok(n) => tracing::info!(keys = n, "JWKS loaded"),
            Err(e) if matches!(settings.auth.keys, Some(crate::config::KeySource::JwksFile(_))) => {
                tracing::error!(error = %e, "cannot load --jwks-file");
                return ExitCode::from(2);
            }
            Err(e) => tracing::warn!(error = %e, "JWKS URL not loaded yet; not ready until it is"),
        }
    }
    let hub = Arc::new(Hub::new(settings.limits.history_per_session, metrics.clone()));
    let halts = Arc::new(HaltState::new(metrics.clone()));
    let shutdown = Shutdown::new();
    let state: AppState = Arc::new(Inner {
        settings: settings.clone(),
        hub: hub.clone(),
        kafka: kafka.clone(),
        auth: auth.clone(),
        halts: halts.clone(),
        metrics: metrics.clone(),
        permits: Arc::new(Semaphore::new(settings.limits.max_connections)),
        shutdown: shutdown.clone(),
        tracker: TaskTracker::new(),
    });

    let listener = match tokio::net::TcpListener::bind(settings.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %settings.listen, error = %e, "cannot listen");
            return ExitCode::from(1);
        }
    };
    let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();

    let background = TaskTracker::new();
    background.spawn(kafka.clone().run_events(hub.clone(), shutdown.clone()));
    let control = Arc::new(Control {
        kafka: kafka.clone(),
        hub: hub.clone(),
        halts,
        auth: auth.clone(),
        metrics: metrics.clone(),
        topic: settings.topics.control.clone(),
        acks_topic: settings.topics.control_acks.clone(),
        instance_id: settings.instance_id.clone(),
    });
    background.spawn(control.run(shutdown.clone()));
    let verifier = Arc::new(Verifier::new(
        kafka.clone(),
        settings.verify.clone(),
        settings.topics.alerts.clone(),
        metrics.clone(),
    ));
    background.spawn(verifier.run(shutdown.clone()));
    if let Some(jwks) = auth.jwks() {
        background.spawn(jwks.refresh_loop(settings.auth.jwks_refresh, shutdown.token()));
    }
    if let (Some(bundle), Some(bundle_settings)) = (auth.trust_bundle(), settings.auth.trust_bundle.clone()) {
        let client = match KubeClient::new(&bundle_settings.api) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot create the Kubernetes API client for the trust bundle");
                return ExitCode::from(2);
            }
        };
        // Revocation: connections authenticated with a removed (or kill-switch covered) key
        // are closed at once. One closure, called from both watches.
        let (hub, metrics) = (hub.clone(), metrics.clone());
        let close_revoked = Arc::new(move |kids: &HashSet<String>| {
            let closed = hub.close_signed_by(kids, connection::revoked_close());
            metrics.revoked_closes.inc_by(closed);
            if closed > 0 {
                tracing::info!(
                    keys = kids.len(),
                    connections = closed,
                    "trust bundle: closed connections of revoked keys (4003)"
                );
            }
        });
        if bundle_settings.watch_kill_switches {
            // The fast path (SPEC §7 target: refused within 1 s): the switch itself, not the
            // operator's later ConfigMap rewrite, makes this gateway refuse covered keys.
            let close = close_revoked.clone();
            let on_covered: OnRemoved = Box::new(move |kids| close(kids));
            tracing::info!(api = %bundle_settings.api.url, "kill switches: watching (covered agents' keys refused locally)");
            background.spawn(kill_switches::run(
                bundle.clone(),
                client.clone(),
                bundle_settings.watch_timeout,
                on_covered,
                shutdown.token(),
            ));
        }
        let on_removed: OnRemoved = Box::new(move |kids| close_revoked(kids));
        tracing::info!(namespace = %bundle_settings.namespace, configmap = %bundle_settings.configmap,
            api = %bundle_settings.api.url, "trust bundle: watching");
        background.spawn(bundle.run(client, bundle_settings, on_removed, shutdown.token()));
    }
    {
        let hub = hub.clone();
        let limits = settings.limits.clone();
        let shutdown = shutdown.clone();
        background.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tick.tick() => { hub.sweep(limits.session_timeout, limits.session_retention, limits.max_sessions); }
                }
            }
        });
    }
    background.close();

    let app = router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let serve_shutdown = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { serve_shutdown.wait().await })
            .await
    });
    tracing::info!(listen = %local, instance = %settings.instance_id, events_topic = %settings.topics.events,
        auth = ?settings.auth, "fleetward-gateway started");

    let why = tokio::select! {
        s = shutdown::signal() => s,
        r = server => {
            tracing::error!(result = ?r.map(|r| r.map_err(|e| e.to_string())), "server stopped unexpectedly");
            shutdown.trigger();
            return ExitCode::from(1);
        }
    };
    let open = metrics.connections.get();
    tracing::info!(
        signal = why,
        open_connections = open,
        "shutting down: closing connections with 1001"
    );
    shutdown.trigger();
    state.tracker.close();
    let grace = settings.limits.shutdown_grace;
    if tokio::time::timeout(grace, state.tracker.wait()).await.is_err() {
        tracing::warn!(
            left = metrics.connections.get(),
            "shutdown grace over; dropping the remaining connections"
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), background.wait()).await;
    let k = kafka.clone();
    let _ = tokio::task::spawn_blocking(move || k.flush(Duration::from_secs(5))).await;
    tracing::info!("fleetward-gateway stopped");
    ExitCode::SUCCESS
}
