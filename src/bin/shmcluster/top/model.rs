//! What `shmcluster top` shows, as plain state: built from the master's
//! `stat` and `events` answers and from keys, without a terminal (so that
//! it is tested as values). The view draws it; the app feeds it.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::client::{ClientError, Fields, Snapshot};
use shmcluster::control_codec::unescape;

/// Rates kept per slot for its sparkline.
pub const HISTORY: usize = 60;

/// Events kept for the events pane (the master answers at most 64 at a
/// time; more than a screen holds).
pub const EVENTS_KEPT: usize = 200;

/// The largest sparkline point: ratatui's sparkline multiplies a point by
/// the bar height in eighths, which must not overflow whatever counters a
/// broken master or worker reports.
const MAX_POINT: u64 = u32::MAX as u64;

/// `text` safe to put on the terminal: control characters (an escape
/// sequence in a lock's name or an event, from any worker) shown as `?`
/// instead of being sent to the terminal.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// One worker row of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRow {
    /// The slot (its row key: counters are per slot).
    pub slot: u32,
    /// The instance it runs (`-` if none, `bridge` for the NATS bridge).
    pub index: String,
    /// `Starting`, `Ready`, `Draining`, `Dead`, ...
    pub state: String,
    /// Its process, if one runs there.
    pub pid: Option<u64>,
    /// Which worker of the slot this is (1, 2, ...).
    pub generation: u64,
    /// Workers of the slot replaced after dying.
    pub restarts: u64,
    /// Time since its last heartbeat was seen.
    pub heartbeat_age: Option<Duration>,
    /// Messages sent per second since the previous snapshot.
    pub sent_rate: Option<f64>,
    /// Messages received per second since the previous snapshot.
    pub received_rate: Option<f64>,
    /// Bytes waiting in its inbox.
    pub inbox_bytes: u64,
    /// Recent messages per second (sent + received), oldest first.
    pub history: Vec<u64>,
    /// Its restart count went up at the last refresh.
    pub restarted: bool,
    /// How the slot's previous worker ended (`-` if none did).
    pub last_exit: String,
}

/// One lock row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockRow {
    /// Its name (`(global)` for the unnamed one).
    pub name: String,
    /// Slot and pid of its holder, if held.
    pub holder: Option<(u64, u64)>,
    /// For how long it has been held.
    pub held: Option<Duration>,
    /// Acquisitions since the master started.
    pub acquisitions: u64,
    /// Acquisitions that had to wait.
    pub waits: u64,
    /// Holders that died holding it.
    pub owner_died: u64,
}

/// One event of the master's log (`events` answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    /// Its number in the master's log.
    pub seq: u64,
    /// `spawned`, `online`, `crashed`, `reload-started`, ...
    pub kind: String,
    /// The master's line for it.
    pub text: String,
    /// When this view first saw it (`None`: it was already in the log
    /// when the view started).
    pub seen: Option<Instant>,
}

/// The master's line of the header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Header {
    /// The master's pid.
    pub pid: String,
    /// Instances it runs.
    pub instances: String,
    /// Workers running now.
    pub live: usize,
    /// The master's uptime.
    pub uptime: Option<Duration>,
    /// Whether it is shutting down.
    pub shutting_down: bool,
    /// Reloads started, finished ok, failed.
    pub reloads: (u64, u64, u64),
    /// `ok`, `failed` or `-`.
    pub last_reload: String,
}

/// A key, as the model understands it (the app maps the terminal's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// Arrow up or `k`.
    Up,
    /// Arrow down or `j`.
    Down,
    /// Esc.
    Esc,
    /// Ctrl-C.
    Interrupt,
    /// Any other character.
    Char(char),
}

/// What a key asks the app to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing beyond the model's own change.
    None,
    /// Leave top.
    Quit,
    /// Ask the master for a rolling reload.
    Reload,
    /// Ask the master to reload this instance alone.
    ReloadWorker(u32),
    /// Ask the master to stop (confirmed).
    Stop,
}

