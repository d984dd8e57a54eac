//! Leader election, invoke and subscribe/publish across real worker
//! processes: each scenario is a fresh, single-threaded process (this
//! binary re-executed with `SHMC_SCENARIO=<name>`) that runs a fork-mode
//! cluster (or, for the standalone scenario, one [`Messenger`] alone), and
//! exits 0 only if everything checked held.
//!
//! In every cluster scenario instance 0 is the *coordinator*: it drives the
//! test and returns; its exit ends the cluster (the master's callback shuts
//! down at the first exit that is not a planned SIGKILL). A SIGKILL is
//! planned when the coordinator wrote the victim's pid to the scenario's
//! `killed` file before sending it, so scenarios may kill whichever worker
//! leads at the time. The scenario process then requires instance 0 to
//! have exited 0, every other worker to have ended by the shutdown or by a
//! planned SIGKILL, and the shutdown to be clean. A scenario that hangs is
//! killed by the parent's watchdog, and its workers die with it.
//!
//! Times that cross processes are `CLOCK_MONOTONIC` nanoseconds
//! ([`mono_ns`]), one clock for every process of the machine.
//!
//! `harness = false`: the master must fork from a single-threaded process.
//! Arguments filter scenarios by substring; `--list` lists them.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shmcluster::{CallError, Cluster, Event, EventKind, ExitReason, Leader, Messenger, Peer, Worker};
use shmcluster::{Target, WorkerState};

#[macro_use]
mod common;
use common::cluster::{check_exits, err, peer, ready, serve_for, serve_until, wait_ready, worker};
use common::{sigkill, tmp, Check};

/// What a scenario runs.
enum Body {
    /// A fork-mode cluster of this many workers, each running the function.
    Cluster(u32, fn(Worker) -> Check),
    /// The function alone in the scenario process (no master).
    Alone(fn() -> Check),
}

struct Scenario {
    name: &'static str,
    /// The parent kills the scenario process after this long.
    timeout: Duration,
    body: Body,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "exactly_one_leader_among_four_candidates",
        timeout: Duration::from_secs(30),
        body: Body::Cluster(4, exactly_one_leader_among_four_candidates),
    },
    Scenario {
        name: "reelection_within_50ms_of_leader_sigkill",
        timeout: Duration::from_secs(30),
        body: Body::Cluster(4, reelection_within_50ms_of_leader_sigkill),
    },
    Scenario {
        name: "invokes_in_flight_when_the_leader_is_sigkilled",
        timeout: Duration::from_secs(40),
        body: Body::Cluster(4, invokes_in_flight_when_the_leader_is_sigkilled),
    },
    Scenario {
        name: "publish_reaches_every_subscriber_across_a_leader_sigkill",
        timeout: Duration::from_secs(30),
        body: Body::Cluster(4, publish_reaches_every_subscriber_across_a_leader_sigkill),
    },
    Scenario {
        name: "invoke_is_no_leader_then_no_handler",
        timeout: Duration::from_secs(30),
        body: Body::Cluster(2, invoke_is_no_leader_then_no_handler),
    },
    Scenario {
        name: "standalone_worker_leads_and_serves_itself",
        timeout: Duration::from_secs(30),
        body: Body::Alone(standalone_worker_leads_and_serves_itself),
    },
    Scenario {
        name: "followers_parked_in_poll_see_the_new_leader_at_once",
        timeout: Duration::from_secs(40),
        body: Body::Cluster(4, followers_parked_in_poll_see_the_new_leader_at_once),
    },
    Scenario {
        name: "leader_read_during_reelection_never_names_the_dead_slot",
        timeout: Duration::from_secs(90),
        body: Body::Cluster(4, leader_read_during_reelection_never_names_the_dead_slot),
    },
    Scenario {
        name: "on_leader_change_fires_without_campaigning",
        timeout: Duration::from_secs(30),
        body: Body::Cluster(2, on_leader_change_fires_without_campaigning),
    },
    Scenario {
        name: "late_subscriber_gets_the_last_value_once",
        timeout: Duration::from_secs(30),
        body: Body::Cluster(2, late_subscriber_gets_the_last_value_once),
    },
];

fn main() {
    if let Ok(name) = std::env::var("SHMC_SCENARIO") {
        let s = SCENARIOS.iter().find(|s| s.name == name).expect("known scenario");
        let result = match s.body {
            Body::Cluster(workers, body) => run_cluster(workers, body),
            Body::Alone(body) => body(),
        };
        common::exit_scenario(&name, result);
    }
    let scenarios: Vec<_> = SCENARIOS.iter().map(|s| (s.name, s.timeout)).collect();
    let (ran, failed) = common::run_suite("leader", &scenarios);
    common::finish_suite(ran, &failed);
}

// ------------------------------------------------------------ plumbing

