//! `synchronize`: critical sections across processes on robust,
//! process-shared pthread mutexes in the segment's lock table.
//!
//! - The global lock ([`Locks::synchronize`]) and named locks
//!   ([`Locks::synchronize_key`]): a name is written into its own table
//!   entry on first use (under a table lock, so two processes naming the
//!   same lock at once get the same entry); no hashing, so no collisions.
//! - A holder that dies inside its section does not leave the lock held:
//!   the next holder acquires it, is told ([`Section::previous_owner_died`])
//!   and can repair what the dead one left; the mutex is made consistent
//!   before the section runs, so a panic while repairing does not poison it.
//! - Every acquisition bumps the lock's fencing token
//!   ([`Section::fencing_token`]): a store that records the token it was
//!   written under can refuse a write made under an older one.
//! - A panic in the section releases the lock and propagates. Taking a lock
//!   this thread holds is [`LockError::WouldDeadlock`]. Waits are sliced: a
//!   lock whose holder process is gone without the kernel having released
//!   it (it cannot happen with an intact robust list) becomes
//!   [`LockError::Unrecoverable`] after a second instead of a hang.

use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::*;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use crate::segment::table::{LockEntry, MAX_LOCK_NAME};
use crate::segment::Segment;
use crate::sys;
use crate::sys::mutex::{Acquired, LockFailure};

pub use crate::segment::table::MAX_LOCK_NAME as MAX_LOCK_NAME_LEN;

/// Entry 0 serialises naming; entry 1 is the global lock.
const NAMING: u32 = 0;
const GLOBAL: u32 = 1;
/// How long one wait slice lasts before the holder is looked at. Also the
/// longest a free lock can stay untaken if the kernel's wakeup lands on a
/// waiter whose timed wait is just ending.
const SLICE: Duration = Duration::from_millis(20);
/// How long a lock may stay held by a process that no longer exists.
const GONE_GRACE: Duration = Duration::from_secs(1);

/// Why a section could not run.
#[derive(Debug)]
#[non_exhaustive]
pub enum LockError {
    /// The name is longer than [`MAX_LOCK_NAME_LEN`] bytes.
    NameTooLong {
        /// Its length.
        len: usize,
    },
    /// Every entry of the lock table is named already.
    TableFull {
        /// Entries for named locks in this segment.
        capacity: u32,
    },
    /// This thread already holds the lock.
    WouldDeadlock,
    /// Not acquired within the time given.
    Timeout,
    /// The lock can never be acquired again: its holder's process is gone
    /// but it was not released, or a previous holder died and the next one
    /// did not make it consistent.
    Unrecoverable {
        /// The process last recorded as holding it.
        holder_pid: u32,
    },
    /// glibc older than 2.25 (robust process-shared mutexes are unreliable
    /// before it).
    Glibc {
        /// The version found.
        found: String,
    },
    /// A pthread call failed.
    Io(std::io::Error),
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NameTooLong { len } => {
                write!(
                    f,
                    "lock name of {len} bytes is over the {MAX_LOCK_NAME}-byte limit"
                )
            }
            Self::TableFull { capacity } => write!(
                f,
                "the lock table is full ({capacity} named locks); raise Config::lock_slots"
            ),
            Self::WouldDeadlock => f.write_str("this thread already holds the lock"),
            Self::Timeout => f.write_str("the lock was not acquired in time"),
            Self::Unrecoverable { holder_pid } => write!(
                f,
                "the lock can never be acquired again (last holder: process {holder_pid})"
            ),
            Self::Glibc { found } => {
                write!(
                    f,
                    "glibc {found} is too old: robust process-shared mutexes need 2.25 or newer"
                )
            }
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for LockError {}

/// What a section knows about its acquisition.
#[derive(Debug, Clone)]
pub struct Section<'a> {
    /// A borrowed name (an async section's is interned, see `interned`):
    /// no drop to check after the section, one word less to write (a
    /// `Cow` here cost an uncontended section ~3%).
    name: &'a str,
    owner_died: bool,
    token: u64,
}

impl Section<'_> {
    /// Whether the previous holder died inside its section: the data the
    /// lock protects may be half-updated and should be checked or repaired.
    pub fn previous_owner_died(&self) -> bool {
        self.owner_died
    }

    /// This acquisition's fencing token: larger than every earlier
    /// acquisition's of the same lock.
    pub fn fencing_token(&self) -> u64 {
        self.token
    }

    /// The lock's name (`""` for the global lock).
    pub fn name(&self) -> &str {
        self.name
    }
}

