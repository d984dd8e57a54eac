//! `shmc_result`: every outcome a C caller can see, with fixed numbers, and
//! the conversions from the library's error enums.

use shmcluster_rs::raw::{AttachError, CreateError, EndpointError};
use shmcluster_rs::{CallError, DispatchError, EmitError, LockError, MapError, RegisterError, WorkerError};

use crate::boundary::{self, write_c_string};

/// The outcome of a call.
///
/// **The numbers are part of the ABI: they never change and a number is
/// never reused**, even if its code is retired. New codes get new numbers.
/// Codes 1..=99 are argument and handle errors, 100..=199 attaching and
/// creating, 200..=299 messaging, 300..=399 locks and leaders.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum shmc_result {
    /// Success.
    Ok = 0,
    /// A required pointer (handle, string, out-pointer, or data with a
    /// non-zero length) was NULL.
    NullArgument = 1,
    /// An argument is invalid: a string that is not UTF-8, an index out of
    /// range, a timeout that cannot be represented.
    InvalidArgument = 2,
    /// The library panicked (a bug); the call had no effect that can be
    /// relied on. See [`crate::shmc_last_error_message`].
    Panic = 3,
    /// The handle was created before a `fork()` and used in the child.
    Forked = 4,
    /// The handle is in use by another call (another thread, or a handler
    /// calling back into the worker that runs it).
    Busy = 5,
    /// A lock handle was released on a thread other than the one that took it.
    WrongThread = 6,
    /// The output buffer is too small (the required size is reported).
    BufferTooSmall = 7,
    /// The operation needs a master (a cluster worker), and this worker has none.
    NoMaster = 8,
    /// The header and the library disagree on `SHMC_ABI_VERSION`.
    AbiVersionMismatch = 9,
    /// The thing asked for has already been taken (a listener, the
    /// environment's descriptors).
    AlreadyTaken = 10,
    /// The worker a [`crate::shmc_handle`] belongs to has been freed.
    WorkerClosed = 11,
    /// The worker was told to stop (drain for a reload, shutdown,
    /// `SIGTERM`) while waiting: finish what it has and exit. Not a
    /// failure of the call's arguments.
    Stopping = 12,

    /// A `SHMCLUSTER_*` environment variable is missing or malformed: not
    /// started by a shmcluster master.
    Environment = 100,
    /// The descriptor is not a shmcluster segment (too small, wrong magic).
    NotASegment = 101,
    /// The segment was made by an incompatible library version (or libc).
    SegmentVersion = 102,
    /// The segment is not usable: not initialised, not sealed, or a header
    /// field is inconsistent.
    SegmentInvalid = 103,
    /// A system call failed (see the last error message).
    Io = 104,
    /// Another live process holds the slot.
    SlotBusy = 105,
    /// The master has replaced this worker (its generation is stale).
    StaleGeneration = 106,
    /// The configuration cannot be laid out (worker count, sizes).
    InvalidConfig = 107,

    /// No such worker slot.
    NoSuchWorker = 200,
    /// The target (or no worker) has a handler for the event.
    NoHandler = 201,
    /// The handler failed; its text is the last error message (or the map
    /// entry's data).
    HandlerFailed = 202,
    /// The target died before answering.
    WorkerDied = 203,
    /// The deadline passed.
    TimedOut = 204,
    /// The message is larger than the segment's `max_message`.
    TooLarge = 205,
    /// The event name is longer than 255 bytes.
    EventName = 206,
    /// A lane holds garbage (that lane is poisoned; others keep working).
    Corrupt = 207,
    /// A reply could not be decoded.
    Decode = 208,
    /// A blocking request from inside a handler of the same worker.
    InHandler = 209,
    /// A worker of another host cannot be reached: that host is not
    /// connected through NATS, no worker serves the slot there, or this
    /// host has no live bridge (no `--nats`).
    HostUnreachable = 210,

    /// The lock name is longer than 64 bytes.
    LockNameTooLong = 300,
    /// The lock table is full.
    LockTableFull = 301,
    /// This thread already holds the lock.
    LockWouldDeadlock = 302,
    /// The lock was not acquired in time.
    LockTimeout = 303,
    /// The lock can never be acquired again.
    LockUnrecoverable = 304,
    /// glibc is older than 2.25.
    Glibc = 305,
    /// No leader was elected before the deadline.
    NoLeader = 306,
    /// The leader died before answering.
    LeaderDied = 307,

    /// An error this version of the ABI has no code for (see the message).
    Unknown = 999,
}

