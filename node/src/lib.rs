//! The Node.js addon of shmcluster: the messenger driven by the JS thread.
//!
//! One [`Native`] owns a [`Messenger`] on Node's main thread. It is a new
//! driver of the messenger's call core (see the library's
//! `messenger/polled.rs`), not a second protocol:
//!
//! - **Waking**: the slot's eventfd (`SHMCLUSTER_WAKE_FDS`) is registered
//!   with libuv (`uv_poll_*` on the loop Node-API gives us, see [`uv`]).
//!   When a turn finds nothing to do, the messenger parks the slot with
//!   `PARKED_FD`, so a sender writes the eventfd; libuv sees it readable
//!   and calls back into JS, which turns again. No thread spins, nothing
//!   polls, except a turn for a few microseconds after this worker sent
//!   something (see [`Spin`]).
//! - **Handlers** registered here only queue what arrives (event, sender,
//!   payload, and the [`BytesReply`] of a call); the JS layer (index.js)
//!   runs the JS handlers after the turn, on the same thread, and answers
//!   through [`Native::reply`] when a handler's value (or promise) is
//!   ready; the answer is sent at once.
//! - **Turns** hand JS records (see [`tag`]): their numbers written into
//!   a `Float64Array` JS passes in, their values (a payload, an object)
//!   returned; the hot ones (a request's answer, a call, an event) are a
//!   few numbers and one payload, a string when JS will parse it as JSON.
//!   Objects made through Node-API cost a property key each, arrays a
//!   call per element, and were most of a request's time
//!   (node/bench/README.md, "Where the time goes").
//! - **Calls** (`request`, `map`, `consume`, and through the leader
//!   `invoke` and `publish`) start at once and return a ticket; their
//!   ends come out of later turns and resolve JS promises.
//! - **Leader and followers** (cluster-client): the election is the
//!   library's (a candidate thread per role holds the role's robust
//!   mutex); an invoke handler queues the call like a request handler
//!   (`kind: "invoke"`, answered through [`Native::reply`]; only the
//!   leader's runs), a subscription queues each value (`kind: "topic"`),
//!   and turns report new leaders ([`tag::LEADER`]), after
//!   telling a new leader this worker's subscriptions. Nothing waits for
//!   a leader on the JS thread.
//!
//! Errors cross to JS as `Error`s whose message is `CODE\u{1}text`; the
//! JS layer turns them into `Error`s with `err.code` (the C ABI's result
//! names, `NO_SUCH_WORKER`, `TIMED_OUT`, ...). Nothing another process
//! sends may crash the process: a payload is bytes until JS decodes it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use napi::bindgen_prelude::{Buffer, Either, Null, ToNapiValue};
use napi::{Env, JsFunction, JsObject, JsTypedArray, TypedArrayType};
use napi_derive::napi;
use shmcluster::{
    BytesReply, CallError, CallKind, EmitError, Finished, LockError, Locks, MapError, Messenger, Target,
    Turn, Worker,
};

pub mod listen;
mod uv;
mod waiter;

/// How many turns one call of [`Native::turn`] makes before it hands the
/// thread back to the event loop (JS then schedules the next with
/// `setImmediate`): a flood of messages must not starve timers and I/O.
const TURNS_PER_CALL: u32 = 64;

/// How long a worker that started a request polls for its answer before
/// it parks, by default (see [`Spin`]), in microseconds; the Rust
/// messenger's caller spins as long (`ANSWER_SPIN` in
/// src/messenger/calls.rs). Measured with node/bench/run.js on the
/// reference machine (2 vCPUs; 2 and 4 workers; medians of 5 rounds;
/// node/bench/README.md), request p50 Node to Node: 81 µs without spins
/// (two wakes per round trip), 12.9-13.5 µs spinning 50 µs, no better
/// spinning 100 µs (and a worse p99, 294-314 µs against 198-218 µs).
/// Spinning 20 µs measured 13 µs in one run and 13-54 µs across rounds
/// of another: an answer that comes after the spin costs two wakes
/// again, and the pair can stay in that regime. The spin costs no CPU
/// per request: a wake costs more than the spin that saves it (user +
/// system of both workers per request: 99-101 µs without spins, 55-57
/// µs with the defaults).
const DEFAULT_REQUEST_SPIN_US: u32 = 50;

/// How long a worker that has just answered a call polls for the same
/// caller's next call, by default. The caller takes its answer, runs its
/// JS and sends the next request 5-10 µs later: request p50 with the
/// caller spinning 50 µs and the answerer 0 µs: 28 µs (one wake per
/// round trip); 5 µs: no better than no spin; 10 µs: 12.8-13.4 µs in one
/// run, 17-22 µs in another; 20 µs: 12.9-15.3 µs; 50 µs: 13.1-15.8 µs.
/// Not longer: with more workers than cores, an answerer that spins
/// takes the core the next answerer needs (map over 4 workers on 2
/// vCPUs, p50: 108-116 µs with 0 or 20 µs, 162 µs with 50 µs, 272 µs
/// with 100 µs).
const DEFAULT_ANSWER_SPIN_US: u32 = 20;

/// The longest spin JS may ask for: a spin holds the JS thread.
const MAX_SPIN_US: u32 = 1000;

/// How long [`Native::turn`] polls the lanes on the JS thread before it
/// parks the slot on its eventfd. Waking a parked slot costs an eventfd
/// wake plus a libuv turn, 20-40 µs across the vCPUs of the reference
/// machine, and a request/reply pays two when both sides sleep.
///
/// A spin is counted from this worker's last send of a kind that brings
/// something back soon: a request started (its answer: `request`
/// microseconds) and an answer sent (the caller's next call: `answer`
/// microseconds). Then the turn parks as before. An `emit` expects
/// nothing; a `map` or `consume` caller waits for workers that were
/// parked (their wakes take longer than a spin), and a spinning caller
/// would take the core they need. The JS thread is held for at most that
/// long per send, and never while JS has work: what arrives goes back to
/// JS at once. `NODE_SHMCLUSTER_SPIN=request[,answer]` or
/// `Native::set_spin` set them; 0 never spins.
#[derive(Debug, Clone, Copy)]
struct Spin {
    request: u32,
    answer: u32,
    /// Poll until then (the latest send plus its spin).
    until: Option<Instant>,
}

impl Spin {
    fn from_env() -> Self {
        let mut spin = Self {
            request: DEFAULT_REQUEST_SPIN_US,
            answer: DEFAULT_ANSWER_SPIN_US,
            until: None,
        };
        // Named for the Node package (`NODE_*`), beside NODE_SHMCLUSTER_WAKE.
        if let Ok(v) = std::env::var("NODE_SHMCLUSTER_SPIN") {
            let mut it = v.split(',').map(|x| x.trim().parse::<u32>().ok());
            if let Some(Some(r)) = it.next() {
                spin.request = r.min(MAX_SPIN_US);
            }
            if let Some(Some(a)) = it.next() {
                spin.answer = a.min(MAX_SPIN_US);
            }
        }
        spin
    }

