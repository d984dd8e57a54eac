//! [`ClusterBuilder`]: the cluster's settings, and the start-up checks
//! that come before any fork.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ffi::{CString, OsString};
use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering::*;
use std::time::Duration;

use super::upgrade::{self, Handed, Upgraded};
use super::{Cluster, ClusterError, Master, Outcome, Report, SlotRec};
use crate::cluster::control::{ControlLocation, ControlServer};
use crate::cluster::listen::{ListenAddr, ListenError, ListenMode, ListenSpec, Listeners};
use crate::cluster::metrics::MetricsServer;
use crate::cluster::threads::ThreadsBuilder;
use crate::cluster::worker::Worker;
use crate::cluster::Event;
use crate::segment::{Config, Segment};
use crate::sys;
use crate::sys::process as proc;
use crate::sys::signal::MasterSignals;
use crate::WaitStrategy;

pub(super) type EventCallback = Box<dyn FnMut(&Cluster, &Event)>;

/// Configures and starts a cluster: [`Cluster::builder`].
///
/// Three ways to run the workers:
/// - **fork mode**, [`run`](Self::run): each worker a forked process
///   running a closure, supervised by this process as the master;
/// - **spawn mode**, [`command`](Self::command): each worker a program of
///   any language, started with its identity in the environment;
/// - **threads mode**, [`threads`](Self::threads): each worker a thread of
///   this process with a real [`Worker`] and no master, for tests, tools
///   and single-process deployments (see its example, which runs as it
///   is).
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
    pub(super) workers: u32,
    pub(super) config: Config,
    pub(super) wait: WaitStrategy,
    pub(super) listen: Vec<Result<ListenSpec, ListenError>>,
    pub(super) backoff_initial: Duration,
    pub(super) backoff_max: Duration,
    pub(super) max_restarts: usize,
    pub(super) restart_window: Duration,
    pub(super) grace: Duration,
    pub(super) drain_timeout: Duration,
    pub(super) ready_timeout: Duration,
    pub(super) hang_timeout: Option<Duration>,
    pub(super) lock_hold_limit: Option<(Duration, bool)>,
    pub(super) ready_on_start: bool,
    pub(super) on_event: Option<EventCallback>,
    pub(super) control: Option<ControlLocation>,
    pub(super) systemd_notify: bool,
    pub(super) worker_notify: bool,
    /// Where to serve the metrics endpoint, as given.
    pub(super) metrics: Option<String>,
    /// The host's NATS bridge, if it has one (feature `nats`).
    #[cfg(feature = "nats")]
    pub(super) nats: Option<crate::bridge::NatsConfig>,
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
            systemd_notify: true,
            worker_notify: true,
            metrics: None,
            #[cfg(feature = "nats")]
            nats: None,
        }
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
    /// new segment, and no master. Its `run` runs the closure on every
    /// thread, joins them and reports how they ended.
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
    /// reported [`WorkerState::Failed`](crate::WorkerState::Failed) and by a `CrashLoop` event).
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
    /// ([`Unhealthy::NeverReady`](crate::Unhealthy::NeverReady)); and a
    /// binary upgrade's new master must have every instance ready within
    /// it, or it is killed and this master keeps serving (see
    /// [`run`](Self::run)).
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

    /// Speak systemd's notify protocol to the service manager when
    /// `NOTIFY_SOCKET` is set (on by default): `READY=1` once every
    /// instance has a ready worker, `RELOADING=1` (with `MONOTONIC_USEC=`)
    /// and `READY=1` around a rolling reload, `STOPPING=1` when the
    /// shutdown begins, `STATUS=` lines (workers ready, restarts), and
    /// `WATCHDOG=1` every half `WATCHDOG_USEC` while the master's loop
    /// turns (if `WATCHDOG_PID` is unset or the master's pid). A unit
    /// with `Type=notify` and `NotifyAccess=main` fits it. Sends never
    /// block; a failed one is logged once.
    pub fn systemd_notify(mut self, yes: bool) -> Self {
        self.systemd_notify = yes;
        self
    }

    /// Spawn mode: give each worker a `NOTIFY_SOCKET` of its own, a
    /// datagram socket the master owns (on by default), so that a program
    /// that speaks systemd's notify protocol needs no binding: `READY=1`
    /// makes it ready (as [`Worker::ready`]), `WATCHDOG=1` beats its
    /// heartbeat (as [`Worker::heartbeat`]), `STOPPING=1` marks it
    /// draining. Only datagrams from the worker's own pid count
    /// (`SCM_CREDENTIALS`): a child of the worker is not believed. With a
    /// [`hang_timeout`](Self::hang_timeout), the worker also gets it as
    /// `WATCHDOG_USEC` (and its pid as `WATCHDOG_PID`). Off, a worker sees
    /// no `NOTIFY_SOCKET` at all: the master's own (and `WATCHDOG_*`)
    /// never reach workers either way.
    pub fn worker_notify(mut self, yes: bool) -> Self {
        self.worker_notify = yes;
        self
    }

    /// Serve the cluster's figures at `addr` (`host:port`, port 0 for a
    /// free one; see [`Cluster::metrics_addr`]) over HTTP, `GET /metrics`,
    /// in the OpenMetrics text format Prometheus scrapes: each worker
    /// slot's state, restarts, heartbeat age, messages and bytes sent and
    /// received, inbox bytes and futex waits and wakes; each lock's
    /// acquisitions, waits, owner-died recoveries and hold time; reloads,
    /// crash loops, exits by reason and events by kind; the NATS bridge's
    /// connected hosts. The same figures as `shmcluster stat`, read from
    /// the segment at each scrape.
    ///
    /// Served inside the master's loop without ever blocking it:
    /// non-blocking sockets, a request head of at most 8 KiB sent within a
    /// second, at most 16 clients at once, one request per connection.
    /// Other requests get a plain-text 400, 404, 405 or 431. There is no
    /// authentication: give a loopback address unless the figures may be
    /// read by anyone who reaches it (another address is served, with a
    /// warning on stderr).
    ///
    /// # Errors
    /// `run`/`command` fail with [`ClusterError::Metrics`] if it cannot be
    /// bound (before any fork).
    ///
    /// # Examples
    /// ```no_run
    /// use shmcluster::Cluster;
    ///
    /// let report = Cluster::builder()
    ///     .workers(2)
    ///     .metrics("127.0.0.1:9464")
    ///     .run(|worker| {
    ///         worker.ready();
    ///         while !worker.wait_stop(std::time::Duration::from_secs(1)) {}
    ///         Ok::<(), std::io::Error>(())
    ///     })?;
    /// std::process::exit(report.exit_code());
    /// # Ok::<(), shmcluster::ClusterError>(())
    /// ```
    pub fn metrics(mut self, addr: impl Into<String>) -> Self {
        self.metrics = Some(addr.into());
        self
    }

    /// Joins this host to the other hosts of its cluster through NATS
    /// (feature `nats`): the master runs one more process, the host's
    /// bridge, which carries broadcasts, maps, consumes and calls across
    /// hosts (see [`crate::bridge`]).
    ///
    /// The bridge has a slot of its own in the segment, with the instance
    /// index [`workers`](Self::workers) (one past the application's
    /// indices), and is not one of the application's instances:
    /// [`Worker::instances`] and [`Cluster::instances`] do not count it,
    /// [`Worker::wait_all_ready`] does not wait for it, and
    /// [`Worker::peers`] and the stats mark its row
    /// ([`Peer::bridge`](crate::Peer::bridge),
    /// [`SlotStats::bridge`](crate::SlotStats::bridge)). The master
    /// forks it at start-up like a worker (in spawn mode too: it runs the
    /// master's own code, no program is executed), respawns it with the
    /// same backoff when it dies and gives its slot up after the same
    /// crash-loop limit (which makes the shutdown unclean but does not
    /// stop the cluster: [`Outcome::AllGivenUp`] counts the application's
    /// instances only), and stops it on shutdown with the rest. A rolling
    /// reload replaces the application's workers and never the bridge, so
    /// that a reload does not cut the host off from the others. The hang
    /// timeout and the lock hold limit apply to it as to any worker.
    ///
    /// The segment gets one more slot for it, so the most instances a
    /// cluster with a bridge can have is one fewer.
    ///
    /// # Errors
    /// `run`/`command` fail with [`ClusterError::Nats`] if the
    /// configuration is invalid ([`NatsConfig::validate`]), before any
    /// fork. Whether the servers can be reached is the bridge's business,
    /// once it runs.
    ///
    /// [`NatsConfig::validate`]: crate::bridge::NatsConfig::validate
    ///
    /// # Examples
    /// ```no_run
    /// use shmcluster::bridge::NatsConfig;
    /// use shmcluster::Cluster;
    ///
    /// let nats = NatsConfig::new("nats://10.0.0.5:4222", "shop", "web-1")
    ///     .credentials_from_env()?;
    /// let report = Cluster::builder().workers(4).nats(nats).run(|worker| {
    ///     worker.ready();
    ///     while !worker.wait_stop(std::time::Duration::from_secs(1)) {}
    ///     Ok::<(), std::io::Error>(())
    /// })?;
    /// std::process::exit(report.exit_code());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[cfg(feature = "nats")]
    pub fn nats(mut self, config: crate::bridge::NatsConfig) -> Self {
        self.nats = Some(config);
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
    /// # Binary upgrade
    /// A rolling reload forks the workers again from this process's
    /// image, so it never loads new code. `SIGUSR2` (or `shmcluster
    /// upgrade` on the [control socket](Self::control_socket)) executes
    /// the program again as it is now on disk (the path it was started
    /// from; a new build renamed over it is what runs), with the same
    /// arguments and environment: its `main` runs again and reaches this
    /// builder, which finds the `SHMCLUSTER_UPGRADE` variable and takes
    /// over the listening sockets (as `LISTEN_FDS`), the control socket
    /// and the metrics endpoint instead of binding them, then starts its
    /// own workers. Once every instance of the new master is ready, this
    /// master drains its workers as on `SIGTERM` and `run` returns a
    /// [`Report`] whose [`upgraded_to`](Report::upgraded_to) names the new
    /// master (exit code 0 after a clean drain), while the new master
    /// serves on. A new
    /// master that fails, exits or is not ready within the
    /// [ready timeout](Self::ready_timeout) is killed with its workers, and
    /// this master keeps serving (an `UpgradeFinished { ok: false }`
    /// event); one asked to stop (`SIGTERM`, `stop`) once it is ready but
    /// before this master handed over stops this one too (`run` returns
    /// a plain shutdown's [`Report`]). Nothing is to be done for it but
    /// to let `main` reach the builder again: before it, do nothing that
    /// a second copy of the
    /// program cannot do while the first runs (bind a port of its own,
    /// take a pid-file lock). The two generations do not share a segment:
    /// messages and locks are per master while both run.
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
                    say!("shmcluster worker {index}: {e}");
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
        match spawn_argv(argv.into_iter().map(Into::into).collect()) {
            Ok(argv) => self.start(Mode::Spawn(argv)),
            Err(e) => {
                // Not started: a binary upgrade's old master hears why.
                upgrade::report_unstarted(&e.to_string());
                Err(e)
            }
        }
    }

    fn start(self, mode: Mode<'_>) -> Result<Report, ClusterError> {
        // Before anything else reads the environment: a master started by
        // a binary upgrade takes its old master's sockets (upgrade.rs).
        let threads = proc::thread_count()?;
        if threads != 1 {
            let e = ClusterError::NotSingleThreaded { threads };
            upgrade::report_unstarted(&e.to_string());
            return Err(e);
        }
        let mut handed = Handed::take_from_env().map_err(|reason| ClusterError::Upgrade { reason })?;
        let mut report_to = handed.as_mut().and_then(|h| h.ready.take());
        let result = self.start_master(mode, handed, &mut report_to);
        // Not started: the old master hears why (and keeps serving).
        if let (Err(e), Some(ready)) = (&result, &report_to) {
            upgrade::report_error(ready, &e.to_string());
        }
        result
    }

    fn start_master(
        mut self,
        mode: Mode<'_>,
        handed: Option<Handed>,
        report_to: &mut Option<OwnedFd>,
    ) -> Result<Report, ClusterError> {
        let program = upgrade::Program::current();
        // Slots besides the instances': one spare for reloads, and the
        // bridge's if there is one.
        let bridges = self.bridges();
        let max = crate::MAX_WORKERS - 1 - bridges;
        let instances = match self.workers {
            0 => std::thread::available_parallelism()
                .map_or(1, |n| n.get() as u32)
                .min(max),
            n if n > max => return Err(ClusterError::Workers { requested: n, max }),
            n => n,
        };
        #[cfg(feature = "nats")]
        if let Some(nats) = &self.nats {
            nats.validate().map_err(ClusterError::Nats)?;
        }
        let specs = std::mem::take(&mut self.listen)
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(ClusterError::Listen)?;
        let slots = instances + 1 + bridges;
        let config = Config {
            workers: slots,
            ..self.config.clone()
        };
        crate::Layout::new(&config).map_err(ClusterError::Config)?;
        let master_pid = sys::getpid();
        let (mut handed_control, mut handed_metrics, mut old_pid) = (None, None, None);
        let mut listeners_from_systemd = false;
        let listeners = match handed {
            // A binary upgrade: the old master's sockets, matched to ours.
            Some(h) => {
                listeners_from_systemd = h.systemd;
                handed_control = h.control;
                handed_metrics = h.metrics;
                old_pid = Some(h.old_pid);
                Listeners::adopt(&specs, instances, h.listeners, h.inherited, h.systemd)
                    .map_err(ClusterError::Listen)?
            }
            // systemd socket activation: its sockets replace ours.
            None => match Listeners::from_systemd_env().map_err(ClusterError::Listen)? {
                Some(l) => {
                    listeners_from_systemd = true;
                    l
                }
                None => Listeners::bind(&specs, instances).map_err(ClusterError::Listen)?,
            },
        };
        let segment = Segment::create(&config).map_err(ClusterError::Create)?;
        let mut rename_control_to = None;
        let control_server = match self.control.take() {
            // The old master's control socket, if it is the one we want:
            // the same path, or both the default (renamed to ours once the
            // old master is gone).
            Some(at) => match (handed_control.take(), &at) {
                (Some((fd, path)), ControlLocation::Path(want)) if *want == path => Some(
                    ControlServer::adopt(fd, path).map_err(|error| ClusterError::Control {
                        path: want.clone(),
                        error,
                    })?,
                ),
                (Some((fd, path)), ControlLocation::Default)
                    if old_pid.is_some_and(|old| Cluster::default_control_path(old) == path) =>
                {
                    rename_control_to = Some(Cluster::default_control_path(master_pid));
                    Some(
                        ControlServer::adopt(fd, path.clone())
                            .map_err(|error| ClusterError::Control { path, error })?,
                    )
                }
                _ => Some(
                    ControlServer::bind(&at, master_pid)
                        .map_err(|(path, error)| ClusterError::Control { path, error })?,
                ),
            },
            None => None,
        };
        let metrics_server = match self.metrics.take() {
            Some(addr) => {
                let server = match handed_metrics.take() {
                    Some(fd) => MetricsServer::adopt(&addr, fd),
                    None => MetricsServer::bind(&addr),
                };
                Some(server.map_err(|e| ClusterError::Metrics {
                    addr: e.addr,
                    error: e.error,
                })?)
            }
            None => None,
        };
        let signals = MasterSignals::install()?;
        let control = segment.control();
        control.master_pid.store(master_pid, Release);
        control.instances.store(instances, Release);
        for slot in 0..slots {
            segment.worker_entry(slot).index.store(u32::MAX, Release);
        }
        // The bridge's index is one past the instances'; said before any
        // worker starts, so that none takes the bridge for an instance.
        if bridges != 0 {
            control.bridge.store(instances + 1, Release);
        }
        let cluster = Cluster {
            segment,
            listeners: RefCell::new(listeners),
            instances,
            reload_asked: Cell::new(0),
            reload_instances_asked: RefCell::new(Vec::new()),
            shutdown_asked: Cell::new(false),
            control_path: control_server.as_ref().map(|c| c.path().to_path_buf()),
            metrics_addr: metrics_server.as_ref().map(MetricsServer::local_addr),
            upgraded_from: old_pid,
        };
        let on_event = self.on_event.take();
        let mut notify = super::notify::Notify::new(
            self.systemd_notify,
            self.worker_notify && matches!(mode, Mode::Spawn(_)),
            master_pid,
            slots,
            self.hang_timeout,
        );
        let upgraded = old_pid.map(|old| {
            notify.announce_mainpid(master_pid);
            Upgraded::new(old, report_to.take(), rename_control_to)
        });
        let mut master = Master {
            opts: self,
            cluster,
            mode,
            signals,
            master_pid,
            slots: (0..slots).map(|_| SlotRec::default()).collect(),
            // The bridge starts in the slot of its index, as the instances.
            index_slot: (0..instances + bridges).collect(),
            reload: None,
            reload_queue: VecDeque::new(),
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
            notify,
            metrics: metrics_server,
            program,
            upgrade: None,
            upgrade_queued: false,
            upgraded,
            handed_over_to: None,
            abandoned: None,
            listeners_from_systemd,
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
            handed_over_to,
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
            upgraded_to: handed_over_to,
        };
        // Clients of `stop --wait` learn how it ended before the socket goes.
        if let Some(control) = control {
            control.finish(&report);
        }
        Ok(report)
    }
}

