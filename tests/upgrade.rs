//! Binary upgrade (`SIGUSR2`, `shmcluster upgrade`) under load, with real
//! clients: `wrk` (keep-alive, 2 threads, 16 connections) must see no
//! socket error and no non-2xx answer while the master executes the
//! program now on disk and hands its sockets to the new master, and
//! `curl` must then be answered by the new build.
//!
//! - **fork mode**: a copy of `examples/http_cluster` run from a scratch
//!   directory; a new build (a copy with bytes appended: another file,
//!   another inode, which each answer names as `build <inode of
//!   /proc/self/exe>`) renamed over it, then `SIGUSR2`. The old master
//!   exits 0, the new one (another pid) answers with the new build.
//! - **a switched `current` symlink** (Capistrano-style deploys): fork
//!   mode started as `./current/server` with `current -> rel1`; `current`
//!   switched to `rel2`, then `SIGUSR2`: the new master runs rel2's
//!   build (the program path as invoked, symlinks kept, not
//!   `/proc/self/exe`'s).
//! - **fewer `ReusePort` instances** (3 -> 1, the new build a script that
//!   starts the program with `--workers 1`): under `wrk`, no socket
//!   error through the upgrade and the old master's drain: the two
//!   surplus sockets leave the port's group when the new master is
//!   ready, so no connection waits on a socket nobody accepts on.
//! - **spawn mode**: `shmcluster run` (a copy, replaced on disk the same
//!   way) with a Python worker (`WORKER`, stdlib only, ready by sd_notify
//!   `READY=1`) rewritten on disk to answer `version v2`; `shmcluster
//!   upgrade --wait` exits 0; then `stat` reaches the new master through
//!   the old control socket, by `--pid <new>` (the file renamed to the new
//!   master's default path) and by discovery; `stop --wait` ends it 0 and
//!   the socket file is gone. A `wait` client of the old master is told
//!   `upgraded_to=<new>` and the old master's last line says `upgraded:
//!   new master pid N took over`.
//! - **systemd**: a new master stopped before it is ready sends no
//!   datagram at all (checked by sender pid); a successful one is
//!   announced by `MAINPID=` and no `STOPPING=1`.
//! - **the overlap**: while the new master starts, `stat` and every
//!   metrics scrape are answered by the old master; a `stop --wait` to it
//!   abandons the upgrade (the new master killed, `upgrade --wait` exits
//!   1: stopped) and it exits 0.
//! - **the confirm window**: once the new master answers control clients
//!   (it said `ready`) and while the old master still confirms it (500
//!   ms), a `SIGTERM` to the new master, or a `stop --wait` it answers
//!   (the old master held by `SIGSTOP` so that the new one gets the
//!   connection), stops both: the old master exits 0 saying why, and
//!   nothing of either generation is left. So does a `SIGTERM` to both
//!   (a service manager's stop) that the old master handles after the
//!   new one said `stopping`: it does not take it for its own abandon.
//! - **a failing new build**: a "binary" that exits at once, one that
//!   says `ready` on the pipe and exits, then workers that never become
//!   ready (the old master's `--ready-timeout 3`): each `upgrade --wait`
//!   exits 1 with the reason, the old master keeps serving under `wrk` (0
//!   errors), and no process of the failed generation is left (the
//!   process group holds the old master and its workers only).
//!
//! Each scenario runs in this binary re-executed (`harness = false`,
//! tests/common/http.rs) under a watchdog that kills the cluster's process
//! group — the new master and its workers stay in the old master's group.
//! The scenario process is a child subreaper (`PR_SET_CHILD_SUBREAPER`):
//! the new master, orphaned when the old one exits, becomes its child and
//! is reaped by it, as are the workers of a killed new master.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[macro_use]
mod common;
#[path = "common/http.rs"]
mod http;
use common::{built_example, wait_child, Check};
use http::{alive, join, read_all, wrk_get_pids, Cluster, Scenario, Wrk, WrkChild, MASTER};

/// The `shmcluster` command.
const BIN: &str = env!("CARGO_BIN_EXE_shmcluster");

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "fork_mode_sigusr2_under_wrk",
        timeout: Duration::from_secs(90),
        run: fork_mode_sigusr2_under_wrk,
    },
    Scenario {
        name: "fork_mode_reuseport_sigusr2_under_wrk",
        timeout: Duration::from_secs(90),
        run: fork_mode_reuseport_sigusr2_under_wrk,
    },
    Scenario {
        name: "fork_mode_follows_a_switched_current_symlink",
        timeout: Duration::from_secs(60),
        run: fork_mode_follows_a_switched_current_symlink,
    },
    Scenario {
        name: "fewer_reuseport_instances_drop_nothing_under_wrk",
        timeout: Duration::from_secs(90),
        run: fewer_reuseport_instances_drop_nothing_under_wrk,
    },
    Scenario {
        name: "spawn_mode_upgrade_wait_under_wrk",
        timeout: Duration::from_secs(90),
        run: spawn_mode_upgrade_wait_under_wrk,
    },
    Scenario {
        name: "systemd_hears_the_new_main_pid_and_no_stopping",
        timeout: Duration::from_secs(90),
        run: systemd_hears_the_new_main_pid_and_no_stopping,
    },
    Scenario {
        name: "stop_during_an_upgrade_abandons_it",
        timeout: Duration::from_secs(90),
        run: stop_during_an_upgrade_abandons_it,
    },
    Scenario {
        name: "an_abandoned_new_master_that_does_not_stop_is_killed_once",
        timeout: Duration::from_secs(90),
        run: an_abandoned_new_master_that_does_not_stop_is_killed_once,
    },
    Scenario {
        name: "sigterm_to_the_new_master_in_charge_stops_both",
        timeout: Duration::from_secs(90),
        run: sigterm_to_the_new_master_in_charge_stops_both,
    },
    Scenario {
        name: "stop_answered_by_the_new_master_in_charge_stops_both",
        timeout: Duration::from_secs(90),
        run: stop_answered_by_the_new_master_in_charge_stops_both,
    },
    Scenario {
        name: "sigterm_to_both_masters_in_the_window_stops_both",
        timeout: Duration::from_secs(90),
        run: sigterm_to_both_masters_in_the_window_stops_both,
    },
    Scenario {
        name: "failing_new_builds_leave_the_old_master_serving",
        timeout: Duration::from_secs(90),
        run: failing_new_builds_leave_the_old_master_serving,
    },
];

fn main() {
    http::run_main("upgrade", "upgrade", SCENARIOS, || Ok(()));
}

/// The spawned worker: HTTP/1.1 keep-alive on fd 3 (`LISTEN_FDS`), one
/// thread per connection, ready by sd_notify `READY=1` (unless
/// `NEVER_READY`); on `SIGTERM` it stops accepting and answers each
/// connection's next request with `Connection: close` (an idle one is
/// closed after 100 ms), as the Rust example does.
const WORKER: &str = r#"
import os, signal, socket, sys, threading

VERSION = "@VERSION@"
NEVER_READY = @NEVER_READY@

stopping = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stopping.set())


def notify(message):
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(message.encode())


def serve(conn):
    conn.settimeout(0.1)
    buf = b""
    try:
        while True:
            while b"\r\n\r\n" not in buf:
                try:
                    data = conn.recv(65536)
                except socket.timeout:
                    if not buf and stopping.is_set():
                        return
                    continue
                if not data:
                    return
                buf += data
            head, buf = buf.split(b"\r\n\r\n", 1)
            close = stopping.is_set() or b"connection: close" in head.lower()
            body = ("version %s pid %d\n" % (VERSION, os.getpid())).encode()
            extra = b"Connection: close\r\n" if close else b""
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body))
            if close:
                return
    except OSError:
        return
    finally:
        conn.close()


