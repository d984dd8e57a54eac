//! Binary upgrade without a dropped request (nginx's `SIGUSR2`,
//! unicorn's `USR2`): a fork-mode reload re-forks the same image, so new
//! code is only loaded by executing the program again.
//!
//! # The hand-over, step by step
//!
//! 1. On `SIGUSR2` or the control request `upgrade`, the **old master**
//!    forks a child that executes the master's program as it is now on
//!    disk: the path it was started by, recorded at start-up with its
//!    symlinks (`argv[0]`, made absolute against the start-up directory,
//!    or found in `PATH`; see [`Program`]), so that a replace-by-rename
//!    and a switched `current -> releases/N` symlink both get the new
//!    build (`/proc/self/exe` names the old inode). It has the same
//!    arguments and environment and starts in the start-up directory if
//!    that still exists (else in the old master's, which may be a deleted
//!    release directory), plus:
//!    - its listening sockets as `LISTEN_FDS`/`LISTEN_FDNAMES` from fd 3
//!      (every inherited listener's sockets, a `ReusePort` listener's one
//!      per instance under one name; then the sockets bound on workers'
//!      requests, named by address: `Listeners::handover`);
//!    - [`MARKER`], which names the rest: the old master's pid, the write
//!      end of a pipe for the new master's word (`ready`, `stopping`),
//!      the control socket's listening socket and its path, the metrics
//!      endpoint's listening socket, whether the sockets came from
//!      systemd.
//!
//!    Only those descriptors lose `FD_CLOEXEC`, in the child between fork
//!    and exec (`dup2` into place); every other descriptor of the master
//!    is close-on-exec. Everything the child does is planned before the
//!    fork ([`sys::exec::ExecPlan`]): it makes only async-signal-safe
//!    calls, as a child of a master whose user code may run threads must.
//!    The old master goes on accepting on the control socket and serving
//!    its metrics endpoint until the hand-over: it is the one in charge
//!    until then (a `stop` it gets abandons the upgrade: the new master is
//!    told to stop with `SIGTERM`, since its workers may already serve —
//!    they accept as soon as they start —, and the old one shuts down as
//!    usual, waiting for the new master too until its deadline, when it
//!    kills it).
//! 2. The **new master** (the program's `main` runs again; the builder
//!    finds [`MARKER`]) adopts the sockets instead of binding
//!    (`Listeners::adopt`: matched to its own, possibly changed,
//!    configuration by name and address), creates its own segment and
//!    starts its own workers. It accepts no control client and no
//!    metrics scrape (the sockets are shared: the old master answers
//!    them) and says nothing to systemd until, once every instance has a
//!    ready worker, it writes `ready pid=<pid>` on the pipe; from then on
//!    it accepts on both sockets (and, under systemd, says `MAINPID=<pid>`
//!    and `READY=1`). A master shutting down never says `ready`: it says
//!    `err` instead. It keeps the pipe open after `ready` until the old
//!    master is gone: if it is asked to shut down while the old master is
//!    still there (`SIGTERM`, `SIGINT`, a `stop` the kernel handed to it
//!    on the shared control socket, [`Cluster::shutdown`], a worker's
//!    request; not the give-up after crash loops, which is a failure), it
//!    writes `stopping` on it, so that the stop reaches the whole service
//!    (point 4). The write raises no `SIGPIPE`: an old master that has
//!    handed over already no longer reads the pipe, and stops anyway.
//! 3. The old master then confirms: the new master must still run
//!    [`CONFIRM`] after its `ready` (one that said it and died is a
//!    failure; one that said `stopping` is point 4's). It then hands
//!    over: it tells `upgrade` clients
//!    `upgraded pid=<new>`, tells systemd `MAINPID=<new>` and nothing
//!    more, accepts no more control clients, closes its metrics endpoint,
//!    and shuts down as on `SIGTERM` (its workers stop accepting and
//!    finish the requests in flight), without removing the socket files
//!    it handed over. It exits 0; its [`Report`](super::Report) and the
//!    `exited` line to `wait` clients name the new master
//!    (`upgraded_to`).
//! 4. If the pipe says `stopping` after `ready` (before the hand-over,
//!    or as the old master begins a shutdown of its own, as when a
//!    service manager signals both), the new master was asked to stop
//!    while in charge: the old master stops too. It leaves the new master
//!    to its own shutdown (not killed: its workers finish their
//!    requests), tells `upgrade` clients `err upgrade failed: stopped
//!    (...)`, reports it (an `UpgradeFinished { ok: false }` event, a
//!    stderr line) and shuts down as on `SIGTERM`, removing the socket
//!    files as usual (the new master, which said `stopping`, does not
//!    take them). Under systemd it does not claim `MAINPID=` back: the
//!    new master, which said `MAINPID=<new>` with its `READY=1`, stays
//!    the main process, and each says `STOPPING=1`. It exits 0 after a
//!    clean drain; its [`Report`](super::Report) is a plain shutdown
//!    (`upgraded_to` is `None`, the `exited` line says `upgraded_to=-`).
//!
//!    If instead the pipe says `err <reason>` (the new master could not
//!    start), says anything else (also a second line after `ready` other
//!    than `stopping`, or more than 4096 bytes), closes without `ready`
//!    (it exited, or could not execute), the new master is reaped (even
//!    after `ready`, unless it said `stopping`), or it is not ready
//!    within the ready timeout, the old master kills it (`SIGKILL`; its
//!    workers die with it: they are its children, with
//!    `PR_SET_PDEATHSIG`), reports the failure (event, stderr, `err
//!    upgrade failed: <reason>` to `upgrade` clients) and keeps serving.
//! 5. The new master's parent is the old master; once that is gone (its
//!    parent pid changes), it closes the pipe and owns the socket files
//!    (unless it said `stopping`: the old master removed them): the
//!    control socket's file is renamed from the old master's default path
//!    to its own if both were the default, so `--pid <new>` finds it.
//!
//! [`Cluster::shutdown`]: crate::cluster::Cluster::shutdown
//!
//! # What two generations of masters do not share
//!
//! During the overlap the old and the new workers are two clusters: each
//! master has its own segment, so messages, broadcasts, maps, consumes,
//! `synchronize` locks and leader election are per generation. A
//! broadcast from an old worker does not reach a new one, and a lock held
//! by an old worker does not exclude a new one. Only the listening
//! sockets are shared. Applications that need mutual exclusion across the
//! hand-over must take it outside the cluster (a file lock, the database).

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::Master;
use crate::cluster::control::codec::{escape, unescape, upgrade_line};
use crate::cluster::control::ControlAnswer;
use crate::cluster::listen;
use crate::cluster::EventKind;
use crate::sys;
use crate::sys::process as proc;
use crate::sys::signal;

