//! The cluster's shared tables: one [`WorkerEntry`] and one [`StatsEntry`]
//! per slot, and one [`Control`] block with the master's event log. Their
//! layout is in `segment::schema`; here is what the words mean.
//!
//! All of it is atomics only (any bit pattern is a valid value), so a buggy
//! process scribbling here can make the numbers wrong but cannot make a
//! reader misbehave: every enum-like word is decoded with a fallback.
//!
//! Who writes what:
//! - `WorkerEntry`: the master writes everything except `heartbeat` (the
//!   worker) and the `Starting → Ready` transition (the worker).
//! - `StatsEntry`: only the slot's current endpoint (one writer, so plain
//!   load + store, no read-modify-write on the hot path).
//! - `Control` and the event log: only the master, except `reload_requests`
//!   (any worker).

use std::sync::atomic::{fence, AtomicU64, Ordering::*};

pub use super::schema::MAX_LOCK_NAME;
pub(crate) use super::schema::{Control, LockEntry, StatsEntry, WorkerEntry, EVENT_RING};

/// A worker's `stop` word: keep running.
pub(crate) const STOP_RUN: u32 = 0;
/// Finish what is in hand, accept nothing new, exit (rolling reload).
pub(crate) const STOP_DRAIN: u32 = 1;
/// The cluster is shutting down: exit within the grace period.
pub(crate) const STOP_SHUTDOWN: u32 = 2;

impl StatsEntry {
    /// Adds `n` to a counter this process is the only writer of.
    #[inline]
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
    }

    /// Records the latency of the last request (`which` 0) or map (1).
    pub(crate) fn add_latency(&self, which: usize, ns: u64) {
        if let Some(slot) = self.last_latency_ns.get(which) {
            slot.store(ns, Relaxed);
        }
    }
}

/// An event as plain numbers (decoded by the cluster layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawEvent {
    pub(crate) seq: u64,
    pub(crate) kind: u32,
    pub(crate) value: i32,
    pub(crate) slot: u32,
    pub(crate) index: u32,
    pub(crate) pid: u32,
    pub(crate) generation: u32,
}

impl Control {
    /// Publishes an event (master only: one writer). Returns its number.
    pub(crate) fn publish(&self, e: RawEvent) -> u64 {
        let n = self.events_published.load(Relaxed);
        let rec = &self.events[(n % EVENT_RING as u64) as usize];
        rec.seq.store(0, Relaxed);
        // Orders the invalidation before the new fields (seqlock writer).
        fence(Release);
        rec.kind.store(e.kind, Relaxed);
        rec.value.store(e.value, Relaxed);
        rec.slot.store(e.slot, Relaxed);
        rec.index.store(e.index, Relaxed);
        rec.pid.store(e.pid, Relaxed);
        rec.generation.store(e.generation, Relaxed);
        rec.seq.store(n + 1, Release);
        self.events_published.store(n + 1, Release);
        self.events_futex.fetch_add(1, Release);
        crate::sys::futex_wake(&self.events_futex, u32::MAX);
        n
    }

    /// Reads event number `n`: `Ok(Some)` if it is still in the ring,
    /// `Ok(None)` if it is not published yet, `Err(oldest)` if it was
    /// overwritten (`oldest` is the first event still readable).
    pub(crate) fn read(&self, n: u64) -> Result<Option<RawEvent>, u64> {
        let published = self.events_published.load(Acquire);
        if n >= published {
            return Ok(None);
        }
        let oldest = published.saturating_sub(EVENT_RING as u64);
        if n < oldest {
            return Err(oldest);
        }
        let rec = &self.events[(n % EVENT_RING as u64) as usize];
        let s1 = rec.seq.load(Acquire);
        let e = RawEvent {
            seq: n,
            kind: rec.kind.load(Relaxed),
            value: rec.value.load(Relaxed),
            slot: rec.slot.load(Relaxed),
            index: rec.index.load(Relaxed),
            pid: rec.pid.load(Relaxed),
            generation: rec.generation.load(Relaxed),
        };
        // Orders the field reads before the re-check (seqlock reader).
        fence(Acquire);
        let s2 = rec.seq.load(Relaxed);
        if s1 != n + 1 || s2 != s1 {
            // Overwritten while (or before) we read it.
            let published = self.events_published.load(Acquire);
            return Err(published.saturating_sub(EVENT_RING as u64).max(n + 1));
        }
        Ok(Some(e))
    }
}

impl LockEntry {
    /// The mutex, for the `sys::mutex` calls.
    #[inline]
    pub(crate) fn mutex_ptr(&self) -> *mut crate::sys::mutex::RawMutex {
        self.mutex.as_ptr()
    }

    /// The entry's name, if it has one (garbage reads as no name).
    pub(crate) fn name(&self) -> Option<String> {
        if self.named.load(Acquire) != 1 {
            return None;
        }
        let len = (self.name_len.load(Acquire) as usize).min(MAX_LOCK_NAME);
        let bytes: Vec<u8> = self.name[..len].iter().map(|b| b.load(Relaxed)).collect();
        String::from_utf8(bytes).ok()
    }
}
