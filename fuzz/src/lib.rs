//! The logic of the fuzz targets, as plain functions so that a normal test
//! (or a debugger) can run one input without libFuzzer:
//!
//! - [`attach_image`]: arbitrary bytes as a whole segment image, attached
//!   with `Segment::attach`, then received from (and optionally sent to).
//! - [`scribble_lane`]: a valid segment whose lane 0 → 1 (control block and
//!   ring) is overwritten with fuzz input, as a buggy process would, then
//!   drained by slot 1.
//!
//! Both must never panic, crash, hang or read out of bounds, whatever the
//! input. Where they check more than "no panic" (the receiver only reports
//! the lane's real sender, a poisoned lane stays silent, an untouched lane
//! delivers exactly what was sent) they `assert!`, which libFuzzer reports
//! as a crash like any other.
//!
//! Bugs these targets found in `src/` (each now has a regression test in
//! `tests/garbage.rs`): a sender opened on garbage lane indices trusted
//! them; a receiver head near 2^64 overflowed; a doorbell bit for a slot
//! that does not exist indexed out of bounds; an empty record in a ring's
//! last 32 bytes tripped a debug assertion.
//!
//! `tests/garbage.rs` at the root includes this file as a module
//! (`#[path]`), so it compiles under the root crate's `rust-version` and
//! lints too, and its helpers ([`Scribbler`], [`memfd_with`], ...) serve
//! those tests as well.

#![warn(clippy::undocumented_unsafe_blocks)]

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};

use shmcluster::raw::{Config, Endpoint, RecvError, Segment, TryRecvError};

/// Lane capacity of the segment [`scribble_lane`] builds.
pub const LANE_CAPACITY: usize = 4096;
/// `max_message` of the segment [`scribble_lane`] builds.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Receive calls made per input (each returns at once).
pub const RECV_CALLS: usize = 64;
/// Byte offsets in a lane control block (`Layout::lane_ctl`).
pub const CTL_HEAD: usize = 0;
/// See [`CTL_HEAD`].
pub const CTL_TAIL: usize = 128;
/// See [`CTL_HEAD`].
pub const CTL_SPACE_WAITER: usize = 256;
/// Bytes in a lane control block.
pub const CTL_SIZE: usize = 384;
/// The largest image [`attach_image`] pads a raw input up to.
const MAX_PADDED_IMAGE: u64 = 4 << 20;
/// Offset of the `size` field in the segment header (`#[repr(C)]`:
/// magic u64, abi u32, init u32, hash u64, mutex u32, workers u32,
/// lane_capacity u64, max_message u64, lock_slots u32, bell_words u32,
/// then eight u64: slot_stride ... size).
const HEADER_SIZE_FIELD: usize = 112;

