//! A master refuses to run in a process with more than one thread, so a
//! bench runs each cluster in a fresh copy of its own binary, re-executed
//! with a mode variable set ([`in_fresh_copy`]); the copy runs the cluster
//! ([`run_cluster`]) and its workers print one line per sample on stdout
//! ([`emit_line`]), with [`mono_ns`] times that every process shares.

use std::cell::RefCell;
use std::fmt::Display;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use shmcluster::{
    Cluster, ClusterBuilder, Event, EventKind, ExitReason, Leader, Messenger, Worker, WorkerState,
};

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes one timespec to a live local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Prints one line with one `write`.
pub fn emit_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("{line}\n").as_bytes());
    let _ = out.flush();
}

/// Runs this binary again with `var=mode`, killed after `limit`; returns
/// its stdout, read while it runs (a cluster prints more than a pipe holds).
pub fn in_fresh_copy(var: &str, mode: &str, limit: Duration) -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .env(var, mode)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        stdout.read_to_string(&mut text).map(|_| text)
    });
    let status = super::wait_within(&mut child, limit);
    let text = reader
        .join()
        .map_err(|_| "stdout reader panicked")?
        .map_err(|e| e.to_string())?;
    let status = status?;
    if !status.success() {
        return Err(format!("{mode}: {status}"));
    }
    Ok(text)
}

/// In the re-executed copy: runs `builder`'s cluster with `work` in each
/// worker, and exits the process: 0 if a worker finished as `judge` wants
/// and the cluster shut down cleanly, else 1 after saying why on stderr.
///
/// `judge` sees each worker exit but for those of the shutdown: `None`
/// passes over it (a kill the bench made), `Some(ok)` ends the cluster,
/// a success if `ok`.
pub fn run_cluster<E: Display>(
    bench: &str,
    mode: &str,
    builder: ClusterBuilder,
    mut judge: impl FnMut(&Event, ExitReason) -> Option<bool> + 'static,
    work: impl FnMut(Worker) -> Result<(), E>,
) -> ! {
    let outcome: Rc<RefCell<Option<String>>> = Rc::default();
    let seen = outcome.clone();
    let result = builder
        .on_event(move |cluster, event| {
            let EventKind::Exit(reason) = event.kind else {
                return;
            };
            if reason == ExitReason::Shutdown {
                return;
            }
            let Some(ok) = judge(event, reason) else {
                return;
            };
            if seen.borrow().is_none() {
                *seen.borrow_mut() = Some(if ok {
                    String::new()
                } else {
                    format!("worker {} (slot {}) {reason}", event.index, event.slot)
                });
            }
            cluster.shutdown();
        })
        .run(work);
    let failure = match (result, outcome.take()) {
        (Err(e), _) => Some(e.to_string()),
        (Ok(_), Some(e)) if !e.is_empty() => Some(e),
        (Ok(_), None) => Some("the cluster ended before the measures did".into()),
        (Ok(report), _) if !report.clean => Some(format!("unclean shutdown: {report:?}")),
        (Ok(_), _) => None,
    };
    if let Some(e) = failure {
        eprintln!("{bench} bench ({mode}): {e}");
        std::process::exit(1);
    }
    std::process::exit(0);
}

