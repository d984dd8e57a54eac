//! An axum service on a pre-forked shmcluster: N worker processes share one
//! listening socket, and the workers cooperate through the shared segment —
//! a cross-process counter under `synchronize_key`, per-worker caches kept
//! coherent by `broadcast`, cluster-wide `/stats` by `map`, and background
//! jobs spread over the workers by `consume`.
//!
//! ```text
//! cargo run --release -p axum_cluster -- --workers 2
//! listening on 127.0.0.1:8080 (master pid 4242)
//!
//! curl http://127.0.0.1:8080/                          # worker 1 pid 4243 generation 1
//! curl -X POST http://127.0.0.1:8080/counter           # {"value":1,"token":1,"slot":1,"pid":4243}
//! curl http://127.0.0.1:8080/counter                   # {"value":1,"token":2,...}
//! curl -X PUT --data-binary v1 http://127.0.0.1:8080/cache/colour   # {"invalidated":"colour",...}
//! curl http://127.0.0.1:8080/cache/colour              # {"key":"colour","value":"v1","cached":false,...}
//! curl http://127.0.0.1:8080/stats                     # {"workers":[{..},{..}],"errors":[],"asked_by":1,...}
//! curl -X POST 'http://127.0.0.1:8080/jobs?ms=200'     # {"ran_on":2,"delivery_id":..,"attempts":1,...}
//! kill -HUP <master pid>     # rolling reload: one worker at a time, no request dropped
//! kill -TERM <master pid>    # graceful shutdown: in-flight requests finish, exit code 0
//! ```
//!
//! Options: `--workers N` (0, the default, is one per CPU), `--listen ADDR`
//! (default `127.0.0.1:8080`; port 0 picks one, and the first line printed
//! names it), `--reuseport` (one `SO_REUSEPORT` socket per worker instead of
//! one shared socket), `--threads T` (tokio worker threads per process),
//! `--data DIR` (where the counter and the cache's backing files live;
//! default: a fresh directory under the system temp dir, removed at exit),
//! `--quiet` (only the first line), and `--single`: the same routes in one
//! process without a cluster — the counter under an in-process mutex, a
//! local cache, `/stats` of that process alone, jobs run in place. That is
//! the baseline `benches/axum.rs` compares the cluster with.
//!
//! # Routes
//!
//! Every JSON answer carries the `slot` and `pid` of the worker that
//! answered it.
//!
//! - `GET /` — `worker <slot> pid <pid> generation <g>`: the cheap route.
//! - `POST /counter` — adds 1 to a counter shared by every worker. It lives
//!   in `<data>/counter` (8 bytes) and is read and rewritten inside
//!   `synchronize_key("counter", ..)`, so no addition is lost whichever
//!   workers run them; the answer carries the section's fencing token.
//!   `GET /counter` reads it under the same lock.
//! - `GET /cache/{key}` — the value of `<data>/cache-<key>` (`null` if there
//!   is no such file), from this worker's cache if it has it (`"cached":
//!   true`). `PUT /cache/{key}` rewrites the file and broadcasts
//!   `cache.invalidate`, so every worker (this one included) drops its copy.
//!   Keys are 1 to 64 of `A-Z a-z 0-9 _ -`.
//! - `GET /stats` — `map`s `stats` to every live worker: one entry per
//!   worker (slot, generation, pid, requests served, cache entries, jobs
//!   run), and an `errors` entry for any that did not answer within 1 s.
//! - `POST /jobs?ms=N` — `consume`s a job that sleeps N ms (at most 5000,
//!   default 10) on the least-loaded worker and answers once it finished:
//!   `ran_on` is that worker's slot.
//!
//! Failures of the cluster calls (a lock, a request, a map, a consume)
//! answer 503 with the error's text; bad input answers 400.
//!
//! # Reload and shutdown
//!
//! On a reload (`SIGHUP`) or a shutdown (`SIGTERM`) a worker's
//! `AsyncMessenger::stopped()` resolves, and `shmcluster::http`'s server
//! drains: the worker stops accepting (the others, or its replacement,
//! take the new connections), answers every request in flight, answers
//! the next request on each open keep-alive connection with `Connection:
//! close` and closes it, and closes a connection that stays idle only at
//! its drain deadline, 8 s (the master's is 10 s). No client — not even
//! one that never retries — loses a request: none is ever sent into a
//! connection the worker is closing. The worker then waits for the jobs
//! it is running before it exits.
//!
//! # Why one runtime thread per process
//!
//! The cluster already runs a process per CPU; each process's runtime is a
//! multi-thread runtime with `--threads` workers, 1 by default. More runtime
//! threads than that would give the kernel more runnable threads than
//! cores — N processes × T threads — with work stealing bouncing tasks
//! between them, and no more CPU to run on. The blocking pool (where
//! `synchronize_key` runs its sections and the cache reads its files) is
//! separate and grows on demand. `--single` has one process, so there the
//! default is one runtime thread per CPU.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use shmcluster::http::HttpServer;
use shmcluster::{AsyncMessenger, Cluster, ListenAddr, ListenMode, Messenger, Worker};

