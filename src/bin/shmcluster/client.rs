//! The client side of the master's control socket (the protocol is
//! described in the library's `cluster/control/mod.rs`, the line format in
//! its `cluster/control/codec.rs`): one request line, one response, and
//! the `stat` response parsed into fields and rendered as a table, with
//! rates from two snapshots.

use std::fmt::{self, Write as _};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shmcluster::control_codec::unescape;
use shmcluster::Cluster;

/// How long a request may take end to end.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a request to the master failed.
#[derive(Debug)]
pub enum ClientError {
    /// Nothing answers at the socket (no master, or it has exited).
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why the connection failed.
        error: io::Error,
    },
    /// The connection broke or timed out.
    Io(io::Error),
    /// The master answered `err ...`.
    Refused(String),
    /// The response did not follow the protocol.
    Protocol(String),
    /// No master to talk to could be chosen.
    NoMaster(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect { path, error } => {
                write!(f, "cannot connect to the master at {}: {error}", path.display())
            }
            Self::Io(e) => write!(f, "talking to the master: {e}"),
            Self::Refused(msg) => write!(f, "the master refused: {msg}"),
            Self::Protocol(msg) => write!(f, "unexpected answer from the master: {msg}"),
            Self::NoMaster(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for ClientError {}

/// Connects to the master at `path` (reads and writes timing out after
/// [`REQUEST_TIMEOUT`]) and sends it the line `request`.
fn send(path: &Path, request: &str) -> Result<UnixStream, ClientError> {
    let mut stream = UnixStream::connect(path).map_err(|error| ClientError::Connect {
        path: path.to_path_buf(),
        error,
    })?;
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .map_err(ClientError::Io)?;
    stream
        .set_write_timeout(Some(REQUEST_TIMEOUT))
        .map_err(ClientError::Io)?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(ClientError::Io)?;
    Ok(stream)
}

/// Sends `request` to the master at `path`; returns its `ok` response.
pub fn request(path: &Path, request: &str) -> Result<String, ClientError> {
    let mut stream = send(path, request)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(ClientError::Io)?;
    if let Some(msg) = response.strip_prefix("err ") {
        return Err(ClientError::Refused(msg.trim_end().to_string()));
    }
    if !response.starts_with("ok") {
        return Err(ClientError::Protocol(if response.is_empty() {
            "the connection closed without a response".into()
        } else {
            response.lines().next().unwrap_or("").to_string()
        }));
    }
    Ok(response)
}

/// [`request`] at `path`, following a master that moved: if nothing
/// listens at `path` any more, the request goes to the master that took
/// over from `last_pid` (the master that answered last) in a binary
/// upgrade, and `path` becomes its control socket. The new master answers
/// on the socket it took over and, once the old one has gone, renames a
/// default one to its own pid's path: it is the live master in the
/// default directory whose `stat` says `upgraded_from=<last_pid>`, or
/// that answered last already (then at its own default path). A view that
/// polls keeps following it instead of taking the rename for the end.
pub fn request_following(
    path: &mut PathBuf,
    last_pid: Option<u32>,
    req: &str,
) -> Result<String, ClientError> {
    let answer = request(path, req);
    let (Err(ClientError::Connect { .. }), Some(pid)) = (&answer, last_pid) else {
        return answer;
    };
    let own = Cluster::default_control_path(pid);
    let successor = || {
        live_default_masters().into_iter().find(|p| {
            request(p, "stat")
                .ok()
                .and_then(|r| Snapshot::parse(&r).ok())
                .is_some_and(|s| s.master.num("upgraded_from") == Some(u64::from(pid)))
        })
    };
    // Its own default path first (one connection); the search only then.
    let candidates = std::iter::once(Some(own)).chain(std::iter::once_with(successor));
    for moved in candidates.flatten() {
        if moved == *path {
            continue;
        }
        if let Ok(again) = request(&moved, req) {
            *path = moved;
            return Ok(again);
        }
    }
    answer
}

/// Asks the master at `path` for a binary upgrade (`upgrade`); returns
/// the new master's pid (also given to `started` as soon as it is known).
/// With `wait`, also waits up to that long for the upgrade's end on the
/// same connection: `upgraded pid=N` is success, `err upgrade failed: ...`
/// a [`ClientError::Refused`].
pub fn upgrade(path: &Path, wait: Option<Duration>, started: impl FnOnce(u32)) -> Result<u32, ClientError> {
    let mut reader = BufReader::new(send(path, "upgrade")?);
    let mut first = String::new();
    reader.read_line(&mut first).map_err(ClientError::Io)?;
    if let Some(msg) = first.strip_prefix("err ") {
        return Err(ClientError::Refused(msg.trim_end().to_string()));
    }
    let pid = first
        .trim_end()
        .strip_prefix("ok upgrade started pid=")
        .and_then(|p| p.parse::<u32>().ok())
        .ok_or_else(|| ClientError::Protocol(format!("{:?} to upgrade", first.trim_end())))?;
    started(pid);
    let Some(timeout) = wait else {
        return Ok(pid);
    };
    reader
        .get_ref()
        .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .map_err(ClientError::Io)?;
    let mut end = String::new();
    match reader.read_line(&mut end) {
        Ok(_) => {}
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            return Err(ClientError::NoMaster(format!(
                "the upgrade did not end within {timeout:?}"
            )))
        }
        Err(e) => return Err(ClientError::Io(e)),
    }
    let end = end.trim_end();
    if let Some(msg) = end.strip_prefix("err ") {
        return Err(ClientError::Refused(msg.to_string()));
    }
    match end
        .strip_prefix("upgraded pid=")
        .and_then(|p| p.parse::<u32>().ok())
    {
        Some(pid) => Ok(pid),
        None if end.is_empty() => Err(ClientError::NoMaster(
            "the master closed the connection without saying how the upgrade ended (was it killed?)".into(),
        )),
        None => Err(ClientError::Protocol(format!("{end:?} at the upgrade's end"))),
    }
}

/// A `wait` connection to the master (see the protocol): opened before
/// the master is asked to stop, so that its outcome cannot be missed.
#[derive(Debug)]
pub struct Waiter {
    reader: BufReader<UnixStream>,
}

/// How a master ended, as it said on a `wait` connection just before
/// exiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exited {
    /// The master's exit code.
    pub code: u8,
    /// `clean`, `unclean` or `all-given-up`.
    pub outcome: String,
    /// One line for an operator (`clean shutdown (0 restarts, 0 killed)`).
    pub summary: String,
}

