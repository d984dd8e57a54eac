//! Master benchmark: how long shmcluster's master takes to bring workers
//! online and to replace a `SIGKILL`ed one, and what two rolling reloads
//! cost an HTTP server under load (`examples/http_cluster` driven by `wrk`).
//!
//! `cargo bench --bench master` prints markdown tables on stdout (progress
//! goes to stderr). Run without `--bench` (as `cargo test --benches` does),
//! it only checks that each measure works, once, and skips HTTP.
//!
//! A master refuses to run in a process with more than one thread, so each
//! cluster measured here runs in a fresh copy of this binary, re-executed
//! with [`MODE_VAR`] set; that copy prints one `sample <ns>` line per figure
//! on stdout, and the parent collects them.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use shmcluster::{Cluster, EventKind, Worker};

mod common;
use common::cluster::in_fresh_copy;
use common::{machine, wait_within};

/// Set in a re-executed copy of this binary: the measure its master runs
/// (`ready <workers>` or `respawn <workers> <kills>`).
const MODE_VAR: &str = "SHMCLUSTER_BENCH_MASTER";
/// Longest any one master (or the HTTP server's shutdown) may take.
const LIMIT: Duration = Duration::from_secs(30);
/// Worker counts for the start-up measure.
const READY_WORKERS: [u32; 4] = [1, 2, 4, 8];
/// Fresh masters per worker count.
const READY_RUNS: usize = 7;
/// Workers in the respawn measure (the kills go round the slots).
const RESPAWN_WORKERS: u32 = 2;
/// Fresh masters for the respawn measure.
const RESPAWN_RUNS: usize = 2;
/// Kills per respawn master.
const KILLS: usize = 10;
/// Workers of the HTTP server.
const HTTP_WORKERS: u32 = 2;
/// Length of each measured `wrk` run, in seconds.
const WRK_SECONDS: u64 = 10;
/// An unrecorded `wrk` run first, so that neither measured run is the cold one.
const WARMUP_SECONDS: u64 = 2;
/// When the reload run sends `SIGHUP` to the master, from the start of `wrk`.
const RELOADS_AT: [Duration; 2] = [Duration::from_secs(2), Duration::from_secs(6)];

type Res<T> = Result<T, String>;

// ------------------------------------------------------------ masters (re-executed copies)

/// A worker that declares itself ready at once and waits to be stopped.
fn idle_worker(worker: Worker) -> Result<(), Infallible> {
    worker.ready();
    while !worker.wait_stop(Duration::from_secs(1)) {}
    Ok(())
}

/// From just before `run()` to the callback seeing the `workers`-th
/// `Online` event; then shuts the cluster down.
fn time_to_ready(workers: u32) -> Res<Vec<Duration>> {
    let started: Rc<Cell<Option<Instant>>> = Rc::default();
    let took: Rc<Cell<Option<Duration>>> = Rc::default();
    let (start, done) = (started.clone(), took.clone());
    let mut online = 0;
    let builder = Cluster::builder()
        .workers(workers)
        .shutdown_grace(LIMIT)
        .on_event(move |cluster, event| {
            if matches!(event.kind, EventKind::Online) {
                online += 1;
                if online == workers {
                    done.set(start.get().map(|t| t.elapsed()));
                    cluster.shutdown();
                }
            }
        });
    started.set(Some(Instant::now()));
    let report = builder.run(idle_worker).map_err(|e| e.to_string())?;
    if !report.clean {
        return Err(format!("unclean shutdown: {report:?}"));
    }
    Ok(vec![took
        .get()
        .ok_or("the cluster ended before every worker was online")?])
}