impl ClusterBuilder {
    /// Slots the host's NATS bridge takes: 1 with one, else 0.
    fn bridges(&self) -> u32 {
        #[cfg(feature = "nats")]
        if self.nats.is_some() {
            return 1;
        }
        0
    }

    /// The bridge's configuration, if this master runs one.
    pub(super) fn bridge_config(&self) -> Option<&BridgeConfig> {
        #[cfg(feature = "nats")]
        return self.nats.as_ref();
        #[cfg(not(feature = "nats"))]
        None
    }
}

/// What the bridge's process is started with: [`NatsConfig`] with the
/// feature `nats`; without it, a type with no value (there is no bridge).
///
/// [`NatsConfig`]: crate::bridge::NatsConfig
#[cfg(feature = "nats")]
pub(super) type BridgeConfig = crate::bridge::NatsConfig;

/// Without the feature `nats` there is no bridge: a type with no value.
#[cfg(not(feature = "nats"))]
#[derive(Clone)]
pub(super) enum BridgeConfig {}

/// Spawn mode's command line, checked before anything starts: a program
/// that can be executed, arguments without NUL bytes.
fn spawn_argv(argv: Vec<OsString>) -> Result<Vec<CString>, ClusterError> {
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
    argv.into_iter()
        .map(|a| CString::new(a.into_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| ClusterError::Command {
            program: name,
            reason: "an argument contains a NUL byte".into(),
        })
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

pub(super) enum Mode<'a> {
    Fork(&'a mut dyn FnMut(Worker) -> i32),
    Spawn(Vec<CString>),
}
