//! The master's control socket: how `shmcluster stat`, `reload` and `stop`
//! reach a running master.
//!
//! A unix stream socket bound by the master (file mode 0600, removed when
//! the master ends), served inside its supervision loop: non-blocking, at
//! most [`MAX_REQUEST`] bytes a request, [`REQUEST_TIMEOUT`] to send it,
//! and only to peers with the master's own user id (`SO_PEERCRED`, checked
//! by [`peer_allowed`]). Others get one `err` line and the connection is
//! closed.
//!
//! # Protocol
//! One request line, one response, then the master closes the connection.
//! Requests: `ping`, `stat`, `reload` (a rolling reload, as `SIGHUP`),
//! `stop` (a graceful shutdown, as `SIGTERM`), `wait` (see below). Every
//! response starts with `ok ...` or `err <message>`.
//!
//! `wait` is answered `ok waiting` and the connection is then held open
//! until the master ends (at most 64 such connections at once, counted
//! apart from the 32 request connections, so waiting clients never lock
//! out the other requests; one more is answered `err too many clients
//! waiting ...`): just before it exits, the master writes how the
//! cluster ended on it and closes it (`shmcluster stop --wait` reports
//! this; the master is not the client's child, so the client cannot
//! `waitpid` it):
//!
//! ```text
//! ok waiting
//! exited code=1 outcome=unclean restarts=14 killed=0 summary=unclean%20shutdown%3A%20...
//! ```
//!
//! The connection itself is the robust part: a master that is killed
//! (`SIGKILL`) writes nothing, but the kernel still closes its end, so a
//! waiting client sees end-of-file without an `exited` line instead of
//! waiting forever; and nothing is left on disk to be read by mistake
//! after a later master reuses the pid. `stat` answers with lines of
//! space-separated `key=value` fields (values escaped as in [`escape`];
//! `-` for none), ended by `end`:
//!
//! ```text
//! ok stat v=1
//! master pid=4242 instances=2 shutting_down=0 uptime_ms=5120 reloads_started=1 reloads_ok=1 reloads_failed=0 last_reload=ok
//! slot id=0 index=0 state=Ready pid=4243 gen=1 restarts=0 last_exit=- hb_age_us=812 sent=10 sent_bytes=640 received=10 received_bytes=640 inbox_bytes=0 futex_waits=3 futex_wakes=2 full_waits=0
//! lock name= holder_slot=- holder_pid=- held_us=- acquisitions=0 waits=0 owner_died=0 token=0
//! end
//! ```
//!
//! Counters are totals since the master started (over every generation of
//! a slot): a client computes rates from two snapshots.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Acquire;
use std::time::{Duration, Instant};

use super::master::{Cluster, Report};
use super::{ClusterStats, Event, EventKind};
use crate::sys;

/// The longest request line accepted, newline included.
pub(crate) const MAX_REQUEST: usize = 256;

/// How long a client has to send its request (and to take the response)
/// before the master drops the connection.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// Request connections served at once (those not yet answered, or not
/// `wait`); more are closed on arrival.
const MAX_CONNECTIONS: usize = 32;

/// `wait` connections held open at once, apart from [`MAX_CONNECTIONS`]:
/// clients waiting for the master's end (`stop --wait`) never lock out
/// `stat`, `reload` or `stop`. A `wait` beyond it is refused with an `err`
/// line.
const MAX_WAITERS: usize = 64;

/// Version of the `stat` line format.
const WIRE_VERSION: u32 = 1;

/// Where a master's control socket goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ControlLocation {
    /// This path.
    Path(PathBuf),
    /// [`default_path`] of the master's pid.
    Default,
}

/// The default control socket of the master with pid `pid`:
/// `$XDG_RUNTIME_DIR/shmcluster-<pid>.sock`, or
/// `/tmp/shmcluster-<uid>/<pid>.sock` when `XDG_RUNTIME_DIR` is unset (the
/// master creates that directory with mode 0700 and refuses one that is
/// not private to its user).
pub(crate) fn default_path(pid: u32) -> PathBuf {
    match runtime_dir() {
        Some(dir) => dir.join(format!("shmcluster-{pid}.sock")),
        None => private_tmp_dir().join(format!("{pid}.sock")),
    }
}

