//! Wakeups: the receiver's park word and doorbell, and the sender's wait for
//! space in a full lane.
//!
//! # Receiver side: park word and doorbell
//!
//! Each slot has a park word and a doorbell bitmap with one bit per sender.
//!
//! | park word  | meaning                                                  |
//! |------------|----------------------------------------------------------|
//! | `EMPTY`    | the receiver is running (draining or spinning)           |
//! | `PARKED`   | the receiver is in, or about to enter, `futex_wait`      |
//! | `NOTIFIED` | a sender saw `PARKED` and has issued (or will issue) the wake |
//!
//! Only the receiver stores `EMPTY` and `PARKED`; a sender only moves
//! `PARKED → NOTIFIED` (compare-exchange), so exactly one sender pays the
//! `futex_wake` syscall and a busy receiver costs senders no syscall at all.
//!
//! Both handshakes are Dekker's, written with `SeqCst` *fences* between a
//! relaxed (or release) store and a relaxed load on each side; the fences
//! are numbered F1–F6 below and at each call site. (With fences rather than
//! `SeqCst` accesses, loom models the protocol exactly; it treats `SeqCst`
//! loads and stores as `AcqRel`, see tokio-rs/loom#180.)
//!
//! - Data and doorbell. Sender: *store tail (Release); F1; read doorbell*.
//!   Receiver, before it parks: *swap doorbell bits to 0; F2; read tails
//!   (Acquire)*. If the sender reads its bit still set, F1 precedes F2 and
//!   the receiver's tail read sees the new tail: the sender need do nothing
//!   more, not even read the park word.
//!
//!   A running receiver only *reads* the doorbell ([`peek_doorbell`]) and
//!   keeps polling the tails of every lane whose bit it has seen; it clears
//!   bits only on its way to sleep ([`take_doorbell`]). So while a sender
//!   streams, its bit stays set, the doorbell's cache line stays shared by
//!   both cores, and a send costs one fence and one cache hit beyond the
//!   record itself.
//! - Doorbell and park word. Sender, finding its bit clear: *set bit; F3;
//!   read park word*. Receiver: *store PARKED; F4; read doorbell*. Either
//!   the receiver sees the bit and does not sleep, or the sender sees
//!   `PARKED` and wakes it.
//!
//! `tests` under `--cfg loom` check that no interleaving loses a wakeup.
//!
//! # Sender side: waiting for space
//!
//! A lane's `space_waiter` word is 1 while its sender waits for the receiver
//! to free space. Sender: *store 1; F5; read head* ([`wait_for_space`]).
//! Receiver: *store head (Release); F6; read space_waiter*
//! ([`release_space`]). The same argument applies.

use std::time::Duration;

use crate::sync::{fence, futex_wait, futex_wake, AtomicU32, AtomicU64, Ordering::*};

/// The receiver is running.
pub(crate) const EMPTY: u32 = 0;
/// The receiver is about to sleep or sleeping in `futex_wait`.
pub(crate) const PARKED: u32 = 1;
/// A sender has taken responsibility for waking the receiver.
pub(crate) const NOTIFIED: u32 = 2;

/// Sender half, called right after the lane's tail was stored (Release):
/// rings `bit` in the receiver's doorbell `bell` and wakes the receiver if it
/// is parked. Returns whether it issued a futex wake.
#[inline]
pub(crate) fn notify(bell: &AtomicU64, bit: u64, park: &AtomicU32) -> bool {
    fence(SeqCst); // F1, pairs with F2 in `take_doorbell`.
    if bell.load(Relaxed) & bit != 0 {
        // Not yet taken: the receiver will read our tail when it takes it.
        return false;
    }
    bell.fetch_or(bit, Relaxed);
    fence(SeqCst); // F3, pairs with F4 in `park`.
    park.load(Relaxed) == PARKED && notify_slow(park)
}

#[cold]
fn notify_slow(park: &AtomicU32) -> bool {
    // Of several senders that saw PARKED, only one pays the syscall.
    let won = park.compare_exchange(PARKED, NOTIFIED, Relaxed, Relaxed).is_ok();
    if won {
        futex_wake(park);
    }
    won
}

