//! [`HttpServer`]: accepts until the worker is told to stop, then drains
//! (see the module docs for the order of things).

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::{Drain, DEFAULT_DRAIN_TIMEOUT};

type BoxError = Box<dyn StdError + Send + Sync>;

/// Serves HTTP/1.1 on a listener with a graceful drain (see the module
/// docs).
#[derive(Debug, Clone)]
pub struct HttpServer {
    drain_timeout: Duration,
    nodelay: bool,
    idle_timeout: Option<Duration>,
}

impl Default for HttpServer {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpServer {
    /// Defaults: [`DEFAULT_DRAIN_TIMEOUT`], `TCP_NODELAY` on, no
    /// [idle timeout](Self::idle_timeout).
    pub fn new() -> Self {
        Self {
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            nodelay: true,
            idle_timeout: None,
        }
    }

    /// How long after the stop a connection that stays idle is kept open
    /// (one that sends a request gets its answer with `Connection: close`
    /// and ends). Make it shorter than the master's
    /// [`crate::ClusterBuilder::drain_timeout`], so that the worker closes
    /// them itself before the master kills it.
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }

    /// `TCP_NODELAY` on accepted connections (default on: an answer goes
    /// out at once rather than waiting for the client's ACK).
    pub fn nodelay(mut self, on: bool) -> Self {
        self.nodelay = on;
        self
    }

    /// Closes a connection that has waited this long for its next request
    /// (`None`, the default: never, outside a drain).
    ///
    /// Off by default because no idle close is safe on HTTP/1.1
    /// keep-alive: the client may send its next request just as the
    /// server closes, and that request is lost (the race the module docs
    /// describe, which the drain avoids by saying `Connection: close`
    /// first). Without it an idle connection, or one sending its request
    /// head slowly, holds its descriptor until the client closes it or
    /// the drain deadline; put a limit in front (a proxy) if clients may
    /// hold many.
    ///
    /// With it, the close is made as safe as HTTP/1.1 allows: hyper's
    /// header-read timer, which runs only while the connection waits for a
    /// request head (never with a request in flight or an answer being
    /// written), closes it; and every answer made before the drain carries
    /// `Keep-Alive: timeout=<whole seconds>`, so that a client that honours
    /// that hint stops reusing the connection before the server closes
    /// it. A client that ignores it may still lose a request sent at the
    /// wrong moment, and must retry it; only an idempotent one can be
    /// retried blindly. The timer starts when the connection begins to
    /// wait for a head (on a new connection, at once; on a kept-alive one,
    /// after its last answer), so it also limits how long a client may
    /// take to send one.
    pub fn idle_timeout(mut self, d: Option<Duration>) -> Self {
        self.idle_timeout = d;
        self
    }

    /// Serves `service` on `listener` until `stop` resolves, then drains
    /// as the module docs say: stops accepting, answers every request in
    /// flight, and the next one on each connection with `Connection:
    /// close`; closes connections still idle at [`Self::drain_timeout`].
    /// Returns once every connection has ended.
    ///
    /// For a cluster worker, `stop` is [`crate::AsyncMessenger::stopped`]
    /// (a reload or a shutdown); the listener is the master's, from
    /// [`crate::Listener::into_tokio_tcp`]. Must run inside a tokio
    /// runtime (it spawns a task per connection).
    ///
    /// Nothing here fails the server: an accept error about one
    /// connection (gone before it was taken) is skipped, any other (out
    /// of file descriptors, for instance) is logged and retried after a
    /// pause, and an error on a connection (a client gone mid-request, a
    /// malformed request, an [idle timeout](Self::idle_timeout)) ends only
    /// that one.
    pub async fn serve<S, B>(
        &self,
        listener: TcpListener,
        service: S,
        stop: impl Future<Output = ()> + Send + 'static,
    ) where
        S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let drain = Drain::new();
        let deadline = drain.clone();
        let drain_timeout = self.drain_timeout;
        let clock = tokio::spawn(async move {
            stop.await;
            deadline.start();
            tokio::time::sleep(drain_timeout).await;
            deadline.close_idle();
        });
        self.serve_drain(listener, service, drain, TokioTimer::new())
            .await;
        clock.abort();
    }

    /// [`Self::serve`] with its drain driven by `drain` and hyper's timer
    /// `timer` (the tests drive both).
    async fn serve_drain<S, B>(
        &self,
        listener: TcpListener,
        service: S,
        drain: Drain,
        timer: impl hyper::rt::Timer + Send + Sync + 'static,
    ) where
        S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let mut builder = hyper::server::conn::http1::Builder::new();
        // hyper 1.x arms this timer whenever the connection waits for a
        // request head, idle time between keep-alive requests included:
        // it is an idle timeout. Its default, 30 s, is set here to none
        // unless asked for (see `idle_timeout`).
        builder.timer(timer).header_read_timeout(self.idle_timeout);
        // The hint of `idle_timeout`: whole seconds, rounded down, so that
        // a client that honours it gives up the connection first.
        let keep_alive = self.idle_timeout.map(|d| {
            HeaderValue::from_str(&format!("timeout={}", d.as_secs()))
                .expect("digits are a valid header value")
        });
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                () = drain.draining() => break,
                // Reaps connections that ended, so the set stays small.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                // Cancel-safe: a connection is either returned or left in
                // the backlog (for another worker, or the next turn).
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        if self.nodelay {
                            // Best effort: without it the answers are a
                            // little slower, not wrong.
                            let _ = stream.set_nodelay(true);
                        }
                        let hyper = Hyper {
                            service: service.clone(),
                            drain: drain.clone(),
                            keep_alive: keep_alive.clone(),
                        };
                        connections.spawn(connection(builder.clone(), stream, hyper));
                    }
                    Err(e) if connection_error(&e) => {}
                    Err(e) => {
                        // Out of descriptors or memory: give the
                        // connections in hand time to end.
                        tracing::warn!(error = %e, "accept failed; retrying in 100 ms");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        // No more accepting: the other workers, or the replacement, take
        // the connections waiting in the backlog.
        drop(listener);
        while connections.join_next().await.is_some() {}
    }
}

