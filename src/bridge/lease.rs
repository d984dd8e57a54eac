//! Leases on NATS's key-value store: what cross-host locks
//! (`synchronize_global`) and cross-host leaders (`campaign_global`) are
//! made of.
//!
//! One bucket per cluster, `shmc_<cluster>`, on a JetStream stream the
//! first bridge creates, with direct gets off, so every read is the stream
//! leader's (a replica's read can lag, and a lease read stale is a lease
//! lost), on `NatsConfig::kv_replicas` servers: **1 by default**, because
//! Debian's nats-server 2.9.10 does not make compare-and-set atomic on a
//! replicated stream: two concurrent `create`s of one key both succeeded
//! in 110 of 200 rounds on a 3-server stream, in 0 of 200 on a
//! one-server stream in the same cluster (clients on different servers).
//! On one server a lease is as safe as the store, and unavailable while
//! that server is down (nobody can take a lock then: no double grant). A

//! lease is one key, `lock.<name>` or `leader.<role>`, whose value names
//! the holder (host, slot, generation):
//!
//! - **Take**: `create` (compare-and-set on "no such key"). The revision
//!   it returns is the **fencing token**: every later acquisition of the
//!   key, by anyone, gets a larger one.
//! - **Hold**: the holder's bridge rewrites the key every third of the
//!   lease with `update` on the revision it last wrote (compare-and-set);
//!   if that fails, someone took it over and the holder has lost it.
//! - **Take over**: a contender that sees the key's revision unchanged for
//!   a whole lease (measured on its own clock: no clocks are compared
//!   across hosts) takes it with `update` on that revision. So a holder
//!   whose host died is replaced within a lease and a look (at most
//!   `lease + lease / 6`).
//! - **Give back**: `delete` on the revision last written.
//!
//! This is weaker than the robust mutex inside a host: a holder that is
//! paused (a stopped process, a partitioned host, a NATS outage longer
//! than the lease) can outlive its lease while someone else takes the key;
//! it learns at its next renewal. Work guarded by such a lock must carry
//! the fencing token to whatever it writes, and that store must refuse a
//! token smaller than one it has seen.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, stream};

/// A lease's key for the lock `name` or the role `role`: KV keys are
/// `[-/_=.a-zA-Z0-9]+`; anything else in the name is written as `=xx`
/// (hex), so distinct names never share a key.
pub(crate) fn key(kind: &str, name: &str) -> String {
    let mut k = String::with_capacity(kind.len() + 1 + name.len());
    k.push_str(kind);
    k.push('.');
    if name.is_empty() {
        k.push('=');
    }
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            k.push(b as char);
        } else {
            k.push_str(&format!("={b:02x}"));
        }
    }
    k
}

/// Who holds a lease.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Holder {
    pub(crate) host: String,
    pub(crate) slot: u32,
    pub(crate) generation: u32,
}

/// A lease this bridge holds.
#[derive(Debug, Clone)]
struct Held {
    holder: Holder,
    /// The acquisition's revision: the fencing token.
    token: u64,
    /// The revision last written (renewals move it).
    revision: u64,
}

/// Why a lease could not be taken.
#[derive(Debug)]
pub(crate) enum LeaseError {
    /// Not before the deadline.
    TimedOut,
    /// The store could not be reached or refused (the text says why).
    Store(String),
}

/// The bucket and the leases this bridge holds.
pub(crate) struct Leases {
    kv: kv::Store,
    lease: Duration,
    held: Mutex<HashMap<String, Held>>,
}