/// Everything on the screen.
#[derive(Debug, Default)]
pub struct Model {
    /// The master's line; `None` before the first snapshot.
    pub header: Option<Header>,
    /// Slots with a worker (or a dead one being restarted), by slot.
    pub workers: Vec<WorkerRow>,
    /// The locks.
    pub locks: Vec<LockRow>,
    /// Recent events, oldest first.
    pub events: VecDeque<EventRow>,
    /// What to ask `events since=` next.
    pub next_event: u64,
    /// The selected worker row.
    pub selected: usize,
    /// The master no longer answers: why.
    pub gone: Option<String>,
    /// A line for the footer: the last action's result.
    pub message: Option<String>,
    /// `s` was pressed: waiting for `y` or `n`.
    pub confirm_stop: bool,
    previous: Option<Snapshot>,
    history: HashMap<u32, VecDeque<u64>>,
}

impl Model {
    /// An empty model, before the first answer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes a `stat` snapshot: rows, rates against the previous one, and
    /// the sparklines' next point.
    pub fn apply_stat(&mut self, snap: Snapshot) {
        let m = &snap.master;
        // Another master answers (a binary upgrade: the new one shares the
        // control socket): its counters, event numbers and slots start
        // afresh, so nothing is compared with the old one's.
        let pid = printable(m.get("pid"));
        if let Some(old) = self
            .header
            .as_ref()
            .map(|h| h.pid.clone())
            .filter(|old| *old != pid)
        {
            self.previous = None;
            self.history.clear();
            self.events.clear();
            self.next_event = 0;
            self.selected = 0;
            self.message = Some(format!("a new master: pid {pid} (was {old}), upgraded"));
        }
        let num = |f: &Fields, k: &str| f.num(k).unwrap_or(0);
        self.header = Some(Header {
            pid: printable(m.get("pid")),
            instances: printable(m.get("instances")),
            live: snap.live_workers(),
            uptime: m.num("uptime_ms").map(Duration::from_millis),
            shutting_down: m.get("shutting_down") == "1",
            reloads: (
                num(m, "reloads_started"),
                num(m, "reloads_ok"),
                num(m, "reloads_failed"),
            ),
            last_reload: printable(m.get("last_reload")),
        });
        let previous = self.previous.take();
        let secs = previous
            .as_ref()
            .map_or(0.0, |p| snap.at.saturating_duration_since(p.at).as_secs_f64());
        let mut workers = Vec::new();
        for s in &snap.slots {
            let Some(slot) = s.num("id").and_then(|id| u32::try_from(id).ok()) else {
                continue;
            };
            let before = previous
                .as_ref()
                .and_then(|p| p.slots.iter().find(|b| b.num("id") == Some(u64::from(slot))));
            let state = s.get("state");
            if state == "Free" {
                self.history.remove(&slot);
                continue;
            }
            let rate = |key: &str| match (s.num(key), before.and_then(|b| b.num(key))) {
                (Some(now), Some(then)) if secs > 0.0 => Some(now.saturating_sub(then) as f64 / secs),
                _ => None,
            };
            let (sent_rate, received_rate) = (rate("sent"), rate("received"));
            let history = self.history.entry(slot).or_default();
            if let (Some(a), Some(b)) = (sent_rate, received_rate) {
                if history.len() == HISTORY {
                    history.pop_front();
                }
                history.push_back(((a + b).round() as u64).min(MAX_POINT));
            }
            let restarts = num(s, "restarts");
            workers.push(WorkerRow {
                slot,
                index: if s.get("role") == "bridge" {
                    "bridge".into()
                } else {
                    printable(s.get("index"))
                },
                state: printable(state),
                pid: s.num("pid").filter(|&p| p != 0),
                generation: num(s, "gen"),
                restarts,
                heartbeat_age: s.num("hb_age_us").map(Duration::from_micros),
                sent_rate,
                received_rate,
                inbox_bytes: num(s, "inbox_bytes"),
                history: history.iter().copied().collect(),
                restarted: before
                    .and_then(|b| b.num("restarts"))
                    .is_some_and(|r| restarts > r),
                last_exit: printable(s.get("last_exit")),
            });
        }
        self.workers = workers;
        self.locks = snap
            .locks
            .iter()
            .map(|l| LockRow {
                name: match l.get("name") {
                    "" | "-" => "(global)".into(),
                    n => printable(n),
                },
                holder: l.num("holder_slot").zip(l.num("holder_pid")),
                held: l.num("held_us").map(Duration::from_micros),
                acquisitions: num(l, "acquisitions"),
                waits: num(l, "waits"),
                owner_died: num(l, "owner_died"),
            })
            .collect();
        self.selected = self.selected.min(self.workers.len().saturating_sub(1));
        self.gone = None;
        self.previous = Some(snap);
    }

