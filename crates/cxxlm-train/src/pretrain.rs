//! Pretraining: packed tokens in, checkpoints, `metrics.jsonl`, TensorBoard events and
//! samples out, on the shared training loop; resumes bit-exactly from its last
//! checkpoint. Its config's sections are every stage's.

use cxxlm_model::{Gpt, ModelConfig, ModelOverrides, Packing, Sampling};
use cxxlm_pack::loader::eval_batches;
use cxxlm_pack::{IndexedDataset, Loader, LoaderConfig, Manifest, Mode};
use cxxlm_tokenizer::Bpe;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, TrainerState};
use crate::dist::Comm;
use crate::memory::{self, MemoryPlan};
use crate::optim::{OptimConfig, Schedule, Sharding};
use crate::trainer::{
    self, batch_shape, to_device_ids, Backward, BatchSource, CrossEntropy, Evaluation, Event,
    MicroBatch, Parts, Stage,
};
use crate::{Result, TrainError};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Run directory: checkpoints, metrics, TensorBoard events, samples.
    pub out: PathBuf,
    /// A trained model to continue (a run directory, its newest checkpoint, or a
    /// checkpoint directory), perhaps at another context: `model` may then change only
    /// `seq_len`, `rope_base` and `rope_scaling`. Empty: a fresh model.
    pub init: PathBuf,
    pub model: ModelOverrides,
    pub data: DataConfig,
    pub train: RunConfig,
    pub optim: OptimConfig,
    pub schedule: Schedule,
    pub eval: EvalConfig,
    pub checkpoint: CheckpointConfig,
    pub log: LogConfig,
}

crate::trainer::shared_sections!(TrainConfig);

impl TrainConfig {
    /// A config from TOML, on top of defaults that depend on `model.preset`: nanochat's
    /// for the small presets, the seeds' for `3b` (Muon 0.015, head 0.003, weight decay
    /// 0.1, 2% warmup, 30% warmdown to 0.1, 16 x 8192 per device, 2M tokens per step).
    pub fn from_table(table: toml::Table) -> Result<Self> {
        let preset = table
            .get("model")
            .and_then(|m| m.get("preset"))
            .and_then(|p| p.as_str())
            .unwrap_or("d12");
        let defaults: toml::Table = match preset {
            "3b" => toml::toml! {
                [train]
                device_batch = 16
                total_batch_tokens = 2097152
                [optim]
                matrix_lr = 0.015
                unembedding_lr = 0.003
                weight_decay = 0.1
                [schedule]
                warmup_frac = 0.02
                warmdown_frac = 0.3
                final_lr_frac = 0.1
            },
            _ => toml::Table::new(),
        };
        over_defaults(defaults, table)
    }
}

/// A config of `table`, whose keys replace those of `defaults`.
pub(crate) fn over_defaults<T: serde::de::DeserializeOwned>(
    mut defaults: toml::Table,
    table: toml::Table,
) -> Result<T> {
    merge(&mut defaults, table);
    toml::Value::Table(defaults)
        .try_into()
        .map_err(|e| TrainError::Config(e.to_string()))
}

