//! The call protocol, written once for every driver, as a state machine
//! that does no I/O (sans-IO, in the manner of quinn-proto's `Connection`).
//!
//! A *call* is one message that wants an answer: it has a correlation id,
//! a target slot and the target's generation when it was sent. An
//! *operation* is what the user asked for and is made of calls:
//!
//! | operation          | calls                                                        | settles with                     |
//! |--------------------|--------------------------------------------------------------|----------------------------------|
//! | [`Op::Request`]    | one, to the slot asked for                                   | the answer, or a [`CallError`]   |
//! | [`Op::Map`]        | one per live worker                                          | one entry per worker             |
//! | [`Op::Consume`]    | one at a time: the next on a death or a `NoHandler`          | who finished it, or an error     |
//! | [`Op::Invoke`]     | one to the leader; again on `NOT_LEADER`, or its death if `retry` | the answer, or an error     |
//!
//! The core is *given* what happened — [`CallCore::handle_reply`] (an
//! answer arrived), [`CallCore::send_failed`] (a call could not be sent),
//! [`CallCore::handle_deaths`] (look at who died) and
//! [`CallCore::handle_timeout`] (the time now) — and is *asked* what to do:
//! [`CallCore::poll_transmit`] (a message to send) and
//! [`CallCore::take_settled`] / [`CallCore::poll_settled_where`] (an
//! operation finished). It never reads a
//! clock, a lane or the segment itself: what it knows of the cluster comes
//! through [`Peers`], so the unit tests below drive every race the
//! multi-process tests found with a fake cluster and a fake clock.
//!
//! # How a driver plugs in
//! A driver owns one `CallCore` and the means to send, receive and wait.
//! The blocking [`Messenger`](super::Messenger), the handle for other
//! threads and the tokio driver of the
//! [`AsyncMessenger`](super::AsyncMessenger) all run this loop; a NATS
//! bridge or a Node.js binding runs the same one:
//!
//! 1. [`start`](CallCore::start) an operation (its payload already encoded
//!    and size-checked), keeping the [`OpId`];
//! 2. send every [`Transmit`] that [`poll_transmit`](CallCore::poll_transmit)
//!    gives, in order, each before its deadline; one that cannot be sent
//!    goes back through [`send_failed`](CallCore::send_failed);
//! 3. feed every reply that arrives to
//!    [`handle_reply`](CallCore::handle_reply);
//! 4. when deaths may have happened (the master's death count moved, or
//!    every few milliseconds while calls wait) call
//!    [`handle_deaths`](CallCore::handle_deaths), and
//!    [`handle_timeout`](CallCore::handle_timeout) with the time now;
//! 5. take finished operations: its own with
//!    [`take_settled`](CallCore::take_settled), those it runs for others
//!    with [`poll_settled_where`](CallCore::poll_settled_where); wait for
//!    the next message no longer than
//!    [`next_timeout`](CallCore::next_timeout).
//!
//! The core reads no clock: its time is the last one it was given (by
//! `start`, `handle_timeout`, `handle_deaths` or `send_failed`), and an
//! answer is handled at that time, so a driver reads the clock once a turn.
//!
//! Steps 2–5 repeat, each cheap when there is nothing to do; after any
//! `start` or `handle_*`, drain `poll_transmit` before waiting: those
//! steps may queue a message (a redelivery, a failover, a new look for the
//! leader) that nothing else will send.

mod peers;

use std::collections::hash_map::Entry;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use super::error::{CallError, MapError};
use super::leader::{self, LeaderWatch};
use super::{wire, Consumed, HostId, WorkerId};
use crate::Tag;

pub(crate) use peers::{Backlog, Peers, Standing};

/// Identifies an operation of one [`CallCore`].
pub(crate) type OpId = u64;

/// How long an `invoke` waits before looking for a leader again when
/// there is none.
const LEADER_POLL: Duration = Duration::from_millis(2);
/// How long an `invoke` waits before asking again when the worker it asked
/// was no longer the leader.
const NOT_LEADER_RETRY: Duration = Duration::from_millis(1);

/// How many consumes in a row a caller gives the worker it sticks to
/// before it moves on to the next (the spill-over rule of
/// [`CallCore::pick_consumer`]). Each move usually wakes a parked worker
/// (30–60 µs on the reference machine), paid once per this many tasks.
/// Measured with the messenger bench (sequential `consume`, 2 vCPUs): 64
/// gave 0.79–0.90 M tasks/s with 2 workers, below the 1.03 M/s of the
/// old round-robin, whose second worker never parked; 256 gave 1.29–1.32
/// M/s (2 workers), 1.25–1.30 M/s (4) and 0.73–1.01 M/s (8). Much more
/// would leave workers without any task in the distribution tests (2000
/// sequential tasks over 3 workers; the work moves every 256 or so).
pub(crate) const CONSUME_STREAK: u32 = 256;