/// One lock's row of the stats.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockStats {
    /// Its name (`""` for the global lock).
    pub name: String,
    /// The holding worker's slot and pid, if held.
    pub holder: Option<(u32, u32)>,
    /// How long the current holder has held it, as observed by the master
    /// (it looks every 100 ms; `None` without a master or before it looked).
    pub held_for: Option<Duration>,
    /// Acquisitions so far.
    pub acquisitions: u64,
    /// Acquisitions that had to wait.
    pub waits: u64,
    /// Acquisitions that found the previous holder dead.
    pub owner_died: u64,
    /// The last fencing token handed out.
    pub token: u64,
}

/// The lock table of a segment, as seen by one worker slot (recorded as
/// the holder).
pub struct Locks {
    segment: Segment,
    /// `segment`'s lock table, found once: the look-up by offset checks
    /// the mapping's bounds and alignment on every call.
    table: NonNull<[LockEntry]>,
    slot: u32,
    /// The slot's generation when these locks were made: recorded with the
    /// slot on each acquisition (who leads, in terms pid reuse cannot fake).
    generation: u32,
    /// Entries already found by name (names never move once written),
    /// shared with this `Locks`'s clones: the cache `synchronize_key`
    /// reads without a lock.
    names: Arc<[CachedName]>,
    /// Names that found no room in `names` (the slow path's).
    overflow: Arc<Mutex<FxHashMap<String, u32>>>,
    /// For each name length modulo [`RECENT`], the first name of that
    /// length this handle found in `names`, as its slot + 1 (high half) and
    /// entry (low half); 0 while unset. Write-once, so threads sharing the
    /// handle only read them. Checked before the hash: the entry comes
    /// from one load whose address is known from the name's length alone,
    /// and the name is checked against the slot beside it, off the path to
    /// the mutex. (Through the hash, the slot's load comes first: ~1.7 ns
    /// more than a `NamedLock` for a literal name, ~5 ns for one known at
    /// run time. Checking the first two names found, whatever their
    /// length, cost every later name two failed checks: 1.6x for a
    /// literal, 2-2.8x for a run-time name.)
    recent: [AtomicU64; RECENT],
}

/// Words in [`Locks::recent`]: one cache line.
const RECENT: usize = 8;

impl Clone for Locks {
    fn clone(&self) -> Self {
        Self {
            segment: self.segment.clone(),
            table: self.table,
            slot: self.slot,
            generation: self.generation,
            names: self.names.clone(),
            overflow: self.overflow.clone(),
            recent: std::array::from_fn(|k| AtomicU64::new(self.recent[k].load(Relaxed))),
        }
    }
}

// SAFETY: `table` points to the lock table (`LockEntry`: atomics and the
// mutex storage, `Sync`) in the mapping that `segment` keeps alive as long
// as this value: sharing or sending it is sharing or sending a
// `&[LockEntry]` with its `Segment`, which is `Send + Sync`.
unsafe impl Send for Locks {}
// SAFETY: as for `Send`.
unsafe impl Sync for Locks {}

impl fmt::Debug for Locks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Locks")
            .field("segment", &self.segment)
            .field("slot", &self.slot)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

fn check_glibc() -> Result<(), LockError> {
    match sys::mutex::glibc_version() {
        Some(v) if v >= (2, 25) => Ok(()),
        Some((a, b)) => Err(LockError::Glibc {
            found: format!("{a}.{b}"),
        }),
        None => Err(LockError::Glibc {
            found: "unknown".into(),
        }),
    }
}

impl Locks {
    /// The locks of `segment`, used by worker `slot`.
    ///
    /// # Errors
    /// [`LockError::Glibc`] below glibc 2.25.
    pub fn new(segment: &Segment, slot: u32) -> Result<Self, LockError> {
        check_glibc()?;
        let generation = if slot < segment.layout().workers() {
            segment.slot(slot).generation.load(Acquire)
        } else {
            0
        };
        let layout = segment.layout();
        Ok(Self {
            segment: segment.clone(),
            slot,
            generation,
            table: NonNull::from(
                segment.slice_at::<LockEntry>(layout.locks_offset, layout.lock_slots as usize),
            ),
            names: name_cache(layout.lock_slots),
            overflow: Arc::default(),
            recent: Default::default(),
        })
    }

    /// Lock-table entry `i`.
    ///
    /// # Panics
    /// If `i` is not below the table's length (a bug here: indices are
    /// constants or were checked when cached).
    #[inline(always)]
    fn entry(&self, i: u32) -> &LockEntry {
        // SAFETY: made from a `&[LockEntry]` into the mapping `self.segment`
        // keeps alive (see the `Send` impl); nothing frees or moves it.
        let table = unsafe { self.table.as_ref() };
        &table[i as usize]
    }

    fn slots(&self) -> u32 {
        self.segment.layout().lock_slots
    }

    /// Runs `f` holding the global lock.
    ///
    /// # Errors
    /// `WouldDeadlock`, `Unrecoverable`, `TableFull` (a table with no room
    /// for the global lock).
    #[inline]
    pub fn synchronize<R>(&self, f: impl FnOnce(&Section) -> R) -> Result<R, LockError> {
        let i = self.entry_for("")?;
        self.run(i, "", None, f)
    }

