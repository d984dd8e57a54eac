//! `shmcluster`: the command-line master (`run`, spawn mode: any program
//! as the worker) and the tools that talk to a running master through its
//! control socket (`stat`, `reload`, `stop`, and `top`, a live view).

use std::cell::Cell;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
#[cfg(feature = "nats")]
use shmcluster::bridge::{NatsConfig, NatsCredentials};
use shmcluster::{Cluster, ListenMode, MAX_WORKERS};

mod client;
mod top;

use client::{ClientError, Snapshot};

const EXIT_CODES: &str = "\
Exit codes:
  0  run: the cluster shut down cleanly (none of the workers it stopped
     was unhealthy, see 1, and each ended within the grace period);
     stat/reload/stop: done; top: quit with q (also once the master has gone)
  1  run: an unclean shutdown (when it began, a worker that had crashed
     before it was ever ready or had not been ready within the ready
     timeout; then one that exited with an error or was killed at the
     grace deadline; a slot given up after a crash loop);
     stat/reload/stop: no master answered, it refused, a reload failed, or
     --wait timed out or the master ended without saying how;
     top: no master answered when it started, or the terminal failed
  2  a usage error, or run could not start (bad option, command not found,
     address not bindable, control socket not bindable): nothing was started;
     top: stdout is not a terminal
  3  run: every worker slot was given up after crash loops, so the master
     stopped by itself
  stop --wait exits with the master's own exit code (0, 1 or 3) once it has
  exited; upgrade --wait exits 0 once the new master took over, 1 if the
  upgrade failed (the old master keeps serving)";

