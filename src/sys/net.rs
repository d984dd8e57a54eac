//! Sockets: listeners (TCP with `SO_REUSEPORT`, unix), socket pairs and
//! descriptor passing (`SCM_RIGHTS`), and `LISTEN_FDS` fd placement.
//!
//! Only the cluster module uses these. Every socket made here is
//! close-on-exec; a descriptor reaches a child only through
//! [`super::fd::dup2`] (which clears the flag on the copy) or
//! [`super::fd::set_cloexec`]. [`adopt_listen_fds`] takes the descriptor
//! numbers a parent announced in `LISTEN_FDS`.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::sys::socket::{
    self as socket, sockopt, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, SockaddrLike, SockaddrStorage, UnixAddr,
};

use super::cvt;

/// The `listen(2)` backlog used when the caller has no opinion. The kernel
/// caps it at `net.core.somaxconn`.
pub const DEFAULT_BACKLOG: i32 = 1024;

/// The first descriptor number of the `LISTEN_FDS` protocol
/// (`SD_LISTEN_FDS_START` in `sd_listen_fds(3)`).
pub const LISTEN_FDS_START: RawFd = 3;

/// How many descriptors one [`recv_with_fd`] makes room for. A peer that
/// sends more has the extra ones closed on arrival.
const MAX_FDS_PER_MESSAGE: usize = 4;

/// `listen(2)` with `backlog` as given (nix's `Backlog` would clamp it to
/// the C library's `SOMAXCONN`, which is 128 on musl).
fn listen(fd: BorrowedFd<'_>, backlog: i32) -> io::Result<()> {
    // SAFETY: listen takes a descriptor and an integer, no pointers; `fd` is
    // open for the duration of the borrow.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    Ok(())
}

/// A TCP listening socket: `socket(2)` (`SOCK_STREAM | SOCK_CLOEXEC`),
/// `setsockopt(2)` `SO_REUSEADDR` (always) and `SO_REUSEPORT` (if
/// `reuse_port`, see `socket(7)`), `bind(2)`, `listen(2)` with `backlog`.
pub fn bind_tcp(addr: SocketAddr, reuse_port: bool, backlog: i32) -> io::Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if reuse_port {
        socket::setsockopt(&fd, sockopt::ReusePort, &true)?;
    }
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    listen(fd.as_fd(), backlog)?;
    Ok(fd)
}

/// A unix stream listening socket at `path`: `socket(2)` (`AF_UNIX,
/// SOCK_STREAM | SOCK_CLOEXEC`), `bind(2)` (which creates the socket file;
/// `EADDRINUSE` if any file is there), `listen(2)` with `backlog`. See
/// `unix(7)`.
pub fn bind_unix(path: &Path, backlog: i32) -> io::Result<OwnedFd> {
    let addr = UnixAddr::new(path)?;
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::bind(fd.as_raw_fd(), &addr)?;
    listen(fd.as_fd(), backlog)?;
    Ok(fd)
}

/// The address a socket is bound to, as `getsockname(2)` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalAddr {
    /// An `AF_INET` or `AF_INET6` socket.
    Inet(SocketAddr),
    /// An `AF_UNIX` socket bound to a path.
    UnixPath(PathBuf),
    /// An `AF_UNIX` socket that is unnamed or in the abstract namespace.
    UnixOther,
    /// Any other address family (its `AF_*` number).
    Other(i32),
}

/// `getsockname(2)`: the address `fd` is bound to.
pub fn local_addr(fd: BorrowedFd<'_>) -> io::Result<LocalAddr> {
    let addr: SockaddrStorage = socket::getsockname(fd.as_raw_fd())?;
    if let Some(v4) = addr.as_sockaddr_in() {
        return Ok(LocalAddr::Inet(SocketAddr::V4(SocketAddrV4::from(*v4))));
    }
    if let Some(v6) = addr.as_sockaddr_in6() {
        return Ok(LocalAddr::Inet(SocketAddr::V6(SocketAddrV6::from(*v6))));
    }
    if let Some(unix) = addr.as_unix_addr() {
        return Ok(match unix.path() {
            Some(path) => LocalAddr::UnixPath(path.to_path_buf()),
            None => LocalAddr::UnixOther,
        });
    }
    Ok(LocalAddr::Other(addr.family().map_or(-1, |f| f as i32)))
}

/// `getsockname(2)` of a TCP socket: its address, with port 0 resolved to
/// the port the kernel chose. `EAFNOSUPPORT` for a socket of another family.
pub fn local_addr_tcp(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    match local_addr(fd)? {
        LocalAddr::Inet(addr) => Ok(addr),
        _ => Err(Errno::EAFNOSUPPORT.into()),
    }
}

