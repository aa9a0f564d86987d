//! Near-duplicate removal over the shards of `cxxlm data run`, in four stages that each
//! run as N independent tasks or all here: signatures (MinHash band keys per document),
//! buckets (per band, documents with equal keys become candidate pairs), clusters
//! (union-find over all pairs, one survivor per cluster) and filter (shards without the
//! removed documents). Documents are named by `(shard, index)` in the sorted list of
//! input shards, so results do not depend on how many tasks ran.

mod minhash;
mod records;
mod union_find;

pub use minhash::{MinHashConfig, MinHasher};
pub use records::{read_records, record_count, RecordWriter};
pub use union_find::UnionFind;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::pipeline::{mismatch, read_json_if_present, TaskSpec};
use crate::shard::{parse, shard_lines, write_atomic, ShardWriter};
use crate::steps::is_permissive;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Survivor {
    /// The first document of the cluster in input order.
    First,
    /// The Stack v2 rank: permissive license first, then the larger file, then input order.
    StackV2,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DedupConfig {
    pub input: PathBuf,
    pub output: PathBuf,
    pub minhash: MinHashConfig,
    pub survivor: Survivor,
    pub write_removed: bool,
    pub zstd_level: i32,
    /// Check candidate pairs against their exact Jaccard similarity (report only).
    pub verify_threshold: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Signatures,
    Buckets,
    Clusters,
    Filter,
}

impl Stage {
    pub const ALL: [Stage; 4] = [
        Stage::Signatures,
        Stage::Buckets,
        Stage::Clusters,
        Stage::Filter,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Signatures => "signatures",
            Stage::Buckets => "buckets",
            Stage::Clusters => "clusters",
            Stage::Filter => "filter",
        }
    }
}

#[derive(Debug)]
pub enum StageOutcome {
    Done {
        seconds: f64,
    },
    AlreadyDone,
    /// The stage has fewer units of work than tasks; this task had none.
    NothingToDo,
}

#[derive(Serialize, Deserialize)]
struct Marker {
    fingerprint: String,
    tasks: usize,
    seconds: f64,
}

const DOC_SHIFT: u32 = 32;

fn doc_ref(shard: usize, index: usize) -> u64 {
    ((shard as u64) << DOC_SHIFT) | index as u64
}

fn split_ref(r: u64) -> (usize, usize) {
    ((r >> DOC_SHIFT) as usize, (r & 0xffff_ffff) as usize)
}

/// The input shards, in the order that defines document order.
pub fn input_shards(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            n.starts_with("part-") && n.ends_with(".jsonl.zst")
        })
        .collect();
    shards.sort();
    if shards.is_empty() {
        return Err(DataError::Input {
            input: dir.display().to_string(),
            message: "holds no part-*.jsonl.zst shards (the output of `cxxlm data run`)".into(),
        });
    }
    Ok(shards)
}

/// The shards `path` stands for: a `data run` output directory's, or `path`, a shard file.
pub fn shards_at(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_dir() {
        input_shards(path)
    } else {
        Ok(vec![path.to_path_buf()])
    }
}

/// Signature records of one shard: its document table and per-band bucket keys.
struct ShardSignatures {
    docs: Vec<[u64; 3]>,
    keys: Vec<Vec<[u64; 2]>>,
}

const SIGNATURE_BATCH: usize = 512;

pub struct NearDedup {
    config: DedupConfig,
    shards: Vec<PathBuf>,
    fingerprint: String,
}

impl NearDedup {
    pub fn new(config: DedupConfig) -> Result<Self> {
        config.minhash.validate().map_err(DataError::Config)?;
        crate::read::refuse_overlap(&config.input, &config.output)?;
        let shards = input_shards(&config.input)?;
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(
            serde_json::to_string(&(
                &config.minhash,
                config.survivor,
                config.write_removed,
                config.verify_threshold,
            ))
            .unwrap_or_default()
            .as_bytes(),
        );
        for s in &shards {
            let len = std::fs::metadata(s).map(|m| m.len()).unwrap_or(0);
            h.update(
                format!(
                    "{}:{len}\n",
                    s.file_name().unwrap_or_default().to_string_lossy()
                )
                .as_bytes(),
            );
        }
        Ok(NearDedup {
            fingerprint: format!("{:032x}", h.digest128()),
            config,
            shards,
        })
    }

