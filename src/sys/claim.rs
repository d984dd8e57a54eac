//! Claims the kernel ends with their holder: an open file description lock
//! (`fcntl(2)` `F_OFD_SETLK`) on one byte of the segment's memfd per worker
//! slot, and a process identity that pid reuse cannot fake.
//!
//! # Why a lock and not `kill(pid, 0)`
//! A pid names a process only while it lives: after the holder dies and
//! `pid_max` wraps (32,768 here; a torture run uses 10,000 pids), the same
//! number can belong to an unrelated live process, and a probe by pid then
//! sees a dead slot holder alive for ever. An OFD lock is released by the
//! kernel when the last descriptor of its open file description closes,
//! which death does, so "the byte is locked" is "the holder lives", with no
//! number to reuse.
//!
//! # Why these choices
//! - *OFD locks, not POSIX record locks (`F_SETLK`):* a process's POSIX locks
//!   on a file all vanish when it closes *any* descriptor of that file (a
//!   dropped `Segment::try_clone_fd` would silently free every slot it
//!   holds), and a process never sees its own POSIX locks with `F_GETLK`.
//!   OFD locks belong to one open file description and conflict across
//!   descriptions, in one process or several.
//! - *A description of its own per claim:* the segment's descriptor is
//!   shared by the master and every worker (inherited across `fork` and
//!   `exec`), so a lock on it would be everybody's. [`claim`] opens the memfd
//!   again through `/proc/self/fd` (a new open file description, close on
//!   exec) and locks that one.
//! - *Not a robust mutex per slot:* a pthread mutex belongs to a thread, not
//!   a process: an endpoint opened on one thread and used or dropped on
//!   another (an async driver, a handle) would look dead when its first
//!   thread exits and could not unlock from the second.
//! - A child forked without `exec` shares its parent's descriptions, so it
//!   would keep the parent's claims alive until it exits or execs; the
//!   `pthread_atfork(3)` child handler below closes them in the child, and
//!   the prepare handler waits for a claim being made or dropped, so no
//!   fork catches one half registered.
//!
//! The locked bytes lie past the segment's end ([`CLAIM_BASE`]): a lock
//! needs no data under it, and nothing else in the crate locks the memfd.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering::*};

/// Offset of slot 0's byte: far past any segment's end (1 TiB).
const CLAIM_BASE: i64 = 1 << 40;

/// A held claim: closing it (drop) releases the lock.
#[derive(Debug)]
pub struct Claim {
    fd: Option<OwnedFd>,
    /// Index in [`FORK_CLOSE`], if registered there.
    registered: Option<usize>,
    /// The process that made it (a forked child's copy is not its own).
    pid: u32,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let Some(fd) = self.fd.take() else { return };
        if super::getpid() != self.pid {
            // A copy inherited across fork: the atfork handler closed this
            // number in the child, and the table entry it names may hold a
            // claim of the child's own by now; neither is this copy's to
            // touch (closing the number again could close another file).
            std::mem::forget(fd);
            return;
        }
        // Unregister and close with no fork in between (else the child
        // would inherit the descriptor with nobody to close it).
        let _guard = ForkGuard::take();
        if let Some(i) = self.registered {
            let _ = FORK_CLOSE[i].compare_exchange(fd.as_raw_fd(), -1, AcqRel, Relaxed);
        }
        drop(fd);
    }
}

fn slot_lock(kind: libc::c_short, slot: u32) -> libc::flock {
    libc::flock {
        l_type: kind,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: CLAIM_BASE + i64::from(slot),
        l_len: 1,
        // OFD locks require 0 here (fcntl(2)).
        l_pid: 0,
    }
}

