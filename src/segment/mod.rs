//! The shared-memory segment: created by one process (the master, or a test)
//! as a sealed memfd, attached by others from an inherited fd.
//!
//! Everything in it is `#[repr(C)]`, pointer-free and addressed by offsets
//! computed by [`Layout`], so each process may map it at any address. Memory
//! another process writes is reached through atomics or raw-pointer copies
//! only, never through `&T` to plain data.

pub(crate) mod layout;
pub(crate) mod table;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};
use std::sync::Arc;

pub use layout::{Config, Layout};

use crate::error::{AttachError, CreateError};
use crate::lane::{LaneControl, LaneRef};
use crate::sys;
use crate::wake;

/// "SHMCLSTR", little-endian.
pub(crate) const MAGIC: u64 = u64::from_le_bytes(*b"SHMCLSTR");
/// Bumped whenever anything in the segment's format changes.
pub const ABI_VERSION: u32 = 3;
/// The init word's value once the creator has written the whole header.
const INIT_READY: u32 = 0x5EAD_1E55;

/// The segment header, at offset 0. The creator writes every field, then
/// stores `init = INIT_READY` with `Release`; an attacher loads `init` with
/// `Acquire` before reading the rest (see [`Segment::attach`]).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Header {
    magic: u64,
    abi_version: u32,
    /// Read and written as an `AtomicU32` (see `init_word`).
    init: u32,
    layout_hash: u64,
    mutex_size: u32,
    workers: u32,
    lane_capacity: u64,
    max_message: u64,
    lock_slots: u32,
    bell_words: u32,
    slot_stride: u64,
    slots_offset: u64,
    lane_ctl_offset: u64,
    lane_data_offset: u64,
    locks_offset: u64,
    workers_offset: u64,
    stats_offset: u64,
    size: u64,
    control_offset: u64,
}

const _: () = assert!(size_of::<Header>() <= layout::HEADER_SIZE);
const INIT_OFFSET: usize = std::mem::offset_of!(Header, init);
const _: () = assert!(INIT_OFFSET % 4 == 0);

impl Header {
    fn for_layout(l: &Layout) -> Self {
        Self {
            magic: MAGIC,
            abi_version: ABI_VERSION,
            init: 0,
            layout_hash: l.hash(),
            mutex_size: sys::PTHREAD_MUTEX_SIZE,
            workers: l.workers,
            lane_capacity: l.lane_capacity as u64,
            max_message: l.max_message as u64,
            lock_slots: l.lock_slots,
            bell_words: l.bell_words as u32,
            slot_stride: l.slot_stride as u64,
            slots_offset: l.slots_offset as u64,
            lane_ctl_offset: l.lane_ctl_offset as u64,
            lane_data_offset: l.lane_data_offset as u64,
            locks_offset: l.locks_offset as u64,
            workers_offset: l.workers_offset as u64,
            stats_offset: l.stats_offset as u64,
            size: l.size as u64,
            control_offset: l.control_offset as u64,
        }
    }

