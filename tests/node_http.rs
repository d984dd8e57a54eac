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
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

#[macro_use]
mod common;
#[path = "common/http.rs"]
mod http;
#[path = "common/node.rs"]
mod node;
use common::python::root;
use common::Check;
use http::{field, wrk_get_pids, wrk_through_two_reloads, Cluster, Conn, Scenario, Wrk};
use node::build_addon;

/// The `shmcluster` command.
const BIN: &str = env!("CARGO_BIN_EXE_shmcluster");

/// Worker instances of every scenario's cluster.
const WORKERS: usize = 4;

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
    http::run_main("node_http", "node-http", SCENARIOS, build_addon);
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
    let reloads = wrk_through_two_reloads(
        &mut wrk_get_pids(&server.addr, 32, 8)?,
        Duration::from_secs(25),
        || server.signal(Signal::SIGHUP),
        |done| {
            Ok(server
                .wait_for_workers(Duration::from_secs(30), |w| done(&w.pids()))?
                .pids())
        },
    )?;
    let [before, between, _] = &reloads.pids;
    let output = &reloads.output;
    let run = Wrk::parse_with_pids(output)?;
    println!(
        "    {} wrk GET / through two reloads (SIGHUP at 2 s and {:.1?}): {} requests, socket errors \
         (connect, read, write, timeout) {:?}, non-2xx {}; answered by {} pids; pids {:?} -> {:?} -> {:?}",
        if extra.is_empty() {
            "one shared socket:"
        } else {
            "--reuseport:"
        },
        reloads.second_reload,
        run.requests,
        run.socket_errors,
        run.non_2xx,
        run.pids.len(),
        reloads.pids[0],
        reloads.pids[1],
        reloads.pids[2]
    );
    run.failed_nothing(output)?;
    reloads.every_worker_replaced_twice()?;
    // Answers came from the first two generations during the load: the
    // load moved to the replacements. (The third may start late in the
    // run on a slow machine; it is checked below, after the load.)
    for (name, set) in [("first", before), ("second", between)] {
        ensure!(
            !set.is_disjoint(&run.pids),
            "no answer during the load came from the {name} generation's pids {set:?} (answers from {:?})",
            run.pids
        );
    }
    // The old workers drained and exited; what answers now is the last
    // generation, on new connections and their keep-alive successors.
    reloads.old_workers_gone(Duration::from_secs(10))?;
    let after = server.workers()?;
    ensure!(
        after.pids() == reloads.pids[2],
        "the workers changed after the reloads: {:?} -> {:?}",
        reloads.pids[2],
        after.pids()
    );
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

// ------------------------------------------------------------ the cluster

/// `shmcluster run -w 4 --listen 127.0.0.1:0 [extra] -- node
/// examples/node/http.js` ([`Cluster`]: in its own process group, killed
/// and reaped when dropped).
struct Server(Cluster);

impl std::ops::Deref for Server {
    type Target = Cluster;

    fn deref(&self) -> &Cluster {
        &self.0
    }
}

impl Server {
    /// Starts the cluster; returns once `/workers` shows every worker.
    fn start() -> Result<Server, String> {
        Server::start_with(&[])
    }

    /// `start`, with `extra` options of `shmcluster run`.
    fn start_with(extra: &[&str]) -> Result<Server, String> {
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "-w", &WORKERS.to_string(), "--listen", "127.0.0.1:0"])
            .args(extra)
            .arg("--")
            .arg("node")
            .arg(root().join("examples/node/http.js"))
            .current_dir(root())
            // The shared counter's file, in the scenario's scratch directory.
            .env("SHMC_HTTP_DATA", common::tmp());
        let server = Server(Cluster::spawn(&mut cmd, false)?);
        server.wait_for_workers(Duration::from_secs(20), |_| true)?;
        Ok(server)
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
    fn wait(self, limit: Duration) -> Result<(std::process::ExitStatus, String), String> {
        self.0.wait(limit)
    }

    /// SIGTERM, then the master must exit 0.
    fn stop(self) -> Check {
        self.0.stop(Duration::from_secs(15))
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
