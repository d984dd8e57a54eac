//! A worker's run-time request for a listener, over its control socket to
//! the master (a `SOCK_SEQPACKET` pair): the wire format, and the worker's
//! side ([`request_listener`]). The master's side is
//! [`Listeners::serve_request`].

use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{ListenAddr, ListenError, ListenMode, Listener};
use crate::sys;
use crate::sys::net;

//
//   request  = 'L' id:u32le mode kind addr
//              mode = 'S' (Shared) | 'R' (ReusePort)
//              kind = 'T' addr = a socket address in text ("1.2.3.4:80",
//                              "[::1]:80"), never a host name: the master
//                              does not resolve names
//                   | 'U' addr = the path's bytes (not empty, no NUL)
//   reply    = 'O' id:u32le              with the descriptor (SCM_RIGHTS)
//            | 'E' id:u32le errno:i32le text (UTF-8; errno 0: not a bind
//                                             error)
//
// The id lets a worker drop a late reply to a request it gave up on.
// A request the master cannot read gets an 'E' reply with id 0, which no
// request uses.

/// The first byte of a listener request on a worker's control socket.
pub(crate) const REQUEST_TAG: u8 = b'L';

/// The longest request: header, and a path of up to `PATH_MAX` bytes.
pub(crate) const MAX_REQUEST_LEN: usize = 7 + 4096;

/// The longest reply (error text is cut to fit).
const MAX_REPLY_LEN: usize = 9 + 1024;

/// Request ids, never 0.
static NEXT_REQUEST_ID: AtomicU32 = AtomicU32::new(1);

/// A decoded request.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Request {
    pub(super) id: u32,
    pub(super) mode: ListenMode,
    pub(super) addr: ListenAddr,
}

fn encode_request(id: u32, addr: &ListenAddr, mode: ListenMode) -> Vec<u8> {
    let mut msg = vec![REQUEST_TAG];
    msg.extend_from_slice(&id.to_le_bytes());
    msg.push(match mode {
        ListenMode::Shared => b'S',
        ListenMode::ReusePort => b'R',
    });
    match addr {
        ListenAddr::Tcp(tcp) => {
            msg.push(b'T');
            msg.extend_from_slice(tcp.to_string().as_bytes());
        }
        ListenAddr::Unix(path) => {
            msg.push(b'U');
            msg.extend_from_slice(path.as_os_str().as_bytes());
        }
    }
    msg
}

/// Decodes a request, or gives the id to reply to (0 if unreadable) and
/// what is wrong with it.
pub(super) fn decode_request(msg: &[u8]) -> Result<Request, (u32, String)> {
    let [tag, i0, i1, i2, i3, mode, kind, addr @ ..] = msg else {
        return Err((0, format!("request too short ({} bytes)", msg.len())));
    };
    if *tag != REQUEST_TAG {
        return Err((0, format!("unknown request type {tag:#04x}")));
    }
    let id = u32::from_le_bytes([*i0, *i1, *i2, *i3]);
    let bad = |reason: String| Err((id, reason));
    if msg.len() > MAX_REQUEST_LEN {
        return bad(format!("request too long (over {MAX_REQUEST_LEN} bytes)"));
    }
    let mode = match mode {
        b'S' => ListenMode::Shared,
        b'R' => ListenMode::ReusePort,
        other => return bad(format!("unknown listen mode {other:#04x}")),
    };
    let addr = match kind {
        b'T' => match std::str::from_utf8(addr).ok().and_then(|s| s.parse().ok()) {
            Some(tcp) => ListenAddr::Tcp(tcp),
            None => return bad("malformed TCP address".to_owned()),
        },
        b'U' if addr.is_empty() || addr.contains(&0) => return bad("malformed unix path".to_owned()),
        b'U' => ListenAddr::Unix(PathBuf::from(std::ffi::OsStr::from_bytes(addr))),
        other => return bad(format!("unknown address kind {other:#04x}")),
    };
    Ok(Request { id, mode, addr })
}

pub(super) fn encode_ok(id: u32) -> Vec<u8> {
    let mut msg = vec![b'O'];
    msg.extend_from_slice(&id.to_le_bytes());
    msg
}

