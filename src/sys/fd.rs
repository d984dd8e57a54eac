//! Descriptors: their flags (`fcntl(2)`), copies (`dup2(2)`,
//! `F_DUPFD_CLOEXEC`), `close(2)`, `poll(2)`, and a file's length and
//! contents (`ftruncate(2)`, `fstat(2)`, `pread(2)`).
//!
//! Some functions act on descriptor *numbers* rather than owned
//! descriptors: [`dup2`], [`dup_above`] and [`close_raw`] are for a forked
//! child arranging its descriptor table before `execve(2)`, and
//! [`adopt_fd`] takes a number a parent announced.

use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::{cvt, cvt_retry};

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

/// `fcntl(2)` `F_DUPFD_CLOEXEC`: a new owned descriptor for the same file,
/// close-on-exec.
pub fn dup_cloexec(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    fd.try_clone_to_owned()
}

/// `fcntl(2)` `F_SETFD FD_CLOEXEC` and `F_SETFL O_NONBLOCK`: what an
/// inherited listener needs before an async reactor takes it (and the
/// read end of a binary upgrade's pipe, which the master's loop polls).
pub fn set_cloexec_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
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
    cvt(unsafe { libc::fcntl(raw, libc::F_GETFD) })?;
    // SAFETY: the caller promises `raw` is open (checked above) and owned by
    // nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// `write(2)` of `bytes` (once; errors ignored) to the descriptor number
/// `raw` that this process inherited and does not own as an `OwnedFd`
/// (a binary upgrade's pipe, named in the environment), if it is a pipe
/// (`fstat(2)`: a FIFO). Returns whether it wrote.
///
/// A number that is not open, or is open on anything else, is left alone
/// (and said so once on stderr): a program that closed or reused its low
/// descriptors before it got here must not get a line written into some
/// other file or socket.
pub fn write_to_inherited(raw: RawFd, bytes: &[u8]) -> bool {
    if !is_fifo_raw(raw) {
        static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
            eprintln!("shmcluster: descriptor {raw} is not the inherited pipe; not writing to it");
        }
        return false;
    }
    // SAFETY: `raw` is open (fstat succeeded just above) and is only
    // borrowed for this one write, during which nothing in this
    // single-threaded start-up closes it.
    let fd = unsafe { BorrowedFd::borrow_raw(raw) };
    let _ = nix::unistd::write(fd, bytes);
    true
}

/// `fstat(2)` on descriptor number `raw`: whether it is open on a pipe
/// (a FIFO). `false` when it is not open.
pub fn is_fifo_raw(raw: RawFd) -> bool {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a `struct stat` into the buffer it is given,
    // which is large enough; an invalid number is EBADF and writes nothing.
    if unsafe { libc::fstat(raw, st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstat succeeded, so it filled the buffer.
    let st = unsafe { st.assume_init() };
    st.st_mode & libc::S_IFMT == libc::S_IFIFO
}

/// `fcntl(2)` `F_SETFD`: sets or clears `FD_CLOEXEC` on `fd`.
pub fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let flags = FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD)?);
    let flags = if on {
        flags | FdFlag::FD_CLOEXEC
    } else {
        flags - FdFlag::FD_CLOEXEC
    };
    fcntl(fd, FcntlArg::F_SETFD(flags))?;
    Ok(())
}

/// `fcntl(2)` `F_GETFD`: whether `FD_CLOEXEC` is set on `fd` (tests only).
#[cfg(test)]
pub fn is_cloexec(fd: BorrowedFd<'_>) -> io::Result<bool> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    Ok(FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD)?).contains(FdFlag::FD_CLOEXEC))
}

/// `fcntl(2)` `F_GETFL`: whether `O_NONBLOCK` is set on `fd` (tests of
/// the async adoption only).
#[cfg(all(test, feature = "tokio"))]
pub fn is_nonblocking(fd: BorrowedFd<'_>) -> io::Result<bool> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    Ok(OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?).contains(OFlag::O_NONBLOCK))
}

/// `poll(2)` for `POLLIN` on every descriptor in `fds`, waiting at most
/// `timeout` (`None`: no limit; rounded up to whole milliseconds). Returns,
/// per descriptor, whether a read would not block: data, a hang-up
/// (`POLLHUP`) or an error (`POLLERR`) all count, since a read reports
/// them. All `false` when the time ran out. Retries on `EINTR` with the
/// time left.
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut pollfds: Vec<PollFd<'_>> = fds.iter().map(|fd| PollFd::new(*fd, PollFlags::POLLIN)).collect();
    loop {
        let wait = match deadline {
            None => PollTimeout::NONE,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                // Round up: a 0.5 ms wait must not become a busy poll.
                let ms = left.as_micros().div_ceil(1000);
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
        };
        match poll(&mut pollfds, wait) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(_) => break,
        }
    }
    let ready = PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL;
    Ok(pollfds
        .iter()
        .map(|p| p.revents().is_some_and(|r| r.intersects(ready)))
        .collect())
}

