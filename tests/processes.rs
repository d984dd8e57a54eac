//! The transport between real processes: children made with `fork(2)`
//! ([`shmcluster::testing::fork`]), each opening its own slot of a segment
//! created before the fork, exactly as pre-forked workers do.
//!
//! Children never print (the stdout lock may be held by another thread at
//! the fork). They report through their exit code and, for a readable
//! failure message, through a `MAP_SHARED` anonymous page ([`SharedPage`])
//! mapped before the fork. Every test arms a [`Watchdog`] that tracks its
//! children, and reaps every child before it ends.
//!
//! The tests take a process-wide lock ([`serial`]) so that they run one at a
//! time: several of them keep both cores of the reference machine busy, and
//! two at once would make their timing assertions meaningless.

use std::ptr::NonNull;
use std::sync::atomic::{
    AtomicU64,
    Ordering::{Acquire, Release},
};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shmcluster::raw::{
    Config, Endpoint, RecvError, Segment, SendError, Tag, TryRecvError, TrySendError, DEFAULT_MAX_MESSAGE,
};
use shmcluster::testing::{fork, Child, ExitStatus, Watchdog};
use shmcluster::WaitStrategy;

mod common;
use common::Rng;

// ------------------------------------------------------------ helpers

/// One test at a time (see the module doc).
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// 64-bit FNV-1a.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash = 0xCBF2_9CE4_8422_2325u64;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01B3);
    }
    hash
}

/// A small numbered message: the sequence number (8 bytes, little endian),
/// then 0..=56 filler bytes that depend on `seq` and `salt`. Returns its
/// length (8..=64).
fn numbered(buf: &mut [u8; 64], seq: u64, salt: u8) -> usize {
    let len = 8 + (seq.wrapping_mul(13).wrapping_add(u64::from(salt)) % 57) as usize;
    buf[..8].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in buf[8..len].iter_mut().enumerate() {
        *b = (seq as u8).wrapping_add(i as u8) ^ salt;
    }
    len
}

/// Checks a message made by [`numbered`] (length and every byte) and
/// returns its sequence number.
fn check_numbered(payload: &[u8], salt: u8) -> Result<u64, String> {
    let Some(head) = payload.get(..8) else {
        return Err(format!(
            "a {}-byte message, shorter than its number",
            payload.len()
        ));
    };
    let seq = u64::from_le_bytes(head.try_into().expect("8 bytes"));
    let mut expected = [0u8; 64];
    let len = numbered(&mut expected, seq, salt);
    if payload != &expected[..len] {
        return Err(format!(
            "message {seq} is damaged: {} bytes, expected {len}",
            payload.len()
        ));
    }
    Ok(seq)
}

/// An anonymous `MAP_SHARED` mapping made before forking: what a child
/// writes there the parent sees. Holds counters and one failure report per
/// child. Only ever accessed through raw pointers and atomics.
struct SharedPage {
    ptr: NonNull<u8>,
}

impl SharedPage {
    const LEN: usize = 64 * 1024;
    const COUNTERS: usize = 64;
    const REPORTS_AT: usize = 4096;
    const REPORT_LEN: usize = 4096;
    const REPORTS: usize = (Self::LEN - Self::REPORTS_AT) / Self::REPORT_LEN;

