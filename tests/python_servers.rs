//! The Python web servers under the real `shmcluster` command, driven over
//! HTTP/1.1 from the outside: `examples/python/uvicorn_app.py` (one
//! uvicorn per worker on the master's listener, `--fd 3`, with an
//! `AsyncWorker` on uvicorn's loop) and `examples/python/gunicorn_app.py`
//! (one gunicorn arbiter per worker adopting `LISTEN_FDS`, with one sync
//! worker attached in `post_worker_init`). For each: `wrk` through two
//! rolling reloads (no socket error, no non-2xx answer), a graceful
//! shutdown with a slow request in flight (answered 200, master exits 0),
//! and the counter the workers share under `synchronize`; for uvicorn, the
//! server answering while 1,000 maps are in flight. And gunicorn with no
//! binding at all: its arbiter's own sd_notify `READY=1` on the worker's
//! `NOTIFY_SOCKET` makes each worker ready and lets a rolling reload step
//! through them (with `--no-worker-notify`, the same workers stay
//! `Starting`).
//!
//! uvicorn and gunicorn come from a virtual environment: the python of
//! `SHMC_SERVERS_PYTHON` if set (it must import both), else one this test
//! makes under `target/python-servers` (`python3 -m venv`, then `pip
//! install` of the versions in [`PACKAGES`]; kept, so later runs only check
//! it). No skip: without them (no `python3-venv`, PyPI unreachable) the
//! suite fails and says why. The binding is the source tree's
//! (`PYTHONPATH=ffi/python`, `SHMCLUSTER_LIB` = the `libshmcluster.so`
//! this test builds first, as tests/hosts_python.rs does); `wrk` must be on
//! the `PATH`.
//!
//! `harness = false`, as tests/node_http.rs: each scenario runs in this
//! binary re-executed (`SHMC_SCENARIO=<name>`, `common::run_suite`) under
//! two watchdogs, one inside the scenario process that kills the master's
//! process group and fails, and `run_suite`'s outer one. Arguments filter
//! scenarios by substring.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

#[macro_use]
mod common;
#[path = "common/http.rs"]
mod http;
use common::python::{build_library, library, root, venv_with};
use common::Check;
use http::{field, wrk_get_pids, wrk_through_two_reloads, Cluster, Conn, Scenario, Wrk};

/// The `shmcluster` command.
const BIN: &str = env!("CARGO_BIN_EXE_shmcluster");

/// Worker instances of every scenario's cluster.
const WORKERS: usize = 4;

/// What the test's virtual environment installs (the versions the examples
/// were written and measured with).
const PACKAGES: &[&str] = &["uvicorn==0.55.0", "gunicorn==27.0.1"];

/// Which server a scenario runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Uvicorn,
    Gunicorn,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "uvicorn_reloads_under_wrk_fail_no_get",
        timeout: Duration::from_secs(90),
        run: || reloads_under_wrk(Kind::Uvicorn, &[]),
    },
    Scenario {
        name: "uvicorn_reloads_under_wrk_fail_no_get_reuseport",
        timeout: Duration::from_secs(90),
        run: || reloads_under_wrk(Kind::Uvicorn, &["--reuseport"]),
    },
    Scenario {
        name: "uvicorn_shutdown_finishes_the_slow_request_in_flight",
        timeout: Duration::from_secs(60),
        run: || shutdown_finishes_the_slow_request_in_flight(Kind::Uvicorn),
    },
    Scenario {
        name: "uvicorn_counter_is_exact_across_workers",
        timeout: Duration::from_secs(60),
        run: || counter_is_exact_across_workers(Kind::Uvicorn),
    },
    Scenario {
        name: "uvicorn_answers_while_1000_maps_are_in_flight",
        timeout: Duration::from_secs(60),
        run: answers_while_maps_are_in_flight,
    },
    Scenario {
        name: "gunicorn_reloads_under_wrk_fail_no_get",
        timeout: Duration::from_secs(90),
        run: || reloads_under_wrk(Kind::Gunicorn, &[]),
    },
    Scenario {
        name: "gunicorn_reloads_under_wrk_fail_no_get_reuseport",
        timeout: Duration::from_secs(90),
        run: || reloads_under_wrk(Kind::Gunicorn, &["--reuseport"]),
    },
    Scenario {
        name: "gunicorn_shutdown_finishes_the_slow_request_in_flight",
        timeout: Duration::from_secs(60),
        run: || shutdown_finishes_the_slow_request_in_flight(Kind::Gunicorn),
    },
    Scenario {
        name: "gunicorn_counter_is_exact_across_workers",
        timeout: Duration::from_secs(60),
        run: || counter_is_exact_across_workers(Kind::Gunicorn),
    },
    Scenario {
        name: "plain_gunicorn_is_ready_by_its_own_sd_notify",
        timeout: Duration::from_secs(90),
        run: || plain_gunicorn_and_sd_notify(true),
    },
    Scenario {
        name: "plain_gunicorn_without_worker_notify_is_never_ready",
        timeout: Duration::from_secs(60),
        run: || plain_gunicorn_and_sd_notify(false),
    },
];

