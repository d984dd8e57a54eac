//! Lock benchmark: `Locks::synchronize_key` next to what it is built on and
//! what it could be replaced with, in the same run: a bare robust,
//! error-checking, process-shared pthread mutex (the library's own kind),
//! a default-type process-shared pthread mutex, `flock(2)` on a temporary
//! file, and `std::sync::Mutex` between threads.
//!
//! `cargo bench --bench locks` prints one markdown table on stdout (progress
//! goes to stderr). Run without `--bench` (as `cargo test --benches` does),
//! it only checks that each measure works, with a few iterations.
//! `SHMCLUSTER_BENCH_LOCKS` picks rows and columns while iterating: words
//! among `uncontended`, `2`, `4`, `8` (rows; all when none is given) and
//! `core` (only `synchronize_key`, `NamedLock` and the robust mutex).
//!
//! Targets (issue 14): `NamedLock` uncontended ≤ 1.1× the bare robust
//! mutex and `synchronize_key` ≤ 1.3×; contended by 2, 4 and 8 processes
//! both ≤ 1.2×.
//!
//! - Uncontended: one process takes and releases the lock around an empty
//!   section in a loop; nanoseconds per lock + unlock, the median of a few
//!   rounds (each round measures every mechanism in turn).
//! - Contended: 2, 4 and 8 forked processes (threads for
//!   `std::sync::Mutex`) each add 1 to a shared counter K times, one
//!   lock / read / write / unlock per addition. The clock runs from the
//!   moment all are released at once until the last one is done; the final
//!   count is checked to be exact (a plain read then write, so any overlap
//!   of two sections would lose an addition). Total additions per second,
//!   and wall nanoseconds per addition, the median of a few rounds.

use std::fs::File;
use std::hint::black_box;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use shmcluster::raw::{Config, Segment};
use shmcluster::testing::{fork, ExitStatus, Watchdog};
use shmcluster::Locks;

mod common;
use common::{print_preamble, warn_if_busy};

type Res<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// No single measure may take longer than this (the watchdog then kills it).
const LIMIT: Duration = Duration::from_secs(60);
/// Contending processes (threads for `std::sync::Mutex`).
const PROCS: [u32; 3] = [2, 4, 8];
/// The named lock every `synchronize_key` measure takes.
const NAME: &str = "bench";
/// A cache line as far as false sharing goes (adjacent-line prefetch).
const LINE: usize = 128;

// Offsets in a [`Page`]: each word on its own line.
/// The pthread mutex, when the measure uses one.
const MUTEX: usize = 0;
/// The counter the sections add to.
const COUNTER: usize = LINE;
/// Children that are ready to start.
const READY: usize = 2 * LINE;
/// Set to 1 by the parent to start every child at once.
const GO: usize = 3 * LINE;
/// Children that have finished their additions.
const DONE: usize = 4 * LINE;

/// How much work each measure does.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Lock + unlock pairs per uncontended run.
    uncontended: u64,
    /// The same for `flock`, two system calls per pair.
    uncontended_flock: u64,
    /// Additions per process (or thread) per contended run.
    contended: u64,
    /// The same for `flock`.
    contended_flock: u64,
    /// Runs of each measure; the median is reported.
    runs: usize,
}

impl Plan {
    /// `cargo bench`.
    const FULL: Plan = Plan {
        uncontended: 2_000_000,
        uncontended_flock: 300_000,
        contended: 1_000_000,
        contended_flock: 100_000,
        // Five, not three: with 2 processes on 2 vCPUs a run now and then
        // has one contender run alone (a mechanism's figure halves), and a
        // median of three was sometimes two such runs.
        runs: 5,
    };
    /// A smoke test (`cargo test --benches`).
    const QUICK: Plan = Plan {
        uncontended: 1_000,
        uncontended_flock: 1_000,
        contended: 200,
        contended_flock: 200,
        runs: 1,
    };
}

// ------------------------------------------------------------ shared page

/// One page of anonymous `MAP_SHARED` memory: children forked after it is
/// mapped see the same bytes. It starts zeroed.
struct Page {
    ptr: *mut u8,
}

/// Its size.
const PAGE: usize = 4096;

