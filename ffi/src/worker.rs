//! `shmc_worker`: a worker's messenger, its identity, lifecycle, listeners
//! and stats.

use std::cell::UnsafeCell;
use std::collections::HashMap;
use std::ffi::c_char;
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::Arc;

use shmcluster_rs::raw::Layout;
use shmcluster_rs::{
    ClusterStats, Events, HandlerId, Listener, Locks, Messenger, MessengerHandle, StopWatch, Worker,
    WorkerState,
};

use crate::boundary::{
    self, check_fork, free_handle, guard, into_handle, out_arg, put, ref_arg, write_c_string, write_list,
};
use crate::handle::{Driving, Jobs};
use crate::result::{shmc_result, Failure};
use crate::segment::{attach_dup, shmc_segment};

/// One worker: its slot in a segment and its messenger (handlers, calls,
/// dispatch). Made by [`shmc_worker_from_env`], [`shmc_worker_attach`] or
/// [`shmc_worker_attach_fd`]; freed by [`shmc_worker_free`], which releases
/// the slot.
///
/// **Threads:** usable from any thread, by one call at a time; a call made
/// while another runs (another thread, or a handler of this worker calling
/// back into it) returns `SHMC_RESULT_BUSY`. Handlers run on the thread that
/// calls [`crate::shmc_poll`], [`crate::shmc_dispatch`], [`crate::shmc_run`]
/// or a blocking call (request, map, consume, invoke).
///
/// **fork():** does not survive. In a forked child every call returns
/// `SHMC_RESULT_FORKED`; the child attaches its own worker.
pub struct shmc_worker {
    fork_generation: u64,
    busy: AtomicBool,
    /// Set by [`shmc_request_shutdown`] (any thread, handlers included).
    pub(crate) stop: Arc<AtomicBool>,
    /// Requests made while the worker was busy, for its running call.
    pending: Arc<Pending>,
    /// Whether a master runs this worker.
    has_master: bool,
    /// The master's stop request, readable from any thread.
    watch: StopWatch,
    /// Calls queued by [`crate::shmc_handle`]s for the worker's thread.
    pub(crate) jobs: Arc<Jobs>,
    /// Wakes the worker's thread for queued calls (a message to itself).
    pub(crate) wake: MessengerHandle,
    pub(crate) slot: u32,
    /// Slots in the segment.
    pub(crate) workers: u32,
    /// The largest payload of a call (`Messenger::max_payload`).
    pub(crate) max_payload: usize,
    /// A reader of the master's event log from the worker's start, cloned
    /// by [`crate::shmc_events_new`] from any thread (it reads the shared
    /// segment only, not the messenger).
    pub(crate) events: Events,
    inner: UnsafeCell<WorkerInner>,
}

impl Drop for shmc_worker {
    fn drop(&mut self) {
        // Calls still queued end with SHMC_RESULT_WORKER_CLOSED.
        self.jobs.close();
    }
}

pub(crate) struct WorkerInner {
    pub messenger: Messenger,
    listeners: Vec<Option<Listener>>,
    locks: Option<Locks>,
    pub stop: Arc<AtomicBool>,
    /// The ids handed to C for handlers (the Rust `HandlerId` has no number).
    pub handler_ids: HashMap<u64, HandlerId>,
    next_handler_id: u64,
    jobs: Arc<Jobs>,
    pending: Arc<Pending>,
}

/// A shutdown, reload or ready asked for on another thread while the worker
/// was busy, passed on to the master by the call that drives the worker
/// (when it starts, and between the messages and jobs it runs).
#[derive(Default)]
struct Pending {
    shutdown: AtomicBool,
    reload: AtomicBool,
    ready: AtomicBool,
}

impl WorkerInner {
    /// Runs the calls [`crate::shmc_handle`]s queued for this worker, and
    /// passes on the requests made while it was busy.
    pub fn run_jobs(&mut self) {
        self.forward_requests();
        let jobs = Arc::clone(&self.jobs);
        jobs.run(self);
    }

    /// Passes on a shutdown, reload or ready asked for while busy.
    fn forward_requests(&self) {
        if let Some(w) = master_worker(&self.messenger) {
            if self.pending.shutdown.swap(false, AcqRel) {
                w.request_shutdown();
            }
            if self.pending.reload.swap(false, AcqRel) {
                w.request_reload();
            }
            if self.pending.ready.swap(false, AcqRel) {
                w.ready();
            }
        }
    }