/// The pids the coordinator SIGKILLed on purpose (the `killed` file).
fn planned_kills() -> Vec<u32> {
    read_lines(&tmp().join("killed"))
        .iter()
        .filter_map(|l| l.parse().ok())
        .collect()
}

/// SIGKILLs `pid` after recording it as planned; returns the
/// `CLOCK_MONOTONIC` time just before the signal.
fn kill_worker(pid: u32) -> u64 {
    append(&tmp().join("killed"), &format!("{pid}\n"));
    let at = mono_ns();
    sigkill(pid);
    at
}

/// The scenario process: runs the cluster, then judges how it ended.
fn run_cluster(workers: u32, body: fn(Worker) -> Check) -> Check {
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0);
    ensure!(
        threads == 1,
        "the scenario process must be single-threaded ({threads})"
    );
    let exits: Arc<Mutex<Vec<Event>>> = Arc::default();
    let log = exits.clone();
    let report = Cluster::builder()
        .workers(workers)
        .shutdown_grace(Duration::from_secs(10))
        // Scenarios kill one leader after another: respawn at once.
        .restart_backoff(Duration::from_millis(1), Duration::from_millis(10))
        .crash_loop_limit(1_000, Duration::from_secs(60))
        .on_event(move |cluster, e| {
            if let EventKind::Exit(reason) = e.kind {
                log.lock().unwrap().push(*e);
                let planned =
                    reason == ExitReason::Signaled(libc::SIGKILL) && planned_kills().contains(&e.pid);
                if !planned {
                    cluster.shutdown();
                }
            }
        })
        .run(body)
        .map_err(err)?;
    let exits = exits.lock().unwrap();
    let planned = planned_kills();
    check_exits(&exits, |e| planned.contains(&e.pid))?;
    for pid in &planned {
        ensure!(
            exits
                .iter()
                .any(|e| e.pid == *pid && e.kind == EventKind::Exit(ExitReason::Signaled(libc::SIGKILL))),
            "pid {pid} was to be SIGKILLed but exited otherwise: {exits:?}"
        );
    }
    ensure!(report.clean, "unclean shutdown: {report:?}");
    Ok(())
}

/// `CLOCK_MONOTONIC` in nanoseconds: comparable across the processes.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes one timespec to the pointer, which
    // points to a live local.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// The live worker in `slot`.
fn peer_in(m: &Messenger, slot: u32) -> Option<Peer> {
    worker(m).peers().into_iter().find(|p| p.slot == slot)
}

/// A killed leader's respawn waits this long before it campaigns, so that
/// its `campaign` (which takes the free lock for an instant to name it:
/// see the report of `reelection_within_50ms_of_leader_sigkill`) cannot
/// race the waiting candidates for the lock the dead leader left.
const RESPAWN_PAUSE: Duration = Duration::from_millis(300);

/// Serves until the cluster stops (a worker whose part is done).
fn serve(mut m: Messenger) -> Check {
    m.run().map_err(err)
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

/// One `on_leader_change` call as a worker logged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Change {
    at_ns: u64,
    leader: Leader,
    is_me: bool,
}

/// Logs every leader change of `m` to `changes-<index>-<generation>`.
fn log_changes(m: &mut Messenger, dir: &Path) {
    let w = worker(m);
    let log = dir.join(format!("changes-{}-{}", w.index(), w.generation()));
    m.on_leader_change(move |c| {
        append(
            &log,
            &format!("{} {} {} {}\n", mono_ns(), c.leader.slot, c.leader.term, c.is_me),
        );
    });
}

fn changes(dir: &Path, index: u32, generation: u32) -> Vec<Change> {
    read_lines(&dir.join(format!("changes-{index}-{generation}")))
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Some(Change {
                at_ns: f.first()?.parse().ok()?,
                leader: Leader {
                    slot: f.get(1)?.parse().ok()?,
                    term: f.get(2)?.parse().ok()?,
                },
                is_me: f.get(3)?.parse().ok()?,
            })
        })
        .collect()
}

/// Spins (reading the lock table, no dispatch) until the leader's term is
/// above `old`'s; returns the new leader and when it was seen.
fn spin_for_new_leader(m: &Messenger, old: Leader, limit: Duration) -> Result<(Leader, u64), String> {
    let until = Instant::now() + limit;
    loop {
        if let Some(l) = m.leader().filter(|l| l.term > old.term) {
            return Ok((l, mono_ns()));
        }
        ensure!(Instant::now() < until, "no leader after {old:?} within {limit:?}");
        std::hint::spin_loop();
    }
}

/// Waits (serving) until a leader is elected and returns it.
fn await_leader(m: &mut Messenger) -> Result<Leader, String> {
    serve_until(m, Duration::from_secs(10), "a leader", |m| m.leader().is_some())?;
    m.leader().ok_or_else(|| "the leader vanished".into())
}

