//! The messenger across real worker processes: each scenario is a fresh,
//! single-threaded process (this binary re-executed with
//! `SHMC_SCENARIO=<name>`) that runs a fork-mode cluster whose workers talk
//! through [`Messenger`]s, and exits 0 only if everything checked held.
//!
//! In every scenario instance 0 is the *coordinator*: it drives the test,
//! collects the other instances' verdicts (the `"verdict"` event) and
//! returns. Its exit ends the cluster: the master's callback shuts down at
//! the first exit that is not an expected SIGKILL, and the scenario process
//! then requires instance 0 to have exited 0, every other worker to have
//! ended by the shutdown (or by the SIGKILL the scenario planned), and the
//! shutdown to be clean. A scenario that hangs is killed by the parent's
//! watchdog, and its workers die with it (`PR_SET_PDEATHSIG`).
//!
//! `harness = false`: the master must fork from a single-threaded process,
//! which libtest's runner is not. Arguments filter scenarios by substring.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shmcluster::{
    CallError, CallKind, Cluster, Event, EventKind, ExitReason, MapError, Messenger, Target, Worker,
    WorkerId, WorkerState,
};

#[macro_use]
mod common;
use common::cluster::{check_exits, err, peer, ready, serve_for, serve_until, wait_ready, worker};
use common::{sigkill, tmp, Check};

/// A scenario: a cluster of `workers` running `body` in each worker.
struct Scenario {
    name: &'static str,
    /// The parent kills the scenario process after this long.
    timeout: Duration,
    workers: u32,
    /// Instances the scenario SIGKILLs (or that kill themselves): their
    /// `Signaled(SIGKILL)` exits are expected and do not end the cluster,
    /// and their successors run `body` again.
    killed: &'static [u32],
    body: fn(Worker) -> Check,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "broadcast_reaches_every_worker_once_in_order",
        timeout: Duration::from_secs(30),
        workers: 4,
        killed: &[],
        body: broadcast_reaches_every_worker_once_in_order,
    },
    Scenario {
        name: "consume_runs_each_task_exactly_once",
        timeout: Duration::from_secs(60),
        workers: 4,
        killed: &[],
        body: consume_runs_each_task_exactly_once,
    },
    Scenario {
        name: "consume_redelivers_after_sigkill_mid_handler",
        timeout: Duration::from_secs(30),
        workers: 3,
        killed: &[1],
        body: consume_redelivers_after_sigkill_mid_handler,
    },
    Scenario {
        name: "consume_ignores_the_killed_workers_successor_ack",
        timeout: Duration::from_secs(30),
        workers: 3,
        killed: &[1],
        body: consume_ignores_the_killed_workers_successor_ack,
    },
    Scenario {
        name: "map_settles_every_worker",
        timeout: Duration::from_secs(30),
        workers: 5,
        killed: &[1],
        body: map_settles_every_worker,
    },
    Scenario {
        name: "request_that_killed_its_worker_is_not_run_again",
        timeout: Duration::from_secs(30),
        workers: 2,
        killed: &[1],
        body: request_that_killed_its_worker_is_not_run_again,
    },
    Scenario {
        name: "request_async_reply_and_dropped_reply",
        timeout: Duration::from_secs(30),
        workers: 2,
        killed: &[],
        body: request_async_reply_and_dropped_reply,
    },
    Scenario {
        name: "messages_queued_before_ready_arrive_in_order",
        timeout: Duration::from_secs(30),
        workers: 2,
        killed: &[],
        body: messages_queued_before_ready_arrive_in_order,
    },
    Scenario {
        name: "decode_failure_and_panicking_handler",
        timeout: Duration::from_secs(30),
        workers: 2,
        killed: &[],
        body: decode_failure_and_panicking_handler,
    },
];

fn main() {
    if let Ok(name) = std::env::var("SHMC_SCENARIO") {
        let s = SCENARIOS.iter().find(|s| s.name == name).expect("known scenario");
        common::exit_scenario(&name, run_cluster(s));
    }
    let scenarios: Vec<_> = SCENARIOS.iter().map(|s| (s.name, s.timeout)).collect();
    let (ran, failed) = common::run_suite("messenger", &scenarios);
    common::finish_suite(ran, &failed);
}

// ------------------------------------------------------------ plumbing

