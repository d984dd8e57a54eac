//! Receiving: polling the lanes the doorbell names, waiting when they are
//! empty, and lending what arrives.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::wait::{spin_then_park, Interrupt, Pace, Wait, WaitStrategy};
use super::{Endpoint, Message, Tag};
use crate::error::{LaneCorruption, RecvError, TryRecvError};
use crate::lane::{Next, RecordHeader};
use crate::segment::table::StatsEntry;
use crate::wake;

impl Endpoint {
    /// The next message from any lane: adds the doorbell's bits to the
    /// pending set (without clearing them, see [`wake`]) and polls.
    #[inline]
    pub(super) fn poll(&mut self) -> Result<Option<(u32, Next)>, (u32, LaneCorruption)> {
        // SAFETY: as in `Endpoint::bells` (made here so that it borrows
        // nothing of `self`, whose `pending` is written alongside).
        let bells = unsafe { std::slice::from_raw_parts(self.bells.as_ptr(), self.pending.len()) };
        wake::peek_doorbell(bells, &mut self.pending);
        self.mask_pending();
        self.scan()
    }

    /// A doorbell bit for a slot that does not exist (written by a buggy
    /// process) is dropped.
    #[inline]
    fn mask_pending(&mut self) {
        if let Some(last) = self.pending.last_mut() {
            *last &= self.pending_mask;
        }
    }

    /// Polls each pending lane once, round-robin from `cursor`, and returns
    /// the first message found. A lane found empty stays pending while its
    /// sender's doorbell bit is set (that sender will not ring again); one
    /// whose bit is clear is dropped, because its sender sets the bit on its
    /// next message and the next peek picks it up. So a spinning receiver
    /// polls only the lanes that are in use.
    #[inline]
    fn scan(&mut self) -> Result<Option<(u32, Next)>, (u32, LaneCorruption)> {
        let start = self.cursor;
        for (lo, hi) in [(start, self.workers), (0, start)] {
            let mut at = lo;
            while let Some(from) = self.next_pending(at, hi) {
                at = from + 1;
                let inbound = &mut self.inbound[from as usize];
                if inbound.poisoned.is_some() {
                    self.clear_pending(from);
                    continue;
                }
                match inbound.consumer.next() {
                    Ok(Some(next)) => {
                        self.cursor = if at == self.workers { 0 } else { at };
                        return Ok(Some((from, next)));
                    }
                    Ok(None) => {
                        let bell = &self.bells()[(from / 64) as usize];
                        if bell.load(Relaxed) & (1u64 << (from % 64)) == 0 {
                            self.clear_pending(from);
                        }
                    }
                    Err(error) => {
                        inbound.poisoned = Some(error);
                        self.clear_pending(from);
                        return Err((from, error));
                    }
                }
            }
        }
        Ok(None)
    }

    /// [`Self::poll`] that only looks: the first pending lane (round-robin,
    /// as [`Self::scan`]) whose head holds something, without reading it.
    /// The spinning receive's look: what it finds is read by the caller
    /// ([`Endpoint::recv_ref`], inlined), so that the header goes from the
    /// lane to the [`Received`] in registers. Returned from the spin loop
    /// through memory, the found record was stored field by field and
    /// copied on with wide loads, which stalled on store forwarding at
    /// every step: a send and a receive in one thread took 60 ns, 21 ns
    /// this way, and the spinning 64 B round trip went from 2.1-2.4x the
    /// one-cache-line ping-pong to 1.5-1.9x.
    #[inline(always)]
    fn poll_ready(&mut self) -> Option<u32> {
        // SAFETY: as in `poll`.
        let bells = unsafe { std::slice::from_raw_parts(self.bells.as_ptr(), self.pending.len()) };
        wake::peek_doorbell(bells, &mut self.pending);
        self.mask_pending();
        self.scan_ready()
    }

    /// [`Self::scan`] with [`crate::lane::Consumer::ready`] for `next`.
    #[inline(always)]
    fn scan_ready(&mut self) -> Option<u32> {
        let start = self.cursor;
        for (lo, hi) in [(start, self.workers), (0, start)] {
            let mut at = lo;
            while let Some(from) = self.next_pending(at, hi) {
                at = from + 1;
                let inbound = &mut self.inbound[from as usize];
                if inbound.poisoned.is_some() {
                    self.clear_pending(from);
                    continue;
                }
                if inbound.consumer.ready() {
                    self.cursor = if at == self.workers { 0 } else { at };
                    return Some(from);
                }
                let bell = &self.bells()[(from / 64) as usize];
                if bell.load(Relaxed) & (1u64 << (from % 64)) == 0 {
                    self.clear_pending(from);
                }
            }
        }
        None
    }

