//! Messenger benchmark: what the typed messenger costs on top of the lanes,
//! in a real fork-mode cluster of 2, 4 and 8 workers, next to a bare lane
//! round trip and a unix socketpair round trip measured in the same run.
//!
//! `cargo bench --bench messenger` prints markdown tables on stdout
//! (progress goes to stderr). Run without `--bench` (as `cargo test
//! --benches` does), it only checks that each measure works, with a few
//! iterations.
//!
//! A master refuses to run in a process with more than one thread, so each
//! cluster runs in a fresh copy of this binary, re-executed with
//! [`MODE_VAR`] set. In it, every worker registers the same handlers,
//! declares itself ready and serves with [`Messenger::run`], except the
//! *driver* (instance 0): it waits until all workers are ready, measures,
//! prints one line per sample on stdout and exits 0, upon which the
//! master's callback shuts the cluster down.
//!
//! What the driver measures:
//! 1. `request` round trip to instance 1 (a `u64`, echoed back).
//! 2. `broadcast` to all: the rate of a stream of broadcasts (ended by a
//!    `map` that also checks every worker counted every one); and the
//!    fan-out time, from just before `broadcast` to the moment the *last*
//!    worker's handler ran (each handler reads the monotonic clock, shared
//!    by all processes, and sends it back through a [`shmcluster::MessengerHandle`]),
//!    as well as the time until the driver holds every worker's ack.
//! 3. `map` gather over all workers (the driver included).
//! 4. `consume` throughput: sequential calls, each waiting until the chosen
//!    worker's handler has finished (the driver itself may be chosen, and
//!    a free caller keeps its own tasks); then the same with a task the
//!    driver has no handler for, so that every task crosses a lane.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::error::Error;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shmcluster::raw::{Config, Segment};
use shmcluster::testing::{self, Watchdog};
use shmcluster::{Cluster, Event, ExitReason, Messenger, Worker, WorkerState};

mod common;
use common::cluster::{in_fresh_copy, run_cluster};
use common::{print_preamble, warn_if_busy};

/// Set in a re-executed copy of this binary: `cluster <workers> <plan>`.
const MODE_VAR: &str = "SHMCLUSTER_BENCH_MESSENGER";
/// Longest one cluster (or one baseline) may take.
const LIMIT: Duration = Duration::from_secs(60);
/// Deadline of each blocking messenger call.
const CALL_LIMIT: Duration = Duration::from_secs(5);
/// Worker counts, one fresh cluster each.
const WORKERS: [u32; 3] = [2, 4, 8];
/// Payload of the baseline round trips (the messenger's request, with its
/// event name and header, is about 20 bytes).
const SMALL: usize = 64;

/// Every fallible step here: a message for stderr is all a failure needs.
type Res<T> = Result<T, Box<dyn Error>>;

/// How many iterations of each measure.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Unmeasured iterations before each latency measure.
    warmup: usize,
    /// `request` round trips.
    rtt: usize,
    /// Broadcasts per stream.
    stream: usize,
    /// Streams (the median is reported).
    streams: usize,
    /// Broadcast fan-outs.
    fanout: usize,
    /// `map` calls.
    map: usize,
    /// `consume` calls.
    consume: usize,
    /// Round trips of each baseline.
    baseline: usize,
}

impl Plan {
    /// `cargo bench`.
    const FULL: Self = Self {
        warmup: 1_000,
        rtt: 20_000,
        stream: 20_000,
        streams: 5,
        fanout: 5_000,
        map: 5_000,
        consume: 20_000,
        baseline: 50_000,
    };

    /// A smoke test (`cargo test --benches`).
    const QUICK: Self = Self {
        warmup: 10,
        rtt: 50,
        stream: 200,
        streams: 1,
        fanout: 20,
        map: 20,
        consume: 50,
        baseline: 200,
    };

