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

mod control;
#[cfg(feature = "http")]
pub mod http;
pub mod listen;
mod master;
mod threads;
mod worker;

use std::fmt;
use std::time::Duration;

pub use listen::{ListenAddr, ListenError, ListenMode, ListenSpec, Listener};
pub use master::{Cluster, ClusterBuilder, ClusterError, Outcome, Report, Unhealthy};
#[allow(unused_imports)] // The messenger's `threads` is to call it.
pub(crate) use threads::unmanaged_workers;
// For the crate root to re-export beside `ClusterBuilder` (until it does,
// `ClusterBuilder::threads` returns it unnamed).
#[allow(unused_imports)]
pub use threads::ThreadsBuilder;
#[cfg(feature = "tokio")]
pub(crate) use worker::stop_requested;
pub use worker::{Events, Incoming, StopWatch, Worker, WorkerError};

use crate::segment::table::{RawEvent, WorkerEntry};
use crate::segment::Segment;
use crate::sys;

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

/// Why a worker's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ExitReason {
    /// It exited with this code on its own.
    Exited(i32),
    /// A signal it did not expect killed it.
    Signaled(i32),
    /// Its heartbeat stopped for longer than the hang timeout; the master
    /// killed it.
    Hung,
    /// It was replaced by a rolling reload and exited (or was killed at the
    /// drain deadline).
    Reloaded,
    /// It ended during the cluster's shutdown.
    Shutdown,
    /// It did not declare itself ready within the ready timeout (a reload
    /// replacement); the master killed it.
    NotReady,
    /// It held a `synchronize` lock longer than the hold limit and the
    /// master was configured to kill such holders.
    LockHeld,
}

impl ExitReason {
    fn to_raw(self) -> (u32, i32) {
        match self {
            Self::Exited(c) => (1, c),
            Self::Signaled(s) => (2, s),
            Self::Hung => (3, 0),
            Self::Reloaded => (4, 0),
            Self::Shutdown => (5, 0),
            Self::NotReady => (6, 0),
            Self::LockHeld => (7, 0),
        }
    }

    fn from_raw(kind: u32, value: i32) -> Option<Self> {
        Some(match kind {
            1 => Self::Exited(value),
            2 => Self::Signaled(value),
            3 => Self::Hung,
            4 => Self::Reloaded,
            5 => Self::Shutdown,
            6 => Self::NotReady,
            7 => Self::LockHeld,
            _ => return None,
        })
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited(c) => write!(f, "exited with code {c}"),
            Self::Signaled(s) => write!(f, "killed by signal {s}"),
            Self::Hung => f.write_str("killed: heartbeat stopped"),
            Self::Reloaded => f.write_str("replaced by a reload"),
            Self::Shutdown => f.write_str("shut down"),
            Self::NotReady => f.write_str("killed: not ready in time"),
            Self::LockHeld => f.write_str("killed: held a lock past the hold limit"),
        }
    }
}

/// What happened, as published by the master in the segment's event log
/// (read by workers with [`Worker::events`]) and passed to the master's
/// [`ClusterBuilder::on_event`] callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// The master started a worker process.
    Spawned,
    /// The worker declared itself ready.
    Online,
    /// The worker's process ended.
    Exit(ExitReason),
    /// The slot crashed too often within the window: no more restarts.
    CrashLoop,
    /// A rolling reload began.
    ReloadStarted,
    /// A rolling reload ended; `ok` is false if a replacement failed to
    /// become ready (the old worker was kept).
    ReloadFinished {
        /// Whether every instance was replaced.
        ok: bool,
    },
    /// Graceful shutdown began.
    ShutdownStarted,
    /// A worker has held lock-table entry `lock` (see
    /// [`crate::LockStats`]) longer than the hold limit; `slot`/`pid` name
    /// the holder.
    LockHeldTooLong {
        /// The lock-table entry.
        lock: u32,
    },
    /// The master could not start a worker (out of processes or
    /// descriptors, for instance); it retries after the backoff delay.
    StartFailed {
        /// The `errno` of the failed system call (0 if none).
        errno: i32,
    },
}