    /// Reads what [`Self::poll_ready`] found in `from`'s lane.
    #[inline(always)]
    fn next_from(&mut self, from: u32) -> Result<Option<Next>, RecvError> {
        let inbound = &mut self.inbound[from as usize];
        match inbound.consumer.next() {
            Ok(next) => Ok(next),
            Err(error) => {
                inbound.poisoned = Some(error);
                self.clear_pending(from);
                Err(RecvError::Corrupt { sender: from, error })
            }
        }
    }

    #[inline]
    fn clear_pending(&mut self, from: u32) {
        self.pending[(from / 64) as usize] &= !(1u64 << (from % 64));
    }

    /// The first pending sender in `at..hi`.
    #[inline]
    fn next_pending(&self, at: u32, hi: u32) -> Option<u32> {
        if at >= hi {
            return None;
        }
        let mut word = (at / 64) as usize;
        let mut bits = self.pending[word] & (u64::MAX << (at % 64));
        loop {
            if bits != 0 {
                let from = word as u32 * 64 + bits.trailing_zeros();
                return (from < hi).then_some(from);
            }
            word += 1;
            if word as u32 * 64 >= hi {
                return None;
            }
            bits = self.pending[word];
        }
    }

    /// On the way to sleep: takes (clears) the doorbell and polls every lane
    /// it named and every pending one. Returns a message if one turned up;
    /// otherwise every known lane is empty, the pending set is emptied, and
    /// the caller may park.
    #[cold]
    fn before_park(&mut self) -> Result<Option<(u32, Next)>, (u32, LaneCorruption)> {
        wake::take_doorbell(self.segment.bells(self.slot), &mut self.pending);
        self.mask_pending();
        let found = self.scan()?;
        if found.is_none() {
            self.pending.fill(0);
        }
        Ok(found)
    }

    /// [`Self::before_park`] for [`Self::wait_ready`].
    #[cold]
    fn before_park_ready(&mut self) -> Option<u32> {
        wake::take_doorbell(self.segment.bells(self.slot), &mut self.pending);
        self.mask_pending();
        let found = self.scan_ready();
        if found.is_none() {
            self.pending.fill(0);
        }
        found
    }

    /// Waits by the wait strategy, until `deadline`, for a lane whose head
    /// holds something, and returns its sender (see [`Self::poll_ready`]).
    /// Never inlined, as [`Self::wait_next`].
    #[inline(never)]
    fn wait_ready(&mut self, deadline: Option<Instant>) -> Result<u32, RecvError> {
        self.wait_ready_or(deadline, None)
    }

    /// [`Self::wait_ready`] that also returns (as `Timeout`) as soon as
    /// `interrupt` says so, as [`Self::wait_next`] does. A loop of its own,
    /// so that [`Self::wait_ready`]'s has no interrupt check in it.
    #[inline(never)]
    fn wait_ready_interruptible(
        &mut self,
        deadline: Option<Instant>,
        interrupt: Interrupt<'_>,
    ) -> Result<u32, RecvError> {
        self.wait_ready_or(deadline, Some(interrupt))
    }

    #[inline(always)]
    fn wait_ready_or(
        &mut self,
        deadline: Option<Instant>,
        interrupt: Option<Interrupt<'_>>,
    ) -> Result<u32, RecvError> {
        // A lane with something at its head costs no clock read.
        if let Some(from) = self.poll_ready() {
            return Ok(from);
        }
        let strategy = self.wait;
        spin_then_park(
            &mut RecvWait::<ReadyLane>::new(self, interrupt),
            strategy,
            deadline,
        )
    }

