//! `shmc_handle`: a worker's calls from any thread.
//!
//! A `shmc_worker` is driven by one thread at a time (its messenger is not
//! thread-safe), so a call from another thread (an HTTP server's thread
//! that wants to `map` while the main thread runs `shmc_run`) cannot use
//! it: `SHMC_RESULT_BUSY`. A handle queues the call as a job for the thread
//! that drives the worker, wakes that thread (a message to its own slot
//! through the library's `MessengerHandle`, which ends a parked
//! `shmc_poll`), and waits for the answer. The driving thread runs the jobs
//! in `shmc_run`, `shmc_poll` and `shmc_dispatch`, one at a time, between
//! the messages it dispatches: the call protocol stays the messenger's.
//!
//! How the two sides meet:
//!
//! | caller thread (`Handle::call`)     | driving thread (`Jobs::run`)          |
//! |------------------------------------|---------------------------------------|
//! | push the job (queue lock)          |                                       |
//! | queue was empty: wake the worker   | poll ends: pop jobs (queue lock)      |
//! | wait on the job's channel          | run each, send its answer             |
//! | deadline + 1 s: cancel, TIMED_OUT  | a cancelled job is skipped            |
//!
//! Freeing the worker closes the queue: queued jobs are dropped (their
//! callers get `SHMC_RESULT_WORKER_CLOSED`), later calls fail at once.

use std::cell::Cell;
use std::collections::VecDeque;
use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shmcluster_rs::{Messenger, MessengerHandle, Target, MAX_EVENT_NAME};

use crate::boundary::{self, check_fork, guard, into_handle, name_and_data, out_arg, put, ref_arg, str_arg};
use crate::call::Via;
use crate::messaging::{shmc_bytes, shmc_consumed, shmc_map_result, target_arg};
use crate::result::{shmc_result, Failure};
use crate::worker::{shmc_worker, worker_arg, WorkerInner};

/// The event a handle's wake-up message carries: it starts with a NUL, so
/// no C or Python event (a NUL-terminated string) can be named the same.
const WAKE_EVENT: &str = "\0shmc:handle-wake";

/// A call queued for the worker's thread.
type Job = Box<dyn FnOnce(&mut WorkerInner) + Send>;

/// The calls handles queued for one worker.
pub(crate) struct Jobs {
    queue: Mutex<VecDeque<Job>>,
    /// Set when the worker is freed: nothing is queued any more.
    closed: AtomicBool,
}

impl Jobs {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::new(VecDeque::new()),
            closed: AtomicBool::new(false),
        })
    }

    /// Runs every queued job, in order, on the worker's thread. A job that
    /// panics drops its answer channel: its caller gets
    /// `SHMC_RESULT_PANIC`, and the other jobs still run.
    pub fn run(&self, inner: &mut WorkerInner) {
        loop {
            let job = self.queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
            let Some(job) = job else {
                return;
            };
            let _ = catch_unwind(AssertUnwindSafe(|| job(inner)));
        }
    }

    /// The worker is being freed: drop what is queued and refuse the rest.
    pub fn close(&self) {
        self.closed.store(true, Release);
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Queues `job`; whether the queue was empty (then the worker's thread
    /// must be woken; otherwise it is about to run the queue anyway).
    fn push(&self, job: Job) -> Result<bool, Failure> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        // Checked under the lock `close` clears the queue under: a job
        // queued after `close` would never run.
        if self.closed.load(Acquire) {
            return Err(shmc_result::WorkerClosed.into());
        }
        let was_empty = queue.is_empty();
        queue.push_back(job);
        Ok(was_empty)
    }
}

thread_local! {
    /// The jobs of the worker this thread is driving right now (inside a
    /// call on it), if any.
    static DRIVING: Cell<*const Jobs> = const { Cell::new(std::ptr::null()) };
}

/// Marks this thread as driving a worker while it lives (a handle call on
/// this thread for that worker would wait for itself).
pub(crate) struct Driving(*const Jobs);