impl Page {
    /// Maps a fresh page.
    fn new() -> std::io::Result<Self> {
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { ptr: ptr.cast() })
    }

    /// The 8-byte word at `offset`.
    fn word(&self, offset: usize) -> &AtomicU64 {
        assert!(offset.is_multiple_of(8) && offset + 8 <= PAGE);
        // SAFETY: in bounds and aligned (the mapping is page-aligned); the
        // page starts zeroed, a valid AtomicU64, and stays mapped as long as
        // `self`; every process accesses it atomically only.
        unsafe { &*self.ptr.add(offset).cast::<AtomicU64>() }
    }

    /// Where the pthread mutex lives.
    fn mutex(&self) -> *mut libc::pthread_mutex_t {
        const _: () = assert!(std::mem::size_of::<libc::pthread_mutex_t>() <= COUNTER - MUTEX);
        // SAFETY: `MUTEX + size_of::<pthread_mutex_t>() <= COUNTER < PAGE`,
        // checked at compile time above.
        unsafe { self.ptr.add(MUTEX).cast() }
    }

    /// The counter, incremented non-atomically: a plain read, then a plain
    /// write. Two sections that overlap lose an increment.
    fn add_one(&self) {
        let counter = self.word(COUNTER);
        counter.store(counter.load(Relaxed) + 1, Relaxed);
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: our own mapping; nothing borrowed from it outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), PAGE) };
    }
}

// ------------------------------------------------------------- baselines

/// Which attributes a bare pthread mutex gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Robust, error-checking, process-shared: what `synchronize` uses.
    Robust,
    /// Default type, process-shared (not robust: a dead holder hangs it).
    Plain,
}

/// A bare pthread mutex in a [`Page`].
struct PthreadMutex<'a> {
    m: *mut libc::pthread_mutex_t,
    _page: &'a Page,
}

/// Turns a pthread return value into a `Result`.
fn check(what: &str, rc: libc::c_int) -> std::io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        let e = std::io::Error::from_raw_os_error(rc);
        Err(std::io::Error::new(e.kind(), format!("{what}: {e}")))
    }
}

impl<'a> PthreadMutex<'a> {
    /// Initialises the mutex of `page` (`pthread_mutex_init(3)`) with
    /// `PTHREAD_PROCESS_SHARED`, plus `PTHREAD_MUTEX_ROBUST` and
    /// `PTHREAD_MUTEX_ERRORCHECK` for [`Kind::Robust`].
    fn init(page: &'a Page, kind: Kind) -> std::io::Result<Self> {
        let m = page.mutex();
        let mut attr = std::mem::MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
        // SAFETY: `attr` is local storage that pthread_mutexattr_init
        // initialises before the setters use it; `m` is aligned storage for
        // a mutex in a page no process uses as a mutex yet (the children
        // are forked later); destroy releases the attribute.
        unsafe {
            check("mutexattr_init", libc::pthread_mutexattr_init(attr.as_mut_ptr()))?;
            let a = attr.as_mut_ptr();
            let set = check(
                "setpshared",
                libc::pthread_mutexattr_setpshared(a, libc::PTHREAD_PROCESS_SHARED),
            )
            .and_then(|()| match kind {
                Kind::Plain => Ok(()),
                Kind::Robust => {
                    check(
                        "setrobust",
                        libc::pthread_mutexattr_setrobust(a, libc::PTHREAD_MUTEX_ROBUST),
                    )?;
                    check(
                        "settype",
                        libc::pthread_mutexattr_settype(a, libc::PTHREAD_MUTEX_ERRORCHECK),
                    )
                }
            })
            .and_then(|()| check("mutex_init", libc::pthread_mutex_init(m, a)));
            libc::pthread_mutexattr_destroy(a);
            set?;
        }
        Ok(Self { m, _page: page })
    }

    /// `pthread_mutex_lock(3)`; any error (`EOWNERDEAD` included: no holder
    /// dies here) is a bug in the measure.
    #[inline]
    fn lock(&self) {
        // SAFETY: initialised by `init`, in a page that outlives `self`.
        let rc = unsafe { libc::pthread_mutex_lock(self.m) };
        assert_eq!(rc, 0, "pthread_mutex_lock");
    }

    /// `pthread_mutex_unlock(3)`.
    #[inline]
    fn unlock(&self) {
        // SAFETY: as for `lock`; this thread holds the mutex.
        let rc = unsafe { libc::pthread_mutex_unlock(self.m) };
        assert_eq!(rc, 0, "pthread_mutex_unlock");
    }
}

/// `flock(2)` on a file this process opened itself (a lock belongs to the
/// open file description, so forked processes must not share one).
struct FileLock {
    file: File,
}

