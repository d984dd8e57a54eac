//! One worker slot's view of the segment: raw-bytes send and receive.

use std::cell::Cell;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use crate::error::{EndpointError, LaneCorruption, RecvError, SendError, TryRecvError, TrySendError};
use crate::lane::{self, flags, Consumer, Next, Planned, Producer, RecordHeader, RECORD_HEADER};
use crate::segment::table::StatsEntry;
use crate::segment::Segment;
use crate::{sys, wake};

/// The longest a futex wait lasts before the waiter looks again by itself.
/// The park/notify handshake loses no wakeup (`tests/loom.rs`), so this only
/// bounds the damage a buggy peer could do by scribbling on a park word.
const SAFETY_NET: Duration = Duration::from_millis(50);

/// Bytes a fragmented send keeps free after each piece but the last: room
/// for an `ABORT` record and the padding before it.
const FRAGMENT_KEEP: usize = 2 * RECORD_HEADER;

/// How a blocked receiver (or a sender facing a full lane) waits.
///
/// Measured on the project's reference machine (2 vCPUs, a VM; README,
/// "Benchmarks"): a 64-byte round trip between two processes takes about
/// 0.75 µs when the receiver spins and about 65 µs when it sleeps on the
/// futex, because waking a vCPU costs about 30 µs there.
///
/// The default, `SpinThenPark(50 µs)`, is the classic spin-then-block rule:
/// spin for about what one sleep-and-wake costs. A message that arrives
/// within 50 µs (a request's reply, a busy stream) is picked up at spinning
/// speed; an idle receiver burns at most 50 µs of CPU before it sleeps, so
/// it never pays more than about twice the best of the two choices. With
/// more busy workers than cores, prefer `Park`: a spinning receiver takes the
/// core the sender it waits for needs.
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
    /// The spin phase of the default strategy: about the cost of one futex
    /// sleep and wake on the reference machine.
    pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);
}

