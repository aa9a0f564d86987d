//! MinHash signatures at BigCode's settings: tokens are the lower-cased text split on
//! non-word characters, shingles are 5 consecutive tokens, each shingle's 64-bit hash is
//! put through `perms` permutations `h -> a*h + b (mod 2^64)` (a odd: a bijection), and
//! the minimum of each is kept; bands of `rows` minima are hashed into bucket keys.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MinHashConfig {
    pub ngram: usize,
    pub perms: usize,
    pub bands: usize,
    pub rows: usize,
    pub seed: u64,
}

impl Default for MinHashConfig {
    /// StarCoder's: 5-grams, 256 permutations, 25 bands of 10 rows (threshold ~0.7).
    fn default() -> Self {
        MinHashConfig {
            ngram: 5,
            perms: 256,
            bands: 25,
            rows: 10,
            seed: 42,
        }
    }
}

impl MinHashConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.ngram == 0 || self.rows == 0 || self.bands == 0 {
            return Err("ngram, bands and rows must be positive".into());
        }
        if self.bands * self.rows > self.perms {
            return Err(format!(
                "bands x rows = {} needs at least that many permutations (perms = {})",
                self.bands * self.rows,
                self.perms
            ));
        }
        Ok(())
    }

    /// The Jaccard similarity at which a pair becomes a candidate with probability 1/2.
    pub fn threshold(&self) -> f64 {
        (1.0 / self.bands as f64).powf(1.0 / self.rows as f64)
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

pub struct MinHasher {
    config: MinHashConfig,
    a: Vec<u64>,
    b: Vec<u64>,
}

impl MinHasher {
    pub fn new(config: MinHashConfig) -> Self {
        let mut state = config.seed;
        let mut next = || {
            state = state.wrapping_add(1);
            splitmix64(state)
        };
        let a = (0..config.perms).map(|_| next() | 1).collect();
        let b = (0..config.perms).map(|_| next()).collect();
        MinHasher { config, a, b }
    }

    /// The distinct shingle hashes of a text; `None` when it has fewer tokens than a
    /// shingle (such files are never near-duplicates).
    pub fn shingles(&self, text: &str) -> Option<Vec<u64>> {
        let tokens = token_hashes(text);
        let n = self.config.ngram;
        if tokens.len() < n {
            return None;
        }
        let mut shingles: Vec<u64> = tokens
            .windows(n)
            .map(|w| {
                splitmix64(w.iter().fold(0u64, |h, t| {
                    h.wrapping_mul(0x100_0000_01b3).wrapping_add(*t)
                }))
            })
            .collect();
        shingles.sort_unstable();
        shingles.dedup();
        Some(shingles)
    }

    /// The bucket key of every band, or `None` for texts too short to shingle.
    pub fn band_keys(&self, text: &str) -> Option<Vec<u64>> {
        let shingles = self.shingles(text)?;
        let mins = self.signature(&shingles);
        let rows = self.config.rows;
        Some(
            (0..self.config.bands)
                .map(|band| {
                    let mut h = xxhash_rust::xxh3::Xxh3::new();
                    h.update(&(band as u64).to_le_bytes());
                    for m in &mins[band * rows..(band + 1) * rows] {
                        h.update(&m.to_le_bytes());
                    }
                    h.digest()
                })
                .collect(),
        )
    }

    pub fn signature(&self, shingles: &[u64]) -> Vec<u64> {
        let mut mins = vec![u64::MAX; self.config.perms];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512dq") {
                // SAFETY: the CPU has the features the function is compiled for.
                unsafe { minimize_avx512(&self.a, &self.b, shingles, &mut mins) };
                return mins;
            }
        }
        minimize(&self.a, &self.b, shingles, &mut mins);
        mins
    }
}

/// The permutation loop; written so the compiler vectorizes it over permutations.
#[inline(always)]
fn minimize(a: &[u64], b: &[u64], shingles: &[u64], mins: &mut [u64]) {
    for &h in shingles {
        for ((m, &a), &b) in mins.iter_mut().zip(a).zip(b) {
            *m = (*m).min(a.wrapping_mul(h).wrapping_add(b));
        }
    }
}

/// The same loop with 64-bit vector multiplies (8 permutations per instruction).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn minimize_avx512(a: &[u64], b: &[u64], shingles: &[u64], mins: &mut [u64]) {
    minimize(a, b, shingles, mins)
}

/// Hashes of the lower-cased tokens, split on non-word characters (`\W+`): ASCII
/// letters, digits and `_` are word characters, and so is every non-ASCII character.
pub fn token_hashes(text: &str) -> Vec<u64> {
    // Lower-cased value + 1 for word bytes, 0 for separators.
    const CLASS: [u8; 256] = {
        let mut t = [0u8; 256];
        let mut b = 0;
        while b < 256 {
            let c = b as u8;
            if c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80 {
                t[b] = c.to_ascii_lowercase().wrapping_add(1);
            }
            b += 1;
        }
        t
    };
    let mut out = Vec::with_capacity(text.len() / 4);
    // Rotate-xor keeps the per-byte dependency chain short; splitmix64 mixes at the end.
    let mut h: u64 = 0;
    let mut len = 0u32;
    for &byte in text.as_bytes() {
        let c = CLASS[byte as usize];
        if c != 0 {
            h = h.rotate_left(7) ^ c as u64;
            len += 1;
        } else if len > 0 {
            out.push(splitmix64(h ^ ((len as u64) << 56)));
            h = 0;
            len = 0;
        }
    }
    if len > 0 {
        out.push(splitmix64(h ^ ((len as u64) << 56)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jaccard_estimate(h: &MinHasher, x: &str, y: &str) -> f64 {
        let (a, b) = (
            h.signature(&h.shingles(x).unwrap()),
            h.signature(&h.shingles(y).unwrap()),
        );
        a.iter().zip(&b).filter(|(p, q)| p == q).count() as f64 / a.len() as f64
    }

    #[test]
    fn tokens_ignore_case_and_punctuation() {
        assert_eq!(token_hashes("Foo(bar, BAZ);"), token_hashes("foo bar\nbaz"));
        assert_eq!(token_hashes("a_b c").len(), 2);
    }

    #[test]
    fn estimates_follow_jaccard_similarity() {
        let h = MinHasher::new(MinHashConfig::default());
        let base: String = (0..400)
            .map(|i| format!("int value{i} = compute(x{i});\n"))
            .collect();
        let near = base.replace("value7 ", "renamed7 ");
        let far: String = (0..400)
            .map(|i| format!("double other{i} = f(y{i} + 3);\n"))
            .collect();
        assert_eq!(jaccard_estimate(&h, &base, &base), 1.0);
        assert!(jaccard_estimate(&h, &base, &near) > 0.9);
        assert!(jaccard_estimate(&h, &base, &far) < 0.05);
    }

    #[test]
    fn short_texts_have_no_signature() {
        let h = MinHasher::new(MinHashConfig::default());
        assert!(h.band_keys("int x = 1;").is_none());
        assert_eq!(h.band_keys("int x = f(y, z);").unwrap().len(), 25);
    }

    #[test]
    fn vectorized_and_plain_loops_agree() {
        let h = MinHasher::new(MinHashConfig::default());
        let shingles = h
            .shingles(&"alpha beta gamma delta epsilon zeta eta theta ".repeat(9))
            .unwrap();
        let mut plain = vec![u64::MAX; 256];
        minimize(&h.a, &h.b, &shingles, &mut plain);
        assert_eq!(h.signature(&shingles), plain);
        assert!((MinHashConfig::default().threshold() - 0.7248).abs() < 1e-3);
    }
}
