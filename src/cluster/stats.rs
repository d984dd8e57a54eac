//! What the worker table and the counters say: every slot's state and
//! counters ([`ClusterStats`]), and a worker as its peers see it
//! ([`Peer`]).

use std::fmt;
use std::time::Duration;

use super::{ExitReason, WorkerState};
use crate::segment::table::WorkerEntry;
use crate::segment::Segment;
use crate::sys;

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
    /// How long a recent messenger `request` of this slot took: one in 16
    /// is timed (the first one included), as timing one costs a clock read
    /// on its round trip.
    pub last_request: Option<Duration>,
    /// How long this slot's last messenger `map` took.
    pub last_map: Option<Duration>,
    /// Whether this slot's worker is the host's NATS bridge (feature
    /// `nats`, `ClusterBuilder::nats`): one more process of the host, not
    /// one of the application's instances.
    pub bridge: bool,
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
            let index = match s.index {
                _ if s.bridge => "bridge".to_string(),
                Some(i) => i.to_string(),
                None => "-".to_string(),
            };
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
    /// Whether it is the host's NATS bridge (feature `nats`,
    /// `ClusterBuilder::nats`), not one of the application's instances.
    pub bridge: bool,
}

/// The host's NATS bridge's instance index (`Control::bridge`), if the
/// master runs one.
pub(crate) fn bridge_index(segment: &Segment) -> Option<u32> {
    use std::sync::atomic::Ordering::Acquire;
    segment.control().bridge.load(Acquire).checked_sub(1)
}

/// `slot`'s worker as the table shows it; `bridge`: the bridge's index
/// ([`bridge_index`]).
pub(crate) fn read_peer(entry: &WorkerEntry, slot: u32, bridge: Option<u32>) -> Peer {
    use std::sync::atomic::Ordering::Acquire;
    let index = entry.index.load(Acquire);
    let index = (index != u32::MAX && entry.state.load(Acquire) != 0).then_some(index);
    Peer {
        slot,
        index,
        state: WorkerState::from_raw(entry.state.load(Acquire)),
        pid: entry.pid.load(Acquire),
        generation: entry.generation.load(Acquire),
        bridge: index.is_some() && index == bridge,
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
    let bridge = bridge_index(segment);
    let slots = (0..workers)
        .map(|slot| {
            let entry = segment.worker_entry(slot);
            let stats = segment.stats_entry(slot);
            let peer = read_peer(entry, slot, bridge);
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
                bridge: peer.bridge,
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
