//! How much GPU memory a pretraining run needs on each rank, before it starts: the weights
//! (fp32, and their bf16 copies the pass computes with), the gradients (fp32), the
//! optimizer's state (sharded over the ranks), the activations the backward pass reads,
//! and the workspace of the loss and of one layer's backward. Fully sharded
//! (`train.sharding = "full"`), each rank keeps its part of the weights and gradients, and
//! whole only the part of the model the pass works on (the embedding, a layer or the
//! head, gathered in bf16) with its fp32 gradients and the buffer they are
//! reduce-scattered from, and the neighbouring parts being gathered ahead or
//! reduce-scattered beside it. Counted from what the
//! explicit pass keeps (`cxxlm_model::explicit`), which matched the allocator's measured
//! peak within 2% at d12 and d20 on an H100 (BENCHMARKS.md; the test below).

use cxxlm_model::gpt::EXPLICIT_LOSS_CHUNK_ELEMENTS;
use cxxlm_model::{Activation, Decoder, ModelConfig};
use tch::Kind;

use crate::optim::{Matrices, OptimConfig, Sharding};
use crate::pretrain::RunConfig;

/// `bytes` in GiB.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Autograd keeps this many times the explicit pass's activations (measured at d12 B=32:
/// 23.78 against 13.92 GiB for the pass, at d20 B=16: 34.81 against 21.45); it trains the
/// models the explicit pass does not (no logit softcap, odd head sizes).
const AUTOGRAD_ACTIVATIONS: f64 = 1.78;

#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    /// Bytes per rank, by part, in the order printed.
    pub parts: Vec<(&'static str, u64)>,
    /// Bytes the activations would take with each layer's input kept and the rest
    /// recomputed in the backward pass (`train.activation_checkpointing = 1`).
    pub checkpointed_activations: u64,
    /// Whether the model trains on the explicit pass (else autograd, estimated).
    pub explicit: bool,
    /// Rows of a pass, and their tokens.
    pub rows: usize,
    pub seq_len: usize,
    /// With full sharding: the ranks, and the weights of the largest part gathered whole.
    pub fully_sharded: Option<(usize, usize)>,
    /// Bytes of one checkpoint on disk: the fp32 weights and all ranks' optimizer state.
    pub checkpoint_bytes: u64,
}

impl MemoryPlan {
    pub fn total(&self) -> u64 {
        self.parts.iter().map(|(_, b)| b).sum()
    }

    /// Bytes of the part named `name` (0 where there is none).
    pub fn part(&self, name: &str) -> u64 {
        self.parts
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |p| p.1)
    }

    /// The plan as lines of text, against `capacity` bytes when known.
    pub fn describe(&self, capacity: Option<u64>) -> String {
        let mut out = String::new();
        for (name, bytes) in &self.parts {
            out += &format!("  {name:<14} {:>8.2} GiB\n", gib(*bytes));
        }
        out += &format!("  {:<14} {:>8.2} GiB", "total", gib(self.total()));
        if let Some(c) = capacity {
            out += &format!(" of {:.2} GiB", gib(c));
        }
        // Only the explicit pass checkpoints layers.
        if self.explicit {
            let activations = self.part("activations");
            out += &format!(
                "\n  with every layer checkpointed (train.activation_checkpointing = 1) the activations would be {:.2} GiB, the total {:.2} GiB",
                gib(self.checkpointed_activations),
                gib(self.total() - activations + self.checkpointed_activations)
            );
        }
        if let Some((ranks, largest)) = self.fully_sharded {
            out += &format!(
                "\n  fully sharded over {ranks} ranks: each keeps 1/{ranks} of the weights and gradients, and whole only the part of the model being computed (the largest: {:.1}M weights)",
                largest as f64 / 1e6
            );
        }
        if !self.explicit {
            out += &format!(
                "\n  this model trains on autograd (the explicit pass does not cover it): its \
                 activations are estimated at {AUTOGRAD_ACTIVATIONS}x the explicit pass's, as measured at d12 and d20"
            );
        }
        out += &format!(
            "\n  a checkpoint takes {:.2} GiB on disk (fp32 weights and the optimizer's state)",
            gib(self.checkpoint_bytes)
        );
        out
    }
}

