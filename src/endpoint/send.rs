//! Sending whole messages: in one record, or streamed through the lane in
//! fragments when longer than half of it.

use std::time::{Duration, Instant};

use super::wait::{spin_then_park, Pace, Wait};
use super::{Endpoint, Tag};
use crate::error::{LaneCorruption, SendError, TrySendError};
use crate::lane::{self, flags, Producer, RecordHeader, RECORD_HEADER};
use crate::segment::table::StatsEntry;

/// Bytes a fragmented send keeps free after each piece but the last: room
/// for an `ABORT` record and the padding before it.
const FRAGMENT_KEEP: usize = 2 * RECORD_HEADER;

impl Endpoint {
    /// The checks every send makes before touching a lane.
    #[inline]
    pub(super) fn check_target(&self, to: u32, len: usize, max: usize) -> Result<(), Rejected> {
        if to >= self.workers {
            return Err(Rejected::NoSuchWorker {
                slot: to,
                workers: self.workers,
            });
        }
        if len > max {
            return Err(Rejected::TooLarge { len, max });
        }
        Ok(())
    }

    /// Sends `msg` to slot `to`, waiting as long as it takes for room.
    ///
    /// # Errors
    /// `NoSuchWorker`, `TooLarge` (over `max_message`), `SelfFull` (the lane
    /// to this endpoint itself is full), `Corrupt`. The message is given
    /// back where it was not sent.
    ///
    /// # Examples
    /// ```
    /// # let segment = shmcluster::raw::Segment::create(&shmcluster::raw::Config::new(2))?;
    /// let mut a = segment.endpoint(0)?;
    /// let mut b = segment.endpoint(1)?;
    /// a.send(1, vec![1, 2, 3])?;
    /// assert_eq!(b.recv()?.payload, [1, 2, 3]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn send<M: AsRef<[u8]>>(&mut self, to: u32, msg: M) -> Result<(), SendError<M>> {
        self.send_tagged(to, Tag::default(), msg, None)
    }

    /// Sends `msg` to slot `to`, waiting for room until `deadline`.
    ///
    /// # Errors
    /// As [`Endpoint::send`], plus `Timeout(msg)` if the lane stayed full
    /// until the deadline; then nothing of the message was delivered.
    pub fn send_deadline<M: AsRef<[u8]>>(
        &mut self,
        to: u32,
        msg: M,
        deadline: Instant,
    ) -> Result<(), SendError<M>> {
        self.send_tagged(to, Tag::default(), msg, Some(deadline))
    }

    /// Sends `msg` with `tag` to slot `to`, waiting for room until
    /// `deadline` (`None`: as long as it takes). A message longer than half
    /// a lane is streamed through it in fragments as the receiver drains.
    ///
    /// # Errors
    /// As [`Endpoint::send_deadline`].
    pub fn send_tagged<M: AsRef<[u8]>>(
        &mut self,
        to: u32,
        tag: Tag,
        msg: M,
        deadline: Option<Instant>,
    ) -> Result<(), SendError<M>> {
        if self.try_send_fast(to, tag, msg.as_ref()) {
            return Ok(());
        }
        self.send_general(to, tag, msg, deadline, true)
    }

    /// The common send, with nothing computed twice: a message that fits
    /// in one record, to an existing slot, with room for it in the lane as
    /// far as the cached head knows and no padding needed. Written,
    /// published and rung here; returns false, having done nothing,
    /// otherwise (the general path then does it all, or says why not).
    #[inline(always)]
    fn try_send_fast(&mut self, to: u32, tag: Tag, bytes: &[u8]) -> bool {
        if bytes.len() > self.max_single {
            return false;
        }
        let (slot, generation) = (self.slot, self.generation);
        let Some(out) = self.outbound.get_mut(to as usize) else {
            return false;
        };
        let w = lane::to_words(&RecordHeader {
            len: bytes.len() as u32,
            flags: flags::SINGLE,
            kind: tag.kind,
            sender: slot,
            generation,
            correlation: tag.correlation,
            total: 0,
        });
        if !out.lane.try_write_single(w, bytes) {
            return false;
        }
        out.lane.publish();
        if out.bell.ring(&self.segment) {
            self.count_wake();
        }
        self.count_sent(bytes.len());
        true
    }

    /// Every send the fast path did not take: checks, pads, refreshes
    /// the head, fragments, and waits (if `may_wait`) until `deadline`.
    #[inline(never)]
    pub(super) fn send_general<M: AsRef<[u8]>>(
        &mut self,
        to: u32,
        tag: Tag,
        msg: M,
        deadline: Option<Instant>,
        may_wait: bool,
    ) -> Result<(), SendError<M>> {
        let len = msg.as_ref().len();
        self.check_target(to, len, self.max_message)
            .map_err(SendError::from)?;
        let result = if len <= self.max_single {
            self.send_single(to, tag, msg.as_ref(), deadline, may_wait)
        } else {
            self.send_fragmented(to, tag, msg.as_ref(), deadline, may_wait)
        };
        result.map_err(|e| match e {
            Blocked::Timeout => SendError::Timeout(msg),
            Blocked::SelfFull => SendError::SelfFull(msg),
            Blocked::Corrupt(error) => SendError::Corrupt { slot: to, error, msg },
        })
    }

    fn send_single(
        &mut self,
        to: u32,
        tag: Tag,
        bytes: &[u8],
        deadline: Option<Instant>,
        may_wait: bool,
    ) -> Result<(), Blocked> {
        loop {
            let out = &mut self.outbound[to as usize].lane;
            if let Some(planned) = out.plan(bytes.len(), 0)? {
                let hdr = self.header(to, tag, bytes.len(), flags::SINGLE, 0);
                let out = &mut self.outbound[to as usize].lane;
                out.write(planned, hdr, bytes);
                out.publish();
                self.notify(to);
                self.count_sent(bytes.len());
                return Ok(());
            }
            if !may_wait {
                return Err(Blocked::Timeout);
            }
            let need = self.outbound[to as usize].lane.need(bytes.len(), 0);
            self.wait_for_room(to, need, deadline)?;
        }
    }

    fn send_fragmented(
        &mut self,
        to: u32,
        tag: Tag,
        bytes: &[u8],
        deadline: Option<Instant>,
        may_wait: bool,
    ) -> Result<(), Blocked> {
        let piece = lane::max_record_payload(self.lane_capacity);
        let mut sent = 0;
        while sent < bytes.len() {
            let chunk = (bytes.len() - sent).min(piece);
            let last = sent + chunk == bytes.len();
            let first = sent == 0;
            let flags = match (first, last) {
                (true, _) => flags::FIRST,
                (false, true) => flags::LAST,
                (false, false) => flags::MIDDLE,
            };
            // Keep room for an ABORT (and the padding before it) after every
            // piece but the last, so giving up never needs to wait.
            let keep = if last { 0 } else { FRAGMENT_KEEP };
            loop {
                let out = &mut self.outbound[to as usize].lane;
                if let Some(planned) = out.plan(chunk, keep)? {
                    let total = if first { bytes.len() as u64 } else { 0 };
                    let hdr = self.header(to, tag, chunk, flags, total);
                    let out = &mut self.outbound[to as usize].lane;
                    if first {
                        // Before the first fragment is visible: should this
                        // process die before the last, its cleaner knows.
                        out.set_streaming(true);
                    }
                    out.write(planned, hdr, &bytes[sent..sent + chunk]);
                    out.publish();
                    if last {
                        out.set_streaming(false);
                    }
                    self.notify(to);
                    break;
                }
                let need = self.outbound[to as usize].lane.need(chunk, keep);
                let waited = match may_wait {
                    true => self.wait_for_room(to, need, deadline),
                    false => Err(Blocked::Timeout),
                };
                if let Err(e) = waited {
                    if !first {
                        self.abort_message(to);
                    }
                    return Err(e);
                }
            }
            sent += chunk;
        }
        self.count_sent(bytes.len());
        Ok(())
    }

    /// Tells `to` to drop the fragments of the message it is assembling
    /// from us. The room was kept free by `send_fragmented`.
    fn abort_message(&mut self, to: u32) {
        let hdr = self.header(to, Tag::default(), 0, flags::ABORT, 0);
        let out = &mut self.outbound[to as usize].lane;
        if let Ok(Some(planned)) = out.plan(0, 0) {
            out.commit(planned, hdr);
            out.publish();
            out.set_streaming(false);
            self.notify(to);
        }
    }

    #[inline]
    pub(super) fn header(&self, to: u32, tag: Tag, len: usize, flags: u16, total: u64) -> RecordHeader {
        let mut hdr = self.outbound[to as usize]
            .lane
            .header(self.generation, len, flags);
        hdr.kind = tag.kind;
        hdr.correlation = tag.correlation;
        hdr.total = total;
        hdr
    }

    /// Waits until `need` bytes are free in the lane to `to`, by the wait
    /// strategy, or until `deadline`.
    #[cold]
    pub(super) fn wait_for_room(
        &mut self,
        to: u32,
        need: usize,
        deadline: Option<Instant>,
    ) -> Result<(), Blocked> {
        if to == self.slot {
            return Err(Blocked::SelfFull);
        }
        // Hysteresis: once the lane is full, wait for a quarter of it (or
        // `need`, if more) to be free, not just for one record. The head is
        // the receiver's line, stored after every message; a sender that
        // re-read it for every record would pull that line across cores once
        // per message, slowing the receiver it is waiting for. For the same
        // reason a spinning sender looks at the head only every few hundred
        // nanoseconds (`RoomWait::pace`).
        let target = need.max(self.lane_capacity / 4);
        let stats = self.segment.stats_entry(self.slot);
        StatsEntry::add(&stats.full_waits, 1);
        let mut wait = RoomWait {
            out: &mut self.outbound[to as usize].lane,
            target,
            stats,
        };
        spin_then_park(&mut wait, self.wait, deadline)
    }

    /// Sends `msg` to slot `to` if the lane has room for all of it now.
    ///
    /// # Errors
    /// `NoSuchWorker`, `TooLarge`, `Corrupt`, or `Full(msg)` if the lane
    /// lacks room; nothing is delivered then. A message too long to ever fit
    /// in the lane at once is always `Full`: use a blocking send, which
    /// streams it.
    #[inline]
    pub fn try_send<M: AsRef<[u8]>>(&mut self, to: u32, msg: M) -> Result<(), TrySendError<M>> {
        self.try_send_tagged(to, Tag::default(), msg)
    }

    /// [`Endpoint::try_send`] with a [`Tag`].
    ///
    /// # Errors
    /// As [`Endpoint::try_send`].
    #[inline]
    pub fn try_send_tagged<M: AsRef<[u8]>>(
        &mut self,
        to: u32,
        tag: Tag,
        msg: M,
    ) -> Result<(), TrySendError<M>> {
        if self.try_send_fast(to, tag, msg.as_ref()) {
            return Ok(());
        }
        self.try_send_general(to, tag, msg)
    }

    /// [`Endpoint::try_send_tagged`] when the fast path did not take it.
    #[inline(never)]
    pub(super) fn try_send_general<M: AsRef<[u8]>>(
        &mut self,
        to: u32,
        tag: Tag,
        msg: M,
    ) -> Result<(), TrySendError<M>> {
        let bytes = msg.as_ref();
        let len = bytes.len();
        self.check_target(to, len, self.max_message)
            .map_err(TrySendError::from)?;
        let piece = lane::max_record_payload(self.lane_capacity);
        let out = &mut self.outbound[to as usize].lane;
        let fits = match out.need_for_message(len, piece, FRAGMENT_KEEP) {
            Some(need) => out.has_room(need),
            None => Ok(false),
        };
        match fits {
            Err(error) => return Err(TrySendError::Corrupt { slot: to, error, msg }),
            Ok(false) => return Err(TrySendError::Full(msg)),
            Ok(true) => {}
        }
        // The room is there, so nothing below should wait; `may_wait`
        // false makes sure it cannot (a peer scribbling on the head could
        // shrink the room mid-message: the send then aborts cleanly).
        let done = if len <= self.max_single {
            self.send_single(to, tag, bytes, None, false)
        } else {
            self.send_fragmented(to, tag, bytes, None, false)
        };
        match done {
            Ok(()) => Ok(()),
            Err(Blocked::Corrupt(error)) => Err(TrySendError::Corrupt { slot: to, error, msg }),
            Err(Blocked::Timeout | Blocked::SelfFull) => Err(TrySendError::Full(msg)),
        }
    }
}

