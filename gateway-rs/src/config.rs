//! Settings: CLI flags, each with an environment variable (`FLEETWARD_GATEWAY_*`, plus the
//! Kubernetes-style `POD_NAME` for the instance id), validated once at start so a bad value
//! stops the process with a message naming the flag, the value and what is allowed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Highest clock leeway accepted for token times (SPEC §5.1: "at most 30 s").
pub const MAX_LEEWAY_SECONDS: u64 = 30;
/// HS256 secrets shorter than this are refused (RFC 7518 §3.2: key >= hash output size).
pub const MIN_HS256_SECRET_BYTES: usize = 32;
/// Where Kubernetes mounts a pod's service-account credentials (token, CA, namespace).
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SaslMechanism {
    #[value(name = "SCRAM-SHA-512")]
    ScramSha512,
    #[value(name = "SCRAM-SHA-256")]
    ScramSha256,
    #[value(name = "PLAIN")]
    Plain,
}

impl SaslMechanism {
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::Plain => "PLAIN",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SecurityProtocol {
    #[value(name = "PLAINTEXT")]
    Plaintext,
    #[value(name = "SASL_PLAINTEXT")]
    SaslPlaintext,
    #[value(name = "SASL_SSL")]
    SaslSsl,
    #[value(name = "SSL")]
    Ssl,
}

impl SecurityProtocol {
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "PLAINTEXT",
            SecurityProtocol::SaslPlaintext => "SASL_PLAINTEXT",
            SecurityProtocol::SaslSsl => "SASL_SSL",
            SecurityProtocol::Ssl => "SSL",
        }
    }
}

/// The raw flags. `Settings::from_args` validates them into `Settings`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "fleetward-gateway",
    version,
    about = "Fleetward WebSocket gateway (Kafka -> WebSocket)"
)]
pub struct Args {
    /// Address the HTTP/WebSocket server listens on.
    #[arg(long, env = "FLEETWARD_GATEWAY_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: String,

