//! systemd's notify protocol, both ways.
//!
//! **Up, to the service manager** (when `NOTIFY_SOCKET` is set and
//! [`ClusterBuilder::systemd_notify`] is on): `READY=1` once every
//! instance has a ready worker; `RELOADING=1` with `MONOTONIC_USEC=` when
//! a rolling reload begins and `READY=1` when it ends; `STOPPING=1` when
//! the shutdown begins; a `STATUS=` line whenever it changes; `WATCHDOG=1`
//! every half `WATCHDOG_USEC` from the loop itself (so a stuck loop stops
//! it), if `WATCHDOG_PID` is unset or is the master's pid. Sends never
//! block; a failed one is logged once and is not fatal.
//!
//! In a binary upgrade (upgrade.rs) the old master is the service's main
//! process until the hand-over, where it says `MAINPID=<new>` and nothing
//! more. The new master sends nothing at all (no status, no watchdog, no
//! `STOPPING=1` if it fails) until it has said `ready` to the old master;
//! then `MAINPID=<self>` with its `READY=1` (or its `STOPPING=1`). If the
//! upgrade fails after that `ready`, the old master says `MAINPID=<self>`
//! again; not if the new master was asked to stop then (it said
//! `stopping` on its pipe): the new master stays the main process, and
//! both say `STOPPING=1`.
//!
//! **Down, from the workers** (spawn mode, when
//! [`ClusterBuilder::worker_notify`] is on): each worker started gets a
//! `NOTIFY_SOCKET` of its own, a datagram socket the master owns. A
//! datagram there from the worker's own pid (`SCM_CREDENTIALS`) counts:
//! `READY=1` makes it `Ready` (as `Worker::ready`), `WATCHDOG=1` beats its
//! heartbeat (as `Worker::heartbeat`), `STOPPING=1` marks it `Draining`.
//! A datagram from any other process is dropped.
//!
//! [`ClusterBuilder::systemd_notify`]: super::ClusterBuilder::systemd_notify
//! [`ClusterBuilder::worker_notify`]: super::ClusterBuilder::worker_notify

use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::sync::atomic::Ordering::*;
use std::time::{Duration, Instant};

use super::Master;
use crate::cluster::WorkerState;
use crate::sys::notify::{Notifier, NotifyMessage, NotifySocket};
use crate::sys::process as proc;

/// Datagrams read from one worker's socket per loop turn: a worker that
/// floods its socket cannot keep the master from its other work.
const MAX_PER_TURN: usize = 64;

/// Where the master is in systemd's view of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not every instance ready yet: nothing said.
    Starting,
    /// `READY=1` said.
    Running,
    /// `RELOADING=1` said: `READY=1` again when the reload ends.
    Reloading,
    /// `STOPPING=1` said: nothing more but the status.
    Stopping,
}

/// The master's half of the protocol: its own notifier, and each
/// worker's socket.
pub(super) struct Notify {
    up: Option<Up>,
    /// Offer workers a socket (spawn mode and the option on).
    offer: bool,
    /// Per slot: the socket offered to the slot's current worker.
    workers: Vec<Option<NotifySocket>>,
    /// The hang timeout, offered to workers as their `WATCHDOG_USEC`.
    worker_watchdog: Option<Duration>,
    /// A worker socket could not be made: said once.
    offer_warned: bool,
}

/// The master's messages to the service manager.
struct Up {
    to: Notifier,
    phase: Phase,
    status: String,
    watchdog: Option<(Duration, Instant)>,
    warned: bool,
    /// Started by a binary upgrade: `READY=1` comes with `MAINPID=` (this
    /// master replaces the service's main process).
    mainpid: Option<u32>,
}

/// What a spawned worker gets in its environment.
#[derive(Debug, Clone)]
pub(super) struct WorkerNotifyEnv {
    socket: String,
    watchdog_usec: Option<u64>,
}

impl WorkerNotifyEnv {
    /// `NOTIFY_SOCKET`, and with a hang timeout `WATCHDOG_USEC` and
    /// `WATCHDOG_PID` (the worker's own `pid`, so that `sd_watchdog_enabled`
    /// says yes to it and to no child of it).
    pub(super) fn vars(&self, pid: u32) -> Vec<(String, String)> {
        let mut v = vec![("NOTIFY_SOCKET".to_owned(), self.socket.clone())];
        if let Some(usec) = self.watchdog_usec {
            v.push(("WATCHDOG_USEC".to_owned(), usec.to_string()));
            v.push(("WATCHDOG_PID".to_owned(), pid.to_string()));
        }
        v
    }
}

/// Variables of the master's environment that belong to the master's own
/// service manager and never reach a worker.
pub(super) const MASTER_ONLY_VARS: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

impl Notify {
    /// From the master's environment: `up` if `speak` and `NOTIFY_SOCKET`
    /// is set; `offer` workers a socket each.
    pub(super) fn new(speak: bool, offer: bool, master_pid: u32, slots: u32, hang: Option<Duration>) -> Self {
        let up = if speak { Up::from_env(master_pid) } else { None };
        Self {
            up,
            offer,
            workers: (0..slots).map(|_| None).collect(),
            worker_watchdog: hang,
            offer_warned: false,
        }
    }

