//! Leader benchmark: what `invoke` through the leader costs next to a plain
//! `request` to the same worker, and how long a re-election takes after
//! the leader is SIGKILLed, in real fork-mode clusters of 2 and 4 workers.
//!
//! `cargo bench --bench leader` prints markdown tables on stdout (progress
//! goes to stderr). Run without `--bench` (as `cargo test --benches` does),
//! it only checks that each measure works, with a few iterations.
//!
//! A master refuses to run in a process with more than one thread, so each
//! cluster runs in a fresh copy of this binary, re-executed with
//! [`MODE_VAR`] set; its workers print one line per sample on stdout (one
//! `write` each, so lines of different processes do not mix).
//!
//! 1. `rtt` clusters: instance 0 does not campaign; every other instance
//!    does, with the same `echo` handler for `invoke` and for `request`.
//!    Instance 0 alternates `invoke("echo")` (to whoever leads) and
//!    `request(leader, "echo")`, so both see the same machine state.
//! 2. `elect` clusters: every worker campaigns and serves with
//!    [`Messenger::run_until`]. The live follower in the lowest slot, once
//!    every slot is ready again, SIGKILLs the leader and spins on
//!    [`Messenger::leader`] (a read of the lock table) until the term goes
//!    up: *SIGKILL → `leader()`*. Every follower's `on_leader_change`
//!    prints its `CLOCK_MONOTONIC` time: *SIGKILL → first follower's
//!    callback* (followers dispatching in `run`, as a real worker does).

use std::collections::HashMap;
use std::convert::Infallible;
use std::error::Error;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use shmcluster::{Event, ExitReason, Messenger, Worker, WorkerState};

mod common;
use common::cluster::{
    emit_line, in_fresh_cluster, mono_ns, read_cluster_mode, respawning, run_cluster, sigkill, LeaderKiller,
    Step,
};
use common::{fmt_ns, percentiles, print_preamble, warn_if_busy, Pct};

/// Set in a re-executed copy of this binary: `<rtt|elect> <workers> <plan> <dir>`.
const MODE_VAR: &str = "SHMCLUSTER_BENCH_LEADER";
/// Longest one cluster may take.
const LIMIT: Duration = Duration::from_secs(60);
/// Deadline of each blocking call.
const CALL_LIMIT: Duration = Duration::from_secs(5);
/// Worker counts, one fresh cluster each.
const WORKERS: [u32; 2] = [2, 4];

type Res<T> = Result<T, Box<dyn Error>>;

/// How many iterations of each measure.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Unmeasured round trips first.
    warmup: usize,
    /// Timed round trips of each kind.
    rtt: usize,
    /// Leaders SIGKILLed.
    elections: usize,
}

impl Plan {
    const FULL: Self = Self {
        warmup: 1_000,
        rtt: 20_000,
        elections: 20,
    };
    const QUICK: Self = Self {
        warmup: 10,
        rtt: 50,
        elections: 3,
    };

    fn name(full: bool) -> &'static str {
        if full {
            "full"
        } else {
            "quick"
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "full" => Some(Self::FULL),
            "quick" => Some(Self::QUICK),
            _ => None,
        }
    }
}

fn fail<T>(what: String) -> Res<T> {
    Err(what.into())
}

fn deadline() -> Instant {
    Instant::now() + CALL_LIMIT
}

// ------------------------------------------------------------ rtt cluster

