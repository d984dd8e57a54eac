//! Robust, error-checking, process-shared pthread mutexes in the segment
//! (`pthread_mutexattr_setrobust(3)`, `pthread_mutex_consistent(3)`).
//!
//! A robust mutex whose owner dies is handed to the next locker with
//! `EOWNERDEAD` (the kernel walks the dead thread's robust list), so a
//! crashed holder never leaves the lock held for ever. The error-checking
//! type turns a relock by the owning thread into `EDEADLK` instead of a
//! hang. Every function takes a raw pointer because the mutex lives in
//! memory other processes write; the caller guarantees it is valid.

use std::cell::UnsafeCell;
use std::io;
use std::mem::MaybeUninit;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The platform's mutex type.
pub use libc::pthread_mutex_t as RawMutex;

/// Room for one [`RawMutex`] in shared memory: the size and alignment of
/// the platform's `pthread_mutex_t` (40 bytes with glibc on x86-64, 48 on
/// aarch64), initialised by [`init`] and then touched only through the
/// functions of this module, by pointer ([`MutexStorage::as_ptr`]).
#[repr(transparent)]
pub struct MutexStorage(UnsafeCell<MaybeUninit<RawMutex>>);

impl MutexStorage {
    /// The mutex, for this module's functions.
    pub fn as_ptr(&self) -> *mut RawMutex {
        self.0.get().cast()
    }
}

// SAFETY: the storage is only reached through `as_ptr` by the pthread
// calls of this module, which synchronise with each other (that is what a
// process-shared mutex is for); nothing reads or writes it as Rust data.
unsafe impl Sync for MutexStorage {}

/// How a lock was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// Normally.
    Clean,
    /// The previous owner died holding it (`EOWNERDEAD`): the protected
    /// state may be half-updated. Call [`make_consistent`] before unlocking
    /// or the mutex becomes unusable.
    OwnerDied,
}

/// Why a lock was not obtained.
#[derive(Debug)]
pub enum LockFailure {
    /// Not within the time given (or, for a try-lock, held right now).
    Timeout,
    /// This thread already holds it (`EDEADLK`).
    Deadlock,
    /// A previous owner died and its successor unlocked without making it
    /// consistent (`ENOTRECOVERABLE`): it can never be locked again.
    NotRecoverable,
    /// Anything else.
    Other(io::Error),
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// `pthread_mutex_init(3)` with a robust, error-checking, process-shared
/// attribute.
///
/// # Safety
/// `m` points to writable, suitably aligned memory for a `pthread_mutex_t`
/// that no thread is using as a mutex right now.
pub unsafe fn init(m: *mut RawMutex) -> io::Result<()> {
    let mut attr = std::mem::MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
    // SAFETY: `attr` is local storage that pthread_mutexattr_init
    // initialises; the setters and init take the initialised attribute and
    // the caller's valid mutex pointer; destroy releases the attribute.
    unsafe {
        check(libc::pthread_mutexattr_init(attr.as_mut_ptr()))?;
        let result = (|| {
            check(libc::pthread_mutexattr_setpshared(
                attr.as_mut_ptr(),
                libc::PTHREAD_PROCESS_SHARED,
            ))?;
            check(libc::pthread_mutexattr_setrobust(
                attr.as_mut_ptr(),
                libc::PTHREAD_MUTEX_ROBUST,
            ))?;
            check(libc::pthread_mutexattr_settype(
                attr.as_mut_ptr(),
                libc::PTHREAD_MUTEX_ERRORCHECK,
            ))?;
            check(libc::pthread_mutex_init(m, attr.as_ptr()))
        })();
        libc::pthread_mutexattr_destroy(attr.as_mut_ptr());
        result
    }
}

/// What a pthread lock call's return value `rc` means.
#[inline]
pub fn classify(rc: libc::c_int) -> Result<Acquired, LockFailure> {
    match rc {
        0 => Ok(Acquired::Clean),
        libc::EOWNERDEAD => Ok(Acquired::OwnerDied),
        libc::ETIMEDOUT | libc::EBUSY => Err(LockFailure::Timeout),
        libc::EDEADLK => Err(LockFailure::Deadlock),
        libc::ENOTRECOVERABLE => Err(LockFailure::NotRecoverable),
        e => Err(LockFailure::Other(io::Error::from_raw_os_error(e))),
    }
}

/// `pthread_mutex_trylock(3)`'s return value: for a fast path that takes
/// 0 inline and hands anything else to [`classify`] out of line.
///
/// # Safety
/// `m` points to a mutex initialised by [`init`], valid for the call.
#[inline]
pub unsafe fn try_lock_rc(m: *mut RawMutex) -> libc::c_int {
    // SAFETY: the caller's contract.
    unsafe { libc::pthread_mutex_trylock(m) }
}

/// `pthread_mutex_timedlock(3)`, waiting at most `timeout` (the deadline is
/// on `CLOCK_REALTIME`, as the function requires). Unless `precise`, the
/// deadline is taken from `CLOCK_REALTIME_COARSE` (7 ns here, against 30
/// for the precise clock, on every contended acquisition): it lags by up
/// to a tick (4 ms here), so the wait may end that much early, never late.
/// Callers loop on their own deadline, and ask for `precise` when
/// `timeout` is what is left of it: with the coarse clock, a wait shorter
/// than the lag would return at once, and the caller would spin until
/// the coarse clock caught up (a review measured a 3 ms timed wait using
/// 100% of a CPU).
///
/// # Safety
/// As [`try_lock_rc`].
pub unsafe fn lock_timeout(
    m: *mut RawMutex,
    timeout: Duration,
    precise: bool,
) -> Result<Acquired, LockFailure> {
    let precise_now = || SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let now = if precise {
        precise_now()
    } else {
        coarse_realtime().unwrap_or_else(precise_now)
    };
    let at = now + timeout;
    let ts = libc::timespec {
        tv_sec: at.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: at.subsec_nanos() as libc::c_long,
    };
    // SAFETY: the caller's contract; `ts` is a valid local timespec.
    classify(unsafe { libc::pthread_mutex_timedlock(m, &ts) })
}

/// `clock_gettime(2)` `CLOCK_REALTIME_COARSE` since the epoch.
fn coarse_realtime() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid local timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    (rc == 0 && ts.tv_sec >= 0)
        .then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec.clamp(0, 999_999_999) as u32))
}

/// `pthread_mutex_consistent(3)`: after [`Acquired::OwnerDied`], marks the
/// mutex usable again.
///
/// # Safety
/// `m` is a valid robust mutex this thread holds after `EOWNERDEAD`.
pub unsafe fn make_consistent(m: *mut RawMutex) -> io::Result<()> {
    // SAFETY: the caller's contract.
    check(unsafe { libc::pthread_mutex_consistent(m) })
}

/// `pthread_mutex_unlock(3)`.
///
/// # Safety
/// `m` is a valid mutex this thread holds.
#[inline]
pub unsafe fn unlock(m: *mut RawMutex) -> io::Result<()> {
    // SAFETY: the caller's contract.
    check(unsafe { libc::pthread_mutex_unlock(m) })
}

/// glibc's version (`gnu_get_libc_version(3)`), as (major, minor).
pub fn glibc_version() -> Option<(u32, u32)> {
    // SAFETY: returns a pointer to a static NUL-terminated string.
    let ptr = unsafe { libc::gnu_get_libc_version() };
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-null, static, NUL-terminated (the function's contract).
    let text = unsafe { std::ffi::CStr::from_ptr(ptr) }.to_str().ok()?;
    let mut parts = text.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()?;
    Some((major, minor))
}