/// Reads the fuzz input front to back; zeros once it runs out.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// The next `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    /// A byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// A new memfd holding `bytes` (then zeros up to `len`), with `seals`
/// (`F_SEAL_*`) added.
pub fn memfd_with(bytes: &[u8], len: u64, seals: libc::c_int) -> OwnedFd {
    // SAFETY: the name is a NUL-terminated literal; the flags are valid.
    let raw = unsafe {
        libc::memfd_create(
            c"shmcluster-fuzz".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(raw >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let mut file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    file.write_all(bytes).expect("write the image");
    if len > bytes.len() as u64 {
        file.set_len(len).expect("ftruncate");
    }
    if seals != 0 {
        // SAFETY: F_ADD_SEALS takes an int and touches no memory of ours.
        let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        assert_eq!(ret, 0, "F_ADD_SEALS: {}", std::io::Error::last_os_error());
    }
    OwnedFd::from(file)
}

/// The seals `Segment::create` sets.
pub const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Reads a segment's whole image through its fd (`pread`).
pub fn read_image(fd: BorrowedFd<'_>) -> Vec<u8> {
    let mut file = File::from(fd.try_clone_to_owned().expect("dup"));
    let mut image = Vec::new();
    file.seek(SeekFrom::Start(0)).expect("seek");
    file.read_to_end(&mut image).expect("read the image");
    image
}

/// A second, independent `MAP_SHARED` mapping of a segment: what another
/// (buggy) process sees.
pub struct Scribbler {
    map: memmap2::MmapRaw,
}

impl Scribbler {
    /// Maps the first `len` bytes of `fd`.
    pub fn new(fd: BorrowedFd<'_>, len: usize) -> Self {
        let map = memmap2::MmapOptions::new()
            .len(len)
            .map_raw(fd.as_raw_fd())
            .expect("second mapping");
        Self { map }
    }

    fn word64(&self, offset: usize) -> &AtomicU64 {
        assert!(offset.is_multiple_of(8) && offset + 8 <= self.map.len());
        // SAFETY: in bounds and 8-aligned (checked; the mapping is page
        // aligned); the segment's words are accessed atomically by everyone.
        unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().add(offset).cast()) }
    }

    fn word32(&self, offset: usize) -> &AtomicU32 {
        assert!(offset.is_multiple_of(4) && offset + 4 <= self.map.len());
        // SAFETY: as for `word64`, 4-aligned.
        unsafe { AtomicU32::from_ptr(self.map.as_mut_ptr().add(offset).cast()) }
    }

    /// Loads the u64 at `offset`.
    pub fn load64(&self, offset: usize) -> u64 {
        self.word64(offset).load(SeqCst)
    }

    /// Stores the u64 at `offset`.
    pub fn store64(&self, offset: usize, value: u64) {
        self.word64(offset).store(value, SeqCst);
    }

    /// Stores the u32 at `offset`.
    pub fn store32(&self, offset: usize, value: u32) {
        self.word32(offset).store(value, SeqCst);
    }

    /// Sets `bits` in the u64 at `offset`.
    pub fn or64(&self, offset: usize, bits: u64) {
        self.word64(offset).fetch_or(bits, SeqCst);
    }

    /// Clears all but `bits` in the u64 at `offset`.
    pub fn and64(&self, offset: usize, bits: u64) {
        self.word64(offset).fetch_and(bits, SeqCst);
    }

    /// Copies `bytes` to `offset`, wrapping around inside the `len` bytes at
    /// `start` (a lane's ring).
    pub fn write_ring(&self, start: usize, len: usize, offset: usize, bytes: &[u8]) {
        assert!(start + len <= self.map.len());
        for (i, &b) in bytes.iter().take(len).enumerate() {
            let at = start + (offset + i) % len;
            // SAFETY: `at < start + len <= map.len()`. Volatile: a peer
            // (here, this process's receiver) reads these bytes.
            unsafe { self.map.as_mut_ptr().add(at).write_volatile(b) };
        }
    }
}

/// Drains `rx` with up to [`RECV_CALLS`] receive calls, alternating the
/// copying, the lending and the waiting (deadline passed) API as
/// `pattern` says. Checks what the crate
/// promises whatever the lane holds: a message claims the lane's sender and
/// fits `max_message`; a corrupt lane is reported once, named, and stays
/// silent after. Returns the payloads received and the corruption seen.
pub fn drain(rx: &mut Endpoint, senders: &[u32], pattern: u64) -> (Vec<(u32, Vec<u8>)>, Vec<u32>) {
    let max = rx.segment().layout().max_message();
    let mut got = Vec::new();
    // Lanes poisoned by earlier calls stay silent too.
    let before: Vec<u32> = rx.poisoned_lanes().map(|(s, _)| s).collect();
    let mut corrupt: Vec<u32> = Vec::new();
    for i in 0..RECV_CALLS {
        let lend = (pattern >> (i % 64)) & 1 == 1;
        let wait = (pattern >> ((i + 17) % 64)) & 1 == 1;
        let lent = |r: shmcluster::raw::Received<'_>| {
            let payload = r.payload().to_vec();
            assert_eq!(payload.len(), r.payload().len());
            let _ = (r.tag(), r.generation(), r.is_in_lane(), format!("{r:?}"));
            (r.sender(), payload)
        };
        let result = match (lend, wait) {
            (true, false) => rx.try_recv_ref().map(lent),
            // The waiting receive (its spin loop finds a lane, then reads
            // it), with a deadline already passed: a timeout is "empty".
            (true, true) => rx
                .recv_ref(Some(std::time::Instant::now()))
                .map(lent)
                .map_err(|e| match e {
                    RecvError::Timeout => TryRecvError::Empty,
                    RecvError::Corrupt { sender, error } => TryRecvError::Corrupt { sender, error },
                }),
            (false, _) => rx.try_recv().map(|m| (m.sender, m.payload)),
        };
        match result {
            Ok((sender, payload)) => {
                assert!(
                    senders.contains(&sender),
                    "message from unexpected sender {sender}"
                );
                assert!(
                    !corrupt.contains(&sender) && !before.contains(&sender),
                    "message from poisoned lane {sender}"
                );
                assert!(
                    payload.len() <= max,
                    "{} bytes > max_message {max}",
                    payload.len()
                );
                got.push((sender, payload));
            }
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Corrupt { sender, error }) => {
                let _ = error.to_string();
                assert!(senders.contains(&sender), "corruption blamed on {sender}");
                assert!(
                    !corrupt.contains(&sender) && !before.contains(&sender),
                    "lane {sender} reported twice"
                );
                corrupt.push(sender);
            }
        }
    }
    let mut poisoned: Vec<u32> = rx.poisoned_lanes().map(|(s, _)| s).collect();
    poisoned.sort_unstable();
    let mut reported = [before, corrupt.clone()].concat();
    reported.sort_unstable();
    assert_eq!(
        poisoned, reported,
        "poisoned_lanes() disagrees with the errors returned"
    );
    (got, corrupt)
}

