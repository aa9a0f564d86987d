//! Reinforcement learning with the compiler as judge (GRPO) on the shared training loop.
//! Each rollout batch: P task prompts x K completions sampled by the policy itself with
//! the sampler that evaluation and serving use; each completion handed to a pool of
//! sandboxed workers the moment it ends ([`cxxlm_tasks::reward`]), so that only the last
//! ones are waited for; advantages relative to the group of the same prompt; then one or
//! more optimizer steps on the clipped ratio ([`Grpo`]) with a k3 KL term to the frozen
//! initial model. Guards stop a run that would train on nothing; checkpoints resume
//! bit-exactly (the rollout batch in use is part of the source's state).

use cxxlm_model::{Decoder, Gpt, ModelConfig, Packing, Sampling, WeightStore};
use cxxlm_tasks::reward::{RewardPool, Rewarded};
use cxxlm_tasks::task::{answer_ends, Task};
use cxxlm_tokenizer::chat::{self, Message, Role};
use cxxlm_tokenizer::layout::Layout;
use cxxlm_tokenizer::Bpe;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, TrainerState};
use crate::dist::Comm;
use crate::memory::{self, MemoryPlan};
use crate::metrics;
use crate::optim::{OptimConfig, Schedule};
use crate::pretrain::{over_defaults, CheckpointConfig, LogConfig, RunConfig};
use crate::trainer::{
    self, Backward, BatchSource, DeviceBatch, Evaluation, Event, Loss, MicroBatch, Parts, Stage,
    TargetWeights,
};
use crate::{Result, TrainError};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RlConfig {
    /// Run directory: checkpoints, metrics, TensorBoard events, samples.
    pub out: PathBuf,
    /// The model to start from (an SFT run or checkpoint); also the frozen reference.
    pub init: PathBuf,
    pub rl: RlSettings,
    pub train: RunConfig,
    pub optim: OptimConfig,
    pub schedule: Schedule,
    pub eval: RlEvalConfig,
    pub checkpoint: CheckpointConfig,
    pub log: LogConfig,
}

/// How the summed loss of a step is normalized.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Normalization {
    /// By the completion tokens of the whole step (DAPO).
    #[default]
    Token,
    /// By a constant, completions x `max_new_tokens` (Dr. GRPO): a long completion's
    /// tokens weigh as much as a short one's.
    Constant,
}

/// What becomes of completions cut at `max_new_tokens`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlong {
    /// Their tokens are not learned from (their rewards still count in their group).
    #[default]
    Mask,
    /// DAPO's soft penalty: completions longer than `max_new_tokens - overlong_buffer`
    /// lose up to 1 of reward, linearly, at the limit.
    Penalty,
    /// Learned from like any other.
    Keep,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RlSettings {
    /// Task files (outputs of `tasks bugs`: directories or JSON lines); the runnable
    /// tasks of the `train` split are the prompts.
    pub tasks: Vec<PathBuf>,
    /// The tokenizer the model was trained with.
    pub tokenizer: Option<PathBuf>,
    /// Prompts per rollout batch over all ranks (P).
    pub prompts: usize,
    /// Completions per prompt (K, a group).
    pub samples: usize,
    pub temperature: f64,
    pub top_k: i64,
    pub top_p: f64,
    pub max_new_tokens: usize,
    /// Optimizer steps on each rollout batch (1: on-policy, the ratio exactly 1).
    pub updates: usize,
    /// Sample the next rollout batch while the last rewards of this one come in, so
    /// that the step does not wait for the judges: each update then learns from
    /// completions sampled one update earlier, the ratio taken against the
    /// log-probabilities they were sampled with.
    pub sample_ahead: bool,
    /// The ratio is clipped to [1 - clip_low, 1 + clip_high] (DAPO: 0.2 and 0.28).
    pub clip_low: f64,
    pub clip_high: f64,
    /// Weight of the k3 KL estimate to the initial model (0: no reference is loaded).
    pub kl_coef: f64,
    pub normalization: Normalization,
    /// Advantages divided by their group's standard deviation (GRPO) or not (Dr. GRPO).
    pub scale_by_std: bool,
    /// Groups whose rewards are all equal are replaced by groups of further prompts, up
    /// to `dynamic_rounds` more prompts per prompt of the batch (DAPO).
    pub dynamic_sampling: bool,
    pub dynamic_rounds: usize,
    pub overlong: Overlong,
    /// Tokens before the limit where the overlong penalty starts (0: a quarter of
    /// `max_new_tokens`).
    pub overlong_buffer: usize,
    /// Sandboxed workers judging completions (0: one per core).
    pub reward_workers: usize,
    /// Stop once the KL estimate to the reference exceeds this.
    pub max_kl: f64,
    /// Stop once every reward of this many rollout batches in a row is the same.
    pub equal_reward_batches: u64,
}