    fn new() -> Self {
        // SAFETY: a fresh anonymous mapping at an address of the kernel's
        // choosing: it aliases no Rust object. The result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        Self {
            ptr: NonNull::new(ptr.cast()).expect("mmap returned null"),
        }
    }

    /// Counter `i`, zero at first.
    fn counter(&self, i: usize) -> &AtomicU64 {
        assert!(i < Self::COUNTERS);
        // SAFETY: `i * 8 + 8 <= 512 <= LEN`, 8-aligned (the mapping is page
        // aligned), valid as long as `self`; both processes access these
        // words only atomically.
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(i * 8).cast()) }
    }

    /// The length word of report `who`.
    fn report_len(&self, who: usize) -> &AtomicU64 {
        assert!(who < Self::REPORTS);
        // SAFETY: inside the mapping (the report area starts at 4096, each
        // report's first 8 bytes are its length), 8-aligned, valid as long
        // as `self`; accessed only atomically.
        unsafe {
            AtomicU64::from_ptr(
                self.ptr
                    .as_ptr()
                    .add(Self::REPORTS_AT + who * Self::REPORT_LEN)
                    .cast(),
            )
        }
    }

    /// Writes a failure report for child `who` (truncated to fit).
    fn write_report(&self, who: usize, text: &str) {
        let len = text.len().min(Self::REPORT_LEN - 8);
        let at = Self::REPORTS_AT + who * Self::REPORT_LEN + 8;
        // SAFETY: `at + len <= REPORTS_AT + (who + 1) * REPORT_LEN <= LEN`
        // (`report_len` checks `who`); `text` is local memory, so the two do
        // not overlap; the parent reads these bytes only after the length
        // is published (Release) and the child has ended.
        unsafe {
            let len_word = self.report_len(who);
            std::ptr::copy_nonoverlapping(text.as_ptr(), self.ptr.as_ptr().add(at), len);
            len_word.store(len as u64, Release);
        }
    }

    /// Report `who`, or an empty string.
    fn read_report(&self, who: usize) -> String {
        let len = (self.report_len(who).load(Acquire) as usize).min(Self::REPORT_LEN - 8);
        let at = Self::REPORTS_AT + who * Self::REPORT_LEN + 8;
        let mut bytes = vec![0u8; len];
        // SAFETY: `at + len` is inside the mapping (as in `write_report`);
        // the writer published `len` bytes (Acquire above) and has ended.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(at), bytes.as_mut_ptr(), len) };
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Drop for SharedPage {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no reference
        // into it outlives `self` (they all borrow it).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), Self::LEN) };
    }
}

/// Why a child failed: its exit code and a report for the parent.
struct Failure {
    code: i32,
    what: String,
}

impl From<String> for Failure {
    fn from(what: String) -> Self {
        Self { code: 1, what }
    }
}

/// Forks a child that runs `body`, tracked by `dog`. It exits 0 on `Ok`;
/// on `Err` it writes the report to `page` as child `who` and exits with
/// the failure's code. Every `body` in this file keeps to [`fork`]'s
/// contract: it uses its own endpoints and the page, prints nothing, and
/// takes no lock another thread of the test process may hold.
fn spawn(dog: &Watchdog, page: &SharedPage, who: usize, body: impl FnOnce() -> Result<(), Failure>) -> Child {
    // SAFETY: the bodies keep to the contract (above); writing the report
    // page is a plain memory copy into a shared mapping.
    let child = unsafe {
        fork(|| match body() {
            Ok(()) => 0,
            Err(failure) => {
                page.write_report(who, &failure.what);
                failure.code
            }
        })
    }
    .expect("fork");
    dog.track(child)
}

/// Reaps `child` and asserts that it exited 0, showing its report if not.
fn expect_success(child: Child, page: &SharedPage, who: usize, timeout: Duration) {
    let status = child.wait_timeout(timeout).expect("waitpid");
    assert_eq!(
        status,
        Some(ExitStatus::Code(0)),
        "child {who} (pid {}): {}",
        child.pid(),
        page.read_report(who)
    );
}

/// Asserts that nothing is waiting for `me`, and nothing arrives for a
/// little while.
fn assert_nothing_more(me: &mut Endpoint) {
    assert_eq!(me.try_recv(), Err(TryRecvError::Empty));
    assert_eq!(
        me.recv_timeout(Duration::from_millis(30)),
        Err(RecvError::Timeout)
    );
}

const RECV_TIMEOUT: Duration = Duration::from_secs(10);

// ------------------------------------------------------------ tests

#[test]
fn million_messages_two_processes() {
    let _serial = serial();
    let dog = Watchdog::new("million_messages_two_processes", Duration::from_secs(60));
    const N: u64 = 1_000_000;
    const SALT: u8 = 0x5A;
    let page = SharedPage::new();
    let segment = Segment::create(&Config::new(2)).expect("create");
    let child = spawn(&dog, &page, 0, || {
        let mut me = segment.endpoint(1).map_err(|e| format!("slot 1: {e}"))?;
        let mut buf = [0u8; 64];
        for seq in 0..N {
            let len = numbered(&mut buf, seq, SALT);
            me.send(0, &buf[..len]).map_err(|e| format!("send {seq}: {e}"))?;
        }
        Ok(())
    });
    let mut me = segment.endpoint(0).expect("slot 0");
    for expected in 0..N {
        let msg = me
            .recv_ref(Some(Instant::now() + RECV_TIMEOUT))
            .unwrap_or_else(|e| panic!("waiting for message {expected}: {e}"));
        assert_eq!(msg.sender(), 1);
        let seq = check_numbered(msg.payload(), SALT).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(seq, expected, "per-sender FIFO: no loss, no duplicate");
    }
    expect_success(child, &page, 0, Duration::from_secs(10));
    assert_nothing_more(&mut me);
}

