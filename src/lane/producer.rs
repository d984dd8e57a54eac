//! The sending end of a lane: planning a record (padding at the wrap
//! included), writing it, publishing the tail, and waiting for room.

use std::sync::atomic::Ordering::{AcqRel, Acquire, Release};

use super::{indices_valid, record_size, to_words, LaneRef, RecordHeader, Words, FLAG_PAD, RECORD_HEADER};
use crate::error::LaneCorruption;
use crate::wake;

/// The sending end of one lane. Caches the head so that a send reads the
/// receiver's cache line only when the lane looks full.
#[derive(Debug)]
pub(crate) struct Producer {
    lane: LaneRef,
    /// Local write position: published up to `ctl.tail`, and beyond it
    /// while records are being written.
    pub(super) tail: u64,
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
    /// Takes over the lane at its published tail (a respawned sender
    /// continues where its predecessor's last complete record ended). If the
    /// published indices are impossible, every write reports the lane
    /// corrupt and nothing is written.
    pub(crate) fn new(lane: LaneRef) -> Self {
        let tail = lane.ctl().tail.0.load(Acquire);
        let head = lane.ctl().head.0.load(Acquire);
        let broken = indices_valid(head, tail, lane.cap).err();
        Self {
            lane,
            tail,
            head: if broken.is_some() {
                tail.wrapping_sub(lane.cap as u64)
            } else {
                head
            },
            broken,
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

    /// Free bytes a record of `len` payload bytes at the local tail needs,
    /// with its padding and `keep` more bytes.
    #[inline]
    pub(crate) fn need(&self, len: usize, keep: usize) -> usize {
        let rec = record_size(len);
        self.padding_at(self.tail, rec) + rec + keep
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
            pos = pos.wrapping_add((self.padding_at(pos, rec) + rec) as u64);
            left -= chunk;
            let end = pos.wrapping_sub(self.tail) as usize;
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
        if !self.has_room(padding + rec + keep)? {
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
    /// (`hdr.len` bytes, at most the planned length) is already in place, and
    /// moves the local tail past it. Not visible until [`Self::publish`].
    #[inline]
    pub(crate) fn commit(&mut self, planned: Planned, hdr: RecordHeader) {
        if planned.padding > 0 {
            let offset = (self.tail & self.lane.mask()) as usize;
            if planned.padding >= RECORD_HEADER {
                let pad = RecordHeader {
                    len: (planned.padding - RECORD_HEADER) as u32,
                    flags: FLAG_PAD,
                    sender: self.lane.sender,
                    ..RecordHeader::default()
                };
                // SAFETY: `offset + 32 <= cap` (padding >= 32 bytes remain
                // before the end), 8-aligned; free space, so the consumer
                // does not read it concurrently.
                unsafe { self.lane.write_words(offset, to_words(&pad)) };
            }
            self.tail = self.tail.wrapping_add(planned.padding as u64);
        }
        let offset = (self.tail & self.lane.mask()) as usize;
        debug_assert_eq!(offset + RECORD_HEADER, planned.payload_offset);
        debug_assert!(offset + record_size(hdr.len as usize) <= self.lane.cap);
        assert!(offset + RECORD_HEADER <= self.lane.cap);
        // SAFETY: the plan put a whole record at `offset`, inside the ring
        // (checked), 8-aligned, in space the consumer does not read until
        // published.
        unsafe { self.lane.write_words(offset, to_words(&hdr)) };
        self.tail = self.tail.wrapping_add(record_size(hdr.len as usize) as u64);
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
        if self.free() < rec || self.lane.cap - offset < rec {
            return false;
        }
        // SAFETY: `offset + rec <= cap` (checked) with `rec >= 32`, and
        // `offset` is 8-aligned (positions are); the cached head says the
        // `rec` bytes from the tail are free, and the head only moves on,
        // so the consumer does not read them until they are published.
        // `payload` is local memory, so the copy cannot overlap.
        unsafe {
            self.lane.write_words(offset, w);
            std::ptr::copy_nonoverlapping(
                payload.as_ptr(),
                self.lane.data.as_ptr().add(offset + RECORD_HEADER),
                payload.len(),
            );
        }
        self.tail = self.tail.wrapping_add(rec as u64);
        true
    }

    /// Makes every committed record visible to the consumer. The caller
    /// then rings the doorbell ([`wake::notify`]).
    #[inline]
    pub(crate) fn publish(&mut self) {
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
