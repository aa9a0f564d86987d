//! The index on disk: a folder with `snapshot.bin` (the whole index, zstd-compressed,
//! with a format version and a checksum) and `journal.bin` (the files refreshed since,
//! appended one checksummed record per file, so that a saved file costs a small write,
//! not a rewrite). Loading replays the journal over the snapshot; saving writes a new
//! snapshot under a temporary name, renames it, and starts the journal afresh. A
//! journal left from an older snapshot (a save interrupted between the two steps) is
//! recognised by the snapshot checksum it names and ignored: that snapshot already
//! holds it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use rustc_hash::FxHashMap;

use crate::index::{Change, Def, FileEntry, Index, Names, Skip};
use crate::parse::{Include, Kind};
use crate::IndexError;

const SNAPSHOT_MAGIC: &[u8; 8] = b"CXXLMIDX";
const JOURNAL_MAGIC: &[u8; 8] = b"CXXLMJNL";
/// Bumped with every change of what is stored; other versions are refused.
pub const FORMAT_VERSION: u32 = 1;
const SNAPSHOT: &str = "snapshot.bin";
const JOURNAL: &str = "journal.bin";
const HEADER: usize = 8 + 4 + 8 + 8;

const RECORD_FILE: u8 = 1;
const RECORD_GONE: u8 = 2;
const RECORD_SKIPPED: u8 = 3;
const RECORD_INCLUDE_DIRS: u8 = 4;

/// A writer of the stored index: where it is and the snapshot its journal extends.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    snapshot_sum: u64,
    journal_records: usize,
}

pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn varint(&mut self, mut x: u64) {
        while x >= 0x80 {
            self.buf.push((x as u8) | 0x80);
            x >>= 7;
        }
        self.buf.push(x as u8);
    }

    pub(crate) fn u64(&mut self, x: u64) {
        self.buf.extend_from_slice(&x.to_le_bytes());
    }

    pub(crate) fn str(&mut self, s: &str) {
        self.varint(s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
    }
}

pub(crate) struct Reader<'a> {
    pub(crate) buf: &'a [u8],
    pub(crate) at: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn byte(&mut self) -> Result<u8, String> {
        let b = *self
            .buf
            .get(self.at)
            .ok_or_else(|| format!("truncated at byte {}", self.at))?;
        self.at += 1;
        Ok(b)
    }

    pub(crate) fn varint(&mut self) -> Result<u64, String> {
        let mut x = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            x |= ((b & 0x7f) as u64) << shift;
            if b < 0x80 {
                return Ok(x);
            }
        }
        Err(format!("a number too long at byte {}", self.at))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, String> {
        u32::try_from(self.varint()?)
            .map_err(|_| format!("a number out of range at byte {}", self.at))
    }

    /// A count of items, each at least one byte: more than the bytes left is corrupt.
    pub(crate) fn count(&mut self) -> Result<usize, String> {
        let n = self.varint()? as usize;
        match n <= self.buf.len() - self.at {
            true => Ok(n),
            false => Err(format!(
                "a count of {n} at byte {} exceeds the data",
                self.at
            )),
        }
    }

    pub(crate) fn u64(&mut self) -> Result<u64, String> {
        let bytes = self
            .buf
            .get(self.at..self.at + 8)
            .ok_or_else(|| format!("truncated at byte {}", self.at))?;
        self.at += 8;
        Ok(u64::from_le_bytes(bytes.try_into().unwrap_or_default()))
    }

    pub(crate) fn str(&mut self) -> Result<&'a str, String> {
        let n = self.count()?;
        let bytes = &self.buf[self.at..self.at + n];
        self.at += n;
        std::str::from_utf8(bytes)
            .map_err(|_| format!("a name that is not UTF-8 at byte {}", self.at))
    }

    pub(crate) fn done(&self) -> bool {
        self.at == self.buf.len()
    }
}

/// Names as stored: each by a number local to one snapshot or record.
trait NameTable {
    fn put(&mut self, w: &mut Writer, name: &str);
}

/// Writes a name's number in a snapshot's table (numbered in first-use order).
struct Numbered<'a> {
    ids: FxHashMap<&'a str, u32>,
    order: Vec<&'a str>,
}

impl NameTable for Numbered<'_> {
    fn put(&mut self, w: &mut Writer, name: &str) {
        let id = self.ids[name];
        w.varint(id as u64);
    }
}

/// Writes names in full (journal records stand alone).
struct Spelled;

