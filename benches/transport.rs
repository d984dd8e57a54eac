//! Transport benchmark: shmcluster lanes next to the bare mechanisms they are
//! built from (one cache line, a futex, an SPSC ring) and next to the
//! kernel's unix socketpair and pipe. Every figure is measured between two
//! forked processes, in this run, with nothing pinned.
//!
//! `cargo bench --bench transport` prints one markdown table on stdout
//! (progress goes to stderr). Receivers in every throughput test copy each
//! payload out and check its sequence number (the first 8 bytes).

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Release};
use std::time::{Duration, Instant};

use shmcluster::raw::{Config, Endpoint, Segment};
use shmcluster::testing::{fork, ExitStatus, Watchdog};
use shmcluster::WaitStrategy;

mod common;
use common::{machine, warn_if_busy};

/// The small message.
const SMALL: usize = 64;
/// The large message.
const LARGE: usize = 4096;
/// No single measure may take longer than this (the watchdog then kills it).
const LIMIT: Duration = Duration::from_secs(60);
/// A cache line as far as false sharing goes (adjacent-line prefetch).
const LINE: usize = 128;
/// Slot storage per bare ring: the same as a default shmcluster lane.
const RING_BYTES: usize = shmcluster::raw::DEFAULT_LANE_CAPACITY;
/// A ring's footprint: head line, tail line, slots.
const RING_LEN: usize = 2 * LINE + RING_BYTES;

type Res = Result<(), Box<dyn std::error::Error>>;

// ------------------------------------------------------------ statistics

/// Round-trip percentiles, in nanoseconds.
#[derive(Debug, Clone, Copy)]
struct Latency {
    p50: f64,
    p99: f64,
    p999: f64,
}

fn percentiles(mut ns: Vec<u64>) -> Latency {
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q).round() as usize] as f64;
    Latency {
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
    }
}

/// One-way throughput.
#[derive(Debug, Clone, Copy)]
struct Rate {
    msgs_per_s: f64,
    bytes_per_s: f64,
}

/// Unmeasured rounds (or messages) before the measured ones.
fn warmup(n: usize) -> usize {
    (n / 10).max(1000)
}

/// Runs `warmup(rounds) + rounds` round trips, timing each measured one.
fn time_rounds(rounds: usize, mut round: impl FnMut(u64)) -> Latency {
    let skip = warmup(rounds) as u64;
    let mut ns = Vec::with_capacity(rounds);
    for i in 0..skip + rounds as u64 {
        let start = Instant::now();
        round(i);
        let took = start.elapsed();
        if i >= skip {
            ns.push(took.as_nanos() as u64);
        }
    }
    percentiles(ns)
}

/// Receives `warmup(count) + count` messages of `size` bytes, timing the
/// last `count`.
fn time_stream(count: usize, size: usize, mut recv: impl FnMut(u64)) -> Rate {
    let skip = warmup(count) as u64;
    for i in 0..skip {
        recv(i);
    }
    let start = Instant::now();
    for i in skip..skip + count as u64 {
        recv(i);
    }
    let secs = start.elapsed().as_secs_f64();
    Rate {
        msgs_per_s: count as f64 / secs,
        bytes_per_s: (count * size) as f64 / secs,
    }
}

/// Writes the sequence number into the first 8 bytes.
fn stamp(buf: &mut [u8], seq: u64) {
    buf[..8].copy_from_slice(&seq.to_le_bytes());
}

/// The sequence number in the first 8 bytes.
fn seq_of(buf: &[u8]) -> u64 {
    u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"))
}

// ------------------------------------------------------------- processes

/// Forks a child running `child` (exit code 0 on `Ok`) while this process
/// runs `parent`; reaps the child and checks it succeeded. A watchdog kills
/// both if they hang.
fn in_pair<T>(name: &str, child: impl FnOnce() -> Res, parent: impl FnOnce() -> T) -> T {
    eprintln!("measuring {name}");
    let dog = Watchdog::new(name, LIMIT);
    // SAFETY: the only other thread is the watchdog's, which takes no lock
    // the child uses; every `child` in this file uses only its own endpoint,
    // shared words, ring, pipe or socket, allocates (glibc's malloc is
    // fork-safe) and prints nothing.
    let pid = dog.track(unsafe { fork(|| i32::from(child().is_err())) }.expect("fork"));
    let out = parent();
    let status = pid.wait_timeout(Duration::from_secs(10)).expect("waitpid");
    assert_eq!(status, Some(ExitStatus::Code(0)), "{name}: the child failed");
    out
}

