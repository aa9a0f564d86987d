//! Retrieval pairs mined from an indexed repository, for judging and training code
//! search: a doc comment and the function it documents, a call site and the callee's
//! definition, a header declaration and its out-of-line definition. Every function
//! definition of the repository is a candidate; a query is answered when its own
//! definition ranks among the first k. Files go to the held-out split by their content
//! hash, and a pair whose two files fall in different splits is dropped (counted), so a
//! held-out pair never shares a file with a training pair. BM25 over the candidates'
//! identifier words is the baseline.

use std::collections::BTreeMap;

use rayon::prelude::*;
use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::index::Index;
use crate::parse::{CppParser, Kind};

#[derive(Debug, Clone)]
pub struct MineSettings {
    /// Files whose content hash falls below this share of the hash space are held out.
    pub held_out_percent: u64,
    /// Lines either side of a call that make its query.
    pub context_lines: u32,
    /// Lines of a definition that make its candidate text.
    pub definition_lines: u32,
    /// Call sites paired with one callee at most (popular functions do not dominate).
    pub calls_per_target: usize,
}

impl Default for MineSettings {
    fn default() -> MineSettings {
        MineSettings {
            held_out_percent: 20,
            context_lines: 2,
            definition_lines: 40,
            calls_per_target: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PairKind {
    DocComment,
    CallSite,
    Declaration,
}

impl PairKind {
    pub const ALL: [PairKind; 3] = [
        PairKind::DocComment,
        PairKind::CallSite,
        PairKind::Declaration,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PairKind::DocComment => "doc_comment",
            PairKind::CallSite => "call_site",
            PairKind::Declaration => "declaration",
        }
    }
}

/// A function definition: a candidate of every query.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub file: String,
    pub name: String,
    pub line: u32,
    pub end_line: u32,
    /// Its first lines.
    pub text: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    pub kind: PairKind,
    pub held_out: bool,
    pub file: String,
    pub line: u32,
    pub query: String,
    /// The candidate it should find.
    pub target: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct Mined {
    pub candidates: Vec<Candidate>,
    pub pairs: Vec<Pair>,
    /// What was left out and why, with how often.
    pub dropped: BTreeMap<&'static str, usize>,
}

impl Mined {
    pub fn held_out(&self) -> impl Iterator<Item = &Pair> {
        self.pairs.iter().filter(|p| p.held_out)
    }

    pub fn training(&self) -> impl Iterator<Item = &Pair> {
        self.pairs.iter().filter(|p| !p.held_out)
    }
}

fn is_header(path: &str) -> bool {
    let ext = path.rsplit_once('.').map_or("", |(_, e)| e);
    matches!(
        ext.to_ascii_lowercase().as_str(),
        "h" | "hh" | "hpp" | "hxx" | "h++" | "inc" | "inl" | "ipp" | "tcc"
    )
}

fn held_out(hash: u64, percent: u64) -> bool {
    hash % 100 < percent
}

/// The comment block right above line `line` (1-based), its markers stripped: `//`,
/// `///`, `//!` lines or a `/* ... */` block, with no blank line between; and the
/// block's first line.
pub(crate) fn doc_comment(lines: &[&str], line: u32) -> Option<(u32, String)> {
    let mut at = (line as usize).checked_sub(1)?;
    let mut block = Vec::new();
    while at > 0 {
        let l = lines[at - 1].trim();
        if l.starts_with("//") {
            block.push(l.trim_start_matches('/').trim_start_matches('!').trim());
            at -= 1;
        } else if l.ends_with("*/") && block.is_empty() {
            loop {
                let l = lines[at - 1].trim();
                let stripped = l.trim_start_matches("/**").trim_start_matches("/*");
                block.push(
                    stripped
                        .trim_end_matches("*/")
                        .trim_start_matches('*')
                        .trim(),
                );
                at -= 1;
                if l.starts_with("/*") || at == 0 {
                    break;
                }
            }
            break;
        } else {
            break;
        }
    }
    block.reverse();
    let text = block.join("\n").trim().to_string();
    let words = text.split_whitespace().count();
    (words >= 3).then_some((at as u32 + 1, text))
}

/// Lines `first..=last` (1-based, clipped) of a file.
pub(crate) fn lines_between(lines: &[&str], first: u32, last: u32) -> String {
    let first = (first.max(1) - 1) as usize;
    let last = (last as usize).min(lines.len());
    match first < last {
        true => lines[first..last].join("\n"),
        false => String::new(),
    }
}

/// One file of the repository as mining needs it.
struct Source<'a> {
    path: &'a str,
    held_out: bool,
    text: String,
    calls: Vec<(String, u32)>,
}

/// Mines the pairs of an index's repository (reading its files, which must not have
/// changed since they were indexed: those that have are dropped and counted).
pub fn mine(index: &Index, settings: &MineSettings) -> Mined {
    let mut mined = Mined::default();
    let files: Vec<(&String, &crate::index::FileEntry)> = index.files().iter().collect();
    let read: Vec<Result<Source, &'static str>> = files
        .par_iter()
        .map_init(
            || CppParser::new(crate::Settings::default().parse_limit),
            |parser, (path, entry)| {
                let text = std::fs::read_to_string(index.root().join(path))
                    .map_err(|_| "file_unreadable")?;
                if xxhash_rust::xxh3::xxh3_64(text.as_bytes()) != entry.hash {
                    return Err("file_changed_since_indexed");
                }
                let calls = parser.calls(&text).map_err(|_| "parse_timeout")?;
                Ok(Source {
                    path,
                    held_out: held_out(entry.hash, settings.held_out_percent),
                    text,
                    calls,
                })
            },
        )
        .collect();
    let mut sources = Vec::new();
    for (r, (_, entry)) in read.into_iter().zip(&files) {
        match r {
            Ok(s) => sources.push((s, *entry)),
            Err(why) => *mined.dropped.entry(why).or_default() += 1,
        }
    }
    let names = index.names();
    let lines: Vec<Vec<&str>> = sources
        .iter()
        .map(|(s, _)| s.text.lines().collect())
        .collect();
    // Candidates, and the one candidate of each function name defined exactly once.
    let mut by_name: FxHashMap<u32, Vec<usize>> = FxHashMap::default();
    let mut file_of = Vec::new();
    for (f, (s, entry)) in sources.iter().enumerate() {
        for d in entry.defs.iter().filter(|d| d.kind == Kind::Function) {
            let last = d.end_line.min(d.line + settings.definition_lines - 1);
            by_name
                .entry(d.name)
                .or_default()
                .push(mined.candidates.len());
            file_of.push(f);
            mined.candidates.push(Candidate {
                file: s.path.to_string(),
                name: names.name(d.name).to_string(),
                line: d.line,
                end_line: d.end_line,
                text: lines_between(&lines[f], d.line, last),
            });
        }
    }
    let unique = |name: &str| -> Option<usize> {
        match by_name.get(&names.get(name)?).map(Vec::as_slice) {
            Some([only]) => Some(*only),
            _ => None,
        }
    };
    let mut pairs = Vec::new();
    let mut calls_of: FxHashMap<usize, usize> = FxHashMap::default();
    for (f, (s, entry)) in sources.iter().enumerate() {
        for d in &entry.defs {
            let name = names.name(d.name);
            // A header's declaration documents and declares its out-of-line definition.
            let target = match d.kind {
                Kind::Function => by_name
                    .get(&d.name)
                    .and_then(|c| {
                        c.iter()
                            .find(|&&c| file_of[c] == f && mined.candidates[c].line == d.line)
                    })
                    .copied(),
                Kind::Declaration if is_header(s.path) => unique(name).filter(|&c| file_of[c] != f),
                _ => None,
            };
            let Some(target) = target else { continue };
            if let Some((_, doc)) = doc_comment(&lines[f], d.line) {
                pairs.push((PairKind::DocComment, f, d.line, doc, target));
            }
            if d.kind == Kind::Declaration {
                let text = lines_between(&lines[f], d.line, d.end_line);
                pairs.push((PairKind::Declaration, f, d.line, text, target));
            }
        }
        for (name, line) in &s.calls {
            let Some(target) = unique(name) else { continue };
            let c = &mined.candidates[target];
            let (first, last) = (
                line.saturating_sub(settings.context_lines),
                line + settings.context_lines,
            );
            // A call inside its own callee (recursion) or next to it shows the answer.
            if file_of[target] == f && first <= c.end_line && c.line <= last {
                continue;
            }
            let n = calls_of.entry(target).or_default();
            if *n >= settings.calls_per_target {
                *mined
                    .dropped
                    .entry("call_site_over_per_target_limit")
                    .or_default() += 1;
                continue;
            }
            *n += 1;
            pairs.push((
                PairKind::CallSite,
                f,
                *line,
                lines_between(&lines[f], first, last),
                target,
            ));
        }
    }
    for (kind, f, line, query, target) in pairs {
        let (query_held_out, target_held_out) =
            (sources[f].0.held_out, sources[file_of[target]].0.held_out);
        if query_held_out != target_held_out {
            *mined.dropped.entry("pair_straddles_split").or_default() += 1;
            continue;
        }
        mined.pairs.push(Pair {
            kind,
            held_out: query_held_out,
            file: sources[f].0.path.to_string(),
            line,
            query,
            target,
        });
    }
    mined
}

/// The words BM25 matches: identifiers split at underscores and case changes,
/// lowercased, with the whole identifier too; words of one letter left out.
pub fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for ident in text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
    {
        let mut parts = 0;
        let mut start = 0;
        let chars: Vec<char> = ident.chars().collect();
        for i in 0..=chars.len() {
            let boundary = i == chars.len()
                || chars[i] == '_'
                || (i > start
                    && chars[i].is_ascii_uppercase()
                    && chars[i - 1].is_ascii_lowercase());
            if boundary {
                if i - start > 1 {
                    out.push(
                        chars[start..i]
                            .iter()
                            .collect::<String>()
                            .to_ascii_lowercase(),
                    );
                    parts += 1;
                }
                start = if i < chars.len() && chars[i] == '_' {
                    i + 1
                } else {
                    i
                };
            }
        }
        if parts > 1 {
            out.push(ident.to_ascii_lowercase());
        }
    }
    out
}

