//! How a blocked endpoint waits: the one spin-then-park loop behind a
//! receive with nothing to receive and a send facing a full lane, and the
//! doorbell a sender rings once it has published.

use std::ptr::NonNull;
use std::sync::atomic::Ordering::{Acquire, Relaxed};
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::{Duration, Instant};

use crate::segment::Segment;
use crate::wake;

/// The longest a futex wait lasts before the waiter looks again by itself.
/// The park/notify handshake loses no wakeup (`tests/loom.rs`), so this only
/// bounds the damage a buggy peer could do by scribbling on a park word.
const SAFETY_NET: Duration = Duration::from_millis(50);

/// How a blocked receiver (or a sender facing a full lane) waits.
///
/// Measured on the project's reference machine (2 vCPUs, a VM; README,
/// "Benchmarks"): a 64-byte round trip between two processes takes about
/// 0.35–1 µs when the receiver spins and about 65 µs when it sleeps on the
/// futex, because waking a vCPU costs about 30 µs there.
///
/// The default, `SpinThenPark(5 µs)`, spins for a few round trips, not
/// for the cost of a sleep and wake (the classic spin-then-block rule,
/// which gave 50 µs here before). It was chosen by the messenger
/// benchmark with 4 and 8 workers on 2 vCPUs, the normal case of a
/// pre-forked server (more workers than cores): there every spinning
/// worker takes a core from the workers that have work, so a `map` over
/// all took 120 µs (4 workers) and 260 µs (8) p50 with 50 µs of spin,
/// 20–38 µs and 59–80 µs with 5 µs, 31 µs and 45–69 µs with `Park`
/// (which costs a request to a waiting worker a wake each time: 22–46 µs
/// instead of 0.75 µs). With fewer busy workers than cores nothing is
/// lost: a reply, or the next message of a busy stream, comes within a
/// few microseconds and is picked up at spinning speed (a request's p50
/// was the same, 0.75 µs, with 5 and with 50 µs). Spinning for less
/// (2–3 µs) measured no better and more often fell into the *park trap*
/// of a ping-pong: once one side has parked, the other waits a wake (30
/// µs) for its answer and parks too, round after round; a spin of 5 µs
/// still shows that in the p99 of some runs (20–50 µs).
///
/// The messenger keeps the classic rule where it pays: with this default,
/// a `request` or `invoke` waiting for its answer spins 50 µs and a `map`
/// 20 µs (an answer from a worker it woke comes a wake later), so a
/// request/reply pair does not fall into the park trap; idle workers
/// spin 5 µs.
///
/// Pick `SpinThenPark` with a longer spin (or `Spin`) for a latency-bound
/// pair of processes on cores of their own, and `Park` for workers that
/// should cost no CPU at all while idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStrategy {
    /// Poll without sleeping until something arrives (or the deadline).
    /// Lowest latency; burns a core, and starves other processes when there
    /// are more busy workers than cores.
    Spin,
    /// Poll for this long, then sleep on the futex. The default, with
    /// [`WaitStrategy::DEFAULT_SPIN`].
    SpinThenPark(Duration),
    /// Sleep on the futex at once. Costs no CPU while idle; each wake costs
    /// the sender a `futex_wake` and the receiver a scheduler round trip.
    Park,
}

impl WaitStrategy {
    /// The spin phase of the default strategy: a few round trips (see
    /// [`WaitStrategy`] for the measurements that chose it).
    pub const DEFAULT_SPIN: Duration = Duration::from_micros(5);

    /// When the spin phase of a wait starting now ends (`None`: never).
    #[inline]
    pub(super) fn spin_until(self) -> Option<Instant> {
        match self {
            WaitStrategy::Spin => None,
            WaitStrategy::SpinThenPark(d) => Some(Instant::now() + d),
            WaitStrategy::Park => Some(Instant::now()),
        }
    }
}

impl Default for WaitStrategy {
    fn default() -> Self {
        Self::SpinThenPark(Self::DEFAULT_SPIN)
    }
}

impl Segment {
    /// Rings `from`'s bit in `to`'s doorbell (word `from / 64`) and wakes
    /// `to` if it is parked, by futex or eventfd (see [`wake::notify`]).
    /// Returns whether it issued a wake.
    #[inline(always)]
    pub(crate) fn notify(&self, to: u32, from: u32) -> bool {
        let word = &self.bells(to)[(from / 64) as usize];
        wake::notify(word, 1u64 << (from % 64), self.park(to), || self.ring_fd(to))
    }
}

