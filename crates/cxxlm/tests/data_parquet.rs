//! Parquet shards as the-stack-dedup publishes them.

mod common;

use common::*;
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use std::path::Path;
use std::sync::Arc;

fn write_parquet(path: &Path, columns: &[(&str, Vec<String>)]) {
    let fields: String = columns
        .iter()
        .map(|(n, _)| format!("REQUIRED BYTE_ARRAY {n} (UTF8);"))
        .collect();
    let schema = Arc::new(parse_message_type(&format!("message schema {{ {fields} }}")).unwrap());
    let file = std::fs::File::create(path).unwrap();
    let mut writer =
        SerializedFileWriter::new(file, schema, Arc::new(WriterProperties::builder().build()))
            .unwrap();
    let mut group = writer.next_row_group().unwrap();
    let mut i = 0;
    while let Some(mut col) = group.next_column().unwrap() {
        let values: Vec<ByteArray> = columns[i]
            .1
            .iter()
            .map(|v| ByteArray::from(v.as_str()))
            .collect();
        col.typed::<ByteArrayType>()
            .write_batch(&values, None, None)
            .unwrap();
        col.close().unwrap();
        i += 1;
    }
    group.close().unwrap();
    writer.close().unwrap();
}

#[test]
fn text_and_id_columns_missing_columns_and_corrupt_files() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let texts: Vec<String> = (0..5).map(cpp_source).collect();
    let shas: Vec<String> = (0..5).map(|i| format!("sha{i}")).collect();
    write_parquet(
        &data.join("train-00000.parquet"),
        &[("content", texts.clone()), ("hexsha", shas)],
    );
    write_parquet(
        &data.join("train-00001.parquet"),
        &[("body", vec![cpp_source(9)])],
    );
    write(
        &data.join("train-00002.parquet"),
        b"PAR1 definitely not parquet",
    );
    let config = tmp.path().join("stack.toml");
    write(
        &config,
        "[input]\nparquet_text_column = \"content\"\nparquet_id_column = \"hexsha\"\n",
    );
    let out = tmp.path().join("out");
    run_ok(&[
        "data",
        "run",
        "--config",
        config.to_str().unwrap(),
        "-i",
        data.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--keep-indentation",
    ]);

    let docs = read_shards(&out);
    assert_eq!(ids(&docs), ["sha0", "sha1", "sha2", "sha3", "sha4"]);
    assert_eq!(docs[2]["text"], texts[2]);
    let s = stats(&out);
    assert_eq!(skipped(&s, "missing_column"), 1);
    assert_eq!(skipped(&s, "corrupt_parquet"), 1);
    let missing = s["read"]["skipped_inputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["reason"] == "missing_column")
        .unwrap();
    assert!(missing["input"]
        .as_str()
        .unwrap()
        .ends_with("train-00001.parquet"));
    assert!(
        missing["detail"].as_str().unwrap().contains("body"),
        "names the columns it has"
    );
}
