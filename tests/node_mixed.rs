//! Node.js, Python and Rust workers in one cluster: `shmcluster run -w 3
//! -- sh tests/node_mixed/dispatch.sh`, which execs, by instance number,
//! the Node.js worker tests/node_mixed/worker.js (0, the driver), the
//! Python worker tests/node_mixed/worker.py (1, the ctypes binding over
//! libshmcluster) and this test binary as a Rust worker (2,
//! `SHMC_ROLE=rust_worker`, [`rust_worker`]). Every payload is JSON text:
//! the Node.js package's default, `json` in Python, serde_json here over
//! the messenger's `*_bytes` calls.
//!
//! The Node.js worker drives and prints `RESULT <json>` lines; this file
//! checks them: a broadcast from each language reaches every worker exactly
//! once; a Node map over the three has each language's answer; requests
//! Node -> Python, Node -> Rust and back; errors across languages typed (a
//! Python exception is `HANDLER_FAILED` with its text, Rust bytes that are
//! not JSON `DECODE`, the same bytes fine with `raw`); a Node section
//! waiting on a lock
//! the Python worker holds runs only after Python released it; the Python
//! holder SIGKILLed inside its section leaves `ownerDied` to the Node
//! section waiting for it, and is respawned. Then the master is stopped
//! (`SIGTERM`), must exit 0, and must leave no process of its group. All
//! of it twice: the Node.js worker woken through its slot's eventfd, then
//! by its fallback waiter thread (`NODE_SHMCLUSTER_WAKE=thread`).
//!
//! Builds what it runs first: the addon (`node scripts/build.js`, as
//! `npm install` in node/) and libshmcluster.so. `harness = false`: the
//! scenario runs in this binary re-executed (`common::run_suite`) under a
//! watchdog; the master dies with it (`PR_SET_PDEATHSIG`), its workers
//! with the master.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shmcluster::{Messenger, Target, Worker};

#[macro_use]
mod common;
#[path = "common/node.rs"]
mod node;
use common::python::{build_library, root};
use common::Check;
use node::{build_addon, utf8, Master};

const SCENARIOS: &[(&str, Duration)] = &[
    // First builds of the addon (release) and the C library included.
    (EVENTFD, Duration::from_secs(600)),
    (THREAD, Duration::from_secs(120)),
];

/// The Node.js worker woken by libuv polling its slot's eventfd.
const EVENTFD: &str = "node_python_and_rust_workers_in_one_cluster";
/// The same with the Node.js worker's fallback wake, a waiter thread
/// (`NODE_SHMCLUSTER_WAKE=thread`).
const THREAD: &str = "node_python_and_rust_workers_node_woken_by_a_thread";

fn main() {
    if std::env::var("SHMC_ROLE").as_deref() == Ok("rust_worker") {
        let code = match rust_worker() {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("rust worker: {e}");
                1
            }
        };
        std::process::exit(code);
    }
    if let Ok(name) = std::env::var("SHMC_SCENARIO") {
        let wake = if name == THREAD { "thread" } else { "eventfd" };
        common::exit_scenario(&name, mixed(wake));
    }
    let (ran, failed) = common::run_suite("node_mixed", SCENARIOS);
    common::finish_suite(ran, &failed);
}

// ------------------------------------------------------------ the Rust worker

/// What the Rust worker's handlers leave to its loop, and what they count.
#[derive(Default)]
struct State {
    /// Broadcasts received per sender slot, and the sender's language.
    counts: BTreeMap<u32, u64>,
    langs: BTreeMap<u32, String>,
    /// Asked to broadcast (after the handler returned).
    broadcast: bool,
    /// `callNode` asks: (slot, x).
    calls: Vec<(u32, i64)>,
}

