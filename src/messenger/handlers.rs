//! Handlers: registering them (`on`, `once`, `on_request`, ...), and
//! running them for a message that arrived ([`handle_message`]), with the
//! deferred answers ([`Reply`], [`BytesReply`]) they may keep.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use rustc_hash::FxHashMap;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::dispatch::Outbox;
use super::error::RegisterError;
use super::{wire, CallKind, Ctx, EventStats, HandlerId, Messenger, WorkerId, MAX_EVENT_NAME};
use crate::Tag;

/// What a handler produced.
pub(super) enum Outcome {
    /// Encoded reply value.
    Value(Vec<u8>),
    /// An `OK` reply's whole payload: [`wire::REPLY_HEADER`] bytes for
    /// the header (filled in when it is sent), then the encoded value, so
    /// that the value is encoded once, in place.
    Framed(Vec<u8>),
    /// The handler keeps a [`Reply`] and answers later.
    Deferred,
    /// Its error, or its panic.
    Failed(String),
    /// The payload did not decode: the handler did not run.
    Decode(String),
}

/// A handler as the table keeps it. It is given where its reply goes
/// only by reference: a handler that answers at once needs no owned copy
/// (two reference-count updates of the outbox a message, measured in a
/// request's round trip); one that answers later clones it.
///
/// The last argument is an empty buffer (a spare one of the messenger's)
/// that a handler answering at once may take to encode its reply into
/// ([`Outcome::Framed`]).
pub(super) type HandlerFn = Box<dyn FnMut(&Ctx, &[u8], Option<&ReplyAt<'_>>, &mut Vec<u8>) -> Outcome + Send>;

pub(super) struct Handler {
    id: u64,
    once: bool,
    f: HandlerFn,
}

/// The handlers of one event, and its name as each [`Ctx`] carries it:
/// shared, so that a message costs no copy of the name. The name is lent
/// to the `Ctx` of the message being handled and put back after (`None`
/// meanwhile): a clone and drop of the `Arc` were two locked instructions
/// on every call's path.
pub(super) struct Handlers {
    name: Option<Arc<str>>,
    list: Vec<Handler>,
}

/// Where a message's reply goes, as a handler is given it: borrowed, and
/// made into a [`ReplyTo`] only by a handler that answers later.
#[derive(Debug, Clone, Copy)]
pub(super) struct ReplyAt<'a> {
    to: u32,
    correlation: u64,
    requester_generation: u32,
    outbox: &'a Arc<Outbox>,
}

impl ReplyAt<'_> {
    /// An owned copy, to answer later from any thread.
    fn keep(&self) -> ReplyTo {
        ReplyTo {
            to: self.to,
            correlation: self.correlation,
            requester_generation: self.requester_generation,
            outbox: self.outbox.clone(),
        }
    }
}

/// Where a deferred reply goes.
#[derive(Debug, Clone)]
pub(super) struct ReplyTo {
    to: u32,
    correlation: u64,
    requester_generation: u32,
    outbox: Arc<Outbox>,
}

/// A handle to answer a request later, from any thread: see
/// [`Messenger::on_request_async`]. Dropping it unanswered answers
/// `HandlerFailed("reply dropped")`.
pub struct Reply<R> {
    to: Option<ReplyTo>,
    _r: std::marker::PhantomData<fn(R)>,
}

impl<R> fmt::Debug for Reply<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reply").finish_non_exhaustive()
    }
}

impl<R: Serialize> Reply<R> {
    /// Answers with `value`, or with `HandlerFailed(error)`.
    pub fn send(mut self, result: Result<R, String>) {
        if let Some(to) = self.to.take() {
            let (status, body) = match result.map(|v| postcard::to_allocvec(&v)) {
                Ok(Ok(bytes)) => (wire::OK, bytes),
                Ok(Err(e)) => (wire::FAILED, format!("cannot encode the reply: {e}").into_bytes()),
                Err(e) => (wire::FAILED, e.into_bytes()),
            };
            send_reply(&to, status, &body);
        }
    }
}

/// A handle to answer a raw-bytes request later, from any thread: see
/// [`Messenger::on_request_async_bytes`]. Dropping it unanswered answers
/// `HandlerFailed("reply dropped")`.
pub struct BytesReply {
    to: Option<ReplyTo>,
}