    fn work(&self) -> PathBuf {
        self.config.output.join("near-dedup")
    }

    fn marker(&self, stage: Stage, task: usize) -> PathBuf {
        self.work()
            .join(stage.name())
            .join(format!("task-{task:05}.done.json"))
    }

    /// Held by the process running a stage's task (`cxxlm data dedup`).
    pub fn lock_path(&self, stage: Stage, task: usize) -> PathBuf {
        self.work()
            .join(stage.name())
            .join(format!("task-{task:05}.lock"))
    }

    fn signature_dir(&self, task: usize) -> PathBuf {
        self.work()
            .join("signatures")
            .join(format!("task-{task:05}"))
    }

    fn pairs_file(&self, band: usize) -> PathBuf {
        self.work()
            .join("buckets")
            .join(format!("band-{band:03}.bin"))
    }

    fn removed_file(&self) -> PathBuf {
        self.work().join("clusters").join("removed.bin")
    }

    pub fn report_path(&self) -> PathBuf {
        self.config.output.join("near-dedup-report.json")
    }

    /// Every task of a finished stage, or an error saying which stage to run first.
    fn finished_tasks(&self, stage: Stage) -> Result<usize> {
        let first = self.marker(stage, 0);
        let missing = || DataError::Resume {
            dir: self.work(),
            message: format!("stage {} has not finished: run it first", stage.name()),
        };
        let m: Marker = read_marker(&first)?.ok_or_else(missing)?;
        if m.fingerprint != self.fingerprint {
            return Err(self.mismatch());
        }
        for t in 1..m.tasks {
            if read_marker(&self.marker(stage, t))?.is_none() {
                return Err(missing());
            }
        }
        Ok(m.tasks)
    }

    fn mismatch(&self) -> DataError {
        mismatch(&self.work())
    }

    pub fn run(&self, stage: Stage, task: TaskSpec) -> Result<StageOutcome> {
        task.validate()?;
        if let Some(first) = read_marker(&self.marker(stage, 0))? {
            if first.tasks != task.tasks {
                return Err(DataError::Resume {
                    dir: self.work(),
                    message: format!("stage {} ran as {} tasks; rerun it with --tasks {} (or remove its output to change the split)", stage.name(), first.tasks, first.tasks),
                });
            }
        }
        let marker = self.marker(stage, task.index);
        if let Some(m) = read_marker(&marker)? {
            if m.fingerprint != self.fingerprint {
                return Err(self.mismatch());
            }
            return Ok(StageOutcome::AlreadyDone);
        }
        let started = std::time::Instant::now();
        let did = match stage {
            Stage::Signatures => self.signatures(task)?,
            Stage::Buckets => self.buckets(task)?,
            Stage::Clusters => self.clusters(task)?,
            Stage::Filter => self.filter(task)?,
        };
        let seconds = started.elapsed().as_secs_f64();
        let dir = marker.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        let m = Marker {
            fingerprint: self.fingerprint.clone(),
            tasks: task.tasks,
            seconds,
        };
        write_atomic(&marker, &serde_json::to_vec(&m).unwrap_or_default())?;
        Ok(if did {
            StageOutcome::Done { seconds }
        } else {
            StageOutcome::NothingToDo
        })
    }

