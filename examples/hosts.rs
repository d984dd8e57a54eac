//! Two hosts joined through NATS: a cache invalidation broadcast reaching
//! every worker of both, a `consume` that lands on the other host while
//! this host's workers are busy, and a `map` over both.
//!
//! ```sh
//! cargo run --release --features nats --example hosts
//! ```
//!
//! Needs `nats-server` on the `PATH` (Debian: `apt install nats-server`).
//! The example starts one on a free loopback port (JetStream on, stored in
//! a temporary directory), then two hosts, `web-1` and `web-2`: this
//! program again, each a master with 2 workers and its NATS bridge.
//! Worker 0 of `web-1` drives the demonstration — it takes no `resize`
//! work itself: it hands work out — then asks its master to stop; this
//! process then stops `web-2` and NATS, and exits 0 only if every step
//! happened. Every line is printed by the process it is about.

use std::cell::Cell;
use std::collections::HashSet;
use std::convert::Infallible;
use std::error::Error;
use std::io::Write;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shmcluster::bridge::NatsConfig;
use shmcluster::{Cluster, EventKind, ExitReason, HostId, Messenger, Worker};

/// Set in a host's environment: its name. Unset: the launcher.
const HOST: &str = "SHMCLUSTER_EXAMPLE_HOST";
/// The NATS server's URL, for the hosts.
const NATS_URL: &str = "SHMCLUSTER_EXAMPLE_NATS";
/// The cache key every worker holds, and the driver invalidates.
const KEY: &str = "user:42";

type Res<T> = Result<T, Box<dyn Error>>;

/// Prints one line, prefixed with who prints it (one `write` per line:
/// lines from several processes do not mix).
fn say(who: &str, text: impl std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "[{who}] {text}");
    let _ = out.flush();
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

// ------------------------------------------------------ a host's workers

/// Every worker: a toy cache, the handlers, then serve (or drive).
fn worker(w: Worker, host: &str) -> Res<()> {
    let (index, me) = (w.index(), format!("{host} worker {}", w.index()));
    let driver = host == "web-1" && index == 0 && w.generation() == 1;
    let mut m = Messenger::new(w);

    let cache = Arc::new(Mutex::new(HashSet::from([KEY.to_string()])));
    let (c, who) = (cache.clone(), me.clone());
    m.on::<String, _>("invalidate", move |_, key| {
        if c.lock().unwrap().remove(&key) {
            say(&who, format!("invalidated {key}"));
        }
    })?;
    m.on_request::<String, bool, Infallible, _>("cached", move |_, key| {
        Ok(cache.lock().unwrap().contains(&key))
    })?;
    // (instance index, pid): the map's entry says which host and slot.
    m.on_request::<(), (u32, u32), Infallible, _>("whoami", move |_, ()| Ok((index, std::process::id())))?;
    // Slow work, asked for with a request: it keeps a worker busy. It
    // holds the host's lock "render" meanwhile (one render at a time).
    let (locks, who) = (m.worker().locks()?, me.clone());
    m.on_request::<String, (), String, _>("render", move |_, report| {
        locks
            .synchronize_key("render", |_| {
                say(&who, format!("rendering {report} (1.5 s)"));
                std::thread::sleep(Duration::from_millis(1500));
            })
            .map_err(|e| e.to_string())
    })?;
    if !driver {
        let who = me.clone();
        m.on::<String, _>("resize", move |_, image| say(&who, format!("resized {image}")))?;
    }

    m.worker().ready();
    if driver {
        demonstrate(&mut m, &me)?;
        say(&me, "all shown; asking web-1's master to stop");
        m.worker().request_shutdown();
    }
    m.run()?;
    Ok(())
}

/// Dispatches for `d`: handlers keep running while the driver waits.
fn pause(m: &mut Messenger, d: Duration) -> Res<()> {
    let until = Instant::now() + d;
    while Instant::now() < until {
        m.poll(Duration::from_millis(10))?;
    }
    Ok(())
}

