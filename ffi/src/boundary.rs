//! The panic boundary, argument checks, fork detection and the last error
//! text: what every export goes through.

use std::cell::RefCell;
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::sync::Once;
use std::time::{Duration, Instant};

use crate::result::{shmc_result, Failure};

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

pub(crate) fn set_last_error(text: String) {
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

pub(crate) fn last_error() -> String {
    LAST_ERROR.with(|e| e.borrow().clone())
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    match (p.downcast_ref::<&str>(), p.downcast_ref::<String>()) {
        (Some(s), _) => format!("panic: {s}"),
        (_, Some(s)) => format!("panic: {s}"),
        _ => "panic".into(),
    }
}

/// Runs an export's body: a panic becomes `SHMC_RESULT_PANIC`, a failure
/// its code (and this thread's last error text).
pub(crate) fn guard(f: impl FnOnce() -> Result<(), Failure>) -> shmc_result {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => shmc_result::Ok,
        Ok(Err(failure)) => {
            set_last_error(failure.text);
            failure.code
        }
        Err(p) => {
            set_last_error(panic_text(&*p));
            shmc_result::Panic
        }
    }
}

/// Like [`guard`], but leaves this thread's last error text alone (for the
/// functions that render error texts).
pub(crate) fn guard_quiet(f: impl FnOnce() -> Result<(), Failure>) -> shmc_result {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => shmc_result::Ok,
        Ok(Err(failure)) => failure.code,
        Err(_) => shmc_result::Panic,
    }
}

/// Like [`guard`] for exports that return a value instead of a code:
/// `fallback` on a panic.
pub(crate) fn guard_value<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        set_last_error(panic_text(&*p));
        fallback
    })
}

// ------------------------------------------------------------------ fork

/// Incremented in every forked child (a `pthread_atfork` child handler), so
/// a handle made before a fork knows it is in a child.
static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);
static ATFORK: Once = Once::new();

extern "C" fn after_fork_in_child() {
    FORK_GENERATION.fetch_add(1, Relaxed);
}

/// The current fork generation, registering the handler on first use.
/// A handle records it at creation and compares it on every use.
pub(crate) fn fork_generation() -> u64 {
    ATFORK.call_once(|| {
        // SAFETY: registers a handler that only touches an atomic
        // (async-signal-safe, as a child handler must be).
        let rc = unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
        assert_eq!(rc, 0, "pthread_atfork failed");
    });
    FORK_GENERATION.load(Relaxed)
}

/// `Forked` if a handle made at `generation` is used in a forked child.
pub(crate) fn check_fork(generation: u64) -> Result<(), Failure> {
    if fork_generation() == generation {
        Ok(())
    } else {
        Err(shmc_result::Forked.into())
    }
}

// ------------------------------------------------------------- arguments

/// A NUL-terminated UTF-8 argument.
///
/// # Safety
/// `s` is NULL or a NUL-terminated string valid for the call.
pub(crate) unsafe fn str_arg<'a>(s: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if s.is_null() {
        return Err(Failure::new(shmc_result::NullArgument, format!("{what} is NULL")));
    }
    // SAFETY: non-NULL, and NUL-terminated by our caller's contract.
    unsafe { CStr::from_ptr(s) }
        .to_str()
        .map_err(|e| Failure::new(shmc_result::InvalidArgument, format!("{what} is not UTF-8: {e}")))
}

/// A `(pointer, length)` byte argument; NULL is allowed when `len` is 0.
///
/// # Safety
/// `data` is NULL or valid for reads of `len` bytes for the call.
pub(crate) unsafe fn bytes_arg<'a>(data: *const u8, len: usize) -> Result<&'a [u8], Failure> {
    if len == 0 {
        return Ok(&[]);
    }
    if data.is_null() {
        return Err(Failure::new(
            shmc_result::NullArgument,
            format!("data is NULL with length {len}"),
        ));
    }
    // SAFETY: non-NULL and valid for `len` bytes by our caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(data, len) })
}

/// A call's name (`what`: "event", "method", "topic") and its
/// `(data, len)` bytes, checked in that order.
///
/// # Safety
/// As [`str_arg`] for `name` and [`bytes_arg`] for `data`.
pub(crate) unsafe fn name_and_data<'a>(
    name: *const c_char,
    what: &str,
    data: *const u8,
    len: usize,
) -> Result<(&'a str, &'a [u8]), Failure> {
    // SAFETY: forwarded from our caller.
    unsafe { Ok((str_arg(name, what)?, bytes_arg(data, len)?)) }
}