impl Default for RlSettings {
    fn default() -> Self {
        RlSettings {
            tasks: Vec::new(),
            tokenizer: None,
            prompts: 16,
            samples: 8,
            temperature: 0.8,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 2048,
            updates: 1,
            sample_ahead: false,
            clip_low: 0.2,
            clip_high: 0.2,
            kl_coef: 0.01,
            normalization: Normalization::Token,
            scale_by_std: true,
            dynamic_sampling: false,
            dynamic_rounds: 2,
            overlong: Overlong::Mask,
            overlong_buffer: 0,
            reward_workers: 0,
            max_kl: 10.0,
            equal_reward_batches: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RlEvalConfig {
    /// Held-out tasks answered greedily every this many steps (and at the start and the
    /// end): pass@1, compile rate and mean reward.
    pub every: u64,
    /// Held-out (`test` split) tasks evaluated, spread over the split (0: none).
    pub tasks: usize,
    /// Answers shown (`samples.jsonl`).
    pub samples: usize,
}

impl Default for RlEvalConfig {
    fn default() -> Self {
        RlEvalConfig {
            every: 50,
            tasks: 64,
            samples: 1,
        }
    }
}

crate::trainer::shared_sections!(RlConfig);

impl RlConfig {
    /// A config from TOML on top of the seeds' RL defaults: AdamW at 5e-7 on every
    /// weight, a constant rate.
    pub fn from_table(table: toml::Table) -> Result<Self> {
        let defaults = toml::toml! {
            [train]
            device_batch = 8
            [optim]
            matrices = "adamw"
            matrix_lr = 5e-7
            embedding_lr = 5e-7
            unembedding_lr = 5e-7
            weight_decay = 0.0
            [schedule]
            warmup_frac = 0.0
            warmdown_frac = 0.0
        };
        over_defaults(defaults, table)
    }
}

/// Log-probabilities `(B, T)` of the targets under `model` (0 where a target is
/// negative), with gradients unless under `no_grad`; and the entropy `(B, T)` of each
/// target's distribution (0 where none), without.
pub fn target_logprobs(model: &Gpt, batch: &DeviceBatch) -> (Tensor, Tensor) {
    // Only the positions of targets: a completion's prompt needs no head.
    let targets = batch.targets.reshape([-1]);
    let at = targets.ge(0).nonzero().squeeze_dim(1);
    let logits = model.logits_with_grad(&batch.inputs, batch.packing.as_ref(), Some(&at));
    let all = logits.log_softmax(-1, Kind::Float);
    let picked = all
        .gather(-1, &targets.index_select(0, &at).unsqueeze(-1), false)
        .squeeze_dim(-1);
    let entropy = tch::no_grad(|| {
        let a = all.detach();
        -(a.exp() * &a).sum_dim_intlist(-1, false, Kind::Float)
    });
    let spread = |values: &Tensor| {
        Tensor::zeros(targets.size(), (Kind::Float, targets.device()))
            .index_put(&[Some(&at)], values, false)
            .view(batch.targets.size().as_slice())
    };
    (spread(&picked), spread(&entropy))
}

/// GRPO's objective per target: the clipped ratio times the advantage (PPO), plus the
/// k3 estimate of the KL divergence to the reference.
pub struct Grpo {
    pub clip_low: f64,
    pub clip_high: f64,
    pub kl_coef: f64,
    /// The step's divisor when constant (Dr. GRPO); None: its supervised targets.
    pub constant: Option<f64>,
    /// The KL estimate above which a step's update is refused (the policy has run away
    /// from the reference).
    pub max_kl: f64,
    /// Sums over the step's supervised targets: targets, ratios clipped below and above,
    /// entropy, KL, the largest distance of a ratio from 1.
    sums: [f64; 5],
    max_ratio_distance: f64,
}

impl Grpo {
    pub fn new(clip_low: f64, clip_high: f64, kl_coef: f64, constant: Option<f64>) -> Self {
        Grpo {
            clip_low,
            clip_high,
            kl_coef,
            constant,
            max_kl: f64::INFINITY,
            sums: [0.0; 5],
            max_ratio_distance: 0.0,
        }
    }
}

impl Loss for Grpo {
    // `x += ...` on a tch tensor adds in place, into a tensor autograd keeps.
    #[allow(clippy::assign_op_pattern)]
    // Autograd reads the model's own weights: full sharding is refused for this loss.
    fn forward_backward(
        &mut self,
        model: &Gpt,
        _: Option<&dyn WeightStore>,
        batch: &DeviceBatch,
        scale: f64,
    ) -> Tensor {
        let weights = batch.weights.as_ref().expect("RL batches carry advantages");
        let (logp, entropy) = target_logprobs(model, batch);
        let learned = batch.targets.ge(0).to_kind(Kind::Float);
        let old = match &weights.old_logprobs {
            Some(old) => old.shallow_clone(),
            None => logp.detach(),
        };
        let ratio = (&logp - old).exp();
        let a = &weights.advantages;
        let clipped = ratio.clamp(1.0 - self.clip_low, 1.0 + self.clip_high);
        let mut per_target = -(&ratio * a).minimum(&(&clipped * a));
        let mut kl = None;
        if self.kl_coef > 0.0 {
            if let Some(reference) = &weights.ref_logprobs {
                let d = reference - &logp;
                let k3 = d.exp() - &d - 1.0;
                per_target = per_target + &k3 * self.kl_coef;
                kl = Some(k3.detach());
            }
        }
        let sum = (per_target * &learned).sum(Kind::Float);
        (&sum * scale).backward();
        tch::no_grad(|| {
            let ratio = ratio.detach();
            let masked_sum = |t: &Tensor| (t * &learned).sum(Kind::Double).double_value(&[]);
            let low = ratio.lt(1.0 - self.clip_low).logical_and(&a.lt(0.0));
            let high = ratio.gt(1.0 + self.clip_high).logical_and(&a.gt(0.0));
            let distance = ((&ratio - 1.0).abs() * &learned).max().double_value(&[]);
            self.sums[0] += learned.sum(Kind::Double).double_value(&[]);
            self.sums[1] += masked_sum(&low.to_kind(Kind::Float));
            self.sums[2] += masked_sum(&high.to_kind(Kind::Float));
            self.sums[3] += masked_sum(&entropy);
            self.sums[4] += kl.as_ref().map_or(0.0, masked_sum);
            self.max_ratio_distance = self.max_ratio_distance.max(distance);
        });
        sum.detach()
    }

    fn normalizer(&self, supervised: f64) -> f64 {
        self.constant.unwrap_or(supervised)
    }

    fn figures(&mut self, comm: &Comm) -> Result<Map<String, Value>> {
        let sums = std::mem::take(&mut self.sums);
        let distance = std::mem::take(&mut self.max_ratio_distance);
        let (sums, distance) = comm.sums_and_maxima(&sums, &[distance])?;
        let (&[n, low, high, entropy, kl], &[distance]) = (&sums[..], &distance[..]) else {
            unreachable!("as many figures as were given")
        };
        let mut f = Map::new();
        if n > 0.0 {
            f.insert("clip_low_share".into(), (low / n).into());
            f.insert("clip_high_share".into(), (high / n).into());
            f.insert("entropy".into(), (entropy / n).into());
            f.insert("ratio_max_distance".into(), distance.into());
            if self.kl_coef > 0.0 {
                f.insert("kl".into(), (kl / n).into());
            }
        }
        Ok(f)
    }

    fn watches_spikes(&self) -> bool {
        false
    }

    fn refusal(&self, figures: &Map<String, Value>) -> Option<String> {
        // A KL that is not a number is null in the figures.
        let kl = figures.get("kl")?.as_f64().unwrap_or(f64::NAN);
        (kl.is_nan() || kl > self.max_kl).then(|| format!(
            "the KL estimate to the reference reached {kl:.4} (rl.max_kl = {}): the policy has run away from its start; lower the learning rates or raise rl.kl_coef",
            self.max_kl
        ))
    }
}

/// Group-relative advantages of one group's rewards: the reward less the group's mean,
/// divided by the group's standard deviation when `scale_by_std`; None when every reward
/// is the same (the group has nothing to teach).
pub fn advantages(rewards: &[f64], scale_by_std: bool) -> Option<Vec<f64>> {
    let first = *rewards.first()?;
    if rewards.iter().all(|&r| r == first) {
        return None;
    }
    let n = rewards.len() as f64;
    let mean = rewards.iter().sum::<f64>() / n;
    let var = rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    let std = var.sqrt();
    Some(
        rewards
            .iter()
            .map(|r| match scale_by_std {
                true => (r - mean) / (std + 1e-4),
                false => r - mean,
            })
            .collect(),
    )
}

/// DAPO's soft overlong penalty of a completion of `len` tokens: 0 up to
/// `limit - buffer`, then down linearly to -1 at `limit`.
pub fn overlong_penalty(len: usize, limit: usize, buffer: usize) -> f64 {
    let start = limit.saturating_sub(buffer);
    if len <= start || buffer == 0 {
        return 0.0;
    }
    -((len - start) as f64 / buffer as f64).min(1.0)
}

/// What a rollout batch showed, for the guards.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchCheck {
    pub completions: usize,
    pub truncated: usize,
    pub groups: usize,
    pub equal_groups: usize,
    pub reward_min: f64,
    pub reward_max: f64,
}

impl BatchCheck {
    /// The check of the whole batch, every rank's share of it counted.
    fn over_ranks(&self, comm: &Comm) -> Result<BatchCheck> {
        let counts = [
            self.completions,
            self.truncated,
            self.groups,
            self.equal_groups,
        ];
        let (sums, maxima) = comm.sums_and_maxima(
            &counts.map(|c| c as f64),
            &[-self.reward_min, self.reward_max],
        )?;
        let count = |k: usize| sums[k] as usize;
        Ok(BatchCheck {
            completions: count(0),
            truncated: count(1),
            groups: count(2),
            equal_groups: count(3),
            reward_min: -maxima[0],
            reward_max: maxima[1],
        })
    }
}

/// The guards: an error that stops the run when training would go on with nothing to
/// learn or has run away; warnings otherwise. `equal_batches` counts the rollout batches
/// in a row whose rewards were all equal (this one included when so).
pub fn guard(
    check: &BatchCheck,
    settings: &RlSettings,
    equal_batches: &mut u64,
) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    if !(check.reward_min.is_finite() && check.reward_max.is_finite()) {
        return Err(TrainError::Guard(format!(
            "a reward is not a number (between {} and {})",
            check.reward_min, check.reward_max
        )));
    }
    if check.completions > 0 && check.truncated == check.completions {
        let why = format!(
            "all {} completions reached rl.max_new_tokens = {} without finishing",
            check.completions, settings.max_new_tokens
        );
        if settings.overlong == Overlong::Mask {
            return Err(TrainError::Guard(format!(
                "{why}, and overlong completions are masked: nothing would be learned; raise rl.max_new_tokens or start from a model that finishes its answers"
            )));
        }
        warnings.push(why);
    }
    if check.reward_min == check.reward_max {
        *equal_batches += 1;
        if *equal_batches >= settings.equal_reward_batches {
            return Err(TrainError::Guard(format!(
                "every reward of the last {equal_batches} rollout batches was {} (rl.equal_reward_batches = {}): there is nothing to learn from; start from a model that sometimes succeeds (SFT), or give easier tasks",
                check.reward_min, settings.equal_reward_batches
            )));
        }
    } else {
        *equal_batches = 0;
    }
    if check.groups > 0 && check.equal_groups == check.groups {
        warnings.push(format!(
            "all {} groups of this rollout batch had equal rewards (from {} to {} over the batch): it teaches nothing",
            check.groups, check.reward_min, check.reward_max
        ));
    }
    Ok(warnings)
}

/// Each completion's advantage, or None when it is not learned from: its group's
/// rewards are all equal (it has nothing to teach), or it was cut at the length limit
/// and overlong completions are masked. Also the number of groups of equal rewards.
pub fn learned_advantages(
    groups: &[usize],
    rewards: &[f64],
    truncated: &[bool],
    settings: &RlSettings,
) -> (Vec<Option<f64>>, usize) {
    let mut out = vec![None; rewards.len()];
    let mut ids: Vec<usize> = groups.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut equal = 0;
    for g in ids {
        let members: Vec<usize> = (0..groups.len()).filter(|&i| groups[i] == g).collect();
        let group: Vec<f64> = members.iter().map(|&i| rewards[i]).collect();
        match advantages(&group, settings.scale_by_std) {
            Some(a) => {
                for (&i, a) in members.iter().zip(a) {
                    let masked = truncated[i] && settings.overlong == Overlong::Mask;
                    out[i] = (!masked).then_some(a);
                }
            }
            None => equal += 1,
        }
    }
    (out, equal)
}

/// Which completions each of `count` micro-batches learns from, a row for each group's
/// (completions of one prompt, numbered in `groups`): only those with an advantage (the
/// others teach nothing: no target of theirs is learned, the KL term included), rows by
/// length so that each micro-batch pads little, as evenly shared as can be. A
/// micro-batch left with none holds the shortest of the others, learning nothing.
pub fn learning_rows(
    groups: &[usize],
    prompts: &[&[u32]],
    completions: &[&[u32]],
    advantages: &[Option<f64>],
    count: usize,
) -> Vec<Vec<Vec<usize>>> {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    for i in (0..groups.len()).filter(|&i| advantages[i].is_some()) {
        match rows.iter_mut().find(|row| groups[row[0]] == groups[i]) {
            Some(row) => row.push(i),
            None => rows.push(vec![i]),
        }
    }
    rows.sort_by_key(|row| row_length(row, prompts, completions));
    // (There is one when a micro-batch is left empty: `count` is at most the completions.)
    let shortest = (0..groups.len())
        .filter(|&i| advantages[i].is_none())
        .min_by_key(|&i| row_length(&[i], prompts, completions));
    (0..count)
        .map(|k| {
            let run = &rows[k * rows.len() / count..(k + 1) * rows.len() / count];
            match run.is_empty() {
                true => shortest.map(|i| vec![i]).into_iter().collect(),
                false => run.to_vec(),
            }
        })
        .collect()
}

/// The tokens of the row of completions `row` of one prompt in [`micro_batch`].
fn row_length(row: &[usize], prompts: &[&[u32]], completions: &[&[u32]]) -> usize {
    let prompt = prompts[row[0]].len().saturating_sub(1);
    prompt + row.iter().map(|&i| 1 + completions[i].len()).sum::<usize>()
}

/// The micro-batch of `rows`, each completions of one prompt: the prompt but its last
/// token, then each completion after a copy of that token, attending to the prompt and
/// to itself ([`cxxlm_model::Packing::with_shared_prefix`]): the prompt is computed once
/// for its samples. Rows are padded with `pad` to the longest. Also where each
/// completion's targets start among the `(rows, cols - 1)` targets, in the order of
/// `rows`' completions.
fn micro_batch(
    rows: &[Vec<usize>],
    prompts: &[&[u32]],
    completions: &[&[u32]],
    advantages: &[Option<f64>],
    pad: u32,
) -> (MicroBatch, Vec<usize>) {
    let cols = rows
        .iter()
        .map(|row| row_length(row, prompts, completions))
        .max()
        .unwrap_or(2)
        .max(2);
    let t = cols - 1;
    let mut tokens = Vec::with_capacity(rows.len() * cols);
    let mut supervised = vec![false; rows.len() * t];
    let mut weights = vec![0f32; rows.len() * t];
    let mut examples = Vec::with_capacity(rows.len());
    let mut starts = Vec::new();
    for (r, row) in rows.iter().enumerate() {
        let prompt = prompts[row[0]];
        // An empty prompt: the completions follow padding, and teach nothing.
        let (last, before) = prompt.split_last().map_or((pad, &[][..]), |(l, b)| (*l, b));
        let begin = tokens.len();
        tokens.extend(before);
        let mut lengths = vec![before.len()];
        for &i in row {
            let start = r * t + tokens.len() - begin;
            starts.push(start);
            tokens.push(last);
            tokens.extend(completions[i]);
            lengths.push(1 + completions[i].len());
            if let (Some(a), false) = (advantages[i], prompt.is_empty()) {
                // The target at `k` is the token at `k + 1`.
                for k in start..start + completions[i].len() {
                    supervised[k] = true;
                    weights[k] = a as f32;
                }
            }
        }
        tokens.resize(begin + cols, pad);
        examples.push(lengths);
    }
    let batch = MicroBatch {
        rows: rows.len(),
        cols,
        tokens,
        supervised: Some(supervised),
        examples: Some(examples),
        shared_prefix: true,
        weights: Some(TargetWeights {
            advantages: weights,
            old_logprobs: None,
            ref_logprobs: None,
        }),
    };
    (batch, starts)
}

/// A completion sampled for a prompt, and what it earned.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Rollout {
    task: usize,
    group: usize,
    tokens: Vec<u32>,
    truncated: bool,
    /// Its tokens' log-probabilities under the policy that sampled it, when the update
    /// sees a later one (`rl.sample_ahead`).
    sampled_logprobs: Option<Vec<f32>>,
    rewarded: Option<Rewarded>,
}

