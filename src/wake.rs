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
//! The handshake is Dekker's: the sender does *publish tail; read doorbell
//! (set our bit if clear); read park word*, the receiver does *store PARKED;
//! read doorbell* (and, when draining, *take doorbell bits; read tails*).
//! All of these are `SeqCst`, so in the single total order either the
//! receiver sees the sender's bit (and does not sleep) or the sender sees
//! `PARKED` (and wakes it). [`notify`] and [`park`] are the two halves;
//! `tests/loom.rs` checks that no interleaving loses a wakeup.
//!
//! # Sender side: waiting for space
//!
//! A lane's `space_waiter` word is 1 while its sender waits for the receiver
//! to free space. Sender: *store 1; re-read head* ([`wait_for_space`]).
//! Receiver: *store head; fence; read space_waiter* ([`release_space`]). The
//! same argument applies.

use std::time::Duration;

use crate::sync::{fence, futex_wait, futex_wake, AtomicU32, AtomicU64, Ordering::*};

/// The receiver is running.
pub(crate) const EMPTY: u32 = 0;
/// The receiver is about to sleep or sleeping in `futex_wait`.
pub(crate) const PARKED: u32 = 1;
/// A sender has taken responsibility for waking the receiver.
pub(crate) const NOTIFIED: u32 = 2;

/// Sender half, called right after the lane's tail was published with a
/// `SeqCst` store: rings `bit` in the receiver's doorbell `bell` and wakes
/// the receiver if it is parked. Returns whether a `futex_wake` was issued.
#[inline]
pub(crate) fn notify(bell: &AtomicU64, bit: u64, park: &AtomicU32) -> bool {
    // Reading first keeps the line shared while the bit is already set (the
    // receiver has not drained us yet): no read-modify-write per message.
    if bell.load(SeqCst) & bit == 0 {
        bell.fetch_or(bit, SeqCst);
    }
    if park.load(SeqCst) == PARKED {
        return notify_slow(park);
    }
    false
}

#[cold]
fn notify_slow(park: &AtomicU32) -> bool {
    if park.compare_exchange(PARKED, NOTIFIED, SeqCst, SeqCst).is_ok() {
        futex_wake(park);
        true
    } else {
        false
    }
}

/// Receiver half, part 1: moves every rung doorbell bit into `pending`.
/// Returns whether any bit was taken. The `SeqCst` swap orders the take
/// before the tail reads that follow it (see the module docs).
#[inline]
pub(crate) fn take_doorbell(bells: &[AtomicU64], pending: &mut [u64]) -> bool {
    let mut any = false;
    for (bell, pending) in bells.iter().zip(pending.iter_mut()) {
        // A relaxed peek avoids a locked instruction when nothing rang; a
        // stale zero only delays the take until the next call, and `park`
        // re-checks with SeqCst before sleeping.
        if bell.load(Relaxed) != 0 {
            let bits = bell.swap(0, SeqCst);
            *pending |= bits;
            any |= bits != 0;
        }
    }
    any
}

/// How a [`park`] call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Parked {
    /// A doorbell bit was already set: the receiver did not sleep.
    Skipped,
    /// The receiver slept and was woken, or the wait timed out.
    Slept,
}

/// Receiver half, part 2: sleeps on `park` until a sender rings, at most
/// `timeout` (a safety net, never needed for correctness). The caller must
/// have drained everything it already knew about (its `pending` set empty).
pub(crate) fn park(park: &AtomicU32, bells: &[AtomicU64], timeout: Duration) -> Parked {
    park.store(PARKED, SeqCst);
    if bells.iter().any(|b| b.load(SeqCst) != 0) {
        park.store(EMPTY, SeqCst);
        return Parked::Skipped;
    }
    futex_wait(park, PARKED, timeout);
    // Whether a sender moved us to NOTIFIED or we timed out, we are running.
    park.store(EMPTY, SeqCst);
    Parked::Slept
}

/// Sender side of a full lane: announces the wait on `waiter`, re-checks
/// `has_space` (which must read the lane head with `SeqCst`), and sleeps for
/// at most `timeout` unless space appeared. Returns whether there was space
/// on the re-check (the caller then retries without sleeping).
pub(crate) fn wait_for_space(
    waiter: &AtomicU32,
    mut has_space: impl FnMut() -> bool,
    timeout: Duration,
) -> bool {
    waiter.store(1, SeqCst);
    if has_space() {
        waiter.store(0, SeqCst);
        return true;
    }
    futex_wait(waiter, 1, timeout);
    false
}

/// Receiver side of a full lane, called after the head was stored: wakes the
/// sender if it announced a wait for space.
#[inline]
pub(crate) fn release_space(waiter: &AtomicU32) {
    fence(SeqCst);
    if waiter.load(Relaxed) != 0 {
        release_space_slow(waiter);
    }
}

#[cold]
fn release_space_slow(waiter: &AtomicU32) {
    if waiter.swap(0, SeqCst) != 0 {
        futex_wake(waiter);
    }
}