/// Once every worker is online, `SIGKILL`s one (round the slots) and times
/// from the kill to its successor's `Online` event in the same slot, `kills`
/// times; then shuts the cluster down. Restarts are not delayed (backoff 0,
/// no crash-loop limit in reach), so this is the master's own latency.
fn time_to_respawn(workers: u32, kills: usize) -> Res<Vec<Duration>> {
    let samples: Rc<RefCell<Vec<Duration>>> = Rc::default();
    let failure: Rc<RefCell<Option<String>>> = Rc::default();
    let (out, fail) = (samples.clone(), failure.clone());
    // slot -> (pid, generation) of its worker that came online last.
    let mut live: HashMap<u32, (u32, u32)> = HashMap::new();
    // The slot and generation killed, and when.
    let mut victim: Option<(u32, u32, Instant)> = None;
    let report = Cluster::builder()
        .workers(workers)
        .restart_backoff(Duration::ZERO, Duration::ZERO)
        .crash_loop_limit(kills + 1, Duration::from_secs(1))
        .shutdown_grace(LIMIT)
        .on_event(move |cluster, event| {
            if !matches!(event.kind, EventKind::Online) {
                return;
            }
            let now = Instant::now();
            live.insert(event.slot, (event.pid, event.generation));
            if let Some((slot, generation, at)) = victim {
                if event.slot == slot && event.generation > generation {
                    out.borrow_mut().push(now - at);
                    victim = None;
                }
            }
            if victim.is_some() || live.len() < workers as usize {
                return;
            }
            let done = out.borrow().len();
            if done == kills {
                cluster.shutdown();
                return;
            }
            let mut slots: Vec<u32> = live.keys().copied().collect();
            slots.sort_unstable();
            let slot = slots[done % slots.len()];
            let (pid, generation) = live[&slot];
            let at = Instant::now();
            match sigkill(pid) {
                Ok(()) => victim = Some((slot, generation, at)),
                Err(e) => {
                    *fail.borrow_mut() = Some(format!("kill {pid}: {e}"));
                    cluster.shutdown();
                }
            }
        })
        .run(idle_worker)
        .map_err(|e| e.to_string())?;
    if let Some(e) = failure.take() {
        return Err(e);
    }
    let samples = samples.take();
    if samples.len() != kills || report.restarts as usize != kills || !report.failed_slots.is_empty() {
        return Err(format!("{} of {kills} respawns timed; {report:?}", samples.len()));
    }
    Ok(samples)
}

/// `kill(2)` with `SIGKILL`.
fn sigkill(pid: u32) -> std::io::Result<()> {
    signal(pid, libc::SIGKILL)
}

/// `kill(2)`: sends `sig` to process `pid`.
fn signal(pid: u32, sig: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) takes a pid and a signal number and no pointers.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The re-executed copy: runs the master `mode` names and prints its samples.
fn master_mode(mode: &str) -> ! {
    let words: Vec<&str> = mode.split_whitespace().collect();
    let number = |s: &str| s.parse::<usize>().map_err(|e| format!("{mode:?}: {e}"));
    let result = match words.as_slice() {
        ["ready", n] => number(n).and_then(|n| time_to_ready(n as u32)),
        ["respawn", n, k] => number(n).and_then(|n| time_to_respawn(n as u32, number(k)?)),
        _ => Err(format!("unknown {MODE_VAR} {mode:?}")),
    };
    match result {
        Ok(samples) => {
            let mut out = std::io::stdout().lock();
            for s in samples {
                let _ = writeln!(out, "sample {}", s.as_nanos());
            }
            let _ = out.flush();
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("master bench ({mode}): {e}");
            std::process::exit(1);
        }
    }
}

// ------------------------------------------------------------ the parent

/// Runs `mode` in a fresh copy of this binary and returns its samples.
fn in_fresh_master(mode: &str) -> Res<Vec<Duration>> {
    in_fresh_copy(MODE_VAR, mode, LIMIT)?
        .lines()
        .filter_map(|l| l.strip_prefix("sample "))
        .map(|ns| ns.parse().map(Duration::from_nanos).map_err(|e| e.to_string()))
        .collect()
}

/// Samples from `runs` fresh masters running `mode`.
fn measure(what: &str, mode: &str, runs: usize) -> Res<Vec<Duration>> {
    eprintln!("measuring {what}");
    let mut all = Vec::new();
    for _ in 0..runs {
        all.extend(in_fresh_master(mode)?);
    }
    Ok(all)
}

/// Median, min and max of some samples.
#[derive(Debug, Clone, Copy)]
struct Spread {
    median: Duration,
    min: Duration,
    max: Duration,
    n: usize,
}

fn spread(mut v: Vec<Duration>) -> Spread {
    v.sort_unstable();
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    };
    Spread {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    }
}

