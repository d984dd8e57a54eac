//! How a cluster ended ([`Report`], [`Outcome`], [`Unhealthy`]) or why
//! it could not start ([`ClusterError`]).

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::cluster::listen::ListenError;
use crate::cluster::ExitReason;
use crate::error::{ConfigError, CreateError};

/// Why a cluster could not start. Every one of these is found before any
/// worker is forked.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClusterError {
    /// The worker count is out of range.
    Workers {
        /// What was asked for.
        requested: u32,
        /// The most a segment can hold (less the slot fork and spawn mode
        /// keep spare for reloads).
        max: u32,
    },
    /// The segment configuration is invalid.
    Config(ConfigError),
    /// The segment could not be created.
    Create(CreateError),
    /// A listener could not be parsed, bound, or taken from systemd.
    Listen(ListenError),
    /// The process has other threads: forking it would copy their locks
    /// without their owners.
    NotSingleThreaded {
        /// Threads found.
        threads: usize,
    },
    /// The worker command cannot be executed.
    Command {
        /// The program.
        program: String,
        /// Why not.
        reason: String,
    },
    /// The control socket could not be bound.
    Control {
        /// Where it was to be bound.
        path: PathBuf,
        /// Why it could not be.
        error: io::Error,
    },
    /// This process was started by a binary upgrade (its environment
    /// holds `SHMCLUSTER_UPGRADE`) and what it names cannot be taken over:
    /// a malformed value, or a descriptor that is not open.
    Upgrade {
        /// What is wrong.
        reason: String,
    },
    /// The metrics endpoint could not be bound
    /// ([`ClusterBuilder::metrics`](super::ClusterBuilder::metrics)).
    Metrics {
        /// The address as given.
        addr: String,
        /// Why it could not be.
        error: io::Error,
    },
    /// The NATS configuration given to
    /// [`ClusterBuilder::nats`](super::ClusterBuilder::nats) cannot work
    /// (feature `nats`).
    #[cfg(feature = "nats")]
    Nats(crate::bridge::NatsConfigError),
    /// A system call failed.
    Io(io::Error),
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Workers { requested, max } => {
                write!(
                    f,
                    "invalid worker count {requested}: must be 1..={max} (0 = one per CPU)"
                )
            }
            Self::Config(e) => write!(f, "invalid segment configuration: {e}"),
            Self::Create(e) => write!(f, "cannot create the segment: {e}"),
            Self::Listen(e) => write!(f, "listener: {e}"),
            Self::NotSingleThreaded { threads } => write!(
                f,
                "the master must be single-threaded to fork, but this process has {threads} threads \
                 (start the cluster before spawning threads or a runtime)"
            ),
            Self::Command { program, reason } => write!(f, "cannot execute {program:?}: {reason}"),
            Self::Control { path, error } => {
                write!(f, "cannot bind the control socket {}: {error}", path.display())
            }
            Self::Metrics { addr, error } => write!(f, "cannot serve the metrics on {addr}: {error}"),
            Self::Upgrade { reason } => write!(f, "cannot take over from the old master: {reason}"),
            #[cfg(feature = "nats")]
            Self::Nats(e) => write!(f, "NATS bridge: {e}"),
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ClusterError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Config(e) => Some(e),
            Self::Create(e) => Some(e),
            Self::Listen(e) => Some(e),
            Self::Control { error, .. } | Self::Metrics { error, .. } => Some(error),
            #[cfg(feature = "nats")]
            Self::Nats(e) => Some(e),
            Self::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for ClusterError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// How a cluster ended: what [`Report::exit_code`] turns into a master
/// binary's exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Shut down on request, and every worker the shutdown stopped was
    /// healthy: ready when it began, then ended by exiting 0 or by the
    /// shutdown's `SIGTERM`/`SIGINT` within the grace period; no slot was
    /// given up. Exit code 0.
    Clean,
    /// Shut down on request, but not cleanly: see [`Report::unhealthy`]
    /// and [`Report::failed_slots`]. Exit code 1.
    Unclean,
    /// Every instance's slot crash-looped and was given up: with nothing
    /// left to supervise, the master stopped by itself. Exit code 3.
    AllGivenUp,
}

impl Outcome {
    /// 0, 1 or 3 (2 is left to the command line: a usage or start-up error).
    pub fn exit_code(self) -> i32 {
        match self {
            Self::Clean => 0,
            Self::Unclean => 1,
            Self::AllGivenUp => 3,
        }
    }

