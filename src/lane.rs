//! Single-producer single-consumer byte rings ("lanes"), record framing,
//! padding at wrap, and fragmentation of messages larger than half a lane.
//!
//! One lane per (sender, receiver) pair: only the sender writes records and
//! the tail, only the receiver writes the head. Nothing is ever CASed between
//! producers, and a producer that dies mid-write leaves nothing visible,
//! because it never published the tail past what it was writing.
//!
//! # Records
//!
//! A record is a [`RecordHeader`] (32 bytes) and its payload, padded to 8
//! bytes. Positions (`head`, `tail`) are byte counts since the lane was made;
//! they never wrap (2^64 bytes), and the ring offset is `pos & (cap - 1)`.
//! A record never wraps around the end of the ring: if it does not fit in the
//! bytes left before the end, the producer first fills them with a padding
//! record (`FLAG_PAD`), or, when fewer than 32 bytes are left, skips them
//! (the consumer does the same arithmetic).
//!
//! A message of more than [`max_record_payload`] bytes goes out as
//! fragments: `FIRST` (with the total length), middle pieces, `LAST`. The
//! producer publishes fragments as space frees up, so a message of any size
//! up to `max_message` streams through a lane of any size. If a blocking
//! send gives up half way, it writes an `ABORT` record (for which it always
//! keeps 32 bytes free) so the receiver drops the partial message.
//!
//! # What the consumer trusts
//!
//! Nothing. It reads the tail once per refresh and checks it against its own
//! head; it copies each header out of the ring once and checks its length,
//! flags, sender and fragment sequence before touching the payload. A lane
//! that fails a check is poisoned ([`LaneCorruption`]); it never causes a
//! panic or a read outside the ring.

use std::ptr::NonNull;
use std::sync::atomic::{
    AtomicU32, AtomicU64,
    Ordering::{AcqRel, Acquire, Release},
};

use crate::error::LaneCorruption;
use crate::wake;

/// Bytes in a record header.
pub(crate) const RECORD_HEADER: usize = 32;
/// Records start on 8-byte boundaries. Measured against 64-byte (cache
/// line) alignment, which avoids consecutive records sharing a line: that
/// made the spinning 64 B round trip 10-15% faster but cut 64 B one-way
/// throughput by 40-50% (a 64 B message takes 128 lane bytes instead of 96).
const ALIGN: usize = 8;

/// First fragment of a message (or the only one, with `FLAG_LAST`).
const FLAG_FIRST: u16 = 1;
/// Last fragment of a message (or the only one, with `FLAG_FIRST`).
const FLAG_LAST: u16 = 2;
/// Filler up to the end of the ring.
const FLAG_PAD: u16 = 4;
/// The sender gave up on the message whose fragments precede this record.
const FLAG_ABORT: u16 = 8;

/// The header of every record in a lane. Written by the producer before it
/// publishes the tail past it; copied out once by the consumer.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    /// Payload bytes in this record (not counting padding to 8).
    pub(crate) len: u32,
    /// `FLAG_*` bits.
    pub(crate) flags: u16,
    /// The message kind chosen by the sender (`Tag::kind`).
    pub(crate) kind: u16,
    /// The sending slot; must equal the lane's sender.
    pub(crate) sender: u32,
    /// The sender's generation.
    pub(crate) generation: u32,
    /// The sender's correlation id (`Tag::correlation`).
    pub(crate) correlation: u64,
    /// The whole message's length, in a `FIRST` record; 0 otherwise.
    pub(crate) total: u64,
}

const _: () = assert!(size_of::<RecordHeader>() == RECORD_HEADER);
const _: () = assert!(align_of::<RecordHeader>() <= ALIGN);

/// A word on a cache line of its own (128 bytes: adjacent-line prefetch on
/// x86 pulls lines in pairs), so the head, written by the receiver, and the
/// tail, written by the sender, never share a line.
#[repr(C, align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

