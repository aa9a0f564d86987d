//! The cleaning steps. Each is small, pure over one document, and composable: the
//! pipeline runs them in order, in parallel over documents, and counts what each did.

mod decode;
pub mod decontaminate;
mod exact_dedup;
mod license;
mod normalize;
mod pii;
mod quality;
mod secrets;

pub use decode::decode;
pub use decontaminate::{BenchmarkIndex, Decontaminate, DecontaminateConfig};
pub use exact_dedup::{content_hash, ExactDedup};
pub use license::{is_permissive, LicenseFilter, Licenses};
pub use normalize::Normalize;
pub use pii::Pii;
pub use quality::QualityFilter;
pub use secrets::Secrets;

use crate::config::PipelineConfig;
use crate::document::Document;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Drop(&'static str),
}

/// Step-specific event counts for one document (replacements by kind, licenses, ...).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Counters(pub Vec<(String, u64)>);

impl Counters {
    pub fn bump(&mut self, name: impl Into<String>, n: u64) {
        let name = name.into();
        match self.0.iter_mut().find(|(k, _)| *k == name) {
            Some((_, v)) => *v += n,
            None => self.0.push((name, n)),
        }
    }

    pub fn get(&self, name: &str) -> u64 {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map_or(0, |(_, v)| *v)
    }
}

pub trait Step: Send + Sync {
    fn name(&self) -> &'static str;
    /// Inspect or rewrite `doc`; a dropped document is not passed to later steps.
    fn apply(&self, doc: &mut Document, counters: &mut Counters) -> Verdict;
}

/// The configured steps in pipeline order: filters see the text as it was written
/// (their thresholds are defined on raw files), the rest see normalized text;
/// decontamination comes last, on the text that would be written.
pub fn build_steps(config: &PipelineConfig) -> crate::error::Result<Vec<Box<dyn Step>>> {
    let mut steps: Vec<Box<dyn Step>> = Vec::new();
    if config.quality.enabled {
        steps.push(Box::new(QualityFilter::new(config.quality.clone())));
    }
    if config.normalize.enabled {
        steps.push(Box::new(Normalize::new(config.normalize.clone())));
    }
    if config.license.enabled {
        steps.push(Box::new(LicenseFilter::new(config.license.clone())));
    }
    if config.pii.enabled {
        steps.push(Box::new(Pii::new(config.pii.clone())));
    }
    if config.secrets.enabled {
        steps.push(Box::new(Secrets::new(config.secrets.clone())));
    }
    if config.decontaminate.enabled {
        steps.push(Box::new(Decontaminate::new(&config.decontaminate)?));
    }
    Ok(steps)
}

#[cfg(test)]
pub(crate) fn doc(text: &str) -> Document {
    Document {
        id: "t.cc".into(),
        text: text.into(),
        meta: serde_json::Map::from_iter([("path".to_string(), "src/t.cc".into())]),
    }
}
