//! The rolling reload: each instance's replacement started in the spare
//! slot, waited for until ready, then the old worker drained. The host's
//! NATS bridge is not an instance and is left running.

use std::io;
use std::sync::atomic::Ordering::*;
use std::time::Instant;

use super::{Master, ReloadRun, ReloadScope, Step};
use crate::cluster::{EventKind, ExitReason, WorkerState};
use crate::segment::table::STOP_DRAIN;
use crate::sys;
use crate::sys::process as proc;
use crate::sys::signal;

impl Master<'_> {
    pub(super) fn finish_reload(&mut self, ok: bool) {
        if self.reload.take().is_some() {
            self.publish(EventKind::ReloadFinished { ok }, u32::MAX);
        }
    }

    /// Advances the rolling reload by as many steps as are ready.
    pub(super) fn step_reload(&mut self) -> io::Result<()> {
        loop {
            if self.reload.is_none() {
                let Some(scope) = self.reload_queue.pop_front() else {
                    return Ok(());
                };
                // The application's instances only: the host's NATS
                // bridge (index `instances`) is never replaced by a
                // reload, which would cut the host off from the others.
                let wanted = match scope {
                    ReloadScope::All => 0..self.cluster.instances,
                    ReloadScope::Instance(i) => i..i.saturating_add(1).min(self.cluster.instances),
                };
                let order: Vec<u32> = wanted
                    .filter(|&i| !self.slots[self.index_slot[i as usize] as usize].failed)
                    .collect();
                let given_up = order.is_empty().then_some(scope);
                self.reload = Some(ReloadRun {
                    order,
                    pos: 0,
                    step: None,
                });
                self.publish(EventKind::ReloadStarted, u32::MAX);
                // (Every instance given up: the loop below finishes the
                // reload as done, as it always did.)
                if let Some(ReloadScope::Instance(i)) = given_up {
                    say!("shmcluster: worker {i} was given up after a crash loop; not reloading it");
                    self.finish_reload(false);
                    continue;
                }
            }
            let now = Instant::now();
            let Some(run) = self.reload.as_mut() else {
                return Ok(());
            };
            match run.step {
                None => {
                    let Some(&index) = run.order.get(run.pos) else {
                        self.finish_reload(true);
                        continue;
                    };
                    let old = self.index_slot[index as usize];
                    let spare = (0..self.slots.len() as u32).find(|&s| {
                        let r = &self.slots[s as usize];
                        r.pid.is_none() && r.index.is_none() && r.restart_at.is_none()
                    });
                    let Some(new) = spare else {
                        say!("shmcluster: no spare slot for a reload; skipping it");
                        self.finish_reload(false);
                        return Ok(());
                    };
                    if let Err(e) = self.start_worker(new, index) {
                        say!("shmcluster: cannot start a reload replacement for worker {index}: {e}");
                        self.start_failed(new, &e);
                        let rec = &mut self.slots[new as usize];
                        rec.index = None;
                        self.cluster
                            .segment
                            .worker_entry(new)
                            .index
                            .store(u32::MAX, Release);
                        self.cluster
                            .segment
                            .worker_entry(new)
                            .state
                            .store(WorkerState::Free.to_raw(), Release);
                        self.finish_reload(false);
                        return Ok(());
                    }
                    self.slots[new as usize].replacement = true;
                    if let Some(run) = self.reload.as_mut() {
                        run.step = Some(Step::WaitReady {
                            index,
                            old,
                            new,
                            deadline: now + self.opts.ready_timeout,
                        });
                    }
                    return Ok(());
                }
                Some(Step::WaitReady {
                    index,
                    old,
                    new,
                    deadline,
                }) => {
                    if self.slots[new as usize].ready {
                        self.slots[new as usize].replacement = false;
                        self.index_slot[index as usize] = new;
                        let old_pid = self.slots[old as usize].pid;
                        let run = self.reload.as_mut().expect("reload is running");
                        if let Some(pid) = old_pid {
                            let entry = self.cluster.segment.worker_entry(old);
                            entry.stop.store(STOP_DRAIN, Release);
                            entry.state.store(WorkerState::Draining.to_raw(), Release);
                            sys::futex_wake(&entry.stop, u32::MAX);
                            let _ = proc::send_signal(pid, signal::SIGTERM);
                            let rec = &mut self.slots[old as usize];
                            rec.ending = Some(ExitReason::Reloaded);
                            rec.kill_at = Some(now + self.opts.drain_timeout);
                            run.step = Some(Step::Drain { old });
                        } else {
                            run.step = None;
                            run.pos += 1;
                        }
                        continue;
                    }
                    if now >= deadline && self.slots[new as usize].ending.is_none() {
                        say!("shmcluster: reload replacement for worker {index} not ready in time; keeping the old one");
                        self.slots[new as usize].ending = Some(ExitReason::NotReady);
                        self.kill(new);
                    }
                    return Ok(());
                }
                Some(Step::Drain { old }) => {
                    if self.slots[old as usize].pid.is_none() {
                        run.step = None;
                        run.pos += 1;
                        continue;
                    }
                    return Ok(());
                }
            }
        }
    }
}
