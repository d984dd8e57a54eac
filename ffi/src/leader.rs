//! Leader and followers: campaign, who leads, invoke, subscribe/publish.

use std::ffi::{c_char, c_void};

use crate::boundary::{self, guard, out_arg, put, put_optional, str_arg};
use crate::call::Via;
use crate::messaging::{
    call_async, call_sync, give_bytes, shmc_async_handler_fn, shmc_bytes, shmc_handler_fn, UserData,
};
use crate::result::{shmc_result, Failure};
use crate::worker::{shmc_worker, with_worker};
use shmcluster_rs::LeaderChange;

/// A role name argument: NULL or `""` is the default role.
///
/// # Safety
/// `role` NULL or NUL-terminated.
unsafe fn role_arg<'a>(role: *const c_char) -> Result<&'a str, Failure> {
    if role.is_null() {
        Ok("")
    } else {
        // SAFETY: forwarded from our caller.
        unsafe { str_arg(role, "role") }
    }
}

/// Enters this worker in the election for `role` (NULL or `""`: the default
/// role, the one invoke and publish use). A thread of the library waits on
/// the role's lock; when the leader's process dies the kernel hands it to a
/// waiting candidate at once. Campaigning twice is harmless.
///
/// # Errors
/// The lock errors (`SHMC_RESULT_GLIBC`, `SHMC_RESULT_LOCK_TABLE_FULL`, ...).
///
/// # Safety
/// `w` NULL or a live handle; `role` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn shmc_campaign(w: *const shmc_worker, role: *const c_char) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        let role = unsafe { role_arg(role) }?;
        // SAFETY: forwarded from our caller.
        unsafe { with_worker(w, |inner| Ok(inner.messenger.campaign_for(role)?)) }
    })
}

/// Stores whether this worker leads `role` (NULL: the default role) in
/// `*is_leader`.
///
/// # Safety
/// `w` NULL or a live handle; `role` NULL or NUL-terminated; `is_leader`
/// NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn shmc_is_leader(
    w: *const shmc_worker,
    role: *const c_char,
    is_leader: *mut bool,
) -> shmc_result {
    guard(|| {
        let out = out_arg(is_leader, "is_leader")?;
        // SAFETY: forwarded from our caller.
        let role = unsafe { role_arg(role) }?;
        // SAFETY: forwarded from our caller.
        let leading = unsafe { with_worker(w, |inner| Ok(inner.messenger.is_leader_for(role))) }?;
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, leading) };
        Ok(())
    })
}

/// Stores the leader of `role` (NULL: the default role) in `*slot` and its
/// term in `*term` (either may be NULL). `SHMC_RESULT_NO_LEADER` if none is
/// elected now (the instant between a death and the next election).
///
/// # Safety
/// `w` NULL or a live handle; `role` NULL or NUL-terminated; `slot`, `term`
/// NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn shmc_leader(
    w: *const shmc_worker,
    role: *const c_char,
    slot: *mut u32,
    term: *mut u64,
) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        let role = unsafe { role_arg(role) }?;
        // SAFETY: forwarded from our caller.
        let leader = unsafe { with_worker(w, |inner| Ok(inner.messenger.leader_for(role))) }?
            .ok_or_else(|| Failure::from(shmc_result::NoLeader))?;
        // SAFETY: forwarded from our caller.
        unsafe {
            put_optional(slot, leader.slot);
            put_optional(term, leader.term);
        }
        Ok(())
    })
}

/// Registers the leader's handler for `method` (every worker registers it;
/// only the leader's runs; this campaigns for the default role if the worker
/// has not). The handler answers with [`crate::shmc_response_set`] or fails
/// with [`crate::shmc_response_fail`]. `userdata` and `id` as in
/// [`crate::shmc_on`].
///
/// # Safety
/// As [`crate::shmc_on`].
#[no_mangle]
pub unsafe extern "C" fn shmc_on_invoke(
    w: *const shmc_worker,
    method: *const c_char,
    handler: shmc_handler_fn,
    userdata: *mut c_void,
    id: *mut u64,
) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        let method = unsafe { str_arg(method, "method") }?;
        let f = handler.ok_or_else(|| Failure::new(shmc_result::NullArgument, "handler is NULL"))?;
        let userdata = UserData(userdata);
        // SAFETY: forwarded from our caller.
        let handler_id = unsafe {
            with_worker(w, |inner| {
                let id = inner.messenger.on_invoke_bytes(method, move |ctx, data| {
                    let userdata = userdata;
                    call_sync(f, userdata, ctx, data, true)
                })?;
                Ok(inner.remember_handler(id))
            })
        }?;
        // SAFETY: forwarded from our caller.
        unsafe { put_optional(id, handler_id) };
        Ok(())
    })
}

