//! Megatron's indexed dataset (`MMIDIDX`): a `.bin` of raw little-endian tokens and an
//! `.idx` with a header, the length and byte offset of every sequence and the document
//! index. Megatron-LM, NeMo and GPT-NeoX read these files; we write one sequence per
//! document.

use memmap2::Mmap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::{PackError, Result};
use cxxlm_data::shard::tmp_name as tmp;

const MAGIC: &[u8; 9] = b"MMIDIDX\x00\x00";
const HEADER_LEN: usize = 9 + 8 + 1 + 8 + 8;

/// The token types we write: Megatron's codes 8 (`uint16`) and 4 (`int32`; it has no
/// `uint32`, and every vocabulary that does not fit 16 bits fits 31).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenType {
    Uint16,
    Int32,
}

impl TokenType {
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            TokenType::Uint16
        } else {
            TokenType::Int32
        }
    }

    pub fn size(self) -> usize {
        match self {
            TokenType::Uint16 => 2,
            TokenType::Int32 => 4,
        }
    }

    /// The token id of `bytes`, one token of this type, little-endian.
    fn read(self, bytes: &[u8]) -> u32 {
        match self {
            TokenType::Uint16 => u16::from_le_bytes([bytes[0], bytes[1]]) as u32,
            TokenType::Int32 => u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        }
    }

    fn code(self) -> u8 {
        match self {
            TokenType::Uint16 => 8,
            TokenType::Int32 => 4,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            8 => Some(TokenType::Uint16),
            4 => Some(TokenType::Int32),
            _ => None,
        }
    }

    /// The largest token id this type holds.
    pub fn max_id(self) -> u32 {
        match self {
            TokenType::Uint16 => u16::MAX as u32,
            TokenType::Int32 => i32::MAX as u32,
        }
    }
}

/// `<prefix>.bin` and `<prefix>.idx`; a path ending in either names the pair.
pub fn paths(prefix: &Path) -> (PathBuf, PathBuf) {
    let s = prefix.to_string_lossy();
    let stem = s
        .strip_suffix(".bin")
        .or_else(|| s.strip_suffix(".idx"))
        .unwrap_or(&s);
    (
        PathBuf::from(format!("{stem}.bin")),
        PathBuf::from(format!("{stem}.idx")),
    )
}

/// Writes documents to `<prefix>.tmp` files and renames them into place on
/// [`IndexedWriter::finish`], so a killed writer leaves no file that looks complete.
pub struct IndexedWriter {
    bin_path: PathBuf,
    idx_path: PathBuf,
    bin: BufWriter<File>,
    token_type: TokenType,
    lengths: Vec<u32>,
    buf: Vec<u8>,
}

impl IndexedWriter {
    pub fn create(prefix: &Path, token_type: TokenType) -> Result<Self> {
        let (bin_path, idx_path) = paths(prefix);
        let file = File::create(tmp(&bin_path)).map_err(|e| PackError::io(tmp(&bin_path), e))?;
        Ok(IndexedWriter {
            bin_path,
            idx_path,
            bin: BufWriter::with_capacity(1 << 20, file),
            token_type,
            lengths: Vec::new(),
            buf: Vec::new(),
        })
    }

    pub fn push(&mut self, tokens: &[u32]) -> Result<()> {
        let len = u32::try_from(tokens.len())
            .ok()
            .filter(|&l| l <= i32::MAX as u32)
            .ok_or_else(|| self.format(format!("a document of {} tokens", tokens.len())))?;
        if let Some(&bad) = tokens.iter().find(|&&t| t > self.token_type.max_id()) {
            return Err(self.format(format!("token {bad} does not fit {:?}", self.token_type)));
        }
        self.buf.clear();
        match self.token_type {
            TokenType::Uint16 => {
                for &t in tokens {
                    self.buf.extend_from_slice(&(t as u16).to_le_bytes());
                }
            }
            TokenType::Int32 => {
                for &t in tokens {
                    self.buf.extend_from_slice(&t.to_le_bytes());
                }
            }
        }
        self.bin
            .write_all(&self.buf)
            .map_err(|e| PackError::io(tmp(&self.bin_path), e))?;
        self.lengths.push(len);
        Ok(())
    }