/// The environment variable that tells a new master it was started by a
/// binary upgrade, and what it inherits (see [`Marker`]).
pub(super) const MARKER: &str = "SHMCLUSTER_UPGRADE";

/// The most the new master writes on the pipe, its lines together.
const MAX_LINE: usize = 4096;

/// [`MARKER`]'s value: `v=1 old=<pid> ready=<fd> listeners=<n>
/// control=<fd>|- control_path=<escaped>|- metrics=<fd>|- systemd=0|1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Marker {
    /// The old master's pid.
    pub(super) old_pid: u32,
    /// The pipe's write end: `ready pid=<pid>` (then possibly
    /// `stopping`) or `err <reason>`.
    pub(super) ready: RawFd,
    /// How many of the `LISTEN_FDS` are the old master's inherited
    /// listeners (the rest: sockets bound on workers' requests).
    pub(super) listeners: usize,
    /// The control socket's listening socket and its file's path.
    pub(super) control: Option<(RawFd, PathBuf)>,
    /// The metrics endpoint's listening socket.
    pub(super) metrics: Option<RawFd>,
    /// The old master's listeners came from systemd's socket activation.
    pub(super) systemd: bool,
}

impl Marker {
    /// The variable's value.
    pub(super) fn encode(&self) -> String {
        let (control, path) = match &self.control {
            Some((fd, path)) => (fd.to_string(), escape(&path.to_string_lossy())),
            None => ("-".into(), "-".into()),
        };
        format!(
            "v=1 old={} ready={} listeners={} control={control} control_path={path} metrics={} systemd={}",
            self.old_pid,
            self.ready,
            self.listeners,
            self.metrics.map_or_else(|| "-".into(), |fd| fd.to_string()),
            u8::from(self.systemd)
        )
    }

    /// Parses the variable's value; every field must be there and well
    /// formed, and the descriptors at least 3.
    pub(super) fn parse(value: &str) -> Result<Self, String> {
        let mut fields = std::collections::HashMap::new();
        for field in value.split_whitespace() {
            let (k, v) = field
                .split_once('=')
                .ok_or_else(|| format!("{MARKER}: {field:?} is not key=value"))?;
            fields.insert(k, v);
        }
        let get = |k: &str| fields.get(k).copied().ok_or_else(|| format!("{MARKER}: no {k}="));
        if get("v")? != "1" {
            return Err(format!("{MARKER}: unknown version {:?}", get("v")?));
        }
        let num = |k: &str| -> Result<u64, String> {
            get(k)?
                .parse::<u64>()
                .map_err(|_| format!("{MARKER}: {k}={:?} is not a number", get(k).unwrap_or_default()))
        };
        let fd = |k: &str| -> Result<Option<RawFd>, String> {
            match get(k)? {
                "-" => Ok(None),
                v => match v.parse::<RawFd>() {
                    Ok(fd) if fd >= 3 => Ok(Some(fd)),
                    _ => Err(format!("{MARKER}: {k}={v:?} is not a descriptor number")),
                },
            }
        };
        let old_pid = u32::try_from(num("old")?).map_err(|_| format!("{MARKER}: old= out of range"))?;
        let ready = fd("ready")?.ok_or_else(|| format!("{MARKER}: ready=- (a pipe is needed)"))?;
        let listeners =
            usize::try_from(num("listeners")?).map_err(|_| format!("{MARKER}: listeners= too large"))?;
        let control = match (fd("control")?, get("control_path")?) {
            (Some(fd), path) if path != "-" => Some((fd, PathBuf::from(unescape(path)))),
            (None, _) => None,
            (Some(_), _) => return Err(format!("{MARKER}: control= without control_path=")),
        };
        let metrics = fd("metrics")?;
        let systemd = match get("systemd")? {
            "0" => false,
            "1" => true,
            v => return Err(format!("{MARKER}: systemd={v:?} is not 0 or 1")),
        };
        Ok(Self {
            old_pid,
            ready,
            listeners,
            control,
            metrics,
            systemd,
        })
    }
}

/// What a new master takes over, from [`MARKER`] and `LISTEN_FDS`.
pub(super) struct Handed {
    /// The old master's pid.
    pub(super) old_pid: u32,
    /// The pipe to the old master: `ready pid=...` (then possibly
    /// `stopping`) or `err ...`.
    pub(super) ready: Option<OwnedFd>,
    /// The listening sockets in `LISTEN_FDS` order, with their names.
    pub(super) listeners: Vec<(String, OwnedFd)>,
    /// How many of `listeners` are the old master's inherited ones.
    pub(super) inherited: usize,
    /// They came from systemd's socket activation.
    pub(super) systemd: bool,
    /// The control socket's listening socket and its file's path.
    pub(super) control: Option<(OwnedFd, PathBuf)>,
    /// The metrics endpoint's listening socket.
    pub(super) metrics: Option<OwnedFd>,
}

/// Takes ownership of the inherited descriptor `raw`, close-on-exec.
fn adopt(raw: RawFd, what: &str) -> Result<OwnedFd, String> {
    // SAFETY: `raw` was named by the old master in MARKER for this process
    // alone, and nothing else in this process claims it: `take_from_env`
    // runs once (it removes the variable) and checks the numbers are
    // distinct and above the LISTEN_FDS range.
    let fd = unsafe { sys::adopt_fd(raw) }.map_err(|e| format!("{what} descriptor {raw}: {e}"))?;
    sys::fd::set_cloexec(fd.as_fd(), true).map_err(|e| format!("{what} descriptor {raw}: {e}"))?;
    Ok(fd)
}

impl Handed {
    /// In a master as it starts: what its old master handed it, if it was
    /// started by a binary upgrade (`None` otherwise). [`MARKER`] and the
    /// `LISTEN_*` variables are removed from the environment.
    ///
    /// Changing the environment is only sound while no other thread reads
    /// it: the master checks it is single-threaded first.
    ///
    /// # Errors
    /// A malformed [`MARKER`], or a descriptor it names that is not open.
    pub(super) fn take_from_env() -> Result<Option<Self>, String> {
        let Some(value) = std::env::var_os(MARKER) else {
            return Ok(None);
        };
        std::env::remove_var(MARKER);
        let marker = Marker::parse(&value.to_string_lossy())?;
        let listeners: Vec<(String, OwnedFd)> = listen::inherited_listeners()
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|l| (l.name().to_owned(), l.into_fd()))
            .collect();
        let after = 3 + listeners.len() as RawFd;
        let mut numbers = vec![marker.ready];
        numbers.extend(marker.control.as_ref().map(|(fd, _)| *fd));
        numbers.extend(marker.metrics);
        for (i, n) in numbers.iter().enumerate() {
            if *n < after || numbers[..i].contains(n) {
                return Err(format!("{MARKER}: descriptor {n} overlaps another handed one"));
            }
        }
        // Not the pipe (the program closed or reused its low descriptors
        // before it got here): leave that descriptor alone.
        if !sys::fd::is_fifo_raw(marker.ready) {
            return Err(format!(
                "{MARKER}: descriptor {} is not the ready pipe",
                marker.ready
            ));
        }
        let ready = adopt(marker.ready, "ready pipe")?;
        let control = match marker.control {
            Some((fd, path)) => Some((adopt(fd, "control socket")?, path)),
            None => None,
        };
        let metrics = match marker.metrics {
            Some(fd) => Some(adopt(fd, "metrics socket")?),
            None => None,
        };
        Ok(Some(Self {
            old_pid: marker.old_pid,
            ready: Some(ready),
            inherited: marker.listeners.min(listeners.len()),
            listeners,
            systemd: marker.systemd,
            control,
            metrics,
        }))
    }
}

