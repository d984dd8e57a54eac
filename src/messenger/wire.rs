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

/// To the host's bridge (feature `nats`): a map's call, for the workers
/// of every other host. Its call header's delivery field carries the time
/// left to the map's deadline, in nanoseconds; the bridge's reply is a
/// list of [`RemoteEntry`]s.
pub(crate) const BRIDGE_MAP: u16 = 0x4d10;
/// To the host's bridge: a request to a worker of another host, the
/// payload the time left to the deadline (nanoseconds, u64 LE), a
/// [`put_route`] header, then the call. The reply is the remote worker's,
/// or `UNREACHABLE`.
pub(crate) const BRIDGE_CALL: u16 = 0x4d11;
/// To the host's bridge: an emit to a worker of another host (no reply),
/// the payload a [`put_route`] header then the call.
pub(crate) const BRIDGE_EMIT: u16 = 0x4d12;
/// To the host's bridge: a consume that spills over to other hosts, the
/// payload the time left to the deadline (nanoseconds, u64 LE) then the
/// call. An `OK` reply's body names who ran it ([`put_consumer`]).
pub(crate) const BRIDGE_CONSUME: u16 = 0x4d13;

/// What a bridge's frame adds to a call on NATS, at most: its header
/// (magic, kind, two names of up to 64 bytes with their lengths, epoch and
/// sequence: 151 bytes), a slot and a time (12), rounded up. A call
/// (header and data) crosses hosts if it is no longer than the server's
/// `max_payload` less this.
pub(crate) const BRIDGE_FRAME_OVERHEAD: usize = 256;

/// From the host's bridge to a worker: an event another host's worker
/// sent (a broadcast, an `emit_at`), the payload its origin
/// ([`put_consumer`]'s layout: host, slot, generation; an empty host for
/// this one) then the call. Handled as an `EMIT` whose sender is the
/// origin, not the bridge.
pub(crate) const BRIDGED_EMIT: u16 = 0x4d14;

/// To the host's bridge: a broadcast (`emit(All)`, `emit(Others)`) for
/// every other host's workers; the payload is the call. Not `EMIT`: an
/// `emit` to the bridge's own slot must not become a broadcast.
pub(crate) const BRIDGE_BCAST: u16 = 0x4d15;

/// Reply statuses.
pub(crate) const OK: u8 = 0;
pub(crate) const NO_HANDLER: u8 = 1;
pub(crate) const FAILED: u8 = 2;
/// From a bridge: the host is not connected or no one answers there (the
/// body says why).
pub(crate) const UNREACHABLE: u8 = 3;
/// A remote map entry's: the worker did not answer in time.
pub(crate) const TIMED_OUT: u8 = 4;
/// A remote map entry's: the worker died before answering.
pub(crate) const DIED: u8 = 5;

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

/// Prepends a route to a call to `(host, slot)` ([`BRIDGE_CALL`],
/// [`BRIDGE_EMIT`]): `host_len u8 | host | slot u32 LE`, then the call.
pub(crate) fn put_route(out: &mut Vec<u8>, host: &str, slot: u32) {
    out.push(host.len() as u8);
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(&slot.to_le_bytes());
}

/// A routed call, parsed: (host, slot, the call's bytes).
pub(crate) fn parse_route(payload: &[u8]) -> Option<(&str, u32, &[u8])> {
    let (&len, rest) = payload.split_first()?;
    let len = len as usize;
    let host = std::str::from_utf8(rest.get(..len)?).ok()?;
    let slot = u32::from_le_bytes(rest.get(len..len + 4)?.try_into().ok()?);
    Some((host, slot, &rest[len + 4..]))
}

/// One worker's entry of a map on another host, as a bridge answers a
/// [`BRIDGE_MAP`] call: `host_len u8 | host | slot u32 | generation u32 |
/// status u8 | body_len u32 | body`, all little-endian, entry after entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RemoteEntry<'a> {
    pub(crate) host: &'a str,
    pub(crate) slot: u32,
    pub(crate) generation: u32,
    pub(crate) status: u8,
    pub(crate) body: &'a [u8],
}

