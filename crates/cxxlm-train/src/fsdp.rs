//! Full sharding (ZeRO-3, FSDP's semantics): between steps each rank keeps only its part
//! of every weight, of its gradient and of its optimizer state. The parts are the
//! optimizer's own (whole matrices for Muon, a flat share of each AdamW weight), so its
//! step needs no collective but the gradient norm's. The explicit pass gathers the weights
//! of a [`Part`] of the model (the embedding, a layer, the head) just before it uses them,
//! for the forward and again for the backward, and lets them go after; a part's
//! gradients are reduce-scattered to the ranks that keep them as soon as its backward
//! ends. On GPUs the collectives run on a side stream, beside the computation: while a
//! part computes, the part the pass asks for next ([`Part::after`]) is gathered, and a
//! part's reduce-scatter runs while the backward goes on below it; the computation waits
//! only where it uses a gather's weights, and for the last reduce-scatter before the
//! optimizer's step ([`ShardedWeights::finish`]).

use std::cell::{Cell, RefCell};

use cxxlm_cuda::stream::{Event, Stream};
use cxxlm_model::{Gpt, Part, WeightStore};
use tch::{Device, Kind, Tensor};

use crate::dist::{flat_padded, Comm};
use crate::optim::{Optimizer, Placement, Shard};
use crate::Result;

/// A span of one weight that one rank keeps, at `offset` in that rank's chunk of the
/// part's gather, holding elements `at..at + len` of the flattened (padded) weight.
struct Piece {
    weight: usize,
    rank: usize,
    offset: i64,
    len: i64,
    at: i64,
}

/// How one part's weights are spread over the ranks. Each rank's chunk holds its pieces
/// in the order of the weights, and is padded to the longest rank's, so that the part is
/// gathered (and its gradients reduce-scattered) in one collective of equal chunks.
struct PartLayout {
    names: Vec<String>,
    shapes: Vec<Vec<i64>>,
    pieces: Vec<Piece>,
    chunk: i64,
    /// This rank's pieces, in its chunk's order: views of the optimizer's parts.
    mine: Vec<Shard>,
}

impl PartLayout {
    fn new(weights: &[(String, Tensor)], optimizer: &Optimizer, world: usize) -> Self {
        let mut used = vec![0i64; world];
        let mut pieces = Vec::new();
        let mut mine = Vec::new();
        for (weight, (name, t)) in weights.iter().enumerate() {
            let placement = optimizer
                .placement(name)
                .unwrap_or_else(|| panic!("the optimizer was made without {name}"));
            let spans: Vec<(usize, i64, i64)> = match placement {
                Placement::Whole { rank } => vec![(rank, 0, t.numel() as i64)],
                Placement::Flat { part } => {
                    (0..world).map(|r| (r, r as i64 * part, part)).collect()
                }
            };
            for (r, at, len) in spans {
                pieces.push(Piece {
                    weight,
                    rank: r,
                    offset: used[r],
                    len,
                    at,
                });
                used[r] += len;
            }
            mine.extend(optimizer.shard(name));
        }
        PartLayout {
            names: weights.iter().map(|(n, _)| n.clone()).collect(),
            shapes: weights.iter().map(|(_, t)| t.size()).collect(),
            pieces,
            chunk: used.into_iter().max().unwrap_or(0),
            mine,
        }
    }
}

/// The layout of every part of a model whose optimizer keeps only its parts of the
/// weights ([`Optimizer::shard_weights`]).
pub struct FullSharding {
    parts: Vec<PartLayout>,
    depth: usize,
    device: Device,
    /// The precision layers compute in, which their weights are gathered in.
    compute: Kind,
}

impl FullSharding {
    /// The layout of `model`'s weights (still whole) as `optimizer` keeps them over
    /// `world` ranks, once it has been told to shard them.
    pub fn new(model: &Gpt, optimizer: &Optimizer, world: usize) -> Self {
        let depth = model.config.depth;
        let parts = Part::all(depth)
            .map(|part| PartLayout::new(&model.params()[part.weights(depth)], optimizer, world))
            .collect();
        FullSharding {
            parts,
            depth,
            device: model.device(),
            compute: model.compute_kind(),
        }
    }

