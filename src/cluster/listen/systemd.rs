//! The `LISTEN_FDS` protocol of systemd's socket activation
//! (`sd_listen_fds(3)`), both ways: placing listeners at descriptors 3, 4,
//! ... for a child about to exec, and taking them in as the child.

use std::io;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;

use super::{ListenError, Listener};
use crate::sys;
use crate::sys::net;

/// In a forked child before exec (single-threaded, or only
/// async-signal-safe calls plus allocation): places `fds` at descriptors
/// 3, 4, ... in order, without `FD_CLOEXEC`, and returns the environment
/// entries that announce them, `LISTEN_FDS`, `LISTEN_PID` (this process)
/// and `LISTEN_FDNAMES` (the names joined by `:`), none if `fds` is empty;
/// and the first descriptor number after them (`3 + fds.len()`), where the
/// caller can place further descriptors.
///
/// Whatever the child had at `3..3 + fds.len()` is closed: a descriptor
/// the caller still needs there must be moved first. The sources may be
/// anywhere, that range included: each is first copied above it.
///
/// # Errors
/// If a name contains `:`, or `fcntl`/`dup2` fails (a bad source, or out
/// of descriptors).
pub(crate) fn place_listen_fds(fds: &[(RawFd, &str)]) -> io::Result<(Vec<(String, String)>, RawFd)> {
    let count = RawFd::try_from(fds.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let next = net::LISTEN_FDS_START
        .checked_add(count)
        .ok_or(io::ErrorKind::InvalidInput)?;
    if fds.iter().any(|(_, name)| name.contains(':')) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a LISTEN_FDNAMES name contains ':'",
        ));
    }
    // First copy every source above the target range, so that placing one
    // never overwrites another still to be placed; then move them into
    // place (dup2's copy does not inherit FD_CLOEXEC; the copies above do
    // have it, and are closed).
    let mut copies = Vec::with_capacity(fds.len());
    for (src, _) in fds {
        copies.push(sys::fd::dup_above(*src, next)?);
    }
    for (target, copy) in (net::LISTEN_FDS_START..).zip(&copies) {
        sys::fd::dup2(*copy, target)?;
    }
    for copy in copies {
        sys::fd::close_raw(copy)?;
    }
    if fds.is_empty() {
        return Ok((Vec::new(), next));
    }
    let names: Vec<&str> = fds.iter().map(|(_, name)| *name).collect();
    let env = vec![
        ("LISTEN_FDS".to_owned(), count.to_string()),
        ("LISTEN_PID".to_owned(), sys::getpid().to_string()),
        ("LISTEN_FDNAMES".to_owned(), names.join(":")),
    ];
    Ok((env, next))
}

/// The listeners handed to this process with `LISTEN_PID`, `LISTEN_FDS`
/// and `LISTEN_FDNAMES` (by the master, or by systemd), if `LISTEN_PID` is
/// this process. They are taken once: the three variables are removed from
/// the environment (if present), and a second call finds none. Each is made
/// close-on-exec, so a process this worker starts does not inherit it.
/// Empty when there are none.
///
/// Changing the environment is only sound while no other thread reads it:
/// call this early in `main`, before starting threads.
///
/// # Errors
/// [`ListenError::Systemd`] if the variables are malformed, a descriptor
/// they name is not an open socket, or they were already taken in this
/// process.
pub fn inherited_listeners() -> Result<Vec<Listener>, ListenError> {
    Ok(take_listen_env()?
        .into_iter()
        .map(|(name, fd)| Listener::new(name, fd))
        .collect())
}

/// More `LISTEN_FDS` than this is garbage: Linux's own ceiling on open
/// descriptors per process (`fs.nr_open`) defaults to 2^20.
const MAX_LISTEN_FDS: usize = 1 << 20;