    /// The plan's name in [`MODE_VAR`].
    fn name(full: bool) -> &'static str {
        if full {
            "full"
        } else {
            "quick"
        }
    }

    /// The plan named `name`.
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "full" => Some(Self::FULL),
            "quick" => Some(Self::QUICK),
            _ => None,
        }
    }
}

/// An error from a failed check.
fn fail<T>(what: String) -> Res<T> {
    Err(what.into())
}

/// Locks `m`, whether or not a handler panicked while holding it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A deadline for one blocking call.
fn deadline() -> Instant {
    Instant::now() + CALL_LIMIT
}

// ------------------------------------------------------------ the cluster (re-executed copy)

/// Registers the handlers every worker has; declares the worker ready;
/// then serves (every worker but instance 0) or drives the measures.
fn worker_main(worker: Worker, workers: u32, plan: Plan, clock: Instant) -> Res<()> {
    let driver = worker.index() == 0;
    let mut m = Messenger::new(worker);
    m.on_request::<u64, u64, Infallible, _>("echo", |_, v| Ok(v))?;
    // The broadcast stream: count, and hand the count over (and reset it)
    // when asked; lanes are FIFO per sender, so the ask comes after the
    // stream.
    // (Handlers must be `Send`: hence an atomic, though one thread uses it.)
    let count = Arc::new(AtomicU64::new(0));
    let counted = count.clone();
    m.on::<u64, _>("bcast", move |_, _| {
        counted.fetch_add(1, Relaxed);
    })?;
    m.on_request::<(), u64, Infallible, _>("bcast_count", move |_, ()| Ok(count.swap(0, Relaxed)))?;
    // The fan-out: answer with the time this handler ran.
    let handle = m.handle();
    m.on::<u64, _>("ping", move |ctx, seq| {
        let at = clock.elapsed().as_nanos() as u64;
        let _ = handle.emit(ctx.sender().slot, "ack", &(seq, at));
    })?;
    m.on::<u64, _>("task", |_, _| {})?;
    // The same task with no handler in the driver: every task crosses a
    // lane to another process (with "task", a free caller keeps its own).
    if !driver {
        m.on::<u64, _>("task_away", |_, _| {})?;
    }
    m.worker().ready();
    if !driver {
        m.run()?;
        return Ok(());
    }
    let lines = drive(&mut m, workers, plan, clock)?;
    let mut out = std::io::stdout().lock();
    for line in lines {
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(())
}

/// Dispatches until `workers` workers are ready; returns the slot of
/// instance 1.
fn await_ready(m: &mut Messenger, workers: u32) -> Res<u32> {
    let until = deadline();
    loop {
        let peers = m.worker().peers();
        let ready = peers.iter().filter(|p| p.state == WorkerState::Ready).count();
        if ready == workers as usize {
            return match peers.iter().find(|p| p.index == Some(1)) {
                Some(p) => Ok(p.slot),
                None => fail("no instance 1".into()),
            };
        }
        if Instant::now() >= until {
            return fail(format!("{ready} of {workers} workers ready after {CALL_LIMIT:?}"));
        }
        m.poll(Duration::from_millis(1))?;
    }
}

/// The driver: runs every measure and returns its `sample`, `rate` and
/// `ran` lines.
fn drive(m: &mut Messenger, workers: u32, plan: Plan, clock: Instant) -> Res<Vec<String>> {
    let peer = await_ready(m, workers)?;
    let n = workers as usize;
    let mut out = Vec::new();

    // (1) request round trip to another worker. The samples are kept as
    // numbers and formatted after the loop, as the baselines' are: a
    // `format!` per round trip cost the messenger's figure ~50-100 ns.
    let mut rtt = Vec::with_capacity(plan.rtt);
    for i in 0..(plan.warmup + plan.rtt) as u64 {
        let start = Instant::now();
        let back: u64 = m.request(peer, "echo", &i, deadline())?;
        let took = start.elapsed();
        if back != i {
            return fail(format!("echo {i} came back as {back}"));
        }
        if i >= plan.warmup as u64 {
            rtt.push(took.as_nanos());
        }
    }
    out.extend(rtt.iter().map(|ns| format!("sample rtt {ns}")));

    // (2a) a stream of broadcasts, ended by a map that collects the counts.
    m.map::<(), u64>("bcast_count", &(), deadline())?;
    for _ in 0..plan.streams {
        let start = Instant::now();
        for i in 0..plan.stream as u64 {
            m.broadcast("bcast", &i)?;
        }
        let counts = m.map::<(), u64>("bcast_count", &(), deadline())?;
        let took = start.elapsed();
        if counts.len() != n {
            return fail(format!("{} of {n} workers counted the broadcasts", counts.len()));
        }
        for (who, got) in counts {
            if got.as_ref().ok() != Some(&(plan.stream as u64)) {
                return fail(format!(
                    "slot {} counted {got:?} of {} broadcasts",
                    who.slot, plan.stream
                ));
            }
        }
        out.push(format!("rate bcast {} {}", plan.stream, took.as_nanos()));
    }

    // (2b) broadcast fan-out: until the last handler ran, and until every
    // ack is back.
    let acks: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let got = acks.clone();
    m.on::<(u64, u64), _>("ack", move |_, ack| lock(&got).push(ack))?;
    for i in 0..(plan.warmup + plan.fanout) as u64 {
        lock(&acks).clear();
        let until = deadline();
        let sent_at = clock.elapsed().as_nanos() as u64;
        let start = Instant::now();
        m.broadcast("ping", &i)?;
        m.run_until(|_| lock(&acks).len() >= n || Instant::now() >= until)?;
        let all_back = start.elapsed();
        let acks = lock(&acks);
        if acks.len() != n || acks.iter().any(|&(seq, _)| seq != i) {
            return fail(format!("broadcast {i}: acks {acks:?} from {n} workers"));
        }
        let last = acks.iter().map(|&(_, at)| at).max().unwrap_or(sent_at);
        if i >= plan.warmup as u64 {
            out.push(format!("sample fanout {}", last.saturating_sub(sent_at)));
            out.push(format!("sample acks {}", all_back.as_nanos()));
        }
    }

    // (3) map gather over every worker.
    let mut maps = Vec::with_capacity(plan.map);
    for i in 0..(plan.warmup + plan.map) as u64 {
        let start = Instant::now();
        let answers = m.map::<u64, u64>("echo", &i, deadline())?;
        let took = start.elapsed();
        if answers.len() != n || answers.iter().any(|(_, r)| r.as_ref().ok() != Some(&i)) {
            return fail(format!("map {i}: {answers:?}"));
        }
        if i >= plan.warmup as u64 {
            maps.push(took.as_nanos());
        }
    }
    out.extend(maps.iter().map(|ns| format!("sample map {ns}")));

    // (4) sequential consume calls; (4b) the same, handled only by the
    // other workers.
    consume_rate(m, "task", "consume", plan, &mut out)?;
    consume_rate(m, "task_away", "consume_away", plan, &mut out)?;
    Ok(out)
}

/// `plan.consume` sequential `consume` calls of `event` after the
/// warm-up: their `rate` line and a `ran` line per handling slot, named
/// `what`.
fn consume_rate(m: &mut Messenger, event: &str, what: &str, plan: Plan, out: &mut Vec<String>) -> Res<()> {
    for i in 0..plan.warmup as u64 {
        m.consume(event, &i, deadline())?;
    }
    let mut ran: BTreeMap<u32, u64> = BTreeMap::new();
    let start = Instant::now();
    for i in 0..plan.consume as u64 {
        let done = m.consume(event, &i, deadline())?;
        *ran.entry(done.worker.slot).or_default() += 1;
    }
    out.push(format!(
        "rate {what} {} {}",
        plan.consume,
        start.elapsed().as_nanos()
    ));
    for (slot, tasks) in ran {
        out.push(format!("ran {what} {slot} {tasks}"));
    }
    Ok(())
}

/// The re-executed copy: runs one cluster; exits 0 if the driver finished
/// and the cluster shut down cleanly.
fn cluster_mode(mode: &str) -> ! {
    let words: Vec<&str> = mode.split_whitespace().collect();
    let parsed = match words.as_slice() {
        ["cluster", n, plan] => n.parse::<u32>().ok().zip(Plan::from_name(plan)),
        _ => None,
    };
    let Some((workers, plan)) = parsed else {
        eprintln!("messenger bench: unknown {MODE_VAR} {mode:?}");
        std::process::exit(2);
    };
    // Instants are CLOCK_MONOTONIC: comparable across the forked workers.
    let clock = Instant::now();
    let builder = Cluster::builder()
        .workers(workers)
        .shutdown_grace(Duration::from_secs(10));
    // The driver's exit ends the cluster; any other exit is a failure.
    let judge = |event: &Event, reason: ExitReason| Some(event.index == 0 && reason == ExitReason::Exited(0));
    run_cluster("messenger", mode, builder, judge, |worker| {
        worker_main(worker, workers, plan, clock)
    })
}

// ------------------------------------------------------------ the parent

/// What one cluster's driver printed.
#[derive(Debug, Default)]
struct ClusterRun {
    /// Nanoseconds per sample, by measure.
    samples: HashMap<String, Vec<u64>>,
    /// (items, nanoseconds) per run, by measure.
    rates: HashMap<String, Vec<(u64, u64)>>,
    /// Tasks per slot, for `consume`.
    ran: Vec<(u32, u64)>,
    /// Tasks per slot, for `consume` of a task the driver has no handler
    /// for.
    ran_away: Vec<(u32, u64)>,
}

impl ClusterRun {
    /// Reads the driver's lines.
    fn parse(text: &str) -> Res<Self> {
        let mut run = Self::default();
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["sample", what, ns] => run.samples.entry(what.to_string()).or_default().push(ns.parse()?),
                ["rate", what, items, ns] => run
                    .rates
                    .entry(what.to_string())
                    .or_default()
                    .push((items.parse()?, ns.parse()?)),
                ["ran", "consume", slot, tasks] => run.ran.push((slot.parse()?, tasks.parse()?)),
                ["ran", "consume_away", slot, tasks] => run.ran_away.push((slot.parse()?, tasks.parse()?)),
                _ => return fail(format!("unexpected line {line:?}")),
            }
        }
        Ok(run)
    }

    /// Percentiles of the `what` samples.
    fn latency(&self, what: &str) -> Res<Latency> {
        match self.samples.get(what) {
            Some(v) if !v.is_empty() => Ok(percentiles(v.clone())),
            _ => fail(format!("no {what} samples")),
        }
    }

    /// Items per second: the median run.
    fn rate(&self, what: &str) -> Res<f64> {
        let mut per_s: Vec<f64> = match self.rates.get(what) {
            Some(v) if !v.is_empty() => v.iter().map(|&(n, ns)| n as f64 / (ns as f64 / 1e9)).collect(),
            _ => return fail(format!("no {what} rate")),
        };
        per_s.sort_by(f64::total_cmp);
        Ok(per_s[per_s.len() / 2])
    }
}

