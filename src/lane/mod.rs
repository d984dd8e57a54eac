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

mod consumer;
mod producer;
#[cfg(test)]
mod tests;

use std::ptr::NonNull;
use std::sync::atomic::Ordering::Acquire;

use crate::error::LaneCorruption;
pub(crate) use crate::segment::schema::{LaneControl, RecordHeader};
use crate::segment::Segment;
pub(crate) use consumer::{Consumer, Next};
pub(crate) use producer::{Planned, Producer};

/// Bytes in a record header.
pub(crate) const RECORD_HEADER: usize = size_of::<RecordHeader>();
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

const _: () = assert!(align_of::<RecordHeader>() <= ALIGN);

/// Flags for the pieces of a message.
pub(crate) mod flags {
    pub(crate) const SINGLE: u16 = super::FLAG_FIRST | super::FLAG_LAST;
    pub(crate) const FIRST: u16 = super::FLAG_FIRST;
    pub(crate) const MIDDLE: u16 = 0;
    pub(crate) const LAST: u16 = super::FLAG_LAST;
    pub(crate) const ABORT: u16 = super::FLAG_ABORT;
}

/// The largest payload a single record may carry in a lane of `cap` bytes:
/// half a lane less two headers, so a record, the padding before it and the
/// 32 bytes kept for an `ABORT` always fit in an empty lane.
#[inline]
pub(crate) const fn max_record_payload(cap: usize) -> usize {
    cap / 2 - 2 * RECORD_HEADER
}

/// Bytes a record with `len` payload bytes occupies.
#[inline]
pub(crate) const fn record_size(len: usize) -> usize {
    (RECORD_HEADER + len).div_ceil(ALIGN) * ALIGN
}

/// A record header as the four `u64` words it occupies in the ring, in
/// `RecordHeader`'s `repr(C)` layout. Built from and taken apart into
/// fields with shifts, so a header goes from registers to the ring (and
/// back) in four word accesses: a `RecordHeader` assembled on the stack with
/// narrow stores and copied with wide loads stalled on store forwarding,
/// and that copy was where most of `Producer::write`'s samples sat.
pub(crate) type Words = [u64; 4];

/// `hdr` as the words it occupies in the ring.
#[inline(always)]
pub(crate) fn to_words(hdr: &RecordHeader) -> Words {
    let w0 = u64::from(hdr.len) | u64::from(hdr.flags) << 32 | u64::from(hdr.kind) << 48;
    let w1 = u64::from(hdr.sender) | u64::from(hdr.generation) << 32;
    [w0, w1, hdr.correlation, hdr.total]
}

/// The header whose ring words are `w` (any bits: every field is an
/// integer).
#[inline(always)]
pub(crate) fn from_words(w: Words) -> RecordHeader {
    RecordHeader {
        len: w[0] as u32,
        flags: (w[0] >> 32) as u16,
        kind: (w[0] >> 48) as u16,
        sender: w[1] as u32,
        generation: (w[1] >> 32) as u32,
        correlation: w[2],
        total: w[3],
    }
}

