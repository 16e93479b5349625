//! Token checks at the handshake (SPEC §5.1): where the token comes from, which key verifies
//! it, which claims it must carry.
//!
//! Keys: an HS256 shared secret, or a JWKS (file or URL, refreshed) of RS256/ES256/EdDSA keys
//! where the header's `kid` picks the key and the key's type fixes the algorithm: a token
//! whose `alg` differs from its key's is refused (no algorithm confusion, no `none`). Header
//! fields naming keys elsewhere (`jku`, `x5u`, `jwk`, `x5c`) are ignored: keys come only from
//! the settings. Symmetric (`oct`) keys in a JWKS are ignored too.
//!
//! Beside either, the trust bundle (`trust_bundle`): agents' keys, watched through the
//! Kubernetes API. A `kid` found there is verified with that key only (the JWKS is not
//! consulted), and the token is bound to the key's agent: its `agent` claim must be that agent
//! (403 `agent_mismatch`) and its role `user` (403 `agent_role`: an agent's key, which lives in
//! the agent's pod, never speaks for a reviewer or an operator, so it cannot approve its own
//! actions).
//!
//! Nothing here logs or formats a token or any part of one: refusals carry fixed reason
//! codes, `Token`'s Debug prints `[redacted]`, and jsonwebtoken's errors (which can quote
//! decoded bytes) are mapped to those codes, never displayed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::http::{HeaderMap, StatusCode, header};
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::config::{AuthSettings, KeySource};
use crate::metrics::Metrics;
use crate::protocol::{Role, is_agent_ref, is_session_id};
use crate::trust_bundle::{Lookup, TrustBundle};

/// The subprotocol the server selects; browsers send the token beside it.
pub const SUBPROTOCOL: &str = "fleetward.v1";
pub const BEARER_SUBPROTOCOL_PREFIX: &str = "fleetward.bearer.";
/// Unknown-`kid` refreshes of a JWKS are at most this frequent.
const MIN_ON_DEMAND_REFRESH: Duration = Duration::from_secs(10);

/// A bearer token. Never printed: Debug shows `[redacted]` and there is no Display.
pub struct Token(String);

impl Token {
    pub fn new(s: impl Into<String>) -> Token {
        Token(s.into())
    }

    fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token([redacted])")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenVia {
    AuthorizationHeader,
    Subprotocol,
    Query,
}

/// Why a handshake is refused. `reason()` is a fixed code used in logs, metrics and the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    MissingToken,
    QueryTokenDisabled,
    Subprotocol,
    Oversized,
    Malformed,
    BadAlgorithm,
    UnknownKey,
    BadSignature,
    Expired,
    NotYetValid,
    BadAudience,
    BadIssuer,
    MissingClaim,
    BadClaim,
    KeysUnavailable,
    SessionMismatch,
    AgentHalted,
    /// A trust-bundle key signed a token whose `agent` is another agent.
    AgentMismatch,
    /// A trust-bundle key signed a token with a role other than `user`.
    AgentRole,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::SessionMismatch | Refusal::AgentHalted | Refusal::AgentMismatch | Refusal::AgentRole => {
                StatusCode::FORBIDDEN
            }
            Refusal::KeysUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Refusal::MissingToken => "missing_token",
            Refusal::QueryTokenDisabled => "query_token_disabled",
            Refusal::Subprotocol => "subprotocol",
            Refusal::Oversized => "oversized_token",
            Refusal::Malformed => "malformed_token",
            Refusal::BadAlgorithm => "bad_algorithm",
            Refusal::UnknownKey => "unknown_key",
            Refusal::BadSignature => "bad_signature",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::BadAudience => "bad_audience",
            Refusal::BadIssuer => "bad_issuer",
            Refusal::MissingClaim => "missing_claim",
            Refusal::BadClaim => "bad_claim",
            Refusal::KeysUnavailable => "keys_unavailable",
            Refusal::SessionMismatch => "session_mismatch",
            Refusal::AgentHalted => "agent_halted",
            Refusal::AgentMismatch => "agent_mismatch",
            Refusal::AgentRole => "agent_role",
        }
    }
}

/// A verified token's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub sub: String,
    pub sid: String,
    pub role: Role,
    pub agent: String,
    /// `exp` (a NumericDate: seconds since the epoch, possibly fractional) as a point in time.
    pub exp: SystemTime,
    /// The trust-bundle key that signed the token (None for HS256/JWKS tokens): the
    /// connection is closed when that key leaves the bundle.
    pub bundle_kid: Option<String>,
}

/// Where the token is: `Authorization: Bearer`, then the `fleetward.bearer.<jwt>` subprotocol,
/// then `?access_token=` (refused unless enabled; refused whenever present and disabled, so
/// clients do not learn to put tokens in URLs).
pub fn extract_token(
    headers: &HeaderMap,
    query_token: Option<&str>,
    allow_query: bool,
) -> Result<(Token, TokenVia), Refusal> {
    if query_token.is_some() && !allow_query {
        return Err(Refusal::QueryTokenDisabled);
    }
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.to_str().map_err(|_| Refusal::Malformed)?;
        let (scheme, rest) = v.split_once(' ').ok_or(Refusal::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") || rest.trim().is_empty() {
            return Err(Refusal::Malformed);
        }
        return Ok((Token::new(rest.trim()), TokenVia::AuthorizationHeader));
    }
    let mut offered_v1 = false;
    let mut bearer = None;
    for v in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        let v = v.to_str().map_err(|_| Refusal::Malformed)?;
        for item in v.split(',').map(str::trim) {
            if item == SUBPROTOCOL {
                offered_v1 = true;
            } else if let Some(t) = item.strip_prefix(BEARER_SUBPROTOCOL_PREFIX) {
                bearer = Some(t.to_string());
            }
        }
    }
    if let Some(t) = bearer {
        if !offered_v1 {
            return Err(Refusal::Subprotocol);
        }
        return Ok((Token::new(t), TokenVia::Subprotocol));
    }
    match query_token {
        Some(t) if !t.is_empty() => Ok((Token::new(t), TokenVia::Query)),
        _ => Err(Refusal::MissingToken),
    }
}

