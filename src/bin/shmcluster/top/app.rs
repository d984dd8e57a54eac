//! The loop of `shmcluster top`: every interval one `stat` request, and
//! an `events since=<next>` one only when `stat` says there are new events
//! (each a short connection of its own, answered from the master's loop
//! without blocking it); keys in between; the terminal given back on
//! every way out.

use std::fs::File;
use std::io::{self, IsTerminal as _};
use std::os::fd::{AsFd as _, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
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

/// The terminal crossterm reads keys from, as it picks it: standard input
/// when that is a terminal, `/dev/tty` otherwise.
enum Tty {
    Stdin(io::Stdin),
    Dev(File),
}

impl Tty {
    fn open() -> io::Result<Self> {
        let stdin = io::stdin();
        if stdin.is_terminal() {
            Ok(Self::Stdin(stdin))
        } else {
            File::open("/dev/tty").map(Self::Dev)
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Stdin(stdin) => stdin.as_fd(),
            Self::Dev(f) => f.as_fd(),
        }
    }
}

/// What ended a wait for input.
enum Woken {
    /// One of [`quit_signals`] is pending.
    Signal,
    /// Bytes from the terminal: crossterm has keys to read.
    Keys,
    /// The terminal hung up (its pane or window closed).
    HungUp,
    /// The time ran out.
    Nothing,
}

/// Waits at most `wait` for a signal or for the terminal, in our own
/// `poll(2)`. crossterm is asked for keys only once the terminal is
/// readable and has not hung up: on a terminal that is gone, its reader
/// retries a read that returns 0 forever inside `event::poll`, whatever
/// the timeout (crossterm issue #793, open in 0.28/0.29) — top then spun
/// a core and never saw `SIGTERM` again.
fn wait_input(signals: &SignalFd, tty: &Tty, wait: Duration) -> io::Result<Woken> {
    let ms = wait.as_micros().div_ceil(1000);
    let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
    let mut fds = [
        PollFd::new(signals.as_fd(), PollFlags::POLLIN),
        PollFd::new(tty.fd(), PollFlags::POLLIN),
    ];
    match poll(&mut fds, timeout) {
        Ok(_) => {}
        Err(Errno::EINTR) => return Ok(Woken::Nothing),
        Err(e) => return Err(e.into()),
    }
    let revents = |i: usize| fds[i].revents().unwrap_or(PollFlags::empty());
    Ok(if !revents(0).is_empty() {
        Woken::Signal
    } else if revents(1).intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL) {
        Woken::HungUp
    } else if revents(1).contains(PollFlags::POLLIN) {
        Woken::Keys
    } else {
        Woken::Nothing
    })
}

/// The exit code after the terminal hung up: as if `SIGHUP` had ended it.
const HUNG_UP: u8 = 128 + Signal::SIGHUP as u8;

/// Runs until the user quits; returns the exit code: 0 on a key, 128 +
/// the signal's number on one of [`quit_signals`] or when the terminal
/// hangs up.
pub fn run(path: &Path, interval: Duration) -> io::Result<u8> {
    let mut path = path.to_path_buf();
    let signals = quit_signals()?;
    let tty = Tty::open()?;
    let mut model = Model::new();
    refresh(&mut path, &mut model, true);
    let mut screen = Screen::enter()?;
    let mut next = Instant::now() + interval;
    loop {
        if let Some(info) = signals.read_signal()? {
            return Ok(128u8.saturating_add(info.ssi_signo as u8));
        }
        screen.0.draw(|f| view::draw(f, &model, interval))?;
        let wait = next.saturating_duration_since(Instant::now());
        match wait_input(&signals, &tty, wait)? {
            Woken::Signal => continue, // read at the top
            Woken::HungUp => return Ok(HUNG_UP),
            Woken::Keys => {
                // Every key crossterm has now, those it read ahead included.
                while event::poll(Duration::ZERO)? {
                    let Some(key) = key(event::read()?) else {
                        continue; // a resize (drawn again above), a release
                    };
                    if let Some(code) = act(&path, &mut model, key) {
                        return Ok(code);
                    }
                }
                if Instant::now() < next {
                    continue;
                }
            }
            Woken::Nothing => {
                if Instant::now() < next {
                    continue;
                }
            }
        }
        refresh(&mut path, &mut model, false);
        next = Instant::now() + interval;
    }
}

/// Does what `key` asks; `Some(exit code)` to quit.
fn act(path: &Path, model: &mut Model, key: Key) -> Option<u8> {
    match model.key(key) {
        Action::None => {}
        Action::Quit => return Some(0),
        Action::Reload => {
            model.message = Some(match client::request(path, "reload") {
                Ok(_) => "reload queued".into(),
                Err(e) => e.to_string(),
            });
        }
        Action::ReloadWorker(index) => {
            model.message = Some(match client::request(path, &format!("reload worker={index}")) {
                Ok(_) => format!("reload of worker {index} queued"),
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
    None
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
/// longer answers is shown as gone (and asked again next time); one that
/// moved after a binary upgrade is followed
/// ([`client::request_following`]).
fn refresh(path: &mut PathBuf, model: &mut Model, first: bool) {
    let stat = client::request_following(path, model.master_pid(), "stat").and_then(|r| Snapshot::parse(&r));
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
    match client::request_following(path, model.master_pid(), &since).and_then(|r| model::parse_events(&r)) {
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
