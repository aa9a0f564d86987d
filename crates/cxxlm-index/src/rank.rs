//! What matters for a cursor: personalized PageRank over the reference graph, as
//! aider's repository map ranks, with the names themselves as nodes. A file points to
//! each name it uses (weighted by aider's rules: the square root of the uses, long
//! snake_case and camelCase names ten times, `_private` and names defined in more than
//! five files a tenth; not to names only it defines) and to each file it includes; a name points to the files that
//! define or declare it. The walk restarts at the cursor's file, the names around the
//! cursor line (by the inverse square of their distance, times the name's weight, a
//! tenth for names defined nowhere the file includes, none for its parameters and
//! locals) and the symbols asked for. Ranks are computed by
//! forward push (Andersen, Chung and Lang), which touches only what the restart set
//! reaches with enough weight: a query costs the same in a small repository and in
//! LLVM. A definition's score is its name's rank.

use std::collections::BinaryHeap;
use std::path::Path;
use std::sync::Mutex;

use rustc_hash::{FxHashMap, FxHashSet};
use serde::Serialize;

use crate::includes::Resolver;
use crate::index::{FileEntry, Index};
use crate::parse::{CppParser, Include, Kind};

const DAMPING: f64 = 0.85;
/// Residual mass per out-edge below which a node is not pushed: a query visits at most
/// about 1 / ((1 - DAMPING) * EPSILON) edges.
const EPSILON: f64 = 2e-6;
/// Edge visits per query at most.
const MAX_WORK: usize = 2_000_000;
/// Lines either side of the cursor whose names personalize the walk.
const WINDOW: u32 = 30;
const INCLUDE_WEIGHT: f64 = 1.0;
/// Files followed through includes from the cursor's file at most.
const REACH: usize = 2000;
/// The weight at the cursor of a name defined nowhere the cursor's file includes.
const OUT_OF_REACH: f64 = 0.1;
/// Definitions of one name listed at most.
const DEFS_PER_NAME: usize = 3;

/// The reference graph of one state of an index.
pub struct Graph<'a> {
    index: &'a Index,
    paths: Vec<&'a str>,
    entries: Vec<&'a FileEntry>,
    file_id: FxHashMap<&'a str, u32>,
    /// Name id -> its place in `defined` (u32::MAX: defined nowhere).
    slot: Vec<u32>,
    /// Where names are defined or declared.
    defined: Vec<Defined>,
    resolver: Resolver<'a>,
    /// Each file's resolved includes, as the walk first needs them.
    included: Mutex<FxHashMap<u32, Vec<u32>>>,
}

struct Defined {
    /// aider's weight of the name.
    weight: f64,
    /// The files defining or declaring it.
    files: Vec<u32>,
    /// Its definitions: (file, index in the file's definitions).
    defs: Vec<(u32, u32)>,
}

