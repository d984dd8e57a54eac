//! The bridge's rows of the hosts benchmark: shmcluster hosts through the
//! NATS bridge, beside the bare async-nats rows of `hosts.rs`.
//!
//! A *host* is this binary re-executed with [`HOST_VAR`] set: a fork-mode
//! master (`Cluster::builder().workers(n)`, with `.nats(..)` or without)
//! whose workers register the same handlers; worker 0 of host `a` is the
//! *driver*: it measures one thing and writes its figure to `result` in
//! the measure's scratch directory. The bench process waits for that file
//! (at most [`HOST_LIMIT`]), then SIGTERMs every host and reaps it
//! (SIGKILL after 10 s); hosts also die with the bench process
//! (`PR_SET_PDEATHSIG`). A host is a fresh process from `main` on: a
//! master must fork from a single-threaded process.
//!
//! The measures (the driver's `task`; `SHMCLUSTER_BENCH_HOSTS_ONLY=<task>`
//! runs one alone, for a profiler):
//!
//! - `xrtt`: `request_at("b", slot, "echo", 64 B)` round trips from host
//!   `a`'s worker to host `b`'s, once a `map` sees `b`'s worker;
//! - `xbcast`: host `a`'s worker broadcasts `n` events of 64 B
//!   (`emit_bytes(All, ..)`), host `b`'s worker counts them and notes the
//!   first and the last arrival ([`super::common::cluster::mono_ns`], one
//!   clock for every process); the driver asks `b` for its count until it
//!   has them all or it stopped moving for a second;
//! - `lrtt`: `request(slot, "echo", 64 B)` between the two workers of one
//!   host (the local lane), with the bridge on or off;
//! - `srtt`: `request_at(<its own host>, slot, "echo", 64 B)` between the
//!   two workers of one host: worker → bridge → worker and back, the
//!   bridge's own part of a cross-host call without NATS;
//! - `lbcast`: a stream of `n` 64 B broadcasts to the two workers of one
//!   host (the caller included; with the bridge on, the bridge gets each
//!   one too and publishes it), ended by a `map` of the counts.

use std::convert::Infallible;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shmcluster::bridge::NatsConfig;
use shmcluster::{Cluster, Messenger, Target, Worker, WorkerState};

use super::common::cluster::mono_ns;
use super::common::nats::NatsCluster;
use super::common::{percentiles, wait_within};
use super::{Figure, Plan, Rate, Res, SMALL};

/// Set in a host process: `<task> <id> <servers|-> <workers> <dir> <n>
/// <full|quick>`.
pub const HOST_VAR: &str = "SHMCLUSTER_BENCH_HOST";
/// The cluster name the hosts share.
const CLUSTER: &str = "bench";
/// Longest the bench waits for a driver's figure.
const HOST_LIMIT: Duration = Duration::from_secs(40);
/// Longest a driver waits to see the other host's worker.
const SEE_LIMIT: Duration = Duration::from_secs(20);
/// Deadline of one timed call.
const CALL_LIMIT: Duration = Duration::from_secs(5);

// ------------------------------------------------------------ the bench side

/// The hosts of one measure: their processes and scratch directory.
struct Hosts {
    children: Vec<Child>,
    dir: PathBuf,
}

impl Hosts {
    /// A scratch directory for one measure.
    fn new(task: &str) -> Res<Self> {
        let dir = std::env::temp_dir().join(format!(
            "shmc-bench-hosts-{}-{task}-{}",
            std::process::id(),
            mono_ns()
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            children: Vec::new(),
            dir,
        })
    }