/// `over`'s keys replace `base`'s, table by table.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// The output directory of `cxxlm pack`.
    pub pack: PathBuf,
    /// Defaults to the tokenizer recorded in `pack.json`.
    pub tokenizer: Option<PathBuf>,
    pub loader: Mode,
    /// Documents a best-fit row chooses among.
    pub buffer: usize,
    /// Each document of a row attends only to itself, its positions from 0 (as SFT keeps
    /// its examples apart), in training and validation.
    pub document_mask: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            pack: PathBuf::new(),
            tokenizer: None,
            loader: Mode::BestFit,
            buffer: 1000,
            document_mask: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// `auto` (CUDA when available), `cpu` or `cuda`.
    pub device: String,
    /// Rows of `seq_len` tokens per forward pass.
    pub device_batch: usize,
    /// Tokens per optimizer step over all ranks (0 = one device batch per rank); reached
    /// by gradient accumulation.
    pub total_batch_tokens: usize,
    /// Optimizer steps; 0 = from `tokens`.
    pub steps: u64,
    /// Training tokens; 0 = 20 per parameter (Chinchilla, as nanochat).
    pub tokens: u64,
    /// Seconds of optimizer steps (0 = no limit): after the first steps, the step count
    /// is cut to what fits, so the schedule still ends at its final learning rate.
    /// Evaluation and checkpoints are not counted.
    pub time_budget: f64,
    /// With a time budget: the fewest steps it must hold. Before training, a few probe
    /// steps measure the speed, and the batch is cut (gradient accumulation first, then
    /// rows per pass) until that many fit; the fit is kept in the run for resuming.
    /// 0 = the batch as given.
    pub min_steps: u64,
    pub seed: u64,
    /// Activation checkpointing in the explicit pass: every this-many-th layer keeps only
    /// its input and runs its forward again in the backward pass (1: every layer; 0:
    /// none), for memory at the cost of a second forward of those layers.
    pub activation_checkpointing: usize,
    /// `optimizer`: every rank holds every weight and gradient, the optimizer's state is
    /// split among the ranks (ZeRO-1/2); `full`: each rank holds only its part of the
    /// weights and gradients as well (ZeRO-3, FSDP), and the explicit pass gathers each
    /// layer's weights for its forward and again for its backward.
    pub sharding: Sharding,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            device: "auto".into(),
            device_batch: 32,
            total_batch_tokens: 524_288,
            steps: 0,
            tokens: 0,
            time_budget: 0.0,
            min_steps: 0,
            seed: 0,
            activation_checkpointing: 0,
            sharding: Sharding::Optimizer,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Validation bits per byte every this many steps (and at the start and the end).
    pub every: u64,
    /// Validation tokens per evaluation.
    pub tokens: usize,
    /// Completions sampled at each evaluation.
    pub samples: usize,
    pub sample_tokens: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            every: 250,
            tokens: 10 * 1_048_576,
            samples: 4,
            sample_tokens: 64,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    pub every: u64,
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            every: 1000,
            keep: 3,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Peak dense bf16 FLOP/s of one device, for MFU (H100 SXM: 989e12).
    pub peak_flops: f64,
    /// Warn when MFU falls below this (0 = never).
    pub mfu_warn: f64,
    /// A loss above this multiple of its moving average saves a checkpoint and warns.
    pub spike_factor: f64,
    /// Where each step's time goes: the device is synchronized at the end of each phase
    /// of the step and the phases' milliseconds are logged (`phase_ms`). The phases no
    /// longer overlap, so steps are slower: for finding time, not for measuring speed.
    pub phases: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            peak_flops: 989e12,
            mfu_warn: 0.0,
            spike_factor: 2.0,
            phases: false,
        }
    }
}

/// Openings the progress samples continue.
const SAMPLE_PROMPTS: [&str; 4] = [
    "#include <vector>\n",
    "int main() {\n",
    "template <typename T>\n",
    "// Returns the greatest common divisor of a and b.\nint gcd(int a, int b) {\n",
];

/// UTF-8 bytes of every token id; special and unused ids count 0 (bits per byte).
pub fn token_bytes(bpe: &Bpe, device: Device) -> Tensor {
    let bytes: Vec<f32> = (0..bpe.vocab_size())
        .map(|i| bpe.tokens().get(i).map_or(0.0, |t| t.len() as f32))
        .collect();
    Tensor::from_slice(&bytes).to_device(device)
}

/// Bits per byte, and what they were measured on.
#[derive(Debug, Clone, PartialEq)]
pub struct BitsPerByte {
    pub bits_per_byte: f64,
    /// Predicted tokens that stand for text (special tokens are not scored).
    pub tokens: u64,
    /// The UTF-8 bytes of those tokens.
    pub bytes: u64,
    /// The same by the position a token is predicted from (in its window, or in its
    /// document with document masking), over [`POSITION_BUCKETS`] that the windows reach.
    pub by_position: Vec<PositionBits>,
}

/// Where the buckets of positions of [`BitsPerByte::by_position`] start.
pub const POSITION_BUCKETS: [usize; 4] = [0, 2048, 8192, 32768];

/// Bits per byte of the tokens predicted from positions `from..to`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PositionBits {
    pub from: usize,
    pub to: usize,
    pub bits_per_byte: f64,
    pub tokens: u64,
}

