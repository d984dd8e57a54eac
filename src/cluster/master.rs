//! The master process: builder, start-up checks, and the supervision loop.
//!
//! The loop is single-threaded and event-driven: signals arrive through a
//! `signalfd` (SIGCHLD, SIGTERM, SIGINT, SIGHUP, and SIGUSR1, a worker's
//! nudge after it declared itself ready or asked for a reload), together
//! with the workers' listener requests on their control sockets and the
//! clients of the master's own control socket (`shmcluster stat`, see
//! `control.rs`), in one `poll(2)`, with a short tick for timers (backoff,
//! drain and grace deadlines, heartbeats).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ffi::{CString, OsString};
use std::fmt;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::*;
use std::time::{Duration, Instant};

use super::control::{self, ControlAnswer, ControlLocation, ControlRequest, ControlServer};
use super::listen::{self, ListenAddr, ListenError, ListenMode, ListenSpec, Listeners};
use super::threads::ThreadsBuilder;
use super::worker::{env, Worker};
use super::{read_stats, ClusterStats, Event, EventKind, ExitReason, WorkerState};
use crate::error::{ConfigError, CreateError};
use crate::segment::table::{STOP_DRAIN, STOP_RUN, STOP_SHUTDOWN};
use crate::segment::{Config, Segment};
use crate::sys::process as proc;
use crate::sys::signal::{self, MasterSignals};
use crate::sys::{self, ExitStatus};
use crate::WaitStrategy;

/// Longest the loop sleeps between looks at its timers.
const TICK: Duration = Duration::from_millis(100);

/// The master's side of a running cluster, handed to
/// [`ClusterBuilder::on_event`] callbacks.
pub struct Cluster {
    segment: Segment,
    listeners: RefCell<Listeners>,
    instances: u32,
    reload_asked: Cell<u32>,
    shutdown_asked: Cell<bool>,
    control_path: Option<PathBuf>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("instances", &self.instances)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// A builder with one worker per CPU and default timeouts.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// Every slot's state and counters, read from the segment.
    pub fn stats(&self) -> ClusterStats {
        read_stats(&self.segment)
    }

    /// The segment (to inspect it, or to hand its fd to a tool).
    pub fn segment(&self) -> &Segment {
        &self.segment
    }

    /// Number of worker instances kept running.
    pub fn instances(&self) -> u32 {
        self.instances
    }

    /// The addresses the master's listeners are bound to (port 0 resolved),
    /// in the order they were configured.
    pub fn local_addrs(&self) -> Vec<ListenAddr> {
        self.listeners.borrow().local_addrs()
    }

    /// Queues a rolling reload, as `SIGHUP` does.
    pub fn reload(&self) {
        self.reload_asked.set(self.reload_asked.get() + 1);
    }

    /// Begins a graceful shutdown, as `SIGTERM` does.
    pub fn shutdown(&self) {
        self.shutdown_asked.set(true);
    }

    /// Where the master's control socket is bound, if it has one (see
    /// [`ClusterBuilder::control_socket`]).
    pub fn control_path(&self) -> Option<&Path> {
        self.control_path.as_deref()
    }

    /// The control socket a master with pid `pid` binds with
    /// [`ClusterBuilder::control_socket_default`]:
    /// `$XDG_RUNTIME_DIR/shmcluster-<pid>.sock`, or
    /// `/tmp/shmcluster-<uid>/<pid>.sock` if `XDG_RUNTIME_DIR` is unset.
    pub fn default_control_path(pid: u32) -> PathBuf {
        control::default_path(pid)
    }

    /// Carries out a request from the control socket (`shmcluster stat`,
    /// `reload`, `stop`): `reload` and `stop` as [`Cluster::reload`] and
    /// [`Cluster::shutdown`], refused or moot once shutting down.
    fn execute(&self, request: ControlRequest) -> ControlAnswer {
        let shutting_down = self.segment.control().shutdown.load(Acquire) != 0;
        match request {
            ControlRequest::Ping => ControlAnswer::Pong { pid: sys::getpid() },
            ControlRequest::Stat => ControlAnswer::Stats(self.stats()),
            ControlRequest::Reload if shutting_down => ControlAnswer::Refused("the cluster is shutting down"),
            ControlRequest::Reload => {
                self.reload();
                ControlAnswer::ReloadQueued
            }
            ControlRequest::Stop if shutting_down => ControlAnswer::AlreadyShuttingDown,
            ControlRequest::Stop => {
                self.shutdown();
                ControlAnswer::ShutdownStarted
            }
        }
    }
}

type EventCallback = Box<dyn FnMut(&Cluster, &Event)>;

/// Configures and starts a cluster: [`Cluster::builder`].
///
/// # Examples
/// ```no_run
/// use shmcluster::Cluster;
///
/// let report = Cluster::builder()
///     .workers(4)
///     .listen("127.0.0.1:8080")
///     .run(|mut worker| {
///         let listener = worker.take_listeners().remove(0).into_tcp();
///         worker.ready();
///         for stream in worker.incoming(&listener) {
///             drop(stream?); // serve it
///         }
///         Ok::<(), std::io::Error>(())
///     })?;
/// std::process::exit(report.exit_code());
/// # Ok::<(), shmcluster::ClusterError>(())
/// ```
pub struct ClusterBuilder {
    workers: u32,
    config: Config,
    wait: WaitStrategy,
    listen: Vec<Result<ListenSpec, ListenError>>,
    backoff_initial: Duration,
    backoff_max: Duration,
    max_restarts: usize,
    restart_window: Duration,
    grace: Duration,
    drain_timeout: Duration,
    ready_timeout: Duration,
    hang_timeout: Option<Duration>,
    lock_hold_limit: Option<(Duration, bool)>,
    ready_on_start: bool,
    on_event: Option<EventCallback>,
    control: Option<ControlLocation>,
}

impl fmt::Debug for ClusterBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterBuilder")
            .field("workers", &self.workers)
            .field("config", &self.config)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self {
            workers: 0,
            config: Config::new(1),
            wait: WaitStrategy::default(),
            listen: Vec::new(),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            max_restarts: 10,
            restart_window: Duration::from_secs(60),
            grace: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            ready_timeout: Duration::from_secs(30),
            hang_timeout: None,
            lock_hold_limit: None,
            ready_on_start: false,
            on_event: None,
            control: None,
        }
    }
}

/// Why a cluster could not start. Every one of these is found before any
/// worker is forked.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClusterError {
    /// The worker count is out of range.
    Workers {
        /// What was asked for.
        requested: u32,
        /// The most a segment can hold (one slot is kept spare for reloads).
        max: u32,
    },
    /// The segment configuration is invalid.
    Config(ConfigError),
    /// The segment could not be created.
    Create(CreateError),
    /// A listener could not be parsed, bound, or taken from systemd.
    Listen(ListenError),
    /// The process has other threads: forking it would copy their locks
    /// without their owners.
    NotSingleThreaded {
        /// Threads found.
        threads: usize,
    },
    /// The worker command cannot be executed.
    Command {
        /// The program.
        program: String,
        /// Why not.
        reason: String,
    },
    /// The control socket could not be bound.
    Control {
        /// Where it was to be bound.
        path: PathBuf,
        /// Why it could not be.
        error: io::Error,
    },
    /// A system call failed.
    Io(io::Error),
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Workers { requested, max } => {
                write!(
                    f,
                    "invalid worker count {requested}: must be 1..={max} (0 = one per CPU)"
                )
            }
            Self::Config(e) => write!(f, "invalid segment configuration: {e}"),
            Self::Create(e) => write!(f, "cannot create the segment: {e}"),
            Self::Listen(e) => write!(f, "listener: {e}"),
            Self::NotSingleThreaded { threads } => write!(
                f,
                "the master must be single-threaded to fork, but this process has {threads} threads \
                 (start the cluster before spawning threads or a runtime)"
            ),
            Self::Command { program, reason } => write!(f, "cannot execute {program:?}: {reason}"),
            Self::Control { path, error } => {
                write!(f, "cannot bind the control socket {}: {error}", path.display())
            }
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ClusterError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Config(e) => Some(e),
            Self::Create(e) => Some(e),
            Self::Listen(e) => Some(e),
            Self::Control { error, .. } => Some(error),
            Self::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for ClusterError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// How a cluster ended: what [`Report::exit_code`] turns into a master
