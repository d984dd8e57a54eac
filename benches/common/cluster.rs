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
use std::time::Duration;

use shmcluster::{Cluster, ClusterBuilder, Event, EventKind, ExitReason, Worker};

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