/// Brokerless shared-memory IPC for pre-forked worker clusters: a process
/// manager that starts and supervises workers, and tools to inspect it.
#[derive(Debug, Parser)]
#[command(name = "shmcluster", version, after_help = EXIT_CODES, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a master that runs COMMAND as every worker and supervises it.
    ///
    /// Workers find the cluster in their environment (SHMCLUSTER_*) and the
    /// listeners from fd 3 (LISTEN_FDS, as under systemd socket
    /// activation). The master respawns workers that die, does a rolling
    /// reload on SIGHUP (or `shmcluster reload`) and a graceful shutdown on
    /// SIGTERM/SIGINT (or `shmcluster stop`). Events go to stderr, one line
    /// each.
    ///
    /// Under systemd (NOTIFY_SOCKET set: a Type=notify unit) the master
    /// sends READY=1 once every worker is ready, RELOADING=1 ... READY=1
    /// around a reload, STOPPING=1 at shutdown, STATUS= lines, and
    /// WATCHDOG=1 (WatchdogSec=). Each worker gets a NOTIFY_SOCKET of its
    /// own: a program that speaks systemd's notify protocol becomes ready
    /// with READY=1 and beats its heartbeat with WATCHDOG=1, with no
    /// shmcluster binding (see --no-worker-notify).
    ///
    /// SIGUSR2 (or `shmcluster upgrade`) upgrades the binary without
    /// dropping a request: the master executes shmcluster again as it is
    /// now on disk, with the same command line (so a changed worker
    /// program is picked up too), and hands the new master its listening,
    /// control and metrics sockets; once the new workers are all ready
    /// (within --ready-timeout), this master drains its own and exits 0,
    /// saying "upgraded: new master pid N took over". Under systemd it
    /// tells the service manager MAINPID=<new master>.
    #[command(after_help = EXIT_CODES, override_usage = "shmcluster run [OPTIONS] -- <COMMAND> [ARGS]...")]
    Run(Box<RunArgs>),
    /// Show a running master's workers: state, pid, restarts, heartbeat
    /// age, messages, inbox bytes, and lock holders.
    #[command(after_help = EXIT_CODES)]
    Stat(StatArgs),
    /// Ask a running master for a rolling reload (as SIGHUP does), or to
    /// reload one worker (--worker).
    #[command(after_help = EXIT_CODES)]
    Reload(ReloadArgs),
    /// Ask a running master for a graceful shutdown (as SIGTERM does).
    #[command(after_help = EXIT_CODES)]
    Stop(WaitArgs),
    /// Upgrade a running master's binary without dropping a request (as
    /// SIGUSR2 does).
    ///
    /// The master executes its program again as it is now on disk (same
    /// arguments and environment), handing the new master its listening
    /// sockets and its control socket. The new master re-reads its
    /// configuration and starts its own workers; once they are all ready,
    /// the old master drains its workers and exits 0. A new master that
    /// fails or is not ready within the old one's --ready-timeout is
    /// killed, and the old master keeps serving. With --wait: exit 0 once
    /// the new master took over, 1 with the reason if the upgrade failed.
    #[command(after_help = EXIT_CODES)]
    Upgrade(WaitArgs),
    /// A full-screen live view of a running master: workers (state, pid,
    /// generation, restarts, heartbeat age, message rates with sparklines,
    /// inbox bytes), locks, and recent events.
    ///
    /// Keys: up/down or j/k select a worker; r rolling reload; s stop the
    /// cluster (asks y/n first); q, Esc or Ctrl-C quit. Needs a terminal
    /// (exit 2 otherwise; `stat --watch` prints the figures instead).
    #[command(after_help = EXIT_CODES)]
    Top(TopArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Worker instances to keep running (0: one per CPU; at most 1023).
    #[arg(short = 'w', long = "workers", value_name = "N", default_value_t = 0, value_parser = workers, allow_negative_numbers = true)]
    workers: u32,
    /// Listen on ADDR ("host:port", ":port", or a unix socket path); passed
    /// to every worker from fd 3. Repeatable.
    #[arg(long, value_name = "ADDR")]
    listen: Vec<String>,
    /// One SO_REUSEPORT socket per worker instead of one shared socket:
    /// the kernel spreads connections evenly by a hash (README,
    /// "Connection balance").
    #[arg(long)]
    reuseport: bool,
    /// Deaths of a slot within the restart window before it is given up.
    #[arg(long, value_name = "N", default_value_t = 10)]
    max_restarts: usize,
    /// The crash-loop window.
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = secs)]
    restart_window: Duration,
    /// First delay between restarts of a crashing slot (doubling).
    #[arg(long, value_name = "MS", default_value_t = 100)]
    backoff_ms: u64,
    /// Longest delay between restarts.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    backoff_max_ms: u64,
    /// How long a worker replaced by a reload may drain before SIGKILL.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = secs)]
    reload_timeout: Duration,
    /// How long a reload waits for a replacement to be ready, and a binary
    /// upgrade for the new master to have every worker ready (then it is
    /// killed and this master keeps serving).
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = secs)]
    ready_timeout: Duration,
    /// Shutdown grace period: workers still running after it get SIGKILL.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = secs)]
    kill_timeout: Duration,
    /// Kill and replace a ready worker whose heartbeat stops this long.
    #[arg(long, value_name = "SECS", value_parser = secs)]
    hang_timeout: Option<Duration>,
    /// Bytes in each message lane.
    #[arg(long, value_name = "BYTES")]
    lane_size: Option<usize>,
    /// Count each worker ready as soon as it is started (for programs that
    /// do not call ready(): any program without the library).
    #[arg(long)]
    ready_on_start: bool,
    /// Give workers no NOTIFY_SOCKET. By default each worker gets one of
    /// its own (systemd's notify protocol, from the master): READY=1 makes
    /// it ready, WATCHDOG=1 beats its heartbeat, STOPPING=1 marks it
    /// draining; with --hang-timeout it also gets WATCHDOG_USEC.
    #[arg(long)]
    no_worker_notify: bool,
    /// The control socket [default: $XDG_RUNTIME_DIR/shmcluster-<pid>.sock,
    /// or /tmp/shmcluster-<uid>/<pid>.sock].
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Serve the cluster's figures for Prometheus at http://ADDR/metrics
    /// (OpenMetrics text; "host:port", port 0 for a free one). Give a
    /// loopback address: the endpoint has no authentication (another is
    /// served, with a warning).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    #[cfg(feature = "nats")]
    #[command(flatten)]
    nats: NatsArgs,
    /// The worker program and its arguments (after `--`).
    #[arg(
        value_name = "COMMAND",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    command: Vec<OsString>,
}

