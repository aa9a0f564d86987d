//! The GPT of nanochat's family: token embedding, parameter-free RMSNorm before every
//! sub-layer and the head, rotary positions, QK-norm, relu^2 (or SwiGLU) MLP, no biases,
//! an untied head with a tanh logit softcap. On CUDA, activations are bf16 and weights
//! are kept in fp32 and cast for each matmul (what autocast does); on CPU everything is
//! fp32.

use tch::{Device, Kind, Reduction, Tensor};

use cxxlm_cuda::Fused;

use crate::config::{Activation, ModelConfig};
use crate::generate::KvCache;
use crate::packing::Packing;
use crate::ModelError;

/// Tokens whose fp32 logits are materialized at once by the loss.
const LOSS_CHUNK_ELEMENTS: i64 = 1 << 27;

/// The explicit pass's logits (bf16) made at once: 1 GiB of them. Each chunk costs a pass
/// over the head's fp32 gradient and matrix products of its size; at d12 B=32, chunks of
/// 2^27 took 1.6 ms a step more (`BENCHMARKS.md`).
pub const EXPLICIT_LOSS_CHUNK_ELEMENTS: usize = 1 << 29;

pub struct Gpt {
    pub config: ModelConfig,
    /// `wte`, then each block's matrices, then `lm_head`, as fp32 leaves.
    pub(crate) params: Vec<(String, Tensor)>,
    pub(crate) device: Device,
    pub(crate) compute: Kind,
    /// Rotary tables `(1, seq_len, 1, head_dim / 2)` in the compute precision.
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    /// Tokens whose logits the loss materializes at once: autograd's, the explicit pass's.
    pub(crate) loss_chunk: i64,
    pub(crate) explicit_loss_chunk: i64,
    /// Trains by the explicit pass with these steps instead of autograd.
    fused: Option<Fused>,
    /// The explicit pass keeps only the input of every this-many-th layer (0: none) and
    /// runs its forward again in the backward pass.
    pub(crate) checkpoint_every: usize,
    /// The weights' shapes while [`Gpt::release_weights`] has freed them.
    released: Option<Vec<Vec<i64>>>,
}

fn norm(x: &Tensor) -> Tensor {
    let d = *x.size().last().expect("a tensor with dimensions");
    x.rms_norm([d], None::<Tensor>, None)
}

/// Which of the first `from + t` cached positions each of `t` queries from position `from`
/// may attend to, `(t, from + t)`: itself and those before it.
fn offset_causal_mask(from: i64, t: i64, device: Device) -> Tensor {
    let opts = (Kind::Int64, device);
    let q = Tensor::arange_start(from, from + t, opts).view([t, 1]);
    let k = Tensor::arange(from + t, opts).view([1, from + t]);
    k.le_tensor(&q)
}

/// Which rows of the cache a prefill or a decoding step reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Read {
    /// Rows `first..first + n`, read in place.
    Range(i64),
    /// The rows the step's `rows` tensor names, gathered.
    Gather,
}

/// What the transformer does with a KV cache.
pub(crate) enum Cached<'a> {
    /// Training and scoring: none.
    No,
    /// Prompts of the cache's rows `rows` (device tensor; read in place when `read`
    /// says they are a range), all starting at position `from` (what the cache holds
    /// before it is kept): their keys and values are stored. Shorter prompts are padded
    /// on the right, which causal attention never sees.
    Fill {
        cache: &'a KvCache,
        rows: &'a Tensor,
        read: Read,
        from: i64,
    },
    /// One token per row: row `rows[i]` of the cache (device tensors, so that a captured
    /// step replays on new values) at position `pos[i]`, stored there, attending to
    /// the row's cached positions up to it, among the first `span`. Shapes do not
    /// depend on the positions. With `kernel`, attention reads each row's filled
    /// positions in place ([`Fused::decode_attention`]); otherwise the rows' first
    /// `span` positions, under a mask.
    Step {
        cache: &'a KvCache,
        rows: &'a Tensor,
        read: Read,
        pos: &'a Tensor,
        span: i64,
        kernel: Option<Fused>,
    },
    /// Training and scoring of examples packed side by side: none, and each example
    /// attends only to itself, from position 0.
    Packed(&'a Packing),
}

fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let d = x.size()[3] / 2;
    let (x1, x2) = (x.narrow(3, 0, d), x.narrow(3, d, d));
    let y1 = &x1 * cos + &x2 * sin;
    let y2 = &x2 * cos - &x1 * sin;
    Tensor::cat(&[y1, y2], 3).to_kind(x.kind())
}