    /// Recomputes the layout from the configuration fields and checks every
    /// derived field against it.
    fn validate(&self) -> Result<Layout, AttachError> {
        if self.magic != MAGIC {
            return Err(AttachError::BadMagic { found: self.magic });
        }
        if self.abi_version != ABI_VERSION {
            return Err(AttachError::AbiVersion {
                found: self.abi_version,
                expected: ABI_VERSION,
            });
        }
        if self.mutex_size != sys::PTHREAD_MUTEX_SIZE {
            return Err(AttachError::MutexSize {
                found: self.mutex_size,
                expected: sys::PTHREAD_MUTEX_SIZE,
            });
        }
        let invalid = |field, error| AttachError::InvalidField { field, error };
        let lane_capacity = usize::try_from(self.lane_capacity).map_err(|_| {
            invalid(
                "lane_capacity",
                crate::ConfigError::LaneCapacity {
                    value: self.lane_capacity,
                },
            )
        })?;
        let max_message = usize::try_from(self.max_message).map_err(|_| {
            invalid(
                "max_message",
                crate::ConfigError::MaxMessage {
                    value: self.max_message,
                },
            )
        })?;
        let config = Config::new(self.workers)
            .lane_capacity(lane_capacity)
            .max_message(max_message)
            .lock_slots(self.lock_slots);
        let layout = Layout::new(&config).map_err(|error| {
            let field = match error {
                crate::ConfigError::Workers { .. } => "workers",
                crate::ConfigError::LaneCapacity { .. } => "lane_capacity",
                crate::ConfigError::MaxMessage { .. } => "max_message",
                crate::ConfigError::LockSlots { .. } => "lock_slots",
                crate::ConfigError::TooLarge => "size",
            };
            invalid(field, error)
        })?;
        let expect = Self::for_layout(&layout);
        let pairs: [(&'static str, u64, u64); 11] = [
            ("bell_words", self.bell_words.into(), expect.bell_words.into()),
            ("slot_stride", self.slot_stride, expect.slot_stride),
            ("slots_offset", self.slots_offset, expect.slots_offset),
            ("lane_ctl_offset", self.lane_ctl_offset, expect.lane_ctl_offset),
            ("lane_data_offset", self.lane_data_offset, expect.lane_data_offset),
            ("locks_offset", self.locks_offset, expect.locks_offset),
            ("workers_offset", self.workers_offset, expect.workers_offset),
            ("stats_offset", self.stats_offset, expect.stats_offset),
            ("control_offset", self.control_offset, expect.control_offset),
            ("size", self.size, expect.size),
            ("layout_hash", self.layout_hash, expect.layout_hash),
        ];
        for (field, found, expected) in pairs {
            if found != expected {
                return Err(AttachError::FieldMismatch {
                    field,
                    found,
                    expected,
                });
            }
        }
        Ok(layout)
    }
}

/// Who holds a slot: the end of the slot's block, after its park word and
/// doorbell (see [`Layout::slot_offset`]). All-zero is a free slot.
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

const _: () = assert!(size_of::<SlotControl>() == 64);

struct Mapping {
    map: memmap2::MmapRaw,
    fd: OwnedFd,
    layout: Layout,
    /// One eventfd per slot, for async receivers (see [`crate::wake`]):
    /// made with the segment and inherited with it by forked workers,
    /// handed to spawned ones by the master. Process-local: not in the
    /// shared memory. Unset in a process that attached to a bare memfd.
    wake_fds: std::sync::OnceLock<Box<[OwnedFd]>>,
}

/// A mapped segment. Cheap to clone (all clones share one mapping, unmapped
/// when the last is dropped).
///
/// # Examples
/// ```
/// use shmcluster::{Config, Segment};
///
/// let segment = Segment::create(&Config::new(2))?;
/// // Another process would receive this fd (inherited, or over a socket).
/// let again = Segment::attach(segment.try_clone_fd()?)?;
/// assert_eq!(again.layout(), segment.layout());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Segment {
    inner: Arc<Mapping>,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("layout", &self.inner.layout)
            .finish_non_exhaustive()
    }
}

impl Segment {
    /// Creates a segment: `memfd_create`, sized by [`Layout::new`], sealed
    /// against growing and shrinking, mapped, and its header written (the
    /// init word last, with `Release`).
    ///
    /// # Errors
    /// [`CreateError::Config`] for an invalid configuration,
    /// [`CreateError::Io`] if a system call fails.
    pub fn create(config: &Config) -> Result<Self, CreateError> {
        let layout = Layout::new(config)?;
        let fd = sys::memfd_create("shmcluster")?;
        sys::set_len(fd.as_fd(), layout.size as u64)?;
        sys::seal_size(fd.as_fd())?;
        let map = sys::map_shared(fd.as_fd(), layout.size)?;
        let segment = Self {
            inner: Arc::new(Mapping {
                map,
                fd,
                layout,
                wake_fds: std::sync::OnceLock::new(),
            }),
        };
        // Best effort: a cluster near the descriptor limit works without
        // them (async receivers then use a waiter thread).
        match (0..layout.workers())
            .map(|_| sys::eventfd())
            .collect::<std::io::Result<Vec<_>>>()
        {
            Ok(fds) => {
                let _ = segment.inner.wake_fds.set(fds.into_boxed_slice());
            }
            Err(e) => tracing::warn!(error = %e, "no eventfds for async wakeups"),
        }
        let header = Header::for_layout(&layout);
        // SAFETY: the mapping is at least a page long and page aligned; no
        // other process has the fd yet, so nothing reads or writes the header
        // concurrently.
        unsafe { segment.base().cast::<Header>().write(header) };
        for i in 0..layout.lock_slots {
            let entry = segment.lock_entry(i);
            // SAFETY: the storage is inside the new mapping, 64-aligned and
            // large enough (asserted in `table`); nobody else has the fd yet.
            unsafe { sys::mutex::init(entry.mutex_ptr()) }?;
        }
        segment.init_word().store(INIT_READY, Release);
        Ok(segment)
    }