    fn layout(&self, part: Part) -> &PartLayout {
        &self.parts[match part {
            Part::Embedding => 0,
            Part::Layer(l) => 1 + l,
            Part::Head => 1 + self.depth,
        }]
    }

    /// The explicit pass's weights and gradients for one step, through `comm`.
    pub fn store<'a>(&'a self, comm: &'a Comm) -> ShardedWeights<'a> {
        let streams = match self.device {
            Device::Cuda(index) => Stream::current(index).zip(Stream::side(index)),
            _ => None,
        };
        ShardedWeights {
            sharding: self,
            comm,
            streams,
            last: Cell::new(None),
            ahead: RefCell::new(None),
        }
    }

    /// `part`'s weights, whole, in `kind`: every rank's chunk gathered, each weight cut
    /// back out of the chunks.
    fn gather(&self, part: Part, kind: Kind, comm: &Comm) -> Result<Vec<Tensor>> {
        let layout = self.layout(part);
        let mut chunk: Vec<Tensor> = layout
            .mine
            .iter()
            .map(|s| s.weights.to_kind(kind))
            .collect();
        let used: i64 = layout.mine.iter().map(|s| s.weights.numel() as i64).sum();
        chunk.push(Tensor::zeros([layout.chunk - used], (kind, self.device)));
        let all = comm
            .all_gather(&Tensor::cat(&chunk, 0))?
            .view([comm.size() as i64, layout.chunk]);
        Ok(layout
            .shapes
            .iter()
            .enumerate()
            .map(|(weight, shape)| {
                let pieces: Vec<Tensor> = layout
                    .pieces
                    .iter()
                    .filter(|p| p.weight == weight)
                    .map(|p| all.get(p.rank as i64).narrow(0, p.offset, p.len))
                    .collect();
                let numel = shape.iter().product();
                Tensor::cat(&pieces, 0)
                    .narrow(0, 0, numel)
                    .view(shape.as_slice())
            })
            .collect())
    }

    /// Adds to each rank's parts of `part`'s gradients the mean over the ranks of
    /// `grads` (whole, one per weight).
    fn reduce_scatter(&self, part: Part, grads: &[Tensor], comm: &Comm) -> Result<()> {
        let layout = self.layout(part);
        let world = comm.size();
        let chunks = Tensor::zeros([world as i64, layout.chunk], (Kind::Float, self.device));
        for (weight, grad) in grads.iter().enumerate() {
            let flat = flat_padded(grad, world);
            for p in layout.pieces.iter().filter(|p| p.weight == weight) {
                chunks
                    .get(p.rank as i64)
                    .narrow(0, p.offset, p.len)
                    .copy_(&flat.narrow(0, p.at, p.len));
            }
        }
        let mean = comm.reduce_scatter_mean(&chunks.view([-1]))?;
        let mut offset = 0;
        for shard in &layout.mine {
            let len = shard.grad.numel() as i64;
            let _ = shard
                .grad
                .shallow_clone()
                .g_add_(&mean.narrow(0, offset, len));
            offset += len;
        }
        Ok(())
    }

    /// Every weight, whole, in fp32 on `device`, by name (every rank takes part).
    pub fn gather_all(&self, comm: &Comm, device: Device) -> Result<Vec<(String, Tensor)>> {
        let _guard = tch::no_grad_guard();
        let mut out = Vec::new();
        for part in Part::all(self.depth) {
            let weights = self.gather(part, Kind::Float, comm)?;
            let names = self.layout(part).names.iter().cloned();
            out.extend(names.zip(weights.iter().map(|w| w.to_device(device))));
        }
        Ok(out)
    }
}