/// Rollouts handed to the reward pool, their rewards not yet read: under which of its
/// batch numbers (None: not in this process, as after a resume), and the seconds their
/// sampling took.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Drawn {
    /// Its number among the rollout batches drawn.
    #[serde(default)]
    batch: u64,
    rollouts: Vec<Rollout>,
    /// Further tasks of the batch's window, for groups of equal rewards to give way to.
    spare: Vec<usize>,
    #[serde(skip)]
    pool_batch: Option<u64>,
    #[serde(skip)]
    generation: Generation,
}

/// Where sampling's seconds went: the prompts' prefill (to the first token of every
/// row), the decoding steps after it, and the sampled tokens' log-probabilities.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Generation {
    prefill: f64,
    decode: f64,
    logprobs: f64,
    /// Decoding steps: the longest completion's tokens.
    steps: usize,
}

impl Generation {
    fn seconds(&self) -> f64 {
        self.prefill + self.decode + self.logprobs
    }

    fn add(&mut self, o: &Generation) {
        self.prefill += o.prefill;
        self.decode += o.decode;
        self.logprobs += o.logprobs;
        self.steps += o.steps;
    }
}

/// The text a completion's tokens make, without the end-of-turn token.
fn completion_text(bpe: &Bpe, ids: &[u32]) -> String {
    let stop_token = chat::end_of_turn(bpe);
    let kept: Vec<u32> = ids.iter().copied().filter(|&t| t != stop_token).collect();
    String::from_utf8_lossy(&bpe.decode(&kept)).into_owned()
}

/// What to sample: `samples` completions of each of `tasks`' prompts, their groups
/// numbered from `first_group`; with `logprob_rows` set, each keeps its tokens'
/// log-probabilities under the model that sampled it, computed that many completions
/// per forward pass.
struct Request<'a> {
    tasks: &'a [usize],
    samples: usize,
    sampling: Sampling,
    first_group: usize,
    logprob_rows: Option<usize>,
}

/// The policy with what it samples for: the tasks' prompts, and the pool that judges;
/// and the decoder it samples in, kept from batch to batch.
struct Sampler<'a> {
    model: &'a Gpt,
    bpe: &'a Bpe,
    prompts: &'a [Vec<u32>],
    pool: &'a RewardPool,
    decoder: &'a RefCell<Option<Decoder>>,
}

impl Sampler<'_> {
    /// Samples what `req` asks with the shared sampler, each completion handed to the
    /// pool under `pool_batch` as soon as it ends; returns them, without their rewards
    /// yet, and where the time went. None: given up, once `stopping()` turned true (the
    /// completions that ended before are judged all the same, and not asked for).
    fn sample(
        &self,
        req: &Request,
        pool_batch: u64,
        stopping: &dyn Fn() -> bool,
    ) -> Option<(Vec<Rollout>, Generation)> {
        if stopping() {
            return None;
        }
        let (model, bpe) = (self.model, self.bpe);
        let stop_token = chat::end_of_turn(bpe);
        let rows: Vec<(usize, usize)> = req
            .tasks
            .iter()
            .enumerate()
            .flat_map(|(g, &t)| std::iter::repeat_n((t, req.first_group + g), req.samples))
            .collect();
        let row_prompts: Vec<Vec<u32>> =
            rows.iter().map(|&(t, _)| self.prompts[t].clone()).collect();
        let started = Instant::now();
        let mut first_token = None;
        let mut finished = vec![false; rows.len()];
        let mut given_up = false;
        let mut decoder = self.decoder.borrow_mut();
        let slots = row_prompts.len();
        let generated = model.generate_reusing(
            &mut decoder,
            &row_prompts,
            &[],
            &req.sampling,
            slots,
            &mut |row, ids| {
                first_token.get_or_insert_with(Instant::now);
                given_up = given_up || stopping();
                if given_up {
                    return true;
                }
                let done = answer_ends(ids, stop_token, |t| bpe.decode(t));
                if done {
                    finished[row] = true;
                    self.pool
                        .submit(pool_batch, row, rows[row].0, completion_text(bpe, ids));
                }
                done
            },
        );
        drop(decoder);
        if given_up {
            return None;
        }
        for (row, ids) in generated.iter().enumerate() {
            if !finished[row] {
                self.pool
                    .submit(pool_batch, row, rows[row].0, completion_text(bpe, ids));
            }
        }
        let sampled = Instant::now();
        let first_token = first_token.unwrap_or(sampled);
        let logprobs = match req.logprob_rows {
            Some(per_pass) => {
                let prompts: Vec<&[u32]> = row_prompts.iter().map(Vec::as_slice).collect();
                let completions: Vec<&[u32]> = generated.iter().map(Vec::as_slice).collect();
                completion_logprobs(model, &prompts, &completions, per_pass)
                    .into_iter()
                    .map(Some)
                    .collect()
            }
            None => vec![None; rows.len()],
        };
        let generation = Generation {
            prefill: (first_token - started).as_secs_f64(),
            decode: (sampled - first_token).as_secs_f64(),
            logprobs: sampled.elapsed().as_secs_f64(),
            steps: generated.iter().map(Vec::len).max().unwrap_or(0),
        };
        let rollouts = rows
            .into_iter()
            .zip(generated)
            .zip(finished)
            .zip(logprobs)
            .map(
                |((((task, group), tokens), finished), sampled_logprobs)| Rollout {
                    task,
                    group,
                    tokens,
                    truncated: !finished,
                    sampled_logprobs,
                    rewarded: None,
                },
            )
            .collect();
        Some((rollouts, generation))
    }

    /// [`Sampler::sample`], then [`collect`]: rollouts with their rewards, where
    /// generating spent its time, and the seconds waiting.
    fn sample_and_judge(&self, req: &Request) -> Result<(Vec<Rollout>, Generation, f64)> {
        let batch = self.pool.new_batch();
        // Never None: nothing stops it.
        let (mut rollouts, generation) = self
            .sample(req, batch, &|| false)
            .ok_or(TrainError::Interrupted)?;
        let wait = collect(self.pool, self.bpe, Some(batch), &mut rollouts)?;
        Ok((rollouts, generation, wait))
    }
}

/// Each completion's tokens' log-probabilities under `model`, after its prompt, in
/// passes of about `rows` completions, the samples of one prompt (neighbours with the same
/// prompt) a row, rows of similar lengths together (little padding).
fn completion_logprobs(
    model: &Gpt,
    prompts: &[&[u32]],
    completions: &[&[u32]],
    rows: usize,
) -> Vec<Vec<f32>> {
    let layout = vec![Some(0.0); prompts.len()];
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for i in 0..prompts.len() {
        match groups.last_mut() {
            Some(g) if prompts[g[0]] == prompts[i] => g.push(i),
            _ => groups.push(vec![i]),
        }
    }
    groups.sort_by_key(|g| row_length(g, prompts, completions));
    let mut passes: Vec<Vec<Vec<usize>>> = Vec::new();
    // Completions in the last pass (as many as a full one: the first group opens one).
    let mut in_pass = rows;
    for g in groups {
        if in_pass >= rows {
            passes.push(Vec::new());
            in_pass = 0;
        }
        in_pass += g.len();
        passes.last_mut().expect("opened above").push(g);
    }
    let mut out = vec![Vec::new(); prompts.len()];
    tch::no_grad(|| {
        for pass in &passes {
            let (b, starts) = micro_batch(pass, prompts, completions, &layout, 0);
            let all = host_f32(&target_logprobs(model, &b.to_device(model.device())).0);
            for (&i, start) in pass.iter().flatten().zip(starts) {
                out[i] = all[start..start + completions[i].len()].to_vec();
            }
        }
    });
    out
}

/// Waits for the rewards of `rollouts` (handed to `pool` under `pool_batch`, or now
/// when None) and returns the seconds waited.
fn collect(
    pool: &RewardPool,
    bpe: &Bpe,
    pool_batch: Option<u64>,
    rollouts: &mut [Rollout],
) -> Result<f64> {
    let batch = match pool_batch {
        Some(b) => b,
        None => {
            let b = pool.new_batch();
            for (row, r) in rollouts.iter().enumerate() {
                pool.submit(b, row, r.task, completion_text(bpe, &r.tokens));
            }
            b
        }
    };
    let waited = Instant::now();
    for (row, r) in pool.wait(batch)? {
        rollouts[row].rewarded = Some(r);
    }
    Ok(waited.elapsed().as_secs_f64())
}

/// A deterministic permutation of `0..n` for `seed`.
fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    order
}

/// Where the rollouts stand: what a checkpoint keeps of the source.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct RolloutState {
    /// Rollout batches made.
    batches: u64,
    /// Prompts of the global stream used (every rank reads the same stream).
    position: u64,
    /// Rollout batches in a row whose rewards were all equal.
    equal_batches: u64,
    /// The rollout batch in use, its micro-batches; the next one to give; and the
    /// updates already made with it.
    current: Vec<MicroBatch>,
    next: usize,
    updates_done: usize,
    /// With `rl.sample_ahead`: the rollouts sampled for the next batch, their rewards
    /// still coming in.
    pending: Option<Drawn>,
}

/// Rollout batches: this rank's share of the prompts, completions sampled by the policy,
/// rewarded, turned into micro-batches of weighted targets.
struct RolloutSource<'a> {
    settings: &'a RlSettings,
    tasks: &'a [Task],
    prompts: Vec<Vec<u32>>,
    bpe: &'a Bpe,
    pool: &'a RewardPool,
    reference: Option<Gpt>,
    device_batch: usize,
    pad: u32,
    seed: u64,
    rank: usize,
    ranks: usize,
    state: RolloutState,
    /// The decoder the rollouts are sampled in (its steps captured once).
    decoder: RefCell<Option<Decoder>>,
    /// This rank's figures of the rollout batch settled last, until read.
    tally: Option<Tally>,
    log: RolloutLog,
    warnings: Vec<String>,
    rollouts_since: (usize, Instant),
}

