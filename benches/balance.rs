//! Connection balance: how evenly a cluster of 4 workers shares 10,000
//! short connections (connect, one `GET /` with `Connection: close`, read
//! the answer to its end, close), with one shared listening socket
//! (`ListenMode::Shared`) and with one `SO_REUSEPORT` socket per worker
//! (`--reuseport`), for the servers users run under shmcluster:
//!
//! - `std`: examples/http_cluster.rs (`Worker::incoming`, the library's
//!   accept loop);
//! - `axum`: examples/axum_cluster (tokio, `shmcluster::http::HttpServer`,
//!   one runtime thread per worker);
//! - `node`: examples/node/http.js under `shmcluster run` (libuv);
//! - `uvicorn`: examples/python/uvicorn_app.py under `shmcluster run`
//!   (asyncio).
//!
//! Each answer names the worker that made it ("worker N ..."); the client
//! counts them. Two client shapes: `1` connection at a time (sequential:
//! the next connect starts once the last answer is read, so every
//! worker is idle and waiting when a connection arrives, which is where
//! the kernel's wake order decides everything), and `8` connectors in
//! flight.
//!
//! Then, on the same cluster, what each mode costs when a worker goes
//! away, with 8 connectors running: one worker is `SIGKILL`ed [`DISRUPT_AT`]
//! into a [`KILL_RUN`] run, and then a rolling reload (`SIGHUP`) is made,
//! the connectors running until the master logs its end; the latency of
//! each connection and how many failed. With a shared socket the other
//! workers take every new connection at once; with `SO_REUSEPORT` the
//! connections the kernel hashes to the dead worker's socket wait in its
//! backlog (the master keeps the socket) until the replacement accepts. A
//! connection the killed worker had accepted fails in both modes.
//!
//! `cargo bench --bench balance` prints a markdown table on stdout: per
//! run the count of each worker, the busiest worker's share against a fair
//! one (`max/mean`: 1.00 is perfectly even, 4.00 is one worker taking
//! everything) and the coefficient of variation of the counts (standard
//! deviation over mean); then per cell the range of both over the rounds.
//! Progress goes to stderr.
//!
//! - `SHMC_BALANCE_CONNS` connections per run (default 10,000),
//!   `SHMC_BALANCE_ROUNDS` rounds (default 3: each starts every server in
//!   every mode afresh; the order turns round by round),
//!   `SHMC_BALANCE_SERVERS` a comma-separated subset of `std,axum,node,
//!   uvicorn` (default all), `SHMC_BALANCE_PYTHON` a python that has
//!   uvicorn (default: the virtual environment `target/python-servers`
//!   that tests/python_servers.rs makes, made here if missing).
//! - It builds what it runs (the example, the `shmcluster` command,
//!   `axum_cluster`, the Node addon, `libshmcluster.so`) in this target
//!   directory and profile first; `node` needs Node.js >= 20 on the PATH.
//! - A failed connection or an answer that names no worker is counted and
//!   shown; any makes the bench exit non-zero, the table still printed.
//! - `cargo test --benches` runs a quick check: `std` only, 400
//!   connections, one round.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

mod common;
use common::{machine, wait_within, warn_if_busy};

/// The tests' Python and build helpers (the C library, the virtual
/// environment, the target directory), one file for both.
#[path = "../tests/common/python.rs"]
mod python;

/// Worker processes in every cluster.
const WORKERS: usize = 4;
/// The client shapes: connections in flight at once.
const CONCURRENCY: [usize; 2] = [1, 8];
/// Longest a cluster may take to name its address and have every worker
/// online, or to exit after `SIGTERM`.
const START_LIMIT: Duration = Duration::from_secs(60);
/// Longest one connection may take (connect, write, read to the end).
const CONN_LIMIT: Duration = Duration::from_secs(10);
/// How long the kill phase drives connections.
const KILL_RUN: Duration = Duration::from_secs(4);
/// When in the kill and reload phases the worker is killed or the reload
/// asked for.
const DISRUPT_AT: Duration = Duration::from_millis(500);
/// How long the reload phase goes on after the master logged the
/// reload's end; and the longest the reload may take.
const RELOAD_TAIL: Duration = Duration::from_millis(300);
const RELOAD_LIMIT: Duration = Duration::from_secs(60);
/// A connection slower than this in the kill and reload phases is
/// counted as delayed.
const DELAYED: Duration = Duration::from_millis(100);
/// uvicorn's version, as tests/python_servers.rs pins it.
const UVICORN: &str = "uvicorn==0.55.0";

