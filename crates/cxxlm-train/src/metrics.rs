//! Training metrics: `metrics.jsonl` (one JSON object per record) and TensorBoard event
//! files (which W&B can sync), written side by side.

use serde_json::{Map, Value};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};

use crate::{Result, TrainError};

/// Opens the JSON lines `path` for appending, keeping of what it holds only the records
/// whose number `key` passes `keep`: those before the point a run resumes from. The file
/// is streamed through a new one (a long log is not held in memory); a line a kill cut
/// short is not a record and goes too.
pub(crate) fn reopen_records(path: &Path, key: &str, keep: impl Fn(u64) -> bool) -> Result<File> {
    let io = |e| TrainError::io(path, e);
    match File::open(path) {
        Ok(old) => {
            let tmp = path.with_extension("jsonl.tmp");
            let mut out = BufWriter::new(File::create(&tmp).map_err(io)?);
            for line in BufReader::new(old).split(b'\n') {
                let line = line.map_err(io)?;
                let record = serde_json::from_slice::<Value>(&line).ok();
                if record.and_then(|v| v[key].as_u64()).is_some_and(&keep) {
                    out.write_all(&line)
                        .and_then(|_| out.write_all(b"\n"))
                        .map_err(io)?;
                }
            }
            out.into_inner().map_err(|e| io(e.into_error()))?;
            std::fs::rename(&tmp, path).map_err(io)?;
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)
}

pub struct Metrics {
    jsonl_path: PathBuf,
    jsonl: File,
    events_path: PathBuf,
    events: File,
}

impl Metrics {
    /// Opens `dir/metrics.jsonl`, dropping records after `resumed_step` (a resumed run
    /// rewrites them), and starts a new TensorBoard event file in `dir/tensorboard`.
    pub fn open(dir: &Path, resumed_step: Option<u64>) -> Result<Self> {
        let jsonl_path = dir.join("metrics.jsonl");
        let io = |p: &Path, e| TrainError::io(p, e);
        let jsonl = reopen_records(&jsonl_path, "step", |s| {
            resumed_step.is_some_and(|step| s <= step)
        })?;
        let tb = dir.join("tensorboard");
        std::fs::create_dir_all(&tb).map_err(|e| io(&tb, e))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let events_path = tb.join(format!(
            "events.out.tfevents.{}.{}.cxxlm",
            now.as_secs(),
            now.subsec_nanos()
        ));
        let events = File::create(&events_path).map_err(|e| io(&events_path, e))?;
        let mut m = Metrics {
            jsonl_path,
            jsonl,
            events_path,
            events,
        };
        let mut first = Vec::new();
        first.push(0x09);
        first.extend_from_slice(&wall_time().to_le_bytes());
        proto_bytes(&mut first, 3, b"brain.Event:2");
        m.record(&first)?;
        Ok(m)
    }

    /// Appends `{"step": step, ...fields}` to the JSON lines and every numeric field as a
    /// TensorBoard scalar.
    pub fn log(&mut self, step: u64, fields: &Map<String, Value>) -> Result<()> {
        let mut obj = Map::new();
        obj.insert("step".into(), step.into());
        obj.extend(fields.clone());
        let line = format!("{}\n", Value::Object(obj));
        self.jsonl
            .write_all(line.as_bytes())
            .and_then(|_| self.jsonl.flush())
            .map_err(|e| TrainError::io(&self.jsonl_path, e))?;
        let mut summary = Vec::new();
        for (tag, v) in fields {
            if let Some(x) = v.as_f64() {
                let mut value = Vec::new();
                proto_bytes(&mut value, 1, tag.as_bytes());
                value.push(0x15);
                value.extend_from_slice(&(x as f32).to_le_bytes());
                proto_bytes(&mut summary, 1, &value);
            }
        }
        let mut event = vec![0x09];
        event.extend_from_slice(&wall_time().to_le_bytes());
        event.push(0x10);
        varint(&mut event, step);
        proto_bytes(&mut event, 5, &summary);
        self.record(&event)
    }

    /// One TFRecord: length, its masked CRC-32C, data, the data's masked CRC-32C.
    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.events
            .write_all(&rec)
            .and_then(|_| self.events.flush())
            .map_err(|e| TrainError::io(&self.events_path, e))
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited protobuf field.
fn proto_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, (field << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn resumed_metrics_drop_later_steps() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Metrics::open(dir.path(), None).unwrap();
        for step in 1..=5 {
            let mut f = Map::new();
            f.insert("loss".into(), (step as f64).into());
            m.log(step, &f).unwrap();
        }
        drop(m);
        // A kill cut the last line short, within a character.
        let path = dir.path().join("metrics.jsonl");
        let mut torn = OpenOptions::new().append(true).open(&path).unwrap();
        torn.write_all(b"{\"step\": 6, \"note\": \"\xc3").unwrap();
        Metrics::open(dir.path(), Some(3)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, [1, 2, 3]);
        let events = std::fs::read_dir(dir.path().join("tensorboard"))
            .unwrap()
            .count();
        assert!(events >= 1);
    }
}
