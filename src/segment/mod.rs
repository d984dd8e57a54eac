//! The shared-memory segment: created by one process (the master, or a test)
//! as a sealed memfd, attached by others from an inherited fd.
//!
//! Everything in it is a type of [`schema`] (`#[repr(C)]`, pointer-free,
//! [`schema::Shared`]), addressed by offsets computed by [`Layout`], so each
//! process may map it at any address. Memory another process writes is
//! reached through atomics or raw-pointer copies only, never through `&T`
//! to plain data: [`Segment::at`] and [`Segment::slice_at`] are the only
//! way from an offset to a reference, [`Segment::ptr_at`] to a pointer.

pub(crate) mod layout;
pub(crate) mod schema;
pub(crate) mod table;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};
use std::sync::Arc;

pub use layout::{Config, Layout};

use crate::error::{AttachError, CreateError};
use crate::sys;
use schema::{Header, Shared, SlotControl, INIT_OFFSET, SEGMENT_ALIGN};

/// "SHMCLSTR", little-endian.
pub(crate) const MAGIC: u64 = u64::from_le_bytes(*b"SHMCLSTR");
/// Bumped whenever anything in the segment's format changes.
pub const ABI_VERSION: u32 = 4;
/// The init word's value once the creator has written the whole header.
const INIT_READY: u32 = 0x5EAD_1E55;

const _: () = assert!(size_of::<Header>() <= layout::HEADER_SIZE);

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

struct Mapping {
    map: memmap2::MmapRaw,
    fd: OwnedFd,
    layout: Layout,
    /// One eventfd per slot, for async receivers (see `wake`):
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
/// use shmcluster::raw::{Config, Segment};
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
        let header = segment.ptr_at::<Header>(0, 1);
        // SAFETY: `ptr_at` checked that a `Header` fits, aligned, at offset
        // 0 of the mapping; no other process has the fd yet, so nothing
        // reads or writes it concurrently.
        unsafe { header.write(Header::for_layout(&layout)) };
        for i in 0..layout.lock_slots {
            let entry = segment.lock_entry(i);
            // SAFETY: the storage is a `pthread_mutex_t`'s, inside the new
            // mapping (`at`); nobody else has the fd yet.
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
        let init = slice_in::<AtomicU32>(&map, INIT_OFFSET, 1)[0].load(Acquire);
        let header = ptr_in::<Header>(&map, 0, 1);
        // SAFETY: `ptr_in` checked that a `Header` fits, aligned, at offset
        // 0; a volatile copy of plain integers (any bit pattern is valid),
        // checked field by field below.
        let header = unsafe { header.read_volatile() };
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
    #[inline]
    pub(crate) fn wake_fd(&self, slot: u32) -> Option<BorrowedFd<'_>> {
        self.inner.wake_fds.get()?.get(slot as usize).map(AsFd::as_fd)
    }

    /// Sender side of a wake: rings `slot`'s eventfd (an async receiver
    /// parked with `PARKED_FD`).
    #[inline]
    pub(crate) fn ring_fd(&self, slot: u32) {
        match self.wake_fd(slot) {
            Some(fd) => sys::eventfd_ring(fd),
            None => tracing::debug!(slot, "async receiver parked, but no eventfd here to wake it"),
        }
    }

    /// The segment's layout.
    #[inline]
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

    /// A raw pointer to `count` `T`s at `offset`, for plain data (the
    /// header, the ring bytes), which is written and copied out through
    /// raw pointers only.
    ///
    /// # Panics
    /// If they do not lie inside the mapping or `offset` is not aligned for
    /// `T`: offsets come from [`Layout`], so either is a bug here.
    #[inline(always)]
    pub(crate) fn ptr_at<T: Shared>(&self, offset: usize, count: usize) -> NonNull<T> {
        ptr_in(&self.inner.map, offset, count)
    }

    /// The `T` at `offset`. See [`Segment::slice_at`].
    #[inline(always)]
    pub(crate) fn at<T: Shared>(&self, offset: usize) -> &T {
        &self.slice_at(offset, 1)[0]
    }

    /// The `len` `T`s at `offset`, shared with every other process that
    /// maps the segment, for as long as this `Segment` lives.
    ///
    /// # Panics
    /// As [`Segment::ptr_at`]. A `T` that is not [`Shared::BY_REFERENCE`]
    /// does not compile.
    #[inline(always)]
    pub(crate) fn slice_at<T: Shared>(&self, offset: usize, len: usize) -> &[T] {
        slice_in(&self.inner.map, offset, len)
    }

