//! A fixed sample of `data run` shards. A document is chosen by a hash of its id, so the
//! same shards give the same sample; spread, each project gives all of its documents or an
//! equal share of the sample, whichever is smaller, so that a few large projects do not
//! make up most of it (a sample spread over 60 Debian projects trains a model that
//! predicts unseen projects better than one that is half LLVM: BENCHMARKS.md).

use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::document::Document;
use crate::error::{DataError, Result};
use crate::shard::{parse, shard_lines, write_atomic, ShardWriter};

#[derive(Debug, Clone)]
pub struct SampleConfig {
    /// Bytes of JSON lines wanted in all.
    pub bytes: u64,
    /// Spread over projects instead of taking the same share of every document.
    pub spread: bool,
    /// Documents whose id contains one of these are left out.
    pub exclude: Vec<String>,
    /// For documents of no archive: which component of the id (0: the first) names the
    /// project.
    pub id_component: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProjectSample {
    pub project: String,
    pub bytes: u64,
    pub kept_bytes: u64,
    pub kept_docs: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SampleReport {
    pub inputs: Vec<PathBuf>,
    pub wanted_bytes: u64,
    pub spread: bool,
    pub exclude: Vec<String>,
    pub docs: u64,
    pub bytes: u64,
    pub kept_docs: u64,
    pub kept_bytes: u64,
    /// Largest first.
    pub projects: Vec<ProjectSample>,
}

/// The project a document comes from: the package of its archive (Debian's
/// `name_version.orig.tar.xz`), else component `id_component` of its id.
pub fn project_of(doc: &Document, id_component: usize) -> String {
    match doc.meta.get("archive").and_then(|a| a.as_str()) {
        Some(archive) => {
            let name = archive.rsplit('/').next().unwrap_or(archive);
            name.split('_').next().unwrap_or(name).to_string()
        }
        None => doc
            .id
            .trim_start_matches('/')
            .split(['/', '!'])
            .nth(id_component)
            .unwrap_or("")
            .to_string(),
    }
}

/// The share of each project's bytes to keep for `want` bytes in all: the same share of
/// every project, or, spread, the largest per-project size that sums to `want` (all of a
/// project smaller than it).
pub fn shares(sizes: &[u64], want: u64, spread: bool) -> Vec<f64> {
    let total: u64 = sizes.iter().sum();
    if !spread {
        let share = (want as f64 / total.max(1) as f64).min(1.0);
        return vec![share; sizes.len()];
    }
    let mut ascending = sizes.to_vec();
    ascending.sort_unstable();
    let (mut left, mut cap) = (want as f64, f64::INFINITY);
    for (i, &size) in ascending.iter().enumerate() {
        let equal = left / (ascending.len() - i) as f64;
        if size as f64 >= equal {
            cap = equal;
            break;
        }
        left -= size as f64;
    }
    sizes
        .iter()
        .map(|&size| (cap / size.max(1) as f64).min(1.0))
        .collect()
}

/// Where the document named `id` falls in [0, 2^64): it is in a sample of `share` of its
/// project when below `share * 2^64`.
fn id_hash(id: &str) -> u64 {
    let digest = Sha256::digest(id.as_bytes());
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(head)
}

/// Writes the sample of `inputs` to `out/part-00000-00000.jsonl.zst` (the documents' JSON
/// lines as they were) and `out/sample.json`.
pub fn sample(inputs: &[PathBuf], out: &Path, config: &SampleConfig) -> Result<SampleReport> {
    if config.exclude.iter().any(String::is_empty) {
        return Err(DataError::Config(
            "an empty --exclude would exclude every document".into(),
        ));
    }
    // A shard named twice (the same input given again, or a directory and one of its
    // shards) is read once.
    let mut shards: Vec<PathBuf> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for input in inputs {
        crate::read::refuse_overlap(input, out)?;
        for shard in crate::near_dedup::shards_at(input)? {
            if seen.insert(std::fs::canonicalize(&shard).unwrap_or_else(|_| shard.clone())) {
                shards.push(shard);
            }
        }
    }
    if crate::near_dedup::input_shards(out).is_ok() {
        return Err(DataError::Config(format!(
            "{} already holds shards: sample into an empty directory",
            out.display()
        )));
    }
    // First pass: each line's project and id hash (none when excluded), and each project's
    // size; the second only reads the lines again to write those chosen.
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    let mut sizes: Vec<u64> = Vec::new();
    let mut lines: Vec<Option<(usize, u64)>> = Vec::new();
    for shard in &shards {
        for line in shard_lines(shard)? {
            let (i, line) = line?;
            let doc = parse(shard, i, &line)?;
            if config.exclude.iter().any(|e| doc.id.contains(e.as_str())) {
                lines.push(None);
                continue;
            }
            let next = index.len();
            let project = *index
                .entry(project_of(&doc, config.id_component))
                .or_insert(next);
            if project == sizes.len() {
                sizes.push(0);
            }
            sizes[project] += line.len() as u64 + 1;
            lines.push(Some((project, id_hash(&doc.id))));
        }
    }
    let share = shares(&sizes, config.bytes, config.spread);
    let picked = |project: usize, hash: u64| (hash as f64) < share[project] * 2f64.powi(64);
    if !lines.iter().flatten().any(|&(p, h)| picked(p, h)) {
        return Err(DataError::Config(format!(
            "the sample of {} documents ({} bytes) is empty: ask for more than {} bytes",
            lines.iter().flatten().count(),
            sizes.iter().sum::<u64>(),
            config.bytes
        )));
    }
    let mut kept = vec![(0u64, 0u64); sizes.len()];
    let mut writer = ShardWriter::create(out.join("part-00000-00000.jsonl.zst"), 3)?;
    let mut picks = lines.iter();
    for shard in &shards {
        for line in shard_lines(shard)? {
            let (i, line) = line?;
            let pick = picks.next().ok_or_else(|| DataError::Input {
                input: format!("{}:{}", shard.display(), i + 1),
                message: "the shards changed while being sampled".into(),
            })?;
            if let Some((project, hash)) = *pick {
                if picked(project, hash) {
                    writer.write_line(&line)?;
                    kept[project].0 += line.len() as u64 + 1;
                    kept[project].1 += 1;
                }
            }
        }
    }
    writer.finish()?;
    let mut projects: Vec<ProjectSample> = index
        .into_iter()
        .map(|(project, p)| ProjectSample {
            project,
            bytes: sizes[p],
            kept_bytes: kept[p].0,
            kept_docs: kept[p].1,
        })
        .collect();
    projects.sort_by(|a, b| {
        b.kept_bytes
            .cmp(&a.kept_bytes)
            .then(a.project.cmp(&b.project))
    });
    let report = SampleReport {
        inputs: inputs.to_vec(),
        wanted_bytes: config.bytes,
        spread: config.spread,
        exclude: config.exclude.clone(),
        docs: lines.iter().flatten().count() as u64,
        bytes: sizes.iter().sum(),
        kept_docs: projects.iter().map(|p| p.kept_docs).sum(),
        kept_bytes: projects.iter().map(|p| p.kept_bytes).sum(),
        projects,
    };
    let json = serde_json::to_vec_pretty(&report).map_err(std::io::Error::from);
    let json = json.map_err(|e| DataError::io(out, e))?;
    write_atomic(&out.join("sample.json"), &json)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spread_shares_give_small_projects_everything_and_cap_large_ones() {
        let s = shares(&[1000, 100, 10], 310, true);
        assert_eq!(s[2], 1.0);
        assert_eq!(s[1], 1.0);
        assert!((s[0] - 0.2).abs() < 1e-12, "{s:?}");
        let s = shares(&[1000, 500], 600, true);
        assert!((s[0] - 0.3).abs() < 1e-12 && (s[1] - 0.6).abs() < 1e-12);
        // Less in all than wanted: everything.
        let s = shares(&[10, 20], 100, true);
        assert!(s.iter().all(|&x| x == 1.0));
        let s = shares(&[300, 100], 100, false);
        assert!(s.iter().all(|&x| (x - 0.25).abs() < 1e-12));
    }

    #[test]
    fn a_document_belongs_to_its_archive_package_or_first_directory() {
        let doc = |id: &str, meta: serde_json::Value| Document {
            id: id.into(),
            text: String::new(),
            meta: meta.as_object().cloned().unwrap_or_default(),
        };
        let archive = "corpus/debian/boost1.81_1.81.0.orig.tar.xz";
        assert_eq!(
            project_of(
                &doc(
                    &format!("{archive}!/boost/x.hpp"),
                    json!({"archive": archive})
                ),
                2
            ),
            "boost1.81"
        );
        assert_eq!(
            project_of(&doc("fmt/include/fmt/core.h", json!({})), 0),
            "fmt"
        );
        assert_eq!(project_of(&doc("/data/repos/abs/x.h", json!({})), 2), "abs");
    }

    #[test]
    fn the_same_shards_give_the_same_sample_spread_over_projects() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        let mut w = ShardWriter::create(input.join("part-00000-00000.jsonl.zst"), 3).unwrap();
        for (project, n) in [("huge", 2000), ("small", 50), ("skip", 50)] {
            for i in 0..n {
                w.write(&Document {
                    id: format!("{project}/src/f{i}.cpp"),
                    text: format!("int f{i}() {{ return {i}; }}\n{}", "// padding\n".repeat(8)),
                    meta: Default::default(),
                })
                .unwrap();
            }
        }
        w.finish().unwrap();
        let config = SampleConfig {
            bytes: 30_000,
            spread: true,
            exclude: vec!["skip/".into()],
            id_component: 0,
        };
        let a = sample(std::slice::from_ref(&input), &dir.path().join("a"), &config).unwrap();
        sample(std::slice::from_ref(&input), &dir.path().join("b"), &config).unwrap();
        let read = |d: &str| std::fs::read(dir.path().join(d).join("part-00000-00000.jsonl.zst"));
        assert_eq!(read("a").unwrap(), read("b").unwrap());
        assert_eq!(a.docs, 2050);
        let by = |p: &str| a.projects.iter().find(|x| x.project == p).unwrap().clone();
        assert_eq!(
            by("small").kept_docs,
            50,
            "a small project gives all of itself"
        );
        assert!(a.projects.iter().all(|p| p.project != "skip"));
        let huge = by("huge");
        assert!(
            (huge.kept_bytes as f64 - (30_000 - by("small").bytes) as f64).abs() < 2_500.0,
            "{huge:?}"
        );
        assert!(std::fs::read(dir.path().join("a/sample.json")).is_ok());
        assert!(sample(std::slice::from_ref(&input), &dir.path().join("a"), &config).is_err());
        // The same input twice is read once.
        let twice = sample(
            &[input.clone(), input.clone()],
            &dir.path().join("c"),
            &config,
        );
        assert_eq!(twice.unwrap().docs, 2050);
        let none = SampleConfig {
            bytes: 1,
            ..config.clone()
        };
        let e = sample(std::slice::from_ref(&input), &dir.path().join("d"), &none);
        assert!(e.unwrap_err().to_string().contains("is empty"));
        let everything = SampleConfig {
            exclude: vec![String::new()],
            ..config
        };
        assert!(sample(&[input], &dir.path().join("e"), &everything).is_err());
    }
}