/// The memory one rank of `ranks` needs to train `model` with `run`'s rows of its context
/// per pass, its activation checkpointing and its sharding, and `optim`; `explicit`: on
/// the explicit pass with fused kernels (autograd checkpoints nothing; full sharding
/// always takes the explicit pass).
pub fn plan(
    model: &ModelConfig,
    run: &RunConfig,
    optim: &OptimConfig,
    ranks: usize,
    explicit: bool,
) -> MemoryPlan {
    let device_batch = run.device_batch;
    let c = model;
    let (w, d, hidden) = (c.width, c.head_dim(), c.hidden());
    let (heads, kv) = (c.heads, c.kv_heads);
    let params = c.params();
    let matrices = params - 2 * c.embedding_params();
    let tokens = device_batch * c.seq_len;
    let ranks = ranks.max(1);
    let full = run.sharding == Sharding::Full;
    let explicit = explicit || full;
    // One layer's q|k|v weights joined, in bf16.
    let joined_qkv = 2 * (heads + 2 * kv) * d * w;
    let largest_part = c.embedding_params().max(matrices / c.depth.max(1));
    let (weights, gradients) = match full {
        // The weights and gradients of the part computed, gathered: bf16 weights, fp32
        // gradients and the buffer they are reduce-scattered from; and beside them, the
        // next part's weights gathered ahead and the last part's gradients still being
        // reduce-scattered.
        true => (
            4 * params.div_ceil(ranks) + 2 * 2 * largest_part + joined_qkv,
            4 * params.div_ceil(ranks) + 2 * 8 * largest_part,
        ),
        // bf16 copies to compute with.
        false => (4 * params + 2 * params + joined_qkv, 4 * params),
    };
    let optimizer_state = match optim.matrices {
        Matrices::Muon => 4 * matrices + 8 * (params - matrices),
        Matrices::Adamw => 8 * params,
    };
    // What the MLP keeps: relu^2's output, or SwiGLU's input (gate and value).
    let mlp = match c.activation {
        Activation::Relu2 => hidden,
        Activation::Swiglu => 2 * hidden,
    };
    // Per token and layer: the two norms' outputs, q|k|v, the attention's output and the
    // MLP's activation in bf16; the norms' and the attention's row statistics in fp32.
    let layer = 2 * (2 * w + (heads + 2 * kv) * d + heads * d + mlp) + 4 * (2 + 2 * heads + kv);
    // Per token, outside the layers: the embedding's norm, the final norm and its
    // gradient (bf16), the ids and targets.
    let outside = 6 * w + 16;
    // A checkpointed layer keeps its input; the first one's backward runs its forward
    // again, which holds one layer's activations at a time.
    let kept = |every: usize| -> usize {
        let checkpointed = match every {
            0 => 0,
            k => c.depth.div_ceil(k),
        };
        let recompute = if checkpointed > 0 { layer } else { 0 };
        tokens * ((c.depth - checkpointed) * layer + checkpointed * 2 * w + recompute + outside)
    };
    let every = if explicit {
        run.activation_checkpointing
    } else {
        0
    };
    let activations = kept(every);
    // Beside the kept activations, one at a time: the head's chunk of logits (bf16), then
    // a layer's backward, the MLP's gradients beside its activation.
    let logits = 2 * tokens.min(EXPLICIT_LOSS_CHUNK_ELEMENTS / c.vocab_size.max(1)) * c.vocab_size;
    let workspace = logits.max(2 * 2 * tokens * mlp);
    let (activations, weights) = match explicit {
        true => (activations as u64, weights as u64),
        false => (
            (activations as f64 * AUTOGRAD_ACTIVATIONS) as u64,
            6 * params as u64,
        ),
    };
    MemoryPlan {
        parts: vec![
            ("weights", weights),
            ("gradients", gradients as u64),
            ("optimizer", optimizer_state.div_ceil(ranks) as u64),
            ("activations", activations),
            ("workspace", workspace as u64),
        ],
        checkpointed_activations: kept(1) as u64,
        explicit,
        rows: device_batch,
        seq_len: c.seq_len,
        fully_sharded: full.then_some((ranks, largest_part)),
        checkpoint_bytes: (4 * params + optimizer_state) as u64,
    }
}

/// What a sampler of `slots` sequences of up to `capacity` tokens holds on a GPU: its
/// decoder in bf16 ([`Decoder::bytes`]) and a step's logits in fp32.
pub fn sampler_bytes(model: &ModelConfig, slots: usize, capacity: usize) -> u64 {
    Decoder::bytes(model, slots, capacity, Kind::BFloat16)
        + 4 * ((slots + 1) * model.vocab_size) as u64
}

