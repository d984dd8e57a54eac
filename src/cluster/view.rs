//! What a worker may read of the cluster's state, read-only: who is live
//! (and in which generation), who is draining, how deep each inbox is,
//! whether this worker was told to stop, and the stats. The messenger reads
//! the cluster through this and nothing else.

use std::sync::atomic::Ordering::{Acquire, Relaxed};

use super::WorkerState;
use crate::messenger::WorkerId;
use crate::segment::Segment;

/// One worker's read-only view of the cluster it belongs to.
#[derive(Clone, Copy)]
pub(crate) struct ClusterView<'a> {
    segment: &'a Segment,
    /// The worker looking (live by definition).
    me: WorkerId,
}

impl<'a> ClusterView<'a> {
    pub(crate) fn new(segment: &'a Segment, me: WorkerId) -> Self {
        Self { segment, me }
    }

    /// The worker looking.
    pub(crate) fn me(&self) -> WorkerId {
        self.me
    }

    /// Slots in the segment.
    pub(crate) fn workers(&self) -> u32 {
        self.segment.layout().workers()
    }

    /// The generation of the worker now in `slot`, if one is live. A worker
    /// is live while the master's table says `Starting`, `Ready` or
    /// `Draining`; without a master, while its slot is claimed by a live
    /// process.
    pub(crate) fn live_generation(&self, slot: u32) -> Option<u32> {
        if slot == self.me.slot {
            return Some(self.me.generation);
        }
        if slot >= self.workers() {
            return None;
        }
        let segment = self.segment;
        if segment.control().master_pid.load(Acquire) != 0 {
            let entry = segment.worker_entry(slot);
            let state = WorkerState::from_raw(entry.state.load(Acquire));
            matches!(
                state,
                WorkerState::Starting | WorkerState::Ready | WorkerState::Draining
            )
            .then(|| entry.generation.load(Acquire))
        } else {
            // A slot never claimed, or released, costs no system call. Else
            // the generation before the claim: should a successor claim the
            // slot in between, this answers with its dead predecessor's
            // generation for one look, and a call made on it settles as
            // `WorkerDied` at the next (never the other way round: a live
            // worker seen dead).
            let control = segment.slot(slot);
            if control.owner.load(Acquire) == 0 {
                return None;
            }
            let generation = control.generation.load(Acquire);
            segment.slot_held(slot).then_some(generation)
        }
    }

    /// Live workers now, in slot order: the application's, never the
    /// host's NATS bridge (see [`ClusterView::bridge`]).
    pub(crate) fn live_workers(&self) -> Vec<WorkerId> {
        let bridge = self.bridge_index();
        (0..self.workers())
            .filter(|&slot| bridge.is_none_or(|b| !self.is_index(slot, b)))
            .filter_map(|slot| {
                self.live_generation(slot)
                    .map(|generation| WorkerId::local(slot, generation))
            })
            .collect()
    }

    /// The host's NATS bridge, if the master runs one and it is live now
    /// (feature `nats`): the worker that carries broadcasts, maps,
    /// consumes and calls to other hosts. `None` for the bridge itself.
    pub(crate) fn bridge(&self) -> Option<WorkerId> {
        let index = self.bridge_index()?;
        (0..self.workers())
            .filter(|&slot| slot != self.me.slot && self.is_index(slot, index))
            .find_map(|slot| {
                self.live_generation(slot)
                    .map(|generation| WorkerId::local(slot, generation))
            })
    }

    /// How many other hosts the bridge sees connected now.
    pub(crate) fn remote_hosts(&self) -> u32 {
        self.segment.control().bridge_hosts.load(Relaxed)
    }

    /// The longest call (header and data) that may cross hosts, if this
    /// host has a bridge that knows the NATS server's `max_payload`.
    pub(crate) fn cross_host_limit(&self) -> Option<usize> {
        self.bridge_index()?;
        let max = self.segment.control().bridge_max_payload.load(Relaxed) as usize;
        (max != 0).then(|| max.saturating_sub(crate::messenger::wire::BRIDGE_FRAME_OVERHEAD))
    }

    /// The bridge's instance index (`Control::bridge`), one load.
    fn bridge_index(&self) -> Option<u32> {
        self.segment.control().bridge.load(Acquire).checked_sub(1)
    }

    /// Whether the worker table gives `slot` instance `index`.
    fn is_index(&self, slot: u32, index: u32) -> bool {
        self.segment.worker_entry(slot).index.load(Acquire) == index
    }

    /// Whether the master is draining the worker in `slot` (a rolling
    /// reload replaces it).
    pub(crate) fn is_draining(&self, slot: u32) -> bool {
        self.segment.control().master_pid.load(Acquire) != 0
            && WorkerState::from_raw(self.segment.worker_entry(slot).state.load(Acquire))
                == WorkerState::Draining
    }

    /// Bytes waiting in `slot`'s inbox, from every sender.
    pub(crate) fn inbox_depth(&self, slot: u32) -> u64 {
        (0..self.workers())
            .map(|from| self.segment.lane(from, slot).depth())
            .fold(0, u64::saturating_add)
    }

    /// Whether the worker in `slot` runs (is not parked on its futex or
    /// eventfd): one load of its park word. `slot < workers`.
    pub(crate) fn is_running(&self, slot: u32) -> bool {
        crate::wake::is_running(self.segment.park(slot))
    }

    /// What `slot` has in hand for a consume: the bytes in its inbox, then
    /// whether a consume's handler runs there. Read in that order: the
    /// worker marks itself busy before the task leaves its lane (the
    /// lane's head store is a release, its load here an acquire), so a
    /// task that fits one record is seen in one place or the other. A
    /// hint, not a promise: a task in fragments has left the lane before
    /// the mark is set, and a deferred or async handler's mark is cleared
    /// when it is handed over, not when it ends.
    pub(crate) fn consume_backlog(&self, slot: u32) -> (u64, bool) {
        let queued = self.inbox_depth(slot);
        let busy = self.segment.stats_entry(slot).consume_busy.load(Relaxed) != 0;
        (queued, busy)
    }

    /// Whether this worker was asked to stop (drain or shutdown), or its
    /// process got `SIGTERM`/`SIGINT`.
    #[cfg(feature = "tokio")]
    pub(crate) fn stop_requested(&self) -> bool {
        super::worker::stop_requested(self.segment, self.me.slot)
    }

    /// The deaths the master has counted (see `Control::deaths`).
    pub(crate) fn deaths(&self) -> u32 {
        self.segment.control().deaths.load(Acquire)
    }

    /// Every slot's state and counters.
    pub(crate) fn stats(&self) -> super::ClusterStats {
        super::read_stats(self.segment)
    }
}