impl Gpt {
    /// A freshly initialised model (nanochat's scheme: N(0, 1) embedding, matrices
    /// N(0, 1/sqrt(in) x min(1, sqrt(out/in))), zero output projections and head), drawn
    /// on the CPU from `seed` so that every device starts from the same weights.
    pub fn new(config: ModelConfig, device: Device, seed: u64) -> Result<Self, ModelError> {
        config.validate()?;
        tch::manual_seed(seed as i64);
        let normal = |shape: [usize; 2], std: f64| {
            (Tensor::randn(
                [shape[0] as i64, shape[1] as i64],
                (Kind::Float, Device::Cpu),
            ) * std)
                .to_device(device)
        };
        let zeros = |shape: [usize; 2]| {
            Tensor::zeros([shape[0] as i64, shape[1] as i64], (Kind::Float, device))
        };
        let mut params = vec![(
            "wte".to_string(),
            normal([config.vocab_size, config.width], 1.0),
        )];
        for layer in 0..config.depth {
            for (name, [out, inp]) in config.block_shapes() {
                let w = if name.ends_with("proj") {
                    zeros([out, inp])
                } else {
                    let std = (inp as f64).powf(-0.5) * (out as f64 / inp as f64).sqrt().min(1.0);
                    normal([out, inp], std)
                };
                params.push((format!("blocks.{layer}.{name}"), w));
            }
        }
        params.push((
            "lm_head".to_string(),
            zeros([config.vocab_size, config.width]),
        ));
        for (_, p) in &mut params {
            *p = p.set_requires_grad(true);
        }
        let compute = if device.is_cuda() {
            Kind::BFloat16
        } else {
            Kind::Float
        };
        let half = config.head_dim() as i64 / 2;
        let inv = Tensor::from_slice(&config.rope_frequencies()).to_kind(Kind::Float);
        let freqs = Tensor::arange(config.seq_len as i64, (Kind::Float, Device::Cpu))
            .outer(&inv)
            .view([1, config.seq_len as i64, 1, half]);
        Ok(Gpt {
            cos: freqs.cos().to_kind(compute).to_device(device),
            sin: freqs.sin().to_kind(compute).to_device(device),
            loss_chunk: (LOSS_CHUNK_ELEMENTS / config.vocab_size as i64).max(1),
            explicit_loss_chunk: (EXPLICIT_LOSS_CHUNK_ELEMENTS / config.vocab_size).max(1) as i64,
            config,
            params,
            device,
            compute,
            fused: None,
            checkpoint_every: 0,
            released: None,
        })
    }

    /// Trains with the explicit backward pass and `fused`'s steps (None: autograd).
    /// Refused for models that pass does not cover.
    pub fn set_fused(&mut self, fused: Option<Fused>) -> Result<(), ModelError> {
        if let (Some(_), Some(why)) = (fused, crate::explicit::explicit_unsupported(&self.config)) {
            return Err(ModelError::Config(why));
        }
        self.fused = fused;
        Ok(())
    }

    pub fn fused(&self) -> Option<Fused> {
        self.fused
    }

    /// Activation checkpointing in the explicit pass: every `every`-th layer, from the
    /// first, keeps only its input for the backward pass (1: every layer; 0: none).
    pub fn set_activation_checkpointing(&mut self, every: usize) {
        self.checkpoint_every = every;
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The precision the passes compute in (bf16 on CUDA, fp32 on CPU).
    pub fn compute_kind(&self) -> Kind {
        self.compute
    }

    /// Frees the weights' memory, keeping their names and shapes, until [`Gpt::load`]
    /// gives them back: full sharding keeps the weights as parts on every rank between
    /// uses, and passes them to the explicit pass through a [`crate::WeightStore`].
    pub fn release_weights(&mut self) {
        if self.released.is_none() {
            self.released = Some(self.params.iter().map(|(_, p)| p.size()).collect());
        }
        for (_, p) in &mut self.params {
            *p = Tensor::empty([0], (Kind::Float, self.device));
        }
    }

    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    pub fn param_count(&self) -> usize {
        match &self.released {
            Some(shapes) => shapes
                .iter()
                .map(|s| s.iter().product::<i64>() as usize)
                .sum(),
            None => self.params.iter().map(|(_, p)| p.numel()).sum(),
        }
    }

    /// Replaces every weight with the tensor of the same name and shape (copied into the
    /// weight, or taken as the weight when it was released).
    pub fn load(&mut self, tensors: &[(String, Tensor)]) -> Result<(), ModelError> {
        if tensors.len() != self.params.len() {
            return Err(ModelError::Config(format!(
                "checkpoint holds {} tensors, the model has {}",
                tensors.len(),
                self.params.len()
            )));
        }
        let _guard = tch::no_grad_guard();
        let shapes = match &self.released {
            Some(shapes) => shapes.clone(),
            None => self.params.iter().map(|(_, p)| p.size()).collect(),
        };
        for ((name, p), shape) in self.params.iter_mut().zip(shapes) {
            let t = tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| ModelError::Config(format!("checkpoint lacks {name}")))?;
            if t.size() != shape {
                return Err(ModelError::Config(format!(
                    "{name} is {:?} in the checkpoint, {shape:?} in the model",
                    t.size(),
                )));
            }
            match self.released {
                Some(_) => {
                    *p = t
                        .detach()
                        .to_device(self.device)
                        .to_kind(Kind::Float)
                        .set_requires_grad(true)
                }
                None => {
                    p.copy_(t);
                }
            }
        }
        self.released = None;
        Ok(())
    }