    fn shard_signatures(&self, hasher: &MinHasher, s: usize) -> Result<ShardSignatures> {
        let bands = self.config.minhash.bands;
        let mut out = ShardSignatures {
            docs: Vec::new(),
            keys: vec![Vec::new(); bands],
        };
        let path = &self.shards[s];
        let mut lines = shard_lines(path)?;
        loop {
            let batch: Vec<(usize, String)> = lines
                .by_ref()
                .take(SIGNATURE_BATCH)
                .collect::<Result<_>>()?;
            if batch.is_empty() {
                return Ok(out);
            }
            let sigs: Vec<([u64; 3], Option<Vec<u64>>)> = batch
                .par_iter()
                .map(|(i, line)| {
                    let doc = parse(path, *i, line)?;
                    let permissive = doc
                        .meta
                        .get("license")
                        .and_then(Value::as_str)
                        .is_some_and(is_permissive);
                    Ok((
                        [doc_ref(s, *i), doc.text.len() as u64, permissive as u64],
                        hasher.band_keys(&doc.text),
                    ))
                })
                .collect::<Result<_>>()?;
            for (doc, sig) in sigs {
                for (band, key) in sig.into_iter().flatten().enumerate() {
                    out.keys[band].push([key, doc[0]]);
                }
                out.docs.push(doc);
            }
        }
    }

    fn signatures(&self, task: TaskSpec) -> Result<bool> {
        let hasher = MinHasher::new(self.config.minhash);
        let mine: Vec<usize> = (task.index..self.shards.len())
            .step_by(task.tasks)
            .collect();
        let per_shard: Vec<ShardSignatures> = mine
            .par_iter()
            .map(|&s| self.shard_signatures(&hasher, s))
            .collect::<Result<_>>()?;
        let dir = self.signature_dir(task.index);
        let mut w = RecordWriter::create(&dir.join("docs.bin"), "docs", 3)?;
        for d in per_shard.iter().flat_map(|p| &p.docs) {
            w.push(d)?;
        }
        w.finish()?;
        (0..self.config.minhash.bands)
            .into_par_iter()
            .try_for_each(|band| -> Result<()> {
                let mut keys: Vec<[u64; 2]> = per_shard
                    .iter()
                    .flat_map(|p| p.keys[band].iter().copied())
                    .collect();
                keys.sort_unstable();
                let mut w =
                    RecordWriter::create(&dir.join(format!("band-{band:03}.bin")), "bands", 2)?;
                for rec in &keys {
                    w.push(rec)?;
                }
                w.finish()?;
                Ok(())
            })?;
        Ok(!mine.is_empty())
    }

    fn buckets(&self, task: TaskSpec) -> Result<bool> {
        let sig_tasks = self.finished_tasks(Stage::Signatures)?;
        let mine: Vec<usize> = (task.index..self.config.minhash.bands)
            .step_by(task.tasks)
            .collect();
        mine.par_iter().try_for_each(|&band| -> Result<()> {
            let mut keys: Vec<[u64; 2]> = Vec::new();
            for t in 0..sig_tasks {
                let file = self.signature_dir(t).join(format!("band-{band:03}.bin"));
                keys.extend(read_records::<2>(&file, "bands")?);
            }
            keys.sort_unstable();
            let mut w = RecordWriter::create(&self.pairs_file(band), "pairs", 2)?;
            // Each bucket becomes a star around its first document: enough for
            // union-find, linear in the bucket size.
            for bucket in keys.chunk_by(|a, b| a[0] == b[0]) {
                for &[_, other] in &bucket[1..] {
                    w.push(&[bucket[0][1], other])?;
                }
            }
            w.finish()?;
            Ok(())
        })?;
        Ok(!mine.is_empty())
    }