impl RolloutSource<'_> {
    /// The task of the `position`th prompt of the global stream (a new order each pass).
    fn task_at(&self, position: u64) -> usize {
        let n = self.tasks.len() as u64;
        let order = permutation(self.tasks.len(), self.seed ^ (position / n));
        order[(position % n) as usize]
    }

    /// A new rollout batch to learn from, made with `model`; with `rl.sample_ahead`,
    /// the one sampled last time, while the next one is sampled now.
    fn roll_out(&mut self, model: &Gpt, comm: &Comm, stopping: &dyn Fn() -> bool) -> Result<()> {
        if !self.settings.sample_ahead {
            let drawn = self.draw(model, comm, stopping)?;
            let generation = drawn.generation;
            return self.settle(model, comm, drawn, generation);
        }
        let (ready, mut generation) = match self.state.pending.take() {
            Some(d) => (d, Generation::default()),
            None => {
                let d = self.draw(model, comm, stopping)?;
                let g = d.generation;
                (d, g)
            }
        };
        let next = self.draw(model, comm, stopping)?;
        generation.add(&next.generation);
        self.state.pending = Some(next);
        self.settle(model, comm, ready, generation)
    }

    /// This rank's prompts of the next window of the task stream, sampled and handed to
    /// the reward pool; given up on every rank ([`TrainError::Interrupted`]) when
    /// `stopping()` turns true on one.
    fn draw(&mut self, model: &Gpt, comm: &Comm, stopping: &dyn Fn() -> bool) -> Result<Drawn> {
        let s = self.settings;
        let per_rank = s.prompts / self.ranks;
        let rounds = if s.dynamic_sampling {
            1 + s.dynamic_rounds
        } else {
            1
        };
        // This rank's prompts of the batch's window of the stream: the first `per_rank`,
        // then replacements.
        let window = (s.prompts * rounds) as u64;
        let mine: Vec<usize> = (0..window)
            .filter(|j| (*j as usize) % self.ranks == self.rank)
            .map(|j| self.task_at(self.state.position + j))
            .collect();
        let pool_batch = self.pool.new_batch();
        let req = Request {
            tasks: &mine[..per_rank.min(mine.len())],
            samples: s.samples,
            sampling: self.sampling(0),
            first_group: 0,
            logprob_rows: s.sample_ahead.then_some(self.device_batch),
        };
        let sampled = self.sampler(model).sample(&req, pool_batch, stopping);
        if comm.any(sampled.is_none(), model.device())? {
            return Err(TrainError::Interrupted);
        }
        let (rollouts, generation) = sampled.ok_or(TrainError::Interrupted)?;
        self.state.position += window;
        self.state.batches += 1;
        Ok(Drawn {
            batch: self.state.batches - 1,
            rollouts,
            spare: mine.into_iter().skip(per_rank).collect(),
            pool_batch: Some(pool_batch),
            generation,
        })
    }

    fn sampler<'m>(&'m self, model: &'m Gpt) -> Sampler<'m> {
        Sampler {
            model,
            bpe: self.bpe,
            prompts: &self.prompts,
            pool: self.pool,
            decoder: &self.decoder,
        }
    }

    /// The sampling of replacement round `round` (0: the batch itself), seeded by the
    /// batches drawn so far, the round and the rank.
    fn sampling(&self, round: u64) -> Sampling {
        let s = self.settings;
        Sampling {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            max_new_tokens: s.max_new_tokens,
            seed: self.seed.wrapping_mul(1_000_003)
                ^ (self.state.batches << 20)
                ^ (round << 8)
                ^ self.rank as u64,
            ..Default::default()
        }
    }

    /// The drawn rollouts with their rewards (groups of equal rewards replaced with
    /// `rl.dynamic_sampling`) as the micro-batches to learn from; `generation`: where
    /// this step's sampling has spent its time so far.
    fn settle(
        &mut self,
        model: &Gpt,
        comm: &Comm,
        drawn: Drawn,
        mut generation: Generation,
    ) -> Result<()> {
        let s = self.settings;
        let per_rank = s.prompts / self.ranks;
        let Drawn {
            batch,
            mut rollouts,
            spare,
            pool_batch,
            ..
        } = drawn;
        let mut wait = collect(self.pool, self.bpe, pool_batch, &mut rollouts)?;
        let penalized = |r: &Rollout| {
            let base = r.rewarded.as_ref().map_or(f64::NAN, |x| x.reward);
            match s.overlong {
                Overlong::Penalty => {
                    let buffer = match s.overlong_buffer {
                        0 => s.max_new_tokens / 4,
                        b => b,
                    };
                    base + overlong_penalty(r.tokens.len(), s.max_new_tokens, buffer)
                }
                _ => base,
            }
        };
        let group_rewards = |rollouts: &[Rollout], g: usize| -> Vec<f64> {
            rollouts
                .iter()
                .filter(|r| r.group == g)
                .map(penalized)
                .collect()
        };
        // Dynamic sampling: groups with equal rewards give way to further prompts' groups.
        let mut spare = spare.into_iter();
        let mut replaced = 0;
        let mut round = 1;
        loop {
            let equal: Vec<usize> = (0..per_rank)
                .filter(|&g| advantages(&group_rewards(&rollouts, g), true).is_none())
                .collect();
            if !s.dynamic_sampling || equal.is_empty() {
                break;
            }
            let fresh: Vec<usize> = spare.by_ref().take(equal.len()).collect();
            if fresh.is_empty() {
                break;
            }
            let req = Request {
                tasks: &fresh,
                samples: s.samples,
                sampling: self.sampling(round),
                first_group: per_rank,
                logprob_rows: s.sample_ahead.then_some(self.device_batch),
            };
            let (more, g, w) = self.sampler(model).sample_and_judge(&req)?;
            generation.add(&g);
            wait += w;
            round += 1;
            // Each fresh group with something to teach takes the place of an equal one.
            for (k, &slot) in equal.iter().enumerate().take(fresh.len()) {
                let candidate: Vec<f64> = more
                    .iter()
                    .filter(|r| r.group == per_rank + k)
                    .map(penalized)
                    .collect();
                if advantages(&candidate, true).is_some() {
                    rollouts.retain(|r| r.group != slot);
                    rollouts.extend(
                        more.iter()
                            .filter(|r| r.group == per_rank + k)
                            .cloned()
                            .map(|mut r| {
                                r.group = slot;
                                r
                            }),
                    );
                    replaced += 1;
                }
            }
        }
        rollouts.sort_by_key(|r| r.group);

        let rewards: Vec<f64> = rollouts.iter().map(penalized).collect();
        let groups: Vec<usize> = rollouts.iter().map(|r| r.group).collect();
        let cut: Vec<bool> = rollouts.iter().map(|r| r.truncated).collect();
        let (learned, equal_groups) = learned_advantages(&groups, &rewards, &cut, s);
        let prompts: Vec<&[u32]> = rollouts
            .iter()
            .map(|r| self.prompts[r.task].as_slice())
            .collect();
        let completions: Vec<&[u32]> = rollouts.iter().map(|r| r.tokens.as_slice()).collect();
        // As many micro-batches as the step takes, of the completions it learns from.
        let count = update_passes(rollouts.len(), self.device_batch);
        let arranged = learning_rows(&groups, &prompts, &completions, &learned, count);
        let (mut batches, starts): (Vec<MicroBatch>, Vec<Vec<usize>>) = arranged
            .iter()
            .map(|rows| micro_batch(rows, &prompts, &completions, &learned, self.pad))
            .unzip();
        // Log-probabilities of the sampling policy (the ratio's old ones when several
        // updates learn from a batch whose sampling kept none) and of the reference. The
        // KL to the reference is the update's to compute: its forward pass has the
        // policy's.
        tch::no_grad(|| {
            for ((b, rows), starts) in batches.iter_mut().zip(&arranged).zip(&starts) {
                let d = b.to_device(model.device());
                let old = match s.sample_ahead {
                    true => Some(sampled_targets(b, rows, starts, &rollouts)),
                    false => (s.updates > 1).then(|| host_f32(&target_logprobs(model, &d).0)),
                };
                let reference = self.reference.as_ref().map(|m| target_logprobs(m, &d).0);
                let w = b.weights.as_mut().expect("made above");
                w.old_logprobs = old;
                w.ref_logprobs = reference.as_ref().map(host_f32);
            }
        });
        let check = BatchCheck {
            completions: rollouts.len(),
            truncated: rollouts.iter().filter(|r| r.truncated).count(),
            groups: per_rank,
            equal_groups,
            reward_min: rewards.iter().copied().fold(f64::INFINITY, f64::min),
            reward_max: rewards.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        };
        let whole = check.over_ranks(comm)?;
        self.warnings
            .extend(guard(&whole, s, &mut self.state.equal_batches)?);
        let mut tally = Tally::of(&rollouts, &rewards, &check, replaced);
        tally.sums.extend([
            ("generation_seconds".into(), generation.seconds()),
            ("prefill_seconds".into(), generation.prefill),
            ("decode_seconds".into(), generation.decode),
            ("sampled_logprob_seconds".into(), generation.logprobs),
            ("decode_steps".into(), generation.steps as f64),
            ("reward_wait_seconds".into(), wait),
            ("programs_judged".into(), self.pool.cached_programs() as f64),
        ]);
        self.tally = Some(tally);
        self.rollouts_since.0 += rollouts.len();
        let records: Vec<Value> = rollouts
            .iter()
            .zip(&rewards)
            .zip(&learned)
            .map(|((r, reward), advantage)| {
                json!({
                    "batch": batch, "task": self.tasks[r.task].id, "group": r.group,
                    "tokens": r.tokens.len(), "truncated": r.truncated, "reward": reward,
                    "advantage": advantage, "verdict": r.rewarded,
                    "completion": completion_text(self.bpe, &r.tokens),
                })
            })
            .collect();
        self.log.write(&records)?;
        self.state.current = batches;
        self.state.next = 0;
        self.state.updates_done = 0;
        Ok(())
    }
}

/// A micro-batch's targets' log-probabilities under the policy that sampled its
/// completions `rows`, whose targets begin at `starts` (0 outside the completions).
fn sampled_targets(
    b: &MicroBatch,
    rows: &[Vec<usize>],
    starts: &[usize],
    rollouts: &[Rollout],
) -> Vec<f32> {
    let mut out = vec![0f32; b.rows * (b.cols - 1)];
    for (&i, &start) in rows.iter().flatten().zip(starts) {
        let lp = rollouts[i].sampled_logprobs.as_deref().unwrap_or_default();
        out[start..start + lp.len()].copy_from_slice(lp);
    }
    out
}

fn host_f32(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.reshape([-1]).to_kind(Kind::Float).to_device(Device::Cpu))
        .expect("a float tensor")
}

