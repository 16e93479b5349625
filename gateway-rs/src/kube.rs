//! A minimal Kubernetes API client for one job: list and watch one ConfigMap (the trust
//! bundle) and a cluster-scoped custom resource (the KillSwitches). kube-rs would do it too, but it brings k8s-openapi (every API type: minutes more
//! on a 2-core CI build) and a second HTTP/TLS stack for two GET requests; reqwest is already
//! a dependency (JWKS URL, after-runner checks).
//!
//! Credentials are the pod's service account (token file + CA, API server at
//! `KUBERNETES_SERVICE_HOST:PORT`) or explicit settings. The token file is re-read for every
//! request: projected service-account tokens are rotated by the kubelet.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::config::KubeApiSettings;

/// Longest a list request may take.
const LIST_TIMEOUT: Duration = Duration::from_secs(15);
/// A watch request ends on the server after its `timeoutSeconds`; the client gives it this
/// much longer before treating the connection as dead.
const WATCH_SLACK: Duration = Duration::from_secs(15);
/// A ConfigMap (or any object) is at most 1.5 MiB in etcd; a watch line longer than this is not one.
const MAX_LINE_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// 410 Gone: the resourceVersion is too old to watch from; list again.
    #[error("resourceVersion expired (410 Gone)")]
    Gone,
    #[error("HTTP {code}: {message}")]
    Status { code: u16, message: String },
    #[error("{0}")]
    Transport(String),
}

/// One line of a watch stream.
#[derive(Debug, Deserialize)]
pub struct WatchEvent {
    /// ADDED, MODIFIED, DELETED, BOOKMARK or ERROR.
    #[serde(rename = "type")]
    pub kind: String,
    pub object: Value,
}

impl WatchEvent {
    pub fn resource_version(&self) -> Option<&str> {
        self.object.pointer("/metadata/resourceVersion").and_then(Value::as_str)
    }
}

/// A cluster-scoped custom resource type (e.g. `killswitches.fleetward.dev/v1alpha1`).
#[derive(Debug, Clone, Copy)]
pub struct ClusterResource {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
}

#[derive(Clone)]
pub struct KubeClient {
    base: String,
    token_file: PathBuf,
    http: reqwest::Client,
}

/// A watch response, read line by line (one JSON event per line).
pub struct WatchStream {
    response: reqwest::Response,
    buf: Vec<u8>,
}

fn transport(what: &str, e: reqwest::Error) -> KubeError {
    // reqwest's errors carry the URL, never a header: safe to log.
    KubeError::Transport(format!("{what}: {e}"))
}

impl KubeClient {
    pub fn new(settings: &KubeApiSettings) -> Result<KubeClient, String> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // Detects a peer that vanished without closing (an API server host lost) between events.
            .tcp_keepalive(Duration::from_secs(15))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = &settings.ca_pem {
            // The cluster's CA only: the API server's certificate is never signed by a public CA.
            let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| format!("Kubernetes CA: {e}"))?;
            builder = builder.tls_certs_only(certs);
        }
        let http = builder.build().map_err(|e| format!("Kubernetes API client: {e}"))?;
        Ok(KubeClient {
            base: settings.url.trim_end_matches('/').to_string(),
            token_file: settings.token_file.clone(),
            http,
        })
    }

    async fn get(&self, url: String, timeout: Duration) -> Result<reqwest::Response, KubeError> {
        let token = tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|e| KubeError::Transport(format!("read {}: {e}", self.token_file.display())))?;
        let response = self
            .http
            .get(&url)
            .bearer_auth(token.trim())
            .header(reqwest::header::ACCEPT, "application/json")
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| transport("GET", e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        if status == reqwest::StatusCode::GONE {
            return Err(KubeError::Gone);
        }
        // The body is a Kubernetes Status: its message says what was refused (e.g. RBAC).
        let body = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| body.chars().take(300).collect());
        Err(KubeError::Status {
            code: status.as_u16(),
            message,
        })
    }

    /// `<base><path>?<query>` (path starts with `/`).
    fn url(&self, path: &str, query: &[(&str, &str)]) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in query {
            q.append_pair(k, v);
        }
        format!("{}{path}?{}", self.base, q.finish())
    }

    /// List `path` with `query`: the items and the list's resourceVersion to watch from.
    async fn list(&self, path: &str, query: &[(&str, &str)]) -> Result<(Vec<Value>, String), KubeError> {
        let bytes = self
            .get(self.url(path, query), LIST_TIMEOUT)
            .await?
            .bytes()
            .await
            .map_err(|e| transport("list", e))?;
        let mut body: Value = serde_json::from_slice(&bytes)
            .map_err(|e| KubeError::Transport(format!("list: the answer is not JSON: {e}")))?;
        let rv = body
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .ok_or_else(|| KubeError::Transport("list: no metadata.resourceVersion in the answer".into()))?
            .to_string();
        let items = match body.get_mut("items").map(Value::take) {
            Some(Value::Array(items)) => items,
            // `items: null` is how the API server spells an empty list of some kinds.
            None | Some(Value::Null) => Vec::new(),
            Some(_) => return Err(KubeError::Transport("list: items is not an array".into())),
        };
        Ok((items, rv))
    }

    /// Watch `path` (with `query`) from `resource_version` for `timeout` (server side), with
    /// bookmarks so a quiet watch still advances its resourceVersion.
    async fn watch(
        &self,
        path: &str,
        query: &[(&str, &str)],
        resource_version: &str,
        timeout: Duration,
    ) -> Result<WatchStream, KubeError> {
        let seconds = timeout.as_secs().max(1).to_string();
        let mut q: Vec<(&str, &str)> = vec![("watch", "1")];
        q.extend_from_slice(query);
        q.extend_from_slice(&[
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", &seconds),
        ]);
        let response = self.get(self.url(path, &q), timeout + WATCH_SLACK).await?;
        Ok(WatchStream {
            response,
            buf: Vec::new(),
        })
    }

    fn configmaps_path(namespace: &str) -> String {
        format!("/api/v1/namespaces/{namespace}/configmaps")
    }

    /// The ConfigMap `name` (None when it does not exist) and the list's resourceVersion to
    /// watch from. A list with a name field selector, not a GET of the object, so that a
    /// missing ConfigMap is an answer rather than an error and the same RBAC rule (list/watch
    /// with resourceNames) covers both requests.
    pub async fn list_configmap(&self, namespace: &str, name: &str) -> Result<(Option<Value>, String), KubeError> {
        let selector = format!("metadata.name={name}");
        let (items, rv) = self
            .list(&Self::configmaps_path(namespace), &[("fieldSelector", &selector)])
            .await?;
        let item = items
            .into_iter()
            .find(|i| i.pointer("/metadata/name").and_then(Value::as_str) == Some(name));
        Ok((item, rv))
    }

    /// Watch the ConfigMap `name` from `resource_version` for `timeout` (server side).
    pub async fn watch_configmap(
        &self,
        namespace: &str,
        name: &str,
        resource_version: &str,
        timeout: Duration,
    ) -> Result<WatchStream, KubeError> {
        let selector = format!("metadata.name={name}");
        self.watch(
            &Self::configmaps_path(namespace),
            &[("fieldSelector", &selector)],
            resource_version,
            timeout,
        )
        .await
    }

    /// `/apis/<group>/<version>/<plural>`: a cluster-scoped custom resource collection.
    fn cluster_custom_path(resource: &ClusterResource) -> String {
        format!("/apis/{}/{}/{}", resource.group, resource.version, resource.plural)
    }

    /// Every object of a cluster-scoped custom resource, and the list's resourceVersion.
    pub async fn list_cluster_custom(&self, resource: &ClusterResource) -> Result<(Vec<Value>, String), KubeError> {
        self.list(&Self::cluster_custom_path(resource), &[]).await
    }

    /// Watch a cluster-scoped custom resource from `resource_version` for `timeout`.
    pub async fn watch_cluster_custom(
        &self,
        resource: &ClusterResource,
        resource_version: &str,
        timeout: Duration,
    ) -> Result<WatchStream, KubeError> {
        self.watch(&Self::cluster_custom_path(resource), &[], resource_version, timeout)
            .await
    }
}