/// `socketpair(2)` with `AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC`: two
/// connected sockets that keep message boundaries (one `send` is one
/// `recv`) and report the peer's close as a zero-length read.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// `sendmsg(2)` with `MSG_NOSIGNAL` of one message `bytes`, carrying `fd`
/// as an `SCM_RIGHTS` control message if given (see `unix(7)`). Retries on
/// `EINTR`. Returns the number of bytes sent (all of them, on a
/// `SOCK_SEQPACKET` socket). A closed peer is `EPIPE`, not `SIGPIPE`.
pub fn send_with_fd(sock: BorrowedFd<'_>, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<usize> {
    let raw = fd.map(|fd| [fd.as_raw_fd()]);
    let cmsg = raw.as_ref().map(|raw| ControlMessage::ScmRights(raw));
    let iov = [IoSlice::new(bytes)];
    loop {
        match socket::sendmsg::<()>(
            sock.as_raw_fd(),
            &iov,
            cmsg.as_slice(),
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(Errno::EINTR) => continue,
            other => return Ok(other?),
        }
    }
}

/// `recvmsg(2)` with `MSG_CMSG_CLOEXEC` of one message into `buf`, and the
/// descriptor it carried (`SCM_RIGHTS`), if any, close-on-exec. Retries on
/// `EINTR`. A length of 0 with no descriptor is the peer's orderly close on
/// a `SOCK_SEQPACKET` socket.
///
/// A message longer than `buf` is cut to `buf.len()` (the rest is lost): a
/// caller that needs to notice passes a buffer one byte longer than the
/// longest message it accepts. Descriptors past the first are closed.
pub fn recv_with_fd(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut cmsg_buf = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
    let mut iov = [IoSliceMut::new(buf)];
    let (len, raw_fds) = loop {
        match socket::recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_buf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(msg) => {
                let mut fds = Vec::new();
                for cmsg in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(received) = cmsg {
                        fds.extend(received);
                    }
                }
                break (msg.bytes, fds);
            }
        }
    };
    let mut owned = Vec::with_capacity(raw_fds.len());
    for raw in raw_fds {
        // SAFETY: the kernel just installed `raw` in our table for this
        // message (SCM_RIGHTS); nothing else knows the number.
        owned.push(unsafe { super::adopt_fd(raw) }?);
    }
    // Extra descriptors close here, with the rest of `owned`.
    Ok((len, owned.into_iter().next()))
}

/// `fstat(2)`: whether `fd` is a socket (`S_ISSOCK`).
pub fn is_socket(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let st = nix::sys::stat::fstat(fd)?;
    Ok(st.st_mode & libc::S_IFMT == libc::S_IFSOCK)
}

/// `shutdown(2)` with `SHUT_RD` on a listening socket: on Linux it stops
/// listening (it leaves its port's lookup and its `SO_REUSEPORT` group,
/// and the connections waiting in its backlog are reset) but stays open
/// and bound, so that `listen(2)` would take it back.
pub fn stop_listening(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(socket::shutdown(fd.as_raw_fd(), socket::Shutdown::Read)?)
}

/// `listen(2)` again on a bound TCP socket, with [`DEFAULT_BACKLOG`]: a
/// socket [`stop_listening`] stopped listens again (it kept its address
/// and port); a listening one only has its backlog set.
pub fn relisten(fd: BorrowedFd<'_>) -> io::Result<()> {
    listen(fd, DEFAULT_BACKLOG)
}

/// Whether `accept(2)`'s error `e` on `fd` says the socket stopped
/// listening (`EINVAL`, and `SO_ACCEPTCONN` is off): the master stopped
/// it ([`stop_listening`]: an instance given up, or a binary upgrade's
/// new master that has no instance for it). Nothing will arrive on it;
/// an accept loop waits for its stop instead of failing (which would end
/// the worker and the connections it is serving).
pub fn stopped_listening(e: &io::Error, fd: BorrowedFd<'_>) -> bool {
    e.raw_os_error() == Some(libc::EINVAL) && socket_is_listening(fd).is_ok_and(|on| !on)
}

/// `getsockopt(2)` `SO_REUSEPORT`: whether `fd` was made to share its
/// port (it must have been before `bind(2)` to be in a group).
pub fn has_reuse_port(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(socket::getsockopt(&fd, sockopt::ReusePort)?)
}

