//! Locks and leaders across hosts (through the host's NATS bridge, feature
//! `nats` on the master): `synchronize_global`, `campaign_global`,
//! `global_leader`. Each is a request to the host's bridge, which holds
//! leases on NATS's key-value store for its workers (see the bridge's
//! `lease.rs`); a worker needs no NATS code of its own, whatever its
//! build.

use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::error::CallError;
use super::{HostId, Messenger};

/// Asks the bridge for a lock: (name, nanoseconds left).
pub(crate) const LOCK_EVENT: &str = "shmcluster.bridge.lock";
/// Gives a lock back: (name, token).
pub(crate) const UNLOCK_EVENT: &str = "shmcluster.bridge.unlock";
/// Joins a role's election across hosts: (role).
pub(crate) const CAMPAIGN_EVENT: &str = "shmcluster.bridge.campaign";
/// Who leads a role across hosts: (role) → `Option<LeaderWire>`.
pub(crate) const LEADER_EVENT: &str = "shmcluster.bridge.leader";
/// Publishes a topic's value across hosts: (topic, value bytes).
pub(crate) const PUBLISH_EVENT: &str = "shmcluster.bridge.publish";
/// Subscribes this worker to a topic across hosts: (topic) → its last
/// value, `Option<Vec<u8>>`.
pub(crate) const SUBSCRIBE_EVENT: &str = "shmcluster.bridge.subscribe";

/// The event a topic's values reach its subscribers as.
pub(crate) fn topic_event(topic: &str) -> String {
    format!("shmcluster.topic.{topic}")
}

/// What the bridge answers a lock with.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Granted {
    pub(crate) token: u64,
    pub(crate) lease_ms: u64,
}

/// What the bridge answers [`LEADER_EVENT`] with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LeaderWire {
    /// The leader's host, `None` if it is this one.
    pub(crate) host: Option<String>,
    pub(crate) slot: u32,
    pub(crate) generation: u32,
    pub(crate) term: u64,
}

/// A section of [`Messenger::synchronize_global`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalSection {
    token: u64,
    lease: Duration,
}

impl GlobalSection {
    /// The fencing token: larger than every earlier holder's of this lock,
    /// on any host. Pass it to what the section writes, and have that
    /// refuse a token smaller than one it has seen: a holder paused past
    /// its lease (a stopped process, a partition) may still run after
    /// another took the lock.
    pub fn fencing_token(&self) -> u64 {
        self.token
    }

    /// The lease: the lock is taken from a holder whose bridge has not
    /// renewed it for this long (its host died, or is cut off).
    pub fn lease(&self) -> Duration {
        self.lease
    }
}

/// Who leads a role across hosts ([`Messenger::global_leader`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalLeader {
    /// Its host ([`HostId::LOCAL`] for this one).
    pub host: HostId,
    /// Its slot there.
    pub slot: u32,
    /// Its generation there.
    pub generation: u32,
    /// Its term, the key-value store's revision at its election: larger
    /// than every earlier leader's of the role, on any host. Also a
    /// fencing token.
    pub term: u64,
}

impl Messenger {
    fn bridge_slot(&self) -> Result<u32, CallError> {
        self.bridge()
            .map(|b| b.slot)
            .ok_or_else(|| CallError::HostUnreachable("this host has no live NATS bridge".into()))
    }

