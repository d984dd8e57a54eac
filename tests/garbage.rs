//! What a buggy (or hostile) peer can do to a segment: garbage in a lane, in
//! a whole segment image, in a header. The crate promises that nothing
//! another process writes makes it panic or read outside the segment: bad
//! data poisons one lane and is reported, and a bad image is refused with a
//! typed error.
//!
//! The "buggy peer" here is a second `MAP_SHARED` mapping of the segment's
//! memfd, written with atomics and volatile stores ([`Scribbler`]).
//! Pseudo-random bytes come from a seeded xorshift ([`Rng`]), so every run
//! writes the same garbage.
//!
//! The lane logic and the helpers come from the fuzz crate's library
//! (`fuzz/src/lib.rs`, included below as [`fuzz_logic`]): `fuzz/` runs
//! [`scribble_lane`] under libFuzzer, and these tests run the same function;
//! the `regression_*` tests pin the bugs it found in `src/`. The fuzz
//! library's own unit tests run here too, as `fuzz_logic::tests::*`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use shmcluster::raw::{
    AttachError, Config, ConfigError, Layout, RecvError, Segment, TryRecvError, ABI_VERSION,
};
use shmcluster::testing::{fork, ExitStatus, Watchdog};

mod common;
use common::Rng;

// Only part of the fuzz library is used here (not `attach_image`, say).
#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod fuzz_logic;
use fuzz_logic::lane_mode::SMALL_INDICES;
use fuzz_logic::{memfd_with, scribble_lane, Scribbler, CTL_HEAD, CTL_SIZE, CTL_TAIL, SEALS};

// ------------------------------------------------------------ helpers

/// `pread` of the first `len` bytes of a segment, through its fd.
fn pread(segment: &Segment, len: usize) -> Vec<u8> {
    let file = File::from(segment.try_clone_fd().expect("dup"));
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, 0).expect("pread");
    buf
}

// ---------------------------------------------------------------- a.

const N0: u64 = 300;
const N1: u64 = 6000;

/// Shared counters the receiving child fills in (a page of a memfd mapped
/// by both processes), indices into it.
const R_FROM_0: usize = 0;
const R_FROM_1: usize = 8;
const R_CORRUPT: usize = 16;
const R_FAILED_AT: usize = 24;

/// Numbered message `seq` from `sender`: the number, the sender, then
/// `seq % 61` filler bytes derived from both.
fn numbered(sender: u32, seq: u64) -> Vec<u8> {
    let mut m = seq.to_le_bytes().to_vec();
    m.push(sender as u8);
    m.extend((0..seq % 61).map(|i| (seq as u8) ^ (i as u8) ^ (sender as u8)));
    m
}

