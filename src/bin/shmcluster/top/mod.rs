//! `shmcluster top`: a full-screen live view of a running master, like
//! `pm2 monit`. [`model`] is the screen's state built from the control
//! socket's answers and from keys (tested as values); [`view`] draws it
//! with ratatui (tested on ratatui's test backend); [`app`] is the loop
//! that asks the master, reads keys and owns the terminal.

mod app;
mod model;
mod view;

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::Duration;

use crate::client;

/// Runs the view on this terminal until `q`; returns the exit code: 0 on
/// `q` (also after the master went away), 128 + the signal's number on
/// `SIGTERM`, `SIGHUP` or `SIGINT` (the terminal given back all the
/// same) and 129 when the terminal hangs up, 1 if no master answers at the start or the terminal fails, 2 if
/// stdout is not a terminal.
pub fn run(control: Option<PathBuf>, pid: Option<u32>, interval: Duration) -> u8 {
    if !std::io::stdout().is_terminal() {
        eprintln!(
            "shmcluster: top draws a full-screen view and needs a terminal on stdout; \
             use `shmcluster stat --watch` to print the figures instead"
        );
        return 2;
    }
    let path = match client::resolve(control, pid) {
        Ok(path) => path,
        Err(e) => {
            eprintln!("shmcluster: {e}");
            return 1;
        }
    };
    // Fails before the screen is taken if nothing answers there.
    if let Err(e) = client::request(&path, "ping") {
        eprintln!("shmcluster: {e}");
        return 1;
    }
    match app::run(&path, interval.max(Duration::from_millis(100))) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shmcluster: top: {e}");
            1
        }
    }
}
