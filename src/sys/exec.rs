//! Executing a program from a forked child of a process that may have
//! other threads: `execve(2)` with an [`ExecPlan`] built before `fork(2)`.
//!
//! After `fork(2)` in a multi-threaded process the child may only make
//! async-signal-safe calls (`signal-safety(7)`) until it execs: a lock
//! that another thread held at the fork (the allocator's, std's
//! environment lock, stdio's) stays locked forever in the child. So
//! everything that allocates, formats or reads the environment is done in
//! the parent ([`ExecPlan::new`] and its setters), and
//! [`ExecPlan::exec_in_child`] only writes into memory the plan already
//! owns and calls `getpid(2)`, `fcntl(2)`, `dup2(2)`, `close(2)`,
//! `chdir(2)`, `write(2)`, `execve(2)` and `_exit(2)`.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::net::LISTEN_FDS_START;

/// Room for a pid's decimal digits (`u32::MAX` has 10).
const PID_DIGITS: usize = 10;

/// What a forked child executes, and the descriptor table and working
/// directory it sets up first. Built in the parent.
pub struct ExecPlan {
    path: CString,
    /// Kept alive for `argv_ptrs`.
    _argv: Vec<CString>,
    /// `argv`, null-terminated.
    argv_ptrs: Vec<*const libc::c_char>,
    /// `KEY=value` entries, each NUL-terminated (a pid's entry has room
    /// for [`PID_DIGITS`] digits and its NUL).
    env: Vec<Box<[u8]>>,
    /// Which `env` entries take the child's pid, and at which offset.
    pid_slots: Vec<(usize, usize)>,
    /// `envp`, filled in the child (after the pids are written), then
    /// null-terminated: `env.len() + 1` entries.
    env_ptrs: Vec<*const libc::c_char>,
    /// Where to `chdir(2)` first, if it still exists.
    cwd: Option<CString>,
    /// Placed at `3, 4, ...` in this order, without `FD_CLOEXEC`.
    fds: Vec<RawFd>,
    /// The close-on-exec copies made while placing `fds`.
    scratch: Vec<RawFd>,
    /// Where a failure is written (`<prefix><reason> (os error N)\n`).
    error_to: Option<(RawFd, Vec<u8>)>,
    /// In the child: the close-on-exec copy of `error_to`'s descriptor,
    /// out of the way of `fds`.
    error_at: Option<RawFd>,
}

impl ExecPlan {
    /// A plan to execute the file at `path` (no `PATH` search) with `argv`
    /// and an empty environment.
    ///
    /// # Errors
    /// `InvalidInput` if the path or an argument contains a NUL byte.
    pub fn new(path: &Path, argv: &[impl AsRef<OsStr>]) -> io::Result<Self> {
        let path = cstring(path.as_os_str().as_bytes())?;
        let argv = argv
            .iter()
            .map(|a| cstring(a.as_ref().as_bytes()))
            .collect::<io::Result<Vec<_>>>()?;
        let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        Ok(Self {
            path,
            _argv: argv,
            argv_ptrs,
            env: Vec::new(),
            pid_slots: Vec::new(),
            env_ptrs: vec![std::ptr::null()],
            cwd: None,
            fds: Vec::new(),
            scratch: Vec::new(),
            error_to: None,
            error_at: None,
        })
    }