/// One event of the cluster's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// Its number in the log (0, 1, 2, ...).
    pub seq: u64,
    /// What happened.
    pub kind: EventKind,
    /// The slot concerned (`u32::MAX` for cluster-wide events).
    pub slot: u32,
    /// The instance concerned (`u32::MAX` if none).
    pub index: u32,
    /// The worker's pid (0 if none).
    pub pid: u32,
    /// The worker's generation (0 if none).
    pub generation: u32,
}

/// One line for an operator, with only the fields the event carries: a
/// worker's event names its instance and then its slot, pid (while a
/// process exists) and generation —
/// `worker 1 ended: exited with code 1 (slot 1, pid 4242, generation 3)`,
/// `worker 0 crash loop: not restarting it (slot 0, generation 3)` — and a
/// cluster-wide one is just what happened: `reload started`.
impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            EventKind::Spawned => "spawned".to_string(),
            EventKind::Online => "online".to_string(),
            EventKind::Exit(reason) => format!("ended: {reason}"),
            EventKind::CrashLoop => "crash loop: not restarting it".to_string(),
            EventKind::ReloadStarted => "reload started".to_string(),
            EventKind::ReloadFinished { ok: true } => "reload finished: ok".to_string(),
            EventKind::ReloadFinished { ok: false } => {
                "reload finished: failed (a replacement was not ready; old worker kept)".to_string()
            }
            EventKind::ShutdownStarted => "shutdown started".to_string(),
            EventKind::LockHeldTooLong { lock } => format!("held lock entry {lock} past the hold limit"),
            EventKind::StartFailed { errno } => format!(
                "could not be started: {}; retrying",
                std::io::Error::from_raw_os_error(errno)
            ),
        };
        let mut carried = Vec::new();
        if self.slot != u32::MAX {
            carried.push(format!("slot {}", self.slot));
        }
        if self.pid != 0 {
            carried.push(format!("pid {}", self.pid));
        }
        if self.generation != 0 {
            carried.push(format!("generation {}", self.generation));
        }
        match (self.index, carried.is_empty()) {
            (u32::MAX, true) if matches!(self.kind, EventKind::LockHeldTooLong { .. }) => {
                write!(f, "a process outside the worker table {what}")
            }
            (u32::MAX, true) => f.write_str(&what),
            (u32::MAX, false) => write!(f, "{what} ({})", carried.join(", ")),
            (index, _) => {
                write!(f, "worker {index} {what}")?;
                if !carried.is_empty() {
                    write!(f, " ({})", carried.join(", "))?;
                }
                Ok(())
            }
        }
    }
}

impl Event {
    fn to_raw(self) -> RawEvent {
        let (kind, value) = match self.kind {
            EventKind::Spawned => (1, 0),
            EventKind::Online => (2, 0),
            EventKind::Exit(r) => {
                let (k, v) = r.to_raw();
                (16 + k, v)
            }
            EventKind::CrashLoop => (3, 0),
            EventKind::ReloadStarted => (4, 0),
            EventKind::ReloadFinished { ok } => (5, i32::from(ok)),
            EventKind::ShutdownStarted => (6, 0),
            EventKind::StartFailed { errno } => (7, errno),
            EventKind::LockHeldTooLong { lock } => (8, lock as i32),
        };
        RawEvent {
            seq: self.seq,
            kind,
            value,
            slot: self.slot,
            index: self.index,
            pid: self.pid,
            generation: self.generation,
        }
    }

    /// Decodes a record; `None` for a kind this build does not know
    /// (garbage, or a newer master).
    fn from_raw(r: RawEvent) -> Option<Self> {
        let kind = match r.kind {
            1 => EventKind::Spawned,
            2 => EventKind::Online,
            3 => EventKind::CrashLoop,
            4 => EventKind::ReloadStarted,
            5 => EventKind::ReloadFinished { ok: r.value != 0 },
            6 => EventKind::ShutdownStarted,
            7 => EventKind::StartFailed { errno: r.value },
            8 => EventKind::LockHeldTooLong { lock: r.value as u32 },
            k if k > 16 => EventKind::Exit(ExitReason::from_raw(k - 16, r.value)?),
            _ => return None,
        };
        Some(Self {
            seq: r.seq,
            kind,
            slot: r.slot,
            index: r.index,
            pid: r.pid,
            generation: r.generation,
        })
    }
}