    /// A C id for a registered handler.
    pub fn remember_handler(&mut self, id: HandlerId) -> u64 {
        self.next_handler_id += 1;
        self.handler_ids.insert(self.next_handler_id, id);
        self.next_handler_id
    }

    pub fn locks(&mut self) -> Result<&Locks, Failure> {
        if self.locks.is_none() {
            self.locks = Some(self.messenger.locks()?);
        }
        Ok(self.locks.as_ref().expect("just set"))
    }
}

/// Releases the busy flag when a call on the worker ends (a panic included).
struct Busy<'a>(&'a AtomicBool);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.store(false, Release);
    }
}

impl shmc_worker {
    fn new(
        mut messenger: Messenger,
        listeners: Vec<Listener>,
        layout: Layout,
        watch: StopWatch,
    ) -> Result<Self, Failure> {
        let stop = Arc::new(AtomicBool::new(false));
        let pending = Arc::new(Pending::default());
        let jobs = Jobs::new();
        let slot = messenger.slot();
        crate::handle::register_wake(&mut messenger)?;
        Ok(Self {
            fork_generation: boundary::fork_generation(),
            busy: AtomicBool::new(false),
            stop: stop.clone(),
            pending: Arc::clone(&pending),
            has_master: messenger.worker().has_master(),
            watch,
            jobs: Arc::clone(&jobs),
            wake: messenger.handle(),
            slot,
            workers: layout.workers(),
            max_payload: messenger.max_payload(),
            events: messenger.worker().events(),
            inner: UnsafeCell::new(WorkerInner {
                messenger,
                listeners: listeners.into_iter().map(Some).collect(),
                locks: None,
                stop,
                handler_ids: HashMap::new(),
                next_handler_id: 0,
                jobs,
                pending,
            }),
        })
    }

    /// Runs `f` with the inner worker if no call is running on it (and
    /// none starts until `f` returns); `None`, without running it, if one
    /// is (that call passes on what `pending` holds).
    fn if_idle<R>(&self, f: impl FnOnce(&WorkerInner) -> R) -> Option<R> {
        if self.busy.swap(true, AcqRel) {
            return None;
        }
        let _busy = Busy(&self.busy);
        // SAFETY: the busy flag, set above and cleared by `_busy` when this
        // returns, makes this the only reference to the inner worker.
        Some(f(unsafe { &*self.inner.get() }))
    }

    /// Whether this worker should stop: the master's request, or (without
    /// a master) [`shmc_request_shutdown`]. Any thread.
    pub(crate) fn stop_requested(&self) -> bool {
        self.watch.should_stop() || (!self.has_master && self.stop.load(Acquire))
    }
}

/// The messenger's worker when a master started it: the C ABI follows a
/// master's rules then, and its own without one (attached workers, whose
/// shutdown stops only themselves and whose reload is `NoMaster`).
pub(crate) fn master_worker(m: &Messenger) -> Option<&Worker> {
    Some(m.worker()).filter(|w| w.has_master())
}

/// The worker behind `w`, for the functions callable from any thread:
/// `SHMC_RESULT_NULL_ARGUMENT` for NULL, `SHMC_RESULT_FORKED` in a forked
/// child.
///
/// # Safety
/// `w` is NULL or a live handle from this crate.
pub(crate) unsafe fn worker_arg<'a>(w: *const shmc_worker) -> Result<&'a shmc_worker, Failure> {
    // SAFETY: forwarded from our caller.
    let worker = unsafe { ref_arg(w, "worker") }?;
    check_fork(worker.fork_generation)?;
    Ok(worker)
}

/// Runs `f` with exclusive access to the worker behind `w`.
///
/// # Safety
/// `w` is NULL or a live handle from this crate.
pub(crate) unsafe fn with_worker<R>(
    w: *const shmc_worker,
    f: impl FnOnce(&mut WorkerInner) -> Result<R, Failure>,
) -> Result<R, Failure> {
    // SAFETY: forwarded from our caller. Only shared references to
    // `shmc_worker` are made; the messenger is reached through the
    // UnsafeCell below.
    let worker = unsafe { worker_arg(w) }?;
    if worker.busy.swap(true, AcqRel) {
        return Err(shmc_result::Busy.into());
    }
    let _busy = Busy(&worker.busy);
    let _driving = Driving::enter(&worker.jobs);
    // SAFETY: the busy flag, set above and cleared by `_busy` when this
    // returns, makes this the only reference to the inner worker.
    let inner = unsafe { &mut *worker.inner.get() };
    inner.forward_requests();
    f(inner)
}