/// One process of the all-to-all test: sends `per_peer` numbered messages
/// to every other slot and receives as many from each, checking each
/// sender's sequence. Never blocks on a full lane (the peer may be blocked
/// on ours): it drains its inbox instead.
fn all_to_all(me: &mut Endpoint, per_peer: u64) -> Result<(), String> {
    let slot = me.slot();
    let workers = me.workers() as usize;
    let salt = |from: u32, to: u32| (from * 16 + to) as u8;
    let peers: Vec<u32> = (0..workers as u32).filter(|&p| p != slot).collect();
    let mut sent = vec![0u64; workers];
    let mut next = vec![0u64; workers];
    let expected = per_peer * peers.len() as u64;
    let mut buf = [0u8; 64];
    let give_up = Instant::now() + Duration::from_secs(60);

    let take = |sender: u32, payload: &[u8], next: &mut Vec<u64>| -> Result<(), String> {
        if sender == slot || sender as usize >= workers {
            return Err(format!("slot {slot}: a message claims sender {sender}"));
        }
        let seq = check_numbered(payload, salt(sender, slot)).map_err(|e| format!("slot {slot}: {e}"))?;
        let want = next[sender as usize];
        if seq != want || seq >= per_peer {
            return Err(format!(
                "slot {slot}: from {sender} got seq {seq}, expected {want}"
            ));
        }
        next[sender as usize] += 1;
        Ok(())
    };

    loop {
        let mut progress = false;
        for &to in &peers {
            // A batch per peer and round, so receiving interleaves.
            for _ in 0..64 {
                let n = sent[to as usize];
                if n == per_peer {
                    break;
                }
                let len = numbered(&mut buf, n, salt(slot, to));
                match me.try_send(to, &buf[..len]) {
                    Ok(()) => {
                        sent[to as usize] += 1;
                        progress = true;
                    }
                    Err(TrySendError::Full(_)) => break,
                    Err(e) => return Err(format!("slot {slot}: try_send to {to}: {e}")),
                }
            }
        }
        loop {
            match me.try_recv_ref() {
                Ok(msg) => {
                    take(msg.sender(), msg.payload(), &mut next)?;
                    progress = true;
                }
                Err(TryRecvError::Empty) => break,
                Err(e) => return Err(format!("slot {slot}: try_recv: {e}")),
            }
        }
        let all_sent = peers.iter().all(|&p| sent[p as usize] == per_peer);
        let all_received = next.iter().sum::<u64>() == expected;
        if all_sent && all_received {
            break;
        }
        if !progress {
            // Our lanes are full and our inbox empty: wait a little for a
            // message (a peer that drains ours usually sends too).
            match me.recv_ref(Some(Instant::now() + Duration::from_millis(1))) {
                Ok(msg) => take(msg.sender(), msg.payload(), &mut next)?,
                Err(RecvError::Timeout) => {}
                Err(e) => return Err(format!("slot {slot}: recv: {e}")),
            }
        }
        if Instant::now() > give_up {
            return Err(format!("slot {slot}: stuck: sent {sent:?}, received {next:?}"));
        }
    }
    for &p in &peers {
        if next[p as usize] != per_peer {
            return Err(format!(
                "slot {slot}: {} messages from {p}, expected {per_peer}",
                next[p as usize]
            ));
        }
    }
    match me.try_recv() {
        Err(TryRecvError::Empty) => Ok(()),
        other => Err(format!("slot {slot}: something more arrived: {other:?}")),
    }
}

#[test]
fn million_messages_four_processes() {
    let _serial = serial();
    let dog = Watchdog::new("million_messages_four_processes", Duration::from_secs(90));
    const WORKERS: u32 = 4;
    const PER_PEER: u64 = 83_334;
    let page = SharedPage::new();
    let segment = Segment::create(&Config::new(WORKERS)).expect("create");
    let children: Vec<(usize, Child)> = (1..WORKERS)
        .map(|slot| {
            let segment = &segment;
            let child = spawn(&dog, &page, slot as usize, move || {
                let mut me = segment.endpoint(slot).map_err(|e| format!("slot {slot}: {e}"))?;
                Ok(all_to_all(&mut me, PER_PEER)?)
            });
            (slot as usize, child)
        })
        .collect();
    let mut me = segment.endpoint(0).expect("slot 0");
    let mine = all_to_all(&mut me, PER_PEER);
    for (who, child) in children {
        expect_success(child, &page, who, Duration::from_secs(30));
    }
    mine.unwrap_or_else(|e| panic!("{e}"));
    assert_nothing_more(&mut me);
}

