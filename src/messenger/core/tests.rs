//! The call core's unit tests: a fake cluster and a fake clock drive
//! every race the multi-process tests found.

use super::*;
use crate::messenger::Leader;
use std::cell::RefCell;

/// A cluster of `workers` slots whose liveness, loads and leader the
/// test sets.
struct Fake {
    live: RefCell<Vec<Option<u32>>>,
    load: RefCell<Vec<u64>>,
    /// Slots parked on their futex.
    parked: RefCell<Vec<bool>>,
    /// Slots running a consume's handler.
    busy: RefCell<Vec<bool>>,
    leader: RefCell<Option<(Leader, Option<LeaderWatch>)>>,
    dead_terms: RefCell<Vec<u64>>,
    /// The host's bridge, a slot that `live_workers` leaves out.
    bridge: RefCell<Option<u32>>,
}

impl Fake {
    fn new(workers: u32) -> Self {
        Self {
            live: RefCell::new((0..workers).map(|_| Some(1)).collect()),
            load: RefCell::new(vec![0; workers as usize]),
            parked: RefCell::new(vec![false; workers as usize]),
            busy: RefCell::new(vec![false; workers as usize]),
            leader: RefCell::new(None),
            dead_terms: RefCell::new(Vec::new()),
            bridge: RefCell::new(None),
        }
    }
    fn kill(&self, slot: u32) {
        self.live.borrow_mut()[slot as usize] = None;
    }
    fn respawn(&self, slot: u32, generation: u32) {
        self.live.borrow_mut()[slot as usize] = Some(generation);
    }
}

impl Peers for Fake {
    fn workers(&self) -> u32 {
        self.live.borrow().len() as u32
    }
    fn live_generation(&self, slot: u32) -> Option<u32> {
        self.live.borrow().get(slot as usize).copied().flatten()
    }
    fn standing(&self, slot: u32) -> Standing {
        Standing {
            draining: false,
            running: !self.parked.borrow()[slot as usize],
        }
    }
    fn backlog(&self, slot: u32) -> Backlog {
        Backlog {
            queued: self.load.borrow()[slot as usize],
            busy: self.busy.borrow()[slot as usize],
        }
    }
    fn leader(&self) -> Option<(Leader, Option<LeaderWatch>)> {
        *self.leader.borrow()
    }
    fn leader_died(&self, watch: &LeaderWatch) -> bool {
        self.dead_terms.borrow().contains(&watch.term())
    }
    fn live_workers(&self) -> Vec<WorkerId> {
        let bridge = *self.bridge.borrow();
        (0..self.workers())
            .filter(|&s| Some(s) != bridge)
            .filter_map(|s| self.live_generation(s).map(|g| w(s, g)))
            .collect()
    }
    fn bridge(&self) -> Option<WorkerId> {
        let b = (*self.bridge.borrow())?;
        self.live_generation(b).map(|g| w(b, g))
    }
}

fn w(slot: u32, generation: u32) -> WorkerId {
    WorkerId::local(slot, generation)
}

fn setup(workers: u32) -> (CallCore, Fake, Instant) {
    (CallCore::new(0), Fake::new(workers), Instant::now())
}

fn sent(core: &mut CallCore) -> Vec<Transmit> {
    std::iter::from_fn(|| core.poll_transmit()).collect()
}

#[test]
fn a_request_is_answered_by_its_target_only() {
    let (mut core, peers, t0) = setup(3);
    let op = core.start(
        Op::Request {
            to: 2,
            bytes: b"x".to_vec(),
        },
        t0 + Duration::from_secs(1),
        t0,
        &peers,
    );
    let out = sent(&mut core);
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].to, out[0].tag.kind, out[0].bytes.as_slice()),
        (2, wire::REQUEST, &b"x"[..])
    );
    let call = out[0].tag.correlation;
    // From another slot, and from a successor generation of the target:
    // neither is the worker the call went to.
    core.handle_reply(w(1, 1), call, wire::OK, b"wrong", &peers);
    core.handle_reply(w(2, 2), call, wire::OK, b"successor", &peers);
    assert!(core.poll_settled().is_none());
    core.handle_reply(w(2, 1), call, wire::OK, b"right", &peers);
    assert_eq!(
        core.poll_settled(),
        Some((op, Settled::Answer(Ok(b"right".to_vec()))))
    );
    // A second (late) answer changes nothing.
    core.handle_reply(w(2, 1), call, wire::OK, b"again", &peers);
    assert!(core.poll_settled().is_none());
    assert!(!core.busy());
}

