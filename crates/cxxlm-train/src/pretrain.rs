//! The pretraining loop: packed tokens in, checkpoints, `metrics.jsonl`, TensorBoard
//! events and samples out; resumes bit-exactly from its last checkpoint.

use cxxlm_model::{Gpt, ModelConfig, ModelOverrides, Sampling};
use cxxlm_pack::loader::eval_batches;
use cxxlm_pack::{IndexedDataset, Loader, LoaderConfig, Manifest, Mode};
use cxxlm_tokenizer::Bpe;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, TrainerState};
use crate::dist::{Comm, World};
use crate::metrics::Metrics;
use crate::optim::{OptimConfig, Optimizer, Schedule};
use crate::{cuda, Result, TrainError};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Run directory: checkpoints, metrics, TensorBoard events, samples.
    pub out: PathBuf,
    pub model: ModelOverrides,
    pub data: DataConfig,
    pub train: RunConfig,
    pub optim: OptimConfig,
    pub schedule: Schedule,
    pub eval: EvalConfig,
    pub checkpoint: CheckpointConfig,
    pub log: LogConfig,
}

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
        let mut merged: toml::Table = match preset {
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
        merge(&mut merged, table);
        toml::Value::Table(merged)
            .try_into()
            .map_err(|e| TrainError::Config(e.to_string()))
    }
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
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            pack: PathBuf::new(),
            tokenizer: None,
            loader: Mode::BestFit,
            buffer: 1000,
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
    pub seed: u64,
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
            seed: 0,
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
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            peak_flops: 989e12,
            mfu_warn: 0.0,
            spike_factor: 2.0,
        }
    }
}

/// What the loop reports as it goes.
#[derive(Debug, Clone)]
pub enum Event {
    Start {
        model: ModelConfig,
        params: usize,
        device: String,
        /// Processes training together (data parallel).
        ranks: usize,
        steps: u64,
        grad_accum: usize,
        resumed_from: Option<u64>,
        /// How gradients are computed: the explicit pass with fused kernels, or autograd
        /// (and why).
        backward: String,
    },
    Step {
        step: u64,
        steps: u64,
        loss: f64,
        loss_ema: f64,
        lr_scale: f64,
        tok_s: f64,
        mfu: f64,
        gpu_memory_gib: f64,
    },
    Eval {
        step: u64,
        val_bpb: f64,
    },
    Sample {
        step: u64,
        prompt: String,
        completion: String,
    },
    /// `train.time_budget` fixed the step count from the measured step time.
    StepsFitted {
        steps: u64,
        step_seconds: f64,
    },
    Warning(String),
    Checkpoint(PathBuf),
}

/// Openings the progress samples continue.
const SAMPLE_PROMPTS: [&str; 4] = [
    "#include <vector>\n",
    "int main() {\n",
    "template <typename T>\n",
    "// Returns the greatest common divisor of a and b.\nint gcd(int a, int b) {\n",
];

const EMA_BETA: f64 = 0.9;

/// With a time budget, the step count is fitted once this many steps are done.
const FIT_AFTER_STEPS: u64 = 10;

/// The device named in the config; CUDA means this rank's GPU (`LOCAL_RANK`).
fn device(name: &str, local_rank: usize) -> Result<Device> {
    let gpus = tch::Cuda::device_count() as usize;
    match name {
        "auto" if gpus == 0 => Ok(Device::Cpu),
        "auto" | "cuda" if local_rank < gpus => Ok(Device::Cuda(local_rank)),
        "auto" | "cuda" if gpus > 0 => Err(TrainError::Config(format!(
            "LOCAL_RANK={local_rank} but this host has {gpus} GPUs"
        ))),
        "cpu" => Ok(Device::Cpu),
        "cuda" => Err(TrainError::Config(
            "train.device = \"cuda\" but CUDA is not available".into(),
        )),
        other => Err(TrainError::Config(format!(
            "train.device {other:?}: use auto, cpu or cuda"
        ))),
    }
}

/// UTF-8 bytes of every token id; special and unused ids count 0 (bits per byte).
pub fn token_bytes(bpe: &Bpe, device: Device) -> Tensor {
    let bytes: Vec<f32> = (0..bpe.vocab_size())
        .map(|i| bpe.tokens().get(i).map_or(0.0, |t| t.len() as f32))
        .collect();
    Tensor::from_slice(&bytes).to_device(device)
}

