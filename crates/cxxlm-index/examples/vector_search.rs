//! Exact cosine search over a store of N random unit vectors of dimension D (LLVM's
//! whole tree has about 1.1 million definitions; d12's width is 768): the time to
//! rank every stored function and file for one query, the median of 21 queries, and
//! the store's size on disk and time to load.
//!
//! `cargo run --release -p cxxlm-index --example vector_search -- [FUNCTIONS] [DIM] [FUNCTIONS_PER_FILE]`

use cxxlm_index::vectors::{FileVectors, StoredFunction};
use cxxlm_index::Vectors;
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| {
            a.parse()
                .expect("numbers: FUNCTIONS DIM FUNCTIONS_PER_FILE")
        })
        .collect();
    let functions = args.first().copied().unwrap_or(100_000);
    let dim = args.get(1).copied().unwrap_or(768);
    let per_file = args.get(2).copied().unwrap_or(10).max(1);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut unit = || {
        let v: Vec<f32> = (0..dim)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect::<Vec<f32>>()
    };
    let mut store = Vectors::new("random".into(), "none".into(), dim);
    for f in 0..functions.div_ceil(per_file) {
        let n = per_file.min(functions - f * per_file);
        let v = FileVectors {
            hash: f as u64,
            file: unit(),
            functions: (0..n)
                .map(|i| StoredFunction {
                    name: format!("function_{f}_{i}"),
                    line: 1 + 20 * i as u32,
                    end_line: 15 + 20 * i as u32,
                })
                .collect(),
            function_vectors: (0..n).flat_map(|_| unit()).collect(),
        };
        store
            .insert(format!("dir{}/file{f}.cpp", f % 100), v)
            .expect("vectors of the store's dimension");
    }
    let mut times = Vec::new();
    for _ in 0..21 {
        let q = unit();
        let t = Instant::now();
        let (hits, _) = store.search(&q, 10);
        times.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(hits.len(), 10.min(functions));
    }
    times.sort_by(f64::total_cmp);
    let dir = std::env::temp_dir().join(format!("cxxlm-vectors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary folder");
    store.save(&dir).expect("saving the store");
    let size = std::fs::metadata(dir.join(cxxlm_index::vectors::VECTORS)).map_or(0, |m| m.len());
    let t = Instant::now();
    let loaded = Vectors::load(&dir).expect("loading").expect("a store");
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(loaded.functions(), functions);
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{functions} functions in {} files, dimension {dim}, {} threads: exact top-10 search {:.1} ms median (min {:.1}, max {:.1}); {:.0} MB on disk, loaded in {load_ms:.0} ms",
        store.files.len(),
        rayon::current_num_threads(),
        times[10],
        times[0],
        times[20],
        size as f64 / 1e6
    );
}