impl FileLock {
    /// Opens `path` (which must exist).
    fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            file: File::open(path)?,
        })
    }

    /// `flock(fd, op)`, retried on `EINTR`.
    #[inline]
    fn flock(&self, op: libc::c_int) {
        loop {
            // SAFETY: the descriptor is owned by `self.file`, open for the call.
            if unsafe { libc::flock(self.file.as_raw_fd(), op) } == 0 {
                return;
            }
            let e = std::io::Error::last_os_error();
            assert_eq!(e.kind(), std::io::ErrorKind::Interrupted, "flock: {e}");
        }
    }

    /// `LOCK_EX`.
    #[inline]
    fn lock(&self) {
        self.flock(libc::LOCK_EX);
    }

    /// `LOCK_UN`.
    #[inline]
    fn unlock(&self) {
        self.flock(libc::LOCK_UN);
    }
}

// ------------------------------------------------------------- measuring

/// The lock mechanisms, in table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mechanism {
    /// `Locks::synchronize_key` (looks the name up on every call).
    Synchronize,
    /// `NamedLock::synchronize` (the name resolved once).
    Named,
    /// A bare robust error-checking process-shared pthread mutex.
    Robust,
    /// A bare default-type process-shared pthread mutex.
    Plain,
    /// `flock(2)`.
    Flock,
    /// `std::sync::Mutex` (threads of one process).
    Std,
}

const MECHANISMS: [Mechanism; 6] = [
    Mechanism::Synchronize,
    Mechanism::Named,
    Mechanism::Robust,
    Mechanism::Plain,
    Mechanism::Flock,
    Mechanism::Std,
];

impl Mechanism {
    /// The table's column heading.
    fn heading(self) -> &'static str {
        match self {
            Self::Synchronize => "`synchronize_key`",
            Self::Named => "`NamedLock::synchronize`",
            Self::Robust => "pthread mutex, robust + error-checking",
            Self::Plain => "pthread mutex, default type",
            Self::Flock => "`flock` on a file",
            Self::Std => "`std::sync::Mutex` (threads)",
        }
    }

    /// The attributes of a bare pthread mutex measure.
    fn pthread_kind(self) -> Kind {
        if self == Self::Robust {
            Kind::Robust
        } else {
            Kind::Plain
        }
    }
}

/// What `SHMCLUSTER_BENCH_LOCKS` selects.
#[derive(Debug, Clone)]
struct Selection {
    /// The uncontended row.
    uncontended: bool,
    /// The contended rows, by number of processes.
    procs: Vec<u32>,
    /// Only the mechanisms the targets compare.
    core: bool,
}

impl Selection {
    /// From the environment: everything unless rows are named.
    fn from_env() -> Self {
        let var = std::env::var("SHMCLUSTER_BENCH_LOCKS").unwrap_or_default();
        let words: Vec<&str> = var.split([' ', ',']).filter(|w| !w.is_empty()).collect();
        let procs: Vec<u32> = PROCS
            .into_iter()
            .filter(|p| words.contains(&p.to_string().as_str()))
            .collect();
        let uncontended = words.contains(&"uncontended");
        let all_rows = !uncontended && procs.is_empty();
        Self {
            uncontended: uncontended || all_rows,
            procs: if all_rows { PROCS.to_vec() } else { procs },
            core: words.contains(&"core"),
        }
    }

    /// Whether to measure `mech`.
    fn measures(&self, mech: Mechanism) -> bool {
        !self.core
            || matches!(
                mech,
                Mechanism::Synchronize | Mechanism::Named | Mechanism::Robust
            )
    }
}

/// One row: `runs` rounds, each measuring every selected mechanism once
/// with `measure` (so a drift, or a round where the scheduler lets one
/// contender run alone, falls on all of them alike, not on one), then
/// each mechanism's median (NaN when not selected).
fn row(runs: usize, pick: &Selection, mut measure: impl FnMut(Mechanism) -> Res<f64>) -> Res<Vec<f64>> {
    let mut all = vec![Vec::new(); MECHANISMS.len()];
    for _ in 0..runs.max(1) {
        for (figures, &mech) in all.iter_mut().zip(&MECHANISMS) {
            if pick.measures(mech) {
                figures.push(measure(mech)?);
            }
        }
    }
    Ok(all
        .into_iter()
        .map(|mut v| {
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
        })
        .collect())
}