/// The bucket of cluster `cluster`, made on `replicas` servers if it is
/// not there yet.
pub(crate) async fn open(
    nc: &async_nats::Client,
    cluster: &str,
    lease: Duration,
    replicas: usize,
) -> Result<Leases, String> {
    let js = jetstream::new(nc.clone());
    let bucket = format!("shmc_{cluster}");
    if js.get_key_value(&bucket).await.is_err() {
        // async-nats's `create_key_value` asks the account's limits first,
        // which nats-server 2.9's answer does not parse as: the stream is
        // made by hand as a bucket is (one value per key, rollups, no
        // direct gets).
        let mut made = Err(String::new());
        // Fewer servers than asked for: on one.
        for replicas in [replicas.max(1), 1] {
            let config = stream::Config {
                name: format!("KV_{bucket}"),
                subjects: vec![format!("$KV.{bucket}.>")],
                max_messages_per_subject: 1,
                allow_rollup: true,
                deny_delete: true,
                allow_direct: false,
                discard: stream::DiscardPolicy::New,
                num_replicas: replicas,
                ..Default::default()
            };
            made = js
                .get_or_create_stream(config)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string());
            if made.is_ok() {
                break;
            }
        }
        made.map_err(|e| format!("cannot make the key-value bucket {bucket}: {e}"))?;
    }
    let kv = js
        .get_key_value(&bucket)
        .await
        .map_err(|e| format!("cannot open the key-value bucket {bucket}: {e}"))?;
    Ok(Leases {
        kv,
        lease,
        held: Mutex::new(HashMap::new()),
    })
}

/// A lease's value: its holder and its term (fencing token). The write
/// that takes a lease carries term 0: its own revision, known only once
/// written, is the term; renewals carry it.
fn encode(holder: &Holder, term: u64) -> Vec<u8> {
    postcard::to_allocvec(&(holder, term)).unwrap_or_default()
}

impl Leases {
    /// The lease's length.
    pub(crate) fn lease(&self) -> Duration {
        self.lease
    }

    /// Takes `key` for `holder` by `deadline`: its fencing token.
    pub(crate) async fn take(&self, key: &str, holder: Holder, deadline: Instant) -> Result<u64, LeaseError> {
        self.take_while(key, holder, deadline, || true).await
    }

    /// [`Leases::take`], giving up (`TimedOut`) as soon as `wanted` says
    /// so. `wanted` is asked between writes only: unlike dropping the
    /// future, it never leaves a key written to the store that this
    /// bridge does not know it holds (nobody would renew or give it back,
    /// and every contender would wait a whole lease).
    pub(crate) async fn take_while(
        &self,
        key: &str,
        holder: Holder,
        deadline: Instant,
        wanted: impl Fn() -> bool,
    ) -> Result<u64, LeaseError> {
        let value = encode(&holder, 0);
        // The revision seen, and since when, for a takeover.
        let mut seen: Option<(u64, Instant)> = None;
        let mut last_error = None;
        loop {
            if Instant::now() >= deadline || !wanted() {
                return Err(last_error.map_or(LeaseError::TimedOut, LeaseError::Store));
            }
            match self.kv.create(key, value.clone().into()).await {
                Ok(revision) => return Ok(self.hold(key, holder, revision)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => {
                    // The stream's leader moving (seconds) or NATS away.
                    last_error = Some(e.to_string());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
            last_error = None;
            match self.kv.entry(key).await {
                Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                    let now = Instant::now();
                    match seen {
                        Some((rev, since))
                            if rev == entry.revision && now.duration_since(since) >= self.lease =>
                        {
                            // Nobody renewed it for a whole lease.
                            if let Ok(revision) = self.kv.update(key, value.clone().into(), rev).await {
                                tracing::info!(key, "lease taken over from a silent holder");
                                return Ok(self.hold(key, holder, revision));
                            }
                            seen = None;
                        }
                        Some((rev, _)) if rev == entry.revision => {}
                        _ => seen = Some((entry.revision, now)),
                    }
                }
                // Deleted, or gone: create again at once.
                Ok(_) => continue,
                Err(e) => last_error = Some(e.to_string()),
            }
            tokio::time::sleep((self.lease / 6).max(Duration::from_millis(10))).await;
        }
    }

    fn hold(&self, key: &str, holder: Holder, revision: u64) -> u64 {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).insert(
            key.to_owned(),
            Held {
                holder,
                token: revision,
                revision,
            },
        );
        revision
    }

    /// Who holds `key` as the store says, and its term (fencing token).
    /// Not checked for staleness: a holder that died within the last lease
    /// is still named.
    pub(crate) async fn holder(&self, key: &str) -> Result<Option<(Holder, u64)>, String> {
        match self.kv.entry(key).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                let Ok((holder, term)) = postcard::from_bytes::<(Holder, u64)>(&entry.value) else {
                    return Ok(None);
                };
                Ok(Some((holder, if term == 0 { entry.revision } else { term })))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Writes `value` as `key`'s (a topic's last value).
    pub(crate) async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, String> {
        self.kv.put(key, value.into()).await.map_err(|e| e.to_string())
    }

    /// `key`'s value, if it has one.
    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        match self.kv.entry(key).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => Ok(Some(e.value.to_vec())),
            Ok(_) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Every value written to `key` from now on, in the store's order.
    pub(crate) async fn watch(&self, key: &str) -> Result<kv::Watch, String> {
        self.kv.watch(key).await.map_err(|e| e.to_string())
    }

    /// Whether this bridge holds `key` for `holder` with fencing token
    /// `token`.
    pub(crate) fn holds(&self, key: &str, holder: &Holder) -> Option<u64> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .filter(|h| h.holder == *holder)
            .map(|h| h.token)
    }

