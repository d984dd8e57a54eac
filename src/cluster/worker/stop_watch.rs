//! [`StopWatch`]: a worker's stop request, and a stop-aware accept, for
//! any thread.

use std::io;
use std::net::TcpListener;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use super::{stop_requested, POLL_SLICE};
use crate::segment::Segment;
use crate::sys;
use crate::sys::net::{accept_error, AcceptError};

/// [`Worker::should_stop`](crate::Worker::should_stop) and a stop-aware accept, from any thread: see
/// [`Worker::stop_watch`](crate::Worker::stop_watch).
#[derive(Debug, Clone)]
pub struct StopWatch {
    segment: Segment,
    slot: u32,
}

impl StopWatch {
    /// The stop watch of `slot`, known to be in `segment`.
    pub(super) fn of(segment: Segment, slot: u32) -> Self {
        Self { segment, slot }
    }

    /// The stop watch of `slot` in `segment` ([`Worker::stop_watch`](crate::Worker::stop_watch) for a
    /// worker; a slot without a master is never asked to stop but by a
    /// `SIGTERM` a [`Worker::from_env`](crate::Worker::from_env) turned into a request). `None` if
    /// the segment has no such slot.
    pub fn new(segment: &Segment, slot: u32) -> Option<Self> {
        (slot < segment.layout().workers()).then(|| Self {
            segment: segment.clone(),
            slot,
        })
    }

    /// Whether the master asked the worker to stop: drain for a reload,
    /// the cluster shutting down, or a `SIGTERM`.
    pub fn should_stop(&self) -> bool {
        stop_requested(&self.segment, self.slot)
    }

    /// Accepts one connection on the listening socket `listener` (TCP or
    /// unix: an inherited `LISTEN_FDS` descriptor, say), waiting at most
    /// `timeout` (`None`: no limit) and ending the wait when the worker is
    /// asked to stop: `Ok(None)` then, and after the timeout (tell them
    /// apart with [`StopWatch::should_stop`]). The connection is blocking
    /// and close-on-exec.
    ///
    /// **`O_NONBLOCK`:** like [`Worker::incoming`](crate::Worker::incoming) it sets the listener
    /// non-blocking, so that workers sharing a socket can race for each
    /// connection and the losers go back to waiting. The flag belongs to the
    /// open file description, not to this descriptor: every process and
    /// thread sharing the listener (every worker the master handed it to)
    /// sees it from then on. So all workers on a shared listener should
    /// accept through this (or [`Worker::incoming`](crate::Worker::incoming)), or handle `EAGAIN`
    /// from their own `accept(2)`.
    ///
    /// **Transient errors** do not end the wait: the network errors
    /// `accept(2)` documents as pending errors of the new connection
    /// (`ECONNABORTED`, `EPROTO`, `ENETDOWN`, `ENOPROTOOPT`, `EHOSTDOWN`,
    /// `ENONET`, `EHOSTUNREACH`, `EOPNOTSUPP`, `ENETUNREACH`) are retried at
    /// once; running out of descriptors or memory (`EMFILE`, `ENFILE`,
    /// `ENOBUFS`, `ENOMEM`) pauses 10 ms, doubling up to 100 ms, before the
    /// next try (the connection stays queued meanwhile).
    ///
    /// **Heartbeat:** it does not beat the worker's heartbeat. It may run on
    /// any thread, and a beat from there would hide a hung messenger thread
    /// from the master's hang detection; the heartbeat stays with the
    /// messenger's receive calls (the thread that owns the [`Worker`](crate::Worker)), as
    /// [`Worker::incoming`](crate::Worker::incoming), which runs on that thread, beats it.
    ///
    /// # Errors
    /// `listener` is not a listening TCP or unix socket, or `accept(2)`
    /// failed with an error that is not transient (above).
    pub fn accept(&self, listener: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<Option<OwnedFd>> {
        enum Socket {
            Tcp(TcpListener),
            Unix(std::os::unix::net::UnixListener),
        }
        let copy = listener.try_clone_to_owned()?;
        let socket = match sys::net::local_addr(listener)? {
            sys::net::LocalAddr::Inet(_) => Socket::Tcp(TcpListener::from(copy)),
            sys::net::LocalAddr::UnixPath(_) | sys::net::LocalAddr::UnixOther => {
                Socket::Unix(std::os::unix::net::UnixListener::from(copy))
            }
            sys::net::LocalAddr::Other(family) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("not a TCP or unix socket (address family {family})"),
                ))
            }
        };
        match &socket {
            Socket::Tcp(l) => l.set_nonblocking(true)?,
            Socket::Unix(l) => l.set_nonblocking(true)?,
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut pause = ACCEPT_BACKOFF_MIN;
        loop {
            if self.should_stop() {
                return Ok(None);
            }
            let accepted = match &socket {
                Socket::Tcp(l) => l.accept().map(|(s, _)| OwnedFd::from(s)),
                Socket::Unix(l) => l.accept().map(|(s, _)| OwnedFd::from(s)),
            };
            let mut stopped = false;
            let backoff = match accepted {
                Ok(conn) => return Ok(Some(conn)),
                // Stopped by the master: wait for the stop or the time.
                Err(e) if sys::net::stopped_listening(&e, listener) => {
                    stopped = true;
                    false
                }
                Err(e) => match accept_error(&e) {
                    AcceptError::Retry => {
                        pause = ACCEPT_BACKOFF_MIN;
                        false
                    }
                    AcceptError::BackOff => true,
                    AcceptError::Fail => return Err(e),
                },
            };
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left,
                    _ => return Ok(None),
                },
                None => Duration::MAX,
            };
            if stopped {
                // poll(2) would not wait on a socket that stopped listening.
                std::thread::sleep(left.min(POLL_SLICE));
            } else if backoff {
                // The connection stays queued (the listener stays readable):
                // wait for a descriptor or memory to be freed, not for poll.
                std::thread::sleep(left.min(pause));
                pause = (pause * 2).min(ACCEPT_BACKOFF_MAX);
            } else {
                sys::fd::poll_readable(&[listener], Some(left.min(POLL_SLICE)))?;
            }
        }
    }
}

