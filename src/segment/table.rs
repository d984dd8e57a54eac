//! The cluster's shared tables: one [`WorkerEntry`] and one [`StatsEntry`]
//! per slot, and one [`Control`] block with the master's event log.
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

use std::cell::UnsafeCell;
use std::sync::atomic::{fence, AtomicI32, AtomicU32, AtomicU64, AtomicU8, Ordering::*};

/// One worker slot's lifecycle record (128 bytes).
#[repr(C, align(64))]
pub(crate) struct WorkerEntry {
    /// A [`crate::WorkerState`] number.
    pub(crate) state: AtomicU32,
    /// The worker's stable instance number (0..n); `u32::MAX` when none.
    pub(crate) index: AtomicU32,
    pub(crate) pid: AtomicU32,
    pub(crate) generation: AtomicU32,
    /// Times this slot's worker was replaced after dying.
    pub(crate) restarts: AtomicU32,
    /// How the last worker in this slot ended: an exit-reason code and value.
    pub(crate) last_exit_kind: AtomicU32,
    pub(crate) last_exit_value: AtomicI32,
    /// Futex word: [`STOP_RUN`], [`STOP_DRAIN`] or [`STOP_SHUTDOWN`].
    pub(crate) stop: AtomicU32,
    /// Bumped by the worker (its receive loop, or explicitly).
    pub(crate) heartbeat: AtomicU64,
    /// CLOCK_MONOTONIC ns at which the master last saw `heartbeat` change.
    pub(crate) heartbeat_seen_ns: AtomicU64,
    /// CLOCK_MONOTONIC ns at which the master started this worker.
    pub(crate) started_ns: AtomicU64,
    /// CLOCK_MONOTONIC ns at which the worker declared itself ready.
    pub(crate) ready_ns: AtomicU64,
    _reserved: [AtomicU64; 8],
}

// The segment's format (ABI_VERSION): a change of size is a new version.
const _: () = assert!(size_of::<WorkerEntry>() == 128);

/// A worker's `stop` word: keep running.
pub(crate) const STOP_RUN: u32 = 0;
/// Finish what is in hand, accept nothing new, exit (rolling reload).
pub(crate) const STOP_DRAIN: u32 = 1;
/// The cluster is shutting down: exit within the grace period.
pub(crate) const STOP_SHUTDOWN: u32 = 2;

/// One slot's counters (256 bytes), written only by the slot's endpoint.
#[repr(C, align(64))]
pub(crate) struct StatsEntry {
    pub(crate) sent_messages: AtomicU64,
    pub(crate) sent_bytes: AtomicU64,
    pub(crate) received_messages: AtomicU64,
    pub(crate) received_bytes: AtomicU64,
    /// Times the endpoint parked (futex wait) for a message or for space.
    pub(crate) futex_waits: AtomicU64,
    /// Futex wakes the endpoint issued to a parked receiver.
    pub(crate) futex_wakes: AtomicU64,
    /// Sends that found the lane full and had to wait.
    pub(crate) full_waits: AtomicU64,
    /// Latency in ns of the last messenger request ([0]) and map ([1]).
    pub(crate) last_latency_ns: [AtomicU64; 2],
    _reserved: [AtomicU64; 23],
}

// The segment's format (ABI_VERSION): a change of size is a new version.
const _: () = assert!(size_of::<StatsEntry>() == 256);

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

/// Events kept in the ring; a reader more than this far behind has lost
/// some and is told so.
pub(crate) const EVENT_RING: usize = 256;

/// One published event (32 bytes). `seq` is the event's number + 1, stored
/// last (0 while being written), so a reader can tell a torn or overwritten
/// record from a whole one.
#[repr(C)]
pub(crate) struct EventRecord {
    pub(crate) seq: AtomicU64,
    pub(crate) kind: AtomicU32,
    pub(crate) value: AtomicI32,
    pub(crate) slot: AtomicU32,
    pub(crate) index: AtomicU32,
    pub(crate) pid: AtomicU32,
    pub(crate) generation: AtomicU32,
}

const _: () = assert!(size_of::<EventRecord>() == 32);

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

