//! Single-producer single-consumer byte rings ("lanes"), record framing,
//! padding at wrap, and fragmentation of messages larger than half a lane.
//!
//! One lane per (sender, receiver) pair: only the sender writes records and
//! the tail, only the receiver writes the head. Nothing is ever CASed between
//! producers, and a producer that dies mid-write leaves nothing visible,
//! because it never committed what it was writing.
//!
//! # Records
//!
//! A record is a [`RecordHeader`] (32 bytes) and its payload, padded to 8
//! bytes. Positions (`head`, `tail`) are byte counts since the lane was made;
//! they never wrap (2^64 bytes), and the ring offset is `pos & (cap - 1)`.
//! A record never wraps around the end of the ring: if it does not fit in the
//! bytes left before the end, the producer first fills them with a padding
//! record (`FLAG_PAD`); fewer than 32 bytes left after a record are skipped
//! (the producer's tail moves past them with the record, and the consumer
//! does the same arithmetic, [`next_start`]).
//!
//! # Publishing: the commit word
//!
//! The consumer never reads the tail. It polls the first word of the record
//! at its head (length, flags, kind), which the producer stores last, with
//! `Release`: a record is there once that word carries `FLAG_COMMITTED` and
//! the stamp of its position ([`committed`]). Before it commits a record the
//! producer zeroes the first word of the place where the next record will
//! start (the terminator), so the consumer, which gets there only after the
//! commit, finds zero until that record is committed, never what an earlier
//! lap left. So a message costs the consumer the record's cache lines only,
//! not the tail's line as well (the spinning 64 B round trip went from
//! 2.51-2.58x to 2.17x the one-cache-line ping-pong in one vCPU placement,
//! 2.23x to 2.08-2.17x in the other). The producer keeps room for the
//! terminator: a header's worth past every record.
//!
//! Several records are published at once (a batch, or padding and the
//! record after it) by committing all but the first as they are written and
//! the first last: the consumer cannot pass the first before it is
//! committed. The tail is still stored after each publish, for statistics
//! and for a successor: a sender that died between a commit and the tail
//! store left committed records past the tail, which its successor scans
//! past ([`Producer::new`]) before it writes.
//!
//! A message of more than [`max_record_payload`] bytes goes out as
//! fragments: `FIRST` (with the total length), middle pieces, `LAST`. The
//! producer publishes fragments as space frees up, so a message of any size
//! up to `max_message` streams through a lane of any size. If a blocking
//! send gives up half way, it writes an `ABORT` record (for which it always
//! keeps room) so the receiver drops the partial message.
//!
//! # What the consumer trusts
//!
//! Nothing. It reads each record's first word once, and accepts it only
//! with the commit bit and its position's stamp (zero means "nothing yet";
//! anything else poisons the lane); it copies the rest of the header out of
//! the ring once and checks its length, flags, sender and fragment sequence
//! before touching the payload. A lane that fails a check is poisoned
//! ([`LaneCorruption`]); it never causes a panic or a read outside the
//! ring, and one call reads at most a lane's worth without delivering a
//! message, so garbage that chains records round the ring cannot hold it.

mod consumer;
mod producer;
#[cfg(test)]
mod tests;

use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;
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

/// Set in a record's flags when it is complete: the commit bit. The
/// consumer polls the flags word of the record at its head, never the
/// tail (see "Publishing" above).
const FLAG_COMMITTED: u16 = 0x8000;
/// The flags bits that stamp a committed record with its position
/// (`pos / 8`, modulo 2^11), so that a record read at the wrong place is
/// caught as corruption.
const STAMP_BITS: u16 = 0x7FF0;
/// The flags bits that say what a record is (`FLAG_FIRST` .. `FLAG_ABORT`).
const KIND_BITS: u16 = 0x000F;

const _: () = assert!(align_of::<RecordHeader>() <= ALIGN);
const _: () = assert!(FLAG_COMMITTED & STAMP_BITS == 0 && (FLAG_COMMITTED | STAMP_BITS) & KIND_BITS == 0);

/// The flags a record of kind `flags` at position `pos` is committed with.
#[inline(always)]
pub(crate) const fn committed(flags: u16, pos: u64) -> u16 {
    flags | FLAG_COMMITTED | (((pos >> 3) as u16) << 4 & STAMP_BITS)
}

