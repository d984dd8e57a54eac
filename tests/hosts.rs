//! Hosts through NATS: each scenario is a fresh process (this binary
//! re-executed with `SHMC_SCENARIO=<name>`) that starts a 3-node NATS
//! cluster with JetStream on loopback (`common::nats`), then two or three
//! *hosts* — this binary again with `SHMC_HOST=<id>`, each a real
//! fork-mode master with its own segment, its workers and its bridge —
//! and, where the scenario says, breaks something: a NATS server, a
//! bridge or a whole host SIGKILLed, garbage published on the cluster's
//! subjects.
//!
//! Worker 0 of host `a` is the *driver*: it runs the scenario's checks
//! through its messenger and writes its verdict to `verdict` in the
//! scenario's directory. Where the scenario process must act at a given
//! moment, the driver writes `phase-<name>` and waits for `go-<name>`.
//! Every other worker serves: `ping` and `where` requests, `log` events
//! (appended to `log-<host>-<slot>`), the consume events its host handles
//! (`SHMC_JOBS`, appended to `jobs-<host>`) and host events.
//!
//! `harness = false`: a master must fork from a single-threaded process.
//! Each scenario runs under its watchdog; hosts die with the scenario
//! process (`PR_SET_PDEATHSIG`), their workers and bridges with them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use shmcluster::bridge::{BridgeStats, STATS_EVENT};
use shmcluster::{CallError, EmitError, HostId, MapError, Messenger};

#[macro_use]
mod common;
#[path = "common/hosts.rs"]
mod hosts;
use common::nats::NatsCluster;
use common::{sigkill, tmp, Check};
use hosts::{
    contend, deadline, lines, nats3, pause, phase, wait_for_workers, Hosts, Scenario, CLUSTER, CONTEND_ROUNDS,
};

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "broadcast_map_request_and_consume_across_two_hosts",
        timeout: Duration::from_secs(90),
        run: two_hosts,
        drive: semantics,
    },
    Scenario {
        name: "clusters_with_different_names_never_meet",
        timeout: Duration::from_secs(60),
        run: two_clusters,
        drive: separate_clusters,
    },
    Scenario {
        name: "a_nats_server_killed_under_load_loses_no_consume",
        timeout: Duration::from_secs(120),
        run: nats_server_killed,
        drive: load_through_an_outage,
    },
    Scenario {
        name: "a_killed_bridge_is_respawned_and_calls_settle",
        timeout: Duration::from_secs(90),
        run: bridge_killed,
        drive: calls_across_a_bridge_death,
    },
    Scenario {
        name: "a_killed_host_is_unreachable_and_its_tasks_go_elsewhere",
        timeout: Duration::from_secs(90),
        run: host_killed,
        drive: through_a_host_death,
    },
    Scenario {
        name: "a_lock_a_leader_and_a_topic_across_hosts",
        timeout: Duration::from_secs(120),
        run: lock_and_leader,
        drive: one_holder_one_leader,
    },
    Scenario {
        name: "credentials_come_from_the_environment_never_argv",
        timeout: Duration::from_secs(60),
        run: credentials,
        drive: with_credentials,
    },
    Scenario {
        name: "garbage_on_the_cluster_subjects_is_dropped_and_counted",
        timeout: Duration::from_secs(90),
        run: garbage,
        drive: after_garbage,
    },
];

fn main() {
    hosts::main("hosts", SCENARIOS);
}

// -------------------------------------------------------------- scenarios

fn two_hosts() -> Check {
    let mut h = Hosts::start(nats3()?);
    h.host("a", CLUSTER, 2, "job")?;
    h.host("b", CLUSTER, 2, "job,only_b")?;
    h.finish()
}