fn lock(s: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

fn to_json(v: &Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

/// The Rust worker: the handlers every language serves (see
/// tests/node_mixed/worker.py for the list), JSON text over the `*_bytes`
/// calls. A handler gets no messenger: sends are done by the loop after.
fn rust_worker() -> Check {
    let worker = Worker::from_env().map_err(|e| e.to_string())?;
    let mut m = Messenger::new(worker);
    let slot = m.slot();
    let state = Arc::new(Mutex::new(State::default()));
    let reg = |e: shmcluster::RegisterError| e.to_string();
    m.on_bytes("who", move |_, _| {
        to_json(&json!({ "lang": "rust", "slot": slot }))
    })
    .map_err(reg)?;
    m.on_bytes("square", |_, data| match serde_json::from_slice::<i64>(data) {
        Ok(x) => to_json(&json!({ "lang": "rust", "v": x.saturating_mul(x) })),
        Err(e) => to_json(&json!({ "lang": "rust", "error": e.to_string() })),
    })
    .map_err(reg)?;
    // Raw bytes that are not JSON: the Node caller's typed DECODE error.
    m.on_bytes("notJson", |_, _| vec![0xff, 0xfe]).map_err(reg)?;
    let s = Arc::clone(&state);
    m.on_bytes("doBroadcast", move |_, _| {
        lock(&s).broadcast = true;
        b"null".to_vec()
    })
    .map_err(reg)?;
    let s = Arc::clone(&state);
    m.on_bytes("bc", move |ctx, data| {
        let lang = serde_json::from_slice::<Value>(data)
            .ok()
            .and_then(|v| v["lang"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "?".into());
        let mut st = lock(&s);
        *st.counts.entry(ctx.sender().slot).or_default() += 1;
        st.langs.insert(ctx.sender().slot, lang);
        Vec::new()
    })
    .map_err(reg)?;
    let s = Arc::clone(&state);
    m.on_bytes("bcCounts", move |_, _| {
        let st = lock(&s);
        to_json(&json!({ "counts": st.counts, "langs": st.langs }))
    })
    .map_err(reg)?;
    let s = Arc::clone(&state);
    m.on_bytes("callNode", move |_, data| {
        if let Ok(v) = serde_json::from_slice::<Value>(data) {
            if let (Some(to), Some(x)) = (v["slot"].as_u64(), v["x"].as_i64()) {
                if let Ok(to) = u32::try_from(to) {
                    lock(&s).calls.push((to, x));
                }
            }
        }
        Vec::new()
    })
    .map_err(reg)?;
    m.worker().ready();
    while !m.worker().should_stop() {
        m.poll(Duration::from_millis(50)).map_err(|e| e.to_string())?;
        let (broadcast, calls) = {
            let mut st = lock(&state);
            (std::mem::take(&mut st.broadcast), std::mem::take(&mut st.calls))
        };
        if broadcast {
            m.emit_bytes(Target::All, "bc", &to_json(&json!({ "lang": "rust" })))
                .map_err(|e| e.to_string())?;
        }
        for (to, x) in calls {
            let deadline = Instant::now() + Duration::from_secs(5);
            let answer = m
                .request_bytes(to, "square", x.to_string().as_bytes(), deadline)
                .map_err(|e| format!("request square of {to}: {e}"))?;
            let answer: Value = serde_json::from_slice(&answer).map_err(|e| e.to_string())?;
            m.emit_bytes(
                Target::Worker(to),
                "report",
                &to_json(&json!({ "lang": "rust", "answer": answer })),
            )
            .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

// ------------------------------------------------------------ the scenario

/// Runs the cluster until the driver's `DONE`, stops it, and checks; the
/// Node.js worker must use the `wake` asked for.
fn mixed(wake: &str) -> Check {
    let lib = build_library()?;
    build_addon()?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let (lib, python, exe) = (utf8(&lib)?, utf8(&root().join("ffi/python"))?, utf8(&exe)?);
    let mut master = Master::start(
        &["run", "-w", "3", "--", "sh", "tests/node_mixed/dispatch.sh"],
        &[
            ("SHMCLUSTER_LIB", &lib),
            ("PYTHONPATH", &python),
            ("NODE_MIXED_RUST", &exe),
            ("NODE_SHMCLUSTER_WAKE", wake),
        ],
    )?;
    let end = master.wait_line(Duration::from_secs(120), |l| {
        l == "DONE" || l.starts_with("FAILED")
    })?;
    ensure!(end == "DONE", "the driver failed\n{}", master.transcript());
    let mut results = BTreeMap::new();
    for line in master.stdout() {
        if let Some(json) = line.strip_prefix("RESULT ") {
            let v: Value = serde_json::from_str(json).map_err(|e| format!("{line}: {e}"))?;
            let name = v["name"].as_str().ok_or(format!("no name: {line}"))?.to_owned();
            results.insert(name, v["value"].clone());
        }
    }
    let checked = check(&results, wake);
    let status = master.stop(Duration::from_secs(20))?;
    let left = master.nothing_left();
    checked.map_err(|e| format!("{e}\n{}", master.transcript()))?;
    ensure!(
        status.success(),
        "the master ended with {status}\n{}",
        master.transcript()
    );
    // Only the planned death: the Python worker, once.
    let events = master.stderr();
    let ended: Vec<&str> = events.lines().filter(|l| l.contains(" ended: ")).collect();
    let killed: Vec<&&str> = ended
        .iter()
        .filter(|l| l.contains("killed by signal 9"))
        .collect();
    ensure!(
        killed.len() == 1 && killed[0].contains("worker 1 ended"),
        "deaths other than the Python holder's: {killed:?}\n{events}"
    );
    ensure!(
        ended.len() == 4 && events.contains("clean shutdown (1 restarts, 0 killed)"),
        "the master's events:\n{events}"
    );
    left
}

fn get<'a>(r: &'a BTreeMap<String, Value>, name: &str) -> Result<&'a Value, String> {
    r.get(name).ok_or(format!("no result {name}"))
}

fn check(r: &BTreeMap<String, Value>, wake: &str) -> Check {
    // Who is where: one worker of each language, in slots 0, 1, 2.
    let who = get(r, "who")?;
    let slot_of = |lang: &str| -> Result<u64, String> {
        who.as_array()
            .and_then(|a| a.iter().find(|e| e["value"]["lang"] == lang))
            .and_then(|e| e["slot"].as_u64())
            .ok_or(format!("no {lang} worker in {who}"))
    };
    let (node, py, rust) = (slot_of("node")?, slot_of("python")?, slot_of("rust")?);
    let node_wake = who
        .as_array()
        .and_then(|a| a.iter().find(|e| e["value"]["lang"] == "node"))
        .map(|e| &e["value"]["wake"]);
    ensure!(
        node_wake == Some(&json!(wake)),
        "the Node.js worker's wake: {who}"
    );
    let mut slots = [node, py, rust];
    slots.sort_unstable();
    ensure!(slots == [0, 1, 2], "slots {node} {py} {rust}");
    let lang_of = |s: u64| match s {
        s if s == node => "node",
        s if s == py => "python",
        _ => "rust",
    };

    // Broadcasts: every (sender, receiver) pair exactly once, with the
    // sender's language.
    let bc = get(r, "broadcast")?.as_array().ok_or("broadcast: not a list")?;
    ensure!(bc.len() == 3, "broadcast: {bc:?}");
    for e in bc {
        ensure!(e["ok"] == true, "broadcast entry {e}");
        let receiver = lang_of(e["slot"].as_u64().ok_or("no slot")?);
        for s in [node, py, rust] {
            let key = s.to_string();
            ensure!(
                e["value"]["counts"][&key] == 1,
                "{receiver} got {} broadcasts from {} (slot {s}): {e}",
                e["value"]["counts"][&key],
                lang_of(s)
            );
            ensure!(
                e["value"]["langs"][&key] == lang_of(s),
                "{receiver}: slot {s} said it is {}",
                e["value"]["langs"][&key]
            );
        }
        let total: u64 = e["value"]["counts"]
            .as_object()
            .ok_or("counts")?
            .values()
            .filter_map(Value::as_u64)
            .sum();
        ensure!(total == 3, "{receiver} got {total} broadcasts: {e}");
    }

    // A Node map: one ok entry per worker, in slot order, each language's
    // answer.
    let map = get(r, "map")?;
    let want: Vec<Value> = (0..3)
        .map(|s| json!({ "slot": s, "ok": true, "value": { "lang": lang_of(s), "v": 36 } }))
        .collect();
    ensure!(*map == Value::Array(want), "map: {map}");

    // Requests Node -> Python, Node -> Rust, and back.
    ensure!(
        *get(r, "requestPython")? == json!({ "ok": true, "value": { "lang": "python", "v": 49 } }),
        "requestPython: {}",
        r["requestPython"]
    );
    ensure!(
        *get(r, "requestRust")? == json!({ "ok": true, "value": { "lang": "rust", "v": 64 } }),
        "requestRust: {}",
        r["requestRust"]
    );
    ensure!(
        *get(r, "back-python")?
            == json!({ "sender": py, "lang": "python", "answer": { "lang": "node", "v": 81 } }),
        "back-python: {}",
        r["back-python"]
    );
    ensure!(
        *get(r, "back-rust")?
            == json!({ "sender": rust, "lang": "rust", "answer": { "lang": "node", "v": 100 } }),
        "back-rust: {}",
        r["back-rust"]
    );

    // Errors across languages are typed: a Python handler's exception is
    // HANDLER_FAILED with its text; Rust bytes that are not JSON, DECODE.
    let boom = get(r, "pythonThrows")?;
    ensure!(
        boom["ok"] == false
            && boom["code"] == "HANDLER_FAILED"
            && boom["message"]
                .as_str()
                .is_some_and(|m| m.contains(&format!("python {py} says no"))),
        "a throwing Python handler: {boom}"
    );
    let bad = get(r, "rustNotJson")?;
    ensure!(
        bad["ok"] == false && bad["code"] == "DECODE",
        "Rust bytes that are not JSON: {bad}"
    );
    let raw = get(r, "rustRaw")?;
    ensure!(
        *raw == json!({ "ok": true, "value": [255, 254] }),
        "the same bytes raw: {raw}"
    );

    // The lock Python held: a 100 ms wait timed out; the Node section
    // began waiting while Python held it and ran after Python released it.
    let lock = get(r, "lock")?;
    let num = |v: &Value, what: &str| v.as_u64().ok_or(format!("lock: no {what} in {lock}"));
    ensure!(
        lock["short"]["ok"] == false && lock["short"]["code"] == "LOCK_TIMEOUT",
        "a 100 ms wait on the held lock: {}",
        lock["short"]
    );
    let (held_at, released_at) = (
        num(&lock["held"]["t"], "held.t")?,
        num(&lock["released"]["t"], "released.t")?,
    );
    let (wait_start, acquired) = (
        num(&lock["waitStart"], "waitStart")?,
        num(&lock["section"]["acquired"], "acquired")?,
    );
    ensure!(
        held_at <= wait_start && wait_start < released_at,
        "Node began waiting at {wait_start}, Python held it {held_at}..{released_at}"
    );
    ensure!(
        acquired >= released_at,
        "Node's section ran at {acquired}, before Python released the lock at {released_at}"
    );
    ensure!(
        released_at - held_at >= 550,
        "Python held the lock {} ms, not 600",
        released_at - held_at
    );
    ensure!(
        num(&lock["section"]["token"], "token")? > num(&lock["held"]["token"], "held.token")?,
        "fencing tokens: {lock}"
    );
    ensure!(
        lock["section"]["ownerDied"] == false,
        "ownerDied after a release: {lock}"
    );

    // The holder SIGKILLed in its section.
    let od = get(r, "ownerDied")?;
    ensure!(
        od["enteredBeforeKill"] == false,
        "the Node section ran while Python held the lock: {od}"
    );
    ensure!(
        od["section"]["ok"] == true && od["section"]["value"]["ownerDied"] == true,
        "the section after the holder's death: {od}"
    );
    ensure!(
        od["again"]["ok"] == true && od["again"]["value"]["ownerDied"] == false,
        "the next section: {od}"
    );
    let tokens = [
        &od["holding"]["token"],
        &od["section"]["value"]["token"],
        &od["again"]["value"]["token"],
    ]
    .map(|t| t.as_u64().unwrap_or(0));
    ensure!(
        tokens[0] < tokens[1] && tokens[1] < tokens[2],
        "fencing tokens: {od}"
    );

    // The Python worker respawned and answers the map again.
    let re = get(r, "respawned")?;
    let entries = re["map"].as_array().ok_or(format!("respawned: {re}"))?;
    ensure!(entries.len() == 3, "respawned: {re}");
    let mut langs: Vec<&str> = entries
        .iter()
        .filter(|e| e["ok"] == true && e["value"]["v"] == 9)
        .filter_map(|e| e["value"]["lang"].as_str())
        .collect();
    langs.sort_unstable();
    ensure!(langs == ["node", "python", "rust"], "respawned: {re}");

    let errors = get(r, "errors")?;
    ensure!(*errors == json!([]), "the Node worker's errors: {errors}");
    Ok(())
}