/// One verification key from a JWKS, with the only algorithm it accepts.
#[derive(Clone)]
pub struct VerifyKey {
    pub(crate) alg: Algorithm,
    pub(crate) key: DecodingKey,
}

/// A usable JWKS entry: the key, and the entry as published (the trust bundle reads its
/// `agent` member).
pub(crate) struct ParsedJwk {
    pub(crate) key: VerifyKey,
    pub(crate) raw: Value,
}

#[derive(Debug, Clone)]
enum JwksSource {
    File(PathBuf),
    Url(String),
}

/// JWKS keys by `kid`, replaced as a whole on each successful load (a key that leaves the set
/// is refused from that moment).
pub struct JwksStore {
    source: JwksSource,
    keys: RwLock<Arc<HashMap<String, VerifyKey>>>,
    loaded: AtomicBool,
    last_load: Mutex<Option<Instant>>,
    file_stamp: Mutex<Option<(SystemTime, u64)>>,
    http: reqwest::Client,
    metrics: Arc<Metrics>,
}

/// Parse a JWKS document into usable keys; unusable entries are skipped with a note.
pub(crate) fn parse_jwks(bytes: &[u8]) -> Result<(HashMap<String, ParsedJwk>, Vec<String>), String> {
    let doc: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let Some(list) = doc.get("keys").and_then(Value::as_array) else {
        return Err("no \"keys\" array".into());
    };
    let mut keys: HashMap<String, ParsedJwk> = HashMap::new();
    let mut duplicates = Vec::new();
    let mut notes = Vec::new();
    for (i, raw) in list.iter().enumerate() {
        let jwk: Jwk = match serde_json::from_value(raw.clone()) {
            Ok(j) => j,
            Err(e) => {
                notes.push(format!("keys[{i}]: skipped, not a supported JWK ({e})"));
                continue;
            }
        };
        let Some(kid) = jwk.common.key_id.clone().filter(|k| !k.is_empty()) else {
            notes.push(format!("keys[{i}]: skipped, no kid"));
            continue;
        };
        if let Some(u) = &jwk.common.public_key_use
            && *u != PublicKeyUse::Signature
        {
            notes.push(format!("keys[{i}] kid={kid}: skipped, use is not \"sig\""));
            continue;
        }
        let alg = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => Algorithm::EdDSA,
            _ => {
                notes.push(format!(
                    "keys[{i}] kid={kid}: skipped, only RSA, EC P-256 and Ed25519 keys are accepted"
                ));
                continue;
            }
        };
        if let Some(declared) = jwk.common.key_algorithm
            && declared.to_string() != format!("{alg:?}")
        {
            notes.push(format!(
                "keys[{i}] kid={kid}: skipped, alg {declared} does not fit the key type ({alg:?})"
            ));
            continue;
        }
        let key = match DecodingKey::from_jwk(&jwk) {
            Ok(k) => k,
            Err(_) => {
                notes.push(format!("keys[{i}] kid={kid}: skipped, bad key material"));
                continue;
            }
        };
        let parsed = ParsedJwk {
            key: VerifyKey { alg, key },
            raw: raw.clone(),
        };
        if keys.insert(kid.clone(), parsed).is_some() {
            duplicates.push(kid);
        }
    }
    // A kid that names two keys is ambiguous: neither is trusted.
    for kid in duplicates {
        keys.remove(&kid);
        notes.push(format!("kid={kid}: skipped, appears more than once"));
    }
    Ok((keys, notes))
}

impl JwksStore {
    fn new(source: JwksSource, metrics: Arc<Metrics>) -> JwksStore {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("HTTP client");
        JwksStore {
            source,
            keys: RwLock::new(Arc::new(HashMap::new())),
            loaded: AtomicBool::new(false),
            last_load: Mutex::new(None),
            file_stamp: Mutex::new(None),
            http,
            metrics,
        }
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    fn get(&self, kid: &str) -> Option<VerifyKey> {
        self.keys.read().expect("jwks lock").get(kid).cloned()
    }

    /// Load the JWKS now. A failed load keeps the previous keys (a transient outage of the
    /// JWKS URL must not lock everyone out) and reports the error.
    pub async fn load(&self) -> Result<usize, String> {
        *self.last_load.lock().expect("jwks lock") = Some(Instant::now());
        let bytes = match &self.source {
            JwksSource::File(path) => {
                let meta = tokio::fs::metadata(path)
                    .await
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let stamp = (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len());
                if self.is_loaded() && *self.file_stamp.lock().expect("jwks lock") == Some(stamp) {
                    return Ok(self.keys.read().expect("jwks lock").len());
                }
                let b = tokio::fs::read(path)
                    .await
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                *self.file_stamp.lock().expect("jwks lock") = Some(stamp);
                b
            }
            JwksSource::Url(url) => {
                let resp = self.http.get(url).send().await.map_err(|e| format!("GET {url}: {e}"))?;
                if !resp.status().is_success() {
                    return Err(format!("GET {url}: HTTP {}", resp.status()));
                }
                resp.bytes().await.map_err(|e| format!("GET {url}: {e}"))?.to_vec()
            }
        };
        let (keys, notes) = match parse_jwks(&bytes) {
            Ok(k) => k,
            Err(e) => {
                // The file may have changed mid-write: look again next time.
                *self.file_stamp.lock().expect("jwks lock") = None;
                self.metrics.jwks_refreshes.with_label_values(&["error"]).inc();
                return Err(format!("JWKS {:?}: {e}", self.source));
            }
        };
        for n in notes {
            tracing::warn!(source = ?self.source, "jwks: {n}");
        }
        let n = keys.len();
        let keys = keys.into_iter().map(|(kid, parsed)| (kid, parsed.key)).collect();
        *self.keys.write().expect("jwks lock") = Arc::new(keys);
        self.loaded.store(true, Ordering::Release);
        self.metrics.jwks_keys.set(n as i64);
        self.metrics.jwks_refreshes.with_label_values(&["ok"]).inc();
        Ok(n)
    }

    /// Reload when the last load is old enough (for an unknown `kid`); true when it reloaded.
    async fn load_on_demand(&self) -> bool {
        let due = self
            .last_load
            .lock()
            .expect("jwks lock")
            .is_none_or(|t| t.elapsed() >= MIN_ON_DEMAND_REFRESH);
        if !due {
            return false;
        }
        match self.load().await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "jwks: on-demand reload failed");
                false
            }
        }
    }

    /// Reload every `every` until `stop`.
    pub async fn refresh_loop(self: Arc<Self>, every: Duration, stop: tokio_util::sync::CancellationToken) {
        let mut failures = 0u32;
        loop {
            // Until the first success retry quickly; afterwards keep the configured pace.
            let wait = if self.is_loaded() {
                every
            } else {
                Duration::from_secs(1 << failures.min(5))
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            match self.load().await {
                Ok(_) => failures = 0,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "jwks: reload failed; keeping the previous keys");
                }
            }
        }
    }
}