/// `run`'s options for joining other hosts through NATS (feature `nats`).
#[cfg(feature = "nats")]
#[derive(Debug, Args)]
#[command(next_help_heading = "Hosts (NATS)")]
struct NatsArgs {
    /// Join the other hosts of the cluster through the NATS servers URLS
    /// (comma-separated, nats://host:port): the master runs one more
    /// process, the host's bridge.
    ///
    /// Secrets are never taken from the command line (where ps shows
    /// them): a user and password come from SHMCLUSTER_NATS_USER and
    /// SHMCLUSTER_NATS_PASSWORD, a token from SHMCLUSTER_NATS_TOKEN, an
    /// nkey seed from SHMCLUSTER_NATS_NKEY (or the file named by
    /// SHMCLUSTER_NATS_NKEY_FILE), a creds file from SHMCLUSTER_NATS_CREDS;
    /// --nats-creds and --nats-nkey-file name files and take precedence.
    #[arg(long, value_name = "URLS")]
    nats: Option<String>,
    /// The cluster's name on NATS (letters, digits, '-', '_'): hosts join
    /// the cluster of the same name.
    #[arg(long, value_name = "NAME", default_value = "shmcluster", requires = "nats")]
    cluster_name: String,
    /// This host's name among the cluster's hosts, unique (letters,
    /// digits, '-', '_') [default: the hostname, other characters as '-'].
    #[arg(long, value_name = "ID", requires = "nats")]
    host_id: Option<String>,
    /// A NATS .creds file (JWT and nkey seed).
    #[arg(
        long,
        value_name = "FILE",
        requires = "nats",
        conflicts_with = "nats_nkey_file"
    )]
    nats_creds: Option<PathBuf>,
    /// A file holding an nkey seed.
    #[arg(long, value_name = "FILE", requires = "nats")]
    nats_nkey_file: Option<PathBuf>,
    /// A PEM file of root certificates to trust for the NATS servers.
    #[arg(long, value_name = "FILE", requires = "nats")]
    nats_tls_ca: Option<PathBuf>,
    /// A client certificate (PEM) for servers that verify clients; with
    /// --nats-tls-key.
    #[arg(long, value_name = "FILE", requires_all = ["nats", "nats_tls_key"])]
    nats_tls_cert: Option<PathBuf>,
    /// The client certificate's key (PEM); with --nats-tls-cert.
    #[arg(long, value_name = "FILE", requires_all = ["nats", "nats_tls_cert"])]
    nats_tls_key: Option<PathBuf>,
    /// Require TLS even if the server does not ask for it.
    #[arg(long, requires = "nats")]
    nats_tls_required: bool,
}

/// Which master: `--control PATH`, `--pid PID`, or the only one running.
#[derive(Debug, Args)]
struct Target {
    /// The master's control socket.
    #[arg(long, value_name = "PATH", conflicts_with = "pid")]
    control: Option<PathBuf>,
    /// The master's pid (its default control socket). Without --control or
    /// --pid: the only master of this user in the default directory.
    #[arg(long, value_name = "PID")]
    pid: Option<u32>,
}

#[derive(Debug, Args)]
struct StatArgs {
    #[command(flatten)]
    target: Target,
    /// Print again every SECS (default 1) with message rates, until the
    /// master exits or Ctrl-C.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "1", value_parser = secs)]
    watch: Option<Duration>,
}

#[derive(Debug, Args)]
struct TopArgs {
    #[command(flatten)]
    target: Target,
    /// Ask the master for its figures every SECS (at least 0.1).
    #[arg(long, value_name = "SECS", default_value = "1", value_parser = secs)]
    interval: Duration,
}

#[derive(Debug, Args)]
struct WaitArgs {
    #[command(flatten)]
    target: Target,
    /// Wait until it is done: the reload finished (exit 1 if it failed), or
    /// the master exited.
    #[arg(long)]
    wait: bool,
    /// The longest --wait waits.
    #[arg(long, value_name = "SECS", default_value = "120", value_parser = secs)]
    timeout: Duration,
}

#[derive(Debug, Args)]
struct ReloadArgs {
    #[command(flatten)]
    wait: WaitArgs,
    /// Reload this worker alone (its instance number, as `stat` shows it):
    /// its replacement is started, and it is drained once the replacement
    /// is ready, as in a rolling reload.
    #[arg(long, value_name = "N")]
    worker: Option<u32>,
}

/// Parses a worker count, saying what is wrong with a bad one (clap's
/// own `u32` parser would answer `-1` with "not in 0..=4294967295").
fn workers(s: &str) -> Result<u32, String> {
    let max = MAX_WORKERS - 1; // one slot is kept spare for reloads
    match s.trim().parse::<i64>() {
        Ok(n) if n < 0 => Err(format!(
            "a worker count cannot be negative: give 1 to {max}, or 0 for one per CPU"
        )),
        Ok(n) if n > i64::from(max) => Err(format!(
            "{n} workers: at most {max} (a segment holds {MAX_WORKERS} slots, one kept spare for reloads)"
        )),
        Ok(n) => Ok(n as u32),
        Err(_) => Err(format!(
            "{s:?} is not a number of workers: give 1 to {max}, or 0 for one per CPU"
        )),
    }
}