/// An anonymous `MAP_SHARED` mapping: a child forked after it sees the same
/// memory.
struct Shared {
    ptr: *mut u8,
    len: usize,
}

impl Shared {
    fn new(len: usize) -> Self {
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        Self { ptr: ptr.cast(), len }
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        assert!(offset.is_multiple_of(8) && offset + 8 <= self.len);
        // SAFETY: in bounds and aligned (the mapping is page-aligned); the
        // mapping starts zeroed, a valid AtomicU64, and lives as long as
        // `self`; every access is atomic.
        unsafe { &*self.ptr.add(offset).cast::<AtomicU64>() }
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        assert!(offset.is_multiple_of(4) && offset + 4 <= self.len);
        // SAFETY: as for `u64_at`.
        unsafe { &*self.ptr.add(offset).cast::<AtomicU32>() }
    }

    /// The bare ring whose control lines start at `offset`.
    fn ring(&self, offset: usize, slot: usize) -> Ring<'_> {
        assert!(offset.is_multiple_of(LINE) && offset + RING_LEN <= self.len);
        assert!(slot.is_power_of_two() && slot <= RING_BYTES);
        Ring {
            head: self.u64_at(offset),
            tail: self.u64_at(offset + LINE),
            // SAFETY: `offset + RING_LEN <= len`, checked above.
            slots: unsafe { self.ptr.add(offset + 2 * LINE) },
            slot,
            mask: (RING_BYTES / slot - 1) as u64,
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: our own mapping; nothing borrowed from it outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

// ------------------------------------------------------------ bare ring

/// A bare SPSC ring of fixed-size slots in shared memory: the standard
/// fast ring, and the yardstick for the lanes. Head and tail each on a
/// 128-byte line of their own (cache-padded, adjacent-line prefetch
/// included); the producer caches the consumer's head and reads it only
/// when the ring looks full, the consumer caches the producer's tail and
/// reads it only when it has used up what it knew of; one `Release` store
/// of the index per message on each side, no fences, no framing (a slot is
/// the message: for 64 B messages this is a byte ring with no record
/// header), no doorbell, no validation.
struct Ring<'a> {
    head: &'a AtomicU64,
    tail: &'a AtomicU64,
    slots: *mut u8,
    slot: usize,
    mask: u64,
}

impl Ring<'_> {
    fn slot_ptr(&self, pos: u64) -> *mut u8 {
        // SAFETY: `(pos & mask) * slot < RING_BYTES`, inside the mapping.
        unsafe { self.slots.add((pos & self.mask) as usize * self.slot) }
    }
}

/// The writing end; caches the consumer's head.
struct RingProducer<'a> {
    ring: Ring<'a>,
    tail: u64,
    head: u64,
}

impl<'a> RingProducer<'a> {
    fn new(ring: Ring<'a>) -> Self {
        Self {
            ring,
            tail: 0,
            head: 0,
        }
    }

    fn push(&mut self, msg: &[u8]) {
        assert_eq!(msg.len(), self.ring.slot);
        while self.tail - self.head > self.ring.mask {
            self.head = self.ring.head.load(Acquire);
            std::hint::spin_loop();
        }
        // SAFETY: the slot at `tail` is free (the consumer's head is past
        // its previous use) and holds `slot` bytes; `msg` is local memory.
        unsafe { std::ptr::copy_nonoverlapping(msg.as_ptr(), self.ring.slot_ptr(self.tail), msg.len()) };
        self.tail += 1;
        self.ring.tail.store(self.tail, Release);
    }
}

/// The reading end; caches the producer's tail.
struct RingConsumer<'a> {
    ring: Ring<'a>,
    head: u64,
    tail: u64,
}

impl<'a> RingConsumer<'a> {
    fn new(ring: Ring<'a>) -> Self {
        Self {
            ring,
            head: 0,
            tail: 0,
        }
    }

    fn pop(&mut self, out: &mut [u8]) {
        assert_eq!(out.len(), self.ring.slot);
        while self.head == self.tail {
            self.tail = self.ring.tail.load(Acquire);
            std::hint::spin_loop();
        }
        // SAFETY: the slot at `head` was published (Acquire on the tail)
        // and is not rewritten until our head moves past it; `out` is local.
        unsafe { std::ptr::copy_nonoverlapping(self.ring.slot_ptr(self.head), out.as_mut_ptr(), out.len()) };
        self.head += 1;
        self.ring.head.store(self.head, Release);
    }
}

