//! SplitMix64: a tiny generator whose whole state is one `u64`, so FIM decisions and
//! loader shuffles are reproducible from a seed and cheap to save.

#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for one item of a seeded stream (a document id, an epoch).
    pub fn keyed(seed: u64, key: &[u8]) -> Self {
        Rng(xxhash_rust::xxh3::xxh3_64_with_seed(key, seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), by multiply-shift.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_streams_repeat_and_stay_in_range() {
        let a: Vec<u64> = (0..5).map(|_| Rng::keyed(3, b"doc").below(10)).collect();
        assert!(a.iter().all(|&x| x == a[0] && x < 10));
        let mut r = Rng::keyed(1, b"");
        let hits = (0..10_000).filter(|_| r.chance(0.3)).count();
        assert!((2_700..3_300).contains(&hits), "{hits}");
        let mut v: Vec<u32> = (0..100).collect();
        Rng::keyed(9, b"").shuffle(&mut v);
        let mut sorted = v.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(v, sorted);
    }
}
