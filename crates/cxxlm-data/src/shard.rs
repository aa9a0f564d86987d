//! jsonl.zst shards written under a temporary name and renamed when complete, so a
//! reader (or a killed run) never sees half a shard.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::document::Document;
use crate::error::{DataError, Result};

/// JSON is serialized straight into the compressor through a small buffer: never a
/// whole line at once, which for a document of hundreds of MB would double its memory.
type Compressor = Counted<BufWriter<zstd::stream::write::Encoder<'static, BufWriter<File>>>>;

/// Counts the bytes written through it.
struct Counted<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Compressor,
    pub docs: u64,
    /// Bytes of JSON lines written (before compression).
    pub bytes: u64,
}

impl ShardWriter {
    pub fn create(path: PathBuf, level: i32) -> Result<Self> {
        let tmp = tmp_name(&path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        }
        let file = File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
        let encoder =
            zstd::stream::write::Encoder::new(BufWriter::with_capacity(1 << 20, file), level)
                .map_err(|e| DataError::io(&tmp, e))?;
        Ok(ShardWriter {
            path,
            tmp,
            out: Counted {
                inner: BufWriter::with_capacity(1 << 18, encoder),
                bytes: 0,
            },
            docs: 0,
            bytes: 0,
        })
    }

    pub fn write(&mut self, doc: &Document) -> Result<()> {
        serde_json::to_writer(&mut self.out, doc)
            .map_err(std::io::Error::from)
            .and_then(|_| self.out.write_all(b"\n"))
            .map_err(|e| DataError::io(&self.tmp, e))?;
        self.docs += 1;
        self.bytes = self.out.bytes;
        Ok(())
    }

    /// Write one JSON line that is already serialized (without its newline).
    pub fn write_line(&mut self, line: &str) -> Result<()> {
        self.out
            .write_all(line.as_bytes())
            .and_then(|_| self.out.write_all(b"\n"))
            .map_err(|e| DataError::io(&self.tmp, e))?;
        self.docs += 1;
        self.bytes = self.out.bytes;
        Ok(())
    }

    /// Flush, sync and rename into place; returns the final path.
    pub fn finish(self) -> Result<PathBuf> {
        let tmp = self.tmp;
        let file = self
            .out
            .inner
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|encoder| encoder.finish())
            .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
            .map_err(|e| DataError::io(&tmp, e))?;
        file.sync_all().map_err(|e| DataError::io(&tmp, e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| DataError::io(&self.path, e))?;
        Ok(self.path)
    }
}

pub fn tmp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Write `bytes` to `path` atomically (temporary file, sync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_name(path);
    let mut f = File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| DataError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| DataError::io(path, e))
}

/// The lines of a shard, each with its index, streamed.
pub fn shard_lines(path: &Path) -> Result<impl Iterator<Item = Result<(usize, String)>> + '_> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let reader = std::io::BufReader::with_capacity(
        1 << 20,
        zstd::Decoder::new(file).map_err(|e| DataError::io(path, e))?,
    );
    Ok(std::io::BufRead::lines(reader)
        .enumerate()
        .map(move |(i, l)| l.map(|l| (i, l)).map_err(|e| DataError::io(path, e))))
}

/// The document of line `index` of the shard at `path`.
pub fn parse(path: &Path, index: usize, line: &str) -> Result<Document> {
    serde_json::from_str(line).map_err(|e| DataError::Input {
        input: format!("{}:{}", path.display(), index + 1),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    #[test]
    fn shard_reads_back_and_appears_only_when_finished() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("part-00000.jsonl.zst");
        let mut w = ShardWriter::create(path.clone(), 3).unwrap();
        let doc = Document {
            id: "a".into(),
            text: "int x;\n".into(),
            meta: Default::default(),
        };
        w.write(&doc).unwrap();
        assert!(!path.exists());
        assert_eq!(w.finish().unwrap(), path);
        let reader =
            std::io::BufReader::new(zstd::Decoder::new(File::open(&path).unwrap()).unwrap());
        let lines: Vec<Document> = reader
            .lines()
            .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
            .collect();
        assert_eq!(lines, vec![doc]);
    }
}
