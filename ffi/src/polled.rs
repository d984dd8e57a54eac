//! The event-loop driver from C: calls started without waiting, one
//! non-blocking turn that parks the worker on its slot's eventfd, and the
//! ends of the calls taken after it (the library's `messenger/polled.rs`,
//! as the Node.js addon drives it). For a binding whose event loop owns the
//! worker on its own thread (Python's asyncio: `shmcluster.aio`).
//!
//! 1. Register [`shmc_wake_fd`] with the loop (readable = a wake).
//! 2. Start calls: [`shmc_start_request`], [`shmc_start_map`],
//!    [`shmc_start_consume`], [`shmc_start_invoke`], [`shmc_start_publish`]
//!    store a ticket and return at once; [`crate::shmc_subscribe_polled`]
//!    subscribes without waiting for a leader.
//! 3. Whenever the loop wakes (the fd readable: read its 8-byte count
//!    first, non-blocking; or the time [`shmc_next_due`] gave passed),
//!    call [`shmc_unpark`], then [`shmc_turn`] until it says
//!    `SHMC_TURN_KIND_PARKED` (or `SHMC_TURN_KIND_IDLE`: no eventfd, come back on a
//!    timer), and take the ends with [`shmc_take_finished`].
//!
//! Handlers ([`crate::shmc_on_request`]) run inside [`shmc_turn`], on the
//! loop's thread; they must not block, and answer later through their
//! [`crate::shmc_reply`] (which wakes the loop).

use std::ffi::c_char;
use std::time::Instant;

use shmcluster_rs::{CallError, Consumed, Finished, Messenger, Turn};

use crate::boundary::{self, free_handle, guard, into_handle, name_and_data, out_arg, put, ref_arg};
use crate::messaging::{consumed_of, map_result_of, shmc_consumed, shmc_map_result};
use crate::result::{shmc_result, Failure};
use crate::worker::{shmc_worker, with_worker};

/// What [`shmc_turn`] did (the numbers are fixed).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum shmc_turn_kind {
    /// It handled something: more may be waiting, turn again (after letting
    /// the loop's other work in, if it likes).
    Busy = 0,
    /// Nothing was waiting: the slot is parked on its eventfd. Wait for it
    /// to be readable (or for [`shmc_next_due`]), then [`shmc_unpark`].
    Parked = 1,
    /// Nothing was waiting, and this process has no eventfd to park on:
    /// come back on a timer (a few milliseconds).
    Idle = 2,
}

/// The kind of call a [`shmc_call_end`] ends (the numbers are fixed).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum shmc_end_kind {
    /// A request's answer: `data`/`len`.
    Answer = 0,
    /// A map's entries: take them with [`shmc_finished_take_map`].
    Map = 1,
    /// A consume's end: `consumed`.
    Consumed = 2,
}

/// One ended call, as [`shmc_finished_get`] copies it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct shmc_call_end {
    /// The ticket its `shmc_start_*` stored.
    pub ticket: u64,
    /// What kind of call it was.
    pub kind: shmc_end_kind,
    /// `SHMC_RESULT_OK` or the call's error (`SHMC_RESULT_TIMED_OUT`,
    /// `SHMC_RESULT_HANDLER_FAILED`, ...). A map is always `OK` here: its
    /// entries carry their own.
    pub status: shmc_result,
    /// An answer's bytes when `status` is OK; the error's text otherwise
    /// (not NUL-terminated). Valid until the list is freed.
    pub data: *const u8,
    /// Its length.
    pub len: usize,
    /// A consume's facts when `status` is OK (zeros otherwise).
    pub consumed: shmc_consumed,
}

/// One ended call, kept by a [`shmc_finished`].
struct End {
    ticket: u64,
    kind: shmc_end_kind,
    status: shmc_result,
    data: Vec<u8>,
    consumed: Option<Consumed>,
    map: Option<Box<shmc_map_result>>,
}