/// The text of every code, and from the same list [`shmc_result::ALL`]:
/// the `match` in `text` is exhaustive, so a new variant without a text
/// does not compile, and a variant listed twice is an unreachable pattern
/// (an error under `-D warnings`). The enum itself stays written out above,
/// not made by this macro: cbindgen reads the source, not macro expansions,
/// and the header needs it. The C names, the numbers and the texts
/// reach C and Python through [`shmc_result_codes`], [`shmc_result_name`]
/// and [`shmc_error_string`] (`ffi/python/shmcluster/_codes.py` is generated
/// from them and checked by `tests/python_codes.rs`).
macro_rules! result_texts {
    ($($code:ident => $text:expr,)*) => {
        impl shmc_result {
            /// Every code, in declaration (and number) order.
            pub(crate) const ALL: &'static [shmc_result] = &[$(shmc_result::$code),*];

            fn text(self) -> &'static str {
                match self {
                    $(shmc_result::$code => $text,)*
                }
            }

            /// The variant's Rust name (`NoHandler`).
            fn rust_name(self) -> &'static str {
                match self {
                    $(shmc_result::$code => stringify!($code),)*
                }
            }
        }
    };
}

result_texts! {
    Ok => "success",
    NullArgument => "a required pointer argument was NULL",
    InvalidArgument => "invalid argument",
    Panic => "the library panicked (a bug)",
    Forked => "handle used in a forked child (worker, lock and reply handles do not survive fork)",
    Busy => "the handle is in use by another call (another thread, or a handler of this worker)",
    WrongThread => "a lock must be released on the thread that took it",
    BufferTooSmall => "buffer too small",
    NoMaster => "this worker has no master (not a cluster worker)",
    AbiVersionMismatch => "shmcluster.h and the loaded library have different ABI versions",
    AlreadyTaken => "already taken",
    WorkerClosed => "the worker behind this handle has been freed",
    Stopping => "the worker was told to stop",
    Environment => "SHMCLUSTER_* environment missing or malformed (not started by a shmcluster master)",
    NotASegment => "not a shmcluster segment",
    SegmentVersion => "the segment was made by an incompatible version",
    SegmentInvalid => "the segment is not usable (uninitialised, unsealed or inconsistent)",
    Io => "a system call failed",
    SlotBusy => "another live process holds the worker slot",
    StaleGeneration => "the master has replaced this worker (stale generation)",
    InvalidConfig => "invalid segment configuration",
    NoSuchWorker => "no such worker slot",
    NoHandler => "no handler for the event",
    HandlerFailed => "the handler failed",
    WorkerDied => "the worker died before answering",
    TimedOut => "timed out",
    TooLarge => "message too large",
    EventName => "event name longer than 255 bytes",
    Corrupt => "corrupt lane",
    Decode => "cannot decode the reply",
    InHandler => "a blocking request from inside a handler would deadlock",
    HostUnreachable => "the other host is unreachable",
    LockNameTooLong => "lock name longer than 64 bytes",
    LockTableFull => "the lock table is full",
    LockWouldDeadlock => "this thread already holds the lock",
    LockTimeout => "the lock was not acquired in time",
    LockUnrecoverable => "the lock can never be acquired again",
    Glibc => "glibc is too old (robust mutexes need 2.25)",
    NoLeader => "no leader was elected in time",
    LeaderDied => "the leader died before answering",
    Unknown => "unknown error",
}

impl shmc_result {
    /// The code for a raw number, if it is one.
    pub(crate) fn from_raw(code: u32) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| *c as u32 == code)
    }

    /// The C enumerator's name, as cbindgen writes it
    /// (`SHMC_RESULT_NO_HANDLER`: the prefix, then the variant in
    /// SCREAMING_SNAKE_CASE).
    fn c_name(self) -> String {
        let mut out = String::from("SHMC_RESULT_");
        for (i, ch) in self.rust_name().chars().enumerate() {
            if ch.is_ascii_uppercase() && i > 0 {
                out.push('_');
            }
            out.push(ch.to_ascii_uppercase());
        }
        out
    }
}

