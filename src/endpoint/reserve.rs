//! Reserving lane space to serialise a message in place.

use std::ops::{Deref, DerefMut};
use std::time::Instant;

use super::send::Blocked;
use super::{Endpoint, Tag};
use crate::error::{SendError, TrySendError};
use crate::lane::{flags, Planned};

impl Endpoint {
    /// Reserves `len` bytes in the lane to `to`, to be filled in place and
    /// then [committed](Reservation::commit): a message is serialized
    /// straight into shared memory with no intermediate buffer. Waits for
    /// room until `deadline` (`None`: as long as it takes).
    ///
    /// # Errors
    /// `NoSuchWorker`; `TooLarge` if `len` exceeds
    /// [`Endpoint::max_reservation`]; `Timeout(())`, `SelfFull(())`,
    /// `Corrupt`.
    ///
    /// # Examples
    /// ```
    /// # let segment = shmcluster::raw::Segment::create(&shmcluster::raw::Config::new(2))?;
    /// let mut a = segment.endpoint(0)?;
    /// let mut b = segment.endpoint(1)?;
    /// let mut r = a.reserve(1, 64, None)?;
    /// let n = {
    ///     use std::io::Write;
    ///     let mut w = &mut r[..];
    ///     write!(w, "sum = {}", 40 + 2)?;
    ///     64 - w.len()
    /// };
    /// r.commit_len(n);
    /// assert_eq!(b.recv()?.payload, b"sum = 42");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn reserve(
        &mut self,
        to: u32,
        len: usize,
        deadline: Option<Instant>,
    ) -> Result<Reservation<'_>, SendError<()>> {
        self.check_target(to, len, self.max_reservation())
            .map_err(SendError::from)?;
        loop {
            match self.outbound[to as usize].lane.plan(len, 0) {
                Ok(Some(planned)) => return Ok(self.reservation(to, planned, len)),
                Ok(None) => {}
                Err(error) => {
                    return Err(SendError::Corrupt {
                        slot: to,
                        error,
                        msg: (),
                    })
                }
            }
            let need = self.outbound[to as usize].lane.need(len, 0);
            self.wait_for_room(to, need, deadline).map_err(|e| match e {
                Blocked::Timeout => SendError::Timeout(()),
                Blocked::SelfFull => SendError::SelfFull(()),
                Blocked::Corrupt(error) => SendError::Corrupt {
                    slot: to,
                    error,
                    msg: (),
                },
            })?;
        }
    }

    /// [`Endpoint::reserve`] without waiting.
    ///
    /// # Errors
    /// `NoSuchWorker`, `TooLarge`, `Corrupt`, or `Full(())` if the lane
    /// lacks room now.
    pub fn try_reserve(&mut self, to: u32, len: usize) -> Result<Reservation<'_>, TrySendError<()>> {
        self.check_target(to, len, self.max_reservation())?;
        match self.outbound[to as usize].lane.plan(len, 0) {
            Ok(Some(planned)) => Ok(self.reservation(to, planned, len)),
            Ok(None) => Err(TrySendError::Full(())),
            Err(error) => Err(TrySendError::Corrupt {
                slot: to,
                error,
                msg: (),
            }),
        }
    }

    fn reservation(&mut self, to: u32, planned: Planned, len: usize) -> Reservation<'_> {
        let ptr = self.outbound[to as usize].lane.payload_ptr(planned);
        Reservation {
            endpoint: self,
            to,
            planned,
            ptr,
            len,
            tag: Tag::default(),
        }
    }
}

/// Space reserved in a lane by [`Endpoint::reserve`]: write the payload
/// through `DerefMut<Target = [u8]>`, then [`commit`](Reservation::commit).
/// Dropped without committing, nothing is sent.
///
/// The bytes are lane memory, initially holding whatever an earlier message
/// left there.
pub struct Reservation<'a> {
    endpoint: &'a mut Endpoint,
    to: u32,
    planned: Planned,
    ptr: *mut u8,
    len: usize,
    tag: Tag,
}

impl Reservation<'_> {
    /// Sets the tag the message will carry.
    pub fn set_tag(&mut self, tag: Tag) {
        self.tag = tag;
    }

    /// Publishes all the reserved bytes as one message.
    pub fn commit(self) {
        let len = self.len;
        self.commit_len(len);
    }

    /// Publishes the first `len` reserved bytes as one message.
    ///
    /// # Panics
    /// If `len` is more than was reserved.
    pub fn commit_len(self, len: usize) {
        assert!(
            len <= self.len,
            "committing {len} bytes of a {}-byte reservation",
            self.len
        );
        let hdr = self.endpoint.header(self.to, self.tag, len, flags::SINGLE, 0);
        let out = &mut self.endpoint.outbound[self.to as usize].lane;
        out.commit(self.planned, hdr);
        out.publish();
        self.endpoint.notify(self.to);
        self.endpoint.count_sent(len);
    }
}

impl Deref for Reservation<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `plan` found `len` bytes of free lane space at `ptr`,
        // inside the ring; the receiver reads nothing there until it is
        // committed, and this endpoint (borrowed mutably) is the lane's
        // only writer.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl DerefMut for Reservation<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `deref`; `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl std::fmt::Debug for Reservation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("to", &self.to)
            .field("len", &self.len)
            .finish()
    }
}
