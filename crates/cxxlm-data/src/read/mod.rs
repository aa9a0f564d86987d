//! Inputs become a deterministic list of units (a source file, an archive, a JSON lines
//! or Parquet file, a git blob, a Hub file); reading a unit streams its documents and
//! names everything it could not turn into one. Task `i` of `N` takes units
//! `i, i+N, ...`, so tasks split the work without talking to each other.

mod archive;
mod git;
pub mod hub;
mod jsonl;
mod parquet;

use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use crate::config::InputConfig;
use crate::document::RawDocument;
use crate::error::{DataError, Result};
use crate::stats::Skipped;
use hub::{HubClient, HubFile, HubSpec};

/// StarCoder's C, C++ and CUDA extensions.
pub const SOURCE_EXTENSIONS: [&str; 18] = [
    "c", "h", "cc", "cpp", "cxx", "c++", "cp", "hh", "hpp", "hxx", "h++", "inl", "ipp", "tcc",
    "tpp", "cu", "cuh", "cppm",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Xz,
    Zstd,
    Bzip2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Source,
    /// No extension: taken only if its head looks like C++ (libstdc++'s `<vector>`).
    MaybeSource,
    Archive(Compression),
    Jsonl(Compression),
    Parquet,
}

impl Kind {
    /// What a file name says the file is, if it is anything we read.
    pub fn of(name: &str) -> Option<Kind> {
        let lower = name.to_ascii_lowercase();
        let archive = [
            (".tar", Compression::None),
            (".tar.gz", Compression::Gzip),
            (".tgz", Compression::Gzip),
            (".tar.xz", Compression::Xz),
            (".txz", Compression::Xz),
            (".tar.zst", Compression::Zstd),
            (".tzst", Compression::Zstd),
            (".tar.bz2", Compression::Bzip2),
            (".tbz2", Compression::Bzip2),
        ];
        if let Some((_, c)) = archive.iter().find(|(s, _)| lower.ends_with(s)) {
            return Some(Kind::Archive(*c));
        }
        let jsonl = [
            (".jsonl", Compression::None),
            (".jsonl.gz", Compression::Gzip),
            (".jsonl.zst", Compression::Zstd),
            (".jsonl.xz", Compression::Xz),
            (".json.gz", Compression::Gzip),
            (".json.zst", Compression::Zstd),
        ];
        if let Some((_, c)) = jsonl.iter().find(|(s, _)| lower.ends_with(s)) {
            return Some(Kind::Jsonl(*c));
        }
        if lower.ends_with(".parquet") {
            return Some(Kind::Parquet);
        }
        match lower.rsplit_once('.') {
            Some((stem, ext)) if !stem.is_empty() => {
                SOURCE_EXTENSIONS.contains(&ext).then_some(Kind::Source)
            }
            _ if !lower.starts_with('.') => Some(Kind::MaybeSource),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Unit {
    Local {
        path: PathBuf,
        kind: Kind,
    },
    GitBlob {
        repo: PathBuf,
        oid: String,
        path: String,
        size: u64,
        kind: Kind,
    },
    Hub {
        file: HubFile,
        kind: Kind,
    },
}

impl Unit {
    /// A stable one-line description (for logs and for the plan fingerprint).
    pub fn describe(&self) -> String {
        match self {
            Unit::Local { path, .. } => path_name(path),
            Unit::GitBlob {
                repo, path, oid, ..
            } => format!("{}:{path}@{oid}", path_name(repo)),
            Unit::Hub { file, .. } => format!("{}@{}", file.url_path(), file.git_oid),
        }
    }
}

/// Everything the inputs expand to, in a fixed order.
#[derive(Debug, Default)]
pub struct Plan {
    pub units: Vec<Unit>,
    pub ignored_files: u64,
    /// Inputs that could not even be listed (unreadable directories, symlink loops).
    pub skipped: Vec<Skipped>,
}

/// Benchmarks whose license forbids training on them (MultiPL-E's files are named
/// `multipl-e_*`); the data stage never reads them.
fn is_evaluation_set(path: &Path) -> bool {
    path.file_name().is_some_and(|n| {
        n.to_string_lossy()
            .to_ascii_lowercase()
            .starts_with("multipl-e")
    })
}

/// `stop` interrupts listing the Hub.
pub fn plan(config: &InputConfig, hub: Option<&HubClient>, stop: &AtomicBool) -> Result<Plan> {
    let mut plan = Plan::default();
    for input in &config.paths {
        if let Some(spec) = HubSpec::parse(input) {
            let spec = spec?;
            let client = hub.ok_or_else(|| DataError::Hub("no hub client configured".into()))?;
            for file in client.list(&spec, stop)? {
                match Kind::of(&file.path) {
                    Some(kind) if kind != Kind::MaybeSource => {
                        plan.units.push(Unit::Hub { file, kind })
                    }
                    _ => plan.ignored_files += 1,
                }
            }
            continue;
        }
        let path = PathBuf::from(input);
        let meta = std::fs::metadata(&path).map_err(|e| DataError::Input {
            input: input.clone(),
            message: format!("cannot be read: {e}"),
        })?;
        if is_evaluation_set(&path) {
            plan.skipped.push(Skipped {
                input: input.clone(),
                reason: "evaluation_set".into(),
                detail: "an evaluation benchmark whose license forbids training on it".into(),
            });
        } else if meta.is_dir() && path.join(".git").exists() {
            git::plan(&path, &mut plan)?;
        } else if meta.is_dir() {
            plan_dir(&path, &mut plan);
        } else if !meta.is_file() {
            plan.skipped
                .push(not_a_file(input.clone(), meta.file_type()));
        } else {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            // A file named explicitly is read as a source file unless it is a container.
            let kind = match name.as_deref().and_then(Kind::of) {
                Some(Kind::MaybeSource) | None => Kind::Source,
                Some(kind) => kind,
            };
            plan.units.push(Unit::Local { path, kind });
        }
    }
    Ok(plan)
}

/// A file name as text, without loss: bytes that are not UTF-8 are written `\xNN`
/// (`Path::display` makes each of them U+FFFD, so that names differing only there
/// would give one document id).
pub(crate) fn name_of(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

pub(crate) fn path_name(path: &Path) -> String {
    name_of(path.as_os_str().as_bytes())
}

/// A FIFO, socket or device: reading it could block forever or never end.
fn not_a_file(input: String, kind: std::fs::FileType) -> Skipped {
    let what = if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    };
    Skipped {
        input,
        reason: "not_a_file".into(),
        detail: format!("{what}; only regular files are read"),
    }
}

fn plan_dir(root: &Path, plan: &mut Plan) {
    let walk = walkdir::WalkDir::new(root)
        .follow_links(true)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| e.depth() == 0 || e.file_name() != ".git");
    for entry in walk {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                let input = path_name(e.path().unwrap_or(root));
                let reason = if e.loop_ancestor().is_some() {
                    "symlink_loop"
                } else {
                    "unreadable"
                };
                plan.skipped.push(Skipped {
                    input,
                    reason: reason.into(),
                    detail: e.to_string(),
                });
                continue;
            }
        };
        if entry.file_type().is_dir() {
            continue;
        }
        if !entry.file_type().is_file() {
            plan.skipped
                .push(not_a_file(path_name(entry.path()), entry.file_type()));
            continue;
        }
        let name = entry.file_name().to_string_lossy();
        if is_evaluation_set(entry.path()) {
            plan.skipped.push(Skipped {
                input: path_name(entry.path()),
                reason: "evaluation_set".into(),
                detail: "an evaluation benchmark whose license forbids training on it".into(),
            });
            continue;
        }
        match Kind::of(&name) {
            Some(kind) => plan.units.push(Unit::Local {
                path: entry.into_path(),
                kind,
            }),
            None => plan.ignored_files += 1,
        }
    }
}

