//! Helpers for tests that run workers as real processes: fork a child that
//! runs a closure, and a watchdog that turns a deadlock into a quick failure.
//!
//! The children use the same segment, endpoints and code paths as
//! production; only the way they are started differs (the master comes
//! later).

use std::io::{self, Write};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::sys;
pub use crate::sys::{Child, ExitStatus};

/// Forks a child process that runs `f` and exits with its return value
/// (101 if it panics). The child is killed if the parent dies
/// (`PR_SET_PDEATHSIG`), so a crashed test leaves no orphans. It exits with
/// `_exit`: no destructors or atexit handlers of the parent run twice.
///
/// The child should not print through Rust's stdout lock, nor take any lock
/// another thread of the parent could have held at the fork (see
/// `fork(2)`); allocating is fine with glibc.
///
/// # Errors
/// If `fork(2)` fails.
pub fn fork(f: impl FnOnce() -> i32) -> io::Result<Child> {
    let parent = sys::getpid();
    // SAFETY: the child runs only `f` and then `_exit`s; the contract on
    // what `f` may do is this function's documented contract.
    match unsafe { sys::fork() }? {
        Some(child) => Ok(child),
        None => {
            sys::die_with_parent(parent);
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
            sys::exit_now(code)
        }
    }
}

/// Kills every child it tracks and aborts the test process if it is not
/// dropped within its timeout: a deadlock fails in seconds instead of hanging
/// CI. Dropping it in time disarms it.
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use shmcluster::testing::{fork, Watchdog};
///
/// let dog = Watchdog::new("example", Duration::from_secs(10));
/// let child = dog.track(fork(|| 7)?);
/// assert_eq!(child.wait_timeout(Duration::from_secs(5))?, Some(shmcluster::testing::ExitStatus::Code(7)));
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Watchdog {
    children: Arc<Mutex<Vec<Child>>>,
    disarm: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Arms a watchdog named `name` (printed when it fires).
    pub fn new(name: &str, timeout: Duration) -> Self {
        let children: Arc<Mutex<Vec<Child>>> = Arc::default();
        let (disarm, armed) = mpsc::channel::<()>();
        let name = name.to_owned();
        let watched = Arc::clone(&children);
        let thread = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = armed.recv_timeout(timeout) {
                for child in watched.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                    let _ = child.kill();
                    let _ = child.wait_timeout(Duration::from_secs(1));
                }
                // Straight to the stderr handle: the test harness captures
                // `eprintln!`, and the abort would lose what it captured.
                let _ = writeln!(
                    std::io::stderr(),
                    "watchdog: `{name}` did not finish within {timeout:?}; children killed, aborting"
                );
                std::process::abort();
            }
        });
        Self {
            children,
            disarm: Some(disarm),
            thread: Some(thread),
        }
    }

    /// Registers `child` to be killed if the watchdog fires; returns it.
    pub fn track(&self, child: Child) -> Child {
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child);
        child
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Reap anything still running (a test that failed early), then
        // disarm.
        for child in self.children.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait_timeout(Duration::from_secs(1));
            }
        }
        drop(self.disarm.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
