//! `train.min_steps`: a batch cut to the measured speed, so that a time budget holds
//! enough steps for the model to learn wherever it runs (on a CPU without bf16
//! arithmetic a step can take ten times longer than on the machine a preset was made on).

use anyhow::{Context, Result};
use cxxlm::interrupt;
use cxxlm_train::pretrain::RunConfig;
use cxxlm_train::{pretrain, Event, TrainConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Steps the probe runs: the first is a warm-up, the others are measured.
const PROBE_STEPS: u64 = 4;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchFit {
    pub device_batch: usize,
    pub total_batch_tokens: usize,
    /// The choice and its reason, for the start line.
    pub reason: String,
}

/// What the probe measured. A step's forward and backward passes grow with the rows of
/// the batch, the rest (the optimizer, above all) does not.
#[derive(Debug, Clone, Copy)]
struct StepCost {
    seq_len: usize,
    grad_accum: usize,
    per_row: f64,
    fixed: f64,
}

fn record_path(out: &Path) -> PathBuf {
    out.join("batch_fit.json")
}

/// Applies the fit to `config` when `train.min_steps` and `train.time_budget` ask for
/// one: the fit of the run being resumed, or a new one from a few probe steps.
pub fn fit_batch(config: &mut TrainConfig, resume: bool) -> Result<Option<BatchFit>> {
    let run = &config.train;
    if run.min_steps == 0 || run.time_budget <= 0.0 {
        return Ok(None);
    }
    if cxxlm_train::dist::World::from_env()?.size > 1 {
        anyhow::bail!(
            "train.min_steps fits the batch of one process; with several ranks give the batch (train.min_steps = 0)"
        );
    }
    let record = record_path(&config.out);
    let earlier = match std::fs::read_to_string(&record) {
        Ok(text) if resume => Some(
            serde_json::from_str::<BatchFit>(&text)
                .with_context(|| format!("{} is not a batch fit", record.display()))?,
        ),
        _ => None,
    };
    let fit = match earlier {
        Some(fit) => BatchFit {
            reason: format!("{} (fitted when the run began)", fit.reason),
            ..fit
        },
        None => {
            let fit = choose(&config.train, probe(config)?);
            let tmp = record.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_string_pretty(&fit)?)
                .and_then(|()| std::fs::rename(&tmp, &record))
                .with_context(|| format!("writing {}", record.display()))?;
            fit
        }
    };
    config.train.device_batch = fit.device_batch;
    config.train.total_batch_tokens = fit.total_batch_tokens;
    Ok(Some(fit))
}

/// A few steps of the configured run in a scratch directory, without evaluation.
fn probe(config: &TrainConfig) -> Result<StepCost> {
    let mut probe = config.clone();
    probe.out = config.out.join("batch-probe");
    let _ = std::fs::remove_dir_all(&probe.out);
    std::fs::create_dir_all(&probe.out)?;
    probe.train.steps = PROBE_STEPS;
    probe.train.time_budget = 0.0;
    probe.eval.every = 0;
    probe.checkpoint.every = 0;
    probe.checkpoint.keep = 1;
    let mut shape = None;
    let mut started = |e: Event| {
        if let Event::Start {
            model, grad_accum, ..
        } = e
        {
            shape = Some((model.seq_len, grad_accum));
        }
    };
    pretrain(&probe, false, &mut started, &|_| interrupt::requested())
        .context("probing the step time for train.min_steps")?;
    if interrupt::requested() {
        anyhow::bail!("interrupted while probing the step time");
    }
    let (seq_len, grad_accum) = shape.context("the probe did not start")?;
    let metrics = probe.out.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    let _ = std::fs::remove_dir_all(&probe.out);
    let steps: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["step"].as_u64().is_some_and(|s| s > 1))
        .collect();
    let median = |key: &str| {
        let mut t: Vec<f64> = steps.iter().filter_map(|v| v[key].as_f64()).collect();
        t.sort_by(f64::total_cmp);
        t.get(t.len() / 2).copied()
    };
    let (Some(step), Some(passes)) = (median("step_seconds"), median("forward_backward_seconds"))
    else {
        anyhow::bail!("the probe's {} holds no step times", metrics.display());
    };
    let rows = (config.train.device_batch * grad_accum) as f64;
    Ok(StepCost {
        seq_len,
        grad_accum,
        per_row: passes / rows,
        fixed: (step - passes).max(0.0),
    })
}

