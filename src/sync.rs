//! The atomics and the futex the wake protocol is written against: the real
//! ones in normal builds, loom's models under `--cfg loom` (the shape of
//! tokio's `src/loom/mod.rs`). Only [`crate::wake`] uses this shim, so the
//! loom build checks exactly the handshake code that production runs.

use std::time::Duration;

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// Sleeps while `*word == expected`, at most `timeout`. Callers always
/// re-check their condition afterwards, whatever woke them.
#[cfg(not(loom))]
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    crate::sys::futex_wait(word, expected, Some(timeout));
}

/// Wakes one waiter on `word`.
#[cfg(not(loom))]
pub(crate) fn futex_wake(word: &AtomicU32) {
    crate::sys::futex_wake(word, 1);
}

#[cfg(loom)]
mod model {
    //! A futex for loom: compare-and-sleep is atomic with respect to wake
    //! because both take one mutex, exactly the kernel's guarantee. The
    //! timeout is ignored on purpose, so a lost wakeup shows up as a loom
    //! deadlock instead of being papered over by the safety net.
    use loom::sync::{Condvar, Mutex};

    pub(crate) struct Futex {
        pub(crate) wakes: Mutex<u64>,
        pub(crate) cond: Condvar,
    }

    loom::lazy_static! {
        pub(crate) static ref FUTEX: Futex = Futex { wakes: Mutex::new(0), cond: Condvar::new() };
    }
}

#[cfg(loom)]
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, _timeout: Duration) {
    let futex = &*model::FUTEX;
    let mut wakes = futex.wakes.lock().unwrap();
    if word.load(Ordering::SeqCst) != expected {
        return;
    }
    let seen = *wakes;
    while *wakes == seen {
        wakes = futex.cond.wait(wakes).unwrap();
    }
}

#[cfg(loom)]
pub(crate) fn futex_wake(_word: &AtomicU32) {
    let futex = &*model::FUTEX;
    *futex.wakes.lock().unwrap() += 1;
    futex.cond.notify_all();
}
