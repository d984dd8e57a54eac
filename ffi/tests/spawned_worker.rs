//! `examples/worker.c` as the spawned workers of a real master: attach from
//! the environment, a handler, ready, a map over the cluster from instance
//! 0, a shutdown request, serving until told to stop; the master's report
//! must be clean. No libtest runner: the master must fork from a
//! single-threaded process.

mod common;

use std::path::Path;
use std::time::Duration;

use shmcluster_rs::Cluster;

fn main() {
    // A hang fails the test instead of CI: SIGALRM's default action ends
    // the master, and its workers die with it (PR_SET_PDEATHSIG).
    // SAFETY: alarm(2) only arms a timer.
    unsafe { libc::alarm(30) };
    let exe = common::compile(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/worker.c"));
    let report = Cluster::builder()
        .workers(2)
        .listen("127.0.0.1:0")
        .shutdown_grace(Duration::from_secs(5))
        .command([exe])
        .expect("the master starts");
    assert_eq!(
        report.exit_code(),
        0,
        "the cluster of C workers shut down cleanly: {report:?}"
    );
    println!("spawned_worker: ok");
}
