//! Decontamination: documents that share n-grams with an evaluation benchmark are
//! removed. Word 10-grams and character 50-grams (whitespace runs read as one space) of
//! every benchmark item are hashed into one table; a document is scanned with rolling
//! hashes, so the cost is one table lookup per position whatever the benchmark's size
//! (bigcode's exact substring search is a pass per item). N-grams that several items
//! share (their common `#include` lines and test harness) are left out of the table, so
//! that only an item's own text counts. Held-out projects are items too, one per file: a
//! document is dropped as one of their files only when most of it is that file (packages
//! vendor each other's sources), not for the licence banner it shares with it.

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

use super::{Counters, Step, Verdict};
use crate::document::Document;
use crate::error::{DataError, Result};
use crate::shard::{parse, shard_lines};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DecontaminateConfig {
    pub enabled: bool,
    /// Check against the built-in MBPP-C++ (MultiPL-E, 398 problems).
    pub mbpp: bool,
    /// More benchmarks: JSON lines files; every string field of a record is its text.
    pub benchmarks: Vec<PathBuf>,
    /// Words per word n-gram (0: none).
    pub word_ngram: usize,
    /// Characters per character n-gram (0: none).
    pub char_ngram: usize,
    /// A document matches an item when it shares this many distinct n-grams with it.
    pub min_matches: usize,
    /// N-grams found in this many items or more are boilerplate, not counted.
    pub shared_items: usize,
    /// Held-out projects: `data run` outputs (directories of `part-*.jsonl.zst` shards)
    /// or shard files, each of their documents an item.
    pub held_out: Vec<PathBuf>,
    /// A document matches a held-out file only when this share of its n-grams is in it.
    pub held_out_share: f64,
}

impl Default for DecontaminateConfig {
    fn default() -> Self {
        DecontaminateConfig {
            enabled: true,
            mbpp: true,
            benchmarks: Vec::new(),
            word_ngram: 10,
            char_ngram: 50,
            min_matches: 3,
            shared_items: 3,
            held_out: Vec::new(),
            held_out_share: 0.5,
        }
    }
}

/// One benchmark item: its name, where it comes from, its text, and the share of a
/// document's n-grams that must be in it for the document to match (0: any number).
#[derive(Debug, Clone)]
pub struct Item {
    pub benchmark: String,
    pub name: String,
    pub text: String,
    pub min_share: f64,
}

/// The items of a JSON lines benchmark; the name is `name`, `task_id` or `id`, else
/// the line number.
pub fn read_benchmark(path: &Path) -> Result<Vec<Item>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    parse_benchmark(&text, &path.display().to_string())
}

fn parse_benchmark(text: &str, benchmark: &str) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value = serde_json::from_str(line).map_err(|e| DataError::Input {
            input: benchmark.to_string(),
            message: format!("line {}: {e}", i + 1),
        })?;
        let name = ["name", "task_id", "id"]
            .iter()
            .find_map(|k| v.get(k).and_then(Value::as_str))
            .map_or_else(|| format!("{}", i + 1), str::to_string);
        let mut strings = Vec::new();
        collect_strings(&v, &mut strings);
        items.push(Item {
            benchmark: benchmark.to_string(),
            name,
            text: strings.join("\n"),
            min_share: 0.0,
        });
    }
    Ok(items)
}

/// The files of a held-out project's shards (a `data run` output or shard files), each
/// an item named by its document id.
pub fn read_held_out(path: &Path, min_share: f64) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    for shard in &crate::near_dedup::shards_at(path)? {
        for line in shard_lines(shard)? {
            let (i, line) = line?;
            let doc = parse(shard, i, &line)?;
            items.push(Item {
                benchmark: "held-out".into(),
                name: doc.id,
                text: doc.text,
                min_share,
            });
        }
    }
    Ok(items)
}

fn collect_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| collect_strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| collect_strings(x, out)),
        _ => {}
    }
}

/// The built-in MBPP-C++ as items.
pub fn mbpp_items() -> Result<Vec<Item>> {
    let problems = cxxlm_eval::bench::mbpp_cpp().map_err(|e| DataError::Config(e.to_string()))?;
    Ok(problems
        .into_iter()
        .map(|p| Item {
            benchmark: "mbpp-cpp".into(),
            name: p.name,
            text: format!("{}\n{}", p.prompt, p.tests),
            min_share: 0.0,
        })
        .collect())
}

