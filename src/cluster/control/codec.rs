//! The control socket's line format, both ways: requests parsed into a
//! `ControlRequest`, the master's `ControlAnswer` encoded into the
//! response, and the `key=value` fields with their `%XX` escaping
//! ([`escape`] on the master's side, [`unescape`] on the client's). The
//! protocol itself is described in the parent module.
//!
//! No I/O here: the server reads and writes the sockets, the master
//! executes the requests.
//!
//! [`escape`] and [`unescape`] are `pub` for the `shmcluster` command's
//! client, a separate crate target that sees only the library's public
//! items: the crate root re-exports this module, hidden from the docs, as
//! `control_codec`.

use std::fmt::Write as _;
use std::time::Duration;

use crate::cluster::{ClusterStats, Event, EventKind, ExitReason, Report};

/// The longest request line accepted, newline included.
pub(crate) const MAX_REQUEST: usize = 256;

/// Version of the `stat` line format.
pub(crate) const WIRE_VERSION: u32 = 1;

/// The most events one `events` answer carries (the newest of those
/// asked for): a bounded answer, like every other.
pub(crate) const MAX_EVENTS: usize = 64;

/// A request line, parsed ([`parse_request`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Request {
    /// One for the master to carry out.
    Master(ControlRequest),
    /// `wait`: hold the connection open until the master ends, then say
    /// how it ended. The server keeps such connections; the master is not
    /// asked.
    Wait,
}

/// A request the master carries out, answering with a [`ControlAnswer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ControlRequest {
    /// `ping`: is a master there, and which.
    Ping,
    /// `stat`: every slot's state and counters.
    Stat,
    /// `reload`: a rolling reload, as `SIGHUP`.
    Reload,
    /// `reload worker=<index>`: one instance replaced, as one step of a
    /// rolling reload.
    ReloadInstance {
        /// The instance.
        index: u32,
    },
    /// `stop`: a graceful shutdown, as `SIGTERM`.
    Stop,
    /// `events since=<seq>`: the recent events numbered `since` and later
    /// (`events` alone: since 0).
    Events {
        /// The first event number wanted.
        since: u64,
    },
    /// `upgrade`: a binary upgrade, as `SIGUSR2`.
    Upgrade,
}

/// Parses one request line (without its newline; surrounding blanks
/// ignored). `Err` holds the response refusing it.
pub(crate) fn parse_request(line: &[u8]) -> Result<Request, String> {
    let request = std::str::from_utf8(line).unwrap_or("").trim();
    Ok(Request::Master(match request {
        "ping" => ControlRequest::Ping,
        "stat" => ControlRequest::Stat,
        "reload" => ControlRequest::Reload,
        "stop" => ControlRequest::Stop,
        "upgrade" => ControlRequest::Upgrade,
        "wait" => return Ok(Request::Wait),
        "events" => ControlRequest::Events { since: 0 },
        other => match other.split_once(' ') {
            Some(("events", arg)) => ControlRequest::Events {
                since: number_arg("events", "since", arg)?,
            },
            Some(("reload", arg)) => ControlRequest::ReloadInstance {
                index: number_arg("reload", "worker", arg)?,
            },
            _ => {
                return Err(format!(
                    "err unknown request {}: expected ping, stat, reload [worker=<n>], stop, upgrade, wait or events\n",
                    escape(other)
                ))
            }
        },
    }))
}

/// The number in `arg` (blanks around it ignored) if it is
/// `<key>=<number>`; else the response refusing `request`.
fn number_arg<T: std::str::FromStr>(request: &str, key: &str, arg: &str) -> Result<T, String> {
    let arg = arg.trim();
    match arg
        .strip_prefix(key)
        .and_then(|v| v.strip_prefix('='))
        .map(str::parse)
    {
        Some(Ok(n)) => Ok(n),
        _ => Err(format!(
            "err bad {request} request {}: expected {request} {key}=<number>\n",
            escape(arg)
        )),
    }
}