    /// This worker sent something that brings something back: poll for
    /// up to `us` from now.
    fn sent(&mut self, us: u32) {
        if us > 0 {
            let t = Instant::now() + Duration::from_micros(u64::from(us));
            self.until = Some(self.until.map_or(t, |u| u.max(t)));
        }
    }
}

/// How long a section's lock thread waits for the lock at a time before it
/// looks whether the worker closed ([`Native::close`]): a section still
/// waiting then ends `WORKER_CLOSED` within this, instead of holding the
/// promise (and with it the event loop) until the lock comes free.
const LOCK_WAIT_SLICE: Duration = Duration::from_millis(50);

/// A section of [`Native::lock_acquire`], waiting for its lock or holding it.
struct Section {
    /// Sending (or dropping) ends a held section: its thread unlocks.
    release: std::sync::mpsc::Sender<()>,
    /// Set by [`Native::close`]: a section still waiting gives up.
    closed: Arc<AtomicBool>,
    /// Set by its thread when it ended without the lock (timed out,
    /// failed, closed): nothing to release.
    ended: Arc<AtomicBool>,
}

/// A message that arrived for a registered event, queued by its handler
/// until the JS layer runs the JS handlers.
struct Queued {
    /// The event's (method's, topic's) id in [`Native::names`].
    event: u32,
    sender: u32,
    /// As [`Incoming::kind`].
    kind: &'static str,
    delivery_id: u64,
    data: Vec<u8>,
    reply: Option<BytesReply>,
}

/// The tags of the records of [`Native::turn`] (index.js reads them,
/// `_apply`). A record is its tag and a few numbers, written into a
/// `Float64Array` JS passes in, and at most one JS value (a payload, an
/// object), returned: a message or an answer crosses to JS as numbers in
/// memory JS reads and one string, not an object with named properties
/// (each property of an object made through Node-API costs an
/// internalised key) nor an array (each element a Node-API call).
mod tag {
    /// `ticket`; value: the payload. A request's (an invoke's) answer.
    pub const ANSWER: u32 = 1;
    /// `event id, sender, reply id`; value: the payload. A request's or
    /// a map's call for a `listen`ed event.
    pub const CALL: u32 = 2;
    /// `event id, sender`; value: the payload. An emitted event.
    pub const EVENT: u32 = 3;
    /// Value: a `Settled`. Any other end (errors, maps, consumes).
    pub const SETTLED: u32 = 4;
    /// Value: an `Incoming`. A consume, an invoke, a topic's value.
    pub const INCOMING: u32 = 5;
    /// Value: a `LeaderChange`.
    pub const LEADER: u32 = 6;
    /// Value: the text. A lane holds garbage (the others keep working).
    pub const CORRUPT: u32 = 7;
    /// The turns ran out with work left: turn again soon (setImmediate).
    pub const MORE: u32 = 8;
    /// `ms`: calls in flight must be looked at within `ms`; `-1`: none
    /// waits any more.
    pub const DUE: u32 = 9;
}

/// The numbers of the longest record ([`tag::CALL`]).
const REC_NUMS: usize = 4;

/// Room [`Native::turn`] keeps at the end of the numbers for
/// [`tag::MORE`] and [`tag::DUE`].
const REC_TAIL: usize = 3;

/// One record of [`Native::turn`] (see [`tag`]).
struct Rec {
    nums: [f64; REC_NUMS],
    len: usize,
    val: Option<Val>,
}

impl Rec {
    fn new(nums: &[f64], val: Option<Val>) -> Self {
        let mut r = Self {
            nums: [0.0; REC_NUMS],
            len: nums.len().min(REC_NUMS),
            val,
        };
        r.nums[..r.len].copy_from_slice(&nums[..r.len]);
        r
    }
}

/// The JS value of a record.
pub enum Val {
    /// A JSON payload that is valid UTF-8: JS parses the string as it is.
    Text(String),
    /// A raw payload (or one that is not UTF-8): a `Buffer`.
    Bytes(Vec<u8>),
    Incoming(Incoming),
    Settled(Settled),
    Leader(LeaderChangeJs),
}

impl Val {
    /// A payload: a string when JS will parse it as JSON and it is
    /// UTF-8 (one copy into V8, no `Buffer` and no `toString`), else the
    /// bytes.
    fn payload(data: Vec<u8>, text: bool) -> Self {
        if !text {
            return Self::Bytes(data);
        }
        match String::from_utf8(data) {
            Ok(s) => Self::Text(s),
            Err(e) => Self::Bytes(e.into_bytes()),
        }
    }
}

/// What [`Native::turn`] returns: `null` (nothing for JS), the one value
/// of the records, or their values in an array (none, or several).
pub enum TurnRet {
    Nothing,
    One(Val),
    Many(Vec<Val>),
}

impl ToNapiValue for TurnRet {
    unsafe fn to_napi_value(env: napi::sys::napi_env, val: Self) -> napi::Result<napi::sys::napi_value> {
        // SAFETY: `env` is the live environment napi-rs hands the
        // conversion of a return value, which is all each callee needs.
        unsafe {
            match val {
                TurnRet::Nothing => Null::to_napi_value(env, Null),
                TurnRet::One(v) => Val::to_napi_value(env, v),
                TurnRet::Many(v) => Vec::<Val>::to_napi_value(env, v),
            }
        }
    }
}

impl ToNapiValue for Val {
    unsafe fn to_napi_value(env: napi::sys::napi_env, val: Self) -> napi::Result<napi::sys::napi_value> {
        // SAFETY: `env` is the live environment napi-rs hands the
        // conversion of a return value, which is all each callee needs.
        unsafe {
            match val {
                Val::Text(s) => String::to_napi_value(env, s),
                Val::Bytes(b) => Buffer::to_napi_value(env, b.into()),
                Val::Incoming(i) => Incoming::to_napi_value(env, i),
                Val::Settled(s) => Settled::to_napi_value(env, s),
                Val::Leader(c) => LeaderChangeJs::to_napi_value(env, c),
            }
        }
    }
}

/// One arrived message, as JS sees it.
#[napi(object)]
pub struct Incoming {
    pub event: String,
    /// The sender's slot.
    pub sender: u32,
    /// `"event"` (emit, send, broadcast), `"request"` (request, map),
    /// `"consume"`, `"invoke"` (`event` is the method: answer it) or
    /// `"topic"` (`event` is the topic: a published value).
    pub kind: String,
    /// A consume's delivery id (decimal: ids use all 64 bits), else `"0"`.
    pub delivery_id: String,
    pub data: Buffer,
    /// For a call: the id to answer with [`Native::reply`].
    pub reply_id: Option<u32>,
}

