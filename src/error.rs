//! Error types, one small enum per operation. Send errors give the message
//! back (`Full(msg)`, `Timeout(msg)`), so nothing is ever dropped silently.

use std::fmt;
use std::io;

/// A [`Config`](crate::Config) that cannot be laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// `workers` must be between 1 and [`MAX_WORKERS`](crate::MAX_WORKERS).
    Workers {
        /// The value asked for.
        value: u64,
    },
    /// `lane_capacity` must be a power of two between
    /// [`MIN_LANE_CAPACITY`](crate::MIN_LANE_CAPACITY) and
    /// [`MAX_LANE_CAPACITY`](crate::MAX_LANE_CAPACITY).
    LaneCapacity {
        /// The value asked for.
        value: u64,
    },
    /// `max_message` must be between 1 and
    /// [`MAX_MESSAGE_LIMIT`](crate::MAX_MESSAGE_LIMIT).
    MaxMessage {
        /// The value asked for.
        value: u64,
    },
    /// `lock_slots` must be at most [`MAX_LOCK_SLOTS`](crate::MAX_LOCK_SLOTS).
    LockSlots {
        /// The value asked for.
        value: u64,
    },
    /// The segment would be larger than the address space allows.
    TooLarge,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Workers { value } => write!(
                f,
                "workers = {value}: must be between 1 and {}",
                crate::MAX_WORKERS
            ),
            Self::LaneCapacity { value } => write!(
                f,
                "lane_capacity = {value}: must be a power of two between {} and {}",
                crate::MIN_LANE_CAPACITY,
                crate::MAX_LANE_CAPACITY
            ),
            Self::MaxMessage { value } => write!(
                f,
                "max_message = {value}: must be between 1 and {}",
                crate::MAX_MESSAGE_LIMIT
            ),
            Self::LockSlots { value } => write!(
                f,
                "lock_slots = {value}: must be at most {}",
                crate::MAX_LOCK_SLOTS
            ),
            Self::TooLarge => f.write_str("the segment would not fit in the address space"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Creating a segment failed.
#[derive(Debug)]
pub enum CreateError {
    /// The configuration cannot be laid out.
    Config(ConfigError),
    /// `memfd_create`, `ftruncate`, sealing or `mmap` failed.
    Io(io::Error),
}

impl fmt::Display for CreateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(e) => write!(f, "invalid segment configuration: {e}"),
            Self::Io(e) => write!(f, "cannot create the shared-memory segment: {e}"),
        }
    }
}

impl std::error::Error for CreateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Config(e) => Some(e),
            Self::Io(e) => Some(e),
        }
    }
}

impl From<ConfigError> for CreateError {
    fn from(e: ConfigError) -> Self {
        Self::Config(e)
    }
}

impl From<io::Error> for CreateError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// Attaching to an existing segment failed. Each variant names what was
/// wrong, so a version skew or a wrong fd is told apart from corruption.
#[derive(Debug)]
pub enum AttachError {
    /// `fstat`, `fcntl` or `mmap` failed (for example: not an open fd).
    Io(io::Error),
    /// The file is smaller than a segment header.
    TooSmall {
        /// The file's length.
        len: u64,
        /// The smallest possible segment.
        min: u64,
    },
    /// The first eight bytes are not the shmcluster magic: not a segment.
    BadMagic {
        /// What was found.
        found: u64,
    },
    /// The segment was made by an incompatible version of this library.
    AbiVersion {
        /// The segment's ABI version.
        found: u32,
        /// This library's.
        expected: u32,
    },
    /// The creator has not finished initialising the segment (or died
    /// before it did).
    NotInitialized {
        /// The init word found.
        found: u32,
    },
    /// `size_of::<pthread_mutex_t>()` differs: built against another libc.
    MutexSize {
        /// The segment's.
        found: u32,
        /// This process's.
        expected: u32,
    },
    /// A configuration field in the header is out of range.
    InvalidField {
        /// The field's name.
        field: &'static str,
        /// Why it is invalid.
        error: ConfigError,
    },
    /// A derived header field (an offset, the size or the layout hash)
    /// disagrees with what the configuration fields imply.
    FieldMismatch {
        /// The field's name.
        field: &'static str,
        /// The value in the header.
        found: u64,
        /// The value the layout computes.
        expected: u64,
    },
    /// The file is shorter than the layout needs.
    Truncated {
        /// The file's length.
        len: u64,
        /// The layout's size.
        expected: u64,
    },
    /// The file is not sealed against shrinking and growing, so a peer could
    /// truncate it under the others (every access past the end is SIGBUS).
    NotSealed,
}