impl Waiter {
    /// Connects to the master at `path` and asks to be told when it ends.
    pub fn open(path: &Path) -> Result<Self, ClientError> {
        let mut reader = BufReader::new(send(path, "wait")?);
        let mut first = String::new();
        reader.read_line(&mut first).map_err(ClientError::Io)?;
        if let Some(msg) = first.strip_prefix("err ") {
            return Err(ClientError::Refused(msg.trim_end().to_string()));
        }
        if first.trim_end() != "ok waiting" {
            return Err(ClientError::Protocol(format!("{:?} to wait", first.trim_end())));
        }
        Ok(Self { reader })
    }

    /// Waits up to `timeout` for the master to end; returns what it said.
    pub fn outcome(mut self, timeout: Duration) -> Result<Exited, ClientError> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(ClientError::Io)?;
        let mut rest = String::new();
        match self.reader.read_to_string(&mut rest) {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(ClientError::NoMaster(format!(
                    "the master did not exit within {timeout:?}"
                )))
            }
            Err(e) => return Err(ClientError::Io(e)),
        }
        let Some(line) = rest.lines().find_map(|l| l.strip_prefix("exited ")) else {
            return Err(ClientError::NoMaster(
                "the master ended without saying how (was it killed?)".into(),
            ));
        };
        let fields = Fields::parse(line);
        let code = fields
            .num("code")
            .and_then(|c| u8::try_from(c).ok())
            .ok_or_else(|| ClientError::Protocol(format!("no exit code in {line:?}")))?;
        Ok(Exited {
            code,
            outcome: fields.get("outcome").to_string(),
            summary: fields.get("summary").to_string(),
        })
    }
}