    /// Runs `f` holding the lock named `name` (created on first use).
    ///
    /// # Errors
    /// `NameTooLong`, `TableFull`, `WouldDeadlock`, `Unrecoverable`.
    #[inline]
    pub fn synchronize_key<R>(&self, name: &str, f: impl FnOnce(&Section) -> R) -> Result<R, LockError> {
        let i = self.entry_for(name)?;
        self.run(i, name, None, f)
    }

    /// Runs `f` holding lock `name` if it can be had within `timeout`.
    ///
    /// # Errors
    /// `Timeout`, and as [`Locks::synchronize_key`].
    pub fn try_synchronize<R>(
        &self,
        name: &str,
        timeout: Duration,
        f: impl FnOnce(&Section) -> R,
    ) -> Result<R, LockError> {
        let i = self.entry_for(name)?;
        self.run(i, name, Some(timeout), f)
    }

    /// Takes lock `name` (`""` for the global lock) and returns a guard
    /// that unlocks when dropped: for callers that cannot pass a closure
    /// (the C ABI). The guard must be dropped on the thread that took it (a
    /// pthread mutex belongs to its locking thread), which is why it is not
    /// `Send`. `timeout` `None` waits as `synchronize` does.
    ///
    /// # Errors
    /// As [`Locks::try_synchronize`].
    pub fn lock(&self, name: &str, timeout: Option<Duration>) -> Result<LockGuard, LockError> {
        let index = self.entry_for(name)?;
        let held = self.acquire(index, timeout)?;
        let (owner_died, token) = (held.owner_died, held.token);
        // The guard below takes over the unlocking.
        std::mem::forget(held);
        Ok(LockGuard {
            segment: self.segment.clone(),
            index,
            owner_died,
            token,
            _not_send: std::marker::PhantomData,
        })
    }

    /// Resolves lock `name` once (naming its entry if needed) for sections
    /// that skip the name lookup: [`NamedLock::synchronize`].
    ///
    /// # Errors
    /// `NameTooLong`, `TableFull`.
    pub fn named(&self, name: &str) -> Result<NamedLock, LockError> {
        let index = self.entry_for(name)?;
        Ok(NamedLock {
            entry: NonNull::from(self.entry(index)),
            locks: self.clone(),
            index,
            name: name.to_owned(),
        })
    }

    /// The entry named `name` (`""`: the global lock's): a name seen
    /// before is found in this handle's cache without a lock.
    #[inline(always)]
    fn entry_for(&self, name: &str) -> Result<u32, LockError> {
        if name.is_empty() {
            return if self.slots() > GLOBAL {
                Ok(GLOBAL)
            } else {
                Err(LockError::TableFull { capacity: 0 })
            };
        }
        let key = Key::new(name.as_bytes());
        let recent = &self.recent[name.len() % RECENT];
        let r = recent.load(Relaxed);
        // Slots are write-once: one that holds `name` holds it with the
        // entry `r` was made from. (0 gives no slot.)
        if let Some(slot) = self.names.get(((r >> 32) as usize).wrapping_sub(1)) {
            if slot.holds(slot.state.load(Acquire), key) {
                return Ok(r as u32);
            }
        }
        match cached(&self.names, key) {
            Some((k, i)) => {
                if r == 0 {
                    // First come: a lost race leaves the other name there.
                    let _ =
                        recent.compare_exchange(0, ((k as u64 + 1) << 32) | u64::from(i), Relaxed, Relaxed);
                }
                Ok(i)
            }
            None => self.entry_for_slow(name),
        }
    }

    /// [`Locks::entry_for`] for a name not in the cache: found in the
    /// table, or a free entry named.
    #[cold]
    #[inline(never)]
    fn entry_for_slow(&self, name: &str) -> Result<u32, LockError> {
        if name.len() > MAX_LOCK_NAME {
            return Err(LockError::NameTooLong { len: name.len() });
        }
        if let Some(&i) = self.overflow().get(name) {
            return Ok(i);
        }
        if let Some(i) = self.find(name) {
            self.remember(name, i);
            return Ok(i);
        }
        let capacity = self.slots().saturating_sub(2);
        if capacity == 0 {
            return Err(LockError::TableFull { capacity });
        }
        // Name a free entry under the naming lock, looking again first:
        // another process may have named it meanwhile.
        let guard = self.acquire(NAMING, None)?;
        let result = match self.find(name) {
            Some(i) => Ok(i),
            None => match (2..self.slots()).find(|&i| self.entry(i).named.load(Acquire) == 0) {
                Some(i) => {
                    let e = self.entry(i);
                    for (dst, b) in e.name.iter().zip(name.bytes()) {
                        dst.store(b, Relaxed);
                    }
                    e.name_len.store(name.len() as u32, Relaxed);
                    e.named.store(1, Release);
                    Ok(i)
                }
                None => Err(LockError::TableFull { capacity }),
            },
        };
        drop(guard);
        if let Ok(i) = result {
            self.remember(name, i);
        }
        result
    }