/// Validation bits per byte over up to `max_tokens` tokens of `data`, the windows
/// shared among the ranks of `comm`; with `document_mask`, each document of a window
/// attends only to itself, as in training.
pub fn bits_per_byte(
    model: &Gpt,
    data: &IndexedDataset,
    batch: usize,
    max_tokens: usize,
    bytes_of: &Tensor,
    document_mask: bool,
    comm: &Comm,
) -> Result<Option<BitsPerByte>> {
    let t = model.config.seq_len;
    let dev = model.device();
    let buckets: Vec<(usize, usize)> = POSITION_BUCKETS
        .iter()
        .enumerate()
        .filter(|(_, &from)| from < t)
        .map(|(i, &from)| (from, POSITION_BUCKETS.get(i + 1).map_or(t, |&to| to.min(t))))
        .collect();
    // Per bucket: nats, bytes and scored tokens, summed on the device and read once, so
    // batches queue without a sync each.
    let sums = Tensor::zeros([buckets.len() as i64, 3], (Kind::Double, dev));
    let mut seen = 0;
    let max_tokens = max_tokens.div_ceil(comm.size());
    for b in eval_batches(data, batch, t, comm.rank(), comm.size()) {
        if seen >= max_tokens {
            break;
        }
        let ids = to_device_ids(&b.tokens, b.rows, b.cols, dev);
        let (x, y) = (ids.narrow(1, 0, t as i64), ids.narrow(1, 1, t as i64));
        let packing = document_mask.then(|| Packing::new(&b.documents, t, dev));
        let losses = model.token_losses(&x, &y, packing.as_ref());
        let positions = match &packing {
            Some(p) => p.positions.shallow_clone(),
            None => Tensor::arange(t as i64, (Kind::Int64, dev)).repeat([b.rows as i64]),
        };
        let w = bytes_of.index_select(0, &y.reshape([-1]));
        let counted = w.gt(0.0).to_kind(Kind::Float);
        let nats = losses * &counted;
        for (i, &(from, to)) in buckets.iter().enumerate() {
            let inside = positions
                .ge(from as i64)
                .logical_and(&positions.lt(to as i64))
                .to_kind(Kind::Float);
            let row = Tensor::stack(
                &[
                    (&nats * &inside).sum(Kind::Double),
                    (&w * &inside).sum(Kind::Double),
                    (&counted * &inside).sum(Kind::Double),
                ],
                0,
            );
            let _ = sums.get(i as i64).g_add_(&row);
        }
        seen += b.rows * t;
    }
    comm.all_reduce_sum(&sums)?;
    let sums =
        Vec::<f64>::try_from(&sums.view([-1])).map_err(|e| TrainError::Torch(e.to_string()))?;
    let sums: Vec<&[f64]> = sums.chunks(3).collect();
    let bits = |nats: f64, bytes: f64| nats / std::f64::consts::LN_2 / bytes;
    let total = |k: usize| sums.iter().map(|r| r[k]).sum::<f64>();
    let (nats, bytes) = (total(0), total(1));
    Ok((bytes > 0.0).then(|| BitsPerByte {
        bits_per_byte: bits(nats, bytes),
        tokens: total(2) as u64,
        bytes: bytes as u64,
        by_position: buckets
            .iter()
            .zip(&sums)
            .filter(|(_, r)| r[1] > 0.0)
            .map(|(&(from, to), r)| PositionBits {
                from,
                to,
                bits_per_byte: bits(r[0], r[1]),
                tokens: r[2] as u64,
            })
            .collect(),
    }))
}

/// The tokenizer of the run (`data.tokenizer`, else the one `pack.json` names), checked
/// against the pack's tokens.
fn pack_tokenizer(cfg: &TrainConfig, manifest: &Manifest) -> Result<Bpe> {
    let tok_path = cfg
        .data
        .tokenizer
        .clone()
        .unwrap_or_else(|| PathBuf::from(&manifest.tokenizer_path));
    let bpe = cxxlm_tokenizer::load(&tok_path).map_err(|e| TrainError::Config(e.to_string()))?;
    manifest.check_tokenizer(&cfg.data.pack, &bpe)?;
    Ok(bpe)
}