/// Says `err <reason>` on the pipe to the old master (the new master
/// could not start).
///
/// Without `SIGPIPE`: an old master that abandoned the upgrade has closed
/// its end, and a host program that does not ignore `SIGPIPE` would die
/// of it, and its workers with it (instead of draining).
pub(super) fn report_error(ready: &OwnedFd, reason: &str) {
    let mut line = format!("err {}", reason.replace('\n', " "));
    // One atomic write (PIPE_BUF): the old master reads at most that.
    truncate_at_char(&mut line, MAX_LINE - 1);
    line.push('\n');
    let _ = signal::write_pipe_without_sigpipe(ready.as_fd(), line.as_bytes());
}

/// Cuts `s` to at most `max` bytes, at a character boundary.
fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// A master that will not start before it took anything over (a bad
/// command line, threads): if it was started by a binary upgrade, says
/// `err <reason>` on the pipe [`MARKER`] names, so that the old master
/// reports why. The environment is only read.
pub(super) fn report_unstarted(reason: &str) {
    let Some(value) = std::env::var_os(MARKER) else {
        return;
    };
    if let Ok(marker) = Marker::parse(&value.to_string_lossy()) {
        let line = format!("err {}\n", reason.replace('\n', " "));
        sys::fd::write_to_inherited(marker.ready, line.as_bytes());
    }
}

/// The program to execute again, its arguments and working directory,
/// recorded at start-up.
pub(super) struct Program {
    /// The program's path as it was invoked, symlinks kept (see
    /// [`invoked_path`]); else [`std::env::current_exe`] at start-up.
    pub(super) exe: Option<PathBuf>,
    /// [`std::env::args_os`] at start-up.
    pub(super) argv: Vec<OsString>,
    /// The working directory at start-up, by the name the shell gave it
    /// (see [`logical_cwd`]).
    pub(super) cwd: Option<PathBuf>,
}

impl Program {
    pub(super) fn current() -> Self {
        let argv: Vec<OsString> = std::env::args_os().collect();
        let cwd = logical_cwd();
        let path_var = std::env::var_os("PATH");
        let exe = argv
            .first()
            .and_then(|argv0| invoked_path(argv0, cwd.as_deref(), path_var.as_deref()))
            .filter(|p| is_running_program(p))
            .or_else(|| std::env::current_exe().ok());
        Self { exe, argv, cwd }
    }
}

/// The path `argv0` names, as `execvp(3)` finds it, without resolving
/// symlinks: a deploy that switches a `current -> releases/N` symlink
/// must get the new release executed, where [`std::env::current_exe`]
/// (`/proc/self/exe`) names the old one. With a `/`, it is taken as it
/// is, a relative one made absolute against `cwd`; without, the first
/// executable file of that name in the `PATH` directories (an empty entry
/// is the working directory). `None` if neither works.
fn invoked_path(argv0: &OsStr, cwd: Option<&Path>, path_var: Option<&OsStr>) -> Option<PathBuf> {
    let name = Path::new(argv0);
    let absolute = |p: PathBuf| -> Option<PathBuf> {
        if p.is_absolute() {
            Some(p)
        } else {
            cwd.map(|c| c.join(p))
        }
    };
    if argv0.as_bytes().contains(&b'/') {
        return absolute(name.to_path_buf());
    }
    if argv0.is_empty() {
        return None;
    }
    std::env::split_paths(path_var?)
        .filter_map(|dir| {
            absolute(
                if dir.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    dir
                }
                .join(name),
            )
        })
        .find(|p| is_executable_file(p))
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether `path` is (now, at start-up) the file this process executes:
/// an `argv[0]` that names something else (set by a wrapper, `exec -a`)
/// is not taken. Without `/proc`, an executable file is taken.
fn is_running_program(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(path), std::fs::metadata("/proc/self/exe")) {
        (Ok(a), Ok(b)) => a.is_file() && a.dev() == b.dev() && a.ino() == b.ino(),
        (Ok(_), Err(_)) => is_executable_file(path),
        (Err(_), _) => false,
    }
}

/// The working directory, named as the shell named it: `$PWD` if it is
/// absolute, has no `..` and is the same directory as `.` (so a directory
/// entered through a `current` symlink keeps that name), else
/// [`std::env::current_dir`].
fn logical_cwd() -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let pwd = std::env::var_os("PWD")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute() && !p.components().any(|c| c == std::path::Component::ParentDir));
    if let Some(pwd) = pwd {
        if let (Ok(a), Ok(b)) = (std::fs::metadata(&pwd), std::fs::metadata(".")) {
            if a.dev() == b.dev() && a.ino() == b.ino() {
                return Some(pwd);
            }
        }
    }
    std::env::current_dir().ok()
}

/// The old master's record of an upgrade in progress.
pub(super) struct UpgradeRun {
    /// The new master.
    pub(super) pid: u32,
    /// The pipe's read end (non-blocking).
    ready: OwnedFd,
    /// What was read from it so far.
    got: Vec<u8>,
    deadline: Instant,
    /// The new master was reaped (do not signal its pid again): how it
    /// ended.
    reaped: Option<String>,
    /// When the pipe reached end-of-file (the new master closed it or
    /// exited), if it did.
    eof_at: Option<Instant>,
    /// When the new master said `ready`: the hand-over follows at
    /// [`CONFIRM`] after it if the new master still runs.
    ready_at: Option<Instant>,
}

/// How long a new master must still run after it said `ready` before the
/// old master hands over: one that says it and dies at once (a broken
/// build that fails right after start-up) is a failed upgrade, not a
/// cluster left with nobody serving. The old master checks it was not
/// reaped after this delay, so a death that fast is always seen.
pub(super) const CONFIRM: std::time::Duration = std::time::Duration::from_millis(500);