    /// Every weight in the compute precision (a cast per call on CUDA: once per
    /// micro-batch in training, once per generation).
    pub(crate) fn compute_weights(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .map(|(_, p)| {
                if p.kind() == self.compute {
                    p.shallow_clone()
                } else {
                    p.to_kind(self.compute)
                }
            })
            .collect()
    }

    /// The final normalized hidden states `(B, T, width)` of token ids `(B, T)`.
    pub fn hidden(&self, idx: &Tensor) -> Tensor {
        self.forward(&self.compute_weights(), idx, Cached::No)
    }

    /// Embeddings `(B, width)` of token ids `(B, T)`: each row's final hidden states
    /// averaged over its tokens (`mask` 1, padding after them 0), in fp32 and
    /// L2-normalized; with gradients where gradients are on. Padding changes nothing
    /// before it: attention is causal.
    pub fn embeddings(&self, idx: &Tensor, mask: &Tensor) -> Tensor {
        let h = self.hidden(idx).to_kind(Kind::Float);
        let m = mask.to_kind(Kind::Float).unsqueeze(-1);
        let sum = (h * &m).sum_dim_intlist(1, false, Kind::Float);
        let mean = sum / m.sum_dim_intlist(1, false, Kind::Float).clamp_min(1.0);
        let norm = mean.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12);
        mean / norm
    }

    /// A model like `Gpt::new`'s with every weight drawn from N(0, 0.1^2): zero-initialised
    /// projections and head would leave most outputs and gradients zero in tests.
    #[cfg(test)]
    pub(crate) fn random(config: ModelConfig, seed: u64) -> Gpt {
        let mut m = Gpt::new(config, Device::Cpu, seed).expect("a test model");
        tch::no_grad(|| {
            for (_, p) in &mut m.params {
                p.copy_(&(p.randn_like() * 0.1));
            }
        });
        m
    }

    /// Training and scoring without a cache, packed or not.
    fn uncached(packing: Option<&Packing>) -> Cached<'_> {
        packing.map_or(Cached::No, Cached::Packed)
    }

    /// The transformer over `idx`, continuing what `cache` holds when there is one (a
    /// prompt from position 0, or one token per sequence after it).
    // `x += ...` on a tch tensor adds in place, which would overwrite the residual that
    // the norms saved for the backward pass.
    #[allow(clippy::assign_op_pattern)]
    pub(crate) fn forward(&self, w: &[Tensor], idx: &Tensor, cached: Cached) -> Tensor {
        let t = idx.size()[1];
        let c = &self.config;
        let (nh, nkv, hd) = (c.heads as i64, c.kv_heads as i64, c.head_dim() as i64);
        let half = c.head_dim() as i64 / 2;
        let (cos, sin, mask) = match &cached {
            Cached::Step {
                cache,
                pos,
                span,
                kernel,
                ..
            } => {
                let n = idx.size()[0];
                let half = self.cos.size()[3];
                let visible = kernel.is_none().then(|| {
                    cache
                        .positions
                        .narrow(0, 0, *span)
                        .view([1, *span])
                        .le_tensor(&pos.view([n, 1]))
                        .view([n, 1, 1, *span])
                });
                (
                    self.cos.index_select(1, pos).view([n, 1, 1, half]),
                    self.sin.index_select(1, pos).view([n, 1, 1, half]),
                    visible,
                )
            }
            Cached::Fill { from, .. } => (
                self.cos.narrow(1, *from, t),
                self.sin.narrow(1, *from, t),
                (*from > 0).then(|| offset_causal_mask(*from, t, self.device)),
            ),
            Cached::No => (self.cos.narrow(1, 0, t), self.sin.narrow(1, 0, t), None),
            Cached::Packed(p) => {
                let at = |table: &Tensor| {
                    table
                        .view([-1, half])
                        .index_select(0, &p.positions)
                        .view([-1, t, 1, half])
                };
                (at(&self.cos), at(&self.sin), Some(p.bias(self.compute)))
            }
        };
        let logit_scale = c.logit_scale().map(|s| s / (hd as f64).sqrt());
        let mut x = norm(
            &Tensor::embedding(&self.params[0].1, idx, -1, false, false).to_kind(self.compute),
        );
        for layer in 0..c.depth {
            let w = |k: usize| &w[1 + layer * 6 + k];
            let b = x.size()[0];
            let h = norm(&x);
            let q = h.linear(w(0), None::<Tensor>).view([b, t, nh, hd]);
            let k = h.linear(w(1), None::<Tensor>).view([b, t, nkv, hd]);
            let v = h.linear(w(2), None::<Tensor>).view([b, t, nkv, hd]);
            let q = norm(&rotary(&q, &cos, &sin)).transpose(1, 2);
            let mut k = norm(&rotary(&k, &cos, &sin)).transpose(1, 2);
            let mut v = v.transpose(1, 2);
            let mut decoded = None;
            match &cached {
                Cached::Fill {
                    cache,
                    rows,
                    read,
                    from,
                } => {
                    // Stores the prompts' part and returns what they attend to.
                    let store = |all: &Tensor, new: &Tensor| match read {
                        Read::Range(first) => {
                            let mine = all.narrow(0, *first, b);
                            mine.narrow(2, *from, t).copy_(new);
                            mine.narrow(2, 0, from + t)
                        }
                        Read::Gather => {
                            let _ = all.narrow(2, *from, t).index_copy_(0, rows, new);
                            match *from {
                                0 => new.shallow_clone(),
                                _ => all.index_select(0, rows).narrow(2, 0, from + t),
                            }
                        }
                    };
                    k = store(&cache.keys[layer], &k);
                    v = store(&cache.values[layer], &v);
                }
                Cached::Step {
                    cache,
                    rows,
                    read,
                    pos,
                    span,
                    kernel,
                } => {
                    let at = [Some(rows.shallow_clone()), None, Some(pos.shallow_clone())];
                    let (keys, values) = (&cache.keys[layer], &cache.values[layer]);
                    for (all, new) in [(keys, &k), (values, &v)] {
                        let _ = all
                            .shallow_clone()
                            .index_put_(&at, &new.squeeze_dim(2), false);
                    }
                    if let Some(kernel) = kernel {
                        let scale = logit_scale.unwrap_or(1.0 / (hd as f64).sqrt());
                        let q = q.squeeze_dim(2).contiguous();
                        let y = kernel.decode_attention(&q, keys, values, rows, pos, scale);
                        decoded = Some(y.unsqueeze(2));
                    } else {
                        let read = |all: &Tensor| {
                            match read {
                                Read::Range(first) => all.narrow(0, *first, b),
                                Read::Gather => all.index_select(0, rows),
                            }
                            .narrow(2, 0, *span)
                        };
                        k = read(keys);
                        v = read(values);
                    }
                }
                Cached::No | Cached::Packed(_) => {}
            }
            // A prompt from position 0 attends causally; one after cached positions, a
            // decoding step and packed examples, through their masks.
            let y = decoded.unwrap_or_else(|| {
                Tensor::scaled_dot_product_attention(
                    &q,
                    &k,
                    &v,
                    mask.as_ref(),
                    0.0,
                    t > 1 && mask.is_none(),
                    logit_scale,
                    nkv != nh,
                )
            });
            let y = y.transpose(1, 2).contiguous().view([b, t, nh * hd]);
            x = x + y.linear(w(3), None::<Tensor>);
            let h = norm(&x).linear(w(4), None::<Tensor>);
            let h = match c.activation {
                Activation::Relu2 => h.relu().square(),
                Activation::Swiglu => {
                    let parts = h.chunk(2, -1);
                    parts[0].silu() * &parts[1]
                }
            };
            x = x + h.linear(w(5), None::<Tensor>);
        }
        norm(&x)
    }

    /// Softcapped fp32 logits `(B, T, V)` of token ids `(B, T)`, without gradients.
    pub fn forward_logits(&self, idx: &Tensor) -> Tensor {
        let _guard = tch::no_grad_guard();
        let w = self.compute_weights();
        let h = self.forward(&w, idx, Cached::No);
        self.logits(&h, w.last().expect("lm_head"))
    }

    /// Softcapped fp32 logits `(B, T, V)` of token ids `(B, T)` with gradients, for losses
    /// other than cross-entropy (RL's); packed or not. With `at` (indices into the `B x T`
    /// positions, row-major), the logits `(N, V)` of those positions only: the head and
    /// what follows it cost nothing for the others (a completion's prompt).
    pub fn logits_with_grad(
        &self,
        idx: &Tensor,
        packing: Option<&Packing>,
        at: Option<&Tensor>,
    ) -> Tensor {
        let w = self.compute_weights();
        let h = self.forward(&w, idx, Self::uncached(packing));
        let h = match at {
            Some(at) => h.view([-1, h.size()[2]]).index_select(0, at),
            None => h,
        };
        self.logits(&h, w.last().expect("lm_head"))
    }

    /// Softcapped fp32 logits of hidden states `(N, width)`.
    pub(crate) fn logits(&self, h: &Tensor, head: &Tensor) -> Tensor {
        let cap = self.config.softcap;
        ((h.linear(head, None::<Tensor>) / cap).tanh() * cap).to_kind(Kind::Float)
    }

    /// Forward and backward of one micro-batch: gradients of `scale` x the summed loss of
    /// its targets are added to the weights' gradients (negative targets are not
    /// supervised: they add nothing). Returns that summed loss, a device scalar.
    pub fn forward_backward(
        &self,
        inputs: &Tensor,
        targets: &Tensor,
        packing: Option<&Packing>,
        scale: f64,
    ) -> Tensor {
        match self.fused {
            Some(fused) => {
                self.forward_backward_explicit(fused, None, inputs, targets, packing, scale, None)
            }
            None => self.forward_backward_autograd(inputs, targets, packing, scale),
        }
    }

    /// [`Gpt::forward_backward`] by autograd. The head and loss run over chunks of tokens,
    /// each chunk's backward right after its forward, so the fp32 logits of the whole
    /// batch never exist at once.
    pub(crate) fn forward_backward_autograd(
        &self,
        inputs: &Tensor,
        targets: &Tensor,
        packing: Option<&Packing>,
        scale: f64,
    ) -> Tensor {
        let weights = self.compute_weights();
        let h = self.forward(&weights, inputs, Self::uncached(packing));
        let head = weights.last().expect("lm_head");
        let n = inputs.numel() as i64;
        let flat = h.view([n, self.config.width as i64]);
        let targets = targets.reshape([n]);
        let mut total = Tensor::zeros([], (Kind::Float, self.device));
        let mut grads = Vec::new();
        let chunk = self.loss_chunk;
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let x = flat.narrow(0, start, len).detach().set_requires_grad(true);
            let loss = self.logits(&x, head).cross_entropy_loss::<Tensor>(
                &targets.narrow(0, start, len),
                None,
                Reduction::Sum,
                -1,
                0.0,
            );
            (&loss * scale).backward();
            total += loss.detach();
            grads.push(x.grad());
            start += len;
        }
        (flat * Tensor::cat(&grads, 0)).sum(Kind::Float).backward();
        total
    }

    /// Loss in nats of every target token `(B*T)` (0 where the target is negative),
    /// without gradients.
    pub fn token_losses(
        &self,
        inputs: &Tensor,
        targets: &Tensor,
        packing: Option<&Packing>,
    ) -> Tensor {
        let _guard = tch::no_grad_guard();
        let n = inputs.numel() as i64;
        let weights = self.compute_weights();
        let flat = self
            .forward(&weights, inputs, Self::uncached(packing))
            .view([n, self.config.width as i64]);
        let head = weights.last().expect("lm_head");
        let targets = targets.reshape([n]);
        let chunk = self.loss_chunk;
        let parts: Vec<Tensor> = (0..n)
            .step_by(chunk as usize)
            .map(|s| {
                let len = chunk.min(n - s);
                self.logits(&flat.narrow(0, s, len), head)
                    .cross_entropy_loss::<Tensor>(
                        &targets.narrow(0, s, len),
                        None,
                        Reduction::None,
                        -1,
                        0.0,
                    )
            })
            .collect();
        Tensor::cat(&parts, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig {
            seq_len: 16,
            ..ModelConfig::preset("tiny", 300).unwrap()
        }
    }

    #[test]
    fn parameter_count_matches_the_formula() {
        let _rng = crate::TORCH_RNG.lock();
        let m = Gpt::new(tiny(), Device::Cpu, 0).unwrap();
        assert_eq!(m.param_count(), m.config.params());
        let gqa = ModelConfig {
            kv_heads: 1,
            activation: Activation::Swiglu,
            ..tiny()
        };
        assert_eq!(
            Gpt::new(gqa.clone(), Device::Cpu, 0).unwrap().param_count(),
            gqa.params()
        );
    }

    #[test]
    fn released_weights_come_back_with_load() {
        let _rng = crate::TORCH_RNG.lock();
        let mut m = Gpt::random(tiny(), 4);
        let weights: Vec<(String, Tensor)> = m
            .params()
            .iter()
            .map(|(n, p)| (n.clone(), p.detach().copy()))
            .collect();
        let idx = Tensor::from_slice(&[5i64, 6, 7]).unsqueeze(0);
        let before = tch::no_grad(|| m.hidden(&idx));
        let count = m.param_count();
        m.release_weights();
        assert!(m.params().iter().all(|(_, p)| p.numel() == 0));
        assert_eq!(m.param_count(), count);
        let mut wrong: Vec<(String, Tensor)> = weights
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        wrong[1].1 = wrong[1].1.narrow(0, 0, 1);
        assert!(m
            .load(&wrong)
            .unwrap_err()
            .to_string()
            .contains("in the model"));
        m.load(&weights).unwrap();
        assert!(tch::no_grad(|| m.hidden(&idx)).equal(&before));
    }

    #[test]
    fn chunked_loss_matches_the_whole_batch_loss_and_its_gradients() {
        let _rng = crate::TORCH_RNG.lock();
        let mut m = Gpt::new(tiny(), Device::Cpu, 1).unwrap();
        // The zero-initialised head gives no signal; give it weights.
        tch::no_grad(|| {
            m.params
                .last_mut()
                .unwrap()
                .1
                .copy_(&(Tensor::randn([300, 128], (Kind::Float, Device::Cpu)) * 0.05))
        });
        m.loss_chunk = 7;
        let idx = Tensor::randint(300, [3, 16], (Kind::Int64, Device::Cpu));
        let tgt = Tensor::randint(300, [3, 16], (Kind::Int64, Device::Cpu));
        let loss = m.forward_backward(&idx, &tgt, None, 1.0 / 48.0) / 48.0;
        let grads: Vec<Tensor> = m.params.iter().map(|(_, p)| p.grad().copy()).collect();
        for (_, p) in &mut m.params {
            p.zero_grad();
        }
        let h = m.hidden(&idx).view([48, 128]);
        let whole = m
            .logits(&h, m.compute_weights().last().unwrap())
            .cross_entropy_loss::<Tensor>(&tgt.view([48]), None, Reduction::Mean, -1, 0.0);
        whole.backward();
        assert!((loss.double_value(&[]) - whole.double_value(&[])).abs() < 1e-5);
        for ((name, p), g) in m.params.iter().zip(grads) {
            let diff = (p.grad() - &g).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{name}: {diff}");
        }
        assert!(
            (m.token_losses(&idx, &tgt, None).mean(Kind::Float) - whole)
                .abs()
                .double_value(&[])
                < 1e-5
        );
    }

    /// The rotary tables of a YaRN model against the paper's definition, computed here
    /// from wavelengths: `lambda = 2 pi base^(2i/d)`, `r = L / lambda`, the frequency kept
    /// above beta rotations, divided by s below alpha, blended linearly in r between;
    /// and the attention temperature `sqrt(1/t) = 0.1 ln s + 1`.
    #[test]
    fn yarn_tables_follow_the_paper() {
        let _rng = crate::TORCH_RNG.lock();
        let yarn = crate::Yarn {
            factor: 4.0,
            original_seq_len: 1024,
            alpha: 1.0,
            beta: 32.0,
        };
        let config = ModelConfig {
            seq_len: 256,
            rope_scaling: Some(yarn),
            ..tiny()
        };
        let m = Gpt::new(config.clone(), Device::Cpu, 0).unwrap();
        let (d, base, s) = (config.head_dim(), config.rope_base, yarn.factor);
        let mut regimes = [0; 3];
        for i in 0..d / 2 {
            let wavelength = 2.0 * std::f64::consts::PI * base.powf(2.0 * i as f64 / d as f64);
            let theta = 2.0 * std::f64::consts::PI / wavelength;
            let r = 1024.0 / wavelength;
            let h = if r < 1.0 {
                regimes[0] += 1;
                theta / s
            } else if r > 32.0 {
                regimes[2] += 1;
                theta
            } else {
                regimes[1] += 1;
                let gamma = (r - 1.0) / 31.0;
                (1.0 - gamma) * theta / s + gamma * theta
            };
            for pos in [0, 1, 63, 64, 200, 255i64] {
                let angle = pos as f64 * h;
                let at = [0, pos, 0, i as i64];
                let (cos, sin) = (m.cos.double_value(&at), m.sin.double_value(&at));
                assert!(
                    (cos - angle.cos()).abs() < 1e-4 && (sin - angle.sin()).abs() < 1e-4,
                    "dimension {i}, position {pos}: ({cos}, {sin}) against angle {angle}"
                );
            }
        }
        assert!(regimes.iter().all(|&n| n > 0), "every regime: {regimes:?}");
        let temperature = (0.1 * 4f64.ln() + 1.0).powi(2);
        assert!((config.logit_scale().unwrap() - temperature).abs() < 1e-12);
        assert_eq!(tiny().logit_scale(), None);
        for bad in [
            crate::Yarn {
                factor: 0.5,
                ..yarn
            },
            crate::Yarn {
                alpha: 40.0,
                ..yarn
            },
        ] {
            let c = ModelConfig {
                rope_scaling: Some(bad),
                ..tiny()
            };
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("model.rope_scaling"), "{e}");
        }
    }

    /// The temperature multiplies the attention logits: a model's attention with YaRN at
    /// factor s equals, position by position, attention computed by hand with the logits
    /// times `(0.1 ln s + 1)^2`.
    #[test]
    fn the_temperature_scales_the_logits() {
        let _rng = crate::TORCH_RNG.lock();
        let yarn = crate::Yarn {
            factor: 8.0,
            original_seq_len: 16,
            alpha: 1.0,
            beta: 32.0,
        };
        let config = ModelConfig {
            depth: 1,
            rope_scaling: Some(yarn),
            ..tiny()
        };
        let m = Gpt::random(config, 2);
        let idx = Tensor::from_slice(&[5i64, 6, 7, 8, 9]).unsqueeze(0);
        let got = tch::no_grad(|| m.hidden(&idx));
        // The same layer by hand.
        let w: Vec<Tensor> = m.compute_weights();
        let t = 5;
        let (nh, hd) = (2, 64);
        let x = norm(&Tensor::embedding(&w[0], &idx, -1, false, false));
        let h = norm(&x);
        let heads = |k: usize| h.linear(&w[1 + k], None::<Tensor>).view([1, t, nh, hd]);
        let (cos, sin) = (m.cos.narrow(1, 0, t), m.sin.narrow(1, 0, t));
        let q = norm(&rotary(&heads(0), &cos, &sin)).transpose(1, 2);
        let k = norm(&rotary(&heads(1), &cos, &sin)).transpose(1, 2);
        let v = heads(2).transpose(1, 2);
        let scale = (0.1 * 8f64.ln() + 1.0).powi(2) / (hd as f64).sqrt();
        let logits = q.matmul(&k.transpose(2, 3)) * scale;
        let causal = Tensor::ones([t, t], (Kind::Bool, Device::Cpu)).tril(0);
        let att = logits
            .masked_fill(&causal.logical_not(), f64::NEG_INFINITY)
            .softmax(-1, Kind::Float);
        let y = att
            .matmul(&v)
            .transpose(1, 2)
            .contiguous()
            .view([1, t, nh * hd]);
        let x = &x + y.linear(&w[4], None::<Tensor>);
        let mlp = norm(&x).linear(&w[5], None::<Tensor>).relu().square();
        let want = norm(&(&x + mlp.linear(&w[6], None::<Tensor>)));
        let diff = (got - want).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn embeddings_are_unit_means_of_the_tokens_not_the_padding() {
        let _rng = crate::TORCH_RNG.lock();
        let m = Gpt::random(tiny(), 3);
        let _guard = tch::no_grad_guard();
        let alone = Tensor::from_slice(&[5i64, 6, 7]).unsqueeze(0);
        let padded = Tensor::from_slice(&[5i64, 6, 7, 0, 0, 9, 8, 7, 6, 5]).view([2, 5]);
        let mask = Tensor::from_slice(&[1i64, 1, 1, 0, 0, 1, 1, 1, 1, 1]).view([2, 5]);
        let e = m.embeddings(&padded, &mask);
        let mean = m.hidden(&alone).mean_dim(1, false, Kind::Float);
        let direct = &mean / mean.norm();
        let diff = (e.get(0) - direct.get(0)).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{diff}");
        let norms = e.norm_scalaropt_dim(2, [1], false);
        assert!((norms - 1.0).abs().max().double_value(&[]) < 1e-5);
    }

    #[test]
    fn samples_packed_after_their_shared_prompt_score_as_alone() {
        let _rng = crate::TORCH_RNG.lock();
        let m = Gpt::random(tiny(), 4);
        let _guard = tch::no_grad_guard();
        let prompt = [5i64, 6, 7, 8];
        let samples: [&[i64]; 3] = [&[9, 10, 11], &[12], &[13, 14]];
        // The prompt but its last token, then each sample after a copy of that token.
        let mut row: Vec<i64> = prompt[..3].to_vec();
        let mut lengths = vec![3];
        for s in samples {
            row.push(prompt[3]);
            row.extend(s);
            lengths.push(1 + s.len());
        }
        row.extend([0, 0]);
        let t = row.len();
        let packing = Packing::with_shared_prefix(&[lengths], t, Device::Cpu);
        let shared =
            m.logits_with_grad(&Tensor::from_slice(&row).unsqueeze(0), Some(&packing), None);
        let mut at = 3;
        for s in samples {
            let alone: Vec<i64> = prompt.iter().chain(s.iter()).copied().collect();
            let logits = m.logits_with_grad(&Tensor::from_slice(&alone).unsqueeze(0), None, None);
            // From the prompt's last token on.
            let n = 1 + s.len() as i64;
            let want = logits.narrow(1, 3, n);
            let got = shared.narrow(1, at, n);
            let diff = (got - want).abs().max().double_value(&[]);
            assert!(diff < 1e-4, "sample {s:?}: {diff}");
            at += n;
        }
    }

    #[test]
    fn a_short_row_beside_samples_longer_than_the_context_scores_as_alone() {
        let _rng = crate::TORCH_RNG.lock();
        let m = Gpt::random(tiny(), 4);
        let _guard = tch::no_grad_guard();
        // Row 0: a prompt of 4 and three samples of 7 after it, 25 tokens in a context of
        // 16; row 1: a prompt and one sample, 5 tokens, the other 20 padding.
        let mut long: Vec<i64> = vec![5, 6, 7];
        let mut lengths = vec![3];
        for s in 0..3 {
            long.push(8);
            long.extend((0..6).map(|k| 20 + 6 * s + k));
            lengths.push(7);
        }
        let t = long.len();
        let short: Vec<i64> = vec![40, 41, 42, 43, 44];
        let mut padded = short.clone();
        padded.resize(t, 0);
        let rows = Tensor::from_slice(&[long, padded].concat()).view([2, t as i64]);
        let packing = Packing::with_shared_prefix(&[lengths, vec![4, 1]], t, Device::Cpu);
        let packed = m.logits_with_grad(&rows, Some(&packing), None);
        let alone = m.logits_with_grad(&Tensor::from_slice(&short).unsqueeze(0), None, None);
        let got = packed.narrow(0, 1, 1).narrow(1, 0, short.len() as i64);
        let diff = (got - alone).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "{diff}");
    }

    #[test]
    fn attention_is_causal() {
        let _rng = crate::TORCH_RNG.lock();
        let m = Gpt::random(tiny(), 2);
        let h = |ids: &[i64]| tch::no_grad(|| m.hidden(&Tensor::from_slice(ids).unsqueeze(0)));
        let diff = |a: &Tensor, b: &Tensor, from: i64, len: i64| {
            (a.narrow(1, from, len) - b.narrow(1, from, len))
                .abs()
                .max()
                .double_value(&[])
        };
        let base = h(&[5, 6, 7, 8]);
        assert!(
            diff(&base, &h(&[5, 6, 7, 9]), 0, 3) < 1e-6,
            "the future leaks into the past"
        );
        assert!(
            diff(&base, &h(&[4, 6, 7, 8]), 3, 1) > 1e-4,
            "the past reaches the future"
        );
    }
}
