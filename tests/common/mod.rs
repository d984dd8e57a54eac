//! Small helpers shared by the integration tests (`mod common;`).

// Each test binary includes this whole module but uses only part of it.
#![allow(dead_code)]

/// xorshift64*: small, deterministic, good enough for garbage and test data.
pub struct Rng(u64);

impl Rng {
    /// Starts from `seed` itself (0, which xorshift never leaves, becomes 1).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// Starts from `seed` spread over all 64 bits (a golden-ratio multiply),
    /// so that nearby seeds give unrelated sequences.
    pub fn spread(seed: u64) -> Self {
        Self::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next pseudo-random word.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// `n` pseudo-random bytes, one per step.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Fills `buf` with pseudo-random bytes, eight per step.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

/// What a multi-process scenario returns: `Err` names the failed check.
pub type Check = Result<(), String>;

/// `ensure!(cond, "why {x}")`: returns `Err` naming the file and line
/// unless `cond` holds (for scenario code that reports instead of panicking).
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(format!("{}:{}: {}", file!(), line!(), format!($($fmt)*)));
        }
    };
}

/// A fresh scratch directory for scenario `name` of suite `suite`.
pub fn tempdir(suite: &str, name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("shmc-{suite}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// The scenario's scratch directory (`SHMC_TMP`, shared by the master and
/// its workers).
pub fn tmp() -> std::path::PathBuf {
    std::path::PathBuf::from(std::env::var("SHMC_TMP").expect("SHMC_TMP"))
}

/// Waits up to `limit` for `child`, killing it (and failing) after that.
pub fn wait_child(
    child: &mut std::process::Child,
    limit: std::time::Duration,
) -> Result<std::process::ExitStatus, String> {
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(status);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("timed out after {limit:?}; killed"));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// `kill(pid, SIGKILL)`.
pub fn sigkill(pid: u32) {
    // SAFETY: kill(2) takes a pid and a signal number, no pointers.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// The parent side of a `harness = false` multi-process suite. Runs each
/// scenario named in `scenarios` (name, watchdog time) that the command
/// line's filters select, as this test binary re-executed with
/// `SHMC_SCENARIO=<name>` and `SHMC_TMP=<scratch dir>`, killed after its
/// time; prints libtest-like lines; returns (ran, failed names).
pub fn run_suite(
    suite: &str,
    scenarios: &[(&'static str, std::time::Duration)],
) -> (usize, Vec<&'static str>) {
    if std::env::args().any(|a| a == "--list") {
        for (name, _) in scenarios {
            println!("{name}: test");
        }
        return (0, Vec::new());
    }
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let mut failed = Vec::new();
    let mut ran = 0;
    for &(name, timeout) in scenarios {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        let start = std::time::Instant::now();
        let dir = tempdir(suite, name);
        let result = scenario_process(name, &dir, timeout);
        let _ = std::fs::remove_dir_all(&dir);
        match result {
            Ok(()) => println!("test {name} ... ok ({:.1?})", start.elapsed()),
            Err(e) => {
                println!("test {name} ... FAILED ({:.1?})\n    {e}", start.elapsed());
                failed.push(name);
            }
        }
    }
    (ran, failed)
}

/// Prints the summary line of a suite and exits 1 if anything failed.
pub fn finish_suite(ran: usize, failed: &[&str]) {
    println!(
        "\ntest result: {}. {} passed; {} failed",
        if failed.is_empty() { "ok" } else { "FAILED" },
        ran - failed.len(),
        failed.len()
    );
    if !failed.is_empty() {
        std::process::exit(1);
    }
}

/// In a scenario process: exits 0 if `result` is Ok, else prints it and exits 1.
pub fn exit_scenario(name: &str, result: Check) -> ! {
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("FAILED {name}: {e}");
            std::process::exit(1);
        }
    }
}

/// Runs scenario `name` in this test binary re-executed, under `timeout`.
pub fn scenario_process(name: &str, dir: &std::path::Path, timeout: std::time::Duration) -> Check {
    let mut child = std::process::Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
        .env("SHMC_SCENARIO", name)
        .env("SHMC_TMP", dir)
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .map_err(|e| e.to_string())?;
    let status = wait_child(&mut child, timeout)?;
    if !status.success() {
        return Err(format!("scenario process ended with {status}"));
    }
    Ok(())
}

/// Messenger helpers for cluster scenarios.
pub mod cluster;

/// A real NATS cluster (`nats-server` processes on loopback).
pub mod nats;

/// The C library built for Python workers, and pythons with packages.
pub mod python;

/// `target/<profile>/examples/<name>`, next to `deps/` where this test
/// binary is. `cargo test` builds it; `cargo test --test <one>` alone
/// does not, so a build that is missing or older than its sources (testing
/// it would judge old code) is made here with `cargo build --example`.
pub fn built_example(name: &str) -> Result<std::path::PathBuf, String> {
    let target = std::env::current_exe()
        .map_err(|e| format!("current_exe: {e}"))?
        .parent()
        .and_then(|deps| deps.parent())
        .map(std::path::Path::to_path_buf)
        .ok_or("no target dir above the test binary")?;
    let path = target.join("examples").join(name);
    if example_is_fresh(&path, name)? {
        return Ok(path);
    }
    let mut build = std::process::Command::new(env!("CARGO"));
    build
        .args(["build", "--example", name])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::null());
    if target.file_name().is_some_and(|p| p == "release") {
        build.arg("--release");
    }
    let mut child = build
        .spawn()
        .map_err(|e| format!("cargo build --example {name}: {e}"))?;
    let status = wait_child(&mut child, std::time::Duration::from_secs(300))?;
    ensure!(status.success(), "cargo build --example {name}: {status}");
    ensure!(
        example_is_fresh(&path, name)?,
        "{} is still older than its sources after cargo build",
        path.display()
    );
    Ok(path)
}

/// Whether `path` exists and is newer than `examples/<name>.rs` and every
/// source file of the library.
fn example_is_fresh(path: &std::path::Path, name: &str) -> Result<bool, String> {
    let Ok(built) = std::fs::metadata(path).and_then(|m| m.modified()) else {
        return Ok(false);
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sources = vec![root.join("examples").join(format!("{name}.rs"))];
    let mut dirs = vec![root.join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))? {
            let entry = entry.map_err(|e| e.to_string())?.path();
            if entry.is_dir() {
                dirs.push(entry);
            } else if entry.extension().is_some_and(|x| x == "rs") {
                sources.push(entry);
            }
        }
    }
    Ok(sources.iter().all(|s| {
        std::fs::metadata(s)
            .and_then(|m| m.modified())
            .map_or(true, |t| t <= built)
    }))
}
