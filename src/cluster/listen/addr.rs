//! Where a listener is bound ([`ListenAddr`]), how workers share it
//! ([`ListenMode`]), and a configured listener ([`ListenSpec`]).

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;

use super::ListenError;

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
    /// One socket, the same in every worker; each connection goes to
    /// whichever waiting worker takes it first. Servers that wait in
    /// `poll`/`epoll` (tokio, libuv, asyncio, [`Worker::incoming`]) are all
    /// woken and the quickest to run wins, so the workers' shares are
    /// uneven: in `benches/balance.rs` (4 workers, short connections) the
    /// busiest took 1.03–1.5 times a fair share. A dead worker costs
    /// nothing: the others take its connections at once.
    ///
    /// [`Worker::incoming`]: crate::Worker::incoming
    #[default]
    Shared,
    /// One socket per worker instance, all on the same TCP address with
    /// `SO_REUSEPORT`; the kernel spreads connections over them by a hash of
    /// the peer's address and port: even shares whatever the server (the
    /// busiest 1.01–1.05 times a fair share in `benches/balance.rs`). The
    /// master keeps each instance's socket across generations, so the
    /// connections hashed to a worker that died wait in its socket's
    /// backlog until the replacement accepts them (they are not reset);
    /// an instance given up after a crash loop has its socket stopped, and
    /// the others take its share. TCP only.
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

    /// Sets the name workers see in `LISTEN_FDNAMES` ([`Listener::name`](crate::Listener::name)).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

#[cfg(test)]
mod tests {

    use super::super::{ListenAddr, ListenError};

    use super::super::testutil::*;

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
}
