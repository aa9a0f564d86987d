//! The training loop every stage shares (pretraining, SFT, and next RL). A stage brings a
//! [`BatchSource`] (its data, as micro-batches of token windows), a [`Loss`] and an
//! [`Evaluation`]; the loop does the rest in one place: the loss normalized by the
//! supervised targets of the whole step (all micro-batches, all ranks), the optimizer and
//! its schedule, metrics, checkpoints, resuming, stop requests, time budgets and data
//! parallelism.

use cxxlm_cuda::stream::{Event as DeviceEvent, Stream};
use cxxlm_model::{Gpt, ModelConfig, Packing, Phases, WeightStore};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, TrainerState};
use crate::dist::{Comm, World};
use crate::fsdp::FullSharding;
use crate::memory::gib;
use crate::metrics::Metrics;
use crate::optim::{OptimConfig, Optimizer, Schedule, Sharding};
use crate::pretrain::{CheckpointConfig, LogConfig, RunConfig};
use crate::{cuda, Result, TrainError};

/// One micro-batch of one rank: rows of `T + 1` tokens, whose first `T` are the inputs
/// and last `T` the targets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MicroBatch {
    pub rows: usize,
    pub cols: usize,
    /// Row-major `(rows, cols)`.
    pub tokens: Vec<u32>,
    /// Which targets `(rows, cols - 1)` are learned; None: every one.
    pub supervised: Option<Vec<bool>>,
    /// The lengths of the examples packed side by side in each row, in order, when each
    /// must attend only to itself from position 0 (the rest of a row is padding); None:
    /// each row is attended as one sequence.
    pub examples: Option<Vec<Vec<usize>>>,
    /// With `examples`: each row's first example is a prefix its later examples attend to
    /// as well, their positions continuing it (RL's samples of one prompt).
    #[serde(default)]
    pub shared_prefix: bool,
    /// What a policy-gradient loss weighs each target by (RL); None: nothing.
    pub weights: Option<TargetWeights>,
}

/// Per target of sampled completions, row-major `(rows, cols - 1)`, read where the
/// target is supervised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetWeights {
    /// The advantage of the completion the target belongs to.
    pub advantages: Vec<f32>,
    /// The target's log-probability under the policy that sampled it, when that is no
    /// longer the policy being trained (several updates per batch); None: the current
    /// policy's own, so that the ratio is exactly 1.
    pub old_logprobs: Option<Vec<f32>>,
    /// Under the frozen reference model (the KL term); None: no KL term.
    pub ref_logprobs: Option<Vec<f32>>,
}

impl MicroBatch {
    /// Targets learned from.
    pub fn supervised_count(&self) -> usize {
        match &self.supervised {
            Some(mask) => mask.iter().filter(|&&s| s).count(),
            None => self.rows * (self.cols - 1),
        }
    }

    /// Tokens of the rows that belong to no example; in rows of one sequence each (RL's
    /// completions, embedding pairs), the tokens past the last learned target.
    pub fn padding(&self) -> usize {
        match (&self.examples, &self.supervised) {
            (Some(rows), _) => rows
                .iter()
                .map(|row| self.cols - row.iter().sum::<usize>().min(self.cols))
                .sum(),
            (None, Some(mask)) => mask
                .chunks(self.cols - 1)
                .map(|row| match row.iter().rposition(|&s| s) {
                    // The target at `k` is the token at `k + 1`.
                    Some(k) => self.cols - (k + 2),
                    None => self.cols,
                })
                .sum(),
            (None, None) => 0,
        }
    }

    /// Inputs, targets (-1 where not learned) and packing, on `device`.
    pub fn to_device(&self, device: Device) -> DeviceBatch {
        let t = (self.cols - 1) as i64;
        let ids = to_device_ids(&self.tokens, self.rows, self.cols, device);
        let (inputs, targets) = (ids.narrow(1, 0, t), ids.narrow(1, 1, t));
        let targets = match &self.supervised {
            Some(mask) => {
                let hidden: Vec<bool> = mask.iter().map(|&s| !s).collect();
                let hidden = Tensor::from_slice(&hidden)
                    .view([self.rows as i64, t])
                    .to_device(device);
                targets.masked_fill(&hidden, -1)
            }
            None => targets,
        };
        let shape = [self.rows as i64, t];
        let per_target = |v: &[f32]| Tensor::from_slice(v).view(shape).to_device(device);
        DeviceBatch {
            packing: self.examples.as_ref().map(|rows| match self.shared_prefix {
                true => Packing::with_shared_prefix(rows, t as usize, device),
                false => Packing::new(rows, t as usize, device),
            }),
            weights: self.weights.as_ref().map(|w| DeviceWeights {
                advantages: per_target(&w.advantages),
                old_logprobs: w.old_logprobs.as_deref().map(per_target),
                ref_logprobs: w.ref_logprobs.as_deref().map(per_target),
            }),
            inputs,
            targets,
        }
    }
}

/// [`TargetWeights`] on the device, `(B, T)` each.
pub struct DeviceWeights {
    pub advantages: Tensor,
    pub old_logprobs: Option<Tensor>,
    pub ref_logprobs: Option<Tensor>,
}

/// A micro-batch on the device.
pub struct DeviceBatch {
    /// `(B, T)` token ids.
    pub inputs: Tensor,
    /// `(B, T)` target ids, negative where nothing is learned.
    pub targets: Tensor,
    pub packing: Option<Packing>,
    pub weights: Option<DeviceWeights>,
}

