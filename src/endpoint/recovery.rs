//! Cleaning up after a slot's dead holder: what the master does once it
//! has reaped a worker, and what a new endpoint does on taking over a slot
//! whose holder died with no master to clean up.

use std::sync::atomic::Ordering::{AcqRel, Relaxed, Release};

use crate::lane::{flags, Producer};
use crate::segment::Segment;
use crate::{sys, wake};

impl Segment {
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

/// Writes the `ABORT` that makes the receiver drop the message `out`'s
/// dead sender (generation `generation`) left half sent. The sender kept
/// room for it after every fragment but the last.
pub(super) fn abort_partial(out: &mut Producer, generation: u32) {
    if let Ok(Some(planned)) = out.plan(0, 0) {
        out.commit(planned, out.header(generation, 0, flags::ABORT));
        out.publish();
    }
}
