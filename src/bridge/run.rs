//! The bridge process: a tokio runtime, one NATS connection, and the
//! host's messenger as a driver of the call core.
//!
//! Workers of this host send the bridge what must cross hosts (their
//! messenger's call core picks it: see `messenger/core`); the bridge's
//! messenger hands each such message to [`Bridge::local`] instead of
//! handlers. What other hosts ask of this one arrives on NATS and runs here
//! through the same call core as any worker's call ([`AsyncMessenger`]'s
//! `request`, `map`, `consume`), so the bridge adds no second protocol.
//!
//! Subjects, under `shmc.<cluster>`:
//!
//! | subject                  | what                                              |
//! |--------------------------|---------------------------------------------------|
//! | `.bcast`                 | broadcasts: every bridge relays to its workers    |
//! | `.host.<host>.call`      | a request (reply wanted) or emit to one worker    |
//! | `.host.<host>.consume`   | a consume that spilled over to that host          |
//! | `.map`                   | a map's scatter; each other bridge answers        |
//! | `.presence`              | each bridge's heartbeat: its live workers         |

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::frame::{self, Header, Presence, Refused};
use super::lease::{self, Holder, LeaseError};
use super::NatsConfig;
use crate::messenger::{
    topic_event, wire, AsyncMessenger, BridgeIncoming, Granted, LeaderWire, Op, SettledOp as Settled,
    CAMPAIGN_EVENT, LEADER_EVENT, LOCK_EVENT, PUBLISH_EVENT, SUBSCRIBE_EVENT, UNLOCK_EVENT,
};
use crate::{CallError, HostChange, HostEvent, MapError, Messenger, Tag, Worker, HOST_EVENT};

/// The event a worker asks the bridge's counters with:
/// `messenger.request::<_, BridgeStats>(bridge.slot, STATS_EVENT, &(), deadline)`
/// (see [`Messenger::bridge`](crate::Messenger::bridge)).
pub const STATS_EVENT: &str = "shmcluster.bridge.stats";

/// A bridge's counters (see [`STATS_EVENT`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BridgeStats {
    /// Broadcasts this host's workers made that the bridge published.
    pub broadcasts_out: u64,
    /// Broadcasts of other hosts relayed to this host's workers.
    pub broadcasts_in: u64,
    /// Calls (request, emit, map, consume) this bridge sent to other hosts.
    pub calls_out: u64,
    /// Calls of other hosts run here.
    pub calls_in: u64,
    /// Consumes that went to the next host after one died or left with
    /// the task in hand.
    pub redeliveries: u64,
    /// NATS messages on the cluster's subjects that were not frames.
    pub garbage: u64,
    /// Frames of another cluster.
    pub other_cluster: u64,
    /// Broadcasts, emits and presences seen before (a replay, or an older
    /// incarnation's), dropped.
    pub replays: u64,
    /// Messages dropped otherwise: to a host not connected, a slot with no
    /// live worker, or too large for NATS (see `too_large`).
    pub dropped: u64,
    /// Messages refused because they were above the NATS server's
    /// `max_payload`.
    pub too_large: u64,
    /// Times the NATS client dropped messages of a subscription that
    /// fell behind (slow-consumer events; each may be many messages).
    pub slow_consumer: u64,
    /// Times this bridge's NATS connection was made (1 + reconnects).
    pub connections: u64,
    /// Presences dropped because they sat in a buffer for a host timeout
    /// or more (a partition's backlog).
    pub stale_presences: u64,
    /// Other hosts seen live now.
    pub hosts: u64,
}

#[derive(Default)]
struct Counters {
    broadcasts_out: AtomicU64,
    broadcasts_in: AtomicU64,
    calls_out: AtomicU64,
    calls_in: AtomicU64,
    redeliveries: AtomicU64,
    garbage: AtomicU64,
    other_cluster: AtomicU64,
    replays: AtomicU64,
    dropped: AtomicU64,
    too_large: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

/// Another host as this bridge knows it.
#[derive(Debug)]
struct HostInfo {
    epoch: u64,
    last_seen: Instant,
    presence: Presence,
    state: HostChange,
    /// The least (this bridge's time since its start) − (the presence's
    /// `uptime`) seen from this incarnation: the way's delay plus the
    /// clocks' offset. A presence whose difference is a host timeout or
    /// more above it sat in a buffer (a partition's backlog, flushed when
    /// the link comes back): it says nothing of the host now, and is
    /// dropped. It rises by up to a tenth of a heartbeat per presence, so
    /// that two clocks drifting apart never make every presence late.
    delay: i128,
}

/// The last frame number seen per (origin, kind), with the origin's epoch:
/// a frame not newer is a replay.
#[derive(Default)]
struct Seen {
    last: HashMap<(String, u8), (u64, u64)>,
}

impl Seen {
    /// Whether `h` is newer than everything seen from its origin of its
    /// kind (and records it if so).
    fn fresh(&mut self, h: &Header<'_>) -> bool {
        match self.last.get_mut(&(h.origin.to_owned(), h.kind)) {
            Some(last) if (h.epoch, h.seq) <= *last => false,
            Some(last) => {
                *last = (h.epoch, h.seq);
                true
            }
            None => {
                self.last.insert((h.origin.to_owned(), h.kind), (h.epoch, h.seq));
                true
            }
        }
    }
}

struct Bridge {
    m: AsyncMessenger,
    nc: async_nats::Client,
    cluster: String,
    host: String,
    prefix: String,
    epoch: u64,
    seq: AtomicU64,
    hosts: Mutex<BTreeMap<String, HostInfo>>,
    /// Bumped whenever a host's standing changes.
    hosts_changed: watch::Sender<u64>,
    /// Bumped whenever the NATS connection comes back: answers owed to
    /// this bridge meanwhile may be lost.
    reconnects: Arc<watch::Sender<u64>>,
    /// Slow-consumer events: messages the client dropped.
    slow: Arc<AtomicU64>,
    seen: Mutex<Seen>,
    counters: Counters,
    heartbeat: Duration,
    host_timeout: Duration,
    turn: AtomicU64,
    /// When this bridge started: presences carry their sender's time since
    /// its start (see `HostInfo::delay`).
    started: Instant,
    /// Presences dropped as stale (see `HostInfo::delay`).
    stale: AtomicU64,
    /// Until then a map does not take the hosts it has heard for all
    /// there are (two heartbeats: each host answers a new bridge's first
    /// presence at once, and beats anyway).
    warm_at: Instant,
    /// Until then (the host timeout from the start) "no such host" or "no
    /// host" is not an answer a call or consume settles with at once: a
    /// host is only known absent once silent that long.
    young_until: Instant,
    /// The key-value bucket's leases, opened at first use.
    leases: tokio::sync::OnceCell<lease::Leases>,
    lease: Duration,
    kv_replicas: usize,
    /// Roles this host campaigns for across hosts.
    roles: Mutex<std::collections::HashSet<String>>,
    /// Topics watched across hosts, with their subscribers here (slot,
    /// generation).
    topics: Mutex<HashMap<String, Vec<(u32, u32)>>>,
}

/// Runs the bridge until the master stops it; the exit code.
pub(crate) fn run(worker: Worker, config: &NatsConfig) -> i32 {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shmcluster bridge: cannot start a tokio runtime: {e}");
            return 1;
        }
    };
    // On a runtime worker, not the thread that blocks on it: a message a
    // worker sends the bridge then costs no wake of a thread outside the
    // runtime and no hop back onto one (the hosts bench: a worker to
    // another through the bridge, no NATS, 88 -> 47 us p50; a cross-host
    // request 250 -> 219 us).
    let config2 = config.clone();
    let served = rt.block_on(async move {
        tokio::spawn(serve(worker, config2))
            .await
            .unwrap_or_else(|e| Err(format!("the bridge's task ended: {e}")))
    });
    match served {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("shmcluster bridge {}: {e}", config.host_id);
            1
        }
    }
}

