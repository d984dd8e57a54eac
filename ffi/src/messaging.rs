//! Sending, calls, handlers and the dispatch loop, with raw bytes.

use std::ffi::{c_char, c_void};
use std::sync::atomic::Ordering::*;
use std::sync::Arc;

use shmcluster_rs::{BytesReply, CallKind, Ctx, MapError, Target, WorkerId};

use crate::boundary::{
    self, bytes_arg, check_fork, free_handle, guard, into_handle, name_and_data, out_arg, put, put_optional,
    ref_arg, str_arg, write_c_string,
};
use crate::call::Via;
use crate::result::{map_error_code, shmc_result, Failure};
use crate::worker::{shmc_worker, with_worker};

/// Where a message goes.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum shmc_target_kind {
    /// One slot (the `slot` argument).
    Worker = 0,
    /// Every live worker, the caller included.
    All = 1,
    /// Every live worker but the caller.
    Others = 2,
}

/// A target kind argument from C: a `uint32_t` in the header (an enum
/// argument taken by value as the Rust enum would make any other number
/// undefined behaviour), checked here.
pub(crate) fn target_arg(kind: u32, slot: u32) -> Result<Target, Failure> {
    const WORKER: u32 = shmc_target_kind::Worker as u32;
    const ALL: u32 = shmc_target_kind::All as u32;
    const OTHERS: u32 = shmc_target_kind::Others as u32;
    match kind {
        WORKER => Ok(Target::Worker(slot)),
        ALL => Ok(Target::All),
        OTHERS => Ok(Target::Others),
        _ => Err(Failure::new(
            shmc_result::InvalidArgument,
            format!("target kind {kind} is not a shmc_target_kind (0 worker, 1 all, 2 others)"),
        )),
    }
}

/// How a handler was called (the numbers are fixed).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum shmc_call_kind {
    /// emit / broadcast: no reply is expected.
    Event = 0,
    /// request or map: the caller waits for the reply.
    Request = 1,
    /// consume: this worker was chosen to run the task.
    Consume = 2,
}

/// What a handler gets. Every pointer in it is valid only until the handler
/// returns: copy what you keep.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct shmc_message {
    /// The sender's slot; `UINT32_MAX` for a worker of another host (an
    /// event relayed by this host's bridge: its slot numbers are not this
    /// host's). A request, map or consume from another host comes from this
    /// host's bridge, which answers for it: its slot.
    pub sender_slot: u32,
    /// The sender's generation (0 for a worker of another host).
    pub sender_generation: u32,
    /// The event name (UTF-8, **not** NUL-terminated).
    pub event: *const c_char,
    /// Its length in bytes.
    pub event_len: usize,
    /// The payload (NULL when `len` is 0).
    pub data: *const u8,
    /// Its length in bytes.
    pub len: usize,
    /// For consume: the delivery id, the same on every redelivery of a task
    /// (drop one you have seen); 0 otherwise.
    pub delivery_id: u64,
    /// How the handler was called.
    pub kind: shmc_call_kind,
}

impl shmc_message {
    fn new(ctx: &Ctx, data: &[u8]) -> Self {
        let sender = ctx.sender();
        let (sender_slot, sender_generation) = if sender.host.is_local() {
            (sender.slot, sender.generation)
        } else {
            (u32::MAX, 0)
        };
        Self {
            sender_slot,
            sender_generation,
            event: ctx.event().as_ptr().cast(),
            event_len: ctx.event().len(),
            data: if data.is_empty() {
                std::ptr::null()
            } else {
                data.as_ptr()
            },
            len: data.len(),
            delivery_id: ctx.delivery_id(),
            kind: match ctx.kind() {
                CallKind::Request => shmc_call_kind::Request,
                CallKind::Consume => shmc_call_kind::Consume,
                _ => shmc_call_kind::Event,
            },
        }
    }
}

/// A synchronous handler's answer, set with [`shmc_response_set`] (and, in
/// [`crate::shmc_on_invoke`] handlers, [`shmc_response_fail`]). Owned by the
/// library; valid until the handler returns; only on the handler's thread.
pub struct shmc_response {
    result: Result<Vec<u8>, String>,
    can_fail: bool,
}

/// A synchronous handler: `userdata` as registered, the message, and where
/// to put the answer to a request, map or consume (ignored for events; an
/// answer left unset is empty). It runs on the thread that drives the
/// worker and must not call functions on that worker (they return
/// `SHMC_RESULT_BUSY`), except [`crate::shmc_request_shutdown`] and
/// [`crate::shmc_should_stop`].
pub type shmc_handler_fn = Option<
    unsafe extern "C" fn(userdata: *mut c_void, message: *const shmc_message, response: *mut shmc_response),
>;