if NEVER_READY:
    while not stopping.is_set():
        stopping.wait(0.1)
    sys.exit(0)
listener = socket.socket(fileno=3)
listener.settimeout(0.1)
notify("READY=1")
threads = []
while not stopping.is_set():
    try:
        conn, _ = listener.accept()
    except (socket.timeout, InterruptedError):
        continue
    t = threading.Thread(target=serve, args=(conn,))
    t.start()
    threads.append(t)
for t in threads:
    t.join()
"#;

// ------------------------------------------------------------ helpers

/// Makes this scenario process a child subreaper (`prctl(2)`): orphans of
/// its cluster (the new master, once the old exits) become its children.
fn become_subreaper() -> Check {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer and no pointers.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    ensure!(
        rc == 0,
        "PR_SET_CHILD_SUBREAPER: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Waits up to `limit` for the child `pid` (not a `std::process::Child`:
/// an adopted orphan) to exit; its exit code, or why not.
fn wait_pid(pid: u32, limit: Duration) -> Result<i32, String> {
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waitpid(2) writes the status through a valid pointer.
        let rc = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
        if rc == pid as i32 {
            return if libc::WIFEXITED(status) {
                Ok(libc::WEXITSTATUS(status))
            } else {
                Err(format!("pid {pid} ended by signal {}", libc::WTERMSIG(status)))
            };
        }
        ensure!(rc == 0, "waitpid({pid}): {}", std::io::Error::last_os_error());
        ensure!(start.elapsed() < limit, "pid {pid} still runs after {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reaps every exited child (orphans adopted as subreaper).
fn reap_orphans() {
    for _ in 0..10_000 {
        let mut status = 0;
        // SAFETY: as in `wait_pid`.
        if unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } <= 0 {
            return;
        }
    }
}

/// The live (not zombie) processes of process group `pgid`.
fn group_members(pgid: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) S ppid pgrp ...": fields after the last ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[2] == pgid.to_string() && !matches!(fields[0], "Z" | "X") {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    pids
}

/// Puts a new build at `path`: a copy of `build` with `tag` appended
/// (another file with other bytes; the program runs the same), renamed
/// over what is there, as a deployment does. Returns its inode.
fn install(build: &Path, path: &Path, tag: &str) -> Result<u64, String> {
    let staged = path.with_extension("new");
    std::fs::copy(build, &staged).map_err(|e| format!("copy {}: {e}", build.display()))?;
    let mut bytes = std::fs::read(&staged).map_err(|e| e.to_string())?;
    bytes.extend_from_slice(tag.as_bytes());
    std::fs::write(&staged, bytes).map_err(|e| e.to_string())?;
    std::fs::rename(&staged, path).map_err(|e| format!("rename over {}: {e}", path.display()))?;
    Ok(std::fs::metadata(path).map_err(|e| e.to_string())?.ino())
}

/// A master's default control socket with `XDG_RUNTIME_DIR=dir`.
fn default_socket(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("shmcluster-{pid}.sock"))
}

/// Writes `text` to `path` by rename (a running reader keeps the old file).
fn write_by_rename(path: &Path, text: &str) -> Check {
    let staged = path.with_extension("new");
    std::fs::write(&staged, text).map_err(|e| e.to_string())?;
    std::fs::rename(&staged, path).map_err(|e| e.to_string())
}

fn worker_script(version: &str, never_ready: bool) -> String {
    WORKER
        .replace("@VERSION@", version)
        .replace("@NEVER_READY@", if never_ready { "True" } else { "False" })
}

/// `curl -sS http://addr/`: the body.
fn curl(addr: &str) -> Result<String, String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", &format!("http://{addr}/")])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("curl (the Debian package): {e}"))?;
    ensure!(
        out.status.success(),
        "curl http://{addr}/: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).map_err(|e| e.to_string())
}

/// The number after `key ` in `body`.
fn number_after(body: &str, key: &str) -> Result<u64, String> {
    let mut words = body.split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')');
    while let Some(w) = words.next() {
        if w == key {
            if let Some(n) = words.next().and_then(|n| n.parse().ok()) {
                return Ok(n);
            }
        }
    }
    Err(format!("no `{key} N` in {body:?}"))
}

/// `wrk -t2 -c16 -d<secs>s` with the pids script, started now; `finish`
/// waits for it and parses its summary.
struct Load(WrkChild);

impl Load {
    fn start(addr: &str, secs: u32) -> Result<Load, String> {
        Ok(Load(WrkChild::spawn(&mut wrk_get_pids(addr, 16, secs)?)?))
    }

    /// wrk's summary; every socket error and non-2xx answer is a failure.
    fn finish(self, secs: u32) -> Result<Wrk, String> {
        let output = self.0.output(Duration::from_secs(u64::from(secs) + 30))?;
        let run = Wrk::parse_with_pids(&output)?;
        run.failed_nothing(&output)?;
        Ok(run)
    }
}

/// Runs `shmcluster <args>` (the test's own build) with the scenario's
/// runtime directory; (exit code, stdout + stderr).
fn cli(args: &[&str]) -> Result<(i32, String), String> {
    let out = Command::new(BIN)
        .args(args)
        .env("XDG_RUNTIME_DIR", common::tmp())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{BIN}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code().unwrap_or(-1), text))
}

// ------------------------------------------------------------ fork mode

/// `new master pid N` from `upgrade --wait`'s output.
fn upgraded_pid(text: &str) -> Result<u32, String> {
    text.rsplit_once("upgraded: new master pid ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|p| p.parse::<u32>().ok())
        .ok_or(format!("no new pid in {text:?}"))
}

/// A fork-mode master just spawned, adopted (see [`adopt_fork_master`]).
struct Forked {
    master: Cluster,
    /// The pid it was spawned with.
    old_pid: u32,
    /// The address its banner names.
    addr: String,
    /// Its stderr, whole once it and its successors have closed it.
    log: std::thread::JoinHandle<String>,
    /// The banners still to come (a new master's, after an upgrade).
    lines: mpsc::Receiver<(String, u32)>,
}

/// Starts `command`, a fork-mode master, in a process group of its own
/// with stdout and stderr piped, adopts it, and waits for its banner,
/// which must name the pid it was spawned with.
fn spawn_fork_master(command: &mut Command) -> Result<Forked, String> {
    let mut child = command
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{:?}: {e}", command.get_program()))?;
    let old_pid = child.id();
    let lines = banners(child.stdout.take().ok_or("no stdout")?);
    let log = read_all(child.stderr.take());
    let master = Cluster::adopt(child);
    let (addr, pid) = lines
        .recv_timeout(Duration::from_secs(20))
        .map_err(|_| "the master named no address in 20 s")?;
    ensure!(pid == old_pid, "banner pid {pid}, spawned {old_pid}");
    Ok(Forked {
        master,
        old_pid,
        addr,
        log,
        lines,
    })
}

/// Lines the masters print on stdout ("listening on ADDR (master pid
/// N)"), one per master, as they come.
fn banners(stdout: std::process::ChildStdout) -> mpsc::Receiver<(String, u32)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let mut words = line.split_whitespace();
            let addr = words.nth(2).unwrap_or_default().to_owned();
            let pid = line
                .rsplit_once("master pid ")
                .and_then(|(_, p)| p.trim_end_matches(')').parse().ok())
                .unwrap_or(0);
            let _ = tx.send((addr, pid));
        }
    });
    rx
}

