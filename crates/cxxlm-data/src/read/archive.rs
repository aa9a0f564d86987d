use std::fs::File;
use std::io::{BufReader, Read};

use super::{
    decompress, looks_like_cxx, meta, name_of, size_skip, skip, Compression, Kind, ReadItem, Sink,
};
use crate::config::InputConfig;
use crate::document::RawDocument;

/// Archives inside archives are read too, down to this depth (Debian's gcc source package
/// is a tarball of the upstream tarballs); deeper ones are counted as skipped.
const MAX_NESTING: usize = 3;

/// The C/C++ members of a tar archive, streamed: members over the size limit are
/// skipped without being read, and a corrupt or truncated archive ends with a skip
/// that names how far reading got. Tar archives among the members are read in turn, their
/// members named `outer!/inner.tar.xz!/member`.
pub fn read(file: File, compression: Compression, name: &str, config: &InputConfig, sink: Sink) {
    let reader = BufReader::with_capacity(1 << 20, file);
    read_nested(reader, compression, name, name, config, sink, 1);
}

/// Reads the archive `id` of the input file `input`; false when the sink wants no more.
fn read_nested(
    reader: impl Read,
    compression: Compression,
    id: &str,
    input: &str,
    config: &InputConfig,
    sink: Sink,
    depth: usize,
) -> bool {
    // A damaged archive ends with its skip; the archive holding it goes on.
    let corrupt =
        |sink: Sink, detail: String, bytes: u64| sink(skip(id, "corrupt_archive", detail, bytes));
    let reader = match decompress(reader, compression) {
        Ok(r) => r,
        Err(e) => return corrupt(sink, e.to_string(), 0),
    };
    let mut archive = tar::Archive::new(reader);
    let entries = match archive.entries() {
        Ok(e) => e,
        Err(e) => return corrupt(sink, e.to_string(), 0),
    };
    for (seen, entry) in entries.enumerate() {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => return corrupt(sink, format!("after {seen} members: {e}"), 0),
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let member = name_of(&entry.path_bytes());
        let base = member.rsplit('/').next().unwrap_or(&member);
        if member.split('/').any(|c| c == ".git") {
            continue;
        }
        let member_id = format!("{id}!/{member}");
        let kind = match Kind::of(base) {
            Some(k @ (Kind::Source | Kind::MaybeSource)) => k,
            Some(Kind::Archive(inner)) if depth < MAX_NESTING => {
                if !read_nested(
                    &mut entry,
                    inner,
                    &member_id,
                    input,
                    config,
                    sink,
                    depth + 1,
                ) {
                    return false;
                }
                continue;
            }
            Some(Kind::Archive(_)) => {
                let detail = format!("an archive {MAX_NESTING} archives deep");
                if !sink(skip(member_id, "nested_too_deep", detail, entry.size())) {
                    return false;
                }
                continue;
            }
            _ => continue,
        };
        let size = entry.size();
        if let Some(item) = size_skip(&member_id, size, config) {
            if !sink(item) {
                return false;
            }
            continue;
        }
        let mut bytes = Vec::with_capacity(size as usize);
        if let Err(e) = (&mut entry)
            .take(config.max_bytes + 1)
            .read_to_end(&mut bytes)
        {
            return corrupt(sink, format!("member {member}: {e}"), size);
        }
        if kind == Kind::MaybeSource && !looks_like_cxx(&bytes) {
            if !sink(ReadItem::Ignored) {
                return false;
            }
            continue;
        }
        let m = meta(&[
            ("source", "archive".into()),
            ("archive", input.into()),
            ("path", member.into()),
        ]);
        if !sink(ReadItem::Doc(RawDocument {
            id: member_id,
            bytes,
            meta: m,
        })) {
            return false;
        }
    }
    true
}