/// Reads and removes `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`;
/// takes the descriptors if they are meant for this process, makes them
/// close-on-exec and checks that they are sockets.
pub(super) fn take_listen_env() -> Result<Vec<(String, OwnedFd)>, ListenError> {
    const VARS: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];
    let [pid, count, names] = VARS.map(std::env::var_os);
    for (var, value) in VARS.iter().zip([&pid, &count, &names]) {
        if value.is_some() {
            std::env::remove_var(var);
        }
    }
    let systemd_error = |reason: String| ListenError::Systemd { reason };
    let Some(pid) = pid else {
        return Ok(Vec::new());
    };
    let pid: u32 = pid
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| systemd_error(format!("LISTEN_PID={pid:?} is not a process id")))?;
    if pid != sys::getpid() {
        return Ok(Vec::new());
    }
    let count = count.ok_or_else(|| systemd_error("LISTEN_PID without LISTEN_FDS".to_owned()))?;
    let count: usize = count
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| systemd_error(format!("LISTEN_FDS={count:?} is not a count")))?;
    if count == 0 {
        return Ok(Vec::new());
    }
    if count > MAX_LISTEN_FDS {
        return Err(systemd_error(format!(
            "LISTEN_FDS={count} is more than a process can hold"
        )));
    }
    let names: Option<Vec<String>> = match names {
        None => None,
        Some(names) => {
            let names = String::from_utf8(names.into_vec())
                .map_err(|_| systemd_error("LISTEN_FDNAMES is not UTF-8".to_owned()))?;
            let names: Vec<String> = names
                .split(':')
                .map(|n| if n.is_empty() { "unknown" } else { n }.to_owned())
                .collect();
            if names.len() != count {
                return Err(systemd_error(format!(
                    "LISTEN_FDNAMES has {} names for LISTEN_FDS={count}",
                    names.len()
                )));
            }
            Some(names)
        }
    };
    let fds = net::adopt_listen_fds(count).map_err(|e| {
        systemd_error(format!(
            "cannot take descriptors {}..{}: {e}",
            net::LISTEN_FDS_START,
            net::LISTEN_FDS_START as usize + count
        ))
    })?;
    // Without LISTEN_FDNAMES, every name is "unknown" (as systemd has it).
    let names = names.unwrap_or_else(|| vec!["unknown".to_owned(); fds.len()]);
    for (i, (name, fd)) in names.iter().zip(&fds).enumerate() {
        let raw = net::LISTEN_FDS_START as usize + i;
        let is_socket = sys::fd::set_cloexec(fd.as_fd(), true).and_then(|()| net::is_socket(fd.as_fd()));
        match is_socket {
            Ok(true) => {}
            Ok(false) => {
                return Err(systemd_error(format!(
                    "descriptor {raw} ({name}) is not a socket"
                )))
            }
            Err(e) => return Err(systemd_error(format!("descriptor {raw} ({name}): {e}"))),
        }
    }
    Ok(names.into_iter().zip(fds).collect())
}