/// Where the cursor is and what to look for.
#[derive(Debug, Default, Clone)]
pub struct Cursor {
    /// The file edited, relative to the repository root.
    pub file: Option<String>,
    /// Its text as the editor has it (else it is read from the repository).
    pub text: Option<String>,
    /// 1-based.
    pub line: Option<u32>,
    pub symbols: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankedDef {
    pub file: String,
    pub name: String,
    pub kind: Kind,
    pub line: u32,
    pub end_line: u32,
    pub score: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankedFile {
    pub file: String,
    pub score: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Ranking {
    pub definitions: Vec<RankedDef>,
    pub files: Vec<RankedFile>,
    /// Edge visits the walk made.
    pub work: usize,
}

/// Lines of a file shown next to the cursor.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Chunk {
    pub file: String,
    pub line: u32,
    pub end_line: u32,
    pub text: String,
}

/// aider's weight of a name (`repomap.py`), before the square root of its uses.
fn name_weight(name: &str, definers: usize) -> f64 {
    let mut w = 1.0;
    let snake = name.contains('_') && name.chars().any(|c| c.is_ascii_alphabetic());
    let camel = name.chars().any(|c| c.is_ascii_uppercase())
        && name.chars().any(|c| c.is_ascii_lowercase());
    if (snake || camel) && name.len() >= 8 {
        w *= 10.0;
    }
    if name.starts_with('_') {
        w *= 0.1;
    }
    if definers > 5 {
        w *= 0.1;
    }
    w
}

impl<'a> Graph<'a> {
    pub fn new(index: &'a Index) -> Graph<'a> {
        let mut paths = Vec::with_capacity(index.files.len());
        let mut entries = Vec::with_capacity(index.files.len());
        let mut file_id = FxHashMap::default();
        let mut slot = vec![u32::MAX; index.names.len()];
        let mut defined: Vec<Defined> = Vec::new();
        for (i, (path, entry)) in index.files.iter().enumerate() {
            paths.push(path.as_str());
            entries.push(entry);
            file_id.insert(path.as_str(), i as u32);
            for (k, d) in entry.defs.iter().enumerate() {
                let at = &mut slot[d.name as usize];
                if *at == u32::MAX {
                    *at = defined.len() as u32;
                    defined.push(Defined {
                        weight: 0.0,
                        files: Vec::new(),
                        defs: Vec::new(),
                    });
                }
                let name = &mut defined[*at as usize];
                if name.files.last() != Some(&(i as u32)) {
                    name.files.push(i as u32);
                }
                name.defs.push((i as u32, k as u32));
            }
        }
        for (id, &at) in slot.iter().enumerate() {
            if let Some(d) = defined.get_mut(at as usize) {
                d.weight = name_weight(index.names.name(id as u32), d.files.len());
            }
        }
        Graph {
            index,
            paths,
            entries,
            file_id,
            slot,
            defined,
            resolver: Resolver::new(index.files.keys().map(String::as_str), &index.include_dirs),
            included: Mutex::new(FxHashMap::default()),
        }
    }

    fn defined(&self, name: u32) -> Option<&Defined> {
        let at = *self.slot.get(name as usize)?;
        self.defined.get(at as usize)
    }

    pub fn index(&self) -> &'a Index {
        self.index
    }

    /// A file's out-edges: (node, weight), names as `files + name id`.
    fn file_edges(&self, f: u32, out: &mut Vec<(u64, f64)>) {
        let files = self.paths.len() as u64;
        let entry = self.entries[f as usize];
        for &(name, count) in &entry.refs {
            if let Some(d) = self.defined(name) {
                // A file's uses of what only it defines say nothing of other files
                // (and would hold the walk in a loop between the two).
                if d.files.as_slice() == [f] {
                    continue;
                }
                let w = d.weight * (count as f64).sqrt();
                out.push((files + name as u64, w));
            }
        }
        out.extend(self.included(f).iter().map(|&t| (t as u64, INCLUDE_WEIGHT)));
    }

    /// The files file `f` includes, resolved once per graph.
    fn included(&self, f: u32) -> Vec<u32> {
        let mut included = self.included.lock().unwrap_or_else(|e| e.into_inner());
        included
            .entry(f)
            .or_insert_with(|| {
                let from = self.paths[f as usize];
                let mut targets: Vec<u32> = self.entries[f as usize]
                    .includes
                    .iter()
                    .filter_map(|inc| self.resolver.resolve(from, inc))
                    .filter_map(|p| self.file_id.get(p).copied())
                    .filter(|&t| t != f)
                    .collect();
                targets.sort_unstable();
                targets.dedup();
                targets
            })
            .clone()
    }

    /// The files a cursor's file sees: itself and what it includes, transitively
    /// (`REACH` files at most, nearest first).
    fn reach(&self, file: Option<u32>, includes: &[Include]) -> FxHashSet<u32> {
        let mut seen = FxHashSet::default();
        let mut next: std::collections::VecDeque<u32> = match file {
            Some(f) => [f].into(),
            None => includes
                .iter()
                .filter_map(|i| self.resolver.resolve("", i))
                .filter_map(|p| self.file_id.get(p).copied())
                .collect(),
        };
        while let Some(f) = next.pop_front() {
            if seen.len() >= REACH {
                break;
            }
            if seen.insert(f) {
                next.extend(self.included(f));
            }
        }
        seen
    }

    /// The files `path` includes that the index holds.
    pub fn includes_of(&self, path: &str) -> Vec<&'a str> {
        let Some(entry) = self.index.files.get(path) else {
            return Vec::new();
        };
        entry
            .includes
            .iter()
            .filter_map(|i| self.resolver.resolve(path, i))
            .collect()
    }

    /// The restart distribution of a cursor: node -> weight.
    fn restart(&self, cursor: &Cursor) -> FxHashMap<u64, f64> {
        let files = self.paths.len() as u64;
        let mut restart: FxHashMap<u64, f64> = FxHashMap::default();
        let file = cursor.file.as_deref().and_then(|f| self.file_id.get(f));
        if let Some(&f) = file {
            *restart.entry(f as u64).or_default() += 1.0;
        }
        let text = cursor.text.clone().or_else(|| {
            let f = cursor.file.as_deref()?;
            std::fs::read_to_string(self.index.root.join(f)).ok()
        });
        if let Some(text) = text {
            if let Ok(parsed) = CppParser::new(std::time::Duration::from_secs(2)).parse(&text) {
                let locals: FxHashSet<&str> = parsed.locals.iter().map(String::as_str).collect();
                let reach = self.reach(file.copied(), &parsed.includes);
                for (name, line) in &parsed.refs {
                    let closeness = match cursor.line {
                        Some(at) if line.abs_diff(at) <= WINDOW => {
                            5.0 / (1.0 + line.abs_diff(at) as f64).powi(2)
                        }
                        Some(_) => continue,
                        // A file not in the index: its names stand for it.
                        None if file.is_none() => 1.0,
                        None => continue,
                    };
                    // A parameter or local: not a definition elsewhere.
                    if locals.contains(name.as_str()) {
                        continue;
                    }
                    let Some(id) = self.index.names.get(name) else {
                        continue;
                    };
                    let Some(d) = self.defined(id) else {
                        continue;
                    };
                    // Weighted as the name's uses are, and less when no file the cursor's
                    // file includes defines it (a name some test file also defines).
                    let seen = match d.files.iter().any(|f| reach.contains(f)) {
                        true => 1.0,
                        false => OUT_OF_REACH,
                    };
                    *restart.entry(files + id as u64).or_default() += closeness * d.weight * seen;
                }
            }
        }
        for s in &cursor.symbols {
            if let Some(id) = self
                .index
                .names
                .get(s)
                .filter(|&id| self.defined(id).is_some())
            {
                *restart.entry(files + id as u64).or_default() += 10.0;
            }
        }
        if restart.is_empty() {
            // Nothing to start from: the whole repository's ranking.
            for f in 0..files {
                restart.insert(f, 1.0);
            }
        }
        let total: f64 = restart.values().sum();
        restart.values_mut().for_each(|w| *w /= total);
        restart
    }

    /// The definitions and files that matter most at `cursor`, `top` of each.
    pub fn rank(&self, cursor: &Cursor, top: usize) -> Ranking {
        let files = self.paths.len() as u64;
        let restart = self.restart(cursor);
        let degree = |u: u64| match u < files {
            true => {
                let e = self.entries[u as usize];
                e.refs.len() + e.includes.len()
            }
            false => self
                .defined((u - files) as u32)
                .map_or(0, |d| d.files.len()),
        };
        let nodes = files as usize + self.index.names.len();
        let mut residual = vec![0.0f64; nodes];
        let mut estimate = vec![0.0f64; nodes];
        // The nodes given an estimate, to collect them without scanning all.
        let mut reached: Vec<u64> = Vec::new();
        for (&u, &w) in &restart {
            residual[u as usize] = w;
        }
        let mut queue: Vec<u64> = restart.keys().copied().collect();
        queue.sort_unstable();
        let mut edges = Vec::new();
        let mut work = 0;
        while let Some(u) = queue.pop() {
            let r = std::mem::take(&mut residual[u as usize]);
            if r <= 0.0 {
                continue;
            }
            if estimate[u as usize] == 0.0 {
                reached.push(u);
            }
            estimate[u as usize] += (1.0 - DAMPING) * r;
            edges.clear();
            match u < files {
                true => self.file_edges(u as u32, &mut edges),
                false => {
                    if let Some(d) = self.defined((u - files) as u32) {
                        edges.extend(d.files.iter().map(|&f| (f as u64, 1.0)));
                    }
                }
            }
            work += edges.len() + 1;
            // A node without edges (a file using only names it defines) keeps its
            // walkers' mass out of the ranking: the scores are compared, not summed.
            let total: f64 = edges.iter().map(|e| e.1).sum();
            if total > 0.0 {
                for &(v, w) in &edges {
                    let slot = &mut residual[v as usize];
                    let before = *slot;
                    *slot += DAMPING * r * w / total;
                    let threshold = EPSILON * degree(v).max(1) as f64;
                    if before <= threshold && *slot > threshold {
                        queue.push(v);
                    }
                }
            }
            if work > MAX_WORK {
                break;
            }
        }
        self.ranking(&estimate, &reached, top, work)
    }

    fn ranking(&self, estimate: &[f64], reached: &[u64], top: usize, work: usize) -> Ranking {
        let files = self.paths.len() as u64;
        #[derive(PartialEq)]
        struct Scored<T>(f64, T);
        impl<T: PartialEq> Eq for Scored<T> {}
        impl<T: PartialEq> PartialOrd for Scored<T> {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }
        impl<T: PartialEq> Ord for Scored<T> {
            // The lowest score first out of the heap, so it keeps the `top` best.
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                other.0.total_cmp(&self.0)
            }
        }
        let mut best_files: BinaryHeap<Scored<u32>> = BinaryHeap::new();
        let mut best_defs: BinaryHeap<Scored<(u32, usize)>> = BinaryHeap::new();
        let mut names: Vec<(f64, u32)> = Vec::new();
        for &node in reached {
            let score = estimate[node as usize];
            match node < files {
                true => {
                    best_files.push(Scored(score, node as u32));
                    if best_files.len() > top {
                        best_files.pop();
                    }
                }
                false => names.push((score, (node - files) as u32)),
            }
        }
        names.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for (score, name) in names {
            if best_defs.len() >= top && best_defs.peek().is_some_and(|worst| worst.0 >= score) {
                break;
            }
            let Some(d) = self.defined(name) else {
                continue;
            };
            // A name keeps its whole rank in each of its definitions shown (C++ declares
            // and defines); of a name defined in many files, those nearest the cursor
            // (the highest ranked files) are shown.
            let rank_of = |f: u32| estimate[f as usize];
            let mut shown = d.defs.clone();
            if d.files.len() > 1 {
                shown.sort_by(|a, b| rank_of(b.0).total_cmp(&rank_of(a.0)).then(a.cmp(b)));
            }
            for (k, &(f, i)) in shown.iter().take(DEFS_PER_NAME).enumerate() {
                best_defs.push(Scored(score * (1.0 - 1e-6 * k as f64), (f, i as usize)));
                if best_defs.len() > top {
                    best_defs.pop();
                }
            }
        }
        let mut definitions: Vec<RankedDef> = best_defs
            .into_iter()
            .map(|Scored(score, (f, i))| {
                let d = &self.entries[f as usize].defs[i];
                RankedDef {
                    file: self.paths[f as usize].to_string(),
                    name: self.index.names.name(d.name).to_string(),
                    kind: d.kind,
                    line: d.line,
                    end_line: d.end_line,
                    score,
                }
            })
            .collect();
        definitions.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| (&a.file, a.line).cmp(&(&b.file, b.line)))
        });
        let mut files: Vec<RankedFile> = best_files
            .into_iter()
            .map(|Scored(score, f)| RankedFile {
                file: self.paths[f as usize].to_string(),
                score,
            })
            .collect();
        files.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| a.file.cmp(&b.file))
        });
        Ranking {
            definitions,
            files,
            work,
        }
    }
}