/// One worker's entry of a map.
#[napi(object)]
pub struct MapEntry {
    pub slot: u32,
    pub ok: bool,
    pub value: Option<Buffer>,
    pub code: Option<String>,
    pub message: Option<String>,
}

/// How a started call ended.
#[napi(object)]
pub struct Settled {
    /// The call's ticket (exact: below 2^53).
    pub ticket: f64,
    /// `"answer"`, `"map"` or `"consumed"`.
    pub kind: String,
    pub ok: bool,
    /// A request's answer.
    pub value: Option<Buffer>,
    /// When not `ok`: the error's code and text.
    pub code: Option<String>,
    pub message: Option<String>,
    /// A map's entries.
    pub entries: Option<Vec<MapEntry>>,
    /// A consume's worker slot, delivery id (decimal) and attempts.
    pub slot: Option<u32>,
    pub delivery_id: Option<String>,
    pub attempts: Option<u32>,
}

/// A leader of a role, as JS sees it.
#[napi(object)]
pub struct LeaderJs {
    pub slot: u32,
    /// Exact below 2^53 (a lock's acquisition count).
    pub term: f64,
}

/// A new leader of the default role.
#[napi(object)]
pub struct LeaderChangeJs {
    pub slot: u32,
    /// Exact below 2^53.
    pub term: f64,
    /// The new leader is this worker.
    pub is_me: bool,
}

/// The messenger of one worker, owned by the JS thread.
#[napi]
pub struct Native {
    m: Option<Messenger>,
    queue: Arc<Mutex<VecDeque<Queued>>>,
    replies: HashMap<u32, BytesReply>,
    next_reply: u32,
    /// The calls in flight, by the call core's ticket (which JS gets as
    /// its ticket: a counter of this messenger's calls from 1, never
    /// reused, exact as a JS number below 2^53), and whether the answer
    /// goes to JS as bytes (`raw`) rather than JSON text.
    tickets: HashMap<u64, bool>,
    /// Event, method and topic names by id ([`Queued::event`]), the ids
    /// by name, and whether a raw handler takes the event (its payloads
    /// then go to JS as bytes; see [`Native::set_raw`]).
    names: Vec<String>,
    ids: HashMap<String, u32>,
    raw: Vec<bool>,
    /// The latest turn told JS a due time (it is told `null` once none
    /// is left).
    due_told: bool,
    /// A corrupt lane met outside a turn (by [`Native::reply`]'s send),
    /// for the next turn to report.
    corrupt: Option<String>,
    /// Records a turn could not hand over (its `rec` was full), for the
    /// next.
    backlog: VecDeque<Rec>,
    /// Registered with libuv (None without an eventfd, and after close).
    poll: Option<uv::Poll>,
    /// The fallback wake without an eventfd.
    waiter: Option<waiter::Waiter>,
    /// The slot is parked on its eventfd (`Turn::Parked`).
    parked: bool,
    instances: u32,
    /// The lock table (made once: it caches names).
    locks: Option<Locks>,
    /// Sections waiting for their lock or holding it (see
    /// [`Native::lock_acquire`]).
    sections: HashMap<u32, Section>,
    next_section: u32,
    /// New leaders seen by turns, for JS ([`Native::watch_leader`]).
    changes: Option<Arc<Mutex<Vec<LeaderChangeJs>>>>,
    /// The worker's index and generation (from its environment).
    index: u32,
    generation: u32,
    /// How long a turn polls before it parks.
    spin: Spin,
}

/// A held lock, as the promise of [`Native::lock_acquire`] resolves.
#[napi(object)]
pub struct Held {
    /// For [`Native::lock_release`].
    pub id: u32,
    pub owner_died: bool,
    /// Exact below 2^53 (a lock's acquisition count).
    pub fencing_token: f64,
}

fn lock_err(e: &LockError) -> napi::Error {
    let code = match e {
        LockError::NameTooLong { .. } => "LOCK_NAME_TOO_LONG",
        LockError::TableFull { .. } => "LOCK_TABLE_FULL",
        LockError::WouldDeadlock => "LOCK_WOULD_DEADLOCK",
        LockError::Timeout => "LOCK_TIMEOUT",
        LockError::Unrecoverable { .. } => "LOCK_UNRECOVERABLE",
        LockError::Glibc { .. } => "GLIBC",
        LockError::Io(_) => "IO",
        _ => "UNKNOWN",
    };
    err(code, e)
}

/// A JS error with a code (see the crate's docs).
fn err(code: &str, message: impl std::fmt::Display) -> napi::Error {
    napi::Error::from_reason(format!("{code}\u{1}{message}"))
}

fn call_code(e: &CallError) -> &'static str {
    match e {
        CallError::NoHandler => "NO_HANDLER",
        CallError::HandlerFailed(_) => "HANDLER_FAILED",
        CallError::WorkerDied => "WORKER_DIED",
        CallError::TimedOut => "TIMED_OUT",
        CallError::NoSuchWorker { .. } => "NO_SUCH_WORKER",
        CallError::TooLarge { .. } => "TOO_LARGE",
        CallError::EventName { .. } => "EVENT_NAME",
        CallError::Encode(_) => "INVALID_ARGUMENT",
        CallError::Decode(_) => "DECODE",
        CallError::Corrupt(_) => "CORRUPT",
        CallError::NoLeader => "NO_LEADER",
        CallError::LeaderDied => "LEADER_DIED",
        CallError::InHandler => "IN_HANDLER",
        CallError::HostUnreachable(_) => "HOST_UNREACHABLE",
        _ => "UNKNOWN",
    }
}

/// The text of a call error: a handler's own message as it wrote it.
fn call_text(e: &CallError) -> String {
    match e {
        CallError::HandlerFailed(m) => m.clone(),
        e => e.to_string(),
    }
}

fn map_code(e: &MapError) -> &'static str {
    match e {
        MapError::TimedOut => "TIMED_OUT",
        MapError::WorkerDied => "WORKER_DIED",
        MapError::NoHandler => "NO_HANDLER",
        MapError::HandlerFailed(_) => "HANDLER_FAILED",
        MapError::Decode(_) => "DECODE",
        MapError::Corrupt(_) => "CORRUPT",
        MapError::HostUnreachable => "HOST_UNREACHABLE",
        _ => "UNKNOWN",
    }
}

fn emit_err(e: EmitError) -> napi::Error {
    let code = match &e {
        EmitError::NoSuchWorker { .. } => "NO_SUCH_WORKER",
        EmitError::EventName { .. } => "EVENT_NAME",
        EmitError::TooLarge { .. } => "TOO_LARGE",
        EmitError::Encode(_) => "INVALID_ARGUMENT",
        EmitError::WorkerDied => "WORKER_DIED",
        EmitError::TimedOut => "TIMED_OUT",
        EmitError::Corrupt(_) => "CORRUPT",
        EmitError::NoBridge => "HOST_UNREACHABLE",
        _ => "UNKNOWN",
    };
    err(code, e)
}