    #[inline]
    fn init_word(&self) -> &AtomicU32 {
        self.at(INIT_OFFSET)
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
    #[inline(always)]
    pub(crate) fn slot(&self, slot: u32) -> &SlotControl {
        self.at(self.inner.layout.slot_control_offset(slot))
    }

    /// Slot `slot`'s park word (see `wake` for its states). `slot < workers`.
    #[inline(always)]
    pub(crate) fn park(&self, slot: u32) -> &AtomicU32 {
        self.at(self.inner.layout.slot_offset(slot))
    }

    /// Slot `slot`'s doorbell words. `slot < workers`.
    #[inline(always)]
    pub(crate) fn bells(&self, slot: u32) -> &[AtomicU64] {
        let layout = &self.inner.layout;
        self.slice_at(layout.doorbell_offset(slot), layout.bell_words)
    }

    /// Slot `slot`'s worker-table entry. `slot < workers`.
    #[inline(always)]
    pub(crate) fn worker_entry(&self, slot: u32) -> &table::WorkerEntry {
        let layout = &self.inner.layout;
        assert!(slot < layout.workers);
        self.at(layout.workers_offset + slot as usize * size_of::<table::WorkerEntry>())
    }

    /// Lock-table entry `i`. `i < lock_slots`.
    #[inline(always)]
    pub(crate) fn lock_entry(&self, i: u32) -> &table::LockEntry {
        let layout = &self.inner.layout;
        assert!(i < layout.lock_slots);
        self.at(layout.locks_offset + i as usize * size_of::<table::LockEntry>())
    }

    /// Slot `slot`'s statistics. `slot < workers`.
    #[inline(always)]
    pub(crate) fn stats_entry(&self, slot: u32) -> &table::StatsEntry {
        let layout = &self.inner.layout;
        assert!(slot < layout.workers);
        self.at(layout.stats_offset + slot as usize * size_of::<table::StatsEntry>())
    }

    /// The cluster control block and event log.
    #[inline(always)]
    pub(crate) fn control(&self) -> &table::Control {
        self.at(self.inner.layout.control_offset)
    }
}

/// The checked step of [`Segment::ptr_at`], also used on a mapping not yet
/// validated (`Segment::attach`).
#[inline(always)]
fn ptr_in<T: Shared>(map: &memmap2::MmapRaw, offset: usize, count: usize) -> NonNull<T> {
    const { assert!(align_of::<T>() <= SEGMENT_ALIGN) };
    // One compare and one mask on the way (these accessors are on every
    // send and receive); the message is built only on the cold path.
    let fits = size_of::<T>()
        .checked_mul(count)
        .and_then(|bytes| bytes.checked_add(offset))
        .is_some_and(|end| end <= map.len());
    if !fits || !offset.is_multiple_of(align_of::<T>()) {
        out_of_bounds(offset, count, size_of::<T>(), map.len());
    }
    // SAFETY: `offset <= map.len()` (checked), so the pointer stays inside
    // the mapping or one past its end; a mapping is never at address 0, so
    // neither is a pointer into it.
    unsafe { NonNull::new_unchecked(map.as_mut_ptr().add(offset).cast()) }
}

#[cold]
#[inline(never)]
fn out_of_bounds(offset: usize, count: usize, size: usize, len: usize) -> ! {
    panic!("{count} x {size} bytes at offset {offset} do not fit the {len}-byte segment aligned")
}

/// The checked step of [`Segment::slice_at`], also used on a mapping not
/// yet validated (`Segment::attach`).
#[inline]
fn slice_in<T: Shared>(map: &memmap2::MmapRaw, offset: usize, len: usize) -> &[T] {
    const {
        assert!(
            T::BY_REFERENCE,
            "plain data in the segment is reached through `ptr_at`"
        )
    };
    let ptr = ptr_in::<T>(map, offset, len);
    // SAFETY: the one argument for every reference into the segment.
    // `ptr_in` checked that the `len` `T`s lie inside the mapping, aligned
    // (the mapping starts on a page, and `Shared` types align to at most
    // one); the mapping lives as long as `map` is borrowed. `T: Shared`
    // says any bits another process leaves there are a valid `T`, and
    // `BY_REFERENCE` (asserted above) that every byte another process may
    // write while we hold the reference is inside an atomic (or the mutex
    // storage only pthread calls touch): so the shared reference is sound
    // while they write.
    unsafe { std::slice::from_raw_parts(ptr.as_ptr(), len) }
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

    #[test]
    fn at_refuses_what_is_outside_the_mapping() {
        let segment = Segment::create(&Config::new(1)).unwrap();
        let size = segment.layout().size();
        assert_eq!(segment.slice_at::<AtomicU64>(size - 8, 1).len(), 1);
        let panics = |f: fn(&Segment, usize)| {
            let segment = segment.clone();
            std::panic::catch_unwind(move || f(&segment, size)).is_err()
        };
        assert!(panics(|s, size| {
            let _ = s.at::<AtomicU32>(size);
        }));
        assert!(panics(|s, size| {
            let _ = s.slice_at::<AtomicU64>(size - 8, 2);
        }));
        assert!(panics(|s, _| {
            let _ = s.slice_at::<AtomicU64>(8, usize::MAX / 4);
        }));
        assert!(panics(|s, _| {
            let _ = s.at::<SlotControl>(32);
        }));
        assert!(panics(|s, _| {
            let _ = s.ptr_at::<Header>(4, 1);
        }));
    }
}