impl WatchStream {
    /// The next event; None when the server ended the watch.
    pub async fn next(&mut self) -> Result<Option<WatchEvent>, KubeError> {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return serde_json::from_slice(&line)
                    .map(Some)
                    .map_err(|e| KubeError::Transport(format!("watch: undecodable event: {e}")));
            }
            match self.response.chunk().await {
                Ok(Some(chunk)) => {
                    self.buf.extend_from_slice(&chunk);
                    if self.buf.len() > MAX_LINE_BYTES {
                        return Err(KubeError::Transport("watch: event longer than 4 MiB".into()));
                    }
                }
                Ok(None) => return Ok(None),
                Err(e) => return Err(transport("watch", e)),
            }
        }
    }
}

/// The status code of an ERROR watch event (a Kubernetes Status object), e.g. 410.
pub fn error_event_code(object: &Value) -> Option<u64> {
    object.get("code").and_then(Value::as_u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_encode_the_query() {
        let c = KubeClient::new(&KubeApiSettings {
            url: "https://127.0.0.1:6443/".into(),
            token_file: "/dev/null".into(),
            ca_pem: None,
            ca_file: None,
        })
        .unwrap();
        assert_eq!(
            c.url(
                &KubeClient::configmaps_path("fw-system"),
                &[("fieldSelector", "metadata.name=fleetward-trust-bundle")]
            ),
            "https://127.0.0.1:6443/api/v1/namespaces/fw-system/configmaps?fieldSelector=metadata.name%3Dfleetward-trust-bundle"
        );
        let switches = ClusterResource {
            group: "fleetward.dev",
            version: "v1alpha1",
            plural: "killswitches",
        };
        assert_eq!(
            c.url(
                &KubeClient::cluster_custom_path(&switches),
                &[("watch", "1"), ("resourceVersion", "7")]
            ),
            "https://127.0.0.1:6443/apis/fleetward.dev/v1alpha1/killswitches?watch=1&resourceVersion=7"
        );
    }

    #[test]
    fn watch_events_parse() {
        let ev: WatchEvent =
            serde_json::from_str(r#"{"type":"MODIFIED","object":{"metadata":{"name":"b","resourceVersion":"42"}}}"#)
                .unwrap();
        assert_eq!((ev.kind.as_str(), ev.resource_version()), ("MODIFIED", Some("42")));
        let gone: WatchEvent = serde_json::from_str(
            r#"{"type":"ERROR","object":{"kind":"Status","code":410,"reason":"Expired","message":"too old"}}"#,
        )
        .unwrap();
        assert_eq!(error_event_code(&gone.object), Some(410));
    }
}