/// Where a stage's micro-batches come from. Every rank reads its own share of one global
/// stream, so that the stream does not depend on the number of ranks.
pub trait BatchSource {
    /// This rank's next micro-batch; `model` is the policy as trained so far (RL samples
    /// its batches with it).
    fn next_batch(&mut self, model: &Gpt, comm: &Comm) -> Result<MicroBatch>;
    /// [`BatchSource::next_batch`] for the first micro-batch of a step, which the run may
    /// not take: a source whose batches take long to make (RL's rollouts) gives its batch up
    /// once `stopping()` turns true on any rank, on every rank alike, with
    /// [`TrainError::Interrupted`], so that a stop asked for is not kept waiting.
    fn next_batch_unless(
        &mut self,
        model: &Gpt,
        comm: &Comm,
        _stopping: &dyn Fn() -> bool,
    ) -> Result<MicroBatch> {
        self.next_batch(model, comm)
    }
    /// Where the source stands: restoring it gives the batches from here again.
    fn state(&self) -> Value;
    /// Restores `state`: this rank's own (`own`), or rank 0's where the checkpoint was
    /// written by another number of ranks.
    fn restore(&mut self, state: &Value, own: bool) -> Result<()>;
    /// Whether every target of every batch is learned: a step's count of supervised
    /// targets is then its size, known without reading its batches first.
    fn dense(&self) -> bool;
    /// The data, as errors name it.
    fn describe(&self) -> String;
    /// Figures of the batches of the step just taken, over every rank, for
    /// `metrics.jsonl`. Every rank calls it once a step.
    fn figures(&mut self, _comm: &Comm) -> Result<Map<String, Value>> {
        Ok(Map::new())
    }
    /// Warnings about the batches read since the last call.
    fn warnings(&mut self) -> Vec<String> {
        Vec::new()
    }
}

/// What the loop minimizes.
pub trait Loss {
    /// Forward and backward of one micro-batch: adds the gradient of `scale` x its summed
    /// loss to the weights' gradients and returns that sum (a device scalar). `weights`:
    /// where the explicit pass reads the weights and adds their gradients under full
    /// sharding (None: the model's own; a loss computed by autograd never gets one).
    fn forward_backward(
        &mut self,
        model: &Gpt,
        weights: Option<&dyn WeightStore>,
        batch: &DeviceBatch,
        scale: f64,
    ) -> Tensor;
    /// What the step's summed loss is divided by, given its supervised targets over every
    /// micro-batch and rank: by default that count (token-level normalization).
    fn normalizer(&self, supervised: f64) -> f64 {
        supervised
    }
    /// Figures of the step's passes, over every rank, for `metrics.jsonl`. Every rank
    /// calls it once a step, after the passes and before the update.
    fn figures(&mut self, _comm: &Comm) -> Result<Map<String, Value>> {
        Ok(Map::new())
    }
    /// Whether a loss far above its moving average means trouble (a checkpoint and a
    /// warning): not for losses without a scale of their own.
    fn watches_spikes(&self) -> bool {
        true
    }
    /// Why the step's update must not be made, read from its [`Loss::figures`] (a run
    /// that has run away); None: it may.
    fn refusal(&self, _figures: &Map<String, Value>) -> Option<String> {
        None
    }
}

/// Cross-entropy of the supervised targets (pretraining and SFT).
pub struct CrossEntropy;

impl Loss for CrossEntropy {
    fn forward_backward(
        &mut self,
        model: &Gpt,
        weights: Option<&dyn WeightStore>,
        batch: &DeviceBatch,
        scale: f64,
    ) -> Tensor {
        let (inputs, targets, packing) = (&batch.inputs, &batch.targets, batch.packing.as_ref());
        match weights {
            Some(store) => model.forward_backward_from(store, inputs, targets, packing, scale),
            None => model.forward_backward(inputs, targets, packing, scale),
        }
    }
}

/// What a stage measures at the start, every `eval_every` steps and at the end.
pub trait Evaluation {
    /// Figures for `metrics.jsonl` (every rank takes part); events go to `report`.
    fn evaluate(
        &mut self,
        step: u64,
        model: &Gpt,
        comm: &Comm,
        report: &mut dyn FnMut(Event),
    ) -> Result<Map<String, Value>>;
}

/// A step's figures on a GPU: its model FLOPs utilization and the memory in use.
#[derive(Debug, Clone, Copy)]
pub struct GpuStep {
    pub mfu: f64,
    pub memory_gib: f64,
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
        /// None on a CPU.
        gpu: Option<GpuStep>,
    },
    /// Figures of an evaluation, by name (`val_bpb`, `val_loss`, ...).
    Eval {
        step: u64,
        figures: Vec<(String, f64)>,
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
    /// What the stage read or set up, to show as it is.
    Info(String),
    Warning(String),
    Checkpoint(PathBuf),
}

const EMA_BETA: f64 = 0.9;

/// With a time budget, the step count is fitted once this many steps are done.
const FIT_AFTER_STEPS: u64 = 10;

