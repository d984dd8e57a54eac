//! The one function that computes every offset and size in a segment.
//!
//! ```text
//! 0                 header (one page)
//! slots_offset      workers × slot block    park word and doorbell (one cache line for
//!                                           up to 448 workers), then SlotControl
//! lane_ctl_offset   workers² × LaneControl  head, tail, space waiter (own cache lines)
//! lane_data_offset  workers² × lane_capacity  ring bytes, page aligned
//! locks_offset      lock_slots × LockEntry      lock table
//! workers_offset    workers × WorkerEntry       worker table (state, pid, heartbeat)
//! stats_offset      workers × StatsEntry        per-slot statistics
//! control_offset    CONTROL_SIZE                cluster control words, event log
//! size
//! ```
//!
//! Lane `(sender, receiver)` is number `sender * workers + receiver`. Every
//! region starts on a page boundary, so a lane's ring is touched (and backed
//! by memory) only when it is used. Every size is the `size_of` of its
//! type in [`super::schema`].

use super::schema::{Control, LaneControl, LockEntry, RecordHeader, SlotControl, StatsEntry, WorkerEntry};
use crate::error::ConfigError;

/// Most worker slots a segment can have.
pub const MAX_WORKERS: u32 = 1024;
// Every slot of a segment can be claimed by one process with its forked
// children closing each claim (`sys::claim`).
const _: () = assert!(MAX_WORKERS as usize <= crate::sys::claim::MAX_CLAIMS);
/// Smallest lane capacity in bytes.
pub const MIN_LANE_CAPACITY: usize = 4096;
/// Largest lane capacity in bytes.
pub const MAX_LANE_CAPACITY: usize = 1 << 30;
/// Largest `max_message` a segment may be configured with.
pub const MAX_MESSAGE_LIMIT: usize = 1 << 30;
/// Most entries the (reserved) lock table may have.
pub const MAX_LOCK_SLOTS: u32 = 1 << 16;
/// Largest segment, in bytes of address space (64 TiB: half of what x86-64
/// Linux gives a process).
pub const MAX_SEGMENT_SIZE: usize = 1 << 46;
/// Default lane capacity: 64 KiB.
pub const DEFAULT_LANE_CAPACITY: usize = 64 * 1024;
/// Default `max_message`: 16 MiB.
pub const DEFAULT_MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// Default number of lock-table entries.
pub const DEFAULT_LOCK_SLOTS: u32 = 64;

/// Bytes of the control region: the control block and its event log, in
/// whole pages.
pub(crate) const CONTROL_SIZE: usize = size_of::<Control>().div_ceil(PAGE) * PAGE;
/// Bytes reserved for the header.
pub(crate) const HEADER_SIZE: usize = PAGE;
const PAGE: usize = 4096;

/// What a segment is made for: the inputs of [`Layout::new`].
///
/// # Examples
/// ```
/// let config = shmcluster::raw::Config::new(4).lane_capacity(16 * 1024);
/// let layout = shmcluster::raw::Layout::new(&config)?;
/// assert_eq!(layout.workers(), 4);
/// # Ok::<(), shmcluster::raw::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub(crate) workers: u32,
    pub(crate) lane_capacity: usize,
    pub(crate) max_message: usize,
    pub(crate) lock_slots: u32,
}

impl Config {
    /// A configuration for `workers` slots with the default lane capacity
    /// (64 KiB), `max_message` (16 MiB) and lock table (64 entries).
    pub fn new(workers: u32) -> Self {
        Self {
            workers,
            lane_capacity: DEFAULT_LANE_CAPACITY,
            max_message: DEFAULT_MAX_MESSAGE,
            lock_slots: DEFAULT_LOCK_SLOTS,
        }
    }

    /// Bytes in each (sender, receiver) ring: a power of two, at least 4 KiB.
    /// Memory is `workers² × lane_capacity` of address space, touched only
    /// where used. A message of more than half a lane is streamed through it
    /// in fragments.
    #[inline]
    pub fn lane_capacity(mut self, bytes: usize) -> Self {
        self.lane_capacity = bytes;
        self
    }

