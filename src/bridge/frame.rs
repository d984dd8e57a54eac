//! What bridges say to each other on NATS: one frame per NATS message,
//! parsed with bounds checks. A message on the cluster's subjects that is
//! not a frame of this cluster — garbage, another cluster's, a replay — is
//! dropped and counted, never trusted.
//!
//! ```text
//! magic "shc1" | kind u8 | cluster_len u8 | cluster | origin_len u8 | origin
//!              | epoch u64 | seq u64 | body
//! ```
//!
//! All integers little-endian. `epoch` is the sending bridge's start time
//! (nanoseconds since the Unix epoch: a respawned bridge's is larger),
//! `seq` counts the frames it sent of that kind. Bodies by kind:
//!
//! | kind       | body                                                    |
//! |------------|---------------------------------------------------------|
//! | `BCAST`    | `from slot u32 | from generation u32 | call` (a call: `name_len u8 | name | delivery u64 | data`) |
//! | `CALL`     | `slot u32 | time left u64 ns | from slot u32 | from generation u32 | call` (a reply is wanted) |
//! | `EMIT`     | `slot u32 | 0 u64 | from slot u32 | from generation u32 | call` |
//! | `MAP`      | `time left u64 ns | call`                                |
//! | `CONSUME`  | `time left u64 ns | call`                                |
//! | `PRESENCE` | `leaving u8 | free u32 | links u32 | uptime u64 ns | n u32 | n × (slot u32, generation u32)` |
//! | `REPLY`    | `status u8 | body` (the messenger's reply statuses)      |

/// Frame kinds.
pub(crate) const BCAST: u8 = 1;
pub(crate) const CALL: u8 = 2;
pub(crate) const EMIT: u8 = 3;
pub(crate) const MAP: u8 = 4;
pub(crate) const CONSUME: u8 = 5;
pub(crate) const PRESENCE: u8 = 6;
pub(crate) const REPLY: u8 = 7;

const MAGIC: &[u8; 4] = b"shc1";

/// A frame's header, as sent or parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header<'a> {
    pub(crate) kind: u8,
    pub(crate) cluster: &'a str,
    pub(crate) origin: &'a str,
    pub(crate) epoch: u64,
    pub(crate) seq: u64,
}

/// Why a frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Not a frame at all, or cut short.
    Garbage,
    /// A frame of another cluster.
    OtherCluster,
}

/// A frame: `header`, then `body`.
pub(crate) fn encode(header: &Header<'_>, body: &[&[u8]]) -> Vec<u8> {
    let len =
        4 + 3 + header.cluster.len() + header.origin.len() + 16 + body.iter().map(|b| b.len()).sum::<usize>();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(MAGIC);
    out.push(header.kind);
    out.push(header.cluster.len() as u8);
    out.extend_from_slice(header.cluster.as_bytes());
    out.push(header.origin.len() as u8);
    out.extend_from_slice(header.origin.as_bytes());
    out.extend_from_slice(&header.epoch.to_le_bytes());
    out.extend_from_slice(&header.seq.to_le_bytes());
    for part in body {
        out.extend_from_slice(part);
    }
    out
}

/// Parses a frame of `cluster`: its header and body.
pub(crate) fn decode<'a>(bytes: &'a [u8], cluster: &str) -> Result<(Header<'a>, &'a [u8]), Refused> {
    let rest = bytes.strip_prefix(MAGIC).ok_or(Refused::Garbage)?;
    let (&kind, rest) = rest.split_first().ok_or(Refused::Garbage)?;
    let (their_cluster, rest) = name(rest).ok_or(Refused::Garbage)?;
    let (origin, rest) = name(rest).ok_or(Refused::Garbage)?;
    let epoch = u64_at(rest, 0).ok_or(Refused::Garbage)?;
    let seq = u64_at(rest, 8).ok_or(Refused::Garbage)?;
    if !(BCAST..=REPLY).contains(&kind) || !crate::bridge::config::valid_name(origin) {
        return Err(Refused::Garbage);
    }
    if their_cluster != cluster {
        return Err(Refused::OtherCluster);
    }
    let header = Header {
        kind,
        cluster: their_cluster,
        origin,
        epoch,
        seq,
    };
    Ok((header, &rest[16..]))
}