/// Broadcast, map, request, emit and consume across two hosts, as README
/// states them.
fn semantics(m: &mut Messenger) -> Check {
    wait_for_workers(m, 4)?;
    let dir = tmp();

    // map: one entry per worker on every host, this host's first.
    let entries = m
        .map::<_, String>("where", &(), deadline(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let b = HostId::of("b");
    let shape: Vec<_> = entries
        .iter()
        .map(|(w, r)| (w.host, r.clone().unwrap_or_default()))
        .collect();
    ensure!(
        shape
            == [
                (HostId::LOCAL, "a".to_string()),
                (HostId::LOCAL, "a".to_string()),
                (b, "b".to_string()),
                (b, "b".to_string())
            ],
        "map entries: {entries:?}"
    );
    ensure!(
        entries[2].0.slot < entries[3].0.slot,
        "not in slot order: {entries:?}"
    );
    let b_slots = [entries[2].0.slot, entries[3].0.slot];
    let a_slots = [entries[0].0.slot, entries[1].0.slot];

    // broadcast: every worker of both hosts, the caller included, each
    // message once, in order.
    const N: u64 = 200;
    for seq in 0..N {
        m.broadcast("log", &("d".to_string(), seq))
            .map_err(|e| e.to_string())?;
    }
    let expected: Vec<String> = (0..N).map(|s| format!("d {s}")).collect();
    let logs: Vec<PathBuf> = a_slots
        .iter()
        .map(|s| dir.join(format!("log-a-{s}")))
        .chain(b_slots.iter().map(|s| dir.join(format!("log-b-{s}"))))
        .collect();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let got: Vec<Vec<String>> = logs.iter().map(|p| lines(p)).collect();
        if got.iter().all(|g| g.len() >= N as usize) {
            for (p, g) in logs.iter().zip(&got) {
                ensure!(
                    *g == expected,
                    "{}: {} lines, not each once in order",
                    p.display(),
                    g.len()
                );
            }
            break;
        }
        ensure!(
            Instant::now() < until,
            "broadcast not everywhere: {:?}",
            got.iter().map(Vec::len).collect::<Vec<_>>()
        );
        pause(m, Duration::from_millis(20))?;
    }

    // request to (host, slot), and the typed errors at once.
    for &s in &b_slots {
        let (host, slot): (String, u32) = m
            .request_at("b", s, "ping", &(), deadline(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        ensure!(host == "b" && slot == s, "ping b/{s} answered by {host}/{slot}");
    }
    for (host, slot) in [("nohost", 0), ("b", 77)] {
        let t = Instant::now();
        let r: Result<(String, u32), _> =
            m.request_at(host, slot, "ping", &(), deadline(Duration::from_secs(5)));
        ensure!(
            matches!(r, Err(CallError::HostUnreachable(_))),
            "request to {host}/{slot}: {r:?}"
        );
        ensure!(
            t.elapsed() < Duration::from_secs(1),
            "{host}/{slot} took {:?}",
            t.elapsed()
        );
    }

    // An emit to this host's bridge's slot is no broadcast.
    let bridge = m.bridge().ok_or("no bridge")?;
    m.emit(
        shmcluster::Target::Worker(bridge.slot),
        "log",
        &("z".to_string(), 1u64),
    )
    .map_err(|e| e.to_string())?;

    // emit to (host, slot).
    m.emit_at("b", b_slots[0], "log", &("e".to_string(), 1u64))
        .map_err(|e| e.to_string())?;
    let target = dir.join(format!("log-b-{}", b_slots[0]));
    let until = Instant::now() + Duration::from_secs(5);
    while !lines(&target).contains(&"e 1".to_string()) {
        ensure!(Instant::now() < until, "emit_at never arrived");
        pause(m, Duration::from_millis(20))?;
    }
    pause(m, Duration::from_millis(300))?;
    for &s in &b_slots {
        let log = lines(&dir.join(format!("log-b-{s}")));
        ensure!(
            !log.contains(&"z 1".to_string()),
            "an emit to the bridge's slot reached b/{s}: a broadcast"
        );
    }

    // On the other host, an event's sender is its sender here (host a's
    // driver), not the bridge that relayed it; here, the driver itself.
    m.broadcast("who", &()).map_err(|e| e.to_string())?;
    m.emit_at("b", b_slots[1], "who", &())
        .map_err(|e| e.to_string())?;
    let me = m.slot();
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let b0 = lines(&dir.join(format!("who-b-{}", b_slots[0])));
        let b1 = lines(&dir.join(format!("who-b-{}", b_slots[1])));
        let a = lines(&dir.join(format!("who-a-{me}")));
        if !b0.is_empty() && b1.len() >= 2 && !a.is_empty() {
            let want = format!("a {me}");
            ensure!(
                b0 == [want.clone()] && b1 == [want.clone(), want],
                "senders on b: {b0:?} {b1:?}"
            );
            ensure!(a == [format!("local {me}")], "sender here: {a:?}");
            break;
        }
        ensure!(Instant::now() < until, "who: {b0:?} {b1:?} {a:?}");
        pause(m, Duration::from_millis(20))?;
    }

    // consume: local first while a worker here is free...
    for task in 0..20u64 {
        let done = m
            .consume("job", &(task, 0u64), deadline(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        ensure!(done.worker.host.is_local(), "task {task} left the host: {done:?}");
    }
    // ...and on the host that has the handler when none here has one.
    let done = m
        .consume("only_b", &(100u64, 0u64), deadline(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    ensure!(done.worker.host == b, "only_b ran on {:?}", done.worker);
    let jobs = lines(&dir.join("jobs-b"));
    ensure!(
        jobs.iter()
            .any(|l| l.starts_with(&format!("done 100 {} b", done.delivery_id))),
        "b's log of the task with delivery {}: {jobs:?}",
        done.delivery_id
    );
    let none = m.consume("nobody", &(0u64, 0u64), deadline(Duration::from_secs(5)));
    ensure!(
        matches!(none, Err(CallError::NoHandler)),
        "consume nobody handles: {none:?}"
    );

    // Too large for NATS (1 MiB by default): refused before anything is
    // sent, the limit named; a consume that cannot cross stays here.
    let big = vec![7u8; 2 << 20];
    let e = m.broadcast("log", &big);
    ensure!(
        matches!(e, Err(EmitError::TooLarge { max, .. }) if max < 1 << 20 && max > (1 << 20) - 1024),
        "a 2 MiB broadcast: {e:?}"
    );
    let r: Result<(String, u32), _> =
        m.request_at("b", b_slots[0], "ping", &big, deadline(Duration::from_secs(2)));
    ensure!(
        matches!(r, Err(CallError::TooLarge { .. })),
        "a 2 MiB request_at: {r:?}"
    );
    let r = m.map::<_, String>("where", &big, deadline(Duration::from_secs(2)));
    ensure!(matches!(r, Err(CallError::TooLarge { .. })), "a 2 MiB map: {r:?}");
    let r = m.consume_bytes("only_b", &big, deadline(Duration::from_secs(2)));
    ensure!(
        matches!(r, Err(CallError::NoHandler)),
        "a 2 MiB consume only b handles: {r:?}"
    );

    // Host events: b joined, as every worker of a heard.
    for s in a_slots {
        let ev = lines(&dir.join(format!("hostevents-a-{s}")));
        ensure!(ev.contains(&"b Joined".to_string()), "a/{s} host events: {ev:?}");
    }
    Ok(())
}

fn two_clusters() -> Check {
    let mut h = Hosts::start(nats3()?);
    h.host("a", "cluster-x", 2, "job")?;
    h.host("b", "cluster-y", 2, "job")?;
    h.finish()
}

/// Two clusters on one NATS: nothing of one reaches the other.
fn separate_clusters(m: &mut Messenger) -> Check {
    wait_for_workers(m, 2)?;
    // Many heartbeats of the other cluster's bridge.
    pause(m, Duration::from_millis(1500))?;
    let entries = m
        .map::<_, String>("where", &(), deadline(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    ensure!(
        entries.len() == 2 && entries.iter().all(|(w, _)| w.host.is_local()),
        "{entries:?}"
    );
    m.broadcast("log", &("x".to_string(), 0u64))
        .map_err(|e| e.to_string())?;
    let r: Result<String, _> = m.request_at("b", 0, "where", &(), deadline(Duration::from_secs(2)));
    ensure!(matches!(r, Err(CallError::HostUnreachable(_))), "{r:?}");
    let done = m
        .consume("job", &(0u64, 0u64), deadline(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    ensure!(done.worker.host.is_local(), "{done:?}");
    pause(m, Duration::from_millis(500))?;
    let dir = tmp();
    for entry in std::fs::read_dir(&dir).map_err(|e| e.to_string())? {
        let name = entry.map_err(|e| e.to_string())?.file_name();
        let name = name.to_string_lossy();
        ensure!(
            !name.starts_with("log-b") && !name.starts_with("hostevents-") && !name.starts_with("jobs-b"),
            "cluster y saw something of cluster x: {name}"
        );
    }
    Ok(())
}

/// The NATS server that host `host`'s bridge is connected to.
fn server_of(nats: &NatsCluster, host: &str) -> Result<usize, String> {
    let name = format!("shmcluster bridge {CLUSTER}/{host}");
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        for i in 0..nats.size() {
            let connz = nats.monitor(i, "/connz")?;
            let found = connz["connections"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["name"].as_str() == Some(name.as_str())));
            if found {
                return Ok(i);
            }
        }
        ensure!(Instant::now() < until, "no server has {name}'s connection");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn nats_server_killed() -> Check {
    let mut h = Hosts::start(nats3()?);
    h.host("a", CLUSTER, 2, "")?;
    h.host("b", CLUSTER, 2, "only_b")?;
    h.await_phase("load")?;
    let victim = server_of(&h.nats, "b")?;
    h.go("load")?;
    // Under load: the driver consumes and broadcasts meanwhile.
    std::thread::sleep(Duration::from_millis(400));
    h.nats.kill(victim);
    std::fs::write(h.dir.join("killed"), "").map_err(|e| e.to_string())?;
    eprintln!("killed NATS server {victim}, host b's");
    h.finish()
}

/// 200 consumes that only host b can run and 200 broadcasts, while host
/// b's NATS server is SIGKILLed: every consume completes (at least once,
/// with its delivery id); broadcasts lost in the outage are counted.
fn load_through_an_outage(m: &mut Messenger) -> Check {
    wait_for_workers(m, 4)?;
    phase(m, "load")?;
    const N: u64 = 200;
    let mut slow = 0;
    let mut killed_at = None;
    for task in 0..N {
        if killed_at.is_none() && tmp().join("killed").exists() {
            killed_at = Some(task);
        }
        let t = Instant::now();
        let done = m
            .consume("only_b", &(task, 2u64), deadline(Duration::from_secs(15)))
            .map_err(|e| format!("task {task}: {e}"))?;
        ensure!(
            done.worker.host == HostId::of("b"),
            "task {task} ran on {:?}",
            done.worker
        );
        if t.elapsed() > Duration::from_millis(200) {
            slow += 1;
        }
        m.broadcast("log", &("k".to_string(), task))
            .map_err(|e| e.to_string())?;
    }
    ensure!(
        killed_at.is_some_and(|t| t < N - 20),
        "the server was not killed under load (seen at task {killed_at:?})"
    );
    let dir = tmp();
    let jobs = lines(&dir.join("jobs-b"));
    for task in 0..N {
        ensure!(
            jobs.iter().any(|l| l.starts_with(&format!("done {task} "))),
            "task {task} never ran on b"
        );
    }
    let runs = jobs.iter().filter(|l| l.starts_with("done ")).count();
    // Broadcast loss during the outage: counted, reported.
    pause(m, Duration::from_millis(500))?;
    let mut heard = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| e.to_string())? {
        let name = entry
            .map_err(|e| e.to_string())?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name.starts_with("log-b-") {
            let got = lines(&dir.join(&name))
                .iter()
                .filter(|l| l.starts_with("k "))
                .count();
            heard.push(got);
        }
    }
    eprintln!(
        "outage: server killed at task {killed_at:?}; {N} consumes done ({runs} runs, {} again), \
         {slow} slower than 200 ms; broadcasts heard by b's workers: {heard:?} of {N}",
        runs as u64 - N
    );
    ensure!(heard.len() == 2, "b's workers' logs: {heard:?}");
    Ok(())
}

fn bridge_killed() -> Check {
    let mut h = Hosts::start(nats3()?);
    h.host("a", CLUSTER, 1, "")?;
    h.host("b", CLUSTER, 1, "only_b")?;
    h.await_phase("calls")?;
    h.go("calls")?;
    std::thread::sleep(Duration::from_millis(500));
    sigkill(h.bridge_pid("b")?);
    h.await_phase("consume")?;
    // The consume is in hand on b: kill this host's bridge with it.
    let a_bridge = h.bridge_pid("a")?;
    h.go("consume")?;
    std::thread::sleep(Duration::from_millis(100));
    sigkill(a_bridge);
    h.finish()
}

/// Requests to host b while its bridge is SIGKILLed and respawned: each
/// settles in time, with the answer or a typed error; then a consume in
/// hand on b when this host's own bridge is killed is delivered again.
fn calls_across_a_bridge_death(m: &mut Messenger) -> Check {
    wait_for_workers(m, 2)?;
    phase(m, "calls")?;
    let started = Instant::now();
    let (mut ok, mut failed) = (0, 0);
    let mut last_ok = None;
    while started.elapsed() < Duration::from_secs(4) {
        let t = Instant::now();
        let limit = Duration::from_millis(800);
        let r: Result<(String, u32), _> = m.request_at("b", 0, "ping", &(), t + limit);
        ensure!(
            t.elapsed() < limit + Duration::from_millis(200),
            "a call took {:?}",
            t.elapsed()
        );
        match r {
            Ok(_) => {
                ok += 1;
                last_ok = Some(Instant::now());
            }
            Err(CallError::HostUnreachable(_) | CallError::TimedOut) => {
                failed += 1;
                pause(m, Duration::from_millis(20))?;
            }
            Err(e) => return Err(format!("an untyped failure: {e:?}")),
        }
    }
    ensure!(failed > 0, "{ok} calls, none failed: was the bridge killed?");
    ensure!(
        last_ok.is_some_and(|t| t > started + Duration::from_secs(2)),
        "no answer after the respawn ({ok} ok, {failed} failed)"
    );
    // A consume only b handles, 1.5 s long; this host's bridge dies
    // meanwhile: the caller's core waits for the respawned bridge and
    // sends the task again, with the same delivery id.
    phase(m, "consume")?;
    let done = m
        .consume("only_b", &(7u64, 1500u64), deadline(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    ensure!(done.attempts >= 2, "not delivered again: {done:?}");
    let jobs = lines(&tmp().join("jobs-b"));
    ensure!(
        jobs.iter()
            .any(|l| l.starts_with(&format!("done 7 {} ", done.delivery_id))),
        "{jobs:?}"
    );
    Ok(())
}

fn host_killed() -> Check {
    let mut h = Hosts::start(nats3()?);
    h.host("a", CLUSTER, 1, "")?;
    h.host("b", CLUSTER, 1, "slow_bc")?;
    h.host("c", CLUSTER, 1, "slow_bc")?;
    h.await_phase("kill")?;
    h.go("kill")?;
    // Kill whichever host started the task.
    let until = Instant::now() + Duration::from_secs(10);
    let victim = loop {
        let started = ["b", "c"].into_iter().find(|host| {
            lines(&h.dir.join(format!("jobs-{host}")))
                .iter()
                .any(|l| l.starts_with("start 1 "))
        });
        if let Some(v) = started {
            break v;
        }
        ensure!(Instant::now() < until, "the task never started");
        std::thread::sleep(Duration::from_millis(5));
    };
    h.kill_host(victim);
    std::fs::write(h.dir.join("victim"), victim).map_err(|e| e.to_string())?;
    h.finish()
}

/// A whole host SIGKILLed with a consume in hand: the task is run by the
/// other host with the same delivery id; a map right after settles the
/// dead host's entries by its deadline, and once the host is timed out at
/// once, as `HostUnreachable`.
fn through_a_host_death(m: &mut Messenger) -> Check {
    wait_for_workers(m, 3)?;
    phase(m, "kill")?;
    let done = m
        .consume("slow_bc", &(1u64, 1000u64), deadline(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    let dir = tmp();
    let victim = std::fs::read_to_string(dir.join("victim")).map_err(|e| e.to_string())?;
    ensure!(
        done.worker.host.name().as_deref() != Some(victim.as_str()),
        "finished by the dead host: {done:?}"
    );
    let other = if victim == "b" { "c" } else { "b" };
    let jobs = lines(&dir.join(format!("jobs-{other}")));
    ensure!(
        jobs.iter()
            .any(|l| l.starts_with(&format!("done 1 {} ", done.delivery_id))),
        "{other} never ran it with delivery {}: {jobs:?}",
        done.delivery_id
    );
    // The dead host is timed out by now: a map settles its worker at once.
    let t = Instant::now();
    let entries = m
        .map::<_, String>("where", &(), deadline(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    ensure!(
        t.elapsed() < Duration::from_millis(500),
        "map took {:?}",
        t.elapsed()
    );
    let dead = HostId::of(&victim);
    let of_dead: Vec<_> = entries
        .iter()
        .filter(|(w, _)| w.host == dead)
        .map(|(_, r)| r.clone())
        .collect();
    ensure!(
        of_dead == [Err(MapError::HostUnreachable)],
        "the dead host's entries: {entries:?}"
    );
    ensure!(
        entries.iter().filter(|(_, r)| r.is_ok()).count() == 2,
        "the live hosts' entries: {entries:?}"
    );
    let r: Result<String, _> = m.request_at(&victim, 0, "where", &(), deadline(Duration::from_secs(3)));
    ensure!(matches!(r, Err(CallError::HostUnreachable(_))), "{r:?}");
    Ok(())
}

fn garbage() -> Check {
    let mut h = Hosts::start(nats3()?);
    h.host("a", CLUSTER, 1, "")?;
    h.host("b", CLUSTER, 1, "")?;
    h.await_phase("capture")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let urls = h.nats.urls();
    let prefix = format!("shmc.{CLUSTER}");
    let result: Check = rt.block_on(async {
        use futures_util::StreamExt;
        let servers: Vec<&str> = urls.split(',').collect();
        let nc = async_nats::connect(servers).await.map_err(|e| e.to_string())?;
        let mut bcast = nc
            .subscribe(format!("{prefix}.bcast"))
            .await
            .map_err(|e| e.to_string())?;
        nc.flush().await.map_err(|e| e.to_string())?;
        h.go("capture")?;
        // The driver's broadcast "g 0", as host a's bridge framed it.
        let frame = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(msg) = bcast.next().await {
                if msg.payload.windows(3).any(|w| w == b"log") {
                    return Some(msg.payload);
                }
            }
            None
        })
        .await
        .map_err(|_| "never saw the driver's broadcast".to_string())?
        .ok_or("subscription ended")?;
        let mut rng = common::Rng::new(15);
        for subject in [
            "bcast",
            "map",
            "presence",
            "host.a.call",
            "host.b.call",
            "host.a.consume",
        ] {
            for len in [0, 1, 7, 64, 300] {
                let junk = rng.bytes(len);
                nc.publish(format!("{prefix}.{subject}"), junk.into())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            // A frame's header with nothing right behind it.
            let mut cut = frame.to_vec();
            cut.truncate(12);
            nc.publish(format!("{prefix}.{subject}"), cut.into())
                .await
                .map_err(|e| e.to_string())?;
        }
        // Another cluster's frame on this cluster's subject.
        let mut other = frame.to_vec();
        let at = 6; // magic (4), kind (1), cluster length (1): the name
        other[at] = other[at].wrapping_add(1);
        nc.publish(format!("{prefix}.bcast"), other.into())
            .await
            .map_err(|e| e.to_string())?;
        // A replay of the real one.
        nc.publish(format!("{prefix}.bcast"), frame.clone())
            .await
            .map_err(|e| e.to_string())?;
        nc.flush().await.map_err(|e| e.to_string())?;
        Ok(())
    });
    result?;
    h.go("garbage")?;
    h.finish()
}

/// After garbage, another cluster's frame and a replay on the cluster's
/// subjects: host b's bridge counted them, ran the real broadcast once
/// only, and both hosts still work.
fn after_garbage(m: &mut Messenger) -> Check {
    wait_for_workers(m, 2)?;
    phase(m, "capture")?;
    m.broadcast("log", &("g".to_string(), 0u64))
        .map_err(|e| e.to_string())?;
    phase(m, "garbage")?;
    pause(m, Duration::from_millis(500))?;
    let b_slot = m
        .map::<_, String>("where", &(), deadline(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?
        .iter()
        .find(|(w, _)| !w.host.is_local())
        .map(|(w, _)| w.slot)
        .ok_or("no worker of b")?;
    let log = lines(&tmp().join(format!("log-b-{b_slot}")));
    ensure!(
        log.iter().filter(|l| *l == "g 0").count() == 1,
        "b's worker heard g 0 {} times: {log:?}",
        log.iter().filter(|l| *l == "g 0").count()
    );
    let bridge = m.bridge().ok_or("no bridge")?;
    let stats: BridgeStats = m
        .request(bridge.slot, STATS_EVENT, &(), deadline(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    // Host a's bridge hears bcast, map and presence: 3 subjects × 6 junk.
    ensure!(stats.garbage >= 18, "a's bridge: {stats:?}");
    ensure!(stats.other_cluster >= 1, "a's bridge: {stats:?}");
    let (host, _): (String, u32) = m
        .request_at("b", b_slot, "ping", &(), deadline(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    ensure!(host == "b", "{host}");
    Ok(())
}

fn lock_and_leader() -> Check {
    let mut h = Hosts::start(nats3()?);
    h.host("a", CLUSTER, 2, "")?;
    h.host("b", CLUSTER, 2, "")?;
    h.await_phase("kill-leader")?;
    h.kill_host("b");
    h.go("kill-leader")?;
    h.finish()
}

/// Four workers on two hosts take the lock `counter` ten times each: the
/// sections never overlap and their fencing tokens only grow. A topic
/// published on b reaches a subscriber here, this worker's own value comes
/// back, and a late subscriber gets the last value first. Then b's
/// workers campaign for the default role, one leads the cluster; a's
/// worker 1 campaigns too; host b is SIGKILLed and a's worker takes over
/// within the lease, with a larger term.
fn one_holder_one_leader(m: &mut Messenger) -> Check {
    wait_for_workers(m, 4)?;
    let dir = tmp();
    std::fs::write(dir.join("contend"), "").map_err(|e| e.to_string())?;
    contend(m, "a", CONTEND_ROUNDS)?;
    let until = Instant::now() + Duration::from_secs(60);
    while lines(&dir.join("contended")).len() < 4 {
        ensure!(
            Instant::now() < until,
            "contenders done: {:?}",
            lines(&dir.join("contended"))
        );
        pause(m, Duration::from_millis(20))?;
    }
    let run = lines(&dir.join("lockrun"));
    ensure!(
        run.len() == 2 * 4 * CONTEND_ROUNDS as usize,
        "{} lines",
        run.len()
    );
    let mut last = 0u64;
    for pair in run.chunks(2) {
        let enter: Vec<&str> = pair[0].split(' ').collect();
        let exit: Vec<&str> = pair[1].split(' ').collect();
        ensure!(
            enter[0] == "enter" && exit[0] == "exit" && enter[1..] == exit[1..],
            "sections overlap: {pair:?} in {run:?}"
        );
        let token: u64 = enter[1].parse().map_err(|e| format!("{e}"))?;
        ensure!(token > last, "token {token} after {last}");
        last = token;
    }
    let hosts: std::collections::BTreeSet<&str> =
        run.iter().map(|l| l.split(' ').nth(2).unwrap_or("")).collect();
    ensure!(hosts.len() == 2, "holders' hosts: {hosts:?}");

    // A topic's last value across hosts: published on b, then here.
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let g = got.clone();
    m.subscribe_global("config", deadline(Duration::from_secs(5)), move |v: String| {
        g.lock().unwrap().push(v)
    })
    .map_err(|e| e.to_string())?;
    std::fs::write(dir.join("publish-b"), "").map_err(|e| e.to_string())?;
    let until = Instant::now() + Duration::from_secs(10);
    while !got.lock().unwrap().contains(&"from b".to_string()) {
        ensure!(
            Instant::now() < until,
            "b's value never came: {:?}",
            got.lock().unwrap()
        );
        pause(m, Duration::from_millis(20))?;
    }
    m.publish_global("config", "from a", deadline(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let until = Instant::now() + Duration::from_secs(10);
    while got.lock().unwrap().last().map(String::as_str) != Some("from a") {
        ensure!(
            Instant::now() < until,
            "a's own value never came back: {:?}",
            got.lock().unwrap()
        );
        pause(m, Duration::from_millis(20))?;
    }
    // A late subscriber gets the last value first.
    let late = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let l = late.clone();
    m.subscribe_global("config", deadline(Duration::from_secs(5)), move |v: String| {
        l.lock().unwrap().push(v)
    })
    .map_err(|e| e.to_string())?;
    ensure!(
        late.lock().unwrap().first().map(String::as_str) == Some("from a"),
        "a late subscriber's first value: {:?}",
        late.lock().unwrap()
    );

    // A leader across hosts: b's workers campaign first.
    std::fs::write(dir.join("campaign-b"), "").map_err(|e| e.to_string())?;
    let b = HostId::of("b");
    let until = Instant::now() + Duration::from_secs(20);
    let first = loop {
        if let Some(l) = m
            .global_leader("", deadline(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?
        {
            break l;
        }
        ensure!(Instant::now() < until, "no leader across hosts");
        pause(m, Duration::from_millis(50))?;
    };
    ensure!(first.host == b, "the leader is not on b: {first:?}");
    ensure!(
        !m.is_global_leader("", deadline(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?,
        "a leads too"
    );
    // This worker campaigns as well; b keeps the role while it lives.
    m.campaign_global("").map_err(|e| e.to_string())?;
    pause(m, Duration::from_millis(500))?;
    let still = m
        .global_leader("", deadline(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    ensure!(still == Some(first), "the leader moved while b lived: {still:?}");
    phase(m, "kill-leader")?;
    let killed = Instant::now();
    let until = killed + Duration::from_secs(15);
    let next = loop {
        if let Some(l) = m
            .global_leader("", deadline(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?
        {
            if l.host.is_local() {
                break l;
            }
        }
        ensure!(Instant::now() < until, "no new leader after b died");
        pause(m, Duration::from_millis(50))?;
    };
    let took = killed.elapsed();
    ensure!(next.term > first.term, "term {} after {}", next.term, first.term);
    ensure!(
        next.slot == m.slot()
            && m.is_global_leader("", deadline(Duration::from_secs(2)))
                .map_err(|e| e.to_string())?,
        "{next:?}"
    );
    // The lease is 3 s; a look every half second at most.
    ensure!(
        took < Duration::from_secs(5),
        "a new leader {took:?} after the old one's host died"
    );
    eprintln!(
        "leader across hosts: b's died, a's led {took:?} later (term {} -> {})",
        first.term, next.term
    );
    Ok(())
}

/// The password of the scenario's NATS server.
const SECRET: &str = "s3cret-pw";

fn credentials() -> Check {
    let nats = NatsCluster::single_with(&format!(
        "authorization {{\n  user: shmc\n  password: {SECRET}\n}}"
    ))?;
    let url = nats.url(0);
    let mut h = Hosts::start(nats);
    let good = [
        ("SHMCLUSTER_NATS_USER", "shmc"),
        ("SHMCLUSTER_NATS_PASSWORD", SECRET),
    ];
    let bad = [
        ("SHMCLUSTER_NATS_USER", "shmc"),
        ("SHMCLUSTER_NATS_PASSWORD", "wrong"),
    ];
    h.host_with("a", CLUSTER, 2, "", &url, None, &good)?;
    h.host_with("b", CLUSTER, 2, "", &url, None, &good)?;
    h.host_with("c", CLUSTER, 1, "", &url, None, &bad)?;
    h.await_phase("argv")?;
    // What `ps` shows of every process of the hosts: never the password.
    for (host, master) in h.pids() {
        let mut pids = vec![master];
        if let Ok(children) = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children")) {
            pids.extend(children.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
        ensure!(pids.len() > 1, "host {host}: no children of its master");
        for pid in pids {
            let argv = std::fs::read(format!("/proc/{pid}/cmdline")).map_err(|e| format!("{pid}: {e}"))?;
            ensure!(
                !argv.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
                "host {host}'s process {pid} shows the password in its argv"
            );
        }
    }
    h.go("argv")?;
    h.finish()
}

/// Hosts a and b have the server's user and password (from the
/// environment), host c a wrong one: a and b meet, c never does.
fn with_credentials(m: &mut Messenger) -> Check {
    wait_for_workers(m, 4)?;
    phase(m, "argv")?;
    pause(m, Duration::from_millis(1500))?;
    let entries = m
        .map::<_, String>("where", &(), deadline(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let hosts: Vec<String> = entries
        .iter()
        .map(|(w, r)| format!("{}={:?}", w.host, r))
        .collect();
    ensure!(
        entries.len() == 4
            && entries
                .iter()
                .all(|(w, r)| r.is_ok() && w.host.name().as_deref() != Some("c")),
        "map with c refused by the server: {hosts:?}"
    );
    let r: Result<String, _> = m.request_at("c", 0, "where", &(), deadline(Duration::from_secs(2)));
    ensure!(matches!(r, Err(CallError::HostUnreachable(_))), "{r:?}");
    Ok(())
}
