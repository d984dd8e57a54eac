//! The calls a worker makes — emit, broadcast, notify, request, map,
//! consume — on the messenger's own thread. Each call that waits runs the
//! call core ([`super::core`]) through [`Messenger::call`], dispatching
//! what arrives while it waits, so two workers calling each other never
//! deadlock.

use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::core::{Backlog, Op, Peers, Settled, Standing};
use super::encode::{decode, encode_call, encode_call_bytes, encode_call_in};
use super::error::{CallError, EmitError, MapError};
use super::leader::{self, LeaderWatch};
use super::{
    wire, Consumed, Leader, Messenger, Target, WorkerId, LATENCY_MAP, LATENCY_REQUEST, TIME_ONE_REQUEST_IN,
};
use crate::cluster::ClusterView;
use crate::segment::Segment;
use crate::{Tag, WaitStrategy};

/// How long a `request` or `invoke` waiting for its answer spins before
/// it parks, when the endpoint has the default strategy (an idle worker
/// spins 5 µs, `WaitStrategy::DEFAULT_SPIN`). The classic spin-then-block
/// rule, about one sleep and wake on the reference machine (2 vCPUs): a
/// caller that parked after 5 µs while its target woke (30 µs) had to be
/// woken for the answer, and the next request found the target parked in
/// turn. Request after request, both sides could stay in that regime: one
/// messenger bench run measured a `request` p50 of 18.5 µs instead of
/// 0.6 µs with 2 workers. Spinning this long, the caller takes the answer
/// running and asks again before the target parks.
const ANSWER_SPIN: Duration = Duration::from_micros(50);

/// How long a `map` waiting for answers spins before it parks, with the
/// default strategy. The answers of workers that had parked come 20-40 µs
/// later on the reference machine; a caller that parked meanwhile pays one
/// more wake. Measured with the messenger bench, `map` p50 with 4
/// workers: 30-42 µs (median 32) spinning 5 µs, 20-36 µs (median 26)
/// spinning 20 µs, 22-44 µs (median 27) spinning 50 µs; with 8 workers no
/// difference in the p50 (59-83 µs), but a p99 of 145-155 µs spinning 50
/// µs against 100-135 µs. Not for `consume`: a caller spinning longer
/// while the worker it woke needs a core made sequential `consume` 10-45%
/// slower.
const MAP_SPIN: Duration = Duration::from_micros(20);

/// The cluster as the call core sees it from a live worker: the cluster's
/// view for liveness and load, the lock table for the leader.
pub(super) struct LivePeers<'a> {
    view: ClusterView<'a>,
    segment: &'a Segment,
    me: WorkerId,
    /// The default role's lock-table entry, if known.
    leader_entry: Option<u32>,
}

impl<'a> LivePeers<'a> {
    pub(super) fn new(segment: &'a Segment, me: WorkerId, leader_entry: Option<u32>) -> Self {
        Self {
            view: ClusterView::new(segment, me),
            segment,
            me,
            leader_entry,
        }
    }
}

impl Peers for LivePeers<'_> {
    fn workers(&self) -> u32 {
        self.view.workers()
    }

    fn live_generation(&self, slot: u32) -> Option<u32> {
        self.view.live_generation(slot)
    }

    fn live_workers(&self) -> Vec<WorkerId> {
        self.view.live_workers()
    }

    fn standing(&self, slot: u32) -> Standing {
        Standing {
            draining: self.view.is_draining(slot),
            running: self.view.is_running(slot),
        }
    }

    fn backlog(&self, slot: u32) -> Backlog {
        let (queued, busy) = self.view.consume_backlog(slot);
        Backlog { queued, busy }
    }

    fn leader(&self) -> Option<(Leader, Option<LeaderWatch>)> {
        leader::leader_call(self.segment, self.me, self.leader_entry)
    }

    fn leader_died(&self, watch: &LeaderWatch) -> bool {
        watch.died(self.segment)
    }

    fn bridge(&self) -> Option<WorkerId> {
        self.view.bridge()
    }

    fn remote_hosts(&self) -> u32 {
        self.view.remote_hosts()
    }
}

