//! Calls through the leader: invoke (through the call core), publish and
//! subscribe, and the handlers every worker has so that whoever leads can
//! keep the topics.

use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{
    invoke_event, read_leader_at, Leader, Topics, ANNOUNCE, INVOKE_PREFIX, NOT_LEADER, PUBLISH, SUBSCRIBE,
    TOPIC_PREFIX,
};
use crate::messenger::core::Op;
use crate::messenger::encode::{decode, encode_call, encode_call_bytes};
use crate::messenger::error::{CallError, EmitError, RegisterError};
use crate::messenger::{wire, BytesReply, CallTicket, Ctx, HandlerId, Messenger, MessengerHandle};

impl Messenger {
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
    pub fn on_invoke<T, R, E, F>(&mut self, method: &str, mut f: F) -> Result<HandlerId, RegisterError>
    where
        T: DeserializeOwned,
        R: Serialize,
        E: std::fmt::Display,
        F: FnMut(&Ctx, T) -> Result<R, E> + Send + 'static,
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
    pub(in crate::messenger) fn leader_entry(&self) -> Option<u32> {
        self.leader.default_entry
    }

    /// [`Messenger::leader_entry`], looking it up if not yet known.
    pub(in crate::messenger) fn leader_entry_lookup(&mut self) -> Option<u32> {
        self.entry_of("")
    }

    /// [`Messenger::on_invoke`] with raw bytes both ways.
    ///
    /// # Errors
    /// As [`Messenger::on_request`].
    pub fn on_invoke_bytes<F>(&mut self, method: &str, mut f: F) -> Result<HandlerId, RegisterError>
    where
        F: FnMut(&Ctx, &[u8]) -> Result<Vec<u8>, String> + Send + 'static,
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
    pub fn subscribe_bytes<F>(&mut self, topic: &str, deadline: Instant, f: F) -> Result<(), CallError>
    where
        F: FnMut(&Ctx, &[u8]) + Send + 'static,
    {
        self.add_subscription(topic, f)?;
        let leader = self.wait_leader(deadline)?;
        Ok(self.tell_leader(leader, topic)?)
    }

    /// Follows the default role's terms from now on: each dispatch (and
    /// turn) looks for a new leader (`check_leaders`), runs the change
    /// callbacks and tells a new leader this worker's subscriptions.
    pub(in crate::messenger) fn follow_leader(&mut self) {
        self.leader.seen_term.entry(String::new()).or_insert(0);
    }

    /// [`Messenger::on_invoke_bytes`] answered later: `f` gets a
    /// [`BytesReply`] to answer with when it likes (an event loop's
    /// handler queues the call and answers when its promise settles). On
    /// a worker that does not lead (now) the caller is answered "not the
    /// leader" at once, and asks the leader again; `f` does not run.
    /// Campaigns for the default role, as [`Messenger::on_invoke`].
    ///
    /// # Errors
    /// As [`Messenger::on_request`].
    pub fn on_invoke_async_bytes<F>(&mut self, method: &str, mut f: F) -> Result<HandlerId, RegisterError>
    where
        F: FnMut(&Ctx, &[u8], BytesReply) + Send + 'static,
    {
        self.install_leader_handlers();
        let leading = self.leading_flag();
        self.on_request_async_bytes(&invoke_event(method), move |ctx, data, reply| {
            if leading.load(Acquire) {
                f(ctx, data, reply);
            } else {
                reply.send(Err(NOT_LEADER.to_string()));
            }
        })
    }

    /// [`Messenger::publish_bytes`] without waiting, for an event loop
    /// (see [`Messenger::start_request_bytes`]): the leader keeps `data`
    /// as `topic`'s last value and sends it to every subscriber. It goes
    /// through the call core as an invoke does: it waits for a leader
    /// until `deadline` (then `NoLeader`), and ends `LeaderDied` if the
    /// leader dies with it in hand. Ends as [`Finished::Answer`] with
    /// empty bytes.
    ///
    /// # Errors
    /// Known at once: `TooLarge`.
    ///
    /// [`Finished::Answer`]: crate::messenger::Finished::Answer
    pub fn start_publish_bytes(
        &mut self,
        topic: &str,
        data: &[u8],
        deadline: Instant,
    ) -> Result<CallTicket, CallError> {
        let bytes = encode_call(PUBLISH, 0, &(topic, data), self.max_payload)?;
        Ok(self.start_leader_call(bytes, false, deadline))
    }