    /// Waits for the next message by the wait strategy, until `deadline`.
    /// Never inlined: this is the spin loop, and its speed must not depend
    /// on where a caller's code happens to place it (a previous build
    /// measured 30% swings of the round trip from alignment alone).
    #[inline(never)]
    pub(super) fn wait_next(
        &mut self,
        deadline: Option<Instant>,
        interrupt: Option<Interrupt<'_>>,
    ) -> Result<(u32, Next), RecvError> {
        // A message already there costs no clock read.
        if let Some(found) = self.poll().map_err(corrupt)? {
            return Ok(found);
        }
        let strategy = self.wait;
        spin_then_park(
            &mut RecvWait::<NextMessage>::new(self, interrupt),
            strategy,
            deadline,
        )
    }

    #[inline(always)]
    pub(super) fn received(&mut self, (sender, next): (u32, Next)) -> Received<'_> {
        self.count_received(match &next {
            Next::InLane { hdr, .. } => hdr.len as usize,
            Next::Assembled { payload, .. } => payload.len(),
        });
        match next {
            Next::InLane { hdr, offset, record } => {
                let ptr = self.inbound[sender as usize].consumer.payload_ptr(offset);
                Received {
                    endpoint: self,
                    sender,
                    hdr,
                    body: Body::Lane { ptr, record },
                }
            }
            Next::Assembled { hdr, payload } => Received {
                endpoint: self,
                sender,
                hdr,
                body: Body::Owned(payload),
            },
        }
    }

    /// Waits for the next message and copies it out.
    ///
    /// # Errors
    /// [`RecvError::Corrupt`] if a lane turned out to hold garbage (that
    /// lane is poisoned; call again to keep receiving from the others).
    pub fn recv(&mut self) -> Result<Message, RecvError> {
        self.recv_ref(None).map(Received::into_message)
    }

    /// Waits until `deadline` for the next message and copies it out.
    ///
    /// # Errors
    /// [`RecvError::Timeout`], or [`RecvError::Corrupt`] as for
    /// [`Endpoint::recv`].
    pub fn recv_deadline(&mut self, deadline: Instant) -> Result<Message, RecvError> {
        self.recv_ref(Some(deadline)).map(Received::into_message)
    }

    /// Waits up to `timeout` for the next message and copies it out.
    ///
    /// # Errors
    /// As [`Endpoint::recv_deadline`].
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Message, RecvError> {
        self.recv_deadline(Instant::now() + timeout)
    }

    /// The next message if one is waiting, copied out.
    ///
    /// # Errors
    /// [`TryRecvError::Empty`] if none is, [`TryRecvError::Corrupt`] as for
    /// [`Endpoint::recv`].
    #[inline]
    pub fn try_recv(&mut self) -> Result<Message, TryRecvError> {
        self.try_recv_ref().map(Received::into_message)
    }

    /// Waits until `deadline` (`None`: as long as it takes) for the next
    /// message and lends it without copying: see [`Received`].
    ///
    /// # Errors
    /// As [`Endpoint::recv_deadline`].
    #[inline(always)]
    pub fn recv_ref(&mut self, deadline: Option<Instant>) -> Result<Received<'_>, RecvError> {
        // The spin loop only finds a lane with something at its head; the
        // record is read here, so that it reaches the `Received` in
        // registers (see `poll_ready`).
        let from = self.wait_ready(deadline)?;
        let found = match self.next_from(from)? {
            Some(next) => (from, next),
            // No whole message there after all (padding, or fragments of
            // a message not yet complete, now consumed, or a lane's worth
            // of garbage): the general wait, which reads the clock as it
            // spins, so that not even a lane that never yields a message
            // holds the caller past its deadline.
            None => self.wait_next(deadline, None)?,
        };
        Ok(self.received(found))
    }

    /// [`Endpoint::recv_ref`] that also returns (as `Timeout`) as soon as
    /// `interrupt` says so (see [`Interrupt`]).
    pub(crate) fn recv_ref_interruptible(
        &mut self,
        deadline: Option<Instant>,
        interrupt: Interrupt<'_>,
    ) -> Result<Received<'_>, RecvError> {
        // As `recv_ref`: the spin loop finds a lane, the record is read
        // here, in registers; anything but a whole message goes to the
        // general wait, with the same interrupt.
        let from = self.wait_ready_interruptible(deadline, interrupt)?;
        let found = match self.next_from(from)? {
            Some(next) => (from, next),
            None => self.wait_next(deadline, Some(interrupt))?,
        };
        Ok(self.received(found))
    }

    /// For an async receiver about to wait: the next message if one is
    /// waiting, else (the doorbell taken and every lane found empty, as
    /// before a park) `None`, after which the caller may announce its park
    /// ([`Endpoint::park_fd_begin`] or a waiter thread's [`wake::park`]).
    pub(crate) fn try_recv_before_park(&mut self) -> Result<Option<Received<'_>>, RecvError> {
        let found = match self.poll().map_err(corrupt)? {
            Some(found) => Some(found),
            None => self.before_park().map_err(corrupt)?,
        };
        Ok(found.map(|f| self.received(f)))
    }

    /// Async receiver: announces that it waits on its eventfd; false if a
    /// doorbell rang since [`Endpoint::try_recv_before_park`] (poll again).
    /// Counts the wait and beats the heartbeat.
    pub(crate) fn park_fd_begin(&self) -> bool {
        let parked = wake::park_fd_begin(self.segment.park(self.slot), self.segment.bells(self.slot));
        if parked {
            StatsEntry::add(&self.segment.stats_entry(self.slot).futex_waits, 1);
            self.beat();
        }
        parked
    }

    /// Async receiver: running again after its wait (the eventfd is read
    /// by whoever waited on it).
    pub(crate) fn park_fd_end(&self) {
        wake::park_fd_end(self.segment.park(self.slot));
    }

    /// The next message if one is waiting, lent without copying: see
    /// [`Received`].
    ///
    /// # Errors
    /// As [`Endpoint::try_recv`].
    ///
    /// # Examples
    /// ```
    /// # let segment = shmcluster::raw::Segment::create(&shmcluster::raw::Config::new(1))?;
    /// let mut me = segment.endpoint(0)?;
    /// me.send(0, b"to myself")?;
    /// let msg = me.try_recv_ref()?;
    /// assert!(msg.is_in_lane());
    /// assert_eq!(msg.payload(), b"to myself");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[inline]
    pub fn try_recv_ref(&mut self) -> Result<Received<'_>, TryRecvError> {
        match self.poll() {
            Ok(Some(found)) => Ok(self.received(found)),
            Ok(None) => Err(TryRecvError::Empty),
            Err((sender, error)) => Err(TryRecvError::Corrupt { sender, error }),
        }
    }
}

