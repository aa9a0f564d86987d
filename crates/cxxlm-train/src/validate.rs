//! Range checks of every training setting, each problem named by its key, so that a
//! typo (a negative rate, a beta of 1.5, NaN) stops the run before it starts instead of
//! training something meaningless.

use crate::optim::{OptimConfig, Schedule};
use crate::pretrain::TrainConfig;
use crate::sft::SftConfig;
use crate::trainer::Common;
use crate::{Result, TrainError};

/// The problems found so far, one line per key.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check(&mut self, key: &str, value: f64, ok: bool, want: &str) {
        if !ok || value.is_nan() {
            self.0.push(format!("{key} = {value} must be {want}"));
        }
    }
    /// Finite and at least 0.
    fn non_negative(&mut self, key: &str, value: f64) {
        self.check(
            key,
            value,
            value.is_finite() && value >= 0.0,
            "finite and >= 0",
        );
    }
    /// In [0, 1).
    fn below_one(&mut self, key: &str, value: f64) {
        self.check(key, value, (0.0..1.0).contains(&value), "in [0, 1)");
    }
    /// In [0, 1].
    fn fraction(&mut self, key: &str, value: f64) {
        self.check(key, value, (0.0..=1.0).contains(&value), "in [0, 1]");
    }
    fn at_least_one(&mut self, key: &str, value: u64) {
        if value == 0 {
            self.0.push(format!("{key} = 0 must be at least 1"));
        }
    }
}

impl OptimConfig {
    fn problems(&self, p: &mut Problems) {
        p.non_negative("optim.matrix_lr", self.matrix_lr);
        p.non_negative("optim.embedding_lr", self.embedding_lr);
        p.non_negative("optim.unembedding_lr", self.unembedding_lr);
        p.below_one("optim.betas[0]", self.betas[0]);
        p.below_one("optim.betas[1]", self.betas[1]);
        p.check(
            "optim.eps",
            self.eps,
            self.eps.is_finite() && self.eps > 0.0,
            "finite and > 0",
        );
        p.non_negative("optim.weight_decay", self.weight_decay);
        p.below_one("optim.muon_momentum", self.muon_momentum);
        p.below_one("optim.muon_momentum_start", self.muon_momentum_start);
        p.at_least_one("optim.newton_schulz_steps", self.newton_schulz_steps as u64);
        p.non_negative("optim.grad_clip", self.grad_clip);
    }
}

impl Schedule {
    fn problems(&self, p: &mut Problems) {
        p.fraction("schedule.warmup_frac", self.warmup_frac);
        p.fraction("schedule.warmdown_frac", self.warmdown_frac);
        p.fraction("schedule.final_lr_frac", self.final_lr_frac);
        let both = self.warmup_frac + self.warmdown_frac;
        if both > 1.0 {
            p.0.push(format!(
                "schedule.warmup_frac + schedule.warmdown_frac = {both} must be at most 1"
            ));
        }
    }
}

impl TrainConfig {
    /// Every setting in its range, or an error naming each one that is not. Settings
    /// that depend on the data or the ranks (the batch's divisibility) are checked when
    /// training starts.
    pub fn validate(&self) -> Result<()> {
        let mut p = Problems::default();
        p.at_least_one("data.buffer", self.data.buffer as u64);
        p.stage(self.common());
        p.done()
    }
}

impl SftConfig {
    /// Every setting in its range, or an error naming each one that is not (the data
    /// and the model are checked when training starts).
    pub fn validate(&self) -> Result<()> {
        let mut p = Problems::default();
        p.at_least_one("sft.epochs", self.sft.epochs);
        p.below_one("sft.val_fraction", self.sft.val_fraction);
        p.stage(self.common());
        p.done()
    }
}

impl crate::embed::EmbedConfig {
    /// Every setting in its range, or an error naming each one that is not (the pairs
    /// and the model are checked when training starts).
    pub fn validate(&self) -> Result<()> {
        let mut p = Problems::default();
        let e = &self.embed;
        p.at_least_one("embed.epochs", e.epochs);
        p.at_least_one("embed.text_tokens", e.text_tokens as u64);
        p.check(
            "embed.temperature",
            e.temperature,
            e.temperature > 0.0,
            "above 0",
        );
        p.stage(self.common());
        p.done()
    }
}

