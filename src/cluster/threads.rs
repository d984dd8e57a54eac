//! Threads mode: the workers of a cluster as threads of one process, each
//! with a real [`Worker`] on one segment, and no master
//! ([`crate::ClusterBuilder::threads`]).
//!
//! Nothing supervises the threads: a worker that ends is not replaced,
//! and there is no reload. A stop is the segment's shutdown word, set by
//! [`Worker::request_shutdown`] from any of them (see [`Worker`]'s
//! "Without a master").

use std::fmt;
use std::sync::atomic::Ordering::Release;

use super::{ClusterError, ExitReason, Outcome, Report, Unhealthy, Worker, WorkerState};
use crate::error::CreateError;
use crate::segment::{Config, Segment};
use crate::WaitStrategy;

/// Exit code a worker's closure is recorded with when it returned `Err`,
/// as a forked worker exits.
const ERR_CODE: i32 = 1;
/// Exit code a worker's closure is recorded with when it panicked, as a
/// forked worker exits (Rust's panic exit code).
const PANIC_CODE: i32 = 101;

/// `n` workers without a master on one new segment of `n` slots (slot,
/// index and generation from each endpoint), sharing its stop word: what
/// `Messenger::threads` hands out.
///
/// # Errors
/// If the segment cannot be created.
pub(crate) fn unmanaged_workers(n: u32) -> Result<Vec<Worker>, CreateError> {
    let segment = Segment::create(&Config::new(n))?;
    Ok(workers_on(&segment, n))
}

/// A worker for each of the `n` slots of the fresh `segment`.
fn workers_on(segment: &Segment, n: u32) -> Vec<Worker> {
    segment.control().instances.store(n, Release);
    (0..n)
        .map(|slot| Worker::unmanaged(segment.endpoint(slot).expect("a fresh slot"), n))
        .collect()
}

/// Runs a cluster's workers as threads of this process: see
/// [`crate::ClusterBuilder::threads`].
pub struct ThreadsBuilder {
    threads: u32,
    config: Config,
    wait: WaitStrategy,
}

