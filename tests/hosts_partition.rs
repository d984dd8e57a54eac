//! Hosts through NATS across a network partition: host `b` runs in a
//! network namespace of its own and reaches the NATS cluster through a
//! veth pair this test makes; the scenario process takes the pair's root
//! end down (`ip link set <veth> down`) and later up again.
//!
//! Topology (one scenario process, `tests/common/hosts.rs`):
//!
//! ```text
//!   root namespace                                   namespace shmc-p<pid>
//!   NATS n0 (127.0.0.1) ── routes on 127.0.0.1 ── n1 (10.231.x.y+1) ══ veth ══ host b
//!       │                                             n2 (127.0.0.1)   (10.231.x.y+2/30)
//!   host a (driver)
//! ```
//!
//! Host `a` (2 workers, the driver among them) connects to node 0 on
//! 127.0.0.1; host `b` (2 serving workers and a *relay* worker that
//! broadcasts when asked, so that broadcasts can be seen going from b to
//! a) connects to node 1 on the veth's root-side address. Node 1 keeps its
//! routes to the others on 127.0.0.1: the cut separates host b from the
//! whole NATS cluster, and nothing else.
//!
//! Why `ip link set down` and not `tc` or `iptables`: iptables is not
//! installed here (nor needed in CI), and a link down drops every packet
//! both ways with nothing to load or undo but the link itself. Neither TCP
//! connection is reset: both ends just stop hearing each other, as in a
//! real partition, and TCP's retransmissions carry on once the link is up.
//!
//! Two scenarios: a short cut (about 1.1 s, the time it takes host a to
//! time b out and check the calls: healed before host b's NATS client,
//! which pings every 2 s, gives its connection up, so the same TCP
//! connection carries on after the heal) and a long one (12 s: b's client
//! drops its connection, and comes back on a new one after the heal,
//! asserted from node 1's `/connz`).
//!
//! Measured here (2 cores, with two busy loops besides; HOST_TIMEOUT 1 s,
//! heartbeat 100 ms), from the scenario process's clock around `ip link`;
//! each run prints its own (`partition timings: ...`):
//! - cut → `b Unreachable` on host a and `a Unreachable` on host b: 0.96
//!   to 1.07 s on both sides (the host timeout from the last heartbeat
//!   heard, checked every heartbeat); a map made at the cut settles b's
//!   entries as `HostUnreachable` then, not at its 5 s deadline.
//! - short cut, heal → `Joined` on both sides: 10 to 480 ms, b answering
//!   calls again after 370 to 470 ms (TCP retransmission timers on either
//!   end of the same connection). What a broadcast while b was
//!   unreachable still reaches b then: NATS had it in that connection.
//! - long cut, heal → b's new connection on node 1, and `a Joined` on b:
//!   0.8 to 2.1 s (the client's reconnect backoff, and connection attempts
//!   made during the cut that wait out their 2 s timeout). Host a saw `b
//!   Joined` earlier, 0.25 to 0.33 s after the heal, from presence frames
//!   still in b's old socket that TCP delivered once the link was up, then
//!   `b Unreachable` again a second later, then `Joined` for good with the
//!   new connection: asserted here is only that a ends with b joined.
//!
//! Clean-up: the namespace and the veth pair are named after the
//! scenario process's pid and deleted by a drop guard whatever happens. A
//! scenario process killed by its watchdog cannot run it: a `sh` child
//! blocked on a pipe from it deletes them when the pipe ends (the guard
//! closes it and reaps the `sh`; a kill closes it too). And each start
//! first deletes the `shmc-p<pid>` namespaces (and their veth) of pids no
//! longer running.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shmcluster::bridge::NatsConfig;
use shmcluster::{CallError, Cluster, HostEvent, HostId, MapError, Messenger, Worker, HOST_EVENT};