/// binary's exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Shut down on request, and every worker the shutdown stopped was
    /// healthy: ready when it began, then ended by exiting 0 or by the
    /// shutdown's `SIGTERM`/`SIGINT` within the grace period; no slot was
    /// given up. Exit code 0.
    Clean,
    /// Shut down on request, but not cleanly: see [`Report::unhealthy`]
    /// and [`Report::failed_slots`]. Exit code 1.
    Unclean,
    /// Every instance's slot crash-looped and was given up: with nothing
    /// left to supervise, the master stopped by itself. Exit code 3.
    AllGivenUp,
}

impl Outcome {
    /// 0, 1 or 3 (2 is left to the command line: a usage or start-up error).
    pub fn exit_code(self) -> i32 {
        match self {
            Self::Clean => 0,
            Self::Unclean => 1,
            Self::AllGivenUp => 3,
        }
    }

    /// `clean`, `unclean` or `all-given-up`: one word, for logs and the
    /// control socket.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Clean => "clean",
            Self::Unclean => "unclean",
            Self::AllGivenUp => "all-given-up",
        }
    }
}

/// A worker instance that made a shutdown unclean, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unhealthy {
    /// No worker of it had been ready for longer than the ready timeout
    /// (since its first start, or since its last ready worker ended) when
    /// the shutdown began.
    NeverReady {
        /// The instance.
        index: u32,
    },
    /// It was crashing when the shutdown began: its last worker crashed
    /// (a non-zero exit, or a signal the master did not send) before it
    /// was ever ready, and no worker there was ready since (the restart,
    /// if one was running, was not ready either).
    Crashing {
        /// The instance.
        index: u32,
    },
    /// Its worker ended during the shutdown otherwise than by exiting 0 or
    /// by the shutdown's signal (or was being killed by the master: hung,
    /// or holding a lock too long).
    Ended {
        /// The instance.
        index: u32,
        /// How it ended.
        reason: ExitReason,
    },
    /// Its worker was still running at the end of the grace period and was
    /// killed.
    KilledAtDeadline {
        /// The instance.
        index: u32,
    },
}

impl fmt::Display for Unhealthy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NeverReady { index } => write!(f, "worker {index} never became ready"),
            Self::Crashing { index } => {
                write!(f, "worker {index} crashed before it was ever ready")
            }
            Self::Ended { index, reason } => write!(f, "worker {index} {reason} during the shutdown"),
            Self::KilledAtDeadline { index } => {
                write!(
                    f,
                    "worker {index} did not exit within the grace period and was killed"
                )
            }
        }
    }
}

/// How a cluster ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// Clean, unclean, or every slot given up.
    pub outcome: Outcome,
    /// `outcome == Outcome::Clean`.
    pub clean: bool,
    /// The instances that made the shutdown unclean, in the order found.
    pub unhealthy: Vec<Unhealthy>,
    /// Workers replaced after dying.
    pub restarts: u32,
    /// Slots given up after a crash loop.
    pub failed_slots: Vec<u32>,
    /// Workers killed with `SIGKILL` at a deadline (grace, drain, ready, hang).
    pub killed: u32,
}

impl Report {
    /// What a master binary should exit with: 0 after a clean shutdown, 1
    /// after an unclean one, 3 when every slot was given up (see
    /// [`Outcome::exit_code`]).
    pub fn exit_code(&self) -> i32 {
        self.outcome.exit_code()
    }
}

/// One line for an operator: `clean shutdown (2 restarts, 0 killed)`,
/// `unclean shutdown: worker 1 never became ready (...)`, or
/// `every worker slot was given up after crash loops (...)`.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.outcome {
            Outcome::Clean => f.write_str("clean shutdown")?,
            Outcome::Unclean => f.write_str("unclean shutdown")?,
            Outcome::AllGivenUp => f.write_str("every worker slot was given up after crash loops")?,
        }
        if self.outcome == Outcome::Unclean {
            let mut why: Vec<String> = self.unhealthy.iter().map(ToString::to_string).collect();
            if !self.failed_slots.is_empty() {
                why.push(format!(
                    "slots given up after crash loops: {:?}",
                    self.failed_slots
                ));
            }
            if !why.is_empty() {
                write!(f, ": {}", why.join(", "))?;
            }
        }
        write!(f, " ({} restarts, {} killed)", self.restarts, self.killed)
    }
}

impl ClusterBuilder {
    /// Worker instances to keep running; 0 (the default) means one per CPU.
    pub fn workers(mut self, n: u32) -> Self {
        self.workers = n;
        self
    }

    /// Threads mode: the workers as `n` threads of this process (0: one
    /// per CPU) instead of processes, each with its own [`Worker`] on one
    /// new segment, and no master. [`ThreadsBuilder::run`] runs the
    /// closure on every thread, joins them and reports how they ended.
    /// Of this builder's settings only the segment's
    /// ([`lane_capacity`](Self::lane_capacity),
    /// [`max_message`](Self::max_message),
    /// [`lock_slots`](Self::lock_slots)) and
    /// [`wait_strategy`](Self::wait_strategy) apply: nothing listens,
    /// restarts, reloads or serves a control socket, and the process's
    /// signals are left alone. A worker without a master is described at
    /// [`Worker`] ("Without a master"): in short, any worker's
    /// [`Worker::request_shutdown`] stops them all.
    ///
    /// # Examples
    /// ```
    /// use std::time::Duration;
    /// use shmcluster::Cluster;
    ///
    /// let report = Cluster::builder().threads(3).run(|mut worker| {
    ///     worker.ready();
    ///     if worker.index() == 0 {
    ///         // Say hello to every other worker, then stop the cluster
    ///         // once they have all answered.
    ///         for to in 1..worker.instances() {
    ///             worker.endpoint().send(to, b"hello")?;
    ///         }
    ///         for _ in 1..worker.instances() {
    ///             worker.endpoint().recv_timeout(Duration::from_secs(10))?;
    ///         }
    ///         worker.request_shutdown();
    ///     } else {
    ///         let hello = worker.endpoint().recv_timeout(Duration::from_secs(10))?;
    ///         worker.endpoint().send(hello.sender, b"hi")?;
    ///     }
    ///     worker.wait_stop(Duration::from_secs(10));
    ///     Ok::<(), Box<dyn std::error::Error>>(())
    /// })?;
    /// assert!(report.clean);
    /// # Ok::<(), shmcluster::ClusterError>(())
    /// ```
    pub fn threads(self, n: u32) -> ThreadsBuilder {
        ThreadsBuilder::new(n, self.config, self.wait)
    }

