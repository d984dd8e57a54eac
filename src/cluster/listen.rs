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
//! wakes one blocked `accept` at a time. [`ListenMode::ReusePort`] gives each
//! worker instance its own socket on the same port (`SO_REUSEPORT`), and the
//! kernel spreads connections over them by a hash of the peer's address.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::sys;
use crate::sys::net;

/// Where a listener is bound.
///
/// Parsed from text by [`FromStr`]: `unix:PATH`, or a path that starts with
/// `/` or `./`, is a unix socket; anything else is `host:port`, resolved
/// (the first address wins), and `:port` alone means `0.0.0.0:port`.
/// [`Display`](fmt::Display) writes the form that parses back.
///
/// # Examples
/// ```
/// use shmcluster::ListenAddr;
///
/// let tcp: ListenAddr = "127.0.0.1:8080".parse()?;
/// assert_eq!(tcp, ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap()));
/// let any: ListenAddr = ":8080".parse()?;
/// assert_eq!(any.to_string(), "0.0.0.0:8080");
/// let unix: ListenAddr = "unix:/run/app.sock".parse()?;
/// assert_eq!(unix, ListenAddr::Unix("/run/app.sock".into()));
/// # Ok::<(), shmcluster::ListenError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    /// A TCP socket on this address (port 0: the kernel picks one).
    Tcp(SocketAddr),
    /// A unix stream socket at this path.
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = ListenError;

    /// # Errors
    /// [`ListenError::Resolve`] if the text is not a unix path and does not
    /// resolve to a socket address.
    fn from_str(s: &str) -> Result<Self, ListenError> {
        let resolve_error = |reason: String| ListenError::Resolve {
            addr: s.to_owned(),
            reason,
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(resolve_error("empty unix socket path".to_owned()));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if s.starts_with('/') || s.starts_with("./") {
            return Ok(Self::Unix(PathBuf::from(s)));
        }
        let host_port = if s.starts_with(':') {
            format!("0.0.0.0{s}")
        } else {
            s.to_owned()
        };
        let mut addrs = host_port
            .to_socket_addrs()
            .map_err(|e| resolve_error(e.to_string()))?;
        addrs
            .next()
            .map(Self::Tcp)
            .ok_or_else(|| resolve_error("no address found".to_owned()))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// How a listener is shared between worker instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ListenMode {
    /// One socket, the same in every worker; the kernel hands each
    /// connection to one of the workers blocked in `accept`.
    #[default]
    Shared,
    /// One socket per worker instance, all on the same TCP address with
    /// `SO_REUSEPORT`; the kernel spreads connections over them by a hash of
    /// the peer's address. TCP only.
    ReusePort,
}

/// A listener for the master to bind before it starts workers.
///
/// # Examples
/// ```
/// use shmcluster::{ListenMode, ListenSpec};
///
/// let spec = ListenSpec::new(":8080".parse()?).mode(ListenMode::ReusePort).name("http");
/// assert_eq!(spec.name, "http");
/// # Ok::<(), shmcluster::ListenError>(())
/// ```
#[derive(Debug, Clone)]
pub struct ListenSpec {
    /// Where to bind.
    pub addr: ListenAddr,
    /// Shared or one socket per instance.
    pub mode: ListenMode,
    /// Its name in `LISTEN_FDNAMES`: printable ASCII without `:`, at most
    /// 255 bytes. Empty means `listen<i>`, `i` being its position among the
    /// specs.
    pub name: String,
}

impl ListenSpec {
    /// A [`ListenMode::Shared`] listener on `addr` with the default name.
    pub fn new(addr: ListenAddr) -> Self {
        Self {
            addr,
            mode: ListenMode::Shared,
            name: String::new(),
        }
    }

    /// Sets the mode.
    pub fn mode(mut self, mode: ListenMode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets the name workers see in `LISTEN_FDNAMES` ([`Listener::name`]).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

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

/// A listening socket a worker received, inherited at start or requested
/// from the master.
///
/// The socket's open file description is shared with the master and, for
/// a [`ListenMode::Shared`] listener, with every other worker: a flag set
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
    /// ([`ListenSpec::name`]), the address for a requested one.
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

/// The default name of the `index`-th spec.
fn default_name(index: usize) -> String {
    format!("listen{index}")
}

/// Whether systemd accepts `name` in `LISTEN_FDNAMES`: 1 to 255 printable
/// ASCII characters (space included), no `:`.
fn is_valid_name(name: &str) -> bool {
    (1..=255).contains(&name.len()) && name.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b':')
}

/// Binds a TCP listener, naming the address in the error.
fn bind_tcp(addr: SocketAddr, reuse_port: bool) -> Result<OwnedFd, ListenError> {
    net::bind_tcp(addr, reuse_port, net::DEFAULT_BACKLOG).map_err(|source| ListenError::Bind {
        addr: ListenAddr::Tcp(addr),
        source,
    })
}

/// Binds a unix listener at `path`. A socket file left there by a process
/// that is gone (a connect is refused) is removed first; any other file
/// there is an `EADDRINUSE` error.
fn bind_unix(path: &Path) -> Result<OwnedFd, ListenError> {
    let bind_error = |source| ListenError::Bind {
        addr: ListenAddr::Unix(path.to_path_buf()),
        source,
    };
    match net::bind_unix(path, net::DEFAULT_BACKLOG) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse && is_stale_socket(path) => {
            std::fs::remove_file(path).map_err(bind_error)?;
            net::bind_unix(path, net::DEFAULT_BACKLOG).map_err(bind_error)
        }
        result => result.map_err(bind_error),
    }
}

/// Whether `path` is a socket file nobody listens on any more.
fn is_stale_socket(path: &Path) -> bool {
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    is_socket
        && matches!(
            std::os::unix::net::UnixStream::connect(path),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused
        )
}

/// One listener the master holds.
#[derive(Debug)]
struct Held {
    /// Its `LISTEN_FDNAMES` name.
    name: String,
    /// The address asked for; for a systemd socket, the one it is bound to
    /// (`None` if it is neither TCP/IP nor a unix path).
    addr: Option<ListenAddr>,
    mode: ListenMode,
    /// One socket for `Shared`; one per instance for `ReusePort`. Never
    /// empty.
    fds: Vec<OwnedFd>,
    /// The socket file this master created, removed at shutdown.
    created_path: Option<PathBuf>,
}

impl Held {
    /// Binds `count` sockets (1 unless `ReusePort`) on `addr`.
    fn bind(name: String, addr: &ListenAddr, mode: ListenMode, count: u32) -> Result<Self, ListenError> {
        let (fds, created_path) = match (addr, mode) {
            (ListenAddr::Unix(path), ListenMode::ReusePort) => {
                return Err(ListenError::ReusePortUnix { path: path.clone() })
            }
            (ListenAddr::Unix(path), ListenMode::Shared) => (vec![bind_unix(path)?], Some(path.clone())),
            (ListenAddr::Tcp(tcp), ListenMode::Shared) => (vec![bind_tcp(*tcp, false)?], None),
            (ListenAddr::Tcp(tcp), ListenMode::ReusePort) => {
                let first = bind_tcp(*tcp, true)?;
                // Port 0: the others join the port the kernel chose.
                let actual = net::local_addr_tcp(first.as_fd()).map_err(|source| ListenError::Bind {
                    addr: addr.clone(),
                    source,
                })?;
                let mut fds = vec![first];
                for _ in 1..count.max(1) {
                    fds.push(bind_tcp(actual, true)?);
                }
                (fds, None)
            }
        };
        Ok(Self {
            name,
            addr: Some(addr.clone()),
            mode,
            fds,
            created_path,
        })
    }

    /// The socket instance `index` gets.
    fn fd_for(&self, index: u32) -> BorrowedFd<'_> {
        let i = index as usize % self.fds.len();
        self.fds[i].as_fd()
    }

    /// Whether it is a shared socket for `addr`: the address it was asked
    /// for, or the one it is bound to (port 0 resolved).
    fn serves_shared(&self, addr: &ListenAddr) -> bool {
        self.mode == ListenMode::Shared
            && (self.addr.as_ref() == Some(addr) || self.local_addr().as_ref() == Some(addr))
    }

    /// The address its first socket is bound to, or the one asked for.
    fn local_addr(&self) -> Option<ListenAddr> {
        match net::local_addr(self.fds[0].as_fd()) {
            Ok(net::LocalAddr::Inet(addr)) => Some(ListenAddr::Tcp(addr)),
            Ok(net::LocalAddr::UnixPath(path)) => Some(ListenAddr::Unix(path)),
            _ => self.addr.clone(),
        }
    }
}