// ------------------------------------------------------------------ lane

/// `scribble_lane` mode bits (first input byte).
pub mod lane_mode {
    /// Send real messages 0 → 1 first.
    pub const PREFILL: u8 = 1;
    /// Open the receiver before the scribble and consume some messages.
    pub const RECEIVER_FIRST: u8 = 2;
    /// Head and tail as small multiples of 8 (likely-looking indices).
    pub const SMALL_INDICES: u8 = 4;
    /// Add a large base to both indices (arithmetic near 2^64).
    pub const BIG_BASE: u8 = 8;
    /// Leave head, tail and space-waiter words alone: scribble the ring only.
    pub const KEEP_INDICES: u8 = 16;
    /// With SMALL_INDICES: tail up to two lanes past the head, not one.
    pub const WIDE_TAIL: u8 = 32;
    /// Write the ring bytes at the head's ring offset, not at 0.
    pub const RING_AT_HEAD: u8 = 64;
    /// Send more messages 0 → 1 after the scribble.
    pub const SEND_AFTER: u8 = 128;
}

/// What [`scribble_lane`] observed.
#[derive(Debug, Default)]
pub struct LaneOutcome {
    /// Messages received.
    pub received: usize,
    /// Whether the lane was reported corrupt.
    pub corrupt: bool,
}

