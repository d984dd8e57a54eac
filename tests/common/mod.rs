//! Small helpers shared by the integration tests (`mod common;`).

// Each test binary includes this whole module but uses only part of it.
#![allow(dead_code)]

/// xorshift64*: small, deterministic, good enough for garbage and test data.
pub struct Rng(u64);

impl Rng {
    /// Starts from `seed` itself (0, which xorshift never leaves, becomes 1).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// Starts from `seed` spread over all 64 bits (a golden-ratio multiply),
    /// so that nearby seeds give unrelated sequences.
    pub fn spread(seed: u64) -> Self {
        Self::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next pseudo-random word.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// `n` pseudo-random bytes, one per step.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Fills `buf` with pseudo-random bytes, eight per step.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}