fn rtt_worker(worker: Worker, workers: u32, plan: Plan) -> Res<()> {
    let driver = worker.index() == 0;
    let mut m = Messenger::new(worker);
    if !driver {
        m.on_invoke::<u64, u64, Infallible, _>("echo", |_, v| Ok(v))?;
        m.on_request::<u64, u64, Infallible, _>("echo", |_, v| Ok(v))?;
    }
    m.worker().ready();
    if !driver {
        return Ok(m.run()?);
    }
    let until = deadline();
    let leader = loop {
        let ready = m
            .worker()
            .peers()
            .iter()
            .filter(|p| p.state == WorkerState::Ready)
            .count();
        match m.leader() {
            Some(l) if ready == workers as usize => break l,
            _ if Instant::now() >= until => return fail(format!("{ready} ready, no leader")),
            _ => {
                m.poll(Duration::from_millis(1))?;
            }
        }
    };
    for i in 0..(plan.warmup + plan.rtt) as u64 {
        let start = Instant::now();
        let a: u64 = m.invoke("echo", &i, deadline())?;
        let invoke = start.elapsed();
        let start = Instant::now();
        let b: u64 = m.request(leader.slot, "echo", &i, deadline())?;
        let request = start.elapsed();
        if a != i || b != i {
            return fail(format!("echo {i}: invoke {a}, request {b}"));
        }
        if i >= plan.warmup as u64 {
            emit_line(&format!("sample invoke {}", invoke.as_nanos()));
            emit_line(&format!("sample request {}", request.as_nanos()));
        }
    }
    Ok(())
}

// ------------------------------------------------------------ elect cluster

/// Called by `run_until` in every worker: true once every round is done
/// (this worker exits 0 and the cluster ends). When it is this worker's
/// turn, kills the leader and spins on `leader()` until the term goes up.
fn elect_step(killer: &mut LeaderKiller, m: &Messenger) -> bool {
    let (victim, leader) = match killer.step(m) {
        Step::Done => return true,
        Step::Wait => return false,
        Step::Kill { victim, leader } => (victim, leader),
    };
    killer.record(victim).expect("kills file");
    let killed_at = mono_ns();
    sigkill(victim);
    let until = Instant::now() + CALL_LIMIT;
    loop {
        if let Some(l) = m.leader().filter(|l| l.term > leader.term) {
            emit_line(&format!(
                "elect {} {} {killed_at} {}",
                leader.term,
                l.term,
                mono_ns()
            ));
            return false;
        }
        if Instant::now() >= until {
            emit_line("elect-timeout");
            return true;
        }
        std::hint::spin_loop();
    }
}

fn elect_worker(worker: Worker, workers: u32, plan: Plan, dir: PathBuf) -> Res<()> {
    let born = mono_ns();
    let mut m = Messenger::new(worker);
    m.on_leader_change(move |c| {
        if !c.is_me {
            emit_line(&format!("notice {} {} {born}", c.leader.term, mono_ns()));
        }
    });
    m.campaign()?;
    m.worker().ready();
    // Lingers for the other followers' callbacks to print before the end.
    let linger = Duration::from_millis(200);
    let mut killer = LeaderKiller::new(dir, plan.elections, workers, Duration::from_millis(30), linger);
    m.run_until(|m| elect_step(&mut killer, m))?;
    Ok(())
}

/// The re-executed copy: runs one cluster; exits 0 if a worker finished
/// and the cluster shut down cleanly.
fn cluster_mode(mode: &str) -> ! {
    let (kind, workers, plan, dir) = read_cluster_mode("leader", MODE_VAR, mode, Plan::from_name);
    // The elect clusters SIGKILL their leaders.
    let judge = |_: &Event, reason: ExitReason| {
        (reason != ExitReason::Signaled(libc::SIGKILL)).then_some(reason == ExitReason::Exited(0))
    };
    run_cluster("leader", mode, respawning(workers), judge, |worker| {
        match kind.as_str() {
            "rtt" => rtt_worker(worker, workers, plan),
            _ => elect_worker(worker, workers, plan, dir.clone()),
        }
    })
}

// ------------------------------------------------------------ the parent

/// Runs one cluster in a fresh copy of this binary; returns its lines.
fn in_fresh_master(kind: &str, workers: u32, full: bool) -> Res<String> {
    eprintln!("leader bench: {kind}, {workers} workers");
    let plan = Plan::name(full);
    Ok(in_fresh_cluster(
        "leader",
        MODE_VAR,
        (kind, workers, plan),
        LIMIT,
    )?)
}

/// One worker count's figures.
struct Row {
    workers: u32,
    invoke: Pct,
    request: Pct,
    elections: usize,
    elect: Pct,
    /// First follower callback, if any follower saw one.
    notice: Option<Pct>,
}

