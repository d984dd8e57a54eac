//! A slot's pollable wakeup for async receivers: an `eventfd(2)` counter.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::cvt;

/// `eventfd(2)` with `EFD_CLOEXEC | EFD_NONBLOCK`, counter 0: a slot's
/// pollable wakeup for an async receiver.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; a non-negative result is a new
    // descriptor that nothing else owns.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: just created above, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `write(2)` of 1 to an eventfd: makes it readable. Errors are ignored on
/// purpose: `EAGAIN` means the counter is saturated (already readable), and
/// the receiver's timer covers anything else.
pub fn eventfd_ring(fd: BorrowedFd<'_>) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live local buffer to an open descriptor.
    let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

/// `read(2)` of an eventfd (non-blocking): its counter, reset to 0 so it
/// is not readable until the next ring; `WouldBlock` if it was 0.
#[cfg(feature = "tokio")]
pub fn eventfd_read(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut buf = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a live local buffer.
    cvt(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })?;
    Ok(u64::from_ne_bytes(buf))
}