fn runtime_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_absolute())
}

fn private_tmp_dir() -> PathBuf {
    PathBuf::from(format!("/tmp/shmcluster-{}", sys::net::own_uid()))
}

/// Creates `dir` with mode 0700 if it is missing, and checks that it is a
/// directory (not a link) owned by this user that nobody else can enter.
fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let meta = fs::symlink_metadata(dir)?;
    if !meta.is_dir() || meta.uid() != sys::net::own_uid() || meta.mode() & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a directory private to this user (owner uid {}, mode {:o})",
                dir.display(),
                meta.uid(),
                meta.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Whether the master answers a peer whose `SO_PEERCRED` user id is
/// `peer_uid`: only its own user (`master_uid`). Root is not special: it
/// can signal the master anyway.
pub(crate) fn peer_allowed(peer_uid: u32, master_uid: u32) -> bool {
    peer_uid == master_uid
}

/// Percent-escapes a value for a `key=value` field: every byte outside
/// `A-Z a-z 0-9 . _ : / + -` becomes `%XX`, so a value never contains a
/// space, `=` or a newline.
pub(crate) fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"._:/+-".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Reloads seen in the event log, for `stat` (and `reload --wait`).
#[derive(Debug, Default, Clone, Copy)]
struct ReloadCounts {
    started: u64,
    ok: u64,
    failed: u64,
    last_ok: Option<bool>,
}

/// The master's answer to one request line.
pub(crate) struct Reply {
    /// The response.
    text: String,
    /// Keep the connection open after the response (`wait`): the master's
    /// outcome is written on it at exit.
    wait: bool,
}

impl Reply {
    /// A response after which the connection is closed.
    fn close(text: String) -> Self {
        Self { text, wait: false }
    }
}

/// One client connection: reading its request, then writing the response
/// (and, for `wait`, staying open until the master ends).
struct Conn {
    stream: UnixStream,
    input: Vec<u8>,
    /// The response and how much of it is written.
    output: Option<(Vec<u8>, usize)>,
    /// When the client must have sent its request and taken the response;
    /// none for a `wait` connection once answered.
    deadline: Option<Instant>,
    /// A `wait` connection: kept open until [`ControlServer::finish`].
    waiting: bool,
}

impl Conn {
    /// A new connection that must send its request and take the response
    /// by `deadline`.
    fn new(stream: UnixStream, deadline: Instant) -> Self {
        Self {
            stream,
            input: Vec::new(),
            output: None,
            deadline: Some(deadline),
            waiting: false,
        }
    }

    /// Reads and answers as far as the socket allows without blocking;
    /// `false` once the connection is finished (answered, broken, or too
    /// slow) and should be closed.
    fn advance(&mut self, now: Instant, answer: &mut dyn FnMut(&[u8]) -> Reply) -> bool {
        if self.deadline.is_some_and(|d| now >= d) {
            return false;
        }
        if self.output.is_none() {
            let line = match self.read_line() {
                Ok(Some(line)) => line,
                Ok(None) => return true,
                Err(()) => return false,
            };
            let reply = match line {
                Some(line) => answer(&line),
                None => Reply::close(format!("err request longer than {MAX_REQUEST} bytes\n")),
            };
            self.output = Some((reply.text.into_bytes(), 0));
            if reply.wait {
                self.waiting = true;
                self.deadline = None;
            }
        }
        let Some((out, pos)) = self.output.as_mut() else {
            return false;
        };
        while *pos < out.len() {
            match sys::net::send_with_fd(self.stream.as_fd(), &out[*pos..], None) {
                Ok(0) => return false,
                Ok(n) => *pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(_) => return false,
            }
        }
        if self.waiting {
            return self.still_there();
        }
        // Closing a unix socket with unread bytes makes the peer's read fail
        // with ECONNRESET, losing the response: discard a little of what
        // is left (a request that was too long, say) first.
        let mut rest = [0u8; MAX_REQUEST];
        for _ in 0..16 {
            if !matches!(self.stream.read(&mut rest), Ok(n) if n > 0) {
                break;
            }
        }
        false
    }