fn call_err(e: &CallError) -> napi::Error {
    err(call_code(e), call_text(e))
}

/// A payload from JS: bytes, or the text of a JSON value (index.js's
/// `encode`; a string saves JS a `Buffer` per call).
type Payload = Either<Buffer, String>;

fn bytes(d: &Payload) -> &[u8] {
    match d {
        Either::A(b) => b,
        Either::B(s) => s.as_bytes(),
    }
}

/// A timeout in milliseconds from JS (finite, not negative) as a deadline.
fn deadline(timeout_ms: f64) -> napi::Result<Instant> {
    if !(timeout_ms.is_finite() && timeout_ms >= 0.0) {
        return Err(err(
            "INVALID_ARGUMENT",
            "timeout must be a finite number of milliseconds >= 0",
        ));
    }
    // Capped at a day: `Instant + Duration` must not overflow.
    let ms = timeout_ms.min(86_400_000.0);
    Ok(Instant::now() + Duration::from_secs_f64(ms / 1000.0))
}

fn kind_name(k: CallKind) -> &'static str {
    match k {
        CallKind::Event => "event",
        CallKind::Request => "request",
        CallKind::Consume => "consume",
    }
}

/// The next id of `counter` (from 1, wrapping past `u32::MAX`) that is not
/// `in_use`: after 2^32 ids, one still held (a reply never answered, a
/// section never ended) is skipped rather than handed out twice.
fn next_free(counter: &mut u32, in_use: impl Fn(u32) -> bool) -> u32 {
    loop {
        let id = *counter;
        *counter = counter.wrapping_add(1).max(1);
        if !in_use(id) {
            return id;
        }
    }
}

impl Native {
    fn new(m: Messenger, instances: u32) -> Self {
        let (index, generation) = (m.worker().index(), m.worker().generation());
        Self {
            m: Some(m),
            queue: Arc::default(),
            replies: HashMap::new(),
            next_reply: 1,
            tickets: HashMap::new(),
            names: Vec::new(),
            ids: HashMap::new(),
            raw: Vec::new(),
            due_told: false,
            corrupt: None,
            backlog: VecDeque::new(),
            poll: None,
            waiter: None,
            parked: false,
            instances,
            locks: None,
            sections: HashMap::new(),
            next_section: 1,
            changes: None,
            index,
            generation,
            spin: Spin::from_env(),
        }
    }

    /// The messenger, running (not parked): every API call goes through
    /// here, and JS turns again after it, which parks again.
    fn m(&mut self) -> napi::Result<&mut Messenger> {
        let m = self
            .m
            .as_mut()
            .ok_or_else(|| err("WORKER_CLOSED", "the messenger is closed"))?;
        if self.parked {
            m.unpark();
            self.parked = false;
        }
        Ok(m)
    }

