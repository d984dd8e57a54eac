//! The event-loop driver of the call core (`Messenger::start_*_bytes`,
//! `turn`, `take_finished`, `wake_fd`): calls in flight without blocking,
//! their ends taken later, and the park on the slot's eventfd woken by a
//! sender. Threads mode: two messengers, one served by `run_until` on a
//! thread of its own, one driven here as an event loop would (poll(2) on
//! the eventfd).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shmcluster::{CallError, Finished, Messenger, Turn};

/// Waits for the eventfd (or `ms`), as libuv would; true if it was readable.
fn wait_fd(m: &Messenger, ms: i32) -> bool {
    let fd = m.wake_fd().expect("threads mode has eventfds");
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd on the stack, for the length given.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    if n == 1 {
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into a u64 (the eventfd's count).
        unsafe { libc::read(fd.as_raw_fd(), std::ptr::addr_of_mut!(count).cast(), 8) };
    }
    n == 1
}

/// Turns until every ticket in `want` has finished (or 5 s), parking on
/// the eventfd when idle; returns the ends and how many waits the eventfd
/// ended (not the timer).
fn drive(m: &mut Messenger, want: usize) -> (Vec<(shmcluster::CallTicket, Finished)>, u32) {
    drive_with(m, want, 50)
}

/// [`drive`], each park waiting up to `max_ms` whatever `next_due` says.
fn drive_with(m: &mut Messenger, want: usize, max_ms: i32) -> (Vec<(shmcluster::CallTicket, Finished)>, u32) {
    let (mut ends, mut woken) = (Vec::new(), 0);
    let give_up = Instant::now() + Duration::from_secs(5);
    while ends.len() < want && Instant::now() < give_up {
        match m.turn().expect("no corrupt lane") {
            Turn::Busy => {}
            Turn::Parked => {
                let ms = if max_ms > 50 {
                    max_ms
                } else {
                    m.next_due().map_or(50, |t| {
                        t.saturating_duration_since(Instant::now()).as_millis().min(50) as i32
                    })
                };
                if wait_fd(m, ms) {
                    woken += 1;
                }
                m.unpark();
            }
            Turn::Idle => panic!("threads mode has eventfds: the turn must park"),
        }
        ends.extend(m.take_finished());
    }
    (ends, woken)
}

fn serve(mut m: Messenger, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        m.on_bytes("echo", |_, d| d.to_vec()).unwrap();
        m.on_request("boom", |_, _: ()| Err::<(), _>("kaboom")).unwrap();
        m.on_request("slow", |_, _: ()| {
            std::thread::sleep(Duration::from_millis(20));
            Ok::<_, String>(())
        })
        .unwrap();
        m.run_until(|_| stop.load(Ordering::Relaxed)).unwrap();
    })
}