/// A lane's control block in the segment. All-zero is the empty lane.
#[repr(C)]
pub(crate) struct LaneControl {
    /// Receiver's position: bytes consumed. Written only by the receiver,
    /// with `Release` after it has copied a record out (pairs with the
    /// producer's `Acquire` load in `Producer::refresh_head`, after which it
    /// may overwrite those bytes).
    pub(crate) head: Padded<AtomicU64>,
    /// Sender's position: bytes published. Written only by the sender, with
    /// `Release` once the records before it are complete (pairs with the
    /// consumer's `Acquire` load in `Consumer::refresh_tail`). The doorbell
    /// handshake in [`crate::wake`] (fences F1/F2) orders it against the
    /// doorbell.
    pub(crate) tail: Padded<AtomicU64>,
    /// The sender's slow path, on a line of its own.
    pub(crate) sender: Padded<SenderWords>,
}

/// The words of a lane's slow sends: waiting for space, and streaming a
/// message in fragments.
#[repr(C)]
pub(crate) struct SenderWords {
    /// 1 while the sender waits for space ([`wake::wait_for_space`]);
    /// cleared by whoever wakes it ([`wake::release_space`]).
    pub(crate) space_waiter: AtomicU32,
    /// 1 from before the sender publishes the first fragment of a message
    /// until after it has published the last one (or its `ABORT`): a
    /// sender that dies meanwhile left its receiver assembling a message
    /// that will never end, and whoever cleans up after it (the master, or
    /// the slot's next holder) writes the `ABORT` that drops it. Written by
    /// the sender only ([`Producer::set_streaming`]), and by that cleaner
    /// once the sender is dead ([`Producer::take_streaming`]).
    pub(crate) streaming: AtomicU32,
}

const _: () = assert!(size_of::<LaneControl>() == 3 * 128);

/// The largest payload a single record may carry in a lane of `cap` bytes:
/// half a lane less two headers, so a record, the padding before it and the
/// 32 bytes kept for an `ABORT` always fit in an empty lane.
pub(crate) const fn max_record_payload(cap: usize) -> usize {
    cap / 2 - 2 * RECORD_HEADER
}

/// Bytes a record with `len` payload bytes occupies.
pub(crate) const fn record_size(len: usize) -> usize {
    (RECORD_HEADER + len).div_ceil(ALIGN) * ALIGN
}

/// Where one lane lives. Plain pointers, copied freely; the producer and
/// consumer built on it enforce who writes what.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LaneRef {
    ctl: NonNull<LaneControl>,
    data: NonNull<u8>,
    cap: usize,
    sender: u32,
}

impl LaneRef {
    /// # Safety
    /// `ctl` must point to a `LaneControl` (any bit pattern: it is only
    /// atomics) and `data` to `cap` bytes, both valid, and aligned (128 and
    /// 8), for as long as any producer or consumer made from this `LaneRef`
    /// is used. `cap` must be a power of two of at least 4096. At most one
    /// [`Producer`] and one [`Consumer`] may use a lane at a time, across all
    /// processes.
    pub(crate) unsafe fn new(ctl: NonNull<LaneControl>, data: NonNull<u8>, cap: usize, sender: u32) -> Self {
        debug_assert!(cap.is_power_of_two() && cap >= 4096);
        Self {
            ctl,
            data,
            cap,
            sender,
        }
    }

    pub(crate) fn ctl(&self) -> &LaneControl {
        // SAFETY: `new`'s contract: valid and aligned for our lifetime; the
        // struct holds only atomics, so a shared reference is sound even
        // while another process writes it.
        unsafe { self.ctl.as_ref() }
    }

    fn mask(&self) -> u64 {
        self.cap as u64 - 1
    }

    /// Bytes published and not yet consumed, for statistics: garbage
    /// indices read as at most a full lane.
    pub(crate) fn depth(&self) -> u64 {
        let tail = self.ctl().tail.0.load(Acquire);
        let head = self.ctl().head.0.load(Acquire);
        tail.wrapping_sub(head).min(self.cap as u64)
    }