impl fmt::Display for AttachError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "cannot attach to the segment: {e}"),
            Self::TooSmall { len, min } => {
                write!(f, "not a segment: {len} bytes, a header needs {min}")
            }
            Self::BadMagic { found } => {
                write!(f, "not a shmcluster segment: magic {found:#018x}")
            }
            Self::AbiVersion { found, expected } => write!(
                f,
                "segment ABI version {found}, this library speaks version {expected}"
            ),
            Self::NotInitialized { found } => {
                write!(f, "segment not initialised (init word {found:#x})")
            }
            Self::MutexSize { found, expected } => write!(
                f,
                "segment made with a {found}-byte pthread_mutex_t, this process has {expected}"
            ),
            Self::InvalidField { field, error } => {
                write!(f, "segment header field `{field}` is invalid: {error}")
            }
            Self::FieldMismatch {
                field,
                found,
                expected,
            } => write!(
                f,
                "segment header field `{field}` is {found}, the layout implies {expected}"
            ),
            Self::Truncated { len, expected } => {
                write!(f, "segment file is {len} bytes, its layout needs {expected}")
            }
            Self::NotSealed => f.write_str("segment file is not sealed against resizing"),
        }
    }
}

impl std::error::Error for AttachError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(e) => Some(e),
            Self::InvalidField { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl From<io::Error> for AttachError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// Opening an [`Endpoint`](crate::Endpoint) for a slot failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointError {
    /// There is no such slot in this segment.
    NoSuchWorker {
        /// The slot asked for.
        slot: u32,
        /// How many slots the segment has.
        workers: u32,
    },
    /// A live process already holds an endpoint for this slot (each lane has
    /// exactly one writer, so a slot can have only one endpoint at a time).
    SlotBusy {
        /// The slot asked for.
        slot: u32,
        /// The process holding it.
        pid: u32,
    },
    /// The slot's generation is not the one this worker was started with:
    /// the master has since replaced it (this process is stale).
    StaleGeneration {
        /// The slot asked for.
        slot: u32,
        /// The generation this process was given.
        expected: u32,
        /// The slot's generation now.
        found: u32,
    },
    /// The slot's claim (a lock the kernel releases when its holder dies)
    /// could not be taken: `/proc/self/fd` cannot reopen the segment, or
    /// `fcntl` failed.
    Claim {
        /// The slot asked for.
        slot: u32,
        /// What the system said.
        reason: String,
    },
}

impl fmt::Display for EndpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSuchWorker { slot, workers } => {
                write!(f, "no worker {slot}: the segment has slots 0..{workers}")
            }
            Self::SlotBusy { slot, pid } => {
                write!(f, "slot {slot} is already held by process {pid}")
            }
            Self::StaleGeneration {
                slot,
                expected,
                found,
            } => write!(
                f,
                "slot {slot} is at generation {found}, not {expected}: this worker was replaced"
            ),
            Self::Claim { slot, reason } => write!(f, "cannot claim slot {slot}: {reason}"),
        }
    }
}

impl std::error::Error for EndpointError {}

/// Why a lane was found holding garbage. The lane is poisoned: its receiver
/// stops reading it and keeps serving the other lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaneCorruption {
    /// The published indices are impossible (tail behind head, more than a
    /// lane's worth of data, or not 8-byte aligned).
    Indices {
        /// The head read.
        head: u64,
        /// The tail read.
        tail: u64,
    },
    /// A record's length does not fit the published data or the lane.
    RecordLength {
        /// The length field.
        len: u32,
    },
    /// A record's flags are not a valid combination.
    Flags {
        /// The flags field.
        flags: u16,
    },
    /// A record claims another sender than the lane's.
    Sender {
        /// The sender field.
        found: u32,
    },
    /// A fragmented message's pieces do not add up (out of order, longer
    /// than announced, or over `max_message`).
    Fragment {
        /// The total length announced (0 if none).
        total: u64,
    },
}

