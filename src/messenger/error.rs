//! The messenger's errors, one type per family of operations, the way
//! crossbeam-channel gives each operation its own: [`RegisterError`]
//! (registering a handler), [`EmitError`] (sending without waiting for an
//! answer), [`CallError`] (a call that waits: request, consume, invoke,
//! publish, and `map` as a whole), [`MapError`] (one worker's entry of a
//! `map`) and [`DispatchError`] (serving: dispatch, poll, run).
//!
//! Each carries its cause typed: a lane's garbage as [`CorruptLane`] (with
//! the [`LaneCorruption`] found), an encoding or decoding failure as
//! postcard's own error. The only text is what a remote handler answered
//! (`HandlerFailed`), which arrives as text. None of them holds a payload.

use std::fmt;

use super::MAX_EVENT_NAME;
use crate::LaneCorruption;

/// A lane found holding garbage on the way (see [`LaneCorruption`]): the
/// lane is poisoned, the others keep working.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CorruptLane {
    /// The lane's sending slot.
    pub from: u32,
    /// The lane's receiving slot.
    pub to: u32,
    /// What was wrong.
    pub error: LaneCorruption,
}

impl fmt::Display for CorruptLane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "corrupt lane {} -> {}: {}", self.from, self.to, self.error)
    }
}

impl std::error::Error for CorruptLane {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Why a handler could not be registered.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegisterError {
    /// The event name is longer than [`MAX_EVENT_NAME`] bytes.
    EventName {
        /// Its length.
        len: usize,
    },
}

impl fmt::Display for RegisterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EventName { len } => event_name(f, *len),
        }
    }
}

impl std::error::Error for RegisterError {}

/// Why serving messages stopped (`dispatch`, `poll`, `run`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DispatchError {
    /// A lane into this worker holds garbage. That lane is poisoned; call
    /// again to keep serving the others.
    Corrupt(CorruptLane),
}

impl fmt::Display for DispatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Corrupt(c) => c.fmt(f),
        }
    }
}

impl std::error::Error for DispatchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Corrupt(c) => Some(c),
        }
    }
}

/// Why a message sent without waiting for an answer (`emit`, `broadcast`,
/// `notify`, a handle's `emit`) was not sent. Nothing was sent to the
/// target it names; to a list of targets, those before it got theirs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EmitError {
    /// No such worker slot.
    NoSuchWorker {
        /// The slot asked for.
        slot: u32,
    },
    /// The event name is longer than [`MAX_EVENT_NAME`] bytes.
    EventName {
        /// Its length.
        len: usize,
    },
    /// The payload is longer than the messenger's limit
    /// ([`Messenger::max_payload`](super::Messenger::max_payload)). Nothing
    /// was sent, to anyone.
    TooLarge {
        /// The payload's length in bytes.
        len: usize,
        /// The payload limit in bytes.
        max: usize,
    },
    /// The value could not be encoded.
    Encode(postcard::Error),
    /// The lane to the target stayed full and no worker serves its slot.
    WorkerDied,
    /// The deadline passed while the lane to the target was full.
    TimedOut,
    /// A lane on the way holds garbage.
    Corrupt(CorruptLane),
    /// A message to another host, and this host has no live bridge (no
    /// `--nats`, or its bridge is being respawned).
    NoBridge,
    /// A message to another host whose name cannot be a host's (empty, or
    /// longer than 64 bytes).
    HostName(String),
}

impl fmt::Display for EmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSuchWorker { slot } => write!(f, "no worker slot {slot}"),
            Self::EventName { len } => event_name(f, *len),
            Self::TooLarge { len, max } => too_large(f, *len, *max),
            Self::Encode(e) => write!(f, "cannot encode the value: {e}"),
            Self::WorkerDied => f.write_str("no worker serves the full lane's slot"),
            Self::TimedOut => f.write_str("timed out"),
            Self::Corrupt(c) => c.fmt(f),
            Self::NoBridge => f.write_str("this host has no live NATS bridge to other hosts"),
            Self::HostName(h) => write!(f, "{h:?} is not a host name (1 to 64 bytes)"),
        }
    }
}