/// The device named in the config; CUDA means this rank's GPU (`LOCAL_RANK`).
pub fn device(name: &str, local_rank: usize) -> Result<Device> {
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

/// Token ids `(rows, cols)` on `device`; to a GPU through pinned memory, without waiting
/// for the work already queued there. tch's `pin_memory` passes a device, which torch
/// deprecates with two warnings per call; `_pin_memory` (what it calls) warns about none.
pub fn to_device_ids(tokens: &[u32], rows: usize, cols: usize, device: Device) -> Tensor {
    let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    let host = Tensor::from_slice(&ids).view([rows as i64, cols as i64]);
    match device {
        Device::Cuda(_) => {
            host.internal_pin_memory(device)
                .to_device_(device, Kind::Int64, true, false)
        }
        _ => host.to_device(device),
    }
}

/// Tokens per step over all ranks, and micro-batches per step, from `run`: rows of
/// `seq` positions. Left to the device count (`total_batch_tokens = 0`), the batch is the
/// first start's: a run resumed on another number of ranks keeps it.
pub fn batch_shape(
    run: &RunConfig,
    seq: usize,
    ranks: usize,
    ckpt_root: &Path,
    resume: bool,
) -> Result<(usize, usize)> {
    let micro_tokens = run.device_batch * seq * ranks;
    let started_with = match (resume, run.total_batch_tokens) {
        (true, 0) => checkpoint::latest(ckpt_root)
            .map(|dir| checkpoint::read_state(&dir))
            .transpose()?
            .and_then(|s| s.run.get("total_batch_tokens")?.as_u64()),
        _ => None,
    };
    let total = match (run.total_batch_tokens, started_with) {
        (0, Some(tokens)) => tokens as usize,
        (0, None) => micro_tokens,
        (tokens, _) => tokens,
    };
    if run.device_batch == 0 || total % micro_tokens != 0 {
        return Err(TrainError::Config(format!(
            "train.total_batch_tokens ({total}) must be a multiple of device_batch x seq_len x ranks ({} x {seq} x {ranks})",
            run.device_batch
        )));
    }
    Ok((total, total / micro_tokens))
}

/// The explicit pass with fused kernels on CUDA unless `CXXLM_FUSED=0`, autograd
/// otherwise; `CXXLM_FUSED=reference` runs the explicit pass in plain tch operations on
/// any device. Says which, and why not the fused kernels. `packed`: the batches hold
/// examples packed into rows, which the kernels' check covers then.
pub fn choose_backward(model: &mut Gpt, packed: bool) -> Result<String> {
    match std::env::var("CXXLM_FUSED").as_deref() {
        Ok("0") => return Ok("autograd (CXXLM_FUSED=0)".into()),
        Ok("reference") => {
            model.set_fused(Some(cxxlm_cuda::Fused::Reference))?;
            return Ok("explicit with reference steps (CXXLM_FUSED=reference)".into());
        }
        _ => {}
    }
    if !model.device().is_cuda() {
        return Ok(match model.fused() {
            Some(_) => "explicit with reference steps".into(),
            None => "autograd".into(),
        });
    }
    Ok(match model.use_fused_kernels(packed) {
        Ok(()) => "explicit with fused kernels".into(),
        Err(why) => format!("autograd (no fused kernels: {why})"),
    })
}

/// Full sharding gathers each layer's weights inside the explicit pass: a stage whose loss
/// autograd computes cannot have it, and a model `chosen` to train by autograd takes the
/// explicit pass with the reference steps instead. Says how gradients are computed then.
fn explicit_for_full_sharding(
    model: &mut Gpt,
    requested: Backward,
    chosen: String,
) -> Result<String> {
    let refuse = |why: String| {
        TrainError::Config(format!(
            "train.sharding = \"full\" needs the explicit pass, which gathers each layer's weights, but {why}: use train.sharding = \"optimizer\""
        ))
    };
    if let Backward::Autograd(why) = requested {
        return Err(refuse(format!(
            "this stage computes its loss by autograd ({why})"
        )));
    }
    if model.fused().is_some() {
        return Ok(chosen);
    }
    model
        .set_fused(Some(cxxlm_cuda::Fused::Reference))
        .map_err(|e| refuse(format!("the model cannot take it ({e})")))?;
    Ok(format!(
        "explicit with reference steps (full sharding; else {chosen})"
    ))
}

/// One stage, set up: its model, optimizer, data, loss and evaluation, and how it steps.
pub struct Stage<'a> {
    /// Run directory: checkpoints, metrics, TensorBoard events.
    pub out: &'a Path,
    pub model: Gpt,
    pub optimizer: Optimizer,
    /// With `train.sharding = "full"`, how the weights are spread over the ranks (the
    /// model's own are released then, and given back only to evaluate).
    pub sharding: Option<FullSharding>,
    pub source: &'a mut dyn BatchSource,
    pub loss: &'a mut dyn Loss,
    pub evaluation: &'a mut dyn Evaluation,
    pub schedule: Schedule,
    pub steps: u64,
    pub grad_accum: usize,
    /// Target positions per step over all ranks (`B x T x micro-batches x ranks`).
    pub step_tokens: usize,
    pub device_batch: usize,
    /// Evaluate every this many steps (and at the start and the end); 0: never.
    pub eval_every: u64,
    pub time_budget: f64,
    pub checkpoint: CheckpointConfig,
    pub log: LogConfig,
    /// Optimizer steps taken before this stage: an optimizer whose moments were carried
    /// over continues its step count (bias correction, momentum warmup) from there.
    pub optimizer_steps_before: u64,
    /// How gradients are computed (for the start line).
    pub backward: String,
    /// The state of a fresh start: step 0, the source's first position, and what a resumed
    /// run must share with the run that wrote its checkpoint (model, tokenizer, `run`).
    pub fresh: TrainerState,
}

/// `common()` for a stage's config, whose shared sections are fields of these names.
macro_rules! shared_sections {
    ($config:ty) => {
        impl $config {
            /// The sections every stage shares.
            pub fn common(&self) -> $crate::trainer::Common<'_> {
                $crate::trainer::Common {
                    out: &self.out,
                    train: &self.train,
                    optim: &self.optim,
                    schedule: &self.schedule,
                    checkpoint: &self.checkpoint,
                    log: &self.log,
                }
            }
        }
    };
}
pub(crate) use shared_sections;

/// The config sections every stage shares.
#[derive(Clone, Copy)]
pub struct Common<'a> {
    /// Run directory: checkpoints, metrics, TensorBoard events.
    pub out: &'a Path,
    pub train: &'a RunConfig,
    pub optim: &'a OptimConfig,
    pub schedule: &'a Schedule,
    pub checkpoint: &'a CheckpointConfig,
    pub log: &'a LogConfig,
}

/// How a stage's gradients may be computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Backward {
    /// The explicit pass with fused kernels where it can run ([`choose_backward`]);
    /// `packed`: the batches hold examples packed into rows.
    Explicit { packed: bool },
    /// Autograd, for this reason (a loss the explicit pass does not compute).
    Autograd(&'static str),
}

/// What one stage brings to [`Stage::new`] besides the shared sections.
pub struct Parts<'a> {
    /// The model, its weights set (fresh or loaded).
    pub model: Gpt,
    pub backward: Backward,
    pub source: &'a mut dyn BatchSource,
    pub loss: &'a mut dyn Loss,
    pub evaluation: &'a mut dyn Evaluation,
    pub steps: u64,
    pub grad_accum: usize,
    pub step_tokens: usize,
    pub eval_every: u64,
    pub tokenizer_sha256: String,
    /// The stage's own settings that a resumed run must share (an object); the shared
    /// sections' are added.
    pub identity: Value,
}

