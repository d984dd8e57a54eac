//! The worker's side of the cluster: identity, readiness, heartbeat, stop
//! requests, peers, listeners, events.

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::time::{Duration, Instant};

use super::listen::{self, ListenAddr, ListenError, ListenMode, Listener};
use super::{bridge_index, read_peer, read_stats, ClusterStats, Peer, WorkerState};
use crate::error::{AttachError, EndpointError};
use crate::segment::table::{STOP_DRAIN, STOP_RUN, STOP_SHUTDOWN};
use crate::segment::Segment;
use crate::sys;
use crate::{Endpoint, WaitStrategy};

mod events;
mod incoming;
mod stop_watch;

pub use events::Events;
pub use incoming::Incoming;
pub use stop_watch::StopWatch;

/// How long a runtime listener request waits for the master's answer.
const LISTEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often blocking waits look at the `SIGTERM` flag and the heartbeat.
const POLL_SLICE: Duration = Duration::from_millis(50);

/// A worker process's handle on the cluster: its [`Endpoint`] (its slot's
/// lanes) plus its identity and its conversation with the master.
///
/// In fork mode ([`crate::ClusterBuilder::run`]) the closure receives one; a
/// spawned program ([`crate::ClusterBuilder::command`]) builds it with
/// [`Worker::from_env`].
///
/// A worker is ready when it says so ([`Worker::ready`]): the master
/// publishes `Online`, and a rolling reload waits for it before draining the
/// worker it replaces.
///
/// # Without a master
/// In threads mode ([`crate::ClusterBuilder::threads`]) each thread gets a
/// worker of its own on one segment, and no master process runs. Such a
/// worker has no listeners and no control socket; its readiness and
/// heartbeat are recorded in the worker table for its peers and
/// [`Worker::stats`]; a stop comes only from [`Worker::request_shutdown`]
/// (made by any worker of the segment, it stops them all) or a `SIGTERM`
/// the process turned into a request; there is nothing to reload. Each
/// method says what it does then.
pub struct Worker {
    segment: Segment,
    endpoint: Endpoint,
    slot: u32,
    index: u32,
    generation: u32,
    instances: u32,
    control: Option<OwnedFd>,
    listeners: Vec<Listener>,
    /// Whether a master runs the segment: fork and spawn mode, and a
    /// worker attached to a running cluster's segment, which then asks that
    /// master (and leaves its table alone); `false` in threads mode and on
    /// a bare segment ([`Worker::unmanaged`]).
    managed: bool,
    /// Whether the master started this worker (fork and spawn mode):
    /// [`Worker::has_master`].
    started_by_master: bool,
    /// The lock table, made on first use (the glibc check and the name
    /// cache then serve every later section).
    locks: std::cell::OnceCell<crate::Locks>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("slot", &self.slot)
            .field("index", &self.index)
            .field("generation", &self.generation)
            .field("instances", &self.instances)
            .finish_non_exhaustive()
    }
}

/// Without a master a worker records its own end: `Dead` in the worker
/// table, where its peers ([`Worker::peers`]) look (a master records it
/// when it reaps the process).
impl Drop for Worker {
    fn drop(&mut self) {
        if self.managed {
            return;
        }
        let entry = self.entry();
        if entry.generation.load(Acquire) == self.generation {
            entry.state.store(WorkerState::Dead.to_raw(), Release);
            self.nudge_master();
        }
    }
}

/// Why [`Worker::from_env`] could not attach.
#[derive(Debug)]
#[non_exhaustive]
pub enum WorkerError {
    /// An environment variable is missing or malformed.
    Env {
        /// The variable.
        var: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The descriptor in `SHMCLUSTER_FD` is not a usable segment.
    Attach(AttachError),
    /// The slot could not be claimed (another live process holds it, or
    /// the master has already replaced this worker).
    Endpoint(EndpointError),
    /// The inherited listeners are malformed.
    Listen(ListenError),
    /// A system call failed.
    Io(io::Error),
}

impl std::fmt::Display for WorkerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Env { var, reason } => write!(f, "environment variable {var}: {reason}"),
            Self::Attach(e) => write!(f, "cannot attach to the cluster segment: {e}"),
            Self::Endpoint(e) => write!(f, "cannot claim the worker slot: {e}"),
            Self::Listen(e) => write!(f, "inherited listeners: {e}"),
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for WorkerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Attach(e) => Some(e),
            Self::Endpoint(e) => Some(e),
            Self::Listen(e) => Some(e),
            Self::Io(e) => Some(e),
            Self::Env { .. } => None,
        }
    }
}