impl Driving {
    pub fn enter(jobs: &Arc<Jobs>) -> Self {
        Self(DRIVING.with(|d| d.replace(Arc::as_ptr(jobs))))
    }
}

impl Drop for Driving {
    fn drop(&mut self) {
        DRIVING.with(|d| d.set(self.0));
    }
}

/// Registers the (empty) handler of the wake-up message, so it counts as
/// handled in the event stats.
pub(crate) fn register_wake(messenger: &mut Messenger) -> Result<(), Failure> {
    messenger.on_bytes(WAKE_EVENT, |_, _| Vec::new())?;
    Ok(())
}

/// A thread-safe handle on a worker, from [`shmc_worker_handle`], freed
/// with [`shmc_handle_free`]. Its calls are run by the thread that drives
/// the worker in [`crate::shmc_run`], [`crate::shmc_poll`] or
/// [`crate::shmc_dispatch`] (a call wakes a parked poll), one at a time and
/// in the order they were made, between the messages it dispatches; not
/// while that thread is inside one of the worker's own blocking calls
/// (request, map, ...), after which they run. A call waits for that, so the
/// worker must be driven (otherwise a call ends with
/// `SHMC_RESULT_TIMED_OUT` a second after its own timeout).
///
/// **Threads:** any thread, any number at once (it is `Send` and `Sync`),
/// but not the thread that is driving the worker right now (from inside a
/// handler, say): that call would wait for itself and is refused with
/// `SHMC_RESULT_IN_HANDLER` (use the worker's own functions there).
///
/// **Lifetime:** independent of the worker's: after [`crate::shmc_worker_free`]
/// its calls return `SHMC_RESULT_WORKER_CLOSED` (calls queued then, too);
/// free it with [`shmc_handle_free`] either way.
///
/// **fork():** does not survive. In a forked child its calls return
/// `SHMC_RESULT_FORKED`; [`shmc_handle_free`] only forgets it.
pub struct shmc_handle {
    jobs: Arc<Jobs>,
    wake: MessengerHandle,
    slot: u32,
    workers: u32,
    /// The largest payload a call may carry (`Messenger::max_payload`).
    max_payload: usize,
    fork_generation: u64,
}

// The promise to C: any thread, several at once.
const _: () = {
    const fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<shmc_handle>();
};

impl shmc_handle {
    fn check(&self) -> Result<(), Failure> {
        check_fork(self.fork_generation)?;
        if DRIVING.with(Cell::get) == Arc::as_ptr(&self.jobs) {
            return Err(Failure::new(
                shmc_result::InHandler,
                "a shmc_handle call on the thread that is driving its worker would wait for itself; \
                 use the worker's own function here",
            ));
        }
        Ok(())
    }

    /// Queues `job` and wakes the worker's thread if it may be waiting.
    fn submit(&self, job: Job) -> Result<(), Failure> {
        self.check()?;
        if self.jobs.push(job)? {
            // A message to the worker itself: ends a parked poll, whose
            // caller then runs the queue. It cannot fail for our own slot
            // with an event name this short.
            let _ = self.wake.emit(self.slot, WAKE_EVENT, &());
        }
        Ok(())
    }

