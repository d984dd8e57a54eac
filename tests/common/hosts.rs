//! The machinery of the multi-host scenarios (`tests/hosts*.rs`, feature
//! `nats`): a scenario is a fresh process (the test binary re-executed
//! with `SHMC_SCENARIO=<name>`) that starts NATS and *hosts* — the test
//! binary again with `SHMC_HOST=<id>`, each a real fork-mode master with
//! its own segment, its workers and its bridge — and acts on the driver's
//! phases. Worker 0 of host `a` is the *driver*: it runs the scenario's
//! checks through its messenger and writes its verdict to `verdict` in the
//! scenario's directory; where the scenario process must act at a given
//! moment, the driver writes `phase-<name>` and waits for `go-<name>`.
//! Every other worker serves: `ping` and `where` requests, `log` events
//! (appended to `log-<host>-<slot>`), the consume events its host handles
//! (`SHMC_JOBS`, appended to `jobs-<host>`) and host events (appended to
//! `hostevents-<host>-<slot>`). Hosts die with the scenario process
//! (`PR_SET_PDEATHSIG`), their workers and bridges with them.
//!
//! Included by path (`#[path = "common/hosts.rs"] mod hosts;`) next to
//! `mod common;`, so that tests without the feature never build it.

#![allow(dead_code)]

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use shmcluster::bridge::NatsConfig;
use shmcluster::{Cluster, HostEvent, Messenger, Worker, HOST_EVENT};

use crate::common::nats::NatsCluster;
use crate::common::{tmp, Check};

/// A scenario of a multi-host suite.
pub struct Scenario {
    pub name: &'static str,
    pub timeout: Duration,
    /// The scenario process: starts NATS and the hosts, acts on phases.
    pub run: fn() -> Check,
    /// Host `a`'s worker 0.
    pub drive: fn(&mut Messenger) -> Check,
}

/// The suite's scenarios, for the hosts' driver to find its own.
static SCENARIOS: OnceLock<&'static [Scenario]> = OnceLock::new();

/// The cluster name the hosts share (one NATS per scenario process).
pub const CLUSTER: &str = "hosts-test";

/// How long a host stays unreachable-free without a heartbeat (short for
/// the tests: ten heartbeats of 100 ms).
pub const HOST_TIMEOUT: Duration = Duration::from_secs(1);

/// The test binary's `main`: a host, a scenario process, or the suite.
pub fn main(suite: &str, scenarios: &'static [Scenario]) {
    let _ = SCENARIOS.set(scenarios);
    if let Ok(host) = std::env::var("SHMC_HOST") {
        std::process::exit(match host_main(&host) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("host {host}: {e}");
                1
            }
        });
    }
    if let Ok(name) = std::env::var("SHMC_SCENARIO") {
        let s = scenario(&name);
        crate::common::exit_scenario(&name, (s.run)());
    }
    let list: Vec<_> = scenarios.iter().map(|s| (s.name, s.timeout)).collect();
    let (ran, failed) = crate::common::run_suite(suite, &list);
    crate::common::finish_suite(ran, &failed);
}

fn scenario(name: &str) -> &'static Scenario {
    SCENARIOS
        .get()
        .and_then(|all| all.iter().find(|s| s.name == name))
        .expect("known scenario")
}

// ------------------------------------------------------------------ hosts

/// A host: a fork-mode master with `SHMC_WORKERS` workers and a bridge.
pub fn host_main(host: &str) -> Result<(), String> {
    let var = |k: &str| std::env::var(k).map_err(|_| format!("{k} not set"));
    let workers: u32 = var("SHMC_WORKERS")?
        .parse()
        .map_err(|e| format!("SHMC_WORKERS: {e}"))?;
    let mut nats = NatsConfig::new(&var("SHMC_NATS")?, &var("SHMC_CLUSTER")?, host)
        .credentials_from_env()
        .map_err(|e| e.to_string())?;
    nats.heartbeat = Duration::from_millis(100);
    nats.host_timeout = HOST_TIMEOUT;
    let dir = tmp();
    let pid_file = dir.join(format!("bridge-{host}.pid"));
    let report = Cluster::builder()
        .workers(workers)
        .nats(nats)
        .on_event(move |cluster, _| {
            // The bridge's pid, for the scenario process to kill.
            if let Some(b) = cluster.stats().slots.iter().find(|s| s.bridge && s.pid != 0) {
                let _ = std::fs::write(&pid_file, b.pid.to_string());
            }
        })
        .run(|w| serve(w).map_err(|e| e.to_string()))
        .map_err(|e| e.to_string())?;
    eprintln!("host {host} ended: {report:?}");
    Ok(())
}