impl fmt::Debug for BytesReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BytesReply").finish_non_exhaustive()
    }
}

impl BytesReply {
    /// Answers with `bytes`, or with `HandlerFailed(error)`.
    pub fn send(mut self, result: Result<Vec<u8>, String>) {
        if let Some(to) = self.to.take() {
            match result {
                Ok(bytes) => send_reply(&to, wire::OK, &bytes),
                Err(e) => send_reply(&to, wire::FAILED, e.as_bytes()),
            }
        }
    }
}

impl Drop for BytesReply {
    fn drop(&mut self) {
        if let Some(to) = self.to.take() {
            send_reply(&to, wire::FAILED, b"reply dropped");
        }
    }
}

impl<R> Drop for Reply<R> {
    fn drop(&mut self) {
        if let Some(to) = self.to.take() {
            send_reply(&to, wire::FAILED, b"reply dropped");
        }
    }
}

/// What the host's bridge is given for each message a worker sends it
/// (feature `nats`): see [`Messenger::set_bridge_hook`].
pub(crate) type BridgeHook = Box<dyn FnMut(BridgeIncoming) + Send>;

/// A message to the host's bridge.
#[derive(Debug)]
#[cfg_attr(not(feature = "nats"), allow(dead_code))]
pub(crate) struct BridgeIncoming {
    /// Its kind (`wire::EMIT`, `wire::BRIDGE_*`, ...).
    pub(crate) kind: u16,
    /// The worker that sent it.
    pub(crate) sender: WorkerId,
    pub(crate) payload: Vec<u8>,
    /// Where its answer goes, if one is wanted.
    pub(crate) reply: Option<RawReply>,
}

/// An answer the bridge owes a worker, with any status: answered from any
/// thread; dropped unanswered, it answers `UNREACHABLE`.
#[derive(Debug)]
pub(crate) struct RawReply {
    to: Option<ReplyTo>,
}

#[cfg_attr(not(feature = "nats"), allow(dead_code))]
impl RawReply {
    /// Answers with `status` and `body`.
    pub(crate) fn send(mut self, status: u8, body: &[u8]) {
        if let Some(to) = self.to.take() {
            send_reply(&to, status, body);
        }
    }
}

impl Drop for RawReply {
    fn drop(&mut self) {
        if let Some(to) = self.to.take() {
            send_reply(&to, wire::UNREACHABLE, b"the bridge dropped the call");
        }
    }
}

/// `message` as the bridge's hook is given it.
pub(super) fn bridge_incoming(message: crate::Message, outbox: &Arc<Outbox>) -> BridgeIncoming {
    let reply = (message.correlation != 0).then(|| RawReply {
        to: Some(ReplyTo {
            to: message.sender,
            correlation: message.correlation,
            requester_generation: message.generation,
            outbox: outbox.clone(),
        }),
    });
    BridgeIncoming {
        kind: message.kind,
        sender: WorkerId::local(message.sender, message.generation),
        payload: message.payload,
        reply,
    }
}

impl Messenger {
    /// Makes this messenger its host's bridge (feature `nats`): every
    /// message that is not an answer goes to `hook` instead of handlers.
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    pub(crate) fn set_bridge_hook(&mut self, hook: BridgeHook) {
        self.bridge_hook = Some(hook);
    }
}

pub(super) fn send_reply(to: &ReplyTo, status: u8, body: &[u8]) {
    let tag = Tag {
        kind: wire::REPLY,
        correlation: to.correlation,
    };
    to.outbox
        .push(to.to, tag, wire::reply(status, to.requester_generation, body));
}

fn panic_text(p: Box<dyn Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        format!("handler panicked: {s}")
    } else if let Some(s) = p.downcast_ref::<String>() {
        format!("handler panicked: {s}")
    } else {
        "handler panicked".into()
    }
}

impl Messenger {
    fn add(&mut self, event: &str, once: bool, f: HandlerFn) -> Result<HandlerId, RegisterError> {
        if event.len() > MAX_EVENT_NAME {
            return Err(RegisterError::EventName { len: event.len() });
        }
        let id = self.next_handler;
        self.next_handler += 1;
        self.handlers
            .entry(event.to_owned())
            .or_insert_with(|| Handlers {
                name: Some(event.into()),
                list: Vec::new(),
            })
            .list
            .push(Handler { id, once, f });
        Ok(HandlerId(id))
    }

