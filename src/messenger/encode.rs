//! Encoding a call message with its limits, on the caller's thread: a name
//! or payload over its limit fails here, before anything is queued or sent,
//! whichever driver sends it.

use serde::Serialize;

use super::error::EmitError;
use super::{wire, MAX_EVENT_NAME};
use crate::segment::Segment;

/// The largest payload (an encoded value, or raw bytes) a message of
/// `segment` carries: its `max_message` less the largest call header, so
/// the limit does not depend on the event's name.
pub(crate) fn payload_limit(segment: &Segment) -> usize {
    segment
        .layout()
        .max_message()
        .saturating_sub(wire::MAX_CALL_HEADER)
}

pub(super) fn check_name(event: &str) -> Result<(), EmitError> {
    if event.len() > MAX_EVENT_NAME {
        return Err(EmitError::EventName { len: event.len() });
    }
    Ok(())
}

/// Encodes a call message; `TooLarge` (the payload's size and `limit`)
/// before anything is sent if its payload is over `limit`.
pub(super) fn encode_call<T: Serialize + ?Sized>(
    event: &str,
    delivery: u64,
    value: &T,
    limit: usize,
) -> Result<Vec<u8>, EmitError> {
    let header = wire::call_header_len(event.len());
    encode_call_in(Vec::with_capacity(header + 16), event, delivery, value, limit)
}

/// [`encode_call`] into `out` (an empty buffer to reuse).
pub(super) fn encode_call_in<T: Serialize + ?Sized>(
    mut out: Vec<u8>,
    event: &str,
    delivery: u64,
    value: &T,
    limit: usize,
) -> Result<Vec<u8>, EmitError> {
    check_name(event)?;
    let header = wire::call_header_len(event.len());
    wire::put_call_header(&mut out, event, delivery);
    postcard::to_io(value, &mut out).map_err(EmitError::Encode)?;
    check_payload(out.len() - header, limit)?;
    Ok(out)
}

/// [`encode_call`] of raw bytes.
pub(super) fn encode_call_bytes(
    event: &str,
    delivery: u64,
    data: &[u8],
    limit: usize,
) -> Result<Vec<u8>, EmitError> {
    check_name(event)?;
    check_payload(data.len(), limit)?;
    let mut out = Vec::with_capacity(wire::call_header_len(event.len()) + data.len());
    wire::put_call_header(&mut out, event, delivery);
    out.extend_from_slice(data);
    Ok(out)
}

fn check_payload(len: usize, limit: usize) -> Result<(), EmitError> {
    if len > limit {
        return Err(EmitError::TooLarge { len, max: limit });
    }
    Ok(())
}

/// Decodes an answer as `R`.
pub(super) fn decode<R: serde::de::DeserializeOwned>(body: &[u8]) -> Result<R, super::CallError> {
    postcard::from_bytes(body).map_err(super::CallError::Decode)
}
