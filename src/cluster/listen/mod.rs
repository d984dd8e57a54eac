//! Listening sockets bound by the master and handed to workers.
//!
//! A worker gets its listeners in one of three ways:
//!
//! - **Inherited.** The master binds every [`ListenSpec`] before it forks
//!   anything ([`Listeners::bind`]), so a bad address fails the start and
//!   not a worker. A spawned worker finds them at descriptors 3, 4, ... with
//!   `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES` set, as systemd hands
//!   sockets to a service (`sd_listen_fds(3)`), and takes them with
//!   [`inherited_listeners`].
//! - **From systemd.** A master started by systemd socket activation takes
//!   systemd's sockets in ([`Listeners::from_systemd_env`]) and hands them on
//!   to every worker the same way.
//! - **Requested at run time.** A worker asks the master over its control
//!   socket for a listener on some address ([`request_listener`]); the master
//!   binds it, or reuses the socket it already holds for that address, and
//!   passes the descriptor back with `SCM_RIGHTS` ([`Listeners::serve_request`]).
//!
//! [`ListenMode::Shared`] gives every worker the same socket: the kernel
//! wakes one blocked `accept` at a time, but every worker waiting in
//! `poll`/`epoll` on it, and the first to run takes the connection.
//! [`ListenMode::ReusePort`] gives each worker instance its own socket on
//! the same port (`SO_REUSEPORT`), and the kernel spreads connections over
//! them by a hash of the peer's address and port (`benches/balance.rs`
//! measures both).
//!
//! Where things are: `addr.rs` ([`ListenAddr`], [`ListenMode`],
//! [`ListenSpec`]), `listener.rs` (the worker's [`Listener`]), `bound.rs`
//! (the master's sockets, [`Listeners`]), `systemd.rs` (the `LISTEN_FDS`
//! protocol both ways) and `request.rs` (run-time requests over a worker's
//! control socket); the errors of all of them, [`ListenError`], are here.

use std::fmt;
use std::io;
use std::path::PathBuf;

mod addr;
mod bound;
mod listener;
mod request;
mod systemd;

pub use addr::{ListenAddr, ListenMode, ListenSpec};
pub(crate) use bound::Listeners;
pub use listener::Listener;
pub(crate) use request::request_listener;
pub use systemd::inherited_listeners;
pub(crate) use systemd::place_listen_fds;

/// Why a listener could not be bound, taken in or received.
#[derive(Debug)]
#[non_exhaustive]
pub enum ListenError {
    /// The address text is not a unix path and does not resolve.
    Resolve {
        /// The text given.
        addr: String,
        /// What the resolver said.
        reason: String,
    },
    /// `socket`, `bind` or `listen` failed for this address.
    Bind {
        /// The address.
        addr: ListenAddr,
        /// The system's error (`EADDRINUSE`, `EACCES`, `EADDRNOTAVAIL`, ...).
        source: io::Error,
    },
    /// [`ListenMode::ReusePort`] was asked for a unix socket.
    ReusePortUnix {
        /// The socket's path.
        path: PathBuf,
    },
    /// A binary upgrade's new master asks for [`ListenMode::ReusePort`]
    /// on an address the old master served with one shared socket: the
    /// kernel lets no other socket join a port bound without
    /// `SO_REUSEPORT`, so the mode cannot change while the cluster runs
    /// (the upgrade fails and the old master keeps serving). Restart the
    /// cluster to change it; `ReusePort` → `Shared` works in an upgrade.
    ModeChange {
        /// The address.
        addr: ListenAddr,
    },
    /// A listener name is not valid in `LISTEN_FDNAMES`.
    InvalidName {
        /// The name.
        name: String,
    },
    /// The `LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES` environment is
    /// malformed, or a descriptor it names is not an open socket.
    Systemd {
        /// What is wrong.
        reason: String,
    },
    /// A run-time request to the master failed: no reply in time, the
    /// master went away, a malformed reply, or the master refused.
    Request {
        /// What went wrong.
        reason: String,
    },
    /// Talking to the master over the control socket failed.
    Io(io::Error),
}

impl fmt::Display for ListenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Resolve { addr, reason } => write!(f, "cannot resolve listen address `{addr}`: {reason}"),
            Self::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            Self::ModeChange { addr } => write!(
                f,
                "{addr} was one shared socket and is now SO_REUSEPORT: a binary upgrade cannot change \
                 that (no socket can join a port bound without SO_REUSEPORT); restart the cluster to \
                 change it"
            ),
            Self::ReusePortUnix { path } => write!(
                f,
                "SO_REUSEPORT applies to TCP only, not to the unix socket {}",
                path.display()
            ),
            Self::InvalidName { name } => write!(
                f,
                "invalid listener name {name:?}: want 1 to 255 printable ASCII characters without ':'"
            ),
            Self::Systemd { reason } => write!(f, "socket activation environment: {reason}"),
            Self::Request { reason } => write!(f, "listener request to the master: {reason}"),
            Self::Io(e) => write!(f, "listener request to the master: {e}"),
        }
    }
}

impl std::error::Error for ListenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Bind { source, .. } => Some(source),
            Self::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for ListenError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// What the tests of every part of this module share.
#[cfg(test)]
mod testutil {
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::{ListenAddr, Listener};
    use crate::sys::net;
    use crate::testing::{fork, ExitStatus, Watchdog};

    pub(super) fn tcp(s: &str) -> ListenAddr {
        ListenAddr::Tcp(s.parse().unwrap())
    }

    /// The socket's inode: equal for two descriptors of the same socket.
    pub(super) fn inode(fd: BorrowedFd<'_>) -> u64 {
        std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap()
            .ino()
    }

    pub(super) fn is_cloexec(listener: &Listener) -> bool {
        crate::sys::fd::is_cloexec(listener.as_fd()).unwrap()
    }

    pub(super) fn port(fd: BorrowedFd<'_>) -> u16 {
        net::local_addr_tcp(fd).unwrap().port()
    }

    /// A path for a unix socket that no other test uses.
    pub(super) fn socket_path(what: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("shmcluster-{what}-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    /// Runs `f` in a forked child under a watchdog; asserts it exits 0 (a
    /// failing step returns its own nonzero code).
    pub(super) fn in_child(name: &str, f: impl FnOnce() -> i32) {
        let dog = Watchdog::new(name, Duration::from_secs(20));
        // SAFETY: every `f` here binds, inherits and checks sockets and
        // prints nothing. Some set environment variables (why they run in
        // a child): std's environment lock is held only for the instant
        // another thread reads the environment; a fork in that instant
        // would hang the child until the watchdog fails the test.
        let child = dog.track(unsafe { fork(f) }.unwrap());
        assert_eq!(
            child.wait_timeout(Duration::from_secs(10)).unwrap(),
            Some(ExitStatus::Code(0)),
            "child step failed (its exit code names the step)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    #[test]
    fn errors_name_the_address_and_chain_the_source() {
        let err = ListenError::Bind {
            addr: tcp("127.0.0.1:80"),
            source: io::Error::from(io::ErrorKind::AddrInUse),
        };
        assert!(err.to_string().contains("127.0.0.1:80"), "{err}");
        assert!(std::error::Error::source(&err).is_some());
        let err = ListenError::ReusePortUnix {
            path: "/x.sock".into(),
        };
        assert!(err.to_string().contains("/x.sock"), "{err}");
        assert!(std::error::Error::source(&err).is_none());
    }
}