/// How long after its pipe's end-of-file a new master that said nothing
/// has to be reaped, so that the failure names its exit status.
const EOF_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

impl UpgradeRun {
    /// The run of new master `pid`, whose word comes on `ready` (the
    /// pipe's read end) and which must be ready by `deadline`.
    fn new(pid: u32, ready: OwnedFd, deadline: Instant) -> Self {
        Self {
            pid,
            ready,
            got: Vec::new(),
            deadline,
            reaped: None,
            eof_at: None,
            ready_at: None,
        }
    }

    /// What `poll(2)` watches: the pipe, until its end-of-file.
    pub(super) fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.eof_at.is_none().then(|| self.ready.as_fd())
    }

    /// The pipe's read end, for a forked worker to close: it stays open
    /// as long as the run (also during [`EOF_GRACE`], when [`Self::fd`]
    /// no longer names it), and a worker must not keep it for its life.
    pub(super) fn raw_fd_to_close(&self) -> RawFd {
        self.ready.as_raw_fd()
    }

    /// Reads what the pipe holds (non-blocking) into `got`, until it
    /// would block or reaches its end-of-file (noted in `eof_at`).
    ///
    /// # Errors
    /// The new master said more than [`MAX_LINE`] bytes in all, or the
    /// read failed: the upgrade fails.
    fn read_pipe(&mut self) -> Result<(), String> {
        let mut buf = [0u8; 512];
        while self.eof_at.is_none() {
            match proc::read_raw(self.ready.as_fd(), &mut buf) {
                Ok(0) => self.eof_at = Some(Instant::now()),
                Ok(n) if self.got.len() + n <= MAX_LINE => self.got.extend_from_slice(&buf[..n]),
                Ok(_) => return Err("the new master said too much on its pipe".into()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(format!("reading the new master's pipe: {e}")),
            }
        }
        Ok(())
    }
}

/// How an upgrade ends, in the old master.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    /// The new master said `ready` and still ran [`CONFIRM`] later: hand
    /// over to it.
    HandOver,
    /// It failed (the reason): kill it, keep serving.
    Failed(String),
    /// The old master is shutting down (for its own reasons) before the
    /// hand-over: kill the new master.
    Abandoned,
    /// It said `stopping` after `ready`: asked to stop while in charge, it
    /// shuts down, and so does the old master.
    Stopped,
}

/// What the new master said on its pipe, from the complete lines (ended
/// by `\n`) of what was read so far: `ready pid=<pid>` or `err <reason>`
/// first, then possibly `stopping`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Said {
    /// No complete line yet.
    Nothing,
    /// `err <reason>`: it could not start.
    Err(String),
    /// `ready ...`: it is in charge.
    Ready,
    /// `ready ...`, then `stopping` (anything after is not read).
    ReadyThenStopping,
    /// A line that is none of these, where it came.
    Garbage(String),
}

/// [`Said`] from `got`, the bytes read from the pipe.
fn said(got: &[u8]) -> Said {
    let mut lines = got
        .split(|&b| b == b'\n')
        .take(got.iter().filter(|&&b| b == b'\n').count())
        .map(String::from_utf8_lossy);
    let Some(first) = lines.next() else {
        return Said::Nothing;
    };
    if let Some(reason) = first.strip_prefix("err ") {
        return Said::Err(reason.to_owned());
    }
    if !first.starts_with("ready") {
        return Said::Garbage(first.into_owned());
    }
    match lines.next() {
        None => Said::Ready,
        Some(line) if line == "stopping" => Said::ReadyThenStopping,
        Some(line) => Said::Garbage(line.into_owned()),
    }
}

/// A new master's record of the master it took over from.
pub(super) struct Upgraded {
    old_pid: u32,
    /// The pipe to the old master: `ready` (or `err`) is said on it, then,
    /// while this master is in charge and the old one still runs,
    /// `stopping` if this one is asked to stop. Closed after `err` or
    /// `stopping`, or once the old master is gone.
    pipe: Option<OwnedFd>,
    /// Where the control socket's file goes once the old master is gone
    /// (its own default path, if both used the default).
    rename_control_to: Option<PathBuf>,
    /// The old master is gone (and the files are ours, unless
    /// `stop_told`).
    settled: bool,
    /// `ready` was said: this master is the one in charge.
    in_charge: bool,
    /// `stopping` was said: the old master stops too, and keeps the socket
    /// files (it removes them as it exits).
    stop_told: bool,
}

impl Upgraded {
    pub(super) fn new(old_pid: u32, pipe: Option<OwnedFd>, rename_control_to: Option<PathBuf>) -> Self {
        Self {
            old_pid,
            pipe,
            rename_control_to,
            settled: false,
            in_charge: false,
            stop_told: false,
        }
    }

    /// The descriptors a forked worker must close: the pipe, as long as
    /// this master keeps it (also after `ready`).
    pub(super) fn raw_fds(&self) -> Vec<RawFd> {
        self.pipe.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// Whether this master has said `ready`: from then on it is the one
    /// in charge, and speaks to systemd; before (and if it never does), it
    /// sends nothing there, not even `STOPPING=1`: the old master is the
    /// service's main process.
    pub(super) fn in_charge(&self) -> bool {
        self.in_charge
    }
}

impl Master<'_> {
    /// Whether every instance not given up has a ready worker (and there
    /// is at least one).
    fn every_instance_ready(&self) -> bool {
        let (ready, live) = self.ready_instances();
        live > 0 && ready == live
    }

