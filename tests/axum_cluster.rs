//! `examples/axum_cluster`, tested from the outside: each scenario starts
//! the example's master (3 workers, or 1, port 0) as a real process and
//! drives it over HTTP/1.1 with a small keep-alive client written here on
//! std's `TcpStream`, or with `wrk` — the counter under `synchronize_key`,
//! cache invalidation by `broadcast`, `/stats` by `map`, jobs by
//! `consume`, rolling reloads under load (no request may fail or need a
//! retry: `wrk` never retries), idle keep-alive connections through a
//! drain, a SIGKILLed worker under load, and a graceful shutdown with a
//! request in flight. `wrk` (the Debian package) must be on the `PATH`.
//!
//! `harness = false`: each scenario runs in this binary re-executed
//! (`SHMC_SCENARIO=<name>`, see `common::run_suite`) under two watchdogs —
//! one inside the scenario process that kills the example's process group
//! and fails, and `run_suite`'s outer one. Arguments filter scenarios by
//! substring. The example is a package of its own: this binary builds it
//! first (`cargo build -p axum_cluster`, into its own target directory and
//! profile: `target/<profile>/axum_cluster`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;

#[macro_use]
mod common;
#[path = "common/http.rs"]
mod http;
use common::{wait_child, Check};
use http::{alive, field, wrk_through_two_reloads, ReloadsUnderWrk, Scenario, Wrk, MASTER};

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "counter_is_exact_across_workers",
        timeout: Duration::from_secs(30),
        run: counter_is_exact_across_workers,
    },
    Scenario {
        name: "broadcast_invalidates_every_cache",
        timeout: Duration::from_secs(30),
        run: broadcast_invalidates_every_cache,
    },
    Scenario {
        name: "stats_lists_every_worker",
        timeout: Duration::from_secs(30),
        run: stats_lists_every_worker,
    },
    Scenario {
        name: "jobs_spread_over_workers",
        timeout: Duration::from_secs(30),
        run: jobs_spread_over_workers,
    },
    Scenario {
        name: "rolling_reloads_under_load_drop_nothing",
        timeout: Duration::from_secs(40),
        run: rolling_reloads_under_load_drop_nothing,
    },
    Scenario {
        name: "reloads_under_wrk_fail_no_get",
        timeout: Duration::from_secs(45),
        run: reloads_under_wrk_fail_no_get,
    },
    Scenario {
        name: "reloads_under_wrk_fail_no_post",
        timeout: Duration::from_secs(45),
        run: reloads_under_wrk_fail_no_post,
    },
    Scenario {
        name: "draining_worker_keeps_idle_connections_until_asked",
        timeout: Duration::from_secs(40),
        run: draining_worker_keeps_idle_connections_until_asked,
    },
    Scenario {
        name: "sigkilled_worker_under_load_is_replaced",
        timeout: Duration::from_secs(40),
        run: sigkilled_worker_under_load_is_replaced,
    },
    Scenario {
        name: "graceful_shutdown_finishes_the_request_in_flight",
        timeout: Duration::from_secs(30),
        run: graceful_shutdown_finishes_the_request_in_flight,
    },
];

fn main() {
    http::run_main("axum_cluster", "axum", SCENARIOS, build_example);
}

// ------------------------------------------------------------ scenarios

/// (value, fencing token, slot) of each answered `POST /counter`.
type Additions = Vec<(u64, u64, u64)>;

/// 400 `POST /counter` from 8 threads, each over 4 successive connections:
/// every value from 1 to 400 comes back exactly once, in the order of the
/// lock's fencing tokens, and from more than one worker.
fn counter_is_exact_across_workers() -> Check {
    let server = Server::start(&[])?;
    let addr = server.addr.clone();
    let mut answers = Vec::new();
    let mut rounds = 0;
    loop {
        rounds += 1;
        let threads: Vec<JoinHandle<Result<Additions, String>>> = (0..8)
            .map(|_| {
                let addr = addr.clone();
                std::thread::spawn(move || -> Result<Additions, String> {
                    let mut got = Vec::new();
                    // 50 additions per thread, over 4 connections.
                    for batch in [13, 13, 12, 12] {
                        let mut conn = Conn::open(&addr).map_err(|e| format!("connect: {e}"))?;
                        for _ in 0..batch {
                            let r = conn.send("POST", "/counter", None).map_err(|e| e.to_string())?;
                            ensure!(r.status == 200, "POST /counter: {} {}", r.status, r.body);
                            let v = r.json()?;
                            got.push((field(&v, "value")?, field(&v, "token")?, field(&v, "slot")?));
                            if r.close {
                                conn = Conn::open(&addr).map_err(|e| format!("connect: {e}"))?;
                            }
                        }
                    }
                    Ok(got)
                })
            })
            .collect();
        for t in threads {
            answers.extend(t.join().map_err(|_| "a client thread panicked")??);
        }
        let slots: BTreeSet<u64> = answers.iter().map(|a| a.2).collect();
        // Three workers on one socket, 32 connections: more than one of
        // them answers. Should the kernel give them all to one, ask again
        // on more connections rather than accept a single worker.
        if slots.len() >= 2 || rounds == 3 {
            break;
        }
    }
    let n = answers.len() as u64;
    answers.sort_unstable();
    let values: Vec<u64> = answers.iter().map(|a| a.0).collect();
    ensure!(
        values == (1..=n).collect::<Vec<_>>(),
        "the {n} additions did not return 1..={n} exactly once: {:?}",
        duplicates_and_gaps(&values, n)
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
        "every addition was answered by one worker: {slots:?}"
    );
    let mut conn = Conn::open(&server.addr).map_err(|e| e.to_string())?;
    let r = conn.send("GET", "/counter", None).map_err(|e| e.to_string())?;
    ensure!(r.status == 200, "GET /counter: {} {}", r.status, r.body);
    let total = field(&r.json()?, "value")?;
    ensure!(total == n, "GET /counter = {total}, expected {n}");
    // An idle keep-alive connection would hold its worker's drain open.
    drop(conn);
    println!(
        "    {n} additions over {} connections: values 1..={n} exactly once; answers by slot {slots:?}",
        rounds * 32
    );
    server.stop()
}

