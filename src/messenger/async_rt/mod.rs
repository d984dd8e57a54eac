//! The messenger for tokio (feature `tokio`): [`AsyncMessenger`].
//!
//! A lane has one writer, so one task owns the [`Messenger`] and does all
//! its sending and receiving: the *driver*, spawned by
//! [`Messenger::into_async`]. Everyone else holds a cheap, cloneable
//! [`AsyncMessenger`] and talks to the driver through the messenger's
//! outbox (a queue plus a ring of the worker's own doorbell bit, which is
//! what wakes a parked driver); answers come back through oneshot
//! channels. So `request`, `map`, `consume` and `invoke` are futures that
//! never block a runtime thread, and any number of tasks may have calls
//! in flight at once.
//!
//! # How the driver waits
//! When nothing has arrived, the driver takes the doorbell and checks
//! every lane exactly like a blocking receiver about to park (see
//! [`crate::wake`]), then waits in the reactor:
//!
//! - **eventfd** (the default wherever the segment has them: every cluster
//!   worker, forked or spawned, and threads mode): the park word says
//!   `PARKED_FD`, so the sender that finds it so writes the slot's eventfd,
//!   which the driver awaits through `AsyncFd`. One wake, straight into
//!   the reactor.
//! - **waiter thread** (a process that attached to a bare memfd without
//!   the eventfds, or when asked for by [`AsyncWake::Thread`]): a thread
//!   parks on the futex for the driver and wakes it through a
//!   `tokio::sync::Notify`. Two wakes (futex, then the runtime's own) per
//!   message that finds the driver asleep.
//!
//! `cargo bench --features tokio --bench async_wake` measures both beside
//! the blocking messenger; the eventfd path is the faster (README).
//!
//! Either way the driver also wakes on a timer: at the earliest deadline
//! of a call in flight, every 5 ms while a call waits (to see its target
//! die), and at most 50 ms apart otherwise (heartbeat, leader terms, the
//! driver's own end when every handle is gone).

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

mod driver;

use driver::{drive, Waiter, WakeFd};

use super::calls::{decode_entries, targets};
use super::core::{Op, Settled};
use super::dispatch::{Done, Outbox, RemoteCall};
use super::encode::{decode, encode_call};
use super::error::{CallError, EmitError, MapError, RegisterError};
use super::{
    leader, wire, Consumed, Ctx, HandlerId, Messenger, Target, WorkerId, LATENCY_MAP, LATENCY_REQUEST,
};
use crate::cluster::ClusterView;
use crate::lock::{LockError, Locks, Section};
use crate::segment::Segment;
use crate::{sys, Tag};

/// The longest the driver sleeps without looking around.
pub(super) const SAFETY_NET: Duration = Duration::from_millis(50);
/// How often [`AsyncMessenger::stopped`] looks at the stop flags.
const STOP_POLL: Duration = Duration::from_millis(10);

/// How the driver of an [`AsyncMessenger`] is woken when it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AsyncWake {
    /// The slot's eventfd when the segment has them, else a waiter thread.
    #[default]
    Auto,
    /// The slot's eventfd, polled by the reactor (one wake).
    EventFd,
    /// A thread that parks on the futex and notifies the driver (two
    /// wakes; works in a process without the eventfds).
    Thread,
}

/// What handles share with the driver.
pub(super) struct Shared {
    outbox: Arc<Outbox>,
    segment: Segment,
    me: WorkerId,
    workers: u32,
    /// The payload limit (`Messenger::max_payload`).
    max_payload: usize,
    /// `ready()` asked: the driver tells the master.
    ready: AtomicBool,
    /// Delivery ids of `consume` calls made through handles.
    next_delivery: AtomicU64,
    /// The wake the driver ended up using.
    wake: AsyncWake,
    /// The lock table, made once, so its cache of name → entry lasts
    /// across sections.
    locks: std::sync::OnceLock<Locks>,
}

