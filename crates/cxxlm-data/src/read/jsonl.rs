use serde_json::{Map, Value};
use std::fs::File;
use std::io::{BufRead, BufReader};

use super::{decompress, size_skip, skip, Compression, ReadItem, Sink};
use crate::config::InputConfig;
use crate::document::RawDocument;

/// JSON lines records `{"id"?, <text field>, "meta"?}`; our own shards read back as
/// they were written. A malformed line is a named skip; a truncated or corrupt
/// compressed stream ends the file with one.
pub fn read(
    file: File,
    compression: Compression,
    name: &str,
    config: &InputConfig,
    base: Map<String, Value>,
    sink: Sink,
) {
    let reader = match decompress(file, compression) {
        Ok(r) => r,
        Err(e) => {
            sink(skip(name, "corrupt_compressed", e.to_string(), 0));
            return;
        }
    };
    let mut reader = BufReader::with_capacity(1 << 20, reader);
    // JSON escapes can make a record several times longer than its text.
    let line_limit = (config.max_bytes as usize).saturating_mul(8).max(16 << 20);
    let mut line = Vec::new();
    let mut lineno = 0u64;
    loop {
        line.clear();
        let len = match read_line_bounded(&mut reader, &mut line, line_limit) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) => {
                sink(skip(
                    name,
                    "corrupt_compressed",
                    format!("after line {lineno}: {e}"),
                    0,
                ));
                return;
            }
        };
        lineno += 1;
        let at = format!("{name}:{lineno}");
        let item = if len > line_limit {
            skip(&at, "too_large", format!("line of {len} bytes"), len as u64)
        } else if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        } else {
            record(&line, &at, config, &base)
        };
        if !sink(item) {
            return;
        }
    }
}

fn record(line: &[u8], at: &str, config: &InputConfig, base: &Map<String, Value>) -> ReadItem {
    let mut obj: Map<String, Value> = match serde_json::from_slice(line) {
        Ok(o) => o,
        Err(e) => return skip(at, "malformed_json", e.to_string(), line.len() as u64),
    };
    let text = match obj.remove(&config.jsonl_text_field) {
        Some(Value::String(s)) => s,
        _ => {
            return skip(
                at,
                "missing_text_field",
                format!("no string field {:?}", config.jsonl_text_field),
                line.len() as u64,
            )
        }
    };
    if let Some(item) = size_skip(at, text.len() as u64, config) {
        return item;
    }
    let id = match obj.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => at.to_string(),
    };
    let mut meta = match obj.remove("meta") {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    for (k, v) in base {
        meta.entry(k.clone()).or_insert_with(|| v.clone());
    }
    meta.entry("path").or_insert_with(|| id.clone().into());
    ReadItem::Doc(RawDocument {
        id,
        bytes: text.into_bytes(),
        meta,
    })
}

/// Reads one line into `buf`, keeping at most `limit + 1` bytes of it; returns the
/// line's full length (newline included), 0 at the end of input.
fn read_line_bounded(
    reader: &mut impl BufRead,
    buf: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<usize> {
    let mut total = 0;
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            return Ok(total);
        }
        let (take, done) = match memchr::memchr(b'\n', chunk) {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let room = (limit + 1).saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..take.min(room)]);
        reader.consume(take);
        total += take;
        if done {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_lines() {
        let mut r = std::io::Cursor::new(b"abcdef\nxy\nlast".to_vec());
        let mut buf = Vec::new();
        assert_eq!(read_line_bounded(&mut r, &mut buf, 3).unwrap(), 7);
        assert_eq!(buf, b"abcd");
        buf.clear();
        assert_eq!(read_line_bounded(&mut r, &mut buf, 3).unwrap(), 3);
        assert_eq!(buf, b"xy\n");
        buf.clear();
        assert_eq!(read_line_bounded(&mut r, &mut buf, 3).unwrap(), 4);
        buf.clear();
        assert_eq!(read_line_bounded(&mut r, &mut buf, 3).unwrap(), 0);
    }
}