impl fmt::Display for LaneCorruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Indices { head, tail } => write!(f, "impossible indices head={head} tail={tail}"),
            Self::RecordLength { len } => write!(f, "record length {len} does not fit"),
            Self::Flags { flags } => write!(f, "invalid record flags {flags:#06x}"),
            Self::Sender { found } => write!(f, "record claims sender {found}"),
            Self::Fragment { total } => {
                write!(f, "fragments inconsistent with total length {total}")
            }
        }
    }
}

impl std::error::Error for LaneCorruption {}

/// A blocking send failed. The message is given back where it was not sent.
///
/// Its `Debug` does not print the message (`Timeout(..)`), so it is an
/// [`Error`](std::error::Error) whatever `M` is, and a log of it does not
/// dump a payload.
#[derive(PartialEq, Eq)]
pub enum SendError<M> {
    /// There is no such slot in this segment.
    NoSuchWorker {
        /// The slot asked for.
        slot: u32,
        /// How many slots the segment has.
        workers: u32,
    },
    /// The message is longer than the segment's `max_message` (or, for a
    /// reservation, longer than one record in a lane).
    TooLarge {
        /// The message's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The deadline passed while the lane was full. Nothing of the message
    /// was delivered.
    Timeout(M),
    /// The lane from this endpoint to itself is full, and only this thread
    /// can empty it: blocking would never end. Nothing was delivered.
    SelfFull(M),
    /// The lane's head index is impossible: the receiver's side of this lane
    /// was overwritten. Nothing was delivered.
    Corrupt {
        /// The receiving slot.
        slot: u32,
        /// What was wrong.
        error: LaneCorruption,
        /// The message.
        msg: M,
    },
}

/// A non-blocking send failed. The message is given back.
///
/// Its `Debug` does not print the message (`Full(..)`), as
/// [`SendError`]'s.
#[derive(PartialEq, Eq)]
pub enum TrySendError<M> {
    /// There is no such slot in this segment.
    NoSuchWorker {
        /// The slot asked for.
        slot: u32,
        /// How many slots the segment has.
        workers: u32,
    },
    /// The message is longer than the segment's `max_message` (or, for a
    /// reservation, longer than one record in a lane).
    TooLarge {
        /// The message's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The lane has no room for the whole message now. Nothing was
    /// delivered. (A message larger than the free space of an empty lane
    /// can only go through a blocking send, which streams it in fragments.)
    Full(M),
    /// The lane's head index is impossible. Nothing was delivered.
    Corrupt {
        /// The receiving slot.
        slot: u32,
        /// What was wrong.
        error: LaneCorruption,
        /// The message.
        msg: M,
    },
}

impl<M> SendError<M> {
    /// The message, where the error carries it.
    pub fn into_message(self) -> Option<M> {
        match self {
            Self::Timeout(m) | Self::SelfFull(m) | Self::Corrupt { msg: m, .. } => Some(m),
            Self::NoSuchWorker { .. } | Self::TooLarge { .. } => None,
        }
    }
}

impl<M> TrySendError<M> {
    /// The message, where the error carries it.
    pub fn into_message(self) -> Option<M> {
        match self {
            Self::Full(m) | Self::Corrupt { msg: m, .. } => Some(m),
            Self::NoSuchWorker { .. } | Self::TooLarge { .. } => None,
        }
    }
}

impl<M> fmt::Display for SendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSuchWorker { slot, workers } => {
                write!(f, "no worker {slot}: the segment has slots 0..{workers}")
            }
            Self::TooLarge { len, max } => {
                write!(f, "message of {len} bytes is over the limit of {max}")
            }
            Self::Timeout(_) => f.write_str("timed out waiting for room in a full lane"),
            Self::SelfFull(_) => f.write_str("the lane to this worker itself is full"),
            Self::Corrupt { slot, error, .. } => {
                write!(f, "lane to worker {slot} is corrupt: {error}")
            }
        }
    }
}

impl<M> fmt::Display for TrySendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSuchWorker { slot, workers } => {
                write!(f, "no worker {slot}: the segment has slots 0..{workers}")
            }
            Self::TooLarge { len, max } => {
                write!(f, "message of {len} bytes is over the limit of {max}")
            }
            Self::Full(_) => f.write_str("the lane is full"),
            Self::Corrupt { slot, error, .. } => {
                write!(f, "lane to worker {slot} is corrupt: {error}")
            }
        }
    }
}