/// The longest job `/jobs` accepts, in milliseconds.
const MAX_JOB_MS: u64 = 5000;
/// How long `/stats` waits for every worker's answer.
const STATS_DEADLINE: Duration = Duration::from_secs(1);
/// How long a stopping worker keeps an idle keep-alive connection open
/// (one that sends a request gets its answer, with `Connection: close`):
/// less than the master's [`MASTER_DRAIN`], so that the worker closes them
/// itself.
const IDLE_DRAIN: Duration = Duration::from_secs(8);
/// The master's drain deadline (and shutdown grace): it kills a worker
/// still running then.
const MASTER_DRAIN: Duration = Duration::from_secs(10);
/// How long a stopping worker waits for the jobs it is running.
const JOBS_DRAIN: Duration = Duration::from_secs(MAX_JOB_MS / 1000 + 1);
/// How long a stopping worker waits for its messenger to send its last
/// answers.
const FLUSH_DEADLINE: Duration = Duration::from_secs(1);

// ------------------------------------------------------------ arguments

struct Args {
    workers: u32,
    listen: String,
    mode: ListenMode,
    single: bool,
    data: Option<PathBuf>,
    threads: Option<usize>,
    quiet: bool,
}

const USAGE: &str = "usage: axum_cluster [--workers N] [--listen ADDR] [--reuseport] [--single] \
                     [--data DIR] [--threads T] [--quiet]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        workers: 0,
        listen: "127.0.0.1:8080".into(),
        mode: ListenMode::Shared,
        single: false,
        data: None,
        threads: None,
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
            "--single" => args.single = true,
            "--data" => args.data = Some(it.next().ok_or("--data needs a directory")?.into()),
            "--threads" | "-t" => {
                let v = it.next().ok_or("--threads needs a number")?;
                let t: usize = v.parse().map_err(|e| format!("--threads {v}: {e}"))?;
                if t == 0 {
                    return Err("--threads must be at least 1".into());
                }
                args.threads = Some(t);
            }
            "--quiet" | "-q" => args.quiet = true,
            "--help" | "-h" => {
                println!("{USAGE}");
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
            eprintln!("axum_cluster: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    // The data directory is made here, in the master, before any fork, so
    // every worker (and every replacement) uses the same one.
    let (data, made) = match &args.data {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("axum_cluster-{}", std::process::id())),
            true,
        ),
    };
    if let Err(e) = std::fs::create_dir_all(&data) {
        eprintln!("axum_cluster: cannot create {}: {e}", data.display());
        std::process::exit(2);
    }
    let code = if args.single {
        run_single(&args, &data)
    } else {
        run_cluster(&args, &data)
    };
    if made {
        let _ = std::fs::remove_dir_all(&data);
    }
    std::process::exit(code);
}

/// Tests and benchmarks read this line to find the port.
fn announce(addr: &dyn std::fmt::Display) {
    println!("listening on {addr} (master pid {})", std::process::id());
    let _ = io::stdout().flush();
}

fn runtime(threads: usize) -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
}

// ------------------------------------------------------------ cluster mode

fn run_cluster(args: &Args, data: &Path) -> i32 {
    let quiet = args.quiet;
    let threads = args.threads.unwrap_or(1);
    let mut announced = false;
    let result = Cluster::builder()
        .workers(args.workers)
        .listen_mode(&args.listen, args.mode)
        .shutdown_grace(MASTER_DRAIN)
        .drain_timeout(MASTER_DRAIN)
        .on_event(move |cluster, event| {
            if !announced {
                announced = true;
                for addr in cluster.local_addrs() {
                    announce(&addr);
                }
            }
            if !quiet {
                // Only the fields the event carries (a cluster-wide event
                // has no slot or pid).
                eprintln!("[master] {event}");
            }
        })
        .run(|worker| serve_worker(worker, data, threads, quiet));
    match result {
        Ok(report) => {
            if !quiet {
                eprintln!("[master] done: {report:?}");
            }
            report.exit_code()
        }
        Err(e) => {
            eprintln!("axum_cluster: {e}");
            2
        }
    }
}

