//! JSON lines that a long run appends its results to as it goes, so that a stopped run
//! goes on where it was: [`Journal::open`] reads back every record (the last line, cut
//! short by the stop, is dropped and the file rewritten without it), and
//! [`Journal::append`] writes records and syncs them before it returns.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{DataError, Result};
use crate::shard::write_atomic;

pub struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    /// Opens `path` (made when it does not exist) and returns the records it holds. A line
    /// other than the last that is not a record is an error: the file is not one this
    /// type wrote.
    pub fn open<T: DeserializeOwned + Serialize>(path: &Path) -> Result<(Journal, Vec<T>)> {
        // Bytes, not text: a stop can cut a line within a character.
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(DataError::io(path, e)),
        };
        let lines: Vec<&[u8]> = text
            .split(|&b| b == b'\n')
            .filter(|l| !l.trim_ascii().is_empty())
            .collect();
        let mut records = Vec::with_capacity(lines.len());
        let mut cut = false;
        for (i, line) in lines.iter().enumerate() {
            match serde_json::from_slice::<T>(line) {
                Ok(record) => records.push(record),
                Err(_) if i + 1 == lines.len() => cut = true,
                Err(e) => {
                    return Err(DataError::Input {
                        input: path.display().to_string(),
                        message: format!("line {}: {e}; remove the file to start again", i + 1),
                    })
                }
            }
        }
        if cut || (!text.is_empty() && !text.ends_with(b"\n")) {
            let whole: Vec<u8> = lines[..records.len()]
                .iter()
                .flat_map(|l| l.iter().chain(b"\n"))
                .copied()
                .collect();
            write_atomic(path, &whole)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| DataError::io(path, e))?;
        let journal = Journal {
            path: path.to_path_buf(),
            file,
        };
        Ok((journal, records))
    }

    /// Appends `records`, a line each, and syncs them to disk.
    pub fn append<T: Serialize>(&mut self, records: &[T]) -> Result<()> {
        let mut lines = String::new();
        for record in records {
            lines += &serde_json::to_string(record).map_err(|e| DataError::Input {
                input: self.path.display().to_string(),
                message: e.to_string(),
            })?;
            lines.push('\n');
        }
        self.file
            .write_all(lines.as_bytes())
            .and_then(|_| self.file.sync_data())
            .map_err(|e| DataError::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Verdict {
        id: String,
        fails: bool,
    }

    fn verdict(id: &str) -> Verdict {
        Verdict {
            id: id.into(),
            fails: id.len().is_multiple_of(2),
        }
    }

    #[test]
    fn records_survive_a_reopen_and_a_line_cut_short_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("verdicts.jsonl");
        let (mut journal, none) = Journal::open::<Verdict>(&path).unwrap();
        assert!(none.is_empty());
        journal.append(&[verdict("a"), verdict("bb")]).unwrap();
        drop(journal);
        // A stop in the middle of the next write, the second time within a character.
        let written = std::fs::read(&path).unwrap();
        for torn in [&br#"{"id":"ccc","fa"#[..], b"{\"id\":\"\xc3"] {
            std::fs::write(&path, [&written[..], torn].concat()).unwrap();
            let (_, kept) = Journal::open::<Verdict>(&path).unwrap();
            assert_eq!(kept, vec![verdict("a"), verdict("bb")]);
        }
        let (mut journal, _) = Journal::open::<Verdict>(&path).unwrap();
        journal.append(&[verdict("ccc")]).unwrap();
        let (_, all) = Journal::open::<Verdict>(&path).unwrap();
        assert_eq!(all, vec![verdict("a"), verdict("bb"), verdict("ccc")]);
    }

    #[test]
    fn a_broken_line_before_the_last_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("verdicts.jsonl");
        std::fs::write(&path, "not json\n{\"id\":\"a\",\"fails\":true}\n").unwrap();
        let err = Journal::open::<Verdict>(&path).err().unwrap().to_string();
        assert!(err.contains("line 1"), "{err}");
    }
}
