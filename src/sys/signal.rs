//! Signals: the master's, read from a `signalfd(2)`; the worker's
//! `SIGTERM` and `SIGINT`, turned into a flag (`sigaction(2)`); a write to
//! a pipe that raises no `SIGPIPE`; and the numbers the cluster layer
//! names.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::ptr;
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

/// `write(2)` of `bytes` (at most `PIPE_BUF`, 4096 bytes on Linux: one
/// atomic write) to a pipe whose reader may be gone, without `SIGPIPE`:
/// the master runs in the user's program, which may not ignore it, and
/// would be killed. `SIGPIPE` is blocked in the calling thread
/// (`pthread_sigmask(3)`) around the write; one the write raised is taken
/// (`sigtimedwait(2)`, no wait) unless one was pending already
/// (`sigpending(2)`); then the thread's mask is restored.
///
/// # Errors
/// `BrokenPipe` (`EPIPE`) if nobody reads the pipe any more; `WriteZero`
/// for a short write; the write's or the mask's error.
pub fn write_pipe_without_sigpipe(fd: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<()> {
    let mut pipe = SigSet::empty();
    pipe.add(Signal::SIGPIPE);
    let old = pipe.thread_swap_mask(SigmaskHow::SIG_BLOCK)?;
    let was_pending = sigpipe_pending();
    let written = loop {
        match nix::unistd::write(fd, bytes) {
            Err(nix::errno::Errno::EINTR) => {}
            other => break other,
        }
    };
    if written == Err(nix::errno::Errno::EPIPE) && !was_pending {
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid signal set and timeout, both borrowed for the
        // call; a null siginfo pointer is allowed. It only dequeues the
        // SIGPIPE this thread's write raised (blocked, so pending).
        unsafe { libc::sigtimedwait(pipe.as_ref(), ptr::null_mut(), &zero) };
    }
    old.thread_set_mask()?;
    match written {
        Ok(n) if n == bytes.len() => Ok(()),
        Ok(_) => Err(io::ErrorKind::WriteZero.into()),
        Err(e) => Err(e.into()),
    }
}

/// Whether `SIGPIPE` is pending for this thread or the process
/// (`sigpending(2)`); `false` if that cannot be known.
fn sigpipe_pending() -> bool {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigpending fills the set it is given a valid pointer to.
    if unsafe { libc::sigpending(set.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: sigpending returned 0: the set is initialized; sigismember
    // only reads it.
    unsafe { libc::sigismember(set.as_ptr(), libc::SIGPIPE) == 1 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::process as proc;
    use crate::testing::{fork, ExitStatus, Watchdog};
    use std::time::Duration;

    /// A write to a pipe nobody reads is `EPIPE`, not death by `SIGPIPE`
    /// (checked in a child with `SIGPIPE`'s default action, which kills;
    /// Rust's runtime ignores it in the test binary), leaves no `SIGPIPE`
    /// pending and the thread's mask as it was; to a pipe read, the bytes
    /// arrive.
    #[test]
    fn a_pipe_without_reader_is_epipe_not_sigpipe() {
        let dog = Watchdog::new("write_pipe_without_sigpipe", Duration::from_secs(20));
        // SAFETY: the child resets one signal's action (to SIG_DFL: no
        // handler runs in a signal context), makes a pipe and writes to
        // it, and reads its own signal mask: no lock another thread of
        // the test binary could hold at the fork.
        let child = dog.track(
            unsafe {
                fork(|| {
                    use nix::sys::signal::{signal, SigHandler};
                    if signal(Signal::SIGPIPE, SigHandler::SigDfl).is_err() {
                        return 2;
                    }
                    let Ok((read, write)) = proc::pipe_cloexec() else {
                        return 3;
                    };
                    drop(read);
                    let err = write_pipe_without_sigpipe(write.as_fd(), b"stopping\n");
                    if err.map_err(|e| e.kind()) != Err(io::ErrorKind::BrokenPipe) {
                        return 4;
                    }
                    if sigpipe_pending() {
                        return 5;
                    }
                    match SigSet::thread_get_mask() {
                        Ok(mask) if !mask.contains(Signal::SIGPIPE) => 0,
                        _ => 6,
                    }
                })
            }
            .unwrap(),
        );
        assert_eq!(
            child.wait_timeout(Duration::from_secs(10)).unwrap(),
            Some(ExitStatus::Code(0))
        );
        let (read, write) = proc::pipe_cloexec().unwrap();
        write_pipe_without_sigpipe(write.as_fd(), b"ready pid=1\n").unwrap();
        let mut buf = [0u8; 32];
        let n = proc::read_raw(read.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"ready pid=1\n");
    }
}
