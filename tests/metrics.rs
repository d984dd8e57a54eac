//! The metrics endpoint of a real master: `shmcluster run --metrics
//! 127.0.0.1:0 -- python3 tests/metrics/worker.py` (Python workers through
//! the C ABI, `libshmcluster.so` built first), scraped with a plain TCP
//! client and with `curl`, and every scrape parsed by Python's
//! `prometheus_client` (its OpenMetrics parser and its Prometheus text
//! parser, tests/metrics/parse.py) in a virtual environment this test
//! makes under `target/metrics-venv` (`python3 -m venv`, then `pip install
//! prometheus_client`, kept for later runs) unless `SHMC_METRICS_PYTHON`
//! names a python that imports it. No skip: without `python3-venv`, PyPI
//! or `curl` the test fails and says why.
//!
//! The master and its workers are killed when a test ends, whichever way
//! it ends (the master's workers die with it); every wait has a deadline.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_shmcluster");

#[path = "common/python.rs"]
mod python;
use python::root;

/// Builds the C library into this test's target directory and profile
/// (a no-op when it is up to date) and returns its path.
fn build_library() -> PathBuf {
    python::build_library().unwrap_or_else(|e| panic!("{e}"))
}

/// A python that imports `prometheus_client`: `SHMC_METRICS_PYTHON`, or
/// the virtual environment under `target/metrics-venv`, made on first use.
fn parser_python() -> PathBuf {
    python::venv_with(
        &["prometheus_client"],
        "metrics-venv",
        "import prometheus_client.openmetrics.parser, prometheus_client.parser",
        "SHMC_METRICS_PYTHON",
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// A parsed exposition: `(sample name, labels as k=v,...)` → value.
#[derive(Debug)]
struct Samples(BTreeMap<(String, String), f64>);

impl Samples {
    /// The value of `name{labels}` (`labels`: `k=v` joined by `,`, keys in
    /// order), if the exposition has it.
    fn get(&self, name: &str, labels: &str) -> Option<f64> {
        self.0.get(&(name.to_string(), labels.to_string())).copied()
    }

    fn value(&self, name: &str, labels: &str) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no {name}{{{labels}}} in the exposition: {self:?}"))
    }
}

/// Parses `text` with tests/metrics/parse.py (both of prometheus_client's
/// parsers); panics with the parser's complaint if either refuses it.
fn parse(python: &Path, text: &str) -> Samples {
    let mut child = Command::new(python)
        .arg(root().join("tests/metrics/parse.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("parse.py");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut samples = BTreeMap::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let mut f = line.split('\t');
        let (Some(name), Some(labels), Some(value)) = (f.next(), f.next(), f.next()) else {
            panic!("parse.py printed {line:?}");
        };
        samples.insert((name.to_string(), labels.to_string()), value.parse().unwrap());
    }
    Samples(samples)
}

/// `shmcluster run` with the metrics endpoint, killed (with its workers)
/// on drop.
struct Master {
    child: Child,
    control: PathBuf,
    metrics: SocketAddr,
    lines: mpsc::Receiver<String>,
    dir: PathBuf,
}

impl Master {
    fn start(name: &str, workers: u32) -> Self {
        let lib = build_library();
        let dir = std::env::temp_dir().join(format!("shmc-metrics-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let control = dir.join("ctl.sock");
        let mut child = Command::new(BIN)
            .args([
                "run",
                "-w",
                &workers.to_string(),
                "--metrics",
                "127.0.0.1:0",
                "--control",
            ])
            .arg(&control)
            .args(["--", "python3"])
            .arg(root().join("tests/metrics/worker.py"))
            .env("PYTHONPATH", root().join("ffi/python"))
            .env("SHMCLUSTER_LIB", lib)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("shmcluster run");
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("  | {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // The master names its endpoint on its first line, with its other
        // listeners.
        let deadline = Instant::now() + Duration::from_secs(30);
        let metrics = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines
                .recv_timeout(left)
                .expect("the master's first line within 30 s");
            if let Some(at) = line.find("metrics http://") {
                let rest = &line[at + "metrics http://".len()..];
                let addr = rest.split("/metrics").next().unwrap();
                break addr.parse().unwrap_or_else(|_| panic!("no address in {line:?}"));
            }
        };
        Self {
            child,
            control,
            metrics,
            lines,
            dir,
        }
    }

    /// A scrape over a plain TCP connection: the status line, headers and
    /// body, with its checks (200, the OpenMetrics type, the length).
    fn scrape_tcp(&self) -> String {
        let (head, body) = raw_request(self.metrics, b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains("Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n"),
            "{head}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{head}"
        );
        body
    }

    /// A scrape with `curl`.
    fn scrape_curl(&self) -> String {
        let out = Command::new("curl")
            .args(["--silent", "--show-error", "--fail", "--max-time", "10"])
            .arg(format!("http://{}/metrics", self.metrics))
            .output()
            .expect("curl (Debian: apt-get install curl)");
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Scrapes (plain TCP) and parses until `done` holds of the samples.
    fn scrape_until(&self, python: &Path, what: &str, done: impl Fn(&Samples) -> bool) -> Samples {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let samples = parse(python, &self.scrape_tcp());
            if done(&samples) {
                return samples;
            }
            assert!(Instant::now() < deadline, "not within 60 s: {what}: {samples:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `shmcluster stat`, which must answer within `within`.
    fn stat(&self, within: Duration) -> String {
        let started = Instant::now();
        let out = Command::new(BIN)
            .args(["stat", "--control"])
            .arg(&self.control)
            .output()
            .unwrap();
        let took = started.elapsed();
        assert!(
            out.status.success(),
            "stat: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(took < within, "stat took {took:?}");
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        while self.lines.try_recv().is_ok() {}
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends `request` on a new connection and reads the whole response:
/// (status line and headers, body).
fn raw_request(addr: SocketAddr, request: &[u8]) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("the whole response within 10 s");
    let text = String::from_utf8(got).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (format!("{head}\r\n"), body.to_string())
}

fn kill(pid: u32) {
    let status = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Two Python workers: both ready, worker 0's lock sections and request
/// counted, a `SIGKILL`ed worker's exit and restart counted; scraped with
/// a plain client and with curl, parsed by both of prometheus_client's
/// parsers.
#[test]
fn a_real_master_is_scraped_and_its_figures_parse() {
    let python = parser_python();
    let master = Master::start("figures", 2);

    let s = master.scrape_until(
        &python,
        "2 workers ready, the lock taken, the ping answered",
        |s| {
            s.get("shmcluster_workers", "state=ready") == Some(2.0)
                && s.get("shmcluster_lock_acquisitions_total", "lock=metrics-test") == Some(3.0)
                && s.get("shmcluster_worker_messages_received_total", "slot=0")
                    .unwrap_or(0.0)
                    >= 1.0
                // Each worker publishes its counters to the segment on its
                // own schedule: the answer can be counted at slot 0 before
                // the request is at slot 1.
                && s.get("shmcluster_worker_messages_received_total", "slot=1")
                    .unwrap_or(0.0)
                    >= 1.0
        },
    );
    assert_eq!(s.value("shmcluster_instances", ""), 2.0);
    assert_eq!(s.value("shmcluster_worker_state", "slot=0,state=ready"), 1.0);
    assert_eq!(s.value("shmcluster_worker_state", "slot=0,state=starting"), 0.0);
    assert_eq!(s.value("shmcluster_worker_state", "slot=2,state=free"), 1.0);
    assert_eq!(s.value("shmcluster_worker_index", "slot=1"), 1.0);
    assert_eq!(s.value("shmcluster_events_total", "kind=online"), 2.0);
    assert_eq!(s.value("shmcluster_worker_restarts_total", "slot=1"), 0.0);
    assert_eq!(s.value("shmcluster_lock_waits_total", "lock=metrics-test"), 0.0);
    assert_eq!(
        s.value("shmcluster_lock_owner_died_total", "lock=metrics-test"),
        0.0
    );
    assert_eq!(s.value("shmcluster_lock_held_seconds", "lock=metrics-test"), 0.0);
    // Worker 0 asked slot 1 `ping` with 5 bytes; slot 1 answered 4.
    assert!(s.value("shmcluster_worker_messages_sent_total", "slot=0") >= 1.0);
    assert!(s.value("shmcluster_worker_messages_received_total", "slot=1") >= 1.0);
    assert!(s.value("shmcluster_worker_sent_bytes_total", "slot=0") >= 5.0);
    assert!(s.value("shmcluster_worker_received_bytes_total", "slot=0") >= 4.0);
    assert_eq!(s.value("shmcluster_worker_inbox_bytes", "slot=0"), 0.0);
    assert!(s.get("shmcluster_worker_futex_waits_total", "slot=0").is_some());
    assert!(s.get("shmcluster_worker_futex_wakes_total", "slot=1").is_some());
    assert!(s.value("shmcluster_worker_heartbeat_age_seconds", "slot=0") < 60.0);
    assert!(s.value("shmcluster_uptime_seconds", "") > 0.0);

    // curl reads the same exposition, and it parses the same way.
    let by_curl = parse(&python, &master.scrape_curl());
    assert_eq!(by_curl.value("shmcluster_workers", "state=ready"), 2.0);
    assert_eq!(
        by_curl.value("shmcluster_lock_acquisitions_total", "lock=metrics-test"),
        3.0
    );

    // A SIGKILLed worker: its exit, its restart, and both ready again.
    let pid = s.value("shmcluster_worker_pid", "slot=1") as u32;
    assert!(pid > 0);
    kill(pid);
    let s = master.scrape_until(&python, "worker 1's restart", |s| {
        s.get("shmcluster_worker_restarts_total", "slot=1") == Some(1.0)
            && s.get("shmcluster_workers", "state=ready") == Some(2.0)
    });
    assert_eq!(s.value("shmcluster_worker_exits_total", "reason=signaled"), 1.0);
    assert_eq!(s.value("shmcluster_events_total", "kind=exit"), 1.0);
    assert_eq!(s.value("shmcluster_events_total", "kind=online"), 3.0);
    assert_eq!(s.value("shmcluster_worker_restarts_total", "slot=0"), 0.0);
    assert_eq!(s.value("shmcluster_worker_generation", "slot=1"), 2.0);
    assert_ne!(s.value("shmcluster_worker_pid", "slot=1") as u32, pid);
    assert_eq!(s.value("shmcluster_crash_loops_total", ""), 0.0);
}

/// 100 slow clients (half a request line, then silence) and garbage
/// requests at once: `shmcluster stat` still answers promptly, each bad
/// request gets its HTTP error, and once the slow clients are dropped a
/// scrape is served again.
#[test]
fn slow_clients_and_garbage_do_not_stop_the_master() {
    let python = parser_python();
    let master = Master::start("abuse", 1);
    master.scrape_until(&python, "the worker ready", |s| {
        s.get("shmcluster_workers", "state=ready") == Some(1.0)
    });

    let slow: Vec<TcpStream> = (0..100)
        .filter_map(|_| {
            let mut s = TcpStream::connect(master.metrics).ok()?;
            let _ = s.write_all(b"GET /met");
            Some(s)
        })
        .collect();
    assert!(slow.len() >= 16, "only {} slow clients connected", slow.len());
    let stat = master.stat(Duration::from_secs(3));
    assert!(stat.contains("Ready"), "{stat}");

    // Past the slow clients' deadline (1 s), refusals are written whole.
    std::thread::sleep(Duration::from_millis(1500));
    for (request, status) in [
        (
            b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc".to_vec(),
            "405",
        ),
        (b"GET /secret HTTP/1.1\r\n\r\n".to_vec(), "404"),
        (b"\x00\x01garbage\xff\r\n\r\n".to_vec(), "400"),
        ([b'A'; 12_000].to_vec(), "431"),
    ] {
        let (head, _) = raw_request(master.metrics, &request);
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{:?}: {head}",
            String::from_utf8_lossy(&request[..16])
        );
        master.stat(Duration::from_secs(3));
    }
    // A slow client was dropped, not answered with the metrics.
    let mut first = slow.into_iter().next().unwrap();
    first.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let _ = first.read_to_end(&mut got);
    let got = String::from_utf8_lossy(&got);
    assert!(got.is_empty() || got.starts_with("HTTP/1.1 408 "), "{got}");

    let s = parse(&python, &master.scrape_curl());
    assert_eq!(s.value("shmcluster_workers", "state=ready"), 1.0);
    let stat = master.stat(Duration::from_secs(3));
    assert!(stat.contains("Ready"), "{stat}");
}

/// An address the endpoint cannot take is a start-up error (exit 2,
/// nothing started), named as given.
#[test]
fn an_unbindable_metrics_address_stops_the_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for (bad, why) in [
        (addr.as_str(), "Address already in use"),
        ("127.0.0.1:99999", "invalid"),
    ] {
        let out = Command::new(BIN)
            .args([
                "run",
                "-w",
                "1",
                "--ready-on-start",
                "--metrics",
                bad,
                "--",
                "true",
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&format!("cannot start: cannot serve the metrics on {bad}: "))
                && stderr.contains(why),
            "{stderr}"
        );
    }
}
