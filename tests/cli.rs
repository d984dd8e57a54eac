//! The `shmcluster` command, run as a subprocess (so each master is a
//! fresh single-threaded process): `run` in spawn mode with `stat`,
//! `reload` and `stop` through the control socket, start-up errors, help,
//! and a listener served by Python workers on fd 3.
//!
//! Every child is bounded by a deadline and killed and reaped on the way
//! out, so a hang fails the test instead of CI.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_shmcluster");

/// A scratch directory, removed on drop, with a control socket's path in it.
struct TempDir {
    path: PathBuf,
    /// `<path>/c.sock`, for `--control`.
    sock: String,
}

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("shmcluster-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        let sock = path.join("c.sock").to_str().unwrap().to_owned();
        Self { path, sock }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A child that is killed and reaped when dropped (a failing test included).
struct Reaped(Child);

impl Reaped {
    /// Starts `shmcluster args...`, stdin empty, stdout and stderr piped.
    fn spawn(args: &[&str]) -> Self {
        let child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Self(child)
    }

    /// Reads what is left of its stdout, then of its stderr, to the end.
    fn read_output(&mut self) -> (String, String) {
        let mut stdout = String::new();
        let mut stderr = String::new();
        if let Some(mut o) = self.0.stdout.take() {
            o.read_to_string(&mut stdout).unwrap();
        }
        if let Some(mut e) = self.0.stderr.take() {
            e.read_to_string(&mut stderr).unwrap();
        }
        (stdout, stderr)
    }

    /// Waits up to `timeout` for the exit; panics (killing it) past that.
    fn wait_within(&mut self, timeout: Duration, what: &str) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.0.kill();
                let _ = self.0.wait();
                panic!("{what} did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// A finished command: exit status and output.
struct Out {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `shmcluster args...` to completion within `timeout`.
fn cli(args: &[&str], timeout: Duration) -> Out {
    let mut child = Reaped::spawn(args);
    let status = child.wait_within(timeout, &format!("shmcluster {args:?}"));
    let (stdout, stderr) = child.read_output();
    Out {
        status,
        stdout,
        stderr,
    }
}

/// A running `shmcluster run` master, its stderr lines arriving on a
/// channel (read by a thread so the master never blocks on the pipe).
struct Master {
    child: Reaped,
    lines: Receiver<String>,
    log: Vec<String>,
}

impl Master {
    /// `shmcluster run <options> --control <sock> -- <command>`.
    fn start(options: &[&str], sock: &str, command: &[&str]) -> Self {
        Self::start_with_env(options, sock, command, &[])
    }

    /// [`Master::start`] with `env` added to the master's environment.
    fn start_with_env(options: &[&str], sock: &str, command: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(BIN)
            .envs(env.iter().copied())
            .arg("run")
            .args(options)
            .args(["--control", sock, "--"])
            .args(command)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[master] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child: Reaped(child),
            lines,
            log: Vec::new(),
        }
    }

    /// [`Master::start`], then waits for its line that names the control
    /// socket (it listens from then on).
    fn start_and_await_control(options: &[&str], sock: &str, command: &[&str]) -> Self {
        let mut master = Self::start(options, sock, command);
        master.expect_line("control socket", Duration::from_secs(10));
        master
    }

    /// Waits for a stderr line containing `needle`; returns it.
    fn expect_line(&mut self, needle: &str, timeout: Duration) -> String {
        if let Some(l) = self.log.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no master line containing {needle:?} within {timeout:?}: {:#?}",
                    self.log
                ),
            }
        }
    }

    /// Sends `sig` to the master process.
    fn signal(&self, sig: i32) {
        signal(self.child.0.id(), sig);
    }

    /// Waits for the exit; returns its code and the whole stderr.
    fn finish(mut self, timeout: Duration) -> (Option<i32>, Vec<String>) {
        let status = self.child.wait_within(timeout, "the master");
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.log.push(line);
        }
        (status.code(), std::mem::take(&mut self.log))
    }
}