/// Sets the commit bit and the position's stamp in the flags of `count`
/// records in a chain from position `pos` of the ring at `ring` (as the
/// sender's commit does: see `crate::lane` in the library), keeping their
/// length, kind bits and the rest as they are.
fn commit_chain(scribbler: &Scribbler, ring: usize, cap: usize, mut pos: u64, count: u8) {
    const COMMITTED: u64 = 0x8000;
    const STAMP_BITS: u64 = 0x7FF0;
    for _ in 0..count {
        if !pos.is_multiple_of(8) {
            return;
        }
        let mut offset = (pos % cap as u64) as usize;
        if cap - offset < 32 {
            pos = pos.wrapping_add((cap - offset) as u64);
            offset = 0;
        }
        let w0 = scribbler.load64(ring + offset);
        let flags = (w0 >> 32) & 0xF | COMMITTED | ((pos >> 3) << 4) & STAMP_BITS;
        scribbler.store64(ring + offset, w0 & !(0xFFFF << 32) | flags << 32);
        let len = (w0 as u32 as u64).min(cap as u64);
        pos = pos.wrapping_add(if w0 >> 32 & 0xF == 4 {
            (cap - offset) as u64
        } else {
            (32 + len).div_ceil(8) * 8
        });
    }
}

/// The `lane` target: builds a valid two-slot segment, overwrites lane
/// 0 → 1's control block and ring through a second mapping with `data`,
/// then drains slot 1. See `fuzz/README.md` for the input layout.
pub fn scribble_lane(data: &[u8]) -> LaneOutcome {
    use lane_mode::*;
    let mut input = Input::new(data);
    let mode = input.u8();
    let segment = Segment::create(
        &Config::new(2)
            .lane_capacity(LANE_CAPACITY)
            .max_message(MAX_MESSAGE),
    )
    .expect("create");
    let layout = *segment.layout();
    let cap = layout.lane_capacity();
    let ctl = layout.lane_ctl(0, 1);
    let ring = layout.lane_data(0, 1);
    let bells_of_1 = layout.doorbell_offset(1);
    let scribbler = Scribbler::new(segment.fd(), layout.size());

    // Every message sent and not yet received, in order; only checked when
    // the lane was left intact.
    let mut expected: VecDeque<Vec<u8>> = VecDeque::new();
    let mut rx = (mode & RECEIVER_FIRST != 0).then(|| segment.endpoint(1).expect("slot 1"));
    let mut tx = None;
    let mut seq = 0u8;
    let mut send = |tx: &mut Endpoint, len: u16, expected: &mut VecDeque<Vec<u8>>| {
        seq = seq.wrapping_add(1);
        let payload = vec![seq; usize::from(len) % (cap - cap / 4)];
        if tx.try_send(1, &payload).is_ok() {
            expected.push_back(payload);
        }
    };
    if mode & PREFILL != 0 {
        let tx = tx.insert(segment.endpoint(0).expect("slot 0"));
        for _ in 0..input.u8() % 8 {
            send(tx, input.u16(), &mut expected);
        }
    }
    if let Some(rx) = rx.as_mut() {
        for _ in 0..input.u8() % 8 {
            if let Ok(m) = rx.try_recv() {
                assert_eq!(
                    Some(m.payload),
                    expected.pop_front(),
                    "intact lane, before the scribble"
                );
            }
        }
    }

    // The scribble.
    let (raw_head, raw_tail, waiter) = (input.u64(), input.u64(), input.u32());
    let mut head = raw_head;
    let mut tail = raw_tail;
    if mode & SMALL_INDICES != 0 {
        head = (raw_head % (4 * cap as u64)) & !7;
        let span = if mode & WIDE_TAIL != 0 { 2 * cap } else { cap } as u64;
        tail = head + ((raw_tail % (span + 8)) & !7);
    }
    if mode & BIG_BASE != 0 {
        let base = input.u64() & !7;
        head = head.wrapping_add(base);
        tail = tail.wrapping_add(base);
    }
    let keep = mode & KEEP_INDICES != 0;
    if !keep {
        scribbler.store64(ctl + CTL_HEAD, head);
        scribbler.store64(ctl + CTL_TAIL, tail);
        scribbler.store32(ctl + CTL_SPACE_WAITER, waiter);
    }
    let stamps = input.u8() % 8;
    let ring_bytes = input.bytes(cap);
    let at = if mode & RING_AT_HEAD != 0 {
        (scribbler.load64(ctl + CTL_HEAD) % cap as u64) as usize
    } else {
        0
    };
    scribbler.write_ring(ring, cap, at, ring_bytes);
    // Random bytes almost never commit a record (the commit bit and the
    // position's stamp); commit up to 7 of them in a chain from the head,
    // so the garbage gets past the first word into the record checks.
    if !ring_bytes.is_empty() {
        commit_chain(&scribbler, ring, cap, scribbler.load64(ctl + CTL_HEAD), stamps);
    }
    // A writer that publishes also rings; without it a receiver that found
    // the lane empty would not look at it again.
    scribbler.or64(bells_of_1, 1);
    let intact = keep && ring_bytes.is_empty();

    if mode & SEND_AFTER != 0 {
        // A live sender keeps its own tail and validates the head it reads;
        // a new one (a respawned worker) starts from the words in the lane.
        let tx = tx.get_or_insert_with(|| segment.endpoint(0).expect("slot 0"));
        for _ in 0..input.u8() % 4 {
            send(tx, input.u16(), &mut expected);
        }
    }

    let mut rx = rx.unwrap_or_else(|| segment.endpoint(1).expect("slot 1"));
    let (got, corrupt) = drain(&mut rx, &[0], input.u64());
    if intact {
        assert!(
            corrupt.is_empty(),
            "an intact lane was reported corrupt: {corrupt:?}"
        );
        let got: Vec<Vec<u8>> = got.iter().map(|(_, p)| p.clone()).collect();
        assert_eq!(
            got,
            Vec::from(expected),
            "an intact lane lost or changed messages"
        );
    }
    LaneOutcome {
        received: got.len(),
        corrupt: !corrupt.is_empty(),
    }
}

