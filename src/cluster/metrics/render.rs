//! The cluster's figures as an OpenMetrics text exposition: what the
//! metrics endpoint answers `GET /metrics` with.
//!
//! Everything comes from two places: the [`ClusterStats`] snapshot that
//! `shmcluster stat` and [`Cluster::stats`](crate::Cluster::stats) read
//! from the segment (the same `read_stats`, not a second reader), and the
//! [`EventCounts`] the metrics server keeps from the master's events. The
//! exposition itself is written by `prometheus-client` (names, `_total`,
//! label escaping, `# EOF`): a fresh registry per scrape, filled from the
//! snapshot, so that no metric object outlives it.
//!
//! Per-slot series are labelled by `slot` only: a slot's counters are
//! totals over every generation of it, so they only ever grow, and a
//! worker's instance number (which moves to another slot across a rolling
//! reload) is a value of its own (`shmcluster_worker_index`), not a label
//! that would start a new series at each reload.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::cluster::{ClusterStats, Event, EventKind, ExitReason, WorkerState};

/// The `Content-Type` of [`render`]'s text.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every worker state, with its label value.
const STATES: [(WorkerState, &str); 6] = [
    (WorkerState::Free, "free"),
    (WorkerState::Starting, "starting"),
    (WorkerState::Ready, "ready"),
    (WorkerState::Draining, "draining"),
    (WorkerState::Dead, "dead"),
    (WorkerState::Failed, "failed"),
];

/// Event kinds, as the `kind` label of `shmcluster_events_total`.
const KINDS: [&str; 11] = [
    "spawned",
    "online",
    "exit",
    "crash_loop",
    "reload_started",
    "reload_finished",
    "shutdown_started",
    "lock_held_too_long",
    "start_failed",
    "upgrade_started",
    "upgrade_finished",
];

/// Exit reasons, as the `reason` label of `shmcluster_worker_exits_total`.
const REASONS: [&str; 7] = [
    "exited",
    "signaled",
    "hung",
    "reloaded",
    "shutdown",
    "not_ready",
    "lock_held",
];

/// What the metrics server counts from the master's events (the segment's
/// event log is a ring: old events are overwritten, so totals are kept
/// here, from [`EventCounts::observe`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct EventCounts {
    /// Per kind, in the order of [`KINDS`].
    pub(crate) kinds: [u64; KINDS.len()],
    /// Worker exits per reason, in the order of [`REASONS`].
    pub(crate) exits: [u64; REASONS.len()],
    /// Rolling reloads that finished with every instance replaced.
    pub(crate) reloads_ok: u64,
    /// Rolling reloads that finished with a replacement not ready.
    pub(crate) reloads_failed: u64,
}

impl EventCounts {
    /// Counts one event the master published.
    pub(crate) fn observe(&mut self, event: &Event) {
        let kind = match event.kind {
            EventKind::Spawned => 0,
            EventKind::Online => 1,
            EventKind::Exit(reason) => {
                let r = match reason {
                    ExitReason::Exited(_) => 0,
                    ExitReason::Signaled(_) => 1,
                    ExitReason::Hung => 2,
                    ExitReason::Reloaded => 3,
                    ExitReason::Shutdown => 4,
                    ExitReason::NotReady => 5,
                    ExitReason::LockHeld => 6,
                };
                self.exits[r] += 1;
                2
            }
            EventKind::CrashLoop => 3,
            EventKind::ReloadStarted => 4,
            EventKind::ReloadFinished { ok } => {
                if ok {
                    self.reloads_ok += 1;
                } else {
                    self.reloads_failed += 1;
                }
                5
            }
            EventKind::ShutdownStarted => 6,
            EventKind::LockHeldTooLong { .. } => 7,
            EventKind::StartFailed { .. } => 8,
            EventKind::UpgradeStarted { .. } => 9,
            EventKind::UpgradeFinished { .. } => 10,
        };
        self.kinds[kind] += 1;
    }
}