/// Attaches the worker a shmcluster master spawned this process as (spawn
/// mode: `SHMCLUSTER_FD`, `SHMCLUSTER_WORKER`, `SHMCLUSTER_WORKERS`,
/// `SHMCLUSTER_GENERATION`, `SHMCLUSTER_INDEX`, `SHMCLUSTER_CONTROL_FD`,
/// `LISTEN_FDS`) and stores it in `*out`. The descriptors are taken once per
/// process: a second call fails with `SHMC_RESULT_ENVIRONMENT`. Like a Rust
/// worker, the process then turns `SIGTERM`/`SIGINT` into a stop request
/// (see [`shmc_should_stop`]). Inherited listening sockets are kept for
/// [`shmc_listener_take`].
///
/// The caller owns `*out` and frees it with [`shmc_worker_free`]. Does not
/// survive fork.
///
/// # Errors
/// `SHMC_RESULT_ENVIRONMENT` (not started by a master, or a variable is
/// malformed), the attach errors (`SHMC_RESULT_NOT_A_SEGMENT`,
/// `SHMC_RESULT_SEGMENT_VERSION`, ...), `SHMC_RESULT_SLOT_BUSY`,
/// `SHMC_RESULT_STALE_GENERATION`, `SHMC_RESULT_IO`.
///
/// # Safety
/// `out` must be NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_worker_from_env(out: *mut *mut shmc_worker) -> shmc_result {
    guard(|| {
        let out = out_arg(out, "out")?;
        let mut worker = Worker::from_env()?;
        let listeners = worker.take_listeners();
        let layout = *worker.segment().layout();
        let watch = worker.stop_watch();
        let handle = shmc_worker::new(Messenger::new(worker), listeners, layout, watch)?;
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, into_handle(handle)) };
        Ok(())
    })
}

/// Claims slot `slot` of `segment` for this process (the next generation of
/// the slot) and stores the worker in `*out`: threads mode (one worker per
/// thread on one segment), or a forked child of the segment's creator. The
/// worker has no master: [`shmc_ready`] does nothing, a peer is live while a
/// live process holds its slot.
///
/// The caller owns `*out` ([`shmc_worker_free`]); the worker keeps the
/// segment mapped, so `segment` may be freed first. Does not survive fork.
///
/// # Errors
/// `SHMC_RESULT_NULL_ARGUMENT`, `SHMC_RESULT_NO_SUCH_WORKER`,
/// `SHMC_RESULT_SLOT_BUSY` (a live process, this one included, holds it).
///
/// # Safety
/// `segment` must be NULL or a live handle; `out` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_worker_attach(
    segment: *const shmc_segment,
    slot: u32,
    out: *mut *mut shmc_worker,
) -> shmc_result {
    guard(|| {
        let out = out_arg(out, "out")?;
        // SAFETY: forwarded from our caller.
        let segment = unsafe { ref_arg(segment, "segment") }?;
        let endpoint = segment.segment.endpoint(slot)?;
        let layout = *segment.segment.layout();
        let watch = StopWatch::new(&segment.segment, slot).expect("the endpoint's slot exists");
        let handle = shmc_worker::new(Messenger::from_endpoint(endpoint), Vec::new(), layout, watch)?;
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, into_handle(handle)) };
        Ok(())
    })
}

/// Attaches to the segment behind descriptor `fd` (validating its whole
/// header first) and claims slot `slot` (its next generation), as
/// [`shmc_worker_attach`] does. `fd` stays the caller's: the library works
/// on a duplicate. A descriptor that is not a segment is
/// `SHMC_RESULT_NOT_A_SEGMENT` (a plain file), `SHMC_RESULT_IO` (not open),
/// never a crash.
///
/// The caller owns `*out` ([`shmc_worker_free`]). Does not survive fork.
///
/// # Safety
/// `out` must be NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_worker_attach_fd(
    fd: i32,
    slot: u32,
    out: *mut *mut shmc_worker,
) -> shmc_result {
    guard(|| {
        let out = out_arg(out, "out")?;
        let segment = attach_dup(fd)?;
        let endpoint = segment.endpoint(slot)?;
        let layout = *segment.layout();
        let watch = StopWatch::new(&segment, slot).expect("the endpoint's slot exists");
        let handle = shmc_worker::new(Messenger::from_endpoint(endpoint), Vec::new(), layout, watch)?;
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, into_handle(handle)) };
        Ok(())
    })
}

