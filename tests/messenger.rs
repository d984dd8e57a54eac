//! The messenger in threads mode and standalone: the same API as in a
//! cluster, n workers as threads on one segment. Every test runs under a
//! watchdog; worker threads serve with `run_until` until told to stop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shmcluster::testing::Watchdog;
use shmcluster::{CallError, EmitError, MapError, Messenger, Target, MAX_EVENT_NAME};

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// Runs `setup` on each of messengers 1.., then serves them on their own
/// threads until `stop` is set; returns messenger 0 for the test to drive.
fn cluster(
    n: u32,
    mut setup: impl FnMut(&mut Messenger),
) -> (Messenger, Arc<AtomicBool>, Vec<JoinHandle<Messenger>>) {
    let mut all = Messenger::threads(n).unwrap();
    for m in &mut all {
        setup(m);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let first = all.remove(0);
    let threads = serve_until_stopped(all, &stop);
    (first, stop, threads)
}

/// Each messenger dispatching on a thread of its own until `stop`.
fn serve_until_stopped(all: Vec<Messenger>, stop: &Arc<AtomicBool>) -> Vec<JoinHandle<Messenger>> {
    all.into_iter()
        .map(|mut m| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                m.run_until(|_| stop.load(Ordering::Acquire)).unwrap();
                m
            })
        })
        .collect()
}