/// An operation to start: its payload is an encoded call
/// ([`wire::put_call_header`] and the value), checked against the payload
/// limit.
#[derive(Debug)]
pub(crate) enum Op {
    /// One call to the worker in slot `to`.
    Request { to: u32, bytes: Vec<u8> },
    /// One call to every live worker, the caller included.
    Map { bytes: Vec<u8> },
    /// One call at a time to one live worker with a handler, the least
    /// loaded; at least once (`delivery` is in `bytes`).
    Consume { delivery: u64, bytes: Vec<u8> },
    /// One call to the default role's leader. With `retry`, a call whose
    /// leader died goes to the next one (an idempotent method).
    Invoke { bytes: Vec<u8>, retry: bool },
    /// One call through the host's bridge to a worker of another host:
    /// `bytes` is a route ([`wire::put_route`]) then the call; the bridge
    /// is sent the time left, then those bytes ([`wire::BRIDGE_CALL`]).
    Route { bytes: Vec<u8> },
}

/// A map's entry index for its call to the host's bridge (the other
/// hosts' entries).
const BRIDGE_ENTRY: usize = usize::MAX;

/// How an operation ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// A request's or an invoke's answer (an encoded value).
    Answer(Result<Vec<u8>, CallError>),
    /// A map's entries, one per worker that was live at its start, in slot
    /// order.
    Map(Vec<(WorkerId, Result<Vec<u8>, MapError>)>),
    /// A consume's end.
    Consumed(Result<Consumed, CallError>),
}

/// A message the driver must send for a call.
#[derive(Debug)]
pub(crate) struct Transmit {
    /// The call it belongs to (for [`CallCore::send_failed`]).
    pub(crate) call: u64,
    pub(crate) to: u32,
    pub(crate) tag: Tag,
    pub(crate) bytes: Vec<u8>,
    /// Give up sending (a full lane) at this time.
    pub(crate) deadline: Instant,
}

/// A call in flight.
#[derive(Debug)]
struct Call {
    op: OpId,
    target: u32,
    generation: u32,
    /// For a call to a leader: its term, ended by its death.
    watch: Option<LeaderWatch>,
    /// A map's entry index.
    entry: usize,
    /// It went to the host's bridge: a map's answer is the other hosts'
    /// entries, a consume's names who ran it.
    bridged: bool,
}

/// A map's entries so far: `None` until its worker's call ends.
type OpenEntries = Vec<(WorkerId, Option<Result<Vec<u8>, MapError>>)>;

/// A map's entries from other hosts, and its call to the bridge: the
/// bridge's worker id and whether that call has ended.
#[derive(Debug, Default)]
struct RemoteEntries {
    entries: Vec<(WorkerId, Result<Vec<u8>, MapError>)>,
    bridge: Option<(WorkerId, bool)>,
}

/// A map's end: every entry, those still open as `TimedOut`; this host's
/// in slot order, then the other hosts' in the order the bridge gave
/// (by host name, then slot), or one entry for a bridge that did not
/// answer.
fn close_map(entries: &mut OpenEntries, remote: &mut RemoteEntries) -> Settled {
    let mut all: Vec<_> = std::mem::take(entries)
        .into_iter()
        .map(|(w, r)| (w, r.unwrap_or(Err(MapError::TimedOut))))
        .collect();
    all.append(&mut remote.entries);
    if let Some((bridge, false)) = remote.bridge.take() {
        all.push((bridge, Err(MapError::TimedOut)));
    }
    Settled::Map(all)
}

/// The other hosts' entries of a map, from its bridge's answer; one entry
/// for the bridge itself if it failed (`HostUnreachable` if it died).
fn remote_entries(
    out: &mut Vec<(WorkerId, Result<Vec<u8>, MapError>)>,
    bridge: WorkerId,
    result: Result<Vec<u8>, CallError>,
) {
    match result {
        Ok(body) => match wire::parse_remote_entries(&body) {
            Some(list) => out.extend(list.into_iter().map(|e| {
                let worker = WorkerId {
                    host: HostId::of(e.host),
                    slot: e.slot,
                    generation: e.generation,
                };
                (worker, remote_result(e.status, e.body))
            })),
            None => out.push((
                bridge,
                Err(MapError::HandlerFailed("the bridge's answer is malformed".into())),
            )),
        },
        Err(CallError::WorkerDied) => out.push((bridge, Err(MapError::HostUnreachable))),
        Err(e) => out.push((bridge, Err(MapError::from_call(e)))),
    }
}

/// A remote worker's map entry, from its status on the wire.
fn remote_result(status: u8, body: &[u8]) -> Result<Vec<u8>, MapError> {
    match status {
        wire::OK => Ok(body.to_vec()),
        wire::NO_HANDLER => Err(MapError::NoHandler),
        wire::UNREACHABLE => Err(MapError::HostUnreachable),
        wire::TIMED_OUT => Err(MapError::TimedOut),
        wire::DIED => Err(MapError::WorkerDied),
        _ => Err(MapError::HandlerFailed(
            String::from_utf8_lossy(body).into_owned(),
        )),
    }
}

