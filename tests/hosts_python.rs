//! Hosts through NATS with workers of two languages: host `a` is a
//! fork-mode master of Rust workers (tests/common/hosts.rs), host `b` a
//! `shmcluster run --nats ... -- python3 tests/hosts_worker.py` of Python
//! workers using the C ABI (`libshmcluster.so`, built first, through the
//! `ffi/python` binding). Host `a`'s worker 0 drives: it requests, maps
//! and emits to the Python workers, which call the Rust workers back
//! (`request_at`, `emit_at`) and broadcast to them, with postcard written
//! by hand on the Python side.
//!
//! `harness = false`: a master must fork from a single-threaded process.
//! The scenario runs under its watchdog; hosts die with the scenario
//! process (`PR_SET_PDEATHSIG`), their workers and bridges with them.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shmcluster::{HostId, Messenger};

#[macro_use]
mod common;
#[path = "common/hosts.rs"]
mod hosts;
use common::python::build_library;
use common::{tmp, Check};
use hosts::{deadline, lines, nats3, pause, wait_for_workers, Hosts, Scenario, CLUSTER};

const SCENARIOS: &[Scenario] = &[Scenario {
    name: "python_workers_of_one_host_and_rust_workers_of_another",
    // A first build of libshmcluster.so included.
    timeout: Duration::from_secs(240),
    run: python_and_rust,
    drive: across_languages,
}];

fn main() {
    hosts::main("hosts_python", SCENARIOS);
}

fn python_and_rust() -> Check {
    let lib = build_library()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("ffi/python");
    let worker = root.join("tests/hosts_worker.py");
    let mut h = Hosts::start(nats3()?);
    let urls = h.nats.urls();
    h.host("a", CLUSTER, 2, "")?;
    let path = |p: &Path| {
        p.to_str()
            .map(str::to_owned)
            .ok_or(format!("{} is not UTF-8", p.display()))
    };
    let (lib, python, worker) = (path(&lib)?, path(&python)?, path(&worker)?);
    h.command_host(
        "b",
        &[
            env!("CARGO_BIN_EXE_shmcluster"),
            "run",
            "--nats",
            &urls,
            "--cluster-name",
            CLUSTER,
            "--host-id",
            "b",
            "-w",
            "2",
            "--",
            "python3",
            &worker,
        ],
        &[("SHMCLUSTER_LIB", &lib), ("PYTHONPATH", &python)],
    )?;
    h.finish()
}

/// Postcard of `(String, u32)`, the Rust `ping` answer, for this test's
/// few short values (one-byte lengths and slots).
fn rust_ping(host: &str, slot: u32) -> Vec<u8> {
    let mut out = vec![host.len() as u8];
    out.extend_from_slice(host.as_bytes());
    out.push(slot as u8);
    out
}

/// Maps, requests and emits between host `a`'s Rust workers and host
/// `b`'s Python workers, both ways.
fn across_languages(m: &mut Messenger) -> Check {
    // The Python workers answer the typed `where` with postcard they write.
    wait_for_workers(m, 4)?;
    let b = HostId::of("b");

    // (d) A map from here lists b's Python workers, after a's, with their
    // raw answers.
    let entries = m
        .map_bytes("ping", &[], deadline(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    ensure!(entries.len() == 4, "map entries: {entries:?}");
    let (a_entries, b_entries) = entries.split_at(2);
    for (who, r) in a_entries {
        ensure!(who.host.is_local(), "a's entries first: {entries:?}");
        ensure!(
            r.as_deref() == Ok(&rust_ping("a", who.slot)[..]),
            "a/{}: {r:?}",
            who.slot
        );
    }
    for (who, r) in b_entries {
        ensure!(who.host == b, "b's entries last: {entries:?}");
        ensure!(
            r.as_deref() == Ok(format!("python {}", who.slot).as_bytes()),
            "b/{}: {r:?}",
            who.slot
        );
    }
    let a_slots: Vec<u32> = a_entries.iter().map(|(w, _)| w.slot).collect();
    let b_slots: Vec<u32> = b_entries.iter().map(|(w, _)| w.slot).collect();

    // (a) A request to each Python worker by (host, slot).
    for &s in &b_slots {
        let answer = m
            .request_bytes_at("b", s, "ping", &[], deadline(Duration::from_secs(5)))
            .map_err(|e| format!("request b/{s}: {e}"))?;
        ensure!(
            answer == format!("python {s}").as_bytes(),
            "b/{s} answered {:?}",
            String::from_utf8_lossy(&answer)
        );
    }

    // (b) On an event from here, each Python worker requests `ping` of one
    // of a's Rust workers (this one included: it dispatches while it
    // waits) and emits the answer back here.
    let reports = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let reports = Arc::clone(&reports);
        // The text names the Python worker: a message from another host
        // comes out of this host's bridge, whose slot its Ctx::sender is.
        m.on_bytes("pyreport", move |_, data| {
            let text = String::from_utf8_lossy(data).into_owned();
            reports.lock().unwrap_or_else(|p| p.into_inner()).push(text);
            Vec::new()
        })
        .map_err(|e| e.to_string())?;
    }
    let me = u8::try_from(m.slot()).map_err(|e| e.to_string())?;
    for (&s, &a) in b_slots.iter().zip(&a_slots) {
        let a = u8::try_from(a).map_err(|e| e.to_string())?;
        m.emit_bytes_at("b", s, "pyask", &[me, a])
            .map_err(|e| format!("emit_at b/{s}: {e}"))?;
    }
    let until = Instant::now() + Duration::from_secs(15);
    let mut got = loop {
        let got = reports.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if got.len() >= b_slots.len() {
            break got;
        }
        ensure!(Instant::now() < until, "Python reports: {got:?}");
        pause(m, Duration::from_millis(20))?;
    };
    got.sort();
    let mut expected: Vec<_> = b_slots
        .iter()
        .zip(&a_slots)
        .map(|(s, a)| format!("pong {s} a {a}"))
        .collect();
    expected.sort();
    ensure!(got == expected, "Python reports {got:?}, expected {expected:?}");

    // (c) Each Python worker's broadcast reached every Rust worker of a.
    let dir = tmp();
    let until = Instant::now() + Duration::from_secs(10);
    for &a in &a_slots {
        let path = dir.join(format!("log-a-{a}"));
        loop {
            let log = lines(&path);
            let missing: Vec<_> = b_slots
                .iter()
                .filter(|s| !log.contains(&format!("py {s}")))
                .collect();
            if missing.is_empty() {
                ensure!(log.len() == b_slots.len(), "a/{a} logged more: {log:?}");
                break;
            }
            ensure!(
                Instant::now() < until,
                "a/{a} never logged the broadcasts of b/{missing:?}: {log:?}"
            );
            pause(m, Duration::from_millis(20))?;
        }
    }
    Ok(())
}