// ------------------------------------------------------------ shmcluster

fn segment() -> Segment {
    Segment::create(&Config::new(2)).expect("create segment")
}

fn open(
    segment: &Segment,
    slot: u32,
    wait: WaitStrategy,
) -> Result<Endpoint, shmcluster::raw::EndpointError> {
    let mut me = segment.endpoint(slot)?;
    me.set_wait_strategy(wait);
    Ok(me)
}

/// 64 B ping from slot 0 (this process), echoed by slot 1 (the child).
fn shm_rtt(name: &str, wait: WaitStrategy, rounds: usize) -> Latency {
    let segment = segment();
    let deadline = Instant::now() + LIMIT;
    let child = || -> Res {
        let mut me = open(&segment, 1, wait)?;
        let mut buf = [0u8; SMALL];
        for _ in 0..warmup(rounds) + rounds {
            let msg = me.recv_ref(Some(deadline))?;
            if msg.payload().len() != SMALL {
                return Err("wrong length".into());
            }
            buf.copy_from_slice(msg.payload());
            drop(msg);
            me.send(0, &buf).map_err(|e| e.to_string())?;
        }
        Ok(())
    };
    in_pair(name, child, || {
        let mut me = open(&segment, 0, wait).expect("slot 0");
        let mut buf = [0u8; SMALL];
        time_rounds(rounds, |i| {
            stamp(&mut buf, i);
            me.send(1, &buf).expect("send");
            let echo = me.recv_ref(Some(deadline)).expect("recv");
            assert_eq!(seq_of(echo.payload()), i, "echo out of order");
        })
    })
}

/// `count` messages of `size` bytes from slot 0 (the child) to slot 1 (this
/// process), both spinning.
fn shm_stream(name: &str, size: usize, count: usize) -> Rate {
    let segment = segment();
    let deadline = Instant::now() + LIMIT;
    let child = || -> Res {
        let mut me = open(&segment, 0, WaitStrategy::Spin)?;
        let mut buf = vec![0u8; size];
        for i in 0..(warmup(count) + count) as u64 {
            stamp(&mut buf, i);
            me.send(1, &buf[..]).map_err(|e| e.to_string())?;
        }
        Ok(())
    };
    in_pair(name, child, || {
        let mut me = open(&segment, 1, WaitStrategy::Spin).expect("slot 1");
        let mut out = vec![0u8; size];
        time_stream(count, size, |i| {
            let msg = me.recv_ref(Some(deadline)).expect("recv");
            out.copy_from_slice(msg.payload());
            drop(msg);
            assert_eq!(seq_of(&out), i, "message out of order");
        })
    })
}

/// Messages per batch in the batched stream: enough that the per-batch
/// publish (tail store, fence, doorbell look) is amortised, few enough
/// that the receiver starts while the sender still writes (64 x 96 B is a
/// tenth of a default lane).
const BATCH: usize = 64;

/// [`shm_stream`] with the batch API on both sides: the sender pushes
/// [`BATCH`] messages per [`shmcluster::raw::Batch`], the receiver drains
/// with `recv_many` (one head store per drain).
fn shm_stream_batched(name: &str, size: usize, count: usize) -> Rate {
    let segment = segment();
    let deadline = Instant::now() + LIMIT;
    let total = warmup(count) + count;
    let child = || -> Res {
        let mut me = open(&segment, 0, WaitStrategy::Spin)?;
        let mut buf = vec![0u8; size];
        let mut i = 0u64;
        while i < total as u64 {
            let mut batch = me.batch(1).map_err(|e| e.to_string())?;
            for _ in 0..BATCH.min(total - i as usize) {
                stamp(&mut buf, i);
                batch.push(&buf[..]).map_err(|e| e.to_string())?;
                i += 1;
            }
        }
        Ok(())
    };
    in_pair(name, child, || {
        let mut me = open(&segment, 1, WaitStrategy::Spin).expect("slot 1");
        let mut out = vec![0u8; size];
        let mut next = 0u64;
        let mut drain = |upto: u64, me: &mut Endpoint| {
            while next < upto {
                let max = (upto - next) as usize;
                me.recv_many(max, Some(deadline), |msg| {
                    out.copy_from_slice(msg.payload());
                    assert_eq!(seq_of(&out), next, "message out of order");
                    next += 1;
                })
                .expect("recv");
            }
        };
        drain(warmup(count) as u64, &mut me);
        let start = Instant::now();
        drain(total as u64, &mut me);
        let secs = start.elapsed().as_secs_f64();
        Rate {
            msgs_per_s: count as f64 / secs,
            bytes_per_s: (count * size) as f64 / secs,
        }
    })
}

