//! Hosts benchmark: the floor under the NATS bridge. Bare async-nats
//! between two processes on a 3-server `nats-server` cluster on loopback
//! (`common::nats::NatsCluster`, nats-server 2.9 with JetStream):
//!
//! 1. request/reply round trip, p50 / p99: a responder process subscribes
//!    and answers each request with its payload; this process sends
//!    64-byte requests back to back and times each one;
//! 2. publish throughput: a publisher process publishes 64-byte messages
//!    as fast as its client takes them; this process subscribes and counts
//!    them (messages/s between the first and the last received, and how
//!    many were lost: core NATS drops what a slow subscriber cannot take);
//!
//! each with both clients on the same server and on two different ones
//! (one route hop). The bridge's rows go beside these (`hosts/bridge.rs`:
//! two shmcluster hosts, a cross-host `request_at` and a stream of
//! broadcasts, with the bridges on one server or two), and a table of
//! local operations with the bridge on and off (a `request` and a stream
//! of broadcasts between two workers of one host, and a `request_at` to
//! the host's own other worker: the bridge's part without NATS). A
//! function per row returns a [`Figure`], and [`Row::vs`] names the row
//! its `ratio` column divides by.
//!
//! Rows of a table are measured in alternated rounds: every round measures
//! each row once, in reverse order every other round, and a row shows its
//! median round; a ratio is taken within each round (the two figures a
//! moment apart) and shown as the median with the range over the rounds.
//!
//! `cargo bench --features nats --bench hosts` prints markdown tables on
//! stdout (progress on stderr). Run without `--bench` (as `cargo test
//! --benches` does) it only checks each measure with a few messages.
//!
//! The second process is this binary re-executed with [`ROLE_VAR`] set
//! (`responder <url>` or `publisher <url> <count>`); it runs a tokio
//! `current_thread` runtime like this side, exits when its stdin closes
//! (or after [`PEER_LIMIT`]) and is always reaped.

use std::error::Error;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use async_nats::{Client, ConnectOptions, RequestErrorKind};
use futures_util::StreamExt;

#[path = "hosts/bridge.rs"]
mod bridge;
mod common;
use common::nats::NatsCluster;
use common::{fmt_ns, machine, percentiles, wait_within, warn_if_busy, Pct};

/// Set in a re-executed copy of this binary: its role and arguments.
const ROLE_VAR: &str = "SHMCLUSTER_BENCH_HOSTS";
/// Longest a peer process lives (it exits sooner when its stdin closes).
const PEER_LIMIT: Duration = Duration::from_secs(120);
/// How long a peer may take to say it is ready.
const READY_LIMIT: Duration = Duration::from_secs(15);
/// Payload of every request and message.
const SMALL: usize = 64;
/// The request/reply subject.
const RTT_SUBJECT: &str = "bench.rtt";
/// The stream's subject.
const STREAM_SUBJECT: &str = "bench.stream";
/// The subscriber answers here once subscribed: the publisher starts
/// when a request to it is answered (both subscriptions' interest has
/// crossed the route by then: a connection's SUBs travel in order).
const STREAM_READY: &str = "bench.stream.ready";

/// Every fallible step here: a message for stderr is all a failure needs.
type Res<T> = Result<T, Box<dyn Error>>;

/// How much of each measure.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Untimed requests before the timed ones.
    warmup: usize,
    /// Timed requests per round (fewer if [`Plan::time`] runs out).
    rtt: usize,
    /// Messages per stream.
    stream: u64,
    /// Time limit of one measure's timed part.
    time: Duration,
    /// Rounds of each table.
    rounds: usize,
}

impl Plan {
    /// `cargo bench`.
    const FULL: Self = Self {
        warmup: 1_000,
        rtt: 20_000,
        stream: 200_000,
        time: Duration::from_secs(8),
        rounds: 5,
    };

    /// A smoke test (`cargo test --benches`).
    const QUICK: Self = Self {
        warmup: 10,
        rtt: 200,
        stream: 2_000,
        time: Duration::from_secs(5),
        rounds: 1,
    };
}

// ------------------------------------------------------------ figures