    fn clusters(&self, task: TaskSpec) -> Result<bool> {
        if task.index != 0 {
            return Ok(false);
        }
        let sig_tasks = self.finished_tasks(Stage::Signatures)?;
        self.finished_tasks(Stage::Buckets)?;
        let tables: Vec<PathBuf> = (0..sig_tasks)
            .map(|t| self.signature_dir(t).join("docs.bin"))
            .collect();
        // Sized from the headers first, so the table is never copied while it grows.
        let total = tables
            .iter()
            .map(|p| record_count(p))
            .sum::<Result<u64>>()?;
        let mut table: Vec<[u64; 3]> = Vec::with_capacity(total as usize);
        for path in &tables {
            table.extend(read_records::<3>(path, "docs")?);
        }
        table.sort_unstable_by_key(|d| d[0]);
        // Sorted by reference: a document's dense index is found by binary search, so
        // no map per document is held.
        let index = |r: u64| {
            table
                .binary_search_by_key(&r, |d| d[0])
                .ok()
                .map(|i| i as u32)
        };
        let uf = UnionFind::new(table.len());
        let bands: Vec<usize> = (0..self.config.minhash.bands).collect();
        let verify = self.config.verify_threshold.is_some();
        let per_band: Vec<(u64, Vec<(u32, u32)>)> = bands
            .par_iter()
            .map(|&band| -> Result<(u64, Vec<(u32, u32)>)> {
                let recs = read_records::<2>(&self.pairs_file(band), "pairs")?;
                let mut kept = Vec::new();
                for [x, y] in &recs {
                    let (Some(a), Some(b)) = (index(*x), index(*y)) else {
                        return Err(DataError::Resume { dir: self.pairs_file(band), message: "names a document the signatures do not list; rerun the buckets stage".into() });
                    };
                    uf.union(a, b);
                    if verify {
                        kept.push((a, b));
                    }
                }
                Ok((recs.len() as u64, kept))
            })
            .collect::<Result<_>>()?;
        let pairs: u64 = per_band.iter().map(|(n, _)| n).sum();
        let candidate_pairs: Vec<(u32, u32)> = per_band.into_iter().flat_map(|(_, p)| p).collect();
        let verification = match self.config.verify_threshold {
            Some(threshold) => Some(self.verify(threshold, &table, &uf, candidate_pairs)?),
            None => None,
        };

        // A root is the smallest index of its cluster, so listing the non-roots under
        // their root (which then goes first) builds every cluster without an entry for
        // the many documents that are alone.
        let mut members: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for i in 0..table.len() as u32 {
            let root = uf.find(i);
            if root != i {
                members.entry(root).or_insert_with(|| vec![root]).push(i);
            }
        }
        let mut removed: Vec<[u64; 2]> = Vec::new();
        let mut removed_bytes = 0u64;
        let mut clusters: Vec<(u32, Vec<u32>)> = Vec::new();
        for (_, m) in members {
            let survivor = match self.config.survivor {
                Survivor::First => m[0],
                Survivor::StackV2 => *m
                    .iter()
                    .max_by_key(|&&i| {
                        (
                            table[i as usize][2],
                            table[i as usize][1],
                            std::cmp::Reverse(i),
                        )
                    })
                    .unwrap_or(&m[0]),
            };
            for &i in &m {
                if i != survivor {
                    removed.push([table[i as usize][0], table[survivor as usize][0]]);
                    removed_bytes += table[i as usize][1];
                }
            }
            clusters.push((survivor, m));
        }
        removed.sort_unstable();
        let mut w = RecordWriter::create(&self.removed_file(), "removed", 2)?;
        for r in &removed {
            w.push(r)?;
        }
        w.finish()?;
        let mut report = self.report(&table, &clusters, removed.len(), removed_bytes, pairs)?;
        if let Some(v) = verification {
            report["verification"] = v;
        }
        write_atomic(
            &self.report_path(),
            &serde_json::to_vec_pretty(&report).unwrap_or_default(),
        )?;
        Ok(true)
    }