impl crate::rl::RlConfig {
    /// Every setting in its range, or an error naming each one that is not (the tasks
    /// and the model are checked when training starts).
    pub fn validate(&self) -> Result<()> {
        let mut p = Problems::default();
        let rl = &self.rl;
        p.at_least_one("rl.prompts", rl.prompts as u64);
        if rl.samples < 2 {
            p.0.push(format!(
                "rl.samples = {} must be at least 2 (advantages are relative to a group)",
                rl.samples
            ));
        }
        p.at_least_one("rl.max_new_tokens", rl.max_new_tokens as u64);
        p.at_least_one("rl.updates", rl.updates as u64);
        p.non_negative("rl.temperature", rl.temperature);
        p.check(
            "rl.top_p",
            rl.top_p,
            rl.top_p > 0.0 && rl.top_p <= 1.0,
            "in (0, 1]",
        );
        p.below_one("rl.clip_low", rl.clip_low);
        p.non_negative("rl.clip_high", rl.clip_high);
        p.non_negative("rl.kl_coef", rl.kl_coef);
        p.check(
            "rl.max_kl",
            rl.max_kl,
            rl.max_kl.is_finite() && rl.max_kl > 0.0,
            "finite and > 0",
        );
        p.at_least_one("rl.equal_reward_batches", rl.equal_reward_batches);
        if rl.overlong_buffer > rl.max_new_tokens {
            p.0.push(format!(
                "rl.overlong_buffer = {} must be at most rl.max_new_tokens = {}",
                rl.overlong_buffer, rl.max_new_tokens
            ));
        }
        p.stage(self.common());
        p.done()
    }
}

impl Problems {
    /// The sections every stage shares.
    fn stage(&mut self, c: Common<'_>) {
        let (p, t, log) = (self, c.train, c.log);
        if !["auto", "cpu", "cuda"].contains(&t.device.as_str()) {
            p.0.push(format!(
                "train.device = {:?} must be auto, cpu or cuda",
                t.device
            ));
        }
        p.at_least_one("train.device_batch", t.device_batch as u64);
        p.non_negative("train.time_budget", t.time_budget);
        c.optim.problems(p);
        c.schedule.problems(p);
        p.at_least_one("checkpoint.keep", c.checkpoint.keep as u64);
        p.check(
            "log.peak_flops",
            log.peak_flops,
            log.peak_flops.is_finite() && log.peak_flops > 0.0,
            "finite and > 0",
        );
        p.fraction("log.mfu_warn", log.mfu_warn);
        p.check(
            "log.spike_factor",
            log.spike_factor,
            log.spike_factor.is_finite() && log.spike_factor > 1.0,
            "finite and > 1",
        );
    }

    fn done(self) -> Result<()> {
        match self.0.is_empty() {
            true => Ok(()),
            false => Err(TrainError::Config(self.0.join("; "))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(toml: &str) -> String {
        TrainConfig::from_table(toml.parse().unwrap())
            .unwrap()
            .validate()
            .map_or_else(|e| e.to_string(), |_| String::new())
    }

    #[test]
    fn the_defaults_and_the_presets_are_valid() {
        for preset in cxxlm_model::PRESETS {
            assert_eq!(problems(&format!("[model]\npreset = {preset:?}")), "");
        }
    }

    #[test]
    fn every_bad_value_is_named() {
        let e = problems(
            r#"
            [train]
            device = "tpu"
            device_batch = 0
            time_budget = -1.0
            [optim]
            matrix_lr = -0.02
            embedding_lr = nan
            betas = [1.5, 1.0]
            eps = 0.0
            weight_decay = -0.1
            muon_momentum = 1.0
            grad_clip = nan
            [schedule]
            warmup_frac = -0.1
            warmdown_frac = 0.6
            final_lr_frac = 2.0
            [checkpoint]
            keep = 0
            [log]
            spike_factor = 0.5
            "#,
        );
        for key in [
            "train.device = \"tpu\"",
            "train.device_batch = 0",
            "train.time_budget = -1",
            "optim.matrix_lr = -0.02",
            "optim.embedding_lr = NaN",
            "optim.betas[0] = 1.5",
            "optim.betas[1] = 1 must be in [0, 1)",
            "optim.eps = 0",
            "optim.weight_decay = -0.1",
            "optim.muon_momentum = 1",
            "optim.grad_clip = NaN",
            "schedule.warmup_frac = -0.1",
            "schedule.final_lr_frac = 2",
            "checkpoint.keep = 0",
            "log.spike_factor = 0.5",
        ] {
            assert!(e.contains(key), "{key} not in {e}");
        }
        let e = problems("[schedule]\nwarmup_frac = 0.6\nwarmdown_frac = 0.6");
        assert!(e.contains("must be at most 1"), "{e}");
        let sft = |toml: &str| {
            SftConfig::from_table(toml.parse().unwrap())
                .unwrap()
                .validate()
                .map_or_else(|e| e.to_string(), |_| String::new())
        };
        assert_eq!(sft(""), "");
        assert_eq!(sft("[sft]\nrecipe = \"nanochat\""), "");
        let e = sft("[sft]\nepochs = 0\nval_fraction = 1.0\n[optim]\nmatrix_lr = -1.0");
        for key in [
            "sft.epochs = 0",
            "sft.val_fraction = 1",
            "optim.matrix_lr = -1",
        ] {
            assert!(e.contains(key), "{key} not in {e}");
        }
    }
}
