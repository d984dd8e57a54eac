//! `synchronize` across threads and real processes, under watchdogs: mutual
//! exclusion, owner-died recovery with repair (1,000 holders SIGKILLed
//! inside their section, counter exact), fencing tokens, re-entry, panics,
//! timeouts, names and a full table.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shmcluster::raw::{Config, Segment};
use shmcluster::testing::{fork, ExitStatus, Watchdog};
use shmcluster::{LockError, Locks, MAX_LOCK_NAME_LEN};

mod common;

fn segment() -> Segment {
    Segment::create(&Config::new(2)).unwrap()
}

/// A page of memory shared with forked children (MAP_SHARED | MAP_ANONYMOUS),
/// holding the data the lock protects: atomics, accessed relaxed (the lock
/// orders them).
struct Shared {
    ptr: *mut AtomicU64,
}

// SAFETY: the page holds only atomics and lives until the test process ends.
unsafe impl Send for Shared {}
// SAFETY: as for Send: shared access is to atomics only.
unsafe impl Sync for Shared {}

impl Shared {
    fn new() -> Self {
        // SAFETY: an anonymous shared mapping of one page; no pointers passed in.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Self { ptr: p.cast() }
    }

    fn at(&self, i: usize) -> &AtomicU64 {
        assert!(i < 512);
        // SAFETY: in bounds of the page, aligned, zero-initialised atomics.
        unsafe { &*self.ptr.add(i) }
    }
}

#[test]
fn sections_exclude_each_other_across_threads() {
    let _dog = Watchdog::new("threads", Duration::from_secs(30));
    let seg = segment();
    let plain = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let locks = Locks::new(&seg, t % 2).unwrap();
            let plain = plain.clone();
            std::thread::spawn(move || {
                for _ in 0..2000 {
                    locks
                        .synchronize_key("counter", |_| {
                            // A non-atomic read-modify-write: lost updates if two overlap.
                            let v = plain.load(Ordering::Relaxed);
                            std::hint::spin_loop();
                            plain.store(v + 1, Ordering::Relaxed);
                        })
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(plain.load(Ordering::Relaxed), 8000);
    let stats = Locks::new(&seg, 0).unwrap().stats();
    let counter = stats.iter().find(|s| s.name == "counter").unwrap();
    assert_eq!(counter.acquisitions, 8000);
    assert_eq!(counter.token, 8000, "one fencing token per acquisition");
    assert_eq!(counter.holder, None);
}

#[test]
fn reentry_panics_timeouts_names_and_a_full_table() {
    let _dog = Watchdog::new("errors", Duration::from_secs(30));
    let seg = Segment::create(&Config::new(1).lock_slots(4)).unwrap();
    let locks = Locks::new(&seg, 0).unwrap();
    // Re-entering the same lock on the same thread: an error, not a hang.
    let inner = locks.synchronize(|_| locks.synchronize(|_| ())).unwrap();
    assert!(matches!(inner, Err(LockError::WouldDeadlock)), "{inner:?}");
    // Another lock inside is fine.
    locks
        .synchronize(|_| locks.synchronize_key("a", |_| ()).unwrap())
        .unwrap();
    // A panic releases the lock and propagates.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        locks.synchronize_key("a", |_| panic!("inside")).unwrap();
    }));
    assert!(r.is_err());
    assert_eq!(locks.synchronize_key("a", |s| s.name().to_owned()).unwrap(), "a");
    assert_eq!(
        locks
            .named("a")
            .unwrap()
            .synchronize(|s| s.name().to_owned())
            .unwrap(),
        "a"
    );
    assert_eq!(locks.synchronize(|s| s.name().to_owned()).unwrap(), "");
    let t0 = locks.synchronize_key("a", |s| s.fencing_token()).unwrap();
    let t1 = locks.synchronize_key("a", |s| s.fencing_token()).unwrap();
    assert!(t1 > t0, "tokens grow: {t0} {t1}");
    // Held by another thread: try_synchronize times out.
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let other = Locks::new(&seg, 0).unwrap();
    let holder = std::thread::spawn(move || {
        other
            .synchronize_key("a", |_| {
                held_tx.send(()).unwrap();
                release_rx.recv().unwrap();
            })
            .unwrap();
    });
    held_rx.recv().unwrap();
    let started = Instant::now();
    let r = locks.try_synchronize("a", Duration::from_millis(150), |_| ());
    assert!(matches!(r, Err(LockError::Timeout)), "{r:?}");
    assert!(started.elapsed() >= Duration::from_millis(150));
    let held = locks.stats().into_iter().find(|s| s.name == "a").unwrap();
    assert_eq!(held.holder.map(|h| h.1), Some(std::process::id()));
    assert!(held.waits >= 1);
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    // Names: too long is an error; the table (4 entries: naming, global, 2
    // named) fills up.
    let long = "x".repeat(MAX_LOCK_NAME_LEN + 1);
    assert!(matches!(
        locks.synchronize_key(&long, |_| ()),
        Err(LockError::NameTooLong { len }) if len == MAX_LOCK_NAME_LEN + 1
    ));
    locks.synchronize_key("b", |_| ()).unwrap();
    assert!(matches!(
        locks.synchronize_key("c", |_| ()),
        Err(LockError::TableFull { capacity: 2 })
    ));
    // Existing names still work when the table is full.
    locks.synchronize_key("b", |_| ()).unwrap();
}

