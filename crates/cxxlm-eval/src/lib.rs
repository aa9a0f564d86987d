//! The judge: a sandbox for untrusted programs ([`sandbox`]), g++ checks and builds in it
//! ([`compile`]), the MultiPL-E / HumanEval-X runner with pass@k ([`bench`]) and the RL
//! reward ([`reward`]).

pub mod bench;
pub mod compile;
pub mod functions;
pub mod reward;
pub mod sandbox;

pub use compile::{Compiler, Diagnosis};
pub use sandbox::{Ending, Limits, Outcome, Sandbox};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox: {0}")]
    Sandbox(String),
    #[error("{path}:{line}: {message}")]
    Format {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

impl EvalError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EvalError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = EvalError> = std::result::Result<T, E>;