/// The listening sockets the master holds: those bound from the
/// [`ListenSpec`]s or taken from systemd, handed to every worker, and the
/// shared ones bound on a worker's request.
#[derive(Debug, Default)]
pub(crate) struct Listeners {
    /// Handed to every instance at start, in this order.
    inherited: Vec<Held>,
    /// `Shared` sockets bound on a worker's request, kept so that the next
    /// request for the same address gets the same socket. Not handed out at
    /// start: a respawned worker asks again.
    requested: Vec<Held>,
    /// For `ReusePort` requests: the address asked for and the address the
    /// first such socket got, so that later requests (port 0 included) join
    /// the same port. The master keeps no such socket itself: one it never
    /// accepts on would take its share of the connections.
    reuse_port_ports: Vec<(ListenAddr, SocketAddr)>,
}

impl Listeners {
    /// Binds every spec: one socket now for a [`ListenMode::Shared`] spec;
    /// for a [`ListenMode::ReusePort`] spec, one per instance index
    /// `0..instances`, all bound now (on the port the first got, if port 0
    /// was asked for), so that every error comes before any fork. On error,
    /// the unix socket files already created are removed.
    pub(crate) fn bind(specs: &[ListenSpec], instances: u32) -> Result<Self, ListenError> {
        let mut listeners = Self::default();
        for (i, spec) in specs.iter().enumerate() {
            let name = if spec.name.is_empty() {
                default_name(i)
            } else {
                spec.name.clone()
            };
            let held = if is_valid_name(&name) {
                Held::bind(name, &spec.addr, spec.mode, instances)
            } else {
                Err(ListenError::InvalidName { name })
            };
            match held {
                Ok(held) => listeners.inherited.push(held),
                Err(e) => {
                    listeners.remove_unix_paths();
                    return Err(e);
                }
            }
        }
        Ok(listeners)
    }

    /// The listeners systemd passed to this process by socket activation
    /// (`sd_listen_fds(3)`): if `LISTEN_PID` is this process and
    /// `LISTEN_FDS` is `n`, descriptors `3..3 + n`, named from
    /// `LISTEN_FDNAMES` (`"unknown"` without it, as systemd does). They are
    /// made close-on-exec and handed on to every worker as
    /// [`ListenMode::Shared`] sockets. `LISTEN_PID`, `LISTEN_FDS` and
    /// `LISTEN_FDNAMES` are removed from the environment (if present at
    /// all), so no child takes them by mistake.
    ///
    /// Changing the environment is only sound while no other thread reads
    /// it: call this in the master before it starts any thread.
    ///
    /// Returns `Ok(None)` when this process was not socket-activated (or
    /// with no sockets).
    ///
    /// # Errors
    /// [`ListenError::Systemd`] if the variables are malformed or a
    /// descriptor is not an open socket.
    pub(crate) fn from_systemd_env() -> Result<Option<Self>, ListenError> {
        let taken = take_listen_env()?;
        if taken.is_empty() {
            return Ok(None);
        }
        let inherited = taken
            .into_iter()
            .map(|(name, fd)| {
                let mut held = Held {
                    name,
                    addr: None,
                    mode: ListenMode::Shared,
                    fds: vec![fd],
                    created_path: None,
                };
                held.addr = held.local_addr();
                held
            })
            .collect();
        Ok(Some(Self {
            inherited,
            ..Self::default()
        }))
    }

    /// The sockets instance `index` receives at start, in order, with
    /// their names: every shared socket, and its own socket of each
    /// `ReusePort` listener (instance `index % instances` for an index
    /// past the count bound).
    pub(crate) fn for_instance(&self, index: u32) -> Vec<(BorrowedFd<'_>, &str)> {
        self.inherited
            .iter()
            .map(|held| (held.fd_for(index), held.name.as_str()))
            .collect()
    }

    /// [`for_instance`](Self::for_instance) as owned [`Listener`]s (new
    /// descriptors), for a worker forked without exec.
    ///
    /// # Errors
    /// If a descriptor cannot be duplicated.
    pub(crate) fn instance_listeners(&self, index: u32) -> io::Result<Vec<Listener>> {
        self.for_instance(index)
            .into_iter()
            .map(|(fd, name)| Ok(Listener::new(name.to_owned(), fd.try_clone_to_owned()?)))
            .collect()
    }

    /// Every descriptor held, so that a forked child can close those not
    /// given to it.
    pub(crate) fn all_fds(&self) -> Vec<RawFd> {
        self.inherited
            .iter()
            .chain(&self.requested)
            .flat_map(|held| held.fds.iter().map(AsRawFd::as_raw_fd))
            .collect()
    }

    /// The addresses the inherited listeners are bound to (port 0 resolved;
    /// for `ReusePort`, their common address), in spec order, for tests and
    /// logs. A systemd socket that is neither TCP/IP nor a unix path is left
    /// out.
    pub(crate) fn local_addrs(&self) -> Vec<ListenAddr> {
        self.inherited.iter().filter_map(Held::local_addr).collect()
    }

    /// Reads one request from a worker's control socket `sock` and answers
    /// it (see [`answer`](Self::answer)). Returns `Ok(false)` when the peer
    /// hung up (end of file, or gone before the reply).
    ///
    /// # Errors
    /// If reading or replying fails for another reason than the peer's
    /// going away.
    pub(crate) fn serve_request(&mut self, sock: BorrowedFd<'_>) -> io::Result<bool> {
        let mut buf = vec![0u8; MAX_REQUEST_LEN + 1];
        // A descriptor a worker sent along is not wanted: it closes here.
        let (len, _unwanted) = net::recv_with_fd(sock, &mut buf)?;
        if len == 0 {
            return Ok(false);
        }
        self.answer(sock, &buf[..len])
    }

