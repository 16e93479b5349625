//! The trust bundle as a token key source (SPEC §3, §7): the JWKS of every active agent's
//! public key that the operator publishes in a ConfigMap of the installation namespace
//! (key `jwks.json`; each entry names its agent: `"agent": "<namespace>/<name>"`, kid
//! `<namespace>.<agent>.<random>`, never reused).
//!
//! The ConfigMap is listed, then WATCHED through the Kubernetes API (not mounted: a mounted
//! ConfigMap is refreshed only every kubelet sync period, a minute or more, and the kill
//! switch needs revocations to take effect within a second). The watch resumes from the last
//! resourceVersion when the server ends it, lists again on 410 Gone, and backs off (0.2 s
//! doubling to 5 s, with jitter) on errors. None of this involves Kafka: revocation works
//! while Kafka is down.
//!
//! Rules (the same failure policy as `fleetward.toolkit.bundle`, so every verifier agrees):
//! - a token signed by a bundle key speaks only for that key's agent (its `agent` claim must
//!   be the entry's `agent`), and only with the role `user` (checked in `auth`);
//! - a key that leaves the bundle is refused from that moment, and connections authenticated
//!   with it are closed (4003, see `server`);
//! - before the first successful list, and once the API has been unreachable for longer
//!   than `max_staleness`, bundle-signed tokens are refused (503 `keys_unavailable`);
//! - a deleted ConfigMap, a missing key or a document that is not a JWKS at all trusts no
//!   agent key (fail closed: we cannot tell which keys the writer meant to revoke); single
//!   bad entries are skipped and logged, the rest stays trusted;
//! - a key whose agent an engaged KillSwitch covers is refused like a key not in the bundle,
//!   as soon as the gateway sees the switch (`kill_switches`: a fast path ahead of the
//!   operator's ConfigMap rewrite). Entries carry the agent's `labels` for that.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::auth::{VerifyKey, parse_jwks};
use crate::config::TrustBundleSettings;
use crate::envelopes::is_agent_ref;
use crate::kill_switches::SwitchView;
use crate::kube::{KubeClient, KubeError, error_event_code};
use crate::metrics::Metrics;

/// One agent key of the bundle.
#[derive(Clone)]
pub struct BundleKey {
    pub verify: VerifyKey,
    /// `<namespace>/<name>`: the only agent tokens signed by this key may speak for.
    pub agent: String,
    /// The agent's `metadata.labels` when the key was published (kill-switch selectors).
    pub labels: BTreeMap<String, String>,
    /// The entry as published: a kid whose key material changes counts as removed.
    raw: String,
}

/// What the bundle says about a `kid`.
pub enum Lookup {
    Found(BundleKey),
    NotInBundle,
    /// Not loaded yet, or the source has been unreachable beyond the staleness bound.
    Unavailable,
}

/// Called with the kids that left the bundle, right after they stopped being trusted.
pub type OnRemoved = Box<dyn Fn(&HashSet<String>) + Send + Sync>;

/// The bundle's keys and what the kill switches make of them, changed together under one lock.
#[derive(Default)]
struct Trusted {
    /// The bundle as published, replaced as a whole on every change of the ConfigMap.
    keys: Arc<HashMap<String, BundleKey>>,
    /// The revoking KillSwitches; None: not watched, not listed yet, or dropped as stale.
    switches: Option<Arc<SwitchView>>,
    /// Kids of `keys` whose agent `switches` covers: refused although in the bundle.
    covered: HashSet<String>,
    /// Since when the switch source has been failing (None: up, or never listed).
    switches_down_since: Option<Instant>,
}

impl Trusted {
    fn compute_covered(&mut self) {
        self.covered = match &self.switches {
            Some(view) if !view.is_empty() => self
                .keys
                .iter()
                .filter(|(_, k)| view.covers_agent(&k.agent, &k.labels))
                .map(|(kid, _)| kid.clone())
                .collect(),
            _ => HashSet::new(),
        };
    }