/// One slot's row of [`ClusterStats`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SlotStats {
    /// The slot.
    pub slot: u32,
    /// Its worker's instance number, if it has one.
    pub index: Option<u32>,
    /// Lifecycle state.
    pub state: WorkerState,
    /// The worker's pid (0 if none).
    pub pid: u32,
    /// The worker's generation.
    pub generation: u32,
    /// Times the master replaced a dead worker in this slot.
    pub restarts: u32,
    /// How the previous worker in this slot ended.
    pub last_exit: Option<ExitReason>,
    /// Time since the master last saw the heartbeat move (`None` before
    /// the first look).
    pub heartbeat_age: Option<Duration>,
    /// Messages sent by this slot (all generations).
    pub sent_messages: u64,
    /// Payload bytes sent.
    pub sent_bytes: u64,
    /// Messages received.
    pub received_messages: u64,
    /// Payload bytes received.
    pub received_bytes: u64,
    /// Bytes of messages waiting in the lanes addressed to this slot
    /// (their record headers included; not the padding and the abort
    /// records the master writes when a sender dies).
    pub inbox_bytes: u64,
    /// Times the worker slept in a futex wait (for messages or for space).
    pub futex_waits: u64,
    /// Futex wakes the worker issued to parked receivers.
    pub futex_wakes: u64,
    /// Sends that found a full lane and had to wait.
    pub full_waits: u64,
    /// How long this slot's last messenger `request` took.
    pub last_request: Option<Duration>,
    /// How long this slot's last messenger `map` took.
    pub last_map: Option<Duration>,
}

/// A snapshot of every slot's state and counters, read from the segment.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterStats {
    /// Pid of the master (0 if there is none).
    pub master_pid: u32,
    /// Worker instances the master keeps running.
    pub instances: u32,
    /// Whether shutdown has begun.
    pub shutting_down: bool,
    /// One row per slot.
    pub slots: Vec<SlotStats>,
    /// The global lock and every named lock: holder, hold time, counters.
    pub locks: Vec<crate::LockStats>,
}

impl fmt::Display for ClusterStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:>4} {:>5} {:>9} {:>8} {:>5} {:>8} {:>10} {:>10} {:>9} {:>8}",
            "slot", "index", "state", "pid", "gen", "restarts", "sent", "received", "inbox B", "hb age"
        )?;
        for s in &self.slots {
            let index = s.index.map_or("-".to_string(), |i| i.to_string());
            let age = s
                .heartbeat_age
                .map_or("-".to_string(), |a| format!("{}ms", a.as_millis()));
            writeln!(
                f,
                "{:>4} {:>5} {:>9} {:>8} {:>5} {:>8} {:>10} {:>10} {:>9} {:>8}",
                s.slot,
                index,
                format!("{:?}", s.state),
                s.pid,
                s.generation,
                s.restarts,
                s.sent_messages,
                s.received_messages,
                s.inbox_bytes,
                age
            )?;
        }
        for l in &self.locks {
            let name = if l.name.is_empty() { "(global)" } else { &l.name };
            let holder = l.holder.map_or("free".to_string(), |(slot, pid)| {
                format!(
                    "held by slot {slot} (pid {pid}) for {}ms",
                    l.held_for.map_or(0, |d| d.as_millis())
                )
            });
            writeln!(
                f,
                "lock {name}: {holder}; {} acquisitions, {} waited, {} owner died, token {}",
                l.acquisitions, l.waits, l.owner_died, l.token
            )?;
        }
        Ok(())
    }
}

/// A worker as its peers see it in the worker table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Peer {
    /// Its slot (messaging address).
    pub slot: u32,
    /// Its instance number, if the slot has a worker.
    pub index: Option<u32>,
    /// Lifecycle state.
    pub state: WorkerState,
    /// Its pid (0 if none).
    pub pid: u32,
    /// Its generation.
    pub generation: u32,
}

pub(crate) fn read_peer(entry: &WorkerEntry, slot: u32) -> Peer {
    use std::sync::atomic::Ordering::Acquire;
    let index = entry.index.load(Acquire);
    Peer {
        slot,
        index: (index != u32::MAX && entry.state.load(Acquire) != 0).then_some(index),
        state: WorkerState::from_raw(entry.state.load(Acquire)),
        pid: entry.pid.load(Acquire),
        generation: entry.generation.load(Acquire),
    }
}

