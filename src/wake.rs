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
//! | `NOTIFIED` | a sender saw `PARKED` or `PARKED_FD` and has issued (or will issue) the wake |
//! | `PARKED_FD` | an async receiver waits on the slot's eventfd (its reactor polls it) |
//!
//! Only the receiver stores `EMPTY`, `PARKED` and `PARKED_FD`; a sender only
//! moves `PARKED → NOTIFIED` or `PARKED_FD → NOTIFIED` (compare-exchange),
//! so exactly one sender pays the wake syscall (`futex_wake`, or a write to
//! the receiver's eventfd) and a busy receiver costs senders no syscall.
//!
//! `PARKED_FD` is the async receiver's park ([`park_fd_begin`]): a tokio
//! task cannot sleep in `futex_wait`, so it waits for its slot's eventfd to
//! become readable in the reactor instead. The handshake is the same as
//! `PARKED`'s; only the wake differs.
//!
//! Both handshakes are Dekker's, written with `SeqCst` *fences* between a
//! relaxed (or release) store and a relaxed load on each side; the fences
//! are numbered F1–F6 below and at each call site. (With fences rather than
//! `SeqCst` accesses, loom models the protocol exactly; it treats `SeqCst`
//! loads and stores as `AcqRel`, see tokio-rs/loom#180.)
//!
//! - Data and doorbell. Sender: *store the commit word of the first record
//!   it publishes (Release, see `crate::lane`); F1; read doorbell*.
//!   Receiver, before it parks: *swap doorbell bits to 0; F2; read the
//!   commit word at each lane's head (Acquire)*. If the sender reads its
//!   bit still set, F1 precedes F2 and the receiver's read sees the
//!   commit: the sender need do nothing more, not even read the park word.
//!   (The models below call the commit word the lane's tail.)
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
/// An async receiver waits for its eventfd to be written.
pub(crate) const PARKED_FD: u32 = 3;

/// Sender half, called right after the lane's tail was stored (Release):
/// rings `bit` in the receiver's doorbell `bell` and wakes the receiver if it
/// is parked: `futex_wake` on `park`, or `ring_fd` (write the receiver's
/// eventfd) for an async receiver. Returns whether it issued a wake.
#[inline]
pub(crate) fn notify(bell: &AtomicU64, bit: u64, park: &AtomicU32, ring_fd: impl FnOnce()) -> bool {
    fence(SeqCst); // F1, pairs with F2 in `take_doorbell`.
    if bell.load(Relaxed) & bit != 0 {
        // Not yet taken: the receiver will read our tail when it takes it.
        return false;
    }
    bell.fetch_or(bit, Relaxed);
    fence(SeqCst); // F3, pairs with F4 in `park` and `park_fd_begin`.
    let state = park.load(Relaxed);
    (state == PARKED || state == PARKED_FD) && notify_slow(park, state, ring_fd)
}

#[cold]
fn notify_slow(park: &AtomicU32, state: u32, ring_fd: impl FnOnce()) -> bool {
    // Of several senders that saw it parked, only one pays the syscall.
    let won = park.compare_exchange(state, NOTIFIED, Relaxed, Relaxed).is_ok();
    if won {
        if state == PARKED_FD {
            ring_fd();
        } else {
            futex_wake(park);
        }
    }
    won
}

/// Async receiver, on its way to wait for its eventfd, after taking the
/// doorbell and finding every lane empty (as before [`park`]): announces
/// `PARKED_FD`. Returns false, with the park word back at `EMPTY`, if a
/// doorbell rang meanwhile (the caller polls again instead of waiting).
/// After the wait, whatever ended it, the caller calls [`park_fd_end`].
pub(crate) fn park_fd_begin(park: &AtomicU32, bells: &[AtomicU64]) -> bool {
    park.store(PARKED_FD, Relaxed);
    fence(SeqCst); // F4, pairs with F3 in `notify`.
    if bells.iter().any(|b| b.load(Relaxed) != 0) {
        park.store(EMPTY, Relaxed);
        return false;
    }
    true
}