/// The median of `runs` results of `f`.
fn median(runs: usize, mut f: impl FnMut() -> Res<f64>) -> Res<f64> {
    let mut v = (0..runs.max(1)).map(|_| f()).collect::<Res<Vec<f64>>>()?;
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

/// Nanoseconds per call of `op`, over `n` calls after `n / 10` unmeasured.
fn ns_per_op(n: u64, mut op: impl FnMut()) -> f64 {
    repeat(n / 10, &mut op);
    let start = Instant::now();
    repeat(n, &mut op);
    start.elapsed().as_nanos() as f64 / n as f64
}

/// Calls `op` `n` times: the warm-up and the timed loop are this one loop,
/// so every mechanism's `op` has one call site and is inlined or not on
/// its own merits (with two loops, a larger `op` was called out of line
/// and measured with a call, its prologue and epilogue per iteration).
#[inline(never)]
fn repeat(n: u64, op: &mut impl FnMut()) {
    for _ in 0..n {
        op();
    }
}

/// What the uncontended and contended measures share: the segment, the
/// temporary file for `flock`, the plan.
struct Bench {
    segment: Segment,
    file: PathBuf,
    plan: Plan,
}

impl Bench {
    /// Uncontended ns per lock + unlock of an empty section, one run.
    fn uncontended(&self, mech: Mechanism) -> Res<f64> {
        eprintln!("measuring uncontended {mech:?}");
        let n = if mech == Mechanism::Flock {
            self.plan.uncontended_flock
        } else {
            self.plan.uncontended
        };
        let page = Page::new()?;
        median(1, || {
            Ok(match mech {
                Mechanism::Synchronize => {
                    let locks = Locks::new(&self.segment, 0)?;
                    ns_per_op(n, || {
                        locks
                            .synchronize_key(NAME, |s| {
                                black_box(s);
                            })
                            .expect("synchronize_key");
                    })
                }
                Mechanism::Named => {
                    let lock = Locks::new(&self.segment, 0)?.named(NAME)?;
                    ns_per_op(n, || {
                        lock.synchronize(|s| {
                            black_box(s);
                        })
                        .expect("NamedLock::synchronize");
                    })
                }
                Mechanism::Robust | Mechanism::Plain => {
                    let kind = mech.pthread_kind();
                    let m = PthreadMutex::init(&page, kind)?;
                    ns_per_op(n, || {
                        m.lock();
                        m.unlock();
                    })
                }
                Mechanism::Flock => {
                    let f = FileLock::open(&self.file)?;
                    ns_per_op(n, || {
                        f.lock();
                        f.unlock();
                    })
                }
                Mechanism::Std => {
                    let m = Mutex::new(());
                    ns_per_op(n, || drop(black_box(&m).lock()))
                }
            })
        })
    }

    /// `synchronize_key` over 8 names made at run time, taken in turn:
    /// what a program that locks per key (a user id, a file) pays, where
    /// the table's single literal name is the best case of the name cache.
    fn uncontended_many_names(&self) -> Res<f64> {
        eprintln!("measuring uncontended synchronize_key over 8 run-time names");
        let names: Vec<String> = (0..8).map(|i| format!("key-{}", 1000 + i * 37)).collect();
        let locks = Locks::new(&self.segment, 0)?;
        let mut turn = 0;
        median(self.plan.runs, || {
            Ok(ns_per_op(self.plan.uncontended, || {
                turn = (turn + 1) % names.len();
                locks
                    .synchronize_key(black_box(&names[turn]), |s| {
                        black_box(s);
                    })
                    .expect("synchronize_key");
            }))
        })
    }

    /// Contended: wall ns per addition with `procs` processes (threads for
    /// `Std`) adding K each, one run.
    fn contended(&self, mech: Mechanism, procs: u32) -> Res<f64> {
        eprintln!("measuring {mech:?}, {procs} contending");
        let k = if mech == Mechanism::Flock {
            self.plan.contended_flock
        } else {
            self.plan.contended
        };
        median(1, || {
            let took = match mech {
                Mechanism::Synchronize => race(procs, k, None, |page, i| {
                    let locks = Locks::new(&self.segment, i)?;
                    for _ in 0..k {
                        locks.synchronize_key(NAME, |_| page.add_one())?;
                    }
                    Ok(())
                })?,
                Mechanism::Named => race(procs, k, None, |page, i| {
                    let lock = Locks::new(&self.segment, i)?.named(NAME)?;
                    for _ in 0..k {
                        lock.synchronize(|_| page.add_one())?;
                    }
                    Ok(())
                })?,
                Mechanism::Robust | Mechanism::Plain => {
                    let kind = mech.pthread_kind();
                    race(procs, k, Some(kind), |page, _| {
                        // The parent initialised the page's mutex before forking.
                        let m = PthreadMutex {
                            m: page.mutex(),
                            _page: page,
                        };
                        for _ in 0..k {
                            m.lock();
                            page.add_one();
                            m.unlock();
                        }
                        Ok(())
                    })?
                }
                Mechanism::Flock => race(procs, k, None, |page, _| {
                    let f = FileLock::open(&self.file)?;
                    for _ in 0..k {
                        f.lock();
                        page.add_one();
                        f.unlock();
                    }
                    Ok(())
                })?,
                Mechanism::Std => threads(procs, k)?,
            };
            Ok(took.as_nanos() as f64 / (u64::from(procs) * k) as f64)
        })
    }
}

/// Forks `procs` children on a fresh [`Page`] (its mutex initialised as
/// `mutex` says), starts them at once, and times them until the last has
/// run `body(page, child)`; checks every child succeeded and the counter
/// is exactly `procs × k`.
fn race(procs: u32, k: u64, mutex: Option<Kind>, body: impl Fn(&Page, u32) -> Res) -> Res<Duration> {
    let page = Page::new()?;
    let _mutex = mutex.map(|kind| PthreadMutex::init(&page, kind)).transpose()?;
    let dog = Watchdog::new("locks bench", LIMIT);
    let page = &page;
    let body = &body;
    let children = (0..procs)
        .map(|i| {
            // SAFETY: the only other thread is the watchdog's, which prints
            // only when it fires (and then kills this child): nothing else
            // can hold the stderr lock the child may take to report an
            // error. The bodies take only locks in the shared page or the
            // segment.
            Ok(dog.track(unsafe {
                fork(move || {
                    page.word(READY).fetch_add(1, AcqRel);
                    while page.word(GO).load(Acquire) == 0 {
                        std::thread::yield_now();
                    }
                    let r = body(page, i);
                    page.word(DONE).fetch_add(1, AcqRel);
                    match r {
                        Ok(()) => 0,
                        Err(e) => {
                            eprintln!("locks bench child {i}: {e}");
                            1
                        }
                    }
                })
            }?))
        })
        .collect::<Res<Vec<_>>>()?;
    while page.word(READY).load(Acquire) < u64::from(procs) {
        std::thread::sleep(Duration::from_micros(100));
    }
    let start = Instant::now();
    page.word(GO).store(1, Release);
    // Sleeping, not spinning: on a small machine a spinning parent would
    // take a CPU from the contenders. 100 µs of slack on runs of ≥ 100 ms.
    while page.word(DONE).load(Acquire) < u64::from(procs) {
        if start.elapsed() > LIMIT {
            return Err("a contender did not finish".into());
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    let took = start.elapsed();
    for (i, child) in children.into_iter().enumerate() {
        let status = child.wait_timeout(Duration::from_secs(10))?;
        if status != Some(ExitStatus::Code(0)) {
            return Err(format!("child {i} ended {status:?}").into());
        }
    }
    let count = page.word(COUNTER).load(Acquire);
    let want = u64::from(procs) * k;
    if count != want {
        return Err(format!("counter {count}, expected {want}: sections overlapped").into());
    }
    Ok(took)
}

/// `std::sync::Mutex<u64>` between `threads` threads adding `k` each,
/// started at once; the count is checked.
fn threads(threads: u32, k: u64) -> Res<Duration> {
    let counter = Mutex::new(0u64);
    let start_line = Barrier::new(threads as usize + 1);
    let start = std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                start_line.wait();
                for _ in 0..k {
                    *counter.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                }
            });
        }
        start_line.wait();
        Instant::now()
    });
    let took = start.elapsed();
    let count = counter.into_inner().unwrap_or_else(|e| e.into_inner());
    let want = u64::from(threads) * k;
    if count != want {
        return Err(format!("counter {count}, expected {want}").into());
    }
    Ok(took)
}