// ---------------------------------------------------------------- attach

/// `attach_image` mode bits (first input byte).
pub mod attach_mode {
    /// Start from a real segment's image and patch it (else: raw bytes).
    pub const TEMPLATE: u8 = 1;
    /// Raw: pad the image with zeros up to the header's `size` field.
    pub const PAD_TO_CLAIMED: u8 = 2;
    /// Raw: pad the image to at least a page.
    pub const PAD_TO_PAGE: u8 = 4;
    /// Do not seal the memfd at all.
    pub const UNSEALED: u8 = 8;
    /// Seal against shrinking and growing, but not `F_SEAL_SEAL`.
    pub const NO_SEAL_SEAL: u8 = 16;
    /// After receiving, also try to send to every slot.
    pub const SEND: u8 = 32;
}

/// The `attach` target: `data` becomes a segment image (raw, or a real
/// segment patched), written to a sealed memfd and attached. If that works,
/// an endpoint receives (and optionally sends) a bounded number of times.
/// Returns the attach result's summary, for tests.
pub fn attach_image(data: &[u8]) -> Result<(), shmcluster::raw::AttachError> {
    use attach_mode::*;
    let mut input = Input::new(data);
    let mode = input.u8();
    let image = if mode & TEMPLATE != 0 {
        template_image(&mut input)
    } else {
        let mut image = input.rest().to_vec();
        if mode & PAD_TO_CLAIMED != 0 && image.len() >= HEADER_SIZE_FIELD + 8 {
            let claimed = u64::from_le_bytes(image[HEADER_SIZE_FIELD..][..8].try_into().unwrap());
            if claimed <= MAX_PADDED_IMAGE && claimed as usize > image.len() {
                image.resize(claimed as usize, 0);
            }
        }
        if mode & PAD_TO_PAGE != 0 && image.len() < 4096 {
            image.resize(4096, 0);
        }
        image
    };
    let seals = if mode & UNSEALED != 0 {
        0
    } else if mode & NO_SEAL_SEAL != 0 {
        libc::F_SEAL_SHRINK | libc::F_SEAL_GROW
    } else {
        SEALS
    };
    let fd = memfd_with(&image, 0, seals);
    let segment = Segment::attach(fd)?;
    let _ = format!("{segment:?}");
    let layout = *segment.layout();
    assert!(layout.size() as u64 <= image.len() as u64);
    assert!(seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) != 0);
    let workers = layout.workers();
    let slot = u32::from(input.u16()) % workers;
    let Ok(mut me) = segment.endpoint(slot) else {
        return Ok(()); // a garbage owner word may name a live process
    };
    let senders: Vec<u32> = (0..workers).collect();
    drain(&mut me, &senders, input.u64());
    if mode & SEND != 0 {
        for to in 0..workers.min(8) {
            let len = usize::from(input.u16()) % (2 * layout.lane_capacity());
            let _ = me.try_send(to, vec![0xA5; len]);
        }
        drain(&mut me, &senders, input.u64());
    }
    Ok(())
}