// -------------------------------------------------------------- baselines

/// One AtomicU64 on its own line: this process writes odd, the child
/// answers with the next even number; both busy-spin.
fn cache_line_rtt(rounds: usize) -> Latency {
    let shared = Shared::new(4096);
    let word = shared.u64_at(0);
    let child = || -> Res {
        for i in 0..(warmup(rounds) + rounds) as u64 {
            while word.load(Acquire) != 2 * i + 1 {
                std::hint::spin_loop();
            }
            word.store(2 * i + 2, Release);
        }
        Ok(())
    };
    in_pair("one-cache-line ping-pong", child, || {
        time_rounds(rounds, |i| {
            word.store(2 * i + 1, Release);
            while word.load(Acquire) != 2 * i + 2 {
                std::hint::spin_loop();
            }
        })
    })
}

fn futex_wait(word: &AtomicU32, expected: u32) {
    // SAFETY: `word` is a live, aligned u32 in a MAP_SHARED mapping; a
    // shared (not PRIVATE) FUTEX_WAIT only reads it; a null timeout waits
    // until woken (or returns at once if the value already changed).
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            std::ptr::null::<libc::timespec>(),
        )
    };
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: as for `futex_wait`; FUTEX_WAKE does not touch the memory.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, 1) };
}

/// Sleeps on `word` until it holds `want`.
fn futex_wait_for(word: &AtomicU32, want: u32) {
    loop {
        let seen = word.load(Acquire);
        if seen == want {
            return;
        }
        futex_wait(word, seen);
    }
}

/// Two futex words on separate lines; every turn is a store, a wake and a
/// sleep, with no spinning.
fn futex_rtt(rounds: usize) -> Latency {
    let shared = Shared::new(4096);
    let (ping, pong) = (shared.u32_at(0), shared.u32_at(LINE));
    let child = || -> Res {
        for i in 1..=(warmup(rounds) + rounds) as u32 {
            futex_wait_for(ping, i);
            pong.store(i, Release);
            futex_wake(pong);
        }
        Ok(())
    };
    in_pair("bare futex ping-pong", child, || {
        time_rounds(rounds, |i| {
            let i = i as u32 + 1;
            ping.store(i, Release);
            futex_wake(ping);
            futex_wait_for(pong, i);
        })
    })
}

/// 64 B ping-pong through two bare rings, both sides spinning.
fn ring_rtt(rounds: usize) -> Latency {
    let second = RING_LEN.next_multiple_of(4096);
    let shared = Shared::new(2 * second);
    let child = || -> Res {
        let mut inbox = RingConsumer::new(shared.ring(0, SMALL));
        let mut outbox = RingProducer::new(shared.ring(second, SMALL));
        let mut buf = [0u8; SMALL];
        for _ in 0..warmup(rounds) + rounds {
            inbox.pop(&mut buf);
            outbox.push(&buf);
        }
        Ok(())
    };
    in_pair("bare SPSC ring ping-pong", child, || {
        let mut outbox = RingProducer::new(shared.ring(0, SMALL));
        let mut inbox = RingConsumer::new(shared.ring(second, SMALL));
        let mut buf = [0u8; SMALL];
        time_rounds(rounds, |i| {
            stamp(&mut buf, i);
            outbox.push(&buf);
            inbox.pop(&mut buf);
            assert_eq!(seq_of(&buf), i, "echo out of order");
        })
    })
}

/// One direction of [`stamp_rtt`], the bare form of the lanes' commit-word
/// protocol: 96-byte records (a 32-byte header whose first word is the
/// commit stamp, then 64 B) back to back in a ring; the first word of the
/// record after is zeroed before a record's stamp is stored with
/// `Release` (the terminator), and the receiver polls the stamp,
/// prefetching the record's second line. No tail, no validation, no
/// doorbell, no fence, no room check (a ping-pong never fills it).
struct StampLane {
    base: *mut u8,
    pos: u64,
}

const STAMP_REC: u64 = 96;

impl StampLane {
    /// The commit stamp of the record at `pos`: never 0 (the terminator).
    fn stamp(pos: u64) -> u64 {
        (pos / 8) | (1 << 63)
    }

