//! Leader and followers: one live worker per role is the leader; the others
//! call through it (`invoke`) and share values through it
//! (`subscribe`/`publish`), as cluster-client gives Node users.
//!
//! # How a leader is chosen
//! Leadership of role `r` *is* holding the robust mutex `leader:r` of the
//! lock table. Every worker that [`Messenger::campaign`](super::Messenger::campaign)s has a candidate
//! thread blocked on that mutex; the holder is the leader, and the lock's
//! fencing token is the term. When the leader's process dies the kernel
//! releases the mutex (robust list) and hands it to a waiting candidate at
//! once — no lease, no timer, no waiting for a respawn. The new leader rings
//! every worker's doorbell, so followers notice the new term at once.

mod calls;
mod election;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::WorkerId;
use crate::segment::Segment;

/// Prefix of the lock names that carry leadership.
const LOCK_PREFIX: &str = "leader:";
/// Prefix of internal event names (not a printable character, so no user
/// event collides).
const INVOKE_PREFIX: &str = "\u{1}invoke/";
const SUBSCRIBE: &str = "\u{1}subscribe";
const PUBLISH: &str = "\u{1}publish";
const TOPIC_PREFIX: &str = "\u{1}topic/";
pub(super) const NOT_LEADER: &str = "not the leader";
/// Sent by a new leader to every worker, so that waiting followers wake and
/// see the new term at once.
const ANNOUNCE: &str = "\u{1}leader";
/// How long a waiting candidate's lock attempt lasts: also the longest an
/// election can take if the kernel's owner-died wakeup lands on a candidate
/// whose attempt is just timing out (the others wait out their slice).
const CANDIDATE_SLICE: Duration = Duration::from_millis(10);

/// Who leads a role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leader {
    /// The leader's slot.
    pub slot: u32,
    /// Its term: larger than every earlier leader's of the role.
    pub term: u64,
}

/// A change of leader, passed to [`Messenger::on_leader_change`](super::Messenger::on_leader_change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderChange {
    /// The new leader and its term.
    pub leader: Leader,
    /// Whether the new leader is this worker.
    pub is_me: bool,
}

