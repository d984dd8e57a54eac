//! Liveness that pid reuse cannot fool (issue 12, item 5): a dead worker's
//! records are planted with the pid of a live, unrelated process, as
//! happens once `pid_max` wraps, and the slot, the messenger without a
//! master and the leader must still see the worker dead. Before, each of
//! them asked `kill(pid, 0)` and saw it alive for ever.

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering::*;
use std::time::{Duration, Instant};

use crate::testing::{fork, ExitStatus, Watchdog};
use crate::{Config, Messenger, Segment};

/// A live process that has nothing to do with the segment.
struct Unrelated(std::process::Child);

impl Unrelated {
    fn start() -> Self {
        Self(
            Command::new("sleep")
                .arg("60")
                .stdin(Stdio::null())
                .spawn()
                .expect("sleep"),
        )
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Unrelated {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Forks a child that runs `f` with the segment and dies without cleaning
/// up (its endpoint and messenger are leaked, as a SIGKILL would leave
/// them); waits for it to be gone.
fn dead_worker(dog: &Watchdog, f: impl FnOnce() -> i32) {
    // SAFETY: every `f` here only sets up endpoints or messengers in the
    // segment and leaks them; none prints or takes a lock another thread of
    // the test process may hold.
    let child = dog.track(unsafe { fork(f) }.expect("fork"));
    assert_eq!(
        child.wait_timeout(Duration::from_secs(20)).expect("wait"),
        Some(ExitStatus::Code(0)),
        "the worker's set-up failed"
    );
}

#[test]
fn a_dead_slot_holder_is_dead_whoever_has_its_pid_now() {
    let dog = Watchdog::new("dead slot holder", Duration::from_secs(30));
    let segment = Segment::create(&Config::new(3)).unwrap();
    let s = segment.clone();
    dead_worker(&dog, move || match s.endpoint(1) {
        Ok(ep) => {
            std::mem::forget(ep);
            0
        }
        Err(_) => 1,
    });
    let generation = segment.slot(1).generation.load(Acquire);
    let other = Unrelated::start();
    segment.slot(1).owner.store(other.pid(), Release);
    // The messenger without a master: slot 1 is not live.
    let m0 = Messenger::from_endpoint(segment.endpoint(0).unwrap());
    assert_eq!(
        m0.live_workers().iter().map(|w| w.slot).collect::<Vec<_>>(),
        [0],
        "a dead holder with a reused pid counts as live"
    );
    // The slot is taken over, not SlotBusy.
    let ep = segment
        .endpoint(1)
        .expect("a dead holder's slot must be taken over");
    assert_eq!(ep.generation(), generation.wrapping_add(1));
    assert_eq!(
        m0.live_workers().iter().map(|w| w.slot).collect::<Vec<_>>(),
        [0, 1]
    );
    // And a live holder keeps it, in another process or in this one.
    assert!(matches!(
        segment.endpoint(1),
        Err(crate::EndpointError::SlotBusy { slot: 1, .. })
    ));
    drop(ep);
    assert!(segment.endpoint(1).is_ok(), "a dropped endpoint frees its slot");
}

#[test]
fn a_dead_leader_is_no_leader_whoever_has_its_pid_now() {
    let dog = Watchdog::new("dead leader", Duration::from_secs(30));
    let segment = Segment::create(&Config::new(3)).unwrap();
    let s = segment.clone();
    dead_worker(&dog, move || {
        let Ok(ep) = s.endpoint(2) else { return 1 };
        let mut m = Messenger::from_endpoint(ep);
        if m.campaign().is_err() {
            return 2;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !m.is_leader() {
            if Instant::now() > deadline {
                return 3;
            }
            let _ = m.poll(Duration::from_millis(1));
        }
        std::mem::forget(m);
        0
    });
    let m0 = Messenger::from_endpoint(segment.endpoint(0).unwrap());
    let entry = crate::messenger::leader_entry(&segment).expect("the leader's lock was named");
    let other = Unrelated::start();
    segment.lock_entry(entry).holder_pid.store(other.pid(), Release);
    assert_eq!(
        m0.leader(),
        None,
        "a dead leader with a reused pid counts as leading"
    );
}

/// This process plays the master of `segment`: its table says slot 1 (an
/// endpoint that never answers, returned with its generation) is ready.
/// Returns slot 0's messenger, which looks at its calls' targets only
/// every hour: only the master's count of a death can end a wait.
fn master_with_silent_slot_1(segment: &Segment) -> (Messenger, crate::Endpoint, u32) {
    let target = segment.endpoint(1).unwrap();
    let generation = target.generation();
    segment.control().master_pid.store(crate::sys::getpid(), Release);
    let entry = segment.worker_entry(1);
    entry.generation.store(generation, Release);
    entry.state.store(crate::WorkerState::Ready.to_raw(), Release);
    let mut m0 = Messenger::from_endpoint(segment.endpoint(0).unwrap());
    m0.set_liveness_slice(Duration::from_secs(3600));
    (m0, target, generation)
}

/// As the master, after `delay`: marks slot 1 dead and counts the death
/// (with `successor`, that slot's worker is made ready first).
fn reap_slot_1(segment: &Segment, generation: u32, successor: Option<u32>) -> std::thread::JoinHandle<()> {
    let segment = segment.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        if let Some(slot) = successor {
            segment
                .worker_entry(slot)
                .state
                .store(crate::WorkerState::Ready.to_raw(), Release);
        }
        segment
            .worker_entry(1)
            .state
            .store(crate::WorkerState::Dead.to_raw(), Release);
        segment.reset_dead_slot(1, generation);
    })
}

/// Issue 12, item 6: a call to a worker the master reaps is settled when
/// the master marks it dead, not at the caller's next periodic look (5 ms
/// in production; an hour here, so only the master's count can end the
/// wait before the watchdog does).
#[test]
fn a_call_to_a_reaped_worker_ends_when_the_master_counts_the_death() {
    let _dog = Watchdog::new("death observed at once", Duration::from_secs(20));
    let segment = Segment::create(&Config::new(2)).unwrap();
    // This process plays the master: its table says slot 1 is ready.
    // The target never answers; then the master reaps it.
    let (mut m0, target, generation) = master_with_silent_slot_1(&segment);
    let reaper = reap_slot_1(&segment, generation, None);
    let hour = Instant::now() + Duration::from_secs(3600);
    assert_eq!(
        m0.request_bytes(1, "anything", b"", hour),
        Err(crate::CallError::WorkerDied)
    );
    reaper.join().unwrap();
    drop(target);
}

/// A consume whose worker the master reaps goes to the next worker at
/// once: the redelivery the death queues in the call core is sent before
/// the caller waits again (with the periodic look an hour away, a
/// redelivery left queued would wait for it, and the watchdog fails the
/// test).
#[test]
fn a_consume_whose_worker_is_reaped_is_redelivered_at_once() {
    let _dog = Watchdog::new("redelivery at once", Duration::from_secs(20));
    let segment = Segment::create(&Config::new(3)).unwrap();
    // Slot 2 serves `task`, but is not live until slot 1 dies.
    let mut m2 = Messenger::from_endpoint(segment.endpoint(2).unwrap());
    m2.on_bytes("task", |_, _| b"done".to_vec()).unwrap();
    let entry2 = segment.worker_entry(2);
    entry2.state.store(crate::WorkerState::Dead.to_raw(), Release);
    let (mut m0, target, generation) = master_with_silent_slot_1(&segment);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                m2.poll(Duration::from_millis(10)).unwrap();
            }
        })
    };
    // A successor is ready before the death is counted.
    let reaper = reap_slot_1(&segment, generation, Some(2));
    let hour = Instant::now() + Duration::from_secs(3600);
    let done = m0.consume_bytes("task", b"", hour).unwrap();
    assert_eq!(done.worker.slot, 2, "{done:?}");
    assert!(done.attempts >= 2, "redelivered: {done:?}");
    reaper.join().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Release);
    server.join().unwrap();
    drop(target);
}

