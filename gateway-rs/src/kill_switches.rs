//! KillSwitches as a fast path for credential revocation (SPEC §2, §7).
//!
//! The operator revokes a covered agent's keys by rewriting the trust-bundle ConfigMap, an
//! extra API write that takes up to ~0.8 s under load, while the target is "every credential
//! refused within 1 s of the KillSwitch being accepted". So the gateway ALSO watches the
//! KillSwitch objects and refuses, locally, every bundle key whose agent an engaged switch
//! covers (`TrustBundle` keeps the view; the bundle entries carry the agent's labels).
//!
//! The ConfigMap stays the authoritative source (the operator still withdraws the keys): the
//! switch view only ever refuses more, never makes the bundle unavailable. When the switch
//! source has been failing for longer than the bundle's `max_staleness`, the view is dropped
//! (no local coverage): a switch released while we could not see it must not lock fresh keys
//! out forever, and the ConfigMap path still revokes.
//!
//! Coverage rules (the same as the operator's `killswitch/scope.py` and the toolkit's, so every
//! verifier agrees): a switch REVOKES when `spec.engaged` is true and
//! `spec.actions.revokeCredentials` is not false (absent/null: true); it COVERS an agent when
//! `spec.scope.namespaces` is absent/empty or holds the agent's namespace, AND
//! `spec.scope.agentSelector` is absent/null or matches the agent's labels (Kubernetes
//! label-selector semantics). A switch being deleted still revokes while engaged (its
//! finalizer waits for the two-approver release).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::kube::{ClusterResource, KubeClient, KubeError, error_event_code};
use crate::trust_bundle::{Backoff, OnRemoved, TrustBundle};

/// `killswitches.fleetward.dev/v1alpha1`, cluster-scoped.
pub const RESOURCE: ClusterResource = ClusterResource {
    group: "fleetward.dev",
    version: "v1alpha1",
    plural: "killswitches",
};

/// Whether a switch revokes credentials: engaged, and `revokeCredentials` not false.
/// `metadata.deletionTimestamp` is deliberately not looked at: a delete must never bypass
/// the release approvals.
pub fn revokes(switch: &Value) -> bool {
    let engaged = switch.pointer("/spec/engaged").and_then(Value::as_bool) == Some(true);
    let revoke = switch.pointer("/spec/actions/revokeCredentials") != Some(&Value::Bool(false));
    engaged && revoke
}

/// Whether a switch's scope covers an agent of `namespace` with `labels` (engagement aside).
pub fn covers(switch: &Value, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
    let scope = switch.pointer("/spec/scope");
    if let Some(Value::Array(namespaces)) = scope.and_then(|s| s.get("namespaces"))
        && !namespaces.is_empty()
        && !namespaces.iter().any(|n| n.as_str() == Some(namespace))
    {
        return false;
    }
    // Any other shape of `namespaces` is malformed (the CRD schema refuses it): for a
    // revocation we err on refusing, so it narrows nothing.
    match scope.and_then(|s| s.get("agentSelector")) {
        None | Some(Value::Null) => true,
        Some(selector) => selector_matches(selector, labels),
    }
}

/// Kubernetes label-selector semantics over `labels`; `{}` matches everything.
///
/// Unlike a selector that grants something, this one takes credentials away, so whatever we
/// cannot interpret (an unknown operator, an expression without a key, a selector that is not
/// an object) counts as MATCHING: a wrongly refused key costs a reconnect after the release,
/// a wrongly trusted one lets a halted agent keep acting.
pub fn selector_matches(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    let Some(selector) = selector.as_object() else {
        return true;
    };
    if let Some(Value::Object(match_labels)) = selector.get("matchLabels") {
        for (key, value) in match_labels {
            // A non-string value never equals a label (as in the operator's Python).
            if value
                .as_str()
                .is_none_or(|v| labels.get(key).map(String::as_str) != Some(v))
            {
                return false;
            }
        }
    }
    if let Some(Value::Array(expressions)) = selector.get("matchExpressions") {
        for expr in expressions {
            let Some(key) = expr.get("key").and_then(Value::as_str) else {
                continue; // uninterpretable: matches (see above)
            };
            let value = labels.get(key).map(String::as_str);
            let in_values = |v: &str| {
                expr.get("values")
                    .and_then(Value::as_array)
                    .is_some_and(|vs| vs.iter().any(|x| x.as_str() == Some(v)))
            };
            let ok = match expr.get("operator").and_then(Value::as_str) {
                Some("In") => value.is_some_and(in_values),
                Some("NotIn") => !value.is_some_and(in_values),
                Some("Exists") => value.is_some(),
                Some("DoesNotExist") => value.is_none(),
                _ => true, // unknown operator: matches (see above)
            };
            if !ok {
                return false;
            }
        }
    }
    true
}