/// The environment variables a spawned worker is started with.
pub(crate) mod env {
    /// Descriptor number of the segment's memfd.
    pub const FD: &str = "SHMCLUSTER_FD";
    /// The worker's slot.
    pub const WORKER: &str = "SHMCLUSTER_WORKER";
    /// Number of worker instances.
    pub const WORKERS: &str = "SHMCLUSTER_WORKERS";
    /// The worker's generation in its slot.
    pub const GENERATION: &str = "SHMCLUSTER_GENERATION";
    /// The worker's instance number.
    pub const INDEX: &str = "SHMCLUSTER_INDEX";
    /// Descriptor number of the worker's socket to the master.
    pub const CONTROL_FD: &str = "SHMCLUSTER_CONTROL_FD";
    /// The first of the segment's per-slot eventfds (one per slot, at
    /// consecutive numbers), for async receivers.
    pub const WAKE_FDS: &str = "SHMCLUSTER_WAKE_FDS";
}

/// Whether the master asked the worker in `slot` to stop (drain or
/// shutdown), or this process got `SIGTERM`/`SIGINT`.
pub(crate) fn stop_requested(segment: &Segment, slot: u32) -> bool {
    segment.worker_entry(slot).stop.load(Acquire) != STOP_RUN
        || segment.control().shutdown.load(Acquire) != 0
        || sys::signal::sigterm_seen()
}

static FROM_ENV_TAKEN: AtomicBool = AtomicBool::new(false);

fn env_u32(var: &'static str) -> Result<u32, WorkerError> {
    let value = std::env::var(var).map_err(|e| WorkerError::Env {
        var,
        reason: e.to_string(),
    })?;
    value.trim().parse().map_err(|e| WorkerError::Env {
        var,
        reason: format!("{value:?}: {e}"),
    })
}

impl Worker {
    /// Attaches a spawned worker from the environment the master gave it:
    /// `SHMCLUSTER_FD`, `SHMCLUSTER_WORKER`, `SHMCLUSTER_WORKERS`,
    /// `SHMCLUSTER_GENERATION` (plus `SHMCLUSTER_INDEX`,
    /// `SHMCLUSTER_CONTROL_FD` and the systemd-style `LISTEN_FDS`). The
    /// descriptors are taken once: a second call in the same process fails.
    /// Like fork mode, it makes `SIGTERM` request a stop instead of killing
    /// the process (see [`Worker::should_stop`]).
    ///
    /// # Errors
    /// [`WorkerError`] naming the variable, or the attach/claim failure.
    pub fn from_env() -> Result<Self, WorkerError> {
        let fd = env_u32(env::FD)?;
        let slot = env_u32(env::WORKER)?;
        let instances = env_u32(env::WORKERS)?;
        let generation = env_u32(env::GENERATION)?;
        let index = env_u32(env::INDEX).unwrap_or(slot);
        let control = env_u32(env::CONTROL_FD).ok();
        if FROM_ENV_TAKEN.swap(true, AcqRel) {
            return Err(WorkerError::Env {
                var: env::FD,
                reason: "already taken by an earlier Worker::from_env in this process".into(),
            });
        }
        let raw = i32::try_from(fd).map_err(|_| WorkerError::Env {
            var: env::FD,
            reason: format!("{fd} is not a descriptor number"),
        })?;
        // SAFETY: the descriptor named by SHMCLUSTER_FD was placed there by
        // the master for this process; `FROM_ENV_TAKEN` makes sure only one
        // owner is ever created for it here.
        let segment = unsafe { Segment::attach_raw_fd(raw) }.map_err(WorkerError::Attach)?;
        let control = match control.and_then(|c| i32::try_from(c).ok()) {
            // SAFETY: as for the segment: placed by the master for us, taken once.
            Some(c) => Some(unsafe { sys::adopt_fd(c) }.map_err(WorkerError::Io)?),
            None => None,
        };
        if let Ok(first) = env_u32(env::WAKE_FDS) {
            let slots = segment.layout().workers();
            let mut fds = Vec::with_capacity(slots as usize);
            for i in 0..slots {
                let raw = i32::try_from(u64::from(first) + u64::from(i)).map_err(|_| WorkerError::Env {
                    var: env::WAKE_FDS,
                    reason: format!("{first} is not a descriptor number"),
                })?;
                // SAFETY: the master placed the slots' eventfds at these
                // numbers for this process; `FROM_ENV_TAKEN` makes sure they
                // are adopted once.
                let fd = unsafe { sys::adopt_fd(raw) }.map_err(WorkerError::Io)?;
                // Placed with dup2, so inheritable: not past this process.
                sys::fd::set_cloexec(fd.as_fd(), true).map_err(WorkerError::Io)?;
                fds.push(fd);
            }
            segment.set_wake_fds(fds).map_err(WorkerError::Io)?;
        }
        let listeners = listen::inherited_listeners().map_err(WorkerError::Listen)?;
        let worker = Self::attach(segment, slot, index, generation, instances, control, listeners)?;
        sys::signal::catch_sigterm().map_err(WorkerError::Io)?;
        Ok(worker)
    }

