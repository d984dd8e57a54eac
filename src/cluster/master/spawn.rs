//! Starting a worker in a slot: fork, then the closure (fork mode) or
//! exec of the program (spawn mode).

use std::ffi::CString;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::sync::atomic::Ordering::*;
use std::time::Instant;

use super::notify::{WorkerNotifyEnv, MASTER_ONLY_VARS};
use super::upgrade::UpgradeRun;
use super::{BridgeConfig, Master, Mode};
use crate::cluster::control::ControlServer;
use crate::cluster::listen;
use crate::cluster::metrics::MetricsServer;
use crate::cluster::worker::{env, Worker};
use crate::cluster::{EventKind, WorkerState};
use crate::segment::table::STOP_RUN;
use crate::segment::Segment;
use crate::sys;
use crate::sys::process as proc;
use crate::sys::signal;

impl Master<'_> {
    pub(super) fn start_worker(&mut self, slot: u32, index: u32) -> io::Result<()> {
        let segment = self.cluster.segment.clone();
        let generation = segment.next_generation(slot);
        let entry = segment.worker_entry(slot);
        let now_ns = proc::monotonic_ns();
        entry.index.store(index, Release);
        entry.generation.store(generation, Release);
        entry.pid.store(0, Release);
        entry.stop.store(STOP_RUN, Release);
        entry.heartbeat_seen_ns.store(now_ns, Release);
        entry.started_ns.store(now_ns, Release);
        entry.ready_ns.store(0, Release);
        entry.state.store(WorkerState::Starting.to_raw(), Release);

        let (master_end, worker_end) = sys::net::seqpacket_pair()?;
        let (exec_read, exec_write) = proc::pipe_cloexec()?;
        // Descriptors the child must not keep.
        let mut close: Vec<RawFd> = vec![
            self.signals.raw_fd(),
            master_end.as_raw_fd(),
            exec_read.as_raw_fd(),
        ];
        close.extend(
            self.slots
                .iter()
                .filter_map(|s| s.control.as_ref().map(|c| c.as_raw_fd())),
        );
        close.extend(
            self.control
                .as_ref()
                .map_or_else(Vec::new, ControlServer::raw_fds),
        );
        close.extend(
            self.metrics
                .as_ref()
                .map_or_else(Vec::new, MetricsServer::raw_fds),
        );
        // The host's bridge runs the master's own code, with no listener.
        let bridge: Option<BridgeConfig> = match self.bridge_index() {
            Some(b) if b == index => self.opts.bridge_config().cloned(),
            _ => None,
        };
        let is_bridge = bridge.is_some();
        // A spawned program's own NOTIFY_SOCKET (notify.rs); a new one per
        // worker, so that nothing a predecessor sent counts.
        let notify_env = match (&self.mode, is_bridge) {
            (Mode::Spawn(_), false) => self.notify.offer(slot),
            _ => {
                self.notify.forget(slot);
                None
            }
        };
        close.extend(self.notify.raw_fds());
        // A binary upgrade's pipes (between the masters only).
        close.extend(self.upgraded.as_ref().map_or_else(Vec::new, |u| u.raw_fds()));
        close.extend(self.upgrade.as_ref().map(UpgradeRun::raw_fd_to_close));
        let listeners = self.cluster.listeners.borrow();
        let mine: Vec<(BorrowedFd<'_>, &str)> = match bridge {
            Some(_) => Vec::new(),
            None => listeners.for_instance(index),
        };
        let mine_raw: Vec<RawFd> = mine.iter().map(|(fd, _)| fd.as_raw_fd()).collect();
        close.extend(
            listeners
                .all_fds()
                .into_iter()
                .filter(|fd| !mine_raw.contains(fd)),
        );
        let instances = self.cluster.instances;

        // SAFETY: the master checked at start-up that it is single-threaded
        // and starts no threads, so the child may allocate and run Rust code.
        match unsafe { sys::fork() }? {
            None => {
                sys::die_with_parent(self.master_pid);
                self.signals.restore_in_child();
                for fd in close {
                    let _ = sys::fd::close_raw(fd);
                }
                let code = match (&mut self.mode, bridge) {
                    (_, Some(config)) => {
                        drop(exec_write);
                        run_bridge(&config, segment, slot, index, generation, instances, worker_end)
                    }
                    (Mode::Fork(body), None) => {
                        let owned: io::Result<Vec<listen::Listener>> = listeners.instance_listeners(index);
                        let run = || -> Result<i32, String> {
                            signal::catch_sigterm().map_err(|e| e.to_string())?;
                            let listeners = owned.map_err(|e| e.to_string())?;
                            let worker = Worker::attach(
                                segment,
                                slot,
                                index,
                                generation,
                                instances,
                                Some(worker_end),
                                listeners,
                            )
                            .map_err(|e| e.to_string())?;
                            Ok(body(worker))
                        };
                        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
                            Ok(Ok(code)) => code,
                            Ok(Err(e)) => {
                                say!("shmcluster worker {index}: {e}");
                                1
                            }
                            Err(_) => 101,
                        }
                    }
                    (Mode::Spawn(argv), None) => {
                        let err = exec_worker(
                            argv,
                            &segment,
                            slot,
                            index,
                            generation,
                            instances,
                            &worker_end,
                            &mine,
                            notify_env.as_ref(),
                        );
                        let errno = err.raw_os_error().unwrap_or(0);
                        proc::write_all_raw(exec_write.as_fd(), &errno.to_le_bytes());
                        say!("shmcluster: cannot execute worker {index}: {err}");
                        127
                    }
                };
                let _ = io::stdout().flush();
                let _ = io::stderr().flush();
                sys::exit_now(code)
            }
            Some(child) => {
                drop(mine);
                drop(listeners);
                drop(worker_end);
                drop(exec_write);
                let pid = child.pid();
                // The bridge execs nothing: no EOF to wait for.
                if matches!(self.mode, Mode::Spawn(_)) && !is_bridge {
                    // EOF once the child execs (the write end is close-on-exec);
                    // four bytes of errno if it could not.
                    let mut buf = [0u8; 4];
                    if proc::read_raw(exec_read.as_fd(), &mut buf)? == 4 {
                        say!(
                            "shmcluster: worker {index} could not exec: {}",
                            io::Error::from_raw_os_error(i32::from_le_bytes(buf))
                        );
                    }
                }
                entry.pid.store(pid, Release);
                let rec = &mut self.slots[slot as usize];
                rec.pid = Some(pid);
                rec.index = Some(index);
                rec.generation = generation;
                rec.ready = false;
                rec.unready_since.get_or_insert_with(Instant::now);
                rec.replacement = false;
                rec.restart_at = None;
                rec.kill_at = None;
                rec.ending = None;
                rec.sigkilled = false;
                rec.control = Some(master_end);
                rec.beat = entry.heartbeat.load(Relaxed);
                rec.beat_seen = Some(Instant::now());
                self.publish(EventKind::Spawned, slot);
                if self.opts.ready_on_start {
                    let starting = WorkerState::Starting.to_raw();
                    let _ =
                        entry
                            .state
                            .compare_exchange(starting, WorkerState::Ready.to_raw(), AcqRel, Acquire);
                }
                Ok(())
            }
        }
    }

    /// After `start_worker` failed before a process existed: the slot's
    /// table entry says so.
    pub(super) fn start_failed(&mut self, slot: u32, e: &io::Error) {
        let entry = self.cluster.segment.worker_entry(slot);
        entry.pid.store(0, Release);
        entry.state.store(WorkerState::Dead.to_raw(), Release);
        self.slots[slot as usize].pid = None;
        self.notify.forget(slot);
        let errno = e.raw_os_error().unwrap_or(0);
        self.publish(EventKind::StartFailed { errno }, slot);
    }
}

