//! The host's bridge to the other hosts of its cluster, through NATS
//! (feature `nats`). Inside a host, messages go lane to lane as always;
//! the bridge is one more process of the host, in its own slot, started
//! and respawned by the master like a worker, and it carries across hosts
//! only what must cross: broadcasts, calls to a worker of another host,
//! maps, consumes that spill over.
//!
//! # Where things are
//! - `config.rs`: [`NatsConfig`], credentials, names;
//! - `run.rs`: the bridge process (a tokio runtime, one NATS connection,
//!   the host's messenger as the driver of the call core);
//! - `frame.rs`: what bridges say to each other, and what they refuse.

pub(crate) mod config;
mod frame;
mod lease;
mod run;

pub use config::{NatsConfig, NatsConfigError, NatsCredentials, NatsTls};
pub use config::{ENV_CREDS, ENV_NKEY, ENV_NKEY_FILE, ENV_PASSWORD, ENV_TOKEN, ENV_USER};
pub use run::{BridgeStats, STATS_EVENT};

/// Runs the bridge in this process (the master's child in the bridge's
/// slot) until the master stops it; the process's exit code.
pub(crate) fn run(worker: crate::Worker, config: &NatsConfig) -> i32 {
    run::run(worker, config)
}