impl std::error::Error for EmitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Encode(e) => Some(e),
            Self::Corrupt(c) => Some(c),
            _ => None,
        }
    }
}

impl From<RegisterError> for EmitError {
    fn from(e: RegisterError) -> Self {
        match e {
            RegisterError::EventName { len } => Self::EventName { len },
        }
    }
}

impl From<DispatchError> for EmitError {
    fn from(e: DispatchError) -> Self {
        match e {
            DispatchError::Corrupt(c) => Self::Corrupt(c),
        }
    }
}

/// Why a call that waits for its answer failed: `request`, `consume`,
/// `invoke`, `publish`, and `map` as a whole (one worker's entry fails
/// with a [`MapError`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallError {
    /// No worker has (or the target has no) handler for the event.
    NoHandler,
    /// The handler failed: its error, a panic, or a payload it could not
    /// decode, as the handler's side wrote it.
    HandlerFailed(String),
    /// The target died before answering.
    WorkerDied,
    /// The deadline passed.
    TimedOut,
    /// No such worker slot.
    NoSuchWorker {
        /// The slot asked for.
        slot: u32,
    },
    /// The payload (the encoded value, or the raw bytes) is longer than
    /// the messenger's limit
    /// ([`Messenger::max_payload`](super::Messenger::max_payload)). Nothing
    /// was sent, to anyone.
    TooLarge {
        /// The payload's length in bytes.
        len: usize,
        /// The payload limit in bytes.
        max: usize,
    },
    /// The event name is longer than [`MAX_EVENT_NAME`] bytes.
    EventName {
        /// Its length.
        len: usize,
    },
    /// The value could not be encoded.
    Encode(postcard::Error),
    /// The answer could not be decoded as the type asked for.
    Decode(postcard::Error),
    /// A lane on the way holds garbage.
    Corrupt(CorruptLane),
    /// No leader was elected before the deadline (invoke, publish,
    /// subscribe).
    NoLeader,
    /// The leader died before answering an invoke.
    LeaderDied,
    /// [`MessengerHandle::request`](super::MessengerHandle::request) called
    /// from inside a handler, on the messenger's own thread: it would wait
    /// for the very loop it blocks. Answer later with
    /// [`Messenger::on_request_async`](super::Messenger::on_request_async)
    /// instead.
    InHandler,
    /// A call to a worker of another host (feature `nats`): that host is
    /// not connected (unknown, or its bridge silent past the host
    /// timeout), or no one answers there; or this host has no live
    /// bridge. Known at once, not at the deadline. The text says which.
    HostUnreachable(String),
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoHandler => f.write_str("no worker has a handler for this event"),
            Self::HandlerFailed(e) => write!(f, "the handler failed: {e}"),
            Self::WorkerDied => f.write_str("the worker died before answering"),
            Self::TimedOut => f.write_str("timed out"),
            Self::NoSuchWorker { slot } => write!(f, "no worker slot {slot}"),
            Self::TooLarge { len, max } => too_large(f, *len, *max),
            Self::EventName { len } => event_name(f, *len),
            Self::Encode(e) => write!(f, "cannot encode the value: {e}"),
            Self::Decode(e) => write!(f, "cannot decode the answer: {e}"),
            Self::Corrupt(c) => c.fmt(f),
            Self::NoLeader => f.write_str("no leader was elected in time"),
            Self::LeaderDied => f.write_str("the leader died before answering"),
            Self::InHandler => f.write_str(
                "a blocking request through a handle from inside a handler would deadlock the messenger's loop",
            ),
            Self::HostUnreachable(why) => write!(f, "host unreachable: {why}"),
        }
    }
}

impl std::error::Error for CallError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Encode(e) | Self::Decode(e) => Some(e),
            Self::Corrupt(c) => Some(c),
            _ => None,
        }
    }
}