/// One forked worker: its runtime, its messenger, the axum app, until the
/// master says drain or stop.
fn serve_worker(mut worker: Worker, data: &Path, threads: usize, quiet: bool) -> Result<(), String> {
    let listener = worker
        .take_listeners()
        .into_iter()
        .next()
        .ok_or("the master handed this worker no listener")?;
    let local = Arc::new(Local::new(worker.slot(), worker.generation(), data));
    let counter = open_counter(data).map_err(|e| format!("{}/counter: {e}", data.display()))?;
    let rt = runtime(threads).map_err(|e| format!("tokio runtime: {e}"))?;
    let served: Result<(), String> = rt.block_on(async {
        let listener = listener
            .into_tokio_tcp()
            .map_err(|e| format!("listener (TCP only): {e}"))?;
        let mut messenger = Messenger::new(worker);
        register_handlers(&mut messenger, &local).map_err(|e| format!("handlers: {e}"))?;
        let am = messenger.into_async();
        let app = Arc::new(App::new(
            local.clone(),
            Backend::Cluster {
                am: am.clone(),
                counter: Arc::new(counter),
            },
        ));
        am.ready();
        let stopping = am.clone();
        serve(listener, app, async move { stopping.stopped().await }).await;
        // No request is in flight any more; jobs that other workers sent
        // here may be. Finish them: their callers wait for the answer.
        local.jobs_finished(Instant::now() + JOBS_DRAIN).await;
        // A finished job's answer is queued for the messenger's driver
        // task, which may not have written it yet: `flush` waits until it
        // has, before the runtime goes. An answer lost here would make its
        // caller run the job again elsewhere.
        let _ = am.flush(Instant::now() + FLUSH_DEADLINE).await;
        Ok(())
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    if !quiet {
        eprintln!("[worker {}] pid {} done", local.slot, local.pid);
    }
    served
}

/// Serves `app` on `listener` until `stop` resolves, then drains without
/// losing a request (`shmcluster::http`, and the module docs' "Reload and
/// shutdown").
async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    HttpServer::new()
        .drain_timeout(IDLE_DRAIN)
        .serve(listener, router(app), stop)
        .await;
}

/// The messenger handlers: the other half of `/cache` (invalidation),
/// `/stats` (this worker's figures) and `/jobs` (running one).
fn register_handlers(m: &mut Messenger, local: &Arc<Local>) -> Result<(), shmcluster::CallError> {
    let l = local.clone();
    m.on("cache.invalidate", move |_, key: String| l.invalidate(&key))?;
    let l = local.clone();
    m.on_request("stats", move |_, (): ()| Ok::<_, Infallible>(l.figures()))?;
    let l = local.clone();
    m.on_async("job", move |_, spec: JobSpec| {
        // Counted from the moment the message is taken, before the task
        // runs: a worker told to stop waits for it (`jobs_finished`).
        let job = l.job_started();
        async move {
            job.run(spec.ms).await;
            Ok::<(), Infallible>(())
        }
    })?;
    Ok(())
}

// ------------------------------------------------------------ single mode

fn run_single(args: &Args, data: &Path) -> i32 {
    let addr = match args.listen.parse::<ListenAddr>() {
        Ok(ListenAddr::Tcp(addr)) => addr,
        Ok(ListenAddr::Unix(_)) => {
            eprintln!("axum_cluster: --single listens on TCP only");
            return 2;
        }
        Err(e) => {
            eprintln!("axum_cluster: {e}");
            return 2;
        }
    };
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let rt = match runtime(threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("axum_cluster: tokio runtime: {e}");
            return 2;
        }
    };
    let local = Arc::new(Local::new(0, 1, data));
    let result: Result<(), String> = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("bind {addr}: {e}"))?;
        announce(&listener.local_addr().map_err(|e| e.to_string())?);
        let app = Arc::new(App::new(
            local.clone(),
            Backend::Single {
                counter: Mutex::new(Counter::default()),
                deliveries: AtomicU64::new(0),
            },
        ));
        serve(listener, app, termination()).await;
        local.jobs_finished(Instant::now() + JOBS_DRAIN).await;
        Ok(())
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("axum_cluster: {e}");
            1
        }
    }
}

