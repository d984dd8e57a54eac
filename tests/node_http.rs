//! `examples/node/http.js` under the real `shmcluster` command: Node.js
//! workers listening on the socket the master bound (`listener()`, fd 3
//! from `LISTEN_FDS`) and draining when told to stop (`drainOnStop`),
//! driven over HTTP/1.1 from the outside — `wrk` through two rolling
//! reloads (no socket error, no non-2xx answer: wrk never retries), a
//! graceful shutdown with a slow request in flight (answered 200, master
//! exits 0), and the counter the workers share under `synchronize`.
//! `node` (>= 20) and `wrk` must be on the `PATH`.
//!
//! `harness = false`, as tests/axum_cluster.rs: each scenario runs in this
//! binary re-executed (`SHMC_SCENARIO=<name>`, `common::run_suite`) under
//! two watchdogs, one inside the scenario process that kills the master's
//! process group and fails, and `run_suite`'s outer one. Arguments filter
//! scenarios by substring. Before any scenario this binary builds the
//! addon (`node node/scripts/build.js` through tests/common/node.rs: the
//! release addon, as `npm install`, in this binary's target directory; a
//! no-op when it is up to date), so that a clean clone needs
//! no `npm install` first and a stale `node/shmcluster.node` is never run.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;

#[macro_use]
mod common;
#[path = "common/node.rs"]
mod node;
use common::{wait_child, Check};
use node::{build_addon, root};

/// The `shmcluster` command.
const BIN: &str = env!("CARGO_BIN_EXE_shmcluster");

/// Worker instances of every scenario's cluster.
const WORKERS: usize = 4;

struct Scenario {
    name: &'static str,
    timeout: Duration,
    run: fn() -> Check,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "reloads_under_wrk_fail_no_get",
        timeout: Duration::from_secs(60),
        run: reloads_under_wrk_fail_no_get,
    },
    Scenario {
        name: "reloads_under_wrk_fail_no_get_reuseport",
        timeout: Duration::from_secs(60),
        run: reloads_under_wrk_fail_no_get_reuseport,
    },
    Scenario {
        name: "shutdown_finishes_the_slow_request_in_flight",
        timeout: Duration::from_secs(40),
        run: shutdown_finishes_the_slow_request_in_flight,
    },
    Scenario {
        name: "counter_is_exact_across_workers",
        timeout: Duration::from_secs(40),
        run: counter_is_exact_across_workers,
    },
];

fn main() {
    if let Ok(name) = std::env::var("SHMC_SCENARIO") {
        let s = SCENARIOS.iter().find(|s| s.name == name).expect("known scenario");
        watchdog(s.name, s.timeout);
        let result = (s.run)();
        common::exit_scenario(&name, result);
    }
    if !std::env::args().any(|a| a == "--list") {
        if let Err(e) = build_addon() {
            eprintln!("node_http: {e}");
            std::process::exit(1);
        }
    }
    // The outer limit leaves the inner watchdog time to kill the cluster.
    let scenarios: Vec<_> = SCENARIOS
        .iter()
        .map(|s| (s.name, s.timeout + Duration::from_secs(10)))
        .collect();
    let (ran, failed) = common::run_suite("node-http", &scenarios);
    common::finish_suite(ran, &failed);
}

// ------------------------------------------------------------ scenarios

/// `wrk -t2 -c32 -d8s` on `GET /` while the master reloads every worker
/// twice (SIGHUP at 2 s and 5 s, one shared socket): wrk sees no socket
/// error and no non-2xx answer — a draining worker that closed a
/// keep-alive connection with a request on its way would show up as a read
/// error — every worker is replaced twice, the old ones are gone, and
/// every answer afterwards comes from the last generation.
fn reloads_under_wrk_fail_no_get() -> Check {
    reloads_under_wrk(&[])
}

/// The same with `--reuseport`: one `SO_REUSEPORT` socket per instance,
/// which the master keeps across the reload and hands to the replacement.
fn reloads_under_wrk_fail_no_get_reuseport() -> Check {
    reloads_under_wrk(&["--reuseport"])
}

