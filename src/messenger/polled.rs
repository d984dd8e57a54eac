//! A driver of the call core for an event loop that owns the messenger on
//! its own thread (the Node.js binding in `node/`): calls started without
//! waiting and their ends taken later, and one non-blocking turn that
//! parks the worker on its slot's eventfd for the loop to poll.
//!
//! The blocking driver (`calls.rs`) waits inside each call; the tokio
//! driver (`async_rt/`) runs on a task of its own and hands ends back
//! through channels. Here the loop's thread is the messenger's thread:
//!
//! 1. start calls with [`Messenger::start_request_bytes`],
//!    [`Messenger::start_map_bytes`], [`Messenger::start_consume_bytes`],
//!    [`Messenger::start_invoke_bytes`], [`Messenger::start_publish_bytes`]
//!    (each returns a [`CallTicket`] at once), and subscribe with
//!    [`Messenger::subscribe_polled_bytes`] (nothing waits for a leader);
//! 2. call [`Messenger::turn`] whenever the loop wakes: it runs the
//!    handlers of what has arrived and moves the calls on; when nothing is
//!    left it parks the slot with `PARKED_FD` ([`Turn::Parked`]), so a
//!    sender writes the slot's eventfd ([`Messenger::wake_fd`]), which the
//!    loop polls; after that wake, [`Messenger::unpark`] and turn again;
//! 3. take the ends with [`Messenger::take_finished`], and come back by
//!    [`Messenger::next_due`] at the latest (deadlines, deaths).

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use super::calls::{check_cross_host, LivePeers};
use super::core::{Op, Settled};
use super::dispatch::Done;
use super::encode::encode_call_bytes;
use super::error::{CallError, DispatchError, MapError};
use super::leader::invoke_event;
use super::{Consumed, Messenger, WorkerId};
use crate::segment::Segment;

/// A call started by one of the `start_*` methods: its end is handed back
/// with this by [`Messenger::take_finished`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CallTicket(pub u64);

/// How a started call ended.
#[derive(Debug)]
#[non_exhaustive]
pub enum Finished {
    /// A request's or an invoke's answer (the handler's bytes); a
    /// publish's end (empty bytes).
    Answer(Result<Vec<u8>, CallError>),
    /// A map's entries, one per worker live at its start, in slot order.
    Map(Vec<(WorkerId, Result<Vec<u8>, MapError>)>),
    /// A consume's end.
    Consumed(Result<Consumed, CallError>),
}

/// What [`Messenger::turn`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// It handled something: more may be waiting, turn again (after
    /// letting the loop's other work in, if it likes).
    Busy,
    /// Nothing was waiting: the slot is parked on its eventfd
    /// (`PARKED_FD`). Wait for the eventfd to be readable (or
    /// [`Messenger::next_due`]), then call [`Messenger::unpark`].
    Parked,
    /// Nothing was waiting, but there is no eventfd to park on (a process
    /// without them): a thread of the caller's parks with an
    /// [`IdleWaiter`] and wakes the loop its own way (or the caller comes
    /// back on a timer).
    Idle,
}

/// For an event loop without the slot's eventfd: a thread of its own
/// parks on the slot's futex after a [`Turn::Idle`], and wakes the loop
/// when a message (or the outbox) rings, as the tokio driver's waiter
/// thread does. Two wakes per message that finds the loop asleep (the
/// futex, then the loop's own), against one for the eventfd.
#[derive(Clone, Debug)]
pub struct IdleWaiter {
    segment: Segment,
    slot: u32,
}

impl IdleWaiter {
    /// Parks until a doorbell of the slot rings or `timeout` passes.
    /// Call it only after a [`Turn::Idle`] of the messenger, once per
    /// turn (a ring between the turn and the park ends the park at once).
    pub fn wait(&self, timeout: Duration) {
        crate::wake::park(
            self.segment.park(self.slot),
            self.segment.bells(self.slot),
            timeout,
        );
    }
}

impl Messenger {
    /// Starts `request` to `worker` with raw bytes, without waiting: its
    /// end comes out of [`Messenger::take_finished`] (at `deadline` at the
    /// latest, if the messenger is turned by then).
    ///
    /// # Errors
    /// Known at once: `EventName`, `TooLarge`. The others (`NoSuchWorker`,
    /// `NoHandler`, ...) are the call's end.
    pub fn start_request_bytes(
        &mut self,
        worker: u32,
        event: &str,
        data: &[u8],
        deadline: Instant,
    ) -> Result<CallTicket, CallError> {
        let bytes = encode_call_bytes(event, 0, data, self.max_payload)?;
        self.count(event, |s| s.sent += 1);
        Ok(self.start_polled(Op::Request { to: worker, bytes }, deadline))
    }

    /// Starts `map` with raw bytes, without waiting (see
    /// [`Messenger::start_request_bytes`]).
    ///
    /// # Errors
    /// `EventName`, `TooLarge`; `HostUnreachable` for a map that would
    /// cross hosts with a payload they cannot carry.
    pub fn start_map_bytes(
        &mut self,
        event: &str,
        data: &[u8],
        deadline: Instant,
    ) -> Result<CallTicket, CallError> {
        let bytes = encode_call_bytes(event, 0, data, self.max_payload)?;
        check_cross_host(&self.view(), event, &bytes)?;
        Ok(self.start_polled(Op::Map { bytes }, deadline))
    }

    /// Starts `consume` with raw bytes, without waiting (see
    /// [`Messenger::start_request_bytes`]); at least once, as
    /// [`Messenger::consume`].
    ///
    /// # Errors
    /// `EventName`, `TooLarge`.
    pub fn start_consume_bytes(
        &mut self,
        event: &str,
        data: &[u8],
        deadline: Instant,
    ) -> Result<CallTicket, CallError> {
        let delivery = self.new_delivery_id();
        let bytes = encode_call_bytes(event, delivery, data, self.max_payload)?;
        self.count(event, |s| s.sent += 1);
        Ok(self.start_polled(Op::Consume { delivery, bytes }, deadline))
    }