    /// Runs `f` for every `event` message whose payload decodes as `T`.
    /// Replies `()` to a request or map.
    ///
    /// # Errors
    /// `EventName` if the name is too long.
    pub fn on<T, F>(&mut self, event: &str, mut f: F) -> Result<HandlerId, RegisterError>
    where
        T: DeserializeOwned,
        F: FnMut(&Ctx, T) + Send + 'static,
    {
        self.add(
            event,
            false,
            Box::new(move |ctx, data, _, _| match postcard::from_bytes::<T>(data) {
                Ok(v) => {
                    f(ctx, v);
                    Outcome::Value(vec![])
                }
                Err(e) => Outcome::Decode(e.to_string()),
            }),
        )
    }

    /// Like [`Messenger::on`], removed after its first run.
    ///
    /// # Errors
    /// `EventName`.
    pub fn once<T, F>(&mut self, event: &str, f: F) -> Result<HandlerId, RegisterError>
    where
        T: DeserializeOwned,
        F: FnOnce(&Ctx, T) + Send + 'static,
    {
        let mut f = Some(f);
        let id = self.on::<T, _>(event, move |ctx, v| {
            if let Some(f) = f.take() {
                f(ctx, v);
            }
        })?;
        self.mark_once(event, id);
        Ok(id)
    }

    fn mark_once(&mut self, event: &str, id: HandlerId) {
        if let Some(h) = self
            .handlers
            .get_mut(event)
            .and_then(|v| v.list.iter_mut().find(|h| h.id == id.0))
        {
            h.once = true;
        }
    }

    /// Runs `f` with the raw payload bytes of every `event` message (for
    /// other runtimes' encodings).
    /// Replies with the bytes `f` returns.
    ///
    /// # Errors
    /// `EventName`.
    pub fn on_bytes<F>(&mut self, event: &str, mut f: F) -> Result<HandlerId, RegisterError>
    where
        F: FnMut(&Ctx, &[u8]) -> Vec<u8> + Send + 'static,
    {
        self.add(
            event,
            false,
            Box::new(move |ctx, data, _, _| Outcome::Value(f(ctx, data))),
        )
    }

    /// Answers requests (and map, consume) for `event` with `f`'s value, or
    /// `HandlerFailed` with its error.
    ///
    /// # Errors
    /// `EventName`.
    pub fn on_request<T, R, E, F>(&mut self, event: &str, mut f: F) -> Result<HandlerId, RegisterError>
    where
        T: DeserializeOwned,
        R: Serialize,
        E: fmt::Display,
        F: FnMut(&Ctx, T) -> Result<R, E> + Send + 'static,
    {
        self.add(
            event,
            false,
            Box::new(move |ctx, data, _, frame| match postcard::from_bytes::<T>(data) {
                Ok(v) => match f(ctx, v) {
                    Ok(r) => match postcard::to_extend(&r, wire::reply_frame(std::mem::take(frame))) {
                        Ok(frame) => Outcome::Framed(frame),
                        Err(e) => Outcome::Failed(format!("cannot encode the reply: {e}")),
                    },
                    Err(e) => Outcome::Failed(e.to_string()),
                },
                Err(e) => Outcome::Decode(e.to_string()),
            }),
        )
    }

    /// Answers requests for `event` later: `f` gets a [`Reply`] it may keep,
    /// move to another thread, and answer when ready. For events (no reply
    /// expected) the `Reply` does nothing.
    ///
    /// # Errors
    /// `EventName`.
    pub fn on_request_async<T, R, F>(&mut self, event: &str, mut f: F) -> Result<HandlerId, RegisterError>
    where
        T: DeserializeOwned,
        R: Serialize,
        F: FnMut(&Ctx, T, Reply<R>) + Send + 'static,
    {
        self.add(
            event,
            false,
            Box::new(
                move |ctx, data, reply_to, _| match postcard::from_bytes::<T>(data) {
                    Ok(v) => {
                        f(
                            ctx,
                            v,
                            Reply {
                                to: reply_to.map(ReplyAt::keep),
                                _r: std::marker::PhantomData,
                            },
                        );
                        Outcome::Deferred
                    }
                    Err(e) => Outcome::Decode(e.to_string()),
                },
            ),
        )
    }