#[test]
fn a_request_to_no_such_slot_or_a_dead_one_settles_at_once() {
    let (mut core, peers, t0) = setup(2);
    peers.kill(1);
    let a = core.start(Op::Request { to: 7, bytes: vec![] }, t0, t0, &peers);
    let b = core.start(Op::Request { to: 1, bytes: vec![] }, t0, t0, &peers);
    assert!(sent(&mut core).is_empty());
    assert_eq!(
        core.poll_settled(),
        Some((a, Settled::Answer(Err(CallError::NoSuchWorker { slot: 7 }))))
    );
    assert_eq!(
        core.poll_settled(),
        Some((b, Settled::Answer(Err(CallError::WorkerDied))))
    );
}

#[test]
fn a_target_that_dies_ends_its_call_before_the_deadline() {
    let (mut core, peers, t0) = setup(2);
    let op = core.start(
        Op::Request { to: 1, bytes: vec![] },
        t0 + Duration::from_secs(60),
        t0,
        &peers,
    );
    let call = sent(&mut core)[0].tag.correlation;
    core.handle_deaths(t0, &peers);
    assert!(core.poll_settled().is_none(), "alive: nothing ends");
    // Respawned: the slot is live, but not with the worker asked.
    peers.respawn(1, 2);
    core.handle_deaths(t0, &peers);
    assert_eq!(
        core.poll_settled(),
        Some((op, Settled::Answer(Err(CallError::WorkerDied))))
    );
    // The successor's answer to the copy it found queued is dropped.
    core.handle_reply(w(1, 2), call, wire::OK, b"", &peers);
    assert!(core.poll_settled().is_none());
}

#[test]
fn the_deadline_ends_a_request_and_a_late_answer_is_dropped() {
    let (mut core, peers, t0) = setup(2);
    let deadline = t0 + Duration::from_millis(10);
    let op = core.start(Op::Request { to: 1, bytes: vec![] }, deadline, t0, &peers);
    let call = sent(&mut core)[0].tag.correlation;
    assert_eq!(core.next_timeout(), Some(deadline));
    core.handle_timeout(deadline - Duration::from_millis(1), &peers);
    assert!(core.poll_settled().is_none());
    core.handle_timeout(deadline, &peers);
    assert_eq!(
        core.poll_settled(),
        Some((op, Settled::Answer(Err(CallError::TimedOut))))
    );
    core.handle_reply(w(1, 1), call, wire::OK, b"late", &peers);
    assert!(core.poll_settled().is_none());
    assert_eq!(core.next_timeout(), None);
}

#[test]
fn statuses_map_to_errors() {
    let (mut core, peers, t0) = setup(2);
    let far = t0 + Duration::from_secs(1);
    let a = core.start(Op::Request { to: 1, bytes: vec![] }, far, t0, &peers);
    let b = core.start(Op::Request { to: 1, bytes: vec![] }, far, t0, &peers);
    let out = sent(&mut core);
    core.handle_reply(w(1, 1), out[0].tag.correlation, wire::NO_HANDLER, b"", &peers);
    core.handle_reply(w(1, 1), out[1].tag.correlation, wire::FAILED, b"boom", &peers);
    assert_eq!(
        core.poll_settled(),
        Some((a, Settled::Answer(Err(CallError::NoHandler))))
    );
    assert_eq!(
        core.poll_settled(),
        Some((b, Settled::Answer(Err(CallError::HandlerFailed("boom".into())))))
    );
}

#[test]
fn a_send_failure_ends_the_call_with_it() {
    let (mut core, peers, t0) = setup(2);
    let op = core.start(
        Op::Request { to: 1, bytes: vec![] },
        t0 + Duration::from_secs(1),
        t0,
        &peers,
    );
    let call = sent(&mut core)[0].call;
    core.send_failed(call, CallError::TooLarge { len: 9, max: 8 }, t0, &peers);
    assert_eq!(
        core.poll_settled(),
        Some((op, Settled::Answer(Err(CallError::TooLarge { len: 9, max: 8 }))))
    );
}

#[test]
fn a_map_settles_each_entry_as_soon_as_it_is_known() {
    let (mut core, peers, t0) = setup(4);
    peers.kill(3);
    let deadline = t0 + Duration::from_secs(1);
    let op = core.start(Op::Map { bytes: b"m".to_vec() }, deadline, t0, &peers);
    let out = sent(&mut core);
    assert_eq!(
        out.iter().map(|t| t.to).collect::<Vec<_>>(),
        [0, 1, 2],
        "live workers, the caller included"
    );
    core.handle_reply(w(0, 1), out[0].tag.correlation, wire::OK, b"a", &peers);
    core.handle_reply(w(2, 1), out[2].tag.correlation, wire::NO_HANDLER, b"", &peers);
    assert!(core.poll_settled().is_none(), "one entry still open");
    peers.kill(1);
    core.handle_deaths(t0, &peers);
    let Some((id, Settled::Map(entries))) = core.poll_settled() else {
        panic!("map not settled")
    };
    assert_eq!(id, op);
    assert_eq!(
        entries,
        vec![
            (w(0, 1), Ok(b"a".to_vec())),
            (w(1, 1), Err(MapError::WorkerDied)),
            (w(2, 1), Err(MapError::NoHandler)),
        ]
    );
}

