//! [`MessengerHandle`]: other threads of the process send through the
//! messenger, and make calls that its thread drives.

use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::core::{Op, Settled};
use super::dispatch::{Done, Outbox, RemoteCall};
use super::encode::{decode, encode_call};
use super::error::{CallError, EmitError};
use super::handlers::IN_HANDLER;
use super::wire;
use crate::Tag;

/// A `Send + Sync` handle for other threads of the process to send through
/// the messenger (fire and forget); the messenger's thread sends at its next
/// poll (it is woken if parked).
#[derive(Clone, Debug)]
pub struct MessengerHandle {
    pub(super) outbox: Arc<Outbox>,
    pub(super) workers: u32,
    pub(super) max_payload: usize,
}

impl MessengerHandle {
    /// Like [`Messenger::emit`](super::Messenger::emit) to one slot.
    ///
    /// # Errors
    /// `EventName`, `Encode`, `TooLarge`, `NoSuchWorker`.
    pub fn emit<T: Serialize + ?Sized>(&self, to: u32, event: &str, value: &T) -> Result<(), EmitError> {
        if to >= self.workers {
            return Err(EmitError::NoSuchWorker { slot: to });
        }
        let bytes = encode_call(event, 0, value, self.max_payload)?;
        self.outbox.push(
            to,
            Tag {
                kind: wire::EMIT,
                correlation: 0,
            },
            bytes,
        );
        Ok(())
    }

    /// Like [`Messenger::request`](super::Messenger::request), from any
    /// thread: the messenger's thread sends it and passes the answer back
    /// (it must be dispatching: `run`, `poll`, or inside a blocking call).
    /// Blocks until the answer or the deadline.
    ///
    /// # Errors
    /// As [`Messenger::request`](super::Messenger::request); `InHandler`
    /// on the messenger's own thread inside a handler; `WorkerDied` if the
    /// messenger itself is gone.
    pub fn request<T, R>(
        &self,
        worker: u32,
        event: &str,
        value: &T,
        deadline: Instant,
    ) -> Result<R, CallError>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        if IN_HANDLER.with(Cell::get) {
            return Err(CallError::InHandler);
        }
        let bytes = encode_call(event, 0, value, self.max_payload)?;
        let (done, answer) = std::sync::mpsc::channel();
        self.outbox.push_call(RemoteCall {
            op: Op::Request { to: worker, bytes },
            deadline,
            done: Done::Thread(done),
        });
        // The messenger settles the call at its deadline; a little more
        // here covers a loop that is busy in a handler at that moment.
        let wait = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
        match answer.recv_timeout(wait) {
            Ok(Settled::Answer(r)) => decode(&r?),
            Ok(_) => Err(CallError::WorkerDied),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(CallError::TimedOut),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(CallError::WorkerDied),
        }
    }
}