    /// Adds `key=value` to the environment.
    ///
    /// # Errors
    /// `InvalidInput` if either contains a NUL byte, or `key` a `=`.
    pub fn env(&mut self, key: &OsStr, value: &OsStr) -> io::Result<()> {
        let mut kv = key_eq(key)?;
        if value.as_bytes().contains(&0) {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        kv.extend_from_slice(value.as_bytes());
        kv.push(0);
        self.push_env(kv);
        Ok(())
    }

    /// Adds `key=<the child's pid>` to the environment (written in the
    /// child, which only then knows its pid).
    ///
    /// # Errors
    /// As [`ExecPlan::env`].
    pub fn env_child_pid(&mut self, key: &OsStr) -> io::Result<()> {
        let mut kv = key_eq(key)?;
        let at = kv.len();
        kv.resize(at + PID_DIGITS + 1, 0);
        self.pid_slots.push((self.env.len(), at));
        self.push_env(kv);
        Ok(())
    }

    fn push_env(&mut self, kv: Vec<u8>) {
        self.env.push(kv.into_boxed_slice());
        self.env_ptrs.push(std::ptr::null());
    }

    /// `chdir(2)` to `dir` before executing, if it exists then (a failure
    /// is ignored: the child stays where its parent was).
    ///
    /// # Errors
    /// `InvalidInput` if the path contains a NUL byte.
    pub fn cwd(&mut self, dir: &Path) -> io::Result<()> {
        self.cwd = Some(cstring(dir.as_os_str().as_bytes())?);
        Ok(())
    }

    /// The descriptors the program gets, at `3, 4, ...` in this order
    /// (`LISTEN_FDS` style), without `FD_CLOEXEC`; every other descriptor
    /// is left as it is (close-on-exec ones close at the exec).
    pub fn fds(&mut self, fds: Vec<RawFd>) {
        self.scratch = vec![-1; fds.len()];
        self.fds = fds;
    }

    /// On failure, `prefix`, the reason and a newline are written to `fd`
    /// (the parent's descriptor number; the child copies it out of the way
    /// before it places [`ExecPlan::fds`]).
    pub fn error_to(&mut self, fd: RawFd, prefix: String) {
        self.error_to = Some((fd, prefix.into_bytes()));
    }

    /// In the child of `fork(2)`: writes its pid into the environment,
    /// places the descriptors, changes directory and executes the
    /// program; on failure, says why (see [`ExecPlan::error_to`]) and
    /// exits with code 127.
    ///
    /// Async-signal-safe: no allocation, no lock, no formatting machinery;
    /// only `getpid`, `fcntl`, `dup2`, `close`, `chdir`, `write`, `execve`
    /// and `_exit`, and stores into the buffers the plan already owns.
    pub fn exec_in_child(&mut self) -> ! {
        let errno = self.try_exec();
        if let Some((fd, prefix)) = &self.error_to {
            let at = self.error_at.unwrap_or(*fd);
            write_raw(at, prefix);
            write_raw(at, errno_text(errno).as_bytes());
            write_raw(at, b" (os error ");
            let mut digits = [0u8; 12];
            let n = put_decimal(&mut digits, errno.unsigned_abs());
            write_raw(at, &digits[..n]);
            write_raw(at, b")\n");
        }
        // SAFETY: _exit has no preconditions and never returns.
        unsafe { libc::_exit(127) }
    }
}

impl ExecPlan {
    /// [`ExecPlan::exec_in_child`] up to the exec; returns its `errno`.
    fn try_exec(&mut self) -> i32 {
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() }.unsigned_abs();
        for k in 0..self.pid_slots.len() {
            let (i, at) = self.pid_slots[k];
            let entry = &mut self.env[i];
            let n = put_decimal(&mut entry[at..at + PID_DIGITS], pid);
            entry[at + n] = 0;
        }
        for i in 0..self.env.len() {
            self.env_ptrs[i] = self.env[i].as_ptr().cast();
        }
        let Some(above) = RawFd::try_from(self.fds.len())
            .ok()
            .and_then(|n| LISTEN_FDS_START.checked_add(n))
        else {
            return libc::EMFILE;
        };
        if let Some((fd, _)) = &self.error_to {
            // SAFETY: fcntl F_DUPFD_CLOEXEC takes integers only and only
            // adds a descriptor.
            let copy = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, above) };
            if copy < 0 {
                // Nothing moved yet: the failure goes to the original.
                return errno();
            }
            self.error_at = Some(copy);
        }
        // First copy every source above the target range, so that placing
        // one never overwrites another still to be placed.
        for i in 0..self.fds.len() {
            // SAFETY: as above.
            let copy = unsafe { libc::fcntl(self.fds[i], libc::F_DUPFD_CLOEXEC, above) };
            if copy < 0 {
                return errno();
            }
            self.scratch[i] = copy;
        }
        for (target, &copy) in (LISTEN_FDS_START..).zip(&self.scratch) {
            // dup2's copy does not inherit FD_CLOEXEC: it survives the exec.
            loop {
                // SAFETY: dup2 takes integers only; replacing `target` in
                // this child's table is the point.
                if unsafe { libc::dup2(copy, target) } >= 0 {
                    break;
                }
                if errno() != libc::EINTR {
                    return errno();
                }
            }
        }
        for &copy in &self.scratch {
            // SAFETY: close takes an integer; `copy` is this child's own.
            unsafe { libc::close(copy) };
        }
        if let Some(cwd) = &self.cwd {
            // SAFETY: `cwd` is a NUL-terminated string the plan owns. A
            // directory that is gone leaves the child where it was.
            unsafe { libc::chdir(cwd.as_ptr()) };
        }
        // SAFETY: every pointer is to a NUL-terminated string the plan
        // owns, and both arrays end with a null pointer (`argv_ptrs` since
        // `new`, `env_ptrs` filled just above, its last entry null).
        unsafe {
            libc::execve(
                self.path.as_ptr(),
                self.argv_ptrs.as_ptr(),
                self.env_ptrs.as_ptr(),
            )
        };
        errno()
    }
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::ErrorKind::InvalidInput.into())
}

