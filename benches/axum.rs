//! HTTP benchmark: `examples/axum_cluster` under `wrk` on loopback, a plain
//! route, a route that adds to a counter under the cluster lock
//! (`synchronize_key`) and a route that `map`s over every worker, each on a
//! cluster of 1 worker and of N workers (one per CPU, at least 2), beside
//! the same axum app in a single process whose counter is behind a
//! `std::sync::Mutex` (`--single`), all in one run.
//!
//! `cargo bench --bench axum` prints a markdown table on
//! stdout (progress goes to stderr). It needs `wrk` on the `PATH` (the
//! Debian package) and fails at once, loudly, without it. It builds the
//! example itself (`cargo build --release -p axum_cluster`: the example is
//! a package of its own, built into the target directory this binary runs
//! from), so the server is never a stale build.
//!
//! - Each server starts fresh (`--listen 127.0.0.1:0 --quiet`, a new
//!   `--data` directory), answers a `wrk` warm-up run per route that is not
//!   recorded, then one measured `wrk -t2 -c32 -d<secs>s --latency` run per
//!   route, and is stopped with `SIGTERM` (it must exit 0).
//! - [`SECS_VAR`] sets the length of a measured run (default 5 s),
//!   [`ROUNDS_VAR`] the number of rounds (default 1). Each round starts
//!   every server once; the order of the servers and of the routes turns
//!   round by round, so that a slow minute of a shared machine does not
//!   fall on one cell. A cell shows the median of its rounds, each column
//!   on its own; errors are the sum.
//! - Any socket error or non-2xx/3xx response is shown in the table and
//!   makes the bench exit non-zero, the table still printed (one in a
//!   warm-up run too, on stderr).
//! - The counter is checked after each server's `POST /counter` runs: at
//!   least one addition per POST answered 2xx, and no more than could have
//!   been in flight besides.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

mod common;
use common::{machine, wait_within, warn_if_busy};

/// Length of each measured `wrk` run, in seconds.
const SECS_VAR: &str = "SHMC_BENCH_SECS";
/// Rounds: each starts every server once and measures every route on it.
const ROUNDS_VAR: &str = "SHMC_BENCH_ROUNDS";
/// Default for [`SECS_VAR`].
const DEFAULT_SECS: u64 = 5;
/// The unrecorded `wrk` run before each measured one, in seconds.
const WARMUP_SECS: u64 = 1;
/// `wrk`'s threads.
const WRK_THREADS: u32 = 2;
/// `wrk`'s keep-alive connections (each has one request in flight).
const CONNECTIONS: u64 = 32;
/// The example this bench drives.
const EXAMPLE: &str = "axum_cluster";
/// Longest a server may take to announce its address, to answer, or to
/// exit after `SIGTERM`; and how much longer than asked `wrk` may run.
const LIMIT: Duration = Duration::from_secs(30);

type Res<T> = Result<T, String>;

// ------------------------------------------------------------ what is measured

/// The example's routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// `GET /`: plain text, no shared state.
    Plain,
    /// `POST /counter`: adds 1 under the cluster lock (`synchronize_key`),
    /// or under the `Mutex` in the single process.
    Synchronize,
    /// `GET /stats`: a `map` over every worker.
    Map,
}

const ROUTES: [Route; 3] = [Route::Plain, Route::Synchronize, Route::Map];

impl Route {
    fn path(self) -> &'static str {
        match self {
            Route::Plain => "/",
            Route::Synchronize => "/counter",
            Route::Map => "/stats",
        }
    }

    /// Whether `wrk` needs the script that makes its requests `POST`s.
    fn posts(self) -> bool {
        self == Route::Synchronize
    }

    fn label(self) -> String {
        let (name, method) = match self {
            Route::Plain => ("plain", "GET"),
            Route::Synchronize => ("synchronize", "POST"),
            Route::Map => ("map", "GET"),
        };
        format!("{name} `{method} {}`", self.path())
    }
}