    /// Runs `f` holding the lock `name` across every host of the cluster
    /// (feature `nats`: through this host's bridge, on NATS's key-value
    /// store), waiting for it until `deadline`. Other workers' messages
    /// are dispatched while it waits, not while `f` runs.
    ///
    /// Weaker than [`crate::Worker::synchronize`] inside a host: a lease,
    /// not a robust mutex. A holder that dies (its worker, its bridge or
    /// its host) loses it within a lease (3 s); one that is paused past
    /// the lease can still be running when another takes it. Fence what
    /// the section writes with [`GlobalSection::fencing_token`].
    ///
    /// # Errors
    /// `HostUnreachable` without a bridge; `TimedOut` if the lock was not
    /// taken by `deadline`; `HandlerFailed` with the store's error.
    pub fn synchronize_global<R>(
        &mut self,
        name: &str,
        deadline: Instant,
        f: impl FnOnce(&GlobalSection) -> R,
    ) -> Result<R, CallError> {
        let bridge = self.bridge_slot()?;
        let left = deadline.saturating_duration_since(Instant::now()).as_nanos() as u64;
        let granted: Granted = match self.request(bridge, LOCK_EVENT, &(name, left), deadline) {
            Ok(g) => g,
            Err(e) => {
                // The bridge may take it just after this gave up: it gives
                // it back (token 0: whatever this worker holds of it).
                let back = Instant::now() + Duration::from_secs(1);
                let _: Result<bool, _> = self.request(bridge, UNLOCK_EVENT, &(name, 0u64), back);
                return Err(e);
            }
        };
        let section = GlobalSection {
            token: granted.token,
            lease: Duration::from_millis(granted.lease_ms),
        };
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&section)));
        // Given back however `f` ended; if the answer is lost, the lease
        // runs out.
        let back = Instant::now() + Duration::from_secs(5);
        let _: Result<bool, _> = self.request(bridge, UNLOCK_EVENT, &(name, granted.token), back);
        match out {
            Ok(r) => Ok(r),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Joins the election for `role` across every host (feature `nats`):
    /// this worker campaigns on its host ([`Messenger::campaign_for`]), and
    /// the host's bridge campaigns for the host's leader on NATS's
    /// key-value store. One worker of the cluster leads the role; a
    /// leader whose host dies is replaced within a lease (3 s) and a look.
    ///
    /// # Errors
    /// `HostUnreachable` without a bridge; the local campaign's errors as
    /// `HandlerFailed`.
    pub fn campaign_global(&mut self, role: &str) -> Result<(), CallError> {
        let bridge = self.bridge_slot()?;
        self.campaign_for(role)
            .map_err(|e| CallError::HandlerFailed(e.to_string()))?;
        self.request(
            bridge,
            CAMPAIGN_EVENT,
            role,
            Instant::now() + Duration::from_secs(5),
        )
    }

    /// Who leads `role` across hosts now, as the key-value store says
    /// (`None` between a leader's end and its successor's election).
    ///
    /// # Errors
    /// `HostUnreachable` without a bridge; `TimedOut`.
    pub fn global_leader(
        &mut self,
        role: &str,
        deadline: Instant,
    ) -> Result<Option<GlobalLeader>, CallError> {
        let bridge = self.bridge_slot()?;
        let wire: Option<LeaderWire> = self.request(bridge, LEADER_EVENT, role, deadline)?;
        Ok(wire.map(|w| GlobalLeader {
            host: w.host.as_deref().map_or(HostId::LOCAL, HostId::of),
            slot: w.slot,
            generation: w.generation,
            term: w.term,
        }))
    }

    /// Publishes `value` as `topic`'s value across every host (feature
    /// `nats`: kept in NATS's key-value store): every subscriber, on any
    /// host, gets it, and one that subscribes later gets the last value
    /// first. Values of one publisher arrive in order; of several, in the
    /// store's order. A subscriber on a host cut off meanwhile gets the
    /// last value when its host is back, not every one in between.
    ///
    /// # Errors
    /// `HostUnreachable` without a bridge; `TooLarge` above NATS's
    /// payload limit; `HandlerFailed` with the store's error; `TimedOut`.
    pub fn publish_global<T: Serialize + ?Sized>(
        &mut self,
        topic: &str,
        value: &T,
        deadline: Instant,
    ) -> Result<(), CallError> {
        let bridge = self.bridge_slot()?;
        let bytes = postcard::to_allocvec(value).map_err(CallError::Encode)?;
        self.request(bridge, PUBLISH_EVENT, &(topic, bytes), deadline)
    }

    /// Runs `f` with `topic`'s value now (if it has one) and with every
    /// value published after, from any host (see
    /// [`Messenger::publish_global`]). `f` runs on the messenger's thread,
    /// as a handler.
    ///
    /// # Errors
    /// `HostUnreachable` without a bridge; `EventName` for a topic too
    /// long to name an event; `TimedOut`.
    pub fn subscribe_global<T, F>(&mut self, topic: &str, deadline: Instant, f: F) -> Result<(), CallError>
    where
        T: DeserializeOwned,
        F: FnMut(T) + Send + 'static,
    {
        let bridge = self.bridge_slot()?;
        let f = std::sync::Arc::new(std::sync::Mutex::new(f));
        let g = f.clone();
        self.on_bytes(&topic_event(topic), move |_, data| {
            if let Ok(v) = postcard::from_bytes::<T>(data) {
                (g.lock().unwrap_or_else(|p| p.into_inner()))(v);
            }
            Vec::new()
        })?;
        let last: Option<Vec<u8>> = self.request(bridge, SUBSCRIBE_EVENT, topic, deadline)?;
        if let Some(v) = last.and_then(|b| postcard::from_bytes::<T>(&b).ok()) {
            (f.lock().unwrap_or_else(|p| p.into_inner()))(v);
        }
        Ok(())
    }

    /// Whether this worker leads `role` across hosts now.
    ///
    /// # Errors
    /// As [`Messenger::global_leader`].
    pub fn is_global_leader(&mut self, role: &str, deadline: Instant) -> Result<bool, CallError> {
        let me = (self.slot(), self.generation());
        Ok(self
            .global_leader(role, deadline)?
            .is_some_and(|l| l.host.is_local() && (l.slot, l.generation) == me))
    }
}