#[test]
fn every_name_is_its_own_lock_past_the_name_cache() {
    let _dog = Watchdog::new("names", Duration::from_secs(60));
    // 600 named entries: more names than the per-handle cache holds (256
    // slots), so some go to its overflow; names of every length up to the
    // limit, names that differ only in their last byte, and names that
    // differ only by a trailing NUL (the cache pads words with zeros).
    let seg = Segment::create(&Config::new(1).lock_slots(602)).unwrap();
    let mut names: Vec<String> = (0..500).map(|i| format!("lock-{i}")).collect();
    names.extend((1..=MAX_LOCK_NAME_LEN).map(|n| "n".repeat(n)));
    names.extend(["x".to_owned(), "x\0".to_owned(), "x\0\0".to_owned()]);
    names.extend(('a'..='g').map(|c| format!("same-prefix-{c}")));
    names.sort();
    names.dedup();
    assert!(names.len() <= 600, "{}", names.len());
    let locks = Locks::new(&seg, 0).unwrap();
    let clone = locks.clone();
    // Lock `i` is taken i % 3 + 1 times, alternating handles that share a
    // cache; its token then says how often it was taken, so two names
    // sharing an entry would show.
    for round in 0..3 {
        for (i, name) in names.iter().enumerate() {
            if round <= i % 3 {
                let by = if (round + i) % 2 == 0 { &locks } else { &clone };
                let seen = by.synchronize_key(name, |s| s.name().to_owned()).unwrap();
                assert_eq!(&seen, name);
            }
        }
    }
    // A handle with its own, empty cache finds the same entries.
    let fresh = Locks::new(&seg, 0).unwrap();
    for (i, name) in names.iter().enumerate() {
        let token = fresh.synchronize_key(name, |s| s.fencing_token()).unwrap();
        assert_eq!(token, (i % 3 + 2) as u64, "{name:?}");
    }
    let stats = fresh.stats();
    for (i, name) in names.iter().enumerate() {
        let row = stats.iter().find(|s| &s.name == name).unwrap();
        assert_eq!(row.acquisitions, (i % 3 + 2) as u64, "{name:?}");
    }
}