    /// Answers the request `msg` (already read from `sock`, starting with
    /// [`REQUEST_TAG`]): binds the address, or for a
    /// [`ListenMode::Shared`] request reuses the socket it already holds for
    /// the same address (like Node's cluster sharing a handle), and replies
    /// with the descriptor; or replies with the error. Garbage gets an error
    /// reply, never a panic. Returns `Ok(false)` when the peer is gone.
    ///
    /// # Errors
    /// If sending the reply fails for another reason than the peer's going
    /// away.
    pub(crate) fn answer(&mut self, sock: BorrowedFd<'_>, msg: &[u8]) -> io::Result<bool> {
        let sent = match decode_request(msg) {
            Err((id, reason)) => net::send_with_fd(sock, &encode_error(id, 0, &reason), None),
            Ok(request) => match self.open(&request.addr, request.mode) {
                Ok(Opened::Held(fd)) => net::send_with_fd(sock, &encode_ok(request.id), Some(fd)),
                Ok(Opened::Fresh(fd)) => net::send_with_fd(sock, &encode_ok(request.id), Some(fd.as_fd())),
                Err(e) => {
                    let errno = match &e {
                        ListenError::Bind { source, .. } => source.raw_os_error().unwrap_or(0),
                        _ => 0,
                    };
                    net::send_with_fd(sock, &encode_error(request.id, errno, &e.to_string()), None)
                }
            },
        };
        match sent {
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// The socket to hand out for a request.
    fn open(&mut self, addr: &ListenAddr, mode: ListenMode) -> Result<Opened<'_>, ListenError> {
        match mode {
            ListenMode::Shared => {
                if let Some(i) = self.inherited.iter().position(|h| h.serves_shared(addr)) {
                    return Ok(Opened::Held(self.inherited[i].fds[0].as_fd()));
                }
                if let Some(i) = self.requested.iter().position(|h| h.serves_shared(addr)) {
                    return Ok(Opened::Held(self.requested[i].fds[0].as_fd()));
                }
                let held = Held::bind(addr.to_string(), addr, mode, 1)?;
                self.requested.push(held);
                let last = self.requested.len() - 1;
                Ok(Opened::Held(self.requested[last].fds[0].as_fd()))
            }
            ListenMode::ReusePort => {
                let tcp = match addr {
                    ListenAddr::Tcp(tcp) => *tcp,
                    ListenAddr::Unix(path) => return Err(ListenError::ReusePortUnix { path: path.clone() }),
                };
                // Join the port of a spec'd or earlier requested group.
                let known = self
                    .inherited
                    .iter()
                    .filter(|h| h.mode == ListenMode::ReusePort && h.addr.as_ref() == Some(addr))
                    .find_map(|h| net::local_addr_tcp(h.fds[0].as_fd()).ok())
                    .or_else(|| {
                        self.reuse_port_ports
                            .iter()
                            .find(|(asked, _)| asked == addr)
                            .map(|(_, actual)| *actual)
                    });
                let fd = bind_tcp(known.unwrap_or(tcp), true)?;
                if known.is_none() {
                    if let Ok(actual) = net::local_addr_tcp(fd.as_fd()) {
                        self.reuse_port_ports.push((addr.clone(), actual));
                    }
                }
                Ok(Opened::Fresh(fd))
            }
        }
    }

    /// Removes the unix socket files this master created (at shutdown).
    /// A path that is no longer a socket file is left alone.
    pub(crate) fn remove_unix_paths(&self) {
        for path in self
            .inherited
            .iter()
            .chain(&self.requested)
            .filter_map(|h| h.created_path.as_ref())
        {
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// A socket to send in a reply.
enum Opened<'a> {
    /// One the master keeps (shared).
    Held(BorrowedFd<'a>),
    /// One made for this request alone (`ReusePort`), closed after sending.
    Fresh(OwnedFd),
}

/// In a forked child before exec (single-threaded, or only
/// async-signal-safe calls plus allocation): places `fds` at descriptors
/// 3, 4, ... in order, without `FD_CLOEXEC`, and returns the environment
/// entries that announce them, `LISTEN_FDS`, `LISTEN_PID` (this process)
/// and `LISTEN_FDNAMES` (the names joined by `:`), none if `fds` is empty;
/// and the first descriptor number after them (`3 + fds.len()`), where the
/// caller can place further descriptors.
///
/// Whatever the child had at `3..3 + fds.len()` is closed: a descriptor
/// the caller still needs there must be moved first. The sources may be
/// anywhere, that range included: each is first copied above it.
///
/// # Errors
/// If a name contains `:`, or `fcntl`/`dup2` fails (a bad source, or out
/// of descriptors).
pub(crate) fn place_listen_fds(fds: &[(RawFd, &str)]) -> io::Result<(Vec<(String, String)>, RawFd)> {
    let count = RawFd::try_from(fds.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let next = net::LISTEN_FDS_START
        .checked_add(count)
        .ok_or(io::ErrorKind::InvalidInput)?;
    if fds.iter().any(|(_, name)| name.contains(':')) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a LISTEN_FDNAMES name contains ':'",
        ));
    }
    // First copy every source above the target range, so that placing one
    // never overwrites another still to be placed; then move them into
    // place (dup2's copy does not inherit FD_CLOEXEC; the copies above do
    // have it, and are closed).
    let mut copies = Vec::with_capacity(fds.len());
    for (src, _) in fds {
        copies.push(sys::fd::dup_above(*src, next)?);
    }
    for (target, copy) in (net::LISTEN_FDS_START..).zip(&copies) {
        sys::fd::dup2(*copy, target)?;
    }
    for copy in copies {
        sys::fd::close_raw(copy)?;
    }
    if fds.is_empty() {
        return Ok((Vec::new(), next));
    }
    let names: Vec<&str> = fds.iter().map(|(_, name)| *name).collect();
    let env = vec![
        ("LISTEN_FDS".to_owned(), count.to_string()),
        ("LISTEN_PID".to_owned(), sys::getpid().to_string()),
        ("LISTEN_FDNAMES".to_owned(), names.join(":")),
    ];
    Ok((env, next))
}

/// The listeners handed to this process with `LISTEN_PID`, `LISTEN_FDS`
/// and `LISTEN_FDNAMES` (by the master, or by systemd), if `LISTEN_PID` is
/// this process. They are taken once: the three variables are removed from
/// the environment (if present), and a second call finds none. Each is made
/// close-on-exec, so a process this worker starts does not inherit it.
/// Empty when there are none.
///
/// Changing the environment is only sound while no other thread reads it:
/// call this early in `main`, before starting threads.
///
/// # Errors
/// [`ListenError::Systemd`] if the variables are malformed, a descriptor
/// they name is not an open socket, or they were already taken in this
/// process.
pub fn inherited_listeners() -> Result<Vec<Listener>, ListenError> {
    Ok(take_listen_env()?
        .into_iter()
        .map(|(name, fd)| Listener::new(name, fd))
        .collect())
}

/// More `LISTEN_FDS` than this is garbage: Linux's own ceiling on open
/// descriptors per process (`fs.nr_open`) defaults to 2^20.
const MAX_LISTEN_FDS: usize = 1 << 20;

/// Reads and removes `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`;
/// takes the descriptors if they are meant for this process, makes them
/// close-on-exec and checks that they are sockets.
fn take_listen_env() -> Result<Vec<(String, OwnedFd)>, ListenError> {
    const VARS: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];
    let [pid, count, names] = VARS.map(std::env::var_os);
    for (var, value) in VARS.iter().zip([&pid, &count, &names]) {
        if value.is_some() {
            std::env::remove_var(var);
        }
    }
    let systemd_error = |reason: String| ListenError::Systemd { reason };
    let Some(pid) = pid else {
        return Ok(Vec::new());
    };
    let pid: u32 = pid
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| systemd_error(format!("LISTEN_PID={pid:?} is not a process id")))?;
    if pid != sys::getpid() {
        return Ok(Vec::new());
    }
    let count = count.ok_or_else(|| systemd_error("LISTEN_PID without LISTEN_FDS".to_owned()))?;
    let count: usize = count
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| systemd_error(format!("LISTEN_FDS={count:?} is not a count")))?;
    if count == 0 {
        return Ok(Vec::new());
    }
    if count > MAX_LISTEN_FDS {
        return Err(systemd_error(format!(
            "LISTEN_FDS={count} is more than a process can hold"
        )));
    }
    let names: Option<Vec<String>> = match names {
        None => None,
        Some(names) => {
            let names = String::from_utf8(names.into_vec())
                .map_err(|_| systemd_error("LISTEN_FDNAMES is not UTF-8".to_owned()))?;
            let names: Vec<String> = names
                .split(':')
                .map(|n| if n.is_empty() { "unknown" } else { n }.to_owned())
                .collect();
            if names.len() != count {
                return Err(systemd_error(format!(
                    "LISTEN_FDNAMES has {} names for LISTEN_FDS={count}",
                    names.len()
                )));
            }
            Some(names)
        }
    };
    let fds = net::adopt_listen_fds(count).map_err(|e| {
        systemd_error(format!(
            "cannot take descriptors {}..{}: {e}",
            net::LISTEN_FDS_START,
            net::LISTEN_FDS_START as usize + count
        ))
    })?;
    // Without LISTEN_FDNAMES, every name is "unknown" (as systemd has it).
    let names = names.unwrap_or_else(|| vec!["unknown".to_owned(); fds.len()]);
    for (i, (name, fd)) in names.iter().zip(&fds).enumerate() {
        let raw = net::LISTEN_FDS_START as usize + i;
        let is_socket = sys::fd::set_cloexec(fd.as_fd(), true).and_then(|()| net::is_socket(fd.as_fd()));
        match is_socket {
            Ok(true) => {}
            Ok(false) => {
                return Err(systemd_error(format!(
                    "descriptor {raw} ({name}) is not a socket"
                )))
            }
            Err(e) => return Err(systemd_error(format!("descriptor {raw} ({name}): {e}"))),
        }
    }
    Ok(names.into_iter().zip(fds).collect())
}

