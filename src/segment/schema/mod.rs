//! Every type that lives in the segment, in one place: what its bytes mean.
//!
//! One file per family: [`header`] (the segment header and each slot's
//! block), [`lane`] (a lane's control block and record header), [`tables`]
//! (the lock, worker and statistics tables and the control block with its
//! event log). Each type implements [`Shared`], with its size and alignment
//! asserted beside the impl: a change of either is a change of the
//! segment's format, so a new [`ABI_VERSION`](crate::ABI_VERSION).
//!
//! Only the layout of the bytes is here. What the words mean to the
//! processes that share them (who writes what, with which ordering) is
//! documented on each field, and the protocols themselves live with the
//! code that runs them (`segment::table`, `lane`, `wake`, `lock`).

mod header;
mod lane;
mod tables;

use std::sync::atomic::{AtomicU32, AtomicU64};

pub(crate) use header::{Header, SlotControl, INIT_OFFSET};
pub(crate) use lane::{LaneControl, RecordHeader};
// Built by hand only by the lane tests (a lane in heap memory).
#[cfg(test)]
pub(crate) use lane::{Padded, SenderWords};
pub use tables::MAX_LOCK_NAME;
pub(crate) use tables::{Control, LockEntry, StatsEntry, WorkerEntry, EVENT_RING};

/// The alignment the segment guarantees: its mapping starts on a page.
pub(crate) const SEGMENT_ALIGN: usize = 4096;

/// A type that may live in the segment, reached through
/// [`Segment::at`](crate::Segment) and its siblings at an offset computed by
/// [`Layout`](crate::Layout).
///
/// # Safety
///
/// Another process maps the same bytes at another address and writes them
/// while this one reads, and a buggy one may write anything there (the
/// crate's trust model: it may disrupt the cluster, but not make this
/// process misbehave). So a type that implements this trait must be:
///
/// - `#[repr(C)]` (or a primitive), so both processes agree on its layout;
/// - free of pointers and references: an address means nothing in the other
///   process (positions in the segment are offsets);
/// - without `Drop` glue: nobody drops what is in the segment, the bytes
///   simply stop being mapped;
/// - valid for every bit pattern another process could leave in it, or read
///   only by copying it out and validating the copy before use (the
///   header's fields, a record header);
/// - mutable behind a shared reference only through atomics, or through the
///   `pthread_mutex_t` storage of [`crate::sys::mutex`], which is touched
///   only by pthread calls. If [`Shared::BY_REFERENCE`] is true, every byte
///   another process may write once the segment is published lies inside
///   such an atomic or that storage (an `UnsafeCell`), so holding a `&Self`
///   while it changes is sound;
/// - aligned to at most [`SEGMENT_ALIGN`] (the mapping's alignment).
pub(crate) unsafe trait Shared: Sized + Sync {
    /// Whether a `&Self` into the segment may be handed out: true when
    /// every byte written behind this process's back is inside an atomic
    /// (or the mutex storage). False for plain data, which is only written
    /// and copied out through raw pointers
    /// ([`Segment::ptr_at`](crate::Segment)).
    const BY_REFERENCE: bool;
}

// SAFETY: an atomic is its own interior mutability, valid for any bits,
// 4-aligned, no pointers, no drop glue.
unsafe impl Shared for AtomicU32 {
    const BY_REFERENCE: bool = true;
}

// SAFETY: as for `AtomicU32` (8-aligned on every 64-bit Linux target).
unsafe impl Shared for AtomicU64 {
    const BY_REFERENCE: bool = true;
}

// SAFETY: the lane's ring bytes: any value is a valid `u8`. Written by the
// sender and read by the receiver only through raw-pointer copies, so never
// referenced (what a reader holds is checked first, see `lane`).
unsafe impl Shared for u8 {
    const BY_REFERENCE: bool = false;
}

const _: () = assert!(size_of::<AtomicU32>() == 4 && align_of::<AtomicU32>() == 4);
const _: () = assert!(size_of::<AtomicU64>() == 8 && align_of::<AtomicU64>() == 8);