/// Claims slot `slot` of the segment whose memfd is `segment`: opens
/// `/proc/self/fd/N` (`open(2)`, `O_RDWR | O_CLOEXEC`: a new open file
/// description) and write-locks the slot's byte on it with `fcntl(2)`
/// `F_OFD_SETLK`. `Ok(None)` if another description holds it (`EAGAIN`:
/// a live holder, this process's own other claims included).
///
/// # Errors
/// If `/proc` cannot reopen the memfd, or `fcntl` fails otherwise.
pub fn claim(segment: BorrowedFd<'_>, slot: u32) -> io::Result<Option<Claim>> {
    let path = format!("/proc/self/fd/{}", segment.as_raw_fd());
    install_fork_handlers();
    // From the open to the registration, no fork: a child forked in
    // between would hold the description with nobody to close it.
    let _guard = ForkGuard::take();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
    let fd: OwnedFd = file.into();
    let lock = slot_lock(libc::F_WRLCK as libc::c_short, slot);
    match nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_OFD_SETLK(&lock)) {
        Ok(_) => {}
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let registered = register_for_fork(fd.as_raw_fd());
    Ok(Some(Claim {
        fd: Some(fd),
        registered,
        pid: super::getpid(),
    }))
}

/// Whether some open file description holds slot `slot`'s claim:
/// `fcntl(2)` `F_OFD_GETLK` on `segment` (which holds no claim itself).
///
/// # Errors
/// If `fcntl` fails.
pub fn is_claimed(segment: BorrowedFd<'_>, slot: u32) -> io::Result<bool> {
    let mut lock = slot_lock(libc::F_WRLCK as libc::c_short, slot);
    nix::fcntl::fcntl(segment, nix::fcntl::FcntlArg::F_OFD_GETLK(&mut lock))?;
    Ok(lock.l_type != libc::F_UNLCK as libc::c_short)
}

/// Claims a forked child must close: descriptor numbers, -1 when free. A
/// fixed table of atomics because the child handler may take no lock.
static FORK_CLOSE: [AtomicI32; MAX_CLAIMS] = [const { AtomicI32::new(-1) }; MAX_CLAIMS];

/// Claims a process can hold with forked children closing every one: the
/// segment's `MAX_WORKERS` (asserted there). A process holding more (the
/// slots of several segments in threads mode) keeps the rest in a child
/// forked without `exec`, until that child exits or execs.
pub const MAX_CLAIMS: usize = 1024;

/// Held (true) while a claim is being made or dropped, and by `fork` itself
/// from its prepare handler to its parent and child handlers: a claim's
/// descriptor is either registered in [`FORK_CLOSE`] or not open at every
/// fork.
static FORK_BUSY: AtomicBool = AtomicBool::new(false);

/// A hold on [`FORK_BUSY`] (a spin lock: the sections it guards are a few
/// system calls, and a fork waits for them).
struct ForkGuard;

impl ForkGuard {
    fn take() -> Self {
        take_fork_busy();
        Self
    }
}

impl Drop for ForkGuard {
    fn drop(&mut self) {
        FORK_BUSY.store(false, Release);
    }
}

fn take_fork_busy() {
    while FORK_BUSY
        .compare_exchange_weak(false, true, Acquire, Relaxed)
        .is_err()
    {
        std::hint::spin_loop();
    }
}