#[test]
fn fragmented_messages_one_kib_to_sixteen_mib_with_checksums() {
    let _serial = serial();
    let dog = Watchdog::new("fragmented_messages", Duration::from_secs(60));
    const KIB: usize = 1024;
    const MIB: usize = 1024 * KIB;
    const SIZES: [usize; 9] = [
        KIB,
        4 * KIB,
        31 * KIB,
        32 * KIB,
        33 * KIB,
        100 * KIB,
        MIB,
        4 * MIB,
        DEFAULT_MAX_MESSAGE,
    ];
    assert_eq!(DEFAULT_MAX_MESSAGE, 16 * MIB);
    const END: u16 = 0xE0D;
    /// The child's exit code when 16 MiB + 1 is not refused with `TooLarge`.
    const TOO_LARGE_NOT_REFUSED: i32 = 3;
    let data = |i: usize| {
        let mut bytes = vec![0u8; SIZES[i]];
        Rng::spread(1000 + i as u64).fill(&mut bytes);
        bytes
    };
    let page = SharedPage::new();
    let config = Config::new(2);
    let segment = Segment::create(&config).expect("create");
    assert_eq!(
        segment.layout().lane_capacity(),
        shmcluster::raw::DEFAULT_LANE_CAPACITY
    );
    assert_eq!(segment.layout().max_message(), DEFAULT_MAX_MESSAGE);
    let child = spawn(&dog, &page, 0, || {
        let mut me = segment.endpoint(1).map_err(|e| format!("slot 1: {e}"))?;
        for (i, size) in SIZES.into_iter().enumerate() {
            let bytes = data(i);
            let tag = Tag {
                kind: i as u16,
                correlation: fnv1a(&bytes),
            };
            me.send_tagged(0, tag, bytes, None)
                .map_err(|e| format!("send {size} bytes: {e}"))?;
        }
        match me.send(0, vec![0u8; DEFAULT_MAX_MESSAGE + 1]) {
            Err(SendError::TooLarge { len, max })
                if len == DEFAULT_MAX_MESSAGE + 1 && max == DEFAULT_MAX_MESSAGE => {}
            other => {
                return Err(Failure {
                    code: TOO_LARGE_NOT_REFUSED,
                    what: format!("16 MiB + 1: {:?}", other.map_err(|e| e.to_string())),
                })
            }
        }
        let end = Tag {
            kind: END,
            correlation: 0,
        };
        me.send_tagged(0, end, b"end", None)
            .map_err(|e| format!("send end: {e}"))?;
        Ok(())
    });
    // While the child streams the first messages, work out what to expect.
    let expected: Vec<u64> = (0..SIZES.len()).map(|i| fnv1a(&data(i))).collect();
    let mut me = segment.endpoint(0).expect("slot 0");
    for (i, &size) in SIZES.iter().enumerate() {
        let msg = me
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("waiting for message {i} ({size} bytes): {e}"));
        assert_eq!((msg.sender, msg.kind), (1, i as u16), "in order");
        assert_eq!(msg.payload.len(), size, "length of message {i}");
        assert_eq!(
            msg.correlation, expected[i],
            "the child's checksum of message {i}"
        );
        assert_eq!(
            fnv1a(&msg.payload),
            expected[i],
            "checksum of message {i} ({size} bytes)"
        );
    }
    let end = me.recv_timeout(RECV_TIMEOUT).expect("the end marker");
    assert_eq!(
        (end.kind, &end.payload[..]),
        (END, &b"end"[..]),
        "nothing of 16 MiB + 1 was sent"
    );
    let status = child.wait_timeout(Duration::from_secs(10)).expect("waitpid");
    assert_ne!(
        status,
        Some(ExitStatus::Code(TOO_LARGE_NOT_REFUSED)),
        "{}",
        page.read_report(0)
    );
    assert_eq!(status, Some(ExitStatus::Code(0)), "{}", page.read_report(0));
    assert_nothing_more(&mut me);
    assert_eq!(me.discarded_fragments(), 0);
}

