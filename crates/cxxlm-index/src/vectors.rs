//! Embedding vectors of a repository's functions and files, kept beside its index
//! (`vectors.bin`) with the fingerprint of what made them, and searched by exact cosine
//! similarity. A model computes the vectors elsewhere (where libtorch is); this module
//! says what each file contributes, keeps the vectors of files whose content has not
//! changed, and ranks the stored vectors for a query's.
//!
//! The file holds a header (magic, format version, body length, checksum) and a body of
//! the fingerprint, the model it names, the dimension, and per file its content hash,
//! its functions (name and lines), its vector and theirs (little-endian f32). It is
//! written whole under a temporary name and renamed.

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;

use crate::index::Index;
use crate::parse::Kind;
use crate::retrieval::{doc_comment, lines_between};
use crate::store::{corrupt, io, Reader, Writer};
use crate::IndexError;

/// The store's file in an index folder.
pub const VECTORS: &str = "vectors.bin";
const MAGIC: &[u8; 8] = b"CXXLMVEC";
/// Bumped with every change of what is stored; other versions are refused.
pub const VECTORS_VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 8 + 8;

/// A function definition's text to embed: its doc comment and first lines.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionText {
    pub name: String,
    pub line: u32,
    pub end_line: u32,
    pub text: String,
}

/// What one file of the index contributes: its text and its functions'.
#[derive(Debug, Clone)]
pub struct FileTexts {
    pub path: String,
    pub hash: u64,
    pub text: String,
    pub functions: Vec<FunctionText>,
}

/// The texts of `path`, a file of `index`: the whole file's, and each function
/// definition's from the comment above it to at most `max_lines` lines of its body.
/// Fails with a reason (a counter's name) when the file cannot be read or has changed
/// since it was indexed.
pub fn file_texts(index: &Index, path: &str, max_lines: u32) -> Result<FileTexts, &'static str> {
    let entry = index.files().get(path).ok_or("file_not_indexed")?;
    let text = std::fs::read_to_string(index.root().join(path)).map_err(|_| "file_unreadable")?;
    if xxhash_rust::xxh3::xxh3_64(text.as_bytes()) != entry.hash {
        return Err("file_changed_since_indexed");
    }
    let lines: Vec<&str> = text.lines().collect();
    let functions = entry
        .defs
        .iter()
        .filter(|d| d.kind == Kind::Function)
        .map(|d| {
            let first = doc_comment(&lines, d.line).map_or(d.line, |(first, _)| first);
            let last = d.end_line.min(d.line + max_lines.max(1) - 1);
            FunctionText {
                name: index.names().name(d.name).to_string(),
                line: d.line,
                end_line: d.end_line,
                text: lines_between(&lines, first, last),
            }
        })
        .collect();
    Ok(FileTexts {
        path: path.to_string(),
        hash: entry.hash,
        text,
        functions,
    })
}

/// A function of a stored file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFunction {
    pub name: String,
    pub line: u32,
    pub end_line: u32,
}

/// The vectors of one file, as of the content hash they were computed from.
#[derive(Debug, Clone, PartialEq)]
pub struct FileVectors {
    pub hash: u64,
    /// The whole file's vector.
    pub file: Vec<f32>,
    pub functions: Vec<StoredFunction>,
    /// Each function's vector in turn, `dim` numbers each.
    pub function_vectors: Vec<f32>,
}

/// The stored vectors of a repository.
#[derive(Debug, Clone, PartialEq)]
pub struct Vectors {
    /// What made the vectors (weights, tokenizer, how texts are cut and pooled):
    /// vectors of different fingerprints are not comparable.
    pub fingerprint: String,
    /// The model that made them, as named when they were made.
    pub model: String,
    pub dim: usize,
    pub files: BTreeMap<String, FileVectors>,
}

