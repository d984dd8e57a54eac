//! A real NATS cluster on loopback, started and stopped by a test or a
//! bench: [`NatsCluster::start`]`(n)` runs `n` `nats-server` processes
//! (Debian's 2.9; `SHMC_NATS_SERVER` names another binary), each with its
//! own `server_name`, client, route and HTTP monitor ports on 127.0.0.1,
//! its own JetStream store, and routes to all the others; it returns once
//! every route is up and JetStream has a meta leader that every node knows.
//! [`NatsCluster::single`] is one server with JetStream and no cluster.
//!
//! Each node is a directory under one scratch directory (unique by pid and
//! a counter): `nats.conf`, `nats.log` (the server's stderr, appended to
//! across restarts) and `js/` (the store). Dropping the cluster SIGKILLs
//! and reaps every server and removes the directory. A server also gets
//! SIGKILL from the kernel when the thread that started it ends
//! (`PR_SET_PDEATHSIG`), so a test killed by its watchdog leaves no server
//! behind: start, restart and drop a cluster on one thread that outlives
//! it (a test's own thread; `block_on`, `block_in_place`, not
//! `spawn_blocking`).
//!
//! Free ports are found by binding port 0 and released just before the
//! servers start; another process may take one in between (tests run in
//! parallel), so a start whose server could not bind is retried with new
//! ports. Every wait is bounded ([`READY_WITHIN`], [`RESTART_WITHIN`])
//! and its error says what each node showed and ends with its log.
//!
//! What readiness means, from nats-server 2.9.10's monitor:
//! - `/routez`: `num_routes` ≥ n − 1 on every node;
//! - `/healthz`: `{"status":"ok"}` on every node, which on 2.9 also means
//!   JetStream is up and current with a meta leader — but right after the
//!   meta leader is killed the others still say ok, naming the dead leader,
//!   for about a second, so
//! - `/jsz`: every node names the same, non-empty `meta_cluster.leader`.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long [`NatsCluster::start`] and [`NatsCluster::restart`] wait for
/// the routes and JetStream (each try of a start: a bind failure starts
/// over with new ports).
pub const READY_WITHIN: Duration = Duration::from_secs(10);

/// How long [`NatsCluster::restart`] waits. Longer than a start: when the
/// server killed led JetStream's meta group, the others keep naming it for
/// a second or two and then elect another (3 to 6 s from the kill here,
/// under load).
pub const RESTART_WITHIN: Duration = Duration::from_secs(20);

/// Starts with new ports after a server failed to bind, at most this often.
const START_TRIES: u32 = 5;

/// Between two looks at the monitors.
const POLL: Duration = Duration::from_millis(50);

/// One monitor request's connect, write and read limit.
const HTTP_LIMIT: Duration = Duration::from_secs(1);

/// Makes each cluster's directory and name unique within this process.
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A node's three ports on 127.0.0.1.
#[derive(Debug, Clone, Copy)]
struct Ports {
    client: u16,
    route: u16,
    http: u16,
}

/// One server: its name, ports, directory and process (`None` while killed).
#[derive(Debug)]
struct Node {
    name: String,
    ports: Ports,
    /// The address its clients connect to: 127.0.0.1 unless
    /// [`NatsCluster::start_with_client_ips`] said otherwise.
    client_ip: Ipv4Addr,
    dir: PathBuf,
    child: Option<Child>,
}

/// A running cluster of `nats-server` processes with JetStream (see the
/// module's doc).
#[derive(Debug)]
pub struct NatsCluster {
    /// The cluster's scratch directory (removed on drop).
    dir: PathBuf,
    /// `cluster { name }` (unique, so that a stray route from another
    /// cluster on a reused port is refused).
    name: String,
    nodes: Vec<Node>,
}

/// What a node's monitor showed at one look (`None`: it did not answer).
#[derive(Debug, Default)]
struct NodeState {
    exited: Option<String>,
    routes: Option<u64>,
    health: Option<String>,
    leader: Option<String>,
}

/// Why a wait failed: a server could not bind (start again with other
/// ports) or anything else.
enum WaitError {
    Bind(String),
    Other(String),
}

impl WaitError {
    fn message(self) -> String {
        match self {
            WaitError::Bind(e) | WaitError::Other(e) => e,
        }
    }
}