/// The text of ranked definitions, `max_lines` of each at most, in rank order, while
/// `budget` bytes last; definitions inside one already shown, and those `skip` says
/// the editor already holds, are left out.
pub fn chunks(
    root: &Path,
    definitions: &[RankedDef],
    max_lines: u32,
    budget: usize,
    mut skip: impl FnMut(&RankedDef, &str) -> bool,
) -> Vec<Chunk> {
    let mut out: Vec<Chunk> = Vec::new();
    let mut texts: FxHashMap<&str, Option<Vec<String>>> = FxHashMap::default();
    let mut used = 0;
    for d in definitions {
        let covered = out
            .iter()
            .any(|c| c.file == d.file && c.line <= d.line && d.line <= c.end_line);
        if covered {
            continue;
        }
        let lines = texts.entry(&d.file).or_insert_with(|| {
            std::fs::read_to_string(root.join(&d.file))
                .ok()
                .map(|t| t.lines().map(str::to_string).collect())
        });
        let Some(lines) = lines else { continue };
        let first = d.line.saturating_sub(1) as usize;
        let last = (d.end_line.min(d.line + max_lines.saturating_sub(1)) as usize).min(lines.len());
        if first >= last {
            continue;
        }
        let text = lines[first..last].join("\n") + "\n";
        if skip(d, &text) {
            continue;
        }
        if used + text.len() > budget {
            break;
        }
        used += text.len();
        out.push(Chunk {
            file: d.file.clone(),
            line: d.line,
            end_line: last as u32,
            text,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aider_weights() {
        assert_eq!(name_weight("x", 1), 1.0);
        assert_eq!(name_weight("parseHeader", 1), 10.0);
        assert_eq!(name_weight("parse_header", 1), 10.0);
        assert!((name_weight("_internal_thing", 1) - 1.0).abs() < 1e-12);
        assert!((name_weight("size", 9) - 0.1).abs() < 1e-12);
    }
}
