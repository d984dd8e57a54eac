//! The master process: builder, start-up checks, and the supervision loop.
//!
//! The loop is single-threaded and event-driven: signals arrive through a
//! `signalfd` (SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGUSR1, a worker's
//! nudge after it declared itself ready or asked for a reload, and
//! SIGUSR2, an operator's binary upgrade), together
//! with the workers' listener requests on their control sockets and the
//! clients of the master's own control socket (`shmcluster stat`, see
//! `control/`), in one `poll(2)`, with a short tick for timers (backoff,
//! drain and grace deadlines, heartbeats).
//!
//! Where things are: this file holds [`Cluster`] (the master's handle) and
//! the master's own state; `builder.rs` the [`ClusterBuilder`] and the
//! start-up; `report.rs` how a cluster ends ([`Report`]) or fails to
//! start ([`ClusterError`]); `supervise.rs` the loop; `spawn.rs` starting a
//! worker; `exit.rs` a worker's end and the shutdown; `reload.rs` the
//! rolling reload; `notify.rs` systemd's notify protocol (to the service
//! manager, and from the workers); `upgrade.rs` the binary upgrade (the
//! old master's hand-over and the new master's take-over).
//!
//! The host's NATS bridge (feature `nats`, `ClusterBuilder::nats`) is
//! one more instance to the master, with the index `instances`, in a
//! slot of its own: started, respawned, given up and stopped as the
//! others, run from the master's own code in both modes, and left out of
//! reloads and of the "every instance given up" judgement.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::*;
use std::time::Instant;

use super::control::{self, ControlAnswer, ControlRequest, ControlServer};
use super::listen::{ListenAddr, Listeners};
use super::metrics::MetricsServer;
use super::{read_stats, ClusterStats, ExitReason};
use crate::segment::Segment;
use crate::sys;
use crate::sys::signal::MasterSignals;

mod builder;
mod exit;
mod notify;
mod reload;
mod report;
mod spawn;
mod supervise;
mod upgrade;

pub use builder::ClusterBuilder;
use builder::{BridgeConfig, EventCallback, Mode};
pub use report::{ClusterError, Outcome, Report, Unhealthy};

/// The master's side of a running cluster, handed to
/// [`ClusterBuilder::on_event`] callbacks.
pub struct Cluster {
    segment: Segment,
    listeners: RefCell<Listeners>,
    instances: u32,
    reload_asked: Cell<u32>,
    /// Instances asked to be reloaded alone ([`Cluster::reload_instance`]),
    /// each at most once.
    reload_instances_asked: RefCell<Vec<u32>>,
    shutdown_asked: Cell<bool>,
    control_path: Option<PathBuf>,
    metrics_addr: Option<SocketAddr>,
    /// The master this one took over from in a binary upgrade (its pid),
    /// said in `stat` so that a client that followed the old one finds
    /// this one.
    upgraded_from: Option<u32>,
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