    /// Answers requests for `event` later with raw bytes: `f` gets the
    /// payload and a [`BytesReply`] it may keep and answer from any thread.
    ///
    /// # Errors
    /// `EventName`.
    pub fn on_request_async_bytes<F>(&mut self, event: &str, mut f: F) -> Result<HandlerId, RegisterError>
    where
        F: FnMut(&Ctx, &[u8], BytesReply) + Send + 'static,
    {
        self.add(
            event,
            false,
            Box::new(move |ctx, data, reply_to, _| {
                f(
                    ctx,
                    data,
                    BytesReply {
                        to: reply_to.map(ReplyAt::keep),
                    },
                );
                Outcome::Deferred
            }),
        )
    }

    /// Removes every handler for `event`; returns how many there were.
    pub fn off(&mut self, event: &str) -> usize {
        self.handlers.remove(event).map_or(0, |v| v.list.len())
    }

    /// Removes one handler.
    pub fn off_handler(&mut self, id: HandlerId) -> bool {
        for handlers in self.handlers.values_mut() {
            if let Some(i) = handlers.list.iter().position(|h| h.id == id.0) {
                handlers.list.remove(i);
                return true;
            }
        }
        false
    }
}

thread_local! {
    /// Whether this thread is running a messenger handler right now.
    pub(super) static IN_HANDLER: Cell<bool> = const { Cell::new(false) };
}

/// Handles one received message; returns the reply to send, if any. A free
/// function so that the handler table and the rest of the messenger are
/// borrowed separately.
///
/// The caller takes the message out of the lane before any handler runs
/// ([`Received::into_message`]): if the handler kills this worker, its
/// successor must not find the same message unread and run it again (a
/// poison message would then kill every successor in turn). The copy is
/// one memcpy of the payload.
pub(super) fn handle_message(
    message: crate::Message,
    my_generation: u32,
    handlers: &mut FxHashMap<String, Handlers>,
    on_reply: impl FnOnce(WorkerId, u64, u8, Vec<u8>),
    outbox: &Arc<Outbox>,
    stats: &RefCell<FxHashMap<String, EventStats>>,
    spare: &mut Vec<Vec<u8>>,
) -> Option<(u32, Tag, Vec<u8>)> {
    if message.kind == wire::REPLY {
        handle_reply(message, my_generation, on_reply);
        return None;
    }
    let reply = handle_call(&message, handlers, outbox, stats, spare);
    super::dispatch::recycle(spare, message.payload);
    reply
}

/// A reply: to the call core, if it is for this incarnation.
fn handle_reply(
    message: crate::Message,
    my_generation: u32,
    on_reply: impl FnOnce(WorkerId, u64, u8, Vec<u8>),
) {
    let sender = WorkerId::local(message.sender, message.generation);
    let Some((status, generation, _)) = wire::parse_reply(&message.payload) else {
        return;
    };
    if generation != my_generation {
        // A reply to this slot's previous worker.
        return;
    }
    // The body, in the buffer it arrived in (not a copy).
    let mut body = message.payload;
    body.drain(..wire::REPLY_HEADER);
    on_reply(sender, message.correlation, status, body);
}

