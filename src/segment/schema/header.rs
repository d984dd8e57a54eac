//! The segment header (offset 0) and the end of each slot's block.

use std::sync::atomic::AtomicU32;

use super::Shared;

/// The segment header, at offset 0. The creator writes every field, then
/// stores `init = INIT_READY` with `Release`; an attacher loads `init` with
/// `Acquire` before reading the rest (see `Segment::attach`). Only ever
/// written and copied out whole through a raw pointer, never referenced;
/// an attacher validates every field of its copy (`Header::validate`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Header {
    pub(crate) magic: u64,
    pub(crate) abi_version: u32,
    /// Read and written as an `AtomicU32` at [`INIT_OFFSET`].
    pub(crate) init: u32,
    pub(crate) layout_hash: u64,
    pub(crate) mutex_size: u32,
    pub(crate) workers: u32,
    pub(crate) lane_capacity: u64,
    pub(crate) max_message: u64,
    pub(crate) lock_slots: u32,
    pub(crate) bell_words: u32,
    pub(crate) slot_stride: u64,
    pub(crate) slots_offset: u64,
    pub(crate) lane_ctl_offset: u64,
    pub(crate) lane_data_offset: u64,
    pub(crate) locks_offset: u64,
    pub(crate) workers_offset: u64,
    pub(crate) stats_offset: u64,
    pub(crate) size: u64,
    pub(crate) control_offset: u64,
}

// SAFETY: repr(C), integers only (any bits are a value, each checked by
// `Header::validate`), 8-aligned. Not `BY_REFERENCE`: written by the
// creator before anyone else has the segment, then only copied out.
unsafe impl Shared for Header {
    const BY_REFERENCE: bool = false;
}

const _: () = assert!(size_of::<Header>() == 128 && align_of::<Header>() == 8);
// `fuzz/src/lib.rs` writes the `size` field of its header images here.
const _: () = assert!(std::mem::offset_of!(Header, size) == 112);

/// Where the init word is: read and written as an `AtomicU32`.
pub(crate) const INIT_OFFSET: usize = std::mem::offset_of!(Header, init);
const _: () = assert!(INIT_OFFSET.is_multiple_of(align_of::<AtomicU32>()));

/// Who holds a slot: the end of the slot's block, after its park word and
/// doorbell (see `Layout::slot_offset`). All-zero is a free slot.
#[repr(C, align(64))]
pub(crate) struct SlotControl {
    /// Pid of the process whose endpoint holds the slot; 0 when free.
    /// Claimed by compare-exchange, so at most one endpoint writes the
    /// slot's lanes.
    pub(crate) owner: AtomicU32,
    /// Bumped by each endpoint that claims the slot; stamped on every record
    /// it sends.
    pub(crate) generation: AtomicU32,
    _reserved: [AtomicU32; 14],
}

// SAFETY: repr(C), atomics only (valid for any bits, all mutation through
// them), no pointers, 64-aligned.
unsafe impl Shared for SlotControl {
    const BY_REFERENCE: bool = true;
}

const _: () = assert!(size_of::<SlotControl>() == 64 && align_of::<SlotControl>() == 64);