/// `key=` as bytes, checked.
fn key_eq(key: &OsStr) -> io::Result<Vec<u8>> {
    let key = key.as_bytes();
    if key.is_empty() || key.contains(&0) || key.contains(&b'=') {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    let mut kv = key.to_vec();
    kv.push(b'=');
    Ok(kv)
}

/// The calling thread's `errno` (async-signal-safe: a thread-local read).
fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `write(2)`, once, errors ignored.
fn write_raw(fd: RawFd, bytes: &[u8]) {
    // SAFETY: write reads `bytes.len()` bytes from a live slice.
    unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
}

/// Writes `n` in decimal at the start of `buf` (which holds at least 10
/// bytes); returns how many digits. No allocation.
fn put_decimal(buf: &mut [u8], mut n: u32) -> usize {
    let mut digits = [0u8; PID_DIGITS];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for (i, d) in digits[..len].iter().rev().enumerate() {
        buf[i] = *d;
    }
    len
}

/// Why an exec most often fails, without `strerror(3)` (which may
/// allocate or lock for its locale).
fn errno_text(errno: i32) -> &'static str {
    match errno {
        libc::ENOENT => "No such file or directory",
        libc::EACCES => "Permission denied",
        libc::ENOEXEC => "Exec format error",
        libc::ENOTDIR => "Not a directory",
        libc::ETXTBSY => "Text file busy",
        libc::ELOOP => "Too many levels of symbolic links",
        libc::E2BIG => "Argument list too long",
        libc::ENOMEM => "Cannot allocate memory",
        libc::EMFILE => "Too many open files",
        libc::EBADF => "Bad file descriptor",
        _ => "exec failed",
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, AsRawFd};
    use std::time::Duration;

    use super::*;
    use crate::sys::process::{pipe_cloexec, read_raw};
    use crate::testing::{fork, ExitStatus, Watchdog};

    fn read_all(fd: std::os::fd::BorrowedFd<'_>) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n @ 1..) = read_raw(fd, &mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    /// The program gets its descriptors at 3.., its own pid where asked,
    /// and the working directory; a failure is said on the error pipe.
    #[test]
    fn a_planned_exec_places_fds_pid_and_directory() {
        let dog = Watchdog::new("exec plan", Duration::from_secs(20));
        let (read, write) = pipe_cloexec().unwrap();
        let (err_read, err_write) = pipe_cloexec().unwrap();
        let mut plan = ExecPlan::new(
            Path::new("/bin/sh"),
            &["sh", "-c", r#"printf '%s %s %s' "$MY_PID" "$$" "$(pwd)" >&3"#],
        )
        .unwrap();
        plan.env_child_pid(OsStr::new("MY_PID")).unwrap();
        plan.env(OsStr::new("PATH"), OsStr::new("/usr/bin:/bin")).unwrap();
        plan.cwd(Path::new("/")).unwrap();
        plan.fds(vec![write.as_raw_fd()]);
        plan.error_to(err_write.as_raw_fd(), "err cannot execute: ".into());
        // SAFETY: the child only runs the plan (async-signal-safe).
        let child = dog.track(unsafe { fork(|| plan.exec_in_child()) }.unwrap());
        let pid = child.pid();
        assert_eq!(
            child.wait_timeout(Duration::from_secs(10)).unwrap(),
            Some(ExitStatus::Code(0))
        );
        drop((write, err_write));
        assert_eq!(read_all(read.as_fd()), format!("{pid} {pid} /"));
        assert_eq!(read_all(err_read.as_fd()), "");

        let (err_read, err_write) = pipe_cloexec().unwrap();
        let mut plan = ExecPlan::new(Path::new("/nonexistent/program"), &["program"]).unwrap();
        plan.error_to(
            err_write.as_raw_fd(),
            "err cannot execute /nonexistent/program: ".into(),
        );
        // SAFETY: as above.
        let child = dog.track(unsafe { fork(|| plan.exec_in_child()) }.unwrap());
        assert_eq!(
            child.wait_timeout(Duration::from_secs(10)).unwrap(),
            Some(ExitStatus::Code(127))
        );
        drop(err_write);
        assert_eq!(
            read_all(err_read.as_fd()),
            "err cannot execute /nonexistent/program: No such file or directory (os error 2)\n"
        );
    }

    #[test]
    fn pids_are_written_in_decimal() {
        let mut buf = [0xffu8; PID_DIGITS];
        for (n, text) in [
            (0, "0"),
            (7, "7"),
            (4_194_304, "4194304"),
            (u32::MAX, "4294967295"),
        ] {
            let len = put_decimal(&mut buf, n);
            assert_eq!(&buf[..len], text.as_bytes());
        }
    }
}