/// One connection until it ends: its idle time cut short at the drain
/// deadline, the rest by the `Connection: close` of its last answer.
async fn connection<S, B>(builder: hyper::server::conn::http1::Builder, stream: TcpStream, hyper: Hyper<S>)
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let drain = hyper.drain.clone();
    let conn = builder.serve_connection(TokioIo::new(stream), hyper);
    tokio::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        () = drain.closing() => {
            // Closes the connection now if it is idle; otherwise after
            // the answer it is working on.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        // A client gone mid-request, a malformed request, an idle
        // timeout: the connection's own business.
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// A tower service as hyper's service (hyper calls `&self`; tower's
/// `call` takes `&mut self` after `poll_ready`), its answers marked as
/// [`CloseWhenDraining`] does (one future per request, not two), and
/// with the `Keep-Alive` hint of [`HttpServer::idle_timeout`] if any.
struct Hyper<S> {
    service: S,
    drain: Drain,
    keep_alive: Option<HeaderValue>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Hyper<S>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, BoxError>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let mut service = self.service.clone();
        let drain = self.drain.clone();
        let keep_alive = self.keep_alive.clone();
        Box::pin(async move {
            std::future::poll_fn(|cx| service.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            let mut response = service.call(request).await.map_err(Into::into)?;
            // As in `CloseWhenDraining`: looked at when the answer is
            // ready.
            drain.mark(&mut response);
            if let Some(hint) = keep_alive.filter(|_| !drain.is_draining()) {
                // A race with `mark` at worst adds the hint to the last
                // answer, which says close anyway.
                response
                    .headers_mut()
                    .entry(HeaderName::from_static("keep-alive"))
                    .or_insert(hint);
            }
            Ok(response)
        })
    }
}

/// Accept errors about one connection (it went away before it was taken):
/// take the next.
fn connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream as StdStream;
    use std::task::{Context, Poll};

    use super::*;

    /// `GET /` answers at once; `GET /slow` once `release` is notified.
    #[derive(Clone)]
    struct Hello {
        release: std::sync::Arc<tokio::sync::Notify>,
    }

    impl tower_service::Service<Request<Incoming>> for Hello {
        type Response = Response<String>;
        type Error = std::convert::Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Response<String>, Self::Error>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<Incoming>) -> Self::Future {
            let slow = (request.uri().path() == "/slow").then(|| self.release.clone());
            Box::pin(async move {
                if let Some(release) = slow {
                    release.notified().await;
                }
                Ok(Response::new("hello\n".to_owned()))
            })
        }
    }

    /// How long a client waits to read: only a hung server takes it.
    const READ_LIMIT: Duration = Duration::from_secs(30);

    /// A blocking client connection, reading within [`READ_LIMIT`].
    fn connect(addr: std::net::SocketAddr) -> io::Result<StdStream> {
        let conn = StdStream::connect(addr)?;
        conn.set_read_timeout(Some(READ_LIMIT))?;
        Ok(conn)
    }

    fn send(conn: &mut StdStream, path: &str) {
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
        conn.write_all(request.as_bytes()).expect("write");
    }

    /// Reads one answer: its head, lower case.
    fn read_answer(conn: &mut StdStream) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = conn.read(&mut buf).expect("an answer within the read limit");
            assert!(
                n > 0,
                "closed before a whole answer: {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                if body == "hello\n" {
                    return head.to_ascii_lowercase();
                }
            }
        }
    }

    /// Whether the server closes `conn` (EOF or reset) within `limit`,
    /// sending nothing.
    fn closed_within(conn: &mut StdStream, limit: Duration) -> bool {
        conn.set_read_timeout(Some(limit)).expect("timeout");
        let mut buf = [0u8; 64];
        let closed = match conn.read(&mut buf) {
            Ok(0) => true,
            Ok(n) => panic!("unasked-for bytes: {:?}", String::from_utf8_lossy(&buf[..n])),
            Err(e) => !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
        };
        conn.set_read_timeout(Some(READ_LIMIT)).expect("timeout");
        closed
    }

    /// A runtime for a server, with a thread of its own: the test's
    /// client blocks.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// Each sleep of hyper's this many times shorter.
    const SPEED: u32 = 1000;

    /// hyper's timer running [`SPEED`] times fast: its default 30 s
    /// header-read timeout passes in 30 ms.
    #[derive(Clone)]
    struct Fast;

    impl hyper::rt::Timer for Fast {
        fn sleep(&self, d: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
            TokioTimer::new().sleep(d / SPEED)
        }

        fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
            self.sleep(deadline.saturating_duration_since(std::time::Instant::now()))
        }
    }

    /// Serves [`Hello`] with `server`, its drain driven by `drain`, and
    /// hyper's timer `timer`.
    fn spawn_server(
        rt: &tokio::runtime::Runtime,
        server: HttpServer,
        drain: Drain,
        timer: impl hyper::rt::Timer + Send + Sync + 'static,
    ) -> (
        std::net::SocketAddr,
        std::sync::Arc<tokio::sync::Notify>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let release = std::sync::Arc::new(tokio::sync::Notify::new());
        let hello = Hello {
            release: release.clone(),
        };
        let task = rt.spawn(async move { server.serve_drain(listener, hello, drain, timer).await });
        (addr, release, task)
    }

    /// A keep-alive connection with one answer behind it, not saying
    /// close; the answer's head.
    fn kept_alive(addr: std::net::SocketAddr) -> (StdStream, String) {
        let mut conn = connect(addr).expect("connect");
        send(&mut conn, "/");
        let head = read_answer(&mut conn);
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "before the drain: {head}");
        (conn, head)
    }

    /// Whether `conn` is answered, and was not closed, on a request.
    fn says_close(conn: &mut StdStream, path: &str) -> bool {
        send(conn, path);
        let head = read_answer(conn);
        assert!(head.starts_with("http/1.1 200"), "{head}");
        head.contains("connection: close")
    }

    /// The drain, its phases set by the test rather than by a clock: every
    /// check waits for something that must happen (an answer, a close),
    /// under a limit that only a hung server reaches, and what must not
    /// close cannot, for the deadline comes only when the test says so.
    #[test]
    fn a_drain_loses_no_request() {
        let rt = runtime();
        let drain = Drain::new();
        let (addr, release, server) = spawn_server(&rt, HttpServer::new(), drain.clone(), TokioTimer::new());
        let (mut in_flight, _) = kept_alive(addr);
        let (mut asked, _) = kept_alive(addr);
        let (mut idle, _) = kept_alive(addr);
        send(&mut in_flight, "/slow");
        drain.start();
        // The server saw the drain once the listener is closed: no more
        // accepting.
        let asked_at = std::time::Instant::now();
        while StdStream::connect(addr).is_ok() {
            assert!(
                asked_at.elapsed() < READ_LIMIT,
                "still accepting 30 s after the drain began"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // A permit if the request has not reached the service yet.
        release.notify_one();

        // The request in flight is answered, as the connection's last.
        let head = read_answer(&mut in_flight);
        assert!(head.contains("connection: close"), "{head}");
        assert!(closed_within(&mut in_flight, READ_LIMIT));

        // An idle connection is not closed under its client (a mutant that
        // closes idle ones when the drain begins fails here, the listener
        // and `in_flight` having shown that it began): its next request is
        // answered, saying close, and then it ends.
        assert!(says_close(&mut asked, "/"), "a request after the drain began");
        assert!(closed_within(&mut asked, READ_LIMIT));

        // One left idle is closed at the drain deadline, and then the
        // server returns.
        drain.close_idle();
        assert!(
            closed_within(&mut idle, READ_LIMIT),
            "idle kept past the deadline"
        );
        rt.block_on(async { tokio::time::timeout(READ_LIMIT, server).await })
            .expect("serve returns once every connection ended")
            .expect("serve did not panic");
    }

    /// `serve`'s own clock: the stop starts the drain, and
    /// `drain_timeout` later the idle connections close and `serve`
    /// returns.
    #[test]
    fn serve_closes_idle_connections_at_its_drain_timeout() {
        let rt = runtime();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let hello = Hello {
            release: std::sync::Arc::new(tokio::sync::Notify::new()),
        };
        let server = rt.spawn(async move {
            HttpServer::new()
                .drain_timeout(Duration::from_millis(100))
                .serve(listener, hello, async move {
                    let _ = stopped.await;
                })
                .await;
        });
        let (mut idle, _) = kept_alive(addr);
        stop.send(()).expect("the server listens for the stop");
        assert!(
            closed_within(&mut idle, READ_LIMIT),
            "idle kept 30 s past a 100 ms drain deadline"
        );
        rt.block_on(async { tokio::time::timeout(READ_LIMIT, server).await })
            .expect("serve returns once every connection ended")
            .expect("serve did not panic");
    }

    /// hyper 1.x arms its header-read timer (default 30 s) whenever a
    /// connection waits for a request head, so it closed idle keep-alive
    /// connections with no drain, under clients that may be sending their
    /// next request. By default no timer closes them.
    #[test]
    fn idle_connections_stay_open_without_a_drain() {
        let rt = runtime();
        let drain = Drain::new();
        let (addr, _, _server) = spawn_server(&rt, HttpServer::new(), drain, Fast);
        let (mut conn, head) = kept_alive(addr);
        assert!(!head.contains("keep-alive"), "a hint of a timeout: {head}");
        // 1000 s of hyper's time: 33 times its default timeout.
        std::thread::sleep(Duration::from_secs(1));
        assert!(!says_close(&mut conn, "/"), "answered, keeping the connection");
    }

    /// An idle timeout asked for: answers carry its hint, the timer never
    /// cuts a request in flight, an idle connection is closed, and while
    /// draining the answers say close instead.
    #[test]
    fn an_idle_timeout_closes_idle_connections_only() {
        let rt = runtime();
        // 5 s of hyper's time, 5 ms of the test's: the requests are written
        // before the server starts, so that no wait for a head of theirs
        // races the timer.
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
        let mut conn = connect(listener.local_addr().expect("addr")).expect("connect");
        send(&mut conn, "/");
        send(&mut conn, "/slow");
        let release = std::sync::Arc::new(tokio::sync::Notify::new());
        let hello = Hello {
            release: release.clone(),
        };
        let server = HttpServer::new().idle_timeout(Some(Duration::from_secs(5)));
        let _server = rt.spawn(async move { server.serve_drain(listener, hello, Drain::new(), Fast).await });
        let head = read_answer(&mut conn);
        assert!(
            head.contains("keep-alive: timeout=5") && !head.contains("connection: close"),
            "{head}"
        );
        // `/slow` held for 100 s of hyper's time, twenty timeouts.
        std::thread::sleep(Duration::from_millis(100));
        release.notify_one();
        let head = read_answer(&mut conn);
        assert!(!head.contains("connection: close"), "{head}");
        assert!(
            closed_within(&mut conn, READ_LIMIT),
            "idle kept 30 s past a 5 ms timeout"
        );

        // At hyper's real pace, an hour: draining, the answer says close
        // and gives no hint.
        let drain = Drain::new();
        let server = HttpServer::new().idle_timeout(Some(Duration::from_secs(3600)));
        let (addr, _, _server) = spawn_server(&rt, server, drain.clone(), TokioTimer::new());
        let (mut conn, head) = kept_alive(addr);
        assert!(head.contains("keep-alive: timeout=3600"), "{head}");
        drain.start();
        send(&mut conn, "/");
        let head = read_answer(&mut conn);
        assert!(
            head.contains("connection: close") && !head.contains("keep-alive"),
            "{head}"
        );
    }
}
