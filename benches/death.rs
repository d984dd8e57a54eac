//! Death benchmark (issue 12, item 6, "death observed at once"): how long
//! after a worker is SIGKILLed the callers waiting on it carry on, in real
//! fork-mode clusters of 2 and 4 workers, next to how long the master
//! takes to reap it.
//!
//! `cargo bench --bench death` prints markdown tables on stdout (progress
//! goes to stderr). Run without `--bench` (as `cargo test --benches` does),
//! it only checks that each measure works, with a few kills.
//! `SHMC_BENCH_KILLS=n` sets the kills per cluster of the full run.
//!
//! A master refuses to run in a process with more than one thread, so each
//! cluster runs in a fresh copy of this binary, re-executed with
//! [`MODE_VAR`] set. Workers (and the master's `on_event`) print one line
//! per sample on stdout, one `write` each, with `CLOCK_MONOTONIC` times
//! (one clock for every process); the parent pairs them up.
//!
//! 1. `consume` clusters: every worker has a `task` handler. Instance 0
//!    calls `consume("task", ..)` with a deadline seconds away. The handler
//!    on any other worker, the first time it sees a delivery id (a marker
//!    file created with `O_EXCL`), prints its clock and SIGKILLs its own
//!    process; any other run prints its start time. *SIGKILL → redelivered*
//!    is the start of the copy with the same delivery id, wherever it ran;
//!    *SIGKILL → `consume` returned* is instance 0's clock after the call.
//!    A task that lands on instance 0 itself runs without a kill and is not
//!    a sample. After each kill instance 0 waits (dispatching) until every
//!    instance is `Ready` again and then 30 ms more.
//! 2. `invoke` clusters: every worker campaigns and has an `echo` invoke
//!    handler that answers with its slot. The live follower in the lowest
//!    slot, once every slot is ready and the leader has been the same for
//!    30 ms, SIGKILLs the leader and at once calls `invoke("echo")` until it
//!    returns `Ok`, counting `LeaderDied` and `NoLeader` retries.
//! 3. `reap` clusters (the baseline): instance 0 SIGKILLs another worker
//!    (round the other slots), waits blocked on the victim's pidfd (it has
//!    exited: *SIGKILL → process exited*), then blocked on the master's
//!    event log until the victim's `Exit` event, and checks that
//!    [`Messenger::live_workers`] no longer lists it: *SIGKILL → the
//!    master's reap seen by a worker*. What the messenger adds in 1 and 2
//!    is on top of this. (Spinning on `live_workers()` instead took a vCPU
//!    of two from the dying process and the master: the reap then took
//!    1.6–1.9 ms p50 instead of about 0.4–0.8 ms.)
//!
//! In every cluster the master's `on_event` prints its clock when it
//! publishes the victim's `Exit` event, just after its clean-up (the death
//! counted, every slot rung): *SIGKILL → master's Exit event*.

use std::convert::Infallible;
use std::error::Error;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use shmcluster::{CallError, Event, EventKind, ExitReason, Messenger, Worker, WorkerState};

mod common;
use common::cluster::{
    emit_line, in_fresh_cluster, mono_ns, read_cluster_mode, respawning, run_cluster, sigkill, LeaderKiller,
    Step,
};
use common::{fmt_ns, other_runnable, percentiles, print_preamble, warn_if_busy, Pct};

/// Set in a re-executed copy of this binary: `<consume|invoke|reap> <workers> <kills> <dir>`.
const MODE_VAR: &str = "SHMCLUSTER_BENCH_DEATH";
/// Kills per cluster of the full run, unless `SHMC_BENCH_KILLS` says otherwise.
const FULL_KILLS: usize = 20;
/// Kills per cluster of the quick check.
const QUICK_KILLS: usize = 2;
/// Longest one cluster may take.
const LIMIT: Duration = Duration::from_secs(60);
/// Deadline of each blocking call: far beyond any measured figure.
const CALL_LIMIT: Duration = Duration::from_secs(5);
/// How long every slot must have been ready (and, for `invoke`, the leader
/// the same) before the next kill: the respawned worker settles and parks
/// like the others.
const SETTLE: Duration = Duration::from_millis(30);
/// Worker counts, one fresh cluster each.
const WORKERS: [u32; 2] = [2, 4];
/// The targets.
const CONSUME_P50_TARGET_NS: f64 = 1e6;
const INVOKE_P99_TARGET_NS: f64 = 2e6;