impl Messenger {
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
    ) -> Result<usize, EmitError> {
        let bytes = encode_call(event, 0, value, self.max_payload)?;
        self.emit_encoded(target, event, bytes)
    }

    /// Emits raw bytes (handlers registered with [`Messenger::on_bytes`]).
    ///
    /// # Errors
    /// As [`Messenger::emit`].
    pub fn emit_bytes(&mut self, target: Target, event: &str, data: &[u8]) -> Result<usize, EmitError> {
        let bytes = encode_call_bytes(event, 0, data, self.max_payload)?;
        self.emit_encoded(target, event, bytes)
    }

    /// [`Messenger::emit_bytes`] that waits for room in a full lane until
    /// `deadline` only (dispatching meanwhile, as every send does), for a
    /// caller on an event loop's thread: `TimedOut` then. A broadcast that
    /// times out may have reached the workers before the full lane (it
    /// sends in slot order), and none after it.
    ///
    /// # Errors
    /// As [`Messenger::emit`]; `TimedOut`.
    pub fn emit_bytes_until(
        &mut self,
        target: Target,
        event: &str,
        data: &[u8],
        deadline: Instant,
    ) -> Result<usize, EmitError> {
        let bytes = encode_call_bytes(event, 0, data, self.max_payload)?;
        self.emit_encoded_until(target, event, bytes, Some(deadline))
    }

    fn emit_encoded(&mut self, target: Target, event: &str, bytes: Vec<u8>) -> Result<usize, EmitError> {
        self.emit_encoded_until(target, event, bytes, None)
    }

    fn emit_encoded_until(
        &mut self,
        target: Target,
        event: &str,
        bytes: Vec<u8>,
        deadline: Option<Instant>,
    ) -> Result<usize, EmitError> {
        let tag = Tag {
            kind: wire::EMIT,
            correlation: 0,
        };
        let targets = targets(&self.view(), target)?;
        let bridge = match target {
            Target::All | Target::Others => {
                check_cross_host(&self.view(), event, &bytes)?;
                // Only while the bridge sees another host: a broadcast then
                // costs a copy through the bridge (the hosts bench: a local
                // broadcast at 0.13-0.29x with a bridge and no other host).
                let view = self.view();
                (view.remote_hosts() > 0).then(|| view.bridge()).flatten()
            }
            Target::Worker(_) => None,
        };
        for &to in &targets {
            self.deliver(to, tag, bytes.clone(), deadline)?;
        }
        if let Some(bridge) = bridge {
            // Its own kind: an `emit` to the bridge's slot is not a
            // broadcast to every other host.
            let tag = Tag {
                kind: wire::BRIDGE_BCAST,
                correlation: 0,
            };
            self.deliver(bridge.slot, tag, bytes, deadline)?;
        }
        self.count(event, |s| s.sent += targets.len() as u64);
        Ok(targets.len())
    }

    /// `emit(All, ..)`: every live worker, the caller included, runs its
    /// handlers for `event`. Returns how many workers it was sent to.
    ///
    /// # Errors
    /// As [`Messenger::emit`].
    pub fn broadcast<T: Serialize + ?Sized>(&mut self, event: &str, value: &T) -> Result<usize, EmitError> {
        self.emit(Target::All, event, value)
    }

    /// A builder-style target: `messenger.to(Target::Worker(3)).emit("e", &v)`.
    pub fn to(&mut self, target: Target) -> To<'_> {
        To { m: self, target }
    }

    // ------------------------------------------------------------ calls

    /// Sends a REQUEST for `event` to `worker`, without waiting for an
    /// answer (a reply, if any, is dropped): its first handler runs.
    ///
    /// # Errors
    /// The send errors.
    pub fn notify<T: Serialize + ?Sized>(
        &mut self,
        worker: u32,
        event: &str,
        value: &T,
    ) -> Result<(), EmitError> {
        let bytes = encode_call(event, 0, value, self.max_payload)?;
        let tag = Tag {
            kind: wire::REQUEST,
            correlation: 0,
        };
        self.deliver(worker, tag, bytes, None)?;
        self.count(event, |s| s.sent += 1);
        Ok(())
    }

    // ------------------------------------------------------------ calls

    /// Runs `op` to its end: the blocking driver of the call core. Sends
    /// what the core asks for, dispatches what arrives (answers, and the
    /// handlers of other messages) and looks at deaths and the time, until
    /// the core settles `op`.
    ///
    /// # Errors
    /// Only a corrupt lane found while dispatching; the call's own failures
    /// are in the [`Settled`].
    pub(super) fn call(&mut self, op: Op, deadline: Instant) -> Result<Settled, CallError> {
        self.call_timed(op, deadline, Some(Instant::now()), false, None)
            .map(|(settled, _)| settled)
    }

    /// [`Messenger::call`] started at `started` (the caller's clock read),
    /// also returning how long it took if `timed`: measured with the
    /// loop's own clock reads, one a turn (a request answered in the first
    /// wait reads the clock twice in all).
    ///
    /// Without `started` (a request, not timed) the core starts the call
    /// at the last time it was given, and the clock is read once the
    /// request is sent, while it is on its way, as is the count of one
    /// `sent` for `event`: the round trip's critical path has neither.
    /// (A request's start uses no time: its deadline is absolute.)
    pub(super) fn call_timed(
        &mut self,
        op: Op,
        deadline: Instant,
        started: Option<Instant>,
        timed: bool,
        event: Option<&str>,
    ) -> Result<(Settled, Option<Duration>), CallError> {
        debug_assert!(started.is_some() || !timed);
        // With the default strategy, a call waits for its answers spinning
        // longer than an idle worker (see `ANSWER_SPIN`).
        let call_wait = match op {
            // A call to another host takes hundreds of microseconds.
            Op::Consume { .. } | Op::Route { .. } => None,
            Op::Map { .. } => Some(MAP_SPIN),
            Op::Request { .. } | Op::Invoke { .. } => Some(ANSWER_SPIN),
        }
        .filter(|_| self.worker.endpoint_ref().wait_strategy() == WaitStrategy::default())
        .map(WaitStrategy::SpinThenPark);
        // One clock read a turn: the core is given it, and an answer that
        // arrives is handled at it (see `CallCore`'s clock).
        let late_clock = started.is_none();
        let started = started.unwrap_or_else(|| self.core.now());
        let mut now = started;
        let id = {
            let peers = LivePeers::new(&self.segment, self.me(), self.leader_entry());
            self.core.start(op, deadline, now, &peers)
        };
        let mut first = true;
        // A call settled before any wait read no clock since `started`.
        let took = |first: bool, now: Instant| {
            timed.then(|| {
                if first {
                    started.elapsed()
                } else {
                    now.saturating_duration_since(started)
                }
            })
        };
        loop {
            self.pump();
            if first {
                if let Some(event) = event {
                    self.count(event, |s| s.sent += 1);
                }
                if late_clock {
                    now = Instant::now();
                }
            }
            if let Some(s) = self.core.take_settled(id) {
                return Ok((s, took(first, now)));
            }
            // Not on the first turn, unless the deadline has passed
            // already: `start` has just looked at the targets, and a
            // death counted since ends the wait below (`dispatch_until`
            // then looks at once).
            if !first || now >= deadline {
                self.check_liveness(now);
                {
                    let peers = LivePeers::new(&self.segment, self.me(), self.leader_entry());
                    self.core.handle_timeout(now, &peers);
                }
                // A redelivery, a failover or a new look for the leader
                // queued by the two steps above goes out now, not after
                // the wait.
                self.pump();
                if let Some(s) = self.core.take_settled(id) {
                    return Ok((s, took(first, now)));
                }
            }
            first = false;
            let until = self
                .core
                .next_timeout()
                .unwrap_or(deadline)
                .min(now + self.liveness_slice);
            let waited = match call_wait {
                Some(wait) => {
                    self.ep().set_wait_strategy(wait);
                    let r = self.dispatch_until(Some(until));
                    self.ep().set_wait_strategy(WaitStrategy::default());
                    r
                }
                None => self.dispatch_until(Some(until)),
            };
            if let Err(e) = waited {
                self.core.abandon(id);
                return Err(e.into());
            }
            if !timed && self.core.has_settled() {
                // Its answer came: no clock is needed to take it.
                if let Some(s) = self.core.take_settled(id) {
                    return Ok((s, None));
                }
            }
            now = Instant::now();
        }
    }

    /// A request's or invoke's answer.
    pub(super) fn call_answer(&mut self, op: Op, deadline: Instant) -> Result<Vec<u8>, CallError> {
        match self.call(op, deadline)? {
            Settled::Answer(r) => r,
            other => unreachable!("a request settled as {other:?}"),
        }
    }

    /// Asks `worker` to run its first handler for `event` with `value` and
    /// waits until `deadline` for the answer.
    ///
    /// # Errors
    /// `NoHandler`, `HandlerFailed` (its error, panic, or a payload it could
    /// not decode), `WorkerDied`, `TimedOut`, `Decode`, `NoSuchWorker`,
    /// and the encoding and send errors.
    pub fn request<T, R>(
        &mut self,
        worker: u32,
        event: &str,
        value: &T,
        deadline: Instant,
    ) -> Result<R, CallError>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let buf = super::dispatch::buffer(&mut self.spare);
        let bytes = encode_call_in(buf, event, 0, value, self.max_payload)?;
        let answer = self.request_encoded(worker, event, bytes, deadline)?;
        let value = decode(&answer);
        super::dispatch::recycle(&mut self.spare, answer);
        value
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
    ) -> Result<Vec<u8>, CallError> {
        let bytes = encode_call_bytes(event, 0, data, self.max_payload)?;
        self.request_encoded(worker, event, bytes, deadline)
    }

    fn request_encoded(
        &mut self,
        worker: u32,
        event: &str,
        bytes: Vec<u8>,
        deadline: Instant,
    ) -> Result<Vec<u8>, CallError> {
        let timed = self.requests.is_multiple_of(TIME_ONE_REQUEST_IN);
        self.requests = self.requests.wrapping_add(1);
        let started = timed.then(Instant::now);
        let op = Op::Request { to: worker, bytes };
        let (settled, took) = self.call_timed(op, deadline, started, timed, Some(event))?;
        if let Some(took) = took {
            self.record_latency(LATENCY_REQUEST, took);
        }
        match settled {
            Settled::Answer(r) => r,
            other => unreachable!("a request settled as {other:?}"),
        }
    }

    /// Every live worker, the caller included, runs its first handler for
    /// `event`; one entry per worker, in slot order. Never waits past
    /// `deadline`, and an entry whose worker died or has no handler is
    /// settled as soon as that is known.
    ///
    /// # Errors
    /// Only for the call as a whole: `EventName`, `Encode`, `TooLarge`, a
    /// corrupt lane found while dispatching.
    #[allow(clippy::type_complexity)]
    pub fn map<T, R>(
        &mut self,
        event: &str,
        value: &T,
        deadline: Instant,
    ) -> Result<Vec<(WorkerId, Result<R, MapError>)>, CallError>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let bytes = encode_call(event, 0, value, self.max_payload)?;
        Ok(decode_entries(self.map_encoded(event, bytes, deadline)?))
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
    ) -> Result<Vec<(WorkerId, Result<Vec<u8>, MapError>)>, CallError> {
        let bytes = encode_call_bytes(event, 0, data, self.max_payload)?;
        self.map_encoded(event, bytes, deadline)
    }

    #[allow(clippy::type_complexity)]
    fn map_encoded(
        &mut self,
        event: &str,
        bytes: Vec<u8>,
        deadline: Instant,
    ) -> Result<Vec<(WorkerId, Result<Vec<u8>, MapError>)>, CallError> {
        let _span = tracing::debug_span!("map", event).entered();
        check_cross_host(&self.view(), event, &bytes)?;
        let (settled, took) =
            self.call_timed(Op::Map { bytes }, deadline, Some(Instant::now()), true, None)?;
        let entries = match settled {
            Settled::Map(entries) => entries,
            other => unreachable!("a map settled as {other:?}"),
        };
        self.count(event, |s| s.sent += entries.len() as u64);
        if let Some(took) = took {
            self.record_latency(LATENCY_MAP, took);
        }
        Ok(entries)
    }

    /// Runs `event` on exactly one live worker that has a handler for it,
    /// the one with the shallowest inbox, and waits until its handler has
    /// finished. At least once: if that worker dies first, the task goes to
    /// another worker with the same delivery id.
    ///
    /// # Errors
    /// `NoHandler` if no live worker has a handler, `HandlerFailed`,
    /// `TimedOut`, and the encoding and send errors.
    pub fn consume<T: Serialize + ?Sized>(
        &mut self,
        event: &str,
        value: &T,
        deadline: Instant,
    ) -> Result<Consumed, CallError> {
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
    ) -> Result<Consumed, CallError> {
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
    ) -> Result<Consumed, CallError> {
        let _span = tracing::debug_span!("consume", event, delivery).entered();
        self.count(event, |s| s.sent += 1);
        match self.call(Op::Consume { delivery, bytes }, deadline)? {
            Settled::Consumed(r) => r,
            other => unreachable!("a consume settled as {other:?}"),
        }
    }

    /// Emits `event` with `value` to the worker in `slot` of another host
    /// (feature `nats`: through this host's bridge and that host's).
    /// Fire and forget, as [`Messenger::emit`]: a host that is not
    /// connected drops it (its bridge counts it, see `bridge_stats`).
    ///
    /// # Errors
    /// `NoBridge` if this host has no live bridge; the encoding errors.
    pub fn emit_at<T: Serialize + ?Sized>(
        &mut self,
        host: &str,
        slot: u32,
        event: &str,
        value: &T,
    ) -> Result<(), EmitError> {
        let call = encode_call(event, 0, value, self.max_payload)?;
        self.emit_at_encoded(host, slot, event, &call)
    }

    /// [`Messenger::emit_at`] with raw bytes (handlers registered with
    /// [`Messenger::on_bytes`]).
    ///
    /// # Errors
    /// As [`Messenger::emit_at`].
    pub fn emit_bytes_at(
        &mut self,
        host: &str,
        slot: u32,
        event: &str,
        data: &[u8],
    ) -> Result<(), EmitError> {
        let call = encode_call_bytes(event, 0, data, self.max_payload)?;
        self.emit_at_encoded(host, slot, event, &call)
    }

    fn emit_at_encoded(&mut self, host: &str, slot: u32, event: &str, call: &[u8]) -> Result<(), EmitError> {
        check_cross_host(&self.view(), event, call)?;
        let bridge = self.view().bridge().ok_or(EmitError::NoBridge)?;
        let tag = Tag {
            kind: wire::BRIDGE_EMIT,
            correlation: 0,
        };
        self.deliver(bridge.slot, tag, routed(host, slot, call)?, None)?;
        self.count(event, |s| s.sent += 1);
        Ok(())
    }

    /// Asks the worker in `slot` of another host (feature `nats`) to run
    /// its first handler for `event`, as [`Messenger::request`] does here.
    ///
    /// # Errors
    /// `HostUnreachable` at once if this host has no live bridge, the
    /// host is not connected, or no worker serves that slot there; the
    /// rest as [`Messenger::request`].
    pub fn request_at<T, R>(
        &mut self,
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
        let call = encode_call(event, 0, value, self.max_payload)?;
        decode(&self.route_encoded(host, slot, event, &call, deadline)?)
    }

    /// [`Messenger::request_at`] with raw bytes both ways.
    ///
    /// # Errors
    /// As [`Messenger::request_at`].
    pub fn request_bytes_at(
        &mut self,
        host: &str,
        slot: u32,
        event: &str,
        data: &[u8],
        deadline: Instant,
    ) -> Result<Vec<u8>, CallError> {
        let call = encode_call_bytes(event, 0, data, self.max_payload)?;
        self.route_encoded(host, slot, event, &call, deadline)
    }

    fn route_encoded(
        &mut self,
        host: &str,
        slot: u32,
        event: &str,
        call: &[u8],
        deadline: Instant,
    ) -> Result<Vec<u8>, CallError> {
        check_cross_host(&self.view(), event, call)?;
        let bytes = routed(host, slot, call)?;
        self.count(event, |s| s.sent += 1);
        self.call_answer(Op::Route { bytes }, deadline)
    }

    /// A delivery id unique to this worker incarnation's `consume`s (an
    /// async messenger's have bit 31 set).
    pub(super) fn new_delivery_id(&mut self) -> u64 {
        self.next_delivery = (self.next_delivery + 1) & 0x7fff_ffff;
        (u64::from(self.slot) << 52) ^ (u64::from(self.generation) << 32) ^ self.next_delivery
    }

    fn record_latency(&self, which: usize, d: Duration) {
        let stats = self.segment.stats_entry(self.slot);
        stats.add_latency(which, d.as_nanos() as u64);
    }
}