#[test]
fn same_name_from_two_processes_is_one_lock() {
    let _dog = Watchdog::new("naming", Duration::from_secs(30));
    let seg = segment();
    let shared = Shared::new();
    let children: Vec<_> = (0..2u32)
        .map(|c| {
            let seg = seg.clone();
            let shared = &shared;
            // SAFETY: the child takes only the segment's process-shared
            // locks and writes shared memory; it prints nothing and takes no
            // lock another thread of the test process may hold.
            _dog.track(
                unsafe {
                    fork(move || {
                        let locks = Locks::new(&seg, c).unwrap();
                        for _ in 0..5000 {
                            locks
                                .synchronize_key("shared-name", |_| {
                                    let v = shared.at(0).load(Ordering::Relaxed);
                                    shared.at(0).store(v + 1, Ordering::Relaxed);
                                })
                                .unwrap();
                        }
                        0
                    })
                }
                .unwrap(),
            )
        })
        .collect();
    for c in children {
        assert_eq!(
            c.wait_timeout(Duration::from_secs(20)).unwrap(),
            Some(ExitStatus::Code(0))
        );
    }
    assert_eq!(shared.at(0).load(Ordering::Relaxed), 10_000);
    let named: Vec<_> = Locks::new(&seg, 0)
        .unwrap()
        .stats()
        .into_iter()
        .filter(|s| !s.name.is_empty())
        .collect();
    assert_eq!(named.len(), 1, "{named:?}");
}

/// Words of the shared page.
const COUNTER: usize = 0;
/// 1 while a holder is between its first and last write.
const DIRTY: usize = 1;
const UNDO: usize = 2;
/// Per-holder completed increments start here (one word per child).
const DONE: usize = 16;

/// One increment as a small transaction: undo record, dirty flag, the two
/// writes, clean. A holder SIGKILLed in the middle leaves DIRTY set.
fn increment(shared: &Shared, me: usize) {
    shared
        .at(UNDO)
        .store(shared.at(COUNTER).load(Ordering::Relaxed), Ordering::Relaxed);
    shared
        .at(UNDO + 1)
        .store(shared.at(DONE + me).load(Ordering::Relaxed), Ordering::Relaxed);
    shared.at(UNDO + 2).store(me as u64, Ordering::Relaxed);
    shared.at(DIRTY).store(1, Ordering::Relaxed);
    let v = shared.at(COUNTER).load(Ordering::Relaxed);
    shared.at(COUNTER).store(v + 1, Ordering::Relaxed);
    std::hint::spin_loop();
    let d = shared.at(DONE + me).load(Ordering::Relaxed);
    shared.at(DONE + me).store(d + 1, Ordering::Relaxed);
    shared.at(DIRTY).store(0, Ordering::Relaxed);
}

/// The next holder's repair: roll a half-done transaction back.
fn repair(shared: &Shared) -> bool {
    if shared.at(DIRTY).load(Ordering::Relaxed) == 0 {
        return false;
    }
    let who = shared.at(UNDO + 2).load(Ordering::Relaxed) as usize;
    shared
        .at(COUNTER)
        .store(shared.at(UNDO).load(Ordering::Relaxed), Ordering::Relaxed);
    shared
        .at(DONE + who)
        .store(shared.at(UNDO + 1).load(Ordering::Relaxed), Ordering::Relaxed);
    shared.at(DIRTY).store(0, Ordering::Relaxed);
    true
}