/// Issue 12, item 6: an `invoke` waiting on a leader that dies in office
/// fails at once — the kernel hands the leader's lock to the next candidate
/// as the leader exits, well before a master reaps it — so the caller can
/// ask the new leader. Here no master ever reaps (the table keeps saying
/// the dead leader is ready) and the periodic look is an hour away: only
/// the lock's handover can end the call before the watchdog.
#[test]
fn an_invoke_to_a_leader_that_dies_ends_when_its_lock_changes_hands() {
    let dog = Watchdog::new("leader death observed at once", Duration::from_secs(30));
    let segment = Segment::create(&Config::new(3)).unwrap();
    let mut m0 = Messenger::from_endpoint(segment.endpoint(0).unwrap());
    m0.set_liveness_slice(Duration::from_secs(3600));
    // Slot 1 leads and then never dispatches: a call to it never returns.
    let s = segment.clone();
    // SAFETY: the child only uses a messenger on its own endpoint, sleeps
    // and prints nothing: no lock another thread may hold.
    let leader = dog.track(
        unsafe {
            fork(move || {
                let Ok(ep) = s.endpoint(1) else { return 1 };
                let mut m = Messenger::from_endpoint(ep);
                if m.on_invoke::<u32, u32, String, _>("echo", |_, v| Ok(v)).is_err() || m.campaign().is_err()
                {
                    return 2;
                }
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
        }
        .unwrap(),
    );
    let until = Instant::now() + Duration::from_secs(10);
    while m0.leader().map(|l| l.slot) != Some(1) {
        assert!(Instant::now() < until, "slot 1 never led");
        m0.poll(Duration::from_millis(1)).unwrap();
    }
    // Slot 2 waits for the lock, serving.
    let s = segment.clone();
    // SAFETY: the child only uses a messenger on its own endpoint and
    // prints nothing: no lock another thread may hold.
    let candidate = dog.track(
        unsafe {
            fork(move || {
                let Ok(ep) = s.endpoint(2) else { return 1 };
                let mut m = Messenger::from_endpoint(ep);
                if m.on_invoke::<u32, u32, String, _>("echo", |_, v| Ok(v)).is_err() || m.campaign().is_err()
                {
                    return 2;
                }
                let _ = m.run_until(|_| false);
                3
            })
        }
        .unwrap(),
    );
    while !segment.slot_held(2) {
        assert!(Instant::now() < until, "slot 2 never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    // This process plays a master that never reaps: its table says every
    // slot is ready, the dead leader's too.
    for slot in 0..3 {
        let entry = segment.worker_entry(slot);
        entry
            .generation
            .store(segment.slot(slot).generation.load(Acquire), Release);
        entry.state.store(crate::WorkerState::Ready.to_raw(), Release);
    }
    segment.control().master_pid.store(crate::sys::getpid(), Release);
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        leader.kill().unwrap();
        leader.wait_timeout(Duration::from_secs(10)).unwrap();
    });
    let hour = Instant::now() + Duration::from_secs(3600);
    assert_eq!(
        m0.invoke::<_, u32>("echo", &7u32, hour),
        Err(crate::CallError::LeaderDied)
    );
    killer.join().unwrap();
    assert_eq!(
        m0.invoke::<_, u32>("echo", &8u32, hour),
        Ok(8),
        "the new leader answers"
    );
    assert_eq!(m0.leader().map(|l| l.slot), Some(2));
    candidate.kill().unwrap();
    candidate.wait_timeout(Duration::from_secs(10)).unwrap();
}

/// Forks a worker in slot 1 that streams a message to slot 0 far larger
/// than the lane (nobody reads slot 0, so it blocks half way) and SIGKILLs
/// it there; returns its generation.
fn killed_mid_stream(dog: &Watchdog, segment: &Segment) -> u32 {
    let s = segment.clone();
    // SAFETY: the child only sends on its own endpoint and prints nothing:
    // no lock another thread may hold.
    let sender = dog.track(
        unsafe {
            fork(move || {
                let Ok(mut ep) = s.endpoint(1) else { return 1 };
                let _ = ep.send(0, vec![7u8; 64 * 1024]);
                2
            })
        }
        .unwrap(),
    );
    let until = Instant::now() + Duration::from_secs(10);
    while segment.lane(1, 0).depth() == 0 {
        assert!(Instant::now() < until, "the sender never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    let generation = segment.slot(1).generation.load(Acquire);
    sender.kill().unwrap();
    sender.wait_timeout(Duration::from_secs(10)).unwrap();
    generation
}

/// Issue 12, item 4 at its root: the master's clean-up after a death writes
/// an `ABORT` only into a lane where the dead worker was half way through a
/// fragmented message — its receiver drops the part it has — and nowhere
/// else (it used to write one into every outbound lane on every death, so
/// lanes to slots nobody reads filled with them and `stat` showed bytes
/// waiting for a slot that never had a worker).
#[test]
fn a_dead_workers_partial_message_is_dropped_and_no_other_lane_gets_junk() {
    let dog = Watchdog::new("abort only where needed", Duration::from_secs(30));
    let segment = Segment::create(&Config::new(3).lane_capacity(4096)).unwrap();
    let generation = killed_mid_stream(&dog, &segment);
    segment.reset_dead_slot(1, generation);
    assert_eq!(
        segment.lane(1, 2).depth(),
        0,
        "a lane it was not streaming on got a record"
    );
    let mut ep0 = segment.endpoint(0).unwrap();
    assert!(matches!(ep0.try_recv(), Err(crate::TryRecvError::Empty)));
    assert_eq!(
        ep0.discarded_fragments(),
        1,
        "the partial message was not dropped"
    );
    assert_eq!(segment.lane(1, 0).depth(), 0);
    // The same without a master: the slot's next holder cleans up.
    killed_mid_stream(&dog, &segment);
    let _successor = segment.endpoint(1).unwrap();
    assert_eq!(segment.lane(1, 2).depth(), 0);
    assert!(matches!(ep0.try_recv(), Err(crate::TryRecvError::Empty)));
    assert_eq!(
        ep0.discarded_fragments(),
        2,
        "the successor did not drop the partial message"
    );
}