/// Resolves on SIGTERM or SIGINT (single mode; a cluster worker has
/// `AsyncMessenger::stopped`).
async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        // Without signal handlers the default action ends the process.
        _ => std::future::pending().await,
    }
}

// ------------------------------------------------------------ state

/// This process's own state, shared by the routes and the messenger's
/// handlers.
struct Local {
    slot: u32,
    generation: u32,
    pid: u32,
    data: PathBuf,
    cache: Mutex<Cache>,
    /// HTTP requests this process answered (the middleware counts them).
    requests: AtomicU64,
    /// Jobs run to the end here.
    jobs: AtomicU64,
    /// Jobs taken and not yet finished.
    jobs_running: AtomicU64,
}

#[derive(Default)]
struct Cache {
    entries: HashMap<String, Option<String>>,
    /// Bumped by every invalidation: a value read from its file while an
    /// invalidation came in may be stale, and is not kept.
    epoch: u64,
}

/// One worker's figures, as `/stats` shows them.
#[derive(Debug, Serialize, Deserialize)]
struct WorkerFigures {
    slot: u32,
    generation: u32,
    pid: u32,
    requests: u64,
    cache_entries: u64,
    jobs: u64,
}

/// The `job` event's payload.
#[derive(Serialize, Deserialize)]
struct JobSpec {
    ms: u64,
}

impl Local {
    fn new(slot: u32, generation: u32, data: &Path) -> Self {
        Self {
            slot,
            generation,
            pid: std::process::id(),
            data: data.to_owned(),
            cache: Mutex::new(Cache::default()),
            requests: AtomicU64::new(0),
            jobs: AtomicU64::new(0),
            jobs_running: AtomicU64::new(0),
        }
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        // The cache holds no invariant a panicking holder could break.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn invalidate(&self, key: &str) {
        let mut cache = self.cache();
        cache.entries.remove(key);
        cache.epoch += 1;
    }

    fn figures(&self) -> WorkerFigures {
        WorkerFigures {
            slot: self.slot,
            generation: self.generation,
            pid: self.pid,
            requests: self.requests.load(Ordering::Relaxed),
            cache_entries: self.cache().entries.len() as u64,
            jobs: self.jobs.load(Ordering::Relaxed),
        }
    }

    fn job_started(self: &Arc<Self>) -> Job {
        self.jobs_running.fetch_add(1, Ordering::AcqRel);
        Job(self.clone())
    }

