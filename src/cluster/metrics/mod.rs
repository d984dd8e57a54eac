//! The master's metrics endpoint: the cluster's figures in the OpenMetrics
//! text format over HTTP (`GET /metrics`), for Prometheus to scrape
//! ([`ClusterBuilder::metrics`](crate::ClusterBuilder::metrics),
//! `shmcluster run --metrics ADDR`).
//!
//! Served inside the master's supervision loop under the control socket's
//! rules (see `control/`), so that no client can hold the loop up: the
//! listening socket and every connection are non-blocking and watched by
//! the loop's own `poll(2)`; a request head is at most
//! [`http::MAX_HEAD`] bytes and must arrive within [`REQUEST_TIMEOUT`] of
//! the connection, and the response must be taken within
//! [`RESPONSE_TIMEOUT`]; at most [`MAX_CONNECTIONS`] connections are served
//! at once (more are closed on arrival, and a scraper retries at its next
//! interval). One request per connection (`Connection: close`). A request
//! that is not `GET`/`HEAD /metrics` gets a plain-text 400, 404, 405 or
//! 431 and is closed; one too slow is closed (after a 408 if the socket
//! takes it at once).
//!
//! One exposition is rendered per loop pass, whichever number of scrapes
//! asked for it in that pass ([`render`]), and at most one per
//! [`RENDER_EVERY`]: scrapes within it get the last one again. Rendering
//! is the endpoint's only real cost to the loop (measured in a release
//! build: 0.15 ms and 12 KB for 9 slots, 12 ms and 0.9 MB for 1023, 33 ms
//! with the machine busy), so a client that scrapes in a tight loop costs the loop at
//! most that every [`RENDER_EVERY`].
//!
//! The endpoint has no authentication: it is bound to loopback unless the
//! address given says otherwise, and a non-loopback address is warned
//! about on stderr when the master starts.

mod http;
mod render;

use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use http::Verdict;
pub(crate) use render::MasterFigures;
use render::{render, EventCounts, CONTENT_TYPE};

use super::{ClusterStats, Event};
use crate::sys;

/// How long a client has to send its request head.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a client has, from its connection, to take the whole response
/// (a large cluster's exposition is a few hundred KiB).
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// The shortest time between two renderings (see the module docs).
pub(crate) const RENDER_EVERY: Duration = Duration::from_millis(250);

/// Connections served at once; more are closed on arrival.
pub(crate) const MAX_CONNECTIONS: usize = 16;

/// Why the metrics endpoint could not be bound.
#[derive(Debug)]
pub(crate) struct BindError {
    /// The address as given.
    pub(crate) addr: String,
    /// Why not.
    pub(crate) error: io::Error,
}

/// One client connection.
struct Conn {
    stream: TcpStream,
    input: Vec<u8>,
    /// The response and how much of it is written.
    output: Option<(Rc<[u8]>, usize)>,
    /// The request asked for the metrics (`Some(head_only)`): the response
    /// is rendered at the end of this pass.
    wants: Option<bool>,
    /// When the request head must be in.
    request_by: Instant,
    /// When the response must be taken.
    done_by: Instant,
}

/// The listening socket and the connections being served.
pub(crate) struct MetricsServer {
    listener: TcpListener,
    local: SocketAddr,
    conns: Vec<Conn>,
    events: EventCounts,
    started: Instant,
    last: Option<Rendering>,
    /// Whether new connections are accepted: not in a binary upgrade's
    /// new master before it is ready (the old master, which shares the
    /// listening socket, answers scrapes until the hand-over).
    accepting: bool,
}

/// The last rendering: the whole `GET` response, the `HEAD` one, and when
/// they were made.
struct Rendering {
    at: Instant,
    full: Rc<[u8]>,
    head: Rc<[u8]>,
}

