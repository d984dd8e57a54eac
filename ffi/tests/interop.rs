//! Rust, C and Python workers in one cluster started by `shmcluster run`.
//!
//! The command is `sh tests/interop/dispatch.sh`, which execs a program by
//! `SHMCLUSTER_INDEX`: instance 0 is this test binary again (the
//! `INTEROP_ROLE=rust-worker` role below: `Worker::from_env` and a
//! `Messenger`), instance 1 the C worker (`tests/interop/interop_worker.c`,
//! compiled with `cc` against the cdylib), instances 2 and 3 Python
//! (`tests/interop/worker.py`, the ctypes binding). The workers write what
//! they saw into files in a scratch directory; this test asserts on them:
//!
//! 1. each worker broadcasts one hello and every worker receives each
//!    hello exactly once;
//! 2. the C worker maps `whoami` over the Rust, C and Python workers;
//! 3. Python holds lock `shared` ~300 ms while C waits for it;
//! 4. the Python worker serves HTTP on the inherited listener (fd 3);
//! 5. a Python worker SIGKILLed inside a section: the next holder (C, then
//!    Rust after the respawn) sees owner-died;
//! 6. attach errors from C and Python (ABI version, a plain file or a
//!    closed descriptor as `SHMCLUSTER_FD`) are error codes, not crashes.
//!
//! `shmcluster stop --wait` ends the cluster; the master must exit 0. No
//! libtest runner: this binary is also the Rust worker. A watchdog kills
//! the master (its workers die with it) and fails the test if it hangs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shmcluster_rs::{Messenger, Target, Worker};

use common::cluster::{start_watchdog, Master, Reaped};
use common::library;

fn main() {
    if std::env::var_os("INTEROP_ROLE").is_some_and(|r| r == "rust-worker") {
        std::process::exit(rust_worker());
    }
    let bin = build_binaries();
    start_watchdog("interop", Duration::from_secs(120));
    let python = have_python();
    if python {
        rust_c_and_python_workers_in_one_cluster(&bin);
    }
    let mut checks = Checks::default();
    attach_errors_from_c(&mut checks);
    if python {
        attach_errors_from_python(&mut checks);
    } else {
        eprintln!("\n!!!!! python3 not found: the cluster and Python parts of the interop test were SKIPPED !!!!!\n");
    }
    checks.assert_none_failed("attach errors (ABI version, SHMCLUSTER_FD) from C and Python");
    println!("interop: ok");
}

// ------------------------------------------------------------ the Rust worker

/// Instance 0: hello, `whoami`, and the second owner-died round when the C
/// worker says `rust-round` (payload: the victim's slot).
fn rust_worker() -> i32 {
    match rust_worker_inner() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("rust worker: {e}");
            1
        }
    }
}

fn rust_worker_inner() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(std::env::var_os("INTEROP_DIR").ok_or("INTEROP_DIR is not set")?);
    let worker = Worker::from_env()?;
    let (index, slot) = (worker.index(), worker.slot());
    let mut m = Messenger::new(worker);

    let hellos = Arc::new(Mutex::new(Vec::<String>::new()));
    let h = Arc::clone(&hellos);
    m.on_bytes("hello", move |ctx, data| {
        let line = format!("{} {}", ctx.sender().slot, String::from_utf8_lossy(data));
        h.lock().unwrap().push(line);
        Vec::new()
    })?;
    m.on_bytes("whoami", move |_, _| format!("rust:{index}:{slot}").into_bytes())?;
    let round = Arc::new(Mutex::new(None::<(u32, u32)>));
    let r = Arc::clone(&round);
    m.on_bytes("rust-round", move |ctx, data| {
        let victim = std::str::from_utf8(data).ok().and_then(|s| s.parse().ok());
        *r.lock().unwrap() = victim.map(|v| (ctx.sender().slot, v));
        Vec::new()
    })?;
    let holding = Arc::new(AtomicBool::new(false));
    let hd = Arc::clone(&holding);
    m.on_bytes("holding", move |_, _| {
        hd.store(true, Ordering::SeqCst);
        Vec::new()
    })?;

    let worker = m.worker();
    worker.ready();
    let all_ready = worker.wait_all_ready(Duration::from_secs(15));
    let sent = m.emit_bytes(Target::All, "hello", format!("rust:{index}").as_bytes())?;
    put(
        &dir,
        "rust-broadcast.txt",
        &format!("all_ready={} sent={sent}\n", u8::from(all_ready)),
    );

    loop {
        m.run_until(|_| round.lock().unwrap().is_some())?;
        let Some((from, victim)) = round.lock().unwrap().take() else {
            break; // told to stop
        };
        m.emit_bytes(Target::Worker(victim), "die", b"victim-rust")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !holding.load(Ordering::SeqCst) && Instant::now() < deadline {
            m.poll(Duration::from_millis(20))?;
        }
        let text = if holding.load(Ordering::SeqCst) {
            let locks = m.locks()?;
            match locks.lock("victim-rust", Some(Duration::from_secs(10))) {
                Ok(guard) => format!(
                    "lock=ok owner_died={} token={}",
                    guard.previous_owner_died(),
                    guard.fencing_token()
                ),
                Err(e) => format!("lock=error {e}"),
            }
        } else {
            "holding=never".to_owned()
        };
        put(&dir, "rust-ownerdied.txt", &format!("{text}\n"));
        m.emit_bytes(Target::Worker(from), "rust-done", text.as_bytes())?;
    }
    let lines: String = hellos.lock().unwrap().iter().map(|l| format!("{l}\n")).collect();
    put(&dir, &format!("hello-{index}.txt"), &lines);
    Ok(())
}