impl Default for WaitStrategy {
    fn default() -> Self {
        Self::SpinThenPark(Self::DEFAULT_SPIN)
    }
}

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
/// use shmcluster::{Config, Segment};
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
    lane_capacity: usize,
    /// Indexed by receiving slot.
    outbound: Vec<Producer>,
    /// Indexed by sending slot.
    inbound: Vec<Inbound>,
    /// Lanes (by sender) that may hold data: doorbell bits taken, not yet
    /// found empty.
    pending: Vec<u64>,
    /// The bits of `pending`'s last word that name real slots: a doorbell
    /// bit for a slot that does not exist (written by a buggy process) is
    /// dropped.
    pending_mask: u64,
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
    /// Rings `from`'s bit in `to`'s doorbell (word `from / 64`) and wakes
    /// `to` if it is parked, by futex or eventfd (see [`wake::notify`]).
    /// Returns whether it issued a wake.
    pub(crate) fn notify(&self, to: u32, from: u32) -> bool {
        let word = &self.bells(to)[(from / 64) as usize];
        wake::notify(word, 1u64 << (from % 64), self.park(to), || self.ring_fd(to))
    }

    /// Opens slot `slot` for a worker the master started with generation
    /// `generation` (the master bumped the slot's generation before starting
    /// it): claims the slot without bumping it again.
    pub(crate) fn endpoint_assigned(&self, slot: u32, generation: u32) -> Result<Endpoint, EndpointError> {
        Endpoint::open(self, slot, Some(generation))
    }

    /// The master's clean-up after the worker in `slot` (generation
    /// `generation`) died, once its table entry says so: the death counted
    /// in [`Control::deaths`](crate::segment::table::Control), an `ABORT`
    /// record in each outbound lane where it died half way through a
    /// fragmented message (so the receiver drops the part it has; nowhere
    /// else, so lanes to slots nobody reads do not fill with them), its
    /// park word reset,
    /// the slot released, and every slot rung (its doorbell bit for the
    /// dead slot, through the park protocol, so no wake is lost) and every
    /// space waiter on its lanes woken: a caller waiting on the dead worker
    /// learns it now. Messages queued *to* the slot stay for its successor.
    pub(crate) fn reset_dead_slot(&self, slot: u32, generation: u32) {
        let workers = self.layout().workers();
        if slot >= workers {
            return;
        }
        // Release: pairs with the Acquire load in `wait_next` (and the
        // messenger's liveness check), made after the doorbell below is
        // taken; the table entry's `Dead` was stored before this.
        self.control().deaths.fetch_add(1, Release);
        for to in 0..workers {
            let mut out = Producer::new(self.lane(slot, to));
            if out.take_streaming() {
                abort_partial(&mut out, generation);
            }
        }
        self.park(slot).store(wake::EMPTY, Relaxed);
        self.slot(slot).owner.store(0, Release);
        for other in 0..workers {
            if other != slot {
                self.notify(other, slot);
            }
            sys::futex_wake(&self.lane(other, slot).ctl().sender.0.space_waiter, u32::MAX);
            sys::futex_wake(&self.lane(slot, other).ctl().sender.0.space_waiter, u32::MAX);
        }
    }

    /// Bumps slot `slot`'s generation for a worker about to be started
    /// (master only, while the slot is free). Never 0.
    pub(crate) fn next_generation(&self, slot: u32) -> u32 {
        let control = self.slot(slot);
        let mut generation = control.generation.fetch_add(1, AcqRel).wrapping_add(1);
        if generation == 0 {
            generation = control.generation.fetch_add(1, AcqRel).wrapping_add(1);
        }
        generation
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
        let mut outbound: Vec<Producer> = (0..workers)
            .map(|to| Producer::new(segment.lane(slot, to)))
            .collect();
        // A predecessor that died half way through a fragmented message,
        // with no master to clean up after it: its receiver drops the part
        // it has (the master does this for the slots it supervises).
        for (to, out) in outbound.iter_mut().enumerate() {
            if out.take_streaming() {
                abort_partial(out, generation);
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
        let pending_mask = if workers % 64 == 0 {
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
            lane_capacity: layout.lane_capacity(),
            outbound,
            inbound,
            pending,
            pending_mask,
            cursor: 0,
            wait: WaitStrategy::default(),
            local: Cell::new(LocalStats::default()),
            _not_sync: PhantomData,
        })
    }

    /// This endpoint's slot.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// This endpoint's generation: stamped on everything it sends, and
    /// different from every earlier holder of the slot's.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// How many slots the segment has.
    pub fn workers(&self) -> u32 {
        self.workers
    }

    /// The segment this endpoint lives in.
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

    // ---------------------------------------------------------------- send

    /// The checks every send makes before touching a lane.
    fn check_target(&self, to: u32, len: usize, max: usize) -> Result<(), Rejected> {
        if to >= self.workers {
            return Err(Rejected::NoSuchWorker {
                slot: to,
                workers: self.workers,
            });
        }
        if len > max {
            return Err(Rejected::TooLarge { len, max });
        }
        Ok(())
    }

    /// Rings `to`'s doorbell and wakes it if parked; after a publish.
    #[inline]
    fn notify(&self, to: u32) {
        if self.segment.notify(to, self.slot) {
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

    /// Sends `msg` to slot `to`, waiting as long as it takes for room.
    ///
    /// # Errors
    /// `NoSuchWorker`, `TooLarge` (over `max_message`), `SelfFull` (the lane
    /// to this endpoint itself is full), `Corrupt`. The message is given
    /// back where it was not sent.
    ///
    /// # Examples
    /// ```
    /// # let segment = shmcluster::Segment::create(&shmcluster::Config::new(2))?;
    /// let mut a = segment.endpoint(0)?;
    /// let mut b = segment.endpoint(1)?;
    /// a.send(1, vec![1, 2, 3])?;
    /// assert_eq!(b.recv()?.payload, [1, 2, 3]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn send<M: AsRef<[u8]>>(&mut self, to: u32, msg: M) -> Result<(), SendError<M>> {
        self.send_tagged(to, Tag::default(), msg, None)
    }

    /// Sends `msg` to slot `to`, waiting for room until `deadline`.
    ///
    /// # Errors
    /// As [`Endpoint::send`], plus `Timeout(msg)` if the lane stayed full
    /// until the deadline; then nothing of the message was delivered.
    pub fn send_deadline<M: AsRef<[u8]>>(
        &mut self,
        to: u32,
        msg: M,
        deadline: Instant,
    ) -> Result<(), SendError<M>> {
        self.send_tagged(to, Tag::default(), msg, Some(deadline))
    }

    /// Sends `msg` with `tag` to slot `to`, waiting for room until
    /// `deadline` (`None`: as long as it takes). A message longer than half
    /// a lane is streamed through it in fragments as the receiver drains.
    ///
    /// # Errors
    /// As [`Endpoint::send_deadline`].
    pub fn send_tagged<M: AsRef<[u8]>>(
        &mut self,
        to: u32,
        tag: Tag,
        msg: M,
        deadline: Option<Instant>,
    ) -> Result<(), SendError<M>> {
        let len = msg.as_ref().len();
        self.check_target(to, len, self.max_message)
            .map_err(SendError::from)?;
        let result = if len <= lane::max_record_payload(self.lane_capacity) {
            self.send_single(to, tag, msg.as_ref(), deadline)
        } else {
            self.send_fragmented(to, tag, msg.as_ref(), deadline)
        };
        result.map_err(|e| match e {
            Blocked::Timeout => SendError::Timeout(msg),
            Blocked::SelfFull => SendError::SelfFull(msg),
            Blocked::Corrupt(error) => SendError::Corrupt { slot: to, error, msg },
        })
    }

    fn send_single(
        &mut self,
        to: u32,
        tag: Tag,
        bytes: &[u8],
        deadline: Option<Instant>,
    ) -> Result<(), Blocked> {
        loop {
            let out = &mut self.outbound[to as usize];
            if let Some(planned) = out.plan(bytes.len(), 0)? {
                let hdr = self.header(to, tag, bytes.len(), flags::SINGLE, 0);
                let out = &mut self.outbound[to as usize];
                out.write(planned, hdr, bytes);
                out.publish();
                self.notify(to);
                self.count_sent(bytes.len());
                return Ok(());
            }
            let need = self.outbound[to as usize].need(bytes.len(), 0);
            self.wait_for_room(to, need, deadline)?;
        }
    }

    fn send_fragmented(
        &mut self,
        to: u32,
        tag: Tag,
        bytes: &[u8],
        deadline: Option<Instant>,
    ) -> Result<(), Blocked> {
        let piece = lane::max_record_payload(self.lane_capacity);
        let mut sent = 0;
        while sent < bytes.len() {
            let chunk = (bytes.len() - sent).min(piece);
            let last = sent + chunk == bytes.len();
            let first = sent == 0;
            let flags = match (first, last) {
                (true, _) => flags::FIRST,
                (false, true) => flags::LAST,
                (false, false) => flags::MIDDLE,
            };
            // Keep room for an ABORT (and the padding before it) after every
            // piece but the last, so giving up never needs to wait.
            let keep = if last { 0 } else { FRAGMENT_KEEP };
            loop {
                let out = &mut self.outbound[to as usize];
                if let Some(planned) = out.plan(chunk, keep)? {
                    let total = if first { bytes.len() as u64 } else { 0 };
                    let hdr = self.header(to, tag, chunk, flags, total);
                    let out = &mut self.outbound[to as usize];
                    if first {
                        // Before the first fragment is visible: should this
                        // process die before the last, its cleaner knows.
                        out.set_streaming(true);
                    }
                    out.write(planned, hdr, &bytes[sent..sent + chunk]);
                    out.publish();
                    if last {
                        out.set_streaming(false);
                    }
                    self.notify(to);
                    break;
                }
                let need = self.outbound[to as usize].need(chunk, keep);
                if let Err(e) = self.wait_for_room(to, need, deadline) {
                    if !first {
                        self.abort_message(to);
                    }
                    return Err(e);
                }
            }
            sent += chunk;
        }
        self.count_sent(bytes.len());
        Ok(())
    }

    /// Tells `to` to drop the fragments of the message it is assembling
    /// from us. The room was kept free by `send_fragmented`.
    fn abort_message(&mut self, to: u32) {
        let hdr = self.header(to, Tag::default(), 0, flags::ABORT, 0);
        let out = &mut self.outbound[to as usize];
        if let Ok(Some(planned)) = out.plan(0, 0) {
            out.commit(planned, hdr);
            out.publish();
            out.set_streaming(false);
            self.notify(to);
        }
    }

    fn header(&self, to: u32, tag: Tag, len: usize, flags: u16, total: u64) -> RecordHeader {
        let mut hdr = self.outbound[to as usize].header(self.generation, len, flags);
        hdr.kind = tag.kind;
        hdr.correlation = tag.correlation;
        hdr.total = total;
        hdr
    }

    /// When the spin phase of a wait starting now ends (`None`: never).
    fn spin_until(&self) -> Option<Instant> {
        match self.wait {
            WaitStrategy::Spin => None,
            WaitStrategy::SpinThenPark(d) => Some(Instant::now() + d),
            WaitStrategy::Park => Some(Instant::now()),
        }
    }

    /// Waits until `need` bytes are free in the lane to `to`, by the wait
    /// strategy, or until `deadline`.
    #[cold]
    fn wait_for_room(&mut self, to: u32, need: usize, deadline: Option<Instant>) -> Result<(), Blocked> {
        if to == self.slot {
            return Err(Blocked::SelfFull);
        }
        let spin_until = self.spin_until();
        // Hysteresis: once the lane is full, wait for a quarter of it (or
        // `need`, if more) to be free, not just for one record. The head is
        // the receiver's line, stored after every message; a sender that
        // re-read it for every record would pull that line across cores once
        // per message, slowing the receiver it is waiting for. For the same
        // reason a spinning sender looks at the head only every few hundred
        // nanoseconds.
        let target = need.max(self.lane_capacity / 4);
        StatsEntry::add(&self.segment.stats_entry(self.slot).full_waits, 1);
        let out = &mut self.outbound[to as usize];
        let mut spins = 0u32;
        loop {
            if out.has_room(target)? {
                return Ok(());
            }
            for _ in 0..16 {
                std::hint::spin_loop();
            }
            spins = spins.wrapping_add(1);
            if spins % 8 != 0 {
                continue;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(Blocked::Timeout);
            }
            if spin_until.is_some_and(|s| now >= s) {
                let timeout = deadline.map_or(SAFETY_NET, |d| (d - now).min(SAFETY_NET));
                StatsEntry::add(&self.segment.stats_entry(self.slot).futex_waits, 1);
                if out.wait_for_room(target, timeout)? {
                    return Ok(());
                }
            }
        }
    }

    /// Sends `msg` to slot `to` if the lane has room for all of it now.
    ///
    /// # Errors
    /// `NoSuchWorker`, `TooLarge`, `Corrupt`, or `Full(msg)` if the lane
    /// lacks room; nothing is delivered then. A message too long to ever fit
    /// in the lane at once is always `Full`: use a blocking send, which
    /// streams it.
    pub fn try_send<M: AsRef<[u8]>>(&mut self, to: u32, msg: M) -> Result<(), TrySendError<M>> {
        self.try_send_tagged(to, Tag::default(), msg)
    }

    /// [`Endpoint::try_send`] with a [`Tag`].
    ///
    /// # Errors
    /// As [`Endpoint::try_send`].
    pub fn try_send_tagged<M: AsRef<[u8]>>(
        &mut self,
        to: u32,
        tag: Tag,
        msg: M,
    ) -> Result<(), TrySendError<M>> {
        let bytes = msg.as_ref();
        let len = bytes.len();
        self.check_target(to, len, self.max_message)
            .map_err(TrySendError::from)?;
        let piece = lane::max_record_payload(self.lane_capacity);
        let out = &mut self.outbound[to as usize];
        let fits = match out.need_for_message(len, piece, FRAGMENT_KEEP) {
            Some(need) => out.has_room(need),
            None => Ok(false),
        };
        match fits {
            Err(error) => return Err(TrySendError::Corrupt { slot: to, error, msg }),
            Ok(false) => return Err(TrySendError::Full(msg)),
            Ok(true) => {}
        }
        // The room is there, so nothing below should wait; the deadline of
        // "now" makes sure it cannot (a peer scribbling on the head could
        // shrink the room mid-message: the send then aborts cleanly).
        let now = Some(Instant::now());
        let done = if len <= piece {
            self.send_single(to, tag, bytes, now)
        } else {
            self.send_fragmented(to, tag, bytes, now)
        };
        match done {
            Ok(()) => Ok(()),
            Err(Blocked::Corrupt(error)) => Err(TrySendError::Corrupt { slot: to, error, msg }),
            Err(Blocked::Timeout | Blocked::SelfFull) => Err(TrySendError::Full(msg)),
        }
    }

    /// Reserves `len` bytes in the lane to `to`, to be filled in place and
    /// then [committed](Reservation::commit): a message is serialized
    /// straight into shared memory with no intermediate buffer. Waits for
    /// room until `deadline` (`None`: as long as it takes).
    ///
    /// # Errors
    /// `NoSuchWorker`; `TooLarge` if `len` exceeds
    /// [`Endpoint::max_reservation`]; `Timeout(())`, `SelfFull(())`,
    /// `Corrupt`.
    ///
    /// # Examples
    /// ```
    /// # let segment = shmcluster::Segment::create(&shmcluster::Config::new(2))?;
    /// let mut a = segment.endpoint(0)?;
    /// let mut b = segment.endpoint(1)?;
    /// let mut r = a.reserve(1, 64, None)?;
    /// let n = {
    ///     use std::io::Write;
    ///     let mut w = &mut r[..];
    ///     write!(w, "sum = {}", 40 + 2)?;
    ///     64 - w.len()
    /// };
    /// r.commit_len(n);
    /// assert_eq!(b.recv()?.payload, b"sum = 42");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn reserve(
        &mut self,
        to: u32,
        len: usize,
        deadline: Option<Instant>,
    ) -> Result<Reservation<'_>, SendError<()>> {
        self.check_target(to, len, self.max_reservation())
            .map_err(SendError::from)?;
        loop {
            match self.outbound[to as usize].plan(len, 0) {
                Ok(Some(planned)) => return Ok(self.reservation(to, planned, len)),
                Ok(None) => {}
                Err(error) => {
                    return Err(SendError::Corrupt {
                        slot: to,
                        error,
                        msg: (),
                    })
                }
            }
            let need = self.outbound[to as usize].need(len, 0);
            self.wait_for_room(to, need, deadline).map_err(|e| match e {
                Blocked::Timeout => SendError::Timeout(()),
                Blocked::SelfFull => SendError::SelfFull(()),
                Blocked::Corrupt(error) => SendError::Corrupt {
                    slot: to,
                    error,
                    msg: (),
                },
            })?;
        }
    }

    /// [`Endpoint::reserve`] without waiting.
    ///
    /// # Errors
    /// `NoSuchWorker`, `TooLarge`, `Corrupt`, or `Full(())` if the lane
    /// lacks room now.
    pub fn try_reserve(&mut self, to: u32, len: usize) -> Result<Reservation<'_>, TrySendError<()>> {
        self.check_target(to, len, self.max_reservation())?;
        match self.outbound[to as usize].plan(len, 0) {
            Ok(Some(planned)) => Ok(self.reservation(to, planned, len)),
            Ok(None) => Err(TrySendError::Full(())),
            Err(error) => Err(TrySendError::Corrupt {
                slot: to,
                error,
                msg: (),
            }),
        }
    }

    fn reservation(&mut self, to: u32, planned: Planned, len: usize) -> Reservation<'_> {
        let ptr = self.outbound[to as usize].payload_ptr(planned);
        Reservation {
            endpoint: self,
            to,
            planned,
            ptr,
            len,
            tag: Tag::default(),
        }
    }

    // ------------------------------------------------------------- receive

    /// The next message from any lane: adds the doorbell's bits to the
    /// pending set (without clearing them, see [`wake`]) and polls.
    fn poll(&mut self) -> Result<Option<(u32, Next)>, (u32, LaneCorruption)> {
        wake::peek_doorbell(self.segment.bells(self.slot), &mut self.pending);
        self.mask_pending();
        self.scan()
    }

    /// A doorbell bit for a slot that does not exist (written by a buggy
    /// process) is dropped.
    fn mask_pending(&mut self) {
        if let Some(last) = self.pending.last_mut() {
            *last &= self.pending_mask;
        }
    }

    /// Polls each pending lane once, round-robin from `cursor`, and returns
    /// the first message found. A lane found empty stays pending while its
    /// sender's doorbell bit is set (that sender will not ring again); one
    /// whose bit is clear is dropped, because its sender sets the bit on its
    /// next message and the next peek picks it up. So a spinning receiver
    /// polls only the lanes that are in use.
    fn scan(&mut self) -> Result<Option<(u32, Next)>, (u32, LaneCorruption)> {
        let start = self.cursor;
        for (lo, hi) in [(start, self.workers), (0, start)] {
            let mut at = lo;
            while let Some(from) = self.next_pending(at, hi) {
                at = from + 1;
                let inbound = &mut self.inbound[from as usize];
                if inbound.poisoned.is_some() {
                    self.clear_pending(from);
                    continue;
                }
                match inbound.consumer.next() {
                    Ok(Some(next)) => {
                        self.cursor = if at == self.workers { 0 } else { at };
                        return Ok(Some((from, next)));
                    }
                    Ok(None) => {
                        let bell = &self.segment.bells(self.slot)[(from / 64) as usize];
                        if bell.load(Relaxed) & (1u64 << (from % 64)) == 0 {
                            self.clear_pending(from);
                        }
                    }
                    Err(error) => {
                        inbound.poisoned = Some(error);
                        self.clear_pending(from);
                        return Err((from, error));
                    }
                }
            }
        }
        Ok(None)
    }

    fn clear_pending(&mut self, from: u32) {
        self.pending[(from / 64) as usize] &= !(1u64 << (from % 64));
    }

    /// The first pending sender in `at..hi`.
    fn next_pending(&self, at: u32, hi: u32) -> Option<u32> {
        if at >= hi {
            return None;
        }
        let mut word = (at / 64) as usize;
        let mut bits = self.pending[word] & (u64::MAX << (at % 64));
        loop {
            if bits != 0 {
                let from = word as u32 * 64 + bits.trailing_zeros();
                return (from < hi).then_some(from);
            }
            word += 1;
            if word as u32 * 64 >= hi {
                return None;
            }
            bits = self.pending[word];
        }
    }

    /// On the way to sleep: takes (clears) the doorbell and polls every lane
    /// it named and every pending one. Returns a message if one turned up;
    /// otherwise every known lane is empty, the pending set is emptied, and
    /// the caller may park.
    #[cold]
    fn before_park(&mut self) -> Result<Option<(u32, Next)>, (u32, LaneCorruption)> {
        wake::take_doorbell(self.segment.bells(self.slot), &mut self.pending);
        self.mask_pending();
        let found = self.scan()?;
        if found.is_none() {
            self.pending.fill(0);
        }
        Ok(found)
    }

    /// Waits for the next message by the wait strategy, until `deadline`.
    fn wait_next(
        &mut self,
        deadline: Option<Instant>,
        interrupt: Option<Interrupt<'_>>,
    ) -> Result<(u32, Next), RecvError> {
        let corrupt = |(sender, error)| RecvError::Corrupt { sender, error };
        if let Some(found) = self.poll().map_err(corrupt)? {
            return Ok(found);
        }
        let spin_until = self.spin_until();
        let mut spins = 0u32;
        loop {
            if let Some(found) = self.poll().map_err(corrupt)? {
                return Ok(found);
            }
            // Someone of this process wants the waiting thread back (it
            // rang this slot's own doorbell to wake it from a park), or a
            // worker died since the caller last looked (the master rang
            // every doorbell after counting it).
            if interrupt.is_some_and(|i| i.ended(&self.segment)) {
                return Err(RecvError::Timeout);
            }
            spins = spins.wrapping_add(1);
            if spins % 64 != 0 && !matches!(self.wait, WaitStrategy::Park) {
                std::hint::spin_loop();
                continue;
            }
            if spins % 4096 == 0 {
                self.beat();
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(RecvError::Timeout);
            }
            if spin_until.is_some_and(|s| now >= s) {
                if let Some(found) = self.before_park().map_err(corrupt)? {
                    return Ok(found);
                }
                // Again, now that the doorbell is taken: a ring that found
                // its bit still set (an earlier, spurious one) woke nobody,
                // trusting this taking to see what came before it (F1/F2
                // in `wake`), the death count and the outbox flag included.
                if interrupt.is_some_and(|i| i.ended(&self.segment)) {
                    return Err(RecvError::Timeout);
                }
                let timeout = deadline.map_or(SAFETY_NET, |d| (d - now).min(SAFETY_NET));
                StatsEntry::add(&self.segment.stats_entry(self.slot).futex_waits, 1);
                self.beat();
                wake::park(
                    self.segment.park(self.slot),
                    self.segment.bells(self.slot),
                    timeout,
                );
            }
        }
    }

    fn received(&mut self, (sender, next): (u32, Next)) -> Received<'_> {
        self.count_received(match &next {
            Next::InLane { hdr, .. } => hdr.len as usize,
            Next::Assembled { payload, .. } => payload.len(),
        });
        match next {
            Next::InLane { hdr, offset, record } => {
                let ptr = self.inbound[sender as usize].consumer.payload_ptr(offset);
                Received {
                    endpoint: self,
                    sender,
                    hdr,
                    body: Body::Lane { ptr, record },
                }
            }
            Next::Assembled { hdr, payload } => Received {
                endpoint: self,
                sender,
                hdr,
                body: Body::Owned(payload),
            },
        }
    }

    /// Waits for the next message and copies it out.
    ///
    /// # Errors
    /// [`RecvError::Corrupt`] if a lane turned out to hold garbage (that
    /// lane is poisoned; call again to keep receiving from the others).
    pub fn recv(&mut self) -> Result<Message, RecvError> {
        self.recv_ref(None).map(Received::into_message)
    }

    /// Waits until `deadline` for the next message and copies it out.
    ///
    /// # Errors
    /// [`RecvError::Timeout`], or [`RecvError::Corrupt`] as for
    /// [`Endpoint::recv`].
    pub fn recv_deadline(&mut self, deadline: Instant) -> Result<Message, RecvError> {
        self.recv_ref(Some(deadline)).map(Received::into_message)
    }

    /// Waits up to `timeout` for the next message and copies it out.
    ///
    /// # Errors
    /// As [`Endpoint::recv_deadline`].
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Message, RecvError> {
        self.recv_deadline(Instant::now() + timeout)
    }

    /// The next message if one is waiting, copied out.
    ///
    /// # Errors
    /// [`TryRecvError::Empty`] if none is, [`TryRecvError::Corrupt`] as for
    /// [`Endpoint::recv`].
    pub fn try_recv(&mut self) -> Result<Message, TryRecvError> {
        self.try_recv_ref().map(Received::into_message)
    }

    /// Waits until `deadline` (`None`: as long as it takes) for the next
    /// message and lends it without copying: see [`Received`].
    ///
    /// # Errors
    /// As [`Endpoint::recv_deadline`].
    pub fn recv_ref(&mut self, deadline: Option<Instant>) -> Result<Received<'_>, RecvError> {
        let found = self.wait_next(deadline, None)?;
        Ok(self.received(found))
    }

    /// [`Endpoint::recv_ref`] that also returns (as `Timeout`) as soon as
    /// `interrupt` says so (see [`Interrupt`]).
    pub(crate) fn recv_ref_interruptible(
        &mut self,
        deadline: Option<Instant>,
        interrupt: Interrupt<'_>,
    ) -> Result<Received<'_>, RecvError> {
        let found = self.wait_next(deadline, Some(interrupt))?;
        Ok(self.received(found))
    }

    /// For an async receiver about to wait: the next message if one is
    /// waiting, else (the doorbell taken and every lane found empty, as
    /// before a park) `None`, after which the caller may announce its park
    /// ([`Endpoint::park_fd_begin`] or a waiter thread's [`wake::park`]).
    #[cfg(feature = "tokio")]
    pub(crate) fn try_recv_before_park(&mut self) -> Result<Option<Received<'_>>, RecvError> {
        let corrupt = |(sender, error)| RecvError::Corrupt { sender, error };
        let found = match self.poll().map_err(corrupt)? {
            Some(found) => Some(found),
            None => self.before_park().map_err(corrupt)?,
        };
        Ok(found.map(|f| self.received(f)))
    }

    /// Async receiver: announces that it waits on its eventfd; false if a
    /// doorbell rang since [`Endpoint::try_recv_before_park`] (poll again).
    /// Counts the wait and beats the heartbeat.
    #[cfg(feature = "tokio")]
    pub(crate) fn park_fd_begin(&self) -> bool {
        let parked = wake::park_fd_begin(self.segment.park(self.slot), self.segment.bells(self.slot));
        if parked {
            StatsEntry::add(&self.segment.stats_entry(self.slot).futex_waits, 1);
            self.beat();
        }
        parked
    }

    /// Async receiver: running again after its wait (the eventfd is read
    /// by whoever waited on it).
    #[cfg(feature = "tokio")]
    pub(crate) fn park_fd_end(&self) {
        wake::park_fd_end(self.segment.park(self.slot));
    }

    /// The next message if one is waiting, lent without copying: see
    /// [`Received`].
    ///
    /// # Errors
    /// As [`Endpoint::try_recv`].
    ///
    /// # Examples
    /// ```
    /// # let segment = shmcluster::Segment::create(&shmcluster::Config::new(1))?;
    /// let mut me = segment.endpoint(0)?;
    /// me.send(0, b"to myself")?;
    /// let msg = me.try_recv_ref()?;
    /// assert!(msg.is_in_lane());
    /// assert_eq!(msg.payload(), b"to myself");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn try_recv_ref(&mut self) -> Result<Received<'_>, TryRecvError> {
        match self.poll() {
            Ok(Some(found)) => Ok(self.received(found)),
            Ok(None) => Err(TryRecvError::Empty),
            Err((sender, error)) => Err(TryRecvError::Corrupt { sender, error }),
        }
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