/// An asynchronous handler: as [`shmc_handler_fn`], but it gets a
/// [`shmc_reply`] it owns and must answer or free exactly once, at any time,
/// from any thread ([`shmc_reply_send`], [`shmc_reply_fail`],
/// [`shmc_reply_free`]). For events the reply goes nowhere; free it.
pub type shmc_async_handler_fn =
    Option<unsafe extern "C" fn(userdata: *mut c_void, message: *const shmc_message, reply: *mut shmc_reply)>;

/// The C handler and its userdata, moved into the messenger's handler list.
#[derive(Clone, Copy)]
pub(crate) struct UserData(pub *mut c_void);

// SAFETY: the registering functions document that userdata is used from the
// thread that drives the worker (which may differ from the registering
// thread); making that true is the C caller's side of the contract.
unsafe impl Send for UserData {}

/// Sets the answer to `data` (copied; `data` may be NULL when `len` is 0).
/// A later call replaces it. Handler's thread, during the handler.
///
/// # Safety
/// `response` NULL or the pointer the running handler got; `data` valid for
/// `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn shmc_response_set(
    response: *mut shmc_response,
    data: *const u8,
    len: usize,
) -> shmc_result {
    guard(|| {
        // SAFETY: NULL or the live response of a running handler.
        let r = unsafe { response.as_mut() }
            .ok_or_else(|| Failure::new(shmc_result::NullArgument, "response is NULL"))?;
        // SAFETY: forwarded from our caller.
        r.result = Ok(unsafe { bytes_arg(data, len) }?.to_vec());
        Ok(())
    })
}

/// Makes the answer a failure with text `error` (the caller gets
/// `SHMC_RESULT_HANDLER_FAILED` with that text). Only [`crate::shmc_on_invoke`]
/// handlers can fail this way (`SHMC_RESULT_INVALID_ARGUMENT` elsewhere:
/// use [`shmc_on_request`] and [`shmc_reply_fail`]).
///
/// # Safety
/// `response` NULL or the pointer the running handler got; `error` a
/// NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn shmc_response_fail(
    response: *mut shmc_response,
    error: *const c_char,
) -> shmc_result {
    guard(|| {
        // SAFETY: NULL or the live response of a running handler.
        let r = unsafe { response.as_mut() }
            .ok_or_else(|| Failure::new(shmc_result::NullArgument, "response is NULL"))?;
        // SAFETY: forwarded from our caller.
        let text = unsafe { str_arg(error, "error") }?;
        if !r.can_fail {
            return Err(Failure::new(
                shmc_result::InvalidArgument,
                "an shmc_on handler cannot fail; register it with shmc_on_request and use shmc_reply_fail",
            ));
        }
        r.result = Err(text.to_owned());
        Ok(())
    })
}

/// Runs a synchronous C handler and returns its answer.
pub(crate) fn call_sync(
    f: unsafe extern "C" fn(*mut c_void, *const shmc_message, *mut shmc_response),
    userdata: UserData,
    ctx: &Ctx,
    data: &[u8],
    can_fail: bool,
) -> Result<Vec<u8>, String> {
    let message = shmc_message::new(ctx, data);
    let mut response = shmc_response {
        result: Ok(Vec::new()),
        can_fail,
    };
    // SAFETY: the C handler's contract (registration docs): it gets the
    // message and response, both valid for the call.
    unsafe { f(userdata.0, &message, &mut response) };
    response.result
}

/// Registers `handler` for `event` with `userdata`: every handler for an
/// event runs for it; the first one answers requests, maps and consumes
/// with what it puts in its response (a synchronous answer). Stores the
/// handler's id in `*id` if `id` is not NULL (for [`shmc_off_handler`]).
///
/// `userdata` is passed as is to every run, on the thread that drives the
/// worker: it must stay valid until the handler is removed or the worker
/// freed (the library never frees it).
///
/// # Errors
/// `SHMC_RESULT_NULL_ARGUMENT`, `SHMC_RESULT_EVENT_NAME`, `SHMC_RESULT_BUSY`.
///
/// # Safety
/// `w` NULL or a live handle; `event` a NUL-terminated string; `id` NULL or
/// valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_on(
    w: *const shmc_worker,
    event: *const c_char,
    handler: shmc_handler_fn,
    userdata: *mut c_void,
    id: *mut u64,
) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        let event = unsafe { str_arg(event, "event") }?;
        let f = handler.ok_or_else(|| Failure::new(shmc_result::NullArgument, "handler is NULL"))?;
        let userdata = UserData(userdata);
        // SAFETY: forwarded from our caller.
        let handler_id = unsafe {
            with_worker(w, |inner| {
                let id = inner.messenger.on_bytes(event, move |ctx, data| {
                    let userdata = userdata;
                    call_sync(f, userdata, ctx, data, false).unwrap_or_default()
                })?;
                Ok(inner.remember_handler(id))
            })
        }?;
        // SAFETY: forwarded from our caller.
        unsafe { put_optional(id, handler_id) };
        Ok(())
    })
}