/// The first pause after `accept(2)` ran out of descriptors or memory.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The longest pause: the wait still ends soon after a stop request.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::table::STOP_DRAIN;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::os::fd::AsFd;
    use std::sync::atomic::Ordering::{Relaxed, Release};

    /// `StopWatch::accept`: a connection, a timeout, and the wait ended by
    /// the master's drain word (set here as the master would).
    #[test]
    fn stop_watch_accepts_until_the_drain() {
        let segment = Segment::create(&crate::Config::new(2)).expect("segment");
        assert!(StopWatch::new(&segment, 2).is_none(), "no slot 2");
        let watch = StopWatch::new(&segment, 1).expect("slot 1");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");

        let waited = watch.accept(listener.as_fd(), Some(Duration::from_millis(30)));
        assert!(
            waited.expect("no error").is_none(),
            "nothing to accept: timed out"
        );
        assert!(!watch.should_stop());

        let mut client = TcpStream::connect(addr).expect("connect");
        let conn = watch
            .accept(listener.as_fd(), Some(Duration::from_secs(10)))
            .expect("accept")
            .expect("a connection");
        let mut conn = TcpStream::from(conn);
        client.write_all(b"hi").expect("write");
        let mut buf = [0u8; 2];
        conn.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"hi");

        // Without a limit: only the drain ends it (a watchdog of 20 s fails
        // the test instead of hanging it).
        let (done, ended) = std::sync::mpsc::channel();
        {
            let watch = watch.clone();
            let fd = listener.as_fd().try_clone_to_owned().expect("dup");
            std::thread::spawn(move || {
                let _ = done.send(watch.accept(fd.as_fd(), None).map(|c| c.is_some()));
            });
        }
        std::thread::sleep(Duration::from_millis(100));
        segment.worker_entry(1).stop.store(STOP_DRAIN, Release);
        let ended = ended
            .recv_timeout(Duration::from_secs(20))
            .expect("the drain ended the accept");
        assert!(
            !ended.expect("no error"),
            "no connection: the drain ended the wait"
        );
        assert!(watch.should_stop());
    }

    /// A listener the master stopped (a binary upgrade's surplus socket)
    /// is not an error: the accept waits for the stop or its time, so the
    /// worker keeps serving what it has; no busy loop.
    #[test]
    fn stop_watch_accept_waits_on_a_stopped_listener() {
        let segment = Segment::create(&crate::Config::new(1)).expect("segment");
        let watch = StopWatch::new(&segment, 0).expect("slot 0");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        sys::net::stop_listening(listener.as_fd()).expect("shutdown");
        let start = Instant::now();
        let waited = watch.accept(listener.as_fd(), Some(POLL_SLICE * 2));
        assert!(waited.expect("not an error").is_none(), "timed out");
        assert!(start.elapsed() >= POLL_SLICE * 2);
        segment.worker_entry(0).stop.store(STOP_DRAIN, Release);
        assert!(watch
            .accept(listener.as_fd(), None)
            .expect("not an error")
            .is_none());
    }

    /// `StopWatch::accept` may run on any thread (the C ABI's, Python's):
    /// it does not beat the worker's heartbeat, which stays the messenger's
    /// (a hung messenger thread must still be seen as hung).
    #[test]
    fn stop_watch_accept_does_not_beat_the_heartbeat() {
        let segment = Segment::create(&crate::Config::new(1)).expect("segment");
        let watch = StopWatch::new(&segment, 0).expect("slot 0");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let hb = &segment.worker_entry(0).heartbeat;
        let before = hb.load(Relaxed);
        // Several poll slices: each used to beat.
        let waited = watch.accept(listener.as_fd(), Some(POLL_SLICE * 4));
        assert!(waited.expect("no error").is_none(), "timed out");
        assert_eq!(hb.load(Relaxed), before, "the heartbeat did not move");
    }
}
