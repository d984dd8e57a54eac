//! The receiving end of a lane: what the consumer checks before it trusts
//! a byte (see "What the consumer trusts" in [`super`]).

use std::sync::atomic::Ordering::{Acquire, Release};

use super::{
    flags, from_words, indices_valid, max_record_payload, record_size, LaneRef, RecordHeader, FLAG_ABORT,
    FLAG_PAD, RECORD_HEADER,
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

/// The receiving end of one lane. Caches the tail so that a receive reads
/// the sender's cache line only when the cached records are used up.
#[derive(Debug)]
pub(crate) struct Consumer {
    lane: LaneRef,
    pub(super) head: u64,
    tail: u64,
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
            tail: head,
            unchecked: 0,
            partial: None,
            max_message,
            max_single: max_message.min(max_record_payload(lane.cap)),
            defer: false,
            discarded: 0,
        }
    }

    /// Re-reads the published tail (after fence F2 when the doorbell was
    /// taken). Returns whether there is data.
    #[inline]
    fn refresh_tail(&mut self) -> Result<bool, LaneCorruption> {
        let tail = self.lane.ctl().tail.0.load(Acquire);
        indices_valid(self.head, tail, self.lane.cap)?;
        self.tail = tail;
        if tail == self.head && self.unchecked > 0 {
            // The lane is empty: make sure a sender waiting for space knows
            // (F6 in `release_space` orders the head store before its look).
            if self.defer {
                self.lane.ctl().head.0.store(self.head, Release);
            }
            self.unchecked = 0;
            wake::release_space(&self.lane.ctl().sender.0.space_waiter);
        }
        Ok(tail != self.head)
    }

    /// Moves the head past `bytes` already read and publishes it (unless
    /// a draining receive defers that to its end).
    #[inline]
    fn advance(&mut self, bytes: usize) {
        self.head = self.head.wrapping_add(bytes as u64);
        self.unchecked += bytes;
        if !self.defer {
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
        // and whenever the lane empties (`refresh_tail`) wakes it exactly
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
        if self.head == self.tail && !self.refresh_tail()? {
            return Ok(None);
        }
        let avail = self.tail.wrapping_sub(self.head) as usize;
        let offset = (self.head & self.lane.mask()) as usize;
        let contiguous = self.lane.cap - offset;
        if contiguous >= RECORD_HEADER && avail >= RECORD_HEADER {
            if avail > LINE && contiguous > LINE {
                // The record (or the next) goes on into the next cache
                // line: load it now, so that its miss overlaps the
                // header's instead of following it.
                // SAFETY: `offset + 64 < cap`; published bytes.
                unsafe { self.lane.data.as_ptr().add(offset + LINE).read_volatile() };
            }
            // SAFETY: `offset + 32 <= cap` (checked), 8-aligned (positions
            // are multiples of 8); published bytes the producer no longer
            // writes. Read once; only this copy is checked and used.
            let w = unsafe { self.lane.read_words(offset) };
            let len = w[0] as u32 as usize;
            let record = record_size(len);
            if (w[0] >> 32) as u16 == flags::SINGLE
                && len <= self.max_single
                && record <= contiguous
                && record <= avail
                && w[1] as u32 == self.lane.sender
                && self.partial.is_none()
            {
                return Ok(Some(Next::InLane {
                    hdr: from_words(w),
                    offset: offset + RECORD_HEADER,
                    record,
                }));
            }
        }
        self.next_general()
    }

    /// [`Self::next`] for everything but a plain single record.
    #[inline(never)]
    fn next_general(&mut self) -> Result<Option<Next>, LaneCorruption> {
        loop {
            if self.head == self.tail && !self.refresh_tail()? {
                return Ok(None);
            }
            let avail = self.tail.wrapping_sub(self.head) as usize;
            let offset = (self.head & self.lane.mask()) as usize;
            let contiguous = self.lane.cap - offset;
            if contiguous < RECORD_HEADER {
                // The producer skipped the last few bytes of the ring.
                if avail < contiguous {
                    return Err(LaneCorruption::Indices {
                        head: self.head,
                        tail: self.tail,
                    });
                }
                self.advance(contiguous);
                continue;
            }
            if avail < RECORD_HEADER {
                return Err(LaneCorruption::Indices {
                    head: self.head,
                    tail: self.tail,
                });
            }
            // SAFETY: `offset + 32 <= cap` (checked: contiguous >= 32),
            // 8-aligned (positions are multiples of 8); published bytes the
            // producer no longer writes. Copied out once; every field is
            // checked below before use.
            let hdr = from_words(unsafe { self.lane.read_words(offset) });
            if !valid_flags(hdr.flags) {
                return Err(LaneCorruption::Flags { flags: hdr.flags });
            }
            let len = hdr.len as usize;
            if hdr.flags == FLAG_PAD {
                if len != contiguous - RECORD_HEADER || avail < contiguous {
                    return Err(LaneCorruption::RecordLength { len: hdr.len });
                }
                self.advance(contiguous);
                continue;
            }
            let record = record_size(len);
            if len > max_record_payload(self.lane.cap) || record > contiguous || record > avail {
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