/// Frees a worker (NULL is ignored): its handlers are dropped, unanswered
/// calls end, its listeners not taken are closed and its slot is released
/// for a successor. Must not be called from inside one of its handlers
/// (`SHMC_RESULT_BUSY`, nothing freed). In a forked child it only forgets
/// the handle (the parent's slot is left alone) and returns
/// `SHMC_RESULT_FORKED`.
///
/// # Safety
/// `w` must be NULL or a live handle, not used again after `SHMC_RESULT_OK`
/// or `SHMC_RESULT_FORKED`.
#[no_mangle]
pub unsafe extern "C" fn shmc_worker_free(w: *mut shmc_worker) -> shmc_result {
    guard(|| {
        if w.is_null() {
            return Ok(());
        }
        // SAFETY: a live handle, by our caller's contract.
        let worker = unsafe { &*w };
        if check_fork(worker.fork_generation).is_err() {
            return Err(shmc_result::Forked.into());
        }
        if worker.busy.swap(true, AcqRel) {
            return Err(shmc_result::Busy.into());
        }
        // SAFETY: made by `into_handle`; not busy, so nothing else uses it,
        // and our caller gives it up.
        drop(unsafe { Box::from_raw(w) });
        Ok(())
    })
}

/// Who a worker is.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct shmc_identity {
    /// Its slot: its messaging address.
    pub slot: u32,
    /// Its generation in that slot.
    pub generation: u32,
    /// Its instance number (`0..instances`); the slot without a master.
    pub index: u32,
    /// Worker instances the master runs; without a master, the slots.
    pub instances: u32,
    /// Slots in the segment (instances + 1 spare under a master).
    pub slots: u32,
    /// Whether a master runs this worker (spawned by one).
    pub has_master: bool,
}

/// Stores the worker's identity in `*out`.
///
/// # Safety
/// `w` NULL or a live handle; `out` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_identity_get(w: *const shmc_worker, out: *mut shmc_identity) -> shmc_result {
    guard(|| {
        let out = out_arg(out, "out")?;
        // SAFETY: forwarded from our caller.
        let id = unsafe {
            with_worker(w, |inner| {
                let m = &inner.messenger;
                let slots = m.stats().slots.len() as u32;
                Ok(match master_worker(m) {
                    Some(worker) => shmc_identity {
                        slot: m.slot(),
                        generation: m.generation(),
                        index: worker.index(),
                        instances: worker.instances(),
                        slots,
                        has_master: true,
                    },
                    None => shmc_identity {
                        slot: m.slot(),
                        generation: m.generation(),
                        index: m.slot(),
                        instances: slots,
                        slots,
                        has_master: false,
                    },
                })
            })
        }?;
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, id) };
        Ok(())
    })
}

/// A worker slot's lifecycle state (the numbers are fixed).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum shmc_worker_state {
    /// No worker has used the slot (or it is the reload spare).
    Free = 0,
    /// Started by the master, not yet ready.
    Starting = 1,
    /// Declared itself ready.
    Ready = 2,
    /// Told to finish what it is doing and exit.
    Draining = 3,
    /// Exited.
    Dead = 4,
    /// Crashed too often; the master gave the slot up.
    Failed = 5,
}

fn state_of(s: WorkerState) -> shmc_worker_state {
    match s {
        WorkerState::Free => shmc_worker_state::Free,
        WorkerState::Starting => shmc_worker_state::Starting,
        WorkerState::Ready => shmc_worker_state::Ready,
        WorkerState::Draining => shmc_worker_state::Draining,
        WorkerState::Failed => shmc_worker_state::Failed,
        _ => shmc_worker_state::Dead,
    }
}

/// A slot as its peers see it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct shmc_peer {
    /// The slot.
    pub slot: u32,
    /// Its instance number, or `UINT32_MAX` if the slot has no worker.
    pub index: u32,
    /// Lifecycle state. Without a master: `READY` while a live process
    /// holds the slot, `FREE` otherwise.
    pub state: shmc_worker_state,
    /// Its pid (0 if none or unknown).
    pub pid: u32,
    /// Its generation.
    pub generation: u32,
}