    /// Up to [`TURNS_PER_CALL`] turns of the messenger, until it parks
    /// (or goes idle, with the waiter thread). True if work is left (turn
    /// again soon).
    fn turns(&mut self, corrupt: &mut Option<String>) -> napi::Result<bool> {
        let fd_park = self.poll.is_some();
        let m = self.m()?;
        for _ in 0..TURNS_PER_CALL {
            match if fd_park { m.turn() } else { m.turn_idle() } {
                Ok(Turn::Busy) => continue,
                Ok(Turn::Parked) => {
                    self.parked = true;
                    return Ok(false);
                }
                Ok(_) => {
                    if let Some(w) = &self.waiter {
                        w.arm();
                    }
                    return Ok(false);
                }
                Err(e) => {
                    *corrupt = Some(e.to_string());
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// The messenger's part of [`Native::turn`]: its turns (and the spin),
    /// and what they brought as records. True if work is left.
    fn turn_messenger(&mut self, recs: &mut VecDeque<Rec>) -> napi::Result<bool> {
        let mut corrupt = self.corrupt.take();
        let mut more = self.turns(&mut corrupt)?;
        let m = self.m.as_mut().ok_or_else(|| err("WORKER_CLOSED", "closed"))?;
        let mut finished = m.take_finished();
        // Nothing for JS and nothing left to do: poll a while before
        // parking if this worker sent something a moment ago (see `Spin`).
        let spin_until = self.spin.until.filter(|&t| Instant::now() < t);
        if let (false, None, true, Some(until)) = (more, &corrupt, finished.is_empty(), spin_until) {
            if self.queue_is_empty() {
                self.spin_poll(until, &mut finished, &mut corrupt)?;
                // Parks (or turns on, if the spin found a flood).
                more = self.turns(&mut corrupt)?;
                let m = self.m.as_mut().ok_or_else(|| err("WORKER_CLOSED", "closed"))?;
                finished.extend(m.take_finished());
            }
        }
        if let Some(c) = corrupt {
            recs.push_back(Rec::new(&[f64::from(tag::CORRUPT)], Some(Val::Text(c))));
        }
        if let Some(c) = &self.changes {
            for c in std::mem::take(&mut *c.lock().unwrap_or_else(|p| p.into_inner())) {
                recs.push_back(Rec::new(&[f64::from(tag::LEADER)], Some(Val::Leader(c))));
            }
        }
        for (t, f) in finished {
            self.settled(t, f, recs);
        }
        let queued = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()));
        for q in queued {
            self.incoming(q, recs);
        }
        Ok(more)
    }

    fn queue_is_empty(&self) -> bool {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// The spin: turns without parking until `until`, or until something
    /// arrived for JS (a message for a handler, the end of a call). The
    /// slot stays running meanwhile, so a sender rings no eventfd.
    fn spin_poll(
        &mut self,
        until: Instant,
        finished: &mut Vec<(shmcluster::CallTicket, Finished)>,
        corrupt: &mut Option<String>,
    ) -> napi::Result<()> {
        let queue = self.queue.clone();
        let m = self.m()?;
        loop {
            match m.turn_idle() {
                Ok(Turn::Busy) => {
                    finished.extend(m.take_finished());
                    if !finished.is_empty() || !queue.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
                        return Ok(());
                    }
                }
                Ok(_) => std::hint::spin_loop(),
                Err(e) => {
                    *corrupt = Some(e.to_string());
                    return Ok(());
                }
            }
            // Busy turns that bring JS nothing (messages for events
            // nobody listens to, say) end the spin on time too.
            if Instant::now() >= until {
                return Ok(());
            }
        }
    }

    /// The JS ticket of a started call (its core ticket: never reused, so
    /// a call's promise is never confused with a later one's); `raw`: its
    /// answer goes to JS as bytes.
    fn ticket(&mut self, t: shmcluster::CallTicket, raw: bool) -> f64 {
        self.tickets.insert(t.0, raw);
        t.0 as f64
    }

    /// The id of an event, method or topic name ([`Queued::event`]).
    fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        self.names.push(name.to_owned());
        self.raw.push(false);
        self.ids.insert(name.to_owned(), id);
        id
    }

    fn name(&self, id: u32) -> String {
        self.names.get(id as usize).cloned().unwrap_or_default()
    }

    /// After an answer: send it now (a turn of the messenger, which also
    /// takes in what has arrived, for the next JS turn), and spin for the
    /// same caller's next call.
    fn sent_answer(&mut self) -> napi::Result<()> {
        let m = self.m()?;
        if let Err(e) = m.turn_idle() {
            self.corrupt = Some(e.to_string());
        }
        self.spin.sent(self.spin.answer);
        Ok(())
    }

    /// A queued message as records of [`Native::turn`]: a request's or a
    /// map's call as `CALL, event, sender, reply id, payload`, an event
    /// as `EVENT, event, sender, payload`, anything else as an
    /// `Incoming`.
    fn incoming(&mut self, q: Queued, out: &mut VecDeque<Rec>) {
        let reply_id = q.reply.map(|r| {
            let id = next_free(&mut self.next_reply, |id| self.replies.contains_key(&id));
            self.replies.insert(id, r);
            id
        });
        let text = !self.raw.get(q.event as usize).copied().unwrap_or(false);
        let (event, sender) = (f64::from(q.event), f64::from(q.sender));
        out.push_back(match (q.kind, reply_id) {
            ("request", Some(id)) => Rec::new(
                &[f64::from(tag::CALL), event, sender, f64::from(id)],
                Some(Val::payload(q.data, text)),
            ),
            ("event", None) => Rec::new(
                &[f64::from(tag::EVENT), event, sender],
                Some(Val::payload(q.data, text)),
            ),
            (kind, reply_id) => Rec::new(
                &[f64::from(tag::INCOMING)],
                Some(Val::Incoming(Incoming {
                    event: self.name(q.event),
                    sender: q.sender,
                    kind: kind.into(),
                    delivery_id: q.delivery_id.to_string(),
                    data: q.data.into(),
                    reply_id,
                })),
            ),
        });
    }

    fn settled(&mut self, ticket: shmcluster::CallTicket, f: Finished, out: &mut VecDeque<Rec>) {
        let Some(raw) = self.tickets.remove(&ticket.0) else {
            return;
        };
        let ticket = ticket.0 as f64;
        let f = match f {
            Finished::Answer(Ok(v)) => {
                out.push_back(Rec::new(
                    &[f64::from(tag::ANSWER), ticket],
                    Some(Val::payload(v, !raw)),
                ));
                return;
            }
            f => f,
        };
        let mut s = Settled {
            ticket,
            kind: String::new(),
            ok: true,
            value: None,
            code: None,
            message: None,
            entries: None,
            slot: None,
            delivery_id: None,
            attempts: None,
        };
        let failed = |s: &mut Settled, e: &CallError| {
            s.ok = false;
            s.code = Some(call_code(e).into());
            s.message = Some(call_text(e));
        };
        match f {
            Finished::Answer(r) => {
                s.kind = "answer".into();
                match r {
                    Ok(v) => s.value = Some(v.into()),
                    Err(e) => failed(&mut s, &e),
                }
            }
            Finished::Map(entries) => {
                s.kind = "map".into();
                s.entries = Some(
                    entries
                        .into_iter()
                        .map(|(w, r)| match r {
                            Ok(v) => MapEntry {
                                slot: w.slot,
                                ok: true,
                                value: Some(v.into()),
                                code: None,
                                message: None,
                            },
                            Err(e) => MapEntry {
                                slot: w.slot,
                                ok: false,
                                value: None,
                                code: Some(map_code(&e).into()),
                                message: Some(match e {
                                    MapError::HandlerFailed(m) => m,
                                    e => e.to_string(),
                                }),
                            },
                        })
                        .collect(),
                );
            }
            Finished::Consumed(r) => {
                s.kind = "consumed".into();
                match r {
                    Ok(c) => {
                        s.slot = Some(c.worker.slot);
                        s.delivery_id = Some(c.delivery_id.to_string());
                        s.attempts = Some(c.attempts);
                    }
                    Err(e) => failed(&mut s, &e),
                }
            }
            _ => return,
        }
        out.push_back(Rec::new(&[f64::from(tag::SETTLED)], Some(Val::Settled(s))));
    }
}

#[napi]
impl Native {
    /// The worker a `shmcluster run` master spawned this process as.
    #[napi(factory)]
    pub fn from_env() -> napi::Result<Self> {
        let mut w = Worker::from_env().map_err(|e| err("ENVIRONMENT", e))?;
        listen::stash(&mut w);
        let instances = w.instances();
        Ok(Self::new(Messenger::new(w), instances))
    }

    /// A cluster of one, in this process (no master).
    #[napi(factory)]
    pub fn standalone() -> napi::Result<Self> {
        let m = Messenger::standalone().map_err(|e| err("IO", e))?;
        Ok(Self::new(m, 1))
    }

    /// Registers the wake: `on_wake` is called (on the JS thread) when a
    /// message arrives for an idle loop. The slot's eventfd polled by
    /// libuv; without one (or with `NODE_SHMCLUSTER_WAKE=thread`), a
    /// waiter thread ([`waiter`]). Returns `"eventfd"` or `"thread"`.
    #[napi]
    pub fn start_wake(&mut self, env: Env, on_wake: JsFunction) -> napi::Result<String> {
        if self.poll.is_some() {
            return Ok("eventfd".into());
        }
        if self.waiter.is_some() {
            return Ok("thread".into());
        }
        let m = self
            .m
            .as_ref()
            .ok_or_else(|| err("WORKER_CLOSED", "the messenger is closed"))?;
        // Named for the Node package (`NODE_*`): a setting of this binding.
        let forced = std::env::var("NODE_SHMCLUSTER_WAKE").is_ok_and(|v| v == "thread");
        if let (Some(fd), false) = (m.wake_fd(), forced) {
            let fd = fd.try_clone_to_owned().map_err(|e| err("IO", e))?;
            self.poll = Some(uv::Poll::start(&env, fd, on_wake)?);
            return Ok("eventfd".into());
        }
        self.waiter = Some(waiter::Waiter::start(m.idle_waiter(), &on_wake)?);
        Ok("thread".into())
    }

