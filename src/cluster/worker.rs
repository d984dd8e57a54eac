//! The worker's side of the cluster: identity, readiness, heartbeat, stop
//! requests, peers, listeners, events.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::time::{Duration, Instant};

use super::listen::{self, ListenAddr, ListenError, ListenMode, Listener};
use super::{read_peer, read_stats, ClusterStats, Event, Peer, WorkerState};
use crate::error::{AttachError, EndpointError};
use crate::segment::table::{STOP_DRAIN, STOP_RUN};
use crate::segment::Segment;
use crate::sys;
use crate::{Endpoint, WaitStrategy};

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
pub struct Worker {
    segment: Segment,
    endpoint: Endpoint,
    slot: u32,
    index: u32,
    generation: u32,
    instances: u32,
    control: Option<OwnedFd>,
    listeners: Vec<Listener>,
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
        || sys::process::sigterm_seen()
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
                sys::net::set_cloexec(fd.as_fd(), true).map_err(WorkerError::Io)?;
                fds.push(fd);
            }
            segment.set_wake_fds(fds).map_err(WorkerError::Io)?;
        }
        let listeners = listen::inherited_listeners().map_err(WorkerError::Listen)?;
        let worker = Self::attach(segment, slot, index, generation, instances, control, listeners)?;
        sys::process::catch_sigterm().map_err(WorkerError::Io)?;
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
            locks: std::cell::OnceCell::new(),
        })
    }

    /// This worker's slot: its messaging address.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// This worker's instance number (`0..instances`), kept across
    /// respawns and reloads.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// This worker's generation in its slot.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// How many worker instances the master keeps running.
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
    /// for longer than the hang timeout must call it.
    pub fn heartbeat(&self) {
        self.endpoint.beat();
    }

    /// Whether the master asked this worker to stop: drain for a reload,
    /// the cluster shutting down, or a `SIGTERM`.
    pub fn should_stop(&self) -> bool {
        stop_requested(&self.segment, self.slot)
    }

    /// Whether this worker is being replaced by a rolling reload.
    pub fn is_draining(&self) -> bool {
        self.entry().stop.load(Acquire) == STOP_DRAIN
    }

    /// Whether the cluster is shutting down.
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
    /// one runs are queued.
    pub fn request_reload(&self) {
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
    /// `SIGTERM` to the master does.
    pub fn request_shutdown(&self) {
        self.segment.control().shutdown_requests.fetch_add(1, AcqRel);
        self.nudge_master();
    }

    /// Waits up to `timeout` until every instance has a ready worker (the
    /// master starts them one after another, and a worker not yet started
    /// is not live: a `broadcast` or `map` made earlier misses it). Returns
    /// whether they all are.
    pub fn wait_all_ready(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let control = self.segment.control();
            // Read before looking, so an Online event in between is not missed.
            let seen = control.events_futex.load(Acquire);
            let ready = self
                .peers()
                .iter()
                .filter(|p| p.state == WorkerState::Ready)
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

    fn nudge_master(&self) {
        let master = self.segment.control().master_pid.load(Acquire);
        if master != 0 {
            let _ = sys::process::send_signal(master, sys::process::SIGUSR1);
        }
    }

    /// Every slot's worker as the table shows it now.
    pub fn peers(&self) -> Vec<Peer> {
        (0..self.segment.layout().workers())
            .map(|slot| read_peer(self.segment.worker_entry(slot), slot))
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
    /// were configured); later calls return an empty list.
    pub fn take_listeners(&mut self) -> Vec<Listener> {
        std::mem::take(&mut self.listeners)
    }

    /// Asks the master for another listener at run time (as Node's cluster
    /// does): the master binds it (or shares the socket it already bound for
    /// that address) and passes the descriptor back over this worker's
    /// socket to it.
    ///
    /// # Errors
    /// [`ListenError::Request`] without a master, or the master's bind
    /// error.
    pub fn listen(&mut self, addr: &str, mode: ListenMode) -> Result<Listener, ListenError> {
        let addr: ListenAddr = addr.parse()?;
        let Some(control) = &self.control else {
            return Err(ListenError::Request {
                reason: "this worker has no master to ask".into(),
            });
        };
        listen::request_listener(control.as_fd(), &addr, mode, LISTEN_REQUEST_TIMEOUT)
    }

    /// The master's events from now on.
    pub fn events(&self) -> Events {
        Events {
            segment: self.segment.clone(),
            next: self.segment.control().events_published.load(Acquire),
            missed: 0,
        }
    }

    /// A `Send + Sync` view of this worker's stop request for other threads
    /// (an HTTP thread, the C ABI's accept), which cannot borrow the worker
    /// while its own thread uses it.
    pub fn stop_watch(&self) -> StopWatch {
        StopWatch {
            segment: self.segment.clone(),
            slot: self.slot,
        }
    }

    /// Accepts connections on `listener` until this worker is asked to stop
    /// (then the iterator ends, and the worker can finish the connections
    /// it has). It sets the listener non-blocking: workers sharing one
    /// socket race for each connection and the losers go back to waiting.
    /// Beats the heartbeat while it waits.
    pub fn incoming<'a>(&'a self, listener: &'a TcpListener) -> Incoming<'a> {
        Incoming {
            worker: self,
            listener,
            nonblocking: false,
        }
    }
}

/// Connections accepted until the worker is told to stop: see
/// [`Worker::incoming`].
#[derive(Debug)]
pub struct Incoming<'a> {
    worker: &'a Worker,
    listener: &'a TcpListener,
    nonblocking: bool,
}

impl Iterator for Incoming<'_> {
    type Item = io::Result<TcpStream>;

    fn next(&mut self) -> Option<Self::Item> {
        if !self.nonblocking {
            if let Err(e) = self.listener.set_nonblocking(true) {
                return Some(Err(e));
            }
            self.nonblocking = true;
        }
        loop {
            if self.worker.should_stop() {
                return None;
            }
            match self.listener.accept() {
                Ok((stream, _)) => return Some(Ok(stream)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                }
                Err(e) => return Some(Err(e)),
            }
            self.worker.heartbeat();
            if let Err(e) = sys::net::poll_readable(&[self.listener.as_fd()], Some(POLL_SLICE)) {
                return Some(Err(e));
            }
        }
    }
}

