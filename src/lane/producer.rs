//! The sending end of a lane: planning a record (padding at the wrap
//! included), writing it, committing it, and waiting for room.

use std::sync::atomic::Ordering::{AcqRel, Acquire, Release};

use super::{
    committed, from_words, indices_valid, max_record_payload, next_start, record_size, to_words, LaneRef,
    RecordHeader, Words, FLAG_PAD, KIND_BITS, RECORD_HEADER,
};
use crate::error::LaneCorruption;
use crate::wake;

/// The sending end of one lane. Caches the head so that a send reads the
/// receiver's cache line only when the lane looks full.
#[derive(Debug)]
pub(crate) struct Producer {
    lane: LaneRef,
    /// Local write position: where the next record starts (never in the
    /// last 31 bytes of the ring, which are skipped). Committed up to
    /// `published`, and beyond it while records are being written.
    pub(super) tail: u64,
    /// Where the first record not yet published starts: its first word
    /// (`first_word0`) is stored, with `Release`, by [`Self::publish`];
    /// the records after it are committed as they are written, since the
    /// consumer cannot reach them before it.
    published: u64,
    /// The first word of the record at `published`, when `tail !=
    /// published`.
    first_word0: u64,
    /// Last head read from the lane.
    head: u64,
    /// Set when the lane's indices were impossible when this producer took
    /// it over; nothing is ever written then (the cached head then says
    /// the lane is full, so every write takes the path that reports it).
    broken: Option<LaneCorruption>,
}

/// Space planned for a record: the padding to write before it and where its
/// payload goes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Planned {
    padding: usize,
    payload_offset: usize,
}

impl Producer {
    /// Takes over the lane where its predecessor's last committed record
    /// ends: at the published tail, then past every record committed after
    /// it (a predecessor stores the tail after the commit, so one that died
    /// in between left committed records past its tail; their consumer may
    /// already have read them). If the published indices are impossible,
    /// every write reports the lane corrupt and nothing is written.
    pub(crate) fn new(lane: LaneRef) -> Self {
        let head = lane.ctl().head.0.load(Acquire);
        let stored = lane.ctl().tail.0.load(Acquire);
        // The consumer may be ahead of the stored tail (it read records
        // committed after it), never more than a lane either way.
        let ahead = head.wrapping_sub(stored);
        let mut broken = if !stored.is_multiple_of(8)
            || !head.is_multiple_of(8)
            || (ahead > lane.cap as u64 && ahead.wrapping_neg() > lane.cap as u64)
        {
            Some(LaneCorruption::Indices { head, tail: stored })
        } else {
            None
        };
        let mut tail = stored;
        if broken.is_none() {
            tail = Self::scan_committed(&lane, head, next_start(stored, lane.cap));
            if indices_valid(head, tail, lane.cap).is_err() {
                // Short of the consumer's head: these are not records.
                broken = Some(LaneCorruption::Indices { head, tail: stored });
                tail = stored;
            } else if tail != stored {
                lane.ctl().tail.0.store(tail, Release);
            }
        }
        Self {
            lane,
            tail,
            published: tail,
            first_word0: 0,
            head: if broken.is_some() {
                tail.wrapping_sub(lane.cap as u64)
            } else {
                head
            },
            broken,
        }
    }

    /// The end of the committed records from `pos` on: stops at the first
    /// word that does not commit a well-formed record at its position
    /// (normally the terminator its writer put there), or where the lane
    /// would be full.
    fn scan_committed(lane: &LaneRef, head: u64, mut pos: u64) -> u64 {
        let cap = lane.cap as u64;
        // Whether a record may end at `end`: at most a lane behind the
        // head (read already) or ahead of it with room for the terminator.
        let fits =
            |end: u64| head.wrapping_sub(end) <= cap || end.wrapping_sub(head) <= cap - RECORD_HEADER as u64;
        loop {
            let offset = (pos & lane.mask()) as usize;
            let contiguous = lane.cap - offset;
            if contiguous < RECORD_HEADER {
                return pos;
            }
            // SAFETY: `offset + 32 <= cap`, 8-aligned (`pos` is).
            let w0 = unsafe { lane.word0(offset) }.load(Acquire);
            let hdr = from_words([w0, 0, 0, 0]);
            let kind = hdr.flags & KIND_BITS;
            if hdr.flags != committed(kind, pos) {
                return pos;
            }
            let rec = if kind == FLAG_PAD {
                contiguous
            } else if hdr.len as usize <= max_record_payload(lane.cap) {
                record_size(hdr.len as usize)
            } else {
                return pos;
            };
            let next = next_start(pos.wrapping_add(rec as u64), lane.cap);
            if rec > contiguous || !fits(next) {
                return pos;
            }
            pos = next;
        }
    }

