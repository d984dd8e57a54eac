//! The segment's file: an anonymous memory file (`memfd_create(2)`), the
//! seals that fix its size (`fcntl(2)` `F_ADD_SEALS`), and its shared
//! mapping (`mmap(2)`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

/// `memfd_create(2)` with `MFD_CLOEXEC | MFD_ALLOW_SEALING`: an anonymous
/// file with no name in `/dev/shm`, gone when its last fd and mapping close.
pub fn memfd_create(name: &str) -> io::Result<OwnedFd> {
    nix::sys::memfd::memfd_create(
        name,
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(io::Error::from)
}

/// `fcntl(2)` `F_ADD_SEALS` with `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`:
/// nobody can change the segment's size any more (a shrink would SIGBUS
/// every peer), nor remove the seals.
pub fn seal_size(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
    fcntl(fd, FcntlArg::F_ADD_SEALS(seals))
        .map(drop)
        .map_err(io::Error::from)
}

/// `fcntl(2)` `F_GET_SEALS`: whether the size seals
/// (`F_SEAL_SHRINK | F_SEAL_GROW`) are set on `fd`. A file that cannot carry
/// seals at all (`EINVAL`: not a memfd or shmem file) has none.
pub fn is_size_sealed(fd: BorrowedFd<'_>) -> io::Result<bool> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    let bits = match fcntl(fd, FcntlArg::F_GET_SEALS) {
        Ok(bits) => bits,
        Err(nix::errno::Errno::EINVAL) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let seals = SealFlag::from_bits_truncate(bits);
    Ok(seals.contains(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW))
}

/// `mmap(2)` with `PROT_READ | PROT_WRITE, MAP_SHARED` of the first `len`
/// bytes of `fd`, through memmap2's [`memmap2::MmapRaw`]: it hands out raw
/// pointers only, never references, which is what memory that other
/// processes write requires. Unmapped (`munmap(2)`) on drop.
pub fn map_shared(fd: BorrowedFd<'_>, len: usize) -> io::Result<memmap2::MmapRaw> {
    memmap2::MmapOptions::new().len(len).map_raw(fd.as_raw_fd())
}