/// Okapi BM25 over a set of documents (k1 = 1.2, b = 0.75).
pub struct Bm25 {
    /// Word -> (document, count) of every document holding it.
    postings: FxHashMap<String, Vec<(u32, u32)>>,
    lengths: Vec<f32>,
    average: f32,
}

impl Bm25 {
    pub fn new<'a>(documents: impl IntoIterator<Item = &'a str>) -> Bm25 {
        let mut postings: FxHashMap<String, Vec<(u32, u32)>> = FxHashMap::default();
        let mut lengths = Vec::new();
        for (d, text) in documents.into_iter().enumerate() {
            let ws = words(text);
            lengths.push(ws.len() as f32);
            let mut counts: FxHashMap<String, u32> = FxHashMap::default();
            for w in ws {
                *counts.entry(w).or_default() += 1;
            }
            for (w, n) in counts {
                postings.entry(w).or_default().push((d as u32, n));
            }
        }
        let average = lengths.iter().sum::<f32>() / lengths.len().max(1) as f32;
        Bm25 {
            postings,
            lengths,
            average: average.max(1.0),
        }
    }

    /// Every document's score for `query`.
    pub fn scores(&self, query: &str) -> Vec<f32> {
        let (k1, b) = (1.2f32, 0.75f32);
        let n = self.lengths.len() as f32;
        let mut scores = vec![0f32; self.lengths.len()];
        let mut seen = rustc_hash::FxHashSet::default();
        for w in words(query) {
            if !seen.insert(w.clone()) {
                continue;
            }
            let Some(posting) = self.postings.get(&w) else {
                continue;
            };
            let df = posting.len() as f32;
            let idf = ((n - df + 0.5) / (df + 0.5) + 1.0).ln();
            for &(d, tf) in posting {
                let tf = tf as f32;
                let norm = k1 * (1.0 - b + b * self.lengths[d as usize] / self.average);
                scores[d as usize] += idf * tf * (k1 + 1.0) / (tf + norm);
            }
        }
        scores
    }
}

