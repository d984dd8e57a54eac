//! Two processes on one segment: messages cross from one to the other with no
//! process in between, then the round-trip latency is measured for each
//! wait strategy.
//!
//! ```sh
//! cargo run --release --example pingpong
//! ```

use std::time::{Duration, Instant};

use shmcluster::raw::{Config, Segment, Tag};
use shmcluster::testing::{fork, ExitStatus, Watchdog};
use shmcluster::WaitStrategy;

const ROUNDS: usize = 20_000;
const STOP: u16 = 1;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let segment = Segment::create(&Config::new(2))?;
    let dog = Watchdog::new("pingpong example", Duration::from_secs(120));
    println!(
        "segment: 2 worker slots, {} KiB lanes, {} KiB of address space",
        segment.layout().lane_capacity() / 1024,
        segment.layout().size() >> 10
    );

    // Worker 1, a forked process: echoes every message back to its sender
    // with "echo: " in front, until told to stop. It switches wait strategy
    // when the message's kind asks it to.
    // SAFETY: the only other thread is the watchdog's, which takes no lock
    // the child uses; the child uses only its endpoint and prints nothing.
    let worker = dog.track(unsafe {
        fork(|| {
            let Ok(mut me) = segment.endpoint(1) else { return 2 };
            loop {
                let Ok(msg) = me.recv() else { return 3 };
                if msg.kind == STOP {
                    return 0;
                }
                me.set_wait_strategy(strategy(msg.correlation));
                let tag = Tag {
                    kind: 0,
                    correlation: msg.correlation,
                };
                let len = msg.payload.len() + 6;
                if len <= me.max_reservation() {
                    // Written straight into the lane: no intermediate buffer.
                    let Ok(mut reply) = me.reserve(msg.sender, len, None) else {
                        return 4;
                    };
                    reply[..6].copy_from_slice(b"echo: ");
                    reply[6..].copy_from_slice(&msg.payload);
                    reply.set_tag(tag);
                    reply.commit();
                } else {
                    // Larger than one record: streamed in fragments.
                    let reply = [&b"echo: "[..], &msg.payload].concat();
                    if me.send_tagged(msg.sender, tag, reply, None).is_err() {
                        return 5;
                    }
                }
            }
        })
    }?);

    // Worker 0: this process.
    let mut me = segment.endpoint(0)?;
    for text in [
        "hello from worker 0",
        "no broker, no pipe, no syscall unless asleep",
    ] {
        me.send(1, text)?;
        let reply = me.recv_timeout(Duration::from_secs(5))?;
        println!(
            "worker 0 -> worker 1 (pid {}): {text:?}\n  <- {:?}",
            worker.pid(),
            String::from_utf8_lossy(&reply.payload)
        );
    }
    let big: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    me.send(1, big.clone())?;
    let reply = me.recv_timeout(Duration::from_secs(5))?;
    println!(
        "1 MiB message, streamed through a 64 KiB lane in fragments: echoed {} bytes intact: {}",
        reply.payload.len(),
        reply.payload[6..] == big[..]
    );

    println!("\nround trip of a 64-byte message, worker 0 <-> worker 1, {ROUNDS} rounds each:");
    println!("| wait strategy | p50 | p99 | p99.9 |\n|---|---|---|---|");
    let default = format!(
        "SpinThenPark({} µs), the default",
        WaitStrategy::DEFAULT_SPIN.as_micros()
    );
    for (code, name) in [(0, "Spin"), (1, default.as_str()), (2, "Park")] {
        me.set_wait_strategy(strategy(code));
        let ping = [7u8; 64];
        let tag = Tag {
            kind: 0,
            correlation: code,
        };
        let mut times = Vec::with_capacity(ROUNDS);
        for i in 0..ROUNDS + 1000 {
            let start = Instant::now();
            me.send_tagged(1, tag, ping, None)?;
            let reply = me.recv_ref(Some(Instant::now() + Duration::from_secs(5)))?;
            assert_eq!(reply.payload().len(), 70);
            if i >= 1000 {
                times.push(start.elapsed());
            }
        }
        times.sort();
        let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
        println!("| {name} | {:?} | {:?} | {:?} |", at(0.5), at(0.99), at(0.999));
    }

    me.send_tagged(
        1,
        Tag {
            kind: STOP,
            correlation: 0,
        },
        [],
        None,
    )?;
    let status = worker.wait_timeout(Duration::from_secs(10))?;
    assert_eq!(status, Some(ExitStatus::Code(0)), "worker 1 exit");
    println!("\nworker 1 exited cleanly");
    Ok(())
}

fn strategy(code: u64) -> WaitStrategy {
    match code {
        0 => WaitStrategy::Spin,
        1 => WaitStrategy::default(),
        _ => WaitStrategy::Park,
    }
}