/// What a receiver's wait looks for: the next message ([`NextMessage`],
/// behind [`Endpoint::wait_next`]) or only a lane with something at its
/// head ([`ReadyLane`], behind the spinning receive, which then reads the
/// message itself).
trait Seek {
    type Found;
    /// One look, in the spin loop.
    fn look(endpoint: &mut Endpoint) -> Result<Option<Self::Found>, RecvError>;
    /// The look on the way to sleep, once the doorbell is taken.
    fn before_park(endpoint: &mut Endpoint) -> Result<Option<Self::Found>, RecvError>;
}

/// [`Seek`] for the next message.
struct NextMessage;

impl Seek for NextMessage {
    type Found = (u32, Next);

    #[inline(always)]
    fn look(endpoint: &mut Endpoint) -> Result<Option<(u32, Next)>, RecvError> {
        endpoint.poll().map_err(corrupt)
    }

    fn before_park(endpoint: &mut Endpoint) -> Result<Option<(u32, Next)>, RecvError> {
        endpoint.before_park().map_err(corrupt)
    }
}

/// [`Seek`] for a lane with something at its head.
struct ReadyLane;

impl Seek for ReadyLane {
    type Found = u32;

    #[inline(always)]
    fn look(endpoint: &mut Endpoint) -> Result<Option<u32>, RecvError> {
        Ok(endpoint.poll_ready())
    }

    fn before_park(endpoint: &mut Endpoint) -> Result<Option<u32>, RecvError> {
        Ok(endpoint.before_park_ready())
    }
}

/// A receiver's wait for what `S` seeks. Its interrupt is checked after
/// a look that found nothing, and again after the doorbell is taken
/// before a park.
struct RecvWait<'a, 'i, S> {
    endpoint: &'a mut Endpoint,
    interrupt: Option<Interrupt<'i>>,
    seek: std::marker::PhantomData<S>,
}

impl<'a, 'i, S> RecvWait<'a, 'i, S> {
    fn new(endpoint: &'a mut Endpoint, interrupt: Option<Interrupt<'i>>) -> Self {
        Self {
            endpoint,
            interrupt,
            seek: std::marker::PhantomData,
        }
    }

