//! Processes: `fork(2)`, `waitpid(2)` (a [`Child`] and the master's
//! reaping), `kill(2)`, `execve(2)`, `getpid(2)`, dying with the parent
//! (`prctl(2)`), `_exit(2)`, and a monotonic clock shared by all processes.
//! Signals are in [`super::signal`].

use std::ffi::CString;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::time::Duration;

use nix::sys::signal::Signal;

use super::cvt;

/// `clock_gettime(2)` `CLOCK_MONOTONIC` in nanoseconds: the same clock in
/// every process on the machine, so one process can compare a time another
/// stored in the segment.
pub fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => (ts.tv_sec() as u64).saturating_mul(1_000_000_000) + ts.tv_nsec() as u64,
        Err(_) => 0,
    }
}

/// Threads in this process: the entries of `/proc/self/task` (`proc(5)`).
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

/// `getppid(2)`: the parent's pid (1, or a subreaper's, once the parent
/// died).
pub fn parent_pid() -> u32 {
    nix::unistd::getppid().as_raw() as u32
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

/// `getpid(2)`.
pub fn getpid() -> u32 {
    nix::unistd::getpid().as_raw() as u32
}

/// This process's pid, cached: `getpid(2)` is a real system call on
/// current glibc (~100 ns here), too slow for a lock's fast path. A
/// `pthread_atfork(3)` child handler clears the cache, so a forked child
/// never sees its parent's pid.
#[inline]
pub fn cached_pid() -> u32 {
    match PID.load(Relaxed) {
        0 => cache_pid(),
        pid => pid,
    }
}

/// The pid [`cached_pid`] returns; 0 until looked up, and in a forked child.
static PID: AtomicU32 = AtomicU32::new(0);

/// This process's pid (high half) and the low 32 bits of its start time
/// ([`super::claim::process_start`]): with one load, who holds a lock
/// (`sys::claim::own_identity`). 0 until looked up, and in a forked child.
static IDENTITY: AtomicU64 = AtomicU64::new(0);

/// [`IDENTITY`], looked up once per process.
#[inline]
pub(crate) fn cached_identity() -> u64 {
    match IDENTITY.load(Relaxed) {
        0 => cache_identity(),
        id => id,
    }
}

/// [`cached_identity`]'s look-up. [`cached_pid`] registers the fork
/// handler that clears [`IDENTITY`] before it is first stored.
#[cold]
#[inline(never)]
fn cache_identity() -> u64 {
    let pid = cached_pid();
    let start = super::claim::process_start(pid).unwrap_or(0) as u32;
    let id = (u64::from(pid) << 32) | u64::from(start);
    IDENTITY.store(id, Relaxed);
    id
}

/// [`cached_pid`]'s look-up, once per process.
#[cold]
#[inline(never)]
fn cache_pid() -> u32 {
    // Not a `std::sync::Once`: a fork while another thread is inside
    // `call_once` leaves the child's copy "running" for ever, and the child
    // would hang here. A fork between the flag and the registration leaves
    // that one child without the handler (a process it forks in turn may
    // see its pid cached): rare, and not a hang.
    static REGISTERED: AtomicBool = AtomicBool::new(false);
    extern "C" fn forget() {
        PID.store(0, Relaxed);
        IDENTITY.store(0, Relaxed);
    }
    if !REGISTERED.swap(true, Relaxed) {
        // SAFETY: registers a child handler that only stores to an atomic
        // (async-signal-safe, as a fork child handler must be).
        unsafe { libc::pthread_atfork(None, None, Some(forget)) };
    }
    let pid = getpid();
    PID.store(pid, Relaxed);
    pid
}

/// A child process started by [`crate::testing::fork`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Child {
    pid: i32,
}

impl Child {
    /// The child's process id.
    pub fn pid(self) -> u32 {
        self.pid as u32
    }

    /// `kill(2)` with `SIGKILL`. An already reaped child is not an error.
    pub fn kill(self) -> io::Result<()> {
        match nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        ) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// `waitpid(2)` with `WNOHANG`: `Some(status)` once the child has ended.
    pub fn try_wait(self) -> io::Result<Option<ExitStatus>> {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        match waitpid(nix::unistd::Pid::from_raw(self.pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => Ok(Some(ExitStatus::Code(code))),
            Ok(WaitStatus::Signaled(_, sig, _)) => Ok(Some(ExitStatus::Signal(sig as i32))),
            Ok(_) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits up to `timeout` for the child to end (polling `waitpid(2)`
    /// every millisecond); `None` if it is still running.
    pub fn wait_timeout(self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if std::time::Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It called `exit` with this code.
    Code(i32),
    /// A signal with this number ended it.
    Signal(i32),
}

/// `fork(2)`: `Ok(None)` in the child, `Ok(Some(child))` in the parent.
///
/// # Safety
/// In a multi-threaded parent the child may only call async-signal-safe
/// functions until it execs or exits (`fork(2)`, `signal-safety(7)`): a lock
/// held by another thread at the fork stays locked forever in the child.
pub unsafe fn fork() -> io::Result<Option<Child>> {
    // SAFETY: the caller upholds fork's contract (see above).
    match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
        nix::unistd::ForkResult::Child => Ok(None),
        nix::unistd::ForkResult::Parent { child } => Ok(Some(Child { pid: child.as_raw() })),
    }
}

/// `prctl(2)` `PR_SET_PDEATHSIG` with `SIGKILL`, then `getppid(2)`: this
/// process is killed when its parent dies; if the parent (`parent`) is
/// already gone by the time the request is made, exit now.
pub fn die_with_parent(parent: u32) {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and no pointers.
    let ret = cvt(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) });
    if ret.is_err() || nix::unistd::getppid().as_raw() as u32 != parent {
        exit_now(1);
    }
}

/// `_exit(2)`: ends the process at once, without running atexit handlers or
/// flushing stdio buffers it shares with its parent.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions and never returns.
    unsafe { libc::_exit(code) }
}