    /// Claims `slot` at `generation` (fork mode and [`Worker::from_env`]).
    pub(crate) fn attach(
        segment: Segment,
        slot: u32,
        index: u32,
        generation: u32,
        instances: u32,
        control: Option<OwnedFd>,
        listeners: Vec<Listener>,
    ) -> Result<Self, WorkerError> {
        let endpoint = segment
            .endpoint_assigned(slot, generation)
            .map_err(WorkerError::Endpoint)?;
        Ok(Self {
            segment,
            endpoint,
            slot,
            index,
            generation,
            instances,
            control,
            listeners,
            managed: true,
            started_by_master: true,
            locks: std::cell::OnceCell::new(),
        })
    }

    /// A worker without a master (threads mode) over `endpoint`: its slot
    /// and generation are the endpoint's, its instance number its slot;
    /// no control socket, no listeners. It records itself `Starting` in the
    /// worker table (index, pid, generation), as a master would, so that
    /// [`Worker::ready`], [`Worker::peers`] and [`Worker::wait_all_ready`]
    /// work as in a cluster. `instances`: how many workers share the
    /// segment.
    pub(crate) fn unmanaged(endpoint: Endpoint, instances: u32) -> Self {
        let segment = endpoint.segment().clone();
        let slot = endpoint.slot();
        let generation = endpoint.generation();
        // A segment with a master (a process that attached to a running
        // cluster's segment) keeps the master's table as the master wrote
        // it: this worker then asks the master, as a managed one does.
        let master = segment.control().master_pid.load(Acquire) != 0;
        if !master {
            let entry = segment.worker_entry(slot);
            entry.index.store(slot, Release);
            entry.pid.store(sys::getpid(), Release);
            entry.generation.store(generation, Release);
            entry.stop.store(STOP_RUN, Release);
            entry.started_ns.store(sys::process::monotonic_ns(), Release);
            // Last: a peer that sees `Starting` sees the fields above.
            entry.state.store(WorkerState::Starting.to_raw(), Release);
        }
        Self {
            segment,
            endpoint,
            slot,
            index: slot,
            generation,
            instances,
            control: None,
            listeners: Vec::new(),
            managed: master,
            started_by_master: false,
            locks: std::cell::OnceCell::new(),
        }
    }

    /// This worker's slot: its messaging address.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// This worker's instance number (`0..instances`), kept across
    /// respawns and reloads. The host's NATS bridge (feature `nats`) has
    /// the index `instances`, one past the application's.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// This worker's generation in its slot.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// How many worker instances the master keeps running (the
    /// application's: not the host's NATS bridge, if it has one).
    pub fn instances(&self) -> u32 {
        self.instances
    }

    /// The segment this worker is attached to.
    pub fn segment(&self) -> &Segment {
        &self.segment
    }

    /// This worker's endpoint, to send and receive messages.
    pub fn endpoint(&mut self) -> &mut Endpoint {
        &mut self.endpoint
    }