/// `stat` until it succeeds with an output that `done` accepts (within
/// 20 s, else a panic saying it never showed `want`); returns that output.
fn stat_until(sock: &str, want: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = cli(&["stat", "--control", sock], Duration::from_secs(10));
        if out.status.success() && done(&out.stdout) {
            return out.stdout;
        }
        assert!(
            Instant::now() < deadline,
            "stat never showed {want}: {} {}",
            out.stdout,
            out.stderr
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `stat` until it answers with `live` running workers; returns its output.
fn stat_until_live(sock: &str, live: usize) -> String {
    let want = format!("{live} live");
    stat_until(sock, &want, |stdout| stdout.contains(&want))
}

/// The pids of the rows whose state is `Ready`.
fn ready_pids(stat: &str) -> Vec<u32> {
    stat.lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.get(2) == Some(&"Ready")).then(|| cols[3].parse().unwrap())
        })
        .collect()
}

#[test]
fn help_works_for_every_subcommand() {
    for args in [
        &["--help"][..],
        &["run", "--help"],
        &["stat", "--help"],
        &["reload", "--help"],
        &["stop", "--help"],
        &["top", "--help"],
    ] {
        let out = cli(args, Duration::from_secs(10));
        assert!(out.status.success(), "{args:?}: {}", out.stderr);
        assert!(
            out.stdout.contains("Usage: shmcluster"),
            "{args:?}: {}",
            out.stdout
        );
        assert!(out.stdout.contains("Exit codes:"), "{args:?}: {}", out.stdout);
    }
    let run = cli(&["run", "--help"], Duration::from_secs(10)).stdout;
    for option in [
        "--workers",
        "--listen",
        "--reuseport",
        "--max-restarts",
        "--restart-window",
        "--backoff-ms",
        "--backoff-max-ms",
        "--reload-timeout",
        "--ready-timeout",
        "--kill-timeout",
        "--lane-size",
        "--ready-on-start",
        "--control",
    ] {
        assert!(run.contains(option), "run --help lacks {option}");
    }
    let stat = cli(&["stat", "--help"], Duration::from_secs(10)).stdout;
    for option in ["--control", "--pid", "--watch"] {
        assert!(stat.contains(option), "stat --help lacks {option}");
    }
    let top = cli(&["top", "--help"], Duration::from_secs(10)).stdout;
    for option in ["--control", "--pid", "--interval", "Keys:"] {
        assert!(top.contains(option), "top --help lacks {option}");
    }
}

#[test]
fn start_up_errors_exit_2_before_anything_starts() {
    let dir = TempDir::new("errors");
    let socket = dir.sock.as_str();

    let out = cli(&["run", "-w", "2", "--control", socket], Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("<COMMAND>"), "{}", out.stderr);

    let out = cli(
        &["run", "-w", "2", "--control", socket, "--", "/nonexistent/worker"],
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("cannot execute"), "{}", out.stderr);
    assert!(!out.stderr.contains("spawned"), "nothing started: {}", out.stderr);

    let out = cli(
        &["run", "--kill-timeout", "soon", "--", "sleep", "1"],
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("not a number of seconds"), "{}", out.stderr);

    let out = cli(
        &["run", "--control", "/nonexistent-dir/c.sock", "--", "sleep", "1"],
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("control socket"), "{}", out.stderr);
    assert!(!Path::new(socket).exists());

    // No master there: stat says so and exits 1.
    let out = cli(&["stat", "--control", socket], Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("cannot connect"), "{}", out.stderr);
}