    /// A binary upgrade's new master: its `READY=1` says `MAINPID=` too
    /// (accepted from it with `NotifyAccess=all`; the old master says it
    /// as well at the hand-over, accepted with `NotifyAccess=main`).
    pub(super) fn announce_mainpid(&mut self, pid: u32) {
        if let Some(up) = self.up.as_mut() {
            up.mainpid = Some(pid);
        }
    }

    /// The old master at the hand-over: tells the service manager that
    /// `new` is the main process now, and says nothing more (no
    /// `STOPPING=1`: the service goes on).
    pub(super) fn hand_over(&mut self, new: u32) {
        if let Some(mut up) = self.up.take() {
            up.send(&format!("MAINPID={new}"));
        }
    }

    /// The old master when an upgrade fails after its new master said
    /// `ready` (and may have told the service manager `MAINPID=<new>`,
    /// accepted with `NotifyAccess=all`): the main process is this one
    /// again. Not when the new master said `stopping`: the service stops
    /// with it.
    pub(super) fn reclaim_mainpid(&mut self, own: u32) {
        if let Some(up) = self.up.as_mut() {
            up.send(&format!("MAINPID={own}"));
        }
    }

    /// When the loop must next wake for the watchdog.
    pub(super) fn wake_at(&self) -> Option<Instant> {
        self.up.as_ref()?.watchdog.map(|(_, at)| at)
    }

    /// Descriptors a child must not keep.
    pub(super) fn raw_fds(&self) -> Vec<RawFd> {
        use std::os::fd::AsRawFd;
        let mut fds: Vec<RawFd> = self.up.iter().map(|u| u.to.raw_fd()).collect();
        fds.extend(self.workers.iter().flatten().map(|s| s.as_fd().as_raw_fd()));
        fds
    }

    /// A fresh socket for the worker about to start in `slot` (the old
    /// one's, if any, is closed: nothing its predecessor sent counts), and
    /// the environment that names it; `None` if workers are not offered
    /// one or it cannot be made (said once; the worker starts without).
    pub(super) fn offer(&mut self, slot: u32) -> Option<WorkerNotifyEnv> {
        let entry = self.workers.get_mut(slot as usize)?;
        *entry = None;
        if !self.offer {
            return None;
        }
        match NotifySocket::bind() {
            Ok(socket) => {
                let env = WorkerNotifyEnv {
                    socket: socket.name().to_owned(),
                    watchdog_usec: self
                        .worker_watchdog
                        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)),
                };
                *entry = Some(socket);
                Some(env)
            }
            Err(e) => {
                if !std::mem::replace(&mut self.offer_warned, true) {
                    say!("shmcluster: cannot make a NOTIFY_SOCKET for workers ({e}); they start without one");
                }
                None
            }
        }
    }

    /// The slot's worker is gone (or never started): its socket closes.
    pub(super) fn forget(&mut self, slot: u32) {
        if let Some(entry) = self.workers.get_mut(slot as usize) {
            *entry = None;
        }
    }

    /// The worker sockets to poll, with their slots.
    pub(super) fn poll_fds(&self) -> Vec<(u32, BorrowedFd<'_>)> {
        self.workers
            .iter()
            .enumerate()
            .filter_map(|(slot, s)| s.as_ref().map(|s| (slot as u32, s.as_fd())))
            .collect()
    }
}

impl Up {
    fn from_env(master_pid: u32) -> Option<Self> {
        let value = std::env::var("NOTIFY_SOCKET").ok()?;
        let to = match Notifier::new(&value) {
            Ok(n) => n,
            Err(e) => {
                say!("shmcluster: not notifying the service manager: {e}");
                return None;
            }
        };
        let for_me = match std::env::var("WATCHDOG_PID") {
            Ok(pid) => pid.trim().parse::<u32>().ok() == Some(master_pid),
            Err(_) => true,
        };
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&usec| usec > 0 && for_me)
            .map(|usec| {
                let every = Duration::from_micros(usec / 2).max(Duration::from_millis(1));
                (every, Instant::now())
            });
        Some(Self {
            to,
            phase: Phase::Starting,
            status: String::new(),
            watchdog,
            warned: false,
            mainpid: None,
        })
    }

    fn send(&mut self, message: &str) {
        if let Err(e) = self.to.send(message) {
            if !std::mem::replace(&mut self.warned, true) {
                say!("shmcluster: cannot notify the service manager ({e}); carrying on without");
            }
        }
    }
}