/// [`in_fresh_copy`] with the mode `<kind> <workers> <arg> <dir>`, where
/// `dir` is a scratch directory made for this cluster and removed after it.
pub fn in_fresh_cluster(
    bench: &str,
    var: &str,
    (kind, workers, arg): (&str, u32, &str),
    limit: Duration,
) -> Result<String, String> {
    let dir = std::env::temp_dir().join(format!(
        "shmc-bench-{bench}-{}-{kind}-{workers}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mode = format!("{kind} {workers} {arg} {}", dir.display());
    let text = in_fresh_copy(var, &mode, limit);
    let _ = std::fs::remove_dir_all(&dir);
    text
}

/// In the copy: reads the mode [`in_fresh_cluster`] wrote, its `arg` with
/// `read_arg`: `(kind, workers, arg, dir)`. Exits 2 on anything else.
pub fn read_cluster_mode<T>(
    bench: &str,
    var: &str,
    mode: &str,
    read_arg: impl FnOnce(&str) -> Option<T>,
) -> (String, u32, T, PathBuf) {
    let words: Vec<&str> = mode.split_whitespace().collect();
    let parsed = match words.as_slice() {
        [kind, n, arg, dir] => n
            .parse::<u32>()
            .ok()
            .zip(read_arg(arg))
            .map(|(n, a)| (kind.to_string(), n, a, PathBuf::from(dir))),
        _ => None,
    };
    parsed.unwrap_or_else(|| {
        eprintln!("{bench} bench: unknown {var} {mode:?}");
        std::process::exit(2);
    })
}

/// A cluster of `workers` for benches that SIGKILL workers: killed ones
/// come back within milliseconds, and no number of deaths is a crash loop.
pub fn respawning(workers: u32) -> ClusterBuilder {
    Cluster::builder()
        .workers(workers)
        .shutdown_grace(Duration::from_secs(10))
        .restart_backoff(Duration::from_millis(1), Duration::from_millis(10))
        .crash_loop_limit(1_000, Duration::from_secs(60))
}

/// Sends SIGKILL to `pid`.
pub fn sigkill(pid: u32) {
    // SAFETY: kill(2) takes a pid and a signal number, no pointers.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// What a worker of a cluster that SIGKILLs its leaders does next.
pub enum Step {
    Wait,
    Kill { victim: u32, leader: Leader },
    Done,
}

/// Decides, in every worker of a cluster that SIGKILLs its leaders, who
/// kills and when: the lowest ready follower, once every slot is ready and
/// the leader has been the same for `settle`. The kills so far are the
/// lines of `<dir>/kills`, shared by the workers.
pub struct LeaderKiller {
    dir: PathBuf,
    rounds: usize,
    workers: u32,
    settle: Duration,
    /// How long to go on after the last kill, for its lines to come out.
    linger: Duration,
    /// The leader seen last, and since when (with every slot ready).
    stable: Option<(Leader, Instant)>,
    /// When every round was seen done.
    finished: Option<Instant>,
}

impl LeaderKiller {
    /// `rounds` kills in a cluster of `workers`, counted in `<dir>/kills`.
    pub fn new(dir: PathBuf, rounds: usize, workers: u32, settle: Duration, linger: Duration) -> Self {
        Self {
            dir,
            rounds,
            workers,
            settle,
            linger,
            stable: None,
            finished: None,
        }
    }

    fn kills_done(&self) -> usize {
        std::fs::read_to_string(self.dir.join("kills")).map_or(0, |t| t.lines().count())
    }

    /// `Kill` when this worker is the lowest ready follower, every slot is
    /// ready and the leader has been the same for `settle`; `Done` once
    /// every round is, and `linger` more has passed.
    pub fn step(&mut self, m: &Messenger) -> Step {
        if self.kills_done() >= self.rounds {
            let since = *self.finished.get_or_insert_with(Instant::now);
            return if since.elapsed() >= self.linger {
                Step::Done
            } else {
                Step::Wait
            };
        }
        let w = m.worker();
        let peers = w.peers();
        let Some(leader) = m.leader() else {
            self.stable = None;
            return Step::Wait;
        };
        if peers.iter().filter(|p| p.state == WorkerState::Ready).count() < self.workers as usize {
            self.stable = None;
            return Step::Wait;
        }
        match self.stable {
            Some((l, since)) if l == leader && since.elapsed() >= self.settle => {}
            Some((l, _)) if l == leader => return Step::Wait,
            _ => {
                self.stable = Some((leader, Instant::now()));
                return Step::Wait;
            }
        }
        let lowest = peers
            .iter()
            .filter(|p| p.state == WorkerState::Ready && p.slot != leader.slot)
            .map(|p| p.slot)
            .min();
        if m.is_leader() || lowest != Some(m.slot()) {
            return Step::Wait;
        }
        match peers.iter().find(|p| p.slot == leader.slot) {
            Some(victim) if victim.pid != 0 => Step::Kill {
                victim: victim.pid,
                leader,
            },
            _ => Step::Wait,
        }
    }

    /// Counts a kill of `victim` (call it just before the kill), and starts
    /// waiting for the next leader to settle.
    pub fn record(&mut self, victim: u32) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("kills"))?;
        f.write_all(format!("{victim}\n").as_bytes())?;
        self.stable = None;
        Ok(())
    }
}
