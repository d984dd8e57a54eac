//! Events, direct messages, broadcast, consume, map and request/reply over
//! the lanes, with typed payloads (serde + postcard) or raw bytes.
//!
//! A [`Messenger`] owns one worker's endpoint. It is driven by the thread
//! that owns it: [`Messenger::poll`] / [`Messenger::dispatch`] run handlers
//! for what has arrived (event-loop style), [`Messenger::run`] does that
//! until the worker is told to stop (a receive loop on its own thread), and
//! every blocking call (`request`, `map`, `consume`) keeps dispatching while
//! it waits, so two workers calling each other never deadlock. Other
//! threads of the process send through a [`MessengerHandle`], and an
//! asynchronous [`Reply`] can be answered from any thread.
//!
//! # Semantics
//! - Per-sender FIFO to each receiver (one lane per pair).
//! - `broadcast` and `to(All)` reach every live worker, the caller included
//!   (its own copy never crosses a lane: it waits in the messenger, in
//!   order, and runs at its next dispatch).
//! - Payloads up to [`Messenger::max_payload`] to every target, the caller
//!   included; a larger one is `TooLarge` before anything is sent.
//! - `request`/`map` run the *first* handler for the event on the target;
//!   `emit`/`send`/`broadcast` run *every* handler for it.
//! - `consume` runs on exactly one live worker with a handler, the one with
//!   the shallowest inbox. Delivery is **at least once**: if the chosen
//!   worker dies before it has acknowledged (replied), the caller sends the
//!   task to another worker with the same delivery id
//!   ([`Ctx::delivery_id`]), so a handler that must not act twice can drop
//!   duplicates. A worker that has no handler says so at once and the next
//!   one is tried; if none has one, `NoHandler`.
//! - A worker is live while the master's table says `Starting`, `Ready` or
//!   `Draining` (without a master: while its slot is claimed by a live
//!   process). Messages to a starting worker wait in its lanes; messages to
//!   a slot whose worker died go to its successor; replies to a dead
//!   generation are discarded. A call whose target dies fails with
//!   `WorkerDied` as soon as the death is visible (the master reaps it,
//!   within milliseconds), not at the deadline.

#[cfg(feature = "tokio")]
mod async_rt;
mod leader;
mod wire;

#[cfg(feature = "tokio")]
pub use async_rt::{AsyncMessenger, AsyncWake};

#[cfg(test)]
pub(crate) use leader::leader_entry;
pub use leader::{Leader, LeaderChange};

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use wire::MAX_EVENT_NAME;

use crate::endpoint::Interrupt;
use crate::segment::Segment;
use crate::{Endpoint, RecvError, Tag, TrySendError, Worker, WorkerState};

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

/// A worker incarnation: slot and generation (who sent a message, who
/// answered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WorkerId {
    /// The sender's slot.
    pub slot: u32,
    /// The sender's generation in that slot.
    pub generation: u32,
}

/// What a handler learns about the message it runs for.
#[derive(Debug, Clone)]
pub struct Ctx {
    sender: WorkerId,
    event: String,
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

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestError {
    /// No worker has (or the target has no) handler for the event.
    NoHandler,
    /// The handler failed: its error, a panic, or a payload it could not
    /// decode.
    HandlerFailed(String),
    /// The target died before answering.
    WorkerDied,
    /// The deadline passed.
    TimedOut,
    /// No such worker slot.
    NoSuchWorker {
        /// The slot asked for.
        slot: u32,
    },
    /// The payload (the encoded value, or the raw bytes) is longer than
    /// the messenger's limit ([`Messenger::max_payload`]). Nothing was sent,
    /// to anyone.
    TooLarge {
        /// The payload's length in bytes.
        len: usize,
        /// The payload limit in bytes.
        max: usize,
    },
    /// The event name is longer than [`MAX_EVENT_NAME`] bytes.
    EventName {
        /// Its length.
        len: usize,
    },
    /// The value could not be encoded (serde).
    Encode(String),
    /// The reply could not be decoded as the type asked for.
    Decode(String),
    /// A lane to or from the target holds garbage (see
    /// [`crate::LaneCorruption`]).
    Corrupt(String),
    /// No leader was elected before the deadline (leader invoke, publish,
    /// subscribe).
    NoLeader,
    /// The leader died before answering an invoke.
    LeaderDied,
    /// [`MessengerHandle::request`] called from inside a handler, on the
    /// messenger's own thread: it would wait for the very loop it blocks.
    /// Answer later with [`Messenger::on_request_async`] instead.
    InHandler,
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoHandler => f.write_str("no worker has a handler for this event"),
            Self::HandlerFailed(e) => write!(f, "the handler failed: {e}"),
            Self::WorkerDied => f.write_str("the worker died before answering"),
            Self::TimedOut => f.write_str("timed out"),
            Self::NoSuchWorker { slot } => write!(f, "no worker slot {slot}"),
            Self::TooLarge { len, max } => write!(f, "payload of {len} bytes is over the {max}-byte limit"),
            Self::EventName { len } => {
                write!(
                    f,
                    "event name of {len} bytes is over the {MAX_EVENT_NAME}-byte limit"
                )
            }
            Self::Encode(e) => write!(f, "cannot encode the value: {e}"),
            Self::Decode(e) => write!(f, "cannot decode the reply: {e}"),
            Self::Corrupt(e) => write!(f, "corrupt lane: {e}"),
            Self::NoLeader => f.write_str("no leader was elected in time"),
            Self::LeaderDied => f.write_str("the leader died before answering"),
            Self::InHandler => f.write_str(
                "a blocking request through a handle from inside a handler would deadlock the messenger's loop",
            ),
        }
    }
}

impl std::error::Error for RequestError {}

/// One worker's entry in a [`Messenger::map`] result.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MapError {
    /// It did not answer before the deadline.
    TimedOut,
    /// It died before answering.
    WorkerDied,
    /// It has no handler for the event.
    NoHandler,
    /// Its handler failed (error, panic, or undecodable payload).
    HandlerFailed(String),
    /// Its answer could not be decoded as the type asked for.
    Decode(String),
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TimedOut => f.write_str("timed out"),
            Self::WorkerDied => f.write_str("worker died"),
            Self::NoHandler => f.write_str("no handler"),
            Self::HandlerFailed(e) => write!(f, "handler failed: {e}"),
            Self::Decode(e) => write!(f, "cannot decode the answer: {e}"),
        }
    }
}

impl std::error::Error for MapError {}

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

/// What a handler produced.
enum Outcome {
    /// Encoded reply value.
    Value(Vec<u8>),
    /// The handler keeps a [`Reply`] and answers later.
    Deferred,
    /// Its error, or its panic.
    Failed(String),
    /// The payload did not decode: the handler did not run.
    Decode(String),
}

type HandlerFn = Box<dyn FnMut(&Ctx, &[u8], Option<ReplyTo>) -> Outcome + Send>;

struct Handler {
    id: u64,
    once: bool,
    f: HandlerFn,
}

/// Identifies a registered handler, for [`Messenger::off_handler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HandlerId(u64);

/// Where a deferred reply goes.
#[derive(Debug, Clone)]
struct ReplyTo {
    to: u32,
    correlation: u64,
    requester_generation: u32,
    outbox: Arc<Outbox>,
}

/// Messages queued by other threads (handles, deferred replies) for the
/// messenger's thread to send.
struct Outbox {
    queue: Mutex<Vec<(u32, Tag, Vec<u8>)>>,
    /// Requests made from other threads through a [`MessengerHandle`].
    calls: Mutex<Vec<RemoteCall>>,
    /// Called once everything queued before them has been sent
    /// (`AsyncMessenger::flush`).
    barriers: Mutex<Vec<Box<dyn FnOnce() + Send>>>,
    nonempty: AtomicBool,
    segment: Segment,
    slot: u32,
}

/// A request made on another thread: the messenger's thread sends it and
/// hands the answer back through `done`.
struct RemoteCall {
    to: u32,
    /// As [`Pending::watch`] (an async `invoke`).
    watch: Option<leader::LeaderWatch>,
    /// `wire::REQUEST` or `wire::CONSUME`.
    kind: u16,
    bytes: Vec<u8>,
    deadline: Instant,
    done: Done,
}

