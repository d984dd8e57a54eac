//! Leader and followers: one live worker per role is the leader; the others
//! call through it (`invoke`) and share values through it
//! (`subscribe`/`publish`), as cluster-client gives Node users.
//!
//! # How a leader is chosen
//! Leadership of role `r` *is* holding the robust mutex `leader:r` of the
//! lock table. Every worker that [`Messenger::campaign`]s has a candidate
//! thread blocked on that mutex; the holder is the leader, and the lock's
//! fencing token is the term. When the leader's process dies the kernel
//! releases the mutex (robust list) and hands it to a waiting candidate at
//! once — no lease, no timer, no waiting for a respawn. The new leader rings
//! every worker's doorbell, so followers notice the new term at once.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::core::Op;
use super::encode::{decode, encode_call, encode_call_bytes};
use super::error::{CallError, EmitError, RegisterError};
use super::{Messenger, MessengerHandle, WorkerId};
use crate::segment::Segment;
use crate::{Locks, NamedLock};

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

/// A change of leader, passed to [`Messenger::on_leader_change`].
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
    fn entry_of(&mut self, role: &str) -> Option<u32> {
        if let Some(&i) = self.leader.entries.get(role) {
            return Some(i);
        }
        let i = find_entry(&self.segment, &lock_name(role))?;
        self.leader.entries.insert(role.to_owned(), i);
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
    pub(super) fn check_leaders(&mut self) {
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
                    self.leader.subscribed_term = now.term;
                    let topics: Vec<String> = self.leader.subscriptions.iter().cloned().collect();
                    for topic in topics {
                        let _ = self.notify(now.slot, SUBSCRIBE, &topic);
                    }
                }
            }
        }
    }

    /// Waits (dispatching) until the default role has a leader.
    fn wait_leader(&mut self, deadline: Instant) -> Result<Leader, CallError> {
        self.leader.seen_term.entry(String::new()).or_insert(0);
        loop {
            if let Some(l) = self
                .entry_of("")
                .and_then(|i| read_leader_at(&self.segment, self.me(), i))
            {
                return Ok(l);
            }
            if Instant::now() >= deadline {
                return Err(CallError::NoLeader);
            }
            self.dispatch_until(Some((Instant::now() + Duration::from_millis(2)).min(deadline)))?;
        }
    }

    /// Registers the leader's handler for `method`: only the leader's runs
    /// (every worker registers it, so whoever leads can serve).
    ///
    /// # Errors
    /// As [`Messenger::on_request`].
    pub fn on_invoke<T, R, E, F>(&mut self, method: &str, mut f: F) -> Result<super::HandlerId, RegisterError>
    where
        T: DeserializeOwned,
        R: Serialize,
        E: std::fmt::Display,
        F: FnMut(&super::Ctx, T) -> Result<R, E> + Send + 'static,
    {
        self.install_leader_handlers();
        let leading = self.leading_flag();
        self.on_request::<T, R, String, _>(&format!("{INVOKE_PREFIX}{method}"), move |ctx, v| {
            if !leading.load(Acquire) {
                return Err(NOT_LEADER.to_string());
            }
            f(ctx, v).map_err(|e| e.to_string())
        })
    }

    /// The default role's "am I leading" flag (campaigning if not yet).
    fn leading_flag(&mut self) -> Arc<AtomicBool> {
        if !self.leader.candidacies.contains_key("") {
            let _ = self.campaign();
        }
        self.leader
            .candidacies
            .get("")
            .map_or_else(|| Arc::new(AtomicBool::new(false)), |c| c.leading.clone())
    }

    /// Runs the leader's handler for `method` and returns its result. If
    /// the leader dies first: `LeaderDied`.
    ///
    /// # Errors
    /// `NoLeader` (none elected before the deadline), `LeaderDied`,
    /// `TimedOut`, and as [`Messenger::request`].
    pub fn invoke<T, R>(&mut self, method: &str, args: &T, deadline: Instant) -> Result<R, CallError>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        self.invoke_inner(method, args, deadline, false)
    }

    /// [`Messenger::invoke`] for a method that is safe to run twice: if the
    /// leader dies first, it is retried on the next leader.
    ///
    /// # Errors
    /// As [`Messenger::invoke`], without `LeaderDied`.
    pub fn invoke_idempotent<T, R>(
        &mut self,
        method: &str,
        args: &T,
        deadline: Instant,
    ) -> Result<R, CallError>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        self.invoke_inner(method, args, deadline, true)
    }

    fn invoke_inner<T, R>(
        &mut self,
        method: &str,
        args: &T,
        deadline: Instant,
        retry: bool,
    ) -> Result<R, CallError>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let bytes = encode_call(&invoke_event(method), 0, args, self.max_payload)?;
        decode(&self.invoke_encoded(bytes, deadline, retry)?)
    }

    /// An invoke through the call core ([`Op::Invoke`]): it waits for a
    /// leader, asks again if the worker asked no longer leads, and fails
    /// (or, with `retry`, goes to the next leader) if the leader dies in
    /// office.
    fn invoke_encoded(
        &mut self,
        bytes: Vec<u8>,
        deadline: Instant,
        retry: bool,
    ) -> Result<Vec<u8>, CallError> {
        // Follow the default role's terms from now on (`check_leaders`).
        self.leader.seen_term.entry(String::new()).or_insert(0);
        self.leader_entry_lookup();
        self.call_answer(Op::Invoke { bytes, retry }, deadline)
    }

    /// The default role's lock-table entry, once known.
    pub(super) fn leader_entry(&self) -> Option<u32> {
        self.leader.entries.get("").copied()
    }

    /// [`Messenger::leader_entry`], looking it up if not yet known.
    pub(super) fn leader_entry_lookup(&mut self) -> Option<u32> {
        self.entry_of("")
    }

    /// [`Messenger::on_invoke`] with raw bytes both ways.
    ///
    /// # Errors
    /// As [`Messenger::on_request`].
    pub fn on_invoke_bytes<F>(&mut self, method: &str, mut f: F) -> Result<super::HandlerId, RegisterError>
    where
        F: FnMut(&super::Ctx, &[u8]) -> Result<Vec<u8>, String> + Send + 'static,
    {
        self.install_leader_handlers();
        let leading = self.leading_flag();
        self.on_request_async_bytes(&format!("{INVOKE_PREFIX}{method}"), move |ctx, data, reply| {
            if !leading.load(Acquire) {
                reply.send(Err(NOT_LEADER.to_string()));
            } else {
                reply.send(f(ctx, data));
            }
        })
    }

    /// [`Messenger::invoke`] with raw bytes both ways.
    ///
    /// # Errors
    /// As [`Messenger::invoke`].
    pub fn invoke_bytes(
        &mut self,
        method: &str,
        data: &[u8],
        deadline: Instant,
    ) -> Result<Vec<u8>, CallError> {
        let bytes = encode_call_bytes(&invoke_event(method), 0, data, self.max_payload)?;
        self.invoke_encoded(bytes, deadline, false)
    }

    /// [`Messenger::publish`] of raw bytes: subscribers registered with
    /// [`Messenger::subscribe_bytes`] get them as they are.
    ///
    /// # Errors
    /// As [`Messenger::publish`].
    pub fn publish_bytes(&mut self, topic: &str, data: &[u8], deadline: Instant) -> Result<(), CallError> {
        let leader = self.wait_leader(deadline)?;
        match self.request::<_, ()>(leader.slot, PUBLISH, &(topic, data.to_vec()), deadline) {
            Err(CallError::WorkerDied) => Err(CallError::LeaderDied),
            other => other,
        }
    }

    /// [`Messenger::subscribe`] with raw bytes.
    ///
    /// # Errors
    /// As [`Messenger::subscribe`].
    pub fn subscribe_bytes<F>(&mut self, topic: &str, deadline: Instant, mut f: F) -> Result<(), CallError>
    where
        F: FnMut(&super::Ctx, &[u8]) + Send + 'static,
    {
        self.install_leader_handlers();
        self.on_bytes(&format!("{TOPIC_PREFIX}{topic}"), move |ctx, bytes| {
            f(ctx, bytes);
            Vec::new()
        })?;
        self.leader.subscriptions.insert(topic.to_owned());
        let leader = self.wait_leader(deadline)?;
        self.leader.subscribed_term = leader.term;
        Ok(self.notify(leader.slot, SUBSCRIBE, topic)?)
    }

    /// One-way invoke: the leader's handler runs; nothing is awaited.
    ///
    /// # Errors
    /// `NoLeader` if none is elected before `deadline`, and the send errors.
    pub fn invoke_oneway<T: Serialize + ?Sized>(
        &mut self,
        method: &str,
        args: &T,
        deadline: Instant,
    ) -> Result<(), CallError> {
        let leader = self.wait_leader(deadline)?;
        Ok(self.notify(leader.slot, &invoke_event(method), args)?)
    }

    /// Subscribes to `topic` through the leader: `f` runs for every value
    /// published to it, and at once with the last value if there is one.
    /// A new leader is told this worker's subscriptions when it is elected.
    ///
    /// # Errors
    /// `NoLeader`, and the send errors.
    pub fn subscribe<T, F>(&mut self, topic: &str, deadline: Instant, mut f: F) -> Result<(), CallError>
    where
        T: DeserializeOwned,
        F: FnMut(&super::Ctx, T) + Send + 'static,
    {
        self.install_leader_handlers();
        self.on_bytes(&format!("{TOPIC_PREFIX}{topic}"), move |ctx, bytes| {
            match postcard::from_bytes::<T>(bytes) {
                Ok(v) => f(ctx, v),
                Err(e) => {
                    tracing::warn!(error = %e, "published value does not decode as the subscriber's type")
                }
            }
            Vec::new()
        })?;
        self.leader.subscriptions.insert(topic.to_owned());
        let leader = self.wait_leader(deadline)?;
        self.leader.subscribed_term = leader.term;
        Ok(self.notify(leader.slot, SUBSCRIBE, topic)?)
    }

    /// Publishes `value` on `topic` through the leader, which keeps it as
    /// the topic's last value and sends it to every subscriber.
    ///
    /// # Errors
    /// `NoLeader`, `LeaderDied`, `Encode`, and as [`Messenger::invoke`].
    pub fn publish<T: Serialize + ?Sized>(
        &mut self,
        topic: &str,
        value: &T,
        deadline: Instant,
    ) -> Result<(), CallError> {
        let bytes = postcard::to_allocvec(value).map_err(CallError::Encode)?;
        let leader = self.wait_leader(deadline)?;
        match self.request::<_, ()>(leader.slot, PUBLISH, &(topic, bytes), deadline) {
            Err(CallError::WorkerDied) => Err(CallError::LeaderDied),
            other => other,
        }
    }

    /// The handlers every worker has so that whichever leads can keep the
    /// topics: subscribe and publish.
    fn install_leader_handlers(&mut self) {
        if self.leader.installed {
            return;
        }
        self.leader.installed = true;
        // The announcement only has to wake the loop; check_leaders reads
        // the new term after the dispatch.
        let _ = self.on_bytes(ANNOUNCE, |_, _| Vec::new());
        let topics = Arc::new(Mutex::new(Topics::default()));
        self.leader.topics = Some(topics.clone());
        let handle: MessengerHandle = self.handle();
        let t2 = topics.clone();
        let h2 = handle.clone();
        let _ = self.on::<String, _>(SUBSCRIBE, move |ctx, topic| {
            let mut t = t2.lock().unwrap_or_else(|p| p.into_inner());
            let entry = t.topics.entry(topic.clone()).or_default();
            entry.1.insert(ctx.sender().slot);
            if let Some(last) = &entry.0 {
                let _ = h2.emit_raw(ctx.sender().slot, &format!("{TOPIC_PREFIX}{topic}"), last);
            }
        });
        let _ = self.on_request::<(String, Vec<u8>), (), String, _>(PUBLISH, move |_, (topic, bytes)| {
            let mut t = topics.lock().unwrap_or_else(|p| p.into_inner());
            let entry = t.topics.entry(topic.clone()).or_default();
            entry.0 = Some(bytes.clone());
            for &slot in &entry.1 {
                let _ = handle.emit_raw(slot, &format!("{TOPIC_PREFIX}{topic}"), &bytes);
            }
            Ok(())
        });
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

impl MessengerHandle {
    /// Emits already-encoded bytes (the leader forwarding a published value).
    pub(super) fn emit_raw(&self, to: u32, event: &str, bytes: &[u8]) -> Result<(), EmitError> {
        let msg = encode_call_bytes(event, 0, bytes, self.max_payload)?;
        self.outbox.push(
            to,
            crate::Tag {
                kind: super::wire::EMIT,
                correlation: 0,
            },
            msg,
        );
        Ok(())
    }
}