    pub(crate) fn endpoint_ref(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Sets the endpoint's wait strategy.
    pub fn set_wait_strategy(&mut self, wait: WaitStrategy) {
        self.endpoint.set_wait_strategy(wait);
    }

    fn entry(&self) -> &crate::segment::table::WorkerEntry {
        self.segment.worker_entry(self.slot)
    }

    /// Declares this worker ready: the master publishes `Online`, and a
    /// reload waiting on it goes on. Calling it again does nothing.
    ///
    /// Without a master it marks the worker `Ready` in the worker table
    /// (what [`Worker::peers`] and [`Worker::wait_all_ready`] read).
    pub fn ready(&self) {
        let entry = self.entry();
        if entry.generation.load(Acquire) != self.generation {
            return;
        }
        let starting = WorkerState::Starting.to_raw();
        if entry
            .state
            .compare_exchange(starting, WorkerState::Ready.to_raw(), AcqRel, Acquire)
            .is_ok()
        {
            entry.ready_ns.store(sys::process::monotonic_ns(), Release);
            self.nudge_master();
        }
        self.heartbeat();
    }

    /// Shows the master this worker is alive. The endpoint's receive calls
    /// (and [`Worker::incoming`]) do it already; a worker that does neither
    /// for longer than the hang timeout must call it. Without a master it
    /// only moves the counter in the worker table: nobody watches it.
    pub fn heartbeat(&self) {
        self.endpoint.beat();
    }

    /// Whether a master started this worker (fork or spawn mode); false in
    /// threads mode, for a worker on a bare segment (both behave as
    /// "Without a master" says), and for one that attached to a running
    /// cluster's segment by itself (it asks that master for a shutdown or a
    /// reload, but is none of its instances).
    pub fn has_master(&self) -> bool {
        self.started_by_master
    }

    /// Whether the master asked this worker to stop: drain for a reload,
    /// the cluster shutting down, or a `SIGTERM`. Without a master: whether
    /// a worker of the segment called [`Worker::request_shutdown`] (or a
    /// `SIGTERM` was turned into a request).
    pub fn should_stop(&self) -> bool {
        stop_requested(&self.segment, self.slot)
    }

    /// Whether this worker is being replaced by a rolling reload (never,
    /// without a master).
    pub fn is_draining(&self) -> bool {
        self.entry().stop.load(Acquire) == STOP_DRAIN
    }

    /// Whether the cluster is shutting down (without a master: since a
    /// worker of the segment called [`Worker::request_shutdown`]).
    pub fn is_shutting_down(&self) -> bool {
        self.segment.control().shutdown.load(Acquire) != 0
    }

    /// Waits up to `timeout` for a stop request; returns
    /// [`Worker::should_stop`]. Beats the heartbeat while it waits.
    pub fn wait_stop(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.should_stop() {
                return true;
            }
            self.heartbeat();
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            sys::futex_wait(
                &self.entry().stop,
                STOP_RUN,
                Some((deadline - now).min(POLL_SLICE)),
            );
        }
    }

    /// Asks the master for a rolling reload of every worker (this one
    /// included), as `SIGHUP` to the master does. Reloads requested while
    /// one runs are queued. Without a master it does nothing: there is no
    /// process to replace the threads.
    pub fn request_reload(&self) {
        if !self.managed {
            return;
        }
        self.segment.control().reload_requests.fetch_add(1, AcqRel);
        self.nudge_master();
    }

    /// The segment's lock table, with this worker recorded as holder.
    ///
    /// # Errors
    /// [`crate::LockError::Glibc`] below glibc 2.25.
    pub fn locks(&self) -> Result<crate::Locks, crate::LockError> {
        crate::Locks::new(&self.segment, self.slot)
    }

    fn cached_locks(&self) -> Result<&crate::Locks, crate::LockError> {
        if let Some(l) = self.locks.get() {
            return Ok(l);
        }
        let _ = self.locks.set(crate::Locks::new(&self.segment, self.slot)?);
        Ok(self.locks.get().expect("just set"))
    }

    /// Runs `f` holding the cluster's global lock: see
    /// [`crate::Locks::synchronize`].
    ///
    /// # Errors
    /// As [`crate::Locks::synchronize`].
    pub fn synchronize<R>(&self, f: impl FnOnce(&crate::Section) -> R) -> Result<R, crate::LockError> {
        self.cached_locks()?.synchronize(f)
    }

    /// Runs `f` holding the lock named `name`: see
    /// [`crate::Locks::synchronize_key`].
    ///
    /// # Errors
    /// As [`crate::Locks::synchronize_key`].
    pub fn synchronize_key<R>(
        &self,
        name: &str,
        f: impl FnOnce(&crate::Section) -> R,
    ) -> Result<R, crate::LockError> {
        self.cached_locks()?.synchronize_key(name, f)
    }

    /// Runs `f` holding lock `name` if it can be had within `timeout`.
    ///
    /// # Errors
    /// As [`crate::Locks::try_synchronize`].
    pub fn try_synchronize<R>(
        &self,
        name: &str,
        timeout: Duration,
        f: impl FnOnce(&crate::Section) -> R,
    ) -> Result<R, crate::LockError> {
        self.cached_locks()?.try_synchronize(name, timeout, f)
    }

    /// Asks the master for a graceful shutdown of the whole cluster, as
    /// `SIGTERM` to the master does. Without a master it is the shutdown
    /// itself: every worker of the segment sees [`Worker::should_stop`] and
    /// [`Worker::is_shutting_down`] from now on, and their
    /// [`Worker::wait_stop`] returns.
    pub fn request_shutdown(&self) {
        let control = self.segment.control();
        control.shutdown_requests.fetch_add(1, AcqRel);
        if self.managed {
            self.nudge_master();
            return;
        }
        // What the master's `begin_shutdown` does, minus the signals: the
        // cluster-wide word, then every slot's stop word, each woken.
        control.shutdown.store(1, Release);
        sys::futex_wake(&control.shutdown, u32::MAX);
        for slot in 0..self.segment.layout().workers() {
            let entry = self.segment.worker_entry(slot);
            entry.stop.store(STOP_SHUTDOWN, Release);
            sys::futex_wake(&entry.stop, u32::MAX);
        }
    }