/// Where a remote call's answer goes (a channel of the blocked thread, or
/// an async task's oneshot).
type Done = Box<dyn FnOnce(Result<Vec<u8>, RequestError>) + Send>;

impl Outbox {
    fn push(&self, to: u32, tag: Tag, bytes: Vec<u8>) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((to, tag, bytes));
        self.wake();
    }

    fn push_call(&self, call: RemoteCall) {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).push(call);
        self.wake();
    }

    fn wake(&self) {
        self.nonempty.store(true, Release);
        // Ring our own doorbell (the bit of our own lane) so a parked loop
        // wakes and drains the outbox.
        self.segment.notify(self.slot, self.slot);
    }
}

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

/// A handle to answer a request later, from any thread: see
/// [`Messenger::on_request_async`]. Dropping it unanswered answers
/// `HandlerFailed("reply dropped")`.
pub struct Reply<R> {
    to: Option<ReplyTo>,
    _r: std::marker::PhantomData<fn(R)>,
}

impl<R> fmt::Debug for Reply<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reply").finish_non_exhaustive()
    }
}

impl<R: Serialize> Reply<R> {
    /// Answers with `value`, or with `HandlerFailed(error)`.
    pub fn send(mut self, result: Result<R, String>) {
        if let Some(to) = self.to.take() {
            let (status, body) = match result.map(|v| postcard::to_allocvec(&v)) {
                Ok(Ok(bytes)) => (wire::OK, bytes),
                Ok(Err(e)) => (wire::FAILED, format!("cannot encode the reply: {e}").into_bytes()),
                Err(e) => (wire::FAILED, e.into_bytes()),
            };
            send_reply(&to, status, &body);
        }
    }
}

/// A handle to answer a raw-bytes request later, from any thread: see
/// [`Messenger::on_request_async_bytes`]. Dropping it unanswered answers
/// `HandlerFailed("reply dropped")`.
pub struct BytesReply {
    to: Option<ReplyTo>,
}

impl fmt::Debug for BytesReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BytesReply").finish_non_exhaustive()
    }
}

impl BytesReply {
    /// Answers with `bytes`, or with `HandlerFailed(error)`.
    pub fn send(mut self, result: Result<Vec<u8>, String>) {
        if let Some(to) = self.to.take() {
            match result {
                Ok(bytes) => send_reply(&to, wire::OK, &bytes),
                Err(e) => send_reply(&to, wire::FAILED, e.as_bytes()),
            }
        }
    }
}

impl Drop for BytesReply {
    fn drop(&mut self) {
        if let Some(to) = self.to.take() {
            send_reply(&to, wire::FAILED, b"reply dropped");
        }
    }
}

impl<R> Drop for Reply<R> {
    fn drop(&mut self) {
        if let Some(to) = self.to.take() {
            send_reply(&to, wire::FAILED, b"reply dropped");
        }
    }
}

fn send_reply(to: &ReplyTo, status: u8, body: &[u8]) {
    let tag = Tag {
        kind: wire::REPLY,
        correlation: to.correlation,
    };
    to.outbox
        .push(to.to, tag, wire::reply(status, to.requester_generation, body));
}

/// A `Send + Sync` handle for other threads of the process to send through
/// the messenger (fire and forget); the messenger's thread sends at its next
/// poll (it is woken if parked).
#[derive(Clone, Debug)]
pub struct MessengerHandle {
    outbox: Arc<Outbox>,
    workers: u32,
    max_payload: usize,
}

impl MessengerHandle {
    /// Like [`Messenger::emit`] to one slot.
    ///
    /// # Errors
    /// `EventName`, `Encode`, `NoSuchWorker`.
    pub fn emit<T: Serialize + ?Sized>(&self, to: u32, event: &str, value: &T) -> Result<(), RequestError> {
        if to >= self.workers {
            return Err(RequestError::NoSuchWorker { slot: to });
        }
        let bytes = encode_call(event, 0, value, self.max_payload)?;
        self.outbox.push(
            to,
            Tag {
                kind: wire::EMIT,
                correlation: 0,
            },
            bytes,
        );
        Ok(())
    }
}

impl MessengerHandle {
    /// Like [`Messenger::request`], from any thread: the messenger's thread
    /// sends it and passes the answer back (it must be dispatching: `run`,
    /// `poll`, or inside a blocking call). Blocks until the answer or the
    /// deadline.
    ///
    /// # Errors
    /// As [`Messenger::request`]; `WorkerDied` if the messenger itself is
    /// gone.
    pub fn request<T, R>(
        &self,
        worker: u32,
        event: &str,
        value: &T,
        deadline: Instant,
    ) -> Result<R, RequestError>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        if IN_HANDLER.with(Cell::get) {
            return Err(RequestError::InHandler);
        }
        if worker >= self.workers {
            return Err(RequestError::NoSuchWorker { slot: worker });
        }
        let bytes = encode_call(event, 0, value, self.max_payload)?;
        let (done, answer) = std::sync::mpsc::channel();
        self.outbox.push_call(RemoteCall {
            to: worker,
            watch: None,
            kind: wire::REQUEST,
            bytes,
            deadline,
            done: Box::new(move |r| {
                let _ = done.send(r);
            }),
        });
        // The messenger settles the call at its deadline; a little more
        // here covers a loop that is busy in a handler at that moment.
        let wait = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
        match answer.recv_timeout(wait) {
            Ok(Ok(body)) => postcard::from_bytes::<R>(&body).map_err(|e| RequestError::Decode(e.to_string())),
            Ok(Err(e)) => Err(e),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(RequestError::TimedOut),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(RequestError::WorkerDied),
        }
    }
}

fn check_name(event: &str) -> Result<(), RequestError> {
    if event.len() > MAX_EVENT_NAME {
        return Err(RequestError::EventName { len: event.len() });
    }
    Ok(())
}

/// The largest payload (an encoded value, or raw bytes) a message of
/// `segment` carries: its `max_message` less the largest call header, so
/// the limit does not depend on the event's name.
pub(crate) fn payload_limit(segment: &Segment) -> usize {
    segment
        .layout()
        .max_message()
        .saturating_sub(wire::MAX_CALL_HEADER)
}

/// Encodes a call message; `TooLarge` (the payload's size and `limit`)
/// before anything is sent if its payload is over `limit`.
fn encode_call<T: Serialize + ?Sized>(
    event: &str,
    delivery: u64,
    value: &T,
    limit: usize,
) -> Result<Vec<u8>, RequestError> {
    check_name(event)?;
    let header = wire::call_header_len(event.len());
    let mut out = Vec::with_capacity(header + 16);
    wire::put_call_header(&mut out, event, delivery);
    postcard::to_io(value, &mut out).map_err(|e| RequestError::Encode(e.to_string()))?;
    check_payload(out.len() - header, limit)?;
    Ok(out)
}

fn encode_call_bytes(event: &str, delivery: u64, data: &[u8], limit: usize) -> Result<Vec<u8>, RequestError> {
    check_name(event)?;
    check_payload(data.len(), limit)?;
    let mut out = Vec::with_capacity(wire::call_header_len(event.len()) + data.len());
    wire::put_call_header(&mut out, event, delivery);
    out.extend_from_slice(data);
    Ok(out)
}

fn check_payload(len: usize, limit: usize) -> Result<(), RequestError> {
    if len > limit {
        return Err(RequestError::TooLarge { len, max: limit });
    }
    Ok(())
}

fn panic_text(p: Box<dyn Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        format!("handler panicked: {s}")
    } else if let Some(s) = p.downcast_ref::<String>() {
        format!("handler panicked: {s}")
    } else {
        "handler panicked".into()
    }
}

/// A call in flight: what it waits for and what came back.
struct Pending {
    target: u32,
    generation: u32,
    result: Option<Result<Vec<u8>, RequestError>>,
    /// For a call to a leader (`invoke`): its term, watched for ending by
    /// the leader's death, which the lock shows before the master reaps.
    watch: Option<leader::LeaderWatch>,
}