    /// Someone of this process wants the waiting thread back (it rang this
    /// slot's own doorbell to wake it from a park), or a worker died since
    /// the caller last looked (the master rang every doorbell after
    /// counting it).
    #[inline]
    fn interrupted(&self) -> bool {
        self.interrupt.is_some_and(|i| i.ended(&self.endpoint.segment))
    }
}

impl<S: Seek> Wait for RecvWait<'_, '_, S> {
    type Found = S::Found;
    type Error = RecvError;

    /// A receiver polls its lanes back to back; one that parks at once
    /// reads the clock after every poll, so it goes to sleep at the first.
    #[inline]
    fn pace(&self) -> Pace {
        match self.endpoint.wait {
            WaitStrategy::Park => Pace {
                spins_per_look: 0,
                looks_per_clock: 1,
            },
            _ => Pace {
                spins_per_look: 1,
                looks_per_clock: 64,
            },
        }
    }

    #[inline]
    fn look(&mut self) -> Result<Option<S::Found>, RecvError> {
        if let Some(found) = S::look(self.endpoint)? {
            return Ok(Some(found));
        }
        if self.interrupted() {
            return Err(RecvError::Timeout);
        }
        Ok(None)
    }

    #[inline]
    fn spinning(&mut self, looks: u32) {
        if looks.is_multiple_of(4096) {
            self.endpoint.beat();
        }
    }

    fn park(&mut self, timeout: Duration) -> Result<Option<S::Found>, RecvError> {
        if let Some(found) = S::before_park(self.endpoint)? {
            return Ok(Some(found));
        }
        // Again, now that the doorbell is taken: a ring that found its bit
        // still set (an earlier, spurious one) woke nobody, trusting this
        // taking to see what came before it (F1/F2 in `wake`), the death
        // count and the outbox flag included.
        if self.interrupted() {
            return Err(RecvError::Timeout);
        }
        self.endpoint.sleep(timeout);
        Ok(None)
    }

    #[inline]
    fn timed_out(&self) -> RecvError {
        RecvError::Timeout
    }
}

impl Endpoint {
    /// A receiver's sleep, once it has taken the doorbell and found every
    /// lane empty: counts it, beats the heartbeat, parks.
    fn sleep(&self, timeout: Duration) {
        let segment = &self.segment;
        StatsEntry::add(&segment.stats_entry(self.slot).futex_waits, 1);
        self.beat();
        wake::park(segment.park(self.slot), segment.bells(self.slot), timeout);
    }
}

/// A corrupt lane found by a poll, as the receive error.
pub(super) fn corrupt((sender, error): (u32, LaneCorruption)) -> RecvError {
    RecvError::Corrupt { sender, error }
}

enum Body {
    /// A single-record message, still in the lane.
    Lane { ptr: *const u8, record: usize },
    /// A message reassembled from fragments.
    Owned(Vec<u8>),
}

/// A message lent by [`Endpoint::recv_ref`] / [`Endpoint::try_recv_ref`].
///
/// A message that fit in one record (at most
/// [`Endpoint::max_reservation`] bytes) is read in place in the lane: no
/// copy at all, and the lane space is released when this is dropped. That is
/// sound because only the receiver moves the head, and the sender writes
/// nothing between head and tail. A message that arrived in fragments was
/// necessarily copied once, into the buffer this holds.
///
/// Hold it briefly: until it is dropped the sender cannot reuse that part of
/// the lane, and this endpoint cannot receive.
pub struct Received<'a> {
    endpoint: &'a mut Endpoint,
    sender: u32,
    hdr: RecordHeader,
    body: Body,
}

