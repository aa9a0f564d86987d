//! Exact cosine search (`cxxlm_index::Vectors::search`, what `cxxlm index query
//! --semantic` runs) against usearch's HNSW graph on the same unit vectors: the time to
//! build the graph, its memory, each search's median time over the same queries, and the
//! graph's recall@10 of the exact top 10. Vectors are drawn around 1,000 centres (code
//! embeddings cluster by project and idiom), or uniformly with `uniform` (the hard case for
//! a graph).
//!
//! `cargo run --release --manifest-path benches/index/ann/Cargo.toml -- FUNCTIONS DIM f32|f16|i8 [uniform]`

use cxxlm_index::vectors::{FileVectors, StoredFunction};
use cxxlm_index::Vectors;
use rayon::prelude::*;
use std::time::Instant;
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

const PER_FILE: usize = 10;
const QUERIES: usize = 101;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let functions: usize = args
        .first()
        .map_or(100_000, |a| a.parse().expect("FUNCTIONS"));
    let dim: usize = args.get(1).map_or(768, |a| a.parse().expect("DIM"));
    let kind = match args.get(2).map(String::as_str) {
        Some("f16") => ScalarKind::F16,
        Some("i8") => ScalarKind::I8,
        _ => ScalarKind::F32,
    };
    let uniform = args.get(3).is_some_and(|a| a == "uniform");
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let centres: Vec<Vec<f32>> = (0..1000)
        .map(|_| (0..dim).map(|_| noise()).collect())
        .collect();
    let mut draw = |i: usize| {
        let v: Vec<f32> = match uniform {
            true => (0..dim).map(|_| noise()).collect(),
            false => centres[i % centres.len()]
                .iter()
                .map(|c| c + 0.6 * noise())
                .collect(),
        };
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect::<Vec<f32>>()
    };
    let vectors: Vec<Vec<f32>> = (0..functions).map(&mut draw).collect();
    let queries: Vec<Vec<f32>> = (0..QUERIES).map(|q| draw(q * 7)).collect();

    let mut store = Vectors::new("probe".into(), "none".into(), dim);
    for (f, chunk) in vectors.chunks(PER_FILE).enumerate() {
        let v = FileVectors {
            hash: f as u64,
            file: chunk[0].clone(),
            functions: (0..chunk.len())
                .map(|i| StoredFunction {
                    name: format!("{}", f * PER_FILE + i),
                    line: 1,
                    end_line: 2,
                })
                .collect(),
            function_vectors: chunk.concat(),
        };
        store
            .insert(format!("file{f:07}.cpp"), v)
            .expect("the store's dimension");
    }

    let options = IndexOptions {
        dimensions: dim,
        metric: MetricKind::IP,
        quantization: kind,
        connectivity: 16,
        expansion_add: 128,
        expansion_search: 64,
        multi: false,
    };
    let graph = Index::new(&options).expect("a usearch index");
    graph.reserve(functions).expect("room for the vectors");
    let t = Instant::now();
    vectors
        .par_iter()
        .enumerate()
        .for_each(|(i, v)| graph.add(i as u64, v).expect("adding a vector"));
    let build = t.elapsed().as_secs_f64();

    let (mut exact_ms, mut graph_ms, mut found) = (Vec::new(), Vec::new(), 0);
    for q in &queries {
        let t = Instant::now();
        let (hits, _) = store.search(q, 10);
        exact_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let matches = graph.search(q, 10).expect("a search");
        graph_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let truth: Vec<u64> = hits
            .iter()
            .map(|h| h.name.parse().expect("a number"))
            .collect();
        found += matches.keys.iter().filter(|k| truth.contains(k)).count();
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (exact, approximate) = (median(exact_ms), median(graph_ms));
    println!(
        "{functions} x {dim} ({}), {} threads: exact {exact:.2} ms a query; usearch HNSW {kind:?} {approximate:.3} ms a query ({:.0}x), recall@10 {:.3}, built in {build:.1} s, {} MB",
        if uniform { "uniform" } else { "clustered" },
        rayon::current_num_threads(),
        exact / approximate,
        found as f64 / (10 * QUERIES) as f64,
        graph.memory_usage() >> 20,
    );
}