/// `bytes` (a call) with its delivery field set to `value`.
fn with_delivery(mut bytes: Vec<u8>, value: u64) -> Vec<u8> {
    let at = 1 + usize::from(bytes.first().copied().unwrap_or(0));
    if let Some(field) = bytes.get_mut(at..at + 8) {
        field.copy_from_slice(&value.to_le_bytes());
    }
    bytes
}

/// Nanoseconds from `now` to `deadline` (0 if past), as a bridge is told.
fn nanos_left(deadline: Instant, now: Instant) -> u64 {
    u64::try_from(deadline.saturating_duration_since(now).as_nanos()).unwrap_or(u64::MAX)
}

#[derive(Debug)]
enum State {
    Request,
    Map {
        entries: OpenEntries,
        open: usize,
        remote: RemoteEntries,
    },
    Consume {
        delivery: u64,
        bytes: Vec<u8>,
        refused: Vec<u32>,
        attempts: u32,
        /// The worker the call in flight went to.
        current: Option<WorkerId>,
        /// The host's bridge died with the task in hand and no worker here
        /// can take it: look again at this time (the master respawns the
        /// bridge), until the deadline.
        look_at: Option<Instant>,
        /// The bridge said the hosts that may handle it are cut off: if no
        /// worker here takes it either, it ends `HostUnreachable`, not
        /// `NoHandler`.
        unreachable: Option<String>,
    },
    Invoke {
        bytes: Vec<u8>,
        retry: bool,
        /// A call in flight.
        calling: bool,
        /// Look for a leader (again) at this time at the latest.
        look_at: Option<Instant>,
        /// Look at every [`CallCore::handle_timeout`] until then: there was
        /// no leader, and a new one should be called as soon as the driver
        /// wakes (its election rings every worker). Not after a worker
        /// said it no longer leads: that view needs a moment to settle.
        eager: bool,
    },
}

/// A consume candidate's place in [`CallCore::pick_consumer`]'s order:
/// less is better, field by field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct ConsumeRank {
    draining: bool,
    in_hand: u32,
    queued: u64,
    spilled: bool,
    parked: bool,
    not_sticky: bool,
    turn: u32,
}

#[derive(Debug)]
struct Operation {
    deadline: Instant,
    state: State,
}

/// The calls of one messenger: see the [module docs](self).
#[derive(Debug)]
pub(crate) struct CallCore {
    ops: FxHashMap<OpId, Operation>,
    calls: FxHashMap<u64, Call>,
    transmits: VecDeque<Transmit>,
    settled: VecDeque<(OpId, Settled)>,
    /// The next call id (0 means "no answer wanted" on the wire).
    next_call: u64,
    next_op: OpId,
    /// Consume's sticky worker: the slot the last consume went to, and
    /// how many in a row it took.
    sticky: Option<(u32, u32)>,
    /// Where consume's round-robin among equal workers starts: the slot
    /// after the last one it moved on to after a streak.
    turn: u32,
    /// The core's clock: the last time it was given ([`CallCore::start`],
    /// [`CallCore::handle_timeout`], [`CallCore::handle_deaths`],
    /// [`CallCore::send_failed`]); an answer is handled at that time.
    now: Instant,
}

impl CallCore {
    /// The core of the worker in slot `me`.
    pub(crate) fn new(me: u32) -> Self {
        Self {
            ops: FxHashMap::default(),
            calls: FxHashMap::default(),
            transmits: VecDeque::new(),
            settled: VecDeque::new(),
            next_call: 1,
            next_op: 1,
            sticky: None,
            turn: me,
            now: Instant::now(),
        }
    }