/// A frozen model scored with (RL's reference): fp32 weights and the bf16 copies its
/// forward pass makes.
pub fn reference_bytes(model: &ModelConfig) -> u64 {
    6 * model.params() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The allocator's peaks of whole training steps (`benches/train/gpu.sh bench`, one
    /// H100, BENCHMARKS.md "Fused kernels and the explicit pass").
    #[test]
    fn the_plan_matches_the_measured_peaks() {
        for (preset, batch, matrices, measured) in [
            ("d12", 32, Matrices::Adamw, 14.94),
            ("d12", 32, Matrices::Muon, 14.61),
            ("d20", 16, Matrices::Adamw, 25.09),
            ("d20", 16, Matrices::Muon, 23.58),
            ("d20", 32, Matrices::Adamw, 41.82),
            ("d20", 32, Matrices::Muon, 40.31),
        ] {
            let model = ModelConfig::preset(preset, 32_768).unwrap();
            let optim = OptimConfig {
                matrices,
                ..Default::default()
            };
            let run = RunConfig {
                device_batch: batch,
                ..Default::default()
            };
            let planned = gib(plan(&model, &run, &optim, 1, true).total());
            assert!(
                (planned / measured - 1.0).abs() < 0.02,
                "{preset} B={batch} {matrices:?}: planned {planned:.2} GiB, measured {measured}"
            );
        }
    }

    /// The 3B at T=8192 with Muon (`benches/train/gpu.sh 3b`, one H200, BENCHMARKS.md
    /// "The seeds' 3B"): by device batch and layers checkpointed (every k-th).
    #[test]
    fn the_plan_matches_the_measured_peaks_of_the_3b() {
        let model = ModelConfig::preset("3b", 32_768).unwrap();
        for (batch, every, measured) in [(2, 0, 57.76), (4, 2, 61.41), (4, 1, 42.65)] {
            let run = RunConfig {
                device_batch: batch,
                activation_checkpointing: every,
                ..Default::default()
            };
            let planned = gib(plan(&model, &run, &OptimConfig::default(), 1, true).total());
            assert!(
                (planned / measured - 1.0).abs() < 0.06,
                "3b B={batch} every {every}: planned {planned:.2} GiB, measured {measured}"
            );
        }
    }

    /// `--check` sizes a checkpoint by formula, before any model exists; the trainer sizes
    /// it from the optimizer's real tensors. Both must agree, or `--check` passes a run
    /// that later has no room for its checkpoints.
    #[test]
    fn the_planned_checkpoint_is_the_size_of_the_real_one() {
        let tiny = ModelConfig::preset("tiny", 512).unwrap();
        let gqa_swiglu = ModelConfig {
            heads: 4,
            kv_heads: 2,
            activation: Activation::Swiglu,
            ..tiny.clone()
        };
        for model in [tiny, gqa_swiglu] {
            for matrices in [Matrices::Muon, Matrices::Adamw] {
                let optim = OptimConfig {
                    matrices,
                    ..Default::default()
                };
                let gpt = cxxlm_model::Gpt::new(model.clone(), tch::Device::Cpu, 0).unwrap();
                let state =
                    crate::optim::Optimizer::new(gpt.params(), model.width, optim.clone(), 0, 1)
                        .state();
                let planned = plan(&model, &RunConfig::default(), &optim, 1, true);
                assert_eq!(
                    planned.checkpoint_bytes,
                    crate::checkpoint::bytes(&model, &state, 1),
                    "{:?} {matrices:?}",
                    model.activation
                );
            }
        }
    }

    #[test]
    fn ranks_share_the_optimizer_state_and_checkpointing_keeps_layer_inputs() {
        let model = ModelConfig::preset("d20", 32_768).unwrap();
        let optim = OptimConfig::default();
        let part = |p: &MemoryPlan, name: &str| p.parts.iter().find(|x| x.0 == name).unwrap().1;
        let run = RunConfig {
            device_batch: 16,
            ..Default::default()
        };
        let one = plan(&model, &run, &optim, 1, true);
        let eight = plan(&model, &run, &optim, 8, true);
        assert_eq!(
            part(&one, "optimizer").div_ceil(8),
            part(&eight, "optimizer")
        );
        assert_eq!(part(&one, "weights"), part(&eight, "weights"));
        assert!(one.checkpointed_activations * 5 < part(&one, "activations"));
        let autograd = plan(&model, &run, &optim, 1, false);
        assert!(part(&autograd, "activations") > part(&one, "activations"));
        let all = RunConfig {
            activation_checkpointing: 1,
            ..run.clone()
        };
        let checkpointed = plan(&model, &all, &optim, 1, true);
        assert_eq!(
            part(&checkpointed, "activations"),
            one.checkpointed_activations
        );
        let half = RunConfig {
            activation_checkpointing: 2,
            ..run.clone()
        };
        let some = part(&plan(&model, &half, &optim, 1, true), "activations");
        assert!(one.checkpointed_activations < some && some < part(&one, "activations"));
        let text = one.describe(Some(80 << 30));
        assert!(text.contains("of 80.00 GiB"), "{text}");
        assert!(text.contains("activation_checkpointing = 1"), "{text}");
    }

    #[test]
    fn full_sharding_divides_the_weights_and_gradients_among_the_ranks() {
        let model = ModelConfig::preset("3b", 32_768).unwrap();
        let optim = OptimConfig::default();
        let part = |p: &MemoryPlan, name: &str| p.parts.iter().find(|x| x.0 == name).unwrap().1;
        let run = |sharding| RunConfig {
            device_batch: 1,
            sharding,
            ..Default::default()
        };
        let replicated = plan(&model, &run(Sharding::Optimizer), &optim, 8, true);
        let full = plan(&model, &run(Sharding::Full), &optim, 8, true);
        let kept = |p: &MemoryPlan| part(p, "weights") + part(p, "gradients");
        // An eighth of the fp32 weights and gradients, and two parts of the model whole
        // (the one computing, and the next gathered or the last reduce-scattered).
        let eighth = 8 * (model.params() as u64).div_ceil(8);
        assert!(kept(&full) > eighth, "{full:?}");
        assert!(kept(&full) < eighth + kept(&replicated) / 10, "{full:?}");
        for same in ["optimizer", "activations", "workspace"] {
            assert_eq!(part(&full, same), part(&replicated, same), "{same}");
        }
        let text = full.describe(None);
        assert!(text.contains("fully sharded over 8 ranks"), "{text}");
    }
}