    /// Starts `invoke` of the leader's `method` with raw bytes, without
    /// waiting (see [`Messenger::start_request_bytes`]): it goes through
    /// the call core as [`Messenger::invoke_bytes`] does, so it waits for
    /// a leader until `deadline` (then `NoLeader`), asks again if the
    /// worker it asked no longer leads, and ends `LeaderDied` if the
    /// leader dies with the call in hand. Ends as [`Finished::Answer`].
    ///
    /// # Errors
    /// Known at once: `EventName`, `TooLarge`.
    pub fn start_invoke_bytes(
        &mut self,
        method: &str,
        data: &[u8],
        deadline: Instant,
    ) -> Result<CallTicket, CallError> {
        self.start_invoke_inner(method, data, deadline, false)
    }

    /// [`Messenger::start_invoke_bytes`] of a method that is safe to run
    /// twice: if the leader dies with it in hand, it goes to the next
    /// leader (as [`Messenger::invoke_idempotent`]), so it never ends
    /// `LeaderDied`.
    ///
    /// # Errors
    /// As [`Messenger::start_invoke_bytes`].
    pub fn start_invoke_idempotent_bytes(
        &mut self,
        method: &str,
        data: &[u8],
        deadline: Instant,
    ) -> Result<CallTicket, CallError> {
        self.start_invoke_inner(method, data, deadline, true)
    }

    fn start_invoke_inner(
        &mut self,
        method: &str,
        data: &[u8],
        deadline: Instant,
        retry: bool,
    ) -> Result<CallTicket, CallError> {
        let bytes = encode_call_bytes(&invoke_event(method), 0, data, self.max_payload)?;
        Ok(self.start_leader_call(bytes, retry, deadline))
    }

    /// Starts a call to the default role's leader ([`Op::Invoke`]) of an
    /// encoded message: invoke, and publish (whose handler every worker
    /// has).
    pub(super) fn start_leader_call(&mut self, bytes: Vec<u8>, retry: bool, deadline: Instant) -> CallTicket {
        // Follow the default role's terms from now on (`check_leaders`),
        // and know its lock entry before the core looks for the leader.
        self.follow_leader();
        self.leader_entry_lookup();
        self.start_polled(Op::Invoke { bytes, retry }, deadline)
    }

    fn start_polled(&mut self, op: Op, deadline: Instant) -> CallTicket {
        self.batch_answers = true;
        let peers = LivePeers::new(&self.segment, self.me(), self.leader_entry());
        let id = self.core.start(op, deadline, Instant::now(), &peers);
        self.remote.insert(id, Done::Polled);
        self.pump();
        CallTicket(id)
    }

    /// The ends of started calls, oldest first.
    pub fn take_finished(&mut self) -> Vec<(CallTicket, Finished)> {
        self.route_settled();
        self.polled
            .drain(..)
            .map(|(op, settled)| {
                let finished = match settled {
                    Settled::Answer(r) => Finished::Answer(r),
                    Settled::Map(entries) => Finished::Map(entries),
                    Settled::Consumed(r) => Finished::Consumed(r),
                };
                (CallTicket(op), finished)
            })
            .collect()
    }

    /// One non-blocking turn: runs the handlers of what has arrived, sends
    /// what is queued, moves started calls on (answers, deaths,
    /// deadlines); with nothing left, parks the slot on its eventfd.
    ///
    /// Handlers run inside; they must not block (an event loop's handler
    /// queues the message for the loop, and answers later with a
    /// [`super::BytesReply`]).
    ///
    /// # Errors
    /// [`DispatchError::Corrupt`], as [`Messenger::dispatch`] (call again to
    /// keep serving the other lanes).
    pub fn turn(&mut self) -> Result<Turn, DispatchError> {
        let fd = self.segment.wake_fd(self.slot).is_some();
        match self.async_turn(fd)? {
            false => Ok(Turn::Busy),
            true if fd => Ok(Turn::Parked),
            true => Ok(Turn::Idle),
        }
    }

    /// After [`Turn::Parked`] and the wait that followed it (the eventfd
    /// readable, or a timer): the slot is running again.
    pub fn unpark(&self) {
        self.worker.endpoint_ref().park_fd_end();
    }

    /// This slot's eventfd, if this process has the segment's eventfds: a
    /// sender writes it when it finds the slot parked by
    /// [`Messenger::turn`]. The reader reads the count (non-blocking).
    pub fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        self.segment.wake_fd(self.slot)
    }

    /// What a thread of an event loop without the eventfd parks with
    /// ([`Turn::Idle`]).
    pub fn idle_waiter(&self) -> IdleWaiter {
        IdleWaiter {
            segment: self.segment.clone(),
            slot: self.slot,
        }
    }

    /// Turns like [`Messenger::turn`] but never parks on the eventfd:
    /// [`Turn::Idle`] instead of [`Turn::Parked`] (for an
    /// [`IdleWaiter`]).
    ///
    /// # Errors
    /// As [`Messenger::turn`].
    pub fn turn_idle(&mut self) -> Result<Turn, DispatchError> {
        match self.async_turn(false)? {
            false => Ok(Turn::Busy),
            true => Ok(Turn::Idle),
        }
    }

    /// The latest time to turn again while started calls wait (their
    /// deadlines, and every few milliseconds to see a target die); `None`
    /// with no call waiting.
    pub fn next_due(&self) -> Option<Instant> {
        self.remote_due()
    }
}