    /// Waits up to `timeout` until every instance has a ready worker (the
    /// master starts them one after another, and a worker not yet started
    /// is not live: a `broadcast` or `map` made earlier misses it). Returns
    /// whether they all are. The host's NATS bridge (feature `nats`) is
    /// not one of the instances and is not waited for. Without a master: until every thread's worker
    /// has called [`Worker::ready`] (a worker already dropped is `Dead`,
    /// not ready).
    pub fn wait_all_ready(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let control = self.segment.control();
            // Read before looking, so an Online event in between is not missed.
            let seen = control.events_futex.load(Acquire);
            let ready = self
                .peers()
                .iter()
                .filter(|p| p.state == WorkerState::Ready && !p.bridge)
                .count();
            if ready >= self.instances as usize {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || self.should_stop() {
                return false;
            }
            self.heartbeat();
            // Each Online event bumps the futex word.
            sys::futex_wait(
                &control.events_futex,
                seen,
                Some((deadline - now).min(POLL_SLICE)),
            );
        }
    }

    /// Tells the master to look at the worker table now (a `SIGUSR1`).
    /// Without a master, wakes the peers in [`Worker::wait_all_ready`]
    /// instead (the master's events would have).
    fn nudge_master(&self) {
        let control = self.segment.control();
        if !self.managed {
            control.events_futex.fetch_add(1, Release);
            sys::futex_wake(&control.events_futex, u32::MAX);
            return;
        }
        let master = control.master_pid.load(Acquire);
        if master != 0 {
            let _ = sys::process::send_signal(master, sys::signal::SIGUSR1);
        }
    }

    /// Every slot's worker as the table shows it now, the host's NATS
    /// bridge included (marked [`Peer::bridge`]).
    pub fn peers(&self) -> Vec<Peer> {
        let bridge = bridge_index(&self.segment);
        (0..self.segment.layout().workers())
            .map(|slot| read_peer(self.segment.worker_entry(slot), slot, bridge))
            .collect()
    }

    /// Every slot's state and counters. This worker's own are exact; a
    /// running peer's message counters may lag by up to 256 messages (an
    /// endpoint adds its counts to the segment in batches, and whenever it
    /// goes idle).
    pub fn stats(&self) -> ClusterStats {
        self.heartbeat();
        read_stats(&self.segment)
    }

    /// Takes the listeners the master handed this worker (in the order they
    /// were configured); later calls return an empty list, as does every
    /// call without a master.
    pub fn take_listeners(&mut self) -> Vec<Listener> {
        std::mem::take(&mut self.listeners)
    }

    /// Asks the master for another listener at run time (as Node's cluster
    /// does): the master binds it (or shares the socket it already bound for
    /// that address) and passes the descriptor back over this worker's
    /// socket to it.
    ///
    /// # Errors
    /// [`ListenError::Request`] without a master (threads mode, or a spawned
    /// worker not given a control socket), or the master's bind error.
    pub fn listen(&mut self, addr: &str, mode: ListenMode) -> Result<Listener, ListenError> {
        let addr: ListenAddr = addr.parse()?;
        let Some(control) = &self.control else {
            return Err(ListenError::Request {
                reason: "this worker has no master to ask".into(),
            });
        };
        listen::request_listener(control.as_fd(), &addr, mode, LISTEN_REQUEST_TIMEOUT)
    }

    /// The master's events from now on (none without a master: nobody
    /// publishes any).
    pub fn events(&self) -> Events {
        Events::from_now(self.segment.clone())
    }

    /// A `Send + Sync` view of this worker's stop request for other threads
    /// (an HTTP thread, the C ABI's accept), which cannot borrow the worker
    /// while its own thread uses it.
    pub fn stop_watch(&self) -> StopWatch {
        StopWatch::of(self.segment.clone(), self.slot)
    }

    /// Accepts connections on `listener` until this worker is asked to stop
    /// (then the iterator ends, and the worker can finish the connections
    /// it has). It sets the listener non-blocking: workers sharing one
    /// socket race for each connection and the losers go back to waiting.
    /// Beats the heartbeat while it waits.
    pub fn incoming<'a>(&'a self, listener: &'a TcpListener) -> Incoming<'a> {
        Incoming::new(self, listener)
    }
}