/// Waits (serving) until `path` exists.
fn await_file(m: &mut Messenger, path: &Path) -> Check {
    serve_until(m, Duration::from_secs(10), &path.display().to_string(), |_| {
        path.exists()
    })
}

// ------------------------------------------------------------ 1: one leader

/// What each worker says about the election (the `"report"` event).
type Report = (u32, Option<(u32, u64)>, bool, Option<(u32, u64, bool)>);

/// All 4 campaign at once; once all are ready and settled, every worker
/// reports `leader()`, `is_leader()` and its last `on_leader_change`: one
/// slot and term for all, exactly one `is_leader()` (that slot), and every
/// worker's last change names that leader, `is_me` only on it.
fn exactly_one_leader_among_four_candidates(w: Worker) -> Check {
    const N: u32 = 4;
    let (index, slot) = (w.index(), w.slot());
    let mut m = Messenger::new(w);
    let reports: Arc<Mutex<BTreeMap<u32, Report>>> = Arc::default();
    if index == 0 {
        let r = reports.clone();
        m.on::<Report, _>("report", move |_, rep| {
            r.lock().unwrap().insert(rep.0, rep);
        })
        .map_err(err)?;
    }
    let last: Arc<Mutex<Option<(u32, u64, bool)>>> = Arc::default();
    let l = last.clone();
    m.on_leader_change(move |c| *l.lock().unwrap() = Some((c.leader.slot, c.leader.term, c.is_me)));
    m.campaign().map_err(err)?;
    ready(&m);
    wait_ready(&mut m, N as usize)?;
    serve_for(&mut m, Duration::from_millis(300))?;
    let mine: Report = (
        slot,
        m.leader().map(|l| (l.slot, l.term)),
        m.is_leader(),
        *last.lock().unwrap(),
    );
    if index != 0 {
        let to = peer(&m, 0).ok_or("no coordinator")?.slot;
        m.emit(Target::Worker(to), "report", &mine).map_err(err)?;
        return serve(m);
    }
    reports.lock().unwrap().insert(slot, mine);
    serve_until(&mut m, Duration::from_secs(10), "every report", |_| {
        reports.lock().unwrap().len() == N as usize
    })?;
    let reports = reports.lock().unwrap();
    println!("    (slot, leader(), is_leader(), last change) per worker: {reports:?}");
    let leader = reports.values().next().and_then(|r| r.1).ok_or("no leader")?;
    for (s, leader_seen, is_leader, change) in reports.values() {
        ensure!(
            *leader_seen == Some(leader),
            "slot {s} sees leader {leader_seen:?}, another {leader:?}"
        );
        ensure!(
            *is_leader == (*s == leader.0),
            "slot {s} says is_leader() == {is_leader}; the leader is slot {}",
            leader.0
        );
        ensure!(
            *change == Some((leader.0, leader.1, *s == leader.0)),
            "slot {s}'s last on_leader_change was {change:?}, the leader is {leader:?}"
        );
    }
    let leaders = reports.values().filter(|r| r.2).count();
    ensure!(leaders == 1, "{leaders} workers say is_leader()");
    Ok(())
}

// ------------------------------------------------------------ 2: re-election

/// Instance 1 campaigns first and leads; 2 and 3 campaign once it does;
/// the coordinator (0, not a candidate) SIGKILLs the leader and spins on
/// `leader()`: a new leader (2 or 3) with a larger term within 50 ms of the
/// SIGKILL. Every follower's `on_leader_change` fires with it (the times
/// are printed); the killed leader's respawn campaigns but never leads
/// while the new leader lives.
fn reelection_within_50ms_of_leader_sigkill(w: Worker) -> Check {
    reelection(w, false)
}

/// As above, but followers (2 and 3) wait in one long `poll(2 s)` at a
/// time: the new leader "rings every worker's doorbell, so followers notice
/// the new term at once" (module docs): each follower's `on_leader_change`
/// must fire within 50 ms of the SIGKILL, not when its poll times out.
fn followers_parked_in_poll_see_the_new_leader_at_once(w: Worker) -> Check {
    reelection(w, true)
}