impl<M> fmt::Debug for SendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSuchWorker { slot, workers } => debug_no_such_worker(f, *slot, *workers),
            Self::TooLarge { len, max } => debug_too_large(f, *len, *max),
            Self::Timeout(_) => f.write_str("Timeout(..)"),
            Self::SelfFull(_) => f.write_str("SelfFull(..)"),
            Self::Corrupt { slot, error, .. } => debug_corrupt(f, *slot, error),
        }
    }
}

impl<M> fmt::Debug for TrySendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSuchWorker { slot, workers } => debug_no_such_worker(f, *slot, *workers),
            Self::TooLarge { len, max } => debug_too_large(f, *len, *max),
            Self::Full(_) => f.write_str("Full(..)"),
            Self::Corrupt { slot, error, .. } => debug_corrupt(f, *slot, error),
        }
    }
}

// The variants both send errors share, written once.
fn debug_no_such_worker(f: &mut fmt::Formatter<'_>, slot: u32, workers: u32) -> fmt::Result {
    f.debug_struct("NoSuchWorker")
        .field("slot", &slot)
        .field("workers", &workers)
        .finish()
}

fn debug_too_large(f: &mut fmt::Formatter<'_>, len: usize, max: usize) -> fmt::Result {
    f.debug_struct("TooLarge")
        .field("len", &len)
        .field("max", &max)
        .finish()
}

/// The message is left out (`..`).
fn debug_corrupt(f: &mut fmt::Formatter<'_>, slot: u32, error: &LaneCorruption) -> fmt::Result {
    f.debug_struct("Corrupt")
        .field("slot", &slot)
        .field("error", error)
        .finish_non_exhaustive()
}

impl<M> std::error::Error for SendError<M> {}
impl<M> std::error::Error for TrySendError<M> {}

/// A receive failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecvError {
    /// Nothing arrived before the deadline.
    Timeout,
    /// The lane from `sender` holds garbage. It is poisoned and skipped from
    /// now on; the other lanes keep being served, so call receive again.
    Corrupt {
        /// The sending slot whose lane is corrupt.
        sender: u32,
        /// What was wrong.
        error: LaneCorruption,
    },
}

/// A non-blocking receive failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TryRecvError {
    /// No message is waiting.
    Empty,
    /// The lane from `sender` holds garbage; see [`RecvError::Corrupt`].
    Corrupt {
        /// The sending slot whose lane is corrupt.
        sender: u32,
        /// What was wrong.
        error: LaneCorruption,
    },
}

impl fmt::Display for RecvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout => f.write_str("timed out waiting for a message"),
            Self::Corrupt { sender, error } => {
                write!(f, "lane from worker {sender} is corrupt: {error}")
            }
        }
    }
}

impl fmt::Display for TryRecvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("no message waiting"),
            Self::Corrupt { sender, error } => {
                write!(f, "lane from worker {sender} is corrupt: {error}")
            }
        }
    }
}

impl std::error::Error for RecvError {}
impl std::error::Error for TryRecvError {}

#[cfg(test)]
mod debug_tests {
    use super::*;

    /// A message type with no `Debug` at all.
    struct Opaque;

    #[test]
    fn errors_that_give_the_message_back_do_not_print_it() {
        let e = TrySendError::Full(vec![0xAB_u8; 1 << 20]);
        assert_eq!(format!("{e:?}"), "Full(..)");
        let e: SendError<Vec<u8>> = SendError::Corrupt {
            slot: 3,
            error: LaneCorruption::RecordLength { len: 7 },
            msg: b"secret".to_vec(),
        };
        let text = format!("{e:?}");
        assert!(
            text.starts_with("Corrupt { slot: 3, error: RecordLength { len: 7 }"),
            "{text}"
        );
        assert!(!text.contains("115"), "the payload was printed: {text}");
        // An `Error` whatever the message type.
        let boxed: Box<dyn std::error::Error> = Box::new(SendError::Timeout(Opaque));
        assert_eq!(format!("{boxed:?}"), "Timeout(..)");
    }
}
