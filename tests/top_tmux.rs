//! `shmcluster top` in a real terminal: a detached tmux session (a
//! server of its own, `tmux -S <socket file>`; 120x40) runs `top --pid <master>` against a real
//! `shmcluster run -w 3` master; keys go in with `tmux send-keys`, and
//! the test asserts on what a person sees (`tmux capture-pane -p`): the
//! three workers and their pids, a SIGKILLed worker's restart (new pid,
//! restarts 1, its exit in the events), `r` reloading (the master's
//! `stat` counts it, the screen shows the new generations), `s` then `y`
//! stopping the master (exit 0, the screen says "master gone"), and `q`
//! giving the terminal back (top exits 0, the shell's own output is on
//! the screen again); a second view in another session gives it back on
//! SIGTERM too (exit 143), and a third ends by itself when its session
//! (its terminal) is killed.
//!
//! Needs tmux (Debian package `tmux`; .ci/run installs it). Every wait
//! polls the screen against a deadline; a watchdog kills the tmux server
//! and the master's process group if the whole test hangs; both are also
//! ended when the test ends, failing or not.

#[macro_use]
mod common;
#[path = "common/http.rs"]
mod http;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use http::Cluster;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_shmcluster");

/// The whole test's limit.
const WATCHDOG: Duration = Duration::from_secs(90);

/// How long the screen has to show one thing.
const SCREEN_DEADLINE: Duration = Duration::from_secs(15);