type RemoteReply = (Instant, Done);

/// Who owns the endpoint.
enum Owner {
    Worker(Box<Worker>),
    Endpoint(Endpoint),
}

fn ep_of(owner: &mut Owner) -> &mut Endpoint {
    match owner {
        Owner::Worker(w) => w.endpoint(),
        Owner::Endpoint(e) => e,
    }
}

fn ep_of_ref(owner: &Owner) -> &Endpoint {
    match owner {
        Owner::Worker(w) => w.endpoint_ref(),
        Owner::Endpoint(e) => e,
    }
}

/// One worker's messenger: see the [module docs](self).
pub struct Messenger {
    owner: Owner,
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
    handlers: HashMap<String, Vec<Handler>>,
    next_handler: u64,
    pending: HashMap<u64, Pending>,
    next_call: u64,
    /// The segment's death count when the calls' targets were last checked
    /// (see [`Messenger::check_liveness`]).
    deaths_seen: u32,
    /// [`LIVENESS_SLICE`]; longer in tests that must see a death noticed
    /// through the master's count alone.
    liveness_slice: Duration,
    outbox: Arc<Outbox>,
    /// Calls made through handles: call id → (deadline, where the answer goes).
    remote: HashMap<u64, RemoteReply>,
    leader: leader::LeaderState,
    stats: RefCell<HashMap<String, EventStats>>,
    consume_cursor: u32,
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

impl Messenger {
    /// The messenger of a cluster worker (fork mode's closure argument, or
    /// [`Worker::from_env`]).
    pub fn new(worker: Worker) -> Self {
        let segment = worker.segment().clone();
        let (slot, generation) = (worker.slot(), worker.generation());
        Self::build(Owner::Worker(Box::new(worker)), segment, slot, generation)
    }

    /// A messenger on a bare endpoint (threads mode, or a segment without
    /// a master).
    pub fn from_endpoint(endpoint: Endpoint) -> Self {
        let segment = endpoint.segment().clone();
        let (slot, generation) = (endpoint.slot(), endpoint.generation());
        Self::build(Owner::Endpoint(endpoint), segment, slot, generation)
    }

    /// Threads mode: `n` messengers on one new segment, one per slot, to be
    /// moved to `n` threads; code written for a cluster runs unchanged.
    ///
    /// # Errors
    /// If the segment cannot be created (invalid `n`).
    pub fn threads(n: u32) -> Result<Vec<Self>, crate::CreateError> {
        let segment = Segment::create(&crate::Config::new(n))?;
        Ok((0..n)
            .map(|slot| Self::from_endpoint(segment.endpoint(slot).expect("a fresh slot")))
            .collect())
    }

    /// Standalone: one worker alone, every target is itself.
    ///
    /// # Errors
    /// If the segment cannot be created.
    pub fn standalone() -> Result<Self, crate::CreateError> {
        Ok(Self::threads(1)?.remove(0))
    }

    fn build(owner: Owner, segment: Segment, slot: u32, generation: u32) -> Self {
        let layout = *segment.layout();
        let outbox = Arc::new(Outbox {
            queue: Mutex::new(Vec::new()),
            calls: Mutex::new(Vec::new()),
            barriers: Mutex::new(Vec::new()),
            nonempty: AtomicBool::new(false),
            segment: segment.clone(),
            slot,
        });
        Self {
            owner,
            segment,
            slot,
            generation,
            workers: layout.workers(),
            max_payload: payload_limit(&outbox.segment),
            max_message: layout.max_message(),
            local: VecDeque::new(),
            local_bytes: 0,
            in_local: false,
            handlers: HashMap::new(),
            next_handler: 1,
            pending: HashMap::new(),
            next_call: 1,
            deaths_seen: outbox.segment.control().deaths.load(Acquire),
            liveness_slice: LIVENESS_SLICE,
            outbox,
            remote: HashMap::new(),
            leader: leader::LeaderState::default(),
            stats: RefCell::default(),
            consume_cursor: slot,
        }
    }

    fn ep(&mut self) -> &mut Endpoint {
        ep_of(&mut self.owner)
    }