/// Runs a cluster of `workers` in a fresh copy of this binary.
fn in_fresh_master(workers: u32, full: bool) -> Res<ClusterRun> {
    eprintln!("measuring the messenger with {workers} workers");
    let mode = format!("cluster {workers} {}", Plan::name(full));
    ClusterRun::parse(&in_fresh_copy(MODE_VAR, &mode, LIMIT)?)
}

// ------------------------------------------------------------ baselines

/// Round-trip percentiles, in nanoseconds.
#[derive(Debug, Clone, Copy)]
struct Latency {
    /// Median.
    p50: f64,
    /// 99th percentile.
    p99: f64,
}

/// p50 and p99 of `ns` (not empty).
fn percentiles(mut ns: Vec<u64>) -> Latency {
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q).round() as usize] as f64;
    Latency {
        p50: at(0.50),
        p99: at(0.99),
    }
}

/// Times `rounds` round trips after `warmup` unmeasured ones.
fn time_rounds(warmup: usize, rounds: usize, mut round: impl FnMut(u64) -> Res<()>) -> Res<Latency> {
    let mut ns = Vec::with_capacity(rounds);
    for i in 0..(warmup + rounds) as u64 {
        let start = Instant::now();
        round(i)?;
        let took = start.elapsed();
        if i >= warmup as u64 {
            ns.push(took.as_nanos() as u64);
        }
    }
    Ok(percentiles(ns))
}