/// Every completion of the rollout batches a rank made, a JSON line each: its batch, task,
/// group, reward and advantage (null: not learned from), the verdict's parts and the text
/// (`rollouts.jsonl`; rank r > 0: `rollouts-rank{r}.jsonl`).
struct RolloutLog {
    path: PathBuf,
    /// Records of the batches before this one are kept from the run resumed.
    keep_before: u64,
    file: Option<File>,
}

impl RolloutLog {
    fn write(&mut self, records: &[Value]) -> Result<()> {
        let keep_before = self.keep_before;
        let file = match &mut self.file {
            Some(f) => f,
            None => self
                .file
                .insert(metrics::reopen_records(&self.path, "batch", |b| {
                    b < keep_before
                })?),
        };
        let text: String = records.iter().map(|r| format!("{r}\n")).collect();
        file.write_all(text.as_bytes())
            .and_then(|_| file.flush())
            .map_err(|e| TrainError::io(&self.path, e))
    }
}

/// One rank's share of the figures of the rollout batch it settled last: what adds up
/// over the ranks (counts and sums over its rollouts, its seconds), by name in the same
/// order on every rank, and its longest completion ([`RolloutSource::figures`]).
#[derive(Debug, Default)]
struct Tally {
    sums: Vec<(String, f64)>,
    longest: f64,
}

impl Tally {
    fn of(rollouts: &[Rollout], rewards: &[f64], check: &BatchCheck, replaced: usize) -> Tally {
        let judged: Vec<&Rewarded> = rollouts
            .iter()
            .filter_map(|r| r.rewarded.as_ref())
            .collect();
        let count = |f: &dyn Fn(&Rewarded) -> bool| judged.iter().filter(|r| f(r)).count() as f64;
        let mut sums: Vec<(String, f64)> = vec![
            ("rollouts".into(), rollouts.len() as f64),
            ("reward".into(), rewards.iter().sum()),
            ("reward_squares".into(), rewards.iter().map(|r| r * r).sum()),
        ];
        for (k, name) in Rewarded::PARTS.iter().enumerate() {
            let part = judged.iter().map(|r| r.parts()[k].1).sum();
            sums.push((format!("reward_{name}"), part));
        }
        sums.extend([
            ("compiled".into(), count(&|r| r.judged.compiled)),
            (
                "warning_free".into(),
                count(&|r| r.judged.compiled && r.judged.warnings == 0),
            ),
            ("passed".into(), count(&|r| r.judged.passed)),
            ("timed_out".into(), count(&|r| r.judged.timed_out())),
            ("sanitizer".into(), count(&|r| r.judged.sanitizer_fired())),
            ("cached".into(), count(&|r| r.cached)),
            (
                "tokens".into(),
                rollouts.iter().map(|r| r.tokens.len() as f64).sum(),
            ),
            ("truncated".into(), check.truncated as f64),
            ("groups".into(), check.groups as f64),
            ("equal_groups".into(), check.equal_groups as f64),
            ("groups_replaced".into(), replaced as f64),
        ]);
        let longest = rollouts.iter().map(|r| r.tokens.len()).max().unwrap_or(0);
        Tally {
            sums,
            longest: longest as f64,
        }
    }
}

impl BatchSource for RolloutSource<'_> {
    fn next_batch(&mut self, model: &Gpt, comm: &Comm) -> Result<MicroBatch> {
        self.next_batch_unless(model, comm, &|| false)
    }

    /// A stop asked for during the rollouts of a step's batch gives them up (the
    /// checkpoint holds the state before them, which a resumed run samples from again).
    fn next_batch_unless(
        &mut self,
        model: &Gpt,
        comm: &Comm,
        stopping: &dyn Fn() -> bool,
    ) -> Result<MicroBatch> {
        if self.state.next == self.state.current.len() {
            self.state.updates_done += 1;
            if self.state.current.is_empty() || self.state.updates_done >= self.settings.updates {
                // A batch with nothing to learn on any rank is replaced (the guards see
                // each one); every rank draws again, so they keep to one stream.
                let mut empty = 0;
                self.roll_out(model, comm, stopping)?;
                let learns = |s: &Self| s.state.current.iter().any(|b| b.supervised_count() > 0);
                while !comm.any(learns(self), model.device())? {
                    empty += 1;
                    if empty >= self.settings.equal_reward_batches {
                        return Err(TrainError::Guard(format!(
                            "{empty} rollout batches in a row had nothing to learn (every group's rewards equal, or every completion cut and masked; rl.equal_reward_batches = {})",
                            self.settings.equal_reward_batches
                        )));
                    }
                    self.warnings
                        .push("a rollout batch had nothing to learn: another one is drawn".into());
                    self.roll_out(model, comm, stopping)?;
                }
            } else {
                self.state.next = 0;
            }
        }
        let b = self.state.current[self.state.next].clone();
        self.state.next += 1;
        Ok(b)
    }

    fn state(&self) -> Value {
        serde_json::to_value(&self.state).expect("rollout state as JSON")
    }

    fn restore(&mut self, state: &Value, own: bool) -> Result<()> {
        self.state = serde_json::from_value(state.clone())
            .map_err(|e| TrainError::Config(format!("rollout state: {e}")))?;
        self.log.keep_before = match &self.state.pending {
            Some(drawn) => drawn.batch,
            None => self.state.batches,
        };
        // Rank 0's rollouts are not this rank's share of the batch (the run had another
        // number of ranks): the run goes on from a fresh rollout batch.
        if !own {
            self.state.current.clear();
            self.state.next = 0;
            self.state.updates_done = 0;
            self.state.pending = None;
        }
        Ok(())
    }

    fn dense(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        format!(
            "the rollouts ({} tasks of {})",
            self.tasks.len(),
            self.settings
                .tasks
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    fn warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    fn figures(&mut self, comm: &Comm) -> Result<Map<String, Value>> {
        // Every rank settles its batch at the same steps, so all of them take part.
        let Some(tally) = self.tally.take() else {
            return Ok(Map::new());
        };
        let (made, since) = std::mem::replace(&mut self.rollouts_since, (0, Instant::now()));
        let seconds = since.elapsed().as_secs_f64();
        let (names, values): (Vec<String>, Vec<f64>) = tally
            .sums
            .into_iter()
            .chain([("rollouts_made".to_string(), made as f64)])
            .collect();
        let (totals, longest) = comm.sums_and_maxima(&values, &[tally.longest])?;
        let total: HashMap<&str, f64> = names.iter().map(String::as_str).zip(totals).collect();
        let n = total["rollouts"].max(1.0);
        let per_rank = |k: &str| total[k] / comm.size() as f64;
        let mean = total["reward"] / n;
        let mut f = Map::new();
        let mut put = |k: &str, v: Value| f.insert(k.into(), v);
        put("rollouts", (total["rollouts"] as u64).into());
        put("reward_mean", mean.into());
        let variance = total["reward_squares"] / n - mean * mean;
        put("reward_std", variance.max(0.0).sqrt().into());
        for name in Rewarded::PARTS {
            let k = format!("reward_{name}");
            put(&k, (total[k.as_str()] / n).into());
        }
        for (figure, counted) in [
            ("compile_rate", "compiled"),
            ("warning_free_rate", "warning_free"),
            ("test_pass_rate", "passed"),
            ("timeout_rate", "timed_out"),
            ("sanitizer_rate", "sanitizer"),
            ("reward_cache_share", "cached"),
            ("completion_tokens_mean", "tokens"),
            ("truncated_share", "truncated"),
        ] {
            put(figure, (total[counted] / n).into());
        }
        put("completion_tokens_max", (longest[0] as u64).into());
        put(
            "zero_std_groups",
            (total["equal_groups"] / total["groups"].max(1.0)).into(),
        );
        put("groups_replaced", (total["groups_replaced"] as u64).into());
        put("programs_judged", (total["programs_judged"] as u64).into());
        // Where a rank's time went, on average over the ranks.
        for k in [
            "generation_seconds",
            "prefill_seconds",
            "decode_seconds",
            "sampled_logprob_seconds",
            "reward_wait_seconds",
        ] {
            put(k, per_rank(k).into());
        }
        put(
            "decode_steps",
            (per_rank("decode_steps").round() as u64).into(),
        );
        // Rollouts of every rank per second of everything since the last batch's
        // figures: sampling, rewards and the updates.
        put("rollouts_s", (total["rollouts_made"] / seconds).into());
        put(
            "reward_wait_share",
            (per_rank("reward_wait_seconds") / seconds).into(),
        );
        Ok(f)
    }
}

/// Greedy answers to held-out tasks: pass@1, compile rate and mean reward.
struct RlEval<'a> {
    tasks: &'a [Task],
    prompts: Vec<Vec<u32>>,
    bpe: &'a Bpe,
    pool: &'a RewardPool,
    max_new_tokens: usize,
    samples: usize,
}

impl Evaluation for RlEval<'_> {
    fn evaluate(
        &mut self,
        step: u64,
        model: &Gpt,
        comm: &Comm,
        report: &mut dyn FnMut(Event),
    ) -> Result<Map<String, Value>> {
        let mut figures = Map::new();
        if self.tasks.is_empty() || comm.rank() != 0 {
            return Ok(figures);
        }
        let greedy = Sampling {
            max_new_tokens: self.max_new_tokens,
            ..Default::default()
        };
        let all: Vec<usize> = (0..self.tasks.len()).collect();
        // Evaluations are rare: their decoder is not kept.
        let decoder = RefCell::new(None);
        let sampler = Sampler {
            model,
            bpe: self.bpe,
            prompts: &self.prompts,
            pool: self.pool,
            decoder: &decoder,
        };
        let req = Request {
            tasks: &all,
            samples: 1,
            sampling: greedy,
            first_group: 0,
            logprob_rows: None,
        };
        let (answers, _, _) = sampler.sample_and_judge(&req)?;
        let n = answers.len() as f64;
        let judged: Vec<&Rewarded> = answers.iter().filter_map(|a| a.rewarded.as_ref()).collect();
        let share =
            |f: &dyn Fn(&Rewarded) -> bool| judged.iter().filter(|r| f(r)).count() as f64 / n;
        figures.insert("val_pass_at_1".into(), share(&|r| r.judged.passed).into());
        figures.insert(
            "val_compile_rate".into(),
            share(&|r| r.judged.compiled).into(),
        );
        figures.insert(
            "val_reward".into(),
            (judged.iter().map(|r| r.reward).sum::<f64>() / n).into(),
        );
        let text = |ids: &[u32]| String::from_utf8_lossy(&self.bpe.decode(ids)).into_owned();
        for a in answers.iter().take(self.samples) {
            report(Event::Sample {
                step,
                prompt: text(&self.prompts[a.task]),
                completion: text(&a.tokens),
            });
        }
        Ok(figures)
    }
}