/// [`Worker::should_stop`] and a stop-aware accept, from any thread: see
/// [`Worker::stop_watch`].
#[derive(Debug, Clone)]
pub struct StopWatch {
    segment: Segment,
    slot: u32,
}

impl StopWatch {
    /// The stop watch of `slot` in `segment` ([`Worker::stop_watch`] for a
    /// worker; a slot without a master is never asked to stop but by a
    /// `SIGTERM` a [`Worker::from_env`] turned into a request). `None` if
    /// the segment has no such slot.
    pub fn new(segment: &Segment, slot: u32) -> Option<Self> {
        (slot < segment.layout().workers()).then(|| Self {
            segment: segment.clone(),
            slot,
        })
    }

    /// Whether the master asked the worker to stop: drain for a reload,
    /// the cluster shutting down, or a `SIGTERM`.
    pub fn should_stop(&self) -> bool {
        stop_requested(&self.segment, self.slot)
    }

    /// Accepts one connection on the listening socket `listener` (TCP or
    /// unix: an inherited `LISTEN_FDS` descriptor, say), waiting at most
    /// `timeout` (`None`: no limit) and ending the wait when the worker is
    /// asked to stop: `Ok(None)` then, and after the timeout (tell them
    /// apart with [`StopWatch::should_stop`]). The connection is blocking
    /// and close-on-exec.
    ///
    /// **`O_NONBLOCK`:** like [`Worker::incoming`] it sets the listener
    /// non-blocking, so that workers sharing a socket can race for each
    /// connection and the losers go back to waiting. The flag belongs to the
    /// open file description, not to this descriptor: every process and
    /// thread sharing the listener (every worker the master handed it to)
    /// sees it from then on. So all workers on a shared listener should
    /// accept through this (or [`Worker::incoming`]), or handle `EAGAIN`
    /// from their own `accept(2)`.
    ///
    /// **Transient errors** do not end the wait: the network errors
    /// `accept(2)` documents as pending errors of the new connection
    /// (`ECONNABORTED`, `EPROTO`, `ENETDOWN`, `ENOPROTOOPT`, `EHOSTDOWN`,
    /// `ENONET`, `EHOSTUNREACH`, `EOPNOTSUPP`, `ENETUNREACH`) are retried at
    /// once; running out of descriptors or memory (`EMFILE`, `ENFILE`,
    /// `ENOBUFS`, `ENOMEM`) pauses 10 ms, doubling up to 100 ms, before the
    /// next try (the connection stays queued meanwhile).
    ///
    /// **Heartbeat:** it does not beat the worker's heartbeat. It may run on
    /// any thread, and a beat from there would hide a hung messenger thread
    /// from the master's hang detection; the heartbeat stays with the
    /// messenger's receive calls (the thread that owns the [`Worker`]), as
    /// [`Worker::incoming`], which runs on that thread, beats it.
    ///
    /// # Errors
    /// `listener` is not a listening TCP or unix socket, or `accept(2)`
    /// failed with an error that is not transient (above).
    pub fn accept(&self, listener: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<Option<OwnedFd>> {
        enum Socket {
            Tcp(TcpListener),
            Unix(std::os::unix::net::UnixListener),
        }
        let copy = listener.try_clone_to_owned()?;
        let socket = match sys::net::local_addr(listener)? {
            sys::net::LocalAddr::Inet(_) => Socket::Tcp(TcpListener::from(copy)),
            sys::net::LocalAddr::UnixPath(_) | sys::net::LocalAddr::UnixOther => {
                Socket::Unix(std::os::unix::net::UnixListener::from(copy))
            }
            sys::net::LocalAddr::Other(family) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("not a TCP or unix socket (address family {family})"),
                ))
            }
        };
        match &socket {
            Socket::Tcp(l) => l.set_nonblocking(true)?,
            Socket::Unix(l) => l.set_nonblocking(true)?,
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut pause = ACCEPT_BACKOFF_MIN;
        loop {
            if self.should_stop() {
                return Ok(None);
            }
            let accepted = match &socket {
                Socket::Tcp(l) => l.accept().map(|(s, _)| OwnedFd::from(s)),
                Socket::Unix(l) => l.accept().map(|(s, _)| OwnedFd::from(s)),
            };
            let backoff = match accepted {
                Ok(conn) => return Ok(Some(conn)),
                Err(e) => match accept_error(&e) {
                    AcceptError::Retry => {
                        pause = ACCEPT_BACKOFF_MIN;
                        false
                    }
                    AcceptError::BackOff => true,
                    AcceptError::Fail => return Err(e),
                },
            };
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left,
                    _ => return Ok(None),
                },
                None => Duration::MAX,
            };
            if backoff {
                // The connection stays queued (the listener stays readable):
                // wait for a descriptor or memory to be freed, not for poll.
                std::thread::sleep(left.min(pause));
                pause = (pause * 2).min(ACCEPT_BACKOFF_MAX);
            } else {
                sys::net::poll_readable(&[listener], Some(left.min(POLL_SLICE)))?;
            }
        }
    }
}

