//! `AsyncMessenger` (feature `tokio`): request, map, consume, emit and
//! async handlers between tokio-driven messengers, with both wakes (the
//! slot's eventfd and the waiter thread), with more workers than runtime
//! threads, and the fallback when a process has no eventfds.
#![cfg(feature = "tokio")]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shmcluster::raw::{Config, Segment};
use shmcluster::testing::Watchdog;
use shmcluster::{AsyncMessenger, AsyncWake, CallError, EmitError, MapError, Messenger, Target};

fn soon(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

/// `n` messengers in threads mode, each with handlers, turned async.
fn cluster(n: u32, wake: AsyncWake, seen: &Arc<Mutex<Vec<(u32, String)>>>) -> Vec<AsyncMessenger> {
    Messenger::threads(n)
        .unwrap()
        .into_iter()
        .map(|mut m| {
            let slot = m.slot();
            m.on_request("double", |_, x: u64| Ok::<_, String>(x * 2))
                .unwrap();
            m.on_request("fail", |_, _: ()| Err::<(), _>("no such thing"))
                .unwrap();
            m.on_async("slow-slot", move |_ctx, ms: u64| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<_, String>(slot)
            })
            .unwrap();
            let seen = seen.clone();
            m.on("note", move |ctx, text: String| {
                seen.lock().unwrap().push((ctx.sender().slot * 100 + slot, text));
            })
            .unwrap();
            m.into_async_with(wake)
        })
        .collect()
}

