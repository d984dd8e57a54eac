//! The driver task of an [`AsyncMessenger`](super::AsyncMessenger): it
//! owns the messenger, dispatches, and when idle waits in the reactor, on
//! the slot's eventfd or on a waiter thread parked on the futex.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::*};
use std::sync::Arc;
use std::time::Instant;

use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use super::{Shared, SAFETY_NET};
use crate::messenger::Messenger;
use crate::segment::Segment;
use crate::{sys, wake};

/// A slot's eventfd (a descriptor of its own) as the reactor sees it.
pub(super) struct WakeFd(pub(super) OwnedFd);

impl AsRawFd for WakeFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// The waiter-thread wake: the thread parks on the slot's futex each time
/// the driver arms it, and notifies the driver when it wakes.
pub(super) struct ThreadWaiter {
    /// Bumped by the driver to ask for one park (a futex word).
    armed: AtomicU32,
    notify: Notify,
    stop: AtomicBool,
}

pub(super) enum Waiter {
    Fd(AsyncFd<WakeFd>),
    Thread(Arc<ThreadWaiter>),
}

impl Waiter {
    pub(super) fn thread(segment: &Segment, slot: u32) -> Self {
        let w = Arc::new(ThreadWaiter {
            armed: AtomicU32::new(0),
            notify: Notify::new(),
            stop: AtomicBool::new(false),
        });
        let (segment, thread_side) = (segment.clone(), w.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("shmcluster-wake-{slot}"))
            .spawn(move || {
                let w = thread_side;
                let mut seen = 0;
                while !w.stop.load(Acquire) {
                    let armed = w.armed.load(Acquire);
                    if armed == seen {
                        sys::futex_wait(&w.armed, seen, Some(SAFETY_NET));
                        continue;
                    }
                    seen = armed;
                    wake::park(segment.park(slot), segment.bells(slot), SAFETY_NET);
                    w.notify.notify_one();
                }
            });
        if let Err(e) = spawned {
            // The driver still wakes on its timer.
            tracing::error!(error = %e, "cannot start the messenger's waiter thread");
        }
        Self::Thread(w)
    }

    /// Waits until woken or `until`.
    async fn wait(&mut self, until: Instant) {
        let sleep = tokio::time::sleep_until(until.into());
        match self {
            Waiter::Fd(afd) => {
                let readable = async {
                    loop {
                        let Ok(mut guard) = afd.readable().await else {
                            return std::future::pending::<()>().await;
                        };
                        // A count read is a wake (maybe an old one: then one
                        // spurious turn); `WouldBlock` clears the readiness.
                        match guard.try_io(|fd| sys::eventfd_read(fd.get_ref().0.as_fd())) {
                            Ok(_) => return,
                            Err(_would_block) => continue,
                        }
                    }
                };
                tokio::select! {
                    () = readable => {}
                    () = sleep => {}
                }
            }
            Waiter::Thread(w) => {
                w.armed.fetch_add(1, Release);
                sys::futex_wake(&w.armed, 1);
                tokio::select! {
                    () = w.notify.notified() => {}
                    () = sleep => {}
                }
            }
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Waiter::Thread(w) = self {
            w.stop.store(true, Release);
            w.armed.fetch_add(1, Release);
            sys::futex_wake(&w.armed, 1);
        }
    }
}

/// The driver task: dispatches, and waits in the reactor when idle.
pub(super) async fn drive(mut m: Messenger, shared: Arc<Shared>, mut waiter: Waiter) {
    let fd_park = matches!(waiter, Waiter::Fd(_));
    let mut turns = 0u32;
    loop {
        if Arc::strong_count(&shared) == 1 {
            break; // Every handle is gone.
        }
        if shared.ready.swap(false, AcqRel) {
            m.worker().ready();
        }
        match m.async_turn(fd_park) {
            Ok(false) => {
                // Busy: let the runtime's other tasks in now and then.
                turns = turns.wrapping_add(1);
                if turns.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
            }
            Ok(true) => {
                let until = m.remote_due().unwrap_or_else(|| Instant::now() + SAFETY_NET);
                waiter.wait(until).await;
                if fd_park {
                    ep_park_end(&m);
                }
                turns = 0;
            }
            Err(e) => {
                // A poisoned lane (garbage from a buggy process): reported,
                // and the other lanes keep being served.
                tracing::error!(error = %e, slot = shared.me.slot, "async messenger: a lane is corrupt");
                tokio::task::yield_now().await;
            }
        }
    }
}

fn ep_park_end(m: &Messenger) {
    m.worker().endpoint_ref().park_fd_end();
}