#[test]
fn stat_reload_and_stop_through_the_control_socket() {
    let dir = TempDir::new("control");
    let sock = dir.sock.as_str();
    let mut master = Master::start(
        &["-w", "2", "--ready-on-start", "--kill-timeout", "5"],
        sock,
        &["sleep", "60"],
    );
    let first = master.expect_line("control socket", Duration::from_secs(10));
    assert!(first.contains(sock), "{first}");

    let stat = stat_until_live(sock, 2);
    let before = ready_pids(&stat);
    assert_eq!(before.len(), 2, "{stat}");
    assert!(stat.contains("lock (global): free"), "{stat}");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    // A watcher prints rates and ends when the master does.
    let mut watcher = Reaped::spawn(&["stat", "--control", sock, "--watch", "0.1"]);
    // Collect its output as it comes, to know when it has printed rates
    // (its second sample) before the cluster is stopped.
    let watched = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let watched = watched.clone();
        let mut out = watcher.0.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                watched
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };

    let out = cli(&["reload", "--control", sock, "--wait"], Duration::from_secs(30));
    assert!(out.status.success(), "{} {}", out.stdout, out.stderr);
    assert!(out.stdout.contains("reload finished: ok"), "{}", out.stdout);
    master.expect_line("reload started", Duration::from_secs(10));
    master.expect_line("reload finished: ok", Duration::from_secs(10));

    let stat = stat_until_live(sock, 2);
    let after = ready_pids(&stat);
    assert_eq!(after.len(), 2, "{stat}");
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "new pids: {before:?} -> {after:?}"
    );
    assert!(stat.contains("1 started, 1 ok, 0 failed"), "{stat}");

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !watched.lock().unwrap().contains("sent/s") {
        assert!(
            std::time::Instant::now() < deadline,
            "stat --watch printed no rates"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = cli(&["stop", "--control", sock, "--wait"], Duration::from_secs(30));
    assert!(out.status.success(), "{} {}", out.stdout, out.stderr);
    assert!(out.stdout.contains("shutdown started"), "{}", out.stdout);
    assert!(
        out.stdout.contains("master exited: clean shutdown") && out.stdout.contains("(exit code 0)"),
        "{}",
        out.stdout
    );
    let (code, log) = master.finish(Duration::from_secs(15));
    assert_eq!(code, Some(0), "{log:#?}");
    assert!(log.iter().any(|l| l.contains("clean shutdown")), "{log:#?}");
    assert!(!Path::new(sock).exists(), "the socket file is removed at exit");

    let status = watcher.wait_within(Duration::from_secs(10), "stat --watch");
    reader.join().unwrap();
    let watched = watched.lock().unwrap().clone();
    assert!(status.success(), "{watched}");
    assert!(watched.contains("sent/s"), "{watched}");
    assert!(watched.trim_end().ends_with("master gone"), "{watched}");
}

/// Instance → pid of the rows whose state is `Ready`.
fn ready_by_instance(stat: &str) -> std::collections::BTreeMap<u32, u32> {
    stat.lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.get(2) == Some(&"Ready")).then(|| (cols[1].parse().unwrap(), cols[3].parse().unwrap()))
        })
        .collect()
}

