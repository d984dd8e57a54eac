//! The libuv wake: the slot's eventfd polled by Node's own event loop.
//!
//! Node exports libuv's symbols to addons; the few used here are declared
//! by hand (their C signatures are libuv's stable 1.x ABI). The handle's
//! memory is sized by `uv_handle_size` rather than a copy of the C
//! struct, and freed in the close callback, when libuv is done with it.

use std::ffi::{c_int, c_void};
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr;

use napi::sys;
use napi::{Env, JsFunction, NapiRaw};

use crate::err;

/// `uv_handle_type::UV_POLL` (libuv 1.x, include/uv.h).
const UV_POLL: c_int = 8;
/// `uv_poll_event::UV_READABLE`.
const UV_READABLE: c_int = 1;

type PollCb = unsafe extern "C" fn(handle: *mut c_void, status: c_int, events: c_int);
type CloseCb = unsafe extern "C" fn(handle: *mut c_void);

extern "C" {
    fn uv_handle_size(kind: c_int) -> usize;
    fn uv_poll_init(lp: *mut c_void, handle: *mut c_void, fd: c_int) -> c_int;
    fn uv_poll_start(handle: *mut c_void, events: c_int, cb: PollCb) -> c_int;
    fn uv_poll_stop(handle: *mut c_void) -> c_int;
    fn uv_close(handle: *mut c_void, cb: CloseCb);
    fn uv_ref(handle: *mut c_void);
    fn uv_unref(handle: *mut c_void);
    fn uv_handle_set_data(handle: *mut c_void, data: *mut c_void);
    fn uv_handle_get_data(handle: *const c_void) -> *mut c_void;
}

/// What the poll callback needs; owned by the handle (its `data`) and
/// freed with it in [`on_close`].
struct State {
    env: sys::napi_env,
    /// The JS `on_wake` function (a strong reference until close).
    callback: sys::napi_ref,
    /// For `napi_make_callback`: runs the microtasks (promise reactions)
    /// the callback queued, as any libuv callback into JS must.
    context: sys::napi_async_context,
    /// Open until the handle is closed: libuv must stop polling a
    /// descriptor before it is closed.
    fd: OwnedFd,
    /// The handle's memory (`uv_handle_size(UV_POLL)` bytes, 8-aligned).
    _memory: Vec<u64>,
}

/// A registered `uv_poll_t` on the slot's eventfd.
pub(crate) struct Poll {
    handle: *mut c_void,
}

fn check(what: &str, status: sys::napi_status) -> napi::Result<()> {
    if status == sys::Status::napi_ok {
        Ok(())
    } else {
        Err(err("IO", format!("{what} failed (napi status {status})")))
    }
}