impl From<EmitError> for CallError {
    fn from(e: EmitError) -> Self {
        match e {
            EmitError::NoSuchWorker { slot } => Self::NoSuchWorker { slot },
            EmitError::EventName { len } => Self::EventName { len },
            EmitError::TooLarge { len, max } => Self::TooLarge { len, max },
            EmitError::Encode(e) => Self::Encode(e),
            EmitError::WorkerDied => Self::WorkerDied,
            EmitError::TimedOut => Self::TimedOut,
            EmitError::Corrupt(c) => Self::Corrupt(c),
            EmitError::NoBridge => Self::HostUnreachable("this host has no live NATS bridge".into()),
            EmitError::HostName(h) => Self::HostUnreachable(format!("{h:?} is not a host name")),
        }
    }
}

impl From<RegisterError> for CallError {
    fn from(e: RegisterError) -> Self {
        EmitError::from(e).into()
    }
}

impl From<DispatchError> for CallError {
    fn from(e: DispatchError) -> Self {
        EmitError::from(e).into()
    }
}

/// One worker's entry in a `map` result.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MapError {
    /// It did not answer before the deadline.
    TimedOut,
    /// It died before answering.
    WorkerDied,
    /// It has no handler for the event.
    NoHandler,
    /// Its handler failed (error, panic, or undecodable payload).
    HandlerFailed(String),
    /// Its answer could not be decoded as the type asked for.
    Decode(postcard::Error),
    /// A lane on the way holds garbage: the one to it (the call never
    /// reached it), or one into this worker met while the call waited to
    /// be sent.
    Corrupt(CorruptLane),
    /// Its host (another one, feature `nats`) did not answer: its bridge
    /// is silent past the host timeout or disconnected, or this host's
    /// bridge died while the map waited for it.
    HostUnreachable,
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TimedOut => f.write_str("timed out"),
            Self::WorkerDied => f.write_str("worker died"),
            Self::NoHandler => f.write_str("no handler"),
            Self::HandlerFailed(e) => write!(f, "handler failed: {e}"),
            Self::Decode(e) => write!(f, "cannot decode the answer: {e}"),
            Self::Corrupt(c) => c.fmt(f),
            Self::HostUnreachable => f.write_str("its host is unreachable"),
        }
    }
}

impl std::error::Error for MapError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Decode(e) => Some(e),
            Self::Corrupt(c) => Some(c),
            _ => None,
        }
    }
}

impl MapError {
    /// One worker's entry, from its call's failure.
    pub(super) fn from_call(e: CallError) -> Self {
        match e {
            CallError::NoHandler => Self::NoHandler,
            CallError::HandlerFailed(e) => Self::HandlerFailed(e),
            CallError::WorkerDied | CallError::LeaderDied => Self::WorkerDied,
            CallError::Decode(e) => Self::Decode(e),
            CallError::Corrupt(c) => Self::Corrupt(c),
            CallError::TimedOut => Self::TimedOut,
            CallError::HostUnreachable(_) => Self::HostUnreachable,
            // Checked for the map as a whole before anything is sent, or
            // not a map's (the leader's, a handle's): no entry meets them,
            // and one that did would not have been answered in time.
            CallError::NoSuchWorker { .. }
            | CallError::TooLarge { .. }
            | CallError::EventName { .. }
            | CallError::Encode(_)
            | CallError::NoLeader
            | CallError::InHandler => Self::TimedOut,
        }
    }
}

fn event_name(f: &mut fmt::Formatter<'_>, len: usize) -> fmt::Result {
    write!(
        f,
        "event name of {len} bytes is over the {MAX_EVENT_NAME}-byte limit"
    )
}

fn too_large(f: &mut fmt::Formatter<'_>, len: usize, max: usize) -> fmt::Result {
    write!(f, "payload of {len} bytes is over the {max}-byte limit")
}
