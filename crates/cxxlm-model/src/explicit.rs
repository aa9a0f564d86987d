//! The training step with an explicit backward pass (llm.c's way) instead of autograd:
//! the same model, with each layer's memory-bound steps done by one fused kernel each
//! ([`cxxlm_cuda::Fused`]), residual additions folded into the matmuls (`addmm_` onto the
//! stream in place), weight gradients accumulated in fp32 straight from bf16 matmuls,
//! and only what the backward reads kept per layer: the normalized inputs of the
//! matmuls, the rotated and normalized q|k|v, the attention output and its statistics,
//! and relu^2's output (or SwiGLU's input). With [`Fused::Reference`] the same pass runs
//! in plain tch operations, which is how it is tested against autograd on any host.

use cxxlm_cuda::check::Check;
use cxxlm_cuda::{attention, Fused};
use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Kind, Tensor};

use crate::config::{Activation, ModelConfig};
use crate::gpt::Gpt;
use crate::packing::Packing;

/// The weights of one layer, in the order of `ModelConfig::block_shapes`.
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const PROJ: usize = 3;
const FC: usize = 4;
const MLP_PROJ: usize = 5;
/// Weights per layer.
pub(crate) const LAYER_WEIGHTS: usize = 6;

/// Weights the explicit pass uses together: the embedding, one layer's matrices, or the
/// head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Embedding,
    Layer(usize),
    Head,
}

impl Part {
    /// Indices into [`Gpt::params`] of its weights, in a model `depth` layers deep.
    pub fn weights(self, depth: usize) -> std::ops::Range<usize> {
        match self {
            Part::Embedding => 0..1,
            Part::Layer(l) => 1 + l * LAYER_WEIGHTS..1 + (l + 1) * LAYER_WEIGHTS,
            Part::Head => 1 + depth * LAYER_WEIGHTS..2 + depth * LAYER_WEIGHTS,
        }
    }

    /// The part whose weights the explicit pass asks for next, after `self` (and
    /// `previous` before it) in a model `depth` layers deep: the forward goes from the
    /// embedding up through the layers to the head, the backward down the layers again;
    /// None at the end of the pass.
    pub fn after(self, previous: Option<Part>, depth: usize) -> Option<Part> {
        let backward = match (previous, self) {
            (Some(Part::Head), Part::Layer(_)) => true,
            (Some(Part::Layer(before)), Part::Layer(l)) => before == l + 1,
            _ => false,
        };
        match self {
            Part::Embedding => Some(if depth > 0 {
                Part::Layer(0)
            } else {
                Part::Head
            }),
            Part::Layer(l) if backward => l.checked_sub(1).map(Part::Layer),
            Part::Layer(l) if l + 1 < depth => Some(Part::Layer(l + 1)),
            Part::Layer(_) => Some(Part::Head),
            Part::Head => depth.checked_sub(1).map(Part::Layer),
        }
    }

    /// Every part of a model `depth` layers deep, in the order of its weights.
    pub fn all(depth: usize) -> impl Iterator<Item = Part> {
        std::iter::once(Part::Embedding)
            .chain((0..depth).map(Part::Layer))
            .chain(std::iter::once(Part::Head))
    }
}

/// Where the explicit pass reads the weights of each [`Part`] and adds their gradients:
/// the model's own, or (full sharding) parts kept by every rank, gathered when the pass
/// needs a part (for its forward, and again for its backward) and handed their
/// gradients as soon as the part's backward ends. The pass asks every store for the
/// same parts in the same order, whatever the batch.
pub trait WeightStore {
    /// `part`'s weights in the model's compute precision, in the order of [`Gpt::params`].
    fn weights(&self, part: Part) -> Vec<Tensor>;
    /// fp32 tensors to add `part`'s gradients into, in the same order.
    fn gradients(&self, part: Part) -> Vec<Tensor>;
    /// `grads` (what [`WeightStore::gradients`] gave) now hold all of `part`'s gradients
    /// from this pass.
    fn gradients_done(&self, part: Part, grads: Vec<Tensor>);
}