/// What an update of the store has to do to match its index.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Files to embed: new, or changed since their vectors were made.
    pub embed: Vec<String>,
    /// Files whose vectors are current.
    pub current: usize,
    /// Files stored but no longer indexed.
    pub gone: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionHit {
    pub file: String,
    pub name: String,
    pub line: u32,
    pub end_line: u32,
    pub score: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileHit {
    pub file: String,
    pub score: f32,
}

/// The dot product, over eight lanes so that the compiler vectorizes it.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut acc = [0f32; 8];
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The `k` best of `scored`, best first.
fn best<T>(mut scored: Vec<(f32, T)>, k: usize) -> Vec<(f32, T)> {
    let better = |a: &(f32, T), b: &(f32, T)| b.0.total_cmp(&a.0);
    if k < scored.len() {
        scored.select_nth_unstable_by(k, better);
        scored.truncate(k);
    }
    scored.sort_by(better);
    scored
}

impl Vectors {
    pub fn new(fingerprint: String, model: String, dim: usize) -> Vectors {
        Vectors {
            fingerprint,
            model,
            dim,
            files: BTreeMap::new(),
        }
    }

    /// Which files of `index` need vectors, and which stored ones it no longer holds.
    pub fn plan(&self, index: &Index) -> Plan {
        let mut plan = Plan::default();
        for (path, entry) in index.files() {
            match self.files.get(path) {
                Some(v) if v.hash == entry.hash => plan.current += 1,
                _ => plan.embed.push(path.clone()),
            }
        }
        plan.gone = self
            .files
            .keys()
            .filter(|p| !index.files().contains_key(*p))
            .cloned()
            .collect();
        plan
    }

    /// Stores a file's vectors, replacing what it had.
    pub fn insert(&mut self, path: String, v: FileVectors) -> Result<(), String> {
        if v.file.len() != self.dim || v.function_vectors.len() != v.functions.len() * self.dim {
            return Err(format!(
                "{path}: vectors of {} and {} numbers for {} functions, where each has {}",
                v.file.len(),
                v.function_vectors.len(),
                v.functions.len(),
                self.dim
            ));
        }
        self.files.insert(path, v);
        Ok(())
    }

    /// Stored functions.
    pub fn functions(&self) -> usize {
        self.files.values().map(|f| f.functions.len()).sum()
    }

    /// The `k` functions and the `k` files most similar to `query` (a unit vector of
    /// the store's dimension), by cosine similarity (the stored vectors are unit
    /// vectors), best first.
    pub fn search(&self, query: &[f32], k: usize) -> (Vec<FunctionHit>, Vec<FileHit>) {
        let files: Vec<(&String, &FileVectors)> = self.files.iter().collect();
        let dim = self.dim.max(1);
        let scored: Vec<(f32, (usize, usize))> = files
            .par_iter()
            .enumerate()
            .flat_map_iter(|(f, (_, v))| {
                v.function_vectors
                    .chunks_exact(dim)
                    .enumerate()
                    .map(move |(i, x)| (dot(query, x), (f, i)))
            })
            .collect();
        let functions = best(scored, k)
            .into_iter()
            .map(|(score, (f, i))| {
                let (path, v) = files[f];
                let s = &v.functions[i];
                FunctionHit {
                    file: path.clone(),
                    name: s.name.clone(),
                    line: s.line,
                    end_line: s.end_line,
                    score,
                }
            })
            .collect();
        let scored: Vec<(f32, usize)> = files
            .iter()
            .enumerate()
            .map(|(f, (_, v))| (dot(query, &v.file), f))
            .collect();
        let files = best(scored, k)
            .into_iter()
            .map(|(score, f)| FileHit {
                file: files[f].0.clone(),
                score,
            })
            .collect();
        (functions, files)
    }

    /// The store in `dir`, if there is one.
    pub fn load(dir: &Path) -> Result<Option<Vectors>, IndexError> {
        let path = dir.join(VECTORS);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("reading the vectors", &path)(e)),
        };
        let again = "make them again with `cxxlm index embed`";
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err(corrupt(&path, format!("not a store of vectors; {again}")));
        }
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
        let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
        if version != VECTORS_VERSION {
            return Err(corrupt(
                &path,
                format!("vectors of format version {version}, this cxxlm reads version {VECTORS_VERSION}; {again}"),
            ));
        }
        let (len, sum, body) = (word(12), word(20), &bytes[HEADER..]);
        if body.len() as u64 != len {
            return Err(corrupt(
                &path,
                format!("{} bytes where the header says {len}; {again}", body.len()),
            ));
        }
        if xxhash_rust::xxh3::xxh3_64(body) != sum {
            return Err(corrupt(
                &path,
                format!("its checksum does not match its contents; {again}"),
            ));
        }
        decode(body)
            .map(Some)
            .map_err(|e| corrupt(&path, format!("{e}; {again}")))
    }

    /// Writes the store to `dir` (which holds the index), under a temporary name first.
    pub fn save(&self, dir: &Path) -> Result<(), IndexError> {
        let body = self.encode();
        let mut bytes = Vec::with_capacity(HEADER + body.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&VECTORS_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        let path = dir.join(VECTORS);
        let tmp = dir.join(format!("{VECTORS}.tmp"));
        std::fs::write(&tmp, &bytes).map_err(io("writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("renaming into place", &path))
    }

    fn encode(&self) -> Vec<u8> {
        let mut w = Writer { buf: Vec::new() };
        w.str(&self.fingerprint);
        w.str(&self.model);
        w.varint(self.dim as u64);
        w.varint(self.files.len() as u64);
        for (path, v) in &self.files {
            w.str(path);
            w.u64(v.hash);
            w.varint(v.functions.len() as u64);
            for f in &v.functions {
                w.str(&f.name);
                w.varint(f.line as u64);
                w.varint(f.end_line as u64);
            }
            for x in v.file.iter().chain(&v.function_vectors) {
                w.buf.extend_from_slice(&x.to_le_bytes());
            }
        }
        w.buf
    }
}

fn floats(r: &mut Reader, n: usize) -> Result<Vec<f32>, String> {
    let bytes = n
        .checked_mul(4)
        .and_then(|len| r.buf.get(r.at..r.at + len))
        .ok_or_else(|| format!("vectors cut short at byte {}", r.at))?;
    r.at += bytes.len();
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn decode(body: &[u8]) -> Result<Vectors, String> {
    let mut r = Reader { buf: body, at: 0 };
    let fingerprint = r.str()?.to_string();
    let model = r.str()?.to_string();
    let dim = r.varint()? as usize;
    if dim == 0 || dim > 1 << 20 {
        return Err(format!("a dimension of {dim}"));
    }
    let mut v = Vectors::new(fingerprint, model, dim);
    for _ in 0..r.count()? {
        let path = r.str()?.to_string();
        let hash = r.u64()?;
        let n = r.count()?;
        let mut functions = Vec::with_capacity(n);
        for _ in 0..n {
            functions.push(StoredFunction {
                name: r.str()?.to_string(),
                line: r.u32()?,
                end_line: r.u32()?,
            });
        }
        let file = floats(&mut r, dim)?;
        let function_vectors = floats(&mut r, n * dim)?;
        v.files.insert(
            path,
            FileVectors {
                hash,
                file,
                functions,
                function_vectors,
            },
        );
    }
    if !r.done() {
        return Err(format!("{} bytes after the end", body.len() - r.at));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Settings;

    fn unit(x: &[f32]) -> Vec<f32> {
        let n = dot(x, x).sqrt();
        x.iter().map(|v| v / n).collect()
    }

    fn write(root: &Path, path: &str, text: &str) {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn index(root: &Path) -> Index {
        Index::build(root, None, &Settings::default(), None, |_, _| {}).unwrap()
    }

    #[test]
    fn texts_are_functions_with_their_comments_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let text = "#include <cmath>\n\n/// The length of the hypotenuse\n/// of a right triangle.\ndouble hyp(double a, double b) {\n    return std::sqrt(a * a + b * b);\n}\n\nint twice(int x) { return 2 * x; }\n";
        write(dir.path(), "a.cpp", text);
        let index = index(dir.path());
        let t = file_texts(&index, "a.cpp", 2).unwrap();
        assert_eq!(t.text, text);
        let names: Vec<_> = t.functions.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["hyp", "twice"]);
        assert_eq!(
            t.functions[0].text,
            "/// The length of the hypotenuse\n/// of a right triangle.\ndouble hyp(double a, double b) {\n    return std::sqrt(a * a + b * b);"
        );
        assert_eq!((t.functions[0].line, t.functions[0].end_line), (5, 7));
        assert_eq!(t.functions[1].text, "int twice(int x) { return 2 * x; }");
        write(dir.path(), "a.cpp", "int changed();\n");
        assert_eq!(
            file_texts(&index, "a.cpp", 2).unwrap_err(),
            "file_changed_since_indexed"
        );
    }

    fn file(hash: u64, file: &[f32], functions: &[(&str, &[f32])]) -> FileVectors {
        FileVectors {
            hash,
            file: unit(file),
            functions: functions
                .iter()
                .enumerate()
                .map(|(i, (name, _))| StoredFunction {
                    name: name.to_string(),
                    line: 1 + 10 * i as u32,
                    end_line: 5 + 10 * i as u32,
                })
                .collect(),
            function_vectors: functions.iter().flat_map(|(_, v)| unit(v)).collect(),
        }
    }

    #[test]
    fn search_ranks_by_cosine_and_the_store_round_trips() {
        let mut v = Vectors::new("model sha + settings".into(), "run/step-1".into(), 3);
        v.insert(
            "a.cpp".into(),
            file(
                1,
                &[1.0, 0.0, 0.0],
                &[("east", &[1.0, 0.1, 0.0]), ("north", &[0.0, 1.0, 0.0])],
            ),
        )
        .unwrap();
        v.insert(
            "b.cpp".into(),
            file(2, &[0.0, 1.0, 1.0], &[("up", &[0.0, 0.2, 1.0])]),
        )
        .unwrap();
        assert!(v.insert("c.cpp".into(), file(3, &[1.0, 0.0], &[])).is_err());
        let (functions, files) = v.search(&unit(&[0.1, 0.3, 1.0]), 2);
        let names: Vec<_> = functions.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["up", "north"]);
        assert_eq!(
            (functions[1].file.as_str(), functions[1].line),
            ("a.cpp", 11)
        );
        assert!(functions[0].score > functions[1].score && functions[0].score <= 1.0 + 1e-6);
        assert_eq!(files[0].file, "b.cpp");
        assert_eq!(files.len(), 2);
        let dir = tempfile::tempdir().unwrap();
        v.save(dir.path()).unwrap();
        assert_eq!(Vectors::load(dir.path()).unwrap().as_ref(), Some(&v));
        // A flipped byte is caught by the checksum.
        let path = dir.path().join(VECTORS);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let e = Vectors::load(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("checksum") && e.contains("cxxlm index embed"),
            "{e}"
        );
        assert_eq!(Vectors::load(&dir.path().join("none")).unwrap(), None);
        let empty = Vectors::new("f".into(), "m".into(), 768);
        empty.save(dir.path()).unwrap();
        assert_eq!(Vectors::load(dir.path()).unwrap(), Some(empty));
    }

    #[test]
    fn a_plan_embeds_new_and_changed_files_and_drops_gone_ones() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "same.cpp", "int same() { return 1; }\n");
        write(dir.path(), "changed.cpp", "int changed() { return 2; }\n");
        write(dir.path(), "new.cpp", "int fresh() { return 3; }\n");
        let index = index(dir.path());
        let hash = |p: &str| index.files()[p].hash;
        let mut v = Vectors::new(String::new(), String::new(), 2);
        v.insert("same.cpp".into(), file(hash("same.cpp"), &[1.0, 0.0], &[]))
            .unwrap();
        v.insert(
            "changed.cpp".into(),
            file(hash("changed.cpp") ^ 1, &[1.0, 0.0], &[]),
        )
        .unwrap();
        v.insert("gone.cpp".into(), file(7, &[1.0, 0.0], &[]))
            .unwrap();
        let plan = v.plan(&index);
        assert_eq!(plan.embed, ["changed.cpp", "new.cpp"]);
        assert_eq!(plan.current, 1);
        assert_eq!(plan.gone, ["gone.cpp"]);
    }

    #[test]
    fn dot_matches_the_plain_sum() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..19).map(|i| 1.0 - i as f32 * 0.25).collect();
        let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - plain).abs() < 1e-4);
    }
}