#[macro_use]
mod common;
#[path = "common/hosts.rs"]
mod hosts;
use common::nats::NatsCluster;
use common::{tmp, Check};
use hosts::{
    append, deadline, lines, pause, phase, wait_for_workers, Hosts, Scenario, CLUSTER, HOST_TIMEOUT,
};

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "a_short_partition_makes_hosts_unreachable_then_they_rejoin",
        timeout: Duration::from_secs(120),
        run: short_cut,
        drive: across_a_short_cut,
    },
    Scenario {
        name: "a_long_partition_outlasts_the_nats_connection_then_hosts_rejoin",
        timeout: Duration::from_secs(120),
        run: long_cut,
        drive: across_a_long_cut,
    },
];

/// How long the long scenario keeps the link down at least: longer than
/// b's NATS client takes to give up its connection (pings every 2 s).
const LONG_CUT: Duration = Duration::from_secs(12);

/// What "at once" allows on a loaded 2-core machine: far below every
/// deadline the calls are given.
const AT_ONCE: Duration = Duration::from_millis(500);

/// How late past its deadline a call may settle (scheduling).
const SLACK: Duration = Duration::from_millis(300);

/// Host b's relay worker: its index, and its answer to `where`.
const RELAY_INDEX: u32 = 2;
const RELAY_WHERE: &str = "b relay";

fn main() {
    // Host b of this suite has a relay worker (and never drives, so it
    // needs none of `hosts::main`'s scenario table).
    if std::env::var("SHMC_HOST").as_deref() == Ok("b") {
        std::process::exit(match host_b() {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("host b: {e}");
                1
            }
        });
    }
    hosts::main("hosts_partition", SCENARIOS);
}

// ------------------------------------------------------------------ host b

/// Host b: as `hosts::host_main`, but worker [`RELAY_INDEX`] is a relay.
fn host_b() -> Check {
    let var = |k: &str| std::env::var(k).map_err(|_| format!("{k} not set"));
    let workers: u32 = var("SHMC_WORKERS")?
        .parse()
        .map_err(|e| format!("SHMC_WORKERS: {e}"))?;
    let mut nats = NatsConfig::new(&var("SHMC_NATS")?, &var("SHMC_CLUSTER")?, "b");
    nats.heartbeat = Duration::from_millis(100);
    nats.host_timeout = HOST_TIMEOUT;
    let report = Cluster::builder()
        .workers(workers)
        .nats(nats)
        .run(|w| {
            if w.index() == RELAY_INDEX {
                relay(w)
            } else {
                hosts::serve(w)
            }
        })
        .map_err(|e| e.to_string())?;
    eprintln!("host b ended: {report:?}");
    Ok(())
}

