//! What the master needs from the kernel besides memory: its signals
//! through a `signalfd`, reaping children, `exec`, a monotonic clock shared
//! by all processes, and the worker's side of `SIGTERM`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use super::ExitStatus;

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

/// `clock_gettime(2)` `CLOCK_MONOTONIC` in nanoseconds: the same clock in
/// every process on the machine, so one process can compare a time another
/// stored in the segment.
pub fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => (ts.tv_sec() as u64).saturating_mul(1_000_000_000) + ts.tv_nsec() as u64,
        Err(_) => 0,
    }
}

/// Threads in this process (entries of `/proc/self/task`).
pub fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// `kill(2)`. A process that no longer exists is not an error.
pub fn send_signal(pid: u32, signal: i32) -> io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| io::ErrorKind::InvalidInput)?;
    if pid <= 0 {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    let sig = Signal::try_from(signal).map_err(io::Error::from)?;
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// `waitpid(2)` on any child with `WNOHANG`: the next child that ended,
/// or `None` if none has (or there are no children).
pub fn reap_any() -> io::Result<Option<(u32, ExitStatus)>> {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => {
                return Ok(Some((pid.as_raw() as u32, ExitStatus::Code(code))))
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                return Ok(Some((pid.as_raw() as u32, ExitStatus::Signal(sig as i32))))
            }
            Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return Ok(None),
            // Stopped/continued children are not ends.
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// `waitpid(2)` on `pid`, blocking until it ends.
pub fn wait_for(pid: u32) -> io::Result<ExitStatus> {
    use nix::sys::wait::{waitpid, WaitStatus};
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).map_err(|_| io::ErrorKind::InvalidInput)?);
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(ExitStatus::Code(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(ExitStatus::Signal(sig as i32)),
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The master's signals, read from a `signalfd(2)` instead of handlers:
/// `SIGCHLD`, `SIGTERM`, `SIGINT`, `SIGHUP` and `SIGUSR1` are blocked (so
/// they queue) and the master's loop polls the descriptor with its other
/// work.
pub struct MasterSignals {
    fd: SignalFd,
    old_mask: SigSet,
}

impl MasterSignals {
    /// Blocks the five signals (`sigprocmask(2)`) and opens the descriptor
    /// (non-blocking, close-on-exec).
    pub fn install() -> io::Result<Self> {
        let mut set = SigSet::empty();
        for s in [
            Signal::SIGCHLD,
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGHUP,
            Signal::SIGUSR1,
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

    /// The next pending signal's number, if any.
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

    /// Restores the mask in this process (the master, when it is done).
    pub fn uninstall(self) {
        let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&self.old_mask), None);
    }

    /// The raw descriptor number (for closing it in a forked child).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// `pipe2(2)` with `O_CLOEXEC`: (read end, write end).
pub fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// `execve(2)` of `argv[0]` searched in `PATH` (`execvpe`) with exactly
/// `env`. Returns only on failure.
pub fn exec(argv: &[CString], env: &[CString]) -> io::Error {
    let Some(program) = argv.first() else {
        return io::ErrorKind::InvalidInput.into();
    };
    match nix::unistd::execvpe(program, argv, env) {
        Ok(never) => match never {},
        Err(e) => e.into(),
    }
}

/// Whether `program` names an executable file: a path with a `/` is checked
/// as it is, a bare name is searched in `PATH` (`access(2)` with `X_OK`).
pub fn find_executable(program: &str) -> Option<std::path::PathBuf> {
    use nix::unistd::{access, AccessFlags};
    let ok = |p: &std::path::Path| p.is_file() && access(p, AccessFlags::X_OK).is_ok();
    if program.contains('/') {
        let p = std::path::PathBuf::from(program);
        return ok(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| ok(p))
}

/// `write(2)` of all of `bytes` (for the exec-failure pipe; errors ignored).
pub fn write_all_raw(fd: BorrowedFd<'_>, bytes: &[u8]) {
    let _ = nix::unistd::write(fd, bytes);
}

/// `read(2)` into `buf`; `EINTR` is retried.
pub fn read_raw(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match nix::unistd::read(fd, buf) {
            Ok(n) => return Ok(n),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

static SIGTERM_SEEN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_: libc::c_int) {
    // Async-signal-safe: one atomic store.
    SIGTERM_SEEN.store(true, Relaxed);
}

/// In a forked worker: `SIGTERM` (and `SIGINT`, which a terminal's Ctrl-C
/// sends to the master and its workers alike) no longer kills the process
/// but is recorded (see [`sigterm_seen`]), so the worker can finish what it
/// is doing; installed without `SA_RESTART`, so blocking calls that do not
/// retry return `EINTR`.
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