/// The calls [`shmc_take_finished`] found ended, oldest first. Freed by
/// [`shmc_finished_free`]. Plain memory: any thread, survives fork.
pub struct shmc_finished {
    ends: Vec<End>,
}

fn failed(ticket: u64, kind: shmc_end_kind, e: CallError) -> End {
    let f = Failure::from(e);
    End {
        ticket,
        kind,
        status: f.code,
        data: f.text.into_bytes(),
        consumed: None,
        map: None,
    }
}

fn end_of(ticket: u64, finished: Finished) -> End {
    let ok = |kind| End {
        ticket,
        kind,
        status: shmc_result::Ok,
        data: Vec::new(),
        consumed: None,
        map: None,
    };
    match finished {
        Finished::Answer(Ok(data)) => End {
            data,
            ..ok(shmc_end_kind::Answer)
        },
        Finished::Answer(Err(e)) => failed(ticket, shmc_end_kind::Answer, e),
        Finished::Map(entries) => End {
            map: Some(Box::new(map_result_of(entries))),
            ..ok(shmc_end_kind::Map)
        },
        Finished::Consumed(Ok(c)) => End {
            consumed: Some(c),
            ..ok(shmc_end_kind::Consumed)
        },
        Finished::Consumed(Err(e)) => failed(ticket, shmc_end_kind::Consumed, e),
        // A kind of end this crate does not know yet: not a call it started.
        _ => End {
            status: shmc_result::Unknown,
            data: b"a kind of call end this library does not know".to_vec(),
            ..ok(shmc_end_kind::Answer)
        },
    }
}

/// The eventfd of this worker's slot, stored in `*fd`, or -1 if this
/// process has none (then [`shmc_turn`] says `SHMC_TURN_KIND_IDLE`, never
/// `SHMC_TURN_KIND_PARKED`). The descriptor is the library's (non-blocking,
/// close-on-exec): poll it and read its 8-byte count, never close it; it
/// is valid until the worker is freed. Driving thread.
///
/// # Errors
/// `SHMC_RESULT_NULL_ARGUMENT`, `SHMC_RESULT_BUSY`, `SHMC_RESULT_FORKED`.
///
/// # Safety
/// `w` NULL or a live handle; `fd` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_wake_fd(w: *const shmc_worker, fd: *mut i32) -> shmc_result {
    guard(|| {
        let out = out_arg(fd, "fd")?;
        // SAFETY: forwarded from our caller.
        let raw = unsafe {
            with_worker(w, |inner| {
                use std::os::fd::AsRawFd;
                Ok(inner.messenger.wake_fd().map_or(-1, |fd| fd.as_raw_fd()))
            })
        }?;
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, raw) };
        Ok(())
    })
}

/// Starts one call with the name (`what`: "event", "method", "topic") and
/// data checked, and stores its ticket.
///
/// # Safety
/// `w` NULL or a live handle; `event` NUL-terminated; `data` valid for
/// `len` bytes; `ticket` NULL or valid for a write.
#[allow(clippy::too_many_arguments)]
unsafe fn start(
    w: *const shmc_worker,
    what: &str,
    event: *const c_char,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
    ticket: *mut u64,
    op: impl FnOnce(&mut Messenger, &str, &[u8], Instant) -> Result<shmcluster_rs::CallTicket, CallError>,
) -> shmc_result {
    guard(|| {
        let out = out_arg(ticket, "ticket")?;
        // SAFETY: forwarded from our caller.
        let (event, data) = unsafe { name_and_data(event, what, data, len) }?;
        let deadline = boundary::deadline(timeout_ms);
        // SAFETY: forwarded from our caller.
        let t = unsafe { with_worker(w, |inner| Ok(op(&mut inner.messenger, event, data, deadline)?)) }?;
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, t.0) };
        Ok(())
    })
}