fn main() {
    http::run_main("python_servers", "python-servers", SCENARIOS, || {
        build_library().and_then(|_| python()).map(drop)
    });
}

// ------------------------------------------------------------ the environment

/// The python that runs the servers: `SHMC_SERVERS_PYTHON`, or this test's
/// virtual environment `target/python-servers`, made (and [`PACKAGES`]
/// installed) on first use.
fn python() -> Result<PathBuf, String> {
    venv_with(
        PACKAGES,
        "python-servers",
        "import uvicorn, gunicorn",
        "SHMC_SERVERS_PYTHON",
    )
}

// ------------------------------------------------------------ scenarios

/// `wrk -t2 -c32 -d8s` on `GET /` while the master reloads every worker
/// twice (SIGHUP at 2 s and 5 s): wrk sees no socket error and no non-2xx
/// answer — a draining worker that closed a keep-alive connection with a
/// request on its way would show up as a read error — every worker is
/// replaced twice, and the old ones are gone. `extra`: options of
/// `shmcluster run` (`--reuseport`: one `SO_REUSEPORT` socket per
/// instance, which the master keeps across the reload and hands to the
/// replacement).
fn reloads_under_wrk(kind: Kind, extra: &[&str]) -> Check {
    let server = Server::start_with(kind, extra)?;
    let reloads = wrk_through_two_reloads(
        &mut wrk_get_pids(&server.addr, 32, 8)?,
        Duration::from_secs(40),
        || server.signal(Signal::SIGHUP),
        |done| {
            Ok(server
                .wait_for_workers(Duration::from_secs(30), |w| done(&w.pids()))?
                .pids())
        },
    )?;
    let [before, between, after] = &reloads.pids;
    let output = &reloads.output;
    let run = Wrk::parse_with_pids(output)?;
    println!(
        "    {kind:?} {extra:?}: wrk GET / through two reloads (SIGHUP at 2 s and {:.1?}): {} requests, socket errors \
         (connect, read, write, timeout) {:?}, non-2xx {}; answered by {} pids; pids {before:?} -> {between:?} -> {after:?}",
        reloads.second_reload,
        run.requests,
        run.socket_errors,
        run.non_2xx,
        run.pids.len(),
    );
    run.failed_nothing(output)
        .map_err(|e| format!("{e}\n{}", server.log()))?;
    reloads.every_worker_replaced_twice()?;
    ensure!(
        !before.is_disjoint(&run.pids) && !between.is_disjoint(&run.pids),
        "answers during the load came from {:?}, not from both of the first two generations {before:?}, {between:?}",
        run.pids,
    );
    reloads.old_workers_gone(Duration::from_secs(15))?;
    for _ in 0..20 {
        let mut conn = Conn::open_any(&server.addr).map_err(|e| e.to_string())?;
        let r = conn.send("GET", "/").map_err(|e| e.to_string())?;
        ensure!(r.status == 200, "GET /: {} {}", r.status, r.body);
        let (_, pid) = banner(&r.body)?;
        ensure!(
            after.contains(&pid),
            "pid {pid} answered after the reloads, not one of {after:?}"
        );
    }
    server.stop()
}