/// The `k` best of `scores`, best first (ties to the lower index).
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let better = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
    let mut ids: Vec<usize> = (0..scores.len()).collect();
    if k < ids.len() {
        ids.select_nth_unstable_by(k, better);
        ids.truncate(k);
    }
    ids.sort_unstable_by(better);
    ids
}

/// Recall at k of some pairs, overall and by kind.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Recall {
    pub k: usize,
    pub found: usize,
    pub pairs: usize,
    pub by_kind: BTreeMap<&'static str, (usize, usize)>,
}

impl Recall {
    pub fn rate(&self) -> f64 {
        self.found as f64 / self.pairs.max(1) as f64
    }
}

/// Whether each pair's target is among the first `k` of its ranking (`ranked[i]`,
/// candidates best first, for `pairs[i]`).
pub fn recall_at(pairs: &[&Pair], k: usize, ranked: &[Vec<usize>]) -> Recall {
    let mut recall = Recall {
        k,
        ..Recall::default()
    };
    for (p, ranking) in pairs.iter().zip(ranked) {
        let hit = ranking.iter().take(k).any(|&c| c == p.target) as usize;
        let e = recall.by_kind.entry(p.kind.name()).or_default();
        e.0 += hit;
        e.1 += 1;
        recall.found += hit;
        recall.pairs += 1;
    }
    recall
}

impl Bm25 {
    /// The `k` best candidates of each query, best first.
    pub fn rank(&self, queries: &[&str], k: usize) -> Vec<Vec<usize>> {
        queries
            .par_iter()
            .map(|q| top_k(&self.scores(q), k))
            .collect()
    }
}