/// Writes one entry per slot into `peers` (room for `capacity`) and the
/// number of slots into `*count`. With too little room it writes what fits
/// and returns `SHMC_RESULT_BUFFER_TOO_SMALL`; `peers` may be NULL with
/// `capacity` 0 to ask for the count.
///
/// # Safety
/// `w` NULL or a live handle; `peers` valid for `capacity` writes; `count`
/// NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn shmc_peers(
    w: *const shmc_worker,
    peers: *mut shmc_peer,
    capacity: usize,
    count: *mut usize,
) -> shmc_result {
    guard(|| {
        let count = out_arg(count, "count")?;
        // SAFETY: forwarded from our caller.
        let list = unsafe {
            with_worker(w, |inner| {
                let m = &inner.messenger;
                Ok(match master_worker(m) {
                    Some(worker) => worker
                        .peers()
                        .into_iter()
                        .map(|p| shmc_peer {
                            slot: p.slot,
                            index: p.index.unwrap_or(u32::MAX),
                            state: state_of(p.state),
                            pid: p.pid,
                            generation: p.generation,
                        })
                        .collect::<Vec<_>>(),
                    None => {
                        let live = m.live_workers();
                        m.stats()
                            .slots
                            .iter()
                            .map(|s| {
                                let l = live.iter().find(|l| l.slot == s.slot);
                                shmc_peer {
                                    slot: s.slot,
                                    index: if l.is_some() { s.slot } else { u32::MAX },
                                    state: if l.is_some() {
                                        shmc_worker_state::Ready
                                    } else {
                                        shmc_worker_state::Free
                                    },
                                    pid: s.pid,
                                    generation: l.map_or(s.generation, |l| l.generation),
                                }
                            })
                            .collect()
                    }
                })
            })
        }?;
        // SAFETY: `count` checked; the rest forwarded from our caller.
        unsafe { write_list(list.into_iter(), peers, capacity, "peers", count) }
    })
}

/// Declares this worker ready: the master publishes `Online`, and a rolling
/// reload waits for this before draining the worker it replaces. Without a
/// master it does nothing and succeeds.
///
/// Any thread, any time, as [`shmc_request_shutdown`]: while another thread
/// drives the worker ([`crate::shmc_run`], [`crate::shmc_poll`]) that call
/// passes it on (within 50 ms in `shmc_run`).
///
/// # Safety
/// `w` NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn shmc_ready(w: *const shmc_worker) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        let worker = unsafe { worker_arg(w) }?;
        worker.pending.ready.store(true, Release);
        worker.if_idle(WorkerInner::forward_requests);
        Ok(())
    })
}

/// Waits up to `timeout_ms` until every instance has a ready worker; stores
/// whether they all are in `*all_ready`. Without a master, true at once.
///
/// # Safety
/// `w` NULL or a live handle; `all_ready` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_wait_all_ready(
    w: *const shmc_worker,
    timeout_ms: u64,
    all_ready: *mut bool,
) -> shmc_result {
    guard(|| {
        let out = out_arg(all_ready, "all_ready")?;
        let timeout = boundary::deadline(timeout_ms).saturating_duration_since(std::time::Instant::now());
        // SAFETY: forwarded from our caller.
        let ready = unsafe {
            with_worker(w, |inner| {
                let worker = inner.messenger.worker();
                Ok(if worker.has_master() {
                    worker.wait_all_ready(timeout)
                } else {
                    true
                })
            })
        }?;
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, ready) };
        Ok(())
    })
}

/// Whether this worker should stop: the master told it to drain or shut
/// down (or it got `SIGTERM`/`SIGINT` after [`shmc_worker_from_env`]), or
/// [`shmc_request_shutdown`] was called on it. True as well for a NULL or
/// forked handle (stop rather than spin).
///
/// Any thread, any time, from handlers too (it reads the master's stop word
/// in the segment, so it needs no call to be driving the worker).
///
/// # Safety
/// `w` NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn shmc_should_stop(w: *const shmc_worker) -> bool {
    boundary::guard_value(true, || {
        // SAFETY: NULL or a live handle, by our caller's contract.
        let Some(worker) = (unsafe { w.as_ref() }) else {
            return true;
        };
        check_fork(worker.fork_generation).is_err() || worker.stop.load(Acquire) || worker.watch.should_stop()
    })
}