// ---------------------------------------------------------------- report

/// ✓ or ✗.
fn mark(ok: bool) -> &'static str {
    if ok {
        "✓"
    } else {
        "✗"
    }
}

/// Nanoseconds, to three significant digits or so.
fn ns(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.1} ns")
    } else if v < 10_000.0 {
        format!("{v:.0} ns")
    } else {
        format!("{:.1} µs", v / 1e3)
    }
}

/// Operations per second from ns per operation.
fn rate(ns_per_op: f64) -> String {
    let v = 1e9 / ns_per_op;
    if v >= 1e6 {
        format!("{:.2} M/s", v / 1e6)
    } else {
        format!("{:.0} k/s", v / 1e3)
    }
}

/// One table row: the measure and one figure per mechanism.
struct Row {
    /// What was measured.
    measure: String,
    /// Ns per operation, in [`MECHANISMS`] order.
    ns: Vec<f64>,
    /// Whether to show the rate too (contended rows).
    with_rate: bool,
    /// The targets on `synchronize_key` ÷ robust and `NamedLock` ÷ robust.
    targets: (f64, f64),
}

/// Prints the markdown table, with the machine, the command and the plan.
fn print_table(full: bool, plan: Plan, rows: &[Row], many_names: Option<f64>) {
    print_preamble("locks", full);
    println!(
        "Uncontended: lock + unlock of an empty section, {} times ({} for `flock`), median of {} rounds \
         (each round measures every mechanism once). \
         Contended: every process (thread, for `std::sync::Mutex`) does {} lock / add 1 / unlock on one \
         shared counter ({} for `flock`), all started at once; total wall time ÷ total additions, and \
         additions per second, median of {} rounds; the final count checked exact.",
        plan.uncontended, plan.uncontended_flock, plan.runs, plan.contended, plan.contended_flock, plan.runs
    );
    println!();
    let headings: Vec<&str> = MECHANISMS.iter().map(|m| m.heading()).collect();
    println!(
        "| measure | {} | `synchronize_key` ÷ robust | `NamedLock` ÷ robust | targets (key, named) |",
        headings.join(" | ")
    );
    println!("|---|{}---|---|---|", "---|".repeat(MECHANISMS.len()));
    for row in rows {
        let cells: Vec<String> = row
            .ns
            .iter()
            .map(|&v| {
                if v.is_nan() {
                    "–".to_owned()
                } else if row.with_rate {
                    format!("{} ({})", ns(v), rate(v))
                } else {
                    ns(v)
                }
            })
            .collect();
        let keyed = row.ns[0] / row.ns[2];
        let named = row.ns[1] / row.ns[2];
        let (keyed_target, named_target) = row.targets;
        println!(
            "| {} | {} | {keyed:.2}× {} | {named:.2}× {} | ≤ {keyed_target:.1}×, ≤ {named_target:.1}× |",
            row.measure,
            cells.join(" | "),
            mark(keyed <= keyed_target),
            mark(named <= named_target),
        );
    }
    if let (Some(v), Some(row)) = (many_names, rows.first().filter(|r| !r.with_rate)) {
        println!();
        println!(
            "`synchronize_key` over 8 names made at run time, taken in turn (no target; the table's \
             single literal name is the name cache's best case): {} per lock + unlock, {:.2}× the \
             robust mutex above.",
            ns(v),
            v / row.ns[2]
        );
    }
    println!();
    println!(
        "With more contenders than CPUs (here {}), a holder can be preempted inside its section and \
         everyone waits for the scheduler: the contended figures are those of this machine's scheduler \
         as much as of the locks.",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}

/// Runs every measure and prints the table.
fn run(full: bool) -> Res {
    let plan = if full { Plan::FULL } else { Plan::QUICK };
    let file = std::env::temp_dir().join(format!("shmcluster-locks-bench-{}", std::process::id()));
    File::create(&file)?;
    let bench = Bench {
        segment: Segment::create(&Config::new(PROCS[PROCS.len() - 1]))?,
        file,
        plan,
    };
    let pick = Selection::from_env();
    let result = (|| {
        let mut rows = Vec::new();
        if pick.uncontended {
            rows.push(Row {
                measure: "uncontended, one process: ns per lock + unlock".into(),
                ns: row(plan.runs, &pick, |m| bench.uncontended(m))?,
                with_rate: false,
                targets: (1.3, 1.1),
            });
        }
        for &procs in &pick.procs {
            rows.push(Row {
                measure: format!("{procs} processes contending: ns per addition (additions/s)"),
                ns: row(plan.runs, &pick, |m| bench.contended(m, procs))?,
                with_rate: true,
                targets: (1.2, 1.2),
            });
        }
        let many_names = if pick.uncontended {
            Some(bench.uncontended_many_names()?)
        } else {
            None
        };
        Ok::<_, Box<dyn std::error::Error>>((rows, many_names))
    })();
    let _ = std::fs::remove_file(&bench.file);
    let (rows, many_names) = result?;
    print_table(full, plan, &rows, many_names);
    Ok(())
}

fn main() {
    warn_if_busy();
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    let full = std::env::args().any(|a| a == "--bench");
    if let Err(e) = run(full) {
        eprintln!("locks bench: {e}");
        std::process::exit(1);
    }
}