#[test]
fn a_map_past_its_deadline_times_out_the_silent_entries_only() {
    let (mut core, peers, t0) = setup(2);
    let deadline = t0 + Duration::from_millis(5);
    core.start(Op::Map { bytes: vec![] }, deadline, t0, &peers);
    let out = sent(&mut core);
    core.handle_reply(w(1, 1), out[1].tag.correlation, wire::OK, b"b", &peers);
    core.handle_timeout(deadline, &peers);
    let Some((_, Settled::Map(entries))) = core.poll_settled() else {
        panic!("map not settled")
    };
    assert_eq!(
        entries,
        vec![(w(0, 1), Err(MapError::TimedOut)), (w(1, 1), Ok(b"b".to_vec()))]
    );
}

#[test]
fn a_map_of_nobody_settles_empty() {
    let (mut core, peers, t0) = setup(1);
    peers.kill(0);
    let op = core.start(Op::Map { bytes: vec![] }, t0, t0, &peers);
    assert_eq!(core.poll_settled(), Some((op, Settled::Map(Vec::new()))));
}

#[test]
fn consume_goes_to_the_least_loaded_and_is_redelivered_on_a_death() {
    let (mut core, peers, t0) = setup(3);
    *peers.load.borrow_mut() = vec![50, 10, 90];
    let op = core.start(
        Op::Consume {
            delivery: 77,
            bytes: b"task".to_vec(),
        },
        t0 + Duration::from_secs(1),
        t0,
        &peers,
    );
    let first = sent(&mut core);
    assert_eq!(
        (first.len(), first[0].to, first[0].tag.kind),
        (1, 1, wire::CONSUME)
    );
    peers.kill(1);
    core.handle_deaths(t0, &peers);
    let second = sent(&mut core);
    assert_eq!(second.len(), 1);
    assert_eq!(
        (second[0].to, second[0].bytes.as_slice()),
        (0, &b"task"[..]),
        "the same task, to the next least loaded"
    );
    assert_ne!(second[0].tag.correlation, first[0].tag.correlation);
    // The dead worker's late acknowledgement (a copy it had run) is not
    // the end of the task.
    core.handle_reply(w(1, 1), first[0].tag.correlation, wire::OK, b"", &peers);
    assert!(core.poll_settled().is_none());
    core.handle_reply(w(0, 1), second[0].tag.correlation, wire::OK, b"", &peers);
    assert_eq!(
        core.poll_settled(),
        Some((
            op,
            Settled::Consumed(Ok(Consumed {
                worker: w(0, 1),
                delivery_id: 77,
                attempts: 2
            }))
        ))
    );
}

#[test]
fn consume_skips_workers_without_a_handler_then_says_no_handler() {
    let (mut core, peers, t0) = setup(2);
    let op = core.start(
        Op::Consume {
            delivery: 1,
            bytes: vec![],
        },
        t0 + Duration::from_secs(1),
        t0,
        &peers,
    );
    for _ in 0..2 {
        let t = sent(&mut core).remove(0);
        core.handle_reply(w(t.to, 1), t.tag.correlation, wire::NO_HANDLER, b"", &peers);
    }
    assert_eq!(
        core.poll_settled(),
        Some((op, Settled::Consumed(Err(CallError::NoHandler))))
    );
}

#[test]
fn a_consume_whose_worker_dies_after_the_deadline_is_not_sent_again() {
    let (mut core, peers, t0) = setup(2);
    let deadline = t0 + Duration::from_millis(5);
    let op = core.start(
        Op::Consume {
            delivery: 1,
            bytes: vec![],
        },
        deadline,
        t0,
        &peers,
    );
    let t = sent(&mut core).remove(0);
    peers.kill(t.to);
    core.handle_deaths(deadline, &peers);
    assert!(sent(&mut core).is_empty(), "no redelivery past the deadline");
    assert_eq!(
        core.poll_settled(),
        Some((op, Settled::Consumed(Err(CallError::TimedOut))))
    );
}

#[test]
fn a_consume_handler_failure_ends_it() {
    let (mut core, peers, t0) = setup(2);
    let op = core.start(
        Op::Consume {
            delivery: 1,
            bytes: vec![],
        },
        t0 + Duration::from_secs(1),
        t0,
        &peers,
    );
    let t = sent(&mut core).remove(0);
    core.handle_reply(w(t.to, 1), t.tag.correlation, wire::FAILED, b"no", &peers);
    assert_eq!(
        core.poll_settled(),
        Some((op, Settled::Consumed(Err(CallError::HandlerFailed("no".into())))))
    );
}