/// Forks a child running `child` (exit code 0 on `Ok`) while this process
/// runs `parent`; reaps the child and checks it succeeded. A watchdog kills
/// both if they hang.
fn in_pair<T>(name: &str, child: impl FnOnce() -> Res<()>, parent: impl FnOnce() -> Res<T>) -> Res<T> {
    eprintln!("measuring {name}");
    let dog = Watchdog::new(name, LIMIT);
    // SAFETY: the only other thread is the watchdog's, which takes no lock
    // the child uses; every `child` in this file uses only its own endpoint
    // or socket, allocates (glibc's malloc is fork-safe) and prints nothing.
    let pid = dog.track(unsafe { testing::fork(|| i32::from(child().is_err())) }?);
    let out = parent()?;
    match pid.wait_timeout(Duration::from_secs(10))? {
        Some(testing::ExitStatus::Code(0)) => Ok(out),
        status => fail(format!("{name}: the child ended with {status:?}")),
    }
}

/// 64 B ping from slot 0 (this process), echoed by slot 1 (a forked child),
/// through two bare endpoints with the default wait strategy (the cluster's
/// too).
fn lane_rtt(plan: Plan) -> Res<Latency> {
    let segment = Segment::create(&Config::new(2))?;
    let until = Instant::now() + LIMIT;
    let rounds = plan.warmup + plan.baseline;
    let child = || -> Res<()> {
        let mut me = segment.endpoint(1)?;
        let mut buf = [0u8; SMALL];
        for _ in 0..rounds {
            let msg = me.recv_ref(Some(until))?;
            buf.copy_from_slice(msg.payload());
            drop(msg);
            me.send(0, &buf).map_err(|e| e.to_string())?;
        }
        Ok(())
    };
    in_pair("bare lane ping-pong", child, || {
        let mut me = segment.endpoint(0)?;
        let mut buf = [0u8; SMALL];
        time_rounds(plan.warmup, plan.baseline, |i| {
            buf[..8].copy_from_slice(&i.to_le_bytes());
            me.send(1, &buf).map_err(|e| e.to_string())?;
            let echo = me.recv_ref(Some(until))?;
            if echo.payload() != buf {
                return fail(format!("echo {i} differs"));
            }
            Ok(())
        })
    })
}

