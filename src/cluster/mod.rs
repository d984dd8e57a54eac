//! The master (fork or spawn workers, respawn, rolling reload, graceful
//! shutdown, listeners, heartbeats, events, stats) and the worker's side of
//! it. The master sets the cluster up and keeps it alive; it never routes a
//! message.
//!
//! # Slots and instances
//! The master keeps `n` worker *instances* (numbered `0..n`, like PM2's
//! `NODE_APP_INSTANCE`) in a segment of `n + 1` *slots*. A respawned worker
//! keeps its slot (its messaging address) and gets a new generation. A
//! rolling reload starts each replacement in the spare slot, waits until it
//! is ready, and only then drains the old one, whose slot becomes the spare:
//! so across a reload an instance keeps its index but may change slot.
//!
//! # Where things are
//! Here, [`WorkerState`]; `event.rs`, what the master publishes
//! ([`Event`]); `stats.rs`, what the worker table and counters say
//! ([`ClusterStats`], [`Peer`]); `master/`, the master; `worker/`, the
//! worker's side ([`Worker`]); `threads.rs`, threads mode; `listen/`,
//! listeners; `control/`, the master's control socket; `metrics/`, its
//! metrics endpoint; `http/`, the HTTP
//! drain.

use std::fmt;
use std::io::Write;

/// `eprintln!` in one `write(2)`: the master's lines go to a stderr that
/// during a binary upgrade two masters share (and workers too, under
/// `shmcluster run`); `eprintln!` writes a line piece by piece (one
/// `write(2)` per formatted argument), so two processes' lines could
/// interleave mid-line. One write of a line shorter than `PIPE_BUF` is
/// never split, on a pipe or a file opened for appending.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::cluster::say_to(&mut ::std::io::stderr(), format_args!($($arg)*))
    };
}

/// [`say!`]'s body: `args` and a newline, formatted first, then written
/// with one `write_all` (errors ignored, as `eprintln!`'s would panic).
pub(crate) fn say_to(out: &mut impl Write, args: fmt::Arguments<'_>) {
    let mut line = args.to_string();
    line.push('\n');
    let _ = out.write_all(line.as_bytes());
}

// `pub(crate)` so that the crate root can re-export `control::codec` for
// the `shmcluster` command's client (see that module).
pub(crate) mod control;
mod event;
#[cfg(feature = "http")]
pub mod http;
pub mod listen;
mod master;
mod metrics;
mod stats;
mod threads;
mod view;
mod worker;

pub use event::{Event, EventKind, ExitReason};

pub use listen::{ListenAddr, ListenError, ListenMode, ListenSpec, Listener};
pub use master::{Cluster, ClusterBuilder, ClusterError, Outcome, ReloadError, Report, Unhealthy};
pub(crate) use stats::{bridge_index, read_peer, read_stats};
pub use stats::{ClusterStats, Peer, SlotStats};
pub(crate) use threads::unmanaged_workers;
pub use threads::ThreadsBuilder;
pub(crate) use view::ClusterView;
pub use worker::{Events, Incoming, StopWatch, Worker, WorkerError};

/// Where a worker slot is in its life, as the worker table says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WorkerState {
    /// No worker has used this slot (or it is the reload spare).
    Free,
    /// Started by the master, not yet ready.
    Starting,
    /// Declared itself ready ([`Worker::ready`]).
    Ready,
    /// Told to finish what it is doing and exit (reload or shutdown).
    Draining,
    /// Exited; the master will start a successor unless shutting down.
    Dead,
    /// Crashed too often: the master stopped restarting it.
    Failed,
}

impl WorkerState {
    pub(crate) fn to_raw(self) -> u32 {
        match self {
            Self::Free => 0,
            Self::Starting => 1,
            Self::Ready => 2,
            Self::Draining => 3,
            Self::Dead => 4,
            Self::Failed => 5,
        }
    }

    /// Decodes a table word; anything unknown (garbage) reads as `Dead`.
    pub(crate) fn from_raw(v: u32) -> Self {
        match v {
            0 => Self::Free,
            1 => Self::Starting,
            2 => Self::Ready,
            3 => Self::Draining,
            5 => Self::Failed,
            _ => Self::Dead,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::sys::process as proc;

    /// Lines [`say_to`] writes from two writers racing on one pipe (as
    /// two masters' on one stderr) arrive whole: each is one `write(2)`.
    /// (`writeln!` on the same unbuffered files interleaves them mid-line
    /// here within a few hundred lines.)
    #[test]
    fn lines_from_two_writers_on_one_pipe_are_never_split() {
        const LINES: usize = 2000;
        let (read, write) = proc::pipe_cloexec().unwrap();
        let mut reader = std::fs::File::from(read);
        let collect = std::thread::spawn(move || {
            let mut text = String::new();
            reader.read_to_string(&mut text).unwrap();
            text
        });
        let writers: Vec<_> = ["alpha", "omega"]
            .into_iter()
            .map(|tag| {
                let mut out = std::fs::File::from(write.try_clone().unwrap());
                std::thread::spawn(move || {
                    for i in 0..LINES {
                        say_to(&mut out, format_args!("{tag} {i} {} {tag}", "-".repeat(i % 64)));
                    }
                })
            })
            .collect();
        drop(write);
        for w in writers {
            w.join().unwrap();
        }
        let text = collect.join().unwrap();
        let mut seen = 0;
        for line in text.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let whole = fields.len() == 4
                && fields[0] == fields[3]
                && fields[1]
                    .parse::<usize>()
                    .is_ok_and(|i| fields[2].len() == i % 64);
            assert!(whole, "a line was split: {line:?}");
            seen += 1;
        }
        assert_eq!(seen, 2 * LINES);
    }
}