/// The scenario process: runs the cluster, then judges how it ended.
fn run_cluster(s: &'static Scenario) -> Check {
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0);
    ensure!(
        threads == 1,
        "the scenario process must be single-threaded ({threads})"
    );
    let exits: Arc<Mutex<Vec<Event>>> = Arc::default();
    let log = exits.clone();
    let killed = s.killed;
    let report = Cluster::builder()
        .workers(s.workers)
        .shutdown_grace(Duration::from_secs(5))
        .on_event(move |cluster, e| {
            if let EventKind::Exit(reason) = e.kind {
                log.lock().unwrap().push(*e);
                if !(reason == ExitReason::Signaled(libc::SIGKILL) && killed.contains(&e.index)) {
                    cluster.shutdown();
                }
            }
        })
        .run(move |w: Worker| {
            if w.generation() > 1 && !killed.contains(&w.index()) {
                // Respawned after its exit, while the cluster shuts down.
                return serve(w);
            }
            (s.body)(w)
        })
        .map_err(err)?;
    let exits = exits.lock().unwrap();
    check_exits(&exits, |e| killed.contains(&e.index))?;
    for &k in killed {
        ensure!(
            exits
                .iter()
                .any(|e| e.index == k && e.kind == EventKind::Exit(ExitReason::Signaled(libc::SIGKILL))),
            "instance {k} was never SIGKILLed: {exits:?}"
        );
    }
    ensure!(report.clean, "unclean shutdown: {report:?}");
    Ok(())
}

/// A worker that only answers (`NoHandler` to every call) until stopped.
fn serve(w: Worker) -> Check {
    let mut m = Messenger::new(w);
    ready(&m);
    m.run().map_err(err)
}

/// The coordinator's record of the other instances' verdicts ("" for ok).
#[derive(Clone, Default)]
struct Verdicts(Arc<Mutex<BTreeMap<u32, String>>>);

impl Verdicts {
    /// Registers the `"verdict"` handler (before the coordinator's first
    /// dispatch, so no verdict can find it missing).
    fn listen(m: &mut Messenger) -> Result<Self, String> {
        let v = Self::default();
        let record = v.clone();
        m.on::<(u32, String), _>("verdict", move |_, (index, text)| {
            record.0.lock().unwrap().insert(index, text);
        })
        .map_err(err)?;
        Ok(v)
    }

    /// Serves until every instance in `from` has reported; fails if one
    /// reported a failure.
    fn collect(&self, m: &mut Messenger, from: &[u32]) -> Check {
        serve_until(
            m,
            Duration::from_secs(20),
            "the other instances' verdicts",
            |_| from.iter().all(|i| self.0.lock().unwrap().contains_key(i)),
        )?;
        let failed: Vec<String> = self
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, text)| !text.is_empty())
            .map(|(i, text)| format!("instance {i}: {text}"))
            .collect();
        ensure!(failed.is_empty(), "{}", failed.join("; "));
        Ok(())
    }
}

/// A non-coordinator's end: reports `verdict` to instance 0, then serves
/// until the cluster stops.
fn send_verdict(mut m: Messenger, verdict: Check) -> Check {
    let index = worker(&m).index();
    let coordinator = peer(&m, 0).ok_or("no coordinator")?.slot;
    let text = verdict.clone().err().unwrap_or_default();
    m.emit(Target::Worker(coordinator), "verdict", &(index, text))
        .map_err(err)?;
    m.run().map_err(err)?;
    verdict
}