/// The explicit pass's [`WeightStore`] under full sharding, for one step. A collective
/// that fails panics with its error (the pass has no error path; the trainer reports
/// the panic).
pub struct ShardedWeights<'a> {
    sharding: &'a FullSharding,
    comm: &'a Comm,
    /// On GPUs: the stream torch computes on, and the side stream every collective of
    /// the step runs on (one stream for them all keeps them in the same order on every
    /// rank's GPU).
    streams: Option<(Stream, Stream)>,
    /// The part asked for last.
    last: Cell<Option<Part>>,
    ahead: RefCell<Option<Ahead>>,
}

/// A part gathered ahead, and the point of the side stream where it is ready.
struct Ahead {
    part: Part,
    weights: Vec<Tensor>,
    ready: Option<Event>,
}

impl ShardedWeights<'_> {
    /// Runs the collective `work` on the side stream once the computation so far is
    /// done (on the CPU: now), and returns what it made with the point it is ready at.
    fn collective<T>(&self, work: impl FnOnce() -> Result<T>) -> (T, Option<Event>) {
        let Some((compute, side)) = &self.streams else {
            return (work().unwrap_or_else(|e| panic!("{e}")), None);
        };
        side.wait_for(compute).unwrap_or_else(side_stream_failed);
        let entered = side.enter();
        let out = work().unwrap_or_else(|e| panic!("{e}"));
        drop(entered);
        (out, Some(side.record().unwrap_or_else(side_stream_failed)))
    }

    /// Makes the computation wait for the side stream's work so far, so that the
    /// optimizer reads every gradient the step reduce-scattered; ends the step's store.
    pub fn finish(self) -> Result<()> {
        if let Some((compute, side)) = &self.streams {
            compute
                .wait_for(side)
                .map_err(|e| crate::TrainError::Torch(format!("{SIDE_STREAM}: {e}")))?;
        }
        Ok(())
    }
}

const SIDE_STREAM: &str = "the side stream of full sharding";

fn side_stream_failed<T>(e: String) -> T {
    panic!("{SIDE_STREAM}: {e}")
}