/// The body length of message `seq` in the kill test: mostly small, one in
/// three several times larger than half a 4 KiB lane (fragmented).
fn kill_test_body_len(seq: u64) -> usize {
    let mut rng = Rng::spread(seq);
    if rng.below(3) == 0 {
        2_000 + rng.below(10_000)
    } else {
        rng.below(1_500)
    }
}

/// Message `seq` of the kill test: seq, FNV-1a of the body, body.
fn kill_test_message(seq: u64, buf: &mut Vec<u8>) {
    let len = kill_test_body_len(seq);
    buf.clear();
    buf.resize(16 + len, 0);
    Rng::spread(seq ^ 0xDEAD).fill(&mut buf[16..]);
    let sum = fnv1a(&buf[16..]);
    buf[..8].copy_from_slice(&seq.to_le_bytes());
    buf[8..16].copy_from_slice(&sum.to_le_bytes());
}

/// Checks a kill-test message whole; returns its seq.
fn check_kill_test_message(payload: &[u8]) -> Result<u64, String> {
    if payload.len() < 16 {
        return Err(format!("a {}-byte message", payload.len()));
    }
    let seq = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
    let sum = u64::from_le_bytes(payload[8..16].try_into().expect("8 bytes"));
    let body = &payload[16..];
    if body.len() != kill_test_body_len(seq) || fnv1a(body) != sum {
        return Err(format!(
            "message {seq} is damaged: body of {} bytes (expected {})",
            body.len(),
            kill_test_body_len(seq)
        ));
    }
    Ok(seq)
}

