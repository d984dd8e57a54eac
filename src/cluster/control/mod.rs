//! The master's control socket: how `shmcluster stat`, `reload` and `stop`
//! reach a running master.
//!
//! A unix stream socket bound by the master (file mode 0600, removed when
//! the master ends), served inside its supervision loop: non-blocking, at
//! most [`codec::MAX_REQUEST`] bytes a request, [`REQUEST_TIMEOUT`] to
//! send it, and only to peers with the master's own user id
//! (`SO_PEERCRED`, checked by [`peer_allowed`]). Others get one `err` line and the connection is
//! closed.
//!
//! # Protocol
//! One request line, one response, then the master closes the connection.
//! Requests: `ping`, `stat`, `reload` (a rolling reload, as `SIGHUP`),
//! `reload worker=<instance>` (that instance alone replaced the same way:
//! `err no worker <n>: ...` if the cluster has no such instance),
//! `stop` (a graceful shutdown, as `SIGTERM`), `upgrade` (a binary
//! upgrade, as `SIGUSR2`; see below), `wait`, `events` (see below).
//! Every response starts with `ok ...` or `err <message>`.
//!
//! `upgrade` is answered `ok upgrade started pid=<new master>` (or `err
//! <why not>`), and the connection is then held open (as a `wait` one,
//! and counted with them) until the upgrade ends: the master writes
//! `upgraded pid=<new>` once the new master is ready (it then drains and
//! exits), or `err upgrade failed: <reason>` (it keeps serving), and
//! closes it. A client that does not wait simply hangs up. While the new
//! master starts, the old one goes on answering every client (a `stop`
//! abandons the upgrade: `err upgrade failed: stopped ...`): the new one,
//! which shares the listening socket, accepts only once it is ready, and
//! the old one no more after the hand-over. In between (the old master
//! confirms the new one for 500 ms) either may answer; a `stop` the new
//! one answers stops the old one too (`err upgrade failed: stopped (the
//! new master was asked to stop ...)`).
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
//! exited code=1 outcome=unclean restarts=14 killed=0 upgraded_to=- summary=unclean%20shutdown%3A%20...
//! ```
//!
//! `upgraded_to` is the new master's pid when the master ended by handing
//! over to it in a binary upgrade (its summary then begins `upgraded: new
//! master pid N took over`), `-` otherwise.
//!
//! The connection itself is the robust part: a master that is killed
//! (`SIGKILL`) writes nothing, but the kernel still closes its end, so a
//! waiting client sees end-of-file without an `exited` line instead of
//! waiting forever; and nothing is left on disk to be read by mistake
//! after a later master reuses the pid. `stat` answers with lines of
//! space-separated `key=value` fields (values escaped as in
//! [`codec::escape`];
//! `-` for none), ended by `end`:
//!
//! ```text
//! ok stat v=1
//! master pid=4242 instances=2 shutting_down=0 uptime_ms=5120 reloads_started=1 reloads_ok=1 reloads_failed=0 last_reload=ok events_next=12 upgraded_from=-
//! slot id=0 index=0 state=Ready pid=4243 gen=1 restarts=0 last_exit=- hb_age_us=812 sent=10 sent_bytes=640 received=10 received_bytes=640 inbox_bytes=0 futex_waits=3 futex_wakes=2 full_waits=0
//! lock name= holder_slot=- holder_pid=- held_us=- acquisitions=0 waits=0 owner_died=0 token=0
//! end
//! ```
//!
//! `events_next` is the number the next event will get (see `events`);
//! `upgraded_from` the pid of the master this one took over from in a
//! binary upgrade (`-`: it was started as itself), so that a client that
//! watched the old master finds this one once the old has gone.
//!
//! The host's NATS bridge's row (feature `nats`) ends with one more
//! field, `role=bridge`; no other row has it (a client that does not know
//! it still reads the row).
//!
//! Counters are totals since the master started (over every generation of
//! a slot): a client computes rates from two snapshots.
//!
//! `events since=<seq>` (`events` alone: since 0) answers the recent
//! events of the cluster numbered `seq` and later, oldest first, from
//! the segment's event log (a ring of the last 256): at most
//! [`codec::MAX_EVENTS`] (64) of them, the newest if more are there. Each
//! has its number; `next` is the number the next event will get, what a
//! client asks `since` next time to get only new ones; `stat`'s
//! `events_next` is the same number, so a client polling both (as
//! `shmcluster top` does) asks for events only when it moved. `kind` is one of `spawned`, `online`, `exited` (code 0, or
//! replaced by a reload, or shut down), `crashed` (any other end),
//! `crash-loop`, `reload-started`, `reload-finished`, `reload-failed`,
//! `shutdown-started`, `lock-held-too-long`, `start-failed`,
//! `upgrade-started`, `upgrade-finished`, `upgrade-failed`; `text` is the
//! line the master logs for it:
//!
//! ```text
//! ok events next=9 count=2
//! event seq=7 kind=crashed slot=1 index=1 pid=4243 gen=1 text=worker%201%20ended:%20killed%20by%20signal%209%20...
//! event seq=8 kind=spawned slot=1 index=1 pid=4250 gen=2 text=worker%201%20spawned%20...
//! end
//! ```
//!
//! # Who does what
//! [`codec`] is the line format, without I/O; [`conn`] one connection's
//! reads and writes; [`ControlServer`] the socket and its connections. The
//! server answers on its own what needs no master (`wait`, and refusals);
//! it hands every other request to the master as a [`ControlRequest`]
//! from [`ControlServer::serve`], and encodes the [`ControlAnswer`] the
//! master gives back to [`ControlServer::answer`]. This module never
//! touches the cluster.