pub struct Authenticator {
    hs256: Option<DecodingKey>,
    jwks: Option<Arc<JwksStore>>,
    bundle: Option<Arc<TrustBundle>>,
    audience: String,
    issuer: String,
    leeway: u64,
    pub allow_query_token: bool,
    max_token_bytes: usize,
}

/// Now, in seconds since the epoch (with the fraction).
fn now_secs_f64() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The highest NumericDate accepted: 9999-12-31T23:59:59Z. Anything later is not a time a
/// token means (and would overflow time arithmetic further on).
const MAX_NUMERIC_DATE: f64 = 253_402_300_799.0;

/// An RFC 7519 NumericDate: any finite JSON number from 0 to `MAX_NUMERIC_DATE`, integer or
/// not (PyJWT, for one, writes `time.time() + 300` as is). Strings, booleans, negative and
/// absurdly large numbers are refused.
fn numeric_date(v: &Value) -> Option<f64> {
    let n = match v {
        Value::Number(n) => n.as_f64()?,
        _ => return None,
    };
    (n.is_finite() && (0.0..=MAX_NUMERIC_DATE).contains(&n)).then_some(n)
}

/// Expired when `exp` + leeway is before now; not yet valid when `nbf` or `iat` is after now
/// + leeway. Exact for fractional times (exp 1000.5 is expired at 1000.7 without leeway).
fn check_times(exp: f64, nbf: Option<f64>, iat: Option<f64>, now: f64, leeway: u64) -> Result<(), Refusal> {
    let leeway = leeway as f64;
    if exp + leeway < now {
        return Err(Refusal::Expired);
    }
    if nbf.is_some_and(|nbf| nbf > now + leeway) || iat.is_some_and(|iat| iat > now + leeway) {
        return Err(Refusal::NotYetValid);
    }
    Ok(())
}

/// The `alg` of a token's header, read without trusting anything else in it.
fn header_alg(token: &str) -> Result<String, Refusal> {
    let head = token.split('.').next().ok_or(Refusal::Malformed)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head)
        .map_err(|_| Refusal::Malformed)?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| Refusal::Malformed)?;
    match v.get("alg") {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(Refusal::Malformed),
    }
}

impl Authenticator {
    pub fn new(settings: &AuthSettings, metrics: Arc<Metrics>) -> Authenticator {
        let (mut hs256, mut jwks) = (None, None);
        match &settings.keys {
            None => {}
            Some(KeySource::Hs256Secret(s)) => hs256 = Some(DecodingKey::from_secret(s)),
            Some(KeySource::JwksFile(p)) => {
                jwks = Some(Arc::new(JwksStore::new(JwksSource::File(p.clone()), metrics.clone())))
            }
            Some(KeySource::JwksUrl(u)) => {
                jwks = Some(Arc::new(JwksStore::new(JwksSource::Url(u.clone()), metrics.clone())))
            }
        }
        let bundle = settings
            .trust_bundle
            .as_ref()
            .map(|t| Arc::new(TrustBundle::new(t.max_staleness, metrics.clone())));
        Authenticator {
            hs256,
            jwks,
            bundle,
            audience: settings.audience.clone(),
            issuer: settings.issuer.clone(),
            leeway: settings.leeway_seconds,
            allow_query_token: settings.allow_query_token,
            max_token_bytes: settings.max_token_bytes,
        }
    }

    pub fn jwks(&self) -> Option<Arc<JwksStore>> {
        self.jwks.clone()
    }

    pub fn trust_bundle(&self) -> Option<Arc<TrustBundle>> {
        self.bundle.clone()
    }

    /// Whether keys are available (a JWKS and the trust bundle must have loaded once).
    pub fn ready(&self) -> bool {
        self.jwks.as_ref().is_none_or(|j| j.is_loaded()) && self.bundle.as_ref().is_none_or(|b| b.is_loaded())
    }