    /// `SIGUSR2` or `upgrade`: starts the new master. Returns its pid.
    ///
    /// # Errors
    /// Why no upgrade was started: shutting down, one is running already,
    /// a reload is running, this master's own take-over is not finished,
    /// or the fork failed.
    pub(super) fn begin_upgrade(&mut self) -> Result<u32, String> {
        if self.shutdown_deadline.is_some() {
            return Err("the cluster is shutting down".into());
        }
        if let Some(run) = &self.upgrade {
            return Err(format!(
                "an upgrade is running already (new master pid {})",
                run.pid
            ));
        }
        if self.reloading() {
            return Err("a reload is running; upgrade once it has finished".into());
        }
        // While both run, control clients reach the new master: it does
        // not start a third before the old one is gone.
        if let Some(up) = self.upgraded.as_ref().filter(|u| !u.settled) {
            return Err(format!(
                "this master is still taking over from pid {}; upgrade once that one has exited",
                up.old_pid
            ));
        }
        let Some(exe) = self.program.exe.clone() else {
            return Err("the master's program path is unknown (current_exe failed at start-up)".into());
        };
        let (ready_read, ready_write) = proc::pipe_cloexec().map_err(|e| format!("pipe: {e}"))?;
        sys::set_cloexec_nonblocking(ready_read.as_fd()).map_err(|e| format!("pipe: {e}"))?;
        let (listeners, inherited) = self.cluster.listeners.borrow().handover();
        let handed = HandOver {
            old_pid: self.master_pid,
            listeners,
            inherited,
            control: self
                .control
                .as_ref()
                .map(|c| (c.listener_fd().as_raw_fd(), c.path().to_path_buf())),
            metrics: self.metrics.as_ref().map(|m| m.listener_fd().as_raw_fd()),
            systemd: self.listeners_from_systemd,
            ready: ready_write.as_raw_fd(),
        };
        // Everything the child needs is built here, before the fork.
        let mut plan = handed.exec_plan(&exe, &self.program)?;
        // SAFETY: the child makes only async-signal-safe calls:
        // `sigprocmask` (restore_in_child), then `ExecPlan::exec_in_child`
        // (getpid, fcntl, dup2, close, chdir, write, execve, _exit, and
        // stores into buffers the plan already owns; no allocation, no
        // lock). That holds even if user code (an `on_event` callback)
        // started threads in this master.
        match unsafe { sys::fork() }.map_err(|e| format!("fork: {e}"))? {
            None => {
                self.signals.restore_in_child();
                plan.exec_in_child()
            }
            Some(child) => {
                drop(ready_write);
                let pid = child.pid();
                // The control socket and the metrics endpoint stay this
                // master's until the hand-over (the new one does not
                // accept on them before it is ready).
                self.upgrade = Some(UpgradeRun::new(
                    pid,
                    ready_read,
                    Instant::now() + self.opts.ready_timeout,
                ));
                say!(
                    "shmcluster: upgrade: started new master pid {pid} from {}",
                    exe.display()
                );
                self.publish(EventKind::UpgradeStarted { pid }, u32::MAX);
                Ok(pid)
            }
        }
    }

    /// The control request `upgrade`: starts it and answers.
    pub(super) fn upgrade_request(&mut self) -> ControlAnswer {
        match self.begin_upgrade() {
            Ok(pid) => ControlAnswer::UpgradeStarted { pid },
            Err(reason) => ControlAnswer::UpgradeRefused(reason),
        }
    }

    /// Once per loop turn in the old master: reads the new master's word,
    /// and fails the upgrade at the ready timeout.
    pub(super) fn step_upgrade(&mut self) {
        let Some(run) = self.upgrade.as_mut() else {
            return;
        };
        let mut verdict = run.read_pipe().err().map(Verdict::Failed);
        let now = Instant::now();
        if verdict.is_some() {
            // Already judged (the pipe broke, or said too much).
        } else {
            match said(&run.got) {
                Said::Err(reason) => {
                    verdict = Some(Verdict::Failed(format!(
                        "the new master could not start: {reason}"
                    )));
                }
                Said::Garbage(line) => {
                    verdict = Some(Verdict::Failed(format!("the new master said {line:?}")))
                }
                // Its last words count even if it is reaped already.
                Said::ReadyThenStopping => verdict = Some(Verdict::Stopped),
                // A reaped new master is never in charge.
                Said::Ready => match &run.reaped {
                    Some(how) => {
                        verdict = Some(Verdict::Failed(format!(
                            "the new master {how} after it said ready"
                        )));
                    }
                    None => {
                        let at = *run.ready_at.get_or_insert(now);
                        if now >= at + CONFIRM {
                            verdict = Some(Verdict::HandOver);
                        }
                    }
                },
                Said::Nothing => {
                    if let Some(how) = &run.reaped {
                        verdict = Some(Verdict::Failed(format!(
                            "the new master {how} before it was ready"
                        )));
                    } else if run.eof_at.is_some_and(|t| now >= t + EOF_GRACE) {
                        verdict = Some(Verdict::Failed(
                            "the new master closed its pipe before it was ready".into(),
                        ));
                    }
                }
            }
        }
        if verdict.is_none() && run.ready_at.is_none() && now >= run.deadline {
            verdict = Some(Verdict::Failed(format!(
                "the new master was not ready within {:?} (the ready timeout)",
                self.opts.ready_timeout
            )));
        }
        if verdict == Some(Verdict::HandOver) {
            // Its end may be pending: reaped now (`reaped_other` then
            // judges again, with its last words), it is a failure, or a
            // stop if it said `stopping`.
            if let Err(e) = self.reap() {
                say!("shmcluster: upgrade: waitpid: {e}");
            }
            let Some(run) = self.upgrade.as_mut() else {
                return;
            };
            if let Some(how) = &run.reaped {
                verdict = Some(Verdict::Failed(format!(
                    "the new master {how} after it said ready"
                )));
            } else if run.read_pipe().is_ok() && said(&run.got) == Said::ReadyThenStopping {
                // A `stopping` that came meanwhile.
                verdict = Some(Verdict::Stopped);
            }
        }
        if let Some(v) = verdict {
            let stop = v == Verdict::Stopped;
            self.finish_upgrade(v);
            if stop {
                self.begin_shutdown();
            }
        }
    }

    /// When the loop must next look at the upgrade (its deadline).
    pub(super) fn upgrade_wake_at(&self) -> Option<Instant> {
        self.upgrade.as_ref().map(|r| match r.ready_at {
            Some(at) => at + CONFIRM,
            None => r.eof_at.map_or(r.deadline, |t| r.deadline.min(t + EOF_GRACE)),
        })
    }

    /// A reaped child that is no worker: the new master, if it is ours.
    pub(super) fn reaped_other(&mut self, pid: u32, status: sys::ExitStatus) {
        let how = match status {
            sys::ExitStatus::Code(c) => format!("exited with code {c}"),
            sys::ExitStatus::Signal(s) => format!("was killed by signal {s}"),
        };
        if self.abandoned.as_ref().is_some_and(|a| a.pid == pid) {
            self.abandoned = None;
            say!("shmcluster: upgrade: the new master pid {pid} told to stop {how}");
            return;
        }
        let Some(run) = self.upgrade.as_mut().filter(|r| r.pid == pid) else {
            return;
        };
        run.reaped = Some(how);
        // Its last words first, if it wrote any.
        self.step_upgrade();
    }

