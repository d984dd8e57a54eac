//! The lane logic over heap memory, so Miri can check every pointer
//! (`cargo +nightly miri test --lib lane::`).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use super::*;
use crate::segment::schema::{Padded, SenderWords};

const CAP: usize = 4096;

/// A lane in heap memory instead of a segment.
struct HeapLane {
    ctl: NonNull<LaneControl>,
    data: NonNull<u8>,
    cap: usize,
}

impl HeapLane {
    fn new() -> Self {
        Self::with_capacity(CAP)
    }

    fn with_capacity(cap: usize) -> Self {
        let ctl = Box::new(LaneControl {
            head: Padded(AtomicU64::new(0)),
            tail: Padded(AtomicU64::new(0)),
            sender: Padded(SenderWords {
                space_waiter: AtomicU32::new(0),
                streaming: AtomicU32::new(0),
            }),
        });
        let data = vec![0u64; cap / 8].into_boxed_slice();
        Self {
            ctl: NonNull::from(Box::leak(ctl)),
            data: NonNull::new(Box::leak(data).as_mut_ptr().cast::<u8>()).unwrap(),
            cap,
        }
    }

    fn lane(&self, sender: u32) -> LaneRef {
        // SAFETY: both allocations live until `drop`, are aligned (Box of
        // a 128-aligned struct; u64 slice) and `cap` bytes long.
        unsafe { LaneRef::new(self.ctl, self.data, self.cap, sender) }
    }

    fn ctl(&self) -> &LaneControl {
        // SAFETY: live allocation, only atomics.
        unsafe { self.ctl.as_ref() }
    }

    /// Overwrites ring bytes, as a buggy process would.
    fn scribble(&self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.cap);
        // SAFETY: in bounds of the CAP-byte ring; single-threaded here.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.data.as_ptr().add(offset), bytes.len()) }
    }
}

impl Drop for HeapLane {
    fn drop(&mut self) {
        // SAFETY: both were leaked from boxes of exactly these types in
        // `new`, and no LaneRef outlives the HeapLane in these tests.
        unsafe {
            drop(Box::from_raw(self.ctl.as_ptr()));
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.data.as_ptr().cast::<u64>(),
                self.cap / 8,
            )));
        }
    }
}

fn send(p: &mut Producer, payload: &[u8]) -> bool {
    match p.plan(payload.len(), 0).unwrap() {
        Some(planned) => {
            let hdr = RecordHeader {
                correlation: payload.len() as u64,
                ..p.header(7, payload.len(), flags::SINGLE)
            };
            p.write(planned, hdr, payload);
            p.publish();
            true
        }
        None => false,
    }
}

/// Sends a message of any size as fragments, draining `c` whenever the
/// lane is full, and returns what `c` produced meanwhile.
fn send_fragmented(p: &mut Producer, c: &mut Consumer, msg: &[u8]) -> Vec<Vec<u8>> {
    let piece = max_record_payload(CAP);
    let mut got = Vec::new();
    let mut sent = 0;
    loop {
        let chunk = (msg.len() - sent).min(piece);
        let (first, last) = (sent == 0, sent + chunk == msg.len());
        let flags = match (first, last) {
            (true, true) => flags::SINGLE,
            (true, false) => flags::FIRST,
            (false, true) => flags::LAST,
            (false, false) => flags::MIDDLE,
        };
        loop {
            if let Some(planned) = p.plan(chunk, if last { 0 } else { 64 }).unwrap() {
                let mut hdr = p.header(1, chunk, flags);
                if first {
                    hdr.total = msg.len() as u64;
                }
                p.write(planned, hdr, &msg[sent..sent + chunk]);
                p.publish();
                break;
            }
            got.extend(drain(c));
        }
        sent += chunk;
        if last {
            return got;
        }
    }
}

fn drain(c: &mut Consumer) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(next) = c.next().unwrap() {
        out.push(take(c, next));
    }
    out
}

