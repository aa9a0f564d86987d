//! Contrastive fine-tuning of the model's embeddings (InfoNCE with in-batch negatives) on
//! the shared training loop: pairs of a query and the function it names (`cxxlm index
//! recall --pairs-out`: a call site and its callee, a doc comment and its function, a
//! declaration and its definition), those not held out. Each micro-batch holds
//! `train.device_batch` pairs: their queries' and targets' embeddings (the mean of the
//! final hidden states over a text's tokens after `<|bos|>`, normalized, as `cxxlm index
//! embed` makes them), and each query's loss is the cross-entropy of its own target among
//! the batch's targets at `embed.temperature`. The held-out pairs' loss and in-batch
//! accuracy are measured as it goes.

use cxxlm_model::{Gpt, WeightStore};
use cxxlm_tokenizer::Bpe;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use tch::{Kind, Tensor};

use crate::checkpoint::{self, TrainerState};
use crate::dist::Comm;
use crate::optim::{OptimConfig, Schedule};
use crate::pretrain::{over_defaults, CheckpointConfig, LogConfig, RunConfig};
use crate::trainer::{
    self, Backward, BatchSource, DeviceBatch, Evaluation, Event, Loss, MicroBatch, Parts, Stage,
};
use crate::{Result, TrainError};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbedConfig {
    /// Run directory: checkpoints, metrics, TensorBoard events.
    pub out: PathBuf,
    /// The model to tune: a run directory (its newest checkpoint) or a checkpoint.
    pub init: PathBuf,
    pub embed: EmbedSettings,
    pub train: RunConfig,
    pub optim: OptimConfig,
    pub schedule: Schedule,
    pub eval: EmbedEvalConfig,
    pub checkpoint: CheckpointConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbedSettings {
    /// JSON lines of pairs (`query`, `target_text`, `held_out`), as `cxxlm index recall
    /// --pairs-out` writes them.
    pub pairs: Vec<PathBuf>,
    /// The tokenizer the model was trained with.
    pub tokenizer: Option<PathBuf>,
    /// The softmax temperature of the similarities.
    pub temperature: f64,
    /// Tokens of a text at most (after `<|bos|>`); longer ones are cut.
    pub text_tokens: usize,
    /// Passes over the training pairs (`train.steps`, when set, stops earlier).
    pub epochs: u64,
}

impl Default for EmbedSettings {
    fn default() -> Self {
        EmbedSettings {
            pairs: Vec::new(),
            tokenizer: None,
            temperature: 0.05,
            text_tokens: 256,
            epochs: 1,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbedEvalConfig {
    /// The held-out pairs' loss every this many steps (and at the start and the end).
    pub every: u64,
}

impl Default for EmbedEvalConfig {
    fn default() -> Self {
        EmbedEvalConfig { every: 50 }
    }
}

crate::trainer::shared_sections!(EmbedConfig);

impl EmbedConfig {
    /// A config from TOML, on top of the defaults of fine-tuning: AdamW at a small rate
    /// on every weight, 16 pairs a batch.
    pub fn from_table(table: toml::Table) -> Result<Self> {
        let defaults: toml::Table = toml::toml! {
            [train]
            device_batch = 16
            [optim]
            matrices = "adamw"
            matrix_lr = 1e-4
            embedding_lr = 1e-4
            unembedding_lr = 1e-4
            weight_decay = 0.0
        };
        over_defaults(defaults, table)
    }
}

/// The InfoNCE loss of queries `q` against targets `p` (both `(N, D)`, unit rows): the
/// cross-entropy of each query's own target among all `N` targets, at `temperature`,
/// summed over the queries.
pub fn info_nce(q: &Tensor, p: &Tensor, temperature: f64) -> Tensor {
    let logits = q.matmul(&p.transpose(0, 1)) / temperature;
    let labels = Tensor::arange(q.size()[0], (Kind::Int64, q.device()));
    logits.cross_entropy_loss::<Tensor>(&labels, None, tch::Reduction::Sum, -100, 0.0)
}

/// The embeddings of a micro-batch's rows: queries first, then their targets; a row's
/// pooled positions are those whose target is kept (the batch marks them so).
fn pooled(model: &Gpt, batch: &DeviceBatch) -> (Tensor, Tensor) {
    let mask = batch.targets.ge(0);
    let e = model.embeddings(&batch.inputs, &mask);
    let n = e.size()[0] / 2;
    (e.narrow(0, 0, n), e.narrow(0, n, n))
}

/// InfoNCE with in-batch negatives, divided by the pairs of the whole step.
struct InfoNce {
    temperature: f64,
    pairs_per_step: usize,
}

impl Loss for InfoNce {
    // Autograd reads the model's own weights: full sharding is refused for this loss.
    fn forward_backward(
        &mut self,
        model: &Gpt,
        _: Option<&dyn WeightStore>,
        batch: &DeviceBatch,
        scale: f64,
    ) -> Tensor {
        let (q, p) = pooled(model, batch);
        let loss = info_nce(&q, &p, self.temperature);
        // The optimizer steps every weight: those the embeddings do not depend on (the
        // head) get a gradient of zeros.
        let untouched = model
            .params()
            .iter()
            .fold(loss.zeros_like(), |z, (_, w)| z + w.sum(Kind::Float) * 0.0);
        ((&loss + untouched) * scale).backward();
        loss.detach()
    }

    fn normalizer(&self, _: f64) -> f64 {
        self.pairs_per_step as f64
    }

    fn watches_spikes(&self) -> bool {
        false
    }
}

/// A pair, tokenized: `<|bos|>` and the text's tokens, each.
type Rows = (Vec<u32>, Vec<u32>);

/// Rows of `pairs` as a micro-batch: the queries, then the targets, padded to `cols`;
/// the positions after `<|bos|>` that hold a token are marked supervised (pooled).
fn micro_batch(pairs: &[&Rows], cols: usize, pad: u32) -> MicroBatch {
    let rows = pairs.len() * 2;
    let mut tokens = vec![pad; rows * cols];
    let mut pooled = vec![false; rows * (cols - 1)];
    let texts = pairs.iter().map(|p| &p.0).chain(pairs.iter().map(|p| &p.1));
    for (r, text) in texts.enumerate() {
        tokens[r * cols..r * cols + text.len()].copy_from_slice(text);
        pooled[r * (cols - 1) + 1..r * (cols - 1) + text.len()].fill(true);
    }
    MicroBatch {
        rows,
        cols,
        tokens,
        supervised: Some(pooled),
        examples: None,
        shared_prefix: false,
        weights: None,
    }
}

/// The training pairs in a fresh order each epoch; this rank's share of every step.
struct PairSource {
    pairs: Vec<Rows>,
    per_batch: usize,
    cols: usize,
    pad: u32,
    seed: u64,
    epoch: u64,
    /// Pairs of this epoch's order handed out (over every rank).
    at: usize,
    order: Vec<usize>,
    rank: usize,
    world: usize,
    files: String,
}

impl PairSource {
    fn shuffle(&mut self) {
        let (seed, epoch) = (self.seed, self.epoch);
        self.order = (0..self.pairs.len()).collect();
        self.order
            .sort_by_key(|&i| splitmix64(seed ^ splitmix64(epoch ^ splitmix64(i as u64))));
    }
}

impl BatchSource for PairSource {
    fn next_batch(&mut self, _: &Gpt, _: &Comm) -> Result<MicroBatch> {
        let step = self.per_batch * self.world;
        if self.at + step > self.order.len() {
            self.epoch += 1;
            self.at = 0;
            self.shuffle();
        }
        let mine = self.at + self.rank * self.per_batch;
        let picked: Vec<&Rows> = self.order[mine..mine + self.per_batch]
            .iter()
            .map(|&i| &self.pairs[i])
            .collect();
        self.at += step;
        Ok(micro_batch(&picked, self.cols, self.pad))
    }

    fn state(&self) -> Value {
        json!({"epoch": self.epoch, "at": self.at})
    }

    fn restore(&mut self, state: &Value, _: bool) -> Result<()> {
        let (Some(epoch), Some(at)) = (state["epoch"].as_u64(), state["at"].as_u64()) else {
            return Err(TrainError::Config(format!(
                "a checkpoint's position in the pairs is not {{epoch, at}}: {state}"
            )));
        };
        self.epoch = epoch;
        self.shuffle();
        self.at = at as usize;
        Ok(())
    }

    fn dense(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        format!("the pairs of {}", self.files)
    }
}

/// The held-out pairs' InfoNCE loss (per pair) and the share whose own target is the
/// nearest in its batch.
struct HeldOut {
    pairs: Vec<Rows>,
    per_batch: usize,
    cols: usize,
    pad: u32,
    temperature: f64,
}

impl Evaluation for HeldOut {
    fn evaluate(
        &mut self,
        _: u64,
        model: &Gpt,
        _: &Comm,
        _: &mut dyn FnMut(Event),
    ) -> Result<Map<String, Value>> {
        let mut figures = Map::new();
        if self.pairs.len() < 2 {
            return Ok(figures);
        }
        let _guard = tch::no_grad_guard();
        let (mut loss, mut top1, mut n) = (0.0, 0, 0);
        for chunk in self.pairs.chunks(self.per_batch.max(2)) {
            if chunk.len() < 2 {
                continue;
            }
            let refs: Vec<&Rows> = chunk.iter().collect();
            let batch = micro_batch(&refs, self.cols, self.pad).to_device(model.device());
            let (q, p) = pooled(model, &batch);
            loss += info_nce(&q, &p, self.temperature).double_value(&[]);
            let nearest = q.matmul(&p.transpose(0, 1)).argmax(1, false);
            let own = Tensor::arange(chunk.len() as i64, (Kind::Int64, q.device()));
            top1 += nearest.eq_tensor(&own).sum(Kind::Int64).int64_value(&[]) as usize;
            n += chunk.len();
        }
        figures.insert("val_info_nce".into(), (loss / n.max(1) as f64).into());
        figures.insert("val_top1".into(), (top1 as f64 / n.max(1) as f64).into());
        Ok(figures)
    }
}

/// The pairs of `paths`: (training, held out), each text as `<|bos|>` and at most
/// `text_tokens` tokens.
fn read_pairs(paths: &[PathBuf], bpe: &Bpe, text_tokens: usize) -> Result<(Vec<Rows>, Vec<Rows>)> {
    let bos = bpe
        .special_id("<|bos|>")
        .ok_or_else(|| TrainError::Config("the tokenizer has no <|bos|>".into()))?;
    let encode = |text: &str| {
        let mut ids = vec![bos];
        ids.extend(bpe.encode(text).into_iter().take(text_tokens));
        ids
    };
    let (mut train, mut held_out) = (Vec::new(), Vec::new());
    for path in paths {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let bad = |why: &str| {
                TrainError::Config(format!(
                    "{}:{}: {why} (pairs are `cxxlm index recall --pairs-out` lines)",
                    path.display(),
                    i + 1
                ))
            };
            let v: Value = serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
            let (Some(query), Some(target)) = (v["query"].as_str(), v["target_text"].as_str())
            else {
                return Err(bad("a pair needs `query` and `target_text`"));
            };
            let pair = (encode(query), encode(target));
            match v["held_out"].as_bool().unwrap_or(false) {
                true => held_out.push(pair),
                false => train.push(pair),
            }
        }
    }
    Ok((train, held_out))
}

/// Tunes the model's embeddings as configured (`embed.tokenizer` set) on the shared
/// [`trainer`](crate::trainer) loop; `resume` and `stop` as for
/// [`pretrain`](crate::pretrain::pretrain).
pub fn embed(
    cfg: &EmbedConfig,
    resume: bool,
    report: &mut dyn FnMut(Event),
    stop: &dyn Fn(u64) -> bool,
) -> Result<TrainerState> {
    cfg.validate()?;
    let (comm, dev) = trainer::connect(&cfg.train.device)?;
    let (rank, ranks) = (comm.rank(), comm.size());
    let init_dir = checkpoint::resolve(&cfg.init)?;
    let init = checkpoint::load_weights(&init_dir)?;
    let model_config = init.state.model.clone();
    let bpe = checkpoint::trained_tokenizer(
        cfg.embed.tokenizer.as_deref(),
        "embed.tokenizer",
        &init_dir,
        &init.state,
    )?;
    let text_tokens = cfg.embed.text_tokens.min(model_config.seq_len - 1);
    let (train, held_out) = read_pairs(&cfg.embed.pairs, &bpe, text_tokens)?;
    let per_batch = cfg.train.device_batch;
    if train.len() < per_batch * ranks {
        return Err(TrainError::Config(format!(
            "{} training pairs in {}: fewer than a batch of train.device_batch = {per_batch} pairs on each of {ranks} ranks",
            train.len(),
            files(&cfg.embed.pairs)
        )));
    }
    let pairs_per_step = per_batch * ranks;
    let all_steps = (train.len() / pairs_per_step) as u64 * cfg.embed.epochs;
    let steps = match cfg.train.steps {
        0 => all_steps,
        n => n,
    };
    report(Event::Info(format!(
        "pairs: {} to train on, {} held out, from {}; {pairs_per_step} a step, {steps} steps",
        train.len(),
        held_out.len(),
        files(&cfg.embed.pairs)
    )));
    let pad = bpe.special_id("<|pad|>").unwrap_or(0);
    let cols = text_tokens + 2;
    let mut model = Gpt::new(model_config, dev, cfg.train.seed)?;
    model.load(&init.model)?;
    let mut source = PairSource {
        pairs: train,
        per_batch,
        cols,
        pad,
        seed: cfg.train.seed,
        epoch: 0,
        at: 0,
        order: Vec::new(),
        rank,
        world: ranks,
        files: files(&cfg.embed.pairs),
    };
    source.shuffle();
    let mut evaluation = HeldOut {
        pairs: held_out,
        per_batch,
        cols,
        pad,
        temperature: cfg.embed.temperature,
    };
    let mut loss = InfoNce {
        temperature: cfg.embed.temperature,
        pairs_per_step,
    };
    let stage = Stage::new(
        cfg.common(),
        Parts {
            model,
            backward: Backward::Autograd("InfoNCE over pooled hidden states"),
            source: &mut source,
            loss: &mut loss,
            evaluation: &mut evaluation,
            steps,
            grad_accum: 1,
            step_tokens: pairs_per_step * 2 * (cols - 1),
            eval_every: cfg.eval.every,
            tokenizer_sha256: init.state.tokenizer_sha256.clone(),
            identity: json!({
                "init": init_dir,
                "init_step": init.state.step,
                "pairs": cfg.embed.pairs,
                "embed": {"temperature": cfg.embed.temperature, "text_tokens": text_tokens, "epochs": cfg.embed.epochs},
            }),
        },
        &comm,
    )?;
    trainer::train(stage, comm, resume, report, stop)
}

/// SplitMix64's output function: a fixed, well-mixed hash of a number.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn files(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit_rows(n: i64, d: i64, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        let x = Tensor::randn([n, d], (Kind::Double, tch::Device::Cpu));
        &x / x.norm_scalaropt_dim(2, [1], true)
    }

    fn rows(t: &Tensor) -> Vec<Vec<f64>> {
        let n = t.size()[0];
        (0..n)
            .map(|i| Vec::<f64>::try_from(t.get(i)).unwrap())
            .collect()
    }

    #[test]
    fn info_nce_and_its_gradient_match_a_direct_computation() {
        let (n, d, tau) = (5, 7, 0.1);
        let q = unit_rows(n, d, 1).set_requires_grad(true);
        let p = unit_rows(n, d, 2).set_requires_grad(true);
        let loss = info_nce(&q, &p, tau);
        loss.backward();
        let (qs, ps) = (rows(&q.detach()), rows(&p.detach()));
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        // softmax over the targets of each query, the loss, and its gradients:
        // dL/dq_i = (sum_j s_ij p_j - p_i) / tau, dL/dp_j = sum_i (s_ij - [i = j]) q_i / tau.
        let mut expected = 0.0;
        let mut gq = vec![vec![0.0; d as usize]; n as usize];
        let mut gp = vec![vec![0.0; d as usize]; n as usize];
        for i in 0..n as usize {
            let logits: Vec<f64> = ps.iter().map(|pj| dot(&qs[i], pj) / tau).collect();
            let max = logits.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
            expected += -(logits[i] - max - z.ln());
            for j in 0..n as usize {
                let s = (logits[j] - max).exp() / z - f64::from(u8::from(i == j));
                for k in 0..d as usize {
                    gq[i][k] += s * ps[j][k] / tau;
                    gp[j][k] += s * qs[i][k] / tau;
                }
            }
        }
        assert!((loss.double_value(&[]) - expected).abs() < 1e-9);
        for (got, want) in [(rows(&q.grad()), gq), (rows(&p.grad()), gp)] {
            for (a, b) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!((a - b).abs() < 1e-9, "{a} against {b}");
            }
        }
    }

    #[test]
    fn batches_hold_queries_then_targets_and_pool_their_tokens_after_bos() {
        let pairs: Vec<Rows> = vec![(vec![1, 5, 6], vec![1, 7]), (vec![1, 8], vec![1, 9, 9, 9])];
        let refs: Vec<&Rows> = pairs.iter().collect();
        let b = micro_batch(&refs, 5, 0);
        assert_eq!((b.rows, b.cols), (4, 5));
        assert_eq!(&b.tokens[..5], &[1, 5, 6, 0, 0]);
        assert_eq!(&b.tokens[10..15], &[1, 7, 0, 0, 0]);
        assert_eq!(b.supervised_count(), 2 + 1 + 1 + 3);
        let pooled = b.supervised.unwrap();
        assert_eq!(&pooled[..4], &[false, true, true, false]);
        assert_eq!(&pooled[12..16], &[false, true, true, true]);
    }
}