// The run-time request protocol, one `SOCK_SEQPACKET` message each way:
//
//   request  = 'L' id:u32le mode kind addr
//              mode = 'S' (Shared) | 'R' (ReusePort)
//              kind = 'T' addr = a socket address in text ("1.2.3.4:80",
//                              "[::1]:80"), never a host name: the master
//                              does not resolve names
//                   | 'U' addr = the path's bytes (not empty, no NUL)
//   reply    = 'O' id:u32le              with the descriptor (SCM_RIGHTS)
//            | 'E' id:u32le errno:i32le text (UTF-8; errno 0: not a bind
//                                             error)
//
// The id lets a worker drop a late reply to a request it gave up on.
// A request the master cannot read gets an 'E' reply with id 0, which no
// request uses.

/// The first byte of a listener request on a worker's control socket.
pub(crate) const REQUEST_TAG: u8 = b'L';

/// The longest request: header, and a path of up to `PATH_MAX` bytes.
pub(crate) const MAX_REQUEST_LEN: usize = 7 + 4096;

/// The longest reply (error text is cut to fit).
const MAX_REPLY_LEN: usize = 9 + 1024;

/// Request ids, never 0.
static NEXT_REQUEST_ID: AtomicU32 = AtomicU32::new(1);

/// A decoded request.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    id: u32,
    mode: ListenMode,
    addr: ListenAddr,
}

fn encode_request(id: u32, addr: &ListenAddr, mode: ListenMode) -> Vec<u8> {
    let mut msg = vec![REQUEST_TAG];
    msg.extend_from_slice(&id.to_le_bytes());
    msg.push(match mode {
        ListenMode::Shared => b'S',
        ListenMode::ReusePort => b'R',
    });
    match addr {
        ListenAddr::Tcp(tcp) => {
            msg.push(b'T');
            msg.extend_from_slice(tcp.to_string().as_bytes());
        }
        ListenAddr::Unix(path) => {
            msg.push(b'U');
            msg.extend_from_slice(path.as_os_str().as_bytes());
        }
    }
    msg
}

/// Decodes a request, or gives the id to reply to (0 if unreadable) and
/// what is wrong with it.
fn decode_request(msg: &[u8]) -> Result<Request, (u32, String)> {
    let [tag, i0, i1, i2, i3, mode, kind, addr @ ..] = msg else {
        return Err((0, format!("request too short ({} bytes)", msg.len())));
    };
    if *tag != REQUEST_TAG {
        return Err((0, format!("unknown request type {tag:#04x}")));
    }
    let id = u32::from_le_bytes([*i0, *i1, *i2, *i3]);
    let bad = |reason: String| Err((id, reason));
    if msg.len() > MAX_REQUEST_LEN {
        return bad(format!("request too long (over {MAX_REQUEST_LEN} bytes)"));
    }
    let mode = match mode {
        b'S' => ListenMode::Shared,
        b'R' => ListenMode::ReusePort,
        other => return bad(format!("unknown listen mode {other:#04x}")),
    };
    let addr = match kind {
        b'T' => match std::str::from_utf8(addr).ok().and_then(|s| s.parse().ok()) {
            Some(tcp) => ListenAddr::Tcp(tcp),
            None => return bad("malformed TCP address".to_owned()),
        },
        b'U' if addr.is_empty() || addr.contains(&0) => return bad("malformed unix path".to_owned()),
        b'U' => ListenAddr::Unix(PathBuf::from(std::ffi::OsStr::from_bytes(addr))),
        other => return bad(format!("unknown address kind {other:#04x}")),
    };
    Ok(Request { id, mode, addr })
}

fn encode_ok(id: u32) -> Vec<u8> {
    let mut msg = vec![b'O'];
    msg.extend_from_slice(&id.to_le_bytes());
    msg
}