fn reelection(w: Worker, parked: bool) -> Check {
    let (index, generation) = (w.index(), w.generation());
    let dir = tmp();
    let mut m = Messenger::new(w);
    log_changes(&mut m, &dir);
    if generation > 1 {
        // The killed leader's successor: a candidate that must not lead.
        std::thread::sleep(RESPAWN_PAUSE);
        m.campaign().map_err(err)?;
        ready(&m);
        let led = dir.join(format!("led-{index}-{generation}"));
        while !worker(&m).should_stop() {
            m.poll(Duration::from_millis(2)).map_err(err)?;
            if m.is_leader() {
                append(&led, &format!("{}\n", mono_ns()));
            }
        }
        return Ok(());
    }
    if index == 1 {
        m.campaign().map_err(err)?;
    }
    ready(&m);
    if index != 0 {
        await_leader(&mut m)?;
        if index != 1 {
            m.campaign().map_err(err)?;
            append(&dir.join(format!("campaigned-{index}")), "\n");
        }
        if !parked {
            return serve(m);
        }
        while !worker(&m).should_stop() {
            m.poll(Duration::from_secs(2)).map_err(err)?;
        }
        return Ok(());
    }
    wait_ready(&mut m, 4)?;
    await_file(&mut m, &dir.join("campaigned-2"))?;
    await_file(&mut m, &dir.join("campaigned-3"))?;
    let old = await_leader(&mut m)?;
    let victim = peer_in(&m, old.slot).ok_or("no worker in the leader's slot")?;
    ensure!(
        victim.index == Some(1),
        "the first leader is {victim:?}, not instance 1"
    );
    let (s2, s3) = (
        peer(&m, 2).ok_or("no instance 2")?.slot,
        peer(&m, 3).ok_or("no instance 3")?.slot,
    );
    // Let the followers see the first leader (and park, if they do).
    serve_for(&mut m, Duration::from_millis(300))?;
    let killed_at = kill_worker(victim.pid);
    let (first_read, seen_at) = spin_for_new_leader(&m, old, Duration::from_secs(5))?;
    let elected = seen_at - killed_at;
    // The first read may name the dead slot (see
    // leader_read_during_reelection_never_names_the_dead_slot): judge the
    // holder on a settled read.
    std::thread::sleep(Duration::from_millis(2));
    let new = m.leader().ok_or("no leader after the re-election")?;
    ensure!(new.term == first_read.term, "term {first_read:?} then {new:?}");
    println!(
        "    leader {old:?} SIGKILLed; {new:?} seen by a spinning observer {:.3} ms later",
        ms(elected)
    );
    ensure!(
        new.term > old.term,
        "new term {} not above {}",
        new.term,
        old.term
    );
    ensure!(
        new.slot == s2 || new.slot == s3,
        "new leader in slot {}, not a live candidate (slots {s2}, {s3})",
        new.slot
    );
    ensure!(
        elected < 50_000_000,
        "re-election took {:.3} ms (over 50 ms)",
        ms(elected)
    );
    // Each follower's callback with the new leader.
    let bound: u64 = if parked { 50_000_000 } else { 250_000_000 };
    let mut seen = BTreeMap::new();
    let waited = serve_until(
        &mut m,
        Duration::from_secs(5),
        "followers' on_leader_change",
        |_| {
            for i in [2, 3] {
                if let Some(c) = changes(&dir, i, 1)
                    .into_iter()
                    .find(|c| c.leader.term >= new.term)
                {
                    seen.insert(i, c);
                }
            }
            seen.len() == 2
        },
    );
    for (i, c) in &seen {
        println!(
            "    instance {i}: on_leader_change({:?}, is_me {}) {:.3} ms after the SIGKILL",
            c.leader,
            c.is_me,
            ms(c.at_ns.saturating_sub(killed_at))
        );
    }
    waited?;
    for (i, c) in &seen {
        let slot = if *i == 2 { s2 } else { s3 };
        ensure!(
            c.leader == new && c.is_me == (slot == new.slot),
            "instance {i}'s on_leader_change: {c:?}; the new leader is {new:?}"
        );
        let after = c.at_ns.saturating_sub(killed_at);
        ensure!(
            after < bound,
            "instance {i}'s on_leader_change fired {:.3} ms after the SIGKILL (over {} ms)",
            ms(after),
            bound / 1_000_000
        );
    }
    // The respawn campaigns, but the new leader lives on.
    serve_until(
        &mut m,
        Duration::from_secs(5),
        "the victim's respawn ready",
        |m| {
            worker(m)
                .peers()
                .iter()
                .any(|p| p.index == Some(1) && p.generation >= 2 && p.state == WorkerState::Ready)
        },
    )?;
    serve_for(&mut m, Duration::from_millis(300))?;
    ensure!(
        m.leader() == Some(new),
        "leader {:?} after the respawn, was {new:?}",
        m.leader()
    );
    let led = read_lines(&dir.join("led-1-2"));
    ensure!(led.is_empty(), "the respawn said is_leader() at {led:?}");
    let respawn = changes(&dir, 1, 2);
    ensure!(
        respawn.iter().all(|c| !c.is_me && c.leader == new),
        "the respawn's leader changes: {respawn:?}"
    );
    Ok(())
}

// ------------------------------------------------------------ 3: invoke

/// Who served an invoke: (slot, generation, pid).
type Server = (u32, u32, u32);