use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

/// Writes the `ABORT` that makes the receiver drop the message `out`'s
/// dead sender (generation `generation`) left half sent. The sender kept
/// room for it after every fragment but the last.
fn abort_partial(out: &mut Producer, generation: u32) {
    if let Ok(Some(planned)) = out.plan(0, 0) {
        out.commit(planned, out.header(generation, 0, flags::ABORT));
        out.publish();
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
    fn ended(&self, segment: &Segment) -> bool {
        self.flag.load(Relaxed)
            || self
                .deaths
                .is_some_and(|d| segment.control().deaths.load(Acquire) != d)
    }
}

/// A send refused before any lane was touched.
enum Rejected {
    NoSuchWorker { slot: u32, workers: u32 },
    TooLarge { len: usize, max: usize },
}

impl<M> From<Rejected> for SendError<M> {
    fn from(r: Rejected) -> Self {
        match r {
            Rejected::NoSuchWorker { slot, workers } => Self::NoSuchWorker { slot, workers },
            Rejected::TooLarge { len, max } => Self::TooLarge { len, max },
        }
    }
}

impl<M> From<Rejected> for TrySendError<M> {
    fn from(r: Rejected) -> Self {
        match r {
            Rejected::NoSuchWorker { slot, workers } => Self::NoSuchWorker { slot, workers },
            Rejected::TooLarge { len, max } => Self::TooLarge { len, max },
        }
    }
}

/// Why a blocking send step stopped.
enum Blocked {
    Timeout,
    SelfFull,
    Corrupt(LaneCorruption),
}

impl From<LaneCorruption> for Blocked {
    fn from(e: LaneCorruption) -> Self {
        Self::Corrupt(e)
    }
}

enum Body {
    /// A single-record message, still in the lane.
    Lane { ptr: *const u8, record: usize },
    /// A message reassembled from fragments.
    Owned(Vec<u8>),
}

/// A message lent by [`Endpoint::recv_ref`] / [`Endpoint::try_recv_ref`].
///
/// A message that fit in one record (at most
/// [`Endpoint::max_reservation`] bytes) is read in place in the lane: no
/// copy at all, and the lane space is released when this is dropped. That is
/// sound because only the receiver moves the head, and the sender writes
/// nothing between head and tail. A message that arrived in fragments was
/// necessarily copied once, into the buffer this holds.
///
/// Hold it briefly: until it is dropped the sender cannot reuse that part of
/// the lane, and this endpoint cannot receive.
pub struct Received<'a> {
    endpoint: &'a mut Endpoint,
    sender: u32,
    hdr: RecordHeader,
    body: Body,
}

