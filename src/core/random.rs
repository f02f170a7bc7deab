//! Where the core's random bytes come from: a [`Random`] source handed to it
//! ([`Server::with_random`](crate::core::server::Server::with_random)), so the core draws none
//! from the operating system itself.
//!
//! The core draws challenge nonces (§5.2, 32 bytes each) and the salts of password verifiers
//! (§5.3). Both must be unpredictable in a running server: [`OsRandom`], the system's CSPRNG
//! (through `aws-lc-rs`), is the default. [`SeededRandom`] repeats the same bytes for the same
//! seed, so a test can replay a run exactly; it is predictable by construction and must never
//! serve a real server.

/// A source of random bytes.
pub trait Random {
    /// Fills `buf` with random bytes.
    fn fill(&mut self, buf: &mut [u8]);
}

/// The operating system's CSPRNG ([`crate::crypto::fill_random`]): what a server uses.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsRandom;

impl Random for OsRandom {
    fn fill(&mut self, buf: &mut [u8]) {
        crate::crypto::fill_random(buf);
    }
}

/// A deterministic stream (SplitMix64) from a seed, **for tests only**: the same seed gives the
/// same bytes, so nonces and salts are predictable.
#[derive(Debug, Clone)]
pub struct SeededRandom {
    state: u64,
}

impl SeededRandom {
    /// A stream that starts from `seed`.
    pub fn new(seed: u64) -> SeededRandom {
        SeededRandom { state: seed }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl Random for SeededRandom {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(r: &mut dyn Random, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        r.fill(&mut buf);
        buf
    }

    #[test]
    fn a_seed_repeats_its_stream_and_another_seed_does_not() {
        let (mut a, mut b, mut c) = (
            SeededRandom::new(7),
            SeededRandom::new(7),
            SeededRandom::new(8),
        );
        let first = draw(&mut a, 37);
        assert_eq!(first, draw(&mut b, 37));
        assert_ne!(first, draw(&mut c, 37));
        // The stream moves on: the next draw differs from the first.
        assert_ne!(draw(&mut a, 37), first);
        // Odd lengths are filled to the end, not left zero.
        assert!(draw(&mut a, 3).iter().any(|&x| x != 0));
    }

    #[test]
    fn os_random_does_not_repeat() {
        let mut r = OsRandom;
        assert_ne!(draw(&mut r, 32), draw(&mut r, 32));
    }
}