    /// Runs `f` on the worker's thread and waits for its answer, until
    /// `deadline` plus a second (the call's own deadline is settled by the
    /// messenger; the second covers a handler that is running then).
    pub(crate) fn call<R: Send + 'static>(
        &self,
        deadline: Instant,
        f: impl FnOnce(&mut WorkerInner) -> Result<R, Failure> + Send + 'static,
    ) -> Result<R, Failure> {
        let (answer, wait) = sync_channel(1);
        let cancelled = Arc::new(AtomicBool::new(false));
        let skip = Arc::clone(&cancelled);
        self.submit(Box::new(move |inner| {
            if !skip.load(Acquire) {
                let _ = answer.send(f(inner));
            }
        }))?;
        let limit = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
        match wait.recv_timeout(limit) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => {
                cancelled.store(true, Release);
                Err(Failure::new(
                    shmc_result::TimedOut,
                    "the worker's thread did not run the call in time (is it in shmc_run or shmc_poll?)",
                ))
            }
            Err(RecvTimeoutError::Disconnected) if self.jobs.closed.load(Acquire) => {
                Err(shmc_result::WorkerClosed.into())
            }
            Err(RecvTimeoutError::Disconnected) => Err(Failure::new(
                shmc_result::Panic,
                "the call panicked on the worker's thread",
            )),
        }
    }

    /// Checks what a fire-and-forget send can check before it is queued.
    fn check_send(&self, target: &Target, event: &str, len: usize) -> Result<(), Failure> {
        if let Target::Worker(slot) = target {
            if *slot >= self.workers {
                return Err(Failure::new(
                    shmc_result::NoSuchWorker,
                    format!("no worker slot {slot} ({} slots)", self.workers),
                ));
            }
        }
        if event.len() > MAX_EVENT_NAME {
            return Err(Failure::new(
                shmc_result::EventName,
                format!("event name of {} bytes (at most {MAX_EVENT_NAME})", event.len()),
            ));
        }
        if len > self.max_payload {
            return Err(Failure::new(
                shmc_result::TooLarge,
                format!(
                    "payload of {len} bytes is over the {}-byte limit",
                    self.max_payload
                ),
            ));
        }
        Ok(())
    }
}

/// The handle behind `h`.
///
/// # Safety
/// `h` NULL or a live handle.
pub(crate) unsafe fn handle_ref<'a>(h: *const shmc_handle) -> Result<&'a shmc_handle, Failure> {
    // SAFETY: forwarded from our caller.
    unsafe { ref_arg(h, "handle") }
}

/// Makes a thread-safe handle on worker `w` and stores it in `*out` (see
/// [`shmc_handle`]). Any thread, any time, also while another thread is
/// driving the worker. The caller owns `*out` and frees it with
/// [`shmc_handle_free`]; it may outlive the worker. Does not survive fork.
///
/// # Safety
/// `w` NULL or a live worker; `out` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_worker_handle(
    w: *const shmc_worker,
    out: *mut *mut shmc_handle,
) -> shmc_result {
    guard(|| {
        let out = out_arg(out, "out")?;
        // SAFETY: forwarded from our caller.
        let worker = unsafe { worker_arg(w) }?;
        let handle = shmc_handle {
            jobs: Arc::clone(&worker.jobs),
            wake: worker.wake.clone(),
            slot: worker.slot,
            workers: worker.workers,
            max_payload: worker.max_payload,
            fork_generation: boundary::fork_generation(),
        };
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, into_handle(handle)) };
        Ok(())
    })
}

/// Frees a handle (NULL is ignored). Any thread; a call still running on
/// the handle must have returned. In a forked child it only forgets it.
///
/// # Safety
/// `h` NULL or a live handle, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn shmc_handle_free(h: *mut shmc_handle) {
    boundary::guard_value((), || {
        if h.is_null() {
            return;
        }
        // SAFETY: made by `into_handle`, given back by our caller.
        let handle = unsafe { Box::from_raw(h) };
        if check_fork(handle.fork_generation).is_err() {
            // The parent's worker is not ours: drop nothing of it.
            std::mem::forget(handle);
        }
    })
}