    // -- Kafka ------------------------------------------------------------------------------
    /// Kafka bootstrap servers, comma separated host:port.
    #[arg(long, env = "FLEETWARD_GATEWAY_KAFKA_BOOTSTRAP")]
    pub kafka_bootstrap: Option<String>,
    /// Kafka security protocol (default: SASL_PLAINTEXT when a SASL username is set, else PLAINTEXT).
    #[arg(long, env = "FLEETWARD_GATEWAY_KAFKA_SECURITY_PROTOCOL")]
    pub kafka_security_protocol: Option<SecurityProtocol>,
    /// SASL username (enables SASL).
    #[arg(long, env = "FLEETWARD_GATEWAY_KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,
    /// SASL password (prefer the environment variable or --kafka-sasl-password-file).
    #[arg(long, env = "FLEETWARD_GATEWAY_KAFKA_SASL_PASSWORD", hide_env_values = true)]
    pub kafka_sasl_password: Option<String>,
    /// File holding the SASL password (a mounted Secret).
    #[arg(long, env = "FLEETWARD_GATEWAY_KAFKA_SASL_PASSWORD_FILE")]
    pub kafka_sasl_password_file: Option<PathBuf>,
    /// SASL mechanism.
    #[arg(
        long,
        env = "FLEETWARD_GATEWAY_KAFKA_SASL_MECHANISM",
        default_value = "SCRAM-SHA-512"
    )]
    pub kafka_sasl_mechanism: SaslMechanism,

    // -- topics -----------------------------------------------------------------------------
    #[arg(long, env = "FLEETWARD_GATEWAY_EVENTS_TOPIC", default_value = "fleetward.events")]
    pub events_topic: String,
    #[arg(long, env = "FLEETWARD_GATEWAY_CONTROL_TOPIC", default_value = "fleetward.control")]
    pub control_topic: String,
    #[arg(
        long,
        env = "FLEETWARD_GATEWAY_CONTROL_ACKS_TOPIC",
        default_value = "fleetward.control-acks"
    )]
    pub control_acks_topic: String,
    #[arg(long, env = "FLEETWARD_GATEWAY_ALERTS_TOPIC", default_value = "fleetward.alerts")]
    pub alerts_topic: String,
    /// Agent request topics are `<prefix>.<namespace>.<agent>`.
    #[arg(
        long,
        env = "FLEETWARD_GATEWAY_REQUESTS_TOPIC_PREFIX",
        default_value = "fleetward.requests"
    )]
    pub requests_topic_prefix: String,

    // -- auth -------------------------------------------------------------------------------
    /// HS256 shared secret (prefer --jwt-hs256-secret-file).
    #[arg(long, env = "FLEETWARD_GATEWAY_JWT_HS256_SECRET", hide_env_values = true)]
    pub jwt_hs256_secret: Option<String>,
    /// File holding the HS256 shared secret (trailing newline ignored).
    #[arg(long, env = "FLEETWARD_GATEWAY_JWT_HS256_SECRET_FILE")]
    pub jwt_hs256_secret_file: Option<PathBuf>,
    /// JWKS file (RS256/ES256/EdDSA keys, `kid` selects the key), re-read every --jwks-refresh-seconds.
    #[arg(long, env = "FLEETWARD_GATEWAY_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,
    /// JWKS URL (http/https), refetched every --jwks-refresh-seconds and on an unknown `kid`.
    #[arg(long, env = "FLEETWARD_GATEWAY_JWKS_URL")]
    pub jwks_url: Option<String>,
    #[arg(long, env = "FLEETWARD_GATEWAY_JWKS_REFRESH_SECONDS", default_value_t = 30)]
    pub jwks_refresh_seconds: u64,
    /// Required `aud` claim value.
    #[arg(long, env = "FLEETWARD_GATEWAY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Required `iss` claim value.
    #[arg(long, env = "FLEETWARD_GATEWAY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Clock leeway for exp/nbf/iat, seconds (at most 30).
    #[arg(long, env = "FLEETWARD_GATEWAY_JWT_LEEWAY_SECONDS", default_value_t = 5)]
    pub jwt_leeway_seconds: u64,
    /// Trust bundle: the ConfigMap in which the operator publishes every active agent's public
    /// key (a JWKS whose entries name their agent). Read and WATCHED through the Kubernetes API,
    /// so a removed key is refused within milliseconds. A token signed by one of its keys may
    /// speak only for that key's agent. Combines with any one key source above, or stands alone.
    #[arg(long, env = "FLEETWARD_GATEWAY_TRUST_BUNDLE_CONFIGMAP")]
    pub trust_bundle_configmap: Option<String>,
    /// Namespace of the trust-bundle ConfigMap (default: the pod's own namespace).
    #[arg(long, env = "FLEETWARD_GATEWAY_TRUST_BUNDLE_NAMESPACE")]
    pub trust_bundle_namespace: Option<String>,
    /// Key of the JWKS document in the ConfigMap's data.
    #[arg(long, env = "FLEETWARD_GATEWAY_TRUST_BUNDLE_KEY", default_value = "jwks.json")]
    pub trust_bundle_key: String,
    /// While the Kubernetes API is unreachable the last known agent keys stay trusted this
    /// long; after that, agent-signed tokens are refused (503) until the watch is back.
    #[arg(
        long,
        env = "FLEETWARD_GATEWAY_TRUST_BUNDLE_MAX_STALENESS_SECONDS",
        default_value_t = 10
    )]
    pub trust_bundle_max_staleness_seconds: u64,
    /// Server-side length of one watch request; the watch then resumes from where it was.
    #[arg(long, env = "FLEETWARD_GATEWAY_TRUST_BUNDLE_WATCH_SECONDS", default_value_t = 300)]
    pub trust_bundle_watch_seconds: u64,
    /// Also watch KillSwitch objects (killswitches.fleetward.dev, cluster-scoped) and refuse at
    /// once the trust-bundle keys of every agent an engaged switch covers (scope namespaces and
    /// agentSelector, over the agent labels published in the bundle), without waiting for the
    /// operator to rewrite the ConfigMap. Needs get/list/watch on killswitches.fleetward.dev;
    /// the ConfigMap stays authoritative. Only used with --trust-bundle-configmap.
    #[arg(
        long,
        env = "FLEETWARD_GATEWAY_TRUST_BUNDLE_WATCH_KILL_SWITCHES",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    pub trust_bundle_watch_kill_switches: bool,
    /// Kubernetes API server URL (default: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT).
    #[arg(long, env = "FLEETWARD_GATEWAY_KUBE_API_URL")]
    pub kube_api_url: Option<String>,
    /// Bearer token file for the Kubernetes API (re-read on every reconnect: projected tokens rotate).
    #[arg(long, env = "FLEETWARD_GATEWAY_KUBE_TOKEN_FILE")]
    pub kube_token_file: Option<PathBuf>,
    /// CA bundle (PEM) the Kubernetes API server's certificate must chain to.
    #[arg(long, env = "FLEETWARD_GATEWAY_KUBE_CA_FILE")]
    pub kube_ca_file: Option<PathBuf>,
    /// Set by Kubernetes in every pod: the API server's in-cluster address.
    #[arg(long, env = "KUBERNETES_SERVICE_HOST", hide = true)]
    pub kubernetes_service_host: Option<String>,
    #[arg(long, env = "KUBERNETES_SERVICE_PORT", hide = true)]
    pub kubernetes_service_port: Option<String>,
    /// Accept `?access_token=` (off by default: query strings end up in proxy logs).
    #[arg(long, env = "FLEETWARD_GATEWAY_ALLOW_QUERY_TOKEN", default_value_t = false)]
    pub allow_query_token: bool,
    /// Tokens longer than this are refused unread.
    #[arg(long, env = "FLEETWARD_GATEWAY_MAX_TOKEN_BYTES", default_value_t = 8192)]
    pub max_token_bytes: usize,

    // -- limits -----------------------------------------------------------------------------
    /// Concurrent WebSocket connections; the next one gets 503.
    #[arg(long, env = "FLEETWARD_GATEWAY_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Frames queued per connection; a client this far behind is closed with 4008.
    #[arg(long, env = "FLEETWARD_GATEWAY_OUTBOUND_QUEUE", default_value_t = 256)]
    pub outbound_queue: usize,
    /// Largest client message, bytes; a larger one closes the connection with 1009.
    #[arg(long, env = "FLEETWARD_GATEWAY_MAX_MESSAGE_BYTES", default_value_t = 65_536)]
    pub max_message_bytes: usize,
    /// Close a connection with no client frame and no delivery for this long (0 = never).
    #[arg(long, env = "FLEETWARD_GATEWAY_IDLE_TTL_SECONDS", default_value_t = 1800)]
    pub idle_ttl_seconds: u64,
    /// Ping interval; a client silent for two intervals is considered gone.
    #[arg(long, env = "FLEETWARD_GATEWAY_PING_INTERVAL_SECONDS", default_value_t = 20)]
    pub ping_interval_seconds: u64,
    /// Events kept in memory per session for resume.
    #[arg(long, env = "FLEETWARD_GATEWAY_HISTORY_PER_SESSION", default_value_t = 256)]
    pub history_per_session: usize,
    /// Sessions kept in memory; the least recently active ones without clients go first.
    #[arg(long, env = "FLEETWARD_GATEWAY_MAX_SESSIONS", default_value_t = 100_000)]
    pub max_sessions: usize,
    /// Forget a session's history this long after its last event when no client is connected.
    #[arg(long, env = "FLEETWARD_GATEWAY_SESSION_RETENTION_SECONDS", default_value_t = 3600)]
    pub session_retention_seconds: u64,
    /// An Active/WaitingForHuman session with no event for this long becomes TimedOut.
    #[arg(long, env = "FLEETWARD_GATEWAY_SESSION_TIMEOUT_SECONDS", default_value_t = 1800)]
    pub session_timeout_seconds: u64,
    /// Longest a resume may take reading Kafka before it answers recovery_failed.
    #[arg(long, env = "FLEETWARD_GATEWAY_RESUME_TIMEOUT_SECONDS", default_value_t = 10)]
    pub resume_timeout_seconds: u64,
    /// Most messages one resume may scan in Kafka before it answers recovery_failed.
    #[arg(long, env = "FLEETWARD_GATEWAY_RESUME_MAX_SCAN", default_value_t = 200_000)]
    pub resume_max_scan: u64,
    /// Events per partition read back into the resume history when the gateway starts (0: start
    /// at the end). After a restart, clients resume from memory instead of each reading Kafka.
    #[arg(long, env = "FLEETWARD_GATEWAY_HISTORY_BACKFILL", default_value_t = 10_000)]
    pub history_backfill: u64,
    /// Concurrent Kafka resume reads (each is a short-lived consumer).
    #[arg(long, env = "FLEETWARD_GATEWAY_RESUME_CONCURRENCY", default_value_t = 8)]
    pub resume_concurrency: usize,
    /// Seconds between checks of the events topic's partition count.
    #[arg(long, env = "FLEETWARD_GATEWAY_PARTITION_REFRESH_SECONDS", default_value_t = 10)]
    pub partition_refresh_seconds: u64,
    /// Grace period for connections to close on SIGTERM.
    #[arg(long, env = "FLEETWARD_GATEWAY_SHUTDOWN_GRACE_SECONDS", default_value_t = 10)]
    pub shutdown_grace_seconds: u64,

    // -- after-runner verification ----------------------------------------------------------
    /// Health URL checked after a `resolved` event that names none (unset: only events with data.verify.url).
    #[arg(long, env = "FLEETWARD_GATEWAY_VERIFY_DEFAULT_URL")]
    pub verify_default_url: Option<String>,
    /// Delay before the check when the event names none.
    #[arg(long, env = "FLEETWARD_GATEWAY_VERIFY_DEFAULT_DELAY_SECONDS", default_value_t = 60)]
    pub verify_default_delay_seconds: u64,
    /// Timeout of one health request.
    #[arg(long, env = "FLEETWARD_GATEWAY_VERIFY_TIMEOUT_SECONDS", default_value_t = 10)]
    pub verify_timeout_seconds: u64,
    /// Health URLs must start with one of these prefixes (comma separated; empty = any http(s) URL).
    #[arg(long, env = "FLEETWARD_GATEWAY_VERIFY_ALLOWED_URL_PREFIXES", value_delimiter = ',')]
    pub verify_allowed_url_prefixes: Vec<String>,
    /// Consumer group sharing `resolved` events between replicas so each is verified once.
    #[arg(
        long,
        env = "FLEETWARD_GATEWAY_VERIFY_GROUP_ID",
        default_value = "fleetward-gateway-verify"
    )]
    pub verify_group_id: String,
    /// Pending verifications at most; more are dropped (counted).
    #[arg(long, env = "FLEETWARD_GATEWAY_VERIFY_MAX_PENDING", default_value_t = 10_000)]
    pub verify_max_pending: usize,

    // -- identity, logs ---------------------------------------------------------------------
    /// Instance id in acks, logs and Kafka client ids (default: POD_NAME, else the hostname).
    #[arg(long, env = "POD_NAME")]
    pub instance_id: Option<String>,
    #[arg(long, env = "FLEETWARD_GATEWAY_LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone)]