/// The leader's handlers: `slow` sleeps the given milliseconds (logging
/// its start to `entered`), `whoami` answers at once. Registering them
/// campaigns.
fn invoke_handlers(m: &mut Messenger, dir: &Path) -> Check {
    let me: Server = (m.slot(), m.generation(), std::process::id());
    let entered = dir.join("entered");
    m.on_invoke::<u64, Server, Infallible, _>("slow", move |_, millis| {
        append(&entered, &format!("{}\n", me.2));
        std::thread::sleep(Duration::from_millis(millis));
        Ok(me)
    })
    .map_err(err)?;
    m.on_invoke::<(), Server, Infallible, _>("whoami", move |_, ()| Ok(me))
        .map_err(err)?;
    Ok(())
}

/// Instance 1 leads; followers 2 and 3 invoke `slow` (200 ms) at the same
/// time and the coordinator SIGKILLs the leader 50 ms into the first: both
/// callers get `LeaderDied` within 1 s of the SIGKILL (deadline 10 s), and
/// their next `invoke` is served by the new leader. Then the coordinator's
/// own `invoke_idempotent` of `slow` has its leader SIGKILLed mid-handler
/// and returns `Ok` from the leader after it.
fn invokes_in_flight_when_the_leader_is_sigkilled(w: Worker) -> Check {
    let (index, generation) = (w.index(), w.generation());
    let dir = tmp();
    let mut m = Messenger::new(w);
    if generation > 1 {
        std::thread::sleep(RESPAWN_PAUSE);
    }
    if generation > 1 || index == 1 {
        invoke_handlers(&mut m, &dir)?;
    }
    let go = Arc::new(AtomicBool::new(false));
    let g = go.clone();
    m.on::<(), _>("go", move |_, ()| g.store(true, Ordering::SeqCst))
        .map_err(err)?;
    ready(&m);
    if generation > 1 || index == 1 {
        return serve(m);
    }
    if index != 0 {
        await_leader(&mut m)?;
        invoke_handlers(&mut m, &dir)?;
        append(&dir.join(format!("campaigned-{index}")), "\n");
        serve_until(&mut m, Duration::from_secs(10), "go", |_| {
            go.load(Ordering::SeqCst)
        })?;
        append(&dir.join(format!("invoking-{index}")), "\n");
        let r = m.invoke::<u64, Server>("slow", &200, deadline(Duration::from_secs(10)));
        let at = mono_ns();
        let next = m.invoke::<(), Server>("whoami", &(), deadline(Duration::from_secs(5)));
        let leader = m.leader();
        let line = format!(
            "{at} {} {} {}\n",
            match r {
                Err(CallError::LeaderDied) => "died".to_string(),
                Ok(s) => format!("ok:{}", s.2),
                Err(e) => format!("error:{e}").replace(' ', "_"),
            },
            match next {
                Ok(s) => format!("{}:{}", s.0, s.2),
                Err(e) => format!("error:{e}").replace(' ', "_"),
            },
            leader.map_or(u32::MAX, |l| l.slot)
        );
        let part = dir.join(format!("result-{index}.part"));
        std::fs::write(&part, line).map_err(err)?;
        std::fs::rename(&part, dir.join(format!("result-{index}"))).map_err(err)?;
        return serve(m);
    }
    // The coordinator.
    wait_ready(&mut m, 4)?;
    await_file(&mut m, &dir.join("campaigned-2"))?;
    await_file(&mut m, &dir.join("campaigned-3"))?;
    let first = await_leader(&mut m)?;
    let victim = peer_in(&m, first.slot).ok_or("no leader worker")?;
    ensure!(victim.index == Some(1), "the first leader is {victim:?}");
    let entered = dir.join("entered");
    for i in [2, 3] {
        let to = peer(&m, i).ok_or("no follower")?.slot;
        m.emit(Target::Worker(to), "go", &()).map_err(err)?;
    }
    serve_until(
        &mut m,
        Duration::from_secs(10),
        "both invokes sent, one in the handler",
        |_| {
            dir.join("invoking-2").exists()
                && dir.join("invoking-3").exists()
                && !read_lines(&entered).is_empty()
        },
    )?;
    std::thread::sleep(Duration::from_millis(50));
    let killed_at = kill_worker(victim.pid);
    serve_until(&mut m, Duration::from_secs(15), "both callers' results", |_| {
        dir.join("result-2").exists() && dir.join("result-3").exists()
    })?;
    let new = m.leader().ok_or("no leader after the SIGKILL")?;
    for i in [2, 3] {
        let line = read_lines(&dir.join(format!("result-{i}"))).join("");
        let f: Vec<&str> = line.split(' ').collect();
        ensure!(f.len() == 4, "instance {i}: bad result {line:?}");
        let at: u64 = f[0].parse().map_err(err)?;
        let after = at.saturating_sub(killed_at);
        println!(
            "    instance {i}: invoke -> {} {:.3} ms after the SIGKILL; next invoke -> {}",
            f[1],
            ms(after),
            f[2]
        );
        ensure!(
            f[1] == "died",
            "instance {i}'s invoke in flight at the SIGKILL returned {}, not LeaderDied",
            f[1]
        );
        ensure!(
            after < 1_000_000_000,
            "instance {i} got LeaderDied {:.1} ms after the SIGKILL",
            ms(after)
        );
        ensure!(
            f[2] == format!("{}:{}", new.slot, peer_in(&m, new.slot).map_or(0, |p| p.pid))
                && new.slot != victim.slot,
            "instance {i}'s next invoke was served by {} (slot:pid), the new leader is {new:?}",
            f[2]
        );
    }
    // invoke_idempotent: its leader SIGKILLed mid-handler.
    let second = peer_in(&m, new.slot).ok_or("no second leader")?;
    let watch = entered.clone();
    let killer = std::thread::spawn(move || -> Result<u64, String> {
        let until = deadline(Duration::from_secs(10));
        while read_lines(&watch).len() < 2 {
            ensure!(Instant::now() < until, "the second slow handler never started");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(50));
        Ok(kill_worker(second.pid))
    });
    let started = Instant::now();
    let r = m.invoke_idempotent::<u64, Server>("slow", &200, deadline(Duration::from_secs(10)));
    let took = started.elapsed();
    let killed_at = killer.join().map_err(|_| "killer panicked")??;
    let entries = read_lines(&entered);
    println!("    invoke_idempotent -> {r:?} after {took:?}; slow handlers started by pids {entries:?}");
    let served = r.map_err(|e| format!("invoke_idempotent across a leader SIGKILL: {e}"))?;
    ensure!(
        served.2 != second.pid && served.2 != victim.pid,
        "served by {served:?}, a killed leader"
    );
    ensure!(
        entries.len() == 3 && entries[1] == second.pid.to_string() && entries[2] == served.2.to_string(),
        "slow started by {entries:?}; killed {}, served by {served:?}",
        second.pid
    );
    ensure!(mono_ns() - killed_at < 5_000_000_000, "the retry took {took:?}");
    Ok(())
}