/// `getsockopt(2)` `SO_ACCEPTCONN`: whether `fd` is listening.
pub fn socket_is_listening(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(socket::getsockopt(&fd, sockopt::AcceptConn)?)
}

/// Set once descriptors announced in `LISTEN_FDS` have been taken, so the
/// same numbers are never owned twice in one process.
static LISTEN_FDS_TAKEN: AtomicBool = AtomicBool::new(false);

/// Takes ownership of descriptors `3 .. 3 + count`, which the parent
/// announced in `LISTEN_FDS` (`sd_listen_fds(3)`), after checking with
/// `fcntl(2)` `F_GETFD` that each is open. Their flags are left as they
/// came (the caller sets `FD_CLOEXEC`).
///
/// The numbers are taken at most once per process: a second call fails
/// with `EALREADY`. That, and that nothing in this process opened a
/// descriptor in that range and still owns it, is what makes taking bare
/// numbers sound; the caller must call this early, before the numbers could
/// have been handed to anything else.
pub fn adopt_listen_fds(count: usize) -> io::Result<Vec<OwnedFd>> {
    let count = i32::try_from(count)
        .ok()
        .filter(|n| *n <= i32::MAX - LISTEN_FDS_START)
        .ok_or(Errno::EINVAL)?;
    if LISTEN_FDS_TAKEN.swap(true, Ordering::AcqRel) {
        return Err(Errno::EALREADY.into());
    }
    let mut fds = Vec::new();
    for raw in LISTEN_FDS_START..LISTEN_FDS_START + count {
        // SAFETY: the parent placed `raw` in our table for us; the flag
        // above makes this the only place in the process that takes it
        // (see the contract above).
        fds.push(unsafe { super::adopt_fd(raw) }?);
    }
    Ok(fds)
}

/// `getsockopt(2)` `SO_PEERCRED` on a connected unix socket: the user id
/// of the process that connected (or created the pair), as the kernel
/// recorded it at `connect(2)` time (see `unix(7)`). The peer cannot forge
/// it.
pub fn peer_uid(sock: BorrowedFd<'_>) -> io::Result<u32> {
    let cred = socket::getsockopt(&sock, sockopt::PeerCredentials)?;
    Ok(cred.uid())
}

/// `getuid(2)`: the real user id of this process.
pub fn own_uid() -> u32 {
    // SAFETY: getuid takes no arguments, touches no memory and cannot fail.
    unsafe { libc::getuid() }
}

/// What a stop-aware accept loop (the worker's `StopWatch::accept`) does
/// after an `accept(2)` error: [`accept_error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptError {
    /// Nothing to accept (`EAGAIN`), a signal (`EINTR`), or a connection
    /// that failed before it was accepted: wait for the next one.
    Retry,
    /// Out of descriptors or memory, with the connection still queued:
    /// pause, then try again.
    BackOff,
    /// The listener is unusable (or the error is not known to pass).
    Fail,
}

