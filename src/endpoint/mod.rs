//! One worker slot's view of the segment: raw-bytes send and receive.
//!
//! [`Endpoint`] holds a slot: here it is opened and its bookkeeping kept.
//! The rest is by operation: `send` (whole messages, streamed in fragments
//! when large), `reserve` (serialising in place), `recv` (polling the
//! lanes, lending what it finds), `wait` (how a blocked send or receive
//! spins, then parks) and `recovery` (cleaning up after a dead holder).

mod batch;
mod recovery;
mod recv;
mod reserve;
mod send;
mod wait;

use std::cell::Cell;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

use crate::error::{EndpointError, LaneCorruption};
use crate::lane::{self, Consumer, Producer};
use crate::segment::table::StatsEntry;
use crate::segment::Segment;
use crate::sys;
pub use batch::Batch;
use recovery::abort_partial;
pub use recv::Received;
pub use reserve::Reservation;
use wait::Doorbell;
pub(crate) use wait::Interrupt;
pub use wait::WaitStrategy;

/// The kind and correlation id stamped on a record. Both are carried
/// unchanged to the receiver; the raw layer gives them no meaning.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Tag {
    /// A message kind chosen by the sender.
    pub kind: u16,
    /// A correlation id chosen by the sender (for example to match replies).
    pub correlation: u64,
}

/// A received message, copied out of the lane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The sending slot.
    pub sender: u32,
    /// The sender's generation when it sent the message.
    pub generation: u32,
    /// The sender's [`Tag::kind`].
    pub kind: u16,
    /// The sender's [`Tag::correlation`].
    pub correlation: u64,
    /// The bytes sent.
    pub payload: Vec<u8>,
}

/// The sending side's bookkeeping for one lane.
#[derive(Debug)]
struct Outbound {
    lane: Producer,
    bell: Doorbell,
}

/// The receiving side's bookkeeping for one lane.
#[derive(Debug)]
struct Inbound {
    consumer: Consumer,
    poisoned: Option<LaneCorruption>,
}

/// A worker slot's endpoint: sends to any slot, receives from all of them.
///
/// Holds the slot exclusively (a second endpoint for the same slot, in any
/// process, gets [`EndpointError::SlotBusy`] while this one's process
/// lives). `Send` but not `Sync`: one thread at a time sends and receives.
/// An endpoint inherited across `fork()` must not be used in the child,
/// which opens its own slot instead.
///
/// # Examples
/// ```
/// use shmcluster::raw::{Config, Segment};
///
/// let segment = Segment::create(&Config::new(2))?;
/// let mut a = segment.endpoint(0)?;
/// let mut b = segment.endpoint(1)?;
/// a.send(1, b"hello")?;
/// let msg = b.recv()?;
/// assert_eq!((msg.sender, &msg.payload[..]), (0, &b"hello"[..]));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Endpoint {
    segment: Segment,
    /// The slot is this endpoint's while it holds this (see
    /// [`sys::claim`]): the kernel releases it when the process dies.
    /// `None` only for a worker the master assigned the slot to while a
    /// process that inherited its predecessor's claim still runs.
    _claim: Option<sys::claim::Claim>,
    slot: u32,
    generation: u32,
    pid: u32,
    workers: u32,
    max_message: usize,
    /// The longest message that goes out in one record: the smaller of
    /// `max_message` and [`lane::max_record_payload`].
    max_single: usize,
    lane_capacity: usize,
    /// Indexed by receiving slot.
    outbound: Vec<Outbound>,
    /// Indexed by sending slot.
    inbound: Vec<Inbound>,
    /// Lanes (by sender) that may hold data: doorbell bits taken, not yet
    /// found empty.
    pending: Vec<u64>,
    /// The bits of `pending`'s last word that name real slots: a doorbell
    /// bit for a slot that does not exist (written by a buggy process) is
    /// dropped.
    pending_mask: u64,
    /// This slot's own doorbell words (`pending.len()` of them), found once
    /// at open: every poll reads them.
    bells: NonNull<AtomicU64>,
    /// Where the next round-robin scan of `pending` starts.
    cursor: u32,
    wait: WaitStrategy,
    /// Counters not yet added to the slot's stats in the segment: kept
    /// here and flushed every [`FLUSH_EVERY`] messages and whenever the
    /// endpoint beats its heartbeat (before parking, while spinning idle),
    /// so the hot path touches no shared line for statistics.
    local: Cell<LocalStats>,
    _not_sync: PhantomData<Cell<()>>,
}

/// Messages between two flushes of an endpoint's counters.
const FLUSH_EVERY: u32 = 256;