/// Starts a consume and returns where it went (its call still in flight).
fn consume_sent(core: &mut CallCore, peers: &Fake, t0: Instant) -> Transmit {
    core.start(
        Op::Consume {
            delivery: 1,
            bytes: vec![],
        },
        t0 + Duration::from_secs(1),
        t0,
        peers,
    );
    let mut out = sent(core);
    assert_eq!(out.len(), 1);
    out.remove(0)
}

/// A consume run to its end: the slot that ran it.
fn consume_done(core: &mut CallCore, peers: &Fake, t0: Instant) -> u32 {
    let t = consume_sent(core, peers, t0);
    core.handle_reply(w(t.to, 1), t.tag.correlation, wire::OK, b"", peers);
    assert!(matches!(core.poll_settled(), Some((_, Settled::Consumed(Ok(_))))));
    t.to
}

#[test]
fn concurrent_consumes_of_one_caller_go_to_distinct_free_workers() {
    let (mut core, peers, t0) = setup(3);
    // The sticky worker would take them all if calls in flight were not
    // counted.
    let first = consume_done(&mut core, &peers, t0);
    let mut to: Vec<u32> = (0..3).map(|_| consume_sent(&mut core, &peers, t0).to).collect();
    assert_eq!(to[0], first, "the sticky worker, free again, comes first");
    to.sort_unstable();
    assert_eq!(to, [0, 1, 2], "no worker gets a second task while one is free");
    // All three in hand: the fourth goes to the least loaded, one of them.
    assert!(consume_sent(&mut core, &peers, t0).to < 3);
}

#[test]
fn a_worker_with_another_callers_task_in_hand_gets_none_while_one_runs_free() {
    let (mut core, peers, t0) = setup(3);
    let sticky = consume_done(&mut core, &peers, t0);
    // Another caller's task runs there (its handler, out of the lane).
    peers.busy.borrow_mut()[sticky as usize] = true;
    let next = consume_done(&mut core, &peers, t0);
    assert_ne!(next, sticky, "busy in a handler");
    peers.busy.borrow_mut()[sticky as usize] = false;
    // Now the other caller's task still waits in its inbox.
    peers.load.borrow_mut()[next as usize] = 40;
    let third = consume_done(&mut core, &peers, t0);
    assert_ne!(third, next, "a task waits in its inbox");
    // A parked free worker still beats a running one with a task in hand.
    let parked = (0..3).find(|&s| s != third && s != next).unwrap();
    peers.parked.borrow_mut()[parked as usize] = true;
    peers.busy.borrow_mut()[third as usize] = true;
    assert_eq!(consume_done(&mut core, &peers, t0), parked);
}

#[test]
fn sequential_consumes_stick_to_a_running_worker_then_spill_over() {
    let (mut core, peers, t0) = setup(4);
    // Only slot 2 runs: the others are parked.
    *peers.parked.borrow_mut() = vec![true, true, false, true];
    let streak = CONSUME_STREAK as usize;
    let ran: Vec<u32> = (0..streak).map(|_| consume_done(&mut core, &peers, t0)).collect();
    assert!(ran.iter().all(|&s| s == 2), "the running worker first: {ran:?}");
    // After a streak the work moves on round-robin, to a parked worker
    // too (or the running ones would pass it back and forth), and each
    // new worker keeps it for a streak.
    let mut by_slot = [0usize; 4];
    for _ in 0..3 * streak {
        let slot = consume_done(&mut core, &peers, t0);
        by_slot[slot as usize] += 1;
        // A worker that took a task runs for a while.
        peers.parked.borrow_mut()[slot as usize] = false;
    }
    // Round-robin from the caller's own slot, then on from each move.
    assert_eq!(by_slot, [streak, streak, streak, 0]);
}

fn leader_at(slot: u32, term: u64) -> Option<(Leader, Option<LeaderWatch>)> {
    Some((Leader { slot, term }, Some(LeaderWatch::for_test(term))))
}

#[test]
fn invoke_waits_for_a_leader_then_calls_it() {
    let (mut core, peers, t0) = setup(3);
    let deadline = t0 + Duration::from_secs(1);
    let op = core.start(
        Op::Invoke {
            bytes: b"i".to_vec(),
            retry: false,
        },
        deadline,
        t0,
        &peers,
    );
    assert!(sent(&mut core).is_empty());
    let look = core.next_timeout().expect("a look scheduled");
    assert!(look < deadline);
    *peers.leader.borrow_mut() = leader_at(2, 5);
    core.handle_timeout(look, &peers);
    let t = sent(&mut core).remove(0);
    assert_eq!(t.to, 2);
    core.handle_reply(w(2, 1), t.tag.correlation, wire::OK, b"r", &peers);
    assert_eq!(
        core.poll_settled(),
        Some((op, Settled::Answer(Ok(b"r".to_vec()))))
    );
}

