//! The master's event log as a worker reads it: [`shmc_events`], a reader
//! from the moment it was made (the Rust `Worker::events`).

use std::ffi::c_char;
use std::sync::Mutex;
use std::time::Duration;

use shmcluster_rs::{Event, EventKind, Events, ExitReason};

use crate::boundary::{self, free_handle, guard, into_handle, out_arg, put, ref_arg, write_c_string};
use crate::result::{shmc_result, Failure};
use crate::worker::{shmc_worker, worker_arg};

/// What happened (the numbers are fixed). `SHMC_EVENT_KIND_EXIT` carries a
/// [`shmc_exit_reason`]; see [`shmc_event`] for what `value` holds.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum shmc_event_kind {
    /// A kind this library does not know (a newer master).
    Unknown = 0,
    /// The master started a worker process.
    Spawned = 1,
    /// The worker declared itself ready.
    Online = 2,
    /// The worker's process ended (`reason` says why).
    Exit = 3,
    /// The slot crashed too often: no more restarts.
    CrashLoop = 4,
    /// A rolling reload began.
    ReloadStarted = 5,
    /// A rolling reload ended; `value` 1 if every instance was replaced.
    ReloadFinished = 6,
    /// Graceful shutdown began.
    ShutdownStarted = 7,
    /// A worker held lock-table entry `value` past the hold limit.
    LockHeldTooLong = 8,
    /// The master could not start a worker (`value`: the errno); it retries.
    StartFailed = 9,
    /// A binary upgrade began: the master started a new master, whose pid
    /// is `value`.
    UpgradeStarted = 10,
    /// A binary upgrade ended; `value` the new master's pid, negated if it
    /// did not take over (as for `RELOAD_FINISHED`, `value > 0`: success).
    UpgradeFinished = 11,
}

/// Why a worker's process ended, for `SHMC_EVENT_KIND_EXIT` (the numbers
/// are fixed; `NONE` for the other kinds).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum shmc_exit_reason {
    /// Not an exit (or a reason this library does not know).
    None = 0,
    /// It exited on its own; `value` is the exit code.
    Exited = 1,
    /// A signal killed it; `value` is the signal.
    Signaled = 2,
    /// Its heartbeat stopped; the master killed it.
    Hung = 3,
    /// A rolling reload replaced it.
    Reloaded = 4,
    /// It ended in the cluster's shutdown.
    Shutdown = 5,
    /// It was not ready within the ready timeout; the master killed it.
    NotReady = 6,
    /// It held a lock past the hold limit and the master killed it.
    LockHeld = 7,
}

/// One event of the cluster's life, as the master published it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct shmc_event {
    /// Its number in the log (0, 1, 2, ...).
    pub seq: u64,
    /// What happened.
    pub kind: shmc_event_kind,
    /// Why the process ended (`SHMC_EVENT_KIND_EXIT`), else `NONE`.
    pub reason: shmc_exit_reason,
    /// The exit code, signal, errno, lock entry or new master's pid the
    /// kind names; 0 if none (`SHMC_EVENT_KIND_RELOAD_FINISHED`: 1 if it
    /// succeeded; `SHMC_EVENT_KIND_UPGRADE_FINISHED`: the pid, negated if
    /// the new master did not take over).
    pub value: i32,
    /// The slot concerned (`UINT32_MAX` for cluster-wide events).
    pub slot: u32,
    /// The instance concerned (`UINT32_MAX` if none).
    pub index: u32,
    /// The worker's pid (0 if none).
    pub pid: u32,
    /// The worker's generation (0 if none).
    pub generation: u32,
}