impl Received<'_> {
    /// The sending slot.
    pub fn sender(&self) -> u32 {
        self.sender
    }

    /// The sender's generation when it sent the message.
    pub fn generation(&self) -> u32 {
        self.hdr.generation
    }

    /// The sender's [`Tag`].
    pub fn tag(&self) -> Tag {
        Tag {
            kind: self.hdr.kind,
            correlation: self.hdr.correlation,
        }
    }

    /// Whether the payload is read in place in the lane (not copied).
    pub fn is_in_lane(&self) -> bool {
        matches!(self.body, Body::Lane { .. })
    }

    /// The message's bytes.
    pub fn payload(&self) -> &[u8] {
        match &self.body {
            // SAFETY: the consumer checked that `hdr.len` bytes at `ptr` lie
            // inside the ring and inside the published data; the sender does
            // not write them until the head moves past them, which happens
            // only when `self` (which borrows the endpoint mutably) drops.
            Body::Lane { ptr, .. } => unsafe { std::slice::from_raw_parts(*ptr, self.hdr.len as usize) },
            Body::Owned(v) => v,
        }
    }

    /// Copies (or, for a reassembled message, moves) the message out and
    /// releases its lane space.
    pub fn into_message(mut self) -> Message {
        let payload = match &mut self.body {
            Body::Lane { .. } => self.payload().to_vec(),
            Body::Owned(v) => std::mem::take(v),
        };
        Message {
            sender: self.sender,
            generation: self.hdr.generation,
            kind: self.hdr.kind,
            correlation: self.hdr.correlation,
            payload,
        }
    }
}