impl WeightStore for ShardedWeights<'_> {
    fn weights(&self, part: Part) -> Vec<Tensor> {
        let s = self.sharding;
        let previous = self.last.replace(Some(part));
        let (weights, ready) = match self.ahead.take() {
            Some(ahead) if ahead.part == part => (ahead.weights, ahead.ready),
            _ => self.collective(|| s.gather(part, s.compute, self.comm)),
        };
        if let (Some((compute, _)), Some(ready)) = (&self.streams, &ready) {
            compute.wait(ready).unwrap_or_else(side_stream_failed);
            for w in &weights {
                compute.uses(w);
            }
        }
        if let Some(next) = part.after(previous, s.depth) {
            let (weights, ready) = self.collective(|| s.gather(next, s.compute, self.comm));
            *self.ahead.borrow_mut() = Some(Ahead {
                part: next,
                weights,
                ready,
            });
        }
        weights
    }

    fn gradients(&self, part: Part) -> Vec<Tensor> {
        let s = self.sharding;
        s.layout(part)
            .shapes
            .iter()
            .map(|shape| Tensor::zeros(shape.as_slice(), (Kind::Float, s.device)))
            .collect()
    }

    fn gradients_done(&self, part: Part, grads: Vec<Tensor>) {
        if let Some((_, side)) = &self.streams {
            for g in &grads {
                side.uses(g);
            }
        }
        self.collective(|| self.sharding.reduce_scatter(part, &grads, self.comm));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{OptimConfig, Schedule, Sharding};
    use crate::pretrain::{CheckpointConfig, LogConfig, RunConfig};
    use crate::trainer::{
        train, Backward, BatchSource, Common, CrossEntropy, Evaluation, Event, MicroBatch, Parts,
        Stage,
    };
    use cxxlm_model::ModelConfig;
    use serde_json::{json, Map, Value};
    use std::path::{Path, PathBuf};

    const ROWS: usize = 2;
    const COLS: usize = 17;
    const MICRO_BATCHES: usize = 4;
    const STEPS: u64 = 4;
    const VOCAB: usize = 300;

    /// Tokens of micro-batch `index` of one global stream.
    fn tokens(index: usize) -> Vec<u32> {
        (0..ROWS * COLS)
            .map(|i| ((i * 7919 + index * 104_729 + i * i * 31) % VOCAB) as u32)
            .collect()
    }

    /// The global stream shared out among the ranks: rank r of w reads every w-th
    /// micro-batch from the r-th, so a step holds the same micro-batches on any number
    /// of ranks.
    struct Stream {
        rank: usize,
        world: usize,
        read: usize,
    }

    impl BatchSource for Stream {
        fn next_batch(&mut self, _: &Gpt, _: &Comm) -> Result<MicroBatch> {
            let index = self.read * self.world + self.rank;
            self.read += 1;
            Ok(MicroBatch {
                rows: ROWS,
                cols: COLS,
                tokens: tokens(index),
                supervised: None,
                examples: None,
                shared_prefix: false,
                weights: None,
            })
        }
        fn state(&self) -> Value {
            json!(self.read * self.world)
        }
        fn restore(&mut self, state: &Value, _: bool) -> Result<()> {
            self.read = state.as_u64().expect("a position") as usize / self.world;
            Ok(())
        }
        fn dense(&self) -> bool {
            true
        }
        fn describe(&self) -> String {
            "the test stream".into()
        }
    }

    /// The loss on held-out tokens, which needs the whole weights.
    struct HeldOut;

    impl Evaluation for HeldOut {
        fn evaluate(
            &mut self,
            _: u64,
            model: &Gpt,
            _: &Comm,
            _: &mut dyn FnMut(Event),
        ) -> Result<Map<String, Value>> {
            let ids: Vec<i64> = tokens(1000).iter().map(|&t| t as i64).collect();
            let ids = Tensor::from_slice(&ids).view([ROWS as i64, COLS as i64]);
            let t = COLS as i64 - 1;
            let loss = model.token_losses(&ids.narrow(1, 0, t), &ids.narrow(1, 1, t), None);
            let mut figures = Map::new();
            figures.insert(
                "val_loss".into(),
                loss.mean(Kind::Float).double_value(&[]).into(),
            );
            Ok(figures)
        }
    }

    /// Three layers with one key-value head (Muon groups of four shapes, which 4 ranks
    /// own unevenly), its weights drawn from a hash of their position: every rank makes
    /// the same model without libtorch's global generator, which other tests draw from.
    fn model() -> Gpt {
        let config = ModelConfig {
            depth: 3,
            kv_heads: 1,
            seq_len: COLS - 1,
            ..ModelConfig::preset("tiny", VOCAB).unwrap()
        };
        let mut m = Gpt::new(config, Device::Cpu, 0).unwrap();
        let weights: Vec<(String, Tensor)> = m
            .params()
            .iter()
            .enumerate()
            .map(|(i, (name, p))| {
                let x = Tensor::arange(p.numel() as i64, (Kind::Float, Device::Cpu)) * 12.9898
                    + i as f64 * 78.233;
                let uniform = (x.sin() * 43758.5453).frac();
                (name.clone(), (uniform * 0.3).view(p.size().as_slice()))
            })
            .collect();
        m.load(&weights).unwrap();
        m.set_fused(Some(cxxlm_cuda::Fused::Reference)).unwrap();
        m
    }

    /// What rank 0 saw of a run: each step's loss, and each evaluation's held-out loss.
    #[derive(Debug, Default, Clone)]
    struct Seen {
        losses: Vec<(u64, f64)>,
        evals: Vec<(u64, f64)>,
    }

    /// Trains on `world` ranks with `sharding` in `out` (resuming its newest checkpoint
    /// with `resume`), stopping with a checkpoint once `stop_at` steps are done.
    fn run(world: usize, sharding: Sharding, out: &Path, resume: bool, stop_at: u64) -> Seen {
        let out = out.to_path_buf();
        let seen = crate::dist::with_ranks(world, move |comm| {
            one_rank(comm, sharding, &out, resume, stop_at)
        });
        seen.into_iter().next().expect("rank 0")
    }

    fn one_rank(comm: Comm, sharding: Sharding, out: &PathBuf, resume: bool, stop_at: u64) -> Seen {
        let (rank, world) = (comm.rank(), comm.size());
        let train_config = RunConfig {
            device: "cpu".into(),
            device_batch: ROWS,
            sharding,
            ..Default::default()
        };
        let optim = OptimConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let common = Common {
            out,
            train: &train_config,
            optim: &optim,
            schedule: &Schedule::default(),
            checkpoint: &CheckpointConfig { every: 0, keep: 5 },
            log: &LogConfig::default(),
        };
        let mut source = Stream {
            rank,
            world,
            read: 0,
        };
        let parts = Parts {
            model: model(),
            backward: Backward::Explicit { packed: false },
            source: &mut source,
            loss: &mut CrossEntropy,
            evaluation: &mut HeldOut,
            steps: STEPS,
            grad_accum: MICRO_BATCHES / world,
            step_tokens: MICRO_BATCHES * ROWS * (COLS - 1),
            eval_every: 2,
            tokenizer_sha256: String::new(),
            identity: json!({}),
        };
        let stage = Stage::new(common, parts, &comm).unwrap();
        if sharding == Sharding::Full {
            assert!(
                stage.model.params().iter().all(|(_, p)| p.numel() == 0),
                "a fully sharded rank keeps no whole weight"
            );
        }
        let mut seen = Seen::default();
        let mut report = |event: Event| match event {
            Event::Step { step, loss, .. } => seen.losses.push((step, loss)),
            Event::Eval { step, figures } => {
                let (_, loss) = figures.into_iter().find(|(n, _)| n == "val_loss").unwrap();
                seen.evals.push((step, loss));
            }
            _ => {}
        };
        train(stage, comm, resume, &mut report, &|step| step == stop_at).unwrap();
        seen
    }

    /// The same steps with the same losses, but for the order of floating-point sums.
    fn assert_same(a: &[(u64, f64)], b: &[(u64, f64)], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: {a:?} against {b:?}");
        for ((s, x), (t, y)) in a.iter().zip(b) {
            assert_eq!(s, t, "{what}");
            assert!(
                (x - y).abs() < 1e-6 * x.abs(),
                "{what}, step {s}: {x} against {y}"
            );
        }
    }

    /// One rank with the optimizer's state sharded (today's mode) trains the reference.
    fn reference(out: &Path) -> Seen {
        run(1, Sharding::Optimizer, out, false, STEPS)
    }

    #[test]
    fn fully_sharded_ranks_train_as_one_rank_does() {
        let dir = tempfile::tempdir().unwrap();
        let one = reference(&dir.path().join("one"));
        assert_eq!(one.losses.len(), STEPS as usize);
        for world in [2, 4] {
            let full = run(
                world,
                Sharding::Full,
                &dir.path().join(format!("full{world}")),
                false,
                STEPS,
            );
            assert_same(
                &full.losses,
                &one.losses,
                &format!("losses on {world} ranks"),
            );
            assert_same(
                &full.evals,
                &one.evals,
                &format!("held-out losses on {world} ranks"),
            );
        }
    }

    /// A run stopped after two steps in one mode and number of ranks, continued in the
    /// other, takes the steps the uninterrupted run takes.
    #[test]
    fn a_run_resumes_across_sharding_modes_and_rank_counts() {
        let dir = tempfile::tempdir().unwrap();
        let one = reference(&dir.path().join("one"));
        for (first, then) in [
            ((1, Sharding::Optimizer), (2, Sharding::Full)),
            ((4, Sharding::Full), (2, Sharding::Optimizer)),
            ((2, Sharding::Full), (4, Sharding::Full)),
        ] {
            let out = dir.path().join(format!("{first:?}-{then:?}"));
            let before = run(first.0, first.1, &out, false, 2);
            let after = run(then.0, then.1, &out, true, STEPS);
            let mut losses = before.losses;
            losses.extend(after.losses);
            assert_same(&losses, &one.losses, &format!("{first:?} then {then:?}"));
        }
    }
}
