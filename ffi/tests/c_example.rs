//! The build-and-run lines in `examples/worker.c` (and the README's "C and
//! Python"), run as written through `sh -c` from the repository root: the
//! `cc` line must compile the example where a user types it, and the
//! program must then find `libshmcluster.so` with no `LD_LIBRARY_PATH`
//! (its rpath) when the `shmcluster run` line starts it. The one change is
//! the profile: `target/release` becomes this test's own profile directory
//! (a release build of the workspace inside a test would take minutes), and
//! the `cargo build` line is run for that profile.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{profile_dir, repo_root};

/// The indented command lines under "Build and run" in worker.c's comment.
fn documented_lines() -> Vec<String> {
    let source = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/worker.c"))
        .expect("read examples/worker.c");
    let block = source
        .split_once("Build and run, from the repository root:")
        .unwrap_or_else(|| {
            panic!("examples/worker.c has no \"Build and run, from the repository root:\" lines")
        })
        .1;
    block
        .lines()
        .skip(1) // the rest of the heading's line
        .skip_while(|l| l.trim() == "*")
        .map_while(|l| l.strip_prefix(" *     "))
        .map(str::to_owned)
        .collect()
}

/// Runs `line` with `sh -c` from the repository root, without
/// `LD_LIBRARY_PATH`, in its own process group (killed whole past
/// `limit`); returns (exit code, stdout, stderr).
fn sh(line: &str, limit: Duration) -> (Option<i32>, String, String) {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(line)
        .current_dir(repo_root())
        .env_remove("LD_LIBRARY_PATH")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("sh -c {line:?}: {e}"));
    let (mut out, mut err) = (
        child.stdout.take().expect("stdout"),
        child.stderr.take().expect("stderr"),
    );
    let readers = (
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        }),
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        }),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let group = child.id() as i32;
            // SAFETY: kill(2) of the process group this test made for the
            // command (its master and workers), then its reaping below.
            unsafe { libc::kill(-group, libc::SIGKILL) };
            let _ = child.wait();
            panic!("sh -c {line:?} ran longer than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = readers.0.join().expect("stdout reader");
    let stderr = readers.1.join().expect("stderr reader");
    (status.code(), stdout, stderr)
}

#[test]
fn worker_c_builds_and_runs_with_its_documented_lines() {
    let lines = documented_lines();
    assert_eq!(lines.len(), 3, "cargo build, cc, shmcluster run: {lines:#?}");
    assert_eq!(lines[0], "cargo build --release -p shmcluster -p shmcluster-ffi");
    let profile = profile_dir();
    let local = |line: &str| line.replace("target/release", profile.to_str().expect("a UTF-8 target path"));

    // The `cargo build` line, for this test's profile.
    let mut cargo = common::cargo_build(&["-p", "shmcluster", "-p", "shmcluster-ffi"]);
    assert!(cargo.status().expect("run cargo build").success(), "{}", lines[0]);

    let _ = std::fs::remove_file(profile.join("c-worker"));
    let (code, out, err) = sh(&local(&lines[1]), Duration::from_secs(60));
    assert_eq!(code, Some(0), "{}\nstdout:\n{out}\nstderr:\n{err}", lines[1]);
    assert!(profile.join("c-worker").exists(), "{} made no c-worker", lines[1]);

    // Instance 0 maps "ping" over both workers, prints the answers and
    // asks the master to shut down: a clean exit.
    let (code, out, err) = sh(&local(&lines[2]), Duration::from_secs(30));
    assert_eq!(code, Some(0), "{}\nstdout:\n{out}\nstderr:\n{err}", lines[2]);
    assert!(
        out.contains("slot 0: pong from slot 0") && out.contains("slot 1: pong from slot 1"),
        "both workers answered the map: {out}\n{err}"
    );
    assert!(err.contains("clean shutdown"), "{err}");
}