/// A host as a `WorkerId` names it: `None` is this host.
fn place(host: HostId) -> String {
    host.name().map_or("web-1 (here)".into(), |n| n.to_string())
}

/// Worker 0 of web-1: the four steps.
fn demonstrate(m: &mut Messenger, me: &str) -> Res<()> {
    say(me, "--- 1. wait until a map reaches 4 workers on 2 hosts");
    if !m.worker().wait_all_ready(Duration::from_secs(10)) {
        return Err("web-1's workers not ready".into());
    }
    let until = Instant::now() + Duration::from_secs(30);
    let answered = |m: &mut Messenger| {
        m.map::<_, (u32, u32)>("whoami", &(), soon())
            .map(|e| e.iter().filter(|(_, r)| r.is_ok()).count())
    };
    while answered(m)? < 4 {
        if Instant::now() >= until {
            return Err("a map never saw web-2's workers".into());
        }
        pause(m, Duration::from_millis(100))?;
    }
    say(me, "web-2 has joined: 4 workers");

    say(me, format!("--- 2. cache invalidation: broadcast of {KEY}"));
    m.broadcast("invalidate", KEY)?;
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let still = m.map::<_, bool>("cached", KEY, soon())?;
        let gone = still.iter().filter(|(_, r)| matches!(r, Ok(false))).count();
        if gone == 4 {
            break say(me, format!("all 4 workers on both hosts dropped {KEY}"));
        }
        if Instant::now() >= until {
            return Err(format!("{gone} of 4 workers dropped {KEY}: {still:?}").into());
        }
        pause(m, Duration::from_millis(20))?;
    }

    say(me, "--- 3. consume: on this host while a worker here is free...");
    let done = m.consume("resize", "dog.png", soon())?;
    say(me, format!("dog.png was resized on {}", place(done.worker.host)));
    if !done.worker.host.is_local() {
        return Err("with web-1's worker 1 free, dog.png left web-1".into());
    }
    say(me, "... and on the other host while web-1's workers are busy");
    // Make web-1's worker 1 busy: a slow request to it, sent from another
    // thread through a `MessengerHandle` (this thread carries it). While
    // it runs (worker 1 holds the host's lock "render"), worker 1 has a
    // task of ours in hand, and worker 0 (this one) takes no `resize`
    // work: no worker here is free, so the next consume leaves the host.
    let slots = m.stats().slots;
    let slot1 = slots.iter().find(|s| s.index == Some(1));
    let slot1 = slot1.ok_or("no worker 1")?.slot;
    let handle = m.handle();
    let render = std::thread::spawn(move || handle.request::<_, ()>(slot1, "render", "report.pdf", soon()));
    let free = |m: &Messenger| m.worker().try_synchronize("render", Duration::ZERO, |_| ());
    let until = soon();
    while free(m).is_ok() {
        if Instant::now() >= until {
            return Err("worker 1 never began rendering".into());
        }
        pause(m, Duration::from_millis(10))?;
    }
    let done = m.consume("resize", "cat.png", soon())?;
    let (host, slot) = (place(done.worker.host), done.worker.slot);
    say(me, format!("cat.png was resized on {host} (slot {slot})"));
    while !render.is_finished() && Instant::now() < until {
        pause(m, Duration::from_millis(10))?;
    }
    render.join().map_err(|_| "the render thread panicked")??;
    say(me, "report.pdf rendered on web-1");
    if done.worker.host.name().as_deref() != Some("web-2") {
        return Err("with web-1's workers busy, cat.png did not go to web-2".into());
    }

    say(me, "--- 4. map: every worker of both hosts, this host first");
    let entries = m.map::<_, (u32, u32)>("whoami", &(), soon())?;
    for (w, answer) in &entries {
        let (index, pid) = answer.as_ref().map_err(|e| format!("slot {}: {e}", w.slot))?;
        let (host, slot) = (place(w.host), w.slot);
        say(me, format!("{host} slot {slot}: worker {index}, pid {pid}"));
    }
    let hosts: Vec<_> = entries.iter().map(|(w, _)| w.host.name()).collect();
    let web2 = Some("web-2".into());
    if hosts != [None, None, web2.clone(), web2] {
        return Err(format!("not 2 workers here then 2 on web-2: {hosts:?}").into());
    }
    Ok(())
}

