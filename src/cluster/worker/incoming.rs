//! [`Incoming`]: a worker's accept loop that ends when it is told to stop.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;

use super::{Worker, POLL_SLICE};
use crate::sys;

/// Connections accepted until the worker is told to stop: see
/// [`Worker::incoming`].
#[derive(Debug)]
pub struct Incoming<'a> {
    worker: &'a Worker,
    listener: &'a TcpListener,
    nonblocking: bool,
}

impl<'a> Incoming<'a> {
    pub(super) fn new(worker: &'a Worker, listener: &'a TcpListener) -> Self {
        Self {
            worker,
            listener,
            nonblocking: false,
        }
    }
}

impl Iterator for Incoming<'_> {
    type Item = io::Result<TcpStream>;

    fn next(&mut self) -> Option<Self::Item> {
        if !self.nonblocking {
            if let Err(e) = self.listener.set_nonblocking(true) {
                return Some(Err(e));
            }
            self.nonblocking = true;
        }
        loop {
            if self.worker.should_stop() {
                return None;
            }
            let mut stopped = false;
            match self.listener.accept() {
                Ok((stream, _)) => return Some(Ok(stream)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                }
                // Stopped by the master (a binary upgrade's surplus
                // socket): nothing will come; wait for the stop, serving
                // the connections in hand.
                Err(e) if sys::net::stopped_listening(&e, self.listener.as_fd()) => stopped = true,
                Err(e) => return Some(Err(e)),
            }
            self.worker.heartbeat();
            if stopped {
                // poll(2) would not wait on a socket that stopped listening.
                std::thread::sleep(POLL_SLICE);
            } else if let Err(e) = sys::fd::poll_readable(&[self.listener.as_fd()], Some(POLL_SLICE)) {
                return Some(Err(e));
            }
        }
    }
}
