//! Hosts: where a worker runs, for a cluster that spans machines through
//! NATS bridges (feature `nats`). A [`HostId`] is a small number that
//! stands for a host's name inside this process: [`HostId::LOCAL`] is this
//! host, and every other host gets the next number the first time this
//! process hears of it (a map entry, a consume that ran there). Numbers
//! are never reused, so a `WorkerId` stays `Copy`, cheap to compare, and
//! the same for the same worker for the life of the process.

use std::fmt;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// The event a host's bridge emits to every worker of its host when
/// another host joins, leaves or goes silent (feature `nats`):
/// `messenger.on(HOST_EVENT, |_, e: HostEvent| ..)`.
pub const HOST_EVENT: &str = "shmcluster.host";

/// What [`HOST_EVENT`] carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostEvent {
    /// The other host's name.
    pub host: String,
    /// What happened to it.
    pub change: HostChange,
}

/// A change of another host's standing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostChange {
    /// Its bridge was heard for the first time, again after it went
    /// silent, or in a new incarnation (a respawned bridge).
    Joined,
    /// Its bridge said it is stopping (its master shuts down).
    Left,
    /// Its bridge was not heard for the host timeout (a dead host, a
    /// partition, a NATS outage).
    Unreachable,
}

/// A host of the cluster, as this process knows it: [`HostId::LOCAL`] is
/// this host, and every other host gets the next number the first time
/// this process hears of it (a map entry, a consume that ran there, an
/// event it sent). Numbers are never reused, so a `WorkerId` stays `Copy`,
/// cheap to compare, and the same for the same worker for the life of the
/// process. Ordered by number: this host first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct HostId(pub(crate) u32);

/// Names of the other hosts, by number less one.
static NAMES: Mutex<Vec<Arc<str>>> = Mutex::new(Vec::new());

impl HostId {
    /// This host.
    pub const LOCAL: HostId = HostId(0);

    /// Whether this is this host.
    pub fn is_local(self) -> bool {
        self == Self::LOCAL
    }

    /// The host's name as its bridge announced it (`--host-id`); `None`
    /// for this host.
    pub fn name(self) -> Option<Arc<str>> {
        let i = self.0.checked_sub(1)? as usize;
        NAMES.lock().unwrap_or_else(|p| p.into_inner()).get(i).cloned()
    }

    /// The number of the host named `name` (not this host's own name,
    /// which only its bridge knows).
    pub fn of(name: &str) -> HostId {
        let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
        let i = match names.iter().position(|n| &**n == name) {
            Some(i) => i,
            None => {
                names.push(name.into());
                names.len() - 1
            }
        };
        HostId(u32::try_from(i + 1).unwrap_or(u32::MAX))
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(&name),
            None => f.write_str("local"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_numbered_once_by_name() {
        let a = HostId::of("host-test-a");
        let b = HostId::of("host-test-b");
        assert_ne!(a, b);
        assert_eq!(HostId::of("host-test-a"), a);
        assert_eq!(a.name().as_deref(), Some("host-test-a"));
        assert!(!a.is_local());
        assert_eq!(HostId::LOCAL.name(), None);
        assert_eq!(HostId::LOCAL.to_string(), "local");
        assert!(HostId::LOCAL < a);
    }
}
