//! A pre-forked HTTP/1.1 server on shmcluster's master, with std only.
//!
//! ```text
//! cargo run --release --example http_cluster -- --workers 4 --listen 127.0.0.1:8080
//! curl http://127.0.0.1:8080/        # "worker 2 (index 2, generation 1, pid 4711, build 1234567)"
//! kill -HUP <master pid>             # rolling reload, no connection dropped
//! kill -USR2 <master pid>            # binary upgrade: the program now on disk takes over
//! kill -TERM <master pid>            # graceful shutdown, exit code 0
//! ```
//!
//! `build` is the inode of the executable file the process runs
//! (`/proc/self/exe`): a rolling reload keeps it (workers are forked from
//! the same image), a binary upgrade after a new build was renamed over
//! the program changes it.
//!
//! Each worker accepts on the listener the master bound (shared, or one
//! `SO_REUSEPORT` socket per worker with `--reuseport`) and answers with its
//! slot. Connections are kept alive; a worker told to drain (reload) or to
//! stop (shutdown) stops accepting, answers the request each connection has
//! in flight with `Connection: close`, and exits once they are done.

use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shmcluster::{Cluster, EventKind, ListenMode};

struct Args {
    workers: u32,
    listen: String,
    mode: ListenMode,
    quiet: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        workers: 0,
        listen: "127.0.0.1:8080".into(),
        mode: ListenMode::Shared,
        quiet: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--workers" | "-w" => {
                let v = it.next().ok_or("--workers needs a number")?;
                args.workers = v.parse().map_err(|e| format!("--workers {v}: {e}"))?;
            }
            "--listen" | "-l" => args.listen = it.next().ok_or("--listen needs an address")?,
            "--reuseport" => args.mode = ListenMode::ReusePort,
            "--quiet" | "-q" => args.quiet = true,
            "--help" | "-h" => {
                println!("usage: http_cluster [--workers N] [--listen ADDR] [--reuseport] [--quiet]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(args)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("http_cluster: {e}");
            std::process::exit(2);
        }
    };
    let quiet = args.quiet;
    let mut announced = false;
    let result = Cluster::builder()
        .workers(args.workers)
        .listen_mode(&args.listen, args.mode)
        .shutdown_grace(Duration::from_secs(5))
        .drain_timeout(Duration::from_secs(10))
        .on_event(move |cluster, event| {
            if !announced {
                announced = true;
                for addr in cluster.local_addrs() {
                    // Tests and benchmarks read this line to find the port.
                    println!("listening on {addr} (master pid {})", std::process::id());
                }
                let _ = io::stdout().flush();
            }
            if !quiet || !matches!(event.kind, EventKind::Spawned | EventKind::Online) {
                eprintln!("[master] {event}");
            }
        })
        .run(|mut worker| -> io::Result<()> {
            let listener = worker
                .take_listeners()
                .into_iter()
                .next()
                .ok_or_else(|| io::Error::other("no listener"))?
                .into_tcp();
            let build = std::fs::metadata("/proc/self/exe").map_or(0, |m| {
                use std::os::unix::fs::MetadataExt;
                m.ino()
            });
            let reply = format!(
                "worker {} (index {}, generation {}, pid {}, build {build})\n",
                worker.slot(),
                worker.index(),
                worker.generation(),
                std::process::id()
            );
            let reply: Arc<str> = reply.into();
            let stopping = Arc::new(AtomicBool::new(false));
            let mut connections = Vec::new();
            worker.ready();
            for stream in worker.incoming(&listener) {
                let stream = stream?;
                let (reply, stopping) = (reply.clone(), stopping.clone());
                connections.push(std::thread::spawn(move || serve(stream, &reply, &stopping)));
                connections.retain(|c: &std::thread::JoinHandle<()>| !c.is_finished());
            }
            // Told to drain or stop: finish the connections in hand.
            stopping.store(true, Ordering::Release);
            for c in connections {
                let _ = c.join();
            }
            Ok(())
        });
    match result {
        Ok(report) => {
            eprintln!("[master] done: {report:?}");
            std::process::exit(report.exit_code());
        }
        Err(e) => {
            eprintln!("http_cluster: {e}");
            std::process::exit(2);
        }
    }
}

/// Answers requests on one keep-alive connection until the client closes
/// it, asks to close it, or the worker is stopping (then the request in
/// flight is answered with `Connection: close`).
fn serve(stream: TcpStream, reply: &str, stopping: &AtomicBool) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = stream.set_nodelay(true);
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        // Read one request head (GET without a body is all we serve).
        let mut close = false;
        let mut started = false;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) => return,
                Ok(_) => {
                    started = true;
                    let l = line.trim_end();
                    if l.is_empty() {
                        break;
                    }
                    if l.eq_ignore_ascii_case("connection: close") {
                        close = true;
                    }
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    // Idle between requests: leave if the worker is stopping.
                    if !started && stopping.load(Ordering::Acquire) {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
        let close = close || stopping.load(Ordering::Acquire);
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n",
            reply.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if writer.write_all(head.as_bytes()).is_err() || writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
        if close {
            return;
        }
    }
}