    /// Bytes free as far as the cached head knows.
    #[inline]
    fn free(&self) -> usize {
        self.lane.cap - self.tail.wrapping_sub(self.head) as usize
    }

    /// Re-reads the head (after fence F5 when waiting for space).
    #[inline]
    pub(crate) fn refresh_head(&mut self) -> Result<(), LaneCorruption> {
        if let Some(e) = self.broken {
            return Err(e);
        }
        let head = self.lane.ctl().head.0.load(Acquire);
        indices_valid(head, self.tail, self.lane.cap)?;
        self.head = head;
        Ok(())
    }

    /// Whether `need` bytes are free, refreshing the head if the cached one
    /// says no.
    #[inline]
    pub(crate) fn has_room(&mut self, need: usize) -> Result<bool, LaneCorruption> {
        // A broken lane's cached head says "full" (see `new`).
        if self.free() >= need {
            return Ok(true);
        }
        self.refresh_head()?;
        Ok(self.free() >= need)
    }

    /// Padding needed before a record of `rec` bytes starting at `pos`.
    #[inline]
    fn padding_at(&self, pos: u64, rec: usize) -> usize {
        let contiguous = self.lane.cap - (pos & self.lane.mask()) as usize;
        if contiguous < rec {
            contiguous
        } else {
            0
        }
    }

    /// Free bytes a record of `rec` bytes at `pos` takes with its padding,
    /// the bytes skipped after it and its terminator.
    #[inline]
    fn span_at(&self, pos: u64, rec: usize) -> usize {
        let end = pos.wrapping_add((self.padding_at(pos, rec) + rec) as u64);
        next_start(end, self.lane.cap).wrapping_sub(pos) as usize + RECORD_HEADER
    }

    /// Free bytes a record of `len` payload bytes at the local tail needs,
    /// with its padding, its terminator and `keep` more bytes.
    #[inline]
    pub(crate) fn need(&self, len: usize, keep: usize) -> usize {
        self.span_at(self.tail, record_size(len)) + keep
    }

    /// Free bytes a whole message of `len` bytes needs at the local tail when
    /// cut into pieces of at most `piece` bytes, with `keep` bytes free after
    /// every piece but the last (as the fragmented writer plans them); `None`
    /// if more than a lane.
    #[inline]
    pub(crate) fn need_for_message(&self, len: usize, piece: usize, keep: usize) -> Option<usize> {
        let mut pos = self.tail;
        let mut left = len;
        let mut need = 0;
        loop {
            let chunk = left.min(piece);
            let rec = record_size(chunk);
            let span = self.span_at(pos, rec);
            pos = pos.wrapping_add((span - RECORD_HEADER) as u64);
            left -= chunk;
            let end = pos.wrapping_sub(self.tail) as usize + RECORD_HEADER;
            need = need.max(if left == 0 { end } else { end + keep });
            if need > self.lane.cap {
                return None;
            }
            if left == 0 {
                return Some(need);
            }
        }
    }

    /// Plans a record of `len` payload bytes at the local tail, if there is
    /// room for it, its padding and `keep` more bytes.
    #[inline]
    pub(crate) fn plan(&mut self, len: usize, keep: usize) -> Result<Option<Planned>, LaneCorruption> {
        let rec = record_size(len);
        let padding = self.padding_at(self.tail, rec);
        if !self.has_room(self.span_at(self.tail, rec) + keep)? {
            return Ok(None);
        }
        let payload_offset =
            (self.tail.wrapping_add(padding as u64) & self.lane.mask()) as usize + RECORD_HEADER;
        Ok(Some(Planned {
            padding,
            payload_offset,
        }))
    }

