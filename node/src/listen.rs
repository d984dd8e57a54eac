//! The listeners the master handed this process (`LISTEN_FDS`, fds from
//! 3), for JS to listen on (`server.listen({ fd })`, see listen.js).
//!
//! `Worker::from_env` takes them into the Rust `Worker`, which would close
//! them when it is dropped (at `w.close()`), under a Node server still
//! listening on them or, after the server closed the descriptor, a second
//! time, when the number may already name another file. So
//! [`Native::from_env`](crate::Native::from_env) moves them out of the
//! worker into [`stash`], and [`take_listeners`] hands their ownership to
//! JS as plain descriptor numbers: from then on whatever listens on one
//! (libuv) owns and closes it. They stay close-on-exec, as `from_env` made
//! them: a child process the worker starts does not inherit them.

use std::os::fd::{IntoRawFd, OwnedFd};
use std::sync::{Mutex, PoisonError};

use napi_derive::napi;
use shmcluster::{Listener, Worker};

/// `None` until `from_env` ran; then the listeners not yet taken by JS.
static STASH: Mutex<Option<Vec<Listener>>> = Mutex::new(None);

/// Moves `worker`'s inherited listeners into the stash (at `from_env`).
pub(crate) fn stash(worker: &mut Worker) {
    let taken = worker.take_listeners();
    let mut stash = STASH.lock().unwrap_or_else(PoisonError::into_inner);
    stash.get_or_insert_with(Vec::new).extend(taken);
}

/// An inherited listener: its descriptor and its `LISTEN_FDNAMES` name.
#[napi(object)]
pub struct ListenFd {
    pub fd: i32,
    pub name: String,
}

/// The listeners `Worker.fromEnv()` took, in `LISTEN_FDS` order, now owned
/// by the caller; `null` if `fromEnv` has not run in this process (JS then
/// reads the systemd variables itself). A second call returns `[]`.
#[napi]
pub fn take_listeners() -> Option<Vec<ListenFd>> {
    let mut stash = STASH.lock().unwrap_or_else(PoisonError::into_inner);
    let listeners = stash.as_mut()?;
    Some(
        listeners
            .drain(..)
            .map(|l| {
                let name = l.name().to_owned();
                ListenFd {
                    fd: OwnedFd::from(l).into_raw_fd(),
                    name,
                }
            })
            .collect(),
    )
}