/// A host: a master with 2 workers and a bridge to the others. Exits 0
/// when it stopped cleanly and no worker failed.
fn host_main(host: String) -> i32 {
    let Ok(url) = std::env::var(NATS_URL) else {
        return 2;
    };
    let failed = Rc::new(Cell::new(false));
    let (failure, name) = (failed.clone(), host.clone());
    let report = Cluster::builder()
        .workers(2)
        .nats(NatsConfig::new(&url, "example", &host))
        .on_event(move |cluster, event| match event.kind {
            EventKind::Exit(ExitReason::Shutdown) => {}
            EventKind::Exit(reason) => {
                eprintln!("[{name}] worker {} {reason}", event.index);
                failure.set(true);
                cluster.shutdown();
            }
            _ => {}
        })
        .run(|w| worker(w, &host));
    match report {
        // A failed worker has said why (and stopped the host).
        Ok(r) if r.clean => i32::from(failed.get()),
        other => {
            eprintln!("[{host}] did not stop cleanly: {other:?}");
            1
        }
    }
}

// ------------------------------------------------------------ the launcher

/// A child process that is SIGKILLed and reaped when dropped (on every
/// way out of `launch`), and dies with this process (`PR_SET_PDEATHSIG`).
struct Proc(Child);

impl Proc {
    fn spawn(cmd: &mut Command) -> Res<Proc> {
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes integers only and is
        // async-signal-safe, as pre_exec requires.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| format!("{:?}: {e}", cmd.get_program()))?;
        Ok(Proc(child))
    }

    /// Waits up to `limit` for the process to end.
    fn wait(&mut self, limit: Duration, what: &str) -> Res<ExitStatus> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            match self.0.try_wait()? {
                Some(status) => return Ok(status),
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        Err(format!("{what} still running after {limit:?}").into())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts NATS (its JetStream store in `dir`) and the hosts, waits for
/// web-1 to end, stops web-2 and NATS.
fn launch(dir: &std::path::Path) -> Res<()> {
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port();
    let mut server = Command::new("nats-server");
    server
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir);
    let mut nats = Proc::spawn(server.stdout(Stdio::null()).stderr(Stdio::null()))?;
    let until = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
        if nats.0.try_wait()?.is_some() || Instant::now() >= until {
            return Err(format!("nats-server did not come up on port {port}").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("nats://127.0.0.1:{port}");
    say("example", format!("nats-server (JetStream) listening on {url}"));

    let host = |name: &str| {
        let mut cmd = Command::new(std::env::current_exe()?);
        Proc::spawn(cmd.env(HOST, name).env(NATS_URL, &url).stdin(Stdio::null()))
    };
    say("example", "starting hosts web-1 and web-2, 2 workers each");
    let mut web1 = host("web-1")?;
    let mut web2 = host("web-2")?;

    // web-1 stops by itself once its driver is done (or has failed).
    let status1 = web1.wait(Duration::from_secs(90), "web-1")?;
    // SAFETY: kill(2) with a pid (of a child not yet reaped) and a signal.
    unsafe { libc::kill(web2.0.id() as libc::pid_t, libc::SIGTERM) };
    let status2 = web2.wait(Duration::from_secs(20), "web-2 after SIGTERM")?;
    drop(nats);
    if !status1.success() || !status2.success() {
        return Err(format!("web-1 {status1}, web-2 {status2}").into());
    }
    say(
        "example",
        "both hosts and nats-server stopped: every step happened",
    );
    Ok(())
}

fn main() {
    if let Ok(host) = std::env::var(HOST) {
        std::process::exit(host_main(host));
    }
    let dir = std::env::temp_dir().join(format!("shmcluster-hosts-example-{}", std::process::id()));
    let result = launch(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = result {
        eprintln!("[example] failed: {e}");
        std::process::exit(1);
    }
}