/// In the forked child in the bridge's slot, either mode: the host's NATS
/// bridge, run until the master stops it (no exec: the master's program
/// has the bridge's code). Its exit code: the bridge's, 1 if it could not
/// attach, 101 if it panicked.
#[cfg_attr(not(feature = "nats"), allow(unused_variables))]
fn run_bridge(
    config: &BridgeConfig,
    segment: Segment,
    slot: u32,
    index: u32,
    generation: u32,
    instances: u32,
    control: OwnedFd,
) -> i32 {
    #[cfg(not(feature = "nats"))]
    match *config {}
    #[cfg(feature = "nats")]
    {
        let run = || -> Result<i32, String> {
            signal::catch_sigterm().map_err(|e| e.to_string())?;
            let worker = Worker::attach(
                segment,
                slot,
                index,
                generation,
                instances,
                Some(control),
                Vec::new(),
            )
            .map_err(|e| e.to_string())?;
            Ok(crate::bridge::run(worker, config))
        };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
            Ok(Ok(code)) => code,
            Ok(Err(e)) => {
                say!("shmcluster bridge: {e}");
                1
            }
            Err(_) => 101,
        }
    }
}

/// In the forked child of spawn mode: places the listeners at 3, 4, ...,
/// then the segment and the control socket, sets the environment, and
/// execs. Returns only on failure.
#[allow(clippy::too_many_arguments)]
fn exec_worker(
    argv: &[CString],
    segment: &Segment,
    slot: u32,
    index: u32,
    generation: u32,
    instances: u32,
    control: &OwnedFd,
    listeners: &[(BorrowedFd<'_>, &str)],
    notify: Option<&WorkerNotifyEnv>,
) -> io::Error {
    let attempt = || -> io::Result<io::Error> {
        // Move the segment, control socket and wake eventfds above where
        // the listeners and they go.
        let wake = segment.wake_fds().unwrap_or(&[]);
        let high = 3 + listeners.len() as RawFd + 2 + wake.len() as RawFd + 16;
        let seg_high = sys::fd::dup_above(segment.fd().as_raw_fd(), high)?;
        let ctl_high = sys::fd::dup_above(control.as_raw_fd(), high)?;
        let wake_high = wake
            .iter()
            .map(|fd| sys::fd::dup_above(fd.as_raw_fd(), high))
            .collect::<io::Result<Vec<RawFd>>>()?;
        let raw: Vec<(RawFd, &str)> = listeners.iter().map(|(fd, n)| (fd.as_raw_fd(), *n)).collect();
        let (mut vars, next) = listen::place_listen_fds(&raw)?;
        if raw.is_empty() {
            vars.clear();
        }
        sys::fd::dup2(seg_high, next)?;
        sys::fd::dup2(ctl_high, next + 1)?;
        let _ = sys::fd::close_raw(seg_high);
        let _ = sys::fd::close_raw(ctl_high);
        for (i, &fd) in wake_high.iter().enumerate() {
            sys::fd::dup2(fd, next + 2 + i as RawFd)?;
            let _ = sys::fd::close_raw(fd);
        }
        vars.push((env::FD.into(), next.to_string()));
        vars.push((env::CONTROL_FD.into(), (next + 1).to_string()));
        if !wake_high.is_empty() {
            vars.push((env::WAKE_FDS.into(), (next + 2).to_string()));
        }
        vars.push((env::WORKER.into(), slot.to_string()));
        vars.push((env::WORKERS.into(), instances.to_string()));
        vars.push((env::GENERATION.into(), generation.to_string()));
        vars.push((env::INDEX.into(), index.to_string()));
        if let Some(notify) = notify {
            vars.extend(notify.vars(sys::getpid()));
        }
        let mut envp: Vec<CString> = std::env::vars_os()
            .filter(|(k, _)| inherited(&k.to_string_lossy()))
            .filter_map(|(k, v)| {
                let mut kv = k.into_vec();
                kv.push(b'=');
                kv.extend(v.into_vec());
                CString::new(kv).ok()
            })
            .collect();
        for (k, v) in vars {
            envp.push(CString::new(format!("{k}={v}")).map_err(|_| io::ErrorKind::InvalidInput)?);
        }
        Ok(proc::exec(argv, &envp))
    };
    match attempt() {
        Ok(e) | Err(e) => e,
    }
}

/// Whether a variable of the master's environment reaches a spawned
/// worker: the user's settings do (`SHMCLUSTER_LIB`, which a Python
/// worker finds its library with, among them), but not a worker identity
/// or listener set the master itself inherited (it sets the worker's own,
/// and a stale one would name another segment or descriptors), nor the
/// NATS credentials (`SHMCLUSTER_NATS_*`: only the bridge needs them, and
/// it is forked), nor the master's own service manager's notify socket
/// and watchdog (`NOTIFY_SOCKET`, `WATCHDOG_*`: a worker gets its own
/// from the master, or none).
fn inherited(key: &str) -> bool {
    const IDENTITY: [&str; 7] = [
        env::FD,
        env::CONTROL_FD,
        env::WAKE_FDS,
        env::WORKER,
        env::WORKERS,
        env::GENERATION,
        env::INDEX,
    ];
    !(key.starts_with("LISTEN_")
        || key.starts_with("SHMCLUSTER_NATS_")
        || IDENTITY.contains(&key)
        || MASTER_ONLY_VARS.contains(&key))
}