    /// The keys this bridge holds, with their holders.
    pub(crate) fn held(&self) -> Vec<(String, Holder)> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, h)| (k.clone(), h.holder.clone()))
            .collect()
    }

    /// Renews every lease this bridge holds; returns the keys it lost
    /// (someone took them over).
    pub(crate) async fn renew(&self) -> Vec<String> {
        let held: Vec<(String, Held)> = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, h)| (k.clone(), h.clone()))
            .collect();
        let mut lost = Vec::new();
        for (key, h) in held {
            match self
                .kv
                .update(&key, encode(&h.holder, h.token).into(), h.revision)
                .await
            {
                Ok(revision) => {
                    if let Some(mine) = self.held.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&key) {
                        if mine.token == h.token {
                            mine.revision = revision;
                        }
                    }
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    tracing::warn!(key, "lease lost: taken over");
                    self.forget(&key, h.token);
                    lost.push(key);
                }
                // NATS away: try again at the next renewal (the lease may
                // lapse meanwhile; a taker's update then fails ours).
                Err(e) => tracing::debug!(key, error = %e, "lease not renewed"),
            }
        }
        lost
    }

    fn forget(&self, key: &str, token: u64) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.get(key).is_some_and(|h| h.token == token) {
            held.remove(key);
        }
    }

    /// Gives `key` back if this bridge holds it with `token`.
    pub(crate) async fn give_back(&self, key: &str, token: u64) -> bool {
        let revision = {
            let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            match held.get(key) {
                Some(h) if h.token == token => h.revision,
                _ => return false,
            }
        };
        self.forget(key, token);
        self.kv.delete_expect_revision(key, Some(revision)).await.is_ok()
    }

    /// Rewrites `key`, held with `token`, for a new holder on this host
    /// (the host's local leader changed): the term moves on.
    pub(crate) async fn hand_over(&self, key: &str, token: u64, holder: Holder) -> Option<u64> {
        let revision = {
            let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            match held.get(key) {
                Some(h) if h.token == token => h.revision,
                _ => return None,
            }
        };
        match self.kv.update(key, encode(&holder, 0).into(), revision).await {
            Ok(new) => {
                self.forget(key, token);
                Some(self.hold(key, holder, new))
            }
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_and_distinct() {
        assert_eq!(key("lock", "orders"), "lock.orders");
        assert_eq!(key("leader", ""), "leader.=");
        assert_eq!(key("lock", "a.b"), "lock.a=2eb");
        assert_ne!(key("lock", "a.b"), key("lock", "a=2eb"));
        assert_eq!(key("lock", "é"), "lock.=c3=a9");
    }
}