fn append(path: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open for append");
    f.write_all(line.as_bytes()).expect("append");
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn deadline(d: Duration) -> Instant {
    Instant::now() + d
}

// ------------------------------------------------------------ broadcast

/// Every worker broadcasts K numbered messages once all are ready; every
/// worker must get each (sender, seq) exactly once, per sender in order,
/// from every worker including itself.
fn broadcast_reaches_every_worker_once_in_order(w: Worker) -> Check {
    const N: usize = 4;
    const K: u64 = 100;
    let index = w.index();
    let mut m = Messenger::new(w);
    let verdicts = if index == 0 {
        Some(Verdicts::listen(&mut m)?)
    } else {
        None
    };
    let got: Arc<Mutex<BTreeMap<u32, Vec<u64>>>> = Arc::default();
    let record = got.clone();
    m.on::<u64, _>("seq", move |ctx, seq| {
        record
            .lock()
            .unwrap()
            .entry(ctx.sender().slot)
            .or_default()
            .push(seq);
    })
    .map_err(err)?;
    ready(&m);
    let own = (|| {
        wait_ready(&mut m, N)?;
        for seq in 0..K {
            let n = m.broadcast("seq", &seq).map_err(err)?;
            ensure!(n == N, "broadcast {seq} went to {n} workers, not {N}");
        }
        let total = || got.lock().unwrap().values().map(Vec::len).sum::<usize>();
        serve_until(&mut m, Duration::from_secs(10), "every broadcast", |_| {
            total() >= N * K as usize
        })?;
        // Anything arriving now would be a duplicate.
        serve_for(&mut m, Duration::from_millis(100))?;
        let live: BTreeSet<u32> = m.live_workers().iter().map(|p| p.slot).collect();
        let senders: BTreeSet<u32> = got.lock().unwrap().keys().copied().collect();
        ensure!(senders == live, "heard from {senders:?}, live workers {live:?}");
        ensure!(senders.contains(&m.slot()), "its own broadcasts never came back");
        let expected: Vec<u64> = (0..K).collect();
        for (sender, seqs) in got.lock().unwrap().iter() {
            ensure!(
                *seqs == expected,
                "from slot {sender}: {} messages, not 0..{K} once each in order: {seqs:?}",
                seqs.len()
            );
        }
        let stats = m.event_stats().get("seq").copied().unwrap_or_default();
        ensure!(
            stats.received == N as u64 * K && stats.handled == N as u64 * K && stats.sent == N as u64 * K,
            "event_stats: {stats:?}"
        );
        Ok(())
    })();
    match verdicts {
        Some(v) => {
            own?;
            v.collect(&mut m, &[1, 2, 3])
        }
        None => send_verdict(m, own),
    }
}

// ------------------------------------------------------------ consume

/// 4 workers each consume 2,500 tasks with unique ids while serving each
/// other; every id must run exactly once, on the worker `consume`
/// reported, with the delivery id it reported.
fn consume_runs_each_task_exactly_once(w: Worker) -> Check {
    const N: u32 = 4;
    const PER: u64 = 2_500;
    let (index, slot) = (w.index(), w.slot());
    let dir = tmp();
    let mut m = Messenger::new(w);
    let verdicts = if index == 0 {
        Some(Verdicts::listen(&mut m)?)
    } else {
        None
    };
    let handled: Arc<Mutex<Vec<(u64, u64, bool)>>> = Arc::default();
    let record = handled.clone();
    m.on::<u64, _>("task", move |ctx, id| {
        record
            .lock()
            .unwrap()
            .push((id, ctx.delivery_id(), ctx.kind() == CallKind::Consume));
    })
    .map_err(err)?;
    let finished: Arc<Mutex<BTreeSet<u32>>> = Arc::default();
    let f = finished.clone();
    m.on::<u32, _>("consumed", move |_, i| {
        f.lock().unwrap().insert(i);
    })
    .map_err(err)?;
    ready(&m);
    let own = (|| {
        wait_ready(&mut m, N as usize)?;
        let mut calls = String::new();
        for i in 0..PER {
            let id = u64::from(index) * PER + i;
            let r = m
                .consume("task", &id, deadline(Duration::from_secs(10)))
                .map_err(|e| format!("consume {id}: {e}"))?;
            ensure!(r.attempts == 1, "task {id}: {r:?} (no worker died)");
            calls.push_str(&format!("{id} {} {}\n", r.delivery_id, r.worker.slot));
        }
        std::fs::write(dir.join(format!("calls-{index}")), calls).map_err(err)?;
        // Every consume returned only after its handler finished: once all
        // callers are through, every handler has run.
        m.broadcast("consumed", &index).map_err(err)?;
        serve_until(&mut m, Duration::from_secs(30), "every caller done", |_| {
            finished.lock().unwrap().len() == N as usize
        })?;
        let mut lines = String::new();
        for &(id, delivery, consume_kind) in handled.lock().unwrap().iter() {
            ensure!(consume_kind, "task {id} ran with a kind other than Consume");
            lines.push_str(&format!("{id} {delivery} {slot}\n"));
        }
        std::fs::write(dir.join(format!("handled-{index}")), lines).map_err(err)?;
        Ok(())
    })();
    match verdicts {
        Some(v) => {
            own?;
            v.collect(&mut m, &[1, 2, 3])?;
            check_consume_files(&dir, N, PER)
        }
        None => send_verdict(m, own),
    }
}

fn parse3(line: &str) -> Result<(u64, u64, u32), String> {
    let f: Vec<&str> = line.split(' ').collect();
    ensure!(f.len() == 3, "bad line {line:?}");
    Ok((
        f[0].parse().map_err(err)?,
        f[1].parse().map_err(err)?,
        f[2].parse().map_err(err)?,
    ))
}

fn check_consume_files(dir: &Path, n: u32, per: u64) -> Check {
    let total = u64::from(n) * per;
    // id -> every (delivery id, slot) it ran with
    let mut runs: HashMap<u64, Vec<(u64, u32)>> = HashMap::new();
    let mut by_slot: BTreeMap<u32, u64> = BTreeMap::new();
    for i in 0..n {
        for line in read_lines(&dir.join(format!("handled-{i}"))) {
            let (id, delivery, slot) = parse3(&line)?;
            runs.entry(id).or_default().push((delivery, slot));
            *by_slot.entry(slot).or_default() += 1;
        }
    }
    let mut calls: HashMap<u64, (u64, u32)> = HashMap::new();
    let mut matrix: BTreeMap<(u32, u32), u64> = BTreeMap::new();
    for i in 0..n {
        for line in read_lines(&dir.join(format!("calls-{i}"))) {
            let (id, delivery, slot) = parse3(&line)?;
            ensure!(
                calls.insert(id, (delivery, slot)).is_none(),
                "task {id} consumed twice"
            );
            *matrix.entry((i, slot)).or_default() += 1;
        }
    }
    ensure!(
        calls.len() as u64 == total,
        "{} consume calls returned",
        calls.len()
    );
    let deliveries: BTreeSet<u64> = calls.values().map(|c| c.0).collect();
    ensure!(deliveries.len() as u64 == total, "delivery ids are not unique");
    let never: Vec<u64> = (0..total).filter(|id| !runs.contains_key(id)).take(10).collect();
    ensure!(never.is_empty(), "tasks never run (first 10): {never:?}");
    let twice: Vec<(&u64, &Vec<(u64, u32)>)> = runs.iter().filter(|(_, r)| r.len() > 1).take(10).collect();
    ensure!(twice.is_empty(), "tasks run more than once (first 10): {twice:?}");
    ensure!(runs.len() as u64 == total, "{} distinct ids ran", runs.len());
    for (id, (delivery, slot)) in &calls {
        let ran = runs[id][0];
        ensure!(
            ran == (*delivery, *slot),
            "task {id}: consume said delivery {delivery} on slot {slot}, the handler saw {ran:?}"
        );
    }
    println!("    consume distribution, tasks per handling slot: {by_slot:?}");
    println!("    (calling instance, handling slot) -> tasks: {matrix:?}");
    ensure!(
        by_slot.len() == n as usize && by_slot.values().all(|&c| c > 0),
        "some worker never got a task: {by_slot:?}"
    );
    Ok(())
}

// ------------------------------------------------------------ redelivery

/// Instance 1's first generation never finishes a task: it publishes its
/// pid and sleeps, and a thread of the coordinator SIGKILLs it. The
/// coordinator's `consume` must come back `Ok` after a second attempt, run
/// by another worker with the same delivery id; the task may run again
/// only in the killed worker's slot (its successor reads the copy left in
/// the lane, as the README says).
///
/// Here the successor waits 300 ms before it serves, so the caller sees
/// the death before any answer from that slot: the redelivery path alone.
fn consume_redelivers_after_sigkill_mid_handler(w: Worker) -> Check {
    consume_redelivery(w, Duration::from_millis(300))
}

/// As above, but the successor serves at once (about a millisecond after
/// the SIGKILL, within the caller's 5 ms liveness slice): its answer to the
/// copy left in the lane must not be taken for the dead worker's (README:
/// "its acknowledgement is ignored"); the caller must still redeliver.
fn consume_ignores_the_killed_workers_successor_ack(w: Worker) -> Check {
    consume_redelivery(w, Duration::ZERO)
}

fn consume_redelivery(w: Worker, successor_delay: Duration) -> Check {
    let (index, slot, generation) = (w.index(), w.slot(), w.generation());
    if generation > 1 {
        std::thread::sleep(successor_delay);
    }
    let dir = tmp();
    let victim_file = dir.join("victim");
    let mut m = Messenger::new(w);
    let seen = dir.join(format!("seen-{slot}-{generation}"));
    let victim = index == 1 && generation == 1;
    let published = victim_file.clone();
    m.on::<u64, _>("task", move |ctx, task| {
        append(&seen, &format!("{} {task}\n", ctx.delivery_id()));
        if victim {
            // Mid-handler: say who we are, then never finish.
            let part = published.with_extension("part");
            std::fs::write(&part, format!("{} {slot}", std::process::id())).expect("write");
            std::fs::rename(&part, &published).expect("rename");
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    })
    .map_err(err)?;
    ready(&m);
    if index != 0 {
        return m.run().map_err(err);
    }
    let killer = std::thread::spawn(move || -> Result<(u32, u32), String> {
        let until = deadline(Duration::from_secs(15));
        loop {
            if let Ok(text) = std::fs::read_to_string(&victim_file) {
                let mut f = text.split(' ').map(str::parse::<u32>);
                let (Some(Ok(pid)), Some(Ok(slot))) = (f.next(), f.next()) else {
                    return Err(format!("bad victim file {text:?}"));
                };
                // Let it sit in the handler a little.
                std::thread::sleep(Duration::from_millis(100));
                sigkill(pid);
                return Ok((pid, slot));
            }
            ensure!(Instant::now() < until, "the victim never published its pid");
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    wait_ready(&mut m, 3)?;
    let victim_peer = peer(&m, 1).ok_or("no instance 1")?;
    // A caller sticks to one free worker (itself, here) for 256 tasks in
    // a row before the work moves on: the victim's turn comes within a
    // few such streaks.
    for task in 0..1_000u64 {
        let started = Instant::now();
        let r = m
            .consume("task", &task, started + Duration::from_secs(10))
            .map_err(|e| format!("task {task}: {e}"))?;
        let took = started.elapsed();
        if r.attempts == 1 {
            ensure!(
                r.worker.slot != victim_peer.slot,
                "consume of task {task} returned {r:?} after {took:?}: Ok from {:?}, the worker that was \
                 SIGKILLed mid-handler, on the first attempt (no redelivery); the handlers that saw it: {:?}",
                r.worker,
                seen_by(&dir, r.delivery_id, task)?
            );
            continue;
        }
        let (pid, vslot) = killer.join().map_err(|_| "killer thread panicked")??;
        ensure!(
            pid == victim_peer.pid && vslot == victim_peer.slot,
            "killed pid {pid} slot {vslot}, instance 1 is {victim_peer:?}"
        );
        let first = WorkerId::local(vslot, 1);
        ensure!(r.attempts == 2, "task {task}: {r:?}");
        ensure!(
            r.worker != first,
            "task {task} finished by the killed worker: {r:?}"
        );
        ensure!(took < Duration::from_secs(5), "redelivery took {took:?}");
        let has = |slot: u32, generation: u32| {
            read_lines(&dir.join(format!("seen-{slot}-{generation}")))
                .iter()
                .any(|l| l == &format!("{} {task}", r.delivery_id))
        };
        ensure!(has(vslot, 1), "the victim never saw delivery {}", r.delivery_id);
        ensure!(
            has(r.worker.slot, r.worker.generation),
            "{:?} finished task {task} but did not see delivery {}",
            r.worker,
            r.delivery_id
        );
        // Let the victim's successor come up and serve a while; then the
        // task has run on the victim, on the finisher, and at most in the
        // victim's slot again (the lane's copy), nowhere else.
        serve_until(
            &mut m,
            Duration::from_secs(5),
            "the victim's successor ready",
            |m| {
                worker(m)
                    .peers()
                    .iter()
                    .any(|p| p.slot == vslot && p.generation >= 2 && p.state == WorkerState::Ready)
            },
        )?;
        serve_for(&mut m, Duration::from_millis(300))?;
        let runs = seen_by(&dir, r.delivery_id, task)?;
        let finisher = (r.worker.slot, r.worker.generation);
        let count = |id: (u32, u32)| runs.iter().filter(|&&run| run == id).count();
        let elsewhere = runs.iter().any(|&run| run.0 != vslot && run != finisher);
        ensure!(
            count((vslot, 1)) == 1
                && count(finisher) >= 1
                && (finisher.0 == vslot || count(finisher) == 1)
                && !elsewhere,
            "delivery {} of task {task} ran on (slot, generation) {runs:?}; finished by {:?}",
            r.delivery_id,
            r.worker
        );
        println!(
            "    task {task} (delivery {}) ran on (slot, generation) {runs:?}",
            r.delivery_id
        );
        return Ok(());
    }
    Err("the victim was never chosen in 1000 consumes".into())
}

/// Every (slot, generation) whose handler saw `delivery` of `task`.
fn seen_by(dir: &Path, delivery: u64, task: u64) -> Result<Vec<(u32, u32)>, String> {
    let want = format!("{delivery} {task}");
    let mut runs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("seen-") else {
            continue;
        };
        let (slot, generation) = rest.split_once('-').ok_or(format!("bad file {name}"))?;
        let id = (slot.parse().map_err(err)?, generation.parse().map_err(err)?);
        for line in read_lines(&entry.path()) {
            if line == want {
                runs.push(id);
            }
        }
    }
    runs.sort();
    Ok(runs)
}

// ------------------------------------------------------------ map

/// 5 workers: instance 0 (the caller) answers, 1 SIGKILLs itself in its
/// handler, 2 has no handler, 3 sleeps past the deadline on "slow", 4
/// answers. Without the sleeper the map settles well before its deadline
/// (WorkerDied and NoHandler are known at once); with it, at the deadline.
///
/// Instance 1's generation g kills itself on the value `6 + g` (7 for the
/// first map, 8 for the second) and answers any other: its successor may
/// read the copy of the request left in the lane (see
/// `request_that_killed_its_worker_is_not_run_again`), and must survive it
/// for the second map. Successors wait 300 ms before serving, so that the
/// caller sees each death before anything from the successor.
fn map_settles_every_worker(w: Worker) -> Check {
    let (index, generation) = (w.index(), w.generation());
    if generation > 1 {
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut m = Messenger::new(w);
    for event in ["quick", "slow"] {
        match index {
            1 => {
                m.on_request::<u64, u64, String, _>(event, move |_, v| {
                    if v == 6 + u64::from(generation) {
                        // SAFETY: getpid(2) and kill(2) take no pointers.
                        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                        loop {
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                    Ok(v * 10 + 1)
                })
                .map_err(err)?;
            }
            2 => {}
            _ => {
                m.on_request::<u64, u64, String, _>(event, move |_, v| {
                    if index == 3 && event == "slow" {
                        std::thread::sleep(Duration::from_secs(2));
                    }
                    Ok(v * 10 + u64::from(index))
                })
                .map_err(err)?;
            }
        }
    }
    ready(&m);
    if index != 0 {
        return m.run().map_err(err);
    }
    wait_ready(&mut m, 5)?;
    let index_of: HashMap<u32, u32> = worker(&m)
        .peers()
        .iter()
        .filter_map(|p| Some((p.slot, p.index?)))
        .collect();
    let vslot = peer(&m, 1).ok_or("no instance 1")?.slot;
    let check =
        |what: &str, entries: &[(WorkerId, Result<u64, MapError>)], expect: [Result<u64, MapError>; 5]| {
            let slots: Vec<u32> = entries.iter().map(|(id, _)| id.slot).collect();
            let mut sorted = slots.clone();
            sorted.sort();
            sorted.dedup();
            ensure!(
                slots.len() == 5 && slots == sorted,
                "{what}: entries not one per worker in slot order: {entries:?}"
            );
            for (id, got) in entries {
                let i = *index_of
                    .get(&id.slot)
                    .ok_or(format!("{what}: unknown slot {}", id.slot))?;
                ensure!(
                    *got == expect[i as usize],
                    "{what}: instance {i} ({id:?}) gave {got:?}, expected {:?}",
                    expect[i as usize]
                );
            }
            Ok(())
        };

    let limit = Duration::from_secs(2);
    let started = Instant::now();
    let entries = m.map::<u64, u64>("quick", &7, started + limit).map_err(err)?;
    let took = started.elapsed();
    check(
        "map without the sleeper",
        &entries,
        [
            Ok(70),
            Err(MapError::WorkerDied),
            Err(MapError::NoHandler),
            Ok(73),
            Ok(74),
        ],
    )?;
    ensure!(
        took < limit / 2,
        "map without the sleeper took {took:?} (deadline {limit:?}): WorkerDied/NoHandler not settled at once"
    );

    // The second map needs the victim's successor up.
    serve_until(
        &mut m,
        Duration::from_secs(5),
        "the victim's successor ready",
        |m| {
            worker(m)
                .peers()
                .iter()
                .any(|p| p.slot == vslot && p.generation == 2 && p.state == WorkerState::Ready)
        },
    )?;

    let limit = Duration::from_secs(1);
    let started = Instant::now();
    let entries = m.map::<u64, u64>("slow", &8, started + limit).map_err(err)?;
    let took = started.elapsed();
    check(
        "map with the sleeper",
        &entries,
        [
            Ok(80),
            Err(MapError::WorkerDied),
            Err(MapError::NoHandler),
            Err(MapError::TimedOut),
            Ok(84),
        ],
    )?;
    let victim = entries.iter().find(|(id, _)| id.slot == vslot).map(|(id, _)| *id);
    ensure!(
        victim.is_some_and(|id| id.generation == 2),
        "second map's victim entry {victim:?}"
    );
    ensure!(
        took >= limit && took < limit + Duration::from_millis(500),
        "map with the sleeper took {took:?}, deadline {limit:?}"
    );
    Ok(())
}

// ------------------------------------------------------------ poison request

/// Instance 1's handler SIGKILLs its own process. The caller gets
/// `WorkerDied`; the successor in that slot must not run the request again
/// (the caller has been told it died; nobody waits for an answer), and so
/// must not die of it in turn, generation after generation.
fn request_that_killed_its_worker_is_not_run_again(w: Worker) -> Check {
    let (index, generation) = (w.index(), w.generation());
    let calls = tmp().join("poison-calls");
    let mut m = Messenger::new(w);
    if index != 0 {
        m.on_request::<u64, u64, String, _>("poison", move |_, _| {
            append(&calls, &format!("{generation}\n"));
            // SAFETY: getpid(2) and kill(2) take no pointers.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        })
        .map_err(err)?;
        ready(&m);
        return m.run().map_err(err);
    }
    ready(&m);
    wait_ready(&mut m, 2)?;
    let to = peer(&m, 1).ok_or("no instance 1")?.slot;
    let started = Instant::now();
    let r = m.request::<u64, u64>(to, "poison", &1, deadline(Duration::from_secs(5)));
    let took = started.elapsed();
    ensure!(r == Err(CallError::WorkerDied), "poison request: {r:?}");
    ensure!(took < Duration::from_secs(1), "WorkerDied after {took:?}");
    // Give the successor time to come up and read its lanes.
    let _ = serve_until(&mut m, Duration::from_secs(3), "the successor ready", |m| {
        peer(m, 1).is_some_and(|p| p.generation >= 2 && p.state == WorkerState::Ready)
    });
    serve_for(&mut m, Duration::from_millis(500))?;
    let runs = read_lines(&calls);
    let now = worker(&m).peers()[to as usize];
    ensure!(
        runs == ["1"],
        "the poison request ran in generations {runs:?} of slot {to}: each successor re-ran the request \
         its predecessor died in (slot now {now:?})"
    );
    ensure!(
        now.generation == 2 && now.state == WorkerState::Ready,
        "slot {to} is {now:?}"
    );
    Ok(())
}

// ------------------------------------------------------------ async reply

/// Instance 1 keeps the `Reply` and answers from another thread 50 ms
/// later; a `Reply` dropped (at once, or later on another thread) answers
/// `HandlerFailed`; one sent with `Err` carries its text.
fn request_async_reply_and_dropped_reply(w: Worker) -> Check {
    let index = w.index();
    let mut m = Messenger::new(w);
    if index != 0 {
        m.on_request_async::<u64, u64, _>("later", |_, v, reply| {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                reply.send(Ok(v + 1));
            });
        })
        .map_err(err)?;
        m.on_request_async::<u64, u64, _>("dropped", |_, _, reply| drop(reply))
            .map_err(err)?;
        m.on_request_async::<u64, u64, _>("dropped_later", |_, _, reply| {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                drop(reply);
            });
        })
        .map_err(err)?;
        m.on_request_async::<u64, u64, _>("refused", |_, v, reply| {
            std::thread::spawn(move || reply.send(Err(format!("refused {v}"))));
        })
        .map_err(err)?;
        ready(&m);
        return m.run().map_err(err);
    }
    ready(&m);
    wait_ready(&mut m, 2)?;
    let to = peer(&m, 1).ok_or("no instance 1")?.slot;
    for v in [41u64, 99, 0] {
        let started = Instant::now();
        let r = m.request::<u64, u64>(to, "later", &v, deadline(Duration::from_secs(5)));
        let took = started.elapsed();
        ensure!(r == Ok(v + 1), "later({v}): {r:?}");
        ensure!(
            took >= Duration::from_millis(50) && took < Duration::from_secs(1),
            "later({v}) answered after {took:?}, the reply thread waits 50 ms"
        );
    }
    for event in ["dropped", "dropped_later"] {
        let started = Instant::now();
        let r = m.request::<u64, u64>(to, event, &1, deadline(Duration::from_secs(5)));
        let took = started.elapsed();
        ensure!(
            matches!(&r, Err(CallError::HandlerFailed(e)) if e.contains("reply dropped")),
            "{event}: {r:?}"
        );
        ensure!(took < Duration::from_secs(1), "{event} answered after {took:?}");
    }
    let r = m.request::<u64, u64>(to, "refused", &7, deadline(Duration::from_secs(5)));
    ensure!(
        r == Err(CallError::HandlerFailed("refused 7".into())),
        "refused: {r:?}"
    );
    Ok(())
}

// ------------------------------------------------------------ before ready

/// Instance 0 sends 100 messages (50 emits of "queued", then 50 plain
/// sends) to instance 1 while it is still Starting; instance 1 makes its
/// messenger 300 ms later, then gets them all, in order.
fn messages_queued_before_ready_arrive_in_order(w: Worker) -> Check {
    const HALF: u64 = 50;
    if w.index() != 0 {
        std::thread::sleep(Duration::from_millis(300));
        let mut m = Messenger::new(w);
        let got: Arc<Mutex<Vec<(String, u64, u32)>>> = Arc::default();
        for event in ["queued", "message"] {
            let g = got.clone();
            m.on::<u64, _>(event, move |ctx, seq| {
                g.lock()
                    .unwrap()
                    .push((ctx.event().to_owned(), seq, ctx.sender().slot));
            })
            .map_err(err)?;
        }
        ready(&m);
        let own = (|| {
            serve_until(&mut m, Duration::from_secs(5), "100 messages", |_| {
                got.lock().unwrap().len() >= 2 * HALF as usize
            })?;
            serve_for(&mut m, Duration::from_millis(100))?;
            let from = peer(&m, 0).ok_or("no instance 0")?.slot;
            let expect: Vec<(String, u64, u32)> = (0..2 * HALF)
                .map(|s| {
                    let event = if s < HALF { "queued" } else { "message" };
                    (event.to_owned(), s, from)
                })
                .collect();
            ensure!(*got.lock().unwrap() == expect, "got {:?}", got.lock().unwrap());
            Ok(())
        })();
        return send_verdict(m, own);
    }
    let mut m = Messenger::new(w);
    let verdicts = Verdicts::listen(&mut m)?;
    ready(&m);
    serve_until(&mut m, Duration::from_secs(5), "instance 1 starting", |m| {
        peer(m, 1).is_some()
    })?;
    let target = peer(&m, 1).ok_or("no instance 1")?;
    ensure!(
        target.state == WorkerState::Starting,
        "instance 1 already {:?}",
        target.state
    );
    let to = Target::Worker(target.slot);
    for seq in 0..HALF {
        let n = m.emit(to, "queued", &seq).map_err(err)?;
        ensure!(n == 1, "emit went to {n} workers");
    }
    for seq in HALF..2 * HALF {
        let n = m.to(to).send(&seq).map_err(err)?;
        ensure!(n == 1, "send went to {n} workers");
    }
    let state = peer(&m, 1).map(|p| p.state);
    ensure!(
        state == Some(WorkerState::Starting),
        "instance 1 was {state:?} when the last message was sent: not a test of queueing before ready"
    );
    verdicts.collect(&mut m, &[1])
}

// ------------------------------------------------------------ failures

/// A payload that does not decode as the handler's type answers
/// `HandlerFailed` (a decode message) without calling the handler; a
/// panicking handler answers `HandlerFailed` and the worker serves the next
/// request; `event_stats` counts both.
fn decode_failure_and_panicking_handler(w: Worker) -> Check {
    if w.index() != 0 {
        let mut m = Messenger::new(w);
        let typed_runs = Arc::new(AtomicU32::new(0));
        let runs = typed_runs.clone();
        m.on_request::<String, u64, String, _>("typed", move |_, s| {
            runs.fetch_add(1, Ordering::Relaxed);
            Ok(s.len() as u64)
        })
        .map_err(err)?;
        m.on_request::<u64, u64, String, _>("panicky", |_, v| {
            if v % 2 == 1 {
                panic!("boom on {v}");
            }
            Ok(v * 2)
        })
        .map_err(err)?;
        let finish = Arc::new(AtomicBool::new(false));
        let f = finish.clone();
        m.on::<(), _>("finish", move |_, ()| f.store(true, Ordering::Relaxed))
            .map_err(err)?;
        std::panic::set_hook(Box::new(|info| {
            eprintln!("    (expected panic in a handler: {info})")
        }));
        ready(&m);
        let own = (|| {
            serve_until(&mut m, Duration::from_secs(10), "the finish event", |_| {
                finish.load(Ordering::Relaxed)
            })?;
            ensure!(
                typed_runs.load(Ordering::Relaxed) == 1,
                "typed handler ran {} times",
                typed_runs.load(Ordering::Relaxed)
            );
            let stats = m.event_stats();
            let typed = stats.get("typed").copied().unwrap_or_default();
            ensure!(
                typed.received == 2
                    && typed.decode_failures == 1
                    && typed.handled == 1
                    && typed.failures == 0,
                "typed: {typed:?}"
            );
            let panicky = stats.get("panicky").copied().unwrap_or_default();
            ensure!(
                panicky.received == 4
                    && panicky.failures == 2
                    && panicky.handled == 2
                    && panicky.decode_failures == 0,
                "panicky: {panicky:?}"
            );
            Ok(())
        })();
        return send_verdict(m, own);
    }
    let mut m = Messenger::new(w);
    let verdicts = Verdicts::listen(&mut m)?;
    ready(&m);
    wait_ready(&mut m, 2)?;
    let to = peer(&m, 1).ok_or("no instance 1")?.slot;
    let soon = || deadline(Duration::from_secs(5));
    // Postcard bytes of a Vec<u8> that is not UTF-8: not a String.
    let r = m.request::<Vec<u8>, u64>(to, "typed", &vec![0xff, 0xfe], soon());
    ensure!(
        matches!(&r, Err(CallError::HandlerFailed(e)) if e.contains("decode")),
        "undecodable payload: {r:?}"
    );
    let r = m.request::<str, u64>(to, "typed", "hello", soon());
    ensure!(r == Ok(5), "typed(hello): {r:?}");
    for v in 1..=4u64 {
        let r = m.request::<u64, u64>(to, "panicky", &v, soon());
        if v % 2 == 1 {
            ensure!(
                matches!(&r, Err(CallError::HandlerFailed(e)) if e.contains(&format!("boom on {v}"))),
                "panicky({v}): {r:?}"
            );
        } else {
            ensure!(r == Ok(v * 2), "panicky({v}) after a panic: {r:?}");
        }
    }
    let stats = m.event_stats();
    let sent = |e: &str| stats.get(e).map_or(0, |s| s.sent);
    ensure!(
        sent("typed") == 2 && sent("panicky") == 4,
        "caller's event_stats: {stats:?}"
    );
    m.emit(Target::Worker(to), "finish", &()).map_err(err)?;
    verdicts.collect(&mut m, &[1])
}
