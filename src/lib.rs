//! Brokerless shared-memory messaging for a pre-forked cluster of worker
//! processes on one Linux machine.
//!
//! A master forks (or spawns) the workers and keeps them alive
//! ([`Cluster`]). Each worker talks to the others through a [`Messenger`]:
//! events, direct messages, broadcast, request/reply, a map over every
//! worker, tasks that run on exactly one worker, a leader per role; and
//! takes critical sections that span the cluster ([`Worker::synchronize`],
//! [`Locks`]). Underneath, one memfd segment holds a single-writer ring
//! ("lane") for every (sender, receiver) pair of worker slots, a doorbell
//! and a futex park word per slot: a message goes from one worker straight
//! into the receiver's lane, with no process in between, no lock, and a
//! syscall only when the receiver is asleep.
//!
//! # Example: a cluster of two workers
//!
//! ```
//! use std::error::Error;
//! use std::path::Path;
//! use std::time::{Duration, Instant};
//! use shmcluster::{Cluster, EventKind, ExitReason, Messenger, Worker};
//!
//! /// Adds 1 to the number in the file at `path`: a read, then a write,
//! /// that two processes must not interleave.
//! fn add_one(path: &Path) -> std::io::Result<()> {
//!     let n: u64 = std::fs::read_to_string(path)?.parse().unwrap_or(0);
//!     std::fs::write(path, (n + 1).to_string())
//! }
//!
//! /// Every worker runs this, each in its own forked process.
//! fn worker(worker: Worker, counter: &Path) -> Result<(), Box<dyn Error>> {
//!     // One holder at a time across the whole cluster.
//!     worker.synchronize(|_| add_one(counter))??;
//!     let first = worker.index() == 0;
//!     let mut m = Messenger::new(worker);
//!     m.on_request::<u64, u64, String, _>("square", |_, x| {
//!         x.checked_mul(x).ok_or_else(|| format!("{x}² overflows a u64"))
//!     })?;
//!     let w = m.worker();
//!     w.ready();
//!     if first {
//!         // A worker not forked yet would miss the map: wait for both.
//!         if !w.wait_all_ready(Duration::from_secs(10)) {
//!             return Err("the other worker never became ready".into());
//!         }
//!         let deadline = Instant::now() + Duration::from_secs(10);
//!         // Every live worker answers, this one included.
//!         let mut other = None;
//!         for (who, answer) in m.map::<u64, u64>("square", &7, deadline)? {
//!             assert_eq!(answer?, 49);
//!             if who.slot != m.slot() {
//!                 other = Some(who.slot);
//!             }
//!         }
//!         let other = other.ok_or("the other worker did not answer")?;
//!         let x: u64 = m.request(other, "square", &12u64, deadline)?;
//!         assert_eq!(x, 144);
//!         m.worker().request_shutdown();
//!     }
//!     // Serve until the master says stop.
//!     m.run()?;
//!     Ok(())
//! }
//!
//! let counter = std::env::temp_dir().join(format!("shmcluster-doc-{}", std::process::id()));
//! std::fs::write(&counter, "0")?;
//! let report = Cluster::builder()
//!     .workers(2)
//!     // A worker that fails ends the cluster instead of being restarted.
//!     .on_event(|cluster, event| {
//!         if matches!(event.kind, EventKind::Exit(r) if r != ExitReason::Shutdown) {
//!             cluster.shutdown();
//!         }
//!     })
//!     .run(|w| worker(w, &counter))?;
//! let total = std::fs::read_to_string(&counter)?;
//! std::fs::remove_file(&counter)?;
//! assert_eq!(report.exit_code(), 0, "{report}");
//! assert_eq!(total, "2");
//! # Ok::<(), Box<dyn Error>>(())
//! ```
//!
//! # Which layer to use
//! - **The cluster and the messenger** (the items at this crate's root):
//!   the main path. [`Cluster`] starts the workers, restarts them, reloads
//!   them one by one and hands them listening sockets; each worker's
//!   [`Messenger`] (or `AsyncMessenger`, feature `tokio`) does the messaging
//!   and [`Locks`] the critical sections.
//! - **[`raw`]**: the segment and its endpoints, raw byte messages on the
//!   lanes; for a protocol of your own, or a process that attaches to a
//!   segment from outside a cluster.
//! - **The C ABI and the Python binding** (`ffi/` in the repository:
//!   `libshmcluster` with `include/shmcluster.h`, and the `shmcluster`
//!   Python package on it): workers written in other languages, in the same
//!   cluster as Rust ones (spawn mode, [`ClusterBuilder::command`]).
//!
//! [`testing`] forks test workers under a watchdog; `http` (feature `http`)
//! drains an async HTTP server gracefully when its worker is told to stop.
//!
//! # Messaging
//! - `broadcast` and `to(All)` reach every live worker, the caller included
//!   (its own copy never crosses a lane: it waits in the messenger, in
//!   order, and runs at its next dispatch).
//! - `request`/`map` run the *first* handler for the event on the target;
//!   `emit`/`send`/`broadcast` run *every* handler for it.
//! - `consume` runs on exactly one live worker with a handler, the one with
//!   the shallowest inbox. Delivery is **at least once**: if the chosen
//!   worker dies before it has acknowledged (replied), the caller sends the
//!   task to another worker with the same delivery id
//!   ([`Ctx::delivery_id`]), so a handler that must not act twice can drop
//!   duplicates.
//! - A worker is live while the master's table says `Starting`, `Ready` or
//!   `Draining` (without a master: while a live process holds its slot).
//!   Messages to a starting worker wait in its lanes; messages to a slot
//!   whose worker died go to its successor; replies to a dead generation
//!   are discarded. A call whose target dies fails with `WorkerDied` as
//!   soon as the death is visible (the master reaps it within
//!   milliseconds), not at the deadline.
//! - A [`Messenger`] is driven by the thread that owns it: every blocking
//!   call keeps running handlers while it waits, so two workers calling
//!   each other never deadlock. Other threads send through a
//!   [`MessengerHandle`].
//!
//! # Locks
//! - The global lock ([`Locks::synchronize`]) and named locks
//!   ([`Locks::synchronize_key`]), on robust, process-shared mutexes in the
//!   segment; a name gets its own table entry, so names never collide.
//! - A holder that dies inside its section does not leave the lock held:
//!   the next holder is told ([`Section::previous_owner_died`]) and can
//!   repair what the dead one left.
//! - Every acquisition bumps the lock's fencing token
//!   ([`Section::fencing_token`]).
//! - A panic in the section releases the lock and propagates; taking a lock
//!   the thread already holds is [`LockError::WouldDeadlock`].
//!
//! # Guarantees
//! - Per-sender FIFO to each receiver (one lane per pair); no loss, no
//!   duplication.
//! - Endpoint records up to `max_message` (default 16 MiB,
//!   [`raw::DEFAULT_MAX_MESSAGE`]); larger sends fail with `TooLarge`.
//!   Messages over half a lane stream through it in fragments. The
//!   messenger's payloads go up to `max_message` less its 264-byte header
//!   ([`Messenger::max_payload`]), to every target, the caller itself
//!   included; a larger one is `TooLarge` before anything is sent.
//! - A full lane makes `send` wait (optionally until a deadline, giving the
//!   message back on `Timeout`) and `try_send` return `Full(msg)`; nothing
//!   is ever dropped silently.
//! - A sender killed mid-write leaves nothing visible: every message it had
//!   completed arrives exactly once, the half-written one never.
//! - Processes that attach must trust each other (anything that can write
//!   the segment can disrupt it), but nothing another process writes can
//!   make this crate panic or read outside the segment: bad data poisons
//!   one lane and is reported ([`raw::RecvError::Corrupt`]).

