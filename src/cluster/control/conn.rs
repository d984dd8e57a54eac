//! One client connection of the control socket: reading its request line,
//! then writing the response (and, for `wait`, staying open until the
//! master ends). Non-blocking throughout: every step goes as far as the
//! socket allows and returns.

use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::codec::{self, ControlRequest, MAX_REQUEST};
use crate::sys;

/// What the server makes of a request line.
#[derive(Debug)]
pub(crate) enum Reply {
    /// This response, then the connection is closed.
    Close(String),
    /// This response, then the connection is kept open (`wait`): the
    /// master's outcome is written on it at exit.
    Wait(String),
    /// The master must answer this request: the connection waits for
    /// [`Conn::answer`].
    Ask(ControlRequest),
}

pub(crate) struct Conn {
    pub(super) stream: UnixStream,
    input: Vec<u8>,
    /// The response and how much of it is written.
    pub(super) output: Option<(Vec<u8>, usize)>,
    /// When the client must have sent its request and taken the response;
    /// none for a `wait` connection once answered.
    pub(super) deadline: Option<Instant>,
    /// A `wait` connection: kept open until the server's `finish`.
    pub(super) waiting: bool,
    /// The request handed to the master, not answered yet.
    pub(super) asking: Option<ControlRequest>,
    /// An `upgrade` connection: kept open (as `waiting`) until the
    /// upgrade ends, then told how and closed.
    pub(super) upgrade: bool,
}

impl Conn {
    /// A new connection that must send its request and take the response
    /// by `deadline`.
    pub(super) fn new(stream: UnixStream, deadline: Instant) -> Self {
        Self {
            stream,
            input: Vec::new(),
            output: None,
            deadline: Some(deadline),
            waiting: false,
            asking: None,
            upgrade: false,
        }
    }

    /// Sets the response to the request the master was asked (see
    /// [`Reply::Ask`]); [`Conn::advance`] writes it.
    pub(super) fn answer(&mut self, text: String) {
        self.asking = None;
        self.output = Some((text.into_bytes(), 0));
    }

    /// Puts `line` after what is still to be written (the rest of `ok
    /// waiting`, say), for a held connection's last word.
    pub(super) fn append(&mut self, line: &str) {
        let mut bytes = self
            .output
            .take()
            .map_or_else(Vec::new, |(out, pos)| out.get(pos..).unwrap_or_default().to_vec());
        bytes.extend_from_slice(line.as_bytes());
        self.output = Some((bytes, 0));
    }

    /// Reads and answers as far as the socket allows without blocking;
    /// `false` once the connection is finished (answered, broken, or too
    /// slow) and should be closed.
    pub(super) fn advance(&mut self, now: Instant, reply: &mut dyn FnMut(&[u8]) -> Reply) -> bool {
        if self.deadline.is_some_and(|d| now >= d) {
            return false;
        }
        if self.asking.is_some() {
            return true;
        }
        if self.output.is_none() {
            let line = match self.read_line() {
                Ok(Some(line)) => line,
                Ok(None) => return true,
                Err(()) => return false,
            };
            let reply = match line {
                Some(line) => reply(&line),
                None => Reply::Close(codec::too_long()),
            };
            let text = match reply {
                Reply::Close(text) => text,
                Reply::Wait(text) => {
                    self.waiting = true;
                    self.deadline = None;
                    text
                }
                Reply::Ask(request) => {
                    self.asking = Some(request);
                    return true;
                }
            };
            self.output = Some((text.into_bytes(), 0));
        }
        let Some((out, pos)) = self.output.as_mut() else {
            return false;
        };
        while *pos < out.len() {
            match sys::net::send_with_fd(self.stream.as_fd(), &out[*pos..], None) {
                Ok(0) => return false,
                Ok(n) => *pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(_) => return false,
            }
        }
        if self.waiting {
            return self.still_there();
        }
        // Closing a unix socket with unread bytes makes the peer's read fail
        // with ECONNRESET, losing the response: discard a little of what
        // is left (a request that was too long, say) first.
        let mut rest = [0u8; MAX_REQUEST];
        for _ in 0..16 {
            if !matches!(self.stream.read(&mut rest), Ok(n) if n > 0) {
                break;
            }
        }
        false
    }