/// How the example is started. The thread counts are the example's
/// defaults, passed explicitly so that the table says what ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// `--single --threads t`: one process with a runtime of `t` threads
    /// (one per CPU), the counter behind a `std::sync::Mutex`.
    Single { threads: usize },
    /// `--workers n --threads 1`: a master and `n` worker processes, each
    /// with a runtime of one thread.
    Cluster { workers: u32 },
}

impl Setup {
    fn args(self) -> Vec<String> {
        let (mode, threads) = match self {
            Setup::Single { threads } => (vec!["--single".into()], threads),
            Setup::Cluster { workers } => (vec!["--workers".into(), workers.to_string()], 1),
        };
        [mode, vec!["--threads".into(), threads.to_string()]].concat()
    }

    /// The entries `/stats` answers with: one per worker.
    fn workers(self) -> usize {
        match self {
            Setup::Single { .. } => 1,
            Setup::Cluster { workers } => workers as usize,
        }
    }

    fn is_baseline(self) -> bool {
        matches!(self, Setup::Single { .. })
    }

    fn label(self) -> String {
        match self {
            Setup::Single { threads } => {
                format!("single process ({}), `Mutex`", plural(threads, "thread"))
            }
            Setup::Cluster { workers } => {
                format!("cluster, {} × 1 thread", plural(workers as usize, "worker"))
            }
        }
    }
}

// ------------------------------------------------------------ wrk

/// What one `wrk` run reported.
#[derive(Debug, Clone, Copy, Default)]
struct Load {
    /// Responses, whatever their status.
    requests: u64,
    requests_per_s: f64,
    /// Latency percentiles 50, 90 and 99, in microseconds.
    latency_us: [f64; 3],
    /// connect, read, write, timeout ("Socket errors"; absent means none).
    socket_errors: [u64; 4],
    /// "Non-2xx or 3xx responses" (absent means none).
    non_2xx: u64,
}

impl Load {
    fn errors(&self) -> u64 {
        self.socket_errors.iter().sum::<u64>() + self.non_2xx
    }
}

/// The percentiles of `wrk --latency`'s distribution kept in [`Load`].
const PERCENTILES: [&str; 3] = ["50%", "90%", "99%"];

/// A `wrk` time ("812.00us", "1.25ms", "2.00s", "1.50m") in microseconds.
fn parse_time_us(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(number.parse::<f64>().ok()? * scale)
}

/// The number `v` in `wrk`'s line `line`.
fn number<T: std::str::FromStr>(line: &str, v: &str) -> Res<T>
where
    T::Err: std::fmt::Display,
{
    v.trim().parse().map_err(|e| format!("wrk: {line:?}: {e}"))
}

/// Reads `wrk --latency`'s summary.
fn parse_wrk(text: &str) -> Res<Load> {
    let mut load = Load::default();
    let mut seen_rate = false;
    let mut seen_latency = [false; 3];
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            load.requests_per_s = number(line, v)?;
            seen_rate = true;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            load.non_2xx = number(line, v)?;
        } else if let Some((n, _)) = line.split_once(" requests in ") {
            load.requests = number(line, n)?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 12, write 0, timeout 0"
            for (i, part) in v.split(',').enumerate().take(4) {
                load.socket_errors[i] = number(line, part.split_whitespace().nth(1).unwrap_or(""))?;
            }
        } else if let Some((p, v)) = line.split_once(char::is_whitespace) {
            // "50%  812.00us" in the latency distribution.
            if let Some(i) = PERCENTILES.iter().position(|&q| q == p) {
                load.latency_us[i] =
                    parse_time_us(v.trim()).ok_or_else(|| format!("wrk: {line:?}: not a time"))?;
                seen_latency[i] = true;
            }
        }
    }
    if seen_rate && seen_latency.iter().all(|&s| s) {
        Ok(load)
    } else {
        Err(format!(
            "no Requests/sec or latency distribution in wrk's output:\n{text}"
        ))
    }
}