/// Parses a non-negative number of seconds (fractions allowed).
fn secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(v).map_err(|_| format!("{s:?} is not a non-negative number of seconds"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(args) => run(*args),
        Command::Stat(args) => report(stat(args)),
        Command::Reload(args) => report(reload(args)),
        Command::Upgrade(args) => report(upgrade(args)),
        Command::Stop(args) => match stop(args) {
            Ok(code) => code,
            Err(e) => report(Err(e)),
        },
        Command::Top(args) => top::run(args.target.control, args.target.pid, args.interval),
    };
    ExitCode::from(code)
}

fn report(r: Result<(), ClientError>) -> u8 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("shmcluster: {e}");
            1
        }
    }
}

/// The bridge's configuration from `run`'s options and the environment;
/// `None` without `--nats`.
#[cfg(feature = "nats")]
fn nats_config(args: &NatsArgs) -> Result<Option<NatsConfig>, String> {
    let Some(urls) = &args.nats else {
        return Ok(None);
    };
    let host_id = match &args.host_id {
        Some(id) => id.clone(),
        None => host_id_from_hostname()?,
    };
    let mut config = NatsConfig::new(urls, &args.cluster_name, &host_id)
        .credentials_from_env()
        .map_err(|e| e.to_string())?;
    if let Some(path) = &args.nats_creds {
        config.credentials = NatsCredentials::CredsFile(path.clone());
    }
    if let Some(path) = &args.nats_nkey_file {
        let seed = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the nkey file {}: {e}", path.display()))?;
        config.credentials = NatsCredentials::NkeySeed(seed.trim().to_owned());
    }
    config.tls.required = args.nats_tls_required;
    config.tls.ca_file = args.nats_tls_ca.clone();
    if let (Some(cert), Some(key)) = (&args.nats_tls_cert, &args.nats_tls_key) {
        config.tls.client_cert = Some((cert.clone(), key.clone()));
    }
    Ok(Some(config))
}

/// The default `--host-id`: this machine's hostname, each character that
/// a name may not have (anything but letters, digits, '-' and '_') turned
/// into '-'.
#[cfg(feature = "nats")]
fn host_id_from_hostname() -> Result<String, String> {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_err(|e| format!("cannot read the hostname for a host id ({e}): give --host-id"))?;
    let id: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if (1..=64).contains(&id.len()) {
        Ok(id)
    } else {
        Err(format!(
            "the hostname {:?} does not make a host id (1 to 64 characters): give --host-id",
            raw.trim()
        ))
    }
}

fn run(args: RunArgs) -> u8 {
    #[cfg(feature = "nats")]
    let nats = match nats_config(&args.nats) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("shmcluster: cannot start: {e}");
            return 2;
        }
    };
    let mut builder = Cluster::builder()
        .workers(args.workers)
        .crash_loop_limit(args.max_restarts, args.restart_window)
        .restart_backoff(
            Duration::from_millis(args.backoff_ms),
            Duration::from_millis(args.backoff_max_ms),
        )
        .drain_timeout(args.reload_timeout)
        .ready_timeout(args.ready_timeout)
        .shutdown_grace(args.kill_timeout)
        .ready_on_start(args.ready_on_start)
        .worker_notify(!args.no_worker_notify);
    let mode = if args.reuseport {
        ListenMode::ReusePort
    } else {
        ListenMode::Shared
    };
    for addr in &args.listen {
        builder = builder.listen_mode(addr, mode);
    }
    if let Some(d) = args.hang_timeout {
        builder = builder.hang_timeout(d);
    }
    if let Some(bytes) = args.lane_size {
        builder = builder.lane_capacity(bytes);
    }
    builder = match args.control {
        Some(path) => builder.control_socket(path),
        None => builder.control_socket_default(),
    };
    if let Some(addr) = args.metrics {
        builder = builder.metrics(addr);
    }
    #[cfg(feature = "nats")]
    let bridge_note = nats.as_ref().map_or_else(String::new, |c| {
        format!(
            ", NATS bridge for host {} of cluster {} (servers {})",
            c.host_id,
            c.cluster_name,
            c.servers.join(",")
        )
    });
    #[cfg(not(feature = "nats"))]
    let bridge_note = String::new();
    #[cfg(feature = "nats")]
    if let Some(config) = nats {
        builder = builder.nats(config);
    }
    let announced = Cell::new(false);
    builder = builder.on_event(move |cluster, event| {
        if !announced.replace(true) {
            let control = cluster
                .control_path()
                .map_or_else(|| "none".into(), |p| p.display().to_string());
            let addrs: Vec<String> = cluster.local_addrs().iter().map(ToString::to_string).collect();
            let metrics = cluster
                .metrics_addr()
                .map_or_else(String::new, |a| format!(", metrics http://{a}/metrics"));
            say(format_args!(
                "shmcluster: master pid {}, {} workers{bridge_note}, control socket {control}{metrics}{}",
                std::process::id(),
                cluster.instances(),
                if addrs.is_empty() {
                    String::new()
                } else {
                    format!(", listening on {}", addrs.join(" "))
                }
            ));
        }
        say(format_args!("shmcluster: {event}"));
    });
    match builder.command(args.command) {
        Ok(report) => {
            say(format_args!("shmcluster: master exiting, {report}"));
            report.exit_code() as u8
        }
        Err(e) => {
            say(format_args!("shmcluster: cannot start: {e}"));
            2
        }
    }
}