fn fork_mode_sigusr2_under_wrk() -> Check {
    fork_mode_under_wrk(false)
}

/// With `--reuseport`: one `SO_REUSEPORT` socket per instance, each handed
/// over by name and served by the new worker of the same instance.
fn fork_mode_reuseport_sigusr2_under_wrk() -> Check {
    fork_mode_under_wrk(true)
}

fn fork_mode_under_wrk(reuseport: bool) -> Check {
    become_subreaper()?;
    let dir = common::tmp();
    let example = built_example("http_cluster")?;
    let program = dir.join("server");
    let first_build = install(&example, &program, "")?;
    let mut command = Command::new(&program);
    command
        .args(["--workers", "2", "--listen", "127.0.0.1:0", "--quiet"])
        .args(reuseport.then_some("--reuseport"));
    let Forked {
        master,
        old_pid,
        addr,
        log,
        lines,
    } = spawn_fork_master(&mut command)?;
    let before = curl(&addr)?;
    ensure!(
        number_after(&before, "build")? == first_build,
        "{before:?} is not from build {first_build}"
    );
    let old_workers: Vec<u32> = group_members(old_pid)
        .into_iter()
        .filter(|p| *p != old_pid)
        .collect();

    const SECS: u32 = 6;
    let load = Load::start(&addr, SECS)?;
    std::thread::sleep(Duration::from_millis(1500));
    let new_build = install(&example, &program, "\nnew build\n")?;
    ensure!(new_build != first_build, "the new build has the old inode");
    master.signal(Signal::SIGUSR2)?;
    let (new_addr, new_pid) = lines
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| "no new master named itself within 30 s of SIGUSR2")?;
    ensure!(new_pid != old_pid && new_pid != 0, "new master pid {new_pid}");
    ensure!(
        new_addr == addr,
        "the new master listens on {new_addr}, not {addr}"
    );
    // The old master drains and exits 0; the group stays for the watchdog.
    let status = master.wait(Duration::from_secs(30));
    MASTER.store(old_pid as i32, Ordering::Release);
    let (status, _) = status?;
    ensure!(status.success(), "the old master exited {status}");
    let run = load.finish(SECS)?;
    // Answers from the new build only, by workers of the new master.
    for _ in 0..10 {
        let body = curl(&addr)?;
        ensure!(
            number_after(&body, "build")? == new_build,
            "{body:?} is not from the new build {new_build} (old {first_build})"
        );
        let pid = number_after(&body, "pid")? as u32;
        ensure!(!old_workers.contains(&pid), "answered by the old worker {pid}");
    }
    let exe_ino = std::fs::metadata(format!("/proc/{new_pid}/exe"))
        .map_err(|e| e.to_string())?
        .ino();
    ensure!(
        exe_ino == new_build,
        "the new master runs inode {exe_ino}, not {new_build}"
    );
    for pid in &old_workers {
        ensure!(!alive(*pid), "the old worker {pid} still runs");
    }
    println!(
        "    fork mode{}: wrk {} requests through SIGUSR2, socket errors {:?}, non-2xx {}; answered by {} pids; \
         master {old_pid} -> {new_pid} (exited 0), build inode {first_build} -> {new_build}",
        if reuseport { " (reuseport)" } else { "" },
        run.requests,
        run.socket_errors,
        run.non_2xx,
        run.pids.len()
    );
    kill(Pid::from_raw(new_pid as i32), Signal::SIGTERM).map_err(|e| e.to_string())?;
    let code = wait_pid(new_pid, Duration::from_secs(20))?;
    ensure!(code == 0, "the new master exited {code} after SIGTERM");
    let log = join(log)?;
    ensure!(
        log.contains("upgrade finished: ok"),
        "no `upgrade finished: ok` event in:\n{log}"
    );
    no_process_left(old_pid)
}

/// Started through a `current` symlink, upgraded after the symlink was
/// switched to another release: the new master executes that release.
fn fork_mode_follows_a_switched_current_symlink() -> Check {
    become_subreaper()?;
    let dir = common::tmp();
    let example = built_example("http_cluster")?;
    let mut builds = Vec::new();
    for (rel, tag) in [("rel1", ""), ("rel2", "\nrelease 2\n")] {
        std::fs::create_dir_all(dir.join(rel)).map_err(|e| e.to_string())?;
        builds.push(install(&example, &dir.join(rel).join("server"), tag)?);
    }
    let (first_build, new_build) = (builds[0], builds[1]);
    ensure!(first_build != new_build, "two releases, one inode");
    let current = dir.join("current");
    let _ = std::fs::remove_file(&current);
    std::os::unix::fs::symlink("rel1", &current).map_err(|e| e.to_string())?;
    // As a deploy starts it: from the application's directory, by the
    // symlink's path.
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg("cd \"$1\" && exec ./current/server --workers 2 --listen 127.0.0.1:0 --quiet")
        .arg("sh")
        .arg(&dir);
    let Forked {
        master,
        old_pid,
        addr,
        log,
        lines,
    } = spawn_fork_master(&mut command)?;
    let before = curl(&addr)?;
    ensure!(
        number_after(&before, "build")? == first_build,
        "{before:?} is not from rel1 ({first_build})"
    );
    // The deploy: `current` switched to rel2 by rename.
    let staged = dir.join("current.new");
    let _ = std::fs::remove_file(&staged);
    std::os::unix::fs::symlink("rel2", &staged).map_err(|e| e.to_string())?;
    std::fs::rename(&staged, &current).map_err(|e| e.to_string())?;
    master.signal(Signal::SIGUSR2)?;
    let (_, new_pid) = lines
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| "no new master named itself within 30 s of SIGUSR2")?;
    ensure!(new_pid != old_pid && new_pid != 0, "new master pid {new_pid}");
    let status = master.wait(Duration::from_secs(30));
    MASTER.store(old_pid as i32, Ordering::Release);
    let (status, _) = status?;
    ensure!(status.success(), "the old master exited {status}");
    for _ in 0..5 {
        let body = curl(&addr)?;
        ensure!(
            number_after(&body, "build")? == new_build,
            "{body:?} is not from rel2 ({new_build}; rel1 is {first_build})"
        );
    }
    let exe_ino = std::fs::metadata(format!("/proc/{new_pid}/exe"))
        .map_err(|e| e.to_string())?
        .ino();
    ensure!(
        exe_ino == new_build,
        "the new master runs inode {exe_ino}, not rel2's {new_build}"
    );
    println!("    current symlink: master {old_pid} (rel1, {first_build}) -> {new_pid} (rel2, {new_build})");
    kill(Pid::from_raw(new_pid as i32), Signal::SIGTERM).map_err(|e| e.to_string())?;
    let code = wait_pid(new_pid, Duration::from_secs(20))?;
    ensure!(code == 0, "the new master exited {code} after SIGTERM");
    drop(join(log)?);
    no_process_left(old_pid)
}

