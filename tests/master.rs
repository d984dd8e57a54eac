//! The master, tested as it runs: each scenario is a fresh, single-threaded
//! process (this binary re-executed with `SHMC_SCENARIO=<name>`) that runs a
//! real cluster and exits 0 only if everything it checked held. The parent
//! runs the scenarios one by one under a watchdog (a scenario that hangs is
//! killed, and its workers die with it through `PR_SET_PDEATHSIG`), and
//! checks what only an outsider can see: that no worker outlives a
//! SIGKILLed master, that nothing is left in /dev/shm, that a reload under
//! HTTP load drops no request.
//!
//! `harness = false`: the master must fork from a single-threaded process,
//! which libtest's runner is not. Arguments filter scenarios by substring.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shmcluster::{
    Cluster, ClusterError, Event, EventKind, ExitReason, ListenError, ListenMode, Outcome, Unhealthy, Worker,
    WorkerState,
};

#[macro_use]
mod common;
use common::{built_example, sigkill, tempdir, tmp, wait_child, Check};

/// A scenario: its name, its watchdog time, and the code run in the
/// scenario process (`None`: it runs in the parent, driving other
/// processes).
struct Scenario {
    name: &'static str,
    timeout: Duration,
    child: Option<fn() -> Check>,
    parent: Option<fn(&Path) -> Check>,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "errors_before_any_fork",
        timeout: Duration::from_secs(30),
        child: Some(errors_before_any_fork),
        parent: None,
    },
    Scenario {
        name: "respawn_same_slot_new_generation",
        timeout: Duration::from_secs(30),
        child: Some(respawn_same_slot_new_generation),
        parent: None,
    },
    Scenario {
        name: "failed_restart_is_retried",
        timeout: Duration::from_secs(30),
        child: Some(failed_restart_is_retried),
        parent: None,
    },
    Scenario {
        name: "stop_watch_accept_waits_out_emfile",
        timeout: Duration::from_secs(30),
        child: Some(stop_watch_accept_waits_out_emfile),
        parent: None,
    },
    Scenario {
        name: "crash_loop_backoff_and_limit",
        timeout: Duration::from_secs(30),
        child: Some(crash_loop_backoff_and_limit),
        parent: None,
    },
    Scenario {
        name: "rolling_reload_order_and_readiness",
        timeout: Duration::from_secs(60),
        child: Some(rolling_reload_order_and_readiness),
        parent: None,
    },
    Scenario {
        name: "shutdown_judges_the_workers_it_stops",
        timeout: Duration::from_secs(30),
        child: Some(shutdown_judges_the_workers_it_stops),
        parent: None,
    },
    Scenario {
        name: "worker_killed_at_the_grace_deadline_is_reported_once",
        timeout: Duration::from_secs(30),
        child: Some(worker_killed_at_the_grace_deadline_is_reported_once),
        parent: None,
    },
    Scenario {
        name: "every_slot_given_up_ends_the_master",
        timeout: Duration::from_secs(30),
        child: Some(every_slot_given_up_ends_the_master),
        parent: None,
    },
    Scenario {
        name: "worker_requests_reload",
        timeout: Duration::from_secs(30),
        child: Some(worker_requests_reload),
        parent: None,
    },
    Scenario {
        name: "worker_requests_shutdown",
        timeout: Duration::from_secs(30),
        child: Some(worker_requests_shutdown),
        parent: None,
    },
    Scenario {
        name: "lock_holder_past_the_limit_is_killed",
        timeout: Duration::from_secs(30),
        child: Some(lock_holder_past_the_limit_is_killed),
        parent: None,
    },
    Scenario {
        name: "graceful_shutdown_exit_codes",
        timeout: Duration::from_secs(30),
        child: None,
        parent: Some(graceful_shutdown_exit_codes),
    },
    Scenario {
        name: "hung_worker_is_replaced",
        timeout: Duration::from_secs(30),
        child: Some(hung_worker_is_replaced),
        parent: None,
    },
    Scenario {
        name: "stats_peers_and_events_in_workers",
        timeout: Duration::from_secs(30),
        child: Some(stats_peers_and_events_in_workers),
        parent: None,
    },
    Scenario {
        name: "runtime_listener_request",
        timeout: Duration::from_secs(30),
        child: Some(runtime_listener_request),
        parent: None,
    },
    Scenario {
        name: "reuseport_spreads_connections",
        timeout: Duration::from_secs(30),
        child: Some(reuseport_spreads_connections),
        parent: None,
    },
    Scenario {
        name: "reuseport_given_up_instance_passes_its_share_on",
        timeout: Duration::from_secs(30),
        child: Some(reuseport_given_up_instance_passes_its_share_on),
        parent: None,
    },
    Scenario {
        name: "spawn_mode_rust_worker_from_env",
        timeout: Duration::from_secs(30),
        child: Some(spawn_mode_rust_worker_from_env),
        parent: None,
    },
    Scenario {
        name: "spawn_mode_python_listen_fds",
        timeout: Duration::from_secs(30),
        child: Some(spawn_mode_python_listen_fds),
        parent: None,
    },
    Scenario {
        name: "spawn_mode_python_reload_ready_on_start",
        timeout: Duration::from_secs(30),
        child: Some(spawn_mode_python_reload_ready_on_start),
        parent: None,
    },
    Scenario {
        name: "no_orphans_after_master_sigkill",
        timeout: Duration::from_secs(30),
        child: None,
        parent: Some(no_orphans_after_master_sigkill),
    },
    Scenario {
        name: "systemd_socket_activation",
        timeout: Duration::from_secs(30),
        child: None,
        parent: Some(systemd_socket_activation),
    },
    Scenario {
        name: "reload_under_http_load_drops_nothing",
        timeout: Duration::from_secs(90),
        child: None,
        parent: Some(reload_under_http_load_drops_nothing),
    },
    Scenario {
        name: "leader_example_fails_over_every_run",
        timeout: Duration::from_secs(150),
        child: None,
        parent: Some(leader_example_fails_over_every_run),
    },
];

fn main() {
    if let Ok(role) = std::env::var("SHMC_ROLE") {
        // A spawned worker (spawn mode) or a master started by another tool.
        let code = match roles(&role) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("role {role}: {e}");
                1
            }
        };
        std::process::exit(code);
    }
    if let Ok(name) = std::env::var("SHMC_SCENARIO") {
        let s = SCENARIOS.iter().find(|s| s.name == name).expect("known scenario");
        let result = (s.child.expect("a child scenario"))();
        match result {
            Ok(()) => std::process::exit(0),
            Err(e) => {
                eprintln!("FAILED {name}: {e}");
                std::process::exit(1);
            }
        }
    }
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    if std::env::args().any(|a| a == "--list") {
        for s in SCENARIOS {
            println!("{}: test", s.name);
        }
        return;
    }
    let shm_before = shm_listing();
    let mut failed = Vec::new();
    let mut ran = 0;
    for s in SCENARIOS {
        if !filters.is_empty() && !filters.iter().any(|f| s.name.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        let start = Instant::now();
        let tmp = tempdir("master", s.name);
        let result = match (s.child, s.parent) {
            (Some(_), _) => run_scenario_process(s, &tmp),
            (None, Some(parent)) => with_watchdog(s.name, s.timeout, || parent(&tmp)),
            (None, None) => Ok(()),
        };
        let _ = std::fs::remove_dir_all(&tmp);
        match result {
            Ok(()) => println!("test {} ... ok ({:.1?})", s.name, start.elapsed()),
            Err(e) => {
                println!("test {} ... FAILED ({:.1?})\n    {e}", s.name, start.elapsed());
                failed.push(s.name);
            }
        }
    }
    let shm_after = shm_listing();
    let leaked: Vec<_> = shm_after.difference(&shm_before).collect();
    if !leaked.is_empty() {
        println!("test nothing_left_in_dev_shm ... FAILED: {leaked:?}");
        failed.push("nothing_left_in_dev_shm");
    } else {
        println!("test nothing_left_in_dev_shm ... ok");
    }
    println!(
        "\ntest result: {}. {} passed; {} failed",
        if failed.is_empty() { "ok" } else { "FAILED" },
        ran + 1 - failed.len(),
        failed.len()
    );
    if !failed.is_empty() {
        std::process::exit(1);
    }
}