/// The model's own weights, cast once per pass, and its weights' gradients.
struct Resident {
    weights: Vec<Tensor>,
    grads: Vec<Tensor>,
    depth: usize,
}

impl WeightStore for Resident {
    fn weights(&self, part: Part) -> Vec<Tensor> {
        self.weights[part.weights(self.depth)]
            .iter()
            .map(Tensor::shallow_clone)
            .collect()
    }

    fn gradients(&self, part: Part) -> Vec<Tensor> {
        self.grads[part.weights(self.depth)]
            .iter()
            .map(Tensor::shallow_clone)
            .collect()
    }

    fn gradients_done(&self, _: Part, _: Vec<Tensor>) {}
}

/// What one layer's backward reads.
struct Saved {
    h1: Tensor,
    rstd1: Tensor,
    /// Rotated and normalized q and k, and v: `(B, T, heads + 2 kv_heads, dim)`, or
    /// `(1, B x T, ...)` for packed examples (whose rotary tables are per token).
    qkv: Tensor,
    rstd_qk: Tensor,
    /// The attention's output as `(N, width)`.
    out_rows: Tensor,
    attention: attention::Saved,
    h2: Tensor,
    rstd2: Tensor,
    /// relu^2's output `(N, hidden)`, or SwiGLU's input `(N, 2 hidden)` (its output is
    /// made again in the backward pass).
    act: Tensor,
}

/// What the backward pass has of a layer: what it reads, or (checkpointed) only the
/// layer's input.
enum Kept {
    Saved(Saved),
    Input(Tensor),
}

/// Where the time of explicit steps goes: seconds per phase, in order of first
/// appearance, each measured by synchronizing the device at its end.
#[derive(Default)]
pub struct Phases {
    last: Option<std::time::Instant>,
    pub seconds: Vec<(&'static str, f64)>,
}

impl Phases {
    /// Ends the phase `name` (the empty name starts timing).
    pub fn mark(&mut self, device: tch::Device, name: &'static str) {
        if let tch::Device::Cuda(index) = device {
            tch::Cuda::synchronize(index as i64);
        }
        let now = std::time::Instant::now();
        if let (Some(last), false) = (self.last, name.is_empty()) {
            let s = (now - last).as_secs_f64();
            match self.seconds.iter_mut().find(|(n, _)| *n == name) {
                Some((_, total)) => *total += s,
                None => self.seconds.push((name, s)),
            }
        }
        self.last = Some(now);
    }
}

/// Whether torch's matmul can add bf16 products into an fp32 matrix in place (its
/// `addmm` with an output type); if not, products are made in fp32 and then added.
static ADDMM_INTO_FP32: AtomicBool = AtomicBool::new(true);

/// `g += dy^T x`: a weight's gradient, accumulated in fp32.
fn add_weight_grad(g: &mut Tensor, dy: &Tensor, x: &Tensor) {
    let dy_t = dy.tr();
    if dy.kind() == Kind::Float {
        let _ = g.addmm_(&dy_t, x);
    } else if !ADDMM_INTO_FP32.load(Ordering::Relaxed)
        || g.f_addmm_dtype_out(g, &dy_t, x, Kind::Float).is_err()
    {
        ADDMM_INTO_FP32.store(false, Ordering::Relaxed);
        *g += dy_t.mm_dtype(x, Kind::Float);
    }
}

/// Why the explicit pass cannot train a model of this config, if it cannot.
pub fn explicit_unsupported(c: &ModelConfig) -> Option<String> {
    if c.softcap <= 0.0 {
        return Some("the fused loss needs a logit softcap".into());
    }
    let dim = c.head_dim();
    if !dim.is_multiple_of(4) || dim > cxxlm_cuda::fused::MAX_HEAD_DIM {
        return Some(format!(
            "head dim {dim} is not a multiple of 4 up to {}",
            cxxlm_cuda::fused::MAX_HEAD_DIM
        ));
    }
    None
}

impl Gpt {
    /// Trains by the explicit pass with the fused CUDA kernels of the model's device, once
    /// a copy of this model two layers deep has given autograd's loss and gradients with
    /// them on this GPU ([`check_explicit_pass`], with examples packed into rows when
    /// `packed`); says why not otherwise.
    pub fn use_fused_kernels(&mut self, packed: bool) -> Result<(), String> {
        let tch::Device::Cuda(index) = self.device else {
            return Err("the fused kernels need a CUDA device".into());
        };
        if let Some(why) = explicit_unsupported(&self.config) {
            return Err(why);
        }
        let config = self.config.clone();
        let checks = std::panic::catch_unwind(|| check_explicit_pass(index, &config, packed))
            .map_err(
            |panic| {
                format!(
                    "their check failed ({}); should CUDA fail from here on, run with CXXLM_FUSED=0",
                    crate::panic_message(panic.as_ref())
                )
            },
        )??;
        if let Some(bad) = checks.iter().find(|c| !c.ok()) {
            return Err(format!(
                "they disagree with autograd on this GPU: {} error {:.2e} > {:.0e}",
                bad.name, bad.error, bad.tolerance
            ));
        }
        self.enable_fused_kernels()
    }

