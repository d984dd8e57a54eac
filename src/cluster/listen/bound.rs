//! The master's listening sockets ([`Listeners`]): bound before any fork
//! (or taken from systemd), one shared by every instance or one per
//! instance, handed to each worker it starts and lent to workers' run-time
//! requests.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use super::request::{decode_request, encode_error, encode_ok, MAX_REQUEST_LEN};
use super::systemd::take_listen_env;
use super::{ListenAddr, ListenError, ListenMode, ListenSpec, Listener};
use crate::sys::net;

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

/// A `LISTEN_FDNAMES` name for a handed socket bound at `addr` (text with
/// `:`): `%` and `:` percent-escaped (undone by the control codec's
/// `unescape`).
fn handed_name(addr: &str) -> String {
    addr.replace('%', "%25").replace(':', "%3A")
}

/// Whether the socket `fd` is bound to `addr`: the same unix path; or the
/// same IP and, unless `addr` asks for port 0, the same port.
fn bound_to(fd: BorrowedFd<'_>, addr: &ListenAddr) -> bool {
    match (net::local_addr(fd), addr) {
        (Ok(net::LocalAddr::UnixPath(path)), ListenAddr::Unix(want)) => path == *want,
        (Ok(net::LocalAddr::Inet(got)), ListenAddr::Tcp(want)) => {
            got.ip() == want.ip() && (want.port() == 0 || got.port() == want.port())
        }
        _ => false,
    }
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
    /// A socket systemd passed (socket activation), under its name: one
    /// socket for every worker, its address read from the socket.
    fn from_systemd(name: String, fd: OwnedFd) -> Self {
        let mut held = Held {
            name,
            addr: None,
            mode: ListenMode::Shared,
            fds: vec![fd],
            created_path: None,
        };
        held.addr = held.local_addr();
        held
    }

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
    /// Whether the unix socket files of `created_path` are this master's
    /// to remove at its end: not while they were handed to a new master
    /// (binary upgrade), nor, in a new master, before the old one is gone.
    paths_handed: bool,
    /// In a new master of a binary upgrade: handed `ReusePort` sockets
    /// its configuration has no instance for (fewer instances, or the
    /// listener is `Shared` now). The old master's workers still accept on
    /// them; [`Listeners::stop_surplus`] takes them out of their port's
    /// `SO_REUSEPORT` group once this master is ready.
    surplus: Vec<OwnedFd>,
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
            .map(|(name, fd)| Held::from_systemd(name, fd))
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

    /// Stops instance `index`'s own sockets of every `ReusePort` listener
    /// from listening ([`net::stop_listening`]), for an instance given up
    /// after a crash loop: no worker will accept on them again, and a
    /// socket left listening would keep taking its share of the new
    /// connections (the kernel's hash does not know the worker is gone),
    /// which would wait there unanswered until their clients gave up.
    /// Stopped, the kernel spreads the connections over the sockets of the
    /// live instances. Shared sockets, and a socket another of the
    /// `instances` also gets (an index past the count bound), are left as
    /// they are.
    ///
    /// # Errors
    /// The first `shutdown(2)` error; the other sockets are still stopped.
    pub(crate) fn retire_instance(&self, index: u32, instances: u32) -> io::Result<()> {
        let mut result = Ok(());
        for held in &self.inherited {
            let own = held.mode == ListenMode::ReusePort
                && index < instances
                && instances as usize <= held.fds.len();
            if own {
                if let Err(e) = net::stop_listening(held.fd_for(index)) {
                    result = result.and(Err(e));
                }
            }
        }
        result
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
            .chain(self.surplus.iter().map(AsRawFd::as_raw_fd))
            .collect()
    }

    /// In a new master of a binary upgrade, right before it says `ready`:
    /// stops listening on the surplus handed sockets (`shutdown(2)`
    /// `SHUT_RD`, see [`net::stop_listening`]) and closes them.
    ///
    /// The old master shares each of those socket objects, so the stop
    /// takes them out of the port's `SO_REUSEPORT` group for both masters:
    /// from then on the kernel spreads new connections over the sockets
    /// this master kept (the old master's workers accept on those too
    /// until they stop). Merely closing them here would leave them in the
    /// group as long as the old master holds them: through its drain the
    /// kernel would still hash connections to sockets nobody accepts on
    /// any more, reset when it exits. Connections waiting in a surplus
    /// socket's backlog at the instant of the stop are reset; the old
    /// workers accept promptly, so that backlog is short. It is done at
    /// `ready` and not at adoption, so that an upgrade that fails leaves
    /// the old master every socket it serves on.
    ///
    /// # Errors
    /// The first `shutdown(2)` error; every surplus socket is still closed.
    pub(crate) fn stop_surplus(&mut self) -> io::Result<()> {
        let mut result = Ok(());
        for fd in self.surplus.drain(..) {
            if let Err(e) = net::stop_listening(fd.as_fd()) {
                result = result.and(Err(e));
            }
        }
        result
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

    /// The sockets to hand a new master of a binary upgrade, in
    /// `LISTEN_FDS` order with their `LISTEN_FDNAMES` names: every
    /// inherited listener's sockets in spec order, named by the listener
    /// (a `ReusePort` listener's sockets, one per instance, share its
    /// name), then the shared sockets bound on workers' requests, named by
    /// their address (`:` and `%` escaped, see [`handed_name`]). With them,
    /// how many of them are inherited ones. The new master maps them back
    /// with [`Listeners::adopt`].
    pub(crate) fn handover(&self) -> (Vec<(RawFd, String)>, usize) {
        let mut fds = Vec::new();
        for held in &self.inherited {
            fds.extend(held.fds.iter().map(|fd| (fd.as_raw_fd(), held.name.clone())));
        }
        let inherited = fds.len();
        for held in &self.requested {
            if let Some(addr) = &held.addr {
                fds.push((held.fds[0].as_raw_fd(), handed_name(&addr.to_string())));
            }
        }
        (fds, inherited)
    }

    /// Whether the unix socket files are this master's to remove at its
    /// end (see [`Listeners::remove_unix_paths`]): `false` once handed to a
    /// new master, or in a new master until its old one is gone.
    pub(crate) fn set_paths_owned(&mut self, owned: bool) {
        self.paths_handed = !owned;
    }

    /// A new master's listeners, from the sockets its old master handed
    /// over (binary upgrade, [`Listeners::handover`]): `handed` in
    /// `LISTEN_FDS` order, the first `inherited` of them the old master's
    /// inherited listeners. Each spec takes the handed sockets of its name
    /// if they are bound to its address (the same path; the same IP, and
    /// the same port unless port 0 was asked for): a `ReusePort` spec one
    /// per instance (more bound on the same port if there are now more
    /// instances; extra ones closed), a `Shared` spec the first. A spec
    /// without handed sockets (new, or its address changed) is bound as
    /// [`Listeners::bind`] does; handed sockets no spec takes are closed.
    /// With `systemd` (the old master's came from socket activation), the
    /// inherited ones are taken as they are, as
    /// [`Listeners::from_systemd_env`] does. The rest are the old master's
    /// sockets bound on workers' requests, kept for the same requests.
    ///
    /// The unix socket files are not this master's to remove until
    /// [`Listeners::set_paths_owned`].
    ///
    /// # Errors
    /// As [`Listeners::bind`].
    pub(crate) fn adopt(
        specs: &[ListenSpec],
        instances: u32,
        handed: Vec<(String, OwnedFd)>,
        inherited: usize,
        systemd: bool,
    ) -> Result<Self, ListenError> {
        let mut pool: Vec<(String, OwnedFd)> = handed;
        let requested_part = pool.split_off(inherited.min(pool.len()));
        let mut listeners = Self {
            paths_handed: true,
            ..Self::default()
        };
        if systemd {
            for (name, fd) in pool.drain(..) {
                listeners.inherited.push(Held::from_systemd(name, fd));
            }
        }
        for (i, spec) in specs.iter().enumerate().filter(|_| !systemd) {
            let name = if spec.name.is_empty() {
                default_name(i)
            } else {
                spec.name.clone()
            };
            if !is_valid_name(&name) {
                return Err(ListenError::InvalidName { name });
            }
            let mut mine = Vec::new();
            let mut rest = Vec::new();
            for (n, fd) in pool.drain(..) {
                if n == name {
                    mine.push(fd);
                } else {
                    rest.push((n, fd));
                }
            }
            pool = rest;
            let same_addr = mine.first().is_some_and(|fd| bound_to(fd.as_fd(), &spec.addr));
            let held = if !same_addr {
                Held::bind(name, &spec.addr, spec.mode, instances)?
            } else {
                let created_path = match &spec.addr {
                    ListenAddr::Unix(path) => Some(path.clone()),
                    ListenAddr::Tcp(_) => None,
                };
                let want = match spec.mode {
                    ListenMode::Shared => 1,
                    ListenMode::ReusePort => instances.max(1) as usize,
                };
                if mine.len() > want {
                    // Stopped once this master is ready (stop_surplus).
                    listeners.surplus.extend(mine.split_off(want));
                }
                // An instance given up after a crash loop had its own
                // socket stopped (`retire_instance`): it still holds its
                // port, and this master's instance of that index gets it,
                // so it listens again. (`listen(2)` on a listening socket
                // only sets its backlog, to the value it was bound with.)
                if spec.mode == ListenMode::ReusePort {
                    for fd in &mine {
                        net::relisten(fd.as_fd()).map_err(|source| ListenError::Bind {
                            addr: spec.addr.clone(),
                            source,
                        })?;
                    }
                }
                // A shared socket cannot take part in a group: another
                // socket on its port would fail with EADDRINUSE.
                let shared = net::has_reuse_port(mine[0].as_fd())
                    .map(|on| !on)
                    .map_err(|source| ListenError::Bind {
                        addr: spec.addr.clone(),
                        source,
                    })?;
                if mine.len() < want && shared {
                    return Err(ListenError::ModeChange {
                        addr: spec.addr.clone(),
                    });
                }
                while mine.len() < want {
                    let actual =
                        net::local_addr_tcp(mine[0].as_fd()).map_err(|source| ListenError::Bind {
                            addr: spec.addr.clone(),
                            source,
                        })?;
                    mine.push(bind_tcp(actual, true)?);
                }
                Held {
                    name,
                    addr: Some(spec.addr.clone()),
                    mode: spec.mode,
                    fds: mine,
                    created_path,
                }
            };
            listeners.inherited.push(held);
        }
        for (name, fd) in requested_part {
            let Ok(addr) = crate::cluster::control::codec::unescape(&name).parse::<ListenAddr>() else {
                continue;
            };
            listeners.requested.push(Held {
                name,
                addr: Some(addr),
                mode: ListenMode::Shared,
                fds: vec![fd],
                created_path: None,
            });
        }
        Ok(listeners)
    }

    /// Removes the unix socket files this master created (at shutdown).
    /// A path that is no longer a socket file is left alone.
    pub(crate) fn remove_unix_paths(&self) {
        if self.paths_handed {
            return;
        }
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

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, RawFd};
    use std::time::{Duration, Instant};

    use super::super::{ListenAddr, ListenError, ListenMode, ListenSpec, Listeners};
    use crate::sys::net;
    use std::io::{Read, Write};

    use super::super::testutil::*;
    use super::*;

    /// Connections [`accepted_of_connects`] opens.
    const CONNECTS: usize = 32;

    /// Opens [`CONNECTS`] connections to `socket`'s address and returns how
    /// many `socket` accepts within 5 s: all of them when no other socket
    /// of its port takes any.
    fn accepted_of_connects(socket: &std::net::TcpListener) -> usize {
        let addr = socket.local_addr().unwrap();
        socket.set_nonblocking(true).unwrap();
        let clients: Vec<_> = (0..CONNECTS)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let mut accepted = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        while accepted < CONNECTS && Instant::now() < deadline {
            while socket.accept().is_ok() {
                accepted += 1;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(clients);
        accepted
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
    fn a_retired_instance_stops_listening_and_the_others_take_its_share() {
        let reuse = ListenSpec::new(tcp("127.0.0.1:0")).mode(ListenMode::ReusePort);
        let shared = ListenSpec::new(tcp("127.0.0.1:0")).name("shared");
        let listeners = Listeners::bind(&[reuse, shared], 2).unwrap();
        listeners.retire_instance(1, 2).unwrap();
        let listening = |i: u32, k: usize| net::socket_is_listening(listeners.for_instance(i)[k].0).unwrap();
        assert!(!listening(1, 0), "instance 1's own socket stopped");
        assert!(listening(0, 0), "instance 0's own socket listens");
        assert!(listening(1, 1) && listening(0, 1), "the shared socket listens");

        // Every connection to the port now reaches instance 0's socket.
        let socket = listeners.instance_listeners(0).unwrap().remove(0).into_tcp();
        assert_eq!(accepted_of_connects(&socket), CONNECTS);

        // An index past the count shares a socket with a live instance:
        // left listening.
        let spec = ListenSpec::new(tcp("127.0.0.1:0")).mode(ListenMode::ReusePort);
        let listeners = Listeners::bind(&[spec], 2).unwrap();
        listeners.retire_instance(0, 3).unwrap();
        assert!(net::socket_is_listening(listeners.for_instance(0)[0].0).unwrap());
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

    /// The sockets handed over, as a new master receives them (copies).
    fn received(old: &Listeners) -> (Vec<(String, OwnedFd)>, usize) {
        let (fds, inherited) = old.handover();
        let copies = fds
            .into_iter()
            .map(|(raw, name)| {
                // SAFETY: `raw` is one of `old`'s sockets, open while `old`
                // lives (for the whole test); only borrowed to copy it.
                let fd = unsafe { BorrowedFd::borrow_raw(raw) };
                (name, fd.try_clone_to_owned().unwrap())
            })
            .collect();
        (copies, inherited)
    }

    fn opened_inode(opened: Opened<'_>) -> u64 {
        match opened {
            Opened::Held(fd) => inode(fd),
            Opened::Fresh(fd) => inode(fd.as_fd()),
        }
    }

    /// A binary upgrade's new master maps the handed sockets back: by name
    /// and address, a `ReusePort` listener's one per instance (one more
    /// bound on the same port for a new instance), a listener whose
    /// address changed bound afresh, the sockets of workers' requests kept.
    #[test]
    fn a_new_master_adopts_the_handed_sockets_by_name_and_address() {
        let specs = [
            ListenSpec::new(tcp("127.0.0.1:0")).name("web"),
            ListenSpec::new(tcp("127.0.0.1:0"))
                .mode(ListenMode::ReusePort)
                .name("rp"),
            ListenSpec::new(tcp("127.0.0.1:0")).name("moved"),
        ];
        let mut old = Listeners::bind(&specs, 2).unwrap();
        // Another address than the specs' (those are the inherited ones).
        let asked = tcp("127.0.0.3:0");
        let requested = opened_inode(old.open(&asked, ListenMode::Shared).unwrap());
        let asked_port = old.requested[0].local_addr().unwrap();
        let (handed, inherited) = received(&old);
        let names: Vec<&str> = handed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[..4], ["web", "rp", "rp", "moved"]);
        assert_eq!(inherited, 4);
        assert_eq!(handed.len(), 5, "and the requested socket");
        assert!(!names[4].contains(':'), "{names:?}");
        let old_inodes =
            |i: u32| -> Vec<u64> { old.for_instance(i).iter().map(|(fd, _)| inode(*fd)).collect() };
        let (i0, i1) = (old_inodes(0), old_inodes(1));

        // The new configuration: three instances now, "moved" elsewhere.
        let new_specs = [
            ListenSpec::new(tcp("127.0.0.1:0")).name("web"),
            ListenSpec::new(tcp("127.0.0.1:0"))
                .mode(ListenMode::ReusePort)
                .name("rp"),
            ListenSpec::new(tcp("127.0.0.2:0")).name("moved"),
        ];
        let mut new = Listeners::adopt(&new_specs, 3, handed, inherited, false).unwrap();
        let new_inodes =
            |i: u32| -> Vec<u64> { new.for_instance(i).iter().map(|(fd, _)| inode(*fd)).collect() };
        let (n0, n1, n2) = (new_inodes(0), new_inodes(1), new_inodes(2));
        assert_eq!(n0[..2], i0[..2], "web and rp of instance 0: the same sockets");
        assert_eq!(n1[1], i1[1], "rp of instance 1: the same socket");
        assert!(
            !i0.contains(&n2[1]) && !i1.contains(&n2[1]),
            "rp of instance 2: a new one"
        );
        let rp_port = |l: &Listeners, i: u32| port(l.for_instance(i)[1].0);
        assert_eq!(rp_port(&new, 2), rp_port(&old, 0), "on the same port");
        assert_ne!(n0[2], i0[2], "moved: bound afresh");
        assert_eq!(
            new.local_addrs()[2].to_string().split(':').next(),
            Some("127.0.0.2")
        );
        // A worker's request for the same address gets the same socket.
        let again = opened_inode(new.open(&asked_port, ListenMode::Shared).unwrap());
        assert_eq!(again, requested);
        assert!(new.paths_handed, "files not the new master's yet");
    }

    /// `Shared` → `ReusePort` in an upgrade: with more than one instance
    /// a typed error that says why (rather than `EADDRINUSE` from the
    /// second socket's `bind`); with one, the handed socket serves.
    #[test]
    fn a_shared_socket_cannot_become_reuseport_in_an_upgrade() {
        let spec = ListenSpec::new(tcp("127.0.0.1:0"));
        let old = Listeners::bind(std::slice::from_ref(&spec), 2).unwrap();
        let reuseport = [spec.mode(ListenMode::ReusePort)];
        let (handed, inherited) = received(&old);
        match Listeners::adopt(&reuseport, 2, handed, inherited, false) {
            Err(e @ ListenError::ModeChange { .. }) => {
                assert!(e.to_string().contains("restart the cluster"), "{e}")
            }
            other => panic!("{:?}", other.map(|l| l.all_fds().len())),
        }
        let (handed, inherited) = received(&old);
        let new = Listeners::adopt(&reuseport, 1, handed, inherited, false).unwrap();
        assert_eq!(inode(new.for_instance(0)[0].0), inode(old.for_instance(0)[0].0));
    }

    /// A new master with fewer `ReusePort` instances stops listening on
    /// the handed sockets it has no instance for, once ready: they leave
    /// the port's group for the old master too, so no connection is
    /// hashed to a socket nobody will accept on; every connection reaches
    /// a kept socket. Also for a listener that became `Shared`.
    #[test]
    fn a_retired_instance_stops_listening_in_both_masters_after_an_upgrade() {
        let spec = ListenSpec::new(tcp("127.0.0.1:0")).mode(ListenMode::ReusePort);
        let old = Listeners::bind(std::slice::from_ref(&spec), 3).unwrap();
        let old_fd = |i: u32| old.for_instance(i)[0].0;
        for (new_spec, instances) in [(spec.clone(), 1), (ListenSpec::new(tcp("127.0.0.1:0")), 2)] {
            for i in 0..3 {
                net::relisten(old_fd(i)).unwrap();
            }
            let (handed, inherited) = received(&old);
            let mut new = Listeners::adopt(
                std::slice::from_ref(&new_spec),
                instances,
                handed,
                inherited,
                false,
            )
            .unwrap();
            assert_eq!(inode(new.for_instance(0)[0].0), inode(old_fd(0)));
            // The same socket object as the new master's instance 0's.
            let kept = old_fd(0);
            assert!(
                net::socket_is_listening(old_fd(1)).unwrap(),
                "still served by the old master until the new one is ready"
            );
            assert_eq!(new.all_fds().len(), 3, "a forked worker closes the surplus too");
            new.stop_surplus().unwrap();
            assert!(!net::socket_is_listening(old_fd(1)).unwrap(), "{new_spec:?}");
            assert!(!net::socket_is_listening(old_fd(2)).unwrap(), "{new_spec:?}");
            assert!(net::socket_is_listening(kept).unwrap());
            assert_eq!(new.all_fds().len(), 1);

            let socket = new.instance_listeners(0).unwrap().remove(0).into_tcp();
            assert_eq!(
                accepted_of_connects(&socket),
                CONNECTS,
                "every connection reaches the kept socket"
            );
        }
    }

    /// A socket stopped because its instance was given up listens again
    /// in the master it is handed to: that master's instance of the same
    /// index accepts on it.
    #[test]
    fn a_retired_socket_listens_again_after_an_upgrade() {
        let spec = ListenSpec::new(tcp("127.0.0.1:0")).mode(ListenMode::ReusePort);
        let old = Listeners::bind(std::slice::from_ref(&spec), 2).unwrap();
        old.retire_instance(1, 2).unwrap();
        assert!(!net::socket_is_listening(old.for_instance(1)[0].0).unwrap());
        let (handed, inherited) = received(&old);
        let new = Listeners::adopt(&[spec], 2, handed, inherited, false).unwrap();
        assert_eq!(inode(new.for_instance(1)[0].0), inode(old.for_instance(1)[0].0));
        assert!(net::socket_is_listening(new.for_instance(1)[0].0).unwrap());
        assert!(net::socket_is_listening(new.for_instance(0)[0].0).unwrap());
    }
}
