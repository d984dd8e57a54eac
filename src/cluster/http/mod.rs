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
//! Outside a drain, nothing but its client closes an idle keep-alive
//! connection: hyper 1.x's header-read timeout (30 s by default) also runs
//! while a kept-alive connection waits for its next request, so it would
//! close idle connections under their clients, drain or not; it is off
//! here unless asked for with [`HttpServer::idle_timeout`], which says
//! what that costs.
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

//!
//! Where things are: `drain.rs` holds [`Drain`] and [`CloseWhenDraining`]
//! (the parts, for a server with its own accept loop); `server.rs`
//! [`HttpServer`], which puts them to work.

use std::time::Duration;

mod drain;
mod server;

pub use drain::{CloseWhenDraining, CloseWhenDrainingLayer, Drain};
pub use server::HttpServer;

/// The default of [`HttpServer::drain_timeout`].
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