fn ms(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

// ------------------------------------------------------------ HTTP under wrk

/// What one `wrk` run reported.
#[derive(Debug, Clone, Copy, Default)]
struct Load {
    requests_per_s: f64,
    requests: u64,
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

/// Reads `wrk`'s summary.
fn parse_wrk(text: &str) -> Res<Load> {
    let mut load = Load::default();
    let mut seen_rate = false;
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            load.requests_per_s = v.trim().parse().map_err(|e| format!("{line:?}: {e}"))?;
            seen_rate = true;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            load.non_2xx = v.trim().parse().map_err(|e| format!("{line:?}: {e}"))?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 12, write 0, timeout 0"
            for (i, part) in v.split(',').enumerate().take(4) {
                let n = part.split_whitespace().nth(1).unwrap_or("");
                load.socket_errors[i] = n.parse().map_err(|e| format!("{line:?}: {e}"))?;
            }
        } else if let Some((n, _)) = line.split_once(" requests in ") {
            load.requests = n.trim().parse().map_err(|e| format!("{line:?}: {e}"))?;
        }
    }
    if seen_rate {
        Ok(load)
    } else {
        Err(format!("no Requests/sec in wrk's output:\n{text}"))
    }
}

/// Runs `wrk -t2 -c32 -d<seconds>s` against `url`, sending `SIGHUP` to
/// `master` at each of `reloads_at`.
fn run_wrk(url: &str, seconds: u64, master: u32, reloads_at: &[Duration]) -> Res<Load> {
    let wrk = Command::new("wrk")
        .args(["-t2", "-c32", &format!("-d{seconds}s"), url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("wrk: {e}"))?;
    let start = Instant::now();
    for &at in reloads_at {
        std::thread::sleep(at.saturating_sub(start.elapsed()));
        signal(master, libc::SIGHUP).map_err(|e| format!("SIGHUP {master}: {e}"))?;
    }
    let out = wrk.wait_with_output().map_err(|e| format!("wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "wrk {}: {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    parse_wrk(&text)
}

/// Whether `name` is an executable file in a `PATH` directory.
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

/// `http_cluster` next to this binary (`<target>/release/examples`), built
/// with cargo if it is not there.
fn http_cluster() -> Res<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // <target>/release/deps/master-<hash>
    let release = exe.parent().and_then(Path::parent).ok_or("no target directory")?;
    let bin = release.join("examples").join("http_cluster");
    if bin.is_file() {
        return Ok(bin);
    }
    let target = release.parent().ok_or("no target directory")?;
    eprintln!("building {}", bin.display());
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--example", "http_cluster", "--target-dir"])
        .arg(target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .map_err(|e| format!("cargo build: {e}"))?;
    if status.success() && bin.is_file() {
        Ok(bin)
    } else {
        Err(format!("cargo build --example http_cluster: {status}"))
    }
}

/// Sends `GET /` until a worker answers 200 (the workers come online just
/// after the master announces its address).
fn await_http(addr: SocketAddr) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let answer = TcpStream::connect(addr).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        });
        match answer {
            Ok(text) if text.starts_with("HTTP/1.1 200") => return Ok(()),
            _ if Instant::now() >= deadline => return Err(format!("{addr} does not answer: {answer:?}")),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The HTTP measure's outcome.
struct Http {
    steady: Load,
    reload: Load,
    /// `reload finished: ok` events the master logged.
    reloads_ok: usize,
    /// The master's exit status after `SIGTERM`, and how long it took.
    exit: ExitStatus,
    stop_took: Duration,
}

fn http() -> Res<Http> {
    let bin = http_cluster()?;
    let mut server = Command::new(&bin)
        .args([
            "--workers",
            &HTTP_WORKERS.to_string(),
            "--listen",
            "127.0.0.1:0",
            "--quiet",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let master = server.id();
    // The master's log (reload events), read until the server and its
    // workers are gone.
    let mut log = server.stderr.take().ok_or("no stderr")?;
    let log = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = log.read_to_string(&mut text);
        text
    });
    let result = (|| {
        let mut stdout = BufReader::new(server.stdout.take().ok_or("no stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line).map_err(|e| e.to_string())?;
        // "listening on 127.0.0.1:PORT (master pid N)"
        let addr: SocketAddr = line
            .strip_prefix("listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("unexpected first line {line:?}"))?;
        await_http(addr)?;
        let url = format!("http://{addr}/");
        eprintln!("warming up ({WARMUP_SECONDS} s of wrk)");
        run_wrk(&url, WARMUP_SECONDS, master, &[])?;
        eprintln!("measuring wrk, steady ({WRK_SECONDS} s)");
        let steady = run_wrk(&url, WRK_SECONDS, master, &[])?;
        eprintln!("measuring wrk, two rolling reloads ({WRK_SECONDS} s)");
        let reload = run_wrk(&url, WRK_SECONDS, master, &RELOADS_AT)?;
        // Let a reload still draining finish before the shutdown.
        std::thread::sleep(Duration::from_millis(500));
        Ok::<_, String>((steady, reload))
    })();
    let stop = Instant::now();
    let exit = signal(master, libc::SIGTERM)
        .map_err(|e| format!("SIGTERM {master}: {e}"))
        .and_then(|()| wait_within(&mut server, LIMIT));
    let stop_took = stop.elapsed();
    let log = log.join().unwrap_or_default();
    let (steady, reload) = result?;
    let exit = exit?;
    let reloads_ok = log.matches("reload finished: ok").count();
    Ok(Http {
        steady,
        reload,
        reloads_ok,
        exit,
        stop_took,
    })
}

fn errors(l: &Load) -> String {
    let [c, r, w, t] = l.socket_errors;
    format!(
        "connect {c}, read {r}, write {w}, timeout {t}; non-2xx {}",
        l.non_2xx
    )
}

fn print_http(h: &Http) {
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.3}", a / b)
        } else {
            "—".into()
        }
    };
    let (s, r) = (&h.steady, &h.reload);
    println!(
        "| `wrk -t2 -c32 -d{WRK_SECONDS}s`, `http_cluster --workers {HTTP_WORKERS}` | steady | \
         SIGHUP at 2 s and 6 s | ratio (reload ÷ steady) |"
    );
    println!("|---|---|---|---|");
    println!(
        "| requests/s | {:.0} | {:.0} | {} |",
        s.requests_per_s,
        r.requests_per_s,
        ratio(r.requests_per_s, s.requests_per_s)
    );
    println!(
        "| requests | {} | {} | {} |",
        s.requests,
        r.requests,
        ratio(r.requests as f64, s.requests as f64)
    );
    println!("| errors | {} | {} | |", s.errors(), r.errors());
    println!("| errors by kind | {} | {} | |", errors(s), errors(r));
    println!(
        "| reloads finished ok (master log) | | {} of {} | |",
        h.reloads_ok,
        RELOADS_AT.len()
    );
    println!();
    let code = h
        .exit
        .code()
        .map_or_else(|| h.exit.to_string(), |c| c.to_string());
    let ok = if h.exit.code() == Some(0) { "✓" } else { "✗" };
    println!(
        "SIGTERM → master exit code {code} {ok} (after {})",
        ms(h.stop_took)
    );
}

fn main() {
    if let Ok(mode) = std::env::var(MODE_VAR) {
        master_mode(&mode);
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    let full = std::env::args().any(|a| a == "--bench");
    let (ready_runs, respawn_runs, kills) = if full {
        (READY_RUNS, RESPAWN_RUNS, KILLS)
    } else {
        (1, 1, 2)
    };

    let mut rows = Vec::new();
    let mut failed = false;
    for n in READY_WORKERS {
        let what = format!("`run()` → {n} worker{} `Online`", if n == 1 { "" } else { "s" });
        let note = format!("{ready_runs} fresh masters; workers call `ready()` at once");
        match measure(&what, &format!("ready {n}"), ready_runs) {
            Ok(v) => rows.push((what, spread(v), note)),
            Err(e) => {
                eprintln!("{what}: {e}");
                failed = true;
            }
        }
    }
    let what = format!("`SIGKILL` → successor `Online` ({RESPAWN_WORKERS} workers)");
    let note = format!("{respawn_runs} masters × {kills} kills round the slots; restart backoff 0");
    match measure(&what, &format!("respawn {RESPAWN_WORKERS} {kills}"), respawn_runs) {
        Ok(v) => rows.push((what, spread(v), note)),
        Err(e) => {
            eprintln!("{what}: {e}");
            failed = true;
        }
    }

    println!("Machine: {}", machine());
    println!();
    println!("Command: `cargo bench --bench master`");
    println!();
    println!("| measure | median | min | max | samples | how |");
    println!("|---|---|---|---|---|---|");
    for (what, s, note) in &rows {
        println!(
            "| {what} | {} | {} | {} | {} | {note} |",
            ms(s.median),
            ms(s.min),
            ms(s.max),
            s.n
        );
    }
    println!();

    if !full {
        println!("HTTP skipped (not run with --bench)");
    } else if !on_path("wrk") {
        println!("**SKIPPED: wrk not installed** (HTTP under load with rolling reloads)");
    } else {
        match http() {
            Ok(h) => {
                print_http(&h);
                failed |= h.exit.code() != Some(0);
            }
            Err(e) => {
                eprintln!("HTTP: {e}");
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