fn finish(stop: Arc<AtomicBool>, threads: Vec<JoinHandle<Messenger>>) -> Vec<Messenger> {
    stop.store(true, Ordering::Release);
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn broadcast_reaches_every_worker_once_including_the_sender() {
    let _dog = Watchdog::new("broadcast", Duration::from_secs(30));
    // (receiver, sender) → values in arrival order.
    type Seen = Arc<Mutex<HashMap<(u32, u32), Vec<u64>>>>;
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let (mut m0, stop, threads) = cluster(4, |m| {
        let (s, me) = (s.clone(), m.slot());
        m.on::<u64, _>("tick", move |ctx, v| {
            s.lock()
                .unwrap()
                .entry((me, ctx.sender().slot))
                .or_default()
                .push(v);
        })
        .unwrap();
    });
    for i in 0..100u64 {
        assert_eq!(m0.broadcast("tick", &i).unwrap(), 4);
    }
    // Our own copies arrive through our own lane.
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().values().map(Vec::len).sum::<usize>() < 400 && Instant::now() < deadline {
        m0.poll(Duration::from_millis(10)).unwrap();
    }
    finish(stop, threads);
    let seen = seen.lock().unwrap();
    for me in 0..4 {
        assert_eq!(
            seen[&(me, 0)],
            (0..100).collect::<Vec<u64>>(),
            "worker {me}: once each, in order"
        );
    }
    assert_eq!(seen.len(), 4);
}

#[test]
fn direct_send_others_and_message_event() {
    let _dog = Watchdog::new("direct", Duration::from_secs(30));
    let got: Arc<Mutex<Vec<(u32, String)>>> = Arc::default();
    let g = got.clone();
    let (mut m0, stop, threads) = cluster(3, |m| {
        let (g, me) = (g.clone(), m.slot());
        m.on::<String, _>("message", move |_, v| g.lock().unwrap().push((me, v)))
            .unwrap();
    });
    assert_eq!(m0.to(Target::Worker(2)).send("to two").unwrap(), 1);
    assert_eq!(m0.to(Target::Others).send("to others").unwrap(), 2);
    assert!(matches!(
        m0.to(Target::Worker(7)).send("x"),
        Err(EmitError::NoSuchWorker { slot: 7 })
    ));
    // A request after the sends: FIFO per sender means they have arrived.
    for w in 1..3 {
        m0.request::<_, ()>(w, "message", "sync", soon()).unwrap();
    }
    finish(stop, threads);
    let mut got = got.lock().unwrap().clone();
    got.sort();
    let want: Vec<(u32, String)> = [
        (1, "sync"),
        (1, "to others"),
        (2, "sync"),
        (2, "to others"),
        (2, "to two"),
    ]
    .into_iter()
    .map(|(w, s)| (w, s.to_string()))
    .collect();
    assert_eq!(got, want, "worker 0 is not among Others");
}

#[test]
fn request_reply_sync_async_and_errors() {
    let _dog = Watchdog::new("request", Duration::from_secs(30));
    let (mut m0, stop, threads) = cluster(2, |m| {
        m.on_request::<(u32, u32), u32, String, _>("add", |_, (a, b)| Ok(a + b))
            .unwrap();
        m.on_request::<u32, u32, String, _>("fail", |_, _| Err("no thanks".into()))
            .unwrap();
        m.on_request::<u32, u32, String, _>("panic", |_, _| panic!("boom"))
            .unwrap();
        m.on_request_async::<u64, u64, _>("later", |_, v, reply| {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                reply.send(Ok(v * 2));
            });
        })
        .unwrap();
        m.on_request_async::<u64, u64, _>("dropped", |_, _, reply| drop(reply))
            .unwrap();
    });
    assert_eq!(m0.request::<_, u32>(1, "add", &(2u32, 3u32), soon()), Ok(5));
    assert_eq!(m0.request::<_, u64>(1, "later", &21u64, soon()), Ok(42));
    assert_eq!(
        m0.request::<_, u64>(1, "dropped", &1u64, soon()),
        Err(CallError::HandlerFailed("reply dropped".into()))
    );
    assert_eq!(
        m0.request::<_, u32>(1, "fail", &1u32, soon()),
        Err(CallError::HandlerFailed("no thanks".into()))
    );
    match m0.request::<_, u32>(1, "panic", &1u32, soon()) {
        Err(CallError::HandlerFailed(e)) => assert!(e.contains("boom"), "{e}"),
        other => panic!("{other:?}"),
    }
    // Still serving after the panic.
    assert_eq!(m0.request::<_, u32>(1, "add", &(1u32, 1u32), soon()), Ok(2));
    // A payload that does not decode as the handler's type (postcard has no
    // type tags: here it is too short for a pair): the handler is not
    // called; the caller learns why.
    match m0.request::<_, u32>(1, "add", &7u8, soon()) {
        Err(CallError::HandlerFailed(e)) => assert!(e.contains("decode"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        m0.request::<_, u32>(1, "nobody", &1u32, soon()),
        Err(CallError::NoHandler)
    );
    let long = "e".repeat(MAX_EVENT_NAME + 1);
    assert_eq!(
        m0.request::<_, u32>(1, &long, &1u32, soon()),
        Err(CallError::EventName {
            len: MAX_EVENT_NAME + 1
        })
    );
    let huge = vec![0u8; 17 * 1024 * 1024];
    assert!(matches!(
        m0.request::<_, u32>(1, "add", &huge, soon()),
        Err(CallError::TooLarge { .. })
    ));
    let t0 = Instant::now();
    assert_eq!(
        m0.request::<_, u64>(1, "slow-nobody-answers", &1u64, Instant::now()),
        Err(CallError::NoHandler).or(Err(CallError::TimedOut)),
        "an expired deadline returns at once"
    );
    assert!(t0.elapsed() < Duration::from_secs(1));
    // The latency of the last request is in the segment's stats.
    let slot0 = m0.stats().slots[0].clone();
    assert!(
        slot0.last_request.is_some_and(|d| d < Duration::from_secs(10)),
        "{slot0:?}"
    );
    let others = finish(stop, threads);
    let stats = others[0].event_stats();
    assert_eq!(stats["add"].decode_failures, 1);
    assert_eq!(stats["fail"].failures, 1);
    assert_eq!(stats["panic"].failures, 1);
    assert_eq!(stats["nobody"].unhandled, 1);
}

#[test]
fn map_gives_one_entry_per_worker_and_never_hangs() {
    let _dog = Watchdog::new("map", Duration::from_secs(30));
    let (mut m0, stop, threads) = cluster(4, |m| {
        let me = m.slot();
        match me {
            2 => {} // no handler
            3 => {
                m.on_request::<u32, u32, String, _>("who", |_, _| {
                    std::thread::sleep(Duration::from_millis(600));
                    Ok(3)
                })
                .unwrap();
            }
            _ => {
                m.on_request::<u32, u32, String, _>("who", move |_, x| Ok(me * 10 + x))
                    .unwrap();
            }
        }
    });
    let started = Instant::now();
    let out = m0
        .map::<_, u32>("who", &1u32, Instant::now() + Duration::from_millis(300))
        .unwrap();
    let took = started.elapsed();
    let got: Vec<(u32, Result<u32, MapError>)> = out.into_iter().map(|(w, r)| (w.slot, r)).collect();
    assert_eq!(
        got,
        vec![
            (0, Ok(1)),
            (1, Ok(11)),
            (2, Err(MapError::NoHandler)),
            (3, Err(MapError::TimedOut))
        ]
    );
    assert!(took < Duration::from_secs(2), "bounded by the deadline: {took:?}");
    finish(stop, threads);
}

#[test]
fn consume_runs_exactly_once_and_reports_no_handler() {
    let _dog = Watchdog::new("consume", Duration::from_secs(60));
    let ran: Arc<Mutex<HashMap<u64, Vec<u32>>>> = Arc::default();
    let r = ran.clone();
    let (mut m0, stop, threads) = cluster(4, |m| {
        let (r, me) = (r.clone(), m.slot());
        if me != 3 {
            m.on::<u64, _>("job", move |_, id| {
                r.lock().unwrap().entry(id).or_default().push(me)
            })
            .unwrap();
        }
    });
    for id in 0..2000u64 {
        let done = m0.consume("job", &id, soon()).unwrap();
        assert_ne!(done.worker.slot, 3, "worker 3 has no handler");
    }
    assert_eq!(
        m0.consume("nobody-handles", &1u64, soon()),
        Err(CallError::NoHandler)
    );
    finish(stop, threads);
    let ran = ran.lock().unwrap();
    assert_eq!(ran.len(), 2000);
    let mut per_worker = [0u32; 4];
    for (id, who) in ran.iter() {
        assert_eq!(who.len(), 1, "task {id} ran {} times", who.len());
        per_worker[who[0] as usize] += 1;
    }
    println!("consume distribution over 2000 tasks: {per_worker:?}");
    assert_eq!(per_worker[3], 0);
    assert!(per_worker[..3].iter().all(|&n| n > 0), "{per_worker:?}");
}

/// Two callers consume at once: while caller 0's task runs in its
/// handler (out of the lane, so only the worker's busy mark shows it),
/// caller 1's task must go to another worker, though the first is the
/// one every caller's pick would otherwise favour (it runs, and each
/// caller's round-robin starts there). Each handler holds its task until
/// both tasks run, at most 2 s: a task queued behind the other shows as a
/// round in which neither saw the other.
#[test]
fn a_worker_with_a_task_in_hand_gets_no_other_while_one_is_free() {
    let _dog = Watchdog::new("consume at once", Duration::from_secs(120));
    const ROUNDS: u64 = 20;
    // (round, tasks in a handler now) and the handlers' wake-up.
    let holding: Arc<(Mutex<(u64, u32)>, std::sync::Condvar)> = Arc::default();
    // (round, slot, whether it saw both tasks in hand)
    let ran: Arc<Mutex<Vec<(u64, u32, bool)>>> = Arc::default();
    let mut all = Messenger::threads(5).unwrap();
    for m in all.iter_mut().skip(2) {
        let (holding, ran, me) = (holding.clone(), ran.clone(), m.slot());
        m.on::<u64, _>("hold", move |_, round| {
            let (lock, cv) = &*holding;
            let mut h = lock.lock().unwrap();
            if h.0 != round {
                *h = (round, 0);
            }
            h.1 += 1;
            cv.notify_all();
            let (h, _) = cv
                .wait_timeout_while(h, Duration::from_secs(2), |h| h.0 == round && h.1 < 2)
                .unwrap();
            let both = h.0 == round && h.1 >= 2;
            drop(h);
            ran.lock().unwrap().push((round, me, both));
        })
        .unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut callers: Vec<Messenger> = all.drain(..2).collect();
    let servers = serve_until_stopped(all, &stop);
    let mut m1 = callers.pop().unwrap();
    let mut m0 = callers.pop().unwrap();
    let turns = Arc::new(std::sync::Barrier::new(2));
    let second = {
        let (holding, turns) = (holding.clone(), turns.clone());
        std::thread::spawn(move || {
            for round in 0..ROUNDS {
                turns.wait();
                // Until caller 0's task runs in a handler (serving, so that
                // caller 0 may ask this worker too).
                while *holding.0.lock().unwrap() != (round, 1) {
                    m1.poll(Duration::from_millis(1)).unwrap();
                }
                m1.consume("hold", &round, soon()).unwrap();
                turns.wait();
            }
            m1
        })
    };
    for round in 0..ROUNDS {
        turns.wait();
        m0.consume("hold", &round, soon()).unwrap();
        turns.wait();
    }
    let m1 = second.join().unwrap();
    finish(stop, servers);
    drop((m0, m1));
    let ran = ran.lock().unwrap();
    assert_eq!(ran.len() as u64, 2 * ROUNDS);
    for round in 0..ROUNDS {
        let this: Vec<&(u64, u32, bool)> = ran.iter().filter(|r| r.0 == round).collect();
        assert!(
            this.len() == 2 && this[0].1 != this[1].1 && this.iter().all(|r| r.2),
            "round {round}: two tasks at once must run on two workers: {this:?}"
        );
    }
}

#[test]
fn once_off_and_standalone() {
    let _dog = Watchdog::new("standalone", Duration::from_secs(30));
    let mut m = Messenger::standalone().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    m.once::<u32, _>("hello", move |ctx, _| {
        assert_eq!(ctx.sender().slot, 0);
        c.fetch_add(1, Ordering::AcqRel);
    })
    .unwrap();
    assert_eq!(
        m.broadcast("hello", &1u32).unwrap(),
        1,
        "standalone: every target is the caller"
    );
    m.broadcast("hello", &2u32).unwrap();
    while m.dispatch().unwrap() > 0 {}
    assert_eq!(count.load(Ordering::Acquire), 1, "once runs once");
    let id = m
        .on_request::<u32, u32, String, _>("double", |_, x| Ok(x * 2))
        .unwrap();
    assert_eq!(
        m.request::<_, u32>(0, "double", &4u32, soon()),
        Ok(8),
        "a request to oneself"
    );
    let out = m.map::<_, u32>("double", &5u32, soon()).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].1, Ok(10));
    assert!(m.off_handler(id));
    assert_eq!(
        m.request::<_, u32>(0, "double", &4u32, soon()),
        Err(CallError::NoHandler)
    );
    m.on_bytes("raw", |_, b| b.iter().rev().copied().collect())
        .unwrap();
    assert_eq!(m.request_bytes(0, "raw", b"abc", soon()), Ok(b"cba".to_vec()));
    let out = m.map_bytes("raw", b"xy", soon()).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].1, Ok(b"yx".to_vec()));
    assert_eq!(m.consume_bytes("raw", b"q", soon()).map(|c| c.worker.slot), Ok(0));
    m.on_request_async_bytes("later-bytes", |_, b, reply| {
        let b = b.to_vec();
        std::thread::spawn(move || reply.send(Ok([b.as_slice(), b"!"].concat())));
    })
    .unwrap();
    assert_eq!(
        m.request_bytes(0, "later-bytes", b"hi", soon()),
        Ok(b"hi!".to_vec())
    );
    assert_eq!(m.off("raw"), 1);
    assert_eq!(m.consume("double", &1u32, soon()), Err(CallError::NoHandler));
}