    /// [`Messenger::subscribe_bytes`] without waiting for a leader, for an
    /// event loop: registers `f` for `topic`'s values and the
    /// subscription, and tells the leader now if one is known. Otherwise
    /// the turn that first sees a leader tells it (as it tells every new
    /// leader this worker's subscriptions): `f` then runs for each value
    /// published, and at once with the topic's last value if it has one.
    /// Returns whether a leader was told now.
    ///
    /// # Errors
    /// `EventName` (a topic too long to be an event name); the send
    /// errors of telling a live leader (the subscription stays, and the
    /// next leader is told). A leader that died before it was told is not
    /// an error: `Ok(false)`, as with no leader.
    pub fn subscribe_polled_bytes<F>(&mut self, topic: &str, f: F) -> Result<bool, CallError>
    where
        F: FnMut(&Ctx, &[u8]) + Send + 'static,
    {
        self.add_subscription(topic, f)?;
        self.follow_leader();
        let Some(leader) = self
            .entry_of("")
            .and_then(|i| read_leader_at(&self.segment, self.me(), i))
        else {
            return Ok(false);
        };
        match self.tell_leader(leader, topic) {
            Ok(()) => Ok(true),
            // The leader died between the read and the send: the
            // subscription is registered, and the next leader is told by
            // the turn that sees it (`check_leaders`), as when none was
            // known. An error here would make the caller believe nothing
            // was registered, and subscribe (a second handler) again.
            Err(EmitError::WorkerDied | EmitError::NoSuchWorker { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Tells `leader` of the new subscription `topic`. A leader this
    /// worker has not told yet (one no dispatch has seen) gets every
    /// subscription, as `check_leaders` would give it: `check_leaders`
    /// skips a term already told, so telling it only `topic` would hide
    /// the older ones from it.
    fn tell_leader(&mut self, leader: Leader, topic: &str) -> Result<(), EmitError> {
        if self.leader.subscribed_term == leader.term {
            self.notify(leader.slot, SUBSCRIBE, topic)
        } else {
            self.subscribe_all(leader)
        }
    }

    /// Registers `f` for `topic`'s values and remembers the subscription
    /// (for every new leader).
    fn add_subscription<F>(&mut self, topic: &str, mut f: F) -> Result<(), CallError>
    where
        F: FnMut(&Ctx, &[u8]) + Send + 'static,
    {
        self.install_leader_handlers();
        self.on_bytes(&format!("{TOPIC_PREFIX}{topic}"), move |ctx, bytes| {
            f(ctx, bytes);
            Vec::new()
        })?;
        self.leader.subscriptions.insert(topic.to_owned());
        Ok(())
    }

    /// Tells `leader` every subscription of this worker.
    ///
    /// # Errors
    /// The first send error (the others are still tried).
    pub(super) fn subscribe_all(&mut self, leader: Leader) -> Result<(), EmitError> {
        self.leader.subscribed_term = leader.term;
        let topics: Vec<String> = self.leader.subscriptions.iter().cloned().collect();
        let mut first = Ok(());
        for topic in topics {
            if let Err(e) = self.notify(leader.slot, SUBSCRIBE, &topic) {
                first = first.and(Err(e));
            }
        }
        first
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
        F: FnMut(&Ctx, T) + Send + 'static,
    {
        self.subscribe_bytes(topic, deadline, move |ctx, bytes| {
            match postcard::from_bytes::<T>(bytes) {
                Ok(v) => f(ctx, v),
                Err(e) => {
                    tracing::warn!(error = %e, "published value does not decode as the subscriber's type")
                }
            }
        })
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
    pub(super) fn install_leader_handlers(&mut self) {
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

impl MessengerHandle {
    /// Emits already-encoded bytes (the leader forwarding a published value).
    pub(in crate::messenger) fn emit_raw(&self, to: u32, event: &str, bytes: &[u8]) -> Result<(), EmitError> {
        let msg = encode_call_bytes(event, 0, bytes, self.max_payload)?;
        self.outbox.push(
            to,
            crate::Tag {
                kind: wire::EMIT,
                correlation: 0,
            },
            msg,
        );
        Ok(())
    }
}