/// 64 B ping from this process, echoed by a forked child, over a blocking
/// unix socketpair.
fn socketpair_rtt(plan: Plan) -> Res<Latency> {
    let (mine, theirs) = UnixStream::pair()?;
    let rounds = plan.warmup + plan.baseline;
    let child = move || -> Res<()> {
        let mut s = theirs;
        let mut buf = [0u8; SMALL];
        for _ in 0..rounds {
            s.read_exact(&mut buf)?;
            s.write_all(&buf)?;
        }
        Ok(())
    };
    in_pair("unix socketpair ping-pong", child, || {
        let mut s = mine;
        let mut buf = [0u8; SMALL];
        time_rounds(plan.warmup, plan.baseline, |i| {
            buf[..8].copy_from_slice(&i.to_le_bytes());
            s.write_all(&buf)?;
            s.read_exact(&mut buf)?;
            if buf[..8] != i.to_le_bytes() {
                return fail(format!("echo {i} differs"));
            }
            Ok(())
        })
    })
}

// ------------------------------------------------------------ report

/// Nanoseconds, in the unit that reads best.
fn ns(v: f64) -> String {
    if v < 10_000.0 {
        format!("{v:.0} ns")
    } else if v < 10_000_000.0 {
        format!("{:.1} µs", v / 1e3)
    } else {
        format!("{:.1} ms", v / 1e6)
    }
}

