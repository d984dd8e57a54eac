//! The little HTTP/1.x the metrics endpoint speaks: one request read up
//! to the end of its head ([`MAX_HEAD`] bytes at most), judged from its
//! request line alone, one response, then the connection is closed. No
//! I/O here: [`judge`] takes the bytes read so far, [`response`] makes the
//! bytes to write.

/// The longest request head accepted (request line and headers).
pub(crate) const MAX_HEAD: usize = 8 * 1024;

/// What a request asks for, or why it is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Not all of the head has arrived.
    Incomplete,
    /// `GET /metrics` (`head`: `HEAD /metrics`, the headers only).
    Metrics {
        /// Without the body.
        head: bool,
    },
    /// A refusal: its status line and a one-line reason.
    Refuse(u16, &'static str),
}

/// Judges the request whose first bytes are `input`.
pub(crate) fn judge(input: &[u8]) -> Verdict {
    let Some(end) = head_end(input) else {
        return if input.len() >= MAX_HEAD {
            Verdict::Refuse(431, "the request head is longer than 8 KiB")
        } else {
            Verdict::Incomplete
        };
    };
    let head = &input[..end];
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = std::str::from_utf8(&head[..line_end]).unwrap_or("");
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Verdict::Refuse(400, "malformed request line");
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase())
    {
        return Verdict::Refuse(400, "malformed request line");
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Verdict::Refuse(405, "only GET and HEAD are served"),
    };
    let path = target.split('?').next().unwrap_or("");
    if path != "/metrics" {
        return Verdict::Refuse(404, "the metrics are at /metrics");
    }
    Verdict::Metrics { head: head_only }
}

/// Where the head ends (after its blank line), if it has.
fn head_end(input: &[u8]) -> Option<usize> {
    let scan = &input[..input.len().min(MAX_HEAD)];
    (0..scan.len()).find_map(|i| {
        if scan[i..].starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if scan[i..].starts_with(b"\n\n") {
            Some(i + 2)
        } else {
            None
        }
    })
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// A whole response: status line, headers (`Connection: close`), and
/// `body` unless `head_only` (its length is still given).
pub(crate) fn response(status: u16, content_type: &str, body: &[u8], head_only: bool) -> Vec<u8> {
    let allow = if status == 405 { "Allow: GET, HEAD\r\n" } else { "" };
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}\
         Connection: close\r\n\r\n",
        reason_phrase(status),
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

/// A refusal's response: `reason` as a plain-text body.
pub(crate) fn refusal(status: u16, reason: &str) -> Vec<u8> {
    response(
        status,
        "text/plain; charset=utf-8",
        format!("{reason}\n").as_bytes(),
        false,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_judged_by_their_request_line() {
        assert_eq!(judge(b""), Verdict::Incomplete);
        assert_eq!(
            judge(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"),
            Verdict::Incomplete
        );
        assert_eq!(
            judge(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Verdict::Metrics { head: false }
        );
        assert_eq!(
            judge(b"GET /metrics?x=1 HTTP/1.0\n\n"),
            Verdict::Metrics { head: false }
        );
        assert_eq!(
            judge(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            Verdict::Metrics { head: true }
        );
        assert!(matches!(
            judge(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Verdict::Refuse(405, _)
        ));
        assert!(matches!(
            judge(b"GET / HTTP/1.1\r\n\r\n"),
            Verdict::Refuse(404, _)
        ));
        assert!(matches!(judge(b"garbage\r\n\r\n"), Verdict::Refuse(400, _)));
        assert!(matches!(
            judge(b"GET /metrics SPDY/3\r\n\r\n"),
            Verdict::Refuse(400, _)
        ));
        assert!(matches!(
            judge(b"get /metrics HTTP/1.1\r\n\r\n"),
            Verdict::Refuse(400, _)
        ));
        assert!(matches!(judge(&[0xff; 20]), Verdict::Incomplete));
        assert!(matches!(judge(&[b'a'; MAX_HEAD]), Verdict::Refuse(431, _)));
        let mut long = b"GET /metrics HTTP/1.1\r\n".to_vec();
        long.extend_from_slice(&[b'h'; MAX_HEAD]);
        long.extend_from_slice(b"\r\n\r\n");
        assert!(
            matches!(judge(&long), Verdict::Refuse(431, _)),
            "the end past the limit"
        );
    }

    #[test]
    fn responses_say_their_length_and_close() {
        let r = String::from_utf8(response(200, "text/plain", b"abc", false)).unwrap();
        assert_eq!(
            r,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
        );
        let r = String::from_utf8(response(200, "text/plain", b"abc", true)).unwrap();
        assert!(
            r.ends_with("Content-Length: 3\r\nConnection: close\r\n\r\n"),
            "{r}"
        );
        let r = String::from_utf8(refusal(405, "no")).unwrap();
        assert!(
            r.starts_with("HTTP/1.1 405 Method Not Allowed\r\n") && r.contains("Allow: GET, HEAD\r\n"),
            "{r}"
        );
    }
}
