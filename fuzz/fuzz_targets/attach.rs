#![no_main]
//! Arbitrary bytes as a segment image: `Segment::attach` must return `Ok` or
//! a typed error, and an endpoint on whatever attached must never panic.
//! See `shmcluster_fuzz::attach_image` and `fuzz/README.md`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = shmcluster_fuzz::attach_image(data);
});