/// The revoking KillSwitches as last seen, by name (switches that do not revoke are not kept:
/// every watch event carries the whole object, so one that starts revoking is added then).
#[derive(Debug, Default, Clone)]
pub struct SwitchView {
    revoking: BTreeMap<String, Value>,
}

fn name_of(switch: &Value) -> Option<&str> {
    switch.pointer("/metadata/name").and_then(Value::as_str)
}

impl SwitchView {
    pub fn from_items(items: &[Value]) -> SwitchView {
        let mut view = SwitchView::default();
        for s in items {
            view.upsert(s);
        }
        view
    }

    /// Take a switch as it is now; whether the view changed.
    pub fn upsert(&mut self, switch: &Value) -> bool {
        let Some(name) = name_of(switch) else {
            return false;
        };
        if revokes(switch) {
            let scope = switch.pointer("/spec/scope").cloned().unwrap_or(Value::Null);
            // Only the scope matters for coverage: keep it alone, so a status write (every
            // phase change) does not count as a change.
            let kept = serde_json::json!({"spec": {"scope": scope}});
            self.revoking.insert(name.to_string(), kept.clone()) != Some(kept)
        } else {
            self.revoking.remove(name).is_some()
        }
    }

    /// A switch was deleted; whether the view changed.
    pub fn remove(&mut self, switch: &Value) -> bool {
        name_of(switch).is_some_and(|n| self.revoking.remove(n).is_some())
    }

    pub fn len(&self) -> usize {
        self.revoking.len()
    }

    pub fn is_empty(&self) -> bool {
        self.revoking.is_empty()
    }

    /// Whether a revoking switch covers `agent` (`<namespace>/<name>`) with `labels`.
    pub fn covers_agent(&self, agent: &str, labels: &BTreeMap<String, String>) -> bool {
        let namespace = agent.split_once('/').map_or(agent, |(ns, _)| ns);
        self.revoking.values().any(|s| covers(s, namespace, labels))
    }
}

fn failure_hint(error: &KubeError) -> &'static str {
    match error {
        KubeError::Status { code: 403, .. } => {
            "forbidden: the gateway's service account needs get/list/watch on killswitches.fleetward.dev \
             (a ClusterRole); until then only the trust-bundle ConfigMap revokes"
        }
        _ => "the trust-bundle ConfigMap still revokes; the switch view is dropped after max_staleness",
    }
}

async fn failed(bundle: &TrustBundle, error: &KubeError, backoff: &mut Backoff, stop: &CancellationToken) {
    bundle.kill_switch_source_failed();
    let delay = backoff.next();
    if matches!(error, KubeError::Status { code: 403, .. }) {
        tracing::error!(error = %error, retry_ms = delay.as_millis() as u64,
            "kill switches: list/watch failed; {}", failure_hint(error));
    } else {
        tracing::warn!(error = %error, retry_ms = delay.as_millis() as u64,
            "kill switches: list/watch failed; {}", failure_hint(error));
    }
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}