fn latency(ns: &std::sync::atomic::AtomicU64) -> Option<Duration> {
    match ns.load(std::sync::atomic::Ordering::Relaxed) {
        0 => None,
        n => Some(Duration::from_nanos(n)),
    }
}

/// Reads every slot's row from `segment`.
pub(crate) fn read_stats(segment: &Segment) -> ClusterStats {
    use std::sync::atomic::Ordering::{Acquire, Relaxed};
    let control = segment.control();
    let workers = segment.layout().workers();
    let now = sys::process::monotonic_ns();
    let slots = (0..workers)
        .map(|slot| {
            let entry = segment.worker_entry(slot);
            let stats = segment.stats_entry(slot);
            let peer = read_peer(entry, slot);
            let seen = entry.heartbeat_seen_ns.load(Relaxed);
            let inbox_bytes = (0..workers)
                .map(|from| segment.lane(from, slot).depth())
                .fold(0u64, u64::saturating_add);
            SlotStats {
                slot,
                index: peer.index,
                state: peer.state,
                pid: peer.pid,
                generation: peer.generation,
                restarts: entry.restarts.load(Relaxed),
                last_exit: ExitReason::from_raw(
                    entry.last_exit_kind.load(Acquire),
                    entry.last_exit_value.load(Acquire),
                ),
                heartbeat_age: (seen != 0).then(|| Duration::from_nanos(now.saturating_sub(seen))),
                sent_messages: stats.sent_messages.load(Relaxed),
                sent_bytes: stats.sent_bytes.load(Relaxed),
                received_messages: stats.received_messages.load(Relaxed),
                received_bytes: stats.received_bytes.load(Relaxed),
                inbox_bytes,
                futex_waits: stats.futex_waits.load(Relaxed),
                futex_wakes: stats.futex_wakes.load(Relaxed),
                full_waits: stats.full_waits.load(Relaxed),
                last_request: latency(&stats.last_latency_ns[0]),
                last_map: latency(&stats.last_latency_ns[1]),
            }
        })
        .collect();
    ClusterStats {
        master_pid: control.master_pid.load(Acquire),
        instances: control.instances.load(Acquire),
        shutting_down: control.shutdown.load(Acquire) != 0,
        slots,
        locks: crate::lock::read_lock_stats(segment),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, slot: u32, index: u32, pid: u32, generation: u32) -> Event {
        Event {
            seq: 7,
            kind,
            slot,
            index,
            pid,
            generation,
        }
    }

    #[test]
    fn an_event_displays_only_the_fields_it_carries() {
        let none = u32::MAX;
        for (kind, text) in [
            (EventKind::ReloadStarted, "reload started"),
            (EventKind::ReloadFinished { ok: true }, "reload finished: ok"),
            (EventKind::ShutdownStarted, "shutdown started"),
        ] {
            assert_eq!(event(kind, none, none, 0, 0).to_string(), text);
        }
        assert_eq!(
            event(EventKind::Exit(ExitReason::Exited(1)), 1, 1, 4242, 3).to_string(),
            "worker 1 ended: exited with code 1 (slot 1, pid 4242, generation 3)"
        );
        assert_eq!(
            event(EventKind::CrashLoop, 0, 0, 0, 3).to_string(),
            "worker 0 crash loop: not restarting it (slot 0, generation 3)"
        );
        assert_eq!(
            event(EventKind::LockHeldTooLong { lock: 4 }, none, none, 0, 0).to_string(),
            "a process outside the worker table held lock entry 4 past the hold limit"
        );
        for kind in [
            EventKind::Spawned,
            EventKind::Online,
            EventKind::CrashLoop,
            EventKind::ReloadStarted,
            EventKind::ReloadFinished { ok: false },
            EventKind::ShutdownStarted,
            EventKind::StartFailed { errno: 24 },
            EventKind::LockHeldTooLong { lock: 2 },
        ] {
            let text = event(kind, none, none, 0, 0).to_string();
            assert!(!text.contains("4294967295") && !text.contains(" 0"), "{text}");
        }
    }
}