impl NameTable for Spelled {
    fn put(&mut self, w: &mut Writer, name: &str) {
        w.str(name);
    }
}

fn put_entry(w: &mut Writer, names: &Names, table: &mut dyn NameTable, path: &str, e: &FileEntry) {
    w.str(path);
    w.varint(e.size);
    w.u64(e.mtime as u64);
    w.u64(e.hash);
    w.varint(e.defs.len() as u64);
    for d in &e.defs {
        table.put(w, names.name(d.name));
        w.buf.push(d.kind.code());
        w.varint(d.line as u64);
        w.varint(d.end_line as u64);
    }
    w.varint(e.refs.len() as u64);
    for &(n, c) in &e.refs {
        table.put(w, names.name(n));
        w.varint(c as u64);
    }
    w.varint(e.includes.len() as u64);
    for i in &e.includes {
        w.str(&i.path);
        w.buf.push(i.angle as u8);
        w.varint(i.line as u64);
    }
}

fn get_entry<'a>(
    r: &mut Reader<'a>,
    names: &mut Names,
    mut name: impl FnMut(&mut Reader<'a>, &mut Names) -> Result<u32, String>,
) -> Result<(String, FileEntry), String> {
    let path = r.str()?.to_string();
    let size = r.varint()?;
    let mtime = r.u64()? as i64;
    let hash = r.u64()?;
    let n = r.count()?;
    let mut defs = Vec::with_capacity(n);
    for _ in 0..n {
        let id = name(r, names)?;
        let code = r.byte()?;
        let kind = Kind::from_code(code).ok_or_else(|| format!("an unknown kind {code}"))?;
        defs.push(Def {
            name: id,
            kind,
            line: r.u32()?,
            end_line: r.u32()?,
        });
    }
    let n = r.count()?;
    let mut refs = Vec::with_capacity(n);
    for _ in 0..n {
        refs.push((name(r, names)?, r.u32()?));
    }
    let n = r.count()?;
    let mut includes = Vec::with_capacity(n);
    for _ in 0..n {
        includes.push(Include {
            path: r.str()?.to_string(),
            angle: r.byte()? != 0,
            line: r.u32()?,
        });
    }
    let entry = FileEntry {
        size,
        mtime,
        hash,
        defs,
        refs,
        includes,
    };
    Ok((path, entry))
}

fn encode_snapshot(index: &Index) -> Vec<u8> {
    let mut table = Numbered {
        ids: FxHashMap::default(),
        order: Vec::new(),
    };
    for e in index.files.values() {
        let used = e
            .defs
            .iter()
            .map(|d| d.name)
            .chain(e.refs.iter().map(|r| r.0));
        for id in used {
            let name = index.names.name(id);
            if !table.ids.contains_key(name) {
                table.ids.insert(name, table.order.len() as u32);
                table.order.push(name);
            }
        }
    }
    let mut w = Writer { buf: Vec::new() };
    w.str(&index.root.to_string_lossy());
    w.str(index.own_dir.as_deref().unwrap_or(""));
    w.varint(index.include_dirs.len() as u64);
    for d in &index.include_dirs {
        w.str(d);
    }
    w.varint(table.order.len() as u64);
    for name in table.order.clone() {
        w.str(name);
    }
    w.varint(index.files.len() as u64);
    for (path, e) in &index.files {
        put_entry(&mut w, &index.names, &mut table, path, e);
    }
    w.varint(index.skipped.len() as u64);
    for (path, why) in &index.skipped {
        w.str(path);
        w.buf.push(why.code());
    }
    w.buf
}

fn decode_snapshot(body: &[u8]) -> Result<Index, String> {
    let mut r = Reader { buf: body, at: 0 };
    let root = PathBuf::from(r.str()?);
    let own_dir = Some(r.str()?.to_string()).filter(|d| !d.is_empty());
    let mut include_dirs = Vec::new();
    for _ in 0..r.count()? {
        include_dirs.push(r.str()?.to_string());
    }
    let mut names = Names::default();
    let n = r.count()?;
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(names.id(r.str()?));
    }
    let mut files = BTreeMap::new();
    for _ in 0..r.count()? {
        let (path, entry) = get_entry(&mut r, &mut names, |r, _| {
            let i = r.varint()? as usize;
            ids.get(i)
                .copied()
                .ok_or_else(|| format!("a name number {i} beyond the table"))
        })?;
        files.insert(path, entry);
    }
    let mut skipped = BTreeMap::new();
    for _ in 0..r.count()? {
        let path = r.str()?.to_string();
        let code = r.byte()?;
        skipped.insert(
            path,
            Skip::from_code(code).ok_or_else(|| format!("an unknown skip reason {code}"))?,
        );
    }
    if !r.done() {
        return Err(format!("{} bytes after the end", body.len() - r.at));
    }
    let mut index = Index::new_unchecked(root);
    index.own_dir = own_dir;
    index.include_dirs = include_dirs;
    index.files = files;
    index.skipped = skipped;
    index.names = names;
    Ok(index)
}