impl MetricsServer {
    /// Binds `addr` (`host:port`; port 0 takes a free one), non-blocking.
    /// A non-loopback address is allowed, with a warning on stderr: the
    /// endpoint has no authentication.
    ///
    /// # Errors
    /// The address could not be resolved or bound.
    pub(crate) fn bind(addr: &str) -> Result<Self, BindError> {
        let fail = |error| BindError {
            addr: addr.to_string(),
            error,
        };
        let resolved: Vec<SocketAddr> = addr.to_socket_addrs().map_err(fail)?.collect();
        let Some(&first) = resolved.first() else {
            return Err(fail(io::Error::new(io::ErrorKind::InvalidInput, "no address")));
        };
        let listener = TcpListener::bind(first).map_err(fail)?;
        listener.set_nonblocking(true).map_err(fail)?;
        let local = listener.local_addr().map_err(fail)?;
        if let Some(warning) = exposure_warning(local) {
            say!("shmcluster: warning: {warning}");
        }
        Ok(Self::serving(listener, local, true))
    }

    /// A binary upgrade's new master: serves the listening socket `handed`
    /// its old master handed over if it is bound to `addr` (the same IP,
    /// and the same port unless port 0 is asked for), but accepts on it
    /// only once [`MetricsServer::set_accepting`] (the old master answers
    /// scrapes until the new one is ready); else binds `addr` as
    /// [`MetricsServer::bind`] does (and `handed` is closed).
    ///
    /// # Errors
    /// As [`MetricsServer::bind`].
    pub(crate) fn adopt(addr: &str, handed: std::os::fd::OwnedFd) -> Result<Self, BindError> {
        let listener = TcpListener::from(handed);
        let wanted: Vec<SocketAddr> = addr.to_socket_addrs().map(Iterator::collect).unwrap_or_default();
        let same = match (listener.local_addr(), wanted.first()) {
            (Ok(got), Some(want)) => got.ip() == want.ip() && (want.port() == 0 || got.port() == want.port()),
            _ => false,
        };
        if !same || listener.set_nonblocking(true).is_err() {
            drop(listener);
            return Self::bind(addr);
        }
        let local = listener.local_addr().map_err(|error| BindError {
            addr: addr.to_string(),
            error,
        })?;
        Ok(Self::serving(listener, local, false))
    }

    /// A server on `listener` (bound to `local`) with no client yet,
    /// accepting at once or not.
    fn serving(listener: TcpListener, local: SocketAddr, accepting: bool) -> Self {
        Self {
            listener,
            local,
            conns: Vec::new(),
            events: EventCounts::default(),
            started: Instant::now(),
            last: None,
            accepting,
        }
    }

    /// Starts (`true`) or stops accepting connections; those open are
    /// served either way.
    pub(crate) fn set_accepting(&mut self, yes: bool) {
        self.accepting = yes;
    }

    /// Whether it accepts connections: the master passes the listening
    /// socket's readiness to [`MetricsServer::serve`] only then.
    pub(crate) fn accepting(&self) -> bool {
        self.accepting
    }