/// This process's place in the run (`WORLD_SIZE` etc., [`World::from_env`]): its
/// connection to the other ranks, and its device (`train.device`).
pub fn connect(device_name: &str) -> Result<(Comm, Device)> {
    let world = World::from_env()?;
    let dev = device(device_name, world.local_rank)?;
    Ok((Comm::connect(world, dev)?, dev))
}

impl<'a> Stage<'a> {
    /// A stage from the shared sections and its own parts: the optimizer over the
    /// model's weights, the backward pass chosen, and the state of a fresh start.
    pub fn new(common: Common<'a>, parts: Parts<'a>, comm: &Comm) -> Result<Self> {
        let Parts {
            mut model,
            backward,
            source,
            loss,
            evaluation,
            steps,
            grad_accum,
            step_tokens,
            eval_every,
            tokenizer_sha256,
            identity,
        } = parts;
        if common.optim.matrices == crate::Matrices::Adamw && common.optim.matrix_lr > 0.01 {
            return Err(TrainError::Config(format!(
                "optim.matrix_lr = {} is a Muon rate: with optim.matrices = \"adamw\" give AdamW's (3e-4, say)",
                common.optim.matrix_lr
            )));
        }
        let requested = backward;
        let mut backward = match requested {
            Backward::Explicit { packed } => choose_backward(&mut model, packed)?,
            Backward::Autograd(why) => format!("autograd ({why})"),
        };
        let full = common.train.sharding == Sharding::Full;
        if full {
            backward = explicit_for_full_sharding(&mut model, requested, backward)?;
        }
        let every = common.train.activation_checkpointing;
        if every > 0 {
            model.set_activation_checkpointing(every);
            backward += &match model.fused() {
                Some(_) => format!(", checkpointed layers: 1 in every {every} (their forward runs again in the backward pass)"),
                None => ", every activation kept (checkpointing is the explicit pass's)".into(),
            };
        }
        let config = model.config.clone();
        let mut optimizer = Optimizer::new(
            model.params(),
            config.width,
            common.optim.clone(),
            comm.rank(),
            comm.size(),
        );
        if let Some(fused) = model.fused() {
            if let Err(why) = optimizer.use_fused(fused, model.device()) {
                backward += &format!(", the optimizer in tch operations (its kernels disagree with their definitions: {why})");
            }
        }
        let sharding = full.then(|| {
            optimizer.shard_weights();
            let layout = FullSharding::new(&model, &optimizer, comm.size());
            model.release_weights();
            layout
        });
        let train = common.train;
        let mut run = json!({
            "device_batch": train.device_batch,
            "steps": steps,
            "time_budget": train.time_budget,
            "seed": train.seed,
            "optim": common.optim,
            "schedule": common.schedule,
        });
        if let (Some(run), Value::Object(own)) = (run.as_object_mut(), identity) {
            run.extend(own);
        }
        let fresh = TrainerState {
            step: 0,
            total_steps: steps,
            tokens: 0,
            loss_ema: 0.0,
            loader: source.state(),
            tokenizer_sha256,
            model: config,
            run,
            world: comm.size(),
            files: Default::default(),
            checksum: String::new(),
        };
        Ok(Stage {
            out: common.out,
            model,
            optimizer,
            sharding,
            source,
            loss,
            evaluation,
            schedule: common.schedule.clone(),
            steps,
            grad_accum,
            step_tokens,
            device_batch: train.device_batch,
            eval_every,
            time_budget: train.time_budget,
            checkpoint: common.checkpoint.clone(),
            log: common.log.clone(),
            optimizer_steps_before: 0,
            backward,
            fresh,
        })
    }
}