impl From<Event> for shmc_event {
    fn from(e: Event) -> Self {
        use shmc_event_kind as K;
        use shmc_exit_reason as R;
        let (kind, reason, value) = match e.kind {
            EventKind::Spawned => (K::Spawned, R::None, 0),
            EventKind::Online => (K::Online, R::None, 0),
            EventKind::Exit(r) => {
                let (reason, value) = match r {
                    ExitReason::Exited(code) => (R::Exited, code),
                    ExitReason::Signaled(signal) => (R::Signaled, signal),
                    ExitReason::Hung => (R::Hung, 0),
                    ExitReason::Reloaded => (R::Reloaded, 0),
                    ExitReason::Shutdown => (R::Shutdown, 0),
                    ExitReason::NotReady => (R::NotReady, 0),
                    ExitReason::LockHeld => (R::LockHeld, 0),
                    _ => (R::None, 0),
                };
                (K::Exit, reason, value)
            }
            EventKind::CrashLoop => (K::CrashLoop, R::None, 0),
            EventKind::ReloadStarted => (K::ReloadStarted, R::None, 0),
            EventKind::ReloadFinished { ok } => (K::ReloadFinished, R::None, i32::from(ok)),
            EventKind::ShutdownStarted => (K::ShutdownStarted, R::None, 0),
            EventKind::LockHeldTooLong { lock } => (K::LockHeldTooLong, R::None, lock as i32),
            EventKind::StartFailed { errno } => (K::StartFailed, R::None, errno),
            EventKind::UpgradeStarted { pid } => (K::UpgradeStarted, R::None, pid as i32),
            EventKind::UpgradeFinished { pid, ok } => (K::UpgradeFinished, R::None, upgrade_value(pid, ok)),
            _ => (K::Unknown, R::None, 0),
        };
        Self {
            seq: e.seq,
            kind,
            reason,
            value,
            slot: e.slot,
            index: e.index,
            pid: e.pid,
            generation: e.generation,
        }
    }
}

/// The Rust event a C one stands for; `None` for an unknown kind or reason
/// (a number that names none: the struct came from C, whose enum fields
/// may hold any number, so they are read as `uint32_t`).
///
/// # Safety
/// `e` non-NULL and valid for reads of a `shmc_event`.
unsafe fn to_event(e: *const shmc_event) -> Option<Event> {
    // SAFETY: valid by our caller's contract; the enum fields are read as
    // the uint32_t they are in C (repr(u32)), never as the Rust enums.
    let (kind_raw, reason_raw, e) = unsafe {
        (
            std::ptr::addr_of!((*e).kind).cast::<u32>().read(),
            std::ptr::addr_of!((*e).reason).cast::<u32>().read(),
            RawFields {
                seq: std::ptr::addr_of!((*e).seq).read(),
                value: std::ptr::addr_of!((*e).value).read(),
                slot: std::ptr::addr_of!((*e).slot).read(),
                index: std::ptr::addr_of!((*e).index).read(),
                pid: std::ptr::addr_of!((*e).pid).read(),
                generation: std::ptr::addr_of!((*e).generation).read(),
            },
        )
    };
    let kind = match kind_raw {
        1 => EventKind::Spawned,
        2 => EventKind::Online,
        3 => EventKind::Exit(match reason_raw {
            1 => ExitReason::Exited(e.value),
            2 => ExitReason::Signaled(e.value),
            3 => ExitReason::Hung,
            4 => ExitReason::Reloaded,
            5 => ExitReason::Shutdown,
            6 => ExitReason::NotReady,
            7 => ExitReason::LockHeld,
            _ => return None,
        }),
        4 => EventKind::CrashLoop,
        5 => EventKind::ReloadStarted,
        6 => EventKind::ReloadFinished { ok: e.value != 0 },
        7 => EventKind::ShutdownStarted,
        8 => EventKind::LockHeldTooLong { lock: e.value as u32 },
        9 => EventKind::StartFailed { errno: e.value },
        10 => EventKind::UpgradeStarted { pid: e.value as u32 },
        11 => EventKind::UpgradeFinished {
            pid: e.value.unsigned_abs(),
            ok: e.value > 0,
        },
        _ => return None,
    };
    Some(Event {
        seq: e.seq,
        kind,
        slot: e.slot,
        index: e.index,
        pid: e.pid,
        generation: e.generation,
    })
}

/// `SHMC_EVENT_KIND_UPGRADE_FINISHED`'s `value`: the new master's pid,
/// negated if it did not take over. A pid is at most 2^22; a larger one
/// (only a corrupt log holds it) is clamped so negating cannot overflow.
fn upgrade_value(pid: u32, ok: bool) -> i32 {
    let pid = i32::try_from(pid).unwrap_or(i32::MAX);
    if ok {
        pid
    } else {
        -pid
    }
}