/// [`shmc_on_invoke`] answered later, for an event loop: `handler` gets a
/// [`crate::shmc_reply`] it owns and answers (or frees) once, when it
/// likes, from any thread ([`crate::shmc_reply_send`],
/// [`crate::shmc_reply_fail`]). On a worker that does not lead now the
/// caller is answered "not the leader" at once and asks the leader again;
/// `handler` does not run. Campaigns for the default role if the worker
/// has not. `userdata` and `id` as in [`crate::shmc_on`].
///
/// # Errors
/// `SHMC_RESULT_NULL_ARGUMENT`, `SHMC_RESULT_EVENT_NAME`, `SHMC_RESULT_BUSY`.
///
/// # Safety
/// As [`crate::shmc_on_request`].
#[no_mangle]
pub unsafe extern "C" fn shmc_on_invoke_async(
    w: *const shmc_worker,
    method: *const c_char,
    handler: shmc_async_handler_fn,
    userdata: *mut c_void,
    id: *mut u64,
) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        let method = unsafe { str_arg(method, "method") }?;
        let f = handler.ok_or_else(|| Failure::new(shmc_result::NullArgument, "handler is NULL"))?;
        let call = call_async(f, UserData(userdata));
        // SAFETY: forwarded from our caller.
        let handler_id = unsafe {
            with_worker(w, |inner| {
                let id = inner.messenger.on_invoke_async_bytes(method, call)?;
                Ok(inner.remember_handler(id))
            })
        }?;
        // SAFETY: forwarded from our caller.
        unsafe { put_optional(id, handler_id) };
        Ok(())
    })
}

/// Runs the leader's handler for `method` with `data` and stores its answer
/// in `*reply` (free it with [`crate::shmc_bytes_free`]), waiting up to
/// `timeout_ms` (for an election too).
///
/// # Errors
/// `SHMC_RESULT_NO_LEADER` (none elected in time), `SHMC_RESULT_LEADER_DIED`
/// (it died before answering: the call may or may not have run),
/// `SHMC_RESULT_NO_HANDLER`, `SHMC_RESULT_HANDLER_FAILED`,
/// `SHMC_RESULT_TIMED_OUT`.
///
/// # Safety
/// As [`crate::shmc_request`].
#[no_mangle]
pub unsafe extern "C" fn shmc_invoke(
    w: *const shmc_worker,
    method: *const c_char,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
    reply: *mut *mut shmc_bytes,
) -> shmc_result {
    // SAFETY: forwarded from our caller.
    unsafe { invoke(Via::Worker(w), method, data, len, timeout_ms, reply) }
}

/// [`shmc_invoke`] or [`crate::shmc_handle_invoke`], as `via` says.
///
/// # Safety
/// As [`shmc_invoke`], for the worker or handle in `via`.
pub(crate) unsafe fn invoke(
    via: Via,
    method: *const c_char,
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
                method,
                "method",
                data,
                len,
                timeout_ms,
                |m, method, data, deadline| m.invoke_bytes(method, data, deadline),
            )
        }?;
        give_bytes(out, answer);
        Ok(())
    })
}

/// Subscribes to `topic` through the leader (waiting up to `timeout_ms` for
/// one): `handler` runs for every value published to it, and at once with
/// the last value if there is one; a new leader is told this worker's
/// subscriptions. The handler's response is ignored. `userdata` as in
/// [`crate::shmc_on`].
///
/// # Errors
/// `SHMC_RESULT_NO_LEADER`, the send errors.
///
/// # Safety
/// `w` NULL or a live handle; `topic` NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn shmc_subscribe(
    w: *const shmc_worker,
    topic: *const c_char,
    timeout_ms: u64,
    handler: shmc_handler_fn,
    userdata: *mut c_void,
) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        let topic = unsafe { str_arg(topic, "topic") }?;
        let f = handler.ok_or_else(|| Failure::new(shmc_result::NullArgument, "handler is NULL"))?;
        let userdata = UserData(userdata);
        let deadline = boundary::deadline(timeout_ms);
        // SAFETY: forwarded from our caller.
        unsafe {
            with_worker(w, |inner| {
                Ok(inner
                    .messenger
                    .subscribe_bytes(topic, deadline, move |ctx, data| {
                        let userdata = userdata;
                        let _ = call_sync(f, userdata, ctx, data, false);
                    })?)
            })
        }
    })
}