/// A request's answer handle for [`shmc_on_request`] handlers. Owned by the
/// handler from the moment it gets it; consumed by [`shmc_reply_send`],
/// [`shmc_reply_fail`] or [`shmc_reply_free`] (exactly one of them).
///
/// **Threads:** any thread, any time (the worker's loop sends the answer at
/// its next poll; it is woken if parked). An answer after the caller's
/// deadline is dropped by the caller. **fork():** does not survive; in a
/// child these functions return `SHMC_RESULT_FORKED` and only free it.
pub struct shmc_reply {
    reply: BytesReply,
    fork_generation: u64,
}

/// Registers an asynchronous `handler` for `event`: for a request, map or
/// consume it gets a [`shmc_reply`] it may keep, pass to another thread and
/// answer later (the caller's deadline still applies). Unanswered and freed:
/// the caller gets `SHMC_RESULT_HANDLER_FAILED` ("reply dropped"). For events
/// it gets a reply that goes nowhere (free it). `userdata` and `id` as in
/// [`shmc_on`].
///
/// # Safety
/// As [`shmc_on`].
#[no_mangle]
pub unsafe extern "C" fn shmc_on_request(
    w: *const shmc_worker,
    event: *const c_char,
    handler: shmc_async_handler_fn,
    userdata: *mut c_void,
    id: *mut u64,
) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        let event = unsafe { str_arg(event, "event") }?;
        let f = handler.ok_or_else(|| Failure::new(shmc_result::NullArgument, "handler is NULL"))?;
        let call = call_async(f, UserData(userdata));
        let register = |inner: &mut crate::worker::WorkerInner| {
            let id = inner.messenger.on_request_async_bytes(event, call)?;
            Ok(inner.remember_handler(id))
        };
        // SAFETY: forwarded from our caller.
        let handler_id = unsafe { with_worker(w, register) }?;
        // SAFETY: forwarded from our caller.
        unsafe { put_optional(id, handler_id) };
        Ok(())
    })
}

/// The library's handler for an asynchronous C handler (a request's, or a
/// leader's invoke's): the C side gets the message, valid for the call,
/// and a [`shmc_reply`] it owns.
pub(crate) fn call_async(
    f: unsafe extern "C" fn(*mut c_void, *const shmc_message, *mut shmc_reply),
    userdata: UserData,
) -> impl FnMut(&Ctx, &[u8], BytesReply) + Send + 'static {
    let fork_generation = boundary::fork_generation();
    move |ctx, data, reply| {
        let userdata = userdata;
        let message = shmc_message::new(ctx, data);
        let reply = into_handle(shmc_reply {
            reply,
            fork_generation,
        });
        // SAFETY: the C handler's contract: it gets the message (valid for
        // the call) and owns the reply.
        unsafe { f(userdata.0, &message, reply) };
    }
}

/// Takes a reply handle back from C.
///
/// # Safety
/// `reply` NULL or a live reply handle, given up by the caller.
unsafe fn take_reply(reply: *mut shmc_reply) -> Result<BytesReply, Failure> {
    if reply.is_null() {
        return Err(Failure::new(shmc_result::NullArgument, "reply is NULL"));
    }
    // SAFETY: made by `into_handle` in `shmc_on_request`, given up by our caller.
    let reply = unsafe { Box::from_raw(reply) };
    if check_fork(reply.fork_generation).is_err() {
        // The parent's pending call is not ours to answer: forget it.
        std::mem::forget(reply);
        return Err(shmc_result::Forked.into());
    }
    Ok(reply.reply)
}

/// Answers with `data` (copied) and frees `reply`. Any thread.
///
/// # Safety
/// `reply` NULL or a live reply handle, not used afterwards; `data` valid
/// for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn shmc_reply_send(reply: *mut shmc_reply, data: *const u8, len: usize) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller. Checked before taking the
        // reply, so a bad `data` leaves the reply with the caller.
        let data = unsafe { bytes_arg(data, len) }?.to_vec();
        // SAFETY: forwarded from our caller.
        unsafe { take_reply(reply) }?.send(Ok(data));
        Ok(())
    })
}

/// Answers with a failure (`SHMC_RESULT_HANDLER_FAILED` and text `error` for
/// the caller) and frees `reply`. Any thread.
///
/// # Safety
/// `reply` NULL or a live reply handle, not used afterwards; `error` a
/// NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn shmc_reply_fail(reply: *mut shmc_reply, error: *const c_char) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        let text = unsafe { str_arg(error, "error") }?.to_owned();
        // SAFETY: forwarded from our caller.
        unsafe { take_reply(reply) }?.send(Err(text));
        Ok(())
    })
}