async fn connect(
    config: &NatsConfig,
    reconnects: Arc<watch::Sender<u64>>,
    slow: Arc<AtomicU64>,
) -> Result<async_nats::Client, String> {
    use super::NatsCredentials as C;
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!(
            "shmcluster bridge {}/{}",
            config.cluster_name, config.host_id
        ))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .ping_interval(Duration::from_secs(2))
        // A bridge that cannot reach NATS keeps trying, often: hosts are
        // unreachable to each other meanwhile.
        .reconnect_delay_callback(|attempts| Duration::from_millis((50 * attempts as u64).min(1000)))
        // A subscription's queue: messages past it are dropped by the
        // client (a slow consumer). async-nats's default is 65,536; a
        // burst of broadcasts from several hosts can pass that while the
        // bridge hands the previous ones to its workers.
        .subscription_capacity(1 << 18)
        .event_callback(move |event| {
            let reconnects = reconnects.clone();
            let slow = slow.clone();
            async move {
                tracing::info!(%event, "NATS connection");
                match event {
                    async_nats::Event::Connected => reconnects.send_modify(|n| *n += 1),
                    async_nats::Event::SlowConsumer(_) => {
                        slow.fetch_add(1, Relaxed);
                    }
                    _ => {}
                }
            }
        });
    opts = match &config.credentials {
        C::None => opts,
        C::UserPassword { user, password } => opts.user_and_password(user.clone(), password.clone()),
        C::Token(t) => opts.token(t.clone()),
        C::NkeySeed(seed) => opts.nkey(seed.clone()),
        C::CredsFile(path) => opts
            .credentials_file(path)
            .await
            .map_err(|e| format!("cannot read the creds file {}: {e}", path.display()))?,
    };
    if let Some(ca) = &config.tls.ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &config.tls.client_cert {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if config.tls.required {
        opts = opts.require_tls(true);
    }
    opts.connect(config.servers.as_slice())
        .await
        .map_err(|e| format!("cannot connect to NATS at {}: {e}", config.servers.join(",")))
}

async fn serve(worker: Worker, config: NatsConfig) -> Result<(), String> {
    config.validate().map_err(|e| e.to_string())?;
    let mut messenger = Messenger::new(worker);
    let (tx, mut rx) = mpsc::unbounded_channel::<BridgeIncoming>();
    messenger.set_bridge_hook(Box::new(move |incoming| {
        let _ = tx.send(incoming);
    }));
    let m = messenger.into_async();
    let reconnects = Arc::new(watch::channel(0).0);
    let slow = Arc::new(AtomicU64::new(0));
    let nc = connect(&config, reconnects.clone(), slow.clone()).await?;
    let epoch = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let bridge = Arc::new(Bridge {
        m,
        nc,
        prefix: format!("shmc.{}", config.cluster_name),
        cluster: config.cluster_name.clone(),
        host: config.host_id.clone(),
        epoch,
        seq: AtomicU64::new(0),
        hosts: Mutex::new(BTreeMap::new()),
        hosts_changed: watch::channel(0).0,
        reconnects,
        slow,
        seen: Mutex::default(),
        counters: Counters::default(),
        heartbeat: config.heartbeat,
        host_timeout: config.host_timeout,
        turn: AtomicU64::new(0),
        warm_at: Instant::now() + 2 * config.heartbeat.max(Duration::from_millis(50)),
        young_until: Instant::now() + config.host_timeout,
        started: Instant::now(),
        stale: AtomicU64::new(0),
        leases: tokio::sync::OnceCell::new(),
        lease: config.lease,
        kv_replicas: config.kv_replicas,
        roles: Mutex::default(),
        topics: Mutex::default(),
    });
    let b = &bridge;
    let subscribe = |subject: String| async move {
        b.nc.subscribe(subject.clone())
            .await
            .map_err(|e| format!("cannot subscribe to {subject}: {e}"))
    };
    let bcast = subscribe(format!("{}.bcast", b.prefix)).await?;
    let calls = subscribe(format!("{}.host.{}.call", b.prefix, b.host)).await?;
    let consumes = subscribe(format!("{}.host.{}.consume", b.prefix, b.host)).await?;
    let maps = subscribe(format!("{}.map", b.prefix)).await?;
    let presence = subscribe(format!("{}.presence", b.prefix)).await?;
    let tasks = [
        tokio::spawn(bridge.clone().relay_broadcasts(bcast)),
        tokio::spawn(bridge.clone().serve_calls(calls)),
        tokio::spawn(bridge.clone().serve_consumes(consumes)),
        tokio::spawn(bridge.clone().serve_maps(maps)),
        tokio::spawn(bridge.clone().watch_presence(presence)),
        tokio::spawn(bridge.clone().beat()),
        tokio::spawn(bridge.clone().renew_leases()),
    ];
    bridge.m.ready();
    tracing::info!(host = %bridge.host, cluster = %bridge.cluster, "bridge up");
    let mut stop_check = tokio::time::interval(Duration::from_millis(20));
    let mut max_payload = 0;
    loop {
        tokio::select! {
            incoming = rx.recv() => match incoming {
                Some(incoming) => bridge.local(incoming).await,
                None => break,
            },
            _ = stop_check.tick() => {
                if bridge.m.should_stop() {
                    break;
                }
                // Known once connected; a server may change it.
                let now = bridge.nc.server_info().max_payload;
                if now != max_payload {
                    max_payload = now;
                    bridge.m.set_bridge_max_payload(now);
                }
            }
        }
    }
    // Tell the others at once rather than let them time this host out.
    let _ = tokio::time::timeout(Duration::from_secs(1), bridge.publish_presence(true)).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), bridge.nc.flush()).await;
    for t in tasks {
        t.abort();
    }
    Ok(())
}

/// A [`wire::BRIDGED_EMIT`]'s payload: the origin, then the call.
fn relayed(origin: &str, slot: u32, generation: u32, call: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + origin.len() + 8 + call.len());
    wire::put_consumer(&mut out, origin, slot, generation);
    out.extend_from_slice(call);
    out
}

/// A reply frame's body: status, then the body.
fn reply_body(status: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + body.len());
    out.push(status);
    out.extend_from_slice(body);
    out
}