/// [`shmc_subscribe`] without waiting for a leader, for an event loop
/// ([`crate::shmc_turn`]): registers `handler` for `topic`'s values and
/// the subscription, and tells the leader now if one is known; otherwise
/// the turn that first sees a leader tells it (as every new leader is told
/// this worker's subscriptions). `handler` then runs for every value
/// published, and soon with the topic's last value if it has one. Stores
/// in `*told` (if not NULL) whether a leader was told now. Subscribing
/// twice to a topic registers a second handler.
///
/// # Errors
/// `SHMC_RESULT_NULL_ARGUMENT`, `SHMC_RESULT_EVENT_NAME` (a topic too long),
/// the send errors of telling a live leader (the subscription stays, and
/// the next leader is told), `SHMC_RESULT_BUSY`.
///
/// # Safety
/// `w` NULL or a live handle; `topic` NUL-terminated; `told` NULL or valid
/// for a write; `userdata` as in [`crate::shmc_on`].
#[no_mangle]
pub unsafe extern "C" fn shmc_subscribe_polled(
    w: *const shmc_worker,
    topic: *const c_char,
    handler: shmc_handler_fn,
    userdata: *mut c_void,
    told: *mut bool,
) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        let topic = unsafe { str_arg(topic, "topic") }?;
        let f = handler.ok_or_else(|| Failure::new(shmc_result::NullArgument, "handler is NULL"))?;
        let userdata = UserData(userdata);
        // SAFETY: forwarded from our caller.
        let now = unsafe {
            with_worker(w, |inner| {
                Ok(inner.messenger.subscribe_polled_bytes(topic, move |ctx, data| {
                    let userdata = userdata;
                    let _ = call_sync(f, userdata, ctx, data, false);
                })?)
            })
        }?;
        // SAFETY: forwarded from our caller.
        unsafe { put_optional(told, now) };
        Ok(())
    })
}

/// Publishes `data` on `topic` through the leader, which keeps it as the
/// topic's last value and sends it to every subscriber; waits up to
/// `timeout_ms`.
///
/// # Errors
/// `SHMC_RESULT_NO_LEADER`, `SHMC_RESULT_LEADER_DIED`, the send errors.
///
/// # Safety
/// `w` NULL or a live handle; `topic` NUL-terminated; `data` valid for `len`
/// bytes.
#[no_mangle]
pub unsafe extern "C" fn shmc_publish(
    w: *const shmc_worker,
    topic: *const c_char,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
) -> shmc_result {
    // SAFETY: forwarded from our caller.
    unsafe { publish(Via::Worker(w), topic, data, len, timeout_ms) }
}

/// [`shmc_publish`] or [`crate::shmc_handle_publish`], as `via` says.
///
/// # Safety
/// As [`shmc_publish`], for the worker or handle in `via`.
pub(crate) unsafe fn publish(
    via: Via,
    topic: *const c_char,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        unsafe {
            via.call(
                topic,
                "topic",
                data,
                len,
                timeout_ms,
                |m, topic, data, deadline| m.publish_bytes(topic, data, deadline),
            )
        }
    })
}

/// A change of leader of the default role, passed to a
/// [`shmc_leader_change_fn`].
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct shmc_leader_change {
    /// The new leader's slot.
    pub slot: u32,
    /// Its term: larger than every earlier leader's of the role.
    pub term: u64,
    /// Whether the new leader is this worker.
    pub is_me: bool,
}

/// A leader-change callback: `change` is valid during the call only.
pub type shmc_leader_change_fn =
    Option<unsafe extern "C" fn(userdata: *mut c_void, change: *const shmc_leader_change)>;

/// Runs `callback(userdata, change)` whenever the default role gets a new
/// leader (the first time for the leader of the moment, then for each
/// later one), on the thread that drives the worker, while it dispatches
/// ([`crate::shmc_poll`], [`crate::shmc_run`], a blocking call). Watching
/// does not campaign. The callback must not call back into this worker
/// (`SHMC_RESULT_BUSY`); it may use a [`crate::shmc_handle`]. Callbacks
/// stay registered for the worker's life.
///
/// # Errors
/// `SHMC_RESULT_NULL_ARGUMENT` (`callback` NULL), `SHMC_RESULT_BUSY`,
/// `SHMC_RESULT_FORKED`.
///
/// # Safety
/// `w` NULL or a live handle; `userdata` is passed to `callback` from the
/// thread that drives the worker (the caller makes that safe).
#[no_mangle]
pub unsafe extern "C" fn shmc_on_leader_change(
    w: *const shmc_worker,
    callback: shmc_leader_change_fn,
    userdata: *mut c_void,
) -> shmc_result {
    guard(|| {
        let f = callback.ok_or_else(|| Failure::new(shmc_result::NullArgument, "callback is NULL"))?;
        let userdata = UserData(userdata);
        let call = move |change: &LeaderChange| {
            let userdata = userdata;
            let c = shmc_leader_change {
                slot: change.leader.slot,
                term: change.leader.term,
                is_me: change.is_me,
            };
            // SAFETY: the callback's contract (above): it gets a change
            // valid for the call and its own userdata.
            unsafe { f(userdata.0, &c) };
        };
        // SAFETY: forwarded from our caller.
        unsafe {
            with_worker(w, |inner| {
                inner.messenger.on_leader_change(call);
                Ok(())
            })
        }
    })
}
