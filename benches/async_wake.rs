//! Async wakeup round trip: `request`/reply between two tokio-driven
//! messengers, woken through the slot's eventfd or through a waiter
//! thread, beside the same round trip between two blocking messengers
//! (parking at once, and the default spin-then-park), in one run.
//!
//! `cargo bench --features tokio --bench async_wake` prints a markdown
//! table on stdout (progress on stderr). Without `--bench` (as `cargo test
//! --benches` runs it) it only checks each configuration with a few round
//! trips.
//!
//! Each side is a thread of its own with its own runtime (a
//! `current_thread` runtime, as in one pre-forked worker per core), on one
//! segment in threads mode: a wake across threads costs what a wake across
//! processes does (the same futex or eventfd write, and a scheduler round
//! trip). The server answers `echo` with its argument; the client sends
//! requests back to back, so every round trip of a parking side includes
//! two wakes (the request's and the reply's). Configurations are
//! interleaved over rounds and each cell is the median of the rounds'
//! medians, with the ratio to the blocking parked round trip.

use std::error::Error;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shmcluster::testing::Watchdog;
use shmcluster::{AsyncWake, Messenger, WaitStrategy};

mod common;
use common::{machine, warn_if_busy};

/// Round trips per measured sample set.
const ROUND_TRIPS: usize = 4000;
/// Rounds over all configurations (interleaved).
const ROUNDS: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Side {
    /// A blocking messenger with this wait strategy, served by `run`.
    Blocking(WaitStrategy),
    /// An async messenger with this wake, on a `current_thread` runtime.
    Async(AsyncWake),
}

impl Side {
    fn label(self) -> String {
        match self {
            Side::Blocking(WaitStrategy::Park) => "blocking, park at once (futex)".into(),
            Side::Blocking(_) => format!(
                "blocking, spin {} µs then park (default)",
                WaitStrategy::DEFAULT_SPIN.as_micros()
            ),
            Side::Async(AsyncWake::EventFd) => "tokio, eventfd wake (default)".into(),
            Side::Async(_) => "tokio, waiter-thread wake".into(),
        }
    }
}

const CONFIGS: [Side; 4] = [
    Side::Blocking(WaitStrategy::Park),
    Side::Blocking(WaitStrategy::SpinThenPark(WaitStrategy::DEFAULT_SPIN)),
    Side::Async(AsyncWake::EventFd),
    Side::Async(AsyncWake::Thread),
];

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// `n` round trips with both sides configured as `side`; each one's
/// latency in nanoseconds.
fn measure(side: Side, n: usize) -> Result<Vec<u64>, Box<dyn Error>> {
    let mut two = Messenger::threads(2)?;
    let mut server = two.pop().ok_or("no server")?;
    let mut client = two.pop().ok_or("no client")?;
    server.on_request("echo", |_, x: u64| Ok::<_, String>(x))?;
    let stop = Arc::new(AtomicBool::new(false));
    let server_stop = stop.clone();
    let server_thread = std::thread::spawn(move || -> Result<(), String> {
        match side {
            Side::Blocking(wait) => {
                set_wait(&mut server, wait);
                server
                    .run_until(|_| server_stop.load(Relaxed))
                    .map_err(|e| e.to_string())
            }
            Side::Async(wake) => runtime().block_on(async move {
                let _m = server.into_async_with(wake);
                while !server_stop.load(Relaxed) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok(())
            }),
        }
    });
    let deadline = || Instant::now() + Duration::from_secs(5);
    let mut samples = Vec::with_capacity(n);
    let result = match side {
        Side::Blocking(wait) => {
            set_wait(&mut client, wait);
            (|| {
                for i in 0..n as u64 {
                    let t = Instant::now();
                    let r: u64 = client.request(1, "echo", &i, deadline())?;
                    samples.push(t.elapsed().as_nanos() as u64);
                    if r != i {
                        return Err(format!("echo {i} came back as {r}").into());
                    }
                }
                Ok::<_, Box<dyn Error>>(())
            })()
        }
        Side::Async(wake) => runtime().block_on(async {
            let m = client.into_async_with(wake);
            if m.wake() != wake {
                return Err(format!("asked for {wake:?}, got {:?}", m.wake()).into());
            }
            for i in 0..n as u64 {
                let t = Instant::now();
                let r: u64 = m.request(1, "echo", &i, deadline()).await?;
                samples.push(t.elapsed().as_nanos() as u64);
                if r != i {
                    return Err(format!("echo {i} came back as {r}").into());
                }
            }
            Ok(())
        }),
    };
    stop.store(true, Relaxed);
    server_thread.join().map_err(|_| "the server panicked")??;
    result?;
    Ok(samples)
}

fn set_wait(m: &mut Messenger, wait: WaitStrategy) {
    m.set_wait_strategy(wait);
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    percentile(&v, 0.5)
}

fn us(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1000.0)
}

fn main() -> Result<(), Box<dyn Error>> {
    let _dog = Watchdog::new("async_wake bench", Duration::from_secs(600));
    let full = std::env::args().any(|a| a == "--bench");
    let (n, rounds) = if full { (ROUND_TRIPS, ROUNDS) } else { (50, 1) };
    warn_if_busy();
    // Per config: each round's p50, p99.
    let mut p50s = vec![Vec::new(); CONFIGS.len()];
    let mut p99s = vec![Vec::new(); CONFIGS.len()];
    for round in 0..rounds {
        for (i, &side) in CONFIGS.iter().enumerate() {
            eprintln!("round {}/{rounds}: {}", round + 1, side.label());
            let mut s = measure(side, n)?;
            s.sort_unstable();
            p50s[i].push(percentile(&s, 0.5));
            p99s[i].push(percentile(&s, 0.99));
        }
    }
    if !full {
        println!("async_wake: every configuration works (run with --bench to measure)");
        return Ok(());
    }
    let base = median(p50s[0].clone()).max(1);
    println!("machine: {}", machine());
    println!("command: cargo bench --features tokio --bench async_wake");
    println!(
        "{ROUND_TRIPS} back-to-back request/reply round trips per round, {ROUNDS} rounds, median of rounds\n"
    );
    println!("| both sides | p50 µs | p99 µs | p50 vs blocking parked |");
    println!("|---|---:|---:|---:|");
    for (i, side) in CONFIGS.iter().enumerate() {
        let p50 = median(p50s[i].clone());
        let p99 = median(p99s[i].clone());
        println!(
            "| {} | {} | {} | {:.2}× |",
            side.label(),
            us(p50),
            us(p99),
            p50 as f64 / base as f64
        );
    }
    Ok(())
}