/// The largest batch whose estimated step time lets `min_steps` fit the budget: gradient
/// accumulation halved first (the same rows per pass), then the rows per pass.
fn choose(run: &RunConfig, cost: StepCost) -> BatchFit {
    let seq = cost.seq_len;
    let steps_in = |device_batch: usize, accum: usize| {
        let seconds = cost.fixed + cost.per_row * (device_batch * accum) as f64;
        (run.time_budget / seconds) as u64
    };
    let (mut device_batch, mut accum) = (run.device_batch, cost.grad_accum);
    let given = (device_batch, accum, steps_in(device_batch, accum));
    while steps_in(device_batch, accum) < run.min_steps && device_batch * accum > 1 {
        if accum > 1 {
            accum /= 2;
        } else {
            device_batch /= 2;
        }
    }
    let fitted = steps_in(device_batch, accum);
    let measured = format!(
        "a step of {} rows measured {:.2}s ({:.3}s a row + {:.2}s optimizer)",
        given.0 * given.1,
        cost.fixed + cost.per_row * (given.0 * given.1) as f64,
        cost.per_row,
        cost.fixed
    );
    let reason = if (device_batch, accum) == (given.0, given.1) {
        format!(
            "batch as given: {measured}, ~{} steps fit {:.0}s (train.min_steps {})",
            given.2, run.time_budget, run.min_steps
        )
    } else if fitted >= run.min_steps {
        format!(
            "batch cut to {device_batch} rows x {accum} micro-batches of {seq} tokens: {measured}, so only ~{} steps fit {:.0}s; now ~{fitted} (train.min_steps {})",
            given.2, run.time_budget, run.min_steps
        )
    } else {
        format!(
            "batch cut to its least, 1 row of {seq} tokens: {measured}; even so ~{fitted} steps fit {:.0}s, under train.min_steps {}",
            run.time_budget, run.min_steps
        )
    };
    BatchFit {
        device_batch,
        total_batch_tokens: device_batch * accum * seq,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(device_batch: usize, min_steps: u64) -> RunConfig {
        RunConfig {
            device_batch,
            time_budget: 100.0,
            min_steps,
            ..RunConfig::default()
        }
    }

    fn cost(grad_accum: usize, per_row: f64, fixed: f64) -> StepCost {
        StepCost {
            seq_len: 256,
            grad_accum,
            per_row,
            fixed,
        }
    }

    #[test]
    fn a_batch_that_fits_is_kept() {
        // 16 rows x 4 micro-batches at 1 ms a row: 0.064 s a step, ~1,560 steps.
        let fit = choose(&run(16, 300), cost(4, 0.001, 0.0));
        assert_eq!(
            (fit.device_batch, fit.total_batch_tokens),
            (16, 16 * 4 * 256)
        );
        assert!(fit.reason.starts_with("batch as given"), "{}", fit.reason);
    }

    #[test]
    fn accumulation_goes_first_then_rows() {
        // 64 rows at 10 ms: 0.64 s a step, 156 steps; 32 rows fit 312.
        let fit = choose(&run(16, 300), cost(4, 0.01, 0.0));
        assert_eq!(
            (fit.device_batch, fit.total_batch_tokens),
            (16, 16 * 2 * 256)
        );
        // With a fixed 0.2 s of optimizer, 0.13 s of passes are left: 8 rows.
        let fit = choose(&run(16, 300), cost(4, 0.01, 0.2));
        assert_eq!((fit.device_batch, fit.total_batch_tokens), (8, 8 * 256));
        assert!(
            fit.reason.contains("batch cut to 8 rows x 1"),
            "{}",
            fit.reason
        );
    }

    #[test]
    fn an_optimizer_slower_than_the_budget_allows_ends_at_one_row() {
        let fit = choose(&run(16, 300), cost(4, 0.01, 1.0));
        assert_eq!((fit.device_batch, fit.total_batch_tokens), (1, 256));
        assert!(
            fit.reason.contains("under train.min_steps 300"),
            "{}",
            fit.reason
        );
    }
}