    /// Appends every document of another file of the same token type, copying bytes.
    pub fn append(&mut self, other: &IndexedDataset) -> Result<()> {
        if other.token_type != self.token_type {
            return Err(self.format(format!(
                "cannot append {} ({:?} tokens)",
                other.bin_path.display(),
                other.token_type
            )));
        }
        self.bin
            .write_all(other.bytes())
            .map_err(|e| PackError::io(tmp(&self.bin_path), e))?;
        self.lengths.extend_from_slice(&other.lengths);
        Ok(())
    }

    pub fn finish(self) -> Result<()> {
        let bin_tmp = tmp(&self.bin_path);
        let file = self
            .bin
            .into_inner()
            .map_err(|e| PackError::io(&bin_tmp, e.into_error()))?;
        file.sync_all().map_err(|e| PackError::io(&bin_tmp, e))?;
        let n = self.lengths.len();
        let mut idx = Vec::with_capacity(HEADER_LEN + n * 20 + 8);
        idx.extend_from_slice(MAGIC);
        idx.extend_from_slice(&1u64.to_le_bytes());
        idx.push(self.token_type.code());
        idx.extend_from_slice(&(n as u64).to_le_bytes());
        idx.extend_from_slice(&(n as u64 + 1).to_le_bytes());
        for &l in &self.lengths {
            idx.extend_from_slice(&(l as i32).to_le_bytes());
        }
        let mut pointer = 0u64;
        for &l in &self.lengths {
            idx.extend_from_slice(&pointer.to_le_bytes());
            pointer += l as u64 * self.token_type.size() as u64;
        }
        for d in 0..=n as u64 {
            idx.extend_from_slice(&d.to_le_bytes());
        }
        let idx_tmp = tmp(&self.idx_path);
        std::fs::write(&idx_tmp, &idx).map_err(|e| PackError::io(&idx_tmp, e))?;
        std::fs::rename(&bin_tmp, &self.bin_path).map_err(|e| PackError::io(&self.bin_path, e))?;
        std::fs::rename(&idx_tmp, &self.idx_path).map_err(|e| PackError::io(&self.idx_path, e))
    }

    fn format(&self, message: String) -> PackError {
        PackError::Format {
            path: self.bin_path.clone(),
            message,
        }
    }
}

/// A memory-mapped indexed dataset, checked on opening: header, version, token type,
/// contiguous offsets and a `.bin` exactly as long as its `.idx` says.
pub struct IndexedDataset {
    bin_path: PathBuf,
    token_type: TokenType,
    lengths: Vec<u32>,
    /// Token offset of every document, and the total at the end.
    starts: Vec<u64>,
    bin: Option<Mmap>,
}