/// The runnable tasks of `rl.tasks` whose prompt leaves `rl.max_new_tokens` of a
/// `context`-token model, with their prompts: the train split's, and at most `eval.tasks`
/// of the test split's, spread over it.
struct TaskSplit {
    train: Vec<(Task, Vec<u32>)>,
    held_out: Vec<(Task, Vec<u32>)>,
    not_runnable: usize,
    too_long: usize,
}

fn split_tasks(cfg: &RlConfig, bpe: &Bpe, layout: Layout, context: usize) -> Result<TaskSplit> {
    let s = &cfg.rl;
    let room = context.saturating_sub(s.max_new_tokens);
    let (mut train, mut held_out) = (Vec::new(), Vec::new());
    let (mut not_runnable, mut too_long) = (0, 0);
    // The shortest prompt of a runnable train-split task, for the refusal's advice.
    let mut shortest = usize::MAX;
    for t in cxxlm_tasks::bugs::read_tasks(&s.tasks)? {
        let prompt = chat::prompt(bpe, &[Message::new(Role::User, t.input.as_str())], layout);
        if t.check.is_some() && t.split == "train" {
            shortest = shortest.min(prompt.len());
        }
        if t.check.is_none() {
            not_runnable += 1;
        } else if prompt.len() > room {
            too_long += 1;
        } else if t.split == "train" {
            train.push((t, prompt));
        } else if t.split == "test" {
            held_out.push((t, prompt));
        }
    }
    if train.is_empty() {
        let advice = match context.checked_sub(shortest) {
            Some(most) if most > 0 => {
                format!("; its shortest prompt is {shortest} tokens: rl.max_new_tokens = {most} at most")
            }
            _ => String::new(),
        };
        return Err(TrainError::Config(format!(
            "no runnable train-split task of {} leaves rl.max_new_tokens = {} of the model's {context} tokens ({not_runnable} not runnable, {too_long} too long){advice}",
            s.tasks.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
            s.max_new_tokens,
        )));
    }
    if cfg.eval.tasks < held_out.len() {
        let n = held_out.len();
        held_out = (0..cfg.eval.tasks)
            .map(|i| held_out[i * n / cfg.eval.tasks].clone())
            .collect();
    }
    Ok(TaskSplit {
        train,
        held_out,
        not_runnable,
        too_long,
    })
}

/// The micro-batches of an update over a rank's `rollouts` completions: as many as fill
/// `device_batch` rows each (what `learning_rows` arranges them in).
fn update_passes(rollouts: usize, device_batch: usize) -> usize {
    rollouts.div_ceil(device_batch.max(1))
}

/// Refuses a run without tasks or whose rollout batch does not divide over its ranks.
fn check_spread(s: &RlSettings, ranks: usize) -> Result<()> {
    if s.tasks.is_empty() {
        return Err(TrainError::Config(
            "no tasks: give rl.tasks (--tasks DIR ...), outputs of `cxxlm tasks bugs`".into(),
        ));
    }
    if !s.prompts.is_multiple_of(ranks) {
        return Err(TrainError::Config(format!(
            "rl.prompts = {} must be a multiple of the {ranks} ranks",
            s.prompts
        )));
    }
    Ok(())
}

/// The memory each of `ranks` ranks needs for RL as configured (`rl.tokenizer` set): the
/// update's on autograd, its micro-batches' rows each the longest prompt and every sample
/// of it at full length, with their attention mask; the frozen reference (with
/// `rl.kl_coef`); the sampler's weights and cache of a rank's rollouts; and the
/// evaluation's sampler where it outgrows the update's activations, which it replaces.
/// `None` until the model to train has a checkpoint.
pub fn memory_plan(cfg: &RlConfig, ranks: usize) -> Result<Option<MemoryPlan>> {
    let s = &cfg.rl;
    check_spread(s, ranks)?;
    // A run stopped before its first checkpoint is not one yet.
    let Ok(init_dir) = checkpoint::resolve(&cfg.init) else {
        return Ok(None);
    };
    let state = checkpoint::read_state(&init_dir)?;
    let bpe =
        checkpoint::trained_tokenizer(s.tokenizer.as_deref(), "rl.tokenizer", &init_dir, &state)?;
    let split = split_tasks(
        cfg,
        &bpe,
        checkpoint::layout(&init_dir).0,
        state.model.seq_len,
    )?;
    let longest_prompt =
        |tasks: &[(Task, Vec<u32>)]| tasks.iter().map(|(_, p)| p.len()).max().unwrap_or(0);
    let longest = |tasks: &[(Task, Vec<u32>)]| {
        (longest_prompt(tasks) + s.max_new_tokens).min(state.model.seq_len)
    };
    // The update's micro-batches as `learning_rows` arranges them: as many as a rank's
    // rollouts fill `train.device_batch` rows, each an equal share of the groups, a row
    // for each: the prompt, then every sample after a copy of its last token.
    let per_rank = s.prompts / ranks;
    let micro_batches = update_passes(per_rank * s.samples, cfg.train.device_batch);
    let update = ModelConfig {
        seq_len: longest_prompt(&split.train).saturating_sub(1)
            + s.samples * (1 + s.max_new_tokens),
        ..state.model.clone()
    };
    let run = RunConfig {
        device_batch: per_rank.div_ceil(micro_batches.max(1)).max(1),
        ..cfg.train.clone()
    };
    let mut plan = memory::plan(&update, &run, &cfg.optim, ranks, false);
    plan.parts.push((
        "attention mask",
        Packing::bias_bytes(run.device_batch, update.seq_len, Kind::BFloat16),
    ));
    // At every completion token of a micro-batch, vocabulary-wide: the head's bf16 logits,
    // their log-softmax in fp32 (kept for the backward) and the entropy's two fp32
    // temporaries (`target_logprobs`); the update's peak, within 1.2% of the allocator's
    // at 256 and 1,024 new tokens on d12 (BENCHMARKS.md).
    let targets = run.device_batch * s.samples * s.max_new_tokens;
    plan.parts.push((
        "log-softmax",
        (targets * state.model.vocab_size * (2 + 3 * 4)) as u64,
    ));
    if s.kl_coef > 0.0 {
        plan.parts
            .push(("reference", memory::reference_bytes(&state.model)));
    }
    plan.parts.push((
        "sampler",
        memory::sampler_bytes(&state.model, per_rank * s.samples, longest(&split.train)),
    ));
    let freed = plan.part("activations") + plan.part("workspace");
    let evaluation =
        memory::sampler_bytes(&state.model, split.held_out.len(), longest(&split.held_out));
    if !split.held_out.is_empty() && evaluation > freed {
        plan.parts.push(("evaluation", evaluation - freed));
    }
    Ok(Some(plan))
}

