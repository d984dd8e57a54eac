//! Drawing the [`Model`] with ratatui: a header, the workers table, the
//! selected worker's message-rate sparkline, the locks, recent events and
//! a footer with the keys (or the stop question).

use std::time::{Duration, Instant};

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Sparkline, Table, TableState};
use ratatui::Frame;

use super::model::{printable, Model, WorkerRow};

/// Draws the whole screen.
pub fn draw(frame: &mut Frame<'_>, model: &Model, interval: Duration) {
    let locks = (model.locks.len() as u16).clamp(1, 6) + 3;
    let workers = (model.workers.len() as u16).max(1) + 3;
    let [header, table, spark, lock_area, events, footer] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Length(workers),
        Constraint::Length(5),
        Constraint::Length(locks),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    draw_header(frame, header, model, interval);
    draw_workers(frame, table, model);
    draw_sparkline(frame, spark, model);
    draw_locks(frame, lock_area, model);
    draw_events(frame, events, model);
    draw_footer(frame, footer, model);
}

/// `1h02m03s`, `2m05s`, `7s`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

/// `850us`, `12ms`, `1.5s`.
fn age(d: Duration) -> String {
    match d.as_micros() {
        us if us < 1000 => format!("{us}us"),
        us if us < 1_000_000 => format!("{}ms", us / 1000),
        _ => format!("{:.1}s", d.as_secs_f64()),
    }
}

fn rate(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{r:.0}"))
}

/// `history` as block characters, scaled to its own maximum, the last
/// `width` points.
pub fn spark_text(history: &[u64], width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let tail = &history[history.len().saturating_sub(width)..];
    let max = tail.iter().copied().max().unwrap_or(0);
    tail.iter()
        .map(|&v| match max {
            0 => ' ',
            _ => BARS[((u128::from(v) * 7 + u128::from(max / 2)) / u128::from(max)).min(7) as usize],
        })
        .collect()
}

fn draw_header(frame: &mut Frame<'_>, area: Rect, model: &Model, interval: Duration) {
    let mut lines = Vec::new();
    match &model.header {
        None => lines.push(Line::from("waiting for the master's first answer...")),
        Some(h) => {
            let state = if h.shutting_down {
                "shutting down"
            } else {
                "running"
            };
            lines.push(Line::from(format!(
                "master pid {}  up {}  {} instances, {} live  {state}",
                h.pid,
                h.uptime.map_or_else(|| "-".into(), duration),
                h.instances,
                h.live,
            )));
            let (started, ok, failed) = h.reloads;
            lines.push(Line::from(format!(
                "reloads: {started} started, {ok} ok, {failed} failed (last {})  refresh every {}",
                h.last_reload,
                age(interval),
            )));
        }
    }
    let mut title = vec![Span::from(" shmcluster top ").bold()];
    if let Some(why) = &model.gone {
        title.push(Span::from(format!(" master gone: {} ", printable(why))).reversed());
    }
    let block = Block::bordered().title(Line::from(title));
    frame.render_widget(Paragraph::new(lines).block(block), area);
}

fn worker_row(w: &WorkerRow) -> Row<'static> {
    let cells = [
        w.slot.to_string(),
        w.index.clone(),
        w.state.clone(),
        w.pid.map_or_else(|| "-".into(), |p| p.to_string()),
        w.generation.to_string(),
        w.restarts.to_string(),
        w.heartbeat_age.map_or_else(|| "-".into(), age),
        rate(w.sent_rate),
        rate(w.received_rate),
        w.inbox_bytes.to_string(),
        spark_text(&w.history, 16),
    ];
    let row = Row::new(cells.map(Cell::from));
    if w.restarted || w.state == "Dead" {
        row.style(Style::default().add_modifier(Modifier::BOLD))
    } else {
        row
    }
}

fn draw_workers(frame: &mut Frame<'_>, area: Rect, model: &Model) {
    let header = Row::new([
        "SLOT",
        "INST",
        "STATE",
        "PID",
        "GEN",
        "RESTARTS",
        "HEARTBEAT",
        "SENT/S",
        "RECV/S",
        "INBOX B",
        "MSGS/S",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    // Fits 80 columns with the sparkline squeezed out; it takes the rest.
    let widths = [
        Constraint::Length(4),
        Constraint::Length(6),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(3),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Min(0),
    ];
    let table = Table::new(model.workers.iter().map(worker_row), widths)
        .header(header)
        .block(Block::bordered().title(" workers (up/down to select) "))
        .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED))
        .highlight_symbol("> ");
    let mut state =
        TableState::default().with_selected((!model.workers.is_empty()).then_some(model.selected));
    frame.render_stateful_widget(table, area, &mut state);
}