    fn word(&self, pos: u64) -> &AtomicU64 {
        let off = (pos % (RING_BYTES as u64 / STAMP_REC * STAMP_REC)) as usize;
        // SAFETY: inside the ring, 8-aligned.
        unsafe { &*self.base.add(off).cast::<AtomicU64>() }
    }
    fn at(&self, pos: u64) -> *mut u8 {
        let off = (pos % (RING_BYTES as u64 / STAMP_REC * STAMP_REC)) as usize;
        // SAFETY: inside the ring.
        unsafe { self.base.add(off) }
    }
    fn send(&mut self, msg: &[u8; SMALL]) {
        let p = self.pos;
        self.word(p + STAMP_REC)
            .store(0, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the record's payload bytes, free (ping-pong: never full).
        unsafe { std::ptr::copy_nonoverlapping(msg.as_ptr(), self.at(p + 32), SMALL) };
        self.word(p).store(Self::stamp(p), Release);
        self.pos += STAMP_REC;
    }
    fn recv(&mut self, out: &mut [u8; SMALL]) {
        let p = self.pos;
        prefetch(self.at(p + 64));
        while self.word(p).load(Acquire) != Self::stamp(p) {
            std::hint::spin_loop();
            prefetch(self.at(p + 64));
        }
        // SAFETY: published by the stamp.
        unsafe { std::ptr::copy_nonoverlapping(self.at(p + 32), out.as_mut_ptr(), SMALL) };
        self.pos += STAMP_REC;
    }
}

/// Asks the CPU to fetch the line at `p` (a hint: no load, so no race
/// with the writer).
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing and cannot fault.
    #[allow(unused_unsafe)]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// 64 B ping-pong through two bare commit-word lanes.
fn stamp_rtt(rounds: usize) -> Latency {
    let second = RING_LEN.next_multiple_of(4096);
    let shared = Shared::new(2 * second);
    let lane = |off: usize| StampLane {
        // SAFETY: inside the mapping.
        base: unsafe { shared.ptr.add(off) },
        pos: 0,
    };
    let child = || -> Res {
        let (mut inbox, mut outbox) = (lane(0), lane(second));
        let mut buf = [0u8; SMALL];
        for _ in 0..warmup(rounds) + rounds {
            inbox.recv(&mut buf);
            outbox.send(&buf);
        }
        Ok(())
    };
    in_pair("bare commit-word ring ping-pong", child, || {
        let (mut outbox, mut inbox) = (lane(0), lane(second));
        let mut buf = [0u8; SMALL];
        time_rounds(rounds, |i| {
            stamp(&mut buf, i);
            outbox.send(&buf);
            inbox.recv(&mut buf);
            assert_eq!(seq_of(&buf), i, "echo out of order");
        })
    })
}

/// `count` messages of `size` bytes (the slot size) through a bare ring.
fn ring_stream(size: usize, count: usize) -> Rate {
    let shared = Shared::new(RING_LEN);
    let child = || -> Res {
        let mut outbox = RingProducer::new(shared.ring(0, size));
        let mut buf = vec![0u8; size];
        for i in 0..(warmup(count) + count) as u64 {
            stamp(&mut buf, i);
            outbox.push(&buf);
        }
        Ok(())
    };
    in_pair(&format!("bare SPSC ring, {size} B"), child, || {
        let mut inbox = RingConsumer::new(shared.ring(0, size));
        let mut out = vec![0u8; size];
        time_stream(count, size, |i| {
            inbox.pop(&mut out);
            assert_eq!(seq_of(&out), i, "message out of order");
        })
    })
}

/// 64 B ping-pong over blocking byte streams: this process uses `mine`,
/// the child `theirs` (each a reader and a writer).
fn io_rtt(
    name: &str,
    rounds: usize,
    mine: (impl Read, impl Write),
    theirs: (impl Read, impl Write),
) -> Latency {
    let child = move || -> Res {
        let (mut rx, mut tx) = theirs;
        let mut buf = [0u8; SMALL];
        for _ in 0..warmup(rounds) + rounds {
            rx.read_exact(&mut buf)?;
            tx.write_all(&buf)?;
        }
        Ok(())
    };
    in_pair(name, child, || {
        let (mut rx, mut tx) = mine;
        let mut buf = [0u8; SMALL];
        time_rounds(rounds, |i| {
            stamp(&mut buf, i);
            tx.write_all(&buf).expect("write");
            rx.read_exact(&mut buf).expect("read");
            assert_eq!(seq_of(&buf), i, "echo out of order");
        })
    })
}

/// `count` messages of `size` bytes over a byte stream, one `write` per
/// message; the reader is buffered (64 KiB), as a real framed reader would be.
fn io_stream(name: &str, size: usize, count: usize, rx: impl Read, tx: impl Write) -> Rate {
    let child = move || -> Res {
        let mut tx = tx;
        let mut buf = vec![0u8; size];
        for i in 0..(warmup(count) + count) as u64 {
            stamp(&mut buf, i);
            tx.write_all(&buf)?;
        }
        Ok(())
    };
    in_pair(name, child, || {
        let mut rx = BufReader::with_capacity(64 * 1024, rx);
        let mut out = vec![0u8; size];
        time_stream(count, size, |i| {
            rx.read_exact(&mut out).expect("read");
            assert_eq!(seq_of(&out), i, "message out of order");
        })
    })
}

/// A pipe: (read end, write end).
fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into the array.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned by nothing else.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

fn socket_rtt(rounds: usize) -> Latency {
    let (a, b) = UnixStream::pair().expect("socketpair");
    io_rtt("unix socketpair ping-pong", rounds, (&a, &a), (&b, &b))
}

fn pipe_rtt(rounds: usize) -> Latency {
    let (down_rx, down_tx) = pipe();
    let (up_rx, up_tx) = pipe();
    io_rtt("pipe ping-pong", rounds, (up_rx, down_tx), (down_rx, up_tx))
}

fn socket_stream(size: usize, count: usize) -> Rate {
    let (a, b) = UnixStream::pair().expect("socketpair");
    io_stream(&format!("unix socketpair, {size} B"), size, count, a, b)
}

fn pipe_stream(size: usize, count: usize) -> Rate {
    let (rx, tx) = pipe();
    io_stream(&format!("pipe, {size} B"), size, count, rx, tx)
}

// ----------------------------------------------------------------- report

fn ns(v: f64) -> String {
    if v < 10_000.0 {
        format!("{v:.0} ns")
    } else {
        format!("{:.1} µs", v / 1000.0)
    }
}

fn lat(l: Latency) -> String {
    format!("{} / {} / {}", ns(l.p50), ns(l.p99), ns(l.p999))
}

fn rate(r: Rate) -> String {
    format!(
        "{:.2} M msg/s, {:.2} GB/s",
        r.msgs_per_s / 1e6,
        r.bytes_per_s / 1e9
    )
}

fn mark(ok: bool) -> &'static str {
    if ok {
        "✓"
    } else {
        "✗"
    }
}

