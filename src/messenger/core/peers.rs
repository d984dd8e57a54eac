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
                    .map(|generation| WorkerId { slot, generation })
            })
            .collect()
    }
    /// How loaded `slot` is for a consume: whether it is draining, and the
    /// bytes in its inbox (less is better, in that order).
    fn load(&self, slot: u32) -> (bool, u64);
    /// The default role's live leader and the watch of its term.
    fn leader(&self) -> Option<(Leader, Option<LeaderWatch>)>;
    /// Whether the leader watched by `watch` is known dead (before the
    /// master reaps it: see [`LeaderWatch`]).
    fn leader_died(&self, watch: &LeaderWatch) -> bool;
}