const SEED: u64 = 0x9E37_79B9_7F4A_7C15;

fn mix(h: u64) -> u64 {
    // splitmix64's finalizer: spreads a polynomial hash over the table's bits.
    let mut z = h;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Calls `f` with the hash of every word n-gram and character n-gram of `text`.
fn ngrams(text: &str, words: usize, chars: usize, f: &mut dyn FnMut(u64)) {
    // Word n-grams: lower-cased runs of letters, digits and `_`. An n-gram counts only if
    // half its words hold a letter, and a character n-gram only if a fifth of it is
    // letters: tables of numbers (digit tables, `{1, 1}, {2, 3}` test data) are shared
    // by benchmarks and unrelated code alike.
    if words > 0 {
        let mut hashes: Vec<(u64, bool)> = Vec::new();
        let mut h = SEED;
        let mut in_word = false;
        let mut has_letter = false;
        for b in text.bytes() {
            if b.is_ascii_alphanumeric() || b == b'_' {
                h = h.wrapping_mul(0x100_0000_01B3) ^ u64::from(b.to_ascii_lowercase());
                in_word = true;
                has_letter |= b.is_ascii_alphabetic();
            } else if in_word {
                hashes.push((mix(h), has_letter));
                h = SEED;
                in_word = false;
                has_letter = false;
            }
        }
        if in_word {
            hashes.push((mix(h), has_letter));
        }
        for w in hashes.windows(words) {
            if 2 * w.iter().filter(|(_, letter)| *letter).count() < words {
                continue;
            }
            let g = w.iter().fold(1u64, |acc, &(x, _)| {
                acc.wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(x)
            });
            f(mix(g ^ 1));
        }
    }
    // Character n-grams over the text with whitespace runs as one space (a rolling
    // polynomial hash: one multiply-add per byte).
    if chars > 0 {
        const B: u64 = 0x100_0000_01B3;
        let pow = (0..chars).fold(1u64, |p, _| p.wrapping_mul(B));
        let mut window: std::collections::VecDeque<u8> =
            std::collections::VecDeque::with_capacity(chars + 1);
        let mut h = 0u64;
        let mut letters = 0;
        let mut last_space = true;
        for b in text.bytes() {
            let b = if b.is_ascii_whitespace() {
                if last_space {
                    continue;
                }
                last_space = true;
                b' '
            } else {
                last_space = false;
                b
            };
            h = h.wrapping_mul(B).wrapping_add(u64::from(b) + 1);
            window.push_back(b);
            letters += usize::from(b.is_ascii_alphabetic());
            if window.len() > chars {
                let out = window.pop_front().unwrap_or(0);
                letters -= usize::from(out.is_ascii_alphabetic());
                h = h.wrapping_sub(pow.wrapping_mul(u64::from(out) + 1));
            }
            if window.len() == chars && 5 * letters >= chars {
                f(mix(h ^ 2));
            }
        }
    }
}

/// A match: the item a document overlaps, and by how many distinct n-grams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub benchmark: String,
    pub item: String,
    pub matches: usize,
}

pub struct BenchmarkIndex {
    items: Vec<Item>,
    /// n-gram hash -> the one item holding it.
    table: FxHashMap<u64, u32>,
    words: usize,
    chars: usize,
    min_matches: usize,
}

impl BenchmarkIndex {
    pub fn new(items: Vec<Item>, config: &DecontaminateConfig) -> Self {
        // n-gram -> (first item, number of items holding it)
        let mut seen: FxHashMap<u64, (u32, u32)> = FxHashMap::default();
        for (i, item) in items.iter().enumerate() {
            let mut mine = rustc_hash::FxHashSet::default();
            ngrams(&item.text, config.word_ngram, config.char_ngram, &mut |h| {
                mine.insert(h);
            });
            for h in mine {
                let e = seen.entry(h).or_insert((i as u32, 0));
                e.1 += 1;
            }
        }
        let shared = config.shared_items.max(2) as u32;
        let table = seen
            .into_iter()
            .filter(|(_, (_, n))| *n < shared)
            .map(|(h, (i, _))| (h, i))
            .collect();
        BenchmarkIndex {
            items,
            table,
            words: config.word_ngram,
            chars: config.char_ngram,
            min_matches: config.min_matches.max(1),
        }
    }

