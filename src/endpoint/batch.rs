//! Batches: many messages for one publish on the sending side, and a
//! draining receive with one head store per lane on the receiving side.
//!
//! A send publishes its record with a release store of its commit word
//! (and of the tail), fence F1 and a look at the receiver's doorbell (see
//! [`crate::wake`]); a receive stores the head after each message. Those are what a stream of small messages pays for
//! beyond copying bytes, and what a batch pays once.

use std::time::Instant;

use super::{Endpoint, Tag};
use crate::error::{LaneCorruption, RecvError, SendError, TryRecvError, TrySendError};
use crate::lane::{self, flags, RecordHeader};

/// Messages to one receiver, written into the lane as they are pushed and
/// published together by [`Batch::flush`] (or when the batch is dropped):
/// one commit store, one tail store, one fence and one doorbell check for
/// all of them.
///
/// # Guarantees
/// - **Order.** The receiver gets the messages in the order they were
///   pushed, after everything this endpoint sent to it before, and before
///   anything it sends after (per-sender FIFO, as for [`Endpoint::send`]).
/// - **Nothing half published.** A message pushed since the last flush is
///   invisible to the receiver: the first such message is not committed,
///   and the receiver cannot get past it to the others.
///   If this process dies (even by `SIGKILL`) before the flush, none of
///   those messages is ever delivered, and the slot's next holder writes
///   over them. Each flush makes all its messages visible at once.
/// - **A full lane flushes.** A push that finds no room in the lane
///   publishes the messages before it (the receiver can only free space
///   it sees), then waits for room as [`Endpoint::send_tagged`] does and
///   publishes that message by itself. So does a message too large for
///   one record ([`Endpoint::max_reservation`]), which is streamed. The
///   non-blocking [`Batch::try_push`] never publishes: it says `Full`.
///
/// Hold a batch briefly: the receiver sees nothing of it until the flush.
///
/// # Examples
/// ```
/// # let segment = shmcluster::raw::Segment::create(&shmcluster::raw::Config::new(2))?;
/// let mut a = segment.endpoint(0)?;
/// let mut b = segment.endpoint(1)?;
/// let mut batch = a.batch(1)?;
/// for i in 0u8..10 {
///     batch.push([i; 16])?;
/// }
/// assert!(b.try_recv().is_err(), "nothing is visible before the flush");
/// batch.flush();
/// let mut got = Vec::new();
/// b.recv_many(usize::MAX, None, |msg| got.push(msg.payload()[0]))?;
/// assert_eq!(got, (0..10).collect::<Vec<u8>>());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Batch<'a> {
    endpoint: &'a mut Endpoint,
    to: u32,
    /// Messages written since the last publish.
    unpublished: usize,
}

/// Why a message did not go into the batch's unpublished part.
enum NotWritten {
    /// Not one plain record: too large, or fragmented.
    TooLarge,
    /// No room in the lane now.
    Full,
    Corrupt(LaneCorruption),
}