/// Receiver, while running: adds every rung doorbell bit to `pending`
/// without clearing it (no write, so no cache-line transfer). A stale read
/// only delays the lane until the next call; [`take_doorbell`] and [`park`]
/// are what make sleeping safe.
#[inline]
pub(crate) fn peek_doorbell(bells: &[AtomicU64], pending: &mut [u64]) {
    for (bell, pending) in bells.iter().zip(pending.iter_mut()) {
        *pending |= bell.load(Relaxed);
    }
}

/// Receiver, on its way to sleep, part 1: moves every rung doorbell bit into
/// `pending`, clearing it. The caller then reads the pending lanes' tails
/// (F2 orders the take before those reads), and parks only if all are empty.
#[inline]
pub(crate) fn take_doorbell(bells: &[AtomicU64], pending: &mut [u64]) {
    let mut any = false;
    for (bell, pending) in bells.iter().zip(pending.iter_mut()) {
        // A relaxed peek avoids a locked instruction when nothing rang; a
        // stale zero is caught by `park`'s re-check after F4.
        if bell.load(Relaxed) != 0 {
            let bits = bell.swap(0, Relaxed);
            *pending |= bits;
            any |= bits != 0;
        }
    }
    if any {
        fence(SeqCst); // F2, pairs with F1 in `notify`.
    }
}

/// Receiver, on its way to sleep, part 2: sleeps on `park` until a sender
/// rings, at most `timeout` (a safety net, never needed for correctness).
/// The caller must have taken the doorbell and found every lane it knows
/// of empty.
pub(crate) fn park(park: &AtomicU32, bells: &[AtomicU64], timeout: Duration) {
    park.store(PARKED, Relaxed);
    fence(SeqCst); // F4, pairs with F3 in `notify`.
    if bells.iter().any(|b| b.load(Relaxed) != 0) {
        park.store(EMPTY, Relaxed);
        return;
    }
    futex_wait(park, PARKED, timeout);
    // Whether a sender moved us to NOTIFIED or we timed out, we are running.
    park.store(EMPTY, Relaxed);
}

/// Sender side of a full lane: announces the wait on `waiter`, re-checks
/// `has_space` (which reads the lane head), and sleeps for at most `timeout`
/// unless space appeared. Returns whether there was space on the re-check
/// (the caller then retries without sleeping).
pub(crate) fn wait_for_space(
    waiter: &AtomicU32,
    mut has_space: impl FnMut() -> bool,
    timeout: Duration,
) -> bool {
    waiter.store(1, Relaxed);
    fence(SeqCst); // F5, pairs with F6 in `release_space`.
    if has_space() {
        waiter.store(0, Relaxed);
        return true;
    }
    futex_wait(waiter, 1, timeout);
    false
}

/// Receiver side of a full lane, called after the head was stored: wakes the
/// sender if it announced a wait for space.
#[inline]
pub(crate) fn release_space(waiter: &AtomicU32) {
    fence(SeqCst); // F6, pairs with F5 in `wait_for_space`.
    if waiter.load(Relaxed) != 0 {
        release_space_slow(waiter);
    }
}

#[cold]
fn release_space_slow(waiter: &AtomicU32) {
    if waiter.swap(0, Relaxed) != 0 {
        futex_wake(waiter);
    }
}