#[test]
fn invoke_without_a_leader_by_the_deadline_is_no_leader() {
    let (mut core, peers, t0) = setup(2);
    let deadline = t0 + Duration::from_millis(3);
    let op = core.start(
        Op::Invoke {
            bytes: vec![],
            retry: false,
        },
        deadline,
        t0,
        &peers,
    );
    core.handle_timeout(deadline, &peers);
    assert_eq!(
        core.poll_settled(),
        Some((op, Settled::Answer(Err(CallError::NoLeader))))
    );
}

#[test]
fn a_leader_dead_in_office_fails_an_invoke_at_once_or_retries_it() {
    for retry in [false, true] {
        let (mut core, peers, t0) = setup(3);
        *peers.leader.borrow_mut() = leader_at(1, 8);
        let op = core.start(
            Op::Invoke { bytes: vec![], retry },
            t0 + Duration::from_secs(1),
            t0,
            &peers,
        );
        let t = sent(&mut core).remove(0);
        // The lock shows the death before the master reaps: the slot
        // still looks live.
        peers.dead_terms.borrow_mut().push(8);
        *peers.leader.borrow_mut() = leader_at(2, 9);
        core.handle_deaths(t0, &peers);
        if retry {
            let again = sent(&mut core).remove(0);
            assert_eq!(again.to, 2, "the next leader");
            core.handle_reply(w(1, 1), t.tag.correlation, wire::OK, b"dead", &peers);
            core.handle_reply(w(2, 1), again.tag.correlation, wire::OK, b"new", &peers);
            assert_eq!(
                core.poll_settled(),
                Some((op, Settled::Answer(Ok(b"new".to_vec()))))
            );
        } else {
            assert_eq!(
                core.poll_settled(),
                Some((op, Settled::Answer(Err(CallError::LeaderDied))))
            );
        }
    }
}

#[test]
fn invoke_asks_again_when_the_worker_asked_no_longer_leads() {
    let (mut core, peers, t0) = setup(3);
    *peers.leader.borrow_mut() = leader_at(1, 3);
    let op = core.start(
        Op::Invoke {
            bytes: vec![],
            retry: false,
        },
        t0 + Duration::from_secs(1),
        t0,
        &peers,
    );
    let t = sent(&mut core).remove(0);
    *peers.leader.borrow_mut() = leader_at(2, 4);
    core.handle_reply(
        w(1, 1),
        t.tag.correlation,
        wire::FAILED,
        leader::NOT_LEADER.as_bytes(),
        &peers,
    );
    assert!(sent(&mut core).is_empty(), "asks again after a pause");
    let look = core.next_timeout().expect("a look scheduled");
    core.handle_timeout(look, &peers);
    let again = sent(&mut core).remove(0);
    assert_eq!(again.to, 2);
    core.handle_reply(w(2, 1), again.tag.correlation, wire::OK, b"ok", &peers);
    assert_eq!(
        core.poll_settled(),
        Some((op, Settled::Answer(Ok(b"ok".to_vec()))))
    );
}

#[test]
fn an_abandoned_operation_sends_and_settles_nothing_more() {
    let (mut core, peers, t0) = setup(2);
    let op = core.start(Op::Map { bytes: vec![] }, t0 + Duration::from_secs(1), t0, &peers);
    core.abandon(op);
    assert!(sent(&mut core).is_empty());
    assert!(!core.busy() && !core.waiting());
    core.handle_timeout(t0 + Duration::from_secs(2), &peers);
    assert!(core.poll_settled().is_none());
}

#[test]
fn a_message_whose_call_has_ended_is_not_sent() {
    let (mut core, peers, t0) = setup(3);
    let op = core.start(Op::Map { bytes: vec![] }, t0 + Duration::from_secs(1), t0, &peers);
    // The driver is still sending the first message (waiting for room)
    // when the third worker is seen dead: its message must not go to the
    // slot's successor.
    let first = core.poll_transmit().expect("the first message");
    peers.kill(2);
    core.handle_deaths(t0, &peers);
    let rest = sent(&mut core);
    assert_eq!(rest.iter().map(|t| t.to).collect::<Vec<_>>(), [1]);
    core.handle_reply(w(first.to, 1), first.tag.correlation, wire::OK, b"a", &peers);
    core.handle_reply(w(1, 1), rest[0].tag.correlation, wire::OK, b"b", &peers);
    let Some((id, Settled::Map(entries))) = core.poll_settled() else {
        panic!("map not settled")
    };
    assert_eq!(id, op);
    assert_eq!(entries[2], (w(2, 1), Err(MapError::WorkerDied)));
}

// ------------------------------------------------------------ bridge