pub(crate) fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> IndexError {
    let what = what.to_string();
    let path = path.to_path_buf();
    move |source| IndexError::Io { what, path, source }
}

pub(crate) fn corrupt(path: &Path, detail: impl Into<String>) -> IndexError {
    IndexError::Corrupt {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// Checks a file's header; returns (checksum or snapshot sum field, body).
fn check_header<'a>(
    path: &Path,
    bytes: &'a [u8],
    magic: &[u8; 8],
) -> Result<(u64, u64, &'a [u8]), IndexError> {
    if bytes.len() < HEADER || &bytes[..8] != magic {
        return Err(IndexError::NotAnIndex(path.to_path_buf()));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
    if version != FORMAT_VERSION {
        return Err(IndexError::Version {
            path: path.to_path_buf(),
            found: version,
            expected: FORMAT_VERSION,
        });
    }
    let a = u64::from_le_bytes(bytes[12..20].try_into().unwrap_or_default());
    let b = u64::from_le_bytes(bytes[20..28].try_into().unwrap_or_default());
    Ok((a, b, &bytes[HEADER..]))
}

fn header(magic: &[u8; 8], a: u64, b: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER);
    h.extend_from_slice(magic);
    h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    h.extend_from_slice(&a.to_le_bytes());
    h.extend_from_slice(&b.to_le_bytes());
    h
}

impl Store {
    /// Writes the whole index to `dir` (created if needed) and empties the journal.
    pub fn save(dir: &Path, index: &Index) -> Result<Store, IndexError> {
        std::fs::create_dir_all(dir).map_err(io("creating the index folder", dir))?;
        let body = zstd::encode_all(&encode_snapshot(index)[..], 3)
            .map_err(io("compressing the index", dir))?;
        let sum = xxhash_rust::xxh3::xxh3_64(&body);
        let path = dir.join(SNAPSHOT);
        let tmp = dir.join(format!("{SNAPSHOT}.tmp"));
        let mut bytes = header(SNAPSHOT_MAGIC, body.len() as u64, sum);
        bytes.extend_from_slice(&body);
        std::fs::write(&tmp, &bytes).map_err(io("writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("renaming into place", &path))?;
        match std::fs::remove_file(dir.join(JOURNAL)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("removing the old journal", &dir.join(JOURNAL))(e))
            }
            _ => {}
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            snapshot_sum: sum,
            journal_records: 0,
        })
    }

    /// Reads the index in `dir`: the snapshot, then the journal's records.
    pub fn load(dir: &Path) -> Result<(Index, Store), IndexError> {
        let path = dir.join(SNAPSHOT);
        let bytes = std::fs::read(&path).map_err(io("reading the index", &path))?;
        let (len, sum, body) = check_header(&path, &bytes, SNAPSHOT_MAGIC)?;
        if body.len() as u64 != len {
            return Err(corrupt(
                &path,
                format!("{} bytes of index where the header says {len}", body.len()),
            ));
        }
        if xxhash_rust::xxh3::xxh3_64(body) != sum {
            return Err(corrupt(&path, "its checksum does not match its contents"));
        }
        let body = zstd::decode_all(body).map_err(|e| corrupt(&path, e.to_string()))?;
        let mut index = decode_snapshot(&body).map_err(|e| corrupt(&path, e))?;
        let mut store = Store {
            dir: dir.to_path_buf(),
            snapshot_sum: sum,
            journal_records: 0,
        };
        let journal = dir.join(JOURNAL);
        match std::fs::read(&journal) {
            Ok(bytes) => store.replay(&journal, &bytes, &mut index)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("reading the journal", &journal)(e)),
        }
        Ok((index, store))
    }

    fn replay(&mut self, path: &Path, bytes: &[u8], index: &mut Index) -> Result<(), IndexError> {
        let (of_snapshot, _, mut rest) = check_header(path, bytes, JOURNAL_MAGIC)?;
        if of_snapshot != self.snapshot_sum {
            // Written before the snapshot that now holds its records.
            return Ok(());
        }
        while !rest.is_empty() {
            let at = bytes.len() - rest.len();
            if rest.len() < 12 {
                return Err(corrupt(path, format!("a record cut short at byte {at}")));
            }
            let len = u32::from_le_bytes(rest[..4].try_into().unwrap_or_default()) as usize;
            let sum = u64::from_le_bytes(rest[4..12].try_into().unwrap_or_default());
            let Some(record) = rest.get(12..12 + len) else {
                return Err(corrupt(path, format!("a record cut short at byte {at}")));
            };
            if xxhash_rust::xxh3::xxh3_64(record) != sum {
                return Err(corrupt(
                    path,
                    format!("the record at byte {at} fails its checksum"),
                ));
            }
            apply_record(index, record)
                .map_err(|e| corrupt(path, format!("the record at byte {at}: {e}")))?;
            self.journal_records += 1;
            rest = &rest[12 + len..];
        }
        Ok(())
    }

    /// Appends what the index now holds for each changed path.
    pub fn record(
        &mut self,
        index: &Index,
        changes: &[(String, Change)],
    ) -> Result<(), IndexError> {
        let mut out = Vec::new();
        let mut add = |record: Vec<u8>| {
            out.extend_from_slice(&(record.len() as u32).to_le_bytes());
            out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&record).to_le_bytes());
            out.extend_from_slice(&record);
        };
        let mut dirs = Writer {
            buf: vec![RECORD_INCLUDE_DIRS],
        };
        dirs.varint(index.include_dirs.len() as u64);
        for d in &index.include_dirs {
            dirs.str(d);
        }
        add(dirs.buf);
        let mut records = 1;
        for (path, change) in changes {
            if *change == Change::Ignored || *change == Change::Unchanged {
                continue;
            }
            let mut w = Writer { buf: Vec::new() };
            if let Some(e) = index.files.get(path) {
                w.buf.push(RECORD_FILE);
                put_entry(&mut w, &index.names, &mut Spelled, path, e);
            } else if let Some(why) = index.skipped.get(path) {
                w.buf.push(RECORD_SKIPPED);
                w.str(path);
                w.buf.push(why.code());
            } else {
                w.buf.push(RECORD_GONE);
                w.str(path);
            }
            add(w.buf);
            records += 1;
        }
        let path = self.dir.join(JOURNAL);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io("opening the journal", &path))?;
        let len = file
            .metadata()
            .map_err(io("reading the journal", &path))?
            .len();
        if len == 0 {
            file.write_all(&header(JOURNAL_MAGIC, self.snapshot_sum, 0))
                .map_err(io("writing the journal", &path))?;
        }
        file.write_all(&out)
            .map_err(io("writing the journal", &path))?;
        self.journal_records += records;
        Ok(())
    }

    /// Records in the journal: past some number, a new snapshot is cheaper to load.
    pub fn journal_records(&self) -> usize {
        self.journal_records
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn apply_record(index: &mut Index, record: &[u8]) -> Result<(), String> {
    let (&tag, body) = record.split_first().ok_or("an empty record")?;
    let mut r = Reader { buf: body, at: 0 };
    match tag {
        RECORD_FILE => {
            let (path, entry) =
                get_entry(&mut r, &mut index.names, |r, names| Ok(names.id(r.str()?)))?;
            index.skipped.remove(&path);
            index.files.insert(path, entry);
        }
        RECORD_GONE => {
            let path = r.str()?;
            index.files.remove(path);
            index.skipped.remove(path);
        }
        RECORD_SKIPPED => {
            let path = r.str()?.to_string();
            let code = r.byte()?;
            let why =
                Skip::from_code(code).ok_or_else(|| format!("an unknown skip reason {code}"))?;
            index.files.remove(&path);
            index.skipped.insert(path, why);
        }
        RECORD_INCLUDE_DIRS => {
            let mut dirs = Vec::new();
            for _ in 0..r.count()? {
                dirs.push(r.str()?.to_string());
            }
            index.include_dirs = dirs;
        }
        other => return Err(format!("an unknown record type {other}")),
    }
    if !r.done() {
        return Err("bytes after the record's end".into());
    }
    index.generation += 1;
    Ok(())
}
