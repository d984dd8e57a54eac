//! Graceful HTTP/1.1 drain for async servers on the cluster (feature
//! `http`): a worker told to stop — a rolling reload or a shutdown — loses
//! no request, on a client that never retries.
//!
//! A keep-alive connection is a race: the client may send its next request
//! at the very moment the server closes the connection as idle. That
//! request is lost — the client sees the connection reset or closed with no
//! answer, and cannot know whether a `POST` was applied. Closing idle
//! connections at once, as `axum::serve(..).with_graceful_shutdown(..)` and
//! hyper's `graceful_shutdown` do, loses requests on every reload under
//! load. So a draining server here:
//!
//! 1. stops accepting (with a shared listening socket the other workers,
//!    or the replacement, take the new connections);
//! 2. finishes every request in flight;
//! 3. answers the next request on each open connection with
//!    `Connection: close`, then closes that connection (RFC 9112 §9.6):
//!    the client learns from the answer itself not to reuse it, so no
//!    request of its is ever on its way into a closing connection;
//! 4. closes a connection that stayed idle all along only at the drain
//!    deadline ([`HttpServer::drain_timeout`]), which should come before
//!    the master's own ([`crate::ClusterBuilder::drain_timeout`]), when
//!    the master kills the worker.
//!
//! [`HttpServer::serve`] does all of this for any hyper or tower service
//! (an axum `Router` is one). A server with its own accept loop gets the
//! same from its parts: a [`Drain`] that says where the drain is, and
//! [`CloseWhenDraining`], a tower layer that adds `Connection: close` to
//! every answer made while draining (hyper's HTTP/1.1 connection closes
//! after an answer that carries it).
//!
//! # Example
//!
//! ```no_run
//! use std::convert::Infallible;
//! use std::future::{ready, Ready};
//! use std::task::{Context, Poll};
//! use std::time::Duration;
//!
//! use http::{Request, Response};
//! use hyper::body::Incoming;
//! use shmcluster::http::HttpServer;
//! use shmcluster::{Cluster, Messenger};
//!
//! /// Any tower service that is `Clone` will do: an axum `Router` is one.
//! #[derive(Clone)]
//! struct Hello;
//!
//! impl tower_service::Service<Request<Incoming>> for Hello {
//!     type Response = Response<String>;
//!     type Error = Infallible;
//!     type Future = Ready<Result<Response<String>, Infallible>>;
//!
//!     fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
//!         Poll::Ready(Ok(()))
//!     }
//!
//!     fn call(&mut self, _: Request<Incoming>) -> Self::Future {
//!         ready(Ok(Response::new("hello\n".into())))
//!     }
//! }
//!
//! Cluster::builder()
//!     .listen("127.0.0.1:8080")
//!     .drain_timeout(Duration::from_secs(10))
//!     .run(|mut worker| -> std::io::Result<()> {
//!         let listener = worker.take_listeners().remove(0);
//!         let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//!         rt.block_on(async {
//!             let listener = listener.into_tokio_tcp()?;
//!             let am = Messenger::new(worker).into_async();
//!             am.ready();
//!             let stopping = am.clone();
//!             HttpServer::new()
//!                 // Before the master's 10 s, when it kills the worker.
//!                 .drain_timeout(Duration::from_secs(8))
//!                 .serve(listener, Hello, async move { stopping.stopped().await })
//!                 .await;
//!             Ok(())
//!         })
//!     })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! HTTP/1.1 only (the cluster's examples and tests speak it); a request
//! carrying `Upgrade` is answered but never upgraded.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderValue, CONNECTION};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

type BoxError = Box<dyn StdError + Send + Sync>;

/// The default of [`HttpServer::drain_timeout`].
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a server is in its drain. A clone follows the same drain.
///
/// Phases, in order (each only moves forward):
///
/// | phase | set by | connections |
/// |---|---|---|
/// | serving | [`Drain::new`] | kept alive |
/// | draining | [`Drain::start`] | no new ones; each open one answers its next request with `Connection: close` and ends |
/// | closing | [`Drain::close_idle`] | those still idle are closed; a request in flight is answered first |
#[derive(Clone)]
pub struct Drain {
    phase: watch::Sender<Phase>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Serving,
    Draining,
    Closing,
}

impl Drain {
    /// A drain not started: serving.
    pub fn new() -> Self {
        Self {
            phase: watch::Sender::new(Phase::Serving),
        }
    }