    /// Waits until no job runs here, or `deadline`.
    async fn jobs_finished(&self, deadline: Instant) {
        while self.jobs_running.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A job taken by this process; counted in `jobs_running` until dropped
/// (finished, or cancelled).
struct Job(Arc<Local>);

impl Job {
    async fn run(self, ms: u64) {
        // Another worker's number: bounded here too.
        tokio::time::sleep(Duration::from_millis(ms.min(MAX_JOB_MS))).await;
        self.0.jobs.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.0.jobs_running.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where the routes' shared work goes: the cluster, or this process alone.
enum Backend {
    Cluster {
        am: AsyncMessenger,
        /// `<data>/counter`, read and written only under the `counter` lock.
        counter: Arc<File>,
    },
    Single {
        counter: Mutex<Counter>,
        /// Numbers the jobs run in place, as `consume` numbers deliveries.
        deliveries: AtomicU64,
    },
}

/// The single-process counter: the value and its acquisitions (the
/// stand-in for the cluster lock's fencing token).
#[derive(Default)]
struct Counter {
    value: u64,
    token: u64,
}

struct App {
    local: Arc<Local>,
    backend: Backend,
    /// The answer of `GET /`.
    banner: String,
}

impl App {
    fn new(local: Arc<Local>, backend: Backend) -> Self {
        let banner = format!(
            "worker {} pid {} generation {}\n",
            local.slot, local.pid, local.generation
        );
        Self {
            local,
            backend,
            banner,
        }
    }

    /// A JSON answer from this worker: `body` plus `slot` and `pid`.
    fn reply(&self, mut body: serde_json::Value) -> Json<serde_json::Value> {
        if let Some(map) = body.as_object_mut() {
            map.insert("slot".into(), self.local.slot.into());
            map.insert("pid".into(), self.local.pid.into());
        }
        Json(body)
    }

    fn fail(&self, error: AppError) -> Response {
        let (status, text) = match error {
            AppError::BadInput(t) => (StatusCode::BAD_REQUEST, t),
            AppError::Unavailable(t) => (StatusCode::SERVICE_UNAVAILABLE, t),
            AppError::Internal(t) => (StatusCode::INTERNAL_SERVER_ERROR, t),
        };
        (status, self.reply(json!({ "error": text }))).into_response()
    }

    /// Adds `delta` to the counter and returns (value, fencing token).
    async fn counter(&self, delta: u64) -> Result<(u64, u64), AppError> {
        match &self.backend {
            Backend::Cluster { am, counter } => {
                let file = counter.clone();
                let r = am
                    .synchronize_key("counter", move |section| {
                        // The section is one 8-byte pread and one 8-byte
                        // pwrite: a holder killed inside it has either
                        // written the whole new value or nothing, so a
                        // `previous_owner_died()` needs no repair here.
                        let value = read_counter(&file)? + delta;
                        if delta > 0 {
                            file.write_all_at(&value.to_le_bytes(), 0)?;
                        }
                        Ok::<_, io::Error>((value, section.fencing_token()))
                    })
                    .await
                    .map_err(|e| AppError::Unavailable(format!("counter lock: {e}")))?;
                r.map_err(|e| AppError::Internal(format!("counter file: {e}")))
            }
            Backend::Single { counter, .. } => {
                let mut c = counter.lock().unwrap_or_else(PoisonError::into_inner);
                c.value += delta;
                c.token += 1;
                Ok((c.value, c.token))
            }
        }
    }

    /// After `key`'s file changed: every worker drops its cached copy.
    fn invalidate(&self, key: &str) -> Result<(), AppError> {
        match &self.backend {
            Backend::Cluster { am, .. } => am
                .broadcast("cache.invalidate", key)
                .map_err(|e| AppError::Unavailable(format!("broadcast: {e}"))),
            Backend::Single { .. } => {
                self.local.invalidate(key);
                Ok(())
            }
        }
    }

    /// Every worker's figures, and who did not answer.
    async fn stats(&self) -> Result<(Vec<WorkerFigures>, Vec<(u32, String)>), AppError> {
        match &self.backend {
            Backend::Cluster { am, .. } => {
                let answers = am
                    .map::<(), WorkerFigures>("stats", &(), Instant::now() + STATS_DEADLINE)
                    .await
                    .map_err(|e| AppError::Unavailable(format!("map: {e}")))?;
                let mut figures = Vec::new();
                let mut errors = Vec::new();
                for (who, answer) in answers {
                    match answer {
                        Ok(f) => figures.push(f),
                        Err(e) => errors.push((who.slot, e.to_string())),
                    }
                }
                Ok((figures, errors))
            }
            Backend::Single { .. } => Ok((vec![self.local.figures()], Vec::new())),
        }
    }

    /// Runs a job somewhere: (the slot it ran on, delivery id, attempts).
    async fn job(&self, ms: u64) -> Result<(u32, u64, u32), AppError> {
        match &self.backend {
            Backend::Cluster { am, .. } => {
                let deadline = Instant::now() + Duration::from_millis(ms) + Duration::from_secs(5);
                let done = am
                    .consume("job", &JobSpec { ms }, deadline)
                    .await
                    .map_err(|e| AppError::Unavailable(format!("consume: {e}")))?;
                Ok((done.worker.slot, done.delivery_id, done.attempts))
            }
            Backend::Single { deliveries, .. } => {
                let id = deliveries.fetch_add(1, Ordering::Relaxed) + 1;
                self.local.job_started().run(ms).await;
                Ok((self.local.slot, id, 1))
            }
        }
    }
}

enum AppError {
    /// 400: the client's request is wrong.
    BadInput(String),
    /// 503: a cluster call failed (lock, request, map, consume).
    Unavailable(String),
    /// 500: this worker's own failure (a file it could not use).
    Internal(String),
}

// ------------------------------------------------------------ routes

type Shared = State<Arc<App>>;

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/counter", get(counter_get).post(counter_add))
        .route("/cache/{key}", get(cache_get).put(cache_put))
        .route("/stats", get(stats))
        .route("/jobs", axum::routing::post(jobs))
        .layer(middleware::from_fn_with_state(app.clone(), count_requests))
        .with_state(app)
}

async fn count_requests(State(app): Shared, request: Request, next: Next) -> Response {
    app.local.requests.fetch_add(1, Ordering::Relaxed);
    next.run(request).await
}

async fn root(State(app): Shared) -> String {
    app.banner.clone()
}

async fn counter_get(State(app): Shared) -> Response {
    match app.counter(0).await {
        Ok((value, token)) => app
            .reply(json!({ "value": value, "token": token }))
            .into_response(),
        Err(e) => app.fail(e),
    }
}

async fn counter_add(State(app): Shared) -> Response {
    match app.counter(1).await {
        Ok((value, token)) => app
            .reply(json!({ "value": value, "token": token }))
            .into_response(),
        Err(e) => app.fail(e),
    }
}

fn valid_key(key: &str) -> bool {
    (1..=64).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

async fn cache_get(State(app): Shared, UrlPath(key): UrlPath<String>) -> Response {
    if !valid_key(&key) {
        return app.fail(AppError::BadInput(format!("bad key {key:?}")));
    }
    let epoch = {
        let cache = app.local.cache();
        if let Some(value) = cache.entries.get(&key) {
            let value = value.clone();
            drop(cache);
            return app
                .reply(json!({ "key": key, "value": value, "cached": true }))
                .into_response();
        }
        cache.epoch
    };
    let path = app.local.data.join(format!("cache-{key}"));
    let read = tokio::task::spawn_blocking(move || match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    })
    .await;
    let value = match read {
        Ok(Ok(value)) => value,
        Ok(Err(e)) => return app.fail(AppError::Internal(format!("cache file: {e}"))),
        Err(e) => return app.fail(AppError::Internal(format!("cache read task: {e}"))),
    };
    {
        let mut cache = app.local.cache();
        // Kept only if no invalidation came in while the file was read.
        if cache.epoch == epoch {
            cache.entries.insert(key.clone(), value.clone());
        }
    }
    app.reply(json!({ "key": key, "value": value, "cached": false }))
        .into_response()
}

async fn cache_put(State(app): Shared, UrlPath(key): UrlPath<String>, body: Bytes) -> Response {
    if !valid_key(&key) {
        return app.fail(AppError::BadInput(format!("bad key {key:?}")));
    }
    if std::str::from_utf8(&body).is_err() {
        return app.fail(AppError::BadInput("the value is not UTF-8 text".into()));
    }
    let dir = app.local.data.clone();
    let (pid, name) = (app.local.pid, key.clone());
    // Written aside and renamed: a worker reading the file concurrently
    // sees the old value or the new one, never half of it.
    let written = tokio::task::spawn_blocking(move || {
        let tmp = dir.join(format!(".cache-{name}.{pid}"));
        std::fs::write(&tmp, &body)?;
        std::fs::rename(&tmp, dir.join(format!("cache-{name}")))
    })
    .await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return app.fail(AppError::Internal(format!("cache file: {e}"))),
        Err(e) => return app.fail(AppError::Internal(format!("cache write task: {e}"))),
    }
    match app.invalidate(&key) {
        Ok(()) => app.reply(json!({ "invalidated": key })).into_response(),
        Err(e) => app.fail(e),
    }
}

async fn stats(State(app): Shared) -> Response {
    match app.stats().await {
        Ok((workers, errors)) => {
            let errors: Vec<_> = errors
                .into_iter()
                .map(|(slot, error)| json!({ "slot": slot, "error": error }))
                .collect();
            app.reply(json!({ "workers": workers, "errors": errors, "asked_by": app.local.slot }))
                .into_response()
        }
        Err(e) => app.fail(e),
    }
}

#[derive(Deserialize)]
struct JobQuery {
    ms: Option<u64>,
}

async fn jobs(State(app): Shared, query: Result<Query<JobQuery>, QueryRejection>) -> Response {
    let ms = match query {
        Ok(Query(q)) => q.ms.unwrap_or(10),
        Err(e) => return app.fail(AppError::BadInput(e.body_text())),
    };
    if ms > MAX_JOB_MS {
        return app.fail(AppError::BadInput(format!("ms={ms} is over {MAX_JOB_MS}")));
    }
    match app.job(ms).await {
        Ok((ran_on, delivery_id, attempts)) => app
            .reply(json!({ "ran_on": ran_on, "delivery_id": delivery_id, "attempts": attempts }))
            .into_response(),
        Err(e) => app.fail(e),
    }
}

// ------------------------------------------------------------ the counter file

fn open_counter(data: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(data.join("counter"))
}

/// The counter's value: 8 bytes, little-endian, at offset 0 (0 while the
/// file is still empty).
fn read_counter(file: &File) -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    match file.read_exact_at(&mut bytes, 0) {
        Ok(()) => Ok(u64::from_le_bytes(bytes)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
        Err(e) => Err(e),
    }
}