    /// Starts `op`, to end by `deadline`. Its first messages wait in
    /// [`CallCore::poll_transmit`]; an operation that cannot start (no such
    /// worker, a dead target, nobody to consume) is settled at once.
    pub(crate) fn start(&mut self, op: Op, deadline: Instant, now: Instant, peers: &impl Peers) -> OpId {
        self.now = now;
        let id = self.next_op;
        self.next_op += 1;
        match op {
            Op::Request { to, bytes } => {
                self.ops.insert(
                    id,
                    Operation {
                        deadline,
                        state: State::Request,
                    },
                );
                if to >= peers.workers() {
                    self.settle(id, Settled::Answer(Err(CallError::NoSuchWorker { slot: to })));
                } else if let Some(generation) = peers.live_generation(to) {
                    self.send_call(
                        id,
                        WorkerId::local(to, generation),
                        wire::REQUEST,
                        bytes,
                        None,
                        0,
                        deadline,
                    );
                } else {
                    self.settle(id, Settled::Answer(Err(CallError::WorkerDied)));
                }
            }
            Op::Map { bytes } => {
                let live = peers.live_workers();
                let bridge = peers.bridge();
                let open = live.len() + usize::from(bridge.is_some());
                self.ops.insert(
                    id,
                    Operation {
                        deadline,
                        state: State::Map {
                            entries: live.iter().map(|&w| (w, None)).collect(),
                            open,
                            remote: RemoteEntries {
                                entries: Vec::new(),
                                bridge: bridge.map(|b| (b, false)),
                            },
                        },
                    },
                );
                if open == 0 {
                    self.settle(id, Settled::Map(Vec::new()));
                }
                for (i, peer) in live.into_iter().enumerate() {
                    self.send_call(id, peer, wire::REQUEST, bytes.clone(), None, i, deadline);
                }
                if let Some(bridge) = bridge {
                    // The bridge is told the time left, in its delivery
                    // field: it answers for every other host before then.
                    let bytes = with_delivery(bytes, nanos_left(deadline, now));
                    self.send_call(id, bridge, wire::BRIDGE_MAP, bytes, None, BRIDGE_ENTRY, deadline);
                }
            }
            Op::Route { bytes } => {
                self.ops.insert(
                    id,
                    Operation {
                        deadline,
                        state: State::Request,
                    },
                );
                match peers.bridge() {
                    Some(bridge) => {
                        // The bridge is told the time left first.
                        let mut framed = Vec::with_capacity(8 + bytes.len());
                        framed.extend_from_slice(&nanos_left(deadline, now).to_le_bytes());
                        framed.extend_from_slice(&bytes);
                        self.send_call(id, bridge, wire::BRIDGE_CALL, framed, None, 0, deadline);
                    }
                    None => self.settle(
                        id,
                        Settled::Answer(Err(CallError::HostUnreachable(
                            "this host has no live NATS bridge".into(),
                        ))),
                    ),
                }
            }
            Op::Consume { delivery, bytes } => {
                self.ops.insert(
                    id,
                    Operation {
                        deadline,
                        state: State::Consume {
                            delivery,
                            bytes,
                            refused: Vec::new(),
                            attempts: 0,
                            current: None,
                            look_at: None,
                            unreachable: None,
                        },
                    },
                );
                self.consume_next(id, peers);
            }
            Op::Invoke { bytes, retry } => {
                self.ops.insert(
                    id,
                    Operation {
                        deadline,
                        state: State::Invoke {
                            bytes,
                            retry,
                            calling: false,
                            look_at: None,
                            eager: false,
                        },
                    },
                );
                self.invoke_next(id, now, peers);
            }
        }
        id
    }

    /// The next message to send, in the order the calls were made.
    pub(crate) fn poll_transmit(&mut self) -> Option<Transmit> {
        // A call can end before its message goes: its target died while an
        // earlier message of the same pump waited for room. Its message
        // must not reach that slot's successor then.
        while let Some(t) = self.transmits.pop_front() {
            if self.calls.contains_key(&t.call) {
                return Some(t);
            }
        }
        None
    }

    /// The next operation that has ended, whatever it is.
    #[cfg(test)]
    pub(crate) fn poll_settled(&mut self) -> Option<(OpId, Settled)> {
        self.poll_settled_where(|_| true)
    }

    /// `op`'s end, if it has come (taken out of the settled queue).
    pub(crate) fn take_settled(&mut self, op: OpId) -> Option<Settled> {
        // Usually the last one settled (a caller takes its own at once).
        if self.settled.back().is_some_and(|(id, _)| *id == op) {
            return self.settled.pop_back().map(|(_, s)| s);
        }
        let i = self.settled.iter().position(|(id, _)| *id == op)?;
        self.settled.remove(i).map(|(_, s)| s)
    }

    /// The next operation that has ended among those `wanted` picks.
    pub(crate) fn poll_settled_where(
        &mut self,
        mut wanted: impl FnMut(OpId) -> bool,
    ) -> Option<(OpId, Settled)> {
        let i = self.settled.iter().position(|(id, _)| wanted(*id))?;
        self.settled.remove(i)
    }

    /// The core's time: the last one it was given.
    pub(crate) fn now(&self) -> Instant {
        self.now
    }

    /// Whether an operation has ended and waits to be taken.
    pub(crate) fn has_settled(&self) -> bool {
        !self.settled.is_empty()
    }

    /// Whether any call waits for an answer (a death then matters).
    pub(crate) fn waiting(&self) -> bool {
        !self.calls.is_empty()
    }

    /// Whether any operation is under way.
    #[cfg(test)]
    pub(crate) fn busy(&self) -> bool {
        !self.ops.is_empty()
    }

    /// The next time [`CallCore::handle_timeout`] has work: the earliest
    /// deadline, or an invoke's next look for a leader.
    pub(crate) fn next_timeout(&self) -> Option<Instant> {
        self.ops
            .values()
            .map(|op| match op.state {
                State::Invoke { look_at: Some(t), .. } | State::Consume { look_at: Some(t), .. } => {
                    t.min(op.deadline)
                }
                _ => op.deadline,
            })
            .min()
    }

