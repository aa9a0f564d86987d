//! The cxxlm GPT in tch: configuration and presets ([`config`]), the model with its
//! memory-lean loss ([`gpt`]), examples packed into rows and kept apart ([`packing`]) and
//! generation with a KV cache of slots ([`generate`]).

pub mod config;
mod explicit;
pub mod generate;
pub mod gpt;
pub mod packing;

pub use config::{Activation, ModelConfig, ModelOverrides, Yarn, PRESETS};
pub use explicit::{check_explicit_pass, explicit_unsupported, Part, Phases, WeightStore};
pub use generate::{allow_only, sample, Decoder, Rows, Sampling};
pub use gpt::Gpt;
pub use packing::Packing;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model: {0}")]
    Config(String),
}

/// The message of a caught panic (tch panics with libtorch's error text).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// libtorch's random generator is global: tests (and checks) that seed it take turns.
pub(crate) static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