    /// Attaches to a segment made by [`Segment::create`] in this or another
    /// process, validating the header completely before using anything in it.
    ///
    /// # Errors
    /// An [`AttachError`] naming what is wrong: not a memfd segment, another
    /// ABI version, an uninitialised or truncated segment, a corrupt header
    /// field, or missing seals.
    pub fn attach(fd: OwnedFd) -> Result<Self, AttachError> {
        let len = sys::file_len(fd.as_fd())?;
        let min = layout::HEADER_SIZE as u64;
        if len < min {
            return Err(AttachError::TooSmall { len, min });
        }
        // Not a segment at all (a plain file, say)? Say so before anything
        // else, and before mapping it.
        let mut magic = [0u8; 8];
        if sys::read_at(fd.as_fd(), &mut magic, 0)? == magic.len() && u64::from_le_bytes(magic) != MAGIC {
            return Err(AttachError::BadMagic {
                found: u64::from_le_bytes(magic),
            });
        }
        if !sys::is_size_sealed(fd.as_fd())? {
            return Err(AttachError::NotSealed);
        }
        let map_len = usize::try_from(len).map_err(|_| AttachError::Truncated {
            len,
            expected: usize::MAX as u64,
        })?;
        let map = sys::map_shared(fd.as_fd(), map_len)?;
        let base = map.as_mut_ptr();
        // SAFETY: the mapping is at least HEADER_SIZE bytes and page aligned,
        // so the init word at INIT_OFFSET is in bounds and 4-aligned.
        let init = unsafe { &*base.add(INIT_OFFSET).cast::<AtomicU32>() };
        let init = init.load(Acquire);
        // SAFETY: in bounds and aligned as above; a volatile copy of plain
        // integers (any bit pattern is valid), checked field by field below.
        let header = unsafe { base.cast::<Header>().read_volatile() };
        if header.magic != MAGIC {
            return Err(AttachError::BadMagic { found: header.magic });
        }
        if init != INIT_READY {
            return Err(AttachError::NotInitialized { found: init });
        }
        let layout = header.validate()?;
        if len < layout.size as u64 {
            return Err(AttachError::Truncated {
                len,
                expected: layout.size as u64,
            });
        }
        Ok(Self {
            inner: Arc::new(Mapping {
                map,
                fd,
                layout,
                wake_fds: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Attaches to a segment whose descriptor number was inherited (for
    /// example named in the environment by the process that spawned this
    /// one), taking ownership of the descriptor.
    ///
    /// # Errors
    /// [`AttachError::Io`] if `fd` is not open, else as [`Segment::attach`].
    ///
    /// # Safety
    /// Nothing else in this process may own `fd`: it is closed when the
    /// segment is dropped.
    pub unsafe fn attach_raw_fd(fd: std::os::fd::RawFd) -> Result<Self, AttachError> {
        // SAFETY: forwarded to our caller.
        let fd = unsafe { sys::adopt_fd(fd) }?;
        Self::attach(fd)
    }

    /// The per-slot eventfds (one per slot, in slot order), if this process
    /// has them: to hand to a spawned process with the segment.
    pub fn wake_fds(&self) -> Option<&[OwnedFd]> {
        self.inner.wake_fds.get().map(|f| &f[..])
    }

    /// Installs the per-slot eventfds received with an attached segment
    /// (one per slot, in slot order). Async receivers in this process wait
    /// on them, and senders here write them; every process of a cluster
    /// must have them for async receivers to be woken promptly (a sender
    /// without them leaves an async receiver to its 50 ms timer).
    ///
    /// # Errors
    /// `InvalidInput` if the count is not the segment's slot count, or if
    /// they were set already.
    pub fn set_wake_fds(&self, fds: Vec<OwnedFd>) -> std::io::Result<()> {
        if fds.len() != self.inner.layout.workers() as usize {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} wake fds for {} slots", fds.len(), self.inner.layout.workers()),
            ));
        }
        self.inner
            .wake_fds
            .set(fds.into_boxed_slice())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "wake fds already set"))
    }

    /// Slot `slot`'s eventfd, if this process has them.
    pub(crate) fn wake_fd(&self, slot: u32) -> Option<BorrowedFd<'_>> {
        self.inner.wake_fds.get()?.get(slot as usize).map(AsFd::as_fd)
    }

