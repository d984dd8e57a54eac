//! The raw endpoint API in one process: several endpoints as threads on one
//! segment (the same code paths as separate processes), and every error a
//! caller can get.

use std::thread;
use std::time::{Duration, Instant};

use shmcluster::raw::{
    Config, EndpointError, RecvError, Segment, SendError, Tag, TryRecvError, TrySendError,
};
use shmcluster::testing::Watchdog;
use shmcluster::WaitStrategy;

fn segment(workers: u32) -> Segment {
    Segment::create(&Config::new(workers).lane_capacity(16 * 1024)).expect("create")
}

#[test]
fn threads_all_to_all_fifo_no_loss_no_duplicate() {
    let _dog = Watchdog::new("threads_all_to_all", Duration::from_secs(60));
    const WORKERS: u32 = 4;
    const PER_PAIR: u64 = 20_000;
    let seg = segment(WORKERS);
    let handles: Vec<_> = (0..WORKERS)
        .map(|slot| {
            let mut me = seg.endpoint(slot).expect("slot");
            thread::spawn(move || {
                // Single-threaded all-to-all: never block on a full lane
                // (the peer may be blocked on ours); drain instead.
                let mut next_from = vec![0u64; WORKERS as usize];
                let mut sent = vec![0u64; WORKERS as usize];
                let mut received = 0u64;
                let expected = PER_PAIR * u64::from(WORKERS - 1);
                while received < expected
                    || sent
                        .iter()
                        .enumerate()
                        .any(|(to, &n)| to as u32 != slot && n < PER_PAIR)
                {
                    for to in (0..WORKERS).filter(|&to| to != slot) {
                        let n = sent[to as usize];
                        if n < PER_PAIR && me.try_send(to, n.to_le_bytes()).is_ok() {
                            sent[to as usize] += 1;
                        }
                    }
                    while let Ok(msg) = me.try_recv() {
                        let seq = u64::from_le_bytes(msg.payload[..8].try_into().unwrap());
                        assert_eq!(seq, next_from[msg.sender as usize], "FIFO from {}", msg.sender);
                        next_from[msg.sender as usize] += 1;
                        received += 1;
                    }
                }
                assert_eq!(me.try_recv(), Err(TryRecvError::Empty));
                next_from
            })
        })
        .collect();
    for (slot, h) in handles.into_iter().enumerate() {
        let got = h.join().expect("worker thread");
        for (from, n) in got.into_iter().enumerate() {
            assert_eq!(n, if from == slot { 0 } else { PER_PAIR });
        }
    }
}

#[test]
fn slot_errors() {
    let seg = segment(2);
    assert_eq!(
        seg.endpoint(2).unwrap_err(),
        EndpointError::NoSuchWorker { slot: 2, workers: 2 }
    );
    let a = seg.endpoint(0).unwrap();
    assert!(matches!(
        seg.endpoint(0),
        Err(EndpointError::SlotBusy { slot: 0, .. })
    ));
    let gen = a.generation();
    drop(a);
    let a = seg.endpoint(0).expect("released on drop");
    assert_ne!(a.generation(), gen, "a new holder gets a new generation");
}

#[test]
fn send_errors_give_the_message_back() {
    let seg = Segment::create(&Config::new(2).lane_capacity(4096).max_message(10_000)).unwrap();
    let mut a = seg.endpoint(0).unwrap();
    assert_eq!(
        a.send(5, b"x"),
        Err(SendError::NoSuchWorker { slot: 5, workers: 2 })
    );
    assert_eq!(
        a.try_send(5, b"x"),
        Err(TrySendError::NoSuchWorker { slot: 5, workers: 2 })
    );
    let big = vec![0u8; 10_001];
    assert_eq!(
        a.send(1, &big[..]),
        Err(SendError::TooLarge {
            len: 10_001,
            max: 10_000
        })
    );
    // Nobody drains slot 1: the lane fills, then try_send says Full and
    // gives the message back; send with a deadline times out.
    let mut sent = 0;
    let rejected = loop {
        match a.try_send(1, vec![7u8; 100]) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
    };
    assert!(sent > 10);
    assert_eq!(rejected, TrySendError::Full(vec![7u8; 100]));
    let start = Instant::now();
    let timed_out = a.send_deadline(1, vec![8u8; 100], Instant::now() + Duration::from_millis(50));
    assert_eq!(timed_out, Err(SendError::Timeout(vec![8u8; 100])));
    assert!(start.elapsed() >= Duration::from_millis(50));
    // A message longer than the whole lane can never go through try_send.
    assert!(matches!(
        a.try_send(0, vec![1u8; 5000]),
        Err(TrySendError::Full(_))
    ));
    // Nothing was lost: every accepted message arrives, nothing else.
    let mut b = seg.endpoint(1).unwrap();
    for _ in 0..sent {
        assert_eq!(b.try_recv().unwrap().payload, vec![7u8; 100]);
    }
    assert_eq!(b.try_recv(), Err(TryRecvError::Empty));
}