pub enum KeySource {
    Hs256Secret(Vec<u8>),
    JwksFile(PathBuf),
    JwksUrl(String),
}

#[derive(Clone)]
pub struct KafkaSettings {
    pub bootstrap: String,
    pub security_protocol: SecurityProtocol,
    pub sasl: Option<(SaslMechanism, String, String)>,
}

impl std::fmt::Debug for KafkaSettings {
    // The password never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSettings")
            .field("bootstrap", &self.bootstrap)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_user", &self.sasl.as_ref().map(|(m, u, _)| (m, u)))
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct Topics {
    pub events: String,
    pub control: String,
    pub control_acks: String,
    pub alerts: String,
    pub requests_prefix: String,
}

impl Topics {
    /// `fleetward.requests.<namespace>.<agent>` for an agent `namespace/name`.
    pub fn requests_for(&self, agent: &str) -> String {
        let (ns, name) = agent.split_once('/').unwrap_or(("", agent));
        format!("{}.{}.{}", self.requests_prefix, ns, name)
    }
}

/// How to reach the Kubernetes API (in-cluster service-account credentials, or explicit).
#[derive(Debug, Clone)]
pub struct KubeApiSettings {
    /// `https://host:port` (or `http://` for a plain local API server), no trailing slash.
    pub url: String,
    pub token_file: PathBuf,
    /// PEM of the CA the server certificate must chain to (https only).
    pub ca_pem: Option<Vec<u8>>,
    pub ca_file: Option<PathBuf>,
}

/// The trust-bundle key source: one ConfigMap, listed then watched.
#[derive(Debug, Clone)]
pub struct TrustBundleSettings {
    pub namespace: String,
    pub configmap: String,
    pub key: String,
    pub max_staleness: Duration,
    pub watch_timeout: Duration,
    /// Also watch KillSwitches and refuse covered agents' keys locally (a fast path).
    pub watch_kill_switches: bool,
    pub api: KubeApiSettings,
}

#[derive(Clone)]
pub struct AuthSettings {
    /// At most one of HS256 / JWKS file / JWKS URL (None: only the trust bundle).
    pub keys: Option<KeySource>,
    /// The trust bundle, alone or beside `keys`.
    pub trust_bundle: Option<TrustBundleSettings>,
    pub jwks_refresh: Duration,
    pub audience: String,
    pub issuer: String,
    pub leeway_seconds: u64,
    pub allow_query_token: bool,
    pub max_token_bytes: usize,
}

impl std::fmt::Debug for AuthSettings {
    // The HS256 secret never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = match &self.keys {
            None => "none".to_string(),
            Some(KeySource::Hs256Secret(_)) => "hs256-secret".to_string(),
            Some(KeySource::JwksFile(p)) => format!("jwks-file {}", p.display()),
            Some(KeySource::JwksUrl(u)) => format!("jwks-url {u}"),
        };
        let bundle = self.trust_bundle.as_ref().map(|t| {
            format!(
                "configmap {}/{} key {} via {}, kill switches {}",
                t.namespace,
                t.configmap,
                t.key,
                t.api.url,
                if t.watch_kill_switches {
                    "watched"
                } else {
                    "not watched"
                }
            )
        });
        f.debug_struct("AuthSettings")
            .field("keys", &keys)
            .field("trust_bundle", &bundle)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("leeway_seconds", &self.leeway_seconds)
            .field("allow_query_token", &self.allow_query_token)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub outbound_queue: usize,
    pub max_message_bytes: usize,
    pub idle_ttl: Option<Duration>,
    pub ping_interval: Duration,
    pub history_per_session: usize,
    pub max_sessions: usize,
    pub session_retention: Duration,
    pub session_timeout: Duration,
    pub resume_timeout: Duration,
    pub resume_max_scan: u64,
    pub resume_concurrency: usize,
    pub history_backfill: u64,
    pub partition_refresh: Duration,
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct VerifySettings {
    pub default_url: Option<String>,
    pub default_delay: Duration,
    pub timeout: Duration,
    pub allowed_url_prefixes: Vec<String>,
    pub group_id: String,
    pub max_pending: usize,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub kafka: KafkaSettings,
    pub topics: Topics,
    pub auth: AuthSettings,
    pub limits: Limits,
    pub verify: VerifySettings,
    pub instance_id: String,
    pub log_format: LogFormat,
}

/// A setting that cannot be used; the message names the flag, the value and what is allowed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

fn valid_topic(flag: &str, value: &str) -> Result<String, ConfigError> {
    // Kafka's own rule: 1-249 chars of [a-zA-Z0-9._-].
    let ok = !value.is_empty()
        && value.len() <= 249
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(value.to_string())
    } else {
        err(format!(
            "--{flag}={value:?}: a Kafka topic name is 1-249 characters of [a-zA-Z0-9._-]"
        ))
    }
}