    /// The names that overflowed the cache.
    fn overflow(&self) -> std::sync::MutexGuard<'_, FxHashMap<String, u32>> {
        self.overflow.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Caches that `name` is entry `i`.
    fn remember(&self, name: &str, i: u32) {
        if !cache(&self.names, name.as_bytes(), i) {
            self.overflow().insert(name.to_owned(), i);
        }
    }

    fn find(&self, name: &str) -> Option<u32> {
        (2..self.slots()).find(|&i| {
            let e = self.entry(i);
            e.named.load(Acquire) == 1
                && e.name_len.load(Acquire) as usize == name.len()
                && e.name.iter().zip(name.bytes()).all(|(a, b)| a.load(Relaxed) == b)
        })
    }

    #[inline(always)]
    fn run<R>(
        &self,
        i: u32,
        name: &str,
        timeout: Option<Duration>,
        f: impl FnOnce(&Section) -> R,
    ) -> Result<R, LockError> {
        self.run_entry(self.entry(i), i, name, timeout, f)
    }

    /// [`Locks::run`] on `entry`, this segment's entry `i`.
    #[inline(always)]
    fn run_entry<R>(
        &self,
        entry: &LockEntry,
        i: u32,
        name: &str,
        timeout: Option<Duration>,
        f: impl FnOnce(&Section) -> R,
    ) -> Result<R, LockError> {
        let guard = self.acquire_entry(entry, i, timeout)?;
        let section = Section {
            name,
            owner_died: guard.owner_died,
            token: guard.token,
        };
        // A panic unwinds through `guard`, whose drop releases the lock.
        let r = f(&section);
        drop(guard);
        Ok(r)
    }

