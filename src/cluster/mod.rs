//! The master (fork or spawn workers, respawn, rolling reload, graceful
//! shutdown, listeners, heartbeats, events, stats) and the worker's side of
//! it. The master sets the cluster up and keeps it alive; it never routes a
//! message.
//!
//! # Slots and instances
//! The master keeps `n` worker *instances* (numbered `0..n`, like PM2's
//! `NODE_APP_INSTANCE`) in a segment of `n + 1` *slots*. A respawned worker
//! keeps its slot (its messaging address) and gets a new generation. A
//! rolling reload starts each replacement in the spare slot, waits until it
//! is ready, and only then drains the old one, whose slot becomes the spare:
//! so across a reload an instance keeps its index but may change slot.
//!
//! # Where things are
//! Here, [`WorkerState`]; `event.rs`, what the master publishes
//! ([`Event`]); `stats.rs`, what the worker table and counters say
//! ([`ClusterStats`], [`Peer`]); `master/`, the master; `worker/`, the
//! worker's side ([`Worker`]); `threads.rs`, threads mode; `listen/`,
//! listeners; `control/`, the master's control socket; `metrics/`, its
//! metrics endpoint; `http/`, the HTTP
//! drain.

// `pub(crate)` so that the crate root can re-export `control::codec` for
// the `shmcluster` command's client (see that module).
pub(crate) mod control;
mod event;
#[cfg(feature = "http")]
pub mod http;
pub mod listen;
mod master;
mod metrics;
mod stats;
mod threads;
mod view;
mod worker;

pub use event::{Event, EventKind, ExitReason};

pub use listen::{ListenAddr, ListenError, ListenMode, ListenSpec, Listener};
pub use master::{Cluster, ClusterBuilder, ClusterError, Outcome, ReloadError, Report, Unhealthy};
pub(crate) use stats::{bridge_index, read_peer, read_stats};
pub use stats::{ClusterStats, Peer, SlotStats};
pub(crate) use threads::unmanaged_workers;
pub use threads::ThreadsBuilder;
pub(crate) use view::ClusterView;
pub use worker::{Events, Incoming, StopWatch, Worker, WorkerError};

/// Where a worker slot is in its life, as the worker table says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WorkerState {
    /// No worker has used this slot (or it is the reload spare).
    Free,
    /// Started by the master, not yet ready.
    Starting,
    /// Declared itself ready ([`Worker::ready`]).
    Ready,
    /// Told to finish what it is doing and exit (reload or shutdown).
    Draining,
    /// Exited; the master will start a successor unless shutting down.
    Dead,
    /// Crashed too often: the master stopped restarting it.
    Failed,
}

impl WorkerState {
    pub(crate) fn to_raw(self) -> u32 {
        match self {
            Self::Free => 0,
            Self::Starting => 1,
            Self::Ready => 2,
            Self::Draining => 3,
            Self::Dead => 4,
            Self::Failed => 5,
        }
    }

    /// Decodes a table word; anything unknown (garbage) reads as `Dead`.
    pub(crate) fn from_raw(v: u32) -> Self {
        match v {
            0 => Self::Free,
            1 => Self::Starting,
            2 => Self::Ready,
            3 => Self::Draining,
            5 => Self::Failed,
            _ => Self::Dead,
        }
    }
}