    /// Where a planned record's payload goes: `len` writable bytes of free
    /// lane space (the consumer reads nothing past the published tail).
    #[inline]
    pub(crate) fn payload_ptr(&self, planned: Planned) -> *mut u8 {
        self.lane.at(planned.payload_offset)
    }

    /// Writes the padding and the header of a planned record whose payload
    /// (`hdr.len` bytes, at most the planned length) is already in place,
    /// and moves the local tail past it. Not visible until
    /// [`Self::publish`].
    #[inline]
    pub(crate) fn commit(&mut self, planned: Planned, hdr: RecordHeader) {
        if planned.padding > 0 {
            // The tail is never in the skipped bytes, so at least a header's
            // worth is left before the end.
            debug_assert!(planned.padding >= RECORD_HEADER);
            let pad = RecordHeader {
                len: (planned.padding - RECORD_HEADER) as u32,
                flags: FLAG_PAD,
                sender: self.lane.sender,
                ..RecordHeader::default()
            };
            let at = self.tail;
            self.tail = self.tail.wrapping_add(planned.padding as u64);
            // The record's terminator is written before anything commits.
            self.put(at, to_words(&pad));
        }
        let offset = (self.tail & self.lane.mask()) as usize;
        debug_assert_eq!(offset + RECORD_HEADER, planned.payload_offset);
        let rec = record_size(hdr.len as usize);
        assert!(offset + rec <= self.lane.cap);
        let at = self.tail;
        self.tail = next_start(self.tail.wrapping_add(rec as u64), self.lane.cap);
        self.terminate(self.tail);
        self.put(at, to_words(&hdr));
    }

    /// Writes the terminator, a zero first word, at `pos`: the consumer
    /// that gets there finds no record until one is committed there. Must
    /// come before the commit of the record that ends at `pos`, so that
    /// the consumer never reads what an earlier lap left there.
    #[inline(always)]
    fn terminate(&self, pos: u64) {
        let offset = (pos & self.lane.mask()) as usize;
        debug_assert!(offset + RECORD_HEADER <= self.lane.cap);
        // SAFETY: `pos` is where a record may start, so `offset + 32 <=
        // cap`; 8-aligned; the room for it was planned (`span_at`), and the
        // consumer reads it only after the commit that follows.
        unsafe { self.lane.write_word0(offset, 0) };
    }

    /// Writes header `w` of the record at `pos` (its payload in place, its
    /// terminator written) and commits it: its first word is
    /// stored now, or, for the first record not yet published, kept for
    /// [`Self::publish`].
    #[inline(always)]
    fn put(&mut self, pos: u64, mut w: Words) {
        let offset = (pos & self.lane.mask()) as usize;
        assert!(offset + RECORD_HEADER <= self.lane.cap);
        let flags = (w[0] >> 32) as u16;
        w[0] = w[0] & !(0xFFFF << 32) | u64::from(committed(flags, pos)) << 32;
        // SAFETY: `offset + 32 <= cap` (checked), 8-aligned; planned free
        // space, which the consumer does not read until it is committed.
        unsafe { self.lane.write_rest(offset, w) };
        if pos == self.published {
            self.first_word0 = w[0];
        } else {
            // The consumer cannot get here before the record at
            // `published`, whose `Release` store orders this one too.
            // SAFETY: as above.
            unsafe { self.lane.write_word0(offset, w[0]) };
        }
    }

    /// Copies `payload` into a planned record and commits it.
    pub(crate) fn write(&mut self, planned: Planned, hdr: RecordHeader, payload: &[u8]) {
        debug_assert_eq!(hdr.len as usize, payload.len());
        // SAFETY: the plan reserved `payload.len()` bytes at the payload
        // pointer inside the ring; `payload` is local memory, so the two
        // cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), self.payload_ptr(planned), payload.len()) };
        self.commit(planned, hdr);
    }