type Res<T> = Result<T, Box<dyn Error>>;

fn fail<T>(what: String) -> Res<T> {
    Err(what.into())
}

fn deadline() -> Instant {
    Instant::now() + CALL_LIMIT
}

/// Every instance is `Ready` (and none starting or dead).
fn all_ready(m: &Messenger, workers: u32) -> bool {
    let w = m.worker();
    w.peers().iter().filter(|p| p.state == WorkerState::Ready).count() == workers as usize
}

/// Dispatches until every instance has been ready for [`SETTLE`].
fn settle(m: &mut Messenger, workers: u32) -> Res<()> {
    let until = deadline();
    let mut since: Option<Instant> = None;
    loop {
        if all_ready(m, workers) {
            let s = *since.get_or_insert_with(Instant::now);
            if s.elapsed() >= SETTLE {
                return Ok(());
            }
        } else {
            since = None;
        }
        if Instant::now() >= until {
            return fail("the cluster did not become ready again".into());
        }
        m.poll(Duration::from_millis(2))?;
    }
}

// ------------------------------------------------------------ consume

fn consume_worker(worker: Worker, workers: u32, kills: usize, dir: PathBuf) -> Res<()> {
    let me = worker.slot();
    let driver = worker.index() == 0;
    let mut m = Messenger::new(worker);
    m.on::<u64, _>("task", move |ctx, _sample| {
        let start = mono_ns();
        let first = ctx.sender().slot != me
            && std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dir.join(format!("kill-{}", ctx.delivery_id())))
                .is_ok();
        if first {
            let at = mono_ns();
            emit_line(&format!("killed {} {me} {at}", ctx.delivery_id()));
            // SAFETY: getpid(2) and kill(2) take no pointers.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        emit_line(&format!("ran {} {me} {start}", ctx.delivery_id()));
    })?;
    m.worker().ready();
    if !driver {
        return Ok(m.run()?);
    }
    let mut done = 0;
    let mut sample = 0u64;
    while done < kills {
        settle(&mut m, workers)?;
        sample += 1;
        let c = m.consume("task", &sample, deadline())?;
        let back = mono_ns();
        emit_line(&format!(
            "consumed {} {} {} {me} {back}",
            c.delivery_id, c.attempts, c.worker.slot
        ));
        if c.attempts > 1 {
            done += 1;
        }
        if sample > 20 * kills as u64 + 20 {
            return fail(format!("{done} kills in {sample} tasks"));
        }
    }
    Ok(())
}

// ------------------------------------------------------------ invoke

fn invoke_worker(worker: Worker, workers: u32, kills: usize, dir: PathBuf) -> Res<()> {
    let me = worker.slot();
    let mut m = Messenger::new(worker);
    m.on_invoke::<u64, (u64, u32), Infallible, _>("echo", move |_, v| Ok((v, me)))?;
    m.campaign()?;
    m.worker().ready();
    // Lingers for the killer's last line to come out before the cluster ends.
    let mut killer = LeaderKiller::new(dir, kills, workers, SETTLE, Duration::from_millis(100));
    let mut i = 0u64;
    loop {
        if m.worker().should_stop() {
            return Ok(());
        }
        match killer.step(&m) {
            Step::Done => return Ok(()),
            Step::Wait => {
                m.poll(Duration::from_millis(5))?;
            }
            Step::Kill { victim, leader } => {
                killer.record(victim)?;
                let killed_at = mono_ns();
                sigkill(victim);
                let (mut died, mut no_leader) = (0u32, 0u32);
                // When the first call failed (0: it did not).
                let mut failed_at = 0u64;
                let until = deadline();
                let answered_by = loop {
                    i += 1;
                    let r = m.invoke::<u64, (u64, u32)>("echo", &i, until);
                    if r.is_err() && failed_at == 0 {
                        failed_at = mono_ns();
                    }
                    match r {
                        Ok((v, slot)) if v == i => break slot,
                        Ok((v, _)) => return fail(format!("echo {i} answered {v}")),
                        Err(CallError::LeaderDied) => died += 1,
                        Err(CallError::NoLeader) if Instant::now() < until => no_leader += 1,
                        Err(e) => return fail(format!("invoke after the kill: {e}")),
                    }
                };
                let ok_at = mono_ns();
                emit_line(&format!(
                    "invoke {} {} {killed_at} {failed_at} {ok_at} {died} {no_leader} {answered_by} {}",
                    leader.slot,
                    leader.term,
                    m.slot()
                ));
            }
        }
    }
}