    /// Pointer to ring offset `offset` (`<= cap`: the payload of an empty
    /// record in the last 32 bytes starts one past the end, where nothing is
    /// read or written).
    fn at(&self, offset: usize) -> *mut u8 {
        assert!(offset <= self.cap);
        // SAFETY: `offset <= cap` and `data` is valid for `cap` bytes; one
        // past the end is a valid pointer to form.
        unsafe { self.data.as_ptr().add(offset) }
    }
}

/// The sending end of one lane. Caches the head so that a send reads the
/// receiver's cache line only when the lane looks full.
#[derive(Debug)]
pub(crate) struct Producer {
    lane: LaneRef,
    /// Local write position: published up to `ctl.tail`, and beyond it
    /// while records are being written.
    tail: u64,
    /// Last head read from the lane.
    head: u64,
    /// Set when the lane's indices were impossible when this producer took
    /// it over; nothing is ever written then.
    broken: Option<LaneCorruption>,
}

/// Whether `head` and `tail` can be a lane's indices: 8-aligned, and
/// `0 <= tail - head <= cap` in wrapping arithmetic (positions count bytes
/// modulo 2^64; `cap` divides 2^64, so ring offsets stay right across the
/// wrap).
fn indices_valid(head: u64, tail: u64, cap: usize) -> Result<(), LaneCorruption> {
    if head % ALIGN as u64 != 0 || tail % ALIGN as u64 != 0 || tail.wrapping_sub(head) > cap as u64 {
        return Err(LaneCorruption::Indices { head, tail });
    }
    Ok(())
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
            head: if broken.is_some() { tail } else { head },
            broken,
        }
    }

    /// Bytes free as far as the cached head knows.
    fn free(&self) -> usize {
        self.lane.cap - self.tail.wrapping_sub(self.head) as usize
    }

    /// Re-reads the head (after fence F5 when waiting for space).
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
    pub(crate) fn has_room(&mut self, need: usize) -> Result<bool, LaneCorruption> {
        if self.broken.is_none() && self.free() >= need {
            return Ok(true);
        }
        self.refresh_head()?;
        Ok(self.free() >= need)
    }

    /// Padding needed before a record of `rec` bytes starting at `pos`.
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
    pub(crate) fn need(&self, len: usize, keep: usize) -> usize {
        let rec = record_size(len);
        self.padding_at(self.tail, rec) + rec + keep
    }

    /// Free bytes a whole message of `len` bytes needs at the local tail when
    /// cut into pieces of at most `piece` bytes, with `keep` bytes free after
    /// every piece but the last (as the fragmented writer plans them); `None`
    /// if more than a lane.
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
    pub(crate) fn payload_ptr(&self, planned: Planned) -> *mut u8 {
        self.lane.at(planned.payload_offset)
    }

    /// Writes the padding and the header of a planned record whose payload
    /// (`hdr.len` bytes, at most the planned length) is already in place, and
    /// moves the local tail past it. Not visible until [`Self::publish`].
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
                unsafe { self.lane.at(offset).cast::<RecordHeader>().write(pad) };
            }
            self.tail = self.tail.wrapping_add(planned.padding as u64);
        }
        let offset = (self.tail & self.lane.mask()) as usize;
        debug_assert_eq!(offset + RECORD_HEADER, planned.payload_offset);
        debug_assert!(offset + record_size(hdr.len as usize) <= self.lane.cap);
        // SAFETY: the plan put a whole record at `offset`, inside the ring,
        // 8-aligned, in space the consumer does not read until published.
        unsafe { self.lane.at(offset).cast::<RecordHeader>().write(hdr) };
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

    /// Makes every committed record visible to the consumer. The caller
    /// then rings the doorbell ([`wake::notify`]).
    #[inline]
    pub(crate) fn publish(&mut self) {
        self.lane.ctl().tail.0.store(self.tail, Release);
    }

    /// Says whether this sender is half way through a fragmented message:
    /// `true` before it publishes the first fragment, `false` after the
    /// last (see [`SenderWords::streaming`]). Release: whoever sees the
    /// first fragment published and then this sender dead finds it set.
    pub(crate) fn set_streaming(&self, on: bool) {
        self.lane.ctl().sender.0.streaming.store(u32::from(on), Release);
    }

    /// For whoever cleans up after this lane's dead sender: whether it died
    /// half way through a fragmented message (the flag is cleared). Then
    /// the cleaner writes an `ABORT` ([`flags::ABORT`], room for which the
    /// sender always kept).
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