impl Endpoint {
    /// Starts a [`Batch`] of messages to slot `to`.
    ///
    /// # Errors
    /// `NoSuchWorker` if `to` is not a slot.
    pub fn batch(&mut self, to: u32) -> Result<Batch<'_>, SendError<()>> {
        self.check_target(to, 0, 0).map_err(SendError::from)?;
        Ok(Batch {
            endpoint: self,
            to,
            unpublished: 0,
        })
    }

    /// Sends every message of `msgs` to slot `to` in one [`Batch`].
    ///
    /// # Errors
    /// As [`Batch::push`], for the first message that could not be sent;
    /// every message before it was sent, none after it was.
    pub fn send_many<M: AsRef<[u8]>>(
        &mut self,
        to: u32,
        msgs: impl IntoIterator<Item = M>,
    ) -> Result<(), SendError<M>> {
        let mut batch = self.batch(to).map_err(|e| match e {
            SendError::NoSuchWorker { slot, workers } => SendError::NoSuchWorker { slot, workers },
            _ => unreachable!("`batch` only checks the slot"),
        })?;
        for msg in msgs {
            batch.push(msg)?;
        }
        Ok(())
    }

    /// Waits until `deadline` (`None`: as long as it takes) for a message,
    /// then hands it and every other message already waiting, up to `max`
    /// in all, to `f`, in the order [`Endpoint::recv_ref`] would return
    /// them. Each lane's head (the space its sender may reuse) is stored
    /// once, when the drain ends (and every quarter lane of a long one),
    /// instead of after every message. Returns how many messages `f` got.
    ///
    /// A message handed to `f` counts as received when the drain ends,
    /// as one from [`Endpoint::recv_ref`] does when its [`Message`](super::Message)
    /// is dropped: should this process die during the drain, the slot's
    /// next holder receives again what `f` got since the last head store
    /// (at most a quarter lane of each sender's messages). Should `f`
    /// panic, the drain ends there and the messages handed over count as
    /// received.
    ///
    /// # Errors
    /// As [`Endpoint::recv_deadline`]; a corrupt lane found after some
    /// messages were handed over ends the drain with the error (those
    /// messages stay received).
    pub fn recv_many(
        &mut self,
        max: usize,
        deadline: Option<Instant>,
        mut f: impl FnMut(super::Received<'_>),
    ) -> Result<usize, RecvError> {
        if max == 0 {
            return Ok(0);
        }
        let (sender, next) = self.wait_next(deadline, None)?;
        let draining = Draining(self);
        draining.0.inbound[sender as usize].consumer.defer_head();
        f(draining.0.received((sender, next)));
        draining.0.drain(1, max, &mut f).map_err(super::recv::corrupt)
    }

    /// [`Endpoint::recv_many`] without waiting.
    ///
    /// # Errors
    /// [`TryRecvError::Empty`] if no message is waiting,
    /// [`TryRecvError::Corrupt`] as for [`Endpoint::recv_many`].
    pub fn try_recv_many(
        &mut self,
        max: usize,
        mut f: impl FnMut(super::Received<'_>),
    ) -> Result<usize, TryRecvError> {
        match Draining(self).0.drain(0, max, &mut f) {
            Ok(0) if max > 0 => Err(TryRecvError::Empty),
            Ok(n) => Ok(n),
            Err((sender, error)) => Err(TryRecvError::Corrupt { sender, error }),
        }
    }

    /// Hands messages to `f` while there are any, up to `max` counting the
    /// `done` already handed. Called through a [`Draining`], which stores
    /// each deferred head once when the drain ends.
    fn drain(
        &mut self,
        mut done: usize,
        max: usize,
        f: &mut impl FnMut(super::Received<'_>),
    ) -> Result<usize, (u32, LaneCorruption)> {
        let mut result = Ok(());
        while done < max {
            match self.poll() {
                Ok(Some((sender, next))) => {
                    self.inbound[sender as usize].consumer.defer_head();
                    f(self.received((sender, next)));
                    done += 1;
                }
                Ok(None) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        result.map(|()| done)
    }
}

/// A drain in progress: however it ends (`f` panicking included), every
/// lane it deferred stores its head. A lane left deferring would store it
/// only every quarter lane or when it empties, so a later plain receive's
/// message would not count as received, and the slot's next holder would
/// receive it again.
struct Draining<'a>(&'a mut Endpoint);

impl Drop for Draining<'_> {
    fn drop(&mut self) {
        for inbound in &mut self.0.inbound {
            if inbound.consumer.deferring() {
                inbound.consumer.end_defer();
            }
        }
    }
}

impl Batch<'_> {
    /// The slot this batch goes to.
    pub fn to(&self) -> u32 {
        self.to
    }

    /// Messages pushed and not yet published.
    pub fn unpublished(&self) -> usize {
        self.unpublished
    }

    /// Adds `msg` to the batch, waiting for room as long as it takes.
    ///
    /// # Errors
    /// As [`Endpoint::send`]; the message is given back where it was not
    /// sent.
    #[inline]
    pub fn push<M: AsRef<[u8]>>(&mut self, msg: M) -> Result<(), SendError<M>> {
        self.push_tagged(Tag::default(), msg, None)
    }

    /// Adds `msg` with `tag` to the batch; if the lane is full, publishes
    /// the batch and waits for room until `deadline` (`None`: as long as
    /// it takes).
    ///
    /// # Errors
    /// As [`Endpoint::send_tagged`].
    #[inline]
    pub fn push_tagged<M: AsRef<[u8]>>(
        &mut self,
        tag: Tag,
        msg: M,
        deadline: Option<Instant>,
    ) -> Result<(), SendError<M>> {
        match self.write(tag, msg.as_ref()) {
            Ok(()) => Ok(()),
            Err(NotWritten::Corrupt(error)) => Err(SendError::Corrupt {
                slot: self.to,
                error,
                msg,
            }),
            Err(NotWritten::Full | NotWritten::TooLarge) => {
                self.flush();
                self.endpoint.send_general(self.to, tag, msg, deadline, true)
            }
        }
    }

    /// Adds `msg` to the batch if the lane has room for it now.
    ///
    /// # Errors
    /// `Full(msg)` if the lane lacks room (the batch is not published:
    /// flush it and let the receiver drain), `TooLarge`, `Corrupt`. A
    /// message too large for one record is sent by itself, after the
    /// batch is published, if the lane has room for all of it.
    #[inline]
    pub fn try_push<M: AsRef<[u8]>>(&mut self, msg: M) -> Result<(), TrySendError<M>> {
        match self.write(Tag::default(), msg.as_ref()) {
            Ok(()) => Ok(()),
            Err(NotWritten::Full) => Err(TrySendError::Full(msg)),
            Err(NotWritten::Corrupt(error)) => Err(TrySendError::Corrupt {
                slot: self.to,
                error,
                msg,
            }),
            Err(NotWritten::TooLarge) => {
                self.flush();
                self.endpoint.try_send_general(self.to, Tag::default(), msg)
            }
        }
    }

    /// Writes one single-record message into the lane, unpublished.
    #[inline(always)]
    fn write(&mut self, tag: Tag, bytes: &[u8]) -> Result<(), NotWritten> {
        let endpoint = &mut *self.endpoint;
        if bytes.len() > endpoint.max_single {
            return Err(NotWritten::TooLarge);
        }
        let hdr = RecordHeader {
            len: bytes.len() as u32,
            flags: flags::SINGLE,
            kind: tag.kind,
            sender: endpoint.slot,
            generation: endpoint.generation,
            correlation: tag.correlation,
            total: 0,
        };
        let out = &mut endpoint.outbound[self.to as usize].lane;
        if !out.try_write_single(lane::to_words(&hdr), bytes) {
            // The cached head is stale, or the record needs padding.
            match out.plan(bytes.len(), 0) {
                Ok(Some(planned)) => out.write(planned, hdr, bytes),
                Ok(None) => return Err(NotWritten::Full),
                Err(e) => return Err(NotWritten::Corrupt(e)),
            }
        }
        self.unpublished += 1;
        endpoint.count_sent(bytes.len());
        Ok(())
    }

    /// Publishes every message pushed so far: one commit of the first
    /// (`Release`), one tail store, fence F1 and the doorbell for all of
    /// them.
    #[inline]
    pub fn flush(&mut self) {
        if self.unpublished > 0 {
            self.unpublished = 0;
            self.endpoint.outbound[self.to as usize].lane.publish();
            self.endpoint.notify(self.to);
        }
    }
}

impl Drop for Batch<'_> {
    /// Publishes what the batch still holds.
    fn drop(&mut self) {
        self.flush();
    }
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("to", &self.to)
            .field("unpublished", &self.unpublished)
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::atomic::Ordering::Acquire;

    use crate::error::{SendError, TryRecvError, TrySendError};
    use crate::{Config, Segment};

    fn pair(cap: usize) -> (Segment, super::Endpoint, super::Endpoint) {
        let seg = Segment::create(&Config::new(2).lane_capacity(cap)).unwrap();
        let a = seg.endpoint(0).unwrap();
        let b = seg.endpoint(1).unwrap();
        (seg, a, b)
    }

    fn all(b: &mut super::Endpoint) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        while let Ok(msg) = b.try_recv() {
            got.push(msg.payload);
        }
        got
    }

    #[test]
    fn a_batch_keeps_order_with_sends_around_it() {
        let (_seg, mut a, mut b) = pair(4096);
        a.send(1, b"before").unwrap();
        {
            let mut batch = a.batch(1).unwrap();
            batch.push(b"one").unwrap();
            batch.push(b"two").unwrap();
            assert_eq!(batch.unpublished(), 2);
        } // dropped: flushed
        a.send(1, b"after").unwrap();
        assert_eq!(all(&mut b), [&b"before"[..], b"one", b"two", b"after"]);
    }

    #[test]
    fn nothing_of_a_batch_is_visible_before_its_flush() {
        let (_seg, mut a, mut b) = pair(4096);
        let mut batch = a.batch(1).unwrap();
        batch.push(b"one").unwrap();
        batch.try_push(b"two").unwrap();
        assert_eq!(b.try_recv(), Err(TryRecvError::Empty));
        batch.flush();
        assert_eq!(batch.unpublished(), 0);
        assert_eq!(all(&mut b), [&b"one"[..], b"two"]);
    }

    #[test]
    fn try_push_on_a_full_lane_says_full_and_publishes_nothing() {
        let (_seg, mut a, mut b) = pair(4096);
        let mut batch = a.batch(1).unwrap();
        let mut pushed = 0u32;
        loop {
            match batch.try_push(pushed.to_le_bytes()) {
                Ok(()) => pushed += 1,
                Err(TrySendError::Full(_)) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(pushed > 100, "{pushed} messages fit");
        assert_eq!(b.try_recv(), Err(TryRecvError::Empty));
        batch.flush();
        let got = all(&mut b);
        assert_eq!(got.len(), pushed as usize);
        for (i, p) in got.iter().enumerate() {
            assert_eq!(p[..], (i as u32).to_le_bytes());
        }
    }

    #[test]
    fn a_push_that_finds_the_lane_full_publishes_the_batch_first() {
        // To itself: a full lane cannot drain while we wait, so the push
        // says `SelfFull`, after publishing what the batch held.
        let seg = Segment::create(&Config::new(1).lane_capacity(4096)).unwrap();
        let mut me = seg.endpoint(0).unwrap();
        let mut batch = me.batch(0).unwrap();
        let mut pushed = 0u32;
        let rejected = loop {
            match batch.push(pushed.to_le_bytes()) {
                Ok(()) => pushed += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(rejected, SendError::SelfFull(_)), "{rejected:?}");
        assert_eq!(batch.unpublished(), 0, "published before waiting");
        drop(batch);
        assert_eq!(all(&mut me).len(), pushed as usize);
    }

    #[test]
    fn recv_many_stores_the_head_once_and_stops_at_max() {
        let (seg, mut a, mut b) = pair(4096);
        a.send_many(1, (0u8..10).map(|i| [i; 24])).unwrap();
        let lane = seg.lane(0, 1);
        let head = &lane.ctl().head.0;
        let mut got = Vec::new();
        let n = b
            .recv_many(6, None, |msg| {
                assert_eq!(head.load(Acquire), 0, "the head moves at the end");
                got.push(msg.payload()[0]);
            })
            .unwrap();
        assert_eq!((n, &got[..]), (6, &[0, 1, 2, 3, 4, 5][..]));
        assert_eq!(head.load(Acquire), 6 * crate::lane::record_size(24) as u64);
        let n = b
            .try_recv_many(usize::MAX, |msg| got.push(msg.payload()[0]))
            .unwrap();
        assert_eq!(n, 4);
        assert_eq!(got, (0..10).collect::<Vec<u8>>());
        assert_eq!(b.try_recv_many(usize::MAX, |_| ()), Err(TryRecvError::Empty));
    }

    #[test]
    fn large_messages_in_a_batch_are_streamed_in_order() {
        let (_seg, mut a, mut b) = pair(4096);
        let big = vec![7u8; 10_000];
        let mut batch = a.batch(1).unwrap();
        batch.push(&b"small"[..]).unwrap();
        // Too large for one record: the batch is published, then this is
        // streamed; the receiver must drain meanwhile, so try_push (which
        // needs room for all of it) says Full here.
        assert!(matches!(batch.try_push(&big[..]), Err(TrySendError::Full(_))));
        assert_eq!(batch.unpublished(), 0);
        batch.push(&b"tail"[..]).unwrap();
        drop(batch);
        assert_eq!(all(&mut b), [&b"small"[..], b"tail"]);
    }

    #[test]
    fn a_panicking_drain_still_counts_what_it_handed_over() {
        let (seg, mut a, mut b) = pair(4096);
        a.send_many(1, (0u8..4).map(|i| [i; 24])).unwrap();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = b.recv_many(usize::MAX, None, |_| panic!("handler failed"));
        }));
        assert!(panicked.is_err());
        for i in 1u8..4 {
            assert_eq!(b.try_recv().unwrap().payload, [i; 24]);
        }
        // Every message counts as received: the slot's next holder gets
        // none of them again.
        drop(b);
        let mut successor = seg.endpoint(1).unwrap();
        assert_eq!(all(&mut successor), Vec::<Vec<u8>>::new());
    }

    #[test]
    fn a_long_drain_stores_the_head_every_quarter_lane() {
        let (seg, mut a, mut b) = pair(4096);
        let record = crate::lane::record_size(88) as u64;
        a.send_many(1, (0u8..28).map(|i| [i; 88])).unwrap();
        let lane = seg.lane(0, 1);
        let mut stored = Vec::new();
        b.try_recv_many(usize::MAX, |_| stored.push(lane.ctl().head.0.load(Acquire)))
            .unwrap();
        // Seen from inside the drain: the head moved before it ended, by
        // at most a quarter lane (and a record) at a time.
        assert!(stored.iter().any(|&h| h > 0), "no head store during the drain");
        let mut last = 0;
        for h in stored {
            assert!(h - last <= 1024 + record, "the head jumped from {last} to {h}");
            last = h;
        }
        assert_eq!(lane.ctl().head.0.load(Acquire), 28 * record);
    }

    #[test]
    fn a_lane_read_ahead_of_its_stored_tail_is_empty() {
        use std::sync::atomic::Ordering::Release;
        let (seg, mut a, mut b) = pair(4096);
        a.send(1, b"x").unwrap();
        b.recv().unwrap();
        // As if the sender had died between committing the record and
        // storing the tail: the receiver has read the record already.
        let lane = seg.lane(0, 1);
        lane.ctl().tail.0.store(0, Release);
        assert_eq!(lane.depth(), 0);
    }
}