// ------------------------------------------------------------ plumbing

fn shm_listing() -> std::collections::BTreeSet<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `f` in the parent with a watchdog thread that fails the whole test
/// binary if it takes longer than `limit` (child processes die with us).
fn with_watchdog(name: &'static str, limit: Duration, f: impl FnOnce() -> Check) -> Check {
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < limit {
            if flag.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("WATCHDOG: scenario {name} still running after {limit:?}; aborting");
        std::process::abort();
    });
    let r = f();
    done.store(true, Ordering::Release);
    r
}

fn this_exe() -> PathBuf {
    std::env::current_exe().expect("current_exe")
}

fn scenario_command(name: &str, tmp: &Path) -> Command {
    let mut c = Command::new(this_exe());
    c.env("SHMC_SCENARIO", name).env("SHMC_TMP", tmp);
    c
}

fn run_scenario_process(s: &Scenario, tmp: &Path) -> Check {
    let mut child = scenario_command(s.name, tmp)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| e.to_string())?;
    let status = wait_child(&mut child, s.timeout)?;
    ensure!(status.success(), "scenario process ended with {status}");
    Ok(())
}

/// Records the master's events, for checks after `run` returns.
#[derive(Clone, Default)]
struct Log(Rc<RefCell<Vec<(Instant, Event)>>>);

impl Log {
    fn push(&self, e: &Event) {
        self.0.borrow_mut().push((Instant::now(), *e));
    }
    fn events(&self) -> Vec<Event> {
        self.0.borrow().iter().map(|(_, e)| *e).collect()
    }
    fn timed(&self) -> Vec<(Instant, Event)> {
        self.0.borrow().clone()
    }
    fn count(&self, f: impl Fn(&Event) -> bool) -> usize {
        self.0.borrow().iter().filter(|(_, e)| f(e)).count()
    }
}

fn online_count(log: &Log) -> usize {
    log.count(|e| e.kind == EventKind::Online)
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, sig) };
}

fn alive(pid: u32) -> bool {
    // A zombie is dead for our purposes: look at its state.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().and_then(|r| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X"))
        }
        Err(_) => false,
    }
}

/// A worker body: ready at once, then idle until told to stop.
fn idle_worker(w: Worker) -> Result<(), String> {
    w.ready();
    while !w.wait_stop(Duration::from_secs(1)) {}
    Ok(())
}

/// A one-shot HTTP/1.1 GET; returns the body.
fn http_get(addr: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let body = out
        .split("\r\n\r\n")
        .nth(1)
        .ok_or(format!("no body in {out:?}"))?;
    Ok(body.to_string())
}

/// A worker that serves `worker <slot>` over HTTP on its first listener.
fn http_worker(mut w: Worker) -> Result<(), String> {
    let listener = w
        .take_listeners()
        .into_iter()
        .next()
        .ok_or("no listener")?
        .into_tcp();
    w.ready();
    for stream in w.incoming(&listener) {
        let mut s = stream.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        let body = format!("worker {}", w.slot());
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
    Ok(())
}

// ------------------------------------------------------------ scenarios

fn errors_before_any_fork() -> Check {
    let before = std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0);
    ensure!(
        before == 1,
        "scenario process should start single-threaded ({before})"
    );
    match Cluster::builder().workers(5000).run(idle_worker) {
        Err(ClusterError::Workers { requested: 5000, .. }) => {}
        other => return Err(format!("workers(5000): {other:?}")),
    }
    match Cluster::builder()
        .workers(1)
        .listen("192.0.2.1:80")
        .run(idle_worker)
    {
        Err(ClusterError::Listen(ListenError::Bind { .. })) => {}
        other => return Err(format!("unbindable address: {other:?}")),
    }
    match Cluster::builder()
        .workers(1)
        .listen("not an address")
        .run(idle_worker)
    {
        Err(ClusterError::Listen(_)) => {}
        other => return Err(format!("unparsable address: {other:?}")),
    }
    match Cluster::builder().workers(1).command(["/nonexistent/program"]) {
        Err(ClusterError::Command { program, .. }) => ensure!(program == "/nonexistent/program", "{program}"),
        other => return Err(format!("missing command: {other:?}")),
    }
    match Cluster::builder().workers(1).lane_capacity(1000).run(idle_worker) {
        Err(ClusterError::Config(_)) => {}
        other => return Err(format!("bad lane capacity: {other:?}")),
    }
    // Still no child was ever made.
    let children = std::fs::read_to_string(format!("/proc/self/task/{}/children", std::process::id()))
        .unwrap_or_default();
    ensure!(children.trim().is_empty(), "children exist: {children}");
    // A second thread: refused.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || {
        let _ = rx.recv();
    });
    let r = Cluster::builder().workers(1).run(idle_worker);
    drop(tx);
    t.join().unwrap();
    match r {
        Err(ClusterError::NotSingleThreaded { threads }) => ensure!(threads >= 2, "{threads}"),
        other => return Err(format!("multi-threaded master: {other:?}")),
    }
    Ok(())
}

fn respawn_same_slot_new_generation() -> Check {
    let log = Log::default();
    let l = log.clone();
    let mut killed: Option<(u32, u32)> = None; // (pid, generation) of the killed worker
    let report = Cluster::builder()
        .workers(2)
        .on_event(move |cluster, e| {
            l.push(e);
            if e.kind == EventKind::Online && killed.is_none() && online_count(&l) == 2 {
                let victim = cluster.stats().slots[0].clone();
                killed = Some((victim.pid, victim.generation));
                sigkill(victim.pid);
            }
            if e.kind == EventKind::Online && e.slot == 0 && e.generation > 1 {
                cluster.shutdown();
            }
        })
        .run(idle_worker)
        .map_err(|e| e.to_string())?;
    let events = log.events();
    let exit = events
        .iter()
        .find(|e| matches!(e.kind, EventKind::Exit(_)) && e.slot == 0)
        .ok_or("no exit event for slot 0")?;
    ensure!(
        exit.kind == EventKind::Exit(ExitReason::Signaled(9)),
        "exit reason {:?}",
        exit.kind
    );
    let successor = events
        .iter()
        .find(|e| e.kind == EventKind::Online && e.slot == 0 && e.generation == exit.generation + 1)
        .ok_or(format!("no successor in slot 0: {events:?}"))?;
    ensure!(successor.index == 0, "successor index {}", successor.index);
    ensure!(successor.pid != exit.pid, "same pid");
    ensure!(report.clean, "{report:?}");
    ensure!(report.restarts == 1, "{report:?}");
    Ok(())
}

