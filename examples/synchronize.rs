//! A critical section across worker processes that survives a worker being
//! killed inside it.
//!
//! ```sh
//! cargo run --release --example synchronize                  # 4 workers
//! cargo run --release --example synchronize -- --workers 8
//! ```
//!
//! Every worker adds 1 to a counter kept in a file, [`ITERATIONS`] times,
//! each addition inside `worker.synchronize_key("counter", ..)`. Instance 1
//! SIGKILLs itself once, in the middle of its 10th addition: the counter is
//! written but its own tally is not. The kernel releases the lock it held
//! (robust mutex), the next holder is told that the previous owner died and
//! rolls the half-done addition back from the undo record, and the master
//! starts a new instance 1, which carries on from its tally. Instance 0
//! waits until the counter reaches workers × [`ITERATIONS`], checks it is
//! exact, prints it with the lock's fencing token and asks the master to
//! shut the cluster down; every worker serves until told to stop. Every
//! line is printed by the process it is about, prefixed with its slot.

use std::cell::Cell;
use std::error::Error;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::sys::signal::{raise, Signal};
use shmcluster::{Cluster, EventKind, ExitReason, Section, Worker};

/// Additions per worker instance.
const ITERATIONS: u64 = 1000;
/// The lock every section takes.
const LOCK: &str = "counter";
/// The instance that kills itself inside the section, and on which of its
/// additions (0-based: its 10th).
const VICTIM: (u32, u64) = (1, 9);
/// How long instance 0 waits for the others.
const PATIENCE: Duration = Duration::from_secs(20);

/// A worker's result: `Cluster::run` prints the error and exits 1.
type Res<T> = Result<T, Box<dyn Error>>;

// The store's words: little-endian `u64`s at `8 × word`.
/// The counter.
const COUNTER: u64 = 0;
/// 1 while an addition is between its first and its last write.
const DIRTY: u64 = 1;
/// Undo record: the counter before the addition in progress.
const UNDO_COUNTER: u64 = 2;
/// Undo record: the adding instance's tally before it.
const UNDO_TALLY: u64 = 3;
/// Undo record: which instance is adding.
const UNDO_WHO: u64 = 4;
/// 1 once the planned kill has happened (not part of any addition: a
/// respawned instance 1 must not kill itself again).
const KILLED: u64 = 5;
/// Instance `i`'s completed additions are word `TALLY + i`.
const TALLY: u64 = 6;

/// The state the lock protects: a small file of `u64` words, read and
/// written one word per `pread`/`pwrite`. A process killed between two
/// writes leaves the file half-updated (the page cache keeps what was
/// written); the undo record makes every addition all-or-nothing.
struct Store {
    file: File,
}

impl Store {
    /// Creates the file, zeroed, with room for `workers` tallies.
    fn create(path: &Path, workers: u32) -> io::Result<()> {
        let file = File::create(path)?;
        file.set_len(8 * (TALLY + u64::from(workers)))
    }

    /// Opens the file (each worker process opens its own).
    fn open(path: &Path) -> io::Result<Self> {
        let file = File::options().read(true).write(true).open(path)?;
        Ok(Self { file })
    }

    /// Word `word`.
    fn get(&self, word: u64) -> io::Result<u64> {
        let mut b = [0; 8];
        self.file.read_exact_at(&mut b, 8 * word)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Sets word `word`.
    fn set(&self, word: u64, value: u64) -> io::Result<()> {
        self.file.write_all_at(&value.to_le_bytes(), 8 * word)
    }

    /// One addition by instance `me`, as a small transaction: undo record,
    /// dirty flag, the two writes, clean. `crash` kills this process
    /// between the two writes.
    fn add(&self, me: u32, crash: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let tally_word = TALLY + u64::from(me);
        let (counter, tally) = (self.get(COUNTER)?, self.get(tally_word)?);
        self.set(UNDO_COUNTER, counter)?;
        self.set(UNDO_TALLY, tally)?;
        self.set(UNDO_WHO, u64::from(me))?;
        self.set(DIRTY, 1)?;
        self.set(COUNTER, counter + 1)?;
        crash()?;
        self.set(tally_word, tally + 1)?;
        self.set(DIRTY, 0)
    }

    /// After a holder died inside its section: rolls a half-done addition
    /// back. Returns the instance whose addition was undone, if any (the
    /// holder may have died before its first write or after its last).
    fn repair(&self) -> io::Result<Option<u64>> {
        if self.get(DIRTY)? == 0 {
            return Ok(None);
        }
        let who = self.get(UNDO_WHO)?;
        self.set(COUNTER, self.get(UNDO_COUNTER)?)?;
        self.set(TALLY + who, self.get(UNDO_TALLY)?)?;
        self.set(DIRTY, 0)?;
        Ok(Some(who))
    }
}

/// Prints one line, prefixed with the slot of the process printing it.
fn say(slot: u32, text: impl std::fmt::Display) {
    // One `write` per line: lines from several processes do not mix.
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "[slot {slot}] {text}");
    let _ = out.flush();
}

/// Runs `f` inside the `counter` lock, repairing first if the previous
/// holder died inside its section.
fn section<R>(worker: &Worker, store: &Store, f: impl FnOnce(&Section) -> io::Result<R>) -> Res<R> {
    let slot = worker.slot();
    let r = worker.synchronize_key(LOCK, |s| {
        if s.previous_owner_died() {
            say(
                slot,
                format!(
                    "took {LOCK:?} (token {}): the previous holder died inside its section",
                    s.fencing_token()
                ),
            );
            match store.repair()? {
                Some(who) => say(
                    slot,
                    format!("repaired: rolled back instance {who}'s half-done addition"),
                ),
                None => say(slot, "nothing to repair: it died outside its writes"),
            }
        }
        f(s)
    })??;
    Ok(r)
}