    /// Starts host `id` with `workers` workers, its bridge on `servers`
    /// (comma-separated URLs) or no bridge (`None`).
    fn start(&mut self, task: &str, id: &str, servers: Option<&str>, workers: u32, plan: Plan) -> Res<()> {
        let n = match task {
            "xrtt" | "lrtt" | "srtt" => plan.rtt as u64,
            _ => plan.stream,
        };
        let full = if plan.rounds == Plan::FULL.rounds {
            "full"
        } else {
            "quick"
        };
        let role = format!(
            "{task} {id} {} {workers} {} {n} {full}",
            servers.unwrap_or("-"),
            self.dir.display()
        );
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.env(HOST_VAR, role)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes integers only and is
        // async-signal-safe, as pre_exec requires.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
                Ok(())
            });
        }
        self.children.push(cmd.spawn()?);
        Ok(())
    }

    /// Waits for the driver's `result` line; fails if a host ends first.
    fn result(&mut self) -> Res<String> {
        let path = self.dir.join("result");
        let until = Instant::now() + HOST_LIMIT;
        loop {
            if let Ok(text) = std::fs::read_to_string(&path) {
                return Ok(text);
            }
            for child in &mut self.children {
                if let Some(status) = child.try_wait()? {
                    return Err(format!("a host ended before the figure: {status}").into());
                }
            }
            if Instant::now() > until {
                return Err(format!("no figure within {HOST_LIMIT:?}").into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Hosts {
    /// SIGTERMs every host, reaps it (SIGKILL after 10 s), removes the
    /// directory.
    fn drop(&mut self) {
        for child in &mut self.children {
            // SAFETY: kill(2) with a pid and a signal number.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        for child in &mut self.children {
            if let Err(e) = wait_within(child, Duration::from_secs(10)) {
                eprintln!("hosts bench: a host did not stop: {e}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Parses a driver's `result` line into a [`Figure`].
fn figure(line: &str) -> Res<Figure> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["lat", p50, p99, max, n] => Ok(Figure::Lat(super::common::Pct {
            p50: p50.parse()?,
            p99: p99.parse()?,
            max: max.parse()?,
            n: n.parse()?,
        })),
        ["rate", per_s, sent, received] => Ok(Figure::Rate(Rate {
            per_s: per_s.parse()?,
            sent: sent.parse()?,
            received: received.parse()?,
            server_drops: 0,
        })),
        ["failed", ..] => Err(line.into()),
        _ => Err(format!("unknown result {line:?}").into()),
    }
}

/// Cross-host `request_at` round trip: host `a` (bridge on server `a`)
/// asks host `b` (bridge on server `b`), one worker each.
pub fn cross_rtt(cluster: &NatsCluster, a: usize, b: usize, plan: Plan) -> Res<Figure> {
    let mut hosts = Hosts::new("xrtt")?;
    hosts.start("xrtt", "b", Some(&cluster.url(b)), 1, plan)?;
    hosts.start("xrtt", "a", Some(&cluster.url(a)), 1, plan)?;
    figure(&hosts.result()?)
}

/// Cross-host broadcast throughput: host `a`'s worker broadcasts, host
/// `b`'s counts; bridges on servers `a` and `b`.
pub fn cross_bcast(cluster: &NatsCluster, a: usize, b: usize, plan: Plan) -> Res<Figure> {
    let mut hosts = Hosts::new("xbcast")?;
    hosts.start("xbcast", "b", Some(&cluster.url(b)), 1, plan)?;
    hosts.start("xbcast", "a", Some(&cluster.url(a)), 1, plan)?;
    figure(&hosts.result()?)
}

/// A local measure (`lrtt`, `srtt` or `lbcast`) on one host of two workers, its
/// bridge on server 0 or none.
pub fn local(cluster: &NatsCluster, task: &str, bridge: bool, plan: Plan) -> Res<Figure> {
    let mut hosts = Hosts::new(task)?;
    let url = cluster.url(0);
    hosts.start(task, "a", bridge.then_some(url.as_str()), 2, plan)?;
    figure(&hosts.result()?)
}

// ------------------------------------------------------------ the host side

/// What a host was told to be.
#[derive(Clone)]
struct Role {
    task: String,
    id: String,
    servers: Option<String>,
    workers: u32,
    dir: PathBuf,
    n: u64,
    plan: Plan,
}

/// In a host process: runs the master and exits.
pub fn host_main(role: &str) -> ! {
    let words: Vec<&str> = role.split(' ').collect();
    let role = match words.as_slice() {
        [task, id, servers, workers, dir, n, full] => {
            workers.parse().ok().zip(n.parse().ok()).map(|(w, n)| Role {
                task: task.to_string(),
                id: id.to_string(),
                servers: (*servers != "-").then(|| servers.to_string()),
                workers: w,
                dir: PathBuf::from(dir),
                n,
                plan: if *full == "full" { Plan::FULL } else { Plan::QUICK },
            })
        }
        _ => None,
    };
    let Some(role) = role else {
        eprintln!("hosts bench: unknown {HOST_VAR} {words:?}");
        std::process::exit(2);
    };
    let mut builder = Cluster::builder().workers(role.workers);
    if let Some(servers) = &role.servers {
        builder = builder.nats(NatsConfig::new(servers, CLUSTER, &role.id));
    }
    let r = role.clone();
    match builder.run(move |w| host_worker(w, &r).map_err(|e| e.to_string())) {
        Ok(_) => std::process::exit(0),
        Err(e) => {
            eprintln!("hosts bench: host {}: {e}", role.id);
            std::process::exit(1);
        }
    }
}

/// A worker of a host: registers the handlers, then serves, or measures
/// (host `a`'s worker 0) and then serves until the host is stopped.
fn host_worker(w: Worker, role: &Role) -> Res<()> {
    let driver = role.id == "a" && w.index() == 0;
    let mut m = Messenger::new(w);
    {
        let id = role.id.clone();
        m.on_request::<(), String, Infallible, _>("where", move |_, ()| Ok(id.clone()))?;
    }
    m.on_request::<Vec<u8>, Vec<u8>, Infallible, _>("echo", |_, v| Ok(v))?;
    // Ticks: how many, the first's and the last's arrival.
    let ticks = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    {
        let ticks = ticks.clone();
        m.on_bytes("tick", move |_, _| {
            let now = mono_ns();
            if ticks[0].fetch_add(1, Relaxed) == 0 {
                ticks[1].store(now, Relaxed);
            }
            ticks[2].store(now, Relaxed);
            Vec::new()
        })?;
    }
    m.on_request::<(), (u64, u64, u64), Infallible, _>("ticks", move |_, ()| {
        Ok((
            ticks[0].load(Relaxed),
            ticks[1].load(Relaxed),
            ticks[2].load(Relaxed),
        ))
    })?;
    m.worker().ready();
    if driver {
        let line = match drive(&mut m, role) {
            Ok(line) => line,
            Err(e) => format!("failed {e}"),
        };
        write_result(&role.dir, &line)?;
    }
    m.run()?;
    Ok(())
}

/// Writes `line` to `<dir>/result` at once (a rename).
fn write_result(dir: &Path, line: &str) -> Res<()> {
    let tmp = dir.join("result.tmp");
    std::fs::write(&tmp, line)?;
    std::fs::rename(tmp, dir.join("result"))?;
    Ok(())
}

/// Runs the task; returns the `result` line.
fn drive(m: &mut Messenger, role: &Role) -> Res<String> {
    let plan = role.plan;
    let payload = vec![7u8; SMALL];
    match role.task.as_str() {
        "xrtt" => {
            let slot = remote_worker(m, "b")?;
            let mut call = |m: &mut Messenger| -> Res<()> {
                let back: Vec<u8> = m.request_at("b", slot, "echo", &payload, deadline())?;
                check_echo(&back)
            };
            round_trips(m, plan, role.n as usize, &mut call)
        }
        "srtt" => {
            // Through this host's bridge and back, no NATS on the way.
            let slot = local_peer(m, role.workers, true)?;
            let me = role.id.clone();
            let mut call = |m: &mut Messenger| -> Res<()> {
                let back: Vec<u8> = m.request_at(&me, slot, "echo", &payload, deadline())?;
                check_echo(&back)
            };
            round_trips(m, plan, role.n as usize, &mut call)
        }
        "lrtt" => {
            let slot = local_peer(m, role.workers, role.servers.is_some())?;
            let mut call = |m: &mut Messenger| -> Res<()> {
                let back: Vec<u8> = m.request(slot, "echo", &payload, deadline())?;
                check_echo(&back)
            };
            round_trips(m, plan, role.n as usize, &mut call)
        }
        "xbcast" => {
            let slot = remote_worker(m, "b")?;
            let sent = stream(m, role.n, plan.time)?;
            // Ask b until it has them all, or its count stood still a second.
            let mut last = (u64::MAX, Instant::now());
            let until = Instant::now() + plan.time;
            let (got, first, end) = loop {
                let (got, first, end): (u64, u64, u64) = m.request_at("b", slot, "ticks", &(), deadline())?;
                if got != last.0 {
                    last = (got, Instant::now());
                }
                if got >= sent || last.1.elapsed() > Duration::from_secs(1) || Instant::now() > until {
                    break (got, first, end);
                }
                pause(m, Duration::from_millis(20))?;
            };
            Ok(rate_line(sent, got, first, end))
        }
        "lbcast" => {
            local_peer(m, role.workers, role.servers.is_some())?;
            let sent = stream(m, role.n, plan.time)?;
            // Lanes are FIFO per sender: the map comes after the stream.
            let entries = m.map::<_, (u64, u64, u64)>("ticks", &(), deadline())?;
            let mut got = 0;
            let (mut first, mut end) = (u64::MAX, 0);
            for (peer, r) in entries {
                let (n, f, e) = r.map_err(|e| format!("ticks from {peer:?}: {e}"))?;
                got += n;
                first = first.min(f);
                end = end.max(e);
            }
            // Every broadcast reaches both workers.
            Ok(rate_line(sent * u64::from(role.workers), got, first, end))
        }
        other => Err(format!("unknown task {other}").into()),
    }
}

/// `rate <per_s> <sent> <received>`, the rate from the first to the last
/// arrival.
fn rate_line(sent: u64, got: u64, first: u64, end: u64) -> String {
    let span = end.saturating_sub(first) as f64 / 1e9;
    let per_s = if span > 0.0 && got > 1 {
        (got - 1) as f64 / span
    } else {
        0.0
    };
    format!("rate {per_s} {sent} {got}")
}

/// Broadcasts `n` numbered 64 B ticks back to back (at most `time`);
/// returns how many.
fn stream(m: &mut Messenger, n: u64, time: Duration) -> Res<u64> {
    let mut payload = vec![0u8; SMALL];
    let start = Instant::now();
    let mut sent = 0;
    while sent < n {
        payload[..8].copy_from_slice(&sent.to_le_bytes());
        m.emit_bytes(Target::All, "tick", &payload)?;
        sent += 1;
        if sent % 1024 == 0 && start.elapsed() > time {
            break;
        }
    }
    Ok(sent)
}

/// Times `n` calls (at most `plan.time`) after `plan.warmup` untimed;
/// returns the `lat` line.
fn round_trips(
    m: &mut Messenger,
    plan: Plan,
    n: usize,
    call: &mut dyn FnMut(&mut Messenger) -> Res<()>,
) -> Res<String> {
    for _ in 0..plan.warmup {
        call(m)?;
    }
    let mut ns = Vec::with_capacity(n);
    let start = Instant::now();
    while ns.len() < n && start.elapsed() < plan.time {
        let t = Instant::now();
        call(m)?;
        ns.push(t.elapsed().as_nanos() as u64);
    }
    let p = percentiles(ns).ok_or("no samples")?;
    Ok(format!("lat {} {} {} {}", p.p50, p.p99, p.max, p.n))
}

fn check_echo(back: &[u8]) -> Res<()> {
    if back.len() != SMALL {
        return Err(format!("answer of {} bytes", back.len()).into());
    }
    Ok(())
}

fn deadline() -> Instant {
    Instant::now() + CALL_LIMIT
}

/// Dispatches for `d`.
fn pause(m: &mut Messenger, d: Duration) -> Res<()> {
    let until = Instant::now() + d;
    while Instant::now() < until {
        m.poll(Duration::from_millis(5))?;
    }
    Ok(())
}

/// Maps `where` until host `host`'s worker answers; returns its slot.
fn remote_worker(m: &mut Messenger, host: &str) -> Res<u32> {
    let until = Instant::now() + SEE_LIMIT;
    loop {
        let entries = m.map::<_, String>("where", &(), Instant::now() + Duration::from_secs(1))?;
        let found = entries
            .iter()
            .find(|(w, r)| w.host.name().as_deref() == Some(host) && r.is_ok());
        if let Some((w, _)) = found {
            return Ok(w.slot);
        }
        if Instant::now() > until {
            return Err(format!("never saw host {host}'s worker: {entries:?}").into());
        }
        pause(m, Duration::from_millis(50))?;
    }
}

/// Waits until the host's `workers` workers are ready, and its bridge if
/// `bridge`; returns the slot of instance 1.
fn local_peer(m: &mut Messenger, workers: u32, bridge: bool) -> Res<u32> {
    let until = Instant::now() + SEE_LIMIT;
    loop {
        let peers = m.worker().peers();
        let ready = |p: &&shmcluster::Peer| p.state == WorkerState::Ready;
        let workers_ready = peers.iter().filter(ready).filter(|p| !p.bridge).count();
        let bridge_ready = peers.iter().filter(ready).any(|p| p.bridge);
        if workers_ready >= workers as usize && bridge_ready == bridge {
            if let Some(p) = peers.iter().find(|p| p.index == Some(1) && !p.bridge) {
                return Ok(p.slot);
            }
        }
        if Instant::now() > until {
            return Err(format!("{workers_ready} of {workers} workers ready, bridge {bridge_ready}").into());
        }
        pause(m, Duration::from_millis(5))?;
    }
}