impl Drop for Received<'_> {
    fn drop(&mut self) {
        if let Body::Lane { record, .. } = self.body {
            self.endpoint.inbound[self.sender as usize]
                .consumer
                .consume(record);
        }
    }
}

impl std::fmt::Debug for Received<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received")
            .field("sender", &self.sender)
            .field("tag", &self.tag())
            .field("len", &self.payload().len())
            .field("in_lane", &self.is_in_lane())
            .finish()
    }
}

/// Space reserved in a lane by [`Endpoint::reserve`]: write the payload
/// through `DerefMut<Target = [u8]>`, then [`commit`](Reservation::commit).
/// Dropped without committing, nothing is sent.
///
/// The bytes are lane memory, initially holding whatever an earlier message
/// left there.
pub struct Reservation<'a> {
    endpoint: &'a mut Endpoint,
    to: u32,
    planned: Planned,
    ptr: *mut u8,
    len: usize,
    tag: Tag,
}

impl Reservation<'_> {
    /// Sets the tag the message will carry.
    pub fn set_tag(&mut self, tag: Tag) {
        self.tag = tag;
    }

    /// Publishes all the reserved bytes as one message.
    pub fn commit(self) {
        let len = self.len;
        self.commit_len(len);
    }

    /// Publishes the first `len` reserved bytes as one message.
    ///
    /// # Panics
    /// If `len` is more than was reserved.
    pub fn commit_len(self, len: usize) {
        assert!(
            len <= self.len,
            "committing {len} bytes of a {}-byte reservation",
            self.len
        );
        let hdr = self.endpoint.header(self.to, self.tag, len, flags::SINGLE, 0);
        let out = &mut self.endpoint.outbound[self.to as usize];
        out.commit(self.planned, hdr);
        out.publish();
        self.endpoint.notify(self.to);
        self.endpoint.count_sent(len);
    }
}

