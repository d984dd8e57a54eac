//! The cluster's shared tables: one [`WorkerEntry`] and one [`StatsEntry`]
//! per slot, one [`LockEntry`] per lock, and one [`Control`] block with the
//! master's event log. Who writes what, and the protocols over them, are
//! `segment::table`'s (and `lock`'s for the lock table).
//!
//! Reserved and padding words are atomics too, so that every byte of these
//! types another process writes is inside one (see [`Shared`]). Where the
//! compiler pads (a lock entry on aarch64, whose mutex is 48 bytes, ends in
//! implicit padding), nobody writes: no field is there.

use std::mem::offset_of;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicU8};

use super::Shared;
use crate::sys::mutex::{MutexStorage, RawMutex};

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
    /// Futex word: `STOP_RUN`, `STOP_DRAIN` or `STOP_SHUTDOWN` (see
    /// `segment::table`).
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

// SAFETY: repr(C), atomics only (any bits are a value; enum-like words are
// decoded with a fallback), 64-aligned.
unsafe impl Shared for WorkerEntry {
    const BY_REFERENCE: bool = true;
}

const _: () = assert!(size_of::<WorkerEntry>() == 128 && align_of::<WorkerEntry>() == 64);

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
    /// Latency in ns of a recent messenger request (`[0]`: one in 16 is
    /// timed) and of the last map (`[1]`).
    pub(crate) last_latency_ns: [AtomicU64; 2],
    /// 1 while a messenger `consume`'s handler runs in this slot, else 0:
    /// stored before the task leaves the lane (so a caller that sees the
    /// lane empty sees this set) and cleared before its answer is sent.
    /// Callers read it to hand tasks to free workers first.
    pub(crate) consume_busy: AtomicU64,
    _reserved: [AtomicU64; 22],
}

// SAFETY: repr(C), atomics only, 64-aligned.
unsafe impl Shared for StatsEntry {
    const BY_REFERENCE: bool = true;
}

const _: () = assert!(size_of::<StatsEntry>() == 256 && align_of::<StatsEntry>() == 64);

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

// SAFETY: repr(C), atomics only, 8-aligned.
unsafe impl Shared for EventRecord {
    const BY_REFERENCE: bool = true;
}

const _: () = assert!(size_of::<EventRecord>() == 32 && align_of::<EventRecord>() == 8);

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
    /// The host's NATS bridge (feature `nats`): its instance index + 1,
    /// 0 when there is none. Written once by the master before any
    /// worker starts; a worker finds the bridge's slot by this index in
    /// the worker table (the master keeps the bridge in its own slot and
    /// never reloads it, but readers do not rely on that). The bridge is
    /// live like any worker but is
    /// no worker of the application: `live_workers` leaves it out, and
    /// the messenger sends it only what crosses hosts.
    pub(crate) bridge: AtomicU32,
    /// The NATS server's `max_payload` as the bridge last saw it (0 until
    /// it knows): what crosses hosts must fit in it, so the messenger
    /// refuses a larger broadcast, map or call to another host up front
    /// (`TooLarge`).
    pub(crate) bridge_max_payload: AtomicU32,
    /// Other hosts the bridge sees connected now: a consume spills to the
    /// bridge only while there are some (or nobody here can take it).
    pub(crate) bridge_hosts: AtomicU32,
    _pad: [AtomicU32; 4],
    pub(crate) events: [EventRecord; EVENT_RING],
}

// SAFETY: repr(C), atomics only (the event records included), 64-aligned.
unsafe impl Shared for Control {
    const BY_REFERENCE: bool = true;
}

const _: () = assert!(offset_of!(Control, events) == 64);
const _: () = assert!(size_of::<Control>() == 64 + EVENT_RING * 32 && align_of::<Control>() == 64);

/// Longest lock name, in bytes.
pub const MAX_LOCK_NAME: usize = 64;

/// One lock-table entry: a robust process-shared mutex, its name and its
/// bookkeeping. Entry 0 serialises the naming of new entries, entry 1 is
/// the global lock, the rest are named on first use.
#[repr(C, align(64))]
pub(crate) struct LockEntry {
    /// The `pthread_mutex_t`, as large as the platform's (the header
    /// records its size, so a build whose libc disagrees refuses to attach).
    pub(crate) mutex: MutexStorage,
    // The holder's bookkeeping follows the mutex in its cache line: a
    // section touches one line, not two (contended 176 -> 161 ns per
    // section here).
    /// Fencing token: bumped by every acquisition (so also the count of
    /// acquisitions).
    pub(crate) token: AtomicU64,
    pub(crate) holder_slot: AtomicU32,
    pub(crate) holder_pid: AtomicU32,
    /// The holder's generation in `holder_slot` when it took the lock: with
    /// the slot, who holds it (a leader), in terms pid reuse cannot fake.
    pub(crate) holder_generation: AtomicU32,
    /// The low 32 bits of the holding process's start time (clock ticks,
    /// `sys::claim::own_identity`): with the pid, the process itself, so a
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
    _pad: [AtomicU64; 3],
    pub(crate) name: [AtomicU8; MAX_LOCK_NAME],
    _reserved: [AtomicU64; 8],
}

// SAFETY: repr(C); atomics, and the mutex storage that only pthread calls
// touch (`sys::mutex`); 64-aligned. A mutex another process scribbled on
// is the one thing not valid for every bit pattern: processes that share a
// segment are trusted not to (the crate's trust model, README). The mutex
// storage is the one place with addresses in it (glibc links a robust
// mutex into its owner's robust list): glibc writes and reads them, and
// this crate never dereferences them.
unsafe impl Shared for LockEntry {
    const BY_REFERENCE: bool = true;
}

// The header records the mutex's size (`Header::mutex_size`): the storage
// here is exactly that, so a libc that disagrees refuses to attach.
const _: () = assert!(size_of::<MutexStorage>() == crate::sys::PTHREAD_MUTEX_SIZE as usize);

/// Where the holder's bookkeeping ends: right after the mutex.
const HOLDER_END: usize = offset_of!(LockEntry, holder_start) + 4;
const _: () = assert!(offset_of!(LockEntry, token) == size_of::<RawMutex>());
const _: () = assert!(HOLDER_END == size_of::<RawMutex>() + 24);
// With glibc's 40-byte mutex on x86-64, mutex and bookkeeping share one
// cache line. (On aarch64 glibc's is 48 bytes, and the last 8 spill over.)
#[cfg(target_arch = "x86_64")]
const _: () = assert!(HOLDER_END <= 64);
// The segment's format (ABI_VERSION): a change of size is a new version.
// The mutex and 216 bytes of bookkeeping, name and reserve, in whole cache
// lines: 256 bytes on x86-64, 320 on aarch64.
const _: () = assert!(size_of::<LockEntry>() == (size_of::<RawMutex>() + 216).next_multiple_of(64));
const _: () = assert!(align_of::<LockEntry>() == 64);
#[cfg(target_arch = "x86_64")]
const _: () = assert!(size_of::<LockEntry>() == 256);