fn positive(flag: &str, value: u64) -> Result<u64, ConfigError> {
    if value == 0 {
        return err(format!("--{flag}=0: must be at least 1"));
    }
    Ok(value)
}

fn read_secret_file(flag: &str, path: &PathBuf) -> Result<String, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s.trim_end_matches(['\r', '\n']).to_string()),
        Err(e) => err(format!("--{flag}={}: cannot read the file: {e}", path.display())),
    }
}

fn http_url(flag: &str, value: &str) -> Result<String, ConfigError> {
    match reqwest::Url::parse(value) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(value.to_string()),
        _ => err(format!(
            "--{flag}={value:?}: must be an absolute http:// or https:// URL"
        )),
    }
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most `max` characters (DNS-1123 label).
fn dns_label(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A DNS-1123 subdomain (ConfigMap names): dot-separated labels, at most 253 characters.
fn dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(|l| dns_label(l, 63))
}

/// The trust-bundle settings, when `--trust-bundle-configmap` is set.
fn trust_bundle_settings(a: &Args) -> Result<Option<TrustBundleSettings>, ConfigError> {
    let Some(configmap) = a.trust_bundle_configmap.as_deref().map(str::trim) else {
        return Ok(None);
    };
    if !dns_subdomain(configmap) {
        return err(format!(
            "--trust-bundle-configmap={configmap:?}: a ConfigMap name is a DNS-1123 subdomain \
             (lowercase letters, digits, '-' and '.', at most 253 characters)"
        ));
    }
    let sa = PathBuf::from(SERVICE_ACCOUNT_DIR);
    let namespace = match a.trust_bundle_namespace.as_deref().map(str::trim) {
        Some(ns) => ns.to_string(),
        None => match std::fs::read_to_string(sa.join("namespace")) {
            Ok(ns) => ns.trim().to_string(),
            Err(_) => {
                return err(format!(
                    "--trust-bundle-namespace is required: {}/namespace (the pod's namespace) is not readable",
                    SERVICE_ACCOUNT_DIR
                ));
            }
        },
    };
    if !dns_label(&namespace, 63) {
        return err(format!(
            "--trust-bundle-namespace={namespace:?}: a namespace is a DNS-1123 label (1-63 of [a-z0-9-])"
        ));
    }
    let key = a.trust_bundle_key.trim();
    let key_ok = !key.is_empty()
        && key.len() <= 253
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !key_ok {
        return err(format!(
            "--trust-bundle-key={key:?}: a ConfigMap key is 1-253 characters of [-._a-zA-Z0-9]"
        ));
    }
    if a.trust_bundle_max_staleness_seconds > 300 {
        return err(format!(
            "--trust-bundle-max-staleness-seconds={}: at most 300 (revoked keys stay usable that long \
             while the Kubernetes API is unreachable)",
            a.trust_bundle_max_staleness_seconds
        ));
    }
    let watch_seconds = positive("trust-bundle-watch-seconds", a.trust_bundle_watch_seconds)?;
    let url = match a.kube_api_url.as_deref().map(str::trim) {
        Some(u) => http_url("kube-api-url", u)?.trim_end_matches('/').to_string(),
        None => match (
            a.kubernetes_service_host.as_deref(),
            a.kubernetes_service_port.as_deref(),
        ) {
            (Some(host), Some(port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.to_string()
                };
                format!("https://{host}:{port}")
            }
            _ => {
                return err(
                    "--trust-bundle-configmap needs the Kubernetes API: run in a pod (KUBERNETES_SERVICE_HOST and \
                     KUBERNETES_SERVICE_PORT) or set --kube-api-url",
                );
            }
        },
    };
    let token_file = a.kube_token_file.clone().unwrap_or_else(|| sa.join("token"));
    if let Err(e) = std::fs::metadata(&token_file) {
        return err(format!(
            "--kube-token-file={}: cannot read the Kubernetes API token: {e} (is automountServiceAccountToken on?)",
            token_file.display()
        ));
    }
    let (ca_pem, ca_file) = if url.starts_with("https://") {
        let ca_file = a.kube_ca_file.clone().unwrap_or_else(|| sa.join("ca.crt"));
        let pem = std::fs::read(&ca_file)
            .map_err(|e| ConfigError(format!("--kube-ca-file={}: cannot read it: {e}", ca_file.display())))?;
        if !reqwest::Certificate::from_pem_bundle(&pem).is_ok_and(|certs| !certs.is_empty()) {
            return err(format!(
                "--kube-ca-file={}: not a PEM certificate bundle",
                ca_file.display()
            ));
        }
        (Some(pem), Some(ca_file))
    } else {
        (None, None)
    };
    Ok(Some(TrustBundleSettings {
        namespace,
        configmap: configmap.to_string(),
        key: key.to_string(),
        max_staleness: Duration::from_secs(a.trust_bundle_max_staleness_seconds),
        watch_timeout: Duration::from_secs(watch_seconds),
        watch_kill_switches: a.trust_bundle_watch_kill_switches,
        api: KubeApiSettings {
            url,
            token_file,
            ca_pem,
            ca_file,
        },
    }))
}

