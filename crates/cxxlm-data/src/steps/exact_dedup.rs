use std::collections::HashSet;

/// A 128-bit content hash; collisions among fewer than 2^40 documents are negligible.
pub fn content_hash(text: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(text.as_bytes())
}

/// Keeps the first document of each content hash, in input order.
#[derive(Debug, Default)]
pub struct ExactDedup {
    seen: HashSet<u128>,
}

impl ExactDedup {
    pub fn with_seen(hashes: impl IntoIterator<Item = u128>) -> Self {
        ExactDedup {
            seen: hashes.into_iter().collect(),
        }
    }

    /// True the first time a hash is offered.
    pub fn first(&mut self, hash: u128) -> bool {
        self.seen.insert(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_occurrence_wins_and_state_restores() {
        let mut d = ExactDedup::default();
        assert!(d.first(content_hash("a")));
        assert!(!d.first(content_hash("a")));
        assert!(d.first(content_hash("b")));
        let mut restored = ExactDedup::with_seen([content_hash("a")]);
        assert!(!restored.first(content_hash("a")));
    }
}