/// Rounds every comparison of the table is measured in. The host moves
/// this VM's two vCPUs between placements every few seconds (a
/// one-cache-line round trip takes ~110 ns in one and ~360 ns in the
/// other, and a bare ring streams 24 M or 4 M messages a second), so a
/// measure and its baseline taken minutes apart can be 5× off: each round
/// measures shmcluster and its baselines a moment apart, and the table
/// shows the round whose ratio is the median, with the range of all.
const ROUNDS: usize = 5;

/// One measure's figure.
#[derive(Debug, Clone, Copy)]
enum Figure {
    Lat(Latency),
    Rate(Rate),
}

impl Figure {
    /// The figure a ratio compares: p50, or messages per second.
    fn key(self) -> f64 {
        match self {
            Figure::Lat(l) => l.p50,
            Figure::Rate(r) => r.msgs_per_s,
        }
    }

    fn show(self) -> String {
        match self {
            Figure::Lat(l) => lat(l),
            Figure::Rate(r) => rate(r),
        }
    }

    /// `self ÷ other`: p50 / p99 / p99.9 for latencies.
    fn ratio(self, other: Figure) -> String {
        match (self, other) {
            (Figure::Lat(a), Figure::Lat(b)) => format!(
                "{:.2}× / {:.2}× / {:.2}×",
                a.p50 / b.p50,
                a.p99 / b.p99,
                a.p999 / b.p999
            ),
            _ => format!("{:.2}×", self.key() / other.key()),
        }
    }
}

/// A measure: its name in the table and how to take it once.
struct Measure<'a> {
    name: String,
    run: Box<dyn FnMut() -> Figure + 'a>,
    /// For a baseline: the most (a latency) or least (a rate) that
    /// shmcluster ÷ this baseline may be, the target.
    target: Option<f64>,
}

fn measure<'a>(name: impl Into<String>, run: impl FnMut() -> Figure + 'a) -> Measure<'a> {
    Measure {
        name: name.into(),
        run: Box::new(run),
        target: None,
    }
}