    /// The upgrade ended: hand over (the old master drains and exits), or
    /// kill the new master and keep serving (failed), or stop it as this
    /// master stops (abandoned by this master's shutdown), or (it said `stopping`) leave
    /// it to its own shutdown: the caller then begins this master's, if
    /// it has not begun.
    fn finish_upgrade(&mut self, verdict: Verdict) {
        let Some(run) = self.upgrade.take() else {
            return;
        };
        let pid = run.pid;
        match verdict {
            Verdict::HandOver => {
                // The pipe closed before anything else (the user's
                // `on_event` among it): a new master stopped from now on
                // finds nobody to tell, and takes the files itself.
                drop(run);
                say!("shmcluster: upgrade: new master pid {pid} is ready; draining and exiting");
                self.publish(EventKind::UpgradeFinished { pid, ok: true }, u32::MAX);
                if let Some(c) = self.control.as_mut() {
                    c.upgrade_finished(&upgrade_line(pid, None));
                    c.hand_over();
                }
                self.cluster.listeners.borrow_mut().set_paths_owned(false);
                // Scrapes go to the new master now.
                self.metrics = None;
                self.notify.hand_over(pid);
                self.handed_over_to = Some(pid);
                self.begin_shutdown();
            }
            Verdict::Stopped => {
                // It shuts down by itself (its workers finish their
                // requests): not killed. It told the service manager
                // `MAINPID=<new>` as it said `ready`, and its end is the
                // service's: not reclaimed. This master keeps the files
                // (and removes them as it exits).
                say!("shmcluster: upgrade: the new master pid {pid} is stopping; the old master stops too");
                self.publish(EventKind::UpgradeFinished { pid, ok: false }, u32::MAX);
                if let Some(c) = self.control.as_mut() {
                    c.upgrade_finished(&upgrade_line(
                        pid,
                        Some("stopped (the new master was asked to stop after it said ready; the old master stops too)"),
                    ));
                }
            }
            failed => {
                match failed {
                    _ if run.reaped.is_some() => {}
                    // Its workers die with it (PR_SET_PDEATHSIG).
                    Verdict::Failed(_) => {
                        let _ = proc::send_signal(pid, signal::SIGKILL);
                    }
                    // Abandoned by this master's shutdown: its workers may
                    // already serve (they accept as soon as they start),
                    // so it is stopped as this master is (they finish
                    // their requests), and waited for until the deadline.
                    _ => {
                        let _ = proc::send_signal(pid, signal::SIGTERM);
                        self.abandoned = Some(super::Abandoned { pid, killed: false });
                    }
                }
                if run.got.starts_with(b"ready") {
                    // It may have claimed the service as it said `ready`.
                    self.notify.reclaim_mainpid(self.master_pid);
                }
                let (reason, then) = match failed {
                    Verdict::Failed(reason) => (reason, "the old master keeps serving".to_owned()),
                    _ => (
                        "stopped (the old master is shutting down)".to_owned(),
                        format!("new master pid {pid} stops too"),
                    ),
                };
                say!("shmcluster: upgrade failed: {reason}; {then}");
                self.publish(EventKind::UpgradeFinished { pid, ok: false }, u32::MAX);
                if let Some(c) = self.control.as_mut() {
                    c.upgrade_finished(&upgrade_line(pid, Some(&reason)));
                }
            }
        }
    }

    /// Once per loop turn in a new master: says `ready` to the old master
    /// once every instance is ready (and from then on accepts control
    /// clients and metrics scrapes: it is the one in charge), or `err` if
    /// it is shutting down first; takes the socket files over once the old
    /// master is gone (unless it told it `stopping`: then they are the old
    /// master's to remove).
    pub(super) fn step_upgraded(&mut self) {
        let all_ready = self.every_instance_ready();
        let stopping = self.shutdown_deadline.is_some();
        let Some(up) = self.upgraded.as_mut() else {
            return;
        };
        if !up.in_charge && up.pipe.is_some() && (all_ready || stopping) {
            if stopping {
                // Never `ready` while shutting down: the old master
                // would hand over to a master that is going away.
                if let Some(pipe) = up.pipe.take() {
                    report_error(&pipe, "the new master was shut down before it was ready");
                }
            } else if let Some(pipe) = &up.pipe {
                // The handed sockets it has no instance for leave their
                // port's SO_REUSEPORT group (for the old master too).
                if let Err(e) = self.cluster.listeners.borrow_mut().stop_surplus() {
                    say!("shmcluster: upgrade: cannot stop a surplus listening socket: {e}");
                }
                if let Some(c) = self.control.as_mut() {
                    c.set_accepting(true);
                }
                if let Some(m) = self.metrics.as_mut() {
                    m.set_accepting(true);
                }
                let line = format!("ready pid={}\n", self.master_pid);
                // A failure is the old master's to see (it is gone, or
                // fails the upgrade at its ready timeout).
                let _ = signal::write_pipe_without_sigpipe(pipe.as_fd(), line.as_bytes());
                // The pipe stays open: `stopping` may follow.
                up.in_charge = true;
            }
        }
        if up.settled || proc::parent_pid() == up.old_pid {
            return;
        }
        up.settled = true;
        up.pipe = None;
        if up.stop_told {
            // The old master stopped with this one and removes the files
            // as it exits, unless it had handed over already (`stopping`
            // written during the hand-over): then they would be nobody's.
            // Owning them is harmless: the control socket's file is
            // removed only if it is still the one this master listens on
            // (its inode), so one the old master removed, or another
            // master's, is left alone. Not renamed: the service stops.
            if let Some(c) = self.control.as_mut() {
                let _ = c.take_file(None);
            }
            self.cluster.listeners.borrow_mut().set_paths_owned(true);
            return;
        }
        let to = up.rename_control_to.take();
        if let Some(c) = self.control.as_mut() {
            if let Err(e) = c.take_file(to.as_deref()) {
                say!(
                    "shmcluster: cannot rename the control socket {} to its default path: {e}",
                    c.path().display()
                );
            }
            self.cluster.control_path = Some(c.path().to_path_buf());
        }
        self.cluster.listeners.borrow_mut().set_paths_owned(true);
    }

    /// As a new master's shutdown begins: if it is in charge and its old
    /// master still runs (confirming it, or draining after the
    /// hand-over), says `stopping` on the pipe, so that a stop asked of
    /// this master (`SIGTERM`, `SIGINT`, `stop`, [`Cluster::shutdown`],
    /// a worker's request) stops the service and is not taken for a
    /// failed upgrade. Not when every instance was given up after crash
    /// loops: that is a failed new build, and an old master still
    /// confirming it keeps serving. An old master that has already handed
    /// over no longer reads the pipe (`EPIPE`): it stops anyway, and the
    /// files become this master's as usual once it is gone.
    ///
    /// [`Cluster::shutdown`]: crate::cluster::Cluster::shutdown
    pub(super) fn tell_old_master_stopping(&mut self) {
        if self.gave_up {
            return;
        }
        let Some(up) = self.upgraded.as_mut().filter(|u| u.in_charge && !u.settled) else {
            return;
        };
        let Some(pipe) = up.pipe.take() else {
            return;
        };
        if signal::write_pipe_without_sigpipe(pipe.as_fd(), b"stopping\n").is_ok() {
            up.stop_told = true;
            say!(
                "shmcluster: upgrade: stopping while the old master pid {} still runs; it stops too",
                up.old_pid
            );
        }
    }

