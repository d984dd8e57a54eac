//! Shared (inter-process) futex wait and wake.
//!
//! The private flag is never used here: a private futex is keyed by the
//! virtual address in one process, so a waker in another process (whose
//! mapping sits at another address, or even the same one) would never find
//! the waiter, and the wakeup would be lost silently. Shared futexes are keyed
//! by the underlying page, which is what a memfd segment needs.

use std::io;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// How a [`futex_wait`] returned. Every outcome means "look again": futex
/// waits can return spuriously.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FutexWait {
    /// Woken by a [`futex_wake`] (or spuriously).
    Woken,
    /// The word did not hold `expected` when the kernel looked (`EAGAIN`).
    ValueChanged,
    /// The timeout passed (`ETIMEDOUT`).
    TimedOut,
    /// A signal handler ran (`EINTR`).
    Interrupted,
}

/// `futex(2)` `FUTEX_WAIT` (shared): sleeps while `*word == expected`, for at
/// most `timeout` (`None`: no limit; callers in this crate always pass one as
/// a safety net). The kernel compares and sleeps atomically with respect to
/// [`futex_wake`], which is what makes the park/notify handshake lossless.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> FutexWait {
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a live, aligned 32-bit atomic for the duration of the
    // call (the borrow guarantees it); the kernel only reads it. `ts_ptr` is
    // null or points to `ts`, which outlives the call. FUTEX_WAIT takes no
    // further pointer arguments (uaddr2 and val3 are ignored).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    if ret == 0 {
        return FutexWait::Woken;
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => FutexWait::ValueChanged,
        Some(libc::ETIMEDOUT) => FutexWait::TimedOut,
        Some(libc::EINTR) => FutexWait::Interrupted,
        // EFAULT/EINVAL cannot happen for a valid &AtomicU32; treat anything
        // else as a spurious return so the caller re-checks its condition.
        _ => FutexWait::Woken,
    }
}

/// `futex(2)` `FUTEX_WAKE` (shared): wakes up to `count` waiters sleeping on
/// `word`, in this or any other process that maps the same page. Returns how
/// many were woken.
pub fn futex_wake(word: &AtomicU32, count: u32) -> usize {
    let count = count.min(i32::MAX as u32);
    // SAFETY: `word` is a live, aligned 32-bit atomic; FUTEX_WAKE does not
    // dereference it (the address is only a key) and takes no other pointers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            count,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    usize::try_from(ret).unwrap_or(0)
}