    /// Bytes in each lane (see [`Config::lane_capacity`]).
    pub fn lane_capacity(mut self, bytes: usize) -> Self {
        self.config = self.config.lane_capacity(bytes);
        self
    }

    /// The longest message (see [`Config::max_message`]).
    pub fn max_message(mut self, bytes: usize) -> Self {
        self.config = self.config.max_message(bytes);
        self
    }

    /// Lock-table entries (see [`Config::lock_slots`]).
    pub fn lock_slots(mut self, n: u32) -> Self {
        self.config = self.config.lock_slots(n);
        self
    }

    /// The wait strategy of fork-mode workers' endpoints.
    pub fn wait_strategy(mut self, wait: WaitStrategy) -> Self {
        self.wait = wait;
        self
    }

    /// A listener shared by every worker: `"host:port"`, `":port"`, or a
    /// unix socket path (`"/run/app.sock"`, `"unix:./app.sock"`). Bound by
    /// the master before any fork; an address that cannot be parsed or
    /// bound makes `run` fail.
    pub fn listen(self, addr: &str) -> Self {
        self.listen_mode(addr, ListenMode::Shared)
    }

    /// A listener in the given mode: [`ListenMode::ReusePort`] binds one
    /// `SO_REUSEPORT` socket per worker instance (the kernel spreads
    /// connections over them).
    pub fn listen_mode(mut self, addr: &str, mode: ListenMode) -> Self {
        let name = format!("listen{}", self.listen.len());
        self.listen.push(
            addr.parse::<ListenAddr>()
                .map(|addr| ListenSpec::new(addr).mode(mode).name(name)),
        );
        self
    }

    /// Delays between restarts of a crashing slot: the first restart is
    /// immediate, then `initial`, doubling up to `max` while deaths keep
    /// coming within the restart window.
    pub fn restart_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max.max(initial);
        self
    }

    /// The crash-loop limit: a slot whose worker died more than
    /// `max_restarts` times within `window` is not restarted again (it is
    /// reported [`WorkerState::Failed`] and by a `CrashLoop` event).
    pub fn crash_loop_limit(mut self, max_restarts: usize, window: Duration) -> Self {
        self.max_restarts = max_restarts;
        self.restart_window = window;
        self
    }

    /// How long workers get to exit after shutdown begins before `SIGKILL`.
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.grace = d;
        self
    }

    /// How long a worker replaced by a reload gets to drain before `SIGKILL`.
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }

    /// How long a reload waits for a replacement to declare itself ready
    /// before killing it and keeping the old worker. Also: an instance
    /// without a ready worker for this long makes a shutdown unclean
    /// ([`Unhealthy::NeverReady`]).
    pub fn ready_timeout(mut self, d: Duration) -> Self {
        self.ready_timeout = d;
        self
    }

    /// Kill and replace a ready worker whose heartbeat has not moved for
    /// `d` (off by default).
    pub fn hang_timeout(mut self, d: Duration) -> Self {
        self.hang_timeout = Some(d);
        self
    }

    /// Report a worker that holds a `synchronize` lock longer than `limit`
    /// (stderr and a `LockHeldTooLong` event, once per acquisition); with
    /// `kill`, also kill it (exit reason `LockHeld`) so the lock passes to
    /// the next holder, who is told the previous owner died.
    pub fn lock_hold_limit(mut self, limit: Duration, kill: bool) -> Self {
        self.lock_hold_limit = Some((limit, kill));
        self
    }

    /// Treat each worker as ready as soon as it is started (forked, or
    /// exec'd in spawn mode) instead of waiting for it to call
    /// [`Worker::ready`]: for programs that do not use the library (a
    /// spawned worker in a language without a binding yet), like PM2
    /// without `wait_ready`. Off by default.
    pub fn ready_on_start(mut self, yes: bool) -> Self {
        self.ready_on_start = yes;
        self
    }

    /// Serve a control socket at `path` (a unix stream socket, mode 0600,
    /// removed when the master ends) for `shmcluster stat`, `reload` and
    /// `stop`: they read the stats and ask for a rolling reload or a
    /// graceful shutdown. Only processes of the master's own user are
    /// answered. A socket file left there by a dead master is replaced.
    ///
    /// # Errors
    /// `run`/`command` fail with [`ClusterError::Control`] if it cannot be
    /// bound (before any fork).
    pub fn control_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.control = Some(ControlLocation::Path(path.into()));
        self
    }

    /// Serve a control socket at [`Cluster::default_control_path`] of the
    /// master's pid (see [`control_socket`](Self::control_socket)).
    pub fn control_socket_default(mut self) -> Self {
        self.control = Some(ControlLocation::Default);
        self
    }

    /// Called in the master for every event it publishes, with the running
    /// cluster (to read stats, or to ask for a reload or shutdown). It runs
    /// inside the supervision loop: while it runs, the master reaps no
    /// child and serves no listener request, so keep it short. It must not
    /// start threads (the master forks later).
    pub fn on_event(mut self, f: impl FnMut(&Cluster, &Event) + 'static) -> Self {
        self.on_event = Some(Box::new(f));
        self
    }

    /// Fork mode: forks the workers, each running `f` with its [`Worker`],
    /// and supervises them until shutdown (SIGTERM or SIGINT), or until
    /// every instance's slot has been given up after crash loops
    /// ([`Outcome::AllGivenUp`]). A worker exits 0 when `f` returns `Ok`, 1
    /// on `Err` (printed to stderr), 101 if it panics.
    ///
    /// # Errors
    /// [`ClusterError`], always before any worker is forked.
    pub fn run<F, E>(self, mut f: F) -> Result<Report, ClusterError>
    where
        F: FnMut(Worker) -> Result<(), E>,
        E: fmt::Display,
    {
        let wait = self.wait;
        let mut body = move |mut worker: Worker| -> i32 {
            worker.set_wait_strategy(wait);
            let index = worker.index();
            match f(worker) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("shmcluster worker {index}: {e}");
                    1
                }
            }
        };
        self.start(Mode::Fork(&mut body))
    }

    /// Spawn mode: runs `argv` (a program of any language) as each worker,
    /// with its identity and descriptors in the environment (see
    /// [`Worker::from_env`]) and its listeners as `LISTEN_FDS` from fd 3,
    /// and supervises them as [`run`](Self::run) does.
    ///
    /// # Errors
    /// [`ClusterError::Command`] if the program cannot be found or
    /// executed, and the rest of [`ClusterError`], before any fork.
    pub fn command<I, S>(self, argv: I) -> Result<Report, ClusterError>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
        let Some(program) = argv.first() else {
            return Err(ClusterError::Command {
                program: String::new(),
                reason: "empty command".into(),
            });
        };
        let name = program.to_string_lossy().into_owned();
        if proc::find_executable(&name).is_none() {
            return Err(ClusterError::Command {
                reason: why_not_executable(&name),
                program: name,
            });
        }
        let argv = argv
            .into_iter()
            .map(|a| CString::new(a.into_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| ClusterError::Command {
                program: name,
                reason: "an argument contains a NUL byte".into(),
            })?;
        self.start(Mode::Spawn(argv))
    }

    fn start(mut self, mode: Mode<'_>) -> Result<Report, ClusterError> {
        let max = crate::MAX_WORKERS - 1;
        let instances = match self.workers {
            0 => std::thread::available_parallelism()
                .map_or(1, |n| n.get() as u32)
                .min(max),
            n if n > max => return Err(ClusterError::Workers { requested: n, max }),
            n => n,
        };
        let specs = std::mem::take(&mut self.listen)
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(ClusterError::Listen)?;
        let threads = proc::thread_count()?;
        if threads != 1 {
            return Err(ClusterError::NotSingleThreaded { threads });
        }
        let config = Config {
            workers: instances + 1,
            ..self.config.clone()
        };
        crate::Layout::new(&config).map_err(ClusterError::Config)?;
        // systemd socket activation: its sockets replace ours.
        let listeners = match Listeners::from_systemd_env().map_err(ClusterError::Listen)? {
            Some(l) => l,
            None => Listeners::bind(&specs, instances).map_err(ClusterError::Listen)?,
        };
        let segment = Segment::create(&config).map_err(ClusterError::Create)?;
        let master_pid = sys::getpid();
        let control_server = match self.control.take() {
            Some(at) => Some(
                ControlServer::bind(&at, master_pid)
                    .map_err(|(path, error)| ClusterError::Control { path, error })?,
            ),
            None => None,
        };
        let signals = MasterSignals::install()?;
        let control = segment.control();
        control.master_pid.store(master_pid, Release);
        control.instances.store(instances, Release);
        for slot in 0..=instances {
            segment.worker_entry(slot).index.store(u32::MAX, Release);
        }
        let cluster = Cluster {
            segment,
            listeners: RefCell::new(listeners),
            instances,
            reload_asked: Cell::new(0),
            shutdown_asked: Cell::new(false),
            control_path: control_server.as_ref().map(|c| c.path().to_path_buf()),
        };
        let on_event = self.on_event.take();
        let mut master = Master {
            opts: self,
            cluster,
            mode,
            signals,
            master_pid,
            slots: (0..=instances).map(|_| SlotRec::default()).collect(),
            index_slot: (0..instances).collect(),
            reload: None,
            reloads_queued: 0,
            reload_requests_seen: 0,
            shutdown_requests_seen: 0,
            shutdown_deadline: None,
            unhealthy: Vec::new(),
            gave_up: false,
            restarts: 0,
            killed: 0,
            failed: Vec::new(),
            on_event,
            lock_reported: vec![0; config.lock_slots as usize],
            control: control_server,
        };
        let result = master.supervise();
        let Master {
            cluster,
            signals,
            unhealthy,
            gave_up,
            restarts,
            killed,
            failed,
            control,
            ..
        } = master;
        cluster.listeners.borrow().remove_unix_paths();
        signals.uninstall();
        result?;
        let outcome = if gave_up {
            Outcome::AllGivenUp
        } else if unhealthy.is_empty() && failed.is_empty() {
            Outcome::Clean
        } else {
            Outcome::Unclean
        };
        let report = Report {
            outcome,
            clean: outcome == Outcome::Clean,
            unhealthy,
            restarts,
            failed_slots: failed,
            killed,
        };
        // Clients of `stop --wait` learn how it ended before the socket goes.
        if let Some(control) = control {
            control.finish(&report);
        }
        Ok(report)
    }
}