    /// As this master's shutdown begins with an upgrade still running: the
    /// new master is told to stop (`SIGTERM`) and the shutdown waits for
    /// it (`abandoned`) as for a worker, and `upgrade` clients are told;
    /// one that said `stopping` (both were
    /// asked to stop at once, as a service manager's stop does) is left to
    /// finish its own shutdown.
    pub(super) fn abandon_upgrade(&mut self) {
        let Some(run) = self.upgrade.as_mut() else {
            return;
        };
        let stopping = run.read_pipe().is_ok() && said(&run.got) == Said::ReadyThenStopping;
        self.finish_upgrade(if stopping {
            Verdict::Stopped
        } else {
            Verdict::Abandoned
        });
    }
}

/// What the old master hands the new one: the descriptors (as numbers
/// in the old master) and what [`MARKER`] says besides.
struct HandOver {
    old_pid: u32,
    /// In `LISTEN_FDS` order, with their names ([`listen::Listeners`]'s
    /// `handover`).
    listeners: Vec<(RawFd, String)>,
    /// How many of `listeners` are inherited ones.
    inherited: usize,
    control: Option<(RawFd, PathBuf)>,
    metrics: Option<RawFd>,
    systemd: bool,
    /// The pipe's write end.
    ready: RawFd,
}

impl HandOver {
    /// The forked child's plan (built in the parent, see
    /// [`sys::exec::ExecPlan`]): the program at `exe` with the same
    /// arguments, in the start-up working directory if it still exists;
    /// the listeners at `3..` (`LISTEN_FDS`, `LISTEN_PID` the child's,
    /// `LISTEN_FDNAMES`), then the pipe, the control socket and the
    /// metrics socket, named in [`MARKER`]; the rest of the environment
    /// as it is, except `WATCHDOG_PID`, which names the child if it named
    /// this master. A failure to execute is said on the pipe.
    fn exec_plan(&self, exe: &Path, program: &Program) -> Result<sys::exec::ExecPlan, String> {
        let mut plan = sys::exec::ExecPlan::new(exe, &program.argv)
            .map_err(|_| "the program path or an argument contains a NUL byte".to_string())?;
        if self.listeners.iter().any(|(_, name)| name.contains(':')) {
            return Err("a LISTEN_FDNAMES name contains ':'".into());
        }
        let mut fds: Vec<RawFd> = self.listeners.iter().map(|(fd, _)| *fd).collect();
        let count = fds.len();
        // Placed at 3, 4, ...: where each lands.
        let push = |fds: &mut Vec<RawFd>, fd: RawFd| -> Result<RawFd, String> {
            let at = RawFd::try_from(3 + fds.len()).map_err(|_| "too many listeners".to_string())?;
            fds.push(fd);
            Ok(at)
        };
        let ready_at = push(&mut fds, self.ready)?;
        let control_at = match &self.control {
            Some((fd, path)) => Some((push(&mut fds, *fd)?, path.clone())),
            None => None,
        };
        let metrics_at = self.metrics.map(|fd| push(&mut fds, fd)).transpose()?;
        plan.fds(fds);
        let env_err = |_| "an environment variable cannot be passed".to_string();
        let old = OsString::from(self.old_pid.to_string());
        for (k, v) in std::env::vars_os() {
            let key = k.to_string_lossy();
            if key.starts_with("LISTEN_") || key == MARKER {
                continue;
            }
            // The service manager's watchdog is the new master's to beat.
            if key == "WATCHDOG_PID" && v == old {
                plan.env_child_pid(&k).map_err(env_err)?;
            } else {
                // As before: an entry that cannot be passed is left out.
                let _ = plan.env(&k, &v);
            }
        }
        if count > 0 {
            let names: Vec<&str> = self.listeners.iter().map(|(_, n)| n.as_str()).collect();
            plan.env("LISTEN_FDS".as_ref(), count.to_string().as_ref())
                .map_err(env_err)?;
            plan.env_child_pid("LISTEN_PID".as_ref()).map_err(env_err)?;
            plan.env("LISTEN_FDNAMES".as_ref(), names.join(":").as_ref())
                .map_err(env_err)?;
        }
        let marker = Marker {
            old_pid: self.old_pid,
            ready: ready_at,
            listeners: self.inherited,
            control: control_at,
            metrics: metrics_at,
            systemd: self.systemd,
        };
        plan.env(MARKER.as_ref(), marker.encode().as_ref())
            .map_err(env_err)?;
        if let Some(cwd) = &program.cwd {
            plan.cwd(cwd)
                .map_err(|_| "the working directory contains a NUL byte".to_string())?;
        }
        plan.error_to(self.ready, format!("err cannot execute {}: ", exe.display()));
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fork, ExitStatus, Watchdog};