impl Settings {
    pub fn from_args(a: Args) -> Result<Settings, ConfigError> {
        let listen: SocketAddr = a.listen.parse().map_err(|_| {
            ConfigError(format!(
                "--listen={:?}: must be an address like 0.0.0.0:8080 or [::]:8080",
                a.listen
            ))
        })?;

        // Kafka.
        let bootstrap = match a.kafka_bootstrap.as_deref().map(str::trim) {
            Some(b) if !b.is_empty() => b.to_string(),
            _ => {
                return err(
                    "--kafka-bootstrap (FLEETWARD_GATEWAY_KAFKA_BOOTSTRAP) is required: host:port[,host:port...]",
                );
            }
        };
        for server in bootstrap.split(',') {
            let server = server.trim();
            let port_ok = server
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !port_ok {
                return err(format!("--kafka-bootstrap={bootstrap:?}: {server:?} is not host:port"));
            }
        }
        let password = match (&a.kafka_sasl_password, &a.kafka_sasl_password_file) {
            (Some(_), Some(_)) => {
                return err("--kafka-sasl-password and --kafka-sasl-password-file are exclusive: set one");
            }
            (Some(p), None) => Some(p.clone()),
            (None, Some(f)) => Some(read_secret_file("kafka-sasl-password-file", f)?),
            (None, None) => None,
        };
        let sasl = match (&a.kafka_sasl_username, password) {
            (Some(u), Some(p)) if !u.is_empty() && !p.is_empty() => Some((a.kafka_sasl_mechanism, u.clone(), p)),
            (Some(_), _) => {
                return err("--kafka-sasl-username needs a password (--kafka-sasl-password[-file])");
            }
            (None, Some(_)) => {
                return err("a Kafka SASL password is set without --kafka-sasl-username");
            }
            (None, None) => None,
        };
        let security_protocol = a.kafka_security_protocol.unwrap_or(if sasl.is_some() {
            SecurityProtocol::SaslPlaintext
        } else {
            SecurityProtocol::Plaintext
        });
        let needs_sasl = matches!(
            security_protocol,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        );
        if needs_sasl != sasl.is_some() {
            return err(format!(
                "--kafka-security-protocol={}: {}",
                security_protocol.as_librdkafka(),
                if needs_sasl {
                    "needs --kafka-sasl-username and a password"
                } else {
                    "does not use SASL; unset the SASL username"
                }
            ));
        }

        let topics = Topics {
            events: valid_topic("events-topic", &a.events_topic)?,
            control: valid_topic("control-topic", &a.control_topic)?,
            control_acks: valid_topic("control-acks-topic", &a.control_acks_topic)?,
            alerts: valid_topic("alerts-topic", &a.alerts_topic)?,
            // The prefix plus ".<ns>.<name>" must still be a valid topic; the prefix itself is checked here.
            requests_prefix: valid_topic("requests-topic-prefix", &a.requests_topic_prefix)?,
        };

        // Auth: at most one of these key sources, plus optionally the trust bundle.
        let mut sources = Vec::new();
        if let Some(s) = &a.jwt_hs256_secret {
            sources.push(KeySource::Hs256Secret(s.as_bytes().to_vec()));
        }
        if let Some(f) = &a.jwt_hs256_secret_file {
            sources.push(KeySource::Hs256Secret(
                read_secret_file("jwt-hs256-secret-file", f)?.into_bytes(),
            ));
        }
        if let Some(f) = &a.jwks_file {
            if !f.is_file() {
                return err(format!("--jwks-file={}: no such file", f.display()));
            }
            sources.push(KeySource::JwksFile(f.clone()));
        }
        if let Some(u) = &a.jwks_url {
            sources.push(KeySource::JwksUrl(http_url("jwks-url", u)?));
        }
        let trust_bundle = trust_bundle_settings(&a)?;
        if sources.len() > 1 || (sources.is_empty() && trust_bundle.is_none()) {
            return err(format!(
                "set exactly one token key source of --jwt-hs256-secret, --jwt-hs256-secret-file, --jwks-file, \
                 --jwks-url (found {}); --trust-bundle-configmap may be added to it or used alone",
                sources.len()
            ));
        }
        let keys = sources.pop();
        if let Some(KeySource::Hs256Secret(s)) = &keys
            && s.len() < MIN_HS256_SECRET_BYTES
        {
            return err(format!(
                "the HS256 secret is {} bytes; at least {MIN_HS256_SECRET_BYTES} are required",
                s.len()
            ));
        }
        let audience = match a.jwt_audience.as_deref() {
            Some(v) if !v.is_empty() => v.to_string(),
            _ => {
                return err("--jwt-audience (FLEETWARD_GATEWAY_JWT_AUDIENCE) is required: the expected `aud` claim");
            }
        };
        let issuer = match a.jwt_issuer.as_deref() {
            Some(v) if !v.is_empty() => v.to_string(),
            _ => {
                return err("--jwt-issuer (FLEETWARD_GATEWAY_JWT_ISSUER) is required: the expected `iss` claim");
            }
        };
        if a.jwt_leeway_seconds > MAX_LEEWAY_SECONDS {
            return err(format!(
                "--jwt-leeway-seconds={}: at most {MAX_LEEWAY_SECONDS} is allowed",
                a.jwt_leeway_seconds
            ));
        }
        if !(256..=65_536).contains(&a.max_token_bytes) {
            return err(format!("--max-token-bytes={}: allowed 256..=65536", a.max_token_bytes));
        }
        let auth = AuthSettings {
            keys,
            trust_bundle,
            jwks_refresh: Duration::from_secs(positive("jwks-refresh-seconds", a.jwks_refresh_seconds)?),
            audience,
            issuer,
            leeway_seconds: a.jwt_leeway_seconds,
            allow_query_token: a.allow_query_token,
            max_token_bytes: a.max_token_bytes,
        };

        let usize_min = |flag: &str, v: usize, min: usize| -> Result<usize, ConfigError> {
            if v < min {
                return err(format!("--{flag}={v}: must be at least {min}"));
            }
            Ok(v)
        };
        let limits = Limits {
            max_connections: usize_min("max-connections", a.max_connections, 1)?,
            outbound_queue: usize_min("outbound-queue", a.outbound_queue, 1)?,
            max_message_bytes: usize_min("max-message-bytes", a.max_message_bytes, 256)?,
            idle_ttl: (a.idle_ttl_seconds > 0).then(|| Duration::from_secs(a.idle_ttl_seconds)),
            ping_interval: Duration::from_secs(positive("ping-interval-seconds", a.ping_interval_seconds)?),
            history_per_session: usize_min("history-per-session", a.history_per_session, 1)?,
            max_sessions: usize_min("max-sessions", a.max_sessions, 1)?,
            session_retention: Duration::from_secs(positive("session-retention-seconds", a.session_retention_seconds)?),
            session_timeout: Duration::from_secs(positive("session-timeout-seconds", a.session_timeout_seconds)?),
            resume_timeout: Duration::from_secs(positive("resume-timeout-seconds", a.resume_timeout_seconds)?),
            resume_max_scan: positive("resume-max-scan", a.resume_max_scan)?,
            resume_concurrency: usize_min("resume-concurrency", a.resume_concurrency, 1)?,
            history_backfill: a.history_backfill,
            partition_refresh: Duration::from_secs(positive("partition-refresh-seconds", a.partition_refresh_seconds)?),
            shutdown_grace: Duration::from_secs(a.shutdown_grace_seconds),
        };

        let default_url = match &a.verify_default_url {
            Some(u) => Some(http_url("verify-default-url", u)?),
            None => None,
        };
        let allowed: Vec<String> = a
            .verify_allowed_url_prefixes
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        for p in &allowed {
            http_url("verify-allowed-url-prefixes", p)?;
        }
        if a.verify_group_id.trim().is_empty() {
            return err("--verify-group-id: must not be empty");
        }
        let verify = VerifySettings {
            default_url,
            default_delay: Duration::from_secs(a.verify_default_delay_seconds),
            timeout: Duration::from_secs(positive("verify-timeout-seconds", a.verify_timeout_seconds)?),
            allowed_url_prefixes: allowed,
            group_id: a.verify_group_id.clone(),
            max_pending: usize_min("verify-max-pending", a.verify_max_pending, 1)?,
        };

        let instance_id = match a.instance_id.as_deref().map(str::trim) {
            Some(id) if !id.is_empty() => id.to_string(),
            _ => gethostname::gethostname().to_string_lossy().into_owned(),
        };
        if instance_id.is_empty() || instance_id.len() > 253 {
            return err(format!("--instance-id={instance_id:?}: 1-253 characters"));
        }

        Ok(Settings {
            listen,
            kafka: KafkaSettings {
                bootstrap,
                security_protocol,
                sasl,
            },
            topics,
            auth,
            limits,
            verify,
            instance_id,
            log_format: a.log_format,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec![
            "fleetward-gateway",
            "--kafka-bootstrap",
            "127.0.0.1:9092",
            "--jwt-hs256-secret",
            "0123456789abcdef0123456789abcdef",
            "--jwt-audience",
            "fleetward-gateway",
            "--jwt-issuer",
            "https://idp.example",
            "--instance-id",
            "gw-0",
        ];
        v.extend_from_slice(extra);
        Args::try_parse_from(v).unwrap()
    }

    #[test]
    fn defaults_are_valid() {
        let s = Settings::from_args(args(&[])).unwrap();
        assert_eq!(s.topics.events, "fleetward.events");
        assert_eq!(s.topics.requests_for("ns1/router"), "fleetward.requests.ns1.router");
        assert_eq!(s.limits.outbound_queue, 256);
        assert_eq!(s.kafka.security_protocol, SecurityProtocol::Plaintext);
        assert!(!s.auth.allow_query_token);
    }

    #[test]
    fn leeway_above_30_is_refused() {
        let e = Settings::from_args(args(&["--jwt-leeway-seconds", "31"])).unwrap_err();
        assert!(e.0.contains("--jwt-leeway-seconds=31"), "{}", e.0);
    }

    #[test]
    fn two_key_sources_are_refused() {
        let e = Settings::from_args(args(&["--jwks-url", "https://idp.example/jwks"])).unwrap_err();
        assert!(e.0.contains("exactly one"), "{}", e.0);
    }

    #[test]
    fn short_secret_is_refused() {
        let mut a = args(&[]);
        a.jwt_hs256_secret = Some("short".into());
        let e = Settings::from_args(a).unwrap_err();
        assert!(e.0.contains("at least 32"), "{}", e.0);
    }

    #[test]
    fn bad_topic_and_bootstrap_are_named() {
        let e = Settings::from_args(args(&["--events-topic", "bad topic"])).unwrap_err();
        assert!(e.0.contains("--events-topic=\"bad topic\""), "{}", e.0);
        let mut a = args(&[]);
        a.kafka_bootstrap = Some("localhost".into());
        let e = Settings::from_args(a).unwrap_err();
        assert!(e.0.contains("not host:port"), "{}", e.0);
    }

    #[test]
    fn sasl_needs_both_parts_and_secrets_stay_out_of_debug() {
        let e = Settings::from_args(args(&["--kafka-sasl-username", "gw"])).unwrap_err();
        assert!(e.0.contains("needs a password"), "{}", e.0);
        let s = Settings::from_args(args(&[
            "--kafka-sasl-username",
            "gw",
            "--kafka-sasl-password",
            "hunter2-pw",
        ]))
        .unwrap();
        assert_eq!(s.kafka.security_protocol, SecurityProtocol::SaslPlaintext);
        let dbg = format!("{s:?}");
        assert!(
            !dbg.contains("hunter2-pw") && !dbg.contains("0123456789abcdef"),
            "{dbg}"
        );
    }

    const KUBE_CA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/kube-ca.crt");

    /// A token file for the Kubernetes API settings (its content is not read at start).
    fn token_file(name: &str) -> String {
        let p = std::env::temp_dir().join(format!("fleetward-gw-config-{name}-{}", std::process::id()));
        std::fs::write(&p, "token").unwrap();
        p.display().to_string()
    }

    fn bundle_args(token: &str) -> Vec<String> {
        [
            "--trust-bundle-configmap=fleetward-trust-bundle",
            "--trust-bundle-namespace=fleetward-system",
            "--kube-api-url=https://127.0.0.1:6443/",
            &format!("--kube-token-file={token}"),
            &format!("--kube-ca-file={KUBE_CA}"),
        ]
        .map(String::from)
        .to_vec()
    }

    /// `bundle_args` with `flags` (`--name=value`) replacing or adding to them (clap refuses repeats).
    fn bundle_with(token: &str, flags: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = bundle_args(token)
            .into_iter()
            .filter(|a| !flags.iter().any(|f| f.split('=').next() == a.split('=').next()))
            .collect();
        v.extend(flags.iter().map(|f| f.to_string()));
        v
    }

    fn with(extra: &[String]) -> Args {
        args(&extra.iter().map(String::as_str).collect::<Vec<_>>())
    }

    #[test]
    fn trust_bundle_combines_with_hs256_or_stands_alone() {
        let token = token_file("combine");
        let s = Settings::from_args(with(&bundle_args(&token))).unwrap();
        assert!(matches!(s.auth.keys, Some(KeySource::Hs256Secret(_))));
        let tb = s.auth.trust_bundle.as_ref().unwrap();
        assert_eq!(
            (
                tb.namespace.as_str(),
                tb.configmap.as_str(),
                tb.key.as_str(),
                tb.api.url.as_str()
            ),
            (
                "fleetward-system",
                "fleetward-trust-bundle",
                "jwks.json",
                "https://127.0.0.1:6443"
            )
        );
        assert!(tb.api.ca_pem.is_some());
        assert_eq!(tb.max_staleness, Duration::from_secs(10));
        assert!(tb.watch_kill_switches, "the kill-switch fast path is on by default");
        let dbg = format!("{s:?}");
        assert!(
            dbg.contains("configmap fleetward-system/fleetward-trust-bundle"),
            "{dbg}"
        );

        let mut alone = with(&bundle_args(&token));
        alone.jwt_hs256_secret = None;
        let s = Settings::from_args(alone).unwrap();
        assert!(s.auth.keys.is_none() && s.auth.trust_bundle.is_some());

        // Nothing at all is still refused.
        let mut none = args(&[]);
        none.jwt_hs256_secret = None;
        let e = Settings::from_args(none).unwrap_err();
        assert!(
            e.0.contains("exactly one") && e.0.contains("--trust-bundle-configmap"),
            "{}",
            e.0
        );
    }

    #[test]
    fn trust_bundle_kill_switch_watch_can_be_turned_off() {
        let token = token_file("killswitch");
        for (flag, want) in [("false", false), ("true", true)] {
            let a = with(&bundle_with(
                &token,
                &[&format!("--trust-bundle-watch-kill-switches={flag}")],
            ));
            let s = Settings::from_args(a).unwrap();
            assert_eq!(s.auth.trust_bundle.unwrap().watch_kill_switches, want);
        }
        assert!(Args::try_parse_from(["gw", "--trust-bundle-watch-kill-switches=maybe"]).is_err());
    }

    #[test]
    fn trust_bundle_finds_the_api_from_the_pod_environment() {
        let token = token_file("incluster");
        for (host, url) in [
            ("10.96.0.1", "https://10.96.0.1:443"),
            ("fd00::1", "https://[fd00::1]:443"),
        ] {
            let mut a = with(&bundle_args(&token));
            a.kube_api_url = None;
            a.kubernetes_service_host = Some(host.into());
            a.kubernetes_service_port = Some("443".into());
            let s = Settings::from_args(a).unwrap();
            assert_eq!(s.auth.trust_bundle.unwrap().api.url, url);
        }
        let mut a = with(&bundle_args(&token));
        a.kube_api_url = None;
        let e = Settings::from_args(a).unwrap_err();
        assert!(
            e.0.contains("KUBERNETES_SERVICE_HOST") && e.0.contains("--kube-api-url"),
            "{}",
            e.0
        );
    }

    #[test]
    fn trust_bundle_settings_errors_name_the_flag() {
        let token = token_file("errors");
        let cases: [(&str, &str); 7] = [
            (
                "--trust-bundle-configmap=Bad_Name",
                "--trust-bundle-configmap=\"Bad_Name\"",
            ),
            (
                "--trust-bundle-namespace=Not.A.Label",
                "--trust-bundle-namespace=\"Not.A.Label\"",
            ),
            ("--trust-bundle-key=a/b", "--trust-bundle-key=\"a/b\""),
            (
                "--trust-bundle-max-staleness-seconds=301",
                "--trust-bundle-max-staleness-seconds=301",
            ),
            (
                "--kube-token-file=/nonexistent/token",
                "--kube-token-file=/nonexistent/token",
            ),
            (
                "--kube-ca-file=/nonexistent/ca.crt",
                "--kube-ca-file=/nonexistent/ca.crt",
            ),
            ("--kube-api-url=ftp://api", "--kube-api-url=\"ftp://api\""),
        ];
        for (flag, want) in cases {
            let e = Settings::from_args(with(&bundle_with(&token, &[flag]))).unwrap_err();
            assert!(e.0.contains(want), "{flag}: {}", e.0);
        }
        // A CA file that is not PEM.
        let not_pem = format!("--kube-ca-file={token}");
        let e = Settings::from_args(with(&bundle_with(&token, &[&not_pem]))).unwrap_err();
        assert!(e.0.contains("not a PEM certificate bundle"), "{}", e.0);
        // A plain-HTTP API needs no CA.
        let extra = bundle_with(
            &token,
            &[
                "--kube-api-url=http://127.0.0.1:8001",
                "--kube-ca-file=/nonexistent/ca.crt",
            ],
        );
        let s = Settings::from_args(with(&extra)).unwrap();
        assert!(s.auth.trust_bundle.unwrap().api.ca_pem.is_none());
    }

    #[test]
    fn missing_audience_is_named() {
        let mut a = args(&[]);
        a.jwt_audience = None;
        let e = Settings::from_args(a).unwrap_err();
        assert!(e.0.contains("--jwt-audience"), "{}", e.0);
    }
}