impl Received<'_> {
    /// The sending slot.
    #[inline]
    pub fn sender(&self) -> u32 {
        self.sender
    }

    /// The sender's generation when it sent the message.
    #[inline]
    pub fn generation(&self) -> u32 {
        self.hdr.generation
    }

    /// The sender's [`Tag`].
    #[inline]
    pub fn tag(&self) -> Tag {
        Tag {
            kind: self.hdr.kind,
            correlation: self.hdr.correlation,
        }
    }

    /// Whether the payload is read in place in the lane (not copied).
    #[inline]
    pub fn is_in_lane(&self) -> bool {
        matches!(self.body, Body::Lane { .. })
    }

    /// The message's bytes.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        match &self.body {
            // SAFETY: the consumer checked that `hdr.len` bytes at `ptr` lie
            // inside the ring and inside the published data; the sender does
            // not write them until the head moves past them, which happens
            // only when `self` (which borrows the endpoint mutably) drops.
            Body::Lane { ptr, .. } => unsafe { std::slice::from_raw_parts(*ptr, self.hdr.len as usize) },
            Body::Owned(v) => v,
        }
    }

    /// Copies (or, for a reassembled message, moves) the message out and
    /// releases its lane space.
    pub fn into_message(mut self) -> Message {
        let payload = match &mut self.body {
            Body::Lane { .. } => self.payload().to_vec(),
            Body::Owned(v) => std::mem::take(v),
        };
        Message {
            sender: self.sender,
            generation: self.hdr.generation,
            kind: self.hdr.kind,
            correlation: self.hdr.correlation,
            payload,
        }
    }
}

impl Drop for Received<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        if let Body::Lane { record, .. } = self.body {
            self.endpoint.inbound[self.sender as usize]
                .consumer
                .consume(record);
        }
    }
}

impl std::fmt::Debug for Received<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received")
            .field("sender", &self.sender)
            .field("tag", &self.tag())
            .field("len", &self.payload().len())
            .field("in_lane", &self.is_in_lane())
            .finish()
    }
}

/// The spinning receive's two steps: the lane it finds, and the message it
/// reads there (see `Endpoint::poll_ready`).
#[cfg(all(test, not(loom)))]
mod ready_tests {
    use std::time::Duration;

    use super::Interrupt;
    use crate::error::RecvError;
    use crate::testing::Watchdog;
    use crate::{Config, Segment, WaitStrategy};

    #[test]
    fn a_receive_that_finds_only_the_start_of_a_message_waits_for_the_rest() {
        let _dog = Watchdog::new("fragments", Duration::from_secs(30));
        let seg = Segment::create(&Config::new(2).lane_capacity(4096)).unwrap();
        let mut b = seg.endpoint(1).unwrap();
        b.set_wait_strategy(WaitStrategy::Spin);
        let big: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
        let sent = big.clone();
        let sender = {
            let seg = seg.clone();
            std::thread::spawn(move || {
                let mut a = seg.endpoint(0).unwrap();
                a.set_wait_strategy(WaitStrategy::Spin);
                a.send(1, sent).unwrap();
                a.send(1, b"after").unwrap();
            })
        };
        let msg = b
            .recv_timeout(Duration::from_secs(20))
            .expect("the whole message");
        assert_eq!(msg.payload, big);
        assert_eq!(b.recv_timeout(Duration::from_secs(20)).unwrap().payload, b"after");
        sender.join().unwrap();
    }

    #[test]
    fn a_lane_that_never_yields_a_message_does_not_hold_a_receive_past_its_deadline() {
        let _dog = Watchdog::new("endless padding", Duration::from_secs(30));
        let seg = Segment::create(&Config::new(2).lane_capacity(1 << 14)).unwrap();
        seg.lane(0, 1).scribble_endless_padding();
        let mut b = seg.endpoint(1).unwrap();
        b.set_wait_strategy(WaitStrategy::Spin);
        assert_eq!(
            b.recv_timeout(Duration::from_millis(50)).unwrap_err(),
            RecvError::Timeout
        );
        assert_eq!(b.poisoned_lanes().count(), 0, "padding is not corruption");
    }

