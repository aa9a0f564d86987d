//! Training: one loop for every stage ([`trainer`]: a batch source, a loss and an
//! evaluation in; steps, checkpoints, metrics, resume and data parallelism out), its
//! stages ([`pretrain`], [`sft`], [`rl`]), the optimizers and schedule ([`optim`]), checkpoints
//! ([`checkpoint`]), metrics ([`metrics`]), data parallelism across processes ([`dist`]) and
//! full sharding of the weights over them ([`fsdp`]); every setting is range-checked (`TrainConfig::validate`,
//! `SftConfig::validate`).

pub mod checkpoint;
pub mod cuda;
pub mod dist;
pub mod embed;
pub mod fsdp;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod pretrain;
pub mod rl;
pub mod sft;
pub mod trainer;
mod validate;

pub use embed::{embed, EmbedConfig};
pub use optim::{Matrices, OptimConfig, Optimizer, Schedule, Sharding};
pub use pretrain::{memory_plan, pretrain, TrainConfig};
pub use rl::{rl, RlConfig};
pub use sft::{sft, SftConfig};
pub use trainer::Event;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Config(String),
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("the loss became {loss} at step {step}, micro-batch {micro_batch}; the state before that step is saved in {saved}")]
    NonFinite {
        step: u64,
        micro_batch: usize,
        loss: f64,
        saved: PathBuf,
    },
    #[error("the gradient norm became {norm} at step {step} (the loss was finite); the state before that step is saved in {saved}")]
    NonFiniteGradient {
        step: u64,
        norm: f64,
        saved: PathBuf,
    },
    #[error("out of GPU memory at step {step} with train.device_batch = {device_batch}: lower train.device_batch (gradient accumulation keeps the total batch) or the model size")]
    OutOfMemory { step: u64, device_batch: usize },
    #[error("step {step} has no supervised target in any micro-batch on any rank: {data} gives nothing to learn there")]
    NoSupervision { step: u64, data: String },
    #[error(transparent)]
    Pack(#[from] cxxlm_pack::PackError),
    #[error(transparent)]
    Model(#[from] cxxlm_model::ModelError),
    #[error("{0}")]
    Torch(String),
    #[error("between ranks: {0}")]
    Collective(String),
    #[error("RL stopped: {0}")]
    Guard(String),
    /// A batch given up because the run is stopping ([`trainer::BatchSource::next_batch_unless`]);
    /// the loop then stops with a checkpoint of the step before.
    #[error("the batch was given up: the run is stopping")]
    Interrupted,
    #[error(transparent)]
    Tasks(#[from] cxxlm_tasks::TaskError),
}

impl TrainError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;