type Res<T> = Result<T, String>;

// ------------------------------------------------------------ servers

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    Std,
    Axum,
    Node,
    Uvicorn,
}

const SERVERS: [Server; 4] = [Server::Std, Server::Axum, Server::Node, Server::Uvicorn];

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Std => "std",
            Server::Axum => "axum",
            Server::Node => "node",
            Server::Uvicorn => "uvicorn",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Server::Std => "std `http_cluster`",
            Server::Axum => "axum `axum_cluster`",
            Server::Node => "Node.js `http.js`",
            Server::Uvicorn => "uvicorn `uvicorn_app`",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Shared,
    ReusePort,
}

const MODES: [Mode; 2] = [Mode::Shared, Mode::ReusePort];

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Shared => "shared",
            Mode::ReusePort => "reuseport",
        }
    }
}

/// What the servers need, built once.
struct Built {
    /// `target/<profile>`.
    profile: PathBuf,
    /// The python for uvicorn, if `uvicorn` is measured.
    python: Option<PathBuf>,
}

/// Builds what `servers` need into this bench's target directory and
/// profile.
fn build(servers: &[Server]) -> Res<Built> {
    let profile = python::profile_dir()?;
    let target = python::target_dir()?;
    let release = profile.file_name().and_then(|n| n.to_str()) != Some("debug");
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo
        .args(["build", "--quiet", "--target-dir"])
        .arg(&target)
        .current_dir(python::root());
    if release {
        cargo.arg("--release");
    }
    cargo.args(["-p", "shmcluster", "--example", "http_cluster"]);
    if servers
        .iter()
        .any(|s| matches!(s, Server::Node | Server::Uvicorn))
    {
        cargo.args(["--bin", "shmcluster"]);
    }
    if servers.contains(&Server::Axum) {
        // A package's binary is built only when named beside `--example`.
        cargo.args(["-p", "axum_cluster", "--bin", "axum_cluster"]);
    }
    eprintln!("building: {cargo:?}");
    let status = cargo.status().map_err(|e| format!("cargo build: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build: {status}"));
    }
    if servers.contains(&Server::Node) {
        // As tests/common/node.rs does: a release build of the addon,
        // copied to node/shmcluster.node.
        let out = Command::new("node")
            .arg("scripts/build.js")
            .current_dir(python::root().join("node"))
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .map_err(|e| format!("node scripts/build.js (is Node.js >= 20 on the PATH?): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "node scripts/build.js: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    let python = if servers.contains(&Server::Uvicorn) {
        python::build_library()?;
        Some(python::venv_with(
            &[UVICORN],
            "python-servers",
            "import uvicorn",
            "SHMC_BALANCE_PYTHON",
        )?)
    } else {
        None
    };
    Ok(Built { profile, python })
}

/// The command that starts `server` in `mode` with [`WORKERS`] workers on
/// a free loopback port.
fn command(built: &Built, server: Server, mode: Mode) -> Res<Command> {
    let reuseport = mode == Mode::ReusePort;
    let root = python::root();
    let cli = |cmd: &mut Command| {
        cmd.args(["run", "-w", &WORKERS.to_string(), "--listen", "127.0.0.1:0"]);
        if reuseport {
            cmd.arg("--reuseport");
        }
        cmd.arg("--");
    };
    let mut cmd;
    match server {
        Server::Std | Server::Axum => {
            cmd = Command::new(match server {
                Server::Std => built.profile.join("examples/http_cluster"),
                _ => built.profile.join("axum_cluster"),
            });
            cmd.args(["--workers", &WORKERS.to_string(), "--listen", "127.0.0.1:0"]);
            if server == Server::Axum {
                // The example's default: one runtime thread per process.
                cmd.args(["--threads", "1"]);
            }
            if reuseport {
                cmd.arg("--reuseport");
            }
        }
        Server::Node => {
            cmd = Command::new(built.profile.join("shmcluster"));
            cli(&mut cmd);
            cmd.arg("node").arg(root.join("examples/node/http.js"));
        }
        Server::Uvicorn => {
            let python = built.python.as_ref().ok_or("no python for uvicorn")?;
            cmd = Command::new(built.profile.join("shmcluster"));
            cli(&mut cmd);
            cmd.arg(python)
                .args(["-m", "uvicorn", "uvicorn_app:app", "--fd", "3", "--no-access-log"]);
            let examples = root.join("examples/python");
            cmd.env(
                "PYTHONPATH",
                format!("{}:{}", root.join("ffi/python").display(), examples.display()),
            )
            .env("SHMCLUSTER_LIB", built.profile.join("libshmcluster.so"))
            .env(
                "UVICORN_APP_COUNTER",
                std::env::temp_dir().join(format!("balance-uvicorn-{}.count", std::process::id())),
            );
        }
    }
    cmd.current_dir(root);
    Ok(cmd)
}

/// A running cluster in its own process group (one `killpg` ends it and
/// its workers); killed and reaped when dropped.
struct Running {
    child: Child,
    addr: SocketAddr,
    /// Everything it wrote, for an error.
    log: Arc<Mutex<String>>,
}

/// What the reader threads tell [`Running::start`].
enum Seen {
    Addr(String),
    Online,
}

impl Running {
    /// Starts `cmd`; returns once it named its address and every worker
    /// is online (the master's "worker N online" event lines).
    fn start(mut cmd: Command) -> Res<Running> {
        let mut child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{:?}: {e}", cmd.get_program()))?;
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, seen) = mpsc::channel();
        let pipes: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().ok_or("no stdout")?),
            Box::new(child.stderr.take().ok_or("no stderr")?),
        ];
        for pipe in pipes {
            let (tx, log) = (tx.clone(), log.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    // "listening on 127.0.0.1:PORT (master pid N)" (the
                    // examples) or "..., listening on 127.0.0.1:PORT"
                    // (`shmcluster run`).
                    if let Some((_, rest)) = line.split_once("listening on ") {
                        let addr = rest.split_whitespace().next().unwrap_or_default();
                        let _ = tx.send(Seen::Addr(addr.to_owned()));
                    }
                    if line.contains(" online (slot ") {
                        let _ = tx.send(Seen::Online);
                    }
                    let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let until = Instant::now() + START_LIMIT;
        let (mut addr, mut online) = (None, 0);
        while addr.is_none() || online < WORKERS {
            let left = until.saturating_duration_since(Instant::now());
            match seen.recv_timeout(left) {
                Ok(Seen::Addr(a)) => addr = Some(a),
                Ok(Seen::Online) => online += 1,
                Err(_) => {
                    let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
                    let _ = child.wait();
                    let log = log.lock().unwrap_or_else(PoisonError::into_inner).clone();
                    return Err(format!(
                        "{addr:?}, {online} of {WORKERS} workers online after {START_LIMIT:?}:\n{log}"
                    ));
                }
            }
        }
        let addr = addr.unwrap_or_default();
        let addr = addr.parse().map_err(|e| format!("address {addr:?}: {e}"))?;
        Ok(Running { child, addr, log })
    }

    /// `SIGTERM`; the master must exit 0.
    fn stop(mut self) -> Res<()> {
        let pid = Pid::from_raw(self.child.id() as i32);
        kill(pid, Signal::SIGTERM).map_err(|e| format!("SIGTERM: {e}"))?;
        let status = wait_within(&mut self.child, START_LIMIT)?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("exited {status} after SIGTERM:\n{}", self.log()))
        }
    }

    /// The master's children: its workers (`/proc/<pid>/task/<pid>/children`).
    fn workers(&self) -> Res<Vec<i32>> {
        let pid = self.child.id();
        let path = format!("/proc/{pid}/task/{pid}/children");
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        Ok(text.split_whitespace().filter_map(|p| p.parse().ok()).collect())
    }

    fn log(&self) -> String {
        self.log.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

// ------------------------------------------------------------ the client

/// One connection: connect, `GET /` with `Connection: close`, read to the
/// end; the worker number its answer names ("worker N ...", or "hello
/// from worker N" for uvicorn).
fn one(addr: SocketAddr) -> Res<u32> {
    let mut s = TcpStream::connect_timeout(&addr, CONN_LIMIT).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(CONN_LIMIT)).map_err(|e| e.to_string())?;
    let _ = s.set_nodelay(true);
    s.write_all(b"GET / HTTP/1.1\r\nHost: balance\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::with_capacity(512);
    s.read_to_end(&mut answer).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    if !text.starts_with("HTTP/1.1 200") {
        return Err(format!("not a 200: {:?}", text.lines().next().unwrap_or("")));
    }
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let (_, after) = body
        .split_once("worker ")
        .ok_or_else(|| format!("no worker named in {body:?}"))?;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .map_err(|_| format!("no worker number in {body:?}"))
}

/// What one run counted.
#[derive(Debug, Clone, Default)]
struct Run {
    /// Answers per worker number.
    counts: BTreeMap<u32, u64>,
    failures: u64,
    /// The first failure's text.
    first_failure: Option<String>,
    elapsed: Duration,
}

impl Run {
    /// The counts of [`WORKERS`] workers, busiest first (a worker that
    /// answered nothing counts 0).
    fn sorted(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.counts.values().copied().collect();
        v.resize(v.len().max(WORKERS), 0);
        v.sort_unstable_by(|a, b| b.cmp(a));
        v
    }

    /// The busiest worker's count over the mean count.
    fn max_over_mean(&self) -> f64 {
        let v = self.sorted();
        let mean = v.iter().sum::<u64>() as f64 / v.len() as f64;
        if mean == 0.0 {
            0.0
        } else {
            v[0] as f64 / mean
        }
    }

    /// Standard deviation of the counts over their mean.
    fn cv(&self) -> f64 {
        let v = self.sorted();
        let n = v.len() as f64;
        let mean = v.iter().sum::<u64>() as f64 / n;
        if mean == 0.0 {
            return 0.0;
        }
        let var = v.iter().map(|&c| (c as f64 - mean).powi(2)).sum::<f64>() / n;
        var.sqrt() / mean
    }

    fn answered(&self) -> u64 {
        self.counts.values().sum()
    }
}

/// `conns` connections to `addr`, `concurrency` at a time (each connector
/// thread makes its share one after another).
fn drive(addr: SocketAddr, conns: usize, concurrency: usize) -> Run {
    let start = Instant::now();
    let threads: Vec<_> = (0..concurrency)
        .map(|t| {
            let share = conns / concurrency + usize::from(t < conns % concurrency);
            std::thread::spawn(move || {
                let mut run = Run::default();
                for _ in 0..share {
                    match one(addr) {
                        Ok(w) => *run.counts.entry(w).or_default() += 1,
                        Err(e) => {
                            run.failures += 1;
                            run.first_failure.get_or_insert(e);
                        }
                    }
                }
                run
            })
        })
        .collect();
    let mut total = Run::default();
    for t in threads {
        let run = t.join().unwrap_or_else(|_| Run {
            failures: 1,
            first_failure: Some("a connector panicked".into()),
            ..Run::default()
        });
        for (w, c) in run.counts {
            *total.counts.entry(w).or_default() += c;
        }
        total.failures += run.failures;
        if total.first_failure.is_none() {
            total.first_failure = run.first_failure;
        }
    }
    total.elapsed = start.elapsed();
    total
}

/// What goes wrong in a disruption phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disruption {
    /// `SIGKILL` to one worker.
    Kill,
    /// `SIGHUP` to the master: a rolling reload of every worker.
    Reload,
}