    /// The messenger's dispatch waits with no deadline of its own but the
    /// interrupt (a `MessengerHandle`'s flag, a death): a spinning wait
    /// that never looks at it would never return.
    #[test]
    fn an_interrupted_receive_returns_without_a_message_or_a_deadline() {
        let _dog = Watchdog::new("interrupt", Duration::from_secs(30));
        let seg = Segment::create(&Config::new(2)).unwrap();
        let mut b = seg.endpoint(1).unwrap();
        let flag = std::sync::atomic::AtomicBool::new(true);
        let deaths = seg.control().deaths.load(std::sync::atomic::Ordering::Acquire);
        for wait in [WaitStrategy::Spin, WaitStrategy::Park] {
            b.set_wait_strategy(wait);
            let by_flag = Interrupt {
                flag: &flag,
                deaths: None,
            };
            let err = b.recv_ref_interruptible(None, by_flag).map(|_| ()).unwrap_err();
            assert_eq!(err, RecvError::Timeout, "{wait:?}, flag");
            let unset = std::sync::atomic::AtomicBool::new(false);
            let by_death = Interrupt {
                flag: &unset,
                deaths: Some(deaths.wrapping_sub(1)),
            };
            let err = b.recv_ref_interruptible(None, by_death).map(|_| ()).unwrap_err();
            assert_eq!(err, RecvError::Timeout, "{wait:?}, death");
        }
        // And a message waiting is still taken first.
        let mut a = seg.endpoint(0).unwrap();
        a.send(1, b"first").unwrap();
        let by_flag = Interrupt {
            flag: &flag,
            deaths: None,
        };
        let msg = b.recv_ref_interruptible(None, by_flag).unwrap();
        assert_eq!(msg.payload(), b"first");
    }
}

/// The async receiver's eventfd park, step by step (the driver in
/// `messenger::async_rt` runs these steps; a lost eventfd write would only
/// show there as a 50 ms timer wake, so it is checked here directly).
#[cfg(all(test, feature = "tokio", not(loom)))]
mod eventfd_park_tests {
    use crate::{sys, wake, Config, Segment};

    #[test]
    fn a_send_to_a_receiver_parked_on_its_eventfd_writes_the_eventfd() {
        let seg = Segment::create(&Config::new(2)).unwrap();
        let mut rx = seg.endpoint(0).unwrap();
        let mut tx = seg.endpoint(1).unwrap();
        let fd = seg.wake_fd(0).unwrap();
        assert!(sys::eventfd_read(fd).is_err(), "not readable before any park");
        assert!(rx.try_recv_before_park().unwrap().is_none());
        assert!(rx.park_fd_begin(), "nothing rang: may wait");
        assert_eq!(
            seg.park(0).load(std::sync::atomic::Ordering::Relaxed),
            wake::PARKED_FD
        );
        tx.send(0, b"wake up").unwrap();
        assert_eq!(sys::eventfd_read(fd).unwrap(), 1, "exactly one write");
        assert_eq!(
            seg.park(0).load(std::sync::atomic::Ordering::Relaxed),
            wake::NOTIFIED
        );
        rx.park_fd_end();
        assert_eq!(rx.try_recv_before_park().unwrap().unwrap().payload(), b"wake up");
        // A second message to a running receiver writes nothing.
        tx.send(0, b"again").unwrap();
        assert!(sys::eventfd_read(fd).is_err(), "no write while running");
        assert_eq!(rx.try_recv_before_park().unwrap().unwrap().payload(), b"again");
    }

    #[test]
    fn a_doorbell_rung_before_the_park_cancels_it() {
        let seg = Segment::create(&Config::new(2)).unwrap();
        let mut rx = seg.endpoint(0).unwrap();
        let mut tx = seg.endpoint(1).unwrap();
        assert!(rx.try_recv_before_park().unwrap().is_none());
        tx.send(0, b"in between").unwrap();
        assert!(!rx.park_fd_begin(), "the ring after the check is seen");
        assert_eq!(
            seg.park(0).load(std::sync::atomic::Ordering::Relaxed),
            wake::EMPTY
        );
        assert!(sys::eventfd_read(seg.wake_fd(0).unwrap()).is_err());
        assert_eq!(
            rx.try_recv_before_park().unwrap().unwrap().payload(),
            b"in between"
        );
    }

    #[test]
    fn the_master_cleanup_of_a_dead_slot_wakes_eventfd_parked_receivers() {
        let seg = Segment::create(&Config::new(3)).unwrap();
        let mut rx = seg.endpoint(0).unwrap();
        let dead = seg.endpoint(2).unwrap();
        let generation = dead.generation();
        std::mem::forget(dead); // as if its process died
        assert!(rx.try_recv_before_park().unwrap().is_none());
        assert!(rx.park_fd_begin());
        seg.reset_dead_slot(2, generation);
        assert!(
            sys::eventfd_read(seg.wake_fd(0).unwrap()).is_ok(),
            "woken by the clean-up"
        );
        rx.park_fd_end();
    }
}
