//! The index in memory: each source file's definitions, references and includes, the
//! files skipped and why; built by walking a repository, refreshed one file at a time.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use rayon::prelude::*;
use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::parse::{CppParser, Include, Kind, ParseError, Parsed};
use crate::IndexError;

/// File name endings indexed as C or C++ (StarCoder's, as the data stage reads them).
pub const EXTENSIONS: [&str; 16] = [
    "c", "cc", "cpp", "cxx", "c++", "cp", "h", "hh", "hpp", "hxx", "h++", "inc", "inl", "ipp",
    "tcc", "cu",
];

/// The index's own folder inside a repository, by default; never indexed or watched.
pub const DEFAULT_DIR: &str = ".cxxlm-index";

#[derive(Debug, Clone)]
pub struct Settings {
    /// Larger files are skipped (`too_large`): generated tables, amalgamations.
    pub max_bytes: u64,
    /// A file the parser has not finished in this long is skipped (`parse_timeout`).
    pub parse_limit: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            max_bytes: 1 << 20,
            parse_limit: Duration::from_secs(2),
        }
    }
}

/// Why a path holds nothing in the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Skip {
    NotUtf8,
    Binary,
    TooLarge,
    Unreadable,
    SymlinkLoop,
    ParseTimeout,
    PathNotUtf8,
    /// A FIFO, socket or device under a source file's name: reading it could block.
    NotAFile,
}

impl Skip {
    pub const ALL: [Skip; 8] = [
        Skip::NotUtf8,
        Skip::Binary,
        Skip::TooLarge,
        Skip::Unreadable,
        Skip::SymlinkLoop,
        Skip::ParseTimeout,
        Skip::PathNotUtf8,
        Skip::NotAFile,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Skip::NotUtf8 => "not_utf8",
            Skip::Binary => "binary",
            Skip::TooLarge => "too_large",
            Skip::Unreadable => "unreadable",
            Skip::SymlinkLoop => "symlink_loop",
            Skip::ParseTimeout => "parse_timeout",
            Skip::PathNotUtf8 => "path_not_utf8",
            Skip::NotAFile => "not_a_file",
        }
    }

    pub fn code(self) -> u8 {
        Skip::ALL.iter().position(|k| *k == self).unwrap_or(0) as u8
    }

    pub fn from_code(code: u8) -> Option<Skip> {
        Skip::ALL.get(code as usize).copied()
    }
}

/// Symbol names, each stored once.
#[derive(Debug, Default, Clone)]
pub struct Names {
    names: Vec<Box<str>>,
    ids: FxHashMap<Box<str>, u32>,
}

impl Names {
    pub fn id(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.names.len() as u32;
        self.names.push(name.into());
        self.ids.insert(name.into(), id);
        id
    }

    pub fn get(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }

    pub fn name(&self, id: u32) -> &str {
        self.names.get(id as usize).map_or("", |n| n)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Def {
    pub name: u32,
    pub kind: Kind,
    pub line: u32,
    pub end_line: u32,
}

/// What the index knows of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    pub size: u64,
    /// Modification time, nanoseconds since the epoch: with the size, how a rescan
    /// tells an unchanged file.
    pub mtime: i64,
    pub hash: u64,
    pub defs: Vec<Def>,
    /// Names used, each with how often, by name id.
    pub refs: Vec<(u32, u32)>,
    pub includes: Vec<Include>,
}

/// A file's entry with names spelled out: what a fresh build and a refreshed index are
/// compared by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileView {
    pub size: u64,
    pub mtime: i64,
    pub hash: u64,
    pub defs: Vec<(String, Kind, u32, u32)>,
    pub refs: BTreeMap<String, u32>,
    pub includes: Vec<Include>,
}

#[derive(Debug, Clone)]
pub struct Index {
    pub(crate) root: PathBuf,
    /// Where the index lives, when inside the repository (not indexed).
    pub(crate) own_dir: Option<String>,
    /// Include directories from compile_commands.json, relative to the root.
    pub(crate) include_dirs: Vec<String>,
    /// Why compile_commands.json could not be read, if it could not (not persisted).
    pub(crate) include_dirs_error: Option<String>,
    pub(crate) files: BTreeMap<String, FileEntry>,
    pub(crate) skipped: BTreeMap<String, Skip>,
    pub(crate) names: Names,
    /// Bumped by every change: what cached rankings are checked against.
    pub(crate) generation: u64,
}

/// What one path's refresh did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Parsed {
        defs: usize,
        refs: usize,
    },
    Unchanged,
    Removed,
    Skipped(Skip),
    /// Not a C/C++ file, or inside the index's own folder.
    Ignored,
}