#[test]
fn calls_in_flight_end_through_turns_and_eventfd_wakes() {
    let mut ms = Messenger::threads(2).unwrap();
    let other = ms.pop().unwrap();
    let mut me = ms.pop().unwrap();
    me.on_bytes("echo", |_, d| d.to_vec()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let server = serve(other, stop.clone());
    let deadline = Instant::now() + Duration::from_secs(5);

    // Many requests in flight at once, none blocking.
    let started = Instant::now();
    let tickets: Vec<_> = (0..500u32)
        .map(|i| {
            me.start_request_bytes(1, "echo", &i.to_le_bytes(), deadline)
                .unwrap()
        })
        .collect();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "starting must not wait for answers"
    );
    let (ends, _) = drive(&mut me, tickets.len());
    assert_eq!(ends.len(), 500);
    for (t, f) in &ends {
        let i = tickets.iter().position(|x| x == t).unwrap() as u32;
        match f {
            Finished::Answer(Ok(v)) => assert_eq!(v, &i.to_le_bytes()),
            other => panic!("request {i}: {other:?}"),
        }
    }

    // An answer that comes while the loop is parked wakes it through the
    // eventfd: each park here waits up to 2 s, so only the eventfd can end
    // it sooner. (The 500 above may all come while the loop is busy.)
    let started = Instant::now();
    me.start_request_bytes(1, "slow", &[0], deadline).unwrap();
    let (ends, woken) = drive_with(&mut me, 1, 2000);
    assert!(matches!(ends[0].1, Finished::Answer(Ok(_))), "{:?}", ends[0].1);
    assert!(
        woken > 0,
        "the answer must wake the parked loop through the eventfd"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // Map over both (this worker answers itself in its turn), consume,
    // and the errors of a call as its end.
    let map = me.start_map_bytes("echo", b"m", deadline).unwrap();
    let consume = me.start_consume_bytes("echo", b"c", deadline).unwrap();
    let boom = me.start_request_bytes(1, "boom", &[], deadline).unwrap();
    let nobody = me.start_request_bytes(9, "echo", b"x", deadline).unwrap();
    let (ends, _) = drive(&mut me, 4);
    let end = |t| &ends.iter().find(|(x, _)| *x == t).expect("ended").1;
    match end(map) {
        Finished::Map(e) => {
            assert_eq!(e.iter().map(|(w, _)| w.slot).collect::<Vec<_>>(), [0, 1]);
            assert!(e.iter().all(|(_, r)| r.as_deref() == Ok(&b"m"[..])), "{e:?}");
        }
        other => panic!("map: {other:?}"),
    }
    assert!(
        matches!(end(consume), Finished::Consumed(Ok(c)) if c.attempts == 1),
        "{:?}",
        end(consume)
    );
    assert!(
        matches!(end(boom), Finished::Answer(Err(CallError::HandlerFailed(m))) if m == "kaboom"),
        "{:?}",
        end(boom)
    );
    assert!(
        matches!(
            end(nobody),
            Finished::Answer(Err(CallError::NoSuchWorker { slot: 9 }))
        ),
        "{:?}",
        end(nobody)
    );

    // A deadline ends a call whose answer never comes.
    let slow = me
        .start_request_bytes(
            0,
            "nobody-answers",
            &[],
            Instant::now() + Duration::from_millis(50),
        )
        .unwrap();
    let (ends, _) = drive(&mut me, 1);
    assert_eq!(ends[0].0, slow);
    assert!(matches!(
        ends[0].1,
        Finished::Answer(Err(CallError::NoHandler | CallError::TimedOut))
    ));

    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
}

#[test]
fn known_errors_come_at_once() {
    let mut m = Messenger::standalone().unwrap();
    let far = Instant::now() + Duration::from_secs(1);
    assert!(matches!(
        m.start_request_bytes(0, &"e".repeat(300), b"", far),
        Err(CallError::EventName { .. })
    ));
    let big = vec![0u8; m.max_payload() + 1];
    assert!(matches!(
        m.start_map_bytes("x", &big, far),
        Err(CallError::TooLarge { .. })
    ));
    assert!(m.take_finished().is_empty());
}

#[test]
fn without_the_eventfd_an_idle_waiter_thread_is_woken_by_answers() {
    let mut ms = Messenger::threads(2).unwrap();
    let other = ms.pop().unwrap();
    let mut me = ms.pop().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let server = serve(other, stop.clone());
    let waiter = me.idle_waiter();
    let deadline = Instant::now() + Duration::from_secs(5);
    // Each park lasts up to 2 s unless a doorbell ends it: the waiter
    // parks on another thread, as the Node binding's does.
    let run = |me: &mut Messenger, want: usize| {
        let mut ends = Vec::new();
        while ends.len() < want && Instant::now() < deadline {
            match me.turn_idle().unwrap() {
                Turn::Busy => {}
                Turn::Idle => {
                    let w = waiter.clone();
                    std::thread::spawn(move || w.wait(Duration::from_secs(2)))
                        .join()
                        .unwrap();
                }
                Turn::Parked => panic!("turn_idle never parks on the eventfd"),
            }
            ends.extend(me.take_finished());
        }
        ends
    };
    let tickets: Vec<_> = (0..200u32)
        .map(|i| {
            me.start_request_bytes(1, "echo", &i.to_le_bytes(), deadline)
                .unwrap()
        })
        .collect();
    let ends = run(&mut me, tickets.len());
    assert_eq!(ends.len(), 200);
    assert!(ends.iter().all(|(_, f)| matches!(f, Finished::Answer(Ok(_)))));
    // An answer 20 ms late finds the loop idle and the waiter parked.
    let started = Instant::now();
    me.start_request_bytes(1, "slow", &[0], deadline).unwrap();
    let ends = run(&mut me, 1);
    assert!(matches!(ends[0].1, Finished::Answer(Ok(_))), "{:?}", ends[0].1);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the answer must end the waiter's park: {:?}",
        started.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
}

/// Turns `m` (parking on the eventfd) until `done` says so or 10 s pass,
/// collecting the ends of started calls.
fn drive_until(
    m: &mut Messenger,
    ends: &mut Vec<(shmcluster::CallTicket, Finished)>,
    mut done: impl FnMut(&Messenger, &[(shmcluster::CallTicket, Finished)]) -> bool,
) -> bool {
    let give_up = Instant::now() + Duration::from_secs(10);
    while !done(m, ends) {
        if Instant::now() >= give_up {
            return false;
        }
        match m.turn().expect("no corrupt lane") {
            Turn::Busy => {}
            Turn::Parked => {
                let ms = m.next_due().map_or(20, |t| {
                    t.saturating_duration_since(Instant::now()).as_millis().min(20) as i32
                });
                wait_fd(m, ms);
                m.unpark();
            }
            Turn::Idle => panic!("threads mode has eventfds: the turn must park"),
        }
        ends.extend(m.take_finished());
    }
    true
}

fn ended(ends: &[(shmcluster::CallTicket, Finished)], t: shmcluster::CallTicket) -> Option<&Finished> {
    ends.iter().find(|(x, _)| *x == t).map(|(_, f)| f)
}

/// What a subscriber got, per topic.
type Got = Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

fn subscriber(got: &Got, topic: &str) -> impl FnMut(&shmcluster::Ctx, &[u8]) + Send + 'static {
    let (got, topic) = (got.clone(), topic.to_owned());
    move |_, b| got.lock().unwrap().push((topic.clone(), b.to_vec()))
}