/// Token ids `(rows, cols)` on `device`; to a GPU through pinned memory, without waiting
/// for the work already queued there.
fn to_device_ids(tokens: &[u32], rows: usize, cols: usize, device: Device) -> Tensor {
    let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    let host = Tensor::from_slice(&ids).view([rows as i64, cols as i64]);
    match device {
        Device::Cuda(_) => host
            .pin_memory(device)
            .to_device_(device, Kind::Int64, true, false),
        _ => host.to_device(device),
    }
}

/// Validation bits per byte over up to `max_tokens` tokens of `data`, the windows
/// shared among the ranks of `comm`.
pub fn bits_per_byte(
    model: &Gpt,
    data: &IndexedDataset,
    batch: usize,
    max_tokens: usize,
    bytes_of: &Tensor,
    comm: &Comm,
) -> Result<Option<f64>> {
    let t = model.config.seq_len;
    // Summed on the device and read once, so batches queue without a sync each.
    let zero = || Tensor::zeros([], (Kind::Double, model.device()));
    let (mut nats, mut bytes) = (zero(), zero());
    let mut seen = 0;
    let max_tokens = max_tokens.div_ceil(comm.size());
    for b in eval_batches(data, batch, t, comm.rank(), comm.size()) {
        if seen >= max_tokens {
            break;
        }
        let ids = to_device_ids(&b.tokens, b.rows, b.cols, model.device());
        let (x, y) = (ids.narrow(1, 0, t as i64), ids.narrow(1, 1, t as i64));
        let losses = model.token_losses(&x, &y);
        let w = bytes_of.index_select(0, &y.reshape([-1]));
        let counted = w.gt(0.0).to_kind(Kind::Float);
        nats += (losses * counted).sum(Kind::Double);
        bytes += w.sum(Kind::Double);
        seen += b.rows * t;
    }
    let sums = Tensor::stack(&[nats, bytes], 0);
    comm.all_reduce_sum(&sums)?;
    let (nats, bytes) = (sums.double_value(&[0]), sums.double_value(&[1]));
    Ok((bytes > 0.0).then(|| nats / std::f64::consts::LN_2 / bytes))
}