/// Frees `reply` unanswered (NULL is ignored): a waiting caller gets
/// `SHMC_RESULT_HANDLER_FAILED` ("reply dropped"). Any thread.
///
/// # Safety
/// `reply` NULL or a live reply handle, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn shmc_reply_free(reply: *mut shmc_reply) {
    boundary::guard_value((), || {
        if !reply.is_null() {
            // SAFETY: forwarded from our caller.
            drop(unsafe { take_reply(reply) });
        }
    })
}

/// Removes every handler for `event`; stores how many there were in
/// `*removed` if it is not NULL.
///
/// # Safety
/// `w` NULL or a live handle; `event` NUL-terminated; `removed` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn shmc_off(
    w: *const shmc_worker,
    event: *const c_char,
    removed: *mut usize,
) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        let event = unsafe { str_arg(event, "event") }?;
        // SAFETY: forwarded from our caller.
        let n = unsafe { with_worker(w, |inner| Ok(inner.messenger.off(event))) }?;
        // SAFETY: forwarded from our caller.
        unsafe { put_optional(removed, n) };
        Ok(())
    })
}

/// Removes one handler by the id [`shmc_on`] or [`shmc_on_request`] gave;
/// `SHMC_RESULT_INVALID_ARGUMENT` if there is none.
///
/// # Safety
/// `w` NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn shmc_off_handler(w: *const shmc_worker, id: u64) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        unsafe {
            with_worker(w, |inner| {
                let removed = inner.handler_ids.remove(&id);
                if removed.is_some_and(|h| inner.messenger.off_handler(h)) {
                    Ok(())
                } else {
                    Err(Failure::new(
                        shmc_result::InvalidArgument,
                        format!("no handler {id}"),
                    ))
                }
            })
        }
    })
}

// ------------------------------------------------------------------ sending

/// Emits `event` with `data` (copied) to `target`, a `shmc_target_kind`
/// (`slot` is used with `SHMC_TARGET_KIND_WORKER`): every handler for it
/// runs there. Any other `target` number is `SHMC_RESULT_INVALID_ARGUMENT`
/// and sends nothing. Waits while
/// a lane is full, dispatching this worker's own messages meanwhile. Stores
/// the number of workers it went to in `*sent` if it is not NULL.
///
/// # Errors
/// `SHMC_RESULT_INVALID_ARGUMENT` (`target`), `SHMC_RESULT_NO_SUCH_WORKER`,
/// `SHMC_RESULT_TOO_LARGE`, `SHMC_RESULT_EVENT_NAME`, `SHMC_RESULT_CORRUPT`,
/// `SHMC_RESULT_WORKER_DIED` (a full lane to a slot nobody serves).
///
/// # Safety
/// `w` NULL or a live handle; `event` NUL-terminated; `data` valid for `len`
/// bytes; `sent` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn shmc_emit(
    w: *const shmc_worker,
    target: u32,
    slot: u32,
    event: *const c_char,
    data: *const u8,
    len: usize,
    sent: *mut usize,
) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        let (event, data) = unsafe { name_and_data(event, "event", data, len) }?;
        let target = target_arg(target, slot)?;
        // SAFETY: forwarded from our caller.
        let n = unsafe { with_worker(w, |inner| Ok(inner.messenger.emit_bytes(target, event, data)?)) }?;
        // SAFETY: forwarded from our caller.
        unsafe { put_optional(sent, n) };
        Ok(())
    })
}

/// [`shmc_emit`] that waits for room in a full lane `timeout_ms` at the
/// most (dispatching this worker's own messages meanwhile), for a caller
/// on an event loop's thread: `SHMC_RESULT_TIMED_OUT` then. A broadcast
/// that times out went to the workers before the full lane (it sends in
/// slot order) and to none after it; `*sent` is then not written.
///
/// # Errors
/// As [`shmc_emit`]; `SHMC_RESULT_TIMED_OUT`.
///
/// # Safety
/// As [`shmc_emit`].
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn shmc_emit_timeout(
    w: *const shmc_worker,
    target: u32,
    slot: u32,
    event: *const c_char,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
    sent: *mut usize,
) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        let (event, data) = unsafe { name_and_data(event, "event", data, len) }?;
        let target = target_arg(target, slot)?;
        let deadline = boundary::deadline(timeout_ms);
        // SAFETY: forwarded from our caller.
        let n = unsafe {
            with_worker(w, |inner| {
                Ok(inner.messenger.emit_bytes_until(target, event, data, deadline)?)
            })
        }?;
        // SAFETY: forwarded from our caller.
        unsafe { put_optional(sent, n) };
        Ok(())
    })
}