/// A sender's wait for `target` free bytes in its lane.
struct RoomWait<'a> {
    out: &'a mut Producer,
    target: usize,
    stats: &'a StatsEntry,
}

impl Wait for RoomWait<'_> {
    type Found = ();
    type Error = Blocked;

    #[inline]
    fn pace(&self) -> Pace {
        Pace {
            spins_per_look: 16,
            looks_per_clock: 8,
        }
    }

    #[inline]
    fn look(&mut self) -> Result<Option<()>, Blocked> {
        Ok(self.out.has_room(self.target)?.then_some(()))
    }

    fn park(&mut self, timeout: Duration) -> Result<Option<()>, Blocked> {
        StatsEntry::add(&self.stats.futex_waits, 1);
        Ok(self.out.wait_for_room(self.target, timeout)?.then_some(()))
    }

    #[inline]
    fn timed_out(&self) -> Blocked {
        Blocked::Timeout
    }
}

/// A send refused before any lane was touched.
pub(super) enum Rejected {
    NoSuchWorker { slot: u32, workers: u32 },
    TooLarge { len: usize, max: usize },
}

impl<M> From<Rejected> for SendError<M> {
    fn from(r: Rejected) -> Self {
        match r {
            Rejected::NoSuchWorker { slot, workers } => Self::NoSuchWorker { slot, workers },
            Rejected::TooLarge { len, max } => Self::TooLarge { len, max },
        }
    }
}

impl<M> From<Rejected> for TrySendError<M> {
    fn from(r: Rejected) -> Self {
        match r {
            Rejected::NoSuchWorker { slot, workers } => Self::NoSuchWorker { slot, workers },
            Rejected::TooLarge { len, max } => Self::TooLarge { len, max },
        }
    }
}

/// Why a blocking send step stopped.
pub(super) enum Blocked {
    Timeout,
    SelfFull,
    Corrupt(LaneCorruption),
}

impl From<LaneCorruption> for Blocked {
    fn from(e: LaneCorruption) -> Self {
        Self::Corrupt(e)
    }
}