// ------------------------------------------------------------ 4: topics

/// Followers 2 and 3 subscribe to "config" (logging each value to
/// `got-<index>`); the coordinator publishes 1 → both get it; it then
/// subscribes late and gets 1 at once; the leader (1) is SIGKILLed, a new
/// one elected, and a publish of 2 reaches all three subscribers.
fn publish_reaches_every_subscriber_across_a_leader_sigkill(w: Worker) -> Check {
    let (index, generation) = (w.index(), w.generation());
    let dir = tmp();
    let mut m = Messenger::new(w);
    if generation > 1 {
        std::thread::sleep(RESPAWN_PAUSE);
    }
    if generation > 1 || index == 1 {
        m.campaign().map_err(err)?;
        ready(&m);
        return serve(m);
    }
    ready(&m);
    if index != 0 {
        await_leader(&mut m)?;
        m.campaign().map_err(err)?;
        let log = dir.join(format!("got-{index}"));
        m.subscribe::<u64, _>("config", deadline(Duration::from_secs(5)), move |_, v| {
            append(&log, &format!("{v}\n"));
        })
        .map_err(err)?;
        append(&dir.join(format!("subscribed-{index}")), "\n");
        return serve(m);
    }
    wait_ready(&mut m, 4)?;
    await_file(&mut m, &dir.join("subscribed-2"))?;
    await_file(&mut m, &dir.join("subscribed-3"))?;
    let first = await_leader(&mut m)?;
    let victim = peer_in(&m, first.slot).ok_or("no leader worker")?;
    ensure!(victim.index == Some(1), "the first leader is {victim:?}");
    let has = |i: u32, v: u64| read_lines(&dir.join(format!("got-{i}"))).contains(&v.to_string());
    m.publish("config", &1u64, deadline(Duration::from_secs(5)))
        .map_err(|e| format!("publish 1: {e}"))?;
    serve_until(&mut m, Duration::from_secs(2), "1 at both subscribers", |_| {
        has(2, 1) && has(3, 1)
    })?;
    // A late subscriber: the last value at once.
    let got: Arc<Mutex<Vec<u64>>> = Arc::default();
    let g = got.clone();
    let started = Instant::now();
    m.subscribe::<u64, _>("config", deadline(Duration::from_secs(5)), move |_, v| {
        g.lock().unwrap().push(v);
    })
    .map_err(err)?;
    serve_until(&mut m, Duration::from_secs(1), "the late subscriber's 1", |_| {
        got.lock().unwrap().contains(&1)
    })?;
    println!(
        "    the late subscriber got the last value after {:?}",
        started.elapsed()
    );
    ensure!(
        started.elapsed() < Duration::from_millis(100),
        "late subscriber: {:?}",
        started.elapsed()
    );
    kill_worker(victim.pid);
    spin_for_new_leader(&m, first, Duration::from_secs(5))?;
    // A settled read (the first may be torn: see
    // leader_read_during_reelection_never_names_the_dead_slot).
    std::thread::sleep(Duration::from_millis(2));
    let new = m.leader().ok_or("no leader after the SIGKILL")?;
    ensure!(new.slot != victim.slot, "new leader {new:?} in the killed slot");
    m.publish("config", &2u64, deadline(Duration::from_secs(5)))
        .map_err(|e| format!("publish 2 after the new leader {new:?}: {e}"))?;
    serve_until(&mut m, Duration::from_secs(2), "2 at every subscriber", |_| {
        has(2, 2) && has(3, 2) && got.lock().unwrap().contains(&2)
    })
    .map_err(|e| {
        format!(
            "{e}; got: instance 0 {:?}, 2 {:?}, 3 {:?}",
            got.lock().unwrap(),
            read_lines(&dir.join("got-2")),
            read_lines(&dir.join("got-3"))
        )
    })?;
    Ok(())
}