/// The socket to use: `--control`, the default of `--pid`, or the one
/// master of this user that answers in the default directory.
pub fn resolve(control: Option<PathBuf>, pid: Option<u32>) -> Result<PathBuf, ClientError> {
    if let Some(path) = control {
        return Ok(path);
    }
    if let Some(pid) = pid {
        return Ok(Cluster::default_control_path(pid));
    }
    let mut live = live_default_masters();
    match live.len() {
        1 => Ok(live.remove(0)),
        0 => Err(ClientError::NoMaster(format!(
            "no running master found in {} (use --control PATH or --pid PID)",
            default_dir().display()
        ))),
        _ => Err(ClientError::NoMaster(format!(
            "{} masters are running; choose one with --pid or --control: {}",
            live.len(),
            live.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// One line of a `stat` response: its `key=value` fields, unescaped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields(Vec<(String, String)>);

impl Fields {
    fn parse(rest: &str) -> Self {
        Self(
            rest.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), unescape(v)))
                .collect(),
        )
    }

    /// The value of `key` (`-` if absent).
    pub fn get(&self, key: &str) -> &str {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map_or("-", |(_, v)| v.as_str())
    }

    /// `key` as a number (`None` for `-` or absent).
    pub fn num(&self, key: &str) -> Option<u64> {
        self.get(key).parse().ok()
    }
}

/// A parsed `stat` response.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// When it was taken (for rates).
    pub at: Instant,
    /// The `master` line.
    pub master: Fields,
    /// One per slot.
    pub slots: Vec<Fields>,
    /// One per lock.
    pub locks: Vec<Fields>,
}

impl Snapshot {
    /// Parses a `stat` response.
    pub fn parse(response: &str) -> Result<Self, ClientError> {
        let mut lines = response.lines();
        let head = lines.next().unwrap_or("");
        if !head.starts_with("ok stat") {
            return Err(ClientError::Protocol(head.to_string()));
        }
        let mut snap = Self {
            at: Instant::now(),
            master: Fields::default(),
            slots: Vec::new(),
            locks: Vec::new(),
        };
        let mut ended = false;
        for line in lines {
            let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
            match kind {
                "master" => snap.master = Fields::parse(rest),
                "slot" => snap.slots.push(Fields::parse(rest)),
                "lock" => snap.locks.push(Fields::parse(rest)),
                "end" => ended = true,
                _ => {} // a newer master's extra lines
            }
        }
        if !ended {
            return Err(ClientError::Protocol("the stat response was cut short".into()));
        }
        Ok(snap)
    }

    /// Finished reloads (ok or failed).
    pub fn reloads_finished(&self) -> u64 {
        self.master.num("reloads_ok").unwrap_or(0) + self.master.num("reloads_failed").unwrap_or(0)
    }

    /// Slots whose worker is running (`Starting`, `Ready` or `Draining`),
    /// the host's NATS bridge left out.
    pub fn live_workers(&self) -> usize {
        self.slots.iter().filter(|s| !is_bridge(s) && is_live(s)).count()
    }

    /// The host's NATS bridge's row, if the master runs one.
    pub fn bridge(&self) -> Option<&Fields> {
        self.slots.iter().find(|s| is_bridge(s))
    }
}

/// Whether the row's worker is running.
fn is_live(slot: &Fields) -> bool {
    matches!(slot.get("state"), "Starting" | "Ready" | "Draining")
}

/// Whether the row is the host's NATS bridge's (`role=bridge`).
fn is_bridge(slot: &Fields) -> bool {
    slot.get("role") == "bridge"
}

fn millis(us: Option<u64>) -> String {
    us.map_or_else(|| "-".into(), |us| format!("{:.1}ms", us as f64 / 1000.0))
}

fn rate(now: Option<u64>, before: Option<u64>, secs: f64) -> String {
    match (now, before) {
        (Some(n), Some(b)) if secs > 0.0 => format!("{:.0}", n.saturating_sub(b) as f64 / secs),
        _ => "-".into(),
    }
}

/// The table `shmcluster stat` prints; with `previous`, per-second rates of
/// messages and bytes since that snapshot.
pub fn render(snap: &Snapshot, previous: Option<&Snapshot>) -> String {
    let m = &snap.master;
    let mut out = String::new();
    let uptime = m
        .num("uptime_ms")
        .map_or("-".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
    let state = if m.get("shutting_down") == "1" {
        "shutting down"
    } else {
        "running"
    };
    let bridge = snap.bridge().map_or_else(String::new, |b| {
        format!(", bridge {}", b.get("state").to_lowercase())
    });
    let _ = writeln!(
        out,
        "master pid {}: {} instances, {} live{bridge}, up {uptime}, {state}; reloads: {} started, {} ok, {} \
         failed",
        m.get("pid"),
        m.get("instances"),
        snap.live_workers(),
        m.get("reloads_started"),
        m.get("reloads_ok"),
        m.get("reloads_failed"),
    );
    let _ = write!(
        out,
        "{:>4} {:>5} {:>9} {:>8} {:>4} {:>8} {:>9} {:>12} {:>10} {:>10} {:>9}",
        "slot",
        "index",
        "state",
        "pid",
        "gen",
        "restarts",
        "hb age",
        "last exit",
        "sent",
        "received",
        "inbox B"
    );
    if previous.is_some() {
        let _ = write!(out, " {:>8} {:>8} {:>10}", "sent/s", "recv/s", "sent B/s");
    }
    out.push('\n');
    let secs = previous.map_or(0.0, |p| snap.at.duration_since(p.at).as_secs_f64());
    for s in &snap.slots {
        let _ = write!(
            out,
            "{:>4} {:>5} {:>9} {:>8} {:>4} {:>8} {:>9} {:>12} {:>10} {:>10} {:>9}",
            s.get("id"),
            if is_bridge(s) { "bridge" } else { s.get("index") },
            s.get("state"),
            s.get("pid"),
            s.get("gen"),
            s.get("restarts"),
            millis(s.num("hb_age_us")),
            s.get("last_exit"),
            s.get("sent"),
            s.get("received"),
            s.get("inbox_bytes"),
        );
        if let Some(p) = previous {
            let before = p.slots.iter().find(|b| b.get("id") == s.get("id"));
            let r = |key: &str| rate(s.num(key), before.and_then(|b| b.num(key)), secs);
            let _ = write!(
                out,
                " {:>8} {:>8} {:>10}",
                r("sent"),
                r("received"),
                r("sent_bytes")
            );
        }
        out.push('\n');
    }
    for l in &snap.locks {
        let name = match l.get("name") {
            "" | "-" => "(global)",
            n => n,
        };
        let holder = match (l.num("holder_slot"), l.num("holder_pid")) {
            (Some(slot), Some(pid)) => {
                format!("held by slot {slot} (pid {pid}) for {}", millis(l.num("held_us")))
            }
            _ => "free".into(),
        };
        let _ = writeln!(
            out,
            "lock {name}: {holder}; {} acquisitions, {} waited, {} owner died, token {}",
            l.get("acquisitions"),
            l.get("waits"),
            l.get("owner_died"),
            l.get("token"),
        );
    }
    out
}

/// The directory of the default control sockets.
fn default_dir() -> PathBuf {
    let zero = Cluster::default_control_path(0);
    zero.parent().unwrap_or(Path::new("/")).to_path_buf()
}

/// The default control sockets (`shmcluster-<pid>.sock` or `<pid>.sock`
/// in [`default_dir`]) where a master answers `ping`.
fn live_default_masters() -> Vec<PathBuf> {
    // The default paths differ only in the pid: find the pattern from pid 0.
    let zero = Cluster::default_control_path(0);
    let dir = default_dir();
    let name = zero
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (prefix, suffix) = name.split_once('0').unwrap_or((&name, ""));
    let mut live = Vec::new();
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let is_pid = file
            .strip_prefix(prefix)
            .and_then(|f| f.strip_suffix(suffix))
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        let is_socket = entry.file_type().is_ok_and(|t| t.is_socket());
        if is_pid && is_socket && request(&entry.path(), "ping").is_ok() {
            live.push(entry.path());
        }
    }
    live
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "ok stat v=1\n\
        master pid=42 instances=2 shutting_down=0 uptime_ms=1500 reloads_started=1 reloads_ok=1 reloads_failed=0 last_reload=ok\n\
        slot id=0 index=0 state=Ready pid=43 gen=2 restarts=1 last_exit=Exited%281%29 hb_age_us=2500 sent=10 sent_bytes=100 received=5 received_bytes=50 inbox_bytes=0 futex_waits=0 futex_wakes=0 full_waits=0 last_request_us=- last_map_us=-\n\
        slot id=1 index=- state=Free pid=0 gen=0 restarts=0 last_exit=- hb_age_us=- sent=0 sent_bytes=0 received=0 received_bytes=0 inbox_bytes=0 futex_waits=0 futex_wakes=0 full_waits=0 last_request_us=- last_map_us=-\n\
        lock name= holder_slot=- holder_pid=- held_us=- acquisitions=3 waits=1 owner_died=0 token=3\n\
        lock name=a%20b holder_slot=0 holder_pid=43 held_us=1200 acquisitions=1 waits=0 owner_died=0 token=1\n\
        end\n";

    #[test]
    fn unescape_undoes_percent_escapes_and_keeps_stray_percents() {
        assert_eq!(unescape("a%20b%3Dc"), "a b=c");
        assert_eq!(unescape("100%"), "100%");
        assert_eq!(unescape("%zz"), "%zz");
    }

    #[test]
    fn a_stat_response_parses_and_renders() {
        let snap = Snapshot::parse(SAMPLE).unwrap();
        assert_eq!(snap.master.get("pid"), "42");
        assert_eq!(snap.slots.len(), 2);
        assert_eq!(snap.live_workers(), 1);
        assert_eq!(snap.reloads_finished(), 1);
        assert_eq!(snap.slots[0].get("last_exit"), "Exited(1)");
        let text = render(&snap, None);
        assert!(text.contains("master pid 42: 2 instances, 1 live"), "{text}");
        assert!(text.contains("lock (global): free; 3 acquisitions"), "{text}");
        assert!(
            text.contains("lock a b: held by slot 0 (pid 43) for 1.2ms"),
            "{text}"
        );
        assert!(!text.contains("sent/s"));

        let mut later =
            Snapshot::parse(&SAMPLE.replace("sent=10 sent_bytes=100", "sent=30 sent_bytes=300")).unwrap();
        later.at = snap.at + Duration::from_secs(2);
        let text = render(&later, Some(&snap));
        assert!(text.contains("sent/s"), "{text}");
        let row = text.lines().find(|l| l.contains("Ready")).unwrap();
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(&cols[cols.len() - 3..], ["10", "0", "100"], "{row}");
    }

    #[test]
    fn the_bridge_row_is_marked_and_not_counted_live() {
        let with_bridge = SAMPLE.replace(
            "slot id=1 index=- state=Free pid=0 gen=0 restarts=0 last_exit=- hb_age_us=- sent=0 sent_bytes=0 \
             received=0 received_bytes=0 inbox_bytes=0 futex_waits=0 futex_wakes=0 full_waits=0 \
             last_request_us=- last_map_us=-",
            "slot id=1 index=2 state=Ready pid=44 gen=1 restarts=0 last_exit=- hb_age_us=- sent=0 sent_bytes=0 \
             received=0 received_bytes=0 inbox_bytes=0 futex_waits=0 futex_wakes=0 full_waits=0 \
             last_request_us=- last_map_us=- role=bridge",
        );
        assert_ne!(with_bridge, SAMPLE);
        let snap = Snapshot::parse(&with_bridge).unwrap();
        assert_eq!(snap.live_workers(), 1);
        assert_eq!(snap.bridge().map(|b| b.get("pid")), Some("44"));
        let text = render(&snap, None);
        assert!(text.contains("2 instances, 1 live, bridge ready"), "{text}");
        let row = text.lines().find(|l| l.contains(" 44 ")).unwrap();
        assert!(row.split_whitespace().nth(1) == Some("bridge"), "{row}");
        // Without a bridge, nothing of it shows.
        let text = render(&Snapshot::parse(SAMPLE).unwrap(), None);
        assert!(!text.contains("bridge"), "{text}");
    }

    #[test]
    fn a_cut_or_refused_response_is_an_error() {
        assert!(Snapshot::parse("ok stat v=1\nmaster pid=1\n").is_err());
        assert!(Snapshot::parse("ok pong\n").is_err());
    }
}