    /// Whether the wake keeps the event loop alive (`uv_ref`/`uv_unref`).
    #[napi]
    pub fn set_ref(&mut self, env: Env, referenced: bool) {
        if let Some(p) = &self.poll {
            p.set_ref(referenced);
        }
        if let Some(w) = &mut self.waiter {
            w.set_ref(&env, referenced);
        }
    }

    /// How long a turn polls before it parks after this worker started a
    /// request (`request`) or answered a call (`answer`), in microseconds
    /// (see `Spin`; each at most 1000, 0 never spins).
    #[napi]
    pub fn set_spin(&mut self, request: u32, answer: u32) {
        self.spin.request = request.min(MAX_SPIN_US);
        self.spin.answer = answer.min(MAX_SPIN_US);
        self.spin.until = None;
    }

    /// `[request, answer]`: the spins in microseconds.
    #[napi(getter)]
    pub fn spin(&self) -> Vec<u32> {
        vec![self.spin.request, self.spin.answer]
    }

    #[napi(getter)]
    pub fn slot(&self) -> u32 {
        self.m.as_ref().map_or(0, |m| m.slot())
    }

    #[napi(getter)]
    pub fn instances(&self) -> u32 {
        self.instances
    }

    /// Every slot of the segment (the instances plus spares).
    #[napi(getter)]
    pub fn live(&self) -> Vec<u32> {
        self.m
            .as_ref()
            .map_or_else(Vec::new, |m| m.live_workers().iter().map(|w| w.slot).collect())
    }

    /// The payload limit in bytes.
    #[napi(getter)]
    pub fn max_payload(&self) -> u32 {
        self.m
            .as_ref()
            .map_or(0, |m| u32::try_from(m.max_payload()).unwrap_or(u32::MAX))
    }

    /// Tells the master this worker is ready.
    #[napi]
    pub fn ready(&mut self) -> napi::Result<()> {
        self.m()?.worker().ready();
        Ok(())
    }

    /// Whether the master asked this worker to stop (drain, shutdown).
    #[napi]
    pub fn should_stop(&self) -> bool {
        self.m.as_ref().is_some_and(|m| m.worker().should_stop())
    }

    /// Queues every `event` message for JS (one Rust handler per event;
    /// the JS layer keeps its list of functions).
    #[napi]
    pub fn listen(&mut self, event: String) -> napi::Result<()> {
        let queue = self.queue.clone();
        let name = self.intern(&event);
        self.m()?
            .on_request_async_bytes(&event, move |ctx, data, reply| {
                let kind = ctx.kind();
                let q = Queued {
                    event: name,
                    sender: ctx.sender().slot,
                    kind: kind_name(kind),
                    delivery_id: ctx.delivery_id(),
                    data: data.to_vec(),
                    reply: (kind != CallKind::Event).then_some(reply),
                };
                queue.lock().unwrap_or_else(|p| p.into_inner()).push_back(q);
            })
            .map_err(|e| err("EVENT_NAME", e))?;
        Ok(())
    }

    /// Whether a raw handler takes `event`: its payloads then reach JS as
    /// `Buffer`s, else as JSON text when they are UTF-8.
    #[napi]
    pub fn set_raw(&mut self, event: String, raw: bool) {
        let id = self.intern(&event);
        if let Some(r) = self.raw.get_mut(id as usize) {
            *r = raw;
        }
    }

    /// The name of an event id of [`Native::turn`]'s records (JS caches
    /// it).
    #[napi]
    pub fn event_name(&self, id: u32) -> String {
        self.name(id)
    }

    /// Stops queueing `event` (callers then get `NO_HANDLER`).
    #[napi]
    pub fn unlisten(&mut self, event: String) -> napi::Result<()> {
        self.m()?.off(&event);
        Ok(())
    }

