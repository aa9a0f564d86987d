use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::Type;
use serde_json::{Map, Value};
use std::fs::File;
use std::sync::Arc;

use super::{size_skip, skip, ReadItem, Sink};
use crate::config::InputConfig;
use crate::document::RawDocument;

/// Rows of a Parquet file (the-stack-dedup, the Nemotron code sets), reading only the
/// text column and the optional id column, one row group at a time.
pub fn read(file: File, name: &str, config: &InputConfig, base: Map<String, Value>, sink: Sink) {
    let reader = match SerializedFileReader::new(file) {
        Ok(r) => r,
        Err(e) => {
            sink(skip(name, "corrupt_parquet", e.to_string(), 0));
            return;
        }
    };
    let root = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema()
        .clone();
    let wanted: Vec<&str> = std::iter::once(config.parquet_text_column.as_str())
        .chain(config.parquet_id_column.as_deref())
        .collect();
    let fields: Vec<Arc<Type>> = root
        .get_fields()
        .iter()
        .filter(|f| wanted.contains(&f.name()))
        .cloned()
        .collect();
    if !fields
        .iter()
        .any(|f| f.name() == config.parquet_text_column)
    {
        let have: Vec<&str> = root.get_fields().iter().map(|f| f.name()).collect();
        let detail = format!(
            "no column {:?} (columns: {}); set input.parquet_text_column",
            config.parquet_text_column,
            have.join(", ")
        );
        sink(skip(name, "missing_column", detail, 0));
        return;
    }
    let projection = match Type::group_type_builder(root.name())
        .with_fields(fields)
        .build()
    {
        Ok(p) => p,
        Err(e) => {
            sink(skip(name, "corrupt_parquet", e.to_string(), 0));
            return;
        }
    };
    let rows = match reader.get_row_iter(Some(projection)) {
        Ok(r) => r,
        Err(e) => {
            sink(skip(name, "corrupt_parquet", e.to_string(), 0));
            return;
        }
    };
    for (i, row) in rows.enumerate() {
        let at = format!("{name}:{i}");
        let row = match row {
            Ok(r) => r,
            Err(e) => {
                sink(skip(&at, "corrupt_parquet", e.to_string(), 0));
                return;
            }
        };
        let mut text: Option<Vec<u8>> = None;
        let mut id = at.clone();
        for (col, field) in row.get_column_iter() {
            let value = match field {
                Field::Str(s) => Some(s.as_bytes().to_vec()),
                Field::Bytes(b) => Some(b.data().to_vec()),
                Field::Long(n) => Some(n.to_string().into_bytes()),
                Field::Int(n) => Some(n.to_string().into_bytes()),
                _ => None,
            };
            if *col == config.parquet_text_column {
                text = value;
            } else if let Some(v) = value {
                id = String::from_utf8_lossy(&v).into_owned();
            }
        }
        let item = match text {
            None => skip(&at, "missing_text_field", "null or non-text value", 0),
            Some(bytes) => match size_skip(&at, bytes.len() as u64, config) {
                Some(item) => item,
                None => {
                    let mut meta = base.clone();
                    meta.insert("file".into(), name.into());
                    meta.insert("row".into(), i.into());
                    meta.insert("path".into(), id.clone().into());
                    ReadItem::Doc(RawDocument { id, bytes, meta })
                }
            },
        };
        if !sink(item) {
            return;
        }
    }
}