/// Every worker caches `v1`; after `PUT v2` every worker answers `v2`:
/// the broadcast reached every cache (without it they would keep `v1`).
fn broadcast_invalidates_every_cache() -> Check {
    let server = Server::start(&[])?;
    let slots = server.stats()?.slots();
    let mut conn = Conn::open(&server.addr).map_err(|e| e.to_string())?;
    let r = conn
        .send("PUT", "/cache/k", Some(b"v1"))
        .map_err(|e| e.to_string())?;
    ensure!(r.status == 200, "PUT v1: {} {}", r.status, r.body);
    ensure!(r.json()?["invalidated"] == "k", "PUT v1 answered {}", r.body);
    // Bad keys are refused.
    let r = conn
        .send("GET", "/cache/no.dots", None)
        .map_err(|e| e.to_string())?;
    ensure!(r.status == 400, "GET /cache/no.dots: {} {}", r.status, r.body);
    drop(conn);

    // New connections until every worker has served v1 from its cache (a
    // second GET on one connection; the PUT's own invalidation may still
    // be on its way and empty a cache once more, so keep asking).
    let mut warm = BTreeSet::new();
    let start = Instant::now();
    while warm != slots {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "only slots {warm:?} of {slots:?} served GET /cache/k from their cache"
        );
        let mut conn = Conn::open(&server.addr).map_err(|e| e.to_string())?;
        let first = cache_get(&mut conn, "k")?;
        let second = cache_get(&mut conn, "k")?;
        for got in [&first, &second] {
            ensure!(got.value.as_deref() == Some("v1"), "before the PUT: {got:?}");
        }
        ensure!(
            second.slot == first.slot,
            "one connection, two workers: {first:?} {second:?}"
        );
        if second.cached {
            warm.insert(second.slot);
        }
    }

    let mut conn = Conn::open(&server.addr).map_err(|e| e.to_string())?;
    let r = conn
        .send("PUT", "/cache/k", Some(b"v2"))
        .map_err(|e| e.to_string())?;
    ensure!(r.status == 200, "PUT v2: {} {}", r.status, r.body);
    let writer = field(&r.json()?, "slot")?;
    drop(conn);

    // Every worker now answers v2. The broadcast is asynchronous (the PUT
    // is answered once it is queued), so each worker gets up to a second
    // to take it in; a worker that never does (no broadcast) keeps
    // answering v1 and fails this.
    let mut fresh = BTreeMap::new();
    let mut stale = 0;
    let start = Instant::now();
    while fresh.len() < slots.len() {
        ensure!(
            start.elapsed() < Duration::from_secs(1),
            "after PUT v2 (on slot {writer}) slots {:?} still answer v1 ({stale} stale answers)",
            slots
                .iter()
                .filter(|s| !fresh.contains_key(*s))
                .collect::<Vec<_>>()
        );
        let mut conn = Conn::open(&server.addr).map_err(|e| e.to_string())?;
        let got = cache_get(&mut conn, "k")?;
        match got.value.as_deref() {
            Some("v2") => {
                fresh.entry(got.slot).or_insert(start.elapsed());
            }
            Some("v1") => stale += 1,
            other => return Err(format!("slot {} answered {other:?}", got.slot)),
        }
    }
    println!(
        "    slots {slots:?} cached v1; after PUT v2 on slot {writer} every one answered v2 \
         (first v2 answer by slot after: {fresh:?}; stale answers on the way: {stale})"
    );
    server.stop()
}

/// `/stats` has one entry per worker — 3, distinct slots, live pids, no
/// errors — and counts the requests each one served.
fn stats_lists_every_worker() -> Check {
    let server = Server::start(&[])?;
    let mut served = BTreeMap::new();
    for _ in 0..20 {
        let mut conn = Conn::open(&server.addr).map_err(|e| e.to_string())?;
        let r = conn.send("GET", "/", None).map_err(|e| e.to_string())?;
        ensure!(r.status == 200, "GET /: {} {}", r.status, r.body);
        let (slot, pid, _) = banner(&r.body)?;
        *served.entry((slot, pid)).or_insert(0u64) += 1;
    }
    let stats = server.stats()?;
    ensure!(
        stats.workers.len() == 3,
        "{} workers in {}",
        stats.workers.len(),
        stats.raw
    );
    ensure!(stats.errors.is_empty(), "errors in /stats: {:?}", stats.errors);
    ensure!(stats.slots().len() == 3, "slots are not distinct: {}", stats.raw);
    for w in &stats.workers {
        ensure!(
            alive(w.pid),
            "worker pid {} (slot {}) is not alive",
            w.pid,
            w.slot
        );
    }
    ensure!(
        stats.slots().contains(&stats.asked_by),
        "asked_by {} is not a worker",
        stats.asked_by
    );
    for ((slot, pid), n) in &served {
        let w = stats
            .workers
            .iter()
            .find(|w| w.slot == *slot)
            .ok_or(format!("slot {slot} answered GET / but is not in /stats"))?;
        ensure!(
            w.pid == *pid,
            "slot {slot}: pid {pid} answered, /stats says {}",
            w.pid
        );
        ensure!(
            w.requests >= *n,
            "slot {slot} served {n} requests, /stats counts {}",
            w.requests
        );
    }
    println!(
        "    /stats: {:?} (slot, pid, requests); GET / answered by {served:?}",
        stats
            .workers
            .iter()
            .map(|w| (w.slot, w.pid, w.requests))
            .collect::<Vec<_>>()
    );
    server.stop()
}