/// This worker's candidacy for a role: the thread that waits for (and then
/// holds) the role's lock.
pub(super) struct Candidacy {
    stop: Arc<(Mutex<bool>, Condvar)>,
    leading: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Candidacy {
    fn drop(&mut self) {
        let (flag, cv) = &*self.stop;
        *flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the leader keeps for subscribe/publish: per topic, the last value
/// and the subscribers' slots.
#[derive(Default)]
struct Topics {
    topics: HashMap<String, (Option<Vec<u8>>, BTreeSet<u32>)>,
}

type ChangeCallback = Box<dyn FnMut(&LeaderChange) + Send>;

/// Per-messenger leader state.
#[derive(Default)]
pub(super) struct LeaderState {
    pub(super) candidacies: HashMap<String, Candidacy>,
    /// The last term seen per role, to notice changes.
    seen_term: HashMap<String, u64>,
    callbacks: Vec<ChangeCallback>,
    /// Lock-table entry of each role's lock, once found.
    entries: HashMap<String, u32>,
    /// The default role's entry once known (as in `entries`), read by the
    /// call core's view on every answer without hashing a name.
    pub(super) default_entry: Option<u32>,
    /// Topics this worker subscribed to (re-sent to each new leader).
    subscriptions: BTreeSet<String>,
    /// The term whose leader has this worker's subscriptions.
    subscribed_term: u64,
    topics: Option<Arc<Mutex<Topics>>>,
    installed: bool,
}

fn lock_name(role: &str) -> String {
    format!("{LOCK_PREFIX}{role}")
}

/// The lock-table entry of `name`, if it has been named.
fn find_entry(segment: &Segment, name: &str) -> Option<u32> {
    (2..segment.layout().lock_slots).find(|&i| segment.lock_entry(i).name().as_deref() == Some(name))
}

/// Who leads `role` on this host now, as `me` sees it (the host's bridge
/// follows it for a role's election across hosts).
#[cfg(feature = "nats")]
pub(crate) fn local_leader(segment: &Segment, me: WorkerId, role: &str) -> Option<Leader> {
    find_entry(segment, &lock_name(role)).and_then(|i| read_leader_at(segment, me, i))
}

/// The lock-table entry of the default role's election, once named.
#[cfg(test)]
pub(crate) fn leader_entry(segment: &Segment) -> Option<u32> {
    find_entry(segment, &lock_name(""))
}

/// The event an `invoke` of `method` is sent as.
pub(super) fn invoke_event(method: &str) -> String {
    format!("{INVOKE_PREFIX}{method}")
}

/// Whether a handler's error says it is not (any longer) the leader.
pub(super) fn is_not_leader(error: &str) -> bool {
    error == NOT_LEADER
}

fn read_leader_at(segment: &Segment, me: WorkerId, i: u32) -> Option<Leader> {
    read_holder_at(segment, i)
        .filter(|h| holder_lives(segment, me, h.leader.slot, h.generation))
        .map(|h| h.leader)
}

/// Whether the worker that took a lock as (`slot`, `generation`) is still
/// live: the messenger's own liveness (the master's table, or the slot's
/// claim), never a pid, which a dead leader's successor in the pid space
/// could be given.
fn holder_lives(segment: &Segment, me: WorkerId, slot: u32, generation: u32) -> bool {
    slot < segment.layout().workers()
        && crate::cluster::ClusterView::new(segment, me).live_generation(slot) == Some(generation)
}

/// A call to a leader, watched for its term ending by the leader's death:
/// the kernel hands a dead holder's robust mutex to the next candidate as
/// the holder exits (`EOWNERDEAD`), before the process is a zombie and
/// long before the master reaps it, and that candidate counts the death in
/// the entry's `owner_died` as it takes office. So the acquisition right
/// after the watched term (token `term + 1`) having counted a death means
/// the watched leader died: its calls fail now, not at the reap.
#[derive(Debug, Clone, Copy)]
pub(super) struct LeaderWatch {
    entry: u32,
    term: u64,
    owner_died: u64,
}

impl LeaderWatch {
    /// A watch of term `term` for the call core's tests.
    #[cfg(test)]
    pub(super) fn for_test(term: u64) -> Self {
        Self {
            entry: 0,
            term,
            owner_died: 0,
        }
    }

    /// The watched term.
    #[cfg(test)]
    pub(super) fn term(&self) -> u64 {
        self.term
    }

    /// Whether the watched leader is known dead.
    pub(super) fn died(&self, segment: &Segment) -> bool {
        let e = segment.lock_entry(self.entry);
        // Pairs with the fence(Release) before the next holder's token
        // store: its `owner_died` count, made before, is visible after.
        let token = e.token.load(Acquire);
        std::sync::atomic::fence(Acquire);
        token == self.term.wrapping_add(1) && e.owner_died.load(Relaxed) != self.owner_died
    }
}

/// The default role's live leader and the watch of its term, read as one
/// seqlock read (so the death count belongs to that term). `entry` is the
/// role's lock-table entry if the caller knows it.
pub(super) fn leader_call(
    segment: &Segment,
    me: WorkerId,
    entry: Option<u32>,
) -> Option<(Leader, Option<LeaderWatch>)> {
    let entry = entry.or_else(|| find_entry(segment, &lock_name("")))?;
    let holder = read_holder_at(segment, entry)?;
    holder_lives(segment, me, holder.leader.slot, holder.generation).then_some((
        holder.leader,
        Some(LeaderWatch {
            entry,
            term: holder.leader.term,
            owner_died: holder.owner_died,
        }),
    ))
}

/// A lock entry's holder as recorded.
#[derive(Debug, Clone, Copy)]
struct Holder {
    /// Its slot and term.
    leader: Leader,
    /// Its generation in that slot.
    generation: u32,
    /// The entry's count of acquisitions that found their holder dead, as
    /// of (at least) this holder's acquisition.
    owner_died: u64,
}

/// The holder of lock entry `i` as recorded (slot and term, the holder's
/// generation and the entry's death count), without asking whether it
/// still lives.
fn read_holder_at(segment: &Segment, i: u32) -> Option<Holder> {
    let e = segment.lock_entry(i);
    // A seqlock read: the holder clears its pid before writing slot and
    // token and stores it again after (see `Locks::acquire`), so equal
    // non-zero pids around the reads mean slot and term belong together.
    let pid = e.holder_pid.load(Acquire);
    let slot = e.holder_slot.load(Relaxed);
    let term = e.token.load(Relaxed);
    let generation = e.holder_generation.load(Relaxed);
    // Bumped by the holder before its bookkeeping (see `Locks::acquire`),
    // so at least its own acquisition's count.
    let owner_died = e.owner_died.load(Relaxed);
    std::sync::atomic::fence(Acquire);
    // The pid alone is no sequence in threads mode (every holder has the
    // same one): the token, bumped by every acquisition, must not have
    // moved either.
    if pid == 0 || e.holder_pid.load(Relaxed) != pid || e.token.load(Relaxed) != term {
        return None;
    }
    Some(Holder {
        leader: Leader { slot, term },
        generation,
        owner_died,
    })
}
