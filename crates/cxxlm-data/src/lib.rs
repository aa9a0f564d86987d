//! Real C++ sources in, clean jsonl.zst shards out.
//!
//! [`read`] turns inputs (directories, archives, git checkouts, JSON lines, Parquet,
//! the Hugging Face Hub) into a deterministic list of units and streams each unit's
//! documents; [`steps`] holds the cleaning steps (normalize, quality, license, PII,
//! secrets) and exact dedup; [`pipeline`] drives them over one task's share of the units,
//! writes shards with [`shard`], checkpoints and resumes; [`near_dedup`] removes
//! near-duplicates from the shards and [`sample`] draws a fixed sample of them.

pub mod config;
pub mod document;
pub mod error;
pub mod journal;
pub mod near_dedup;
pub mod pipeline;
pub mod read;
pub mod sample;
pub mod shard;
pub mod stats;
pub mod steps;

pub use config::PipelineConfig;
pub use document::Document;
pub use error::DataError;