/// `shmc_emit(w, SHMC_TARGET_KIND_ALL, 0, ...)`: every live worker, this
/// one included (its own copy runs at its next dispatch).
///
/// # Safety
/// As [`shmc_emit`].
#[no_mangle]
pub unsafe extern "C" fn shmc_broadcast(
    w: *const shmc_worker,
    event: *const c_char,
    data: *const u8,
    len: usize,
    sent: *mut usize,
) -> shmc_result {
    // SAFETY: forwarded from our caller.
    unsafe { shmc_emit(w, shmc_target_kind::All as u32, 0, event, data, len, sent) }
}

/// Bytes the library allocated for the caller (a reply, an invoke result).
/// Read with [`shmc_bytes_data`] / [`shmc_bytes_len`]; freed with
/// [`shmc_bytes_free`]. Plain memory: any thread, survives fork.
pub struct shmc_bytes {
    data: Vec<u8>,
}

/// The bytes' address (valid until [`shmc_bytes_free`]; NULL for NULL).
///
/// # Safety
/// `bytes` NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn shmc_bytes_data(bytes: *const shmc_bytes) -> *const u8 {
    boundary::guard_value(std::ptr::null(), || {
        // SAFETY: NULL or a live handle, by our caller's contract.
        let bytes = unsafe { bytes.as_ref() };
        bytes.map_or(std::ptr::null(), |b| b.data.as_ptr())
    })
}

/// The bytes' length (0 for NULL).
///
/// # Safety
/// `bytes` NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn shmc_bytes_len(bytes: *const shmc_bytes) -> usize {
    boundary::guard_value(0, || {
        // SAFETY: NULL or a live handle, by our caller's contract.
        let bytes = unsafe { bytes.as_ref() };
        bytes.map_or(0, |b| b.data.len())
    })
}

/// Frees bytes (NULL is ignored).
///
/// # Safety
/// `bytes` NULL or a live handle, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn shmc_bytes_free(bytes: *mut shmc_bytes) {
    boundary::guard_value((), || {
        // SAFETY: forwarded from our caller.
        unsafe { free_handle(bytes) }
    })
}

pub(crate) fn give_bytes(out: *mut *mut shmc_bytes, data: Vec<u8>) {
    // SAFETY: our callers checked `out` with `out_arg`.
    unsafe { put(out, into_handle(shmc_bytes { data })) };
}

/// Asks worker `slot` to run its first handler for `event` with `data` and
/// waits up to `timeout_ms` for the answer, running this worker's handlers
/// meanwhile. The answer is stored in `*reply` (the caller frees it with
/// [`shmc_bytes_free`]).
///
/// # Errors
/// `SHMC_RESULT_NO_HANDLER`, `SHMC_RESULT_HANDLER_FAILED` (its text in
/// [`crate::shmc_last_error_message`]), `SHMC_RESULT_WORKER_DIED`,
/// `SHMC_RESULT_TIMED_OUT`, and the send errors of [`shmc_emit`].
///
/// # Safety
/// `w` NULL or a live handle; `event` NUL-terminated; `data` valid for
/// `len` bytes; `reply` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_request(
    w: *const shmc_worker,
    slot: u32,
    event: *const c_char,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
    reply: *mut *mut shmc_bytes,
) -> shmc_result {
    // SAFETY: forwarded from our caller.
    unsafe { request(Via::Worker(w), slot, event, data, len, timeout_ms, reply) }
}

/// [`shmc_request`] or [`crate::shmc_handle_request`], as `via` says.
///
/// # Safety
/// As [`shmc_request`], for the worker or handle in `via`.
pub(crate) unsafe fn request(
    via: Via,
    slot: u32,
    event: *const c_char,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
    reply: *mut *mut shmc_bytes,
) -> shmc_result {
    guard(|| {
        let out = out_arg(reply, "reply")?;
        // SAFETY: forwarded from our caller.
        let answer = unsafe {
            via.call(
                event,
                "event",
                data,
                len,
                timeout_ms,
                move |m, event, data, deadline| m.request_bytes(slot, event, data, deadline),
            )
        }?;
        give_bytes(out, answer);
        Ok(())
    })
}

/// [`shmc_request`] to the worker in `slot` of host `host` (another host
/// of the cluster, by its `--host-id`; feature `nats`): its first handler
/// for `event` runs with `data`, through this host's bridge and that
/// host's. Waits up to `timeout_ms` for the answer, stored in `*reply`
/// (free it with [`shmc_bytes_free`]).
///
/// # Errors
/// `SHMC_RESULT_HOST_UNREACHABLE` at once if this host has no live bridge
/// (no `--nats`), `host` is not connected or not a host name (1 to 64
/// bytes), or no worker serves `slot` there; the rest as [`shmc_request`].
///
/// # Safety
/// As [`shmc_request`]; `host` NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn shmc_request_at(
    w: *const shmc_worker,
    host: *const c_char,
    slot: u32,
    event: *const c_char,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
    reply: *mut *mut shmc_bytes,
) -> shmc_result {
    // SAFETY: forwarded from our caller.
    unsafe { request_at(Via::Worker(w), host, slot, event, data, len, timeout_ms, reply) }
}