/// Emits `event` with `data` (copied) to `target`, a `shmc_target_kind`
/// (`slot` is used with `SHMC_TARGET_KIND_WORKER`), as [`crate::shmc_emit`]
/// does, from any thread: fire and forget. It checks what it can at once
/// and returns; the worker's thread sends it at its next poll (messages
/// from one handle keep their order).
///
/// # Errors
/// `SHMC_RESULT_INVALID_ARGUMENT` (`target`), `SHMC_RESULT_NO_SUCH_WORKER`,
/// `SHMC_RESULT_EVENT_NAME`, `SHMC_RESULT_TOO_LARGE`,
/// `SHMC_RESULT_WORKER_CLOSED`, `SHMC_RESULT_IN_HANDLER`.
///
/// # Safety
/// `h` NULL or a live handle; `event` NUL-terminated; `data` valid for `len`
/// bytes.
#[no_mangle]
pub unsafe extern "C" fn shmc_handle_emit(
    h: *const shmc_handle,
    target: u32,
    slot: u32,
    event: *const c_char,
    data: *const u8,
    len: usize,
) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        let handle = unsafe { handle_ref(h) }?;
        let target = target_arg(target, slot)?;
        // SAFETY: forwarded from our caller.
        let (event, data) = unsafe { name_and_data(event, "event", data, len) }?;
        handle.check_send(&target, event, data.len())?;
        let (event, data) = (event.to_owned(), data.to_vec());
        handle.submit(Box::new(move |inner| {
            // Fire and forget, as the Rust MessengerHandle::emit: what
            // could be checked was; a full lane waits here.
            let _ = inner.messenger.emit_bytes(target, &event, &data);
        }))
    })
}

/// [`crate::shmc_emit_at`] from any thread: fire and forget. It checks
/// the event name and size at once and returns; the worker's thread sends
/// it at its next poll (a missing bridge or a bad host name is then
/// dropped, as any failure of a handle's emit).
///
/// # Errors
/// `SHMC_RESULT_EVENT_NAME`, `SHMC_RESULT_TOO_LARGE`,
/// `SHMC_RESULT_WORKER_CLOSED`, `SHMC_RESULT_IN_HANDLER`.
///
/// # Safety
/// `h` NULL or a live handle; `host` and `event` NUL-terminated; `data`
/// valid for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn shmc_handle_emit_at(
    h: *const shmc_handle,
    host: *const c_char,
    slot: u32,
    event: *const c_char,
    data: *const u8,
    len: usize,
) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        let handle = unsafe { handle_ref(h) }?;
        // SAFETY: forwarded from our caller.
        let host = unsafe { str_arg(host, "host") }?.to_owned();
        // SAFETY: forwarded from our caller.
        let (event, data) = unsafe { name_and_data(event, "event", data, len) }?;
        // The slot is another host's: only this call's own limits apply here.
        handle.check_send(&Target::All, event, data.len())?;
        let (event, data) = (event.to_owned(), data.to_vec());
        handle.submit(Box::new(move |inner| {
            let _ = inner.messenger.emit_bytes_at(&host, slot, &event, &data);
        }))
    })
}

/// `shmc_handle_emit(h, SHMC_TARGET_KIND_ALL, 0, ...)`: every live worker,
/// this one included.
///
/// # Safety
/// As [`shmc_handle_emit`].
#[no_mangle]
pub unsafe extern "C" fn shmc_handle_broadcast(
    h: *const shmc_handle,
    event: *const c_char,
    data: *const u8,
    len: usize,
) -> shmc_result {
    // SAFETY: forwarded from our caller.
    unsafe { shmc_handle_emit(h, crate::shmc_target_kind::All as u32, 0, event, data, len) }
}

/// [`crate::shmc_request`] from any thread: worker `slot` runs its first
/// handler for `event` with `data`; waits up to `timeout_ms` for the answer,
/// stored in `*reply` (free it with [`crate::shmc_bytes_free`]).
///
/// # Errors
/// As [`crate::shmc_request`]; `SHMC_RESULT_WORKER_CLOSED`,
/// `SHMC_RESULT_IN_HANDLER`, and `SHMC_RESULT_TIMED_OUT` as well when the
/// worker's thread did not run the call in time.
///
/// # Safety
/// `h` NULL or a live handle; `event` NUL-terminated; `data` valid for `len`
/// bytes; `reply` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_handle_request(
    h: *const shmc_handle,
    slot: u32,
    event: *const c_char,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
    reply: *mut *mut shmc_bytes,
) -> shmc_result {
    // SAFETY: forwarded from our caller.
    unsafe { crate::messaging::request(Via::Handle(h), slot, event, data, len, timeout_ms, reply) }
}