// ------------------------------------------------------------ 5: errors

/// Before anyone campaigns, `invoke` returns `NoLeader` at its 100 ms
/// deadline (not before, not long after); once instance 1 leads without a
/// handler for the method, `invoke` returns `NoHandler`.
fn invoke_is_no_leader_then_no_handler(w: Worker) -> Check {
    let index = w.index();
    let mut m = Messenger::new(w);
    let go = Arc::new(AtomicBool::new(false));
    let g = go.clone();
    m.on::<(), _>("campaign", move |_, ()| g.store(true, Ordering::SeqCst))
        .map_err(err)?;
    ready(&m);
    if index != 0 {
        serve_until(&mut m, Duration::from_secs(10), "campaign", |_| {
            go.load(Ordering::SeqCst)
        })?;
        m.campaign().map_err(err)?;
        return serve(m);
    }
    wait_ready(&mut m, 2)?;
    let started = Instant::now();
    let r = m.invoke::<u64, u64>("missing", &1, deadline(Duration::from_millis(100)));
    let took = started.elapsed();
    ensure!(r == Err(CallError::NoLeader), "invoke with no candidate: {r:?}");
    ensure!(
        took >= Duration::from_millis(100) && took < Duration::from_millis(600),
        "NoLeader after {took:?}, deadline 100 ms"
    );
    let to = peer(&m, 1).ok_or("no instance 1")?.slot;
    m.emit(Target::Worker(to), "campaign", &()).map_err(err)?;
    let leader = await_leader(&mut m)?;
    ensure!(
        leader.slot == to,
        "leader {leader:?}, not instance 1 in slot {to}"
    );
    let r = m.invoke::<u64, u64>("missing", &1, deadline(Duration::from_secs(5)));
    ensure!(
        r == Err(CallError::NoHandler),
        "invoke of a method nobody handles: {r:?}"
    );
    Ok(())
}

/// `Messenger::standalone()` + `campaign()`: it leads (slot 0), serves its
/// own `invoke`, and its own publish reaches its own subscription.
fn standalone_worker_leads_and_serves_itself() -> Check {
    let mut m = Messenger::standalone().map_err(err)?;
    let mut next = 41u64;
    m.on_invoke::<(), u64, Infallible, _>("next_id", move |_, ()| {
        next += 1;
        Ok(next)
    })
    .map_err(err)?;
    m.campaign().map_err(err)?;
    let until = deadline(Duration::from_secs(5));
    while !m.is_leader() {
        ensure!(Instant::now() < until, "the only candidate never leads");
        m.poll(Duration::from_millis(1)).map_err(err)?;
    }
    let leader = m.leader().ok_or("is_leader() but no leader()")?;
    ensure!(leader.slot == 0, "leader {leader:?}");
    for want in [42u64, 43] {
        let got = m
            .invoke::<(), u64>("next_id", &(), deadline(Duration::from_secs(5)))
            .map_err(|e| format!("invoke: {e}"))?;
        ensure!(got == want, "next_id {got}, not {want}");
    }
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let g = got.clone();
    m.subscribe::<String, _>("config", deadline(Duration::from_secs(5)), move |_, v| {
        g.lock().unwrap().push(v);
    })
    .map_err(err)?;
    m.publish("config", "v1", deadline(Duration::from_secs(5)))
        .map_err(|e| format!("publish: {e}"))?;
    let until = deadline(Duration::from_secs(2));
    while got.lock().unwrap().is_empty() {
        ensure!(Instant::now() < until, "the published value never arrived");
        m.poll(Duration::from_millis(1)).map_err(err)?;
    }
    m.poll(Duration::from_millis(50)).map_err(err)?;
    ensure!(
        *got.lock().unwrap() == ["v1"],
        "subscriber got {:?}",
        got.lock().unwrap()
    );
    ensure!(m.is_leader(), "no longer leader");
    Ok(())
}

// ------------------------------------------------------------ torn reads