/// A worker of a host: serves, or drives the scenario on host `a`'s
/// worker 0.
pub fn serve(w: Worker) -> Check {
    let host = std::env::var("SHMC_HOST").map_err(|e| e.to_string())?;
    let driver = host == "a" && w.index() == 0;
    let mut m = Messenger::new(w);
    let slot = m.slot();
    let dir = tmp();
    {
        let host = host.clone();
        m.on_request("ping", move |_, (): ()| Ok::<_, String>((host.clone(), slot)))
            .map_err(|e| e.to_string())?;
    }
    {
        let host = host.clone();
        m.on_request("where", move |_, (): ()| Ok::<_, String>(host.clone()))
            .map_err(|e| e.to_string())?;
    }
    {
        let path = dir.join(format!("log-{host}-{slot}"));
        m.on("log", move |_, (tag, seq): (String, u64)| {
            append(&path, &format!("{tag} {seq}"))
        })
        .map_err(|e| e.to_string())?;
    }
    {
        // Who sent a `who` event: `<host> <slot>`, `local` for this host.
        let path = dir.join(format!("who-{host}-{slot}"));
        m.on("who", move |ctx, (): ()| {
            let from = ctx.sender();
            append(&path, &format!("{} {}", from.host, from.slot))
        })
        .map_err(|e| e.to_string())?;
    }
    {
        let path = dir.join(format!("hostevents-{host}-{slot}"));
        m.on(HOST_EVENT, move |_, e: HostEvent| {
            append(&path, &format!("{} {:?}", e.host, e.change))
        })
        .map_err(|e| e.to_string())?;
    }
    let jobs = std::env::var("SHMC_JOBS").unwrap_or_default();
    for event in jobs.split(',').filter(|e| !e.is_empty()) {
        let path = dir.join(format!("jobs-{host}"));
        let host = host.clone();
        m.on_request(event, move |ctx, (task, sleep_ms): (u64, u64)| {
            append(
                &path,
                &format!("start {task} {} {host} {slot}", ctx.delivery_id()),
            );
            std::thread::sleep(Duration::from_millis(sleep_ms));
            append(&path, &format!("done {task} {} {host} {slot}", ctx.delivery_id()));
            Ok::<_, String>(())
        })
        .map_err(|e| e.to_string())?;
    }
    m.worker().ready();
    if driver {
        let name = std::env::var("SHMC_SCENARIO").map_err(|e| e.to_string())?;
        let verdict = (scenario(&name).drive)(&mut m);
        let text = match &verdict {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("FAILED: {e}"),
        };
        std::fs::write(dir.join("verdict"), text).map_err(|e| e.to_string())?;
        // Keep serving until the scenario process stops the host.
    }
    // Serve; on the scenario's word (a file), contend for the lock
    // `counter` across hosts, campaign for the default role, or (worker 0
    // of the host) publish "from <host>" as the topic `config`.
    let (mut contended, mut campaigned, mut published) = (driver, false, m.worker().index() != 0);
    while !m.worker().should_stop() {
        m.poll(Duration::from_millis(10)).map_err(|e| e.to_string())?;
        if !contended && dir.join("contend").exists() {
            contended = true;
            contend(&mut m, &host, CONTEND_ROUNDS)?;
        }
        if !published && dir.join(format!("publish-{host}")).exists() {
            published = true;
            m.publish_global(
                "config",
                &format!("from {host}"),
                Instant::now() + Duration::from_secs(5),
            )
            .map_err(|e| e.to_string())?;
        }
        if !campaigned && dir.join(format!("campaign-{host}")).exists() {
            campaigned = true;
            m.campaign_global("").map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// Sections each worker runs in [`contend`].
pub const CONTEND_ROUNDS: u32 = 10;

/// `rounds` sections of the lock `counter` across hosts, each written to
/// `lockrun` as `enter <token> <host> <slot>` … `exit <token> …` with a
/// pause between; then `<host> <slot>` to `contended`.
pub fn contend(m: &mut Messenger, host: &str, rounds: u32) -> Check {
    let dir = tmp();
    let run = dir.join("lockrun");
    let slot = m.slot();
    for _ in 0..rounds {
        m.synchronize_global("counter", Instant::now() + Duration::from_secs(30), |s| {
            let token = s.fencing_token();
            append(&run, &format!("enter {token} {host} {slot}"));
            std::thread::sleep(Duration::from_millis(5));
            append(&run, &format!("exit {token} {host} {slot}"));
        })
        .map_err(|e| format!("synchronize_global: {e}"))?;
    }
    append(&dir.join("contended"), &format!("{host} {slot}"));
    Ok(())
}

pub fn append(path: &Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}

pub fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|s| s.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// The driver: tells the scenario process it reached `name`, and waits
/// for it to act (dispatching meanwhile).
pub fn phase(m: &mut Messenger, name: &str) -> Check {
    let dir = tmp();
    std::fs::write(dir.join(format!("phase-{name}")), "").map_err(|e| e.to_string())?;
    let until = Instant::now() + Duration::from_secs(30);
    while !dir.join(format!("go-{name}")).exists() {
        ensure!(Instant::now() < until, "no go for phase {name}");
        m.poll(Duration::from_millis(10)).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Dispatches for `d` (handlers keep running while the driver waits).
pub fn pause(m: &mut Messenger, d: Duration) -> Check {
    let until = Instant::now() + d;
    while Instant::now() < until {
        m.poll(Duration::from_millis(10)).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Waits until a map sees `n` workers answer, on every host.
pub fn wait_for_workers(m: &mut Messenger, n: usize) -> Check {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let entries = m
            .map::<_, String>("where", &(), Instant::now() + Duration::from_secs(1))
            .map_err(|e| e.to_string())?;
        if entries.iter().filter(|(_, r)| r.is_ok()).count() == n {
            return Ok(());
        }
        ensure!(Instant::now() < until, "never saw {n} workers: {entries:?}");
        pause(m, Duration::from_millis(100))?;
    }
}

pub fn deadline(d: Duration) -> Instant {
    Instant::now() + d
}

// ------------------------------------------------ the scenario process

/// The hosts of one scenario and their NATS.
pub struct Hosts {
    pub nats: NatsCluster,
    children: Vec<(String, Child)>,
    pub dir: PathBuf,
}

impl Hosts {
    pub fn start(nats: NatsCluster) -> Self {
        Self {
            nats,
            children: Vec::new(),
            dir: tmp(),
        }
    }

    /// Starts host `id` of cluster `cluster` with `workers` workers that
    /// handle the consume events `jobs`.
    pub fn host(&mut self, id: &str, cluster: &str, workers: u32, jobs: &str) -> Check {
        let urls = self.nats.urls();
        self.host_with(id, cluster, workers, jobs, &urls, None, &[])
    }

    /// [`host`](Self::host) with the NATS URLs `nats`, in the network
    /// namespace `netns` (`ip netns exec <netns> <this binary>`: `ip` execs
    /// the binary itself, so the child is the master) and with `envs`
    /// added to its environment.
    #[allow(clippy::too_many_arguments)]
    pub fn host_with(
        &mut self,
        id: &str,
        cluster: &str,
        workers: u32,
        jobs: &str,
        nats: &str,
        netns: Option<&str>,
        envs: &[(&str, &str)],
    ) -> Check {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut ip = Command::new("ip");
                ip.args(["netns", "exec", ns]).arg(exe);
                ip
            }
            None => Command::new(exe),
        };
        cmd.env("SHMC_HOST", id)
            .env("SHMC_CLUSTER", cluster)
            .env("SHMC_WORKERS", workers.to_string())
            .env("SHMC_JOBS", jobs)
            .env("SHMC_NATS", nats)
            .envs(envs.iter().copied());
        self.spawn(id, cmd)
    }

    /// Starts `cmd` as host `id`: it dies with the scenario process, and
    /// [`Hosts::finish`] stops it.
    fn spawn(&mut self, id: &str, mut cmd: Command) -> Check {
        cmd.env_remove("SHMC_SCENARIO_PARENT");
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes integers only and is
        // async-signal-safe, as pre_exec requires.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("host {id} ({:?}): {e}", cmd.get_program()))?;
        self.children.push((id.to_owned(), child));
        Ok(())
    }

    /// Waits for the driver's phase `name` (or its verdict: it failed
    /// before getting there).
    pub fn await_phase(&self, name: &str) -> Check {
        let until = Instant::now() + Duration::from_secs(60);
        while !self.dir.join(format!("phase-{name}")).exists() {
            if let Ok(v) = std::fs::read_to_string(self.dir.join("verdict")) {
                return Err(format!("the driver ended before phase {name}: {v}"));
            }
            ensure!(Instant::now() < until, "the driver never reached phase {name}");
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    pub fn go(&self, name: &str) -> Check {
        std::fs::write(self.dir.join(format!("go-{name}")), "").map_err(|e| e.to_string())
    }

    pub fn bridge_pid(&self, host: &str) -> Result<u32, String> {
        std::fs::read_to_string(self.dir.join(format!("bridge-{host}.pid")))
            .map_err(|e| format!("no bridge pid for {host}: {e}"))?
            .trim()
            .parse()
            .map_err(|e| format!("bridge pid of {host}: {e}"))
    }

    /// SIGKILLs host `id`'s master: its workers and bridge die with it.
    pub fn kill_host(&mut self, id: &str) {
        if let Some((_, child)) = self.children.iter_mut().find(|(h, _)| h == id) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the driver's verdict, then stops every host (SIGTERM,
    /// then SIGKILL after 10 s) and reaps it.
    pub fn finish(mut self) -> Check {
        let until = Instant::now() + Duration::from_secs(100);
        let verdict = loop {
            if let Ok(v) = std::fs::read_to_string(self.dir.join("verdict")) {
                break v;
            }
            if Instant::now() > until {
                break "no verdict".to_string();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for (_, child) in &mut self.children {
            // SAFETY: kill(2) with a pid and a signal number.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        for (id, child) in &mut self.children {
            if crate::common::wait_child(child, Duration::from_secs(10)).is_err() {
                eprintln!("host {id} did not stop in 10 s; killed");
            }
        }
        drop(self.nats);
        ensure!(verdict == "ok", "{verdict}");
        Ok(())
    }

    /// Starts host `id` as the command `argv` (say, a `shmcluster run
    /// --nats ...` of workers in another language) with `envs` added to
    /// this process's environment; it dies with the scenario process, as
    /// [`Hosts::host`]'s do, and [`Hosts::finish`] stops it.
    pub fn command_host(&mut self, id: &str, argv: &[&str], envs: &[(&str, &str)]) -> Check {
        let (program, args) = argv.split_first().ok_or("command_host: an empty argv")?;
        let mut cmd = Command::new(program);
        cmd.args(args).envs(envs.iter().copied());
        self.spawn(id, cmd)
    }

    /// [`host_with`](Self::host_with) without added environment.
    pub fn host_at(
        &mut self,
        id: &str,
        cluster: &str,
        workers: u32,
        jobs: &str,
        nats: &str,
        netns: Option<&str>,
    ) -> Check {
        self.host_with(id, cluster, workers, jobs, nats, netns, &[])
    }

    /// The pids of the hosts' masters.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.children.iter().map(|(id, c)| (id.clone(), c.id())).collect()
    }
}

pub fn nats3() -> Result<NatsCluster, String> {
    NatsCluster::start(3)
}