impl NatsCluster {
    /// Starts `n` servers (≥ 1; one runs without a cluster block, as
    /// [`single`](Self::single)) and waits until they are ready.
    ///
    /// # Errors
    ///
    /// `nats-server` cannot be run, a server exits, or the cluster is not
    /// ready within [`READY_WITHIN`] (after [`START_TRIES`] tries if
    /// servers failed to bind): the message shows each node's state and log.
    pub fn start(n: usize) -> Result<Self, String> {
        Self::start_with_client_ips(n, &[])
    }

    /// Like [`start`](Self::start), but server `i` of each `(i, ip)` in
    /// `client_ips` listens for clients on `ip` instead of 127.0.0.1 (an
    /// address of a veth pair the test made, for a client in another
    /// network namespace: `tests/hosts_partition.rs`); its routes and
    /// monitor stay on 127.0.0.1, and [`url`](Self::url) names `ip`.
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub fn start_with_client_ips(n: usize, client_ips: &[(usize, Ipv4Addr)]) -> Result<Self, String> {
        Self::start_configured(n, client_ips, "")
    }

    /// One server with JetStream whose config ends with `extra` (say, an
    /// `authorization { .. }` block).
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub fn single_with(extra: &str) -> Result<Self, String> {
        Self::start_configured(1, &[], extra)
    }

    fn start_configured(n: usize, client_ips: &[(usize, Ipv4Addr)], extra: &str) -> Result<Self, String> {
        if n == 0 {
            return Err("a NATS cluster needs at least one server".into());
        }
        let mut last = String::new();
        for _ in 0..START_TRIES {
            let mut cluster = Self::configure(n, client_ips)?;
            for i in 0..n {
                if !extra.is_empty() {
                    let path = cluster.nodes[i].dir.join("nats.conf");
                    let conf =
                        std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                    std::fs::write(&path, format!("{conf}{extra}\n"))
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                }
                cluster.spawn(i)?;
            }
            match cluster.wait_ready(None) {
                Ok(()) => return Ok(cluster),
                // Drop kills what did start and removes this try's directory.
                Err(WaitError::Bind(e)) => last = e,
                Err(WaitError::Other(e)) => return Err(e),
            }
        }
        Err(format!(
            "NATS servers failed to bind {START_TRIES} times; last:\n{last}"
        ))
    }

    /// One server with JetStream, no cluster.
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub fn single() -> Result<Self, String> {
        Self::start(1)
    }