#[test]
fn handles_send_from_other_threads_and_wake_a_parked_loop() {
    let _dog = Watchdog::new("handle", Duration::from_secs(30));
    let mut all = Messenger::threads(2).unwrap();
    let mut m1 = all.pop().unwrap();
    let m0 = all.pop().unwrap();
    let got = Arc::new(AtomicU64::new(0));
    let g = got.clone();
    m1.on::<u64, _>("n", move |_, v| {
        g.fetch_add(v, Ordering::AcqRel);
    })
    .unwrap();
    m1.on_request::<u64, u64, String, _>("double", |_, v| Ok(v * 2))
        .unwrap();
    // A handler that makes a blocking request through its own messenger's
    // handle is refused at once instead of deadlocking the loop.
    let own = m1.handle();
    m1.on_request::<u64, String, String, _>("reenter", move |_, v| {
        Ok(format!("{:?}", own.request::<_, u64>(1, "double", &v, soon())))
    })
    .unwrap();
    let handle = m0.handle();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    // m0's loop parks; the handle's sends wake it and it forwards them.
    let t0 = std::thread::spawn(move || {
        let mut m0 = m0;
        m0.run_until(|_| s.load(Ordering::Acquire)).unwrap();
    });
    let s = stop.clone();
    let t1 = std::thread::spawn(move || {
        m1.run_until(|_| s.load(Ordering::Acquire)).unwrap();
    });
    std::thread::sleep(Duration::from_millis(100));
    for v in 1..=10u64 {
        handle.emit(1, "n", &v).unwrap();
    }
    // Requests from other threads, through the loop's thread.
    let callers: Vec<_> = (0..4u64)
        .map(|i| {
            let h = handle.clone();
            std::thread::spawn(move || h.request::<_, u64>(1, "double", &i, soon()))
        })
        .collect();
    for (i, c) in callers.into_iter().enumerate() {
        assert_eq!(c.join().unwrap(), Ok(i as u64 * 2));
    }
    assert_eq!(
        handle.request::<_, u64>(1, "nobody", &1u64, soon()),
        Err(CallError::NoHandler)
    );
    let started = Instant::now();
    assert_eq!(
        handle.request::<_, String>(1, "reenter", &3u64, soon()),
        Ok(format!("{:?}", Err::<u64, _>(CallError::InHandler)))
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        handle.request::<_, u64>(9, "double", &1u64, soon()),
        Err(CallError::NoSuchWorker { slot: 9 })
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.load(Ordering::Acquire) != 55 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Release);
    t0.join().unwrap();
    t1.join().unwrap();
    assert_eq!(got.load(Ordering::Acquire), 55);
}

