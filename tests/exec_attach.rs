//! A separately exec'd program attaches to the segment from an inherited
//! descriptor number (as a spawned worker will, given its number in the
//! environment), maps it at its own address, and exchanges messages with
//! the creator, parked on the shared futex in between.
//!
//! The test binary re-executes itself: with `SHMCLUSTER_TEST_FD` set, the
//! `exec_child` test is the child's whole job.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use shmcluster::raw::{AttachError, Config, Segment};
use shmcluster::testing::Watchdog;
use shmcluster::WaitStrategy;

const CHILD_FD: RawFd = 3;
const ROUNDS: u32 = 200;

/// The child's side: does nothing unless started by `exec_attach_then_talk`.
#[test]
fn exec_child() {
    let Ok(fd) = std::env::var("SHMCLUSTER_TEST_FD") else {
        return;
    };
    let fd: RawFd = fd.parse().expect("fd number");
    // SAFETY: the parent put the segment's memfd at this number for us and
    // nothing else in this process owns it.
    let segment = unsafe { Segment::attach_raw_fd(fd) }.expect("attach from the inherited fd");
    let mut me = segment.endpoint(1).expect("slot 1");
    me.set_wait_strategy(WaitStrategy::Park);
    for _ in 0..ROUNDS {
        let msg = me.recv_timeout(Duration::from_secs(10)).expect("a message");
        let n = u32::from_le_bytes(msg.payload[..4].try_into().unwrap());
        me.send(0, (n + 1).to_le_bytes()).expect("reply");
    }
}

#[test]
fn exec_attach_then_talk() {
    if std::env::var_os("SHMCLUSTER_TEST_FD").is_some() {
        return; // we are the child
    }
    let dog = Watchdog::new("exec_attach_then_talk", Duration::from_secs(60));
    let segment = Segment::create(&Config::new(2)).unwrap();
    let fd = segment.try_clone_fd().unwrap();
    let raw = fd.as_raw_fd();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "exec_child", "--nocapture", "--test-threads=1"])
        .env("SHMCLUSTER_TEST_FD", CHILD_FD.to_string())
        // The child's harness lines would read like this binary's own
        // summary; its failures still show on stderr.
        .stdout(std::process::Stdio::null());
    // SAFETY: between fork and exec the closure only calls dup2 (which
    // clears close-on-exec on the new number) or, when the descriptor
    // already has that number (dup2 onto itself changes nothing), fcntl to
    // clear close-on-exec — both async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let rc = if raw == CHILD_FD {
                libc::fcntl(raw, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, CHILD_FD)
            };
            if rc == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn the child");
    let mut me = segment.endpoint(0).unwrap();
    me.set_wait_strategy(WaitStrategy::Park);
    for n in 0..ROUNDS {
        me.send(1, n.to_le_bytes()).unwrap();
        let reply = me
            .recv_timeout(Duration::from_secs(10))
            .expect("the child's reply");
        assert_eq!(u32::from_le_bytes(reply.payload[..4].try_into().unwrap()), n + 1);
        assert_eq!(reply.sender, 1);
    }
    let status = child.wait().expect("reap the child");
    assert!(status.success(), "child: {status}");
    drop(dog);
}

#[test]
fn attach_raw_fd_refuses_what_is_not_a_segment() {
    if std::env::var_os("SHMCLUSTER_TEST_FD").is_some() {
        return;
    }
    // A closed descriptor number.
    // SAFETY: -1 is never an open descriptor; attach fails before owning it.
    let result = unsafe { Segment::attach_raw_fd(-1) };
    assert!(matches!(result, Err(AttachError::Io(_))), "{result:?}");
    // An open file that is not a segment: refused by its first bytes,
    // before any mapping.
    let file = std::fs::File::open("/proc/self/exe").unwrap();
    let raw = std::os::fd::IntoRawFd::into_raw_fd(file);
    // SAFETY: `raw` came from `into_raw_fd`, so nothing else owns it.
    let result = unsafe { Segment::attach_raw_fd(raw) };
    assert!(matches!(result, Err(AttachError::BadMagic { .. })), "{result:?}");
}