/// Writes every result code, in ascending order, into `codes` (room for
/// `capacity`) and their number into `*count`. With too little room it
/// writes what fits and returns `SHMC_RESULT_BUFFER_TOO_SMALL`; `codes` may
/// be NULL with `capacity` 0 to ask for the count. With
/// [`shmc_result_name`] and [`shmc_error_string`] this lists the codes a
/// binding needs (the Python binding's `_codes.py` is made from it).
///
/// Thread-safe, survives fork.
///
/// # Safety
/// `codes` valid for `capacity` writes; `count` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn shmc_result_codes(
    codes: *mut u32,
    capacity: usize,
    count: *mut usize,
) -> shmc_result {
    boundary::guard_quiet(|| {
        let count = boundary::out_arg(count, "count")?;
        let all = shmc_result::ALL.iter().map(|code| *code as u32);
        // SAFETY: `count` checked; the rest forwarded from our caller.
        unsafe { boundary::write_list(all, codes, capacity, "codes", count) }
    })
}

/// Writes the C name of `code` (`"SHMC_RESULT_NO_HANDLER"`) into `buf` as
/// [`shmc_error_string`] writes text. A number that is no code is
/// `SHMC_RESULT_INVALID_ARGUMENT` (nothing written).
///
/// Thread-safe, survives fork.
///
/// # Safety
/// `buf` must be valid for writes of `len` bytes; `out_len` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn shmc_result_name(
    code: u32,
    buf: *mut u8,
    len: usize,
    out_len: *mut usize,
) -> shmc_result {
    boundary::guard_quiet(|| {
        let name = shmc_result::from_raw(code)
            .ok_or_else(|| Failure::new(shmc_result::InvalidArgument, format!("{code} is no shmc_result")))?
            .c_name();
        // SAFETY: forwarded from our caller's contract.
        unsafe { write_c_string(&name, buf, len, out_len) }
    })
}

/// Writes the text for `code` into `buf` (at most `len` bytes including the
/// terminating NUL; truncated to fit, always terminated when `len > 0`) and
/// stores the text's full length (without the NUL) in `*out_len` if
/// `out_len` is not NULL. An unknown number gets a text that says so.
/// Returns `SHMC_RESULT_OK`, `SHMC_RESULT_BUFFER_TOO_SMALL` if it was
/// truncated, or `SHMC_RESULT_NULL_ARGUMENT` if `buf` is NULL with `len > 0`.
///
/// The caller owns `buf`. Thread-safe, survives fork.
///
/// # Safety
/// `buf` must be valid for writes of `len` bytes; `out_len` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn shmc_error_string(
    code: u32,
    buf: *mut u8,
    len: usize,
    out_len: *mut usize,
) -> shmc_result {
    boundary::guard_quiet(|| {
        let text = match shmc_result::from_raw(code) {
            Some(c) => c.text().to_owned(),
            None => format!("unknown shmc_result {code}"),
        };
        // SAFETY: forwarded from our caller's contract.
        unsafe { write_c_string(&text, buf, len, out_len) }
    })
}

/// Writes the detail of the last failure of a `shmc_*` call on this thread
/// (the library's full error text: which header field was wrong, the
/// handler's failure text, ...) as [`shmc_error_string`] does. Empty if no
/// call on this thread has failed. Calls that succeed leave it unchanged.
///
/// Thread-local; survives fork (the child sees the parent's text).
///
/// # Safety
/// `buf` must be valid for writes of `len` bytes; `out_len` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn shmc_last_error_message(
    buf: *mut u8,
    len: usize,
    out_len: *mut usize,
) -> shmc_result {
    boundary::guard_quiet(|| {
        let text = boundary::last_error();
        // SAFETY: forwarded from our caller's contract.
        unsafe { write_c_string(&text, buf, len, out_len) }
    })
}

/// An error with its code and the text for `shmc_last_error_message`.
pub(crate) struct Failure {
    pub code: shmc_result,
    pub text: String,
}

impl Failure {
    pub fn new(code: shmc_result, text: impl Into<String>) -> Self {
        Self {
            code,
            text: text.into(),
        }
    }
}

impl From<shmc_result> for Failure {
    fn from(code: shmc_result) -> Self {
        Self::new(code, code.text())
    }
}