/// The memory one of `ranks` ranks needs for this run, once the model's vocabulary is
/// known (from `init`, or the tokenizer of an existing pack); None before that.
pub fn memory_plan(cfg: &TrainConfig, ranks: usize) -> Result<Option<MemoryPlan>> {
    let model = if cfg.init.as_os_str().is_empty() {
        let Ok(manifest) = Manifest::load(&cfg.data.pack) else {
            return Ok(None);
        };
        let bpe = pack_tokenizer(cfg, &manifest)?;
        ModelConfig::resolve(&cfg.model, bpe.vocab_size())?
    } else {
        let state = checkpoint::read_state(&checkpoint::resolve(&cfg.init)?)?;
        state.model.extended(&cfg.model)?
    };
    // A batch the run would refuse is refused here too.
    batch_shape(&cfg.train, model.seq_len, ranks, Path::new(""), false)?;
    let explicit = cxxlm_model::explicit_unsupported(&model).is_none();
    Ok(Some(memory::plan(
        &model, &cfg.train, &cfg.optim, ranks, explicit,
    )))
}

/// The pack's training windows, as the loader cuts them for this rank.
struct PackSource {
    loader: Loader,
    pack: PathBuf,
    document_mask: bool,
}

impl BatchSource for PackSource {
    fn next_batch(&mut self, _: &Gpt, _: &Comm) -> Result<MicroBatch> {
        let b = self.loader.next_batch();
        Ok(MicroBatch {
            rows: b.rows,
            cols: b.cols,
            tokens: b.tokens,
            supervised: None,
            examples: self.document_mask.then_some(b.documents),
            shared_prefix: false,
            weights: None,
        })
    }

    fn state(&self) -> Value {
        serde_json::to_value(self.loader.state()).expect("loader state as JSON")
    }

    fn restore(&mut self, state: &Value, _: bool) -> Result<()> {
        let state = serde_json::from_value(state.clone())
            .map_err(|e| TrainError::Config(format!("loader state: {e}")))?;
        Ok(self.loader.restore(state)?)
    }

    fn dense(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!("the pack {}", self.pack.display())
    }

    /// Best-fit rows crop the documents that do not fit: the share of the tokens taken from
    /// the pack that were cut off, since the run began (the loader's stream is every rank's).
    fn figures(&mut self, _: &Comm) -> Result<Map<String, Value>> {
        let s = self.loader.state();
        let mut figures = Map::new();
        if s.mode == Mode::BestFit {
            let taken = s.rows * (s.seq_len as u64 + 1) + s.cropped_tokens;
            figures.insert(
                "cropped_share".into(),
                (s.cropped_tokens as f64 / taken.max(1) as f64).into(),
            );
        }
        Ok(figures)
    }
}

/// Validation bits per byte, and greedy completions of C++ openings.
struct PretrainEval<'a> {
    val: IndexedDataset,
    document_mask: bool,
    bpe: &'a Bpe,
    bytes_of: Tensor,
    batch: usize,
    tokens: usize,
    samples: usize,
    sample_tokens: usize,
    seed: u64,
}

impl Evaluation for PretrainEval<'_> {
    fn evaluate(
        &mut self,
        step: u64,
        model: &Gpt,
        comm: &Comm,
        report: &mut dyn FnMut(Event),
    ) -> Result<Map<String, Value>> {
        let mut figures = Map::new();
        match bits_per_byte(
            model,
            &self.val,
            self.batch,
            self.tokens,
            &self.bytes_of,
            self.document_mask,
            comm,
        )? {
            Some(bpb) => {
                figures.insert("val_bpb".into(), bpb.bits_per_byte.into());
                if bpb.by_position.len() > 1 {
                    for b in &bpb.by_position {
                        let name = format!("val_bpb_{}_{}", b.from, b.to);
                        figures.insert(name, b.bits_per_byte.into());
                    }
                }
            }
            None => report(Event::Warning(format!(
                "the validation split holds less than one window of {} tokens: no bits per byte",
                model.config.seq_len + 1
            ))),
        }
        // An untrained model has nothing to show (its zero head writes token 0 over and over).
        let samples = if comm.rank() == 0 && step > 0 {
            self.samples
        } else {
            0
        };
        let (bos, eos) = (
            self.bpe.special_id("<|bos|>"),
            self.bpe.special_id("<|eos|>"),
        );
        for (i, prompt) in SAMPLE_PROMPTS.iter().take(samples).enumerate() {
            let mut ids: Vec<u32> = bos.into_iter().collect();
            ids.extend(self.bpe.encode(prompt));
            let sampling = Sampling {
                max_new_tokens: self.sample_tokens,
                seed: self.seed + i as u64,
                ..Default::default()
            };
            let out = model
                .generate(&[ids], &sampling, &mut |_, t| t.last().copied() == eos)
                .remove(0);
            report(Event::Sample {
                step,
                prompt: prompt.to_string(),
                completion: String::from_utf8_lossy(&self.bpe.decode(&out)).into_owned(),
            });
        }
        Ok(figures)
    }
}