/// [`shmc_request_at`] or [`crate::shmc_handle_request_at`], as `via` says.
///
/// # Safety
/// As [`shmc_request_at`], for the worker or handle in `via`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn request_at(
    via: Via,
    host: *const c_char,
    slot: u32,
    event: *const c_char,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
    reply: *mut *mut shmc_bytes,
) -> shmc_result {
    guard(|| {
        let out = out_arg(reply, "reply")?;
        // SAFETY: forwarded from our caller.
        let host = unsafe { str_arg(host, "host") }?.to_owned();
        // SAFETY: forwarded from our caller.
        let answer = unsafe {
            via.call(
                event,
                "event",
                data,
                len,
                timeout_ms,
                move |m, event, data, deadline| m.request_bytes_at(&host, slot, event, data, deadline),
            )
        }?;
        give_bytes(out, answer);
        Ok(())
    })
}

/// Emits `event` with `data` (copied) to the worker in `slot` of host
/// `host` (another host of the cluster, by its `--host-id`; feature
/// `nats`): fire and forget, as [`shmc_emit`]. A host that is not
/// connected, or no worker in that slot there, drops it (the bridges
/// count what they drop).
///
/// # Errors
/// `SHMC_RESULT_HOST_UNREACHABLE` if this host has no live bridge (no
/// `--nats`) or `host` is not a host name (1 to 64 bytes);
/// `SHMC_RESULT_TOO_LARGE`, `SHMC_RESULT_EVENT_NAME`, and the send errors
/// of [`shmc_emit`].
///
/// # Safety
/// `w` NULL or a live handle; `host` and `event` NUL-terminated; `data`
/// valid for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn shmc_emit_at(
    w: *const shmc_worker,
    host: *const c_char,
    slot: u32,
    event: *const c_char,
    data: *const u8,
    len: usize,
) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        let host = unsafe { str_arg(host, "host") }?;
        // SAFETY: forwarded from our caller.
        let (event, data) = unsafe { name_and_data(event, "event", data, len) }?;
        // SAFETY: forwarded from our caller.
        unsafe {
            with_worker(w, |inner| {
                Ok(inner.messenger.emit_bytes_at(host, slot, event, data)?)
            })
        }
    })
}

/// What a consume did.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct shmc_consumed {
    /// The slot whose handler finished the task.
    pub slot: u32,
    /// That worker's generation.
    pub generation: u32,
    /// The task's delivery id.
    pub delivery_id: u64,
    /// Workers it was sent to (more than 1 after a redelivery).
    pub attempts: u32,
}

pub(crate) fn consumed_of(c: &shmcluster_rs::Consumed) -> shmc_consumed {
    shmc_consumed {
        slot: c.worker.slot,
        generation: c.worker.generation,
        delivery_id: c.delivery_id,
        attempts: c.attempts,
    }
}

/// Runs `event` with `data` on exactly one live worker that has a handler
/// (the least loaded, this one included), waiting up to `timeout_ms` until
/// its handler has finished. At least once: if that worker dies first, the
/// task goes to another with the same delivery id. Stores what happened in
/// `*consumed` if it is not NULL.
///
/// # Errors
/// `SHMC_RESULT_NO_HANDLER` (no live worker has one),
/// `SHMC_RESULT_HANDLER_FAILED`, `SHMC_RESULT_TIMED_OUT`, the send errors.
///
/// # Safety
/// As [`shmc_request`]; `consumed` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn shmc_consume(
    w: *const shmc_worker,
    event: *const c_char,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
    consumed: *mut shmc_consumed,
) -> shmc_result {
    // SAFETY: forwarded from our caller.
    unsafe { consume(Via::Worker(w), event, data, len, timeout_ms, consumed) }
}

/// [`shmc_consume`] or [`crate::shmc_handle_consume`], as `via` says.
///
/// # Safety
/// As [`shmc_consume`], for the worker or handle in `via`.
pub(crate) unsafe fn consume(
    via: Via,
    event: *const c_char,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
    consumed: *mut shmc_consumed,
) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        let c = unsafe {
            via.call(
                event,
                "event",
                data,
                len,
                timeout_ms,
                |m, event, data, deadline| m.consume_bytes(event, data, deadline),
            )
        }?;
        // SAFETY: forwarded from our caller.
        unsafe { put_optional(consumed, consumed_of(&c)) };
        Ok(())
    })
}

