//! What the call core knows of the cluster: [`Peers`], read when the core
//! is asked to look.

use super::super::leader::LeaderWatch;
use super::super::{Leader, WorkerId};

/// What the core needs to know of the cluster, read when it is asked to
/// look: the messenger's [`ClusterView`](crate::cluster::ClusterView) and
/// the lock table for a real driver, a table in the tests.
pub(crate) trait Peers {
    /// Slots in the segment.
    fn workers(&self) -> u32;
    /// The generation of the worker now live in `slot`, if any.
    fn live_generation(&self, slot: u32) -> Option<u32>;
    /// Live workers now, in slot order.
    fn live_workers(&self) -> Vec<WorkerId> {
        (0..self.workers())
            .filter_map(|slot| {
                self.live_generation(slot)
                    .map(|generation| WorkerId::local(slot, generation))
            })
            .collect()
    }
    /// How `slot` stands for a consume, cheap to read: whether the master
    /// is draining it, and whether it runs (is not parked).
    fn standing(&self, slot: u32) -> Standing;
    /// What `slot` has in hand from every caller: read only for the
    /// workers a consume may pick, after [`Peers::standing`].
    fn backlog(&self, slot: u32) -> Backlog;
    /// The default role's live leader and the watch of its term.
    fn leader(&self) -> Option<(Leader, Option<LeaderWatch>)>;
    /// Whether the leader watched by `watch` is known dead (before the
    /// master reaps it: see [`LeaderWatch`]).
    fn leader_died(&self, watch: &LeaderWatch) -> bool;
    /// The host's live NATS bridge (feature `nats`), never among
    /// [`Peers::live_workers`]: a map asks it for the other hosts'
    /// entries, a consume spills to it, a call to another host goes
    /// through it. `None` without one, and for the bridge itself.
    fn bridge(&self) -> Option<WorkerId> {
        None
    }
    /// How many other hosts the bridge sees connected now (read only when
    /// a consume may spill).
    fn remote_hosts(&self) -> u32 {
        1
    }
}

/// A consume candidate's standing: see [`Peers::standing`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Standing {
    /// The master is draining it (a rolling reload replaces it): it gets
    /// new tasks only if no other worker can take them.
    pub(crate) draining: bool,
    /// Not parked on its futex or eventfd: a task sent to it costs no wake.
    pub(crate) running: bool,
}

/// What a worker has in hand, from every caller: see [`Peers::backlog`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Backlog {
    /// Bytes waiting in its inbox.
    pub(crate) queued: u64,
    /// A consume's handler runs there now.
    pub(crate) busy: bool,
}
