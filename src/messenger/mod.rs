//! The messenger: events, direct messages, broadcast, consume, map and
//! request/reply over the lanes, with typed payloads (serde + postcard) or
//! raw bytes. What it promises is written on [`Messenger`].
//!
//! # Where things are
//! - `core/`: the call protocol (targets, correlation ids, deaths,
//!   consume's redelivery, map's entries, deadlines, the leader of an
//!   invoke) as a state machine that does no I/O, and the contract every
//!   driver follows;
//! - `calls.rs`: the blocking driver of it (`request`, `map`, `consume`)
//!   and `emit`/`notify`; `dispatch.rs`: sending, the receive loop and the
//!   outbox other threads queue into; `handle.rs`: [`MessengerHandle`];
//!   `async_rt/`: the tokio driver (`AsyncMessenger`, feature `tokio`);
//!   `polled.rs`: the event-loop driver (calls started without waiting,
//!   non-blocking turns that park on the eventfd; the Node.js binding's);
//! - `handlers.rs`: registering and running handlers; `leader/`: elections,
//!   invoke, publish/subscribe; `wire.rs` and `encode.rs`: the message
//!   format and its limits; `error.rs`: one error type per operation.

#[cfg(feature = "tokio")]
mod async_rt;
mod calls;
mod core;
mod dispatch;
mod encode;
mod error;
mod global;
mod handle;
mod handlers;
mod host;
mod leader;
mod polled;
pub(crate) mod wire;

#[cfg(feature = "tokio")]
pub use async_rt::{AsyncMessenger, AsyncWake};
pub use calls::To;
pub use error::{CallError, CorruptLane, DispatchError, EmitError, MapError, RegisterError};
pub use global::{GlobalLeader, GlobalSection};
pub use handle::MessengerHandle;
pub use handlers::{BytesReply, Reply};
pub use host::{HostChange, HostEvent, HostId, HOST_EVENT};
#[cfg(test)]
pub(crate) use leader::leader_entry;
pub use leader::{Leader, LeaderChange};
pub use polled::{CallTicket, Finished, IdleWaiter, Turn};
pub use wire::MAX_EVENT_NAME;

#[cfg(feature = "nats")]
pub(crate) use self::core::Op;
#[cfg(feature = "nats")]
pub(crate) use self::core::Settled as SettledOp;
pub(crate) use encode::payload_limit;

/// A call message of `event` with `value`, for the host's bridge to hand
/// to workers (feature `nats`).
#[cfg(feature = "nats")]
pub(crate) fn encode_call_for_bridge<T: serde::Serialize + ?Sized>(
    event: &str,
    value: &T,
) -> Result<Vec<u8>, EmitError> {
    encode::encode_call(event, 0, value, usize::MAX)
}
#[cfg(feature = "nats")]
pub(crate) use global::{
    topic_event, Granted, LeaderWire, CAMPAIGN_EVENT, LEADER_EVENT, LOCK_EVENT, PUBLISH_EVENT,
    SUBSCRIBE_EVENT, UNLOCK_EVENT,
};
#[cfg(feature = "nats")]
pub(crate) use handlers::BridgeIncoming;

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustc_hash::FxHashMap;

use crate::cluster::ClusterView;
use crate::segment::Segment;
use crate::{Endpoint, Worker};

use self::core::{CallCore, OpId, Settled};
use dispatch::{Done, Outbox};
use handlers::Handlers;

/// How long a blocking call sleeps at most between looks at its targets'
/// liveness. Only a safety net where nobody counts deaths (no master): with
/// a master, a reaped target ends the wait at once.
const LIVENESS_SLICE: Duration = Duration::from_millis(5);

/// Where a message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// One worker slot.
    Worker(u32),
    /// Every live worker, the caller included.
    All,
    /// Every live worker but the caller.
    Others,
}

/// A worker incarnation: host, slot and generation (who sent a message,
/// who answered). Ordered by host number (this host first; the others in
/// the order this process first heard of them, which need not be a
/// `map`'s order by host name), then slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId {
    /// Its host: [`HostId::LOCAL`] but for a worker another host's bridge
    /// answered for (feature `nats`).
    pub host: HostId,
    /// The sender's slot.
    pub slot: u32,
    /// The sender's generation in that slot.
    pub generation: u32,
}

impl WorkerId {
    /// The worker in `slot` of this host, in `generation`.
    pub const fn local(slot: u32, generation: u32) -> Self {
        Self {
            host: HostId::LOCAL,
            slot,
            generation,
        }
    }
}

/// What a handler learns about the message it runs for.
#[derive(Debug, Clone)]
pub struct Ctx {
    sender: WorkerId,
    event: std::sync::Arc<str>,
    delivery_id: u64,
    kind: CallKind,
}