    /// The longest message a sender may send; longer ones fail with
    /// `TooLarge`, and a receiver refuses to reassemble anything longer.
    #[inline]
    pub fn max_message(mut self, bytes: usize) -> Self {
        self.max_message = bytes;
        self
    }

    /// Entries reserved for the lock table.
    pub fn lock_slots(mut self, n: u32) -> Self {
        self.lock_slots = n;
        self
    }
}

/// Every offset and size in a segment, computed from a [`Config`] by
/// [`Layout::new`] and nowhere else. Attaching recomputes it from the
/// header's configuration fields and compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub(crate) workers: u32,
    pub(crate) lane_capacity: usize,
    pub(crate) max_message: usize,
    pub(crate) lock_slots: u32,
    pub(crate) bell_words: usize,
    pub(crate) slot_stride: usize,
    pub(crate) slots_offset: usize,
    pub(crate) lane_ctl_offset: usize,
    pub(crate) lane_data_offset: usize,
    pub(crate) locks_offset: usize,
    pub(crate) workers_offset: usize,
    pub(crate) stats_offset: usize,
    pub(crate) control_offset: usize,
    pub(crate) size: usize,
}

/// Where the doorbell words start in a slot block: right after the park
/// word, so a sender that rings and then reads the park word touches one
/// cache line.
const DOORBELL_OFFSET: usize = 8;

/// Bytes of a slot block taken by the park word and the doorbell, rounded
/// to a cache line.
const fn wake_bytes(bell_words: usize) -> usize {
    (DOORBELL_OFFSET + 8 * bell_words).div_ceil(64) * 64
}

const fn round_up(n: usize, to: usize) -> Option<usize> {
    match n.checked_add(to - 1) {
        Some(v) => Some(v / to * to),
        None => None,
    }
}

/// Adds a region of `count × stride` bytes at the next page boundary after
/// `at`; returns (its offset, the end).
fn region(at: usize, count: usize, stride: usize) -> Result<(usize, usize), ConfigError> {
    let offset = round_up(at, PAGE).ok_or(ConfigError::TooLarge)?;
    let len = count.checked_mul(stride).ok_or(ConfigError::TooLarge)?;
    let end = offset.checked_add(len).ok_or(ConfigError::TooLarge)?;
    Ok((offset, end))
}

impl Layout {
    /// Checks `config` and lays the segment out.
    ///
    /// # Errors
    /// [`ConfigError`] naming the out-of-range field, or
    /// [`ConfigError::TooLarge`] if the segment would not fit in memory.
    pub fn new(config: &Config) -> Result<Self, ConfigError> {
        let workers = config.workers;
        if workers == 0 || workers > MAX_WORKERS {
            return Err(ConfigError::Workers {
                value: workers.into(),
            });
        }
        let cap = config.lane_capacity;
        if !cap.is_power_of_two() || !(MIN_LANE_CAPACITY..=MAX_LANE_CAPACITY).contains(&cap) {
            return Err(ConfigError::LaneCapacity { value: cap as u64 });
        }
        if config.max_message == 0 || config.max_message > MAX_MESSAGE_LIMIT {
            return Err(ConfigError::MaxMessage {
                value: config.max_message as u64,
            });
        }
        if config.lock_slots > MAX_LOCK_SLOTS {
            return Err(ConfigError::LockSlots {
                value: config.lock_slots.into(),
            });
        }
        let n = workers as usize;
        let bell_words = n.div_ceil(64);
        let slot_stride = wake_bytes(bell_words) + size_of::<SlotControl>();
        let lanes = n * n;

        let (slots_offset, end) = region(HEADER_SIZE, n, slot_stride)?;
        let (lane_ctl_offset, end) = region(end, lanes, size_of::<LaneControl>())?;
        let (lane_data_offset, end) = region(end, lanes, cap)?;
        let (locks_offset, end) = region(end, config.lock_slots as usize, size_of::<LockEntry>())?;
        let (workers_offset, end) = region(end, n, size_of::<WorkerEntry>())?;
        let (stats_offset, end) = region(end, n, size_of::<StatsEntry>())?;
        let (control_offset, end) = region(end, 1, CONTROL_SIZE)?;
        let size = round_up(end, PAGE).ok_or(ConfigError::TooLarge)?;
        if size > MAX_SEGMENT_SIZE {
            return Err(ConfigError::TooLarge);
        }
        Ok(Self {
            workers,
            lane_capacity: cap,
            max_message: config.max_message,
            lock_slots: config.lock_slots,
            bell_words,
            slot_stride,
            slots_offset,
            lane_ctl_offset,
            lane_data_offset,
            locks_offset,
            workers_offset,
            stats_offset,
            control_offset,
            size,
        })
    }