/// Starts a request to worker `slot` (as [`crate::shmc_request`]) without
/// waiting, and stores its ticket in `*ticket`: its end comes out of
/// [`shmc_take_finished`] (`SHMC_END_KIND_ANSWER`), at `timeout_ms` at the
/// latest if the worker is turned by then. Driving thread.
///
/// # Errors
/// Known at once: `SHMC_RESULT_EVENT_NAME`, `SHMC_RESULT_TOO_LARGE`, and
/// the argument errors. The others (`SHMC_RESULT_NO_SUCH_WORKER`,
/// `SHMC_RESULT_NO_HANDLER`, ...) are the call's end.
///
/// # Safety
/// `w` NULL or a live handle; `event` NUL-terminated; `data` valid for
/// `len` bytes; `ticket` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_start_request(
    w: *const shmc_worker,
    slot: u32,
    event: *const c_char,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
    ticket: *mut u64,
) -> shmc_result {
    // SAFETY: forwarded from our caller.
    unsafe {
        start(w, "event", event, data, len, timeout_ms, ticket, |m, e, d, t| {
            m.start_request_bytes(slot, e, d, t)
        })
    }
}

/// Starts a map (as [`crate::shmc_map`]) without waiting; see
/// [`shmc_start_request`]. Its end is `SHMC_END_KIND_MAP`.
///
/// # Errors
/// `SHMC_RESULT_EVENT_NAME`, `SHMC_RESULT_TOO_LARGE`,
/// `SHMC_RESULT_HOST_UNREACHABLE`, and the argument errors.
///
/// # Safety
/// As [`shmc_start_request`].
#[no_mangle]
pub unsafe extern "C" fn shmc_start_map(
    w: *const shmc_worker,
    event: *const c_char,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
    ticket: *mut u64,
) -> shmc_result {
    // SAFETY: forwarded from our caller.
    unsafe {
        start(w, "event", event, data, len, timeout_ms, ticket, |m, e, d, t| {
            m.start_map_bytes(e, d, t)
        })
    }
}

/// Starts a consume (as [`crate::shmc_consume`], at least once) without
/// waiting; see [`shmc_start_request`]. Its end is
/// `SHMC_END_KIND_CONSUMED`.
///
/// # Errors
/// `SHMC_RESULT_EVENT_NAME`, `SHMC_RESULT_TOO_LARGE`, and the argument
/// errors.
///
/// # Safety
/// As [`shmc_start_request`].
#[no_mangle]
pub unsafe extern "C" fn shmc_start_consume(
    w: *const shmc_worker,
    event: *const c_char,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
    ticket: *mut u64,
) -> shmc_result {
    // SAFETY: forwarded from our caller.
    unsafe {
        start(w, "event", event, data, len, timeout_ms, ticket, |m, e, d, t| {
            m.start_consume_bytes(e, d, t)
        })
    }
}

/// Starts an invoke of the leader's `method` (as [`crate::shmc_invoke`])
/// without waiting; see [`shmc_start_request`]. Its end is
/// `SHMC_END_KIND_ANSWER`: the handler's bytes, or `SHMC_RESULT_NO_LEADER`
/// (none elected by `timeout_ms`), `SHMC_RESULT_LEADER_DIED` (it died with
/// the call in hand: it may or may not have run), `SHMC_RESULT_NO_HANDLER`,
/// `SHMC_RESULT_HANDLER_FAILED`, `SHMC_RESULT_TIMED_OUT`. A worker that no
/// longer leads is asked again at the leader. With `idempotent` (a method
/// safe to run twice) a leader's death sends the call to the next leader
/// instead of ending it `SHMC_RESULT_LEADER_DIED`.
///
/// # Errors
/// Known at once: `SHMC_RESULT_EVENT_NAME`, `SHMC_RESULT_TOO_LARGE`, and the
/// argument errors.
///
/// # Safety
/// `w` NULL or a live handle; `method` NUL-terminated; `data` valid for
/// `len` bytes; `ticket` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_start_invoke(
    w: *const shmc_worker,
    method: *const c_char,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
    idempotent: bool,
    ticket: *mut u64,
) -> shmc_result {
    // SAFETY: forwarded from our caller.
    unsafe {
        start(
            w,
            "method",
            method,
            data,
            len,
            timeout_ms,
            ticket,
            |m, e, d, t| {
                if idempotent {
                    m.start_invoke_idempotent_bytes(e, d, t)
                } else {
                    m.start_invoke_bytes(e, d, t)
                }
            },
        )
    }
}