/// Model checks of the two handshakes: `RUSTFLAGS="--cfg loom" cargo test
/// --release --lib wake::`. The model futex ignores timeouts, so a lost
/// wakeup shows up as a deadlock that loom reports.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    const FOREVER: Duration = Duration::from_secs(3600);

    /// A receiver slot with `senders` one-message lanes.
    struct Inbox {
        tails: Vec<AtomicU64>,
        bells: [AtomicU64; 1],
        park: AtomicU32,
    }

    impl Inbox {
        fn new(senders: usize) -> Arc<Self> {
            Arc::new(Self {
                tails: (0..senders).map(|_| AtomicU64::new(0)).collect(),
                bells: [AtomicU64::new(0)],
                park: AtomicU32::new(EMPTY),
            })
        }
    }

    /// The sender's side of `Endpoint::send`: publish message number
    /// `seq`, then notify.
    fn send(inbox: &Inbox, from: usize, seq: u64) {
        inbox.tails[from].store(seq, Release);
        notify(&inbox.bells[0], 1 << from, &inbox.park);
    }

    /// The receiver's side of `Endpoint::recv` until every sender's
    /// message number `last` is seen: peek at the doorbell and poll the
    /// pending lanes' tails; when they are all drained, take the doorbell,
    /// poll again, and park only if still nothing is there.
    fn receive_all(inbox: &Inbox, last: u64) {
        let n = inbox.tails.len();
        let mut seen = vec![false; n];
        // `Endpoint::scan`: a pending lane found without its message, whose
        // doorbell bit is clear, is dropped from the pending set.
        let poll = |pending: &mut [u64; 1], seen: &mut Vec<bool>| {
            for (from, seen) in seen.iter_mut().enumerate() {
                let bit = 1 << from;
                if pending[0] & bit != 0 {
                    if inbox.tails[from].load(Acquire) == last {
                        *seen = true;
                    } else if inbox.bells[0].load(Relaxed) & bit == 0 {
                        pending[0] &= !bit;
                    }
                }
            }
        };
        // Like a new endpoint: every lane is pending.
        let mut pending = [(1u64 << n) - 1];
        loop {
            peek_doorbell(&inbox.bells, &mut pending);
            poll(&mut pending, &mut seen);
            if seen.iter().all(|s| *s) {
                return;
            }
            // `Endpoint::wait_next` on its way to sleep.
            take_doorbell(&inbox.bells, &mut pending);
            poll(&mut pending, &mut seen);
            if seen.iter().all(|s| *s) {
                return;
            }
            pending = [0];
            park(&inbox.park, &inbox.bells, FOREVER);
        }
    }

    #[test]
    fn one_sender_no_lost_wakeup() {
        loom::model(|| {
            let inbox = Inbox::new(1);
            let sender = {
                let inbox = inbox.clone();
                thread::spawn(move || send(&inbox, 0, 1))
            };
            receive_all(&inbox, 1);
            sender.join().unwrap();
        });
    }

    /// The second send may find its doorbell bit still set and skip the
    /// park word (fence F1's case).
    #[test]
    fn one_sender_two_messages_no_lost_wakeup() {
        loom::model(|| {
            let inbox = Inbox::new(1);
            let sender = {
                let inbox = inbox.clone();
                thread::spawn(move || {
                    send(&inbox, 0, 1);
                    send(&inbox, 0, 2);
                })
            };
            receive_all(&inbox, 2);
            sender.join().unwrap();
        });
    }

    #[test]
    fn two_senders_no_lost_wakeup() {
        loom::model(|| {
            let inbox = Inbox::new(2);
            let senders: Vec<_> = (0..2)
                .map(|from| {
                    let inbox = inbox.clone();
                    thread::spawn(move || send(&inbox, from, 1))
                })
                .collect();
            receive_all(&inbox, 1);
            for s in senders {
                s.join().unwrap();
            }
        });
    }

    /// A sender waiting for space in a full lane is always woken by the
    /// receiver that frees it.
    #[test]
    fn space_waiter_no_lost_wakeup() {
        loom::model(|| {
            let head = Arc::new(AtomicU64::new(0));
            let waiter = Arc::new(AtomicU32::new(0));
            let receiver = {
                let (head, waiter) = (head.clone(), waiter.clone());
                thread::spawn(move || {
                    // `Consumer::advance` then the strict check.
                    head.store(1, Release);
                    release_space(&waiter);
                })
            };
            // `Endpoint::wait_for_room` with the spin phase skipped.
            while head.load(Acquire) == 0 {
                wait_for_space(&waiter, || head.load(Acquire) != 0, FOREVER);
            }
            receiver.join().unwrap();
        });
    }
}
