//! Intermediate files of the near-dedup stages: fixed-size little-endian records with a
//! header naming the kind, record size and count, and a trailing xxh3 checksum. A file
//! that is truncated, corrupt or of the wrong kind is an error naming it, never a
//! source of wrong pairs. Written under a temporary name and renamed.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::shard::tmp_name;

const MAGIC: &[u8; 8] = b"CXXLMND1";
const HEADER: usize = 8 + 8 + 4 + 4 + 8;

fn corrupt(path: &Path, what: impl Into<String>) -> DataError {
    DataError::Resume {
        dir: path.to_path_buf(),
        message: format!(
            "{}; delete it (or its stage's output) and rerun the stage",
            what.into()
        ),
    }
}

/// Writes `u64` records of `width` words each.
pub struct RecordWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    kind: [u8; 8],
    width: usize,
    count: u64,
    hash: xxhash_rust::xxh3::Xxh3,
}

impl RecordWriter {
    pub fn create(path: &Path, kind: &str, width: usize) -> Result<Self> {
        let tmp = tmp_name(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        }
        let mut out = BufWriter::new(File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?);
        // The header is rewritten with the count when the file is finished.
        out.write_all(&[0u8; HEADER])
            .map_err(|e| DataError::io(&tmp, e))?;
        let mut k = [b' '; 8];
        k[..kind.len().min(8)].copy_from_slice(&kind.as_bytes()[..kind.len().min(8)]);
        Ok(RecordWriter {
            path: path.to_path_buf(),
            tmp,
            out,
            kind: k,
            width,
            count: 0,
            hash: xxhash_rust::xxh3::Xxh3::new(),
        })
    }

    pub fn push(&mut self, record: &[u64]) -> Result<()> {
        debug_assert_eq!(record.len(), self.width);
        for w in record {
            let b = w.to_le_bytes();
            self.hash.update(&b);
            self.out
                .write_all(&b)
                .map_err(|e| DataError::io(&self.tmp, e))?;
        }
        self.count += 1;
        Ok(())
    }

    pub fn finish(mut self) -> Result<u64> {
        let tmp = self.tmp.clone();
        let io = |e| DataError::io(&tmp, e);
        self.out
            .write_all(&self.hash.digest().to_le_bytes())
            .map_err(io)?;
        let mut file = self
            .out
            .into_inner()
            .map_err(|e| DataError::io(&tmp, e.into_error()))?;
        let mut header = Vec::with_capacity(HEADER);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&self.kind);
        header.extend_from_slice(&(self.width as u32).to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&self.count.to_le_bytes());
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
        file.write_all(&header).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(|e| DataError::io(&self.path, e))?;
        Ok(self.count)
    }
}

/// The record count a file's header announces (checked again when it is read).
pub fn record_count(path: &Path) -> Result<u64> {
    let mut header = [0u8; HEADER];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .map_err(|e| DataError::io(path, e))?;
    if &header[..8] != MAGIC {
        return Err(corrupt(path, "not a cxxlm near-dedup file"));
    }
    Ok(u64::from_le_bytes(
        header[24..32].try_into().unwrap_or([0; 8]),
    ))
}

/// Reads a record file of `W`-word records, streaming, verifying kind, width, size,
/// count and checksum; nothing read is returned unless all of it checks out.
pub fn read_records<const W: usize>(path: &Path, kind: &str) -> Result<Vec<[u64; W]>> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let len = file.metadata().map_err(|e| DataError::io(path, e))?.len() as usize;
    let mut r = std::io::BufReader::with_capacity(1 << 20, file);
    let mut header = [0u8; HEADER];
    if len < HEADER + 8 || r.read_exact(&mut header).is_err() || &header[..8] != MAGIC {
        return Err(corrupt(path, "not a cxxlm near-dedup file or truncated"));
    }
    let mut k = [b' '; 8];
    k[..kind.len().min(8)].copy_from_slice(&kind.as_bytes()[..kind.len().min(8)]);
    if header[8..16] != k {
        return Err(corrupt(
            path,
            format!(
                "holds {:?} records, expected {kind:?}",
                String::from_utf8_lossy(&header[8..16]).trim()
            ),
        ));
    }
    let width = u32::from_le_bytes(header[16..20].try_into().unwrap_or([0; 4])) as usize;
    let count = u64::from_le_bytes(header[24..32].try_into().unwrap_or([0; 8])) as usize;
    if width != W {
        return Err(corrupt(
            path,
            format!("records of {width} words, expected {W}"),
        ));
    }
    if count.checked_mul(W * 8).map(|n| HEADER + n + 8) != Some(len) {
        return Err(corrupt(
            path,
            format!(
                "{len} bytes do not hold the {count} records its header announces (truncated?)"
            ),
        ));
    }
    let mut hash = xxhash_rust::xxh3::Xxh3::new();
    let mut records = Vec::with_capacity(count);
    let mut buf = vec![0u8; W * 8];
    for _ in 0..count {
        r.read_exact(&mut buf).map_err(|e| DataError::io(path, e))?;
        hash.update(&buf);
        let mut rec = [0u64; W];
        for (w, c) in rec.iter_mut().zip(buf.chunks_exact(8)) {
            *w = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
        }
        records.push(rec);
    }
    let mut stored = [0u8; 8];
    r.read_exact(&mut stored)
        .map_err(|e| DataError::io(path, e))?;
    if hash.digest() != u64::from_le_bytes(stored) {
        return Err(corrupt(path, "checksum mismatch (corrupt)"));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_corruption_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("band-000.bin");
        let mut w = RecordWriter::create(&path, "bucket", 2).unwrap();
        for i in 0..100u64 {
            w.push(&[i * 7, i]).unwrap();
        }
        assert_eq!(w.finish().unwrap(), 100);
        let recs = read_records::<2>(&path, "bucket").unwrap();
        assert_eq!(recs.len(), 100);
        assert_eq!(record_count(&path).unwrap(), 100);
        assert_eq!(recs[7], [49, 7]);
        assert!(read_records::<3>(&path, "bucket")
            .unwrap_err()
            .to_string()
            .contains("expected 3"));
        assert!(read_records::<2>(&path, "pairs")
            .unwrap_err()
            .to_string()
            .contains("expected \"pairs\""));
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 20]).unwrap();
        let err = read_records::<2>(&path, "bucket").unwrap_err().to_string();
        assert!(
            err.contains("band-000.bin") && err.contains("truncated"),
            "{err}"
        );
        let mut flipped = bytes.clone();
        flipped[HEADER + 5] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert!(read_records::<2>(&path, "bucket")
            .unwrap_err()
            .to_string()
            .contains("checksum"));
    }
}
