//! Fleetward WebSocket gateway (SPEC §5): bridges the Kafka events topic to WebSocket
//! clients, and client replies/decisions back to agent request topics.
//!
//! Module map (one concern each, in the spirit of tokio's mini-redis):
//! `config` settings · `server` router, handshake, limits, start/stop · `auth` tokens and keys ·
//! `trust_bundle` agent keys watched through `kube` (the Kubernetes API), refused early for
//! engaged `kill_switches` ·
//! `hub` sharded session map and queues · `connection` one socket · `kafka` consume/produce ·
//! `history` resume · `control` kill switch · `protocol` frames and envelopes · `metrics` ·
//! `shutdown` · `verify` after-runner · `telemetry` logs and spans.

pub mod auth;
pub mod config;
pub mod connection;
pub mod control;
pub mod envelopes;
pub mod history;
pub mod hub;
pub mod kafka;
pub mod kill_switches;
pub mod kube;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod trust_bundle;
pub mod verify;
