//! A blocking call (request, map, consume, invoke, publish) from C: the
//! steps a worker's export (`shmc_request`) and its handle's
//! (`shmc_handle_request`) share, so each call is written once.

use std::ffi::c_char;
use std::time::Instant;

use shmcluster_rs::{CallError, Messenger};

use crate::boundary::{self, name_and_data};
use crate::handle::{handle_ref, shmc_handle};
use crate::result::Failure;
use crate::worker::{shmc_worker, with_worker};

/// Who makes a call: a worker on the calling thread, or a handle that has
/// the worker's thread make it.
#[derive(Clone, Copy)]
pub(crate) enum Via {
    /// `shmc_request` and its kin: the worker, driven by this thread.
    Worker(*const shmc_worker),
    /// `shmc_handle_request` and its kin: any thread.
    Handle(*const shmc_handle),
}

impl Via {
    /// Checks the handle, the call's name (`what`: "event", "method",
    /// "topic") and data, then runs `op` with the worker's messenger, the
    /// name, the data and the deadline `timeout_ms` from now: on this
    /// thread for a worker; for a handle on the worker's thread, with the
    /// name and data copied (the caller's may be gone by then).
    ///
    /// # Safety
    /// The handle NULL or live; `name` NUL-terminated; `data` valid for
    /// `len` bytes.
    pub unsafe fn call<R: Send + 'static>(
        self,
        name: *const c_char,
        what: &str,
        data: *const u8,
        len: usize,
        timeout_ms: u64,
        op: impl FnOnce(&mut Messenger, &str, &[u8], Instant) -> Result<R, CallError> + Send + 'static,
    ) -> Result<R, Failure> {
        match self {
            Via::Worker(w) => {
                // SAFETY: forwarded from our caller.
                let (name, data) = unsafe { name_and_data(name, what, data, len) }?;
                let deadline = boundary::deadline(timeout_ms);
                // SAFETY: forwarded from our caller.
                unsafe { with_worker(w, |inner| Ok(op(&mut inner.messenger, name, data, deadline)?)) }
            }
            Via::Handle(h) => {
                // SAFETY: forwarded from our caller.
                let handle = unsafe { handle_ref(h) }?;
                // SAFETY: forwarded from our caller.
                let (name, data) = unsafe { name_and_data(name, what, data, len) }?;
                let (name, data) = (name.to_owned(), data.to_vec());
                let deadline = boundary::deadline(timeout_ms);
                handle.call(deadline, move |inner| {
                    Ok(op(&mut inner.messenger, &name, &data, deadline)?)
                })
            }
        }
    }
}
