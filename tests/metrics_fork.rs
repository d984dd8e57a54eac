//! `Cluster::builder().metrics(addr)` in fork mode: worker 0 of a real
//! two-worker cluster scrapes its own master (the master cannot scrape
//! itself: it serves from its loop), checks the figures (two workers
//! ready, its two global-lock sections), and checks that it holds no
//! descriptor of the master's metrics listener (a forked worker must close
//! it, or the port would outlive the master in its workers). Then it asks
//! for a shutdown, which must be clean.
//!
//! `harness = false`: the master must fork from a single-threaded process.
//! The parent re-executes this binary as the scenario process under a
//! watchdog (60 s; killed past it, its workers with it).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use shmcluster::{Cluster, EventKind, ExitReason, Outcome, Worker};

const CHILD: &str = "SHMC_METRICS_FORK_SCENARIO";

fn main() {
    if std::env::var_os(CHILD).is_some() {
        std::process::exit(match scenario() {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("metrics_fork: {e}");
                1
            }
        });
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(CHILD, "1")
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("metrics_fork: the scenario did not end within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "metrics_fork: the scenario failed: {status}");
    println!("metrics_fork: 1 passed, 0 failed");
}

/// A free loopback port, taken and given back (the master binds it again
/// at once; a clash would fail the scenario, not hang it).
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn scenario() -> Result<(), String> {
    let addr = free_addr();
    let failed = std::rc::Rc::new(std::cell::Cell::new(None));
    let seen = failed.clone();
    let report = Cluster::builder()
        .workers(2)
        .metrics(addr.to_string())
        .ready_timeout(Duration::from_secs(30))
        .on_event(move |cluster, event| {
            if let EventKind::Exit(ExitReason::Exited(code)) = event.kind {
                if code != 0 && seen.get().is_none() {
                    seen.set(Some(code));
                    cluster.shutdown();
                }
            }
        })
        .run(move |worker| {
            worker.ready();
            if worker.index() == 0 {
                let checked = check_from_worker(&worker, addr);
                worker.request_shutdown();
                checked?;
            }
            while !worker.wait_stop(Duration::from_millis(100)) {}
            Ok::<(), String>(())
        })
        .map_err(|e| e.to_string())?;
    if let Some(code) = failed.get() {
        return Err(format!("worker 0 failed (exit code {code}; its error is above)"));
    }
    if report.outcome != Outcome::Clean {
        return Err(format!("the shutdown was not clean: {report}"));
    }
    Ok(())
}

/// Worker 0's checks.
fn check_from_worker(worker: &Worker, addr: SocketAddr) -> Result<(), String> {
    if !worker.wait_all_ready(Duration::from_secs(30)) {
        return Err("the workers were not all ready within 30 s".into());
    }
    for _ in 0..2 {
        worker.synchronize(|_| ()).map_err(|e| e.to_string())?;
    }
    let want = [
        "shmcluster_workers{state=\"ready\"} 2.0",
        "shmcluster_lock_acquisitions_total{lock=\"(global)\"} 2",
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let body = scrape(addr)?;
        if want.iter().all(|w| body.lines().any(|l| l == *w)) {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!("not within 20 s: {want:?} in\n{body}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let inode = listening_inode(addr.port())?;
    let mine = std::fs::read_dir("/proc/self/fd").map_err(|e| e.to_string())?;
    for fd in mine.flatten() {
        if std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy() == format!("socket:[{inode}]")) {
            return Err(format!(
                "worker 0 holds the master's metrics listener as fd {:?}",
                fd.file_name()
            ));
        }
    }
    Ok(())
}

/// `GET /metrics` over a plain connection: the body of a 200.
fn scrape(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200 ") => Ok(body.to_string()),
        _ => Err(format!("not a 200: {text}")),
    }
}

/// The inode of the socket listening on 127.0.0.1:`port` (/proc/net/tcp).
fn listening_inode(port: u16) -> Result<String, String> {
    let table = std::fs::read_to_string("/proc/net/tcp").map_err(|e| e.to_string())?;
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        // Fields: sl local rem st ... inode (the 10th).
        .find(|f| f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"0A"))
        .and_then(|f| f.get(9).map(|s| s.to_string()))
        .ok_or_else(|| format!("no listener on {local} in /proc/net/tcp"))
}