/// The slots `target` names now; `NoSuchWorker` for a slot out of range.
/// Never the host's bridge for `All` and `Others`: the caller sends it
/// the broadcast as [`wire::BRIDGE_BCAST`].
pub(super) fn targets(view: &ClusterView<'_>, target: Target) -> Result<Vec<u32>, EmitError> {
    let me = view.me().slot;
    Ok(match target {
        Target::Worker(slot) if slot >= view.workers() => return Err(EmitError::NoSuchWorker { slot }),
        Target::Worker(slot) => vec![slot],
        Target::All => view.live_workers().into_iter().map(|w| w.slot).collect(),
        Target::Others => view
            .live_workers()
            .into_iter()
            .map(|w| w.slot)
            .filter(|&s| s != me)
            .collect(),
    })
}

/// `TooLarge` if this host has a bridge and `call` (of `event`: its header
/// and data) is longer than NATS carries between hosts: the payload limit
/// named is the server's `max_payload` less what the bridge's frame and
/// the call's header take. Nothing is sent then, to anyone.
pub(super) fn check_cross_host(view: &ClusterView<'_>, event: &str, call: &[u8]) -> Result<(), EmitError> {
    match view.cross_host_limit() {
        Some(limit) if call.len() > limit => {
            let header = wire::call_header_len(event.len());
            Err(EmitError::TooLarge {
                len: call.len().saturating_sub(header),
                max: limit.saturating_sub(header),
            })
        }
        _ => Ok(()),
    }
}