/// The plain fields of a C [`shmc_event`].
struct RawFields {
    seq: u64,
    value: i32,
    slot: u32,
    index: u32,
    pid: u32,
    generation: u32,
}

/// A reader of the master's event log from the moment it was made
/// ([`shmc_events_new`]); freed by [`shmc_events_free`]. Without a master
/// it never reads an event (nobody publishes any).
///
/// **Threads:** any thread, independent of the worker it was made from
/// (which may be busy on another thread, or freed); calls on one reader are
/// serialized. **fork():** survives (it reads the shared segment only).
pub struct shmc_events {
    events: Mutex<Events>,
    /// What the reader had missed when it was made (before "now").
    missed_before: u64,
}

// The worker's reader is cloned from any thread through a shared reference.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Events>();
};

/// Makes a reader of the master's events from now on and stores it in
/// `*out` (free it with [`shmc_events_free`]).
///
/// Any thread, also while another drives the worker.
///
/// # Errors
/// `SHMC_RESULT_NULL_ARGUMENT`, `SHMC_RESULT_FORKED`.
///
/// # Safety
/// `w` NULL or a live handle; `out` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_events_new(w: *const shmc_worker, out: *mut *mut shmc_events) -> shmc_result {
    guard(|| {
        let out = out_arg(out, "out")?;
        // SAFETY: forwarded from our caller.
        let worker = unsafe { worker_arg(w) }?;
        // The worker's reader starts at the worker's start: read up to now.
        let mut events = worker.events.clone();
        while events.try_next().is_some() {}
        let handle = into_handle(shmc_events {
            missed_before: events.missed(),
            events: Mutex::new(events),
        });
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, handle) };
        Ok(())
    })
}

/// Waits up to `timeout_ms` (0: only looks; `SHMC_WAIT_FOREVER`: no limit)
/// for the next event and stores it in `*event`.
///
/// # Errors
/// `SHMC_RESULT_TIMED_OUT` (no event in time; `*event` untouched),
/// `SHMC_RESULT_NULL_ARGUMENT`.
///
/// # Safety
/// `events` NULL or a live reader; `event` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_events_next(
    events: *const shmc_events,
    timeout_ms: u64,
    event: *mut shmc_event,
) -> shmc_result {
    guard(|| {
        let out = out_arg(event, "event")?;
        // SAFETY: forwarded from our caller.
        let reader = unsafe { ref_arg(events, "events") }?;
        let mut reader = reader.events.lock().unwrap_or_else(|p| p.into_inner());
        let next = if timeout_ms == 0 {
            reader.try_next()
        } else {
            // A far deadline for SHMC_WAIT_FOREVER, as the other waits.
            let wait = boundary::deadline(timeout_ms).saturating_duration_since(std::time::Instant::now());
            reader.next_timeout(wait.max(Duration::from_millis(1)))
        };
        let e = next.ok_or_else(|| Failure::from(shmc_result::TimedOut))?;
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, shmc_event::from(e)) };
        Ok(())
    })
}

/// Stores in `*missed` how many events were overwritten before this reader
/// got to them (the log keeps the last 256).
///
/// # Safety
/// `events` NULL or a live reader; `missed` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_events_missed(events: *const shmc_events, missed: *mut u64) -> shmc_result {
    guard(|| {
        let out = out_arg(missed, "missed")?;
        // SAFETY: forwarded from our caller.
        let reader = unsafe { ref_arg(events, "events") }?;
        let n = reader.events.lock().unwrap_or_else(|p| p.into_inner()).missed() - reader.missed_before;
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, n) };
        Ok(())
    })
}

/// Frees a reader (NULL is ignored).
///
/// # Safety
/// `events` NULL or a live reader, not used afterwards (nor during: no other
/// thread may be in a call on it).
#[no_mangle]
pub unsafe extern "C" fn shmc_events_free(events: *mut shmc_events) {
    boundary::guard_value((), || {
        // SAFETY: forwarded from our caller.
        unsafe { free_handle(events) }
    })
}

