//! Every system call and libc call the crate makes, and nothing else.
//!
//! Modules above this one never name `libc` or `nix`. Each wrapper's doc
//! names the exact system call and its man page, takes typed arguments
//! (`&AtomicU32`, `BorrowedFd`) instead of raw addresses, and turns `-1` into
//! an [`io::Error`] in one place ([`cvt`]).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

pub mod claim;
mod futex;
pub mod mutex;
pub mod net;
pub mod process;
pub use futex::{futex_wait, futex_wake};

/// `memfd_create(2)` with `MFD_CLOEXEC | MFD_ALLOW_SEALING`: an anonymous
/// file with no name in `/dev/shm`, gone when its last fd and mapping close.
pub fn memfd_create(name: &str) -> io::Result<OwnedFd> {
    nix::sys::memfd::memfd_create(
        name,
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(io::Error::from)
}

/// `ftruncate(2)`: sets the file's length (new bytes read as zero).
pub fn set_len(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
    nix::unistd::ftruncate(fd, len).map_err(io::Error::from)
}

/// `pread(2)`: reads up to `buf.len()` bytes at `offset` without moving
/// the file position; returns how many were read.
pub fn read_at(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    nix::sys::uio::pread(fd, buf, offset).map_err(io::Error::from)
}

/// `fstat(2)`: the file's length in bytes.
pub fn file_len(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let st = nix::sys::stat::fstat(fd).map_err(io::Error::from)?;
    u64::try_from(st.st_size).map_err(|_| io::ErrorKind::InvalidData.into())
}

/// `fcntl(2)` `F_ADD_SEALS` with `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`:
/// nobody can change the segment's size any more (a shrink would SIGBUS
/// every peer), nor remove the seals.
pub fn seal_size(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
    fcntl(fd, FcntlArg::F_ADD_SEALS(seals))
        .map(drop)
        .map_err(io::Error::from)
}

/// `fcntl(2)` `F_GET_SEALS`: whether the size seals
/// (`F_SEAL_SHRINK | F_SEAL_GROW`) are set on `fd`. A file that cannot carry
/// seals at all (`EINVAL`: not a memfd or shmem file) has none.
pub fn is_size_sealed(fd: BorrowedFd<'_>) -> io::Result<bool> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    let bits = match fcntl(fd, FcntlArg::F_GET_SEALS) {
        Ok(bits) => bits,
        Err(nix::errno::Errno::EINVAL) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let seals = SealFlag::from_bits_truncate(bits);
    Ok(seals.contains(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW))
}

/// `mmap(2)` with `PROT_READ | PROT_WRITE, MAP_SHARED` of the first `len`
/// bytes of `fd`, through memmap2's [`memmap2::MmapRaw`]: it hands out raw
/// pointers only, never references, which is what memory that other
/// processes write requires. Unmapped (`munmap(2)`) on drop.
pub fn map_shared(fd: BorrowedFd<'_>, len: usize) -> io::Result<memmap2::MmapRaw> {
    memmap2::MmapOptions::new().len(len).map_raw(fd.as_raw_fd())
}

/// `fcntl(2)` `F_DUPFD_CLOEXEC`: a new owned descriptor for the same file,
/// close-on-exec.
pub fn dup_cloexec(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    fd.try_clone_to_owned()
}

/// `-1` → the thread's `errno` as an [`io::Error`].
fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `eventfd(2)` with `EFD_CLOEXEC | EFD_NONBLOCK`, counter 0: a slot's
/// pollable wakeup for an async receiver.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; a non-negative result is a new
    // descriptor that nothing else owns.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: just created above, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `write(2)` of 1 to an eventfd: makes it readable. Errors are ignored on
/// purpose: `EAGAIN` means the counter is saturated (already readable), and
/// the receiver's timer covers anything else.
pub fn eventfd_ring(fd: BorrowedFd<'_>) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live local buffer to an open descriptor.
    let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

/// `read(2)` of an eventfd (non-blocking): its counter, reset to 0 so it
/// is not readable until the next ring; `WouldBlock` if it was 0.
#[cfg(feature = "tokio")]
pub fn eventfd_read(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut buf = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a live local buffer.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from_ne_bytes(buf))
}

/// `fcntl(2)` `F_SETFD FD_CLOEXEC` and `F_SETFL O_NONBLOCK`: what an
/// inherited listener needs before an async reactor takes it.
#[cfg(feature = "tokio")]
pub fn set_cloexec_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl on an open descriptor with integer arguments only.
    let flags = cvt(unsafe { libc::fcntl(raw, libc::F_GETFD) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(raw, libc::F_SETFD, flags | libc::FD_CLOEXEC) })?;
    // SAFETY: as above.
    let fl = cvt(unsafe { libc::fcntl(raw, libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK) })?;
    Ok(())
}

/// Takes ownership of a descriptor number inherited from a parent
/// (for example one named in the environment), after checking with
/// `fcntl(2)` `F_GETFD` that it is open.
///
/// # Safety
/// `raw` must not be owned by anything else in this process: the returned
/// `OwnedFd` closes it on drop.
pub unsafe fn adopt_fd(raw: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only reads the descriptor table; an invalid number
    // yields EBADF and no side effect.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the caller promises `raw` is open (checked above) and owned by
    // nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// `getpid(2)`.
pub fn getpid() -> u32 {
    nix::unistd::getpid().as_raw() as u32
}

/// This process's pid, cached: `getpid(2)` is a real system call on
/// current glibc (~100 ns here), too slow for a lock's fast path. A
/// `pthread_atfork(3)` child handler clears the cache, so a forked child
/// never sees its parent's pid.
pub fn cached_pid() -> u32 {
    use std::sync::atomic::AtomicBool;
    use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
    static PID: AtomicU32 = AtomicU32::new(0);
    // Not a `std::sync::Once`: a fork while another thread is inside
    // `call_once` leaves the child's copy "running" for ever, and the child
    // would hang here. A fork between the flag and the registration leaves
    // that one child without the handler (a process it forks in turn may
    // see its pid cached): rare, and not a hang.
    static REGISTERED: AtomicBool = AtomicBool::new(false);
    extern "C" fn forget() {
        PID.store(0, Relaxed);
    }
    if !REGISTERED.swap(true, Relaxed) {
        // SAFETY: registers a child handler that only stores to an atomic
        // (async-signal-safe, as a fork child handler must be).
        unsafe { libc::pthread_atfork(None, None, Some(forget)) };
    }
    match PID.load(Relaxed) {
        0 => {
            let pid = getpid();
            PID.store(pid, Relaxed);
            pid
        }
        pid => pid,
    }
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
    let ret = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) };
    if ret == -1 || nix::unistd::getppid().as_raw() as u32 != parent {
        exit_now(1);
    }
}

/// `_exit(2)`: ends the process at once, without running atexit handlers or
/// flushing stdio buffers it shares with its parent.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions and never returns.
    unsafe { libc::_exit(code) }
}

/// `size_of::<pthread_mutex_t>()` on this platform, recorded in the segment
/// header so a process built against another libc layout refuses to attach.
pub const PTHREAD_MUTEX_SIZE: u32 = std::mem::size_of::<libc::pthread_mutex_t>() as u32;
