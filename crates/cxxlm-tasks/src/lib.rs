//! Verifiable C++ tasks from real code: runnable programs found in a corpus
//! ([`program`]), bugs injected into them by named mutation operators ([`mutate`]) and
//! kept only when a sandboxed run shows them ([`judge`], [`report`], [`bugs`]), written in
//! the seeds' SFT format with a debug state ([`task`]), and function bodies to write again
//! in the same programs ([`bodies`]); fixes mined from git history
//! ([`mine`]); a client for an OpenAI-compatible teacher ([`teacher`]).

pub mod bodies;
pub mod bugs;
pub mod judge;
pub mod mine;
pub mod mutate;
pub mod program;
pub mod report;
pub mod reward;
pub mod task;
pub mod teacher;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Format {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Eval(#[from] cxxlm_eval::EvalError),
    #[error(transparent)]
    Data(#[from] cxxlm_data::DataError),
    #[error("{0}")]
    Resume(String),
    #[error("git: {0}")]
    Git(String),
    #[error("teacher: {0}")]
    Teacher(String),
    #[error("interrupted; rerun the same command to resume")]
    Interrupted,
}

impl TaskError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TaskError::Io {
            path: path.into(),
            source,
        }
    }

    pub fn json(e: serde_json::Error) -> Self {
        TaskError::Input(format!("JSON: {e}"))
    }
}

pub type Result<T, E = TaskError> = std::result::Result<T, E>;