/// SIGTERM to the master 200 ms into `GET /slow?ms=800`: the request is
/// answered 200 (and its connection then closed), every worker drains,
/// and the master exits 0.
fn shutdown_finishes_the_slow_request_in_flight(kind: Kind) -> Check {
    let server = Server::start(kind)?;
    let mut conn = Conn::open_any(&server.addr).map_err(|e| e.to_string())?;
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
    let (slot, pid) = banner(&r.body)?;
    ensure!(
        took >= Duration::from_millis(800),
        "answered after {took:?}, before its 800 ms"
    );
    ensure!(r.close, "the draining worker's answer lacks `Connection: close`");
    ensure!(
        conn.closed_within(Duration::from_secs(5))?,
        "the connection stayed open after the draining worker's last answer"
    );
    let (status, log) = server.wait(Duration::from_secs(20))?;
    println!(
        "    {kind:?}: SIGTERM 200 ms into an 800 ms request: answered 200 after {took:?} by slot {slot} pid {pid}, \
         with `Connection: close`; master exited {status}"
    );
    ensure!(status.success(), "the master exited {status}:\n{log}");
    Ok(())
}

/// `GET /count`'s answers: (value, pid).
type Counted = Vec<(u64, u32)>;

/// 200 `GET /count` from 8 threads (5 connections of 5 requests each):
/// the workers' shared counter (a file, changed under `synchronize`)
/// returns every value 1..=200 exactly once, and more than one worker
/// answered.
fn counter_is_exact_across_workers(kind: Kind) -> Check {
    let server = Server::start(kind)?;
    let barrier = Arc::new(Barrier::new(8));
    let threads: Vec<JoinHandle<Result<Counted, String>>> = (0..8)
        .map(|_| {
            let (addr, barrier) = (server.addr.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut got = Vec::new();
                barrier.wait();
                for _ in 0..5 {
                    let mut conn = Conn::open_any(&addr).map_err(|e| format!("connect: {e}"))?;
                    // The last answer said `Connection: close`.
                    let mut closed = false;
                    for _ in 0..5 {
                        if closed {
                            conn = Conn::open_any(&addr).map_err(|e| format!("connect: {e}"))?;
                        }
                        let r = conn.send("GET", "/count").map_err(|e| e.to_string())?;
                        ensure!(r.status == 200, "GET /count: {} {}", r.status, r.body);
                        let n = r
                            .body
                            .split_whitespace()
                            .next()
                            .and_then(|n| n.parse::<u64>().ok())
                            .ok_or(format!("GET /count answered {:?}", r.body))?;
                        // The answering worker's pid (from the banner; 0 if none).
                        got.push((n, banner(&r.body).map_or(0, |b| b.1)));
                        closed = r.close;
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
        "200 GET /count did not return 1..=200 exactly once: {values:?}"
    );
    let pids: BTreeMap<u32, usize> = answers.iter().fold(BTreeMap::new(), |mut m, a| {
        *m.entry(a.1).or_default() += 1;
        m
    });
    ensure!(
        pids.len() >= 2,
        "every request was answered by one worker: {pids:?}"
    );
    println!(
        "    {kind:?}: 200 GET /count from 8 threads: values 1..=200 exactly once; answers by pid {pids:?}"
    );
    server.stop()
}

/// `GET /flood?n=1000&seconds=1` starts 1,000 maps over the 4 workers
/// (each handler answers after a second) and reports how many `GET /` the
/// same worker answered while they were in flight; meanwhile 4 client
/// threads send `GET /` on new connections (the master's listener spreads
/// them over every worker). Every `GET /` is answered 200 within a second,
/// the flooded worker answered some of them, and all 1,000 maps succeed.
fn answers_while_maps_are_in_flight() -> Check {
    let server = Server::start(Kind::Uvicorn)?;
    let addr = server.addr.clone();
    let flood = std::thread::spawn(move || {
        let mut conn = Conn::open_any(&addr).map_err(|e| e.to_string())?;
        conn.send("GET", "/flood?n=1000&seconds=1")
    });
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<JoinHandle<Result<(usize, Duration), String>>> = (0..4)
        .map(|_| {
            let (addr, stop) = (server.addr.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut n, mut worst) = (0, Duration::ZERO);
                while !stop.load(Ordering::Acquire) {
                    let t = Instant::now();
                    let mut conn = Conn::open_any(&addr).map_err(|e| format!("connect: {e}"))?;
                    let r = conn.send("GET", "/").map_err(|e| e.to_string())?;
                    ensure!(r.status == 200, "GET /: {} {}", r.status, r.body);
                    worst = worst.max(t.elapsed());
                    n += 1;
                }
                Ok((n, worst))
            })
        })
        .collect();
    let report = flood.join().map_err(|_| "the flood thread panicked")?;
    stop.store(true, Ordering::Release);
    let mut total = 0;
    let mut worst = Duration::ZERO;
    for c in clients {
        let (n, w) = c.join().map_err(|_| "a client thread panicked")??;
        total += n;
        worst = worst.max(w);
    }
    let r = report?;
    ensure!(r.status == 200, "GET /flood: {} {}", r.status, r.body);
    let v = r.json()?;
    let (maps, ok, meanwhile) = (
        field(&v, "maps")?,
        field(&v, "ok")?,
        field(&v, "served_meanwhile")?,
    );
    println!(
        "    1,000 maps in flight on one uvicorn worker for {}s: all {ok} answered; {total} GET / answered \
         meanwhile by the cluster, {meanwhile} by the flooded worker; slowest GET / {worst:?}",
        v["seconds"]
    );
    ensure!(maps == 1000 && ok == 1000, "maps: {}", r.body);
    // One wave: all 1,000 were in flight together (each takes a second).
    let seconds = v["seconds"].as_f64().ok_or(format!("no seconds in {}", r.body))?;
    ensure!(
        seconds.total_cmp(&1.9).is_lt(),
        "the 1,000 maps took {seconds} s: not all in flight at once"
    );
    ensure!(
        meanwhile > 0,
        "the flooded worker answered no GET / while its maps were in flight: {}",
        r.body
    );
    ensure!(
        worst < Duration::from_secs(1),
        "a GET / took {worst:?} while the maps were in flight"
    );
    server.stop()
}

// ------------------------------------------------------------ the cluster

/// `shmcluster run -w 4 --listen 127.0.0.1:0 -- <python>/uvicorn ... --fd 3`
/// (or gunicorn): a [`Cluster`], in its own process group, so that one
/// `killpg` ends it and its workers (gunicorn's forked workers included);
/// killed and reaped when dropped.
struct Server(Cluster);

impl std::ops::Deref for Server {
    type Target = Cluster;

    fn deref(&self) -> &Cluster {
        &self.0
    }
}

impl Server {
    /// Starts the cluster; returns once `/peers` shows every worker.
    fn start(kind: Kind) -> Result<Server, String> {
        Server::start_with(kind, &[])
    }

    /// `start`, with `extra` options of `shmcluster run`.
    fn start_with(kind: Kind, extra: &[&str]) -> Result<Server, String> {
        let python = python()?;
        let bin = python.parent().ok_or("python has no directory")?;
        let examples = root().join("examples/python");
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "-w", &WORKERS.to_string(), "--listen", "127.0.0.1:0"])
            .args(extra)
            .arg("--");
        match kind {
            Kind::Uvicorn => {
                cmd.arg(bin.join("uvicorn"))
                    .args(["uvicorn_app:app", "--fd", "3", "--no-access-log"])
            }
            Kind::Gunicorn => cmd
                .arg(bin.join("gunicorn"))
                .arg("-c")
                .arg(examples.join("gunicorn_conf.py"))
                .arg("gunicorn_app:app"),
        };
        let pythonpath = format!("{}:{}", root().join("ffi/python").display(), examples.display());
        cmd.current_dir(common::tmp())
            .env("PYTHONPATH", pythonpath)
            .env("SHMCLUSTER_LIB", library()?)
            // The shared counters' files, in the scenario's scratch directory.
            .env("UVICORN_APP_COUNTER", common::tmp().join("uvicorn.count"))
            .env("GUNICORN_APP_COUNTER", common::tmp().join("gunicorn.count"));
        // stdout (uvicorn and gunicorn log there too) into the same log.
        let server = Server(Cluster::spawn(&mut cmd, true)?);
        server.wait_for_workers(Duration::from_secs(30), |_| true)?;
        Ok(server)
    }

    /// `GET /peers` on a new connection (a `map` over every worker).
    fn workers(&self) -> Result<Workers, String> {
        let mut conn = Conn::open_any(&self.addr).map_err(|e| format!("connect: {e}"))?;
        let r = conn.send("GET", "/peers").map_err(|e| e.to_string())?;
        ensure!(r.status == 200, "GET /peers: {} {}", r.status, r.body);
        Workers::parse(&r.body)
    }

    /// Polls `/peers` until it shows every worker (and no more), no
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
                    "after {limit:?}, /peers still shows {last:?}\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the master to exit; its status and everything the
    /// cluster wrote.
    fn wait(self, limit: Duration) -> Result<(std::process::ExitStatus, String), String> {
        self.0.wait(limit)
    }

    /// SIGTERM, then the master must exit 0.
    fn stop(self) -> Check {
        self.0.stop(Duration::from_secs(20))
    }
}