/// `dup2(2)`: makes descriptor number `dst` refer to what `src` refers to,
/// closing whatever `dst` was first; the copy does not have `FD_CLOEXEC`.
/// When `src == dst` nothing changes, the flag included.
///
/// This acts on numbers, not on owned descriptors: anything else in the
/// process that owns `dst` loses it. It is meant for a forked child laying
/// out its descriptor table before `execve(2)`.
pub fn dup2(src: RawFd, dst: RawFd) -> io::Result<()> {
    // SAFETY: dup2 takes two integers and no pointers; replacing `dst`
    // is this function's documented purpose.
    cvt_retry(|| unsafe { libc::dup2(src, dst) }).map(drop)
}

/// `fcntl(2)` `F_DUPFD_CLOEXEC`: a close-on-exec copy of descriptor number
/// `src` at the lowest free number `>= min`. The copy is returned as a
/// number: it is for a forked child arranging its table before exec (see
/// [`dup2`]), which closes it with [`close_raw`] or leaves it to exec.
pub fn dup_above(src: RawFd, min: RawFd) -> io::Result<RawFd> {
    // SAFETY: fcntl with F_DUPFD_CLOEXEC takes integers only; it only adds
    // a descriptor to the table.
    cvt(unsafe { libc::fcntl(src, libc::F_DUPFD_CLOEXEC, min) })
}

/// `close(2)` of descriptor number `fd`, for a forked child arranging its
/// table before exec (see [`dup2`]). Anything else that owns `fd` loses it.
pub fn close_raw(fd: RawFd) -> io::Result<()> {
    // SAFETY: close takes an integer; dropping whatever owned `fd` is this
    // function's documented purpose.
    cvt(unsafe { libc::close(fd) }).map(drop)
}

/// `fcntl(2)` `F_GETFD` on descriptor number `fd`: whether `FD_CLOEXEC` is
/// set (see [`is_cloexec`]), for checking a table laid out before exec
/// (tests only).
#[cfg(test)]
pub fn is_cloexec_raw(fd: RawFd) -> io::Result<bool> {
    // SAFETY: F_GETFD reads the descriptor flags; an invalid number is
    // EBADF.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    Ok(flags & libc::FD_CLOEXEC != 0)
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, AsRawFd};

    use super::super::net::{local_addr, send_with_fd, seqpacket_pair, LocalAddr};
    use super::*;

    #[test]
    fn poll_readable_times_out_then_sees_data_and_hangup() {
        let (a, b) = seqpacket_pair().unwrap();
        let (c, d) = seqpacket_pair().unwrap();
        let start = Instant::now();
        let ready = poll_readable(&[b.as_fd(), d.as_fd()], Some(Duration::from_millis(20))).unwrap();
        assert_eq!(ready, vec![false, false]);
        assert!(start.elapsed() >= Duration::from_millis(20));
        send_with_fd(a.as_fd(), b"x", None).unwrap();
        let ready = poll_readable(&[b.as_fd(), d.as_fd()], Some(Duration::from_secs(5))).unwrap();
        assert_eq!(ready, vec![true, false]);
        drop(c);
        let ready = poll_readable(&[d.as_fd()], None).unwrap();
        assert_eq!(ready, vec![true], "a hang-up is readable");
    }

    #[test]
    fn cloexec_can_be_cleared_and_set() {
        let (a, _b) = seqpacket_pair().unwrap();
        set_cloexec(a.as_fd(), false).unwrap();
        assert!(!is_cloexec(a.as_fd()).unwrap());
        assert!(!is_cloexec_raw(a.as_raw_fd()).unwrap());
        set_cloexec(a.as_fd(), true).unwrap();
        assert!(is_cloexec(a.as_fd()).unwrap());
        assert!(is_cloexec_raw(a.as_raw_fd()).unwrap());
    }

    /// The ready line goes to a pipe, never into whatever file or socket
    /// reused the number.
    #[test]
    fn write_to_inherited_writes_only_to_a_pipe() {
        let (read, write) = crate::sys::process::pipe_cloexec().unwrap();
        assert!(write_to_inherited(write.as_raw_fd(), b"ready\n"));
        let mut buf = [0u8; 16];
        let n = crate::sys::process::read_raw(read.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"ready\n");

        let path = std::env::temp_dir().join(format!("shmcluster-fifo-test-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(!write_to_inherited(file.as_raw_fd(), b"ready\n"));
        assert_eq!(
            file.metadata().unwrap().len(),
            0,
            "nothing written into a regular file"
        );

        let (a, b) = seqpacket_pair().unwrap();
        assert!(!write_to_inherited(a.as_raw_fd(), b"ready\n"));
        set_cloexec_nonblocking(b.as_fd()).unwrap();
        let mut buf = [0u8; 16];
        assert!(
            nix::unistd::read(b.as_fd(), &mut buf).is_err(),
            "nothing sent on a socket"
        );

        // A closed number: nothing, and no panic.
        let raw = read.as_raw_fd();
        drop(read);
        drop(write);
        assert!(!write_to_inherited(raw, b"ready\n"));
    }

    #[test]
    fn dup_above_copies_at_or_above_the_minimum() {
        let (a, _b) = seqpacket_pair().unwrap();
        let copy = dup_above(a.as_raw_fd(), 200).unwrap();
        assert!(copy >= 200);
        // SAFETY: `copy` was just made and is owned by nothing else.
        let owned = unsafe { adopt_fd(copy) }.unwrap();
        assert!(is_cloexec(owned.as_fd()).unwrap());
        assert_eq!(local_addr(owned.as_fd()).unwrap(), LocalAddr::UnixOther);
    }
}
