//! Leader and followers in a 4-worker cluster: every worker campaigns; the
//! leader owns a pretend outside connection (an id counter) and serves
//! `invoke("next_id")`; followers call it and subscribe to a "config"
//! topic. Once every worker is ready and the leader is elected, the
//! lowest-numbered worker that does *not* lead (whichever worker won, so
//! the failover is shown on every run) publishes the config, SIGKILLs the
//! leader, sees a waiting candidate take over with a larger term, sends
//! the next invoke to it, and asks the master to shut the cluster down.
//!
//! ```sh
//! cargo run --release --example leader
//! ```
//!
//! Every line is printed by the process it is about, prefixed with its
//! slot. The SIGKILLed leader's respawn campaigns again once the new
//! leader is in place, and waits behind it.

use std::convert::Infallible;
use std::error::Error;
use std::io::Write;
use std::time::{Duration, Instant};

use shmcluster::{Cluster, EventKind, ExitReason, Messenger, Worker, WorkerState};

type Res<T> = Result<T, Box<dyn Error>>;

/// Prints one line, prefixed with the slot of the process printing it.
fn say(slot: u32, text: impl std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "[slot {slot}] {text}");
    let _ = out.flush();
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

/// Serves until `done` holds (or 5 s pass).
fn serve_until(m: &mut Messenger, mut done: impl FnMut(&Messenger) -> bool) -> Res<()> {
    let until = soon();
    while !done(m) {
        if Instant::now() >= until || m.worker().should_stop() {
            return Err("gave up waiting".into());
        }
        m.poll(Duration::from_millis(5))?;
    }
    Ok(())
}

/// Whether this worker runs the demonstration: the lowest-numbered
/// instance that does not lead, chosen by every first-generation worker
/// alike once all are ready and the leader is known (a respawn never
/// drives: it would start the demonstration again).
fn drives(m: &mut Messenger) -> Res<bool> {
    let w = m.worker();
    if w.generation() != 1 {
        return Ok(false);
    }
    if !w.wait_all_ready(Duration::from_secs(5)) {
        return Err("workers not ready".into());
    }
    serve_until(m, |m| m.leader().is_some())?;
    let leader = m.leader().ok_or("no leader")?;
    let w = m.worker();
    let driver = w
        .peers()
        .into_iter()
        .filter(|p| p.state == WorkerState::Ready && p.slot != leader.slot)
        .filter_map(|p| p.index.map(|index| (index, p.slot)))
        .min()
        .ok_or("no worker besides the leader")?;
    Ok(driver.1 == w.slot())
}

fn worker(worker: Worker) -> Res<()> {
    let (slot, respawn) = (worker.slot(), worker.generation() != 1);
    let mut m = Messenger::new(worker);

    // The leader's "connection": ids from a counter only the leader uses.
    // Every worker registers the handler; only the current leader's runs.
    let mut next = 1000 * u64::from(slot);
    m.on_invoke::<(), u64, Infallible, _>("next_id", move |ctx, ()| {
        next += 1;
        say(slot, format!("leader: id {next} for slot {}", ctx.sender().slot));
        Ok(next)
    })?;
    m.on_leader_change(move |c| {
        if c.is_me {
            say(slot, format!("I lead now (term {})", c.leader.term));
        }
    });
    // A respawn campaigns once a leader is in place, so that it queues
    // behind the new leader: when a leader dies the kernel wakes one
    // waiting candidate, and a fresh campaigner can take the free lock
    // before that candidate gets a CPU (once in about 100 runs under CI's
    // load, the killed leader's own respawn won the next term).
    if !respawn {
        m.campaign()?;
    }
    // The first workers are ready at once (the driver is chosen among
    // them); a respawn once it has caught up (subscribed, taken its ids),
    // so that the driver, which waits for every worker to be ready again
    // before it asks for the shutdown, never stops it half way.
    if !respawn {
        m.worker().ready();
    }
    if !drives(&mut m)? {
        // Followers (the leader among them): subscribe, take a few ids,
        // then serve.
        serve_until(&mut m, |m| m.leader().is_some())?;
        if respawn {
            m.campaign()?;
        }
        m.subscribe::<String, _>("config", soon(), move |_, v| {
            say(slot, format!("config is {v:?}"))
        })?;
        if !m.is_leader() {
            for _ in 0..2 {
                // Idempotent: if the driver kills the leader meanwhile,
                // the call goes to the next one instead of failing.
                let id: u64 = m.invoke_idempotent("next_id", &(), soon())?;
                say(slot, format!("got id {id}"));
            }
        }
        if respawn {
            m.worker().ready();
        }
        m.run()?;
        return Ok(());
    }

    // This worker runs the demonstration; it does not lead.
    m.publish("config", "v1", soon())?;
    std::thread::sleep(Duration::from_millis(200));
    m.poll(Duration::from_millis(50))?;
    let first = m.leader().ok_or("no leader")?;
    say(
        slot,
        format!("leader is slot {} (term {})", first.slot, first.term),
    );
    if first.slot == slot {
        return Err("the demonstration's driver leads: it would kill itself".into());
    }
    let peer = m.worker().peers().into_iter().find(|p| p.slot == first.slot);
    let pid = peer.ok_or("no leader process")?.pid;
    say(slot, format!("SIGKILL to the leader (pid {pid})"));
    // SAFETY: kill(2) takes a pid and a signal number, no pointers.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    serve_until(&mut m, |m| m.leader().is_some_and(|l| l.term > first.term))?;
    // A settled read names the new holder.
    std::thread::sleep(Duration::from_millis(5));
    let now = m.leader().ok_or("no leader")?;
    say(slot, format!("new leader: slot {} (term {})", now.slot, now.term));
    let id: u64 = m.invoke_idempotent("next_id", &(), soon())?;
    say(slot, format!("got id {id} from the leader"));
    m.publish("config", "v2", soon())?;
    serve_until(&mut m, |m| {
        m.worker()
            .peers()
            .iter()
            .filter(|p| p.state == WorkerState::Ready)
            .count()
            == 4
    })?;
    m.poll(Duration::from_millis(100))?;
    say(slot, "shutting down");
    m.worker().request_shutdown();
    m.run()?;
    Ok(())
}

fn main() -> Res<()> {
    let report = Cluster::builder()
        .workers(4)
        .on_event(|_, e| {
            if let EventKind::Exit(reason) = e.kind {
                if reason != ExitReason::Shutdown {
                    eprintln!("[master] slot {} (pid {}) exited: {reason}", e.slot, e.pid);
                }
            }
        })
        .run(worker)?;
    println!("[master] clean shutdown: {}", report.clean);
    std::process::exit(if report.clean { 0 } else { 1 });
}