/// A cloneable, `Send + Sync` handle to a messenger driven by a tokio task
/// (see [`Messenger::into_async`]).
///
/// A lane has one writer, so one task, the *driver*, owns the messenger and
/// does all its sending and receiving; handles reach it through its outbox
/// and get answers back through oneshot channels, so no call blocks a
/// runtime thread. When idle the driver waits for its slot's eventfd in the
/// reactor (a sender that finds it parked writes the eventfd), or, in a
/// process without the eventfds, for a waiter thread parked on the futex
/// ([`AsyncWake`]).
///
/// Handlers are registered on the [`Messenger`] before it is turned into
/// this: [`Messenger::on`] and [`Messenger::on_request`] run on the driver
/// task (keep them short and never block in them), and
/// [`Messenger::on_async`] runs each call as a task of its own.
///
/// The driver ends when every `AsyncMessenger` is dropped (it notices
/// within 50 ms), dropping the messenger and its worker.
#[derive(Clone)]
pub struct AsyncMessenger {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AsyncMessenger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncMessenger")
            .field("slot", &self.shared.me.slot)
            .field("generation", &self.shared.me.generation)
            .field("wake", &self.shared.wake)
            .finish_non_exhaustive()
    }
}

impl Messenger {
    /// Registers an async handler for `event`, for `request`, `map` and
    /// `consume` (and `notify`): each call runs `f`'s future as its own
    /// tokio task, and its `Ok` value or `Err` text is the answer. A call
    /// that panics is answered `HandlerFailed("reply dropped")`.
    ///
    /// It needs a tokio runtime where the messenger dispatches: inside the
    /// driver of [`Messenger::into_async`], or a blocking `poll`/`run` on a
    /// runtime thread; elsewhere the runtime current at registration is
    /// used, and without one the call is answered `HandlerFailed`.
    ///
    /// # Errors
    /// `EventName`.
    pub fn on_async<T, R, E, F, Fut>(&mut self, event: &str, mut f: F) -> Result<HandlerId, RegisterError>
    where
        T: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        E: std::fmt::Display + Send + 'static,
        F: FnMut(Ctx, T) -> Fut + Send + 'static,
        Fut: Future<Output = Result<R, E>> + Send + 'static,
    {
        let registered = tokio::runtime::Handle::try_current().ok();
        self.on_request_async::<T, R, _>(event, move |ctx, value, reply| {
            let Some(rt) = tokio::runtime::Handle::try_current()
                .ok()
                .or_else(|| registered.clone())
            else {
                reply.send(Err("an on_async handler needs a tokio runtime".into()));
                return;
            };
            let fut = f(ctx.clone(), value);
            rt.spawn(async move {
                reply.send(fut.await.map_err(|e| e.to_string()));
            });
        })
    }

    /// Hands the messenger to a driver task on the current tokio runtime
    /// and returns the handle to use from any task or thread.
    ///
    /// # Panics
    /// Outside a tokio runtime (like `tokio::spawn`).
    pub fn into_async(self) -> AsyncMessenger {
        self.into_async_with(AsyncWake::Auto)
    }

    /// [`Messenger::into_async`] with a chosen wake (for measuring one
    /// against the other). `EventFd` without eventfds falls back to a
    /// waiter thread.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn into_async_with(self, wake: AsyncWake) -> AsyncMessenger {
        // A descriptor of its own for the reactor: open for as long as the
        // registration lives, whatever happens to the segment's.
        let fd = self
            .segment
            .wake_fd(self.slot)
            .and_then(|fd| sys::dup_cloexec(fd).ok());
        let wake = match (wake, &fd) {
            (AsyncWake::Auto | AsyncWake::EventFd, Some(_)) => AsyncWake::EventFd,
            _ => AsyncWake::Thread,
        };
        let shared = Arc::new(Shared {
            outbox: self.outbox.clone(),
            segment: self.segment.clone(),
            me: self.me(),
            workers: self.workers,
            max_payload: self.max_payload,
            ready: AtomicBool::new(false),
            next_delivery: AtomicU64::new(1),
            wake,
            locks: std::sync::OnceLock::new(),
        });
        let waiter = match (wake, fd) {
            (AsyncWake::EventFd, Some(fd)) => {
                // SAFETY: `WakeFd` owns the descriptor, so it stays open and
                // names the same eventfd until the registration is dropped
                // with it.
                match unsafe { AsyncFd::register_with_interest(WakeFd(fd), tokio::io::Interest::READABLE) } {
                    Ok(afd) => Waiter::Fd(afd),
                    Err(e) => {
                        tracing::warn!(error = %e, "eventfd not pollable; using a waiter thread");
                        Waiter::thread(&self.segment, self.slot)
                    }
                }
            }
            _ => Waiter::thread(&self.segment, self.slot),
        };
        tokio::spawn(drive(self, shared.clone(), waiter));
        AsyncMessenger { shared }
    }
}