/// What one measure gives.
#[derive(Debug, Clone, Copy)]
enum Figure {
    /// Round trips.
    Lat(Pct),
    /// A stream.
    Rate(Rate),
}

/// A stream's figures.
#[derive(Debug, Clone, Copy)]
struct Rate {
    /// Messages received per second, first to last.
    per_s: f64,
    /// Messages sent.
    sent: u64,
    /// Messages received.
    received: u64,
    /// Slow-consumer drops on the subscriber's server during the stream
    /// (`/varz` `slow_consumers`, a count of events, not of messages).
    server_drops: u64,
}

impl Figure {
    /// The number rounds are ordered by and ratios divide: p50, or the rate.
    fn key(self) -> f64 {
        match self {
            Figure::Lat(p) => p.p50,
            Figure::Rate(r) => r.per_s,
        }
    }

    /// The figure as the table shows it.
    fn show(self) -> String {
        match self {
            Figure::Lat(p) => format!("{} / {}", fmt_ns(p.p50), fmt_ns(p.p99)),
            Figure::Rate(r) => {
                let lost = r.sent - r.received;
                let server = match r.server_drops {
                    0 => String::new(),
                    n => format!(", {n} server slow-consumer events"),
                };
                format!("{} msg/s ({lost} of {} lost{server})", per_s(r.per_s), r.sent)
            }
        }
    }

    /// `self ÷ other`: p50 / p99 for latencies, the rate's ratio otherwise.
    fn ratio(self, other: Figure) -> String {
        match (self, other) {
            (Figure::Lat(a), Figure::Lat(b)) => {
                format!("{:.2}× / {:.2}×", a.p50 / b.p50, a.p99 / b.p99)
            }
            _ => format!("{:.2}×", self.key() / other.key()),
        }
    }
}

/// A rate in k/s or M/s.
fn per_s(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else {
        format!("{:.0} k", v / 1e3)
    }
}

// ------------------------------------------------------------ tables

/// A table row: its name, the row its ratio divides by, and how to take
/// its figure once.
struct Row<'a> {
    name: String,
    vs: Option<usize>,
    run: Box<dyn FnMut() -> Res<Figure> + 'a>,
}

impl<'a> Row<'a> {
    /// A row without a ratio (a baseline).
    fn bare(name: impl Into<String>, run: impl FnMut() -> Res<Figure> + 'a) -> Self {
        Self {
            name: name.into(),
            vs: None,
            run: Box::new(run),
        }
    }

    /// A row whose `ratio` column divides by row `baseline` of its table.
    fn vs(baseline: usize, name: impl Into<String>, run: impl FnMut() -> Res<Figure> + 'a) -> Self {
        Self {
            name: name.into(),
            vs: Some(baseline),
            run: Box::new(run),
        }
    }
}

/// One row's result: its median round, and its ratio to its baseline
/// (the median round's, with the lowest and highest over the rounds); or
/// why it failed.
struct Summary {
    name: String,
    figure: Result<Figure, String>,
    ratio: Option<(String, f64, f64)>,
}

/// Measures `rows` in `rounds` alternated rounds (see the module's doc).
/// A row that fails is not measured again; its error is its figure.
fn measure_rows(rows: &mut [Row<'_>], rounds: usize) -> Vec<Summary> {
    let mut taken: Vec<Vec<Option<Figure>>> = vec![Vec::with_capacity(rounds); rows.len()];
    let mut failed: Vec<Option<String>> = vec![None; rows.len()];
    for round in 0..rounds {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..rows.len()).collect()
        } else {
            (0..rows.len()).rev().collect()
        };
        for i in order {
            if failed[i].is_some() {
                taken[i].push(None);
                continue;
            }
            eprintln!("round {}/{rounds}: {}", round + 1, rows[i].name);
            match (rows[i].run)() {
                Ok(figure) => taken[i].push(Some(figure)),
                Err(e) => {
                    eprintln!("{}: {e}", rows[i].name);
                    failed[i] = Some(format!("failed in round {}: {e}", round + 1));
                    taken[i].push(None);
                }
            }
        }
    }
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            let mut mine: Vec<Figure> = taken[i].iter().flatten().copied().collect();
            mine.sort_by(|a, b| a.key().total_cmp(&b.key()));
            let figure = match (&failed[i], mine.get(mine.len() / 2)) {
                (None, Some(f)) => Ok(*f),
                (Some(e), _) => Err(e.clone()),
                (None, None) => Err("no figure".to_owned()),
            };
            let ratio = row.vs.and_then(|b| {
                let mut per_round: Vec<(f64, Figure, Figure)> = taken[i]
                    .iter()
                    .zip(&taken[b])
                    .filter_map(|(m, t)| Some((m.as_ref()?.key() / t.as_ref()?.key(), (*m)?, (*t)?)))
                    .collect();
                per_round.sort_by(|a, b| a.0.total_cmp(&b.0));
                let (_, m, t) = *per_round.get(per_round.len() / 2)?;
                Some((m.ratio(t), per_round[0].0, per_round[per_round.len() - 1].0))
            });
            Summary {
                name: row.name.clone(),
                figure,
                ratio,
            }
        })
        .collect()
}

