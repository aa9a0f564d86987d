use std::sync::atomic::{AtomicU32, Ordering};

/// A union-find that many threads may update at once. Roots are always the smallest
/// index of their set (a larger root is linked under a smaller one), so the result is
/// the same whatever order the unions came in, and the root of a cluster is its first
/// document in input order.
pub struct UnionFind {
    parent: Vec<AtomicU32>,
}

impl UnionFind {
    pub const BYTES_PER_DOCUMENT: usize = 4;

    pub fn new(n: usize) -> Self {
        UnionFind {
            parent: (0..n as u32).map(AtomicU32::new).collect(),
        }
    }

    pub fn find(&self, mut x: u32) -> u32 {
        loop {
            let p = self.parent[x as usize].load(Ordering::Acquire);
            if p == x {
                return x;
            }
            let gp = self.parent[p as usize].load(Ordering::Acquire);
            // Path halving; a lost race only means less compression.
            let _ = self.parent[x as usize].compare_exchange(
                p,
                gp,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
            x = gp;
        }
    }

    pub fn union(&self, a: u32, b: u32) {
        loop {
            let (ra, rb) = (self.find(a), self.find(b));
            if ra == rb {
                return;
            }
            let (small, large) = if ra < rb { (ra, rb) } else { (rb, ra) };
            if self.parent[large as usize]
                .compare_exchange(large, small, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn parallel_unions_give_min_index_roots() {
        let n = 10_000u32;
        let uf = UnionFind::new(n as usize);
        // Evens chain together, odds chain together, linked from many threads in
        // reverse order.
        (0..n - 2)
            .into_par_iter()
            .rev()
            .for_each(|i| uf.union(i + 2, i));
        for i in 0..n {
            assert_eq!(uf.find(i), i % 2);
        }
        uf.union(n - 1, n - 2);
        assert!((0..n).all(|i| uf.find(i) == 0));
    }
}