/// List, then watch the KillSwitches until `stop`, feeding the revoking ones to `bundle`
/// (which refuses covered keys and reports the newly covered ones to `on_removed`). The same
/// robustness as the ConfigMap watch: resume where the server ended a watch, list again on
/// 410, back off 0.2 s doubling to 5 s with jitter on errors; never panics on what the API
/// server says.
pub async fn run(
    bundle: Arc<TrustBundle>,
    client: KubeClient,
    watch_timeout: Duration,
    on_removed: OnRemoved,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new();
    'list: loop {
        let listed = tokio::select! {
            _ = stop.cancelled() => return,
            r = client.list_cluster_custom(&RESOURCE) => r,
        };
        let (mut view, mut rv) = match listed {
            Ok((items, rv)) => {
                let view = SwitchView::from_items(&items);
                tracing::debug!(switches = items.len(), revoking = view.len(), "kill switches: listed");
                bundle.set_kill_switches(Arc::new(view.clone()), &on_removed);
                backoff.reset();
                (view, rv)
            }
            Err(e) => {
                failed(&bundle, &e, &mut backoff, &stop).await;
                continue 'list;
            }
        };
        loop {
            let opened = tokio::select! {
                _ = stop.cancelled() => return,
                r = client.watch_cluster_custom(&RESOURCE, &rv, watch_timeout) => r,
            };
            let mut stream = match opened {
                Ok(s) => s,
                Err(KubeError::Gone) => continue 'list,
                Err(e) => {
                    failed(&bundle, &e, &mut backoff, &stop).await;
                    continue 'list;
                }
            };
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => return,
                    n = stream.next() => n,
                };
                let event = match next {
                    Ok(Some(ev)) => ev,
                    // The server ended the watch (its timeoutSeconds): resume where it was.
                    Ok(None) => break,
                    Err(e) => {
                        failed(&bundle, &e, &mut backoff, &stop).await;
                        continue 'list;
                    }
                };
                let changed = match event.kind.as_str() {
                    "ADDED" | "MODIFIED" => view.upsert(&event.object),
                    "DELETED" => view.remove(&event.object),
                    "BOOKMARK" => false,
                    "ERROR" => {
                        if error_event_code(&event.object) == Some(410) {
                            tracing::info!("kill switches: watch expired (410); listing again");
                            continue 'list;
                        }
                        let message = event.object.get("message").and_then(Value::as_str).unwrap_or("");
                        let e = KubeError::Status {
                            code: error_event_code(&event.object).unwrap_or(0) as u16,
                            message: message.to_string(),
                        };
                        failed(&bundle, &e, &mut backoff, &stop).await;
                        continue 'list;
                    }
                    other => {
                        tracing::debug!(kind = other, "kill switches: unknown watch event ignored");
                        false
                    }
                };
                if changed {
                    bundle.set_kill_switches(Arc::new(view.clone()), &on_removed);
                }
                if let Some(v) = event.resource_version() {
                    rv = v.to_string();
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// A KillSwitch object with `spec` merged over `{engaged: true, reason: "test"}`.
    pub fn switch(name: &str, spec: Value) -> Value {
        let mut s = json!({"engaged": true, "reason": "test"});
        for (k, v) in spec.as_object().unwrap() {
            s[k] = v.clone();
        }
        json!({"apiVersion": "fleetward.dev/v1alpha1", "kind": "KillSwitch",
               "metadata": {"name": name, "resourceVersion": "1"}, "spec": s})
    }

    #[test]
    fn revokes_when_engaged_unless_revoke_credentials_is_false() {
        assert!(revokes(&switch("a", json!({}))));
        assert!(!revokes(&switch("a", json!({"engaged": false}))));
        assert!(!revokes(&json!({"metadata": {"name": "a"}, "spec": {"reason": "x"}})));
        assert!(!revokes(&json!({"metadata": {"name": "a"}})));
        assert!(!revokes(&switch("a", json!({"actions": {"revokeCredentials": false}}))));
        assert!(revokes(&switch("a", json!({"actions": {"revokeCredentials": true}}))));
        assert!(revokes(&switch("a", json!({"actions": {"revokeCredentials": null}}))));
        assert!(revokes(&switch("a", json!({"actions": {"scaleToZero": false}}))));
        assert!(revokes(&switch("a", json!({"actions": null}))));
    }

    #[test]
    fn a_switch_being_deleted_still_revokes_while_engaged() {
        let mut s = switch("a", json!({}));
        s["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
        assert!(revokes(&s));
        let mut view = SwitchView::default();
        assert!(view.upsert(&s));
        assert!(view.covers_agent("ns1/a", &labels(&[])));
        s["spec"]["engaged"] = json!(false);
        assert!(!revokes(&s));
        assert!(view.upsert(&s) && view.is_empty());
    }

    #[test]
    fn namespaces_narrow_the_scope() {
        let none = labels(&[]);
        assert!(covers(&switch("a", json!({})), "ns1", &none), "no scope: every agent");
        assert!(covers(&switch("a", json!({"scope": null})), "ns1", &none));
        assert!(covers(&switch("a", json!({"scope": {}})), "ns1", &none));
        assert!(covers(
            &switch("a", json!({"scope": {"namespaces": null}})),
            "ns1",
            &none
        ));
        assert!(covers(&switch("a", json!({"scope": {"namespaces": []}})), "ns1", &none));
        let two = switch("a", json!({"scope": {"namespaces": ["ns1", "ns2"]}}));
        assert!(covers(&two, "ns1", &none) && covers(&two, "ns2", &none));
        assert!(!covers(&two, "ns3", &none));
        // Both narrow: the namespace AND the selector must match.
        let both = switch(
            "a",
            json!({"scope": {"namespaces": ["ns1"], "agentSelector": {"matchLabels": {"tier": "x"}}}}),
        );
        assert!(covers(&both, "ns1", &labels(&[("tier", "x")])));
        assert!(!covers(&both, "ns2", &labels(&[("tier", "x")])));
        assert!(!covers(&both, "ns1", &labels(&[("tier", "y")])));
    }

    #[test]
    fn match_labels_all_must_be_equal() {
        let sel = json!({"matchLabels": {"team": "pay", "tier": "prod"}});
        assert!(selector_matches(
            &sel,
            &labels(&[("team", "pay"), ("tier", "prod"), ("x", "y")])
        ));
        assert!(!selector_matches(&sel, &labels(&[("team", "pay")])));
        assert!(!selector_matches(&sel, &labels(&[("team", "pay"), ("tier", "dev")])));
        assert!(!selector_matches(
            &json!({"matchLabels": {"n": 1}}),
            &labels(&[("n", "1")])
        ));
    }

    #[test]
    fn match_expressions_each_operator() {
        let expr =
            |op: &str, values: Value| json!({"matchExpressions": [{"key": "tier", "operator": op, "values": values}]});
        let prod = labels(&[("tier", "prod")]);
        let dev = labels(&[("tier", "dev")]);
        let none = labels(&[("other", "prod")]);
        let in_ = expr("In", json!(["prod", "stage"]));
        assert!(selector_matches(&in_, &prod) && !selector_matches(&in_, &dev) && !selector_matches(&in_, &none));
        let not_in = expr("NotIn", json!(["prod"]));
        assert!(
            !selector_matches(&not_in, &prod) && selector_matches(&not_in, &dev) && selector_matches(&not_in, &none)
        );
        let exists = json!({"matchExpressions": [{"key": "tier", "operator": "Exists"}]});
        assert!(selector_matches(&exists, &prod) && !selector_matches(&exists, &none));
        let absent = json!({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]});
        assert!(!selector_matches(&absent, &prod) && selector_matches(&absent, &none));
        // In without values matches nothing; NotIn without values everything.
        assert!(!selector_matches(
            &json!({"matchExpressions": [{"key": "tier", "operator": "In"}]}),
            &prod
        ));
        assert!(selector_matches(
            &json!({"matchExpressions": [{"key": "tier", "operator": "NotIn"}]}),
            &prod
        ));
        // Unknown operator: a revocation errs on refusing.
        assert!(selector_matches(&expr("Gt", json!(["1"])), &none));
        // Every expression and every matchLabels entry must hold.
        let all = json!({"matchLabels": {"team": "pay"},
                         "matchExpressions": [{"key": "tier", "operator": "In", "values": ["prod"]},
                                              {"key": "canary", "operator": "DoesNotExist"}]});
        assert!(selector_matches(&all, &labels(&[("team", "pay"), ("tier", "prod")])));
        assert!(!selector_matches(
            &all,
            &labels(&[("team", "pay"), ("tier", "prod"), ("canary", "1")])
        ));
        assert!(!selector_matches(&all, &labels(&[("tier", "prod")])));
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(selector_matches(&json!({}), &labels(&[])));
        assert!(selector_matches(
            &json!({"matchLabels": {}, "matchExpressions": []}),
            &labels(&[("a", "b")])
        ));
        let s = switch("a", json!({"scope": {"agentSelector": {}}}));
        assert!(covers(&s, "any", &labels(&[])));
        assert!(covers(
            &switch("a", json!({"scope": {"agentSelector": null}})),
            "any",
            &labels(&[])
        ));
    }

    #[test]
    fn view_keeps_only_revoking_switches_and_ignores_status_writes() {
        let mut view = SwitchView::from_items(&[
            switch("on", json!({"scope": {"namespaces": ["ns1"]}})),
            switch("off", json!({"engaged": false})),
            switch("keeps-keys", json!({"actions": {"revokeCredentials": false}})),
        ]);
        assert_eq!(view.len(), 1);
        assert!(view.covers_agent("ns1/a", &labels(&[])) && !view.covers_agent("ns2/a", &labels(&[])));
        let mut with_status = switch("on", json!({"scope": {"namespaces": ["ns1"]}}));
        with_status["status"] = json!({"phase": "Drained"});
        assert!(!view.upsert(&with_status), "a status write changes nothing");
        assert!(view.upsert(&switch("on", json!({"scope": {"namespaces": ["ns2"]}}))));
        assert!(view.covers_agent("ns2/a", &labels(&[])));
        assert!(!view.upsert(&switch("off", json!({"engaged": false}))));
        assert!(view.remove(&switch("on", json!({}))) && view.is_empty());
        assert!(!view.remove(&switch("on", json!({}))));
        assert!(!view.upsert(&json!({"spec": {"engaged": true}})), "no name: ignored");
    }

    /// A scripted API server: each request's path is handed to the test, which answers it
    /// with a whole HTTP response (sent, then the connection closed) or None (kept open).
    async fn fake_api() -> (
        String,
        tokio::sync::mpsc::Receiver<(String, tokio::sync::oneshot::Sender<Option<String>>)>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            let mut open = Vec::new();
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = sock.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let path = text.split(' ').nth(1).unwrap_or_default().to_string();
                let (answer_tx, answer_rx) = tokio::sync::oneshot::channel::<Option<String>>();
                tx.send((path, answer_tx)).await.unwrap();
                match answer_rx.await.unwrap() {
                    Some(response) => {
                        sock.write_all(response.as_bytes()).await.unwrap();
                        sock.shutdown().await.ok();
                    }
                    None => {
                        let r =
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
                        sock.write_all(r.as_bytes()).await.unwrap();
                        open.push(sock);
                    }
                }
            }
        });
        (url, rx)
    }

    fn http(status: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    /// A watch response with these events, ended by the server.
    fn watch_events(events: &[Value]) -> String {
        let mut r = String::from(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        );
        for e in events {
            let line = format!("{e}\n");
            r.push_str(&format!("{:x}\r\n{line}\r\n", line.len()));
        }
        r.push_str("0\r\n\r\n");
        r
    }

    fn list_of(items: &[Value], rv: &str) -> String {
        http(
            "200 OK",
            &json!({"kind": "KillSwitchList", "metadata": {"resourceVersion": rv}, "items": items}).to_string(),
        )
    }

    #[tokio::test]
    async fn the_watch_loop_lists_watches_resumes_and_relists() {
        use crate::metrics::Metrics;
        use crate::trust_bundle::tests::{bundle_of, entry};
        use std::collections::HashSet;
        use std::sync::Mutex;

        let (url, mut requests) = fake_api().await;
        let token = std::env::temp_dir().join(format!("fleetward-gw-ks-token-{}", std::process::id()));
        std::fs::write(&token, "t").unwrap();
        let client = KubeClient::new(&crate::config::KubeApiSettings {
            url,
            token_file: token,
            ca_pem: None,
            ca_file: None,
        })
        .unwrap();
        let metrics = Arc::new(Metrics::new());
        let bundle = Arc::new(TrustBundle::new(Duration::from_secs(10), metrics.clone()));
        bundle.replace(bundle_of(&[entry("ns1.a.1", "ns1/a"), entry("ns2.b.1", "ns2/b")]));
        let seen: Arc<Mutex<Vec<HashSet<String>>>> = Arc::default();
        let s = seen.clone();
        let on_removed: OnRemoved = Box::new(move |r| s.lock().unwrap().push(r.clone()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            bundle.clone(),
            client,
            Duration::from_secs(60),
            on_removed,
            stop.clone(),
        ));

        let mut engaged = switch("ns1", json!({"scope": {"namespaces": ["ns1"]}}));
        let mut next = async || {
            tokio::time::timeout(Duration::from_secs(5), requests.recv())
                .await
                .expect("a request")
                .unwrap()
        };
        let (path, answer) = next().await;
        assert_eq!(path, "/apis/fleetward.dev/v1alpha1/killswitches?");
        answer.send(Some(list_of(&[engaged.clone()], "10"))).unwrap();

        let (path, answer) = next().await;
        assert!(
            path.contains("watch=1&resourceVersion=10&allowWatchBookmarks=true&timeoutSeconds=60"),
            "{path}"
        );
        assert!(
            !bundle.contains("ns1.a.1") && bundle.contains("ns2.b.1"),
            "covered once listed"
        );
        assert_eq!(*seen.lock().unwrap(), vec![HashSet::from(["ns1.a.1".to_string()])]);
        engaged["spec"]["engaged"] = json!(false);
        engaged["metadata"]["resourceVersion"] = json!("11");
        answer
            .send(Some(watch_events(&[json!({"type": "MODIFIED", "object": engaged})])))
            .unwrap();

        // The server ended the watch: resumed from the last event's resourceVersion.
        let (path, answer) = next().await;
        assert!(path.contains("resourceVersion=11"), "{path}");
        assert!(bundle.contains("ns1.a.1"), "released");
        answer
            .send(Some(watch_events(&[
                json!({"type": "ERROR", "object": {"kind": "Status", "code": 410}}),
            ])))
            .unwrap();

        // 410: listed again; a 403 there is retried after the backoff.
        let (path, answer) = next().await;
        assert!(!path.contains("watch"), "{path}");
        answer
            .send(Some(http(
                "403 Forbidden",
                r#"{"kind":"Status","code":403,"message":"forbidden"}"#,
            )))
            .unwrap();
        let (path, answer) = next().await;
        assert!(!path.contains("watch"), "{path}");
        assert_eq!(metrics.kill_switch_watch_up.get(), 0);
        engaged["spec"]["engaged"] = json!(true);
        answer.send(Some(list_of(&[engaged.clone()], "12"))).unwrap();

        let (path, answer) = next().await;
        assert!(path.contains("resourceVersion=12"), "{path}");
        answer.send(None).unwrap();
        assert!(!bundle.contains("ns1.a.1"));
        assert_eq!(seen.lock().unwrap().len(), 2, "covered again: reported again");
        assert_eq!(metrics.kill_switch_watch_up.get(), 1);
        assert_eq!(metrics.trust_bundle_keys.get(), 1);

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