/// How a handler was called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// `emit`, `send`, `broadcast`: no reply is expected.
    Event,
    /// `request` or `map`: the caller waits for the reply.
    Request,
    /// `consume`: this worker was chosen to run the task.
    Consume,
}

impl Ctx {
    /// The sender.
    pub fn sender(&self) -> WorkerId {
        self.sender
    }

    /// The event name.
    pub fn event(&self) -> &str {
        &self.event
    }

    /// For `consume`: the delivery id, the same on every redelivery of one
    /// task (0 otherwise).
    pub fn delivery_id(&self) -> u64 {
        self.delivery_id
    }

    /// How the handler was called.
    pub fn kind(&self) -> CallKind {
        self.kind
    }
}

/// How a [`Messenger::consume`] ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Consumed {
    /// The worker whose handler finished the task.
    pub worker: WorkerId,
    /// The task's delivery id.
    pub delivery_id: u64,
    /// Workers it was sent to (more than 1 after a redelivery or a worker
    /// without a handler).
    pub attempts: u32,
}

/// Per-event counters of this process's messenger.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventStats {
    /// Messages received for the event.
    pub received: u64,
    /// Handler runs that completed.
    pub handled: u64,
    /// Payloads that did not decode as the handler's type (the handler was
    /// not called).
    pub decode_failures: u64,
    /// Handlers that panicked or returned an error.
    pub failures: u64,
    /// Messages received with no handler registered.
    pub unhandled: u64,
    /// Calls and messages this process sent for the event.
    pub sent: u64,
}

impl EventStats {
    /// Adds `other`'s counts to these.
    fn add(&mut self, other: &EventStats) {
        self.received += other.received;
        self.handled += other.handled;
        self.decode_failures += other.decode_failures;
        self.failures += other.failures;
        self.unhandled += other.unhandled;
        self.sent += other.sent;
    }
}

/// Identifies a registered handler, for [`Messenger::off_handler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HandlerId(u64);

/// One worker's messenger: events, direct messages, broadcast, consume,
/// map and request/reply over the lanes, with typed payloads (serde +
/// postcard) or raw bytes.
///
/// A `Messenger` owns one worker's endpoint. It is driven by the thread
/// that owns it: [`Messenger::poll`] / [`Messenger::dispatch`] run handlers
/// for what has arrived (event-loop style), [`Messenger::run`] does that
/// until the worker is told to stop (a receive loop on its own thread), and
/// every blocking call (`request`, `map`, `consume`) keeps dispatching while
/// it waits, so two workers calling each other never deadlock. Other
/// threads of the process send through a [`MessengerHandle`], and an
/// asynchronous [`Reply`] can be answered from any thread.
///
/// # Semantics
/// - Per-sender FIFO to each receiver (one lane per pair).
/// - `broadcast` and `to(All)` reach every live worker, the caller included
///   (its own copy never crosses a lane: it waits in the messenger, in
///   order, and runs at its next dispatch).
/// - Payloads up to [`Messenger::max_payload`] to every target, the caller
///   included; a larger one is `TooLarge` before anything is sent.
/// - `request`/`map` run the *first* handler for the event on the target;
///   `emit`/`send`/`broadcast` run *every* handler for it.
/// - `consume` runs on exactly one live worker with a handler, the one with
///   the shallowest inbox. Delivery is **at least once**: if the chosen
///   worker dies before it has acknowledged (replied), the caller sends the
///   task to another worker with the same delivery id
///   ([`Ctx::delivery_id`]), so a handler that must not act twice can drop
///   duplicates. A worker that has no handler says so at once and the next
///   one is tried; if none has one, `NoHandler`.
/// - A worker is live while the master's table says `Starting`, `Ready` or
///   `Draining` (without a master: while its slot is claimed by a live
///   process). Messages to a starting worker wait in its lanes; messages to
///   a slot whose worker died go to its successor; replies to a dead
///   generation are discarded. A call whose target dies fails with
///   `WorkerDied` as soon as the death is visible (the master reaps it,
///   within milliseconds), not at the deadline.
pub struct Messenger {
    /// The worker whose endpoint this is (a cluster worker, or one of a
    /// threads-mode cluster without a master).
    worker: Box<Worker>,
    segment: Segment,
    slot: u32,
    generation: u32,
    workers: u32,
    /// The payload limit ([`payload_limit`]).
    max_payload: usize,
    /// The record limit (the segment's `max_message`).
    max_message: usize,
    /// Messages to this worker itself, in order: they never cross a lane
    /// (see [`Messenger::deliver`]).
    local: VecDeque<crate::Message>,
    /// Payload bytes in `local`.
    local_bytes: usize,
    /// A message of `local` is being handled: its reply to this worker is
    /// queued without handling older ones first (no recursion per queued
    /// message).
    in_local: bool,
    /// The outbox is being sent ([`Messenger::flush_outbox`]): a send in
    /// it that waits for room dispatches, and that dispatch must not send
    /// the outbox again — it would recurse once per full lane (a bridge
    /// relaying a stream of broadcasts overflowed its stack) and send newer
    /// messages before older ones still in hand.
    in_flush: bool,
    handlers: FxHashMap<String, Handlers>,
    next_handler: u64,
    /// The calls in flight, of this thread and of the handles (see
    /// [`core`]).
    core: CallCore,
    /// Operations started for other threads (handles, the async
    /// messenger): where each one's end goes.
    remote: FxHashMap<OpId, Done>,
    /// Ends of calls started by an event-loop driver on this thread
    /// ([`Done::Polled`]), until [`Messenger::take_finished`].
    polled: VecDeque<(OpId, Settled)>,
    /// An event-loop driver turns this messenger ([`Messenger::turn`]):
    /// a dispatch handles every answer that has arrived instead of
    /// returning at the first one that ends a call. Its callers are
    /// promises resolved after the turn, and each dispatch looks at every
    /// call in flight (deadlines, deaths): with thousands in flight,
    /// one dispatch per answer made the turns quadratic (8,000 requests
    /// in flight took 8 s, most of them past a 8 s timeout).
    batch_answers: bool,
    /// Delivery ids of this thread's `consume`s.
    next_delivery: u64,
    /// Requests made, for [`TIME_ONE_REQUEST_IN`].
    requests: u32,
    /// The segment's death count when the calls' targets were last checked
    /// (see [`Messenger::check_liveness`]).
    deaths_seen: u32,
    /// [`LIVENESS_SLICE`]; longer in tests that must see a death noticed
    /// through the master's count alone.
    liveness_slice: Duration,
    outbox: Arc<Outbox>,
    leader: leader::LeaderState,
    stats: RefCell<FxHashMap<String, EventStats>>,
    /// Buffers of messages sent or received, kept for the next ones (see
    /// [`Messenger::buffer`]).
    spare: Vec<Vec<u8>>,
    /// The host's bridge (feature `nats`) takes every message that is not
    /// an answer here, instead of handlers.
    bridge_hook: Option<handlers::BridgeHook>,
}