/// Asks for the cluster to shut down gracefully (the master sets every
/// worker's stop word; [`crate::shmc_run`] returns when the master tells
/// this worker to stop). Without a master it sets this worker's own stop
/// flag: [`crate::shmc_run`] returns and [`shmc_should_stop`] is true.
///
/// Any thread, any time, from this worker's handlers too: when the worker is
/// busy the request is passed to the master by its running call.
///
/// # Safety
/// `w` NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn shmc_request_shutdown(w: *const shmc_worker) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        let worker = unsafe { worker_arg(w) }?;
        worker.pending.shutdown.store(true, Release);
        let idle = worker.if_idle(|inner| {
            if !inner.messenger.worker().has_master() {
                worker.stop.store(true, Release);
            }
            inner.forward_requests();
        });
        if idle.is_none() {
            // Busy: its running call forwards it; without a master it is
            // the local flag that matters, set both ways.
            worker.stop.store(true, Release);
        }
        Ok(())
    })
}

/// Asks the master for a rolling reload of every worker (one at a time).
/// `SHMC_RESULT_NO_MASTER` without a master. Same threads as
/// [`shmc_request_shutdown`].
///
/// # Safety
/// `w` NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn shmc_request_reload(w: *const shmc_worker) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        let worker = unsafe { worker_arg(w) }?;
        let reloaded = worker.if_idle(|inner| match master_worker(&inner.messenger) {
            Some(wk) => {
                wk.request_reload();
                Ok(())
            }
            None => Err(shmc_result::NoMaster.into()),
        });
        reloaded.unwrap_or_else(|| {
            // Busy: its running call forwards it.
            worker.pending.reload.store(true, Release);
            Ok(())
        })
    })
}

/// The number of inherited listening sockets (spawned workers; 0 otherwise),
/// taken or not.
///
/// # Safety
/// `w` NULL or a live handle; `count` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn shmc_listener_count(w: *const shmc_worker, count: *mut usize) -> shmc_result {
    guard(|| {
        let out = out_arg(count, "count")?;
        // SAFETY: forwarded from our caller.
        let n = unsafe { with_worker(w, |inner| Ok(inner.listeners.len())) }?;
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, n) };
        Ok(())
    })
}

/// Writes listener `index`'s name (its `LISTEN_FDNAMES` entry) into `buf` as
/// [`crate::shmc_error_string`] does. `SHMC_RESULT_ALREADY_TAKEN` once taken.
///
/// # Safety
/// `w` NULL or a live handle; `buf` valid for `len` bytes; `out_len` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn shmc_listener_name(
    w: *const shmc_worker,
    index: usize,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        let name = unsafe { with_worker(w, |inner| listener(inner, index).map(|l| l.name().to_owned())) }?;
        // SAFETY: forwarded from our caller.
        unsafe { write_c_string(&name, buf.cast(), len, out_len) }
    })
}

fn listener(inner: &WorkerInner, index: usize) -> Result<&Listener, Failure> {
    match inner.listeners.get(index) {
        None => Err(Failure::new(
            shmc_result::InvalidArgument,
            format!("no listener {index} ({} inherited)", inner.listeners.len()),
        )),
        Some(None) => Err(Failure::new(
            shmc_result::AlreadyTaken,
            format!("listener {index} was taken"),
        )),
        Some(Some(l)) => Ok(l),
    }
}

/// Takes inherited listening socket `index` and stores its descriptor in
/// `*fd`. The caller owns the descriptor from then on (close it with
/// `close(2)`); a second take of the same index is
/// `SHMC_RESULT_ALREADY_TAKEN`. The socket's open file description is shared
/// with the master and, for a shared listener, the other workers: set the
/// same blocking mode in every worker. The descriptor survives fork as any
/// descriptor does.
///
/// # Safety
/// `w` NULL or a live handle; `fd` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_listener_take(
    w: *const shmc_worker,
    index: usize,
    fd: *mut i32,
) -> shmc_result {
    use std::os::fd::IntoRawFd;
    guard(|| {
        let out = out_arg(fd, "fd")?;
        // SAFETY: forwarded from our caller.
        let l = unsafe {
            with_worker(w, |inner| {
                listener(inner, index)?;
                Ok(inner.listeners[index].take().expect("checked"))
            })
        }?;
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, l.into_fd().into_raw_fd()) };
        Ok(())
    })
}

