//! What a host's bridge needs to join the others: [`NatsConfig`].

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// How a host joins the other hosts of its cluster through NATS: passed
/// to `Cluster::builder().nats(..)`, or made by `shmcluster run --nats`.
///
/// Credentials are never taken from the command line (where `ps` shows
/// them): [`NatsConfig::credentials_from_env`] reads them from the
/// environment, and a creds or nkey file is named by its path.
#[derive(Clone)]
pub struct NatsConfig {
    /// NATS server URLs (`nats://127.0.0.1:4222`); the client connects to
    /// one and fails over to the others.
    pub servers: Vec<String>,
    /// The cluster's name: every subject and key-value bucket of the
    /// cluster carries it, so two clusters on one NATS never see each
    /// other's messages. Letters, digits, `-` and `_`.
    pub cluster_name: String,
    /// This host's name among the cluster's hosts, unique (a second
    /// bridge with the same name is refused). Letters, digits, `-`, `_`.
    pub host_id: String,
    /// How the bridge authenticates.
    pub credentials: NatsCredentials,
    /// TLS to the servers.
    pub tls: NatsTls,
    /// How often a bridge tells the others it is there (and which workers
    /// it has): 250 ms by default.
    pub heartbeat: Duration,
    /// A host not heard from this long is unreachable: its workers' map
    /// entries settle as `HostUnreachable` and calls to it fail at once.
    /// 2 s by default (eight heartbeats).
    pub host_timeout: Duration,
    /// The lease of a cross-host lock or leader (`synchronize_global`,
    /// `campaign_global`): a holder whose bridge has not renewed it for
    /// this long loses it. 3 s by default.
    pub lease: Duration,
    /// On how many servers the cluster's key-value bucket (the leases) is
    /// kept. 1 by default: nats-server 2.9's compare-and-set is not atomic
    /// on a replicated stream (two `create`s of one key both succeeded in
    /// 110 of 200 concurrent rounds on 3 servers; see `src/bridge/lease.rs`),
    /// and a lease must never be granted twice. Raise it only on a server
    /// whose compare-and-set holds on replicated streams: the leases then
    /// outlive a server's death.
    pub kv_replicas: usize,
}

/// How a bridge authenticates to NATS.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum NatsCredentials {
    /// None (a server without authorization).
    #[default]
    None,
    /// User and password.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// A token.
    Token(String),
    /// An nkey seed (`SU...`).
    NkeySeed(String),
    /// A `.creds` file (JWT and nkey seed, as `nsc` writes it).
    CredsFile(PathBuf),
}

/// TLS settings.
#[derive(Clone, Debug, Default)]
pub struct NatsTls {
    /// Require TLS even if the server does not ask for it.
    pub required: bool,
    /// A PEM file of root certificates to trust.
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key (PEM), for servers that verify
    /// clients.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl fmt::Debug for NatsCredentials {
    // Never prints a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::UserPassword { user, .. } => {
                write!(f, "UserPassword {{ user: {user:?}, password: <hidden> }}")
            }
            Self::Token(_) => f.write_str("Token(<hidden>)"),
            Self::NkeySeed(_) => f.write_str("NkeySeed(<hidden>)"),
            Self::CredsFile(p) => write!(f, "CredsFile({p:?})"),
        }
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("servers", &self.servers)
            .field("cluster_name", &self.cluster_name)
            .field("host_id", &self.host_id)
            .field("credentials", &self.credentials)
            .field("tls", &self.tls)
            .field("heartbeat", &self.heartbeat)
            .field("host_timeout", &self.host_timeout)
            .field("lease", &self.lease)
            .field("kv_replicas", &self.kv_replicas)
            .finish()
    }
}

/// A [`NatsConfig`] that cannot work.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NatsConfigError {
    /// No server URL.
    NoServers,
    /// A server URL that does not parse (`nats://host:port`,
    /// `tls://host:port`, `host:port`).
    Server {
        /// The URL given.
        url: String,
        /// Why it does not parse.
        reason: String,
    },
    /// A cluster or host name that is empty, too long (over 64 bytes) or
    /// has a character other than letters, digits, `-` and `_` (it becomes
    /// a NATS subject token).
    Name {
        /// Which name: `cluster_name` or `host_id`.
        what: &'static str,
        /// The name given.
        name: String,
    },
    /// A heartbeat, host timeout or lease out of range (the host timeout
    /// at least two heartbeats; each at most an hour), or a replica count
    /// not 1 to 5.
    Timing {
        /// Which setting.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// An environment variable that names credentials is set but unusable.
    Env {
        /// The variable.
        var: &'static str,
        /// Why.
        reason: String,
    },
}

impl fmt::Display for NatsConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoServers => f.write_str("no NATS server URL given"),
            Self::Server { url, reason } => write!(f, "NATS server URL {url:?}: {reason}"),
            Self::Name { what, name } => write!(
                f,
                "{what} {name:?} is not a valid name: 1 to 64 letters, digits, '-' or '_'"
            ),
            Self::Env { var, reason } => write!(f, "{var}: {reason}"),
            Self::Timing { what, reason } => write!(f, "{what}: {reason}"),
        }
    }
}

impl std::error::Error for NatsConfigError {}

/// Environment variables [`NatsConfig::credentials_from_env`] reads.
pub const ENV_USER: &str = "SHMCLUSTER_NATS_USER";
/// The password for [`ENV_USER`].
pub const ENV_PASSWORD: &str = "SHMCLUSTER_NATS_PASSWORD";
/// A token.
pub const ENV_TOKEN: &str = "SHMCLUSTER_NATS_TOKEN";
/// An nkey seed.
pub const ENV_NKEY: &str = "SHMCLUSTER_NATS_NKEY";
/// The path of a file holding an nkey seed.
pub const ENV_NKEY_FILE: &str = "SHMCLUSTER_NATS_NKEY_FILE";
/// The path of a `.creds` file.
pub const ENV_CREDS: &str = "SHMCLUSTER_NATS_CREDS";

