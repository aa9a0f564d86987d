//! Tokens for the trainer: [`pack`] turns shards into Megatron indexed datasets with
//! fill-in-the-middle ([`fim`]) and a manifest; [`loader`] reads them back as batches of
//! windows for each rank, with a small state that resumes a run exactly; [`sft`] reads
//! fine-tuning examples and packs them whole into rows; [`repo`] makes repository-level
//! examples.

pub mod fim;
pub mod indexed;
pub mod loader;
pub mod pack;
pub mod repo;
mod rng;
pub mod sft;

pub use fim::{FimConfig, Layout, Packer, Specials};
pub use indexed::{IndexedDataset, IndexedWriter, TokenType};
pub use loader::{Loader, LoaderConfig, LoaderState, Mode};
pub use pack::{pack, tokenizer_sha256, Manifest, PackConfig, SplitCounts, SPLITS};
pub use repo::RepoConfig;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("not a packed FIM document: {0}")]
    Fim(String),
    #[error("{manifest}: packed with tokenizer {expected}, but the tokenizer given is {found}; pack again with this tokenizer or pass the one it was packed with")]
    TokenizerMismatch {
        manifest: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{dir}: {message}")]
    Resume { dir: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Data(#[from] cxxlm_data::DataError),
}

impl PackError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PackError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = PackError> = std::result::Result<T, E>;
