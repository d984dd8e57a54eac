//! Serving: the outbox other threads queue into, sending (`deliver`,
//! streamed, to itself), and dispatching what arrives — the messenger's
//! receive loop, which also feeds the call core its answers, deaths and
//! time, and hands finished calls of other threads back.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::calls::LivePeers;
use super::core::{Op, OpId, Settled};
use super::error::{CallError, CorruptLane, DispatchError, EmitError};
use super::handlers::handle_message;
use super::{wire, Messenger};
use crate::endpoint::Interrupt;
use crate::segment::Segment;
use crate::{RecvError, SendError, Tag, TryRecvError, TrySendError};

/// Messages queued by other threads (handles, deferred replies) for the
/// messenger's thread to send.
pub(super) struct Outbox {
    pub(super) queue: Mutex<Vec<(u32, Tag, Vec<u8>)>>,
    /// Calls made from other threads ([`super::MessengerHandle`], the
    /// async messenger).
    pub(super) calls: Mutex<Vec<RemoteCall>>,
    /// Called once everything queued before them has been sent
    /// (`AsyncMessenger::flush`).
    pub(super) barriers: Mutex<Vec<Box<dyn FnOnce() + Send>>>,
    pub(super) nonempty: AtomicBool,
    pub(super) segment: Segment,
    pub(super) slot: u32,
}

/// A call made on another thread: the messenger's thread runs it in its
/// call core and hands its end back through `done`.
pub(super) struct RemoteCall {
    pub(super) op: Op,
    pub(super) deadline: Instant,
    pub(super) done: Done,
}

/// Where a remote call's end goes: the channel its caller waits on.
pub(super) enum Done {
    /// A thread blocked in [`super::MessengerHandle::request`]; it waits
    /// until the deadline, when the core ends the call.
    Thread(std::sync::mpsc::Sender<Settled>),
    /// An async task. Its future may be dropped (a timeout, a `select!`):
    /// the channel then closes, and the core forgets the operation instead
    /// of running it on, a consume's redeliveries included.
    #[cfg(feature = "tokio")]
    Task(tokio::sync::oneshot::Sender<Settled>),
    /// A call of this thread's own event-loop driver
    /// ([`Messenger::start_request_bytes`] and the like): its end waits in
    /// the messenger until [`Messenger::take_finished`].
    Polled,
}

impl Done {
    /// Hands the end over (a caller that has gone gets nothing).
    fn send(self, settled: Settled) {
        match self {
            Done::Thread(tx) => {
                let _ = tx.send(settled);
            }
            #[cfg(feature = "tokio")]
            Done::Task(tx) => {
                let _ = tx.send(settled);
            }
            // Kept by `route_settled`, never sent.
            Done::Polled => {}
        }
    }

    /// Whether the caller has gone and the call can be forgotten.
    fn caller_gone(&self) -> bool {
        match self {
            Done::Thread(_) | Done::Polled => false,
            #[cfg(feature = "tokio")]
            Done::Task(tx) => tx.is_closed(),
        }
    }
}