    /// Sends `event` to one slot, or to every live worker (`all`, the
    /// caller included).
    #[napi]
    pub fn emit(&mut self, to: Either<u32, String>, event: String, data: Payload) -> napi::Result<u32> {
        let target = match to {
            Either::A(slot) => Target::Worker(slot),
            Either::B(s) if s == "all" => Target::All,
            Either::B(s) if s == "others" => Target::Others,
            Either::B(s) => {
                return Err(err(
                    "INVALID_ARGUMENT",
                    format!("{s:?} is not a target (a slot, 'all', 'others')"),
                ))
            }
        };
        let n = self
            .m()?
            .emit_bytes(target, &event, bytes(&data))
            .map_err(emit_err)?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// Starts a request; its end comes out of a later turn.
    #[napi]
    pub fn start_request(
        &mut self,
        slot: u32,
        event: String,
        data: Payload,
        timeout_ms: f64,
        raw: Option<bool>,
    ) -> napi::Result<f64> {
        let d = deadline(timeout_ms)?;
        let t = self
            .m()?
            .start_request_bytes(slot, &event, bytes(&data), d)
            .map_err(|e| call_err(&e))?;
        self.spin.sent(self.spin.request);
        Ok(self.ticket(t, raw == Some(true)))
    }

    /// Starts a map.
    #[napi]
    pub fn start_map(&mut self, event: String, data: Payload, timeout_ms: f64) -> napi::Result<f64> {
        let d = deadline(timeout_ms)?;
        let t = self
            .m()?
            .start_map_bytes(&event, bytes(&data), d)
            .map_err(|e| call_err(&e))?;
        Ok(self.ticket(t, false))
    }

    /// Starts a consume.
    #[napi]
    pub fn start_consume(&mut self, event: String, data: Payload, timeout_ms: f64) -> napi::Result<f64> {
        let d = deadline(timeout_ms)?;
        let t = self
            .m()?
            .start_consume_bytes(&event, bytes(&data), d)
            .map_err(|e| call_err(&e))?;
        Ok(self.ticket(t, false))
    }

    /// Answers a call with a value (`Buffer`, or the text of a JSON
    /// value), and sends it at once (not at the next turn). False if
    /// `reply_id` is unknown (answered already). A value longer than the
    /// payload limit answers `HandlerFailed` instead.
    #[napi]
    pub fn reply(&mut self, reply_id: u32, value: Payload) -> napi::Result<bool> {
        let Some(r) = self.replies.remove(&reply_id) else {
            return Ok(false);
        };
        let m = self.m()?;
        let data = bytes(&value);
        let max = m.max_payload();
        r.send(if data.len() > max {
            Err(format!(
                "the reply is too large ({} bytes, at most {max})",
                data.len()
            ))
        } else {
            Ok(data.to_vec())
        });
        self.sent_answer()?;
        Ok(true)
    }

    /// Answers a call with `HandlerFailed(message)`; as [`Native::reply`].
    #[napi]
    pub fn reply_error(&mut self, reply_id: u32, message: String) -> napi::Result<bool> {
        let Some(r) = self.replies.remove(&reply_id) else {
            return Ok(false);
        };
        self.m()?;
        r.send(Err(message));
        self.sent_answer()?;
        Ok(true)
    }

    /// Up to [`TURNS_PER_CALL`] turns: what arrived, what settled, as
    /// records (see [`tag`]): their numbers written into `rec` (`rec[0]`:
    /// how many follow), their values returned (`null`: nothing for JS,
    /// as most idle turns; one value alone; several in an array). What
    /// does not fit in `rec` waits for the next turn (the `MORE` record
    /// says to come back soon).
    #[napi(ts_return_type = "unknown")]
    pub fn turn(&mut self, rec: JsTypedArray) -> napi::Result<TurnRet> {
        let mut rec = rec.into_value()?;
        if rec.typedarray_type != TypedArrayType::Float64 {
            return Err(err("INVALID_ARGUMENT", "the record array is not a Float64Array"));
        }
        // Checked above: `as_mut` would panic on another type.
        let rec: &mut [f64] = rec.as_mut();
        if rec.len() < 1 + REC_NUMS + REC_TAIL {
            return Err(err("INVALID_ARGUMENT", "the record array is too short"));
        }
        if self.m.is_none() {
            return Ok(TurnRet::Nothing);
        }
        let mut recs = std::mem::take(&mut self.backlog);
        let mut more = false;
        // What an earlier turn could not hand over goes first; the
        // messenger waits meanwhile (its lanes hold the rest).
        if recs.is_empty() {
            more = self.turn_messenger(&mut recs)?;
        }
        let m = self.m.as_mut().ok_or_else(|| err("WORKER_CLOSED", "closed"))?;
        let due = m.next_due();
        let mut w = 1;
        let end = rec.len() - REC_TAIL;
        let mut vals = Vec::new();
        while let Some(r) = recs.front() {
            if w + r.len > end {
                break;
            }
            rec[w..w + r.len].copy_from_slice(&r.nums[..r.len]);
            w += r.len;
            if let Some(r) = recs.pop_front() {
                vals.extend(r.val);
            }
        }
        if !recs.is_empty() {
            more = true;
            self.backlog = recs;
        }
        if more {
            rec[w] = f64::from(tag::MORE);
            w += 1;
        }
        let due_ms = match due {
            Some(t) => Some(t.saturating_duration_since(Instant::now()).as_secs_f64() * 1000.0),
            None if self.due_told => Some(-1.0),
            None => None,
        };
        if let Some(ms) = due_ms {
            rec[w] = f64::from(tag::DUE);
            rec[w + 1] = ms;
            w += 2;
            self.due_told = due.is_some();
        }
        rec[0] = (w - 1) as f64;
        Ok(match (w, vals.len()) {
            (1, _) => TurnRet::Nothing,
            (_, 1) => TurnRet::One(vals.pop().ok_or_else(|| err("UNKNOWN", "no value"))?),
            _ => TurnRet::Many(vals),
        })
    }

    /// This worker's instance number (kept across respawns and reloads).
    #[napi(getter)]
    pub fn index(&self) -> u32 {
        self.index
    }

    /// This worker's generation in its slot (a respawn or a reload makes
    /// a new one).
    #[napi(getter)]
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Asks the master for a rolling reload of every worker (this one
    /// included), as `SIGHUP` to the master does; nothing without a
    /// master.
    #[napi]
    pub fn request_reload(&mut self) -> napi::Result<()> {
        self.m()?.worker().request_reload();
        Ok(())
    }

    /// Asks the master for a graceful shutdown of the whole cluster, as
    /// `SIGTERM` to the master (or `shmcluster stop`) does: every worker,
    /// this one included, is told to stop. Without a master (standalone),
    /// the cluster's stop words are set directly.
    #[napi]
    pub fn request_shutdown(&mut self) -> napi::Result<()> {
        self.m()?.worker().request_shutdown();
        Ok(())
    }

    /// Joins the election for `role` (`""`, the default role, if none).
    #[napi]
    pub fn campaign(&mut self, role: Option<String>) -> napi::Result<()> {
        self.m()?
            .campaign_for(role.as_deref().unwrap_or(""))
            .map_err(|e| lock_err(&e))
    }

    /// Whether this worker leads `role` (default role if none) now.
    #[napi]
    pub fn is_leader(&self, role: Option<String>) -> bool {
        self.m
            .as_ref()
            .is_some_and(|m| m.is_leader_for(role.as_deref().unwrap_or("")))
    }

    /// Who leads `role` (default role if none) now, if anyone.
    #[napi]
    pub fn leader(&self, role: Option<String>) -> Option<LeaderJs> {
        self.m
            .as_ref()
            .and_then(|m| m.leader_for(role.as_deref().unwrap_or("")))
            .map(|l| LeaderJs {
                slot: l.slot,
                term: l.term as f64,
            })
    }

    /// From now on, turns report new leaders of the default role
    /// ([`tag::LEADER`] records). Idempotent.
    #[napi]
    pub fn watch_leader(&mut self) -> napi::Result<()> {
        if self.changes.is_some() {
            return Ok(());
        }
        let changes: Arc<Mutex<Vec<LeaderChangeJs>>> = Arc::default();
        let c = changes.clone();
        self.m()?.on_leader_change(move |ch| {
            c.lock().unwrap_or_else(|p| p.into_inner()).push(LeaderChangeJs {
                slot: ch.leader.slot,
                term: ch.leader.term as f64,
                is_me: ch.is_me,
            });
        });
        self.changes = Some(changes);
        Ok(())
    }

    /// Queues every invoke of `method` that reaches this worker while it
    /// leads, as `kind: "invoke"` (answered with [`Native::reply`]);
    /// campaigns for the default role. Once per method.
    #[napi]
    pub fn listen_invoke(&mut self, method: String) -> napi::Result<()> {
        let queue = self.queue.clone();
        let name = self.intern(&method);
        self.m()?
            .on_invoke_async_bytes(&method, move |ctx, data, reply| {
                let q = Queued {
                    event: name,
                    sender: ctx.sender().slot,
                    kind: "invoke",
                    delivery_id: 0,
                    data: data.to_vec(),
                    reply: Some(reply),
                };
                queue.lock().unwrap_or_else(|p| p.into_inner()).push_back(q);
            })
            .map_err(|e| err("EVENT_NAME", e))?;
        Ok(())
    }

    /// Starts an invoke of the leader's `method`; `idempotent`: on the
    /// leader's death it goes to the next leader instead of ending
    /// `LEADER_DIED`.
    #[napi]
    pub fn start_invoke(
        &mut self,
        method: String,
        data: Payload,
        timeout_ms: f64,
        idempotent: Option<bool>,
        raw: Option<bool>,
    ) -> napi::Result<f64> {
        let d = deadline(timeout_ms)?;
        let m = self.m()?;
        let t = if idempotent == Some(true) {
            m.start_invoke_idempotent_bytes(&method, bytes(&data), d)
        } else {
            m.start_invoke_bytes(&method, bytes(&data), d)
        }
        .map_err(|e| call_err(&e))?;
        Ok(self.ticket(t, raw == Some(true)))
    }

    /// Starts a publish of `data` on `topic` through the leader (its
    /// answer is empty).
    #[napi]
    pub fn start_publish(&mut self, topic: String, data: Payload, timeout_ms: f64) -> napi::Result<f64> {
        let d = deadline(timeout_ms)?;
        let t = self
            .m()?
            .start_publish_bytes(&topic, bytes(&data), d)
            .map_err(|e| call_err(&e))?;
        Ok(self.ticket(t, false))
    }

    /// Subscribes to `topic`: its values are queued as `kind: "topic"`.
    /// Returns whether a leader was told now (if not, the turn that
    /// first sees a leader tells it, and reports the change). Once per
    /// topic.
    #[napi]
    pub fn subscribe(&mut self, topic: String) -> napi::Result<bool> {
        let queue = self.queue.clone();
        let name = self.intern(&topic);
        self.m()?
            .subscribe_polled_bytes(&topic, move |ctx, data| {
                let q = Queued {
                    event: name,
                    sender: ctx.sender().slot,
                    kind: "topic",
                    delivery_id: 0,
                    data: data.to_vec(),
                    reply: None,
                };
                queue.lock().unwrap_or_else(|p| p.into_inner()).push_back(q);
            })
            .map_err(|e| call_err(&e))
    }

    /// Takes lock `name` (`""`: the global lock) on a thread of its own,
    /// which holds it until [`Native::lock_release`] (a pthread mutex
    /// belongs to the thread that locked it, and the JS section crosses
    /// `await`s): the promise resolves on the JS thread once it is held.
    /// The cost: a thread start and two hand-offs per section. The thread
    /// waits in slices of [`LOCK_WAIT_SLICE`], so that a close ends the
    /// wait (`WORKER_CLOSED`) instead of the promise keeping the loop alive
    /// until the lock comes free.
    #[napi(ts_return_type = "Promise<Held>")]
    pub fn lock_acquire(
        &mut self,
        env: Env,
        name: String,
        timeout_ms: Option<f64>,
    ) -> napi::Result<JsObject> {
        let timeout = match timeout_ms {
            None => None,
            Some(t) if t.is_finite() && t >= 0.0 => {
                Some(Duration::from_secs_f64(t.min(86_400_000.0) / 1000.0))
            }
            Some(_) => {
                return Err(err(
                    "INVALID_ARGUMENT",
                    "timeout must be a finite number of milliseconds >= 0",
                ))
            }
        };
        if self.m.is_none() {
            return Err(err("WORKER_CLOSED", "the worker is closed"));
        }
        if self.locks.is_none() {
            let locks = self.m()?.locks().map_err(|e| lock_err(&e))?;
            self.locks = Some(locks);
        }
        let locks = self
            .locks
            .clone()
            .ok_or_else(|| err("UNKNOWN", "no lock table"))?;
        // Sections that ended without the lock (timed out, failed, closed).
        self.sections.retain(|_, s| !s.ended.load(Ordering::Acquire));
        let id = next_free(&mut self.next_section, |id| self.sections.contains_key(&id));
        let (release, released) = std::sync::mpsc::channel::<()>();
        let closed = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(AtomicBool::new(false));
        let (closed2, ended2) = (closed.clone(), ended.clone());
        let (deferred, promise) = env.create_deferred()?;
        let deadline = timeout.map(|t| Instant::now() + t);
        std::thread::Builder::new()
            .name("shmcluster-lock".into())
            .spawn(move || {
                let gone = || {
                    err(
                        "WORKER_CLOSED",
                        "the worker closed while the section waited for its lock",
                    )
                };
                // In slices, to see a close (see `LOCK_WAIT_SLICE`).
                let guard = loop {
                    if closed2.load(Ordering::Acquire) {
                        ended2.store(true, Ordering::Release);
                        return deferred.reject(gone());
                    }
                    let slice = deadline.map_or(LOCK_WAIT_SLICE, |d| {
                        d.saturating_duration_since(Instant::now()).min(LOCK_WAIT_SLICE)
                    });
                    match locks.lock(&name, Some(slice)) {
                        Ok(guard) => break guard,
                        Err(LockError::Timeout) if deadline.is_none_or(|d| Instant::now() < d) => {}
                        Err(e) => {
                            ended2.store(true, Ordering::Release);
                            return deferred.reject(lock_err(&e));
                        }
                    }
                };
                if closed2.load(Ordering::Acquire) {
                    // Closed as the lock came: no section runs.
                    drop(guard);
                    ended2.store(true, Ordering::Release);
                    return deferred.reject(gone());
                }
                let held = Held {
                    id,
                    owner_died: guard.previous_owner_died(),
                    fencing_token: guard.fencing_token() as f64,
                };
                deferred.resolve(move |_| Ok(held));
                // Until JS releases it (after its section, even after a
                // close), or drops its end (the addon unloaded).
                let _ = released.recv();
                drop(guard);
            })
            .map_err(|e| err("IO", format!("cannot start the lock thread: {e}")))?;
        self.sections.insert(
            id,
            Section {
                release,
                closed,
                ended,
            },
        );
        Ok(promise)
    }

    /// Ends a section: its thread unlocks. False if `id` is not held.
    #[napi]
    pub fn lock_release(&mut self, id: u32) -> bool {
        self.sections
            .remove(&id)
            .is_some_and(|s| s.release.send(()).is_ok())
    }

    /// Stops the wake and drops the messenger (calls in flight are
    /// forgotten; unanswered calls to this worker are answered
    /// `HandlerFailed("reply dropped")`). Sections waiting for their lock
    /// end `WORKER_CLOSED`; a held one stays held until its
    /// [`Native::lock_release`].
    #[napi]
    pub fn close(&mut self) {
        if let Some(p) = self.poll.take() {
            p.stop();
        }
        if let Some(w) = self.waiter.take() {
            w.stop();
        }
        // Dropped replies answer `HandlerFailed("reply dropped")` through
        // the outbox: one last dispatch sends them.
        self.backlog.clear();
        self.replies.clear();
        // Sections still waiting for their lock give up (`WORKER_CLOSED`,
        // within a `LOCK_WAIT_SLICE`); held ones stay held until JS ends
        // them (`lock_release`, when the section's promise settles):
        // unlocking under a section still running would let another
        // worker in beside it.
        for s in self.sections.values() {
            s.closed.store(true, Ordering::Release);
        }
        if let Some(mut m) = self.m.take() {
            if self.parked {
                m.unpark();
                self.parked = false;
            }
            let _ = m.dispatch();
        }
    }
}