impl IndexedDataset {
    pub fn open(prefix: &Path) -> Result<Self> {
        let (bin_path, idx_path) = paths(prefix);
        let bad = |message: String| PackError::Format {
            path: idx_path.clone(),
            message,
        };
        let mut idx = Vec::new();
        File::open(&idx_path)
            .and_then(|mut f| f.read_to_end(&mut idx))
            .map_err(|e| PackError::io(&idx_path, e))?;
        if idx.len() < HEADER_LEN || &idx[..9] != MAGIC {
            return Err(bad("not a Megatron MMIDIDX index (bad header)".into()));
        }
        let u64_at = |at: usize| u64::from_le_bytes(idx[at..at + 8].try_into().expect("8 bytes"));
        if u64_at(9) != 1 {
            return Err(bad(format!("index version {} (expected 1)", u64_at(9))));
        }
        let token_type = TokenType::from_code(idx[17]).ok_or_else(|| {
            bad(format!(
                "token type code {} (cxxlm reads uint16 (8) and int32 (4))",
                idx[17]
            ))
        })?;
        let n = u64_at(18) as usize;
        let docs = u64_at(26) as usize;
        let need = HEADER_LEN as u128 + n as u128 * 12 + docs as u128 * 8;
        if (idx.len() as u128) < need {
            return Err(bad(format!(
                "truncated: {} bytes for {n} sequences and {docs} document entries (needs {need})",
                idx.len()
            )));
        }
        let mut lengths = Vec::with_capacity(n);
        let mut starts = Vec::with_capacity(n + 1);
        let mut total = 0u64;
        let pointers = HEADER_LEN + n * 4;
        for i in 0..n {
            let at = HEADER_LEN + i * 4;
            let len = i32::from_le_bytes(idx[at..at + 4].try_into().expect("4 bytes"));
            let len = u32::try_from(len)
                .map_err(|_| bad(format!("sequence {i} has negative length {len}")))?;
            if u64_at(pointers + i * 8) != total * token_type.size() as u64 {
                return Err(bad(format!(
                    "sequence {i} does not follow the previous one in the .bin"
                )));
            }
            lengths.push(len);
            starts.push(total);
            total += len as u64;
        }
        starts.push(total);
        let doc_index = pointers + n * 8;
        if docs == 0 || u64_at(doc_index) != 0 || u64_at(doc_index + (docs - 1) * 8) != n as u64 {
            return Err(bad("document index does not span the sequences".into()));
        }
        let file = File::open(&bin_path).map_err(|e| PackError::io(&bin_path, e))?;
        let size = file
            .metadata()
            .map_err(|e| PackError::io(&bin_path, e))?
            .len();
        let expected = total * token_type.size() as u64;
        if size != expected {
            return Err(PackError::Format {
                path: bin_path,
                message: format!(
                    "holds {size} bytes but {} describes {expected} ({total} tokens): truncated or from another pack",
                    idx_path.display()
                ),
            });
        }
        // SAFETY: the file is opened read-only; packs are written once and renamed into
        // place, never modified afterwards.
        let bin = if size == 0 {
            None
        } else {
            Some(unsafe { Mmap::map(&file) }.map_err(|e| PackError::io(&bin_path, e))?)
        };
        Ok(IndexedDataset {
            bin_path,
            token_type,
            lengths,
            starts,
            bin,
        })
    }

    pub fn path(&self) -> &Path {
        &self.bin_path
    }

    pub fn token_type(&self) -> TokenType {
        self.token_type
    }

    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    pub fn total_tokens(&self) -> u64 {
        *self.starts.last().expect("starts ends with the total")
    }

    pub fn doc_len(&self, doc: usize) -> usize {
        self.lengths[doc] as usize
    }