    /// The scratch directory that holds every node's config, log and
    /// store (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many servers (running or killed).
    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// Every client URL, comma-separated (for `NatsConfig::new`).
    pub fn urls(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Server `i`'s client URL, `nats://127.0.0.1:<port>` (or its own
    /// address: [`start_with_client_ips`](Self::start_with_client_ips)).
    ///
    /// # Panics
    ///
    /// If there is no server `i` (a test's own mistake).
    pub fn url(&self, i: usize) -> String {
        format!(
            "nats://{}:{}",
            self.nodes[i].client_ip, self.nodes[i].ports.client
        )
    }

    /// Server `i`'s `server_name` (what a client's `server_info()` shows).
    ///
    /// # Panics
    ///
    /// If there is no server `i`.
    pub fn server_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Server `i`'s process id, `None` while it is killed.
    ///
    /// # Panics
    ///
    /// If there is no server `i`.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    /// SIGKILLs server `i` and reaps it (nothing if it is not running).
    /// Its ports and store stay its own for [`restart`](Self::restart).
    ///
    /// # Panics
    ///
    /// If there is no server `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            // Child::kill sends SIGKILL; an error means it already exited.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts server `i` again (killing it first if it runs) on the same
    /// ports with the same store, and waits until every route is back and
    /// every node is healthy with one meta leader again.
    ///
    /// # Errors
    ///
    /// The server exits (a port taken meanwhile is tried again until the
    /// deadline) or the cluster is not ready within [`RESTART_WITHIN`].
    ///
    /// # Panics
    ///
    /// If there is no server `i`.
    pub fn restart(&mut self, i: usize) -> Result<(), String> {
        self.kill(i);
        let deadline = Instant::now() + RESTART_WITHIN;
        loop {
            self.spawn(i)?;
            match self.wait_ready(Some(deadline)) {
                Ok(()) => return Ok(()),
                Err(WaitError::Bind(_)) if Instant::now() < deadline => {
                    // Someone holds one of its ports for now: again.
                    self.kill(i);
                    std::thread::sleep(POLL * 4);
                }
                Err(e) => return Err(e.message()),
            }
        }
    }

    /// GETs `path` from server `i`'s HTTP monitor as JSON (`/varz`,
    /// `/routez`, `/jsz`, `/healthz`, ...).
    ///
    /// # Errors
    ///
    /// No answer within a second, or not JSON.
    ///
    /// # Panics
    ///
    /// If there is no server `i`.
    pub fn monitor(&self, i: usize, path: &str) -> Result<Value, String> {
        http_json(self.nodes[i].ports.http, path)
    }

    /// A fresh directory and ports for `n` nodes, each config written.
    fn configure(n: usize, client_ips: &[(usize, Ipv4Addr)]) -> Result<Self, String> {
        let seq = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("shmc-nats-{pid}-{seq}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut cluster = Self {
            dir,
            name: format!("shmc-{pid}-{seq}"),
            nodes: Vec::with_capacity(n),
        };
        for (i, ports) in free_ports(n)?.into_iter().enumerate() {
            let dir = cluster.dir.join(format!("n{i}"));
            std::fs::create_dir_all(dir.join("js")).map_err(|e| format!("{}: {e}", dir.display()))?;
            let client_ip = client_ips
                .iter()
                .find(|&&(j, _)| j == i)
                .map_or(Ipv4Addr::LOCALHOST, |&(_, ip)| ip);
            cluster.nodes.push(Node {
                name: format!("n{i}"),
                ports,
                client_ip,
                dir,
                child: None,
            });
        }
        for i in 0..n {
            let conf = cluster.config(i);
            let path = cluster.nodes[i].dir.join("nats.conf");
            std::fs::write(&path, conf).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(cluster)
    }

    /// Node `i`'s config file (nats-server 2.9 syntax).
    fn config(&self, i: usize) -> String {
        let node = &self.nodes[i];
        let mut conf = String::new();
        let _ = writeln!(conf, "server_name: {}", node.name);
        let _ = writeln!(conf, "listen: \"{}:{}\"", node.client_ip, node.ports.client);
        let _ = writeln!(conf, "http: \"127.0.0.1:{}\"", node.ports.http);
        // The limits keep a test's servers from reserving the machine's
        // memory and disk (by default 75 % of each).
        let _ = writeln!(
            conf,
            "jetstream {{\n  store_dir: {:?}\n  max_memory_store: 268435456\n  \
             max_file_store: 1073741824\n}}",
            node.dir.join("js").display().to_string()
        );
        if self.nodes.len() > 1 {
            let _ = writeln!(conf, "cluster {{");
            let _ = writeln!(conf, "  name: {}", self.name);
            let _ = writeln!(conf, "  listen: \"127.0.0.1:{}\"", node.ports.route);
            let _ = writeln!(conf, "  routes: [");
            for (j, other) in self.nodes.iter().enumerate() {
                if j != i {
                    let _ = writeln!(conf, "    \"nats-route://127.0.0.1:{}\"", other.ports.route);
                }
            }
            let _ = writeln!(conf, "  ]\n}}");
        }
        conf
    }

    /// Runs server `i` from its config, its stderr appended to its log.
    fn spawn(&mut self, i: usize) -> Result<(), String> {
        let bin = std::env::var("SHMC_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("nats.log"))
            .map_err(|e| format!("{}: {e}", node.dir.display()))?;
        let parent = std::process::id() as libc::pid_t;
        let mut command = Command::new(&bin);
        command
            .arg("-c")
            .arg(node.dir.join("nats.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: the closure runs in the forked child before exec and
        // only makes async-signal-safe calls (prctl, getppid, _exit), with
        // no allocation and no lock.
        unsafe {
            command.pre_exec(move || {
                // SIGKILL this server when the thread that forked it ends.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died before prctl: nobody would kill us.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            })
        };
        let child = command.spawn().map_err(|e| {
            format!("cannot run {bin} (Debian package nats-server; or set SHMC_NATS_SERVER): {e}")
        })?;
        node.child = Some(child);
        Ok(())
    }

    /// Waits until the running nodes are a ready cluster (see the
    /// module's doc; a node the test killed is left out), until `deadline`
    /// or [`READY_WITHIN`] from now.
    fn wait_ready(&mut self, deadline: Option<Instant>) -> Result<(), WaitError> {
        let deadline = deadline.unwrap_or_else(|| Instant::now() + READY_WITHIN);
        let started = Instant::now();
        loop {
            let states: Vec<Option<NodeState>> = (0..self.nodes.len()).map(|i| self.look(i)).collect();
            for (i, state) in states.iter().enumerate() {
                let Some(status) = state.as_ref().and_then(|s| s.exited.as_deref()) else {
                    continue;
                };
                let log = self.log_tail(i);
                let why = format!("NATS server {} exited ({status}):\n{log}", self.nodes[i].name);
                return Err(if log.contains("address already in use") {
                    WaitError::Bind(why)
                } else {
                    WaitError::Other(why)
                });
            }
            if ready(&states) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(WaitError::Other(self.describe(&states, started.elapsed())));
            }
            std::thread::sleep(POLL);
        }
    }

    /// One look at node `i`: `None` if the test killed it, else whether it
    /// exited by itself (then it is reaped), its routes, health and meta
    /// leader.
    fn look(&mut self, i: usize) -> Option<NodeState> {
        let node = &mut self.nodes[i];
        let child = node.child.as_mut()?;
        let mut state = NodeState::default();
        match child.try_wait() {
            Ok(Some(status)) => state.exited = Some(status.to_string()),
            Err(e) => state.exited = Some(e.to_string()),
            Ok(None) => {}
        }
        if state.exited.is_some() {
            node.child = None;
            return Some(state);
        }
        let http = node.ports.http;
        state.routes = http_json(http, "/routez")
            .ok()
            .and_then(|v| v["num_routes"].as_u64());
        state.health =
            http_json(http, "/healthz")
                .ok()
                .map(|v| match (v["status"].as_str(), v["error"].as_str()) {
                    (Some(status), None) => status.to_owned(),
                    (status, error) => format!("{} ({})", status.unwrap_or("?"), error.unwrap_or("")),
                });
        state.leader = http_json(http, "/jsz")
            .ok()
            .and_then(|v| v["meta_cluster"]["leader"].as_str().map(str::to_owned));
        Some(state)
    }

    /// Why the cluster is not ready: each node's state and log.
    fn describe(&self, states: &[Option<NodeState>], waited: Duration) -> String {
        let running = states.iter().flatten().count();
        let mut out = format!(
            "NATS cluster not ready after {waited:.1?}: want num_routes ≥ {} on each of the {running} \
             running servers, healthz ok, one meta leader; saw:",
            running.saturating_sub(1)
        );
        for (node, state) in self.nodes.iter().zip(states) {
            let ports = node.ports;
            let _ = write!(
                out,
                "\n  {} (client {}, route {}, http {}): ",
                node.name, ports.client, ports.route, ports.http
            );
            let _ = match state {
                None => write!(out, "killed"),
                Some(s) => write!(
                    out,
                    "routes {:?}, health {:?}, leader {:?}",
                    s.routes, s.health, s.leader
                ),
            };
        }
        for i in 0..self.nodes.len() {
            let _ = write!(out, "\n--- {} log:\n{}", self.nodes[i].name, self.log_tail(i));
        }
        out
    }

    /// The last lines of node `i`'s log.
    fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(self.nodes[i].dir.join("nats.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

/// Whether `states` (one per node, `None` for a killed one) show a ready
/// cluster: each running node routed to every other running one, healthy,
/// and (with more than one) naming the same meta leader.
fn ready(states: &[Option<NodeState>]) -> bool {
    let running: Vec<&NodeState> = states.iter().flatten().collect();
    let Some(first) = running.first() else {
        return false;
    };
    let routes = running.len() as u64 - 1;
    let clustered = states.len() > 1;
    let leader = first.leader.as_deref().unwrap_or_default();
    running.iter().all(|s| {
        s.routes.is_some_and(|r| r >= routes)
            && s.health.as_deref() == Some("ok")
            && (!clustered || (!leader.is_empty() && s.leader.as_deref() == Some(leader)))
    })
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `n` nodes' worth of distinct free ports: all bound at once on port 0
/// (so no two are the same), released together when this returns.
fn free_ports(n: usize) -> Result<Vec<Ports>, String> {
    let listeners = (0..3 * n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("binding a free port: {e}"))?;
    let ports = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    Ok(ports
        .chunks_exact(3)
        .map(|p| Ports {
            client: p[0],
            route: p[1],
            http: p[2],
        })
        .collect())
}

/// `GET path` from the monitor on 127.0.0.1:`port` (HTTP/1.0: the server
/// closes after its answer), its body parsed as JSON whatever the status
/// (`/healthz` answers 503 with a JSON reason).
fn http_json(port: u16, path: &str) -> Result<Value, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_LIMIT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(HTTP_LIMIT))
        .and_then(|()| stream.set_write_timeout(Some(HTTP_LIMIT)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(|e| e.to_string())?;
    let answer = String::from_utf8_lossy(&answer);
    let (_, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("GET {path}: no HTTP answer"))?;
    serde_json::from_str(body).map_err(|e| format!("GET {path}: {e}: {body:?}"))
}