/// Trains as configured; with `resume`, continues from the newest checkpoint in
/// `out/checkpoints` (written by any number of ranks). `stop` is asked before each step
/// (with the number of steps done): when it says so on any rank, the loop saves a
/// checkpoint and returns. With `WORLD_SIZE` set, this process is one rank of a
/// data-parallel run ([`World::from_env`]); rank 0 reports and writes the metrics.
pub fn pretrain(
    cfg: &TrainConfig,
    resume: bool,
    report: &mut dyn FnMut(Event),
    stop: &dyn Fn(u64) -> bool,
) -> Result<TrainerState> {
    cfg.validate()?;
    let world = World::from_env()?;
    let dev = device(&cfg.train.device, world.local_rank)?;
    let comm = Comm::connect(world, dev)?;
    let (rank, ranks) = (comm.rank(), comm.size());
    let mut report = |event: Event| {
        if rank == 0 {
            report(event)
        }
    };
    let manifest = Manifest::load(&cfg.data.pack)?;
    let tok_path = cfg
        .data
        .tokenizer
        .clone()
        .unwrap_or_else(|| PathBuf::from(&manifest.tokenizer_path));
    let bpe = cxxlm_tokenizer::load(&tok_path).map_err(|e| TrainError::Config(e.to_string()))?;
    manifest.check_tokenizer(&cfg.data.pack, &bpe)?;
    let model_config = ModelConfig::resolve(&cfg.model, bpe.vocab_size())?;
    let seq = model_config.seq_len;
    let run = &cfg.train;
    let micro_tokens = run.device_batch * seq * ranks;
    let ckpt_root = cfg.out.join("checkpoints");
    // Left to the device count (0), the batch is the first start's: a run resumed on
    // another number of ranks keeps it, with more or fewer micro-batches.
    let started_with = match (resume, run.total_batch_tokens) {
        (true, 0) => checkpoint::latest(&ckpt_root)
            .map(|dir| checkpoint::read_state(&dir))
            .transpose()?
            .and_then(|s| s.run.get("total_batch_tokens")?.as_u64()),
        _ => None,
    };
    let total_batch = match (run.total_batch_tokens, started_with) {
        (0, Some(tokens)) => tokens as usize,
        (0, None) => micro_tokens,
        (tokens, _) => tokens,
    };
    if run.device_batch == 0 || total_batch % micro_tokens != 0 {
        return Err(TrainError::Config(format!(
            "train.total_batch_tokens ({total_batch}) must be a multiple of device_batch x seq_len x ranks ({} x {seq} x {ranks})",
            run.device_batch
        )));
    }
    if cfg.optim.matrices == crate::Matrices::Adamw && cfg.optim.matrix_lr > 0.01 {
        return Err(TrainError::Config(format!(
            "optim.matrix_lr = {} is a Muon rate: with optim.matrices = \"adamw\" give AdamW's (3e-4, say)",
            cfg.optim.matrix_lr
        )));
    }
    let grad_accum = total_batch / micro_tokens;
    let mut steps = if run.steps > 0 {
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
    let mut loader = Loader::new(
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
    let mut model = Gpt::new(model_config.clone(), dev, run.seed)?;
    let backward = choose_backward(&mut model)?;
    let mut optimizer = Optimizer::new(
        model.params(),
        model_config.width,
        cfg.optim.clone(),
        rank,
        ranks,
    );
    if let Some(fused) = model.fused() {
        optimizer.use_fused(fused);
    }
    // What a resumed run must share with the run that wrote the checkpoint.
    let run_identity = json!({
        "device_batch": run.device_batch,
        "total_batch_tokens": total_batch,
        "steps": steps,
        "time_budget": run.time_budget,
        "seed": run.seed,
        "loader": cfg.data.loader,
        "optim": cfg.optim,
        "schedule": cfg.schedule,
    });

    std::fs::create_dir_all(&ckpt_root).map_err(|e| TrainError::io(&ckpt_root, e))?;
    let mut state = TrainerState {
        step: 0,
        total_steps: steps,
        tokens: 0,
        loss_ema: 0.0,
        loader: loader.state().clone(),
        tokenizer_sha256: manifest.settings.tokenizer_sha256.clone(),
        model: model_config.clone(),
        run: run_identity.clone(),
        world: ranks,
        files: Default::default(),
        checksum: String::new(),
    };
    let mut resumed_from = None;
    if resume {
        if let Some(dir) = checkpoint::latest(&ckpt_root) {
            let loaded = checkpoint::load(&dir)?;
            let bad = |message: String| TrainError::Checkpoint {
                path: dir.clone(),
                message,
            };
            if loaded.state.model != model_config {
                return Err(bad(format!(
                    "was written by another model ({:?}); this config asks for {:?}",
                    loaded.state.model, model_config
                )));
            }
            if loaded.state.tokenizer_sha256 != state.tokenizer_sha256 {
                return Err(bad("was trained with another tokenizer".into()));
            }
            if loaded.state.run != run_identity {
                return Err(bad(format!(
                    "was written with other training settings ({}); resume with those, or start a new --out",
                    loaded.state.run
                )));
            }
            model.load(&loaded.model)?;
            optimizer.load_state(&loaded.optimizer).map_err(bad)?;
            loader.restore(loaded.state.loader.clone())?;
            resumed_from = Some(loaded.state.step);
            state = loaded.state;
            // A fitted step count lives in the checkpoint, not in the config.
            steps = state.total_steps;
        }
    } else if checkpoint::latest(&ckpt_root).is_some() {
        return Err(TrainError::Config(format!(
            "{} already holds checkpoints: pass --resume to continue, or choose another out directory",
            ckpt_root.display()
        )));
    }
    report(Event::Start {
        model: model_config.clone(),
        params: model.param_count(),
        device: format!("{dev:?}"),
        ranks,
        steps,
        grad_accum,
        resumed_from,
        backward,
    });
    let mut metrics = match rank {
        0 => Some(Metrics::open(&cfg.out, resumed_from)?),
        _ => None,
    };
    let bytes_of = token_bytes(&bpe, dev);
    let bos = bpe.special_id("<|bos|>");
    let eos = bpe.special_id("<|eos|>");
    let flops_per_token = model_config.flops_per_token();
    let mut peak_memory = 0u64;
    let mut step_times: Vec<f64> = Vec::new();

    let save = |state: &TrainerState, model: &Gpt, optimizer: &Optimizer| {
        checkpoint::save(
            &ckpt_root,
            state.clone(),
            model.params(),
            &optimizer.state(),
            cfg.checkpoint.keep,
            &comm,
        )
    };

    // The next step's first micro-batch, read while the GPU finishes this step (the loader
    // position in `state` stays the one before it, for checkpoints).
    let mut prefetched: Option<cxxlm_pack::loader::Batch> = None;
    loop {
        let step = state.step;
        let last = step == steps;
        if cfg.eval.every > 0 && (step.is_multiple_of(cfg.eval.every) || last) {
            let bpb = tch::no_grad(|| {
                bits_per_byte(
                    &model,
                    &val,
                    run.device_batch,
                    cfg.eval.tokens,
                    &bytes_of,
                    &comm,
                )
            })?;
            match bpb {
                Some(bpb) => {
                    let mut f = Map::new();
                    f.insert("val_bpb".into(), bpb.into());
                    if let Some(m) = &mut metrics {
                        m.log(step, &f)?;
                    }
                    report(Event::Eval { step, val_bpb: bpb });
                }
                None => report(Event::Warning(format!(
                    "the validation split holds less than one window of {} tokens: no bits per byte",
                    seq + 1
                ))),
            }
            let samples = if rank == 0 { cfg.eval.samples } else { 0 };
            for (i, prompt) in SAMPLE_PROMPTS.iter().take(samples).enumerate() {
                let mut ids: Vec<u32> = bos.into_iter().collect();
                ids.extend(bpe.encode(prompt));
                let sampling = Sampling {
                    max_new_tokens: cfg.eval.sample_tokens,
                    seed: run.seed + i as u64,
                    ..Default::default()
                };
                let out = model
                    .generate(&[ids], &sampling, &mut |_, t| t.last().copied() == eos)
                    .remove(0);
                let completion = String::from_utf8_lossy(&bpe.decode(&out)).into_owned();
                report(Event::Sample {
                    step,
                    prompt: prompt.to_string(),
                    completion,
                });
            }
        }
        if last {
            break;
        }
        if comm.any(stop(step), dev)? {
            report(Event::Warning(format!(
                "stopping at step {step}; rerun with --resume to continue"
            )));
            report(Event::Checkpoint(save(&state, &model, &optimizer)?));
            comm.finish()?;
            return Ok(state);
        }

        let started = Instant::now();
        let loader_before = state.loader.clone();
        let lr_scale = cfg.schedule.lr_scale(step, steps);
        let mut micro_losses = Vec::with_capacity(grad_accum);
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            for _ in 0..grad_accum {
                let b = prefetched.take().unwrap_or_else(|| loader.next_batch());
                let ids = to_device_ids(&b.tokens, b.rows, b.cols, dev);
                let (x, y) = (ids.narrow(1, 0, seq as i64), ids.narrow(1, 1, seq as i64));
                micro_losses.push(model.forward_backward(&x, &y, 1.0 / grad_accum as f64));
            }
        }));
        if let Err(panic) = outcome {
            let message = cxxlm_model::panic_message(panic.as_ref());
            if message.contains("out of memory") {
                return Err(TrainError::OutOfMemory {
                    step,
                    device_batch: run.device_batch,
                });
            }
            return Err(TrainError::Torch(message));
        }
        let losses = Tensor::stack(&micro_losses, 0);
        comm.all_reduce_sum(&losses)?;
        let values: Vec<f64> = Vec::<f64>::try_from(&(losses.to_kind(Kind::Double) / ranks as f64))
            .map_err(|e| TrainError::Torch(e.to_string()))?;
        if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
            let mut before = state.clone();
            before.loader = loader_before;
            let saved = save(&before, &model, &optimizer)?;
            return Err(TrainError::NonFinite {
                step,
                micro_batch: bad,
                loss: values[bad],
                saved,
            });
        }
        let forward_backward_seconds = started.elapsed().as_secs_f64();
        let loss = values.iter().sum::<f64>() / grad_accum as f64;
        let grad_norm = optimizer.step(step, lr_scale, &comm)?;
        let loader_after = loader.state().clone();
        if step + 1 < steps {
            prefetched = Some(loader.next_batch());
        }
        let grad_norm = grad_norm.double_value(&[]);
        optimizer.zero_grad();
        if let Device::Cuda(index) = dev {
            tch::Cuda::synchronize(index as i64);
        }
        let seconds = started.elapsed().as_secs_f64();

        state.step += 1;
        state.tokens += total_batch as u64;
        state.loader = loader_after;
        let ema_before = state.loss_ema / (1.0 - EMA_BETA.powi(step as i32)).max(1e-12);
        state.loss_ema = EMA_BETA * state.loss_ema + (1.0 - EMA_BETA) * loss;
        let loss_ema = state.loss_ema / (1.0 - EMA_BETA.powi(state.step as i32));
        let tok_s = total_batch as f64 / seconds;
        // Per GPU: every rank does its share of the step's tokens.
        let mfu = if dev.is_cuda() {
            flops_per_token * tok_s / (cfg.log.peak_flops * ranks as f64)
        } else {
            0.0
        };
        if let Some(used) = cuda::used_bytes() {
            peak_memory = peak_memory.max(used);
        }
        let gib = peak_memory as f64 / (1u64 << 30) as f64;
        // torch's allocator's peak (PyTorch's max_memory_allocated), since the run began.
        let allocated = match dev {
            Device::Cuda(index) => cxxlm_cuda::peak_allocated(index).unwrap_or(0),
            _ => 0,
        } as f64
            / (1u64 << 30) as f64;
        let fields = json!({
            "loss": loss, "loss_ema": loss_ema, "lr_scale": lr_scale, "grad_norm": grad_norm,
            "tok_s": tok_s, "mfu": mfu, "gpu_memory_gib": gib, "gpu_peak_allocated_gib": allocated,
            "tokens": state.tokens,
            "step_seconds": seconds, "forward_backward_seconds": forward_backward_seconds,
        });
        if let Some(m) = &mut metrics {
            m.log(state.step, fields.as_object().expect("object"))?;
        }
        if run.time_budget > 0.0 && state.step <= FIT_AFTER_STEPS {
            step_times.push(seconds);
        }
        if run.time_budget > 0.0 && state.step == FIT_AFTER_STEPS && steps > state.step {
            let (fitted, step_seconds) = fit_steps(run.time_budget, &step_times, state.step, steps);
            // Every rank must run the same number of steps: rank 0's fit decides.
            steps = comm.from_rank0(fitted as f64, dev)? as u64;
            state.total_steps = steps;
            report(Event::StepsFitted {
                steps,
                step_seconds,
            });
        }
        report(Event::Step {
            step: state.step,
            steps,
            loss,
            loss_ema,
            lr_scale,
            tok_s,
            mfu,
            gpu_memory_gib: gib,
        });
        if step > 10 && cfg.log.mfu_warn > 0.0 && mfu < cfg.log.mfu_warn {
            report(Event::Warning(format!(
                "MFU {:.1}% at step {} is under log.mfu_warn ({:.0}%)",
                mfu * 100.0,
                state.step,
                cfg.log.mfu_warn * 100.0
            )));
        }
        let spiked = step > 20 && loss > cfg.log.spike_factor * ema_before;
        if spiked {
            report(Event::Warning(format!(
                "loss spike at step {}: {loss:.3} against a moving average of {ema_before:.3}; checkpointing",
                state.step
            )));
        }
        let due = cfg.checkpoint.every > 0 && state.step.is_multiple_of(cfg.checkpoint.every);
        if spiked || due || state.step == steps {
            report(Event::Checkpoint(save(&state, &model, &optimizer)?));
        }
    }
    comm.finish()?;
    Ok(state)
}