/// The `wrk` command line for `route` on `addr`, `seconds` long.
fn wrk_args(addr: &str, route: Route, seconds: u64, script: &Path) -> Vec<String> {
    let mut args = vec![
        format!("-t{WRK_THREADS}"),
        format!("-c{CONNECTIONS}"),
        format!("-d{seconds}s"),
        "--latency".into(),
    ];
    if route.posts() {
        args.push("-s".into());
        args.push(script.display().to_string());
    }
    args.push(format!("http://{addr}{}", route.path()));
    args
}

/// Runs `wrk` with `args` and reads its summary.
fn run_wrk(args: &[String], seconds: u64) -> Res<Load> {
    let child = Command::new("wrk")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("wrk: {e}"))?;
    let mut wrk = Reaped(child);
    let stdout = drain(wrk.0.stdout.take());
    let stderr = drain(wrk.0.stderr.take());
    let status = wait_within(&mut wrk.0, Duration::from_secs(seconds) + LIMIT)
        .map_err(|e| format!("wrk {}: {e}", args.join(" ")))?;
    let text = stdout.text_within(LIMIT);
    if !status.success() {
        return Err(format!(
            "wrk {}: {status}\n{text}{}",
            args.join(" "),
            stderr.text_within(LIMIT)
        ));
    }
    parse_wrk(&text)
}

/// Whether `name` is an executable file in a `PATH` directory.
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

// ------------------------------------------------------------ child processes