    /// Number of worker slots.
    #[inline]
    pub fn workers(&self) -> u32 {
        self.workers
    }

    /// Bytes in each lane's ring.
    #[inline]
    pub fn lane_capacity(&self) -> usize {
        self.lane_capacity
    }

    /// The longest message allowed.
    #[inline]
    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// The segment's total size in bytes (address space; pages are backed
    /// only once touched).
    #[inline]
    pub fn size(&self) -> usize {
        self.size
    }

    /// Index of lane `(sender, receiver)`; both must be `< workers`.
    #[inline]
    pub(crate) fn lane_index(&self, sender: u32, receiver: u32) -> usize {
        assert!(sender < self.workers && receiver < self.workers);
        sender as usize * self.workers as usize + receiver as usize
    }

    /// Offset of slot `slot`'s block: its park word (`u32`, `EMPTY = 0`,
    /// `PARKED = 1`, `NOTIFIED = 2`), then at [`Layout::doorbell_offset`] its
    /// doorbell words (`u64`, bit `s % 64` of word `s / 64` for sender `s`),
    /// then the slot's owner pid and generation. For tools and tests that
    /// inspect a segment; `slot < workers`.
    #[inline]
    pub fn slot_offset(&self, slot: u32) -> usize {
        assert!(slot < self.workers);
        self.slots_offset + slot as usize * self.slot_stride
    }

    /// Offset of slot `slot`'s doorbell words, in the park word's cache line
    /// (for up to 448 workers). For tools and tests; `slot < workers`.
    #[inline]
    pub fn doorbell_offset(&self, slot: u32) -> usize {
        self.slot_offset(slot) + DOORBELL_OFFSET
    }

    /// Offset of slot `slot`'s owner/generation block.
    #[inline]
    pub(crate) fn slot_control_offset(&self, slot: u32) -> usize {
        self.slot_offset(slot) + wake_bytes(self.bell_words)
    }

    /// Offset of lane `(sender, receiver)`'s control block (head, tail and
    /// space-waiter words, each on its own 128-byte line). For tools and
    /// tests; both slots `< workers`.
    #[inline]
    pub fn lane_ctl(&self, sender: u32, receiver: u32) -> usize {
        self.lane_ctl_offset + self.lane_index(sender, receiver) * size_of::<LaneControl>()
    }

    /// Offset of lane `(sender, receiver)`'s ring bytes (`lane_capacity` of
    /// them). For tools and tests; both slots `< workers`.
    #[inline]
    pub fn lane_data(&self, sender: u32, receiver: u32) -> usize {
        self.lane_data_offset + self.lane_index(sender, receiver) * self.lane_capacity
    }