#[test]
fn a_full_lane_to_oneself_is_an_error_not_a_hang() {
    let _dog = Watchdog::new("self_full", Duration::from_secs(20));
    let seg = Segment::create(&Config::new(1).lane_capacity(4096)).unwrap();
    let mut me = seg.endpoint(0).unwrap();
    let mut n = 0;
    let err = loop {
        match me.send(0, [n as u8; 200]) {
            Ok(()) => n += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(err, SendError::SelfFull([n as u8; 200]));
    for i in 0..n {
        assert_eq!(me.recv().unwrap().payload, [i as u8; 200]);
    }
    // A message larger than the lane, to oneself, cannot be streamed.
    assert!(matches!(
        me.send(0, vec![0u8; 10_000]),
        Err(SendError::SelfFull(_))
    ));
    assert_eq!(
        me.try_recv(),
        Err(TryRecvError::Empty),
        "nothing partial left behind"
    );
}

#[test]
fn recv_timeout_and_wait_strategies() {
    let _dog = Watchdog::new("recv_timeout", Duration::from_secs(20));
    let seg = segment(2);
    let mut b = seg.endpoint(1).unwrap();
    for wait in [
        WaitStrategy::Spin,
        WaitStrategy::SpinThenPark(Duration::from_micros(100)),
        WaitStrategy::Park,
    ] {
        b.set_wait_strategy(wait);
        let start = Instant::now();
        assert_eq!(b.recv_timeout(Duration::from_millis(30)), Err(RecvError::Timeout));
        assert!(start.elapsed() >= Duration::from_millis(30), "{wait:?}");
        // A message sent while it waits wakes it.
        let a_seg = seg.clone();
        let sender = thread::spawn(move || {
            let mut a = a_seg.endpoint(0).unwrap();
            thread::sleep(Duration::from_millis(20));
            a.send(1, b"wake up").unwrap();
        });
        let msg = b.recv_timeout(Duration::from_secs(10)).expect("woken");
        assert_eq!(msg.payload, b"wake up");
        sender.join().unwrap();
    }
}

#[test]
fn tags_and_lending_receive() {
    let seg = Segment::create(&Config::new(2).lane_capacity(4096)).unwrap();
    let mut a = seg.endpoint(0).unwrap();
    let mut b = seg.endpoint(1).unwrap();
    let tag = Tag {
        kind: 42,
        correlation: 0xDEAD_BEEF,
    };
    a.send_tagged(1, tag, b"small", None).unwrap();
    {
        let msg = b.try_recv_ref().unwrap();
        assert!(msg.is_in_lane(), "a one-record message is lent in place");
        assert_eq!((msg.sender(), msg.tag(), msg.payload()), (0, tag, &b"small"[..]));
        assert_eq!(msg.generation(), a.generation());
    }
    // A message larger than a record arrives reassembled (copied once).
    let big: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    let sender = {
        let seg = seg.clone();
        let big = big.clone();
        drop(a);
        thread::spawn(move || seg.endpoint(0).unwrap().send(1, big).unwrap())
    };
    let msg = b
        .recv_ref(Some(Instant::now() + Duration::from_secs(10)))
        .unwrap();
    assert!(!msg.is_in_lane());
    assert_eq!(msg.payload(), &big[..]);
    drop(msg);
    sender.join().unwrap();
}

#[test]
fn reserve_commit_writes_in_place() {
    let seg = Segment::create(&Config::new(2).lane_capacity(4096)).unwrap();
    let mut a = seg.endpoint(0).unwrap();
    let mut b = seg.endpoint(1).unwrap();
    assert_eq!(a.max_reservation(), 4096 / 2 - 128);
    assert!(matches!(
        a.reserve(1, a.max_reservation() + 1, None),
        Err(SendError::TooLarge { .. })
    ));
    let mut r = a.reserve(1, 100, None).unwrap();
    r[..5].copy_from_slice(b"hello");
    r.set_tag(Tag {
        kind: 3,
        correlation: 9,
    });
    r.commit_len(5);
    // A reservation dropped without commit sends nothing.
    {
        let mut r = a.try_reserve(1, 50).unwrap();
        r[..4].copy_from_slice(b"lost");
    }
    let mut r = a.try_reserve(1, 4).unwrap();
    r.copy_from_slice(b"last");
    r.commit();
    let m = b.try_recv().unwrap();
    assert_eq!(
        (m.payload.as_slice(), m.kind, m.correlation),
        (&b"hello"[..], 3, 9)
    );
    assert_eq!(b.try_recv().unwrap().payload, b"last");
    assert_eq!(b.try_recv(), Err(TryRecvError::Empty));
}

#[test]
fn empty_and_max_size_messages() {
    let _dog = Watchdog::new("sizes", Duration::from_secs(60));
    let max = 1 << 20;
    let seg = Segment::create(&Config::new(2).lane_capacity(4096).max_message(max)).unwrap();
    let mut b = seg.endpoint(1).unwrap();
    let tx_seg = seg.clone();
    let sender = thread::spawn(move || {
        let mut a = tx_seg.endpoint(0).unwrap();
        a.send(1, []).unwrap();
        a.send(1, vec![0xAB; max]).unwrap();
        a.send(1, b"after").unwrap();
    });
    assert_eq!(b.recv().unwrap().payload, b"");
    assert_eq!(b.recv().unwrap().payload, vec![0xAB; max]);
    assert_eq!(b.recv().unwrap().payload, b"after");
    sender.join().unwrap();
}

#[test]
fn a_timed_out_fragmented_send_leaves_nothing_behind() {
    let seg = Segment::create(&Config::new(2).lane_capacity(4096)).unwrap();
    let mut a = seg.endpoint(0).unwrap();
    let mut b = seg.endpoint(1).unwrap();
    // 20 KB through a 4 KiB lane nobody drains: a few pieces go out, then
    // the deadline passes and the sender writes an abort record.
    let err = a
        .send_deadline(1, vec![1u8; 20_000], Instant::now() + Duration::from_millis(20))
        .unwrap_err();
    assert!(matches!(err, SendError::Timeout(_)));
    // The receiver drops the published pieces when it reaches the abort.
    assert_eq!(b.try_recv(), Err(TryRecvError::Empty));
    assert_eq!(b.discarded_fragments(), 1);
    a.try_send(1, b"next").expect("the lane is empty again");
    assert_eq!(b.try_recv().expect("the next message").payload, b"next");
}

#[test]
fn attach_from_a_passed_fd_shares_lanes() {
    let seg = segment(2);
    let other = Segment::attach(seg.try_clone_fd().unwrap()).expect("attach");
    assert_eq!(other.layout(), seg.layout());
    let mut a = seg.endpoint(0).unwrap();
    let mut b = other.endpoint(1).unwrap();
    a.send(1, b"across mappings").unwrap();
    assert_eq!(b.try_recv().unwrap().payload, b"across mappings");
    assert!(matches!(other.endpoint(0), Err(EndpointError::SlotBusy { .. })));
}

/// Found by fuzzing: a fragmented `try_send` whose pieces fit the free
/// space, but not with the room kept after each piece for an abort record,
/// used to fall into the blocking wait and never return.
#[test]
fn try_send_never_blocks_when_only_the_abort_room_is_missing() {
    let _dog = Watchdog::new("try_send_never_blocks", Duration::from_secs(20));
    let seg = Segment::create(&Config::new(2).lane_capacity(4096)).unwrap();
    let mut a = seg.endpoint(0).unwrap();
    let mut b = seg.endpoint(1).unwrap();
    // Two 1016-byte records: 2064 bytes stay free. A 1985-byte message is a
    // 2016-byte piece and a 40-byte piece (2056 bytes), but the writer keeps
    // 64 bytes free after the first piece (2080).
    a.try_send(1, vec![1u8; 984]).unwrap();
    a.try_send(1, vec![2u8; 984]).unwrap();
    assert_eq!(
        a.try_send(1, vec![3u8; 1985]),
        Err(TrySendError::Full(vec![3u8; 1985]))
    );
    // Nothing of it was delivered; the lane still works.
    assert_eq!(b.try_recv().unwrap().payload, vec![1u8; 984]);
    assert_eq!(b.try_recv().unwrap().payload, vec![2u8; 984]);
    assert_eq!(b.try_recv(), Err(TryRecvError::Empty));
    a.try_send(1, vec![3u8; 1985]).expect("fits in the empty lane");
    assert_eq!(b.try_recv().unwrap().payload, vec![3u8; 1985]);
}