impl From<CallError> for Failure {
    fn from(e: CallError) -> Self {
        let code = match &e {
            CallError::NoHandler => shmc_result::NoHandler,
            CallError::HandlerFailed(text) => return Self::new(shmc_result::HandlerFailed, text.clone()),
            CallError::WorkerDied => shmc_result::WorkerDied,
            CallError::TimedOut => shmc_result::TimedOut,
            CallError::NoSuchWorker { .. } => shmc_result::NoSuchWorker,
            CallError::TooLarge { .. } => shmc_result::TooLarge,
            CallError::EventName { .. } => shmc_result::EventName,
            CallError::Encode(_) => shmc_result::InvalidArgument,
            CallError::Decode(_) => shmc_result::Decode,
            CallError::Corrupt(_) => shmc_result::Corrupt,
            CallError::NoLeader => shmc_result::NoLeader,
            CallError::LeaderDied => shmc_result::LeaderDied,
            CallError::InHandler => shmc_result::InHandler,
            CallError::HostUnreachable(_) => shmc_result::HostUnreachable,
            _ => shmc_result::Unknown,
        };
        Self::new(code, e.to_string())
    }
}

/// An emit, registration or dispatch failure: the code of the call failure
/// it also is (the messenger's own `From`s), the text its own.
fn as_call_failure<E: Into<CallError> + std::fmt::Display>(e: E) -> Failure {
    let text = e.to_string();
    Failure::new(Failure::from(e.into()).code, text)
}

impl From<EmitError> for Failure {
    fn from(e: EmitError) -> Self {
        as_call_failure(e)
    }
}

impl From<RegisterError> for Failure {
    fn from(e: RegisterError) -> Self {
        as_call_failure(e)
    }
}

impl From<DispatchError> for Failure {
    fn from(e: DispatchError) -> Self {
        as_call_failure(e)
    }
}

/// A map entry's status.
pub(crate) fn map_error_code(e: &MapError) -> shmc_result {
    match e {
        MapError::TimedOut => shmc_result::TimedOut,
        MapError::WorkerDied => shmc_result::WorkerDied,
        MapError::NoHandler => shmc_result::NoHandler,
        MapError::HandlerFailed(_) => shmc_result::HandlerFailed,
        MapError::Decode(_) => shmc_result::Decode,
        MapError::Corrupt(_) => shmc_result::Corrupt,
        MapError::HostUnreachable => shmc_result::HostUnreachable,
        _ => shmc_result::Unknown,
    }
}

impl From<LockError> for Failure {
    fn from(e: LockError) -> Self {
        let code = match &e {
            LockError::NameTooLong { .. } => shmc_result::LockNameTooLong,
            LockError::TableFull { .. } => shmc_result::LockTableFull,
            LockError::WouldDeadlock => shmc_result::LockWouldDeadlock,
            LockError::Timeout => shmc_result::LockTimeout,
            LockError::Unrecoverable { .. } => shmc_result::LockUnrecoverable,
            LockError::Glibc { .. } => shmc_result::Glibc,
            LockError::Io(_) => shmc_result::Io,
            _ => shmc_result::Unknown,
        };
        Self::new(code, e.to_string())
    }
}

impl From<AttachError> for Failure {
    fn from(e: AttachError) -> Self {
        let code = match &e {
            AttachError::Io(_) => shmc_result::Io,
            AttachError::TooSmall { .. } | AttachError::BadMagic { .. } => shmc_result::NotASegment,
            AttachError::AbiVersion { .. } | AttachError::MutexSize { .. } => shmc_result::SegmentVersion,
            _ => shmc_result::SegmentInvalid,
        };
        Self::new(code, e.to_string())
    }
}

impl From<EndpointError> for Failure {
    fn from(e: EndpointError) -> Self {
        let code = match &e {
            EndpointError::NoSuchWorker { .. } => shmc_result::NoSuchWorker,
            EndpointError::SlotBusy { .. } => shmc_result::SlotBusy,
            EndpointError::StaleGeneration { .. } => shmc_result::StaleGeneration,
            EndpointError::Claim { .. } => shmc_result::Io,
        };
        Self::new(code, e.to_string())
    }
}

impl From<CreateError> for Failure {
    fn from(e: CreateError) -> Self {
        let code = match &e {
            CreateError::Config(_) => shmc_result::InvalidConfig,
            CreateError::Io(_) => shmc_result::Io,
        };
        Self::new(code, e.to_string())
    }
}

impl From<WorkerError> for Failure {
    fn from(e: WorkerError) -> Self {
        let text = e.to_string();
        let code = match e {
            WorkerError::Env { .. } => shmc_result::Environment,
            WorkerError::Attach(a) => Failure::from(a).code,
            WorkerError::Endpoint(p) => Failure::from(p).code,
            WorkerError::Listen(_) => shmc_result::Environment,
            WorkerError::Io(_) => shmc_result::Io,
            _ => shmc_result::Unknown,
        };
        Self::new(code, text)
    }
}
