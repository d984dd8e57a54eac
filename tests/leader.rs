//! Leader and followers in threads mode and standalone, under watchdogs:
//! one leader, invoke through it, re-election when it goes, subscribe and
//! publish with late subscribers and restored subscriptions.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shmcluster::testing::Watchdog;
use shmcluster::{CallError, Messenger};

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// A worker thread: registers the leader handler and serves until `stop`.
fn serve(mut m: Messenger, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Messenger> {
    std::thread::spawn(move || {
        m.run_until(|_| stop.load(Ordering::Acquire)).unwrap();
        m
    })
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn one_leader_invoke_and_reelection() {
    let _dog = Watchdog::new("leader", Duration::from_secs(60));
    let mut all = Messenger::threads(3).unwrap();
    let changes: Arc<Mutex<Vec<(u32, u32, u64)>>> = Arc::default();
    for m in &mut all {
        let me = m.slot();
        m.campaign().unwrap();
        m.on_invoke::<u32, u32, String, _>("who", move |_, x| Ok(me * 100 + x))
            .unwrap();
        let c = changes.clone();
        m.on_leader_change(move |ch| c.lock().unwrap().push((me, ch.leader.slot, ch.leader.term)));
    }
    let mut driver = all.remove(0);
    let stop1 = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::new(AtomicBool::new(false));
    let mut t1 = Some(serve(all.remove(0), stop1.clone()));
    let mut t2 = Some(serve(all.remove(0), stop2.clone()));
    wait_for("a leader", || driver.leader().is_some());
    let first = driver.leader().unwrap();
    let leaders = [driver.is_leader()].iter().filter(|&&l| l).count();
    assert!(leaders <= 1);
    let got: u32 = driver.invoke("who", &7u32, soon()).unwrap();
    assert_eq!(got, first.slot * 100 + 7, "the leader's handler ran");
    // The driver sees the leader change callbacks while dispatching.
    driver.poll(Duration::from_millis(20)).unwrap();
    assert!(changes
        .lock()
        .unwrap()
        .iter()
        .any(|&(w, l, t)| w == 0 && l == first.slot && t == first.term));
    // The leader goes away (its messenger is dropped with its thread, which
    // resigns): another worker leads at once, with a larger term.
    if first.slot == 0 {
        drop(driver);
        // Drive from worker 1 instead.
        stop1.store(true, Ordering::Release);
        driver = t1.take().unwrap().join().unwrap();
    } else {
        let (stop, t) = if first.slot == 1 {
            (&stop1, &mut t1)
        } else {
            (&stop2, &mut t2)
        };
        stop.store(true, Ordering::Release);
        drop(t.take().unwrap().join().unwrap());
    }
    let started = Instant::now();
    wait_for("a new leader", || {
        driver.leader().is_some_and(|l| l.slot != first.slot)
    });
    let second = driver.leader().unwrap();
    println!("re-election after the leader resigned: {:?}", started.elapsed());
    assert!(second.term > first.term, "terms grow: {first:?} {second:?}");
    let got: u32 = driver.invoke("who", &1u32, soon()).unwrap();
    assert_eq!(got, second.slot * 100 + 1);
    stop1.store(true, Ordering::Release);
    stop2.store(true, Ordering::Release);
    for t in [t1, t2].into_iter().flatten() {
        t.join().unwrap();
    }
}

#[test]
fn standalone_worker_leads_itself() {
    let _dog = Watchdog::new("standalone-leader", Duration::from_secs(30));
    let mut m = Messenger::standalone().unwrap();
    m.campaign().unwrap();
    m.on_invoke::<u64, u64, String, _>("double", |_, v| Ok(v * 2))
        .unwrap();
    wait_for("leadership", || m.is_leader());
    assert_eq!(m.invoke::<_, u64>("double", &21u64, soon()), Ok(42));
    assert_eq!(
        m.invoke::<_, u64>("nobody", &1u64, soon()),
        Err(CallError::NoHandler)
    );
    let got = Arc::new(AtomicU64::new(0));
    let g = got.clone();
    m.subscribe::<u64, _>("t", soon(), move |_, v| g.store(v, Ordering::Release))
        .unwrap();
    m.publish("t", &5u64, soon()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.load(Ordering::Acquire) != 5 && Instant::now() < deadline {
        m.poll(Duration::from_millis(5)).unwrap();
    }
    assert_eq!(got.load(Ordering::Acquire), 5);
    // The raw-bytes variants (what the C ABI uses).
    m.on_invoke_bytes("rev", |_, b| Ok(b.iter().rev().copied().collect()))
        .unwrap();
    assert_eq!(m.invoke_bytes("rev", b"abc", soon()), Ok(b"cba".to_vec()));
    let raw = Arc::new(Mutex::new(Vec::new()));
    let r = raw.clone();
    m.subscribe_bytes("raw", soon(), move |_, b| r.lock().unwrap().push(b.to_vec()))
        .unwrap();
    m.publish_bytes("raw", b"\x01\x02", soon()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while raw.lock().unwrap().is_empty() && Instant::now() < deadline {
        m.poll(Duration::from_millis(5)).unwrap();
    }
    assert_eq!(*raw.lock().unwrap(), vec![vec![1u8, 2]]);
}

#[test]
fn no_leader_is_an_error_not_a_hang() {
    let _dog = Watchdog::new("no-leader", Duration::from_secs(30));
    // Nobody campaigns for the role: invoke gives up at its deadline.
    let mut m = Messenger::standalone().unwrap();
    let started = Instant::now();
    let r = m.invoke::<_, u64>("x", &1u64, Instant::now() + Duration::from_millis(100));
    assert_eq!(r, Err(CallError::NoLeader));
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn publish_subscribe_late_subscribers_and_restored_subscriptions() {
    let _dog = Watchdog::new("pubsub", Duration::from_secs(60));
    let mut all = Messenger::threads(3).unwrap();
    let received: Arc<Mutex<Vec<(u32, String)>>> = Arc::default();
    // Worker 0 drives and does not campaign: 1 and 2 serve and campaign, so
    // the leader is one of them and can be taken away below.
    for m in &mut all[1..] {
        m.campaign().unwrap();
    }
    let mut driver = all.remove(0);
    wait_for("a leader", || driver.leader().is_some());
    let leader = driver.leader().unwrap();
    assert_ne!(leader.slot, 0);
    let stops: Vec<Arc<AtomicBool>> = (0..2).map(|_| Arc::new(AtomicBool::new(false))).collect();
    let subscribed = Arc::new(AtomicU32::new(0));
    let mut threads: Vec<Option<std::thread::JoinHandle<Messenger>>> = all
        .into_iter()
        .zip(stops.iter().cloned())
        .map(|(mut m, stop)| {
            let (r, me, s) = (received.clone(), m.slot(), subscribed.clone());
            Some(std::thread::spawn(move || {
                if me == 1 {
                    m.subscribe::<String, _>("config", soon(), move |_, v| r.lock().unwrap().push((me, v)))
                        .unwrap();
                }
                s.fetch_add(1, Ordering::AcqRel);
                m.run_until(|_| stop.load(Ordering::Acquire)).unwrap();
                m
            }))
        })
        .collect();
    wait_for("subscriptions", || subscribed.load(Ordering::Acquire) == 2);
    driver.publish("config", &"v1".to_string(), soon()).unwrap();
    wait_for("v1 at worker 1", || {
        received.lock().unwrap().contains(&(1, "v1".into()))
    });
    // A late subscriber gets the last value at once.
    let r = received.clone();
    driver
        .subscribe::<String, _>("config", soon(), move |_, v| r.lock().unwrap().push((0, v)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !received.lock().unwrap().contains(&(0, "v1".into())) {
        assert!(Instant::now() < deadline, "late subscriber never got v1");
        driver.poll(Duration::from_millis(5)).unwrap();
    }
    // The leader goes (if it is a serving thread); the new leader learns the
    // subscriptions from the subscribers and delivers the next value.
    {
        let i = (leader.slot - 1) as usize;
        stops[i].store(true, Ordering::Release);
        drop(threads[i].take().unwrap().join().unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        while driver.leader().is_none_or_old(leader.term) {
            assert!(Instant::now() < deadline, "no new leader");
            driver.poll(Duration::from_millis(5)).unwrap();
        }
        // Give the subscribers' re-subscription a moment to reach the new leader.
        let settle = Instant::now() + Duration::from_millis(100);
        while Instant::now() < settle {
            driver.poll(Duration::from_millis(5)).unwrap();
        }
    }
    driver.publish("config", &"v2".to_string(), soon()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        driver.poll(Duration::from_millis(5)).unwrap();
        let got = received.lock().unwrap().clone();
        // Worker 1 is gone if it was the leader.
        let want_1 = leader.slot == 1 || got.contains(&(1, "v2".into()));
        if got.contains(&(0, "v2".into())) && want_1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "v2 not delivered to every subscriber: {got:?}"
        );
    }
    for (stop, t) in stops.iter().zip(threads.iter_mut()) {
        stop.store(true, Ordering::Release);
        if let Some(t) = t.take() {
            t.join().unwrap();
        }
    }
}

trait OldLeader {
    fn is_none_or_old(&self, term: u64) -> bool;
}

impl OldLeader for Option<shmcluster::Leader> {
    fn is_none_or_old(&self, term: u64) -> bool {
        !matches!(self, Some(l) if l.term > term)
    }
}

/// A subscribe that finds a new leader before any dispatch has seen it
/// (so before the re-subscription of `check_leaders`) must give that
/// leader every subscription, not only its own.
#[test]
fn a_subscribe_to_an_unseen_new_leader_keeps_the_older_subscriptions() {
    let _dog = Watchdog::new("resubscribe", Duration::from_secs(60));
    let mut all = Messenger::threads(3).unwrap();
    for m in &mut all[1..] {
        m.campaign().unwrap();
    }
    let mut driver = all.remove(0);
    let stops: Vec<Arc<AtomicBool>> = (0..2).map(|_| Arc::new(AtomicBool::new(false))).collect();
    let mut threads: Vec<Option<std::thread::JoinHandle<Messenger>>> = all
        .into_iter()
        .zip(stops.iter().cloned())
        .map(|(m, stop)| Some(serve(m, stop)))
        .collect();
    wait_for("a leader", || driver.leader().is_some());
    let first = driver.leader().unwrap();
    let received: Arc<Mutex<Vec<String>>> = Arc::default();
    let r = received.clone();
    driver
        .subscribe::<String, _>("a", soon(), move |_, v| r.lock().unwrap().push(v))
        .unwrap();
    let until_got = |driver: &mut Messenger, want: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !received.lock().unwrap().iter().any(|v| v == want) {
            assert!(
                Instant::now() < deadline,
                "{want} never delivered: {:?}",
                received.lock().unwrap()
            );
            driver.poll(Duration::from_millis(5)).unwrap();
        }
    };
    driver.publish("a", &"x".to_string(), soon()).unwrap();
    until_got(&mut driver, "x");
    // The leader goes; the driver sees the successor without dispatching.
    let i = (first.slot - 1) as usize;
    stops[i].store(true, Ordering::Release);
    drop(threads[i].take().unwrap().join().unwrap());
    wait_for("a new leader", || !driver.leader().is_none_or_old(first.term));
    driver
        .subscribe::<String, _>("b", soon(), |_, _: String| {})
        .unwrap();
    driver.publish("a", &"y".to_string(), soon()).unwrap();
    until_got(&mut driver, "y");
    for (stop, t) in stops.iter().zip(threads.iter_mut()) {
        stop.store(true, Ordering::Release);
        if let Some(t) = t.take() {
            t.join().unwrap();
        }
    }
}
