//! The pack driver: documents in, `train`, `val` and `val_fim` indexed datasets and a
//! manifest (`pack.json`) out.
//!
//! Each input unit (one shard) is packed into its own files under `parts/`, finished by a
//! marker, so a killed run resumes at the first unfinished shard; the parts are then
//! concatenated into the final files and removed. Validation documents are chosen by a
//! hash of their id, so they stay validation documents when the corpus grows.

use cxxlm_data::config::InputConfig;
use cxxlm_data::pipeline::read_json_if_present;
use cxxlm_data::read::{self, ReadItem, UnitReader};
use cxxlm_data::shard::write_atomic;
use cxxlm_tokenizer::{to_hf_json, Bpe, PieceCache};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::fim::{FimConfig, Layout, Packer};
use crate::indexed::{IndexedDataset, IndexedWriter, TokenType};
use crate::repo::{locate, RepoConfig};
use crate::{PackError, Result};

/// The packed datasets: training (with FIM), plain validation (for bits per byte) and
/// the same validation documents, all rearranged, for FIM evaluation.
pub const SPLITS: [&str; 3] = ["train", "val", "val_fim"];

pub struct PackConfig {
    pub inputs: Vec<String>,
    pub out: PathBuf,
    pub fim: FimConfig,
    pub val_fraction: f64,
    /// File-level documents held out by their repository's name rather than their id, so
    /// that they hold out the repositories a repository-level pack of the same data does.
    pub val_by_repository: bool,
    /// Repository-level examples instead of file-level documents.
    pub repo: Option<RepoConfig>,
    /// Text read before a batch is encoded in parallel.
    pub batch_bytes: usize,
}

/// What changes the packed tokens; a resumed or repeated pack must match it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub tokenizer_sha256: String,
    pub vocab_size: usize,
    pub token_type: TokenType,
    pub fim: FimConfig,
    pub val_fraction: f64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub val_by_repository: bool,
    pub inputs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<RepoConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitCounts {
    pub documents: u64,
    pub tokens: u64,
    /// UTF-8 bytes of source text (the denominator of bits per byte).
    pub text_bytes: u64,
    pub fim_psm: u64,
    pub fim_spm: u64,
}

impl SplitCounts {
    fn count(&mut self, tokens: usize, text_bytes: usize, layout: Layout) {
        self.documents += 1;
        self.tokens += tokens as u64;
        self.text_bytes += text_bytes as u64;
        match layout {
            Layout::Psm => self.fim_psm += 1,
            Layout::Spm => self.fim_spm += 1,
            Layout::Plain => {}
        }
    }

    fn add(&mut self, o: &SplitCounts) {
        self.documents += o.documents;
        self.tokens += o.tokens;
        self.text_bytes += o.text_bytes;
        self.fim_psm += o.fim_psm;
        self.fim_spm += o.fim_spm;
    }
}

/// Counts of one part (or, summed, of the whole pack).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Counts {
    splits: BTreeMap<String, SplitCounts>,
    /// Inputs that did not become documents, by reason.
    skipped: BTreeMap<String, u64>,
    #[serde(default)]
    indentation: BTreeMap<String, u64>,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        for (k, v) in &o.splits {
            self.splits.entry(k.clone()).or_default().add(v);
        }
        for (k, v) in &o.skipped {
            *self.skipped.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.indentation {
            *self.indentation.entry(k.clone()).or_default() += v;
        }
    }
}

/// How the data stage laid out a document's text, as it recorded it.
fn indentation(meta: &serde_json::Map<String, serde_json::Value>) -> &'static str {
    match meta
        .get("normalized")
        .and_then(|n| n.get("indent_stripped"))
        .and_then(serde_json::Value::as_bool)
    {
        Some(true) => "stripped",
        Some(false) => "kept",
        None => "unrecorded",
    }
}

/// `pack.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub settings: Settings,
    /// Where the tokenizer was read from (informational; the hash is what is checked).
    pub tokenizer_path: String,
    pub splits: BTreeMap<String, SplitCounts>,
    pub skipped: BTreeMap<String, u64>,
    /// Documents by how the data stage laid out their text: indentation `stripped`,
    /// `kept`, or `unrecorded`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub indentation: BTreeMap<String, u64>,
}