/// 30 concurrent `POST /jobs?ms=50`: all succeed, run concurrently, and
/// `consume` spreads them over more than one worker.
fn jobs_spread_over_workers() -> Check {
    let server = Server::start(&[])?;
    let barrier = Arc::new(Barrier::new(30));
    let start = Instant::now();
    let threads: Vec<JoinHandle<Result<(u64, u64), String>>> = (0..30)
        .map(|_| {
            let (addr, barrier) = (server.addr.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut conn = Conn::open(&addr).map_err(|e| e.to_string())?;
                barrier.wait();
                let r = conn
                    .send("POST", "/jobs?ms=50", None)
                    .map_err(|e| e.to_string())?;
                ensure!(r.status == 200, "POST /jobs: {} {}", r.status, r.body);
                let v = r.json()?;
                Ok((field(&v, "ran_on")?, field(&v, "attempts")?))
            })
        })
        .collect();
    let mut ran_on = BTreeMap::new();
    for t in threads {
        let (slot, attempts) = t.join().map_err(|_| "a client thread panicked")??;
        ensure!(attempts >= 1, "attempts {attempts}");
        *ran_on.entry(slot).or_insert(0) += 1;
    }
    let took = start.elapsed();
    ensure!(ran_on.len() >= 2, "every job ran on one worker: {ran_on:?}");
    // One after the other they would take 30 × 50 ms.
    ensure!(
        took < Duration::from_millis(1500),
        "30 jobs of 50 ms took {took:?}: they did not run concurrently"
    );
    let stats = server.stats()?;
    let counted: u64 = stats.workers.iter().map(|w| w.jobs).sum();
    ensure!(counted >= 30, "/stats counts {counted} jobs run, 30 were asked");
    println!("    30 jobs of 50 ms in {took:?}, by slot {ran_on:?}");
    server.stop()
}

/// Keep-alive load on `/`, `/stats` and `/cache/k` while the master
/// reloads every worker twice (`SO_REUSEPORT` listeners): no request
/// fails or has to be retried, and every worker is replaced.
fn rolling_reloads_under_load_drop_nothing() -> Check {
    let server = Server::start(&["--reuseport"])?;
    let before = server.stats()?.pids();
    let load = Load::start(&server.addr, 8);
    std::thread::sleep(Duration::from_millis(800));
    server.signal(Signal::SIGHUP)?;
    std::thread::sleep(Duration::from_millis(1000));
    // Whatever runs now (some may still be from before the first reload)
    // is replaced by the second one.
    let between = server.stats()?.pids();
    server.signal(Signal::SIGHUP)?;
    std::thread::sleep(Duration::from_millis(1200));
    let tally = load.finish()?;
    let replaced: BTreeSet<u32> = before.union(&between).copied().collect();
    let after = server.wait_for_workers(Duration::from_secs(10), |s| s.pids().is_disjoint(&replaced))?;
    println!(
        "    two rolling reloads under load: {} requests answered, {} retried on a new connection \
         after a reused one closed unanswered, {} failed; pids {before:?} -> {between:?} -> {:?}; \
         {} worker pids answered during the load",
        tally.ok,
        tally.retries.len(),
        tally.failures.len(),
        after.pids(),
        tally.pids.len()
    );
    ensure!(
        tally.failures.is_empty(),
        "{} requests failed: {:?}",
        tally.failures.len(),
        tally.failures.iter().take(5).map(|f| &f.what).collect::<Vec<_>>()
    );
    // A draining worker says `Connection: close` before it closes a
    // connection: a client never finds a reused one closed under it.
    ensure!(
        tally.retries.is_empty(),
        "{} requests had to be retried: a draining worker closed their reused connection unanswered",
        tally.retries.len()
    );
    ensure!(tally.ok > 300, "only {} requests answered in 3 s", tally.ok);
    ensure!(
        tally.pids.len() > before.len(),
        "only pids {:?} answered: no replacement served",
        tally.pids
    );
    server.stop()
}

/// The example's drain deadline (`IDLE_DRAIN` in its `main.rs`): a
/// draining worker closes the connections still idle this long after it
/// was told to drain (the master kills it 2 s later).
const WORKER_DRAIN: Duration = Duration::from_secs(8);