/// A handle argument (`what`: "worker", "handle", ...): NULL is
/// `SHMC_RESULT_NULL_ARGUMENT`.
///
/// # Safety
/// `p` is NULL or points to a live `T` for the call.
pub(crate) unsafe fn ref_arg<'a, T>(p: *const T, what: &str) -> Result<&'a T, Failure> {
    // SAFETY: NULL or live, by our caller's contract.
    unsafe { p.as_ref() }.ok_or_else(|| Failure::new(shmc_result::NullArgument, format!("{what} is NULL")))
}

/// Checks an out-pointer.
pub(crate) fn out_arg<T>(p: *mut T, what: &str) -> Result<*mut T, Failure> {
    if p.is_null() {
        Err(Failure::new(shmc_result::NullArgument, format!("{what} is NULL")))
    } else {
        Ok(p)
    }
}

/// A deadline `timeout_ms` from now; `SHMC_WAIT_FOREVER` (or anything that
/// does not fit) is a century.
pub(crate) fn deadline(timeout_ms: u64) -> Instant {
    let now = Instant::now();
    now.checked_add(Duration::from_millis(timeout_ms))
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// Writes `text` as a NUL-terminated string into `buf` (truncated to fit),
/// its length into `out_len`.
///
/// # Safety
/// `buf` valid for writes of `len` bytes (or NULL with `len` 0); `out_len`
/// NULL or valid.
pub(crate) unsafe fn write_c_string(
    text: &str,
    buf: *mut u8,
    len: usize,
    out_len: *mut usize,
) -> Result<(), Failure> {
    if !out_len.is_null() {
        // SAFETY: non-NULL and valid by our caller's contract.
        unsafe { out_len.write(text.len()) };
    }
    if len == 0 {
        return Err(shmc_result::BufferTooSmall.into());
    }
    if buf.is_null() {
        return Err(Failure::new(shmc_result::NullArgument, "buf is NULL"));
    }
    let n = text.len().min(len - 1);
    // SAFETY: `buf` holds `len > n` bytes; the source is a separate Rust string.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), buf, n);
        buf.add(n).write(0);
    }
    if n < text.len() {
        Err(shmc_result::BufferTooSmall.into())
    } else {
        Ok(())
    }
}

/// Writes `items` into the caller's array `out` (room for `capacity`) and
/// their number into `*count`: as many as fit, and
/// `SHMC_RESULT_BUFFER_TOO_SMALL` if that is not all of them. `out` (named
/// `what` in the error) may be NULL with `capacity` 0, to ask for the count.
///
/// # Safety
/// `count` checked with [`out_arg`] and valid for a write; `out` NULL or
/// valid for `capacity` writes.
pub(crate) unsafe fn write_list<T>(
    items: impl ExactSizeIterator<Item = T>,
    out: *mut T,
    capacity: usize,
    what: &str,
    count: *mut usize,
) -> Result<(), Failure> {
    let len = items.len();
    // SAFETY: forwarded from our caller.
    unsafe { put(count, len) };
    if capacity > 0 && out.is_null() {
        return Err(Failure::new(shmc_result::NullArgument, format!("{what} is NULL")));
    }
    for (i, item) in items.take(capacity).enumerate() {
        // SAFETY: `i < capacity`; `out` holds `capacity` entries.
        unsafe { out.add(i).write(item) };
    }
    if len > capacity {
        return Err(shmc_result::BufferTooSmall.into());
    }
    Ok(())
}

/// Moves a value to the heap for C.
pub(crate) fn into_handle<T>(value: T) -> *mut T {
    Box::into_raw(Box::new(value))
}

/// Drops a value [`into_handle`] made (NULL is ignored): the plain
/// `*_free` functions.
///
/// # Safety
/// `handle` NULL or made by [`into_handle`] and given back by C, not used
/// afterwards.
pub(crate) unsafe fn free_handle<T>(handle: *mut T) {
    if !handle.is_null() {
        // SAFETY: made by `into_handle`, given back by our caller.
        drop(unsafe { Box::from_raw(handle) });
    }
}

/// Writes `value` through a checked out-pointer.
///
/// # Safety
/// `out` is valid for a write.
pub(crate) unsafe fn put<T>(out: *mut T, value: T) {
    // SAFETY: forwarded from our caller.
    unsafe { out.write(value) }
}

/// Writes `value` through an optional out-pointer: nothing for NULL.
///
/// # Safety
/// `out` is NULL or valid for a write.
pub(crate) unsafe fn put_optional<T>(out: *mut T, value: T) {
    if !out.is_null() {
        // SAFETY: non-NULL; valid by our caller's contract.
        unsafe { out.write(value) }
    }
}