// The shifts above spell `RecordHeader`'s layout on a little-endian machine.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "lane headers assume little-endian words"
);

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
    #[inline]
    pub(crate) unsafe fn new(ctl: NonNull<LaneControl>, data: NonNull<u8>, cap: usize, sender: u32) -> Self {
        debug_assert!(cap.is_power_of_two() && cap >= 4096);
        debug_assert!(data.as_ptr() as usize % ALIGN == 0);
        Self {
            ctl,
            data,
            cap,
            sender,
        }
    }

    #[inline]
    pub(crate) fn ctl(&self) -> &LaneControl {
        // SAFETY: `new`'s contract: valid and aligned for our lifetime; the
        // struct holds only atomics (`Shared` with `BY_REFERENCE`), so a
        // shared reference is sound even while another process writes it.
        unsafe { self.ctl.as_ref() }
    }

    #[inline]
    fn mask(&self) -> u64 {
        self.cap as u64 - 1
    }

    /// Bytes published and not yet consumed, for statistics: garbage
    /// indices read as at most a full lane.
    #[inline]
    pub(crate) fn depth(&self) -> u64 {
        let tail = self.ctl().tail.0.load(Acquire);
        let head = self.ctl().head.0.load(Acquire);
        tail.wrapping_sub(head).min(self.cap as u64)
    }

    /// Writes header words `w` at ring offset `offset`.
    ///
    /// # Safety
    /// `offset + 32 <= cap` and 8-aligned, in space the consumer does not
    /// read until it is published.
    #[inline(always)]
    unsafe fn write_words(&self, offset: usize, w: Words) {
        // SAFETY: the caller's contract: 32 writable, 8-aligned bytes.
        unsafe {
            let p = self.data.as_ptr().add(offset).cast::<u64>();
            p.write(w[0]);
            p.add(1).write(w[1]);
            p.add(2).write(w[2]);
            p.add(3).write(w[3]);
        }
    }

    /// Reads the header words at ring offset `offset`, once each.
    ///
    /// # Safety
    /// `offset + 32 <= cap` and 8-aligned.
    #[inline(always)]
    unsafe fn read_words(&self, offset: usize) -> Words {
        // SAFETY: the caller's contract: 32 readable, 8-aligned bytes.
        // Volatile: another process may (if buggy) write them meanwhile,
        // so each word is read exactly once and then only the copy is
        // checked and used.
        unsafe {
            let p = self.data.as_ptr().add(offset).cast::<u64>();
            [
                p.read_volatile(),
                p.add(1).read_volatile(),
                p.add(2).read_volatile(),
                p.add(3).read_volatile(),
            ]
        }
    }

    /// Pointer to ring offset `offset` (`<= cap`: the payload of an empty
    /// record in the last 32 bytes starts one past the end, where nothing is
    /// read or written).
    #[inline]
    fn at(&self, offset: usize) -> *mut u8 {
        assert!(offset <= self.cap);
        // SAFETY: `offset <= cap` and `data` is valid for `cap` bytes; one
        // past the end is a valid pointer to form.
        unsafe { self.data.as_ptr().add(offset) }
    }
}

/// Whether `head` and `tail` can be a lane's indices: 8-aligned, and
/// `0 <= tail - head <= cap` in wrapping arithmetic (positions count bytes
/// modulo 2^64; `cap` divides 2^64, so ring offsets stay right across the
/// wrap).
#[inline]
fn indices_valid(head: u64, tail: u64, cap: usize) -> Result<(), LaneCorruption> {
    if head % ALIGN as u64 != 0 || tail % ALIGN as u64 != 0 || tail.wrapping_sub(head) > cap as u64 {
        return Err(LaneCorruption::Indices { head, tail });
    }
    Ok(())
}

impl Segment {
    /// Lane `(sender, receiver)`. Valid while this `Segment` (or a clone)
    /// lives; both slots `< workers`.
    #[inline]
    pub(crate) fn lane(&self, sender: u32, receiver: u32) -> LaneRef {
        let layout = self.layout();
        let cap = layout.lane_capacity();
        let ctl = self.ptr_at::<LaneControl>(layout.lane_ctl(sender, receiver), 1);
        let data = self.ptr_at::<u8>(layout.lane_data(sender, receiver), cap);
        // SAFETY: `ptr_at` checked that both lie inside the mapping, which
        // lives while this `Segment` or a clone does (the condition written
        // above; every holder of a lane also holds the segment). The
        // control block is aligned (checked), and the ring starts at a
        // multiple of the capacity (a power of two >= 4096, `Layout`) in a
        // page-aligned region. One producer and one consumer at a time:
        // slot `sender`'s holder (or, once it is dead, whoever cleans up
        // after it) and slot `receiver`'s, each holding its slot's claim.
        unsafe { LaneRef::new(ctl, data, cap, sender) }
    }
}