impl Outbox {
    pub(super) fn push(&self, to: u32, tag: Tag, bytes: Vec<u8>) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((to, tag, bytes));
        self.wake();
    }

    pub(super) fn push_call(&self, call: RemoteCall) {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).push(call);
        self.wake();
    }

    pub(super) fn wake(&self) {
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

/// Takes a received message out of its lane. A consume marks slot `me`
/// busy first, for the callers that pick a worker for their next consume
/// ([`crate::cluster::ClusterView::consume_backlog`]): the mark is stored
/// before the lane's head moves (a release store), so a caller sees a
/// one-record task in the lane or in hand (a task in fragments has left
/// the lane when it gets here: for those the mark is a late hint).
///
/// A message lent in place is copied into a spare buffer: a request and
/// its reply allocated four buffers a round trip before (one copy out
/// of the lane each way, the request, the reply), now none in the steady
/// state.
fn take(segment: &Segment, me: u32, spare: &mut Vec<Vec<u8>>, m: crate::Received<'_>) -> crate::Message {
    let tag = m.tag();
    if tag.kind == wire::CONSUME {
        segment.stats_entry(me).consume_busy.store(1, Relaxed);
    }
    if !m.is_in_lane() {
        return m.into_message();
    }
    let mut payload = buffer(spare);
    payload.extend_from_slice(m.payload());
    crate::Message {
        sender: m.sender(),
        generation: m.generation(),
        kind: tag.kind,
        correlation: tag.correlation,
        payload,
    }
}

/// Buffers a messenger keeps for reuse, at most.
const SPARE_BUFFERS: usize = 8;
/// The largest buffer kept for reuse: larger ones go back to the allocator.
const SPARE_CAPACITY: usize = 4096;

/// A buffer for a message: a spare one, or a new one.
pub(super) fn buffer(spare: &mut Vec<Vec<u8>>) -> Vec<u8> {
    spare.pop().unwrap_or_else(|| Vec::with_capacity(64))
}

/// Keeps `buf` for a later message, if it is small and there is room.
pub(super) fn recycle(spare: &mut Vec<Vec<u8>>, mut buf: Vec<u8>) {
    if buf.capacity() <= SPARE_CAPACITY && spare.len() < SPARE_BUFFERS {
        buf.clear();
        spare.push(buf);
    }
}

/// When a send that finds the lane full gives up.
#[derive(Debug, Clone, Copy)]
enum Until {
    At(Instant),
    /// This long after the lane was first found full.
    After(Duration),
}

impl Until {
    fn at(self, now: Instant) -> Instant {
        match self {
            Until::At(t) => t,
            Until::After(d) => now + d,
        }
    }
}

impl Messenger {
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
    pub(super) fn deliver(
        &mut self,
        to: u32,
        tag: Tag,
        bytes: Vec<u8>,
        deadline: Option<Instant>,
    ) -> Result<(), EmitError> {
        self.deliver_until(to, tag, bytes, deadline.map(Until::At))
    }

    /// [`Messenger::deliver`], with a deadline that may be relative to the
    /// first time the lane is found full ([`Until::After`]): a reply reads
    /// no clock when there is room, as there almost always is.
    fn deliver_until(
        &mut self,
        to: u32,
        tag: Tag,
        bytes: Vec<u8>,
        mut deadline: Option<Until>,
    ) -> Result<(), EmitError> {
        if to >= self.workers {
            return Err(EmitError::NoSuchWorker { slot: to });
        }
        let bytes = if tag.kind == wire::REPLY {
            self.fit_reply(bytes)
        } else if bytes.len() > self.max_message {
            // Calls are checked when encoded; this is a bug's safety net.
            return Err(EmitError::TooLarge {
                len: bytes.len(),
                max: self.max_message,
            });
        } else {
            bytes
        };
        if to == self.slot {
            return Ok(self.deliver_local(tag, bytes)?);
        }
        let me = self.slot;
        let corrupt = |slot, error| {
            EmitError::Corrupt(CorruptLane {
                from: me,
                to: slot,
                error,
            })
        };
        let single = self.ep().max_reservation();
        loop {
            if bytes.len() > single {
                // Streamed in fragments: only a blocking send can do it.
                let deadline = deadline.map(|d| d.at(Instant::now()));
                return match self.send_streamed(to, tag, bytes, deadline) {
                    Ok(()) => Ok(()),
                    // `SelfFull` cannot be: nothing to itself crosses a lane.
                    Err(SendError::Timeout(_) | SendError::SelfFull(_)) => Err(EmitError::TimedOut),
                    Err(SendError::NoSuchWorker { slot, .. }) => Err(EmitError::NoSuchWorker { slot }),
                    Err(SendError::TooLarge { len, max }) => Err(EmitError::TooLarge { len, max }),
                    Err(SendError::Corrupt { slot, error, .. }) => Err(corrupt(slot, error)),
                };
            }
            match self.worker.endpoint().try_send_tagged(to, tag, &bytes) {
                Ok(()) => {
                    recycle(&mut self.spare, bytes);
                    return Ok(());
                }
                Err(TrySendError::Full(_)) => {}
                Err(TrySendError::TooLarge { len, max }) => return Err(EmitError::TooLarge { len, max }),
                Err(TrySendError::NoSuchWorker { slot, .. }) => return Err(EmitError::NoSuchWorker { slot }),
                Err(TrySendError::Corrupt { slot, error, .. }) => return Err(corrupt(slot, error)),
            }
            let now = Instant::now();
            let until = deadline.map(|d| d.at(now));
            deadline = until.map(Until::At);
            if until.is_some_and(|d| now >= d) {
                return Err(EmitError::TimedOut);
            }
            if self.live_generation(to).is_none() {
                // A full lane to a slot nobody serves: it would wait for a
                // successor that may never come (a crash-looping slot).
                return Err(EmitError::WorkerDied);
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
        let text = EmitError::TooLarge {
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
    fn deliver_local(&mut self, tag: Tag, bytes: Vec<u8>) -> Result<(), DispatchError> {
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
    fn handle_local(&mut self) -> Result<bool, DispatchError> {
        let Some(message) = self.local.pop_front() else {
            return Ok(false);
        };
        self.local_bytes -= message.payload.len();
        let outer = std::mem::replace(&mut self.in_local, true);
        let reply = self.run_handlers(message);
        let sent = reply.map_or(Ok(()), |reply| self.send_handler_reply(reply));
        self.in_local = outer;
        sent.map(|()| true)
    }

    /// Runs one message's handlers (an answer goes to the call core);
    /// returns the reply to send, if any. A consume's handler has ended
    /// then: this worker is no longer busy (see [`take`]), before its
    /// answer goes, so that a caller that gets the answer finds it free.
    fn run_handlers(&mut self, message: crate::Message) -> Option<(u32, Tag, Vec<u8>)> {
        if message.kind != wire::REPLY {
            if let Some(hook) = self.bridge_hook.as_mut() {
                // The host's bridge: what workers send it crosses hosts.
                hook(super::handlers::bridge_incoming(message, &self.outbox));
                return None;
            }
        }
        let consume = message.kind == wire::CONSUME;
        let (segment, me, entry) = (&self.segment, self.me(), self.leader_entry());
        let core = &mut self.core;
        let reply = handle_message(
            message,
            self.generation,
            &mut self.handlers,
            |sender, correlation, status, body| {
                let peers = LivePeers::new(segment, me, entry);
                core.handle_reply(sender, correlation, status, body, &peers);
            },
            &self.outbox,
            &self.stats,
            &mut self.spare,
        );
        if consume {
            self.segment.stats_entry(self.slot).consume_busy.store(0, Relaxed);
        }
        reply
    }

    /// Sends every message the call core asks for; one that cannot go ends
    /// its call.
    pub(super) fn pump(&mut self) {
        while let Some(t) = self.core.poll_transmit() {
            if let Err(e) = self.deliver(t.to, t.tag, t.bytes, Some(t.deadline)) {
                let peers = LivePeers::new(&self.segment, self.me(), self.leader_entry());
                self.core
                    .send_failed(t.call, CallError::from(e), Instant::now(), &peers);
            }
        }
    }

    /// Hands the ends of other threads' calls back; this thread's own stay
    /// in the core for their callers ([`Messenger::call`]).
    pub(super) fn route_settled(&mut self) {
        if self.remote.is_empty() {
            return;
        }
        loop {
            let remote = &self.remote;
            let Some((op, settled)) = self.core.poll_settled_where(|op| remote.contains_key(&op)) else {
                return;
            };
            match self.remote.remove(&op) {
                Some(Done::Polled) => self.polled.push_back((op, settled)),
                Some(done) => done.send(settled),
                None => {}
            }
        }
    }

    /// Ends the calls whose target died. Runs at least every
    /// `liveness_slice` while calls wait, and at once when the master
    /// counts a death: the wait for a message ends then (see
    /// [`crate::endpoint::Interrupt`]), so a caller learns of a reaped
    /// target within microseconds, not at its next periodic look.
    pub(super) fn check_liveness(&mut self, now: Instant) {
        // Before the checks: a death counted after this load ends the next
        // wait, so none is missed.
        self.deaths_seen = self.view().deaths();
        if self.core.waiting() {
            let peers = LivePeers::new(&self.segment, self.me(), self.leader_entry());
            self.core.handle_deaths(now, &peers);
        }
    }

    // ------------------------------------------------------------ dispatch

    /// Runs the handlers of every message that has arrived, without
    /// waiting. Returns how many messages it handled.
    ///
    /// # Errors
    /// [`DispatchError::Corrupt`] if a lane holds garbage (that lane is
    /// poisoned; call again to keep serving the others).
    pub fn dispatch(&mut self) -> Result<usize, DispatchError> {
        self.dispatch_until(None)
    }

    /// Waits up to `timeout` for messages and runs their handlers; returns
    /// how many it handled (0 after the timeout with nothing).
    ///
    /// # Errors
    /// As [`Messenger::dispatch`].
    pub fn poll(&mut self, timeout: Duration) -> Result<usize, DispatchError> {
        self.dispatch_until(Some(Instant::now() + timeout))
    }

    /// Serves messages until the cluster asks this worker to stop (drain or
    /// shutdown). Without a master, until `stop` returns true (checked
    /// every 50 ms and after each message).
    ///
    /// # Errors
    /// As [`Messenger::dispatch`].
    pub fn run_until(&mut self, mut stop: impl FnMut(&Self) -> bool) -> Result<(), DispatchError> {
        // The 50 ms bound of a wait is kept while messages come, so a busy
        // loop reads no clock of its own per message.
        let mut until = Instant::now() + Duration::from_millis(50);
        loop {
            let should_stop = self.worker.should_stop();
            if should_stop || stop(self) {
                return Ok(());
            }
            if self.dispatch_until(Some(until))? == 0 {
                until = Instant::now() + Duration::from_millis(50);
            }
        }
    }

    /// Serves messages until this worker is told to stop.
    ///
    /// # Errors
    /// As [`Messenger::dispatch`].
    pub fn run(&mut self) -> Result<(), DispatchError> {
        self.run_until(|_| false)
    }

    /// Sends what other threads queued, and starts the calls they made.
    fn flush_outbox(&mut self) {
        // A plain load first: the swap is a locked instruction, and the
        // outbox is empty on almost every turn.
        if self.in_flush || !self.outbox.nonempty.load(Relaxed) || !self.outbox.nonempty.swap(false, AcqRel) {
            return;
        }
        self.in_flush = true;
        self.flush_outbox_now();
        self.in_flush = false;
    }

    fn flush_outbox_now(&mut self) {
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
            if matches!(call.op, Op::Invoke { .. }) {
                self.leader_entry_lookup();
            }
            let peers = LivePeers::new(&self.segment, self.me(), self.leader_entry());
            let id = self.core.start(call.op, call.deadline, Instant::now(), &peers);
            self.remote.insert(id, call.done);
        }
        self.pump();
    }

    /// Looks at other threads' calls: deaths and deadlines.
    fn settle_remote(&mut self) {
        if !self.remote.is_empty() {
            let gone: Vec<OpId> = self
                .remote
                .iter()
                .filter(|(_, done)| done.caller_gone())
                .map(|(&op, _)| op)
                .collect();
            for op in gone {
                self.core.abandon(op);
                self.remote.remove(&op);
            }
            let now = Instant::now();
            self.check_liveness(now);
            let peers = LivePeers::new(&self.segment, self.me(), self.leader_entry());
            self.core.handle_timeout(now, &peers);
            self.pump();
        }
        self.route_settled();
    }

    /// The next time other threads' calls must be looked at, if any.
    pub(super) fn remote_due(&self) -> Option<Instant> {
        if self.remote.is_empty() {
            return None;
        }
        let slice = Instant::now() + self.liveness_slice;
        Some(self.core.next_timeout().map_or(slice, |t| t.min(slice)))
    }

    /// Handles messages until none is waiting; with `until`, waits for the
    /// first one until then.
    pub(super) fn dispatch_until(&mut self, until: Option<Instant>) -> Result<usize, DispatchError> {
        if self.view().deaths() != self.deaths_seen {
            self.check_liveness(Instant::now());
            // What the deaths made the core send (a consume's redelivery,
            // an invoke's next leader) goes before this dispatch waits.
            self.pump();
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

    fn dispatch_inner(&mut self, until: Option<Instant>) -> Result<usize, DispatchError> {
        self.flush_outbox();
        let mut handled = 0;
        let mut wait = until;
        // A death ends the wait only for a messenger with calls waiting.
        let deaths = self.core.waiting().then_some(self.deaths_seen);
        let me = self.slot;
        let corrupt = |sender, error| {
            DispatchError::Corrupt(CorruptLane {
                from: sender,
                to: me,
                error,
            })
        };
        loop {
            if self.handle_local()? {
                handled += 1;
                wait = None;
                continue;
            }
            let received = match wait {
                Some(d) => {
                    let interrupt = Interrupt {
                        flag: &self.outbox.nonempty,
                        deaths,
                    };
                    match self.worker.endpoint().recv_ref_interruptible(Some(d), interrupt) {
                        Ok(m) => Some(take(&self.segment, me, &mut self.spare, m)),
                        Err(RecvError::Timeout) => None,
                        Err(RecvError::Corrupt { sender, error }) => return Err(corrupt(sender, error)),
                    }
                }
                None => match self.worker.endpoint().try_recv_ref() {
                    Ok(m) => Some(take(&self.segment, me, &mut self.spare, m)),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Corrupt { sender, error }) => return Err(corrupt(sender, error)),
                },
            };
            let Some(message) = received else {
                // Woken for the outbox, not for a message?
                if self.outbox.nonempty.load(Acquire) {
                    self.flush_outbox();
                    if !self.local.is_empty() || wait.is_some_and(|d| Instant::now() < d) {
                        continue;
                    }
                }
                return Ok(handled);
            };
            handled += 1;
            wait = None;
            let answer = message.kind == wire::REPLY;
            if let Some(reply) = self.run_handlers(message) {
                self.send_handler_reply(reply)?;
            }
            if answer && !self.batch_answers && self.core.has_settled() {
                // An operation ended: its caller goes on now, and what
                // else has arrived waits for the next dispatch (a look at
                // every lane less on a request's round trip).
                return Ok(handled);
            }
        }
    }

    /// Sends what a handler answered. The requester is live or its
    /// successor discards the reply, so only a corrupt lane is an error
    /// here; a reply that cannot go (its requester died with the lane
    /// full, or the wait for room timed out) is dropped.
    fn send_handler_reply(&mut self, (to, tag, bytes): (u32, Tag, Vec<u8>)) -> Result<(), DispatchError> {
        match self.deliver_until(to, tag, bytes, Some(Until::After(Duration::from_secs(5)))) {
            Ok(()) => Ok(()),
            Err(EmitError::Corrupt(c)) => Err(DispatchError::Corrupt(c)),
            Err(e) => {
                tracing::debug!(to, error = %e, "a reply could not be sent");
                Ok(())
            }
        }
    }

    /// One turn of an async driver: handles everything that has arrived
    /// (and the outbox); if there was nothing, makes the pre-park check and
    /// says whether the caller may wait. With `fd_park`, the wait is
    /// announced here (`PARKED_FD`) and the caller must call
    /// [`crate::Endpoint::park_fd_end`] after it.
    pub(super) fn async_turn(&mut self, fd_park: bool) -> Result<bool, DispatchError> {
        if self.dispatch_until(None)? > 0 {
            return Ok(false);
        }
        let message = match self.worker.endpoint().try_recv_before_park() {
            Ok(m) => m.map(|m| take(&self.segment, self.slot, &mut self.spare, m)),
            Err(RecvError::Corrupt { sender, error }) => {
                return Err(DispatchError::Corrupt(CorruptLane {
                    from: sender,
                    to: self.slot,
                    error,
                }))
            }
            Err(RecvError::Timeout) => return Ok(false),
        };
        if let Some(message) = message {
            if let Some(reply) = self.run_handlers(message) {
                self.send_handler_reply(reply)?;
            }
            return Ok(false);
        }
        // After the doorbell was taken (in `try_recv_before_park`): a death
        // counted, or work queued, since the dispatch above is seen here
        // even if its ring found the bit still set and woke nobody.
        if self.outbox.nonempty.load(Acquire)
            || !self.local.is_empty()
            || self.view().deaths() != self.deaths_seen
        {
            return Ok(false);
        }
        let ep = self.worker.endpoint_ref();
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