/// A snapshot of every slot's state and counters. Made by [`shmc_stats_get`],
/// freed by [`shmc_stats_free`]; plain memory: any thread, survives fork.
pub struct shmc_stats {
    stats: ClusterStats,
}

/// One slot's row of a stats snapshot. Durations are in nanoseconds,
/// `UINT64_MAX` where unknown.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct shmc_slot_stats {
    /// The slot.
    pub slot: u32,
    /// Its instance number, `UINT32_MAX` if none.
    pub index: u32,
    /// Lifecycle state.
    pub state: shmc_worker_state,
    /// Pid (0 if none).
    pub pid: u32,
    /// Generation.
    pub generation: u32,
    /// Times the master replaced a dead worker here.
    pub restarts: u32,
    /// Time since the master saw the heartbeat move.
    pub heartbeat_age_ns: u64,
    /// Messages sent.
    pub sent_messages: u64,
    /// Payload bytes sent.
    pub sent_bytes: u64,
    /// Messages received.
    pub received_messages: u64,
    /// Payload bytes received.
    pub received_bytes: u64,
    /// Bytes waiting in its inbox.
    pub inbox_bytes: u64,
    /// Futex waits.
    pub futex_waits: u64,
    /// Futex wakes issued.
    pub futex_wakes: u64,
    /// Sends that found a full lane.
    pub full_waits: u64,
    /// The latency of a recent request: one in 16 is timed (the first
    /// included), to keep clock reads off the round trip.
    pub last_request_ns: u64,
    /// Its last map's latency.
    pub last_map_ns: u64,
}

/// Takes a stats snapshot of the segment and stores it in `*out` (the caller
/// frees it with [`shmc_stats_free`]).
///
/// # Safety
/// `w` NULL or a live handle; `out` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_stats_get(w: *const shmc_worker, out: *mut *mut shmc_stats) -> shmc_result {
    guard(|| {
        let out = out_arg(out, "out")?;
        // SAFETY: forwarded from our caller.
        let stats = unsafe { with_worker(w, |inner| Ok(inner.messenger.stats())) }?;
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, into_handle(shmc_stats { stats })) };
        Ok(())
    })
}

/// The number of slot rows in a snapshot (0 for NULL).
///
/// # Safety
/// `stats` NULL or a live snapshot.
#[no_mangle]
pub unsafe extern "C" fn shmc_stats_slot_count(stats: *const shmc_stats) -> usize {
    boundary::guard_value(0, || {
        // SAFETY: NULL or a live snapshot, by our caller's contract.
        let stats = unsafe { stats.as_ref() };
        stats.map_or(0, |s| s.stats.slots.len())
    })
}

/// Copies slot row `i` of a snapshot into `*out`.
///
/// # Safety
/// `stats` NULL or a live snapshot; `out` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_stats_slot(
    stats: *const shmc_stats,
    i: usize,
    out: *mut shmc_slot_stats,
) -> shmc_result {
    guard(|| {
        let out = out_arg(out, "out")?;
        // SAFETY: forwarded from our caller.
        let stats = unsafe { ref_arg(stats, "stats") }?;
        let s = stats
            .stats
            .slots
            .get(i)
            .ok_or_else(|| Failure::new(shmc_result::InvalidArgument, format!("no slot row {i}")))?;
        let ns = |d: Option<std::time::Duration>| d.map_or(u64::MAX, |d| d.as_nanos() as u64);
        let row = shmc_slot_stats {
            slot: s.slot,
            index: s.index.unwrap_or(u32::MAX),
            state: state_of(s.state),
            pid: s.pid,
            generation: s.generation,
            restarts: s.restarts,
            heartbeat_age_ns: ns(s.heartbeat_age),
            sent_messages: s.sent_messages,
            sent_bytes: s.sent_bytes,
            received_messages: s.received_messages,
            received_bytes: s.received_bytes,
            inbox_bytes: s.inbox_bytes,
            futex_waits: s.futex_waits,
            futex_wakes: s.futex_wakes,
            full_waits: s.full_waits,
            last_request_ns: ns(s.last_request),
            last_map_ns: ns(s.last_map),
        };
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, row) };
        Ok(())
    })
}