/// A tmux server of the test's own (`tmux -S <socket>`: a socket file
/// of its own, so that tests never share a server), killed and its
/// socket file removed on drop.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn command(socket: &Path) -> Command {
        let mut cmd = Command::new("tmux");
        // No user configuration: the same screen everywhere.
        cmd.arg("-S").arg(socket).args(["-f", "/dev/null"]);
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = Self::command(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("tmux runs (Debian package tmux)");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// A server with no session yet.
    fn new(socket: PathBuf) -> Self {
        Self { socket }
    }

    /// A detached 120x40 session `name` running `shell_command` (the
    /// first one starts the server).
    fn session(&self, name: &str, shell_command: &str) {
        self.run(&[
            "new-session",
            "-d",
            "-x",
            "120",
            "-y",
            "40",
            "-s",
            name,
            shell_command,
        ]);
    }

    /// The pane of session `name`, exactly (a bare name would also match
    /// a window's name in whichever session is current).
    fn target(name: &str) -> String {
        format!("={name}:")
    }

    /// What session `name`'s pane shows now.
    fn screen(&self, name: &str) -> String {
        String::from_utf8_lossy(
            &self
                .run(&["capture-pane", "-p", "-t", &Self::target(name)])
                .stdout,
        )
        .into_owned()
    }

    /// Types `key` (a tmux key name or a character) into session `name`.
    fn key(&self, name: &str, key: &str) {
        self.run(&["send-keys", "-t", &Self::target(name), key]);
    }

    /// The pid of the process the shell of session `name` runs (top).
    fn child_of_pane(&self, name: &str) -> u32 {
        let out = self.run(&["list-panes", "-t", &Self::target(name), "-F", "#{pane_pid}"]);
        let shell: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children")).unwrap();
        children
            .split_whitespace()
            .next()
            .expect("top runs in the pane")
            .parse()
            .unwrap()
    }

    /// Polls session `name`'s screen until `done` accepts it (within
    /// [`SCREEN_DEADLINE`]); returns it. Panics with the last screen and
    /// what was awaited otherwise.
    fn until(&self, name: &str, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + SCREEN_DEADLINE;
        loop {
            let screen = self.screen(name);
            if done(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "the screen never showed {what} within {SCREEN_DEADLINE:?}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Self::command(&self.socket)
            .arg("kill-server")
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// `shmcluster stat --pid <pid>`'s output (the table).
fn stat(pid: u32) -> String {
    let out = Command::new(BIN)
        .args(["stat", "--pid", &pid.to_string()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stat: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A worker row of `stat`'s table or of top's screen: (pid, generation,
/// restarts) of the rows whose state is Ready.
fn ready_rows(text: &str) -> Vec<(u32, u32, u32)> {
    ready_columns(text, |n| Some((n(3)?, n(4)?, n(5)?)))
}

/// (instance, pid) of the Ready rows of `stat`'s table or top's screen.
fn ready_instances(text: &str) -> Vec<(u32, u32)> {
    ready_columns(text, |n| Some((n(1)?, n(3)?)))
}

/// What `pick` makes of each Ready row's numeric columns (`n(i)`: column
/// `i` as a number).
fn ready_columns<T>(text: &str, pick: impl Fn(&dyn Fn(usize) -> Option<u32>) -> Option<T>) -> Vec<T> {
    text.lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l
                .split(|c: char| c.is_whitespace() || c == '│' || c == '>')
                .filter(|c| !c.is_empty())
                .collect();
            if cols.get(2) != Some(&"Ready") {
                return None;
            }
            pick(&|i: usize| cols.get(i)?.parse().ok())
        })
        .collect()
}

/// `shmcluster run -w <workers> --ready-on-start --kill-timeout 5 --
/// sleep 300` in a process group of its own (its workers, and a new
/// master of an upgrade, join it), with `XDG_RUNTIME_DIR` set to
/// `runtime` if given and its stderr to `stderr`.
fn start_master(workers: &str, runtime: Option<&Path>, stderr: Stdio) -> std::process::Child {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "run",
        "-w",
        workers,
        "--ready-on-start",
        "--kill-timeout",
        "5",
        "--",
        "sleep",
        "300",
    ]);
    if let Some(runtime) = runtime {
        cmd.env("XDG_RUNTIME_DIR", runtime);
    }
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

/// The test's watchdog: if it still runs after [`WATCHDOG`], kills the
/// tmux server at `socket` and the process group `pgid` (the masters and
/// their workers), then fails it.
fn watchdog(test: &'static str, socket: PathBuf, pgid: u32) {
    std::thread::spawn(move || {
        std::thread::sleep(WATCHDOG);
        let _ = Tmux::command(&socket).arg("kill-server").status();
        let _ = std::fs::remove_file(&socket);
        let _ = killpg(Pid::from_raw(pgid as i32), Signal::SIGKILL);
        eprintln!("WATCHDOG: {test} still running after {WATCHDOG:?}; killed tmux and the cluster");
        std::process::exit(1);
    });
}

#[test]
fn top_shows_restarts_reloads_and_stops_the_cluster_in_a_real_terminal() {
    let tmux_socket = std::env::temp_dir().join(format!("shmcluster-top-{}.tmux", std::process::id()));
    let log = std::env::temp_dir().join(format!("shmcluster-top-{}.log", std::process::id()));
    let child = start_master("3", None, std::fs::File::create(&log).unwrap().into());
    let master_pid = child.id();
    watchdog(
        "top_shows_restarts_reloads_and_stops_the_cluster_in_a_real_terminal",
        tmux_socket.clone(),
        master_pid,
    );
    // Killed with its workers (one process group) and reaped on drop.
    let master = Cluster::adopt(child);
    let _log = RemoveOnDrop(log.clone());
    let table = stat_until(master_pid, "3 Ready workers", |t| ready_rows(t).len() == 3);
    let first: Vec<(u32, u32, u32)> = ready_rows(&table);

    let tmux = Tmux::new(tmux_socket);
    let top = format!("{BIN} top --pid {master_pid} --interval 0.2; echo top-exited=$?; exec sleep 300");
    tmux.session("top", &top);

    // A second view, ended by SIGTERM: it gives the terminal back too
    // (exit 128 + 15).
    tmux.session("term", &top);
    tmux.until("term", "the second view", |s| ready_rows(s).len() == 3);
    kill(Pid::from_raw(tmux.child_of_pane("term") as i32), Signal::SIGTERM).unwrap();
    let screen = tmux.until("term", "top's exit on SIGTERM", |s| s.contains("top-exited="));
    assert!(screen.contains("top-exited=143"), "{screen}");
    assert!(!screen.contains("RESTARTS"), "the view was left: {screen}");

    // A third view whose terminal goes away (its tmux session killed, as
    // when a window is closed): top ends by itself, instead of spinning on
    // the dead terminal forever (crossterm's reader retries a read that
    // returns 0; two such orphans once took a core each here).
    tmux.session("gone", &top);
    tmux.until("gone", "the third view", |s| ready_rows(s).len() == 3);
    let orphan = tmux.child_of_pane("gone");
    tmux.run(&["kill-session", "-t", &Tmux::target("gone")]);
    let deadline = Instant::now() + SCREEN_DEADLINE;
    while http::alive(orphan) {
        if Instant::now() >= deadline {
            let _ = kill(Pid::from_raw(orphan as i32), Signal::SIGKILL);
            panic!("top (pid {orphan}) still ran {SCREEN_DEADLINE:?} after its terminal went away");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // The three workers with their pids, and the master in the header.
    let screen = tmux.until("top", "the three workers", |s| {
        let rows = ready_rows(s);
        first.iter().all(|w| rows.contains(w))
    });
    assert!(screen.contains(&format!("master pid {master_pid}")), "{screen}");
    assert!(screen.contains("3 instances, 3 live"), "{screen}");
    assert!(
        screen.contains("RESTARTS") && screen.contains("HEARTBEAT"),
        "{screen}"
    );

    // A SIGKILLed worker: its slot shows a new pid and restarts 1, and the
    // events say how it ended.
    let (victim, _, _) = first[0];
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    let screen = tmux.until("top", "the killed worker's restart", |s| {
        let rows = ready_rows(s);
        rows.len() == 3
            && rows.iter().all(|&(pid, _, _)| pid != victim)
            && rows
                .iter()
                .any(|&(_, generation, restarts)| restarts == 1 && generation == 2)
            && s.contains(&format!("killed by signal 9 (slot 0, pid {victim}"))
    });
    let restarted: Vec<(u32, u32, u32)> = ready_rows(&screen);
    let table = stat(master_pid);
    assert!(table.contains("reloads: 0 started, 0 ok"), "{table}");

    // `r`: a rolling reload. The master counts it; the screen shows it and
    // every worker's new pid and generation as the master has them.
    tmux.key("top", "r");
    let table = stat_until(master_pid, "a finished reload", |t| {
        t.contains("reloads: 1 started, 1 ok, 0 failed") && ready_rows(t).len() == 3
    });
    let reloaded = ready_rows(&table);
    assert!(
        reloaded.iter().all(|w| !restarted.iter().any(|r| r.0 == w.0)),
        "every worker was replaced: before {restarted:?}, after {reloaded:?}"
    );
    let screen = tmux.until("top", "the reload and the new generation", |s| {
        let rows = ready_rows(s);
        s.contains("reloads: 1 started, 1 ok, 0 failed")
            && s.contains("reload finished: ok")
            && reloaded.iter().all(|w| rows.contains(w))
    });
    assert!(screen.contains("reload queued"), "{screen}");

    // `j` `w`: the selected (second) row's worker is reloaded alone: its
    // instance gets a new pid, the other two keep theirs.
    let before = ready_instances(&table);
    tmux.key("top", "j");
    tmux.key("top", "w");
    let screen = tmux.until("top", "the worker's reload queued", |s| {
        s.contains("reload of worker ") && s.contains(" queued")
    });
    let chosen: u32 = screen
        .split("reload of worker ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("which worker? {screen}"));
    let table = stat_until(master_pid, "the worker's reload", |t| {
        t.contains("reloads: 2 started, 2 ok, 0 failed") && ready_rows(t).len() == 3
    });
    let after = ready_instances(&table);
    for (index, pid) in &before {
        let now = after.iter().find(|(i, _)| i == index).map(|&(_, p)| p);
        if *index == chosen {
            assert!(
                now.is_some_and(|p| p != *pid),
                "worker {index} replaced: {before:?} -> {after:?}"
            );
        } else {
            assert_eq!(
                now,
                Some(*pid),
                "worker {index} untouched: {before:?} -> {after:?}"
            );
        }
    }
    tmux.until("top", "the replaced worker on the screen", |s| {
        let rows = ready_instances(s);
        after.iter().all(|w| rows.contains(w))
    });

    // `s` asks first; `y` stops the master, which exits 0; top stays up
    // and says the master is gone.
    tmux.key("top", "s");
    tmux.until("top", "the stop question", |s| {
        s.contains("Stop the cluster? (y/n)")
    });
    tmux.key("top", "y");
    let (status, _) = master.wait(Duration::from_secs(15)).unwrap();
    let written = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "the master exited {status}:\n{written}");
    assert!(written.contains("clean shutdown"), "{written}");
    tmux.until("top", "master gone", |s| s.contains("master gone"));

    // `q`: top exits 0 and the shell's screen is back (the alternate
    // screen left: no table any more).
    tmux.key("top", "q");
    let screen = tmux.until("top", "top's exit", |s| s.contains("top-exited="));
    assert!(screen.contains("top-exited=0"), "{screen}");
    assert!(!screen.contains("RESTARTS"), "the view was left: {screen}");
}

/// `stat` until it answers and `done` accepts its table (within
/// [`SCREEN_DEADLINE`]; the master's control socket appears a moment
/// after it starts).
fn stat_until(pid: u32, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + SCREEN_DEADLINE;
    loop {
        let out = Command::new(BIN)
            .args(["stat", "--pid", &pid.to_string()])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && done(&table) {
            return table;
        }
        assert!(
            Instant::now() < deadline,
            "stat never showed {what}: {table}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A file removed when the test ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `top` on a pipe does not draw: exit 2 and a message saying why.
#[test]
fn top_needs_a_terminal() {
    let out = Command::new(BIN)
        .args(["top", "--pid", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "nothing drawn on a pipe");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("needs a terminal"), "{stderr}");
}

/// A binary upgrade under running views: top shows the new master (its
/// pid, a fresh event log) once it answers on the shared control socket,
/// and keeps showing it after the old master has exited and the new one
/// has renamed the default control socket to its own pid's, instead of
/// saying the master is gone; `stat --watch` goes on printing the new
/// master's table until that one stops.
#[test]
fn views_follow_the_master_through_a_binary_upgrade() {
    let runtime = std::env::temp_dir().join(format!("shmcluster-top-upgrade-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&runtime);
    std::fs::create_dir_all(&runtime).unwrap();
    let tmux_socket = runtime.join("tmux");
    let child = start_master("2", Some(&runtime), Stdio::null());
    let old = child.id();
    // Both masters share the old one's process group.
    watchdog(
        "views_follow_the_master_through_a_binary_upgrade",
        tmux_socket.clone(),
        old,
    );
    let mut old_master = child;
    // Both masters and their workers, whatever happens: the new master is
    // forked by the old one, in its process group.
    let _group = KillGroupOnDrop(old);
    let shmcluster = |args: &[&str]| -> Output {
        Command::new(BIN)
            .args(args)
            .env("XDG_RUNTIME_DIR", &runtime)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let deadline = Instant::now() + SCREEN_DEADLINE;
    while !shmcluster(&["stat", "--pid", &old.to_string()]).status.success() {
        assert!(Instant::now() < deadline, "the master never answered stat");
        std::thread::sleep(Duration::from_millis(50));
    }

    let tmux = Tmux::new(tmux_socket);
    let top = format!(
        "XDG_RUNTIME_DIR={} {BIN} top --pid {old} --interval 0.2; echo top-exited=$?; exec sleep 300",
        runtime.display()
    );
    tmux.session("up", &top);
    tmux.until("up", "the old master", |s| {
        s.contains(&format!("master pid {old}")) && ready_rows(s).len() == 2
    });

    let watch_out = runtime.join("watch.out");
    let mut watch = Command::new(BIN)
        .args(["stat", "--pid", &old.to_string(), "--watch", "0.2"])
        .env("XDG_RUNTIME_DIR", &runtime)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&watch_out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let out = shmcluster(&["upgrade", "--wait", "--pid", &old.to_string()]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "upgrade --wait: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new: u32 = said
        .split("new master pid ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no new pid in {said:?}"));
    assert_ne!(new, old);
    let status = common::wait_child(&mut old_master, SCREEN_DEADLINE).unwrap();
    assert!(status.success(), "the old master exited {status}");

    // The new master renames the default control socket once the old one
    // has gone.
    let renamed = runtime.join(format!("shmcluster-{new}.sock"));
    let deadline = Instant::now() + SCREEN_DEADLINE;
    while !renamed.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", renamed.display());
        std::thread::sleep(Duration::from_millis(50));
    }
    tmux.until("up", "the new master", |s| {
        s.contains(&format!("master pid {new}")) && ready_rows(s).len() == 2
    });
    // Several refreshes (every 0.2 s) after the rename: still the new
    // master, never "master gone".
    let watch_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < watch_until {
        let screen = tmux.screen("up");
        assert!(
            !screen.contains("master gone"),
            "top lost the master after the upgrade:\n{screen}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let screen = tmux.screen("up");
    assert!(screen.contains(&format!("master pid {new}")), "{screen}");
    assert!(screen.contains("a new master"), "{screen}");

    tmux.key("up", "q");
    let screen = tmux.until("up", "top's exit", |s| s.contains("top-exited="));
    assert!(screen.contains("top-exited=0"), "{screen}");
    // stat --watch: still running after the rename, printing the new
    // master's tables.
    let printed = || std::fs::read_to_string(&watch_out).unwrap_or_default();
    let after_rename = printed().len();
    let deadline = Instant::now() + SCREEN_DEADLINE;
    while !printed()[after_rename..].contains(&format!("master pid {new}:")) {
        assert!(
            Instant::now() < deadline,
            "stat --watch printed no table of the new master after the rename:\n{}",
            printed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        watch.try_wait().unwrap().is_none(),
        "stat --watch ended:\n{}",
        printed()
    );

    let out = shmcluster(&["stop", "--wait", "--pid", &new.to_string()]);
    assert!(
        out.status.success(),
        "stop --wait: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // And it ends with the master.
    let status = common::wait_child(&mut watch, SCREEN_DEADLINE).unwrap();
    assert!(status.success(), "stat --watch exited {status}");
    assert!(printed().trim_end().ends_with("master gone"), "{}", printed());
    drop(tmux);
    let _ = std::fs::remove_dir_all(&runtime);
}

/// `SIGKILL` to process group `.0` when dropped (a test that failed
/// midway leaves no master behind; after a clean stop nothing is left to
/// kill).
struct KillGroupOnDrop(u32);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.0 as i32), Signal::SIGKILL);
    }
}