/// The relay: answers `where` with [`RELAY_WHERE`], logs host events like
/// the other workers, and on a `relay` event `(tag, n)` broadcasts `log`
/// `(tag, 0..n)` to every worker of every host.
fn relay(w: Worker) -> Check {
    let mut m = Messenger::new(w);
    let slot = m.slot();
    let dir = tmp();
    m.on_request("where", |_, (): ()| Ok::<_, String>(RELAY_WHERE.to_string()))
        .map_err(|e| e.to_string())?;
    let path = dir.join(format!("hostevents-b-{slot}"));
    m.on(HOST_EVENT, move |_, e: HostEvent| {
        append(&path, &format!("{} {:?}", e.host, e.change))
    })
    .map_err(|e| e.to_string())?;
    let asked: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    {
        let asked = asked.clone();
        m.on("relay", move |_, job: (String, u64)| {
            asked.lock().unwrap_or_else(|p| p.into_inner()).push(job);
        })
        .map_err(|e| e.to_string())?;
    }
    m.worker().ready();
    while !m.worker().should_stop() {
        m.poll(Duration::from_millis(10)).map_err(|e| e.to_string())?;
        let jobs = std::mem::take(&mut *asked.lock().unwrap_or_else(|p| p.into_inner()));
        for (tag, n) in jobs {
            for seq in 0..n.min(1000) {
                m.broadcast("log", &(tag.clone(), seq))
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------- the veth pair

/// A network namespace with one end of a veth pair in it, the other end
/// in the root namespace, a /30 between them; deleted on drop.
struct Veth {
    ns: String,
    /// The root namespace's end (the one the cut takes down).
    root: String,
    root_ip: Ipv4Addr,
    /// `sh` blocked reading this pipe: at its end (this guard dropped, or
    /// the scenario process killed by its watchdog before any guard
    /// could run) it deletes the pair and the namespace too.
    undertaker: Option<(Child, ChildStdin)>,
}

impl Veth {
    /// Namespace `shmc-p<pid>`, links `shp<pid>r` (root) and `shp<pid>n`,
    /// addresses 10.231.a.b+1 (root) and +2 in a /30 picked by the pid
    /// and checked unused on this machine first.
    fn create() -> Result<Self, String> {
        sweep_stale();
        let pid = std::process::id();
        let net = u32::from(Ipv4Addr::new(10, 231, 0, 0)) | ((pid & 0x3fff) << 2);
        let (root_ip, ns_ip) = (Ipv4Addr::from(net + 1), Ipv4Addr::from(net + 2));
        let mut veth = Self {
            ns: format!("shmc-p{pid}"),
            root: format!("shp{pid}r"),
            root_ip,
            undertaker: None,
        };
        // A leftover of an earlier process with this pid.
        veth.delete();
        unused(Ipv4Addr::from(net))?;
        let mut sh = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "read _; ip link del {} 2>/dev/null; ip netns del {} 2>/dev/null; exit 0",
                veth.root, veth.ns
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run sh: {e}"))?;
        let pipe = sh.stdin.take().ok_or("no pipe to sh")?;
        veth.undertaker = Some((sh, pipe));
        let peer = format!("shp{pid}n");
        let (ns, root) = (veth.ns.as_str(), veth.root.as_str());
        ip(&["netns", "add", ns])?;
        ip(&[
            "link", "add", root, "type", "veth", "peer", "name", &peer, "netns", ns,
        ])?;
        ip(&["addr", "add", &format!("{root_ip}/30"), "dev", root])?;
        ip(&["link", "set", root, "up"])?;
        ip(&["-n", ns, "addr", "add", &format!("{ns_ip}/30"), "dev", &peer])?;
        ip(&["-n", ns, "link", "set", &peer, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        Ok(veth)
    }

    fn cut(&self) -> Check {
        ip(&["link", "set", &self.root, "down"])
    }

    fn heal(&self) -> Check {
        ip(&["link", "set", &self.root, "up"])
    }

    /// Deletes the pair (both ends go with either) and the namespace.
    fn delete(&self) {
        let _ = ip(&["link", "del", &self.root]);
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        self.delete();
        if let Some((mut sh, pipe)) = self.undertaker.take() {
            drop(pipe);
            let _ = common::wait_child(&mut sh, Duration::from_secs(10));
        }
    }
}

/// `ip args...`; its stderr in the error.
fn ip(args: &[&str]) -> Check {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
    ensure!(
        out.status.success(),
        "ip {}: {} {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// `ip args...`'s output.
fn ip_output(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
    ensure!(out.status.success(), "ip {}: {}", args.join(" "), out.status);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fails if any address or route of this machine overlaps `net`/30.
fn unused(net: Ipv4Addr) -> Check {
    let text =
        ip_output(&["-4", "-o", "addr", "show"])? + &ip_output(&["-4", "route", "show", "table", "all"])?;
    let ours = u32::from(net);
    for word in text.split_whitespace() {
        let (addr, len) = word.split_once('/').unwrap_or((word, "32"));
        let (Ok(addr), Ok(len)) = (addr.parse::<Ipv4Addr>(), len.parse::<u32>()) else {
            continue;
        };
        // Two prefixes overlap when they agree on the shorter one's bits.
        let bits = len.min(30);
        let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
        ensure!(
            (u32::from(addr) ^ ours) & mask != 0,
            "{net}/30 is in use here ({word}): not making a veth pair on it"
        );
    }
    Ok(())
}

/// Deletes the `shmc-p<pid>` namespaces (and veth pairs) of this suite's
/// scenario processes that are no longer running.
fn sweep_stale() {
    let Ok(list) = ip_output(&["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name.strip_prefix("shmc-p").and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["link", "del", &format!("shp{pid}r")]);
            let _ = ip(&["netns", "del", name]);
        }
    }
}

// -------------------------------------------------------------- scenarios

fn short_cut() -> Check {
    partition(false)
}

fn long_cut() -> Check {
    partition(true)
}

fn across_a_short_cut(m: &mut Messenger) -> Check {
    across_a_partition(m, Duration::ZERO)
}

fn across_a_long_cut(m: &mut Messenger) -> Check {
    across_a_partition(m, LONG_CUT)
}

/// The ids of host `host`'s bridge connections on NATS server `i`.
fn bridge_cids(nats: &NatsCluster, i: usize, host: &str) -> Result<Vec<u64>, String> {
    let name = format!("shmcluster bridge {CLUSTER}/{host}");
    let connz = nats.monitor(i, "/connz")?;
    Ok(connz["connections"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter(|c| c["name"].as_str() == Some(name.as_str()))
                .filter_map(|c| c["cid"].as_u64())
                .collect()
        })
        .unwrap_or_default())
}

/// The host-event logs of `host`'s workers (`hostevents-<host>-<slot>`).
fn event_logs(dir: &Path, host: &str) -> Vec<Vec<String>> {
    let prefix = format!("hostevents-{host}-");
    let mut logs = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                logs.push(lines(&entry.path()));
            }
        }
    }
    logs
}

/// Whether a worker's host-event log says `host` is unreachable now.
fn cut_off(log: &[String], host: &str) -> bool {
    log.last().is_some_and(|l| *l == format!("{host} Unreachable"))
}

/// Whether a worker's host-event log says `host` joined again after it
/// was unreachable.
fn rejoined(log: &[String], host: &str) -> bool {
    let last = |what: &str| log.iter().rposition(|l| *l == format!("{host} {what}"));
    matches!((last("Unreachable"), last("Joined")), (Some(u), Some(j)) if j > u)
}

/// Waits (up to 15 s) until `n` workers of `host` each have a host-event
/// log that `test` accepts about `other`; how long that took from `since`.
fn wait_logs(
    dir: &Path,
    host: &str,
    other: &str,
    n: usize,
    test: fn(&[String], &str) -> bool,
    since: Instant,
) -> Result<Duration, String> {
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let logs = event_logs(dir, host);
        if logs.len() == n && logs.iter().all(|l| test(l, other)) {
            return Ok(since.elapsed());
        }
        ensure!(
            Instant::now() < until,
            "{host}'s workers' host events about {other}: {logs:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The scenario process: the veth pair, NATS with node 1 on its root end,
/// host a in the root namespace on node 0, host b in the namespace on
/// node 1; cuts the link and heals it when the driver says, and measures
/// how soon each side sees the other go and come back. With
/// `reconnects`, the cut is long enough that host b's bridge must come
/// back on a new NATS connection (asserted from node 1's `/connz`).
fn partition(reconnects: bool) -> Check {
    let veth = Veth::create()?;
    let nats = NatsCluster::start_with_client_ips(3, &[(1, veth.root_ip)])?;
    let mut h = Hosts::start(nats);
    let (url0, url1) = (h.nats.url(0), h.nats.url(1));
    h.host_at("a", CLUSTER, 2, "", &url0, None)?;
    h.host_at("b", CLUSTER, 3, "only_b", &url1, Some(&veth.ns))?;
    let dir = h.dir.clone();

    h.await_phase("cut")?;
    let cids_before = bridge_cids(&h.nats, 1, "b")?;
    veth.cut()?;
    let cut = Instant::now();
    h.go("cut")?;
    let a_lost = wait_logs(&dir, "a", "b", 2, cut_off, cut)?;
    let b_lost = wait_logs(&dir, "b", "a", 3, cut_off, cut)?;

    h.await_phase("heal")?;
    let held = cut.elapsed();
    veth.heal()?;
    let heal = Instant::now();
    h.go("heal")?;
    // Each side's `Joined`, and (for the record) when node 1 first shows
    // a connection of b's bridge that it did not have before the cut.
    let (mut a_back, mut b_back, mut new_conn) = (None, None, None);
    let until = heal + Duration::from_secs(15);
    while a_back.is_none() || b_back.is_none() || (reconnects && new_conn.is_none()) {
        let all = |host: &str, other: &str, n: usize| {
            let logs = event_logs(&dir, host);
            logs.len() == n && logs.iter().all(|l| rejoined(l, other))
        };
        if a_back.is_none() && all("a", "b", 2) {
            a_back = Some(heal.elapsed());
        }
        if b_back.is_none() && all("b", "a", 3) {
            b_back = Some(heal.elapsed());
        }
        if new_conn.is_none()
            && bridge_cids(&h.nats, 1, "b").is_ok_and(|c| c.iter().any(|c| !cids_before.contains(c)))
        {
            new_conn = Some(heal.elapsed());
        }
        ensure!(
            Instant::now() < until,
            "15 s after the heal: a saw b join {a_back:?}, b saw a join {b_back:?}, b's new \
             connection {new_conn:?}; host events: a {:?}, b {:?}",
            event_logs(&dir, "a"),
            event_logs(&dir, "b")
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The driver checks calls and broadcasts meanwhile; by its verdict
    // b's client has settled on one connection (or two, the old one not
    // yet timed out by the server).
    h.await_phase("done")?;
    let cids_after = bridge_cids(&h.nats, 1, "b")?;
    h.go("done")?;
    ensure!(
        !reconnects || cids_after.iter().any(|c| !cids_before.contains(c)),
        "b's bridge still on its connection from before the cut: {cids_before:?} then {cids_after:?}"
    );
    let driver = std::fs::read_to_string(dir.join("driver-times")).unwrap_or_default();
    eprintln!(
        "partition timings: link down {held:.2?}; cut -> a saw b unreachable {a_lost:.2?}, \
         b saw a unreachable {b_lost:.2?}; heal -> a saw b joined {a_back:.2?}, b saw a joined \
         {b_back:.2?}, b's new connection on node 1 {new_conn:.2?}; b's connections there before {cids_before:?}, after {cids_after:?}; \
         driver: {}; host events: a {:?}, b {:?}",
        driver.trim(),
        event_logs(&dir, "a"),
        event_logs(&dir, "b")
    );
    h.finish()
}

/// The entries of a map over `where`: host a's slots, host b's serving
/// slots, host b's relay slot.
fn slots(m: &mut Messenger) -> Result<(Vec<u32>, Vec<u32>, u32), String> {
    let entries = m
        .map::<_, String>("where", &(), deadline(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let b = HostId::of("b");
    let a_slots: Vec<u32> = entries
        .iter()
        .filter(|(w, _)| w.host.is_local())
        .map(|(w, _)| w.slot)
        .collect();
    let b_slots: Vec<u32> = entries
        .iter()
        .filter(|(w, r)| w.host == b && r.as_deref() == Ok("b"))
        .map(|(w, _)| w.slot)
        .collect();
    let relay = entries
        .iter()
        .find(|(w, r)| w.host == b && r.as_deref() == Ok(RELAY_WHERE))
        .map(|(w, _)| w.slot);
    match relay {
        Some(relay) if a_slots.len() == 2 && b_slots.len() == 2 => Ok((a_slots, b_slots, relay)),
        _ => Err(format!("map entries: {entries:?}")),
    }
}

/// Broadcasts flow both ways: 20 of host a's reach both serving workers
/// of b, and 20 that b's relay makes reach both workers of a.
fn both_ways(m: &mut Messenger, tag: &str, a_slots: &[u32], b_slots: &[u32], relay: u32) -> Check {
    const N: u64 = 20;
    let dir = tmp();
    for seq in 0..N {
        m.broadcast("log", &(format!("{tag}-a"), seq))
            .map_err(|e| e.to_string())?;
    }
    m.emit_at("b", relay, "relay", &(format!("{tag}-b"), N))
        .map_err(|e| e.to_string())?;
    let wanted = |host: &str, slots: &[u32], from: &str| -> Vec<(String, usize)> {
        slots
            .iter()
            .map(|s| {
                let log = lines(&dir.join(format!("log-{host}-{s}")));
                let got = (0..N)
                    .filter(|seq| log.contains(&format!("{tag}-{from} {seq}")))
                    .count();
                (format!("{host}/{s}"), got)
            })
            .collect()
    };
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let got: Vec<_> = wanted("b", b_slots, "a")
            .into_iter()
            .chain(wanted("a", a_slots, "b"))
            .collect();
        if got.iter().all(|(_, n)| *n == N as usize) {
            return Ok(());
        }
        ensure!(
            Instant::now() < until,
            "broadcasts {tag}: of {N}, each worker heard {got:?}"
        );
        pause(m, Duration::from_millis(20))?;
    }
}

/// Host a's worker 0 across the partition: while the link is down, host
/// b becomes unreachable within about HOST_TIMEOUT and from then on
/// calls to it fail at once; once it is up, b rejoins and everything
/// works again. The link stays down `hold` at least.
fn across_a_partition(m: &mut Messenger, hold: Duration) -> Check {
    wait_for_workers(m, 5)?;
    let dir = tmp();
    let (a_slots, b_slots, relay) = slots(m)?;
    both_ways(m, "before", &a_slots, &b_slots, relay)?;

    phase(m, "cut")?;
    let cut = Instant::now();
    // A map right at the cut: b's workers' answers cannot come; its
    // entries settle as HostUnreachable when a's bridge times b out, not
    // at the deadline.
    let map_limit = Duration::from_secs(5);
    let entries = m
        .map::<_, String>("where", &(), cut + map_limit)
        .map_err(|e| e.to_string())?;
    let unreachable_after = cut.elapsed();
    let b = HostId::of("b");
    let of_b =
        |entries: &[(shmcluster::WorkerId, Result<String, MapError>)]| -> Vec<Result<String, MapError>> {
            entries
                .iter()
                .filter(|(w, _)| w.host == b)
                .map(|(_, r)| r.clone())
                .collect()
        };
    let a_ok = |entries: &[(shmcluster::WorkerId, Result<String, MapError>)]| {
        entries
            .iter()
            .filter(|(w, r)| w.host.is_local() && r.is_ok())
            .count()
            == 2
    };
    ensure!(
        a_ok(&entries) && of_b(&entries) == vec![Err(MapError::HostUnreachable); 3],
        "a map at the cut: {entries:?} in {unreachable_after:?}"
    );
    ensure!(
        unreachable_after < HOST_TIMEOUT + Duration::from_secs(2),
        "b unreachable only {unreachable_after:?} after the cut"
    );

    // From now on at once: a request, a map, a consume only b handles.
    let t = Instant::now();
    let r: Result<(String, u32), _> =
        m.request_at("b", b_slots[1], "ping", &(), deadline(Duration::from_secs(5)));
    ensure!(
        matches!(r, Err(CallError::HostUnreachable(_))) && t.elapsed() < AT_ONCE,
        "a request to unreachable b: {r:?} in {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    let entries = m
        .map::<_, String>("where", &(), deadline(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let map_took = t.elapsed();
    ensure!(
        map_took < AT_ONCE,
        "a map with b unreachable took {map_took:?}: {entries:?}"
    );
    // A host already unreachable at the map's start: an entry per worker
    // it last reported, HostUnreachable, at once.
    let late_map = of_b(&entries);
    ensure!(
        a_ok(&entries) && late_map == vec![Err(MapError::HostUnreachable); 3],
        "a map with b unreachable: {entries:?}"
    );
    let consume_limit = Duration::from_secs(2);
    let t = Instant::now();
    let consumed = m.consume("only_b", &(1u64, 0u64), t + consume_limit);
    let consume_took = t.elapsed();
    ensure!(
        matches!(consumed, Err(CallError::HostUnreachable(_))) && consume_took < consume_limit + SLACK,
        "a consume only b handles, b unreachable: {consumed:?} in {consume_took:?}"
    );
    // Both of a's workers heard b become unreachable.
    let until = Instant::now() + Duration::from_secs(2);
    while !a_slots
        .iter()
        .all(|s| cut_off(&lines(&dir.join(format!("hostevents-a-{s}"))), "b"))
    {
        ensure!(
            Instant::now() < until,
            "a's workers never heard b become unreachable"
        );
        pause(m, Duration::from_millis(10))?;
    }
    // A broadcast meanwhile goes to this host's workers and no further.
    let reached = m
        .broadcast("log", &("cut".to_string(), 0u64))
        .map_err(|e| e.to_string())?;
    while cut.elapsed() < hold {
        pause(m, Duration::from_millis(50))?;
    }

    phase(m, "heal")?;
    let heal = Instant::now();
    let limit = Duration::from_secs(1);
    let mut failed = Vec::new();
    let answered_after = loop {
        let t = Instant::now();
        let r: Result<(String, u32), _> = m.request_at("b", b_slots[0], "ping", &(), t + limit);
        let took = t.elapsed();
        ensure!(
            took < limit + SLACK,
            "a request to b after the heal took {took:?}: {r:?}"
        );
        match r {
            Ok((host, slot)) => {
                ensure!(
                    host == "b" && slot == b_slots[0],
                    "ping b answered by {host}/{slot}"
                );
                break heal.elapsed();
            }
            Err(CallError::HostUnreachable(_) | CallError::TimedOut) => {
                failed.push(format!("{r:?}"));
                pause(m, Duration::from_millis(20))?;
            }
            Err(e) => return Err(format!("a request to b after the heal: {e:?}")),
        }
        ensure!(
            heal.elapsed() < Duration::from_secs(20),
            "b not answering 20 s after the heal: {failed:?}"
        );
    };
    ensure!(
        answered_after < Duration::from_secs(8),
        "b answered only {answered_after:?} after the heal"
    );
    // A map sees every worker of both hosts again; a's workers heard b
    // join again; broadcasts go both ways; a consume runs on b.
    wait_for_workers(m, 5)?;
    let mapped_after = heal.elapsed();
    let (_, b_again, relay_again) = slots(m)?;
    ensure!(
        b_again == b_slots && relay_again == relay,
        "b's workers changed: {b_again:?} {relay_again}"
    );
    let until = Instant::now() + Duration::from_secs(5);
    while !a_slots
        .iter()
        .all(|s| rejoined(&lines(&dir.join(format!("hostevents-a-{s}"))), "b"))
    {
        ensure!(Instant::now() < until, "a's workers never heard b join again");
        pause(m, Duration::from_millis(10))?;
    }
    both_ways(m, "after", &a_slots, &b_slots, relay)?;
    let flowing_after = heal.elapsed();
    let done = m
        .consume("only_b", &(2u64, 0u64), deadline(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    ensure!(done.worker.host == b, "only_b ran on {:?}", done.worker);
    // Whether the broadcast made during the cut reached b late (through
    // the same TCP connection once the link was up): reported, not held.
    let late = b_slots
        .iter()
        .filter(|s| lines(&dir.join(format!("log-b-{s}"))).contains(&"cut 0".to_string()))
        .count();
    let times = format!(
        "b unreachable {unreachable_after:.2?} after the cut (the \
         map at the cut); later during the cut: map {map_took:.1?} with {} entries of b, consume {consumed:?} in \
         {consume_took:.1?}, broadcast reached {reached}; after the heal: b answered {answered_after:.2?} \
         ({} failed before), map of all {mapped_after:.2?}, broadcasts both ways {flowing_after:.2?}; \
         the cut's broadcast reached {late} of b's workers late",
        late_map.len(),
        failed.len()
    );
    std::fs::write(dir.join("driver-times"), times).map_err(|e| e.to_string())?;
    phase(m, "done")
}