/// A new configuration with fewer `ReusePort` instances: the surplus
/// handed sockets stop listening once the new master is ready, so under
/// `wrk` no connection is hashed to a socket nobody accepts on (it would
/// be reset when the old master exits).
fn fewer_reuseport_instances_drop_nothing_under_wrk() -> Check {
    become_subreaper()?;
    let dir = common::tmp();
    let example = built_example("http_cluster")?;
    let real = dir.join("server-real");
    install(&example, &real, "")?;
    let program = dir.join("server");
    install(&example, &program, "")?;
    let mut command = Command::new(&program);
    command.args([
        "--workers",
        "3",
        "--listen",
        "127.0.0.1:0",
        "--quiet",
        "--reuseport",
    ]);
    let Forked {
        master,
        old_pid,
        addr,
        log,
        lines,
    } = spawn_fork_master(&mut command)?;
    curl(&addr)?;

    const SECS: u32 = 6;
    let load = Load::start(&addr, SECS)?;
    std::thread::sleep(Duration::from_millis(1500));
    // The new build: one instance now.
    write_by_rename(
        &program,
        &format!(
            "#!/bin/sh\nexec '{}' --workers 1 --listen 127.0.0.1:0 --quiet --reuseport\n",
            real.display()
        ),
    )?;
    std::fs::set_permissions(&program, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    master.signal(Signal::SIGUSR2)?;
    let (new_addr, new_pid) = lines
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| "no new master named itself within 30 s of SIGUSR2")?;
    ensure!(
        new_addr == addr,
        "the new master listens on {new_addr}, not {addr}"
    );
    let status = master.wait(Duration::from_secs(30));
    MASTER.store(old_pid as i32, Ordering::Release);
    let (status, _) = status?;
    ensure!(status.success(), "the old master exited {status}");
    let run = load.finish(SECS)?;
    for _ in 0..10 {
        curl(&addr)?;
    }
    println!(
        "    reuseport 3 -> 1 instances: wrk {} requests through SIGUSR2 and the drain, socket errors {:?}, \
         non-2xx {}; master {old_pid} -> {new_pid}",
        run.requests, run.socket_errors, run.non_2xx
    );
    kill(Pid::from_raw(new_pid as i32), Signal::SIGTERM).map_err(|e| e.to_string())?;
    let code = wait_pid(new_pid, Duration::from_secs(20))?;
    ensure!(code == 0, "the new master exited {code} after SIGTERM");
    drop(join(log)?);
    no_process_left(old_pid)
}

