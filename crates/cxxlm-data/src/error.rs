use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Config(String),
    #[error("input {input}: {message}")]
    Input { input: String, message: String },
    #[error("hub: {0}")]
    Hub(String),
    #[error("interrupted; rerun the same command to resume")]
    Interrupted,
    #[error("{dir}: {message}")]
    Resume { dir: PathBuf, message: String },
}

impl DataError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