/// A file read and parsed, before its names are interned.
enum Outcome {
    Parsed {
        size: u64,
        mtime: i64,
        hash: u64,
        parsed: Parsed,
    },
    Skipped(Skip),
    Gone,
}

pub fn is_source(path: &str) -> bool {
    match path.rsplit_once('.') {
        Some((stem, ext)) if !stem.ends_with('/') && !stem.is_empty() => {
            EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str())
        }
        _ => false,
    }
}

fn mtime_of(meta: &std::fs::Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i64)
}

fn read_and_parse(path: &Path, settings: &Settings, parser: &mut CppParser) -> Outcome {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Outcome::Gone,
        Err(_) => return Outcome::Skipped(Skip::Unreadable),
    };
    if meta.is_dir() {
        return Outcome::Gone;
    }
    if !meta.is_file() {
        return Outcome::Skipped(Skip::NotAFile);
    }
    if meta.len() > settings.max_bytes {
        return Outcome::Skipped(Skip::TooLarge);
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    let read = std::fs::File::open(path)
        .and_then(|f| f.take(settings.max_bytes + 1).read_to_end(&mut bytes));
    match read {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Outcome::Gone,
        Err(_) => return Outcome::Skipped(Skip::Unreadable),
        Ok(_) => {}
    }
    if bytes.len() as u64 > settings.max_bytes {
        return Outcome::Skipped(Skip::TooLarge);
    }
    if bytes.contains(&0) {
        return Outcome::Skipped(Skip::Binary);
    }
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return Outcome::Skipped(Skip::NotUtf8);
    };
    match parser.parse(text) {
        Ok(parsed) => Outcome::Parsed {
            size: bytes.len() as u64,
            mtime: mtime_of(&meta),
            hash: xxhash_rust::xxh3::xxh3_64(&bytes),
            parsed,
        },
        Err(ParseError::Timeout) => Outcome::Skipped(Skip::ParseTimeout),
    }
}

/// A path found by the walk: indexable, or skipped with a reason.
enum Found {
    Source(String),
    Skipped(String, Skip),
}

fn relative(root: &Path, path: &Path) -> Result<String, String> {
    let rel = path.strip_prefix(root).unwrap_or(path);
    match rel.to_str() {
        Some(s) => Ok(s.replace('\\', "/")),
        None => Err(rel.to_string_lossy().into_owned()),
    }
}

/// The C/C++ files under `dir` (inside `root`), symlinks followed, hidden folders and
/// the index's own folder left out, loops and unreadable folders counted.
fn walk(root: &Path, dir: &Path, own_dir: Option<&str>) -> Vec<Found> {
    let mut found = Vec::new();
    let walker = walkdir::WalkDir::new(dir)
        .follow_links(true)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            let hidden = e.depth() > 0 && e.file_name().to_string_lossy().starts_with('.');
            let own = own_dir.is_some_and(|o| relative(root, e.path()).is_ok_and(|r| r == o));
            !hidden && !own
        });
    for entry in walker {
        match entry {
            Ok(e) => {
                let kind = e.file_type();
                if kind.is_dir() {
                    continue;
                }
                match relative(root, e.path()) {
                    Ok(rel) if is_source(&rel) && !kind.is_file() => {
                        found.push(Found::Skipped(rel, Skip::NotAFile))
                    }
                    Ok(rel) if is_source(&rel) => found.push(Found::Source(rel)),
                    Ok(_) => {}
                    Err(lossy) if is_source(&lossy) => {
                        found.push(Found::Skipped(lossy, Skip::PathNotUtf8))
                    }
                    Err(_) => {}
                }
            }
            Err(e) => {
                let reason = match e.loop_ancestor() {
                    Some(_) => Skip::SymlinkLoop,
                    None => Skip::Unreadable,
                };
                if let Some(path) = e.path() {
                    let rel = relative(root, path).unwrap_or_else(|lossy| lossy);
                    found.push(Found::Skipped(rel, reason));
                }
            }
        }
    }
    found
}

/// Files parsed per batch: parsed in parallel, their names then interned in order.
const BATCH: usize = 256;

impl Index {
    pub fn new(root: &Path) -> Result<Index, IndexError> {
        let root = std::fs::canonicalize(root).map_err(|e| IndexError::Io {
            what: "opening the repository".into(),
            path: root.to_path_buf(),
            source: e,
        })?;
        if !root.is_dir() {
            return Err(IndexError::NotADirectory(root));
        }
        Ok(Index::new_unchecked(root))
    }

    /// An empty index of `root`, as stored (the folder may be elsewhere now).
    pub(crate) fn new_unchecked(root: PathBuf) -> Index {
        Index {
            root,
            own_dir: None,
            include_dirs: Vec::new(),
            include_dirs_error: None,
            files: BTreeMap::new(),
            skipped: BTreeMap::new(),
            names: Names::default(),
            generation: 0,
        }
    }

