//! What happened in the cluster: [`Event`]s the master publishes in the
//! segment's event log, and why a worker ended ([`ExitReason`]).

use std::fmt;

use crate::segment::table::RawEvent;

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
    pub(super) fn to_raw(self) -> (u32, i32) {
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

    pub(super) fn from_raw(kind: u32, value: i32) -> Option<Self> {
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
/// (read by workers with [`Worker::events`](crate::Worker::events)) and passed to the master's
/// [`ClusterBuilder::on_event`](crate::ClusterBuilder::on_event) callback.
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
    /// A binary upgrade began (`SIGUSR2`, `shmcluster upgrade`): the
    /// master started a new master, `pid`, from its program as now on
    /// disk.
    UpgradeStarted {
        /// The new master's pid.
        pid: u32,
    },
    /// A binary upgrade ended: `ok`, the new master `pid` is ready and
    /// this master drains its workers and exits; or not: the new master
    /// failed, or was killed at the ready timeout, and this master keeps
    /// serving; or it was asked to stop once in charge, and this master
    /// stops too (a [`EventKind::ShutdownStarted`] follows).
    UpgradeFinished {
        /// The new master's pid.
        pid: u32,
        /// Whether the new master took over.
        ok: bool,
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
            EventKind::UpgradeStarted { pid } => format!("upgrade started: new master pid {pid}"),
            EventKind::UpgradeFinished { pid, ok: true } => {
                format!("upgrade finished: ok, new master pid {pid} took over; draining")
            }
            EventKind::UpgradeFinished { pid, ok: false } => {
                format!("upgrade failed: new master pid {pid} did not take over")
            }
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
    pub(super) fn to_raw(self) -> RawEvent {
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
            // The value: the new master's pid; negated for a failure (a
            // pid is at most 2^22, so both fit).
            EventKind::UpgradeStarted { pid } => (9, pid as i32),
            EventKind::UpgradeFinished { pid, ok } => (10, if ok { pid as i32 } else { -(pid as i32) }),
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
    pub(super) fn from_raw(r: RawEvent) -> Option<Self> {
        let kind = match r.kind {
            1 => EventKind::Spawned,
            2 => EventKind::Online,
            3 => EventKind::CrashLoop,
            4 => EventKind::ReloadStarted,
            5 => EventKind::ReloadFinished { ok: r.value != 0 },
            6 => EventKind::ShutdownStarted,
            7 => EventKind::StartFailed { errno: r.value },
            8 => EventKind::LockHeldTooLong { lock: r.value as u32 },
            9 => EventKind::UpgradeStarted { pid: r.value as u32 },
            10 => EventKind::UpgradeFinished {
                pid: r.value.unsigned_abs(),
                ok: r.value > 0,
            },
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

/// The events numbered `since` and later that are still in the segment's
/// log `control`, at most `max` of them (the newest, if more are there),
/// oldest first; and the number the next event will get (what a client
/// asks `since` next time). Events overwritten in the ring, or of a kind
/// this build does not know, are left out.
pub(crate) fn recent(control: &crate::segment::table::Control, since: u64, max: usize) -> (Vec<Event>, u64) {
    let published = control
        .events_published
        .load(std::sync::atomic::Ordering::Acquire);
    let mut n = since.max(published.saturating_sub(max as u64));
    let mut events = Vec::with_capacity(published.saturating_sub(n).min(max as u64) as usize);
    while n < published {
        match control.read(n) {
            Ok(Some(raw)) => events.extend(Event::from_raw(raw)),
            Ok(None) => break,
            // Overwritten meanwhile: go on from the oldest still there.
            Err(oldest) => {
                n = oldest;
                continue;
            }
        }
        n += 1;
    }
    (events, published)
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

    #[test]
    fn recent_answers_the_newest_of_those_asked_for_in_order() {
        let segment = crate::segment::Segment::create(&crate::segment::Config::new(2)).unwrap();
        let control = segment.control();
        assert_eq!(recent(control, 0, 8), (Vec::new(), 0));
        let ring = crate::segment::table::EVENT_RING as u64;
        let total = ring + 10;
        for pid in 1..=total {
            let e = event(EventKind::Spawned, 0, 0, pid as u32, 1);
            control.publish(e.to_raw());
        }
        let seqs = |(events, next): (Vec<Event>, u64)| {
            assert_eq!(next, total);
            events
                .iter()
                .map(|e| (e.seq, u64::from(e.pid)))
                .collect::<Vec<_>>()
        };
        // Only what is new, each with its number.
        assert_eq!(
            seqs(recent(control, total - 2, 8)),
            [(total - 2, total - 1), (total - 1, total)]
        );
        assert_eq!(seqs(recent(control, total, 8)), []);
        assert_eq!(seqs(recent(control, u64::MAX, 8)), []);
        // At most `max`: the newest.
        let got = seqs(recent(control, 0, 8));
        assert_eq!(got.len(), 8);
        assert_eq!(got[0].0, total - 8);
        assert_eq!(got[7].0, total - 1);
        // Overwritten ones are not answered.
        let got = seqs(recent(control, 0, usize::MAX));
        assert_eq!(got.len() as u64, ring);
        assert_eq!(got[0].0, total - ring);
    }
}