// The run-time request protocol, one `SOCK_SEQPACKET` message each way:

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, AsRawFd, RawFd};

    use super::super::{ListenError, ListenSpec, Listeners};
    use crate::sys;

    use super::super::testutil::*;
    use super::*;

    /// Clears the `LISTEN_*` variables (in a child: the test runner's
    /// environment might carry some).
    fn clear_listen_env() {
        for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(var);
        }
    }

    fn listen_env_is_gone() -> bool {
        ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"]
            .iter()
            .all(|var| std::env::var_os(var).is_none())
    }

    /// Sets `LISTEN_PID` to `pid` and the other two as given.
    fn set_listen_env(pid: u32, count: &str, names: Option<&str>) {
        clear_listen_env();
        std::env::set_var("LISTEN_PID", pid.to_string());
        std::env::set_var("LISTEN_FDS", count);
        if let Some(names) = names {
            std::env::set_var("LISTEN_FDNAMES", names);
        }
    }

    #[test]
    fn placed_fds_are_inherited_in_order_with_their_names() {
        let specs = [
            ListenSpec::new(tcp("127.0.0.1:0")).name("a"),
            ListenSpec::new(tcp("127.0.0.1:0")).name("b"),
        ];
        let listeners = Listeners::bind(&specs, 1).unwrap();
        let ports: Vec<u16> = listeners
            .for_instance(0)
            .iter()
            .map(|(fd, _)| port(*fd))
            .collect();
        // Only the child rearranges its descriptor table; it borrows
        // `listeners` and never drops them (it `_exit`s).
        in_child("place_listen_fds", || {
            clear_listen_env();
            let fds: Vec<(RawFd, &str)> = listeners
                .for_instance(0)
                .iter()
                .map(|(fd, name)| (fd.as_raw_fd(), *name))
                .collect();
            let Ok((env, next)) = place_listen_fds(&fds) else {
                return 1;
            };
            if next != 5 {
                return 2;
            }
            // Again, from sources inside the target range, swapped.
            let Ok((env2, _)) = place_listen_fds(&[(4, "b"), (3, "a2")]) else {
                return 3;
            };
            let pid = sys::getpid().to_string();
            let expect = |names: &str| {
                vec![
                    ("LISTEN_FDS".to_owned(), "2".to_owned()),
                    ("LISTEN_PID".to_owned(), pid.clone()),
                    ("LISTEN_FDNAMES".to_owned(), names.to_owned()),
                ]
            };
            if env != expect("a:b") || env2 != expect("b:a2") {
                return 4;
            }
            // The child about to exec keeps them: no FD_CLOEXEC.
            if !matches!(
                (sys::fd::is_cloexec_raw(3), sys::fd::is_cloexec_raw(4)),
                (Ok(false), Ok(false))
            ) {
                return 13;
            }
            for (key, value) in &env2 {
                std::env::set_var(key, value);
            }
            let Ok(taken) = inherited_listeners() else {
                return 5;
            };
            if !listen_env_is_gone() {
                return 6;
            }
            let got: Vec<(&str, RawFd, u16)> = taken
                .iter()
                .map(|l| (l.name(), l.as_raw_fd(), port(l.as_fd())))
                .collect();
            if got != [("b", 3, ports[1]), ("a2", 4, ports[0])] {
                return 7;
            }
            if !taken.iter().all(is_cloexec) {
                return 8;
            }
            // Taken once: the variables are gone, and even set again the
            // numbers are not taken twice.
            if !matches!(inherited_listeners(), Ok(v) if v.is_empty()) {
                return 9;
            }
            for (key, value) in &env2 {
                std::env::set_var(key, value);
            }
            if !matches!(inherited_listeners(), Err(ListenError::Systemd { .. })) {
                return 10;
            }
            if place_listen_fds(&[(3, "bad:name")]).is_ok() {
                return 11;
            }
            if !matches!(place_listen_fds(&[]), Ok((env, 3)) if env.is_empty()) {
                return 12;
            }
            0
        });
    }

    #[test]
    fn inherited_listeners_ignore_another_process_and_need_sockets() {
        in_child("inherited: not ours", || {
            set_listen_env(1, "1", None);
            match inherited_listeners() {
                Ok(v) if v.is_empty() && listen_env_is_gone() => 0,
                _ => 1,
            }
        });
        in_child("inherited: none", || {
            clear_listen_env();
            match inherited_listeners() {
                Ok(v) if v.is_empty() => 0,
                _ => 1,
            }
        });
        in_child("inherited: not a socket", || {
            // A bare number: the File must not also close what ends up at 3.
            let Ok(file) = std::fs::File::open("/dev/null") else {
                return 1;
            };
            let raw = std::os::fd::IntoRawFd::into_raw_fd(file);
            if place_listen_fds(&[(raw, "null")]).is_err() {
                return 2;
            }
            set_listen_env(sys::getpid(), "1", None);
            match inherited_listeners() {
                Err(ListenError::Systemd { reason }) if reason.contains("not a socket") => 0,
                _ => 3,
            }
        });
    }

    #[test]
    fn systemd_sockets_are_taken_in_named_and_close_on_exec() {
        let listeners = Listeners::bind(&[ListenSpec::new(tcp("127.0.0.1:0"))], 1).unwrap();
        let addrs = listeners.local_addrs();
        let (fd, _) = listeners.for_instance(0)[0];
        let raw = fd.as_raw_fd();
        in_child("systemd: taken", || {
            // systemd passes its sockets without FD_CLOEXEC, as placed here.
            if place_listen_fds(&[(raw, "ignored")]).is_err() {
                return 1;
            }
            set_listen_env(sys::getpid(), "1", Some("web"));
            let Ok(Some(taken)) = Listeners::from_systemd_env() else {
                return 2;
            };
            if !listen_env_is_gone() {
                return 3;
            }
            if taken.local_addrs() != addrs {
                return 4;
            }
            let got = taken.for_instance(5);
            if got.len() != 1 || got[0].1 != "web" || got[0].0.as_raw_fd() != 3 {
                return 5;
            }
            if !sys::fd::is_cloexec(got[0].0).unwrap_or(false) {
                return 6;
            }
            0
        });
        in_child("systemd: unnamed", || {
            if place_listen_fds(&[(raw, "x")]).is_err() {
                return 1;
            }
            set_listen_env(sys::getpid(), "1", None);
            let Ok(Some(taken)) = Listeners::from_systemd_env() else {
                return 2;
            };
            let names: Vec<&str> = taken.for_instance(0).into_iter().map(|(_, n)| n).collect();
            if names != ["unknown"] {
                return 3;
            }
            0
        });
        in_child("systemd: not activated", || {
            set_listen_env(1, "1", None);
            if !matches!(Listeners::from_systemd_env(), Ok(None)) || !listen_env_is_gone() {
                return 1;
            }
            clear_listen_env();
            if !matches!(Listeners::from_systemd_env(), Ok(None)) {
                return 2;
            }
            0
        });
        for (what, count, names) in [
            ("count", "x", None),
            ("negative", "-1", None),
            ("names", "1", Some("a:b")),
            ("missing", "2", None),
            ("huge", "18446744073709551615", None),
        ] {
            in_child(&format!("systemd: bad {what}"), || {
                if place_listen_fds(&[(raw, "x")]).is_err() {
                    return 1;
                }
                // "missing": nothing at 4 (whatever the child had there,
                // it never uses).
                let _ = sys::fd::close_raw(4);
                set_listen_env(sys::getpid(), count, names);
                match Listeners::from_systemd_env() {
                    Err(ListenError::Systemd { .. }) if listen_env_is_gone() => 0,
                    _ => 2,
                }
            });
        }
        in_child("systemd: bad pid", || {
            clear_listen_env();
            std::env::set_var("LISTEN_PID", "me");
            std::env::set_var("LISTEN_FDS", "1");
            match Listeners::from_systemd_env() {
                Err(ListenError::Systemd { .. }) if listen_env_is_gone() => 0,
                _ => 1,
            }
        });
    }
}