/// Where the record after one that ends at `end` starts: at `end`, or, when
/// fewer than a header's bytes are left before the end of the ring, at the
/// start of the next lap (those bytes are skipped, by both ends).
#[inline(always)]
pub(crate) const fn next_start(end: u64, cap: usize) -> u64 {
    let left = cap - (end & (cap as u64 - 1)) as usize;
    if left < RECORD_HEADER {
        end.wrapping_add(left as u64)
    } else {
        end
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

/// The largest payload a single record may carry in a lane of `cap` bytes:
/// half a lane less four headers, so a record, the padding before it, the
/// terminator after it and the room kept for an `ABORT` always fit in an
/// empty lane.
#[inline]
pub(crate) const fn max_record_payload(cap: usize) -> usize {
    cap / 2 - 4 * RECORD_HEADER
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
        debug_assert!((data.as_ptr() as usize).is_multiple_of(ALIGN));
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

    /// Bytes published and not yet consumed, for statistics: a head past
    /// the tail reads as empty, other garbage as at most a full lane.
    #[inline]
    pub(crate) fn depth(&self) -> u64 {
        let tail = self.ctl().tail.0.load(Acquire);
        let head = self.ctl().head.0.load(Acquire);
        // The receiver may be ahead of the stored tail: with a commit
        // word per record it reads a record as soon as it is committed,
        // before the sender stores the tail (or ever, should the sender
        // die in between). That lane holds nothing unread.
        let depth = tail.wrapping_sub(head);
        if depth > self.cap as u64 {
            0
        } else {
            depth
        }
    }

    /// Asks the CPU to fetch the cache line holding ring offset `offset`
    /// (`< cap`). A hint, not a load: the producer may be writing there.
    #[inline(always)]
    fn prefetch(&self, offset: usize) {
        debug_assert!(offset < self.cap);
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        // SAFETY: a prefetch reads nothing and cannot fault; the address is
        // inside the ring. (`unsafe` until the intrinsic became safe.)
        #[allow(unused_unsafe)]
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(self.data.as_ptr().add(offset).cast::<i8>());
        }
        #[cfg(not(all(target_arch = "x86_64", not(miri))))]
        let _ = offset;
    }

    /// The first word of the header at ring offset `offset`: length, flags
    /// and kind, the word that commits a record. Read as an atomic, and
    /// stored as one to publish: the consumer polls it while the producer
    /// stores it.
    ///
    /// # Safety
    /// `offset + 8 <= cap` and 8-aligned.
    #[inline(always)]
    unsafe fn word0(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: the caller's contract: 8 bytes inside the ring, aligned;
        // every access to this word, in every process, is atomic.
        unsafe { AtomicU64::from_ptr(self.data.as_ptr().add(offset).cast::<u64>()) }
    }

    /// Writes a first word with a plain store: the terminator, or the
    /// commit of a record behind the first unpublished one. The consumer
    /// reads neither before the `Release` store that publishes the record
    /// before them, so a plain store is enough (and it keeps to one atomic
    /// store per publish, which Miri's store-buffer emulation handles).
    ///
    /// # Safety
    /// As for [`Self::write_rest`].
    #[inline(always)]
    unsafe fn write_word0(&self, offset: usize, w0: u64) {
        // SAFETY: the caller's contract: 8 writable, 8-aligned bytes.
        unsafe { self.data.as_ptr().add(offset).cast::<u64>().write(w0) };
    }

    /// Writes header words 1 to 3 of `w` at ring offset `offset` (word 0,
    /// which commits the record, is stored by the caller, last).
    ///
    /// # Safety
    /// `offset + 32 <= cap` and 8-aligned, in space the consumer does not
    /// read until the record is committed.
    #[inline(always)]
    unsafe fn write_rest(&self, offset: usize, w: Words) {
        // SAFETY: the caller's contract: 32 writable, 8-aligned bytes.
        unsafe {
            let p = self.data.as_ptr().add(offset).cast::<u64>();
            p.add(1).write(w[1]);
            p.add(2).write(w[2]);
            p.add(3).write(w[3]);
        }
    }

    /// Reads header words 1 to 3 at ring offset `offset`, once each; word
    /// 0 is `w0`, read by the caller (with `Acquire`).
    ///
    /// # Safety
    /// `offset + 32 <= cap` and 8-aligned.
    #[inline(always)]
    unsafe fn read_rest(&self, offset: usize, w0: u64) -> Words {
        // SAFETY: the caller's contract: 32 readable, 8-aligned bytes.
        // Volatile: another process may (if buggy) write them meanwhile,
        // so each word is read exactly once and then only the copy is
        // checked and used.
        unsafe {
            let p = self.data.as_ptr().add(offset).cast::<u64>();
            [
                w0,
                p.add(1).read_volatile(),
                p.add(2).read_volatile(),
                p.add(3).read_volatile(),
            ]
        }
    }

    /// Writes a padding record over the whole ring, committed at ring
    /// offset 0, as garbage would: in a lane of a multiple of 16 KiB its
    /// stamp is right for every lap, so a consumer follows it round and
    /// round (a lane's worth per call) and never finds a message.
    #[cfg(test)]
    pub(crate) fn scribble_endless_padding(&self) {
        let pad = RecordHeader {
            len: (self.cap - RECORD_HEADER) as u32,
            flags: committed(FLAG_PAD, 0),
            sender: self.sender,
            ..RecordHeader::default()
        };
        let w = to_words(&pad);
        // SAFETY: 32 bytes at offset 0 of the ring (`cap >= 4096`); a test
        // with no producer on this lane.
        unsafe {
            self.write_rest(0, w);
            self.write_word0(0, w[0]);
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
    if !head.is_multiple_of(ALIGN as u64)
        || !tail.is_multiple_of(ALIGN as u64)
        || tail.wrapping_sub(head) > cap as u64
    {
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