fn draw_sparkline(frame: &mut Frame<'_>, area: Rect, model: &Model) {
    let (title, data) = match model.selected_worker() {
        Some(w) => (
            format!(
                " slot {} (pid {}, last exit {}): messages/s sent+received, last {} ",
                w.slot,
                w.pid.map_or_else(|| "-".into(), |p| p.to_string()),
                w.last_exit,
                w.history.len()
            ),
            w.history.clone(),
        ),
        None => (" no worker selected ".to_string(), Vec::new()),
    };
    let width = area.width.saturating_sub(2) as usize;
    let data = data[data.len().saturating_sub(width)..].to_vec();
    frame.render_widget(
        Sparkline::default()
            .block(Block::bordered().title(title))
            .data(&data),
        area,
    );
}

fn draw_locks(frame: &mut Frame<'_>, area: Rect, model: &Model) {
    let header = Row::new(["LOCK", "HOLDER", "HELD", "ACQUIRED", "WAITS", "OWNER DIED"])
        .style(Style::default().add_modifier(Modifier::BOLD));
    let rows = model.locks.iter().map(|l| {
        Row::new([
            l.name.clone(),
            l.holder
                .map_or_else(|| "free".into(), |(slot, pid)| format!("slot {slot} pid {pid}")),
            l.held.map_or_else(|| "-".into(), age),
            l.acquisitions.to_string(),
            l.waits.to_string(),
            l.owner_died.to_string(),
        ])
    });
    let widths = [
        Constraint::Min(16),
        Constraint::Length(20),
        Constraint::Length(9),
        Constraint::Length(10),
        Constraint::Length(8),
        Constraint::Length(10),
    ];
    let table = Table::new(rows, widths)
        .header(header)
        .block(Block::bordered().title(" locks "));
    frame.render_widget(table, area);
}

fn draw_events(frame: &mut Frame<'_>, area: Rect, model: &Model) {
    let now = Instant::now();
    let shown = area.height.saturating_sub(2) as usize;
    // Newest first: the latest is always in sight.
    let lines: Vec<Line<'_>> = model
        .events
        .iter()
        .rev()
        .take(shown)
        .map(|e| {
            let when = e.seen.map_or_else(
                || "earlier".into(),
                |t| format!("{} ago", duration(now.saturating_duration_since(t))),
            );
            let line = Line::from(format!("#{:<5} {when:>9}  {}", e.seq, e.text));
            if e.kind == "crashed" || e.kind == "crash-loop" || e.kind == "reload-failed" {
                line.bold()
            } else {
                line
            }
        })
        .collect();
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" recent events (newest first) ")),
        area,
    );
}

fn draw_footer(frame: &mut Frame<'_>, area: Rect, model: &Model) {
    let line = if model.confirm_stop {
        Line::from(" Stop the cluster? (y/n) ").reversed()
    } else {
        let keys = if model.gone.is_some() {
            "q quit".to_string()
        } else {
            "up/down or j/k select   w reload worker   r reload all   s stop   q quit".to_string()
        };
        match &model.message {
            Some(m) => Line::from(format!(" {keys}   | {}", printable(m))),
            None => Line::from(format!(" {keys}")),
        }
    };
    frame.render_widget(Paragraph::new(line), area);
}

#[cfg(test)]
mod tests {
    use super::super::model::EventRow;
    use super::*;
    use crate::client::Snapshot;
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn screen(model: &Model) -> String {
        screen_of(model, 120, 40)
    }

