//! Driving an HTTP cluster under `shmcluster` from a `harness = false`
//! test (tests/node_http.rs, tests/python_servers.rs,
//! tests/axum_cluster.rs): the scenario's watchdog that kills the master's
//! process group, a `shmcluster run` master in its own process group that
//! names its address on stderr ([`Cluster`]), `wrk`'s summary and its
//! pipes, whether a pid still runs, and a small HTTP/1.1 keep-alive
//! client.
//!
//! Included by path (`#[path = "common/http.rs"] mod http;`) next to
//! `#[macro_use] mod common;`, so that other tests never build it.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use super::common::{wait_child, Check};

// ------------------------------------------------------------ the suite

/// A scenario: its name, the time its own watchdog gives it, and its body.
pub struct Scenario {
    pub name: &'static str,
    pub timeout: Duration,
    pub run: fn() -> Check,
}

/// A `harness = false` test's `main`: re-executed as `SHMC_SCENARIO=<name>`,
/// runs that scenario under [`watchdog`]; else runs `prepare` (not for
/// `--list`; its error ends the test, named by `test`), then every
/// scenario (`common::run_suite` as `suite`, each with 10 s more than its
/// own watchdog, so that the inner one has time to kill the cluster).
pub fn run_main(test: &str, suite: &str, scenarios: &[Scenario], prepare: impl FnOnce() -> Check) {
    if let Ok(name) = std::env::var("SHMC_SCENARIO") {
        let s = scenarios.iter().find(|s| s.name == name).expect("known scenario");
        watchdog(s.name, s.timeout);
        let result = (s.run)();
        super::common::exit_scenario(&name, result);
    }
    if !std::env::args().any(|a| a == "--list") {
        if let Err(e) = prepare() {
            eprintln!("{test}: {e}");
            std::process::exit(1);
        }
    }
    let outer: Vec<_> = scenarios
        .iter()
        .map(|s| (s.name, s.timeout + Duration::from_secs(10)))
        .collect();
    let (ran, failed) = super::common::run_suite(suite, &outer);
    super::common::finish_suite(ran, &failed);
}

// ------------------------------------------------------------ the watchdog and the master

/// The master's pid (= its process group) for the watchdog; 0 when none
/// runs.
pub static MASTER: AtomicI32 = AtomicI32::new(0);