#[test]
fn a_dead_target_is_reported_at_once() {
    let _dog = Watchdog::new("dead", Duration::from_secs(30));
    let mut all = Messenger::threads(2).unwrap();
    let m1 = all.pop().unwrap();
    let mut m0 = all.pop().unwrap();
    // Worker 1 never answers and goes away (its slot is released).
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        drop(m1);
    });
    let started = Instant::now();
    let r = m0.request::<_, u32>(1, "anything", &1u32, Instant::now() + Duration::from_secs(10));
    assert_eq!(r, Err(CallError::WorkerDied));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    t.join().unwrap();
    assert_eq!(m0.live_workers().len(), 1);
    // Messages to the empty slot wait for a successor while there is room;
    // once its lane is full, a send says so instead of waiting for ever.
    let mut sent = 0;
    let err = loop {
        match m0.emit(Target::Worker(1), "e", &vec![0u8; 100]) {
            Ok(_) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 100_000, "the lane never filled");
    };
    assert_eq!(err, EmitError::WorkerDied);
    assert!(sent > 100, "queued for a successor first: {sent}");
}

/// Issue 12, item 2: a message to oneself takes every size the others take
/// (it used to be capped at half a lane: 32,704 bytes by default).
#[test]
fn messages_to_oneself_take_every_size_up_to_the_payload_limit() {
    let _dog = Watchdog::new("self sizes", Duration::from_secs(60));
    let mut m = Messenger::standalone().unwrap();
    let max = m.max_payload();
    assert_eq!(
        max,
        16 * 1024 * 1024 - (MAX_EVENT_NAME + 9),
        "README's payload limit"
    );
    m.on_bytes("len", |_, b| (b.len() as u64).to_le_bytes().to_vec())
        .unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    m.on_bytes("emit", move |_, b| {
        s.fetch_add(b.len() as u64, Ordering::AcqRel);
        Vec::new()
    })
    .unwrap();
    for len in [40_000, 1024 * 1024, max] {
        let data = vec![7u8; len];
        assert_eq!(
            m.request_bytes(0, "len", &data, soon()),
            Ok((len as u64).to_le_bytes().to_vec()),
            "a {len}-byte request to oneself"
        );
        let out = m.map_bytes("len", &data, soon()).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0].1,
            Ok((len as u64).to_le_bytes().to_vec()),
            "map of {len} bytes"
        );
        assert_eq!(
            m.consume_bytes("len", &data, soon()).map(|c| c.worker.slot),
            Ok(0)
        );
        seen.store(0, Ordering::Release);
        assert_eq!(m.emit_bytes(Target::Worker(0), "emit", &data), Ok(1));
        while m.dispatch().unwrap() > 0 {}
        assert_eq!(
            seen.load(Ordering::Acquire),
            len as u64,
            "emit of {len} bytes to oneself"
        );
    }
    // The typed path: a Vec<u8> of n bytes encodes as n plus its length.
    let value = vec![1u8; 1024 * 1024];
    m.on_request::<Vec<u8>, usize, String, _>("typed", |_, v| Ok(v.len()))
        .unwrap();
    assert_eq!(m.request::<_, usize>(0, "typed", &value, soon()), Ok(value.len()));
    // One byte over: refused, with the payload's size and the payload limit.
    let over = vec![0u8; max + 1];
    assert_eq!(
        m.request_bytes(0, "len", &over, soon()),
        Err(CallError::TooLarge { len: max + 1, max })
    );
    assert_eq!(
        m.emit_bytes(Target::All, "emit", &over),
        Err(EmitError::TooLarge { len: max + 1, max })
    );
}