/// The first pause after `accept(2)` ran out of descriptors or memory.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The longest pause: the wait still ends soon after a stop request.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(100);

/// What [`StopWatch::accept`] does after an `accept(2)` error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcceptError {
    /// Nothing to accept (`EAGAIN`), a signal (`EINTR`), or a connection
    /// that failed before it was accepted: wait for the next one.
    Retry,
    /// Out of descriptors or memory, with the connection still queued:
    /// pause, then try again.
    BackOff,
    /// The listener is unusable (or the error is not known to pass).
    Fail,
}

fn accept_error(e: &io::Error) -> AcceptError {
    match e.raw_os_error() {
        // accept(2): "Linux accept() passes already-pending network errors
        // on the new socket as an error code from accept() [...] these
        // errors should be treated like EAGAIN by retrying" (for TCP).
        Some(
            libc::EAGAIN
            | libc::EINTR
            | libc::ECONNABORTED
            | libc::EPROTO
            | libc::ENETDOWN
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH,
        ) => AcceptError::Retry,
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => AcceptError::BackOff,
        _ => AcceptError::Fail,
    }
}

/// A reader of the master's event log, from the moment it was made.
#[derive(Debug, Clone)]
pub struct Events {
    segment: Segment,
    next: u64,
    missed: u64,
}

impl Events {
    /// The next event, if one has been published.
    pub fn try_next(&mut self) -> Option<Event> {
        loop {
            match self.segment.control().read(self.next) {
                Ok(None) => return None,
                Ok(Some(raw)) => {
                    self.next += 1;
                    if let Some(event) = Event::from_raw(raw) {
                        return Some(event);
                    }
                }
                Err(oldest) => {
                    self.missed += oldest.saturating_sub(self.next);
                    self.next = oldest;
                }
            }
        }
    }