#[test]
fn invoke_publish_and_subscribe_through_the_leader_without_blocking() {
    let _dog = shmcluster::testing::Watchdog::new("polled-leader", Duration::from_secs(60));
    let mut ms = Messenger::threads(2).unwrap();
    let mut other = ms.pop().unwrap();
    let mut me = ms.pop().unwrap();
    let got: Got = Arc::default();

    // Subscribed before anyone campaigns: nobody to tell yet, and nothing
    // waits; the turn that first sees the leader tells it.
    assert!(!me.subscribe_polled_bytes("cfg", subscriber(&got, "cfg")).unwrap());
    // The invoke starts before there is a leader too: the core waits.
    let far = Instant::now() + Duration::from_secs(10);
    let early = me.start_invoke_bytes("who", b"early", far).unwrap();

    // Worker 1 leads (it alone campaigns), its invoke handler answered
    // later through a `BytesReply`; `hold` keeps the replies of `hang`.
    let hold: Arc<std::sync::Mutex<Vec<shmcluster::BytesReply>>> = Arc::default();
    let h = hold.clone();
    other.campaign().unwrap();
    other
        .on_invoke_async_bytes("who", |ctx, data, reply| {
            let mut v = format!("{}:", ctx.sender().slot).into_bytes();
            v.extend_from_slice(data);
            reply.send(Ok(v));
        })
        .unwrap();
    other
        .on_invoke_async_bytes("hang", move |_, _, reply| h.lock().unwrap().push(reply))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            other.run_until(|_| stop.load(Ordering::Relaxed)).unwrap();
            other
        })
    };

    let mut ends = Vec::new();
    assert!(
        drive_until(&mut me, &mut ends, |_, e| ended(e, early).is_some()),
        "the invoke never ended"
    );
    match ended(&ends, early).unwrap() {
        Finished::Answer(Ok(v)) => assert_eq!(v, b"0:early", "the leader's handler ran"),
        other => panic!("invoke: {other:?}"),
    }
    let leader = me.leader().expect("a leader");
    assert_eq!(leader.slot, 1);
    assert!(!me.is_leader());
    // `me` registers the handler too (which makes it a candidate): only
    // the leader's runs.
    me.on_invoke_bytes("who", |_, _| Ok(b"not the leader's".to_vec()))
        .unwrap();
    let second = me.start_invoke_bytes("who", b"again", far).unwrap();
    assert!(drive_until(&mut me, &mut ends, |_, e| ended(e, second).is_some()));
    assert!(
        matches!(ended(&ends, second), Some(Finished::Answer(Ok(v))) if v == b"0:again"),
        "{:?}",
        ended(&ends, second)
    );

    // Publish: the first leader was told the early subscription.
    let p1 = me.start_publish_bytes("cfg", b"v1", far).unwrap();
    assert!(
        drive_until(&mut me, &mut ends, |_, e| ended(e, p1).is_some()
            && got.lock().unwrap().len() == 1),
        "publish or delivery never came: {:?}",
        got.lock().unwrap()
    );
    assert!(matches!(ended(&ends, p1), Some(Finished::Answer(Ok(v))) if v.is_empty()));
    assert_eq!(*got.lock().unwrap(), [("cfg".to_string(), b"v1".to_vec())]);

    // A late subscriber gets the topic's last value at once (the leader is
    // known: it is told now).
    let p2 = me.start_publish_bytes("late", b"last", far).unwrap();
    assert!(drive_until(&mut me, &mut ends, |_, e| ended(e, p2).is_some()));
    assert!(me
        .subscribe_polled_bytes("late", subscriber(&got, "late"))
        .unwrap());
    assert!(
        drive_until(&mut me, &mut ends, |_, _| got.lock().unwrap().len() == 2),
        "the late subscriber never got the last value"
    );
    assert_eq!(got.lock().unwrap()[1], ("late".to_string(), b"last".to_vec()));

    // The leader goes with an invoke in hand: `LeaderDied`, not a hang.
    // `me`, the other candidate, leads next; its turns tell itself, the
    // new leader, its subscriptions.
    let hang = me.start_invoke_bytes("hang", b"", far).unwrap();
    assert!(drive_until(&mut me, &mut ends, |_, _| hold.lock().unwrap().len() == 1));
    stop.store(true, Ordering::Relaxed);
    drop(server.join().unwrap());
    assert!(
        drive_until(&mut me, &mut ends, |_, e| ended(e, hang).is_some()),
        "the invoke to the gone leader never ended"
    );
    assert!(
        matches!(
            ended(&ends, hang),
            Some(Finished::Answer(Err(CallError::LeaderDied)))
        ),
        "{:?}",
        ended(&ends, hang)
    );
    hold.lock().unwrap().clear();
    assert!(drive_until(&mut me, &mut ends, |m, _| m.is_leader()));
    let p3 = me.start_publish_bytes("cfg", b"v2", far).unwrap();
    assert!(
        drive_until(&mut me, &mut ends, |_, e| ended(e, p3).is_some()
            && got.lock().unwrap().len() == 3),
        "the new leader was not told the subscription: {:?}",
        got.lock().unwrap()
    );
    assert_eq!(got.lock().unwrap()[2], ("cfg".to_string(), b"v2".to_vec()));
    let again = me.start_invoke_bytes("who", b"x", far).unwrap();
    assert!(drive_until(&mut me, &mut ends, |_, e| ended(e, again).is_some()));
    match ended(&ends, again).unwrap() {
        Finished::Answer(Ok(v)) => assert_eq!(v, b"not the leader's", "now its own handler leads"),
        other => panic!("invoke on the new leader: {other:?}"),
    }
}