    /// The items of the configured benchmarks.
    pub fn from_config(config: &DecontaminateConfig) -> Result<Self> {
        let mut items = if config.mbpp {
            mbpp_items()?
        } else {
            Vec::new()
        };
        for path in &config.benchmarks {
            items.extend(read_benchmark(path)?);
        }
        if !(0.0..=1.0).contains(&config.held_out_share) {
            return Err(DataError::Config(format!(
                "decontaminate: held_out_share is a share of a document's n-grams, from 0 to 1, not {}",
                config.held_out_share
            )));
        }
        for path in &config.held_out {
            items.extend(read_held_out(path, config.held_out_share)?);
        }
        if items.is_empty() {
            return Err(DataError::Config(
                "decontaminate: no benchmark (set mbpp = true or give benchmarks or held_out)"
                    .into(),
            ));
        }
        Ok(Self::new(items, config))
    }

    pub fn items(&self) -> usize {
        self.items.len()
    }

    pub fn ngrams(&self) -> usize {
        self.table.len()
    }

    /// The item `text` overlaps most among those whose thresholds it reaches.
    pub fn find(&self, text: &str) -> Option<Match> {
        // item -> (its distinct n-grams found, the positions where they were found)
        let mut hits: FxHashMap<u32, (rustc_hash::FxHashSet<u64>, usize)> = FxHashMap::default();
        let mut positions = 0usize;
        ngrams(text, self.words, self.chars, &mut |h| {
            positions += 1;
            if let Some(&i) = self.table.get(&h) {
                let e = hits.entry(i).or_default();
                e.0.insert(h);
                e.1 += 1;
            }
        });
        let (item, n) = hits
            .into_iter()
            .filter(|(i, (found, at))| {
                found.len() >= self.min_matches
                    && *at as f64 >= self.items[*i as usize].min_share * positions as f64
            })
            .map(|(i, (found, _))| (i, found.len()))
            .max_by_key(|&(i, n)| (n, std::cmp::Reverse(i)))?;
        let item = &self.items[item as usize];
        Some(Match {
            benchmark: item.benchmark.clone(),
            item: item.name.clone(),
            matches: n,
        })
    }
}

/// The pipeline step: a document overlapping a benchmark item is dropped, with the item
/// recorded in its `meta.decontaminate` (written under `removed/` with `--write-removed`).
pub struct Decontaminate {
    index: BenchmarkIndex,
}

impl Decontaminate {
    pub fn new(config: &DecontaminateConfig) -> Result<Self> {
        Ok(Decontaminate {
            index: BenchmarkIndex::from_config(config)?,
        })
    }
}