async fn request_map_consume_emit(wake: AsyncWake) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let ms = cluster(3, wake, &seen);
    assert_eq!(ms[0].wake(), wake, "the wake asked for is the one used");

    // request, both ways and to itself
    for (from, to) in [(0, 1), (1, 0), (2, 2)] {
        let r: u64 = ms[from].request(to, "double", &21u64, soon(5)).await.unwrap();
        assert_eq!(r, 42);
    }
    assert_eq!(
        ms[0].request::<_, ()>(1, "fail", &(), soon(5)).await,
        Err(CallError::HandlerFailed("no such thing".into()))
    );
    assert_eq!(
        ms[0].request::<_, ()>(1, "nobody", &(), soon(5)).await,
        Err(CallError::NoHandler)
    );
    assert_eq!(
        ms[0].request::<_, ()>(7, "double", &1u64, soon(5)).await,
        Err(CallError::NoSuchWorker { slot: 7 })
    );

    // map: one entry per worker, the caller included, from async handlers
    let all = ms[1].map::<_, u32>("slow-slot", &20u64, soon(5)).await.unwrap();
    let slots: Vec<u32> = all
        .iter()
        .map(|(w, r)| {
            assert_eq!(r.as_ref().ok(), Some(&w.slot));
            w.slot
        })
        .collect();
    assert_eq!(slots, vec![0, 1, 2]);
    let none = ms[1].map::<_, ()>("nobody", &(), soon(5)).await.unwrap();
    assert!(none.iter().all(|(_, r)| *r == Err(MapError::NoHandler)));

    // a map whose handlers outlast the deadline settles at the deadline
    let started = Instant::now();
    let late = ms[0]
        .map::<_, u32>("slow-slot", &2000u64, Instant::now() + Duration::from_millis(100))
        .await
        .unwrap();
    assert!(
        late.iter().all(|(_, r)| *r == Err(MapError::TimedOut)),
        "{late:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "settled at the deadline"
    );

    // consume: many concurrent tasks spread over the workers
    let ran: Vec<u32> = {
        let tasks: Vec<_> = (0..12)
            .map(|_| {
                let m = ms[0].clone();
                tokio::spawn(async move {
                    m.consume("slow-slot", &30u64, soon(10))
                        .await
                        .unwrap()
                        .worker
                        .slot
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    };
    let distinct: BTreeSet<u32> = ran.iter().copied().collect();
    assert!(distinct.len() >= 2, "consume used one worker only: {ran:?}");
    assert_eq!(
        ms[0].consume("nobody", &(), soon(5)).await.map(|c| c.worker),
        Err(CallError::NoHandler)
    );

    // emit / broadcast reach the handlers (the caller too, for All)
    ms[2].broadcast("note", "hello").unwrap();
    ms[0].emit(Target::Worker(1), "note", "direct").unwrap();
    ms[1].emit(Target::Others, "note", "others").unwrap();
    let deadline = soon(5);
    loop {
        let got = seen.lock().unwrap().clone();
        let want = [
            (200, "hello"),
            (201, "hello"),
            (202, "hello"),
            (1, "direct"),
            (100, "others"),
            (102, "others"),
        ];
        if want
            .iter()
            .all(|(k, t)| got.iter().any(|(gk, gt)| gk == k && gt == t))
        {
            assert_eq!(got.len(), 6, "nothing delivered twice: {got:?}");
            break;
        }
        assert!(Instant::now() < deadline, "events missing: {got:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventfd_wake_request_map_consume_emit() {
    let _dog = Watchdog::new("async-eventfd", Duration::from_secs(60));
    request_map_consume_emit(AsyncWake::EventFd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_wake_request_map_consume_emit() {
    let _dog = Watchdog::new("async-thread", Duration::from_secs(60));
    request_map_consume_emit(AsyncWake::Thread).await;
}

/// Everyone asks everyone, concurrently, many times: no call is lost or
/// stuck, with 8 drivers on a runtime of 2 threads (and on one thread).
async fn many_workers(wake: AsyncWake) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let ms = cluster(8, wake, &seen);
    let done = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = ms
        .iter()
        .map(|m| {
            let (m, done) = (m.clone(), done.clone());
            tokio::spawn(async move {
                for round in 0..50u64 {
                    for to in 0..8 {
                        let r: u64 = m.request(to, "double", &round, soon(10)).await.unwrap();
                        assert_eq!(r, round * 2);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(done.load(Ordering::Relaxed), 8 * 50 * 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventfd_wake_many_workers_few_threads() {
    let _dog = Watchdog::new("async-many-eventfd", Duration::from_secs(90));
    many_workers(AsyncWake::EventFd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_wake_many_workers_few_threads() {
    let _dog = Watchdog::new("async-many-thread", Duration::from_secs(90));
    many_workers(AsyncWake::Thread).await;
}

#[tokio::test(flavor = "current_thread")]
async fn eventfd_wake_many_workers_one_thread() {
    let _dog = Watchdog::new("async-many-current", Duration::from_secs(90));
    many_workers(AsyncWake::EventFd).await;
}

/// A blocking messenger on a plain thread and an async one answer each
/// other (the async driver is woken by a blocking sender's eventfd write,
/// and the other way round by the futex).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_and_async_messengers_talk() {
    let _dog = Watchdog::new("async-mixed", Duration::from_secs(60));
    let mut two = Messenger::threads(2).unwrap();
    let mut blocking = two.pop().unwrap();
    let mut asynk = two.pop().unwrap();
    asynk
        .on_request("double", |_, x: u64| Ok::<_, String>(x * 2))
        .unwrap();
    let asynk = asynk.into_async();
    blocking
        .on_request("triple", |_, x: u64| Ok::<_, String>(x * 3))
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::spawn(move || {
        // Requests to the async side, with pauses so that its driver parks.
        for i in 0..20u64 {
            let r: u64 = blocking.request(0, "double", &i, soon(5)).unwrap();
            assert_eq!(r, 2 * i);
            std::thread::sleep(Duration::from_millis(2));
        }
        blocking.run_until(|_| stop2.load(Ordering::Relaxed)).unwrap();
    });
    for i in 0..20u64 {
        let r: u64 = asynk.request(1, "triple", &i, soon(5)).await.unwrap();
        assert_eq!(r, 3 * i);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stop.store(true, Ordering::Relaxed);
    tokio::task::spawn_blocking(move || thread.join().unwrap())
        .await
        .unwrap();
}

/// A process that attached to the bare memfd has no eventfds: its async
/// messenger falls back to the waiter thread and still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_eventfds_the_waiter_thread_is_used() {
    let _dog = Watchdog::new("async-no-fds", Duration::from_secs(60));
    let made = Segment::create(&Config::new(2)).unwrap();
    assert!(made.wake_fds().is_some(), "create makes one eventfd per slot");
    let bare = Segment::attach(made.try_clone_fd().unwrap()).unwrap();
    assert!(bare.wake_fds().is_none());
    let mut a = Messenger::from_endpoint(bare.endpoint(0).unwrap());
    a.on_request("double", |_, x: u64| Ok::<_, String>(x * 2))
        .unwrap();
    let a = a.into_async();
    assert_eq!(a.wake(), AsyncWake::Thread);
    let mut b = Messenger::from_endpoint(bare.endpoint(1).unwrap());
    b.on_request("double", |_, x: u64| Ok::<_, String>(x * 2))
        .unwrap();
    let b = b.into_async_with(AsyncWake::EventFd);
    assert_eq!(b.wake(), AsyncWake::Thread, "EventFd without eventfds falls back");
    for i in 0..10u64 {
        assert_eq!(
            a.request::<_, u64>(1, "double", &i, soon(5)).await.unwrap(),
            2 * i
        );
        assert_eq!(
            b.request::<_, u64>(0, "double", &i, soon(5)).await.unwrap(),
            2 * i
        );
    }
    // Installing them afterwards is checked.
    assert!(bare.set_wake_fds(Vec::new()).is_err(), "wrong count refused");
}

/// Every handle dropped: the driver ends and releases the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_ends_with_its_last_handle() {
    let _dog = Watchdog::new("async-drop", Duration::from_secs(30));
    let seg = Segment::create(&Config::new(1)).unwrap();
    let m = Messenger::from_endpoint(seg.endpoint(0).unwrap()).into_async();
    let again = m.clone();
    drop(m);
    drop(again);
    let deadline = soon(5);
    while seg.endpoint(0).is_err() {
        assert!(Instant::now() < deadline, "slot still held by the driver");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `synchronize_key`: sections exclude each other across tasks and
/// messengers, free locks are taken without a thread hop, held ones on
/// the blocking pool, and a panic inside propagates without leaving the
/// lock held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronize_key_excludes_and_survives_a_panic() {
    let _dog = Watchdog::new("async-sync", Duration::from_secs(60));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let ms = cluster(2, AsyncWake::EventFd, &seen);
    // A non-atomic read-modify-write in each section: lost updates if two
    // overlap (a sleep widens the window).
    let counter = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (m, counter) = (ms[i % 2].clone(), counter.clone());
            tokio::spawn(async move {
                for _ in 0..50 {
                    m.synchronize_key("n", {
                        let counter = counter.clone();
                        move |section| {
                            assert_eq!(section.name(), "n");
                            let v = counter.load(Ordering::Relaxed);
                            std::thread::sleep(Duration::from_micros(20));
                            counter.store(v + 1, Ordering::Relaxed);
                        }
                    })
                    .await
                    .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(counter.load(Ordering::Relaxed), 400);
    let stats = ms[0].locks().unwrap().stats();
    let n = stats.iter().find(|s| s.name == "n").unwrap();
    assert_eq!(n.acquisitions, 400);
    assert!(
        n.waits <= 400,
        "each acquisition waited at most once: {}",
        n.waits
    );
    // A panicking section: the panic reaches the caller, the lock is free.
    let m = ms[1].clone();
    let panicked = tokio::spawn(async move { m.synchronize_key("n", |_| panic!("inside")).await }).await;
    assert!(panicked.unwrap_err().is_panic());
    let token = ms[0].synchronize(|s| s.fencing_token()).await.unwrap();
    assert!(token > 0);
    let again = ms[0]
        .synchronize_key("n", |s| s.previous_owner_died())
        .await
        .unwrap();
    assert!(!again, "a panic is not a death");
}

/// `flush` resolves only once what was queued before it has been sent:
/// the events are in the receiver's lane by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_waits_for_what_was_queued() {
    let _dog = Watchdog::new("async-flush", Duration::from_secs(30));
    let two = Messenger::threads(2).unwrap();
    let mut it = two.into_iter();
    let sender = it.next().unwrap().into_async();
    let mut receiver = it.next().unwrap();
    for i in 0..100u32 {
        sender.emit(Target::Worker(1), "n", &i).unwrap();
    }
    sender.flush(soon(5)).await.unwrap();
    // Nobody drives the receiver: the 100 events must be in its lane now.
    let got = Arc::new(AtomicU64::new(0));
    let g = got.clone();
    receiver
        .on("n", move |_, _: u32| {
            g.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
    assert_eq!(receiver.dispatch().unwrap(), 100);
    assert_eq!(got.load(Ordering::Relaxed), 100);
}

/// Issue 12, item 2: through the driver too, a message to oneself takes
/// every size the others take, and one over the limit is refused before it
/// is queued, with the payload's size and the payload limit. (A 1 MiB
/// request between two drivers of one runtime used to deadlock: the
/// sender's blocking stream held the thread the receiver was queued on.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_to_oneself_and_the_payload_limit() {
    let _dog = Watchdog::new("async sizes", Duration::from_secs(60));
    let mut ms = Messenger::threads(2).unwrap();
    for m in &mut ms {
        m.on_request("len", |_, v: Vec<u8>| Ok::<_, String>(v.len()))
            .unwrap();
    }
    let ms: Vec<AsyncMessenger> = ms.into_iter().map(|m| m.into_async()).collect();
    let max = ms[0].max_payload();
    let value = vec![5u8; 1024 * 1024];
    for to in [0, 1] {
        let n: usize = ms[0].request(to, "len", &value, soon(10)).await.unwrap();
        assert_eq!(n, value.len(), "1 MiB request to slot {to}");
    }
    let out = ms[0].map::<_, usize>("len", &value, soon(10)).await.unwrap();
    assert_eq!(out.len(), 2);
    assert!(out.iter().all(|(_, r)| r == &Ok(value.len())), "{out:?}");
    // A Vec<u8> of n bytes encodes as n plus a varint length of 4 bytes.
    let over = vec![0u8; max];
    assert_eq!(
        ms[0].request::<_, usize>(0, "len", &over, soon(10)).await,
        Err(CallError::TooLarge { len: max + 4, max })
    );
    assert_eq!(
        ms[0].emit(Target::All, "len", &over),
        Err(EmitError::TooLarge { len: max + 4, max })
    );
}

/// A consume whose future is dropped (here by a timeout) leaves the
/// driver: when the worker it went to dies afterwards, the task is not sent
/// to another one, as it would be for a caller still waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_consume_is_not_redelivered() {
    use std::sync::atomic::AtomicBool;
    let _dog = Watchdog::new("dropped consume", Duration::from_secs(30));
    let segment = Segment::create(&Config::new(3)).unwrap();
    // Slot 1 takes the task and never answers: it keeps the reply.
    let kept = Arc::new(Mutex::new(Vec::new()));
    let mut m1 = Messenger::from_endpoint(segment.endpoint(1).unwrap());
    let k = kept.clone();
    m1.on_request_async_bytes("task", move |_, _, reply| k.lock().unwrap().push(reply))
        .unwrap();
    let stop1 = Arc::new(AtomicBool::new(false));
    let s1 = stop1.clone();
    let t1 = std::thread::spawn(move || {
        while !s1.load(Ordering::Acquire) {
            m1.poll(Duration::from_millis(10)).unwrap();
        }
    });
    let am0 = Messenger::from_endpoint(segment.endpoint(0).unwrap()).into_async();
    let gave_up = tokio::time::timeout(Duration::from_millis(200), am0.consume("task", &(), soon(20))).await;
    assert!(gave_up.is_err(), "the consume ended: {gave_up:?}");
    assert_eq!(kept.lock().unwrap().len(), 1, "slot 1 took the task");
    // The driver sees the future gone within a few of its turns.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Slot 1's worker ends (its claim goes with its endpoint), replies
    // unsent; slot 2 comes up with a handler.
    stop1.store(true, Ordering::Release);
    t1.join().unwrap();
    let got = Arc::new(AtomicU64::new(0));
    let mut m2 = Messenger::from_endpoint(segment.endpoint(2).unwrap());
    let g = got.clone();
    m2.on_bytes("task", move |_, _| {
        g.fetch_add(1, Ordering::Relaxed);
        Vec::new()
    })
    .unwrap();
    let stop2 = Arc::new(AtomicBool::new(false));
    let s2 = stop2.clone();
    let t2 = std::thread::spawn(move || {
        while !s2.load(Ordering::Acquire) {
            m2.poll(Duration::from_millis(10)).unwrap();
        }
    });
    // Ample for a redelivery: the driver looks at its calls' targets
    // every 5 ms.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        got.load(Ordering::Relaxed),
        0,
        "a dropped consume was redelivered"
    );
    stop2.store(true, Ordering::Release);
    t2.join().unwrap();
    kept.lock().unwrap().clear();
    drop(am0);
}
