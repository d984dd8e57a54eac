//! The Rust row of the Python binding's benchmark (ffi/python/bench/): one
//! `request_bytes` in flight from instance 0 to instance 1 of a 2-worker
//! cluster, a small payload echoed back by a raw-bytes handler — the shape
//! the C ABI's `shmc_request` / `shmc_on_request` drive, without Python.
//!
//! ```sh
//! cargo build --release -p shmcluster --example request_rtt
//! target/release/shmcluster run -w 2 -- target/release/examples/request_rtt --n 20000
//! ```
//!
//! Instance 0 prints one JSON line per row (`rust_request[_spin|_park]`,
//! `rust_self_request`), then `DONE`, and keeps serving until it is told to
//! stop (the bench's driver sends the master SIGTERM on `DONE`). Options:
//! `--n N` timed requests, `--warmup N` untimed ones, `--payload BYTES`.
//!
//! CPU: both processes' `getrusage(RUSAGE_SELF)` (user + system) before and
//! after the timed loop; the peer's is asked for by a request outside the
//! timed part. `cpu_us_per_op` is the sum of both deltas over the requests.

use std::error::Error;
use std::io::Write;
use std::time::{Duration, Instant};

use shmcluster::{Messenger, WaitStrategy, Worker, WorkerState};

type Res<T> = Result<T, Box<dyn Error>>;

/// Deadline of one call.
const CALL_LIMIT: Duration = Duration::from_secs(5);

/// This process's CPU time (user, system) in microseconds.
fn cpu_us() -> (u64, u64) {
    // SAFETY: `getrusage` only writes the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a `rusage`, RUSAGE_SELF is always valid.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return (0, 0);
    }
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    (us(ru.ru_utime), us(ru.ru_stime))
}

fn encode_cpu() -> Vec<u8> {
    let (u, s) = cpu_us();
    [u.to_le_bytes(), s.to_le_bytes()].concat()
}

fn decode_cpu(b: &[u8]) -> Res<(u64, u64)> {
    if b.len() != 16 {
        return Err(format!("cpu answer of {} bytes", b.len()).into());
    }
    let mut u = [0u8; 8];
    let mut s = [0u8; 8];
    u.copy_from_slice(&b[..8]);
    s.copy_from_slice(&b[8..]);
    Ok((u64::from_le_bytes(u), u64::from_le_bytes(s)))
}

struct Opts {
    n: usize,
    warmup: usize,
    payload: usize,
}

fn parse() -> Res<Opts> {
    let mut o = Opts {
        n: 20_000,
        warmup: 1_000,
        payload: 32,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v: usize = args.next().ok_or(format!("{a} needs a value"))?.parse()?;
        match a.as_str() {
            "--n" => o.n = v,
            "--warmup" => o.warmup = v,
            "--payload" => o.payload = v,
            _ => return Err(format!("unknown argument {a}").into()),
        }
    }
    Ok(o)
}

fn main() -> Res<()> {
    let opts = parse()?;
    let worker = Worker::from_env()?;
    let driver = worker.index() == 0;
    let mut m = Messenger::new(worker);
    m.on_request_async_bytes("echo", |_, data, reply| reply.send(Ok(data.to_vec())))?;
    m.on_request_async_bytes("cpu", |_, _, reply| reply.send(Ok(encode_cpu())))?;
    m.worker().ready();
    if !driver {
        m.run()?;
        return Ok(());
    }
    let peer = await_peer(&mut m)?;
    let payload = vec![7u8; opts.payload];
    let rows = [
        ("rust_request", peer, None),
        ("rust_request_spin", peer, Some(WaitStrategy::Spin)),
        ("rust_request_park", peer, Some(WaitStrategy::Park)),
        ("rust_self_request", m.worker().slot(), None),
    ];
    for (name, to, wait) in rows {
        if let Some(w) = wait {
            m.set_wait_strategy(w);
        }
        let line = measure(&mut m, name, to, peer, &payload, &opts)?;
        m.set_wait_strategy(WaitStrategy::default());
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "DONE")?;
        out.flush()?;
    }
    m.run()?;
    Ok(())
}

/// Dispatches until the other worker is ready; returns its slot.
fn await_peer(m: &mut Messenger) -> Res<u32> {
    let until = Instant::now() + CALL_LIMIT;
    loop {
        let peers = m.worker().peers();
        if let Some(p) = peers
            .iter()
            .find(|p| p.index == Some(1) && p.state == WorkerState::Ready)
        {
            return Ok(p.slot);
        }
        if Instant::now() >= until {
            return Err("instance 1 not ready in time".into());
        }
        m.poll(Duration::from_millis(1))?;
    }
}

/// Times `opts.n` requests to `to` (after `opts.warmup`); one JSON line.
fn measure(m: &mut Messenger, name: &str, to: u32, peer: u32, payload: &[u8], opts: &Opts) -> Res<String> {
    for _ in 0..opts.warmup {
        m.request_bytes(to, "echo", payload, Instant::now() + CALL_LIMIT)?;
    }
    let mut took = Vec::with_capacity(opts.n);
    let peer_before = decode_cpu(&m.request_bytes(peer, "cpu", &[], Instant::now() + CALL_LIMIT)?)?;
    let me_before = cpu_us();
    let wall = Instant::now();
    for _ in 0..opts.n {
        let start = Instant::now();
        let back = m.request_bytes(to, "echo", payload, Instant::now() + CALL_LIMIT)?;
        took.push(start.elapsed().as_nanos() as u64);
        if back.len() != payload.len() {
            return Err(format!("echo of {} bytes came back with {}", payload.len(), back.len()).into());
        }
    }
    let wall_ns = wall.elapsed().as_nanos() as u64;
    let me_after = cpu_us();
    let peer_after = decode_cpu(&m.request_bytes(peer, "cpu", &[], Instant::now() + CALL_LIMIT)?)?;
    took.sort_unstable();
    let pct = |p: f64| took[((took.len() - 1) as f64 * p) as usize];
    let mean = took.iter().sum::<u64>() as f64 / took.len() as f64;
    let user = (me_after.0 - me_before.0) + (peer_after.0 - peer_before.0);
    let sys = (me_after.1 - me_before.1) + (peer_after.1 - peer_before.1);
    let n = opts.n as f64;
    Ok(format!(
        "{{\"row\":\"{name}\",\"n\":{},\"p50_ns\":{},\"p99_ns\":{},\"mean_ns\":{mean:.0},\
         \"cpu_us_per_op\":{:.3},\"cpu_sys_us_per_op\":{:.3},\"cpu_cores\":{:.3}}}",
        opts.n,
        pct(0.5),
        pct(0.99),
        (user + sys) as f64 / n,
        sys as f64 / n,
        (user + sys) as f64 * 1000.0 / wall_ns as f64,
    ))
}