/// Writes the line an operator reads for `event` (`worker 1 ended: exited
/// with code 3 (slot 1, pid 4242, generation 2)`) into `buf`, as
/// [`crate::shmc_error_string`] writes (truncated to fit, NUL-terminated,
/// full length in `*out_len`).
///
/// # Errors
/// `SHMC_RESULT_INVALID_ARGUMENT` for a kind or reason no event has,
/// `SHMC_RESULT_BUFFER_TOO_SMALL`, `SHMC_RESULT_NULL_ARGUMENT`.
///
/// # Safety
/// `event` NULL or valid; `buf` valid for writes of `len` bytes; `out_len`
/// NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn shmc_event_format(
    event: *const shmc_event,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> shmc_result {
    guard(|| {
        if event.is_null() {
            return Err(Failure::new(shmc_result::NullArgument, "event is NULL"));
        }
        // SAFETY: non-NULL; valid by our caller's contract.
        let e = unsafe { to_event(event) }
            .ok_or_else(|| Failure::new(shmc_result::InvalidArgument, "no such event kind or reason"))?;
        // SAFETY: forwarded from our caller.
        unsafe { write_c_string(&e.to_string(), buf.cast(), len, out_len) }
    })
}

/// Writes the name of event kind `kind` (`"SPAWNED"`, `"EXIT"`, ...: the
/// `SHMC_EVENT_` constant without its prefix) into `buf`, as
/// [`shmc_event_format`] writes. `SHMC_RESULT_INVALID_ARGUMENT` for a number
/// that names no kind. Thread-safe, survives fork.
///
/// # Safety
/// `buf` valid for writes of `len` bytes; `out_len` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn shmc_event_kind_name(
    kind: u32,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> shmc_result {
    guard(|| {
        let name = match kind {
            0 => "UNKNOWN",
            1 => "SPAWNED",
            2 => "ONLINE",
            3 => "EXIT",
            4 => "CRASH_LOOP",
            5 => "RELOAD_STARTED",
            6 => "RELOAD_FINISHED",
            7 => "SHUTDOWN_STARTED",
            8 => "LOCK_HELD_TOO_LONG",
            9 => "START_FAILED",
            10 => "UPGRADE_STARTED",
            11 => "UPGRADE_FINISHED",
            _ => {
                return Err(Failure::new(
                    shmc_result::InvalidArgument,
                    format!("{kind} is no event kind"),
                ))
            }
        };
        // SAFETY: forwarded from our caller.
        unsafe { write_c_string(name, buf.cast(), len, out_len) }
    })
}

