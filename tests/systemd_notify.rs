//! systemd's notify protocol both ways, with no systemd: the test binds
//! the datagram socket a service manager would and hands it to `shmcluster
//! run` as `NOTIFY_SOCKET`; the workers are tests/notify_worker.py, a
//! Python program that speaks the protocol and has no shmcluster binding.
//!
//! Every master and `stat` runs under a deadline and is killed and reaped
//! when dropped.

use std::io::{BufRead, BufReader};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_shmcluster");

fn worker_script() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/notify_worker.py")
        .to_str()
        .unwrap()
        .to_owned()
}

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("shmcluster-notify-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn str(&self, name: &str) -> String {
        self.file(name).to_str().unwrap().to_owned()
    }

    fn touch(&self, name: &str) {
        std::fs::write(self.file(name), b"").unwrap();
    }

    /// Waits (up to 20 s) for the file `name` and returns its text.
    fn await_file(&self, name: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = std::fs::read_to_string(self.file(name)) {
                return text;
            }
            assert!(Instant::now() < deadline, "{name} never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The service manager's end: a bound datagram socket, and every message
/// received on it, in order, with when it came.
struct Manager {
    socket: UnixDatagram,
    /// The `NOTIFY_SOCKET` value naming it.
    name: String,
    got: Vec<(Instant, String)>,
}

impl Manager {
    fn at_path(path: &str) -> Self {
        let socket = UnixDatagram::bind(path).unwrap();
        Self::new(socket, path.to_owned())
    }

    fn abstract_name(name: &str) -> Self {
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        Self::new(socket, format!("@{name}"))
    }

    fn new(socket: UnixDatagram, name: String) -> Self {
        socket.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        Self {
            socket,
            name,
            got: Vec::new(),
        }
    }

    /// Receives for `d`; returns what came in that time.
    fn collect(&mut self, d: Duration) -> Vec<String> {
        let from = self.got.len();
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.recv_one();
        }
        self.got[from..].iter().map(|(_, m)| m.clone()).collect()
    }

    fn recv_one(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                eprintln!("[manager] {text:?}");
                self.got.push((Instant::now(), text));
                true
            }
            Err(_) => false,
        }
    }

    /// Waits (up to `timeout`) for a message, after the first `from`, with
    /// a line equal to `line`; returns its position and text.
    fn expect_from(&mut self, from: usize, line: &str, timeout: Duration) -> (usize, String) {
        let deadline = Instant::now() + timeout;
        let mut seen = from;
        loop {
            while seen < self.got.len() {
                if self.got[seen].1.lines().any(|l| l == line) {
                    return (seen, self.got[seen].1.clone());
                }
                seen += 1;
            }
            assert!(
                Instant::now() < deadline,
                "no {line:?} within {timeout:?}; got {:#?}",
                self.got
            );
            self.recv_one();
        }
    }
}

/// A child killed and reaped when dropped (a failing test included).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// `shmcluster run`, its stderr lines on a channel.
struct Master {
    child: Reaped,
    lines: Receiver<String>,
    log: Vec<String>,
    control: String,
}