pub mod codec;
mod conn;

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub(crate) use codec::{ControlAnswer, ControlRequest};
use codec::{ReloadCounts, Request};
use conn::{Conn, Reply};

use super::{Event, EventKind, Report};
use crate::sys;

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

/// One connection of a [`ControlServer`], for the master's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnId(u64);

/// The master's end: the listening socket and the connections being
/// served. Dropping it removes the socket file (if it is still ours).
pub(crate) struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file we bound.
    file_id: (u64, u64),
    uid: u32,
    conns: Vec<(ConnId, Conn)>,
    /// The id the next connection gets.
    next_id: u64,
    /// When the last [`ControlServer::serve`] pass began: the time its
    /// answers are written at, so that a request read within its
    /// connection's deadline is answered too.
    pass_at: Instant,
    started: Instant,
    reloads: ReloadCounts,
    /// Whether new connections are accepted: not in a binary upgrade's
    /// new master before it is ready (the old master, which shares the
    /// listening socket, is in charge until then), nor in the old master
    /// after the hand-over.
    accepting: bool,
    /// Whether the socket file is this server's to remove when dropped:
    /// not once handed to a new master, nor, in a new master, before the
    /// old one is gone ([`ControlServer::take_file`]).
    owns_file: bool,
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
        let server = Self::serving(listener, path.to_path_buf(), (meta.dev(), meta.ino()), true);
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
        server.listener.set_nonblocking(true)?;
        Ok(server)
    }

    /// A binary upgrade's new master: serves the listening socket `fd`
    /// its old master handed over, whose file is at `path`. It does not
    /// accept until [`ControlServer::set_accepting`] (the old master
    /// answers until the new one is ready). The file is not its to remove
    /// (the old master still serves the socket) until
    /// [`ControlServer::take_file`].
    ///
    /// # Errors
    /// If `fd` cannot be made non-blocking (it is not a socket).
    pub(crate) fn adopt(fd: std::os::fd::OwnedFd, path: PathBuf) -> io::Result<Self> {
        let listener = UnixListener::from(fd);
        listener.set_nonblocking(true)?;
        let file_id = fs::symlink_metadata(&path).map_or((0, 0), |m| (m.dev(), m.ino()));
        Ok(Self::serving(listener, path, file_id, false))
    }

    /// A server on `listener` with no connection yet; `own`: accepting at
    /// once and owning the socket file (a master that bound it), or
    /// neither (one that took it over in a binary upgrade).
    fn serving(listener: UnixListener, path: PathBuf, file_id: (u64, u64), own: bool) -> Self {
        Self {
            listener,
            path,
            file_id,
            uid: sys::net::own_uid(),
            conns: Vec::new(),
            next_id: 0,
            pass_at: Instant::now(),
            started: Instant::now(),
            reloads: ReloadCounts::default(),
            accepting: own,
            owns_file: own,
        }
    }

    /// The socket's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The listening socket, to hand to a new master.
    pub(crate) fn listener_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// Stops (`false`) or resumes accepting connections; those open are
    /// served either way.
    pub(crate) fn set_accepting(&mut self, yes: bool) {
        self.accepting = yes;
    }

    /// Whether it accepts connections: the master passes the listening
    /// socket's readiness to [`ControlServer::serve`] only then.
    pub(crate) fn accepting(&self) -> bool {
        self.accepting
    }

    /// The socket was handed to a new master that is ready: accept no
    /// more, and leave its file to the new master.
    pub(crate) fn hand_over(&mut self) {
        self.accepting = false;
        self.owns_file = false;
    }

    /// In a new master once its old one is gone: the socket file is now
    /// its own, renamed to `to` if given (`rename(2)`: clients that
    /// connect by the new name reach the same socket).
    ///
    /// # Errors
    /// If the rename fails (the file stays where it is, still this
    /// server's).
    pub(crate) fn take_file(&mut self, to: Option<&Path>) -> io::Result<()> {
        self.owns_file = true;
        if let Some(to) = to.filter(|to| *to != self.path) {
            fs::rename(&self.path, to)?;
            self.path = to.to_path_buf();
        }
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            self.file_id = (meta.dev(), meta.ino());
        }
        Ok(())
    }

    /// What the master's `poll(2)` should watch: the listening socket
    /// first if it [`accepts`](ControlServer::accepting), then every
    /// connection.
    pub(crate) fn poll_fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = Vec::new();
        if self.accepting {
            fds.push(self.listener.as_fd());
        }
        fds.extend(self.conns.iter().map(|(_, c)| c.stream.as_fd()));
        fds
    }

    /// Every descriptor it holds, for a forked child to close.
    pub(crate) fn raw_fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.listener.as_raw_fd()];
        fds.extend(self.conns.iter().map(|(_, c)| c.stream.as_raw_fd()));
        fds
    }

    /// The binary upgrade ended: each `upgrade` connection is sent `line`
    /// ([`codec::upgrade_line`]) and closed.
    pub(crate) fn upgrade_finished(&mut self, line: &str) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.conns.len() {
            let c = &mut self.conns[i].1;
            if !c.upgrade {
                i += 1;
                continue;
            }
            c.append(line);
            c.upgrade = false;
            c.waiting = false;
            c.deadline = Some(now + REQUEST_TIMEOUT);
            if c.advance(now, &mut |_| Reply::Close(String::new())) {
                i += 1;
            } else {
                self.conns.remove(i);
            }
        }
    }

    /// When the loop must look again even if nothing is readable: a
    /// connection's deadline, or soon if a response is waiting for room.
    pub(crate) fn wake_at(&self) -> Option<Instant> {
        let soon = Instant::now() + Duration::from_millis(10);
        self.conns
            .iter()
            .filter_map(|(_, c)| {
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
    ///
    /// Returns the requests only the master can answer, each with its
    /// connection: the master carries each out and hands the answer to
    /// [`ControlServer::answer`] (until then the connection waits, within
    /// its deadline).
    pub(crate) fn serve(&mut self, listener_ready: bool) -> Vec<(ConnId, ControlRequest)> {
        let now = Instant::now();
        self.pass_at = now;
        if listener_ready && self.accepting {
            self.accept(now);
        }
        // `wait` connections have a bound of their own.
        let mut waiters = self.conns.iter().filter(|(_, c)| c.waiting).count();
        let mut reply = |line: &[u8]| match codec::parse_request(line) {
            Err(refused) => Reply::Close(refused),
            Ok(Request::Master(request)) => Reply::Ask(request),
            Ok(Request::Wait) if waiters >= MAX_WAITERS => Reply::Close(codec::too_many_waiters(MAX_WAITERS)),
            Ok(Request::Wait) => {
                waiters += 1;
                Reply::Wait(codec::WAITING.into())
            }
        };
        self.conns.retain_mut(|(_, c)| c.advance(now, &mut reply));
        self.conns
            .iter()
            .filter_map(|(id, c)| c.asking.map(|request| (*id, request)))
            .collect()
    }

    /// The master's `answer` to the request [`ControlServer::serve`]
    /// returned with `conn`: encoded and written as far as the socket
    /// allows (the rest on later passes). A connection closed meanwhile is
    /// not an error.
    pub(crate) fn answer(&mut self, conn: ConnId, answer: &ControlAnswer) {
        let Some(at) = self.conns.iter().position(|(id, _)| *id == conn) else {
            return;
        };
        let text = codec::encode_answer(answer, self.started.elapsed(), self.reloads);
        let c = &mut self.conns[at].1;
        c.answer(text);
        if matches!(answer, ControlAnswer::UpgradeStarted { .. }) {
            // Held open until the upgrade ends (`upgrade_finished`).
            c.upgrade = true;
            c.waiting = true;
            c.deadline = None;
        }
        // Answered: the connection asks for nothing more.
        if !c.advance(self.pass_at, &mut |_| Reply::Close(String::new())) {
            self.conns.remove(at);
        }
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
            // `wait` connections have their own bound (see `serve`).
            let requests = self.conns.iter().filter(|(_, c)| !c.waiting).count();
            if requests >= MAX_CONNECTIONS || stream.set_nonblocking(true).is_err() {
                continue; // closed on drop
            }
            let mut conn = Conn::new(stream, now + REQUEST_TIMEOUT);
            match sys::net::peer_uid(conn.stream.as_fd()) {
                Ok(uid) if peer_allowed(uid, self.uid) => {}
                Ok(uid) => conn.answer(codec::permission_denied(uid, self.uid)),
                Err(_) => continue,
            }
            let id = ConnId(self.next_id);
            self.next_id += 1;
            self.conns.push((id, conn));
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
        let line = codec::exited_line(report);
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        for (_, conn) in self.conns.iter_mut().filter(|(_, c)| c.waiting) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // The rest of `ok waiting` if it is not all out yet, then the line.
            conn.append(&line);
            let Some((bytes, _)) = conn.output.take() else {
                continue;
            };
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
        // Only our own socket file: not one a later master bound there,
        // nor one handed to a new master.
        if !self.owns_file {
            return;
        }
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.file_id {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Serves `server` until `client` has its whole response (the master's
    /// answers given by `execute`); returns the response.
    fn exchange(
        server: &mut ControlServer,
        request: &str,
        mut execute: impl FnMut(ControlRequest) -> ControlAnswer,
    ) -> String {
        use std::io::{Read, Write};
        let mut client = UnixStream::connect(server.path()).unwrap();
        client.write_all(request.as_bytes()).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        client.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        loop {
            for (conn, request) in server.serve(true) {
                server.answer(conn, &execute(request));
            }
            let mut buf = [0u8; 256];
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

    /// The server hands the master only what the master must answer, as a
    /// value, and writes back the answer it is given.
    #[test]
    fn requests_go_to_the_master_as_values_and_answers_come_back() {
        let dir = temp_dir("serve");
        let mut server = ControlServer::bind(&ControlLocation::Path(dir.join("c.sock")), 1).unwrap();
        let mut asked = Vec::new();
        let got = exchange(&mut server, "stop\n", |r| {
            asked.push(r);
            ControlAnswer::ShutdownStarted
        });
        assert_eq!(got, "ok shutdown started\n");
        let got = exchange(&mut server, "ping\n", |r| {
            asked.push(r);
            ControlAnswer::Pong { pid: 42 }
        });
        assert!(got.starts_with("ok pong pid=42 "), "{got}");
        let got = exchange(&mut server, "bogus\n", |_| unreachable!("the server refuses it"));
        assert!(got.starts_with("err unknown request bogus"), "{got}");
        assert_eq!(asked, [ControlRequest::Stop, ControlRequest::Ping]);
        drop(server);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// An `upgrade` connection gets the started line at once, stays open,
    /// and gets the end line when the upgrade ends; a handed-over
    /// server leaves its file for the new master.
    #[test]
    fn an_upgrade_connection_is_told_how_the_upgrade_ended() {
        use std::io::{BufRead, BufReader, Write};
        let dir = temp_dir("upgrade");
        let path = dir.join("c.sock");
        let mut server = ControlServer::bind(&ControlLocation::Path(path.clone()), 1).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"upgrade\n").unwrap();
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut reader = BufReader::new(client.try_clone().unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut asked = false;
        while !asked {
            for (conn, request) in server.serve(true) {
                assert_eq!(request, ControlRequest::Upgrade);
                server.answer(conn, &ControlAnswer::UpgradeStarted { pid: 99 });
                asked = true;
            }
            assert!(Instant::now() < deadline, "never asked");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, "ok upgrade started pid=99\n");
        // Held open past the request timeout; not accepting meanwhile.
        server.set_accepting(false);
        assert_eq!(
            server.poll_fds().len(),
            1,
            "the connection only, not the listener"
        );
        let later = Instant::now() + 2 * REQUEST_TIMEOUT;
        assert!(server.serve(true).is_empty());
        assert!(server
            .conns
            .iter()
            .all(|(_, c)| c.deadline.is_none() || c.deadline > Some(later)));
        server.upgrade_finished(&codec::upgrade_line(99, None));
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, "upgraded pid=99\n");
        line.clear();
        assert_eq!(
            reader.read_line(&mut line).unwrap(),
            0,
            "closed after the end line"
        );
        assert!(server.conns.is_empty());
        server.hand_over();
        drop(server);
        assert!(
            path.exists(),
            "a handed-over socket file stays for the new master"
        );
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
}