#[derive(Debug, Default, Clone, Copy)]
struct LocalStats {
    sent_messages: u64,
    sent_bytes: u64,
    received_messages: u64,
    received_bytes: u64,
    unflushed: u32,
}

// SAFETY: the raw pointers inside the lanes point into the mapping that
// `segment` keeps alive for as long as the endpoint exists, in whichever
// thread; every access goes through `&mut self` or reads atomics.
unsafe impl Send for Endpoint {}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("slot", &self.slot)
            .field("generation", &self.generation)
            .field("wait", &self.wait)
            .finish_non_exhaustive()
    }
}

impl Segment {
    /// Opens the endpoint of worker slot `slot`, claiming the slot for this
    /// process. A slot whose previous holder's process has died is taken
    /// over: the new endpoint continues each lane where the old one's last
    /// complete record ended, with the next generation.
    ///
    /// # Errors
    /// [`EndpointError::NoSuchWorker`] if `slot >= workers`,
    /// [`EndpointError::SlotBusy`] if a live process (this one included)
    /// holds it.
    pub fn endpoint(&self, slot: u32) -> Result<Endpoint, EndpointError> {
        Endpoint::open(self, slot, None)
    }
}

impl Segment {
    /// Opens slot `slot` for a worker the master started with generation
    /// `generation` (the master bumped the slot's generation before starting
    /// it): claims the slot without bumping it again.
    pub(crate) fn endpoint_assigned(&self, slot: u32, generation: u32) -> Result<Endpoint, EndpointError> {
        Endpoint::open(self, slot, Some(generation))
    }
}

impl Endpoint {
    fn open(segment: &Segment, slot: u32, assigned: Option<u32>) -> Result<Self, EndpointError> {
        let layout = *segment.layout();
        let workers = layout.workers();
        if slot >= workers {
            return Err(EndpointError::NoSuchWorker { slot, workers });
        }
        let control = segment.slot(slot);
        let pid = sys::getpid();
        // Whoever holds the slot's claim holds the slot; a holder that died
        // lost it with its last descriptor, so its slot is taken over. Its
        // pid in `owner` decides nothing: it is only told (stats, errors).
        let claim = match sys::claim::claim(segment.fd(), slot) {
            Ok(Some(claim)) => Some(claim),
            Ok(None) if assigned.is_some() => {
                // The master reaped the slot's last worker and gave it to
                // this one (its generation, checked below, says so): the
                // claim is held by something its predecessor left behind,
                // a child it forked without exec, say. The master's table
                // is what decides liveness in a cluster, so go on rather
                // than crash-loop the slot until that process ends.
                tracing::warn!(
                    slot,
                    "the slot's claim is held by a process the previous worker left; serving without it"
                );
                None
            }
            Ok(None) => {
                return Err(EndpointError::SlotBusy {
                    slot,
                    pid: control.owner.load(Acquire),
                })
            }
            Err(e) => {
                return Err(EndpointError::Claim {
                    slot,
                    reason: e.to_string(),
                })
            }
        };
        control.owner.store(pid, Release);
        let generation = match assigned {
            None => segment.next_generation(slot),
            Some(expected) => {
                let found = control.generation.load(Acquire);
                if found != expected {
                    control.owner.store(0, Release);
                    return Err(EndpointError::StaleGeneration {
                        slot,
                        expected,
                        found,
                    });
                }
                expected
            }
        };
        let mut outbound: Vec<Outbound> = (0..workers)
            .map(|to| Outbound {
                lane: Producer::new(segment.lane(slot, to)),
                bell: Doorbell::new(segment, to, slot),
            })
            .collect();
        // A predecessor that died half way through a fragmented message,
        // with no master to clean up after it: its receiver drops the part
        // it has (the master does this for the slots it supervises).
        for (to, out) in outbound.iter_mut().enumerate() {
            if out.lane.take_streaming() {
                abort_partial(&mut out.lane, generation);
                segment.notify(to as u32, slot);
            }
        }
        let inbound = (0..workers)
            .map(|from| Inbound {
                consumer: Consumer::new(segment.lane(from, slot), layout.max_message()),
                poisoned: None,
            })
            .collect();
        // Look at every lane once: messages may have been queued before this
        // endpoint existed (and their doorbell bits taken by a predecessor).
        let pending_mask = if workers.is_multiple_of(64) {
            u64::MAX
        } else {
            (1u64 << (workers % 64)) - 1
        };
        let mut pending = vec![u64::MAX; layout.bell_words];
        if let Some(last) = pending.last_mut() {
            *last = pending_mask;
        }
        Ok(Self {
            segment: segment.clone(),
            _claim: claim,
            slot,
            generation,
            pid,
            workers,
            max_message: layout.max_message(),
            max_single: layout
                .max_message()
                .min(lane::max_record_payload(layout.lane_capacity())),
            lane_capacity: layout.lane_capacity(),
            outbound,
            inbound,
            bells: NonNull::from(&segment.bells(slot)[0]),
            pending,
            pending_mask,
            cursor: 0,
            wait: WaitStrategy::default(),
            local: Cell::new(LocalStats::default()),
            _not_sync: PhantomData,
        })
    }