fn figures(workers: u32, full: bool) -> Res<Row> {
    let rtt = in_fresh_master("rtt", workers, full)?;
    let mut samples: HashMap<&str, Vec<u64>> = HashMap::new();
    for line in rtt.lines() {
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["sample", what @ ("invoke" | "request"), ns] => {
                samples.entry(what).or_default().push(ns.parse()?)
            }
            _ => return fail(format!("rtt: unexpected line {line:?}")),
        }
    }
    let (Some(invoke), Some(request)) = (samples.remove("invoke"), samples.remove("request")) else {
        return fail("rtt: no samples".into());
    };
    let elect = in_fresh_master("elect", workers, full)?;
    let mut kills = Vec::new();
    let mut notices = Vec::new();
    for line in elect.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["elect", _old, new, killed, seen] => {
                kills.push((new.parse::<u64>()?, killed.parse::<u64>()?, seen.parse::<u64>()?))
            }
            ["notice", term, at, born] => {
                notices.push((term.parse::<u64>()?, at.parse::<u64>()?, born.parse::<u64>()?))
            }
            _ => return fail(format!("elect: unexpected line {line:?}")),
        }
    }
    if kills.is_empty() {
        return fail("elect: no re-election measured".into());
    }
    let elect_ns: Vec<u64> = kills.iter().map(|&(_, k, s)| s - k).collect();
    // The first callback, per kill, among followers that lived through it.
    let notice_ns: Vec<u64> = kills
        .iter()
        .filter_map(|&(term, killed, _)| {
            notices
                .iter()
                .filter(|&&(t, _, born)| t == term && born < killed)
                .map(|&(_, at, _)| at.saturating_sub(killed))
                .min()
        })
        .collect();
    let (Some(invoke), Some(request), Some(elect)) =
        (percentiles(invoke), percentiles(request), percentiles(elect_ns))
    else {
        return fail("no samples".into());
    };
    Ok(Row {
        workers,
        invoke,
        request,
        elections: kills.len(),
        elect,
        notice: percentiles(notice_ns),
    })
}

fn print_tables(full: bool, plan: Plan, rows: &[Row]) {
    print_preamble("leader", full);
    println!(
        "Round trips from a follower (instance 0, not a candidate), p50 / p99: `invoke(\"echo\", u64)` \
         and `request(leader, \"echo\", u64)` alternated, {} each timed after {} warm-up.",
        plan.rtt, plan.warmup
    );
    println!();
    println!("| workers | `invoke` via the leader | `request` to the leader | invoke ÷ request |");
    println!("|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} / {} | {} / {} | {:.2}× / {:.2}× |",
            r.workers,
            fmt_ns(r.invoke.p50),
            fmt_ns(r.invoke.p99),
            fmt_ns(r.request.p50),
            fmt_ns(r.request.p99),
            r.invoke.p50 / r.request.p50,
            r.invoke.p99 / r.request.p99
        );
    }
    println!();
    println!(
        "Re-election: the leader SIGKILLed {} times per cluster by a follower, p50 / max. \
         `leader()`: the killer spinning on `leader()` (a lock-table read) until the term goes up. \
         Callback: the first `on_leader_change` among the other followers, which dispatch in `run()`.",
        plan.elections
    );
    println!();
    println!("| workers | kills | SIGKILL → `leader()` shows the new term | SIGKILL → first follower's `on_leader_change` |");
    println!("|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} / {} | {} |",
            r.workers,
            r.elections,
            fmt_ns(r.elect.p50),
            fmt_ns(r.elect.max),
            r.notice.map_or("— (no other follower)".into(), |n| format!(
                "{} / {}",
                fmt_ns(n.p50),
                fmt_ns(n.max)
            ))
        );
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
    let mut rows = Vec::new();
    let mut failed = false;
    for workers in WORKERS {
        match figures(workers, full) {
            Ok(r) => rows.push(r),
            Err(e) => {
                eprintln!("leader bench, {workers} workers: {e}");
                failed = true;
            }
        }
    }
    print_tables(full, plan, &rows);
    if failed {
        std::process::exit(1);
    }
}