pub(super) fn encode_error(id: u32, errno: i32, text: &str) -> Vec<u8> {
    let mut msg = vec![b'E'];
    msg.extend_from_slice(&id.to_le_bytes());
    msg.extend_from_slice(&errno.to_le_bytes());
    let mut end = text.len().min(MAX_REPLY_LEN - msg.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    msg.extend_from_slice(&text.as_bytes()[..end]);
    msg
}

/// A decoded reply: its id, and `Ok` or the errno and text.
type Reply = (u32, Result<(), (i32, String)>);

fn decode_reply(msg: &[u8]) -> Option<Reply> {
    match msg {
        [b'O', i0, i1, i2, i3] => Some((u32::from_le_bytes([*i0, *i1, *i2, *i3]), Ok(()))),
        [b'E', i0, i1, i2, i3, e0, e1, e2, e3, text @ ..] => Some((
            u32::from_le_bytes([*i0, *i1, *i2, *i3]),
            Err((
                i32::from_le_bytes([*e0, *e1, *e2, *e3]),
                String::from_utf8_lossy(text).into_owned(),
            )),
        )),
        _ => None,
    }
}

/// The worker's side of a run-time request: asks the master, over the
/// worker's control socket `sock`, for a listener on `addr` and waits up to
/// `timeout` for the reply carrying it. The caller must be the only reader
/// of `sock` meanwhile. A late reply to an earlier request that timed out
/// is recognised by its id and dropped.
///
/// # Errors
/// [`ListenError::ReusePortUnix`] at once for `ReusePort` on a unix path;
/// [`ListenError::Bind`] if the master could not bind the address;
/// [`ListenError::Request`] on a timeout, a closed control socket, a
/// malformed reply or another refusal; [`ListenError::Io`] if the socket
/// fails.
pub(crate) fn request_listener(
    sock: BorrowedFd<'_>,
    addr: &ListenAddr,
    mode: ListenMode,
    timeout: Duration,
) -> Result<Listener, ListenError> {
    if let (ListenAddr::Unix(path), ListenMode::ReusePort) = (addr, mode) {
        return Err(ListenError::ReusePortUnix { path: path.clone() });
    }
    let id = loop {
        let id = NEXT_REQUEST_ID.fetch_add(1, Ordering::Relaxed);
        if id != 0 {
            break id;
        }
    };
    let msg = encode_request(id, addr, mode);
    if msg.len() > MAX_REQUEST_LEN {
        return Err(ListenError::Request {
            reason: format!("address too long: {addr}"),
        });
    }
    net::send_with_fd(sock, &msg, None)?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; MAX_REPLY_LEN + 1];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if !sys::fd::poll_readable(&[sock], Some(left))?[0] {
            return Err(ListenError::Request {
                reason: format!("no reply for {addr} within {timeout:?}"),
            });
        }
        let (len, fd) = net::recv_with_fd(sock, &mut buf)?;
        if len == 0 && fd.is_none() {
            return Err(ListenError::Request {
                reason: "the master closed the control socket".to_owned(),
            });
        }
        match decode_reply(&buf[..len.min(MAX_REPLY_LEN)]) {
            // A late reply to an earlier request: its descriptor closes.
            Some((reply_id, _)) if reply_id != id => continue,
            Some((_, Ok(()))) => {
                return fd
                    .map(|fd| Listener::new(addr.to_string(), fd))
                    .ok_or_else(|| ListenError::Request {
                        reason: "the reply carried no descriptor".to_owned(),
                    })
            }
            Some((_, Err((errno, _)))) if errno != 0 => {
                return Err(ListenError::Bind {
                    addr: addr.clone(),
                    source: io::Error::from_raw_os_error(errno),
                })
            }
            Some((_, Err((_, text)))) => return Err(ListenError::Request { reason: text }),
            None => {
                return Err(ListenError::Request {
                    reason: "malformed reply".to_owned(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, OwnedFd};
    use std::time::{Duration, Instant};

    use super::super::{ListenAddr, ListenError, ListenMode, ListenSpec, Listeners};
    use crate::sys::net;
    use std::io::{Read, Write};

    use super::super::testutil::*;
    use super::*;

    /// Serves requests on one end of a socket pair in a thread until the
    /// worker end closes; returns the worker end and the server thread.
    fn serve(mut listeners: Listeners) -> (OwnedFd, std::thread::JoinHandle<(Listeners, io::Result<usize>)>) {
        let (master, worker) = net::seqpacket_pair().unwrap();
        let thread = std::thread::spawn(move || {
            let mut served = 0;
            loop {
                match listeners.serve_request(master.as_fd()) {
                    Ok(true) => served += 1,
                    Ok(false) => return (listeners, Ok(served)),
                    Err(e) => return (listeners, Err(e)),
                }
            }
        });
        (worker, thread)
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn shared_requests_for_one_address_get_one_socket() {
        let (worker, server) = serve(Listeners::default());
        let addr = tcp("127.0.0.1:0");
        let a = request_listener(worker.as_fd(), &addr, ListenMode::Shared, T).unwrap();
        let b = request_listener(worker.as_fd(), &addr, ListenMode::Shared, T).unwrap();
        assert_eq!(inode(a.as_fd()), inode(b.as_fd()), "the same socket");
        assert_eq!(a.name(), "127.0.0.1:0");
        // Asking for the port it got is asking for the same socket.
        let actual = a.local_addr().unwrap();
        let c = request_listener(worker.as_fd(), &actual, ListenMode::Shared, T).unwrap();
        assert_eq!(inode(c.as_fd()), inode(a.as_fd()));
        assert!(is_cloexec(&c));

        let ListenAddr::Tcp(actual) = actual else { panic!() };
        let mut client = std::net::TcpStream::connect(actual).unwrap();
        let (mut conn, _) = a.into_tcp().accept().unwrap();
        client.write_all(b"x").unwrap();
        let mut got = [0u8; 1];
        conn.read_exact(&mut got).unwrap();

        drop(worker);
        let (listeners, served) = server.join().unwrap();
        assert_eq!(served.unwrap(), 3);
        assert_eq!(listeners.all_fds().len(), 1, "the master keeps the shared socket");
        assert!(
            listeners.for_instance(0).is_empty(),
            "requested sockets are not inherited"
        );
    }

    #[test]
    fn a_shared_request_for_a_spec_address_gets_the_inherited_socket() {
        let spec = ListenSpec::new(tcp("127.0.0.1:0"));
        let listeners = Listeners::bind(&[spec], 1).unwrap();
        let inherited = inode(listeners.for_instance(0)[0].0);
        let (worker, server) = serve(listeners);
        let got = request_listener(worker.as_fd(), &tcp("127.0.0.1:0"), ListenMode::Shared, T).unwrap();
        assert_eq!(inode(got.as_fd()), inherited);
        drop(worker);
        server.join().unwrap().1.unwrap();
    }

    #[test]
    fn reuse_port_requests_get_new_sockets_on_one_port() {
        let spec = ListenSpec::new(tcp("127.0.0.1:0")).mode(ListenMode::ReusePort);
        let listeners = Listeners::bind(&[spec], 1).unwrap();
        let group_port = port(listeners.for_instance(0)[0].0);
        let (worker, server) = serve(listeners);
        let mode = ListenMode::ReusePort;
        let a = request_listener(worker.as_fd(), &tcp("127.0.0.1:0"), mode, T).unwrap();
        let b = request_listener(worker.as_fd(), &tcp("127.0.0.1:0"), mode, T).unwrap();
        assert_ne!(inode(a.as_fd()), inode(b.as_fd()));
        assert_eq!(
            (port(a.as_fd()), port(b.as_fd())),
            (group_port, group_port),
            "joined the spec's port"
        );
        // A new address: the first request picks the port, the next joins it.
        let c = request_listener(worker.as_fd(), &tcp("127.0.0.2:0"), mode, T).unwrap();
        let d = request_listener(worker.as_fd(), &tcp("127.0.0.2:0"), mode, T).unwrap();
        assert_ne!(inode(c.as_fd()), inode(d.as_fd()));
        assert_eq!(port(c.as_fd()), port(d.as_fd()));
        drop(worker);
        let (listeners, served) = server.join().unwrap();
        assert_eq!(served.unwrap(), 4);
        assert_eq!(
            listeners.all_fds().len(),
            1,
            "the master keeps no requested ReusePort socket"
        );
    }

    #[test]
    fn failed_requests_come_back_as_errors() {
        let (worker, server) = serve(Listeners::default());
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy_addr = ListenAddr::Tcp(busy.local_addr().unwrap());
        match request_listener(worker.as_fd(), &busy_addr, ListenMode::Shared, T) {
            Err(ListenError::Bind { addr, source }) => {
                assert_eq!(addr, busy_addr);
                assert_eq!(source.kind(), io::ErrorKind::AddrInUse);
            }
            other => panic!("{other:?}"),
        }
        let path = socket_path("req-reuse");
        match request_listener(
            worker.as_fd(),
            &ListenAddr::Unix(path.clone()),
            ListenMode::ReusePort,
            T,
        ) {
            Err(ListenError::ReusePortUnix { path: p }) => assert_eq!(p, path),
            other => panic!("{other:?}"),
        }
        drop(worker);
        assert_eq!(
            server.join().unwrap().1.unwrap(),
            1,
            "the unix ReusePort request never left"
        );
    }

    #[test]
    fn unix_requests_are_shared_and_removed_at_shutdown() {
        let (worker, server) = serve(Listeners::default());
        let path = socket_path("req");
        let addr = ListenAddr::Unix(path.clone());
        let a = request_listener(worker.as_fd(), &addr, ListenMode::Shared, T).unwrap();
        let b = request_listener(worker.as_fd(), &addr, ListenMode::Shared, T).unwrap();
        assert_eq!(inode(a.as_fd()), inode(b.as_fd()));
        assert!(a.is_unix());
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        drop(worker);
        let (listeners, _) = server.join().unwrap();
        assert!(path.exists());
        listeners.remove_unix_paths();
        assert!(!path.exists());
    }

    #[test]
    fn garbage_requests_get_error_replies() {
        let (worker, server) = serve(Listeners::default());
        let mut valid = encode_request(7, &tcp("127.0.0.1:0"), ListenMode::Shared);
        let mut bad_mode = valid.clone();
        bad_mode[5] = b'?';
        let mut bad_kind = valid.clone();
        bad_kind[6] = b'?';
        let mut bad_addr = valid.clone();
        bad_addr.truncate(7);
        bad_addr.extend_from_slice(b"not an address");
        let mut long = valid.clone();
        long.resize(MAX_REQUEST_LEN + 1, b'1');
        let mut nul_path = encode_request(9, &ListenAddr::Unix("/tmp/x".into()), ListenMode::Shared);
        nul_path.push(0);
        let cases: [(&[u8], u32); 9] = [
            (b"x", 0),
            (b"L", 0),
            (b"Xjunkjunkjunk", 0),
            (&bad_mode, 7),
            (&bad_kind, 7),
            (&bad_addr, 7),
            (&long, 7),
            (&nul_path, 9),
            (&[b'L', 1, 0, 0, 0, b'S', b'U'], 1),
        ];
        let mut buf = [0u8; MAX_REPLY_LEN + 1];
        for (request, id) in cases {
            net::send_with_fd(worker.as_fd(), request, None).unwrap();
            let (len, fd) = net::recv_with_fd(worker.as_fd(), &mut buf).unwrap();
            assert!(fd.is_none());
            match decode_reply(&buf[..len]) {
                Some((got, Err((0, text)))) => {
                    assert_eq!(got, id, "{text}");
                    assert!(!text.is_empty());
                }
                other => panic!("{request:?}: {other:?}"),
            }
        }
        // The server is still up, and a descriptor sent along is refused.
        valid[1] = 8;
        let (x, _y) = net::seqpacket_pair().unwrap();
        net::send_with_fd(worker.as_fd(), &valid, Some(x.as_fd())).unwrap();
        let (len, fd) = net::recv_with_fd(worker.as_fd(), &mut buf).unwrap();
        assert_eq!(decode_reply(&buf[..len]), Some((8, Ok(()))));
        assert!(fd.is_some_and(|fd| net::local_addr_tcp(fd.as_fd()).is_ok()));
        drop(worker);
        assert_eq!(server.join().unwrap().1.unwrap(), 10);
    }

    #[test]
    fn a_request_times_out_and_a_late_reply_is_dropped() {
        let (master, worker) = net::seqpacket_pair().unwrap();
        let addr = tcp("127.0.0.1:0");
        let start = Instant::now();
        match request_listener(
            worker.as_fd(),
            &addr,
            ListenMode::Shared,
            Duration::from_millis(30),
        ) {
            Err(ListenError::Request { reason }) => assert!(reason.contains("no reply"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert!(start.elapsed() >= Duration::from_millis(30));

        let stale = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fresh = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let replier = std::thread::spawn(move || {
            let mut buf = [0u8; MAX_REQUEST_LEN + 1];
            // The first (timed-out) request, then the second.
            let (len, _) = net::recv_with_fd(master.as_fd(), &mut buf).unwrap();
            let first = decode_request(&buf[..len]).unwrap();
            let (len, _) = net::recv_with_fd(master.as_fd(), &mut buf).unwrap();
            let second = decode_request(&buf[..len]).unwrap();
            assert_ne!(first.id, second.id);
            net::send_with_fd(master.as_fd(), &encode_ok(first.id), Some(stale.as_fd())).unwrap();
            net::send_with_fd(master.as_fd(), &encode_ok(second.id), Some(fresh.as_fd())).unwrap();
            fresh.local_addr().unwrap()
        });
        let got = request_listener(worker.as_fd(), &addr, ListenMode::Shared, T).unwrap();
        let fresh_addr = replier.join().unwrap();
        assert_eq!(got.local_addr().unwrap(), ListenAddr::Tcp(fresh_addr));
    }

    #[test]
    fn a_request_to_a_gone_master_fails() {
        let (master, worker) = net::seqpacket_pair().unwrap();
        let replier = std::thread::spawn(move || {
            let mut buf = [0u8; MAX_REQUEST_LEN + 1];
            net::recv_with_fd(master.as_fd(), &mut buf).unwrap();
            // An OK without a descriptor, then hang up.
            net::send_with_fd(master.as_fd(), &encode_ok(u32::MAX), None).unwrap();
        });
        let addr = tcp("127.0.0.1:0");
        match request_listener(worker.as_fd(), &addr, ListenMode::Shared, T) {
            Err(ListenError::Request { reason }) => assert!(reason.contains("closed"), "{reason}"),
            other => panic!("{other:?}"),
        }
        replier.join().unwrap();
        assert!(matches!(
            request_listener(worker.as_fd(), &addr, ListenMode::Shared, T),
            Err(ListenError::Io(_))
        ));
    }

    #[test]
    fn a_reply_without_a_descriptor_is_an_error() {
        let (master, worker) = net::seqpacket_pair().unwrap();
        let replier = std::thread::spawn(move || {
            let mut buf = [0u8; MAX_REQUEST_LEN + 1];
            let (len, _) = net::recv_with_fd(master.as_fd(), &mut buf).unwrap();
            let id = decode_request(&buf[..len]).unwrap().id;
            net::send_with_fd(master.as_fd(), &encode_ok(id), None).unwrap();
            net::recv_with_fd(master.as_fd(), &mut buf).unwrap();
            net::send_with_fd(master.as_fd(), b"?", None).unwrap();
            master
        });
        let addr = tcp("127.0.0.1:0");
        match request_listener(worker.as_fd(), &addr, ListenMode::Shared, T) {
            Err(ListenError::Request { reason }) => assert!(reason.contains("no descriptor"), "{reason}"),
            other => panic!("{other:?}"),
        }
        match request_listener(worker.as_fd(), &addr, ListenMode::Shared, T) {
            Err(ListenError::Request { reason }) => assert!(reason.contains("malformed"), "{reason}"),
            other => panic!("{other:?}"),
        }
        drop(replier.join().unwrap());
    }
}