    fn enable_fused_kernels(&mut self) -> Result<(), String> {
        let fused = Fused::for_device(self.device)?;
        self.set_fused(Some(fused)).map_err(|e| e.to_string())
    }

    /// RMSNorm's epsilon in the compute precision (PyTorch's default: the type's machine
    /// epsilon), as the autograd path uses it.
    fn norm_eps(&self) -> f64 {
        match self.compute {
            Kind::BFloat16 => 0.0078125,
            _ => f32::EPSILON as f64,
        }
    }

    /// [`Gpt::forward_backward`] by the explicit pass, with the time of each phase added
    /// to `phases` (the device synchronized between phases, so slower than a real step).
    pub fn forward_backward_profiled(
        &self,
        inputs: &Tensor,
        targets: &Tensor,
        phases: &mut Phases,
    ) -> Result<Tensor, String> {
        let fused = self
            .fused()
            .ok_or("the model trains by autograd, not the explicit pass")?;
        Ok(self.forward_backward_explicit(fused, None, inputs, targets, None, 1.0, Some(phases)))
    }

    /// [`Gpt::forward_backward`] by the explicit pass (with the reference steps if the
    /// model has no fused ones), reading the weights from `store` and adding their
    /// gradients there: the model's own weights are not read.
    pub fn forward_backward_from(
        &self,
        store: &dyn WeightStore,
        inputs: &Tensor,
        targets: &Tensor,
        packing: Option<&Packing>,
        scale: f64,
    ) -> Tensor {
        let fused = self.fused().unwrap_or(Fused::Reference);
        self.forward_backward_explicit(fused, Some(store), inputs, targets, packing, scale, None)
    }

    /// The model's own weights in the compute precision and their gradients.
    fn resident(&self) -> Resident {
        Resident {
            weights: self.compute_weights(),
            grads: self.param_grads(),
            depth: self.config.depth,
        }
    }

