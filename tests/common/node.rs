//! Running Node.js workers from a Rust test (tests/node_mixed.rs,
//! tests/node_examples.rs): the addon and the C library built first, and a
//! `shmcluster run` master as a child in its own process group whose
//! stdout lines (every worker's) are read by a thread, stopped with
//! `SIGTERM` and checked to leave no process behind.
//!
//! Included by path (`#[path = "common/node.rs"] mod node;`) next to
//! `mod common;`, so that other tests never build it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use super::common::python::{root, target_dir};
use super::Check;

/// Builds the Node.js addon as `npm install` in node/ does
/// (`node scripts/build.js`: a release build of `shmcluster-node` into
/// this test's target directory, copied to node/shmcluster.node, where
/// node/index.js loads it; cargo's no-op when it is up to date), so that
/// the test runs from a clean clone. Needs `node` (>= 20) on the `PATH`.
pub fn build_addon() -> Check {
    let out = Command::new("node")
        .arg("scripts/build.js")
        .current_dir(root().join("node"))
        .env("CARGO_TARGET_DIR", target_dir()?)
        .output()
        .map_err(|e| format!("node scripts/build.js (is Node.js >= 20 on the PATH?): {e}"))?;
    ensure!(
        out.status.success(),
        "node scripts/build.js: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        root().join("node/shmcluster.node").exists(),
        "node scripts/build.js made no node/shmcluster.node"
    );
    Ok(())
}

/// `path` as UTF-8 (for a command line or an environment value).
pub fn utf8(p: &Path) -> Result<String, String> {
    p.to_str()
        .map(str::to_owned)
        .ok_or(format!("{} is not UTF-8", p.display()))
}

/// A `shmcluster run` master started by the test: its own process group
/// (its workers are in it too), killed with the group if the test drops it
/// running, and with the scenario process (`PR_SET_PDEATHSIG`).
pub struct Master {
    child: Child,
    lines: Receiver<String>,
    /// Every stdout line read so far, and stderr (the master's events).
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

impl Master {
    /// Starts `shmcluster <args>` in the repository, with `env` added.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Result<Self, String> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shmcluster"));
        cmd.args(args)
            .envs(env.iter().copied())
            .current_dir(root())
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes integers only and is
        // async-signal-safe, as pre_exec requires.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| format!("shmcluster {args:?}: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout pipe")?;
        let mut stderr = child.stderr.take().ok_or("no stderr pipe")?;
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let err = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&err);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push_str(&text);
            }
        });
        Ok(Self {
            child,
            lines,
            seen: Vec::new(),
            stderr: err,
        })
    }

    /// Reads stdout lines until one for which `done` holds (returned), the
    /// master exits, or `limit` passes.
    pub fn wait_line(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&str) -> bool,
    ) -> Result<String, String> {
        let until = Instant::now() + limit;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if done(&line) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("no such line within {limit:?}\n{}", self.transcript()))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!("the master's stdout closed\n{}", self.transcript()))
                }
            }
        }
    }

    /// Every stdout line read so far.
    pub fn stdout(&self) -> &[String] {
        &self.seen
    }

    /// The master's stderr so far (its events, and the workers' stderr).
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The stdout lines and stderr so far, for a failure's message.
    pub fn transcript(&self) -> String {
        format!(
            "--- stdout:\n{}\n--- stderr:\n{}",
            self.seen.join("\n"),
            self.stderr.lock().unwrap_or_else(PoisonError::into_inner)
        )
    }

    /// Waits up to `limit` for the master to exit on its own.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<ExitStatus, String> {
        let until = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                self.drain_lines();
                return Ok(status);
            }
            ensure!(
                Instant::now() < until,
                "the master still runs after {limit:?}\n{}",
                self.transcript()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `SIGTERM` (a graceful shutdown), then waits up to `limit`.
    pub fn stop(&mut self, limit: Duration) -> Result<ExitStatus, String> {
        if self.child.try_wait().map_err(|e| e.to_string())?.is_none() {
            kill(self.pid(), Signal::SIGTERM).map_err(|e| format!("SIGTERM to the master: {e}"))?;
        }
        self.wait_exit(limit)
    }

    /// After the master exited: nothing of its process group is left (every
    /// worker reaped or gone); anything left is SIGKILLed and named.
    pub fn nothing_left(&mut self) -> Check {
        // A worker exiting just after its master may need a moment.
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            match killpg(self.pid(), None) {
                Err(Errno::ESRCH) => return Ok(()),
                Err(e) => return Err(format!("killpg(0): {e}")),
                Ok(()) if Instant::now() < until => std::thread::sleep(Duration::from_millis(20)),
                Ok(()) => {
                    let _ = killpg(self.pid(), Signal::SIGKILL);
                    return Err(format!(
                        "processes of the master's group outlived it\n{}",
                        self.transcript()
                    ));
                }
            }
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    // The lines the reader thread still has, after the master exited.
    fn drain_lines(&mut self) {
        let until = Instant::now() + Duration::from_secs(1);
        while let Ok(line) = self
            .lines
            .recv_timeout(until.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line);
        }
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = killpg(self.pid(), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}