    /// Forgets `op` (its driver gave up on it); later answers to its calls
    /// are dropped.
    pub(crate) fn abandon(&mut self, op: OpId) {
        self.ops.remove(&op);
        self.calls.retain(|_, c| c.op != op);
        let calls = &self.calls;
        self.transmits.retain(|t| calls.contains_key(&t.call));
        self.settled.retain(|(id, _)| *id != op);
    }

    /// An answer arrived from `sender` for call `correlation`: `status` and
    /// `body` as the wire's reply carries them (the body by value: the
    /// driver hands over the buffer it received, which becomes the answer
    /// without a copy). Only the incarnation the
    /// call went to may answer it (a successor in the same slot that ran a
    /// queued copy is not it), and only once.
    pub(crate) fn handle_reply(
        &mut self,
        sender: WorkerId,
        correlation: u64,
        status: u8,
        body: impl Into<Vec<u8>>,
        peers: &impl Peers,
    ) {
        let Entry::Occupied(call) = self.calls.entry(correlation) else {
            return; // Late: its operation has ended.
        };
        if call.get().target != sender.slot || call.get().generation != sender.generation {
            return;
        }
        let call = call.remove();
        let result = match status {
            wire::OK => Ok(body.into()),
            wire::NO_HANDLER => Err(CallError::NoHandler),
            wire::UNREACHABLE => Err(CallError::HostUnreachable(
                String::from_utf8_lossy(&body.into()).into_owned(),
            )),
            wire::TIMED_OUT => Err(CallError::TimedOut),
            wire::DIED => Err(CallError::WorkerDied),
            _ => Err(CallError::HandlerFailed(
                String::from_utf8_lossy(&body.into()).into_owned(),
            )),
        };
        self.end_call(call, result, self.now, peers);
    }

    /// A call's message could not be sent: the call ends with `error`.
    pub(crate) fn send_failed(&mut self, call: u64, error: CallError, now: Instant, peers: &impl Peers) {
        self.now = now;
        if self.calls.contains_key(&call) {
            self.finish_call(call, Err(error), now, peers);
        }
    }

    /// Ends every call whose target is no longer the incarnation it was
    /// sent to, or whose leader is known dead: `WorkerDied`.
    pub(crate) fn handle_deaths(&mut self, now: Instant, peers: &impl Peers) {
        self.now = now;
        let dead: Vec<u64> = self
            .calls
            .iter()
            .filter(|(_, c)| {
                peers.live_generation(c.target) != Some(c.generation)
                    || c.watch.is_some_and(|w| peers.leader_died(&w))
            })
            .map(|(&id, _)| id)
            .collect();
        for id in dead {
            if let Some(c) = self.calls.get(&id) {
                tracing::debug!(target = c.target, generation = c.generation, "call target died");
            }
            // A request to another host whose own bridge died: the host
            // is cut off, not the remote worker dead (a consume or map
            // through the bridge handles `WorkerDied` itself).
            let routed = self.calls.get(&id).is_some_and(|c| {
                c.bridged && matches!(self.ops.get(&c.op).map(|o| &o.state), Some(State::Request))
            });
            let error = if routed {
                CallError::HostUnreachable("this host's NATS bridge died with the call".into())
            } else {
                CallError::WorkerDied
            };
            self.finish_call(id, Err(error), now, peers);
        }
    }

