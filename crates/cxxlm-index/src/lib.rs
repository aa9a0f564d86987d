//! A C++ repository index: what each file defines, uses and includes (tree-sitter-cpp),
//! the include graph (compile_commands.json's include directories when present), and a
//! ranking of the definitions that matter at a cursor (personalized PageRank over
//! references, as aider's repository map). Stored on disk with a format version and
//! checksums, and refreshed one saved file at a time. Retrieval pairs mined from it
//! (doc comments, call sites, declarations, each with the definition it names) judge
//! code search: BM25 here, a model's embeddings where a model runs. Those embeddings of
//! functions and files are stored beside the index, refreshed per changed file and
//! searched here. Bad input (invalid UTF-8, binary or huge files, unreadable folders,
//! symlink loops) is skipped and counted by reason.

pub mod includes;
pub mod index;
pub mod parse;
pub mod rank;
pub mod retrieval;
pub mod store;
pub mod vectors;
pub mod watch;

use std::path::PathBuf;

pub use index::{Change, Index, Settings, Skip};
pub use rank::{chunks, Chunk, Cursor, Graph, RankedDef, RankedFile, Ranking};
pub use retrieval::{mine, Bm25, MineSettings, Mined, Pair, PairKind, Recall};
pub use store::Store;
pub use vectors::Vectors;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a folder: index a repository's folder", .0.display())]
    NotADirectory(PathBuf),
    #[error("{} is not a cxxlm index (build one with `cxxlm index build`)", .0.display())]
    NotAnIndex(PathBuf),
    #[error("{} is an index of format version {found}, this cxxlm reads version {expected}: build it again with `cxxlm index build`", path.display())]
    Version {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("{} is corrupt ({detail}): build the index again with `cxxlm index build`", path.display())]
    Corrupt { path: PathBuf, detail: String },
    #[error("watching the repository: {0}")]
    Watch(String),
}