/// Trains `stage`; with `resume`, from the newest checkpoint in `out/checkpoints`
/// (written by any number of ranks), which must come from the same model, tokenizer and
/// settings. `stop` is asked before each step (with the number of steps done): when it
/// says so on any rank, the loop saves a checkpoint and returns. Rank 0 reports and
/// writes the metrics.
pub fn train(
    mut stage: Stage,
    comm: Comm,
    resume: bool,
    report: &mut dyn FnMut(Event),
    stop: &dyn Fn(u64) -> bool,
) -> Result<TrainerState> {
    let (rank, ranks) = (comm.rank(), comm.size());
    let dev = stage.model.device();
    // Times the passes on the device, whose work the host does not wait for.
    let device_clock = match dev {
        Device::Cuda(index) => Stream::current(index),
        _ => None,
    };
    let mut report = |event: Event| {
        if rank == 0 {
            report(event)
        }
    };
    let ckpt_root = stage.out.join("checkpoints");
    std::fs::create_dir_all(&ckpt_root).map_err(|e| TrainError::io(&ckpt_root, e))?;
    let mut state = stage.fresh.clone();
    let mut resumed_from = None;
    if resume {
        if let Some(dir) = checkpoint::latest(&ckpt_root) {
            let loaded = checkpoint::load(&dir)?;
            let bad = |message: String| TrainError::Checkpoint {
                path: dir.clone(),
                message,
            };
            if loaded.state.model != state.model {
                return Err(bad(format!(
                    "was written by another model ({:?}); this config asks for {:?}",
                    loaded.state.model, state.model
                )));
            }
            if loaded.state.tokenizer_sha256 != state.tokenizer_sha256 {
                return Err(bad("was trained with another tokenizer".into()));
            }
            if loaded.state.run != state.run {
                return Err(bad(format!(
                    "was written with other training settings ({}); resume with those, or start a new --out",
                    loaded.state.run
                )));
            }
            match &stage.sharding {
                Some(_) => stage.optimizer.load_weights(&loaded.model).map_err(bad)?,
                None => stage.model.load(&loaded.model)?,
            }
            stage.optimizer.load_state(&loaded.optimizer).map_err(bad)?;
            // A run of as many ranks goes on from each rank's own state; another takes
            // rank 0's.
            let own = (loaded.state.world == ranks).then(|| &loaded.sources[rank]);
            match own.and_then(Option::as_ref) {
                Some(mine) => stage.source.restore(mine, true)?,
                None => stage.source.restore(&loaded.state.loader, false)?,
            }
            resumed_from = Some(loaded.state.step);
            state = loaded.state;
        }
    } else if checkpoint::latest(&ckpt_root).is_some() {
        return Err(TrainError::Config(format!(
            "{} already holds checkpoints: pass --resume to continue, or choose another out directory",
            ckpt_root.display()
        )));
    }
    // A fitted step count lives in the checkpoint, not in the config.
    let mut steps = state.total_steps;
    report(Event::Start {
        model: state.model.clone(),
        params: stage.model.param_count(),
        device: format!("{dev:?}"),
        ranks,
        steps,
        grad_accum: stage.grad_accum,
        resumed_from,
        backward: stage.backward.clone(),
    });
    // Rank 0 writes the checkpoints: a run that could never save is refused by every rank.
    let free = (rank == 0)
        .then(|| checkpoint::free_bytes(stage.out))
        .flatten();
    let room = match free {
        Some(free) => checkpoint::check_room(
            stage.out,
            checkpoint::bytes(&state.model, &stage.optimizer.state(), ranks),
            free,
            stage.checkpoint.keep,
        ),
        None => Ok(None),
    };
    if comm.any(room.is_err(), dev)? {
        room?;
        return Err(TrainError::Config(
            "rank 0 has no room for a checkpoint".into(),
        ));
    }
    if let Ok(Some(w)) = room {
        report(Event::Warning(w));
    }
    let mut metrics = match rank {
        0 => Some(Metrics::open(stage.out, resumed_from)?),
        _ => None,
    };
    let flops_per_token = state.model.flops_per_token();
    let mut peak_memory = 0u64;
    let allocator = || match dev {
        Device::Cuda(index) => cxxlm_cuda::allocator_counts(index),
        _ => None,
    };
    let mut allocator_before = allocator();
    let mut step_times: Vec<f64> = Vec::new();
    let save = |state: &TrainerState,
                model: &Gpt,
                optimizer: &Optimizer,
                sharding: Option<&FullSharding>| {
        let gathered;
        let weights = match sharding {
            Some(s) => {
                gathered = s.gather_all(&comm, Device::Cpu)?;
                &gathered[..]
            }
            None => model.params(),
        };
        checkpoint::save(
            &ckpt_root,
            state.clone(),
            weights,
            &optimizer.state(),
            stage.checkpoint.keep,
            &comm,
        )
    };

    // The next step's first micro-batch, read while the GPU finishes this step (the
    // source's position in `state` stays the one before it, for checkpoints).
    let mut prefetched: Option<MicroBatch> = None;
    // A batch given up for a stop (every rank's alike): the run stops before the next step.
    let mut given_up = false;
    let mut phases = stage.log.phases.then(Phases::default);
    let mark = |phases: &mut Option<Phases>, name| {
        if let Some(p) = phases {
            p.mark(dev, name);
        }
    };
    loop {
        let step = state.step;
        let last = step == steps;
        // Before this step's evaluation, which the resumed run makes (once).
        if !last && (given_up || comm.any(stop(step), dev)?) {
            report(Event::Warning(format!(
                "stopping at step {step}{}; rerun with --resume to continue",
                if given_up { ", its batch given up" } else { "" }
            )));
            report(Event::Checkpoint(save(
                &state,
                &stage.model,
                &stage.optimizer,
                stage.sharding.as_ref(),
            )?));
            comm.finish()?;
            return Ok(state);
        }
        if stage.eval_every > 0 && (step.is_multiple_of(stage.eval_every) || last) {
            // Fully sharded, the model has its weights only while it is evaluated.
            if let Some(s) = &stage.sharding {
                stage.model.load(&s.gather_all(&comm, dev)?)?;
            }
            let figures = tch::no_grad(|| {
                stage
                    .evaluation
                    .evaluate(step, &stage.model, &comm, &mut report)
            });
            if stage.sharding.is_some() {
                stage.model.release_weights();
            }
            let figures = figures?;
            if !figures.is_empty() {
                if let Some(m) = &mut metrics {
                    m.log(step, &figures)?;
                }
                let figures = figures
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                    .collect();
                report(Event::Eval { step, figures });
            }
        }
        if last {
            break;
        }

        // The host's work after the last step's synchronization: metrics, evaluation,
        // checkpoints.
        mark(&mut phases, "between_steps");
        let started = Instant::now();
        let started_on_device = timed(&device_clock)?;
        let source_before = state.loader.clone();
        let lr_scale = stage.schedule.lr_scale(step, steps);
        let first = match prefetched.take() {
            Some(b) => b,
            None => {
                let batch = stage
                    .source
                    .next_batch_unless(&stage.model, &comm, &|| stop(step));
                match unless_given_up(batch)? {
                    Some(b) => b,
                    None => {
                        given_up = true;
                        continue;
                    }
                }
            }
        };
        mark(&mut phases, "batch");
        let store = stage.sharding.as_ref().map(|s| s.store(&comm));
        let counted = std::panic::catch_unwind(AssertUnwindSafe(|| {
            step_gradients(
                &stage.model,
                store.as_ref().map(|s| s as &dyn WeightStore),
                stage.loss,
                stage.source,
                first,
                stage.grad_accum,
                stage.step_tokens,
                &comm,
            )
        }));
        let counted = match counted {
            Ok(counted) => counted,
            Err(panic) => {
                let message = cxxlm_model::panic_message(panic.as_ref());
                if message.contains("out of memory") {
                    return Err(TrainError::OutOfMemory {
                        step,
                        device_batch: stage.device_batch,
                    });
                }
                return Err(TrainError::Torch(message));
            }
        };
        let StepGradients {
            micro_losses,
            supervised,
            normalizer,
            padding_share,
        } = match counted {
            Err(TrainError::NoSupervision { data, .. }) => {
                return Err(TrainError::NoSupervision { step, data })
            }
            other => other?,
        };
        if let Some(store) = store {
            store.finish()?;
        }
        mark(&mut phases, "forward_backward");
        let passes_on_device = timed(&device_clock)?;
        let passes_on_host = started.elapsed().as_secs_f64();
        let losses = Tensor::stack(&micro_losses, 0).to_kind(Kind::Double);
        comm.all_reduce_sum(&losses)?;
        let loss_figures = stage.loss.figures(&comm)?;
        if let Some(why) = stage.loss.refusal(&loss_figures) {
            return Err(TrainError::Guard(why));
        }
        mark(&mut phases, "loss_figures");
        // Launched without waiting for the passes: the device skips the update if the
        // loss or the gradient is not finite, which is read at the end of the step.
        let grad_norm = stage.optimizer.step(
            step + stage.optimizer_steps_before,
            lr_scale,
            &losses.sum(Kind::Double),
            &comm,
        )?;
        mark(&mut phases, "optimizer");
        let source_after = stage.source.state();
        // Read before the next step's first batch is.
        let mut stage_figures = stage.source.figures(&comm)?;
        stage_figures.extend(loss_figures);
        for w in stage.source.warnings() {
            report(Event::Warning(format!("step {}: {w}", step + 1)));
        }
        if step + 1 < steps {
            let batch = stage
                .source
                .next_batch_unless(&stage.model, &comm, &|| stop(step + 1));
            prefetched = unless_given_up(batch)?;
            given_up = prefetched.is_none();
        }
        mark(&mut phases, "next_batch");
        let values: Vec<f64> =
            Vec::<f64>::try_from(&losses).map_err(|e| TrainError::Torch(e.to_string()))?;
        let grad_norm = grad_norm.double_value(&[]);
        let bad = values.iter().position(|v| !v.is_finite());
        if bad.is_some() || !grad_norm.is_finite() {
            let mut before = state.clone();
            before.loader = source_before;
            let saved = save(
                &before,
                &stage.model,
                &stage.optimizer,
                stage.sharding.as_ref(),
            )?;
            return Err(match bad {
                Some(bad) => TrainError::NonFinite {
                    step,
                    micro_batch: bad,
                    loss: values[bad],
                    saved,
                },
                None => TrainError::NonFiniteGradient {
                    step,
                    norm: grad_norm,
                    saved,
                },
            });
        }
        let loss = values.iter().sum::<f64>() / normalizer;
        stage.optimizer.zero_grad();
        if let Device::Cuda(index) = dev {
            tch::Cuda::synchronize(index as i64);
        }
        mark(&mut phases, "zero_grad");
        let seconds = started.elapsed().as_secs_f64();
        let forward_backward_seconds = match (started_on_device, passes_on_device) {
            (Some(start), Some(end)) => end.seconds_since(&start).map_err(TrainError::Torch)?,
            _ => passes_on_host,
        };

        state.step += 1;
        state.tokens += stage.step_tokens as u64;
        state.loader = source_after;
        let ema_before = state.loss_ema / (1.0 - EMA_BETA.powi(step as i32)).max(1e-12);
        state.loss_ema = EMA_BETA * state.loss_ema + (1.0 - EMA_BETA) * loss;
        let loss_ema = state.loss_ema / (1.0 - EMA_BETA.powi(state.step as i32));
        let tok_s = stage.step_tokens as f64 / seconds;
        // Per GPU: every rank does its share of the step's tokens.
        let mfu = dev
            .is_cuda()
            .then(|| flops_per_token * tok_s / (stage.log.peak_flops * ranks as f64));
        if let Some(used) = cuda::used_bytes() {
            peak_memory = peak_memory.max(used);
        }
        // torch's allocator's peaks since the run began.
        let peak = match dev {
            Device::Cuda(index) => cxxlm_cuda::peak_memory(index).unwrap_or_default(),
            _ => Default::default(),
        };
        let used = gib(peak_memory);
        let (allocated, reserved) = (gib(peak.allocated), gib(peak.reserved));
        let mut fields = json!({
            "loss": loss, "loss_ema": loss_ema, "lr_scale": lr_scale, "grad_norm": grad_norm,
            "tok_s": tok_s, "mfu": mfu.unwrap_or(0.0), "gpu_memory_gib": used, "gpu_peak_allocated_gib": allocated,
            "gpu_peak_reserved_gib": reserved,
            "tokens": state.tokens,
            "step_seconds": seconds, "forward_backward_seconds": forward_backward_seconds,
        });
        // What the step cost torch's allocator: retries and cudaMallocs in steady state
        // mean its cache no longer fits the step's tensors (each retry synchronizes).
        let allocator_now = allocator();
        if let (Some(now), Some(before)) = (allocator_now, allocator_before) {
            fields["gpu_alloc_retries"] = (now.retries - before.retries).into();
            fields["gpu_device_allocs"] = (now.device_allocs - before.device_allocs).into();
        }
        allocator_before = allocator_now;
        if let Some(padding) = padding_share {
            fields["supervised_share"] = (supervised / stage.step_tokens as f64).into();
            fields["padding_share"] = padding.into();
        }
        if let Some(p) = &mut phases {
            let ms: Map<String, Value> = std::mem::take(&mut p.seconds)
                .into_iter()
                .map(|(name, s)| (name.to_string(), (s * 1e3).into()))
                .collect();
            fields["phase_ms"] = ms.into();
        }
        if let Some(fields) = fields.as_object_mut() {
            fields.extend(stage_figures);
        }
        if let Some(m) = &mut metrics {
            m.log(state.step, fields.as_object().expect("object"))?;
        }
        if stage.time_budget > 0.0 && state.step <= FIT_AFTER_STEPS {
            step_times.push(seconds);
        }
        if stage.time_budget > 0.0 && state.step == FIT_AFTER_STEPS && steps > state.step {
            let (fitted, step_seconds) =
                fit_steps(stage.time_budget, &step_times, state.step, steps);
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
            gpu: mfu.map(|mfu| GpuStep {
                mfu,
                memory_gib: used,
            }),
        });
        let warn = stage.log.mfu_warn;
        if let Some(mfu) = mfu.filter(|&m| step > 10 && warn > 0.0 && m < warn) {
            report(Event::Warning(format!(
                "MFU {:.1}% at step {} is under log.mfu_warn ({:.0}%)",
                mfu * 100.0,
                state.step,
                stage.log.mfu_warn * 100.0
            )));
        }
        let spiked =
            stage.loss.watches_spikes() && step > 20 && loss > stage.log.spike_factor * ema_before;
        if spiked {
            report(Event::Warning(format!(
                "loss spike at step {}: {loss:.3} against a moving average of {ema_before:.3}; checkpointing",
                state.step
            )));
        }
        let due = stage.checkpoint.every > 0 && state.step.is_multiple_of(stage.checkpoint.every);
        if spiked || due || state.step == steps {
            report(Event::Checkpoint(save(
                &state,
                &stage.model,
                &stage.optimizer,
                stage.sharding.as_ref(),
            )?));
        }
    }
    comm.finish()?;
    Ok(state)
}