fn with_target(mut m: Measure<'_>, target: f64) -> Measure<'_> {
    m.target = Some(target);
    m
}

/// A table row: measure, shmcluster, baseline, baseline's value, ratio
/// (median round; range over the rounds), target.
type Row = [String; 6];

/// Measures `ours` and its `baselines` in [`ROUNDS`] rounds, each round
/// all of them in turn (the order reversed every other round), and gives
/// one row per baseline: the round whose `ours ÷ baseline` is the median.
fn compare(what: &str, mut ours: Measure<'_>, mut baselines: Vec<Measure<'_>>) -> Vec<Row> {
    let mut taken: Vec<(Figure, Vec<Figure>)> = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let mut theirs = vec![None; baselines.len()];
        if round % 2 == 0 {
            for (slot, b) in theirs.iter_mut().zip(&mut baselines) {
                *slot = Some((b.run)());
            }
        }
        let mine = (ours.run)();
        if round % 2 == 1 {
            for (slot, b) in theirs.iter_mut().zip(&mut baselines) {
                *slot = Some((b.run)());
            }
        }
        taken.push((mine, theirs.into_iter().flatten().collect()));
    }
    baselines
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let mut rounds: Vec<(f64, Figure, Figure)> = taken
                .iter()
                .map(|(mine, theirs)| (mine.key() / theirs[i].key(), *mine, theirs[i]))
                .collect();
            rounds.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (median, mine, theirs) = rounds[rounds.len() / 2];
            let (low, high) = (rounds[0].0, rounds[rounds.len() - 1].0);
            let target = match (b.target, mine) {
                (None, _) => String::new(),
                (Some(t), Figure::Lat(_)) => format!("p50 ≤ {t}× {}", mark(median <= t)),
                (Some(t), Figure::Rate(_)) => format!("≥ {t}× {}", mark(median >= t)),
            };
            [
                format!("{what}, {}", ours.name),
                mine.show(),
                b.name.clone(),
                theirs.show(),
                format!("{} (p50 {low:.2}–{high:.2}×)", mine.ratio(theirs)),
                target,
            ]
        })
        .collect()
}

/// `SHMCLUSTER_BENCH_TRANSPORT=pairs`: instead of the table, measure the
/// spinning round trip and the 64 B stream next to their baselines in
/// quick alternation, several times. The host moves this VM's vCPUs between
/// placements (one-cache-line round trip ~110 ns or ~360 ns) every few
/// seconds, so a ratio is only meaningful between measures a moment apart.
const MODE_VAR: &str = "SHMCLUSTER_BENCH_TRANSPORT";

fn pairs() {
    for _ in 0..6 {
        let line = cache_line_rtt(50_000);
        let spin = shm_rtt("shmcluster RTT, Spin", WaitStrategy::Spin, 50_000);
        let ring = ring_rtt(50_000);
        let commit = stamp_rtt(50_000);
        let line2 = cache_line_rtt(50_000);
        let best = line.p50.max(line2.p50);
        println!(
            "rtt p50: line {:.0} / {:.0} ns, shm {:.0} ns ({:.2}× line), ring {:.0} ns ({:.2}×), \
             commit-word ring {:.0} ns ({:.2}×)",
            line.p50,
            line2.p50,
            spin.p50,
            spin.p50 / best,
            ring.p50,
            ring.p50 / best,
            commit.p50,
            commit.p50 / best,
        );
        let ring_s = ring_stream(SMALL, 1_000_000);
        let small = shm_stream("shmcluster, 64 B", SMALL, 1_000_000);
        let batched = shm_stream_batched("shmcluster batched, 64 B", SMALL, 1_000_000);
        let ring_s2 = ring_stream(SMALL, 1_000_000);
        let best = ring_s.msgs_per_s.max(ring_s2.msgs_per_s);
        println!(
            "stream 64 B: ring {:.1} / {:.1} M/s, shm {:.1} M/s ({:.2}× ring), batched {:.1} M/s ({:.2}× ring)",
            ring_s.msgs_per_s / 1e6,
            ring_s2.msgs_per_s / 1e6,
            small.msgs_per_s / 1e6,
            small.msgs_per_s / best,
            batched.msgs_per_s / 1e6,
            batched.msgs_per_s / best,
        );
    }
}