impl Master<'_> {
    /// Once per loop turn: tells the service manager what changed (ready,
    /// reloading, stopping, the status line) and beats its watchdog.
    pub(super) fn notify_systemd(&mut self) {
        if self.notify.up.is_none() {
            return;
        }
        // A binary upgrade's new master sends nothing at all before it
        // said `ready` to its old master, the service's main process
        // until then: under `NotifyAccess=all` its `STOPPING=1` (a new
        // master that fails) would stop the whole service.
        if self.upgraded.as_ref().is_some_and(|u| !u.in_charge()) {
            return;
        }
        let instances = self.cluster.instances as usize;
        let (ready, live) = self.ready_instances();
        let all_ready = live > 0 && ready == live;
        let stopping = self.shutdown_deadline.is_some();
        let reloading = self.reloading();
        let status = format!(
            "{}{ready}/{instances} workers ready, {} restarts{}",
            if stopping {
                "stopping: "
            } else if reloading {
                "reloading: "
            } else {
                ""
            },
            self.restarts,
            match instances - live {
                0 => String::new(),
                n => format!(", {n} given up"),
            }
        );
        let Some(up) = self.notify.up.as_mut() else { return };
        let mut message = String::new();
        let next = match up.phase {
            Phase::Stopping => Phase::Stopping,
            _ if stopping => {
                // In charge but not announced yet: the main process is
                // this one.
                if let Some(pid) = up.mainpid.take() {
                    message.push_str(&format!("MAINPID={pid}\n"));
                }
                message.push_str("STOPPING=1\n");
                Phase::Stopping
            }
            Phase::Starting | Phase::Reloading if !reloading && all_ready => {
                if let Some(pid) = up.mainpid.take() {
                    message.push_str(&format!("MAINPID={pid}\n"));
                }
                message.push_str("READY=1\n");
                Phase::Running
            }
            Phase::Running if reloading => {
                let usec = proc::monotonic_ns() / 1000;
                message.push_str(&format!("RELOADING=1\nMONOTONIC_USEC={usec}\n"));
                Phase::Reloading
            }
            p => p,
        };
        // A binary upgrade's new master in charge says nothing before its
        // `MAINPID=` (with `READY=1`, or with `STOPPING=1`): a reload
        // right at the take-over defers it.
        if up.mainpid.is_some() && next == Phase::Starting {
            return;
        }
        up.phase = next;
        if status != up.status {
            message.push_str(&format!("STATUS={status}\n"));
            up.status = status;
        }
        if let Some((every, at)) = up.watchdog.as_mut() {
            let now = Instant::now();
            if now >= *at {
                message.push_str("WATCHDOG=1\n");
                *at = now + *every;
            }
        }
        if !message.is_empty() {
            up.send(message.trim_end());
        }
    }

    /// Reads the datagrams waiting on the sockets `ready` marks (in
    /// [`Notify::poll_fds`] order) and applies those from each slot's own
    /// worker.
    pub(super) fn serve_worker_notify(&mut self, ready: &[bool]) {
        let slots: Vec<u32> = self
            .notify
            .poll_fds()
            .into_iter()
            .zip(ready)
            .filter_map(|((slot, _), &r)| r.then_some(slot))
            .collect();
        for slot in slots {
            for _ in 0..MAX_PER_TURN {
                let Some(socket) = self.notify.workers.get(slot as usize).and_then(Option::as_ref) else {
                    break;
                };
                let datagram = match socket.recv() {
                    Ok(Some(d)) => d,
                    Ok(None) => break,
                    Err(e) => {
                        say!("shmcluster: worker slot {slot}'s NOTIFY_SOCKET failed ({e}); closing it");
                        self.notify.forget(slot);
                        break;
                    }
                };
                let rec = &self.slots[slot as usize];
                // Only the worker itself: not a child of it, not a process
                // that found the name in /proc/net/unix.
                if rec.pid.is_none() || datagram.pid != rec.pid {
                    continue;
                }
                self.apply_worker_notify(slot, NotifyMessage::parse(&datagram.data));
            }
        }
    }

    /// `READY=1`, `WATCHDOG=1`, `STOPPING=1` from the slot's worker, on the
    /// segment's worker entry as the worker's own calls would.
    fn apply_worker_notify(&mut self, slot: u32, m: NotifyMessage) {
        let generation = self.slots[slot as usize].generation;
        let entry = self.cluster.segment.worker_entry(slot);
        if entry.generation.load(Acquire) != generation {
            return;
        }
        if m.ready
            && entry
                .state
                .compare_exchange(
                    WorkerState::Starting.to_raw(),
                    WorkerState::Ready.to_raw(),
                    AcqRel,
                    Acquire,
                )
                .is_ok()
        {
            entry.ready_ns.store(proc::monotonic_ns(), Release);
        }
        if m.ready || m.watchdog {
            entry.heartbeat.fetch_add(1, Relaxed);
        }
        if m.stopping {
            for from in [WorkerState::Starting, WorkerState::Ready] {
                let _ = entry.state.compare_exchange(
                    from.to_raw(),
                    WorkerState::Draining.to_raw(),
                    AcqRel,
                    Acquire,
                );
            }
        }
    }
}

impl Master<'_> {
    /// Instances with a ready worker, and instances not given up.
    pub(super) fn ready_instances(&self) -> (usize, usize) {
        let instances = self.cluster.instances as usize;
        let (mut ready, mut live) = (0, 0);
        for &slot in &self.index_slot[..instances] {
            let rec = &self.slots[slot as usize];
            if rec.failed {
                continue;
            }
            live += 1;
            if rec.pid.is_some() && rec.ready {
                ready += 1;
            }
        }
        (ready, live)
    }
}