/// One step's forward and backward passes.
pub struct StepGradients {
    /// Each micro-batch's summed loss (a device scalar, this rank's).
    pub micro_losses: Vec<Tensor>,
    /// Supervised targets of the step over every micro-batch and rank.
    pub supervised: f64,
    /// What the summed loss is divided by ([`Loss::normalizer`]).
    pub normalizer: f64,
    /// The share of the step's tokens that is padding (batches not read densely).
    pub padding_share: Option<f64>,
}

/// A timed event at the end of what `clock` holds now, where there is a clock.
fn timed(clock: &Option<Stream>) -> Result<Option<DeviceEvent>> {
    let event = clock.as_ref().map(Stream::record_timed).transpose();
    event.map_err(TrainError::Torch)
}

/// Forward and backward of one step's `grad_accum` micro-batches (`first`, then the
/// source's next): adds to every weight's gradient that of the step's summed loss
/// divided by its supervised targets over every micro-batch and rank, counted in one
/// collective before the first pass (or known, `step_tokens`, when the source is dense).
/// A micro-batch without supervised targets adds nothing; a step without any anywhere
/// is an error naming the data. Every rank's gradients are then averaged (by the
/// optimizer, or under full sharding by `weights` as each layer's are done), so each rank
/// scales its own by `ranks / supervised`.
#[allow(clippy::too_many_arguments)]
pub fn step_gradients(
    model: &Gpt,
    weights: Option<&dyn WeightStore>,
    loss: &mut dyn Loss,
    source: &mut dyn BatchSource,
    first: MicroBatch,
    grad_accum: usize,
    step_tokens: usize,
    comm: &Comm,
) -> Result<StepGradients> {
    let dev = model.device();
    let mut batches = vec![first];
    let (supervised, padding_share) = if source.dense() {
        (step_tokens as f64, None)
    } else {
        for _ in 1..grad_accum {
            batches.push(source.next_batch(model, comm)?);
        }
        let sum = |f: fn(&MicroBatch) -> usize| batches.iter().map(f).sum::<usize>() as f64;
        let counts = Tensor::from_slice(&[
            sum(MicroBatch::supervised_count),
            sum(MicroBatch::padding),
            sum(|b| b.rows * b.cols),
        ])
        .to_device(dev);
        comm.all_reduce_sum(&counts)?;
        let c = Vec::<f64>::try_from(&counts).map_err(|e| TrainError::Torch(e.to_string()))?;
        (c[0], Some(c[1] / c[2]))
    };
    if supervised == 0.0 {
        return Err(TrainError::NoSupervision {
            step: 0,
            data: source.describe(),
        });
    }
    let normalizer = loss.normalizer(supervised);
    let scale = comm.size() as f64 / normalizer;
    let mut micro_losses = Vec::with_capacity(grad_accum);
    let mut batches = batches.into_iter();
    for _ in 0..grad_accum {
        // Dense sources are read as the passes go (the GPU works meanwhile).
        let b = match batches.next() {
            Some(b) => b,
            None => source.next_batch(model, comm)?,
        };
        micro_losses.push(loss.forward_backward(model, weights, &b.to_device(dev), scale));
    }
    Ok(StepGradients {
        micro_losses,
        supervised,
        normalizer,
        padding_share,
    })
}