impl Master {
    fn start(dir: &TempDir, options: &[&str], env: &[(&str, &str)], mode: &str) -> Self {
        let control = dir.str("c.sock");
        let script = worker_script();
        let mut child = Command::new(BIN)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env("NOTIFY_TEST_DIR", &dir.0)
            .envs(env.iter().copied())
            .arg("run")
            .args(options)
            .args(["--control", &control, "--", "python3", &script, mode])
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
            control,
        }
    }

    fn drain_log(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push(line);
        }
        &self.log
    }

    /// Waits for a stderr line containing `needle`.
    fn expect_line(&mut self, needle: &str, timeout: Duration) {
        if self.drain_log().iter().any(|l| l.contains(needle)) {
            return;
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.log.push(line);
                    if hit {
                        return;
                    }
                }
                Err(_) => panic!("no master line with {needle:?}: {:#?}", self.log),
            }
        }
    }

    /// `shmcluster <args> --control <sock>`, within 60 s: (success, stdout).
    fn cli(&self, args: &[&str]) -> (bool, String) {
        let mut child = Reaped(
            Command::new(BIN)
                .args(args)
                .args(["--control", &self.control])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                let mut out = String::new();
                std::io::Read::read_to_string(&mut child.0.stdout.take().unwrap(), &mut out).unwrap();
                return (status.success(), out);
            }
            assert!(Instant::now() < deadline, "shmcluster {args:?} hung");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `stat` until `done` accepts its output (20 s at most).
    fn stat_until(&self, want: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (ok, out) = self.cli(&["stat"]);
            if ok && done(&out) {
                return out;
            }
            assert!(Instant::now() < deadline, "stat never showed {want}: {out}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the exit (30 s at most); its code.
    fn finish(mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "the master did not exit: {:#?}",
                self.drain_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `(state, pid)` of each slot's row of a `stat` output (those that
/// begin with a slot number).
fn rows(stat: &str) -> Vec<(String, u32)> {
    stat.lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.first()?.parse::<u32>().ok()?;
            let pid = cols.get(3)?.parse().ok()?;
            Some((cols.get(2)?.to_string(), pid))
        })
        .collect()
}

fn ready_pids(stat: &str) -> Vec<u32> {
    rows(stat)
        .into_iter()
        .filter(|(s, _)| s == "Ready")
        .map(|(_, p)| p)
        .collect()
}

/// `KEY=VALUE` lines of a file the worker wrote.
fn var(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {text}"))
        .to_owned()
}

/// `CLOCK_MONOTONIC` in microseconds, as `MONOTONIC_USEC` counts it.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) }, 0);
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

#[test]
fn the_master_says_ready_reloading_stopping_and_status_and_beats_its_watchdog() {
    let dir = TempDir::new("master");
    let mut manager = Manager::at_path(&dir.str("notify.sock"));
    let mut master = Master::start(
        &dir,
        &["-w", "2", "--hang-timeout", "3", "--kill-timeout", "5"],
        &[("NOTIFY_SOCKET", &manager.name), ("WATCHDOG_USEC", "200000")],
        "beat",
    );

    // Workers wait for `go` before READY=1: until then, no READY=1 from
    // the master, but its watchdog (every 100 ms) and its status.
    let env0 = dir.await_file("env-0");
    let env1 = dir.await_file("env-1");
    let before_go = manager.collect(Duration::from_millis(1500));
    assert!(
        !before_go.iter().any(|m| m.lines().any(|l| l == "READY=1")),
        "READY=1 before the workers were: {before_go:#?}"
    );
    let beats = before_go
        .iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .count();
    assert!(
        beats >= 5,
        "{beats} WATCHDOG=1 in 1.5 s at WATCHDOG_USEC=200000: {before_go:#?}"
    );
    assert!(
        before_go
            .iter()
            .any(|m| m.contains("STATUS=0/2 workers ready, 0 restarts")),
        "{before_go:#?}"
    );

    // Each worker has a socket of its own (not the master's) and, with the
    // hang timeout, a watchdog for its own pid.
    for env in [&env0, &env1] {
        let socket = var(env, "NOTIFY_SOCKET");
        assert!(socket.starts_with('@') && socket != manager.name, "{env}");
        assert_eq!(var(env, "WATCHDOG_USEC"), "3000000", "{env}");
        assert_eq!(var(env, "WATCHDOG_PID"), var(env, "pid"), "{env}");
    }
    assert_ne!(var(&env0, "NOTIFY_SOCKET"), var(&env1, "NOTIFY_SOCKET"));

    let from = manager.got.len();
    dir.touch("go");
    let (ready_at, ready) = manager.expect_from(from, "READY=1", Duration::from_secs(20));
    assert!(ready.contains("STATUS=2/2 workers ready, 0 restarts"), "{ready}");
    // Ready only once both were: stat says so right after.
    let stat = master.stat_until("2 Ready", |s| !s.is_empty());
    let pids = ready_pids(&stat);
    assert_eq!(
        pids.len(),
        2,
        "READY=1 came before both workers were ready: {stat}"
    );

    // Their WATCHDOG=1 (every 100 ms) is their heartbeat: 3.5 s past a
    // 3 s hang timeout, the same workers, none killed. (A 1 s timeout was
    // too close: on a loaded 2-core machine, with two builds beside the
    // test, both Python workers once stalled over 1 s and were killed.)
    manager.collect(Duration::from_millis(3500));
    let stat = master.stat_until("2 Ready", |s| ready_pids(s).len() == 2);
    assert_eq!(ready_pids(&stat), pids, "{stat}");
    assert!(
        !master.drain_log().iter().any(|l| l.contains("heartbeat stopped")),
        "{:#?}",
        master.log
    );

    // A rolling reload: RELOADING=1 with MONOTONIC_USEC, then READY=1.
    let from = manager.got.len();
    let before_reload = monotonic_usec();
    let (ok, out) = master.cli(&["reload", "--wait"]);
    assert!(ok, "{out}");
    let after_reload = monotonic_usec();
    let (at, reloading) = manager.expect_from(from, "RELOADING=1", Duration::from_secs(10));
    let usec: u64 = var(&reloading, "MONOTONIC_USEC").parse().unwrap();
    assert!(
        (before_reload..=after_reload).contains(&usec),
        "MONOTONIC_USEC={usec} not within the reload ({before_reload}..={after_reload})"
    );
    let (_, ready_again) = manager.expect_from(at + 1, "READY=1", Duration::from_secs(10));
    assert!(ready_again.contains("STATUS=2/2 workers ready"), "{ready_again}");
    assert!(
        manager.got[at..]
            .iter()
            .any(|(_, m)| m.contains("STATUS=reloading: ")),
        "{:#?}",
        manager.got
    );
    let stat = master.stat_until("2 new Ready", |s| ready_pids(s).len() == 2);
    assert!(ready_pids(&stat).iter().all(|p| !pids.contains(p)), "{stat}");
    assert!(ready_at < at);

    // Stop: STOPPING=1, and a clean exit.
    let from = manager.got.len();
    let (ok, out) = master.cli(&["stop", "--wait"]);
    assert!(ok, "{out}");
    let (_, stopping) = manager.expect_from(from, "STOPPING=1", Duration::from_secs(10));
    assert!(stopping.contains("STATUS=stopping: "), "{stopping}");
    assert_eq!(master.finish(), Some(0));
}

#[test]
fn a_worker_without_heartbeats_is_killed_by_the_hang_timeout() {
    // The control for the test above: READY=1 and then silence.
    let dir = TempDir::new("silent");
    let mut master = Master::start(&dir, &["-w", "1", "--hang-timeout", "1"], &[], "silent");
    dir.touch("go");
    master.stat_until("Ready", |s| ready_pids(s).len() == 1);
    master.expect_line("heartbeat stopped", Duration::from_secs(15));
    let (ok, out) = master.cli(&["stop", "--wait"]);
    assert!(ok, "{out}");
    master.finish();
}

#[test]
fn a_datagram_from_another_pid_is_ignored() {
    let dir = TempDir::new("impostor");
    // The master's own socket in the abstract namespace this time.
    let mut manager = Manager::abstract_name(&format!("shmcluster-test-notify-{}", std::process::id()));
    let master = Master::start(
        &dir,
        &["-w", "1"],
        &[("NOTIFY_SOCKET", &manager.name)],
        "impostor",
    );
    // The worker's child sent READY=1 and WATCHDOG=1 from its own pid.
    dir.await_file("impostor-done");
    let got = manager.collect(Duration::from_millis(1500));
    assert!(!got.iter().any(|m| m.lines().any(|l| l == "READY=1")), "{got:#?}");
    let stat = master.stat_until("a row", |s| !rows(s).is_empty());
    assert_eq!(rows(&stat)[0].0, "Starting", "{stat}");
    // Nor was its WATCHDOG=1 a heartbeat: none seen for the 1.5 s since.
    let age_ms: f64 = stat
        .lines()
        .find(|l| l.contains("Starting"))
        .and_then(|l| l.split_whitespace().nth(6))
        .and_then(|a| a.strip_suffix("ms"))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no heartbeat age: {stat}"));
    assert!(age_ms >= 1400.0, "a heartbeat {age_ms} ms ago: {stat}");

    // The worker itself is believed.
    let from = manager.got.len();
    dir.touch("go");
    manager.expect_from(from, "READY=1", Duration::from_secs(20));
    master.stat_until("Ready", |s| ready_pids(s).len() == 1);

    // STOPPING=1 from the worker marks it draining.
    dir.touch("stopping");
    master.stat_until("Draining", |s| rows(s).iter().any(|(st, _)| st == "Draining"));
    let (ok, out) = master.cli(&["stop", "--wait"]);
    assert!(ok, "{out}");
    assert_eq!(master.finish(), Some(0));
}

#[test]
fn no_worker_notify_gives_workers_no_socket_and_a_foreign_watchdog_pid_is_not_beaten() {
    let dir = TempDir::new("off");
    let mut manager = Manager::at_path(&dir.str("notify.sock"));
    let master = Master::start(
        &dir,
        &["-w", "1", "--no-worker-notify", "--ready-on-start"],
        &[
            ("NOTIFY_SOCKET", &manager.name),
            ("WATCHDOG_USEC", "200000"),
            // The watchdog is some other process's.
            ("WATCHDOG_PID", "1"),
        ],
        "env",
    );
    let env = dir.await_file("env-0");
    // Neither a socket of its own nor the master's.
    assert_eq!(var(&env, "NOTIFY_SOCKET"), "", "{env}");
    assert_eq!(var(&env, "WATCHDOG_USEC"), "", "{env}");
    assert_eq!(var(&env, "WATCHDOG_PID"), "", "{env}");
    manager.expect_from(0, "READY=1", Duration::from_secs(20));
    let got = manager.collect(Duration::from_secs(1));
    assert!(
        !manager
            .got
            .iter()
            .any(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1")),
        "{got:#?}"
    );
    let (ok, out) = master.cli(&["stop", "--wait"]);
    assert!(ok, "{out}");
    assert_eq!(master.finish(), Some(0));
}