    /// The tokens of one document.
    pub fn doc(&self, doc: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.doc_len(doc));
        self.extend(self.starts[doc], self.doc_len(doc), &mut out);
        out
    }

    /// Appends `count` tokens starting at global token offset `start` to `out`.
    pub fn extend(&self, start: u64, count: usize, out: &mut Vec<u32>) {
        let size = self.token_type.size();
        let from = start as usize * size;
        let bytes = &self.bytes()[from..from + count * size];
        out.extend(bytes.chunks_exact(size).map(|c| self.token_type.read(c)));
    }

    /// Refuses tokens outside a vocabulary of `vocab` ids (a damaged file, or tokens of
    /// another tokenizer), naming the first one's document.
    pub fn check_vocab(&self, vocab: usize) -> Result<()> {
        let ids = self
            .bytes()
            .chunks_exact(self.token_type.size())
            .map(|c| self.token_type.read(c));
        let Some((at, id)) = ids.enumerate().find(|&(_, id)| id as usize >= vocab) else {
            return Ok(());
        };
        let doc = self.starts.partition_point(|&s| s <= at as u64) - 1;
        Err(PackError::Format {
            path: self.bin_path.clone(),
            message: format!(
                "token {at} (in document {doc}) is id {id}, outside the vocabulary of {vocab}: a damaged file, or tokens of another tokenizer"
            ),
        })
    }

    /// The global token offset of a document's first token.
    pub fn doc_start(&self, doc: usize) -> u64 {
        self.starts[doc]
    }

    /// Appends to `out` the lengths of the pieces that document starts cut the `count`
    /// tokens from global offset `start` into.
    pub fn document_pieces(&self, start: u64, count: usize, out: &mut Vec<usize>) {
        let end = start + count as u64;
        let first = self.starts.partition_point(|&s| s <= start);
        let mut from = start;
        for &s in self.starts[first..].iter().take_while(|&&s| s < end) {
            out.push((s - from) as usize);
            from = s;
        }
        out.push((end - from) as usize);
    }

    fn bytes(&self) -> &[u8] {
        self.bin.as_deref().unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, docs: &[Vec<u32>], t: TokenType) -> PathBuf {
        let prefix = dir.join("d");
        let mut w = IndexedWriter::create(&prefix, t).unwrap();
        for d in docs {
            w.push(d).unwrap();
        }
        w.finish().unwrap();
        prefix
    }

    #[test]
    fn round_trip_both_token_types() {
        let dir = tempfile::tempdir().unwrap();
        let docs = vec![vec![1, 2, 3], vec![], vec![65535, 0]];
        for t in [TokenType::Uint16, TokenType::Int32] {
            let ds = IndexedDataset::open(&write(dir.path(), &docs, t)).unwrap();
            assert_eq!(ds.len(), 3);
            assert_eq!(ds.total_tokens(), 5);
            for (i, d) in docs.iter().enumerate() {
                assert_eq!(&ds.doc(i), d);
            }
            let mut span = Vec::new();
            ds.extend(2, 3, &mut span);
            assert_eq!(span, vec![3, 65535, 0]);
        }
    }

    #[test]
    fn tokens_outside_the_vocabulary_are_named() {
        let dir = tempfile::tempdir().unwrap();
        for t in [TokenType::Uint16, TokenType::Int32] {
            let ds = IndexedDataset::open(&write(
                dir.path(),
                &[vec![1, 2, 3], vec![4, 9000, 5], vec![9001]],
                t,
            ))
            .unwrap();
            ds.check_vocab(9002).unwrap();
            let e = ds.check_vocab(512).unwrap_err().to_string();
            assert!(
                e.contains("token 4 (in document 1) is id 9000, outside the vocabulary of 512"),
                "{e}"
            );
        }
    }

    #[test]
    fn refuses_truncated_and_mismatched_files() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = write(dir.path(), &[vec![7; 100], vec![8; 10]], TokenType::Uint16);
        let (bin, idx) = paths(&prefix);
        let full = std::fs::read(&bin).unwrap();
        std::fs::write(&bin, &full[..full.len() - 2]).unwrap();
        let e = IndexedDataset::open(&prefix).err().unwrap().to_string();
        assert!(e.contains("d.bin") && e.contains("truncated"), "{e}");
        std::fs::write(&bin, &full).unwrap();
        let index = std::fs::read(&idx).unwrap();
        std::fs::write(&idx, &index[..40]).unwrap();
        let e = IndexedDataset::open(&prefix).err().unwrap().to_string();
        assert!(e.contains("d.idx") && e.contains("truncated"), "{e}");
        std::fs::write(&idx, b"not an index at all, no").unwrap();
        let e = IndexedDataset::open(&prefix).err().unwrap().to_string();
        assert!(e.contains("bad header"), "{e}");
    }

    #[test]
    fn refuses_ids_the_type_cannot_hold() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = IndexedWriter::create(&dir.path().join("x"), TokenType::Uint16).unwrap();
        assert!(w.push(&[70_000]).is_err());
        assert_eq!(TokenType::for_vocab(32_768), TokenType::Uint16);
        assert_eq!(TokenType::for_vocab(100_277), TokenType::Int32);
    }
}