impl NatsConfig {
    /// A configuration for `servers` (comma-separated URLs), the cluster
    /// `cluster_name` and this host `host_id`, without credentials, with
    /// the default heartbeat and host timeout.
    pub fn new(servers: &str, cluster_name: &str, host_id: &str) -> Self {
        Self {
            servers: servers
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            cluster_name: cluster_name.to_owned(),
            host_id: host_id.to_owned(),
            credentials: NatsCredentials::None,
            tls: NatsTls::default(),
            heartbeat: Duration::from_millis(250),
            host_timeout: Duration::from_secs(2),
            lease: Duration::from_secs(3),
            kv_replicas: 1,
        }
    }

    /// Takes credentials from the environment, the first of: a creds file
    /// (`SHMCLUSTER_NATS_CREDS`), an nkey seed (`SHMCLUSTER_NATS_NKEY`, or
    /// a file named by `SHMCLUSTER_NATS_NKEY_FILE`), a token
    /// (`SHMCLUSTER_NATS_TOKEN`), a user and password
    /// (`SHMCLUSTER_NATS_USER`, `SHMCLUSTER_NATS_PASSWORD`). Unchanged if
    /// none is set.
    ///
    /// # Errors
    /// A file that cannot be read, a user without a password.
    pub fn credentials_from_env(mut self) -> Result<Self, NatsConfigError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        if let Some(path) = var(ENV_CREDS) {
            self.credentials = NatsCredentials::CredsFile(path.into());
        } else if let Some(seed) = var(ENV_NKEY) {
            self.credentials = NatsCredentials::NkeySeed(seed.trim().to_owned());
        } else if let Some(path) = var(ENV_NKEY_FILE) {
            let seed = std::fs::read_to_string(&path).map_err(|e| NatsConfigError::Env {
                var: ENV_NKEY_FILE,
                reason: format!("cannot read {path}: {e}"),
            })?;
            self.credentials = NatsCredentials::NkeySeed(seed.trim().to_owned());
        } else if let Some(token) = var(ENV_TOKEN) {
            self.credentials = NatsCredentials::Token(token);
        } else if let Some(user) = var(ENV_USER) {
            let password = var(ENV_PASSWORD).ok_or(NatsConfigError::Env {
                var: ENV_PASSWORD,
                reason: format!("{ENV_USER} is set but {ENV_PASSWORD} is not"),
            })?;
            self.credentials = NatsCredentials::UserPassword { user, password };
        }
        Ok(self)
    }

    /// Checks the names and servers.
    ///
    /// # Errors
    /// [`NatsConfigError`].
    pub fn validate(&self) -> Result<(), NatsConfigError> {
        if self.servers.is_empty() {
            return Err(NatsConfigError::NoServers);
        }
        let hour = Duration::from_secs(3600);
        let timing = [
            ("heartbeat", self.heartbeat, Duration::from_millis(10)),
            ("host_timeout", self.host_timeout, self.heartbeat * 2),
            ("lease", self.lease, Duration::from_millis(100)),
        ];
        for (what, value, least) in timing {
            if value < least || value > hour {
                return Err(NatsConfigError::Timing {
                    what,
                    reason: format!("{value:?} is not between {least:?} and an hour"),
                });
            }
        }
        if self.kv_replicas == 0 || self.kv_replicas > 5 {
            return Err(NatsConfigError::Timing {
                what: "kv_replicas",
                reason: format!("{} is not 1 to 5", self.kv_replicas),
            });
        }
        for url in &self.servers {
            url.parse::<async_nats::ServerAddr>()
                .map_err(|e| NatsConfigError::Server {
                    url: url.clone(),
                    reason: e.to_string(),
                })?;
        }
        for (what, name) in [("cluster_name", &self.cluster_name), ("host_id", &self.host_id)] {
            if !valid_name(name) {
                return Err(NatsConfigError::Name {
                    what,
                    name: name.clone(),
                });
            }
        }
        Ok(())
    }
}

/// A name that is one NATS subject token and one key-value key token.
pub(crate) fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_subject_tokens_and_secrets_are_hidden() {
        let mut c = NatsConfig::new("nats://127.0.0.1:4222, nats://127.0.0.1:4223", "shop", "web-1");
        assert_eq!(c.servers.len(), 2);
        assert!(c.validate().is_ok());
        c.host_id = "web.1".into();
        assert!(matches!(
            c.validate(),
            Err(NatsConfigError::Name { what: "host_id", .. })
        ));
        c.host_id = "web-1".into();
        c.cluster_name = String::new();
        assert!(c.validate().is_err());
        assert!(NatsConfig::new("", "a", "b").validate() == Err(NatsConfigError::NoServers));
        let mut t = NatsConfig::new("nats://127.0.0.1:4222", "a", "b");
        t.heartbeat = Duration::ZERO;
        assert!(matches!(
            t.validate(),
            Err(NatsConfigError::Timing {
                what: "heartbeat",
                ..
            })
        ));
        t.heartbeat = Duration::from_millis(250);
        t.host_timeout = Duration::from_millis(300);
        assert!(matches!(
            t.validate(),
            Err(NatsConfigError::Timing {
                what: "host_timeout",
                ..
            })
        ));
        assert!(matches!(
            NatsConfig::new("nats://127.0.0.1:99999", "a", "b").validate(),
            Err(NatsConfigError::Server { .. })
        ));
        c.credentials = NatsCredentials::UserPassword {
            user: "u".into(),
            password: "hunter2".into(),
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