/// Writes the snapshot as a text table (slots, then locks), as
/// [`crate::shmc_error_string`] writes text: pass `len` 0 to learn the size
/// from `*out_len` (plus one for the NUL).
///
/// # Safety
/// `stats` NULL or a live snapshot; `buf` valid for `len` bytes; `out_len`
/// NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn shmc_stats_format(
    stats: *const shmc_stats,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> shmc_result {
    guard(|| {
        // SAFETY: forwarded from our caller.
        let stats = unsafe { ref_arg(stats, "stats") }?;
        // SAFETY: forwarded from our caller.
        unsafe { write_c_string(&stats.stats.to_string(), buf.cast(), len, out_len) }
    })
}

/// Frees a snapshot (NULL is ignored).
///
/// # Safety
/// `stats` NULL or a live snapshot, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn shmc_stats_free(stats: *mut shmc_stats) {
    boundary::guard_value((), || {
        // SAFETY: forwarded from our caller.
        unsafe { free_handle(stats) }
    })
}

/// Waits up to `timeout_ms` (`SHMC_WAIT_FOREVER`: without limit) for a
/// connection on the listening socket `listener_fd` (TCP or unix: one from
/// [`shmc_listener_take`], say) and stores the accepted connection's
/// descriptor in `*out_fd`, **ending the wait as soon as this worker is told
/// to stop** (drain for a reload, shutdown, `SIGTERM`; without a master,
/// [`shmc_request_shutdown`]): then it returns `SHMC_RESULT_STOPPING` and the
/// worker should finish the connections it has and exit. A blocking
/// `accept(2)` on a shared listener never sees the drain, so a reload waits
/// out the master's drain deadline; this does not.
///
/// It sets the listener non-blocking, as workers sharing one socket must
/// (they race for each connection; the losers go back to waiting); the
/// connection it returns is blocking and close-on-exec, and the caller owns
/// it (`close(2)`). `listener_fd` stays the caller's.
///
/// **Threads:** any thread, any time, also while another thread runs
/// [`crate::shmc_run`] or [`crate::shmc_poll`] on this worker (it uses no
/// state of the worker's messenger), and from several threads at once. It
/// does not beat the worker's heartbeat: the thread that runs the messenger
/// does, so a hung messenger is still seen as hung. **fork():** the
/// worker does not survive it (`SHMC_RESULT_FORKED`).
///
/// # Errors
/// `SHMC_RESULT_STOPPING`, `SHMC_RESULT_TIMED_OUT`,
/// `SHMC_RESULT_INVALID_ARGUMENT` (a negative `listener_fd`),
/// `SHMC_RESULT_IO` (not a listening TCP or unix socket, or `accept(2)`
/// failed; the detail is in [`crate::shmc_last_error_message`]).
///
/// # Safety
/// `w` NULL or a live handle; `out_fd` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_worker_accept(
    w: *const shmc_worker,
    listener_fd: i32,
    timeout_ms: u64,
    out_fd: *mut i32,
) -> shmc_result {
    use std::os::fd::{BorrowedFd, IntoRawFd};
    use std::time::{Duration, Instant};
    guard(|| {
        let out = out_arg(out_fd, "out_fd")?;
        // SAFETY: forwarded from our caller.
        let worker = unsafe { worker_arg(w) }?;
        if listener_fd < 0 {
            return Err(Failure::new(
                shmc_result::InvalidArgument,
                format!("listener_fd {listener_fd} is negative"),
            ));
        }
        // SAFETY: a non-negative number the caller says is its open
        // listener, borrowed for this call only. If it is not open, every
        // use below fails with EBADF: no memory is touched through it.
        let listener = unsafe { BorrowedFd::borrow_raw(listener_fd) };
        let deadline = boundary::deadline(timeout_ms);
        // Slices, so a local shutdown request (no master) is seen too.
        let slice = Duration::from_millis(50);
        loop {
            if worker.stop_requested() {
                return Err(shmc_result::Stopping.into());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(shmc_result::TimedOut.into());
            }
            match worker.watch.accept(listener, Some(left.min(slice))) {
                Ok(Some(conn)) => {
                    // SAFETY: checked non-NULL; valid by our caller's contract.
                    unsafe { put(out, conn.into_raw_fd()) };
                    return Ok(());
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(Failure::new(
                        shmc_result::Io,
                        format!("accept on fd {listener_fd}: {e}"),
                    ))
                }
            }
        }
    })
}