/// Why `program`, which [`proc::find_executable`] did not accept, cannot
/// be run: a path (with a `/`) is looked at as it is; a bare name was
/// searched for in `PATH`.
fn why_not_executable(program: &str) -> String {
    if !program.contains('/') {
        return match std::env::var_os("PATH") {
            Some(_) => "not found in PATH (no executable file of that name in any of its directories)".into(),
            None => "not found: PATH is not set (give the program's path)".into(),
        };
    }
    match std::fs::metadata(program) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => "no such file".into(),
        Err(e) => e.to_string(),
        Ok(meta) if meta.is_dir() => "is a directory".into(),
        Ok(meta) if !meta.is_file() => "not a regular file".into(),
        Ok(meta) if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 == 0 => {
            "not executable (the file has no execute permission)".into()
        }
        Ok(_) => "not executable by this user (permission denied)".into(),
    }
}

enum Mode<'a> {
    Fork(&'a mut dyn FnMut(Worker) -> i32),
    Spawn(Vec<CString>),
}

/// The master's own record of a slot (the segment's worker table is what
/// workers see; this is what the master trusts).
#[derive(Default)]
struct SlotRec {
    pid: Option<u32>,
    index: Option<u32>,
    generation: u32,
    /// Seen `Ready` in the table since it was started.
    ready: bool,
    /// A reload replacement not yet ready: if it dies, the reload fails
    /// and the slot goes back to spare.
    replacement: bool,
    /// Deaths within the restart window, oldest first.
    deaths: VecDeque<Instant>,
    /// Since when the slot has had no ready worker: set when a worker is
    /// started into a slot without one, cleared when a worker is ready.
    unready_since: Option<Instant>,
    /// Workers here in a row that crashed before they were ever ready; 0
    /// once one is ready.
    unready_deaths: u32,
    restart_at: Option<Instant>,
    kill_at: Option<Instant>,
    /// Why the master ended (or is ending) it, if it did.
    ending: Option<ExitReason>,
    /// The master has sent it `SIGKILL` (and counted it in `killed`): it
    /// is not killed, counted or reported again while its reap is pending.
    sigkilled: bool,
    failed: bool,
    control: Option<OwnedFd>,
    beat: u64,
    beat_seen: Option<Instant>,
}

enum Step {
    /// Replacement for `index` started in `new`; old worker in `old`.
    WaitReady {
        index: u32,
        old: u32,
        new: u32,
        deadline: Instant,
    },
    /// Old worker in `old` told to drain.
    Drain { old: u32 },
}

struct ReloadRun {
    order: Vec<u32>,
    pos: usize,
    step: Option<Step>,
}

struct Master<'a> {
    opts: ClusterBuilder,
    cluster: Cluster,
    mode: Mode<'a>,
    signals: MasterSignals,
    master_pid: u32,
    slots: Vec<SlotRec>,
    /// Instance index → slot.
    index_slot: Vec<u32>,
    reload: Option<ReloadRun>,
    reloads_queued: u32,
    reload_requests_seen: u32,
    shutdown_requests_seen: u32,
    shutdown_deadline: Option<Instant>,
    /// Instances that made the shutdown unclean.
    unhealthy: Vec<Unhealthy>,
    /// Every instance's slot was given up: the master ends by itself.
    gave_up: bool,
    restarts: u32,
    killed: u32,
    failed: Vec<u32>,
    on_event: Option<EventCallback>,
    /// Per lock-table entry: the fencing token last reported over the limit.
    lock_reported: Vec<u64>,
    /// The control socket (`shmcluster stat`), if configured.
    control: Option<ControlServer>,
}

