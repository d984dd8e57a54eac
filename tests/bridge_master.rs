//! The master's side of the host's NATS bridge (feature `nats`), tested
//! as it runs: the bridge in its own slot, marked in the stats and the
//! peers, never one of the application's instances, left alone by a
//! rolling reload, respawned when it dies, stopped on shutdown; a bad
//! configuration refused before any fork; `shmcluster run --nats`.
//!
//! No NATS server is needed: the bridge's body is not what is tested here
//! (it gets no server it could reach, `nats://127.0.0.1:1`); what is, is
//! that the master runs it as one more long-lived process of the host.
//!
//! `harness = false`: each scenario is this binary re-executed as a fresh
//! single-threaded process (a master must fork from one), under a
//! watchdog that kills it (its children die with it through
//! `PR_SET_PDEATHSIG`). Arguments filter scenarios by substring.

use std::cell::RefCell;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use shmcluster::bridge::{NatsConfig, NatsConfigError};
use shmcluster::{
    Cluster, ClusterError, Event, EventKind, ExitReason, Messenger, Outcome, Worker, WorkerState,
};

#[macro_use]
mod common;
use common::{sigkill, tmp, Check};

const BIN: &str = env!("CARGO_BIN_EXE_shmcluster");

/// No server listens there; the placeholder bridge never connects.
fn nats() -> NatsConfig {
    NatsConfig::new("nats://127.0.0.1:1", "t", "h1")
}

type Body = fn() -> Check;

const SCENARIOS: &[(&str, Duration, Body)] = &[
    (
        "bad_config_is_refused_before_any_fork",
        Duration::from_secs(30),
        bad_config_is_refused_before_any_fork,
    ),
    (
        "bridge_slot_reload_respawn_and_shutdown",
        Duration::from_secs(60),
        bridge_slot_reload_respawn_and_shutdown,
    ),
    (
        "spawn_mode_bridge_runs_the_masters_code",
        Duration::from_secs(30),
        spawn_mode_bridge_runs_the_masters_code,
    ),
    (
        "every_instance_given_up_ends_the_master_with_a_live_bridge",
        Duration::from_secs(30),
        every_instance_given_up_ends_the_master_with_a_live_bridge,
    ),
    (
        "cli_run_with_nats_shows_a_bridge_in_stat",
        Duration::from_secs(60),
        cli_run_with_nats_shows_a_bridge_in_stat,
    ),
];

fn main() {
    if let Ok(name) = std::env::var("SHMC_SCENARIO") {
        let (_, _, body) = SCENARIOS
            .iter()
            .find(|(n, _, _)| *n == name)
            .expect("known scenario");
        common::exit_scenario(&name, body());
    }
    let scenarios: Vec<_> = SCENARIOS.iter().map(|(n, t, _)| (*n, *t)).collect();
    let (ran, failed) = common::run_suite("bridge-master", &scenarios);
    common::finish_suite(ran, &failed);
}

// ------------------------------------------------------------ plumbing

/// Records the master's events, for checks after `run` returns.
#[derive(Clone, Default)]
struct Log(Rc<RefCell<Vec<Event>>>);

impl Log {
    fn push(&self, e: &Event) {
        self.0.borrow_mut().push(*e);
    }
    fn events(&self) -> Vec<Event> {
        self.0.borrow().clone()
    }
    fn count(&self, f: impl Fn(&Event) -> bool) -> usize {
        self.0.borrow().iter().filter(|e| f(e)).count()
    }
}

fn alive(pid: u32) -> bool {
    // A zombie is dead for our purposes: look at its state.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().and_then(|r| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X"))
        }
        Err(_) => false,
    }
}

/// Appends `line` to the scenario's file `name` (workers report there).
fn append(name: &str, line: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(tmp().join(name))
        .expect("report file");
    // One write: lines of processes appending at once do not mix.
    let _ = f.write_all(format!("{line}\n").as_bytes());
}