    /// Takes an `events` answer: new events in order of their numbers
    /// (those seen already left out), at most [`EVENTS_KEPT`] kept.
    /// `seen` is `None` for the first answer (events from before the view
    /// started).
    pub fn apply_events(&mut self, mut events: Vec<EventRow>, next: u64, seen: Option<Instant>) {
        events.sort_by_key(|e| e.seq);
        let last = self.events.back().map(|e| e.seq);
        for mut e in events {
            if last.is_some_and(|l| e.seq <= l) || self.events.iter().any(|k| k.seq == e.seq) {
                continue;
            }
            e.seen = seen;
            self.events.push_back(e);
        }
        while self.events.len() > EVENTS_KEPT {
            self.events.pop_front();
        }
        self.next_event = next;
    }

    /// Whether to ask the master for events, given the `events_next` of
    /// its last `stat` (`None`: a master that does not say): only when it
    /// has published events this view has not asked for.
    pub fn wants_events(&self, events_next: Option<u64>) -> bool {
        events_next != Some(self.next_event)
    }

    /// The pid of the master that answered last.
    pub fn master_pid(&self) -> Option<u32> {
        self.header.as_ref().and_then(|h| h.pid.parse().ok())
    }

    /// The master stopped answering.
    pub fn master_gone(&mut self, why: String) {
        self.gone = Some(why);
        self.confirm_stop = false;
    }

    /// The selected worker, if any.
    pub fn selected_worker(&self) -> Option<&WorkerRow> {
        self.workers.get(self.selected)
    }

    /// A key: moves the selection, asks for confirmation, or returns what
    /// the app should do.
    pub fn key(&mut self, key: Key) -> Action {
        if self.confirm_stop {
            self.confirm_stop = false;
            return match key {
                Key::Char('y' | 'Y') => Action::Stop,
                Key::Interrupt => Action::Quit,
                _ => {
                    self.message = Some("stop cancelled".into());
                    Action::None
                }
            };
        }
        match key {
            Key::Char('q') | Key::Esc | Key::Interrupt => Action::Quit,
            Key::Up | Key::Char('k') => {
                self.selected = self.selected.saturating_sub(1);
                Action::None
            }
            Key::Down | Key::Char('j') => {
                self.selected = (self.selected + 1).min(self.workers.len().saturating_sub(1));
                Action::None
            }
            Key::Char('r') if self.gone.is_none() => Action::Reload,
            // The selected row's instance (none for a spare slot or the
            // NATS bridge, which a reload never replaces).
            Key::Char('w') if self.gone.is_none() => {
                match self.selected_worker().and_then(|w| w.index.parse().ok()) {
                    Some(index) => Action::ReloadWorker(index),
                    None => {
                        self.message = Some("the selected row runs no instance".into());
                        Action::None
                    }
                }
            }
            Key::Char('s') if self.gone.is_none() => {
                self.confirm_stop = true;
                Action::None
            }
            _ => Action::None,
        }
    }
}