    /// [`Gpt::forward_backward`] by the explicit pass with `fused`'s steps, on the
    /// weights of `store` (None: the model's own).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_backward_explicit(
        &self,
        fused: Fused,
        store: Option<&dyn WeightStore>,
        inputs: &Tensor,
        targets: &Tensor,
        packing: Option<&Packing>,
        scale: f64,
        mut phases: Option<&mut Phases>,
    ) -> Tensor {
        let device = self.device;
        let mut mark = |name: &'static str| {
            if let Some(p) = phases.as_deref_mut() {
                p.mark(device, name)
            }
        };
        mark("");
        let _guard = tch::no_grad_guard();
        let c = &self.config;
        let (b, t) = (inputs.size()[0], inputs.size()[1]);
        let n = b * t;
        let (heads, kv, dim) = (c.heads as i64, c.kv_heads as i64, c.head_dim() as i64);
        let all = heads + 2 * kv;
        let eps = self.norm_eps();
        let temperature = c.logit_scale();
        let half = dim / 2;
        // Packed examples restart their positions: their rotary tables have a row per
        // token, and the rotary steps see the batch as one sequence.
        let (cos, sin, rotary_shape) = match packing {
            None => (
                self.cos.view([-1, half]),
                self.sin.view([-1, half]),
                [b, t, all, dim],
            ),
            Some(p) => (
                self.cos.view([-1, half]).index_select(0, &p.positions),
                self.sin.view([-1, half]).index_select(0, &p.positions),
                [1, n, all, dim],
            ),
        };
        let resident;
        let store = match store {
            Some(store) => store,
            None => {
                resident = self.resident();
                &resident as &dyn WeightStore
            }
        };
        // q, k and v of the rotated q|k|v, token-major `(B, T, heads, dim)`.
        let views = |qkv: &Tensor| {
            let qkv = qkv.view([b, t, all, dim]);
            (
                qkv.narrow(2, 0, heads),
                qkv.narrow(2, heads, kv),
                qkv.narrow(2, heads + kv, kv),
            )
        };
        let heads_first = |x: &Tensor| x.transpose(1, 2);

        let ids = inputs.reshape([n]);
        let wte = store.weights(Part::Embedding);
        let (x0, rstd0) = fused.rmsnorm(&wte[0].index_select(0, &ids), eps);
        drop(wte);
        mark("weights cast, embedding");
        // The residual stream, added to in place by the matmuls (x0 is kept for the
        // backward; nothing else reads the stream).
        let mut x = x0.copy();
        // One layer's forward on the residual stream `x` (added to in place), with the
        // layer's weights `lw`: what its backward reads.
        let forward_layer = |x: &mut Tensor, lw: &[Tensor], mark: &mut dyn FnMut(&'static str)| {
            let w = |k: usize| &lw[k];
            let wqkv = Tensor::cat(&[w(Q), w(K), w(V)], 0);
            let (h1, rstd1) = fused.rmsnorm(x, eps);
            mark("forward: rmsnorm");
            let qkv = h1.mm(&wqkv.tr()).view(rotary_shape);
            mark("forward: matmuls");
            let rstd_qk = fused.rope_norm_(&qkv, &cos, &sin, heads, eps);
            let (mut q, k, v) = views(&qkv);
            // The logit scale rides on q (the attention kernels take none).
            if let Some(m) = temperature {
                let _ = q.g_mul_scalar_(m);
            }
            mark("forward: rotary + qk-norm");
            let (out_rows, attention) = match packing {
                None => {
                    let (out, saved) =
                        attention::forward(&heads_first(&q), &heads_first(&k), &heads_first(&v));
                    (
                        out.transpose(1, 2).contiguous().view([n, heads * dim]),
                        saved,
                    )
                }
                Some(p) => {
                    assert!(
                        p.prefix.is_none(),
                        "the explicit pass keeps examples apart: a shared prefix is for autograd"
                    );
                    let (out, saved) = attention::forward_segments(&q, &k, &v, &p.segments);
                    (out.view([n, heads * dim]), saved)
                }
            };
            mark("forward: attention");
            let _ = x.addmm_(&out_rows, &w(PROJ).tr());
            mark("forward: matmuls");
            let (h2, rstd2) = fused.rmsnorm(x, eps);
            mark("forward: rmsnorm");
            let act = h2.mm(&w(FC).tr());
            mark("forward: matmuls");
            let out = match c.activation {
                Activation::Relu2 => {
                    fused.relu2_(&act);
                    act.shallow_clone()
                }
                Activation::Swiglu => fused.swiglu(&act),
            };
            mark("forward: activation");
            let _ = x.addmm_(&out, &w(MLP_PROJ).tr());
            mark("forward: matmuls");
            Saved {
                h1,
                rstd1,
                qkv,
                rstd_qk,
                out_rows,
                attention,
                h2,
                rstd2,
                act,
            }
        };
        // Checkpointed layers keep only their input, and run their forward again in the
        // backward pass.
        let checkpointed =
            |layer: usize| self.checkpoint_every > 0 && layer.is_multiple_of(self.checkpoint_every);
        let mut layers = Vec::with_capacity(c.depth);
        for layer in 0..c.depth {
            let lw = store.weights(Part::Layer(layer));
            let input = checkpointed(layer).then(|| x.copy());
            let saved = forward_layer(&mut x, &lw, &mut mark);
            layers.push(match input {
                Some(input) => Kept::Input(input),
                None => Kept::Saved(saved),
            });
        }
        let (hf, rstdf) = fused.rmsnorm(&x, eps);
        drop(x);
        mark("forward: rmsnorm");