/// What the master did with a [`ControlRequest`], for the server to
/// encode ([`encode_answer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ControlAnswer {
    /// `ping`: the master's pid.
    Pong {
        /// The master's pid.
        pid: u32,
    },
    /// `stat`: the table as the master read it.
    Stats {
        /// The table.
        stats: ClusterStats,
        /// The number the next event will get (a client polling `events`
        /// asks only when it moved).
        events_next: u64,
        /// The master this one took over from in a binary upgrade.
        upgraded_from: Option<u32>,
    },
    /// `reload`: queued.
    ReloadQueued,
    /// `reload worker=<index>` of an instance the cluster does not have.
    NoSuchInstance(crate::cluster::ReloadError),
    /// `stop`: the shutdown has begun.
    ShutdownStarted,
    /// `stop` while shutting down already.
    AlreadyShuttingDown,
    /// Refused: the reason (`reload` while shutting down).
    Refused(&'static str),
    /// `events`: the events asked for that are still in the log (at most
    /// [`MAX_EVENTS`], oldest first), and the number the next one will get.
    Events {
        /// The events.
        events: Vec<Event>,
        /// What to ask `since` next time.
        next: u64,
    },
    /// `upgrade`: the new master started with this pid; the connection
    /// stays open until the upgrade ends (see [`upgrade_line`]).
    UpgradeStarted {
        /// The new master's pid.
        pid: u32,
    },
    /// `upgrade` refused: why (already upgrading, shutting down, the fork
    /// failed).
    UpgradeRefused(String),
}

/// Reloads seen in the event log, for `stat` (and `reload --wait`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReloadCounts {
    pub(crate) started: u64,
    pub(crate) ok: u64,
    pub(crate) failed: u64,
    pub(crate) last_ok: Option<bool>,
}

/// The response carrying `answer`; the server adds what it keeps itself:
/// the master's `uptime` and the `reloads` it counted.
pub(crate) fn encode_answer(answer: &ControlAnswer, uptime: Duration, reloads: ReloadCounts) -> String {
    match answer {
        ControlAnswer::Pong { pid } => format!("ok pong pid={pid} v={WIRE_VERSION}\n"),
        ControlAnswer::Stats {
            stats,
            events_next,
            upgraded_from,
        } => format_stats(stats, *events_next, *upgraded_from, uptime, reloads),
        ControlAnswer::ReloadQueued => format!(
            "ok reload queued reloads_started={} reloads_finished={}\n",
            reloads.started,
            reloads.ok + reloads.failed
        ),
        ControlAnswer::NoSuchInstance(e) => format!("err {e}\n"),
        ControlAnswer::ShutdownStarted => "ok shutdown started\n".into(),
        ControlAnswer::AlreadyShuttingDown => "ok already shutting down\n".into(),
        ControlAnswer::Refused(reason) => format!("err {reason}\n"),
        ControlAnswer::Events { events, next } => format_events(events, *next),
        ControlAnswer::UpgradeStarted { pid } => format!("ok upgrade started pid={pid}\n"),
        ControlAnswer::UpgradeRefused(reason) => format!("err {reason}\n"),
    }
}

/// The line written on an `upgrade` connection when the upgrade ends:
/// `upgraded pid=<new>` once the new master is ready (the old one then
/// drains and exits), or `err upgrade failed: <reason>` (the old master
/// kept serving).
pub(crate) fn upgrade_line(pid: u32, failed: Option<&str>) -> String {
    match failed {
        None => format!("upgraded pid={pid}\n"),
        Some(reason) => format!("err upgrade failed: {reason}\n"),
    }
}

/// One word for an event's kind, in the `events` answer.
fn kind_word(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Spawned => "spawned",
        EventKind::Online => "online",
        EventKind::Exit(ExitReason::Exited(0)) => "exited",
        EventKind::Exit(ExitReason::Reloaded | ExitReason::Shutdown) => "exited",
        EventKind::Exit(_) => "crashed",
        EventKind::CrashLoop => "crash-loop",
        EventKind::ReloadStarted => "reload-started",
        EventKind::ReloadFinished { ok: true } => "reload-finished",
        EventKind::ReloadFinished { ok: false } => "reload-failed",
        EventKind::ShutdownStarted => "shutdown-started",
        EventKind::LockHeldTooLong { .. } => "lock-held-too-long",
        EventKind::StartFailed { .. } => "start-failed",
        EventKind::UpgradeStarted { .. } => "upgrade-started",
        EventKind::UpgradeFinished { ok: true, .. } => "upgrade-finished",
        EventKind::UpgradeFinished { ok: false, .. } => "upgrade-failed",
    }
}

/// The `events` response (see the parent module's docs).
fn format_events(events: &[Event], next: u64) -> String {
    let mut out = format!("ok events next={next} count={}\n", events.len());
    for e in events {
        let _ = writeln!(
            out,
            "event seq={} kind={} slot={} index={} pid={} gen={} text={}",
            e.seq,
            kind_word(e.kind),
            opt((e.slot != u32::MAX).then_some(e.slot)),
            opt((e.index != u32::MAX).then_some(e.index)),
            opt((e.pid != 0).then_some(e.pid)),
            e.generation,
            escape(&e.to_string()),
        );
    }
    out.push_str("end\n");
    out
}

