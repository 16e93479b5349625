//! The shutdown signal (as in mini-redis's `shutdown.rs`): one token, cancelled on SIGTERM or
//! SIGINT, that every long-running task and connection watches. Connections answer it with a
//! close frame 1001; the server stops accepting; `main` waits a grace period for both.

use tokio_util::sync::CancellationToken;

#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown {
            token: CancellationToken::new(),
        }
    }

    pub fn trigger(&self) {
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes once shutdown has begun.
    pub async fn wait(&self) {
        self.token.cancelled().await
    }

    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }
}

/// Completes on the first SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
pub async fn signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
