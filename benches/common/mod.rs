//! What the benchmarks print about the machine they ran on.

// Each bench includes this whole module but uses only part of it.
#![allow(dead_code)]

/// `nproc`, CPU model, kernel release and architecture.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("model name"))?;
            Some(line.split_once(':')?.1.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "nproc {cpus} · {model} · Linux {} {}",
        kernel.trim(),
        std::env::consts::ARCH
    )
}

/// Warns (on stderr) when another process is runnable right now: with 2
/// cores, one more busy process makes every spinning figure meaningless.
pub fn warn_if_busy() {
    // The fourth field of /proc/loadavg is "runnable/total"; we are one.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let runnable: u32 = load
        .split_whitespace()
        .nth(3)
        .and_then(|f| f.split_once('/')?.0.parse().ok())
        .unwrap_or(0);
    if runnable > 1 {
        eprintln!(
            "warning: {} other runnable processes; figures will be noisy",
            runnable - 1
        );
    }
}

/// How many other processes are runnable right now (the fourth field of
/// /proc/loadavg, less this one), for a bench to note in its output.
pub fn other_runnable() -> u32 {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace()
        .nth(3)
        .and_then(|f| f.split_once('/')?.0.parse::<u32>().ok())
        .map_or(0, |n| n.saturating_sub(1))
}