    /// Sender side of a wake: rings `slot`'s eventfd (an async receiver
    /// parked with `PARKED_FD`).
    pub(crate) fn ring_fd(&self, slot: u32) {
        match self.wake_fd(slot) {
            Some(fd) => sys::eventfd_ring(fd),
            None => tracing::debug!(slot, "async receiver parked, but no eventfd here to wake it"),
        }
    }

    /// Rings `bit` in `to`'s doorbell (word `bit_index / 64`) and wakes
    /// `to` if it is parked, by futex or eventfd.
    pub(crate) fn notify(&self, to: u32, from: u32) -> bool {
        let word = &self.bells(to)[(from / 64) as usize];
        wake::notify(word, 1u64 << (from % 64), self.park(to), || self.ring_fd(to))
    }

    /// The segment's layout.
    pub fn layout(&self) -> &Layout {
        &self.inner.layout
    }

    /// The memfd behind the segment, to hand to another process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }

    /// A new descriptor for the segment (close-on-exec), for
    /// [`Segment::attach`] elsewhere.
    ///
    /// # Errors
    /// If `fcntl(F_DUPFD_CLOEXEC)` fails (out of descriptors).
    pub fn try_clone_fd(&self) -> std::io::Result<OwnedFd> {
        sys::dup_cloexec(self.fd())
    }

    fn base(&self) -> *mut u8 {
        self.inner.map.as_mut_ptr()
    }

    fn init_word(&self) -> &AtomicU32 {
        // SAFETY: in bounds and 4-aligned (see `attach`); an atomic, so a
        // shared reference is sound while others write it.
        unsafe { &*self.base().add(INIT_OFFSET).cast::<AtomicU32>() }
    }

    /// Whether a live process holds slot `slot` (its claim, see
    /// [`crate::sys::claim`]): one `fcntl(2)` call, and never fooled by a
    /// dead holder's pid naming another process. Should the call fail, the
    /// slot's `owner` word answers instead.
    pub(crate) fn slot_held(&self, slot: u32) -> bool {
        crate::sys::claim::is_claimed(self.fd(), slot)
            .unwrap_or_else(|_| self.slot(slot).owner.load(Acquire) != 0)
    }

    /// Slot `slot`'s owner and generation. `slot < workers`.
    pub(crate) fn slot(&self, slot: u32) -> &SlotControl {
        let offset = self.inner.layout.slot_control_offset(slot);
        // SAFETY: the layout puts a 64-aligned `SlotControl` at the end of
        // each slot block, inside the mapping (validated size); it is only
        // atomics, valid for any bit pattern.
        unsafe { &*self.base().add(offset).cast::<SlotControl>() }
    }

    /// Slot `slot`'s park word. `slot < workers`.
    pub(crate) fn park(&self, slot: u32) -> &AtomicU32 {
        let offset = self.inner.layout.slot_offset(slot);
        // SAFETY: each slot block starts 64-aligned with its park word,
        // inside the mapping; an atomic is valid for any bit pattern.
        unsafe { &*self.base().add(offset).cast::<AtomicU32>() }
    }

    /// Slot `slot`'s doorbell words. `slot < workers`.
    pub(crate) fn bells(&self, slot: u32) -> &[AtomicU64] {
        let layout = &self.inner.layout;
        let offset = layout.doorbell_offset(slot);
        // SAFETY: each slot block holds `bell_words` 8-aligned u64s at the
        // doorbell offset (see `Layout::new`), inside the mapping; atomics
        // are valid for any bit pattern.
        unsafe { std::slice::from_raw_parts(self.base().add(offset).cast::<AtomicU64>(), layout.bell_words) }
    }

    /// Slot `slot`'s worker-table entry. `slot < workers`.
    pub(crate) fn worker_entry(&self, slot: u32) -> &table::WorkerEntry {
        let layout = &self.inner.layout;
        assert!(slot < layout.workers);
        let offset = layout.workers_offset + slot as usize * layout::WORKER_ENTRY_SIZE;
        // SAFETY: the worker table is a page-aligned region of `workers`
        // 128-byte entries inside the mapping; an entry is only atomics,
        // valid for any bit pattern.
        unsafe { &*self.base().add(offset).cast::<table::WorkerEntry>() }
    }