/// A markdown table of `rows`, the figure's column named `what`; whether
/// every row has its figure.
fn print_table(what: &str, summaries: &[Summary], rows: &[Row<'_>]) -> bool {
    println!("| measure | {what} | ratio to | ratio (median round; p50 range over rounds) |");
    println!("|---|---|---|---|");
    for (s, row) in summaries.iter().zip(rows) {
        let (to, ratio) = match (&s.ratio, row.vs) {
            (Some((r, low, high)), Some(b)) => (rows[b].name.clone(), format!("{r} ({low:.2}–{high:.2}×)")),
            _ => ("—".to_owned(), "—".to_owned()),
        };
        let figure = match &s.figure {
            Ok(f) => f.show(),
            Err(e) => format!("**{e}**"),
        };
        println!("| {} | {figure} | {to} | {ratio} |", s.name);
    }
    println!();
    use std::io::Write;
    let _ = std::io::stdout().flush();
    summaries.iter().all(|s| s.figure.is_ok())
}

// ------------------------------------------------------------ bare rows

/// A `current_thread` runtime, as each client process of the bridge has.
fn runtime() -> Res<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// A client of `url` alone.
async fn connect(url: &str) -> Res<Client> {
    Ok(ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(5)))
        .connect(url)
        .await?)
}

/// Requests `subject` until it is answered (the responder's interest has
/// reached this client's server), at most [`READY_LIMIT`].
async fn await_responder(client: &Client, subject: &str) -> Res<()> {
    let start = Instant::now();
    loop {
        match client.request(subject.to_owned(), "hello".into()).await {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == RequestErrorKind::NoResponders => {}
            Err(e) => return Err(e.into()),
        }
        if start.elapsed() > READY_LIMIT {
            return Err(format!("nobody answered {subject} within {READY_LIMIT:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Bare async-nats request/reply round trip: this process requests on
/// server `requester`, a responder process answers on server `responder`.
fn bare_rtt(cluster: &NatsCluster, requester: usize, responder: usize, plan: Plan) -> Res<Figure> {
    let mut peer = Peer::spawn(&["responder", &cluster.url(responder)])?;
    peer.expect("ready")?;
    let rt = runtime()?;
    let samples = rt.block_on(async {
        let client = connect(&cluster.url(requester)).await?;
        await_responder(&client, RTT_SUBJECT).await?;
        let payload = vec![7u8; SMALL];
        for _ in 0..plan.warmup {
            client.request(RTT_SUBJECT, payload.clone().into()).await?;
        }
        let mut ns = Vec::with_capacity(plan.rtt);
        let start = Instant::now();
        while ns.len() < plan.rtt && start.elapsed() < plan.time {
            let t = Instant::now();
            let answer = client.request(RTT_SUBJECT, payload.clone().into()).await?;
            ns.push(t.elapsed().as_nanos() as u64);
            if answer.payload.len() != SMALL {
                return Err(format!("answer of {} bytes", answer.payload.len()).into());
            }
        }
        Res::Ok(ns)
    })?;
    peer.finish()?;
    Ok(Figure::Lat(percentiles(samples).ok_or("no samples")?))
}

/// Bare async-nats stream: a publisher process publishes `plan.stream`
/// 64-byte messages on server `publisher`; this process receives them on
/// server `subscriber`.
fn bare_stream(cluster: &NatsCluster, subscriber: usize, publisher: usize, plan: Plan) -> Res<Figure> {
    let rt = runtime()?;
    rt.block_on(async {
        // Room for the whole stream in the subscription's channel: with
        // async-nats's default (65,536 messages) its connection task, which
        // reads faster than the subscriber takes, dropped about half of
        // 200,000 messages as a slow consumer.
        let client = ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .subscription_capacity(plan.stream as usize + 1024)
            .connect(cluster.url(subscriber))
            .await?;
        let slow_before = slow_consumers(cluster, subscriber)?;
        let mut stream = client.subscribe(STREAM_SUBJECT).await?;
        let mut ready = client.subscribe(STREAM_READY).await?;
        client.flush().await?;
        let answering = client.clone();
        let answer = tokio::spawn(async move {
            while let Some(m) = ready.next().await {
                if let Some(reply) = m.reply {
                    let _ = answering.publish(reply, "go".into()).await;
                }
            }
        });
        let count = plan.stream.to_string();
        let mut peer = Peer::spawn(&["publisher", &cluster.url(publisher), &count])?;
        let mut received = 0u64;
        let mut first = None;
        let mut last = Instant::now();
        let deadline = Instant::now() + READY_LIMIT + plan.time;
        // Until the last message, or a second of silence after the first.
        while Instant::now() < deadline {
            let wait = if first.is_some() {
                Duration::from_secs(1)
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            let Ok(Some(m)) = tokio::time::timeout(wait, stream.next()).await else {
                break;
            };
            last = Instant::now();
            first.get_or_insert(last);
            received += 1;
            let seq = m
                .payload
                .get(..8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
            if seq == Some(plan.stream - 1) {
                break;
            }
        }
        answer.abort();
        peer.finish()?;
        let server_drops = slow_consumers(cluster, subscriber)? - slow_before;
        let first = first.ok_or("no message arrived")?;
        let span = last.duration_since(first).as_secs_f64();
        Ok(Figure::Rate(Rate {
            per_s: if span > 0.0 {
                (received - 1) as f64 / span
            } else {
                0.0
            },
            sent: plan.stream,
            received,
            server_drops,
        }))
    })
}

/// Server `i`'s count of slow-consumer events so far.
fn slow_consumers(cluster: &NatsCluster, i: usize) -> Res<u64> {
    Ok(cluster.monitor(i, "/varz")?["slow_consumers"]
        .as_u64()
        .ok_or("no slow_consumers in /varz")?)
}

// ------------------------------------------------------------ the peer process

/// The other process: this binary re-executed in a role. Dropping it
/// closes its stdin, waits a moment and kills it if it still runs.
struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Peer {
    /// Starts `role args...`.
    fn spawn(args: &[&str]) -> Res<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .env(ROLE_VAR, args.join(" "))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self { child, stdin, lines })
    }

    /// Waits for the line `want` on its stdout.
    fn expect(&mut self, want: &str) -> Res<()> {
        match self.lines.recv_timeout(READY_LIMIT) {
            Ok(line) if line == want => Ok(()),
            Ok(line) => Err(format!("peer said {line:?}, not {want:?}").into()),
            Err(_) => Err(format!("peer did not say {want:?} within {READY_LIMIT:?}").into()),
        }
    }

    /// Closes its stdin and waits for a clean exit.
    fn finish(&mut self) -> Res<()> {
        self.stdin = None;
        let status = wait_within(&mut self.child, Duration::from_secs(10))?;
        if !status.success() {
            return Err(format!("peer ended with {status}").into());
        }
        Ok(())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stdin = None;
        // Reaps it, killing it after the limit.
        let _ = wait_within(&mut self.child, Duration::from_secs(2));
    }
}

/// In the re-executed copy: plays `role` and exits.
fn peer_main(role: &str) -> ! {
    // The parent closing our stdin (or dying) ends us; so does the limit.
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        std::process::exit(0);
    });
    std::thread::spawn(|| {
        std::thread::sleep(PEER_LIMIT);
        eprintln!("hosts bench peer: still running after {PEER_LIMIT:?}");
        std::process::exit(1);
    });
    let args: Vec<&str> = role.split(' ').collect();
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            match args.as_slice() {
                ["responder", url] => respond(url).await,
                ["publisher", url, count] => publish(url, count.parse()?).await,
                _ => Err(format!("unknown role {role:?}").into()),
            }
        })
    });
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("hosts bench peer ({role}): {e}");
            std::process::exit(1);
        }
    }
}

