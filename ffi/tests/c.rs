//! The C tests (`tests/c/*.c`) and the example (`examples/worker.c`):
//! compiled with the system's `cc` against `include/shmcluster.h` and the
//! cdylib cargo built for these tests, run, and run again under
//! `valgrind --error-exitcode=1 --leak-check=full` when valgrind is
//! installed (CI installs it; without it that half is skipped, loudly).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs `cmd` with a time limit; panics with its output on failure.
fn run(mut cmd: Command, limit: Duration) {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let started = Instant::now();
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{what} hung for {limit:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("output");
    assert!(
        out.status.success(),
        "{what} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn have_valgrind() -> bool {
    Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn c_test(name: &str) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/c")
        .join(format!("{name}.c"));
    let exe = common::compile(&source);
    run(Command::new(&exe), Duration::from_secs(30));
    if have_valgrind() {
        let mut cmd = Command::new("valgrind");
        cmd.args([
            "--error-exitcode=1",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite",
            "-q",
        ])
        .arg(&exe);
        run(cmd, Duration::from_secs(120));
    } else {
        eprintln!(
            "\n!!!!! valgrind is not installed: {name}.c ran WITHOUT the memory check \
             (apt-get install valgrind; .ci/run installs it) !!!!!\n"
        );
    }
}

#[test]
fn basics() {
    c_test("basics");
}

#[test]
fn messaging() {
    c_test("messaging");
}

#[test]
fn polled() {
    c_test("polled");
}

#[test]
fn polled_leader() {
    c_test("polled_leader");
}

#[test]
fn locks() {
    c_test("locks");
}

#[test]
fn enum_arguments() {
    c_test("enums");
}

#[test]
fn handle_and_accept() {
    c_test("handle");
}

#[test]
fn events_and_leader_change() {
    c_test("events");
}