#[test]
fn reload_worker_replaces_that_worker_alone() {
    let dir = TempDir::new("reload-one");
    let sock = dir.sock.as_str();
    let mut master = Master::start(
        &["-w", "3", "--ready-on-start", "--kill-timeout", "5"],
        sock,
        &["sleep", "60"],
    );
    master.expect_line("control socket", Duration::from_secs(10));
    let before = ready_by_instance(&stat_until_live(sock, 3));
    assert_eq!(before.len(), 3, "{before:?}");

    // An instance the cluster does not have: refused, nothing reloaded.
    let out = cli(
        &["reload", "--control", sock, "--worker", "3"],
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(1), "{} {}", out.stdout, out.stderr);
    assert!(
        out.stderr
            .contains("no worker 3: the cluster runs workers 0 to 2"),
        "{}",
        out.stderr
    );

    let out = cli(
        &["reload", "--control", sock, "--worker", "1", "--wait"],
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{} {}", out.stdout, out.stderr);
    assert!(out.stdout.contains("reload of worker 1 queued"), "{}", out.stdout);
    assert!(out.stdout.contains("reload finished: ok"), "{}", out.stdout);
    master.expect_line("reload started", Duration::from_secs(10));
    master.expect_line("reload finished: ok", Duration::from_secs(10));

    let stat = stat_until_live(sock, 3);
    let after = ready_by_instance(&stat);
    assert_eq!(after.len(), 3, "{stat}");
    assert_eq!(after[&0], before[&0], "worker 0 untouched: {stat}");
    assert_eq!(after[&2], before[&2], "worker 2 untouched: {stat}");
    assert_ne!(after[&1], before[&1], "worker 1 replaced: {stat}");
    assert!(stat.contains("1 started, 1 ok, 0 failed"), "{stat}");
    assert!(
        stat.contains("Reloaded"),
        "the old worker 1 ended as reloaded: {stat}"
    );

    let out = cli(&["stop", "--control", sock, "--wait"], Duration::from_secs(30));
    assert!(out.status.success(), "{} {}", out.stdout, out.stderr);
    let (code, log) = master.finish(Duration::from_secs(15));
    assert_eq!(code, Some(0), "{log:#?}");
}

#[test]
fn a_tcp_listener_is_served_by_python_workers_on_fd_3() {
    if Command::new("python3").arg("-c").arg("").status().is_err() {
        eprintln!("python3 not found: skipped");
        return;
    }
    let dir = TempDir::new("listen");
    let sock = dir.sock.as_str();
    let worker = "import socket, os, time\n\
        s = socket.socket(fileno=3)\n\
        c, _ = s.accept()\n\
        c.recv(65536)\n\
        body = ('worker %s' % os.environ['SHMCLUSTER_INDEX']).encode()\n\
        c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n' % len(body) + body)\n\
        c.close()\n\
        time.sleep(60)\n";
    let mut master = Master::start(
        &[
            "-w",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--ready-on-start",
            "--kill-timeout",
            "5",
        ],
        sock,
        &["python3", "-c", worker],
    );
    let first = master.expect_line("listening on", Duration::from_secs(10));
    let addr = first.rsplit("listening on ").next().unwrap().trim().to_string();
    stat_until_live(sock, 2);
    let mut client = TcpStream::connect(&addr).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    client.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(
        response.ends_with("worker 0") || response.ends_with("worker 1"),
        "{response}"
    );

    let out = cli(&["stop", "--control", sock], Duration::from_secs(10));
    assert!(out.status.success(), "{}", out.stderr);
    let (code, log) = master.finish(Duration::from_secs(15));
    assert_eq!(code, Some(0), "{log:#?}");
}

/// What a spawned worker inherits of the master's environment: the user's
/// own settings, `SHMCLUSTER_LIB` included (a Python worker finds its
/// library with it), but not the master's NATS credentials, nor a stale
/// identity or listener set of the master's own parent (the master sets
/// the worker's).
#[test]
fn workers_inherit_the_users_environment_but_not_credentials_or_identity() {
    let dir = TempDir::new("env");
    let sock = dir.sock.as_str();
    let out = dir.path.join("env");
    let script = format!("env > {}.$SHMCLUSTER_INDEX; exec sleep 60", out.display());
    let master = Master::start_with_env(
        &["-w", "1", "--ready-on-start", "--kill-timeout", "5"],
        sock,
        &["sh", "-c", &script],
        &[
            ("SHMCLUSTER_LIB", "/opt/lib/libshmcluster.so"),
            ("APP_SETTING", "kept"),
            ("SHMCLUSTER_NATS_PASSWORD", "hunter2"),
            ("SHMCLUSTER_NATS_TOKEN", "t0ken"),
            ("SHMCLUSTER_WORKER", "77"),
            ("SHMCLUSTER_INDEX", "9"),
            ("LISTEN_FDS", "5"),
            ("LISTEN_PID", "1"),
        ],
    );
    stat_until_live(sock, 1);
    let file = dir.path.join("env.0");
    let deadline = Instant::now() + Duration::from_secs(10);
    let env = loop {
        match std::fs::read_to_string(&file) {
            Ok(e) if e.contains("SHMCLUSTER_WORKER=") => break e,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            r => panic!("the worker wrote no environment to {}: {r:?}", file.display()),
        }
    };
    let lines: Vec<&str> = env.lines().collect();
    assert!(
        lines.contains(&"SHMCLUSTER_LIB=/opt/lib/libshmcluster.so"),
        "{env}"
    );
    assert!(lines.contains(&"APP_SETTING=kept"), "{env}");
    assert!(
        !env.contains("hunter2") && !env.contains("t0ken"),
        "credentials reached the worker: {env}"
    );
    assert!(lines.contains(&"SHMCLUSTER_WORKER=0"), "{env}");
    assert!(lines.contains(&"SHMCLUSTER_INDEX=0"), "{env}");
    assert!(!lines.iter().any(|l| l.starts_with("LISTEN_")), "{env}");

    let out = cli(&["stop", "--control", sock], Duration::from_secs(10));
    assert!(out.status.success(), "{}", out.stderr);
    let (code, log) = master.finish(Duration::from_secs(15));
    assert_eq!(code, Some(0), "{log:#?}");
}

/// `kill(pid, sig)`: a real signal, as an operator sends it.
fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) takes a pid and a signal number, no pointers.
    unsafe { libc::kill(pid as i32, sig) };
}

