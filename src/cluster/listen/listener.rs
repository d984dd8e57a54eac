//! [`Listener`]: a listening socket as a worker holds it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use super::ListenAddr;
use crate::sys::net;

/// A listening socket a worker received, inherited at start or requested
/// from the master.
///
/// The socket's open file description is shared with the master and, for
/// a [`ListenMode::Shared`](crate::ListenMode::Shared) listener, with every other worker: a flag set
/// with `fcntl(F_SETFL)`, such as `O_NONBLOCK` by
/// [`TcpListener::set_nonblocking`](std::net::TcpListener::set_nonblocking),
/// applies to all of them. Use the same blocking mode in every worker.
#[derive(Debug)]
pub struct Listener {
    name: String,
    fd: OwnedFd,
}

impl Listener {
    pub(crate) fn new(name: String, fd: OwnedFd) -> Self {
        Self { name, fd }
    }

    /// Its name: the `LISTEN_FDNAMES` entry for an inherited listener
    /// ([`ListenSpec::name`](crate::ListenSpec::name)), the address for a requested one.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address it is bound to (port 0 resolved).
    ///
    /// # Errors
    /// If `getsockname` fails, or the socket is neither TCP/IP nor a unix
    /// socket bound to a path (`Unsupported`).
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match net::local_addr(self.fd.as_fd())? {
            net::LocalAddr::Inet(addr) => Ok(ListenAddr::Tcp(addr)),
            net::LocalAddr::UnixPath(path) => Ok(ListenAddr::Unix(path)),
            _ => Err(io::ErrorKind::Unsupported.into()),
        }
    }

    /// Whether it is an IPv4 or IPv6 socket.
    pub fn is_tcp(&self) -> bool {
        matches!(net::local_addr(self.fd.as_fd()), Ok(net::LocalAddr::Inet(_)))
    }

    /// Whether it is a unix socket.
    pub fn is_unix(&self) -> bool {
        matches!(
            net::local_addr(self.fd.as_fd()),
            Ok(net::LocalAddr::UnixPath(_) | net::LocalAddr::UnixOther)
        )
    }

    /// The socket as a standard TCP listener. It is not checked: on a
    /// socket that is not TCP ([`is_tcp`](Self::is_tcp)) its calls fail.
    pub fn into_tcp(self) -> std::net::TcpListener {
        std::net::TcpListener::from(self.fd)
    }

    /// The socket as a standard unix listener. It is not checked: on a
    /// socket that is not a unix stream socket its calls fail.
    pub fn into_unix(self) -> std::os::unix::net::UnixListener {
        std::os::unix::net::UnixListener::from(self.fd)
    }

    /// The socket as a tokio TCP listener, made non-blocking and
    /// close-on-exec (a listener placed by the master at fd 3, 4, ... for a
    /// spawned worker is neither). Works for `Shared` and `ReusePort`
    /// listeners alike: each process accepts on its own descriptor.
    ///
    /// # Errors
    /// If `fcntl` fails, or tokio cannot register the socket (not inside a
    /// runtime with I/O enabled). Not checked to be TCP: see
    /// [`is_tcp`](Self::is_tcp).
    #[cfg(feature = "tokio")]
    pub fn into_tokio_tcp(self) -> io::Result<tokio::net::TcpListener> {
        crate::sys::set_cloexec_nonblocking(self.fd.as_fd())?;
        tokio::net::TcpListener::from_std(self.into_tcp())
    }

    /// The socket as a tokio unix listener, non-blocking and close-on-exec.
    ///
    /// # Errors
    /// As [`Listener::into_tokio_tcp`].
    #[cfg(feature = "tokio")]
    pub fn into_tokio_unix(self) -> io::Result<tokio::net::UnixListener> {
        crate::sys::set_cloexec_nonblocking(self.fd.as_fd())?;
        tokio::net::UnixListener::from_std(self.into_unix())
    }

    /// The descriptor, for an event loop that takes one.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// A second descriptor for the same socket (close-on-exec).
    ///
    /// # Errors
    /// If `fcntl(F_DUPFD_CLOEXEC)` fails (out of descriptors).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            name: self.name.clone(),
            fd: self.fd.try_clone()?,
        })
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<Listener> for OwnedFd {
    fn from(listener: Listener) -> Self {
        listener.fd
    }
}

/// Listener adoption into tokio: an inherited listener (not close-on-exec,
/// blocking, as a spawned worker finds it at fd 3) comes out non-blocking
/// and close-on-exec, and accepts.
#[cfg(all(test, feature = "tokio", not(loom)))]
mod tokio_tests {
    use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

    use super::super::Listener;
    use crate::sys;

    /// (`FD_CLOEXEC`, `O_NONBLOCK`).
    fn flags(fd: BorrowedFd<'_>) -> (bool, bool) {
        (
            sys::fd::is_cloexec(fd).unwrap(),
            sys::fd::is_nonblocking(fd).unwrap(),
        )
    }

    fn inherited(fd: OwnedFd) -> Listener {
        sys::fd::set_cloexec(fd.as_fd(), false).unwrap();
        assert_eq!(flags(fd.as_fd()), (false, false), "as inherited");
        Listener::new("test".into(), fd)
    }

    #[test]
    fn tcp_and_unix_listeners_become_tokio_listeners() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = tcp.local_addr().unwrap();
            let tcp = inherited(OwnedFd::from(tcp)).into_tokio_tcp().unwrap();
            assert_eq!(flags(tcp.as_fd()), (true, true));
            let client = tokio::net::TcpStream::connect(addr);
            let (accepted, connected) = tokio::join!(tcp.accept(), client);
            assert!(accepted.is_ok() && connected.is_ok());

            let dir = std::env::temp_dir().join(format!("shmc-tokio-unix-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("s.sock");
            let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
            let unix = inherited(OwnedFd::from(unix)).into_tokio_unix().unwrap();
            assert_eq!(flags(unix.as_fd()), (true, true));
            let client = tokio::net::UnixStream::connect(&path);
            let (accepted, connected) = tokio::join!(unix.accept(), client);
            assert!(accepted.is_ok() && connected.is_ok());
            std::fs::remove_dir_all(&dir).unwrap();
        });
    }
}