impl Manifest {
    /// Whether the packed text had its indentation stripped, when every document says
    /// the same.
    pub fn indentation_stripped(&self) -> Option<bool> {
        match self
            .indentation
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()[..]
        {
            ["stripped"] => Some(true),
            ["kept"] => Some(false),
            _ => None,
        }
    }

    /// Whether the pack in `dir` (this manifest) had its indentation stripped, and where
    /// that was read: this record, or, for packs made before it was kept, the first
    /// document of the first shard among its inputs.
    pub fn indentation_in(&self, dir: &Path) -> Result<(bool, String)> {
        if let Some(stripped) = self.indentation_stripped() {
            return Ok((stripped, format!("the pack {}", dir.display())));
        }
        let format = |path: &Path, message: String| PackError::Format {
            path: path.to_path_buf(),
            message,
        };
        let shard = read::shard_inputs(&self.settings.inputs)
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.to_string_lossy().ends_with(".jsonl.zst"))
            .ok_or_else(|| format(&Self::path(dir), "lists no .jsonl.zst shard".into()))?;
        let file = std::fs::File::open(&shard).map_err(|e| PackError::io(&shard, e))?;
        let decoder = zstd::Decoder::new(file).map_err(|e| PackError::io(&shard, e))?;
        let first = std::io::BufRead::lines(std::io::BufReader::new(decoder))
            .next()
            .ok_or_else(|| format(&shard, "is empty".into()))?
            .map_err(|e| PackError::io(&shard, e))?;
        let doc: serde_json::Value =
            serde_json::from_str(&first).map_err(|e| format(&shard, e.to_string()))?;
        let meta = doc["meta"].as_object().cloned().unwrap_or_default();
        match indentation(&meta) {
            "unrecorded" => Err(format(&shard, "documents record no normalization".into())),
            how => Ok((how == "stripped", shard.display().to_string())),
        }
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join("pack.json")
    }

    pub fn load(dir: &Path) -> Result<Self> {
        let path = Self::path(dir);
        let format = |message: String| PackError::Format {
            path: path.clone(),
            message: format!("{message}: not the output of a finished `cxxlm pack`"),
        };
        let bytes = match std::fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format("missing".into()))
            }
            read => read.map_err(|e| PackError::io(&path, e))?,
        };
        serde_json::from_slice(&bytes).map_err(|e| format(format!("unreadable ({e})")))
    }

    /// Refuses a tokenizer other than the one the tokens were made with.
    pub fn check_tokenizer(&self, dir: &Path, bpe: &Bpe) -> Result<()> {
        let found = tokenizer_sha256(bpe);
        if found != self.settings.tokenizer_sha256 {
            return Err(PackError::TokenizerMismatch {
                manifest: Self::path(dir),
                expected: self.settings.tokenizer_sha256.clone(),
                found,
            });
        }
        Ok(())
    }

    /// Opens one split, checking that it is the one this manifest describes and that its
    /// tokens are of the vocabulary.
    pub fn open(&self, dir: &Path, split: &str) -> Result<IndexedDataset> {
        let ds = IndexedDataset::open(&dir.join(split))?;
        let expected = self.splits.get(split).map_or(0, |c| c.tokens);
        if ds.total_tokens() != expected || ds.token_type() != self.settings.token_type {
            return Err(PackError::Format {
                path: ds.path().to_path_buf(),
                message: format!(
                    "holds {} {:?} tokens, {} records {expected} {:?}: the files come from different packs",
                    ds.total_tokens(),
                    ds.token_type(),
                    Self::path(dir).display(),
                    self.settings.token_type
                ),
            });
        }
        ds.check_vocab(self.settings.vocab_size)?;
        Ok(ds)
    }
}

/// A fingerprint of the vocabulary, merges and specials (not of the file's formatting).
pub fn tokenizer_sha256(bpe: &Bpe) -> String {
    hex::encode(Sha256::digest(to_hf_json(bpe).to_string().as_bytes()))
}

/// Whether `key` falls in a share `fraction` of keys (by its hash, so a key keeps its side
/// when the corpus grows).
fn in_share(key: &str, fraction: f64) -> bool {
    let h = xxhash_rust::xxh3::xxh3_64(key.as_bytes());
    // 1 takes every document (a held-out set packed whole), the largest hash included.
    fraction >= 1.0 || (h as f64 / u64::MAX as f64) < fraction
}