/// Starts a publish of `data` on `topic` through the leader (as
/// [`crate::shmc_publish`]) without waiting; see [`shmc_start_request`].
/// Its end is `SHMC_END_KIND_ANSWER` with no bytes, or
/// `SHMC_RESULT_NO_LEADER`, `SHMC_RESULT_LEADER_DIED`,
/// `SHMC_RESULT_TIMED_OUT`.
///
/// # Errors
/// Known at once: `SHMC_RESULT_TOO_LARGE`, and the argument errors.
///
/// # Safety
/// `w` NULL or a live handle; `topic` NUL-terminated; `data` valid for
/// `len` bytes; `ticket` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_start_publish(
    w: *const shmc_worker,
    topic: *const c_char,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
    ticket: *mut u64,
) -> shmc_result {
    // SAFETY: forwarded from our caller.
    unsafe {
        start(w, "topic", topic, data, len, timeout_ms, ticket, |m, e, d, t| {
            m.start_publish_bytes(e, d, t)
        })
    }
}

/// One non-blocking turn: runs the calls [`crate::shmc_handle`]s queued,
/// the handlers of what has arrived, moves started calls on; with nothing
/// left, parks the slot on its eventfd. Stores what it did in `*turn` (a
/// [`shmc_turn_kind`]). Driving thread.
///
/// # Errors
/// `SHMC_RESULT_CORRUPT` if a lane holds garbage (that lane is poisoned;
/// turn again to serve the others), `SHMC_RESULT_BUSY` from a handler.
///
/// # Safety
/// `w` NULL or a live handle; `turn` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_turn(w: *const shmc_worker, turn: *mut u32) -> shmc_result {
    guard(|| {
        let out = out_arg(turn, "turn")?;
        // SAFETY: forwarded from our caller.
        let t = unsafe {
            with_worker(w, |inner| {
                inner.run_jobs();
                let t = inner.messenger.turn()?;
                inner.run_jobs();
                Ok(t)
            })
        }?;
        let kind = match t {
            Turn::Busy => shmc_turn_kind::Busy,
            Turn::Parked => shmc_turn_kind::Parked,
            Turn::Idle => shmc_turn_kind::Idle,
        };
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, kind as u32) };
        Ok(())
    })
}

/// After `SHMC_TURN_KIND_PARKED` and the wait that followed it (the eventfd
/// readable, or a timer): the slot runs again. Turn next. Driving thread.
///
/// # Safety
/// `w` NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn shmc_unpark(w: *const shmc_worker) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        unsafe {
            with_worker(w, |inner| {
                inner.messenger.unpark();
                Ok(())
            })
        }
    })
}

/// How long, in milliseconds from now, until the loop must turn again
/// while started calls wait (their deadlines, and every few milliseconds
/// to see a target die), stored in `*ms`; `SHMC_WAIT_FOREVER` with no call
/// waiting. Driving thread.
///
/// # Safety
/// `w` NULL or a live handle; `ms` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_next_due(w: *const shmc_worker, ms: *mut u64) -> shmc_result {
    guard(|| {
        let out = out_arg(ms, "ms")?;
        // SAFETY: forwarded from our caller.
        let due = unsafe { with_worker(w, |inner| Ok(inner.messenger.next_due())) }?;
        let v = due.map_or(crate::SHMC_WAIT_FOREVER, |t| {
            let d = t.saturating_duration_since(Instant::now());
            // Rounded up: a loop that comes back early only turns again.
            u64::try_from(d.as_micros().div_ceil(1000)).unwrap_or(crate::SHMC_WAIT_FOREVER - 1)
        });
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, v) };
        Ok(())
    })
}