    /// Starts draining (nothing if it has started already).
    pub fn start(&self) {
        self.advance(Phase::Draining);
    }

    /// The drain deadline: idle connections are to close now. Implies
    /// [`Drain::start`].
    pub fn close_idle(&self) {
        self.advance(Phase::Closing);
    }

    fn advance(&self, to: Phase) {
        self.phase.send_if_modified(|phase| {
            let later = *phase < to;
            if later {
                *phase = to;
            }
            later
        });
    }

    /// Whether the drain has started: every answer made now carries
    /// `Connection: close`.
    pub fn is_draining(&self) -> bool {
        *self.phase.borrow() >= Phase::Draining
    }

    /// Whether the drain deadline has come.
    pub fn is_closing(&self) -> bool {
        *self.phase.borrow() >= Phase::Closing
    }

    /// Resolves once the drain has started.
    pub async fn draining(&self) {
        self.reached(Phase::Draining).await;
    }

    /// Resolves once the drain deadline has come.
    pub async fn closing(&self) {
        self.reached(Phase::Closing).await;
    }

    async fn reached(&self, phase: Phase) {
        let mut rx = self.phase.subscribe();
        // Never an error: `self` holds the sender.
        let _ = rx.wait_for(|p| *p >= phase).await;
    }

    /// Adds `Connection: close` to `response` if the drain has started.
    pub fn mark<B>(&self, response: &mut Response<B>) {
        if self.is_draining() {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
    }
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Drain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Drain")
            .field("phase", &*self.phase.borrow())
            .finish()
    }
}

/// A tower service (and, as a [`tower_layer::Layer`], the layer that makes
/// it) that adds `Connection: close` to every answer its inner service
/// makes once `drain` has started, so that hyper closes each connection
/// right after its next answer. For a server with its own accept loop;
/// [`HttpServer::serve`] applies it itself.
///
/// With axum: `router.layer(CloseWhenDraining::layer(drain.clone()))`.
#[derive(Debug, Clone)]
pub struct CloseWhenDraining<S> {
    inner: S,
    drain: Drain,
}

impl CloseWhenDraining<()> {
    /// The layer that wraps a service in [`CloseWhenDraining`].
    pub fn layer(drain: Drain) -> CloseWhenDrainingLayer {
        CloseWhenDrainingLayer { drain }
    }
}

impl<S> CloseWhenDraining<S> {
    /// `inner`, with `Connection: close` on its answers once `drain` has
    /// started.
    pub fn new(inner: S, drain: Drain) -> Self {
        Self { inner, drain }
    }
}

/// The layer of [`CloseWhenDraining`] (see [`CloseWhenDraining::layer`]).
#[derive(Debug, Clone)]
pub struct CloseWhenDrainingLayer {
    drain: Drain,
}

impl<S> tower_layer::Layer<S> for CloseWhenDrainingLayer {
    type Service = CloseWhenDraining<S>;

    fn layer(&self, inner: S) -> CloseWhenDraining<S> {
        CloseWhenDraining::new(inner, self.drain.clone())
    }
}

impl<S, Req, B> tower_service::Service<Req> for CloseWhenDraining<S>
where
    S: tower_service::Service<Req, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let answer = self.inner.call(request);
        let drain = self.drain.clone();
        Box::pin(async move {
            let mut response = answer.await?;
            // Looked at when the answer is ready, not when the request
            // came: a request that was in flight when the drain began is
            // the connection's last as well.
            drain.mark(&mut response);
            Ok(response)
        })
    }
}

/// Serves HTTP/1.1 on a listener with a graceful drain (see the module
/// docs).
#[derive(Debug, Clone)]
pub struct HttpServer {
    drain_timeout: Duration,
    nodelay: bool,
    header_read_timeout: Option<Duration>,
}