impl Deref for Reservation<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `plan` found `len` bytes of free lane space at `ptr`,
        // inside the ring; the receiver reads nothing past the published
        // tail, and this endpoint (borrowed mutably) is the lane's only
        // writer.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl DerefMut for Reservation<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `deref`; `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl std::fmt::Debug for Reservation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("to", &self.to)
            .field("len", &self.len)
            .finish()
    }
}

/// The async receiver's eventfd park, step by step (the driver in
/// `messenger::async_rt` runs these steps; a lost eventfd write would only
/// show there as a 50 ms timer wake, so it is checked here directly).
#[cfg(all(test, feature = "tokio", not(loom)))]
mod eventfd_park_tests {
    use crate::{sys, wake, Config, Segment};

    #[test]
    fn a_send_to_a_receiver_parked_on_its_eventfd_writes_the_eventfd() {
        let seg = Segment::create(&Config::new(2)).unwrap();
        let mut rx = seg.endpoint(0).unwrap();
        let mut tx = seg.endpoint(1).unwrap();
        let fd = seg.wake_fd(0).unwrap();
        assert!(sys::eventfd_read(fd).is_err(), "not readable before any park");
        assert!(rx.try_recv_before_park().unwrap().is_none());
        assert!(rx.park_fd_begin(), "nothing rang: may wait");
        assert_eq!(
            seg.park(0).load(std::sync::atomic::Ordering::Relaxed),
            wake::PARKED_FD
        );
        tx.send(0, b"wake up").unwrap();
        assert_eq!(sys::eventfd_read(fd).unwrap(), 1, "exactly one write");
        assert_eq!(
            seg.park(0).load(std::sync::atomic::Ordering::Relaxed),
            wake::NOTIFIED
        );
        rx.park_fd_end();
        assert_eq!(rx.try_recv_before_park().unwrap().unwrap().payload(), b"wake up");
        // A second message to a running receiver writes nothing.
        tx.send(0, b"again").unwrap();
        assert!(sys::eventfd_read(fd).is_err(), "no write while running");
        assert_eq!(rx.try_recv_before_park().unwrap().unwrap().payload(), b"again");
    }