    /// Takes lock `i`. Inline, the case of a free lock: one try-lock and
    /// the holder's bookkeeping on the mutex's own cache line; waiting,
    /// a dead previous holder and every error are
    /// [`Locks::acquire_slow`]'s. (Out of line, passing the result through
    /// memory, with a locked swap in the pid look-up, a section cost 2.3x
    /// the bare mutex's; each step measured in the commits that took it to
    /// 1.03x.)
    #[inline(always)]
    fn acquire(&self, i: u32, timeout: Option<Duration>) -> Result<Held<'_>, LockError> {
        self.acquire_entry(self.entry(i), i, timeout)
    }

    /// [`Locks::acquire`] of `entry`, this segment's entry `i`.
    #[inline(always)]
    fn acquire_entry<'a>(
        &self,
        entry: &'a LockEntry,
        i: u32,
        timeout: Option<Duration>,
    ) -> Result<Held<'a>, LockError> {
        // SAFETY: every entry's mutex was initialised by `Segment::create`
        // and lives as long as the mapping this `Locks` keeps.
        let rc = unsafe { sys::mutex::try_lock_rc(entry.mutex_ptr()) };
        // Only a bool crosses from the slow path: the holder's fields stay
        // in registers on the fast one.
        let owner_died = rc != 0 && self.acquire_slow(i, entry, rc, timeout)?;
        Ok(self.record(entry, owner_died))
    }

    /// The rest of [`Locks::acquire`], after the try-lock returned `rc`:
    /// whether the previous holder died, once this thread holds the lock.
    #[cold]
    #[inline(never)]
    fn acquire_slow(
        &self,
        i: u32,
        entry: &LockEntry,
        rc: libc::c_int,
        timeout: Option<Duration>,
    ) -> Result<bool, LockError> {
        let m = entry.mutex_ptr();
        let mut got = sys::mutex::classify(rc);
        if matches!(got, Err(LockFailure::Timeout)) {
            if timeout == Some(Duration::ZERO) {
                // A try, not a wait (the async section's first attempt).
                return Err(LockError::Timeout);
            }
            // Counted by the waiter, before it sleeps: a read-modify-write
            // on the entry's second line, which no holder writes, so it is
            // in no one's section. (Counted by the new holder, in its
            // section, or after its release, it measured no better: within
            // the contended bench's noise, 0.8-1.4x the robust mutex.)
            entry.waits.fetch_add(1, Relaxed);
            got = Self::wait(entry, timeout)?;
        }
        let owner_died = match got {
            Ok(Acquired::Clean) => false,
            Ok(Acquired::OwnerDied) => {
                entry.owner_died.fetch_add(1, Relaxed);
                tracing::warn!(
                    lock = i,
                    previous = entry.holder_pid.load(Relaxed),
                    "previous lock holder died inside its section"
                );
                // SAFETY: this thread holds `m` after EOWNERDEAD.
                if let Err(e) = unsafe { sys::mutex::make_consistent(m) } {
                    // SAFETY: held by this thread (above); unlocking without
                    // consistency makes it unrecoverable, which is the truth.
                    let _ = unsafe { sys::mutex::unlock(m) };
                    return Err(LockError::Io(e));
                }
                true
            }
            Err(LockFailure::Deadlock) => return Err(LockError::WouldDeadlock),
            Err(LockFailure::NotRecoverable) => {
                return Err(LockError::Unrecoverable {
                    holder_pid: entry.holder_pid.load(Acquire),
                })
            }
            Err(LockFailure::Timeout) => return Err(LockError::Timeout),
            Err(LockFailure::Other(e)) => return Err(LockError::Io(e)),
        };
        Ok(owner_died)
    }

    /// Waits for the held lock of `entry`, in slices, until it is had (or
    /// the lock fails otherwise), `timeout` runs out or its holder is found
    /// gone for [`GONE_GRACE`]. The clock is read for a caller's deadline
    /// only, and after a slice that ran out: a wait that ends within its
    /// first slice reads the coarse clock once (for that slice's end).
    fn wait(
        entry: &LockEntry,
        timeout: Option<Duration>,
    ) -> Result<Result<Acquired, LockFailure>, LockError> {
        let m = entry.mutex_ptr();
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut gone_since: Option<Instant> = None;
        loop {
            let slice = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left.min(SLICE),
                    _ => return Err(LockError::Timeout),
                },
                None => SLICE,
            };
            // SAFETY: every entry's mutex was initialised by
            // `Segment::create` and lives as long as the caller's mapping.
            let got = unsafe { sys::mutex::lock_timeout(m, slice, slice < SLICE) };
            if !matches!(got, Err(LockFailure::Timeout)) {
                return Ok(got);
            }
            // Still held: by a live process, or by one that is gone? The
            // pid with its start time: a pid reused since by another
            // process does not make a dead holder look alive.
            let holder = entry.holder_pid.load(Acquire);
            let started = entry.holder_start.load(Relaxed);
            if holder != 0 && !sys::claim::process_lives(holder, started) {
                let now = Instant::now();
                let since = *gone_since.get_or_insert(now);
                if now.duration_since(since) > GONE_GRACE {
                    return Err(LockError::Unrecoverable { holder_pid: holder });
                }
            } else {
                gone_since = None;
            }
        }
    }

    /// The holder's bookkeeping, under the lock: one writer at a time,
    /// written as a seqlock (pid cleared, fields, pid stored) so a reader
    /// never pairs one holder's slot with another's term (leader
    /// election). All on the mutex's cache line, which the lock just took.
    #[inline(always)]
    fn record<'a>(&self, entry: &'a LockEntry, owner_died: bool) -> Held<'a> {
        entry.holder_pid.store(0, Relaxed);
        std::sync::atomic::fence(Release);
        let token = entry.token.load(Relaxed).wrapping_add(1);
        entry.token.store(token, Relaxed);
        entry.holder_slot.store(self.slot, Relaxed);
        entry.holder_generation.store(self.generation, Relaxed);
        let (pid, start) = sys::claim::own_identity();
        entry.holder_start.store(start, Relaxed);
        entry.holder_pid.store(pid, Release);
        Held {
            entry,
            owner_died,
            token,
        }
    }

    /// Every lock that has a name (and the global one), with its holder and
    /// counters.
    pub fn stats(&self) -> Vec<LockStats> {
        read_lock_stats(&self.segment)
    }
}

/// A held lock from [`Locks::lock`]; unlocks on drop (or [`LockGuard::unlock`]).
#[derive(Debug)]
pub struct LockGuard {
    segment: Segment,
    index: u32,
    owner_died: bool,
    token: u64,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl LockGuard {
    /// The section this guard stands for (named `name`).
    #[cfg(feature = "tokio")]
    pub(crate) fn section<'a>(&self, name: &'a str) -> Section<'a> {
        Section {
            name,
            owner_died: self.owner_died,
            token: self.token,
        }
    }

    /// Whether the previous holder died holding it (see
    /// [`Section::previous_owner_died`]).
    pub fn previous_owner_died(&self) -> bool {
        self.owner_died
    }

    /// This acquisition's fencing token.
    pub fn fencing_token(&self) -> u64 {
        self.token
    }

    /// Releases the lock (as dropping the guard does).
    pub fn unlock(self) {}
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        drop(Held {
            entry: self.segment.lock_entry(self.index),
            owner_died: self.owner_died,
            token: self.token,
        });
    }
}