fn failed_restart_is_retried() -> Check {
    let log = Log::default();
    let l = log.clone();
    let mut saved: Option<libc::rlimit> = None;
    let report = Cluster::builder()
        .workers(2)
        .on_event(move |cluster, e| {
            l.push(e);
            if e.kind == EventKind::Online && online_count(&l) == 2 && saved.is_none() {
                // No descriptor left for the master: the restart's socketpair fails.
                let mut lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                // SAFETY: getrlimit/setrlimit read and write the struct given.
                unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
                saved = Some(lim);
                let open = std::fs::read_dir("/proc/self/fd")
                    .map(|d| d.count())
                    .unwrap_or(64) as u64;
                let tight = libc::rlimit {
                    rlim_cur: open.saturating_sub(1),
                    rlim_max: lim.rlim_max,
                };
                // SAFETY: as above.
                unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &tight) };
                sigkill(cluster.stats().slots[0].pid);
            }
            if let EventKind::StartFailed { .. } = e.kind {
                if let Some(lim) = saved {
                    // SAFETY: as above.
                    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
                }
            }
            if e.kind == EventKind::Online && e.slot == 0 && e.generation > 1 {
                cluster.shutdown();
            }
        })
        .run(idle_worker)
        .map_err(|e| e.to_string())?;
    let events = log.events();
    let failed = events
        .iter()
        .position(|e| {
            matches!(e.kind, EventKind::StartFailed { errno } if errno == libc::EMFILE) && e.slot == 0
        })
        .ok_or(format!("no StartFailed(EMFILE) for slot 0: {events:?}"))?;
    ensure!(
        events[failed..]
            .iter()
            .any(|e| e.kind == EventKind::Online && e.slot == 0 && e.generation > 1),
        "slot 0 not restarted after the failure: {events:?}"
    );
    ensure!(report.clean, "{report:?}");
    Ok(())
}

/// `StopWatch::accept` (the C ABI's and Python's accept) out of descriptors:
/// `accept(2)` fails with `EMFILE` while a connection waits. It pauses and
/// tries again instead of failing (which ended `for conn in
/// worker.incoming(sock)`, and so the worker); once a descriptor is free
/// again it returns the connection. Its own process: the descriptor limit
/// is the whole process's.
fn stop_watch_accept_waits_out_emfile() -> Check {
    use std::os::fd::{AsFd, AsRawFd};
    let segment =
        shmcluster::raw::Segment::create(&shmcluster::raw::Config::new(1)).map_err(|e| e.to_string())?;
    let watch = shmcluster::StopWatch::new(&segment, 0).ok_or("no slot 0")?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let mut client =
        TcpStream::connect(listener.local_addr().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    // The lowest free descriptor: accept's own dup of the listener takes
    // it, and nothing is left for the connection.
    let lowest = std::fs::File::open("/dev/null")
        .map_err(|e| e.to_string())?
        .as_raw_fd();
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct given.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let tight = libc::rlimit {
        rlim_cur: lowest as u64 + 1,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: as above.
    let set = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &tight) };
    ensure!(set == 0, "setrlimit: {}", std::io::Error::last_os_error());
    let restore = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    });
    let accepted = watch.accept(listener.as_fd(), Some(Duration::from_secs(20)));
    restore.join().map_err(|_| "the restoring thread panicked")?;
    let conn = accepted
        .map_err(|e| format!("accept failed instead of waiting out EMFILE: {e}"))?
        .ok_or("no connection within 20 s")?;
    let mut conn = TcpStream::from(conn);
    client.write_all(b"hi").map_err(|e| e.to_string())?;
    let mut buf = [0u8; 2];
    conn.read_exact(&mut buf).map_err(|e| e.to_string())?;
    ensure!(&buf == b"hi", "{buf:?}");
    Ok(())
}

/// Instance 0 is ready and healthy; instance 1 crashes at start-up every
/// time; instance 2 was ready, is SIGKILLed from outside, and its successor
/// is stopped before it can be ready. The shutdown, asked for once
/// instance 1 has died three times, is unclean because of instance 1
/// only (`Crashing`), and says so in `Report::unhealthy`.
fn shutdown_judges_the_workers_it_stops() -> Check {
    let report = Cluster::builder()
        .workers(3)
        .restart_backoff(Duration::from_millis(10), Duration::from_millis(50))
        .on_event(move |cluster, e| {
            let dead = |slot: u32| cluster.stats().slots[slot as usize].restarts;
            if e.kind == EventKind::Online && e.index == 2 && e.generation == 1 {
                sigkill(e.pid);
            }
            if e.kind == EventKind::Spawned && e.index == 2 && e.generation == 2 && dead(1) >= 3 {
                cluster.shutdown();
            }
            if e.kind == EventKind::Exit(ExitReason::Exited(1)) && e.index == 1 && dead(1) >= 3 {
                // The successor of instance 2 is there: stop before it is ready.
                if cluster.stats().slots[2].generation == 2 {
                    cluster.shutdown();
                }
            }
        })
        .run(|w: Worker| {
            match (w.index(), w.generation()) {
                (1, _) => return Err("instance 1 cannot start".to_string()),
                // Slow to be ready: the shutdown comes first.
                (2, g) if g > 1 => std::thread::sleep(Duration::from_millis(500)),
                _ => {}
            }
            idle_worker(w)
        })
        .map_err(|e| e.to_string())?;
    ensure!(
        report.outcome == Outcome::Unclean && report.exit_code() == 1 && !report.clean,
        "{report:?}"
    );
    ensure!(
        report.unhealthy == vec![Unhealthy::Crashing { index: 1 }],
        "only instance 1 was unhealthy: {report:?}"
    );
    ensure!(
        report
            .to_string()
            .starts_with("unclean shutdown: worker 1 crashed before it was ever ready"),
        "{report}"
    );
    Ok(())
}