// ------------------------------------------------------------ what the examples answer

#[derive(Debug)]
struct Workers {
    workers: Vec<WorkerInfo>,
    errors: usize,
}

#[derive(Debug)]
struct WorkerInfo {
    slot: u32,
    pid: u32,
}

impl Workers {
    /// `/peers`: `[{"index", "slot", "pid"} or {"slot", "error"}, ...]`.
    fn parse(body: &str) -> Result<Workers, String> {
        let v: Value = serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))?;
        let (mut workers, mut errors) = (Vec::new(), 0);
        for w in v.as_array().ok_or(format!("not a list: {body}"))? {
            if w.get("error").is_some() {
                errors += 1;
                continue;
            }
            workers.push(WorkerInfo {
                slot: field(w, "slot")? as u32,
                pid: field(w, "pid")? as u32,
            });
        }
        Ok(Workers { workers, errors })
    }

    fn pids(&self) -> BTreeSet<u32> {
        self.workers.iter().map(|w| w.pid).collect()
    }
}

/// "hello from worker <index> (slot <slot>, pid <pid>)" (`GET /`,
/// `GET /slow`): (slot, pid).
fn banner(body: &str) -> Result<(u32, u32), String> {
    let number = |after: &str| {
        body.split_once(after)
            .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or(format!("answered {body:?}"))
    };
    Ok((number("(slot ")?, number(", pid ")?))
}