    /// Waits up to `timeout` for the next event.
    pub fn next_timeout(&mut self, timeout: Duration) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.segment.control().events_futex.load(Acquire);
            if let Some(e) = self.try_next() {
                return Some(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            sys::futex_wait(&self.segment.control().events_futex, seen, Some(deadline - now));
        }
    }

    /// Events that were overwritten before this reader got to them (the log
    /// keeps the last 256).
    pub fn missed(&self) -> u64 {
        self.missed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// `StopWatch::accept`: a connection, a timeout, and the wait ended by
    /// the master's drain word (set here as the master would).
    #[test]
    fn stop_watch_accepts_until_the_drain() {
        let segment = Segment::create(&crate::Config::new(2)).expect("segment");
        assert!(StopWatch::new(&segment, 2).is_none(), "no slot 2");
        let watch = StopWatch::new(&segment, 1).expect("slot 1");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");

        let waited = watch.accept(listener.as_fd(), Some(Duration::from_millis(30)));
        assert!(
            waited.expect("no error").is_none(),
            "nothing to accept: timed out"
        );
        assert!(!watch.should_stop());

        let mut client = TcpStream::connect(addr).expect("connect");
        let conn = watch
            .accept(listener.as_fd(), Some(Duration::from_secs(10)))
            .expect("accept")
            .expect("a connection");
        let mut conn = TcpStream::from(conn);
        client.write_all(b"hi").expect("write");
        let mut buf = [0u8; 2];
        conn.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"hi");

        // Without a limit: only the drain ends it (a watchdog of 20 s fails
        // the test instead of hanging it).
        let (done, ended) = std::sync::mpsc::channel();
        {
            let watch = watch.clone();
            let fd = listener.as_fd().try_clone_to_owned().expect("dup");
            std::thread::spawn(move || {
                let _ = done.send(watch.accept(fd.as_fd(), None).map(|c| c.is_some()));
            });
        }
        std::thread::sleep(Duration::from_millis(100));
        segment.worker_entry(1).stop.store(STOP_DRAIN, Release);
        let ended = ended
            .recv_timeout(Duration::from_secs(20))
            .expect("the drain ended the accept");
        assert!(
            !ended.expect("no error"),
            "no connection: the drain ended the wait"
        );
        assert!(watch.should_stop());
    }

    /// `StopWatch::accept` may run on any thread (the C ABI's, Python's):
    /// it does not beat the worker's heartbeat, which stays the messenger's
    /// (a hung messenger thread must still be seen as hung).
    #[test]
    fn stop_watch_accept_does_not_beat_the_heartbeat() {
        let segment = Segment::create(&crate::Config::new(1)).expect("segment");
        let watch = StopWatch::new(&segment, 0).expect("slot 0");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let hb = &segment.worker_entry(0).heartbeat;
        let before = hb.load(Relaxed);
        // Several poll slices: each used to beat.
        let waited = watch.accept(listener.as_fd(), Some(POLL_SLICE * 4));
        assert!(waited.expect("no error").is_none(), "timed out");
        assert_eq!(hb.load(Relaxed), before, "the heartbeat did not move");
    }

    /// Which `accept(2)` errors end the wait, and which are retried (at
    /// once, or after a pause for descriptors or memory to come back).
    #[test]
    fn accept_errors_transient_or_not() {
        let err = io::Error::from_raw_os_error;
        for e in [
            libc::EAGAIN,
            libc::EINTR,
            libc::ECONNABORTED,
            libc::EPROTO,
            libc::ENETDOWN,
            libc::ENOPROTOOPT,
            libc::EHOSTDOWN,
            libc::ENONET,
            libc::EHOSTUNREACH,
            libc::EOPNOTSUPP,
            libc::ENETUNREACH,
        ] {
            assert_eq!(accept_error(&err(e)), AcceptError::Retry, "errno {e}");
        }
        for e in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert_eq!(accept_error(&err(e)), AcceptError::BackOff, "errno {e}");
        }
        for e in [
            libc::EBADF,
            libc::EINVAL,
            libc::ENOTSOCK,
            libc::EPERM,
            libc::EFAULT,
        ] {
            assert_eq!(accept_error(&err(e)), AcceptError::Fail, "errno {e}");
        }
    }
}