/// Packs the inputs, resuming a previous run of the same settings; `progress` hears the
/// text bytes and documents done so far.
pub fn pack(
    bpe: &Bpe,
    tokenizer_path: &Path,
    config: &PackConfig,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Manifest> {
    let file_share = config.repo.map_or(0.0, |r| r.file_share);
    if !(0.0..=1.0).contains(&config.fim.rate)
        || !(0.0..=1.0).contains(&config.fim.spm_rate)
        || !(0.0..=1.0).contains(&config.val_fraction)
        || !(0.0..=1.0).contains(&file_share)
    {
        return Err(PackError::Config(
            "FIM rates, the validation fraction and the file-level share must lie in [0, 1]".into(),
        ));
    }
    if config.repo.is_some_and(|r| r.context == 0) {
        return Err(PackError::Config(
            "repository examples need a context above 0 tokens".into(),
        ));
    }
    let input = InputConfig {
        paths: read::shard_inputs(&config.inputs),
        ..Default::default()
    };
    // Only reads from the Hub look at a stop flag: shards are local files.
    let never = std::sync::atomic::AtomicBool::new(false);
    let plan = read::plan(&input, None, &never)?;
    let settings = Settings {
        tokenizer_sha256: tokenizer_sha256(bpe),
        vocab_size: bpe.vocab_size(),
        token_type: TokenType::for_vocab(bpe.vocab_size()),
        fim: config.fim,
        val_fraction: config.val_fraction,
        val_by_repository: config.val_by_repository,
        inputs: plan.units.iter().map(|u| u.describe()).collect(),
        repo: config.repo,
    };
    let refuse = |dir: &Path, what: &str| {
        PackError::Resume {
        dir: dir.to_path_buf(),
        message: format!("{what} was packed with other settings, tokenizer or inputs; remove it or choose another --out"),
    }
    };
    if let Some(done) = read_json_if_present::<Manifest>(&Manifest::path(&config.out))? {
        if done.settings != settings {
            return Err(refuse(&config.out, "this directory"));
        }
        return Ok(done);
    }
    let parts = config.out.join("parts");
    std::fs::create_dir_all(&parts).map_err(|e| PackError::io(&parts, e))?;
    let settings_path = parts.join("settings.json");
    match read_json_if_present::<Settings>(&settings_path)? {
        Some(s) if s != settings => return Err(refuse(&config.out, "an unfinished pack here")),
        Some(_) => {}
        None => write_atomic(
            &settings_path,
            &serde_json::to_vec_pretty(&settings).expect("json"),
        )?,
    }

    let mut total = Counts::default();
    for s in &plan.skipped {
        *total.skipped.entry(s.reason.clone()).or_default() += 1;
    }
    let packer = Packer::new(bpe, config.fim);
    let mut reader = UnitReader::new(input.clone(), None);
    let (mut bytes_done, mut docs_done) = (0u64, 0u64);
    for (i, unit) in plan.units.iter().enumerate() {
        let marker = parts.join(format!("{i:05}.json"));
        let counts = match read_json_if_present::<Counts>(&marker)? {
            Some(c) => c,
            None => {
                let c = pack_unit(
                    &packer,
                    config,
                    &settings,
                    &parts.join(format!("{i:05}")),
                    |sink| reader.read(unit, sink, &never),
                    &mut |b, d| progress(bytes_done + b, docs_done + d),
                )?;
                write_atomic(&marker, &serde_json::to_vec(&c).expect("json"))?;
                c
            }
        };
        for c in counts.splits.values() {
            bytes_done += c.text_bytes;
            docs_done += c.documents;
        }
        total.add(&counts);
    }

    for split in SPLITS {
        let mut w = IndexedWriter::create(&config.out.join(split), settings.token_type)?;
        for i in 0..plan.units.len() {
            let part = IndexedDataset::open(&parts.join(format!("{i:05}.{split}")))?;
            part.check_vocab(settings.vocab_size)?;
            w.append(&part)?;
        }
        w.finish()?;
    }
    let manifest = Manifest {
        settings,
        tokenizer_path: tokenizer_path.display().to_string(),
        splits: SPLITS
            .iter()
            .map(|s| {
                (
                    s.to_string(),
                    total.splits.get(*s).cloned().unwrap_or_default(),
                )
            })
            .collect(),
        skipped: total.skipped,
        indentation: total.indentation,
    };
    write_atomic(
        &Manifest::path(&config.out),
        &serde_json::to_vec_pretty(&manifest).expect("json"),
    )?;
    std::fs::remove_dir_all(&parts).map_err(|e| PackError::io(&parts, e))?;
    Ok(manifest)
}

/// Packs one unit's documents into `<prefix>.<split>.bin/.idx`.
fn pack_unit(
    packer: &Packer,
    config: &PackConfig,
    settings: &Settings,
    prefix: &Path,
    read: impl FnOnce(read::Sink) -> cxxlm_data::error::Result<()>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Counts> {
    let mut writers = SPLITS
        .iter()
        .map(|s| {
            IndexedWriter::create(
                &PathBuf::from(format!("{}.{s}", prefix.display())),
                settings.token_type,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let mut counts = Counts::default();
    let mut batch: Vec<Doc> = Vec::new();
    let mut batch_bytes = 0;
    let mut failure = None;
    let (mut bytes, mut docs) = (0u64, 0u64);
    let mut flush = |batch: &mut Vec<Doc>, counts: &mut Counts| -> Result<()> {
        let packed = match config.repo {
            Some(repo) => pack_repositories(packer, config, repo, batch),
            None => batch
                .par_iter()
                .map_init(PieceCache::default, |cache, doc| {
                    let validation = held_out(doc, config);
                    pack_document(packer, config, validation, &doc.id, &doc.text, cache)
                })
                .flatten()
                .collect(),
        };
        for p in packed {
            writers[p.split].push(&p.tokens)?;
            counts
                .splits
                .entry(SPLITS[p.split].to_string())
                .or_default()
                .count(p.tokens.len(), p.text_bytes, p.layout);
        }
        bytes += batch.iter().map(|d| d.text.len() as u64).sum::<u64>();
        docs += batch.len() as u64;
        progress(bytes, docs);
        batch.clear();
        Ok(())
    };
    read(&mut |item| {
        match item {
            ReadItem::Doc(doc) => match String::from_utf8(doc.bytes) {
                Ok(text) => {
                    batch_bytes += text.len();
                    *counts
                        .indentation
                        .entry(indentation(&doc.meta).into())
                        .or_default() += 1;
                    let place = (config.repo.is_some() || config.val_by_repository)
                        .then(|| locate(&doc.id, &doc.meta));
                    batch.push(Doc {
                        id: doc.id,
                        text,
                        place,
                    });
                }
                Err(_) => *counts.skipped.entry("invalid_utf8".into()).or_default() += 1,
            },
            ReadItem::Skip { skipped, .. } => {
                *counts.skipped.entry(skipped.reason).or_default() += 1
            }
            ReadItem::Ignored => {}
        }
        // A repository's files are packed together: its unit is read whole first.
        if config.repo.is_none() && batch_bytes >= config.batch_bytes {
            batch_bytes = 0;
            if let Err(e) = flush(&mut batch, &mut counts) {
                failure = Some(e);
                return false;
            }
        }
        true
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    flush(&mut batch, &mut counts)?;
    for w in writers {
        w.finish()?;
    }
    Ok(counts)
}

/// Whether a file-level document is a validation one: chosen by a hash of its id, or of
/// its repository's name (as repository examples are).
fn held_out(doc: &Doc, config: &PackConfig) -> bool {
    match &doc.place {
        Some((repository, _)) if config.val_by_repository => {
            in_share(repository, config.val_fraction)
        }
        _ => in_share(&doc.id, config.val_fraction),
    }
}

/// A document read, and with repository examples (or validation by repository) its
/// repository and path.
struct Doc {
    id: String,
    text: String,
    place: Option<(String, String)>,
}

/// One packed sequence for a split.
struct Packed {
    split: usize,
    tokens: Vec<u32>,
    text_bytes: usize,
    layout: Layout,
}

/// A file-level document: a training one (FIM at the configured rate), or a validation
/// one both plain and rearranged.
fn pack_document(
    packer: &Packer,
    config: &PackConfig,
    validation: bool,
    id: &str,
    text: &str,
    cache: &mut PieceCache,
) -> Vec<Packed> {
    let packed = |split, (tokens, layout): (Vec<u32>, Layout)| Packed {
        split,
        tokens,
        text_bytes: text.len(),
        layout,
    };
    if validation {
        vec![
            packed(1, packer.document(id, text, 0.0, cache)),
            packed(2, packer.document(id, text, 1.0, cache)),
        ]
    } else {
        vec![packed(0, packer.document(id, text, config.fim.rate, cache))]
    }
}

/// The documents grouped by repository (in the order first met), each repository packed
/// as repository examples, or (a share `file_share` of them, by name) file by file;
/// validation is chosen by repository, so a held-out repository is held out whole.
fn pack_repositories(
    packer: &Packer,
    config: &PackConfig,
    repo: RepoConfig,
    docs: &[Doc],
) -> Vec<Packed> {
    let mut groups: Vec<(&str, Vec<&Doc>)> = Vec::new();
    let mut at: std::collections::HashMap<&str, usize> = Default::default();
    for d in docs {
        let name = d.place.as_ref().map_or("", |(name, _)| name.as_str());
        let i = *at.entry(name).or_insert_with(|| {
            groups.push((name, Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(d);
    }
    groups
        .par_iter()
        .map_init(PieceCache::default, |cache, (name, docs)| {
            let validation = in_share(name, config.val_fraction);
            if !validation && in_share(&format!("{name}\nfile-level"), repo.file_share) {
                return docs
                    .iter()
                    .flat_map(|d| pack_document(packer, config, false, &d.id, &d.text, cache))
                    .collect();
            }
            let files: Vec<(String, String)> = docs
                .iter()
                .map(|d| {
                    let path = d.place.as_ref().map_or(d.id.as_str(), |(_, p)| p.as_str());
                    (path.to_string(), d.text.clone())
                })
                .collect();
            let examples = |split, rate, cache: &mut PieceCache| {
                packer
                    .repository(name, &files, repo.context, rate, cache)
                    .into_iter()
                    .map(move |e| Packed {
                        split,
                        tokens: e.tokens,
                        text_bytes: e.text_bytes,
                        layout: e.layout,
                    })
                    .collect::<Vec<_>>()
            };
            if validation {
                let mut both = examples(1, 0.0, cache);
                both.extend(examples(2, 1.0, cache));
                both
            } else {
                examples(0, config.fim.rate, cache)
            }
        })
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(val_by_repository: bool) -> PackConfig {
        PackConfig {
            inputs: Vec::new(),
            out: PathBuf::new(),
            fim: FimConfig::default(),
            val_fraction: 0.5,
            val_by_repository,
            repo: None,
            batch_bytes: 0,
        }
    }

    #[test]
    fn a_missing_or_unreadable_manifest_is_no_finished_pack() {
        let dir = tempfile::tempdir().unwrap();
        for contents in [None, Some(""), Some("{\"settings\": 3}")] {
            if let Some(c) = contents {
                std::fs::write(Manifest::path(dir.path()), c).unwrap();
            }
            let e = Manifest::load(dir.path()).err().unwrap().to_string();
            assert!(
                e.contains("not the output of a finished `cxxlm pack`"),
                "{e}"
            );
        }
    }

    #[test]
    fn held_out_by_repository_holds_out_whole_repositories_as_repository_packs_do() {
        let repositories: Vec<String> = (0..20)
            .map(|r| format!("project-{r}.orig.tar.xz"))
            .collect();
        let docs: Vec<Doc> = repositories
            .iter()
            .flat_map(|r| {
                (0..10).map(move |f| Doc {
                    id: format!("{r}/src/file{f}.cpp"),
                    text: String::new(),
                    place: Some((r.clone(), format!("src/file{f}.cpp"))),
                })
            })
            .collect();
        let by_repository = config(true);
        for (r, files) in repositories.iter().zip(docs.chunks(10)) {
            let held: Vec<bool> = files.iter().map(|d| held_out(d, &by_repository)).collect();
            assert!(held.iter().all(|&h| h == in_share(r, 0.5)), "{r}: {held:?}");
        }
        // By id, the files of a repository are split between training and validation.
        let by_id = config(false);
        assert!(docs.chunks(10).any(|files| {
            let held = files.iter().filter(|d| held_out(d, &by_id)).count();
            held > 0 && held < files.len()
        }));
    }
}