/// Trains with RL as configured (`rl.tokenizer` set), on the shared
/// [`trainer`](crate::trainer) loop; `resume` and `stop` as for
/// [`pretrain`](crate::pretrain::pretrain).
pub fn rl(
    cfg: &RlConfig,
    resume: bool,
    report: &mut dyn FnMut(Event),
    stop: &dyn Fn(u64) -> bool,
) -> Result<TrainerState> {
    cfg.validate()?;
    let s = &cfg.rl;
    let (comm, dev) = trainer::connect(&cfg.train.device)?;
    let (rank, ranks) = (comm.rank(), comm.size());
    check_spread(s, ranks)?;
    let init_dir = checkpoint::resolve(&cfg.init)?;
    let init = checkpoint::load_weights(&init_dir)?;
    let model_config = init.state.model.clone();
    let bpe = checkpoint::trained_tokenizer(
        s.tokenizer.as_deref(),
        "rl.tokenizer",
        &init_dir,
        &init.state,
    )?;
    let (layout, said) = checkpoint::layout(&init_dir);
    report(Event::Info(said));
    let split = split_tasks(cfg, &bpe, layout, model_config.seq_len)?;
    report(Event::Info(format!(
        "RL tasks: {} to train on, {} held out; skipped {} not runnable, {} whose prompt leaves fewer than rl.max_new_tokens = {} of the context",
        split.train.len(),
        split.held_out.len(),
        split.not_runnable,
        split.too_long,
        s.max_new_tokens
    )));
    let (train, held_out) = (split.train, split.held_out);
    let (train_tasks, train_prompts): (Vec<Task>, Vec<Vec<u32>>) = train.into_iter().unzip();
    let (eval_tasks, eval_prompts): (Vec<Task>, Vec<Vec<u32>>) = held_out.into_iter().unzip();
    let train_tasks = Arc::new(train_tasks);
    let eval_tasks = Arc::new(eval_tasks);
    let pool = RewardPool::new(train_tasks.clone(), s.reward_workers)?;
    let eval_pool = RewardPool::new(eval_tasks.clone(), s.reward_workers)?;

    let batches_per_pass = train_tasks.len().div_ceil(s.prompts) as u64;
    let steps = match cfg.train.steps {
        0 => batches_per_pass * s.updates as u64,
        n => n,
    };
    let rollouts_per_rank = s.prompts / ranks * s.samples;
    let grad_accum = update_passes(rollouts_per_rank, cfg.train.device_batch);
    let step_tokens = s.prompts * s.samples * s.max_new_tokens;
    let load = |seed: u64| -> Result<Gpt> {
        let mut m = Gpt::new(model_config.clone(), dev, seed)?;
        m.load(&init.model)?;
        Ok(m)
    };
    let model = load(cfg.train.seed)?;
    let reference = match s.kl_coef > 0.0 {
        true => Some(load(cfg.train.seed)?),
        false => None,
    };
    let pad = bpe.special_id("<|pad|>").unwrap_or(0);
    let identity = json!({
        "init": init_dir,
        "init_step": init.state.step,
        "reference": if s.kl_coef > 0.0 { json!({"init": init_dir, "step": init.state.step}) } else { Value::Null },
        "tasks": s.tasks,
        "train_tasks": train_tasks.len(),
        "rl": {
            "prompts": s.prompts, "samples": s.samples, "temperature": s.temperature,
            "top_k": s.top_k, "top_p": s.top_p, "max_new_tokens": s.max_new_tokens,
            "updates": s.updates, "sample_ahead": s.sample_ahead, "clip_low": s.clip_low, "clip_high": s.clip_high,
            "kl_coef": s.kl_coef, "normalization": s.normalization,
            "scale_by_std": s.scale_by_std, "dynamic_sampling": s.dynamic_sampling,
            "dynamic_rounds": s.dynamic_rounds, "overlong": s.overlong,
            "overlong_buffer": s.overlong_buffer,
        },
    });
    let mut source = RolloutSource {
        settings: s,
        tasks: &train_tasks,
        prompts: train_prompts,
        bpe: &bpe,
        pool: &pool,
        reference,
        device_batch: cfg.train.device_batch,
        pad,
        seed: cfg.train.seed,
        rank,
        ranks,
        state: RolloutState::default(),
        decoder: RefCell::new(None),
        tally: None,
        log: RolloutLog {
            path: cfg.out.join(match rank {
                0 => "rollouts.jsonl".to_string(),
                r => format!("rollouts-rank{r}.jsonl"),
            }),
            keep_before: 0,
            file: None,
        },
        warnings: Vec::new(),
        rollouts_since: (0, Instant::now()),
    };
    let mut evaluation = RlEval {
        tasks: &eval_tasks,
        prompts: eval_prompts,
        bpe: &bpe,
        pool: &eval_pool,
        max_new_tokens: s.max_new_tokens,
        samples: cfg.eval.samples,
    };
    let constant = match s.normalization {
        Normalization::Token => None,
        Normalization::Constant => Some(step_tokens as f64),
    };
    let mut loss = Grpo::new(s.clip_low, s.clip_high, s.kl_coef, constant);
    loss.max_kl = s.max_kl;
    let stage = Stage::new(
        cfg.common(),
        Parts {
            model,
            backward: Backward::Autograd("the GRPO loss"),
            source: &mut source,
            loss: &mut loss,
            evaluation: &mut evaluation,
            steps,
            grad_accum,
            step_tokens,
            eval_every: cfg.eval.every,
            tokenizer_sha256: init.state.tokenizer_sha256.clone(),
            identity,
        },
        &comm,
    )?;
    trainer::train(stage, comm, resume, report, stop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::step_gradients;
    use crate::trainer::tests::{take_grads, tiny_model, Given};

    fn model() -> Gpt {
        tiny_model(32, 11)
    }

    /// Micro-batches of `device_batch` rows in order, each a prompt and one completion
    /// (padded with `pad`), the completion's targets learned with its advantage where it
    /// has one.
    fn micro_batches(
        prompts: &[&[u32]],
        completions: &[&[u32]],
        advantages: &[Option<f64>],
        device_batch: usize,
        pad: u32,
    ) -> Vec<MicroBatch> {
        let alone: Vec<Vec<usize>> = (0..prompts.len()).map(|i| vec![i]).collect();
        alone
            .chunks(device_batch.max(1))
            .map(|rows| micro_batch(rows, prompts, completions, advantages, pad).0)
            .collect()
    }

    fn max_difference(a: &[Tensor], b: &[Tensor]) -> (f64, f64) {
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs().max().double_value(&[]))
            .fold(0.0, f64::max);
        let size = b
            .iter()
            .map(|y| y.abs().max().double_value(&[]))
            .fold(0.0, f64::max);
        (diff, size)
    }

    /// Two prompts with three completions each, advantages of both signs.
    fn rollout_batch() -> MicroBatch {
        let prompts: Vec<Vec<u32>> = vec![vec![1, 17, 29, 5], vec![1, 240, 9]];
        let completions: Vec<Vec<u32>> = vec![
            vec![33, 34, 35, 36, 2],
            vec![33, 81, 2],
            vec![90, 91, 92, 93, 94, 95],
            vec![7, 8, 9, 2],
            vec![7, 100],
            vec![150, 151, 152, 2],
        ];
        let p: Vec<&[u32]> = (0..6).map(|i| prompts[i / 3].as_slice()).collect();
        let c: Vec<&[u32]> = completions.iter().map(Vec::as_slice).collect();
        let a = [0.9, -0.3, -0.6, 1.2, -1.0, -0.2].map(Some);
        micro_batches(&p, &c, &a, 6, 299).remove(0)
    }

    /// The loss of `batch` per target written out: log-probabilities picked one by one
    /// from the log-softmax of each position, PPO's clipped objective as its cases (the
    /// ratio times the advantage, or the clipped constant where the clip binds), the k3
    /// term; summed and divided by `normalizer`, then backward.
    #[allow(clippy::assign_op_pattern)]
    fn direct(m: &Gpt, batch: &MicroBatch, clip: (f64, f64), kl_coef: f64, normalizer: f64) -> f64 {
        // A row of one completion holds its prompt and it, as plain causal text does.
        let d = batch.to_device(Device::Cpu);
        let logits = m.logits_with_grad(&d.inputs, None, None);
        let w = batch.weights.as_ref().unwrap();
        let t = batch.cols - 1;
        let mut total = Tensor::zeros([], (Kind::Float, Device::Cpu));
        for row in 0..batch.rows {
            for k in 0..t {
                let i = row * t + k;
                if !batch.supervised.as_ref().unwrap()[i] {
                    continue;
                }
                let y = batch.tokens[row * batch.cols + k + 1] as i64;
                let lp = logits
                    .get(row as i64)
                    .get(k as i64)
                    .log_softmax(-1, Kind::Float)
                    .get(y);
                let old = match &w.old_logprobs {
                    Some(o) => Tensor::from(o[i]),
                    None => lp.detach(),
                };
                let ratio = (&lp - old).exp();
                let r = ratio.double_value(&[]);
                let a = w.advantages[i] as f64;
                let term = if a >= 0.0 && r > 1.0 + clip.1 {
                    Tensor::from((-(1.0 + clip.1) * a) as f32)
                } else if a < 0.0 && r < 1.0 - clip.0 {
                    Tensor::from((-(1.0 - clip.0) * a) as f32)
                } else {
                    -&ratio * a
                };
                total = total + term;
                if kl_coef > 0.0 {
                    let reference = Tensor::from(w.ref_logprobs.as_ref().unwrap()[i]);
                    let dd = reference - &lp;
                    total = total + (dd.exp() - &dd - 1.0) * kl_coef;
                }
            }
        }
        let loss = total / normalizer;
        loss.backward();
        loss.double_value(&[])
    }

    #[test]
    fn the_grpo_loss_and_its_gradient_match_a_direct_computation() {
        let m = model();
        let clip = (0.2, 0.28);
        let base = rollout_batch();
        let current =
            tch::no_grad(|| host_f32(&target_logprobs(&m, &base.to_device(Device::Cpu)).0));
        let n = base.supervised_count() as f64;
        // Old log-probabilities off by up to +-0.6 (ratios from 0.55 to 1.8: clipped
        // below, above, and not at all), a reference off by other amounts.
        let shifted = |scale: f32, phase: usize| -> Vec<f32> {
            current
                .iter()
                .enumerate()
                .map(|(i, &c)| c + scale * (((i + phase) % 5) as f32 - 2.0) / 2.0)
                .collect()
        };
        for (clipped, kl_coef) in [(false, 0.0), (false, 0.05), (true, 0.0), (true, 0.05)] {
            let mut batch = base.clone();
            let w = batch.weights.as_mut().unwrap();
            w.old_logprobs = clipped.then(|| shifted(0.6, 0));
            w.ref_logprobs = (kl_coef > 0.0).then(|| shifted(0.4, 2));
            for constant in [None, Some(100.0)] {
                let mut grpo = Grpo::new(clip.0, clip.1, kl_coef, constant);
                let normalizer = grpo.normalizer(n);
                let sum = grpo
                    .forward_backward(&m, None, &batch.to_device(Device::Cpu), 1.0 / normalizer)
                    .double_value(&[]);
                let g_loss = take_grads(&m);
                let want = direct(&m, &batch, clip, kl_coef, normalizer);
                let g_direct = take_grads(&m);
                let what = format!("clipped {clipped}, kl {kl_coef}, constant {constant:?}");
                assert!(
                    (sum / normalizer - want).abs() < 1e-5 * want.abs().max(1e-3),
                    "{what}: {} against {want}",
                    sum / normalizer
                );
                let (diff, size) = max_difference(&g_loss, &g_direct);
                assert!(
                    size > 0.0 && diff <= 1e-4 * size,
                    "{what}: {diff} of {size}"
                );
                let f = grpo.figures(&Comm::single()).unwrap();
                let clip_shares =
                    f["clip_low_share"].as_f64().unwrap() + f["clip_high_share"].as_f64().unwrap();
                assert_eq!(clip_shares > 0.0, clipped, "{what}: {f:?}");
                assert_eq!(f.contains_key("kl"), kl_coef > 0.0);
            }
        }
    }

    #[test]
    fn sampled_log_probabilities_are_each_rows_own_in_passes_of_any_size() {
        let m = model();
        let prompts: Vec<Vec<u32>> = (0..5).map(|i| (1..4 + 3 * i).collect()).collect();
        let completions: Vec<Vec<u32>> = (0..5).map(|i| (20..22 + (7 * i) % 5).collect()).collect();
        let p: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let c: Vec<&[u32]> = completions.iter().map(Vec::as_slice).collect();
        let alone = completion_logprobs(&m, &p, &c, 1);
        for (row, lp) in alone.iter().enumerate() {
            assert_eq!(lp.len(), c[row].len());
        }
        for rows in [2, 5] {
            let together = completion_logprobs(&m, &p, &c, rows);
            for (a, b) in alone.iter().flatten().zip(together.iter().flatten()) {
                assert!((a - b).abs() < 1e-4, "{rows} rows a pass: {a} vs {b}");
            }
        }
    }

    #[test]
    fn with_one_update_per_batch_the_ratio_is_exactly_one() {
        let m = model();
        let batch = rollout_batch();
        let d = batch.to_device(Device::Cpu);
        // On-policy (no old log-probabilities): the current ones, detached.
        let mut grpo = Grpo::new(0.2, 0.2, 0.0, None);
        let _ = grpo.forward_backward(&m, None, &d, 1.0);
        let f = grpo.figures(&Comm::single()).unwrap();
        assert_eq!(f["ratio_max_distance"].as_f64(), Some(0.0));
        assert_eq!(f["clip_low_share"].as_f64(), Some(0.0));
        // The first update of several: old log-probabilities taken at the same weights.
        let mut first = batch.clone();
        first.weights.as_mut().unwrap().old_logprobs =
            Some(tch::no_grad(|| host_f32(&target_logprobs(&m, &d).0)));
        let _ = grpo.forward_backward(&m, None, &first.to_device(Device::Cpu), 1.0);
        assert_eq!(
            grpo.figures(&Comm::single()).unwrap()["ratio_max_distance"].as_f64(),
            Some(0.0)
        );
        take_grads(&m);
    }

    #[test]
    fn groups_of_equal_rewards_contribute_nothing() {
        let m = model();
        let settings = RlSettings::default();
        let prompts: Vec<Vec<u32>> = vec![vec![1, 4, 5], vec![1, 6], vec![1, 7, 8, 9]];
        let completions: Vec<Vec<u32>> = (0..9)
            .map(|i| {
                (0..3 + i % 4)
                    .map(|k| (20 + i * 13 + k * 7) as u32)
                    .collect()
            })
            .collect();
        // With `arranged`, the micro-batches hold only what is learned, by length, each
        // group's completions a row after their shared prompt.
        let step = |groups: &[usize], rewards: &[f64], arranged: bool| {
            let members: Vec<usize> = (0..9).filter(|i| groups.contains(&(i / 3))).collect();
            let g: Vec<usize> = members.iter().map(|i| i / 3).collect();
            let r: Vec<f64> = members.iter().map(|&i| rewards[i]).collect();
            let (learned, equal) = learned_advantages(&g, &r, &vec![false; r.len()], &settings);
            let p: Vec<&[u32]> = members.iter().map(|i| prompts[i / 3].as_slice()).collect();
            let c: Vec<&[u32]> = members.iter().map(|&i| completions[i].as_slice()).collect();
            let batches = match arranged {
                false => micro_batches(&p, &c, &learned, 4, 299),
                true => learning_rows(&g, &p, &c, &learned, members.len().div_ceil(4))
                    .iter()
                    .map(|rows| micro_batch(rows, &p, &c, &learned, 299).0)
                    .collect(),
            };
            let n = batches.len();
            let mut source = Given(batches.into());
            let first = source.next_batch(&m, &Comm::single()).unwrap();
            let mut grpo = Grpo::new(0.2, 0.2, 0.0, None);
            let g = step_gradients(
                &m,
                None,
                &mut grpo,
                &mut source,
                first,
                n,
                0,
                &Comm::single(),
            )
            .unwrap();
            let loss: f64 = g.micro_losses.iter().map(|l| l.double_value(&[])).sum();
            (loss / g.normalizer, take_grads(&m), equal)
        };
        // Group 1's rewards are all equal.
        let rewards = [1.0, -1.0, 7.0, 1.5, 1.5, 1.5, -1.0, 6.5, 1.0];
        let (alone, g_alone, equal_alone) = step(&[0, 2], &rewards, false);
        let (with, g_with, equal_with) = step(&[0, 1, 2], &rewards, false);
        let (arranged, g_arranged, _) = step(&[0, 1, 2], &rewards, true);
        assert_eq!((equal_alone, equal_with), (0, 1));
        // The same sums, in other micro-batches (so up to rounding).
        for (loss, grads) in [(with, &g_with), (arranged, &g_arranged)] {
            assert!((alone - loss).abs() < 1e-6 * alone.abs(), "{alone} {loss}");
            let (diff, size) = max_difference(&g_alone, grads);
            assert!(size > 0.0 && diff < 1e-6 * size, "{diff} of {size}");
        }
        assert_eq!(advantages(&[0.1, 0.1, 0.1], true), None);
        assert_eq!(advantages(&[1.0, 3.0], false), Some(vec![-1.0, 1.0]));
    }

    #[test]
    fn micro_batches_hold_what_is_learned_by_length() {
        // One-token prompts: a completion's row is 1 + its tokens, these lengths.
        let lengths = [5, 3, 9, 4, 7, 2, 8, 6];
        let ids: Vec<Vec<u32>> = lengths.iter().map(|&n| vec![7; n - 1]).collect();
        let prompts: Vec<&[u32]> = vec![&[1]; 8];
        let completions: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let a = |learned: &[usize]| -> Vec<Option<f64>> {
            (0..8)
                .map(|i| learned.contains(&i).then_some(1.0))
                .collect()
        };
        let alone: Vec<usize> = (0..8).collect();
        let rows = |groups: &[usize], learned: &[usize], count: usize| {
            learning_rows(groups, &prompts, &completions, &a(learned), count)
        };
        // Sorted by length (4, 5, 6, 8, 9), shared as evenly as can be.
        assert_eq!(
            rows(&alone, &[0, 2, 3, 6, 7], 3),
            vec![
                vec![vec![3]],
                vec![vec![0], vec![7]],
                vec![vec![6], vec![2]]
            ]
        );
        // A group's learned completions share a row: 5 + 3, then 9, then 8 + 6.
        assert_eq!(
            rows(&[0, 0, 1, 1, 2, 2, 3, 3], &[0, 1, 2, 6, 7], 2),
            vec![vec![vec![0, 1]], vec![vec![2], vec![6, 7]]]
        );
        // Two learned rows for four micro-batches: the others hold the shortest row that
        // teaches nothing (5), which their targets do not learn from.
        let spread = rows(&alone, &[2, 3], 4);
        assert_eq!(
            spread,
            [vec![vec![5]], vec![vec![3]], vec![vec![5]], vec![vec![2]]]
        );
        let (b, _) = micro_batch(&spread[0], &prompts, &completions, &a(&[2, 3]), 0);
        assert_eq!((b.rows, b.supervised_count()), (1, 0));
        // A row: the prompt but its last token, then each completion after that token.
        let prompt: &[u32] = &[1, 40, 41];
        let two: [&[u32]; 2] = [&[50, 51], &[60]];
        let (b, starts) = micro_batch(&[vec![0, 1]], &[prompt; 2], &two, &[Some(1.0); 2], 0);
        assert_eq!(b.tokens, [1, 40, 41, 50, 51, 41, 60]);
        assert_eq!(starts, [2, 5]);
        assert_eq!(
            b.supervised.as_deref(),
            Some(&[false, false, true, true, false, true][..])
        );
        assert_eq!(b.examples, Some(vec![vec![2, 3, 2]]));
    }

    #[test]
    fn truncated_completions_are_masked_or_penalized() {
        let mut settings = RlSettings::default();
        let (learned, _) = learned_advantages(
            &[0, 0, 0],
            &[1.0, -1.0, 2.0],
            &[false, true, false],
            &settings,
        );
        assert!(learned[0].is_some() && learned[1].is_none() && learned[2].is_some());
        settings.overlong = Overlong::Keep;
        let (learned, _) = learned_advantages(
            &[0, 0, 0],
            &[1.0, -1.0, 2.0],
            &[false, true, false],
            &settings,
        );
        assert!(learned.iter().all(Option::is_some));
        assert_eq!(overlong_penalty(60, 100, 25), 0.0);
        assert_eq!(overlong_penalty(75, 100, 25), 0.0);
        assert_eq!(overlong_penalty(90, 100, 25), -0.6);
        assert_eq!(overlong_penalty(100, 100, 25), -1.0);
    }

    #[test]
    fn the_guards_fire_on_constructed_cases() {
        let settings = RlSettings {
            max_new_tokens: 64,
            equal_reward_batches: 3,
            max_kl: 0.5,
            ..Default::default()
        };
        let healthy = BatchCheck {
            completions: 16,
            truncated: 3,
            groups: 2,
            equal_groups: 1,
            reward_min: -1.0,
            reward_max: 7.0,
        };
        let mut equal = 0;
        assert_eq!(
            guard(&healthy, &settings, &mut equal).unwrap(),
            Vec::<String>::new()
        );

        let cut = BatchCheck {
            truncated: 16,
            ..healthy.clone()
        };
        let e = guard(&cut, &settings, &mut equal).unwrap_err().to_string();
        assert!(
            e.contains("all 16 completions reached rl.max_new_tokens = 64"),
            "{e}"
        );
        let penalized = RlSettings {
            overlong: Overlong::Penalty,
            ..settings.clone()
        };
        let w = guard(&cut, &penalized, &mut equal).unwrap();
        assert!(w[0].contains("all 16 completions"), "{w:?}");

        let flat = BatchCheck {
            equal_groups: 2,
            reward_min: -1.0,
            reward_max: -1.0,
            ..healthy.clone()
        };
        let w = guard(&flat, &settings, &mut equal).unwrap();
        assert!(
            w[0].contains("all 2 groups of this rollout batch had equal rewards"),
            "{w:?}"
        );
        guard(&flat, &settings, &mut equal).unwrap();
        let e = guard(&flat, &settings, &mut equal).unwrap_err().to_string();
        assert!(
            e.contains("every reward of the last 3 rollout batches was -1"),
            "{e}"
        );
        // A batch with different rewards starts the count again.
        guard(&healthy, &settings, &mut equal).unwrap();
        assert_eq!(equal, 0);

        let bad = BatchCheck {
            reward_max: f64::NAN,
            ..healthy
        };
        let e = guard(&bad, &settings, &mut equal).unwrap_err().to_string();
        assert!(e.contains("not a number"), "{e}");
    }

    #[test]
    fn the_update_is_refused_once_the_policy_runs_away_from_the_reference() {
        let m = model();
        let base = rollout_batch();
        let current =
            tch::no_grad(|| host_f32(&target_logprobs(&m, &base.to_device(Device::Cpu)).0));
        // A reference 3 nats below the policy at every target: k3 = e^-3 + 3 - 1.
        let far = 3f64.exp().recip() + 2.0;
        for (offset, refused) in [(0.0, None), (-3.0, Some(far)), (f32::NAN, Some(f64::NAN))] {
            let mut batch = base.clone();
            let reference = current.iter().map(|c| c + offset).collect();
            batch.weights.as_mut().unwrap().ref_logprobs = Some(reference);
            let mut grpo = Grpo::new(0.2, 0.2, 0.01, None);
            grpo.max_kl = 0.5;
            let _ = grpo.forward_backward(&m, None, &batch.to_device(Device::Cpu), 1.0);
            take_grads(&m);
            let figures = grpo.figures(&Comm::single()).unwrap();
            let why = grpo.refusal(&figures);
            assert_eq!(why.is_some(), refused.is_some(), "offset {offset}: {why:?}");
            if let (Some(why), Some(kl)) = (why, refused) {
                let figure = format!("reached {kl:.4} (rl.max_kl = 0.5)");
                assert!(why.contains(&figure), "{why} lacks {figure}");
            }
        }
    }

    #[test]
    fn the_seeds_defaults_and_the_file_wins() {
        let c = RlConfig::from_table(toml::Table::new()).unwrap();
        assert_eq!(
            (c.rl.samples, c.rl.temperature, c.rl.max_new_tokens),
            (8, 0.8, 2048)
        );
        assert_eq!((c.rl.kl_coef, c.optim.matrix_lr), (0.01, 5e-7));
        assert_eq!(c.optim.matrices, crate::Matrices::Adamw);
        c.validate().unwrap();
        let dapo = RlConfig::from_table(toml::toml! {
            [rl]
            clip_high = 0.28
            samples = 1
        })
        .unwrap();
        assert_eq!(dapo.rl.clip_high, 0.28);
        let e = dapo.validate().unwrap_err().to_string();
        assert!(e.contains("rl.samples = 1 must be at least 2"), "{e}");
        assert!(RlConfig::from_table(toml::toml! { [rl] sample = 3 }).is_err());
    }
}