/// Waits for an operation's end from the driver, with a little slack past
/// the deadline for a driver that is busy in a handler at that moment.
async fn settled(rx: oneshot::Receiver<Settled>, deadline: Instant) -> Result<Settled, CallError> {
    let slack = tokio::time::Instant::from(deadline) + Duration::from_secs(1);
    match tokio::time::timeout_at(slack, rx).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(_)) => Err(CallError::WorkerDied),
        Err(_) => Err(CallError::TimedOut),
    }
}

impl AsyncMessenger {
    /// This worker's slot.
    pub fn slot(&self) -> u32 {
        self.shared.me.slot
    }

    /// This worker's generation.
    pub fn generation(&self) -> u32 {
        self.shared.me.generation
    }

    /// Slots in the segment.
    pub fn workers(&self) -> u32 {
        self.shared.workers
    }

    /// How the driver is woken (eventfd or waiter thread).
    pub fn wake(&self) -> AsyncWake {
        self.shared.wake
    }

    /// The largest payload a message may carry ([`Messenger::max_payload`]).
    pub fn max_payload(&self) -> usize {
        self.shared.max_payload
    }

    /// Live workers now, in slot order.
    pub fn live_workers(&self) -> Vec<WorkerId> {
        self.view().live_workers()
    }

    fn view(&self) -> ClusterView<'_> {
        ClusterView::new(&self.shared.segment, self.shared.me)
    }

    /// Like [`Messenger::emit`], without waiting: the driver sends it (in
    /// order with this handle's other messages).
    ///
    /// # Errors
    /// `EventName`, `Encode`, `NoSuchWorker`, `TooLarge`.
    pub fn emit<T: Serialize + ?Sized>(
        &self,
        target: Target,
        event: &str,
        value: &T,
    ) -> Result<(), EmitError> {
        let bytes = encode_call(event, 0, value, self.shared.max_payload)?;
        let to = targets(&self.view(), target)?;
        let bridge = match target {
            Target::All | Target::Others => {
                super::calls::check_cross_host(&self.view(), event, &bytes)?;
                // Only while the bridge sees another host: a broadcast then
                // costs a copy through the bridge (the hosts bench: a local
                // broadcast at 0.13-0.29x with a bridge and no other host).
                let view = self.view();
                (view.remote_hosts() > 0).then(|| view.bridge()).flatten()
            }
            Target::Worker(_) => None,
        };
        let tag = Tag {
            kind: wire::EMIT,
            correlation: 0,
        };
        for slot in to {
            self.shared.outbox.push(slot, tag, bytes.clone());
        }
        if let Some(bridge) = bridge {
            let tag = Tag {
                kind: wire::BRIDGE_BCAST,
                correlation: 0,
            };
            self.shared.outbox.push(bridge.slot, tag, bytes);
        }
        Ok(())
    }

    /// [`AsyncMessenger::emit`] to every live worker, this one included.
    ///
    /// # Errors
    /// As [`AsyncMessenger::emit`].
    pub fn broadcast<T: Serialize + ?Sized>(&self, event: &str, value: &T) -> Result<(), EmitError> {
        self.emit(Target::All, event, value)
    }

    /// Queues a message as it is (the host's bridge relays what it was
    /// given), in order with this handle's other messages.
    #[cfg(feature = "nats")]
    pub(crate) fn push_raw(&self, to: u32, tag: Tag, bytes: Vec<u8>) {
        self.shared.outbox.push(to, tag, bytes);
    }

    /// What this worker reads of the cluster.
    #[cfg(feature = "nats")]
    pub(crate) fn cluster_view(&self) -> ClusterView<'_> {
        self.view()
    }

    /// The bridge tells its host's workers how many other hosts it sees
    /// connected (`Control::bridge_hosts`).
    #[cfg(feature = "nats")]
    pub(crate) fn set_bridge_hosts(&self, n: usize) {
        self.shared
            .segment
            .control()
            .bridge_hosts
            .store(u32::try_from(n).unwrap_or(u32::MAX), Relaxed);
    }

    /// Who leads `role` on this host now (the bridge follows it).
    #[cfg(feature = "nats")]
    pub(crate) fn local_leader(&self, role: &str) -> Option<super::Leader> {
        super::leader::local_leader(&self.shared.segment, self.shared.me, role)
    }

    /// The bridge tells its host's workers the NATS server's
    /// `max_payload` (`Control::bridge_max_payload`).
    #[cfg(feature = "nats")]
    pub(crate) fn set_bridge_max_payload(&self, max: usize) {
        self.shared
            .segment
            .control()
            .bridge_max_payload
            .store(u32::try_from(max).unwrap_or(u32::MAX), Relaxed);
    }

    /// Runs `op` in the driver's call core and waits for its end.
    pub(crate) async fn call(&self, op: Op, deadline: Instant) -> Result<Settled, CallError> {
        let (tx, rx) = oneshot::channel();
        self.shared.outbox.push_call(RemoteCall {
            op,
            deadline,
            done: Done::Task(tx),
        });
        settled(rx, deadline).await
    }

    /// A request's or invoke's answer.
    async fn call_answer(&self, op: Op, deadline: Instant) -> Result<Vec<u8>, CallError> {
        match self.call(op, deadline).await? {
            Settled::Answer(r) => r,
            other => unreachable!("a request settled as {other:?}"),
        }
    }

    /// Like [`Messenger::request`], awaited.
    ///
    /// # Errors
    /// As [`Messenger::request`]; `WorkerDied` if the driver is gone.
    pub async fn request<T, R>(
        &self,
        worker: u32,
        event: &str,
        value: &T,
        deadline: Instant,
    ) -> Result<R, CallError>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let bytes = encode_call(event, 0, value, self.shared.max_payload)?;
        let started = Instant::now();
        let r = self
            .call_answer(Op::Request { to: worker, bytes }, deadline)
            .await;
        self.record_latency(LATENCY_REQUEST, started.elapsed());
        decode(&r?)
    }

    fn record_latency(&self, which: usize, d: Duration) {
        self.shared
            .segment
            .stats_entry(self.shared.me.slot)
            .add_latency(which, d.as_nanos() as u64);
    }

    /// Like [`Messenger::map`], awaited: every live worker (this one
    /// included) runs its first handler for `event`; one entry per worker,
    /// in slot order; never past `deadline`.
    ///
    /// # Errors
    /// Only for the call as a whole: `EventName`, `Encode`, `TooLarge`;
    /// `WorkerDied` if the driver is gone.
    #[allow(clippy::type_complexity)]
    pub async fn map<T, R>(
        &self,
        event: &str,
        value: &T,
        deadline: Instant,
    ) -> Result<Vec<(WorkerId, Result<R, MapError>)>, CallError>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let bytes = encode_call(event, 0, value, self.shared.max_payload)?;
        super::calls::check_cross_host(&self.view(), event, &bytes)?;
        let started = Instant::now();
        let entries = match self.call(Op::Map { bytes }, deadline).await? {
            Settled::Map(entries) => entries,
            other => unreachable!("a map settled as {other:?}"),
        };
        self.record_latency(LATENCY_MAP, started.elapsed());
        Ok(decode_entries(entries))
    }

    /// Like [`Messenger::consume`], awaited: exactly one live worker with a
    /// handler (the shallowest inbox) runs `event`; at least once, with
    /// the same delivery id on a redelivery.
    ///
    /// # Errors
    /// As [`Messenger::consume`].
    pub async fn consume<T: Serialize + ?Sized>(
        &self,
        event: &str,
        value: &T,
        deadline: Instant,
    ) -> Result<Consumed, CallError> {
        let me = self.shared.me;
        // Distinct from the ids of the messenger's own `consume` (bit 31).
        let n = self.shared.next_delivery.fetch_add(1, Relaxed);
        let delivery =
            (u64::from(me.slot) << 52) ^ (u64::from(me.generation) << 32) ^ (1 << 31) ^ (n & 0x7fff_ffff);
        let bytes = encode_call(event, delivery, value, self.shared.max_payload)?;
        match self.call(Op::Consume { delivery, bytes }, deadline).await? {
            Settled::Consumed(r) => r,
            other => unreachable!("a consume settled as {other:?}"),
        }
    }

    /// Like [`Messenger::emit_at`]: to the worker in `slot` of another
    /// host (feature `nats`), without waiting.
    ///
    /// # Errors
    /// As [`Messenger::emit_at`].
    pub fn emit_at<T: Serialize + ?Sized>(
        &self,
        host: &str,
        slot: u32,
        event: &str,
        value: &T,
    ) -> Result<(), EmitError> {
        let call = encode_call(event, 0, value, self.shared.max_payload)?;
        super::calls::check_cross_host(&self.view(), event, &call)?;
        let bridge = self.view().bridge().ok_or(EmitError::NoBridge)?;
        let tag = Tag {
            kind: wire::BRIDGE_EMIT,
            correlation: 0,
        };
        self.shared
            .outbox
            .push(bridge.slot, tag, super::calls::routed(host, slot, &call)?);
        Ok(())
    }

    /// Like [`Messenger::request_at`], awaited: the worker in `slot` of
    /// another host (feature `nats`) runs its first handler for `event`.
    ///
    /// # Errors
    /// As [`Messenger::request_at`].
    pub async fn request_at<T, R>(
        &self,
        host: &str,
        slot: u32,
        event: &str,
        value: &T,
        deadline: Instant,
    ) -> Result<R, CallError>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let call = encode_call(event, 0, value, self.shared.max_payload)?;
        super::calls::check_cross_host(&self.view(), event, &call)?;
        let bytes = super::calls::routed(host, slot, &call)?;
        decode(&self.call_answer(Op::Route { bytes }, deadline).await?)
    }

    /// The host's NATS bridge, if live (see [`Messenger::bridge`]).
    pub fn bridge(&self) -> Option<WorkerId> {
        self.view().bridge()
    }

    /// Like [`Messenger::invoke`], awaited: the leader's handler for
    /// `method` runs. Waits (until `deadline`) for a leader if there is
    /// none yet.
    ///
    /// # Errors
    /// As [`Messenger::invoke`].
    pub async fn invoke<T, R>(&self, method: &str, args: &T, deadline: Instant) -> Result<R, CallError>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let bytes = encode_call(&leader::invoke_event(method), 0, args, self.shared.max_payload)?;
        decode(
            &self
                .call_answer(Op::Invoke { bytes, retry: false }, deadline)
                .await?,
        )
    }

    /// The segment's lock table, with this worker recorded as holder (for
    /// [`Locks::synchronize_async`], a section that crosses `.await`s).
    ///
    /// # Errors
    /// As [`Locks::new`].
    pub fn locks(&self) -> Result<Locks, LockError> {
        if let Some(locks) = self.shared.locks.get() {
            return Ok(locks.clone());
        }
        let locks = Locks::new(&self.shared.segment, self.shared.me.slot)?;
        Ok(self.shared.locks.get_or_init(|| locks).clone())
    }

    /// Runs `f` holding lock `name` (`""`: the global lock) and returns its
    /// result, without blocking a runtime thread: when the lock is free it
    /// is taken, `f` run and the lock released right here (a try-lock, no
    /// thread hop); when it is held, a blocking-pool thread waits for it,
    /// runs `f` and releases it (a pthread mutex belongs to the thread that
    /// locked it). The section is told if the previous holder died inside
    /// it. Keep `f` short: it may run on a runtime thread.
    ///
    /// # Errors
    /// As [`Locks::synchronize_key`]; a panic in `f` is resumed here.
    pub async fn synchronize_key<R, F>(&self, name: &str, f: F) -> Result<R, LockError>
    where
        R: Send + 'static,
        F: FnOnce(&Section) -> R + Send + 'static,
    {
        let locks = self.locks()?;
        match locks.lock(name, Some(Duration::ZERO)) {
            Ok(guard) => {
                let r = f(&guard.section(name));
                drop(guard);
                return Ok(r);
            }
            Err(LockError::Timeout) => {}
            Err(e) => return Err(e),
        }
        let name = name.to_owned();
        let waited = tokio::task::spawn_blocking(move || {
            if name.is_empty() {
                locks.synchronize(f)
            } else {
                locks.synchronize_key(&name, f)
            }
        })
        .await;
        match waited {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(LockError::Io(io::Error::other(format!(
                "the lock thread failed: {e}"
            )))),
        }
    }

    /// [`AsyncMessenger::synchronize_key`] on the global lock.
    ///
    /// # Errors
    /// As [`AsyncMessenger::synchronize_key`].
    pub async fn synchronize<R, F>(&self, f: F) -> Result<R, LockError>
    where
        R: Send + 'static,
        F: FnOnce(&Section) -> R + Send + 'static,
    {
        self.synchronize_key("", f).await
    }

    /// Resolves once the driver has sent everything queued before this
    /// call: `emit`s and `broadcast`s made so far, and the answers of
    /// `on_async` handlers (and `Reply`s) already given. A worker about to
    /// exit awaits it so that no answer it owes is lost with its runtime.
    ///
    /// # Errors
    /// `WorkerDied` if the driver has ended; `TimedOut` after `deadline`.
    pub async fn flush(&self, deadline: Instant) -> Result<(), CallError> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .outbox
            .barriers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(move || {
                let _ = tx.send(());
            }));
        self.shared.outbox.wake();
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(CallError::WorkerDied),
            Err(_) => Err(CallError::TimedOut),
        }
    }

    /// Declares this worker ready ([`crate::Worker::ready`]).
    pub fn ready(&self) {
        self.shared.ready.store(true, Release);
        self.shared.outbox.wake();
    }

    /// Whether this worker was asked to stop (drain for a reload, or
    /// shutdown), or the process got `SIGTERM`/`SIGINT`: as
    /// [`crate::Worker::should_stop`], master or not.
    pub fn should_stop(&self) -> bool {
        self.view().stop_requested()
    }

    /// Resolves when [`AsyncMessenger::should_stop`] becomes true (looked
    /// at every 10 ms): a graceful-shutdown signal for a server, such as
    /// axum's `with_graceful_shutdown(messenger.stopped())`.
    pub async fn stopped(&self) {
        while !self.should_stop() {
            tokio::time::sleep(STOP_POLL).await;
        }
    }

    /// Every slot's state and counters (see [`Messenger::stats`]).
    pub fn stats(&self) -> crate::ClusterStats {
        self.view().stats()
    }

    /// Whether the worker in `slot` is live now (and its generation).
    pub fn live_generation(&self, slot: u32) -> Option<u32> {
        if slot >= self.shared.workers {
            return None;
        }
        self.view().live_generation(slot)
    }
}