impl Master<'_> {
    /// Reports (and, if configured, kills) workers holding a lock past the
    /// hold limit.
    fn check_locks(&mut self) {
        let segment = self.cluster.segment.clone();
        let now = proc::monotonic_ns();
        for i in 1..segment.layout().lock_slots {
            let e = segment.lock_entry(i);
            let pid = e.holder_pid.load(Acquire);
            let token = e.token.load(Acquire);
            if pid == 0 {
                continue;
            }
            // Holders do not read the clock (too slow for a lock's fast
            // path): the master times each acquisition from when it first
            // sees its token.
            if e.hold_seen_token.load(Acquire) != token {
                e.hold_since_ns.store(now, Release);
                e.hold_seen_token.store(token, Release);
                continue;
            }
            let Some((limit, kill)) = self.opts.lock_hold_limit else {
                continue;
            };
            let since = e.hold_since_ns.load(Acquire);
            if Duration::from_nanos(now.saturating_sub(since)) <= limit {
                continue;
            }
            if self.lock_reported.get(i as usize) == Some(&token) {
                continue;
            }
            if let Some(r) = self.lock_reported.get_mut(i as usize) {
                *r = token;
            }
            let slot = self
                .slots
                .iter()
                .position(|s| s.pid == Some(pid))
                .map(|s| s as u32);
            eprintln!(
                "shmcluster: process {pid} (slot {slot:?}) has held lock entry {i} for over {limit:?}{}",
                if kill { "; killing it" } else { "" }
            );
            self.publish(EventKind::LockHeldTooLong { lock: i }, slot.unwrap_or(u32::MAX));
            if let (true, Some(slot)) = (kill, slot) {
                if self.slots[slot as usize].ending.is_none() {
                    self.slots[slot as usize].ending = Some(ExitReason::LockHeld);
                }
                self.kill(slot);
            }
        }
    }

    fn supervise(&mut self) -> io::Result<()> {
        for index in 0..self.cluster.instances {
            if let Err(e) = self.start_worker(index, index) {
                // Leave nothing running behind the error.
                for slot in 0..self.slots.len() as u32 {
                    if let Some(pid) = self.slots[slot as usize].pid {
                        let _ = proc::send_signal(pid, signal::SIGKILL);
                        let _ = proc::wait_for(pid);
                    }
                }
                return Err(e);
            }
        }
        loop {
            self.wait_for_work()?;
            self.handle_signals()?;
            self.reap()?;
            self.observe_workers();
            if self.cluster.shutdown_asked.replace(false) {
                self.begin_shutdown();
            }
            let shutdowns = self.cluster.segment.control().shutdown_requests.load(Acquire);
            if shutdowns != self.shutdown_requests_seen {
                self.shutdown_requests_seen = shutdowns;
                self.begin_shutdown();
            }
            let asked = self.cluster.reload_asked.replace(0);
            let requests = self.cluster.segment.control().reload_requests.load(Acquire);
            if requests != self.reload_requests_seen {
                self.reload_requests_seen = requests;
                self.reloads_queued += 1;
            }
            self.reloads_queued += asked.min(1);
            if let Some(deadline) = self.shutdown_deadline {
                if self.slots.iter().all(|s| s.pid.is_none()) {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    self.kill_remaining();
                }
                continue;
            }
            self.run_timers()?;
            self.check_locks();
            self.step_reload()?;
        }
    }

    /// Sleeps in `poll(2)` until a signal, a worker's request, or the next
    /// timer; serves the requests.
    fn wait_for_work(&mut self) -> io::Result<()> {
        let now = Instant::now();
        let mut next = now + TICK;
        for s in &self.slots {
            for t in [s.restart_at, s.kill_at].into_iter().flatten() {
                next = next.min(t);
            }
        }
        if let Some(d) = self.shutdown_deadline {
            next = next.min(d);
        }
        if let Some(t) = self.control.as_ref().and_then(ControlServer::wake_at) {
            next = next.min(t);
        }
        let with_control: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].control.is_some())
            .collect();
        let ready = {
            let mut fds: Vec<BorrowedFd<'_>> = vec![self.signals.fd()];
            fds.extend(
                with_control
                    .iter()
                    .filter_map(|&i| self.slots[i].control.as_ref().map(|c| c.as_fd())),
            );
            let control_at = fds.len();
            if let Some(c) = &self.control {
                fds.extend(c.poll_fds());
            }
            let ready = sys::fd::poll_readable(&fds, Some(next.saturating_duration_since(now)))?;
            if let Some(c) = self.control.as_mut() {
                // Never waits: non-blocking sockets, bounded requests.
                for (conn, request) in c.serve(ready[control_at]) {
                    c.answer(conn, &self.cluster.execute(request));
                }
            }
            ready
        };
        for (k, &slot) in with_control.iter().enumerate() {
            if !ready[k + 1] {
                continue;
            }
            let open = match &self.slots[slot].control {
                Some(c) => self.cluster.listeners.borrow_mut().serve_request(c.as_fd()),
                None => Ok(true),
            };
            if !matches!(open, Ok(true)) {
                // The worker closed its end (or the socket broke).
                self.slots[slot].control = None;
            }
        }
        Ok(())
    }

    fn handle_signals(&mut self) -> io::Result<()> {
        while let Some(sig) = self.signals.next()? {
            match sig {
                signal::SIGTERM | signal::SIGINT => self.begin_shutdown(),
                signal::SIGHUP => self.reloads_queued += 1,
                // SIGCHLD: reaped below; SIGUSR1: observed below.
                _ => {}
            }
        }
        Ok(())
    }

    fn reap(&mut self) -> io::Result<()> {
        while let Some((pid, status)) = proc::reap_any()? {
            if let Some(slot) = self.slots.iter().position(|s| s.pid == Some(pid)) {
                self.worker_exited(slot as u32, status);
            }
        }
        Ok(())
    }

    /// Publishes an event into the segment and calls the callback.
    fn publish(&mut self, kind: EventKind, slot: u32) {
        let (index, pid, generation) = match self.slots.get(slot as usize) {
            Some(s) => (s.index.unwrap_or(u32::MAX), s.pid.unwrap_or(0), s.generation),
            None => (u32::MAX, 0, 0),
        };
        let mut event = Event {
            seq: 0,
            kind,
            slot,
            index,
            pid,
            generation,
        };
        event.seq = self.cluster.segment.control().publish(event.to_raw());
        if let Some(c) = self.control.as_mut() {
            c.observe(&event);
        }
        if let Some(cb) = self.on_event.as_mut() {
            cb(&self.cluster, &event);
        }
    }

    fn start_worker(&mut self, slot: u32, index: u32) -> io::Result<()> {
        let segment = self.cluster.segment.clone();
        let generation = segment.next_generation(slot);
        let entry = segment.worker_entry(slot);
        let now_ns = proc::monotonic_ns();
        entry.index.store(index, Release);
        entry.generation.store(generation, Release);
        entry.pid.store(0, Release);
        entry.stop.store(STOP_RUN, Release);
        entry.heartbeat_seen_ns.store(now_ns, Release);
        entry.started_ns.store(now_ns, Release);
        entry.ready_ns.store(0, Release);
        entry.state.store(WorkerState::Starting.to_raw(), Release);

        let (master_end, worker_end) = sys::net::seqpacket_pair()?;
        let (exec_read, exec_write) = proc::pipe_cloexec()?;
        // Descriptors the child must not keep.
        let mut close: Vec<RawFd> = vec![
            self.signals.raw_fd(),
            master_end.as_raw_fd(),
            exec_read.as_raw_fd(),
        ];
        close.extend(
            self.slots
                .iter()
                .filter_map(|s| s.control.as_ref().map(|c| c.as_raw_fd())),
        );
        close.extend(
            self.control
                .as_ref()
                .map_or_else(Vec::new, ControlServer::raw_fds),
        );
        let listeners = self.cluster.listeners.borrow();
        let mine: Vec<(BorrowedFd<'_>, &str)> = listeners.for_instance(index);
        let mine_raw: Vec<RawFd> = mine.iter().map(|(fd, _)| fd.as_raw_fd()).collect();
        close.extend(
            listeners
                .all_fds()
                .into_iter()
                .filter(|fd| !mine_raw.contains(fd)),
        );
        let instances = self.cluster.instances;

        // SAFETY: the master checked at start-up that it is single-threaded
        // and starts no threads, so the child may allocate and run Rust code.
        match unsafe { sys::fork() }? {
            None => {
                sys::die_with_parent(self.master_pid);
                self.signals.restore_in_child();
                for fd in close {
                    let _ = sys::fd::close_raw(fd);
                }
                let code = match &mut self.mode {
                    Mode::Fork(body) => {
                        let owned: io::Result<Vec<listen::Listener>> = listeners.instance_listeners(index);
                        let run = || -> Result<i32, String> {
                            signal::catch_sigterm().map_err(|e| e.to_string())?;
                            let listeners = owned.map_err(|e| e.to_string())?;
                            let worker = Worker::attach(
                                segment,
                                slot,
                                index,
                                generation,
                                instances,
                                Some(worker_end),
                                listeners,
                            )
                            .map_err(|e| e.to_string())?;
                            Ok(body(worker))
                        };
                        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
                            Ok(Ok(code)) => code,
                            Ok(Err(e)) => {
                                eprintln!("shmcluster worker {index}: {e}");
                                1
                            }
                            Err(_) => 101,
                        }
                    }
                    Mode::Spawn(argv) => {
                        let err = exec_worker(
                            argv,
                            &segment,
                            slot,
                            index,
                            generation,
                            instances,
                            &worker_end,
                            &mine,
                        );
                        let errno = err.raw_os_error().unwrap_or(0);
                        proc::write_all_raw(exec_write.as_fd(), &errno.to_le_bytes());
                        eprintln!("shmcluster: cannot execute worker {index}: {err}");
                        127
                    }
                };
                let _ = io::stdout().flush();
                let _ = io::stderr().flush();
                sys::exit_now(code)
            }
            Some(child) => {
                drop(mine);
                drop(listeners);
                drop(worker_end);
                drop(exec_write);
                let pid = child.pid();
                if matches!(self.mode, Mode::Spawn(_)) {
                    // EOF once the child execs (the write end is close-on-exec);
                    // four bytes of errno if it could not.
                    let mut buf = [0u8; 4];
                    if proc::read_raw(exec_read.as_fd(), &mut buf)? == 4 {
                        eprintln!(
                            "shmcluster: worker {index} could not exec: {}",
                            io::Error::from_raw_os_error(i32::from_le_bytes(buf))
                        );
                    }
                }
                entry.pid.store(pid, Release);
                let rec = &mut self.slots[slot as usize];
                rec.pid = Some(pid);
                rec.index = Some(index);
                rec.generation = generation;
                rec.ready = false;
                rec.unready_since.get_or_insert_with(Instant::now);
                rec.replacement = false;
                rec.restart_at = None;
                rec.kill_at = None;
                rec.ending = None;
                rec.sigkilled = false;
                rec.control = Some(master_end);
                rec.beat = entry.heartbeat.load(Relaxed);
                rec.beat_seen = Some(Instant::now());
                self.publish(EventKind::Spawned, slot);
                if self.opts.ready_on_start {
                    let starting = WorkerState::Starting.to_raw();
                    let _ =
                        entry
                            .state
                            .compare_exchange(starting, WorkerState::Ready.to_raw(), AcqRel, Acquire);
                }
                Ok(())
            }
        }
    }

    /// After `start_worker` failed before a process existed: the slot's
    /// table entry says so.
    fn start_failed(&mut self, slot: u32, e: &io::Error) {
        let entry = self.cluster.segment.worker_entry(slot);
        entry.pid.store(0, Release);
        entry.state.store(WorkerState::Dead.to_raw(), Release);
        self.slots[slot as usize].pid = None;
        let errno = e.raw_os_error().unwrap_or(0);
        self.publish(EventKind::StartFailed { errno }, slot);
    }

    fn worker_exited(&mut self, slot: u32, status: ExitStatus) {
        let shutting_down = self.shutdown_deadline.is_some();
        let segment = self.cluster.segment.clone();
        let entry = segment.worker_entry(slot);
        let rec = &mut self.slots[slot as usize];
        let generation = rec.generation;
        // Killed on purpose (hang, lock hold limit, reload, not ready): its
        // end is accounted for by that decision, not by the shutdown.
        let intentional = rec.ending.is_some();
        let reason = match rec.ending.take() {
            Some(r) => r,
            None if shutting_down => Shutdown,
            None => match status {
                ExitStatus::Code(c) => ExitReason::Exited(c),
                ExitStatus::Signal(s) => ExitReason::Signaled(s),
            },
        };
        use ExitReason::Shutdown;
        // A spawned program that did not catch our SIGTERM (or a terminal's
        // SIGINT) ended the way it was asked to: that is clean too.
        if shutting_down
            && !intentional
            && !matches!(
                status,
                ExitStatus::Code(0)
                    | ExitStatus::Signal(signal::SIGTERM)
                    | ExitStatus::Signal(signal::SIGINT)
            )
        {
            if let Some(index) = self.slots[slot as usize].index {
                let reason = match status {
                    ExitStatus::Code(c) => ExitReason::Exited(c),
                    ExitStatus::Signal(s) => ExitReason::Signaled(s),
                };
                self.unhealthy.push(Unhealthy::Ended { index, reason });
            }
        }
        let (kind, value) = reason.to_raw();
        entry.last_exit_kind.store(kind, Release);
        entry.last_exit_value.store(value, Release);
        entry.state.store(WorkerState::Dead.to_raw(), Release);
        entry.pid.store(0, Release);
        segment.reset_dead_slot(slot, generation);
        let rec = &mut self.slots[slot as usize];
        // A crash: a non-zero exit, or a signal the master did not send.
        let crashed =
            matches!(reason, ExitReason::Exited(c) if c != 0) || matches!(reason, ExitReason::Signaled(_));
        if !shutting_down && !intentional && crashed && !rec.ready {
            rec.unready_deaths = rec.unready_deaths.saturating_add(1);
        }
        rec.control = None;
        rec.kill_at = None;
        let was_replacement = rec.replacement;
        rec.replacement = false;
        self.publish(EventKind::Exit(reason), slot);
        let rec = &mut self.slots[slot as usize];
        rec.pid = None;
        rec.sigkilled = false;
        if shutting_down {
            return;
        }
        // Part of a reload?
        let mut free = false;
        match &mut self.reload {
            Some(ReloadRun {
                step: Some(Step::WaitReady { old, new, .. }),
                ..
            }) if *new == slot || *old == slot => {
                // The replacement died before it was ready: keep the old
                // worker; or the old one died meanwhile: its slot is free.
                free = true;
                if *new == slot {
                    self.finish_reload(false);
                }
            }
            Some(ReloadRun {
                step: Some(Step::Drain { old }),
                ..
            }) if *old == slot => free = true,
            _ => {}
        }
        if was_replacement || matches!(reason, ExitReason::Reloaded | ExitReason::NotReady) {
            free = true;
        }
        if free {
            let rec = &mut self.slots[slot as usize];
            rec.index = None;
            // A spare again: its history is no instance's.
            rec.unready_since = None;
            rec.unready_deaths = 0;
            entry.index.store(u32::MAX, Release);
            entry.state.store(WorkerState::Free.to_raw(), Release);
            return;
        }
        // Respawn, with backoff, unless it is crash-looping.
        let now = Instant::now();
        let rec = &mut self.slots[slot as usize];
        rec.deaths.push_back(now);
        while rec
            .deaths
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.opts.restart_window)
        {
            rec.deaths.pop_front();
        }
        let deaths = rec.deaths.len();
        if deaths > self.opts.max_restarts {
            rec.failed = true;
            entry.state.store(WorkerState::Failed.to_raw(), Release);
            self.failed.push(slot);
            eprintln!(
                "shmcluster: worker slot {slot} died {deaths} times within {:?}; not restarting it",
                self.opts.restart_window
            );
            self.publish(EventKind::CrashLoop, slot);
            let instances = self.cluster.instances as usize;
            let all_failed = self.index_slot[..instances]
                .iter()
                .all(|&s| self.slots[s as usize].failed);
            if all_failed && !self.gave_up {
                eprintln!(
                    "shmcluster: every worker slot was given up after crash loops; nothing is left to \
                     supervise: the master stops"
                );
                self.gave_up = true;
                self.begin_shutdown();
            }
            return;
        }
        let delay = if deaths <= 1 {
            Duration::ZERO
        } else {
            let factor = 1u32 << (deaths - 2).min(20);
            self.opts
                .backoff_initial
                .saturating_mul(factor)
                .min(self.opts.backoff_max)
        };
        self.slots[slot as usize].restart_at = Some(now + delay);
    }

    /// Notices workers that declared themselves ready, and heartbeats.
    fn observe_workers(&mut self) {
        let segment = self.cluster.segment.clone();
        let now = Instant::now();
        for slot in 0..self.slots.len() as u32 {
            let entry = segment.worker_entry(slot);
            let rec = &mut self.slots[slot as usize];
            if rec.pid.is_none() {
                continue;
            }
            let beat = entry.heartbeat.load(Relaxed);
            if beat != rec.beat || rec.beat_seen.is_none() {
                rec.beat = beat;
                rec.beat_seen = Some(now);
                entry.heartbeat_seen_ns.store(proc::monotonic_ns(), Relaxed);
            }
            if !rec.ready
                && entry.state.load(Acquire) == WorkerState::Ready.to_raw()
                && entry.generation.load(Acquire) == rec.generation
            {
                rec.ready = true;
                rec.unready_deaths = 0;
                rec.unready_since = None;
                rec.beat_seen = Some(now);
                self.publish(EventKind::Online, slot);
                continue;
            }
            let rec = &mut self.slots[slot as usize];
            if let (Some(hang), Some(seen), true, None) =
                (self.opts.hang_timeout, rec.beat_seen, rec.ready, rec.ending)
            {
                if now.duration_since(seen) > hang {
                    rec.ending = Some(ExitReason::Hung);
                    eprintln!("shmcluster: worker slot {slot} heartbeat stopped for {hang:?}; killing it");
                    self.kill(slot);
                }
            }
        }
    }

    /// Sends the slot's worker `SIGKILL` and counts it, once per worker.
    fn kill(&mut self, slot: u32) {
        let rec = &mut self.slots[slot as usize];
        if let (Some(pid), false) = (rec.pid, rec.sigkilled) {
            rec.sigkilled = true;
            self.killed += 1;
            let _ = proc::send_signal(pid, signal::SIGKILL);
        }
    }

    fn run_timers(&mut self) -> io::Result<()> {
        let now = Instant::now();
        for slot in 0..self.slots.len() as u32 {
            let rec = &self.slots[slot as usize];
            if rec.kill_at.is_some_and(|t| now >= t) && rec.pid.is_some() {
                self.slots[slot as usize].kill_at = None;
                eprintln!("shmcluster: worker slot {slot} missed its drain deadline; killing it");
                self.kill(slot);
            }
            let rec = &self.slots[slot as usize];
            if rec.restart_at.is_some_and(|t| now >= t) && rec.pid.is_none() {
                if let Some(index) = rec.index {
                    self.restarts += 1;
                    let entry = self.cluster.segment.worker_entry(slot);
                    entry.restarts.fetch_add(1, AcqRel);
                    if let Err(e) = self.start_worker(slot, index) {
                        // Out of processes or descriptors: try again later
                        // rather than bringing the whole cluster down.
                        eprintln!("shmcluster: cannot restart worker {index} in slot {slot}: {e}; retrying");
                        self.start_failed(slot, &e);
                        self.slots[slot as usize].restart_at =
                            Some(now + self.opts.backoff_initial.max(Duration::from_millis(100)));
                    }
                }
            }
        }
        Ok(())
    }

    fn begin_shutdown(&mut self) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        if !self.gave_up {
            self.judge_health();
        }
        let control = self.cluster.segment.control();
        control.shutdown.store(1, Release);
        sys::futex_wake(&control.shutdown, u32::MAX);
        self.publish(EventKind::ShutdownStarted, u32::MAX);
        if self.reload.is_some() {
            self.finish_reload(false);
        }
        self.reloads_queued = 0;
        let segment = self.cluster.segment.clone();
        for slot in 0..self.slots.len() as u32 {
            let rec = &mut self.slots[slot as usize];
            rec.restart_at = None;
            if let Some(pid) = rec.pid {
                let entry = segment.worker_entry(slot);
                entry.stop.store(STOP_SHUTDOWN, Release);
                entry.state.store(WorkerState::Draining.to_raw(), Release);
                sys::futex_wake(&entry.stop, u32::MAX);
                let _ = proc::send_signal(pid, signal::SIGTERM);
            }
        }
        self.shutdown_deadline = Some(Instant::now() + self.opts.grace);
    }

    /// As a shutdown begins: records every instance whose worker is not
    /// healthy, so that stopping a cluster that never worked is not
    /// reported clean. Unhealthy: a slot making no progress — its last
    /// worker crashed before it was ever ready and none has been ready
    /// since (dead and waiting for its restart, or restarted and not ready
    /// yet); or no ready worker for longer than the ready timeout. A worker
    /// started a moment ago (the first one, or the successor of one that
    /// had been ready, such as a ready worker killed from outside) has had
    /// no chance to be ready and is not judged; a slot whose workers become
    /// ready and then crash again and again is the crash-loop limit's to
    /// give up (which makes the shutdown unclean); one the master is
    /// killing on purpose (hung, holding a lock) is accounted for by that
    /// decision.
    fn judge_health(&mut self) {
        // A worker that declared itself ready since the last look counts.
        self.observe_workers();
        let now = Instant::now();
        for rec in &self.slots {
            let Some(index) = rec.index else { continue };
            // A given-up slot is in `failed`; a reload replacement not yet
            // ready is not the instance's worker (the old one still is),
            // and a worker being replaced by a reload has a ready successor.
            if rec.failed || rec.replacement || rec.ending.is_some() {
                continue;
            }
            let never_ready = rec
                .unready_since
                .is_some_and(|t| now.duration_since(t) > self.opts.ready_timeout);
            let problem = match rec.pid {
                None if rec.unready_deaths > 0 => Unhealthy::Crashing { index },
                Some(_) if rec.ready => continue,
                Some(_) if rec.unready_deaths > 0 => Unhealthy::Crashing { index },
                _ if never_ready => Unhealthy::NeverReady { index },
                _ => continue,
            };
            self.unhealthy.push(problem);
        }
    }

    /// At the grace deadline: kills every worker still running, once, and
    /// reports it once. A worker the master already killed (hung, holding
    /// a lock, not ready) is accounted for by that decision and only
    /// awaits its reap; a killed worker's end is marked as the master's
    /// (`ending`) so that its reap does not report it again as "killed by
    /// signal 9".
    fn kill_remaining(&mut self) {
        for slot in 0..self.slots.len() as u32 {
            let rec = &mut self.slots[slot as usize];
            if rec.pid.is_some() && !rec.sigkilled {
                eprintln!("shmcluster: worker slot {slot} did not exit within the grace period; killing it");
                rec.ending.get_or_insert(ExitReason::Shutdown);
                if let Some(index) = rec.index {
                    self.unhealthy.push(Unhealthy::KilledAtDeadline { index });
                }
                self.kill(slot);
            }
        }
    }

    fn finish_reload(&mut self, ok: bool) {
        if self.reload.take().is_some() {
            self.publish(EventKind::ReloadFinished { ok }, u32::MAX);
        }
    }

    /// Advances the rolling reload by as many steps as are ready.
    fn step_reload(&mut self) -> io::Result<()> {
        loop {
            if self.reload.is_none() {
                if self.reloads_queued == 0 {
                    return Ok(());
                }
                self.reloads_queued -= 1;
                let order = (0..self.cluster.instances)
                    .filter(|&i| !self.slots[self.index_slot[i as usize] as usize].failed)
                    .collect();
                self.reload = Some(ReloadRun {
                    order,
                    pos: 0,
                    step: None,
                });
                self.publish(EventKind::ReloadStarted, u32::MAX);
            }
            let now = Instant::now();
            let Some(run) = self.reload.as_mut() else {
                return Ok(());
            };
            match run.step {
                None => {
                    let Some(&index) = run.order.get(run.pos) else {
                        self.finish_reload(true);
                        continue;
                    };
                    let old = self.index_slot[index as usize];
                    let spare = (0..self.slots.len() as u32).find(|&s| {
                        let r = &self.slots[s as usize];
                        r.pid.is_none() && r.index.is_none() && r.restart_at.is_none()
                    });
                    let Some(new) = spare else {
                        eprintln!("shmcluster: no spare slot for a reload; skipping it");
                        self.finish_reload(false);
                        return Ok(());
                    };
                    if let Err(e) = self.start_worker(new, index) {
                        eprintln!("shmcluster: cannot start a reload replacement for worker {index}: {e}");
                        self.start_failed(new, &e);
                        let rec = &mut self.slots[new as usize];
                        rec.index = None;
                        self.cluster
                            .segment
                            .worker_entry(new)
                            .index
                            .store(u32::MAX, Release);
                        self.cluster
                            .segment
                            .worker_entry(new)
                            .state
                            .store(WorkerState::Free.to_raw(), Release);
                        self.finish_reload(false);
                        return Ok(());
                    }
                    self.slots[new as usize].replacement = true;
                    if let Some(run) = self.reload.as_mut() {
                        run.step = Some(Step::WaitReady {
                            index,
                            old,
                            new,
                            deadline: now + self.opts.ready_timeout,
                        });
                    }
                    return Ok(());
                }
                Some(Step::WaitReady {
                    index,
                    old,
                    new,
                    deadline,
                }) => {
                    if self.slots[new as usize].ready {
                        self.slots[new as usize].replacement = false;
                        self.index_slot[index as usize] = new;
                        let old_pid = self.slots[old as usize].pid;
                        let run = self.reload.as_mut().expect("reload is running");
                        if let Some(pid) = old_pid {
                            let entry = self.cluster.segment.worker_entry(old);
                            entry.stop.store(STOP_DRAIN, Release);
                            entry.state.store(WorkerState::Draining.to_raw(), Release);
                            sys::futex_wake(&entry.stop, u32::MAX);
                            let _ = proc::send_signal(pid, signal::SIGTERM);
                            let rec = &mut self.slots[old as usize];
                            rec.ending = Some(ExitReason::Reloaded);
                            rec.kill_at = Some(now + self.opts.drain_timeout);
                            run.step = Some(Step::Drain { old });
                        } else {
                            run.step = None;
                            run.pos += 1;
                        }
                        continue;
                    }
                    if now >= deadline && self.slots[new as usize].ending.is_none() {
                        eprintln!("shmcluster: reload replacement for worker {index} not ready in time; keeping the old one");
                        self.slots[new as usize].ending = Some(ExitReason::NotReady);
                        self.kill(new);
                    }
                    return Ok(());
                }
                Some(Step::Drain { old }) => {
                    if self.slots[old as usize].pid.is_none() {
                        run.step = None;
                        run.pos += 1;
                        continue;
                    }
                    return Ok(());
                }
            }
        }
    }
}

