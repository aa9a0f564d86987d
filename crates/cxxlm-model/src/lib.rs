//! The cxxlm GPT in tch: configuration and presets ([`config`]) and the model with its
//! memory-lean loss and a simple sampler ([`gpt`]).

pub mod config;
pub mod gpt;

pub use config::{Activation, ModelConfig, ModelOverrides, PRESETS};
pub use gpt::Gpt;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model: {0}")]
    Config(String),
}