    /// Whether the client of a `wait` connection is still connected
    /// (anything it sends is discarded; its hang-up frees the connection).
    fn still_there(&mut self) -> bool {
        let mut scratch = [0u8; MAX_REQUEST];
        for _ in 0..16 {
            match self.stream.read(&mut scratch) {
                Ok(0) => return false,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// `Ok(None)`: no full line yet. `Ok(Some(None))`: over the size
    /// limit. `Ok(Some(Some(line)))`: a request (a final line without a
    /// newline counts). `Err`: the peer left without asking anything.
    #[allow(clippy::type_complexity)]
    fn read_line(&mut self) -> Result<Option<Option<Vec<u8>>>, ()> {
        let mut chunk = [0u8; MAX_REQUEST];
        loop {
            if let Some(end) = self.input.iter().position(|&b| b == b'\n') {
                return Ok(Some(Some(self.input[..end].to_vec())));
            }
            if self.input.len() >= MAX_REQUEST {
                return Ok(Some(None));
            }
            let room = MAX_REQUEST - self.input.len();
            match self.stream.read(&mut chunk[..room]) {
                Ok(0) if self.input.is_empty() => return Err(()),
                Ok(0) => return Ok(Some(Some(std::mem::take(&mut self.input)))),
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Err(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::super::REQUEST_TIMEOUT;
    use super::*;

    /// A client's end, and the master's [`Conn`] on the other, non-blocking.
    fn connected(deadline: Instant) -> (UnixStream, Conn) {
        let (client, server) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        (client, Conn::new(server, deadline))
    }

    #[test]
    fn a_connection_is_answered_once_and_a_long_request_refused() {
        let now = Instant::now();
        let (mut client, mut conn) = connected(now + REQUEST_TIMEOUT);
        let mut seen = Vec::new();
        let mut answer = |line: &[u8]| {
            seen.push(line.to_vec());
            Reply::Close("ok\n".to_string())
        };
        assert!(conn.advance(now, &mut answer), "nothing sent yet");
        client.write_all(b"pi").unwrap();
        assert!(conn.advance(now, &mut answer), "half a line");
        client.write_all(b"ng\nextra").unwrap();
        assert!(!conn.advance(now, &mut answer), "answered: close");
        let mut got = String::new();
        drop(conn);
        client.read_to_string(&mut got).unwrap();
        assert_eq!(got, "ok\n");
        assert_eq!(seen, vec![b"ping".to_vec()]);

        let (mut client, mut conn) = connected(now + REQUEST_TIMEOUT);
        client.write_all(&[b'x'; MAX_REQUEST + 10]).unwrap();
        assert!(!conn.advance(now, &mut |_| unreachable!()));
        drop(conn);
        let mut got = String::new();
        client.read_to_string(&mut got).unwrap();
        assert!(got.starts_with("err request longer"), "{got}");

        // A silent client is dropped at its deadline.
        let (_client, mut conn) = connected(now);
        assert!(!conn.advance(now, &mut |_| unreachable!()));
    }

    #[test]
    fn a_wait_connection_stays_open_and_a_hang_up_frees_it() {
        let now = Instant::now();
        let (mut client, mut conn) = connected(now + REQUEST_TIMEOUT);
        client.write_all(b"wait\n").unwrap();
        let mut answer = |_: &[u8]| Reply::Wait("ok waiting\n".into());
        assert!(conn.advance(now, &mut answer), "answered, and kept open");
        assert!(conn.waiting && conn.deadline.is_none());
        let later = now + 10 * REQUEST_TIMEOUT;
        assert!(conn.advance(later, &mut answer), "no deadline while waiting");
        let mut got = [0u8; 11];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ok waiting\n");
        drop(client);
        assert!(!conn.advance(later, &mut answer), "the client hung up");
    }

    /// A request for the master waits for its answer, then is written and
    /// closed like any other.
    #[test]
    fn a_request_for_the_master_waits_for_its_answer() {
        let now = Instant::now();
        let (mut client, mut conn) = connected(now + REQUEST_TIMEOUT);
        client.write_all(b"stop\n").unwrap();
        let mut ask = |_: &[u8]| Reply::Ask(ControlRequest::Stop);
        assert!(conn.advance(now, &mut ask), "asked: kept open");
        assert_eq!(conn.asking, Some(ControlRequest::Stop));
        assert!(conn.advance(now, &mut |_| unreachable!()), "still asking");
        conn.answer("ok shutdown started\n".into());
        assert!(!conn.advance(now, &mut |_| unreachable!()), "answered: close");
        drop(conn);
        let mut got = String::new();
        client.read_to_string(&mut got).unwrap();
        assert_eq!(got, "ok shutdown started\n");
    }
}