fn reloads_under_wrk(extra: &[&str]) -> Check {
    let server = Server::start_with(extra)?;
    let before = server.workers()?;
    let script = common::tmp().join("pids.lua");
    std::fs::write(&script, PIDS_SCRIPT).map_err(|e| format!("{}: {e}", script.display()))?;
    let mut wrk = Command::new("wrk")
        .args(["-t2", "-c32", "-d8s", "--timeout", "10s", "-s"])
        .arg(&script)
        .arg(format!("http://{}/", server.addr))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("wrk (the Debian package; `.ci/run` installs it): {e}"))?;
    // Read on threads, so that a full pipe never stops wrk.
    let out = read_all(wrk.stdout.take());
    let err = read_all(wrk.stderr.take());
    let start = Instant::now();
    let reloads = (|| {
        std::thread::sleep(Duration::from_secs(2));
        server.signal(Signal::SIGHUP)?;
        // Every worker replaced once (one at a time; on a slow machine the
        // second SIGHUP waits for it, later than 5 s).
        let between =
            server.wait_for_workers(Duration::from_secs(15), |w| w.pids().is_disjoint(&before.pids()))?;
        std::thread::sleep(Duration::from_secs(5).saturating_sub(start.elapsed()));
        server.signal(Signal::SIGHUP)?;
        Ok::<_, String>((between, start.elapsed()))
    })();
    let status = wait_child(&mut wrk, Duration::from_secs(25));
    let (between, second) = reloads?;
    let status = status?;
    let output = format!("{}{}", join(out)?, join(err)?);
    ensure!(status.success(), "wrk exited {status}:\n{output}");
    let after =
        server.wait_for_workers(Duration::from_secs(15), |w| w.pids().is_disjoint(&between.pids()))?;
    let run = Wrk::parse(&output)?;
    println!(
        "    {} wrk GET / through two reloads (SIGHUP at 2 s and {second:.1?}): {} requests, socket errors \
         (connect, read, write, timeout) {:?}, non-2xx {}; answered by {} pids; pids {:?} -> {:?} -> {:?}",
        if extra.is_empty() {
            "one shared socket:"
        } else {
            "--reuseport:"
        },
        run.requests,
        run.socket_errors,
        run.non_2xx,
        run.pids.len(),
        before.pids(),
        between.pids(),
        after.pids()
    );
    ensure!(
        run.socket_errors == [0; 4] && run.non_2xx == 0,
        "wrk saw socket errors {:?} and {} non-2xx answers:\n{output}",
        run.socket_errors,
        run.non_2xx
    );
    ensure!(
        run.requests > 100,
        "wrk made only {} requests:\n{output}",
        run.requests
    );
    ensure!(
        between.pids().is_disjoint(&before.pids()) && after.pids().is_disjoint(&between.pids()),
        "not every worker was replaced twice"
    );
    // Answers came from the first two generations during the load: the
    // load moved to the replacements. (The third may start late in the
    // run on a slow machine; it is checked below, after the load.)
    for (name, set) in [("first", &before), ("second", &between)] {
        ensure!(
            !set.pids().is_disjoint(&run.pids),
            "no answer during the load came from the {name} generation's pids {:?} (answers from {:?})",
            set.pids(),
            run.pids
        );
    }
    // The old workers drained and exited; what answers now is the last
    // generation, on new connections and their keep-alive successors.
    let old: BTreeSet<u32> = before.pids().union(&between.pids()).copied().collect();
    let start = Instant::now();
    while let Some(pid) = old.iter().find(|p| alive(**p)) {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "the replaced worker {pid} still runs 10 s after the reloads"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut generations = BTreeMap::new();
    for _ in 0..20 {
        let mut conn = Conn::open(&server.addr).map_err(|e| e.to_string())?;
        for _ in 0..2 {
            let r = conn.send("GET", "/").map_err(|e| e.to_string())?;
            ensure!(r.status == 200, "GET /: {} {}", r.status, r.body);
            let (slot, pid, generation) = banner(&r.body)?;
            ensure!(
                after.pids().contains(&pid),
                "pid {pid} answered after the reloads, not one of {:?}",
                after.pids()
            );
            let expected = after.workers.iter().find(|w| w.pid == pid).map(|w| w.generation);
            ensure!(
                expected == Some(generation) && after.workers.iter().any(|w| w.slot == slot && w.pid == pid),
                "GET / answered slot {slot} pid {pid} generation {generation}; /workers says {:?}",
                after.workers
            );
            *generations.entry((slot, generation)).or_insert(0) += 1;
        }
    }
    println!("    after the reloads, 40 GET / answered by (slot, generation) {generations:?}");
    server.stop()
}