/// Where a sender rings one receiver: the doorbell word holding its bit,
/// the bit, and the receiver's park word. Found once, when the endpoint
/// opens, so that a send does no layout arithmetic or bounds checks to
/// ring.
#[derive(Debug, Clone, Copy)]
pub(super) struct Doorbell {
    word: NonNull<AtomicU64>,
    bit: u64,
    park: NonNull<AtomicU32>,
    to: u32,
}

impl Doorbell {
    /// `to`'s doorbell as rung by `from`; both `< workers`.
    pub(super) fn new(segment: &Segment, to: u32, from: u32) -> Self {
        Self {
            word: NonNull::from(&segment.bells(to)[(from / 64) as usize]),
            bit: 1u64 << (from % 64),
            park: NonNull::from(segment.park(to)),
            to,
        }
    }

    /// [`Segment::notify`] through the cached addresses. `segment` must be
    /// the segment this was made from.
    #[inline(always)]
    pub(super) fn ring(&self, segment: &Segment) -> bool {
        // SAFETY: both point into `segment`'s mapping (`new`), which lives
        // as long as the endpoint holding this and its `segment`; atomics
        // only, shared with other processes by design.
        let (word, park) = unsafe { (self.word.as_ref(), self.park.as_ref()) };
        wake::notify(word, self.bit, park, || segment.ring_fd(self.to))
    }
}

/// One side of a blocking wait, driven by [`spin_then_park`]: what it
/// looks for and how it sleeps.
pub(super) trait Wait {
    /// What ends the wait.
    type Found;
    /// Why the wait ended without it.
    type Error;

    /// How often the wait reads the clock while it spins.
    fn pace(&self) -> Pace;

    /// Looks once for what the wait is for (`Some` ends it). Runs in the
    /// spin loop: cheap, and without a system call.
    fn look(&mut self) -> Result<Option<Self::Found>, Self::Error>;

    /// While spinning, before each clock read, after `looks` looks.
    fn spinning(&mut self, _looks: u32) {}

    /// Announces the sleep, so that whoever ends the wait wakes it, looks
    /// again, and sleeps at most `timeout` unless that look found it.
    fn park(&mut self, timeout: Duration) -> Result<Option<Self::Found>, Self::Error>;

    /// The error for a deadline that has passed.
    fn timed_out(&self) -> Self::Error;
}

/// How often a spinning wait reads the clock: every `looks_per_clock`
/// looks (a power of two), with `spins_per_look` spin-loop hints between
/// two looks.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pace {
    pub(super) spins_per_look: u32,
    pub(super) looks_per_clock: u32,
}

/// Waits by `strategy` until `wait` finds what it waits for, or until
/// `deadline`: looks, spinning at `wait`'s pace, until the spin phase
/// ends, then parks (each sleep at most [`SAFETY_NET`] long) and looks
/// again after each wake.
pub(super) fn spin_then_park<W: Wait>(
    wait: &mut W,
    strategy: WaitStrategy,
    deadline: Option<Instant>,
) -> Result<W::Found, W::Error> {
    let spin_until = strategy.spin_until();
    let pace = wait.pace();
    debug_assert!(pace.looks_per_clock.is_power_of_two());
    // A mask, not `%`: the divisor is not a constant here, and a division
    // on every look of a spin showed in the messenger's round trip.
    let clock_mask = pace.looks_per_clock - 1;
    let mut looks = 0u32;
    loop {
        if let Some(found) = wait.look()? {
            return Ok(found);
        }
        looks = looks.wrapping_add(1);
        if looks & clock_mask != 0 {
            for _ in 0..pace.spins_per_look {
                std::hint::spin_loop();
            }
            continue;
        }
        wait.spinning(looks);
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            return Err(wait.timed_out());
        }
        if spin_until.is_some_and(|s| now >= s) {
            let timeout = deadline.map_or(SAFETY_NET, |d| (d - now).min(SAFETY_NET));
            if let Some(found) = wait.park(timeout)? {
                return Ok(found);
            }
        }
    }
}

/// What ends a receive wait early, besides a message and the deadline.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Interrupt<'a> {
    /// Set by another thread of this process, which then rings this slot's
    /// own doorbell bit to end a park.
    pub(crate) flag: &'a std::sync::atomic::AtomicBool,
    /// The segment's death count the caller last looked at (`None`: it
    /// waits on nobody): a death since ends the wait. The master rings
    /// every slot after counting one, so a parked waiter wakes for it.
    pub(crate) deaths: Option<u32>,
}

impl Interrupt<'_> {
    #[inline(always)]
    pub(super) fn ended(&self, segment: &Segment) -> bool {
        self.flag.load(Relaxed)
            || self
                .deaths
                .is_some_and(|d| segment.control().deaths.load(Acquire) != d)
    }
}