// ------------------------------------------------------------ gunicorn with no binding

/// A WSGI app that knows nothing of shmcluster.
const PLAIN_APP: &str = "def app(environ, start_response):\n    \
    body = b'plain gunicorn\\n'\n    \
    start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])\n    \
    return [body]\n";

/// Plain gunicorn (no binding, no `--ready-on-start`) as each of 2
/// workers. With the worker's `NOTIFY_SOCKET` (`notify`), gunicorn's
/// arbiter's own `READY=1` makes each worker `Ready`, and so a rolling
/// reload steps through them (each replacement ready by the same means)
/// and the master exits 0 on `SIGTERM`. Without it
/// (`--no-worker-notify`), the same workers serve but stay `Starting`.
fn plain_gunicorn_and_sd_notify(notify: bool) -> Check {
    let python = python()?;
    let bin = python.parent().ok_or("python has no directory")?;
    let dir = common::tmp();
    std::fs::write(dir.join("plain_app.py"), PLAIN_APP).map_err(|e| e.to_string())?;
    let control = dir.join("c.sock");
    let log_path = dir.join("master.log");
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "-w", "2", "--listen", "127.0.0.1:0", "--control"])
        .arg(&control);
    if !notify {
        cmd.arg("--no-worker-notify");
    }
    let child = cmd
        .arg("--")
        .arg(bin.join("gunicorn"))
        .arg("--chdir")
        .arg(&dir)
        .arg("plain_app:app")
        .current_dir(&dir)
        .env_remove("NOTIFY_SOCKET")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{BIN}: {e}"))?;
    // Killed with its process group if the scenario fails.
    let mut server = Server(Cluster::adopt(child));
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let start = Instant::now();
    server.0.addr = loop {
        if let Some((_, rest)) = read_log().split_once(", listening on ") {
            break rest.split_whitespace().next().unwrap_or_default().to_owned();
        }
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "no address:\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let stat = || -> Result<Vec<(String, u32)>, String> {
        let out = Command::new(BIN)
            .args(["stat", "--control"])
            .arg(&control)
            .output()
            .map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.first()?.parse::<u32>().ok()?;
                Some((cols.get(2)?.to_string(), cols.get(3)?.parse().ok()?))
            })
            .filter(|(_, pid)| *pid != 0)
            .collect())
    };
    let ready = |rows: &[(String, u32)]| -> Vec<u32> {
        rows.iter()
            .filter(|(s, _)| s == "Ready")
            .map(|(_, p)| *p)
            .collect()
    };
    let wait_ready = |not: &[u32]| -> Result<Vec<u32>, String> {
        let start = Instant::now();
        loop {
            let rows = stat()?;
            let pids = ready(&rows);
            if pids.len() == 2 && pids.iter().all(|p| !not.contains(p)) {
                return Ok(pids);
            }
            ensure!(
                start.elapsed() < Duration::from_secs(30),
                "not 2 Ready workers after 30 s: {rows:?}\n{}",
                read_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // gunicorn answers (its arbiter is up, READY=1 sent if it had a socket).
    let start = Instant::now();
    loop {
        let answer = Conn::open_any(&server.addr)
            .map_err(|e| e.to_string())
            .and_then(|mut c| c.send("GET", "/"));
        match answer {
            Ok(r) => {
                ensure!(
                    r.status == 200 && r.body == "plain gunicorn\n",
                    "GET /: {} {:?}",
                    r.status,
                    r.body
                );
                break;
            }
            Err(e) => ensure!(
                start.elapsed() < Duration::from_secs(30),
                "gunicorn never answered ({e}):\n{}",
                read_log()
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if !notify {
        std::thread::sleep(Duration::from_secs(1));
        let rows = stat()?;
        ensure!(
            rows.len() == 2 && rows.iter().all(|(s, _)| s == "Starting"),
            "without a NOTIFY_SOCKET, Starting: {rows:?}"
        );
        server.signal(Signal::SIGTERM)?;
        server.wait(Duration::from_secs(20))?;
        return Ok(());
    }
    let before = wait_ready(&[])?;
    let out = Command::new(BIN)
        .args(["reload", "--wait", "--timeout", "40", "--control"])
        .arg(&control)
        .output()
        .map_err(|e| e.to_string())?;
    let said = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && said.contains("reload finished: ok"),
        "reload: {said} {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        read_log()
    );
    wait_ready(&before)?;
    server.stop()
}
