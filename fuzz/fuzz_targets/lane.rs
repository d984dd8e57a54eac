#![no_main]
//! Garbage over a lane's control block and ring of a valid segment: the
//! receiver must report it (or deliver what is there), never panic.
//! See `shmcluster_fuzz::scribble_lane` and `fuzz/README.md`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    shmcluster_fuzz::scribble_lane(data);
});