/// The answer to a `wait` the server accepted.
pub(crate) const WAITING: &str = "ok waiting\n";

/// The refusal of a `wait` beyond the server's bound of `max` waiters.
pub(crate) fn too_many_waiters(max: usize) -> String {
    format!(
        "err too many clients waiting for the master to exit ({max}); \
         try again once one has gone, or stop without --wait\n"
    )
}

/// The refusal of a request line over [`MAX_REQUEST`] bytes.
pub(crate) fn too_long() -> String {
    format!("err request longer than {MAX_REQUEST} bytes\n")
}

/// The refusal of a peer with another user id.
pub(crate) fn permission_denied(peer_uid: u32, master_uid: u32) -> String {
    format!("err permission denied: uid {peer_uid} is not the master's uid {master_uid}\n")
}

/// The line written on `wait` connections as the master exits.
pub(crate) fn exited_line(report: &Report) -> String {
    format!(
        "exited code={} outcome={} restarts={} killed={} upgraded_to={} summary={}\n",
        report.exit_code(),
        report.outcome.as_str(),
        report.restarts,
        report.killed,
        opt(report.upgraded_to),
        escape(&report.to_string())
    )
}

/// Percent-escapes a value for a `key=value` field: every byte outside
/// `A-Z a-z 0-9 . _ : / + -` becomes `%XX`, so a value never contains a
/// space, `=` or a newline. [`unescape`] undoes it.
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"._:/+-".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Undoes [`escape`]; a `%` not followed by two hex digits stays as it is.
pub fn unescape(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

fn micros(d: Option<Duration>) -> String {
    opt(d.map(|d| d.as_micros()))
}

/// The `stat` response (see the parent module's docs).
fn format_stats(
    stats: &ClusterStats,
    events_next: u64,
    upgraded_from: Option<u32>,
    uptime: Duration,
    reloads: ReloadCounts,
) -> String {
    let mut out = format!("ok stat v={WIRE_VERSION}\n");
    let last = match reloads.last_ok {
        None => "-",
        Some(true) => "ok",
        Some(false) => "failed",
    };
    let _ = writeln!(
        out,
        "master pid={} instances={} shutting_down={} uptime_ms={} reloads_started={} reloads_ok={} \
         reloads_failed={} last_reload={last} events_next={events_next} upgraded_from={}",
        stats.master_pid,
        stats.instances,
        u8::from(stats.shutting_down),
        uptime.as_millis(),
        reloads.started,
        reloads.ok,
        reloads.failed,
        opt(upgraded_from),
    );
    for s in &stats.slots {
        let _ = writeln!(
            out,
            "slot id={} index={} state={:?} pid={} gen={} restarts={} last_exit={} hb_age_us={} sent={} \
             sent_bytes={} received={} received_bytes={} inbox_bytes={} futex_waits={} futex_wakes={} \
             full_waits={} last_request_us={} last_map_us={}",
            s.slot,
            opt(s.index),
            s.state,
            s.pid,
            s.generation,
            s.restarts,
            opt(s.last_exit.map(|e| escape(&format!("{e:?}")))),
            micros(s.heartbeat_age),
            s.sent_messages,
            s.sent_bytes,
            s.received_messages,
            s.received_bytes,
            s.inbox_bytes,
            s.futex_waits,
            s.futex_wakes,
            s.full_waits,
            micros(s.last_request),
            micros(s.last_map),
        );
        if s.bridge {
            // Added after the line's v1 fields, on the bridge's row only:
            // a client that does not know it reads the rest as before.
            out.insert_str(out.len() - 1, " role=bridge");
        }
    }
    for l in &stats.locks {
        let _ = writeln!(
            out,
            "lock name={} holder_slot={} holder_pid={} held_us={} acquisitions={} waits={} owner_died={} \
             token={}",
            escape(&l.name),
            opt(l.holder.map(|h| h.0)),
            opt(l.holder.map(|h| h.1)),
            micros(l.held_for),
            l.acquisitions,
            l.waits,
            l.owner_died,
            l.token,
        );
    }
    out.push_str("end\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `exited` line says whether the master handed over to a new one
    /// in a binary upgrade, in a field and in its summary.
    #[test]
    fn the_exited_line_names_the_new_master_after_an_upgrade() {
        let mut report = Report {
            outcome: crate::cluster::Outcome::Clean,
            clean: true,
            unhealthy: Vec::new(),
            restarts: 0,
            failed_slots: Vec::new(),
            killed: 0,
            upgraded_to: None,
        };
        assert_eq!(
            exited_line(&report),
            "exited code=0 outcome=clean restarts=0 killed=0 upgraded_to=- \
             summary=clean%20shutdown%20%280%20restarts%2C%200%20killed%29\n"
        );
        report.upgraded_to = Some(4242);
        assert_eq!(
            report.to_string(),
            "upgraded: new master pid 4242 took over; clean shutdown (0 restarts, 0 killed)"
        );
        let line = exited_line(&report);
        assert!(line.starts_with("exited code=0 outcome=clean restarts=0 killed=0 upgraded_to=4242 summary="));
        let summary = line.trim_end().rsplit_once("summary=").map(|(_, s)| unescape(s));
        assert_eq!(summary.as_deref(), Some(report.to_string().as_str()));
    }

    #[test]
    fn escape_keeps_fields_whole() {
        assert_eq!(escape("counter"), "counter");
        assert_eq!(escape(""), "");
        assert_eq!(escape("a b=c\n%"), "a%20b%3Dc%0A%25");
        assert_eq!(escape("Exited(0)"), "Exited%280%29");
    }

    #[test]
    fn unescape_undoes_escape() {
        for value in ["", "counter", "a b=c\n%", "Exited(0)", "ünï code", "100%"] {
            assert_eq!(unescape(&escape(value)), value);
        }
        assert_eq!(unescape("100%"), "100%");
        assert_eq!(unescape("%zz"), "%zz");
    }

    #[test]
    fn requests_parse_and_an_unknown_one_is_refused() {
        let master = |r| Ok(Request::Master(r));
        assert_eq!(parse_request(b"ping"), master(ControlRequest::Ping));
        assert_eq!(parse_request(b" stat \r"), master(ControlRequest::Stat));
        assert_eq!(parse_request(b"reload"), master(ControlRequest::Reload));
        assert_eq!(
            parse_request(b"reload worker=3"),
            master(ControlRequest::ReloadInstance { index: 3 })
        );
        for bad in [
            "reload worker=-1",
            "reload worker=",
            "reload worker=4294967296",
            "reload 3",
        ] {
            let refused = parse_request(bad.as_bytes()).unwrap_err();
            assert!(refused.starts_with("err bad reload request "), "{bad}: {refused}");
            assert!(
                refused.ends_with("expected reload worker=<number>\n"),
                "{refused}"
            );
        }
        assert_eq!(parse_request(b"stop"), master(ControlRequest::Stop));
        assert_eq!(parse_request(b"upgrade"), master(ControlRequest::Upgrade));
        assert_eq!(parse_request(b"wait"), Ok(Request::Wait));
        let refused = parse_request(b"rm -rf").unwrap_err();
        assert_eq!(
            refused,
            "err unknown request rm%20-rf: expected ping, stat, reload [worker=<n>], stop, upgrade, wait or events\n"
        );
        let events = |since| Ok(Request::Master(ControlRequest::Events { since }));
        assert_eq!(parse_request(b"events"), events(0));
        assert_eq!(parse_request(b"events since=42"), events(42));
        assert_eq!(
            parse_request(b" events  since=18446744073709551615 "),
            events(u64::MAX)
        );
        for bad in [
            "events since=-1",
            "events since=",
            "events since=99999999999999999999",
            "events 3",
        ] {
            let refused = parse_request(bad.as_bytes()).unwrap_err();
            assert!(refused.starts_with("err bad events request "), "{bad}: {refused}");
            assert!(refused.ends_with("expected events since=<number>\n"), "{refused}");
        }
        assert!(parse_request(b"eventsx").is_err());
        assert!(parse_request(&[0xff, b'x']).is_err(), "not UTF-8");
    }

    #[test]
    fn answers_encode_as_the_protocol_says() {
        let reloads = ReloadCounts {
            started: 3,
            ok: 1,
            failed: 1,
            last_ok: Some(false),
        };
        let none = Duration::ZERO;
        let encode = |a| encode_answer(&a, none, reloads);
        assert_eq!(
            encode(ControlAnswer::Pong { pid: 7 }),
            format!("ok pong pid=7 v={WIRE_VERSION}\n")
        );
        assert_eq!(
            encode(ControlAnswer::ReloadQueued),
            "ok reload queued reloads_started=3 reloads_finished=2\n"
        );
        assert_eq!(
            encode(ControlAnswer::NoSuchInstance(
                crate::cluster::ReloadError::NoSuchInstance {
                    index: 5,
                    instances: 2
                }
            )),
            "err no worker 5: the cluster runs workers 0 to 1\n"
        );
        assert_eq!(encode(ControlAnswer::ShutdownStarted), "ok shutdown started\n");
        assert_eq!(
            encode(ControlAnswer::AlreadyShuttingDown),
            "ok already shutting down\n"
        );
        assert_eq!(
            encode(ControlAnswer::Refused("the cluster is shutting down")),
            "err the cluster is shutting down\n"
        );
        assert_eq!(
            encode(ControlAnswer::UpgradeStarted { pid: 43 }),
            "ok upgrade started pid=43\n"
        );
        assert_eq!(
            encode(ControlAnswer::UpgradeRefused("an upgrade is running".into())),
            "err an upgrade is running\n"
        );
        assert_eq!(upgrade_line(43, None), "upgraded pid=43\n");
        assert_eq!(
            upgrade_line(43, Some("not ready in time")),
            "err upgrade failed: not ready in time\n"
        );
        let stats = ClusterStats {
            master_pid: 42,
            instances: 0,
            shutting_down: false,
            slots: Vec::new(),
            locks: Vec::new(),
        };
        let text = encode_answer(
            &ControlAnswer::Stats {
                stats,
                events_next: 17,
                upgraded_from: Some(4100),
            },
            Duration::from_millis(1500),
            reloads,
        );
        assert_eq!(
            text,
            "ok stat v=1\nmaster pid=42 instances=0 shutting_down=0 uptime_ms=1500 reloads_started=3 \
             reloads_ok=1 reloads_failed=1 last_reload=failed events_next=17 upgraded_from=4100\nend\n"
        );
    }

    #[test]
    fn events_encode_one_line_each_between_a_head_and_end() {
        let event = |seq, kind, slot, pid| Event {
            seq,
            kind,
            slot,
            index: slot,
            pid,
            generation: 2,
        };
        let events = [
            event(5, EventKind::Exit(ExitReason::Signaled(9)), 1, 4242),
            event(6, EventKind::ReloadStarted, u32::MAX, 0),
            event(7, EventKind::Online, 0, 17),
        ];
        let text = encode_answer(
            &ControlAnswer::Events {
                events: events.to_vec(),
                next: 8,
            },
            Duration::ZERO,
            ReloadCounts::default(),
        );
        assert_eq!(
            text,
            "ok events next=8 count=3\n\
             event seq=5 kind=crashed slot=1 index=1 pid=4242 gen=2 \
             text=worker%201%20ended:%20killed%20by%20signal%209%20%28slot%201%2C%20pid%204242%2C%20generation%202%29\n\
             event seq=6 kind=reload-started slot=- index=- pid=- gen=2 text=reload%20started%20%28generation%202%29\n\
             event seq=7 kind=online slot=0 index=0 pid=17 gen=2 \
             text=worker%200%20online%20%28slot%200%2C%20pid%2017%2C%20generation%202%29\n\
             end\n"
        );
        let empty = encode_answer(
            &ControlAnswer::Events {
                events: Vec::new(),
                next: 0,
            },
            Duration::ZERO,
            ReloadCounts::default(),
        );
        assert_eq!(empty, "ok events next=0 count=0\nend\n");
        assert_eq!(kind_word(EventKind::Exit(ExitReason::Reloaded)), "exited");
        assert_eq!(kind_word(EventKind::Exit(ExitReason::Exited(1))), "crashed");
    }

    #[test]
    fn only_the_bridges_row_carries_a_role() {
        let row = |slot, bridge| crate::cluster::SlotStats {
            slot,
            index: Some(slot),
            state: crate::WorkerState::Ready,
            pid: 10 + slot,
            generation: 1,
            restarts: 0,
            last_exit: None,
            heartbeat_age: None,
            sent_messages: 0,
            sent_bytes: 0,
            received_messages: 0,
            received_bytes: 0,
            inbox_bytes: 0,
            futex_waits: 0,
            futex_wakes: 0,
            full_waits: 0,
            last_request: None,
            last_map: None,
            bridge,
        };
        let stats = ClusterStats {
            master_pid: 42,
            instances: 1,
            shutting_down: false,
            slots: vec![row(0, false), row(1, true)],
            locks: Vec::new(),
        };
        let text = encode_answer(
            &ControlAnswer::Stats {
                stats,
                events_next: 0,
                upgraded_from: None,
            },
            Duration::ZERO,
            ReloadCounts::default(),
        );
        let slots: Vec<&str> = text.lines().filter(|l| l.starts_with("slot ")).collect();
        assert_eq!(slots.len(), 2, "{text}");
        assert!(!slots[0].contains("role="), "{text}");
        assert!(slots[1].ends_with(" last_map_us=- role=bridge"), "{text}");
    }
}
