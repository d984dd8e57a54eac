//! [`Drain`]: where a server is in its drain; [`CloseWhenDraining`]: the
//! tower layer that says `Connection: close` once it drains.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::header::{HeaderValue, CONNECTION};
use http::Response;
use tokio::sync::watch;

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
/// [`HttpServer::serve`](super::HttpServer::serve) applies it itself.
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

#[cfg(test)]
mod tests {
    use super::*;

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