    /// Indexes every C/C++ file of `root`. Files whose size and modification time match
    /// an entry of `previous` keep it unparsed (a rebuild after a restart). `own_dir`:
    /// where the index is stored, when that is inside the repository.
    pub fn build(
        root: &Path,
        own_dir: Option<&Path>,
        settings: &Settings,
        previous: Option<&Index>,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Index, IndexError> {
        let mut index = Index::new(root)?;
        index.own_dir = own_dir.and_then(|d| index.inside(d));
        index.read_compile_commands();
        let found = walk(&index.root, &index.root, index.own_dir.as_deref());
        let mut sources = Vec::new();
        for f in found {
            match f {
                Found::Source(rel) => sources.push(rel),
                Found::Skipped(rel, why) => {
                    index.skipped.insert(rel, why);
                }
            }
        }
        let total = sources.len();
        let mut done = 0;
        for batch in sources.chunks(BATCH) {
            let outcomes: Vec<(String, Option<Outcome>)> = batch
                .par_iter()
                .map_init(
                    || CppParser::new(settings.parse_limit),
                    |parser, rel| {
                        let path = index.root.join(rel);
                        let reuse = previous.and_then(|p| p.files.get(rel)).is_some_and(|old| {
                            std::fs::metadata(&path)
                                .is_ok_and(|m| m.len() == old.size && mtime_of(&m) == old.mtime)
                        });
                        let outcome = (!reuse).then(|| read_and_parse(&path, settings, parser));
                        (rel.clone(), outcome)
                    },
                )
                .collect();
            for (rel, outcome) in outcomes {
                match outcome {
                    Some(outcome) => {
                        index.apply(rel, outcome);
                    }
                    None => {
                        let old = previous
                            .and_then(|p| p.files.get(&rel).map(|e| (p, e)))
                            .map(|(p, e)| index.reinterned(p, e));
                        if let Some(entry) = old {
                            index.files.insert(rel, entry);
                        }
                    }
                }
            }
            done += batch.len();
            progress(done, total);
        }
        Ok(index)
    }

    /// The path relative to the root, if it lies inside the repository.
    pub(crate) fn inside(&self, path: &Path) -> Option<String> {
        let absolute = match path.is_absolute() {
            true => path.to_path_buf(),
            false => std::env::current_dir().ok()?.join(path),
        };
        // The path may be gone (a deleted file, or a folder deleted with it): canonicalize
        // the nearest ancestor that exists.
        let mut existing = absolute.as_path();
        let mut rest = Vec::new();
        let base = loop {
            match std::fs::canonicalize(existing) {
                Ok(p) => break p,
                Err(_) => {
                    rest.push(existing.file_name()?);
                    existing = existing.parent()?;
                }
            }
        };
        let full = rest.iter().rev().fold(base, |p, c| p.join(c));
        let rel = full.strip_prefix(&self.root).ok()?;
        rel.to_str().map(|s| s.replace('\\', "/"))
    }

    fn reinterned(&mut self, from: &Index, e: &FileEntry) -> FileEntry {
        let mut entry = e.clone();
        for d in &mut entry.defs {
            d.name = self.names.id(from.names.name(d.name));
        }
        for r in &mut entry.refs {
            r.0 = self.names.id(from.names.name(r.0));
        }
        entry
    }

    fn apply(&mut self, rel: String, outcome: Outcome) -> Change {
        self.generation += 1;
        match outcome {
            Outcome::Gone => {
                let was = self.files.remove(&rel).is_some() | self.skipped.remove(&rel).is_some();
                match was {
                    true => Change::Removed,
                    false => Change::Ignored,
                }
            }
            Outcome::Skipped(why) => {
                self.files.remove(&rel);
                self.skipped.insert(rel, why);
                Change::Skipped(why)
            }
            Outcome::Parsed {
                size,
                mtime,
                hash,
                parsed,
            } => {
                self.skipped.remove(&rel);
                let entry = self.entry(size, mtime, hash, parsed);
                let change = Change::Parsed {
                    defs: entry.defs.len(),
                    refs: entry.refs.len(),
                };
                if self.files.get(&rel) == Some(&entry) {
                    return Change::Unchanged;
                }
                self.files.insert(rel, entry);
                change
            }
        }
    }

    fn entry(&mut self, size: u64, mtime: i64, hash: u64, parsed: Parsed) -> FileEntry {
        let defs = parsed
            .defs
            .into_iter()
            .map(|d| Def {
                name: self.names.id(&d.name),
                kind: d.kind,
                line: d.line,
                end_line: d.end_line,
            })
            .collect();
        let mut counts: FxHashMap<u32, u32> = FxHashMap::default();
        for (name, _) in &parsed.refs {
            *counts.entry(self.names.id(name)).or_default() += 1;
        }
        let mut refs: Vec<(u32, u32)> = counts.into_iter().collect();
        refs.sort_unstable_by(|a, b| self.names.name(a.0).cmp(self.names.name(b.0)));
        FileEntry {
            size,
            mtime,
            hash,
            defs,
            refs,
            includes: parsed.includes,
        }
    }

    /// Reads `path` again (a file saved, created or deleted, or a folder created or
    /// deleted) and updates what the index holds for it.
    pub fn refresh(&mut self, path: &Path, settings: &Settings) -> Vec<(String, Change)> {
        let Some(rel) = self.inside(path) else {
            return Vec::new();
        };
        if self.is_own(&rel) || rel.split('/').any(|c| c.starts_with('.')) {
            return Vec::new();
        }
        let absolute = self.root.join(&rel);
        if rel.rsplit('/').next() == Some(crate::includes::COMPILE_COMMANDS) {
            self.read_compile_commands();
            return Vec::new();
        }
        if absolute.is_dir() {
            // A folder appeared (or was moved in): what it holds, and forget what it
            // no longer does.
            let prefix = format!("{rel}/");
            let mut changes = self.forget_missing_under(&prefix);
            let mut parser = CppParser::new(settings.parse_limit);
            for f in walk(&self.root, &absolute, self.own_dir.as_deref()) {
                let (rel, outcome) = match f {
                    Found::Source(rel) => {
                        let outcome = read_and_parse(&self.root.join(&rel), settings, &mut parser);
                        (rel, outcome)
                    }
                    Found::Skipped(rel, why) => (rel, Outcome::Skipped(why)),
                };
                let change = self.apply(rel.clone(), outcome);
                changes.push((rel, change));
            }
            return changes;
        }
        if !is_source(&rel) {
            // A folder deleted or moved away: its files go with it.
            return self.forget_missing_under(&format!("{rel}/"));
        }
        let mut parser = CppParser::new(settings.parse_limit);
        let outcome = read_and_parse(&absolute, settings, &mut parser);
        let change = self.apply(rel.clone(), outcome);
        vec![(rel, change)]
    }

    fn read_compile_commands(&mut self) {
        let (dirs, error) = match crate::includes::compile_commands_dirs(&self.root) {
            Ok(dirs) => (dirs, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        if dirs != self.include_dirs {
            self.include_dirs = dirs;
            self.generation += 1;
        }
        self.include_dirs_error = error;
    }

    /// Why compile_commands.json could not be read (its include directories unused).
    pub fn include_dirs_error(&self) -> Option<&str> {
        self.include_dirs_error.as_deref()
    }

    fn is_own(&self, rel: &str) -> bool {
        self.own_dir
            .as_deref()
            .is_some_and(|o| rel == o || rel.starts_with(&format!("{o}/")))
    }

    fn forget_missing_under(&mut self, prefix: &str) -> Vec<(String, Change)> {
        let under = |k: &&String| k.starts_with(prefix);
        let gone: Vec<String> = (self.files.range(prefix.to_string()..).map(|(k, _)| k))
            .take_while(under)
            .chain((self.skipped.range(prefix.to_string()..).map(|(k, _)| k)).take_while(under))
            .filter(|k| !self.root.join(k).exists())
            .cloned()
            .collect();
        gone.into_iter()
            .map(|rel| {
                let change = self.apply(rel.clone(), Outcome::Gone);
                (rel, change)
            })
            .collect()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn files(&self) -> &BTreeMap<String, FileEntry> {
        &self.files
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    pub fn include_dirs(&self) -> &[String] {
        &self.include_dirs
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Skipped paths by reason.
    pub fn skip_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for why in self.skipped.values() {
            *counts.entry(why.name()).or_default() += 1;
        }
        counts
    }

    pub fn skipped(&self) -> &BTreeMap<String, Skip> {
        &self.skipped
    }

    pub fn definitions(&self) -> usize {
        self.files.values().map(|f| f.defs.len()).sum()
    }

    /// Every file's entry with names spelled out.
    pub fn view(&self) -> BTreeMap<String, FileView> {
        self.files
            .iter()
            .map(|(path, e)| {
                let view = FileView {
                    size: e.size,
                    mtime: e.mtime,
                    hash: e.hash,
                    defs: e
                        .defs
                        .iter()
                        .map(|d| {
                            (
                                self.names.name(d.name).to_string(),
                                d.kind,
                                d.line,
                                d.end_line,
                            )
                        })
                        .collect(),
                    refs: e
                        .refs
                        .iter()
                        .map(|&(n, c)| (self.names.name(n).to_string(), c))
                        .collect(),
                    includes: e.includes.clone(),
                };
                (path.clone(), view)
            })
            .collect()
    }
}