    /// The switch view no longer counts once its source has failed for longer than
    /// `max_staleness` (checked here too, not only when the loop drops the view, so the
    /// bound holds even while a request hangs).
    fn switches_stale(&self, max_staleness: Duration) -> bool {
        self.switches_down_since.is_some_and(|t| t.elapsed() > max_staleness)
    }

    fn is_covered(&self, kid: &str, max_staleness: Duration) -> bool {
        self.covered.contains(kid) && !self.switches_stale(max_staleness)
    }

    /// The covered kids that are in effect now.
    fn effective_covered(&self, max_staleness: Duration) -> HashSet<String> {
        if self.switches_stale(max_staleness) {
            HashSet::new()
        } else {
            self.covered.clone()
        }
    }
}

/// The agent keys currently trusted: the bundle minus the keys kill switches cover.
pub struct TrustBundle {
    state: RwLock<Trusted>,
    loaded: AtomicBool,
    down_since: Mutex<Option<Instant>>,
    /// The stale switch view was dropped (logged once per outage).
    switches_dropped: AtomicBool,
    max_staleness: Duration,
    relist: Notify,
    metrics: Arc<Metrics>,
}

/// The bundle document -> keys by kid; entries that cannot be used are skipped with a note.
pub fn parse_bundle(bytes: &[u8]) -> Result<(HashMap<String, BundleKey>, Vec<String>), String> {
    let (entries, mut notes) = parse_jwks(bytes)?;
    let mut keys = HashMap::new();
    for (kid, entry) in entries {
        if entry.raw.get("d").is_some() {
            // A private key in a document every verifier reads: refuse it loudly.
            notes.push(format!(
                "kid={kid}: skipped, private key material (d) must never be in the trust bundle"
            ));
            continue;
        }
        match entry.raw.get("agent").and_then(Value::as_str) {
            Some(agent) if is_agent_ref(agent) => {
                let labels = match entry.raw.get("labels") {
                    None | Some(Value::Null) => BTreeMap::new(),
                    Some(Value::Object(m)) if m.values().all(Value::is_string) => m
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect(),
                    Some(_) => {
                        // Kept: the key is valid; only kill-switch selectors see no labels for it.
                        notes.push(format!(
                            "kid={kid}: \"labels\" must be an object of strings; taken as no labels"
                        ));
                        BTreeMap::new()
                    }
                };
                keys.insert(
                    kid,
                    BundleKey {
                        verify: entry.key,
                        agent: agent.to_string(),
                        labels,
                        raw: entry.raw.to_string(),
                    },
                );
            }
            _ => notes.push(format!(
                "kid={kid}: skipped, the \"agent\" member must be \"<namespace>/<name>\""
            )),
        }
    }
    Ok((keys, notes))
}

/// Reconnect delays: 0.2 s doubling to 5 s, each drawn from [d/2, d] so replicas spread out.
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(200);
    const CAP: Duration = Duration::from_secs(5);

    pub(crate) fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    pub(crate) fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    pub(crate) fn next(&mut self) -> Duration {
        // uuid's v4 generator is the randomness at hand; a rand dependency for one jitter is not worth it.
        let fraction = 0.5 + (uuid::Uuid::new_v4().as_u128() % 1000) as f64 / 2000.0;
        let delay = self.next.mul_f64(fraction);
        self.next = (self.next * 2).min(Self::CAP);
        delay
    }
}