/// Fails the scenario after `limit`: kills the master's process group
/// ([`MASTER`]) and exits 1 (`run_suite` reports it).
pub fn watchdog(name: &'static str, limit: Duration) {
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

// ------------------------------------------------------------ the master

/// A `shmcluster run --listen 127.0.0.1:0 ...` master started by the
/// test in its own process group, so that one `killpg` ends it and its
/// workers; its pid is in [`MASTER`] for the watchdog. Dropping it kills
/// the group and reaps the master.
pub struct Cluster {
    child: Child,
    /// The address the master named ("listening on ADDR").
    pub addr: String,
    /// Everything the master and its workers wrote to stderr (and stdout,
    /// if logged).
    log: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

impl Cluster {
    /// Spawns `cmd` in its own process group (stdin from /dev/null, stderr
    /// into the log; stdout into the log too if `log_stdout`, else
    /// inherited); returns once the master named its address (10 s).
    pub fn spawn(cmd: &mut Command, log_stdout: bool) -> Result<Cluster, String> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let mut child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(if log_stdout {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{program}: {e}"))?;
        MASTER.store(child.id() as i32, Ordering::Release);
        let stdout = child.stdout.take();
        let stderr = child.stderr.take().ok_or("no stderr pipe")?;
        let log = Arc::new(Mutex::new(String::new()));
        if let Some(stdout) = stdout {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
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
        let mut cluster = Cluster {
            child,
            addr: String::new(),
            log,
            reader: Some(reader),
        };
        cluster.addr = address
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| format!("the master named no address in 10 s:\n{}", cluster.log()))?;
        Ok(cluster)
    }

    /// A master the caller spawned in its own process group (its output
    /// goes elsewhere: the log stays empty); `addr` is the caller's to set.
    pub fn adopt(child: Child) -> Cluster {
        MASTER.store(child.id() as i32, Ordering::Release);
        Cluster {
            child,
            addr: String::new(),
            log: Arc::new(Mutex::new(String::new())),
            reader: None,
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn signal(&self, sig: Signal) -> Check {
        kill(Pid::from_raw(self.child.id() as i32), sig).map_err(|e| format!("{sig} to the master: {e}"))
    }

    /// Waits for the master to exit; its status and everything the
    /// cluster wrote.
    pub fn wait(mut self, limit: Duration) -> Result<(ExitStatus, String), String> {
        let status = wait_child(&mut self.child, limit)?;
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        Ok((status, self.log()))
    }

    /// Waits up to `limit` for the master to exit, but not for the end of
    /// its log, which a process that inherited its stderr (a binary
    /// upgrade's new master) may keep open; its status. The log goes on.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<ExitStatus, String> {
        wait_child(&mut self.child, limit)
    }

    /// SIGTERM, then the master must exit 0 within `limit`.
    pub fn stop(self, limit: Duration) -> Check {
        self.signal(Signal::SIGTERM)?;
        let (status, log) = self.wait(limit)?;
        ensure!(
            status.success(),
            "the master exited {status} after SIGTERM:\n{log}"
        );
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
            let _ = self.child.wait();
        }
        MASTER.store(0, Ordering::Release);
    }
}

/// Whether `pid` runs (a zombie does not).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// A number field of a JSON object.
pub fn field(v: &Value, name: &str) -> Result<u64, String> {
    v[name].as_u64().ok_or(format!("no number {name:?} in {v}"))
}

// ------------------------------------------------------------ wrk

/// wrk's script for `GET /`: collects the pid of each answer (the
/// banner's "pid N") and prints them once, summed over its threads
/// ("answered by pids: ...", [`Wrk::pids`]).
pub const PIDS_SCRIPT: &str = r#"
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

/// What wrk's summary says.
#[derive(Debug, Default)]
pub struct Wrk {
    /// Answers, whatever their status ("N requests in ...").
    pub requests: u64,
    /// connect, read, write, timeout ("Socket errors: ..."; absent: none).
    pub socket_errors: [u64; 4],
    /// "Non-2xx or 3xx responses: N" (absent: none).
    pub non_2xx: u64,
    /// [`PIDS_SCRIPT`]'s "answered by pids: ...".
    pub pids: BTreeSet<u32>,
    /// Whether the output had that line.
    pub has_pids: bool,
    /// A POST script's "2xx POSTs: N".
    pub posted: Option<u64>,
}

impl Wrk {
    /// The summary in `text` (wrk's stdout and stderr).
    pub fn parse(text: &str) -> Result<Wrk, String> {
        let number = |line: &str, v: &str| {
            v.trim()
                .parse::<u64>()
                .map_err(|e| format!("wrk: {line:?}: {e}\n{text}"))
        };
        let mut wrk = Wrk::default();
        let mut summary = false;
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
                    let n = part
                        .strip_prefix(name)
                        .ok_or_else(|| format!("wrk: {line:?}: no {name}"))?;
                    wrk.socket_errors[i] = number(line, n)?;
                }
            } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
                wrk.non_2xx = number(line, v)?;
            } else if let Some(v) = line.strip_prefix("answered by pids:") {
                for pid in v.split_whitespace() {
                    wrk.pids.insert(number(line, pid)? as u32);
                }
                wrk.has_pids = true;
            } else if let Some(v) = line.strip_prefix("2xx POSTs:") {
                wrk.posted = Some(number(line, v)?);
            }
        }
        ensure!(summary, "no summary in wrk's output:\n{text}");
        Ok(wrk)
    }

    /// [`Wrk::parse`], and [`PIDS_SCRIPT`]'s line must be there.
    pub fn parse_with_pids(text: &str) -> Result<Wrk, String> {
        let wrk = Wrk::parse(text)?;
        ensure!(wrk.has_pids, "the script printed no pids:\n{text}");
        Ok(wrk)
    }

    /// A load that failed nothing: no socket error, no non-2xx answer
    /// (wrk never retries), and more than 100 requests. `output` is
    /// wrk's, said with a failure.
    pub fn failed_nothing(&self, output: &str) -> Check {
        ensure!(
            self.socket_errors == [0; 4] && self.non_2xx == 0,
            "wrk saw socket errors (connect, read, write, timeout) {:?} and {} non-2xx answers:\n{output}",
            self.socket_errors,
            self.non_2xx
        );
        ensure!(
            self.requests > 100,
            "wrk made only {} requests:\n{output}",
            self.requests
        );
        Ok(())
    }
}