/// A batch given up for a stop ([`TrainError::Interrupted`]) as None.
fn unless_given_up(batch: Result<MicroBatch>) -> Result<Option<MicroBatch>> {
    match batch {
        Err(TrainError::Interrupted) => Ok(None),
        batch => batch.map(Some),
    }
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// Micro-batches given in advance.
    pub(crate) struct Given(pub(crate) VecDeque<MicroBatch>);

    impl BatchSource for Given {
        fn next_batch(&mut self, _: &Gpt, _: &Comm) -> Result<MicroBatch> {
            self.0
                .pop_front()
                .ok_or_else(|| TrainError::Config("no batch left".into()))
        }
        fn state(&self) -> Value {
            Value::Null
        }
        fn restore(&mut self, _: &Value, _: bool) -> Result<()> {
            Ok(())
        }
        fn dense(&self) -> bool {
            false
        }
        fn describe(&self) -> String {
            "the given batches".into()
        }
    }

    fn model() -> Gpt {
        tiny_model(16, 5)
    }

    #[test]
    fn padding_counts_what_no_example_or_learned_target_uses() {
        let batch = |supervised: Option<Vec<bool>>, examples: Option<Vec<Vec<usize>>>| MicroBatch {
            rows: 2,
            cols: 5,
            tokens: vec![1; 10],
            supervised,
            examples,
            shared_prefix: false,
            weights: None,
        };
        // Packed: rows of 5 holding 2 + 2 and 5 tokens.
        assert_eq!(batch(None, Some(vec![vec![2, 2], vec![5]])).padding(), 1);
        // One sequence a row: learned up to target 1 (token 2), and not learned at all.
        let mask = vec![true, true, false, false, false, false, false, false];
        assert_eq!(batch(Some(mask), None).padding(), 2 + 5);
        assert_eq!(batch(None, None).padding(), 0);
    }

    /// The tiny preset with rows of `seq_len` and every weight drawn at random.
    pub(crate) fn tiny_model(seq_len: usize, seed: u64) -> Gpt {
        let config = ModelConfig {
            seq_len,
            ..ModelConfig::preset("tiny", 300).unwrap()
        };
        let m = Gpt::new(config, Device::Cpu, seed).unwrap();
        // Zero-initialised projections and head would leave most gradients zero.
        tch::no_grad(|| {
            for (_, p) in m.params() {
                p.shallow_clone().copy_(&(p.randn_like() * 0.1));
            }
        });
        m
    }

    /// Rows of 16 + 1 random tokens, examples of the given lengths, targets learned where
    /// `learned(row, position)`.
    fn batch(rows: &[Vec<usize>], learned: impl Fn(usize, usize) -> bool, seed: u64) -> MicroBatch {
        let cols = 17;
        let tokens = (0..rows.len() * cols)
            .map(|i| ((i as u64 * 7919 + seed * 104_729) % 300) as u32)
            .collect();
        let supervised = (0..rows.len() * (cols - 1))
            .map(|i| learned(i / (cols - 1), i % (cols - 1)))
            .collect();
        MicroBatch {
            rows: rows.len(),
            cols,
            tokens,
            supervised: Some(supervised),
            examples: Some(rows.to_vec()),
            shared_prefix: false,
            weights: None,
        }
    }

    /// Every weight's gradient, and the weights' gradients zeroed.
    pub(crate) fn take_grads(m: &Gpt) -> Vec<Tensor> {
        m.params()
            .iter()
            .map(|(_, p)| {
                let g = p.grad().copy();
                p.shallow_clone().zero_grad();
                g
            })
            .collect()
    }

    fn step(m: &Gpt, batches: Vec<MicroBatch>) -> Result<(f64, Vec<Tensor>)> {
        let n = batches.len();
        let mut source = Given(batches.into());
        let first = source.next_batch(m, &Comm::single())?;
        let g = step_gradients(
            m,
            None,
            &mut CrossEntropy,
            &mut source,
            first,
            n,
            0,
            &Comm::single(),
        )?;
        let sum: f64 = g.micro_losses.iter().map(|l| l.double_value(&[])).sum();
        Ok((sum / g.normalizer, take_grads(m)))
    }

    fn max_difference(a: &[Tensor], b: &[Tensor]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs().max().double_value(&[]))
            .fold(0.0, f64::max)
    }

    #[test]
    fn a_fully_masked_batch_adds_a_finite_zero_loss_and_no_gradient() {
        let m = model();
        let masked = batch(&[vec![17], vec![5, 12]], |_, _| false, 1);
        let loss = CrossEntropy.forward_backward(&m, None, &masked.to_device(Device::Cpu), 0.25);
        assert_eq!(loss.double_value(&[]), 0.0);
        let grads = take_grads(&m);
        assert!(grads.iter().all(|g| g.abs().max().double_value(&[]) == 0.0));

        // Beside a supervised micro-batch, it changes neither the loss nor the gradients.
        let learned = batch(&[vec![9, 8], vec![17]], |r, p| (r + p) % 3 == 0, 2);
        let (alone, g_alone) = step(&m, vec![learned.clone()]).unwrap();
        let (with, g_with) = step(&m, vec![masked.clone(), learned]).unwrap();
        assert!(
            alone.is_finite() && (alone - with).abs() < 1e-6,
            "{alone} {with}"
        );
        assert!(max_difference(&g_alone, &g_with) < 1e-7);

        // A step with nothing supervised anywhere is an error that names the data.
        let e = step(&m, vec![masked.clone(), masked])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no supervised target") && e.contains("the given batches"),
            "{e}"
        );
    }

    #[test]
    fn one_micro_batch_equals_four_of_unequal_supervision_accumulated() {
        let m = model();
        let rows: Vec<Vec<usize>> = (0..8).map(|r| vec![3 + r, 14 - r]).collect();
        // From every target supervised (rows 0-1) to none (rows 4-5).
        let learned = |r: usize, p: usize| match r / 2 {
            0 => true,
            1 => p.is_multiple_of(5),
            2 => false,
            _ => p > 8,
        };
        let whole = batch(&rows, learned, 3);
        let (loss_one, g_one) = step(&m, vec![whole.clone()]).unwrap();
        let parts: Vec<MicroBatch> = (0..4)
            .map(|k| {
                let range = |v: &[bool], per: usize| v[k * 2 * per..(k + 1) * 2 * per].to_vec();
                MicroBatch {
                    rows: 2,
                    cols: 17,
                    tokens: whole.tokens[k * 34..(k + 1) * 34].to_vec(),
                    supervised: whole.supervised.as_ref().map(|s| range(s, 16)),
                    examples: Some(rows[k * 2..k * 2 + 2].to_vec()),
                    shared_prefix: false,
                    weights: None,
                }
            })
            .collect();
        let counts: Vec<usize> = parts.iter().map(MicroBatch::supervised_count).collect();
        assert_eq!(counts, [32, 8, 0, 14], "unequal supervision");
        let (loss_four, g_four) = step(&m, parts).unwrap();
        assert!(
            (loss_one - loss_four).abs() < 1e-6,
            "{loss_one} {loss_four}"
        );
        let scale = g_one
            .iter()
            .map(|g| g.abs().max().double_value(&[]))
            .fold(0.0, f64::max);
        let diff = max_difference(&g_one, &g_four);
        assert!(
            scale > 0.0 && diff < 1e-6 * scale.max(1.0),
            "{diff} against {scale}"
        );
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