        // The head and loss in chunks of rows: logits (bf16), then their gradient written
        // over them, then the head's weight gradient and the hidden states' gradient.
        let head = store.weights(Part::Head).pop().expect("lm_head");
        let mut head_grad = store.gradients(Part::Head);
        let targets = targets.reshape([n]);
        let dhf = hf.empty_like();
        let mut total = Tensor::zeros([], (Kind::Float, self.device));
        let mut start = 0;
        while start < n {
            let len = self.explicit_loss_chunk.min(n - start);
            let rows = hf.narrow(0, start, len);
            let logits = rows.mm(&head.tr());
            let losses = fused.softcap_cross_entropy_(
                &logits,
                &targets.narrow(0, start, len),
                c.softcap,
                scale,
            );
            total += losses.sum(Kind::Float);
            add_weight_grad(&mut head_grad[0], &logits, &rows);
            let _ = logits.mm_out(&dhf.narrow(0, start, len), &head);
            start += len;
        }
        drop(head);
        store.gradients_done(Part::Head, head_grad);
        mark("head and loss, both passes");
        let mut dx = fused.rmsnorm_backward(&dhf, &hf, &rstdf, None);
        drop((dhf, hf));
        mark("backward: rmsnorm");

        for layer in (0..c.depth).rev() {
            let lw = store.weights(Part::Layer(layer));
            let s = match layers.pop().expect("one saved state per layer") {
                Kept::Saved(saved) => saved,
                Kept::Input(mut input) => {
                    let saved = forward_layer(&mut input, &lw, &mut mark);
                    mark("backward: forward again");
                    saved
                }
            };
            let w = |k: usize| &lw[k];
            let mut grads = store.gradients(Part::Layer(layer));

            let dact = match c.activation {
                Activation::Relu2 => {
                    add_weight_grad(&mut grads[MLP_PROJ], &dx, &s.act);
                    let dact = dx.mm(w(MLP_PROJ));
                    mark("backward: matmuls");
                    fused.relu2_backward_(&dact, &s.act);
                    dact
                }
                Activation::Swiglu => {
                    add_weight_grad(&mut grads[MLP_PROJ], &dx, &fused.swiglu(&s.act));
                    let dout = dx.mm(w(MLP_PROJ));
                    mark("backward: matmuls");
                    fused.swiglu_backward(&dout, &s.act)
                }
            };
            mark("backward: activation");
            add_weight_grad(&mut grads[FC], &dact, &s.h2);
            let dh2 = dact.mm(w(FC));
            mark("backward: matmuls");
            dx = fused.rmsnorm_backward(&dh2, &s.h2, &s.rstd2, Some(&dx));
            mark("backward: rmsnorm");

            add_weight_grad(&mut grads[PROJ], &dx, &s.out_rows);
            let dout = dx.mm(w(PROJ)).view([b, t, heads, dim]);
            mark("backward: matmuls");
            let (mut q, k, v) = views(&s.qkv);
            let out = s.out_rows.view([b, t, heads, dim]);
            // The gradients of q, k and v as the rotary step takes them.
            let (dq, dk, dv) = match packing {
                None => {
                    let (dq, dk, dv) = attention::backward(
                        &s.attention,
                        &heads_first(&dout),
                        &heads_first(&q),
                        &heads_first(&k),
                        &heads_first(&v),
                        &heads_first(&out),
                    );
                    (heads_first(&dq), heads_first(&dk), heads_first(&dv))
                }
                Some(_) => {
                    let (dq, dk, dv) =
                        attention::backward_segments(&s.attention, &dout, &q, &k, &v, &out);
                    let one_sequence = |g: Tensor| g.view([1, n, -1, dim]);
                    (one_sequence(dq), one_sequence(dk), one_sequence(dv))
                }
            };
            // Back to the normalized q and its gradient, as the rotary step takes them.
            let mut dq = dq;
            if let Some(m) = temperature {
                let _ = q.g_mul_scalar_(1.0 / m);
                let _ = dq.g_mul_scalar_(m);
            }
            mark("backward: attention");
            fused.rope_norm_backward_(&dq, &dk, &dv, &s.qkv, &s.rstd_qk, &cos, &sin);
            let dqkv = s.qkv.view([n, all * dim]);
            mark("backward: rotary + qk-norm");
            let mut column = 0;
            for (k, width) in [(Q, heads * dim), (K, kv * dim), (V, kv * dim)] {
                add_weight_grad(&mut grads[k], &dqkv.narrow(1, column, width), &s.h1);
                column += width;
            }
            let dh1 = dqkv.mm(&Tensor::cat(&[w(Q), w(K), w(V)], 0));
            mark("backward: matmuls");
            dx = fused.rmsnorm_backward(&dh1, &s.h1, &s.rstd1, Some(&dx));
            mark("backward: rmsnorm");
            drop((s, lw));
            store.gradients_done(Part::Layer(layer), grads);
        }
        let de = fused.rmsnorm_backward(&dx, &x0, &rstd0, None);
        // Sorted by token rather than atomic adds: real text repeats a few tokens so often
        // that adds to their rows would queue.
        let vocab = c.vocab_size as i64;
        let mut grads = store.gradients(Part::Embedding);
        grads[0] +=
            Tensor::embedding_dense_backward(&de.to_kind(Kind::Float), &ids, vocab, -1, false);
        store.gradients_done(Part::Embedding, grads);
        mark("backward: embedding");
        total
    }

    /// Each weight's gradient (created as zeros where there is none yet), to add into.
    fn param_grads(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .map(|(_, p)| {
                if !p.grad().defined() {
                    tch::with_grad(|| (p.sum(Kind::Float) * 0.0).backward());
                }
                p.grad()
            })
            .collect()
    }
}

