use std::fs::File;
use std::io::{BufReader, Read};

use super::{
    decompress, looks_like_cxx, meta, name_of, size_skip, skip, Compression, Kind, ReadItem, Sink,
};
use crate::config::InputConfig;
use crate::document::RawDocument;

/// The C/C++ members of a tar archive, streamed: members over the size limit are
/// skipped without being read, and a corrupt or truncated archive ends with a skip
/// that names how far reading got.
pub fn read(file: File, compression: Compression, name: &str, config: &InputConfig, sink: Sink) {
    let reader = match decompress(BufReader::with_capacity(1 << 20, file), compression) {
        Ok(r) => r,
        Err(e) => {
            sink(skip(name, "corrupt_archive", e.to_string(), 0));
            return;
        }
    };
    let mut archive = tar::Archive::new(reader);
    let entries = match archive.entries() {
        Ok(e) => e,
        Err(e) => {
            sink(skip(name, "corrupt_archive", e.to_string(), 0));
            return;
        }
    };
    for (seen, entry) in entries.enumerate() {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                sink(skip(
                    name,
                    "corrupt_archive",
                    format!("after {seen} members: {e}"),
                    0,
                ));
                return;
            }
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let member = name_of(&entry.path_bytes());
        let base = member.rsplit('/').next().unwrap_or(&member);
        let kind = match Kind::of(base) {
            Some(k @ (Kind::Source | Kind::MaybeSource)) => k,
            _ => continue,
        };
        if member.split('/').any(|c| c == ".git") {
            continue;
        }
        let id = format!("{name}!/{member}");
        let size = entry.size();
        if let Some(item) = size_skip(&id, size, config) {
            if !sink(item) {
                return;
            }
            continue;
        }
        let mut bytes = Vec::with_capacity(size as usize);
        if let Err(e) = (&mut entry)
            .take(config.max_bytes + 1)
            .read_to_end(&mut bytes)
        {
            sink(skip(
                name,
                "corrupt_archive",
                format!("member {member}: {e}"),
                size,
            ));
            return;
        }
        if kind == Kind::MaybeSource && !looks_like_cxx(&bytes) {
            if !sink(ReadItem::Ignored) {
                return;
            }
            continue;
        }
        let m = meta(&[
            ("source", "archive".into()),
            ("archive", name.into()),
            ("path", member.into()),
        ]);
        if !sink(ReadItem::Doc(RawDocument { id, bytes, meta: m })) {
            return;
        }
    }
}