    /// The common send in one step: writes a single-record message with
    /// header words `w` (whose length is `payload.len()`) at the local
    /// tail, if the cached head says there is room and the record needs no
    /// padding. Not visible until [`Self::publish`]. Returns false, having
    /// written nothing, otherwise: the caller then takes the general path
    /// ([`Self::plan`], which re-reads the head, pads, or reports a broken
    /// lane).
    #[inline(always)]
    pub(crate) fn try_write_single(&mut self, w: Words, payload: &[u8]) -> bool {
        debug_assert_eq!(w[0] as u32 as usize, payload.len());
        let rec = record_size(payload.len());
        let offset = (self.tail & self.lane.mask()) as usize;
        let end = next_start(self.tail.wrapping_add(rec as u64), self.lane.cap);
        let span = end.wrapping_sub(self.tail) as usize + RECORD_HEADER;
        if self.free() < span || self.lane.cap - offset < rec {
            return false;
        }
        self.terminate(end);
        // SAFETY: `offset + rec <= cap` (checked) with `rec >= 32`, and
        // `offset` is 8-aligned (positions are); the cached head says the
        // bytes from the tail to the terminator's end are free, and the
        // head only moves on, so the consumer does not read them until
        // they are committed. `payload` is local memory, so the copy
        // cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                payload.as_ptr(),
                self.lane.data.as_ptr().add(offset + RECORD_HEADER),
                payload.len(),
            );
        }
        let at = self.tail;
        self.tail = end;
        self.put(at, w);
        true
    }

    /// Makes every committed record visible to the consumer. The caller
    /// then rings the doorbell ([`wake::notify`]).
    #[inline]
    pub(crate) fn publish(&mut self) {
        if self.tail == self.published {
            return;
        }
        let offset = (self.published & self.lane.mask()) as usize;
        // SAFETY: a record starts at `published`: `offset + 32 <= cap`,
        // 8-aligned. Release: pairs with the consumer's `Acquire` load of
        // this word, after which every record written since is complete.
        unsafe { self.lane.word0(offset) }.store(self.first_word0, Release);
        self.published = self.tail;
        // For a successor (which scans on from here) and for statistics;
        // the consumer does not read it.
        self.lane.ctl().tail.0.store(self.tail, Release);
    }

    /// Says whether this sender is half way through a fragmented message:
    /// `true` before it publishes the first fragment, `false` after the
    /// last (see `SenderWords::streaming` in `segment::schema`). Release:
    /// whoever sees the first fragment published and then this sender dead
    /// finds it set.
    pub(crate) fn set_streaming(&self, on: bool) {
        self.lane.ctl().sender.0.streaming.store(u32::from(on), Release);
    }

    /// For whoever cleans up after this lane's dead sender: whether it died
    /// half way through a fragmented message (the flag is cleared). Then
    /// the cleaner writes an `ABORT` ([`super::flags::ABORT`], room for
    /// which the sender always kept).
    pub(crate) fn take_streaming(&self) -> bool {
        self.lane.ctl().sender.0.streaming.swap(0, AcqRel) != 0
    }

    /// Sender half of waiting for space: see [`wake::wait_for_space`].
    /// Returns whether `need` bytes are free now.
    pub(crate) fn wait_for_room(
        &mut self,
        need: usize,
        timeout: std::time::Duration,
    ) -> Result<bool, LaneCorruption> {
        let mut err = None;
        let lane = self.lane;
        let room = wake::wait_for_space(
            &lane.ctl().sender.0.space_waiter,
            || match self.has_room(need) {
                Ok(room) => room,
                Err(e) => {
                    err = Some(e);
                    true
                }
            },
            timeout,
        );
        match err {
            Some(e) => Err(e),
            None => Ok(room || self.has_room(need)?),
        }
    }

    /// A header for a record from this lane's sender.
    #[inline]
    pub(crate) fn header(&self, generation: u32, len: usize, flags: u16) -> RecordHeader {
        RecordHeader {
            len: len as u32,
            flags,
            sender: self.lane.sender,
            generation,
            ..RecordHeader::default()
        }
    }
}