    #[test]
    fn a_doorbell_rung_before_the_park_cancels_it() {
        let seg = Segment::create(&Config::new(2)).unwrap();
        let mut rx = seg.endpoint(0).unwrap();
        let mut tx = seg.endpoint(1).unwrap();
        assert!(rx.try_recv_before_park().unwrap().is_none());
        tx.send(0, b"in between").unwrap();
        assert!(!rx.park_fd_begin(), "the ring after the check is seen");
        assert_eq!(
            seg.park(0).load(std::sync::atomic::Ordering::Relaxed),
            wake::EMPTY
        );
        assert!(sys::eventfd_read(seg.wake_fd(0).unwrap()).is_err());
        assert_eq!(
            rx.try_recv_before_park().unwrap().unwrap().payload(),
            b"in between"
        );
    }

    #[test]
    fn the_master_cleanup_of_a_dead_slot_wakes_eventfd_parked_receivers() {
        let seg = Segment::create(&Config::new(3)).unwrap();
        let mut rx = seg.endpoint(0).unwrap();
        let dead = seg.endpoint(2).unwrap();
        let generation = dead.generation();
        std::mem::forget(dead); // as if its process died
        assert!(rx.try_recv_before_park().unwrap().is_none());
        assert!(rx.park_fd_begin());
        seg.reset_dead_slot(2, generation);
        assert!(
            sys::eventfd_read(seg.wake_fd(0).unwrap()).is_ok(),
            "woken by the clean-up"
        );
        rx.park_fd_end();
    }
}