    /// The listening socket, to hand to a new master.
    pub(crate) fn listener_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// The address it is bound to (port 0 resolved).
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// What the master's `poll(2)` should watch: the listening socket
    /// first if it [`accepts`](MetricsServer::accepting), then every
    /// connection.
    pub(crate) fn poll_fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = Vec::new();
        if self.accepting {
            fds.push(self.listener.as_fd());
        }
        fds.extend(self.conns.iter().map(|c| c.stream.as_fd()));
        fds
    }

    /// Every descriptor it holds, for a forked child to close.
    pub(crate) fn raw_fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.listener.as_raw_fd()];
        fds.extend(self.conns.iter().map(|c| c.stream.as_raw_fd()));
        fds
    }

    /// When the loop must look again even if nothing is readable: a
    /// connection's deadline, or soon if a response is waiting for room.
    pub(crate) fn wake_at(&self) -> Option<Instant> {
        let soon = Instant::now() + Duration::from_millis(10);
        self.conns
            .iter()
            .map(|c| match &c.output {
                Some((out, pos)) if *pos < out.len() => soon.min(c.done_by),
                Some(_) => c.done_by,
                None => c.request_by,
            })
            .min()
    }

    /// Counts an event the master published.
    pub(crate) fn observe(&mut self, event: &Event) {
        self.events.observe(event);
    }

    /// Accepts new connections (if `listener_ready`) and moves every
    /// connection on as far as it can without blocking; renders the
    /// exposition (once) if a request asked for it, from `snapshot`'s
    /// stats and bridge figure. Never waits.
    pub(crate) fn serve(
        &mut self,
        listener_ready: bool,
        snapshot: impl FnOnce() -> (ClusterStats, Option<u32>),
    ) {
        let now = Instant::now();
        if listener_ready && self.accepting {
            self.accept(now);
        }
        for c in &mut self.conns {
            if c.output.is_none() && c.wants.is_none() {
                c.read_request(now);
            }
        }
        if self.conns.iter().any(|c| c.wants.is_some()) {
            let (full, head) = match &self.last {
                Some(r) if now.duration_since(r.at) < RENDER_EVERY => (r.full.clone(), r.head.clone()),
                _ => {
                    let (stats, bridge_hosts) = snapshot();
                    let figures = MasterFigures {
                        uptime: self.started.elapsed(),
                        bridge_hosts,
                    };
                    let body = render(&stats, &self.events, figures);
                    let full: Rc<[u8]> = http::response(200, CONTENT_TYPE, body.as_bytes(), false).into();
                    let head: Rc<[u8]> = http::response(200, CONTENT_TYPE, body.as_bytes(), true).into();
                    self.last = Some(Rendering {
                        at: now,
                        full: full.clone(),
                        head: head.clone(),
                    });
                    (full, head)
                }
            };
            for c in &mut self.conns {
                if let Some(head_only) = c.wants.take() {
                    let out = if head_only { head.clone() } else { full.clone() };
                    c.output = Some((out, 0));
                }
            }
        }
        self.conns.retain_mut(|c| c.write(now));
    }

    fn accept(&mut self, now: Instant) {
        // A bounded number per pass: the loop has other work.
        for _ in 0..MAX_CONNECTIONS {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // WouldBlock, or out of descriptors: try again next pass.
                Err(_) => return,
            };
            if self.conns.len() >= MAX_CONNECTIONS || stream.set_nonblocking(true).is_err() {
                continue; // closed on drop
            }
            self.conns.push(Conn {
                stream,
                input: Vec::new(),
                output: None,
                wants: None,
                request_by: now + REQUEST_TIMEOUT,
                done_by: now + RESPONSE_TIMEOUT,
            });
        }
    }
}

/// What to warn about an endpoint bound to `local`: none on loopback.
fn exposure_warning(local: SocketAddr) -> Option<String> {
    (!local.ip().is_loopback()).then(|| {
        format!(
            "the metrics endpoint listens on {local}, not on loopback: anyone who can reach it \
             reads the cluster's figures (it has no authentication)"
        )
    })
}

