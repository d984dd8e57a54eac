//! The messenger's wire format, inside one lane record.
//!
//! The record's [`Tag`](crate::Tag) carries the message kind and the call's
//! correlation id; the record header already carries the sender's slot and
//! generation. The payload is:
//!
//! ```text
//! EMIT, REQUEST, CONSUME:  name_len u8 | name | delivery u64 LE | data
//! REPLY:                   status u8 | requester generation u32 LE | body
//! ```
//!
//! Everything is parsed with bounds checks: a malformed payload from a
//! buggy peer is counted and dropped, never trusted.

/// Fire and forget: `emit`, `send`, `broadcast`. Every handler runs.
pub(crate) const EMIT: u16 = 0x4d01;
/// A call that wants one reply (`request`, `map`): the first handler runs.
pub(crate) const REQUEST: u16 = 0x4d02;
/// A task for exactly one worker (`consume`): the first handler runs and
/// the reply acknowledges it.
pub(crate) const CONSUME: u16 = 0x4d03;
/// The answer to a REQUEST or CONSUME.
pub(crate) const REPLY: u16 = 0x4d04;

/// Reply statuses.
pub(crate) const OK: u8 = 0;
pub(crate) const NO_HANDLER: u8 = 1;
pub(crate) const FAILED: u8 = 2;

/// Longest event name, in bytes.
pub const MAX_EVENT_NAME: usize = 255;

/// The most bytes a call message's header can take (the longest event
/// name): what the messenger keeps of a record's `max_message` for itself,
/// so that every payload up to the rest fits whatever its event's name.
pub(crate) const MAX_CALL_HEADER: usize = 1 + MAX_EVENT_NAME + 8;

/// Bytes before the data of a call message with an event name of `name_len`.
pub(crate) fn call_header_len(name_len: usize) -> usize {
    1 + name_len + 8
}

/// Encodes a call message's header into `out`.
pub(crate) fn put_call_header(out: &mut Vec<u8>, name: &str, delivery: u64) {
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&delivery.to_le_bytes());
}

/// A call message, parsed.
pub(crate) struct Call<'a> {
    pub(crate) name: &'a str,
    pub(crate) delivery: u64,
    pub(crate) data: &'a [u8],
}

pub(crate) fn parse_call(payload: &[u8]) -> Option<Call<'_>> {
    let (&len, rest) = payload.split_first()?;
    let len = len as usize;
    if rest.len() < len + 8 {
        return None;
    }
    let name = std::str::from_utf8(&rest[..len]).ok()?;
    let delivery = u64::from_le_bytes(rest[len..len + 8].try_into().ok()?);
    Some(Call {
        name,
        delivery,
        data: &rest[len + 8..],
    })
}

/// Bytes before a reply's body.
pub(crate) const REPLY_HEADER: usize = 5;

/// Encodes a reply.
pub(crate) fn reply(status: u8, requester_generation: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(REPLY_HEADER + body.len());
    out.push(status);
    out.extend_from_slice(&requester_generation.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// `buf` (emptied) made a reply frame to encode a body after:
/// [`REPLY_HEADER`] bytes, and room for a small value (so that encoding
/// one does not reallocate).
pub(crate) fn reply_frame(mut buf: Vec<u8>) -> Vec<u8> {
    buf.clear();
    buf.reserve(64);
    buf.resize(REPLY_HEADER, 0);
    buf
}

/// Writes a reply's header into the first [`REPLY_HEADER`] bytes of
/// `frame` (a reply whose body was encoded after them).
pub(crate) fn put_reply_header(frame: &mut [u8], status: u8, requester_generation: u32) {
    if let Some(header) = frame.get_mut(..REPLY_HEADER) {
        header[0] = status;
        header[1..].copy_from_slice(&requester_generation.to_le_bytes());
    }
}

/// A reply, parsed: (status, requester generation, body).
pub(crate) fn parse_reply(payload: &[u8]) -> Option<(u8, u32, &[u8])> {
    if payload.len() < REPLY_HEADER {
        return None;
    }
    let generation = u32::from_le_bytes(payload[1..REPLY_HEADER].try_into().ok()?);
    Some((payload[0], generation, &payload[REPLY_HEADER..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_round_trip_and_garbage_is_refused() {
        let mut m = Vec::new();
        put_call_header(&mut m, "job", 42);
        m.extend_from_slice(b"data");
        assert_eq!(m.len(), call_header_len(3) + 4);
        let c = parse_call(&m).unwrap();
        assert_eq!((c.name, c.delivery, c.data), ("job", 42, &b"data"[..]));
        assert!(parse_call(&[]).is_none());
        assert!(parse_call(&[10, b'a']).is_none(), "name longer than the payload");
        assert!(
            parse_call(&[1, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]).is_none(),
            "not utf-8"
        );
        let r = reply(FAILED, 7, b"boom");
        assert_eq!(parse_reply(&r), Some((FAILED, 7, &b"boom"[..])));
        assert!(parse_reply(&[0, 1, 2]).is_none());
    }
}