/// Flags for the pieces of a message.
pub(crate) mod flags {
    pub(crate) const SINGLE: u16 = super::FLAG_FIRST | super::FLAG_LAST;
    pub(crate) const FIRST: u16 = super::FLAG_FIRST;
    pub(crate) const MIDDLE: u16 = 0;
    pub(crate) const LAST: u16 = super::FLAG_LAST;
    pub(crate) const ABORT: u16 = super::FLAG_ABORT;
}

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
    head: u64,
    tail: u64,
    /// Bytes released since the last strict space-waiter check.
    unchecked: usize,
    partial: Option<Partial>,
    max_message: usize,
    /// Fragments dropped because their message could not complete (its
    /// sender died mid-message or gave up, or a predecessor consumed the
    /// start).
    pub(crate) discarded: u64,
}

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
            discarded: 0,
        }
    }

    /// Re-reads the published tail (after fence F2 when the doorbell was
    /// taken). Returns whether there is data.
    fn refresh_tail(&mut self) -> Result<bool, LaneCorruption> {
        let tail = self.lane.ctl().tail.0.load(Acquire);
        indices_valid(self.head, tail, self.lane.cap)?;
        self.tail = tail;
        if tail == self.head && self.unchecked > 0 {
            // The lane is empty: make sure a sender waiting for space knows.
            self.unchecked = 0;
            wake::release_space(&self.lane.ctl().sender.0.space_waiter);
        }
        Ok(tail != self.head)
    }

    /// Moves the head past `bytes` already read and publishes it.
    fn advance(&mut self, bytes: usize) {
        self.head = self.head.wrapping_add(bytes as u64);
        let ctl = self.lane.ctl();
        ctl.head.0.store(self.head, Release);
        // A sender waiting for space waits for a quarter lane (see
        // `Endpoint::wait_for_room`), so checking for it every quarter lane
        // and whenever the lane empties (`refresh_tail`) wakes it exactly
        // when it can go on, with no fence on the per-message path.
        self.unchecked += bytes;
        if self.unchecked >= self.lane.cap / 4 {
            self.unchecked = 0;
            wake::release_space(&ctl.sender.0.space_waiter);
        }
    }

    /// Releases a record returned as [`Next::InLane`].
    pub(crate) fn consume(&mut self, record: usize) {
        self.advance(record);
    }

    /// Pointer to `offset` in the ring, for lending a record's payload.
    pub(crate) fn payload_ptr(&self, offset: usize) -> *const u8 {
        self.lane.at(offset)
    }

    /// The next whole message, if any. An error means the lane is corrupt:
    /// the caller must stop using this consumer.
    pub(crate) fn next(&mut self) -> Result<Option<Next>, LaneCorruption> {
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
            let hdr = unsafe { self.lane.at(offset).cast::<RecordHeader>().read_volatile() };
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
    fn copy_out(&self, offset: usize, len: usize, buf: &mut Vec<u8>) {
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

/// The lane logic over heap memory, so Miri can check every pointer
/// (`cargo +nightly miri test --lib lane::`).
#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    const CAP: usize = 4096;

    /// A lane in heap memory instead of a segment.
    struct HeapLane {
        ctl: NonNull<LaneControl>,
        data: NonNull<u8>,
    }

    impl HeapLane {
        fn new() -> Self {
            let ctl = Box::new(LaneControl {
                head: Padded(AtomicU64::new(0)),
                tail: Padded(AtomicU64::new(0)),
                sender: Padded(SenderWords {
                    space_waiter: AtomicU32::new(0),
                    streaming: AtomicU32::new(0),
                }),
            });
            let data = vec![0u64; CAP / 8].into_boxed_slice();
            Self {
                ctl: NonNull::from(Box::leak(ctl)),
                data: NonNull::new(Box::leak(data).as_mut_ptr().cast::<u8>()).unwrap(),
            }
        }

        fn lane(&self, sender: u32) -> LaneRef {
            // SAFETY: both allocations live until `drop`, are aligned (Box of
            // a 128-aligned struct; u64 slice) and CAP bytes long.
            unsafe { LaneRef::new(self.ctl, self.data, CAP, sender) }
        }

        fn ctl(&self) -> &LaneControl {
            // SAFETY: live allocation, only atomics.
            unsafe { self.ctl.as_ref() }
        }

        /// Overwrites ring bytes, as a buggy process would.
        fn scribble(&self, offset: usize, bytes: &[u8]) {
            assert!(offset + bytes.len() <= CAP);
            // SAFETY: in bounds of the CAP-byte ring; single-threaded here.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.data.as_ptr().add(offset), bytes.len())
            }
        }
    }

    impl Drop for HeapLane {
        fn drop(&mut self) {
            // SAFETY: both were leaked from boxes of exactly these types in
            // `new`, and no LaneRef outlives the HeapLane in these tests.
            unsafe {
                drop(Box::from_raw(self.ctl.as_ptr()));
                drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                    self.data.as_ptr().cast::<u64>(),
                    CAP / 8,
                )));
            }
        }
    }

    fn send(p: &mut Producer, payload: &[u8]) -> bool {
        match p.plan(payload.len(), 0).unwrap() {
            Some(planned) => {
                let hdr = RecordHeader {
                    correlation: payload.len() as u64,
                    ..p.header(7, payload.len(), flags::SINGLE)
                };
                p.write(planned, hdr, payload);
                p.publish();
                true
            }
            None => false,
        }
    }

    /// Sends a message of any size as fragments, draining `c` whenever the
    /// lane is full, and returns what `c` produced meanwhile.
    fn send_fragmented(p: &mut Producer, c: &mut Consumer, msg: &[u8]) -> Vec<Vec<u8>> {
        let piece = max_record_payload(CAP);
        let mut got = Vec::new();
        let mut sent = 0;
        loop {
            let chunk = (msg.len() - sent).min(piece);
            let (first, last) = (sent == 0, sent + chunk == msg.len());
            let flags = match (first, last) {
                (true, true) => flags::SINGLE,
                (true, false) => flags::FIRST,
                (false, true) => flags::LAST,
                (false, false) => flags::MIDDLE,
            };
            loop {
                if let Some(planned) = p.plan(chunk, if last { 0 } else { 64 }).unwrap() {
                    let mut hdr = p.header(1, chunk, flags);
                    if first {
                        hdr.total = msg.len() as u64;
                    }
                    p.write(planned, hdr, &msg[sent..sent + chunk]);
                    p.publish();
                    break;
                }
                got.extend(drain(c));
            }
            sent += chunk;
            if last {
                return got;
            }
        }
    }

    fn drain(c: &mut Consumer) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(next) = c.next().unwrap() {
            out.push(take(c, next));
        }
        out
    }

    fn take(c: &mut Consumer, next: Next) -> Vec<u8> {
        match next {
            Next::InLane { hdr, offset, record } => {
                let mut v = Vec::with_capacity(hdr.len as usize);
                c.copy_out(offset, hdr.len as usize, &mut v);
                c.consume(record);
                v
            }
            Next::Assembled { payload, .. } => payload,
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn sizes_and_limits() {
        assert_eq!(record_size(0), 32);
        assert_eq!(record_size(1), 40);
        assert_eq!(record_size(8), 40);
        assert_eq!(record_size(9), 48);
        assert_eq!(max_record_payload(4096), 1984);
        // A maximal record, its worst padding and an abort fit an empty lane.
        let rec = record_size(max_record_payload(CAP));
        assert!(rec - 8 + rec + 2 * RECORD_HEADER <= CAP);
    }

    #[test]
    fn fifo_across_many_wraps_with_every_size() {
        let lane = HeapLane::new();
        let mut p = Producer::new(lane.lane(3));
        let mut c = Consumer::new(lane.lane(3), 1 << 20);
        let mut expected = std::collections::VecDeque::new();
        let mut received = 0;
        let rounds = if cfg!(miri) { 300 } else { 5000 };
        for i in 0..rounds {
            let len = (i * 37) % 700;
            let msg = pattern(len, i as u8);
            while !send(&mut p, &msg) {
                let got = drain(&mut c);
                assert!(!got.is_empty(), "full lane but nothing to drain");
                for g in got {
                    assert_eq!(g, expected.pop_front().unwrap());
                    received += 1;
                }
            }
            expected.push_back(msg);
        }
        for g in drain(&mut c) {
            assert_eq!(g, expected.pop_front().unwrap());
            received += 1;
        }
        assert_eq!(received, rounds);
        assert!(
            lane.ctl().head.0.load(Relaxed) > 4 * CAP as u64,
            "wrapped several times"
        );
        assert_eq!(lane.ctl().head.0.load(Relaxed), lane.ctl().tail.0.load(Relaxed));
    }

    /// An empty lane whose head and tail both stand at position `pos`.
    fn empty_at(pos: u64) -> (HeapLane, Producer, Consumer) {
        let lane = HeapLane::new();
        lane.ctl().head.0.store(pos, Relaxed);
        lane.ctl().tail.0.store(pos, Relaxed);
        let p = Producer::new(lane.lane(0));
        let c = Consumer::new(lane.lane(0), 1 << 20);
        (lane, p, c)
    }

    #[test]
    fn padding_record_and_implicit_skip_at_the_end() {
        // 16 bytes before the end: fewer than a header, so the next record
        // starts at 0 after an implicit skip.
        let (_lane, mut p, mut c) = empty_at(3 * CAP as u64 - 16);
        assert!(send(&mut p, b"wrapped"));
        assert_eq!(p.tail, 3 * CAP as u64 + record_size(7) as u64);
        assert_eq!(drain(&mut c), vec![b"wrapped".to_vec()]);
        // 200 bytes before the end and a 500-byte record: an explicit
        // padding record covers the 200.
        let (_lane, mut p, mut c) = empty_at(CAP as u64 - 200);
        assert!(send(&mut p, b"fits"));
        assert!(send(&mut p, &pattern(500, 3)));
        assert_eq!(p.tail, (CAP + record_size(500)) as u64);
        assert_eq!(drain(&mut c), vec![b"fits".to_vec(), pattern(500, 3)]);
        assert_eq!(c.head, p.tail);
    }

    #[test]
    fn fragmented_messages_reassemble() {
        let lane = HeapLane::new();
        let mut p = Producer::new(lane.lane(0));
        let mut c = Consumer::new(lane.lane(0), 1 << 20);
        let sizes: &[usize] = if cfg!(miri) {
            &[1985, 5000]
        } else {
            &[1985, 4096, 10_000, 100_000]
        };
        for &len in sizes {
            let msg = pattern(len, len as u8);
            let mut got = send_fragmented(&mut p, &mut c, &msg);
            got.extend(drain(&mut c));
            assert_eq!(got, vec![msg]);
        }
        assert_eq!(c.discarded, 0);
    }

    /// A producer at position `pos` with exactly `free` bytes free.
    fn producer_with_free(pos: u64, free: usize) -> (HeapLane, Producer) {
        let lane = HeapLane::new();
        lane.ctl().tail.0.store(pos, Relaxed);
        lane.ctl().head.0.store(pos - (CAP - free) as u64, Relaxed);
        let p = Producer::new(lane.lane(0));
        (lane, p)
    }

    /// Writes every piece as the endpoint's fragmented writer plans them
    /// (64 bytes kept after each but the last); false as soon as one piece
    /// would have to wait for room.
    fn write_without_waiting(p: &mut Producer, len: usize) -> bool {
        let piece = max_record_payload(CAP);
        let mut left = len;
        loop {
            let chunk = left.min(piece);
            let last = chunk == left;
            match p.plan(chunk, if last { 0 } else { 64 }).unwrap() {
                Some(planned) => p.write(planned, p.header(1, chunk, flags::MIDDLE), &vec![0; chunk]),
                None => return false,
            }
            left -= chunk;
            if last {
                return true;
            }
        }
    }

    /// `need_for_message` is exactly the free space in which the fragmented
    /// writer never waits (what `try_send` relies on to never block).
    #[test]
    fn need_for_message_is_exactly_the_room_the_writer_uses() {
        let piece = max_record_payload(CAP);
        for start in [0u64, 8, 1000, 2032, 4000, 4064, 4080] {
            for len in [0, 1, 100, piece, piece + 1, piece + 40, 3000, 3900] {
                let pos = 4 * CAP as u64 + start;
                let (_lane, p) = producer_with_free(pos, CAP);
                let Some(need) = p.need_for_message(len, piece, 64) else {
                    continue;
                };
                let (_lane, mut p) = producer_with_free(pos, need);
                assert!(
                    write_without_waiting(&mut p, len),
                    "len {len} at {start}: {need} is enough"
                );
                if need >= 8 {
                    let (_lane, mut p) = producer_with_free(pos, need - 8);
                    assert!(
                        !write_without_waiting(&mut p, len),
                        "len {len} at {start}: {need} is the least"
                    );
                }
            }
        }
        let (_lane, p) = producer_with_free(0, CAP);
        assert_eq!(p.need_for_message(CAP, piece, 64), None);
    }

    #[test]
    fn partial_message_of_a_dead_sender_is_discarded() {
        let lane = HeapLane::new();
        let mut p = Producer::new(lane.lane(0));
        let mut c = Consumer::new(lane.lane(0), 1 << 20);
        // Generation 1 publishes the first piece of a 5000-byte message and dies.
        let planned = p.plan(1000, 64).unwrap().unwrap();
        let hdr = RecordHeader {
            total: 5000,
            ..p.header(1, 1000, flags::FIRST)
        };
        p.write(planned, hdr, &pattern(1000, 0));
        p.publish();
        // Its successor (generation 2) takes the lane over at the published tail.
        let mut p2 = Producer::new(lane.lane(0));
        let planned = p2.plan(5, 0).unwrap().unwrap();
        p2.write(planned, p2.header(2, 5, flags::SINGLE), b"fresh");
        p2.publish();
        assert_eq!(drain(&mut c), vec![b"fresh".to_vec()]);
        assert_eq!(c.discarded, 1);
    }

    #[test]
    fn abort_drops_the_partial_message() {
        let lane = HeapLane::new();
        let mut p = Producer::new(lane.lane(0));
        let mut c = Consumer::new(lane.lane(0), 1 << 20);
        let planned = p.plan(1000, 64).unwrap().unwrap();
        let hdr = RecordHeader {
            total: 3000,
            ..p.header(1, 1000, flags::FIRST)
        };
        p.write(planned, hdr, &pattern(1000, 0));
        let planned = p.plan(0, 0).unwrap().unwrap();
        p.commit(planned, p.header(1, 0, flags::ABORT));
        assert!(send(&mut p, b"next"));
        assert_eq!(drain(&mut c), vec![b"next".to_vec()]);
        assert_eq!(c.discarded, 1);
    }

    /// Each way a lane can hold garbage gives its own error, and no panic.
    #[test]
    fn corruption_is_detected() {
        let header_bytes = |h: RecordHeader| {
            let mut b = [0u8; RECORD_HEADER];
            // SAFETY: RecordHeader is 32 bytes of plain integers.
            unsafe { std::ptr::copy_nonoverlapping((&raw const h).cast::<u8>(), b.as_mut_ptr(), 32) };
            b
        };
        let cases: Vec<(RecordHeader, u64, LaneCorruption)> = vec![
            (
                RecordHeader {
                    len: 8,
                    flags: 0x40,
                    sender: 0,
                    ..Default::default()
                },
                40,
                LaneCorruption::Flags { flags: 0x40 },
            ),
            (
                RecordHeader {
                    len: 5000,
                    flags: flags::SINGLE,
                    sender: 0,
                    ..Default::default()
                },
                64,
                LaneCorruption::RecordLength { len: 5000 },
            ),
            (
                RecordHeader {
                    len: 8,
                    flags: flags::SINGLE,
                    sender: 9,
                    ..Default::default()
                },
                40,
                LaneCorruption::Sender { found: 9 },
            ),
            (
                RecordHeader {
                    len: 8,
                    flags: flags::FIRST,
                    sender: 0,
                    total: 1 << 40,
                    ..Default::default()
                },
                40,
                LaneCorruption::Fragment { total: 1 << 40 },
            ),
            (
                RecordHeader {
                    len: 8,
                    flags: FLAG_PAD,
                    sender: 0,
                    ..Default::default()
                },
                40,
                LaneCorruption::RecordLength { len: 8 },
            ),
        ];
        for (hdr, tail, expected) in cases {
            let lane = HeapLane::new();
            lane.scribble(0, &header_bytes(hdr));
            lane.ctl().tail.0.store(tail, Relaxed);
            let mut c = Consumer::new(lane.lane(0), 1 << 20);
            assert_eq!(c.next().unwrap_err(), expected);
        }
        for tail in [4, CAP as u64 + 8, u64::MAX - 7] {
            let lane = HeapLane::new();
            lane.ctl().tail.0.store(tail, Relaxed);
            let mut c = Consumer::new(lane.lane(0), 1 << 20);
            assert!(
                matches!(c.next(), Err(LaneCorruption::Indices { .. })),
                "tail {tail}"
            );
        }
        // A producer whose head was overwritten refuses to write.
        let lane = HeapLane::new();
        let mut p = Producer::new(lane.lane(0));
        lane.ctl().head.0.store(12345, Relaxed);
        assert!(p.refresh_head().is_err());
    }

    /// A middle piece whose lengths overrun the announced total.
    #[test]
    fn fragment_overrun_is_detected() {
        let lane = HeapLane::new();
        let mut p = Producer::new(lane.lane(0));
        let mut c = Consumer::new(lane.lane(0), 1 << 20);
        let planned = p.plan(1000, 64).unwrap().unwrap();
        p.write(
            planned,
            RecordHeader {
                total: 1500,
                ..p.header(1, 1000, flags::FIRST)
            },
            &[0; 1000],
        );
        let planned = p.plan(1000, 0).unwrap().unwrap();
        p.write(planned, p.header(1, 1000, flags::LAST), &[0; 1000]);
        p.publish();
        assert_eq!(c.next().unwrap_err(), LaneCorruption::Fragment { total: 1500 });
    }

    /// Producer and consumer on two threads: FIFO, no loss, no duplicate.
    #[test]
    fn two_threads_fifo() {
        let lane = HeapLane::new();
        let count: u64 = if cfg!(miri) { 200 } else { 200_000 };
        let (pl, cl) = (lane.lane(0), lane.lane(0));
        struct SendLane(LaneRef);
        // SAFETY: the lane outlives both threads (joined by the scope) and
        // each side is used by one thread only.
        unsafe impl Send for SendLane {}
        let (pl, cl) = (SendLane(pl), SendLane(cl));
        std::thread::scope(|s| {
            s.spawn(move || {
                let pl = pl;
                let mut p = Producer::new(pl.0);
                for i in 0..count {
                    let len = 8 + (i % 50) as usize;
                    let mut msg = pattern(len, i as u8);
                    msg[..8].copy_from_slice(&i.to_le_bytes());
                    while !send(&mut p, &msg) {
                        std::thread::yield_now();
                    }
                }
            });
            let cl = cl;
            let mut c = Consumer::new(cl.0, 1 << 20);
            let mut next = 0u64;
            while next < count {
                match c.next().unwrap() {
                    Some(n) => {
                        let got = take(&mut c, n);
                        assert_eq!(u64::from_le_bytes(got[..8].try_into().unwrap()), next);
                        assert_eq!(got.len(), 8 + (next % 50) as usize);
                        next += 1;
                    }
                    None => std::thread::yield_now(),
                }
            }
            assert!(c.next().unwrap().is_none());
        });
    }
}