/// Appends `entry` to a [`BRIDGE_MAP`] reply.
#[cfg_attr(not(feature = "nats"), allow(dead_code))]
pub(crate) fn put_remote_entry(out: &mut Vec<u8>, entry: &RemoteEntry<'_>) {
    out.push(entry.host.len() as u8);
    out.extend_from_slice(entry.host.as_bytes());
    out.extend_from_slice(&entry.slot.to_le_bytes());
    out.extend_from_slice(&entry.generation.to_le_bytes());
    out.push(entry.status);
    out.extend_from_slice(&(entry.body.len() as u32).to_le_bytes());
    out.extend_from_slice(entry.body);
}

/// Every entry of a [`BRIDGE_MAP`] reply; `None` if any is malformed.
pub(crate) fn parse_remote_entries(mut payload: &[u8]) -> Option<Vec<RemoteEntry<'_>>> {
    let mut out = Vec::new();
    while !payload.is_empty() {
        let (&len, rest) = payload.split_first()?;
        let len = len as usize;
        let host = std::str::from_utf8(rest.get(..len)?).ok()?;
        let rest = &rest[len..];
        let word =
            |at: usize| -> Option<u32> { Some(u32::from_le_bytes(rest.get(at..at + 4)?.try_into().ok()?)) };
        let (slot, generation) = (word(0)?, word(4)?);
        let status = *rest.get(8)?;
        let body_len = word(9)? as usize;
        let body = rest.get(13..13usize.checked_add(body_len)?)?;
        out.push(RemoteEntry {
            host,
            slot,
            generation,
            status,
            body,
        });
        payload = &rest[13 + body_len..];
    }
    Some(out)
}

/// Who ran a consume on another host, as a bridge answers a `CONSUME`
/// call it carried: `host_len u8 | host | slot u32 | generation u32`.
#[cfg_attr(not(feature = "nats"), allow(dead_code))]
pub(crate) fn put_consumer(out: &mut Vec<u8>, host: &str, slot: u32, generation: u32) {
    out.push(host.len() as u8);
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(&slot.to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
}

/// A [`BRIDGED_EMIT`]'s payload, parsed: (host, slot, generation, call).
pub(crate) fn parse_origin(payload: &[u8]) -> Option<(&str, u32, u32, &[u8])> {
    let (host, slot, rest) = parse_route(payload)?;
    let generation = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
    Some((host, slot, generation, &rest[4..]))
}

/// [`put_consumer`]'s bytes, parsed: (host, slot, generation).
pub(crate) fn parse_consumer(payload: &[u8]) -> Option<(&str, u32, u32)> {
    let (host, slot, rest) = parse_route(payload)?;
    let generation = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
    Some((host, slot, generation))
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

    #[test]
    fn bridge_frames_round_trip_and_garbage_is_refused() {
        let mut r = Vec::new();
        put_route(&mut r, "web-2", 3);
        r.extend_from_slice(b"call");
        assert_eq!(parse_route(&r), Some(("web-2", 3, &b"call"[..])));
        assert!(parse_route(&r[..5]).is_none(), "cut in the slot");
        let entries = [
            RemoteEntry {
                host: "a",
                slot: 0,
                generation: 1,
                status: OK,
                body: b"x",
            },
            RemoteEntry {
                host: "bb",
                slot: 2,
                generation: 7,
                status: TIMED_OUT,
                body: b"",
            },
        ];
        let mut m = Vec::new();
        for e in &entries {
            put_remote_entry(&mut m, e);
        }
        assert_eq!(parse_remote_entries(&m).unwrap(), entries);
        assert_eq!(parse_remote_entries(&[]).unwrap(), vec![]);
        for cut in 1..m.len() {
            if cut != m.len() - (1 + 2 + 13) {
                assert!(parse_remote_entries(&m[..cut]).is_none(), "cut at {cut}");
            }
        }
        let mut huge = m.clone();
        huge[1 + 1 + 9..1 + 1 + 13].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            parse_remote_entries(&huge).is_none(),
            "body longer than the payload"
        );
        let mut c = Vec::new();
        put_consumer(&mut c, "h", 1, 9);
        assert_eq!(parse_consumer(&c), Some(("h", 1, 9)));
    }
}
