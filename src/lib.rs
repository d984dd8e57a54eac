//! Brokerless shared-memory messaging for a pre-forked cluster of worker
//! processes on one Linux machine.
//!
//! One memfd segment holds a single-writer ring ("lane") for every
//! (sender, receiver) pair of worker slots, a doorbell and a futex park word
//! per slot. A message goes from one worker's [`Endpoint`] straight into the
//! receiver's lane: no process in between, no lock, and a syscall only when
//! the receiver is asleep.
//!
//! This is the data plane: segments, lanes, wakeups and raw byte messages.
//! Processes that attach must trust each other (anything that can write the
//! segment can disrupt it), but nothing another process writes can make this
//! crate panic or read outside the segment: bad data poisons one lane and is
//! reported ([`raw::RecvError::Corrupt`]).
//!
//! # Example: two processes
//!
//! ```
//! use std::time::Duration;
//! use shmcluster::raw::{Config, Segment};
//! use shmcluster::testing;
//!
//! let segment = Segment::create(&Config::new(2))?;
//! // A forked child shares the mapping and uses its own slot.
//! // SAFETY: the child only uses its endpoint and prints nothing; it takes
//! // no lock another thread of the doctest may hold.
//! let child = unsafe {
//!     testing::fork(|| {
//!         let mut me = segment.endpoint(1).expect("slot 1");
//!         let msg = me.recv().expect("a message");
//!         me.send(0, [&b"pong: "[..], &msg.payload].concat()).expect("reply");
//!         0
//!     })
//! }?;
//! let mut me = segment.endpoint(0)?;
//! me.send(1, b"ping")?;
//! let reply = me.recv_timeout(Duration::from_secs(10))?;
//! assert_eq!(reply.payload, b"pong: ping");
//! assert_eq!(child.wait_timeout(Duration::from_secs(10))?, Some(testing::ExitStatus::Code(0)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A process that did not fork from the creator attaches from a passed fd
//! with [`Segment::attach`], which validates the whole header first.
//!
//! # Guarantees
//! - Per-sender FIFO to each receiver; no loss, no duplication.
//! - Endpoint records up to `max_message` (default 16 MiB); larger sends fail
//!   with `TooLarge`. Messages over half a lane stream through it in
//!   fragments. The messenger's payloads go up to `max_message` less its
//!   264-byte header ([`Messenger::max_payload`]), to every target, the
//!   caller itself included.
//! - A full lane makes `send` wait (optionally until a deadline, giving the
//!   message back on `Timeout`) and `try_send` return `Full(msg)`; nothing
//!   is ever dropped silently.
//! - A sender killed mid-write leaves nothing visible: every message it had
//!   completed arrives exactly once, the half-written one never.

#![cfg_attr(not(loom), deny(unsafe_op_in_unsafe_fn))]
#![warn(clippy::undocumented_unsafe_blocks, missing_docs)]
// Under loom only the wake protocol is built; the rest of the crate is off.
#![cfg_attr(loom, allow(dead_code, unused_imports))]

#[cfg(not(loom))]
mod cluster;
#[cfg(not(loom))]
mod endpoint;
#[cfg(not(loom))]
mod error;
#[cfg(not(loom))]
mod lane;
#[cfg(all(test, not(loom)))]
mod liveness_tests;
#[cfg(not(loom))]
mod lock;
// `Messenger`'s docs still point at this module's, which are private now:
// allowed until they point at the crate docs.
#[cfg(not(loom))]
#[allow(rustdoc::private_intra_doc_links)]
mod messenger;
#[cfg(not(loom))]
mod segment;
mod sync;
#[cfg(not(loom))]
mod sys;
#[cfg(not(loom))]
pub mod testing;
mod wake;

#[cfg(all(feature = "http", not(loom)))]
pub use cluster::http;
#[cfg(not(loom))]
pub use cluster::{
    Cluster, ClusterBuilder, ClusterError, ClusterStats, Event, EventKind, Events, ExitReason, Incoming,
    ListenAddr, ListenError, ListenMode, ListenSpec, Listener, Outcome, Peer, Report, SlotStats, StopWatch,
    Unhealthy, Worker, WorkerError, WorkerState,
};
#[cfg(not(loom))]
pub use endpoint::WaitStrategy;
#[cfg(not(loom))]
pub use lock::{LockError, LockGuard, LockStats, Locks, NamedLock, Section, MAX_LOCK_NAME_LEN};
#[cfg(feature = "tokio")]
pub use messenger::{AsyncMessenger, AsyncWake};
#[cfg(not(loom))]
pub use messenger::{
    BytesReply, CallKind, Consumed, Ctx, EventStats, HandlerId, Leader, LeaderChange, MapError, Messenger,
    MessengerHandle, Reply, RequestError, Target, To, WorkerId, MAX_EVENT_NAME,
};
/// The cluster's size limit: a segment has at most this many worker slots,
/// and a cluster keeps one of them spare for rolling reloads.
#[cfg(not(loom))]
pub use segment::layout::MAX_WORKERS;

// The raw data plane's items, public in [`raw`], under their short names
// for the rest of the crate (`crate::Segment`). Not every one is named so
// at any time, hence the `allow`s.
#[cfg(not(loom))]
#[allow(unused_imports)]
pub(crate) use endpoint::{Endpoint, Message, Received, Reservation, Tag};
#[cfg(not(loom))]
#[allow(unused_imports)]
pub(crate) use error::{
    AttachError, CreateError, EndpointError, LaneCorruption, RecvError, SendError, TryRecvError, TrySendError,
};
#[cfg(not(loom))]
#[allow(unused_imports)]
pub(crate) use segment::layout::{
    DEFAULT_LANE_CAPACITY, DEFAULT_LOCK_SLOTS, DEFAULT_MAX_MESSAGE, MAX_LANE_CAPACITY, MAX_LOCK_SLOTS,
    MAX_MESSAGE_LIMIT, MAX_SEGMENT_SIZE, MIN_LANE_CAPACITY,
};
#[cfg(not(loom))]
#[allow(unused_imports)]
pub(crate) use segment::ABI_VERSION;
// Transitional, hidden: doc examples in the modules being split out
// (`endpoint`, `segment`) still import these from the root. Their one
// documented path is `raw`; remove these once those examples say `raw::`.
#[cfg(not(loom))]
#[doc(hidden)]
pub use error::ConfigError;
#[cfg(not(loom))]
#[doc(hidden)]
pub use segment::{Config, Layout, Segment};

#[cfg(not(loom))]
pub mod raw {
    //! The raw data plane: segments, endpoints, lanes and raw byte
    //! messages, for those who build their own protocol or attach from
    //! outside a cluster.

    pub use crate::endpoint::{Endpoint, Message, Received, Reservation, Tag};
    pub use crate::error::{
        AttachError, ConfigError, CreateError, EndpointError, LaneCorruption, RecvError, SendError,
        TryRecvError, TrySendError,
    };
    pub use crate::segment::layout::{
        DEFAULT_LANE_CAPACITY, DEFAULT_LOCK_SLOTS, DEFAULT_MAX_MESSAGE, MAX_LANE_CAPACITY, MAX_LOCK_SLOTS,
        MAX_MESSAGE_LIMIT, MAX_SEGMENT_SIZE, MIN_LANE_CAPACITY,
    };
    pub use crate::segment::{Config, Layout, Segment, ABI_VERSION};
}