    /// This worker's slot.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// This worker's generation.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The cluster worker, if this messenger was made from one.
    pub fn worker(&self) -> Option<&Worker> {
        match &self.owner {
            Owner::Worker(w) => Some(w),
            Owner::Endpoint(_) => None,
        }
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
    /// exact), including the latency of each slot's last request and map.
    pub fn stats(&self) -> crate::ClusterStats {
        ep_of_ref(&self.owner).beat();
        crate::cluster::read_stats(&self.segment)
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
        self.stats.borrow().clone()
    }

    fn count(&self, event: &str, f: impl FnOnce(&mut EventStats)) {
        let mut stats = self.stats.borrow_mut();
        match stats.get_mut(event) {
            Some(s) => f(s),
            None => f(stats.entry(event.to_owned()).or_default()),
        }
    }

    // ------------------------------------------------------------ handlers

    fn add(&mut self, event: &str, once: bool, f: HandlerFn) -> Result<HandlerId, RequestError> {
        check_name(event)?;
        let id = self.next_handler;
        self.next_handler += 1;
        self.handlers
            .entry(event.to_owned())
            .or_default()
            .push(Handler { id, once, f });
        Ok(HandlerId(id))
    }

    /// Runs `f` for every `event` message whose payload decodes as `T`.
    /// Replies `()` to a request or map.
    ///
    /// # Errors
    /// `EventName` if the name is too long.
    pub fn on<T, F>(&mut self, event: &str, mut f: F) -> Result<HandlerId, RequestError>
    where
        T: DeserializeOwned,
        F: FnMut(&Ctx, T) + Send + 'static,
    {
        self.add(
            event,
            false,
            Box::new(move |ctx, data, _| match postcard::from_bytes::<T>(data) {
                Ok(v) => {
                    f(ctx, v);
                    Outcome::Value(vec![])
                }
                Err(e) => Outcome::Decode(e.to_string()),
            }),
        )
    }

    /// Like [`Messenger::on`], removed after its first run.
    ///
    /// # Errors
    /// `EventName`.
    pub fn once<T, F>(&mut self, event: &str, f: F) -> Result<HandlerId, RequestError>
    where
        T: DeserializeOwned,
        F: FnOnce(&Ctx, T) + Send + 'static,
    {
        let mut f = Some(f);
        let id = self.on::<T, _>(event, move |ctx, v| {
            if let Some(f) = f.take() {
                f(ctx, v);
            }
        })?;
        self.mark_once(event, id);
        Ok(id)
    }

    fn mark_once(&mut self, event: &str, id: HandlerId) {
        if let Some(h) = self
            .handlers
            .get_mut(event)
            .and_then(|v| v.iter_mut().find(|h| h.id == id.0))
        {
            h.once = true;
        }
    }

    /// Runs `f` with the raw payload bytes of every `event` message (for
    /// other runtimes' encodings).
    /// Replies with the bytes `f` returns.
    ///
    /// # Errors
    /// `EventName`.
    pub fn on_bytes<F>(&mut self, event: &str, mut f: F) -> Result<HandlerId, RequestError>
    where
        F: FnMut(&Ctx, &[u8]) -> Vec<u8> + Send + 'static,
    {
        self.add(
            event,
            false,
            Box::new(move |ctx, data, _| Outcome::Value(f(ctx, data))),
        )
    }

    /// Answers requests (and map, consume) for `event` with `f`'s value, or
    /// `HandlerFailed` with its error.
    ///
    /// # Errors
    /// `EventName`.
    pub fn on_request<T, R, E, F>(&mut self, event: &str, mut f: F) -> Result<HandlerId, RequestError>
    where
        T: DeserializeOwned,
        R: Serialize,
        E: fmt::Display,
        F: FnMut(&Ctx, T) -> Result<R, E> + Send + 'static,
    {
        self.add(
            event,
            false,
            Box::new(move |ctx, data, _| match postcard::from_bytes::<T>(data) {
                Ok(v) => match f(ctx, v) {
                    Ok(r) => match postcard::to_allocvec(&r) {
                        Ok(bytes) => Outcome::Value(bytes),
                        Err(e) => Outcome::Failed(format!("cannot encode the reply: {e}")),
                    },
                    Err(e) => Outcome::Failed(e.to_string()),
                },
                Err(e) => Outcome::Decode(e.to_string()),
            }),
        )
    }

    /// Answers requests for `event` later: `f` gets a [`Reply`] it may keep,
    /// move to another thread, and answer when ready. For events (no reply
    /// expected) the `Reply` does nothing.
    ///
    /// # Errors
    /// `EventName`.
    pub fn on_request_async<T, R, F>(&mut self, event: &str, mut f: F) -> Result<HandlerId, RequestError>
    where
        T: DeserializeOwned,
        R: Serialize,
        F: FnMut(&Ctx, T, Reply<R>) + Send + 'static,
    {
        self.add(
            event,
            false,
            Box::new(move |ctx, data, reply_to| match postcard::from_bytes::<T>(data) {
                Ok(v) => {
                    f(
                        ctx,
                        v,
                        Reply {
                            to: reply_to,
                            _r: std::marker::PhantomData,
                        },
                    );
                    Outcome::Deferred
                }
                Err(e) => Outcome::Decode(e.to_string()),
            }),
        )
    }

    /// Answers requests for `event` later with raw bytes: `f` gets the
    /// payload and a [`BytesReply`] it may keep and answer from any thread.
    ///
    /// # Errors
    /// `EventName`.
    pub fn on_request_async_bytes<F>(&mut self, event: &str, mut f: F) -> Result<HandlerId, RequestError>
    where
        F: FnMut(&Ctx, &[u8], BytesReply) + Send + 'static,
    {
        self.add(
            event,
            false,
            Box::new(move |ctx, data, reply_to| {
                f(ctx, data, BytesReply { to: reply_to });
                Outcome::Deferred
            }),
        )
    }

    /// Removes every handler for `event`; returns how many there were.
    pub fn off(&mut self, event: &str) -> usize {
        self.handlers.remove(event).map_or(0, |v| v.len())
    }

    /// Removes one handler.
    pub fn off_handler(&mut self, id: HandlerId) -> bool {
        for list in self.handlers.values_mut() {
            if let Some(i) = list.iter().position(|h| h.id == id.0) {
                list.remove(i);
                return true;
            }
        }
        false
    }

    // ------------------------------------------------------------ liveness

    /// The generation of the worker now in `slot`, if one is live.
    fn live_generation(&self, slot: u32) -> Option<u32> {
        live_generation(&self.segment, self.me(), slot)
    }

    fn me(&self) -> WorkerId {
        WorkerId {
            slot: self.slot,
            generation: self.generation,
        }
    }

    /// The largest payload a message may carry, both ways: the encoded
    /// value (postcard) or the raw bytes, whatever the target (this worker
    /// itself included). It is the segment's `max_message` less the
    /// longest call header ([`MAX_EVENT_NAME`] + 9 bytes), so it does not
    /// depend on the event's name: 16,776,952 bytes with the default
    /// 16 MiB. A larger one fails with [`RequestError::TooLarge`] before
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

    /// Live workers now: (slot, generation).
    pub fn live_workers(&self) -> Vec<WorkerId> {
        live_workers(&self.segment, self.me())
    }

    // ------------------------------------------------------------ sending

    /// Sends one encoded message, dispatching what arrives while the lane
    /// is full (so two workers sending to each other cannot deadlock).
    ///
    /// A message to this worker itself never crosses a lane: it waits in
    /// `local`, in order, and is handled at the next dispatch. So it takes
    /// every size the other targets take (through its own lane it could
    /// not: a message over half a lane streams only to a reader that is
    /// not the writer), and costs no copy into shared memory. Like the work
    /// in hand, it ends with the worker.
    fn deliver(
        &mut self,
        to: u32,
        tag: Tag,
        bytes: Vec<u8>,
        deadline: Option<Instant>,
    ) -> Result<(), RequestError> {
        if to >= self.workers {
            return Err(RequestError::NoSuchWorker { slot: to });
        }
        let bytes = if tag.kind == wire::REPLY {
            self.fit_reply(bytes)
        } else if bytes.len() > self.max_message {
            // Calls are checked when encoded; this is a bug's safety net.
            return Err(RequestError::TooLarge {
                len: bytes.len(),
                max: self.max_message,
            });
        } else {
            bytes
        };
        if to == self.slot {
            return self.deliver_local(tag, bytes);
        }
        let single = self.ep().max_reservation();
        let mut bytes = bytes;
        loop {
            if bytes.len() > single {
                // Streamed in fragments: only a blocking send can do it.
                let result = self.send_streamed(to, tag, bytes, deadline);
                return match result {
                    Ok(()) => Ok(()),
                    Err(crate::SendError::Timeout(_)) => Err(RequestError::TimedOut),
                    Err(e) => Err(RequestError::Corrupt(e.to_string())),
                };
            }
            match self.ep().try_send_tagged(to, tag, bytes) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Full(b)) => bytes = b,
                Err(TrySendError::TooLarge { len, max }) => return Err(RequestError::TooLarge { len, max }),
                Err(TrySendError::NoSuchWorker { slot, .. }) => {
                    return Err(RequestError::NoSuchWorker { slot })
                }
                Err(e) => return Err(RequestError::Corrupt(e.to_string())),
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(RequestError::TimedOut);
            }
            if self.live_generation(to).is_none() {
                // A full lane to a slot nobody serves: it would wait for a
                // successor that may never come (a crash-looping slot).
                return Err(RequestError::WorkerDied);
            }
            // Make room: our own inbox drains here.
            if self.dispatch_until(Some(Instant::now() + Duration::from_micros(200)))? == 0 {
                std::thread::yield_now();
            }
        }
    }

    /// A blocking send of a message streamed in fragments. On an async
    /// driver's thread of a multi-threaded tokio runtime, the wait is
    /// announced to tokio (`block_in_place`): the receiver may be another
    /// driver that tokio queued behind this one on the same thread, which
    /// would otherwise never run to drain the lane (a deadlock of two
    /// messengers in one process, seen with 1 MiB requests).
    fn send_streamed(
        &mut self,
        to: u32,
        tag: Tag,
        bytes: Vec<u8>,
        deadline: Option<Instant>,
    ) -> Result<(), crate::SendError<Vec<u8>>> {
        #[cfg(feature = "tokio")]
        if tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
        {
            let ep = self.ep();
            return tokio::task::block_in_place(|| ep.send_tagged(to, tag, bytes, deadline));
        }
        self.ep().send_tagged(to, tag, bytes, deadline)
    }

    /// A reply whose body is over the payload limit becomes a failure the
    /// caller is told about (instead of a reply that cannot be sent and a
    /// caller that waits out its deadline).
    fn fit_reply(&self, bytes: Vec<u8>) -> Vec<u8> {
        let Some((_, generation, body)) = wire::parse_reply(&bytes) else {
            return bytes;
        };
        if body.len() <= self.max_payload {
            return bytes;
        }
        let text = RequestError::TooLarge {
            len: body.len(),
            max: self.max_payload,
        }
        .to_string();
        wire::reply(wire::FAILED, generation, format!("the reply: {text}").as_bytes())
    }

    /// Queues a message to this worker itself. Past a lane's worth of
    /// queued bytes, the oldest are handled first (the back-pressure a
    /// full lane gives), so a loop that sends to itself without
    /// dispatching does not grow without bound.
    fn deliver_local(&mut self, tag: Tag, bytes: Vec<u8>) -> Result<(), RequestError> {
        let room = self.segment.layout().lane_capacity();
        while !self.in_local && !self.local.is_empty() && self.local_bytes + bytes.len() > room {
            self.handle_local()?;
        }
        self.local_bytes += bytes.len();
        self.local.push_back(crate::Message {
            sender: self.slot,
            generation: self.generation,
            kind: tag.kind,
            correlation: tag.correlation,
            payload: bytes,
        });
        Ok(())
    }

