//! systemd's notify protocol (`sd_notify(3)`), both ways: datagrams of
//! `KEY=VALUE` lines on a unix datagram socket.
//!
//! - [`Notifier`]: sends to the socket named by `NOTIFY_SOCKET` (a path,
//!   or `@name` for the abstract namespace), never blocking.
//! - [`NotifySocket`]: a datagram socket this process owns and offers to
//!   another as its `NOTIFY_SOCKET`, bound to a kernel-chosen abstract
//!   name (autobind) with `SO_PASSCRED`, so that each datagram carries the
//!   sender's pid (`SCM_CREDENTIALS`, which only a privileged sender can
//!   forge).
//!
//! Written by hand rather than with a crate: the sending half is one
//! `sendto(2)` with std's [`UnixDatagram`] (abstract names through
//! [`SocketAddrExt`]), and the receiving half needs `SO_PASSCRED`,
//! autobind and `SCM_CREDENTIALS`, which the `sd-notify` crate (a client
//! only) does not offer; nix, already a dependency, does.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use nix::sys::socket::{
    bind, getsockname, recvmsg, setsockopt, socket, sockopt, AddressFamily, ControlMessageOwned, MsgFlags,
    SockFlag, SockType, UnixAddr, UnixCredentials,
};

/// The longest datagram read; longer ones are dropped whole (systemd
/// itself takes up to a page and a notify message is a few lines).
pub const MAX_DATAGRAM: usize = 4096;

/// Why `NOTIFY_SOCKET` names no socket this process can send to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyAddrError {
    /// Empty.
    Empty,
    /// Neither an absolute path nor `@name` (systemd's `vsock:` and
    /// relative paths are not supported).
    Unsupported(String),
}

impl std::fmt::Display for NotifyAddrError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Empty => f.write_str("NOTIFY_SOCKET is empty"),
            Self::Unsupported(s) => write!(
                f,
                "NOTIFY_SOCKET={s:?} is neither an absolute path nor an abstract @name"
            ),
        }
    }
}

impl std::error::Error for NotifyAddrError {}

/// The address `NOTIFY_SOCKET`'s value names: `@name` is `name` in the
/// abstract namespace, `/path` a socket file.
pub fn parse_notify_addr(value: &str) -> Result<SocketAddr, io::Error> {
    let invalid = |e: NotifyAddrError| io::Error::new(io::ErrorKind::InvalidInput, e);
    if value.is_empty() {
        return Err(invalid(NotifyAddrError::Empty));
    }
    if let Some(name) = value.strip_prefix('@') {
        return SocketAddr::from_abstract_name(name.as_bytes());
    }
    if value.starts_with('/') {
        return SocketAddr::from_pathname(value);
    }
    Err(invalid(NotifyAddrError::Unsupported(value.to_owned())))
}

/// Sends notify messages to one address without ever blocking.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    to: SocketAddr,
}

impl Notifier {
    /// An unbound, non-blocking datagram socket (close-on-exec) sending to
    /// `value`, a `NOTIFY_SOCKET` value.
    ///
    /// # Errors
    /// An address [`parse_notify_addr`] refuses, or no socket.
    pub fn new(value: &str) -> io::Result<Self> {
        let to = parse_notify_addr(value)?;
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok(Self { socket, to })
    }

    /// Sends `message` (`KEY=VALUE` lines) in one datagram, `sendto(2)`
    /// with the socket non-blocking: a full receiver is `WouldBlock`.
    pub fn send(&self, message: &str) -> io::Result<()> {
        self.socket.send_to_addr(message.as_bytes(), &self.to).map(|_| ())
    }

    /// The socket's descriptor (for a child to close).
    pub fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

/// A datagram socket on a kernel-chosen abstract name, offered to another
/// process as its `NOTIFY_SOCKET`; non-blocking, close-on-exec,
/// `SO_PASSCRED`.
#[derive(Debug)]
pub struct NotifySocket {
    fd: OwnedFd,
    /// The `NOTIFY_SOCKET` value: `@` and the abstract name.
    name: String,
}

/// One datagram read from a [`NotifySocket`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyDatagram {
    /// The sender's pid as the kernel vouches for it; `None` if the
    /// datagram came without credentials.
    pub pid: Option<u32>,
    /// The bytes (at most [`MAX_DATAGRAM`]).
    pub data: Vec<u8>,
}