/// A cluster of `workers` slots whose last one is the host's bridge.
fn with_bridge(workers: u32) -> (CallCore, Fake, Instant) {
    let (core, peers, t0) = setup(workers);
    *peers.bridge.borrow_mut() = Some(workers - 1);
    (core, peers, t0)
}

fn call_bytes(name: &str) -> Vec<u8> {
    let mut b = Vec::new();
    wire::put_call_header(&mut b, name, 0);
    b.extend_from_slice(b"data");
    b
}

#[test]
fn a_map_asks_the_bridge_for_the_other_hosts_and_lists_them_after_this_ones() {
    let (mut core, peers, t0) = with_bridge(3);
    let op = core.start(
        Op::Map {
            bytes: call_bytes("ev"),
        },
        t0 + Duration::from_millis(500),
        t0,
        &peers,
    );
    let out = sent(&mut core);
    let kinds: Vec<_> = out.iter().map(|t| (t.to, t.tag.kind)).collect();
    assert_eq!(
        kinds,
        [(0, wire::REQUEST), (1, wire::REQUEST), (2, wire::BRIDGE_MAP)]
    );
    // The bridge is told the time left in the delivery field.
    let call = wire::parse_call(&out[2].bytes).unwrap();
    assert_eq!(
        (call.name, call.delivery, call.data),
        ("ev", 500_000_000, &b"data"[..])
    );
    let mut answer = Vec::new();
    for (host, slot, status, body) in [
        ("core-test-b", 0, wire::OK, &b"b0"[..]),
        ("core-test-b", 1, wire::UNREACHABLE, &b""[..]),
    ] {
        wire::put_remote_entry(
            &mut answer,
            &wire::RemoteEntry {
                host,
                slot,
                generation: 4,
                status,
                body,
            },
        );
    }
    core.handle_reply(w(2, 1), out[2].tag.correlation, wire::OK, answer, &peers);
    core.handle_reply(w(0, 1), out[0].tag.correlation, wire::OK, b"a0".to_vec(), &peers);
    assert!(core.poll_settled().is_none(), "one local entry still open");
    core.handle_reply(
        w(1, 1),
        out[1].tag.correlation,
        wire::NO_HANDLER,
        b"".to_vec(),
        &peers,
    );
    let Some((id, Settled::Map(entries))) = core.poll_settled() else {
        panic!("not settled")
    };
    assert_eq!(id, op);
    let b = HostId::of("core-test-b");
    assert_eq!(
        entries,
        vec![
            (w(0, 1), Ok(b"a0".to_vec())),
            (w(1, 1), Err(MapError::NoHandler)),
            (
                WorkerId {
                    host: b,
                    slot: 0,
                    generation: 4
                },
                Ok(b"b0".to_vec())
            ),
            (
                WorkerId {
                    host: b,
                    slot: 1,
                    generation: 4
                },
                Err(MapError::HostUnreachable)
            ),
        ]
    );
}

#[test]
fn a_map_whose_bridge_dies_or_is_late_gets_one_entry_for_it() {
    let (mut core, peers, t0) = with_bridge(2);
    let dl = t0 + Duration::from_millis(50);
    let died = core.start(
        Op::Map {
            bytes: call_bytes("e"),
        },
        dl,
        t0,
        &peers,
    );
    let out = sent(&mut core);
    core.handle_reply(w(0, 1), out[0].tag.correlation, wire::OK, b"x".to_vec(), &peers);
    peers.kill(1);
    core.handle_deaths(t0, &peers);
    assert_eq!(
        core.poll_settled(),
        Some((
            died,
            Settled::Map(vec![
                (w(0, 1), Ok(b"x".to_vec())),
                (w(1, 1), Err(MapError::HostUnreachable))
            ])
        ))
    );
    peers.respawn(1, 2);
    let late = core.start(
        Op::Map {
            bytes: call_bytes("e"),
        },
        dl,
        t0,
        &peers,
    );
    let out = sent(&mut core);
    core.handle_reply(w(0, 1), out[0].tag.correlation, wire::OK, b"y".to_vec(), &peers);
    core.handle_timeout(dl, &peers);
    assert_eq!(
        core.poll_settled(),
        Some((
            late,
            Settled::Map(vec![
                (w(0, 1), Ok(b"y".to_vec())),
                (w(1, 2), Err(MapError::TimedOut))
            ])
        ))
    );
    // A malformed answer is refused, not trusted.
    let bad = core.start(
        Op::Map {
            bytes: call_bytes("e"),
        },
        dl,
        t0,
        &peers,
    );
    let out = sent(&mut core);
    core.handle_reply(w(0, 1), out[0].tag.correlation, wire::OK, b"z".to_vec(), &peers);
    core.handle_reply(w(1, 2), out[1].tag.correlation, wire::OK, vec![9, 1], &peers);
    let Some((id, Settled::Map(entries))) = core.poll_settled() else {
        panic!("not settled")
    };
    assert_eq!(id, bad);
    assert!(
        matches!(entries[1], (_, Err(MapError::HandlerFailed(_)))),
        "{entries:?}"
    );
}