fn take(c: &mut Consumer, next: Next) -> Vec<u8> {
    match next {
        Next::InLane { hdr, offset, record } => {
            let mut v = Vec::with_capacity(hdr.len as usize);
            c.copy_out(offset, hdr.len as usize, &mut v);
            c.consume(record);
            v
        }
        Next::Assembled { payload, .. } => payload,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn sizes_and_limits() {
    assert_eq!(record_size(0), 32);
    assert_eq!(record_size(1), 40);
    assert_eq!(record_size(8), 40);
    assert_eq!(record_size(9), 48);
    assert_eq!(max_record_payload(4096), 1920);
    // A maximal record, its worst padding, its terminator and the room
    // kept for an abort (and its padding) fit an empty lane.
    let rec = record_size(max_record_payload(CAP));
    assert!(rec - 8 + rec + RECORD_HEADER + 2 * RECORD_HEADER <= CAP);
}

#[test]
fn fifo_across_many_wraps_with_every_size() {
    let lane = HeapLane::new();
    let mut p = Producer::new(lane.lane(3));
    let mut c = Consumer::new(lane.lane(3), 1 << 20);
    let mut expected = std::collections::VecDeque::new();
    let mut received = 0;
    let rounds = if cfg!(miri) { 300 } else { 5000 };
    for i in 0..rounds {
        let len = (i * 37) % 700;
        let msg = pattern(len, i as u8);
        while !send(&mut p, &msg) {
            let got = drain(&mut c);
            assert!(!got.is_empty(), "full lane but nothing to drain");
            for g in got {
                assert_eq!(g, expected.pop_front().unwrap());
                received += 1;
            }
        }
        expected.push_back(msg);
    }
    for g in drain(&mut c) {
        assert_eq!(g, expected.pop_front().unwrap());
        received += 1;
    }
    assert_eq!(received, rounds);
    assert!(
        lane.ctl().head.0.load(Relaxed) > 4 * CAP as u64,
        "wrapped several times"
    );
    assert_eq!(lane.ctl().head.0.load(Relaxed), lane.ctl().tail.0.load(Relaxed));
}

/// `ready` says "something here" whenever `next` has a message, and
/// "empty" once everything published was consumed (after `next` stepped
/// over the bytes skipped at the end of the ring), across wraps and with
/// every size.
#[test]
fn ready_agrees_with_next_across_wraps() {
    let lane = HeapLane::new();
    let mut p = Producer::new(lane.lane(3));
    let mut c = Consumer::new(lane.lane(3), 1 << 20);
    assert!(!c.ready(), "a new lane is empty");
    let rounds = if cfg!(miri) { 200 } else { 3000 };
    for i in 0..rounds {
        let msg = pattern((i * 37) % 700, i as u8);
        assert!(send(&mut p, &msg), "drained after every message: room");
        assert!(c.ready(), "message {i} published");
        let next = c.next().unwrap().expect("a message where ready said so");
        assert_eq!(take(&mut c, next), msg);
        if c.ready() {
            // A head in the bytes skipped at the end of the ring is a
            // "may": `next` steps over them and finds nothing.
            assert!(CAP - (c.head as usize % CAP) < RECORD_HEADER, "message {i}");
            assert!(c.next().unwrap().is_none());
        }
        assert!(!c.ready(), "everything consumed after message {i}");
    }
    assert!(lane.ctl().head.0.load(Relaxed) > 2 * CAP as u64, "wrapped");
}

/// An empty lane whose head and tail both stand at position `pos`.
fn empty_at(pos: u64) -> (HeapLane, Producer, Consumer) {
    let lane = HeapLane::new();
    lane.ctl().head.0.store(pos, Relaxed);
    lane.ctl().tail.0.store(pos, Relaxed);
    let p = Producer::new(lane.lane(0));
    let c = Consumer::new(lane.lane(0), 1 << 20);
    (lane, p, c)
}

#[test]
fn padding_record_and_implicit_skip_at_the_end() {
    // 16 bytes before the end: fewer than a header, so the next record
    // starts at 0 after an implicit skip.
    let (_lane, mut p, mut c) = empty_at(3 * CAP as u64 - 16);
    assert!(send(&mut p, b"wrapped"));
    assert_eq!(p.tail, 3 * CAP as u64 + record_size(7) as u64);
    assert_eq!(drain(&mut c), vec![b"wrapped".to_vec()]);
    // 200 bytes before the end and a 500-byte record: an explicit
    // padding record covers the 200.
    let (_lane, mut p, mut c) = empty_at(CAP as u64 - 200);
    assert!(send(&mut p, b"fits"));
    assert!(send(&mut p, &pattern(500, 3)));
    assert_eq!(p.tail, (CAP + record_size(500)) as u64);
    assert_eq!(drain(&mut c), vec![b"fits".to_vec(), pattern(500, 3)]);
    assert_eq!(c.head, p.tail);
}

#[test]
fn fragmented_messages_reassemble() {
    let lane = HeapLane::new();
    let mut p = Producer::new(lane.lane(0));
    let mut c = Consumer::new(lane.lane(0), 1 << 20);
    let sizes: &[usize] = if cfg!(miri) {
        &[1985, 5000]
    } else {
        &[1985, 4096, 10_000, 100_000]
    };
    for &len in sizes {
        let msg = pattern(len, len as u8);
        let mut got = send_fragmented(&mut p, &mut c, &msg);
        got.extend(drain(&mut c));
        assert_eq!(got, vec![msg]);
    }
    assert_eq!(c.discarded, 0);
}

/// A producer at position `pos` with exactly `free` bytes free.
fn producer_with_free(pos: u64, free: usize) -> (HeapLane, Producer) {
    let lane = HeapLane::new();
    lane.ctl().tail.0.store(pos, Relaxed);
    lane.ctl().head.0.store(pos - (CAP - free) as u64, Relaxed);
    let p = Producer::new(lane.lane(0));
    (lane, p)
}

/// Writes every piece as the endpoint's fragmented writer plans them
/// (64 bytes kept after each but the last); false as soon as one piece
/// would have to wait for room.
fn write_without_waiting(p: &mut Producer, len: usize) -> bool {
    let piece = max_record_payload(CAP);
    let mut left = len;
    loop {
        let chunk = left.min(piece);
        let last = chunk == left;
        match p.plan(chunk, if last { 0 } else { 64 }).unwrap() {
            Some(planned) => p.write(planned, p.header(1, chunk, flags::MIDDLE), &vec![0; chunk]),
            None => return false,
        }
        left -= chunk;
        if last {
            return true;
        }
    }
}

/// `need_for_message` is exactly the free space in which the fragmented
/// writer never waits (what `try_send` relies on to never block).
#[test]
fn need_for_message_is_exactly_the_room_the_writer_uses() {
    let piece = max_record_payload(CAP);
    // (Never in the last 31 bytes: a producer's tail skips them.)
    for start in [0u64, 8, 1000, 2032, 4000, 4056, 4064] {
        for len in [0, 1, 100, piece, piece + 1, piece + 40, 3000, 3900] {
            let pos = 4 * CAP as u64 + start;
            let (_lane, p) = producer_with_free(pos, CAP);
            let Some(need) = p.need_for_message(len, piece, 64) else {
                continue;
            };
            let (_lane, mut p) = producer_with_free(pos, need);
            assert!(
                write_without_waiting(&mut p, len),
                "len {len} at {start}: {need} is enough"
            );
            if need >= 8 {
                let (_lane, mut p) = producer_with_free(pos, need - 8);
                assert!(
                    !write_without_waiting(&mut p, len),
                    "len {len} at {start}: {need} is the least"
                );
            }
        }
    }
    let (_lane, p) = producer_with_free(0, CAP);
    assert_eq!(p.need_for_message(CAP, piece, 64), None);
}

#[test]
fn partial_message_of_a_dead_sender_is_discarded() {
    let lane = HeapLane::new();
    let mut p = Producer::new(lane.lane(0));
    let mut c = Consumer::new(lane.lane(0), 1 << 20);
    // Generation 1 publishes the first piece of a 5000-byte message and dies.
    let planned = p.plan(1000, 64).unwrap().unwrap();
    let hdr = RecordHeader {
        total: 5000,
        ..p.header(1, 1000, flags::FIRST)
    };
    p.write(planned, hdr, &pattern(1000, 0));
    p.publish();
    // Its successor (generation 2) takes the lane over at the published tail.
    let mut p2 = Producer::new(lane.lane(0));
    let planned = p2.plan(5, 0).unwrap().unwrap();
    p2.write(planned, p2.header(2, 5, flags::SINGLE), b"fresh");
    p2.publish();
    assert_eq!(drain(&mut c), vec![b"fresh".to_vec()]);
    assert_eq!(c.discarded, 1);
}

#[test]
fn abort_drops_the_partial_message() {
    let lane = HeapLane::new();
    let mut p = Producer::new(lane.lane(0));
    let mut c = Consumer::new(lane.lane(0), 1 << 20);
    let planned = p.plan(1000, 64).unwrap().unwrap();
    let hdr = RecordHeader {
        total: 3000,
        ..p.header(1, 1000, flags::FIRST)
    };
    p.write(planned, hdr, &pattern(1000, 0));
    let planned = p.plan(0, 0).unwrap().unwrap();
    p.commit(planned, p.header(1, 0, flags::ABORT));
    assert!(send(&mut p, b"next"));
    assert_eq!(drain(&mut c), vec![b"next".to_vec()]);
    assert_eq!(c.discarded, 1);
}

/// Each way a lane can hold garbage gives its own error, and no panic.
#[test]
fn corruption_is_detected() {
    let header_bytes = |h: RecordHeader| {
        let mut b = [0u8; RECORD_HEADER];
        // SAFETY: RecordHeader is 32 bytes of plain integers.
        unsafe { std::ptr::copy_nonoverlapping((&raw const h).cast::<u8>(), b.as_mut_ptr(), 32) };
        b
    };
    // Committed at position 0 unless said otherwise.
    let at0 = |flags: u16| committed(flags, 0);
    let cases: Vec<(RecordHeader, LaneCorruption)> = vec![
        (
            RecordHeader {
                len: 8,
                flags: at0(0x7),
                ..Default::default()
            },
            LaneCorruption::Flags { flags: at0(0x7) },
        ),
        (
            // Not committed, and not the terminator.
            RecordHeader {
                len: 8,
                flags: flags::SINGLE,
                ..Default::default()
            },
            LaneCorruption::Flags { flags: flags::SINGLE },
        ),
        (
            // Committed for another position.
            RecordHeader {
                len: 8,
                flags: committed(flags::SINGLE, 4096 + 8),
                ..Default::default()
            },
            LaneCorruption::Flags {
                flags: committed(flags::SINGLE, 4096 + 8),
            },
        ),
        (
            RecordHeader {
                len: 5000,
                flags: at0(flags::SINGLE),
                ..Default::default()
            },
            LaneCorruption::RecordLength { len: 5000 },
        ),
        (
            RecordHeader {
                len: 8,
                flags: at0(flags::SINGLE),
                sender: 9,
                ..Default::default()
            },
            LaneCorruption::Sender { found: 9 },
        ),
        (
            RecordHeader {
                len: 8,
                flags: at0(flags::FIRST),
                total: 1 << 40,
                ..Default::default()
            },
            LaneCorruption::Fragment { total: 1 << 40 },
        ),
        (
            RecordHeader {
                len: 8,
                flags: at0(FLAG_PAD),
                ..Default::default()
            },
            LaneCorruption::RecordLength { len: 8 },
        ),
    ];
    for (hdr, expected) in cases {
        let lane = HeapLane::new();
        lane.scribble(0, &header_bytes(hdr));
        let mut c = Consumer::new(lane.lane(0), 1 << 20);
        assert_eq!(c.next().unwrap_err(), expected);
    }
    // A chain of committed records round the ring (each padding to the
    // end, all stamped for where they lie in some lap) is followed for a
    // lane's worth per call, not for ever.
    // Positions a lap apart share their stamp bits once a lane holds a
    // multiple of 2^11 * 8 bytes: 16 KiB.
    let big = 1 << 14;
    let lane = HeapLane::with_capacity(big);
    let pad = RecordHeader {
        len: (big - RECORD_HEADER) as u32,
        flags: at0(FLAG_PAD),
        ..Default::default()
    };
    lane.scribble(0, &header_bytes(pad));
    let mut c = Consumer::new(lane.lane(0), 1 << 20);
    assert!(c.next().unwrap().is_none());
    assert_eq!(c.head, 2 * big as u64);
    // A producer whose head was overwritten refuses to write.
    let lane = HeapLane::new();
    let mut p = Producer::new(lane.lane(0));
    lane.ctl().head.0.store(12345, Relaxed);
    assert!(p.refresh_head().is_err());
}

/// A middle piece whose lengths overrun the announced total.
#[test]
fn fragment_overrun_is_detected() {
    let lane = HeapLane::new();
    let mut p = Producer::new(lane.lane(0));
    let mut c = Consumer::new(lane.lane(0), 1 << 20);
    let planned = p.plan(1000, 64).unwrap().unwrap();
    p.write(
        planned,
        RecordHeader {
            total: 1500,
            ..p.header(1, 1000, flags::FIRST)
        },
        &[0; 1000],
    );
    let planned = p.plan(1000, 0).unwrap().unwrap();
    p.write(planned, p.header(1, 1000, flags::LAST), &[0; 1000]);
    p.publish();
    assert_eq!(c.next().unwrap_err(), LaneCorruption::Fragment { total: 1500 });
}

/// Producer and consumer on two threads: FIFO, no loss, no duplicate.
#[test]
fn two_threads_fifo() {
    let lane = HeapLane::new();
    let count: u64 = if cfg!(miri) { 200 } else { 200_000 };
    let (pl, cl) = (lane.lane(0), lane.lane(0));
    struct SendLane(LaneRef);
    // SAFETY: the lane outlives both threads (joined by the scope) and
    // each side is used by one thread only.
    unsafe impl Send for SendLane {}
    let (pl, cl) = (SendLane(pl), SendLane(cl));
    std::thread::scope(|s| {
        s.spawn(move || {
            let pl = pl;
            let mut p = Producer::new(pl.0);
            for i in 0..count {
                let len = 8 + (i % 50) as usize;
                let mut msg = pattern(len, i as u8);
                msg[..8].copy_from_slice(&i.to_le_bytes());
                while !send(&mut p, &msg) {
                    std::thread::yield_now();
                }
            }
        });
        receive_in_order(Consumer::new(cl.0, 1 << 20), count, |i| 8 + (i % 50) as usize);
    });
}

/// The receiving thread of the two-thread tests: `count` messages, each
/// starting with its sequence number and `len(seq)` bytes long, in order,
/// then nothing.
fn receive_in_order(mut c: Consumer, count: u64, len: impl Fn(u64) -> usize) {
    let mut next = 0u64;
    while next < count {
        match c.next().unwrap() {
            Some(n) => {
                let got = take(&mut c, n);
                assert_eq!(u64::from_le_bytes(got[..8].try_into().unwrap()), next);
                assert_eq!(got.len(), len(next));
                next += 1;
            }
            None => std::thread::yield_now(),
        }
    }
    assert!(c.next().unwrap().is_none());
}

/// The fast path and batches on two threads: records written by
/// `try_write_single` (a terminator, then the commit word) and by the
/// general path, several committed with plain stores before one publish,
/// arrive once each and in order. Under Miri this checks that the plain
/// stores of a batch never race the consumer's loads.
#[test]
fn two_threads_batches_and_the_fast_path() {
    let lane = HeapLane::new();
    let count: u64 = if cfg!(miri) { 300 } else { 200_000 };
    let (pl, cl) = (lane.lane(0), lane.lane(0));
    struct SendLane(LaneRef);
    // SAFETY: as in `two_threads_fifo`.
    unsafe impl Send for SendLane {}
    let (pl, cl) = (SendLane(pl), SendLane(cl));
    std::thread::scope(|s| {
        s.spawn(move || {
            let pl = pl;
            let mut p = Producer::new(pl.0);
            let mut i = 0u64;
            while i < count {
                // Batches of 1 to 5 records, published once.
                let batch = 1 + i % 5;
                let mut written = 0;
                while written < batch && i < count {
                    let len = 8 + (i % 61) as usize;
                    let mut msg = pattern(len, i as u8);
                    msg[..8].copy_from_slice(&i.to_le_bytes());
                    let hdr = p.header(7, len, flags::SINGLE);
                    let sent = p.try_write_single(to_words(&hdr), &msg)
                        || match p.plan(len, 0).unwrap() {
                            Some(planned) => {
                                p.write(planned, hdr, &msg);
                                true
                            }
                            None => false,
                        };
                    if sent {
                        i += 1;
                        written += 1;
                    } else {
                        p.publish();
                        std::thread::yield_now();
                    }
                }
                p.publish();
            }
        });
        receive_in_order(Consumer::new(cl.0, 1 << 20), count, |i| 8 + (i % 61) as usize);
    });
}

/// A sender that died between committing records and storing the tail
/// left committed records past its tail (its receiver may have read them
/// already): its successor scans past them, and continues after the last.
#[test]
fn a_successor_scans_past_records_committed_after_the_tail() {
    let lane = HeapLane::new();
    let mut p = Producer::new(lane.lane(0));
    let mut c = Consumer::new(lane.lane(0), 1 << 20);
    assert!(send(&mut p, b"one"));
    let after_one = lane.ctl().tail.0.load(Relaxed);
    // Enough records to pad at the end of the ring and wrap.
    for i in 0..25u8 {
        assert!(send(&mut p, &pattern(90, i)));
    }
    let mut got = drain(&mut c);
    assert_eq!(got.len(), 26);
    for i in 0..3u8 {
        assert!(send(&mut p, &pattern(200, i)));
    }
    // As if the last tail stores never happened.
    lane.ctl().tail.0.store(after_one, Relaxed);
    let mut successor = Producer::new(lane.lane(0));
    assert_eq!(successor.tail, p.tail, "scanned to the last committed record");
    assert_eq!(lane.ctl().tail.0.load(Relaxed), p.tail, "and published it");
    assert!(send(&mut successor, b"after"));
    got = drain(&mut c);
    assert_eq!(
        got,
        vec![
            pattern(200, 0),
            pattern(200, 1),
            pattern(200, 2),
            b"after".to_vec()
        ]
    );
}

/// Records written and not published (a batch cut short by a kill) are
/// invisible, and the successor writes over them: the consumer finds its
/// records, not the old ones.
#[test]
fn records_never_published_stay_invisible_and_are_overwritten() {
    let lane = HeapLane::new();
    let mut p = Producer::new(lane.lane(0));
    let mut c = Consumer::new(lane.lane(0), 1 << 20);
    assert!(send(&mut p, b"published"));
    for i in 0..5u8 {
        let hdr = p.header(7, 40, flags::SINGLE);
        let planned = p.plan(40, 0).unwrap().unwrap();
        p.write(planned, hdr, &pattern(40, i));
    }
    assert_eq!(drain(&mut c), vec![b"published".to_vec()]);
    let mut successor = Producer::new(lane.lane(0));
    assert!(send(&mut successor, &pattern(72, 9)));
    assert!(send(&mut successor, b"next"));
    assert_eq!(drain(&mut c), vec![pattern(72, 9), b"next".to_vec()]);
}