impl NotifySocket {
    /// Binds a new one: `socket(2)`, `SO_PASSCRED`, `bind(2)` to an empty
    /// address (autobind: the kernel picks a free abstract name), and
    /// `getsockname(2)` for its name.
    pub fn bind() -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        setsockopt(&fd, sockopt::PassCred, &true)?;
        bind(fd.as_raw_fd(), &UnixAddr::new_unnamed())?;
        let addr: UnixAddr = getsockname(fd.as_raw_fd())?;
        let abstract_name = addr
            .as_abstract()
            .ok_or_else(|| io::Error::other("autobind gave no abstract name"))?;
        // Autobind names are five hex digits; anything else could not go
        // into an environment variable faithfully.
        let name = std::str::from_utf8(abstract_name)
            .ok()
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| io::Error::other("autobind gave an unprintable name"))?;
        let name = format!("@{name}");
        Ok(Self { fd, name })
    }

    /// The `NOTIFY_SOCKET` value naming it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The next datagram, `Ok(None)` when none is queued. Descriptors sent
    /// along (`SCM_RIGHTS`, systemd's `FDSTORE=1`) are closed at once; a
    /// datagram longer than [`MAX_DATAGRAM`] comes back empty.
    pub fn recv(&self) -> io::Result<Option<NotifyDatagram>> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut cmsg = nix::cmsg_space!(UnixCredentials, [RawFd; 16]);
        let (bytes, truncated, pid, fds) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EAGAIN) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let mut pid = None;
            let mut fds = Vec::new();
            for c in msg.cmsgs()? {
                match c {
                    ControlMessageOwned::ScmCredentials(cred) => pid = u32::try_from(cred.pid()).ok(),
                    ControlMessageOwned::ScmRights(rights) => fds.extend(rights),
                    _ => {}
                }
            }
            (msg.bytes, msg.flags.contains(MsgFlags::MSG_TRUNC), pid, fds)
        };
        for fd in fds {
            // SAFETY: the kernel just installed `fd` in this process for
            // this message; nothing else owns it, and dropping it closes it.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        buf.truncate(if truncated { 0 } else { bytes });
        Ok(Some(NotifyDatagram { pid, data: buf }))
    }
}

impl AsFd for NotifySocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// What one notify datagram asks, as far as a supervisor of workers cares:
/// each of `READY=1`, `WATCHDOG=1` and `STOPPING=1` on a line of its own.
/// Other lines (`STATUS=`, `MAINPID=`, ...) and malformed ones are ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NotifyMessage {
    /// `READY=1`.
    pub ready: bool,
    /// `WATCHDOG=1`.
    pub watchdog: bool,
    /// `STOPPING=1`.
    pub stopping: bool,
}

impl NotifyMessage {
    /// Parses a datagram's bytes (newline-separated assignments).
    pub fn parse(data: &[u8]) -> Self {
        let mut m = Self::default();
        for line in data.split(|&b| b == b'\n') {
            match line {
                b"READY=1" => m.ready = true,
                b"WATCHDOG=1" => m.watchdog = true,
                b"STOPPING=1" => m.stopping = true,
                _ => {}
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_paths_or_abstract_names() {
        assert!(parse_notify_addr("/run/systemd/notify")
            .unwrap()
            .as_pathname()
            .is_some());
        let a = parse_notify_addr("@abc").unwrap();
        assert_eq!(a.as_abstract_name(), Some(&b"abc"[..]));
        assert!(parse_notify_addr("").is_err());
        assert!(parse_notify_addr("vsock:2:9999").is_err());
        assert!(parse_notify_addr("relative/path").is_err());
    }

    #[test]
    fn messages_are_lines_and_other_keys_are_ignored() {
        let m = NotifyMessage::parse(b"STATUS=hi\nREADY=1\nWATCHDOG=1");
        assert_eq!(
            m,
            NotifyMessage {
                ready: true,
                watchdog: true,
                stopping: false
            }
        );
        assert!(!NotifyMessage::parse(b"READY=10\nSTOPPING=1\n").ready);
        assert!(NotifyMessage::parse(b"STOPPING=1\n").stopping);
        assert_eq!(NotifyMessage::parse(b"\xff\x00READY"), NotifyMessage::default());
    }

    #[test]
    fn a_datagram_carries_its_senders_pid() {
        let socket = NotifySocket::bind().unwrap();
        assert!(socket.name().starts_with('@'), "{}", socket.name());
        assert_eq!(socket.recv().unwrap(), None);
        let notifier = Notifier::new(socket.name()).unwrap();
        notifier.send("READY=1\nSTATUS=up").unwrap();
        let d = socket.recv().unwrap().expect("a datagram");
        assert_eq!(d.pid, Some(std::process::id()));
        assert_eq!(d.data, b"READY=1\nSTATUS=up");
        assert_eq!(socket.recv().unwrap(), None);
    }

    #[test]
    fn sending_to_nobody_is_an_error_not_a_hang() {
        let notifier = Notifier::new("@shmcluster-test-nobody-listens-here").unwrap();
        assert!(notifier.send("READY=1").is_err());
    }
}