/// The inputs, with each directory that holds `part-*.jsonl.zst` shards (the output of
/// `data run` or `data dedup`) replaced by those shards, so that `removed/` and work
/// files are not read as documents.
pub fn shard_inputs(inputs: &[String]) -> Vec<String> {
    inputs
        .iter()
        .flat_map(|input| {
            let path = Path::new(input);
            match path.is_dir().then(|| crate::near_dedup::input_shards(path)) {
                Some(Ok(shards)) => shards
                    .into_iter()
                    .map(|p| p.display().to_string())
                    .collect(),
                _ => vec![input.clone()],
            }
        })
        .collect()
}

/// `path` made absolute with symlinks resolved, as far as it exists (an output
/// directory may not exist yet).
fn resolved(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            return rest.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => return absolute,
        }
    }
}

/// An error when `output` is `input`, inside it or holds it: a stage would then read
/// what it writes (or overwrite what it reads).
pub fn refuse_overlap(input: &Path, output: &Path) -> Result<()> {
    let (i, o) = (resolved(input), resolved(output));
    let how = if i == o {
        "is the input"
    } else if o.starts_with(&i) {
        "is inside the input"
    } else if i.starts_with(&o) {
        "holds the input"
    } else {
        return Ok(());
    };
    Err(DataError::Config(format!(
        "the output directory {} {how} {}: a run would read its own output; write elsewhere",
        output.display(),
        input.display()
    )))
}