/// Waits until `stat` shows every instance's row (index not `-`) with at
/// least `n` restarts.
fn stat_until_restarts(sock: &str, n: u64) -> String {
    stat_until(sock, &format!("{n} restarts"), |stdout| {
        let rows: Vec<Vec<&str>> = stdout
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<&str>>())
            .filter(|cols| cols.len() > 5 && cols[0].parse::<u32>().is_ok() && cols[1] != "-")
            .collect();
        !rows.is_empty()
            && rows
                .iter()
                .all(|cols| cols[5].parse::<u64>().is_ok_and(|r| r >= n))
    })
}

#[test]
fn a_shutdown_of_workers_that_never_became_ready_is_unclean() {
    let dir = TempDir::new("never-ready");
    let sock = dir.sock.as_str();
    let master = Master::start_and_await_control(
        &["-w", "2", "--backoff-ms", "20", "--kill-timeout", "5"],
        sock,
        &["sh", "-c", "exit 1"],
    );
    stat_until_restarts(sock, 2);
    master.signal(libc::SIGTERM);
    let (code, log) = master.finish(Duration::from_secs(15));
    assert_eq!(code, Some(1), "no worker was ever ready: {log:#?}");
    let last = log.iter().rfind(|l| l.contains("master exiting")).unwrap();
    assert!(last.contains("unclean shutdown"), "{last}");
    assert!(
        last.contains("worker 0 crashed before it was ever ready")
            && last.contains("worker 1 crashed before it was ever ready"),
        "{last}"
    );

    // A worker that runs but is not ready within the ready timeout (no
    // --ready-on-start) is not healthy either, though it dies of SIGTERM.
    let mut master = Master::start(
        &["-w", "1", "--ready-timeout", "0.2", "--kill-timeout", "5"],
        sock,
        &["sleep", "30"],
    );
    master.expect_line("spawned", Duration::from_secs(10));
    stat_until_live(sock, 1);
    std::thread::sleep(Duration::from_millis(400));
    master.signal(libc::SIGTERM);
    let (code, log) = master.finish(Duration::from_secs(15));
    assert_eq!(code, Some(1), "{log:#?}");
    let last = log.iter().rfind(|l| l.contains("master exiting")).unwrap();
    assert!(
        last.contains("unclean shutdown: worker 0 never became ready"),
        "{last}"
    );
}

#[test]
fn a_master_whose_every_slot_is_given_up_exits_3() {
    let dir = TempDir::new("all-given-up");
    let sock = dir.sock.as_str();
    let master = Master::start_and_await_control(
        &["-w", "2", "--max-restarts", "2", "--backoff-ms", "10"],
        sock,
        &["sh", "-c", "exit 1"],
    );
    // Nothing is left to supervise: the master ends on its own.
    let (code, log) = master.finish(Duration::from_secs(20));
    assert_eq!(code, Some(3), "{log:#?}");
    assert_eq!(
        log.iter()
            .filter(|l| l.contains("crash loop: not restarting it"))
            .count(),
        2,
        "{log:#?}"
    );
    assert!(
        log.iter().any(|l| l.contains("every worker slot was given up")),
        "{log:#?}"
    );
    assert!(!Path::new(sock).exists(), "the socket file is removed at exit");
}