/// Steps that fit `budget` seconds at the median time of the steps measured so far
/// (the first two, which warm up kernels and allocators, left out when there are more),
/// between `done` and the configured `upper`; and that median.
fn fit_steps(budget: f64, times: &[f64], done: u64, upper: u64) -> (u64, f64) {
    let mut t: Vec<f64> = times
        .iter()
        .skip(if times.len() > 4 { 2 } else { 0 })
        .copied()
        .collect();
    t.sort_by(f64::total_cmp);
    let median = t.get(t.len() / 2).copied().unwrap_or(f64::INFINITY);
    (((budget / median) as u64).clamp(done, upper), median)
}

/// The explicit pass with fused kernels on CUDA unless `CXXLM_FUSED=0`, autograd
/// otherwise; `CXXLM_FUSED=reference` runs the explicit pass in plain tch operations on
/// any device. Says which, and why not the fused kernels.
fn choose_backward(model: &mut Gpt) -> Result<String> {
    match std::env::var("CXXLM_FUSED").as_deref() {
        Ok("0") => return Ok("autograd (CXXLM_FUSED=0)".into()),
        Ok("reference") => {
            model.set_fused(Some(cxxlm_cuda::Fused::Reference))?;
            return Ok("explicit with reference steps (CXXLM_FUSED=reference)".into());
        }
        _ => {}
    }
    if !model.device().is_cuda() {
        return Ok("autograd".into());
    }
    Ok(match model.use_fused_kernels() {
        Ok(()) => "explicit with fused kernels".into(),
        Err(why) => format!("autograd (no fused kernels: {why})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_time_budget_fits_the_step_count_to_the_measured_step_time() {
        let warm = [9.0, 5.0, 1.0, 1.1, 0.9, 1.0, 1.0, 1.2, 1.0, 1.0];
        assert_eq!(fit_steps(500.0, &warm, 10, 1_000_000), (500, 1.0));
        assert_eq!(
            fit_steps(500.0, &warm, 10, 300).0,
            300,
            "never above the configured steps"
        );
        assert_eq!(
            fit_steps(2.0, &warm, 10, 300).0,
            10,
            "never below the steps done"
        );
    }
}