// ------------------------------------------------------------ reap (baseline)

/// A pidfd for `pid` (readable once the process has exited, before it
/// is reaped), or `None`.
fn pidfd_open(pid: u32) -> Option<i32> {
    // SAFETY: pidfd_open(2) takes a pid and flags, no pointers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    (fd >= 0).then_some(fd as i32)
}

/// Waits up to `ms` for `fd` to be readable; closes it.
fn poll_and_close(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) reads and writes one pollfd, a live local.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    // SAFETY: `fd` is a descriptor this function owns, closed once.
    unsafe { libc::close(fd) };
    n == 1
}

fn reap_worker(worker: Worker, workers: u32, kills: usize) -> Res<()> {
    let driver = worker.index() == 0;
    let me = worker.slot();
    let mut m = Messenger::new(worker);
    m.worker().ready();
    if !driver {
        return Ok(m.run()?);
    }
    for k in 0..kills {
        settle(&mut m, workers)?;
        let w = m.worker();
        let mut others: Vec<_> = w
            .peers()
            .into_iter()
            .filter(|p| p.state == WorkerState::Ready && p.slot != me && p.pid != 0)
            .collect();
        others.sort_by_key(|p| p.slot);
        let Some(victim) = others.get(k % others.len().max(1)).cloned() else {
            return fail("no other ready worker".into());
        };
        let mut events = w.events();
        let Some(pidfd) = pidfd_open(victim.pid) else {
            return fail(format!("pidfd_open({}) failed", victim.pid));
        };
        let killed_at = mono_ns();
        sigkill(victim.pid);
        // Blocked, as a waiting caller is: no spinning on two vCPUs.
        if !poll_and_close(pidfd, CALL_LIMIT.as_millis() as i32) {
            return fail(format!("pid {} did not exit", victim.pid));
        }
        let gone_at = mono_ns();
        let until = deadline();
        let seen_at = loop {
            let left = until.saturating_duration_since(Instant::now());
            match events.next_timeout(left) {
                Some(e)
                    if e.slot == victim.slot
                        && e.generation == victim.generation
                        && matches!(e.kind, EventKind::Exit(_)) =>
                {
                    break mono_ns()
                }
                Some(_) => {}
                None => return fail(format!("no Exit event for slot {}", victim.slot)),
            }
        };
        if m.live_workers()
            .iter()
            .any(|id| id.slot == victim.slot && id.generation == victim.generation)
        {
            return fail(format!("slot {} live after its Exit event", victim.slot));
        }
        emit_line(&format!("reap {} {killed_at} {gone_at} {seen_at}", victim.slot));
    }
    Ok(())
}

// ------------------------------------------------------------ one cluster

/// The re-executed copy: runs one cluster; exits 0 if a worker finished
/// and the cluster shut down cleanly.
fn cluster_mode(mode: &str) -> ! {
    let (kind, workers, kills, dir) = read_cluster_mode("death", MODE_VAR, mode, |k| k.parse::<usize>().ok());
    let judge = |event: &Event, reason: ExitReason| {
        if reason == ExitReason::Signaled(libc::SIGKILL) {
            // Published just after the master's clean-up of the slot.
            emit_line(&format!("reaped {} {}", event.slot, mono_ns()));
            return None;
        }
        Some(reason == ExitReason::Exited(0))
    };
    run_cluster("death", mode, respawning(workers), judge, |worker| {
        match kind.as_str() {
            "consume" => consume_worker(worker, workers, kills, dir.clone()),
            "invoke" => invoke_worker(worker, workers, kills, dir.clone()),
            _ => reap_worker(worker, workers, kills),
        }
    })
}

// ------------------------------------------------------------ the parent

/// Runs one cluster in a fresh copy of this binary; returns its lines.
fn in_fresh_master(kind: &str, workers: u32, kills: usize) -> Res<String> {
    eprintln!("death bench: {kind}, {workers} workers, {kills} kills");
    let kills = kills.to_string();
    Ok(in_fresh_cluster(
        "death",
        MODE_VAR,
        (kind, workers, &kills),
        LIMIT,
    )?)
}