#[test]
fn stop_wait_reports_the_masters_outcome() {
    let dir = TempDir::new("stop-wait");
    let sock = dir.sock.as_str();
    // A worker that ignores SIGTERM is killed at the grace deadline: an
    // unclean shutdown, exit 1.
    let master = Master::start_and_await_control(
        &["-w", "1", "--ready-on-start", "--kill-timeout", "0.5"],
        sock,
        &["sh", "-c", "trap '' TERM; exec sleep 30"],
    );
    stat_until_live(sock, 1);
    let out = cli(&["stop", "--control", sock, "--wait"], Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1), "{} {}", out.stdout, out.stderr);
    assert!(out.stdout.contains("shutdown started"), "{}", out.stdout);
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(said.contains("unclean shutdown"), "{said}");
    assert!(said.contains("exit code 1"), "{said}");
    let (code, log) = master.finish(Duration::from_secs(15));
    assert_eq!(code, Some(1), "{log:#?}");
}

#[test]
fn stop_wait_on_a_master_killed_meanwhile_says_it_ended_without_saying_how() {
    let dir = TempDir::new("stop-wait-killed");
    let sock = dir.sock.as_str();
    // The worker ignores SIGTERM, so the master is still in its grace
    // period when it is SIGKILLed.
    let mut master = Master::start_and_await_control(
        &["-w", "1", "--ready-on-start", "--kill-timeout", "30"],
        sock,
        &["sh", "-c", "trap '' TERM; exec sleep 30"],
    );
    stat_until_live(sock, 1);
    let mut stop = Reaped::spawn(&["stop", "--control", sock, "--wait", "--timeout", "20"]);
    master.expect_line("shutdown started", Duration::from_secs(10));
    master.signal(libc::SIGKILL);
    let status = stop.wait_within(Duration::from_secs(15), "stop --wait");
    let (stdout, stderr) = stop.read_output();
    let said = format!("{stdout}{stderr}");
    assert_eq!(status.code(), Some(1), "{said}");
    assert!(said.contains("ended without saying how"), "{said}");
    let (code, _) = master.finish(Duration::from_secs(10));
    assert_eq!(code, None, "killed by a signal");
}

#[test]
fn stat_shows_no_inbox_bytes_on_a_slot_that_never_had_a_worker() {
    let dir = TempDir::new("inbox");
    let sock = dir.sock.as_str();
    // Crashing workers: every death is cleaned up after in every lane.
    let master = Master::start_and_await_control(
        &["-w", "2", "--backoff-ms", "20", "--kill-timeout", "5"],
        sock,
        &["sh", "-c", "exit 1"],
    );
    let stat = stat_until_restarts(sock, 3);
    let free: Vec<&str> = stat.lines().filter(|l| l.contains(" Free ")).collect();
    assert_eq!(free.len(), 1, "the reload spare: {stat}");
    let cols: Vec<&str> = free[0].split_whitespace().collect();
    assert_eq!(cols.last(), Some(&"0"), "nothing waits for the spare: {stat}");
    for row in stat
        .lines()
        .filter(|l| l.contains(" Dead ") || l.contains(" Starting "))
    {
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols.last(), Some(&"0"), "no worker sent anything: {stat}");
    }
    master.signal(libc::SIGTERM);
    master.finish(Duration::from_secs(15));
}

