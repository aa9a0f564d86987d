//! An agent for C++ repositories: a model (any OpenAI-compatible chat endpoint, or our
//! own in process) calls tools in the format of [`call`] (our special tokens), in a loop
//! with step and token budgets that writes a transcript ([`agent`]). The tools
//! ([`workspace`]) list, search (text, and symbols through `cxxlm-index`), open windows
//! of numbered lines, edit line ranges (refused when the file would no longer parse with
//! the project's flags: [`guard`]), build and test in the sandbox with summarized
//! compiler and sanitizer output ([`check`]), rank context at a line with the index, and
//! submit. Paths are confined to the repository. Verified bug tasks become repositories
//! ([`task_repo`]): tool-use examples for fine-tuning by replaying the fix through the
//! same tools ([`trajectory`]), and the agent's measured success, judged by the tasks'
//! own verifier, with and without the index ([`eval`]).

pub mod agent;
pub mod call;
pub mod check;
pub mod eval;
pub mod guard;
pub mod model;
pub mod task_repo;
pub mod trajectory;
pub mod workspace;

pub use agent::{Agent, Budget, Commands, Outcome, Report};
pub use check::Checker;
pub use model::{Endpoint, Model, Reply};
pub use workspace::Workspace;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Sandbox(#[from] cxxlm_eval::EvalError),
    #[error(transparent)]
    Data(#[from] cxxlm_data::DataError),
    #[error("the model: {0}")]
    Model(String),
}

impl AgentError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        AgentError::Io {
            path: path.into(),
            source,
        }
    }
}
