//! Every system call and libc call the crate makes, and nothing else.
//!
//! Modules above this one never name `libc` or `nix`. Each wrapper's doc
//! names the exact system call and its man page, takes typed arguments
//! (`&AtomicU32`, `BorrowedFd`) instead of raw addresses, and turns `-1` into
//! an [`io::Error`] in one place ([`cvt`]).
//!
//! By what they wrap:
//!
//! | module | wraps |
//! |---|---|
//! | `fd` | descriptors: `fcntl(2)` flags, `dup2(2)`, `close(2)`, `poll(2)`, `ftruncate(2)`, `pread(2)`, `fstat(2)` |
//! | `memfd` | the segment's file: `memfd_create(2)`, its seals, `mmap(2)` |
//! | [`exec`] | `execve(2)` from a forked child, planned before the fork (async-signal-safe) |
//! | `eventfd` | a slot's pollable wakeup: `eventfd(2)` |
//! | [`futex`](futex_wait) | `futex(2)` wait and wake |
//! | [`mutex`] | robust process-shared `pthread_mutex_t` |
//! | [`claim`] | a slot's liveness claim: open file description locks (`fcntl(2)` `F_OFD_SETLK`) |
//! | [`process`] | processes: `fork(2)`, `waitpid(2)`, `kill(2)`, `execve(2)`, `getpid(2)`, the monotonic clock |
//! | [`signal`] | signals: the master's `signalfd(2)`, the worker's `SIGTERM` flag |
//! | [`net`] | sockets: listeners, socket pairs, `SCM_RIGHTS`, `SO_PEERCRED`, `LISTEN_FDS` |
//! | [`notify`] | systemd's notify protocol: datagrams to `NOTIFY_SOCKET`, a socket of our own with `SO_PASSCRED` |

use std::io;

pub mod claim;
mod eventfd;
pub mod exec;
pub mod fd;
mod futex;
mod memfd;
pub mod mutex;
pub mod net;
pub mod notify;
pub mod process;
pub mod signal;

#[cfg(feature = "tokio")]
pub use eventfd::eventfd_read;
pub use eventfd::{eventfd, eventfd_ring};
pub use fd::set_cloexec_nonblocking;
pub use fd::{adopt_fd, dup_cloexec, file_len, read_at, set_len};
pub use futex::{futex_wait, futex_wake};
pub use memfd::{is_size_sealed, map_shared, memfd_create, seal_size};
pub use process::{die_with_parent, exit_now, fork, getpid, Child, ExitStatus};

/// What a raw system call returns on failure: `-1`, with the reason in
/// `errno`.
pub(crate) trait MinusOne: Copy + PartialEq {
    /// `-1` of this type.
    const MINUS_ONE: Self;
}

impl MinusOne for i32 {
    const MINUS_ONE: Self = -1;
}

impl MinusOne for isize {
    const MINUS_ONE: Self = -1;
}

/// `-1` → the thread's `errno` as an [`io::Error`]; any other value is the
/// call's result. Every raw `libc` call in this module goes through it (as
/// mio's `syscall!` does).
pub(crate) fn cvt<T: MinusOne>(r: T) -> io::Result<T> {
    if r == T::MINUS_ONE {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// [`cvt`] of `call()`, called again while it fails with `EINTR`.
pub(crate) fn cvt_retry<T: MinusOne>(mut call: impl FnMut() -> T) -> io::Result<T> {
    loop {
        match cvt(call()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// `size_of::<pthread_mutex_t>()` on this platform, recorded in the segment
/// header so a process built against another libc layout refuses to attach.
pub const PTHREAD_MUTEX_SIZE: u32 = std::mem::size_of::<libc::pthread_mutex_t>() as u32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cvt_turns_minus_one_into_errno() {
        assert_eq!(cvt(0i32).unwrap(), 0);
        assert_eq!(cvt(7isize).unwrap(), 7);
        // SAFETY: close of a number that is no descriptor: EBADF, no effect.
        let err = cvt(unsafe { libc::close(-5) }).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        let mut calls = 0;
        let r = cvt_retry(|| {
            calls += 1;
            if calls < 3 {
                // SAFETY: as above; then errno is set to EINTR by hand.
                unsafe { *libc::__errno_location() = libc::EINTR };
                -1
            } else {
                5i32
            }
        });
        assert_eq!((r.unwrap(), calls), (5, 3), "EINTR retried");
    }
}
