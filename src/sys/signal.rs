//! Signals: the master's, read from a `signalfd(2)`; the worker's
//! `SIGTERM` and `SIGINT`, turned into a flag (`sigaction(2)`); and the
//! numbers the cluster layer names.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// Signal numbers the cluster layer names.
pub const SIGTERM: i32 = libc::SIGTERM;
/// `SIGKILL`.
pub const SIGKILL: i32 = libc::SIGKILL;
/// `SIGINT`.
pub const SIGINT: i32 = libc::SIGINT;
/// `SIGHUP`.
pub const SIGHUP: i32 = libc::SIGHUP;
/// `SIGUSR1`: a worker's nudge to the master (ready, reload request).
pub const SIGUSR1: i32 = libc::SIGUSR1;
/// `SIGUSR2`: an operator's request for a binary upgrade (as nginx's).
pub const SIGUSR2: i32 = libc::SIGUSR2;

/// The master's signals, read from a `signalfd(2)` instead of handlers:
/// `SIGCHLD`, `SIGTERM`, `SIGINT`, `SIGHUP`, `SIGUSR1` and `SIGUSR2` are blocked (so
/// they queue) and the master's loop polls the descriptor with its other
/// work.
pub struct MasterSignals {
    fd: SignalFd,
    old_mask: SigSet,
}

impl MasterSignals {
    /// Blocks the six signals (`sigprocmask(2)`) and opens the descriptor
    /// (non-blocking, close-on-exec).
    pub fn install() -> io::Result<Self> {
        let mut set = SigSet::empty();
        for s in [
            Signal::SIGCHLD,
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGHUP,
            Signal::SIGUSR1,
            Signal::SIGUSR2,
        ] {
            set.add(s);
        }
        let mut old_mask = SigSet::empty();
        nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old_mask))?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(Self { fd, old_mask })
    }

    /// The descriptor to poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The next pending signal's number, if any: a non-blocking `read(2)`
    /// of one `signalfd_siginfo` (`signalfd(2)`).
    pub fn next(&self) -> io::Result<Option<i32>> {
        match self.fd.read_signal() {
            Ok(Some(info)) => Ok(Some(info.ssi_signo as i32)),
            Ok(None) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// In a child after `fork(2)`: restores the signal mask the master had
    /// before [`MasterSignals::install`] (a blocked mask survives `exec`).
    /// The child's copy of the descriptor is closed by the master's fork code or by exec.
    pub fn restore_in_child(&self) {
        let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&self.old_mask), None);
    }

    /// `sigprocmask(2)`: restores the mask in this process (the master,
    /// when it is done).
    pub fn uninstall(self) {
        let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&self.old_mask), None);
    }

    /// The raw descriptor number (for closing it in a forked child).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

static SIGTERM_SEEN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_: libc::c_int) {
    // Async-signal-safe: one atomic store.
    SIGTERM_SEEN.store(true, Relaxed);
}

/// `sigaction(2)`, in a forked worker: `SIGTERM` (and `SIGINT`, which a
/// terminal's Ctrl-C sends to the master and its workers alike) no longer
/// kills the process but is recorded (see [`sigterm_seen`]), so the worker
/// can finish what it is doing; installed without `SA_RESTART`, so
/// blocking calls that do not retry return `EINTR`.
pub fn catch_sigterm() -> io::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler};
    let action = SigAction::new(SigHandler::Handler(on_sigterm), SaFlags::empty(), SigSet::empty());
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only stores to a static atomic, which is
        // async-signal-safe.
        unsafe { sigaction(signal, &action) }.map_err(io::Error::from)?;
    }
    Ok(())
}

/// Whether `SIGTERM` or `SIGINT` arrived since [`catch_sigterm`].
pub fn sigterm_seen() -> bool {
    SIGTERM_SEEN.load(Relaxed)
}