/// A real segment, with a little traffic in its lanes, read back as an image
/// and patched by the rest of the input: `[region, offset u16, len, bytes]`.
fn template_image(input: &mut Input<'_>) -> Vec<u8> {
    let config = input.u8();
    let workers = 1 + u32::from(config & 3);
    let cap = 4096 << ((config >> 2) & 1);
    let max_message = [64 * 1024, 100, 1 << 20][usize::from((config >> 3) & 3) % 3];
    let lock_slots = u32::from(config >> 5);
    let segment = Segment::create(
        &Config::new(workers)
            .lane_capacity(cap)
            .max_message(max_message)
            .lock_slots(lock_slots),
    )
    .expect("create");
    let layout = *segment.layout();
    {
        let mut endpoints: Vec<Endpoint> = (0..workers).map(|s| segment.endpoint(s).expect("slot")).collect();
        for i in 0..input.u8() % 16 {
            let from = input.u8() as usize % endpoints.len();
            let to = input.u8() as u32 % workers;
            let len = usize::from(input.u16()) % (cap * 3 / 4);
            let _ = endpoints[from].try_send(to, vec![i; len]);
        }
        for _ in 0..input.u8() % 4 {
            let at = input.u8() as usize % endpoints.len();
            let _ = endpoints[at].try_recv();
        }
    }
    let mut image = read_image(segment.fd());
    assert_eq!(image.len(), layout.size());
    let n = workers as usize;
    let regions = [
        (0, 4096),
        (
            layout.slot_offset(0),
            layout.lane_ctl(0, 0) - layout.slot_offset(0),
        ),
        (layout.lane_ctl(0, 0), n * n * CTL_SIZE),
        (layout.lane_data(0, 0), n * n * cap),
        (0, image.len()),
    ];
    while !input.data.is_empty() {
        let (start, len) = regions[usize::from(input.u8()) % regions.len()];
        let scale = if len > 1 << 16 { 8 } else { 1 };
        let at = start + (usize::from(input.u16()) * scale) % len;
        let bytes = {
            let n = usize::from(input.u8() % 16) + 1;
            input.bytes(n)
        };
        let end = (at + bytes.len()).min(image.len());
        image[at..end].copy_from_slice(&bytes[..end - at]);
    }
    image
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_short_inputs() {
        for data in [&[][..], &[0xff], &[1, 2, 3], &[0xff; 64]] {
            let _ = attach_image(data);
            scribble_lane(data);
        }
    }

    #[test]
    fn an_unpatched_template_attaches() {
        attach_image(&[attach_mode::TEMPLATE]).expect("a real segment attaches");
    }

    #[test]
    fn an_intact_lane_delivers() {
        // PREFILL | KEEP_INDICES, 3 messages of 10, 20, 30 bytes.
        let data = [
            lane_mode::PREFILL | lane_mode::KEEP_INDICES,
            3,
            10,
            0,
            20,
            0,
            30,
            0,
        ];
        let out = scribble_lane(&data);
        assert_eq!(out.received, 3);
        assert!(!out.corrupt);
    }
}