/// An event, request or consume: runs its handlers.
fn handle_call(
    message: &crate::Message,
    handlers: &mut FxHashMap<String, Handlers>,
    outbox: &Arc<Outbox>,
    stats: &RefCell<FxHashMap<String, EventStats>>,
    spare: &mut Vec<Vec<u8>>,
) -> Option<(u32, Tag, Vec<u8>)> {
    let tag = Tag {
        kind: message.kind,
        correlation: message.correlation,
    };
    let mut sender = WorkerId::local(message.sender, message.generation);
    let mut payload = &message.payload[..];
    let kind = match tag.kind {
        wire::EMIT => CallKind::Event,
        wire::REQUEST => CallKind::Request,
        wire::CONSUME => CallKind::Consume,
        wire::BRIDGED_EMIT => {
            // Another host's worker's event, relayed by the bridge: the
            // handler's `Ctx::sender` is that worker.
            let Some((host, slot, generation, call)) = wire::parse_origin(payload) else {
                tracing::warn!(sender = sender.slot, "malformed relayed event dropped");
                return None;
            };
            let host = if host.is_empty() {
                super::HostId::LOCAL
            } else {
                super::HostId::of(host)
            };
            sender = WorkerId {
                host,
                slot,
                generation,
            };
            payload = call;
            CallKind::Event
        }
        _ => return None, // not a messenger message
    };
    let Some(call) = wire::parse_call(payload) else {
        tracing::warn!(sender = sender.slot, "malformed messenger message dropped");
        return None;
    };
    let wants_reply = kind != CallKind::Event && tag.correlation != 0;
    let reply_to = wants_reply.then_some(ReplyAt {
        to: sender.slot,
        correlation: tag.correlation,
        requester_generation: sender.generation,
        outbox,
    });
    // Counted here and added to the event's stats in one look-up at the end.
    let mut counts = EventStats {
        received: 1,
        ..EventStats::default()
    };
    let count = |counts: EventStats| {
        let mut s = stats.borrow_mut();
        match s.get_mut(call.name) {
            Some(e) => e.add(&counts),
            None => s.entry(call.name.to_owned()).or_default().add(&counts),
        }
    };
    let Some(Handlers { name, list }) = handlers.get_mut(call.name).filter(|h| !h.list.is_empty()) else {
        counts.unhandled += 1;
        count(counts);
        return reply_to.map(|r| reply_message(&r, wire::NO_HANDLER, b""));
    };
    let ctx = Ctx {
        sender,
        // Lent, not cloned (see `Handlers`); a handler that keeps a clone
        // of its `Ctx` shares the same `Arc`.
        event: name.take().unwrap_or_else(|| call.name.into()),
        delivery_id: call.delivery,
        kind,
    };
    // Events run every handler; calls run the first.
    let run = if kind == CallKind::Event { list.len() } else { 1 };
    let mut first: Option<Outcome> = None;
    let mut spent = Vec::new();
    let mut frame = super::dispatch::buffer(spare);
    for h in list.iter_mut().take(run) {
        IN_HANDLER.with(|f| f.set(true));
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            (h.f)(&ctx, call.data, reply_to.as_ref(), &mut frame)
        }))
        .unwrap_or_else(|p| Outcome::Failed(panic_text(p)));
        IN_HANDLER.with(|f| f.set(false));
        match &outcome {
            Outcome::Decode(e) => {
                counts.decode_failures += 1;
                tracing::warn!(event = call.name, sender = sender.slot, error = %e, "payload does not decode as the handler's type; handler not called");
            }
            Outcome::Failed(e) => {
                counts.failures += 1;
                tracing::warn!(event = call.name, sender = sender.slot, error = %e, "handler failed");
            }
            _ => counts.handled += 1,
        }
        if h.once && !matches!(outcome, Outcome::Decode(_)) {
            spent.push(h.id);
        }
        if first.is_none() {
            first = Some(outcome);
        }
    }
    *name = Some(ctx.event);
    count(counts);
    if frame.capacity() != 0 {
        super::dispatch::recycle(spare, frame);
    }
    list.retain(|h| !spent.contains(&h.id));
    let r = reply_to?;
    Some(match first? {
        Outcome::Value(bytes) => reply_message(&r, wire::OK, &bytes),
        Outcome::Framed(mut frame) => {
            wire::put_reply_header(&mut frame, wire::OK, r.requester_generation);
            (
                r.to,
                Tag {
                    kind: wire::REPLY,
                    correlation: r.correlation,
                },
                frame,
            )
        }
        Outcome::Deferred => return None,
        Outcome::Failed(e) => reply_message(&r, wire::FAILED, e.as_bytes()),
        Outcome::Decode(e) => reply_message(
            &r,
            wire::FAILED,
            format!("cannot decode the payload: {e}").as_bytes(),
        ),
    })
}

pub(super) fn reply_message(r: &ReplyAt<'_>, status: u8, body: &[u8]) -> (u32, Tag, Vec<u8>) {
    (
        r.to,
        Tag {
            kind: wire::REPLY,
            correlation: r.correlation,
        },
        wire::reply(status, r.requester_generation, body),
    )
}