/// Writes the name of exit reason `reason` (`"EXITED"`, `"SIGNALED"`, ...)
/// into `buf`, as [`shmc_event_kind_name`].
///
/// # Safety
/// `buf` valid for writes of `len` bytes; `out_len` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn shmc_exit_reason_name(
    reason: u32,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> shmc_result {
    guard(|| {
        let name = match reason {
            0 => "NONE",
            1 => "EXITED",
            2 => "SIGNALED",
            3 => "HUNG",
            4 => "RELOADED",
            5 => "SHUTDOWN",
            6 => "NOT_READY",
            7 => "LOCK_HELD",
            _ => {
                return Err(Failure::new(
                    shmc_result::InvalidArgument,
                    format!("{reason} is no exit reason"),
                ))
            }
        };
        // SAFETY: forwarded from our caller.
        unsafe { write_c_string(name, buf.cast(), len, out_len) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind) -> Event {
        Event {
            seq: 7,
            kind,
            slot: u32::MAX,
            index: u32::MAX,
            pid: 0,
            generation: 0,
        }
    }

    fn kind_name(kind: u32) -> Result<String, shmc_result> {
        let mut buf = [0u8; 64];
        // SAFETY: `buf` is valid for writes of its length; no out_len.
        let r =
            unsafe { shmc_event_kind_name(kind, buf.as_mut_ptr().cast(), buf.len(), std::ptr::null_mut()) };
        if r != shmc_result::Ok {
            return Err(r);
        }
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
    }

    #[test]
    fn upgrade_events_map_to_their_kinds_and_back() {
        let cases = [
            (
                EventKind::UpgradeStarted { pid: 4321 },
                shmc_event_kind::UpgradeStarted,
                4321,
            ),
            (
                EventKind::UpgradeFinished { pid: 4321, ok: true },
                shmc_event_kind::UpgradeFinished,
                4321,
            ),
            (
                EventKind::UpgradeFinished { pid: 4321, ok: false },
                shmc_event_kind::UpgradeFinished,
                -4321,
            ),
        ];
        for (kind, c_kind, value) in cases {
            let c = shmc_event::from(event(kind));
            assert_eq!(
                (c.kind, c.reason, c.value),
                (c_kind, shmc_exit_reason::None, value),
                "{kind:?}"
            );
            assert_eq!((c.slot, c.index, c.pid, c.generation), (u32::MAX, u32::MAX, 0, 0));
            // SAFETY: a live local struct.
            assert_eq!(unsafe { to_event(&c) }, Some(event(kind)), "{kind:?} round trip");
        }
    }

    #[test]
    fn every_kind_round_trips_and_has_a_name() {
        let kinds = [
            EventKind::Spawned,
            EventKind::Online,
            EventKind::Exit(ExitReason::Exited(3)),
            EventKind::Exit(ExitReason::Signaled(9)),
            EventKind::Exit(ExitReason::Hung),
            EventKind::Exit(ExitReason::Reloaded),
            EventKind::Exit(ExitReason::Shutdown),
            EventKind::Exit(ExitReason::NotReady),
            EventKind::Exit(ExitReason::LockHeld),
            EventKind::CrashLoop,
            EventKind::ReloadStarted,
            EventKind::ReloadFinished { ok: true },
            EventKind::ReloadFinished { ok: false },
            EventKind::ShutdownStarted,
            EventKind::LockHeldTooLong { lock: 5 },
            EventKind::StartFailed { errno: 24 },
            EventKind::UpgradeStarted { pid: 99 },
            EventKind::UpgradeFinished { pid: 99, ok: true },
            EventKind::UpgradeFinished { pid: 99, ok: false },
        ];
        let mut seen = std::collections::BTreeSet::new();
        for kind in kinds {
            let c = shmc_event::from(event(kind));
            assert_ne!(c.kind, shmc_event_kind::Unknown, "{kind:?} is mapped");
            // SAFETY: a live local struct.
            assert_eq!(unsafe { to_event(&c) }, Some(event(kind)), "{kind:?} round trip");
            seen.insert(c.kind as u32);
        }
        // Every C kind but UNKNOWN is reached, and has its constant's name.
        assert_eq!(seen, (1..=11).collect());
        let names: Vec<_> = (0..=11).map(|k| kind_name(k).unwrap()).collect();
        assert_eq!(
            names,
            [
                "UNKNOWN",
                "SPAWNED",
                "ONLINE",
                "EXIT",
                "CRASH_LOOP",
                "RELOAD_STARTED",
                "RELOAD_FINISHED",
                "SHUTDOWN_STARTED",
                "LOCK_HELD_TOO_LONG",
                "START_FAILED",
                "UPGRADE_STARTED",
                "UPGRADE_FINISHED",
            ]
        );
        assert_eq!(kind_name(12), Err(shmc_result::InvalidArgument));
    }

    #[test]
    fn a_corrupt_upgrade_pid_neither_panics_nor_flips_the_outcome() {
        for (pid, ok) in [(u32::MAX, false), (u32::MAX, true), (1 << 31, false)] {
            let c = shmc_event::from(event(EventKind::UpgradeFinished { pid, ok }));
            assert_eq!(c.value > 0, ok, "pid {pid}");
        }
        // A C caller's struct with the most negative value: no overflow.
        let mut c = shmc_event::from(event(EventKind::UpgradeFinished { pid: 1, ok: false }));
        c.value = i32::MIN;
        // SAFETY: a live local struct.
        let back = unsafe { to_event(&c) }.map(|e| e.kind);
        assert_eq!(
            back,
            Some(EventKind::UpgradeFinished {
                pid: 1 << 31,
                ok: false
            })
        );
    }
}