    fn screen_of(model: &Model, width: u16, height: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|f| draw(f, model, Duration::from_secs(1))).unwrap();
        let buffer = terminal.backend().buffer();
        let mut text = String::new();
        for y in 0..buffer.area.height {
            for x in 0..buffer.area.width {
                text.push_str(buffer[(x, y)].symbol());
            }
            text.push('\n');
        }
        text
    }

    const STAT: &str = "ok stat v=1\n\
        master pid=4242 instances=2 shutting_down=0 uptime_ms=125000 reloads_started=2 reloads_ok=1 reloads_failed=1 last_reload=failed\n\
        slot id=0 index=0 state=Ready pid=4243 gen=1 restarts=0 last_exit=- hb_age_us=2500 sent=10 sent_bytes=0 received=5 received_bytes=0 inbox_bytes=64 futex_waits=0 futex_wakes=0 full_waits=0 last_request_us=- last_map_us=-\n\
        slot id=1 index=1 state=Starting pid=4250 gen=3 restarts=2 last_exit=Signaled%289%29 hb_age_us=- sent=0 sent_bytes=0 received=0 received_bytes=0 inbox_bytes=0 futex_waits=0 futex_wakes=0 full_waits=0 last_request_us=- last_map_us=-\n\
        slot id=2 index=- state=Free pid=0 gen=0 restarts=0 last_exit=- hb_age_us=- sent=0 sent_bytes=0 received=0 received_bytes=0 inbox_bytes=0 futex_waits=0 futex_wakes=0 full_waits=0 last_request_us=- last_map_us=-\n\
        lock name=jobs holder_slot=0 holder_pid=4243 held_us=1200 acquisitions=9 waits=3 owner_died=1 token=9\n\
        end\n";

    #[test]
    fn the_screen_shows_header_workers_locks_and_events() {
        let mut model = Model::new();
        model.apply_stat(Snapshot::parse(STAT).unwrap());
        model.apply_events(
            vec![
                EventRow {
                    seq: 7,
                    kind: "crashed".into(),
                    text: "worker 1 ended: killed by signal 9 (slot 1, pid 4244, generation 2)".into(),
                    seen: None,
                },
                EventRow {
                    seq: 8,
                    kind: "spawned".into(),
                    text: "worker 1 spawned (slot 1, pid 4250, generation 3)".into(),
                    seen: None,
                },
            ],
            9,
            Some(Instant::now()),
        );
        let text = screen(&model);
        assert!(
            text.contains("master pid 4242  up 2m05s  2 instances, 2 live  running"),
            "{text}"
        );
        assert!(
            text.contains("reloads: 2 started, 1 ok, 1 failed (last failed)"),
            "{text}"
        );
        let row = |pid: &str| text.lines().find(|l| l.contains(pid)).unwrap_or("").to_string();
        let first = row(" 4243 ");
        assert!(
            first.contains("> 0") && first.contains("Ready") && first.contains("2ms"),
            "{text}"
        );
        model.key(super::super::model::Key::Down);
        let text = screen(&model);
        assert!(
            text.contains("slot 1 (pid 4250, last exit Signaled(9))"),
            "{text}"
        );
        let row = |pid: &str| text.lines().find(|l| l.contains(pid)).unwrap_or("").to_string();
        let second = row(" 4250 ");
        assert!(
            second.contains("> 1")
                && second.contains("Starting")
                && second.contains(" 3 ")
                && second.contains(" 2 "),
            "{second}"
        );
        assert!(!text.contains("Free"), "{text}");
        assert!(
            text.contains("jobs") && text.contains("slot 0 pid 4243"),
            "{text}"
        );
        // Newest first.
        let spawned = text.find("#8").unwrap();
        let crashed = text.find("#7").unwrap();
        assert!(spawned < crashed, "{text}");
        assert!(text.contains("worker 1 ended: killed by signal 9"), "{text}");
        assert!(
            text.contains("w reload worker   r reload all   s stop   q quit"),
            "{text}"
        );
        assert!(!text.contains("master gone"));
    }

    #[test]
    fn stop_asks_and_a_gone_master_is_said() {
        let mut model = Model::new();
        model.apply_stat(Snapshot::parse(STAT).unwrap());
        model.key(super::super::model::Key::Char('s'));
        assert!(screen(&model).contains("Stop the cluster? (y/n)"));
        model.master_gone("connection refused".into());
        let text = screen(&model);
        assert!(text.contains("master gone: connection refused"), "{text}");
        assert!(text.contains(" q quit") && !text.contains("r reload"), "{text}");
        assert!(text.contains("4243"), "the last table stays: {text}");
    }

    #[test]
    fn every_column_fits_80_columns() {
        let mut model = Model::new();
        model.apply_stat(Snapshot::parse(STAT).unwrap());
        let text = screen_of(&model, 80, 24);
        for header in [
            "SLOT",
            "INST",
            "STATE",
            "PID",
            "GEN",
            "RESTARTS",
            "HEARTBEAT",
            "SENT/S",
            "RECV/S",
            "INBOX B",
        ] {
            assert!(text.contains(header), "{header}: {text}");
        }
        let row = text.lines().find(|l| l.contains("4250")).unwrap();
        assert!(row.contains(" Starting "), "{row}");
    }

    #[test]
    fn absurd_counters_still_draw() {
        let mut model = Model::new();
        let first = Snapshot::parse(STAT).unwrap();
        let at = first.at;
        model.apply_stat(first);
        let mut second = Snapshot::parse(&STAT.replace("sent=10 ", "sent=18446744073709551615 ")).unwrap();
        second.at = at + Duration::from_millis(1);
        model.apply_stat(second);
        assert!(screen(&model).contains("4243"));
    }

    #[test]
    fn sparkline_text_scales_to_its_maximum() {
        assert_eq!(spark_text(&[], 4), "");
        assert_eq!(spark_text(&[0, 0], 4), "  ");
        assert_eq!(spark_text(&[0, 5, 10], 4), "▁▅█");
        assert_eq!(spark_text(&[10, 0, 10], 2), "▁█");
        assert_eq!(spark_text(&[u64::MAX, 0], 2), "█▁");
        assert_eq!(duration(Duration::from_secs(3725)), "1h02m05s");
    }
}