/// Takes the ends of the started calls, oldest first, into `*out` (a list,
/// possibly empty; free it with [`shmc_finished_free`]). Driving thread.
///
/// # Safety
/// `w` NULL or a live handle; `out` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_take_finished(
    w: *const shmc_worker,
    out: *mut *mut shmc_finished,
) -> shmc_result {
    guard(|| {
        let out = out_arg(out, "out")?;
        // SAFETY: forwarded from our caller.
        let ends = unsafe { with_worker(w, |inner| Ok(inner.messenger.take_finished())) }?;
        let ends = ends.into_iter().map(|(t, f)| end_of(t.0, f)).collect();
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, into_handle(shmc_finished { ends })) };
        Ok(())
    })
}

/// The number of ends in the list (0 for NULL).
///
/// # Safety
/// `f` NULL or a live list.
#[no_mangle]
pub unsafe extern "C" fn shmc_finished_len(f: *const shmc_finished) -> usize {
    boundary::guard_value(0, || {
        // SAFETY: NULL or a live handle, by our caller's contract.
        unsafe { f.as_ref() }.map_or(0, |f| f.ends.len())
    })
}

fn end_at(f: &shmc_finished, i: usize) -> Result<&End, Failure> {
    f.ends
        .get(i)
        .ok_or_else(|| Failure::new(shmc_result::InvalidArgument, format!("no end {i}")))
}

/// Copies end `i` into `*end` (its `data` points into the list).
///
/// # Safety
/// `f` NULL or a live list; `end` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_finished_get(
    f: *const shmc_finished,
    i: usize,
    end: *mut shmc_call_end,
) -> shmc_result {
    guard(|| {
        let out = out_arg(end, "end")?;
        // SAFETY: forwarded from our caller.
        let e = end_at(unsafe { ref_arg(f, "finished") }?, i)?;
        let c = shmc_call_end {
            ticket: e.ticket,
            kind: e.kind,
            status: e.status,
            data: e.data.as_ptr(),
            len: e.data.len(),
            consumed: e.consumed.as_ref().map_or(
                shmc_consumed {
                    slot: 0,
                    generation: 0,
                    delivery_id: 0,
                    attempts: 0,
                },
                consumed_of,
            ),
        };
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, c) };
        Ok(())
    })
}

/// Moves the entries of map end `i` into `*result` (the caller frees it
/// with [`crate::shmc_map_result_free`]). Once per end:
/// `SHMC_RESULT_INVALID_ARGUMENT` for an end that is not a map or was
/// taken.
///
/// # Safety
/// `f` NULL or a live list; `result` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_finished_take_map(
    f: *mut shmc_finished,
    i: usize,
    result: *mut *mut shmc_map_result,
) -> shmc_result {
    guard(|| {
        let out = out_arg(result, "result")?;
        // SAFETY: NULL or a live handle, by our caller's contract.
        let f = unsafe { f.as_mut() }
            .ok_or_else(|| Failure::new(shmc_result::NullArgument, "finished is NULL"))?;
        let len = f.ends.len();
        let e = f
            .ends
            .get_mut(i)
            .ok_or_else(|| Failure::new(shmc_result::InvalidArgument, format!("no end {i} of {len}")))?;
        let map = e.map.take().ok_or_else(|| {
            Failure::new(
                shmc_result::InvalidArgument,
                format!("end {i} is not a map, or its entries were taken"),
            )
        })?;
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, Box::into_raw(map)) };
        Ok(())
    })
}

/// Frees a list of ends (NULL is ignored), and the map entries not taken.
///
/// # Safety
/// `f` NULL or a live list, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn shmc_finished_free(f: *mut shmc_finished) {
    boundary::guard_value((), || {
        // SAFETY: forwarded from our caller.
        unsafe { free_handle(f) }
    })
}