fn name(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let (&len, rest) = bytes.split_first()?;
    let len = usize::from(len);
    let name = std::str::from_utf8(rest.get(..len)?).ok()?;
    Some((name, &rest[len..]))
}

pub(crate) fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

pub(crate) fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// A host's presence: whether it is leaving, how many of its workers are
/// free for a consume, how many times its bridge's NATS connection came
/// back (answers it owed meanwhile may be lost: a caller asks again), and
/// its live workers (slot, generation).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Presence {
    pub(crate) leaving: bool,
    pub(crate) free: u32,
    pub(crate) links: u32,
    /// The sending bridge's time since its start (nanoseconds, its
    /// monotonic clock): a receiver tells a presence that sat in a buffer
    /// (a partition's backlog) from a fresh one by it.
    pub(crate) uptime: u64,
    pub(crate) workers: Vec<(u32, u32)>,
}

pub(crate) fn encode_presence(p: &Presence) -> Vec<u8> {
    let mut out = Vec::with_capacity(21 + 8 * p.workers.len());
    out.push(u8::from(p.leaving));
    out.extend_from_slice(&p.free.to_le_bytes());
    out.extend_from_slice(&p.links.to_le_bytes());
    out.extend_from_slice(&p.uptime.to_le_bytes());
    out.extend_from_slice(&(p.workers.len() as u32).to_le_bytes());
    for &(slot, generation) in &p.workers {
        out.extend_from_slice(&slot.to_le_bytes());
        out.extend_from_slice(&generation.to_le_bytes());
    }
    out
}

/// At most this many workers in a presence (a segment's limit).
const MAX_PRESENCE_WORKERS: usize = crate::MAX_WORKERS as usize;

pub(crate) fn decode_presence(body: &[u8]) -> Option<Presence> {
    let leaving = match *body.first()? {
        0 => false,
        1 => true,
        _ => return None,
    };
    let free = u32_at(body, 1)?;
    let links = u32_at(body, 5)?;
    let uptime = u64_at(body, 9)?;
    let n = u32_at(body, 17)? as usize;
    if n > MAX_PRESENCE_WORKERS || body.len() != 21 + 8 * n {
        return None;
    }
    let workers = (0..n)
        .map(|i| Some((u32_at(body, 21 + 8 * i)?, u32_at(body, 25 + 8 * i)?)))
        .collect::<Option<Vec<_>>>()?;
    Some(Presence {
        leaving,
        free,
        links,
        uptime,
        workers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_anything_else_is_refused() {
        let h = Header {
            kind: CALL,
            cluster: "shop",
            origin: "web-1",
            epoch: 7,
            seq: 9,
        };
        let f = encode(&h, &[b"ab", b"c"]);
        assert_eq!(decode(&f, "shop"), Ok((h, &b"abc"[..])));
        assert_eq!(decode(&f, "other"), Err(Refused::OtherCluster));
        for cut in 0..f.len() - 3 {
            assert_eq!(decode(&f[..cut], "shop"), Err(Refused::Garbage), "cut at {cut}");
        }
        let mut bad = f.clone();
        bad[4] = 99;
        assert_eq!(decode(&bad, "shop"), Err(Refused::Garbage), "unknown kind");
        assert_eq!(decode(b"hello world, not ours", "shop"), Err(Refused::Garbage));
        let p = Presence {
            leaving: true,
            free: 2,
            links: 3,
            uptime: 77,
            workers: vec![(0, 1), (3, 4)],
        };
        assert_eq!(decode_presence(&encode_presence(&p)), Some(p.clone()));
        let e = encode_presence(&p);
        assert!(decode_presence(&e[..e.len() - 1]).is_none());
        let mut huge = e.clone();
        huge[17..21].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_presence(&huge).is_none());
    }
}