    /// This endpoint's slot.
    #[inline]
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// This endpoint's generation: stamped on everything it sends, and
    /// different from every earlier holder of the slot's.
    #[inline]
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// How many slots the segment has.
    #[inline]
    pub fn workers(&self) -> u32 {
        self.workers
    }

    /// The segment this endpoint lives in.
    #[inline]
    pub fn segment(&self) -> &Segment {
        &self.segment
    }

    /// How this endpoint waits when blocked.
    pub fn wait_strategy(&self) -> WaitStrategy {
        self.wait
    }

    /// Sets how this endpoint waits when blocked (receiving, or sending to a
    /// full lane).
    pub fn set_wait_strategy(&mut self, wait: WaitStrategy) {
        self.wait = wait;
    }

    /// The largest payload [`Endpoint::reserve`] can hand out: one record,
    /// just under half a lane.
    #[inline]
    pub fn max_reservation(&self) -> usize {
        lane::max_record_payload(self.lane_capacity).min(self.max_message)
    }

    /// Lanes found corrupt so far, by sender. They are no longer read.
    pub fn poisoned_lanes(&self) -> impl Iterator<Item = (u32, LaneCorruption)> + '_ {
        self.inbound
            .iter()
            .enumerate()
            .filter_map(|(s, i)| i.poisoned.map(|e| (s as u32, e)))
    }

    /// Fragments dropped because their message could never complete: its
    /// sender died (or gave up) half way through.
    pub fn discarded_fragments(&self) -> u64 {
        self.inbound.iter().map(|i| i.consumer.discarded).sum()
    }

    /// This slot's doorbell words.
    #[inline(always)]
    fn bells(&self) -> &[AtomicU64] {
        // SAFETY: `bells` is the first of this slot's `bell_words` (=
        // `pending.len()`) doorbell words in the mapping, which `segment`
        // keeps alive as long as `self`; atomics, shared by design.
        unsafe { std::slice::from_raw_parts(self.bells.as_ptr(), self.pending.len()) }
    }

    /// Rings `to`'s doorbell and wakes it if parked; after a publish.
    #[inline(always)]
    fn notify(&self, to: u32) {
        if self.outbound[to as usize].bell.ring(&self.segment) {
            self.count_wake();
        }
    }

    #[cold]
    fn count_wake(&self) {
        StatsEntry::add(&self.segment.stats_entry(self.slot).futex_wakes, 1);
    }

    /// Counts a whole message sent (this endpoint is its slot's only
    /// writer of these counters).
    #[inline]
    fn count_sent(&self, bytes: usize) {
        let mut l = self.local.get();
        l.sent_messages += 1;
        l.sent_bytes += bytes as u64;
        l.unflushed += 1;
        self.local.set(l);
        if l.unflushed >= FLUSH_EVERY {
            self.beat();
        }
    }

    /// Counts a message received.
    #[inline]
    fn count_received(&self, bytes: usize) {
        let mut l = self.local.get();
        l.received_messages += 1;
        l.received_bytes += bytes as u64;
        l.unflushed += 1;
        self.local.set(l);
        if l.unflushed >= FLUSH_EVERY {
            self.beat();
        }
    }

    /// Adds the local counters to the slot's stats in the segment and bumps
    /// the slot's heartbeat in the worker table: this worker is alive.
    #[cold]
    pub(crate) fn beat(&self) {
        let l = self.local.take();
        let stats = self.segment.stats_entry(self.slot);
        StatsEntry::add(&stats.sent_messages, l.sent_messages);
        StatsEntry::add(&stats.sent_bytes, l.sent_bytes);
        StatsEntry::add(&stats.received_messages, l.received_messages);
        StatsEntry::add(&stats.received_bytes, l.received_bytes);
        let hb = &self.segment.worker_entry(self.slot).heartbeat;
        hb.store(hb.load(Relaxed).wrapping_add(1), Relaxed);
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        // Release the slot, unless this is a copy inherited across fork(),
        // whose slot belongs to the parent.
        if sys::getpid() == self.pid {
            self.beat();
            let _ = self
                .segment
                .slot(self.slot)
                .owner
                .compare_exchange(self.pid, 0, AcqRel, Acquire);
        }
    }
}
