//! `shmc_segment`: creating a segment in this process (threads mode, tests,
//! a C program that is its own little cluster without a master).

use shmcluster_rs::raw::{Config, Segment};

use crate::boundary::{self, guard, into_handle, out_arg, put};
use crate::result::{shmc_result, Failure};

/// A shared-memory segment (a sealed memfd and its mapping). Created by
/// [`shmc_segment_create`], freed by [`shmc_segment_free`].
///
/// It survives `fork()`: a forked child shares the mapping and may attach
/// its own worker to it ([`crate::shmc_worker_attach`]), which is how a
/// program without a master runs several processes on one segment.
/// Thread-safe: any thread may use it, concurrently.
pub struct shmc_segment {
    pub(crate) segment: Segment,
}

/// Creates a segment with `workers` slots (1 to 1024) and the default lane
/// capacity and message limit, and stores it in `*out`.
///
/// The caller owns `*out` and frees it with [`shmc_segment_free`]; workers
/// attached to it keep the segment mapped after that.
///
/// # Errors
/// `SHMC_RESULT_NULL_ARGUMENT`, `SHMC_RESULT_INVALID_CONFIG` (worker count),
/// `SHMC_RESULT_IO` (memfd, seals, mmap).
///
/// # Safety
/// `out` must be NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn shmc_segment_create(workers: u32, out: *mut *mut shmc_segment) -> shmc_result {
    guard(|| {
        let out = out_arg(out, "out")?;
        let segment = Segment::create(&Config::new(workers))?;
        // SAFETY: checked non-NULL; valid by our caller's contract.
        unsafe { put(out, into_handle(shmc_segment { segment })) };
        Ok(())
    })
}

/// The segment's memfd descriptor, to pass to another process (which
/// attaches with [`crate::shmc_worker_attach_fd`]). The descriptor stays
/// owned by the segment: do not close it; it is close-on-exec (clear
/// `FD_CLOEXEC` on a `dup` of it to pass it through `exec`). -1 if `segment`
/// is NULL.
///
/// # Safety
/// `segment` must be NULL or a live handle from [`shmc_segment_create`].
#[no_mangle]
pub unsafe extern "C" fn shmc_segment_fd(segment: *const shmc_segment) -> i32 {
    use std::os::fd::AsRawFd;
    boundary::guard_value(-1, || {
        // SAFETY: NULL or a live handle, by our caller's contract.
        match unsafe { segment.as_ref() } {
            Some(s) => s.segment.fd().as_raw_fd(),
            None => -1,
        }
    })
}

/// The number of worker slots, or 0 if `segment` is NULL.
///
/// # Safety
/// `segment` must be NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn shmc_segment_workers(segment: *const shmc_segment) -> u32 {
    boundary::guard_value(0, || {
        // SAFETY: NULL or a live handle, by our caller's contract.
        unsafe { segment.as_ref() }.map_or(0, |s| s.segment.layout().workers())
    })
}

/// Frees a segment handle (NULL is ignored). Workers attached to the
/// segment keep it mapped until they are freed; the memfd is closed when the
/// last of them goes. Any thread; in a forked child it frees the child's
/// copy of the handle only.
///
/// # Safety
/// `segment` must be NULL or a live handle, not used again afterwards.
#[no_mangle]
pub unsafe extern "C" fn shmc_segment_free(segment: *mut shmc_segment) {
    boundary::guard_value((), || {
        // SAFETY: forwarded from our caller.
        unsafe { boundary::free_handle(segment) }
    })
}

/// Attaches to a segment through a copy of descriptor `fd` (the caller keeps
/// and closes its own `fd`). A descriptor that is not a segment is an error
/// naming what is wrong, never a crash.
pub(crate) fn attach_dup(fd: i32) -> Result<Segment, Failure> {
    use std::os::fd::{FromRawFd, OwnedFd};
    if fd < 0 {
        return Err(Failure::new(
            shmc_result::InvalidArgument,
            format!("fd {fd} is negative"),
        ));
    }
    // SAFETY: fcntl(2) with F_DUPFD_CLOEXEC on any integer: an fd that is not
    // open is EBADF, nothing else happens.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if copy < 0 {
        let e = std::io::Error::last_os_error();
        return Err(Failure::new(shmc_result::Io, format!("fd {fd}: {e}")));
    }
    // SAFETY: `copy` is a descriptor fcntl just made; nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(copy) };
    Ok(Segment::attach(owned)?)
}