/// Pretrains as configured, on the shared [`trainer`](crate::trainer) loop; with
/// `resume`, continues from the newest checkpoint in `out/checkpoints` (written by any
/// number of ranks). `stop` is asked before each step (with the number of steps done):
/// when it says so on any rank, the loop saves a checkpoint and returns. With
/// `WORLD_SIZE` set, this process is one rank of a data-parallel run
/// ([`World::from_env`]); rank 0 reports and writes the metrics.
pub fn pretrain(
    cfg: &TrainConfig,
    resume: bool,
    report: &mut dyn FnMut(Event),
    stop: &dyn Fn(u64) -> bool,
) -> Result<TrainerState> {
    cfg.validate()?;
    let (comm, dev) = trainer::connect(&cfg.train.device)?;
    let (rank, ranks) = (comm.rank(), comm.size());
    let manifest = Manifest::load(&cfg.data.pack)?;
    let bpe = pack_tokenizer(cfg, &manifest)?;
    let init = match cfg.init.as_os_str().is_empty() {
        true => None,
        false => {
            let dir = checkpoint::resolve(&cfg.init)?;
            Some((checkpoint::load_weights(&dir)?, dir))
        }
    };
    let model_config = match &init {
        Some((init, dir)) => {
            if init.state.tokenizer_sha256 != manifest.settings.tokenizer_sha256 {
                return Err(TrainError::Config(format!(
                    "{} was trained with another tokenizer than the pack {} was made with",
                    dir.display(),
                    cfg.data.pack.display()
                )));
            }
            init.state.model.extended(&cfg.model)?
        }
        None => ModelConfig::resolve(&cfg.model, bpe.vocab_size())?,
    };
    let seq = model_config.seq_len;
    let run = &cfg.train;
    let ckpt_root = cfg.out.join("checkpoints");
    let (total_batch, grad_accum) = batch_shape(run, seq, ranks, &ckpt_root, resume)?;
    let steps = if run.steps > 0 {
        run.steps
    } else {
        let tokens = if run.tokens > 0 {
            run.tokens
        } else {
            20 * model_config.params() as u64
        };
        (tokens / total_batch as u64).max(1)
    };
    let train = Arc::new(manifest.open(&cfg.data.pack, "train")?);
    let val = manifest.open(&cfg.data.pack, "val")?;
    // A split shorter than one window would be read round and round (training) or not at
    // all (validation): refused before a step is spent.
    let window = seq as u64 + 1;
    let val_hint = " or a larger --val-fraction, or set eval.every = 0";
    for (name, split, read, hint) in [
        ("train", &*train, true, ""),
        ("val", &val, cfg.eval.every > 0, val_hint),
    ] {
        if read && split.total_tokens() < window {
            return Err(TrainError::Config(format!(
                "{}: the {name} split holds {} tokens, fewer than one window of the model's context ({window}): pack more text{hint}",
                cfg.data.pack.display(),
                split.total_tokens(),
            )));
        }
    }
    let loader = Loader::new(
        train,
        LoaderConfig {
            batch: run.device_batch,
            seq_len: seq,
            rank,
            world: ranks,
            mode: cfg.data.loader,
            seed: run.seed,
            buffer: cfg.data.buffer,
        },
    )?;
    let mut model = Gpt::new(model_config, dev, run.seed)?;
    let mut identity = json!({"total_batch_tokens": total_batch, "loader": cfg.data.loader});
    if let Some((init, dir)) = &init {
        model.load(&init.model)?;
        identity["init"] = json!(dir);
        identity["init_step"] = init.state.step.into();
    }
    // Recorded only when on, so that runs from before the switch still resume.
    if cfg.data.document_mask {
        identity["document_mask"] = true.into();
    }
    let mut source = PackSource {
        loader,
        pack: cfg.data.pack.clone(),
        document_mask: cfg.data.document_mask,
    };
    let mut evaluation = PretrainEval {
        val,
        document_mask: cfg.data.document_mask,
        bpe: &bpe,
        bytes_of: token_bytes(&bpe, dev),
        batch: run.device_batch,
        tokens: cfg.eval.tokens,
        samples: cfg.eval.samples,
        sample_tokens: cfg.eval.sample_tokens,
        seed: run.seed,
    };
    let mut loss = CrossEntropy;
    let stage = Stage::new(
        cfg.common(),
        Parts {
            model,
            backward: Backward::Explicit {
                packed: cfg.data.document_mask,
            },
            source: &mut source,
            loss: &mut loss,
            evaluation: &mut evaluation,
            steps,
            grad_accum,
            step_tokens: total_batch,
            eval_every: cfg.eval.every,
            tokenizer_sha256: manifest.settings.tokenizer_sha256.clone(),
            identity,
        },
        &comm,
    )?;
    trainer::train(stage, comm, resume, report, stop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cxxlm_pack::{IndexedWriter, TokenType};

    /// With document masking, each document of a packed row (cut from the loader's
    /// windows, which cross documents) gets the losses it has alone, position by position;
    /// without, a document after another sees it.
    #[test]
    fn a_masked_document_learns_as_it_would_alone() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("train");
        let mut w = IndexedWriter::create(&prefix, TokenType::Uint16).unwrap();
        for d in 0..12u32 {
            let doc: Vec<u32> = (0..3 + d * 5 % 17)
                .map(|i| (d * 31 + i * 7) % 300)
                .collect();
            w.push(&doc).unwrap();
        }
        w.finish().unwrap();
        let data = Arc::new(IndexedDataset::open(&prefix).unwrap());
        let t = 32;
        let model = crate::trainer::tests::tiny_model(t, 6);
        let config = LoaderConfig {
            batch: 2,
            seq_len: t,
            rank: 0,
            world: 1,
            mode: Mode::Sequential,
            seed: 1,
            buffer: 1,
        };
        for document_mask in [true, false] {
            let mut source = PackSource {
                loader: Loader::new(data.clone(), config.clone()).unwrap(),
                pack: prefix.clone(),
                document_mask,
            };
            let b = source.next_batch(&model, &Comm::single()).unwrap();
            let d = b.to_device(Device::Cpu);
            let packed = model.token_losses(&d.inputs, &d.targets, d.packing.as_ref());
            // The same window's documents, as the loader cut them.
            let documents = Loader::new(data.clone(), config.clone())
                .unwrap()
                .next_batch()
                .documents;
            let (mut compared, mut worst) = (0, 0f64);
            for (r, lengths) in documents.iter().enumerate() {
                let mut start = 0;
                for &n in lengths {
                    let ids: Vec<i64> = b.tokens[r * b.cols + start..r * b.cols + start + n]
                        .iter()
                        .map(|&x| x as i64)
                        .collect();
                    if n >= 2 {
                        let ids = Tensor::from_slice(&ids).unsqueeze(0);
                        let (x, y) = (
                            ids.narrow(1, 0, n as i64 - 1),
                            ids.narrow(1, 1, n as i64 - 1),
                        );
                        let alone = model.token_losses(&x, &y, None);
                        let here = packed.narrow(0, (r * t + start) as i64, n as i64 - 1);
                        worst = worst.max((alone - here).abs().max().double_value(&[]));
                        compared += 1;
                    }
                    start += n;
                }
            }
            assert!(compared >= 3, "{documents:?}");
            if document_mask {
                assert!(
                    worst < 1e-5,
                    "masked documents differ from alone by {worst}"
                );
            } else {
                assert!(worst > 1e-3, "unmasked documents see the one before");
            }
        }
    }

    #[test]
    fn presets_bring_their_defaults_and_the_file_wins() {
        let small = TrainConfig::from_table(toml::toml! { [model] preset = "d20" }).unwrap();
        assert_eq!(small.optim.matrix_lr, 0.02);
        assert_eq!(small.schedule.warmdown_frac, 0.2);
        let big = TrainConfig::from_table(toml::toml! {
            [model]
            preset = "3b"
            [optim]
            matrix_lr = 0.01
        })
        .unwrap();
        assert_eq!((big.optim.matrix_lr, big.optim.weight_decay), (0.01, 0.1));
        assert_eq!(
            (big.schedule.warmup_frac, big.train.total_batch_tokens),
            (0.02, 2_097_152)
        );
        assert!(TrainConfig::from_table(toml::toml! { [train] stepz = 3 }).is_err());
    }
}
