//! A worker's end (restart, backoff, crash loop) and the cluster's
//! graceful shutdown (who was healthy, the grace deadline).

use std::sync::atomic::Ordering::*;
use std::time::{Duration, Instant};

use super::{Master, ReloadRun, Step, Unhealthy};
use crate::cluster::{EventKind, ExitReason, WorkerState};
use crate::segment::table::STOP_SHUTDOWN;
use crate::sys::process as proc;
use crate::sys::signal;
use crate::sys::{self, ExitStatus};

impl Master<'_> {
    pub(super) fn worker_exited(&mut self, slot: u32, status: ExitStatus) {
        let shutting_down = self.shutdown_deadline.is_some();
        let segment = self.cluster.segment.clone();
        let entry = segment.worker_entry(slot);
        let rec = &mut self.slots[slot as usize];
        let generation = rec.generation;
        // Killed on purpose (hang, lock hold limit, reload, not ready): its
        // end is accounted for by that decision, not by the shutdown.
        let intentional = rec.ending.is_some();
        let reason = match rec.ending.take() {
            Some(r) => r,
            None if shutting_down => Shutdown,
            None => match status {
                ExitStatus::Code(c) => ExitReason::Exited(c),
                ExitStatus::Signal(s) => ExitReason::Signaled(s),
            },
        };
        use ExitReason::Shutdown;
        // A spawned program that did not catch our SIGTERM (or a terminal's
        // SIGINT) ended the way it was asked to: that is clean too.
        if shutting_down
            && !intentional
            && !matches!(
                status,
                ExitStatus::Code(0)
                    | ExitStatus::Signal(signal::SIGTERM)
                    | ExitStatus::Signal(signal::SIGINT)
            )
        {
            if let Some(index) = self.slots[slot as usize].index {
                let reason = match status {
                    ExitStatus::Code(c) => ExitReason::Exited(c),
                    ExitStatus::Signal(s) => ExitReason::Signaled(s),
                };
                self.unhealthy.push(Unhealthy::Ended { index, reason });
            }
        }
        let (kind, value) = reason.to_raw();
        entry.last_exit_kind.store(kind, Release);
        entry.last_exit_value.store(value, Release);
        entry.state.store(WorkerState::Dead.to_raw(), Release);
        entry.pid.store(0, Release);
        segment.reset_dead_slot(slot, generation);
        let rec = &mut self.slots[slot as usize];
        // A crash: a non-zero exit, or a signal the master did not send.
        let crashed =
            matches!(reason, ExitReason::Exited(c) if c != 0) || matches!(reason, ExitReason::Signaled(_));
        if !shutting_down && !intentional && crashed && !rec.ready {
            rec.unready_deaths = rec.unready_deaths.saturating_add(1);
        }
        rec.control = None;
        rec.kill_at = None;
        self.notify.forget(slot);
        let rec = &mut self.slots[slot as usize];
        let was_replacement = rec.replacement;
        rec.replacement = false;
        self.publish(EventKind::Exit(reason), slot);
        let rec = &mut self.slots[slot as usize];
        rec.pid = None;
        rec.sigkilled = false;
        if shutting_down {
            return;
        }
        // Part of a reload?
        let mut free = false;
        match &mut self.reload {
            Some(ReloadRun {
                step: Some(Step::WaitReady { old, new, .. }),
                ..
            }) if *new == slot || *old == slot => {
                // The replacement died before it was ready: keep the old
                // worker; or the old one died meanwhile: its slot is free.
                free = true;
                if *new == slot {
                    self.finish_reload(false);
                }
            }
            Some(ReloadRun {
                step: Some(Step::Drain { old }),
                ..
            }) if *old == slot => free = true,
            _ => {}
        }
        if was_replacement || matches!(reason, ExitReason::Reloaded | ExitReason::NotReady) {
            free = true;
        }
        if free {
            let rec = &mut self.slots[slot as usize];
            rec.index = None;
            // A spare again: its history is no instance's.
            rec.unready_since = None;
            rec.unready_deaths = 0;
            entry.index.store(u32::MAX, Release);
            entry.state.store(WorkerState::Free.to_raw(), Release);
            return;
        }
        // Respawn, with backoff, unless it is crash-looping.
        let now = Instant::now();
        let rec = &mut self.slots[slot as usize];
        rec.deaths.push_back(now);
        while rec
            .deaths
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.opts.restart_window)
        {
            rec.deaths.pop_front();
        }
        let deaths = rec.deaths.len();
        if deaths > self.opts.max_restarts {
            rec.failed = true;
            entry.state.store(WorkerState::Failed.to_raw(), Release);
            self.failed.push(slot);
            say!(
                "shmcluster: worker slot {slot} died {deaths} times within {:?}; not restarting it",
                self.opts.restart_window
            );
            // Its SO_REUSEPORT sockets would keep taking their share of the
            // connections for no one: the others take them instead (before
            // anyone hears of the crash loop).
            if let Some(index) = self.slots[slot as usize].index {
                let retired = self
                    .cluster
                    .listeners
                    .borrow()
                    .retire_instance(index, self.cluster.instances);
                if let Err(e) = retired {
                    say!("shmcluster: worker slot {slot}: cannot stop its own listening socket: {e}");
                }
            }
            self.publish(EventKind::CrashLoop, slot);
            // The application's instances: a bridge alone is nothing to
            // supervise, and a given-up bridge leaves the instances be.
            let instances = self.cluster.instances as usize;
            let all_failed = self.index_slot[..instances]
                .iter()
                .all(|&s| self.slots[s as usize].failed);
            if all_failed && !self.gave_up {
                say!(
                    "shmcluster: every worker slot was given up after crash loops; nothing is left to \
                     supervise: the master stops"
                );
                self.gave_up = true;
                self.begin_shutdown();
            }
            return;
        }
        let delay = if deaths <= 1 {
            Duration::ZERO
        } else {
            let factor = 1u32 << (deaths - 2).min(20);
            self.opts
                .backoff_initial
                .saturating_mul(factor)
                .min(self.opts.backoff_max)
        };
        self.slots[slot as usize].restart_at = Some(now + delay);
    }

    pub(super) fn begin_shutdown(&mut self) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        // A new master not ready yet is killed: the cluster stops.
        self.abandon_upgrade();
        // In a new master in charge: an old master still there stops too.
        self.tell_old_master_stopping();
        if !self.gave_up {
            self.judge_health();
        }
        let control = self.cluster.segment.control();
        control.shutdown.store(1, Release);
        sys::futex_wake(&control.shutdown, u32::MAX);
        self.publish(EventKind::ShutdownStarted, u32::MAX);
        if self.reload.is_some() {
            self.finish_reload(false);
        }
        self.reload_queue.clear();
        let segment = self.cluster.segment.clone();
        for slot in 0..self.slots.len() as u32 {
            let rec = &mut self.slots[slot as usize];
            rec.restart_at = None;
            if let Some(pid) = rec.pid {
                let entry = segment.worker_entry(slot);
                entry.stop.store(STOP_SHUTDOWN, Release);
                entry.state.store(WorkerState::Draining.to_raw(), Release);
                sys::futex_wake(&entry.stop, u32::MAX);
                let _ = proc::send_signal(pid, signal::SIGTERM);
            }
        }
        self.shutdown_deadline = Some(Instant::now() + self.opts.grace);
    }

    /// As a shutdown begins: records every instance whose worker is not
    /// healthy, so that stopping a cluster that never worked is not
    /// reported clean. Unhealthy: a slot making no progress — its last
    /// worker crashed before it was ever ready and none has been ready
    /// since (dead and waiting for its restart, or restarted and not ready
    /// yet); or no ready worker for longer than the ready timeout. A worker
    /// started a moment ago (the first one, or the successor of one that
    /// had been ready, such as a ready worker killed from outside) has had
    /// no chance to be ready and is not judged; a slot whose workers become
    /// ready and then crash again and again is the crash-loop limit's to
    /// give up (which makes the shutdown unclean); one the master is
    /// killing on purpose (hung, holding a lock) is accounted for by that
    /// decision.
    fn judge_health(&mut self) {
        // A worker that declared itself ready since the last look counts.
        self.observe_workers();
        let now = Instant::now();
        for rec in &self.slots {
            let Some(index) = rec.index else { continue };
            // A given-up slot is in `failed`; a reload replacement not yet
            // ready is not the instance's worker (the old one still is),
            // and a worker being replaced by a reload has a ready successor.
            if rec.failed || rec.replacement || rec.ending.is_some() {
                continue;
            }
            let never_ready = rec
                .unready_since
                .is_some_and(|t| now.duration_since(t) > self.opts.ready_timeout);
            let problem = match rec.pid {
                None if rec.unready_deaths > 0 => Unhealthy::Crashing { index },
                Some(_) if rec.ready => continue,
                Some(_) if rec.unready_deaths > 0 => Unhealthy::Crashing { index },
                _ if never_ready => Unhealthy::NeverReady { index },
                _ => continue,
            };
            self.unhealthy.push(problem);
        }
    }

    /// At the grace deadline: kills every worker still running, once, and
    /// reports it once. A worker the master already killed (hung, holding
    /// a lock, not ready) is accounted for by that decision and only
    /// awaits its reap; a killed worker's end is marked as the master's
    /// (`ending`) so that its reap does not report it again as "killed by
    /// signal 9".
    pub(super) fn kill_remaining(&mut self) {
        if let Some(a) = self.abandoned.as_mut().filter(|a| !a.killed) {
            a.killed = true;
            let pid = a.pid;
            say!("shmcluster: upgrade: the new master pid {pid} did not exit within the grace period; killing it");
            // Its workers die with it (PR_SET_PDEATHSIG).
            let _ = proc::send_signal(pid, signal::SIGKILL);
            self.unhealthy.push(Unhealthy::NewMasterKilledAtDeadline { pid });
        }
        for slot in 0..self.slots.len() as u32 {
            let rec = &mut self.slots[slot as usize];
            if rec.pid.is_some() && !rec.sigkilled {
                say!("shmcluster: worker slot {slot} did not exit within the grace period; killing it");
                rec.ending.get_or_insert(ExitReason::Shutdown);
                if let Some(index) = rec.index {
                    self.unhealthy.push(Unhealthy::KilledAtDeadline { index });
                }
                self.kill(slot);
            }
        }
    }
}