    /// Lock-table entry `i`. `i < lock_slots`.
    pub(crate) fn lock_entry(&self, i: u32) -> &table::LockEntry {
        let layout = &self.inner.layout;
        assert!(i < layout.lock_slots);
        let offset = layout.locks_offset + i as usize * layout::LOCK_ENTRY_SIZE;
        // SAFETY: the lock table is a page-aligned region of 256-byte
        // entries inside the mapping; an entry is atomics plus the mutex's
        // storage in an `UnsafeCell`, touched only through pthread calls.
        unsafe { &*self.base().add(offset).cast::<table::LockEntry>() }
    }

    /// Slot `slot`'s statistics. `slot < workers`.
    pub(crate) fn stats_entry(&self, slot: u32) -> &table::StatsEntry {
        let layout = &self.inner.layout;
        assert!(slot < layout.workers);
        let offset = layout.stats_offset + slot as usize * layout::STATS_ENTRY_SIZE;
        // SAFETY: as for `worker_entry`: page-aligned region of 256-byte
        // entries inside the mapping, atomics only.
        unsafe { &*self.base().add(offset).cast::<table::StatsEntry>() }
    }

    /// The cluster control block and event log.
    pub(crate) fn control(&self) -> &table::Control {
        let offset = self.inner.layout.control_offset;
        // SAFETY: a page-aligned region of `CONTROL_SIZE` bytes inside the
        // mapping; atomics only.
        unsafe { &*self.base().add(offset).cast::<table::Control>() }
    }

    /// Lane `(sender, receiver)`. Valid while this `Segment` (or a clone)
    /// lives; both slots `< workers`.
    pub(crate) fn lane(&self, sender: u32, receiver: u32) -> LaneRef {
        let layout = &self.inner.layout;
        assert!(sender < layout.workers && receiver < layout.workers);
        let base = self.base();
        // SAFETY: both offsets are inside the mapping (the layout was
        // computed or validated against its length) and aligned: lane control
        // blocks at 128 within a page-aligned region, rings at multiples of
        // the (power-of-two, >= 4096) capacity.
        unsafe {
            let ctl =
                NonNull::new_unchecked(base.add(layout.lane_ctl(sender, receiver))).cast::<LaneControl>();
            let data = NonNull::new_unchecked(base.add(layout.lane_data(sender, receiver)));
            LaneRef::new(ctl, data, layout.lane_capacity, sender)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_through_validate() {
        for workers in [1, 7, 64, 65] {
            let l = Layout::new(&Config::new(workers).lane_capacity(8192)).unwrap();
            assert_eq!(Header::for_layout(&l).validate().unwrap(), l);
        }
    }

    #[test]
    fn each_header_field_is_checked() {
        let l = Layout::new(&Config::new(3)).unwrap();
        let good = Header::for_layout(&l);
        let mut h = good;
        h.slots_offset += 4096;
        assert!(matches!(
            h.validate(),
            Err(AttachError::FieldMismatch {
                field: "slots_offset",
                ..
            })
        ));
        let mut h = good;
        h.layout_hash ^= 1;
        assert!(matches!(
            h.validate(),
            Err(AttachError::FieldMismatch {
                field: "layout_hash",
                ..
            })
        ));
        let mut h = good;
        h.workers = 0;
        assert!(matches!(
            h.validate(),
            Err(AttachError::InvalidField { field: "workers", .. })
        ));
        let mut h = good;
        h.lane_capacity = 12345;
        assert!(matches!(
            h.validate(),
            Err(AttachError::InvalidField {
                field: "lane_capacity",
                ..
            })
        ));
        let mut h = good;
        h.workers = 4; // valid alone, but every offset moves
        assert!(matches!(h.validate(), Err(AttachError::FieldMismatch { .. })));
        let mut h = good;
        h.abi_version = 99;
        assert!(matches!(
            h.validate(),
            Err(AttachError::AbiVersion { found: 99, .. })
        ));
        let mut h = good;
        h.mutex_size = 1;
        assert!(matches!(
            h.validate(),
            Err(AttachError::MutexSize { found: 1, .. })
        ));
        let mut h = good;
        h.magic = 0;
        assert!(matches!(h.validate(), Err(AttachError::BadMagic { found: 0 })));
    }
}