    /// Exact Jaccard similarity of every candidate pair, from the documents' shingle
    /// sets, and how many clusters would split if only pairs at or above `threshold`
    /// linked documents. Reported only: the clusters stay as MinHash found them.
    fn verify(
        &self,
        threshold: f64,
        table: &[[u64; 3]],
        clusters: &UnionFind,
        pairs: Vec<(u32, u32)>,
    ) -> Result<Value> {
        let hasher = MinHasher::new(self.config.minhash);
        let mut wanted: Vec<u32> = pairs.iter().flat_map(|&(a, b)| [a, b]).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mut by_shard: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for &d in &wanted {
            let (s, i) = split_ref(table[d as usize][0]);
            by_shard.entry(s).or_default().push(i);
        }
        let sets: Vec<(u32, Vec<u64>)> = by_shard
            .par_iter()
            .map(|(&s, rows)| -> Result<Vec<(u32, Vec<u64>)>> {
                let path = &self.shards[s];
                let mut out = Vec::new();
                for line in shard_lines(path)? {
                    let (i, line) = line?;
                    if rows.binary_search(&i).is_ok() {
                        let doc = parse(path, i, &line)?;
                        let mut set = hasher.shingles(&doc.text).unwrap_or_default();
                        set.sort_unstable();
                        set.dedup();
                        let r = doc_ref(s, i);
                        let dense = table.binary_search_by_key(&r, |d| d[0]).unwrap_or_default();
                        out.push((dense as u32, set));
                    }
                }
                Ok(out)
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        let sets: HashMap<u32, Vec<u64>> = sets.into_iter().collect();
        let verified = UnionFind::new(table.len());
        let mut below = 0u64;
        for &(a, b) in &pairs {
            if jaccard(&sets[&a], &sets[&b]) >= threshold {
                verified.union(a, b);
            } else {
                below += 1;
            }
        }
        let mut parts: HashMap<u32, std::collections::HashSet<u32>> = HashMap::new();
        for &d in &wanted {
            parts
                .entry(clusters.find(d))
                .or_default()
                .insert(verified.find(d));
        }
        let split = parts.values().filter(|p| p.len() > 1).count();
        Ok(
            json!({ "threshold": threshold, "pairs_checked": pairs.len(), "pairs_below_threshold": below, "clusters_that_would_split": split }),
        )
    }

    fn report(
        &self,
        table: &[[u64; 3]],
        clusters: &[(u32, Vec<u32>)],
        removed: usize,
        removed_bytes: u64,
        pairs: u64,
    ) -> Result<Value> {
        let mut histogram: BTreeMap<String, usize> = BTreeMap::new();
        for (_, m) in clusters {
            let n = m.len();
            let bucket = match n {
                2 => "2".to_string(),
                3..=4 => "3-4".into(),
                5..=8 => "5-8".into(),
                9..=16 => "9-16".into(),
                17..=64 => "17-64".into(),
                _ => "65+".into(),
            };
            *histogram.entry(bucket).or_default() += 1;
        }
        let mut largest: Vec<&(u32, Vec<u32>)> = clusters.iter().collect();
        largest.sort_by_key(|(s, m)| (std::cmp::Reverse(m.len()), *s));
        largest.truncate(10);
        // Example ids come from the shards themselves: only those shards are read.
        let wanted: Vec<u64> = largest
            .iter()
            .flat_map(|(s, m)| {
                let s = *s;
                std::iter::once(s).chain(m.iter().copied().filter(move |&i| i != s).take(3))
            })
            .map(|i| table[i as usize][0])
            .collect();
        let mut ids: HashMap<u64, String> = HashMap::new();
        let mut shards: Vec<usize> = wanted.iter().map(|r| split_ref(*r).0).collect();
        shards.sort_unstable();
        shards.dedup();
        for s in shards {
            let path = &self.shards[s];
            for line in shard_lines(path)? {
                let (i, line) = line?;
                let r = doc_ref(s, i);
                if wanted.contains(&r) {
                    let doc = parse(path, i, &line)?;
                    ids.insert(
                        r,
                        doc.meta
                            .get("path")
                            .and_then(Value::as_str)
                            .map(str::to_string)
                            .unwrap_or(doc.id),
                    );
                }
            }
        }
        let name = |i: u32| ids.get(&table[i as usize][0]).cloned().unwrap_or_default();
        let largest: Vec<Value> = largest
            .iter()
            .map(|(s, m)| json!({ "size": m.len(), "survivor": name(*s), "examples": m.iter().filter(|i| *i != s).take(3).map(|&i| name(i)).collect::<Vec<_>>() }))
            .collect();
        let total_bytes: u64 = table.iter().map(|d| d[1]).sum();
        Ok(json!({
            "documents": table.len(),
            "bytes": total_bytes,
            "candidate_pairs": pairs,
            "clusters": clusters.len(),
            "documents_in_clusters": clusters.iter().map(|(_, m)| m.len()).sum::<usize>(),
            "removed": { "documents": removed, "bytes": removed_bytes },
            "cluster_sizes": histogram,
            "largest_clusters": largest,
            "settings": { "minhash": self.config.minhash, "threshold": self.config.minhash.threshold(), "survivor": self.config.survivor },
            "clustering_memory_bytes_per_document": UnionFind::BYTES_PER_DOCUMENT + CLUSTER_TABLE_BYTES_PER_DOCUMENT,
        }))
    }

    fn filter(&self, task: TaskSpec) -> Result<bool> {
        self.finished_tasks(Stage::Clusters)?;
        let removed: HashMap<u64, u64> = read_records::<2>(&self.removed_file(), "removed")?
            .into_iter()
            .map(|[d, s]| (d, s))
            .collect();
        let mine: Vec<usize> = (task.index..self.shards.len())
            .step_by(task.tasks)
            .collect();
        mine.par_iter()
            .try_for_each(|&s| self.filter_shard(s, &removed))?;
        Ok(!mine.is_empty())
    }

    /// Kept lines are copied as they are; only removed documents are parsed (to record
    /// why they went).
    fn filter_shard(&self, s: usize, removed: &HashMap<u64, u64>) -> Result<()> {
        let path = &self.shards[s];
        let name = path.file_name().unwrap_or_default().to_os_string();
        let mut kept = ShardWriter::create(self.config.output.join(&name), self.config.zstd_level)?;
        let mut dropped = match self.config.write_removed {
            true => Some(ShardWriter::create(
                self.config.output.join("removed").join(&name),
                self.config.zstd_level,
            )?),
            false => None,
        };
        for line in shard_lines(path)? {
            let (i, line) = line?;
            match removed.get(&doc_ref(s, i)) {
                None => kept.write_line(&line)?,
                Some(&survivor) => {
                    if let Some(w) = dropped.as_mut() {
                        let mut doc = parse(path, i, &line)?;
                        let (ss, si) = split_ref(survivor);
                        let of = format!(
                            "{}:{}",
                            self.shards[ss]
                                .file_name()
                                .unwrap_or_default()
                                .to_string_lossy(),
                            si + 1
                        );
                        doc.meta.insert("removed".into(), json!({ "step": "near_dedup", "reason": "near_duplicate", "survivor": of }));
                        w.write(&doc)?;
                    }
                }
            }
        }
        kept.finish()?;
        if let Some(w) = dropped {
            w.finish()?;
        }
        Ok(())
    }
}

/// |A ∩ B| / |A ∪ B| of two sorted, distinct sets.
fn jaccard(a: &[u64], b: &[u64]) -> f64 {
    let (mut i, mut j, mut common) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                common += 1;
                i += 1;
                j += 1;
            }
        }
    }
    let union = a.len() + b.len() - common;
    if union == 0 {
        1.0
    } else {
        common as f64 / union as f64
    }
}

/// The document table the clusters stage holds (reference, size and license flag).
const CLUSTER_TABLE_BYTES_PER_DOCUMENT: usize = 24;

fn read_marker(path: &Path) -> Result<Option<Marker>> {
    read_json_if_present(path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn jaccard_of_sorted_sets() {
        assert_eq!(super::jaccard(&[1, 2, 3, 4], &[2, 3, 4, 5]), 0.6);
        assert_eq!(super::jaccard(&[], &[]), 1.0);
        assert_eq!(super::jaccard(&[1], &[2]), 0.0);
    }
}