/// The explicit pass with the fused kernels against autograd on CUDA device `device`, both
/// in bf16: the loss and every weight's gradient (accumulated over two passes) of a model
/// like `like` but two layers deep, with random weights, on random tokens (2 x 256) some
/// of whose targets are ignored; with `packed`, as examples packed into the rows (each
/// attending only to itself, positions restarting), the rows' ends padding.
pub fn check_explicit_pass(
    device: usize,
    like: &ModelConfig,
    packed: bool,
) -> Result<Vec<Check>, String> {
    let _guard = crate::TORCH_RNG.lock().unwrap_or_else(|p| p.into_inner());
    let seq = like.seq_len.min(256);
    let config = ModelConfig {
        depth: 2,
        seq_len: seq,
        ..like.clone()
    };
    let dev = tch::Device::Cuda(device);
    let vocab = config.vocab_size as i64;
    let mut model = Gpt::new(config, dev, 0).map_err(|e| e.to_string())?;
    tch::no_grad(|| {
        for (name, p) in &mut model.params {
            let std = match name.as_str() {
                "wte" => 1.0,
                _ => (p.size()[1] as f64).powf(-0.5),
            };
            p.copy_(&(p.randn_like() * std));
        }
    });
    let shape = [2, seq as i64];
    let inputs = Tensor::randint(vocab, shape, (Kind::Int64, dev));
    let targets = Tensor::randint(vocab, shape, (Kind::Int64, dev));
    let _ = targets.narrow(1, 0, 16).fill_(-1);
    let packing = packed.then(|| {
        let rows = [vec![seq / 3, seq / 2], vec![seq / 4, seq / 4, seq / 2]];
        Packing::new(&rows, seq, dev)
    });
    let scale = 1.0 / inputs.numel() as f64;
    let want_loss = model.forward_backward_autograd(&inputs, &targets, packing.as_ref(), scale);
    let want: Vec<Tensor> = model.params.iter().map(|(_, p)| p.grad().copy()).collect();
    for (_, p) in &mut model.params {
        p.zero_grad();
    }
    model.enable_fused_kernels()?;
    let what = if packed { "packed examples" } else { "rows" };
    // Two passes: gradients must add up over micro-batches, not overwrite each other.
    let mut checks = Vec::new();
    for pass in ["first", "second"] {
        let loss = model.forward_backward(&inputs, &targets, packing.as_ref(), scale);
        let name = format!("model loss of {what}, {pass} pass");
        checks.push(Check::relative_l2(name, &loss, &want_loss, 1e-2));
    }
    for ((name, p), w) in model.params.iter().zip(&want) {
        let name = format!("model gradient {name} of {what}, two passes");
        checks.push(Check::relative_l2(name, &p.grad(), &(w * 2.0), 5e-2));
    }
    Ok(checks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The explicit pass's loss and every weight's gradient, from zero, with the
    /// reference steps.
    fn explicit_grads(
        m: &mut Gpt,
        idx: &Tensor,
        tgt: &Tensor,
        packing: Option<&Packing>,
        scale: f64,
    ) -> (f64, Vec<Tensor>) {
        for (_, p) in &mut m.params {
            p.zero_grad();
        }
        let loss =
            m.forward_backward_explicit(Fused::Reference, None, idx, tgt, packing, scale, None);
        let grads = m.params.iter().map(|(_, p)| p.grad().copy()).collect();
        (loss.double_value(&[]), grads)
    }

    /// The explicit pass with the reference steps against autograd, on the CPU (fp32):
    /// the same loss and the same gradient for every weight, GQA included, on rows and on
    /// examples packed into rows.
    #[test]
    fn explicit_backward_matches_autograd() {
        let _rng = crate::TORCH_RNG.lock();
        let rows = [vec![5, 11], vec![16], vec![3, 4, 6]];
        let yarn = crate::Yarn {
            factor: 4.0,
            original_seq_len: 4,
            alpha: 1.0,
            beta: 32.0,
        };
        let (relu2, swiglu) = (Activation::Relu2, Activation::Swiglu);
        for (kv_heads, packed, rope_scaling, activation) in [
            (2, false, None, relu2),
            (1, false, None, relu2),
            (2, true, None, relu2),
            (1, true, None, relu2),
            (2, false, Some(yarn), relu2),
            (1, true, Some(yarn), relu2),
            (2, false, None, swiglu),
            (1, true, None, swiglu),
        ] {
            let config = ModelConfig {
                seq_len: 16,
                kv_heads,
                rope_scaling,
                activation,
                ..ModelConfig::preset("tiny", 300).unwrap()
            };
            assert_eq!(config.heads, 2, "the tiny preset has two heads");
            let mut m = Gpt::random(config, 3);
            m.explicit_loss_chunk = 20;
            let idx = Tensor::randint(300, [3, 16], (Kind::Int64, Device::Cpu));
            let tgt = Tensor::randint(300, [3, 16], (Kind::Int64, Device::Cpu));
            let _ = tgt.get(0).get(5).fill_(-1);
            let packing = packed.then(|| Packing::new(&rows, 16, Device::Cpu));
            let scale = 0.5 / 48.0;
            let reference = m.forward_backward_autograd(&idx, &tgt, packing.as_ref(), scale);
            let expected: Vec<Tensor> = m.params.iter().map(|(_, p)| p.grad().copy()).collect();
            let (loss, _) = explicit_grads(&mut m, &idx, &tgt, packing.as_ref(), scale);
            let diff = (loss - reference.double_value(&[])).abs() / 48.0;
            assert!(diff < 1e-5, "loss differs by {diff} (packed: {packed})");
            for ((name, p), e) in m.params.iter().zip(expected) {
                let err = (p.grad() - &e).abs().max().double_value(&[]);
                let size = e.abs().max().double_value(&[]);
                assert!(size > 0.0, "{name} has no gradient to compare");
                assert!(
                    err <= 1e-4 * size.max(1e-3),
                    "{name} (kv heads {kv_heads}, packed: {packed}, {activation:?}): {err} against {size}"
                );
            }
        }
    }

    /// The parts a pass asks for, in order.
    struct Recording {
        resident: Resident,
        asked: std::cell::RefCell<Vec<Part>>,
    }

    impl WeightStore for Recording {
        fn weights(&self, part: Part) -> Vec<Tensor> {
            self.asked.borrow_mut().push(part);
            self.resident.weights(part)
        }
        fn gradients(&self, part: Part) -> Vec<Tensor> {
            self.resident.gradients(part)
        }
        fn gradients_done(&self, part: Part, grads: Vec<Tensor>) {
            self.resident.gradients_done(part, grads)
        }
    }

    /// What full sharding gathers ahead is what the pass asks for next, with layers
    /// checkpointed or not, and nothing after the pass's last part.
    #[test]
    fn the_part_asked_for_next_is_known_ahead() {
        let _rng = crate::TORCH_RNG.lock();
        for (depth, every) in [(1, 0), (3, 0), (3, 1), (4, 2)] {
            let config = ModelConfig {
                seq_len: 16,
                depth,
                ..ModelConfig::preset("tiny", 300).unwrap()
            };
            let mut m = Gpt::random(config, 5);
            m.set_activation_checkpointing(every);
            let idx = Tensor::randint(300, [2, 16], (Kind::Int64, Device::Cpu));
            let store = Recording {
                resident: m.resident(),
                asked: Default::default(),
            };
            let _ = m.forward_backward_from(&store, &idx, &idx, None, 1.0);
            let asked = store.asked.into_inner();
            assert_eq!(asked.len(), 2 * depth + 2, "depth {depth}: {asked:?}");
            let mut previous = None;
            for (i, &part) in asked.iter().enumerate() {
                assert_eq!(
                    part.after(previous, depth),
                    asked.get(i + 1).copied(),
                    "{asked:?} at {i}"
                );
                previous = Some(part);
            }
        }
    }

    /// Layers that keep only their input and run their forward again in the backward
    /// pass give the same loss and gradients, bit for bit, packed or not.
    #[test]
    fn checkpointed_layers_give_the_same_gradients() {
        let _rng = crate::TORCH_RNG.lock();
        let config = ModelConfig {
            seq_len: 16,
            depth: 3,
            ..ModelConfig::preset("tiny", 300).unwrap()
        };
        let mut m = Gpt::random(config, 5);
        let idx = Tensor::randint(300, [3, 16], (Kind::Int64, Device::Cpu));
        let tgt = Tensor::randint(300, [3, 16], (Kind::Int64, Device::Cpu));
        let rows = [vec![5, 11], vec![16], vec![3, 4, 6]];
        for packing in [None, Some(Packing::new(&rows, 16, Device::Cpu))] {
            let mut run = |every: usize| {
                m.set_activation_checkpointing(every);
                explicit_grads(&mut m, &idx, &tgt, packing.as_ref(), 0.01)
            };
            let (loss, grads) = run(0);
            for every in [1, 2] {
                let (again, regrads) = run(every);
                assert_eq!(loss, again, "every {every}");
                for (g, r) in grads.iter().zip(&regrads) {
                    assert!(g.equal(r), "every {every}: a gradient differs");
                }
            }
        }
    }
}
