//! Elections: campaigning for a role (a candidate thread per role waits
//! for the role's lock), who leads now, and noticing a new term.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::{Arc, Condvar, Mutex};

use super::{
    find_entry, holder_lives, lock_name, read_holder_at, read_leader_at, Candidacy, Holder, Leader,
    LeaderChange, ANNOUNCE, CANDIDATE_SLICE,
};
use crate::messenger::{Messenger, MessengerHandle};
use crate::{Locks, NamedLock};

impl Messenger {
    /// Joins the election for `role` (`""` is the default role): a thread
    /// of this worker waits for the role's lock and holds it while this
    /// worker leads. Campaigning twice for a role does nothing.
    ///
    /// # Errors
    /// As [`crate::Locks::new`], or a lock table too full for the role.
    pub fn campaign_for(&mut self, role: &str) -> Result<(), crate::LockError> {
        if self.leader.candidacies.contains_key(role) {
            return Ok(());
        }
        self.install_leader_handlers();
        let locks = Locks::new(&self.segment, self.slot)?;
        // Name the lock now (without taking it: that would make a term no
        // leader held), so errors such as a full table come back here.
        let named = locks.named(&lock_name(role))?;
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let leading = Arc::new(AtomicBool::new(false));
        let (stop2, leading2) = (stop.clone(), leading.clone());
        let lock = named;
        let handle = self.handle();
        let thread = std::thread::Builder::new()
            .name(format!("shmcluster-candidate-{role}"))
            .spawn(move || candidate(lock, handle, stop2, leading2))
            .map_err(crate::LockError::Io)?;
        self.leader.candidacies.insert(
            role.to_owned(),
            Candidacy {
                stop,
                leading,
                thread: Some(thread),
            },
        );
        Ok(())
    }

    /// [`Messenger::campaign_for`] the default role.
    ///
    /// # Errors
    /// As [`Messenger::campaign_for`].
    pub fn campaign(&mut self) -> Result<(), crate::LockError> {
        self.campaign_for("")
    }

    /// Whether this worker leads `role` now.
    pub fn is_leader_for(&self, role: &str) -> bool {
        self.leader
            .candidacies
            .get(role)
            .is_some_and(|c| c.leading.load(Acquire))
    }

    /// Whether this worker leads the default role now.
    pub fn is_leader(&self) -> bool {
        self.is_leader_for("")
    }

    /// The current leader of `role`, if there is one right now (between a
    /// leader's death and its successor's election there is none).
    pub fn leader_for(&self, role: &str) -> Option<Leader> {
        match self.leader.entries.get(role) {
            Some(&i) => read_leader_at(&self.segment, self.me(), i),
            None => find_entry(&self.segment, &lock_name(role))
                .and_then(|i| read_leader_at(&self.segment, self.me(), i)),
        }
    }

    /// The lock-table entry of `role`'s lock, remembered once it exists.
    pub(super) fn entry_of(&mut self, role: &str) -> Option<u32> {
        if let Some(&i) = self.leader.entries.get(role) {
            return Some(i);
        }
        let i = find_entry(&self.segment, &lock_name(role))?;
        self.leader.entries.insert(role.to_owned(), i);
        if role.is_empty() {
            self.leader.default_entry = Some(i);
        }
        Some(i)
    }

    /// The current leader of the default role.
    pub fn leader(&self) -> Option<Leader> {
        self.leader_for("")
    }

    /// Runs `f` (on the messenger's thread, while dispatching) whenever the
    /// default role gets a new leader.
    pub fn on_leader_change(&mut self, f: impl FnMut(&LeaderChange) + Send + 'static) {
        self.install_leader_handlers();
        self.leader.callbacks.push(Box::new(f));
        self.leader.seen_term.entry(String::new()).or_insert(0);
    }

    /// Looks for a new term of each role this worker campaigns in or
    /// subscribes through; runs the callbacks and re-subscribes with a new
    /// leader. Called by dispatch.
    pub(in crate::messenger) fn check_leaders(&mut self) {
        if self.leader.seen_term.is_empty() && self.leader.candidacies.is_empty() {
            return;
        }
        let roles: Vec<String> = self
            .leader
            .candidacies
            .keys()
            .cloned()
            .chain(self.leader.seen_term.keys().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        for role in roles {
            // Called on every dispatch: an unchanged term costs two atomic
            // loads; only a new one is checked against the kernel (a
            // liveness check per dispatch was a syscall on the hot path).
            let Some(Holder {
                leader: now,
                generation,
                ..
            }) = self
                .entry_of(&role)
                .and_then(|i| read_holder_at(&self.segment, i))
            else {
                continue;
            };
            let seen = self.leader.seen_term.get(&role).copied();
            if seen == Some(now.term) || !holder_lives(&self.segment, self.me(), now.slot, generation) {
                continue;
            }
            self.leader.seen_term.insert(role.clone(), now.term);
            tracing::info!(role, leader = now.slot, term = now.term, "new leader");
            if role.is_empty() {
                let change = LeaderChange {
                    leader: now,
                    is_me: now.slot == self.slot,
                };
                for cb in &mut self.leader.callbacks {
                    cb(&change);
                }
                // A new leader knows no subscriptions yet: tell it ours.
                if self.leader.subscribed_term != now.term && !self.leader.subscriptions.is_empty() {
                    if let Err(e) = self.subscribe_all(now) {
                        tracing::warn!(leader = now.slot, error = %e, "could not tell the new leader a subscription");
                    }
                }
            }
        }
    }
}

/// The candidate thread: waits for the role's lock, and holds it while
/// `stop` is false. Sets `leading` while it holds the lock, and has its
/// messenger announce the new term to every worker.
fn candidate(
    lock: NamedLock,
    handle: MessengerHandle,
    stop: Arc<(Mutex<bool>, Condvar)>,
    leading: Arc<AtomicBool>,
) {
    let stopped = || *stop.0.lock().unwrap_or_else(|p| p.into_inner());
    while !stopped() {
        let r = lock.try_synchronize(CANDIDATE_SLICE, |_| {
            leading.store(true, Release);
            for to in 0..handle.workers {
                let _ = handle.emit_raw(to, ANNOUNCE, &[]);
            }
            let (flag, cv) = &*stop;
            let mut g = flag.lock().unwrap_or_else(|p| p.into_inner());
            while !*g {
                g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            leading.store(false, Release);
        });
        match r {
            Ok(()) | Err(crate::LockError::Timeout) => {}
            Err(e) => {
                tracing::error!(error = %e, "leader election lock failed");
                std::thread::sleep(CANDIDATE_SLICE);
            }
        }
    }
}
