//! The receiving end of a lane: what the consumer checks before it trusts
//! a byte (see "What the consumer trusts" in [`super`]).

use std::sync::atomic::Ordering::{Acquire, Release};

use super::{
    committed, flags, from_words, max_record_payload, record_size, LaneRef, RecordHeader, FLAG_ABORT,
    FLAG_PAD, KIND_BITS, RECORD_HEADER,
};
use crate::error::LaneCorruption;
use crate::wake;

/// A cache line.
const LINE: usize = 64;

/// A message being reassembled from fragments.
#[derive(Debug)]
struct Partial {
    first: RecordHeader,
    buf: Vec<u8>,
}

/// What the consumer found next in its lane.
#[derive(Debug)]
pub(crate) enum Next {
    /// A whole message in one record, still in the lane: `hdr.len` bytes at
    /// ring offset `offset`. Call [`Consumer::consume`] with `record` once
    /// done with it.
    InLane {
        hdr: RecordHeader,
        offset: usize,
        record: usize,
    },
    /// A message reassembled from fragments (already consumed from the
    /// lane). `hdr` is its first fragment's header, `hdr.total` its length.
    Assembled { hdr: RecordHeader, payload: Vec<u8> },
}

/// The receiving end of one lane. Polls the first word of the record at
/// its head, which the sender stores last (the commit): it never reads the
/// sender's tail, so a message costs it the record's cache lines only.
#[derive(Debug)]
pub(crate) struct Consumer {
    lane: LaneRef,
    pub(super) head: u64,
    /// Bytes released since the last strict space-waiter check.
    unchecked: usize,
    partial: Option<Partial>,
    max_message: usize,
    /// The longest payload a `SINGLE` record may carry here: the smaller
    /// of `max_message` and [`max_record_payload`].
    max_single: usize,
    /// Set while a draining receive runs: consuming moves the local head
    /// only, and [`Self::end_defer`] stores it once for the batch.
    defer: bool,
    /// Fragments dropped because their message could not complete (its
    /// sender died mid-message or gave up, or a predecessor consumed the
    /// start).
    pub(crate) discarded: u64,
}

#[inline]
fn valid_flags(flags: u16) -> bool {
    matches!(
        flags,
        flags::SINGLE | flags::FIRST | flags::MIDDLE | flags::LAST | FLAG_PAD | FLAG_ABORT
    )
}

impl Consumer {
    /// Takes over the lane at its published head (a respawned receiver
    /// continues with the first record its predecessor had not consumed).
    pub(crate) fn new(lane: LaneRef, max_message: usize) -> Self {
        let head = lane.ctl().head.0.load(Acquire);
        Self {
            lane,
            head,
            unchecked: 0,
            partial: None,
            max_message,
            max_single: max_message.min(max_record_payload(lane.cap)),
            defer: false,
            discarded: 0,
        }
    }

    /// The lane is empty (the head is at the terminator): make sure a
    /// sender waiting for space knows (F6 in `release_space` orders the
    /// head store before its look).
    #[inline]
    fn found_empty(&mut self) {
        if self.unchecked > 0 {
            if self.defer {
                self.lane.ctl().head.0.store(self.head, Release);
            }
            self.unchecked = 0;
            wake::release_space(&self.lane.ctl().sender.0.space_waiter);
        }
    }

    /// Moves the head past `bytes` already read and publishes it (unless
    /// a draining receive defers that to its end; even then every quarter
    /// lane, which bounds what a receiver killed mid-drain hands its
    /// successor again, and lets the sender go on).
    #[inline]
    fn advance(&mut self, bytes: usize) {
        self.head = self.head.wrapping_add(bytes as u64);
        self.unchecked += bytes;
        if !self.defer || self.unchecked >= self.lane.cap / 4 {
            self.store_head();
        }
    }

    /// Publishes the head.
    #[inline]
    fn store_head(&mut self) {
        let ctl = self.lane.ctl();
        ctl.head.0.store(self.head, Release);
        // A sender waiting for space waits for a quarter lane (see
        // `Endpoint::wait_for_room`), so checking for it every quarter lane
        // and whenever the lane empties (`found_empty`) wakes it exactly
        // when it can go on, with no fence on the per-message path.
        if self.unchecked >= self.lane.cap / 4 {
            self.unchecked = 0;
            wake::release_space(&ctl.sender.0.space_waiter);
        }
    }

    /// Starts a draining receive: records consumed from now on move the
    /// local head only, until [`Self::end_defer`]. The sender sees the
    /// space later, never too early.
    #[inline]
    pub(crate) fn defer_head(&mut self) {
        self.defer = true;
    }

    /// Whether a draining receive deferred this lane's head.
    #[inline]
    pub(crate) fn deferring(&self) -> bool {
        self.defer
    }