/// Whether the head of an extension-less file reads like C or C++.
pub fn looks_like_cxx(head: &[u8]) -> bool {
    let head = &head[..head.len().min(4096)];
    if head.starts_with(b"#!") || memchr::memchr(0, head).is_some() {
        return false;
    }
    let Ok(text) =
        std::str::from_utf8(head).or_else(|e| std::str::from_utf8(&head[..e.valid_up_to()]))
    else {
        return false;
    };
    if text.contains("-*- C++ -*-") || text.contains("-*- c++ -*-") {
        return true;
    }
    text.lines().any(|l| {
        let l = l.trim_start();
        [
            "#include ",
            "#include<",
            "#pragma once",
            "#ifndef ",
            "namespace ",
            "template <",
            "template<",
        ]
        .iter()
        .any(|p| l.starts_with(p))
    })
}

/// What reading a unit yields, in a fixed order.
#[derive(Debug)]
pub enum ReadItem {
    Doc(RawDocument),
    /// Could not become a document; `bytes` is its size where known.
    Skip {
        skipped: Skipped,
        bytes: u64,
    },
    /// Not C++ after all (an extension-less file that is not a header).
    Ignored,
}

pub type Sink<'a> = &'a mut dyn FnMut(ReadItem) -> bool;

pub(crate) fn skip(
    input: impl Into<String>,
    reason: &str,
    detail: impl Into<String>,
    bytes: u64,
) -> ReadItem {
    ReadItem::Skip {
        skipped: Skipped {
            input: input.into(),
            reason: reason.into(),
            detail: detail.into(),
        },
        bytes,
    }
}