/// One named lock, resolved once ([`Locks::named`]): its sections skip
/// the name lookup.
#[derive(Debug, Clone)]
pub struct NamedLock {
    locks: Locks,
    /// Entry `index` of the table `locks` keeps mapped, found once (a
    /// look-up by index, bounds-checked, cost a section ~3%).
    entry: NonNull<LockEntry>,
    index: u32,
    name: String,
}

// SAFETY: `entry` points into the lock table that `locks` keeps mapped
// as long as this value (see `Locks`'s `Send` impl): sending or sharing it
// is sending or sharing a `&LockEntry` with its `Locks`.
unsafe impl Send for NamedLock {}
// SAFETY: as for `Send`.
unsafe impl Sync for NamedLock {}

impl NamedLock {
    /// The lock's entry.
    #[inline(always)]
    fn entry(&self) -> &LockEntry {
        // SAFETY: made from a `&LockEntry` into the mapping `self.locks`
        // keeps alive; nothing frees or moves it.
        unsafe { self.entry.as_ref() }
    }

    /// Runs `f` holding this lock: as [`Locks::synchronize_key`].
    ///
    /// # Errors
    /// `WouldDeadlock`, `Unrecoverable`.
    #[inline]
    pub fn synchronize<R>(&self, f: impl FnOnce(&Section) -> R) -> Result<R, LockError> {
        self.locks
            .run_entry(self.entry(), self.index, &self.name, None, f)
    }

    /// Runs `f` holding this lock if it can be had within `timeout`.
    ///
    /// # Errors
    /// `Timeout`, and as [`NamedLock::synchronize`].
    pub fn try_synchronize<R>(
        &self,
        timeout: Duration,
        f: impl FnOnce(&Section) -> R,
    ) -> Result<R, LockError> {
        self.locks
            .run_entry(self.entry(), self.index, &self.name, Some(timeout), f)
    }
}

/// The lock table's rows (the global lock and every named entry).
pub(crate) fn read_lock_stats(segment: &Segment) -> Vec<LockStats> {
    let now = sys::process::monotonic_ns();
    (GLOBAL..segment.layout().lock_slots)
        .filter_map(|i| {
            let e = segment.lock_entry(i);
            let name = if i == GLOBAL {
                Some(String::new())
            } else {
                e.name()
            }?;
            let pid = e.holder_pid.load(Acquire);
            // The hold time is the master's observation of this acquisition.
            let since = if e.hold_seen_token.load(Acquire) == e.token.load(Acquire) {
                e.hold_since_ns.load(Acquire)
            } else {
                0
            };
            Some(LockStats {
                name,
                holder: (pid != 0).then(|| (e.holder_slot.load(Relaxed), pid)),
                held_for: (pid != 0 && since != 0).then(|| Duration::from_nanos(now.saturating_sub(since))),
                acquisitions: e.token.load(Relaxed),
                waits: e.waits.load(Relaxed),
                owner_died: e.owner_died.load(Relaxed),
                token: e.token.load(Relaxed),
            })
        })
        .collect()
}

/// A held lock: released on drop (also when a section panics).
struct Held<'a> {
    entry: &'a LockEntry,
    owner_died: bool,
    token: u64,
}

impl Drop for Held<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        self.entry.holder_pid.store(0, Release);
        // SAFETY: this thread acquired the mutex in `acquire` and has not
        // released it; the mapping outlives `self` (it borrows `Locks`).
        if let Err(e) = unsafe { sys::mutex::unlock(self.entry.mutex_ptr()) } {
            unlock_failed(e);
        }
    }
}

#[cold]
#[inline(never)]
fn unlock_failed(e: std::io::Error) {
    tracing::error!(error = %e, "unlocking a synchronize lock failed");
}

/// `name` (a name the lock table holds, or `""`) as a `&'static str`, for
/// an async section's `Section<'static>`: each distinct name is allocated
/// once for the life of the process. Bounded: a table's names are at most
/// [`MAX_LOCK_NAME`] bytes and are never removed, so this holds at most
/// the names of the tables the process used.
#[cfg(feature = "tokio")]
fn interned(name: &str) -> &'static str {
    static NAMES: Mutex<Option<rustc_hash::FxHashSet<&'static str>>> = Mutex::new(None);
    let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    let names = names.get_or_insert_with(Default::default);
    if let Some(&n) = names.get(name) {
        return n;
    }
    let n: &'static str = Box::leak(name.into());
    names.insert(n);
    n
}