    /// Ends a draining receive: one head store for everything it consumed.
    #[inline]
    pub(crate) fn end_defer(&mut self) {
        if self.defer {
            self.defer = false;
            self.store_head();
        }
    }

    /// Releases a record returned as [`Next::InLane`].
    #[inline]
    pub(crate) fn consume(&mut self, record: usize) {
        self.advance(record);
    }

    /// Pointer to `offset` in the ring, for lending a record's payload.
    #[inline]
    pub(crate) fn payload_ptr(&self, offset: usize) -> *const u8 {
        self.lane.at(offset)
    }

    /// The first word at the head, with the head's ring offset and the
    /// bytes before the end of the ring, if the head can be looked at that
    /// way: 8-aligned (a head word that is not, written by a buggy
    /// process, is left to [`Self::next_general`], which reports it) and
    /// with a whole header before the end. The record's second cache line
    /// is fetched with its first, so that their misses overlap (a 64 B
    /// message's record spans two lines). Found empty (the terminator,
    /// zero), the lane tells a sender waiting for space.
    #[inline(always)]
    fn head_word(&mut self) -> Option<(usize, usize, u64)> {
        let offset = (self.head & self.lane.mask()) as usize;
        let contiguous = self.lane.cap - offset;
        if contiguous < RECORD_HEADER || !offset.is_multiple_of(8) {
            return None;
        }
        if contiguous > LINE {
            self.lane.prefetch(offset + LINE);
        }
        // SAFETY: `offset + 32 <= cap` (checked), 8-aligned (checked).
        // Acquire: pairs with the producer's `Release` store of this word
        // in `Producer::publish`.
        let w0 = unsafe { self.lane.word0(offset) }.load(Acquire);
        if w0 == 0 {
            self.found_empty();
        }
        Some((offset, contiguous, w0))
    }

    /// Whether the lane may hold something at its head: the spinning
    /// receiver's look, with nothing copied out; [`Self::next`] then makes
    /// every check. A head [`Self::head_word`] cannot look at counts as
    /// "may": `next` deals with it.
    #[inline(always)]
    pub(crate) fn ready(&mut self) -> bool {
        !matches!(self.head_word(), Some((_, _, 0)))
    }

    /// The next whole message, if any. An error means the lane is corrupt:
    /// the caller must stop using this consumer.
    ///
    /// The common case, a whole message in one record, is checked here
    /// with the header read once as four words and kept in registers;
    /// anything else (padding, a skip at the end of the ring, fragments,
    /// an abort, a message while another is half assembled, and every
    /// kind of garbage) goes to [`Self::next_general`], which reads the
    /// header again and makes every check itself.
    #[inline(always)]
    pub(crate) fn next(&mut self) -> Result<Option<Next>, LaneCorruption> {
        if let Some((offset, contiguous, w0)) = self.head_word() {
            if w0 == 0 {
                return Ok(None);
            }
            let len = w0 as u32 as usize;
            let record = record_size(len);
            if (w0 >> 32) as u16 == committed(flags::SINGLE, self.head)
                && len <= self.max_single
                && record <= contiguous
                && self.partial.is_none()
            {
                // SAFETY: `offset + 32 <= cap` and 8-aligned (`head_word`
                // checked both); committed bytes the producer no longer
                // writes. Read once; only this copy is checked and used.
                let w = unsafe { self.lane.read_rest(offset, w0) };
                if w[1] as u32 == self.lane.sender {
                    return Ok(Some(Next::InLane {
                        hdr: from_words(w),
                        offset: offset + RECORD_HEADER,
                        record,
                    }));
                }
            }
        }
        self.next_general()
    }