#[test]
fn a_thousand_holders_killed_inside_the_section_leave_the_counter_exact() {
    let dog = Watchdog::new("owner-died", Duration::from_secs(240));
    let seg = segment();
    let shared = Shared::new();
    let locks = Locks::new(&seg, 0).unwrap();
    let mut rng = common::Rng::new(0x5eed);
    let (mut died_inside, mut told, mut repaired) = (0u32, 0u32, 0u32);
    for round in 0..1000usize {
        let me = round % 8;
        let seg2 = seg.clone();
        let sh = &shared;
        // The child increments in a loop, holding the lock for each; it is
        // SIGKILLed at a random moment, often inside a section.
        // SAFETY: the child takes only the segment's process-shared lock
        // and writes shared memory; it prints nothing and takes no lock
        // another thread of the test process may hold.
        let child = dog.track(
            unsafe {
                fork(move || {
                    let l = Locks::new(&seg2, 1).unwrap();
                    loop {
                        l.synchronize_key("counter", |s| {
                            if s.previous_owner_died() {
                                repair(sh);
                            }
                            sh.at(DONE + 9).store(1, Ordering::Relaxed); // "I am in"
                            increment(sh, me);
                        })
                        .unwrap();
                    }
                })
            }
            .unwrap(),
        );
        // Wait until it has been in at least once, then kill it soon after.
        while shared.at(DONE + 9).load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        shared.at(DONE + 9).store(0, Ordering::Relaxed);
        let spins = rng.next() % 2000;
        for _ in 0..spins {
            std::hint::spin_loop();
        }
        child.kill().unwrap();
        child
            .wait_timeout(Duration::from_secs(10))
            .unwrap()
            .expect("killed child reaped");
        // The parent takes the lock next: told if the child died inside.
        locks
            .synchronize_key("counter", |s| {
                if s.previous_owner_died() {
                    told += 1;
                    if repair(&shared) {
                        repaired += 1;
                    }
                }
                if shared.at(DIRTY).load(Ordering::Relaxed) != 0 {
                    died_inside += 1;
                }
                // Every increment counted once: the counter equals the sum of
                // the completed increments of every holder.
                let done: u64 = (0..8).map(|i| shared.at(DONE + i).load(Ordering::Relaxed)).sum();
                assert_eq!(shared.at(COUNTER).load(Ordering::Relaxed), done, "round {round}");
            })
            .unwrap();
    }
    assert_eq!(died_inside, 0, "a dirty section was left unrepaired");
    println!(
        "1000 holders SIGKILLed: {told} died inside the section (owner-died reported), {repaired} repairs"
    );
    assert!(
        told > 100,
        "too few kills landed inside a section to test recovery: {told}"
    );
    let stats = locks.stats().into_iter().find(|s| s.name == "counter").unwrap();
    assert_eq!(stats.owner_died, u64::from(told));
    // The lock still works normally.
    let total = locks
        .synchronize_key("counter", |_| shared.at(COUNTER).load(Ordering::Relaxed))
        .unwrap();
    assert!(total > 0);
}

#[test]
fn a_fencing_token_rejects_a_stale_holder() {
    let _dog = Watchdog::new("fencing", Duration::from_secs(30));
    let seg = segment();
    let locks = Locks::new(&seg, 0).unwrap();
    // A store that remembers the highest token it accepted.
    let highest = AtomicU64::new(0);
    let write = |token: u64| -> bool {
        let prev = highest.fetch_max(token, Ordering::AcqRel);
        token >= prev
    };
    let old = locks.synchronize_key("store", |s| s.fencing_token()).unwrap();
    let new = locks.synchronize_key("store", |s| s.fencing_token()).unwrap();
    assert!(write(new));
    assert!(!write(old), "a write under an older token is refused");
}

#[test]
fn a_lock_guard_holds_until_dropped() {
    let _dog = Watchdog::new("guard", Duration::from_secs(30));
    let seg = segment();
    let locks = Locks::new(&seg, 0).unwrap();
    let g = locks.lock("g", None).unwrap();
    assert!(!g.previous_owner_died());
    let t = g.fencing_token();
    // Another thread cannot take it while the guard lives.
    let other = Locks::new(&seg, 1).unwrap();
    let busy = std::thread::spawn(move || {
        matches!(
            other.lock("g", Some(Duration::from_millis(50))),
            Err(LockError::Timeout)
        )
    })
    .join()
    .unwrap();
    assert!(busy);
    assert!(matches!(locks.lock("g", None), Err(LockError::WouldDeadlock)));
    g.unlock();
    let g2 = locks.lock("g", Some(Duration::from_secs(1))).unwrap();
    assert!(g2.fencing_token() > t);
}