fn read_lines(name: &str) -> Vec<String> {
    std::fs::read_to_string(tmp().join(name))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// An application worker: ready, then what it sees of the bridge and of
/// the instances (one line in `workers`: `ok ...` or `err ...`), then idle
/// until told to stop.
fn app_worker(worker: Worker) -> Result<(), String> {
    let m = Messenger::new(worker);
    let result = look_at_the_cluster(&m);
    append(
        "workers",
        &match &result {
            Ok(()) => format!("ok {}", std::process::id()),
            Err(e) => format!("err {}: {e}", std::process::id()),
        },
    );
    while !m.worker().wait_stop(Duration::from_secs(1)) {}
    Ok(())
}

fn look_at_the_cluster(m: &Messenger) -> Check {
    let w = m.worker();
    w.ready();
    ensure!(w.instances() == 2, "instances {}", w.instances());
    ensure!(w.index() < 2, "an application worker with index {}", w.index());
    ensure!(w.wait_all_ready(Duration::from_secs(20)), "not all ready");
    // Ready means the instances', not the bridge taken for one of them.
    let peers = w.peers();
    let ready = peers
        .iter()
        .filter(|p| p.state == WorkerState::Ready && !p.bridge)
        .count();
    ensure!(ready >= 2, "all ready with {ready} instances ready: {peers:?}");
    // The bridge starts first and is ready at once: it shows in the peers.
    let deadline = Instant::now() + Duration::from_secs(20);
    let bridge = loop {
        let peers = w.peers();
        let bridges: Vec<_> = peers.iter().filter(|p| p.bridge).collect();
        ensure!(bridges.len() <= 1, "two bridges: {peers:?}");
        if let Some(b) = bridges.first().filter(|b| b.state == WorkerState::Ready) {
            break **b;
        }
        ensure!(Instant::now() < deadline, "no ready bridge among {peers:?}");
        std::thread::sleep(Duration::from_millis(10));
    };
    ensure!(bridge.index == Some(2), "bridge index {:?}", bridge.index);
    ensure!(bridge.slot != w.slot(), "the bridge in my slot");
    let live = m.live_workers();
    ensure!(
        live.iter().all(|id| id.slot != bridge.slot),
        "the bridge (slot {}) among the live workers {live:?}",
        bridge.slot
    );
    ensure!(
        live.iter().any(|id| id.slot == w.slot()),
        "myself not among the live workers {live:?}"
    );
    Ok(())
}

/// The bridge's row of the master's stats: (slot, pid, generation).
fn bridge_row(cluster: &Cluster) -> Result<(u32, u32, u32), String> {
    let stats = cluster.stats();
    let rows: Vec<_> = stats.slots.iter().filter(|s| s.bridge).collect();
    ensure!(rows.len() == 1, "bridge rows: {:?}", stats.slots);
    let b = rows[0];
    ensure!(b.index == Some(cluster.instances()), "bridge index {:?}", b.index);
    Ok((b.slot, b.pid, b.generation))
}

/// The application's workers' pids, from the stats (the bridge's left out).
fn app_pids(cluster: &Cluster) -> Vec<u32> {
    let mut pids: Vec<u32> = cluster
        .stats()
        .slots
        .iter()
        .filter(|s| !s.bridge && s.state == WorkerState::Ready)
        .map(|s| s.pid)
        .collect();
    pids.sort_unstable();
    pids
}

// ------------------------------------------------------------ scenarios

fn bad_config_is_refused_before_any_fork() -> Check {
    let forked = std::cell::Cell::new(false);
    let never = |_w: Worker| {
        forked.set(true);
        Ok::<(), String>(())
    };
    let err = Cluster::builder()
        .workers(1)
        .nats(NatsConfig::new("nats://127.0.0.1:1", "t", "h.1"))
        .run(never)
        .err()
        .ok_or("a host id with a dot was accepted")?;
    ensure!(
        matches!(
            &err,
            ClusterError::Nats(NatsConfigError::Name { what: "host_id", .. })
        ),
        "{err:?}"
    );
    ensure!(err.to_string().contains("host_id"), "{err}");
    let err = Cluster::builder()
        .workers(1)
        .nats(NatsConfig::new(" , ", "t", "h1"))
        .run(never)
        .err()
        .ok_or("no server accepted")?;
    ensure!(
        matches!(err, ClusterError::Nats(NatsConfigError::NoServers)),
        "{err:?}"
    );
    // The bridge takes a slot: one instance fewer fits.
    let max = shmcluster::MAX_WORKERS - 2;
    let err = Cluster::builder()
        .workers(max + 1)
        .nats(nats())
        .run(never)
        .err()
        .ok_or("too many workers accepted")?;
    ensure!(
        matches!(err, ClusterError::Workers { max: m, .. } if m == max),
        "{err:?}"
    );
    ensure!(!forked.get(), "a worker ran");
    Ok(())
}

/// Where the master's closure is in `bridge_slot_reload_respawn_and_shutdown`.
#[derive(Default)]
struct Plan {
    phase: u32,
    bridge: (u32, u32, u32),
    apps: Vec<u32>,
    problems: Vec<String>,
}

fn bridge_slot_reload_respawn_and_shutdown() -> Check {
    let log = Log::default();
    let l = log.clone();
    let plan = Rc::new(RefCell::new(Plan::default()));
    let p = plan.clone();
    let report = Cluster::builder()
        .workers(2)
        .nats(nats())
        .restart_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .on_event(move |cluster, e| {
            l.push(e);
            let mut plan = p.borrow_mut();
            let mut step = || -> Check {
                match plan.phase {
                    // Both instances and the bridge online: reload.
                    0 if e.kind == EventKind::Online && l.count(|e| e.kind == EventKind::Online) == 3 => {
                        plan.bridge = bridge_row(cluster)?;
                        plan.apps = app_pids(cluster);
                        ensure!(plan.apps.len() == 2, "app pids {:?}", plan.apps);
                        ensure!(
                            !plan.apps.contains(&plan.bridge.1),
                            "the bridge among the instances"
                        );
                        plan.phase = 1;
                        cluster.reload();
                    }
                    // The reload replaced both instances, not the bridge:
                    // kill the bridge.
                    1 if matches!(e.kind, EventKind::ReloadFinished { .. }) => {
                        ensure!(e.kind == EventKind::ReloadFinished { ok: true }, "reload failed");
                        ensure!(
                            bridge_row(cluster)? == plan.bridge,
                            "the reload touched the bridge"
                        );
                        ensure!(alive(plan.bridge.1), "the bridge is gone");
                        let now = app_pids(cluster);
                        ensure!(now.len() == 2, "app pids after the reload {now:?}");
                        ensure!(
                            now.iter().all(|pid| !plan.apps.contains(pid)),
                            "not every instance replaced: {:?} then {now:?}",
                            plan.apps
                        );
                        plan.phase = 2;
                        sigkill(plan.bridge.1);
                    }
                    // Its successor online: shut down.
                    2 if e.kind == EventKind::Online && e.slot == plan.bridge.0 => {
                        let (slot, pid, generation) = bridge_row(cluster)?;
                        ensure!(slot == plan.bridge.0, "respawned in slot {slot}");
                        ensure!(pid != plan.bridge.1, "same pid");
                        ensure!(generation > plan.bridge.2, "same generation {generation}");
                        plan.bridge = (slot, pid, generation);
                        plan.phase = 3;
                        cluster.shutdown();
                    }
                    _ => {}
                }
                Ok(())
            };
            if let Err(problem) = step() {
                plan.problems.push(problem);
                cluster.shutdown();
            }
        })
        .run(app_worker)
        .map_err(|e| e.to_string())?;
    let plan = plan.borrow();
    ensure!(plan.problems.is_empty(), "{:?}", plan.problems);
    ensure!(plan.phase == 3, "stopped in phase {}", plan.phase);
    let events = log.events();
    let bridge_index = 2;
    // Bridge: spawned once at start-up, once after the SIGKILL; never in
    // the reload.
    let spawned = |e: &Event| e.kind == EventKind::Spawned && e.index == bridge_index;
    ensure!(events.iter().filter(|e| spawned(e)).count() == 2, "{events:?}");
    let start = events.iter().position(|e| e.kind == EventKind::ReloadStarted);
    let end = events
        .iter()
        .position(|e| matches!(e.kind, EventKind::ReloadFinished { .. }));
    let (Some(start), Some(end)) = (start, end) else {
        return Err(format!("no reload in {events:?}"));
    };
    ensure!(
        !events[start..end].iter().any(|e| e.index == bridge_index),
        "the reload touched the bridge: {:?}",
        &events[start..end]
    );
    let replaced = events[start..end]
        .iter()
        .filter(|e| e.kind == EventKind::Exit(ExitReason::Reloaded))
        .count();
    ensure!(replaced == 2, "{replaced} instances replaced");
    ensure!(
        events
            .iter()
            .any(|e| e.index == bridge_index && e.kind == EventKind::Exit(ExitReason::Signaled(9))),
        "no SIGKILLed bridge in {events:?}"
    );
    // The shutdown stopped the respawned bridge, like the rest.
    ensure!(
        events.iter().any(|e| e.index == bridge_index
            && e.generation == plan.bridge.2
            && e.kind == EventKind::Exit(ExitReason::Shutdown)),
        "the respawned bridge did not end with the shutdown: {events:?}"
    );
    ensure!(!alive(plan.bridge.1), "the bridge outlived the master");
    ensure!(report.clean, "{report:?}");
    ensure!(report.restarts == 1, "{report:?}");
    // Every application worker (2 + 2 replacements) saw it right.
    let lines = read_lines("workers");
    ensure!(lines.len() == 4, "worker reports {lines:?}");
    ensure!(lines.iter().all(|l| l.starts_with("ok ")), "{lines:?}");
    Ok(())
}

fn spawn_mode_bridge_runs_the_masters_code() -> Check {
    let me = std::fs::read_link("/proc/self/exe").map_err(|e| e.to_string())?;
    let seen: Rc<RefCell<Option<Result<(), String>>>> = Rc::default();
    let s = seen.clone();
    let report = Cluster::builder()
        .workers(1)
        .nats(nats())
        .ready_on_start(true)
        .on_event(move |cluster, e| {
            if e.kind != EventKind::Online || s.borrow().is_some() {
                return;
            }
            let Ok((_, pid, _)) = bridge_row(cluster) else {
                return;
            };
            let stats = cluster.stats();
            let ready = stats
                .slots
                .iter()
                .filter(|s| s.state == WorkerState::Ready)
                .count();
            if ready < 2 {
                return;
            }
            let check = || -> Check {
                let exe = std::fs::read_link(format!("/proc/{pid}/exe")).map_err(|e| e.to_string())?;
                ensure!(exe == me, "the bridge runs {exe:?}, not the master's {me:?}");
                let worker = stats
                    .slots
                    .iter()
                    .find(|s| !s.bridge && s.state == WorkerState::Ready)
                    .ok_or("no worker")?;
                let exe =
                    std::fs::read_link(format!("/proc/{}/exe", worker.pid)).map_err(|e| e.to_string())?;
                ensure!(exe != me, "the worker was not executed");
                Ok(())
            };
            *s.borrow_mut() = Some(check());
            cluster.shutdown();
        })
        .command(["sleep", "30"])
        .map_err(|e| e.to_string())?;
    let seen = seen
        .borrow_mut()
        .take()
        .ok_or("never saw the bridge and the worker ready")?;
    seen?;
    ensure!(report.clean, "{report:?}");
    Ok(())
}

fn every_instance_given_up_ends_the_master_with_a_live_bridge() -> Check {
    let log = Log::default();
    let l = log.clone();
    let report = Cluster::builder()
        .workers(2)
        .nats(nats())
        .restart_backoff(Duration::from_millis(1), Duration::from_millis(5))
        .crash_loop_limit(2, Duration::from_secs(60))
        .on_event(move |_, e| l.push(e))
        .run(|_w: Worker| Err::<(), _>("crash"))
        .map_err(|e| e.to_string())?;
    ensure!(report.outcome == Outcome::AllGivenUp, "{report:?}");
    ensure!(report.failed_slots.len() == 2, "{report:?}");
    let events = log.events();
    let bridge_crash = events.iter().any(|e| {
        e.index == 2
            && matches!(
                e.kind,
                EventKind::Exit(ExitReason::Exited(_)) | EventKind::CrashLoop
            )
    });
    ensure!(!bridge_crash, "the bridge crashed: {events:?}");
    ensure!(
        events
            .iter()
            .any(|e| e.index == 2 && e.kind == EventKind::Exit(ExitReason::Shutdown)),
        "the bridge was not stopped: {events:?}"
    );
    Ok(())
}

/// A child killed and reaped when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `shmcluster args...` to its end (within `limit`): (success, stdout,
/// stderr).
fn cli(args: &[&str], limit: Duration) -> Result<(bool, String, String), String> {
    let mut child = Reaped(
        Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?,
    );
    let status = common::wait_child(&mut child.0, limit)?;
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.0.stdout.take() {
        o.read_to_string(&mut out).map_err(|e| e.to_string())?;
    }
    if let Some(mut e) = child.0.stderr.take() {
        e.read_to_string(&mut err).map_err(|e| e.to_string())?;
    }
    Ok((status.success(), out, err))
}

fn cli_run_with_nats_shows_a_bridge_in_stat() -> Check {
    // --help says where the secrets come from.
    let (ok, help, _) = cli(&["run", "--help"], Duration::from_secs(10))?;
    ensure!(ok, "run --help failed");
    for var in [
        "SHMCLUSTER_NATS_USER",
        "SHMCLUSTER_NATS_PASSWORD",
        "SHMCLUSTER_NATS_TOKEN",
        "--nats",
        "--host-id",
        "--cluster-name",
    ] {
        ensure!(help.contains(var), "run --help does not mention {var}: {help}");
    }
    let dir = tmp();
    let sock = dir.join("c.sock");
    let sock = sock.to_str().ok_or("path")?;
    let master = Command::new(BIN)
        .args([
            "run",
            "--nats",
            "nats://127.0.0.1:1",
            "--host-id",
            "h1",
            "-w",
            "2",
        ])
        .args(["--control", sock, "--", "sleep", "30"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut master = Reaped(master);
    let result = stat_until_bridge(sock, Path::new(sock));
    // Stop it either way, and see it end.
    let stopped = cli(&["stop", "--control", sock], Duration::from_secs(10));
    let status = common::wait_child(&mut master.0, Duration::from_secs(20))?;
    let stat = result?;
    stopped?;
    ensure!(status.code() == Some(0), "master ended with {status}");
    let mut err = String::new();
    if let Some(mut e) = master.0.stderr.take() {
        e.read_to_string(&mut err).map_err(|e| e.to_string())?;
    }
    ensure!(err.contains("NATS bridge for host h1"), "{err}");
    ensure!(stat.contains("2 instances"), "{stat}");
    let row = stat
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("bridge"))
        .ok_or(format!("no bridge row in {stat}"))?;
    ensure!(row.contains("Ready"), "{row}");
    // Without --nats, the options are refused.
    let (ok, _, err) = cli(
        &["run", "--host-id", "h1", "--", "sleep", "1"],
        Duration::from_secs(10),
    )?;
    ensure!(!ok && err.contains("--nats"), "{err}");
    Ok(())
}

/// `stat` until it shows a ready bridge (within 20 s); its output.
fn stat_until_bridge(sock: &str, path: &Path) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if path.exists() {
            let (ok, out, _) = cli(&["stat", "--control", sock], Duration::from_secs(10))?;
            if ok && out.contains("bridge ready") {
                return Ok(out);
            }
        }
        ensure!(Instant::now() < deadline, "no ready bridge in stat");
        std::thread::sleep(Duration::from_millis(50));
    }
}