    /// Handles the oldest message to itself, if any; whether there was one.
    fn handle_local(&mut self) -> Result<bool, RequestError> {
        let Some(message) = self.local.pop_front() else {
            return Ok(false);
        };
        self.local_bytes -= message.payload.len();
        let outer = std::mem::replace(&mut self.in_local, true);
        let reply = handle_message(
            message,
            self.generation,
            &mut self.handlers,
            &mut self.pending,
            &self.outbox,
            &self.stats,
        );
        let sent = reply.map_or(Ok(()), |reply| self.send_handler_reply(reply));
        self.in_local = outer;
        sent.map(|()| true)
    }

    fn targets(&self, target: Target) -> Result<Vec<u32>, RequestError> {
        Ok(match target {
            Target::Worker(s) if s >= self.workers => return Err(RequestError::NoSuchWorker { slot: s }),
            Target::Worker(s) => vec![s],
            Target::All => self.live_workers().into_iter().map(|p| p.slot).collect(),
            Target::Others => self
                .live_workers()
                .into_iter()
                .map(|p| p.slot)
                .filter(|&s| s != self.slot)
                .collect(),
        })
    }

    /// Emits `event` with `value` to `target`: every handler for it runs
    /// there. Returns how many workers it was sent to.
    ///
    /// # Errors
    /// `EventName`, `Encode`, `TooLarge`, `NoSuchWorker`, `Corrupt`.
    pub fn emit<T: Serialize + ?Sized>(
        &mut self,
        target: Target,
        event: &str,
        value: &T,
    ) -> Result<usize, RequestError> {
        let bytes = encode_call(event, 0, value, self.max_payload)?;
        self.emit_encoded(target, event, bytes)
    }

    /// Emits raw bytes (handlers registered with [`Messenger::on_bytes`]).
    ///
    /// # Errors
    /// As [`Messenger::emit`].
    pub fn emit_bytes(&mut self, target: Target, event: &str, data: &[u8]) -> Result<usize, RequestError> {
        let bytes = encode_call_bytes(event, 0, data, self.max_payload)?;
        self.emit_encoded(target, event, bytes)
    }

    fn emit_encoded(&mut self, target: Target, event: &str, bytes: Vec<u8>) -> Result<usize, RequestError> {
        let tag = Tag {
            kind: wire::EMIT,
            correlation: 0,
        };
        let targets = self.targets(target)?;
        for &to in &targets {
            self.deliver(to, tag, bytes.clone(), None)?;
        }
        self.count(event, |s| s.sent += targets.len() as u64);
        Ok(targets.len())
    }

    /// `emit(All, ..)`: every live worker, the caller included, runs its
    /// handlers for `event`. Returns how many workers it was sent to.
    ///
    /// # Errors
    /// As [`Messenger::emit`].
    pub fn broadcast<T: Serialize + ?Sized>(
        &mut self,
        event: &str,
        value: &T,
    ) -> Result<usize, RequestError> {
        self.emit(Target::All, event, value)
    }

