//! `examples/hosts.rs`, run as README runs it: it starts nats-server and
//! two hosts, shows a broadcast, a consume spilling to the other host and
//! a map, and must exit 0 having printed each step's outcome.
//!
//! The example is built here (`cargo build --example hosts`, into this
//! test binary's target directory and profile, with the features this
//! test was built with) so the test never runs a stale build. It runs
//! under a watchdog; its NATS server and hosts die with it
//! (`PR_SET_PDEATHSIG`), and it with this test.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

/// `target/<profile>`, from this test binary's `target/<profile>/deps/..`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("a target dir above the test binary")
        .to_path_buf()
}

/// Builds the example with this test's features and profile.
fn build_example() -> PathBuf {
    let profile = profile_dir();
    let features: Vec<&str> = [
        ("nats", cfg!(feature = "nats")),
        ("cli", cfg!(feature = "cli")),
        ("tokio", cfg!(feature = "tokio")),
        ("http", cfg!(feature = "http")),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo.args(["build", "--quiet", "--example", "hosts", "--no-default-features"]);
    cargo.arg("--features").arg(features.join(","));
    if profile.file_name().is_some_and(|p| p == "release") {
        cargo.arg("--release");
    }
    let status = cargo
        .arg("--target-dir")
        .arg(profile.parent().expect("target dir"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build --example hosts: {status}");
    let bin = profile.join("examples").join("hosts");
    assert!(bin.is_file(), "no {}", bin.display());
    bin
}

#[test]
fn the_hosts_example_shows_every_step_and_exits_0() {
    let bin = build_example();
    let dir = common::tempdir("hosts_example", "run");
    let (out, err) = (dir.join("stdout"), dir.join("stderr"));
    let mut cmd = Command::new(&bin);
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"));
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes integers only and is
    // async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start the example");
    let status = common::wait_child(&mut child, Duration::from_secs(150));
    let stdout = std::fs::read_to_string(&out).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let shown = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    let status = status.unwrap_or_else(|e| panic!("the example {e}\n{shown}"));
    assert!(status.success(), "the example ended with {status}\n{shown}");
    for line in [
        "[web-2 worker 1] invalidated user:42",
        "[web-1 worker 0] all 4 workers on both hosts dropped user:42",
        "[web-1 worker 0] dog.png was resized on web-1 (here)",
        "[web-1 worker 0] cat.png was resized on web-2",
        "[web-1 worker 0] web-2 slot",
        "[example] both hosts and nats-server stopped: every step happened",
    ] {
        assert!(stdout.contains(line), "no {line:?} in\n{shown}");
    }
}
