//! Cross-process locks: `shmc_lock` / `shmc_unlock` and `shmc_synchronize`.

use std::ffi::{c_char, c_void};
use std::thread::ThreadId;
use std::time::Duration;

use shmcluster_rs::LockGuard;

use crate::boundary::{self, check_fork, guard, into_handle, out_arg, put, str_arg};
use crate::messaging::UserData;
use crate::result::{shmc_result, Failure};
use crate::worker::{shmc_worker, with_worker};

/// A held lock, from [`shmc_lock`]. Released by [`shmc_unlock`] **on the
/// thread that took it** (a pthread mutex belongs to its locking thread; on
/// another thread `shmc_unlock` returns `SHMC_RESULT_WRONG_THREAD` and the
/// lock stays held). It outlives the worker it was taken through.
///
/// **fork():** does not survive: the lock is the parent's. In a child
/// [`shmc_unlock`] returns `SHMC_RESULT_FORKED` and only forgets the handle.
/// A process that dies holding it (SIGKILL included) does not leave it
/// held: the next holder sees [`shmc_lock_previous_owner_died`].
pub struct shmc_lock {
    guard: LockGuard,
    thread: ThreadId,
    fork_generation: u64,
}

fn timeout_of(timeout_ms: u64) -> Option<Duration> {
    (timeout_ms != crate::SHMC_WAIT_FOREVER).then(|| Duration::from_millis(timeout_ms))
}

/// Takes lock `name` (`""` is the global lock) for this worker, waiting up
/// to `timeout_ms` (`SHMC_WAIT_FOREVER`: without limit), and stores the held
/// lock in `*out`. If the previous holder died holding it,
/// [`shmc_lock_previous_owner_died`] says so: check or repair the data it
/// protects before relying on it. The caller owns `*out` and releases it
/// with [`shmc_unlock`] on this thread.
///
/// # Errors
/// `SHMC_RESULT_LOCK_TIMEOUT`, `SHMC_RESULT_LOCK_WOULD_DEADLOCK` (this thread
/// holds it), `SHMC_RESULT_LOCK_NAME_TOO_LONG`, `SHMC_RESULT_LOCK_TABLE_FULL`,
/// `SHMC_RESULT_LOCK_UNRECOVERABLE`, `SHMC_RESULT_GLIBC`.
///
/// # Safety
/// `w` NULL or a live handle; `name` NUL-terminated; `out` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn shmc_lock_acquire(
    w: *const shmc_worker,
    name: *const c_char,
    timeout_ms: u64,
    out: *mut *mut shmc_lock,
) -> shmc_result {
    guard(|| {
        let out = out_arg(out, "out")?;
        // SAFETY: forwarded from our caller.
        let name = unsafe { str_arg(name, "name") }?;
        // SAFETY: forwarded from our caller.
        let guard = unsafe {
            with_worker(w, |inner| {
                Ok(inner.locks()?.lock(name, timeout_of(timeout_ms))?)
            })
        }?;
        let lock = shmc_lock {
            guard,
            thread: std::thread::current().id(),
            fork_generation: boundary::fork_generation(),
        };
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, into_handle(lock)) };
        Ok(())
    })
}

/// Whether the previous holder died holding the lock (false for NULL).
///
/// # Safety
/// `lock` NULL or a live lock.
#[no_mangle]
pub unsafe extern "C" fn shmc_lock_previous_owner_died(lock: *const shmc_lock) -> bool {
    boundary::guard_value(false, || {
        // SAFETY: NULL or a live handle, by our caller's contract.
        let lock = unsafe { lock.as_ref() };
        lock.is_some_and(|l| l.guard.previous_owner_died())
    })
}

/// This acquisition's fencing token: larger than every earlier one of the
/// lock (0 for NULL). A store that keeps the largest token it accepted can
/// refuse a holder that has since lost the lock.
///
/// # Safety
/// `lock` NULL or a live lock.
#[no_mangle]
pub unsafe extern "C" fn shmc_lock_fencing_token(lock: *const shmc_lock) -> u64 {
    boundary::guard_value(0, || {
        // SAFETY: NULL or a live handle, by our caller's contract.
        let lock = unsafe { lock.as_ref() };
        lock.map_or(0, |l| l.guard.fencing_token())
    })
}

/// Releases the lock and frees the handle (NULL is ignored). On another
/// thread than the one that took it: `SHMC_RESULT_WRONG_THREAD`, nothing
/// released, the handle stays valid. In a forked child:
/// `SHMC_RESULT_FORKED`, the handle is forgotten.
///
/// # Safety
/// `lock` NULL or a live lock, not used after `SHMC_RESULT_OK` or
/// `SHMC_RESULT_FORKED`.
#[no_mangle]
pub unsafe extern "C" fn shmc_unlock(lock: *mut shmc_lock) -> shmc_result {
    guard(|| {
        if lock.is_null() {
            return Ok(());
        }
        // SAFETY: a live handle, by our caller's contract.
        let l = unsafe { &*lock };
        if check_fork(l.fork_generation).is_err() {
            // SAFETY: made by `into_handle`, given up by our caller; the
            // guard is forgotten, never dropped, so the parent's lock is
            // left alone.
            std::mem::forget(unsafe { Box::from_raw(lock) });
            return Err(shmc_result::Forked.into());
        }
        if l.thread != std::thread::current().id() {
            return Err(Failure::new(
                shmc_result::WrongThread,
                "shmc_unlock on another thread than the one that took the lock",
            ));
        }
        // SAFETY: made by `into_handle`, given up by our caller, on its thread.
        drop(unsafe { Box::from_raw(lock) });
        Ok(())
    })
}