#[cfg(feature = "tokio")]
impl Locks {
    /// An async section for tokio: `f`'s future runs holding lock `name`
    /// (`""` for the global lock) and may cross `.await` points.
    ///
    /// A pthread mutex belongs to the thread that locked it, and a task may
    /// move between threads at every `.await`; so a blocking-pool thread
    /// (`spawn_blocking`) takes the lock, hands the [`Section`] to the task,
    /// and waits to unlock until the future is done — or dropped (a
    /// cancelled or panicking section releases the lock too). The cost is
    /// that thread hand-off twice per section (tens of microseconds), plus
    /// one blocking-pool thread held for as long as the section lasts.
    ///
    /// # Errors
    /// As [`Locks::synchronize_key`].
    pub async fn synchronize_async<F, Fut, R>(&self, name: &str, f: F) -> Result<R, LockError>
    where
        F: FnOnce(Section<'static>) -> Fut,
        Fut: std::future::Future<Output = R>,
    {
        let i = if name.is_empty() {
            GLOBAL
        } else {
            self.entry_for(name)?
        };
        let (acquired_tx, acquired_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let locks = self.clone();
        let name = interned(name);
        let holder = tokio::task::spawn_blocking(move || {
            let held = match locks.acquire(i, None) {
                Ok(h) => h,
                Err(e) => {
                    let _ = acquired_tx.send(Err(e));
                    return;
                }
            };
            let section = Section {
                name,
                owner_died: held.owner_died,
                token: held.token,
            };
            if acquired_tx.send(Ok(section)).is_ok() {
                // Until the task says it is done, or drops its end.
                let _ = release_rx.recv();
            }
            drop(held);
        });
        let section = match acquired_rx.await {
            Ok(r) => r?,
            Err(_) => {
                return Err(LockError::Io(std::io::Error::other("the lock thread ended")));
            }
        };
        let r = f(section).await;
        let _ = release_tx.send(());
        let _ = holder.await;
        Ok(r)
    }
}

/// Longest name in 8-byte words.
const NAME_WORDS: usize = MAX_LOCK_NAME.div_ceil(8);
/// Slots a name may occupy from its hash's: a name that finds none free
/// goes to [`Locks::overflow`].
const PROBE: usize = 8;
/// [`CachedName::state`] of a slot never written, and of one being written.
const EMPTY: u64 = 0;
const WRITING: u64 = 1;

/// The names a [`Locks`] (and its clones) resolved, read without a lock
/// by every `synchronize_key`: an open-addressed table of write-once
/// slots, each holding a name's bytes and its entry. Names never move
/// once written into the lock table, so an entry found stays right. (A
/// `Mutex<HashMap>` with SipHash here cost 34 ns per section, over four
/// times the bare mutex's whole section; a per-thread cache 1.4-1.7x.)
/// Room for about twice `lock_slots` names (16 to 256 slots).
fn name_cache(lock_slots: u32) -> Arc<[CachedName]> {
    let n = (2 * lock_slots as usize).next_power_of_two().clamp(16, 256);
    (0..n)
        .map(|_| CachedName {
            state: AtomicU64::new(EMPTY),
            words: Default::default(),
        })
        .collect()
}

/// One name in the cache: written once, then only read.
struct CachedName {
    /// [`EMPTY`], [`WRITING`], or, once `words` are written (Release),
    /// the name's length in the high half and its entry + 2 in the low.
    state: AtomicU64,
    /// The name's bytes, 8 to a word (little-endian), zero-padded.
    words: [AtomicU64; NAME_WORDS],
}

/// Bytes `chunk` (at most 8) as a little-endian word, zero-padded. A
/// short one from two overlapping loads (or three bytes): copied into a
/// padded buffer or folded byte by byte, a 5-byte name's look-up cost 7 ns.
#[inline(always)]
fn word(chunk: &[u8]) -> u64 {
    let n = chunk.len();
    if let Ok(b) = <[u8; 8]>::try_from(chunk) {
        u64::from_le_bytes(b)
    } else if n >= 4 {
        let lo = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        let hi = u32::from_le_bytes([chunk[n - 4], chunk[n - 3], chunk[n - 2], chunk[n - 1]]);
        u64::from(lo) | (u64::from(hi) << ((n - 4) * 8))
    } else if n > 0 {
        u64::from(chunk[0])
            | (u64::from(chunk[n / 2]) << (n / 2 * 8))
            | (u64::from(chunk[n - 1]) << ((n - 1) * 8))
    } else {
        0
    }
}

/// A name as the cache compares it: its whole 8-byte words (read from
/// the name where they are needed) and its last, partial word.
#[derive(Clone, Copy)]
struct Key<'a> {
    name: &'a [u8],
    /// The bytes after the whole words as a word, zero-padded (0 if none).
    tail: u64,
}

impl<'a> Key<'a> {
    #[inline(always)]
    fn new(name: &'a [u8]) -> Self {
        Self {
            name,
            tail: word(name.chunks_exact(8).remainder()),
        }
    }

    /// The whole words.
    #[inline(always)]
    fn words(self) -> impl Iterator<Item = u64> + 'a {
        self.name.chunks_exact(8).map(word)
    }