/// Instances 1..3 campaign; the coordinator (not a candidate) SIGKILLs the
/// leader 40 times, each time spinning on `leader()` until the term goes
/// up: the first `leader()` with the new term must name the new holder,
/// never the slot of the leader just killed (its respawn is not up yet).
fn leader_read_during_reelection_never_names_the_dead_slot(w: Worker) -> Check {
    const ROUNDS: usize = 40;
    let index = w.index();
    if w.generation() > 1 {
        // Not in the election while the coordinator reads it.
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut m = Messenger::new(w);
    if index != 0 {
        m.campaign().map_err(err)?;
        ready(&m);
        return serve(m);
    }
    ready(&m);
    let mut torn = Vec::new();
    for round in 0..ROUNDS {
        wait_ready(&mut m, 4)?;
        // Every live candidate's thread is in the election.
        serve_for(&mut m, Duration::from_millis(20))?;
        let old = await_leader(&mut m)?;
        let victim = peer_in(&m, old.slot).ok_or("no leader worker")?;
        ensure!(victim.index != Some(0), "the coordinator leads");
        kill_worker(victim.pid);
        let (new, _) = spin_for_new_leader(&m, old, Duration::from_secs(5))?;
        if new.slot == victim.slot {
            torn.push((round, old, new));
        }
        serve_until(
            &mut m,
            Duration::from_secs(5),
            "the victim's slot respawned",
            |m| peer_in(m, victim.slot).is_some_and(|p| p.generation > victim.generation),
        )?;
    }
    ensure!(
        torn.is_empty(),
        "{} of {ROUNDS} re-elections: leader() first showed the new term with the killed leader's slot \
         (round, old, read): {torn:?}",
        torn.len()
    );
    Ok(())
}

// ------------------------------------------------------------ observers

/// Instance 0 registers `on_leader_change` but does not campaign (nor
/// invoke): when instance 1 is elected, the callback still fires ("whenever
/// the default role gets a new leader"), within 1 s of dispatching.
fn on_leader_change_fires_without_campaigning(w: Worker) -> Check {
    let index = w.index();
    let mut m = Messenger::new(w);
    if index != 0 {
        m.campaign().map_err(err)?;
        ready(&m);
        return serve(m);
    }
    let seen: Arc<Mutex<Vec<(u32, u64)>>> = Arc::default();
    let s = seen.clone();
    m.on_leader_change(move |c| s.lock().unwrap().push((c.leader.slot, c.leader.term)));
    ready(&m);
    let leader = await_leader(&mut m)?;
    let r = serve_until(&mut m, Duration::from_secs(1), "on_leader_change", |_| {
        !seen.lock().unwrap().is_empty()
    });
    ensure!(
        r.is_ok(),
        "leader {leader:?} elected, but a worker that does not campaign got no on_leader_change \
         in 1 s of dispatching"
    );
    let seen = seen.lock().unwrap();
    ensure!(
        seen.last() == Some(&(leader.slot, leader.term)),
        "changes {seen:?}, leader {leader:?}"
    );
    Ok(())
}

/// Instance 1 leads and publishes 7 to "config"; then instance 0 (which
/// has not used the leader yet) subscribes: its callback runs with 7 once,
/// not once per re-sent subscription.
fn late_subscriber_gets_the_last_value_once(w: Worker) -> Check {
    let index = w.index();
    let mut m = Messenger::new(w);
    let go = Arc::new(AtomicBool::new(false));
    let g = go.clone();
    m.on::<(), _>("published", move |_, ()| g.store(true, Ordering::SeqCst))
        .map_err(err)?;
    ready(&m);
    if index != 0 {
        m.campaign().map_err(err)?;
        serve_until(&mut m, Duration::from_secs(10), "leading", |m| m.is_leader())?;
        m.publish("config", &7u64, deadline(Duration::from_secs(5)))
            .map_err(|e| format!("publish: {e}"))?;
        let to = peer(&m, 0).ok_or("no coordinator")?.slot;
        m.emit(Target::Worker(to), "published", &()).map_err(err)?;
        return serve(m);
    }
    wait_ready(&mut m, 2)?;
    serve_until(&mut m, Duration::from_secs(10), "published", |_| {
        go.load(Ordering::SeqCst)
    })?;
    let got: Arc<Mutex<Vec<u64>>> = Arc::default();
    let g = got.clone();
    m.subscribe::<u64, _>("config", deadline(Duration::from_secs(5)), move |_, v| {
        g.lock().unwrap().push(v);
    })
    .map_err(err)?;
    serve_until(&mut m, Duration::from_secs(1), "the last value", |_| {
        !got.lock().unwrap().is_empty()
    })?;
    serve_for(&mut m, Duration::from_millis(300))?;
    let got = got.lock().unwrap();
    ensure!(
        *got == [7],
        "published 7 once; the late subscriber's callback ran with {got:?}"
    );
    Ok(())
}
