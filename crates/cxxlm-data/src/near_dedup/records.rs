//! Intermediate files of the near-dedup stages: fixed-size little-endian records with a
//! header naming the kind, record size and count, and a trailing xxh3 checksum. A file
//! that is truncated, corrupt or of the wrong kind is an error naming it, never a
//! source of wrong pairs. Written under a temporary name and renamed.

use std::fs::File;
use std::io::{BufWriter, Write};
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

/// Reads a whole record file, verifying kind, size, count and checksum.
pub fn read_records(path: &Path, kind: &str, width: usize) -> Result<Vec<u64>> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if bytes.len() < HEADER + 8 || &bytes[..8] != MAGIC {
        return Err(corrupt(path, "not a cxxlm near-dedup file or truncated"));
    }
    let mut k = [b' '; 8];
    k[..kind.len().min(8)].copy_from_slice(&kind.as_bytes()[..kind.len().min(8)]);
    if bytes[8..16] != k {
        return Err(corrupt(
            path,
            format!(
                "holds {:?} records, expected {kind:?}",
                String::from_utf8_lossy(&bytes[8..16]).trim()
            ),
        ));
    }
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8]));
    let file_width = u32::from_le_bytes(bytes[16..20].try_into().unwrap_or([0; 4])) as usize;
    let count = word(24) as usize;
    if file_width != width {
        return Err(corrupt(
            path,
            format!("records of {file_width} words, expected {width}"),
        ));
    }
    let body = count
        .checked_mul(width * 8)
        .filter(|n| HEADER + n + 8 == bytes.len());
    let Some(body) = body else {
        return Err(corrupt(
            path,
            format!(
                "{} bytes do not hold the {count} records its header announces (truncated?)",
                bytes.len()
            ),
        ));
    };
    let data = &bytes[HEADER..HEADER + body];
    let stored = word(HEADER + body);
    if xxhash_rust::xxh3::xxh3_64(data) != stored {
        return Err(corrupt(path, "checksum mismatch (corrupt)"));
    }
    Ok(data
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
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
        let recs = read_records(&path, "bucket", 2).unwrap();
        assert_eq!(recs.len(), 200);
        assert_eq!(recs[14], 49);

        assert!(read_records(&path, "pairs", 2)
            .unwrap_err()
            .to_string()
            .contains("expected \"pairs\""));
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 20]).unwrap();
        let err = read_records(&path, "bucket", 2).unwrap_err().to_string();
        assert!(
            err.contains("band-000.bin") && err.contains("truncated"),
            "{err}"
        );
        let mut flipped = bytes.clone();
        flipped[HEADER + 5] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert!(read_records(&path, "bucket", 2)
            .unwrap_err()
            .to_string()
            .contains("checksum"));
    }
}