/// A map's answers, one entry per live worker in slot order. Made by
/// [`shmc_map`], freed by [`shmc_map_result_free`]. Plain memory: any thread,
/// survives fork.
pub struct shmc_map_result {
    entries: Vec<MapEntry>,
}

/// One entry of a [`shmc_map_result`]: the worker, its host's name (`None`
/// for this host), the status and the answer or failure text.
struct MapEntry {
    slot: u32,
    generation: u32,
    host: Option<Arc<str>>,
    status: shmc_result,
    data: Vec<u8>,
}

/// The map's answers as C sees them.
pub(crate) fn map_result_of(answers: Vec<(WorkerId, Result<Vec<u8>, MapError>)>) -> shmc_map_result {
    let entries = answers
        .into_iter()
        .map(|(who, r)| {
            let (status, data) = match r {
                Ok(bytes) => (shmc_result::Ok, bytes),
                Err(e) => {
                    let text = match &e {
                        MapError::HandlerFailed(t) => t.clone().into_bytes(),
                        _ => Vec::new(),
                    };
                    (map_error_code(&e), text)
                }
            };
            MapEntry {
                slot: who.slot,
                generation: who.generation,
                host: who.host.name(),
                status,
                data,
            }
        })
        .collect();
    shmc_map_result { entries }
}

/// One worker's entry of a map result. `data` is the answer when `status`
/// is `SHMC_RESULT_OK`, the failure text for `SHMC_RESULT_HANDLER_FAILED`
/// (not NUL-terminated), empty otherwise; it stays valid until the result
/// is freed.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct shmc_map_entry {
    /// The worker's slot.
    pub slot: u32,
    /// Its generation.
    pub generation: u32,
    /// `SHMC_RESULT_OK`, `SHMC_RESULT_TIMED_OUT`, `SHMC_RESULT_WORKER_DIED`,
    /// `SHMC_RESULT_NO_HANDLER` or `SHMC_RESULT_HANDLER_FAILED`.
    pub status: shmc_result,
    /// The answer or failure text.
    pub data: *const u8,
    /// Its length.
    pub len: usize,
}

/// Every live worker, this one included, runs its first handler for `event`
/// with `data`; waits at most `timeout_ms` (an entry whose worker died or
/// has no handler is settled as soon as that is known). The result, one
/// entry per worker, is stored in `*result` (free it with
/// [`shmc_map_result_free`]).
///
/// # Errors
/// Only for the call as a whole: `SHMC_RESULT_EVENT_NAME`,
/// `SHMC_RESULT_TOO_LARGE`, `SHMC_RESULT_CORRUPT`; per worker, see the
/// entries' status.
///
/// # Safety
/// `w` NULL or a live handle; `event` NUL-terminated; `data` valid for
/// `len` bytes; `result` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_map(
    w: *const shmc_worker,
    event: *const c_char,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
    result: *mut *mut shmc_map_result,
) -> shmc_result {
    // SAFETY: forwarded from our caller.
    unsafe { map(Via::Worker(w), event, data, len, timeout_ms, result) }
}

/// [`shmc_map`] or [`crate::shmc_handle_map`], as `via` says.
///
/// # Safety
/// As [`shmc_map`], for the worker or handle in `via`.
pub(crate) unsafe fn map(
    via: Via,
    event: *const c_char,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
    result: *mut *mut shmc_map_result,
) -> shmc_result {
    guard(|| {
        let out = out_arg(result, "result")?;
        // SAFETY: forwarded from our caller.
        let answers = unsafe {
            via.call(
                event,
                "event",
                data,
                len,
                timeout_ms,
                |m, event, data, deadline| m.map_bytes(event, data, deadline),
            )
        }?;
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, into_handle(map_result_of(answers))) };
        Ok(())
    })
}

/// The number of entries (0 for NULL).
///
/// # Safety
/// `result` NULL or a live map result.
#[no_mangle]
pub unsafe extern "C" fn shmc_map_result_len(result: *const shmc_map_result) -> usize {
    boundary::guard_value(0, || {
        // SAFETY: NULL or a live handle, by our caller's contract.
        let result = unsafe { result.as_ref() };
        result.map_or(0, |r| r.entries.len())
    })
}

/// Copies entry `i` into `*entry` (its `data` points into the result).
///
/// # Safety
/// `result` NULL or a live map result; `entry` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_map_result_get(
    result: *const shmc_map_result,
    i: usize,
    entry: *mut shmc_map_entry,
) -> shmc_result {
    guard(|| {
        let out = out_arg(entry, "entry")?;
        // SAFETY: forwarded from our caller.
        let r = unsafe { ref_arg(result, "result") }?;
        let entry = entry_of(r, i)?;
        let e = shmc_map_entry {
            slot: entry.slot,
            generation: entry.generation,
            status: entry.status,
            data: entry.data.as_ptr(),
            len: entry.data.len(),
        };
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, e) };
        Ok(())
    })
}