impl TrustBundle {
    pub fn new(max_staleness: Duration, metrics: Arc<Metrics>) -> TrustBundle {
        TrustBundle {
            state: RwLock::new(Trusted::default()),
            loaded: AtomicBool::new(false),
            down_since: Mutex::new(None),
            switches_dropped: AtomicBool::new(false),
            max_staleness,
            relist: Notify::new(),
            metrics,
        }
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Usable: loaded, and the source not unreachable for longer than the staleness bound.
    fn usable(&self) -> bool {
        self.is_loaded()
            && self
                .down_since
                .lock()
                .expect("bundle lock")
                .is_none_or(|t| t.elapsed() <= self.max_staleness)
    }

    pub fn lookup(&self, kid: &str) -> Lookup {
        if !self.usable() {
            return Lookup::Unavailable;
        }
        let st = self.state.read().expect("bundle lock");
        // A covered key is refused exactly like a withdrawn one (same 401), which it soon is.
        if st.is_covered(kid, self.max_staleness) {
            return Lookup::NotInBundle;
        }
        match st.keys.get(kid) {
            Some(k) => Lookup::Found(k.clone()),
            None => Lookup::NotInBundle,
        }
    }

    /// Whether `kid` is trusted now: in the bundle and not covered by a kill switch (a
    /// connection re-checks this after registering, so a removal racing its handshake
    /// cannot leave it open).
    pub fn contains(&self, kid: &str) -> bool {
        let st = self.state.read().expect("bundle lock");
        st.keys.contains_key(kid) && !st.is_covered(kid, self.max_staleness)
    }

    /// Keys in the bundle, covered ones included.
    pub fn len(&self) -> usize {
        self.state.read().expect("bundle lock").keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-list at once (the `rotate_keys` control message), instead of waiting for the watch.
    pub fn request_relist(&self) {
        self.relist.notify_one();
    }

    /// Replace the key set; returns (added, removed kids). Keys a kill switch covers stay
    /// refused (a changed entry, e.g. new labels, counts as removed and is judged afresh).
    pub fn replace(&self, new: HashMap<String, BundleKey>) -> (usize, HashSet<String>) {
        let mut st = self.state.write().expect("bundle lock");
        let keys = &st.keys;
        let removed: HashSet<String> = keys
            .iter()
            .filter(|(kid, old)| new.get(*kid).is_none_or(|k| k.raw != old.raw))
            .map(|(kid, _)| kid.clone())
            .collect();
        let added = new
            .iter()
            .filter(|(kid, k)| keys.get(*kid).is_none_or(|old| old.raw != k.raw))
            .count();
        st.keys = Arc::new(new);
        st.compute_covered();
        self.publish_counts(&st);
        self.loaded.store(true, Ordering::Release);
        (added, removed)
    }

    /// The gauges: effectively trusted keys (a benchmark times revocations on it) and the
    /// covered ones.
    fn publish_counts(&self, st: &Trusted) {
        let covered = st.effective_covered(self.max_staleness).len();
        self.metrics
            .trust_bundle_keys
            .set(st.keys.len().saturating_sub(covered) as i64);
        self.metrics.trust_bundle_keys_covered.set(covered as i64);
    }

    /// A new KillSwitch view (the switch source works): refuse the keys it covers and report
    /// the newly covered ones to `on_removed`, after they stopped being trusted.
    pub(crate) fn set_kill_switches(&self, view: Arc<SwitchView>, on_removed: &OnRemoved) {
        let (newly, released, covered) = {
            let mut st = self.state.write().expect("bundle lock");
            let before = st.effective_covered(self.max_staleness);
            st.switches = Some(view);
            st.switches_down_since = None;
            st.compute_covered();
            self.publish_counts(&st);
            let newly: HashSet<String> = st.covered.difference(&before).cloned().collect();
            let released = before.difference(&st.covered).count();
            (newly, released, st.covered.len())
        };
        self.metrics.kill_switch_watch_up.set(1);
        if self.switches_dropped.swap(false, Ordering::AcqRel) {
            tracing::info!("kill switches: the Kubernetes API answers again; switch view restored");
        }
        if !newly.is_empty() || released > 0 {
            tracing::info!(
                covered,
                newly_covered = newly.len(),
                released,
                "trust bundle: keys covered by kill switches changed"
            );
        }
        if !newly.is_empty() {
            on_removed(&newly);
        }
    }

    /// The switch source failed: once it has been failing for longer than `max_staleness`,
    /// drop the view (a switch released while we could not see it must not lock fresh keys
    /// out forever; the ConfigMap path still revokes).
    pub(crate) fn kill_switch_source_failed(&self) {
        self.metrics.kill_switch_watch_up.set(0);
        let mut st = self.state.write().expect("bundle lock");
        let since = *st.switches_down_since.get_or_insert_with(Instant::now);
        if st.switches.is_some() && since.elapsed() > self.max_staleness {
            st.switches = None;
            st.compute_covered();
            self.publish_counts(&st);
            drop(st);
            if !self.switches_dropped.swap(true, Ordering::AcqRel) {
                tracing::warn!(
                    max_staleness_s = self.max_staleness.as_secs(),
                    "kill switches: the source has failed for longer than max_staleness; no key is \
                     refused on a switch's account until it is back (the trust-bundle ConfigMap still revokes)"
                );
            }
        }
    }

    /// Take the ConfigMap as it is now (None: it does not exist) and report removed keys.
    fn apply(&self, configmap: Option<&Value>, data_key: &str, on_removed: &OnRemoved) {
        let document = configmap
            .and_then(|cm| cm.get("data"))
            .and_then(|d| d.get(data_key))
            .and_then(Value::as_str);
        let keys = match (configmap, document) {
            (None, _) => {
                tracing::warn!("trust bundle: the ConfigMap does not exist; no agent key is trusted");
                self.metrics.trust_bundle_updates.with_label_values(&["missing"]).inc();
                HashMap::new()
            }
            (Some(_), None) => {
                tracing::warn!(
                    key = data_key,
                    "trust bundle: the ConfigMap has no such key; no agent key is trusted"
                );
                self.metrics.trust_bundle_updates.with_label_values(&["missing"]).inc();
                HashMap::new()
            }
            (Some(_), Some(text)) => match parse_bundle(text.as_bytes()) {
                Ok((keys, notes)) => {
                    for n in notes {
                        tracing::warn!("trust bundle: {n}");
                    }
                    self.metrics.trust_bundle_updates.with_label_values(&["ok"]).inc();
                    keys
                }
                Err(e) => {
                    tracing::error!(error = %e, "trust bundle: not a JWKS; no agent key is trusted until a valid one arrives");
                    self.metrics.trust_bundle_updates.with_label_values(&["invalid"]).inc();
                    HashMap::new()
                }
            },
        };
        let total = keys.len();
        let (added, removed) = self.replace(keys);
        if added > 0 || !removed.is_empty() {
            tracing::info!(keys = total, added, removed = removed.len(), "trust bundle changed");
        }
        if !removed.is_empty() {
            on_removed(&removed);
        }
    }

    fn source_up(&self) {
        let mut down = self.down_since.lock().expect("bundle lock");
        if let Some(since) = down.take() {
            tracing::info!(
                down_ms = since.elapsed().as_millis() as u64,
                "trust bundle: Kubernetes API reachable again"
            );
        }
        self.metrics.trust_bundle_source_up.set(1);
    }

    async fn source_failed(&self, error: &KubeError, backoff: &mut Backoff, stop: &CancellationToken) {
        {
            let mut down = self.down_since.lock().expect("bundle lock");
            if down.is_none() {
                *down = Some(Instant::now());
            }
        }
        self.metrics.trust_bundle_source_up.set(0);
        self.metrics.trust_bundle_updates.with_label_values(&["error"]).inc();
        let delay = backoff.next();
        tracing::warn!(error = %error, retry_ms = delay.as_millis() as u64, max_staleness_s = self.max_staleness.as_secs(),
            "trust bundle: list/watch failed; the last known keys stay trusted up to max_staleness");
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }

    /// List, then watch the ConfigMap until `stop`; never returns early, never panics on
    /// what the API server says.
    pub async fn run(
        self: Arc<Self>,
        client: KubeClient,
        settings: TrustBundleSettings,
        on_removed: OnRemoved,
        stop: CancellationToken,
    ) {
        let (ns, name, key) = (&settings.namespace, &settings.configmap, &settings.key);
        let mut backoff = Backoff::new();
        'list: loop {
            let listed = tokio::select! {
                _ = stop.cancelled() => return,
                r = client.list_configmap(ns, name) => r,
            };
            let mut rv = match listed {
                Ok((configmap, rv)) => {
                    self.apply(configmap.as_ref(), key, &on_removed);
                    self.source_up();
                    backoff.reset();
                    rv
                }
                Err(e) => {
                    self.source_failed(&e, &mut backoff, &stop).await;
                    continue 'list;
                }
            };
            loop {
                let opened = tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.relist.notified() => continue 'list,
                    r = client.watch_configmap(ns, name, &rv, settings.watch_timeout) => r,
                };
                let mut stream = match opened {
                    Ok(s) => s,
                    Err(KubeError::Gone) => continue 'list,
                    Err(e) => {
                        self.source_failed(&e, &mut backoff, &stop).await;
                        continue 'list;
                    }
                };
                loop {
                    let next = tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = self.relist.notified() => continue 'list,
                        n = stream.next() => n,
                    };
                    let event = match next {
                        Ok(Some(ev)) => ev,
                        // The server ended the watch (its timeoutSeconds): resume where it was.
                        Ok(None) => break,
                        Err(e) => {
                            self.source_failed(&e, &mut backoff, &stop).await;
                            continue 'list;
                        }
                    };
                    match event.kind.as_str() {
                        "ADDED" | "MODIFIED" => self.apply(Some(&event.object), key, &on_removed),
                        "DELETED" => self.apply(None, key, &on_removed),
                        "BOOKMARK" => {}
                        "ERROR" => {
                            if error_event_code(&event.object) == Some(410) {
                                tracing::info!("trust bundle: watch expired (410); listing again");
                                continue 'list;
                            }
                            let message = event.object.get("message").and_then(Value::as_str).unwrap_or("");
                            let e = KubeError::Status {
                                code: error_event_code(&event.object).unwrap_or(0) as u16,
                                message: message.to_string(),
                            };
                            self.source_failed(&e, &mut backoff, &stop).await;
                            continue 'list;
                        }
                        other => tracing::debug!(kind = other, "trust bundle: unknown watch event ignored"),
                    }
                    if let Some(v) = event.resource_version() {
                        rv = v.to_string();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kill_switches::tests::{labels, switch};
    use jsonwebtoken::jwk::Jwk;
    use jsonwebtoken::{Algorithm, EncodingKey};
    use serde_json::json;

    const ED: &str = include_str!("../tests/keys/ed25519.pem");

    pub fn ed_key() -> EncodingKey {
        EncodingKey::from_ed_pem(ED.as_bytes()).unwrap()
    }

    /// A trust-bundle entry as the operator writes it.
    pub fn entry(kid: &str, agent: &str) -> Value {
        let mut jwk = serde_json::to_value(Jwk::from_encoding_key(&ed_key(), Algorithm::EdDSA).unwrap()).unwrap();
        jwk["kid"] = json!(kid);
        jwk["alg"] = json!("EdDSA");
        jwk["use"] = json!("sig");
        jwk["agent"] = json!(agent);
        jwk
    }

    pub fn bundle_of(entries: &[Value]) -> HashMap<String, BundleKey> {
        parse_bundle(json!({ "keys": entries }).to_string().as_bytes())
            .unwrap()
            .0
    }

    #[test]
    fn parse_keeps_the_agent_and_skips_entries_without_one() {
        let mut no_agent = entry("ns1.b.2", "ns1/b");
        no_agent.as_object_mut().unwrap().remove("agent");
        let bad_agent = entry("ns1.c.3", "not an agent");
        let mut private = entry("ns1.d.4", "ns1/d");
        private["d"] = json!("c2VjcmV0");
        let doc = json!({"keys": [entry("ns1.a.1", "ns1/a"), no_agent, bad_agent, private]});
        let (keys, notes) = parse_bundle(doc.to_string().as_bytes()).unwrap();
        assert_eq!(keys.keys().collect::<Vec<_>>(), vec!["ns1.a.1"], "{notes:?}");
        assert_eq!(keys["ns1.a.1"].agent, "ns1/a");
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(notes.iter().any(|n| n.contains("private key")), "{notes:?}");
        assert!(parse_bundle(b"[]").is_err());
        assert!(parse_bundle(b"not json").is_err());
    }

    #[test]
    fn replace_reports_removed_and_changed_keys() {
        let b = TrustBundle::new(Duration::from_secs(10), Arc::new(Metrics::new()));
        assert!(matches!(b.lookup("ns1.a.1"), Lookup::Unavailable), "not loaded yet");
        let (added, removed) = b.replace(bundle_of(&[entry("ns1.a.1", "ns1/a"), entry("ns1.b.1", "ns1/b")]));
        assert_eq!((added, removed.len()), (2, 0));
        assert!(matches!(b.lookup("ns1.a.1"), Lookup::Found(k) if k.agent == "ns1/a"));
        assert!(matches!(b.lookup("ns1.z.1"), Lookup::NotInBundle));
        // a.1 leaves; b.1 keeps its kid but names another agent (changed material counts as removed).
        let (added, removed) = b.replace(bundle_of(&[entry("ns1.b.1", "ns1/other"), entry("ns1.a.2", "ns1/a")]));
        assert_eq!(added, 2);
        assert_eq!(removed, HashSet::from(["ns1.a.1".to_string(), "ns1.b.1".to_string()]));
        assert!(!b.contains("ns1.a.1") && b.contains("ns1.a.2"));
    }

    #[test]
    fn a_missing_or_invalid_document_trusts_nothing() {
        let b = TrustBundle::new(Duration::from_secs(10), Arc::new(Metrics::new()));
        b.replace(bundle_of(&[entry("ns1.a.1", "ns1/a")]));
        let seen: Arc<Mutex<Vec<HashSet<String>>>> = Arc::default();
        let s = seen.clone();
        let on_removed: OnRemoved = Box::new(move |r| s.lock().unwrap().push(r.clone()));
        let cm = json!({"metadata": {"name": "b"}, "data": {"jwks.json": "{not json"}});
        b.apply(Some(&cm), "jwks.json", &on_removed);
        assert!(b.is_empty());
        assert_eq!(seen.lock().unwrap().len(), 1);
        b.replace(bundle_of(&[entry("ns1.a.1", "ns1/a")]));
        b.apply(None, "jwks.json", &on_removed);
        assert!(b.is_empty() && b.is_loaded());
        let doc = json!({"keys": [entry("ns1.a.1", "ns1/a")]}).to_string();
        b.apply(Some(&json!({"data": {"jwks.json": doc}})), "jwks.json", &on_removed);
        assert!(b.contains("ns1.a.1"));
        b.apply(Some(&json!({"data": {"other": "x"}})), "jwks.json", &on_removed);
        assert!(b.is_empty());
        assert_eq!(seen.lock().unwrap().len(), 3);
    }

    #[test]
    fn stale_source_fails_closed_after_the_bound() {
        let b = TrustBundle::new(Duration::from_millis(0), Arc::new(Metrics::new()));
        b.replace(bundle_of(&[entry("ns1.a.1", "ns1/a")]));
        assert!(matches!(b.lookup("ns1.a.1"), Lookup::Found(_)));
        *b.down_since.lock().unwrap() = Some(Instant::now() - Duration::from_millis(5));
        assert!(matches!(b.lookup("ns1.a.1"), Lookup::Unavailable));
        b.source_up();
        assert!(matches!(b.lookup("ns1.a.1"), Lookup::Found(_)));
    }

    /// An entry with the agent's labels, as the operator publishes it for kill-switch scopes.
    pub fn entry_labelled(kid: &str, agent: &str, labels: Value) -> Value {
        let mut e = entry(kid, agent);
        e["labels"] = labels;
        e
    }

    fn recorder() -> (Arc<Mutex<Vec<HashSet<String>>>>, OnRemoved) {
        let seen: Arc<Mutex<Vec<HashSet<String>>>> = Arc::default();
        let s = seen.clone();
        (seen, Box::new(move |r| s.lock().unwrap().push(r.clone())))
    }

    fn kids(list: &[&str]) -> HashSet<String> {
        list.iter().map(|k| k.to_string()).collect()
    }

    fn view(switches: &[Value]) -> Arc<SwitchView> {
        Arc::new(SwitchView::from_items(switches))
    }

    #[test]
    fn parse_reads_labels_absent_valid_or_invalid() {
        let doc = json!({"keys": [
            entry("ns1.a.1", "ns1/a"),
            entry_labelled("ns1.b.1", "ns1/b", json!({"tier": "prod", "team": "pay"})),
            entry_labelled("ns1.c.1", "ns1/c", json!({"tier": 1})),
            entry_labelled("ns1.d.1", "ns1/d", json!(["tier"])),
            entry_labelled("ns1.e.1", "ns1/e", json!(null)),
        ]});
        let (keys, notes) = parse_bundle(doc.to_string().as_bytes()).unwrap();
        assert_eq!(keys.len(), 5, "invalid labels keep the key: {notes:?}");
        assert!(keys["ns1.a.1"].labels.is_empty() && keys["ns1.e.1"].labels.is_empty());
        assert_eq!(keys["ns1.b.1"].labels, labels(&[("tier", "prod"), ("team", "pay")]));
        assert!(keys["ns1.c.1"].labels.is_empty() && keys["ns1.d.1"].labels.is_empty());
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes.iter().all(|n| n.contains("\"labels\"")), "{notes:?}");
    }

    #[test]
    fn a_covered_key_is_refused_until_the_switch_is_released() {
        let m = Arc::new(Metrics::new());
        let b = TrustBundle::new(Duration::from_secs(10), m.clone());
        b.replace(bundle_of(&[
            entry_labelled("ns1.a.1", "ns1/a", json!({"tier": "prod"})),
            entry_labelled("ns1.b.1", "ns1/b", json!({"tier": "dev"})),
            entry("ns2.c.1", "ns2/c"),
        ]));
        let (seen, on_removed) = recorder();
        assert_eq!(m.trust_bundle_keys.get(), 3);

        // A switch that does not revoke changes nothing.
        b.set_kill_switches(view(&[switch("off", json!({"engaged": false}))]), &on_removed);
        assert!(seen.lock().unwrap().is_empty() && m.trust_bundle_keys.get() == 3);
        assert_eq!(m.kill_switch_watch_up.get(), 1);

        let prod = switch(
            "prod",
            json!({"scope": {"agentSelector": {"matchLabels": {"tier": "prod"}}}}),
        );
        b.set_kill_switches(view(std::slice::from_ref(&prod)), &on_removed);
        assert_eq!(*seen.lock().unwrap(), vec![kids(&["ns1.a.1"])]);
        assert!(matches!(b.lookup("ns1.a.1"), Lookup::NotInBundle));
        assert!(!b.contains("ns1.a.1") && b.contains("ns1.b.1"));
        assert!(matches!(b.lookup("ns1.b.1"), Lookup::Found(_)));
        assert_eq!((m.trust_bundle_keys.get(), m.trust_bundle_keys_covered.get()), (2, 1));

        // A second switch: only the newly covered kids are reported.
        let ns2 = switch("ns2", json!({"scope": {"namespaces": ["ns2"]}}));
        b.set_kill_switches(view(&[prod.clone(), ns2]), &on_removed);
        assert_eq!(seen.lock().unwrap()[1], kids(&["ns2.c.1"]));
        assert_eq!((m.trust_bundle_keys.get(), m.trust_bundle_keys_covered.get()), (1, 2));

        // Released (engaged false): trusted again, nothing reported.
        let mut released = prod;
        released["spec"]["engaged"] = json!(false);
        b.set_kill_switches(view(&[released]), &on_removed);
        assert_eq!(seen.lock().unwrap().len(), 2);
        assert!(matches!(b.lookup("ns1.a.1"), Lookup::Found(k) if k.agent == "ns1/a"));
        assert!(b.contains("ns1.a.1") && b.contains("ns2.c.1"));
        assert_eq!((m.trust_bundle_keys.get(), m.trust_bundle_keys_covered.get()), (3, 0));
        assert_eq!(b.len(), 3);
    }

    #[test]
    fn a_bundle_replace_keeps_covered_keys_refused() {
        let m = Arc::new(Metrics::new());
        let b = TrustBundle::new(Duration::from_secs(10), m.clone());
        let (seen, on_removed) = recorder();
        // The switch is seen before the bundle is even loaded.
        b.set_kill_switches(
            view(&[switch("all-ns1", json!({"scope": {"namespaces": ["ns1"]}}))]),
            &on_removed,
        );
        assert!(seen.lock().unwrap().is_empty());
        b.replace(bundle_of(&[entry("ns1.a.1", "ns1/a"), entry("ns2.b.1", "ns2/b")]));
        assert!(matches!(b.lookup("ns1.a.1"), Lookup::NotInBundle) && !b.contains("ns1.a.1"));
        assert_eq!((m.trust_bundle_keys.get(), m.trust_bundle_keys_covered.get()), (1, 1));
        // An unrelated bundle change (a new key elsewhere, a new covered key) keeps them refused.
        let (added, removed) = b.replace(bundle_of(&[
            entry("ns1.a.1", "ns1/a"),
            entry("ns2.b.1", "ns2/b"),
            entry("ns1.n.1", "ns1/n"),
            entry("ns2.d.1", "ns2/d"),
        ]));
        assert_eq!((added, removed.len()), (2, 0));
        assert!(!b.contains("ns1.a.1") && !b.contains("ns1.n.1") && b.contains("ns2.d.1"));
        assert_eq!((m.trust_bundle_keys.get(), m.trust_bundle_keys_covered.get()), (2, 2));
        // The operator withdraws the keys: nothing covered remains.
        b.replace(bundle_of(&[entry("ns2.b.1", "ns2/b"), entry("ns2.d.1", "ns2/d")]));
        assert_eq!((m.trust_bundle_keys.get(), m.trust_bundle_keys_covered.get()), (2, 0));
    }

    #[test]
    fn a_stale_switch_source_drops_coverage() {
        let m = Arc::new(Metrics::new());
        let b = TrustBundle::new(Duration::from_millis(50), m.clone());
        b.replace(bundle_of(&[entry("ns1.a.1", "ns1/a"), entry("ns2.b.1", "ns2/b")]));
        let (seen, on_removed) = recorder();
        b.set_kill_switches(
            view(&[switch("ns1", json!({"scope": {"namespaces": ["ns1"]}}))]),
            &on_removed,
        );
        assert!(!b.contains("ns1.a.1"));
        // A failure within the bound keeps the view.
        b.kill_switch_source_failed();
        assert_eq!(m.kill_switch_watch_up.get(), 0);
        assert!(!b.contains("ns1.a.1") && matches!(b.lookup("ns1.a.1"), Lookup::NotInBundle));
        // Beyond it, coverage no longer counts (even before the loop drops the view) ...
        b.state.write().unwrap().switches_down_since = Some(Instant::now() - Duration::from_millis(60));
        assert!(b.contains("ns1.a.1") && matches!(b.lookup("ns1.a.1"), Lookup::Found(_)));
        // ... and the next failure drops it, gauges included.
        b.kill_switch_source_failed();
        assert!(b.state.read().unwrap().switches.is_none());
        assert_eq!((m.trust_bundle_keys.get(), m.trust_bundle_keys_covered.get()), (2, 0));
        // The bundle itself stays usable throughout (the ConfigMap path is separate).
        assert!(matches!(b.lookup("ns2.b.1"), Lookup::Found(_)));
        // Back: covered again, and reported again (it was trusted meanwhile).
        b.set_kill_switches(
            view(&[switch("ns1", json!({"scope": {"namespaces": ["ns1"]}}))]),
            &on_removed,
        );
        assert!(!b.contains("ns1.a.1"));
        assert_eq!(*seen.lock().unwrap(), vec![kids(&["ns1.a.1"]), kids(&["ns1.a.1"])]);
        assert_eq!(m.kill_switch_watch_up.get(), 1);
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut b = Backoff::new();
        let first = b.next();
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200));
        for _ in 0..10 {
            b.next();
        }
        let late = b.next();
        assert!(
            late >= Duration::from_millis(2500) && late <= Duration::from_secs(5),
            "{late:?}"
        );
        b.reset();
        assert!(b.next() <= Duration::from_millis(200));
    }
}