/// Async receiver, running again (woken through the eventfd, or by its own
/// timer): back to `EMPTY`. A sender that moved the word to `NOTIFIED`
/// after this point finds a running receiver next time; a late eventfd
/// write only causes one spurious wake.
pub(crate) fn park_fd_end(park: &AtomicU32) {
    park.store(EMPTY, Relaxed);
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
        /// The async receiver's eventfd, modelled: a count of writes that
        /// the reader sleeps on (with the model futex) while it is 0.
        eventfd: AtomicU32,
    }

    impl Inbox {
        fn new(senders: usize) -> Arc<Self> {
            Arc::new(Self {
                tails: (0..senders).map(|_| AtomicU64::new(0)).collect(),
                bells: [AtomicU64::new(0)],
                park: AtomicU32::new(EMPTY),
                eventfd: AtomicU32::new(0),
            })
        }

        /// `write(eventfd, 1)`. A write and the `read` that returns its
        /// count are system calls that take the eventfd's lock in the
        /// kernel, so the read synchronizes with the write: modelled with
        /// release/acquire. (With `Relaxed` the model is weaker than any
        /// kernel, and loom finds a lost wakeup that cannot happen.)
        fn ring_fd(&self) {
            self.eventfd.fetch_add(1, AcqRel);
            futex_wake(&self.eventfd);
        }

        /// The driver's wait: sleep until the eventfd is readable, read it
        /// (which resets the count), and go back to polling the lanes.
        fn wait_fd(&self) {
            while self.eventfd.swap(0, AcqRel) == 0 {
                crate::sync::futex_wait(&self.eventfd, 0, FOREVER);
            }
        }
    }

    /// The sender's side of `Endpoint::send`: publish message number
    /// `seq`, then notify.
    fn send(inbox: &Inbox, from: usize, seq: u64) {
        inbox.tails[from].store(seq, Release);
        notify(&inbox.bells[0], 1 << from, &inbox.park, || inbox.ring_fd());
    }

    /// The receiver's side of `Endpoint::recv` until every sender's
    /// message number `last` is seen: peek at the doorbell and poll the
    /// pending lanes' tails; when they are all drained, take the doorbell,
    /// poll again, and park only if still nothing is there.
    fn receive_all(inbox: &Inbox, last: u64) {
        receive_all_with(inbox, last, false);
    }

    /// `receive_all`, parking like the sync receiver, or (`async_park`)
    /// like the async driver: `park_fd_begin`, wait for the eventfd,
    /// `park_fd_end`.
    fn receive_all_with(inbox: &Inbox, last: u64, async_park: bool) {
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
            if async_park {
                if park_fd_begin(&inbox.park, &inbox.bells) {
                    inbox.wait_fd();
                    park_fd_end(&inbox.park);
                }
            } else {
                park(&inbox.park, &inbox.bells, FOREVER);
            }
        }
    }

    /// The async receiver's eventfd park loses no wakeup either, with two
    /// senders racing to wake it.
    #[test]
    fn eventfd_park_no_lost_wakeup() {
        loom::model(|| {
            let inbox = Inbox::new(2);
            let senders: Vec<_> = (0..2)
                .map(|from| {
                    let inbox = inbox.clone();
                    thread::spawn(move || send(&inbox, from, 1))
                })
                .collect();
            receive_all_with(&inbox, 1, true);
            for s in senders {
                s.join().unwrap();
            }
        });
    }

    /// One sender, two messages, async receiver (the F1 shortcut case).
    #[test]
    fn eventfd_park_one_sender_two_messages() {
        loom::model(|| {
            let inbox = Inbox::new(1);
            let sender = {
                let inbox = inbox.clone();
                thread::spawn(move || {
                    send(&inbox, 0, 1);
                    send(&inbox, 0, 2);
                })
            };
            receive_all_with(&inbox, 2, true);
            sender.join().unwrap();
        });
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

    /// A lane of `N` fixed-size records, for the commit-word protocol of
    /// `crate::lane` (positions count records here, not bytes).
    struct CommitLane<const N: usize> {
        /// Each record's first word: 0 (the terminator) or its stamp.
        word0: [AtomicU64; N],
        payload: [loom::cell::UnsafeCell<u64>; N],
        head: AtomicU64,
    }

    impl<const N: usize> CommitLane<N> {
        fn new() -> Arc<Self> {
            Arc::new(Self {
                word0: std::array::from_fn(|_| AtomicU64::new(0)),
                payload: std::array::from_fn(|_| loom::cell::UnsafeCell::new(0)),
                head: AtomicU64::new(0),
            })
        }

        /// Nonzero, and different for every position in the model.
        fn stamp(pos: u64) -> u64 {
            pos + 1
        }

        /// `Producer::try_write_single` up to the commit: waits for room
        /// for the record and its terminator (the head, `Acquire`), writes
        /// the terminator after it, then the payload. Returns the first
        /// word that commits it.
        fn write(&self, pos: u64, value: u64) -> u64 {
            while pos + 1 - self.head.load(Acquire) >= N as u64 {
                thread::yield_now();
            }
            self.word0[(pos + 1) as usize % N].store(0, Relaxed);
            // SAFETY: the consumer's head is past this record's last use
            // (`Acquire` above), and it reads nothing here until the commit.
            self.payload[pos as usize % N].with_mut(|p| unsafe { *p = value });
            Self::stamp(pos)
        }

        /// `Consumer::next` and `advance`: polls the first word at the
        /// head until it commits the record there. Anything but the
        /// terminator or the stamp would be stale bytes read as a record.
        fn read(&self, pos: u64) -> u64 {
            loop {
                let w0 = self.word0[pos as usize % N].load(Acquire);
                if w0 == Self::stamp(pos) {
                    break;
                }
                assert_eq!(w0, 0, "stale first word at {pos}");
                thread::yield_now();
            }
            // SAFETY: committed (`Acquire` above), and not rewritten until
            // the head moves past it.
            let value = self.payload[pos as usize % N].with(|p| unsafe { *p });
            self.head.store(pos + 1, Release);
            value
        }
    }

    /// The commit word: the receiver polls each record's first word, never
    /// the tail; a terminator written before each commit means it never
    /// takes what an earlier lap left for a record. Message 0 goes alone
    /// and messages 1 and 2 as a batch (the second committed with a
    /// relaxed store before the first's `Release`, as `Producer::put`
    /// does); the ring wraps. Loom checks that every payload read is
    /// ordered after its write and before its reuse.
    #[test]
    fn lane_commit_word_delivers_in_order_and_never_stale() {
        loom::model(|| {
            let lane = CommitLane::<3>::new();
            let sender = {
                let lane = lane.clone();
                thread::spawn(move || {
                    let w = lane.write(0, 100);
                    lane.word0[0].store(w, Release);
                    let first = lane.write(1, 101);
                    let second = lane.write(2, 102);
                    lane.word0[2 % 3].store(second, Relaxed);
                    lane.word0[1].store(first, Release);
                    let w = lane.write(3, 103);
                    lane.word0[0].store(w, Release);
                })
            };
            for pos in 0..4 {
                assert_eq!(lane.read(pos), 100 + pos);
            }
            sender.join().unwrap();
        });
    }

    /// A waiter that returns when a death is counted (the messenger's
    /// `Interrupt`) is not left parked by a ring that found its doorbell
    /// bit still set from an earlier, spurious ring: after taking the
    /// doorbell it looks at the count again (`Endpoint::wait_next`), and F2
    /// makes the count the master stored before its F1 visible. Without
    /// that second look loom finds the waiter parked for ever.
    #[test]
    fn a_death_counted_behind_a_spurious_ring_ends_the_wait() {
        loom::model(|| {
            let inbox = Inbox::new(1);
            let deaths = Arc::new(AtomicU32::new(0));
            // An earlier ring for lane 0 with nothing in it (or a message
            // the waiter already took).
            let spurious = {
                let inbox = inbox.clone();
                thread::spawn(move || notify(&inbox.bells[0], 1, &inbox.park, || inbox.ring_fd()))
            };
            // The master: counts the death, then rings (`reset_dead_slot`).
            let master = {
                let (inbox, deaths) = (inbox.clone(), deaths.clone());
                thread::spawn(move || {
                    deaths.fetch_add(1, Release);
                    notify(&inbox.bells[0], 1, &inbox.park, || inbox.ring_fd());
                })
            };
            let mut pending = [0u64];
            loop {
                if deaths.load(Acquire) != 0 {
                    break;
                }
                take_doorbell(&inbox.bells, &mut pending);
                if deaths.load(Acquire) != 0 {
                    break;
                }
                park(&inbox.park, &inbox.bells, FOREVER);
            }
            spurious.join().unwrap();
            master.join().unwrap();
        });
    }
}

/// Whether the receiver whose park word is `park` is running: neither
/// parked nor being woken. A hint for picking a worker (a messenger's
/// `consume`), read by other processes without ordering; a word that is
/// none of the states (garbage) reads as not running.
#[inline]
pub(crate) fn is_running(park: &AtomicU32) -> bool {
    park.load(Relaxed) == EMPTY
}