/// In the forked child of spawn mode: places the listeners at 3, 4, ...,
/// then the segment and the control socket, sets the environment, and
/// execs. Returns only on failure.
#[allow(clippy::too_many_arguments)]
fn exec_worker(
    argv: &[CString],
    segment: &Segment,
    slot: u32,
    index: u32,
    generation: u32,
    instances: u32,
    control: &OwnedFd,
    listeners: &[(BorrowedFd<'_>, &str)],
) -> io::Error {
    let attempt = || -> io::Result<io::Error> {
        // Move the segment, control socket and wake eventfds above where
        // the listeners and they go.
        let wake = segment.wake_fds().unwrap_or(&[]);
        let high = 3 + listeners.len() as RawFd + 2 + wake.len() as RawFd + 16;
        let seg_high = sys::fd::dup_above(segment.fd().as_raw_fd(), high)?;
        let ctl_high = sys::fd::dup_above(control.as_raw_fd(), high)?;
        let wake_high = wake
            .iter()
            .map(|fd| sys::fd::dup_above(fd.as_raw_fd(), high))
            .collect::<io::Result<Vec<RawFd>>>()?;
        let raw: Vec<(RawFd, &str)> = listeners.iter().map(|(fd, n)| (fd.as_raw_fd(), *n)).collect();
        let (mut vars, next) = listen::place_listen_fds(&raw)?;
        if raw.is_empty() {
            vars.clear();
        }
        sys::fd::dup2(seg_high, next)?;
        sys::fd::dup2(ctl_high, next + 1)?;
        let _ = sys::fd::close_raw(seg_high);
        let _ = sys::fd::close_raw(ctl_high);
        for (i, &fd) in wake_high.iter().enumerate() {
            sys::fd::dup2(fd, next + 2 + i as RawFd)?;
            let _ = sys::fd::close_raw(fd);
        }
        vars.push((env::FD.into(), next.to_string()));
        vars.push((env::CONTROL_FD.into(), (next + 1).to_string()));
        if !wake_high.is_empty() {
            vars.push((env::WAKE_FDS.into(), (next + 2).to_string()));
        }
        vars.push((env::WORKER.into(), slot.to_string()));
        vars.push((env::WORKERS.into(), instances.to_string()));
        vars.push((env::GENERATION.into(), generation.to_string()));
        vars.push((env::INDEX.into(), index.to_string()));
        let mut envp: Vec<CString> = std::env::vars_os()
            .filter(|(k, _)| {
                let k = k.to_string_lossy();
                !k.starts_with("SHMCLUSTER_") && !k.starts_with("LISTEN_")
            })
            .filter_map(|(k, v)| {
                let mut kv = k.into_vec();
                kv.push(b'=');
                kv.extend(v.into_vec());
                CString::new(kv).ok()
            })
            .collect();
        for (k, v) in vars {
            envp.push(CString::new(format!("{k}={v}")).map_err(|_| io::ErrorKind::InvalidInput)?);
        }
        Ok(proc::exec(argv, &envp))
    };
    match attempt() {
        Ok(e) | Err(e) => e,
    }
}