impl Conn {
    /// Reads what has arrived of the request head and judges it: sets
    /// `wants` for a metrics request, `output` for a refusal.
    fn read_request(&mut self, now: Instant) {
        let mut chunk = [0u8; 2048];
        loop {
            match http::judge(&self.input) {
                Verdict::Incomplete => {}
                Verdict::Metrics { head } => {
                    self.wants = Some(head);
                    return;
                }
                Verdict::Refuse(status, reason) => {
                    self.output = Some((http::refusal(status, reason).into(), 0));
                    return;
                }
            }
            if now >= self.request_by {
                self.output = Some((http::refusal(408, "the request head took too long").into(), 0));
                // Written once, if the socket takes it now; then closed.
                self.done_by = now;
                return;
            }
            let room = http::MAX_HEAD - self.input.len();
            let want = room.min(chunk.len());
            match self.stream.read(&mut chunk[..want]) {
                // The client left (or half-closed) before a whole head.
                Ok(0) => {
                    self.output = Some((
                        http::refusal(400, "the request ended before its head did").into(),
                        0,
                    ));
                    return;
                }
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.done_by = now; // broken: closed below
                    return;
                }
            }
        }
    }

    /// Writes the response as far as the socket allows; `false` once the
    /// connection is finished (answered, broken, or too slow) and should
    /// be closed.
    fn write(&mut self, now: Instant) -> bool {
        let Some((out, pos)) = self.output.as_mut() else {
            // Still reading: within its deadline (a metrics request being
            // rendered never gets here without an output).
            return now < self.request_by && now < self.done_by;
        };
        while *pos < out.len() {
            match sys::net::send_with_fd(self.stream.as_fd(), &out[*pos..], None) {
                Ok(0) => return false,
                Ok(n) => *pos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return now < self.done_by,
                Err(_) => return false,
            }
        }
        // Closing a socket with unread bytes resets it, and the client may
        // lose the response: say we are done, then discard a little of
        // what is left (the rest of a refused request) first.
        let _ = self.stream.shutdown(Shutdown::Write);
        let mut rest = [0u8; 2048];
        for _ in 0..8 {
            if !matches!(self.stream.read(&mut rest), Ok(n) if n > 0) {
                break;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn stats() -> (ClusterStats, Option<u32>) {
        let stats = ClusterStats {
            master_pid: 1,
            instances: 1,
            shutting_down: false,
            slots: Vec::new(),
            locks: Vec::new(),
        };
        (stats, None)
    }

    /// Serves `server` until `client` has its whole response.
    fn exchange(server: &mut MetricsServer, request: &[u8]) -> String {
        let mut client = TcpStream::connect(server.local_addr()).unwrap();
        client.write_all(request).unwrap();
        client.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        loop {
            server.serve(true, stats);
            let mut buf = [0u8; 4096];
            match client.read(&mut buf) {
                Ok(0) => return String::from_utf8(got).unwrap(),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            assert!(Instant::now() < deadline, "no answer to {request:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_scrape_is_answered_and_a_bad_request_refused() {
        let mut server = MetricsServer::bind("127.0.0.1:0").unwrap();
        let got = exchange(&mut server, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(got.contains(CONTENT_TYPE), "{got}");
        assert!(got.contains("\r\n\r\n# HELP shmcluster_instances "), "{got}");
        assert!(got.ends_with("# EOF\n"), "{got}");
        let got = exchange(&mut server, b"DELETE /metrics HTTP/1.1\r\n\r\n");
        assert!(got.starts_with("HTTP/1.1 405 "), "{got}");
        let got = exchange(&mut server, b"GET /other HTTP/1.1\r\n\r\n");
        assert!(got.starts_with("HTTP/1.1 404 "), "{got}");
        let got = exchange(&mut server, &[b'x'; 3 * http::MAX_HEAD]);
        assert!(got.starts_with("HTTP/1.1 431 "), "{got}");
        assert!(server.conns.is_empty(), "every connection closed");
    }

    #[test]
    fn connections_are_bounded_and_a_silent_one_is_dropped_at_its_deadline() {
        let mut server = MetricsServer::bind("127.0.0.1:0").unwrap();
        let clients: Vec<TcpStream> = (0..MAX_CONNECTIONS + 4)
            .map(|_| TcpStream::connect(server.local_addr()).unwrap())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        while server.conns.len() < MAX_CONNECTIONS && Instant::now() < deadline {
            server.serve(true, stats);
        }
        server.serve(true, stats);
        assert_eq!(server.conns.len(), MAX_CONNECTIONS, "the rest closed on arrival");
        assert!(server
            .wake_at()
            .is_some_and(|t| t <= Instant::now() + REQUEST_TIMEOUT));
        std::thread::sleep(REQUEST_TIMEOUT);
        server.serve(false, || unreachable!("nobody asked for the metrics"));
        assert!(server.conns.is_empty(), "silent clients dropped");
        drop(clients);
    }

    #[test]
    fn a_bad_address_is_refused_and_a_non_loopback_one_warned_about() {
        assert!(MetricsServer::bind("not an address").is_err());
        assert!(MetricsServer::bind("127.0.0.1:99999").is_err());
        // Warned about, not bound here: the tests listen on loopback only.
        for quiet in ["127.0.0.1:9464", "127.0.0.2:1", "[::1]:9464"] {
            assert_eq!(exposure_warning(quiet.parse().unwrap()), None, "{quiet}");
        }
        for loud in ["0.0.0.0:9464", "10.0.0.5:9464", "[::]:9464"] {
            let warning = exposure_warning(loud.parse().unwrap()).unwrap();
            assert!(warning.contains("not on loopback"), "{warning}");
        }
    }
}