#[test]
fn event_lines_show_only_the_fields_an_event_carries() {
    let dir = TempDir::new("events");
    let sock = dir.sock.as_str();
    let mut master =
        Master::start_and_await_control(&["-w", "1", "--max-restarts", "0"], sock, &["sh", "-c", "exit 1"]);
    let given_up = master.expect_line("crash loop", Duration::from_secs(10));
    assert!(given_up.contains("slot 0"), "{given_up}");
    assert!(!given_up.contains("pid"), "no process is left: {given_up}");
    let (_, log) = master.finish(Duration::from_secs(15));
    for line in &log {
        assert!(
            !line.contains("4294967295") && !line.contains("pid 0") && !line.contains("generation 0"),
            "a field the event does not carry: {line}"
        );
    }
}

#[test]
fn start_up_errors_name_the_real_problem() {
    let dir = TempDir::new("messages");
    let out = cli(&["run", "-w", "-1", "--", "true"], Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("cannot be negative"), "{}", out.stderr);
    assert!(!out.stderr.contains("4294967295"), "{}", out.stderr);

    let out = cli(&["run", "-w", "5000", "--", "true"], Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    let most = format!("at most {}", shmcluster::MAX_WORKERS - 1);
    assert!(out.stderr.contains(&most), "{}", out.stderr);

    let out = cli(&["run", "--", "/nonexistent/cmd"], Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("no such file"), "{}", out.stderr);
    assert!(!out.stderr.contains("PATH"), "{}", out.stderr);

    let out = cli(&["run", "--", "no-such-program-here"], Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("not found in PATH"), "{}", out.stderr);

    let plain = dir.path.join("plain.txt");
    std::fs::write(&plain, "echo hi\n").unwrap();
    let out = cli(&["run", "--", plain.to_str().unwrap()], Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("not executable"), "{}", out.stderr);

    let out = cli(
        &["run", "--", dir.path.to_str().unwrap()],
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("is a directory"), "{}", out.stderr);
}

/// Clients held open by `wait` (as `stop --wait` holds one until the master
/// exits) have a bound of their own (64), apart from the 32 request
/// connections: with 64 of them waiting, `stat`, `reload` and `stop` are
/// still answered, a 65th waiter is refused with a clear `err` line, and
/// every waiter is told how the master ended.
#[test]
fn waiting_clients_do_not_lock_out_requests() {
    use std::os::unix::net::UnixStream;
    const WAITERS: usize = 64;
    let dir = TempDir::new("many-waiters");
    let sock = dir.sock.as_str();
    let master = Master::start_and_await_control(&["-w", "1", "--ready-on-start"], sock, &["sleep", "60"]);
    stat_until_live(sock, 1);
    let wait = || {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"wait\n").unwrap();
        s
    };
    let mut waiters = Vec::new();
    for i in 0..WAITERS {
        let mut reader = BufReader::new(wait());
        let mut first = String::new();
        let _ = reader.read_line(&mut first);
        assert_eq!(first, "ok waiting\n", "waiter {i} was not taken");
        waiters.push(reader);
    }
    let mut refused = String::new();
    let _ = wait().read_to_string(&mut refused);
    assert!(
        refused.starts_with("err ") && refused.contains("waiting"),
        "the waiter past the bound gets a clear refusal: {refused:?}"
    );
    let stat = cli(&["stat", "--control", sock], Duration::from_secs(10));
    assert!(stat.status.success(), "{} {}", stat.stdout, stat.stderr);
    let refused = cli(&["stop", "--control", sock, "--wait"], Duration::from_secs(10));
    assert_eq!(
        refused.status.code(),
        Some(1),
        "{} {}",
        refused.stdout,
        refused.stderr
    );
    assert!(refused.stderr.contains("waiting"), "{}", refused.stderr);
    let stop = cli(&["stop", "--control", sock], Duration::from_secs(10));
    assert!(stop.status.success(), "{} {}", stop.stdout, stop.stderr);
    for (i, mut reader) in waiters.into_iter().enumerate() {
        let mut rest = String::new();
        let _ = reader.read_to_string(&mut rest);
        assert!(rest.starts_with("exited code=0 "), "waiter {i}: {rest:?}");
    }
    let (code, log) = master.finish(Duration::from_secs(15));
    assert_eq!(code, Some(0), "{log:#?}");
}