/// Answers every request on [`RTT_SUBJECT`] with its payload, until stdin
/// closes.
async fn respond(url: &str) -> Res<()> {
    let client = connect(url).await?;
    let mut sub = client.subscribe(RTT_SUBJECT).await?;
    client.flush().await?;
    println!("ready");
    while let Some(m) = sub.next().await {
        if let Some(reply) = m.reply {
            client.publish(reply, m.payload).await?;
        }
    }
    Err("subscription ended".into())
}

/// Publishes `count` numbered 64-byte messages on [`STREAM_SUBJECT`] once
/// the subscriber answers on [`STREAM_READY`].
async fn publish(url: &str, count: u64) -> Res<()> {
    let client = connect(url).await?;
    await_responder(&client, STREAM_READY).await?;
    let mut payload = vec![0u8; SMALL];
    for seq in 0..count {
        payload[..8].copy_from_slice(&seq.to_le_bytes());
        client.publish(STREAM_SUBJECT, payload.clone().into()).await?;
    }
    client.flush().await?;
    // Stay until the parent is done (stdin closes).
    std::future::pending::<()>().await;
    Ok(())
}

// ------------------------------------------------------------ main

/// Set to a bridge measure (`xrtt`, `xbcast`, `lrtt`, `srtt`, `lbcast`),
/// the bench runs only that one, once, with the full plan: a hook for
/// `perf record -a` while it runs.
const ONLY_VAR: &str = "SHMCLUSTER_BENCH_HOSTS_ONLY";