/// [`crate::shmc_request_at`] from any thread: the worker in `slot` of
/// host `host` runs its first handler for `event` with `data`; waits up to
/// `timeout_ms` for the answer, stored in `*reply` (free it with
/// [`crate::shmc_bytes_free`]).
///
/// # Errors
/// As [`crate::shmc_request_at`], plus those of [`shmc_handle_request`].
///
/// # Safety
/// As [`shmc_handle_request`]; `host` NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn shmc_handle_request_at(
    h: *const shmc_handle,
    host: *const c_char,
    slot: u32,
    event: *const c_char,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
    reply: *mut *mut shmc_bytes,
) -> shmc_result {
    // SAFETY: forwarded from our caller.
    unsafe { crate::messaging::request_at(Via::Handle(h), host, slot, event, data, len, timeout_ms, reply) }
}

/// [`crate::shmc_map`] from any thread; the result (one entry per live
/// worker) is stored in `*result` (free it with
/// [`crate::shmc_map_result_free`]).
///
/// # Errors
/// As [`crate::shmc_map`], plus those of [`shmc_handle_request`].
///
/// # Safety
/// `h` NULL or a live handle; `event` NUL-terminated; `data` valid for `len`
/// bytes; `result` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_handle_map(
    h: *const shmc_handle,
    event: *const c_char,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
    result: *mut *mut shmc_map_result,
) -> shmc_result {
    // SAFETY: forwarded from our caller.
    unsafe { crate::messaging::map(Via::Handle(h), event, data, len, timeout_ms, result) }
}

/// [`crate::shmc_consume`] from any thread; what happened is stored in
/// `*consumed` if it is not NULL.
///
/// # Errors
/// As [`crate::shmc_consume`], plus those of [`shmc_handle_request`].
///
/// # Safety
/// `h` NULL or a live handle; `event` NUL-terminated; `data` valid for `len`
/// bytes; `consumed` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_handle_consume(
    h: *const shmc_handle,
    event: *const c_char,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
    consumed: *mut shmc_consumed,
) -> shmc_result {
    // SAFETY: forwarded from our caller.
    unsafe { crate::messaging::consume(Via::Handle(h), event, data, len, timeout_ms, consumed) }
}

/// [`crate::shmc_invoke`] from any thread: the leader's handler for
/// `method`; its answer is stored in `*reply` (free it with
/// [`crate::shmc_bytes_free`]).
///
/// # Errors
/// As [`crate::shmc_invoke`], plus those of [`shmc_handle_request`].
///
/// # Safety
/// As [`shmc_handle_request`].
#[no_mangle]
pub unsafe extern "C" fn shmc_handle_invoke(
    h: *const shmc_handle,
    method: *const c_char,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
    reply: *mut *mut shmc_bytes,
) -> shmc_result {
    // SAFETY: forwarded from our caller.
    unsafe { crate::leader::invoke(Via::Handle(h), method, data, len, timeout_ms, reply) }
}

/// [`crate::shmc_publish`] from any thread, waiting up to `timeout_ms`.
///
/// # Errors
/// As [`crate::shmc_publish`], plus those of [`shmc_handle_request`].
///
/// # Safety
/// `h` NULL or a live handle; `topic` NUL-terminated; `data` valid for `len`
/// bytes.
#[no_mangle]
pub unsafe extern "C" fn shmc_handle_publish(
    h: *const shmc_handle,
    topic: *const c_char,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
) -> shmc_result {
    // SAFETY: forwarded from our caller.
    unsafe { crate::leader::publish(Via::Handle(h), topic, data, len, timeout_ms) }
}