impl Poll {
    /// Starts polling `fd` (the slot's eventfd, a descriptor of our own)
    /// for readability on the loop of `env`; `on_wake` is called on each
    /// wake.
    pub(crate) fn start(env: &Env, fd: OwnedFd, on_wake: JsFunction) -> napi::Result<Self> {
        let raw_env = env.raw();
        // Non-blocking reads of the count (the flag is the open file's,
        // shared with the segment's descriptor: the library's own readers
        // of it read non-blocking too).
        // SAFETY: fcntl on a descriptor we own; no memory is passed.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
        }
        let mut lp = ptr::null_mut();
        // SAFETY: a valid env of the JS thread we run on, and an out-pointer.
        check("napi_get_uv_event_loop", unsafe {
            sys::napi_get_uv_event_loop(raw_env, &mut lp)
        })?;
        let mut callback = ptr::null_mut();
        // SAFETY: the function is a live JS value of this env (we are in a
        // call from JS); the reference keeps it alive until `stop`.
        check("napi_create_reference", unsafe {
            sys::napi_create_reference(raw_env, on_wake.raw(), 1, &mut callback)
        })?;
        let mut resource = ptr::null_mut();
        let mut name = ptr::null_mut();
        let mut context = ptr::null_mut();
        // SAFETY: out-pointers to values of this env; the name is a
        // NUL-free byte string with its length.
        unsafe {
            check(
                "napi_create_object",
                sys::napi_create_object(raw_env, &mut resource),
            )?;
            check(
                "napi_create_string_utf8",
                sys::napi_create_string_utf8(raw_env, c"shmcluster.wake".as_ptr(), 15, &mut name),
            )?;
            check(
                "napi_async_init",
                sys::napi_async_init(raw_env, resource, name, &mut context),
            )?;
        }
        // SAFETY: uv_handle_size is a pure lookup.
        let size = unsafe { uv_handle_size(UV_POLL) };
        let mut memory = vec![0u64; size.div_ceil(8)];
        let handle = memory.as_mut_ptr().cast::<c_void>();
        let fd_raw = fd.as_raw_fd();
        let state = Box::into_raw(Box::new(State {
            env: raw_env,
            callback,
            context,
            fd,
            _memory: memory,
        }));
        // SAFETY: `handle` points to `size` zeroed bytes owned by `state`
        // (a Vec's heap buffer does not move when the Vec is moved into the
        // box), initialised by uv_poll_init on the loop Node gave us; the
        // data pointer is the boxed state, freed only in `on_close`.
        let rc = unsafe {
            let rc = uv_poll_init(lp.cast(), handle, fd_raw);
            if rc == 0 {
                uv_handle_set_data(handle, state.cast());
                uv_poll_start(handle, UV_READABLE, on_poll)
            } else {
                rc
            }
        };
        if rc != 0 {
            // SAFETY: if init failed the handle is not the loop's and the
            // state is ours to free; if start failed, close it (its
            // callback frees the state).
            unsafe {
                if uv_handle_get_data(handle).is_null() {
                    drop(Box::from_raw(state));
                } else {
                    uv_close(handle, on_close);
                }
            }
            return Err(err("IO", format!("uv_poll on the wake eventfd failed ({rc})")));
        }
        Ok(Self { handle })
    }

    /// `uv_ref` (keeps the loop alive) or `uv_unref`.
    pub(crate) fn set_ref(&self, referenced: bool) {
        // SAFETY: a live handle (closed only by `stop`, which consumes us).
        unsafe {
            if referenced {
                uv_ref(self.handle);
            } else {
                uv_unref(self.handle);
            }
        }
    }

    /// Stops polling and closes the handle; the state is freed in the
    /// close callback.
    pub(crate) fn stop(self) {
        // SAFETY: a live handle, stopped and closed once (we are consumed);
        // the JS reference and async context are released here, on the JS
        // thread, while the env is live.
        unsafe {
            uv_poll_stop(self.handle);
            let state = uv_handle_get_data(self.handle).cast::<State>();
            if let Some(s) = state.as_mut() {
                sys::napi_delete_reference(s.env, s.callback);
                sys::napi_async_destroy(s.env, s.context);
                s.callback = ptr::null_mut();
                s.context = ptr::null_mut();
            }
            uv_close(self.handle, on_close);
        }
    }
}

/// Frees a closed handle's state (and with it the handle's memory and the
/// descriptor).
unsafe extern "C" fn on_close(handle: *mut c_void) {
    // SAFETY: libuv calls this once, after the last use of the handle;
    // its data is the state boxed in `Poll::start`.
    unsafe {
        let state = uv_handle_get_data(handle).cast::<State>();
        if !state.is_null() {
            drop(Box::from_raw(state));
        }
    }
}

/// The eventfd is readable: read its count (clears it) and call JS.
unsafe extern "C" fn on_poll(handle: *mut c_void, _status: c_int, _events: c_int) {
    // SAFETY: called by libuv on the JS thread for a live handle whose
    // data is our state.
    let Some(state) = (unsafe { uv_handle_get_data(handle).cast::<State>().as_ref() }) else {
        return;
    };
    if state.callback.is_null() {
        return;
    }
    let mut count = 0u64;
    // SAFETY: reads 8 bytes into a u64 from a non-blocking eventfd we own;
    // EAGAIN (a spurious wake) is fine.
    unsafe {
        libc::read(state.fd.as_raw_fd(), ptr::addr_of_mut!(count).cast(), 8);
    }
    let env = state.env;
    // SAFETY: the JS thread, with the env of the loop this handle runs on:
    // a handle scope around the call, the function from our reference,
    // and napi_make_callback (which runs the queued microtasks after).
    unsafe {
        let mut scope = ptr::null_mut();
        if sys::napi_open_handle_scope(env, &mut scope) != sys::Status::napi_ok {
            return;
        }
        let mut func = ptr::null_mut();
        let mut recv = ptr::null_mut();
        let mut result = ptr::null_mut();
        if sys::napi_get_reference_value(env, state.callback, &mut func) == sys::Status::napi_ok
            && !func.is_null()
            // The receiver must be an object (MakeCallback converts it).
            && sys::napi_get_global(env, &mut recv) == sys::Status::napi_ok
        {
            sys::napi_make_callback(env, state.context, recv, func, 0, ptr::null(), &mut result);
        }
        // The JS layer catches its own errors; anything left is the
        // process's uncaught exception, as for any callback (and is not
        // left pending for the next call into the addon to trip on).
        let mut pending = false;
        if sys::napi_is_exception_pending(env, &mut pending) == sys::Status::napi_ok && pending {
            let mut e = ptr::null_mut();
            if sys::napi_get_and_clear_last_exception(env, &mut e) == sys::Status::napi_ok {
                sys::napi_fatal_exception(env, e);
            }
        }
        sys::napi_close_handle_scope(env, scope);
    }
}