/// `p50 / p99`.
fn lat(l: Latency) -> String {
    format!("{} / {}", ns(l.p50), ns(l.p99))
}

/// A rate per second.
fn per_s(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M/s", v / 1e6)
    } else {
        format!("{:.0} k/s", v / 1e3)
    }
}

/// A ratio with two significant digits or so.
fn times(r: f64) -> String {
    if r < 0.1 {
        format!("{r:.3}×")
    } else if r < 10.0 {
        format!("{r:.2}×")
    } else {
        format!("{r:.0}×")
    }
}

/// `ours ÷ theirs` at p50 and p99.
fn ratio(ours: Latency, theirs: Latency) -> String {
    format!(
        "{} / {}",
        times(ours.p50 / theirs.p50),
        times(ours.p99 / theirs.p99)
    )
}

/// One cluster's row figures.
struct Figures {
    /// Workers in the cluster.
    workers: u32,
    /// `request` round trip.
    rtt: Latency,
    /// Broadcasts per second in a stream.
    bcast: f64,
    /// From `broadcast` to the last handler's run.
    fanout: Latency,
    /// From `broadcast` to the last ack back.
    acks: Latency,
    /// `map` over every worker.
    map: Latency,
    /// Sequential `consume` calls per second.
    consume: f64,
    /// Tasks per slot.
    ran: Vec<(u32, u64)>,
    /// Sequential `consume` calls per second, the caller without a handler.
    consume_away: f64,
    /// Tasks per slot, the caller without a handler.
    ran_away: Vec<(u32, u64)>,
}

/// The figures of one cluster's run.
fn figures(workers: u32, run: &ClusterRun) -> Res<Figures> {
    Ok(Figures {
        workers,
        rtt: run.latency("rtt")?,
        bcast: run.rate("bcast")?,
        fanout: run.latency("fanout")?,
        acks: run.latency("acks")?,
        map: run.latency("map")?,
        consume: run.rate("consume")?,
        ran: run.ran.clone(),
        consume_away: run.rate("consume_away")?,
        ran_away: run.ran_away.clone(),
    })
}