    /// A builder-style target: `messenger.to(Target::Worker(3)).emit("e", &v)`.
    pub fn to(&mut self, target: Target) -> To<'_> {
        To { m: self, target }
    }

    // ------------------------------------------------------------ calls

    fn new_call(&mut self, target: u32, generation: u32) -> u64 {
        let id = self.next_call;
        self.next_call += 1;
        self.pending.insert(
            id,
            Pending {
                target,
                generation,
                result: None,
                watch: None,
            },
        );
        id
    }

    /// Sends a REQUEST for `event` to `to` and registers it; returns its id.
    fn start_call(
        &mut self,
        to: u32,
        kind: u16,
        bytes: Vec<u8>,
        deadline: Instant,
    ) -> Result<u64, RequestError> {
        let Some(generation) = self.live_generation(to) else {
            return Err(RequestError::WorkerDied);
        };
        let id = self.new_call(to, generation);
        let tag = Tag {
            kind,
            correlation: id,
        };
        if let Err(e) = self.deliver(to, tag, bytes, Some(deadline)) {
            self.pending.remove(&id);
            return Err(e);
        }
        Ok(id)
    }

    /// Marks calls whose target died. Runs at least every
    /// `liveness_slice` while calls wait, and at once when the master
    /// counts a death: the wait for a message ends then (see
    /// [`crate::endpoint::Interrupt`]), so a caller learns of a reaped
    /// target within microseconds, not at its next periodic look.
    fn check_liveness(&mut self) {
        // Before the checks: a death counted after this load ends the next
        // wait, so none is missed.
        self.deaths_seen = self.segment.control().deaths.load(Acquire);
        let dead: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| {
                p.result.is_none()
                    && (self.live_generation(p.target) != Some(p.generation)
                        || p.watch.is_some_and(|w| w.died(&self.segment)))
            })
            .map(|(&id, _)| id)
            .collect();
        for id in dead {
            if let Some(p) = self.pending.get_mut(&id) {
                tracing::debug!(target = p.target, generation = p.generation, "call target died");
                p.result = Some(Err(RequestError::WorkerDied));
            }
        }
    }

    /// Dispatches until every call in `ids` has a result or `deadline`
    /// passes.
    fn wait_calls(&mut self, ids: &[u64], deadline: Instant) -> Result<(), RequestError> {
        loop {
            self.check_liveness();
            if !ids
                .iter()
                .any(|id| matches!(self.pending.get(id), Some(p) if p.result.is_none()))
            {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            self.dispatch_until(Some((now + self.liveness_slice).min(deadline)))?;
        }
    }

    fn take_result(&mut self, id: u64) -> Result<Vec<u8>, RequestError> {
        match self.pending.remove(&id).and_then(|p| p.result) {
            Some(r) => r,
            None => Err(RequestError::TimedOut),
        }
    }

    /// Asks `worker` to run its first handler for `event` with `value` and
    /// waits until `deadline` for the answer.
    ///
    /// # Errors
    /// `NoHandler`, `HandlerFailed` (its error, panic, or a payload it could
    /// not decode), `WorkerDied`, `TimedOut`, `Decode`, and the send errors.
    pub fn request<T, R>(
        &mut self,
        worker: u32,
        event: &str,
        value: &T,
        deadline: Instant,
    ) -> Result<R, RequestError>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let bytes = encode_call(event, 0, value, self.max_payload)?;
        let body = self.request_encoded(worker, event, bytes, deadline)?;
        postcard::from_bytes(&body).map_err(|e| RequestError::Decode(e.to_string()))
    }

    /// [`Messenger::request`] with raw bytes both ways.
    ///
    /// # Errors
    /// As [`Messenger::request`].
    pub fn request_bytes(
        &mut self,
        worker: u32,
        event: &str,
        data: &[u8],
        deadline: Instant,
    ) -> Result<Vec<u8>, RequestError> {
        let bytes = encode_call_bytes(event, 0, data, self.max_payload)?;
        self.request_encoded(worker, event, bytes, deadline)
    }

    fn request_encoded(
        &mut self,
        worker: u32,
        event: &str,
        bytes: Vec<u8>,
        deadline: Instant,
    ) -> Result<Vec<u8>, RequestError> {
        self.request_watched(worker, event, bytes, deadline, None)
    }

    /// A request; with `watch`, to a leader whose death in office fails it
    /// at once (see [`leader::LeaderWatch`]).
    fn request_watched(
        &mut self,
        worker: u32,
        event: &str,
        bytes: Vec<u8>,
        deadline: Instant,
        watch: Option<leader::LeaderWatch>,
    ) -> Result<Vec<u8>, RequestError> {
        if worker >= self.workers {
            return Err(RequestError::NoSuchWorker { slot: worker });
        }
        let started = Instant::now();
        let id = self.start_call(worker, wire::REQUEST, bytes, deadline)?;
        if let Some(p) = self.pending.get_mut(&id) {
            p.watch = watch;
        }
        self.count(event, |s| s.sent += 1);
        self.wait_calls(&[id], deadline)?;
        let r = self.take_result(id);
        self.record_latency(LATENCY_REQUEST, started.elapsed());
        r
    }

    /// One-way request: `worker`'s first handler for `event` runs; no answer
    /// is awaited (a reply, if any, is dropped).
    ///
    /// # Errors
    /// The send errors.
    pub fn notify<T: Serialize + ?Sized>(
        &mut self,
        worker: u32,
        event: &str,
        value: &T,
    ) -> Result<(), RequestError> {
        let bytes = encode_call(event, 0, value, self.max_payload)?;
        let tag = Tag {
            kind: wire::REQUEST,
            correlation: 0,
        };
        self.deliver(worker, tag, bytes, None)?;
        self.count(event, |s| s.sent += 1);
        Ok(())
    }

    /// Every live worker, the caller included, runs its first handler for
    /// `event`; one entry per worker, in slot order. Never waits past
    /// `deadline`, and an entry whose worker died or has no handler is
    /// settled as soon as that is known.
    ///
    /// # Errors
    /// Only for the call as a whole: `EventName`, `Encode`, `TooLarge`.
    #[allow(clippy::type_complexity)]
    pub fn map<T, R>(
        &mut self,
        event: &str,
        value: &T,
        deadline: Instant,
    ) -> Result<Vec<(WorkerId, Result<R, MapError>)>, RequestError>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let bytes = encode_call(event, 0, value, self.max_payload)?;
        Ok(self
            .map_encoded(event, bytes, deadline)?
            .into_iter()
            .map(|(peer, r)| {
                let r = r.and_then(|body| {
                    postcard::from_bytes(&body).map_err(|e| MapError::Decode(e.to_string()))
                });
                (peer, r)
            })
            .collect())
    }

    /// [`Messenger::map`] with raw bytes both ways (handlers registered
    /// with [`Messenger::on_bytes`] or any handler whose reply is wanted
    /// undecoded).
    ///
    /// # Errors
    /// As [`Messenger::map`].
    #[allow(clippy::type_complexity)]
    pub fn map_bytes(
        &mut self,
        event: &str,
        data: &[u8],
        deadline: Instant,
    ) -> Result<Vec<(WorkerId, Result<Vec<u8>, MapError>)>, RequestError> {
        let bytes = encode_call_bytes(event, 0, data, self.max_payload)?;
        self.map_encoded(event, bytes, deadline)
    }

    #[allow(clippy::type_complexity)]
    fn map_encoded(
        &mut self,
        event: &str,
        bytes: Vec<u8>,
        deadline: Instant,
    ) -> Result<Vec<(WorkerId, Result<Vec<u8>, MapError>)>, RequestError> {
        let _span = tracing::debug_span!("map", event).entered();
        let started = Instant::now();
        let live = self.live_workers();
        let mut calls = Vec::with_capacity(live.len());
        for peer in &live {
            let call = self.start_call(peer.slot, wire::REQUEST, bytes.clone(), deadline);
            calls.push(call);
        }
        self.count(event, |s| s.sent += live.len() as u64);
        let ids: Vec<u64> = calls.iter().filter_map(|c| c.as_ref().ok().copied()).collect();
        self.wait_calls(&ids, deadline)?;
        let out = live
            .into_iter()
            .zip(calls)
            .map(|(peer, call)| (peer, map_entry(call.and_then(|id| self.take_result(id)))))
            .collect();
        self.record_latency(LATENCY_MAP, started.elapsed());
        Ok(out)
    }

    /// Runs `event` on exactly one live worker that has a handler for it,
    /// the one with the shallowest inbox, and waits until its handler has
    /// finished. At least once: if that worker dies first, the task goes to
    /// another worker with the same delivery id.
    ///
    /// # Errors
    /// `NoHandler` if no live worker has a handler, `HandlerFailed`,
    /// `TimedOut`, and the send errors.
    pub fn consume<T: Serialize + ?Sized>(
        &mut self,
        event: &str,
        value: &T,
        deadline: Instant,
    ) -> Result<Consumed, RequestError> {
        let delivery = self.new_delivery_id();
        let bytes = encode_call(event, delivery, value, self.max_payload)?;
        self.consume_encoded(event, delivery, bytes, deadline)
    }

    /// [`Messenger::consume`] with a raw-bytes payload.
    ///
    /// # Errors
    /// As [`Messenger::consume`].
    pub fn consume_bytes(
        &mut self,
        event: &str,
        data: &[u8],
        deadline: Instant,
    ) -> Result<Consumed, RequestError> {
        let delivery = self.new_delivery_id();
        let bytes = encode_call_bytes(event, delivery, data, self.max_payload)?;
        self.consume_encoded(event, delivery, bytes, deadline)
    }

    fn consume_encoded(
        &mut self,
        event: &str,
        delivery: u64,
        bytes: Vec<u8>,
        deadline: Instant,
    ) -> Result<Consumed, RequestError> {
        let mut refused: Vec<u32> = Vec::new();
        let mut attempts = 0;
        loop {
            let live = self.live_workers();
            self.consume_cursor = self.consume_cursor.wrapping_add(1);
            let Some(peer) = pick_consumer(&self.segment, &live, self.consume_cursor as usize, &refused)
            else {
                return Err(RequestError::NoHandler);
            };
            attempts += 1;
            let id = match self.start_call(peer.slot, wire::CONSUME, bytes.clone(), deadline) {
                Ok(id) => id,
                Err(RequestError::WorkerDied) => continue,
                Err(e) => return Err(e),
            };
            if attempts == 1 {
                self.count(event, |s| s.sent += 1);
            }
            self.wait_calls(&[id], deadline)?;
            match self.take_result(id) {
                Ok(_) => {
                    return Ok(Consumed {
                        worker: peer,
                        delivery_id: delivery,
                        attempts,
                    })
                }
                Err(RequestError::NoHandler) => refused.push(peer.slot),
                Err(RequestError::WorkerDied) => {
                    tracing::info!(
                        event,
                        delivery,
                        worker = peer.slot,
                        "consume: worker died, redelivering"
                    );
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn new_delivery_id(&mut self) -> u64 {
        self.next_call += 1;
        (u64::from(self.slot) << 52) ^ (u64::from(self.generation) << 32) ^ self.next_call
    }

    fn record_latency(&self, which: usize, d: Duration) {
        let stats = self.segment.stats_entry(self.slot);
        stats.add_latency(which, d.as_nanos() as u64);
    }

    // ------------------------------------------------------------ dispatch

    /// Runs the handlers of every message that has arrived, without
    /// waiting. Returns how many messages it handled.
    ///
    /// # Errors
    /// [`RequestError::Corrupt`] if a lane holds garbage (that lane is
    /// poisoned; call again to keep serving the others).
    pub fn dispatch(&mut self) -> Result<usize, RequestError> {
        self.dispatch_until(None)
    }

    /// Waits up to `timeout` for messages and runs their handlers; returns
    /// how many it handled (0 after the timeout with nothing).
    ///
    /// # Errors
    /// As [`Messenger::dispatch`].
    pub fn poll(&mut self, timeout: Duration) -> Result<usize, RequestError> {
        self.dispatch_until(Some(Instant::now() + timeout))
    }

    /// Serves messages until the cluster asks this worker to stop (drain or
    /// shutdown). Without a master, until `stop` returns true (checked
    /// every 50 ms and after each message).
    ///
    /// # Errors
    /// As [`Messenger::dispatch`].
    pub fn run_until(&mut self, mut stop: impl FnMut(&Self) -> bool) -> Result<(), RequestError> {
        loop {
            let should_stop = self.worker().is_some_and(|w| w.should_stop());
            if should_stop || stop(self) {
                return Ok(());
            }
            self.poll(Duration::from_millis(50))?;
        }
    }

    /// Serves messages until this worker is told to stop.
    ///
    /// # Errors
    /// As [`Messenger::dispatch`].
    pub fn run(&mut self) -> Result<(), RequestError> {
        self.run_until(|_| false)
    }

    fn flush_outbox(&mut self) -> Result<(), RequestError> {
        if !self.outbox.nonempty.swap(false, AcqRel) {
            return Ok(());
        }
        // Barriers first: whatever was queued before a barrier is in the
        // queue taken next, so it is sent before the barrier is released.
        let barriers = std::mem::take(&mut *self.outbox.barriers.lock().unwrap_or_else(|p| p.into_inner()));
        let queued = std::mem::take(&mut *self.outbox.queue.lock().unwrap_or_else(|p| p.into_inner()));
        for (to, tag, bytes) in queued {
            // One message that cannot go (its target slot, its size, a
            // poisoned lane) must not hold back the rest.
            if let Err(e) = self.deliver(to, tag, bytes, None) {
                tracing::warn!(to, kind = tag.kind, error = %e, "a queued message could not be sent");
            }
        }
        for done in barriers {
            done();
        }
        let calls = std::mem::take(&mut *self.outbox.calls.lock().unwrap_or_else(|p| p.into_inner()));
        for call in calls {
            match self.start_call(call.to, call.kind, call.bytes, call.deadline) {
                Ok(id) => {
                    if let Some(p) = self.pending.get_mut(&id) {
                        p.watch = call.watch;
                    }
                    self.remote.insert(id, (call.deadline, call.done));
                }
                Err(e) => (call.done)(Err(e)),
            }
        }
        Ok(())
    }

    /// Hands finished (or expired, or orphaned) remote calls back to their
    /// threads.
    fn settle_remote(&mut self) {
        if self.remote.is_empty() {
            return;
        }
        self.check_liveness();
        let now = Instant::now();
        let done: Vec<u64> = self
            .remote
            .iter()
            .filter(|(id, (deadline, _))| {
                now >= *deadline || !matches!(self.pending.get(id), Some(p) if p.result.is_none())
            })
            .map(|(&id, _)| id)
            .collect();
        for id in done {
            if let Some((_, done)) = self.remote.remove(&id) {
                done(self.take_result(id));
            }
        }
    }

    /// The next time a remote call must be looked at, if any.
    fn remote_due(&self) -> Option<Instant> {
        let earliest = self.remote.values().map(|(d, _)| *d).min()?;
        Some(earliest.min(Instant::now() + self.liveness_slice))
    }

    /// Handles messages until none is waiting; with `until`, waits for the
    /// first one until then.
    fn dispatch_until(&mut self, until: Option<Instant>) -> Result<usize, RequestError> {
        if self.segment.control().deaths.load(Acquire) != self.deaths_seen {
            self.check_liveness();
        }
        let until = match (until, self.remote_due()) {
            (Some(u), Some(r)) => Some(u.min(r)),
            (u, _) => u,
        };
        let r = self.dispatch_inner(until);
        self.settle_remote();
        self.check_leaders();
        r
    }

    fn dispatch_inner(&mut self, until: Option<Instant>) -> Result<usize, RequestError> {
        self.flush_outbox()?;
        let mut handled = 0;
        let mut wait = until;
        // A death ends the wait only for a messenger with calls waiting.
        let deaths = self
            .pending
            .values()
            .any(|p| p.result.is_none())
            .then_some(self.deaths_seen);
        loop {
            if self.handle_local()? {
                handled += 1;
                wait = None;
                continue;
            }
            let step = {
                let received = match wait {
                    Some(d) => {
                        let interrupt = Interrupt {
                            flag: &self.outbox.nonempty,
                            deaths,
                        };
                        match ep_of(&mut self.owner).recv_ref_interruptible(Some(d), interrupt) {
                            Ok(m) => Some(m),
                            Err(RecvError::Timeout) => None,
                            Err(e) => return Err(RequestError::Corrupt(e.to_string())),
                        }
                    }
                    None => match ep_of(&mut self.owner).try_recv_ref() {
                        Ok(m) => Some(m),
                        Err(crate::TryRecvError::Empty) => None,
                        Err(e) => return Err(RequestError::Corrupt(e.to_string())),
                    },
                };
                received.map(|msg| {
                    handle_message(
                        msg.into_message(),
                        self.generation,
                        &mut self.handlers,
                        &mut self.pending,
                        &self.outbox,
                        &self.stats,
                    )
                })
            };
            let Some(reply) = step else {
                // Woken for the outbox, not for a message?
                if self.outbox.nonempty.load(Acquire) {
                    self.flush_outbox()?;
                    if !self.local.is_empty() || wait.is_some_and(|d| Instant::now() < d) {
                        continue;
                    }
                }
                return Ok(handled);
            };
            handled += 1;
            wait = None;
            if let Some(reply) = reply {
                self.send_handler_reply(reply)?;
            }
        }
    }

    /// Sends what a handler answered.
    fn send_handler_reply(&mut self, (to, tag, bytes): (u32, Tag, Vec<u8>)) -> Result<(), RequestError> {
        // The requester is live or its successor discards the reply.
        match self.deliver(to, tag, bytes, Some(Instant::now() + Duration::from_secs(5))) {
            Ok(()) | Err(RequestError::TimedOut) | Err(RequestError::NoSuchWorker { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// One turn of an async driver: handles everything that has arrived
    /// (and the outbox); if there was nothing, makes the pre-park check and
    /// says whether the caller may wait. With `fd_park`, the wait is
    /// announced here (`PARKED_FD`) and the caller must call
    /// [`Endpoint::park_fd_end`] after it.
    #[cfg(feature = "tokio")]
    fn async_turn(&mut self, fd_park: bool) -> Result<bool, RequestError> {
        if self.dispatch_until(None)? > 0 {
            return Ok(false);
        }
        let reply = match ep_of(&mut self.owner).try_recv_before_park() {
            Ok(Some(msg)) => Some(handle_message(
                msg.into_message(),
                self.generation,
                &mut self.handlers,
                &mut self.pending,
                &self.outbox,
                &self.stats,
            )),
            Ok(None) => None,
            Err(e) => return Err(RequestError::Corrupt(e.to_string())),
        };
        if let Some(reply) = reply {
            if let Some(reply) = reply {
                self.send_handler_reply(reply)?;
            }
            return Ok(false);
        }
        // After the doorbell was taken (in `try_recv_before_park`): a death
        // counted, or work queued, since the dispatch above is seen here
        // even if its ring found the bit still set and woke nobody.
        if self.outbox.nonempty.load(Acquire)
            || !self.local.is_empty()
            || self.segment.control().deaths.load(Acquire) != self.deaths_seen
        {
            return Ok(false);
        }
        let ep = ep_of_ref(&self.owner);
        if fd_park {
            Ok(ep.park_fd_begin())
        } else {
            // The waiter thread parks for us; the heartbeat and the stats
            // are ours to keep up, as `park_fd_begin` does.
            ep.beat();
            Ok(true)
        }
    }
}

/// The generation of the worker now in `slot`, if one is live (`me` is
/// the asking worker, live by definition).
fn live_generation(segment: &Segment, me: WorkerId, slot: u32) -> Option<u32> {
    if slot == me.slot {
        return Some(me.generation);
    }
    if segment.control().master_pid.load(Acquire) != 0 {
        let entry = segment.worker_entry(slot);
        let state = WorkerState::from_raw(entry.state.load(Acquire));
        matches!(
            state,
            WorkerState::Starting | WorkerState::Ready | WorkerState::Draining
        )
        .then(|| entry.generation.load(Acquire))
    } else {
        // A slot never claimed, or released, costs no system call. Else the
        // generation before the claim: should a successor claim the slot in
        // between, this answers with its dead predecessor's generation for
        // one look, and a call made on it settles as `WorkerDied` at the
        // next (never the other way round: a live worker seen dead).
        let control = segment.slot(slot);
        if control.owner.load(Acquire) == 0 {
            return None;
        }
        let generation = control.generation.load(Acquire);
        segment.slot_held(slot).then_some(generation)
    }
}

/// Live workers now, in slot order.
fn live_workers(segment: &Segment, me: WorkerId) -> Vec<WorkerId> {
    (0..segment.layout().workers())
        .filter_map(|slot| live_generation(segment, me, slot).map(|generation| WorkerId { slot, generation }))
        .collect()
}

/// The worker a `consume` goes to: among `live` workers not in `refused`,
/// one that is not draining, with the fewest bytes in its inbox; ties go
/// round-robin (from `turn`) so equal workers share the work.
fn pick_consumer(segment: &Segment, live: &[WorkerId], turn: usize, refused: &[u32]) -> Option<WorkerId> {
    live.iter()
        .cycle()
        .skip(turn % live.len().max(1))
        .take(live.len())
        .filter(|p| !refused.contains(&p.slot))
        .min_by_key(|p| (is_draining(segment, p.slot), inbox_depth(segment, p.slot)))
        .copied()
}

/// One worker's entry of a `map`, from its call's result.
fn map_entry(r: Result<Vec<u8>, RequestError>) -> Result<Vec<u8>, MapError> {
    match r {
        Ok(body) => Ok(body),
        Err(RequestError::NoHandler) => Err(MapError::NoHandler),
        Err(RequestError::HandlerFailed(e)) => Err(MapError::HandlerFailed(e)),
        Err(RequestError::WorkerDied) => Err(MapError::WorkerDied),
        Err(_) => Err(MapError::TimedOut),
    }
}

/// Whether the master is draining the worker in `slot` (a rolling reload
/// replaces it): `consume` sends it new tasks only if no other worker can
/// take them.
fn is_draining(segment: &Segment, slot: u32) -> bool {
    segment.control().master_pid.load(Acquire) != 0
        && WorkerState::from_raw(segment.worker_entry(slot).state.load(Acquire)) == WorkerState::Draining
}

/// Bytes waiting in `slot`'s inbox (its load, for `consume`).
fn inbox_depth(segment: &Segment, slot: u32) -> u64 {
    (0..segment.layout().workers())
        .map(|from| segment.lane(from, slot).depth())
        .fold(0, u64::saturating_add)
}

thread_local! {
    /// Whether this thread is running a messenger handler right now.
    static IN_HANDLER: Cell<bool> = const { Cell::new(false) };
}

const LATENCY_REQUEST: usize = 0;
const LATENCY_MAP: usize = 1;

/// Handles one received message; returns the reply to send, if any. A free
/// function so that the handler table and the rest of the messenger are
/// borrowed separately.
///
/// The caller takes the message out of the lane before any handler runs
/// ([`Received::into_message`]): if the handler kills this worker, its
/// successor must not find the same message unread and run it again (a
/// poison message would then kill every successor in turn). The copy is
/// one memcpy of the payload.
fn handle_message(
    message: crate::Message,
    my_generation: u32,
    handlers: &mut HashMap<String, Vec<Handler>>,
    pending: &mut HashMap<u64, Pending>,
    outbox: &Arc<Outbox>,
    stats: &RefCell<HashMap<String, EventStats>>,
) -> Option<(u32, Tag, Vec<u8>)> {
    let tag = Tag {
        kind: message.kind,
        correlation: message.correlation,
    };
    let sender = WorkerId {
        slot: message.sender,
        generation: message.generation,
    };
    let payload = &message.payload[..];
    if tag.kind == wire::REPLY {
        let (status, generation, body) = wire::parse_reply(payload)?;
        if generation != my_generation {
            // A reply to this slot's previous worker.
            return None;
        }
        let p = pending.get_mut(&tag.correlation)?;
        // Only the incarnation the call went to may answer it: a successor
        // in the same slot that ran a queued copy is not it.
        if p.target != sender.slot || p.generation != sender.generation || p.result.is_some() {
            return None;
        }
        p.result = Some(match status {
            wire::OK => Ok(body.to_vec()),
            wire::NO_HANDLER => Err(RequestError::NoHandler),
            _ => Err(RequestError::HandlerFailed(
                String::from_utf8_lossy(body).into_owned(),
            )),
        });
        return None;
    }
    let kind = match tag.kind {
        wire::EMIT => CallKind::Event,
        wire::REQUEST => CallKind::Request,
        wire::CONSUME => CallKind::Consume,
        _ => return None, // not a messenger message
    };
    let Some(call) = wire::parse_call(payload) else {
        tracing::warn!(sender = sender.slot, "malformed messenger message dropped");
        return None;
    };
    let wants_reply = kind != CallKind::Event && tag.correlation != 0;
    let reply_to = wants_reply.then(|| ReplyTo {
        to: sender.slot,
        correlation: tag.correlation,
        requester_generation: sender.generation,
        outbox: outbox.clone(),
    });
    let bump = |f: &dyn Fn(&mut EventStats)| {
        let mut s = stats.borrow_mut();
        match s.get_mut(call.name) {
            Some(e) => f(e),
            None => f(s.entry(call.name.to_owned()).or_default()),
        }
    };
    bump(&|s| s.received += 1);
    let ctx = Ctx {
        sender,
        event: call.name.to_owned(),
        delivery_id: call.delivery,
        kind,
    };
    let Some(list) = handlers.get_mut(call.name).filter(|l| !l.is_empty()) else {
        bump(&|s| s.unhandled += 1);
        return reply_to.map(|r| reply_message(&r, wire::NO_HANDLER, b""));
    };
    // Events run every handler; calls run the first.
    let run = if kind == CallKind::Event { list.len() } else { 1 };
    let mut first: Option<Outcome> = None;
    let mut spent = Vec::new();
    for h in list.iter_mut().take(run) {
        let r = reply_to.clone();
        IN_HANDLER.with(|f| f.set(true));
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| (h.f)(&ctx, call.data, r)))
            .unwrap_or_else(|p| Outcome::Failed(panic_text(p)));
        IN_HANDLER.with(|f| f.set(false));
        match &outcome {
            Outcome::Decode(e) => {
                bump(&|s| s.decode_failures += 1);
                tracing::warn!(event = call.name, sender = sender.slot, error = %e, "payload does not decode as the handler's type; handler not called");
            }
            Outcome::Failed(e) => {
                bump(&|s| s.failures += 1);
                tracing::warn!(event = call.name, sender = sender.slot, error = %e, "handler failed");
            }
            _ => bump(&|s| s.handled += 1),
        }
        if h.once && !matches!(outcome, Outcome::Decode(_)) {
            spent.push(h.id);
        }
        if first.is_none() {
            first = Some(outcome);
        }
    }
    list.retain(|h| !spent.contains(&h.id));
    let r = reply_to?;
    Some(match first? {
        Outcome::Value(bytes) => reply_message(&r, wire::OK, &bytes),
        Outcome::Deferred => return None,
        Outcome::Failed(e) => reply_message(&r, wire::FAILED, e.as_bytes()),
        Outcome::Decode(e) => reply_message(
            &r,
            wire::FAILED,
            format!("cannot decode the payload: {e}").as_bytes(),
        ),
    })
}

fn reply_message(r: &ReplyTo, status: u8, body: &[u8]) -> (u32, Tag, Vec<u8>) {
    (
        r.to,
        Tag {
            kind: wire::REPLY,
            correlation: r.correlation,
        },
        wire::reply(status, r.requester_generation, body),
    )
}

/// `messenger.to(target)`: send or emit to a target.
#[derive(Debug)]
pub struct To<'a> {
    m: &'a mut Messenger,
    target: Target,
}

impl To<'_> {
    /// Emits `event` with `value` (every handler for it runs).
    ///
    /// # Errors
    /// As [`Messenger::emit`].
    pub fn emit<T: Serialize + ?Sized>(self, event: &str, value: &T) -> Result<usize, RequestError> {
        self.m.emit(self.target, event, value)
    }

    /// Sends a plain message: the `"message"` event, as SFN's ipchannel
    /// `send` does (`on("message", ..)` receives it).
    ///
    /// # Errors
    /// As [`Messenger::emit`].
    pub fn send<T: Serialize + ?Sized>(self, value: &T) -> Result<usize, RequestError> {
        self.m.emit(self.target, "message", value)
    }
}