fn main() {
    if std::env::var(MODE_VAR).is_ok_and(|m| m == "pairs") {
        pairs();
        return;
    }
    // Per round: 5 rounds make the totals of earlier versions of this
    // table (200 000 spinning round trips, 5 M 64 B messages).
    const SPIN_ROUNDS: usize = 40_000;
    const PARK_ROUNDS: usize = 4_000;
    const STREAM: usize = 1_000_000;
    const SLOW_STREAM: usize = 100_000;

    warn_if_busy();

    let default_spin = WaitStrategy::DEFAULT_SPIN.as_micros();
    let stp = WaitStrategy::SpinThenPark(WaitStrategy::DEFAULT_SPIN);
    let (lat, rate) = (Figure::Lat, Figure::Rate);
    let rtt = "RTT 64 B p50 / p99 / p99.9";
    let line = || {
        measure("one-cache-line ping-pong (spin)", || {
            lat(cache_line_rtt(SPIN_ROUNDS))
        })
    };
    let ring = |size: usize, count: usize| {
        measure(format!("bare SPSC ring ({size} B slots)"), move || {
            rate(ring_stream(size, count))
        })
    };
    let mut rows: Vec<Row> = Vec::new();
    rows.extend(compare(
        rtt,
        measure("`Spin`", || {
            lat(shm_rtt("shmcluster RTT, Spin", WaitStrategy::Spin, SPIN_ROUNDS))
        }),
        vec![
            with_target(line(), 2.0),
            measure("bare SPSC ring pair (spin)", || lat(ring_rtt(SPIN_ROUNDS))),
            measure("bare commit-word ring pair (spin)", || {
                lat(stamp_rtt(SPIN_ROUNDS))
            }),
        ],
    ));
    rows.extend(compare(
        rtt,
        measure(
            format!("`SpinThenPark({default_spin} µs)` (the default)"),
            || lat(shm_rtt("shmcluster RTT, SpinThenPark", stp, SPIN_ROUNDS)),
        ),
        vec![line()],
    ));
    rows.extend(compare(
        rtt,
        measure("`Park`", || {
            lat(shm_rtt("shmcluster RTT, Park", WaitStrategy::Park, PARK_ROUNDS))
        }),
        vec![
            with_target(
                measure("bare futex wait/wake ping-pong", || lat(futex_rtt(PARK_ROUNDS))),
                1.1,
            ),
            measure("unix socketpair (blocking)", || lat(socket_rtt(PARK_ROUNDS))),
            measure("pipe pair (blocking)", || lat(pipe_rtt(PARK_ROUNDS))),
        ],
    ));
    rows.extend(compare(
        "one-way 64 B",
        measure("one `send` each", || {
            rate(shm_stream("shmcluster, 64 B", SMALL, STREAM))
        }),
        vec![
            with_target(ring(SMALL, STREAM), 0.5),
            measure("unix socketpair", || rate(socket_stream(SMALL, SLOW_STREAM))),
            measure("pipe", || rate(pipe_stream(SMALL, SLOW_STREAM))),
        ],
    ));
    rows.extend(compare(
        "one-way 64 B",
        measure(format!("`Batch` of {BATCH} + `recv_many`"), || {
            rate(shm_stream_batched("shmcluster batched, 64 B", SMALL, STREAM))
        }),
        vec![with_target(ring(SMALL, STREAM), 0.8)],
    ));
    rows.extend(compare(
        "one-way 4 KiB",
        measure("one `send` each", || {
            rate(shm_stream("shmcluster, 4 KiB", LARGE, SLOW_STREAM))
        }),
        vec![
            ring(LARGE, SLOW_STREAM),
            measure("unix socketpair", || rate(socket_stream(LARGE, SLOW_STREAM / 5))),
            measure("pipe", || rate(pipe_stream(LARGE, SLOW_STREAM / 5))),
        ],
    ));

    println!("Machine: {}", machine());
    println!();
    println!(
        "Each comparison in {ROUNDS} rounds, shmcluster and its baselines a moment apart in each \
         round; the row shows the round whose p50 (or rate) ratio is the median, and the range \
         over all rounds. Round trips: {SPIN_ROUNDS} spinning or {PARK_ROUNDS} parked per round; \
         streams: {STREAM} (64 B, rings) or {SLOW_STREAM} messages per round."
    );
    println!();
    println!(
        "| measure | shmcluster | baseline | baseline value | ratio (shmcluster ÷ baseline; range over \
         rounds) | target |"
    );
    println!("|---|---|---|---|---|---|");
    for row in rows {
        println!("| {} |", row.join(" | "));
    }
}