impl fmt::Debug for Messenger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Messenger")
            .field("slot", &self.slot)
            .field("generation", &self.generation)
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

impl Drop for Messenger {
    fn drop(&mut self) {
        // Calls other threads queued that this messenger will never start:
        // dropping them closes their callers' channels, who learn
        // `WorkerDied` now instead of at their deadline.
        self.outbox
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

impl Messenger {
    /// The messenger of a worker: a cluster's (fork mode's closure
    /// argument, or [`Worker::from_env`]) or a threads-mode one.
    pub fn new(worker: Worker) -> Self {
        Self::build(Box::new(worker))
    }

    /// A messenger on a bare endpoint of a segment without a master (a
    /// process that attached to it): its worker is one without a master
    /// (see [`Worker`]'s "Without a master").
    pub fn from_endpoint(endpoint: Endpoint) -> Self {
        let instances = endpoint.segment().layout().workers();
        Self::new(Worker::unmanaged(endpoint, instances))
    }

    /// Threads mode: `n` messengers on one new segment, one per slot, each
    /// with its own [`Worker`], to be moved to `n` threads; code written
    /// for a cluster runs unchanged. (`Cluster::builder().threads(n)` runs
    /// the threads too.)
    ///
    /// # Errors
    /// If the segment cannot be created (invalid `n`).
    pub fn threads(n: u32) -> Result<Vec<Self>, crate::CreateError> {
        Ok(crate::cluster::unmanaged_workers(n)?
            .into_iter()
            .map(Self::new)
            .collect())
    }

    /// Standalone: one worker alone, every target is itself.
    ///
    /// # Errors
    /// If the segment cannot be created.
    pub fn standalone() -> Result<Self, crate::CreateError> {
        Ok(Self::threads(1)?.remove(0))
    }

    fn build(worker: Box<Worker>) -> Self {
        let segment = worker.segment().clone();
        let (slot, generation) = (worker.slot(), worker.generation());
        let layout = *segment.layout();
        let outbox = Arc::new(Outbox {
            queue: Mutex::new(Vec::new()),
            calls: Mutex::new(Vec::new()),
            barriers: Mutex::new(Vec::new()),
            nonempty: AtomicBool::new(false),
            segment: segment.clone(),
            slot,
        });
        // A predecessor that died in a consume's handler left its mark.
        segment
            .stats_entry(slot)
            .consume_busy
            .store(0, std::sync::atomic::Ordering::Relaxed);
        Self {
            worker,
            segment,
            slot,
            generation,
            workers: layout.workers(),
            max_payload: payload_limit(&outbox.segment),
            max_message: layout.max_message(),
            local: VecDeque::new(),
            local_bytes: 0,
            in_local: false,
            in_flush: false,
            handlers: FxHashMap::default(),
            next_handler: 1,
            core: CallCore::new(slot),
            remote: FxHashMap::default(),
            polled: VecDeque::new(),
            batch_answers: false,
            next_delivery: 0,
            requests: 0,
            deaths_seen: ClusterView::new(&outbox.segment, WorkerId::local(slot, generation)).deaths(),
            liveness_slice: LIVENESS_SLICE,
            outbox,
            leader: leader::LeaderState::default(),
            stats: RefCell::default(),
            spare: Vec::new(),
            bridge_hook: None,
        }
    }

    fn ep(&mut self) -> &mut Endpoint {
        self.worker.endpoint()
    }

    /// This worker's slot.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// This worker's generation.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// This messenger's worker: its identity, `ready`, `should_stop`,
    /// `synchronize`, peers and stats.
    pub fn worker(&self) -> &Worker {
        &self.worker
    }

    /// How this messenger's blocking calls wait for messages (see
    /// [`crate::WaitStrategy`]; default: spin briefly, then park).
    pub fn set_wait_strategy(&mut self, wait: crate::WaitStrategy) {
        self.ep().set_wait_strategy(wait);
    }

    /// A handle for other threads of this process.
    pub fn handle(&self) -> MessengerHandle {
        MessengerHandle {
            outbox: self.outbox.clone(),
            workers: self.workers,
            max_payload: self.max_payload,
        }
    }

    /// Every slot's state and counters from the segment (this worker's own
    /// exact), including the latency of each slot's last map and of a
    /// recent request (one in 16 is timed).
    pub fn stats(&self) -> crate::ClusterStats {
        self.worker.endpoint_ref().beat();
        self.view().stats()
    }

    /// The segment's lock table, with this worker recorded as holder (for
    /// `synchronize`: see [`crate::Locks`]).
    ///
    /// # Errors
    /// [`crate::LockError::Glibc`] below glibc 2.25.
    pub fn locks(&self) -> Result<crate::Locks, crate::LockError> {
        crate::Locks::new(&self.segment, self.slot)
    }

    /// Counters per event name.
    pub fn event_stats(&self) -> HashMap<String, EventStats> {
        self.stats.borrow().iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    fn count(&self, event: &str, f: impl FnOnce(&mut EventStats)) {
        let mut stats = self.stats.borrow_mut();
        match stats.get_mut(event) {
            Some(s) => f(s),
            None => f(stats.entry(event.to_owned()).or_default()),
        }
    }
    // ------------------------------------------------------------ liveness

    /// What this worker may read of the cluster.
    fn view(&self) -> ClusterView<'_> {
        ClusterView::new(&self.segment, self.me())
    }

    /// The generation of the worker now in `slot`, if one is live.
    fn live_generation(&self, slot: u32) -> Option<u32> {
        self.view().live_generation(slot)
    }

    fn me(&self) -> WorkerId {
        WorkerId::local(self.slot, self.generation)
    }

    /// The largest payload a message may carry, both ways: the encoded
    /// value (postcard) or the raw bytes, whatever the target (this worker
    /// itself included). It is the segment's `max_message` less the
    /// longest call header ([`MAX_EVENT_NAME`] + 9 bytes), so it does not
    /// depend on the event's name: 16,776,952 bytes with the default
    /// 16 MiB. A larger one fails with [`CallError::TooLarge`] before
    /// anything is sent; a handler's larger answer reaches its caller as
    /// `HandlerFailed`.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// Sets how long a blocking call waits at most between looks at its
    /// targets' liveness (tests of the master's death count).
    #[cfg(test)]
    pub(crate) fn set_liveness_slice(&mut self, slice: Duration) {
        self.liveness_slice = slice;
    }

    /// Live workers now: (slot, generation). Never the host's bridge.
    pub fn live_workers(&self) -> Vec<WorkerId> {
        self.view().live_workers()
    }

    /// The host's NATS bridge, if the master runs one (feature `nats`,
    /// `--nats`) and it is live now: the process that carries broadcasts,
    /// maps, consumes and calls to other hosts. Ask it for its counters
    /// with a request for `shmcluster::bridge::STATS_EVENT`.
    pub fn bridge(&self) -> Option<WorkerId> {
        self.view().bridge()
    }
}

const LATENCY_REQUEST: usize = 0;
/// One `request` in this many is timed for the slot's stats
/// (`SlotStats::last_request`), the first one included: timing one costs
/// a clock read at its end, on the round trip's critical path (20-30 ns,
/// about a tenth of the messenger's own cost on a 2-vCPU VM).
const TIME_ONE_REQUEST_IN: u32 = 16;
const LATENCY_MAP: usize = 1;