impl Disruption {
    fn label(self) -> &'static str {
        match self {
            Disruption::Kill => "worker killed",
            Disruption::Reload => "rolling reload",
        }
    }
}

/// What a disruption phase saw.
#[derive(Debug, Clone, Default)]
struct Crash {
    /// Latency of each answered connection.
    latencies: Vec<Duration>,
    failures: u64,
}

impl Crash {
    /// The latency at quantile `q` (nearest rank).
    fn at(&self, q: f64) -> Duration {
        let mut v = self.latencies.clone();
        v.sort_unstable();
        v.get(((v.len().max(1) - 1) as f64 * q).round() as usize)
            .copied()
            .unwrap_or_default()
    }

    fn delayed(&self) -> usize {
        self.latencies.iter().filter(|&&l| l > DELAYED).count()
    }
}

/// 8 connectors while `what` happens to `running`, [`DISRUPT_AT`] after
/// they start: for [`KILL_RUN`] in all for a kill; for a reload, until
/// [`RELOAD_TAIL`] after the master logged its end.
fn disrupt(running: &Running, what: Disruption) -> Res<Crash> {
    let victim = *running.workers()?.first().ok_or("the master has no worker")?;
    let reloads_before = running.log().matches("reload finished").count();
    let addr = running.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..CONCURRENCY[1])
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut c = Crash::default();
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    match one(addr) {
                        Ok(_) => c.latencies.push(start.elapsed()),
                        Err(_) => c.failures += 1,
                    }
                }
                c
            })
        })
        .collect();
    let started = Instant::now();
    std::thread::sleep(DISRUPT_AT);
    let result = match what {
        Disruption::Kill => kill(Pid::from_raw(victim), Signal::SIGKILL)
            .map_err(|e| format!("SIGKILL {victim}: {e}"))
            .map(|()| std::thread::sleep(KILL_RUN.saturating_sub(started.elapsed()))),
        Disruption::Reload => {
            let master = Pid::from_raw(running.child.id() as i32);
            kill(master, Signal::SIGHUP).map_err(|e| format!("SIGHUP: {e}"))?;
            let until = Instant::now() + RELOAD_LIMIT;
            loop {
                if running.log().matches("reload finished").count() > reloads_before {
                    std::thread::sleep(RELOAD_TAIL);
                    break Ok(());
                }
                if Instant::now() >= until {
                    break Err(format!("no reload finished after {RELOAD_LIMIT:?}"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    stop.store(true, Ordering::Relaxed);
    let mut total = Crash::default();
    for t in threads {
        let c = t.join().map_err(|_| "a connector panicked")?;
        total.latencies.extend(c.latencies);
        total.failures += c.failures;
    }
    result.map(|()| total)
}

// ------------------------------------------------------------ the plan

struct Plan {
    servers: Vec<Server>,
    conns: usize,
    rounds: usize,
    full: bool,
}

fn setting(name: &str, default: usize) -> Res<usize> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => match v.parse() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{name}={v:?}: a positive number")),
        },
    }
}

fn plan() -> Res<Plan> {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    let full = std::env::args().any(|a| a == "--bench");
    let servers = match std::env::var("SHMC_BALANCE_SERVERS") {
        Ok(list) => list
            .split(',')
            .map(|name| {
                SERVERS
                    .into_iter()
                    .find(|s| s.name() == name.trim())
                    .ok_or_else(|| {
                        format!("SHMC_BALANCE_SERVERS: no server {name:?} (std, axum, node, uvicorn)")
                    })
            })
            .collect::<Res<Vec<_>>>()?,
        Err(_) if full => SERVERS.to_vec(),
        Err(_) => vec![Server::Std],
    };
    Ok(Plan {
        servers,
        conns: setting("SHMC_BALANCE_CONNS", if full { 10_000 } else { 400 })?,
        rounds: setting("SHMC_BALANCE_ROUNDS", if full { 3 } else { 1 })?,
        full,
    })
}

/// One row of the disruption table.
struct CrashRow {
    server: Server,
    mode: Mode,
    what: Disruption,
    round: usize,
    crash: Crash,
}

/// One row of the table.
struct Row {
    server: Server,
    mode: Mode,
    concurrency: usize,
    round: usize,
    run: Run,
}

fn main() {
    match bench() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("balance: {e}");
            std::process::exit(1);
        }
    }
}