/// The cluster-wide control words and the event log.
#[repr(C, align(64))]
pub(crate) struct Control {
    /// Pid of the master; 0 when there is none (standalone, threads mode).
    pub(crate) master_pid: AtomicU32,
    /// Futex word: 0 while running, 1 once shutdown has begun.
    pub(crate) shutdown: AtomicU32,
    /// Number of worker instances the master keeps running.
    pub(crate) instances: AtomicU32,
    /// Bumped by workers asking for a rolling reload.
    pub(crate) reload_requests: AtomicU32,
    /// Number of events ever published (the next event's number).
    pub(crate) events_published: AtomicU64,
    /// Futex word bumped (wrapping) with each event, for waiting readers.
    pub(crate) events_futex: AtomicU32,
    /// Bumped by workers asking for a cluster shutdown.
    pub(crate) shutdown_requests: AtomicU32,
    /// Bumped (wrapping, `Release`) by the master each time it has reaped
    /// a worker and marked it dead, before it rings every slot: a messenger
    /// waiting on calls compares it with the value it last looked at and,
    /// when it moved, checks its calls' targets at once instead of at its
    /// next periodic look.
    pub(crate) deaths: AtomicU32,
    _pad: [u32; 7],
    pub(crate) events: [EventRecord; EVENT_RING],
}

/// Bytes of the control region.
pub(crate) const CONTROL_SIZE: usize = size_of::<Control>().div_ceil(4096) * 4096;

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

/// Longest lock name, in bytes.
pub const MAX_LOCK_NAME: usize = 64;

/// One lock-table entry (256 bytes): a robust process-shared mutex, its
/// name and its bookkeeping. Entry 0 serialises the naming of new entries,
/// entry 1 is the global lock, the rest are named on first use.
#[repr(C, align(64))]
pub(crate) struct LockEntry {
    /// Storage for the `pthread_mutex_t` (40 bytes with glibc on x86-64;
    /// the header records the size so a different libc refuses to attach).
    pub(crate) mutex: UnsafeCell<[u64; 5]>,
    // The holder's bookkeeping shares the mutex's cache line: a section
    // touches one line, not two (contended 176 -> 161 ns per section here).
    /// Fencing token: bumped by every acquisition (so also the count of
    /// acquisitions).
    pub(crate) token: AtomicU64,
    pub(crate) holder_slot: AtomicU32,
    pub(crate) holder_pid: AtomicU32,
    /// The holder's generation in `holder_slot` when it took the lock: with
    /// the slot, who holds it (a leader), in terms pid reuse cannot fake.
    pub(crate) holder_generation: AtomicU32,
    /// The low 32 bits of the holding process's start time (clock ticks,
    /// `sys::claim::own_start`): with the pid, the process itself, so a
    /// dead holder is told from a live process given its pid since.
    pub(crate) holder_start: AtomicU32,
    /// 0 while unnamed, 1 once `name` is written (Release).
    pub(crate) named: AtomicU32,
    pub(crate) name_len: AtomicU32,
    /// Acquisitions that had to wait.
    pub(crate) waits: AtomicU64,
    /// Acquisitions that found the previous holder dead.
    pub(crate) owner_died: AtomicU64,
    /// Written by the master, not the holder (a clock read per section
    /// cost ~40% of an uncontended `synchronize`): the CLOCK_MONOTONIC ns at
    /// which it first saw the acquisition whose token is `hold_seen_token`.
    pub(crate) hold_since_ns: AtomicU64,
    pub(crate) hold_seen_token: AtomicU64,
    _pad: [u64; 3],
    pub(crate) name: [AtomicU8; MAX_LOCK_NAME],
    _reserved: [u64; 8],
}

// The segment's format (ABI_VERSION): a change of size is a new version.
const _: () = assert!(size_of::<LockEntry>() == 256);
const _: () = assert!(size_of::<crate::sys::mutex::RawMutex>() <= 40);
const _: () = assert!(std::mem::offset_of!(LockEntry, holder_start) + 4 <= 64);

impl LockEntry {
    /// The mutex, for the `sys::mutex` calls.
    pub(crate) fn mutex_ptr(&self) -> *mut crate::sys::mutex::RawMutex {
        self.mutex.get().cast()
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

// SAFETY: the entry is shared memory meant for concurrent use: atomics,
// and a pthread mutex that is only ever touched through pthread calls.
unsafe impl Sync for LockEntry {}