/// Registers the `pthread_atfork(3)` handlers once per process. Not with a
/// `std::sync::Once`: a fork while another thread is inside `call_once`
/// leaves the child's copy "running" for ever, and the child's first
/// claim would hang on it (seen in tests that fork from many threads). A
/// fork between the flag and the registration leaves that child without
/// handlers: its own forks then keep its claims, which is the old
/// behaviour, not a hang.
fn install_fork_handlers() {
    static INSTALLED: AtomicBool = AtomicBool::new(false);
    extern "C" fn prepare() {
        take_fork_busy();
    }
    extern "C" fn parent() {
        FORK_BUSY.store(false, Release);
    }
    extern "C" fn child() {
        for entry in &FORK_CLOSE {
            let fd = entry.swap(-1, Relaxed);
            if fd >= 0 {
                // SAFETY: `fd` was registered by a live `Claim` of the
                // parent (registration and close happen under FORK_BUSY,
                // which the fork holds); in this child nothing else owns
                // that number (the inherited `Claim` copy forgets it, see
                // its Drop). close(2) is async-signal-safe.
                drop(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        FORK_BUSY.store(false, Release);
    }
    if INSTALLED.swap(true, AcqRel) {
        return;
    }
    // SAFETY: registers handlers that only use atomics and close(2), all
    // async-signal-safe, as fork handlers must be.
    unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
}

fn register_for_fork(fd: RawFd) -> Option<usize> {
    FORK_CLOSE
        .iter()
        .position(|e| e.compare_exchange(-1, fd, AcqRel, Relaxed).is_ok())
}

/// The start time of process `pid` in clock ticks after boot, field 22 of
/// `/proc/<pid>/stat` (proc(5)); `None` if there is no such process. With
/// the pid, it names one process for the life of the system: a reused pid
/// has a later start time.
pub fn process_start(pid: u32) -> Option<u64> {
    if pid == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything,
    // spaces and parentheses included: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts with field 3 (state); field 22 is its 20th.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// This process's pid ([`super::process::cached_pid`]) and start time
/// ([`process_start`], low 32 bits), cached per process (a forked child
/// looks up its own): one load, as a lock's fast path records them on
/// every acquisition (the pid and start cached apart, checked against each
/// other, cost an uncontended section ~6%).
#[inline]
pub fn own_identity() -> (u32, u32) {
    let id = super::process::cached_identity();
    ((id >> 32) as u32, id as u32)
}

/// Whether process `pid` with start time `start` (low 32 bits, as
/// [`own_identity`] gives) still exists: false once it is gone, even if its
/// pid now names another process. A start of 0 (unknown) falls back to
/// existence alone.
pub fn process_lives(pid: u32, start: u32) -> bool {
    match process_start(pid) {
        None => false,
        Some(_) if start == 0 => true,
        Some(now) => now as u32 == start,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn memfd() -> OwnedFd {
        crate::sys::memfd_create("claim-test").unwrap()
    }

    #[test]
    fn a_claim_excludes_others_and_ends_with_its_descriptor() {
        let fd = memfd();
        assert!(!is_claimed(fd.as_fd(), 3).unwrap());
        let c = claim(fd.as_fd(), 3).unwrap().expect("free");
        assert!(is_claimed(fd.as_fd(), 3).unwrap());
        assert!(!is_claimed(fd.as_fd(), 4).unwrap(), "one byte per slot");
        assert!(
            claim(fd.as_fd(), 3).unwrap().is_none(),
            "held, even by this process"
        );
        drop(c);
        assert!(!is_claimed(fd.as_fd(), 3).unwrap());
        assert!(claim(fd.as_fd(), 3).unwrap().is_some());
    }

    #[test]
    fn an_inherited_copys_drop_leaves_the_fork_table_alone() {
        let fd = memfd();
        let own = claim(fd.as_fd(), 5).unwrap().expect("free");
        let i = own.registered.expect("registered for forks");
        let n = own.fd.as_ref().map(|f| f.as_raw_fd()).unwrap();
        // The copy of a parent's claim a forked child holds, at the table
        // index this process's own claim took after the fork emptied it.
        let copy = Claim {
            fd: Some(fd.try_clone().unwrap()),
            registered: Some(i),
            pid: own.pid.wrapping_add(1),
        };
        drop(copy);
        assert_eq!(
            FORK_CLOSE[i].load(Acquire),
            n,
            "the copy's drop unregistered this process's claim: a child it forks would keep the slot"
        );
        drop(own);
    }

    #[test]
    fn own_start_names_this_process() {
        let me = crate::sys::getpid();
        let (pid, start) = own_identity();
        assert_eq!(pid, me);
        assert!(process_lives(me, start));
        assert!(!process_lives(me, start.wrapping_add(1)), "another start time");
        assert_eq!(process_start(0), None);
    }
}
