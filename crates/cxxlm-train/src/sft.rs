//! Supervised fine-tuning on the shared training loop: a pretrained checkpoint and JSON
//! lines of examples in ([`cxxlm_pack::sft`]); the examples packed whole into rows, each
//! attending only to itself from position 0, the loss on their answers summed and
//! divided by the answers' tokens in the whole step; the held-out loss and samples of
//! held-out prompts as it goes; checkpoints that resume bit-exactly mid-epoch.

use cxxlm_model::{Gpt, ModelConfig, Sampling};
use cxxlm_pack::loader::{Loader, LoaderConfig};
use cxxlm_pack::sft::{
    self, Example, Invalid, PackState, PackedRows, SftDataConfig, SftStats, TooLong,
};
use cxxlm_pack::Manifest;
use cxxlm_tokenizer::Bpe;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Kind, Tensor};

use crate::checkpoint::{self, TrainerState};
use crate::dist::Comm;
use crate::memory::{self, MemoryPlan};
use crate::optim::{OptimConfig, Schedule};
use crate::pretrain::{over_defaults, CheckpointConfig, DataConfig, LogConfig, RunConfig};
use crate::trainer::{
    self, batch_shape, Backward, BatchSource, CrossEntropy, Evaluation, Event, MicroBatch, Parts,
    Stage,
};
use crate::{Result, TrainError};

/// The seeds' longest context; a model trained at a shorter one keeps its own.
pub const DEFAULT_CONTEXT: usize = 8192;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    /// Run directory: checkpoints, metrics, TensorBoard events, samples.
    pub out: PathBuf,
    /// The pretrained model: a run directory (its newest checkpoint) or a checkpoint.
    pub init: PathBuf,
    pub sft: SftSettings,
    pub train: RunConfig,
    pub optim: OptimConfig,
    pub schedule: Schedule,
    pub eval: SftEvalConfig,
    pub checkpoint: CheckpointConfig,
    pub log: LogConfig,
}

/// Optimizer settings and schedule as defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recipe {
    /// The seeds': AdamW at 1e-5 on every weight, the default schedule (the last 20% down
    /// to zero), the optimizer's moments from zero.
    #[default]
    Seeds,
    /// nanochat's: the pretraining optimizer at its rates, constant, then down to zero
    /// along `1 - sqrt` over the last 20%; the optimizer's moments carried over from the
    /// checkpoint where it has them.
    Nanochat,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftSettings {
    /// JSON lines of examples (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`).
    pub data: Vec<PathBuf>,
    /// Held-out examples; none: `val_fraction` of `data`.
    pub val: Vec<PathBuf>,
    /// The tokenizer the model was trained with.
    pub tokenizer: Option<PathBuf>,
    /// Tokens of context (a row); 0: 8192 or the model's, whichever is less.
    pub context: usize,
    /// Passes over the examples (`train.steps`, when set, stops earlier).
    pub epochs: u64,
    pub recipe: Recipe,
    pub mask_input: bool,
    pub too_long: TooLong,
    pub invalid: Invalid,
    pub val_fraction: f64,
    /// A pretraining pack (`cxxlm pack`) whose windows make up `replay_share` of every
    /// micro-batch's rows, every token learned: the model keeps writing code while it
    /// learns the answers' form. None: SFT examples only.
    pub replay_pack: Option<PathBuf>,
    pub replay_share: f64,
}