    /// FxHash's step over the length, the whole words and the tail (the
    /// multiply's high bits are the well-mixed ones).
    #[inline(always)]
    fn hash(self) -> usize {
        const K: u64 = 0xf135_7aea_2e62_a9c5;
        let step = |h: u64, w: u64| (h.rotate_left(26) ^ w).wrapping_mul(K);
        let h = self.words().fold(self.name.len() as u64, step);
        (step(h, self.tail) >> 32) as usize
    }
}

impl CachedName {
    /// Whether this slot holds `key` (its `state` read with Acquire). The
    /// slot's words past the name are zero, as is `key.tail` without a
    /// partial word.
    #[inline(always)]
    fn holds(&self, state: u64, key: Key<'_>) -> bool {
        let whole = key.name.len() / 8;
        state >> 32 == key.name.len() as u64
            && key.words().zip(&self.words).all(|(k, w)| w.load(Relaxed) == k)
            && self.words.get(whole).is_none_or(|w| w.load(Relaxed) == key.tail)
    }
}

/// The slot and entry of `key`'s name, if cached in its probe window of
/// `slots` (a power of two of them).
#[inline(always)]
fn cached(slots: &[CachedName], key: Key<'_>) -> Option<(usize, u32)> {
    let mask = slots.len() - 1;
    let h = key.hash();
    for k in 0..PROBE {
        let at = (h + k) & mask;
        let slot = &slots[at];
        let state = slot.state.load(Acquire);
        if state == EMPTY {
            return None;
        }
        if slot.holds(state, key) {
            return Some((at, (state as u32).wrapping_sub(2)));
        }
    }
    None
}

/// Caches that `name` (at most [`MAX_LOCK_NAME`] bytes) is entry `i`;
/// false if its probe window is full.
fn cache(slots: &[CachedName], name: &[u8], i: u32) -> bool {
    let key = Key::new(name);
    let mask = slots.len() - 1;
    let h = key.hash();
    for k in 0..PROBE {
        let slot = &slots[(h + k) & mask];
        match slot.state.compare_exchange(EMPTY, WRITING, Acquire, Acquire) {
            Ok(_) => {
                for (w, c) in slot.words.iter().zip(name.chunks(8)) {
                    w.store(word(c), Relaxed);
                }
                let state = ((name.len() as u64) << 32) | u64::from(i + 2);
                slot.state.store(state, Release);
                return true;
            }
            Err(state) if slot.holds(state, key) => return true,
            // Another name's, or one being written.
            Err(_) => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_word_is_its_bytes_zero_padded() {
        let bytes: Vec<u8> = (1..=8).collect();
        for n in 0..=8 {
            let mut padded = [0u8; 8];
            padded[..n].copy_from_slice(&bytes[..n]);
            assert_eq!(word(&bytes[..n]), u64::from_le_bytes(padded), "{n} bytes");
        }
    }

    #[test]
    fn the_name_cache_finds_what_it_holds_and_nothing_else() {
        // 16 slots for 40 names: probe windows fill up and collide.
        let slots = name_cache(1);
        assert_eq!(slots.len(), 16);
        let names: Vec<String> = (0..40)
            .map(|i| format!("name-{i}-{}", "z".repeat(i % 13)))
            .collect();
        let mut held = Vec::new();
        for (i, name) in names.iter().enumerate() {
            if cache(&slots, name.as_bytes(), i as u32 + 2) {
                held.push(i);
            } else {
                assert_eq!(cached(&slots, Key::new(name.as_bytes())), None, "{name}: no room");
            }
            // Caching a name twice is a no-op.
            let again = cache(&slots, name.as_bytes(), i as u32 + 2);
            assert_eq!(again, held.last() == Some(&i), "{name}");
        }
        assert!(held.len() >= 16 / 2 && held.len() <= 16, "{}", held.len());
        for &i in &held {
            assert_eq!(
                cached(&slots, Key::new(names[i].as_bytes())).map(|(_, e)| e),
                Some(i as u32 + 2),
                "{}",
                names[i]
            );
        }
        // A slot holds its own name only: not one with a trailing NUL (the
        // same zero-padded words), not a prefix.
        let slots = name_cache(1);
        assert!(cache(&slots, b"x", 7));
        let key = Key::new(b"x");
        let slot = (0..PROBE)
            .map(|k| &slots[(key.hash() + k) & (slots.len() - 1)])
            .find(|s| s.holds(s.state.load(Acquire), key))
            .expect("cached");
        let state = slot.state.load(Acquire);
        assert!(!slot.holds(state, Key::new(b"x\0")));
        assert!(!slot.holds(state, Key::new(b"")));
        assert!(!slot.holds(state, Key::new(b"y")));
        assert_eq!(cached(&slots, Key::new(b"x\0")), None);
    }
}
