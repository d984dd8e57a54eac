//! The NATS test harness (`common::nats::NatsCluster`) and the behaviour of
//! NATS that the bridge (src/bridge/) relies on, shown with the async-nats
//! client against real `nats-server` 2.9 processes on loopback:
//!
//! - the harness starts routed servers with JetStream, tells their URLs,
//!   pids and names, and leaves no process or file behind;
//! - a message published on one server reaches a subscriber on another
//!   once the subscription's interest has crossed the route — and is
//!   dropped before that (a `flush` on the subscriber's side does not wait
//!   for the other servers);
//! - a key-value bucket replicated on three servers is compare-and-set:
//!   `create` fails on an existing key, `update` needs the last revision;
//!   async-nats 0.52's `create_key_value` cannot read a 2.9 server's
//!   account info, so a bucket is made as its stream ([`create_bucket`])
//!   and opened with `get_key_value`, without direct gets (with them a
//!   replica that lags answers reads with an older value);
//! - a request nobody listens for fails at once with "no responders",
//!   long before its timeout;
//! - a client whose server is SIGKILLed reconnects to another of its
//!   servers, and its later publishes arrive; the server restarts on its
//!   own ports and store and rejoins;
//! - a bucket survives the SIGKILL of its stream's leader, but writes fail
//!   for the seconds the others take to elect another.
//!
//! Each test starts its own cluster, runs its body under a tokio timeout
//! and drops the cluster at the end (every server SIGKILLed and reaped).
//! Needs `nats-server` on the `PATH` (Debian package).

use std::future::Future;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, stream};
use async_nats::{Client, ConnectOptions, Event, RequestErrorKind};
use futures_util::StreamExt;

mod common;
use common::nats::NatsCluster;

/// What a test body returns: `Err` says which check failed.
type Check = Result<(), String>;

/// `Err` with the line, unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(format!("line {}: {}", line!(), format!($($fmt)*)));
        }
    };
}

/// Any error as the test's message, with what was being done.
fn err<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> String {
    move |e| format!("{what}: {e}")
}

/// Starts `n` servers or fails the test with the harness's explanation.
fn cluster(n: usize) -> NatsCluster {
    NatsCluster::start(n).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `body` on a two-thread runtime, failing the test on `Err` or after
/// `limit`. The body's future is polled on the test's own thread (so a
/// cluster moved into it is dropped there, see `common::nats`).
fn bounded(limit: Duration, body: impl Future<Output = Check>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(async { tokio::time::timeout(limit, body).await }) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{e}"),
        Err(_) => panic!("not done within {limit:?}"),
    }
}

/// A client of the servers at `urls`, tried in that order.
async fn connect(urls: &[String]) -> Result<Client, String> {
    ConnectOptions::new()
        .retain_servers_order()
        .connection_timeout(Duration::from_secs(5))
        .connect(urls)
        .await
        .map_err(err("connect"))
}

/// The next message of `sub` within `limit`, `None` if none came.
async fn next_within(sub: &mut async_nats::Subscriber, limit: Duration) -> Option<Vec<u8>> {
    match tokio::time::timeout(limit, sub.next()).await {
        Ok(Some(m)) => Some(m.payload.to_vec()),
        _ => None,
    }
}

/// Publishes `probe-<n>` on `subject` every 10 ms until `sub` gets one
/// (the subscription's interest reached the publisher's server), at most
/// `limit`; returns how long that took. Drains the probes still in flight.
async fn await_interest(
    publisher: &Client,
    subject: &str,
    sub: &mut async_nats::Subscriber,
    limit: Duration,
) -> Result<Duration, String> {
    let start = Instant::now();
    for n in 0u64.. {
        ensure!(
            start.elapsed() < limit,
            "no probe on {subject} came through within {limit:?}"
        );
        publisher
            .publish(subject.to_owned(), format!("probe-{n}").into())
            .await
            .map_err(err("publish probe"))?;
        publisher.flush().await.map_err(err("flush probe"))?;
        if next_within(sub, Duration::from_millis(10)).await.is_some() {
            break;
        }
    }
    let took = start.elapsed();
    while next_within(sub, Duration::from_millis(50)).await.is_some() {}
    Ok(took)
}