#[test]
fn sender_killed_mid_write_never_delivers_a_partial_message() {
    let _serial = serial();
    let dog = Watchdog::new("sender_killed_mid_write", Duration::from_secs(60));
    const ROUNDS: u64 = 15;
    const COMMITTED: usize = 0;
    const SUCCESSOR_GENERATION: usize = 1;
    let mut rng = Rng::spread(0x5EED);
    let (mut in_flight_delivered, mut partials_discarded) = (0, 0);
    for round in 0..ROUNDS {
        let page = SharedPage::new();
        let config = Config::new(2).lane_capacity(if round % 2 == 0 { 4096 } else { 16 * 1024 });
        let segment = Segment::create(&config).expect("create");
        let victim = spawn(&dog, &page, 0, || {
            let mut me = segment.endpoint(1).map_err(|e| format!("slot 1: {e}"))?;
            let mut buf = Vec::new();
            for seq in 0.. {
                kill_test_message(seq, &mut buf);
                me.send(0, &buf[..]).map_err(|e| format!("send {seq}: {e}"))?;
                page.counter(COMMITTED).store(seq + 1, Release);
            }
            Ok(())
        });
        let mut me = segment.endpoint(0).expect("slot 0");
        let mut n = 0u64;
        let mut dead_generation = None;
        let mut take = |msg: shmcluster::raw::Message| {
            assert_eq!(msg.sender, 1);
            let seq = check_kill_test_message(&msg.payload).unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(seq, n, "round {round}: no gap, no duplicate");
            assert_eq!(
                *dead_generation.get_or_insert(msg.generation),
                msg.generation,
                "round {round}: one sender generation"
            );
            n += 1;
        };
        let run_for = Duration::from_micros(rng.below(20_001) as u64);
        let start = Instant::now();
        while start.elapsed() < run_for {
            match me.try_recv() {
                Ok(msg) => take(msg),
                Err(TryRecvError::Empty) => std::hint::spin_loop(),
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        victim.kill().expect("kill");
        let status = victim.wait_timeout(Duration::from_secs(10)).expect("waitpid");
        assert_eq!(
            status,
            Some(ExitStatus::Signal(libc::SIGKILL)),
            "round {round}: {}",
            page.read_report(0)
        );
        let committed = page.counter(COMMITTED).load(Acquire);
        loop {
            match me.try_recv() {
                Ok(msg) => take(msg),
                Err(TryRecvError::Empty) => break,
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        match me.recv_timeout(Duration::from_millis(20)) {
            Err(RecvError::Timeout) => {}
            other => panic!("round {round}: after the drain: {other:?}"),
        }
        assert!(
            committed <= n && n <= committed + 1,
            "round {round}: {n} messages delivered, {committed} sends had returned"
        );
        in_flight_delivered += u64::from(n == committed + 1);

        // A successor takes the dead holder's slot over.
        let successor = spawn(&dog, &page, 1, || {
            let mut me = segment
                .endpoint(1)
                .map_err(|e| format!("taking slot 1 over: {e}"))?;
            page.counter(SUCCESSOR_GENERATION)
                .store(u64::from(me.generation()), Release);
            me.send(0, b"after").map_err(|e| format!("send after: {e}"))?;
            Ok(())
        });
        let after = me.recv_timeout(RECV_TIMEOUT).unwrap_or_else(|e| {
            panic!(
                "round {round}: the successor's message: {e} ({})",
                page.read_report(1)
            )
        });
        expect_success(successor, &page, 1, Duration::from_secs(10));
        assert_eq!(
            (after.sender, &after.payload[..]),
            (1, &b"after"[..]),
            "round {round}: the successor's message comes next"
        );
        assert_eq!(
            u64::from(after.generation),
            page.counter(SUCCESSOR_GENERATION).load(Acquire)
        );
        if let Some(dead) = dead_generation {
            assert_ne!(after.generation, dead, "round {round}: a new generation");
        }
        let discarded = me.discarded_fragments();
        assert!(
            discarded <= 1,
            "round {round}: {discarded} partial messages discarded"
        );
        partials_discarded += discarded;
        assert_nothing_more(&mut me);
    }
    eprintln!(
        "{ROUNDS} rounds: the message in flight was delivered in {in_flight_delivered}, \
         a partial message was discarded in {partials_discarded}"
    );
}

#[test]
fn receiver_in_another_process_is_woken_from_park() {
    let _serial = serial();
    let dog = Watchdog::new("woken_from_park", Duration::from_secs(30));
    const ROUNDS: u32 = 20;
    /// The child's exit code when a message took 5 s or more to arrive.
    const TOO_SLOW: i32 = 4;
    let page = SharedPage::new();
    let segment = Segment::create(&Config::new(2)).expect("create");
    let child = spawn(&dog, &page, 0, || {
        let mut me = segment.endpoint(1).map_err(|e| format!("slot 1: {e}"))?;
        me.set_wait_strategy(WaitStrategy::Park);
        for i in 0..ROUNDS {
            let start = Instant::now();
            let msg = me
                .recv_timeout(Duration::from_secs(10))
                .map_err(|e| format!("message {i}: {e}"))?;
            let waited = start.elapsed();
            if waited >= Duration::from_secs(5) {
                return Err(Failure {
                    code: TOO_SLOW,
                    what: format!("message {i} took {waited:?}"),
                });
            }
            if msg.payload != i.to_le_bytes() {
                return Err(format!("message {i}: {:?}", msg.payload).into());
            }
            me.send(0, msg.payload).map_err(|e| format!("echo {i}: {e}"))?;
        }
        Ok(())
    });
    let mut me = segment.endpoint(0).expect("slot 0");
    let mut round_trips = Vec::new();
    for i in 0..ROUNDS {
        // Long enough for the child to be asleep on its futex.
        std::thread::sleep(Duration::from_millis(if i == 0 { 50 } else { 5 }));
        let start = Instant::now();
        me.send(1, i.to_le_bytes()).expect("send");
        let echo = me
            .recv_timeout(RECV_TIMEOUT)
            .unwrap_or_else(|e| panic!("echo {i}: {e} ({})", page.read_report(0)));
        round_trips.push(start.elapsed());
        assert_eq!((echo.sender, &echo.payload[..]), (1, &i.to_le_bytes()[..]));
    }
    expect_success(child, &page, 0, Duration::from_secs(10));
    assert_nothing_more(&mut me);
    // A lost wakeup would still be rescued by the receiver's 50 ms safety
    // net timeout; real wakes answer in well under that.
    round_trips.sort();
    let median = round_trips[round_trips.len() / 2];
    assert!(
        median < Duration::from_millis(25),
        "median round trip {median:?}: woken by the timeout, not by the sender? {round_trips:?}"
    );
}

#[test]
fn full_lane_backpressure_across_processes() {
    let _serial = serial();
    let dog = Watchdog::new("full_lane_backpressure", Duration::from_secs(30));
    const N: u64 = 10_000;
    const LEN: usize = 500;
    const SENT: usize = 0;
    // The lane fills about 1,400 times: had the producer waited for its
    // 50 ms safety-net timeout each time instead of being woken by the
    // receiver freeing space, the drain would take over a minute.
    const DRAIN_LIMIT: Duration = Duration::from_secs(10);
    let message = |seq: u64| {
        let mut bytes = vec![seq as u8 ^ 0xA5; LEN];
        bytes[..8].copy_from_slice(&seq.to_le_bytes());
        bytes
    };
    let page = SharedPage::new();
    let segment = Segment::create(&Config::new(2).lane_capacity(4096)).expect("create");
    let child = spawn(&dog, &page, 0, || {
        let mut me = segment.endpoint(1).map_err(|e| format!("slot 1: {e}"))?;
        // Sleep on the futex as soon as the lane is full.
        me.set_wait_strategy(WaitStrategy::Park);
        for seq in 0..N {
            me.send(0, message(seq)).map_err(|e| format!("send {seq}: {e}"))?;
            page.counter(SENT).store(seq + 1, Release);
        }
        Ok(())
    });
    let mut me = segment.endpoint(0).expect("slot 0");
    // Once the producer has started, give it time to fill the lane.
    let started = Instant::now();
    while page.counter(SENT).load(Acquire) == 0 {
        assert!(started.elapsed() < RECV_TIMEOUT, "the producer never sent");
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(100));
    let sent_before = page.counter(SENT).load(Acquire);
    assert!(
        (1..=8).contains(&sent_before),
        "a 4 KiB lane holds at most 7 messages of 500 bytes; {sent_before} sends returned"
    );
    assert_eq!(
        child.try_wait().expect("waitpid"),
        None,
        "the sender is blocked, not done"
    );
    let start = Instant::now();
    for seq in 0..N {
        if seq < 20 {
            // Slowly at first.
            std::thread::sleep(Duration::from_millis(2));
        }
        let msg = me
            .recv_timeout(RECV_TIMEOUT)
            .unwrap_or_else(|e| panic!("message {seq}: {e} ({})", page.read_report(0)));
        assert_eq!(msg.sender, 1);
        assert!(msg.payload == message(seq), "message {seq} in order and intact");
        assert!(
            start.elapsed() < DRAIN_LIMIT,
            "only {seq} of {N} messages after {DRAIN_LIMIT:?}: is the producer woken when space frees?"
        );
    }
    expect_success(child, &page, 0, Duration::from_secs(10));
    assert_nothing_more(&mut me);
}

/// Messages in batch `b` of the batch kill tests: 1 to 13.
fn batch_size(b: u64) -> u64 {
    1 + (b * 7) % 13
}

/// Receives everything waiting for `me` with `recv_many` (one head store
/// per drain), checking that the numbered messages (salt `salt`) continue
/// from `n` with no gap; returns the new count.
fn drain_numbered(me: &mut Endpoint, mut n: u64, salt: u8) -> Result<u64, String> {
    let mut failure = None;
    loop {
        let got = me.try_recv_many(usize::MAX, |msg| {
            let seq = check_numbered(msg.payload(), salt);
            match seq {
                Ok(seq) if seq == n => n += 1,
                Ok(seq) => {
                    failure.get_or_insert(format!("message {seq} where {n} was due"));
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        });
        if let Some(f) = failure {
            return Err(f);
        }
        match got {
            Ok(_) => {}
            Err(TryRecvError::Empty) => return Ok(n),
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[test]
fn a_sender_killed_mid_batch_shows_nothing_of_the_unflushed_batch() {
    let _serial = serial();
    let dog = Watchdog::new("killed_mid_batch", Duration::from_secs(60));
    const PUSHED: usize = 0;
    let page = SharedPage::new();
    let segment = Segment::create(&Config::new(2)).expect("create");
    let victim = spawn(&dog, &page, 0, || {
        let mut me = segment.endpoint(1).map_err(|e| format!("slot 1: {e}"))?;
        let mut buf = [0u8; 64];
        let mut batch = me.batch(0).map_err(|e| format!("batch: {e}"))?;
        for seq in 0..8 {
            let len = numbered(&mut buf, seq, 9);
            batch.push(&buf[..len]).map_err(|e| format!("push {seq}: {e}"))?;
            if seq == 2 {
                batch.flush();
            }
        }
        // Messages 3 to 7 are written into the lane, not published.
        page.counter(PUSHED).store(1, Release);
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    let mut me = segment.endpoint(0).expect("slot 0");
    let start = Instant::now();
    while page.counter(PUSHED).load(Acquire) == 0 {
        assert!(
            start.elapsed() < RECV_TIMEOUT,
            "the victim never pushed: {}",
            page.read_report(0)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    victim.kill().expect("kill");
    let status = victim.wait_timeout(Duration::from_secs(10)).expect("waitpid");
    assert_eq!(
        status,
        Some(ExitStatus::Signal(libc::SIGKILL)),
        "{}",
        page.read_report(0)
    );

    let n = drain_numbered(&mut me, 0, 9).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(n, 3, "the flushed batch, and nothing of the unflushed one");
    assert_nothing_more(&mut me);

    // The slot's next holder writes over the unpublished messages.
    let successor = spawn(&dog, &page, 1, || {
        let mut me = segment
            .endpoint(1)
            .map_err(|e| format!("taking slot 1 over: {e}"))?;
        me.send(0, b"after").map_err(|e| format!("send after: {e}"))?;
        Ok(())
    });
    let after = me
        .recv_timeout(RECV_TIMEOUT)
        .unwrap_or_else(|e| panic!("the successor's message: {e} ({})", page.read_report(1)));
    expect_success(successor, &page, 1, Duration::from_secs(10));
    assert_eq!((after.sender, &after.payload[..]), (1, &b"after"[..]));
    assert_nothing_more(&mut me);
    assert_eq!(me.discarded_fragments(), 0);
    assert_eq!(me.poisoned_lanes().count(), 0);
}

#[test]
fn a_sender_killed_at_a_random_point_of_its_batches_delivers_whole_batches_in_order() {
    let _serial = serial();
    let dog = Watchdog::new("killed_in_batches", Duration::from_secs(60));
    const ROUNDS: u64 = 15;
    const FLUSHED: usize = 0;
    const RECEIVED: usize = 1;
    let mut rng = Rng::spread(0xBA7C);
    let mut cut_mid_batch = 0;
    for round in 0..ROUNDS {
        let page = SharedPage::new();
        let segment = Segment::create(&Config::new(2)).expect("create");
        let victim = spawn(&dog, &page, 0, || {
            let mut me = segment.endpoint(1).map_err(|e| format!("slot 1: {e}"))?;
            let mut buf = [0u8; 64];
            let mut seq = 0;
            for b in 0.. {
                let mut batch = me.batch(0).map_err(|e| format!("batch: {e}"))?;
                for _ in 0..batch_size(b) {
                    let len = numbered(&mut buf, seq, 3);
                    batch.push(&buf[..len]).map_err(|e| format!("push {seq}: {e}"))?;
                    seq += 1;
                    // Dawdle, so that most kills land mid-batch.
                    let pushed = Instant::now();
                    while pushed.elapsed() < Duration::from_micros(50) {
                        std::hint::spin_loop();
                    }
                }
                batch.flush();
                page.counter(FLUSHED).store(seq, Release);
                // Lock step, so that no push ever finds the lane full
                // (which would publish part of a batch).
                while page.counter(RECEIVED).load(Acquire) < seq {
                    std::hint::spin_loop();
                }
            }
            Ok(())
        });
        let mut me = segment.endpoint(0).expect("slot 0");
        let mut n = 0;
        let run_for = Duration::from_micros(rng.below(20_001) as u64);
        let start = Instant::now();
        while start.elapsed() < run_for {
            n = drain_numbered(&mut me, n, 3).unwrap_or_else(|e| panic!("round {round}: {e}"));
            page.counter(RECEIVED).store(n, Release);
        }
        victim.kill().expect("kill");
        let status = victim.wait_timeout(Duration::from_secs(10)).expect("waitpid");
        assert_eq!(
            status,
            Some(ExitStatus::Signal(libc::SIGKILL)),
            "round {round}: {}",
            page.read_report(0)
        );
        let flushed = page.counter(FLUSHED).load(Acquire);
        n = drain_numbered(&mut me, n, 3).unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_nothing_more(&mut me);
        // Whole batches only: `n` is a batch boundary, the last flush the
        // victim recorded or (killed between its flush and the record)
        // the next one.
        let (mut boundary, mut b) = (0, 0);
        while boundary < flushed {
            boundary += batch_size(b);
            b += 1;
        }
        assert_eq!(boundary, flushed, "round {round}: the victim records batch ends");
        let next = flushed + batch_size(b);
        assert!(
            n == flushed || n == next,
            "round {round}: {n} messages delivered; batches end at {flushed} and {next}"
        );
        cut_mid_batch += u64::from(n == flushed);
    }
    eprintln!("{ROUNDS} rounds: killed before its batch was flushed in {cut_mid_batch}");
}