/// Reads `pipe` to its end on a thread, so that a full pipe never stops
/// the child writing it.
pub fn read_all(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

/// What a [`read_all`] thread read.
pub fn join(t: JoinHandle<String>) -> Result<String, String> {
    t.join().map_err(|_| "a pipe reader panicked".to_string())
}

// ------------------------------------------------------------ wrk through reloads

/// One `wrk` run through two rolling reloads ([`wrk_through_two_reloads`]).
pub struct ReloadsUnderWrk {
    /// wrk's stdout, then its stderr.
    pub output: String,
    /// The workers' pids before, between and after the two reloads.
    pub pids: [BTreeSet<u32>; 3],
    /// When the second reload was asked for, from wrk's start.
    pub second_reload: Duration,
}

impl ReloadsUnderWrk {
    /// Every worker was replaced by each reload.
    pub fn every_worker_replaced_twice(&self) -> Check {
        let [before, between, after] = &self.pids;
        ensure!(
            between.is_disjoint(before) && after.is_disjoint(between),
            "not every worker was replaced twice: pids {before:?} -> {between:?} -> {after:?}"
        );
        Ok(())
    }

    /// The workers of the first two generations have exited, within `limit`.
    pub fn old_workers_gone(&self, limit: Duration) -> Check {
        let start = std::time::Instant::now();
        while let Some(pid) = self.pids[..2].iter().flatten().find(|p| alive(**p)) {
            ensure!(
                start.elapsed() < limit,
                "the replaced worker {pid} still runs {limit:?} after the reloads"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

/// `wrk -t2 -c<connections> -d<secs>s --timeout 10s` on `GET
/// http://<addr>/` with [`PIDS_SCRIPT`] (written to the scenario's
/// temporary directory), which prints the pids that answered.
pub fn wrk_get_pids(addr: &str, connections: u32, secs: u32) -> Result<Command, String> {
    let script = super::common::tmp().join("pids.lua");
    std::fs::write(&script, PIDS_SCRIPT).map_err(|e| format!("{}: {e}", script.display()))?;
    let mut wrk = Command::new("wrk");
    wrk.args([
        "-t2",
        &format!("-c{connections}"),
        &format!("-d{secs}s"),
        "--timeout",
        "10s",
        "-s",
    ])
    .arg(&script)
    .arg(format!("http://{addr}/"));
    Ok(wrk)
}

/// A `wrk` started with its pipes read on threads, so that a full pipe
/// never stops it.
pub struct WrkChild {
    child: Child,
    out: JoinHandle<String>,
    err: JoinHandle<String>,
}

impl WrkChild {
    /// Starts `wrk` (its options and URL given).
    pub fn spawn(wrk: &mut Command) -> Result<WrkChild, String> {
        let mut child = wrk
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("wrk (the Debian package; `.ci/run` installs it): {e}"))?;
        let out = read_all(child.stdout.take());
        let err = read_all(child.stderr.take());
        Ok(WrkChild { child, out, err })
    }

    /// Waits for it (at most `limit`): its stdout then stderr, if it
    /// exited 0.
    pub fn output(mut self, limit: Duration) -> Result<String, String> {
        let status = wait_child(&mut self.child, limit)?;
        let output = format!("{}{}", join(self.out)?, join(self.err)?);
        ensure!(status.success(), "wrk exited {status}:\n{output}");
        Ok(output)
    }
}

/// Runs `wrk` (its options and URL given; see [`WrkChild`]) for at most `limit`,
/// and asks for a rolling reload (`reload`, say SIGHUP to the master) 2 s
/// and 5 s after it starts — the second only once every worker has been
/// replaced, later than 5 s on a slow machine. `workers(done)` waits (up to
/// 30 s) until the workers' pids satisfy `done` and returns them. wrk must
/// exit 0; its output is not judged here.
pub fn wrk_through_two_reloads(
    wrk: &mut Command,
    limit: Duration,
    reload: impl Fn() -> Check,
    workers: impl Fn(&dyn Fn(&BTreeSet<u32>) -> bool) -> Result<BTreeSet<u32>, String>,
) -> Result<ReloadsUnderWrk, String> {
    let before = workers(&|_| true)?;
    let child = WrkChild::spawn(wrk)?;
    let start = std::time::Instant::now();
    let reloads = (|| {
        std::thread::sleep(Duration::from_secs(2));
        reload()?;
        // Every worker replaced once (a reload replaces one at a time).
        let between = workers(&|pids| pids.is_disjoint(&before))?;
        std::thread::sleep(Duration::from_secs(5).saturating_sub(start.elapsed()));
        reload()?;
        Ok::<_, String>((between, start.elapsed()))
    })();
    let output = child.output(limit);
    let (between, second_reload) = reloads?;
    let output = output?;
    let after = workers(&|pids| pids.is_disjoint(&between))?;
    Ok(ReloadsUnderWrk {
        output,
        pids: [before, between, after],
        second_reload,
    })
}

// ------------------------------------------------------------ a small HTTP/1.1 client

/// One keep-alive connection; answers must carry a `Content-Length`.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// Whether an `HTTP/1.0` status line is taken too ([`Conn::open_any`]).
    http10: bool,
}

pub struct Response {
    pub status: u16,
    pub body: String,
    /// The server will close the connection after this answer.
    pub close: bool,
}

impl Response {
    pub fn json(&self) -> Result<Value, String> {
        serde_json::from_str(&self.body).map_err(|e| format!("{e}: {:?}", self.body))
    }
}

impl Conn {
    /// Connects (10 s read timeout); answers must be `HTTP/1.1`.
    pub fn open(addr: &str) -> io::Result<Conn> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Conn {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
            http10: false,
        })
    }

    /// [`Conn::open`], taking `HTTP/1.0` answers too.
    pub fn open_any(addr: &str) -> io::Result<Conn> {
        let mut conn = Conn::open(addr)?;
        conn.http10 = true;
        Ok(conn)
    }

    pub fn send(&mut self, method: &str, path: &str) -> Result<Response, String> {
        self.write_request(method, path)
            .map_err(|e| format!("write: {e}"))?;
        self.read_response()
    }

    pub fn write_request(&mut self, method: &str, path: &str) -> io::Result<()> {
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

    /// One answer with a `Content-Length` (the examples always send one).
    pub fn read_response(&mut self) -> Result<Response, String> {
        let status_line = self.line()?;
        let status = match status_line.split_whitespace().collect::<Vec<_>>()[..] {
            ["HTTP/1.1", code, ..] => code.parse::<u16>().map_err(|e| format!("{status_line:?}: {e}"))?,
            ["HTTP/1.0", code, ..] if self.http10 => {
                code.parse::<u16>().map_err(|e| format!("{status_line:?}: {e}"))?
            }
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
    pub fn closed_within(&mut self, limit: Duration) -> Result<bool, String> {
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