/// Entry `i` of a map result.
fn entry_of(r: &shmc_map_result, i: usize) -> Result<&MapEntry, Failure> {
    r.entries
        .get(i)
        .ok_or_else(|| Failure::new(shmc_result::InvalidArgument, format!("no entry {i}")))
}

/// Writes the name of the host entry `i` came from into `buf` (room for
/// `len` bytes, NUL-terminated, truncated to fit) and its length into
/// `*out_len` if that is not NULL: the empty string for this host's
/// workers, the other host's `--host-id` for theirs (feature `nats`: a
/// map also reaches the workers of the other hosts, whose slots and
/// generations repeat this host's). `SHMC_RESULT_BUFFER_TOO_SMALL` if it
/// did not fit (`*out_len` says how much room it needs).
///
/// # Safety
/// `result` NULL or a live map result; `buf` valid for writes of `len`
/// bytes (or NULL with `len` 0); `out_len` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn shmc_map_result_host(
    result: *const shmc_map_result,
    i: usize,
    buf: *mut u8,
    len: usize,
    out_len: *mut usize,
) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        let r = unsafe { ref_arg(result, "result") }?;
        let host = entry_of(r, i)?.host.as_deref().unwrap_or("");
        // SAFETY: forwarded from our caller.
        unsafe { write_c_string(host, buf, len, out_len) }
    })
}

/// Frees a map result (NULL is ignored).
///
/// # Safety
/// `result` NULL or a live map result, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn shmc_map_result_free(result: *mut shmc_map_result) {
    boundary::guard_value((), || {
        // SAFETY: forwarded from our caller.
        unsafe { free_handle(result) }
    })
}

// ---------------------------------------------------------------- dispatch

/// Runs the handlers of every message that has arrived, without waiting,
/// and the calls [`crate::shmc_handle`]s queued; stores how many messages
/// it handled in `*handled` if it is not NULL (a handle's wake-up counts
/// as one).
///
/// # Errors
/// `SHMC_RESULT_CORRUPT` if a lane holds garbage (that lane is poisoned;
/// call again to keep serving the others), `SHMC_RESULT_BUSY` from inside a
/// handler.
///
/// # Safety
/// `w` NULL or a live handle; `handled` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn shmc_dispatch(w: *const shmc_worker, handled: *mut usize) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        let n = unsafe {
            with_worker(w, |inner| {
                inner.run_jobs();
                let n = inner.messenger.dispatch()?;
                inner.run_jobs();
                Ok(n)
            })
        }?;
        // SAFETY: forwarded from our caller.
        unsafe { put_optional(handled, n) };
        Ok(())
    })
}

/// Waits up to `timeout_ms` for messages and runs their handlers (and the
/// calls [`crate::shmc_handle`]s queued, which end the wait); stores how
/// many messages it handled (0 after the timeout with nothing) in
/// `*handled` if it is not NULL. Errors as [`shmc_dispatch`].
///
/// # Safety
/// `w` NULL or a live handle; `handled` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn shmc_poll(
    w: *const shmc_worker,
    timeout_ms: u64,
    handled: *mut usize,
) -> shmc_result {
    guard(|| {
        let timeout = boundary::deadline(timeout_ms).saturating_duration_since(std::time::Instant::now());
        // SAFETY: forwarded from our caller.
        let n = unsafe {
            with_worker(w, |inner| {
                inner.run_jobs();
                let n = inner.messenger.poll(timeout)?;
                inner.run_jobs();
                Ok(n)
            })
        }?;
        // SAFETY: forwarded from our caller.
        unsafe { put_optional(handled, n) };
        Ok(())
    })
}

/// Serves messages, and the calls [`crate::shmc_handle`]s queue, until this
/// worker is told to stop: by the master (drain, shutdown, `SIGTERM`) or by
/// [`crate::shmc_request_shutdown`] (checked every 50 ms and after each
/// message). Errors as [`shmc_dispatch`].
///
/// # Safety
/// `w` NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn shmc_run(w: *const shmc_worker) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        unsafe {
            with_worker(w, |inner| loop {
                inner.run_jobs();
                let stop = match crate::worker::master_worker(&inner.messenger) {
                    Some(worker) => worker.should_stop(),
                    // With a master, a shutdown request was forwarded: keep
                    // serving until the master says stop.
                    None => inner.stop.load(Acquire),
                };
                if stop {
                    return Ok(());
                }
                inner.messenger.poll(std::time::Duration::from_millis(50))?;
            })
        }
    })
}