impl Default for HttpServer {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpServer {
    /// Defaults: [`DEFAULT_DRAIN_TIMEOUT`], `TCP_NODELAY` on, 30 s to read
    /// a request's head.
    pub fn new() -> Self {
        Self {
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            nodelay: true,
            header_read_timeout: Some(Duration::from_secs(30)),
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

    /// How long a connection may take to send a request's head once it
    /// started one (`None`: no limit). Default 30 s.
    pub fn header_read_timeout(mut self, d: Option<Duration>) -> Self {
        self.header_read_timeout = d;
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
    /// malformed request, a head not read in time) ends only that one.
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
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout);
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
                        connections.spawn(connection(builder.clone(), stream, service.clone(), drain.clone()));
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
        clock.abort();
    }
}

/// One connection until it ends: its idle time cut short at the drain
/// deadline, the rest by the `Connection: close` of its last answer.
async fn connection<S, B>(
    builder: hyper::server::conn::http1::Builder,
    stream: TcpStream,
    service: S,
    drain: Drain,
) where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let hyper = Hyper {
        service,
        drain: drain.clone(),
    };
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
        // A client gone mid-request, a malformed request, a timeout: the
        // connection's own business.
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// A tower service as hyper's service (hyper calls `&self`; tower's
/// `call` takes `&mut self` after `poll_ready`), its answers marked as
/// [`CloseWhenDraining`] does (one future per request, not two).
struct Hyper<S> {
    service: S,
    drain: Drain,
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
        Box::pin(async move {
            std::future::poll_fn(|cx| service.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            let mut response = service.call(request).await.map_err(Into::into)?;
            // As in `CloseWhenDraining`: looked at when the answer is
            // ready.
            drain.mark(&mut response);
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
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream as StdStream;

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

    /// A blocking client connection with a 5 s read limit.
    fn connect(addr: std::net::SocketAddr) -> io::Result<StdStream> {
        let conn = StdStream::connect(addr)?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
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
            let n = conn.read(&mut buf).expect("an answer within 5 s");
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
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        closed
    }

    #[test]
    fn a_drain_loses_no_request() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let release = std::sync::Arc::new(tokio::sync::Notify::new());
        let hello = Hello {
            release: release.clone(),
        };
        let server = rt.spawn(async move {
            HttpServer::new()
                .drain_timeout(Duration::from_millis(500))
                .serve(listener, hello, async move {
                    let _ = stopped.await;
                })
                .await;
        });
        // Three keep-alive connections, each with one answer behind it.
        let mut conns = Vec::new();
        for _ in 0..3 {
            let mut conn = connect(addr).expect("connect");
            send(&mut conn, "/");
            let head = read_answer(&mut conn);
            assert!(head.starts_with("http/1.1 200"), "{head}");
            assert!(!head.contains("connection: close"), "before the drain: {head}");
            conns.push(conn);
        }
        let [mut in_flight, mut asked, mut idle] = <[StdStream; 3]>::try_from(conns).expect("three");
        send(&mut in_flight, "/slow");
        stop.send(()).expect("the server listens for the stop");
        // The drain has begun once the listener is closed: no more
        // accepting.
        let asked_at = std::time::Instant::now();
        while StdStream::connect(addr).is_ok() {
            assert!(
                asked_at.elapsed() < Duration::from_secs(5),
                "still accepting 5 s after the stop"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        release.notify_one();

        // The request in flight is answered, as the connection's last.
        let head = read_answer(&mut in_flight);
        assert!(
            head.starts_with("http/1.1 200") && head.contains("connection: close"),
            "{head}"
        );
        assert!(closed_within(&mut in_flight, Duration::from_secs(5)));

        // An idle connection is not closed under its client: its next
        // request is answered, saying close, and then it ends.
        assert!(
            !closed_within(&mut asked, Duration::from_millis(50)),
            "closed while idle"
        );
        send(&mut asked, "/");
        let head = read_answer(&mut asked);
        assert!(
            head.starts_with("http/1.1 200") && head.contains("connection: close"),
            "{head}"
        );
        assert!(closed_within(&mut asked, Duration::from_secs(5)));

        // One left idle is closed at the drain deadline, and then the
        // server returns.
        assert!(
            closed_within(&mut idle, Duration::from_secs(5)),
            "idle kept past the deadline"
        );
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), server).await })
            .expect("serve returns once every connection ended")
            .expect("serve did not panic");
    }

    #[test]
    fn drain_phases_only_move_forward() {
        let drain = Drain::new();
        assert!(!drain.is_draining() && !drain.is_closing());
        drain.close_idle();
        assert!(drain.is_draining() && drain.is_closing());
        drain.start();
        assert!(drain.is_closing(), "start after close_idle went back");
    }

    #[test]
    fn answers_made_while_draining_say_close() {
        let drain = Drain::new();
        let mut before = Response::new(());
        drain.mark(&mut before);
        assert!(before.headers().get(CONNECTION).is_none());
        drain.start();
        let mut after = Response::new(());
        drain.mark(&mut after);
        assert_eq!(
            after.headers().get(CONNECTION).map(|v| v.as_bytes()),
            Some(&b"close"[..])
        );
    }
}