/// Idle keep-alive connections through a reload of a 1-worker cluster:
/// the draining worker does not close them under their clients (a
/// request may be on its way); the next request on each is answered by
/// the old worker with `Connection: close`, and then the connection ends;
/// one that stays idle is closed at the worker's drain deadline, and the
/// old worker exits.
fn draining_worker_keeps_idle_connections_until_asked() -> Check {
    let server = Server::start_with(1, &[])?;
    let before = server.stats()?.pids();
    // Connections that each had an answer, kept alive.
    let mut conns = Vec::new();
    for _ in 0..6 {
        let mut conn = Conn::open(&server.addr).map_err(|e| e.to_string())?;
        let r = conn.send("GET", "/", None).map_err(|e| e.to_string())?;
        ensure!(
            r.status == 200 && !r.close,
            "GET /: {} close {}",
            r.status,
            r.close
        );
        conns.push(conn);
    }
    server.signal(Signal::SIGHUP)?;
    // The replacement is ready (it answers /stats): the master told the
    // old worker to drain.
    let start = Instant::now();
    let replacement = loop {
        let stats = server.stats()?;
        if let Some(new) = stats.pids().difference(&before).next() {
            break *new;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "no replacement 10 s after SIGHUP: {}",
            stats.raw
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let ready_at = Instant::now();
    let old = before.iter().next().copied().ok_or("no worker before")?;
    let (asked, idle) = conns.split_at_mut(3);
    for conn in asked.iter_mut() {
        // The old worker sees the master's word within its messenger's
        // 10 ms poll: until then it answers as before, keeping the
        // connection; from then on its next answer says close.
        loop {
            if !conn.is_open()? {
                return Err(if ready_at.elapsed() < WORKER_DRAIN {
                    "the draining worker closed an idle connection before its deadline".into()
                } else {
                    format!(
                        "an idle connection not asked before the draining worker's deadline, \
                         {WORKER_DRAIN:?} after its replacement was ready: the client is too slow"
                    )
                });
            }
            let r = conn.send("GET", "/", None).map_err(|e| e.to_string())?;
            ensure!(
                r.status == 200,
                "GET / on the draining worker: {} {}",
                r.status,
                r.body
            );
            let (_, answered_by, _) = banner(&r.body)?;
            ensure!(
                answered_by == old,
                "pid {answered_by} answered on pid {old}'s connection"
            );
            if r.close {
                break;
            }
            // A bound on correctness, not speed: the master tells the old
            // worker to drain as soon as the replacement is ready (about
            // when we saw it), and the worker closes its idle connections
            // `WORKER_DRAIN` after it takes that word, from which on its
            // answers say close. The property is that the answer says
            // close before the deadline closes the connection; answers
            // without it a whole `WORKER_DRAIN` after the replacement was
            // ready mean the worker never took the drain, however slow
            // the machine.
            ensure!(
                ready_at.elapsed() < WORKER_DRAIN,
                "the draining worker's answers lack `Connection: close` {WORKER_DRAIN:?} \
                 (its drain deadline) after its replacement was ready"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        ensure!(
            conn.closed_within(Duration::from_secs(5))?,
            "the connection stayed open after `Connection: close`"
        );
    }
    for conn in idle.iter_mut() {
        ensure!(
            conn.closed_within(Duration::from_secs(15))?,
            "the draining worker kept an idle connection open past its drain deadline"
        );
    }
    let after = server.wait_for_workers(Duration::from_secs(10), |s| s.pids().contains(&replacement))?;
    ensure!(!alive(old), "the old worker {old} still runs");
    println!(
        "    reload with 6 idle keep-alive connections: 3 answered by the draining worker with \
         `Connection: close` and closed, 3 closed at its drain deadline; pids {before:?} -> {:?}",
        after.pids()
    );
    server.stop()
}

/// `wrk -t2 -c32 -d8s` on `GET /` while the master reloads every worker
/// twice (SIGHUP at 2 s and 5 s, one shared socket): wrk — a client that
/// never retries — sees no socket error and no non-2xx answer. A draining
/// worker that closed a keep-alive connection with a request on its way
/// shows up here as a read error.
fn reloads_under_wrk_fail_no_get() -> Check {
    let server = Server::start(&[])?;
    let run = reloads_under_wrk(&server, None, 8)?;
    println!(
        "    wrk GET / through two reloads (SIGHUP at 2 s and {:.1?}): {} requests, socket errors {:?}, \
         non-2xx {}; pids {:?} -> {:?} -> {:?}",
        run.reloads.second_reload,
        run.wrk.requests,
        run.wrk.socket_errors,
        run.wrk.non_2xx,
        run.reloads.pids[0],
        run.reloads.pids[1],
        run.reloads.pids[2]
    );
    run.check()?;
    server.stop()
}

/// The same with `POST /counter` (wrk with a Lua script that counts the
/// 2xx answers): no socket error, no non-2xx answer, and the counter is
/// exactly the number of 2xx POSTs — a POST that failed but was applied
/// anyway (which a client cannot safely retry) would make it larger. The
/// script turns to `GET /` for the run's last 2–3 s, so that no POST is
/// still on its way when wrk stops.
fn reloads_under_wrk_fail_no_post() -> Check {
    let server = Server::start(&[])?;
    let script = common::tmp().join("post.lua");
    std::fs::write(&script, POST_SCRIPT).map_err(|e| format!("{}: {e}", script.display()))?;
    let run = reloads_under_wrk(&server, Some(&script), 10)?;
    let posted = run
        .wrk
        .posted
        .ok_or_else(|| format!("the script printed no 2xx POST count:\n{}", run.reloads.output))?;
    let mut conn = Conn::open(&server.addr).map_err(|e| e.to_string())?;
    let r = conn.send("GET", "/counter", None).map_err(|e| e.to_string())?;
    ensure!(r.status == 200, "GET /counter: {} {}", r.status, r.body);
    let counter = field(&r.json()?, "value")?;
    // An idle keep-alive connection would hold its worker's drain open.
    drop(conn);
    println!(
        "    wrk POST /counter through two reloads (SIGHUP at 2 s and {:.1?}): {} requests, {posted} POSTs \
         answered 2xx, counter {counter}, socket errors {:?}, non-2xx {}; pids {:?} -> {:?} -> {:?}",
        run.reloads.second_reload,
        run.wrk.requests,
        run.wrk.socket_errors,
        run.wrk.non_2xx,
        run.reloads.pids[0],
        run.reloads.pids[1],
        run.reloads.pids[2]
    );
    run.check()?;
    ensure!(posted > 0, "no POST answered 2xx:\n{}", run.reloads.output);
    ensure!(
        counter == posted,
        "the counter is {counter} after {posted} POSTs answered 2xx (and no other POST answered)"
    );
    server.stop()
}

/// wrk's script for `reloads_under_wrk_fail_no_post`: `POST /counter`
/// until 7–8 s into the run (`os.time` counts whole seconds), then `GET
/// /`; counts the 2xx answers to POSTs (JSON bodies; `GET /` answers
/// plain text) and prints their sum over the threads.
const POST_SCRIPT: &str = r#"
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end
function init(args)
  started = os.time()
  posted = 0
end
function request()
  if os.time() - started < 8 then
    return wrk.format("POST", "/counter")
  end
  return wrk.format("GET", "/")
end
function response(status, headers, body)
  if status >= 200 and status < 300 and string.sub(body, 1, 1) == "{" then
    posted = posted + 1
  end
end
function done(summary, latency, requests)
  local n = 0
  for _, t in ipairs(threads) do
    n = n + t:get("posted")
  end
  io.write(string.format("2xx POSTs: %d\n", n))
end
"#;

/// One wrk run through two reloads ([`http::wrk_through_two_reloads`]),
/// and wrk's summary.
struct WrkRun {
    wrk: Wrk,
    reloads: ReloadsUnderWrk,
}

impl WrkRun {
    /// No socket error, no non-2xx answer, some requests, and every worker
    /// replaced twice.
    fn check(&self) -> Check {
        ensure!(
            self.wrk.socket_errors == [0; 4] && self.wrk.non_2xx == 0,
            "wrk saw socket errors (connect, read, write, timeout) {:?} and {} non-2xx answers:\n{}",
            self.wrk.socket_errors,
            self.wrk.non_2xx,
            self.reloads.output
        );
        ensure!(
            self.wrk.requests > 0,
            "wrk made no request:\n{}",
            self.reloads.output
        );
        self.reloads.every_worker_replaced_twice()
    }
}

/// Runs `wrk -t2 -c32 -d<secs>s --timeout 10s` (with `script`, if any)
/// against `server`, sending SIGHUP to the master 2 s and 5 s in.
fn reloads_under_wrk(server: &Server, script: Option<&std::path::Path>, secs: u64) -> Result<WrkRun, String> {
    let mut command = Command::new("wrk");
    command.args(["-t2", "-c32", &format!("-d{secs}s"), "--timeout", "10s"]);
    if let Some(script) = script {
        command.arg("-s").arg(script);
    }
    command.arg(format!("http://{}/", server.addr));
    let reloads = wrk_through_two_reloads(
        &mut command,
        Duration::from_secs(secs + 15),
        || server.signal(Signal::SIGHUP),
        |done| {
            Ok(server
                .wait_for_workers(Duration::from_secs(30), |s| done(&s.pids()))?
                .pids())
        },
    )?;
    Ok(WrkRun {
        wrk: Wrk::parse(&reloads.output)?,
        reloads,
    })
}

/// The same load; one worker is SIGKILLed. Only requests on connections
/// that worker answered last (or accepted just before it died) may fail;
/// its successor takes its slot with the next generation.
fn sigkilled_worker_under_load_is_replaced() -> Check {
    let server = Server::start(&[])?;
    let load = Load::start(&server.addr, 8);
    std::thread::sleep(Duration::from_millis(1000));
    // A worker that is answering the load's keep-alive connections.
    let (victim, (slot, generation)) = load
        .answered_by()
        .into_iter()
        .next()
        .ok_or("no worker answered GET / under load")?;
    let killed_at = Instant::now();
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).map_err(|e| format!("kill {victim}: {e}"))?;
    std::thread::sleep(Duration::from_millis(1500));
    let tally = load.finish()?;
    let after = server.wait_for_workers(Duration::from_secs(5), |s| {
        s.workers.iter().any(|w| w.slot == slot && w.pid != victim)
    })?;
    let successor = after
        .workers
        .iter()
        .find(|w| w.slot == slot)
        .ok_or("no successor")?;
    // A request may fail only where the victim was answering: on a
    // connection it answered last, or a fresh one it had accepted but not
    // answered when it died.
    let (on_victim, elsewhere): (Vec<&Failure>, Vec<&Failure>) = tally.failures.iter().partition(|f| {
        f.last_pid == Some(victim)
            || (f.last_pid.is_none() && f.at >= killed_at && f.at < killed_at + Duration::from_secs(1))
    });
    let retried_from_victim = tally.retries.iter().filter(|p| **p == Some(victim)).count();
    println!(
        "    SIGKILL of slot {slot} pid {victim} under load: {} requests answered; in flight on the \
         killed worker: {} failed, {retried_from_victim} retried on a new connection ({} retries \
         in all); {} failed elsewhere; successor pid {} generation {}",
        tally.ok,
        on_victim.len(),
        tally.retries.len(),
        elsewhere.len(),
        successor.pid,
        successor.generation
    );
    ensure!(
        elsewhere.is_empty(),
        "requests not on the killed worker failed: {:?}",
        elsewhere.iter().take(5).map(|f| &f.what).collect::<Vec<_>>()
    );
    ensure!(
        successor.generation == generation + 1,
        "slot {slot}: generation {} after the kill, expected {}",
        successor.generation,
        generation + 1
    );
    ensure!(!alive(victim), "the killed pid {victim} is still alive");
    ensure!(tally.ok > 300, "only {} requests answered in 2.5 s", tally.ok);
    // A worker killed before the shutdown does not make it unclean.
    server.stop()
}

/// SIGTERM while `POST /jobs?ms=300` is in flight: the request is
/// answered 200 and the master exits 0.
fn graceful_shutdown_finishes_the_request_in_flight() -> Check {
    let server = Server::start(&[])?;
    let mut conn = Conn::open(&server.addr).map_err(|e| e.to_string())?;
    let start = Instant::now();
    conn.write_request("POST", "/jobs?ms=300", None)
        .map_err(|e| format!("write: {e}"))?;
    std::thread::sleep(Duration::from_millis(100));
    server.signal(Signal::SIGTERM)?;
    let r = conn.read_response().map_err(|e| e.to_string())?;
    let took = start.elapsed();
    ensure!(
        r.status == 200,
        "the request in flight got {} {}",
        r.status,
        r.body
    );
    let v = r.json()?;
    let status = server.wait(Duration::from_secs(15))?;
    println!(
        "    SIGTERM 100 ms into a 300 ms job: answered 200 after {took:?} (ran on slot {}, {} attempt(s)); master exited {status}",
        field(&v, "ran_on")?,
        field(&v, "attempts")?
    );
    ensure!(status.success(), "the master exited {status}");
    Ok(())
}

// ------------------------------------------------------------ the example's process

/// A running `axum_cluster` master, in its own process group so that one
/// `killpg` ends it and its workers. Dropping it kills the group and reaps
/// the master.
struct Server {
    child: Child,
    addr: String,
    /// Worker instances (`--workers`).
    workers: usize,
    /// Kept open: the master's stdout.
    _stdout: BufReader<ChildStdout>,
}

impl Server {
    /// `--workers 3 --listen 127.0.0.1:0 --quiet --data $SHMC_TMP/data` plus
    /// `extra`; returns once `/stats` shows 3 workers.
    fn start(extra: &[&str]) -> Result<Server, String> {
        Server::start_with(3, extra)
    }

    /// `start`, with `workers` workers.
    fn start_with(workers: usize, extra: &[&str]) -> Result<Server, String> {
        let exe = example()?;
        // The data directory inside the scenario's scratch directory, which
        // `run_suite` removes even if the master had to be killed.
        let data = common::tmp().join("data");
        let mut child = Command::new(&exe)
            .args([
                "--workers",
                &workers.to_string(),
                "--listen",
                "127.0.0.1:0",
                "--quiet",
                "--data",
            ])
            .arg(&data)
            .args(extra)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("{}: {e}", exe.display()))?;
        MASTER.store(child.id() as i32, Ordering::Release);
        let stdout = child.stdout.take();
        let mut server = Server {
            child,
            addr: String::new(),
            workers,
            _stdout: BufReader::new(stdout.ok_or("no stdout pipe")?),
        };
        let mut line = String::new();
        server
            ._stdout
            .read_line(&mut line)
            .map_err(|e| format!("reading the first line: {e}"))?;
        // "listening on 127.0.0.1:PORT (master pid N)"
        let rest = line
            .trim_end()
            .strip_prefix("listening on ")
            .ok_or(format!("first line {line:?}"))?;
        let (addr, pid) = rest
            .split_once(" (master pid ")
            .ok_or(format!("first line {line:?}"))?;
        let pid: u32 = pid
            .strip_suffix(')')
            .and_then(|p| p.parse().ok())
            .ok_or(format!("first line {line:?}"))?;
        ensure!(
            pid == server.child.id(),
            "first line names pid {pid}, the master is {}",
            server.child.id()
        );
        server.addr = addr.to_owned();
        server.wait_for_workers(Duration::from_secs(15), |_| true)?;
        Ok(server)
    }

    fn signal(&self, sig: Signal) -> Check {
        kill(Pid::from_raw(self.child.id() as i32), sig).map_err(|e| format!("{sig} to the master: {e}"))
    }

    /// `GET /stats` on a new connection.
    fn stats(&self) -> Result<Stats, String> {
        let mut conn = Conn::open(&self.addr).map_err(|e| format!("connect: {e}"))?;
        let r = conn.send("GET", "/stats", None).map_err(|e| e.to_string())?;
        ensure!(r.status == 200, "GET /stats: {} {}", r.status, r.body);
        Stats::parse(&r.body)
    }

    /// Polls `/stats` until it shows every worker (and no more), no
    /// errors, and `done`.
    fn wait_for_workers(&self, limit: Duration, done: impl Fn(&Stats) -> bool) -> Result<Stats, String> {
        let start = Instant::now();
        loop {
            let last = self.stats();
            if let Ok(s) = &last {
                let n = self.workers;
                if s.workers.len() == n && s.errors.is_empty() && s.slots().len() == n && done(s) {
                    return last;
                }
            }
            if start.elapsed() > limit {
                return Err(format!("after {limit:?}, /stats still shows {last:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the master to exit.
    fn wait(mut self, limit: Duration) -> Result<std::process::ExitStatus, String> {
        wait_child(&mut self.child, limit)
    }

    /// SIGTERM, then the master must exit 0.
    fn stop(self) -> Check {
        self.signal(Signal::SIGTERM)?;
        let status = self.wait(Duration::from_secs(15))?;
        ensure!(status.success(), "the master exited {status} after SIGTERM");
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

/// The example's binary, `target/<profile>/axum_cluster`: built here by
/// `cargo build -p axum_cluster` (the example is a package of its own, so
/// `cargo test` does not build it for this test), into the target
/// directory and profile of this test binary, so that the test never runs
/// a stale build. Once per suite: the scenarios' processes find it built.
fn example() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // <target>/<profile>/deps/axum_cluster-<hash>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .ok_or("no target dir above the test binary")?;
    Ok(profile_dir.join(EXAMPLE))
}

/// The example's package and binary.
const EXAMPLE: &str = "axum_cluster";

/// Builds the example (see [`example`]).
fn build_example() -> Check {
    let bin = example()?;
    let profile_dir = bin.parent().ok_or("no profile dir")?;
    let target = profile_dir.parent().ok_or("no target dir")?;
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo.args(["build", "--quiet", "-p", EXAMPLE, "--bin", EXAMPLE]);
    if profile_dir.file_name().is_some_and(|p| p == "release") {
        cargo.arg("--release");
    }
    let status = cargo
        .arg("--target-dir")
        .arg(target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("cargo build -p {EXAMPLE}: {e}"))?;
    ensure!(status.success(), "cargo build -p {EXAMPLE}: {status}");
    ensure!(
        bin.is_file(),
        "cargo build -p {EXAMPLE} made no {}",
        bin.display()
    );
    Ok(())
}

// ------------------------------------------------------------ what the example answers

#[derive(Debug)]
struct Stats {
    workers: Vec<WorkerFigures>,
    errors: Vec<String>,
    asked_by: u32,
    raw: String,
}

#[derive(Debug)]
struct WorkerFigures {
    slot: u32,
    generation: u32,
    pid: u32,
    requests: u64,
    jobs: u64,
}

impl Stats {
    fn parse(body: &str) -> Result<Stats, String> {
        let v: Value = serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))?;
        let list = |name: &str| {
            v[name]
                .as_array()
                .cloned()
                .ok_or(format!("no {name:?} list in {body}"))
        };
        let mut workers = Vec::new();
        for w in list("workers")? {
            workers.push(WorkerFigures {
                slot: field(&w, "slot")? as u32,
                generation: field(&w, "generation")? as u32,
                pid: field(&w, "pid")? as u32,
                requests: field(&w, "requests")?,
                jobs: field(&w, "jobs")?,
            });
        }
        Ok(Stats {
            workers,
            errors: list("errors")?.iter().map(|e| e.to_string()).collect(),
            asked_by: field(&v, "asked_by")? as u32,
            raw: body.to_owned(),
        })
    }

    fn slots(&self) -> BTreeSet<u32> {
        self.workers.iter().map(|w| w.slot).collect()
    }

    fn pids(&self) -> BTreeSet<u32> {
        self.workers.iter().map(|w| w.pid).collect()
    }
}

#[derive(Debug)]
struct CacheAnswer {
    slot: u32,
    value: Option<String>,
    cached: bool,
}

fn cache_get(conn: &mut Conn, key: &str) -> Result<CacheAnswer, String> {
    let r = conn
        .send("GET", &format!("/cache/{key}"), None)
        .map_err(|e| e.to_string())?;
    ensure!(r.status == 200, "GET /cache/{key}: {} {}", r.status, r.body);
    let v = r.json()?;
    ensure!(v["key"] == key, "GET /cache/{key} answered {}", r.body);
    Ok(CacheAnswer {
        slot: field(&v, "slot")? as u32,
        value: v["value"].as_str().map(str::to_owned),
        cached: v["cached"]
            .as_bool()
            .ok_or(format!("no \"cached\" in {}", r.body))?,
    })
}

/// "worker <slot> pid <pid> generation <g>" (`GET /`).
fn banner(body: &str) -> Result<(u32, u32, u32), String> {
    let words: Vec<&str> = body.split_whitespace().collect();
    match words[..] {
        ["worker", slot, "pid", pid, "generation", generation] => {
            let n = |s: &str| s.parse::<u32>().map_err(|e| format!("{body:?}: {e}"));
            Ok((n(slot)?, n(pid)?, n(generation)?))
        }
        _ => Err(format!("GET / answered {body:?}")),
    }
}

/// What went wrong in `values`, which should be `1..=n` once each.
fn duplicates_and_gaps(values: &[u64], n: u64) -> String {
    let mut seen = BTreeMap::new();
    for v in values {
        *seen.entry(*v).or_insert(0) += 1;
    }
    let duplicates: Vec<_> = seen
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(v, _)| *v)
        .take(10)
        .collect();
    let gaps: Vec<_> = (1..=n).filter(|v| !seen.contains_key(v)).take(10).collect();
    format!(
        "duplicates {duplicates:?}, missing {gaps:?}, {} values",
        values.len()
    )
}

// ------------------------------------------------------------ load

/// Client threads sending `GET /`, `GET /stats`, `GET /cache/k` in turn on
/// keep-alive connections until told to stop.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Tally>>,
    /// pid → (slot, generation) of every worker that answered `GET /`.
    banners: Arc<Mutex<BTreeMap<u32, (u32, u32)>>>,
}

#[derive(Default)]
struct Tally {
    ok: u64,
    /// For each retry: the pid that had last answered on the connection
    /// found closed.
    retries: Vec<Option<u32>>,
    failures: Vec<Failure>,
    /// Worker pids that answered.
    pids: BTreeSet<u32>,
}

struct Failure {
    what: String,
    /// The pid that had last answered on the request's connection (`None`:
    /// a fresh connection).
    last_pid: Option<u32>,
    at: Instant,
}

impl Load {
    fn start(addr: &str, threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let banners: Arc<Mutex<BTreeMap<u32, (u32, u32)>>> = Arc::default();
        let threads = (0..threads)
            .map(|i| {
                let (addr, stop, banners) = (addr.to_owned(), stop.clone(), banners.clone());
                std::thread::spawn(move || {
                    let paths = ["/", "/stats", "/cache/k"];
                    let mut client = Client::new(&addr);
                    let mut tally = Tally::default();
                    let mut n = i;
                    while !stop.load(Ordering::Acquire) {
                        let path = paths[n % paths.len()];
                        n += 1;
                        match client.get(path, &mut tally.retries) {
                            Ok(r) if r.status == 200 => {
                                tally.ok += 1;
                                if let Some(pid) = client.last_pid {
                                    tally.pids.insert(pid);
                                }
                                if let Ok((slot, pid, generation)) = banner(&r.body) {
                                    let mut seen = banners.lock().unwrap_or_else(PoisonError::into_inner);
                                    seen.insert(pid, (slot, generation));
                                }
                            }
                            Ok(r) => tally.failures.push(Failure {
                                what: format!("GET {path}: {} {}", r.status, r.body),
                                last_pid: client.last_pid,
                                at: Instant::now(),
                            }),
                            Err(f) => tally.failures.push(f),
                        }
                    }
                    tally
                })
            })
            .collect();
        Load {
            stop,
            threads,
            banners,
        }
    }

    /// pid → (slot, generation) of the workers that answered `GET /` so far.
    fn answered_by(&self) -> BTreeMap<u32, (u32, u32)> {
        self.banners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn finish(self) -> Result<Tally, String> {
        self.stop.store(true, Ordering::Release);
        let mut all = Tally::default();
        for t in self.threads {
            let t = t.join().map_err(|_| "a load thread panicked")?;
            all.ok += t.ok;
            all.retries.extend(t.retries);
            all.failures.extend(t.failures);
            all.pids.extend(t.pids);
        }
        Ok(all)
    }
}

// ------------------------------------------------------------ HTTP/1.1 client

/// A keep-alive client of one server: reconnects when the server closes,
/// and retries an idempotent request once on a new connection when a
/// *reused* connection was closed before any byte of the answer came
/// (RFC 9112 §9.3.1: the server may close an idle connection as the
/// request is on its way; a draining worker does).
struct Client {
    addr: String,
    conn: Option<Conn>,
    /// The pid that last answered on `conn`.
    last_pid: Option<u32>,
}

impl Client {
    fn new(addr: &str) -> Client {
        Client {
            addr: addr.to_owned(),
            conn: None,
            last_pid: None,
        }
    }

    /// `GET path`; a retry is recorded in `retries` (with the pid that had
    /// last answered on the closed connection).
    fn get(&mut self, path: &str, retries: &mut Vec<Option<u32>>) -> Result<Response, Failure> {
        let mut retried = false;
        loop {
            let reused = self.conn.is_some();
            let last_pid = self.last_pid;
            let on = match (reused, retried) {
                (true, _) => "a reused connection",
                (false, true) => "the retry's new connection",
                (false, false) => "a new connection",
            };
            let failure = |what: String| Failure {
                what: format!("GET {path} on {on}: {what}"),
                last_pid,
                at: Instant::now(),
            };
            if self.conn.is_none() {
                self.last_pid = None;
                self.conn = Some(Conn::open(&self.addr).map_err(|e| failure(format!("connect: {e}")))?);
            }
            let conn = self
                .conn
                .as_mut()
                .ok_or_else(|| failure("no connection".into()))?;
            match conn.send("GET", path, None) {
                Ok(r) => {
                    self.last_pid = r.pid();
                    if r.close {
                        self.conn = None;
                    }
                    return Ok(r);
                }
                Err(HttpError::Unanswered(_)) if reused && !retried => {
                    self.conn = None;
                    retried = true;
                    retries.push(last_pid);
                }
                Err(e) => {
                    self.conn = None;
                    return Err(failure(e.to_string()));
                }
            }
        }
    }
}

/// One connection.
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

    /// The answering worker's pid: from the banner of `GET /`, or the
    /// `pid` of a JSON answer.
    fn pid(&self) -> Option<u32> {
        if let Ok((_, pid, _)) = banner(&self.body) {
            return Some(pid);
        }
        self.json().ok()?["pid"].as_u64().map(|p| p as u32)
    }
}

enum HttpError {
    /// Nothing of an answer arrived: the connection was closed or reset
    /// (or the request could not be written).
    Unanswered(String),
    /// Anything else: a timeout, a cut or malformed answer.
    Broken(String),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unanswered(e) => write!(f, "no answer: {e}"),
            Self::Broken(e) => write!(f, "broken answer: {e}"),
        }
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

    fn send(&mut self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Response, HttpError> {
        self.write_request(method, path, body)
            .map_err(|e| HttpError::Unanswered(format!("write: {e}")))?;
        self.read_response()
    }

    fn write_request(&mut self, method: &str, path: &str, body: Option<&[u8]>) -> io::Result<()> {
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n").into_bytes();
        if let Some(body) = body {
            request.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
            request.extend_from_slice(body);
        } else if method != "GET" {
            request.extend_from_slice(b"Content-Length: 0\r\n\r\n");
        } else {
            request.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&request)
    }

    fn read_response(&mut self) -> Result<Response, HttpError> {
        // Has any byte of the answer come? EOF or a reset before that is
        // `Unanswered`; a timeout never is.
        match self.reader.fill_buf() {
            Ok([]) => return Err(HttpError::Unanswered("closed".into())),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(HttpError::Broken(format!("no answer within the timeout: {e}")));
            }
            Err(e) => return Err(HttpError::Unanswered(e.to_string())),
        }
        self.read_answer().map_err(HttpError::Broken)
    }

    /// Whether the connection is still open (no EOF, no reset, nothing
    /// unasked for), looked at for 100 ms.
    fn is_open(&mut self) -> Result<bool, String> {
        let stream = self.reader.get_ref();
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        let open = match self.reader.fill_buf() {
            Ok([]) => false,
            Ok(data) => return Err(format!("unasked-for bytes: {:?}", String::from_utf8_lossy(data))),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => true,
            Err(_) => false,
        };
        self.reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        Ok(open)
    }

    /// Whether the server closes the connection (EOF or reset) within
    /// `limit`, sending nothing.
    fn closed_within(&mut self, limit: Duration) -> Result<bool, String> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if !self.is_open()? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("connection closed mid-answer".into()),
            Ok(_) => Ok(line.trim_end().to_owned()),
            Err(e) => Err(format!("read: {e}")),
        }
    }

    fn read_answer(&mut self) -> Result<Response, String> {
        let status_line = self.line()?;
        let status = match status_line.split_whitespace().collect::<Vec<_>>()[..] {
            ["HTTP/1.1", code, ..] => code.parse::<u16>().map_err(|e| format!("{status_line:?}: {e}"))?,
            _ => return Err(format!("status line {status_line:?}")),
        };
        let (mut length, mut chunked, mut close) = (None, false, false);
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
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "connection" => close = value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let size_line = self.line()?;
                let hex = size_line.split(';').next().unwrap_or_default().trim();
                let size =
                    usize::from_str_radix(hex, 16).map_err(|e| format!("chunk size {size_line:?}: {e}"))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    while !self.line()?.is_empty() {}
                    break;
                }
                let start = body.len();
                body.resize(start + size, 0);
                self.reader
                    .read_exact(&mut body[start..])
                    .map_err(|e| format!("chunk: {e}"))?;
                ensure!(self.line()?.is_empty(), "no CRLF after a chunk");
            }
        } else {
            let length = length.ok_or("neither Content-Length nor chunked")?;
            body.resize(length, 0);
            self.reader
                .read_exact(&mut body)
                .map_err(|e| format!("body: {e}"))?;
        }
        Ok(Response {
            status,
            body: String::from_utf8(body).map_err(|e| format!("body is not UTF-8: {e}"))?,
            close,
        })
    }
}