/// What a local call's end says on the wire: status and body.
fn answer_status(r: Result<Vec<u8>, CallError>) -> (u8, Vec<u8>) {
    match r {
        Ok(body) => (wire::OK, body),
        Err(CallError::NoHandler) => (wire::NO_HANDLER, Vec::new()),
        Err(CallError::HandlerFailed(t)) => (wire::FAILED, t.into_bytes()),
        Err(CallError::WorkerDied) => (wire::DIED, Vec::new()),
        Err(CallError::TimedOut) => (wire::TIMED_OUT, Vec::new()),
        Err(CallError::NoSuchWorker { slot }) => (
            wire::UNREACHABLE,
            format!("no worker slot {slot} there").into_bytes(),
        ),
        Err(e) => (wire::FAILED, e.to_string().into_bytes()),
    }
}

fn map_status(r: &Result<Vec<u8>, MapError>) -> (u8, &[u8]) {
    match r {
        Ok(body) => (wire::OK, body),
        Err(MapError::NoHandler) => (wire::NO_HANDLER, b""),
        Err(MapError::TimedOut) => (wire::TIMED_OUT, b""),
        Err(MapError::WorkerDied) => (wire::DIED, b""),
        Err(MapError::HostUnreachable) => (wire::UNREACHABLE, b""),
        Err(MapError::HandlerFailed(t)) => (wire::FAILED, t.as_bytes()),
        Err(_) => (wire::FAILED, b"failed"),
    }
}

/// The most other hosts a bridge keeps track of; presences of more are
/// dropped (counted as garbage).
const MAX_HOSTS: usize = 1024;

/// The longest a publish waits for room in the client's queue.
const PUBLISH_WAIT: Duration = Duration::from_secs(1);

/// How long before its caller's deadline a bridge answers, for the answer's
/// way back: a tenth of the time, between 2 and 50 ms.
fn margin(left: Duration) -> Duration {
    (left / 10).clamp(Duration::from_millis(2), Duration::from_millis(50))
}

/// The caller's deadline less the margin, from the time left it was told.
fn answer_by(left_ns: u64) -> Instant {
    // From another host: no call waits here longer than an hour.
    let left = Duration::from_nanos(left_ns).min(Duration::from_secs(3600));
    Instant::now() + left.saturating_sub(margin(left))
}