#![cfg_attr(not(loom), deny(unsafe_op_in_unsafe_fn))]
#![warn(clippy::undocumented_unsafe_blocks, missing_docs)]
// Under loom only the wake protocol is built; the rest of the crate is off.
#![cfg_attr(loom, allow(dead_code, unused_imports))]

#[cfg(all(feature = "nats", not(loom)))]
pub mod bridge;
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
#[cfg(not(loom))]
mod messenger;
#[cfg(not(loom))]
mod segment;
mod sync;
#[cfg(not(loom))]
mod sys;
#[cfg(not(loom))]
pub mod testing;
mod wake;

/// The control socket's line format (`shmcluster stat`, `reload`, `stop`,
/// `wait`), for the `shmcluster` command, which is a separate target and
/// can only use public items: one codec for both ends, not a copy of it.
/// Not part of the library's API.
#[cfg(not(loom))]
#[doc(hidden)]
pub use cluster::control::codec as control_codec;
#[cfg(all(feature = "http", not(loom)))]
pub use cluster::http;
#[cfg(not(loom))]
pub use cluster::{
    Cluster, ClusterBuilder, ClusterError, ClusterStats, Event, EventKind, Events, ExitReason, Incoming,
    ListenAddr, ListenError, ListenMode, ListenSpec, Listener, Outcome, Peer, ReloadError, Report, SlotStats,
    StopWatch, ThreadsBuilder, Unhealthy, Worker, WorkerError, WorkerState,
};
#[cfg(not(loom))]
pub use endpoint::WaitStrategy;
#[cfg(not(loom))]
pub use lock::{LockError, LockGuard, LockStats, Locks, NamedLock, Section, MAX_LOCK_NAME_LEN};
#[cfg(feature = "tokio")]
pub use messenger::{AsyncMessenger, AsyncWake};
#[cfg(not(loom))]
pub use messenger::{
    BytesReply, CallError, CallKind, CallTicket, Consumed, CorruptLane, Ctx, DispatchError, EmitError,
    EventStats, Finished, GlobalLeader, GlobalSection, HandlerId, HostChange, HostEvent, HostId, IdleWaiter,
    Leader, LeaderChange, MapError, Messenger, MessengerHandle, RegisterError, Reply, Target, To, Turn,
    WorkerId, HOST_EVENT, MAX_EVENT_NAME,
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
pub(crate) use error::ConfigError;
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
pub(crate) use segment::{Config, Layout, Segment, ABI_VERSION};
#[cfg(not(loom))]
pub mod raw {
    //! The raw data plane: segments, endpoints, lanes and raw byte
    //! messages, for those who build their own protocol or attach from
    //! outside a cluster. The [`Messenger`](crate::Messenger) and the
    //! [`Cluster`](crate::Cluster) are built on it.
    //!
    //! A [`Segment`] is one memfd holding a single-writer ring ("lane")
    //! for every (sender, receiver) pair of worker slots, a doorbell and a
    //! futex park word per slot. An [`Endpoint`] is one slot's end of it:
    //! it sends bytes with a [`Tag`] straight into the receiver's lane (or
    //! reserves room there and writes in place, [`Reservation`], or writes
    //! many and publishes them at once, [`Batch`]) and receives
    //! [`Message`]s from every lane to its slot.
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
    //! // SAFETY: the child only uses its endpoint and prints nothing; it
    //! // takes no lock another thread of the doctest may hold.
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
    //! A process that did not fork from the creator attaches from a passed
    //! fd with [`Segment::attach`], which validates the whole header first.
    //! What the lanes promise, and what a process that writes garbage into
    //! the segment can and cannot do ([`RecvError::Corrupt`]): the crate's
    //! [guarantees](crate#guarantees).

    pub use crate::endpoint::{Batch, Endpoint, Message, Received, Reservation, Tag};
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