#[test]
fn without_a_leader_invoke_and_publish_end_no_leader_at_the_deadline() {
    let _dog = shmcluster::testing::Watchdog::new("polled-no-leader", Duration::from_secs(30));
    let mut m = Messenger::standalone().unwrap();
    let got: Got = Arc::default();
    // Nobody campaigns: nothing waits, and the calls end at their deadline.
    assert!(!m.subscribe_polled_bytes("t", subscriber(&got, "t")).unwrap());
    let started = Instant::now();
    let soon = started + Duration::from_millis(100);
    let invoke = m.start_invoke_bytes("x", b"1", soon).unwrap();
    let idem = m.start_invoke_idempotent_bytes("x", b"1", soon).unwrap();
    let publish = m.start_publish_bytes("t", b"v", soon).unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(50),
        "starting must not wait"
    );
    let mut ends = Vec::new();
    assert!(drive_until(&mut m, &mut ends, |_, e| e.len() == 3));
    for t in [invoke, idem, publish] {
        assert!(
            matches!(ended(&ends, t), Some(Finished::Answer(Err(CallError::NoLeader)))),
            "{:?}",
            ended(&ends, t)
        );
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert!(got.lock().unwrap().is_empty());
    // Known at once.
    let big = vec![0u8; m.max_payload() + 1];
    assert!(matches!(
        m.start_invoke_bytes("x", &big, soon),
        Err(CallError::TooLarge { .. })
    ));
    assert!(matches!(
        m.start_publish_bytes("t", &big, soon),
        Err(CallError::TooLarge { .. })
    ));
    // A leader at last (this worker): the subscription made before is told
    // to it by a turn, and its publish comes back to it.
    m.campaign().unwrap();
    let publish = m
        .start_publish_bytes("t", b"late", Instant::now() + Duration::from_secs(10))
        .unwrap();
    assert!(
        drive_until(&mut m, &mut ends, |_, e| ended(e, publish).is_some()
            && !got.lock().unwrap().is_empty()),
        "{:?}",
        got.lock().unwrap()
    );
    assert_eq!(*got.lock().unwrap(), [("t".to_string(), b"late".to_vec())]);
}