/// wrk's script: collects the pid of each answer (`GET /`'s banner) and
/// prints them once, summed over its threads.
const PIDS_SCRIPT: &str = r#"
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end
function init(args)
  pids = {}
end
function response(status, headers, body)
  local pid = string.match(body, "pid (%d+)")
  if pid then pids[pid] = true end
end
function done(summary, latency, requests)
  local all = {}
  for _, t in ipairs(threads) do
    for pid, _ in pairs(t:get("pids")) do all[pid] = true end
  end
  local list = {}
  for pid, _ in pairs(all) do table.insert(list, pid) end
  io.write("answered by pids: " .. table.concat(list, " ") .. "\n")
end
"#;

/// SIGTERM to the master 200 ms into `GET /slow?ms=800`: the request is
/// answered 200 (and its connection then closed), every worker drains,
/// and the master exits 0.
fn shutdown_finishes_the_slow_request_in_flight() -> Check {
    let server = Server::start()?;
    let mut conn = Conn::open(&server.addr).map_err(|e| e.to_string())?;
    let start = Instant::now();
    conn.write_request("GET", "/slow?ms=800")
        .map_err(|e| format!("write: {e}"))?;
    std::thread::sleep(Duration::from_millis(200));
    server.signal(Signal::SIGTERM)?;
    let r = conn.read_response().map_err(|e| e.to_string())?;
    let took = start.elapsed();
    ensure!(
        r.status == 200,
        "the request in flight got {} {}",
        r.status,
        r.body
    );
    let (slot, pid, _) = banner(&r.body)?;
    ensure!(
        took >= Duration::from_millis(800),
        "answered after {took:?}, before its 800 ms"
    );
    ensure!(r.close, "the draining worker's answer lacks `Connection: close`");
    ensure!(
        conn.closed_within(Duration::from_secs(5))?,
        "the connection stayed open after the draining worker's last answer"
    );
    let (status, log) = server.wait(Duration::from_secs(15))?;
    println!(
        "    SIGTERM 200 ms into an 800 ms request: answered 200 after {took:?} by slot {slot} pid {pid}, \
         with `Connection: close`; master exited {status}"
    );
    ensure!(status.success(), "the master exited {status}:\n{log}");
    Ok(())
}

/// `POST /count`'s answers: (value, fencing token, slot).
type Counted = Vec<(u64, u64, u64)>;