/// Writes `text` to `dir/name` under a temporary name, then renames it.
fn put(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, text).expect("write a result file");
    std::fs::rename(&tmp, dir.join(name)).expect("rename a result file");
}

// ------------------------------------------------------------------ helpers

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("shmcluster-interop-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `cmd` to completion within `limit` (killed and reaped past it).
fn run(cmd: &mut Command, limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut child = Reaped(child);
    let status = child.wait_within(limit, &what);
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    if let Some(mut o) = child.0.stdout.take() {
        o.read_to_end(&mut stdout).expect("read stdout");
    }
    if let Some(mut e) = child.0.stderr.take() {
        e.read_to_end(&mut stderr).expect("read stderr");
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Runs `cmd`, which must exit 0; returns its stdout.
fn run_ok(cmd: &mut Command, limit: Duration) -> String {
    let what = format!("{cmd:?}");
    let out = run(cmd, limit);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}), not an error code:\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn have_python() -> bool {
    Command::new("python3")
        .args(["-c", "import ctypes"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Builds what the test runs besides itself, into this test's target
/// directory and profile (a no-op when up to date): the `shmcluster` binary
/// and this crate's cdylib. Returns the binary (`SHMCLUSTER_BIN` overrides
/// it).
fn build_binaries() -> PathBuf {
    run_ok(
        &mut common::cargo_build_cli_and_library(),
        Duration::from_secs(600),
    );
    if let Some(bin) = std::env::var_os("SHMCLUSTER_BIN") {
        return bin.into();
    }
    let bin = common::cli();
    assert!(bin.exists(), "cargo build did not make {}", bin.display());
    bin
}

/// Parses `key=value` words (the rest of the line after `message=` is one
/// value) from every line of `text`.
fn fields(text: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for line in text.lines() {
        let mut rest = line;
        while let Some((key, after)) = rest.split_once('=') {
            let key = key.trim().rsplit(' ').next().unwrap_or("").to_owned();
            if ["message", "text", "rust", "echo"].contains(&key.as_str()) {
                map.insert(key, after.to_owned());
                break;
            }
            let (value, tail) = after.split_once(' ').unwrap_or((after, ""));
            map.insert(key, value.to_owned());
            rest = tail;
        }
    }
    map
}

fn field<'a>(map: &'a BTreeMap<String, String>, key: &str, context: &str) -> &'a str {
    map.get(key)
        .unwrap_or_else(|| panic!("no {key}= in {context:?}"))
        .as_str()
}

fn num(map: &BTreeMap<String, String>, key: &str, context: &str) -> u64 {
    let value = field(map, key, context);
    value
        .parse()
        .unwrap_or_else(|_| panic!("{key}={value} is not a number in {context:?}"))
}

// ---------------------------------------------------------- 6: attach errors

const NOT_A_SEGMENT: &str = "101";
const IO: &str = "104";
const ABI_VERSION_MISMATCH: &str = "9";

/// Plain files to pass as `SHMCLUSTER_FD`: empty, a short text, and a MiB
/// of zeros (larger than a segment header).
fn plain_files(dir: &Path) -> Vec<PathBuf> {
    let files = [
        ("empty", Vec::new()),
        ("text", b"not a shmcluster segment\n".repeat(10)),
        ("zeros", vec![0u8; 1 << 20]),
    ];
    files
        .into_iter()
        .map(|(name, data)| {
            let path = dir.join(name);
            std::fs::write(&path, data).expect("write a plain file");
            path
        })
        .collect()
}

/// Expectations checked one by one, failing together at the end (so one
/// wrong code does not hide the others).
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    /// `key` of the helper's output `out` must be `want`.
    fn eq(&mut self, case: &str, out: &str, key: &str, want: &str) {
        let got = fields(out).get(key).cloned();
        if got.as_deref() != Some(want) {
            self.0.push(format!(
                "{case}: {key}={got:?}, expected {want:?}; output:\n{out}"
            ));
        }
    }

    /// `key` of `out` must satisfy `ok` (described by `what`).
    fn that(&mut self, case: &str, out: &str, key: &str, what: &str, ok: impl Fn(&str) -> bool) {
        let got = fields(out).get(key).cloned().unwrap_or_default();
        if !ok(&got) {
            self.0
                .push(format!("{case}: {key}={got:?} is not {what}; output:\n{out}"));
        }
    }

    fn assert_none_failed(self, what: &str) {
        assert!(self.0.is_empty(), "{what}:\n{}", self.0.join("\n"));
        println!("interop: {what}: ok");
    }
}

fn attach_errors_from_c(checks: &mut Checks) {
    let dir = TempDir::new("c-errors");
    let exe = common::compile(&manifest().join("tests/interop/interop_worker.c"));
    let out = run_ok(Command::new(&exe).arg("abi"), Duration::from_secs(30));
    checks.eq("C abi", &out, "abi_ok", "0");
    checks.eq(
        "C abi: SHMC_ABI_VERSION + 1",
        &out,
        "abi_next",
        ABI_VERSION_MISMATCH,
    );
    checks.eq("C abi: 0", &out, "abi_zero", ABI_VERSION_MISMATCH);
    let header = fields(&out).get("header").cloned().unwrap_or_default();
    checks.eq("C abi: library = header", &out, "library", &header);
    checks.that("C abi", &out, "text", "a text naming the version", |t| {
        t.to_lowercase().contains("version")
    });

    for file in plain_files(&dir.0) {
        let case = format!(
            "C: SHMCLUSTER_FD -> plain file {:?}",
            file.file_name().expect("name")
        );
        let out = run_ok(
            Command::new(&exe).arg("bad-fd").arg(&file),
            Duration::from_secs(30),
        );
        checks.eq(&case, &out, "from_env", NOT_A_SEGMENT);
        checks.eq(&case, &out, "worker_null", "1");
        checks.that(&case, &out, "message", "a detail message", |m| !m.is_empty());
        checks.eq(&case, &out, "create", "0");
        checks.eq(&case, &out, "attach", "0");
    }

    let out = run_ok(Command::new(&exe).arg("closed-fd"), Duration::from_secs(30));
    checks.eq("C: SHMCLUSTER_FD not open", &out, "from_env", IO);
    checks.eq("C: SHMCLUSTER_FD not open", &out, "create", "0");
}

fn python(args: &[&str]) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(manifest().join("tests/interop/worker.py"))
        .args(args)
        .env("PYTHONPATH", manifest().join("python"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("SHMCLUSTER_LIB", library());
    cmd
}

fn attach_errors_from_python(checks: &mut Checks) {
    let dir = TempDir::new("py-errors");
    let out = run_ok(&mut python(&["abi"]), Duration::from_secs(30));
    checks.eq("Python abi", &out, "abi_ok", "0");
    checks.eq(
        "Python abi: ABI_VERSION + 1",
        &out,
        "abi_next",
        ABI_VERSION_MISMATCH,
    );
    let binding = fields(&out).get("binding").cloned().unwrap_or_default();
    checks.eq("Python abi: library = binding", &out, "library", &binding);

    for file in plain_files(&dir.0) {
        let case = format!(
            "Python: SHMCLUSTER_FD -> plain file {:?}",
            file.file_name().expect("name")
        );
        let path = file.to_str().expect("UTF-8 path");
        let out = run_ok(&mut python(&["bad-fd", path]), Duration::from_secs(30));
        checks.eq(&case, &out, "from_env", NOT_A_SEGMENT);
        checks.eq(&case, &out, "class", "ShmclusterError");
        checks.that(&case, &out, "message", "naming the call", |m| {
            m.contains("worker_from_env")
        });
        checks.eq(&case, &out, "echo", "still alive");
    }
    let out = run_ok(&mut python(&["closed-fd"]), Duration::from_secs(30));
    checks.eq("Python: SHMCLUSTER_FD not open", &out, "from_env", IO);
    checks.eq("Python: SHMCLUSTER_FD not open", &out, "echo", "still alive");
}

// ------------------------------------------------------------- the cluster

/// Waits for `dir/name` to appear; returns its contents.
fn wait_file(dir: &Path, name: &str, timeout: Duration, master: &Master) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(dir.join(name)) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not appear within {timeout:?}; files: {:?}; master log so far: {:#?}",
            list(dir),
            master.log
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e} (files: {:?})", list(dir)))
}

/// GET / on `addr`; returns the whole reply.
fn http_get(addr: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: interop\r\nConnection: close\r\n\r\n")
        .expect("send the request");
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .unwrap_or_else(|e| panic!("read the reply from {addr}: {e} (so far {reply:?})"));
    reply
}

fn rust_c_and_python_workers_in_one_cluster(bin: &Path) {
    let started = Instant::now();
    let dir = TempDir::new("cluster");
    let results = dir.0.join("results");
    std::fs::create_dir_all(&results).expect("results dir");
    let c_exe = common::compile(&manifest().join("tests/interop/interop_worker.c"));
    let socket = dir.0.join("c.sock");

    let mut cmd = Command::new(bin);
    cmd.args(["run", "-w", "4", "--listen", "127.0.0.1:0", "--kill-timeout", "5"])
        .args(["--backoff-ms", "20", "--ready-timeout", "15", "--control"])
        .arg(&socket)
        .arg("--")
        .arg("sh")
        .arg(manifest().join("tests/interop/dispatch.sh"))
        .env("INTEROP_DIR", &results)
        .env("INTEROP_RUST_EXE", std::env::current_exe().expect("current_exe"))
        .env("INTEROP_C_EXE", &c_exe)
        .env("INTEROP_PY", manifest().join("tests/interop/worker.py"))
        .env("PYTHONPATH", manifest().join("python"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("SHMCLUSTER_LIB", library())
        .env_remove("INTEROP_ROLE");
    let mut master = Master::start(cmd);
    let addr = master.listening_address(Duration::from_secs(15));

    // 4: the Python worker (instance 2) serves HTTP on fd 3. The socket is
    // the master's, so the connection waits in its backlog until then.
    let reply = http_get(&addr);
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply:?}");
    assert!(
        reply.contains("python worker index=2 ") && reply.contains(" listeners=1"),
        "served by the Python worker from its one inherited listener: {reply:?}"
    );

    // The C worker writes c-done.txt when scenarios 1, 2, 3 and 5 are done.
    let done = wait_file(&results, "c-done.txt", Duration::from_secs(30), &master);

    let stop = run(
        Command::new(bin)
            .args(["stop", "--wait", "--control"])
            .arg(&socket),
        Duration::from_secs(30),
    );
    assert!(
        stop.status.success(),
        "shmcluster stop: {}\n{}",
        String::from_utf8_lossy(&stop.stdout),
        String::from_utf8_lossy(&stop.stderr)
    );
    let (code, log) = master.finish(Duration::from_secs(20));
    let files = list(&results);
    let all: String = files
        .iter()
        .map(|n| {
            format!(
                "--- {n}\n{}",
                std::fs::read_to_string(results.join(n)).unwrap_or_default()
            )
        })
        .collect();
    eprintln!("interop: result files:\n{all}");
    assert_eq!(
        code,
        Some(0),
        "the master exits 0 after a clean shutdown: {log:#?}"
    );
    assert!(log.iter().any(|l| l.contains("clean shutdown")), "{log:#?}");

    // 2: the map: one OK entry per worker, each answering with its own
    // language, instance and slot.
    let map = read(&results, "c-map.txt");
    let mut lines = map.lines();
    assert_eq!(lines.next(), Some("result=0"), "{map}");
    let mut by_who = BTreeMap::new();
    for line in lines {
        let cols: Vec<&str> = line.split(' ').collect();
        assert_eq!(cols.len(), 3, "slot status data: {map}");
        assert_eq!(cols[1], "0", "entry status OK: {map}");
        let (who, slot) = cols[2].rsplit_once(':').expect("lang:index:slot");
        assert_eq!(slot, cols[0], "each slot answered for itself: {map}");
        assert!(
            by_who.insert(who.to_owned(), cols[0].to_owned()).is_none(),
            "{map}"
        );
    }
    let expected: BTreeSet<&str> = ["rust:0", "c:1", "python:2", "python:3"].into();
    assert_eq!(
        by_who.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        expected,
        "{map}"
    );

    // 1: every hello reached every worker exactly once, from the slot that
    // sent it (a broadcast includes its sender).
    for (file, broadcast) in [
        ("rust-broadcast.txt", "rust"),
        ("c-broadcast.txt", "c"),
        ("py-broadcast.txt", "python"),
    ] {
        let text = read(&results, file);
        let f = fields(&text);
        assert_eq!(field(&f, "all_ready", &text), "1", "{broadcast}: {text}");
        assert_eq!(
            field(&f, "sent", &text),
            "4",
            "{broadcast}: to all 4 workers: {text}"
        );
        if let Some(r) = f.get("result") {
            assert_eq!(r, "0", "{text}");
        }
    }
    for index in 0..3 {
        let text = read(&results, &format!("hello-{index}.txt"));
        let mut got: Vec<(String, String)> = text
            .lines()
            .map(|l| {
                let (slot, who) = l.split_once(' ').expect("slot payload");
                (who.to_owned(), slot.to_owned())
            })
            .collect();
        got.sort();
        let mut want: Vec<(String, String)> = ["c:1", "python:2", "rust:0"]
            .iter()
            .map(|w| ((*w).to_owned(), by_who[*w].clone()))
            .collect();
        want.sort();
        assert_eq!(got, want, "instance {index}'s hellos, exactly once each: {text}");
    }

    // 3: C waited for the lock Python held for ~300 ms, and got it after
    // Python's last moment in the section (one CLOCK_MONOTONIC).
    let c_lock = read(&results, "c-lock.txt");
    let py = read(&results, "py-release.txt");
    let (cf, pf) = (fields(&c_lock), fields(&py));
    for key in ["emit", "lock", "unlock", "owner_died"] {
        assert_eq!(field(&cf, key, &c_lock), "0", "{key}: {c_lock}");
    }
    assert_eq!(field(&cf, "held", &c_lock), "1", "{c_lock}");
    assert_eq!(field(&pf, "owner_died", &py), "0", "{py}");
    let release = num(&pf, "release_ns", &py);
    let held_for = release - num(&pf, "acquired_ns", &py);
    assert!(held_for >= 300_000_000, "Python held the lock ~300 ms: {py}");
    assert!(
        num(&cf, "start_ns", &c_lock) < release,
        "C asked for the lock while Python held it: {c_lock} {py}"
    );
    assert!(
        num(&cf, "acquired_ns", &c_lock) >= release,
        "C got the lock only after Python's section ended: {c_lock} {py}"
    );
    let waited = num(&cf, "waited_ns", &c_lock);
    assert!(
        waited >= 50_000_000,
        "C waited ({waited} ns) for a lock Python held ~300 ms: {c_lock}"
    );

    // 5: the victim (Python, instance 3) died holding "victim-c", then
    // (respawned) "victim-rust"; C and then Rust saw owner-died.
    let od = read(&results, "c-ownerdied.txt");
    let f = fields(&od);
    for key in ["emit", "lock", "unlock", "lock2"] {
        assert_eq!(field(&f, key, &od), "0", "{key}: {od}");
    }
    assert_eq!(field(&f, "holding", &od), "1", "{od}");
    assert_eq!(
        field(&f, "owner_died", &od),
        "1",
        "C, the next holder, sees owner-died: {od}"
    );
    assert_eq!(
        field(&f, "owner_died2", &od),
        "0",
        "the lock was made consistent: {od}"
    );
    assert!(num(&f, "token2", &od) > num(&f, "token", &od), "{od}");
    let gen1 = num(&f, "victim_generation", &od);
    assert!(
        files.contains(&format!("victim-victim-c-generation-{gen1}.txt")),
        "the victim held the lock when it was killed: {files:?}"
    );
    let df = fields(&done);
    assert_eq!(field(&df, "rust_done", &done), "1", "{done}");
    assert!(num(&df, "respawned_generation", &done) > gen1, "{done}");
    assert_eq!(field(&df, "state", &done), "2", "respawned victim Ready: {done}");
    let rust = read(&results, "rust-ownerdied.txt");
    assert!(
        rust.starts_with("lock=ok owner_died=true "),
        "Rust, the next holder after the respawned victim's death, sees owner-died: {rust}"
    );
    assert!(
        files
            .iter()
            .any(|n| n.starts_with("victim-victim-rust-generation-")),
        "{files:?}"
    );
    let killed = log
        .iter()
        .filter(|l| l.contains("worker 3 ended: killed by signal 9 "))
        .count();
    assert_eq!(killed, 2, "the victim was SIGKILLed twice: {log:#?}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    println!(
        "interop: Rust, C and Python workers in one cluster: ok ({:?})",
        started.elapsed()
    );
}
