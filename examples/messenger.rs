//! A cluster whose workers talk through the messenger: broadcast, consume,
//! map and request, driven from worker 0, then a clean shutdown.
//!
//! ```sh
//! cargo run --release --example messenger                 # 4 workers
//! cargo run --release --example messenger -- --workers 8
//! ```
//!
//! Every worker registers the same handlers, declares itself ready and
//! serves until the master tells it to stop. Worker 0 (instance 0) also
//! waits until every worker is ready, runs the demonstration, and exits 0;
//! the master's event callback sees that exit and shuts the cluster down.
//! Every line is printed by the process it is about, prefixed with its slot.

use std::convert::Infallible;
use std::error::Error;
use std::io::Write;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shmcluster::{Cluster, EventKind, ExitReason, Messenger, Worker, WorkerState};

/// What each worker answers to the `status` map.
#[derive(Debug, Serialize, Deserialize)]
struct Status {
    /// The worker's process id.
    pid: u32,
    /// `resize` tasks it has run.
    tasks_done: u32,
}

/// A worker's result: `Cluster::run` prints the error and exits 1.
type Res<T> = Result<T, Box<dyn Error>>;

/// Prints one line, prefixed with the slot of the process printing it.
fn say(slot: u32, text: impl std::fmt::Display) {
    // One `write` per line: lines from several processes do not mix.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "[slot {slot}] {text}");
    let _ = out.flush();
}

/// A deadline for one blocking call.
fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

/// Every worker: handlers, `ready()`, then serve (or, for instance 0,
/// demonstrate).
fn worker(worker: Worker) -> Res<()> {
    let slot = worker.slot();
    let demo = worker.index() == 0;
    let mut m = Messenger::new(worker);

    // Events: every `on` handler for the event runs, no answer.
    m.on::<String, _>("greeting", move |ctx, text| {
        say(
            slot,
            format!("broadcast from slot {}: {text:?}", ctx.sender().slot),
        );
    })?;
    // A task for `consume`: it runs on exactly one worker, and the caller
    // waits until it has finished.
    let done = Arc::new(AtomicU32::new(0));
    let counter = done.clone();
    m.on::<String, _>("resize", move |_, image| {
        counter.fetch_add(1, Relaxed);
        say(slot, format!("resizing {image}"));
    })?;
    // Requests: the first handler's value (or error) goes back.
    m.on_request::<(), Status, Infallible, _>("status", move |_, ()| {
        Ok(Status {
            pid: std::process::id(),
            tasks_done: done.load(Relaxed),
        })
    })?;
    m.on_request::<u64, u64, String, _>("square", |_, x| {
        x.checked_mul(x).ok_or_else(|| format!("{x}² overflows a u64"))
    })?;
    // A no-op: a `map` over it is a barrier (lanes are FIFO per sender).
    m.on::<(), _>("sync", |_, ()| {})?;

    m.worker().ready();
    if demo {
        demonstrate(&mut m)?;
        say(slot, "done; asking the master to shut the cluster down");
        m.worker().request_shutdown();
    }
    m.run()?;
    say(slot, "told to stop");
    Ok(())
}

/// Instance 0's part: broadcast, consume, map and request.
fn demonstrate(m: &mut Messenger) -> Res<()> {
    let me = m.slot();
    let other = await_ready(m)?;

    say(me, "--- broadcast: every worker, this one included");
    let reached = m.broadcast("greeting", &format!("hello from slot {me}"))?;
    // `broadcast` does not wait; this `map` returns once every worker has
    // handled everything sent to it before (our own copy included).
    m.map::<(), ()>("sync", &(), soon())?;
    say(me, format!("the greeting reached {reached} workers"));

    say(me, "--- consume: each task on one worker, the least loaded");
    for image in ["cat.png", "dog.png", "owl.png", "fox.png", "elk.png", "yak.png"] {
        let done = m.consume("resize", &image, soon())?;
        say(me, format!("{image} was resized by slot {}", done.worker.slot));
    }

    say(me, "--- map: one answer per worker");
    for (who, answer) in m.map::<(), Status>("status", &(), soon())? {
        match answer {
            Ok(s) => say(
                me,
                format!("slot {}: pid {}, {} tasks done", who.slot, s.pid, s.tasks_done),
            ),
            Err(e) => say(me, format!("slot {}: {e}", who.slot)),
        }
    }

    say(me, format!("--- request: ask slot {other}"));
    let x: u64 = m.request(other, "square", &12u64, soon())?;
    say(me, format!("slot {other} says 12² = {x}"));
    // A handler's error comes back as a value, not a crash.
    if let Err(e) = m.request::<u64, u64>(other, "square", &u64::MAX, soon()) {
        say(me, format!("slot {other} refuses: {e}"));
    }
    Ok(())
}

/// Serves until every worker has declared itself ready (messages to a
/// worker still starting would wait in its lanes, but one not yet forked
/// is not live, so a broadcast would miss it); returns the slot of
/// another worker.
fn await_ready(m: &mut Messenger) -> Res<u32> {
    let deadline = soon();
    loop {
        let peers = m.worker().peers();
        let instances = m.worker().instances() as usize;
        let ready: Vec<u32> = peers
            .iter()
            .filter(|p| p.state == WorkerState::Ready)
            .map(|p| p.slot)
            .collect();
        if ready.len() == instances {
            let me = m.slot();
            return Ok(ready.into_iter().find(|&s| s != me).unwrap_or(me));
        }
        if Instant::now() >= deadline {
            return Err(format!("{} of {instances} workers ready", ready.len()).into());
        }
        m.poll(Duration::from_millis(1))?;
    }
}

fn main() {
    let mut workers = 4;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next().map(|v| v.parse::<u32>())) {
            ("--workers" | "-w", Some(Ok(n))) if n >= 2 => workers = n,
            _ => {
                eprintln!("usage: messenger [--workers N]   (N ≥ 2, default 4)");
                std::process::exit(2);
            }
        }
    }
    // Instance 0 asks for the shutdown when it is done; a worker that ends
    // any other way is a failure (and stops the demonstration).
    let failed = Rc::new(std::cell::Cell::new(false));
    let failure = failed.clone();
    let report = Cluster::builder()
        .workers(workers)
        .on_event(move |cluster, event| match event.kind {
            EventKind::Exit(ExitReason::Shutdown) => {}
            EventKind::Exit(reason) => {
                eprintln!("worker {} (slot {}) {reason}", event.index, event.slot);
                failure.set(true);
                cluster.shutdown();
            }
            _ => {}
        })
        .run(worker);
    match report {
        Ok(report) if report.clean && !failed.get() => {
            // Not `println!`: a closed pipe (`| head`) is no reason to panic.
            let _ = writeln!(std::io::stdout(), "[master] cluster stopped cleanly");
        }
        Ok(report) => {
            eprintln!("[master] cluster failed: {report:?}");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("[master] {e}");
            std::process::exit(1);
        }
    }
}
