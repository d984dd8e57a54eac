//! The loop of `shmcluster top`: every interval one `stat` request, and
//! an `events since=<next>` one only when `stat` says there are new events
//! (each a short connection of its own, answered from the master's loop
//! without blocking it); keys in between; the terminal given back on
//! every way out.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::DefaultTerminal;

use super::model::{self, Action, Key, Model};
use super::view;
use crate::client::{self, ClientError, Snapshot};

/// The terminal in raw mode on the alternate screen; given back when
/// dropped (any return, `?` included). A panic gives it back too: ratatui's
/// `try_init` installs a hook that restores it before the panic message.
struct Screen(DefaultTerminal);

impl Screen {
    fn enter() -> io::Result<Self> {
        match ratatui::try_init() {
            Ok(terminal) => Ok(Self(terminal)),
            Err(e) => {
                ratatui::restore();
                Err(e)
            }
        }
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = self.0.show_cursor();
        ratatui::restore();
    }
}

/// The longest the loop waits for a key before it looks at its signals.
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// `SIGTERM`, `SIGHUP` and `SIGINT`, blocked and read from a
/// `signalfd(2)`: top then ends as on `q`, giving the terminal back,
/// instead of dying with it in raw mode. (Ctrl-C in raw mode is a key,
/// not a signal.)
fn quit_signals() -> io::Result<SignalFd> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGHUP, Signal::SIGINT] {
        set.add(s);
    }
    set.thread_block()?;
    Ok(SignalFd::with_flags(
        &set,
        SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
    )?)
}

/// Runs until the user quits; returns the exit code: 0 on a key, 128 +
/// the signal's number on one of [`quit_signals`].
pub fn run(path: &Path, interval: Duration) -> io::Result<u8> {
    let signals = quit_signals()?;
    let mut model = Model::new();
    refresh(path, &mut model, true);
    let mut screen = Screen::enter()?;
    let mut next = Instant::now() + interval;
    loop {
        if let Some(info) = signals.read_signal()? {
            return Ok(128u8.saturating_add(info.ssi_signo as u8));
        }
        screen.0.draw(|f| view::draw(f, &model, interval))?;
        let wait = next.saturating_duration_since(Instant::now());
        if event::poll(wait.min(SIGNAL_CHECK))? {
            let Some(key) = key(event::read()?) else {
                continue; // a resize (drawn again above), a release
            };
            match model.key(key) {
                Action::None => continue,
                Action::Quit => return Ok(0),
                Action::Reload => {
                    model.message = Some(match client::request(path, "reload") {
                        Ok(_) => "reload queued".into(),
                        Err(e) => e.to_string(),
                    });
                }
                Action::Stop => {
                    model.message = Some(match client::request(path, "stop") {
                        Ok(answer) => format!("stop: {}", answer.trim_start_matches("ok ").trim_end()),
                        Err(e) => e.to_string(),
                    });
                }
            }
        } else if Instant::now() < next {
            continue;
        }
        refresh(path, &mut model, false);
        next = Instant::now() + interval;
    }
}

/// The terminal's key as the model's, if it is one the model knows.
fn key(event: Event) -> Option<Key> {
    let Event::Key(k) = event else {
        return None;
    };
    if k.kind != KeyEventKind::Press {
        return None;
    }
    Some(match k.code {
        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => Key::Interrupt,
        KeyCode::Up => Key::Up,
        KeyCode::Down => Key::Down,
        KeyCode::Esc => Key::Esc,
        KeyCode::Char(c) => Key::Char(c),
        _ => return None,
    })
}

/// Asks the master for its figures and new events. A master that no
/// longer answers is shown as gone (and asked again next time).
fn refresh(path: &Path, model: &mut Model, first: bool) {
    let stat = client::request(path, "stat").and_then(|r| Snapshot::parse(&r));
    let events_next = match stat {
        Ok(snap) => {
            let next = snap.master.num("events_next");
            model.apply_stat(snap);
            next
        }
        Err(e) => return model.master_gone(why(e)),
    };
    // Most refreshes: nothing new, one connection.
    if !model.wants_events(events_next) {
        return;
    }
    let since = format!("events since={}", model.next_event);
    match client::request(path, &since).and_then(|r| model::parse_events(&r)) {
        Ok((events, next)) => model.apply_events(events, next, (!first).then(Instant::now)),
        Err(e) => model.master_gone(why(e)),
    }
}

fn why(e: ClientError) -> String {
    match e {
        ClientError::Connect { error, .. } => format!("no answer ({error})"),
        e => e.to_string(),
    }
}