/// One line on stderr in one `write(2)`: during a binary upgrade two
/// masters write their events to the same stderr, and `eprintln!` writes a
/// line in pieces that the other's could split (the library's own lines
/// are written the same way).
fn say(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let line = format!("{args}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

fn stat(args: StatArgs) -> Result<(), ClientError> {
    let mut path = client::resolve(args.target.control, args.target.pid)?;
    let mut previous: Option<Snapshot> = None;
    loop {
        // Through a binary upgrade: the new master, wherever it moved its
        // control socket.
        let last_pid = previous
            .as_ref()
            .and_then(|p| p.master.num("pid"))
            .and_then(|p| u32::try_from(p).ok());
        let snap = match client::request_following(&mut path, last_pid, "stat") {
            Ok(r) => Snapshot::parse(&r)?,
            // Watching until the master exits is a normal end.
            Err(ClientError::Connect { .. }) if previous.is_some() => {
                println!("master gone");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let Some(every) = args.watch else {
            print!("{}", client::render(&snap, None));
            return Ok(());
        };
        if previous.is_some() {
            println!();
        }
        // Rates only against the same master (a new one counts from 0).
        let same_master = previous
            .as_ref()
            .filter(|p| p.master.get("pid") == snap.master.get("pid"));
        print!("{}", client::render(&snap, same_master));
        previous = Some(snap);
        std::thread::sleep(every.max(Duration::from_millis(100)));
    }
}

fn reload(ReloadArgs { wait: args, worker }: ReloadArgs) -> Result<(), ClientError> {
    let path = client::resolve(args.target.control, args.target.pid)?;
    // Reloads queue: ours ends once every reload begun before it has, too.
    let before = Snapshot::parse(&client::request(&path, "stat")?)?;
    let started = before.master.num("reloads_started").unwrap_or(0);
    let running = started.saturating_sub(before.reloads_finished());
    let target = before.reloads_finished() + running + 1;
    match worker {
        Some(n) => {
            client::request(&path, &format!("reload worker={n}"))?;
            println!("reload of worker {n} queued");
        }
        None => {
            client::request(&path, "reload")?;
            println!("reload queued");
        }
    }
    if !args.wait {
        return Ok(());
    }
    let deadline = Instant::now() + args.timeout;
    loop {
        let snap = Snapshot::parse(&client::request(&path, "stat")?)?;
        if snap.reloads_finished() >= target {
            return match snap.master.get("last_reload") {
                "ok" => {
                    println!("reload finished: ok");
                    Ok(())
                }
                _ => Err(ClientError::Refused(
                    "reload finished: failed (a replacement was not ready; old workers kept)".into(),
                )),
            };
        }
        if Instant::now() >= deadline {
            return Err(ClientError::NoMaster(format!(
                "the reload did not finish within {:?}",
                args.timeout
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn upgrade(args: WaitArgs) -> Result<(), ClientError> {
    let path = client::resolve(args.target.control, args.target.pid)?;
    let wait = args.wait.then_some(args.timeout);
    let pid = client::upgrade(&path, wait, |pid| {
        println!("upgrade started: new master pid {pid}")
    })?;
    if args.wait {
        println!("upgraded: new master pid {pid} took over; the old master drains and exits");
    }
    Ok(())
}

fn stop(args: WaitArgs) -> Result<u8, ClientError> {
    let path = client::resolve(args.target.control, args.target.pid)?;
    // Asked before the stop, so that the master's end cannot be missed.
    let waiter = if args.wait {
        Some(client::Waiter::open(&path)?)
    } else {
        None
    };
    let response = client::request(&path, "stop")?;
    println!("{}", response.trim_start_matches("ok ").trim_end());
    let Some(waiter) = waiter else {
        return Ok(0);
    };
    let exited = waiter.outcome(args.timeout)?;
    // After a binary upgrade's hand-over the summary says so
    // ("upgraded: new master pid N took over; ...").
    println!("master exited: {} (exit code {})", exited.summary, exited.code);
    Ok(exited.code)
}