/// The markdown tables, with the machine and the command.
fn print_tables(full: bool, plan: Plan, lane: Latency, sock: Latency, rows: &[Figures]) {
    print_preamble("messenger", full);
    println!(
        "Round trips, p50 / p99. Messenger: `request` of a `u64` to instance 1, {} timed after {} \
         warm-up. Baselines: {} B echoed between 2 forked processes, {} timed after {} warm-up.",
        plan.rtt, plan.warmup, SMALL, plan.baseline, plan.warmup
    );
    println!();
    println!("| round trip | p50 / p99 | ÷ bare lane | ÷ unix socketpair |");
    println!("|---|---|---|---|");
    println!(
        "| bare lane (`Endpoint` send/recv) | {} | — | {} |",
        lat(lane),
        ratio(lane, sock)
    );
    println!(
        "| unix socketpair (blocking) | {} | {} | — |",
        lat(sock),
        ratio(sock, lane)
    );
    for f in rows {
        println!(
            "| messenger `request`, {} workers | {} | {} | {} |",
            f.workers,
            lat(f.rtt),
            ratio(f.rtt, lane),
            ratio(f.rtt, sock)
        );
    }
    println!();
    println!(
        "Collective calls from one worker to all (the caller included); broadcast stream of {} × {}, \
         median; {} fan-outs, {} maps, {} consumes:",
        plan.streams, plan.stream, plan.fanout, plan.map, plan.consume
    );
    println!();
    println!(
        "| workers | broadcast stream: broadcasts/s (deliveries/s) | broadcast → last handler ran, \
         p50 / p99 | broadcast → every ack back, p50 / p99 | `map` gather, p50 / p99 | `consume`, \
         tasks/s (tasks by slot) | `consume`, caller without a handler: tasks/s (tasks by slot) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let spread = |ran: &[(u32, u64)]| -> String {
        let by_slot: Vec<String> = ran.iter().map(|(s, t)| format!("{s}: {t}")).collect();
        by_slot.join(", ")
    };
    for f in rows {
        println!(
            "| {} | {} ({}) | {} | {} | {} | {} ({}) | {} ({}) |",
            f.workers,
            per_s(f.bcast),
            per_s(f.bcast * f64::from(f.workers)),
            lat(f.fanout),
            lat(f.acks),
            lat(f.map),
            per_s(f.consume),
            spread(&f.ran),
            per_s(f.consume_away),
            spread(&f.ran_away)
        );
    }
    println!();
    let spin = shmcluster::WaitStrategy::DEFAULT_SPIN.as_micros();
    println!(
        "Every endpoint uses the default wait strategy, `SpinThenPark({spin} µs)` (with it, a caller \
         waiting for a `request`'s answer spins 50 µs, for a `map`'s 20 µs). Workers that are not \
         called within {spin} µs park on their futex, and waking one costs a `futex_wake` plus a \
         scheduler round trip: with more busy processes than CPUs (here {} CPUs), that is what the \
         collective figures measure.",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    print_targets(lane, rows);
}

/// Issue 14's targets, each marked met or not in this run.
fn print_targets(lane: Latency, rows: &[Figures]) {
    let mark = |met: bool| if met { "met" } else { "NOT met" };
    println!("Targets (issue 14), this run:");
    println!();
    for f in rows {
        let over = f.rtt.p50 - lane.p50;
        println!(
            "- `request` p50 ≤ bare lane + 0.25 µs, {} workers: +{} — {}",
            f.workers,
            ns(over),
            mark(over <= 250.0)
        );
    }
    for (workers, map_us) in [(4, 30.0), (8, 75.0)] {
        if let Some(f) = rows.iter().find(|f| f.workers == workers) {
            println!(
                "- `map` p50 ≤ {map_us} µs, {workers} workers: {} — {}",
                ns(f.map.p50),
                mark(f.map.p50 <= map_us * 1e3)
            );
            println!(
                "- `consume` ≥ 300 k tasks/s, {workers} workers: {} — {}; with every task on \
                 another worker: {} — {}",
                per_s(f.consume),
                mark(f.consume >= 300e3),
                per_s(f.consume_away),
                mark(f.consume_away >= 300e3)
            );
        }
    }
}

fn main() {
    if let Ok(mode) = std::env::var(MODE_VAR) {
        cluster_mode(&mode);
    }
    warn_if_busy();
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    let full = std::env::args().any(|a| a == "--bench");
    let plan = if full { Plan::FULL } else { Plan::QUICK };
    let mut failed = false;
    let mut rows = Vec::new();
    for workers in WORKERS {
        match in_fresh_master(workers, full).and_then(|run| figures(workers, &run)) {
            Ok(f) => rows.push(f),
            Err(e) => {
                eprintln!("messenger, {workers} workers: {e}");
                failed = true;
            }
        }
    }
    match lane_rtt(plan).and_then(|lane| Ok((lane, socketpair_rtt(plan)?))) {
        Ok((lane, sock)) => print_tables(full, plan, lane, sock, &rows),
        Err(e) => {
            eprintln!("baselines: {e}");
            failed = true;
        }
    }
    if failed {
        std::process::exit(1);
    }
}