/// The measure [`ONLY_VAR`] names, its figure on stdout.
fn run_only(task: &str) -> Res<()> {
    let plan = Plan::FULL;
    let cluster = NatsCluster::start(3)?;
    let figure = match task {
        "xrtt" => bridge::cross_rtt(&cluster, 0, 0, plan)?,
        "xbcast" => bridge::cross_bcast(&cluster, 0, 0, plan)?,
        "lrtt-off" => bridge::local(&cluster, "lrtt", false, plan)?,
        "lrtt" | "srtt" | "lbcast" => bridge::local(&cluster, task, true, plan)?,
        "xbcast2" => bridge::cross_bcast(&cluster, 0, 2, plan)?,
        "bare" => bare_rtt(&cluster, 0, 0, plan)?,
        _ => return Err(format!("unknown {ONLY_VAR} {task:?}").into()),
    };
    println!("{task}: {}", figure.show());
    Ok(())
}

fn run(full: bool) -> Res<()> {
    if let Ok(task) = std::env::var(ONLY_VAR) {
        return run_only(&task);
    }
    let plan = if full { Plan::FULL } else { Plan::QUICK };
    eprintln!("starting a 3-server NATS cluster");
    let cluster = NatsCluster::start(3)?;
    let version = cluster.monitor(0, "/varz")?["version"]
        .as_str()
        .unwrap_or("?")
        .to_owned();

    // Row 0 on one server; row 1 across a route, its ratio against row 0
    // (what the hop costs). A bridge row names the bare row of its own
    // placement as its baseline (`Row::vs(1, ..)`).
    let c = &cluster;
    let mut rtt_rows = vec![
        Row::bare("bare async-nats request/reply, same server", move || {
            bare_rtt(c, 0, 0, plan)
        }),
        Row::vs(0, "bare async-nats request/reply, different servers", move || {
            bare_rtt(c, 0, 2, plan)
        }),
        Row::vs(
            0,
            "bridge `request_at` host a → host b, same server",
            move || bridge::cross_rtt(c, 0, 0, plan),
        ),
        Row::vs(
            1,
            "bridge `request_at` host a → host b, different servers",
            move || bridge::cross_rtt(c, 0, 2, plan),
        ),
    ];
    println!("Machine: {}", machine());
    println!();
    let command = if full {
        "cargo bench --features nats --bench hosts"
    } else {
        "cargo test --features nats --benches (a quick check of each measure, not figures)"
    };
    println!("Command: `{command}`");
    println!();
    println!(
        "A 3-server nats-server {version} cluster on 127.0.0.1 (JetStream on). Bare rows: two \
         processes, each an async-nats client on a tokio current-thread runtime. Bridge rows: \
         two hosts, each a fork-mode master with 1 worker and its bridge, the bridges on the \
         servers the row names. {} rounds, rows alternated.",
        plan.rounds
    );
    println!();
    println!(
        "Request/reply round trips of {SMALL} B, p50 / p99: {} timed (or {:?}) after {} warm-up, \
         back to back.",
        plan.rtt, plan.time, plan.warmup
    );
    println!();
    let mut ok = print_table("p50 / p99", &measure_rows(&mut rtt_rows, plan.rounds), &rtt_rows);
    println!(
        "Local operations of a host of 2 workers with its bridge on (connected, no other host) \
         and without: `request` round trips of {SMALL} B between the two workers ({} timed after \
         {} warm-up), and a stream of {} broadcasts of {SMALL} B from one worker to both (the \
         caller included; with the bridge on, each one is also published to NATS), counted by \
         the receivers from the first to the last delivery.",
        plan.rtt, plan.warmup, plan.stream
    );
    println!();
    let mut local_rows = vec![
        Row::bare("local `request` between 2 workers, no bridge", move || {
            bridge::local(c, "lrtt", false, plan)
        }),
        Row::vs(0, "local `request` between 2 workers, bridge on", move || {
            bridge::local(c, "lrtt", true, plan)
        }),
        Row::vs(
            0,
            "`request_at` this host's other worker: lane → bridge → lane, no NATS",
            move || bridge::local(c, "srtt", true, plan),
        ),
    ];
    ok &= print_table(
        "p50 / p99",
        &measure_rows(&mut local_rows, plan.rounds),
        &local_rows,
    );
    let mut local_bcast_rows = vec![
        Row::bare("local `broadcast` to 2 workers, no bridge", move || {
            bridge::local(c, "lbcast", false, plan)
        }),
        Row::vs(0, "local `broadcast` to 2 workers, bridge on", move || {
            bridge::local(c, "lbcast", true, plan)
        }),
    ];
    ok &= print_table(
        "deliveries/s",
        &measure_rows(&mut local_bcast_rows, plan.rounds),
        &local_bcast_rows,
    );
    println!(
        "Publish throughput: {} messages of {SMALL} B published back to back (bare: `publish`; \
         bridge: `broadcast` from host a's worker), counted by the subscriber (bridge: host b's \
         worker) from its first to its last message; the bare subscription holds the whole \
         stream (core NATS drops what a slow consumer cannot take: such messages count as lost).",
        plan.stream
    );
    println!();
    let mut stream_rows = vec![
        Row::bare("bare async-nats publish → subscriber, same server", move || {
            bare_stream(c, 0, 0, plan)
        }),
        Row::vs(
            0,
            "bare async-nats publish → subscriber, different servers",
            move || bare_stream(c, 0, 2, plan),
        ),
        Row::vs(
            0,
            "bridge `broadcast` host a → host b, same server",
            move || bridge::cross_bcast(c, 0, 0, plan),
        ),
        Row::vs(
            1,
            "bridge `broadcast` host a → host b, different servers",
            move || bridge::cross_bcast(c, 0, 2, plan),
        ),
    ];
    ok &= print_table(
        "messages/s",
        &measure_rows(&mut stream_rows, plan.rounds),
        &stream_rows,
    );
    if !ok {
        return Err("a row failed (see its table)".into());
    }
    Ok(())
}

fn main() {
    // A host first: its master forks, so no thread may start before.
    if let Ok(role) = std::env::var(bridge::HOST_VAR) {
        bridge::host_main(&role);
    }
    if let Ok(role) = std::env::var(ROLE_VAR) {
        peer_main(&role);
    }
    warn_if_busy();
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    let full = std::env::args().any(|a| a == "--bench");
    if let Err(e) = run(full) {
        eprintln!("hosts bench: {e}");
        std::process::exit(1);
    }
}