#[test]
fn a_consume_stays_here_while_a_worker_is_free_and_spills_to_the_bridge_when_none_is() {
    let (mut core, peers, t0) = with_bridge(3);
    let dl = t0 + Duration::from_secs(1);
    let consume = |core: &mut CallCore, d: u64| {
        let mut bytes = Vec::new();
        wire::put_call_header(&mut bytes, "job", d);
        core.start(Op::Consume { delivery: d, bytes }, dl, t0, &peers)
    };
    consume(&mut core, 1);
    consume(&mut core, 2);
    let out = sent(&mut core);
    let local: Vec<_> = out.iter().map(|t| (t.to, t.tag.kind)).collect();
    assert_eq!(
        local,
        [(0, wire::CONSUME), (1, wire::CONSUME)],
        "both local workers first"
    );
    // Both have a task in hand: the third goes to the bridge, with the
    // time left before the call.
    let third = consume(&mut core, 3);
    let out = sent(&mut core);
    assert_eq!((out[0].to, out[0].tag.kind), (2, wire::BRIDGE_CONSUME));
    assert_eq!(out[0].bytes[..8], 1_000_000_000u64.to_le_bytes());
    let task = wire::parse_call(&out[0].bytes[8..]).unwrap();
    assert_eq!((task.name, task.delivery), ("job", 3));
    let mut ran = Vec::new();
    wire::put_consumer(&mut ran, "core-test-c", 5, 2);
    core.handle_reply(w(2, 1), out[0].tag.correlation, wire::OK, ran, &peers);
    assert_eq!(
        core.poll_settled(),
        Some((
            third,
            Settled::Consumed(Ok(Consumed {
                worker: WorkerId {
                    host: HostId::of("core-test-c"),
                    slot: 5,
                    generation: 2
                },
                delivery_id: 3,
                attempts: 1
            }))
        ))
    );
}

#[test]
fn a_consume_nobody_here_handles_goes_to_the_bridge_and_its_death_redelivers_here() {
    let (mut core, peers, t0) = with_bridge(2);
    let dl = t0 + Duration::from_secs(1);
    let mut bytes = Vec::new();
    wire::put_call_header(&mut bytes, "job", 9);
    let op = core.start(Op::Consume { delivery: 9, bytes }, dl, t0, &peers);
    let out = sent(&mut core);
    assert_eq!((out[0].to, out[0].tag.kind), (0, wire::CONSUME));
    core.handle_reply(w(0, 1), out[0].tag.correlation, wire::NO_HANDLER, vec![], &peers);
    let out = sent(&mut core);
    assert_eq!((out[0].to, out[0].tag.kind), (1, wire::BRIDGE_CONSUME));
    // No host has a handler either: NoHandler.
    core.handle_reply(w(1, 1), out[0].tag.correlation, wire::NO_HANDLER, vec![], &peers);
    assert_eq!(
        core.poll_settled(),
        Some((op, Settled::Consumed(Err(CallError::NoHandler))))
    );
    // A request to another host without a bridge fails at once.
    peers.kill(1);
    let routed = core.start(Op::Route { bytes: vec![] }, dl, t0, &peers);
    assert!(matches!(
        core.poll_settled(),
        Some((id, Settled::Answer(Err(CallError::HostUnreachable(_))))) if id == routed
    ));
}