/// The cells every table starts with: workers, n, p50, p99 and max.
fn first_cells(workers: u32, p: Pct) -> String {
    format!(
        "{workers} | {} | {} | {} | {}",
        p.n,
        fmt_ns(p.p50),
        fmt_ns(p.p99),
        fmt_ns(p.max)
    )
}

fn fmt_pair(p: Option<Pct>) -> String {
    p.map_or("—".into(), |p| format!("{} / {}", fmt_ns(p.p50), fmt_ns(p.p99)))
}

fn verdict(value: f64, target: f64) -> &'static str {
    if value <= target {
        "met"
    } else {
        "not met"
    }
}

/// Runs one `kind` cluster and reads its lines: returns `(slot, time)` of
/// each "reaped" line of the master, and gives every other line's words to
/// `read` (with those), which says whether it knew the line.
fn cluster_lines(
    kind: &str,
    workers: u32,
    kills: usize,
    mut read: impl FnMut(&[&str], &[(u32, u64)]) -> Res<bool>,
) -> Res<Vec<(u32, u64)>> {
    let text = in_fresh_master(kind, workers, kills)?;
    let mut reaped = Vec::new();
    for line in text.lines() {
        if let ["reaped", slot, at] = line.split_whitespace().collect::<Vec<_>>().as_slice() {
            reaped.push((slot.parse()?, at.parse()?));
        }
    }
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() != Some(&"reaped") && !read(&words, &reaped)? {
            return fail(format!("{kind}: unexpected line {line:?}"));
        }
    }
    Ok(reaped)
}

/// The percentiles of a `kind` cluster's main samples, which it must have.
fn measured(kind: &str, ns: Vec<u64>) -> Res<Pct> {
    percentiles(ns).ok_or_else(|| format!("{kind}: no kill measured").into())
}

/// The master's first Exit event for `slot` at or after `killed`.
fn reaped_after(reaped: &[(u32, u64)], slot: u32, killed: u64) -> Option<u64> {
    reaped
        .iter()
        .filter(|&&(s, at)| s == slot && at >= killed)
        .map(|&(_, at)| at - killed)
        .min()
}

/// Figures of one `consume` cluster.
struct ConsumeRow {
    workers: u32,
    redelivered: Pct,
    returned: Option<Pct>,
    reaped: Option<Pct>,
    /// Where the redelivered copy ran: another live worker, the caller,
    /// the dead worker's successor.
    on_other: usize,
    on_caller: usize,
    on_successor: usize,
}