/// Issue 12, item 2: a call that fails for size fails before anything is
/// sent, to anyone; every target, oneself included, takes a message larger
/// than half a lane.
#[test]
fn a_call_too_large_for_anyone_reaches_no_one_and_a_large_one_reaches_all() {
    let _dog = Watchdog::new("sizes", Duration::from_secs(60));
    let big_runs = Arc::new(AtomicU64::new(0));
    let b = big_runs.clone();
    let handlers = move |m: &mut Messenger| {
        let b = b.clone();
        m.on_bytes("big", move |_, data| {
            b.fetch_add(1, Ordering::AcqRel);
            (data.len() as u64).to_le_bytes().to_vec()
        })
        .unwrap();
        m.on_bytes("ping", |_, _| b"pong".to_vec()).unwrap();
    };
    let (mut m0, stop, threads) = cluster(3, handlers);
    let max = m0.max_payload();
    // 40,000 bytes: over half a lane (the old cap on oneself), far under
    // the limit. Every worker runs it, the caller included.
    let data = vec![3u8; 40_000];
    assert_eq!(m0.emit_bytes(Target::All, "big", &data), Ok(3));
    let out = m0.map_bytes("big", &data, soon()).unwrap();
    assert_eq!(out.len(), 3);
    for (w, r) in &out {
        assert_eq!(r, &Ok(40_000u64.to_le_bytes().to_vec()), "worker {w:?}");
    }
    // Handle the broadcast's own copy, then count.
    while m0.dispatch().unwrap() > 0 {}
    let deadline = Instant::now() + Duration::from_secs(10);
    while big_runs.load(Ordering::Acquire) < 6 && Instant::now() < deadline {
        m0.poll(Duration::from_millis(5)).unwrap();
    }
    assert_eq!(big_runs.load(Ordering::Acquire), 6, "3 broadcast + 3 map runs");
    // Over the limit: refused up front, by every operation.
    let over = vec![0u8; max + 1];
    let too_large = Err(CallError::TooLarge { len: max + 1, max });
    let emit_too_large = Err(EmitError::TooLarge { len: max + 1, max });
    assert_eq!(m0.emit_bytes(Target::All, "big", &over), emit_too_large);
    assert_eq!(m0.emit_bytes(Target::Others, "big", &over), emit_too_large);
    assert_eq!(m0.map_bytes("big", &over, soon()).map(|_| ()), too_large);
    assert_eq!(m0.consume_bytes("big", &over, soon()).map(|_| ()), too_large);
    assert_eq!(m0.request_bytes(1, "big", &over, soon()).map(|_| ()), too_large);
    // Nobody ran it: a round trip to each worker after the refusals
    // (per-sender FIFO) shows nothing arrived before it.
    for w in 0..3 {
        assert_eq!(m0.request_bytes(w, "ping", b"", soon()), Ok(b"pong".to_vec()));
    }
    while m0.dispatch().unwrap() > 0 {}
    assert_eq!(
        big_runs.load(Ordering::Acquire),
        6,
        "a refused call ran somewhere"
    );
    finish(stop, threads);
}

