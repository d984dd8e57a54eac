//! A lane's control block and the header of each record in its ring. The
//! ring protocol over them is `crate::lane`'s.

use std::sync::atomic::{AtomicU32, AtomicU64};

use super::Shared;

/// The header of every record in a lane. Written by the producer before it
/// publishes the tail past it; copied out once by the consumer, which
/// checks every field before use.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    /// Payload bytes in this record (not counting padding to 8).
    pub(crate) len: u32,
    /// `FLAG_*` bits, the commit bit and the position's stamp (see
    /// `crate::lane`). The first word (`len`, `flags`, `kind`) commits the
    /// record: stored last, with `Release`.
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

// SAFETY: repr(C), integers only, 8-aligned. Not `BY_REFERENCE`: it lives
// in the ring bytes, written and copied out through raw pointers only, and
// the consumer validates its copy (see `crate::lane`, "What the consumer
// trusts").
unsafe impl Shared for RecordHeader {
    const BY_REFERENCE: bool = false;
}

const _: () = assert!(size_of::<RecordHeader>() == 32 && align_of::<RecordHeader>() == 8);

/// A word on a cache line of its own (128 bytes: adjacent-line prefetch on
/// x86 pulls lines in pairs), so the head, written by the receiver, and the
/// tail, written by the sender, never share a line.
#[repr(C, align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

// SAFETY: repr(C) around one `T: Shared`, plus padding nobody reads; as
// referenceable as `T`; 128-aligned.
unsafe impl<T: Shared> Shared for Padded<T> {
    const BY_REFERENCE: bool = T::BY_REFERENCE;
}

const _: () = assert!(size_of::<Padded<AtomicU64>>() == 128 && align_of::<Padded<AtomicU64>>() == 128);

/// A lane's control block in the segment. All-zero is the empty lane.
#[repr(C)]
pub(crate) struct LaneControl {
    /// Receiver's position: bytes consumed. Written only by the receiver,
    /// with `Release` after it has copied a record out (pairs with the
    /// producer's `Acquire` load in `Producer::refresh_head`, after which it
    /// may overwrite those bytes).
    pub(crate) head: Padded<AtomicU64>,
    /// Sender's position: bytes published, stored after each publish.
    /// Written only by the sender. The consumer does not read it (it polls
    /// each record's commit word, see `crate::lane`); a successor scans on
    /// from it to the last committed record, and statistics read it.
    pub(crate) tail: Padded<AtomicU64>,
    /// The sender's slow path, on a line of its own.
    pub(crate) sender: Padded<SenderWords>,
}

// SAFETY: repr(C), atomics only (in `Padded` lines), 128-aligned.
unsafe impl Shared for LaneControl {
    const BY_REFERENCE: bool = true;
}

const _: () = assert!(size_of::<LaneControl>() == 3 * 128 && align_of::<LaneControl>() == 128);

/// The words of a lane's slow sends: waiting for space, and streaming a
/// message in fragments.
#[repr(C)]
pub(crate) struct SenderWords {
    /// 1 while the sender waits for space (`wake::wait_for_space`);
    /// cleared by whoever wakes it (`wake::release_space`).
    pub(crate) space_waiter: AtomicU32,
    /// 1 from before the sender publishes the first fragment of a message
    /// until after it has published the last one (or its `ABORT`): a
    /// sender that dies meanwhile left its receiver assembling a message
    /// that will never end, and whoever cleans up after it (the master, or
    /// the slot's next holder) writes the `ABORT` that drops it. Written by
    /// the sender only (`Producer::set_streaming`), and by that cleaner
    /// once the sender is dead (`Producer::take_streaming`).
    pub(crate) streaming: AtomicU32,
}

// SAFETY: repr(C), atomics only, 4-aligned.
unsafe impl Shared for SenderWords {
    const BY_REFERENCE: bool = true;
}

const _: () = assert!(size_of::<SenderWords>() == 8 && align_of::<SenderWords>() == 4);