impl fmt::Debug for ThreadsBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThreadsBuilder")
            .field("threads", &self.threads)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ThreadsBuilder {
    pub(super) fn new(threads: u32, config: Config, wait: WaitStrategy) -> Self {
        Self {
            threads,
            config,
            wait,
        }
    }

    /// Runs `f` on every thread, each with its own [`Worker`], until all
    /// of them have returned; then reports how they ended, as fork mode's
    /// [`crate::ClusterBuilder::run`] does: [`Outcome::Clean`] if every
    /// one returned `Ok`, else [`Outcome::Unclean`] with each one that
    /// did not in [`Report::unhealthy`] — `Err` as exit code 1 (printed
    /// to stderr), a panic as exit code 101. No worker is restarted.
    ///
    /// # Errors
    /// [`ClusterError::Workers`] for too many threads,
    /// [`ClusterError::Config`] or [`ClusterError::Create`] if the segment
    /// cannot be made; always before any thread starts.
    pub fn run<F, E>(self, f: F) -> Result<Report, ClusterError>
    where
        F: Fn(Worker) -> Result<(), E> + Sync,
        E: fmt::Display,
    {
        let max = crate::MAX_WORKERS;
        let n = match self.threads {
            0 => std::thread::available_parallelism()
                .map_or(1, |n| n.get() as u32)
                .min(max),
            n if n > max => return Err(ClusterError::Workers { requested: n, max }),
            n => n,
        };
        let config = Config {
            workers: n,
            ..self.config
        };
        crate::Layout::new(&config).map_err(ClusterError::Config)?;
        let segment = Segment::create(&config).map_err(ClusterError::Create)?;
        let workers = workers_on(&segment, n);
        let f = &f;
        let ends: Vec<Option<ExitReason>> = std::thread::scope(|scope| {
            let handles: Vec<_> = workers
                .into_iter()
                .map(|mut worker| {
                    worker.set_wait_strategy(self.wait);
                    let index = worker.index();
                    std::thread::Builder::new()
                        .name(format!("shmcluster-worker-{index}"))
                        .spawn_scoped(scope, move || match f(worker) {
                            Ok(()) => None,
                            Err(e) => {
                                say!("shmcluster worker {index}: {e}");
                                Some(ExitReason::Exited(ERR_CODE))
                            }
                        })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| match h {
                    Ok(h) => h.join().unwrap_or(Some(ExitReason::Exited(PANIC_CODE))),
                    // Not started (out of threads): it did not run.
                    Err(_) => Some(ExitReason::Exited(ERR_CODE)),
                })
                .collect()
        });
        let mut unhealthy = Vec::new();
        for (slot, end) in (0..n).zip(&ends) {
            let reason = end.unwrap_or(ExitReason::Exited(0));
            let entry = segment.worker_entry(slot);
            let (kind, value) = reason.to_raw();
            entry.last_exit_kind.store(kind, Release);
            entry.last_exit_value.store(value, Release);
            entry.state.store(WorkerState::Dead.to_raw(), Release);
            if end.is_some() {
                unhealthy.push(Unhealthy::Ended { index: slot, reason });
            }
        }
        let outcome = if unhealthy.is_empty() {
            Outcome::Clean
        } else {
            Outcome::Unclean
        };
        Ok(Report {
            outcome,
            clean: outcome == Outcome::Clean,
            unhealthy,
            restarts: 0,
            failed_slots: Vec::new(),
            killed: 0,
            upgraded_to: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::Cluster;

    #[test]
    fn every_thread_has_its_own_slot() {
        let seen = Mutex::new(Vec::new());
        // A worker that returns is dropped, and so `Dead` to its peers:
        // none returns before all have seen the others ready.
        let all_seen = std::sync::Barrier::new(4);
        let report = Cluster::builder()
            .threads(4)
            .run(|mut worker| {
                assert_eq!(worker.instances(), 4);
                assert_eq!(worker.index(), worker.slot());
                assert!(worker.take_listeners().is_empty());
                worker.ready();
                assert!(worker.wait_all_ready(Duration::from_secs(20)), "all four ready");
                seen.lock().unwrap().push(worker.slot());
                all_seen.wait();
                Ok::<(), std::io::Error>(())
            })
            .unwrap();
        assert!(report.clean, "{report}");
        assert_eq!(report.exit_code(), 0);
        let mut seen = seen.into_inner().unwrap();
        seen.sort_unstable();
        assert_eq!(seen, [0, 1, 2, 3]);
    }

    #[test]
    fn a_shutdown_request_stops_every_worker() {
        let started = std::sync::Barrier::new(3);
        let report = Cluster::builder()
            .threads(3)
            .run(|worker| {
                assert!(!worker.should_stop());
                started.wait();
                if worker.slot() == 1 {
                    worker.request_shutdown();
                }
                // The watchdog: a lost stop fails instead of hanging.
                if !worker.wait_stop(Duration::from_secs(20)) {
                    return Err("no stop within 20 s");
                }
                assert!(worker.is_shutting_down() && !worker.is_draining());
                assert!(worker.stop_watch().should_stop());
                Ok(())
            })
            .unwrap();
        assert!(report.clean, "{report}");
    }

    #[test]
    fn a_panic_or_an_error_is_an_unclean_end() {
        let report = Cluster::builder()
            .threads(3)
            .run(|worker| match worker.slot() {
                0 => panic!("worker 0 fails on purpose"),
                1 => Err("worker 1 fails on purpose"),
                _ => Ok(()),
            })
            .unwrap();
        assert_eq!(report.outcome, Outcome::Unclean);
        assert_eq!(report.exit_code(), 1);
        assert_eq!(
            report.unhealthy,
            [
                Unhealthy::Ended {
                    index: 0,
                    reason: ExitReason::Exited(PANIC_CODE)
                },
                Unhealthy::Ended {
                    index: 1,
                    reason: ExitReason::Exited(ERR_CODE)
                },
            ]
        );
    }

    #[test]
    fn too_many_threads_is_an_error_before_any_starts() {
        let too_many = crate::MAX_WORKERS + 1;
        let err = Cluster::builder()
            .threads(too_many)
            .run(|_| -> Result<(), &str> { unreachable!("no thread starts") })
            .unwrap_err();
        assert!(
            matches!(err, ClusterError::Workers { requested, max } if requested == too_many && max == crate::MAX_WORKERS),
            "{err}"
        );
    }

    #[test]
    fn unmanaged_workers_share_a_segment_and_a_stop() {
        let mut workers = unmanaged_workers(2).unwrap();
        assert_eq!(workers.len(), 2);
        workers[0].endpoint().send(1, b"one segment").unwrap();
        let got = workers[1]
            .endpoint()
            .recv_timeout(Duration::from_secs(10))
            .unwrap();
        assert_eq!(got.payload, b"one segment");
        let peers = workers[0].peers();
        assert_eq!(peers.len(), 2);
        assert!(peers.iter().all(|p| p.state == WorkerState::Starting));
        assert_eq!(peers[1].index, Some(1));
        workers[1].ready();
        assert_eq!(workers[0].peers()[1].state, WorkerState::Ready);
        assert!(!workers[0].wait_all_ready(Duration::from_millis(10)));
        workers[0].ready();
        assert!(workers[1].wait_all_ready(Duration::from_secs(10)));
        // No master: nothing to reload, no listener to ask for.
        workers[0].request_reload();
        assert!(!workers[1].should_stop());
        assert!(workers[0]
            .listen("127.0.0.1:0", crate::ListenMode::Shared)
            .is_err());
        assert!(workers[0].take_listeners().is_empty());
        assert_eq!(workers[0].synchronize(|_| 7).unwrap(), 7);
        workers[1].request_shutdown();
        assert!(workers[0].should_stop() && workers[0].wait_stop(Duration::ZERO));
        assert_eq!(workers[0].stats().instances, 2);
        drop(workers.pop());
        assert_eq!(workers[0].peers()[1].state, WorkerState::Dead, "its end recorded");
    }
}