/// Nothing of the cluster runs any more (within 10 s); every orphan reaped.
fn no_process_left(pgid: u32) -> Check {
    let start = Instant::now();
    loop {
        reap_orphans();
        let left = group_members(pgid);
        if left.is_empty() {
            return Ok(());
        }
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "still running: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ------------------------------------------------------------ spawn mode

/// A `shmcluster run` copy at `dir/shmcluster` with the Python worker at
/// `dir/worker.py`, 2 workers, its control socket at the default path in
/// `dir` (`XDG_RUNTIME_DIR`).
fn start_spawn_master(ready_timeout: &str, env: &[(&str, &Path)]) -> Result<(Cluster, PathBuf, u64), String> {
    start_spawn_master_with(ready_timeout, env, &[])
}

/// [`start_spawn_master`] with `extra` options for `shmcluster run`.
fn start_spawn_master_with(
    ready_timeout: &str,
    env: &[(&str, &Path)],
    extra: &[&str],
) -> Result<(Cluster, PathBuf, u64), String> {
    let dir = common::tmp();
    let program = dir.join("shmcluster");
    let first = install(Path::new(BIN), &program, "")?;
    let worker = dir.join("worker.py");
    write_by_rename(&worker, &worker_script("v1", false))?;
    let mut cmd = Command::new(&program);
    cmd.args([
        "run",
        "-w",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--ready-timeout",
        ready_timeout,
    ])
    .args(extra)
    .args(["--", "python3"])
    .arg(&worker)
    .env("XDG_RUNTIME_DIR", &dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let cluster = Cluster::spawn(&mut cmd, true)?;
    // Every worker ready: two answers from v1 workers.
    let start = Instant::now();
    loop {
        let (code, text) = cli(&["stat"])?;
        if code == 0 && text.matches(" Ready ").count() >= 2 {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "workers not ready:\n{text}\n{}",
            cluster.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((cluster, program, first))
}

fn spawn_mode_upgrade_wait_under_wrk() -> Check {
    become_subreaper()?;
    let dir = common::tmp();
    let (mut master, program, first_build) = start_spawn_master("20", &[])?;
    let old_pid = MASTER.load(Ordering::Acquire) as u32;
    let addr = master.addr.clone();
    ensure!(curl(&addr)?.starts_with("version v1 "), "not v1");
    let old_socket = default_socket(&dir, old_pid);
    ensure!(
        old_socket.exists(),
        "no control socket at {}",
        old_socket.display()
    );

    // A client waiting for the old master's end (as `stop --wait` does)
    // learns that it was upgraded, not merely shut down.
    let waiter = {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&old_socket).map_err(|e| e.to_string())?;
        s.write_all(b"wait\n").map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        read_all(Some(s))
    };
    const SECS: u32 = 6;
    let load = Load::start(&addr, SECS)?;
    std::thread::sleep(Duration::from_millis(1500));
    write_by_rename(&dir.join("worker.py"), &worker_script("v2", false))?;
    let new_build = install(Path::new(BIN), &program, "\nnew build\n")?;
    let (code, text) = cli(&["upgrade", "--wait", "--timeout", "30"])?;
    ensure!(
        code == 0,
        "upgrade --wait exited {code}:\n{text}\n{}",
        master.log()
    );
    let new_pid = upgraded_pid(&text)?;
    ensure!(new_pid != old_pid, "the same master pid {new_pid}");
    // (Its log stays open: the new master writes to the same stderr.)
    let status = master.wait_exit(Duration::from_secs(30))?;
    ensure!(
        status.success(),
        "the old master exited {status}:\n{}",
        master.log()
    );
    let told = join(waiter)?;
    ensure!(
        told.contains(&format!(" upgraded_to={new_pid} "))
            && told.contains(&format!(
                "summary=upgraded:%20new%20master%20pid%20{new_pid}%20took%20over"
            )),
        "the old master's `wait` client was not told of the upgrade: {told:?}"
    );
    let said = format!("master exiting, upgraded: new master pid {new_pid} took over; clean shutdown");
    let start = Instant::now();
    while !master.log().contains(&said) {
        ensure!(
            start.elapsed() < Duration::from_secs(5),
            "no {said:?} in the old master's log:\n{}",
            master.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let run = load.finish(SECS)?;
    for _ in 0..10 {
        let body = curl(&addr)?;
        ensure!(
            body.starts_with("version v2 "),
            "{body:?} is not from the new worker program"
        );
    }
    let exe_ino = std::fs::metadata(format!("/proc/{new_pid}/exe"))
        .map_err(|e| e.to_string())?
        .ino();
    ensure!(
        exe_ino == new_build && new_build != first_build,
        "the new master runs inode {exe_ino}, not the new build {new_build}"
    );
    // `stat` reaches the new master: by `--pid NEW` once the socket file
    // is renamed to its default path, and by discovery.
    let new_socket = default_socket(&dir, new_pid);
    let start = Instant::now();
    while !new_socket.exists() {
        ensure!(
            start.elapsed() < Duration::from_secs(5),
            "{} not there 5 s after the old master exited",
            new_socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(!old_socket.exists(), "{} is still there", old_socket.display());
    for args in [vec!["stat", "--pid", &new_pid.to_string()], vec!["stat"]] {
        let (code, text) = cli(&args)?;
        ensure!(code == 0, "{args:?} exited {code}:\n{text}");
        ensure!(
            text.contains(&format!("master pid {new_pid}:")) && text.matches(" Ready ").count() >= 2,
            "{args:?}:\n{text}"
        );
    }
    println!(
        "    spawn mode: wrk {} requests through `upgrade --wait`, socket errors {:?}, non-2xx {}; master \
         {old_pid} -> {new_pid} (exited 0); v1 -> v2; stat by --pid {new_pid} and by discovery; then upgraded \
         again by discovery",
        run.requests, run.socket_errors, run.non_2xx
    );
    // An upgraded master upgrades again, found by discovery.
    let (code, text) = cli(&["upgrade", "--wait", "--timeout", "30"])?;
    ensure!(code == 0, "the second upgrade --wait exited {code}:\n{text}");
    let third = upgraded_pid(&text)?;
    let code = wait_pid(new_pid, Duration::from_secs(20))?;
    ensure!(code == 0, "the second master exited {code} after handing over");
    let third_socket = default_socket(&dir, third);
    let start = Instant::now();
    while !third_socket.exists() {
        ensure!(
            start.elapsed() < Duration::from_secs(5),
            "{} not there",
            third_socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(
        curl(&addr)?.starts_with("version v2 "),
        "not v2 after the second upgrade"
    );
    let (code, text) = cli(&["stop", "--wait", "--pid", &third.to_string()])?;
    ensure!(code == 0, "stop --wait exited {code}:\n{text}");
    let code = wait_pid(third, Duration::from_secs(20))?;
    ensure!(code == 0, "the third master exited {code}");
    ensure!(!third_socket.exists(), "{} left behind", third_socket.display());
    ensure!(!new_socket.exists(), "{} left behind", new_socket.display());
    let log = master.log();
    ensure!(
        log.contains("upgrade finished: ok"),
        "no `upgrade finished: ok` event in:\n{log}"
    );
    no_process_left(old_pid)
}

// ------------------------------------------------------------ systemd

/// One datagram from `socket` (with `SO_PASSCRED` on) into `buf`: its
/// length and its sender's pid (0 if the kernel gave none); times out as
/// the socket's read timeout says.
fn recv_with_pid(socket: &std::os::unix::net::UnixDatagram, buf: &mut [u8]) -> std::io::Result<(usize, u32)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixCredentials};
    use std::os::fd::AsRawFd;
    let mut cmsg = nix::cmsg_space!(UnixCredentials);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty())
        .map_err(std::io::Error::from)?;
    let mut pid = 0;
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmCredentials(cred) = c {
            pid = u32::try_from(cred.pid()).unwrap_or(0);
        }
    }
    Ok((msg.bytes, pid))
}

/// A service manager's notify socket, as tests/systemd_notify.rs binds
/// one: a datagram socket at `path` (`NOTIFY_SOCKET` for the master)
/// whose datagrams a thread receives with their sender's pid
/// (`SCM_CREDENTIALS`), as systemd has them.
struct Manager {
    path: PathBuf,
    /// Every datagram so far, with its sender's pid.
    senders: std::sync::Arc<std::sync::Mutex<Vec<(u32, String)>>>,
    heard: mpsc::Receiver<String>,
    /// The datagrams [`Manager::listen`] took so far, in order.
    said: Vec<String>,
}

impl Manager {
    /// Binds `dir/notify.sock` and starts receiving.
    fn bind(dir: &Path) -> Result<Manager, String> {
        use std::os::unix::net::UnixDatagram;
        let path = dir.join("notify.sock");
        let manager = UnixDatagram::bind(&path).map_err(|e| e.to_string())?;
        manager
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        nix::sys::socket::setsockopt(&manager, nix::sys::socket::sockopt::PassCred, &true)
            .map_err(|e| format!("SO_PASSCRED: {e}"))?;
        let senders = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(u32, String)>::new()));
        let (tx, heard) = mpsc::channel::<String>();
        let record = senders.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match recv_with_pid(&manager, &mut buf) {
                    Ok((n, pid)) => {
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        record
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push((pid, text.clone()));
                        if tx.send(text).is_err() {
                            return;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => return,
                }
            }
        });
        Ok(Manager {
            path,
            senders,
            heard,
            said: Vec::new(),
        })
    }

    /// Takes datagrams into `said` until `until` holds of them (20 s).
    fn listen(&mut self, until: &dyn Fn(&[String]) -> bool, what: &str) -> Check {
        let start = Instant::now();
        while !until(&self.said) {
            ensure!(
                start.elapsed() < Duration::from_secs(20),
                "never heard {what}: {:?}",
                self.said
            );
            if let Ok(m) = self.heard.recv_timeout(Duration::from_millis(100)) {
                self.said.push(m);
            }
        }
        Ok(())
    }

    /// After a moment for a datagram still on its way to the receiving
    /// thread: takes every datagram received into `said`.
    fn settle(&mut self) {
        std::thread::sleep(Duration::from_millis(300));
        while let Ok(m) = self.heard.try_recv() {
            self.said.push(m);
        }
    }

    /// Every datagram so far, with its sender's pid.
    fn senders(&self) -> Vec<(u32, String)> {
        self.senders
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The datagrams `pid` sent so far.
    fn from(&self, pid: u32) -> Vec<String> {
        self.senders()
            .into_iter()
            .filter(|(p, _)| *p == pid)
            .map(|(_, m)| m)
            .collect()
    }
}

/// Under a service manager (`NOTIFY_SOCKET`, a [`Manager`]): the
/// old master says `READY=1`; a new master stopped before it is ready
/// says nothing at all; at a successful hand-over the old master says
/// `MAINPID=<new>` and nothing that
/// would stop the service (no `STOPPING=1` until the new master is
/// stopped); the new master says `MAINPID=<new>` with its `READY=1`.
fn systemd_hears_the_new_main_pid_and_no_stopping() -> Check {
    become_subreaper()?;
    let dir = common::tmp();
    let mut manager = Manager::bind(&dir)?;
    let (mut master, _, _) = start_spawn_master("20", &[("NOTIFY_SOCKET", &manager.path)])?;
    let old_pid = MASTER.load(Ordering::Acquire) as u32;
    manager.listen(&|s| s.iter().any(|m| m.contains("READY=1")), "READY=1")?;

    // First a new master that fails: its workers are never ready, and it
    // is stopped (SIGTERM) while it starts. It never was the main process:
    // it sends nothing at all (under `NotifyAccess=all` its `STOPPING=1`
    // would stop the service).
    let serving = group_members(old_pid);
    write_by_rename(&dir.join("worker.py"), &worker_script("v1", true))?;
    let (mut waiting, waiting_text) = upgrade_in_background()?;
    let failed = new_generation(&master, &serving, 1)?;
    kill(Pid::from_raw(failed as i32), Signal::SIGTERM).map_err(|e| e.to_string())?;
    let code = wait_child(&mut waiting, Duration::from_secs(30))?
        .code()
        .unwrap_or(-1);
    let text = join(waiting_text)?;
    ensure!(
        code == 1 && text.contains("upgrade failed"),
        "upgrade --wait to a new master stopped while it starts: {code}\n{text}"
    );
    let start = Instant::now();
    while group_members(old_pid) != serving {
        reap_orphans();
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "the failed generation still runs: {:?}",
            group_members(old_pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    manager.settle();
    let from_failed = manager.from(failed);
    ensure!(
        from_failed.is_empty(),
        "the failed new master {failed} spoke to the service manager: {from_failed:?}"
    );
    write_by_rename(&dir.join("worker.py"), &worker_script("v1", false))?;

    let (code, text) = cli(&["upgrade", "--wait", "--timeout", "30"])?;
    ensure!(code == 0, "upgrade --wait exited {code}:\n{text}");
    let new_pid = upgraded_pid(&text)?;
    let status = master.wait_exit(Duration::from_secs(30))?;
    ensure!(status.success(), "the old master exited {status}");
    let main = format!("MAINPID={new_pid}");
    manager.listen(
        &|s| s.contains(&main) && s.iter().any(|m| m.starts_with(&format!("{main}\nREADY=1"))),
        "MAINPID from both masters",
    )?;
    // A moment more for anything the old master might say late.
    manager.settle();
    ensure!(
        !manager.said.iter().any(|m| m.contains("STOPPING=1")),
        "the service manager was told the service stops: {:?}",
        manager.said
    );
    kill(Pid::from_raw(new_pid as i32), Signal::SIGTERM).map_err(|e| e.to_string())?;
    manager.listen(
        &|s| s.iter().any(|m| m.contains("STOPPING=1")),
        "STOPPING=1 from the new master",
    )?;
    let code = wait_pid(new_pid, Duration::from_secs(20))?;
    ensure!(code == 0, "the new master exited {code}");
    println!(
        "    systemd: a new master stopped while it started ({failed}) said nothing; master {old_pid} -> {new_pid}; \
         heard (pid, message) {:?}",
        manager.senders()
    );
    no_process_left(old_pid)
}

// ------------------------------------------------------------ failures

/// A new "build" that writes `ready pid=<its pid>` on the ready pipe
/// named by `SHMCLUSTER_UPGRADE` (`ready=<fd>`), then exits 0.
const SAYS_READY_AND_EXITS: &str = r#"#!/bin/sh
fd=$(printf '%s\n' "$SHMCLUSTER_UPGRADE" | tr ' ' '\n' | sed -n 's/^ready=//p')
eval "printf 'ready pid=%s\\n' $$ >&$fd"
exit 0
"#;

fn failing_new_builds_leave_the_old_master_serving() -> Check {
    become_subreaper()?;
    let dir = common::tmp();
    let (master, program, _) = start_spawn_master("3", &[])?;
    let old_pid = MASTER.load(Ordering::Acquire) as u32;
    let addr = master.addr.clone();
    let serving = group_members(old_pid);
    ensure!(
        serving.len() == 3,
        "expected the master and 2 workers, got {serving:?}"
    );

    // A new "build" that exits at once.
    write_by_rename(&program, "#!/bin/sh\necho 'broken build' >&2\nexit 3\n")?;
    std::fs::set_permissions(&program, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    let load = Load::start(&addr, 3)?;
    let (code, text) = cli(&["upgrade", "--wait", "--timeout", "20"])?;
    ensure!(
        code == 1 && text.contains("upgrade failed") && text.contains("exited with code 3"),
        "upgrade to a build that exits: code {code}:\n{text}"
    );
    load.finish(3)?;

    // A new "build" that says `ready` on the pipe its marker names, then
    // exits: a dead new master never takes over.
    write_by_rename(&program, SAYS_READY_AND_EXITS)?;
    std::fs::set_permissions(&program, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    let load = Load::start(&addr, 3)?;
    let (code, text) = cli(&["upgrade", "--wait", "--timeout", "20"])?;
    ensure!(
        code == 1 && text.contains("upgrade failed") && text.contains("after it said ready"),
        "upgrade to a build that says ready and exits: code {code}:\n{text}\n{}",
        master.log()
    );
    load.finish(3)?;
    ensure!(alive(old_pid), "the old master is gone");
    ensure!(curl(&addr)?.starts_with("version v1 "), "not the old workers");

    // A build whose workers never become ready: killed at the old
    // master's ready timeout (3 s), with its workers.
    install(Path::new(BIN), &program, "\nnew build\n")?;
    write_by_rename(&dir.join("worker.py"), &worker_script("v3", true))?;
    let load = Load::start(&addr, 6)?;
    let start = Instant::now();
    let mut waiting = Command::new(BIN)
        .args(["upgrade", "--wait", "--timeout", "30"])
        .env("XDG_RUNTIME_DIR", &dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{BIN}: {e}"))?;
    let (waiting_out, waiting_err) = (read_all(waiting.stdout.take()), read_all(waiting.stderr.take()));
    // Meanwhile control clients reach the old master, still in charge
    // (the new one does not accept before it is ready), which refuses to
    // start a second upgrade.
    std::thread::sleep(Duration::from_millis(1000));
    let (code, text) = cli(&["stat"])?;
    ensure!(
        code == 0 && text.contains(&format!("master pid {old_pid}:")),
        "stat during the upgrade: {code}\n{text}"
    );
    let (code, text) = cli(&["upgrade"])?;
    ensure!(
        code == 1 && text.contains("an upgrade is running already"),
        "a second upgrade during the first: {code}\n{text}"
    );
    let code = wait_child(&mut waiting, Duration::from_secs(30))?
        .code()
        .unwrap_or(-1);
    let text = format!("{}{}", join(waiting_out)?, join(waiting_err)?);
    ensure!(
        code == 1 && text.contains("upgrade failed") && text.contains("not ready within"),
        "upgrade to workers that are never ready: code {code}:\n{text}"
    );
    ensure!(
        start.elapsed() >= Duration::from_millis(2500),
        "failed after {:?}, before the 3 s ready timeout",
        start.elapsed()
    );
    let run = load.finish(6)?;
    ensure!(alive(old_pid), "the old master is gone");
    for _ in 0..5 {
        let body = curl(&addr)?;
        ensure!(body.starts_with("version v1 "), "{body:?}: not the old workers");
    }
    // Nothing of the failed generation is left: the new master and its
    // workers are gone (the killed workers may linger a moment).
    let start = Instant::now();
    loop {
        reap_orphans();
        let left = group_members(old_pid);
        if left == serving {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "still running: {left:?}, expected only {serving:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, text) = cli(&["stat", "--pid", &old_pid.to_string()])?;
    ensure!(
        code == 0 && text.contains(&format!("master pid {old_pid}:")),
        "stat of the old master after the failed upgrades: {code}\n{text}"
    );
    let log = master.log();
    ensure!(
        log.matches("upgrade failed: new master pid").count() == 3,
        "three failed-upgrade events expected in:\n{log}"
    );
    println!(
        "    failing builds: the 3 upgrades failed (exit at start; ready, then exit; not ready in 3 s), the old master {old_pid} kept \
         serving: wrk {} requests, socket errors {:?}, non-2xx {}; group {serving:?} only",
        run.requests, run.socket_errors, run.non_2xx
    );
    master.stop(Duration::from_secs(20))?;
    MASTER.store(old_pid as i32, Ordering::Release);
    no_process_left(old_pid)
}

// ------------------------------------------------------------ the overlap

/// `shmcluster upgrade --wait --timeout 30` started in the background:
/// (the client, its stdout and stderr).
fn upgrade_in_background() -> Result<(std::process::Child, std::thread::JoinHandle<String>), String> {
    let mut child = Command::new(BIN)
        .args(["upgrade", "--wait", "--timeout", "30"])
        .env("XDG_RUNTIME_DIR", common::tmp())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{BIN}: {e}"))?;
    let (out, err) = (read_all(child.stdout.take()), read_all(child.stderr.take()));
    let both = std::thread::spawn(move || {
        format!(
            "{}{}",
            join(out).unwrap_or_default(),
            join(err).unwrap_or_default()
        )
    });
    Ok((child, both))
}

/// The new master the old one started (its log line `upgrade: started new
/// master pid N`, the `nth` such line, from 1), once it and its 2 workers
/// run besides the old generation (`serving`); within 20 s.
fn new_generation(master: &Cluster, serving: &[u32], nth: usize) -> Result<u32, String> {
    let start = Instant::now();
    loop {
        let log = master.log();
        let pid = log
            .split("upgrade: started new master pid ")
            .nth(nth)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|p| p.parse::<u32>().ok());
        let members = group_members(serving[0]);
        if let Some(pid) = pid {
            if members.len() >= serving.len() + 3 {
                return Ok(pid);
            }
        }
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "no new generation running: group {members:?}, log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `curl http://addr/metrics`: the values of `shmcluster_worker_pid`.
fn scraped_worker_pids(addr: &str) -> Result<Vec<u32>, String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", &format!("http://{addr}/metrics")])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("curl: {e}"))?;
    ensure!(
        out.status.success(),
        "curl http://{addr}/metrics: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body = String::from_utf8_lossy(&out.stdout);
    let pids: Vec<u32> = body
        .lines()
        .filter(|l| l.starts_with("shmcluster_worker_pid{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .map(|v| v as u32)
        .collect();
    ensure!(!pids.is_empty(), "no shmcluster_worker_pid in:\n{body}");
    Ok(pids)
}

/// While a new master starts (its workers never ready here, so the
/// overlap lasts), the old master is the one in charge: `stat` and every
/// metrics scrape are answered by it (only its workers' pids), and a
/// `stop --wait` sent to it abandons the upgrade (the new master is
/// killed, `upgrade --wait` exits 1: stopped) and shuts it down cleanly
/// (exit 0); nothing of either generation is left.
fn stop_during_an_upgrade_abandons_it() -> Check {
    become_subreaper()?;
    let dir = common::tmp();
    let (mut master, _, _) = start_spawn_master_with("20", &[], &["--metrics", "127.0.0.1:0"])?;
    let old_pid = MASTER.load(Ordering::Acquire) as u32;
    let log = master.log();
    let metrics = log
        .split_once("metrics http://")
        .and_then(|(_, rest)| rest.split_once("/metrics"))
        .map(|(addr, _)| addr.to_owned())
        .ok_or(format!("no metrics address in:\n{log}"))?;
    let serving = group_members(old_pid);
    ensure!(
        serving.len() == 3 && serving[0] == old_pid,
        "expected the master and 2 workers, got {serving:?}"
    );
    let old_workers: Vec<u32> = serving[1..].to_vec();

    write_by_rename(&dir.join("worker.py"), &worker_script("v2", true))?;
    let (mut waiting, waiting_text) = upgrade_in_background()?;
    let new_pid = new_generation(&master, &serving, 1)?;
    for _ in 0..3 {
        let (code, text) = cli(&["stat", "--pid", &old_pid.to_string()])?;
        ensure!(
            code == 0 && text.contains(&format!("master pid {old_pid}:")),
            "stat during the upgrade did not reach the old master {old_pid}: {code}\n{text}"
        );
    }
    let (code, text) = cli(&["upgrade"])?;
    ensure!(
        code == 1 && text.contains("an upgrade is running already"),
        "a second upgrade during the first: {code}\n{text}"
    );
    for _ in 0..20 {
        let pids = scraped_worker_pids(&metrics)?;
        ensure!(
            pids.iter().all(|p| *p == 0 || old_workers.contains(p)),
            "a scrape during the upgrade names workers {pids:?}, not the old master's {old_workers:?}"
        );
    }
    let (code, text) = cli(&["stop", "--wait", "--timeout", "30", "--pid", &old_pid.to_string()])?;
    ensure!(
        code == 0 && text.contains("master exited: clean shutdown"),
        "stop --wait during the upgrade: {code}\n{text}\n{}",
        master.log()
    );
    let status = master.wait_exit(Duration::from_secs(30))?;
    ensure!(status.success(), "the old master exited {status}");
    let code = wait_child(&mut waiting, Duration::from_secs(30))?
        .code()
        .unwrap_or(-1);
    let text = join(waiting_text)?;
    ensure!(
        code == 1 && text.contains("upgrade failed") && text.contains("stopped"),
        "upgrade --wait when the old master was stopped: {code}\n{text}"
    );
    no_process_left(old_pid)?;
    ensure!(!alive(new_pid), "the new master {new_pid} still runs");
    // Stopped as the old master was, not killed: its workers (which may
    // already serve) finish their requests; and waited for.
    let log = master.log();
    ensure!(
        log.contains(&format!(
            "the new master pid {new_pid} told to stop exited with code 0"
        )),
        "the old master did not see the new master {new_pid} stop by itself:\n{log}"
    );
    println!(
        "    stop during an upgrade: stat and 20 scrapes answered by the old master {old_pid}; stop --wait: \
         exit 0, the new master {new_pid} told to stop exited 0 first, upgrade --wait exit 1 (stopped)"
    );
    Ok(())
}

/// A stop at the old master during an upgrade tells the new master to
/// stop and waits for it until the grace deadline; one that does not end
/// by then (held by `SIGSTOP` here, as a hung one would be) is killed
/// once, with its workers, said once, and makes the shutdown unclean
/// (without the kill at the deadline the old master would wait for it
/// forever).
fn an_abandoned_new_master_that_does_not_stop_is_killed_once() -> Check {
    become_subreaper()?;
    let dir = common::tmp();
    let (mut master, _, _) = start_spawn_master_with("20", &[], &["--kill-timeout", "2"])?;
    let old_pid = MASTER.load(Ordering::Acquire) as u32;
    let serving = group_members(old_pid);
    // Never ready: the upgrade cannot finish by itself meanwhile.
    write_by_rename(&dir.join("worker.py"), &worker_script("v2", true))?;
    master.signal(Signal::SIGUSR2)?;
    let new_pid = new_generation(&master, &serving, 1)?;
    kill(Pid::from_raw(new_pid as i32), Signal::SIGSTOP).map_err(|e| format!("SIGSTOP {new_pid}: {e}"))?;
    master.signal(Signal::SIGTERM)?;
    let status = master.wait_exit(Duration::from_secs(30))?;
    let log = master.log();
    let said = format!("the new master pid {new_pid} did not exit within the grace period; killing it");
    ensure!(log.matches(&said).count() == 1, "expected `{said}` once:\n{log}");
    ensure!(
        status.code() == Some(1)
            && log.contains(&format!(
                "the new master pid {new_pid} of the abandoned upgrade did not exit within the grace period and was killed"
            )),
        "the old master exited {status}, its report should name the killed new master:\n{log}"
    );
    no_process_left(old_pid)?;
    ensure!(!alive(new_pid), "the new master {new_pid} still runs");
    println!(
        "    a new master {new_pid} held by SIGSTOP when the old one {old_pid} stopped: killed once at the \
         grace deadline, the old master exited 1 naming it, nothing left"
    );
    Ok(())
}

// ------------------------------------------------------------ the confirm window

/// An upgrade started by `upgrade --wait` in the background, whose new
/// master is in charge (see [`new_master_in_charge`]).
struct InCharge {
    old_pid: u32,
    new_pid: u32,
    /// The `upgrade --wait` client, and its output.
    waiting: std::process::Child,
    waiting_text: std::thread::JoinHandle<String>,
}

/// Starts a spawn-mode master (as a subreaper, with `env` added; see
/// [`start_spawn_master`]), then an upgrade of it (`shmcluster upgrade
/// --wait` in the background), and returns as soon as the new master
/// answers a `ping` on the shared control socket: it has said `ready` and
/// is in charge, and the old master is then within its 500 ms
/// confirmation (checked afterwards by [`both_stop`]: it must not have
/// handed over).
fn new_master_in_charge(env: &[(&str, &Path)]) -> Result<(Cluster, InCharge), String> {
    use std::io::{Read, Write};
    become_subreaper()?;
    let (master, _, _) = start_spawn_master("20", env)?;
    let old_pid = MASTER.load(Ordering::Acquire) as u32;
    let serving = group_members(old_pid);
    let (waiting, waiting_text) = upgrade_in_background()?;
    let new_pid = new_generation(&master, &serving, 1)?;
    let socket = default_socket(&common::tmp(), old_pid);
    let start = Instant::now();
    loop {
        // One request per connection: each goes to whichever master
        // accepts it first.
        let mut answer = String::new();
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&socket) {
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?;
            if s.write_all(b"ping\n").is_ok() {
                let _ = s.read_to_string(&mut answer);
            }
        }
        if answer.starts_with(&format!("ok pong pid={new_pid} ")) {
            ensure!(
                alive(old_pid),
                "missed the window: the old master {old_pid} is gone when the new one first answers"
            );
            return Ok((
                master,
                InCharge {
                    old_pid,
                    new_pid,
                    waiting,
                    waiting_text,
                },
            ));
        }
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "the new master {new_pid} answered no ping within 20 s (last answer {answer:?})"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// After a stop reached the new master in charge: the old master exits 0
/// (within 10 s) and says why, it did not hand over before (else the stop
/// missed the confirm window and the scenario proves nothing), the
/// `upgrade --wait` client is told the upgrade was stopped, and nothing
/// of either generation is left. (Both masters write to one stderr: the
/// log is checked for fragments one `write(2)` puts there whole.)
fn both_stop(master: &mut Cluster, upgrade: InCharge) -> Check {
    let InCharge {
        old_pid,
        new_pid,
        mut waiting,
        waiting_text,
    } = upgrade;
    let status = master.wait_exit(Duration::from_secs(10)).map_err(|e| {
        format!(
            "the old master {old_pid} did not stop with the new one {new_pid} ({e}):\n{}",
            master.log()
        )
    })?;
    let log = master.log();
    ensure!(
        !log.contains(" is ready; draining and exiting"),
        "missed the window: the old master handed over before the stop reached the new one:\n{log}"
    );
    ensure!(status.success(), "the old master exited {status}:\n{log}");
    ensure!(
        log.contains(" is stopping; the old master stops too"),
        "the old master did not say why it stopped:\n{log}"
    );
    ensure!(
        !log.contains("; the old master keeps serving"),
        "a failed upgrade reported:\n{log}"
    );
    let code = wait_child(&mut waiting, Duration::from_secs(10))?
        .code()
        .unwrap_or(-1);
    let text = join(waiting_text)?;
    ensure!(
        code == 1
            && text.contains("upgrade failed: stopped (the new master was asked to stop after it said ready"),
        "upgrade --wait when the new master in charge was stopped: {code}\n{text}"
    );
    no_process_left(old_pid)?;
    ensure!(!alive(new_pid), "the new master {new_pid} still runs");
    Ok(())
}

/// A `SIGTERM` to the new master's pid (`kill`, or systemd, which it told
/// `MAINPID=`) while the old master confirms it: both stop. Under a
/// service manager (a [`Manager`]), the new master, which said
/// `MAINPID=<new>` with its `READY=1`, stays the main process (the old
/// one does not claim it back, as after a failed upgrade), and each says
/// `STOPPING=1`.
fn sigterm_to_the_new_master_in_charge_stops_both() -> Check {
    let mut manager = Manager::bind(&common::tmp())?;
    let (mut master, upgrade) = new_master_in_charge(&[("NOTIFY_SOCKET", &manager.path)])?;
    let (old_pid, new_pid) = (upgrade.old_pid, upgrade.new_pid);
    kill(Pid::from_raw(new_pid as i32), Signal::SIGTERM).map_err(|e| e.to_string())?;
    both_stop(&mut master, upgrade)?;
    manager.settle();
    let (old, new) = (manager.from(old_pid), manager.from(new_pid));
    ensure!(
        new.iter()
            .any(|m| m.starts_with(&format!("MAINPID={new_pid}\nREADY=1")))
            && new.iter().any(|m| m.contains("STOPPING=1")),
        "the new master {new_pid} said {new:?}"
    );
    ensure!(
        !old.iter().any(|m| m.contains("MAINPID=")) && old.iter().any(|m| m.contains("STOPPING=1")),
        "the old master {old_pid} said {old:?}"
    );
    println!(
        "    SIGTERM to the new master {new_pid} in charge, the old master {old_pid} confirming: both stopped, \
         the old one exited 0, upgrade --wait exited 1 (stopped); heard (pid, message) {:?}",
        manager.senders()
    );
    Ok(())
}

/// A `stop --wait` answered by the new master while the old master
/// confirms it: both stop. The old master is held (`SIGSTOP`) once the
/// new one answers, so that the new one accepts the connections; it
/// then reads the new master's word when it goes on (`SIGCONT`).
fn stop_answered_by_the_new_master_in_charge_stops_both() -> Check {
    let (mut master, upgrade) = new_master_in_charge(&[])?;
    let (old_pid, new_pid) = (upgrade.old_pid, upgrade.new_pid);
    master.signal(Signal::SIGSTOP)?;
    let stopped = cli(&["stop", "--wait", "--timeout", "20", "--pid", &old_pid.to_string()]);
    master.signal(Signal::SIGCONT)?;
    let (code, text) = stopped?;
    ensure!(
        code == 0 && text.contains("master exited: clean shutdown"),
        "stop --wait to the new master: {code}\n{text}\n{}",
        master.log()
    );
    both_stop(&mut master, upgrade)?;
    println!(
        "    stop --wait answered by the new master {new_pid} in charge, the old master {old_pid} confirming: \
         both stopped, the old one exited 0, upgrade --wait exited 1 (stopped)"
    );
    Ok(())
}

/// A `SIGTERM` to both masters while the old one confirms the new one, as
/// a service manager's stop sends it to every process of the service:
/// the old master handles its own `SIGTERM` after the new one said
/// `stopping` (held by `SIGSTOP` until the new master has ended), and
/// takes it as the service's stop, not as a shutdown of its own that
/// abandons the upgrade.
fn sigterm_to_both_masters_in_the_window_stops_both() -> Check {
    let (mut master, upgrade) = new_master_in_charge(&[])?;
    let (old_pid, new_pid) = (upgrade.old_pid, upgrade.new_pid);
    master.signal(Signal::SIGSTOP)?;
    kill(Pid::from_raw(new_pid as i32), Signal::SIGTERM).map_err(|e| e.to_string())?;
    // Its end (a zombie: its parent is held) comes after its `stopping`.
    let start = Instant::now();
    while alive(new_pid) {
        if start.elapsed() > Duration::from_secs(10) {
            let _ = master.signal(Signal::SIGCONT);
            return Err(format!("the new master {new_pid} still runs 10 s after SIGTERM"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    master.signal(Signal::SIGTERM)?;
    master.signal(Signal::SIGCONT)?;
    both_stop(&mut master, upgrade)?;
    println!(
        "    SIGTERM to both masters in the window (the new one {new_pid} first, then the old one {old_pid}): \
         both stopped, the old one exited 0, upgrade --wait exited 1 (stopped)"
    );
    Ok(())
}