/// A call to `(host, slot)` for the host's bridge: the route, then the
/// call. A host name is a NATS subject token (see `NatsConfig`).
pub(super) fn routed(host: &str, slot: u32, call: &[u8]) -> Result<Vec<u8>, EmitError> {
    if host.is_empty() || host.len() > 64 {
        return Err(EmitError::HostName(host.into()));
    }
    let mut bytes = Vec::with_capacity(1 + host.len() + 4 + call.len());
    wire::put_route(&mut bytes, host, slot);
    bytes.extend_from_slice(call);
    Ok(bytes)
}

/// A map's entries decoded as `R`.
pub(super) fn decode_entries<R: DeserializeOwned>(
    entries: Vec<(WorkerId, Result<Vec<u8>, MapError>)>,
) -> Vec<(WorkerId, Result<R, MapError>)> {
    entries
        .into_iter()
        .map(|(peer, r)| {
            (
                peer,
                r.and_then(|body| postcard::from_bytes(&body).map_err(MapError::Decode)),
            )
        })
        .collect()
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
    pub fn emit<T: Serialize + ?Sized>(self, event: &str, value: &T) -> Result<usize, EmitError> {
        self.m.emit(self.target, event, value)
    }

    /// Sends a plain message: the `"message"` event, as SFN's ipchannel
    /// `send` does (`on("message", ..)` receives it).
    ///
    /// # Errors
    /// As [`Messenger::emit`].
    pub fn send<T: Serialize + ?Sized>(self, value: &T) -> Result<usize, EmitError> {
        self.m.emit(self.target, "message", value)
    }
}
