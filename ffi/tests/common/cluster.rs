//! A `shmcluster run` master under a test: its stderr lines as they come,
//! children killed and reaped on drop (a failing test included), and a
//! watchdog that kills the master and fails the test if it hangs.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

/// The master's pid while it runs, for the watchdog.
static MASTER_PID: AtomicI32 = AtomicI32::new(0);

/// Kills the master (its workers die with it: PR_SET_PDEATHSIG) and fails
/// the test `test` if it is still running after `limit`.
pub fn start_watchdog(test: &'static str, limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        let pid = MASTER_PID.load(Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: kill(2) and waitpid(2) on the master this test spawned
            // (MASTER_PID is cleared as soon as `Master` is done with it);
            // waitpid allows a null status pointer.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
        eprintln!("{test}: watchdog: the test hung for {limit:?}; master {pid} killed");
        std::process::exit(101);
    });
}

/// A child that is killed and reaped when dropped (a failing test included).
pub struct Reaped(pub Child);

impl Reaped {
    /// Waits up to `timeout` for the exit; panics (killing it) past that.
    pub fn wait_within(&mut self, timeout: Duration, what: &str) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
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

/// A running `shmcluster run` master, its stderr lines arriving on a channel
/// (and echoed as `[master] ...`).
pub struct Master {
    child: Reaped,
    lines: Receiver<String>,
    /// The lines seen so far.
    pub log: Vec<String>,
}

impl Master {
    /// Spawns `cmd` (stdin closed, stderr read here) for the watchdog to
    /// guard.
    pub fn start(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shmcluster run");
        MASTER_PID.store(child.id() as i32, Ordering::SeqCst);
        let stderr = child.stderr.take().expect("stderr");
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

    /// The first line (seen before or arriving within `timeout`) that
    /// contains `needle`; panics with the log without one.
    pub fn expect_line(&mut self, needle: &str, timeout: Duration) -> String {
        if let Some(l) = self.log.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no master line with {needle:?} within {timeout:?}: {:#?}",
                    self.log
                ),
            }
        }
    }

    /// The address of the master's first "listening on ADDRESS" line.
    pub fn listening_address(&mut self, timeout: Duration) -> String {
        let line = self.expect_line("listening on", timeout);
        line.rsplit("listening on ")
            .next()
            .expect("an address")
            .trim()
            .to_owned()
    }

    /// Waits up to `timeout` for the master's exit; its exit code and every
    /// line it wrote.
    pub fn finish(mut self, timeout: Duration) -> (Option<i32>, Vec<String>) {
        let status = self.child.wait_within(timeout, "the master");
        MASTER_PID.store(0, Ordering::SeqCst);
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

impl Drop for Master {
    fn drop(&mut self) {
        // On a panic the `Reaped` field then kills and reaps the master (its
        // workers die with it); the watchdog must not signal a reaped pid.
        MASTER_PID.store(0, Ordering::SeqCst);
    }
}