pub(crate) fn meta(pairs: &[(&str, Value)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// Reads units one after another. Problems with one input are `Skip` items; only a
/// failure that would lose data we cannot name (the Hub unreachable) is an error.
pub struct UnitReader {
    config: InputConfig,
    hub: Option<HubClient>,
    git: HashMap<PathBuf, git::CatFile>,
}

impl UnitReader {
    pub fn new(config: InputConfig, hub: Option<HubClient>) -> Self {
        UnitReader {
            config,
            hub,
            git: HashMap::new(),
        }
    }

    /// `stop` interrupts a download from the Hub.
    pub fn read(&mut self, unit: &Unit, sink: Sink, stop: &AtomicBool) -> Result<()> {
        match unit {
            Unit::Local { path, kind } => {
                let name = path_name(path);
                self.read_local(path, &name, *kind, meta(&[("source", "file".into())]), sink);
                Ok(())
            }
            Unit::GitBlob {
                repo,
                oid,
                path,
                size,
                kind,
            } => {
                let cat = match self.git.entry(repo.clone()) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(git::CatFile::start(repo)?)
                    }
                };
                git::read_blob(cat, repo, oid, path, *size, *kind, &self.config, sink)
            }
            Unit::Hub { file, kind } => {
                let client = self
                    .hub
                    .as_ref()
                    .ok_or_else(|| DataError::Hub("no hub client configured".into()))?;
                let local = client.fetch(file, stop)?;
                let name = file.url_path();
                let m = meta(&[("source", "hub".into()), ("hub_file", name.clone().into())]);
                self.read_local(&local, &name, *kind, m, sink);
                Ok(())
            }
        }
    }

    fn read_local(
        &self,
        path: &Path,
        name: &str,
        kind: Kind,
        base: Map<String, Value>,
        sink: Sink,
    ) {
        // Without blocking: a path that became a FIFO since it was listed must not hang
        // the run (O_NONBLOCK changes nothing for regular files).
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .and_then(|f| f.metadata().map(|m| (f, m.file_type())));
        let file = match opened {
            Ok((f, kind)) if kind.is_file() => f,
            Ok((_, kind)) => {
                sink(ReadItem::Skip {
                    skipped: not_a_file(name.to_string(), kind),
                    bytes: 0,
                });
                return;
            }
            Err(e) => {
                sink(skip(name, "unreadable", e.to_string(), 0));
                return;
            }
        };
        match kind {
            Kind::Source | Kind::MaybeSource => {
                let item = self.source_file(file, name, kind, base);
                sink(item);
            }
            Kind::Archive(c) => archive::read(file, c, name, &self.config, sink),
            Kind::Jsonl(c) => jsonl::read(file, c, name, &self.config, base, sink),
            Kind::Parquet => parquet::read(file, name, &self.config, base, sink),
        }
    }

    fn source_file(
        &self,
        file: File,
        name: &str,
        kind: Kind,
        mut base: Map<String, Value>,
    ) -> ReadItem {
        let len = match file.metadata() {
            Ok(m) => m.len(),
            Err(e) => return skip(name, "unreadable", e.to_string(), 0),
        };
        if let Some(item) = size_skip(name, len, &self.config) {
            return item;
        }
        // One byte to spare: normalizing may end the last line with a line break, which
        // must not make a copy of the whole text to grow it.
        let mut bytes = Vec::with_capacity(len as usize + 1);
        // The length may change under us: never read more than the limit allows.
        if let Err(e) = file.take(self.config.max_bytes + 1).read_to_end(&mut bytes) {
            return skip(name, "unreadable", e.to_string(), len);
        }
        if let Some(item) = size_skip(name, bytes.len() as u64, &self.config) {
            return item;
        }
        if kind == Kind::MaybeSource && !looks_like_cxx(&bytes) {
            return ReadItem::Ignored;
        }
        base.insert("path".into(), name.into());
        ReadItem::Doc(RawDocument {
            id: name.to_string(),
            bytes,
            meta: base,
        })
    }
}

/// The size bounds, checked before anything is read where the size is known.
pub(crate) fn size_skip(name: &str, len: u64, config: &InputConfig) -> Option<ReadItem> {
    if len > config.max_bytes {
        return Some(skip(
            name,
            "too_large",
            format!("{len} bytes > max_bytes {}", config.max_bytes),
            len,
        ));
    }
    if len < config.min_bytes {
        return Some(skip(
            name,
            "empty",
            format!("{len} bytes < min_bytes {}", config.min_bytes),
            len,
        ));
    }
    None
}

pub(crate) fn decompress<'a, R: Read + 'a>(
    reader: R,
    c: Compression,
) -> std::io::Result<Box<dyn Read + 'a>> {
    Ok(match c {
        Compression::None => Box::new(reader),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
        Compression::Xz => Box::new(xz2::read::XzDecoder::new_multi_decoder(reader)),
        Compression::Zstd => Box::new(zstd::Decoder::new(reader)?),
        Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(reader)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_from_names() {
        assert_eq!(Kind::of("a.cpp"), Some(Kind::Source));
        assert_eq!(Kind::of("A.H"), Some(Kind::Source));
        assert_eq!(Kind::of("vector"), Some(Kind::MaybeSource));
        assert_eq!(Kind::of("x.tar.xz"), Some(Kind::Archive(Compression::Xz)));
        assert_eq!(
            Kind::of("p.jsonl.zst"),
            Some(Kind::Jsonl(Compression::Zstd))
        );
        assert_eq!(Kind::of("t.parquet"), Some(Kind::Parquet));
        assert_eq!(Kind::of("notes.txt"), None);
        assert_eq!(Kind::of(".hidden"), None);
    }

    #[test]
    fn extensionless_headers_are_sniffed() {
        assert!(looks_like_cxx(b"// <vector> -*- C++ -*-\n"));
        assert!(looks_like_cxx(b"/* x */\n#pragma once\nint f();\n"));
        assert!(!looks_like_cxx(b"#!/bin/sh\n#include <x>\n"));
        assert!(!looks_like_cxx(b"all:\n\tcc -o x x.c\n"));
    }
}