    /// Queues a reload of one instance (`shmcluster reload --worker N`):
    /// as one step of a rolling reload, its replacement is started in the
    /// spare slot and the old worker drained once the replacement is
    /// ready, so nothing it serves is dropped. It counts as a reload
    /// (`ReloadStarted`/`ReloadFinished` events, `stat`'s reload
    /// counters); an instance queued already is not queued twice. An
    /// instance given up after a crash loop is not reloaded (the reload
    /// finishes failed). Asked during a shutdown, it never runs.
    ///
    /// # Errors
    /// [`ReloadError::NoSuchInstance`] if `index` is not below
    /// [`Cluster::instances`] (the NATS bridge is no instance).
    ///
    /// # Examples
    /// ```no_run
    /// use shmcluster::{Cluster, EventKind};
    ///
    /// let report = Cluster::builder()
    ///     .workers(3)
    ///     // A worker that held a lock past the hold limit is replaced
    ///     // (replacement first); the others go on as they are.
    ///     .on_event(|cluster, event| {
    ///         if matches!(event.kind, EventKind::LockHeldTooLong { .. }) && event.index != u32::MAX {
    ///             let _ = cluster.reload_instance(event.index);
    ///         }
    ///     })
    ///     .run(|worker| {
    ///         worker.ready();
    ///         while !worker.wait_stop(std::time::Duration::from_secs(1)) {}
    ///         Ok::<(), std::io::Error>(())
    ///     })?;
    /// std::process::exit(report.exit_code());
    /// # Ok::<(), shmcluster::ClusterError>(())
    /// ```
    pub fn reload_instance(&self, index: u32) -> Result<(), ReloadError> {
        if index >= self.instances {
            return Err(ReloadError::NoSuchInstance {
                index,
                instances: self.instances,
            });
        }
        let mut asked = self.reload_instances_asked.borrow_mut();
        if !asked.contains(&index) {
            asked.push(index);
        }
        Ok(())
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

    /// Where the master's metrics endpoint listens, if it has one (see
    /// [`ClusterBuilder::metrics`]; port 0 resolved).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
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
            ControlRequest::Stat => {
                let events_next = self.segment.control().events_published.load(Acquire);
                ControlAnswer::Stats {
                    stats: self.stats(),
                    events_next,
                    upgraded_from: self.upgraded_from,
                }
            }
            ControlRequest::Reload if shutting_down => ControlAnswer::Refused("the cluster is shutting down"),
            ControlRequest::Reload => {
                self.reload();
                ControlAnswer::ReloadQueued
            }
            ControlRequest::ReloadInstance { .. } if shutting_down => {
                ControlAnswer::Refused("the cluster is shutting down")
            }
            ControlRequest::ReloadInstance { index } => match self.reload_instance(index) {
                Ok(()) => ControlAnswer::ReloadQueued,
                Err(e) => ControlAnswer::NoSuchInstance(e),
            },
            ControlRequest::Stop if shutting_down => ControlAnswer::AlreadyShuttingDown,
            ControlRequest::Stop => {
                self.shutdown();
                ControlAnswer::ShutdownStarted
            }
            ControlRequest::Events { since } => {
                let (events, next) =
                    super::event::recent(self.segment.control(), since, control::codec::MAX_EVENTS);
                ControlAnswer::Events { events, next }
            }
            // Carried out by the master's loop (`Master::upgrade_request`),
            // which needs more than the cluster.
            ControlRequest::Upgrade => ControlAnswer::UpgradeRefused("not here".into()),
        }
    }
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

/// A new master told to stop by an abandoned upgrade, not reaped yet.
struct Abandoned {
    pid: u32,
    /// Sent `SIGKILL` at the shutdown's deadline.
    killed: bool,
}

/// What a queued reload replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReloadScope {
    /// Every instance, one after another (`SIGHUP`, `reload`).
    All,
    /// One instance (`reload worker=N`).
    Instance(u32),
}

/// Why [`Cluster::reload_instance`] refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReloadError {
    /// The cluster has no such instance.
    NoSuchInstance {
        /// What was asked for.
        index: u32,
        /// Instances `0..instances` exist.
        instances: u32,
    },
}

impl fmt::Display for ReloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSuchInstance { index, instances } => write!(
                f,
                "no worker {index}: the cluster runs workers 0 to {}",
                instances.saturating_sub(1)
            ),
        }
    }
}

impl std::error::Error for ReloadError {}

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
    /// Reloads asked for and not begun, in order.
    reload_queue: VecDeque<ReloadScope>,
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
    /// systemd's notify protocol, to the service manager and from workers.
    notify: notify::Notify,
    /// The metrics endpoint (`GET /metrics`), if configured.
    metrics: Option<MetricsServer>,
    /// The program and arguments a binary upgrade executes again.
    program: upgrade::Program,
    /// A binary upgrade in progress (this master is the old one).
    upgrade: Option<upgrade::UpgradeRun>,
    /// `SIGUSR2` during a reload: the upgrade starts once it ends.
    upgrade_queued: bool,
    /// This master was started by a binary upgrade.
    upgraded: Option<upgrade::Upgraded>,
    /// The new master this one handed over to (its [`Report`] says so).
    handed_over_to: Option<u32>,
    /// A new master this one told to stop when its own shutdown abandoned
    /// the upgrade (`SIGTERM`: its workers may already serve, and finish
    /// their requests); the shutdown waits for it until its deadline,
    /// then kills it (once).
    abandoned: Option<Abandoned>,
    /// The listeners came from systemd's socket activation (said to a new
    /// master).
    listeners_from_systemd: bool,
}

impl Master<'_> {
    /// A reload runs or is queued.
    fn reloading(&self) -> bool {
        self.reload.is_some() || !self.reload_queue.is_empty()
    }

    /// The host's NATS bridge's instance index (one past the instances'),
    /// if this master runs one.
    fn bridge_index(&self) -> Option<u32> {
        self.opts.bridge_config().map(|_| self.cluster.instances)
    }
}