/// Issue 12, item 2: a handler's answer over the limit reaches the caller
/// as a failure at once, not as a wait until the deadline.
#[test]
fn an_answer_over_the_limit_is_a_handler_failure() {
    let _dog = Watchdog::new("answer size", Duration::from_secs(60));
    let mut m = Messenger::standalone().unwrap();
    let max = m.max_payload();
    m.on_bytes("huge", move |_, _| vec![0u8; max + 1]).unwrap();
    // Before, the reply could not be sent and this waited out the deadline.
    match m.request_bytes(0, "huge", b"", Instant::now() + Duration::from_secs(30)) {
        Err(CallError::HandlerFailed(e)) => {
            assert!(
                e.contains(&format!("{}", max + 1)) && e.contains(&format!("{max}")),
                "{e}"
            )
        }
        other => panic!("{other:?}"),
    }
}

/// A handle that keeps queueing messages to a slow worker while the
/// messenger sends its outbox: a send waiting for room dispatches, and
/// that dispatch used to send the outbox again, one stack frame per full
/// lane — a NATS bridge relaying a stream of broadcasts overflowed its
/// stack — and newer messages went before older ones. Every message
/// arrives, in the order queued.
#[test]
fn an_outbox_refilled_while_it_is_sent_keeps_its_order_and_the_stack() {
    let _dog = Watchdog::new("outbox refilled", Duration::from_secs(120));
    const N: u64 = 200_000;
    let got = Arc::new(Mutex::new(Vec::with_capacity(N as usize)));
    let g = got.clone();
    let (mut m0, stop, threads) = cluster(2, |m| {
        let g = g.clone();
        m.on("n", move |_, n: u64| {
            // A slow receiver: its lane stays full.
            if n.is_multiple_of(64) {
                std::thread::sleep(Duration::from_micros(50));
            }
            g.lock().unwrap().push(n);
        })
        .unwrap();
    });
    let handle = m0.handle();
    let producer = std::thread::spawn(move || {
        for n in 0..N {
            handle.emit(1, "n", &n).unwrap();
        }
    });
    // m0 sends what the handle queues, on a thread with a small stack (as
    // a tokio worker's is 2 MiB, this one's 256 KiB) so that a recursion
    // per full lane fails here at once.
    let sender = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || {
            let until = Instant::now() + Duration::from_secs(100);
            while Instant::now() < until && !producer.is_finished() {
                m0.poll(Duration::from_millis(1)).unwrap();
            }
            producer.join().unwrap();
            for _ in 0..1000 {
                m0.poll(Duration::from_millis(1)).unwrap();
            }
            m0
        })
        .unwrap();
    let _m0 = sender
        .join()
        .expect("the sender thread (a stack overflow aborts the process)");
    let until = Instant::now() + Duration::from_secs(30);
    while got.lock().unwrap().len() < N as usize && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    finish(stop, threads);
    let got = got.lock().unwrap();
    assert_eq!(got.len(), N as usize, "messages lost");
    assert!(got.windows(2).all(|w| w[0] < w[1]), "out of order");
}
