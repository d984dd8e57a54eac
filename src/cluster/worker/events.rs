//! [`Events`]: a reader of the master's event log.

use std::sync::atomic::Ordering::Acquire;
use std::time::{Duration, Instant};

use crate::cluster::Event;
use crate::segment::Segment;
use crate::sys;

/// A reader of the master's event log, from the moment it was made.
#[derive(Debug, Clone)]
pub struct Events {
    segment: Segment,
    next: u64,
    missed: u64,
}

impl Events {
    /// A reader of `segment`'s log from the next event on.
    pub(super) fn from_now(segment: Segment) -> Self {
        let next = segment.control().events_published.load(Acquire);
        Self {
            segment,
            next,
            missed: 0,
        }
    }

    /// The next event, if one has been published.
    pub fn try_next(&mut self) -> Option<Event> {
        loop {
            match self.segment.control().read(self.next) {
                Ok(None) => return None,
                Ok(Some(raw)) => {
                    self.next += 1;
                    if let Some(event) = Event::from_raw(raw) {
                        return Some(event);
                    }
                }
                Err(oldest) => {
                    self.missed += oldest.saturating_sub(self.next);
                    self.next = oldest;
                }
            }
        }
    }

    /// Waits up to `timeout` for the next event.
    pub fn next_timeout(&mut self, timeout: Duration) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.segment.control().events_futex.load(Acquire);
            if let Some(e) = self.try_next() {
                return Some(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            sys::futex_wait(&self.segment.control().events_futex, seen, Some(deadline - now));
        }
    }

    /// Events that were overwritten before this reader got to them (the log
    /// keeps the last 256).
    pub fn missed(&self) -> u64 {
        self.missed
    }
}
