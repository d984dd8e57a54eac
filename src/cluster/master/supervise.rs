//! The supervision loop: waiting in `poll(2)` for signals, workers'
//! requests and control clients; reaping; timers; lock-hold checks.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering::*;
use std::time::{Duration, Instant};

use super::{Master, ReloadScope};
use crate::cluster::control::ControlServer;
use crate::cluster::metrics::MetricsServer;
use crate::cluster::{Event, EventKind, ExitReason, WorkerState};
use crate::sys;
use crate::sys::process as proc;
use crate::sys::signal;

/// Longest the loop sleeps between looks at its timers.
const TICK: Duration = Duration::from_millis(100);

impl Master<'_> {
    pub(super) fn supervise(&mut self) -> io::Result<()> {
        // The bridge (if any) first, so that the host is linked to the
        // others by the time its workers are ready.
        let order = self.bridge_index().into_iter().chain(0..self.cluster.instances);
        for index in order {
            if let Err(e) = self.start_worker(index, index) {
                // Leave nothing running behind the error.
                for slot in 0..self.slots.len() as u32 {
                    if let Some(pid) = self.slots[slot as usize].pid {
                        let _ = proc::send_signal(pid, signal::SIGKILL);
                        let _ = proc::wait_for(pid);
                    }
                }
                return Err(e);
            }
        }
        loop {
            self.notify_systemd();
            self.wait_for_work()?;
            self.handle_signals()?;
            self.reap()?;
            self.observe_workers();
            self.step_upgrade();
            self.step_upgraded();
            if self.cluster.shutdown_asked.replace(false) {
                self.begin_shutdown();
            }
            let shutdowns = self.cluster.segment.control().shutdown_requests.load(Acquire);
            if shutdowns != self.shutdown_requests_seen {
                self.shutdown_requests_seen = shutdowns;
                self.begin_shutdown();
            }
            let asked = self.cluster.reload_asked.replace(0);
            let requests = self.cluster.segment.control().reload_requests.load(Acquire);
            if requests != self.reload_requests_seen {
                self.reload_requests_seen = requests;
                self.reload_queue.push_back(ReloadScope::All);
            }
            if asked > 0 {
                self.reload_queue.push_back(ReloadScope::All);
            }
            for index in self.cluster.reload_instances_asked.take() {
                if !self.reload_queue.contains(&ReloadScope::Instance(index)) {
                    self.reload_queue.push_back(ReloadScope::Instance(index));
                }
            }
            if let Some(deadline) = self.shutdown_deadline {
                if self.slots.iter().all(|s| s.pid.is_none()) && self.abandoned.is_none() {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    self.kill_remaining();
                }
                continue;
            }
            self.run_timers()?;
            self.check_locks();
            self.step_reload()?;
            if self.upgrade_queued && !self.reloading() {
                self.upgrade_queued = false;
                if let Err(reason) = self.begin_upgrade() {
                    say!("shmcluster: cannot upgrade: {reason}");
                }
            }
        }
    }

    /// Sleeps in `poll(2)` until a signal, a worker's request, or the next
    /// timer; serves the requests.
    fn wait_for_work(&mut self) -> io::Result<()> {
        let now = Instant::now();
        let mut next = now + TICK;
        for s in &self.slots {
            for t in [s.restart_at, s.kill_at].into_iter().flatten() {
                next = next.min(t);
            }
        }
        if let Some(d) = self.shutdown_deadline {
            next = next.min(d);
        }
        if let Some(t) = self.control.as_ref().and_then(ControlServer::wake_at) {
            next = next.min(t);
        }
        if let Some(t) = self.notify.wake_at() {
            next = next.min(t);
        }
        if let Some(t) = self.metrics.as_ref().and_then(MetricsServer::wake_at) {
            next = next.min(t);
        }
        if let Some(t) = self.upgrade_wake_at() {
            next = next.min(t);
        }
        // A new master polls for its old one's end (`step_upgraded`).
        let mut upgrade_asks = Vec::new();
        let with_control: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].control.is_some())
            .collect();
        let (ready, control_at) = {
            let mut fds: Vec<BorrowedFd<'_>> = vec![self.signals.fd()];
            fds.extend(
                with_control
                    .iter()
                    .filter_map(|&i| self.slots[i].control.as_ref().map(|c| c.as_fd())),
            );
            fds.extend(self.notify.poll_fds().into_iter().map(|(_, fd)| fd));
            let control_at = fds.len();
            let control_accepting = self.control.as_ref().is_some_and(ControlServer::accepting);
            if let Some(c) = &self.control {
                fds.extend(c.poll_fds());
            }
            let metrics_at = fds.len();
            let metrics_accepting = self.metrics.as_ref().is_some_and(MetricsServer::accepting);
            if let Some(m) = &self.metrics {
                fds.extend(m.poll_fds());
            }
            // The new master's pipe, if an upgrade runs (read in
            // `step_upgrade`, every turn).
            if let Some(fd) = self.upgrade.as_ref().and_then(|r| r.fd()) {
                fds.push(fd);
            }
            let ready = sys::fd::poll_readable(&fds, Some(next.saturating_duration_since(now)))?;
            if let Some(c) = self.control.as_mut() {
                // Never waits: non-blocking sockets, bounded requests.
                let listener_ready = control_accepting && ready.get(control_at).copied().unwrap_or(false);
                for (conn, request) in c.serve(listener_ready) {
                    if request == crate::cluster::control::ControlRequest::Upgrade {
                        upgrade_asks.push(conn);
                    } else {
                        c.answer(conn, &self.cluster.execute(request));
                    }
                }
            }
            if let Some(m) = self.metrics.as_mut() {
                // Never waits either (see `metrics/`).
                let cluster = &self.cluster;
                let listener_ready = metrics_accepting && ready.get(metrics_at).copied().unwrap_or(false);
                m.serve(listener_ready, || {
                    let segment = &cluster.segment;
                    let bridge_hosts = crate::cluster::bridge_index(segment)
                        .map(|_| segment.control().bridge_hosts.load(Relaxed));
                    (cluster.stats(), bridge_hosts)
                });
            }
            (ready, control_at)
        };
        for conn in upgrade_asks {
            let answer = self.upgrade_request();
            if let Some(c) = self.control.as_mut() {
                c.answer(conn, &answer);
            }
        }
        // Workers' sd_notify datagrams: before `observe_workers`, which
        // then sees a `READY=1` as it sees a `Worker::ready`.
        let notified = ready[1 + with_control.len()..control_at].to_vec();
        self.serve_worker_notify(&notified);
        for (k, &slot) in with_control.iter().enumerate() {
            if !ready[k + 1] {
                continue;
            }
            let open = match &self.slots[slot].control {
                Some(c) => self.cluster.listeners.borrow_mut().serve_request(c.as_fd()),
                None => Ok(true),
            };
            if !matches!(open, Ok(true)) {
                // The worker closed its end (or the socket broke).
                self.slots[slot].control = None;
            }
        }
        Ok(())
    }

    fn handle_signals(&mut self) -> io::Result<()> {
        while let Some(sig) = self.signals.next()? {
            match sig {
                signal::SIGTERM | signal::SIGINT => self.begin_shutdown(),
                signal::SIGHUP => self.reload_queue.push_back(ReloadScope::All),
                signal::SIGUSR2 if self.reloading() => {
                    self.upgrade_queued = true;
                }
                signal::SIGUSR2 => {
                    if let Err(reason) = self.begin_upgrade() {
                        say!("shmcluster: cannot upgrade: {reason}");
                    }
                }
                // SIGCHLD: reaped below; SIGUSR1: observed below.
                _ => {}
            }
        }
        Ok(())
    }

    pub(super) fn reap(&mut self) -> io::Result<()> {
        while let Some((pid, status)) = proc::reap_any()? {
            if let Some(slot) = self.slots.iter().position(|s| s.pid == Some(pid)) {
                self.worker_exited(slot as u32, status);
            } else {
                self.reaped_other(pid, status);
            }
        }
        Ok(())
    }

    /// Publishes an event into the segment and calls the callback.
    pub(super) fn publish(&mut self, kind: EventKind, slot: u32) {
        let (index, pid, generation) = match self.slots.get(slot as usize) {
            Some(s) => (s.index.unwrap_or(u32::MAX), s.pid.unwrap_or(0), s.generation),
            None => (u32::MAX, 0, 0),
        };
        let mut event = Event {
            seq: 0,
            kind,
            slot,
            index,
            pid,
            generation,
        };
        event.seq = self.cluster.segment.control().publish(event.to_raw());
        if let Some(c) = self.control.as_mut() {
            c.observe(&event);
        }
        if let Some(m) = self.metrics.as_mut() {
            m.observe(&event);
        }
        if let Some(cb) = self.on_event.as_mut() {
            cb(&self.cluster, &event);
        }
    }

    /// Notices workers that declared themselves ready, and heartbeats.
    pub(super) fn observe_workers(&mut self) {
        let segment = self.cluster.segment.clone();
        let now = Instant::now();
        for slot in 0..self.slots.len() as u32 {
            let entry = segment.worker_entry(slot);
            let rec = &mut self.slots[slot as usize];
            if rec.pid.is_none() {
                continue;
            }
            let beat = entry.heartbeat.load(Relaxed);
            if beat != rec.beat || rec.beat_seen.is_none() {
                rec.beat = beat;
                rec.beat_seen = Some(now);
                entry.heartbeat_seen_ns.store(proc::monotonic_ns(), Relaxed);
            }
            if !rec.ready
                && entry.state.load(Acquire) == WorkerState::Ready.to_raw()
                && entry.generation.load(Acquire) == rec.generation
            {
                rec.ready = true;
                rec.unready_deaths = 0;
                rec.unready_since = None;
                rec.beat_seen = Some(now);
                self.publish(EventKind::Online, slot);
                continue;
            }
            let rec = &mut self.slots[slot as usize];
            if let (Some(hang), Some(seen), true, None) =
                (self.opts.hang_timeout, rec.beat_seen, rec.ready, rec.ending)
            {
                if now.duration_since(seen) > hang {
                    rec.ending = Some(ExitReason::Hung);
                    say!("shmcluster: worker slot {slot} heartbeat stopped for {hang:?}; killing it");
                    self.kill(slot);
                }
            }
        }
    }

    /// Sends the slot's worker `SIGKILL` and counts it, once per worker.
    pub(super) fn kill(&mut self, slot: u32) {
        let rec = &mut self.slots[slot as usize];
        if let (Some(pid), false) = (rec.pid, rec.sigkilled) {
            rec.sigkilled = true;
            self.killed += 1;
            let _ = proc::send_signal(pid, signal::SIGKILL);
        }
    }

    fn run_timers(&mut self) -> io::Result<()> {
        let now = Instant::now();
        for slot in 0..self.slots.len() as u32 {
            let rec = &self.slots[slot as usize];
            if rec.kill_at.is_some_and(|t| now >= t) && rec.pid.is_some() {
                self.slots[slot as usize].kill_at = None;
                say!("shmcluster: worker slot {slot} missed its drain deadline; killing it");
                self.kill(slot);
            }
            let rec = &self.slots[slot as usize];
            if rec.restart_at.is_some_and(|t| now >= t) && rec.pid.is_none() {
                if let Some(index) = rec.index {
                    self.restarts += 1;
                    let entry = self.cluster.segment.worker_entry(slot);
                    entry.restarts.fetch_add(1, AcqRel);
                    if let Err(e) = self.start_worker(slot, index) {
                        // Out of processes or descriptors: try again later
                        // rather than bringing the whole cluster down.
                        say!("shmcluster: cannot restart worker {index} in slot {slot}: {e}; retrying");
                        self.start_failed(slot, &e);
                        self.slots[slot as usize].restart_at =
                            Some(now + self.opts.backoff_initial.max(Duration::from_millis(100)));
                    }
                }
            }
        }
        Ok(())
    }

    /// Reports (and, if configured, kills) workers holding a lock past the
    /// hold limit.
    fn check_locks(&mut self) {
        let segment = self.cluster.segment.clone();
        let now = proc::monotonic_ns();
        for i in 1..segment.layout().lock_slots {
            let e = segment.lock_entry(i);
            let pid = e.holder_pid.load(Acquire);
            let token = e.token.load(Acquire);
            if pid == 0 {
                continue;
            }
            // Holders do not read the clock (too slow for a lock's fast
            // path): the master times each acquisition from when it first
            // sees its token.
            if e.hold_seen_token.load(Acquire) != token {
                e.hold_since_ns.store(now, Release);
                e.hold_seen_token.store(token, Release);
                continue;
            }
            let Some((limit, kill)) = self.opts.lock_hold_limit else {
                continue;
            };
            let since = e.hold_since_ns.load(Acquire);
            if Duration::from_nanos(now.saturating_sub(since)) <= limit {
                continue;
            }
            if self.lock_reported.get(i as usize) == Some(&token) {
                continue;
            }
            if let Some(r) = self.lock_reported.get_mut(i as usize) {
                *r = token;
            }
            let slot = self
                .slots
                .iter()
                .position(|s| s.pid == Some(pid))
                .map(|s| s as u32);
            say!(
                "shmcluster: process {pid} (slot {slot:?}) has held lock entry {i} for over {limit:?}{}",
                if kill { "; killing it" } else { "" }
            );
            self.publish(EventKind::LockHeldTooLong { lock: i }, slot.unwrap_or(u32::MAX));
            if let (true, Some(slot)) = (kill, slot) {
                if self.slots[slot as usize].ending.is_none() {
                    self.slots[slot as usize].ending = Some(ExitReason::LockHeld);
                }
                self.kill(slot);
            }
        }
    }
}