    /// `clean`, `unclean` or `all-given-up`: one word, for logs and the
    /// control socket.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Clean => "clean",
            Self::Unclean => "unclean",
            Self::AllGivenUp => "all-given-up",
        }
    }
}

/// A worker instance that made a shutdown unclean, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unhealthy {
    /// No worker of it had been ready for longer than the ready timeout
    /// (since its first start, or since its last ready worker ended) when
    /// the shutdown began.
    NeverReady {
        /// The instance.
        index: u32,
    },
    /// It was crashing when the shutdown began: its last worker crashed
    /// (a non-zero exit, or a signal the master did not send) before it
    /// was ever ready, and no worker there was ready since (the restart,
    /// if one was running, was not ready either).
    Crashing {
        /// The instance.
        index: u32,
    },
    /// Its worker ended during the shutdown otherwise than by exiting 0 or
    /// by the shutdown's signal (or was being killed by the master: hung,
    /// or holding a lock too long).
    Ended {
        /// The instance.
        index: u32,
        /// How it ended.
        reason: ExitReason,
    },
    /// Its worker was still running at the end of the grace period and was
    /// killed.
    KilledAtDeadline {
        /// The instance.
        index: u32,
    },
    /// Not an instance: the new master of a binary upgrade this master's
    /// shutdown abandoned (told to stop with it) was still running at the
    /// end of the grace period and was killed, its workers with it.
    NewMasterKilledAtDeadline {
        /// The new master's pid.
        pid: u32,
    },
}

impl fmt::Display for Unhealthy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NeverReady { index } => write!(f, "worker {index} never became ready"),
            Self::Crashing { index } => {
                write!(f, "worker {index} crashed before it was ever ready")
            }
            Self::Ended { index, reason } => write!(f, "worker {index} {reason} during the shutdown"),
            Self::KilledAtDeadline { index } => {
                write!(
                    f,
                    "worker {index} did not exit within the grace period and was killed"
                )
            }
            Self::NewMasterKilledAtDeadline { pid } => write!(
                f,
                "the new master pid {pid} of the abandoned upgrade did not exit within the grace period \
                 and was killed"
            ),
        }
    }
}

/// How a cluster ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// Clean, unclean, or every slot given up.
    pub outcome: Outcome,
    /// `outcome == Outcome::Clean`.
    pub clean: bool,
    /// The instances that made the shutdown unclean, in the order found.
    pub unhealthy: Vec<Unhealthy>,
    /// Workers replaced after dying.
    pub restarts: u32,
    /// Slots given up after a crash loop.
    pub failed_slots: Vec<u32>,
    /// Workers killed with `SIGKILL` at a deadline (grace, drain, ready, hang).
    pub killed: u32,
    /// The master ended by a binary upgrade: the pid of the new master it
    /// handed over to (which serves on). `None` for any other end.
    pub upgraded_to: Option<u32>,
}

impl Report {
    /// What a master binary should exit with: 0 after a clean shutdown, 1
    /// after an unclean one, 3 when every slot was given up (see
    /// [`Outcome::exit_code`]).
    pub fn exit_code(&self) -> i32 {
        self.outcome.exit_code()
    }
}

/// One line for an operator: `clean shutdown (2 restarts, 0 killed)`,
/// `unclean shutdown: worker 1 never became ready (...)`, or
/// `every worker slot was given up after crash loops (...)`; after a
/// binary upgrade's hand-over it begins `upgraded: new master pid N took
/// over; ` (then how the old workers' drain went).
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(pid) = self.upgraded_to {
            write!(f, "upgraded: new master pid {pid} took over; ")?;
        }
        match self.outcome {
            Outcome::Clean => f.write_str("clean shutdown")?,
            Outcome::Unclean => f.write_str("unclean shutdown")?,
            Outcome::AllGivenUp => f.write_str("every worker slot was given up after crash loops")?,
        }
        if self.outcome == Outcome::Unclean {
            let mut why: Vec<String> = self.unhealthy.iter().map(ToString::to_string).collect();
            if !self.failed_slots.is_empty() {
                why.push(format!(
                    "slots given up after crash loops: {:?}",
                    self.failed_slots
                ));
            }
            if !why.is_empty() {
                write!(f, ": {}", why.join(", "))?;
            }
        }
        write!(f, " ({} restarts, {} killed)", self.restarts, self.killed)
    }
}
