//! What the benchmarks share: the machine they ran on, waiting for a
//! child, percentiles, and (in [`cluster`]) running a cluster per measure.

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

/// Prints the `Machine:` and `Command:` lines that open every report:
/// `cargo bench --bench <bench>` for a full run, else the quick check.
pub fn print_preamble(bench: &str, full: bool) {
    let command = if full {
        format!("cargo bench --bench {bench}")
    } else {
        "cargo test --benches (a quick check of each measure, not figures)".to_owned()
    };
    println!("Machine: {}", machine());
    println!();
    println!("Command: `{command}`");
    println!();
}

/// Waits up to `limit` for `child`, killing it (and so, by their
/// parent-death signal, a cluster's workers) at the deadline.
pub fn wait_within(
    child: &mut std::process::Child,
    limit: std::time::Duration,
) -> Result<std::process::ExitStatus, String> {
    let until = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(status);
        }
        if std::time::Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("still running after {limit:?}; killed"));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// p50, p99 and max of a set of samples in nanoseconds (nearest rank).
#[derive(Debug, Clone, Copy)]
pub struct Pct {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    /// How many samples.
    pub n: usize,
}

/// The [`Pct`] of `ns`, or `None` if there are no samples.
pub fn percentiles(mut ns: Vec<u64>) -> Option<Pct> {
    if ns.is_empty() {
        return None;
    }
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q).round() as usize] as f64;
    Some(Pct {
        p50: at(0.5),
        p99: at(0.99),
        max: at(1.0),
        n: ns.len(),
    })
}

/// Nanoseconds in ns, µs or ms.
pub fn fmt_ns(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} ms", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} µs", v / 1e3)
    } else {
        format!("{v:.0} ns")
    }
}

/// Running a cluster in a fresh copy of the bench binary.
pub mod cluster;

/// A real NATS cluster (`nats-server` processes on loopback): the tests'
/// harness, one file for both.
#[path = "../../tests/common/nats.rs"]
pub mod nats;