/// Every worker: its additions, then (instance 0) the check, then serve
/// until told to stop.
fn worker(worker: Worker, path: &Path, total: u64) -> Res<()> {
    let (slot, me) = (worker.slot(), worker.index());
    let store = Store::open(path)?;
    worker.ready();
    let start = section(&worker, &store, |_| store.get(TALLY + u64::from(me)))?;
    say(
        slot,
        format!(
            "instance {me}, generation {}, pid {}: starting at {start} of {ITERATIONS} additions",
            worker.generation(),
            std::process::id()
        ),
    );
    while section(&worker, &store, |_| {
        let tally = store.get(TALLY + u64::from(me))?;
        if tally >= ITERATIONS {
            return Ok(false);
        }
        store.add(me, || {
            if (me, tally) == VICTIM && store.get(KILLED)? == 0 {
                store.set(KILLED, 1)?;
                say(
                    slot,
                    format!(
                        "addition {}: SIGKILL to myself inside the section, counter written, tally not",
                        tally + 1
                    ),
                );
                raise(Signal::SIGKILL)?;
            }
            Ok(())
        })?;
        Ok(true)
    })? {}
    say(slot, format!("instance {me}: my {ITERATIONS} additions are done"));
    if me == 0 {
        check(&worker, &store, total)?;
        worker.request_shutdown();
    }
    while !worker.wait_stop(Duration::from_secs(1)) {}
    Ok(())
}

/// Instance 0: waits until every addition is in, checks the counter
/// against the tallies, prints it with the fencing token and the lock's
/// statistics.
fn check(worker: &Worker, store: &Store, total: u64) -> Res<()> {
    let slot = worker.slot();
    let deadline = Instant::now() + PATIENCE;
    let (count, tallies, token) = loop {
        let (count, tallies, token) = section(worker, store, |s| {
            let tallies = (0..worker.instances())
                .map(|i| store.get(TALLY + u64::from(i)))
                .sum::<io::Result<u64>>()?;
            Ok((store.get(COUNTER)?, tallies, s.fencing_token()))
        })?;
        if tallies == total {
            break (count, tallies, token);
        }
        if Instant::now() >= deadline {
            return Err(format!("{tallies} of {total} additions after {PATIENCE:?}").into());
        }
        worker.heartbeat();
        std::thread::sleep(Duration::from_millis(5));
    };
    if count != total || count != tallies {
        return Err(format!("counter {count}, tallies {tallies}, expected {total}").into());
    }
    say(
        slot,
        format!(
            "final count {count} = {} workers × {ITERATIONS}: exact",
            worker.instances()
        ),
    );
    say(slot, format!("fencing token of this last section: {token}"));
    if let Some(s) = worker.locks()?.stats().into_iter().find(|s| s.name == LOCK) {
        say(
            slot,
            format!(
                "lock {LOCK:?}: {} acquisitions, {} had to wait, {} found the previous owner dead",
                s.acquisitions, s.waits, s.owner_died
            ),
        );
    }
    say(slot, "asking the master to shut the cluster down");
    Ok(())
}

/// `--workers N` (N ≥ 2, default 4).
fn parse_workers() -> u32 {
    let mut workers = 4;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next().map(|v| v.parse::<u32>())) {
            ("--workers" | "-w", Some(Ok(n))) if n >= 2 => workers = n,
            _ => {
                eprintln!("usage: synchronize [--workers N]   (N ≥ 2, default 4)");
                std::process::exit(2);
            }
        }
    }
    workers
}

fn main() {
    let workers = parse_workers();
    let path: PathBuf = std::env::temp_dir().join(format!("shmcluster-synchronize-{}", std::process::id()));
    if let Err(e) = Store::create(&path, workers) {
        eprintln!("[master] {}: {e}", path.display());
        std::process::exit(1);
    }
    let total = u64::from(workers) * ITERATIONS;
    println!(
        "[master] {workers} workers × {ITERATIONS} additions to the counter in {}",
        path.display()
    );
    // The one SIGKILL of instance 1 is planned: the master respawns it. Any
    // other exit before the shutdown is a failure.
    let failed = Rc::new(Cell::new(false));
    let failure = failed.clone();
    let planned_kill = Cell::new(false);
    let report = Cluster::builder()
        .workers(workers)
        .on_event(move |cluster, event| match event.kind {
            EventKind::Exit(ExitReason::Signaled(s))
                if s == Signal::SIGKILL as i32 && event.index == VICTIM.0 && !planned_kill.get() =>
            {
                planned_kill.set(true);
                println!(
                    "[master] instance {} (slot {}, pid {}) was killed by SIGKILL; starting a new one",
                    event.index, event.slot, event.pid
                );
            }
            EventKind::Exit(ExitReason::Shutdown) => {}
            EventKind::Exit(reason) => {
                eprintln!("[master] instance {} (slot {}) {reason}", event.index, event.slot);
                failure.set(true);
                cluster.shutdown();
            }
            _ => {}
        })
        .run(|w| worker(w, &path, total));
    let _ = std::fs::remove_file(&path);
    match report {
        Ok(report) if report.clean && !failed.get() => {
            println!(
                "[master] cluster stopped cleanly ({} worker restarted)",
                report.restarts
            );
        }
        Ok(report) => {
            eprintln!("[master] cluster failed: {report:?}");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("[master] {e}");
            std::process::exit(1);
        }
    }
}