/// Makes key-value bucket `bucket` on `replicas` servers and opens it.
///
/// async-nats 0.52's `create_key_value` first asks for the account's info
/// (`$JS.API.INFO`) and cannot decode a 2.9 server's answer (it lacks
/// `reserved_memory` and `reserved_storage`), so this makes the bucket's
/// stream as `create_key_value` would (its `kv_to_stream_config`: stream
/// `KV_<bucket>` on `$KV.<bucket>.>`, one value per key, rollups and
/// deletes through the API denied, new messages discarded when full) and
/// opens it with `get_key_value`, which reads only the stream's info.
/// Everything on the bucket then works on 2.9.
///
/// One difference: direct gets are off. With them (`create_key_value`'s
/// `allow_direct: true`) any replica answers `get` and `entry`, and a
/// follower that has not applied the last write yet answers with the value
/// before it. With them, 2 of 8 runs of this suite failed
/// `kv_bucket_on_three_replicas_is_compare_and_set`: `entry` through one
/// server right after a `create` through another returned the tombstone
/// before it, and once `create` of a key just deleted failed with "key
/// already exists" (`create` reads the key after its first try fails, and
/// read a stale put instead of the tombstone). Without them the stream's
/// leader answers every read; 10 runs of 10 passed.
async fn create_bucket(js: &jetstream::Context, bucket: &str, replicas: usize) -> Result<kv::Store, String> {
    js.create_stream(stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: false,
        discard: stream::DiscardPolicy::New,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(err("create the bucket's stream"))?;
    js.get_key_value(bucket).await.map_err(err("open the bucket"))
}

/// Server names as a client sees them.
fn server_of(client: &Client) -> String {
    client.server_info().server_name
}

#[test]
fn harness_starts_routed_servers_and_leaves_nothing_behind() {
    let c = cluster(3);
    let urls = c.urls();
    let parts: Vec<&str> = urls.split(',').collect();
    assert_eq!(parts.len(), 3, "urls {urls}");
    let pids: Vec<u32> = (0..3).map(|i| c.pid(i).expect("running")).collect();
    for (i, part) in parts.iter().enumerate() {
        assert_eq!(*part, c.url(i));
        assert!(c.url(i).starts_with("nats://127.0.0.1:"), "{}", c.url(i));
        let varz = c.monitor(i, "/varz").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(varz["server_name"], c.server_name(i), "{varz}");
        assert!(varz["jetstream"].is_object(), "no JetStream on n{i}: {varz}");
        let routez = c.monitor(i, "/routez").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(routez["num_routes"], 2, "{routez}");
        let jsz = c.monitor(i, "/jsz").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(jsz["meta_cluster"]["cluster_size"], 3, "{jsz}");
    }
    let dir = c.dir().to_owned();
    assert!(dir.join("n0/js").is_dir());
    drop(c);
    for pid in pids {
        // SAFETY: kill(2) with signal 0 only checks that the pid exists;
        // it takes no pointers. Reaped servers are gone.
        let alive = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
        assert!(!alive, "server {pid} still exists after the drop");
    }
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn single_server_has_jetstream() {
    let c = NatsCluster::single().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.size(), 1);
    assert_eq!(c.urls(), c.url(0));
    bounded(Duration::from_secs(30), async move {
        let client = connect(&[c.url(0)]).await?;
        let kv = create_bucket(&jetstream::new(client), "single", 1).await?;
        let rev = kv.create("k", "v".into()).await.map_err(err("create"))?;
        ensure!(rev == 1, "first revision {rev}");
        drop(c);
        Ok(())
    });
}

/// (a) Core publish/subscribe across the route, in order and without loss
/// once the subscriber's interest has reached the publisher's server.
#[test]
fn subscriber_on_node_0_receives_a_publisher_on_node_2() {
    let c = cluster(3);
    bounded(Duration::from_secs(60), async move {
        let sub_client = connect(&[c.url(0)]).await?;
        let pub_client = connect(&[c.url(2)]).await?;
        ensure!(
            server_of(&sub_client) == "n0",
            "subscriber on {}",
            server_of(&sub_client)
        );
        ensure!(
            server_of(&pub_client) == "n2",
            "publisher on {}",
            server_of(&pub_client)
        );
        let mut sub = sub_client
            .subscribe("harness.a")
            .await
            .map_err(err("subscribe"))?;
        sub_client.flush().await.map_err(err("flush"))?;
        let took = await_interest(&pub_client, "harness.a", &mut sub, Duration::from_secs(5)).await?;
        eprintln!("interest crossed the route {took:?} after subscribe + flush");
        const N: u64 = 1_000;
        for seq in 0..N {
            pub_client
                .publish("harness.a", seq.to_string().into())
                .await
                .map_err(err("publish"))?;
        }
        pub_client.flush().await.map_err(err("flush"))?;
        for want in 0..N {
            let got = next_within(&mut sub, Duration::from_secs(5)).await;
            let got = got.map(|p| String::from_utf8_lossy(&p).into_owned());
            ensure!(
                got.as_deref() == Some(want.to_string().as_str()),
                "message {want}: got {got:?}"
            );
        }
        drop(c);
        Ok(())
    });
}

/// (b) A key-value bucket on three replicas, made right after the start:
/// `create` and `update` are compare-and-set on the key's revision, seen
/// alike from clients on different servers.
#[test]
fn kv_bucket_on_three_replicas_is_compare_and_set() {
    let c = cluster(3);
    bounded(Duration::from_secs(60), async move {
        let js0 = jetstream::new(connect(&[c.url(0)]).await?);
        let js2 = jetstream::new(connect(&[c.url(2)]).await?);
        let kv0 = create_bucket(&js0, "harness", 3).await?;
        let status = kv0.status().await.map_err(err("bucket status"))?;
        ensure!(
            status.info.config.num_replicas == 3,
            "replicas {}",
            status.info.config.num_replicas
        );
        let placed = status.info.cluster.as_ref().map_or(0, |c| c.replicas.len() + 1);
        ensure!(
            placed == 3,
            "bucket on {placed} servers: {:?}",
            status.info.cluster
        );
        let kv2 = js2.get_key_value("harness").await.map_err(err("open bucket"))?;

        let r1 = kv0.create("k", "v1".into()).await.map_err(err("create k"))?;
        let again = kv2.create("k", "v2".into()).await;
        ensure!(
            again
                .as_ref()
                .is_err_and(|e| e.kind() == kv::CreateErrorKind::AlreadyExists),
            "second create of k: {again:?}"
        );
        let r2 = kv2
            .update("k", "v2".into(), r1)
            .await
            .map_err(err("update with the last revision"))?;
        ensure!(r2 > r1, "revisions {r1} then {r2}");
        let stale = kv0.update("k", "v3".into(), r1).await;
        ensure!(
            stale
                .as_ref()
                .is_err_and(|e| e.kind() == kv::UpdateErrorKind::WrongLastRevision),
            "update with a stale revision: {stale:?}"
        );
        let entry = kv0.entry("k").await.map_err(err("entry"))?;
        ensure!(
            entry
                .as_ref()
                .is_some_and(|e| e.value.as_ref() == b"v2" && e.revision == r2),
            "k is {entry:?}"
        );
        // A deleted key (a tombstone) can be created again, at once and
        // through another server: `create` reads the tombstone's revision
        // and updates on it. A lock's release and the next taker, 50 times.
        let mut last = r2;
        for round in 0..50 {
            let (deleter, creator) = if round % 2 == 0 {
                (&kv2, &kv0)
            } else {
                (&kv0, &kv2)
            };
            deleter.delete("k").await.map_err(err("delete"))?;
            let rev = creator
                .create("k", format!("v{round}").into())
                .await
                .map_err(|e| format!("create after delete, round {round}: {e}"))?;
            ensure!(rev == last + 2, "round {round}: revision {rev} after {last}");
            let seen = deleter.entry("k").await.map_err(err("entry"))?;
            ensure!(
                seen.as_ref().is_some_and(|e| e.revision == rev),
                "round {round}: the other server reads {seen:?}, not revision {rev}"
            );
            last = rev;
        }
        drop(c);
        Ok(())
    });
}

/// async-nats 0.52's `create_key_value` fails on a 2.9 server (see
/// [`create_bucket`]) and works on a newer one: if this fails on a newer
/// server, `create_bucket`'s detour is no longer needed.
#[test]
fn create_key_value_needs_a_server_newer_than_2_9() {
    let c = NatsCluster::single().unwrap_or_else(|e| panic!("{e}"));
    bounded(Duration::from_secs(30), async move {
        let client = connect(&[c.url(0)]).await?;
        let version = client.server_info().version;
        let made = jetstream::new(client)
            .create_key_value(kv::Config {
                bucket: "direct".into(),
                ..Default::default()
            })
            .await;
        if version.starts_with("2.9.") {
            ensure!(
                made.as_ref()
                    .is_err_and(|e| e.kind() == jetstream::context::CreateKeyValueErrorKind::JetStream),
                "create_key_value on {version}: {:?}",
                made.map(|_| ())
            );
        } else {
            ensure!(
                made.is_ok(),
                "create_key_value on {version}: {:?}",
                made.map(|_| ())
            );
        }
        drop(c);
        Ok(())
    });
}

/// (c) No responders: the server answers a request that has no
/// subscriber at once (a 503 status), and interest anywhere in the cluster
/// counts once it has crossed the routes.
#[test]
fn request_without_responder_fails_at_once_with_no_responders() {
    let c = cluster(3);
    bounded(Duration::from_secs(60), async move {
        let timeout = Duration::from_secs(20);
        let requester = ConnectOptions::new()
            .request_timeout(Some(timeout))
            .connect(c.url(2))
            .await
            .map_err(err("connect"))?;
        let start = Instant::now();
        let answer = requester.request("harness.nobody", "x".into()).await;
        let took = start.elapsed();
        ensure!(
            answer
                .as_ref()
                .is_err_and(|e| e.kind() == RequestErrorKind::NoResponders),
            "request without a responder: {answer:?}"
        );
        ensure!(
            took < Duration::from_secs(2),
            "no-responders took {took:?} (timeout {timeout:?})"
        );
        eprintln!("no responders after {took:?}");

        // A responder on n0: requests from n2 see it once its interest has
        // crossed the route; until then they fail with no responders.
        let responder = connect(&[c.url(0)]).await?;
        let mut sub = responder
            .subscribe("harness.echo")
            .await
            .map_err(err("subscribe"))?;
        responder.flush().await.map_err(err("flush"))?;
        let serve = tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                if let Some(reply) = m.reply {
                    let _ = responder.publish(reply, m.payload).await;
                }
            }
        });
        let start = Instant::now();
        let mut refused = 0;
        loop {
            match requester.request("harness.echo", "ping".into()).await {
                Ok(m) => {
                    ensure!(m.payload.as_ref() == b"ping", "echo {:?}", m.payload);
                    break;
                }
                Err(e) if e.kind() == RequestErrorKind::NoResponders => refused += 1,
                Err(e) => return Err(format!("request: {e}")),
            }
            ensure!(start.elapsed() < Duration::from_secs(5), "responder never seen");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        eprintln!(
            "responder on n0 answered n2 after {:?} ({refused} no-responders before)",
            start.elapsed()
        );
        for i in 0..100u32 {
            let m = requester
                .request("harness.echo", i.to_string().into())
                .await
                .map_err(err("request"))?;
            ensure!(
                m.payload.as_ref() == i.to_string().as_bytes(),
                "echo of {i}: {:?}",
                m.payload
            );
        }
        serve.abort();
        drop(c);
        Ok(())
    });
}