/// Runs the plan and prints the table; whether every connection got an
/// answer that named its worker.
fn bench() -> Res<bool> {
    let plan = plan()?;
    let built = build(&plan.servers)?;
    warn_if_busy();
    let mut rows = Vec::new();
    let mut crashes = Vec::new();
    let mut errors = Vec::new();
    let cells: Vec<(Server, Mode)> = plan.servers.iter().flat_map(|&s| MODES.map(|m| (s, m))).collect();
    for round in 0..plan.rounds {
        for k in 0..cells.len() {
            let (server, mode) = cells[(k + round) % cells.len()];
            eprintln!(
                "round {}/{}: {} · {}",
                round + 1,
                plan.rounds,
                server.label(),
                mode.label()
            );
            let running = match Running::start(command(&built, server, mode)?) {
                Ok(r) => r,
                Err(e) => {
                    errors.push(format!("{} {}: start: {e}", server.name(), mode.label()));
                    continue;
                }
            };
            for concurrency in CONCURRENCY {
                let run = drive(running.addr, plan.conns, concurrency);
                if let Some(e) = &run.first_failure {
                    errors.push(format!(
                        "{} {} ×{concurrency}: {} failed connections, the first: {e}",
                        server.name(),
                        mode.label(),
                        run.failures
                    ));
                }
                eprintln!(
                    "  ×{concurrency}: {:?} in {:.1} s",
                    run.sorted(),
                    run.elapsed.as_secs_f64()
                );
                rows.push(Row {
                    server,
                    mode,
                    concurrency,
                    round,
                    run,
                });
            }
            for what in [Disruption::Kill, Disruption::Reload] {
                match disrupt(&running, what) {
                    Ok(crash) => {
                        eprintln!(
                            "  {}: {} answered, {} failed, max {:?}",
                            what.label(),
                            crash.latencies.len(),
                            crash.failures,
                            crash.at(1.0)
                        );
                        crashes.push(CrashRow {
                            server,
                            mode,
                            what,
                            round,
                            crash,
                        });
                    }
                    Err(e) => errors.push(format!(
                        "{} {}: {}: {e}",
                        server.name(),
                        mode.label(),
                        what.label()
                    )),
                }
            }
            if let Err(e) = running.stop() {
                errors.push(format!("{} {}: stop: {e}", server.name(), mode.label()));
            }
        }
    }
    print_table(&plan, &rows);
    print_crashes(&crashes);
    for e in &errors {
        eprintln!("error: {e}");
    }
    Ok(errors.is_empty())
}