    /// Whether the client of a `wait` connection is still connected
    /// (anything it sends is discarded; its hang-up frees the connection).
    fn still_there(&mut self) -> bool {
        let mut scratch = [0u8; MAX_REQUEST];
        for _ in 0..16 {
            match self.stream.read(&mut scratch) {
                Ok(0) => return false,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// `Ok(None)`: no full line yet. `Ok(Some(None))`: over the size
    /// limit. `Ok(Some(Some(line)))`: a request (a final line without a
    /// newline counts). `Err`: the peer left without asking anything.
    #[allow(clippy::type_complexity)]
    fn read_line(&mut self) -> Result<Option<Option<Vec<u8>>>, ()> {
        let mut chunk = [0u8; MAX_REQUEST];
        loop {
            if let Some(end) = self.input.iter().position(|&b| b == b'\n') {
                return Ok(Some(Some(self.input[..end].to_vec())));
            }
            if self.input.len() >= MAX_REQUEST {
                return Ok(Some(None));
            }
            let room = MAX_REQUEST - self.input.len();
            match self.stream.read(&mut chunk[..room]) {
                Ok(0) if self.input.is_empty() => return Err(()),
                Ok(0) => return Ok(Some(Some(std::mem::take(&mut self.input)))),
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Err(()),
            }
        }
    }
}

/// The master's end: the listening socket and the connections being
/// served. Dropping it removes the socket file (if it is still ours).
pub(crate) struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file we bound.
    file_id: (u64, u64),
    uid: u32,
    conns: Vec<Conn>,
    started: Instant,
    reloads: ReloadCounts,
}

impl ControlServer {
    /// Binds the control socket of the master `pid` at `location`, mode
    /// 0600, non-blocking. A socket file left by a dead master (nobody
    /// accepts on it) is replaced; a live one is `EADDRINUSE`.
    ///
    /// # Errors
    /// The path the socket was to be bound at, and why it could not be.
    pub(crate) fn bind(location: &ControlLocation, pid: u32) -> Result<Self, (PathBuf, io::Error)> {
        let path = match location {
            ControlLocation::Path(p) => p.clone(),
            ControlLocation::Default => default_path(pid),
        };
        Self::bind_path(location, &path).map_err(|e| (path, e))
    }

    fn bind_path(location: &ControlLocation, path: &Path) -> io::Result<Self> {
        if *location == ControlLocation::Default && runtime_dir().is_none() {
            ensure_private_dir(&private_tmp_dir())?;
        }
        let listener = match UnixListener::bind(path) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                let is_socket = fs::symlink_metadata(path)?.file_type().is_socket();
                match UnixStream::connect(path) {
                    Err(c) if is_socket && c.kind() == io::ErrorKind::ConnectionRefused => {
                        fs::remove_file(path)?;
                        UnixListener::bind(path)?
                    }
                    _ => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        let meta = fs::symlink_metadata(path)?;
        let server = Self {
            listener,
            path: path.to_path_buf(),
            file_id: (meta.dev(), meta.ino()),
            uid: sys::net::own_uid(),
            conns: Vec::new(),
            started: Instant::now(),
            reloads: ReloadCounts::default(),
        };
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
        server.listener.set_nonblocking(true)?;
        Ok(server)
    }

    /// The socket's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// What the master's `poll(2)` should watch: the listening socket
    /// first, then every connection.
    pub(crate) fn poll_fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = vec![self.listener.as_fd()];
        fds.extend(self.conns.iter().map(|c| c.stream.as_fd()));
        fds
    }

    /// Every descriptor it holds, for a forked child to close.
    pub(crate) fn raw_fds(&self) -> Vec<RawFd> {
        self.poll_fds().iter().map(|fd| fd.as_raw_fd()).collect()
    }

    /// When the loop must look again even if nothing is readable: a
    /// connection's deadline, or soon if a response is waiting for room.
    pub(crate) fn wake_at(&self) -> Option<Instant> {
        let soon = Instant::now() + Duration::from_millis(10);
        self.conns
            .iter()
            .filter_map(|c| {
                let unsent = c.output.as_ref().is_some_and(|(out, pos)| *pos < out.len());
                match (c.deadline, unsent) {
                    (Some(d), true) => Some(soon.min(d)),
                    (Some(d), false) => Some(d),
                    (None, true) => Some(soon),
                    (None, false) => None,
                }
            })
            .min()
    }

    /// Counts reloads from the master's events.
    pub(crate) fn observe(&mut self, event: &Event) {
        match event.kind {
            EventKind::ReloadStarted => self.reloads.started += 1,
            EventKind::ReloadFinished { ok } => {
                if ok {
                    self.reloads.ok += 1;
                } else {
                    self.reloads.failed += 1;
                }
                self.reloads.last_ok = Some(ok);
            }
            _ => {}
        }
    }

    /// Accepts new connections (if `listener_ready`) and moves every
    /// connection on as far as it can without blocking. Never waits.
    pub(crate) fn serve(&mut self, listener_ready: bool, cluster: &Cluster) {
        let now = Instant::now();
        if listener_ready {
            self.accept(now);
        }
        let started = self.started;
        let reloads = self.reloads;
        let mut waiters = self.conns.iter().filter(|c| c.waiting).count();
        let mut answer = |line: &[u8]| respond(line, cluster, started, reloads, &mut waiters);
        self.conns.retain_mut(|c| c.advance(now, &mut answer));
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
            // `wait` connections have their own bound (see `respond`).
            let requests = self.conns.iter().filter(|c| !c.waiting).count();
            if requests >= MAX_CONNECTIONS || stream.set_nonblocking(true).is_err() {
                continue; // closed on drop
            }
            let mut conn = Conn::new(stream, now + REQUEST_TIMEOUT);
            match sys::net::peer_uid(conn.stream.as_fd()) {
                Ok(uid) if peer_allowed(uid, self.uid) => {}
                Ok(uid) => {
                    let msg = format!(
                        "err permission denied: uid {uid} is not the master's uid {}\n",
                        self.uid
                    );
                    conn.output = Some((msg.into_bytes(), 0));
                }
                Err(_) => continue,
            }
            self.conns.push(conn);
        }
    }
}

impl ControlServer {
    /// At the master's exit: tells every client waiting on a `wait`
    /// connection how the cluster ended (one `exited ...` line, see the
    /// module docs), then closes the socket and removes its file. Clients
    /// too slow to take the line are given up: all of them together may
    /// hold the master's exit back by [`REQUEST_TIMEOUT`] at most.
    pub(crate) fn finish(mut self, report: &Report) {
        let line = format!(
            "exited code={} outcome={} restarts={} killed={} summary={}\n",
            report.exit_code(),
            report.outcome.as_str(),
            report.restarts,
            report.killed,
            escape(&report.to_string())
        );
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        for conn in self.conns.iter_mut().filter(|c| c.waiting) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // The rest of `ok waiting` if it is not all out yet, then the line.
            let mut bytes = conn
                .output
                .take()
                .map_or_else(Vec::new, |(out, pos)| out.get(pos..).unwrap_or_default().to_vec());
            bytes.extend_from_slice(line.as_bytes());
            if conn.stream.set_nonblocking(false).is_err()
                || conn.stream.set_write_timeout(Some(left)).is_err()
            {
                continue;
            }
            let mut pos = 0;
            while pos < bytes.len() {
                match sys::net::send_with_fd(conn.stream.as_fd(), &bytes[pos..], None) {
                    Ok(n) if n > 0 => pos += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    _ => break,
                }
            }
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        // Only our own socket file: not one a later master bound there.
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.file_id {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// The response to one request line; `reload` and `stop` act on `cluster`.
/// `waiters`: the `wait` connections held open, counted up by one taken
/// here.
fn respond(
    line: &[u8],
    cluster: &Cluster,
    started: Instant,
    reloads: ReloadCounts,
    waiters: &mut usize,
) -> Reply {
    let request = std::str::from_utf8(line).unwrap_or("").trim();
    if request == "wait" {
        if let Some(refused) = refuse_waiter(*waiters) {
            return Reply::close(refused);
        }
        *waiters += 1;
        return Reply {
            text: "ok waiting\n".into(),
            wait: true,
        };
    }
    Reply::close(answer(request, cluster, started, reloads))
}

/// The refusal of a `wait` when `waiters` connections already wait, if
/// that is the bound.
fn refuse_waiter(waiters: usize) -> Option<String> {
    (waiters >= MAX_WAITERS).then(|| {
        format!(
            "err too many clients waiting for the master to exit ({MAX_WAITERS}); \
             try again once one has gone, or stop without --wait\n"
        )
    })
}

/// The response to every request but `wait`.
fn answer(request: &str, cluster: &Cluster, started: Instant, reloads: ReloadCounts) -> String {
    let shutting_down = cluster.segment().control().shutdown.load(Acquire) != 0;
    match request {
        "ping" => format!("ok pong pid={} v={WIRE_VERSION}\n", sys::getpid()),
        "stat" => format_stats(&cluster.stats(), started.elapsed(), reloads),
        "reload" if shutting_down => "err the cluster is shutting down\n".into(),
        "reload" => {
            cluster.reload();
            format!(
                "ok reload queued reloads_started={} reloads_finished={}\n",
                reloads.started,
                reloads.ok + reloads.failed
            )
        }
        "stop" if shutting_down => "ok already shutting down\n".into(),
        "stop" => {
            cluster.shutdown();
            "ok shutdown started\n".into()
        }
        other => format!(
            "err unknown request {}: expected ping, stat, reload, stop or wait\n",
            escape(other)
        ),
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

fn micros(d: Option<Duration>) -> String {
    opt(d.map(|d| d.as_micros()))
}

/// The `stat` response (see the module docs).
fn format_stats(stats: &ClusterStats, uptime: Duration, reloads: ReloadCounts) -> String {
    let mut out = format!("ok stat v={WIRE_VERSION}\n");
    let last = match reloads.last_ok {
        None => "-",
        Some(true) => "ok",
        Some(false) => "failed",
    };
    let _ = writeln!(
        out,
        "master pid={} instances={} shutting_down={} uptime_ms={} reloads_started={} reloads_ok={} \
         reloads_failed={} last_reload={last}",
        stats.master_pid,
        stats.instances,
        u8::from(stats.shutting_down),
        uptime.as_millis(),
        reloads.started,
        reloads.ok,
        reloads.failed,
    );
    for s in &stats.slots {
        let _ = writeln!(
            out,
            "slot id={} index={} state={:?} pid={} gen={} restarts={} last_exit={} hb_age_us={} sent={} \
             sent_bytes={} received={} received_bytes={} inbox_bytes={} futex_waits={} futex_wakes={} \
             full_waits={} last_request_us={} last_map_us={}",
            s.slot,
            opt(s.index),
            s.state,
            s.pid,
            s.generation,
            s.restarts,
            opt(s.last_exit.map(|e| escape(&format!("{e:?}")))),
            micros(s.heartbeat_age),
            s.sent_messages,
            s.sent_bytes,
            s.received_messages,
            s.received_bytes,
            s.inbox_bytes,
            s.futex_waits,
            s.futex_wakes,
            s.full_waits,
            micros(s.last_request),
            micros(s.last_map),
        );
    }
    for l in &stats.locks {
        let _ = writeln!(
            out,
            "lock name={} holder_slot={} holder_pid={} held_us={} acquisitions={} waits={} owner_died={} \
             token={}",
            escape(&l.name),
            opt(l.holder.map(|h| h.0)),
            opt(l.holder.map(|h| h.1)),
            micros(l.held_for),
            l.acquisitions,
            l.waits,
            l.owner_died,
            l.token,
        );
    }
    out.push_str("end\n");
    out
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A client's end, and the master's [`Conn`] on the other, non-blocking.
    fn connected(deadline: Instant) -> (UnixStream, Conn) {
        let (client, server) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        (client, Conn::new(server, deadline))
    }

    #[test]
    fn only_the_masters_own_uid_is_answered() {
        assert!(peer_allowed(1000, 1000));
        assert!(!peer_allowed(1001, 1000), "another user");
        assert!(!peer_allowed(0, 1000), "root is not special");
        assert!(!peer_allowed(1000, 0), "a root master answers root only");
        let me = sys::net::own_uid();
        assert!(peer_allowed(me, me));
        assert!(!peer_allowed(me.wrapping_add(1), me), "a fake uid is refused");
    }

    #[test]
    fn escape_keeps_fields_whole() {
        assert_eq!(escape("counter"), "counter");
        assert_eq!(escape(""), "");
        assert_eq!(escape("a b=c\n%"), "a%20b%3Dc%0A%25");
        assert_eq!(escape("Exited(0)"), "Exited%280%29");
    }

    #[test]
    fn the_default_path_is_per_pid() {
        let p = default_path(4242);
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name == "shmcluster-4242.sock" || name == "4242.sock", "{p:?}");
        assert!(p.is_absolute());
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("shmcluster-control-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).unwrap();
        dir
    }

    #[test]
    fn a_private_dir_is_created_0700_and_a_shared_one_refused() {
        let dir = temp_dir("private");
        let private = dir.join("p");
        ensure_private_dir(&private).unwrap();
        assert_eq!(fs::metadata(&private).unwrap().mode() & 0o777, 0o700);
        ensure_private_dir(&private).unwrap();
        let shared = dir.join("s");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
        let err = ensure_private_dir(&shared).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_socket_is_0600_replaces_a_stale_file_and_is_removed_on_drop() {
        let dir = temp_dir("bind");
        let path = dir.join("c.sock");
        let location = ControlLocation::Path(path.clone());
        let server = ControlServer::bind(&location, 1).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        // A live master's socket is not taken over.
        let (p, e) = ControlServer::bind(&location, 1).err().unwrap();
        assert_eq!((p, e.kind()), (path.clone(), io::ErrorKind::AddrInUse));
        // A dead master's socket file is.
        let stale = UnixListener::bind(dir.join("stale.sock")).unwrap();
        drop(stale);
        let again = ControlServer::bind(&ControlLocation::Path(dir.join("stale.sock")), 1).unwrap();
        drop(again);
        assert!(!dir.join("stale.sock").exists());
        drop(server);
        assert!(!path.exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_connection_is_answered_once_and_a_long_request_refused() {
        let now = Instant::now();
        let (mut client, mut conn) = connected(now + REQUEST_TIMEOUT);
        let mut seen = Vec::new();
        let mut answer = |line: &[u8]| {
            seen.push(line.to_vec());
            Reply::close("ok\n".to_string())
        };
        assert!(conn.advance(now, &mut answer), "nothing sent yet");
        client.write_all(b"pi").unwrap();
        assert!(conn.advance(now, &mut answer), "half a line");
        client.write_all(b"ng\nextra").unwrap();
        assert!(!conn.advance(now, &mut answer), "answered: close");
        let mut got = String::new();
        drop(conn);
        client.read_to_string(&mut got).unwrap();
        assert_eq!(got, "ok\n");
        assert_eq!(seen, vec![b"ping".to_vec()]);

        let (mut client, mut conn) = connected(now + REQUEST_TIMEOUT);
        client.write_all(&[b'x'; MAX_REQUEST + 10]).unwrap();
        assert!(!conn.advance(now, &mut |_| unreachable!()));
        drop(conn);
        let mut got = String::new();
        client.read_to_string(&mut got).unwrap();
        assert!(got.starts_with("err request longer"), "{got}");

        // A silent client is dropped at its deadline.
        let (_client, mut conn) = connected(now);
        assert!(!conn.advance(now, &mut |_| unreachable!()));
    }

    #[test]
    fn a_wait_connection_stays_open_and_a_hang_up_frees_it() {
        let now = Instant::now();
        let (mut client, mut conn) = connected(now + REQUEST_TIMEOUT);
        client.write_all(b"wait\n").unwrap();
        let mut answer = |_: &[u8]| Reply {
            text: "ok waiting\n".into(),
            wait: true,
        };
        assert!(conn.advance(now, &mut answer), "answered, and kept open");
        assert!(conn.waiting && conn.deadline.is_none());
        let later = now + 10 * REQUEST_TIMEOUT;
        assert!(conn.advance(later, &mut answer), "no deadline while waiting");
        let mut got = [0u8; 11];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ok waiting\n");
        drop(client);
        assert!(!conn.advance(later, &mut answer), "the client hung up");
    }
}