/// A child that is killed (`SIGKILL`) and reaped when dropped, unless it has
/// been reaped already: no process outlives the bench, whatever fails. A
/// cluster's workers die with their master (their parent-death signal).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A pipe read to its end by a thread of its own, so that the child never
/// blocks on a full pipe (a cluster's workers share their master's).
struct Drained {
    text: Arc<Mutex<String>>,
    done: mpsc::Receiver<()>,
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> Drained {
    let text = Arc::new(Mutex::new(String::new()));
    let (tx, done) = mpsc::channel();
    let into = text.clone();
    std::thread::spawn(move || {
        if let Some(mut pipe) = pipe {
            let mut buf = [0; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                let chunk = String::from_utf8_lossy(&buf[..n]);
                into.lock().unwrap_or_else(|e| e.into_inner()).push_str(&chunk);
            }
        }
        let _ = tx.send(());
    });
    Drained { text, done }
}

impl Drained {
    /// What was read, once the pipe has ended or `limit` has passed.
    fn text_within(&self, limit: Duration) -> String {
        let _ = self.done.recv_timeout(limit);
        self.text.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// `kill(2)`: sends `signal` to process `pid`.
fn signal(pid: u32, signal: Signal) -> Res<()> {
    let raw = i32::try_from(pid).map_err(|e| e.to_string())?;
    kill(Pid::from_raw(raw), signal).map_err(|e| format!("{signal} to {pid}: {e}"))
}

// ------------------------------------------------------------ the server

/// The example binary in the target directory this bench runs from
/// (`<target>/release/axum_cluster`), built (or brought up to date) by cargo.
fn build_example() -> Res<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // <target>/release/deps/axum-<hash>
    let release = exe.parent().and_then(Path::parent).ok_or("no target directory")?;
    let target = release.parent().ok_or("no target directory")?;
    let bin = release.join(EXAMPLE);
    eprintln!("building {}", bin.display());
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", EXAMPLE, "--bin", EXAMPLE])
        .arg("--target-dir")
        .arg(target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        // Progress only: stdout is the table's.
        .stdout(std::io::stderr())
        .status()
        .map_err(|e| format!("cargo build: {e}"))?;
    if status.success() && bin.is_file() {
        Ok(bin)
    } else {
        Err(format!("cargo build --release -p {EXAMPLE}: {status}"))
    }
}

/// A running example: killed and reaped if dropped before [`Server::stop`].
struct Server {
    child: Reaped,
    master: u32,
    addr: SocketAddr,
    log: Drained,
    /// Its `--data` directory, removed with it.
    data: PathBuf,
}

impl Server {
    fn start(bin: &Path, setup: Setup, data: PathBuf) -> Res<Server> {
        std::fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
        let child = Command::new(bin)
            .args(setup.args())
            .args(["--listen", "127.0.0.1:0", "--quiet", "--data"])
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let master = child.id();
        let mut child = Reaped(child);
        let log = drain(child.0.stderr.take());
        let stdout = child.0.stdout.take().ok_or("no stdout")?;
        // The first line announces the address; the rest is read (and
        // dropped) by the same thread until the server is gone.
        let (tx, first) = mpsc::channel();
        std::thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            let mut line = String::new();
            let _ = tx.send(stdout.read_line(&mut line).map(|_| line));
            let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        });
        let mut server = Server {
            child,
            master,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
            data,
        };
        let line = match first.recv_timeout(LIMIT) {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => return Err(server.failed(&format!("reading its stdout: {e}"))),
            Err(_) => return Err(server.failed(&format!("no address announced within {LIMIT:?}"))),
        };
        // "listening on 127.0.0.1:PORT (master pid N)"
        server.addr = match line
            .strip_prefix("listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
        {
            Some(addr) => addr,
            None => return Err(server.failed(&format!("unexpected first line {line:?}"))),
        };
        if let Err(e) = await_ready(server.addr, setup.workers()) {
            return Err(server.failed(&e));
        }
        Ok(server)
    }

    /// An error with what the server wrote on stderr so far.
    fn failed(&self, what: &str) -> String {
        let log = self.log.text_within(Duration::ZERO);
        let mut text = format!("server (pid {}): {what}", self.master);
        if !log.trim().is_empty() {
            let _ = write!(text, "\nits stderr:\n{}", log.trim_end());
        }
        text
    }

    /// `SIGTERM` to the master, then waits for it; it must exit 0.
    fn stop(mut self) -> Res<()> {
        signal(self.master, Signal::SIGTERM)?;
        match wait_within(&mut self.child.0, LIMIT) {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(self.failed(&format!("after SIGTERM: {status}"))),
            Err(e) => Err(self.failed(&format!("after SIGTERM: {e}"))),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The child itself is killed and reaped by its `Reaped`, dropped
        // after this.
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// One request on a fresh connection: the status and the body.
fn http(addr: SocketAddr, method: &str, path: &str) -> Res<(u16, String)> {
    let answer = TcpStream::connect(addr).and_then(|mut s| {
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    });
    let text = answer.map_err(|e| format!("{method} {path}: {e}"))?;
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3)?.parse().ok())
        .ok_or_else(|| format!("{method} {path}: not an HTTP answer: {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok((status, body.to_owned()))
}

/// `GET path`, which must answer 200 with a JSON object.
fn get_json(addr: SocketAddr, path: &str) -> Res<serde_json::Value> {
    let (status, body) = http(addr, "GET", path)?;
    if status != 200 {
        return Err(format!("GET {path}: {status} {body}"));
    }
    // From the first `{` to the last `}`: also reads a body sent as one chunk.
    let object = body
        .find('{')
        .zip(body.rfind('}'))
        .and_then(|(a, b)| body.get(a..=b))
        .unwrap_or("");
    serde_json::from_str(object).map_err(|e| format!("GET {path}: {e}: {body:?}"))
}

/// Whether the server answers `GET /`, and `GET /stats` with an entry for
/// each of its `workers` and no error.
fn ready(addr: SocketAddr, workers: usize) -> Res<()> {
    match http(addr, "GET", "/")? {
        (200, _) => {}
        (status, body) => return Err(format!("GET /: {status} {body}")),
    }
    let stats = get_json(addr, "/stats")?;
    let count = |key: &str| stats[key].as_array().map_or(0, Vec::len);
    if count("workers") == workers && count("errors") == 0 {
        Ok(())
    } else {
        Err(format!("GET /stats: {workers} workers expected, got {stats}"))
    }
}

/// Waits until the server is [`ready`]: a cluster's workers come online
/// just after the master announces its address.
fn await_ready(addr: SocketAddr, workers: usize) -> Res<()> {
    let deadline = Instant::now() + LIMIT;
    loop {
        match ready(addr, workers) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(format!("not ready in {LIMIT:?}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The counter's value (`GET /counter`).
fn counter(addr: SocketAddr) -> Res<u64> {
    let answer = get_json(addr, "/counter")?;
    answer["value"]
        .as_u64()
        .ok_or_else(|| format!("GET /counter: no value in {answer}"))
}

// ------------------------------------------------------------ one run of the bench

/// Settings of this run.
struct Plan {
    secs: u64,
    rounds: usize,
    setups: Vec<Setup>,
    bin: PathBuf,
    /// This run's temporary directory: the `wrk` script and every server's
    /// `--data` directory.
    dir: PathBuf,
}

/// The temporary directory, removed with everything in it when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Plan {
    fn script(&self) -> PathBuf {
        self.dir.join("post.lua")
    }
}

/// What every server of the run measured.
struct Results {
    /// Per setup, per route (the order of [`Plan::setups`] and [`ROUTES`]).
    cells: Vec<Vec<Cell>>,
    /// The counter check of each server that served `POST /counter`.
    counters: Vec<CounterCheck>,
    /// What went wrong, with the server's stderr.
    failures: Vec<String>,
}

/// After a server's `POST /counter` runs, `GET /counter` must be at least
/// the number of POSTs answered 2xx (no addition lost) and at most that
/// plus the ones that may have been in flight or on a broken connection
/// when `wrk` stopped (no addition counted twice).
#[derive(Debug, Clone, Copy, Default)]
struct CounterCheck {
    answered: u64,
    most: u64,
    value: u64,
}

impl CounterCheck {
    fn add(&mut self, load: &Load) {
        self.answered += load.requests - load.non_2xx.min(load.requests);
        self.most += load.requests + CONNECTIONS + load.socket_errors.iter().sum::<u64>();
    }

    fn ok(&self) -> bool {
        (self.answered..=self.most).contains(&self.value)
    }
}

/// Every measured run of one cell (route × setup), one per round.
#[derive(Debug, Default)]
struct Cell {
    loads: Vec<Load>,
    failures: usize,
}

/// Starts `setup`, warms every route up, measures every route (in an order
/// that turns with `round`), checks the counter and stops the server.
fn measure_setup(plan: &Plan, s: usize, round: usize, results: &mut Results) -> Res<()> {
    let setup = plan.setups[s];
    let server = Server::start(&plan.bin, setup, unique(plan.dir.join("data")))?;
    let addr = server.addr.to_string();
    let script = plan.script();
    let mut check = CounterCheck::default();
    for k in 0..ROUTES.len() {
        let r = (k + round) % ROUTES.len();
        let route = ROUTES[r];
        eprintln!(
            "round {}/{}: {} · {} ({WARMUP_SECS} s warm-up, {} s)",
            round + 1,
            plan.rounds,
            setup.label(),
            route.label(),
            plan.secs
        );
        let warmup = run_wrk(&wrk_args(&addr, route, WARMUP_SECS, &script), WARMUP_SECS)
            .map_err(|e| server.failed(&e))?;
        if warmup.errors() > 0 {
            // Not in the table, but a failed request all the same.
            let what = format!(
                "{} · {}: warm-up: {}",
                setup.label(),
                route.label(),
                errors(&warmup)
            );
            results.failures.push(server.failed(&what));
        }
        let measured = run_wrk(&wrk_args(&addr, route, plan.secs, &script), plan.secs);
        let cell = &mut results.cells[s][r];
        match measured {
            Ok(load) => {
                cell.loads.push(load);
                if route.posts() {
                    check.add(&warmup);
                    check.add(&load);
                }
            }
            Err(e) => {
                cell.failures += 1;
                results.failures.push(server.failed(&e));
            }
        }
    }
    if check.most > 0 {
        check.value = counter(server.addr).map_err(|e| server.failed(&e))?;
        if !check.ok() {
            results.failures.push(server.failed(&format!(
                "GET /counter is {} after {} POSTs answered 2xx (at most {} could have added)",
                check.value, check.answered, check.most
            )));
        }
        results.counters.push(check);
    }
    server.stop()
}

/// `path`, or `path` with a number appended if it exists already.
fn unique(path: PathBuf) -> PathBuf {
    let mut candidate = path.clone();
    let mut n = 0;
    while candidate.exists() {
        n += 1;
        candidate = PathBuf::from(format!("{}-{n}", path.display()));
    }
    candidate
}

/// "1 worker", "2 workers".
fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_unstable_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One cell's figures: each the median of its rounds; errors summed.
fn summary(cell: &Cell) -> Option<Load> {
    if cell.loads.is_empty() {
        return None;
    }
    let of = |f: &dyn Fn(&Load) -> f64| median(cell.loads.iter().map(f).collect());
    let mut load = Load {
        requests_per_s: of(&|l| l.requests_per_s),
        ..Load::default()
    };
    for i in 0..PERCENTILES.len() {
        load.latency_us[i] = of(&|l| l.latency_us[i]);
    }
    for l in &cell.loads {
        for (sum, n) in load.socket_errors.iter_mut().zip(l.socket_errors) {
            *sum += n;
        }
        load.non_2xx += l.non_2xx;
    }
    Some(load)
}

fn time(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

fn errors(l: &Load) -> String {
    if l.errors() == 0 {
        return "0".into();
    }
    let [c, r, w, t] = l.socket_errors;
    format!(
        "**{}** (connect {c}, read {r}, write {w}, timeout {t}; non-2xx {})",
        l.errors(),
        l.non_2xx
    )
}

/// A positive whole number from the environment variable `name`.
fn setting<T: std::str::FromStr + PartialOrd + From<u8>>(name: &str, default: T) -> Res<T> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => match v.trim().parse::<T>() {
            Ok(n) if n >= T::from(1) => Ok(n),
            _ => Err(format!("{name}={v:?}: expected a whole number ≥ 1")),
        },
    }
}

/// The command that reproduces this run.
fn command(plan: &Plan) -> String {
    let mut env = String::new();
    if plan.secs != DEFAULT_SECS {
        let _ = write!(env, "{SECS_VAR}={} ", plan.secs);
    }
    if plan.rounds != 1 {
        let _ = write!(env, "{ROUNDS_VAR}={} ", plan.rounds);
    }
    format!("{env}cargo bench --bench axum")
}

fn print_table(plan: &Plan, cells: &[Vec<Cell>]) {
    println!(
        "| route | server | req/s | p50 | p90 | p99 | errors (socket, non-2xx) | req/s ÷ single process |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (r, route) in ROUTES.iter().enumerate() {
        let baseline = plan
            .setups
            .iter()
            .position(|s| s.is_baseline())
            .and_then(|s| summary(&cells[s][r]))
            .map(|l| l.requests_per_s);
        for (s, setup) in plan.setups.iter().enumerate() {
            let first = if s == 0 { route.label() } else { String::new() };
            let cell = &cells[s][r];
            let Some(load) = summary(cell) else {
                println!("| {first} | {} | failed | | | | | |", setup.label());
                continue;
            };
            let ratio = match baseline {
                _ if setup.is_baseline() => "—".into(),
                Some(b) if b > 0.0 => format!("{:.2}×", load.requests_per_s / b),
                _ => "no baseline".into(),
            };
            let [p50, p90, p99] = load.latency_us.map(time);
            let failed = if cell.failures > 0 {
                format!(" ({})", plural(cell.failures, "failed run"))
            } else {
                String::new()
            };
            println!(
                "| {first} | {} | {:.0}{failed} | {p50} | {p90} | {p99} | {} | {ratio} |",
                setup.label(),
                load.requests_per_s,
                errors(&load)
            );
        }
    }
}

fn print_counters(checks: &[CounterCheck]) {
    let ok = checks.iter().filter(|c| c.ok()).count();
    let mark = if ok == checks.len() { "✓" } else { "✗" };
    let answered: u64 = checks.iter().map(|c| c.answered).sum();
    let value: u64 = checks.iter().map(|c| c.value).sum();
    println!(
        "Counter check (no addition lost or doubled): {ok} of {} servers {mark}; \
         {answered} POSTs answered 2xx, counters at {value} in all.",
        checks.len()
    );
}

fn main() {
    // `cargo bench` passes `--bench` (and a filter, if given): every run is
    // the full run, so the arguments are ignored.
    if let Err(e) = run() {
        eprintln!("axum bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    if !on_path("wrk") {
        eprintln!();
        eprintln!("************************************************************");
        eprintln!("* axum bench: `wrk` is not installed (not on the PATH).    *");
        eprintln!("* Install the Debian package: sudo apt-get install wrk     *");
        eprintln!("************************************************************");
        eprintln!();
        return Err("wrk not found".into());
    }
    let secs = setting(SECS_VAR, DEFAULT_SECS)?;
    let rounds = setting(ROUNDS_VAR, 1usize)?;
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let many = u32::try_from(cpus).unwrap_or(u32::MAX).max(2);
    let bin = build_example()?;
    let dir = unique(std::env::temp_dir().join(format!("shmcluster-bench-axum-{}", std::process::id())));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let _dir = TempDir(dir.clone());
    let plan = Plan {
        secs,
        rounds,
        setups: vec![
            Setup::Single { threads: cpus },
            Setup::Cluster { workers: 1 },
            Setup::Cluster { workers: many },
        ],
        bin,
        dir,
    };
    std::fs::write(plan.script(), "wrk.method = \"POST\"\n")
        .map_err(|e| format!("{}: {e}", plan.script().display()))?;

    warn_if_busy();
    let mut results = Results {
        cells: plan
            .setups
            .iter()
            .map(|_| ROUTES.iter().map(|_| Cell::default()).collect())
            .collect(),
        counters: Vec::new(),
        failures: Vec::new(),
    };
    for round in 0..plan.rounds {
        for k in 0..plan.setups.len() {
            let s = (k + round) % plan.setups.len();
            if let Err(e) = measure_setup(&plan, s, round, &mut results) {
                results.failures.push(format!("{}: {e}", plan.setups[s].label()));
            }
        }
    }

    println!("Machine: {}", machine());
    println!();
    println!("Command: `{}`", command(&plan));
    println!();
    let wrk = wrk_args(
        "127.0.0.1:PORT",
        Route::Synchronize,
        plan.secs,
        Path::new("post.lua"),
    );
    let servers: Vec<String> = plan
        .setups
        .iter()
        .map(|s| format!("`{}`", s.args().join(" ")))
        .collect();
    println!(
        "Each cell: `wrk {}` (`post.lua`: `wrk.method = \"POST\"`; the GET routes without `-s`), \
         after an unrecorded {WARMUP_SECS} s run; the median of {}. Servers: `{EXAMPLE}` \
         with {}, each with `--listen 127.0.0.1:0 --quiet` and a fresh `--data` directory.",
        wrk.join(" "),
        plural(plan.rounds, "round"),
        servers.join(", ")
    );
    println!();
    print_table(&plan, &results.cells);
    println!();
    print_counters(&results.counters);

    let errors: u64 = results
        .cells
        .iter()
        .flatten()
        .flat_map(|c| &c.loads)
        .map(Load::errors)
        .sum();
    let failures = &results.failures;
    if !failures.is_empty() {
        eprintln!();
        for f in failures {
            eprintln!("failed: {f}");
        }
        println!();
        println!("**{}** (on stderr)", plural(failures.len(), "failure"));
    }
    if errors > 0 {
        println!();
        let failed = plural(errors as usize, "failed request");
        println!("**{failed}** (socket errors or non-2xx/3xx responses)");
    }
    if failures.is_empty() && errors == 0 {
        Ok(())
    } else {
        Err(format!(
            "{}, {}",
            plural(failures.len(), "failure"),
            plural(errors as usize, "failed request")
        ))
    }
}