/// What a synchronized section knows.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct shmc_section {
    /// Whether the previous holder died holding the lock.
    pub previous_owner_died: bool,
    /// This acquisition's fencing token.
    pub fencing_token: u64,
}

/// A critical section: `userdata` as given, and the section's facts (valid
/// during the call). It must not call functions on the worker that runs it
/// (`SHMC_RESULT_BUSY`).
pub type shmc_section_fn = Option<unsafe extern "C" fn(userdata: *mut c_void, section: *const shmc_section)>;

/// Runs `section` holding lock `name` (`""` is the global lock) across every
/// process on the segment, waiting up to `timeout_ms` for it
/// (`SHMC_WAIT_FOREVER`: without limit), and releases it when `section`
/// returns. Runs on the calling thread; `userdata` is only used during the
/// call. Errors as [`shmc_lock_acquire`].
///
/// # Safety
/// `w` NULL or a live handle; `name` NUL-terminated; `section` a function
/// that may be called with `userdata`.
#[no_mangle]
pub unsafe extern "C" fn shmc_synchronize(
    w: *const shmc_worker,
    name: *const c_char,
    timeout_ms: u64,
    section: shmc_section_fn,
    userdata: *mut c_void,
) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        let name = unsafe { str_arg(name, "name") }?;
        let f = section.ok_or_else(|| Failure::new(shmc_result::NullArgument, "section is NULL"))?;
        let userdata = UserData(userdata);
        let body = |inner: &mut crate::worker::WorkerInner| {
            let locks = inner.locks()?;
            let run = |s: &shmcluster_rs::Section| {
                let facts = shmc_section {
                    previous_owner_died: s.previous_owner_died(),
                    fencing_token: s.fencing_token(),
                };
                // SAFETY: the C section's contract: called with its
                // userdata and the facts, valid for the call.
                unsafe { f(userdata.0, &facts) };
            };
            match timeout_of(timeout_ms) {
                None => locks.synchronize_key(name, run)?,
                Some(t) => locks.try_synchronize(name, t, run)?,
            }
            Ok(())
        };
        // SAFETY: forwarded from our caller.
        unsafe { with_worker(w, body) }
    })
}

/// A worker's lock table for threads other than the one driving it
/// ([`shmc_worker_locks`]): [`shmc_locks_acquire`] takes a lock from any
/// thread while the worker is driven elsewhere (an event loop's section
/// thread, which holds the lock across the loop's awaits). It outlives the
/// worker (it keeps the segment mapped). Freed by [`shmc_locks_free`].
///
/// **Threads:** any, several at once. **fork():** does not survive (the
/// locks would be recorded as the parent's slot): `SHMC_RESULT_FORKED`.
pub struct shmc_locks {
    locks: shmcluster_rs::Locks,
    fork_generation: u64,
}

/// Stores this worker's lock table in `*out` (see [`shmc_locks`]).
///
/// # Errors
/// `SHMC_RESULT_NULL_ARGUMENT`, `SHMC_RESULT_BUSY`, `SHMC_RESULT_FORKED`,
/// `SHMC_RESULT_IO`.
///
/// # Safety
/// `w` NULL or a live handle; `out` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_worker_locks(w: *const shmc_worker, out: *mut *mut shmc_locks) -> shmc_result {
    guard(|| {
        let out = out_arg(out, "out")?;
        // SAFETY: forwarded from our caller.
        let locks = unsafe { with_worker(w, |inner| Ok(inner.locks()?.clone())) }?;
        let handle = shmc_locks {
            locks,
            fork_generation: boundary::fork_generation(),
        };
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, into_handle(handle)) };
        Ok(())
    })
}

/// [`shmc_lock_acquire`] through a lock table, on any thread: takes lock
/// `name`, waiting up to `timeout_ms`, and stores the held lock in `*out`,
/// released with [`shmc_unlock`] **on this thread**. Errors as
/// [`shmc_lock_acquire`] (`SHMC_RESULT_LOCK_TIMEOUT`, ...).
///
/// # Safety
/// `locks` NULL or a live lock table; `name` NUL-terminated; `out` NULL or
/// valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_locks_acquire(
    locks: *const shmc_locks,
    name: *const c_char,
    timeout_ms: u64,
    out: *mut *mut shmc_lock,
) -> shmc_result {
    guard(|| {
        let out = out_arg(out, "out")?;
        // SAFETY: forwarded from our caller.
        let locks = unsafe { crate::boundary::ref_arg(locks, "locks") }?;
        check_fork(locks.fork_generation)?;
        // SAFETY: forwarded from our caller.
        let name = unsafe { str_arg(name, "name") }?;
        let guard = locks.locks.lock(name, timeout_of(timeout_ms))?;
        let lock = shmc_lock {
            guard,
            thread: std::thread::current().id(),
            fork_generation: boundary::fork_generation(),
        };
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, into_handle(lock)) };
        Ok(())
    })
}

/// Frees a lock table (NULL is ignored); the locks taken through it stay
/// held until their [`shmc_unlock`].
///
/// # Safety
/// `locks` NULL or a live lock table, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn shmc_locks_free(locks: *mut shmc_locks) {
    boundary::guard_value((), || {
        if !locks.is_null() {
            // SAFETY: made by `into_handle`, given back by our caller.
            let l = unsafe { Box::from_raw(locks) };
            if check_fork(l.fork_generation).is_err() {
                // The parent's mapping stays as it is in the child.
                std::mem::forget(l);
            }
        }
    })
}