/// (d) A client given every URL, connected to n1: n1 is SIGKILLed while it
/// publishes; it reconnects to another server and a later publish arrives.
/// Then n1 restarts on its own ports and store and serves again.
#[test]
fn client_reconnects_to_another_server_when_its_server_is_killed() {
    let mut c = cluster(3);
    bounded(Duration::from_secs(90), async move {
        let sub_client = connect(&[c.url(0)]).await?;
        let mut sub = sub_client
            .subscribe("harness.d")
            .await
            .map_err(err("subscribe"))?;
        sub_client.flush().await.map_err(err("flush"))?;

        let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        let urls = vec![c.url(1), c.url(0), c.url(2)];
        let publisher = ConnectOptions::new()
            .retain_servers_order()
            .event_callback(move |event| {
                let tx = events_tx.clone();
                async move {
                    let _ = tx.send((Instant::now(), event));
                }
            })
            .connect(&urls)
            .await
            .map_err(err("connect"))?;
        ensure!(
            server_of(&publisher) == "n1",
            "publisher on {}",
            server_of(&publisher)
        );
        await_interest(&publisher, "harness.d", &mut sub, Duration::from_secs(5)).await?;

        // Publish a numbered stream; kill n1 after 200 of 2,000.
        let mut killed_at = None;
        for seq in 0..2_000u32 {
            if seq == 200 {
                let pid = c.pid(1);
                killed_at = Some(Instant::now());
                c.kill(1);
                eprintln!("SIGKILLed n1 (pid {pid:?}) after 200 publishes");
            }
            publisher
                .publish("harness.d", seq.to_string().into())
                .await
                .map_err(err("publish"))?;
            if seq % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let killed_at = killed_at.ok_or("never killed")?;

        // The client notices, and connects to n0 or n2.
        let mut disconnected = None;
        let connected = loop {
            let left = Duration::from_secs(15).saturating_sub(killed_at.elapsed());
            let Ok(Some((at, event))) = tokio::time::timeout(left, events.recv()).await else {
                return Err("no reconnect within 15 s of the kill".into());
            };
            match event {
                Event::Disconnected => disconnected = Some(at),
                Event::Connected if disconnected.is_some() => break at,
                _ => {}
            }
        };
        let server = server_of(&publisher);
        ensure!(server == "n0" || server == "n2", "reconnected to {server}");
        eprintln!(
            "kill → disconnected event {:?}, → connected to {server} {:?}",
            disconnected.map(|d| d.duration_since(killed_at)),
            connected.duration_since(killed_at)
        );

        // What was published around the kill: a prefix arrived, the rest
        // may be lost (core NATS is at most once). A later publish arrives.
        publisher
            .publish("harness.d", "after".into())
            .await
            .map_err(err("publish after"))?;
        publisher.flush().await.map_err(err("flush after"))?;
        let mut seen = 0u32;
        let mut highest = None;
        loop {
            let Some(p) = next_within(&mut sub, Duration::from_secs(5)).await else {
                return Err(format!("'after' never arrived ({seen} numbered seen)"));
            };
            if p == b"after" {
                break;
            }
            let text = String::from_utf8_lossy(&p).into_owned();
            if let Ok(seq) = text.parse::<u32>() {
                ensure!(highest < Some(seq), "{seq} after {highest:?}: out of order");
                highest = Some(seq);
                seen += 1;
            }
        }
        eprintln!("{seen} of 2000 numbered messages arrived (highest {highest:?})");
        ensure!(seen >= 200, "only {seen} numbered messages arrived");

        // n1 comes back on its ports and store; a client of n1 alone reaches
        // the subscriber on n0 again.
        let start = Instant::now();
        tokio::task::block_in_place(|| c.restart(1))?;
        eprintln!("n1 restarted and ready in {:?}", start.elapsed());
        let back = connect(&[c.url(1)]).await?;
        ensure!(
            server_of(&back) == "n1",
            "restarted client on {}",
            server_of(&back)
        );
        await_interest(&back, "harness.d", &mut sub, Duration::from_secs(5)).await?;
        drop(c);
        Ok(())
    });
}

/// A bucket on three replicas outlives its stream leader: SIGKILL the
/// server that leads the bucket's stream, and a compare-and-set `update`
/// through another server fails until the other two elect a leader (6 to
/// 8 s here: nats-server's Raft waits seconds before it calls an
/// election), then succeeds on the revision from before the kill. Each
/// failure meanwhile comes at once, not as a timeout: with no stream
/// leader nobody takes the bucket's subject, so the publish gets no
/// responders, which async-nats reports as "no stream found for given
/// subject". The restarted server catches up and the bucket is whole
/// again.
#[test]
fn kv_bucket_survives_its_stream_leader_killed() {
    let mut c = cluster(3);
    bounded(Duration::from_secs(90), async move {
        let js = jetstream::new(connect(&[c.url(0), c.url(1), c.url(2)]).await?);
        let kv = create_bucket(&js, "survivor", 3).await?;
        let r1 = kv
            .create("lock", "holder-1".into())
            .await
            .map_err(err("create"))?;
        let status = kv.status().await.map_err(err("status"))?;
        let leader = status
            .info
            .cluster
            .and_then(|c| c.leader)
            .ok_or("the bucket's stream has no leader")?;
        let i = (0..3)
            .find(|&i| c.server_name(i) == leader)
            .ok_or(format!("leader {leader} is none of ours"))?;
        // A client of the two others only, with short JetStream requests.
        let others: Vec<String> = (0..3).filter(|&j| j != i).map(|j| c.url(j)).collect();
        let mut js2 = jetstream::new(connect(&others).await?);
        js2.set_timeout(Duration::from_millis(500));
        let kv2 = js2.get_key_value("survivor").await.map_err(err("open"))?;

        let killed = Instant::now();
        c.kill(i);
        let mut failures = Vec::new();
        let r2 = loop {
            match kv2.update("lock", "holder-2".into(), r1).await {
                Ok(rev) => break rev,
                Err(e) => failures.push(e.to_string()),
            }
            ensure!(
                killed.elapsed() < Duration::from_secs(20),
                "no update within 20 s of killing the stream leader {leader}: {failures:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        eprintln!(
            "stream leader {leader} killed: update through the others succeeded after {:?}, \
             {} failed tries before (first {:?}, last {:?})",
            killed.elapsed(),
            failures.len(),
            failures.first(),
            failures.last()
        );
        ensure!(r2 == r1 + 1, "revision {r2} after {r1}");
        let stale = kv2.update("lock", "holder-3".into(), r1).await;
        ensure!(
            stale
                .as_ref()
                .is_err_and(|e| e.kind() == kv::UpdateErrorKind::WrongLastRevision),
            "stale update after the failover: {stale:?}"
        );

        tokio::task::block_in_place(|| c.restart(i))?;
        let start = Instant::now();
        loop {
            let status = kv2.status().await.map_err(err("status"))?;
            let replicas = status.info.cluster.map(|c| c.replicas).unwrap_or_default();
            if replicas.len() == 2 && replicas.iter().all(|p| p.current && !p.offline) {
                break;
            }
            ensure!(
                start.elapsed() < Duration::from_secs(20),
                "replicas not current 20 s after the restart: {replicas:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("{leader} restarted; replicas current after {:?}", start.elapsed());
        drop(c);
        Ok(())
    });
}

/// Why the bridge keeps its leases on one server (`NatsConfig::kv_replicas`
/// = 1): on nats-server 2.9.10, two concurrent `create`s of one key from
/// clients on different servers can both succeed on a stream replicated on
/// three servers (110 of 200 rounds measured), never on a one-server stream
/// in the same cluster. This test fails once Debian's server makes
/// compare-and-set atomic on replicated streams: then the default can rise.
#[test]
fn concurrent_creates_both_succeed_on_3_replicas_never_on_1() {
    let c = cluster(3);
    let urls: Vec<String> = (0..3).map(|i| c.url(i)).collect();
    bounded(Duration::from_secs(120), async move {
        let a = connect(&urls[0..1]).await?;
        let b = connect(&urls[2..3]).await?;
        let mut both = [0; 2];
        for (i, replicas) in [3usize, 1].into_iter().enumerate() {
            let bucket = format!("cas{replicas}");
            let ka = create_bucket(&jetstream::new(a.clone()), &bucket, replicas).await?;
            let kb = jetstream::new(b.clone())
                .get_key_value(&bucket)
                .await
                .map_err(err("open the bucket from the other server"))?;
            for _ in 0..100 {
                if let Some(e) = ka.entry("k").await.map_err(err("entry"))? {
                    if e.operation == kv::Operation::Put {
                        ka.delete_expect_revision("k", Some(e.revision))
                            .await
                            .map_err(err("delete"))?;
                    }
                }
                let (x, y) = tokio::join!(ka.create("k", "x".into()), kb.create("k", "y".into()));
                if x.is_ok() && y.is_ok() {
                    both[i] += 1;
                }
            }
        }
        drop(c);
        ensure!(
            both[1] == 0,
            "one server: both creates succeeded {} times",
            both[1]
        );
        ensure!(
            both[0] > 0,
            "three servers: never both in 100 rounds; compare-and-set may be atomic now \
             (raise NatsConfig::kv_replicas' default)"
        );
        Ok(())
    });
}