/// 200 `POST /count` from 8 threads over keep-alive connections: the
/// workers' shared counter (a file, changed under `synchronize('count')`)
/// returns every value 1..=200 exactly once, with growing fencing tokens,
/// and more than one worker answered.
fn counter_is_exact_across_workers() -> Check {
    let server = Server::start()?;
    let barrier = Arc::new(Barrier::new(8));
    let threads: Vec<JoinHandle<Result<Counted, String>>> = (0..8)
        .map(|_| {
            let (addr, barrier) = (server.addr.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut got = Vec::new();
                barrier.wait();
                for _ in 0..5 {
                    let mut conn = Conn::open(&addr).map_err(|e| format!("connect: {e}"))?;
                    for _ in 0..5 {
                        let r = conn.send("POST", "/count").map_err(|e| e.to_string())?;
                        ensure!(r.status == 200, "POST /count: {} {}", r.status, r.body);
                        let v = r.json()?;
                        got.push((field(&v, "value")?, field(&v, "token")?, field(&v, "slot")?));
                    }
                }
                Ok(got)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in threads {
        answers.extend(t.join().map_err(|_| "a client thread panicked")??);
    }
    answers.sort_unstable();
    let values: Vec<u64> = answers.iter().map(|a| a.0).collect();
    ensure!(
        values == (1..=200).collect::<Vec<_>>(),
        "200 POST /count did not return 1..=200 exactly once: {values:?}"
    );
    ensure!(
        answers.windows(2).all(|w| w[0].1 < w[1].1),
        "fencing tokens do not grow with the values"
    );
    let slots: BTreeMap<u64, usize> = answers.iter().fold(BTreeMap::new(), |mut m, a| {
        *m.entry(a.2).or_default() += 1;
        m
    });
    ensure!(
        slots.len() >= 2,
        "every POST was answered by one worker: {slots:?}"
    );
    let mut conn = Conn::open(&server.addr).map_err(|e| e.to_string())?;
    let r = conn.send("GET", "/count").map_err(|e| e.to_string())?;
    ensure!(r.status == 200, "GET /count: {} {}", r.status, r.body);
    let total = field(&r.json()?, "value")?;
    ensure!(total == 200, "GET /count = {total}, expected 200");
    drop(conn);
    println!(
        "    200 POST /count over 40 connections: values 1..=200 exactly once; answers by slot {slots:?}"
    );
    server.stop()
}

// ------------------------------------------------------------ wrk's summary

/// What wrk's summary says.
#[derive(Debug, Default)]
struct Wrk {
    /// Answers, whatever their status ("N requests in ...").
    requests: u64,
    /// connect, read, write, timeout ("Socket errors: ..."; absent: none).
    socket_errors: [u64; 4],
    /// "Non-2xx or 3xx responses: N" (absent: none).
    non_2xx: u64,
    /// The script's "answered by pids: ...".
    pids: BTreeSet<u32>,
}

impl Wrk {
    fn parse(text: &str) -> Result<Wrk, String> {
        let number = |line: &str, v: &str| {
            v.trim()
                .parse::<u64>()
                .map_err(|e| format!("wrk: {line:?}: {e}\n{text}"))
        };
        let mut wrk = Wrk::default();
        let (mut summary, mut pids) = (false, false);
        for line in text.lines().map(str::trim) {
            if let Some((n, _)) = line.split_once(" requests in ") {
                wrk.requests = number(line, n)?;
                summary = true;
            } else if let Some(v) = line.strip_prefix("Socket errors:") {
                // "connect 0, read 12, write 0, timeout 0"
                let parts: Vec<&str> = v.split(',').map(str::trim).collect();
                ensure!(parts.len() == 4, "wrk: {line:?}");
                for (i, (part, name)) in parts
                    .iter()
                    .zip(["connect", "read", "write", "timeout"])
                    .enumerate()
                {
                    let n = part.strip_prefix(name).ok_or(format!("wrk: {line:?}"))?;
                    wrk.socket_errors[i] = number(line, n)?;
                }
            } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
                wrk.non_2xx = number(line, v)?;
            } else if let Some(v) = line.strip_prefix("answered by pids:") {
                for pid in v.split_whitespace() {
                    wrk.pids.insert(number(line, pid)? as u32);
                }
                pids = true;
            }
        }
        ensure!(summary, "no summary in wrk's output:\n{text}");
        ensure!(pids, "the script printed no pids:\n{text}");
        Ok(wrk)
    }
}

fn read_all(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

fn join(t: JoinHandle<String>) -> Result<String, String> {
    t.join().map_err(|_| "a pipe reader panicked".to_string())
}

// ------------------------------------------------------------ the cluster

/// The master's pid (= its process group) for the watchdog; 0 when none
/// runs.
static MASTER: AtomicI32 = AtomicI32::new(0);

/// Fails the scenario after `limit`: kills the master's process group and
/// exits 1 (`run_suite` reports it).
fn watchdog(name: &'static str, limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        let master = MASTER.load(Ordering::Acquire);
        if master > 0 {
            let _ = killpg(Pid::from_raw(master), Signal::SIGKILL);
        }
        eprintln!("WATCHDOG: scenario {name} still running after {limit:?}; killed the cluster");
        std::process::exit(1);
    });
}

/// `shmcluster run -w 4 --listen 127.0.0.1:0 [extra] -- node
/// examples/node/http.js` in its own process group, so that one `killpg` ends it and its workers.
/// Dropping it kills the group and reaps the master.
struct Server {
    child: Child,
    addr: String,
    /// Everything the master and its workers wrote to stderr.
    log: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts the cluster; returns once `/workers` shows every worker.
    fn start() -> Result<Server, String> {
        Server::start_with(&[])
    }

    /// `start`, with `extra` options of `shmcluster run`.
    fn start_with(extra: &[&str]) -> Result<Server, String> {
        let mut child = Command::new(BIN)
            .args(["run", "-w", &WORKERS.to_string(), "--listen", "127.0.0.1:0"])
            .args(extra)
            .arg("--")
            .arg("node")
            .arg(root().join("examples/node/http.js"))
            .current_dir(root())
            // The shared counter's file, in the scenario's scratch directory.
            .env("SHMC_HTTP_DATA", common::tmp())
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{BIN}: {e}"))?;
        MASTER.store(child.id() as i32, Ordering::Release);
        let stderr = child.stderr.take().ok_or("no stderr pipe")?;
        let log = Arc::new(Mutex::new(String::new()));
        let (first, address) = mpsc::channel();
        let reader = {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut first = Some(first);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    // "shmcluster: master pid N, 4 workers, control socket
                    // PATH, listening on 127.0.0.1:PORT"
                    if let Some((_, rest)) = line.split_once(", listening on ") {
                        if let Some(tx) = first.take() {
                            let _ = tx.send(rest.split_whitespace().next().unwrap_or_default().to_owned());
                        }
                    }
                    let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
                    log.push_str(&line);
                    log.push('\n');
                }
            })
        };
        let mut server = Server {
            child,
            addr: String::new(),
            log,
            reader: Some(reader),
        };
        server.addr = address
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| format!("the master named no address in 10 s:\n{}", server.log()))?;
        server.wait_for_workers(Duration::from_secs(20), |_| true)?;
        Ok(server)
    }

    fn log(&self) -> String {
        self.log.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn signal(&self, sig: Signal) -> Check {
        kill(Pid::from_raw(self.child.id() as i32), sig).map_err(|e| format!("{sig} to the master: {e}"))
    }

    /// `GET /workers` on a new connection (a `map` over every worker).
    fn workers(&self) -> Result<Workers, String> {
        let mut conn = Conn::open(&self.addr).map_err(|e| format!("connect: {e}"))?;
        let r = conn.send("GET", "/workers").map_err(|e| e.to_string())?;
        ensure!(r.status == 200, "GET /workers: {} {}", r.status, r.body);
        Workers::parse(&r.body)
    }

    /// Polls `/workers` until it shows every worker (and no more), no
    /// errors, and `done`.
    fn wait_for_workers(&self, limit: Duration, done: impl Fn(&Workers) -> bool) -> Result<Workers, String> {
        let start = Instant::now();
        loop {
            let last = self.workers();
            if let Ok(w) = &last {
                let slots: BTreeSet<u32> = w.workers.iter().map(|w| w.slot).collect();
                if w.workers.len() == WORKERS && w.errors == 0 && slots.len() == WORKERS && done(w) {
                    return last;
                }
            }
            if start.elapsed() > limit {
                return Err(format!(
                    "after {limit:?}, /workers still shows {last:?}\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the master to exit; its status and everything the
    /// cluster wrote to stderr.
    fn wait(mut self, limit: Duration) -> Result<(std::process::ExitStatus, String), String> {
        let status = wait_child(&mut self.child, limit)?;
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        Ok((status, self.log()))
    }

    /// SIGTERM, then the master must exit 0.
    fn stop(self) -> Check {
        self.signal(Signal::SIGTERM)?;
        let (status, log) = self.wait(Duration::from_secs(15))?;
        ensure!(
            status.success(),
            "the master exited {status} after SIGTERM:\n{log}"
        );
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
            let _ = self.child.wait();
        }
        MASTER.store(0, Ordering::Release);
    }
}

/// Whether `pid` runs (a zombie does not).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

// ------------------------------------------------------------ what the example answers

#[derive(Debug)]
struct Workers {
    workers: Vec<WorkerInfo>,
    errors: usize,
}

#[derive(Debug)]
struct WorkerInfo {
    slot: u32,
    pid: u32,
    generation: u32,
}

impl Workers {
    fn parse(body: &str) -> Result<Workers, String> {
        let v: Value = serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))?;
        let mut workers = Vec::new();
        for w in v["workers"].as_array().ok_or(format!("no workers in {body}"))? {
            workers.push(WorkerInfo {
                slot: field(w, "slot")? as u32,
                pid: field(w, "pid")? as u32,
                generation: field(w, "generation")? as u32,
            });
        }
        let errors = v["errors"]
            .as_array()
            .ok_or(format!("no errors in {body}"))?
            .len();
        Ok(Workers { workers, errors })
    }

    fn pids(&self) -> BTreeSet<u32> {
        self.workers.iter().map(|w| w.pid).collect()
    }
}

/// A number field of a JSON object.
fn field(v: &Value, name: &str) -> Result<u64, String> {
    v[name].as_u64().ok_or(format!("no number {name:?} in {v}"))
}

/// "worker <slot> pid <pid> generation <g>" (`GET /`, `GET /slow`).
fn banner(body: &str) -> Result<(u32, u32, u32), String> {
    let words: Vec<&str> = body.split_whitespace().collect();
    match words[..] {
        ["worker", slot, "pid", pid, "generation", generation] => {
            let n = |s: &str| s.parse::<u32>().map_err(|e| format!("{body:?}: {e}"));
            Ok((n(slot)?, n(pid)?, n(generation)?))
        }
        _ => Err(format!("answered {body:?}")),
    }
}

// ------------------------------------------------------------ a small HTTP/1.1 client

struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

struct Response {
    status: u16,
    body: String,
    /// The server will close the connection after this answer.
    close: bool,
}

impl Response {
    fn json(&self) -> Result<Value, String> {
        serde_json::from_str(&self.body).map_err(|e| format!("{e}: {:?}", self.body))
    }
}

impl Conn {
    fn open(addr: &str) -> io::Result<Conn> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Conn {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    fn send(&mut self, method: &str, path: &str) -> Result<Response, String> {
        self.write_request(method, path)
            .map_err(|e| format!("write: {e}"))?;
        self.read_response()
    }

    fn write_request(&mut self, method: &str, path: &str) -> io::Result<()> {
        let length = if method == "GET" {
            ""
        } else {
            "Content-Length: 0\r\n"
        };
        self.writer
            .write_all(format!("{method} {path} HTTP/1.1\r\nHost: test\r\n{length}\r\n").as_bytes())
    }

    fn line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("connection closed mid-answer".into()),
            Ok(_) => Ok(line.trim_end().to_owned()),
            Err(e) => Err(format!("read: {e}")),
        }
    }

    /// One answer with a `Content-Length` (the example always sends one).
    fn read_response(&mut self) -> Result<Response, String> {
        let status_line = self.line()?;
        let status = match status_line.split_whitespace().collect::<Vec<_>>()[..] {
            ["HTTP/1.1", code, ..] => code.parse::<u16>().map_err(|e| format!("{status_line:?}: {e}"))?,
            _ => return Err(format!("status line {status_line:?}")),
        };
        let (mut length, mut close) = (None, false);
        loop {
            let line = self.line()?;
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').ok_or(format!("header {line:?}"))?;
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => {
                    length = Some(value.parse::<usize>().map_err(|e| format!("{line:?}: {e}"))?)
                }
                "connection" => close = value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let mut body = vec![0; length.ok_or("no Content-Length")?];
        self.reader
            .read_exact(&mut body)
            .map_err(|e| format!("body: {e}"))?;
        Ok(Response {
            status,
            body: String::from_utf8(body).map_err(|e| format!("body is not UTF-8: {e}"))?,
            close,
        })
    }

    /// Whether the server closes the connection (EOF or reset) within
    /// `limit`, sending nothing.
    fn closed_within(&mut self, limit: Duration) -> Result<bool, String> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(limit))
            .map_err(|e| e.to_string())?;
        match self.reader.fill_buf() {
            Ok([]) => Ok(true),
            Ok(data) => Err(format!("unasked-for bytes: {:?}", String::from_utf8_lossy(data))),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Ok(false),
            Err(_) => Ok(true),
        }
    }
}