fn consume_figures(workers: u32, kills: usize) -> Res<ConsumeRow> {
    let (mut killed, mut ran, mut consumed) = (Vec::new(), Vec::new(), Vec::new());
    let reaped = cluster_lines("consume", workers, kills, |words, _| {
        match words {
            ["killed", d, slot, at] => {
                killed.push((d.parse::<u64>()?, slot.parse::<u32>()?, at.parse::<u64>()?))
            }
            ["ran", d, slot, at] => ran.push((d.parse::<u64>()?, slot.parse::<u32>()?, at.parse::<u64>()?)),
            ["consumed", d, _attempts, _worker, caller, at] => {
                consumed.push((d.parse::<u64>()?, caller.parse::<u32>()?, at.parse::<u64>()?))
            }
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    let (mut redelivered, mut returned, mut reap) = (Vec::new(), Vec::new(), Vec::new());
    let (mut on_other, mut on_caller, mut on_successor) = (0, 0, 0);
    for &(d, victim, at) in &killed {
        let Some(&(_, slot, start)) = ran.iter().filter(|r| r.0 == d && r.2 >= at).min_by_key(|r| r.2) else {
            return fail(format!(
                "consume: delivery {d:#x} killed its worker and never ran again"
            ));
        };
        redelivered.push(start - at);
        if let Some(&(_, caller, back)) = consumed.iter().find(|c| c.0 == d) {
            returned.push(back - at);
            if slot == caller {
                on_caller += 1;
            } else if slot == victim {
                on_successor += 1;
            } else {
                on_other += 1;
            }
        }
        if let Some(r) = reaped_after(&reaped, victim, at) {
            reap.push(r);
        }
    }
    Ok(ConsumeRow {
        workers,
        redelivered: measured("consume", redelivered)?,
        returned: percentiles(returned),
        reaped: percentiles(reap),
        on_other,
        on_caller,
        on_successor,
    })
}

/// Figures of one `invoke` cluster.
struct InvokeRow {
    workers: u32,
    answered: Pct,
    /// SIGKILL → the first failed `invoke` returned (samples with a retry).
    failed: Option<Pct>,
    reaped: Option<Pct>,
    /// Samples whose first `invoke` after the kill failed.
    retried: usize,
    /// `LeaderDied` and `NoLeader` answers in all.
    died: u32,
    no_leader: u32,
    /// Answered by the killer itself (it won the election).
    by_killer: usize,
}

fn invoke_figures(workers: u32, kills: usize) -> Res<InvokeRow> {
    let (mut answered, mut failed, mut reap) = (Vec::new(), Vec::new(), Vec::new());
    let (mut retried, mut died_all, mut no_leader_all, mut by_killer) = (0, 0, 0, 0);
    cluster_lines("invoke", workers, kills, |words, reaped| {
        match words {
            ["invoke", victim, _term, killed, failed_at, ok, died, no_leader, by, killer] => {
                let (killed, ok): (u64, u64) = (killed.parse()?, ok.parse()?);
                let failed_at: u64 = failed_at.parse()?;
                if failed_at != 0 {
                    failed.push(failed_at - killed);
                }
                let (died, no_leader): (u32, u32) = (died.parse()?, no_leader.parse()?);
                answered.push(ok - killed);
                if died + no_leader > 0 {
                    retried += 1;
                }
                died_all += died;
                no_leader_all += no_leader;
                if by == killer {
                    by_killer += 1;
                }
                if let Some(r) = reaped_after(reaped, victim.parse()?, killed) {
                    reap.push(r);
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(InvokeRow {
        workers,
        answered: measured("invoke", answered)?,
        failed: percentiles(failed),
        reaped: percentiles(reap),
        retried,
        died: died_all,
        no_leader: no_leader_all,
        by_killer,
    })
}

/// Figures of one `reap` cluster.
struct ReapRow {
    workers: u32,
    /// SIGKILL → the killer, blocked on the event log, has the Exit event.
    seen: Pct,
    /// SIGKILL → the victim's pidfd is readable (it has exited, unreaped).
    gone: Option<Pct>,
    reaped: Option<Pct>,
}

fn reap_figures(workers: u32, kills: usize) -> Res<ReapRow> {
    let (mut seen, mut gone, mut reap) = (Vec::new(), Vec::new(), Vec::new());
    cluster_lines("reap", workers, kills, |words, reaped| {
        match words {
            ["reap", slot, killed, gone_at, at] => {
                let (slot, killed, at): (u32, u64, u64) = (slot.parse()?, killed.parse()?, at.parse()?);
                seen.push(at - killed);
                gone.push(gone_at.parse::<u64>()? - killed);
                if let Some(r) = reaped_after(reaped, slot, killed) {
                    reap.push(r);
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(ReapRow {
        workers,
        seen: measured("reap", seen)?,
        gone: percentiles(gone),
        reaped: percentiles(reap),
    })
}

/// `p50 / p99` of `a` over the baseline's.
fn ratio(a: Pct, b: Option<&ReapRow>) -> String {
    b.map_or("—".into(), |b| {
        format!("{:.2}× / {:.2}×", a.p50 / b.seen.p50, a.p99 / b.seen.p99)
    })
}

fn print_tables(
    full: bool,
    kills: usize,
    busy: u32,
    consume: &[ConsumeRow],
    invoke: &[InvokeRow],
    reap: &[ReapRow],
) {
    print_preamble("death", full);
    if busy > 0 {
        println!("**Warning: up to {busy} other runnable processes during the run; figures are noisy.**");
        println!();
    }
    let base = |w: u32| reap.iter().find(|r| r.workers == w);
    println!(
        "One fresh fork-mode cluster per row, {kills} SIGKILLs each; with so few samples p99 is \
         the largest but one or the largest. Master's Exit event: the master's `on_event` for the \
         victim, published just after its clean-up (death counted, every slot rung)."
    );
    println!();
    println!(
        "SIGKILL → `consume` redelivered: a worker's `task` handler SIGKILLs its own process; \
         the copy with the same delivery id starts on another worker (start − kill); the caller \
         waits in `consume`. Ratios are to the baseline (last table) of the same worker count."
    );
    println!();
    println!("| workers | n | p50 | p99 | max | ÷ baseline, p50 / p99 | SIGKILL → `consume` returned, p50 / p99 | SIGKILL → master's Exit event, p50 / p99 | redelivered on: other / caller / successor | target p50 ≤ 1 ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in consume {
        let p = r.redelivered;
        println!(
            "| {} | {} | {} | {} | {} / {} / {} | {} |",
            first_cells(r.workers, p),
            ratio(p, base(r.workers)),
            fmt_pair(r.returned),
            fmt_pair(r.reaped),
            r.on_other,
            r.on_caller,
            r.on_successor,
            verdict(p.p50, CONSUME_P50_TARGET_NS)
        );
    }
    println!();
    println!(
        "SIGKILL of the leader → next `invoke` answered: every worker campaigns; the lowest \
         follower SIGKILLs the leader and at once calls `invoke(\"echo\")` until it returns `Ok` \
         (Ok − kill)."
    );
    println!();
    println!("| workers | n | p50 | p99 | max | ÷ baseline, p50 / p99 | samples with a retry (`LeaderDied` / `NoLeader` answers) | answered by the killer itself | SIGKILL → master's Exit event, p50 / p99 | SIGKILL → first failed `invoke` returned, p50 / p99 | target p99 ≤ 2 ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in invoke {
        let p = r.answered;
        println!(
            "| {} | {} | {} ({} / {}) | {} | {} | {} | {} |",
            first_cells(r.workers, p),
            ratio(p, base(r.workers)),
            r.retried,
            r.died,
            r.no_leader,
            r.by_killer,
            fmt_pair(r.reaped),
            fmt_pair(r.failed),
            verdict(p.p99, INVOKE_P99_TARGET_NS)
        );
    }
    println!();
    println!(
        "Baseline, SIGKILL → the master's reap seen by a worker: instance 0 SIGKILLs another \
         (idle, parked) worker, waits blocked on the victim's pidfd (readable once the process \
         has exited, before it is reaped), then blocked on the master's event log until the \
         victim's Exit event (and checks `live_workers()` no longer lists it)."
    );
    println!();
    println!("| workers | n | p50 | p99 | max | SIGKILL → process exited (pidfd), p50 / p99 | SIGKILL → master's Exit event, p50 / p99 |");
    println!("|---|---|---|---|---|---|---|");
    for r in reap {
        let p = r.seen;
        println!(
            "| {} | {} | {} |",
            first_cells(r.workers, p),
            fmt_pair(r.gone),
            fmt_pair(r.reaped)
        );
    }
}

fn main() {
    if let Ok(mode) = std::env::var(MODE_VAR) {
        cluster_mode(&mode);
    }
    warn_if_busy();
    let mut busy = other_runnable();
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    let full = std::env::args().any(|a| a == "--bench");
    let kills = if full {
        std::env::var("SHMC_BENCH_KILLS")
            .ok()
            .and_then(|k| k.parse().ok())
            .filter(|&k| k > 0)
            .unwrap_or(FULL_KILLS)
    } else {
        QUICK_KILLS
    };
    let (mut consume, mut invoke, mut reap) = (Vec::new(), Vec::new(), Vec::new());
    let mut failed = false;
    let mut report = |what: &str, workers: u32, e: Box<dyn Error>| {
        eprintln!("death bench, {what}, {workers} workers: {e}");
        failed = true;
    };
    for workers in WORKERS {
        match reap_figures(workers, kills) {
            Ok(r) => reap.push(r),
            Err(e) => report("reap", workers, e),
        }
        busy = busy.max(other_runnable());
        match consume_figures(workers, kills) {
            Ok(r) => consume.push(r),
            Err(e) => report("consume", workers, e),
        }
        busy = busy.max(other_runnable());
        match invoke_figures(workers, kills) {
            Ok(r) => invoke.push(r),
            Err(e) => report("invoke", workers, e),
        }
        busy = busy.max(other_runnable());
    }
    print_tables(full, kills, busy, &consume, &invoke, &reap);
    if failed {
        std::process::exit(1);
    }
}