fn encode_error(id: u32, errno: i32, text: &str) -> Vec<u8> {
    let mut msg = vec![b'E'];
    msg.extend_from_slice(&id.to_le_bytes());
    msg.extend_from_slice(&errno.to_le_bytes());
    let mut end = text.len().min(MAX_REPLY_LEN - msg.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    msg.extend_from_slice(&text.as_bytes()[..end]);
    msg
}

/// A decoded reply: its id, and `Ok` or the errno and text.
type Reply = (u32, Result<(), (i32, String)>);

fn decode_reply(msg: &[u8]) -> Option<Reply> {
    match msg {
        [b'O', i0, i1, i2, i3] => Some((u32::from_le_bytes([*i0, *i1, *i2, *i3]), Ok(()))),
        [b'E', i0, i1, i2, i3, e0, e1, e2, e3, text @ ..] => Some((
            u32::from_le_bytes([*i0, *i1, *i2, *i3]),
            Err((
                i32::from_le_bytes([*e0, *e1, *e2, *e3]),
                String::from_utf8_lossy(text).into_owned(),
            )),
        )),
        _ => None,
    }
}

/// The worker's side of a run-time request: asks the master, over the
/// worker's control socket `sock`, for a listener on `addr` and waits up to
/// `timeout` for the reply carrying it. The caller must be the only reader
/// of `sock` meanwhile. A late reply to an earlier request that timed out
/// is recognised by its id and dropped.
///
/// # Errors
/// [`ListenError::ReusePortUnix`] at once for `ReusePort` on a unix path;
/// [`ListenError::Bind`] if the master could not bind the address;
/// [`ListenError::Request`] on a timeout, a closed control socket, a
/// malformed reply or another refusal; [`ListenError::Io`] if the socket
/// fails.
pub(crate) fn request_listener(
    sock: BorrowedFd<'_>,
    addr: &ListenAddr,
    mode: ListenMode,
    timeout: Duration,
) -> Result<Listener, ListenError> {
    if let (ListenAddr::Unix(path), ListenMode::ReusePort) = (addr, mode) {
        return Err(ListenError::ReusePortUnix { path: path.clone() });
    }
    let id = loop {
        let id = NEXT_REQUEST_ID.fetch_add(1, Ordering::Relaxed);
        if id != 0 {
            break id;
        }
    };
    let msg = encode_request(id, addr, mode);
    if msg.len() > MAX_REQUEST_LEN {
        return Err(ListenError::Request {
            reason: format!("address too long: {addr}"),
        });
    }
    net::send_with_fd(sock, &msg, None)?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; MAX_REPLY_LEN + 1];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if !sys::fd::poll_readable(&[sock], Some(left))?[0] {
            return Err(ListenError::Request {
                reason: format!("no reply for {addr} within {timeout:?}"),
            });
        }
        let (len, fd) = net::recv_with_fd(sock, &mut buf)?;
        if len == 0 && fd.is_none() {
            return Err(ListenError::Request {
                reason: "the master closed the control socket".to_owned(),
            });
        }
        match decode_reply(&buf[..len.min(MAX_REPLY_LEN)]) {
            // A late reply to an earlier request: its descriptor closes.
            Some((reply_id, _)) if reply_id != id => continue,
            Some((_, Ok(()))) => {
                return fd
                    .map(|fd| Listener::new(addr.to_string(), fd))
                    .ok_or_else(|| ListenError::Request {
                        reason: "the reply carried no descriptor".to_owned(),
                    })
            }
            Some((_, Err((errno, _)))) if errno != 0 => {
                return Err(ListenError::Bind {
                    addr: addr.clone(),
                    source: io::Error::from_raw_os_error(errno),
                })
            }
            Some((_, Err((_, text)))) => return Err(ListenError::Request { reason: text }),
            None => {
                return Err(ListenError::Request {
                    reason: "malformed reply".to_owned(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::testing::{fork, ExitStatus, Watchdog};

    fn tcp(s: &str) -> ListenAddr {
        ListenAddr::Tcp(s.parse().unwrap())
    }

    /// The socket's inode: equal for two descriptors of the same socket.
    fn inode(fd: BorrowedFd<'_>) -> u64 {
        std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap()
            .ino()
    }

    fn port(fd: BorrowedFd<'_>) -> u16 {
        net::local_addr_tcp(fd).unwrap().port()
    }

    /// A path for a unix socket that no other test uses.
    fn socket_path(what: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("shmcluster-{what}-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    /// Runs `f` in a forked child under a watchdog; asserts it exits 0 (a
    /// failing step returns its own nonzero code).
    fn in_child(name: &str, f: impl FnOnce() -> i32) {
        let dog = Watchdog::new(name, Duration::from_secs(20));
        let child = dog.track(fork(f).unwrap());
        assert_eq!(
            child.wait_timeout(Duration::from_secs(10)).unwrap(),
            Some(ExitStatus::Code(0)),
            "child step failed (its exit code names the step)"
        );
    }

    #[test]
    fn parses_addresses() {
        assert_eq!(
            "127.0.0.1:8080".parse::<ListenAddr>().unwrap(),
            tcp("127.0.0.1:8080")
        );
        assert_eq!(":8080".parse::<ListenAddr>().unwrap(), tcp("0.0.0.0:8080"));
        assert_eq!("[::1]:9".parse::<ListenAddr>().unwrap(), tcp("[::1]:9"));
        assert_eq!(
            "unix:/run/a.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/run/a.sock".into())
        );
        assert_eq!(
            "unix:rel.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("rel.sock".into())
        );
        assert_eq!(
            "/run/b.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/run/b.sock".into())
        );
        assert_eq!(
            "./c.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("./c.sock".into())
        );
        match "localhost:80".parse::<ListenAddr>().unwrap() {
            ListenAddr::Tcp(addr) => assert!(addr.ip().is_loopback() && addr.port() == 80),
            other => panic!("{other:?}"),
        }
        for bad in ["nonsense", "1.2.3.4", "1.2.3.4:99999", "unix:", ""] {
            match bad.parse::<ListenAddr>() {
                Err(ListenError::Resolve { addr, .. }) => assert_eq!(addr, bad),
                other => panic!("{bad:?} parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn display_parses_back() {
        for text in ["0.0.0.0:80", "[::1]:9", "unix:/run/a.sock"] {
            let addr: ListenAddr = text.parse().unwrap();
            assert_eq!(addr.to_string(), text);
            assert_eq!(addr.to_string().parse::<ListenAddr>().unwrap(), addr);
        }
    }

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

    #[test]
    fn shared_tcp_is_one_socket_for_every_instance_and_accepts() {
        let spec = ListenSpec::new(tcp("127.0.0.1:0"));
        let listeners = Listeners::bind(&[spec], 3).unwrap();
        let fds: Vec<RawFd> = (0..3)
            .map(|i| {
                let got = listeners.for_instance(i);
                assert_eq!(got.len(), 1);
                assert_eq!(got[0].1, "listen0", "default name");
                got[0].0.as_raw_fd()
            })
            .collect();
        assert!(fds.iter().all(|fd| *fd == fds[0]), "{fds:?}");
        assert_eq!(listeners.all_fds(), vec![fds[0]]);
        let [ListenAddr::Tcp(addr)] = listeners.local_addrs()[..] else {
            panic!("{:?}", listeners.local_addrs())
        };
        assert_ne!(addr.port(), 0, "port 0 resolved");

        let mut taken = listeners.instance_listeners(1).unwrap();
        let listener = taken.pop().unwrap();
        assert_eq!(listener.name(), "listen0");
        assert!(listener.is_tcp() && !listener.is_unix());
        assert_eq!(listener.local_addr().unwrap(), ListenAddr::Tcp(addr));
        let tcp = listener.into_tcp();
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        let (mut server, _) = tcp.accept().unwrap();
        client.write_all(b"hello").unwrap();
        let mut got = [0u8; 5];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
    }

    #[test]
    fn reuse_port_gives_each_instance_its_own_socket_on_one_port() {
        let spec = ListenSpec::new(tcp("127.0.0.1:0"))
            .mode(ListenMode::ReusePort)
            .name("web");
        let listeners = Listeners::bind(&[spec], 2).unwrap();
        let (a, b) = (listeners.for_instance(0), listeners.for_instance(1));
        assert_eq!((a[0].1, b[0].1), ("web", "web"));
        assert_ne!(inode(a[0].0), inode(b[0].0), "distinct sockets");
        assert_eq!(port(a[0].0), port(b[0].0), "one port");
        assert_eq!(listeners.all_fds().len(), 2);
        assert_eq!(
            inode(listeners.for_instance(2)[0].0),
            inode(a[0].0),
            "an index past the count wraps"
        );
        let addr = net::local_addr_tcp(a[0].0).unwrap();
        assert_eq!(listeners.local_addrs(), vec![ListenAddr::Tcp(addr)]);

        let accept_from = |i| {
            let tcp = listeners.instance_listeners(i).unwrap().pop().unwrap().into_tcp();
            tcp.set_nonblocking(true).unwrap();
            tcp
        };
        let sockets = [accept_from(0), accept_from(1)];
        const CONNECTS: usize = 64;
        // Each connection comes from its own source port; the kernel
        // hashes that to one socket of the group.
        let clients: Vec<_> = (0..CONNECTS)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let mut accepted = [0usize; 2];
        let deadline = Instant::now() + Duration::from_secs(5);
        while accepted.iter().sum::<usize>() < CONNECTS && Instant::now() < deadline {
            for (i, socket) in sockets.iter().enumerate() {
                while socket.accept().is_ok() {
                    accepted[i] += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(clients);
        assert_eq!(accepted.iter().sum::<usize>(), CONNECTS, "{accepted:?}");
        assert!(
            accepted[0] > 0 && accepted[1] > 0,
            "both sockets accept: {accepted:?}"
        );
    }

    #[test]
    fn unix_listener_binds_accepts_and_is_removed_at_shutdown() {
        let path = socket_path("bind");
        let spec = ListenSpec::new(ListenAddr::Unix(path.clone()));
        let listeners = Listeners::bind(&[spec], 2).unwrap();
        assert_eq!(listeners.local_addrs(), vec![ListenAddr::Unix(path.clone())]);
        let listener = listeners.instance_listeners(0).unwrap().pop().unwrap();
        assert!(listener.is_unix() && !listener.is_tcp());
        let unix = listener.into_unix();
        let mut client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let (mut server, _) = unix.accept().unwrap();
        client.write_all(b"hi").unwrap();
        let mut got = [0u8; 2];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        assert!(path.exists());
        listeners.remove_unix_paths();
        assert!(!path.exists());
    }

    #[test]
    fn a_stale_socket_file_is_replaced_but_another_file_is_not() {
        let path = socket_path("stale");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "the closed listener left its file");
        let listeners = Listeners::bind(&[ListenSpec::new(ListenAddr::Unix(path.clone()))], 1).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        // A live listener's file is not stale.
        match Listeners::bind(&[ListenSpec::new(ListenAddr::Unix(path.clone()))], 1) {
            Err(ListenError::Bind { source, .. }) => assert_eq!(source.kind(), io::ErrorKind::AddrInUse),
            other => panic!("{other:?}"),
        }
        listeners.remove_unix_paths();

        std::fs::write(&path, b"data").unwrap();
        match Listeners::bind(&[ListenSpec::new(ListenAddr::Unix(path.clone()))], 1) {
            Err(ListenError::Bind { addr, source }) => {
                assert_eq!(addr, ListenAddr::Unix(path.clone()));
                assert_eq!(source.kind(), io::ErrorKind::AddrInUse);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"data", "left alone");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn reuse_port_on_a_unix_path_is_an_error() {
        let path = socket_path("reuse");
        let spec = ListenSpec::new(ListenAddr::Unix(path.clone())).mode(ListenMode::ReusePort);
        match Listeners::bind(&[spec], 2) {
            Err(ListenError::ReusePortUnix { path: p }) => assert_eq!(p, path),
            other => panic!("{other:?}"),
        }
        assert!(!path.exists());
    }

    #[test]
    fn an_unbindable_address_is_a_bind_error_naming_it() {
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy_addr = ListenAddr::Tcp(busy.local_addr().unwrap());
        match Listeners::bind(&[ListenSpec::new(busy_addr.clone())], 1) {
            Err(ListenError::Bind { addr, source }) => {
                assert_eq!(addr, busy_addr);
                assert_eq!(source.kind(), io::ErrorKind::AddrInUse);
            }
            other => panic!("{other:?}"),
        }
        // TEST-NET-1: not an address of this host.
        let foreign = tcp("192.0.2.1:80");
        match Listeners::bind(&[ListenSpec::new(foreign.clone())], 1) {
            Err(e @ ListenError::Bind { .. }) => assert!(e.to_string().contains("192.0.2.1:80"), "{e}"),
            other => panic!("{other:?}"),
        }
        // A failure after a unix socket was made removes its file.
        let path = socket_path("partial");
        let specs = [
            ListenSpec::new(ListenAddr::Unix(path.clone())),
            ListenSpec::new(busy_addr),
        ];
        assert!(matches!(
            Listeners::bind(&specs, 1),
            Err(ListenError::Bind { .. })
        ));
        assert!(!path.exists());
    }

    #[test]
    fn names_default_by_position_and_invalid_ones_are_refused() {
        let specs = [
            ListenSpec::new(tcp("127.0.0.1:0")),
            ListenSpec::new(tcp("127.0.0.1:0")).name("admin"),
            ListenSpec::new(tcp("127.0.0.1:0")),
        ];
        let listeners = Listeners::bind(&specs, 1).unwrap();
        let names: Vec<&str> = listeners.for_instance(0).into_iter().map(|(_, n)| n).collect();
        assert_eq!(names, ["listen0", "admin", "listen2"]);
        for bad in ["a:b", "tab\t", &"x".repeat(256), "é"] {
            match Listeners::bind(&[ListenSpec::new(tcp("127.0.0.1:0")).name(bad)], 1) {
                Err(ListenError::InvalidName { name }) => assert_eq!(name, bad),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    /// Serves requests on one end of a socket pair in a thread until the
    /// worker end closes; returns the worker end and the server thread.
    fn serve(mut listeners: Listeners) -> (OwnedFd, std::thread::JoinHandle<(Listeners, io::Result<usize>)>) {
        let (master, worker) = net::seqpacket_pair().unwrap();
        let thread = std::thread::spawn(move || {
            let mut served = 0;
            loop {
                match listeners.serve_request(master.as_fd()) {
                    Ok(true) => served += 1,
                    Ok(false) => return (listeners, Ok(served)),
                    Err(e) => return (listeners, Err(e)),
                }
            }
        });
        (worker, thread)
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn shared_requests_for_one_address_get_one_socket() {
        let (worker, server) = serve(Listeners::default());
        let addr = tcp("127.0.0.1:0");
        let a = request_listener(worker.as_fd(), &addr, ListenMode::Shared, T).unwrap();
        let b = request_listener(worker.as_fd(), &addr, ListenMode::Shared, T).unwrap();
        assert_eq!(inode(a.as_fd()), inode(b.as_fd()), "the same socket");
        assert_eq!(a.name(), "127.0.0.1:0");
        // Asking for the port it got is asking for the same socket.
        let actual = a.local_addr().unwrap();
        let c = request_listener(worker.as_fd(), &actual, ListenMode::Shared, T).unwrap();
        assert_eq!(inode(c.as_fd()), inode(a.as_fd()));
        assert!(is_cloexec(&c));

        let ListenAddr::Tcp(actual) = actual else { panic!() };
        let mut client = std::net::TcpStream::connect(actual).unwrap();
        let (mut conn, _) = a.into_tcp().accept().unwrap();
        client.write_all(b"x").unwrap();
        let mut got = [0u8; 1];
        conn.read_exact(&mut got).unwrap();

        drop(worker);
        let (listeners, served) = server.join().unwrap();
        assert_eq!(served.unwrap(), 3);
        assert_eq!(listeners.all_fds().len(), 1, "the master keeps the shared socket");
        assert!(
            listeners.for_instance(0).is_empty(),
            "requested sockets are not inherited"
        );
    }

    fn is_cloexec(listener: &Listener) -> bool {
        sys::fd::is_cloexec(listener.as_fd()).unwrap()
    }

    #[test]
    fn a_shared_request_for_a_spec_address_gets_the_inherited_socket() {
        let spec = ListenSpec::new(tcp("127.0.0.1:0"));
        let listeners = Listeners::bind(&[spec], 1).unwrap();
        let inherited = inode(listeners.for_instance(0)[0].0);
        let (worker, server) = serve(listeners);
        let got = request_listener(worker.as_fd(), &tcp("127.0.0.1:0"), ListenMode::Shared, T).unwrap();
        assert_eq!(inode(got.as_fd()), inherited);
        drop(worker);
        server.join().unwrap().1.unwrap();
    }

    #[test]
    fn reuse_port_requests_get_new_sockets_on_one_port() {
        let spec = ListenSpec::new(tcp("127.0.0.1:0")).mode(ListenMode::ReusePort);
        let listeners = Listeners::bind(&[spec], 1).unwrap();
        let group_port = port(listeners.for_instance(0)[0].0);
        let (worker, server) = serve(listeners);
        let mode = ListenMode::ReusePort;
        let a = request_listener(worker.as_fd(), &tcp("127.0.0.1:0"), mode, T).unwrap();
        let b = request_listener(worker.as_fd(), &tcp("127.0.0.1:0"), mode, T).unwrap();
        assert_ne!(inode(a.as_fd()), inode(b.as_fd()));
        assert_eq!(
            (port(a.as_fd()), port(b.as_fd())),
            (group_port, group_port),
            "joined the spec's port"
        );
        // A new address: the first request picks the port, the next joins it.
        let c = request_listener(worker.as_fd(), &tcp("127.0.0.2:0"), mode, T).unwrap();
        let d = request_listener(worker.as_fd(), &tcp("127.0.0.2:0"), mode, T).unwrap();
        assert_ne!(inode(c.as_fd()), inode(d.as_fd()));
        assert_eq!(port(c.as_fd()), port(d.as_fd()));
        drop(worker);
        let (listeners, served) = server.join().unwrap();
        assert_eq!(served.unwrap(), 4);
        assert_eq!(
            listeners.all_fds().len(),
            1,
            "the master keeps no requested ReusePort socket"
        );
    }

    #[test]
    fn failed_requests_come_back_as_errors() {
        let (worker, server) = serve(Listeners::default());
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy_addr = ListenAddr::Tcp(busy.local_addr().unwrap());
        match request_listener(worker.as_fd(), &busy_addr, ListenMode::Shared, T) {
            Err(ListenError::Bind { addr, source }) => {
                assert_eq!(addr, busy_addr);
                assert_eq!(source.kind(), io::ErrorKind::AddrInUse);
            }
            other => panic!("{other:?}"),
        }
        let path = socket_path("req-reuse");
        match request_listener(
            worker.as_fd(),
            &ListenAddr::Unix(path.clone()),
            ListenMode::ReusePort,
            T,
        ) {
            Err(ListenError::ReusePortUnix { path: p }) => assert_eq!(p, path),
            other => panic!("{other:?}"),
        }
        drop(worker);
        assert_eq!(
            server.join().unwrap().1.unwrap(),
            1,
            "the unix ReusePort request never left"
        );
    }

    #[test]
    fn unix_requests_are_shared_and_removed_at_shutdown() {
        let (worker, server) = serve(Listeners::default());
        let path = socket_path("req");
        let addr = ListenAddr::Unix(path.clone());
        let a = request_listener(worker.as_fd(), &addr, ListenMode::Shared, T).unwrap();
        let b = request_listener(worker.as_fd(), &addr, ListenMode::Shared, T).unwrap();
        assert_eq!(inode(a.as_fd()), inode(b.as_fd()));
        assert!(a.is_unix());
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        drop(worker);
        let (listeners, _) = server.join().unwrap();
        assert!(path.exists());
        listeners.remove_unix_paths();
        assert!(!path.exists());
    }

    #[test]
    fn garbage_requests_get_error_replies() {
        let (worker, server) = serve(Listeners::default());
        let mut valid = encode_request(7, &tcp("127.0.0.1:0"), ListenMode::Shared);
        let mut bad_mode = valid.clone();
        bad_mode[5] = b'?';
        let mut bad_kind = valid.clone();
        bad_kind[6] = b'?';
        let mut bad_addr = valid.clone();
        bad_addr.truncate(7);
        bad_addr.extend_from_slice(b"not an address");
        let mut long = valid.clone();
        long.resize(MAX_REQUEST_LEN + 1, b'1');
        let mut nul_path = encode_request(9, &ListenAddr::Unix("/tmp/x".into()), ListenMode::Shared);
        nul_path.push(0);
        let cases: [(&[u8], u32); 9] = [
            (b"x", 0),
            (b"L", 0),
            (b"Xjunkjunkjunk", 0),
            (&bad_mode, 7),
            (&bad_kind, 7),
            (&bad_addr, 7),
            (&long, 7),
            (&nul_path, 9),
            (&[b'L', 1, 0, 0, 0, b'S', b'U'], 1),
        ];
        let mut buf = [0u8; MAX_REPLY_LEN + 1];
        for (request, id) in cases {
            net::send_with_fd(worker.as_fd(), request, None).unwrap();
            let (len, fd) = net::recv_with_fd(worker.as_fd(), &mut buf).unwrap();
            assert!(fd.is_none());
            match decode_reply(&buf[..len]) {
                Some((got, Err((0, text)))) => {
                    assert_eq!(got, id, "{text}");
                    assert!(!text.is_empty());
                }
                other => panic!("{request:?}: {other:?}"),
            }
        }
        // The server is still up, and a descriptor sent along is refused.
        valid[1] = 8;
        let (x, _y) = net::seqpacket_pair().unwrap();
        net::send_with_fd(worker.as_fd(), &valid, Some(x.as_fd())).unwrap();
        let (len, fd) = net::recv_with_fd(worker.as_fd(), &mut buf).unwrap();
        assert_eq!(decode_reply(&buf[..len]), Some((8, Ok(()))));
        assert!(fd.is_some_and(|fd| net::local_addr_tcp(fd.as_fd()).is_ok()));
        drop(worker);
        assert_eq!(server.join().unwrap().1.unwrap(), 10);
    }

    #[test]
    fn a_request_times_out_and_a_late_reply_is_dropped() {
        let (master, worker) = net::seqpacket_pair().unwrap();
        let addr = tcp("127.0.0.1:0");
        let start = Instant::now();
        match request_listener(
            worker.as_fd(),
            &addr,
            ListenMode::Shared,
            Duration::from_millis(30),
        ) {
            Err(ListenError::Request { reason }) => assert!(reason.contains("no reply"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert!(start.elapsed() >= Duration::from_millis(30));

        let stale = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fresh = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let replier = std::thread::spawn(move || {
            let mut buf = [0u8; MAX_REQUEST_LEN + 1];
            // The first (timed-out) request, then the second.
            let (len, _) = net::recv_with_fd(master.as_fd(), &mut buf).unwrap();
            let first = decode_request(&buf[..len]).unwrap();
            let (len, _) = net::recv_with_fd(master.as_fd(), &mut buf).unwrap();
            let second = decode_request(&buf[..len]).unwrap();
            assert_ne!(first.id, second.id);
            net::send_with_fd(master.as_fd(), &encode_ok(first.id), Some(stale.as_fd())).unwrap();
            net::send_with_fd(master.as_fd(), &encode_ok(second.id), Some(fresh.as_fd())).unwrap();
            fresh.local_addr().unwrap()
        });
        let got = request_listener(worker.as_fd(), &addr, ListenMode::Shared, T).unwrap();
        let fresh_addr = replier.join().unwrap();
        assert_eq!(got.local_addr().unwrap(), ListenAddr::Tcp(fresh_addr));
    }

    #[test]
    fn a_request_to_a_gone_master_fails() {
        let (master, worker) = net::seqpacket_pair().unwrap();
        let replier = std::thread::spawn(move || {
            let mut buf = [0u8; MAX_REQUEST_LEN + 1];
            net::recv_with_fd(master.as_fd(), &mut buf).unwrap();
            // An OK without a descriptor, then hang up.
            net::send_with_fd(master.as_fd(), &encode_ok(u32::MAX), None).unwrap();
        });
        let addr = tcp("127.0.0.1:0");
        match request_listener(worker.as_fd(), &addr, ListenMode::Shared, T) {
            Err(ListenError::Request { reason }) => assert!(reason.contains("closed"), "{reason}"),
            other => panic!("{other:?}"),
        }
        replier.join().unwrap();
        assert!(matches!(
            request_listener(worker.as_fd(), &addr, ListenMode::Shared, T),
            Err(ListenError::Io(_))
        ));
    }

    #[test]
    fn a_reply_without_a_descriptor_is_an_error() {
        let (master, worker) = net::seqpacket_pair().unwrap();
        let replier = std::thread::spawn(move || {
            let mut buf = [0u8; MAX_REQUEST_LEN + 1];
            let (len, _) = net::recv_with_fd(master.as_fd(), &mut buf).unwrap();
            let id = decode_request(&buf[..len]).unwrap().id;
            net::send_with_fd(master.as_fd(), &encode_ok(id), None).unwrap();
            net::recv_with_fd(master.as_fd(), &mut buf).unwrap();
            net::send_with_fd(master.as_fd(), b"?", None).unwrap();
            master
        });
        let addr = tcp("127.0.0.1:0");
        match request_listener(worker.as_fd(), &addr, ListenMode::Shared, T) {
            Err(ListenError::Request { reason }) => assert!(reason.contains("no descriptor"), "{reason}"),
            other => panic!("{other:?}"),
        }
        match request_listener(worker.as_fd(), &addr, ListenMode::Shared, T) {
            Err(ListenError::Request { reason }) => assert!(reason.contains("malformed"), "{reason}"),
            other => panic!("{other:?}"),
        }
        drop(replier.join().unwrap());
    }

    /// Clears the `LISTEN_*` variables (in a child: the test runner's
    /// environment might carry some).
    fn clear_listen_env() {
        for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(var);
        }
    }

    fn listen_env_is_gone() -> bool {
        ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"]
            .iter()
            .all(|var| std::env::var_os(var).is_none())
    }

    /// Sets `LISTEN_PID` to `pid` and the other two as given.
    fn set_listen_env(pid: u32, count: &str, names: Option<&str>) {
        clear_listen_env();
        std::env::set_var("LISTEN_PID", pid.to_string());
        std::env::set_var("LISTEN_FDS", count);
        if let Some(names) = names {
            std::env::set_var("LISTEN_FDNAMES", names);
        }
    }

    #[test]
    fn placed_fds_are_inherited_in_order_with_their_names() {
        let specs = [
            ListenSpec::new(tcp("127.0.0.1:0")).name("a"),
            ListenSpec::new(tcp("127.0.0.1:0")).name("b"),
        ];
        let listeners = Listeners::bind(&specs, 1).unwrap();
        let ports: Vec<u16> = listeners
            .for_instance(0)
            .iter()
            .map(|(fd, _)| port(*fd))
            .collect();
        // Only the child rearranges its descriptor table; it borrows
        // `listeners` and never drops them (it `_exit`s).
        in_child("place_listen_fds", || {
            clear_listen_env();
            let fds: Vec<(RawFd, &str)> = listeners
                .for_instance(0)
                .iter()
                .map(|(fd, name)| (fd.as_raw_fd(), *name))
                .collect();
            let Ok((env, next)) = place_listen_fds(&fds) else {
                return 1;
            };
            if next != 5 {
                return 2;
            }
            // Again, from sources inside the target range, swapped.
            let Ok((env2, _)) = place_listen_fds(&[(4, "b"), (3, "a2")]) else {
                return 3;
            };
            let pid = sys::getpid().to_string();
            let expect = |names: &str| {
                vec![
                    ("LISTEN_FDS".to_owned(), "2".to_owned()),
                    ("LISTEN_PID".to_owned(), pid.clone()),
                    ("LISTEN_FDNAMES".to_owned(), names.to_owned()),
                ]
            };
            if env != expect("a:b") || env2 != expect("b:a2") {
                return 4;
            }
            // The child about to exec keeps them: no FD_CLOEXEC.
            if !matches!(
                (sys::fd::is_cloexec_raw(3), sys::fd::is_cloexec_raw(4)),
                (Ok(false), Ok(false))
            ) {
                return 13;
            }
            for (key, value) in &env2 {
                std::env::set_var(key, value);
            }
            let Ok(taken) = inherited_listeners() else {
                return 5;
            };
            if !listen_env_is_gone() {
                return 6;
            }
            let got: Vec<(&str, RawFd, u16)> = taken
                .iter()
                .map(|l| (l.name(), l.as_raw_fd(), port(l.as_fd())))
                .collect();
            if got != [("b", 3, ports[1]), ("a2", 4, ports[0])] {
                return 7;
            }
            if !taken.iter().all(is_cloexec) {
                return 8;
            }
            // Taken once: the variables are gone, and even set again the
            // numbers are not taken twice.
            if !matches!(inherited_listeners(), Ok(v) if v.is_empty()) {
                return 9;
            }
            for (key, value) in &env2 {
                std::env::set_var(key, value);
            }
            if !matches!(inherited_listeners(), Err(ListenError::Systemd { .. })) {
                return 10;
            }
            if place_listen_fds(&[(3, "bad:name")]).is_ok() {
                return 11;
            }
            if !matches!(place_listen_fds(&[]), Ok((env, 3)) if env.is_empty()) {
                return 12;
            }
            0
        });
    }

    #[test]
    fn inherited_listeners_ignore_another_process_and_need_sockets() {
        in_child("inherited: not ours", || {
            set_listen_env(1, "1", None);
            match inherited_listeners() {
                Ok(v) if v.is_empty() && listen_env_is_gone() => 0,
                _ => 1,
            }
        });
        in_child("inherited: none", || {
            clear_listen_env();
            match inherited_listeners() {
                Ok(v) if v.is_empty() => 0,
                _ => 1,
            }
        });
        in_child("inherited: not a socket", || {
            // A bare number: the File must not also close what ends up at 3.
            let Ok(file) = std::fs::File::open("/dev/null") else {
                return 1;
            };
            let raw = std::os::fd::IntoRawFd::into_raw_fd(file);
            if place_listen_fds(&[(raw, "null")]).is_err() {
                return 2;
            }
            set_listen_env(sys::getpid(), "1", None);
            match inherited_listeners() {
                Err(ListenError::Systemd { reason }) if reason.contains("not a socket") => 0,
                _ => 3,
            }
        });
    }

    #[test]
    fn systemd_sockets_are_taken_in_named_and_close_on_exec() {
        let listeners = Listeners::bind(&[ListenSpec::new(tcp("127.0.0.1:0"))], 1).unwrap();
        let addrs = listeners.local_addrs();
        let (fd, _) = listeners.for_instance(0)[0];
        let raw = fd.as_raw_fd();
        in_child("systemd: taken", || {
            // systemd passes its sockets without FD_CLOEXEC, as placed here.
            if place_listen_fds(&[(raw, "ignored")]).is_err() {
                return 1;
            }
            set_listen_env(sys::getpid(), "1", Some("web"));
            let Ok(Some(taken)) = Listeners::from_systemd_env() else {
                return 2;
            };
            if !listen_env_is_gone() {
                return 3;
            }
            if taken.local_addrs() != addrs {
                return 4;
            }
            let got = taken.for_instance(5);
            if got.len() != 1 || got[0].1 != "web" || got[0].0.as_raw_fd() != 3 {
                return 5;
            }
            if !sys::fd::is_cloexec(got[0].0).unwrap_or(false) {
                return 6;
            }
            0
        });
        in_child("systemd: unnamed", || {
            if place_listen_fds(&[(raw, "x")]).is_err() {
                return 1;
            }
            set_listen_env(sys::getpid(), "1", None);
            let Ok(Some(taken)) = Listeners::from_systemd_env() else {
                return 2;
            };
            let names: Vec<&str> = taken.for_instance(0).into_iter().map(|(_, n)| n).collect();
            if names != ["unknown"] {
                return 3;
            }
            0
        });
        in_child("systemd: not activated", || {
            set_listen_env(1, "1", None);
            if !matches!(Listeners::from_systemd_env(), Ok(None)) || !listen_env_is_gone() {
                return 1;
            }
            clear_listen_env();
            if !matches!(Listeners::from_systemd_env(), Ok(None)) {
                return 2;
            }
            0
        });
        for (what, count, names) in [
            ("count", "x", None),
            ("negative", "-1", None),
            ("names", "1", Some("a:b")),
            ("missing", "2", None),
            ("huge", "18446744073709551615", None),
        ] {
            in_child(&format!("systemd: bad {what}"), || {
                if place_listen_fds(&[(raw, "x")]).is_err() {
                    return 1;
                }
                // "missing": nothing at 4 (whatever the child had there,
                // it never uses).
                let _ = sys::fd::close_raw(4);
                set_listen_env(sys::getpid(), count, names);
                match Listeners::from_systemd_env() {
                    Err(ListenError::Systemd { .. }) if listen_env_is_gone() => 0,
                    _ => 2,
                }
            });
        }
        in_child("systemd: bad pid", || {
            clear_listen_env();
            std::env::set_var("LISTEN_PID", "me");
            std::env::set_var("LISTEN_FDS", "1");
            match Listeners::from_systemd_env() {
                Err(ListenError::Systemd { .. }) if listen_env_is_gone() => 0,
                _ => 1,
            }
        });
    }
}

/// Listener adoption into tokio: an inherited listener (not close-on-exec,
/// blocking, as a spawned worker finds it at fd 3) comes out non-blocking
/// and close-on-exec, and accepts.
#[cfg(all(test, feature = "tokio", not(loom)))]
mod tokio_tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn flags(fd: RawFd) -> (bool, bool) {
        // SAFETY: fcntl reads the flags of an open descriptor.
        let fd_flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        // SAFETY: as above.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        (fd_flags & libc::FD_CLOEXEC != 0, fl & libc::O_NONBLOCK != 0)
    }

    fn inherited(fd: OwnedFd) -> Listener {
        sys::fd::set_cloexec(fd.as_fd(), false).unwrap();
        assert_eq!(flags(fd.as_raw_fd()), (false, false), "as inherited");
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
            assert_eq!(flags(tcp.as_raw_fd()), (true, true));
            let client = tokio::net::TcpStream::connect(addr);
            let (accepted, connected) = tokio::join!(tcp.accept(), client);
            assert!(accepted.is_ok() && connected.is_ok());

            let dir = std::env::temp_dir().join(format!("shmc-tokio-unix-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("s.sock");
            let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
            let unix = inherited(OwnedFd::from(unix)).into_tokio_unix().unwrap();
            assert_eq!(flags(unix.as_raw_fd()), (true, true));
            let client = tokio::net::UnixStream::connect(&path);
            let (accepted, connected) = tokio::join!(unix.accept(), client);
            assert!(accepted.is_ok() && connected.is_ok());
            std::fs::remove_dir_all(&dir).unwrap();
        });
    }
}