impl Bridge {
    fn header(&self, kind: u8) -> Header<'_> {
        Header {
            kind,
            cluster: &self.cluster,
            origin: &self.host,
            epoch: self.epoch,
            seq: self.seq.fetch_add(1, Relaxed),
        }
    }

    fn subject(&self, rest: &str) -> String {
        format!("{}.{rest}", self.prefix)
    }

    /// Parses a frame from NATS, counting what is refused.
    fn accept<'a>(&self, payload: &'a [u8]) -> Option<(Header<'a>, &'a [u8])> {
        match frame::decode(payload, &self.cluster) {
            Ok(f) => Some(f),
            Err(Refused::Garbage) => {
                bump(&self.counters.garbage);
                tracing::debug!(len = payload.len(), "garbage on the cluster's subjects dropped");
                None
            }
            Err(Refused::OtherCluster) => {
                bump(&self.counters.other_cluster);
                None
            }
        }
    }

    fn fresh(&self, h: &Header<'_>) -> bool {
        let fresh = self.seen.lock().unwrap_or_else(|p| p.into_inner()).fresh(h);
        if !fresh {
            bump(&self.counters.replays);
        }
        fresh
    }

    /// Publishes, counting a message too large for the server.
    async fn publish(&self, subject: String, payload: Vec<u8>) -> bool {
        if self.too_large(payload.len()).is_some() {
            tracing::warn!(len = payload.len(), "message above NATS max_payload dropped");
            return false;
        }
        // While NATS is away the client's queue fills and a publish waits
        // for room: not longer than this, so that the bridge's loop keeps
        // serving its host (stats, locks, the stop).
        match tokio::time::timeout(PUBLISH_WAIT, self.nc.publish(subject, payload.into())).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                bump(&self.counters.dropped);
                tracing::warn!(error = %e, "NATS publish failed");
                false
            }
            Err(_) => {
                bump(&self.counters.dropped);
                tracing::warn!("NATS publish: no room for {PUBLISH_WAIT:?}, dropped");
                false
            }
        }
    }

    /// Waits until this bridge has heard the hosts that are there (see
    /// `warm_at`), at most until `deadline`.
    async fn warm(&self, deadline: Instant) {
        let until = self.warm_at.min(deadline);
        if Instant::now() < until {
            tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
        }
    }

    /// Waits until `ready()` holds, at most until `deadline` and while this
    /// bridge is young (see `young_until`).
    async fn wait_while_young(&self, deadline: Instant, ready: impl Fn() -> bool) {
        let until = tokio::time::Instant::from_std(self.young_until.min(deadline));
        let mut changes = self.hosts_changed.subscribe();
        while !ready() && tokio::time::Instant::now() < until {
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// Whether `host` is connected now (heard within the host timeout).
    fn live(&self, host: &str) -> bool {
        self.hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(host)
            .is_some_and(|h| h.state == HostChange::Joined)
    }

    /// The other hosts connected now, with their last presence.
    fn live_hosts(&self) -> Vec<(String, Presence)> {
        self.hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, h)| h.state == HostChange::Joined)
            .map(|(name, h)| (name.clone(), h.presence.clone()))
            .collect()
    }

    /// The other hosts that have not left (connected, or cut off), with
    /// their last presence.
    fn known_hosts(&self) -> Vec<(String, Presence)> {
        self.hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, h)| h.state != HostChange::Left)
            .map(|(name, h)| (name.clone(), h.presence.clone()))
            .collect()
    }

    /// Whether a host known to this bridge is cut off now.
    fn any_unreachable(&self) -> bool {
        self.hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|h| h.state == HostChange::Unreachable)
    }

    /// `len` bytes are above the server's `max_payload` (unknown, 0,
    /// before the first connection: nothing is refused then).
    fn too_large(&self, len: usize) -> Option<Vec<u8>> {
        let max = self.nc.server_info().max_payload;
        (max != 0 && len > max).then(|| {
            bump(&self.counters.too_large);
            format!("{len} bytes is above the NATS server's max_payload of {max} bytes").into_bytes()
        })
    }

    // ------------------------------------------------------ from workers

    /// A message a worker of this host sent the bridge.
    async fn local(self: &Arc<Self>, incoming: BridgeIncoming) {
        match incoming.kind {
            // A broadcast (`emit(All)`): to every other host, in order.
            wire::BRIDGE_BCAST => {
                let h = self.header(frame::BCAST);
                let from = incoming.sender;
                let payload = frame::encode(
                    &h,
                    &[
                        &from.slot.to_le_bytes(),
                        &from.generation.to_le_bytes(),
                        &incoming.payload,
                    ],
                );
                if self.publish(self.subject("bcast"), payload).await {
                    bump(&self.counters.broadcasts_out);
                }
            }
            wire::BRIDGE_EMIT => self.route_emit(&incoming.payload, incoming.sender).await,
            wire::BRIDGE_CALL => {
                tokio::spawn(self.clone().route_call(incoming));
            }
            wire::BRIDGE_MAP => {
                tokio::spawn(self.clone().scatter_map(incoming));
            }
            wire::BRIDGE_CONSUME => {
                tokio::spawn(self.clone().spill_consume(incoming));
            }
            wire::REQUEST => {
                tokio::spawn(self.clone().request(incoming));
            }
            _ => {
                if let Some(reply) = incoming.reply {
                    reply.send(wire::NO_HANDLER, b"");
                }
            }
        }
    }

    /// A request a worker of this host made of the bridge itself: its
    /// counters, or a lease across hosts.
    async fn request(self: Arc<Self>, incoming: BridgeIncoming) {
        let Some(reply) = incoming.reply else { return };
        let Some(call) = wire::parse_call(&incoming.payload) else {
            reply.send(wire::FAILED, b"malformed request");
            return;
        };
        let holder = Holder {
            host: self.host.clone(),
            slot: incoming.sender.slot,
            generation: incoming.sender.generation,
        };
        let answer: Result<Vec<u8>, (u8, String)> = match call.name {
            STATS_EVENT => Ok(postcard::to_allocvec(&self.stats()).unwrap_or_default()),
            LOCK_EVENT => match postcard::from_bytes::<(String, u64)>(call.data) {
                Ok((name, left_ns)) => self.lock(&name, holder, left_ns).await,
                Err(e) => Err((wire::FAILED, e.to_string())),
            },
            UNLOCK_EVENT => match postcard::from_bytes::<(String, u64)>(call.data) {
                Ok((name, token)) => {
                    Ok(postcard::to_allocvec(&self.unlock(&name, &holder, token).await).unwrap_or_default())
                }
                Err(e) => Err((wire::FAILED, e.to_string())),
            },
            CAMPAIGN_EVENT => match postcard::from_bytes::<String>(call.data) {
                Ok(role) => {
                    let new = self
                        .roles
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(role.clone());
                    if new {
                        tokio::spawn(self.clone().lead(role));
                    }
                    Ok(postcard::to_allocvec(&()).unwrap_or_default())
                }
                Err(e) => Err((wire::FAILED, e.to_string())),
            },
            LEADER_EVENT => match postcard::from_bytes::<String>(call.data) {
                Ok(role) => self.global_leader(&role).await,
                Err(e) => Err((wire::FAILED, e.to_string())),
            },
            PUBLISH_EVENT => match postcard::from_bytes::<(String, Vec<u8>)>(call.data) {
                Ok((topic, value)) => self.publish_topic(&topic, value).await,
                Err(e) => Err((wire::FAILED, e.to_string())),
            },
            SUBSCRIBE_EVENT => match postcard::from_bytes::<String>(call.data) {
                Ok(topic) => self.subscribe_topic(topic, &holder).await,
                Err(e) => Err((wire::FAILED, e.to_string())),
            },
            _ => Err((wire::NO_HANDLER, String::new())),
        };
        match answer {
            Ok(body) => reply.send(wire::OK, &body),
            Err((status, text)) => reply.send(status, text.as_bytes()),
        }
    }

    /// The bucket's leases, opened at first use.
    async fn leases(&self) -> Result<&lease::Leases, (u8, String)> {
        self.leases
            .get_or_try_init(|| lease::open(&self.nc, &self.cluster, self.lease, self.kv_replicas))
            .await
            .map_err(|e| (wire::FAILED, e))
    }

    async fn lock(&self, name: &str, holder: Holder, left_ns: u64) -> Result<Vec<u8>, (u8, String)> {
        let deadline = answer_by(left_ns);
        let leases = self.leases().await?;
        let key = lease::key("lock", name);
        match leases.take(&key, holder.clone(), deadline).await {
            Ok(token) => {
                if self.m.live_generation(holder.slot) != Some(holder.generation) {
                    // It died while it waited.
                    leases.give_back(&key, token).await;
                    return Err((wire::DIED, String::new()));
                }
                if Instant::now() >= deadline {
                    // A store write that outlasted the time the caller
                    // waits: it may have given up already, and its "give
                    // back whatever I hold" (token 0) come before this
                    // grant; nobody would ever give the lock back.
                    leases.give_back(&key, token).await;
                    return Err((wire::TIMED_OUT, String::new()));
                }
                let granted = Granted {
                    token,
                    lease_ms: leases.lease().as_millis() as u64,
                };
                Ok(postcard::to_allocvec(&granted).unwrap_or_default())
            }
            Err(LeaseError::TimedOut) => Err((wire::TIMED_OUT, String::new())),
            Err(LeaseError::Store(e)) => Err((wire::FAILED, format!("the key-value store: {e}"))),
        }
    }

    /// Gives back `name` if `holder` holds it (with `token`, or any token
    /// if 0: a caller that gave up waiting).
    async fn unlock(&self, name: &str, holder: &Holder, token: u64) -> bool {
        let Some(leases) = self.leases.get() else {
            return false;
        };
        let key = lease::key("lock", name);
        match leases.holds(&key, holder) {
            Some(t) if token == 0 || t == token => leases.give_back(&key, t).await,
            _ => false,
        }
    }

    async fn global_leader(&self, role: &str) -> Result<Vec<u8>, (u8, String)> {
        let leases = self.leases().await?;
        let wire: Option<LeaderWire> = leases
            .holder(&lease::key("leader", role))
            .await
            .map_err(|e| (wire::FAILED, e))?
            .map(|(h, term)| LeaderWire {
                host: (h.host != self.host).then_some(h.host),
                slot: h.slot,
                generation: h.generation,
                term,
            });
        Ok(postcard::to_allocvec(&wire).unwrap_or_default())
    }

    async fn publish_topic(&self, topic: &str, value: Vec<u8>) -> Result<Vec<u8>, (u8, String)> {
        if let Some(why) = self.too_large(value.len() + wire::BRIDGE_FRAME_OVERHEAD) {
            return Err((wire::FAILED, String::from_utf8_lossy(&why).into_owned()));
        }
        let leases = self.leases().await?;
        leases
            .put(&lease::key("topic", topic), value)
            .await
            .map_err(|e| (wire::FAILED, format!("the key-value store: {e}")))?;
        Ok(postcard::to_allocvec(&()).unwrap_or_default())
    }

    /// Adds a subscriber of `topic` here (watching the topic's key from
    /// the first one on); answers the topic's last value.
    async fn subscribe_topic(self: &Arc<Self>, topic: String, who: &Holder) -> Result<Vec<u8>, (u8, String)> {
        let leases = self.leases().await?;
        let key = lease::key("topic", &topic);
        let first = {
            let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
            // A topic once watched stays watched (its entry stays).
            let first = !topics.contains_key(&topic);
            let subs = topics.entry(topic.clone()).or_default();
            if !subs.contains(&(who.slot, who.generation)) {
                subs.push((who.slot, who.generation));
            }
            first
        };
        if first {
            let watch = leases
                .watch(&key)
                .await
                .map_err(|e| (wire::FAILED, format!("the key-value store: {e}")))?;
            tokio::spawn(self.clone().relay_topic(topic, watch));
        }
        let last = leases
            .get(&key)
            .await
            .map_err(|e| (wire::FAILED, format!("the key-value store: {e}")))?;
        Ok(postcard::to_allocvec(&last).unwrap_or_default())
    }

    /// A topic's new values, to its live subscribers here.
    async fn relay_topic(self: Arc<Self>, topic: String, mut watch: async_nats::jetstream::kv::Watch) {
        let mut call = Vec::new();
        while let Some(entry) = watch.next().await {
            let Ok(entry) = entry else { continue };
            if entry.operation != async_nats::jetstream::kv::Operation::Put {
                continue;
            }
            call.clear();
            wire::put_call_header(&mut call, &topic_event(&topic), 0);
            call.extend_from_slice(&entry.value);
            let tag = Tag {
                kind: wire::EMIT,
                correlation: 0,
            };
            let subs: Vec<(u32, u32)> = {
                let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
                let subs = topics.entry(topic.clone()).or_default();
                subs.retain(|&(slot, generation)| self.m.live_generation(slot) == Some(generation));
                subs.clone()
            };
            for (slot, _) in subs {
                self.m.push_raw(slot, tag, call.clone());
            }
        }
    }

    /// This host's leader of `role`, as the host's election says.
    fn local_holder(&self, role: &str) -> Option<Holder> {
        let l = self.m.local_leader(role)?;
        let generation = self.m.live_generation(l.slot)?;
        Some(Holder {
            host: self.host.clone(),
            slot: l.slot,
            generation,
        })
    }

    /// Campaigns across hosts for this host's leader of `role`, for as
    /// long as the bridge runs: takes the role's lease while this host
    /// has a leader, hands it over when that leader changes, gives it back
    /// when there is none.
    async fn lead(self: Arc<Self>, role: String) {
        let key = lease::key("leader", &role);
        let look = Duration::from_millis(50);
        loop {
            let Ok(leases) = self.leases().await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let local = self.local_holder(&role);
            let mine = leases.held().into_iter().find(|(k, _)| *k == key).map(|(_, h)| h);
            match (local, mine) {
                (Some(l), None) => {
                    // Not a `select!` against the change: a take dropped
                    // while its write is on the way leaves a key nobody
                    // renews or gives back.
                    let far = Instant::now() + Duration::from_secs(3600);
                    let still = || self.local_holder(&role).as_ref() == Some(&l);
                    let _ = leases.take_while(&key, l.clone(), far, still).await;
                }
                (Some(l), Some(h)) if l != h => {
                    if let Some(token) = leases.holds(&key, &h) {
                        leases.hand_over(&key, token, l).await;
                    }
                }
                (None, Some(h)) => {
                    if let Some(token) = leases.holds(&key, &h) {
                        leases.give_back(&key, token).await;
                    }
                }
                _ => {}
            }
            tokio::time::sleep(look).await;
        }
    }

    /// Renews the leases this bridge holds every third of a lease, and
    /// gives back the locks of workers that died holding them.
    async fn renew_leases(self: Arc<Self>) {
        let mut tick = tokio::time::interval((self.lease / 3).max(Duration::from_millis(10)));
        loop {
            tick.tick().await;
            let Some(leases) = self.leases.get() else { continue };
            leases.renew().await;
            for (key, h) in leases.held() {
                if key.starts_with("lock.") && self.m.live_generation(h.slot) != Some(h.generation) {
                    if let Some(token) = leases.holds(&key, &h) {
                        tracing::info!(key, slot = h.slot, "a lock's holder died: given back");
                        leases.give_back(&key, token).await;
                    }
                }
            }
        }
    }

    fn stats(&self) -> BridgeStats {
        let c = &self.counters;
        BridgeStats {
            broadcasts_out: c.broadcasts_out.load(Relaxed),
            broadcasts_in: c.broadcasts_in.load(Relaxed),
            calls_out: c.calls_out.load(Relaxed),
            calls_in: c.calls_in.load(Relaxed),
            redeliveries: c.redeliveries.load(Relaxed),
            garbage: c.garbage.load(Relaxed),
            other_cluster: c.other_cluster.load(Relaxed),
            replays: c.replays.load(Relaxed),
            dropped: c.dropped.load(Relaxed),
            too_large: c.too_large.load(Relaxed),
            slow_consumer: self.slow.load(Relaxed),
            connections: *self.reconnects.borrow(),
            stale_presences: self.stale.load(Relaxed),
            hosts: self.live_hosts().len() as u64,
        }
    }

    /// `emit_at`: to a worker of another host, or of this one.
    async fn route_emit(&self, payload: &[u8], from: crate::WorkerId) {
        let Some((host, slot, call)) = wire::parse_route(payload) else {
            bump(&self.counters.garbage);
            return;
        };
        if host == self.host {
            self.emit_here(slot, "", from.slot, from.generation, call);
        } else if !self.live(host) {
            bump(&self.counters.dropped);
        } else {
            let h = self.header(frame::EMIT);
            let payload = frame::encode(
                &h,
                &[
                    &slot.to_le_bytes(),
                    &0u64.to_le_bytes(),
                    &from.slot.to_le_bytes(),
                    &from.generation.to_le_bytes(),
                    call,
                ],
            );
            if self
                .publish(self.subject(&format!("host.{host}.call")), payload)
                .await
            {
                bump(&self.counters.calls_out);
            }
        }
    }

    /// An event from `(origin, from_slot, from_generation)` (`origin` ""
    /// for this host) to the worker in `slot` here.
    fn emit_here(&self, slot: u32, origin: &str, from_slot: u32, from_generation: u32, call: &[u8]) {
        if self.m.live_generation(slot).is_none() {
            bump(&self.counters.dropped);
            return;
        }
        let tag = Tag {
            kind: wire::BRIDGED_EMIT,
            correlation: 0,
        };
        self.m
            .push_raw(slot, tag, relayed(origin, from_slot, from_generation, call));
    }

    /// `host`'s reconnect count as its last presence said.
    fn links(&self, host: &str) -> Option<u32> {
        self.hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(host)
            .map(|h| h.presence.links)
    }

    /// Waits until `host` is no longer connected, or its bridge's NATS
    /// connection came back since it said `links` (an answer it owed may
    /// have been lost on the way).
    async fn gone(&self, host: &str, links: Option<u32>) {
        let mut changes = self.hosts_changed.subscribe();
        while self.live(host) && self.links(host) == links {
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Sends a request frame to `subject` and waits for its reply frame
    /// until `deadline`, or until `host` is gone: (status, body).
    async fn ask(&self, host: &str, subject: String, payload: Vec<u8>, deadline: Instant) -> (u8, Vec<u8>) {
        if let Some(why) = self.too_large(payload.len()) {
            return (wire::FAILED, why);
        }
        bump(&self.counters.calls_out);
        let timeout = deadline.saturating_duration_since(Instant::now());
        let request = async_nats::Request::new()
            .payload(payload.into())
            .timeout(Some(timeout));
        let mut reconnects = self.reconnects.subscribe();
        let links = self.links(host);
        let answer = tokio::select! {
            r = self.nc.send_request(subject, request) => r,
            () = self.gone(host, links) => {
                return (wire::UNREACHABLE, format!("host {host} went away or reconnected").into_bytes());
            }
            _ = reconnects.changed() => {
                return (wire::UNREACHABLE, b"the NATS connection was lost on the way".to_vec());
            }
        };
        use async_nats::RequestErrorKind as K;
        match answer {
            Ok(msg) => match self.accept(&msg.payload) {
                Some((h, body)) if h.kind == frame::REPLY && h.origin == host && !body.is_empty() => {
                    (body[0], body[1..].to_vec())
                }
                Some(_) => {
                    bump(&self.counters.garbage);
                    (wire::FAILED, b"a malformed answer from the other host".to_vec())
                }
                None => (wire::FAILED, b"a malformed answer from the other host".to_vec()),
            },
            Err(e) if e.kind() == K::NoResponders => (
                wire::UNREACHABLE,
                format!("no bridge answers for host {host}").into_bytes(),
            ),
            Err(e) if e.kind() == K::TimedOut => (wire::TIMED_OUT, Vec::new()),
            Err(e) => (wire::UNREACHABLE, format!("NATS: {e}").into_bytes()),
        }
    }

    /// `request_at`: to a worker of another host (or of this one).
    async fn route_call(self: Arc<Self>, incoming: BridgeIncoming) {
        let Some(reply) = incoming.reply else { return };
        let routed =
            frame::u64_at(&incoming.payload, 0).zip(incoming.payload.get(8..).and_then(wire::parse_route));
        let Some((left_ns, (host, slot, call))) = routed else {
            reply.send(wire::FAILED, b"malformed call to another host");
            return;
        };
        let deadline = answer_by(left_ns);
        if host == self.host {
            let r = self.request_here(slot, call.to_vec(), deadline).await;
            let (status, body) = answer_status(r);
            reply.send(status, &body);
            return;
        }
        if !self.live(host) {
            self.wait_while_young(deadline, || self.live(host)).await;
        }
        if !self.live(host) {
            reply.send(
                wire::UNREACHABLE,
                format!("host {host} is not connected").as_bytes(),
            );
            return;
        }
        let h = self.header(frame::CALL);
        let left = deadline.saturating_duration_since(Instant::now()).as_nanos() as u64;
        let from = incoming.sender;
        let payload = frame::encode(
            &h,
            &[
                &slot.to_le_bytes(),
                &left.to_le_bytes(),
                &from.slot.to_le_bytes(),
                &from.generation.to_le_bytes(),
                call,
            ],
        );
        let subject = self.subject(&format!("host.{host}.call"));
        let (status, body) = self.ask(host, subject, payload, deadline).await;
        reply.send(status, &body);
    }

    async fn request_here(&self, slot: u32, bytes: Vec<u8>, deadline: Instant) -> Result<Vec<u8>, CallError> {
        match self.m.call(Op::Request { to: slot, bytes }, deadline).await? {
            Settled::Answer(r) => r,
            _ => Err(CallError::WorkerDied),
        }
    }

    /// A map's call for the other hosts: asks every one at once, answers
    /// with their entries in (host, slot) order before the caller's
    /// deadline; a host that does not answer gets an entry per worker it
    /// last said it had: `HostUnreachable` if it is gone (at once when it
    /// goes), `TimedOut` if it is connected but late.
    async fn scatter_map(self: Arc<Self>, incoming: BridgeIncoming) {
        let Some(reply) = incoming.reply else { return };
        let Some(call) = wire::parse_call(&incoming.payload) else {
            reply.send(wire::FAILED, b"malformed map call");
            return;
        };
        let left_ns = call.delivery;
        let deadline = answer_by(left_ns);
        let mut bytes = Vec::with_capacity(incoming.payload.len());
        wire::put_call_header(&mut bytes, call.name, 0);
        bytes.extend_from_slice(call.data);
        self.warm(deadline).await;
        // Hosts connected now are asked; those known but cut off get an
        // entry per worker they last reported, `HostUnreachable`; hosts
        // that left (their master stopped) none.
        let expected: BTreeMap<String, Presence> = self.known_hosts().into_iter().collect();
        let mut answers: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        // A map too large for NATS is refused by its caller up front
        // (`check_cross_host`); here it only keeps one from going out.
        if !expected.is_empty()
            && self
                .too_large(bytes.len() + wire::BRIDGE_FRAME_OVERHEAD)
                .is_none()
        {
            self.gather(&bytes, deadline, &expected, &mut answers).await;
        }
        let mut out = Vec::new();
        let names: std::collections::BTreeSet<&String> = expected.keys().chain(answers.keys()).collect();
        for name in names {
            if let Some(entries) = answers.get(name) {
                out.extend_from_slice(entries);
                continue;
            }
            let status = if self.live(name) {
                wire::TIMED_OUT
            } else {
                wire::UNREACHABLE
            };
            for &(slot, generation) in expected.get(name).map_or(&[][..], |p| &p.workers[..]) {
                wire::put_remote_entry(
                    &mut out,
                    &wire::RemoteEntry {
                        host: name,
                        slot,
                        generation,
                        status,
                        body: b"",
                    },
                );
            }
        }
        reply.send(wire::OK, &out);
    }

    /// Collects the other hosts' answers to a map into `answers` (host →
    /// its entries' bytes).
    async fn gather(
        &self,
        call: &[u8],
        deadline: Instant,
        expected: &BTreeMap<String, Presence>,
        answers: &mut BTreeMap<String, Vec<u8>>,
    ) {
        let inbox = self.nc.new_inbox();
        let Ok(mut sub) = self.nc.subscribe(inbox.clone()).await else {
            return;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let h = self.header(frame::MAP);
        let payload = frame::encode(&h, &[&(left.as_nanos() as u64).to_le_bytes(), call]);
        bump(&self.counters.calls_out);
        if self
            .nc
            .publish_with_reply(self.subject("map"), inbox, payload.into())
            .await
            .is_err()
        {
            return;
        }
        let mut changes = self.hosts_changed.subscribe();
        let until = tokio::time::Instant::from_std(deadline);
        loop {
            let waiting = expected.keys().any(|h| !answers.contains_key(h) && self.live(h));
            if !waiting {
                break;
            }
            tokio::select! {
                msg = sub.next() => {
                    let Some(msg) = msg else { break };
                    let Some((h, body)) = self.accept(&msg.payload) else { continue };
                    let entries_ok = body.split_first().is_some_and(|(&status, rest)| {
                        status == wire::OK
                            && wire::parse_remote_entries(rest)
                                .is_some_and(|list| list.iter().all(|e| e.host == h.origin))
                    });
                    if h.kind != frame::REPLY || !entries_ok {
                        bump(&self.counters.garbage);
                        continue;
                    }
                    answers.insert(h.origin.to_owned(), body[1..].to_vec());
                }
                _ = tokio::time::sleep_until(until) => break,
                r = changes.changed() => if r.is_err() { break },
            }
        }
        let _ = sub.unsubscribe().await;
    }

    /// A consume that spilled over: to the other hosts in turn, those
    /// with the most free workers first, until one runs it. A host with
    /// no handler is not asked again; one that dies, leaves or is cut off
    /// with the task in hand (or whose answer NATS lost) is asked again
    /// once it is back, or another is: at least once, the task keeps its
    /// delivery id. `NO_HANDLER` if no host takes it before any has had
    /// it, so that the caller's core gives it to a worker of this host;
    /// `TIMED_OUT` at the deadline.
    async fn spill_consume(self: Arc<Self>, incoming: BridgeIncoming) {
        let Some(reply) = incoming.reply else { return };
        let (Some(left_ns), Some(call)) = (frame::u64_at(&incoming.payload, 0), incoming.payload.get(8..))
        else {
            reply.send(wire::FAILED, b"malformed consume");
            return;
        };
        let deadline = answer_by(left_ns);
        let until = tokio::time::Instant::from_std(deadline);
        let max = self.nc.server_info().max_payload;
        if max != 0 && call.len() + wire::BRIDGE_FRAME_OVERHEAD > max {
            // It cannot cross: it stays on this host.
            bump(&self.counters.too_large);
            reply.send(wire::NO_HANDLER, b"");
            return;
        }
        self.wait_while_young(deadline, || !self.live_hosts().is_empty())
            .await;
        let mut refused: Vec<String> = Vec::new();
        let mut attempts = 0u32;
        // A host had the task and went away (or its answer was lost).
        let mut lost = false;
        let mut changes = self.hosts_changed.subscribe();
        loop {
            if Instant::now() >= deadline {
                reply.send(wire::TIMED_OUT, b"");
                return;
            }
            let mut hosts: Vec<(String, Presence)> = self
                .live_hosts()
                .into_iter()
                .filter(|(h, _)| !refused.contains(h))
                .collect();
            if hosts.is_empty() {
                if !lost {
                    if self.any_unreachable() {
                        // No host that is connected has a handler; one that
                        // is cut off may: the caller learns that, unless a
                        // worker of its own host can take it.
                        reply.send(wire::UNREACHABLE, b"the hosts that may handle it are unreachable");
                    } else {
                        reply.send(wire::NO_HANDLER, b"");
                    }
                    return;
                }
                // The task went to a host that is gone: wait for one.
                tokio::select! {
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = tokio::time::sleep_until(until) => {}
                }
                continue;
            }
            let turn = self.turn.fetch_add(1, Relaxed) as usize;
            let n = hosts.len();
            hosts.rotate_left(turn % n);
            hosts.sort_by_key(|(_, p)| std::cmp::Reverse(p.free));
            let host = hosts.swap_remove(0).0;
            if attempts > 0 {
                bump(&self.counters.redeliveries);
            }
            attempts += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let h = self.header(frame::CONSUME);
            let payload = frame::encode(&h, &[&(left.as_nanos() as u64).to_le_bytes(), call]);
            let subject = self.subject(&format!("host.{host}.consume"));
            let (status, body) = self.ask(&host, subject, payload, deadline).await;
            match status {
                wire::NO_HANDLER => refused.push(host),
                wire::UNREACHABLE | wire::DIED => {
                    lost = true;
                    // Not a spin while NATS reconnects or the host's
                    // subscriptions move.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => {
                    reply.send(status, &body);
                    return;
                }
            }
        }
    }

    // ------------------------------------------------- from other hosts

    /// Other hosts' broadcasts, relayed to every worker here in the order
    /// they came.
    async fn relay_broadcasts(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
            let Some((h, body)) = self.accept(&msg.payload) else {
                continue;
            };
            if h.origin == self.host {
                continue; // Our own: this host's workers had theirs.
            }
            let (Some(from_slot), Some(from_generation), Some(call)) =
                (frame::u32_at(body, 0), frame::u32_at(body, 4), body.get(8..))
            else {
                bump(&self.counters.garbage);
                continue;
            };
            if h.kind != frame::BCAST || wire::parse_call(call).is_none() {
                bump(&self.counters.garbage);
                continue;
            }
            if !self.fresh(&h) {
                continue;
            }
            bump(&self.counters.broadcasts_in);
            let tag = Tag {
                kind: wire::BRIDGED_EMIT,
                correlation: 0,
            };
            let relayed = relayed(h.origin, from_slot, from_generation, call);
            for w in self.m.live_workers() {
                self.m.push_raw(w.slot, tag, relayed.clone());
            }
        }
    }

    fn emit_all(&self, call: &[u8]) {
        let tag = Tag {
            kind: wire::EMIT,
            correlation: 0,
        };
        for w in self.m.live_workers() {
            self.m.push_raw(w.slot, tag, call.to_vec());
        }
    }

    /// Requests and emits to one worker here.
    async fn serve_calls(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
            let Some((h, body)) = self.accept(&msg.payload) else {
                continue;
            };
            let (Some(slot), Some(left_ns), Some(from_slot), Some(from_generation), Some(call)) = (
                frame::u32_at(body, 0),
                frame::u64_at(body, 4),
                frame::u32_at(body, 12),
                frame::u32_at(body, 16),
                body.get(20..),
            ) else {
                bump(&self.counters.garbage);
                continue;
            };
            if wire::parse_call(call).is_none() {
                bump(&self.counters.garbage);
                continue;
            }
            match (h.kind, msg.reply) {
                (frame::EMIT, _) => {
                    if self.fresh(&h) {
                        bump(&self.counters.calls_in);
                        self.emit_here(slot, h.origin, from_slot, from_generation, call);
                    }
                }
                (frame::CALL, Some(reply_to)) => {
                    bump(&self.counters.calls_in);
                    let me = self.clone();
                    let call = call.to_vec();
                    tokio::spawn(async move {
                        let deadline = answer_by(left_ns);
                        let (status, body) = answer_status(me.request_here(slot, call, deadline).await);
                        me.respond(reply_to, status, &body).await;
                    });
                }
                _ => bump(&self.counters.garbage),
            }
        }
    }

    async fn respond(&self, to: async_nats::Subject, status: u8, body: &[u8]) {
        let h = self.header(frame::REPLY);
        let mut payload = frame::encode(&h, &[&reply_body(status, body)]);
        if let Some(why) = self.too_large(payload.len()) {
            payload = frame::encode(&h, &[&reply_body(wire::FAILED, &why)]);
        }
        let _ = self.nc.publish(to, payload.into()).await;
    }

    /// Consumes other hosts spilled to this one: run here through the
    /// bridge's call core, which picks among this host's workers only.
    async fn serve_consumes(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
            let Some((h, body)) = self.accept(&msg.payload) else {
                continue;
            };
            let (Some(left_ns), Some(call), Some(reply_to)) =
                (frame::u64_at(body, 0), body.get(8..), msg.reply)
            else {
                bump(&self.counters.garbage);
                continue;
            };
            let Some(delivery) = wire::parse_call(call).map(|c| c.delivery) else {
                bump(&self.counters.garbage);
                continue;
            };
            if h.kind != frame::CONSUME {
                bump(&self.counters.garbage);
                continue;
            }
            bump(&self.counters.calls_in);
            let me = self.clone();
            let bytes = call.to_vec();
            tokio::spawn(async move {
                let deadline = answer_by(left_ns);
                let (status, body) = match me.m.call(Op::Consume { delivery, bytes }, deadline).await {
                    Ok(Settled::Consumed(Ok(done))) => {
                        let mut b = Vec::new();
                        wire::put_consumer(&mut b, &me.host, done.worker.slot, done.worker.generation);
                        (wire::OK, b)
                    }
                    Ok(Settled::Consumed(Err(e))) | Err(e) => answer_status(Err(e)),
                    Ok(_) => (wire::FAILED, Vec::new()),
                };
                me.respond(reply_to, status, &body).await;
            });
        }
    }

    /// Maps of other hosts: every worker here runs its handler.
    async fn serve_maps(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
            let Some((h, body)) = self.accept(&msg.payload) else {
                continue;
            };
            if h.origin == self.host {
                continue;
            }
            let (Some(left_ns), Some(call), Some(reply_to)) =
                (frame::u64_at(body, 0), body.get(8..), msg.reply)
            else {
                bump(&self.counters.garbage);
                continue;
            };
            if h.kind != frame::MAP || wire::parse_call(call).is_none() {
                bump(&self.counters.garbage);
                continue;
            }
            bump(&self.counters.calls_in);
            let me = self.clone();
            let bytes = call.to_vec();
            tokio::spawn(async move {
                let deadline = answer_by(left_ns);
                let mut out = Vec::new();
                if let Ok(Settled::Map(entries)) = me.m.call(Op::Map { bytes }, deadline).await {
                    for (w, r) in &entries {
                        let (status, body) = map_status(r);
                        wire::put_remote_entry(
                            &mut out,
                            &wire::RemoteEntry {
                                host: &me.host,
                                slot: w.slot,
                                generation: w.generation,
                                status,
                                body,
                            },
                        );
                    }
                }
                me.respond(reply_to, wire::OK, &out).await;
            });
        }
    }

    // ------------------------------------------------------------ hosts

    async fn publish_presence(&self, leaving: bool) {
        let view = self.m.cluster_view();
        let workers: Vec<(u32, u32)> = view
            .live_workers()
            .iter()
            .map(|w| (w.slot, w.generation))
            .collect();
        let free = workers
            .iter()
            .filter(|&&(slot, _)| view.consume_backlog(slot) == (0, false))
            .count() as u32;
        let presence = Presence {
            leaving,
            free,
            links: *self.reconnects.borrow() as u32,
            uptime: self.started.elapsed().as_nanos() as u64,
            workers,
        };
        let h = self.header(frame::PRESENCE);
        let payload = frame::encode(&h, &[&frame::encode_presence(&presence)]);
        self.publish(self.subject("presence"), payload).await;
    }

    /// Tells the others this host is here, every heartbeat, and times out
    /// hosts not heard from.
    async fn beat(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.heartbeat);
        let mut reconnects = self.reconnects.subscribe();
        loop {
            // At every heartbeat, and at once after a reconnect: the new
            // reconnect count tells the hosts with calls in flight here
            // that answers may have been lost (see `gone`) — sooner is
            // fewer calls abandoned on the new connection.
            tokio::select! {
                _ = tick.tick() => {}
                r = reconnects.changed() => if r.is_err() { tick.tick().await; },
            }
            self.publish_presence(false).await;
            let now = Instant::now();
            let timed_out: Vec<String> = {
                let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
                let timed_out: Vec<String> = hosts
                    .iter_mut()
                    .filter(|(_, h)| {
                        h.state == HostChange::Joined && now.duration_since(h.last_seen) > self.host_timeout
                    })
                    .map(|(name, h)| {
                        h.state = HostChange::Unreachable;
                        name.clone()
                    })
                    .collect();
                // Hosts gone for good (cut off or left for thirty host
                // timeouts) are forgotten: maps stop listing them, and a
                // name from the network does not stay forever.
                let forget = self.host_timeout * 30;
                hosts.retain(|name, h| {
                    let keep = h.state == HostChange::Joined || now.duration_since(h.last_seen) < forget;
                    if !keep {
                        tracing::info!(host = %name, "host forgotten");
                    }
                    keep
                });
                timed_out
            };
            for host in timed_out {
                self.host_changed(host, HostChange::Unreachable);
            }
            // What was seen of forgotten hosts goes with them.
            let known: std::collections::HashSet<String> = self
                .hosts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .cloned()
                .collect();
            self.seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .last
                .retain(|(origin, _), _| known.contains(origin) || *origin == self.host);
        }
    }

    fn host_changed(&self, host: String, change: HostChange) {
        tracing::info!(%host, ?change, "host");
        self.m.set_bridge_hosts(self.live_hosts().len());
        self.hosts_changed.send_modify(|n| *n += 1);
        if let Ok(bytes) = crate::messenger::encode_call_for_bridge(HOST_EVENT, &HostEvent { host, change }) {
            self.emit_all(&bytes);
        }
    }

    async fn watch_presence(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
            let Some((h, body)) = self.accept(&msg.payload) else {
                continue;
            };
            if h.origin == self.host && h.epoch == self.epoch {
                continue;
            }
            let Some(presence) = (h.kind == frame::PRESENCE)
                .then(|| frame::decode_presence(body))
                .flatten()
            else {
                bump(&self.counters.garbage);
                continue;
            };
            if !self.fresh(&h) {
                continue;
            }
            if h.origin == self.host {
                // Another bridge with this host's name: a configuration
                // error, or this host's previous incarnation's last words.
                tracing::warn!(host = %self.host, "another bridge claims this host's name");
                continue;
            }
            let change = {
                let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let delay = now.duration_since(self.started).as_nanos() as i128 - i128::from(presence.uptime);
                let late = self.host_timeout.as_nanos() as i128;
                if let Some(info) = hosts.get_mut(h.origin).filter(|i| i.epoch == h.epoch) {
                    if delay > info.delay + late {
                        bump(&self.stale);
                        tracing::debug!(host = h.origin, "a stale presence dropped");
                        continue;
                    }
                    let drift = (self.heartbeat.as_nanos() / 10) as i128;
                    info.delay = delay.min(info.delay + drift);
                }
                let state = if presence.leaving {
                    HostChange::Left
                } else {
                    HostChange::Joined
                };
                let full = hosts.len() >= MAX_HOSTS;
                match hosts.get_mut(h.origin) {
                    Some(info) => {
                        let was = info.state;
                        let new_epoch = info.epoch != h.epoch;
                        if info.presence.links != presence.links {
                            // Calls waiting on it look again (`gone`).
                            self.hosts_changed.send_modify(|n| *n += 1);
                        }
                        if new_epoch {
                            info.delay = delay;
                        }
                        info.epoch = h.epoch;
                        info.last_seen = now;
                        info.state = state;
                        if !presence.leaving {
                            info.presence = presence;
                        }
                        (was != state || (new_epoch && state == HostChange::Joined)).then_some(state)
                    }
                    None if full => {
                        // Names from the network are not kept without end.
                        bump(&self.counters.garbage);
                        None
                    }
                    None => {
                        hosts.insert(
                            h.origin.to_owned(),
                            HostInfo {
                                epoch: h.epoch,
                                last_seen: now,
                                presence,
                                state,
                                delay,
                            },
                        );
                        Some(state)
                    }
                }
            };
            if let Some(change) = change {
                if change == HostChange::Joined {
                    // A host new to this bridge (or a new incarnation) may
                    // not know this one yet either: tell it now rather
                    // than at the next heartbeat.
                    self.publish_presence(false).await;
                }
                self.host_changed(h.origin.to_owned(), change);
            }
        }
    }
}