    /// A master that refuses to start under a binary upgrade writes why on
    /// the pipe its marker names, on one line.
    #[test]
    fn an_unstarted_master_says_why_on_the_pipe() {
        let (read, write) = proc::pipe_cloexec().unwrap();
        let marker = Marker {
            old_pid: 1,
            ready: write.as_raw_fd(),
            listeners: 0,
            control: None,
            metrics: None,
            systemd: false,
        };
        let dog = Watchdog::new("report_unstarted", std::time::Duration::from_secs(20));
        // SAFETY: the child only sets one variable (in a child, so that no
        // other test thread reads the environment meanwhile: a fork at the
        // instant one holds std's environment lock would hang the child
        // until the watchdog fails the test) and writes to a pipe.
        let child = dog.track(
            unsafe {
                fork(|| {
                    std::env::set_var(MARKER, marker.encode());
                    report_unstarted("bad\ncommand");
                    0
                })
            }
            .unwrap(),
        );
        assert_eq!(
            child.wait_timeout(std::time::Duration::from_secs(10)).unwrap(),
            Some(ExitStatus::Code(0))
        );
        drop(write);
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok(n @ 1..) = proc::read_raw(read.as_fd(), &mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(String::from_utf8_lossy(&got), "err bad command\n");
    }

    /// After the pipe's end-of-file the loop no longer polls it, but it
    /// is still open (for [`EOF_GRACE`]): a worker forked meanwhile must
    /// still be told to close it.
    #[test]
    fn the_pipe_is_closed_in_workers_also_after_its_end_of_file() {
        let (read, _write) = proc::pipe_cloexec().unwrap();
        let raw = read.as_raw_fd();
        let mut run = UpgradeRun::new(1, read, Instant::now());
        assert_eq!(run.fd().map(|fd| fd.as_raw_fd()), Some(raw));
        assert_eq!(run.raw_fd_to_close(), raw);
        run.eof_at = Some(Instant::now());
        assert!(run.fd().is_none(), "not polled after end-of-file");
        assert_eq!(run.raw_fd_to_close(), raw, "but still closed in a forked worker");
    }

    /// In a new master the pipe stays open after `ready` (`stopping` may
    /// follow): a forked worker must still be told to close it, and an
    /// exec'd one loses it (close-on-exec since its adoption).
    #[test]
    fn the_pipe_is_closed_in_workers_also_after_ready() {
        use std::os::fd::IntoRawFd;
        let (_read, write) = proc::pipe_cloexec().unwrap();
        sys::fd::set_cloexec(write.as_fd(), false).unwrap();
        let raw = write.into_raw_fd();
        let pipe = adopt(raw, "ready pipe").unwrap();
        assert!(sys::fd::is_cloexec(pipe.as_fd()).unwrap());
        let mut up = Upgraded::new(1, Some(pipe), None);
        assert_eq!(up.raw_fds(), [raw]);
        up.in_charge = true;
        assert_eq!(up.raw_fds(), [raw], "kept after ready");
        up.pipe = None;
        assert!(up.raw_fds().is_empty());
    }

    /// The old master's reading of the pipe: `ready`, then `stopping`;
    /// `err`; complete lines only; anything else (also `stopping` before
    /// `ready`, or a second line that is not `stopping`) is garbage, which
    /// fails the upgrade; never a panic on bytes that are not UTF-8.
    #[test]
    fn the_pipe_says_ready_then_stopping_and_anything_else_fails() {
        let cases: [(&[u8], Said); 14] = [
            (b"", Said::Nothing),
            (b"ready pid=4", Said::Nothing),
            (b"ready pid=4\n", Said::Ready),
            (b"ready pid=4\nstopp", Said::Ready),
            (b"ready pid=4\nstopping", Said::Ready),
            (b"ready pid=4\nstopping\n", Said::ReadyThenStopping),
            (b"ready pid=4\nstopping\nmore\n", Said::ReadyThenStopping),
            (
                b"ready pid=4\nstopping now\n",
                Said::Garbage("stopping now".into()),
            ),
            (b"ready pid=4\n\n", Said::Garbage(String::new())),
            (
                b"ready pid=4\n\xff\xfe\n",
                Said::Garbage("\u{fffd}\u{fffd}".into()),
            ),
            (b"stopping\n", Said::Garbage("stopping".into())),
            (b"err no config\n", Said::Err("no config".into())),
            (b"err no config\nready pid=4\n", Said::Err("no config".into())),
            (b"\xff\n", Said::Garbage("\u{fffd}".into())),
        ];
        for (got, want) in cases {
            assert_eq!(said(got), want, "{:?}", String::from_utf8_lossy(got));
        }
    }

    /// More than [`MAX_LINE`] bytes in all, also after `ready`, fails the
    /// upgrade (no unbounded buffer); what fits is kept.
    #[test]
    fn a_pipe_that_says_too_much_is_an_error() {
        let run = |bytes: &[u8]| {
            let (read, write) = proc::pipe_cloexec().unwrap();
            sys::set_cloexec_nonblocking(read.as_fd()).unwrap();
            proc::write_all_raw(write.as_fd(), bytes);
            let mut run = UpgradeRun::new(1, read, Instant::now());
            let result = run.read_pipe();
            (result, run.got)
        };
        let (ok, got) = run(b"ready pid=4\nstopping\n");
        assert_eq!(ok, Ok(()));
        assert_eq!(said(&got), Said::ReadyThenStopping);
        let mut long = b"ready pid=4\n".to_vec();
        long.resize(MAX_LINE + 1, b'x');
        let (err, got) = run(&long);
        assert_eq!(err, Err("the new master said too much on its pipe".into()));
        assert!(got.len() <= MAX_LINE);
    }

    /// The program path is argv[0] as invoked (symlinks kept), made
    /// absolute against the start-up directory, or found in `PATH` as
    /// execvp finds it.
    #[test]
    fn the_program_path_is_argv0_as_invoked() {
        let cwd = Path::new("/srv/app");
        let path = |a: &str, p: Option<&str>| invoked_path(OsStr::new(a), Some(cwd), p.map(OsStr::new));
        assert_eq!(
            path("/opt/x/current/app", None),
            Some("/opt/x/current/app".into())
        );
        assert_eq!(path("./current/app", None), Some("/srv/app/./current/app".into()));
        assert_eq!(path("current/app", None), Some("/srv/app/current/app".into()));
        assert_eq!(invoked_path(OsStr::new("current/app"), None, None), None);
        assert_eq!(path("", Some("/bin")), None);
        // The first executable match in PATH: `sh` is in /bin (or
        // /usr/bin); a directory without it is skipped.
        let sh = path("sh", Some("/nonexistent:/bin:/usr/bin")).unwrap();
        assert!(
            sh == Path::new("/bin/sh") || sh == Path::new("/usr/bin/sh"),
            "{sh:?}"
        );
        assert_eq!(path("no-such-program-here", Some("/bin:/usr/bin")), None);
        assert_eq!(path("sh", None), None);
        // This test binary was started by its path: that path is it.
        let me = Program::current();
        assert!(me.exe.as_deref().is_some_and(is_running_program), "{:?}", me.exe);
        assert!(!is_running_program(Path::new("/bin/sh")));
    }

    #[test]
    fn the_marker_round_trips_and_garbage_is_an_error() {
        let m = Marker {
            old_pid: 4242,
            ready: 7,
            listeners: 3,
            control: Some((8, PathBuf::from("/run/user/1000/shmcluster 4242.sock"))),
            metrics: Some(9),
            systemd: false,
        };
        assert_eq!(Marker::parse(&m.encode()), Ok(m.clone()));
        let bare = Marker {
            control: None,
            metrics: None,
            systemd: true,
            ..m
        };
        assert_eq!(Marker::parse(&bare.encode()), Ok(bare.clone()));
        for bad in [
            "",
            "v=2 old=1 ready=4 listeners=0 control=- control_path=- metrics=- systemd=0",
            "v=1 old=x ready=4 listeners=0 control=- control_path=- metrics=- systemd=0",
            "v=1 old=1 ready=2 listeners=0 control=- control_path=- metrics=- systemd=0",
            "v=1 old=1 ready=- listeners=0 control=- control_path=- metrics=- systemd=0",
            "v=1 old=1 ready=4 listeners=0 control=5 control_path=- metrics=- systemd=0",
            "v=1 old=1 ready=4 listeners=0 control=- control_path=- metrics=- systemd=2",
            "v=1 old=1 ready=4 listeners=0 control=- control_path=- metrics=-",
            "v=1 garbage",
        ] {
            assert!(Marker::parse(bad).is_err(), "{bad:?}");
        }
    }
}