    /// [`Self::next`] for everything but a plain single record.
    #[inline(never)]
    fn next_general(&mut self) -> Result<Option<Next>, LaneCorruption> {
        let start = self.head;
        loop {
            // One call reads at most a lane's worth without delivering a
            // message, then lets the caller serve its other lanes: a
            // fragmented message streams on at the next call, and garbage
            // chaining records round the ring (their stamps repeat every
            // 16 KiB of positions) cannot hold the receiver for ever. (A
            // receiver on its way to sleep does not sleep on the rest: the
            // lane held at most a lane's worth when it took the doorbell,
            // so the sender published since, and rang.)
            if self.head.wrapping_sub(start) > self.lane.cap as u64 {
                return Ok(None);
            }
            let offset = (self.head & self.lane.mask()) as usize;
            let contiguous = self.lane.cap - offset;
            if !offset.is_multiple_of(8) {
                return Err(LaneCorruption::Indices {
                    head: self.head,
                    tail: self.head,
                });
            }
            if contiguous < RECORD_HEADER {
                // The producer skipped the last few bytes of the ring (its
                // tail moved past them with the record before).
                self.advance(contiguous);
                continue;
            }
            // SAFETY: `offset + 32 <= cap` (checked: contiguous >= 32),
            // 8-aligned (positions are multiples of 8). Acquire: as in
            // `next`. The rest is read once, after it; every field is
            // checked below before use.
            let w0 = unsafe { self.lane.word0(offset) }.load(Acquire);
            if w0 == 0 {
                self.found_empty();
                return Ok(None);
            }
            // SAFETY: as above.
            let mut hdr = from_words(unsafe { self.lane.read_rest(offset, w0) });
            let kind = hdr.flags & KIND_BITS;
            if hdr.flags != committed(kind, self.head) || !valid_flags(kind) {
                return Err(LaneCorruption::Flags { flags: hdr.flags });
            }
            hdr.flags = kind;
            let len = hdr.len as usize;
            if hdr.flags == FLAG_PAD {
                if len != contiguous - RECORD_HEADER {
                    return Err(LaneCorruption::RecordLength { len: hdr.len });
                }
                self.advance(contiguous);
                continue;
            }
            let record = record_size(len);
            if len > max_record_payload(self.lane.cap) || record > contiguous {
                return Err(LaneCorruption::RecordLength { len: hdr.len });
            }
            if hdr.sender != self.lane.sender {
                return Err(LaneCorruption::Sender { found: hdr.sender });
            }
            let payload_offset = offset + RECORD_HEADER;
            match hdr.flags {
                flags::SINGLE => {
                    if len > self.max_message {
                        return Err(LaneCorruption::RecordLength { len: hdr.len });
                    }
                    self.drop_partial_of_other_generation(&hdr)?;
                    return Ok(Some(Next::InLane {
                        hdr,
                        offset: payload_offset,
                        record,
                    }));
                }
                flags::FIRST => {
                    let total = hdr.total;
                    if total > self.max_message as u64 || total <= len as u64 {
                        return Err(LaneCorruption::Fragment { total });
                    }
                    self.drop_partial_of_other_generation(&hdr)?;
                    let mut buf = Vec::with_capacity(total as usize);
                    self.copy_out(payload_offset, len, &mut buf);
                    self.partial = Some(Partial { first: hdr, buf });
                    self.advance(record);
                }
                FLAG_ABORT => {
                    if len != 0 {
                        return Err(LaneCorruption::RecordLength { len: hdr.len });
                    }
                    if self.partial.take().is_some() {
                        self.discarded += 1;
                    }
                    self.advance(record);
                }
                _ => {
                    // MIDDLE or LAST.
                    let Some(partial) = self
                        .partial
                        .as_mut()
                        .filter(|p| p.first.generation == hdr.generation)
                    else {
                        // Orphan piece: its start was consumed by a previous
                        // receiver, or its sender's message was superseded.
                        self.partial = None;
                        self.discarded += 1;
                        self.advance(record);
                        continue;
                    };
                    let total = partial.first.total;
                    let filled = (partial.buf.len() + len) as u64;
                    let last = hdr.flags == flags::LAST;
                    if filled > total || (last && filled != total) || (!last && filled == total) {
                        return Err(LaneCorruption::Fragment { total });
                    }
                    let mut buf = std::mem::take(&mut partial.buf);
                    self.copy_out(payload_offset, len, &mut buf);
                    self.advance(record);
                    if last {
                        let first = self.partial.take().map(|p| p.first).unwrap_or(hdr);
                        return Ok(Some(Next::Assembled {
                            hdr: first,
                            payload: buf,
                        }));
                    }
                    if let Some(p) = self.partial.as_mut() {
                        p.buf = buf;
                    }
                }
            }
        }
    }

    /// A new message while another is half assembled: if it comes from a
    /// new generation of the sender, the old one died mid-message and its
    /// partial message is discarded; from the same generation it cannot
    /// happen (a sender that gives up writes `ABORT`), so it is corruption.
    fn drop_partial_of_other_generation(&mut self, hdr: &RecordHeader) -> Result<(), LaneCorruption> {
        if let Some(p) = &self.partial {
            if p.first.generation == hdr.generation {
                return Err(LaneCorruption::Fragment { total: p.first.total });
            }
            self.partial = None;
            self.discarded += 1;
        }
        Ok(())
    }

    /// Appends `len` bytes at ring offset `offset` to `buf`.
    pub(super) fn copy_out(&self, offset: usize, len: usize, buf: &mut Vec<u8>) {
        debug_assert!(offset + len <= self.lane.cap);
        debug_assert!(buf.capacity() - buf.len() >= len);
        buf.reserve(len);
        // SAFETY: `offset + len <= cap` (the record was checked to lie inside
        // the ring and the published data); `buf` has room for `len` more
        // bytes (reserved above) and is local memory, so no overlap. The
        // bytes are plain u8, valid whatever they hold.
        unsafe {
            std::ptr::copy_nonoverlapping(self.lane.at(offset), buf.as_mut_ptr().add(buf.len()), len);
            buf.set_len(buf.len() + len);
        }
    }
}