/// What a scrape shows besides the stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MasterFigures {
    /// Since the metrics server started (with the master).
    pub(crate) uptime: Duration,
    /// Other hosts the NATS bridge sees connected, if the cluster has a
    /// bridge.
    pub(crate) bridge_hosts: Option<u32>,
}

type Labels = Vec<(&'static str, String)>;
type CounterFamily = Family<Labels, Counter>;
type GaugeFamily = Family<Labels, Gauge<f64, AtomicU64>>;

/// A registry being filled for one scrape. Help texts are written as
/// sentences here; the encoder adds the full stop itself.
struct Builder {
    registry: Registry,
}

impl Builder {
    fn counter(&mut self, name: &str, help: &str) -> CounterFamily {
        let family = CounterFamily::default();
        self.registry
            .register(name, help.trim_end_matches('.'), family.clone());
        family
    }

    fn gauge(&mut self, name: &str, help: &str) -> GaugeFamily {
        let family = GaugeFamily::default();
        self.registry
            .register(name, help.trim_end_matches('.'), family.clone());
        family
    }

    fn gauge_in(&mut self, name: &str, help: &str, unit: Unit) -> GaugeFamily {
        let family = GaugeFamily::default();
        self.registry
            .register_with_unit(name, help.trim_end_matches('.'), unit, family.clone());
        family
    }

    fn counter_in(&mut self, name: &str, help: &str, unit: Unit) -> CounterFamily {
        let family = CounterFamily::default();
        self.registry
            .register_with_unit(name, help.trim_end_matches('.'), unit, family.clone());
        family
    }
}

fn set(family: &GaugeFamily, labels: Labels, value: f64) {
    family.get_or_create(&labels).set(value);
}

fn add(family: &CounterFamily, labels: Labels, value: u64) {
    family.get_or_create(&labels).inc_by(value);
}

/// The exposition of `stats`, `events` and `master`: OpenMetrics text,
/// ended by `# EOF`. The metric names are listed in README.md.
pub(crate) fn render(stats: &ClusterStats, events: &EventCounts, master: MasterFigures) -> String {
    let mut b = Builder {
        registry: Registry::with_prefix("shmcluster"),
    };

    // The cluster.
    let instances = b.gauge("instances", "Worker instances the master keeps running.");
    set(&instances, Vec::new(), f64::from(stats.instances));
    let shutting_down = b.gauge("shutting_down", "1 once the cluster's shutdown has begun.");
    set(
        &shutting_down,
        Vec::new(),
        f64::from(u8::from(stats.shutting_down)),
    );
    let uptime = b.gauge_in("uptime", "Time since the master started.", Unit::Seconds);
    set(&uptime, Vec::new(), master.uptime.as_secs_f64());
    let workers = b.gauge(
        "workers",
        "Worker slots in each state (the application's; the NATS bridge is not counted).",
    );
    for (state, name) in STATES {
        let n = stats
            .slots
            .iter()
            .filter(|s| !s.bridge && s.state == state)
            .count();
        set(&workers, vec![("state", name.into())], n as f64);
    }
    let kinds = b.counter("events", "Events the master published, by kind.");
    for (name, n) in KINDS.iter().zip(events.kinds) {
        add(&kinds, vec![("kind", (*name).into())], n);
    }
    let exits = b.counter("worker_exits", "Worker processes that ended, by reason.");
    for (name, n) in REASONS.iter().zip(events.exits) {
        add(&exits, vec![("reason", (*name).into())], n);
    }
    let reloads = b.counter("reloads", "Rolling reloads finished, by result.");
    add(&reloads, vec![("result", "ok".into())], events.reloads_ok);
    add(&reloads, vec![("result", "failed".into())], events.reloads_failed);
    let crash_loops = b.counter(
        "crash_loops",
        "Slots given up after crashing too often within the restart window.",
    );
    add(&crash_loops, Vec::new(), events.kinds[3]);

    // Each slot.
    let state = b.gauge(
        "worker_state",
        "1 for the slot's current state, 0 for the others.",
    );
    let index = b.gauge(
        "worker_index",
        "The instance number of the slot's worker (absent if none).",
    );
    let pid = b.gauge("worker_pid", "The slot's worker's pid (0 if none).");
    let generation = b.gauge("worker_generation", "The slot's worker's generation.");
    let bridge = b.gauge("worker_bridge", "1 on the slot of the host's NATS bridge.");
    let restarts = b.counter(
        "worker_restarts",
        "Times the master replaced a dead worker in the slot.",
    );
    let heartbeat = b.gauge_in(
        "worker_heartbeat_age",
        "Time since the master last saw the slot's heartbeat move (absent before its first look).",
        Unit::Seconds,
    );
    let sent = b.counter(
        "worker_messages_sent",
        "Messages sent by the slot (all generations).",
    );
    let sent_bytes = b.counter_in("worker_sent", "Payload bytes sent by the slot.", Unit::Bytes);
    let received = b.counter("worker_messages_received", "Messages received by the slot.");
    let received_bytes = b.counter_in(
        "worker_received",
        "Payload bytes received by the slot.",
        Unit::Bytes,
    );
    let inbox = b.gauge_in(
        "worker_inbox",
        "Bytes of messages waiting in the lanes addressed to the slot.",
        Unit::Bytes,
    );
    let futex_waits = b.counter(
        "worker_futex_waits",
        "Times the slot's worker slept in a futex wait.",
    );
    let futex_wakes = b.counter(
        "worker_futex_wakes",
        "Futex wakes the slot's worker issued to parked receivers.",
    );
    let full_waits = b.counter(
        "worker_full_waits",
        "Sends that found a full lane and had to wait.",
    );
    let last_request = b.gauge_in(
        "worker_last_request",
        "How long a recent messenger request of the slot took (one in 16 is timed).",
        Unit::Seconds,
    );
    let last_map = b.gauge_in(
        "worker_last_map",
        "How long the slot's last messenger map took.",
        Unit::Seconds,
    );
    for s in &stats.slots {
        let slot = || vec![("slot", s.slot.to_string())];
        for (st, name) in STATES {
            let mut labels = slot();
            labels.push(("state", name.into()));
            set(&state, labels, f64::from(u8::from(s.state == st)));
        }
        if let Some(i) = s.index {
            set(&index, slot(), f64::from(i));
        }
        set(&pid, slot(), f64::from(s.pid));
        set(&generation, slot(), f64::from(s.generation));
        if s.bridge {
            set(&bridge, slot(), 1.0);
        }
        add(&restarts, slot(), u64::from(s.restarts));
        if let Some(age) = s.heartbeat_age {
            set(&heartbeat, slot(), age.as_secs_f64());
        }
        add(&sent, slot(), s.sent_messages);
        add(&sent_bytes, slot(), s.sent_bytes);
        add(&received, slot(), s.received_messages);
        add(&received_bytes, slot(), s.received_bytes);
        set(&inbox, slot(), s.inbox_bytes as f64);
        add(&futex_waits, slot(), s.futex_waits);
        add(&futex_wakes, slot(), s.futex_wakes);
        add(&full_waits, slot(), s.full_waits);
        if let Some(d) = s.last_request {
            set(&last_request, slot(), d.as_secs_f64());
        }
        if let Some(d) = s.last_map {
            set(&last_map, slot(), d.as_secs_f64());
        }
    }

    // Each lock.
    let acquisitions = b.counter("lock_acquisitions", "Acquisitions of the lock.");
    let waits = b.counter("lock_waits", "Acquisitions of the lock that had to wait.");
    let owner_died = b.counter(
        "lock_owner_died",
        "Acquisitions of the lock that found the previous holder dead.",
    );
    let held = b.gauge_in(
        "lock_held",
        "How long the current holder has held the lock, as the master observed it (0 when free).",
        Unit::Seconds,
    );
    let holder = b.gauge(
        "lock_holder_slot",
        "The slot holding the lock (absent when free).",
    );
    for l in &stats.locks {
        let name = if l.name.is_empty() {
            "(global)"
        } else {
            l.name.as_str()
        };
        let lock = || vec![("lock", name.to_string())];
        add(&acquisitions, lock(), l.acquisitions);
        add(&waits, lock(), l.waits);
        add(&owner_died, lock(), l.owner_died);
        set(&held, lock(), l.held_for.map_or(0.0, |d| d.as_secs_f64()));
        if let Some((slot, _)) = l.holder {
            set(&holder, lock(), f64::from(slot));
        }
    }

    // The host's NATS bridge.
    if let Some(hosts) = master.bridge_hosts {
        let remote = b.gauge(
            "bridge_remote_hosts",
            "Other hosts the NATS bridge sees connected.",
        );
        set(&remote, Vec::new(), f64::from(hosts));
    }

    let mut out = String::new();
    // Writing into a String cannot fail, and every name here is valid.
    if encode(&mut out, &b.registry).is_err() {
        out.clear();
        out.push_str("# EOF\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::SlotStats;

    fn slot(slot: u32, state: WorkerState) -> SlotStats {
        SlotStats {
            slot,
            index: Some(slot),
            state,
            pid: 100 + slot,
            generation: 1,
            restarts: slot,
            last_exit: None,
            heartbeat_age: Some(Duration::from_millis(250)),
            sent_messages: 7,
            sent_bytes: 70,
            received_messages: 3,
            received_bytes: 30,
            inbox_bytes: 0,
            futex_waits: 1,
            futex_wakes: 2,
            full_waits: 0,
            last_request: None,
            last_map: None,
            bridge: false,
        }
    }

    #[test]
    fn the_exposition_has_each_family_and_ends_with_eof() {
        let stats = ClusterStats {
            master_pid: 1,
            instances: 2,
            shutting_down: false,
            slots: vec![
                slot(0, WorkerState::Ready),
                slot(1, WorkerState::Ready),
                slot(2, WorkerState::Free),
            ],
            locks: vec![crate::LockStats {
                name: "a \"quoted\"\nname".into(),
                holder: Some((1, 101)),
                held_for: Some(Duration::from_millis(1500)),
                acquisitions: 5,
                waits: 2,
                owner_died: 1,
                token: 5,
            }],
        };
        let mut events = EventCounts::default();
        let at = |kind| Event {
            seq: 0,
            kind,
            slot: 0,
            index: 0,
            pid: 1,
            generation: 1,
        };
        events.observe(&at(EventKind::Exit(ExitReason::Signaled(9))));
        events.observe(&at(EventKind::ReloadFinished { ok: true }));
        events.observe(&at(EventKind::CrashLoop));
        let text = render(
            &stats,
            &events,
            MasterFigures {
                uptime: Duration::from_secs(3),
                bridge_hosts: None,
            },
        );
        for line in [
            "shmcluster_instances 2.0",
            "shmcluster_workers{state=\"ready\"} 2.0",
            "shmcluster_workers{state=\"free\"} 1.0",
            "shmcluster_events_total{kind=\"exit\"} 1",
            "shmcluster_worker_exits_total{reason=\"signaled\"} 1",
            "shmcluster_reloads_total{result=\"ok\"} 1",
            "shmcluster_crash_loops_total 1",
            "shmcluster_worker_state{slot=\"0\",state=\"ready\"} 1.0",
            "shmcluster_worker_state{slot=\"0\",state=\"dead\"} 0.0",
            "shmcluster_worker_restarts_total{slot=\"1\"} 1",
            "shmcluster_worker_messages_sent_total{slot=\"0\"} 7",
            "shmcluster_worker_sent_bytes_total{slot=\"0\"} 70",
            "shmcluster_worker_heartbeat_age_seconds{slot=\"0\"} 0.25",
            "shmcluster_lock_acquisitions_total{lock=\"a \\\"quoted\\\"\\nname\"} 5",
            "shmcluster_lock_held_seconds{lock=\"a \\\"quoted\\\"\\nname\"} 1.5",
            "# TYPE shmcluster_uptime_seconds gauge",
            "# UNIT shmcluster_uptime_seconds seconds",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            !text.contains("bridge_remote_hosts"),
            "no bridge, no bridge figures"
        );
    }
}