impl Step for Decontaminate {
    fn name(&self) -> &'static str {
        "decontaminate"
    }

    fn apply(&self, doc: &mut Document, counters: &mut Counters) -> Verdict {
        match self.index.find(&doc.text) {
            Some(m) => {
                counters.bump(format!("{}:{}", m.benchmark, m.item), 1);
                doc.meta.insert(
                    "decontaminate".into(),
                    json!({"benchmark": m.benchmark, "item": m.item, "matches": m.matches}),
                );
                Verdict::Drop("benchmark_overlap")
            }
            None => Verdict::Keep,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> BenchmarkIndex {
        BenchmarkIndex::from_config(&DecontaminateConfig::default()).unwrap()
    }

    #[test]
    fn a_planted_problem_is_found_and_ordinary_code_is_not() {
        let idx = index();
        assert_eq!(idx.items(), 398);
        let problems = cxxlm_eval::bench::mbpp_cpp().unwrap();
        let p = &problems[17];
        // The problem's prompt, re-indented, inside a real-looking file.
        let planted = format!(
            "// utilities\n#include <vector>\nint helper(int x) {{ return x; }}\n{}\n  return {{}};\n}}\n",
            p.prompt.replace("    ", "\t")
        );
        let m = idx.find(&planted).expect("the planted prompt");
        assert_eq!(m.item, p.name);
        for text in [
            "#include <bits/stdc++.h>\n#include <assert.h>\nusing namespace std;\nint main() {\n    auto candidate = f;\n}\n",
            include_str!("normalize.rs"),
        ] {
            assert_eq!(idx.find(text), None);
        }
    }

    #[test]
    fn tables_of_numbers_are_not_a_benchmark_item() {
        // Ryu's table of two-digit numbers, as libstdc++ and Boost.JSON carry it.
        let pairs: Vec<String> = (0..100)
            .map(|i| format!("'{}','{}',", i / 10, i % 10))
            .collect();
        let rows: Vec<String> = pairs.chunks(10).map(|row| row.concat()).collect();
        let table = format!(
            "// A table of all two-digit numbers.\nstatic const char DIGIT_TABLE[200] = {{\n{}\n}};\n",
            rows.join("\n")
        );
        assert_eq!(index().find(&table), None);
    }

    #[test]
    fn benchmark_files_of_any_shape_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.jsonl");
        let secret = "int frobnicate_widgets(std::vector<int> const& widgets, int threshold_value) { return widgets.size() > threshold_value; }";
        std::fs::write(&path, format!("{}\n", json!({"task_id": "X/1", "prompt": secret, "nested": {"tests": ["assert(frobnicate_widgets({1}, 0));"]}}))).unwrap();
        let config = DecontaminateConfig {
            mbpp: false,
            benchmarks: vec![path],
            ..Default::default()
        };
        let step = Decontaminate::new(&config).unwrap();
        let mut doc = Document {
            id: "a.cpp".into(),
            text: format!("#include <vector>\n{secret}\n"),
            meta: Default::default(),
        };
        let mut counters = Counters::default();
        assert_eq!(
            step.apply(&mut doc, &mut counters),
            Verdict::Drop("benchmark_overlap")
        );
        assert_eq!(doc.meta["decontaminate"]["item"], "X/1");
    }

    #[test]
    fn a_copy_of_a_held_out_file_is_dropped_and_its_licence_banner_is_not() {
        let banner = "// Copyright the Frobnicator authors. Licensed under the Frobnicator Public\n\
                      // Licence, version 3; you may not use this file except in compliance with it.\n";
        let held: String = (0..40)
            .map(|i| format!("int frobnicate_step_{i}(int widget_count) {{ return widget_count * {i} + {}; }}\n", i * 7))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let shard = dir.path().join("part-00000-00000.jsonl.zst");
        let line = format!(
            "{}\n",
            json!({"id": "frob/src/step.cc", "text": format!("{banner}{held}"), "meta": {}})
        );
        std::fs::write(&shard, zstd::encode_all(line.as_bytes(), 3).unwrap()).unwrap();
        let config = DecontaminateConfig {
            mbpp: false,
            held_out: vec![dir.path().to_path_buf()],
            ..Default::default()
        };
        let idx = BenchmarkIndex::from_config(&config).unwrap();
        assert_eq!(idx.items(), 1);
        let vendored = format!("// third_party/frob, vendored\n{banner}{held}");
        let m = idx.find(&vendored).expect("the vendored copy");
        assert_eq!(
            (m.benchmark.as_str(), m.item.as_str()),
            ("held-out", "frob/src/step.cc")
        );
        let own: String = (0..40)
            .map(|i| format!("double resample_channel_{i}(double sample_rate) {{ return sample_rate / {i}.5; }}\n"))
            .collect();
        assert_eq!(idx.find(&format!("{banner}{own}")), None);
        // As an ordinary benchmark item (no share asked), the banner alone would match.
        let strict = BenchmarkIndex::new(
            read_held_out(dir.path(), 0.0).unwrap(),
            &DecontaminateConfig::default(),
        );
        assert!(strict.find(&format!("{banner}{own}")).is_some());
        let empty = tempfile::tempdir().unwrap();
        assert!(read_held_out(empty.path(), 0.5).is_err());
        let over = DecontaminateConfig {
            held_out_share: 1.5,
            ..config
        };
        assert!(BenchmarkIndex::from_config(&over).is_err());
    }
}