    /// A digest of every size, offset and struct layout, stored in the
    /// header: two builds that disagree on any of them refuse to share a
    /// segment even if each field alone looks valid.
    pub fn hash(&self) -> u64 {
        let words = [
            crate::segment::ABI_VERSION as u64,
            crate::sys::PTHREAD_MUTEX_SIZE as u64,
            size_of::<SlotControl>() as u64,
            size_of::<LaneControl>() as u64,
            size_of::<RecordHeader>() as u64,
            self.workers as u64,
            self.lane_capacity as u64,
            self.max_message as u64,
            self.lock_slots as u64,
            self.slot_stride as u64,
            self.slots_offset as u64,
            self.lane_ctl_offset as u64,
            self.lane_data_offset as u64,
            self.locks_offset as u64,
            self.workers_offset as u64,
            self.stats_offset as u64,
            self.control_offset as u64,
            size_of::<WorkerEntry>() as u64,
            size_of::<StatsEntry>() as u64,
            self.size as u64,
        ];
        // FNV-1a over the little-endian bytes.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for w in words {
            for b in w.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_page_aligned_ordered_and_disjoint() {
        for workers in [1, 2, 3, 63, 64, 65, 200] {
            for cap in [4096, 65536] {
                let l = Layout::new(&Config::new(workers).lane_capacity(cap)).unwrap();
                let starts = [
                    l.slots_offset,
                    l.lane_ctl_offset,
                    l.lane_data_offset,
                    l.locks_offset,
                    l.workers_offset,
                    l.stats_offset,
                    l.control_offset,
                ];
                for s in starts {
                    assert_eq!(s % PAGE, 0);
                }
                assert!(l.slots_offset >= HEADER_SIZE);
                let n = workers as usize;
                assert!(l.slots_offset + n * l.slot_stride <= l.lane_ctl_offset);
                assert!(l.lane_ctl_offset + n * n * size_of::<LaneControl>() <= l.lane_data_offset);
                assert!(l.lane_data_offset + n * n * cap <= l.locks_offset);
                assert!(l.stats_offset + n * size_of::<StatsEntry>() <= l.control_offset);
                assert!(l.control_offset + CONTROL_SIZE <= l.size);
                assert_eq!(l.size % PAGE, 0);
                assert!(l.bell_words * 64 >= n);
                assert!(DOORBELL_OFFSET + l.bell_words * 8 <= wake_bytes(l.bell_words));
                assert_eq!(
                    l.slot_control_offset(0) + size_of::<SlotControl>(),
                    l.slot_offset(0) + l.slot_stride
                );
                if workers <= 448 {
                    assert_eq!(
                        wake_bytes(l.bell_words),
                        64,
                        "park word and doorbell share a line"
                    );
                }
                let last = l.lane_data(workers - 1, workers - 1);
                assert_eq!(last + cap, l.lane_data_offset + n * n * cap);
                assert_eq!(l.lane_data(0, 0) % cap.min(PAGE), 0);
            }
        }
    }

    #[test]
    fn lane_index_is_row_major_and_bijective() {
        let l = Layout::new(&Config::new(5)).unwrap();
        let mut seen = std::collections::HashSet::new();
        for s in 0..5 {
            for r in 0..5 {
                assert_eq!(l.lane_index(s, r), s as usize * 5 + r as usize);
                assert!(seen.insert(l.lane_index(s, r)));
            }
        }
        assert_eq!(seen.len(), 25);
    }

    #[test]
    fn invalid_configs_name_their_field() {
        assert_eq!(
            Layout::new(&Config::new(0)),
            Err(ConfigError::Workers { value: 0 })
        );
        assert_eq!(
            Layout::new(&Config::new(MAX_WORKERS + 1)),
            Err(ConfigError::Workers {
                value: u64::from(MAX_WORKERS) + 1
            })
        );
        assert_eq!(
            Layout::new(&Config::new(2).lane_capacity(5000)),
            Err(ConfigError::LaneCapacity { value: 5000 })
        );
        assert_eq!(
            Layout::new(&Config::new(2).lane_capacity(2048)),
            Err(ConfigError::LaneCapacity { value: 2048 })
        );
        assert_eq!(
            Layout::new(&Config::new(2).max_message(0)),
            Err(ConfigError::MaxMessage { value: 0 })
        );
        assert_eq!(
            Layout::new(&Config::new(2).lock_slots(MAX_LOCK_SLOTS + 1)),
            Err(ConfigError::LockSlots {
                value: u64::from(MAX_LOCK_SLOTS) + 1
            })
        );
        // 1024² lanes of 1 GiB: more than the address space.
        assert_eq!(
            Layout::new(&Config::new(MAX_WORKERS).lane_capacity(MAX_LANE_CAPACITY)),
            Err(ConfigError::TooLarge)
        );
    }

    #[test]
    fn hash_changes_with_every_input() {
        let base = Layout::new(&Config::new(4)).unwrap();
        let others = [
            Config::new(5),
            Config::new(4).lane_capacity(8192),
            Config::new(4).max_message(1000),
            Config::new(4).lock_slots(3),
        ];
        for c in others {
            assert_ne!(Layout::new(&c).unwrap().hash(), base.hash(), "{c:?}");
        }
        assert_eq!(Layout::new(&Config::new(4)).unwrap().hash(), base.hash());
    }
}
