//! Counts kept per step and per reason: what came in, what went out, what was dropped
//! and why. They are merged across batches and tasks and written as `stats.json`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    pub docs: u64,
    pub bytes: u64,
}

impl Count {
    /// Sizes come from headers that may be damaged: a sum saturates rather than wraps.
    pub fn add(&mut self, bytes: u64) {
        self.docs += 1;
        self.bytes = self.bytes.saturating_add(bytes);
    }

    fn merge(&mut self, other: &Count) {
        self.docs += other.docs;
        self.bytes = self.bytes.saturating_add(other.bytes);
    }
}

/// An input (file, archive entry, record) that produced no document, named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub input: String,
    pub reason: String,
    pub detail: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReadStats {
    /// Units (files, archives, hub files) planned for this task and read.
    pub units: u64,
    pub docs: Count,
    /// Inputs that produced no document, by reason.
    pub skipped: BTreeMap<String, Count>,
    /// Every skipped input with its reason, so nothing is lost without a name.
    pub skipped_inputs: Vec<Skipped>,
    /// Files that are not C/C++ sources nor data files (not counted as losses).
    pub ignored_files: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    pub name: String,
    #[serde(rename = "in")]
    pub input: Count,
    #[serde(rename = "out")]
    pub output: Count,
    pub dropped: BTreeMap<String, Count>,
    /// Step-specific counts (replacements by kind, licenses found, ...).
    pub counters: BTreeMap<String, u64>,
    pub seconds: f64,
}

impl StepStats {
    pub fn new(name: &str) -> Self {
        StepStats {
            name: name.to_string(),
            ..Default::default()
        }
    }

    pub fn merge(&mut self, other: &StepStats) {
        self.input.merge(&other.input);
        self.output.merge(&other.output);
        for (k, v) in &other.dropped {
            self.dropped.entry(k.clone()).or_default().merge(v);
        }
        for (k, v) in &other.counters {
            *self.counters.entry(k.clone()).or_default() += v;
        }
        self.seconds += other.seconds;
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunStats {
    pub read: ReadStats,
    pub steps: Vec<StepStats>,
    pub written: Count,
    pub shards: u64,
    pub removed_written: Count,
    pub seconds: f64,
}

impl RunStats {
    pub fn merge(&mut self, other: &RunStats) {
        let r = &mut self.read;
        r.units += other.read.units;
        r.docs.merge(&other.read.docs);
        for (k, v) in &other.read.skipped {
            r.skipped.entry(k.clone()).or_default().merge(v);
        }
        r.skipped_inputs
            .extend(other.read.skipped_inputs.iter().cloned());
        r.ignored_files += other.read.ignored_files;
        for step in &other.steps {
            match self.steps.iter_mut().find(|s| s.name == step.name) {
                Some(mine) => mine.merge(step),
                None => self.steps.push(step.clone()),
            }
        }
        self.written.merge(&other.written);
        self.shards += other.shards;
        self.removed_written.merge(&other.removed_written);
        self.seconds += other.seconds;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_counts_and_keeps_step_order() {
        let mut a = RunStats::default();
        a.steps.push(StepStats::new("decode"));
        a.steps[0]
            .dropped
            .insert("binary".into(), Count { docs: 1, bytes: 10 });
        let mut b = a.clone();
        b.steps.push(StepStats::new("quality"));
        b.written.add(7);
        a.merge(&b);
        assert_eq!(a.steps.len(), 2);
        assert_eq!(a.steps[0].dropped["binary"], Count { docs: 2, bytes: 20 });
        assert_eq!(a.written, Count { docs: 1, bytes: 7 });
    }
}
