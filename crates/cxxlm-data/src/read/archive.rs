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

/// No real member is this large (1 TiB): a header that declares more is damaged (a
/// negative size read as unsigned), and what follows it cannot be found.
const MAX_MEMBER_BYTES: u64 = 1 << 40;

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
        if entry.size() > MAX_MEMBER_BYTES {
            let detail = format!("member {member} declares {} bytes", entry.size());
            return corrupt(sink, detail, 0);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A member's name, its header's size field if not the contents' size, its contents.
    type Member<'a> = (&'a str, Option<[u8; 12]>, &'a [u8]);

    /// The items read from a tar archive of `members`.
    fn items_of(members: &[Member]) -> Vec<ReadItem> {
        let mut tar = Vec::new();
        for (name, size_field, data) in members {
            let mut header = tar::Header::new_gnu();
            header.set_path(name).unwrap();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            if let Some(field) = size_field {
                header.as_mut_bytes()[124..136].copy_from_slice(field);
            }
            header.set_cksum();
            tar.extend_from_slice(header.as_bytes());
            tar.extend_from_slice(data);
            tar.resize(tar.len().div_ceil(512) * 512, 0);
        }
        tar.resize(tar.len() + 1024, 0);
        let mut items = Vec::new();
        let config = InputConfig::default();
        let mut sink = |item| {
            items.push(item);
            true
        };
        read_nested(
            &tar[..],
            Compression::None,
            "t.tar",
            "t.tar",
            &config,
            &mut sink,
            1,
        );
        items
    }

    #[test]
    fn a_member_of_impossible_size_ends_its_archive_as_corrupt() {
        let source: &[u8] = b"int main() { return 0; }\n";
        // A size field in base-256 whose low eight bytes read as about 1.8e19, as in the
        // negative-size archive of Go's archive/tar tests (inside Debian's gcc source).
        let negative = Some([
            0xf4, 0x31, 0x30, 0x31, 0xf4, 0x30, 0x74, 0x13, 0x30, 0x30, 0x71, 0xd4,
        ]);
        let items = items_of(&[("a.cpp", None, source), ("b.cpp", negative, b"")]);
        assert!(matches!(&items[0], ReadItem::Doc(d) if d.id == "t.tar!/a.cpp"));
        match &items[1..] {
            [ReadItem::Skip { skipped, bytes: 0 }] => {
                assert_eq!(skipped.reason, "corrupt_archive");
                assert!(
                    skipped.detail.contains("member b.cpp declares"),
                    "{}",
                    skipped.detail
                );
            }
            other => panic!("{} items after the first", other.len()),
        }
    }
}
