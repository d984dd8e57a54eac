//! Helpers for multi-process messenger scenarios (`#[macro_use] mod common;`
//! then `use common::cluster::*;`).

use std::fmt::Display;
use std::time::{Duration, Instant};

use shmcluster::{Messenger, Peer, Worker, WorkerState};

use super::Check;

pub fn err(e: impl Display) -> String {
    e.to_string()
}

pub fn worker(m: &Messenger) -> &Worker {
    m.worker()
}

pub fn ready(m: &Messenger) {
    worker(m).ready();
}

/// The live worker of instance `index`, as the table shows it now.
pub fn peer(m: &Messenger, index: u32) -> Option<Peer> {
    worker(m).peers().into_iter().find(|p| {
        p.index == Some(index)
            && matches!(
                p.state,
                WorkerState::Starting | WorkerState::Ready | WorkerState::Draining
            )
    })
}

/// Dispatches until `done` holds; fails after `limit` or if told to stop.
pub fn serve_until(
    m: &mut Messenger,
    limit: Duration,
    what: &str,
    mut done: impl FnMut(&Messenger) -> bool,
) -> Check {
    let deadline = Instant::now() + limit;
    loop {
        if done(m) {
            return Ok(());
        }
        ensure!(!worker(m).should_stop(), "told to stop while waiting for {what}");
        ensure!(Instant::now() < deadline, "{what}: not within {limit:?}");
        m.poll(Duration::from_millis(5)).map_err(err)?;
    }
}

/// Dispatches for `d` (to let stray messages arrive).
pub fn serve_for(m: &mut Messenger, d: Duration) -> Check {
    let until = Instant::now() + d;
    while Instant::now() < until {
        m.poll(until.saturating_duration_since(Instant::now()))
            .map_err(err)?;
    }
    Ok(())
}

pub fn wait_ready(m: &mut Messenger, n: usize) -> Check {
    serve_until(m, Duration::from_secs(10), "every worker ready", |m| {
        worker(m)
            .peers()
            .iter()
            .filter(|p| p.state == WorkerState::Ready)
            .count()
            >= n
    })
}

/// Judges how a scenario cluster ended: the coordinator (instance 0,
/// generation 1) exited 0; every other worker ended by the shutdown or by a
/// planned SIGKILL (`planned(event)`).
pub fn check_exits(exits: &[shmcluster::Event], planned: impl Fn(&shmcluster::Event) -> bool) -> Check {
    use shmcluster::{EventKind, ExitReason};
    let mut problems = Vec::new();
    for e in exits {
        let EventKind::Exit(reason) = e.kind else { continue };
        let expected = if e.index == 0 && e.generation == 1 {
            reason == ExitReason::Exited(0)
        } else {
            reason == ExitReason::Shutdown || (reason == ExitReason::Signaled(libc::SIGKILL) && planned(e))
        };
        if !expected {
            problems.push(format!(
                "instance {} (slot {}, generation {}): {reason}",
                e.index, e.slot, e.generation
            ));
        }
    }
    ensure!(problems.is_empty(), "unexpected exits: {}", problems.join("; "));
    ensure!(
        exits.iter().any(|e| e.index == 0 && e.generation == 1),
        "the coordinator never exited: {exits:?}"
    );
    Ok(())
}