/// How `accept(2)`'s error `e` is to be taken (see [`AcceptError`]).
pub fn accept_error(e: &io::Error) -> AcceptError {
    match e.raw_os_error() {
        // accept(2): "Linux accept() passes already-pending network errors
        // on the new socket as an error code from accept() [...] these
        // errors should be treated like EAGAIN by retrying" (for TCP).
        Some(
            libc::EAGAIN
            | libc::EINTR
            | libc::ECONNABORTED
            | libc::EPROTO
            | libc::ENETDOWN
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH,
        ) => AcceptError::Retry,
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => AcceptError::BackOff,
        _ => AcceptError::Fail,
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    use super::super::fd::is_cloexec;
    use super::*;

    fn loopback_any() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    #[test]
    fn bind_tcp_listens_on_a_chosen_port_close_on_exec() {
        let fd = bind_tcp(loopback_any(), false, DEFAULT_BACKLOG).unwrap();
        let addr = local_addr_tcp(fd.as_fd()).unwrap();
        assert_eq!(addr.ip(), loopback_any().ip());
        assert_ne!(addr.port(), 0);
        assert!(is_socket(fd.as_fd()).unwrap());
        assert!(socket_is_listening(fd.as_fd()).unwrap());
        assert!(is_cloexec(fd.as_fd()).unwrap());
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        let (mut server, _) = std::net::TcpListener::from(fd).accept().unwrap();
        client.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
    }

    #[test]
    fn reuse_port_lets_two_sockets_share_a_port_and_plain_does_not() {
        let first = bind_tcp(loopback_any(), true, DEFAULT_BACKLOG).unwrap();
        let addr = local_addr_tcp(first.as_fd()).unwrap();
        let second = bind_tcp(addr, true, DEFAULT_BACKLOG).unwrap();
        assert_eq!(local_addr_tcp(second.as_fd()).unwrap(), addr);
        let err = bind_tcp(addr, false, DEFAULT_BACKLOG).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn a_socket_pair_is_not_listening_and_a_file_is_not_a_socket() {
        let (a, _b) = seqpacket_pair().unwrap();
        assert!(is_socket(a.as_fd()).unwrap());
        assert!(!socket_is_listening(a.as_fd()).unwrap());
        assert!(is_cloexec(a.as_fd()).unwrap());
        assert!(local_addr_tcp(a.as_fd()).is_err());
        assert_eq!(local_addr(a.as_fd()).unwrap(), LocalAddr::UnixOther);
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(!is_socket(file.as_fd()).unwrap());
    }

    #[test]
    fn bind_unix_creates_the_file_and_refuses_an_existing_one() {
        let path = std::env::temp_dir().join(format!("shmcluster-net-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let fd = bind_unix(&path, DEFAULT_BACKLOG).unwrap();
        assert_eq!(local_addr(fd.as_fd()).unwrap(), LocalAddr::UnixPath(path.clone()));
        assert!(socket_is_listening(fd.as_fd()).unwrap());
        let err = bind_unix(&path, DEFAULT_BACKLOG).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn messages_keep_their_boundaries_and_carry_a_descriptor() {
        let (a, b) = seqpacket_pair().unwrap();
        let listener = bind_tcp(loopback_any(), false, DEFAULT_BACKLOG).unwrap();
        let addr = local_addr_tcp(listener.as_fd()).unwrap();
        assert_eq!(
            send_with_fd(a.as_fd(), b"first", Some(listener.as_fd())).unwrap(),
            5
        );
        assert_eq!(send_with_fd(a.as_fd(), b"second", None).unwrap(), 6);

        let mut buf = [0u8; 64];
        let (len, fd) = recv_with_fd(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..len], b"first");
        let fd = fd.expect("descriptor passed");
        assert_ne!(fd.as_raw_fd(), listener.as_raw_fd());
        assert_eq!(local_addr_tcp(fd.as_fd()).unwrap(), addr, "the same socket");
        assert!(is_cloexec(fd.as_fd()).unwrap(), "MSG_CMSG_CLOEXEC");

        let (len, fd) = recv_with_fd(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..len], b"second");
        assert!(fd.is_none());

        // A message longer than the buffer is cut, and says so by filling it.
        send_with_fd(a.as_fd(), b"0123456789", None).unwrap();
        let mut small = [0u8; 4];
        assert_eq!(recv_with_fd(b.as_fd(), &mut small).unwrap().0, 4);

        drop(a);
        let (len, fd) = recv_with_fd(b.as_fd(), &mut buf).unwrap();
        assert_eq!((len, fd.is_none()), (0, true), "end of file");
        let (c, d) = seqpacket_pair().unwrap();
        drop(d);
        let err = send_with_fd(c.as_fd(), b"x", None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "EPIPE, not SIGPIPE");
    }

    #[test]
    fn peer_uid_of_a_pair_is_our_own_uid() {
        let (a, _b) = seqpacket_pair().unwrap();
        assert_eq!(peer_uid(a.as_fd()).unwrap(), own_uid());
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(peer_uid(file.as_fd()).is_err(), "not a socket");
    }

    /// Which `accept(2)` errors end the wait, and which are retried (at
    /// once, or after a pause for descriptors or memory to come back).
    #[test]
    fn accept_errors_transient_or_not() {
        let err = io::Error::from_raw_os_error;
        for e in [
            libc::EAGAIN,
            libc::EINTR,
            libc::ECONNABORTED,
            libc::EPROTO,
            libc::ENETDOWN,
            libc::ENOPROTOOPT,
            libc::EHOSTDOWN,
            libc::ENONET,
            libc::EHOSTUNREACH,
            libc::EOPNOTSUPP,
            libc::ENETUNREACH,
        ] {
            assert_eq!(accept_error(&err(e)), AcceptError::Retry, "errno {e}");
        }
        for e in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert_eq!(accept_error(&err(e)), AcceptError::BackOff, "errno {e}");
        }
        for e in [
            libc::EBADF,
            libc::EINVAL,
            libc::ENOTSOCK,
            libc::EPERM,
            libc::EFAULT,
        ] {
            assert_eq!(accept_error(&err(e)), AcceptError::Fail, "errno {e}");
        }
    }
}