#[test]
fn a_consume_whose_bridge_dies_waits_for_its_successor_and_goes_again() {
    let (mut core, peers, t0) = with_bridge(2);
    let dl = t0 + Duration::from_secs(1);
    let mut bytes = Vec::new();
    wire::put_call_header(&mut bytes, "job", 5);
    let op = core.start(Op::Consume { delivery: 5, bytes }, dl, t0, &peers);
    let out = sent(&mut core);
    core.handle_reply(w(0, 1), out[0].tag.correlation, wire::NO_HANDLER, vec![], &peers);
    let out = sent(&mut core);
    assert_eq!((out[0].to, out[0].tag.kind), (1, wire::BRIDGE_CONSUME));
    // The bridge dies with the task; nobody here has a handler: it waits.
    peers.kill(1);
    core.handle_deaths(t0, &peers);
    assert!(core.poll_settled().is_none(), "settled while the bridge is away");
    assert!(sent(&mut core).is_empty());
    assert_eq!(core.next_timeout(), Some(t0 + LEADER_POLL));
    core.handle_timeout(t0 + LEADER_POLL, &peers);
    assert!(sent(&mut core).is_empty(), "no bridge yet");
    // Its successor takes the same task.
    peers.respawn(1, 2);
    let t1 = t0 + LEADER_POLL * 2;
    core.handle_timeout(t1, &peers);
    let out = sent(&mut core);
    assert_eq!((out[0].to, out[0].tag.kind), (1, wire::BRIDGE_CONSUME));
    assert_eq!(wire::parse_call(&out[0].bytes[8..]).unwrap().delivery, 5);
    let mut ran = Vec::new();
    wire::put_consumer(&mut ran, "core-test-d", 0, 1);
    core.handle_reply(w(1, 2), out[0].tag.correlation, wire::OK, ran, &peers);
    assert!(matches!(
        core.poll_settled(),
        Some((id, Settled::Consumed(Ok(Consumed { attempts: 3, .. })))) if id == op
    ));
    // Without a successor before the deadline: TimedOut, not NoHandler.
    let mut bytes = Vec::new();
    wire::put_call_header(&mut bytes, "job", 6);
    let op = core.start(Op::Consume { delivery: 6, bytes }, dl, t1, &peers);
    let out = sent(&mut core);
    core.handle_reply(w(0, 1), out[0].tag.correlation, wire::NO_HANDLER, vec![], &peers);
    let _ = sent(&mut core);
    peers.kill(1);
    core.handle_deaths(t1, &peers);
    core.handle_timeout(dl, &peers);
    assert_eq!(
        core.poll_settled(),
        Some((op, Settled::Consumed(Err(CallError::TimedOut))))
    );
}

#[test]
fn a_consume_whose_only_hosts_are_cut_off_ends_host_unreachable_unless_a_worker_here_takes_it() {
    let (mut core, peers, t0) = with_bridge(2);
    let dl = t0 + Duration::from_secs(1);
    let consume = |core: &mut CallCore, d: u64| {
        let mut bytes = Vec::new();
        wire::put_call_header(&mut bytes, "job", d);
        core.start(Op::Consume { delivery: d, bytes }, dl, t0, &peers)
    };
    // Nobody here has a handler: the bridge's "unreachable" is the answer.
    let op = consume(&mut core, 1);
    let out = sent(&mut core);
    core.handle_reply(w(0, 1), out[0].tag.correlation, wire::NO_HANDLER, vec![], &peers);
    let out = sent(&mut core);
    assert_eq!(out[0].tag.kind, wire::BRIDGE_CONSUME);
    core.handle_reply(
        w(1, 1),
        out[0].tag.correlation,
        wire::UNREACHABLE,
        b"cut off".to_vec(),
        &peers,
    );
    assert_eq!(
        core.poll_settled(),
        Some((
            op,
            Settled::Consumed(Err(CallError::HostUnreachable("cut off".into())))
        ))
    );
    // A busy worker here has one: it takes the task after all.
    let first = consume(&mut core, 2);
    let busy = sent(&mut core);
    assert_eq!((busy[0].to, busy[0].tag.kind), (0, wire::CONSUME));
    let second = consume(&mut core, 3);
    let out = sent(&mut core);
    assert_eq!(
        out[0].tag.kind,
        wire::BRIDGE_CONSUME,
        "worker 0 has a task in hand"
    );
    core.handle_reply(
        w(1, 1),
        out[0].tag.correlation,
        wire::UNREACHABLE,
        b"cut off".to_vec(),
        &peers,
    );
    let out = sent(&mut core);
    assert_eq!((out[0].to, out[0].tag.kind), (0, wire::CONSUME));
    core.handle_reply(w(0, 1), busy[0].tag.correlation, wire::OK, vec![], &peers);
    core.handle_reply(w(0, 1), out[0].tag.correlation, wire::OK, vec![], &peers);
    let settled: Vec<_> = std::iter::from_fn(|| core.poll_settled())
        .map(|(id, s)| (id, matches!(s, Settled::Consumed(Ok(_)))))
        .collect();
    assert_eq!(settled, [(first, true), (second, true)]);
}

#[test]
fn a_request_to_another_host_whose_bridge_dies_is_host_unreachable() {
    let (mut core, peers, t0) = with_bridge(2);
    let dl = t0 + Duration::from_secs(1);
    let op = core.start(
        Op::Route {
            bytes: vec![1, b'b', 0, 0, 0, 0],
        },
        dl,
        t0,
        &peers,
    );
    let out = sent(&mut core);
    assert_eq!((out[0].to, out[0].tag.kind), (1, wire::BRIDGE_CALL));
    peers.kill(1);
    core.handle_deaths(t0, &peers);
    assert!(
        matches!(
            core.poll_settled(),
            Some((id, Settled::Answer(Err(CallError::HostUnreachable(_))))) if id == op
        ),
        "a bridge's death is not the remote worker's"
    );
}