/// Parses an `events` answer into its rows and the `next` number.
pub fn parse_events(response: &str) -> Result<(Vec<EventRow>, u64), ClientError> {
    let mut lines = response.lines();
    let head = lines.next().unwrap_or("");
    let next = head
        .strip_prefix("ok events ")
        .and_then(|rest| rest.split_whitespace().find_map(|kv| kv.strip_prefix("next=")))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| ClientError::Protocol(head.to_string()))?;
    let mut events = Vec::new();
    for line in lines {
        if line == "end" {
            return Ok((events, next));
        }
        let Some(rest) = line.strip_prefix("event ") else {
            continue; // a newer master's extra lines
        };
        let field = |key: &str| {
            rest.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .map(unescape)
        };
        if let Some(seq) = field("seq").and_then(|s| s.parse().ok()) {
            events.push(EventRow {
                seq,
                kind: field("kind").unwrap_or_default(),
                text: printable(&field("text").unwrap_or_default()),
                seen: None,
            });
        }
    }
    Err(ClientError::Protocol("the events response was cut short".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(at: Instant, rows: &[(u32, &str, u32, u32, u32, u64, u64)]) -> Snapshot {
        let mut text = String::from(
            "ok stat v=1\nmaster pid=42 instances=2 shutting_down=0 uptime_ms=65000 reloads_started=1 \
             reloads_ok=1 reloads_failed=0 last_reload=ok\n",
        );
        for &(id, state, pid, generation, restarts, sent, received) in rows {
            text.push_str(&format!(
                "slot id={id} index={id} state={state} pid={pid} gen={generation} restarts={restarts} \
                 last_exit=- hb_age_us=1500 sent={sent} sent_bytes=0 received={received} \
                 received_bytes=0 inbox_bytes=7 futex_waits=0 futex_wakes=0 full_waits=0 \
                 last_request_us=- last_map_us=-\n"
            ));
        }
        text.push_str("lock name= holder_slot=1 holder_pid=11 held_us=2000 acquisitions=5 waits=2 owner_died=0 token=5\nend\n");
        let mut snap = Snapshot::parse(&text).unwrap();
        snap.at = at;
        snap
    }

    #[test]
    fn rates_come_from_two_snapshots() {
        let t0 = Instant::now();
        let mut model = Model::new();
        model.apply_stat(stat(
            t0,
            &[(0, "Ready", 10, 1, 0, 100, 50), (1, "Free", 0, 0, 0, 0, 0)],
        ));
        assert_eq!(model.workers.len(), 1, "free slots are not shown");
        assert_eq!(model.workers[0].sent_rate, None, "one snapshot has no rate");
        assert!(model.workers[0].history.is_empty());
        let header = model.header.clone().unwrap();
        assert_eq!((header.pid.as_str(), header.live), ("42", 1));
        assert_eq!(header.uptime, Some(Duration::from_secs(65)));
        model.apply_stat(stat(
            t0 + Duration::from_secs(2),
            &[(0, "Ready", 10, 1, 0, 300, 150)],
        ));
        let w = &model.workers[0];
        assert_eq!((w.sent_rate, w.received_rate), (Some(100.0), Some(50.0)));
        assert_eq!(w.history, [150]);
        assert_eq!(w.heartbeat_age, Some(Duration::from_micros(1500)));
        assert_eq!(w.inbox_bytes, 7);
        assert!(!w.restarted);
        assert_eq!(model.locks[0].name, "(global)");
        assert_eq!(model.locks[0].holder, Some((1, 11)));
        assert_eq!((model.locks[0].acquisitions, model.locks[0].waits), (5, 2));
        for k in 3..=(HISTORY as u64 + 5) {
            model.apply_stat(stat(
                t0 + Duration::from_secs(k),
                &[(0, "Ready", 10, 1, 0, 300, 150)],
            ));
        }
        assert_eq!(
            model.workers[0].history.len(),
            HISTORY,
            "the sparkline is bounded"
        );
        // A counter that jumps absurdly (a broken peer) stays drawable.
        model.apply_stat(stat(
            t0 + Duration::from_secs(100),
            &[(0, "Ready", 10, 1, 0, u64::MAX, 150)],
        ));
        assert_eq!(model.workers[0].history.last(), Some(&MAX_POINT));
    }

    #[test]
    fn a_restart_shows_its_new_pid_and_count() {
        let t0 = Instant::now();
        let mut model = Model::new();
        model.apply_stat(stat(
            t0,
            &[(0, "Ready", 10, 1, 0, 100, 0), (1, "Ready", 11, 1, 0, 0, 0)],
        ));
        model.apply_stat(stat(
            t0 + Duration::from_secs(1),
            &[(0, "Ready", 10, 1, 0, 100, 0), (1, "Dead", 0, 1, 0, 0, 0)],
        ));
        assert_eq!(model.workers[1].pid, None, "no process while it is down");
        // Counters are per slot over its generations: never negative.
        model.apply_stat(stat(
            t0 + Duration::from_secs(2),
            &[(0, "Ready", 10, 1, 0, 100, 0), (1, "Starting", 12, 2, 1, 0, 0)],
        ));
        let w = &model.workers[1];
        assert_eq!(
            (w.pid, w.generation, w.restarts, w.restarted),
            (Some(12), 2, 1, true)
        );
        assert_eq!(w.sent_rate, Some(0.0));
        model.apply_stat(stat(
            t0 + Duration::from_secs(3),
            &[(0, "Ready", 10, 1, 0, 100, 0), (1, "Ready", 12, 2, 1, 0, 0)],
        ));
        assert!(
            !model.workers[1].restarted,
            "marked at the refresh it happened only"
        );
    }

    fn event(seq: u64) -> EventRow {
        EventRow {
            seq,
            kind: "spawned".into(),
            text: format!("event {seq}"),
            seen: None,
        }
    }

    #[test]
    fn events_are_kept_in_order_once_each_and_bounded() {
        let mut model = Model::new();
        model.apply_events(vec![event(3), event(1), event(2)], 4, None);
        let seqs = |m: &Model| m.events.iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(&model), [1, 2, 3]);
        assert_eq!(model.next_event, 4);
        let now = Instant::now();
        model.apply_events(vec![event(3), event(5), event(4)], 6, Some(now));
        assert_eq!(seqs(&model), [1, 2, 3, 4, 5]);
        assert_eq!(model.events[0].seen, None);
        assert_eq!(model.events[4].seen, Some(now));
        model.apply_events((6..6 + EVENTS_KEPT as u64).map(event).collect(), 9999, Some(now));
        assert_eq!(model.events.len(), EVENTS_KEPT);
        assert_eq!(model.events.back().unwrap().seq, 5 + EVENTS_KEPT as u64);
        // Asked again only once the master has published more.
        assert!(!model.wants_events(Some(9999)));
        assert!(model.wants_events(Some(10000)));
        assert!(model.wants_events(None), "a master that does not say is asked");
    }

    /// Another master answering (a binary upgrade) starts the view
    /// afresh: its event numbers begin again, and its counters are not
    /// compared with the old master's.
    #[test]
    fn a_new_master_starts_the_events_and_rates_afresh() {
        let t0 = Instant::now();
        let mut m = Model::new();
        m.apply_stat(stat(t0, &[(0, "Ready", 10, 1, 0, 500, 500)]));
        m.apply_events((1..=30).map(event).collect(), 31, None);
        assert_eq!(m.master_pid(), Some(42));
        let mut again = stat(t0 + Duration::from_secs(1), &[(0, "Ready", 20, 1, 0, 3, 3)]);
        again.master = Snapshot::parse(
            "ok stat v=1\nmaster pid=43 instances=1 shutting_down=0 uptime_ms=900 reloads_started=0 \
             reloads_ok=0 reloads_failed=0 last_reload=-\nend\n",
        )
        .unwrap()
        .master;
        m.apply_stat(again);
        assert_eq!(m.master_pid(), Some(43));
        assert!(m.events.is_empty());
        assert_eq!(m.next_event, 0);
        assert!(m.wants_events(Some(2)));
        m.apply_events(vec![event(0), event(1)], 2, None);
        assert_eq!(m.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(
            m.workers[0].sent_rate, None,
            "no rate against the old master's counters"
        );
        assert!(m
            .message
            .as_deref()
            .is_some_and(|t| t.contains("pid 43 (was 42)")));
    }

    #[test]
    fn an_events_answer_parses_and_a_cut_one_is_an_error() {
        let text = "ok events next=9 count=2\n\
                    event seq=7 kind=crashed slot=1 index=1 pid=43 gen=1 text=worker%201%20ended\n\
                    event seq=8 kind=spawned slot=1 index=1 pid=44 gen=2 text=worker%201%20spawned\n\
                    end\n";
        let (events, next) = parse_events(text).unwrap();
        assert_eq!(next, 9);
        assert_eq!(events.len(), 2);
        assert_eq!((events[0].seq, events[0].kind.as_str()), (7, "crashed"));
        assert_eq!(events[1].text, "worker 1 spawned");
        assert!(parse_events("ok events next=9 count=2\nevent seq=7 kind=x\n").is_err());
        let (events, _) = parse_events("ok events next=1\nevent seq=0 text=a%1B%5B2Jb%0A\nend\n").unwrap();
        assert_eq!(
            events[0].text, "a?[2Jb?",
            "no escape sequence reaches the terminal"
        );
        assert!(parse_events("ok stat v=1\nend\n").is_err());
    }

    #[test]
    fn keys_select_and_stop_asks_first() {
        let mut model = Model::new();
        model.apply_stat(stat(
            Instant::now(),
            &[(0, "Ready", 10, 1, 0, 0, 0), (1, "Ready", 11, 1, 0, 0, 0)],
        ));
        assert_eq!(model.key(Key::Down), Action::None);
        assert_eq!(model.key(Key::Char('j')), Action::None);
        assert_eq!(model.selected, 1, "stays on the last row");
        assert_eq!(model.key(Key::Char('k')), Action::None);
        assert_eq!(model.selected_worker().unwrap().pid, Some(10));
        assert_eq!(model.key(Key::Char('r')), Action::Reload);
        assert_eq!(model.key(Key::Char('w')), Action::ReloadWorker(0));
        model.key(Key::Down);
        assert_eq!(model.key(Key::Char('w')), Action::ReloadWorker(1));
        model.workers[1].index = "bridge".into();
        assert_eq!(model.key(Key::Char('w')), Action::None, "no instance to reload");
        assert_eq!(
            model.message.as_deref(),
            Some("the selected row runs no instance")
        );
        model.key(Key::Up);
        assert_eq!(model.key(Key::Char('s')), Action::None);
        assert!(model.confirm_stop);
        assert_eq!(model.key(Key::Char('n')), Action::None, "anything but y cancels");
        assert!(!model.confirm_stop);
        model.key(Key::Char('s'));
        assert_eq!(model.key(Key::Char('y')), Action::Stop);
        for quit in [Key::Char('q'), Key::Esc, Key::Interrupt] {
            assert_eq!(model.key(quit), Action::Quit);
        }
        model.master_gone("gone".into());
        assert_eq!(model.key(Key::Char('r')), Action::None, "nobody to reload");
        assert_eq!(model.key(Key::Char('w')), Action::None, "nobody to reload");
        assert_eq!(model.key(Key::Char('q')), Action::Quit);
    }
}
