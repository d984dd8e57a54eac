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
/// # Safety
/// The child is a copy of the parent in which only the calling thread
/// exists (`fork(2)`): whatever another thread of the parent held at the
/// fork stays held in the child forever, and whatever it was half way
/// through writing stays half written. `f` must not use any of it: no lock
/// another thread may have held at that moment (a `Mutex` the parent's
/// threads share, Rust's stdout and stderr locks behind `println!` and
/// `eprintln!`, the allocator's lock if the allocator is not fork-safe),
/// and no data such a thread may have been changing.
///
/// POSIX promises the child of a multi-threaded parent only the
/// async-signal-safe functions (`signal-safety(7)`) until it execs or
/// exits. The test harness runs tests on threads of one process, so a
/// test's parent is always multi-threaded. What the child may rely on in
/// practice, on Linux with glibc: `malloc` is fork-safe (glibc takes its
/// locks around the fork and resets them in the child), so `f` may
/// allocate, start threads, and create or use segments, endpoints,
/// messengers and locks of this crate (the segment's locks are robust,
/// process-shared mutexes, not the parent's). It must not print through
/// `println!` or `eprintln!`: a child reports by its exit code. A panic in
/// `f` (exit code 101) runs std's panic hook, whose locks are held only
/// while another thread is panicking at the same moment; the tests accept
/// that for a child that panics only when it has failed anyway.
///
/// # Errors
/// If `fork(2)` fails.
pub unsafe fn fork(f: impl FnOnce() -> i32) -> io::Result<Child> {
    let parent = sys::getpid();
    // SAFETY: the child runs only `f` and then `_exit`s; our caller
    // promises that `f` keeps to fork's contract (see # Safety).
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
/// // SAFETY: the child only returns a number: it takes no lock and touches
/// // nothing another thread may hold.
/// let child = dog.track(unsafe { fork(|| 7) }?);
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