fn print_table(plan: &Plan, rows: &[Row]) {
    let mut out = String::new();
    let command = if plan.full {
        "cargo bench --bench balance".to_owned()
    } else {
        "cargo test --benches (a quick check, not figures)".to_owned()
    };
    let _ = writeln!(out, "Machine: {}", machine());
    let _ = writeln!(out);
    let _ = writeln!(out, "Command: `{command}`");
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{} connections per run over {WORKERS} workers, each connect → `GET /` → close; \
         ×1: one at a time, ×8: 8 in flight. Counts busiest first; max/mean 1.00 is even, \
         {WORKERS}.00 is one worker taking all.",
        plan.conns
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| server | mode | conns in flight | round | per worker | max/mean | CV | conn/s | failed |"
    );
    let _ = writeln!(out, "|---|---|--:|--:|---|--:|--:|--:|--:|");
    let mut sorted: Vec<&Row> = rows.iter().collect();
    let key = |r: &Row| {
        (
            SERVERS.iter().position(|&s| s == r.server),
            MODES.iter().position(|&m| m == r.mode),
            r.concurrency,
            r.round,
        )
    };
    sorted.sort_by_key(|r| key(r));
    for r in &sorted {
        let counts: Vec<String> = r.run.sorted().iter().map(u64::to_string).collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.0} | {} |",
            r.server.label(),
            r.mode.label(),
            r.concurrency,
            r.round + 1,
            counts.join(" / "),
            r.run.max_over_mean(),
            r.run.cv(),
            r.run.answered() as f64 / r.run.elapsed.as_secs_f64().max(1e-9),
            r.run.failures
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "Over the rounds (lowest – highest):");
    let _ = writeln!(out);
    let _ = writeln!(out, "| server | mode | conns in flight | max/mean | CV |");
    let _ = writeln!(out, "|---|---|--:|--:|--:|");
    let same_load =
        |a: &&Row, b: &&Row| a.server == b.server && a.mode == b.mode && a.concurrency == b.concurrency;
    for same in sorted.chunk_by(same_load) {
        let first = same[0];
        let range = |f: &dyn Fn(&Run) -> f64| {
            let v: Vec<f64> = same.iter().map(|r| f(&r.run)).collect();
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!("{lo:.2} – {hi:.2}")
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            first.server.label(),
            first.mode.label(),
            first.concurrency,
            range(&|r| r.max_over_mean()),
            range(&|r| r.cv())
        );
    }
    print!("{out}");
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn print_crashes(crashes: &[CrashRow]) {
    let mut sorted: Vec<&CrashRow> = crashes.iter().collect();
    sorted.sort_by_key(|r| {
        (
            r.what == Disruption::Reload,
            SERVERS.iter().position(|&s| s == r.server),
            MODES.iter().position(|&m| m == r.mode),
            r.round,
        )
    });
    let mut out = String::new();
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "8 connectors while a worker is killed ({DISRUPT_AT:?} into {KILL_RUN:?}) and while \
         every worker is reloaded (SIGHUP at {DISRUPT_AT:?}, until {RELOAD_TAIL:?} after the \
         master logged the reload's end): latency of the connections answered, how many took \
         over {DELAYED:?}, and how many failed (a kill fails what the killed worker had \
         accepted)."
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| what | server | mode | round | answered | p50 | p99 | max | over {DELAYED:?} | failed |"
    );
    let _ = writeln!(out, "|---|---|---|--:|--:|--:|--:|--:|--:|--:|");
    for r in sorted {
        let c = &r.crash;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.what.label(),
            r.server.label(),
            r.mode.label(),
            r.round + 1,
            c.latencies.len(),
            ms(c.at(0.5)),
            ms(c.at(0.99)),
            ms(c.at(1.0)),
            c.delayed(),
            c.failures
        );
    }
    print!("{out}");
}