    /// Ends what is due at `now`: operations past their deadline, and
    /// invokes that look for a leader again.
    pub(crate) fn handle_timeout(&mut self, now: Instant, peers: &impl Peers) {
        self.now = now;
        let due: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(_, op)| now >= op.deadline)
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            self.expire(id);
        }
        let looks: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(_, op)| matches!(op.state, State::Invoke { look_at: Some(t), eager, .. } if eager || now >= t))
            .map(|(&id, _)| id)
            .collect();
        for id in looks {
            self.invoke_next(id, now, peers);
        }
        let waits: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(_, op)| matches!(op.state, State::Consume { look_at: Some(t), .. } if now >= t))
            .map(|(&id, _)| id)
            .collect();
        for id in waits {
            self.consume_next_or_wait(id, now, peers);
        }
    }

    // ------------------------------------------------------------ inside

    /// Queues call `op`'s message to `to`, to be sent by `deadline` (its
    /// operation's, passed in rather than looked up again).
    #[allow(clippy::too_many_arguments)]
    fn send_call(
        &mut self,
        op: OpId,
        to: WorkerId,
        kind: u16,
        bytes: Vec<u8>,
        watch: Option<LeaderWatch>,
        entry: usize,
        deadline: Instant,
    ) {
        let id = self.next_call;
        self.next_call += 1;
        self.calls.insert(
            id,
            Call {
                op,
                target: to.slot,
                generation: to.generation,
                watch,
                entry,
                bridged: matches!(kind, wire::BRIDGE_MAP | wire::BRIDGE_CONSUME | wire::BRIDGE_CALL),
            },
        );
        self.transmits.push_back(Transmit {
            call: id,
            to: to.slot,
            tag: Tag {
                kind,
                correlation: id,
            },
            bytes,
            deadline,
        });
    }

    fn settle(&mut self, op: OpId, settled: Settled) {
        if self.ops.remove(&op).is_some() {
            self.settled.push_back((op, settled));
        }
    }

    /// [`CallCore::settle`] of an operation that may still have calls in
    /// flight (its deadline, its abandonment): they go too, with any
    /// message of theirs not yet sent. An operation that settles through
    /// its last call's end has none left, and skips this sweep.
    fn settle_sweeping(&mut self, op: OpId, settled: Settled) {
        self.calls.retain(|_, c| c.op != op);
        let calls = &self.calls;
        self.transmits.retain(|t| calls.contains_key(&t.call));
        self.settle(op, settled);
    }

    /// Ends `op` at its deadline.
    fn expire(&mut self, id: OpId) {
        let Some(op) = self.ops.get_mut(&id) else { return };
        let settled = match &mut op.state {
            State::Request => Settled::Answer(Err(CallError::TimedOut)),
            State::Map { entries, remote, .. } => close_map(entries, remote),
            State::Consume { .. } => Settled::Consumed(Err(CallError::TimedOut)),
            State::Invoke { calling: true, .. } => Settled::Answer(Err(CallError::TimedOut)),
            State::Invoke { calling: false, .. } => Settled::Answer(Err(CallError::NoLeader)),
        };
        self.settle_sweeping(id, settled);
    }

    /// Call `id` ended with `result`: what its operation does next.
    fn finish_call(&mut self, id: u64, result: Result<Vec<u8>, CallError>, now: Instant, peers: &impl Peers) {
        if let Some(call) = self.calls.remove(&id) {
            self.end_call(call, result, now, peers);
        }
    }

    /// [`CallCore::finish_call`] of a call already taken out of `calls`.
    fn end_call(&mut self, call: Call, result: Result<Vec<u8>, CallError>, now: Instant, peers: &impl Peers) {
        let op_id = call.op;
        let Some(op) = self.ops.get_mut(&op_id) else {
            return;
        };
        let deadline = op.deadline;
        match &mut op.state {
            State::Request => self.settle(op_id, Settled::Answer(result)),
            State::Map {
                entries,
                open,
                remote,
            } => {
                if call.entry == BRIDGE_ENTRY {
                    if let Some((bridge, done)) = remote.bridge.as_mut().filter(|(_, done)| !*done) {
                        *done = true;
                        *open -= 1;
                        let bridge = *bridge;
                        remote_entries(&mut remote.entries, bridge, result);
                    }
                } else if let Some(entry) = entries.get_mut(call.entry).filter(|e| e.1.is_none()) {
                    entry.1 = Some(result.map_err(MapError::from_call));
                    *open -= 1;
                }
                if *open == 0 {
                    let settled = close_map(entries, remote);
                    self.settle(op_id, settled);
                }
            }
            State::Consume {
                delivery,
                refused,
                attempts,
                current,
                unreachable,
                ..
            } => {
                let mut worker = current
                    .take()
                    .unwrap_or(WorkerId::local(call.target, call.generation));
                match result {
                    Ok(body) => {
                        if call.bridged {
                            // Who ran it, on which host.
                            if let Some((host, slot, generation)) = wire::parse_consumer(&body) {
                                worker = WorkerId {
                                    host: HostId::of(host),
                                    slot,
                                    generation,
                                };
                            }
                        }
                        let done = Consumed {
                            worker,
                            delivery_id: *delivery,
                            attempts: *attempts,
                        };
                        self.settle(op_id, Settled::Consumed(Ok(done)));
                    }
                    Err(CallError::NoHandler) => {
                        refused.push(call.target);
                        self.consume_next(op_id, peers);
                    }
                    Err(CallError::HostUnreachable(why)) if call.bridged => {
                        refused.push(call.target);
                        *unreachable = Some(why);
                        self.consume_next(op_id, peers);
                    }
                    // Past the deadline a redelivery could only time out,
                    // after running the task once more somewhere.
                    Err(CallError::WorkerDied) if now >= deadline => {
                        self.settle(op_id, Settled::Consumed(Err(CallError::TimedOut)));
                    }
                    Err(CallError::WorkerDied) => {
                        tracing::info!(
                            delivery = *delivery,
                            worker = call.target,
                            "consume: worker died, redelivering"
                        );
                        if call.bridged {
                            // The bridge's successor may take it again.
                            self.consume_next_or_wait(op_id, now, peers);
                        } else {
                            self.consume_next(op_id, peers);
                        }
                    }
                    Err(e) => self.settle(op_id, Settled::Consumed(Err(e))),
                }
            }
            State::Invoke {
                retry,
                calling,
                look_at,
                eager,
                ..
            } => {
                *calling = false;
                *eager = false;
                match result {
                    Err(CallError::WorkerDied) if *retry => self.invoke_next(op_id, now, peers),
                    Err(CallError::WorkerDied) => {
                        self.settle(op_id, Settled::Answer(Err(CallError::LeaderDied)))
                    }
                    // A stale view (the leadership moved meanwhile): ask again.
                    Err(CallError::HandlerFailed(e)) if leader::is_not_leader(&e) => {
                        if now >= deadline {
                            self.settle(op_id, Settled::Answer(Err(CallError::NoLeader)));
                        } else {
                            *look_at = Some(now + NOT_LEADER_RETRY);
                        }
                    }
                    other => self.settle(op_id, Settled::Answer(other)),
                }
            }
        }
    }

    /// [`CallCore::consume_next`] after the host's bridge died with the
    /// task: if nobody can take it now (no worker here has a handler, and
    /// the bridge is not back yet), it waits for the bridge's successor,
    /// looking every [`LEADER_POLL`], until its deadline.
    fn consume_next_or_wait(&mut self, id: OpId, now: Instant, peers: &impl Peers) {
        let nobody = match self.ops.get(&id) {
            Some(Operation {
                state: State::Consume { refused, .. },
                ..
            }) => self.pick_consumer(refused, peers).is_none(),
            _ => return,
        };
        if !nobody {
            return self.consume_next(id, peers);
        }
        if let Some(Operation {
            state: State::Consume { look_at, .. },
            ..
        }) = self.ops.get_mut(&id)
        {
            *look_at = Some(now + LEADER_POLL);
        }
    }

    /// A consume's next attempt: the worker [`CallCore::pick_consumer`]
    /// picks among those that have not refused it; `NoHandler` when there
    /// is none.
    fn consume_next(&mut self, id: OpId, peers: &impl Peers) {
        if let Some(Operation {
            state: State::Consume { look_at, .. },
            ..
        }) = self.ops.get_mut(&id)
        {
            *look_at = None;
        }
        let pick = match self.ops.get(&id) {
            Some(Operation {
                state: State::Consume { refused, .. },
                ..
            }) => self.pick_consumer(refused, peers),
            _ => return,
        };
        let Some((peer, spill)) = pick else {
            let error = match self.ops.get_mut(&id) {
                Some(Operation {
                    state: State::Consume { unreachable, .. },
                    ..
                }) => unreachable
                    .take()
                    .map_or(CallError::NoHandler, CallError::HostUnreachable),
                _ => CallError::NoHandler,
            };
            self.settle(id, Settled::Consumed(Err(error)));
            return;
        };
        if spill {
            self.spill_consume(id, peer);
            return;
        }
        if self.sticky.is_some_and(|(_, streak)| streak >= CONSUME_STREAK) {
            // A move after a streak: the next one starts after this worker.
            self.turn = peer.slot.wrapping_add(1);
        }
        self.sticky = match self.sticky {
            Some((slot, streak)) if slot == peer.slot => Some((slot, streak.saturating_add(1))),
            _ => Some((peer.slot, 1)),
        };
        let Some(Operation {
            deadline,
            state:
                State::Consume {
                    bytes,
                    attempts,
                    current,
                    ..
                },
        }) = self.ops.get_mut(&id)
        else {
            return;
        };
        *attempts += 1;
        *current = Some(peer);
        let (bytes, deadline) = (bytes.clone(), *deadline);
        self.send_call(id, peer, wire::CONSUME, bytes, None, 0, deadline);
    }

    /// The worker a consume goes to, among the live ones not `refused`:
    /// the first by, in order,
    ///
    /// 1. not draining;
    /// 2. the fewest tasks in hand: this core's calls in flight to it, a
    ///    consume's handler running there ([`Backlog::busy`]) and a
    ///    non-empty inbox count one each. So no worker with a task in
    ///    flight is handed another while a free one exists, whoever the
    ///    callers are;
    /// 3. the fewest bytes in its inbox;
    /// 4. not the sticky worker after [`CONSUME_STREAK`] tasks in a row
    ///    (the spill-over rule: the work moves on, so that every worker
    ///    gets some);
    /// 5. running rather than parked: a task to a parked worker pays a
    ///    futex wake and a scheduler round trip (30–60 µs on 2 vCPUs),
    ///    one to a running worker a cache miss. Not when the work moves
    ///    on after a streak: then it goes round-robin (7), parked or not,
    ///    or two running workers (the caller itself, say) would pass it
    ///    back and forth and the parked ones never get any;
    /// 6. the sticky worker (the last one picked), whose caches are warm
    ///    and who was running a moment ago;
    /// 7. round-robin from the slot after the last move after a streak.
    ///
    /// Without 4–6, a tie went round-robin, which with more workers than
    /// cores mostly picked a parked worker: the messenger bench's
    /// sequential `consume` ran 23 k tasks/s with 4 workers on 2 vCPUs
    /// (and 19 k with 8); see docs/DESIGN.md for the figures with them.
    ///
    /// Steps 2–3 read the worker's lanes and handler state; they are read
    /// only for the workers that can still win (candidates are sorted by
    /// the rest first), usually one.
    ///
    /// Then, with other hosts (feature `nats`), the spill-over rule across
    /// hosts, local first: the task goes to the host's bridge, which sends
    /// it to another host, when no worker here can take it at once — none
    /// left that has not refused it (no handler here), or the best one
    /// here already has a task in hand or is draining while the bridge sees
    /// another host connected. The answer's second half says whether it
    /// spills.
    fn pick_consumer(&self, refused: &[u32], peers: &impl Peers) -> Option<(WorkerId, bool)> {
        let local = self.pick_local_consumer(refused, peers);
        let free_here = local.is_some_and(|(rank, _)| rank.in_hand == 0 && !rank.draining);
        // A busy worker here beats a bridge that sees no other host; with
        // nobody here at all, the bridge is asked anyway (a bridge just
        // started may not have heard the others yet).
        if !free_here && (local.is_none() || peers.remote_hosts() > 0) {
            if let Some(bridge) = peers.bridge().filter(|b| !refused.contains(&b.slot)) {
                return Some((bridge, true));
            }
        }
        local.map(|(_, peer)| (peer, false))
    }

    /// A consume's call to the host's bridge: the time left, then the
    /// task ([`wire::BRIDGE_CONSUME`]). It does not move the sticky
    /// worker: the next task looks here first again.
    fn spill_consume(&mut self, id: OpId, bridge: WorkerId) {
        let now = self.now;
        let Some(Operation {
            deadline,
            state:
                State::Consume {
                    bytes,
                    attempts,
                    current,
                    ..
                },
        }) = self.ops.get_mut(&id)
        else {
            return;
        };
        *attempts += 1;
        *current = Some(bridge);
        let deadline = *deadline;
        let mut framed = Vec::with_capacity(8 + bytes.len());
        framed.extend_from_slice(&nanos_left(deadline, now).to_le_bytes());
        framed.extend_from_slice(bytes);
        self.send_call(id, bridge, wire::BRIDGE_CONSUME, framed, None, 0, deadline);
    }

    /// [`CallCore::pick_consumer`] among this host's workers, with the
    /// winner's rank.
    fn pick_local_consumer(&self, refused: &[u32], peers: &impl Peers) -> Option<(ConsumeRank, WorkerId)> {
        let n = peers.workers().max(1);
        let turn = self.turn % n;
        let spilling = self.sticky.is_some_and(|(_, streak)| streak >= CONSUME_STREAK);
        let mut candidates: Vec<(ConsumeRank, WorkerId)> = peers
            .live_workers()
            .into_iter()
            .filter(|p| !refused.contains(&p.slot))
            .map(|p| {
                let standing = peers.standing(p.slot);
                let in_flight = self.calls.values().filter(|c| c.target == p.slot).count();
                let sticky = self.sticky.filter(|&(s, _)| s == p.slot);
                let rank = ConsumeRank {
                    draining: standing.draining,
                    in_hand: u32::try_from(in_flight).unwrap_or(u32::MAX),
                    queued: 0,
                    spilled: sticky.is_some_and(|(_, streak)| streak >= CONSUME_STREAK),
                    parked: !standing.running && !spilling,
                    not_sticky: sticky.is_none(),
                    turn: (p.slot % n + n - turn) % n,
                };
                (rank, p)
            })
            .collect();
        candidates.sort_unstable_by_key(|c| c.0);
        // Each rank with its backlog is at least the rank without: stop at
        // the first candidate that can no longer beat the best.
        let mut best: Option<(ConsumeRank, WorkerId)> = None;
        for (without, peer) in candidates {
            if best.is_some_and(|(b, _)| without >= b) {
                break;
            }
            let backlog = peers.backlog(peer.slot);
            let rank = ConsumeRank {
                in_hand: without
                    .in_hand
                    .saturating_add(u32::from(backlog.busy) + u32::from(backlog.queued > 0)),
                queued: backlog.queued,
                ..without
            };
            if best.is_none_or(|(b, _)| rank < b) {
                best = Some((rank, peer));
            }
        }
        best
    }

    /// An invoke looks for the leader and calls it, or looks again soon.
    fn invoke_next(&mut self, id: OpId, now: Instant, peers: &impl Peers) {
        let leader = peers.leader();
        let Some(op) = self.ops.get_mut(&id) else { return };
        let deadline = op.deadline;
        let State::Invoke {
            bytes,
            calling,
            look_at,
            eager,
            ..
        } = &mut op.state
        else {
            return;
        };
        let target = leader.and_then(|(l, watch)| {
            peers
                .live_generation(l.slot)
                .map(|generation| (WorkerId::local(l.slot, generation), watch))
        });
        match target {
            Some((to, watch)) => {
                *calling = true;
                *look_at = None;
                *eager = false;
                let bytes = bytes.clone();
                self.send_call(id, to, wire::REQUEST, bytes, watch, 0, deadline);
            }
            None if now >= deadline => self.settle(id, Settled::Answer(Err(CallError::NoLeader))),
            None => {
                *look_at = Some(now + LEADER_POLL);
                *eager = true;
            }
        }
    }
}

#[cfg(test)]
mod tests;