impl Default for SftSettings {
    fn default() -> Self {
        let data = SftDataConfig::default();
        SftSettings {
            data: Vec::new(),
            val: Vec::new(),
            tokenizer: None,
            context: 0,
            epochs: 3,
            recipe: Recipe::Seeds,
            mask_input: data.mask_input,
            too_long: data.too_long,
            invalid: data.invalid,
            val_fraction: data.val_fraction,
            replay_pack: None,
            replay_share: 0.25,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftEvalConfig {
    /// The held-out loss every this many steps (and at the start and the end).
    pub every: u64,
    /// Held-out tokens per evaluation (0: all).
    pub tokens: usize,
    /// Held-out prompts answered greedily at each evaluation, shown (`samples.jsonl`).
    pub samples: usize,
    /// Tokens of an answer beyond its reference's length.
    pub sample_tokens: usize,
    /// Held-out prompts answered greedily at each evaluation whose answers are compared
    /// with their references: the share equal to them (`val_exact_match`).
    pub exact_match: usize,
}

impl Default for SftEvalConfig {
    fn default() -> Self {
        SftEvalConfig {
            every: 100,
            tokens: 0,
            samples: 2,
            sample_tokens: 64,
            exact_match: 32,
        }
    }
}

crate::trainer::shared_sections!(SftConfig);

impl SftConfig {
    /// A config from TOML, on top of the defaults of its `sft.recipe`.
    pub fn from_table(table: toml::Table) -> Result<Self> {
        let recipe = table
            .get("sft")
            .and_then(|m| m.get("recipe"))
            .and_then(|p| p.as_str())
            .unwrap_or("seeds");
        let defaults: toml::Table = match recipe {
            "nanochat" => toml::toml! {
                [schedule]
                warmup_frac = 0.0
                warmdown_frac = 0.2
                final_lr_frac = 0.0
                warmdown = "sqrt"
            },
            _ => toml::toml! {
                [optim]
                matrices = "adamw"
                matrix_lr = 1e-5
                embedding_lr = 1e-5
                unembedding_lr = 1e-5
                weight_decay = 0.0
            },
        };
        over_defaults(defaults, table)
    }
}

/// The examples, packed into rows; this rank's share of each step's rows, after the
/// replayed pretraining windows when there are any.
struct SftSource {
    rows: PackedRows,
    /// SFT rows of a micro-batch.
    batch: usize,
    replay: Option<Loader>,
    rank: usize,
    world: usize,
    files: String,
}

impl BatchSource for SftSource {
    fn next_batch(&mut self, _: &Gpt, _: &Comm) -> Result<MicroBatch> {
        let b = micro_batch(self.rows.next_batch(self.batch, self.rank, self.world));
        let Some(replay) = &mut self.replay else {
            return Ok(b);
        };
        let r = replay.next_batch();
        let learned = b.supervised.expect("SFT rows say what they learn");
        let targets = r.rows * (r.cols - 1);
        Ok(MicroBatch {
            rows: r.rows + b.rows,
            cols: b.cols,
            tokens: [r.tokens, b.tokens].concat(),
            supervised: Some([vec![true; targets], learned].concat()),
            examples: Some([r.documents, b.examples.expect("SFT rows")].concat()),
            shared_prefix: false,
            weights: None,
        })
    }

    fn state(&self) -> Value {
        let rows = serde_json::to_value(self.rows.state()).expect("SFT position as JSON");
        match &self.replay {
            None => rows,
            Some(r) => json!({"sft": rows, "replay": r.state()}),
        }
    }

    fn restore(&mut self, state: &Value, _: bool) -> Result<()> {
        let bad = |what: &str, e: serde_json::Error| TrainError::Config(format!("{what}: {e}"));
        let rows = match &mut self.replay {
            None => state,
            Some(replay) => {
                let r = serde_json::from_value(state["replay"].clone())
                    .map_err(|e| bad("replay position", e))?;
                replay.restore(r)?;
                &state["sft"]
            }
        };
        let rows: PackState =
            serde_json::from_value(rows.clone()).map_err(|e| bad("SFT position", e))?;
        Ok(self.rows.restore(rows)?)
    }

    fn dense(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        format!("the SFT data ({})", self.files)
    }
}

/// The loader of `pack`'s training windows for `rows` rows of each micro-batch, checked
/// against the tokenizer the model was trained with.
fn replay_loader(
    pack: &Path,
    rows: usize,
    context: usize,
    bpe: &Bpe,
    (rank, world, seed): (usize, usize, u64),
) -> Result<Loader> {
    let manifest = Manifest::load(pack)?;
    manifest
        .check_tokenizer(pack, bpe)
        .map_err(|e| TrainError::Config(format!("sft.replay_pack: {e}")))?;
    let defaults = DataConfig::default();
    Ok(Loader::new(
        Arc::new(manifest.open(pack, "train")?),
        LoaderConfig {
            batch: rows,
            seq_len: context,
            rank,
            world,
            mode: defaults.loader,
            seed,
            buffer: defaults.buffer,
        },
    )?)
}

fn micro_batch(b: sft::SftBatch) -> MicroBatch {
    MicroBatch {
        rows: b.rows,
        cols: b.cols,
        tokens: b.tokens,
        supervised: Some(b.learned),
        examples: Some(b.examples),
        shared_prefix: false,
        weights: None,
    }
}

/// The held-out loss (mean over the answers' tokens), and greedy answers to held-out
/// prompts.
struct SftEval<'a> {
    val: Vec<Example>,
    /// Held-out rows (example indices), every rank's.
    rows: Vec<Vec<u32>>,
    cols: usize,
    pad: u32,
    batch: usize,
    config: SftEvalConfig,
    bpe: &'a Bpe,
    seed: u64,
}

impl Evaluation for SftEval<'_> {
    fn evaluate(
        &mut self,
        step: u64,
        model: &Gpt,
        comm: &Comm,
        report: &mut dyn FnMut(Event),
    ) -> Result<Map<String, Value>> {
        let mut figures = Map::new();
        if self.val.is_empty() {
            if step == 0 {
                report(Event::Warning(
                    "no held-out examples (sft.val_fraction = 0 and no sft.val): no held-out loss"
                        .into(),
                ));
            }
            return Ok(figures);
        }
        let dev = model.device();
        let mine: Vec<Vec<u32>> = self
            .rows
            .iter()
            .skip(comm.rank())
            .step_by(comm.size())
            .cloned()
            .collect();
        let max_tokens = match self.config.tokens {
            0 => usize::MAX,
            n => n.div_ceil(comm.size()),
        };
        // The nats summed on the device (read once, so batches queue without a sync
        // each), the learned targets counted on the host.
        let mut nats = Tensor::zeros([], (Kind::Double, dev));
        let (mut learned, mut seen) = (0.0, 0);
        for chunk in mine.chunks(self.batch) {
            if seen >= max_tokens {
                break;
            }
            let b = micro_batch(sft::batch_of(&self.val, chunk, self.cols, self.pad));
            seen += b.rows * b.cols;
            learned += b.supervised_count() as f64;
            let db = b.to_device(dev);
            let losses = model.token_losses(&db.inputs, &db.targets, db.packing.as_ref());
            nats += losses.sum(Kind::Double);
        }
        let sums = Tensor::cat(
            &[
                nats.reshape([1]),
                Tensor::from_slice(&[learned]).to_device(dev),
            ],
            0,
        );
        comm.all_reduce_sum(&sums)?;
        let (nats, learned) = (sums.double_value(&[0]), sums.double_value(&[1]));
        if learned > 0.0 {
            figures.insert("val_loss".into(), (nats / learned).into());
        }
        // Greedy answers to the first held-out prompts, on rank 0.
        let answered = match comm.rank() {
            0 => self.config.samples.max(self.config.exact_match),
            _ => 0,
        };
        let stop = cxxlm_tokenizer::chat::end_of_turn(self.bpe);
        // Prompt: up to the first learned token; reference: the learned tokens from there.
        let (prompts, references): (Vec<Vec<u32>>, Vec<Vec<u32>>) = self
            .val
            .iter()
            .take(answered)
            .map(|e| {
                let start = e.learned.iter().position(|&l| l).unwrap_or(e.tokens.len());
                let end = e.learned[start..]
                    .iter()
                    .position(|&l| !l)
                    .map_or(e.tokens.len(), |n| start + n);
                (e.tokens[..start].to_vec(), e.tokens[start..end].to_vec())
            })
            .unzip();
        if prompts.is_empty() {
            return Ok(figures);
        }
        let longest = references.iter().map(Vec::len).max().unwrap_or(0);
        let sampling = Sampling {
            max_new_tokens: longest + self.config.sample_tokens,
            seed: self.seed,
            ..Default::default()
        };
        let answers = model.generate(&prompts, &sampling, &mut |_, t| t.last() == Some(&stop));
        let text = |ids: &[u32]| String::from_utf8_lossy(&self.bpe.decode(ids)).into_owned();
        for (prompt, answer) in prompts.iter().zip(&answers).take(self.config.samples) {
            report(Event::Sample {
                step,
                prompt: text(prompt),
                completion: text(answer),
            });
        }
        let checked = self.config.exact_match.min(answers.len());
        if checked > 0 {
            let exact = answers
                .iter()
                .zip(&references)
                .take(checked)
                .filter(|(a, r)| a == r)
                .count();
            figures.insert(
                "val_exact_match".into(),
                (exact as f64 / checked as f64).into(),
            );
        }
        Ok(figures)
    }
}

/// What was read, for the start of a run.
pub fn describe_data(stats: &SftStats, padding_share: f64, rows: u64) -> String {
    let formats: Vec<String> = stats
        .formats
        .iter()
        .map(|(f, n)| format!("{n} {f}"))
        .collect();
    let mut out = format!(
        "SFT data: {} records ({}); {} training examples ({} tokens, {:.1}% learned), {} held out; {} rows over the epochs, {:.1}% padding",
        stats.records,
        formats.join(", "),
        stats.train_examples,
        stats.train_tokens,
        100.0 * stats.learned_tokens as f64 / stats.train_tokens.max(1) as f64,
        stats.val_examples,
        rows,
        100.0 * padding_share,
    );
    if stats.truncated > 0 {
        out += &format!(
            "; {} examples cut to fit ({} tokens, {:.2}% of the tokens)",
            stats.truncated,
            stats.truncated_tokens,
            100.0 * stats.truncated_share()
        );
    }
    for (reason, s) in &stats.skipped {
        out += &format!(
            "; skipped {} ({reason}: {}{})",
            s.records,
            s.first.join(", "),
            if s.records as usize > s.first.len() {
                ", ..."
            } else {
                ""
            }
        );
    }
    out
}

/// The tokens a row holds: `sft.context`, else the seeds' longest or the model's own.
fn context(cfg: &SftConfig, model: &ModelConfig) -> Result<usize> {
    match cfg.sft.context {
        0 => Ok(DEFAULT_CONTEXT.min(model.seq_len)),
        c if c <= model.seq_len => Ok(c),
        c => Err(TrainError::Config(format!(
            "sft.context = {c} is longer than the {} tokens the model was trained at",
            model.seq_len
        ))),
    }
}

/// The memory each of `ranks` ranks needs to fine-tune as configured (the pretraining
/// plan at the rows' context); `None` until the model to fine-tune has a checkpoint.
pub fn memory_plan(cfg: &SftConfig, ranks: usize) -> Result<Option<MemoryPlan>> {
    // A run stopped before its first checkpoint is not one yet.
    let Ok(init_dir) = checkpoint::resolve(&cfg.init) else {
        return Ok(None);
    };
    let state = checkpoint::read_state(&init_dir)?;
    let model = ModelConfig {
        seq_len: context(cfg, &state.model)?,
        ..state.model
    };
    // A batch the run would refuse is refused here too.
    batch_shape(&cfg.train, model.seq_len, ranks, Path::new(""), false)?;
    let explicit = cxxlm_model::explicit_unsupported(&model).is_none();
    Ok(Some(memory::plan(
        &model, &cfg.train, &cfg.optim, ranks, explicit,
    )))
}

/// Fine-tunes as configured (`sft.tokenizer` set), on the shared
/// [`trainer`](crate::trainer) loop; `resume` and `stop` as for
/// [`pretrain`](crate::pretrain::pretrain). Writes what it read to `out/sft-data.json`.
pub fn sft(
    cfg: &SftConfig,
    resume: bool,
    report: &mut dyn FnMut(Event),
    stop: &dyn Fn(u64) -> bool,
) -> Result<TrainerState> {
    cfg.validate()?;
    let (comm, dev) = trainer::connect(&cfg.train.device)?;
    let (rank, ranks) = (comm.rank(), comm.size());
    if cfg.sft.data.is_empty() {
        return Err(TrainError::Config(
            "no SFT data: give sft.data (--data FILE.jsonl ...)".into(),
        ));
    }
    let init_dir = checkpoint::resolve(&cfg.init)?;
    let warm = cfg.sft.recipe == Recipe::Nanochat;
    let init = if warm {
        checkpoint::load(&init_dir)?
    } else {
        checkpoint::load_weights(&init_dir)?
    };
    let model_config = init.state.model.clone();
    let context = context(cfg, &model_config)?;
    let bpe = checkpoint::trained_tokenizer(
        cfg.sft.tokenizer.as_deref(),
        "sft.tokenizer",
        &init_dir,
        &init.state,
    )?;
    let data_config = SftDataConfig {
        mask_input: cfg.sft.mask_input,
        too_long: cfg.sft.too_long,
        invalid: cfg.sft.invalid,
        val_fraction: cfg.sft.val_fraction,
    };
    let (layout, said) = checkpoint::layout(&init_dir);
    report(Event::Info(said));
    let data = sft::load(
        &cfg.sft.data,
        &cfg.sft.val,
        &bpe,
        context,
        &data_config,
        layout,
    )?;
    let ckpt_root = cfg.out.join("checkpoints");
    let (total_batch, grad_accum) = batch_shape(&cfg.train, context, ranks, &ckpt_root, resume)?;
    let pad = bpe.special_id("<|pad|>").unwrap_or(0);
    let cols = context + 1;
    let rows = PackedRows::new(
        Arc::new(data.train),
        cols,
        cfg.sft.epochs.max(1),
        cfg.train.seed,
        pad,
    )?;
    // Of each micro-batch's rows, those of the replayed pack first, then the examples'.
    let device_batch = cfg.train.device_batch;
    let replayed = match &cfg.sft.replay_pack {
        None => 0,
        Some(_) => {
            let n = (device_batch as f64 * cfg.sft.replay_share).round() as usize;
            if !(1..device_batch).contains(&n) {
                return Err(TrainError::Config(format!(
                    "sft.replay_share = {} of train.device_batch = {device_batch} rows is {n}: \
                     it must leave at least one row to the pack and one to the examples",
                    cfg.sft.replay_share
                )));
            }
            n
        }
    };
    let rows_per_step = (total_batch / context * (device_batch - replayed) / device_batch) as u64;
    let all_steps = rows.total_rows().div_ceil(rows_per_step.max(1));
    let steps = match cfg.train.steps {
        0 => all_steps,
        n => n.min(all_steps),
    };
    report(Event::Info(describe_data(
        &data.stats,
        rows.padding_share(),
        rows.total_rows(),
    )));
    if rank == 0 {
        let path = cfg.out.join("sft-data.json");
        let record = json!({"stats": data.stats, "padding_share": rows.padding_share(), "rows": rows.total_rows()});
        std::fs::create_dir_all(&cfg.out).map_err(|e| TrainError::io(&cfg.out, e))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&record).expect("json"))
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| TrainError::io(&path, e))?;
    }

    let mut model = Gpt::new(model_config, dev, cfg.train.seed)?;
    model.load(&init.model)?;
    let files: Vec<&(String, String)> = data.stats.files.iter().collect();
    let mut identity = json!({
        "init": init_dir,
        "init_step": init.state.step,
        "data": files,
        "sft": {
            "context": context,
            "epochs": cfg.sft.epochs,
            "recipe": cfg.sft.recipe,
            "examples": data_config,
        },
        "total_batch_tokens": total_batch,
    });
    let replay = match &cfg.sft.replay_pack {
        Some(pack) => Some(replay_loader(
            pack,
            replayed,
            context,
            &bpe,
            (rank, ranks, cfg.train.seed),
        )?),
        None => None,
    };
    if let Some(pack) = &cfg.sft.replay_pack {
        identity["replay"] = json!({"pack": pack, "rows": replayed});
        report(Event::Info(format!(
            "replay: {replayed} of every {device_batch} rows from the pack {}, every token learned",
            pack.display()
        )));
    }
    let mut source = SftSource {
        rows,
        batch: device_batch - replayed,
        replay,
        rank,
        world: ranks,
        files: cfg
            .sft
            .data
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    };
    let mut evaluation = SftEval {
        rows: sft::eval_rows(&data.val, cols),
        val: data.val,
        cols,
        pad,
        batch: cfg.train.device_batch,
        config: cfg.eval.clone(),
        bpe: &bpe,
        seed: cfg.train.seed,
    };
    let mut loss = CrossEntropy;
    let mut stage = Stage::new(
        cfg.common(),
        Parts {
            model,
            backward: Backward::Explicit { packed: true },
            source: &mut source,
            loss: &mut loss,
            evaluation: &mut evaluation,
            steps,
            grad_accum,
            step_tokens: total_batch,
            eval_every: cfg.eval.every,
            tokenizer_sha256: init.state.tokenizer_sha256.clone(),
            identity,
        },
        &comm,
    )?;
    if warm {
        let (carried, all) = stage.optimizer.warm_start(&init.optimizer);
        if carried > 0 {
            stage.optimizer_steps_before = init.state.step;
        }
        report(Event::Info(format!(
            "optimizer: {carried} of {all} state tensors carried over from {} (step {})",
            init_dir.display(),
            init.state.step
        )));
    }
    trainer::train(stage, comm, resume, report, stop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::Loss;
    use cxxlm_model::ModelConfig;
    use tch::Device;

    /// Examples packed into one row give each the losses and gradients it has alone, on
    /// the autograd path and the explicit one.
    #[test]
    fn packed_examples_learn_as_each_alone() {
        let config = ModelConfig {
            seq_len: 32,
            ..ModelConfig::preset("tiny", 300).unwrap()
        };
        let mut m = Gpt::new(config, Device::Cpu, 4).unwrap();
        tch::no_grad(|| {
            for (_, p) in m.params() {
                p.shallow_clone().copy_(&(p.randn_like() * 0.1));
            }
        });
        let examples: Vec<Example> = [9usize, 13, 7]
            .iter()
            .enumerate()
            .map(|(k, &n)| Example {
                tokens: (0..n as u32)
                    .map(|t| (t * 37 + k as u32 * 101) % 300)
                    .collect(),
                learned: (0..n).map(|t| t >= 1).collect(),
            })
            .collect();
        let cols = 33;
        let packed = micro_batch(sft::batch_of(&examples, &[vec![0, 1, 2]], cols, 299));
        let alone = micro_batch(sft::batch_of(
            &examples,
            &[vec![0], vec![1], vec![2]],
            cols,
            299,
        ));
        for explicit in [false, true] {
            m.set_fused(explicit.then_some(cxxlm_cuda::Fused::Reference))
                .unwrap();
            let losses = |b: &MicroBatch| {
                let d = b.to_device(Device::Cpu);
                m.token_losses(&d.inputs, &d.targets, d.packing.as_ref())
            };
            let (p, a) = (losses(&packed), losses(&alone));
            let mut start = 0;
            for (k, e) in examples.iter().enumerate() {
                let n = e.tokens.len() as i64;
                let in_row = p.narrow(0, start, n - 1);
                let own = a.narrow(0, k as i64 * 32, n - 1);
                let diff = (in_row - own).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "example {k}: {diff} (explicit: {explicit})");
                start += n;
            }
            let grads = |b: &MicroBatch| {
                let d = b.to_device(Device::Cpu);
                let loss = CrossEntropy.forward_backward(&m, None, &d, 1.0);
                let g: Vec<Tensor> = m
                    .params()
                    .iter()
                    .map(|(_, p)| {
                        let g = p.grad().copy();
                        p.shallow_clone().zero_grad();
                        g
                    })
                    .collect();
                (loss.double_value(&[]), g)
            };
            let ((lp, gp), (la, ga)) = (grads(&packed), grads(&alone));
            assert!((lp - la).abs() < 1e-4 * la.abs(), "{lp} {la}");
            for ((name, _), (x, y)) in m.params().iter().zip(gp.iter().zip(&ga)) {
                let diff = (x - y).abs().max().double_value(&[]);
                let size = y.abs().max().double_value(&[]);
                assert!(
                    diff <= 1e-4 * size.max(1e-3),
                    "{name}: {diff} against {size}"
                );
            }
        }
    }

    #[test]
    fn recipes_bring_their_defaults_and_the_file_wins() {
        let seeds = SftConfig::from_table(toml::Table::new()).unwrap();
        assert_eq!(seeds.optim.matrices, crate::Matrices::Adamw);
        assert_eq!(
            (
                seeds.optim.matrix_lr,
                seeds.optim.embedding_lr,
                seeds.sft.epochs
            ),
            (1e-5, 1e-5, 3)
        );
        assert!(seeds.sft.mask_input);
        let nanochat = SftConfig::from_table(toml::toml! {
            [sft]
            recipe = "nanochat"
            [optim]
            matrix_lr = 0.01
        })
        .unwrap();
        assert_eq!(nanochat.optim.matrices, crate::Matrices::Muon);
        assert_eq!(nanochat.optim.matrix_lr, 0.01);
        assert_eq!(nanochat.schedule.warmdown, crate::optim::Warmdown::Sqrt);
        assert!(SftConfig::from_table(toml::toml! { [sft] epochz = 3 }).is_err());
    }
}
