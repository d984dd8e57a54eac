//! The master (fork or spawn workers, respawn, reload, shutdown, listeners,
//! heartbeats, events, stats) and the worker's side of it.

pub mod listen;