/// Instance 0 ignores the shutdown (its `SIGTERM` is caught and it never
/// looks at its stop flag) and is killed at the end of a short grace
/// period; instance 1 stops cleanly. The report names instance 0 once, as
/// killed at the deadline (not also as "killed by signal 9"), and counts
/// one kill.
fn worker_killed_at_the_grace_deadline_is_reported_once() -> Check {
    let report = Cluster::builder()
        .workers(2)
        .shutdown_grace(Duration::from_millis(300))
        .on_event({
            let mut online = 0;
            move |cluster, e| {
                if e.kind == EventKind::Online {
                    online += 1;
                    if online == 2 {
                        cluster.shutdown();
                    }
                }
            }
        })
        .run(|w: Worker| {
            if w.index() == 0 {
                w.ready();
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            idle_worker(w)
        })
        .map_err(|e| e.to_string())?;
    ensure!(
        report.outcome == Outcome::Unclean && report.exit_code() == 1,
        "{report:?}"
    );
    ensure!(
        report.unhealthy == vec![Unhealthy::KilledAtDeadline { index: 0 }],
        "instance 0 reported once, as killed at the deadline: {report:?}"
    );
    ensure!(report.killed == 1, "one kill: {report:?}");
    ensure!(
        report.to_string()
            == "unclean shutdown: worker 0 did not exit within the grace period and was killed (0 restarts, 1 killed)",
        "{report}"
    );
    Ok(())
}

/// With a crash-loop limit and every instance crashing, the master gives
/// every slot up and then ends by itself: `Outcome::AllGivenUp`, exit 3.
fn every_slot_given_up_ends_the_master() -> Check {
    let log = Log::default();
    let l = log.clone();
    let report = Cluster::builder()
        .workers(2)
        .restart_backoff(Duration::from_millis(5), Duration::from_millis(20))
        .crash_loop_limit(2, Duration::from_secs(20))
        .on_event(move |_, e| l.push(e))
        .run(|w: Worker| Err::<(), _>(format!("instance {} cannot start", w.index())))
        .map_err(|e| e.to_string())?;
    ensure!(
        report.outcome == Outcome::AllGivenUp && report.exit_code() == 3,
        "{report:?}"
    );
    ensure!(report.failed_slots.len() == 2, "{report:?}");
    ensure!(
        log.count(|e| e.kind == EventKind::CrashLoop) == 2,
        "{:?}",
        log.events()
    );
    ensure!(
        log.count(|e| e.kind == EventKind::ShutdownStarted) == 1,
        "{:?}",
        log.events()
    );
    Ok(())
}

fn crash_loop_backoff_and_limit() -> Check {
    let log = Log::default();
    let l = log.clone();
    let report = Cluster::builder()
        .workers(2)
        .restart_backoff(Duration::from_millis(40), Duration::from_millis(400))
        .crash_loop_limit(4, Duration::from_secs(20))
        .on_event(move |cluster, e| {
            l.push(e);
            if e.kind == EventKind::CrashLoop {
                let stats = cluster.stats();
                if stats.slots[0].state != WorkerState::Failed {
                    eprintln!("slot 0 not Failed: {:?}", stats.slots[0]);
                    std::process::exit(3);
                }
                cluster.shutdown();
            }
        })
        .run(|w: Worker| {
            if w.index() == 0 {
                // Crashes at start-up, every time.
                return Err(format!("worker {} cannot start", w.index()));
            }
            idle_worker(w)
        })
        .map_err(|e| e.to_string())?;
    let timed = log.timed();
    let spawns: Vec<Instant> = timed
        .iter()
        .filter(|(_, e)| e.kind == EventKind::Spawned && e.slot == 0)
        .map(|(t, _)| *t)
        .collect();
    let exits = log.count(|e| e.slot == 0 && e.kind == EventKind::Exit(ExitReason::Exited(1)));
    // 1 start + 4 restarts, then the fifth death within the window stops it.
    ensure!(spawns.len() == 5, "spawns {} ({:?})", spawns.len(), log.events());
    ensure!(exits == 5, "exits {exits}");
    ensure!(
        log.count(|e| e.kind == EventKind::CrashLoop && e.slot == 0) == 1,
        "no CrashLoop event"
    );
    // Backoff: immediate, then 40, 80, 160 ms (each at least, give or take a tick).
    let gaps: Vec<Duration> = spawns.windows(2).map(|w| w[1] - w[0]).collect();
    for (i, min) in [(1usize, 40u64), (2, 80), (3, 160)] {
        ensure!(
            gaps[i] >= Duration::from_millis(min),
            "gap {i} = {:?} < {min} ms ({gaps:?})",
            gaps[i]
        );
    }
    ensure!(gaps[3] > gaps[1], "backoff did not grow: {gaps:?}");
    // The master stayed up and the other worker kept running.
    ensure!(
        log.count(|e| e.slot == 1 && matches!(e.kind, EventKind::Exit(ExitReason::Shutdown))) == 1,
        "slot 1"
    );
    ensure!(!report.clean && report.failed_slots == vec![0], "{report:?}");
    Ok(())
}

fn rolling_reload_order_and_readiness() -> Check {
    let log = Log::default();
    let l = log.clone();
    let mut reloads_asked = 0;
    let report = Cluster::builder()
        .workers(3)
        .on_event(move |cluster, e| {
            l.push(e);
            if e.kind == EventKind::Online && online_count(&l) == 3 && reloads_asked == 0 {
                reloads_asked = 1;
                cluster.reload();
            }
            // A second reload asked while the first runs: queued.
            if e.kind == EventKind::ReloadStarted && reloads_asked == 1 {
                reloads_asked = 2;
                cluster.reload();
            }
            if matches!(e.kind, EventKind::ReloadFinished { .. })
                && l.count(|e| matches!(e.kind, EventKind::ReloadFinished { .. })) == 2
            {
                cluster.shutdown();
            }
        })
        .run(|w: Worker| {
            // Slow to become ready: the reload must wait for it.
            std::thread::sleep(Duration::from_millis(150));
            idle_worker(w)
        })
        .map_err(|e| e.to_string())?;
    let events = log.events();
    // Cut the log into the two reloads; they must not interleave.
    let starts: Vec<usize> = (0..events.len())
        .filter(|&i| events[i].kind == EventKind::ReloadStarted)
        .collect();
    let ends: Vec<usize> = (0..events.len())
        .filter(|&i| matches!(events[i].kind, EventKind::ReloadFinished { .. }))
        .collect();
    ensure!(
        starts.len() == 2 && ends.len() == 2,
        "reloads {starts:?} {ends:?}"
    );
    ensure!(
        starts[0] < ends[0] && ends[0] < starts[1] && starts[1] < ends[1],
        "interleaved: {events:?}"
    );
    for r in 0..2 {
        ensure!(
            events[ends[r]].kind == EventKind::ReloadFinished { ok: true },
            "reload {r} not ok"
        );
        let part = &events[starts[r]..ends[r]];
        // Per instance, in order: Spawned(new) → Online(new) → Exit(Reloaded, old);
        // the next instance's Spawned only after that.
        let mut expect_index = 0;
        let mut i = 0;
        while i < part.len() {
            let e = part[i];
            if e.kind != EventKind::Spawned {
                i += 1;
                continue;
            }
            ensure!(
                e.index == expect_index,
                "reload {r}: index {} spawned, expected {expect_index}",
                e.index
            );
            let rest = &part[i + 1..];
            let online = rest
                .iter()
                .position(|x| x.kind == EventKind::Online && x.slot == e.slot)
                .ok_or(format!("reload {r}: replacement of {expect_index} never online"))?;
            let exit = rest
                .iter()
                .position(|x| x.kind == EventKind::Exit(ExitReason::Reloaded) && x.index == expect_index)
                .ok_or(format!("reload {r}: old {expect_index} never exited"))?;
            ensure!(
                online < exit,
                "reload {r}: old {expect_index} drained before its replacement was ready"
            );
            let next_spawn = rest.iter().position(|x| x.kind == EventKind::Spawned);
            ensure!(
                !matches!(next_spawn, Some(n) if n < exit),
                "reload {r}: next replacement started before old {expect_index} exited"
            );
            ensure!(rest[exit].slot != e.slot, "replacement used the old slot");
            expect_index += 1;
            i += 1 + exit;
        }
        ensure!(expect_index == 3, "reload {r} replaced {expect_index} instances");
    }
    ensure!(report.clean, "{report:?}");
    Ok(())
}

fn worker_requests_reload() -> Check {
    let log = Log::default();
    let l = log.clone();
    let report = Cluster::builder()
        .workers(2)
        .on_event(move |cluster, e| {
            l.push(e);
            if e.kind == (EventKind::ReloadFinished { ok: true }) {
                cluster.shutdown();
            }
        })
        .run(|w: Worker| {
            w.ready();
            if w.index() == 1 && w.generation() == 1 {
                w.request_reload();
            }
            while !w.wait_stop(Duration::from_secs(1)) {}
            Ok::<(), String>(())
        })
        .map_err(|e| e.to_string())?;
    ensure!(
        log.count(|e| e.kind == EventKind::ReloadStarted) == 1,
        "{:?}",
        log.events()
    );
    ensure!(
        log.count(|e| e.kind == EventKind::Exit(ExitReason::Reloaded)) == 2,
        "{:?}",
        log.events()
    );
    ensure!(report.clean, "{report:?}");
    Ok(())
}

fn worker_requests_shutdown() -> Check {
    let log = Log::default();
    let l = log.clone();
    let report = Cluster::builder()
        .workers(3)
        .on_event(move |_, e| l.push(e))
        .run(|w: Worker| {
            w.ready();
            if w.index() == 0 {
                if !w.wait_all_ready(Duration::from_secs(10)) {
                    return Err("not all ready".to_string());
                }
                if w.peers().iter().filter(|p| p.state == WorkerState::Ready).count() != 3 {
                    return Err(format!("wait_all_ready returned early: {:?}", w.peers()));
                }
                w.request_shutdown();
            }
            while !w.wait_stop(Duration::from_secs(1)) {}
            Ok::<(), String>(())
        })
        .map_err(|e| e.to_string())?;
    ensure!(
        log.count(|e| e.kind == EventKind::ShutdownStarted) == 1,
        "{:?}",
        log.events()
    );
    ensure!(
        log.count(|e| e.kind == EventKind::Online) == 3,
        "{:?}",
        log.events()
    );
    ensure!(report.clean && report.restarts == 0, "{report:?}");
    Ok(())
}

fn lock_holder_past_the_limit_is_killed() -> Check {
    let log = Log::default();
    let l = log.clone();
    let report = Cluster::builder()
        .workers(2)
        .lock_hold_limit(Duration::from_millis(200), true)
        .on_event(move |_, e| l.push(e))
        .run(|w: Worker| {
            w.ready();
            if w.index() == 1 && w.generation() == 1 {
                // Takes the lock and never lets go.
                w.synchronize_key("stuck", |_| loop {
                    std::thread::sleep(Duration::from_millis(10));
                })
                .map_err(|e| e.to_string())?;
            }
            if w.index() == 0 {
                std::thread::sleep(Duration::from_millis(50));
                // Waits for the lock; gets it once the master killed the holder.
                let died = w
                    .try_synchronize("stuck", Duration::from_secs(10), |s| s.previous_owner_died())
                    .map_err(|e| e.to_string())?;
                if !died {
                    return Err("the next holder was not told the owner died".to_string());
                }
                let stats = w.stats();
                let stuck = stats
                    .locks
                    .iter()
                    .find(|l| l.name == "stuck")
                    .ok_or("no lock row")?;
                if stuck.owner_died != 1 || stuck.holder.is_some() {
                    return Err(format!("{stuck:?}"));
                }
                w.request_shutdown();
            }
            while !w.wait_stop(Duration::from_secs(1)) {}
            Ok::<(), String>(())
        })
        .map_err(|e| e.to_string())?;
    let events = log.events();
    ensure!(
        events
            .iter()
            .any(|e| matches!(e.kind, EventKind::LockHeldTooLong { .. }) && e.slot == 1),
        "{events:?}"
    );
    ensure!(
        log.count(|e| e.kind == EventKind::Exit(ExitReason::LockHeld) && e.slot == 1) == 1,
        "{events:?}"
    );
    ensure!(
        log.count(|e| e.kind == EventKind::Exit(ExitReason::Exited(1))) == 0,
        "{events:?}"
    );
    ensure!(report.clean, "{report:?}");
    Ok(())
}

/// Roles: code run by processes this binary starts in other ways.
fn roles(role: &str) -> Check {
    match role {
        // Spawn-mode worker written in Rust.
        "rust_worker" => {
            let w = Worker::from_env().map_err(|e| e.to_string())?;
            let env_slot: u32 = std::env::var("SHMCLUSTER_WORKER").unwrap().parse().unwrap();
            let env_gen: u32 = std::env::var("SHMCLUSTER_GENERATION").unwrap().parse().unwrap();
            ensure!(w.slot() == env_slot && w.generation() == env_gen, "identity");
            ensure!(w.instances() == 2, "instances {}", w.instances());
            // A second attach in the same process is refused.
            ensure!(Worker::from_env().is_err(), "second from_env succeeded");
            // The slots' eventfds came along (SHMCLUSTER_WAKE_FDS), one per
            // slot, so async messengers here wake and are woken by eventfd.
            let slots = w.segment().layout().workers() as usize;
            let fds = w.segment().wake_fds().ok_or("no wake eventfds from the master")?;
            ensure!(fds.len() == slots, "{} wake fds for {slots} slots", fds.len());
            for fd in fds {
                use std::os::fd::AsRawFd;
                let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                    .map_err(|e| e.to_string())?;
                ensure!(
                    link.to_string_lossy().contains("eventfd"),
                    "fd {} is {link:?}",
                    fd.as_raw_fd()
                );
            }
            w.ready();
            while !w.wait_stop(Duration::from_secs(1)) {}
            Ok(())
        }
        // A master that is the program systemd-socket-activate runs.
        "systemd_master" => {
            let report = Cluster::builder()
                .workers(2)
                // Unbindable on purpose: the socket systemd passed must be used instead.
                .listen("192.0.2.1:80")
                .run(http_worker)
                .map_err(|e| e.to_string())?;
            ensure!(report.clean, "{report:?}");
            Ok(())
        }
        // Shutdown exit codes: a cluster whose worker obeys, or ignores, the stop.
        "shutdown_obeys" | "shutdown_ignores" => {
            let ignore = role == "shutdown_ignores";
            let pidfile = tmp().join("master.pid");
            let report = Cluster::builder()
                .workers(2)
                .shutdown_grace(Duration::from_millis(500))
                .on_event(move |cluster, e| {
                    if e.kind == EventKind::Online
                        && cluster
                            .stats()
                            .slots
                            .iter()
                            .filter(|s| s.state == WorkerState::Ready)
                            .count()
                            == 2
                    {
                        let _ = std::fs::write(&pidfile, std::process::id().to_string());
                    }
                })
                .run(move |w: Worker| {
                    w.ready();
                    loop {
                        if w.should_stop() && !(ignore && w.index() == 1) {
                            return Ok::<(), String>(());
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                })
                .map_err(|e| e.to_string())?;
            std::process::exit(report.exit_code());
        }
        // Orphans: records every worker's pid, then idles.
        "orphan_master" => {
            let dir = tmp();
            Cluster::builder()
                .workers(3)
                .run(move |w: Worker| {
                    std::fs::write(dir.join(format!("worker-{}", std::process::id())), "")
                        .map_err(|e| e.to_string())?;
                    idle_worker(w)
                })
                .map_err(|e| e.to_string())?;
            Ok(())
        }
        other => Err(format!("unknown role {other}")),
    }
}

fn graceful_shutdown_exit_codes(tmp: &Path) -> Check {
    use std::os::unix::process::CommandExt;
    // (role, Ctrl-C to the whole process group instead of SIGTERM to the master, exit code)
    for (role, ctrl_c, expect) in [
        ("shutdown_obeys", false, 0),
        ("shutdown_ignores", false, 1),
        ("shutdown_obeys", true, 0),
    ] {
        let _ = std::fs::remove_file(tmp.join("master.pid"));
        let mut master = Command::new(this_exe())
            .env("SHMC_ROLE", role)
            .env("SHMC_TMP", tmp)
            .process_group(0)
            .spawn()
            .map_err(|e| e.to_string())?;
        let start = Instant::now();
        let pid = loop {
            if let Ok(p) = std::fs::read_to_string(tmp.join("master.pid")) {
                break p.trim().parse::<u32>().map_err(|e| e.to_string())?;
            }
            ensure!(
                start.elapsed() < Duration::from_secs(10),
                "{role}: workers never ready"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        if ctrl_c {
            // As a terminal does: SIGINT to the master and every worker at once.
            // SAFETY: kill(2) with a negative pid (a process group), no pointers.
            unsafe { libc::kill(-(pid as i32), libc::SIGINT) };
        } else {
            signal(pid, libc::SIGTERM);
        }
        let status = wait_child(&mut master, Duration::from_secs(10))?;
        ensure!(
            status.code() == Some(expect),
            "{role} (ctrl-c: {ctrl_c}): master exited {status}, expected {expect}"
        );
    }
    Ok(())
}

fn hung_worker_is_replaced() -> Check {
    let log = Log::default();
    let l = log.clone();
    let report = Cluster::builder()
        .workers(1)
        .hang_timeout(Duration::from_millis(300))
        .on_event(move |cluster, e| {
            l.push(e);
            if e.kind == EventKind::Online && e.generation == 2 {
                cluster.shutdown();
            }
        })
        .run(|w: Worker| {
            w.ready();
            // The first generation hangs: no heartbeat, though it still
            // answers a stop (so the shutdown stays clean).
            while !w.should_stop() {
                if w.generation() != 1 {
                    w.heartbeat();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok::<(), String>(())
        })
        .map_err(|e| e.to_string())?;
    ensure!(
        log.count(|e| e.kind == EventKind::Exit(ExitReason::Hung) && e.generation == 1) == 1,
        "{:?}",
        log.events()
    );
    ensure!(report.restarts == 1 && report.clean, "{report:?}");
    Ok(())
}

fn stats_peers_and_events_in_workers() -> Check {
    let report = Cluster::builder()
        .workers(2)
        .on_event(|cluster, e| {
            // Worker 1 exits 0 once it has checked everything.
            if e.kind == EventKind::Exit(ExitReason::Exited(0)) {
                cluster.shutdown();
            }
            if e.kind == EventKind::Exit(ExitReason::Exited(1)) {
                std::process::exit(4);
            }
        })
        .run(|mut w: Worker| {
            let mut events = w.events();
            w.ready();
            if w.slot() == 0 {
                // Wait until worker 1 is ready, then send it 10 messages.
                let start = Instant::now();
                while w.peers()[1].state != WorkerState::Ready {
                    if start.elapsed() > Duration::from_secs(10) {
                        return Err("peer 1 never ready".to_string());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                for i in 0..10u8 {
                    w.endpoint().send(1, [i; 100]).map_err(|e| e.to_string())?;
                }
                return idle_worker(w);
            }
            if w.slot() == 1 && w.generation() == 1 {
                for i in 0..10u8 {
                    let m = w
                        .endpoint()
                        .recv_timeout(Duration::from_secs(10))
                        .map_err(|e| e.to_string())?;
                    if m.payload != [i; 100] || m.sender != 0 {
                        return Err(format!("message {i}: {:?}", &m.payload[..4]));
                    }
                }
                let stats = w.stats();
                let (s0, s1) = (&stats.slots[0], &stats.slots[1]);
                if s0.sent_messages < 10 || s0.sent_bytes < 1000 || s1.received_messages < 10 {
                    return Err(format!("stats: {s0:?} {s1:?}"));
                }
                if stats.slots.len() != 3 || stats.instances != 2 || stats.master_pid == 0 {
                    return Err(format!("stats: {stats:?}"));
                }
                let peers = w.peers();
                if peers[0].state != WorkerState::Ready
                    || peers[0].index != Some(0)
                    || peers[2].state != WorkerState::Free
                {
                    return Err(format!("peers: {peers:?}"));
                }
                // Events: this worker sees its own Online event (its cursor
                // was made before `ready()`; worker 0's may predate it).
                let start = Instant::now();
                let own = loop {
                    if start.elapsed() > Duration::from_secs(10) {
                        return Err("no Online event for this worker".to_string());
                    }
                    if let Some(e) = events.next_timeout(Duration::from_millis(100)) {
                        if e.kind == EventKind::Online && e.slot == 1 {
                            break e;
                        }
                    }
                };
                if own.pid != std::process::id() || own.generation != 1 || own.index != 1 {
                    return Err(format!("own Online event: {own:?}"));
                }
                return Ok(()); // exit 0: the master shuts down
            }
            idle_worker(w)
        })
        .map_err(|e| e.to_string())?;
    ensure!(report.clean, "{report:?}");
    Ok(())
}

fn runtime_listener_request() -> Check {
    let report = Cluster::builder()
        .workers(1)
        .on_event(|cluster, e| match e.kind {
            EventKind::Exit(ExitReason::Exited(0)) => cluster.shutdown(),
            EventKind::Exit(ExitReason::Exited(_)) => std::process::exit(4),
            _ => {}
        })
        .run(|mut w: Worker| {
            if w.generation() != 1 {
                return idle_worker(w);
            }
            let l = w
                .listen("127.0.0.1:0", ListenMode::Shared)
                .map_err(|e| e.to_string())?;
            let listener = l.into_tcp();
            let addr = listener.local_addr().map_err(|e| e.to_string())?;
            let mut client = TcpStream::connect(addr).map_err(|e| e.to_string())?;
            let (mut server, _) = listener.accept().map_err(|e| e.to_string())?;
            client.write_all(b"ping").map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            server.read_exact(&mut buf).map_err(|e| e.to_string())?;
            if &buf != b"ping" {
                return Err("bad bytes".into());
            }
            // An address the master cannot bind: a clear error, no fd.
            match w.listen("192.0.2.1:80", ListenMode::Shared) {
                Err(ListenError::Request { .. }) | Err(ListenError::Bind { .. }) => {}
                other => return Err(format!("unbindable runtime listener: {other:?}")),
            }
            Ok(())
        })
        .map_err(|e| e.to_string())?;
    ensure!(report.clean, "{report:?}");
    Ok(())
}

fn reuseport_spreads_connections() -> Check {
    let served: Rc<RefCell<BTreeMap<String, usize>>> = Rc::default();
    let s = served.clone();
    let mut done = false;
    let report = Cluster::builder()
        .workers(3)
        .listen_mode("127.0.0.1:0", ListenMode::ReusePort)
        .on_event(move |cluster, e| {
            let ready = cluster
                .stats()
                .slots
                .iter()
                .filter(|x| x.state == WorkerState::Ready)
                .count();
            // Several Online events may find all three ready: connect once.
            if e.kind == EventKind::Online && ready == 3 && !done {
                done = true;
                let addr = cluster.local_addrs()[0].to_string();
                for _ in 0..300 {
                    match http_get(&addr) {
                        Ok(body) => *s.borrow_mut().entry(body).or_default() += 1,
                        Err(e) => {
                            eprintln!("{e}");
                            std::process::exit(5);
                        }
                    }
                }
                cluster.shutdown();
            }
        })
        .run(http_worker)
        .map_err(|e| e.to_string())?;
    let served = served.borrow();
    println!("    SO_REUSEPORT distribution over 300 connections: {served:?}");
    ensure!(served.len() == 3, "not every worker served: {served:?}");
    ensure!(served.values().sum::<usize>() == 300, "{served:?}");
    ensure!(report.clean, "{report:?}");
    Ok(())
}

/// With `SO_REUSEPORT`, an instance given up after a crash loop leaves no
/// socket listening for no one: every later connection is answered, by
/// the instance that lives (without the master stopping the given-up
/// instance's socket, about half of them would wait unanswered).
fn reuseport_given_up_instance_passes_its_share_on() -> Check {
    let served: Rc<RefCell<BTreeMap<String, usize>>> = Rc::default();
    let failed: Rc<RefCell<Vec<String>>> = Rc::default();
    let (s, f) = (served.clone(), failed.clone());
    let mut done = false;
    let report = Cluster::builder()
        .workers(2)
        .listen_mode("127.0.0.1:0", ListenMode::ReusePort)
        .restart_backoff(Duration::from_millis(5), Duration::from_millis(20))
        .crash_loop_limit(1, Duration::from_secs(20))
        .on_event(move |cluster, _| {
            let stats = cluster.stats();
            let ready = stats
                .slots
                .iter()
                .filter(|x| x.state == WorkerState::Ready)
                .count();
            let given_up = stats
                .slots
                .iter()
                .filter(|x| x.state == WorkerState::Failed)
                .count();
            if ready == 1 && given_up == 1 && !done {
                done = true;
                let addr = cluster.local_addrs()[0].to_string();
                for _ in 0..40 {
                    match http_get(&addr) {
                        Ok(body) => *s.borrow_mut().entry(body).or_default() += 1,
                        Err(e) => {
                            // One that waits unanswered: enough.
                            f.borrow_mut().push(e);
                            break;
                        }
                    }
                }
                cluster.shutdown();
            }
        })
        .run(|w: Worker| {
            if w.index() == 1 {
                return Err(format!("instance {} cannot start", w.index()));
            }
            http_worker(w)
        })
        .map_err(|e| e.to_string())?;
    let (served, failed) = (served.borrow(), failed.borrow());
    ensure!(
        failed.is_empty(),
        "a connection failed after {} answered: {}",
        served.values().sum::<usize>(),
        failed[0]
    );
    ensure!(
        served.len() == 1 && served.values().sum::<usize>() == 40,
        "{served:?}"
    );
    ensure!(report.failed_slots.len() == 1, "{report:?}");
    Ok(())
}

fn spawn_mode_rust_worker_from_env() -> Check {
    std::env::set_var("SHMC_ROLE", "rust_worker");
    let log = Log::default();
    let l = log.clone();
    let mut killed = false;
    let report = Cluster::builder()
        .workers(2)
        .on_event(move |cluster, e| {
            l.push(e);
            if e.kind == EventKind::Online && online_count(&l) == 2 && !killed {
                killed = true;
                sigkill(e.pid);
            }
            if e.kind == EventKind::Online && e.generation == 2 {
                cluster.shutdown();
            }
        })
        .command([this_exe()])
        .map_err(|e| e.to_string())?;
    ensure!(
        report.clean && report.restarts == 1,
        "{report:?} {:?}",
        log.events()
    );
    Ok(())
}

const PY_WORKER: &str = r#"
import json, os, socket, sys, time
s = socket.socket(fileno=3)
conn, _ = s.accept()
info = {k: os.environ.get(k) for k in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
        "SHMCLUSTER_FD", "SHMCLUSTER_WORKER", "SHMCLUSTER_WORKERS", "SHMCLUSTER_GENERATION"]}
info["pid"] = str(os.getpid())
info["fd_segment_is_memfd"] = os.readlink("/proc/self/fd/" + info["SHMCLUSTER_FD"]).startswith("/memfd:")
conn.sendall(json.dumps(info).encode())
conn.close()
time.sleep(60)
"#;

fn spawn_mode_python_listen_fds() -> Check {
    if Command::new("python3")
        .arg("-c")
        .arg("1")
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        return Err("python3 is needed (README set-up)".into());
    }
    let reply: Rc<RefCell<String>> = Rc::default();
    let r = reply.clone();
    let report = Cluster::builder()
        .workers(1)
        .listen("127.0.0.1:0")
        .on_event(move |cluster, e| {
            if e.kind == EventKind::Spawned && r.borrow().is_empty() {
                let addr = cluster.local_addrs()[0].to_string();
                let mut s = TcpStream::connect(addr).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).expect("read");
                *r.borrow_mut() = format!("{out}|{}", e.pid);
                cluster.shutdown();
            }
        })
        .command(["python3", "-c", PY_WORKER])
        .map_err(|e| e.to_string())?;
    let reply = reply.borrow();
    let (json, pid) = reply.rsplit_once('|').ok_or("no reply")?;
    for (k, v) in [
        ("LISTEN_FDS", "\"1\""),
        ("LISTEN_FDNAMES", "\"listen0\""),
        ("SHMCLUSTER_WORKER", "\"0\""),
        ("SHMCLUSTER_WORKERS", "\"1\""),
        ("SHMCLUSTER_GENERATION", "\"1\""),
        ("fd_segment_is_memfd", "true"),
    ] {
        ensure!(json.contains(&format!("\"{k}\": {v}")), "{k} != {v} in {json}");
    }
    ensure!(
        json.contains(&format!("\"LISTEN_PID\": \"{pid}\"")),
        "LISTEN_PID is not the worker's pid: {json}"
    );
    // Python died of our SIGTERM at shutdown: a clean end for a spawned worker.
    ensure!(report.clean, "{report:?}");
    Ok(())
}

fn spawn_mode_python_reload_ready_on_start() -> Check {
    let log = Log::default();
    let l = log.clone();
    let mut asked = false;
    let report = Cluster::builder()
        .workers(2)
        .ready_on_start(true)
        .drain_timeout(Duration::from_secs(5))
        .on_event(move |cluster, e| {
            l.push(e);
            if e.kind == EventKind::Online && online_count(&l) == 2 && !asked {
                asked = true;
                cluster.reload();
            }
            if matches!(e.kind, EventKind::ReloadFinished { .. }) {
                cluster.shutdown();
            }
        })
        .command(["python3", "-c", "import time\nwhile True: time.sleep(1)"])
        .map_err(|e| e.to_string())?;
    let events = log.events();
    ensure!(
        log.count(|e| e.kind == (EventKind::ReloadFinished { ok: true })) == 1,
        "{events:?}"
    );
    ensure!(
        log.count(|e| e.kind == EventKind::Exit(ExitReason::Reloaded)) == 2,
        "{events:?}"
    );
    ensure!(report.clean && report.killed == 0, "{report:?}");
    Ok(())
}

fn no_orphans_after_master_sigkill(tmp: &Path) -> Check {
    let mut master = Command::new(this_exe())
        .env("SHMC_ROLE", "orphan_master")
        .env("SHMC_TMP", tmp)
        .spawn()
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let pids = loop {
        let pids: Vec<u32> = std::fs::read_dir(tmp)
            .map_err(|e| e.to_string())?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_string_lossy()
                    .strip_prefix("worker-")
                    .map(|p| p.parse().unwrap())
            })
            .collect();
        if pids.len() == 3 {
            break pids;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "workers did not start: {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    ensure!(pids.iter().all(|&p| alive(p)), "workers not running");
    master.kill().map_err(|e| e.to_string())?; // SIGKILL
    master.wait().map_err(|e| e.to_string())?;
    let killed = Instant::now();
    while pids.iter().any(|&p| alive(p)) {
        if killed.elapsed() > Duration::from_secs(1) {
            let orphans: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
            // Leave nothing behind, even when failing.
            orphans.iter().for_each(|&p| sigkill(p));
            return Err(format!("workers outlived the master by 1 s: {orphans:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    println!(
        "    all 3 workers gone {:?} after the master's SIGKILL",
        killed.elapsed()
    );
    Ok(())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn systemd_socket_activation(_tmp: &Path) -> Check {
    let tool = ["/usr/bin/systemd-socket-activate", "/bin/systemd-socket-activate"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or("systemd-socket-activate is not installed (README set-up: apt-get install systemd)")?;
    let port = free_port();
    let mut activator = Command::new(tool)
        .arg("-l")
        .arg(format!("127.0.0.1:{port}"))
        .arg("-E")
        .arg("SHMC_ROLE=systemd_master")
        .arg(this_exe())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| e.to_string())?;
    // The tool starts the master on the first connection; it is then the master.
    let start = Instant::now();
    let body = loop {
        match http_get(&format!("127.0.0.1:{port}")) {
            Ok(b) => break b,
            Err(e) => {
                if start.elapsed() > Duration::from_secs(10) {
                    let _ = activator.kill();
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    ensure!(body.starts_with("worker "), "{body}");
    let mut slots = std::collections::BTreeSet::new();
    slots.insert(body);
    for _ in 0..50 {
        slots.insert(http_get(&format!("127.0.0.1:{port}"))?);
    }
    signal(activator.id(), libc::SIGTERM);
    let status = wait_child(&mut activator, Duration::from_secs(10))?;
    ensure!(
        status.success(),
        "master under systemd-socket-activate exited {status}"
    );
    println!("    served by {slots:?} through the socket systemd-socket-activate passed");
    Ok(())
}

fn reload_under_http_load_drops_nothing(_tmp: &Path) -> Check {
    let server = built_example("http_cluster")?;
    let mut master = Command::new(&server)
        .args(["--workers", "2", "--listen", "127.0.0.1:0", "--quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(master.stdout.take().unwrap())
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    // "listening on 127.0.0.1:PORT (master pid N)"
    let addr = line
        .split_whitespace()
        .nth(2)
        .ok_or(format!("bad banner {line:?}"))?
        .to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (stop, served, failed, addr) = (stop.clone(), served.clone(), failed.clone(), addr.clone());
            std::thread::spawn(move || keep_alive_client(&addr, &stop, &served, &failed))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    for _ in 0..2 {
        signal(master.id(), libc::SIGHUP);
        std::thread::sleep(Duration::from_millis(1500));
    }
    stop.store(true, Ordering::Release);
    let errors: Vec<String> = clients
        .into_iter()
        .filter_map(|c| c.join().unwrap().err())
        .collect();
    signal(master.id(), libc::SIGTERM);
    let status = wait_child(&mut master, Duration::from_secs(15))?;
    let (served, failed) = (served.load(Ordering::Acquire), failed.load(Ordering::Acquire));
    println!("    two rolling reloads under load: {served} requests served, {failed} failed");
    ensure!(failed == 0, "{failed} requests failed: {errors:?}");
    ensure!(served > 1000, "only {served} requests served");
    ensure!(status.success(), "server exited {status}");
    Ok(())
}

/// Sends GETs over keep-alive connections as fast as answers come,
/// reconnecting when the server closes a connection after a response.
/// Anything else (refused, reset, short answer) is a failed request.
fn keep_alive_client(
    addr: &str,
    stop: &AtomicBool,
    served: &AtomicU64,
    failed: &AtomicU64,
) -> Result<(), String> {
    let mut first_error = None;
    while !stop.load(Ordering::Acquire) {
        let stream = match TcpStream::connect(addr) {
            Ok(s) => s,
            Err(e) => {
                failed.fetch_add(1, Ordering::AcqRel);
                first_error.get_or_insert(format!("connect: {e}"));
                continue;
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(stream);
        loop {
            if stop.load(Ordering::Acquire) {
                break;
            }
            if let Err(e) = writer.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") {
                failed.fetch_add(1, Ordering::AcqRel);
                first_error.get_or_insert(format!("write: {e}"));
                break;
            }
            match read_response(&mut reader) {
                Ok(close) => {
                    served.fetch_add(1, Ordering::AcqRel);
                    if close {
                        break;
                    }
                }
                Err(e) => {
                    failed.fetch_add(1, Ordering::AcqRel);
                    first_error.get_or_insert(e);
                    break;
                }
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Reads one response; returns whether the server will close.
fn read_response(r: &mut BufReader<TcpStream>) -> Result<bool, String> {
    let mut line = String::new();
    let mut len = None;
    let mut close = false;
    let mut status = true;
    loop {
        line.clear();
        let n = r.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed before a response".into());
        }
        let l = line.trim_end();
        if status {
            if !l.starts_with("HTTP/1.1 200") {
                return Err(format!("status {l:?}"));
            }
            status = false;
            continue;
        }
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.strip_prefix("Content-Length: ") {
            len = v.parse::<usize>().ok();
        }
        if l.eq_ignore_ascii_case("connection: close") {
            close = true;
        }
    }
    let mut body = vec![0u8; len.ok_or("no Content-Length")?];
    r.read_exact(&mut body).map_err(|e| format!("body: {e}"))?;
    Ok(close)
}

/// The term in a line `... slot N (term T)`.
fn term_in(line: &str) -> Option<(u32, u64)> {
    let (_, rest) = line.rsplit_once("slot ")?;
    let (slot, rest) = rest.split_once(" (term ")?;
    let term = rest.strip_suffix(')')?;
    Some((slot.parse().ok()?, term.parse().ok()?))
}

/// Reads `pipe` to its end on a thread of its own (so that a child never
/// blocks on a full pipe); joins to what it read.
fn read_to_end_in_thread(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// `examples/leader` as a user runs it, twelve times: every run must kill
/// the current leader (whichever slot won the election) from another
/// worker and show the failover to a larger term. The example used to let
/// worker 0 drive, and skip the kill when worker 0 itself led: 9 of 10,
/// then 20 of 30 debug runs here showed no failover; at even a third of
/// runs, twelve runs all pass by chance about once in a hundred.
fn leader_example_fails_over_every_run(_tmp: &Path) -> Check {
    let example = built_example("leader")?;
    for run in 1..=12 {
        let mut child = Command::new(&example)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let out = read_to_end_in_thread(child.stdout.take().ok_or("no stdout")?);
        let err = read_to_end_in_thread(child.stderr.take().ok_or("no stderr")?);
        let status = wait_child(&mut child, Duration::from_secs(20))?;
        let out = out.join().map_err(|_| "stdout reader panicked")?;
        let err = err.join().map_err(|_| "stderr reader panicked")?;
        let all = format!("{out}{err}");
        ensure!(status.success(), "run {run}: exited {status}: {all}");
        let line = |needle: &str| out.lines().find(|l| l.contains(needle));
        let first = line("] leader is slot").and_then(term_in);
        let killed = line("SIGKILL to the leader");
        let next = line("] new leader: slot").and_then(term_in);
        let (Some((old_slot, old_term)), Some(killer), Some((new_slot, new_term))) = (first, killed, next)
        else {
            return Err(format!("run {run}: no failover shown: {all}"));
        };
        ensure!(
            !killer.starts_with(&format!("[slot {old_slot}]")),
            "run {run}: the leader killed itself: {all}"
        );
        ensure!(
            new_term > old_term && new_slot != old_slot,
            "run {run}: slot {old_slot} term {old_term} -> slot {new_slot} term {new_term}: {all}"
        );
        ensure!(
            err.contains(&format!("[master] slot {old_slot} ")) && err.contains("killed by signal 9"),
            "run {run}: the master did not see the leader die: {all}"
        );
        println!("    run {run}: slot {old_slot} (term {old_term}) killed; slot {new_slot} leads (term {new_term})");
    }
    Ok(())
}