    /// Why keys are not available, for `/readyz`.
    pub fn problems(&self) -> Vec<&'static str> {
        let mut p = Vec::new();
        if self.jwks.as_ref().is_some_and(|j| !j.is_loaded()) {
            p.push("token keys (JWKS) not loaded");
        }
        if self.bundle.as_ref().is_some_and(|b| !b.is_loaded()) {
            p.push("trust bundle not loaded (Kubernetes API)");
        }
        p
    }

    /// Whether a connection authenticated with this identity may stay open: false once the
    /// trust-bundle key that signed its token has left the bundle.
    pub fn still_trusted(&self, id: &Identity) -> bool {
        match (&id.bundle_kid, &self.bundle) {
            (None, _) => true,
            (Some(kid), Some(b)) => b.contains(kid),
            (Some(_), None) => false,
        }
    }

    /// The key for an asymmetric token's `kid`, and the agent it is bound to (trust-bundle
    /// keys only). The bundle is asked first: a kid it holds is verified with its key only.
    async fn asymmetric_key(&self, kid: &str) -> Result<(VerifyKey, Option<String>), Refusal> {
        let mut bundle_unavailable = false;
        if let Some(bundle) = &self.bundle {
            match bundle.lookup(kid) {
                Lookup::Found(k) => return Ok((k.verify, Some(k.agent))),
                Lookup::NotInBundle => {}
                Lookup::Unavailable => bundle_unavailable = true,
            }
        }
        let unknown = if bundle_unavailable {
            Refusal::KeysUnavailable
        } else {
            Refusal::UnknownKey
        };
        let Some(store) = &self.jwks else {
            return Err(unknown);
        };
        if !store.is_loaded() {
            return Err(Refusal::KeysUnavailable);
        }
        let found = match store.get(kid) {
            Some(k) => Some(k),
            None if store.load_on_demand().await => store.get(kid),
            None => None,
        };
        found.map(|k| (k, None)).ok_or(unknown)
    }

    /// Verify `token` for the session in the path. Halts are checked by the caller.
    pub async fn verify(&self, token: &Token, path_session: &str) -> Result<Identity, Refusal> {
        let token = token.as_str();
        if token.len() > self.max_token_bytes {
            return Err(Refusal::Oversized);
        }
        if token.split('.').count() != 3 {
            return Err(Refusal::Malformed);
        }
        let alg = header_alg(token)?;
        let asymmetric = self.jwks.is_some() || self.bundle.is_some();
        let (alg, key, bound) = match (alg.as_str(), &self.hs256) {
            ("HS256", Some(secret)) => (Algorithm::HS256, secret.clone(), None),
            ("RS256" | "ES256" | "EdDSA", _) if asymmetric => {
                let header = jsonwebtoken::decode_header(token).map_err(|_| Refusal::Malformed)?;
                let kid = header.kid.ok_or(Refusal::UnknownKey)?;
                let (vk, agent) = self.asymmetric_key(&kid).await?;
                // The key fixes the algorithm: RS256 for RSA, ES256 for P-256, EdDSA for Ed25519.
                if format!("{:?}", vk.alg) != alg {
                    return Err(Refusal::BadAlgorithm);
                }
                (vk.alg, vk.key, agent.map(|a| (kid, a)))
            }
            _ => return Err(Refusal::BadAlgorithm),
        };
        let mut v = Validation::new(alg);
        v.leeway = self.leeway;
        // jsonwebtoken rounds fractional times to whole seconds: its exp check (more lenient
        // than exact) stays as a first filter; `claims` checks exp, nbf and iat exactly.
        v.validate_exp = true;
        v.validate_nbf = false;
        v.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        v.set_audience(&[&self.audience]);
        v.set_issuer(&[&self.issuer]);
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &v).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => Refusal::Expired,
            ErrorKind::ImmatureSignature => Refusal::NotYetValid,
            ErrorKind::InvalidAudience => Refusal::BadAudience,
            ErrorKind::InvalidIssuer => Refusal::BadIssuer,
            ErrorKind::MissingRequiredClaim(_) => Refusal::MissingClaim,
            ErrorKind::InvalidClaimFormat(_) => Refusal::BadClaim,
            ErrorKind::InvalidSignature => Refusal::BadSignature,
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidKeyFormat | ErrorKind::UnsupportedAlgorithm => {
                Refusal::BadAlgorithm
            }
            _ => Refusal::Malformed,
        })?;
        let mut id = self.claims(&data.claims, path_session)?;
        if let Some((kid, agent)) = bound {
            // An agent's key speaks only for its agent, and only as a user.
            if id.agent != agent {
                return Err(Refusal::AgentMismatch);
            }
            if id.role != Role::User {
                return Err(Refusal::AgentRole);
            }
            id.bundle_kid = Some(kid);
        }
        Ok(id)
    }

    fn claims(&self, c: &Map<String, Value>, path_session: &str) -> Result<Identity, Refusal> {
        let string = |name: &str| -> Result<String, Refusal> {
            match c.get(name) {
                None | Some(Value::Null) => Err(Refusal::MissingClaim),
                Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => Ok(s.clone()),
                Some(_) => Err(Refusal::BadClaim),
            }
        };
        // Times first (as jsonwebtoken would), compared exactly: fractions count.
        let time = |name: &str| -> Result<Option<f64>, Refusal> {
            match c.get(name) {
                None => Ok(None),
                Some(v) => numeric_date(v).map(Some).ok_or(Refusal::BadClaim),
            }
        };
        let exp = time("exp")?.ok_or(Refusal::MissingClaim)?;
        let nbf = time("nbf")?;
        let iat = time("iat")?;
        check_times(exp, nbf, iat, now_secs_f64(), self.leeway)?;
        // jsonwebtoken takes an `iss` array when any element matches; RFC 7519 makes it one
        // string, so an array (a token minted for several issuers at once) is refused.
        if !matches!(c.get("iss"), Some(Value::String(_))) {
            return Err(Refusal::BadIssuer);
        }
        let sub = string("sub")?;
        let sid = string("sid")?;
        let role = Role::parse(&string("role")?).ok_or(Refusal::BadClaim)?;
        let agent = string("agent")?;
        if !is_agent_ref(&agent) || !is_session_id(&sid) {
            return Err(Refusal::BadClaim);
        }
        if sid != path_session {
            return Err(Refusal::SessionMismatch);
        }
        Ok(Identity {
            sub,
            sid,
            role,
            agent,
            exp: SystemTime::UNIX_EPOCH + Duration::from_secs_f64(exp),
            bundle_kid: None,
        })
    }

    /// Seconds after `exp` a connection may stay open (the same leeway as at the handshake).
    pub fn leeway(&self) -> u64 {
        self.leeway
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::AuthSettings;
    use axum::http::HeaderValue;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    pub(crate) fn now_secs() -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    pub const SECRET: &str = "test-secret-0123456789-abcdefghij-klmnop";
    const RSA: &str = include_str!("../tests/keys/rsa.pem");
    const RSA_ATTACKER: &str = include_str!("../tests/keys/rsa-attacker.pem");
    const RSA_PUB: &str = include_str!("../tests/keys/rsa.pub.pem");
    const EC: &str = include_str!("../tests/keys/ec.pem");
    const ED: &str = include_str!("../tests/keys/ed25519.pem");

    fn settings(keys: KeySource) -> AuthSettings {
        AuthSettings {
            keys: Some(keys),
            trust_bundle: None,
            jwks_refresh: Duration::from_secs(30),
            audience: "fleetward-gateway".into(),
            issuer: "https://idp.test".into(),
            leeway_seconds: 5,
            allow_query_token: false,
            max_token_bytes: 8192,
        }
    }

    pub fn claims(sid: &str, role: &str) -> Value {
        let now = now_secs();
        json!({"sub": "alice", "sid": sid, "role": role, "agent": "support/router",
               "exp": now + 300, "iat": now, "aud": "fleetward-gateway", "iss": "https://idp.test"})
    }

    pub fn hs(claims: &Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn hs_auth() -> Authenticator {
        Authenticator::new(
            &settings(KeySource::Hs256Secret(SECRET.as_bytes().to_vec())),
            Arc::new(Metrics::new()),
        )
    }

    fn jwk_of(key: &EncodingKey, alg: Algorithm, kid: &str) -> Value {
        let mut jwk = Jwk::from_encoding_key(key, alg).unwrap();
        jwk.common.key_id = Some(kid.into());
        serde_json::to_value(jwk).unwrap()
    }

    fn rsa_key() -> EncodingKey {
        EncodingKey::from_rsa_pem(RSA.as_bytes()).unwrap()
    }

    /// A JWKS file with one RSA, one EC and one Ed25519 key; returns the authenticator.
    async fn jwks_auth(dir: &std::path::Path) -> (Authenticator, PathBuf) {
        let ec = EncodingKey::from_ec_pem(EC.as_bytes()).unwrap();
        let ed = EncodingKey::from_ed_pem(ED.as_bytes()).unwrap();
        let doc = json!({"keys": [
            jwk_of(&rsa_key(), Algorithm::RS256, "rsa-1"),
            jwk_of(&ec, Algorithm::ES256, "ec-1"),
            jwk_of(&ed, Algorithm::EdDSA, "ed-1"),
            {"kty": "oct", "k": "c2VjcmV0", "kid": "oct-1"},
        ]});
        let path = dir.join("jwks.json");
        std::fs::write(&path, doc.to_string()).unwrap();
        let a = Authenticator::new(&settings(KeySource::JwksFile(path.clone())), Arc::new(Metrics::new()));
        assert_eq!(a.jwks().unwrap().load().await.unwrap(), 3);
        (a, path)
    }

    fn signed(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &Value) -> String {
        let mut h = Header::new(alg);
        h.kid = Some(kid.into());
        encode(&h, claims, key).unwrap()
    }

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fleetward-gw-auth-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn b64(v: &Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[tokio::test]
    async fn hs256_valid_token_passes() {
        let id = hs_auth()
            .verify(&Token::new(hs(&claims("s-1", "reviewer"))), "s-1")
            .await
            .unwrap();
        assert_eq!(
            (id.sub.as_str(), id.role, id.agent.as_str()),
            ("alice", Role::Reviewer, "support/router")
        );
    }

    #[tokio::test]
    async fn fractional_numeric_dates() {
        let a = hs_auth();
        let now = now_secs_f64();
        // As PyJWT mints them: {"exp": time.time() + 300, "iat": time.time()}.
        let mut c = claims("s-1", "user");
        c["exp"] = json!(now + 300.25);
        c["iat"] = json!(now - 0.5);
        c["nbf"] = json!(now - 1.75);
        let id = a.verify(&Token::new(hs(&c)), "s-1").await.unwrap();
        let exp = id.exp.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!((exp - (now + 300.25)).abs() < 0.001, "{exp}");
        // Fractions within the leeway still pass (leeway 5).
        c["iat"] = json!(now + 4.5);
        c["nbf"] = json!(now + 4.5);
        a.verify(&Token::new(hs(&c)), "s-1").await.unwrap();
        // A float exp in the past.
        c = claims("s-1", "user");
        c["exp"] = json!(now - 60.5);
        assert_eq!(a.verify(&Token::new(hs(&c)), "s-1").await, Err(Refusal::Expired));
        // Half a second past exp without leeway is expired (jsonwebtoken alone would round it up).
        let mut s = settings(KeySource::Hs256Secret(SECRET.as_bytes().to_vec()));
        s.leeway_seconds = 0;
        let strict = Authenticator::new(&s, Arc::new(Metrics::new()));
        c["exp"] = json!(now - 0.5);
        assert_eq!(strict.verify(&Token::new(hs(&c)), "s-1").await, Err(Refusal::Expired));
        c["exp"] = json!(now + 60.5);
        c["nbf"] = json!(now + 30.5);
        assert_eq!(
            strict.verify(&Token::new(hs(&c)), "s-1").await,
            Err(Refusal::NotYetValid)
        );
        // Not NumericDates: the reasons are unchanged (jsonwebtoken counts an `exp` it cannot
        // read as no `exp`; our own checks call the rest a bad claim).
        for (name, bad, want) in [
            ("string exp", json!("tomorrow"), Refusal::MissingClaim),
            (
                "numeric string exp",
                json!((now + 300.0).to_string()),
                Refusal::MissingClaim,
            ),
            ("boolean exp", json!(true), Refusal::MissingClaim),
            ("negative exp", json!(-1.5), Refusal::MissingClaim),
            ("huge float exp", json!(1e30), Refusal::MissingClaim),
            ("absurd exp", json!(1e18), Refusal::BadClaim),
            ("absurd integer exp", json!(u64::MAX), Refusal::BadClaim),
        ] {
            let mut c = claims("s-1", "user");
            c["exp"] = bad;
            assert_eq!(a.verify(&Token::new(hs(&c)), "s-1").await, Err(want), "{name}");
        }
        for claim in ["iat", "nbf"] {
            for bad in [json!("1700000000"), json!(-1), json!(-0.5), json!(false), json!(1e30)] {
                let mut c = claims("s-1", "user");
                c[claim] = bad.clone();
                assert_eq!(
                    a.verify(&Token::new(hs(&c)), "s-1").await,
                    Err(Refusal::BadClaim),
                    "{claim} {bad}"
                );
            }
        }
    }

    #[test]
    fn time_checks_are_exact_for_fractions() {
        assert_eq!(check_times(1000.5, None, None, 1000.7, 0), Err(Refusal::Expired));
        assert_eq!(check_times(1000.5, None, None, 1000.5, 0), Ok(()));
        assert_eq!(check_times(1000.5, None, None, 1000.25, 0), Ok(()));
        assert_eq!(check_times(1000.5, None, None, 1005.25, 5), Ok(()));
        assert_eq!(check_times(1000.5, None, None, 1005.75, 5), Err(Refusal::Expired));
        assert_eq!(
            check_times(2000.0, Some(1000.5), None, 1000.25, 0),
            Err(Refusal::NotYetValid)
        );
        assert_eq!(check_times(2000.0, Some(1000.5), None, 1000.5, 0), Ok(()));
        assert_eq!(
            check_times(2000.0, None, Some(1005.5), 1000.25, 5),
            Err(Refusal::NotYetValid)
        );
        assert_eq!(check_times(2000.0, None, Some(1005.5), 1000.75, 5), Ok(()));
        assert_eq!(numeric_date(&json!(1000.5)), Some(1000.5));
        assert_eq!(numeric_date(&json!(1000)), Some(1000.0));
        for bad in [
            json!("1000"),
            json!(-1),
            json!(-0.001),
            json!(true),
            json!(null),
            json!(1e300),
        ] {
            assert_eq!(numeric_date(&bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn adversarial_hs256_suite() {
        let a = hs_auth();
        let now = now_secs();
        let check = |name: &'static str, token: String, want: Refusal| {
            let a = &a;
            async move {
                let got = a.verify(&Token::new(token), "s-1").await;
                assert_eq!(got, Err(want), "{name}");
            }
        };
        // alg none, unsigned.
        let none = format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&claims("s-1", "user"))
        );
        check("alg none", none, Refusal::BadAlgorithm).await;
        let none_sig = format!("{}.{}.xx", b64(&json!({"alg": "none"})), b64(&claims("s-1", "user")));
        check("alg none with junk signature", none_sig, Refusal::BadAlgorithm).await;
        // Wrong key.
        let wrong = encode(
            &Header::new(Algorithm::HS256),
            &claims("s-1", "user"),
            &EncodingKey::from_secret(b"another-secret-another-secret-xx"),
        )
        .unwrap();
        check("wrong key", wrong, Refusal::BadSignature).await;
        // A tampered payload keeps the old signature.
        let good = hs(&claims("s-1", "user"));
        let parts: Vec<&str> = good.split('.').collect();
        let tampered = format!("{}.{}.{}", parts[0], b64(&claims("s-1", "operator")), parts[2]);
        check("tampered payload", tampered, Refusal::BadSignature).await;
        // Times.
        let mut c = claims("s-1", "user");
        c["exp"] = json!(now - 60);
        check("expired", hs(&c), Refusal::Expired).await;
        c = claims("s-1", "user");
        c["nbf"] = json!(now + 120);
        check("not yet valid", hs(&c), Refusal::NotYetValid).await;
        c = claims("s-1", "user");
        c["iat"] = json!(now + 120);
        check("issued in the future", hs(&c), Refusal::NotYetValid).await;
        // Audience, issuer.
        c = claims("s-1", "user");
        c["aud"] = json!("someone-else");
        check("wrong aud", hs(&c), Refusal::BadAudience).await;
        c = claims("s-1", "user");
        c["iss"] = json!("https://evil.test");
        check("wrong iss", hs(&c), Refusal::BadIssuer).await;
        c = claims("s-1", "user");
        c["iss"] = json!(["https://evil.test", "https://idp.test"]);
        check("iss as a list with ours in it", hs(&c), Refusal::BadIssuer).await;
        // Every required claim, missing.
        for claim in ["sub", "sid", "role", "agent", "exp", "aud", "iss"] {
            let mut c = claims("s-1", "user");
            c.as_object_mut().unwrap().remove(claim);
            let got = a.verify(&Token::new(hs(&c)), "s-1").await;
            assert_eq!(got, Err(Refusal::MissingClaim), "missing {claim}");
        }
        // Bad claim values.
        c = claims("s-1", "admin");
        check("unknown role", hs(&c), Refusal::BadClaim).await;
        c = claims("s-1", "user");
        c["agent"] = json!("router");
        check("agent without namespace", hs(&c), Refusal::BadClaim).await;
        c = claims("s-1", "user");
        c["exp"] = json!("tomorrow");
        // jsonwebtoken counts an `exp` that is not a number as no `exp` at all.
        check("exp not a number", hs(&c), Refusal::MissingClaim).await;
        // Session mismatch is a 403.
        check("other session", hs(&claims("s-2", "user")), Refusal::SessionMismatch).await;
        assert_eq!(Refusal::SessionMismatch.status(), StatusCode::FORBIDDEN);
        // Algorithm confusion: an RS256 token (or HS512) against the HS256 gateway.
        check(
            "RS256 to HS256 gateway",
            signed(Algorithm::RS256, "rsa-1", &rsa_key(), &claims("s-1", "user")),
            Refusal::BadAlgorithm,
        )
        .await;
        let hs512 = encode(
            &Header::new(Algorithm::HS512),
            &claims("s-1", "user"),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        check("HS512", hs512, Refusal::BadAlgorithm).await;
        // Oversized and malformed.
        check(
            "oversized",
            format!("{}.{}.{}", "a".repeat(5000), "b".repeat(5000), "c"),
            Refusal::Oversized,
        )
        .await;
        check("garbage", "not-a-jwt".into(), Refusal::Malformed).await;
        check("two parts", "a.b".into(), Refusal::Malformed).await;
    }

    #[tokio::test]
    async fn jwks_accepts_each_algorithm_by_kid() {
        let dir = tempdir("algs");
        let (a, _) = jwks_auth(&dir).await;
        let ec = EncodingKey::from_ec_pem(EC.as_bytes()).unwrap();
        let ed = EncodingKey::from_ed_pem(ED.as_bytes()).unwrap();
        for (alg, kid, key) in [
            (Algorithm::RS256, "rsa-1", rsa_key()),
            (Algorithm::ES256, "ec-1", ec),
            (Algorithm::EdDSA, "ed-1", ed),
        ] {
            let t = signed(alg, kid, &key, &claims("s-1", "user"));
            assert!(a.verify(&Token::new(t), "s-1").await.is_ok(), "{alg:?}");
        }
    }

    #[tokio::test]
    async fn adversarial_jwks_suite() {
        let dir = tempdir("adv");
        let (a, path) = jwks_auth(&dir).await;
        let c = claims("s-1", "operator");
        let verify = |t: String| {
            let a = &a;
            async move { a.verify(&Token::new(t), "s-1").await }
        };
        // Wrong key under a trusted kid.
        let attacker = EncodingKey::from_rsa_pem(RSA_ATTACKER.as_bytes()).unwrap();
        assert_eq!(
            verify(signed(Algorithm::RS256, "rsa-1", &attacker, &c)).await,
            Err(Refusal::BadSignature)
        );
        // Unknown kid, no kid.
        assert_eq!(
            verify(signed(Algorithm::RS256, "rsa-9", &rsa_key(), &c)).await,
            Err(Refusal::UnknownKey)
        );
        assert_eq!(
            verify(encode(&Header::new(Algorithm::RS256), &c, &rsa_key()).unwrap()).await,
            Err(Refusal::UnknownKey)
        );
        // Algorithm confusion: HS256 signed with the RSA public key as the secret.
        let confused = signed(
            Algorithm::HS256,
            "rsa-1",
            &EncodingKey::from_secret(RSA_PUB.as_bytes()),
            &c,
        );
        assert_eq!(verify(confused).await, Err(Refusal::BadAlgorithm));
        // An `oct` key in the JWKS is never used, even when the token names it.
        let oct = signed(Algorithm::HS256, "oct-1", &EncodingKey::from_secret(b"secret"), &c);
        assert_eq!(verify(oct).await, Err(Refusal::BadAlgorithm));
        // A key of one type used with another algorithm (EdDSA header, EC key id).
        let ed = EncodingKey::from_ed_pem(ED.as_bytes()).unwrap();
        assert_eq!(
            verify(signed(Algorithm::EdDSA, "ec-1", &ed, &c)).await,
            Err(Refusal::BadAlgorithm)
        );
        // An embedded `jwk` header naming the attacker's key is not followed.
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some("rsa-1".into());
        h.jwk = Some(Jwk::from_encoding_key(&attacker, Algorithm::RS256).unwrap());
        h.jku = Some("https://evil.test/jwks".into());
        assert_eq!(
            verify(encode(&h, &c, &attacker).unwrap()).await,
            Err(Refusal::BadSignature)
        );
        // Revocation: the key leaves the file, tokens signed by it are refused after the reload.
        let good = signed(Algorithm::RS256, "rsa-1", &rsa_key(), &c);
        assert!(verify(good.clone()).await.is_ok());
        std::fs::write(&path, json!({"keys": []}).to_string()).unwrap();
        a.jwks().unwrap().load().await.unwrap();
        assert_eq!(verify(good).await, Err(Refusal::UnknownKey));
    }

    #[test]
    fn token_extraction() {
        let mut h = HeaderMap::new();
        assert_eq!(extract_token(&h, None, false).unwrap_err(), Refusal::MissingToken);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer abc.def.ghi"));
        let (t, via) = extract_token(&h, None, false).unwrap();
        assert_eq!((t.as_str(), via), ("abc.def.ghi", TokenVia::AuthorizationHeader));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(extract_token(&h, None, false).unwrap_err(), Refusal::Malformed);

        let mut h = HeaderMap::new();
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("fleetward.v1, fleetward.bearer.abc.def.ghi"),
        );
        let (t, via) = extract_token(&h, None, false).unwrap();
        assert_eq!((t.as_str(), via), ("abc.def.ghi", TokenVia::Subprotocol));
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("fleetward.bearer.abc.def.ghi"),
        );
        assert_eq!(extract_token(&h, None, false).unwrap_err(), Refusal::Subprotocol);

        let h = HeaderMap::new();
        assert_eq!(
            extract_token(&h, Some("abc.def.ghi"), false).unwrap_err(),
            Refusal::QueryTokenDisabled
        );
        assert_eq!(extract_token(&h, Some("abc.def.ghi"), true).unwrap().1, TokenVia::Query);
    }

    #[test]
    fn token_debug_is_redacted() {
        let t = Token::new("eyJhbGciOi.secret.part");
        assert_eq!(format!("{t:?}"), "Token([redacted])");
    }

    #[test]
    fn jwks_parse_skips_duplicates_and_declared_alg_mismatch() {
        let rsa = jwk_of(&rsa_key(), Algorithm::RS256, "dup");
        let mut mismatched = jwk_of(&rsa_key(), Algorithm::RS256, "m");
        mismatched["alg"] = json!("ES256");
        let doc = json!({"keys": [rsa.clone(), rsa, mismatched]});
        let (keys, notes) = parse_jwks(doc.to_string().as_bytes()).unwrap();
        assert!(keys.is_empty(), "{notes:?}");
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(parse_jwks(b"{}").is_err());
    }

    /// An authenticator with the HS256 secret and a trust bundle (fed directly, no API server).
    fn bundle_auth(hs256: bool) -> Authenticator {
        use crate::config::{KubeApiSettings, TrustBundleSettings};
        let mut s = settings(KeySource::Hs256Secret(SECRET.as_bytes().to_vec()));
        if !hs256 {
            s.keys = None;
        }
        s.trust_bundle = Some(TrustBundleSettings {
            namespace: "fleetward-system".into(),
            configmap: "fleetward-trust-bundle".into(),
            key: "jwks.json".into(),
            max_staleness: Duration::from_secs(10),
            watch_timeout: Duration::from_secs(300),
            watch_kill_switches: true,
            api: KubeApiSettings {
                url: "https://127.0.0.1:6443".into(),
                token_file: "/dev/null".into(),
                ca_pem: None,
                ca_file: None,
            },
        });
        Authenticator::new(&s, Arc::new(Metrics::new()))
    }

    fn agent_claims(agent: &str) -> Value {
        let mut c = claims("s-1", "user");
        c["agent"] = json!(agent);
        c
    }

    #[tokio::test]
    async fn trust_bundle_key_speaks_only_for_its_agent_as_a_user() {
        use crate::trust_bundle::tests::{bundle_of, ed_key, entry};
        let a = bundle_auth(true);
        let verify = |t: String| {
            let a = &a;
            async move { a.verify(&Token::new(t), "s-1").await }
        };
        let ed = ed_key();
        let kid = "support.router.0011223344556677";
        let token = signed(Algorithm::EdDSA, kid, &ed, &agent_claims("support/router"));
        // Not listed yet: agent tokens wait (503), users' HS256 tokens pass, readiness waits.
        assert_eq!(verify(token.clone()).await, Err(Refusal::KeysUnavailable));
        assert!(verify(hs(&claims("s-1", "user"))).await.is_ok());
        assert!(!a.ready() && a.problems() == ["trust bundle not loaded (Kubernetes API)"]);

        let bundle = a.trust_bundle().unwrap();
        bundle.replace(bundle_of(&[entry(kid, "support/router")]));
        assert!(a.ready());
        let id = verify(token.clone()).await.unwrap();
        assert_eq!(id.agent, "support/router");
        assert_eq!(id.bundle_kid.as_deref(), Some(kid));
        assert!(a.still_trusted(&id));

        // Another agent's name, or a reviewer/operator role: refused (403).
        let other = signed(Algorithm::EdDSA, kid, &ed, &agent_claims("billing/refunds"));
        assert_eq!(verify(other).await, Err(Refusal::AgentMismatch));
        assert_eq!(Refusal::AgentMismatch.status(), StatusCode::FORBIDDEN);
        for role in ["reviewer", "operator"] {
            let mut c = agent_claims("support/router");
            c["role"] = json!(role);
            assert_eq!(
                verify(signed(Algorithm::EdDSA, kid, &ed, &c)).await,
                Err(Refusal::AgentRole),
                "{role}"
            );
        }
        // The usual claims are still required and checked.
        for claim in ["aud", "iss", "exp", "sid", "sub"] {
            let mut c = agent_claims("support/router");
            c.as_object_mut().unwrap().remove(claim);
            assert_eq!(
                verify(signed(Algorithm::EdDSA, kid, &ed, &c)).await,
                Err(Refusal::MissingClaim),
                "{claim}"
            );
        }
        let mut c = agent_claims("support/router");
        c["aud"] = json!("someone-else");
        assert_eq!(
            verify(signed(Algorithm::EdDSA, kid, &ed, &c)).await,
            Err(Refusal::BadAudience)
        );
        // A bundle kid with another key's signature, or another algorithm.
        let ec = EncodingKey::from_ec_pem(EC.as_bytes()).unwrap();
        assert_eq!(
            verify(signed(Algorithm::ES256, kid, &ec, &agent_claims("support/router"))).await,
            Err(Refusal::BadAlgorithm)
        );
        let forged = signed(Algorithm::EdDSA, kid, &ed, &agent_claims("support/router"));
        let parts: Vec<&str> = forged.split('.').collect();
        let mut evil = agent_claims("support/router");
        evil["sub"] = json!("mallory");
        let tampered = format!("{}.{}.{}", parts[0], b64(&evil), parts[2]);
        assert_eq!(verify(tampered).await, Err(Refusal::BadSignature));
        // A kid the bundle does not hold.
        let unknown = signed(
            Algorithm::EdDSA,
            "support.router.ffff",
            &ed,
            &agent_claims("support/router"),
        );
        assert_eq!(verify(unknown).await, Err(Refusal::UnknownKey));

        // Removal: the same unexpired token is refused, and its connection no longer trusted.
        let (_, removed) = bundle.replace(bundle_of(&[entry("support.router.8899", "support/router")]));
        assert!(removed.contains(kid));
        assert_eq!(verify(token).await, Err(Refusal::UnknownKey));
        assert!(!a.still_trusted(&id));
        // HS256 identities are never bundle-bound.
        let user = verify(hs(&claims("s-1", "reviewer"))).await.unwrap();
        assert!(user.bundle_kid.is_none() && a.still_trusted(&user));
    }

    #[tokio::test]
    async fn trust_bundle_alone_refuses_hs256() {
        use crate::trust_bundle::tests::{bundle_of, entry};
        let a = bundle_auth(false);
        a.trust_bundle()
            .unwrap()
            .replace(bundle_of(&[entry("ns1.a.1", "ns1/a")]));
        assert_eq!(
            a.verify(&Token::new(hs(&claims("s-1", "user"))), "s-1").await,
            Err(Refusal::BadAlgorithm)
        );
    }

    #[tokio::test]
    async fn trust_bundle_shape_is_accepted() {
        // The trust bundle's JWKS (common.md) carries an extra "agent" member per key.
        let ed = EncodingKey::from_ed_pem(ED.as_bytes()).unwrap();
        let mut k = jwk_of(&ed, Algorithm::EdDSA, "agent-key-1");
        k["agent"] = json!("support/router");
        k["use"] = json!("sig");
        let (keys, notes) = parse_jwks(json!({"keys": [k]}).to_string().as_bytes()).unwrap();
        assert_eq!(keys.len(), 1, "{notes:?}");
    }
}