/// The receiving child (slot 2): returns its exit code, 0 when every
/// promise held.
fn receive_everything(segment: &Segment, report: &Scribbler) -> i32 {
    let Ok(mut me) = segment.endpoint(2) else {
        return 10;
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut next = [0u64; 2];
    let mut corrupt = 0u64;
    while next[1] < N1 || corrupt == 0 {
        if Instant::now() > deadline {
            return 11;
        }
        match me.recv_timeout(Duration::from_millis(100)) {
            Ok(msg) => {
                let s = msg.sender as usize;
                if s > 1 || (s == 0 && corrupt > 0) {
                    report.store64(R_FAILED_AT, next[0] << 32 | next[1]);
                    return 12; // from a slot that sent nothing, or a poisoned lane
                }
                if msg.payload != numbered(msg.sender, next[s]) {
                    report.store64(R_FAILED_AT, next[0] << 32 | next[1]);
                    return 13; // lost, duplicated, reordered or changed
                }
                next[s] += 1;
                report.store64(if s == 0 { R_FROM_0 } else { R_FROM_1 }, next[s]);
            }
            Err(RecvError::Timeout) => {}
            Err(RecvError::Corrupt { sender: 0, .. }) => {
                corrupt += 1;
                report.store64(R_CORRUPT, corrupt);
            }
            Err(RecvError::Corrupt { .. }) => return 14,
        }
    }
    // Nothing more: every message arrived exactly once.
    if !matches!(
        me.recv_timeout(Duration::from_millis(100)),
        Err(RecvError::Timeout)
    ) {
        return 15;
    }
    if me.poisoned_lanes().map(|(s, _)| s).collect::<Vec<_>>() != [0] {
        return 16;
    }
    0
}

#[test]
fn scribbled_lane_is_reported_and_others_keep_working() {
    let dog = Watchdog::new(
        "scribbled_lane_is_reported_and_others_keep_working",
        Duration::from_secs(30),
    );
    let segment = Segment::create(&Config::new(3).lane_capacity(4096)).expect("create");
    let layout = *segment.layout();
    let cap = layout.lane_capacity();
    let report_fd = memfd_with(&[], 4096, 0);
    let report = Scribbler::new(std::os::fd::AsFd::as_fd(&report_fd), 4096);

    // The receiver runs in its own process, as a worker would.
    // SAFETY: the child only receives on its own endpoint and writes the
    // report page: it allocates (glibc's malloc is fork-safe), prints
    // nothing and takes no lock another thread holds.
    let child = dog.track(unsafe { fork(|| receive_everything(&segment, &report)) }.expect("fork"));

    let (started_tx, started) = mpsc::channel();
    let (scribbled, scribbled_rx) = mpsc::channel::<()>();
    let seg = segment.clone();
    let sender0 = std::thread::spawn(move || {
        let mut me = seg.endpoint(0).expect("slot 0");
        for seq in 0..N0 {
            me.send_deadline(2, numbered(0, seq), Instant::now() + Duration::from_secs(10))
                .expect("send from 0 before the scribble");
        }
    });
    let seg = segment.clone();
    let sender1 = std::thread::spawn(move || {
        let mut me = seg.endpoint(1).expect("slot 1");
        for seq in 0..N1 {
            if seq == N1 / 3 {
                started_tx.send(()).unwrap();
            }
            if seq == 2 * N1 / 3 {
                // The last third only after the scribble, so the receiver is
                // still busy with slot 1 when it finds lane 0 corrupt.
                scribbled_rx.recv().unwrap();
            }
            me.send_deadline(2, numbered(1, seq), Instant::now() + Duration::from_secs(10))
                .expect("send from 1");
        }
    });

    // Slot 0 is done; wait until the receiver has taken every message from
    // lane 0 → 2 (head == tail), then scribble over it while slot 1 sends.
    sender0.join().expect("sender 0");
    started.recv().expect("slot 1 started");
    let scribbler = Scribbler::new(segment.fd(), layout.size());
    let ctl = layout.lane_ctl(0, 2);
    let quiet = Instant::now() + Duration::from_secs(10);
    while scribbler.load64(ctl + CTL_HEAD) != scribbler.load64(ctl + CTL_TAIL) {
        assert!(Instant::now() < quiet, "the receiver did not drain lane 0 → 2");
        std::thread::sleep(Duration::from_millis(1));
    }
    let position = scribbler.load64(ctl + CTL_TAIL);
    let mut rng = Rng::new(0x5EED_06A2_BA6E);
    for word in (0..CTL_SIZE).step_by(8) {
        scribbler.store64(ctl + word, rng.next());
    }
    let garbage_tail = scribbler.load64(ctl + CTL_TAIL);
    assert!(
        !garbage_tail.is_multiple_of(8) || garbage_tail.wrapping_sub(position) > cap as u64,
        "pick another seed: tail {garbage_tail} looks valid after {position}"
    );
    scribbler.write_ring(layout.lane_data(0, 2), cap, 0, &rng.bytes(cap));
    // A writer that publishes also rings the receiver's doorbell; without it
    // a receiver that found lane 0 empty would never look at it again.
    scribbler.or64(layout.doorbell_offset(2), 1 << 0);
    scribbled.send(()).unwrap();
    sender1.join().expect("sender 1");

    let status = child.wait_timeout(Duration::from_secs(25)).expect("waitpid");
    let counters = (
        report.load64(R_FROM_0),
        report.load64(R_FROM_1),
        report.load64(R_CORRUPT),
        report.load64(R_FAILED_AT),
    );
    assert_eq!(
        status,
        Some(ExitStatus::Code(0)),
        "receiver failed (10 no endpoint, 11 timed out, 12 message from a poisoned or silent lane, \
         13 lost/reordered/changed message, 14 wrong sender blamed, 15 extra message, \
         16 poisoned_lanes() wrong, 101 panicked); (from 0, from 1, corrupt reports, failed at) = {counters:?}"
    );
    assert_eq!(counters.0, N0, "every message slot 0 sent before the scribble");
    assert_eq!(counters.1, N1, "every message from slot 1, in order");
    assert!(counters.2 >= 1, "lane 0 → 2 reported corrupt");
    drop(dog);
}

// ---------------------------------------------------------------- b.

#[test]
fn random_bytes_over_lane_never_panic() {
    let mut rng = Rng::new(0xB0B0_CAFE);
    let (mut received, mut corrupt) = (0, 0);
    for i in 0..2000 {
        // Short inputs leave the ring (or everything) intact; long ones
        // fill the whole ring.
        let len = match rng.below(4) {
            0 => rng.below(24),
            1 => rng.below(128),
            2 => 24 + rng.below(600),
            _ => 40 + 4096 + rng.below(40),
        };
        let mut data = rng.bytes(len);
        if let Some(mode) = data.first_mut() {
            if rng.below(2) == 0 {
                *mode |= SMALL_INDICES; // likely-looking indices, half the time
            }
        }
        let outcome = std::panic::catch_unwind(|| scribble_lane(&data));
        match outcome {
            Ok(out) => {
                received += out.received;
                corrupt += usize::from(out.corrupt);
            }
            Err(_) => panic!(
                "iteration {i} panicked on a {}-byte input starting {:02x?}",
                data.len(),
                &data[..data.len().min(48)]
            ),
        }
    }
    // The inputs reach both outcomes.
    assert!(received > 100, "only {received} messages received");
    assert!(corrupt > 100, "only {corrupt} lanes reported corrupt");
}

// ---------------------------------------------------------------- c.

/// Byte offsets of the header fields (`#[repr(C)]` in src/segment/schema/header.rs),
/// checked against a real segment in `header_offsets_match`.
const H_MAGIC: usize = 0;
const H_ABI: usize = 8;
const H_INIT: usize = 12;
const H_HASH: usize = 16;
const H_MUTEX: usize = 24;
const H_WORKERS: usize = 28;
const H_LANE_CAPACITY: usize = 32;
const H_MAX_MESSAGE: usize = 40;
const H_LOCK_SLOTS: usize = 48;
const H_BELL_WORDS: usize = 52;
const H_SLOT_STRIDE: usize = 56;
const H_SLOTS: usize = 64;
const H_LANE_CTL: usize = 72;
const H_LANE_DATA: usize = 80;
const H_LOCKS: usize = 88;
const H_WORKERS_TABLE: usize = 96;
const H_STATS: usize = 104;
const H_SIZE: usize = 112;
const H_CONTROL: usize = 120;
/// Bytes of the header that are checked; the rest of the page is reserved.
const H_END: usize = 128;
const PAGE: usize = 4096;

fn get64(page: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(page[at..at + 8].try_into().unwrap())
}

fn get32(page: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(page[at..at + 4].try_into().unwrap())
}

fn put64(page: &mut [u8], at: usize, v: u64) {
    page[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn put32(page: &mut [u8], at: usize, v: u32) {
    page[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Attaches to a sealed memfd holding `page`, zero-filled up to `len`.
fn attach_page(page: &[u8], len: u64) -> Result<Segment, AttachError> {
    Segment::attach(memfd_with(page, len, SEALS))
}

fn real_header(config: &Config) -> (Layout, Vec<u8>) {
    let segment = Segment::create(config).expect("create");
    (*segment.layout(), pread(&segment, PAGE))
}

#[test]
fn header_offsets_match() {
    let (layout, page) = real_header(&Config::new(3).lane_capacity(8192).max_message(1000).lock_slots(5));
    assert_eq!(&page[H_MAGIC..H_MAGIC + 8], b"SHMCLSTR");
    assert_eq!(get32(&page, H_ABI), ABI_VERSION);
    assert_ne!(get32(&page, H_INIT), 0);
    assert_eq!(get64(&page, H_HASH), layout.hash());
    assert_eq!(get32(&page, H_WORKERS), 3);
    assert_eq!(get64(&page, H_LANE_CAPACITY), 8192);
    assert_eq!(get64(&page, H_MAX_MESSAGE), 1000);
    assert_eq!(get32(&page, H_LOCK_SLOTS), 5);
    assert_eq!(get32(&page, H_BELL_WORDS), 1);
    assert_eq!(get64(&page, H_SLOTS), layout.slot_offset(0) as u64);
    assert_eq!(
        get64(&page, H_SLOT_STRIDE),
        (layout.slot_offset(1) - layout.slot_offset(0)) as u64
    );
    assert_eq!(get64(&page, H_LANE_CTL), layout.lane_ctl(0, 0) as u64);
    assert_eq!(get64(&page, H_LANE_DATA), layout.lane_data(0, 0) as u64);
    assert_eq!(get64(&page, H_SIZE), layout.size() as u64);
    let (locks, table, stats) = (
        get64(&page, H_LOCKS),
        get64(&page, H_WORKERS_TABLE),
        get64(&page, H_STATS),
    );
    assert!(
        get64(&page, H_LANE_DATA) < locks && locks < table && table < stats && stats < layout.size() as u64
    );
    assert!(
        page[H_END..].iter().all(|&b| b == 0),
        "the header ends at byte {H_END}"
    );
}

#[test]
fn attach_rejects_garbage_images() {
    let config = Config::new(3).lane_capacity(8192);
    let (layout, good) = real_header(&config);
    let size = layout.size() as u64;
    let min = PAGE as u64;

    // The unmodified header page (lanes all zero) attaches.
    let again = attach_page(&good, size).expect("a real header attaches");
    assert_eq!(again.layout(), &layout);
    drop(again);

    // Too small, sealed or not.
    for len in [0u64, 1, 100, min - 1] {
        let image = vec![0xAB; len as usize];
        match attach_page(&image, len) {
            Err(AttachError::TooSmall { len: l, min: m }) => assert_eq!((l, m), (len, min)),
            other => panic!("{len} bytes: {other:?}"),
        }
    }

    // Not sealed, or sealed against shrinking only.
    for seals in [0, libc::F_SEAL_SHRINK, libc::F_SEAL_GROW, libc::F_SEAL_SEAL] {
        match Segment::attach(memfd_with(&good, size, seals)) {
            Err(AttachError::NotSealed) => {}
            other => panic!("seals {seals:#x}: {other:?}"),
        }
    }
    // Sealed against resizing but not against more seals: fine.
    Segment::attach(memfd_with(&good, size, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW))
        .expect("shrink and grow seals suffice");

    // Not an fd at all.
    // SAFETY: -1 is not a descriptor, so nothing else owns it; attach_raw_fd
    // checks it with F_GETFD before adopting it.
    let not_an_fd = unsafe { Segment::attach_raw_fd(-1) };
    assert!(matches!(not_an_fd, Err(AttachError::Io(_))));

    // Wrong magic.
    let mut page = good.clone();
    put64(&mut page, H_MAGIC, 0x1234_5678);
    assert!(matches!(
        attach_page(&page, size),
        Err(AttachError::BadMagic { found: 0x1234_5678 })
    ));

    // The creator never finished.
    let mut page = good.clone();
    put32(&mut page, H_INIT, 0);
    assert!(matches!(
        attach_page(&page, size),
        Err(AttachError::NotInitialized { found: 0 })
    ));

    let mut page = good.clone();
    put32(&mut page, H_ABI, ABI_VERSION + 1);
    match attach_page(&page, size) {
        Err(AttachError::AbiVersion { found, expected }) => {
            assert_eq!((found, expected), (ABI_VERSION + 1, ABI_VERSION))
        }
        other => panic!("{other:?}"),
    }

    let mut page = good.clone();
    put32(&mut page, H_MUTEX, 1);
    assert!(matches!(
        attach_page(&page, size),
        Err(AttachError::MutexSize { found: 1, .. })
    ));

    // Configuration fields out of range.
    let invalid: [(usize, u64, &str); 8] = [
        (H_WORKERS, 0, "workers"),
        (H_WORKERS, 5000, "workers"),
        (H_LANE_CAPACITY, 5000, "lane_capacity"),
        (H_LANE_CAPACITY, 2048, "lane_capacity"),
        (H_LANE_CAPACITY, 1 << 40, "lane_capacity"),
        (H_MAX_MESSAGE, 0, "max_message"),
        (H_MAX_MESSAGE, (1 << 30) + 1, "max_message"),
        (H_LOCK_SLOTS, 1 << 20, "lock_slots"),
    ];
    for (at, value, name) in invalid {
        let mut page = good.clone();
        if at == H_WORKERS || at == H_LOCK_SLOTS {
            put32(&mut page, at, value as u32);
        } else {
            put64(&mut page, at, value);
        }
        match attach_page(&page, size) {
            Err(AttachError::InvalidField { field, .. }) => assert_eq!(field, name, "{name} = {value}"),
            other => panic!("{name} = {value}: {other:?}"),
        }
    }
    // Each field valid alone, but the segment would not fit in memory.
    let mut page = good.clone();
    put32(&mut page, H_WORKERS, 1024);
    put64(&mut page, H_LANE_CAPACITY, 1 << 30);
    assert!(matches!(
        attach_page(&page, size),
        Err(AttachError::InvalidField {
            field: "size",
            error: ConfigError::TooLarge
        })
    ));

    // A valid configuration that is not the one the rest was laid out for.
    let mut page = good.clone();
    put32(&mut page, H_WORKERS, 4);
    assert!(matches!(
        attach_page(&page, size),
        Err(AttachError::FieldMismatch { .. })
    ));

    // Each derived field, changed alone.
    let derived: [(usize, &str); 11] = [
        (H_BELL_WORDS, "bell_words"),
        (H_SLOT_STRIDE, "slot_stride"),
        (H_SLOTS, "slots_offset"),
        (H_LANE_CTL, "lane_ctl_offset"),
        (H_LANE_DATA, "lane_data_offset"),
        (H_LOCKS, "locks_offset"),
        (H_WORKERS_TABLE, "workers_offset"),
        (H_STATS, "stats_offset"),
        (H_SIZE, "size"),
        (H_CONTROL, "control_offset"),
        (H_HASH, "layout_hash"),
    ];
    for (at, name) in derived {
        let mut page = good.clone();
        let (found, expected) = if at == H_BELL_WORDS {
            let v = get32(&page, at);
            put32(&mut page, at, v + 1);
            (u64::from(v) + 1, u64::from(v))
        } else {
            let v = get64(&page, at);
            put64(&mut page, at, v ^ 4096);
            (v ^ 4096, v)
        };
        match attach_page(&page, size) {
            Err(AttachError::FieldMismatch {
                field,
                found: f,
                expected: e,
            }) => assert_eq!((field, f, e), (name, found, expected)),
            other => panic!("{name}: {other:?}"),
        }
    }

    // A valid header on a file shorter than its layout.
    for len in [min, min + 1, size - 1] {
        match attach_page(&good, len) {
            Err(AttachError::Truncated { len: l, expected }) => assert_eq!((l, expected), (len, size)),
            other => panic!("{len} of {size} bytes: {other:?}"),
        }
    }

    // Every byte of the header matters; the rest of the page is reserved.
    let mut rng = Rng::new(0xA77AC4);
    for _ in 0..400 {
        let mut page = good.clone();
        let at = rng.below(PAGE);
        let flip = 1 + rng.below(255) as u8;
        page[at] ^= flip;
        let result = attach_page(&page, size);
        if at < H_END {
            let err = result.expect_err("a changed header byte is refused");
            let _ = err.to_string();
            if at < 8 {
                assert!(matches!(err, AttachError::BadMagic { .. }), "byte {at}: {err:?}");
            }
        } else {
            result.unwrap_or_else(|e| panic!("byte {at} is not part of the header: {e:?}"));
        }
    }

    // Random images: never a segment, never a panic.
    for i in 0..200 {
        let len = match i % 3 {
            0 => rng.below(PAGE),
            1 => PAGE + rng.below(4 * PAGE),
            _ => size as usize,
        };
        let mut image = rng.bytes(len);
        if i % 4 == 0 && len >= 16 {
            // Right magic and init word, garbage after.
            image[..16].copy_from_slice(&good[..16]);
        }
        match attach_page(&image, len as u64) {
            Err(AttachError::TooSmall { .. }) => assert!(len < PAGE),
            Err(AttachError::BadMagic { found }) => assert_eq!(found, get64(&image, 0)),
            Err(e) => {
                assert!(len >= 16 && image[..16] == good[..16], "{e:?}");
                let _ = e.to_string();
            }
            Ok(_) => panic!("random image {i} of {len} bytes attached"),
        }
    }
}

// ------------------------------------------- regressions found by fuzzing

/// Found by fuzzing (fixed): a sender whose endpoint opens on a lane whose head word is ahead
/// of its tail word (written by a buggy peer, or left by one) trusts them:
/// `Producer::free` overflows (debug builds panic "attempt to subtract with
/// overflow" in src/lane/producer.rs). A tail word near 2^64 overflows
/// `need_for_message`/`commit` the same way, and an unaligned tail makes it
/// write a `RecordHeader` at an unaligned address.
#[test]
fn regression_1_sender_opened_on_garbage_indices() {
    let segment = Segment::create(&Config::new(2)).unwrap();
    let layout = *segment.layout();
    let scribbler = Scribbler::new(segment.fd(), layout.size());
    scribbler.store64(layout.lane_ctl(0, 1) + CTL_HEAD, 4096);
    let mut tx = segment.endpoint(0).unwrap();
    let result = tx.try_send(1, b"x");
    assert!(
        matches!(
            result,
            Err(shmcluster::raw::TrySendError::Corrupt { slot: 1, .. })
        ),
        "{result:?}"
    );
}

/// Found by fuzzing (fixed): a receiver whose endpoint opens on a lane head within a lane of
/// 2^64 (the tail wrapped past zero) overflows `head += bytes` in
/// `Consumer::advance` (debug builds panic).
#[test]
fn regression_2_receiver_head_near_the_end_of_u64() {
    let segment = Segment::create(&Config::new(2).lane_capacity(4096)).unwrap();
    let layout = *segment.layout();
    let scribbler = Scribbler::new(segment.fd(), layout.size());
    scribbler.store64(layout.lane_ctl(0, 1) + CTL_HEAD, u64::MAX - 7);
    scribbler.store64(layout.lane_ctl(0, 1) + CTL_TAIL, 24);
    let mut rx = segment.endpoint(1).unwrap();
    let _ = rx.try_recv(); // any result but a panic
}

/// Found by fuzzing (fixed): a doorbell bit for a sender slot the segment does not have makes
/// `try_recv` index `inbound` out of bounds (panics in release builds too).
#[test]
fn regression_3_doorbell_bit_of_a_missing_sender() {
    let segment = Segment::create(&Config::new(3)).unwrap();
    let layout = *segment.layout();
    let scribbler = Scribbler::new(segment.fd(), layout.size());
    let mut rx = segment.endpoint(2).unwrap();
    assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    scribbler.or64(layout.doorbell_offset(2), 1 << 40);
    assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
}

/// Found by `fuzz/` (fixed in 5ba0aa1): an empty message whose record lands
/// in the ring's last 32 bytes has its payload pointer one past the ring.
#[test]
fn empty_message_at_the_end_of_the_ring() {
    let segment = Segment::create(&Config::new(2).lane_capacity(4096)).unwrap();
    let mut a = segment.endpoint(0).unwrap();
    let mut b = segment.endpoint(1).unwrap();
    // 2 × (32 + 1920) + (32 + 128) = 4064: the next record starts 32
    // bytes before the end of the ring (each received before the next is
    // sent, so that its terminator, at the start of the ring, has room).
    for len in [1920, 1920, 128] {
        a.send(1, vec![0u8; len]).unwrap();
        assert_eq!(b.recv().unwrap().payload.len(), len);
    }
    let layout = *segment.layout();
    let scribbler = Scribbler::new(segment.fd(), layout.size());
    assert_eq!(scribbler.load64(layout.lane_ctl(0, 1) + CTL_TAIL), 4064);
    a.send(1, []).unwrap();
    assert_eq!(b.recv().unwrap().payload, b"");
    a.send(1, []).unwrap();
    assert_eq!(b.recv().unwrap().payload, b"");
}
